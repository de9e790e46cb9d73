//! JSON records → Arrow, with arrow-json's `Decoder` straight into a `RecordBatch`. A record
//! that does not fit goes to the dead-letter output with its bytes, shard, sequence number and
//! a reason that says what is wrong; the good records of the same chunk still go through.
//!
//! The common case (every record good) is one decode of the whole chunk. When that fails, the
//! chunk is bisected so only the halves holding bad records are decoded again.

use std::fmt;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::compute::{CastOptions, cast_with_options, concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, Field as ArrowField, Schema, SchemaRef, TimeUnit};
use arrow::json::ReaderBuilder;

use crate::config::{FieldType, Pipeline, TimeFormat};
use crate::record::{Position, RawChunk, SeqNo};

pub const SHARD_COL: &str = "_shard_id";
pub const SEQ_COL: &str = "_sequence_number";

/// Why a record went to dead-letter. The first word of its text is a stable kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Bigger than `limits.max_record_bytes`.
    TooLarge { size: usize, limit: usize },
    /// Not UTF-8; `valid_up_to` is the offset of the first bad byte.
    InvalidUtf8 { valid_up_to: usize },
    /// Empty or only white space.
    Empty,
    /// Not JSON.
    InvalidJson(String),
    /// JSON, but not an object.
    NotAnObject(String),
    /// Several JSON values in one record.
    MultipleValues(usize),
    /// A field's value does not have the schema's type.
    WrongType(String),
    /// A required field is absent or null.
    MissingField(String),
    /// The event-time field cannot be read as the configured format.
    BadEventTime(String),
    /// Event time further ahead of the wall clock than `limits.max_future_skew`.
    FutureEventTime { event_time: String, limit: String },
    /// A timestamp field other than event time is not RFC 3339.
    BadTimestamp { field: String, value: String },
    /// A KPL aggregate (magic `F3 89 9A C2`) whose digest or protobuf body is wrong; the
    /// whole Kinesis record is kept as it came.
    CorruptAggregate(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::TooLarge { size, limit } => write!(
                f,
                "too_large: record is {size} bytes; the limit is {limit} (limits.max_record_bytes)"
            ),
            Reason::InvalidUtf8 { valid_up_to } => {
                write!(f, "invalid_utf8: byte {valid_up_to} is not valid UTF-8")
            }
            Reason::Empty => write!(f, "empty: the record holds no JSON value"),
            Reason::InvalidJson(m) => write!(f, "invalid_json: {m}"),
            Reason::NotAnObject(m) => {
                write!(f, "not_an_object: a record must be a JSON object ({m})")
            }
            Reason::MultipleValues(n) => write!(
                f,
                "multiple_values: the record holds {n} JSON values; expected one object"
            ),
            Reason::WrongType(m) => write!(f, "wrong_type: {m}"),
            Reason::MissingField(name) => write!(
                f,
                "missing_field: required field `{name}` is absent or null"
            ),
            Reason::BadEventTime(m) => write!(f, "bad_event_time: {m}"),
            Reason::FutureEventTime { event_time, limit } => write!(
                f,
                "future_event_time: event time {event_time} is more than {limit} ahead of the clock (limits.max_future_skew)"
            ),
            Reason::CorruptAggregate(m) => write!(
                f,
                "corrupt_aggregate: a KPL aggregated record that cannot be unpacked: {m}"
            ),
            Reason::BadTimestamp { field, value } => write!(
                f,
                "bad_timestamp: field `{field}` value {value:?} is not an RFC 3339 timestamp"
            ),
        }
    }
}

/// A record that did not fit.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub seq: SeqNo,
    pub reason: Reason,
    pub raw: Vec<u8>,
}

/// A chunk after decoding.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub shard: Arc<str>,
    pub resume_from: Position,
    /// Position after the chunk's last record (good or bad).
    pub end: Position,
    pub arrival_us: i64,
    /// The good records, in shard order, in the pipeline's record schema.
    pub batch: RecordBatch,
    pub dead: Vec<DeadLetter>,
}

impl Decoded {
    /// Sequence number of good row `i`.
    pub fn seq(&self, i: usize) -> &str {
        let col = self.batch.column_by_name(SEQ_COL).expect("seq column");
        col.as_any()
            .downcast_ref::<StringArray>()
            .expect("utf8")
            .value(i)
    }
}

/// Decodes chunks for one pipeline. Cheap to clone into each shard task.
#[derive(Debug, Clone)]
pub struct RecordDecoder {
    /// What arrow-json decodes into (timestamps as text or integers).
    json_schema: SchemaRef,
    /// The record schema the pipeline sees, with `_shard_id` and `_sequence_number`.
    schema: SchemaRef,
    event_field: usize,
    format: TimeFormat,
    required: Vec<usize>,
    timestamps: Vec<usize>,
    max_record_bytes: usize,
    max_future_skew: i64,
    /// Integer fields and their bounds, checked exactly before arrow-json (which would
    /// truncate `1.5` to 1).
    ints: Arc<Vec<(String, i64, i64)>>,
}

impl RecordDecoder {
    pub fn new(p: &Pipeline) -> Self {
        let fields = &p.schema.fields;
        let event_field = fields
            .iter()
            .position(|f| f.name == p.event_time.field)
            .expect("validated");
        let json_fields: Vec<ArrowField> = fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let ty = match f.ty {
                    FieldType::Timestamp
                        if i == event_field && p.event_time.format == TimeFormat::EpochMillis =>
                    {
                        DataType::Int64
                    }
                    FieldType::Timestamp => DataType::Utf8,
                    other => arrow_type(other),
                };
                ArrowField::new(&f.name, ty, true)
            })
            .collect();
        Self {
            json_schema: Arc::new(Schema::new(json_fields)),
            schema: record_schema(p),
            event_field,
            format: p.event_time.format,
            required: fields
                .iter()
                .enumerate()
                .filter(|(i, f)| f.required || *i == event_field)
                .map(|(i, _)| i)
                .collect(),
            timestamps: fields
                .iter()
                .enumerate()
                .filter(|(_, f)| f.ty == FieldType::Timestamp)
                .map(|(i, _)| i)
                .collect(),
            max_record_bytes: p.max_record_bytes,
            max_future_skew: p.max_future_skew,
            ints: Arc::new(
                fields
                    .iter()
                    .filter_map(|f| match f.ty {
                        FieldType::Int32 => {
                            Some((f.name.clone(), i32::MIN as i64, i32::MAX as i64))
                        }
                        FieldType::Int64 => Some((f.name.clone(), i64::MIN, i64::MAX)),
                        FieldType::Timestamp
                            if f.name == p.event_time.field
                                && p.event_time.format == TimeFormat::EpochMillis =>
                        {
                            Some((f.name.clone(), i64::MIN, i64::MAX))
                        }
                        _ => None,
                    })
                    .collect(),
            ),
        }
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Decodes a chunk. `now_us` is the wall clock, for the future-skew check.
    pub fn decode(&self, chunk: &RawChunk, now_us: i64) -> Decoded {
        let mut dead = Vec::new();
        let mut candidates = Vec::with_capacity(chunk.len());
        for i in 0..chunk.len() {
            let rec = chunk.record(i);
            let rejected = chunk
                .rejected
                .iter()
                .find(|(r, _)| *r == i)
                .map(|(_, why)| Reason::CorruptAggregate(why.clone()));
            let reason = if rejected.is_some() {
                rejected
            } else if rec.len() > self.max_record_bytes {
                Some(Reason::TooLarge {
                    size: rec.len(),
                    limit: self.max_record_bytes,
                })
            } else {
                match std::str::from_utf8(rec) {
                    Err(e) => Some(Reason::InvalidUtf8 {
                        valid_up_to: e.valid_up_to(),
                    }),
                    Ok(text) if text.trim_ascii().is_empty() => Some(Reason::Empty),
                    // Checked as text: serde_json does not validate UTF-8 a second time.
                    Ok(text) => strict::check(text, &self.ints).err(),
                }
            };
            match reason {
                Some(reason) => dead.push(DeadLetter {
                    seq: chunk.seqs[i].clone(),
                    reason,
                    raw: rec.to_vec(),
                }),
                None => candidates.push(i),
            }
        }
        let mut good_rows = Vec::with_capacity(candidates.len());
        let mut batches = Vec::new();
        self.decode_range(chunk, &candidates, &mut batches, &mut good_rows, &mut dead);
        let json_batch = if batches.is_empty() {
            RecordBatch::new_empty(self.json_schema.clone())
        } else {
            concat_batches(&self.json_schema, &batches).expect("same schema")
        };
        let batch = self.finish(chunk, json_batch, &good_rows, now_us, &mut dead);
        dead.sort_by(|a, b| a.seq.cmp(&b.seq));
        Decoded {
            shard: chunk.shard.clone(),
            resume_from: chunk.resume_from.clone(),
            end: chunk.end(),
            arrival_us: chunk.arrival_us,
            batch,
            dead,
        }
    }

    /// Decodes `rows` of the chunk; on failure bisects until each bad record is alone.
    fn decode_range(
        &self,
        chunk: &RawChunk,
        rows: &[usize],
        out: &mut Vec<RecordBatch>,
        good: &mut Vec<usize>,
        dead: &mut Vec<DeadLetter>,
    ) {
        if rows.is_empty() {
            return;
        }
        match self.try_decode(chunk, rows) {
            Ok(batch) if batch.num_rows() == rows.len() => {
                out.push(batch);
                good.extend_from_slice(rows);
            }
            result if rows.len() == 1 => {
                let reason = match result {
                    Ok(batch) if batch.num_rows() == 0 => Reason::Empty,
                    Ok(batch) => Reason::MultipleValues(batch.num_rows()),
                    Err(reason) => reason,
                };
                let i = rows[0];
                dead.push(DeadLetter {
                    seq: chunk.seqs[i].clone(),
                    reason,
                    raw: chunk.record(i).to_vec(),
                });
            }
            _ => {
                let (a, b) = rows.split_at(rows.len() / 2);
                self.decode_range(chunk, a, out, good, dead);
                self.decode_range(chunk, b, out, good, dead);
            }
        }
    }

    fn try_decode(&self, chunk: &RawChunk, rows: &[usize]) -> Result<RecordBatch, Reason> {
        let mut buf = Vec::with_capacity(rows.iter().map(|&i| chunk.spans[i].len() + 1).sum());
        for &i in rows {
            buf.extend_from_slice(chunk.record(i));
            buf.push(b'\n');
        }
        // One row more than expected lets a record holding two values show up as a mismatch.
        let mut decoder = ReaderBuilder::new(self.json_schema.clone())
            .with_batch_size(rows.len() + 1)
            .build_decoder()
            .map_err(|e| Reason::InvalidJson(clean(e)))?;
        let consumed = decoder
            .decode(&buf)
            .map_err(|e| Reason::InvalidJson(clean(e)))?;
        if consumed < buf.len() {
            // The batch filled up before the input ended: more values than records.
            let batch = decoder.flush().ok().flatten();
            return Ok(batch.unwrap_or_else(|| RecordBatch::new_empty(self.json_schema.clone())));
        }
        match decoder.flush() {
            Ok(Some(batch)) => Ok(batch),
            Ok(None) => Ok(RecordBatch::new_empty(self.json_schema.clone())),
            Err(e) if decoder.has_partial_record() => Err(Reason::InvalidJson(clean(e))),
            Err(e) => {
                let msg = clean(e);
                if msg.starts_with("expected { got") {
                    Err(Reason::NotAnObject(msg))
                } else {
                    Err(Reason::WrongType(msg))
                }
            }
        }
    }

    /// Checks required fields and timestamps, and builds the pipeline's record batch.
    fn finish(
        &self,
        chunk: &RawChunk,
        json: RecordBatch,
        rows: &[usize],
        now_us: i64,
        dead: &mut Vec<DeadLetter>,
    ) -> RecordBatch {
        let n = json.num_rows();
        let mut ok = vec![true; n];
        let mut reasons: Vec<Option<Reason>> = vec![None; n];
        let mut columns: Vec<ArrayRef> = json.columns().to_vec();
        for &c in &self.timestamps {
            let raw = json.column(c);
            let converted: ArrayRef =
                if c == self.event_field && self.format == TimeFormat::EpochMillis {
                    let ms = raw.as_any().downcast_ref::<Int64Array>().expect("int64");
                    Arc::new(
                        ms.iter()
                            .map(|v| v.and_then(|v| v.checked_mul(1000)))
                            .collect::<TimestampMicrosecondArray>()
                            .with_timezone("UTC"),
                    )
                } else {
                    let opts = CastOptions {
                        safe: true,
                        ..Default::default()
                    };
                    cast_with_options(
                        raw,
                        &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                        &opts,
                    )
                    .expect("utf8 casts to timestamp")
                };
            for r in 0..n {
                if raw.is_valid(r) && converted.is_null(r) && reasons[r].is_none() {
                    let text = raw
                        .as_any()
                        .downcast_ref::<StringArray>()
                        .map(|s| s.value(r).to_string())
                        .unwrap_or_default();
                    let name = self.json_schema.field(c).name().clone();
                    reasons[r] = Some(if c == self.event_field {
                        Reason::BadEventTime(format!(
                            "field `{name}` value {text:?} is not an RFC 3339 timestamp"
                        ))
                    } else {
                        Reason::BadTimestamp {
                            field: name,
                            value: text,
                        }
                    });
                }
            }
            columns[c] = converted;
        }
        for &c in &self.required {
            let col = &columns[c];
            if col.null_count() == 0 {
                continue;
            }
            for r in 0..n {
                if col.is_null(r) && reasons[r].is_none() {
                    reasons[r] = Some(Reason::MissingField(
                        self.json_schema.field(c).name().clone(),
                    ));
                }
            }
        }
        let limit = now_us.saturating_add(self.max_future_skew);
        let ts = columns[self.event_field]
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .expect("ts");
        for r in 0..n {
            if reasons[r].is_none() && ts.is_valid(r) && ts.value(r) > limit {
                reasons[r] = Some(Reason::FutureEventTime {
                    event_time: fmt_us(ts.value(r)),
                    limit: humantime::format_duration(std::time::Duration::from_micros(
                        self.max_future_skew as u64,
                    ))
                    .to_string(),
                });
            }
        }
        for (r, reason) in reasons.into_iter().enumerate() {
            if let Some(reason) = reason {
                ok[r] = false;
                let i = rows[r];
                dead.push(DeadLetter {
                    seq: chunk.seqs[i].clone(),
                    reason,
                    raw: chunk.record(i).to_vec(),
                });
            }
        }
        let shard: StringArray = std::iter::repeat_n(Some(&*chunk.shard), n).collect();
        let seqs: StringArray = rows
            .iter()
            .map(|&i| Some(chunk.seqs[i].0.as_str()))
            .collect();
        columns.push(Arc::new(shard));
        columns.push(Arc::new(seqs));
        let all = RecordBatch::try_new(self.schema.clone(), columns)
            .expect("decoded columns match the record schema");
        if ok.iter().all(|&b| b) {
            all
        } else {
            filter_record_batch(&all, &BooleanArray::from(ok)).expect("filter")
        }
    }
}

/// A strict JSON pass before arrow-json: syntax (arrow-json accepts trailing commas), one
/// value per record, an object at the top, and integers that are integers in range. It
/// allocates nothing per value.
mod strict {
    use std::borrow::Cow;
    use std::fmt;

    use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};

    use super::Reason;

    const NOT_OBJECT: &str = "\u{0}not an object";

    pub fn check(rec: &str, ints: &[(String, i64, i64)]) -> Result<(), Reason> {
        let mut de = serde_json::Deserializer::from_str(rec);
        let result = Object(ints).deserialize(&mut de).and_then(|_| de.end());
        result.map_err(|e| {
            let msg = e.to_string();
            if let Some(rest) = msg.strip_prefix(NOT_OBJECT) {
                Reason::NotAnObject(rest.trim().to_string())
            } else if e.is_data() {
                Reason::WrongType(msg)
            } else if msg.starts_with("trailing characters") {
                let values = serde_json::Deserializer::from_str(rec).into_iter::<IgnoredAny>();
                let counted: Result<Vec<_>, _> = values.collect();
                match counted {
                    Ok(v) if v.len() > 1 => Reason::MultipleValues(v.len()),
                    _ => Reason::InvalidJson(msg),
                }
            } else {
                Reason::InvalidJson(msg)
            }
        })
    }

    struct Object<'a>(&'a [(String, i64, i64)]);

    impl<'de> DeserializeSeed<'de> for Object<'_> {
        type Value = ();
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Object<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                match self.0.iter().find(|(name, ..)| *name == key) {
                    Some((name, lo, hi)) => map.next_value_seed(Int {
                        name,
                        lo: *lo,
                        hi: *hi,
                    })?,
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(())
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
            Err(de::Error::custom(format!("{NOT_OBJECT} got an array")))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
            Err(E::custom(format!("{NOT_OBJECT} got a string")))
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
            Err(E::custom(format!("{NOT_OBJECT} got a boolean")))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
            Err(E::custom(format!("{NOT_OBJECT} got a number")))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
            Err(E::custom(format!("{NOT_OBJECT} got a number")))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
            Err(E::custom(format!("{NOT_OBJECT} got a number")))
        }
        fn visit_unit<E: de::Error>(self) -> Result<(), E> {
            Err(E::custom(format!("{NOT_OBJECT} got null")))
        }
    }

    struct Int<'a> {
        name: &'a str,
        lo: i64,
        hi: i64,
    }

    impl<'de> DeserializeSeed<'de> for Int<'_> {
        type Value = ();
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Int<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "an integer for field `{}`", self.name)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
            if v < self.lo || v > self.hi {
                return Err(E::custom(format!(
                    "field `{}`: {v} is out of range",
                    self.name
                )));
            }
            Ok(())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
            match i64::try_from(v) {
                Ok(v) => self.visit_i64(v),
                Err(_) => Err(E::custom(format!(
                    "field `{}`: {v} is out of range",
                    self.name
                ))),
            }
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
            let what = if v.fract() == 0.0 {
                "is out of range"
            } else {
                "is not an integer"
            };
            Err(E::custom(format!("field `{}`: {v} {what}", self.name)))
        }
        fn visit_unit<E: de::Error>(self) -> Result<(), E> {
            Ok(())
        }
        // Text and other values are left to arrow-json, which parses numeric strings.
        fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(())
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(())
        }
    }
}

/// The Arrow type of a schema field type.
pub fn arrow_type(t: FieldType) -> DataType {
    match t {
        FieldType::String => DataType::Utf8,
        FieldType::Int32 => DataType::Int32,
        FieldType::Int64 => DataType::Int64,
        FieldType::Float32 => DataType::Float32,
        FieldType::Float64 => DataType::Float64,
        FieldType::Bool => DataType::Boolean,
        FieldType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
    }
}

/// The decoded record schema: the schema's fields, then `_shard_id` and `_sequence_number`.
pub fn record_schema(p: &Pipeline) -> SchemaRef {
    let mut fields: Vec<ArrowField> = p
        .schema
        .fields
        .iter()
        .map(|f| ArrowField::new(&f.name, arrow_type(f.ty), true))
        .collect();
    fields.push(ArrowField::new(SHARD_COL, DataType::Utf8, false));
    fields.push(ArrowField::new(SEQ_COL, DataType::Utf8, false));
    Arc::new(Schema::new(fields))
}

pub fn fmt_us(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_else(|| us.to_string())
}

fn clean(e: arrow::error::ArrowError) -> String {
    e.to_string()
        .trim_start_matches("Json error: ")
        .trim_start_matches("Parser error: ")
        .to_string()
}
