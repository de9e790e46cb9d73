//! `event_time:`: the schema field event time is read from, and the lateness and idle-shard
//! durations that move the watermark.

use crate::config::file::EventTimeFile;
use crate::config::{EventTime, FieldType, Problems, RecordSchema};

/// The field is checked against `schema` when the schema loaded.
pub(super) fn resolve_event_time(
    p: &mut Problems,
    et: &EventTimeFile,
    schema: Option<&RecordSchema>,
) -> EventTime {
    let allowed_lateness = p.duration("event_time.allowed_lateness", &et.allowed_lateness);
    let idle_shard_timeout = p.duration("event_time.idle_shard_timeout", &et.idle_shard_timeout);
    if let Some(s) = schema {
        match s.fields.iter().find(|x| x.name == et.field) {
            None => p.add(
                "event_time.field",
                format!(
                    "`{}` is not a field of schema {}",
                    et.field,
                    s.file.display()
                ),
                format!(
                    "name one of: {}",
                    s.fields
                        .iter()
                        .map(|x| x.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Some(x) if x.ty != FieldType::Timestamp => p.add(
                "event_time.field",
                format!(
                    "`{}` has type {:?} in the schema; event time needs `timestamp`",
                    et.field, x.ty
                ),
                format!(
                    "set `type: timestamp` for `{}` in {}",
                    et.field,
                    s.file.display()
                ),
            ),
            _ => {}
        }
    }
    EventTime {
        field: et.field.clone(),
        format: et.format,
        allowed_lateness: allowed_lateness.as_micros() as i64,
        idle_shard_timeout,
    }
}
