//! The resolved configuration: a [`Pipeline`] whose values are parsed (durations in
//! microseconds, sizes in bytes, start positions, lakes) and checked, so the rest of the crate
//! never sees the text the file wrote.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::{FieldType, LineIndex, Problem, Problems, TimeFormat};
use crate::columns;

/// Columns the engine adds; a schema field may not use these names.
pub const RESERVED_COLUMNS: &[&str] = &[
    columns::YEAR,
    columns::MONTH,
    columns::DAY,
    columns::HOUR,
    columns::WINDOW_START,
    columns::WINDOW_END,
    columns::SHARD_ID,
    columns::SEQUENCE_NUMBER,
    columns::AGGREGATION,
];

/// A loaded, validated pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub file: PathBuf,
    pub name: String,
    pub schema: RecordSchema,
    pub source: Source,
    pub lake: LakeLocation,
    pub checkpoints: Checkpoints,
    pub event_time: EventTime,
    pub max_record_bytes: usize,
    /// Microseconds.
    pub max_future_skew: i64,
    /// Records an aggregation buffers before folding them into per-window states.
    pub window_buffer_records: usize,
    /// Series the detectors track per worker before forgetting the least recently seen.
    pub detector_series: usize,
    pub rollover: Rollover,
    pub outputs: Outputs,
    pub alerts: Vec<AlertRule>,
    pub notifiers: Vec<Notifier>,
    /// `commands:`: where desired states go (alert actions' notifiers carry a copy).
    pub commands: Option<CommandsBroker>,
    /// `shardlake console`: sign-in and roles.
    pub console: Console,
    /// What the channel proves of each record (`identity:`), if set.
    pub identity: Option<Identity>,
    /// `compaction:`: the worker compacts its Delta tables on a timer.
    pub compaction: Option<Compaction>,
    pub lines: LineIndex,
}

/// `compaction:`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compaction {
    pub every: std::time::Duration,
    pub older_than: std::time::Duration,
    pub target_size: u64,
    pub zorder: Vec<String>,
    pub sort: Vec<String>,
}

/// `identity:`: the partition key's shape, which says which fields it proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// As written, e.g. `{tenant}/{device_id}`.
    pub key: String,
    pub parts: Vec<KeyPart>,
}

/// A piece of the key's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    Text(String),
    /// A string field of the schema, by its index there.
    Field {
        name: String,
        index: usize,
    },
}

impl Identity {
    /// The field values `key` proves, as (schema index, value), into `out`; false when the key
    /// does not have the shape (a text part missing, or a field's value empty).
    pub fn prove<'k>(&self, key: &'k str, out: &mut Vec<(usize, &'k str)>) -> bool {
        out.clear();
        let mut rest = key;
        let mut parts = self.parts.iter().peekable();
        while let Some(part) = parts.next() {
            match part {
                KeyPart::Text(t) => match rest.strip_prefix(t.as_str()) {
                    Some(r) => rest = r,
                    None => return false,
                },
                KeyPart::Field { index, .. } => {
                    // Up to the next text part (resolve keeps two fields from touching).
                    let end = match parts.peek() {
                        Some(KeyPart::Text(t)) => match rest.find(t.as_str()) {
                            Some(e) => e,
                            None => return false,
                        },
                        _ => rest.len(),
                    };
                    if end == 0 {
                        return false;
                    }
                    out.push((*index, &rest[..end]));
                    rest = &rest[end..];
                }
            }
        }
        rest.is_empty()
    }

    /// Whether the key proves field `name`.
    pub fn proves(&self, name: &str) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, KeyPart::Field { name: n, .. } if n == name))
    }
}

#[derive(Debug, Clone)]
pub struct RecordSchema {
    pub file: PathBuf,
    pub name: String,
    pub key: Option<String>,
    pub fields: Vec<Field>,
}

#[derive(Debug, Clone)]
pub struct Field {
    pub name: String,
    pub ty: FieldType,
    pub required: bool,
}

#[derive(Debug, Clone)]
pub enum Source {
    Local {
        path: PathBuf,
        poll_interval: Duration,
    },
    Kinesis(KinesisSource),
    /// `source.s3` or `source.files`.
    Objects(ObjectSource),
}

/// Objects (S3) or files (a local directory), each read once as a stream of records.
#[derive(Debug, Clone)]
pub struct ObjectSource {
    pub store: ObjectStoreAt,
    /// None: by each key's extension.
    pub format: Option<ObjectFormat>,
    /// None: by each key's extension.
    pub compression: Option<Compression>,
    pub start_after: Option<String>,
    pub concurrency: usize,
    pub poll_interval: Duration,
    pub max_object_bytes: u64,
    /// Objects named by S3 event notifications in an SQS queue, instead of a listing.
    pub notifications: Option<ObjectNotifications>,
}

/// `source.s3.notifications`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectNotifications {
    /// The queue's URL, or its name (looked up at start).
    pub queue: String,
    pub visibility_timeout: Duration,
    pub max_receives: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectStoreAt {
    S3 {
        bucket: String,
        /// Without a leading `/`; empty for the whole bucket.
        prefix: String,
        region: Option<String>,
    },
    Files(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectFormat {
    Ndjson,
    Csv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, Clone)]
pub struct KinesisSource {
    /// Name or ARN.
    pub stream: String,
    pub region: Option<String>,
    pub start: StartAt,
    pub poll_interval: Duration,
    /// Records per GetRecords call.
    pub max_records: usize,
    /// Each line of a record is a record of its own.
    pub split_lines: bool,
    /// Enhanced fan-out instead of polling.
    pub fan_out: Option<FanOut>,
}

/// `source.kinesis.fan_out`: the stream consumer and how often its subscriptions renew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanOut {
    pub consumer: String,
    pub renew_after: Duration,
}

/// Where a shard without a checkpoint starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    TrimHorizon,
    Latest,
    /// Microseconds since the epoch.
    AtTimestamp(i64),
}

/// How a table's files are made visible to readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TableFormat {
    /// Parquet files in `year=/month=/day=/hour=` directories, visible once published.
    #[default]
    Hive,
    /// The same files as a Delta Lake table: a commit's files become visible at once, in one
    /// entry of the table's transaction log ([`crate::sink::delta`]).
    Delta,
}

/// Where a table's files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LakeLocation {
    Local { path: PathBuf },
    S3(S3Location),
}

/// An S3 lake: a bucket and a key prefix, with how objects are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Without leading or trailing `/`; empty for the bucket's root.
    pub prefix: String,
    pub region: Option<String>,
    pub kms_key_id: Option<String>,
    pub storage_class: Option<String>,
    pub part_size: usize,
}

impl LakeLocation {
    /// Where `shardlake query` reads an output from: a directory or an `s3://` URL, ending
    /// in `/`.
    pub fn table_url(&self, output: &str) -> String {
        match self {
            LakeLocation::Local { path } => {
                let dir = path.join(output);
                let abs = std::path::absolute(&dir).unwrap_or(dir);
                format!("{}/", abs.display())
            }
            LakeLocation::S3(s3) => format!("s3://{}/{}/", s3.bucket, s3.object_key(output)),
        }
    }
}

impl S3Location {
    /// The object key of a lake key (`<output>/year=…`).
    pub fn object_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }
}

/// Storage classes S3 accepts on upload.
pub const STORAGE_CLASSES: &[&str] = &[
    "STANDARD",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "REDUCED_REDUNDANCY",
];

/// Where a notifier sends alerts.
#[derive(Clone)]
pub enum NotifyTarget {
    Sns {
        topic_arn: String,
    },
    Webhook {
        url: String,
        /// Header values may hold secrets: `Debug` shows the names only.
        headers: Vec<(String, String)>,
    },
    /// An alert action: the device's desired state, through the commands broker.
    Command(Box<CommandAction>),
}

/// `alerts[].action` with the pipeline's `commands:` broker, checked.
#[derive(Debug, Clone)]
pub struct CommandAction {
    pub rule: String,
    pub set: std::collections::BTreeMap<String, serde_json::Value>,
    /// Wall time after which the keys are restored.
    pub for_: Option<std::time::Duration>,
    pub dry_run: bool,
    pub broker: CommandsBroker,
}

/// `commands:`: the broker that carries devices' desired states (alert actions, the console).
#[derive(Debug, Clone)]
pub struct CommandsBroker {
    pub host: String,
    pub port: u16,
    /// CA, certificate and key (PEM); plain TCP without.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    pub client_id: String,
    pub desired_topic: String,
    pub reported_topic: String,
    /// The tenant of devices whose rows name none (the schema has no `tenant` field).
    pub tenant: Option<String>,
}

impl fmt::Debug for NotifyTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sns { topic_arn } => f.debug_struct("Sns").field("topic_arn", topic_arn).finish(),
            Self::Command(a) => a.fmt(f),
            Self::Webhook { headers, .. } => f
                .debug_struct("Webhook")
                .field("url", &"<not shown>")
                .field(
                    "headers",
                    &headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                )
                .finish(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Notifier {
    pub name: String,
    pub target: NotifyTarget,
    /// Microseconds of event time between two messages for the same rule and device.
    pub cooldown: i64,
    /// The rules it sends; `None` for every rule.
    pub rules: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub enum Checkpoints {
    Local {
        path: PathBuf,
    },
    Dynamodb(LeaseTable),
    /// `checkpoints: s3:`: one conditional-put object per pipeline.
    S3 {
        bucket: String,
        /// Without leading or trailing `/`.
        prefix: String,
        region: Option<String>,
    },
}

/// `checkpoints: dynamodb:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTable {
    pub table: String,
    pub region: Option<String>,
    pub failover_time: Duration,
    pub shard_sync_interval: Duration,
    pub max_leases: usize,
}

#[derive(Debug, Clone)]
pub struct EventTime {
    pub field: String,
    pub format: TimeFormat,
    /// Microseconds.
    pub allowed_lateness: i64,
    pub idle_shard_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Rollover {
    pub max_bytes: u64,
    pub max_age: Duration,
}

#[derive(Debug, Clone)]
pub struct Outputs {
    /// None: `raw: false`, no raw table.
    pub raw: Option<String>,
    pub dead_letter: String,
    pub late: String,
    pub alerts: String,
    pub aggregations: Vec<Aggregation>,
    /// Every table's rollover, by table name.
    pub rollover: std::collections::BTreeMap<String, Rollover>,
    /// Every table's lake, by table name (its own `sink`, else the pipeline's `lake`).
    pub sinks: std::collections::BTreeMap<String, LakeLocation>,
    /// Every table's format, by table name (its own `sink.format`, else `lake.format`).
    pub formats: std::collections::BTreeMap<String, TableFormat>,
    /// The column that partitions tables before time (`tenant`), if any: see
    /// [`Outputs::partitioned_by`].
    pub partition_by: Option<String>,
}

impl Outputs {
    /// The column that partitions `table`'s files before time, if any: `partition_by` for
    /// every table but dead letters and alerts (whose rows are not a tenant's own data).
    pub fn partitioned_by(&self, table: &str) -> Option<&str> {
        (table != self.dead_letter && table != self.alerts)
            .then_some(self.partition_by.as_deref())
            .flatten()
    }
}

#[derive(Debug, Clone)]
pub struct Aggregation {
    pub name: String,
    /// Microseconds.
    pub size: i64,
    /// Microseconds; equals `size` for a tumbling window.
    pub slide: i64,
    pub sql: String,
}

#[derive(Debug, Clone)]
pub struct AlertRule {
    /// Position in the file's `alerts:` list, for error messages.
    pub index: usize,
    pub name: String,
    pub check: Check,
    /// Index into `outputs.aggregations` for a window rule.
    pub aggregation: Option<usize>,
}

/// What makes an alert rule fire.
#[derive(Debug, Clone)]
pub enum Check {
    /// A SQL predicate over each record (or each emitted window row).
    When(String),
    /// A detector that learns each series of records.
    Detect(Detector),
}

/// `alerts[].detect`, checked: one state per series (the schema's key plus `by`).
#[derive(Debug, Clone, PartialEq)]
pub struct Detector {
    pub kind: DetectorKind,
    /// SQL over the record; `None` for `silent`, which watches arrivals only.
    pub value: Option<String>,
    /// SQL condition: which records feed the detector.
    pub filter: Option<String>,
    /// Columns besides the key that name a series.
    pub by: Vec<String>,
    /// Readings of a series before it may alert.
    pub warmup: u64,
    /// Microseconds of event time between two alerts of one series.
    pub cooldown: i64,
    /// `silent`: the devices expected to report (`known:`).
    pub known: Option<std::sync::Arc<KnownDevices>>,
}

/// Joins a series key's parts: the device key, then each `by` column's value.
pub const SERIES_SEP: char = '\u{1f}';

/// The devices a `silent` rule expects, read from its `known:` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownDevices {
    pub file: std::path::PathBuf,
    /// Per device: its series key (the key's value, then each `by` column's, joined by
    /// [`SERIES_SEP`]) and the hash key of its partition key (MD5, big-endian, as Kinesis
    /// routes a record to the shard whose hash-key range holds it).
    pub devices: Vec<(String, u128)>,
}

/// The 128-bit hash key Kinesis routes a partition key by: its MD5, big-endian.
pub fn hash_key(partition_key: &str) -> u128 {
    use md5::{Digest, Md5};
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

/// The detector kinds and their parameters. Durations are microseconds of event time.
#[derive(Debug, Clone, PartialEq)]
pub enum DetectorKind {
    /// |value − EWMA mean| / EWMA std above `threshold`.
    Zscore { half_life: f64, threshold: f64 },
    /// |value − median| / (1.4826 MAD) of the last `window` readings above `threshold`.
    Mad { window: usize, threshold: f64 },
    /// Two-sided CUSUM in baseline standard deviations; the baseline follows the readings
    /// with this half-life (readings).
    Cusum { k: f64, h: f64, half_life: f64 },
    /// The value moved by at most `epsilon` for `duration` or for `readings`.
    Stuck {
        duration: Option<i64>,
        readings: Option<u64>,
        epsilon: f64,
    },
    /// A series seen before sent nothing for `after`, judged by the watermark.
    Silent { after: i64 },
    /// |Δvalue| per second of event time between consecutive readings above this.
    Rate { max_per_second: f64 },
}

impl DetectorKind {
    /// The name written in the alerts table's `kind` column.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Zscore { .. } => "zscore",
            Self::Mad { .. } => "mad",
            Self::Cusum { .. } => "cusum",
            Self::Stuck { .. } => "stuck",
            Self::Silent { .. } => "silent",
            Self::Rate { .. } => "rate",
        }
    }
}

/// `console:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Console {
    pub auth: ConsoleAuth,
    /// Per tenant: the query API's limits (rows, time), each `None` for the console's own.
    pub tenant_limits: std::collections::BTreeMap<String, QueryLimits>,
}

/// A tenant's query limits (`console.query.tenants`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryLimits {
    pub max_rows: Option<usize>,
    pub timeout: Option<Duration>,
}

/// How console users sign in, and how their tenant and role are read from their tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleAuth {
    /// `None` for `auth: none` (loopback only).
    pub issuer: Option<Issuer>,
    /// The claim holding the tenant (e.g. `custom:tenant`).
    pub tenant_claim: String,
    /// The claim holding the groups (e.g. `cognito:groups`).
    pub groups_claim: String,
    pub roles: RoleGroups,
}

impl ConsoleAuth {
    /// Where the console takes the issuer's answer; every `redirect_url` ends in it.
    pub const CALLBACK_PATH: &'static str = "/auth/callback";
}

/// Group names of each role (see `console.roles` in the file's docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleGroups {
    /// Empty: every signed-in user may view.
    pub viewer: Vec<String>,
    pub operator: Vec<String>,
    pub admin: Vec<String>,
}

/// Which kind of issuer: decides the token rules (Cognito's `token_use` and `client_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssuerKind {
    Oidc,
    Cognito,
}

/// An OpenID Connect issuer, Cognito's included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issuer {
    pub kind: IssuerKind,
    /// What the tokens' `iss` must be.
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    /// The console's `/auth/callback` URL.
    pub redirect_url: String,
    pub scopes: Vec<String>,
    /// The signing keys' URL; `None`: from discovery.
    pub jwks_url: Option<String>,
    /// The `aud` a Bearer access token must hold (OIDC; Cognito checks `client_id`).
    pub audience: String,
    /// Endpoints known without discovery (Cognito's hosted UI); `None`: from
    /// `<issuer>/.well-known/openid-configuration`.
    pub endpoints: Option<Endpoints>,
}

/// An issuer's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub authorization: String,
    pub token: String,
    pub userinfo: Option<String>,
}

/// A value that must never be shown: `Debug` prints `<not shown>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<not shown>")
    }
}

impl Pipeline {
    /// The event-time field's index among the schema's fields.
    pub fn event_field_index(&self) -> usize {
        self.schema
            .fields
            .iter()
            .position(|f| f.name == self.event_time.field)
            .expect("validated: the event-time field is in the schema")
    }

    /// The schema field that names a record's tenant: a field called `tenant`, if the
    /// schema has one (the console groups and, with sign-in, scopes by it).
    pub fn tenant_field(&self) -> Option<&str> {
        self.schema
            .fields
            .iter()
            .find(|f| f.name == crate::columns::TENANT)
            .map(|f| f.name.as_str())
    }

    /// Every table name, in a fixed order.
    pub fn table_names(&self) -> Vec<&str> {
        let o = &self.outputs;
        let mut v: Vec<&str> = o.raw.iter().map(String::as_str).collect();
        v.extend([o.dead_letter.as_str(), o.late.as_str(), o.alerts.as_str()]);
        v.extend(o.aggregations.iter().map(|a| a.name.as_str()));
        v
    }

    /// A problem at `field` of this pipeline file, for checks made after loading (SQL).
    pub fn problem(
        &self,
        field: &str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Problem {
        let mut p = Problems::new(&self.file, &self.lines);
        p.add(field, message, fix);
        p.list.remove(0)
    }
}
