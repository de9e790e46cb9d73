//! The names of every column shardlake adds to what a schema declares, in one place, so the
//! decoder, the engine's tables, the lake's partitions and queries cannot spell one
//! differently. Plain text, no Arrow: the agent build (and `config`) can use it.

/// Records and dead letters: the shard the record was read from.
pub const SHARD_ID: &str = "_shard_id";
/// Records and dead letters: the record's sequence number in its shard.
pub const SEQUENCE_NUMBER: &str = "_sequence_number";

/// Aggregation input and output: the start of the window a row falls in.
pub const WINDOW_START: &str = "window_start";
/// Aggregation input: the end of the window a row falls in.
pub const WINDOW_END: &str = "window_end";

/// Late records: the aggregation the record was late for.
pub const AGGREGATION: &str = "aggregation";

/// Dead letters: when the record's chunk was read (the table's partition column).
pub const ARRIVAL_TIME: &str = "arrival_time";
/// Dead letters: the reason's kind, its first word (`invalid_json`, `missing_field`, …).
pub const ERROR: &str = "error";
/// Dead letters: the whole reason, as text.
pub const REASON: &str = "reason";
/// Dead letters: the record's bytes as they came.
pub const RAW: &str = "raw";

/// Alerts: the rule's name.
pub const RULE: &str = "rule";
/// Alerts: whether a record or a window row matched.
pub const KIND: &str = "kind";
/// Alerts: the record's event time, or the window's start (the table's partition column).
pub const EVENT_TIME: &str = "event_time";
/// Alerts: the value of the schema's key field, if it has one.
pub const KEY: &str = "key";
/// Alerts: the matching row, as JSON.
pub const DETAIL: &str = "detail";

/// Every table in the lake: the partition's year (`year=YYYY/…` in its path).
pub const YEAR: &str = "year";
/// Every table in the lake: the partition's month, two digits.
pub const MONTH: &str = "month";
/// Every table in the lake: the partition's day, two digits.
pub const DAY: &str = "day";
/// Every table in the lake: the partition's hour, two digits, UTC.
pub const HOUR: &str = "hour";

/// The schema field a record's tenant is read from, when the schema declares it (not added
/// by shardlake: the console groups devices and alerts by it).
pub const TENANT: &str = "tenant";
