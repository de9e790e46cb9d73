//! `alerts:`: rule names, and the aggregation a window rule reads. The predicates are SQL,
//! checked by the engine.

use std::collections::HashSet;

use crate::config::file::AlertFile;
use crate::config::{Aggregation, AlertRule, Problems};

/// The rules, and every rule name written (for the notifiers' `rules:`). A rule naming an
/// aggregation that does not exist is reported and left out.
pub(super) fn resolve_alerts(
    p: &mut Problems,
    files: &[AlertFile],
    aggregations: &[Aggregation],
) -> (Vec<AlertRule>, HashSet<String>) {
    let mut alerts = Vec::new();
    let mut rule_names = HashSet::new();
    for (i, r) in files.iter().enumerate() {
        if r.name.is_empty() || !rule_names.insert(r.name.clone()) {
            p.add(
                &format!("alerts[{i}].name"),
                format!("rule name `{}` is empty or used twice", r.name),
                "give every rule its own name",
            );
        }
        let aggregation = r.aggregation.as_ref().and_then(|name| {
            let idx = aggregations.iter().position(|a| &a.name == name);
            if idx.is_none() {
                p.add(
                    &format!("alerts[{i}].aggregation"),
                    format!("no aggregation is named `{name}`"),
                    format!(
                        "name one of: {}",
                        aggregations
                            .iter()
                            .map(|a| a.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
            idx
        });
        if r.aggregation.is_some() && aggregation.is_none() {
            continue;
        }
        alerts.push(AlertRule {
            index: i,
            name: r.name.clone(),
            when: r.when.clone(),
            aggregation,
        });
    }
    (alerts, rule_names)
}
