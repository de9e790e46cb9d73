//! The Delta `stats` of a data file, from its Parquet footer: the row count and, per top-level
//! column, the minimum, maximum and null count over every row group.
//!
//! Readers skip a file whose range cannot match a query's filter (delta-rs's DataFusion
//! provider, Spark, Athena): with them a one-device or one-time-range query over a compacted
//! table (its files sorted or Z-ordered by device and time) reads a few files instead of every
//! file of the partition. A value is only written where it is a true bound:
//! - timestamps are written to the millisecond, as the protocol's readers expect, the minimum
//!   rounded down and the maximum rounded up, so the range still holds every row;
//! - strings longer than 32 characters, a column without statistics in one of its row groups,
//!   NaN and infinities, booleans, decimals and nested columns get no range (a reader then
//!   reads the file), as if stats were turned off for that column.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate};
use parquet::basic::{LogicalType, TimeUnit};
use parquet::file::metadata::ParquetMetaData;
use parquet::file::statistics::Statistics;
use serde_json::{Map, Number, Value};

/// Characters kept in a string bound (the protocol's default prefix length).
const MAX_STRING: usize = 32;

/// A column's running range: `None` once a row group had values but no statistics.
#[derive(Default)]
struct Range {
    min: Option<Value>,
    max: Option<Value>,
    /// False once a row group's range was unknown: no bounds are written then.
    bounded: bool,
    nulls: Option<u64>,
    /// False once a row group's null count was unknown.
    counted: bool,
}

/// The `stats` of a file in an object store, from its footer (a suffix read, and a second
/// one if the footer is longer than the first).
pub async fn from_object(
    store: &dyn object_store::ObjectStore,
    path: &object_store::path::Path,
    size: u64,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    use object_store::{GetOptions, GetRange};
    use parquet::errors::ParquetError;
    use parquet::file::metadata::ParquetMetaDataReader;
    let suffix = |n: u64| GetOptions {
        range: Some(GetRange::Suffix(n.min(size))),
        ..Default::default()
    };
    let bytes = store
        .get_opts(path, suffix(64 << 10))
        .await?
        .bytes()
        .await?;
    let mut reader = ParquetMetaDataReader::new();
    match reader.try_parse_sized(&bytes, size) {
        Ok(()) => {}
        Err(ParquetError::NeedMoreData(needed)) => {
            let bytes = store
                .get_opts(path, suffix(needed as u64))
                .await?
                .bytes()
                .await?;
            reader.try_parse_sized(&bytes, size)?;
        }
        Err(e) => return Err(e.into()),
    }
    Ok(from_footer(&reader.finish()?))
}

/// The `stats` JSON of a Parquet file, as an `add` action carries it.
pub fn from_footer(meta: &ParquetMetaData) -> String {
    let rows = meta.file_metadata().num_rows();
    let mut ranges: BTreeMap<usize, Range> = BTreeMap::new();
    for rg in meta.row_groups() {
        for (i, col) in rg.columns().iter().enumerate() {
            let descr = col.column_descr();
            if descr.path().parts().len() != 1 {
                continue; // nested: no range
            }
            let r = ranges.entry(i).or_insert_with(|| Range {
                bounded: true,
                counted: true,
                ..Default::default()
            });
            let stats = col.statistics();
            match stats.and_then(|s| s.null_count_opt()) {
                Some(n) if r.counted => r.nulls = Some(r.nulls.unwrap_or(0) + n),
                _ => r.counted = false,
            }
            let nulls = stats.and_then(|s| s.null_count_opt());
            let all_null = nulls.is_some_and(|n| n as i64 == rg.num_rows());
            if all_null {
                continue; // no values, nothing to bound
            }
            match stats.and_then(|s| bounds(s, descr.logical_type_ref())) {
                Some((lo, hi)) if r.bounded => {
                    r.min = Some(match r.min.take() {
                        Some(m) if less(&m, &lo) => m,
                        _ => lo,
                    });
                    r.max = Some(match r.max.take() {
                        Some(m) if less(&hi, &m) => m,
                        _ => hi,
                    });
                }
                _ => r.bounded = false,
            }
        }
    }
    let schema = meta.file_metadata().schema_descr();
    let (mut mins, mut maxs, mut nulls) = (Map::new(), Map::new(), Map::new());
    for (i, r) in ranges {
        let name = schema.column(i).name().to_string();
        if r.bounded
            && let (Some(lo), Some(hi)) = (r.min, r.max)
        {
            mins.insert(name.clone(), lo);
            maxs.insert(name.clone(), hi);
        }
        if r.counted
            && let Some(n) = r.nulls
        {
            nulls.insert(name, Value::from(n));
        }
    }
    let mut out = Map::new();
    out.insert("numRecords".into(), Value::from(rows));
    out.insert("minValues".into(), Value::Object(mins));
    out.insert("maxValues".into(), Value::Object(maxs));
    out.insert("nullCount".into(), Value::Object(nulls));
    Value::Object(out).to_string()
}

/// `a < b` for two bounds of one column (both numbers or both strings).
fn less(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x < y,
            _ => x.as_f64().unwrap_or(f64::NAN) < y.as_f64().unwrap_or(f64::NAN),
        },
        // Timestamps and dates in one fixed format, and strings, order as their bytes do.
        (Value::String(x), Value::String(y)) => x < y,
        _ => false,
    }
}

/// One row group's (min, max) of a column as Delta writes them, if they are true bounds.
fn bounds(s: &Statistics, logical: Option<&LogicalType>) -> Option<(Value, Value)> {
    match s {
        Statistics::Int32(v) => {
            let (lo, hi) = (*v.min_opt()?, *v.max_opt()?);
            match logical {
                Some(LogicalType::Date) => Some((date(lo)?, date(hi)?)),
                None | Some(LogicalType::Integer { .. }) => Some((lo.into(), hi.into())),
                _ => None,
            }
        }
        Statistics::Int64(v) => {
            let (lo, hi) = (*v.min_opt()?, *v.max_opt()?);
            match logical {
                Some(LogicalType::Timestamp(t)) => {
                    let is_adjusted_to_u_t_c = &t.is_adjusted_to_u_t_c;
                    let per_ms = match t.unit {
                        TimeUnit::MILLIS => 1,
                        TimeUnit::MICROS => 1_000,
                        TimeUnit::NANOS => 1_000_000,
                    };
                    Some((
                        timestamp(lo.div_euclid(per_ms), *is_adjusted_to_u_t_c)?,
                        timestamp(ceil_div(hi, per_ms), *is_adjusted_to_u_t_c)?,
                    ))
                }
                None | Some(LogicalType::Integer { .. }) => Some((lo.into(), hi.into())),
                _ => None,
            }
        }
        Statistics::Float(v) => float(f64::from(*v.min_opt()?), f64::from(*v.max_opt()?)),
        Statistics::Double(v) => float(*v.min_opt()?, *v.max_opt()?),
        Statistics::ByteArray(v) if matches!(logical, Some(LogicalType::String)) => {
            if !v.min_is_exact() || !v.max_is_exact() {
                return None;
            }
            let text = |b: &parquet::data_type::ByteArray| -> Option<Value> {
                let s = std::str::from_utf8(b.data()).ok()?;
                (s.chars().count() <= MAX_STRING).then(|| Value::String(s.to_string()))
            };
            Some((text(v.min_opt()?)?, text(v.max_opt()?)?))
        }
        _ => None,
    }
}

fn ceil_div(v: i64, d: i64) -> i64 {
    v.div_euclid(d) + i64::from(v.rem_euclid(d) != 0)
}

fn float(lo: f64, hi: f64) -> Option<(Value, Value)> {
    Some((
        Value::Number(Number::from_f64(lo).filter(|_| lo.is_finite())?),
        Value::Number(Number::from_f64(hi).filter(|_| hi.is_finite())?),
    ))
}

fn date(days: i32) -> Option<Value> {
    let d = NaiveDate::from_num_days_from_ce_opt(days.checked_add(719_163)?)?;
    Some(Value::String(d.format("%Y-%m-%d").to_string()))
}

fn timestamp(ms: i64, utc: bool) -> Option<Value> {
    let t = DateTime::from_timestamp_millis(ms)?;
    let fmt = if utc {
        "%Y-%m-%dT%H:%M:%S%.3fZ"
    } else {
        "%Y-%m-%dT%H:%M:%S%.3f"
    };
    Some(Value::String(t.format(fmt).to_string()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::TimestampMicrosecondArray;
    use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;

    use super::*;

    fn footer(batches: &[RecordBatch], row_group: usize) -> ParquetMetaData {
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(row_group))
            .build();
        let mut w = ArrowWriter::try_new(Vec::new(), batches[0].schema(), Some(props)).unwrap();
        for b in batches {
            w.write(b).unwrap();
        }
        w.close().unwrap()
    }

    #[test]
    fn bounds_cover_every_row_group_and_round_timestamps_outwards() {
        let ts = TimestampMicrosecondArray::from(vec![
            Some(1_700_000_003_000_500),
            None,
            Some(1_700_000_003_000_000),
            Some(1_699_999_999_999_999),
        ])
        .with_timezone("UTC");
        let batch = RecordBatch::try_from_iter([
            ("ts", Arc::new(ts) as ArrayRef),
            (
                "device_id",
                Arc::new(StringArray::from(vec![
                    Some("b"),
                    Some("a"),
                    None,
                    Some("c"),
                ])) as _,
            ),
            (
                "v",
                Arc::new(Float64Array::from(vec![2.5, -1.0, 7.0, f64::NAN])) as _,
            ),
            (
                "n",
                Arc::new(Int64Array::from(vec![None, None, None, None])) as _,
            ),
            (
                "long",
                Arc::new(StringArray::from(vec!["x".repeat(40); 4])) as _,
            ),
        ])
        .unwrap();
        // Two rows per row group: the file's range merges them.
        let stats: Value = serde_json::from_str(&from_footer(&footer(&[batch], 2))).unwrap();
        assert_eq!(stats["numRecords"], 4);
        assert_eq!(stats["minValues"]["ts"], "2023-11-14T22:13:19.999Z");
        assert_eq!(stats["maxValues"]["ts"], "2023-11-14T22:13:23.001Z");
        assert_eq!(stats["minValues"]["device_id"], "a");
        assert_eq!(stats["maxValues"]["device_id"], "c");
        assert_eq!(stats["minValues"]["v"], -1.0);
        assert_eq!(stats["maxValues"]["v"], 7.0);
        assert_eq!(stats["nullCount"]["ts"], 1);
        assert_eq!(stats["nullCount"]["device_id"], 1);
        assert_eq!(stats["nullCount"]["n"], 4);
        // All null: counted, no range; a long string: no range.
        assert!(stats["minValues"].get("n").is_none());
        assert!(stats["minValues"].get("long").is_none());
    }

    #[test]
    fn a_timestamp_on_a_millisecond_stays_as_it_is() {
        assert_eq!(ceil_div(3_000, 1_000), 3);
        assert_eq!(ceil_div(3_001, 1_000), 4);
        assert_eq!(ceil_div(-1, 1_000), 0);
        assert_eq!(date(0), Some(Value::String("1970-01-01".into())));
    }
}
