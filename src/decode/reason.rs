//! Why a record goes to dead-letter, and the dead letter that carries the reason: the one
//! part of decoding the engine reads (it writes them to the dead-letter table), kept apart
//! from the readers, which only produce them.

use std::fmt;

use crate::record::SeqNo;

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
    /// The record claims an identity (device, tenant) its channel did not prove: a field's
    /// value differs from what the partition key says, or the key has not the configured
    /// shape. Never counted for either device.
    IdentityMismatch(String),
    /// The value of the partition-by field (`tenant`) cannot be a directory name.
    UnsafePartitionValue(String),
    /// A CSV row whose cells do not match the header.
    BadCsvRow(String),
    /// A compressed object ended early or did not decompress; what came before was read.
    CorruptObject(String),
    /// An object bigger than the source's `max_object_bytes`, left unread.
    ObjectTooLarge(String),
    /// An object whose key's extension names no format the source reads.
    UnknownFormat(String),
    /// An object given up on after its notification came back `max_receives` times.
    ObjectUnreadable(String),
}

impl Reason {
    /// The stable first word of the text.
    pub fn kind(&self) -> &'static str {
        match self {
            Reason::TooLarge { .. } => "too_large",
            Reason::InvalidUtf8 { .. } => "invalid_utf8",
            Reason::Empty => "empty",
            Reason::InvalidJson(_) => "invalid_json",
            Reason::NotAnObject(_) => "not_an_object",
            Reason::MultipleValues(_) => "multiple_values",
            Reason::WrongType(_) => "wrong_type",
            Reason::MissingField(_) => "missing_field",
            Reason::BadEventTime(_) => "bad_event_time",
            Reason::FutureEventTime { .. } => "future_event_time",
            Reason::BadTimestamp { .. } => "bad_timestamp",
            Reason::CorruptAggregate(_) => "corrupt_aggregate",
            Reason::IdentityMismatch(_) => "identity_mismatch",
            Reason::UnsafePartitionValue(_) => "unsafe_partition_value",
            Reason::BadCsvRow(_) => "bad_csv_row",
            Reason::CorruptObject(_) => "corrupt_object",
            Reason::ObjectTooLarge(_) => "object_too_large",
            Reason::UnknownFormat(_) => "unknown_format",
            Reason::ObjectUnreadable(_) => "object_unreadable",
        }
    }
}

impl Reason {
    /// A source's rejection as a dead letter's reason.
    pub fn rejected(kind: crate::record::Rejection, why: &str) -> Self {
        use crate::record::Rejection as R;
        let why = why.to_string();
        match kind {
            R::CorruptAggregate => Reason::CorruptAggregate(why),
            R::BadCsvRow => Reason::BadCsvRow(why),
            R::CorruptObject => Reason::CorruptObject(why),
            R::ObjectTooLarge => Reason::ObjectTooLarge(why),
            R::UnknownFormat => Reason::UnknownFormat(why),
            R::ObjectUnreadable => Reason::ObjectUnreadable(why),
        }
    }
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
            Reason::IdentityMismatch(m) => write!(f, "identity_mismatch: {m}"),
            Reason::UnsafePartitionValue(m) => write!(f, "unsafe_partition_value: {m}"),
            Reason::BadCsvRow(m) => write!(f, "bad_csv_row: {m}"),
            Reason::CorruptObject(m) => write!(f, "corrupt_object: {m}"),
            Reason::ObjectTooLarge(m) => write!(f, "object_too_large: {m}"),
            Reason::UnknownFormat(m) => write!(f, "unknown_format: {m}"),
            Reason::ObjectUnreadable(m) => write!(f, "object_unreadable: {m}"),
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
