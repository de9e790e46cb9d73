//! The rows shardlake writes to its own tables: dead letters, alerts, and late records
//! tagged with the aggregation they were late for.

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef};

use super::sql;
use crate::decode::DeadLetter;

pub(super) fn with_aggregation(schema: &SchemaRef, name: &str, batch: &RecordBatch) -> RecordBatch {
    let agg: StringArray = std::iter::repeat_n(Some(name), batch.num_rows()).collect();
    let mut cols: Vec<ArrayRef> = vec![Arc::new(agg)];
    cols.extend(batch.columns().iter().cloned());
    RecordBatch::try_new(schema.clone(), cols).expect("late schema")
}

pub(super) fn dead_letter_batch(shard: &str, arrival_us: i64, dead: &[&DeadLetter]) -> RecordBatch {
    let n = dead.len();
    let arrival = TimestampMicrosecondArray::from(vec![arrival_us; n]).with_timezone("UTC");
    let shard: StringArray = std::iter::repeat_n(Some(shard), n).collect();
    let seq: StringArray = dead.iter().map(|d| Some(d.seq.0.as_str())).collect();
    let reasons: Vec<String> = dead.iter().map(|d| d.reason.to_string()).collect();
    let kind: StringArray = reasons.iter().map(|r| r.split(':').next()).collect();
    let reason: StringArray = reasons.iter().map(|r| Some(r.as_str())).collect();
    let raw: BinaryArray = dead.iter().map(|d| Some(d.raw.as_slice())).collect();
    RecordBatch::try_new(
        sql::dead_letter_schema(),
        vec![
            Arc::new(arrival),
            Arc::new(shard),
            Arc::new(seq),
            Arc::new(kind),
            Arc::new(reason),
            Arc::new(raw),
        ],
    )
    .expect("dead-letter schema")
}

pub(super) fn alert_batch(
    schema: &SchemaRef,
    rule: &str,
    kind: &str,
    hits: &RecordBatch,
    time_col: usize,
    key: Option<&str>,
) -> RecordBatch {
    let n = hits.num_rows();
    let rules: StringArray = std::iter::repeat_n(Some(rule), n).collect();
    let kinds: StringArray = std::iter::repeat_n(Some(kind), n).collect();
    let time = hits.column(time_col).clone();
    let keys: ArrayRef = match key.and_then(|k| hits.column_by_name(k)) {
        Some(col) => cast(col, &DataType::Utf8).expect("any column casts to text"),
        None => Arc::new(StringArray::new_null(n)),
    };
    let mut json = Vec::new();
    {
        let mut w = arrow::json::LineDelimitedWriter::new(&mut json);
        w.write(hits).expect("json");
        w.finish().expect("json");
    }
    let detail: StringArray = String::from_utf8_lossy(&json).lines().map(Some).collect();
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(rules),
            Arc::new(kinds),
            time,
            keys,
            Arc::new(detail),
        ],
    )
    .expect("alerts schema")
}

/// The alerts table's rows for what the detectors raised: `kind` is the detector's kind.
pub(super) fn detect_alert_batch(
    schema: &SchemaRef,
    detect: &super::detect::Detectors,
    raised: &[super::detect::Raised],
) -> RecordBatch {
    let rules: StringArray = raised
        .iter()
        .map(|r| Some(detect.rule_name(r.rule)))
        .collect();
    let kinds: StringArray = raised
        .iter()
        .map(|r| Some(detect.rule_kind(r.rule)))
        .collect();
    let time = TimestampMicrosecondArray::from_iter_values(raised.iter().map(|r| r.event_time))
        .with_timezone("UTC");
    let keys: StringArray = raised.iter().map(|r| Some(r.key.as_str())).collect();
    let detail: StringArray = raised.iter().map(|r| Some(r.detail.as_str())).collect();
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(rules),
            Arc::new(kinds),
            Arc::new(time),
            Arc::new(keys),
            Arc::new(detail),
        ],
    )
    .expect("alerts schema")
}
