//! The pipeline and schema files as the user writes them. Every field carries its doc; the
//! defaults are functions so they show up in one place. Unknown keys are errors; the loader
//! reports all of them at once, each with its line and the keys allowed there.

use serde::Deserialize;

/// A pipeline file (`pipelines/*.yaml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Pipeline name: `[a-z0-9_-]+`. Names the checkpoint namespace and prefixes Athena tables.
    pub name: String,
    /// Record schema file, relative to this pipeline file (e.g. `../schemas/well-reading.yaml`).
    pub schema: String,
    /// Where records come from.
    pub source: SourceFile,
    /// Where the Parquet tables go.
    pub lake: LakeFile,
    /// Where checkpoints and pending commits are kept.
    pub checkpoints: CheckpointsFile,
    /// How event time is read and when windows close.
    pub event_time: EventTimeFile,
    /// Per-record limits.
    #[serde(default)]
    pub limits: LimitsFile,
    /// When open files are closed and committed (all outputs commit together).
    #[serde(default)]
    pub rollover: RolloverFile,
    /// The tables this pipeline writes.
    #[serde(default)]
    pub outputs: OutputsFile,
    /// Alert rules, written to the `alerts` output.
    #[serde(default)]
    pub alerts: Vec<AlertFile>,
    /// Where alerts are also sent (SNS topics, webhooks), besides the alerts table.
    #[serde(default)]
    pub notifiers: Vec<NotifierFile>,
    /// Where alert actions (`alerts[].action`) send devices their desired state.
    #[serde(default)]
    pub commands: Option<CommandsFile>,
    /// The console (`shardlake console`): who may sign in, and with which role.
    #[serde(default)]
    pub console: ConsoleFile,
    /// Which record fields the channel proves (the device's certificate, through the MQTT
    /// topic its policy allows and the partition key the IoT rule makes of that topic). A
    /// record that claims otherwise goes to dead-letter as `identity_mismatch`.
    #[serde(default)]
    pub identity: Option<IdentityFile>,
    /// Compaction of the Delta tables inside the worker (`shardlake compact` on a timer).
    #[serde(default)]
    pub compaction: Option<CompactionFile>,
}

/// `compaction:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompactionFile {
    /// How often (default 15m).
    #[serde(default = "default_compaction_every")]
    pub every: String,
    /// A partition is closed once its hour ended this long ago (default 1h).
    #[serde(default = "default_older_than")]
    pub older_than: String,
    /// Size of the compacted files (default 256MiB).
    #[serde(default = "default_target_size")]
    pub target_size: String,
    /// Cluster rows by these columns (Z-order) in each table that has them.
    #[serde(default)]
    pub zorder: Vec<String>,
    /// Sort rows by these columns in each table that has them (instead of `zorder`).
    #[serde(default)]
    pub sort: Vec<String>,
}

fn default_compaction_every() -> String {
    "15m".into()
}
fn default_older_than() -> String {
    "1h".into()
}
fn default_target_size() -> String {
    "256MiB".into()
}

/// `identity:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// Where the proof is: `partition_key`, the key each Kinesis record was put with (the IoT
    /// rule's `PartitionKey`, or `shardlake bridge --partition-key`).
    pub from: String,
    /// How that key is made of record fields: `{field}` for a field's value, anything else
    /// as written (default `{tenant}/{device_id}`, the rule's `${topic(2)}/${topic(3)}`).
    #[serde(default = "default_identity_key")]
    pub key: String,
}

fn default_identity_key() -> String {
    "{tenant}/{device_id}".into()
}

/// `console:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleFile {
    /// How users sign in: `none` (the default; only allowed when the console listens on a
    /// loopback address), `{oidc: {...}}` or `{cognito: {...}}`.
    #[serde(default)]
    pub auth: ConsoleAuthFile,
    /// Which token claims hold the user's tenant and groups.
    #[serde(default)]
    pub claims: ClaimsFile,
    /// Which groups make a user a viewer, an operator or a platform admin.
    #[serde(default)]
    pub roles: RolesFile,
    /// Limits of the query API per tenant, beyond `shardlake console`'s `--query-rows` and
    /// `--query-timeout` (which bound everyone): e.g. `{tenants: {acme: {max_rows: 1000,
    /// timeout: 5s}}}`.
    #[serde(default)]
    pub query: ConsoleQueryFile,
}

/// `console.query:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleQueryFile {
    /// Per tenant (as the tenant claim names it): its own, lower, limits.
    #[serde(default)]
    pub tenants: std::collections::BTreeMap<String, TenantQueryFile>,
}

/// `console.query.tenants.<tenant>:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQueryFile {
    /// Rows a query of this tenant returns at most.
    #[serde(default)]
    pub max_rows: Option<u64>,
    /// How long a query of this tenant may run (e.g. `5s`).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// `console.auth:` — exactly one kind.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleAuthFile {
    /// No sign-in: every request is a local platform admin. Refused unless the console
    /// listens on a loopback address.
    #[default]
    None,
    /// Any OpenID Connect issuer (authorization-code flow with PKCE); its endpoints come from
    /// `<issuer>/.well-known/openid-configuration`.
    Oidc(OidcFile),
    /// An Amazon Cognito user pool and its hosted UI.
    Cognito(CognitoFile),
}

/// `console.auth.oidc:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcFile {
    /// The issuer URL, exactly as the tokens' `iss` says (e.g. `https://login.example.com`).
    pub issuer: String,
    /// The console's client id at the issuer.
    pub client_id: String,
    /// The client secret; write `${VAR}` so it stays out of the file. Never logged.
    pub client_secret: String,
    /// Where the issuer sends the browser back: the console's `/auth/callback`, e.g.
    /// `https://console.example.com/auth/callback`.
    pub redirect_url: String,
    /// Scopes asked for (default `openid profile email`); must include `openid`.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// Where the signing keys are, if not where discovery says.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// The `aud` a Bearer access token must carry (default: `client_id`).
    #[serde(default)]
    pub audience: Option<String>,
}

/// `console.auth.cognito:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CognitoFile {
    /// The user pool, e.g. `eu-west-1_AbCdEf123`.
    pub user_pool_id: String,
    /// The pool's region, e.g. `eu-west-1`.
    pub region: String,
    /// The app client's id.
    pub client_id: String,
    /// The app client's secret, if it has one; write `${VAR}`. Never logged.
    #[serde(default)]
    pub client_secret: Option<String>,
    /// The hosted UI's domain, e.g. `wells.auth.eu-west-1.amazoncognito.com` (or a custom
    /// domain, or its `https://` URL).
    pub domain: String,
    /// The console's `/auth/callback`, as registered on the app client.
    pub redirect_url: String,
    /// Scopes asked for (default `openid profile email`); must include `openid`.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// Where the signing keys are (default
    /// `https://cognito-idp.<region>.amazonaws.com/<pool>/.well-known/jwks.json`).
    #[serde(default)]
    pub jwks_url: Option<String>,
}

/// `console.claims:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimsFile {
    /// The claim holding the user's tenant (default `custom:tenant`).
    #[serde(default)]
    pub tenant: Option<String>,
    /// The claim holding the user's groups, a list (default `cognito:groups` with Cognito,
    /// `groups` otherwise).
    #[serde(default)]
    pub groups: Option<String>,
}

/// `console.roles:`: group names. A user in an `admin` group is a platform admin (every
/// tenant), else one in an `operator` group an operator, else a viewer; with `viewer` set, a
/// user in none of the listed groups is refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolesFile {
    /// Groups whose members may view (default: empty, every signed-in user may).
    #[serde(default)]
    pub viewer: Vec<String>,
    /// Groups whose members are operators (default `[operators]`).
    #[serde(default = "default_operator_groups")]
    pub operator: Vec<String>,
    /// Groups whose members are platform admins (default `[platform-admins]`).
    #[serde(default = "default_admin_groups")]
    pub admin: Vec<String>,
}

impl Default for RolesFile {
    fn default() -> Self {
        Self {
            viewer: Vec::new(),
            operator: default_operator_groups(),
            admin: default_admin_groups(),
        }
    }
}

fn default_operator_groups() -> Vec<String> {
    vec!["operators".into()]
}

fn default_admin_groups() -> Vec<String> {
    vec!["platform-admins".into()]
}

/// `source:` — exactly one kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "snake_case")]
pub enum SourceFile {
    /// A local stream: a directory of per-shard append-only NDJSON files
    /// (`shardId-000000000000.ndjson`, ...), as `shardlake-agent` writes it.
    Local {
        /// The stream directory.
        path: String,
        /// How often a caught-up shard looks for new lines (default `200ms`).
        #[serde(default = "default_poll_interval")]
        poll_interval: String,
    },
    /// A Kinesis Data Stream, read with GetRecords (one task per shard). The endpoint comes
    /// from `AWS_ENDPOINT_URL_KINESIS` / `AWS_ENDPOINT_URL`, credentials from the default
    /// chain.
    Kinesis {
        /// The stream's name or ARN.
        stream: String,
        /// Region (default: from the environment, `AWS_REGION` or the profile).
        #[serde(default)]
        region: Option<String>,
        /// Where a shard with no checkpoint starts: `trim_horizon` (the oldest record kept,
        /// the default), `latest` (only records written from now on), or `at_timestamp`.
        #[serde(default = "default_start")]
        start: String,
        /// With `start: at_timestamp`: an RFC 3339 time.
        #[serde(default)]
        timestamp: Option<String>,
        /// How long a shard that is caught up waits before asking again (default `1s`;
        /// GetRecords allows 5 calls a second per shard, shared by every consumer).
        #[serde(default = "default_kinesis_poll")]
        poll_interval: String,
        /// Records per GetRecords call, 1 to 10000 (default 10000).
        #[serde(default = "default_max_records")]
        max_records: u32,
        /// A record may hold several newline-separated JSON objects (shardlake-agent's MQTT
        /// messages, put on the stream whole by the IoT rule): each line becomes a record of
        /// its own, checkpointed by its index like a KPL user record (default false).
        #[serde(default)]
        split_lines: bool,
        /// Enhanced fan-out: records pushed over `SubscribeToShard` to a registered stream
        /// consumer of this pipeline's own (its own 2 MB/s per shard, ~70 ms delivery),
        /// instead of polling GetRecords (the default).
        #[serde(default)]
        fan_out: Option<FanOutFile>,
    },
    /// Objects under a prefix of an S3 bucket (`bucket`, `prefix`, `region`), each read once
    /// as a stream of records (a backfill, a gateway's upload, a historian's export). The
    /// endpoint comes from `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, credentials from the
    /// default chain.
    S3(ObjectsFile),
    /// Files under a local directory (`path`, recursively), read like `s3` objects: the same
    /// formats, positions and exactly-once per file.
    Files(ObjectsFile),
}

/// How `source.s3` and `source.files` read their objects.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectsFile {
    /// `s3` only: the bucket.
    #[serde(default)]
    pub bucket: Option<String>,
    /// `s3` only: only keys under this prefix (default: the whole bucket).
    #[serde(default)]
    pub prefix: String,
    /// `s3` only: the region (default: from the environment, `AWS_REGION` or the profile).
    #[serde(default)]
    pub region: Option<String>,
    /// `files` only: the directory.
    #[serde(default)]
    pub path: Option<String>,
    /// `ndjson` (one JSON record per line; shardlake-agent's batches), `csv` (a header row
    /// naming schema fields), or `auto` (the default: by the key's extension once a
    /// compression suffix is taken off: `.ndjson`, `.jsonl`, `.json`, `.txt` are NDJSON,
    /// `.csv` is CSV; any other object goes to dead-letter whole as `unknown_format`).
    #[serde(default = "default_auto")]
    pub format: String,
    /// `none`, `gzip`, `zstd`, or `auto` (the default: `.gz` is gzip, `.zst`/`.zstd` zstd).
    #[serde(default = "default_auto")]
    pub compression: String,
    /// Only keys after this one, in key order (default: all).
    #[serde(default)]
    pub start_after: Option<String>,
    /// Objects read at once (default 4).
    #[serde(default = "default_object_concurrency")]
    pub concurrency: u32,
    /// How often the prefix is listed again for new objects (default `30s`).
    #[serde(default = "default_list_interval")]
    pub poll_interval: String,
    /// An object whose stored size is above this goes to dead-letter whole as
    /// `object_too_large` (default `10GiB`). Memory does not depend on it: objects stream.
    #[serde(default = "default_max_object_bytes")]
    pub max_object_bytes: String,
    /// `s3` only: take the objects to read from S3 event notifications in an SQS queue
    /// instead of listing the prefix.
    #[serde(default)]
    pub notifications: Option<NotificationsFile>,
}

/// `source.s3.notifications:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationsFile {
    /// The queue's URL (or name) that the bucket's event notifications go to.
    pub queue: String,
    /// How long a message stays invisible to other receivers; extended while its objects are
    /// read (default `5m`).
    #[serde(default = "default_visibility_timeout")]
    pub visibility_timeout: String,
    /// A message received this many times without its objects committed is given up: its
    /// objects go to dead-letter whole, the message is deleted (default 5).
    #[serde(default = "default_max_receives")]
    pub max_receives: u32,
}

fn default_visibility_timeout() -> String {
    "5m".into()
}

fn default_max_receives() -> u32 {
    5
}

fn default_auto() -> String {
    "auto".into()
}

fn default_object_concurrency() -> u32 {
    4
}

fn default_list_interval() -> String {
    "30s".into()
}

fn default_max_object_bytes() -> String {
    "10GiB".into()
}

/// `source.kinesis.fan_out:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FanOutFile {
    /// The stream consumer's name: registered if it does not exist, reused if it does, never
    /// deregistered by shardlake (`aws kinesis deregister-stream-consumer` does that).
    pub consumer: String,
    /// How long a subscription is used before it is renewed (default `5m`, the most Kinesis
    /// allows; shorter only to test renewals).
    #[serde(default = "default_renew_after")]
    pub renew_after: String,
}

fn default_renew_after() -> String {
    "5m".into()
}

fn default_start() -> String {
    "trim_horizon".into()
}
fn default_max_records() -> u32 {
    10_000
}
fn default_kinesis_poll() -> String {
    "1s".into()
}

/// `lake:` (and a table's own `sink:`) — exactly one kind, `local` or `s3`, and the table
/// format.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeFile {
    /// A local directory; each output is a subdirectory.
    #[serde(default)]
    pub local: Option<LocalLakeFile>,
    /// An S3 bucket: objects `<prefix>/<output>/year=…/part-….parquet`, staged as multipart
    /// uploads and completed when their commit publishes.
    #[serde(default)]
    pub s3: Option<S3LakeFile>,
    /// `hive` (default): Parquet files in `year=/month=/day=/hour=` directories, visible as
    /// they are published. `delta`: the same files, each output a Delta Lake table whose
    /// transaction log makes a commit's files visible at once.
    #[serde(default)]
    pub format: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalLakeFile {
    /// The lake directory.
    pub path: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3LakeFile {
    /// The bucket (it must exist).
    pub bucket: String,
    /// Key prefix, e.g. `lake/well-telemetry` (default: the bucket's root).
    #[serde(default)]
    pub prefix: String,
    /// Region (default: from the environment, `AWS_REGION` or the profile).
    #[serde(default)]
    pub region: Option<String>,
    /// SSE-KMS key id or ARN; without it the bucket's default encryption applies.
    #[serde(default)]
    pub kms_key_id: Option<String>,
    /// Storage class, e.g. `STANDARD_IA` or `INTELLIGENT_TIERING` (default `STANDARD`).
    #[serde(default)]
    pub storage_class: Option<String>,
    /// Multipart part size: at least 5MiB (default 8MiB). At most two parts per open
    /// file are in memory or in flight.
    #[serde(default = "default_part_size")]
    pub part_size: String,
}

fn default_part_size() -> String {
    "8MiB".into()
}

/// One alert notifier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifierFile {
    /// Name, for logs and metrics.
    pub name: String,
    /// Publish to an SNS topic.
    #[serde(default)]
    pub sns: Option<SnsFile>,
    /// POST JSON to an HTTP(S) URL.
    #[serde(default)]
    pub webhook: Option<WebhookFile>,
    /// At most one message per rule and device per this much event time (default `5m`).
    #[serde(default = "default_cooldown")]
    pub cooldown: String,
    /// The rules this notifier sends (default: every rule).
    #[serde(default)]
    pub rules: Option<Vec<String>>,
}

fn default_cooldown() -> String {
    "5m".into()
}

/// `sns:` of a notifier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnsFile {
    /// The topic's ARN.
    pub topic_arn: String,
}

/// `webhook:` of a notifier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookFile {
    /// `https://…` (or `http://` for a local receiver).
    pub url: String,
    /// Extra request headers; values usually come from `${VAR}`s and are never logged.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

/// `checkpoints:` — exactly one kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointsFile {
    /// A local directory holding `<pipeline>/checkpoint.json` (atomic rename).
    Local {
        /// The state directory.
        path: String,
    },
    /// A DynamoDB lease table shared by many workers (the KCL's model): one item per shard
    /// holding its owner, lease counter and checkpoint. Only with a Kinesis source. The
    /// endpoint comes from `AWS_ENDPOINT_URL_DYNAMODB` / `AWS_ENDPOINT_URL`.
    Dynamodb {
        /// The table (one per pipeline). Created (on-demand capacity) if missing.
        table: String,
        /// Region (default: from the environment).
        #[serde(default)]
        region: Option<String>,
        /// A lease whose counter did not change for this long is free to take (default
        /// `10s`). Workers renew theirs three times per period.
        #[serde(default = "default_failover_time")]
        failover_time: String,
        /// How often the stream's shards are listed again to find new ones (default `60s`).
        #[serde(default = "default_shard_sync_interval")]
        shard_sync_interval: String,
        /// The most leases one worker holds (default 100; a commit writes every one of
        /// them in one DynamoDB transaction, which allows 100 items).
        #[serde(default = "default_max_leases")]
        max_leases: u32,
    },
    /// One object, `<prefix>/<pipeline>/checkpoint.json`, in an S3 bucket: a single worker's
    /// checkpoints that outlive its machine (an ECS task reading objects). Written with
    /// conditional puts, so a second worker on the same checkpoints fails at its first
    /// commit instead of overwriting the first's.
    S3 {
        bucket: String,
        #[serde(default)]
        prefix: String,
        #[serde(default)]
        region: Option<String>,
    },
}

fn default_failover_time() -> String {
    "10s".into()
}

fn default_shard_sync_interval() -> String {
    "60s".into()
}

fn default_max_leases() -> u32 {
    100
}

/// `event_time:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTimeFile {
    /// The schema field holding event time; must be of type `timestamp`.
    pub field: String,
    /// How that field is written: `rfc3339` (e.g. `2026-01-01T10:00:00.123+02:00`) or
    /// `epoch_millis` (a number).
    #[serde(default)]
    pub format: TimeFormat,
    /// How far behind the newest event time a record may arrive and still count in its window
    /// (default `30s`). Later records go to the `late` output.
    #[serde(default = "default_lateness")]
    pub allowed_lateness: String,
    /// A shard with no new records for this long (wall clock) stops holding the watermark back
    /// (default `60s`).
    #[serde(default = "default_idle")]
    pub idle_shard_timeout: String,
}

/// Event-time encodings.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormat {
    /// RFC 3339 text with an offset; a missing offset means UTC.
    #[default]
    Rfc3339,
    /// Milliseconds since the Unix epoch, as a JSON number.
    EpochMillis,
}

/// `limits:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Larger records go to dead-letter (default `1MiB`, Kinesis' own record limit).
    #[serde(default = "default_max_record")]
    pub max_record_bytes: String,
    /// Records whose event time is further ahead of the wall clock go to dead-letter, so one
    /// bad clock cannot close every window (default `1h`).
    #[serde(default = "default_future")]
    pub max_future_skew: String,
    /// Records of open windows an aggregation holds before folding them into one aggregate
    /// state per window and group (default 100000): with the states, what bounds its memory,
    /// whatever the read rate. A SELECT that cannot be merged keeps its open windows' records.
    #[serde(default = "default_window_buffer")]
    pub window_buffer_records: u64,
    /// Series the detectors track per worker (default 100000); past it, the least recently
    /// seen are forgotten (and counted).
    #[serde(default = "default_detector_series")]
    pub detector_series: u64,
}

impl Default for LimitsFile {
    fn default() -> Self {
        Self {
            max_record_bytes: default_max_record(),
            max_future_skew: default_future(),
            window_buffer_records: default_window_buffer(),
            detector_series: default_detector_series(),
        }
    }
}

/// `rollover:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloverFile {
    /// Commit once any open file reaches this size (default `128MiB`).
    #[serde(default = "default_roll_bytes")]
    pub max_bytes: String,
    /// Commit once the oldest uncommitted record was read this long ago (default `5m`).
    #[serde(default = "default_roll_age")]
    pub max_age: String,
}

impl Default for RolloverFile {
    fn default() -> Self {
        Self {
            max_bytes: default_roll_bytes(),
            max_age: default_roll_age(),
        }
    }
}

/// `outputs:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputsFile {
    /// Every valid record, with `_shard_id` and `_sequence_number`; `raw: false` writes no
    /// raw table (aggregates, alerts, late and dead-letter records only).
    #[serde(default = "default_raw_on", deserialize_with = "raw_table")]
    pub raw: Option<TableFile>,
    /// Records that could not be decoded: raw bytes, shard, sequence number, reason.
    #[serde(default = "default_dead_letter")]
    pub dead_letter: TableFile,
    /// Records that arrived after their window was emitted, tagged with the aggregation.
    #[serde(default = "default_late")]
    pub late: TableFile,
    /// Alerts from every rule.
    #[serde(default = "default_alerts")]
    pub alerts: TableFile,
    /// Windowed aggregations.
    #[serde(default)]
    pub aggregations: Vec<AggregationFile>,
    /// `[tenant]`: every table with a `tenant` column is partitioned by it before time,
    /// `<table>/tenant=<t>/year=…/`, so a tenant's files can be granted, read and pruned
    /// apart. The tenant must be one `identity:` proves; dead letters (unproven) and alerts
    /// stay unpartitioned.
    #[serde(default)]
    pub partition_by: Vec<String>,
}

impl Default for OutputsFile {
    fn default() -> Self {
        Self {
            raw: default_raw_on(),
            dead_letter: default_dead_letter(),
            late: default_late(),
            alerts: default_alerts(),
            aggregations: Vec::new(),
            partition_by: Vec::new(),
        }
    }
}

/// A plain table output.
// `rollover` and `sink` are declared again in `AggregationFile`, not shared through
// `#[serde(flatten)]`: with flatten, an unknown key's message loses the list of keys allowed
// there, and an error inside `rollover` or `sink` loses its path (serde buffers flattened
// fields), so messages, fields and lines would change.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableFile {
    /// Table (and directory) name: `[a-z_][a-z0-9_]*`.
    pub name: String,
    /// This table's own rollover; what it leaves out comes from the pipeline's `rollover`.
    #[serde(default)]
    pub rollover: Option<RolloverOverride>,
    /// Where this table goes, if not to the pipeline's `lake` (same form as `lake:`).
    #[serde(default)]
    pub sink: Option<LakeFile>,
}

/// A table's rollover. All tables commit together: the first table to reach its size or age
/// commits every table, so a short age here makes every table's files roll that often.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloverOverride {
    /// Commit once this table's largest open file reaches this size.
    #[serde(default)]
    pub max_bytes: Option<String>,
    /// Commit once this table's oldest open file is this old.
    #[serde(default)]
    pub max_age: Option<String>,
}

/// One windowed aggregation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregationFile {
    /// Table name: `[a-z_][a-z0-9_]*`.
    pub name: String,
    /// The window.
    pub window: WindowFile,
    /// SQL over `records`, whose rows carry `window_start` and `window_end` of each window
    /// they fall in. It must select `window_start` (the table is partitioned by it), e.g.
    /// `SELECT window_start, window_end, device_id, avg(pressure_psi) AS pressure_avg FROM
    /// records GROUP BY window_start, window_end, device_id`.
    pub sql: String,
    /// This table's own rollover (see `TableFile::rollover`).
    #[serde(default)]
    pub rollover: Option<RolloverOverride>,
    /// Where this table goes, if not to the pipeline's `lake` (same form as `lake:`).
    #[serde(default)]
    pub sink: Option<LakeFile>,
}

/// A tumbling window (`size`) or a hopping one (`size` and `slide`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowFile {
    /// Window length, e.g. `1m`.
    pub size: String,
    /// Hop: a new window starts every `slide`; `size` must be a multiple of it.
    #[serde(default)]
    pub slide: Option<String>,
}

/// One alert rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertFile {
    /// Rule name, written in the `rule` column.
    pub name: String,
    /// A SQL predicate. Without `aggregation`, over each record's fields; with it, over each
    /// emitted window row of that aggregation (e.g. a z-score of the window's max).
    #[serde(default)]
    pub when: Option<String>,
    /// Name of the aggregation whose rows this rule checks.
    #[serde(default)]
    pub aggregation: Option<String>,
    /// A detector that learns each series (instead of `when`).
    #[serde(default)]
    pub detect: Option<DetectFile>,
    /// Set the alert's device's desired state when the rule fires.
    #[serde(default)]
    pub action: Option<ActionFile>,
}

/// `alerts[].action`: settings a device is commanded to take when the rule fires for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionFile {
    /// Desired-state keys and values (`sensors.<name>.interval`, `sensors.<name>.enabled`,
    /// `outputs.<name>`), as `shardlake device set` takes them.
    pub set: std::collections::BTreeMap<String, serde_json::Value>,
    /// After this long (wall time) the keys return to what they were before (default: never).
    #[serde(default, rename = "for")]
    pub for_: Option<String>,
    /// At most one command per device per this much event time (default: `for`, else 15m): a
    /// flapping signal does not flap a valve.
    #[serde(default)]
    pub cooldown: Option<String>,
    /// Only log and count what would be sent.
    #[serde(default)]
    pub dry_run: bool,
}

/// `commands:`: the broker alert actions publish desired states to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsFile {
    pub mqtt: CommandsMqttFile,
    #[serde(default = "default_desired_topic")]
    pub desired_topic: String,
    #[serde(default = "default_reported_topic")]
    pub reported_topic: String,
    /// The tenant of devices whose rows name none (the schema has no `tenant` field).
    #[serde(default)]
    pub tenant: Option<String>,
}

fn default_desired_topic() -> String {
    crate::agent::commands::DESIRED_TOPIC.into()
}
fn default_reported_topic() -> String {
    crate::agent::commands::REPORTED_TOPIC.into()
}

/// `commands.mqtt`: IoT Core's endpoint (or Mosquitto), TLS with this service's certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsMqttFile {
    pub host: String,
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    #[serde(default)]
    pub ca: Option<String>,
    #[serde(default)]
    pub cert: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default = "default_commands_client")]
    pub client_id: String,
}

fn default_mqtt_port() -> u16 {
    8883
}
fn default_commands_client() -> String {
    "shardlake-device-cli-commands".into()
}

/// `alerts[].detect`: a detector kind and its parameters. Every parameter is optional; the
/// ones that do not belong to the kind are refused when the rule is resolved.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectFile {
    /// `zscore`, `mad`, `cusum`, `stuck`, `silent` or `rate`.
    pub kind: String,
    /// A SQL expression over the record: the value the detector watches.
    #[serde(default)]
    pub value: Option<String>,
    /// A SQL condition: which records feed the detector (default: every record).
    #[serde(default, rename = "where")]
    pub filter: Option<String>,
    /// Columns that split a device into several series (e.g. `[sensor, field]`).
    #[serde(default)]
    pub by: Vec<String>,
    /// Readings of a series before it may alert.
    #[serde(default)]
    pub warmup: Option<u64>,
    /// Event time between two alerts of one series.
    #[serde(default)]
    pub cooldown: Option<String>,
    #[serde(default)]
    pub half_life: Option<f64>,
    #[serde(default)]
    pub threshold: Option<f64>,
    #[serde(default)]
    pub window: Option<u64>,
    #[serde(default)]
    pub k: Option<f64>,
    #[serde(default)]
    pub h: Option<f64>,
    #[serde(default, rename = "for")]
    pub for_: Option<String>,
    #[serde(default)]
    pub readings: Option<u64>,
    #[serde(default)]
    pub epsilon: Option<f64>,
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub max_per_second: Option<f64>,
    /// `silent`: the devices expected to report, so one that never did is found too.
    #[serde(default)]
    pub known: Option<KnownFile>,
}

/// `alerts[].detect.known`: a CSV file of the devices a `silent` rule expects.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownFile {
    /// The CSV file, relative to the pipeline file: a header line, then a device a line. Its
    /// columns: the schema's key, each `by` column of the rule, and what `partition_key` names.
    pub file: String,
    /// How a device's records are keyed on the stream, from the file's columns (`{column}`;
    /// default: `identity.key`). It says which shard, and so which worker, watches a device
    /// that never reported: the one whose hash-key range holds the key's MD5, as Kinesis routes.
    #[serde(default)]
    pub partition_key: Option<String>,
}

/// A record schema file (`schemas/*.yaml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaFile {
    /// Schema name.
    pub name: String,
    /// The field that identifies the device (written as the alert key).
    #[serde(default)]
    pub key: Option<String>,
    /// The fields, in column order.
    pub fields: Vec<FieldFile>,
}

/// One field of a record.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldFile {
    /// JSON key and column name: `[a-z_][a-z0-9_]*`.
    pub name: String,
    /// Column type.
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// A record without this field (or with `null`) goes to dead-letter.
    #[serde(default)]
    pub required: bool,
}

/// Column types.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    String,
    Int32,
    Int64,
    Float32,
    Float64,
    Bool,
    /// Stored as `TIMESTAMP(MICROS, UTC)`.
    Timestamp,
}

fn default_poll_interval() -> String {
    "200ms".into()
}
fn default_lateness() -> String {
    "30s".into()
}
fn default_idle() -> String {
    "60s".into()
}
fn default_max_record() -> String {
    "1MiB".into()
}
fn default_future() -> String {
    "1h".into()
}
fn default_detector_series() -> u64 {
    100_000
}

fn default_window_buffer() -> u64 {
    100_000
}
fn default_roll_bytes() -> String {
    "128MiB".into()
}
fn default_roll_age() -> String {
    "5m".into()
}
fn default_raw_on() -> Option<TableFile> {
    Some(TableFile {
        name: "records".into(),
        rollover: None,
        sink: None,
    })
}

/// `raw:` is a table, or `false` for none (`true` is the default table).
fn raw_table<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<TableFile>, D::Error> {
    struct Raw;
    impl<'de> serde::de::Visitor<'de> for Raw {
        type Value = Option<TableFile>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a table (`{name: records}`) or `false` for no raw table")
        }
        fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<Self::Value, E> {
            Ok(if on { default_raw_on() } else { None })
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            TableFile::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }
    d.deserialize_any(Raw)
}
fn default_dead_letter() -> TableFile {
    TableFile {
        name: "dead_letter".into(),
        rollover: None,
        sink: None,
    }
}
fn default_late() -> TableFile {
    TableFile {
        name: "late".into(),
        rollover: None,
        sink: None,
    }
}
fn default_alerts() -> TableFile {
    TableFile {
        name: "alerts".into(),
        rollover: None,
        sink: None,
    }
}
