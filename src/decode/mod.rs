//! JSON records → Arrow in one strict pass per record, straight into column builders. A record
//! that does not fit goes to the dead-letter output with its bytes, shard, sequence number and
//! a reason that says what is wrong; the good records of the same chunk still go through.
//!
//! Two readers: the flat reader (`flat.rs`) takes the common record (a flat object without
//! escapes) fast; whatever it declines, the strict serde_json reader (`strict.rs`) reads from
//! the start, and only it words syntax errors. Neither calls the other: both hand a field's
//! value to `field.rs`, and this file, which holds the chunk loop, tries one then the other.
//! A test holds them to the same result. Dead-letter reasons are in `reason.rs`.
//!
//! This replaced arrow-json's decoder behind a serde_json strictness pass: arrow-json accepts
//! trailing commas and truncates `1.5` into an int64, so it needed that second pass, and a bad
//! record made it fail the whole chunk. benches/README.md has the measured difference.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanBuilder, Float32Builder, Float64Builder, Int32Builder, Int64Builder,
    RecordBatch, StringArray, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field as ArrowField, Schema, SchemaRef, TimeUnit};
use serde::de::DeserializeSeed;

use crate::config::{FieldType, Identity, Pipeline, TimeFormat};
use crate::record::{Position, RawChunk, SeqNo};
use field::{FieldSpec, Kind, Name, Slot};

mod field;
mod flat;
mod reason;
mod strict;
#[cfg(test)]
mod tests;

pub use reason::{DeadLetter, Reason};

/// The names of the two columns the decoder adds, under the names they have always had here.
pub use crate::columns::{SEQUENCE_NUMBER as SEQ_COL, SHARD_ID as SHARD_COL};

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
    /// How many of the good rows (the first ones) are at or before `after`: records a
    /// restart reads again (for open windows) that were committed already.
    pub fn replayed(&self, after: Option<&SeqNo>) -> usize {
        let Some(after) = after else {
            return 0;
        };
        let (mut lo, mut hi) = (0, self.batch.num_rows());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if SeqNo(self.seq(mid).to_string()) <= *after {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

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
    /// What the partition key proves (`identity:`), checked against each record.
    identity: Option<Arc<Identity>>,
    /// The field whose value names a partition directory (`outputs.partition_by`), by index:
    /// a value unsafe in a path sends its record to dead-letter.
    partition_field: Option<usize>,
    /// Whether the flat reader goes first (always, but for measuring the strict one alone).
    fast: bool,
}

impl RecordDecoder {
    pub fn new(p: &Pipeline) -> Self {
        let event_field = p.event_field_index();
        let fields = p
            .schema
            .fields
            .iter()
            .enumerate()
            .map(|(i, f)| FieldSpec {
                name: f.name.clone(),
                key: Name::new(&f.name),
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
            identity: p.identity.clone().map(Arc::new),
            partition_field: p
                .outputs
                .partition_by
                .as_ref()
                .and_then(|by| p.schema.fields.iter().position(|f| &f.name == by)),
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
        let mut proven = Vec::new();
        for i in 0..n {
            let rec = chunk.record(i);
            let result = match rejected.next_if(|(r, _, _)| *r == i) {
                Some((_, kind, why)) => Err(Reason::rejected(*kind, why)),
                None => {
                    // None when the chunk is not valid UTF-8 or the record does not start
                    // and end on character boundaries: the record is checked alone.
                    let checked = text.and_then(|t| t.get(chunk.spans[i].clone()));
                    self.read(rec, checked, chunk.key(i), &mut proven, &mut slots, limit)
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
                    raw: chunk.as_read(i).to_vec(),
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
    /// `checked` is the record as text when the caller validated it already; `key` its
    /// partition key, for the identity check (which comes right after the syntax, and fills
    /// a proven field the record left out). `proven` is scratch space for it.
    fn read<'a>(
        &self,
        rec: &'a [u8],
        checked: Option<&'a str>,
        key: Option<&'a str>,
        proven: &mut Vec<(usize, &'a str)>,
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
        if let Some(id) = &self.identity {
            self.check_identity(id, key, proven, slots)?;
        }
        if let Some(i) = self.partition_field
            && let Slot::Str(v) = &slots[i]
            && let Some(why) = crate::sink::partition::unsafe_in_path(v)
        {
            return Err(Reason::UnsafePartitionValue(format!(
                "field `{}` value {v:?} {why}, so it cannot name a partition directory \
                 (outputs.partition_by)",
                self.fields[i].name
            )));
        }
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
    /// Compares the fields the key proves with what the record says; fills those it left out.
    fn check_identity<'a>(
        &self,
        id: &Identity,
        key: Option<&'a str>,
        proven: &mut Vec<(usize, &'a str)>,
        slots: &mut [Slot<'a>],
    ) -> Result<(), Reason> {
        let Some(key) = key else {
            return Err(Reason::IdentityMismatch(
                "the source gave no partition key, so nothing proves the record's identity".into(),
            ));
        };
        if !id.prove(key, proven) {
            return Err(Reason::IdentityMismatch(format!(
                "partition key {key:?} does not have the shape {} (identity.key)",
                id.key
            )));
        }
        for &(index, value) in proven.iter() {
            match &slots[index] {
                Slot::Absent => slots[index] = Slot::Str(value.into()),
                Slot::Str(claimed) if claimed.as_ref() == value => {}
                Slot::Str(claimed) => {
                    return Err(Reason::IdentityMismatch(format!(
                        "field `{}` says {claimed:?} but the channel proves {value:?} \
                         (partition key {key:?})",
                        self.fields[index].name
                    )));
                }
                // Resolve admits only string fields; a wrong type was reported by `parse`.
                _ => {}
            }
        }
        Ok(())
    }

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
            strict::Record {
                fields: &self.fields,
                slots,
                wrong: &mut wrong,
            }
            .deserialize(&mut de)
            .and_then(|()| de.end())
            .map_err(|e| strict::reason(text, e))?;
        }
        match wrong {
            Some(m) => Err(Reason::WrongType(m)),
            None => Ok(()),
        }
    }
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
