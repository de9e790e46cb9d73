//! JSON records → Arrow in one strict pass per record, straight into column builders. A record
//! that does not fit goes to the dead-letter output with its bytes, shard, sequence number and
//! a reason that says what is wrong; the good records of the same chunk still go through.
//!
//! Two readers: the flat reader (`flat.rs`) takes the common record (a flat object without
//! escapes) fast; whatever it declines, the strict serde_json reader reads from the start, and
//! only it words errors. A test holds them to the same result.
//!
//! This replaced arrow-json's decoder behind a serde_json strictness pass: arrow-json accepts
//! trailing commas and truncates `1.5` into an int64, so it needed that second pass, and a bad
//! record made it fail the whole chunk. benches/README.md has the measured difference.

use std::fmt;
use std::sync::Arc;

use std::borrow::Cow;

use arrow::array::{
    Array, ArrayRef, BooleanBuilder, Float32Builder, Float64Builder, Int32Builder, Int64Builder,
    RecordBatch, StringArray, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field as ArrowField, Schema, SchemaRef, TimeUnit};
use serde::de::DeserializeSeed;

use crate::config::{FieldType, Pipeline, TimeFormat};
use crate::record::{Position, RawChunk, SeqNo};

mod flat;

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

/// How a schema field's JSON value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    I32,
    I64,
    F32,
    F64,
    Bool,
    /// RFC 3339 text (and the variants arrow's cast accepts), to microseconds.
    Rfc3339,
    /// The event time as milliseconds since the epoch (`event_time.format: epoch_millis`).
    EpochMillis,
}

impl Kind {
    fn expected(self) -> &'static str {
        match self {
            Kind::Str => "a string",
            Kind::I32 | Kind::I64 => "an integer",
            Kind::F32 | Kind::F64 => "a number",
            Kind::Bool => "true or false",
            Kind::Rfc3339 => "an RFC 3339 timestamp string",
            Kind::EpochMillis => "an integer of milliseconds since the epoch",
        }
    }
}

#[derive(Debug)]
struct FieldSpec {
    name: String,
    /// `name`, for the flat reader's comparisons.
    key: flat::Name,
    kind: Kind,
    required: bool,
}

/// Decodes chunks for one pipeline. Cheap to clone into each shard task.
///
/// One pass per record: the flat reader, or serde_json when it declines, checks the syntax
/// strictly and hands each value of a schema field straight to a typed slot; a record whose
/// every check holds is then appended to the column builders, so a bad record leaves no trace
/// in the batch.
#[derive(Debug, Clone)]
pub struct RecordDecoder {
    fields: Arc<[FieldSpec]>,
    /// The record schema the pipeline sees, with `_shard_id` and `_sequence_number`.
    schema: SchemaRef,
    event_field: usize,
    max_record_bytes: usize,
    max_future_skew: i64,
    /// Whether the flat reader goes first (always, but for measuring the strict one alone).
    fast: bool,
}

impl RecordDecoder {
    pub fn new(p: &Pipeline) -> Self {
        let event_field = p
            .schema
            .fields
            .iter()
            .position(|f| f.name == p.event_time.field)
            .expect("validated");
        let fields = p
            .schema
            .fields
            .iter()
            .enumerate()
            .map(|(i, f)| FieldSpec {
                name: f.name.clone(),
                key: flat::Name::new(&f.name),
                kind: match f.ty {
                    FieldType::String => Kind::Str,
                    FieldType::Int32 => Kind::I32,
                    FieldType::Int64 => Kind::I64,
                    FieldType::Float32 => Kind::F32,
                    FieldType::Float64 => Kind::F64,
                    FieldType::Bool => Kind::Bool,
                    FieldType::Timestamp
                        if i == event_field && p.event_time.format == TimeFormat::EpochMillis =>
                    {
                        Kind::EpochMillis
                    }
                    FieldType::Timestamp => Kind::Rfc3339,
                },
                required: f.required || i == event_field,
            })
            .collect();
        Self {
            fields,
            schema: record_schema(p),
            event_field,
            max_record_bytes: p.max_record_bytes,
            max_future_skew: p.max_future_skew,
            fast: true,
        }
    }

    /// The same decoder reading every record with the strict serde_json reader alone, as it
    /// did before the flat reader: for `benches/throughput.rs` to measure the difference.
    pub fn strict_only(mut self) -> Self {
        self.fast = false;
        self
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Decodes a chunk. `now_us` is the wall clock, for the future-skew check.
    pub fn decode(&self, chunk: &RawChunk, now_us: i64) -> Decoded {
        let n = chunk.len();
        let mut columns: Vec<Column> = self.fields.iter().map(|f| Column::new(f.kind, n)).collect();
        let mut seqs = StringBuilder::with_capacity(n, chunk.seqs.text_len());
        let mut dead = Vec::new();
        let mut slots = Vec::with_capacity(self.fields.len());
        let limit = now_us.saturating_add(self.max_future_skew);
        let mut rejected = chunk.rejected.iter().peekable();
        let mut good = 0;
        // One UTF-8 check for the whole chunk, nearly always valid, costs a fraction of one
        // per record; a record is then its slice of the text. (simdutf8 answers the same as
        // `str::from_utf8`, with SIMD.)
        let text = simdutf8::basic::from_utf8(&chunk.data).ok();
        for i in 0..n {
            let rec = chunk.record(i);
            let result = match rejected.next_if(|(r, _)| *r == i) {
                Some((_, why)) => Err(Reason::CorruptAggregate(why.clone())),
                None => {
                    // None when the chunk is not valid UTF-8 or the record does not start
                    // and end on character boundaries: the record is checked alone.
                    let checked = text.and_then(|t| t.get(chunk.spans[i].clone()));
                    self.read(rec, checked, &mut slots, limit)
                }
            };
            match result {
                Ok(()) => {
                    for (column, slot) in columns.iter_mut().zip(slots.drain(..)) {
                        column.push(slot);
                    }
                    seqs.append_value(chunk.seqs.get(i));
                    good += 1;
                }
                Err(reason) => dead.push(DeadLetter {
                    seq: SeqNo(chunk.seqs.get(i).to_string()),
                    reason,
                    raw: rec.to_vec(),
                }),
            }
        }
        let mut arrays: Vec<ArrayRef> = columns.into_iter().map(Column::finish).collect();
        arrays.push(Arc::new(StringArray::from_iter_values(
            std::iter::repeat_n(&*chunk.shard, good),
        )));
        arrays.push(Arc::new(seqs.finish()));
        let batch = RecordBatch::try_new(self.schema.clone(), arrays)
            .expect("decoded columns match the record schema");
        Decoded {
            shard: chunk.shard.clone(),
            resume_from: chunk.resume_from.clone(),
            end: chunk.end(),
            arrival_us: chunk.arrival_us,
            batch,
            dead,
        }
    }

    /// Reads one record into `slots` (one per schema field), or says why it cannot go in.
    /// Syntax comes first, then the fields' types, timestamps, required fields, future skew.
    /// `checked` is the record as text when the caller validated it already.
    fn read<'a>(
        &self,
        rec: &'a [u8],
        checked: Option<&'a str>,
        slots: &mut Vec<Slot<'a>>,
        limit: i64,
    ) -> Result<(), Reason> {
        if rec.len() > self.max_record_bytes {
            return Err(Reason::TooLarge {
                size: rec.len(),
                limit: self.max_record_bytes,
            });
        }
        let text = match checked {
            Some(t) => t,
            None => std::str::from_utf8(rec).map_err(|e| Reason::InvalidUtf8 {
                valid_up_to: e.valid_up_to(),
            })?,
        };
        if text.trim_ascii().is_empty() {
            return Err(Reason::Empty);
        }
        self.parse(text, slots, self.fast)?;
        for (i, (f, slot)) in self.fields.iter().zip(slots.iter()).enumerate() {
            if let Slot::BadTime(value) = slot {
                return Err(if i == self.event_field {
                    Reason::BadEventTime(format!(
                        "field `{}` value {value:?} is not an RFC 3339 timestamp",
                        f.name
                    ))
                } else {
                    Reason::BadTimestamp {
                        field: f.name.clone(),
                        value: value.to_string(),
                    }
                });
            }
        }
        if let Some(f) = self
            .fields
            .iter()
            .zip(slots.iter())
            .find_map(|(f, s)| (f.required && matches!(s, Slot::Absent)).then_some(f))
        {
            return Err(Reason::MissingField(f.name.clone()));
        }
        if let Slot::Time(us) = slots[self.event_field]
            && us > limit
        {
            return Err(Reason::FutureEventTime {
                event_time: fmt_us(us),
                limit: humantime::format_duration(std::time::Duration::from_micros(
                    self.max_future_skew as u64,
                ))
                .to_string(),
            });
        }
        Ok(())
    }
}

impl RecordDecoder {
    /// Fills `slots` (one per field) from a record's JSON: the flat reader first (`fast`),
    /// the strict serde_json reader when it declines. Syntax and type errors come out here.
    fn parse<'a>(
        &self,
        text: &'a str,
        slots: &mut Vec<Slot<'a>>,
        fast: bool,
    ) -> Result<(), Reason> {
        let mut wrong = None;
        let reset = |slots: &mut Vec<Slot<'a>>| {
            slots.clear();
            slots.resize_with(self.fields.len(), || Slot::Absent);
        };
        reset(slots);
        if !fast || flat::read(&self.fields, text, slots, &mut wrong).is_none() {
            reset(slots);
            wrong = None;
            let mut de = serde_json::Deserializer::from_str(text);
            json::Record {
                fields: &self.fields,
                slots,
                wrong: &mut wrong,
            }
            .deserialize(&mut de)
            .and_then(|()| de.end())
            .map_err(|e| json::reason(text, e))?;
        }
        match wrong {
            Some(m) => Err(Reason::WrongType(m)),
            None => Ok(()),
        }
    }
}

/// One field's value in the record being read, borrowed from the record where it can be.
#[derive(Debug)]
enum Slot<'a> {
    /// Absent, or JSON `null`.
    Absent,
    Str(Cow<'a, str>),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Microseconds since the epoch.
    Time(i64),
    /// Text that is not a timestamp: a reason of its own, after type errors.
    BadTime(Cow<'a, str>),
}

/// A column being built; it only ever gets the slots its kind produces.
enum Column {
    Str(StringBuilder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Bool(BooleanBuilder),
    Time(TimestampMicrosecondBuilder),
}

impl Column {
    fn new(kind: Kind, n: usize) -> Self {
        match kind {
            Kind::Str => Column::Str(StringBuilder::with_capacity(n, n * 16)),
            Kind::I32 => Column::I32(Int32Builder::with_capacity(n)),
            Kind::I64 => Column::I64(Int64Builder::with_capacity(n)),
            Kind::F32 => Column::F32(Float32Builder::with_capacity(n)),
            Kind::F64 => Column::F64(Float64Builder::with_capacity(n)),
            Kind::Bool => Column::Bool(BooleanBuilder::with_capacity(n)),
            Kind::Rfc3339 | Kind::EpochMillis => {
                Column::Time(TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC"))
            }
        }
    }

    fn push(&mut self, slot: Slot<'_>) {
        match (self, slot) {
            (Column::Str(b), Slot::Str(v)) => b.append_value(v),
            (Column::I32(b), Slot::Int(v)) => b.append_value(v as i32),
            (Column::I64(b), Slot::Int(v)) => b.append_value(v),
            (Column::F32(b), Slot::Float(v)) => b.append_value(v as f32),
            (Column::F64(b), Slot::Float(v)) => b.append_value(v),
            (Column::Bool(b), Slot::Bool(v)) => b.append_value(v),
            (Column::Time(b), Slot::Time(v)) => b.append_value(v),
            (column, slot) => {
                debug_assert!(
                    matches!(slot, Slot::Absent),
                    "{slot:?} in a column of another type"
                );
                match column {
                    Column::Str(b) => b.append_null(),
                    Column::I32(b) => b.append_null(),
                    Column::I64(b) => b.append_null(),
                    Column::F32(b) => b.append_null(),
                    Column::F64(b) => b.append_null(),
                    Column::Bool(b) => b.append_null(),
                    Column::Time(b) => b.append_null(),
                }
            }
        }
    }

    fn finish(self) -> ArrayRef {
        match self {
            Column::Str(mut b) => Arc::new(b.finish()),
            Column::I32(mut b) => Arc::new(b.finish()),
            Column::I64(mut b) => Arc::new(b.finish()),
            Column::F32(mut b) => Arc::new(b.finish()),
            Column::F64(mut b) => Arc::new(b.finish()),
            Column::Bool(mut b) => Arc::new(b.finish()),
            Column::Time(mut b) => Arc::new(b.finish()),
        }
    }
}

/// serde_json's strict parser driven by the schema: syntax errors are serde_json's (with line
/// and column), values of schema fields land in typed slots, other keys are skipped (their
/// nesting bounded by serde_json's recursion limit). Nothing is allocated per key or per
/// value unless a string holds escapes.
mod json {
    use std::borrow::Cow;
    use std::fmt;

    use arrow::compute::kernels::cast_utils::string_to_datetime;
    use chrono::Utc;
    use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

    use super::{FieldSpec, Kind, Reason, Slot};

    const NOT_OBJECT: &str = "\u{0}not an object";

    /// The reason for a record serde_json refused.
    pub(super) fn reason(text: &str, e: serde_json::Error) -> Reason {
        let msg = e.to_string();
        if let Some(rest) = msg.strip_prefix(NOT_OBJECT) {
            Reason::NotAnObject(rest.trim().to_string())
        } else if e.is_data() {
            Reason::WrongType(msg)
        } else if msg.starts_with("trailing characters") {
            let values = serde_json::Deserializer::from_str(text).into_iter::<IgnoredAny>();
            match values.collect::<Result<Vec<_>, _>>() {
                Ok(v) if v.len() > 1 => Reason::MultipleValues(v.len()),
                _ => Reason::InvalidJson(msg),
            }
        } else {
            Reason::InvalidJson(msg)
        }
    }

    /// The top-level object.
    pub(super) struct Record<'s, 'a> {
        pub fields: &'s [FieldSpec],
        pub slots: &'s mut [Slot<'a>],
        /// The first field whose value has the wrong type; reading goes on, so a syntax
        /// error later in the record still wins.
        pub wrong: &'s mut Option<String>,
    }

    impl<'de> DeserializeSeed<'de> for Record<'_, 'de> {
        type Value = ();
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Record<'_, 'de> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let Record {
                fields,
                slots,
                wrong,
            } = self;
            // Records usually list their fields in one order: try the one after the last.
            let mut guess = 0;
            while let Some(key) = map.next_key_seed(Key { fields, guess })? {
                match key {
                    Some(i) => {
                        guess = i + 1;
                        slots[i] = map.next_value_seed(Value {
                            field: &fields[i],
                            wrong: &mut *wrong,
                        })?;
                    }
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
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

    /// A key: the index of its schema field, if it has one.
    struct Key<'s> {
        fields: &'s [FieldSpec],
        guess: usize,
    }

    impl<'de> DeserializeSeed<'de> for Key<'_> {
        type Value = Option<usize>;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for Key<'_> {
        type Value = Option<usize>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a field name")
        }
        fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
            if self.fields.get(self.guess).is_some_and(|f| f.name == key) {
                return Ok(Some(self.guess));
            }
            Ok(self.fields.iter().position(|f| f.name == key))
        }
    }

    /// A schema field's value.
    pub(super) struct Value<'s> {
        pub field: &'s FieldSpec,
        pub wrong: &'s mut Option<String>,
    }

    impl<'a> Value<'_> {
        #[cold]
        fn mismatch(self, got: &str) -> Slot<'a> {
            let f = self.field;
            self.fail(format!(
                "field `{}`: expected {}, got {got}",
                f.name,
                f.kind.expected()
            ))
        }

        #[cold]
        fn fail(self, message: String) -> Slot<'a> {
            if self.wrong.is_none() {
                *self.wrong = Some(message);
            }
            Slot::Absent
        }

        #[cold]
        fn out_of_range(self, v: impl fmt::Display) -> Slot<'a> {
            let name = &self.field.name;
            let m = format!("field `{name}`: {v} is out of range");
            self.fail(m)
        }

        #[inline]
        pub(super) fn int(self, v: i64) -> Slot<'a> {
            match self.field.kind {
                Kind::I32 if i32::try_from(v).is_err() => self.out_of_range(v),
                Kind::I32 | Kind::I64 => Slot::Int(v),
                Kind::F32 | Kind::F64 => Slot::Float(v as f64),
                Kind::EpochMillis => match v.checked_mul(1000) {
                    Some(us) => Slot::Time(us),
                    None => self.out_of_range(v),
                },
                Kind::Str | Kind::Bool | Kind::Rfc3339 => self.mismatch("a number"),
            }
        }

        #[inline]
        pub(super) fn text(self, v: Cow<'a, str>) -> Slot<'a> {
            match self.field.kind {
                Kind::Str => Slot::Str(v),
                Kind::Rfc3339 => match super::flat::utc_micros(&v) {
                    Some(us) => Slot::Time(us),
                    None => match string_to_datetime(&Utc, &v) {
                        Ok(t) => Slot::Time(t.timestamp_micros()),
                        Err(_) => Slot::BadTime(v),
                    },
                },
                Kind::Bool => self.mismatch("a string"),
                // Numbers written as strings are read, as arrow-json reads them.
                Kind::I32 | Kind::I64 | Kind::EpochMillis => match v.parse::<i64>() {
                    Ok(n) => self.int(n),
                    Err(_) => self.unparsable(&v),
                },
                Kind::F32 | Kind::F64 => match v.parse::<f64>() {
                    Ok(x) => Slot::Float(x),
                    Err(_) => self.unparsable(&v),
                },
            }
        }

        #[inline]
        pub(super) fn uint(self, v: u64) -> Slot<'a> {
            match i64::try_from(v) {
                Ok(v) => self.int(v),
                Err(_) if matches!(self.field.kind, Kind::F32 | Kind::F64) => Slot::Float(v as f64),
                Err(_) if matches!(self.field.kind, Kind::Str | Kind::Bool | Kind::Rfc3339) => {
                    self.mismatch("a number")
                }
                Err(_) => self.out_of_range(v),
            }
        }

        #[inline]
        pub(super) fn float(self, v: f64) -> Slot<'a> {
            match self.field.kind {
                Kind::F32 | Kind::F64 => Slot::Float(v),
                Kind::I32 | Kind::I64 | Kind::EpochMillis => {
                    // serde_json gives a float for `1.5`, `1e3` and integers beyond u64.
                    let within = v.fract() == 0.0 && v.abs() < 9.2e18;
                    if v.fract() != 0.0 || within {
                        let name = &self.field.name;
                        let m = format!("field `{name}`: {v} is not an integer");
                        self.fail(m)
                    } else {
                        self.out_of_range(v)
                    }
                }
                Kind::Str | Kind::Bool | Kind::Rfc3339 => self.mismatch("a number"),
            }
        }

        #[inline]
        pub(super) fn boolean(self, v: bool) -> Slot<'a> {
            match self.field.kind {
                Kind::Bool => Slot::Bool(v),
                _ => self.mismatch("a boolean"),
            }
        }

        #[cold]
        fn unparsable(self, v: &str) -> Slot<'a> {
            let ty = match self.field.kind {
                Kind::I32 => "Int32",
                Kind::F32 => "Float32",
                Kind::F64 => "Float64",
                _ => "Int64",
            };
            let name = &self.field.name;
            let m = format!("field `{name}`: failed to parse {v:?} as {ty}");
            self.fail(m)
        }
    }

    impl<'de> DeserializeSeed<'de> for Value<'_> {
        type Value = Slot<'de>;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Slot<'de>, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Value<'_> {
        type Value = Slot<'de>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.field.kind.expected())
        }
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Slot<'de>, E> {
            Ok(self.text(Cow::Borrowed(v)))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Slot<'de>, E> {
            Ok(self.text(Cow::Owned(v.to_owned())))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Slot<'de>, E> {
            Ok(self.text(Cow::Owned(v)))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Slot<'de>, E> {
            Ok(self.int(v))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Slot<'de>, E> {
            Ok(self.uint(v))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Slot<'de>, E> {
            Ok(self.float(v))
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Slot<'de>, E> {
            Ok(self.boolean(v))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Slot<'de>, E> {
            Ok(Slot::Absent)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Slot<'de>, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(self.mismatch("an object"))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Slot<'de>, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(self.mismatch("an array"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::util::display::array_value_to_string;

    /// A decoder for a schema with every field type; `ts` is the event time.
    fn decoder() -> RecordDecoder {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("s.yaml"),
            "name: s\nfields:\n  - {name: ts, type: timestamp}\n  - {name: id, type: string, required: true}\n  - {name: n32, type: int32}\n  - {name: n64, type: int64}\n  - {name: f32, type: float32}\n  - {name: f64, type: float64}\n  - {name: ok, type: bool}\n  - {name: seen, type: timestamp}\n",
        )
        .unwrap();
        let pipe = dir.path().join("p.yaml");
        std::fs::write(
            &pipe,
            "name: p\nschema: s.yaml\nsource: {local: {path: s}}\nlake: {local: {path: l}}\ncheckpoints: {local: {path: c}}\nevent_time: {field: ts}\nlimits: {max_future_skew: 1h}\n",
        )
        .unwrap();
        RecordDecoder::new(&crate::config::load_pipeline(&pipe, &|_| None).unwrap())
    }

    const NOW: i64 = 1_767_607_200_000_000; // 2026-01-05T10:00:00Z

    fn chunk(records: &[&str]) -> RawChunk {
        let mut data = Vec::new();
        let mut spans = Vec::new();
        for r in records {
            spans.push(data.len()..data.len() + r.len());
            data.extend_from_slice(r.as_bytes());
        }
        RawChunk {
            shard: "shard-0".into(),
            resume_from: None,
            data,
            spans,
            seqs: (0..records.len()).map(|i| i.to_string()).collect(),
            rejected: Vec::new(),
            arrival_us: NOW,
        }
    }

    /// Each good record's columns as text, and each dead letter's reason.
    fn decode(records: &[&str]) -> (Vec<Vec<String>>, Vec<(u64, String)>) {
        let d = decoder().decode(&chunk(records), NOW);
        let rows = (0..d.batch.num_rows())
            .map(|r| {
                d.batch
                    .columns()
                    .iter()
                    .map(|c| {
                        if c.is_null(r) {
                            "null".to_string()
                        } else {
                            array_value_to_string(c, r).unwrap()
                        }
                    })
                    .collect()
            })
            .collect();
        let dead = d
            .dead
            .iter()
            .map(|x| (x.seq.as_u64().unwrap(), x.reason.to_string()))
            .collect();
        (rows, dead)
    }

    fn reason_of(record: &str) -> String {
        let (rows, dead) = decode(&[record]);
        assert!(rows.is_empty(), "{record} was accepted: {rows:?}");
        dead[0].1.clone()
    }

    /// The chunk is checked for UTF-8 as a whole; each record must still be valid alone,
    /// also when the chunk is (a character split between two records).
    #[test]
    fn a_record_is_judged_by_its_own_bytes_not_its_chunks() {
        let good = r#"{"ts":"2026-01-05T10:00:00Z","id":"é"}"#;
        let split = good.find('é').unwrap() + 1;
        let (head, tail) = good.as_bytes().split_at(split);
        let bad = b"{\"ts\":\"2026-01-05T10:00:00Z\",\"id\":\"\xff\"}";
        let cases: [(&[&[u8]], &[u64]); 3] = [
            // Both valid alone: the chunk's check stands for theirs.
            (&[good.as_bytes(), good.as_bytes()], &[]),
            // The chunk is valid UTF-8, but neither record is.
            (&[head, tail], &[0, 1]),
            // The chunk is not: each record is checked alone.
            (&[good.as_bytes(), bad, good.as_bytes()], &[1]),
        ];
        for (records, want_dead) in cases {
            let mut data = Vec::new();
            let mut spans = Vec::new();
            for r in records {
                spans.push(data.len()..data.len() + r.len());
                data.extend_from_slice(r);
            }
            let c = RawChunk {
                data,
                spans,
                seqs: (0..records.len()).map(|i| i.to_string()).collect(),
                ..chunk(&[])
            };
            let d = decoder().decode(&c, NOW);
            let dead: Vec<u64> = d.dead.iter().map(|x| x.seq.as_u64().unwrap()).collect();
            assert_eq!(dead, want_dead);
            assert_eq!(d.batch.num_rows(), records.len() - want_dead.len());
            for x in &d.dead {
                assert!(
                    x.reason.to_string().starts_with("invalid_utf8: "),
                    "{}",
                    x.reason
                );
            }
        }
    }

    #[test]
    fn every_type_lands_in_its_column() {
        let (rows, dead) = decode(&[
            r#"{"ts":"2026-01-05T11:00:00+01:00","id":"a\"b\u00e9","n32":-7,"n64":9007199254740993,"f32":1.5,"f64":2,"ok":true,"seen":"2026-01-05 09:00:00"}"#,
            r#"{"id":"x","ts":"2026-01-05T10:00:00.123456Z","extra":{"deep":[1,{"a":null}]},"n64":"42","f64":"-0.5","ok":null}"#,
        ]);
        assert!(dead.is_empty(), "{dead:?}");
        assert_eq!(
            rows[0],
            [
                "2026-01-05T10:00:00Z",
                "a\"bé",
                "-7",
                "9007199254740993",
                "1.5",
                "2.0",
                "true",
                "2026-01-05T09:00:00Z",
                "shard-0",
                "0"
            ]
        );
        assert_eq!(
            rows[1],
            [
                "2026-01-05T10:00:00.123456Z",
                "x",
                "null",
                "42",
                "null",
                "-0.5",
                "null",
                "null",
                "shard-0",
                "1"
            ]
        );
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value_and_an_escaped_key_still_matches() {
        let (rows, dead) =
            decode(&[r#"{"ts":"2026-01-05T10:00:00Z","\u0069d":"first","id":"second"}"#]);
        assert!(dead.is_empty(), "{dead:?}");
        assert_eq!(rows[0][1], "second");
    }

    #[test]
    fn bad_records_get_reasons_and_leave_no_trace_among_the_good() {
        let good = r#"{"ts":"2026-01-05T10:00:00Z","id":"g"}"#;
        let (rows, dead) = decode(&[
            good,
            r#"{"ts":"2026-01-05T10:00:00Z","id":"b","n32":1.5}"#,
            good,
        ]);
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r[1] == "g"), "{rows:?}");
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].0, 1);
        assert!(
            dead[0].1.contains("`n32`: 1.5 is not an integer"),
            "{dead:?}"
        );
    }

    #[test]
    fn reasons_say_what_is_wrong() {
        let r = |fields: &str| format!(r#"{{"ts":"2026-01-05T10:00:00Z","id":"a",{fields}}}"#);
        let cases = [
            (
                r(r#""n32":2147483648"#),
                "wrong_type: field `n32`: 2147483648 is out of range",
            ),
            (
                r(r#""n64":1e3"#),
                "wrong_type: field `n64`: 1000 is not an integer",
            ),
            (
                r(r#""n64":-99999999999999999999"#),
                "wrong_type: field `n64`: -100000000000000000000 is out of range",
            ),
            (
                r(r#""n64":18446744073709551615"#),
                "wrong_type: field `n64`: 18446744073709551615 is out of range",
            ),
            (
                r(r#""n32":"3000000000""#),
                "wrong_type: field `n32`: 3000000000 is out of range",
            ),
            (
                r(r#""f64":"high""#),
                r#"wrong_type: field `f64`: failed to parse "high" as Float64"#,
            ),
            (
                r(r#""ok":"yes""#),
                "wrong_type: field `ok`: expected true or false, got a string",
            ),
            (
                r(r#""ok":1"#),
                "wrong_type: field `ok`: expected true or false, got a number",
            ),
            (
                r(r#""id":true"#),
                "wrong_type: field `id`: expected a string, got a boolean",
            ),
            (
                r(r#""f32":[1]"#),
                "wrong_type: field `f32`: expected a number, got an array",
            ),
            (
                r(r#""seen":"soon""#),
                r#"bad_timestamp: field `seen` value "soon""#,
            ),
            (
                r#"{"ts":"2026-01-05T10:00:00Z"}"#.to_string(),
                "missing_field: required field `id`",
            ),
            (
                r#"{"ts":"2026-01-05T12:00:01Z","id":"a"}"#.to_string(),
                "future_event_time",
            ),
            // A type error does not hide a syntax error after it.
            (
                r(r#""n32":"x","f64":}"#),
                "invalid_json: expected value at line 1 column",
            ),
            // Nor a missing field a bad timestamp.
            (
                r#"{"ts":"late"}"#.to_string(),
                r#"bad_event_time: field `ts` value "late""#,
            ),
            // serde_json skips a value outside the schema without recursing, however deep.
            (
                format!(r#"{{"a":{}{}}}"#, "[".repeat(10_000), "]".repeat(10_000)),
                "missing_field: required field `ts`",
            ),
            (
                "[1,".to_string(),
                "not_an_object: a record must be a JSON object (got an array at line 1 column 1)",
            ),
            (
                "{} {}".to_string(),
                "multiple_values: the record holds 2 JSON values",
            ),
        ];
        for (record, expected) in cases {
            let got = reason_of(&record);
            assert!(
                got.starts_with(expected),
                "{record}\n  got      {got}\n  expected {expected}"
            );
        }
    }

    #[test]
    fn a_chunk_of_only_bad_records_gives_an_empty_batch_of_the_schema() {
        let d = decoder().decode(&chunk(&["", "nope"]), NOW);
        assert_eq!(d.batch.num_rows(), 0);
        assert_eq!(d.batch.schema(), *decoder().schema());
        assert_eq!(d.dead.len(), 2);
    }

    /// A JSON number of random shape: digits, a fraction, an exponent, long enough to need
    /// correct rounding, sometimes beyond i64 or f64.
    fn random_number(rng: &mut fastrand::Rng) -> String {
        let digits = |rng: &mut fastrand::Rng, n: usize| -> String {
            (0..n).map(|_| rng.digit(10)).collect()
        };
        let mut s = String::new();
        if rng.bool() {
            s.push('-');
        }
        let n = rng.usize(1..22);
        let int = digits(rng, n);
        s.push_str(int.trim_start_matches('0'));
        if s.is_empty() || s == "-" {
            s.push('0');
        }
        if rng.u8(..3) == 0 {
            s.push('.');
            let n = rng.usize(1..25);
            s.push_str(&digits(rng, n));
        }
        if rng.u8(..4) == 0 {
            s.push(if rng.bool() { 'e' } else { 'E' });
            s.push_str(["", "+", "-"][rng.usize(..3)]);
            s.push_str(&rng.u16(..400).to_string());
        }
        s
    }

    /// The flat reader either declines or fills exactly what the strict serde_json reader
    /// fills, error included, over hand-picked edge cases and random records mutated byte by
    /// byte (so both readers see broken syntax, escapes, nesting, odd numbers).
    #[test]
    fn the_fast_reader_agrees_with_the_strict_one() {
        let d = decoder();
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let mut corpus: Vec<String> = [
            r#"{"ts":"2026-01-05T10:00:00Z","id":"a","n32":1,"n64":-2,"f32":1.5,"f64":-0.25,"ok":true,"seen":"2026-01-05T10:00:00.5Z"}"#,
            r#" { "id" : "é\t" , "ts" : "2026-01-05T10:00:00.123456789Z" , "ok" : false } "#,
            r#"{"id":"a","ts":"2026-01-05T10:00:00Z","extra":{"a":[1,{"b":null}]},"n64":null}"#,
            r#"{"id":"a\"b","ts":"2026-01-05 10:00:00+01:00","id":"c"}"#,
            r#"{"id":"a","ts":"2026-02-29T10:00:00Z"}"#,
            r#"{"id":"a","ts":"2024-02-29T23:59:59.9999999Z","seen":"2026-13-01T00:00:00Z"}"#,
            r#"{"n64":-0,"n32":-0.0,"f64":-0}"#,
            r#"{"n64":01}"#,
            r#"{"f64":1e400,"id":"x"}"#,
            r#"{"skip":1e400,"id":"x","ts":"2026-01-05T10:00:00Z"}"#,
            r#"{"n64":18446744073709551615,"f64":18446744073709551616}"#,
            r#"{"n64":9223372036854775808}"#,
            r#"{"n64":-9223372036854775808,"n32":-9223372036854775809}"#,
            r#"{"n32":2147483648,"id":1}"#,
            r#"{"n64":1.5,"n64":2,"id":"a"}"#,
            r#"{"n64":"12","f64":"1.5","ok":"true","id":true}"#,
            r#"{"n64":1.0,"f32":1E5,"f64":2.2250738585072011e-308}"#,
            r#"{"f64":0.1000000000000000055511151231257827,"f32":9007199254740993}"#,
            r#"{"id":"x",}"#,
            r#"{"id":"x"}{"id":"y"}"#,
            r#"{"id":"x"} x"#,
            r#"{"ok":tru}"#,
            r#"{"ok":true1}"#,
            r#"{"n64":1.}"#,
            r#"{"n64":.5}"#,
            r#"{"f64":1e}"#,
            r#"{"f64":-}"#,
            r#"{}"#,
            r#"[]"#,
            r#""id""#,
        ]
        .map(String::from)
        .to_vec();
        for _ in 0..300 {
            let (a, b, c) = (
                random_number(&mut rng),
                random_number(&mut rng),
                random_number(&mut rng),
            );
            corpus.push(format!(
                r#"{{"ts":"2026-01-05T10:00:{:02}.{}Z","id":"d{}","n32":{a},"n64":{b},"f32":{c},"f64":{a},"skip":{c}}}"#,
                rng.u8(..60),
                rng.u32(..1_000_000),
                rng.u16(..)
            ));
        }
        let alphabet = b"{}[],:\" \t\n\\0123456789.eE+-tfnulxZT";
        let (mut accepted, mut declined) = (0, 0);
        for round in 0..40_000 {
            let mut rec = corpus[rng.usize(..corpus.len())].clone().into_bytes();
            for _ in 0..(round % 4) {
                let at = rng.usize(..=rec.len());
                match rng.u8(..3) {
                    0 if at < rec.len() => {
                        rec.remove(at);
                    }
                    1 if at < rec.len() => rec[at] = alphabet[rng.usize(..alphabet.len())],
                    _ => rec.insert(at, alphabet[rng.usize(..alphabet.len())]),
                }
            }
            let Ok(text) = std::str::from_utf8(&rec) else {
                continue;
            };
            let (mut fast, mut strict) = (Vec::new(), Vec::new());
            let fast_result = d.parse(text, &mut fast, true);
            let strict_result = d.parse(text, &mut strict, false);
            assert_eq!(
                format!("{fast_result:?} {fast:?}"),
                format!("{strict_result:?} {strict:?}"),
                "record {text}"
            );
            let mut slots: Vec<Slot> = (0..d.fields.len()).map(|_| Slot::Absent).collect();
            match flat::read(&d.fields, text, &mut slots, &mut None) {
                Some(()) => accepted += 1,
                None => declined += 1,
            }
        }
        assert!(
            accepted > 10_000 && declined > 10_000,
            "{accepted} accepted, {declined} declined"
        );
    }

    /// The fast timestamp form gives arrow's parser's microseconds, or leaves the text to it.
    #[test]
    fn fast_timestamps_read_as_arrows_parser_reads_them() {
        use arrow::compute::kernels::cast_utils::string_to_datetime;
        let mut rng = fastrand::Rng::with_seed(42);
        let mut fast = 0;
        let mut fast_offsets = 0;
        let mut prefix = String::from("2026-01-05T10");
        let edges = [
            "1900-02-29T00:00:00Z",
            "2000-02-29T00:00:00Z",
            "2100-02-29T00:00:00Z",
            "2024-02-29T12:00:00Z",
            "2023-02-29T12:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-12-31T23:59:59.999999999Z",
            "1969-12-31T23:59:59.999999Z",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "2026-01-05T10:00:00.123+05:30",
            "2026-01-05T00:00:00-00:00",
            "2026-01-01T00:30:00+01:00",
            "2026-03-01T23:59:59.5-23:59",
            "0000-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
        ];
        for text in edges {
            let full = string_to_datetime(&chrono::Utc, text).map(|t| t.timestamp_micros());
            assert_eq!(
                flat::utc_micros(text).ok_or(()),
                full.map_err(|_| ()),
                "{text}"
            );
        }
        // Offsets arrow accepts (`+05:60` as `+06:00`) or not, which the fast path leaves
        // to it.
        for text in ["2026-01-05T10:00:00+24:00", "2026-01-05T10:00:00+05:60"] {
            assert_eq!(flat::utc_micros(text), None, "{text}");
        }
        for _ in 0..50_000 {
            let fraction = match rng.u8(..4) {
                0 => String::new(),
                _ => format!(
                    ".{}",
                    (0..rng.usize(1..12))
                        .map(|_| rng.digit(10))
                        .collect::<String>()
                ),
            };
            // A third of the time the date and hour of the one before, and a third of the time
            // those with one digit changed, so the fast path's cache of the last date and
            // hour is tried against other minutes, seconds and zones, and near misses.
            let turn = rng.u8(..3);
            if turn == 1 {
                let at = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12][rng.usize(..10)];
                let mut bytes = prefix.clone().into_bytes();
                bytes[at] = rng.digit(10) as u8;
                prefix = String::from_utf8(bytes).unwrap();
            } else if turn == 2 {
                prefix = format!(
                    "{:04}-{:02}-{:02}{}{:02}",
                    rng.u16(..10_000),
                    rng.u8(..14),
                    rng.u8(..32),
                    ['T', 'T', 'T', ' '][rng.usize(..4)],
                    rng.u8(..25),
                );
            }
            let text = format!(
                "{prefix}:{:02}:{:02}{fraction}{}",
                rng.u8(..61),
                rng.u8(..61),
                match rng.u8(..8) {
                    0..3 => "Z".to_string(),
                    3 => ["z", "", "+0530", "+05", "UTC"][rng.usize(..5)].to_string(),
                    _ => format!(
                        "{}{:02}:{:02}",
                        ['+', '-'][rng.usize(..2)],
                        rng.u8(..26),
                        rng.u8(..62)
                    ),
                },
            );
            let full = string_to_datetime(&chrono::Utc, &text).map(|t| t.timestamp_micros());
            if let Some(us) = flat::utc_micros(&text) {
                assert_eq!(Ok(us), full.map_err(|e| e.to_string()), "{text}");
                fast += 1;
                fast_offsets += usize::from(!text.ends_with('Z'));
            }
        }
        assert!(fast > 10_000, "only {fast} in the fast form");
        assert!(fast_offsets > 5_000, "only {fast_offsets} with an offset");
    }
}
