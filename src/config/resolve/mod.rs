//! The file as written ([`super::file`]) → the checked [`Pipeline`], one file per section.
//! Every check adds to the same [`Problems`] and carries on with a stand-in value, so one load
//! reports every problem; [`resolve_pipeline`] runs the sections in a fixed order, which is the
//! order the problems come out in.

mod alerts;
mod checkpoint;
mod commands;
mod console;
mod event_time;
mod identity;
mod lake;
mod limits;
mod notifiers;
mod outputs;
mod rollover;
mod schema;
mod source;

use std::path::Path;

use super::file::PipelineFile;
use super::{LineIndex, Pipeline, Problems, RecordSchema};

pub(super) use schema::resolve_schema;

/// Checks every section of `f`; `None` if the schema did not load (the problems say why).
pub(super) fn resolve_pipeline(
    path: &Path,
    f: PipelineFile,
    schema: Option<RecordSchema>,
    lines: LineIndex,
    p: &mut Problems,
) -> Option<Pipeline> {
    check_name(p, &f.name);
    let source = source::resolve_source(p, f.source);
    let lake = lake::resolve_lake(p, "lake", f.lake.clone());
    let checkpoints = checkpoint::resolve_checkpoints(p, f.checkpoints.clone(), &source);
    let event_time = event_time::resolve_event_time(p, &f.event_time, schema.as_ref());
    let limits = limits::resolve_limits(p, &f.limits);
    let rollover = rollover::check_rollover(
        p,
        "rollover",
        Some(&f.rollover.max_bytes),
        Some(&f.rollover.max_age),
        None,
    );
    outputs::check_table_names(p, &f.outputs);
    let aggregations = outputs::resolve_aggregations(p, &f.outputs);
    let (alerts, rule_names) = alerts::resolve_alerts(
        p,
        &f.alerts,
        &aggregations,
        schema.as_ref(),
        alerts::Around {
            dir: path.parent().unwrap_or(Path::new(".")),
            identity_key: f.identity.as_ref().map(|i| i.key.as_str()),
        },
    );
    if matches!(source, super::Source::Objects(_)) {
        for r in alerts
            .iter()
            .filter(|r| matches!(r.check, super::Check::Detect(_)))
        {
            p.add(
                &format!("alerts[{}].detect", r.index),
                "a detector learns each device on the shard its readings come from, and an objects source reads every object as a shard of its own: a device's series would start again, warm-up and all, with each object",
                "use `when:` rules over records or windows for files, and run detectors in the pipeline that reads the devices' stream",
            );
        }
    }
    let mut notifiers = notifiers::resolve_notifiers(p, &f.notifiers, &rule_names);
    let (commands, actions) = commands::resolve_actions(
        p,
        &f.alerts,
        f.commands.as_ref(),
        path.parent().unwrap_or(Path::new(".")),
    );
    notifiers.extend(actions);
    let outputs = outputs::resolve_outputs(p, &f.outputs, aggregations, &lake, &rollover);
    let console = console::resolve_console(p, f.console);
    let identity = f
        .identity
        .as_ref()
        .and_then(|i| identity::resolve_identity(p, i, schema.as_ref(), &source));
    if let Some(by) = &outputs.partition_by
        && !identity.as_ref().is_some_and(|i| i.proves(by))
    {
        p.add(
            "outputs.partition_by",
            format!("`{by}` would come from each record's own say-so: no `identity:` proves it"),
            format!(
                "add `identity: {{from: partition_key, key: \"{{{by}}}/{{device_id}}\"}}` \
                 (the IoT rule's key), so a device cannot write into another {by}'s partition"
            ),
        );
    }

    let compaction = f
        .compaction
        .as_ref()
        .map(|c| lake::resolve_compaction(p, c, &outputs));
    Some(Pipeline {
        file: path.to_path_buf(),
        name: f.name,
        schema: schema?,
        source,
        lake: lake.0,
        checkpoints,
        event_time,
        max_record_bytes: limits.max_record_bytes,
        window_buffer_records: limits.window_buffer_records,
        detector_series: limits.detector_series,
        max_future_skew: limits.max_future_skew,
        rollover,
        outputs,
        notifiers,
        commands,
        alerts,
        console,
        identity,
        compaction,
        lines,
    })
}

fn check_name(p: &mut Problems, name: &str) {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        p.add(
            "name",
            format!("`{name}` is not a valid pipeline name"),
            "use lowercase letters, digits, `-` and `_`",
        );
    }
}
