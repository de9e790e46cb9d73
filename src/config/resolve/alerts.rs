//! `alerts:`: rule names, the aggregation a window rule reads, and detectors' parameters. The
//! predicates and a detector's `value`/`where` are SQL, checked by the engine.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use crate::config::file::{AlertFile, DetectFile, KnownFile};
use crate::config::{
    Aggregation, AlertRule, Check, Detector, DetectorKind, KnownDevices, Problems, RecordSchema,
    SERIES_SEP, hash_key,
};

const KINDS: &str = "zscore, mad, cusum, stuck, silent or rate";

/// The rules, and every rule name written (for the notifiers' `rules:`). A rule naming an
/// aggregation that does not exist is reported and left out.
pub(super) fn resolve_alerts(
    p: &mut Problems,
    files: &[AlertFile],
    aggregations: &[Aggregation],
    schema: Option<&RecordSchema>,
    around: Around,
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
        let check = match (&r.when, &r.detect) {
            (Some(when), None) => Check::When(when.clone()),
            (None, Some(d)) => {
                if r.aggregation.is_some() {
                    p.add(
                        &format!("alerts[{i}].aggregation"),
                        "a detector watches records, not an aggregation's windows",
                        "remove `aggregation:`, or write a `when:` condition over the window rows",
                    );
                    continue;
                }
                match resolve_detector(p, &format!("alerts[{i}].detect"), d, schema, around) {
                    Some(d) => Check::Detect(d),
                    None => continue,
                }
            }
            (Some(_), Some(_)) => {
                p.add(
                    &format!("alerts[{i}].detect"),
                    "a rule has either `when:` or `detect:`, not both",
                    "split it into two rules",
                );
                continue;
            }
            (None, None) => {
                p.add(
                    &format!("alerts[{i}]"),
                    "the rule says neither when it fires (`when:`) nor what it learns (`detect:`)",
                    "add `when: <SQL condition>` or `detect: {kind: zscore, value: <field>}`",
                );
                continue;
            }
        };
        alerts.push(AlertRule {
            index: i,
            name: r.name.clone(),
            check,
            aggregation,
        });
    }
    (alerts, rule_names)
}

/// Checks one `detect:`; `None` (with the problems added) when it cannot run.
/// What a rule's files are read against: the pipeline file's directory, and the partition
/// key's shape `identity:` gives (the default of a `known:` list's).
#[derive(Clone, Copy)]
pub(super) struct Around<'a> {
    pub dir: &'a Path,
    pub identity_key: Option<&'a str>,
}

fn resolve_detector(
    p: &mut Problems,
    at: &str,
    d: &DetectFile,
    schema: Option<&RecordSchema>,
    around: Around,
) -> Option<Detector> {
    let before = p.list.len();
    let field = |name: &str| format!("{at}.{name}");
    if let Some(s) = schema {
        if s.key.is_none() {
            p.add(
                &field("kind"),
                format!(
                    "the schema `{}` names no device key, so there is no series to learn",
                    s.name
                ),
                "add `key: <device id field>` to the schema",
            );
        }
        for (j, col) in d.by.iter().enumerate() {
            if !s.fields.iter().any(|f| &f.name == col) {
                p.add(
                    &format!("{at}.by[{j}]"),
                    format!("`{col}` is not a field of the schema `{}`", s.name),
                    format!(
                        "name one of: {}",
                        s.fields
                            .iter()
                            .map(|f| f.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        }
    }
    // Parameters of other kinds are refused, so a typo'd kind or a misplaced value is seen.
    let given: Vec<(&str, bool)> = vec![
        ("half_life", d.half_life.is_some()),
        ("threshold", d.threshold.is_some()),
        ("window", d.window.is_some()),
        ("k", d.k.is_some()),
        ("h", d.h.is_some()),
        ("for", d.for_.is_some()),
        ("readings", d.readings.is_some()),
        ("epsilon", d.epsilon.is_some()),
        ("after", d.after.is_some()),
        ("max_per_second", d.max_per_second.is_some()),
        ("known", d.known.is_some()),
    ];
    let own: &[&str] = match d.kind.as_str() {
        "zscore" => &["half_life", "threshold"],
        "mad" => &["window", "threshold"],
        "cusum" => &["k", "h", "half_life"],
        "stuck" => &["for", "readings", "epsilon"],
        "silent" => &["after", "known"],
        "rate" => &["max_per_second"],
        other => {
            p.add(
                &field("kind"),
                format!("`{other}` is not a detector"),
                format!("write one of: {KINDS}"),
            );
            return None;
        }
    };
    for (name, set) in given {
        if set && !own.contains(&name) {
            p.add(
                &field(name),
                format!("`{name}` is not a parameter of a `{}` detector", d.kind),
                format!(
                    "remove it; a `{}` detector takes: {}",
                    d.kind,
                    own.join(", ")
                ),
            );
        }
    }
    let positive = |p: &mut Problems, name: &str, v: Option<f64>, default: f64, fix: &str| {
        let v = v.unwrap_or(default);
        if !(v.is_finite() && v > 0.0) {
            p.add(
                &field(name),
                format!("`{v}` must be a number above zero"),
                fix,
            );
        }
        v
    };
    let kind = match d.kind.as_str() {
        "zscore" => DetectorKind::Zscore {
            half_life: positive(
                p,
                "half_life",
                d.half_life,
                50.0,
                "write the readings after which an old reading weighs half, e.g. 50",
            ),
            threshold: positive(
                p,
                "threshold",
                d.threshold,
                6.0,
                "write the score in standard deviations above which it alerts, e.g. 6",
            ),
        },
        "mad" => {
            let window = d.window.unwrap_or(60);
            if window < 5 {
                p.add(
                    &field("window"),
                    format!("a median of {window} readings is no baseline"),
                    "write 5 or more readings, e.g. 60",
                );
            }
            DetectorKind::Mad {
                window: window as usize,
                threshold: positive(
                    p,
                    "threshold",
                    d.threshold,
                    7.0,
                    "write the robust score (in scaled MADs) above which it alerts, e.g. 7",
                ),
            }
        }
        "cusum" => {
            let k = d.k.unwrap_or(1.0);
            if !(k.is_finite() && k >= 0.0) {
                p.add(
                    &field("k"),
                    format!("`{k}` must be zero or more"),
                    "write the slack in standard deviations, e.g. 1 (half the shift to find)",
                );
            }
            DetectorKind::Cusum {
                k,
                half_life: positive(
                    p,
                    "half_life",
                    d.half_life,
                    20.0,
                    "write the readings after which the baseline has followed half a change, \
                     e.g. 20 (longer finds slower drifts, and flags slow normal wander too)",
                ),
                h: positive(
                    p,
                    "h",
                    d.h,
                    10.0,
                    "write the decision limit in standard deviations, e.g. 10",
                ),
            }
        }
        "stuck" => {
            let duration = d.for_.as_ref().map(|t| p.duration(&field("for"), t));
            let readings = match (duration, d.readings) {
                (None, None) => Some(30),
                (_, r) => r,
            };
            if readings == Some(0) || readings == Some(1) {
                p.add(
                    &field("readings"),
                    "one reading cannot be stuck",
                    "write 2 or more, e.g. 30",
                );
            }
            if duration.is_some_and(|t| t.is_zero())
                && d.for_
                    .as_deref()
                    .and_then(|t| humantime::parse_duration(t.trim()).ok())
                    .is_some()
            {
                p.add(&field("for"), "must be longer than zero", "write e.g. 10m");
            }
            let epsilon = d.epsilon.unwrap_or(0.0);
            if !(epsilon.is_finite() && epsilon >= 0.0) {
                p.add(
                    &field("epsilon"),
                    format!("`{epsilon}` must be zero or more"),
                    "write the change that still counts as the same value, e.g. 0 or 0.01",
                );
            }
            DetectorKind::Stuck {
                duration: duration.map(|t| t.as_micros() as i64),
                readings,
                epsilon,
            }
        }
        "silent" => {
            let text = d.after.as_deref().unwrap_or("10m");
            let after = p.duration(&field("after"), text);
            if after.is_zero() && humantime::parse_duration(text.trim()).is_ok() {
                p.add(
                    &field("after"),
                    "must be longer than zero",
                    "write e.g. 10m",
                );
            }
            if d.value.is_some() {
                p.add(
                    &field("value"),
                    "a `silent` detector watches arrivals, not a value",
                    "remove `value:`",
                );
            }
            DetectorKind::Silent {
                after: after.as_micros() as i64,
            }
        }
        "rate" => match d.max_per_second {
            None => {
                p.add(
                    &field("max_per_second"),
                    "a `rate` detector needs its bound",
                    "write the largest change per second that is normal, e.g. `max_per_second: 50`",
                );
                DetectorKind::Rate {
                    max_per_second: 1.0,
                }
            }
            Some(v) => DetectorKind::Rate {
                max_per_second: positive(
                    p,
                    "max_per_second",
                    Some(v),
                    1.0,
                    "write the largest change per second that is normal, e.g. 50",
                ),
            },
        },
        _ => unreachable!("checked above"),
    };
    let silent = matches!(kind, DetectorKind::Silent { .. });
    if !silent && d.value.as_deref().is_none_or(|v| v.trim().is_empty()) {
        p.add(
            &field("value"),
            format!("a `{}` detector needs the value it watches", d.kind),
            "write a numeric field or SQL expression, e.g. `value: pressure_psi`",
        );
    }
    let warmup = d.warmup.unwrap_or(match kind {
        DetectorKind::Zscore { .. } | DetectorKind::Mad { .. } | DetectorKind::Cusum { .. } => 30,
        _ => 0,
    });
    if let DetectorKind::Mad { window, .. } = kind
        && warmup < 5.min(window as u64)
    {
        p.add(
            &field("warmup"),
            format!("a median of {warmup} readings is no baseline"),
            "write 5 or more, e.g. 30",
        );
    }
    let cooldown = d
        .cooldown
        .as_ref()
        .map(|t| p.duration(&field("cooldown"), t).as_micros() as i64)
        .unwrap_or(0);
    let known = match (&d.known, schema.and_then(|s| s.key.as_deref())) {
        (Some(k), Some(key)) if silent => {
            read_known(p, &field("known"), k, key, &d.by, around).map(Arc::new)
        }
        _ => None,
    };
    (p.list.len() == before).then(|| Detector {
        kind,
        value: d.value.clone(),
        filter: d.filter.clone(),
        by: d.by.clone(),
        warmup,
        cooldown,
        known,
    })
}

/// Reads a `silent` rule's `known:` file: each device's series key and the hash key of its
/// partition key.
fn read_known(
    p: &mut Problems,
    at: &str,
    k: &KnownFile,
    key: &str,
    by: &[String],
    around: Around,
) -> Option<KnownDevices> {
    let file = around.dir.join(&k.file);
    let at_file = format!("{at}.file");
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) => {
            p.add(
                &at_file,
                format!("cannot read `{}`: {e}", file.display()),
                "write the path of a CSV file of the devices (relative to the pipeline file): a header line, then a device a line",
            );
            return None;
        }
    };
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        p.add(
            &at_file,
            format!("`{}` is empty", file.display()),
            format!("write a header line (e.g. `{key}`), then a device a line"),
        );
        return None;
    };
    let columns: Vec<&str> = header.split(',').map(str::trim).collect();
    let column = |p: &mut Problems, name: &str, why: &str| {
        let found = columns.iter().position(|c| *c == name);
        if found.is_none() {
            p.add(
                &at_file,
                format!(
                    "`{}` has no column `{name}` ({why}); its header: {}",
                    file.display(),
                    columns.join(", ")
                ),
                format!("add a `{name}` column"),
            );
        }
        found
    };
    let series: Vec<Option<usize>> = std::iter::once(column(p, key, "the schema's key"))
        .chain(by.iter().map(|b| column(p, b, "a `by` column of the rule")))
        .collect();
    let at_key = format!("{at}.partition_key");
    let Some(shape) = k.partition_key.as_deref().or(around.identity_key) else {
        p.add(
            &at_key,
            "which shard watches a device that never reported depends on its partition key, and nothing says how it is made",
            "write how the devices' records are keyed on the stream from the file's columns, e.g. `partition_key: \"{tenant}/{device_id}\"` (the IoT rule's PartitionKey)",
        );
        return None;
    };
    // The shape: text as written, `{column}` for a column's value.
    enum Part<'a> {
        Text(&'a str),
        Column(usize),
    }
    let mut parts = Vec::new();
    let mut rest = shape;
    while !rest.is_empty() {
        match rest.find('{') {
            Some(0) => {
                let Some(end) = rest.find('}') else {
                    p.add(
                        &at_key,
                        format!("`{shape}`: `{{` without `}}`"),
                        "write columns as `{name}`, e.g. `{tenant}/{device_id}`",
                    );
                    return None;
                };
                parts.push(Part::Column(column(
                    p,
                    rest[1..end].trim(),
                    "the partition key names it",
                )?));
                rest = &rest[end + 1..];
            }
            Some(i) => {
                parts.push(Part::Text(&rest[..i]));
                rest = &rest[i..];
            }
            None => {
                parts.push(Part::Text(rest));
                rest = "";
            }
        }
    }
    let series: Vec<usize> = series.into_iter().collect::<Option<_>>()?;
    let mut devices = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (n, line) in lines {
        if line.contains('"') {
            p.add(
                &at_file,
                format!(
                    "`{}` line {}: quoted values are not read",
                    file.display(),
                    n + 1
                ),
                "write plain comma-separated values (device ids and tenants need no quotes)",
            );
            return None;
        }
        let values: Vec<&str> = line.split(',').map(str::trim).collect();
        if values.len() != columns.len() || values[series[0]].is_empty() {
            p.add(
                &at_file,
                format!(
                    "`{}` line {}: {} values under a header of {}{}",
                    file.display(),
                    n + 1,
                    values.len(),
                    columns.len(),
                    if values.len() == columns.len() {
                        ", and no device key"
                    } else {
                        ""
                    }
                ),
                "write one value per column on every line, the device key never empty",
            );
            return None;
        }
        let series_key = (series.iter().map(|&c| values[c]))
            .collect::<Vec<_>>()
            .join(&SERIES_SEP.to_string());
        let partition_key: String = (parts.iter())
            .map(|part| match part {
                Part::Text(text) => *text,
                Part::Column(c) => values[*c],
            })
            .collect();
        if seen.insert(series_key.clone()) {
            devices.push((series_key, hash_key(&partition_key)));
        }
    }
    Some(KnownDevices { file, devices })
}
