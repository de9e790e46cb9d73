//! `outputs:`: the tables' names, the aggregations' windows, and each table's rollover and
//! sink (its own, else the pipeline's).

use std::collections::{BTreeMap, HashMap};

use super::lake::resolve_lake;
use super::rollover::check_rollover;
use crate::config::file::{LakeFile, OutputsFile, RolloverOverride, TableFile};
use crate::config::{Aggregation, LakeLocation, Outputs, Problems, Rollover, TableFormat};

/// One table of `outputs:` as written, whichever kind: where it is in the file (e.g.
/// `outputs.aggregations[0]`), its name, and its own rollover and sink.
struct Table<'a> {
    at: String,
    name: &'a String,
    rollover: Option<&'a RolloverOverride>,
    sink: Option<&'a LakeFile>,
}

impl<'a> Table<'a> {
    fn plain(at: &str, t: &'a TableFile) -> Self {
        Self {
            at: at.to_string(),
            name: &t.name,
            rollover: t.rollover.as_ref(),
            sink: t.sink.as_ref(),
        }
    }
}

/// Every table, in a fixed order: raw (unless `raw: false`), dead_letter, late, alerts, then
/// the aggregations.
fn tables(o: &OutputsFile) -> Vec<Table<'_>> {
    let mut v: Vec<Table> = o
        .raw
        .iter()
        .map(|r| Table::plain("outputs.raw", r))
        .collect();
    v.extend([
        Table::plain("outputs.dead_letter", &o.dead_letter),
        Table::plain("outputs.late", &o.late),
        Table::plain("outputs.alerts", &o.alerts),
    ]);
    v.extend(o.aggregations.iter().enumerate().map(|(i, a)| Table {
        at: format!("outputs.aggregations[{i}]"),
        name: &a.name,
        rollover: a.rollover.as_ref(),
        sink: a.sink.as_ref(),
    }));
    v
}

/// Every table name is an identifier, and no two tables share one.
pub(super) fn check_table_names(p: &mut Problems, o: &OutputsFile) {
    let mut names = HashMap::new();
    for t in tables(o) {
        let (field, name) = (format!("{}.name", t.at), t.name);
        p.ident(&field, name);
        if let Some(first) = names.insert(name.clone(), field.clone()) {
            p.add(
                &field,
                format!("table name `{name}` is already used by {first}"),
                "give every output its own name",
            );
        }
    }
}

/// The aggregations' windows; their SQL is checked by the engine.
pub(super) fn resolve_aggregations(p: &mut Problems, o: &OutputsFile) -> Vec<Aggregation> {
    let mut aggregations = Vec::new();
    for (i, a) in o.aggregations.iter().enumerate() {
        let at = format!("outputs.aggregations[{i}].window");
        let size = p.duration(&format!("{at}.size"), &a.window.size);
        let slide = match &a.window.slide {
            Some(s) => p.duration(&format!("{at}.slide"), s),
            None => size,
        };
        if size.is_zero() {
            p.add(
                &format!("{at}.size"),
                "a window must be longer than zero",
                "write e.g. 1m",
            );
        } else if slide.is_zero()
            || slide > size
            || !size.as_micros().is_multiple_of(slide.as_micros())
        {
            p.add(
                &format!("{at}.slide"),
                format!("slide {:?} does not divide size {:?}", slide, size),
                "use a slide that divides the size, e.g. size 5m with slide 1m",
            );
        } else if (size.as_micros() / slide.as_micros()) > 60 {
            p.add(
                &format!("{at}.slide"),
                "more than 60 windows overlap each record",
                "use a longer slide",
            );
        }
        aggregations.push(Aggregation {
            name: a.name.clone(),
            size: size.as_micros() as i64,
            slide: slide.as_micros() as i64,
            sql: a.sql.clone(),
        });
    }
    aggregations
}

/// The tables, with every table's rollover over `rollover` and its sink (else `lake`).
pub(super) fn resolve_outputs(
    p: &mut Problems,
    o: &OutputsFile,
    aggregations: Vec<Aggregation>,
    lake: &(LakeLocation, TableFormat),
    rollover: &Rollover,
) -> Outputs {
    let mut per_table = BTreeMap::new();
    let mut sinks = BTreeMap::new();
    let mut formats = BTreeMap::new();
    for t in tables(o) {
        let (sink, format) = match t.sink {
            // A sink without `format` keeps the lake's.
            Some(s) => {
                let (sink, format) = resolve_lake(p, &format!("{}.sink", t.at), s.clone());
                (sink, if s.format.is_some() { format } else { lake.1 })
            }
            None => lake.clone(),
        };
        sinks.insert(t.name.clone(), sink);
        formats.insert(t.name.clone(), format);
        let (bytes, age) = (
            t.rollover.and_then(|r| r.max_bytes.as_ref()),
            t.rollover.and_then(|r| r.max_age.as_ref()),
        );
        per_table.insert(
            t.name.clone(),
            check_rollover(p, &format!("{}.rollover", t.at), bytes, age, Some(rollover)),
        );
    }
    Outputs {
        raw: o.raw.as_ref().map(|r| r.name.clone()),
        dead_letter: o.dead_letter.name.clone(),
        late: o.late.name.clone(),
        alerts: o.alerts.name.clone(),
        aggregations,
        rollover: per_table,
        sinks,
        formats,
        partition_by: resolve_partition_by(p, &o.partition_by),
    }
}

/// `outputs.partition_by`: `[]` or `[tenant]`.
fn resolve_partition_by(p: &mut Problems, by: &[String]) -> Option<String> {
    match by {
        [] => None,
        [c] if c == crate::columns::TENANT => Some(c.clone()),
        _ => {
            p.add(
                "outputs.partition_by",
                format!("{by:?}: only the tenant partitions tables"),
                "write `partition_by: [tenant]`, or leave it out",
            );
            None
        }
    }
}
