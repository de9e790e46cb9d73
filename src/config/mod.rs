//! Pipeline and schema configuration: loading, `${VAR}` substitution, and validation that
//! reports every problem at once with the file, the line, the field and the fix.
//!
//! Loading goes YAML → a JSON value tree (so `${VAR}` is replaced in values, never in keys)
//! → the typed [`types`] → [`Pipeline`], whose values are parsed and checked.

mod types;
mod yaml_index;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use types::*;
pub use types::{FieldType, TimeFormat};
pub use yaml_index::LineIndex;

/// Columns the engine adds; a schema field may not use these names.
pub const RESERVED_COLUMNS: &[&str] = &[
    "year",
    "month",
    "day",
    "hour",
    "window_start",
    "window_end",
    "_shard_id",
    "_sequence_number",
    "aggregation",
];

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// The field's path, e.g. `outputs.aggregations[0].window.size`.
    pub field: String,
    pub message: String,
    /// What to write instead.
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)?;
        if !self.fix.is_empty() {
            write!(f, "\n    fix: {}", self.fix)?;
        }
        Ok(())
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "{n} problem{} in the configuration:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Collects problems for one file.
pub struct Problems<'a> {
    file: &'a Path,
    lines: &'a LineIndex,
    pub list: Vec<Problem>,
}

impl<'a> Problems<'a> {
    pub fn new(file: &'a Path, lines: &'a LineIndex) -> Self {
        Self {
            file,
            lines,
            list: Vec::new(),
        }
    }

    pub fn add(&mut self, field: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.list.push(Problem {
            file: self.file.to_path_buf(),
            line: self.lines.line_of(field),
            field: field.to_string(),
            message: message.into(),
            fix: fix.into(),
        });
    }

    pub fn duration(&mut self, field: &str, text: &str) -> Duration {
        humantime::parse_duration(text.trim()).unwrap_or_else(|e| {
            self.add(
                field,
                format!("`{text}` is not a duration ({e})"),
                "write e.g. 500ms, 30s, 5m or 1h",
            );
            Duration::ZERO
        })
    }

    pub fn bytes(&mut self, field: &str, text: &str) -> u64 {
        parse_bytes(text).unwrap_or_else(|| {
            self.add(
                field,
                format!("`{text}` is not a size"),
                "write e.g. 512KiB, 64MiB or 1GiB",
            );
            0
        })
    }

    pub fn ident(&mut self, field: &str, name: &str) {
        if !is_ident(name) {
            self.add(
                field,
                format!("`{name}` is not a valid name"),
                "use lowercase letters, digits and `_`, starting with a letter or `_` (Athena and SQL need that)",
            );
        }
    }
}

pub fn is_ident(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

/// `128MiB`, `64 KiB`, `1GB`, `1000`.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" => 1 << 10,
        "mb" => 1_000_000,
        "mib" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Looks up environment variables for `${VAR}`; tests pass their own.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

// ---------------------------------------------------------------- resolved configuration

/// A loaded, validated pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub file: PathBuf,
    pub name: String,
    pub schema: RecordSchema,
    pub source: Source,
    pub lake: Lake,
    pub checkpoints: Checkpoints,
    pub event_time: EventTime,
    pub max_record_bytes: usize,
    /// Microseconds.
    pub max_future_skew: i64,
    /// Records an aggregation buffers before folding them into per-window states.
    pub window_buffer_records: usize,
    pub rollover: Rollover,
    pub outputs: Outputs,
    pub alerts: Vec<AlertRule>,
    pub notifiers: Vec<Notifier>,
    pub lines: LineIndex,
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
}

/// Where a shard without a checkpoint starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    TrimHorizon,
    Latest,
    /// Microseconds since the epoch.
    AtTimestamp(i64),
}

/// Where a table's files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lake {
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

impl Lake {
    /// Where `shardlake query` reads an output from: a directory or an `s3://` URL, ending
    /// in `/`.
    pub fn table_url(&self, output: &str) -> String {
        match self {
            Lake::Local { path } => {
                let dir = path.join(output);
                let abs = std::path::absolute(&dir).unwrap_or(dir);
                format!("{}/", abs.display())
            }
            Lake::S3(s3) => format!("s3://{}/{}/", s3.bucket, s3.object_key(output)),
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
}

impl fmt::Debug for NotifyTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sns { topic_arn } => f.debug_struct("Sns").field("topic_arn", topic_arn).finish(),
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
    Local { path: PathBuf },
    Dynamodb(LeaseTable),
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
    pub sinks: std::collections::BTreeMap<String, Lake>,
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
    pub when: String,
    /// Index into `outputs.aggregations` for a window rule.
    pub aggregation: Option<usize>,
}

impl Pipeline {
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

// ---------------------------------------------------------------- loading

/// A string value that came from `${VAR}`s: where it is, what the file says, what it became,
/// and the variables' own values. Problems never show what a variable held (it may be a
/// secret); they show what the file says instead.
#[derive(Debug, Clone)]
struct Substituted {
    path: String,
    written: String,
    value: String,
    vars: Vec<(String, String)>,
}

/// Variable values shorter than this are not replaced in messages about other fields (a
/// value like `8` or `info` would replace ordinary words); a problem about the field itself
/// always hides its value.
const REDACT_ANYWHERE_MIN: usize = 6;

/// Replaces, in every problem, the values that came from the environment by the text the file
/// wrote (`Bearer ${TOKEN}`), or by `${NAME}` for a variable's value found elsewhere.
fn redact(problems: &mut [Problem], subs: &[Substituted]) {
    let related = |field: &str, path: &str| {
        field == path
            || path
                .strip_prefix(field)
                .is_some_and(|r| r.starts_with(['.', '[']))
            || field
                .strip_prefix(path)
                .is_some_and(|r| r.starts_with(['.', '[']))
    };
    for problem in problems {
        for text in [&mut problem.message, &mut problem.fix] {
            for s in subs {
                let own = related(&problem.field, &s.path);
                if !s.value.is_empty() && (own || s.value.len() >= REDACT_ANYWHERE_MIN) {
                    *text = text.replace(&s.value, &s.written);
                }
                for (name, value) in &s.vars {
                    if !value.is_empty() && (own || value.len() >= REDACT_ANYWHERE_MIN) {
                        *text = text.replace(value, &format!("${{{name}}}"));
                    }
                }
            }
        }
    }
}

/// Reads `path` as YAML into a value tree with `${VAR}` replaced, plus its line index and
/// what was replaced where.
fn read_yaml(path: &Path, env: Env) -> Result<(Value, LineIndex, Vec<Substituted>), ConfigError> {
    let one = |line, field: &str, message: String, fix: &str| ConfigError {
        problems: vec![Problem {
            file: path.to_path_buf(),
            line,
            field: field.to_string(),
            message,
            fix: fix.to_string(),
        }],
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        one(
            None,
            "",
            format!("cannot read the file: {e}"),
            "check the path; it is relative to the current directory",
        )
    })?;
    let lines = LineIndex::build(&text);
    // YAML 1.2 booleans only: `y`, `no`, `on` stay text (a path named `y` is a path).
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    let mut value: Value = serde_saphyr::from_str_with_options(&text, options).map_err(|e| {
        let line = e.location().map(|l| l.line() as usize);
        let msg = e
            .to_string()
            .lines()
            .next()
            .unwrap_or("invalid YAML")
            .to_string();
        one(
            line,
            "",
            format!("not valid YAML: {msg}"),
            "fix the YAML syntax at that line",
        )
    })?;
    let mut problems = Problems::new(path, &lines);
    let mut subs = Vec::new();
    substitute_env(&mut value, "", env, &mut problems, &mut subs);
    if problems.list.is_empty() {
        Ok((value, lines, subs))
    } else {
        Err(ConfigError {
            problems: problems.list,
        })
    }
}

/// Replaces `${VAR}` and `${VAR:-default}` in every string value.
fn substitute_env(
    value: &mut Value,
    path: &str,
    env: Env,
    problems: &mut Problems,
    subs: &mut Vec<Substituted>,
) {
    match value {
        Value::String(s) if s.contains("${") => match expand(s, env) {
            Ok(out) => {
                let vars = variables(s)
                    .filter_map(|name| env(name).map(|v| (name.to_string(), v)))
                    .collect();
                subs.push(Substituted {
                    path: path.to_string(),
                    written: std::mem::replace(s, out.clone()),
                    value: out,
                    vars,
                });
            }
            Err(var) => problems.add(
                path,
                format!("environment variable `{var}` is not set"),
                format!("set {var}, or give a default: ${{{var}:-value}}"),
            ),
        },
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_env(item, &format!("{path}[{i}]"), env, problems, subs);
            }
        }
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                substitute_env(v, &child, env, problems, subs);
            }
        }
        _ => {}
    }
}

/// The names of the `${VAR}`s in `s`.
fn variables(s: &str) -> impl Iterator<Item = &str> {
    s.split("${").skip(1).filter_map(|part| {
        let inner = &part[..part.find('}')?];
        Some(inner.split_once(":-").map_or(inner, |(name, _)| name))
    })
}

/// Expands `${VAR}` / `${VAR:-default}`; the error is the first unset variable's name.
pub fn expand(s: &str, env: Env) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        match env(name)
            .filter(|v| !v.is_empty())
            .or(default.map(str::to_string))
        {
            Some(v) => out.push_str(&v),
            None => return Err(name.to_string()),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Deserializes `value` into `T`, reporting every unknown key (each with the keys allowed
/// there) and then the first type error, all with their lines. Unknown keys are left out of
/// the result, so the caller can go on checking it; any problem fails the load.
fn typed<T: DeserializeOwned>(mut value: Value, problems: &mut Problems) -> Option<T> {
    loop {
        match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            // Unknown keys were recorded and removed: the rest is still checked, so every
            // problem is reported at once.
            Ok(t) => return Some(t),
            Err(err) => {
                let path = err.path().to_string();
                let path = if path == "." { String::new() } else { path };
                let msg = err.inner().to_string();
                if let Some(key) = unknown_field(&msg)
                    && remove_key(&mut value, &path, &key)
                {
                    let expected = msg.split_once(", expected ").map(|(_, e)| e).unwrap_or("");
                    let field = if path.ends_with(&key) {
                        path.clone()
                    } else {
                        join(&path, &key)
                    };
                    problems.add(
                        &field,
                        format!("unknown key `{key}`"),
                        if expected.is_empty() {
                            "remove it".to_string()
                        } else {
                            format!("remove it; expected {expected}")
                        },
                    );
                    continue;
                }
                let fix = if msg.starts_with("missing field") {
                    "add it (the commented examples in pipelines/ and deploy/pi/agent.yaml show every field)"
                } else if msg.starts_with("unknown variant") {
                    "use one of the values listed"
                } else {
                    "give the type the field expects"
                };
                problems.add(&path, msg, fix);
                return None;
            }
        }
    }
}

fn resolve_lake(p: &mut Problems, field: &str, f: LakeFile) -> Lake {
    match f {
        LakeFile::Local { path } => Lake::Local { path: path.into() },
        LakeFile::S3 {
            bucket,
            prefix,
            region,
            kms_key_id,
            storage_class,
            part_size,
        } => {
            let at = |k: &str| format!("{field}.s3.{k}");
            if !is_bucket_name(&bucket) {
                p.add(
                    &at("bucket"),
                    format!("`{bucket}` is not an S3 bucket name"),
                    "give the bucket's name only (3-63 lowercase letters, digits, `.` and `-`), without s3:// or a path; put the path in `prefix`",
                );
            }
            let size = p.bytes(&at("part_size"), &part_size);
            if size != 0 && !(5 << 20..=5 << 30).contains(&size) {
                p.add(
                    &at("part_size"),
                    format!("{part_size} is outside S3's part sizes"),
                    "write a size from 5MiB to 5GiB, e.g. 8MiB",
                );
            }
            if let Some(class) = &storage_class
                && !STORAGE_CLASSES.contains(&class.as_str())
            {
                p.add(
                    &at("storage_class"),
                    format!("`{class}` is not a storage class objects can be written with"),
                    format!("use one of: {}", STORAGE_CLASSES.join(", ")),
                );
            }
            if kms_key_id.as_deref() == Some("") {
                p.add(
                    &at("kms_key_id"),
                    "is empty",
                    "give a KMS key id or ARN, or remove the key to use the bucket's default encryption",
                );
            }
            Lake::S3(S3Location {
                bucket,
                prefix: prefix.trim_matches('/').to_string(),
                region: region.filter(|r| !r.is_empty()),
                kms_key_id,
                storage_class,
                part_size: size as usize,
            })
        }
    }
}

fn is_bucket_name(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && b.starts_with(|c: char| c.is_ascii_alphanumeric())
        && b.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn resolve_notifiers(
    p: &mut Problems,
    files: &[NotifierFile],
    rules: &std::collections::HashSet<String>,
) -> Vec<Notifier> {
    let mut names = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, n) in files.iter().enumerate() {
        let at = |k: &str| format!("notifiers[{i}].{k}");
        // Names only label logs and metrics: hyphens are fine.
        let valid = !n.name.is_empty()
            && n.name.len() <= 64
            && n.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            p.add(
                &at("name"),
                format!("`{}` is not a valid notifier name", n.name),
                "use 1 to 64 letters, digits, `-` and `_`",
            );
        }
        if !names.insert(n.name.clone()) {
            p.add(
                &at("name"),
                format!("notifier name `{}` is used twice", n.name),
                "give every notifier its own name",
            );
        }
        let cooldown = p.duration(&at("cooldown"), &n.cooldown).as_micros() as i64;
        for (j, r) in n.rules.iter().flatten().enumerate() {
            if !rules.contains(r) {
                let mut known: Vec<_> = rules.iter().map(String::as_str).collect();
                known.sort_unstable();
                p.add(
                    &format!("notifiers[{i}].rules[{j}]"),
                    format!("no alert rule is named `{r}`"),
                    format!("name one of: {}", known.join(", ")),
                );
            }
        }
        let target = match (&n.sns, &n.webhook) {
            (Some(sns), None) => {
                if !sns.topic_arn.starts_with("arn:") || sns.topic_arn.split(':').count() != 6 {
                    p.add(
                        &format!("notifiers[{i}].sns.topic_arn"),
                        format!("`{}` is not a topic ARN", sns.topic_arn),
                        "write arn:aws:sns:<region>:<account>:<topic>",
                    );
                }
                NotifyTarget::Sns {
                    topic_arn: sns.topic_arn.clone(),
                }
            }
            (None, Some(hook)) => {
                if !(hook.url.starts_with("https://") || hook.url.starts_with("http://")) {
                    // The URL may carry a token: it is not repeated in the message.
                    p.add(
                        &format!("notifiers[{i}].webhook.url"),
                        "is not an http:// or https:// URL",
                        "write the receiver's full URL, e.g. https://hooks.example.com/shardlake",
                    );
                }
                NotifyTarget::Webhook {
                    url: hook.url.clone(),
                    headers: hook
                        .headers
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                }
            }
            _ => {
                p.add(
                    &format!("notifiers[{i}]"),
                    "a notifier needs exactly one of `sns` and `webhook`",
                    "keep one; declare another notifier for the other target",
                );
                continue;
            }
        };
        out.push(Notifier {
            name: n.name.clone(),
            target,
            cooldown,
            rules: n.rules.clone(),
        });
    }
    out
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn unknown_field(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// Removes `key` from the mapping at `path` (or at its parent, when `path` names the key).
fn remove_key(value: &mut Value, path: &str, key: &str) -> bool {
    let parent = path
        .strip_suffix(key)
        .map(|p| p.trim_end_matches('.'))
        .unwrap_or(path);
    let mut node = value;
    for seg in split_path(parent) {
        node = match (seg, node) {
            (Seg::Key(k), Value::Object(m)) => match m.get_mut(k) {
                Some(v) => v,
                None => return false,
            },
            (Seg::Index(i), Value::Array(a)) => match a.get_mut(i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match node {
        Value::Object(m) => m.remove(key).is_some(),
        _ => false,
    }
}

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn split_path(path: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let mut p = part;
        if let Some(b) = p.find('[') {
            if b > 0 {
                out.push(Seg::Key(&p[..b]));
            }
            p = &p[b..];
            while let Some(rest) = p.strip_prefix('[') {
                let end = rest.find(']').unwrap_or(rest.len());
                if let Ok(i) = rest[..end].parse() {
                    out.push(Seg::Index(i));
                }
                p = rest.get(end + 1..).unwrap_or("");
            }
        } else {
            out.push(Seg::Key(p));
        }
    }
    out
}

/// Loads any YAML configuration file into the serde type `F` and resolves it with `resolve`,
/// with the same `${VAR}` substitution, unknown-key reports, lines and redaction as a pipeline
/// (the agent's `agent.yaml` uses it).
pub fn load_file<F: DeserializeOwned, T>(
    path: &Path,
    env: Env,
    resolve: impl FnOnce(F, &mut Problems) -> T,
) -> Result<T, ConfigError> {
    let (value, lines, subs) = read_yaml(path, env)?;
    let mut problems = Problems::new(path, &lines);
    let out = typed::<F>(value, &mut problems).map(|f| resolve(f, &mut problems));
    redact(&mut problems.list, &subs);
    match out {
        Some(t) if problems.list.is_empty() => Ok(t),
        _ => Err(ConfigError {
            problems: problems.list,
        }),
    }
}

/// Loads a schema file on its own (`shardlake validate schemas/x.yaml`).
pub fn load_schema(path: &Path, env: Env) -> Result<RecordSchema, ConfigError> {
    load_file(path, env, |f: SchemaFile, p| resolve_schema(path, f, p))
}

fn resolve_schema(path: &Path, f: SchemaFile, p: &mut Problems) -> RecordSchema {
    if f.fields.is_empty() {
        p.add(
            "fields",
            "a schema needs at least one field",
            "list the record's fields under `fields:`",
        );
    }
    let mut seen = std::collections::HashSet::new();
    for (i, field) in f.fields.iter().enumerate() {
        let at = format!("fields[{i}].name");
        p.ident(&at, &field.name);
        if RESERVED_COLUMNS.contains(&field.name.as_str()) {
            p.add(&at, format!("`{}` is a column shardlake adds", field.name), "rename the field (reserved: year, month, day, hour, window_start, window_end, _shard_id, _sequence_number, aggregation)");
        }
        if !seen.insert(field.name.as_str()) {
            p.add(
                &at,
                format!("field `{}` is listed twice", field.name),
                "remove one of them",
            );
        }
    }
    if let Some(key) = &f.key
        && !f.fields.iter().any(|x| &x.name == key)
    {
        p.add(
            "key",
            format!("key field `{key}` is not one of the fields"),
            "name a field listed under `fields:`",
        );
    }
    RecordSchema {
        file: path.to_path_buf(),
        name: f.name,
        key: f.key,
        fields: f
            .fields
            .into_iter()
            .map(|x| Field {
                name: x.name,
                ty: x.ty,
                required: x.required,
            })
            .collect(),
    }
}

/// Loads and checks a pipeline file and its schema. SQL is checked by the engine
/// (`engine::sql::load`), which needs DataFusion.
pub fn load_pipeline(path: &Path, env: Env) -> Result<Pipeline, ConfigError> {
    match load_pipeline_partial(path, env) {
        (Some(p), problems) if problems.is_empty() => Ok(p),
        (_, problems) => Err(ConfigError { problems }),
    }
}

/// Like [`load_pipeline`], but returns the pipeline as far as it resolved beside the problems
/// found, so later checks (SQL) can still run and every problem is reported at once. A rule
/// naming a missing aggregation is left out of the returned pipeline.
pub fn load_pipeline_partial(path: &Path, env: Env) -> (Option<Pipeline>, Vec<Problem>) {
    let (value, lines, subs) = match read_yaml(path, env) {
        Ok(v) => v,
        Err(e) => return (None, e.problems),
    };
    let mut p = Problems::new(path, &lines);
    let Some(f) = typed::<PipelineFile>(value, &mut p) else {
        redact(&mut p.list, &subs);
        return (None, p.list);
    };
    let mut extra = Vec::new();
    let schema_path = path.parent().unwrap_or(Path::new(".")).join(&f.schema);
    let schema = match load_schema(&schema_path, env) {
        Ok(s) => Some(s),
        Err(e) => {
            if !schema_path.exists() {
                p.add(
                    "schema",
                    format!("schema file {} does not exist", schema_path.display()),
                    "give a path relative to this pipeline file, e.g. ../schemas/well-reading.yaml",
                );
            } else {
                extra = e.problems;
            }
            None
        }
    };
    let pipeline = resolve_pipeline(path, f, schema, lines.clone(), &mut p);
    p.list.extend(extra);
    redact(&mut p.list, &subs);
    (pipeline, p.list)
}

fn resolve_pipeline(
    path: &Path,
    f: PipelineFile,
    schema: Option<RecordSchema>,
    lines: LineIndex,
    p: &mut Problems,
) -> Option<Pipeline> {
    if f.name.is_empty()
        || !f
            .name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        p.add(
            "name",
            format!("`{}` is not a valid pipeline name", f.name),
            "use lowercase letters, digits, `-` and `_`",
        );
    }
    let source = match f.source {
        SourceFile::Local {
            path,
            poll_interval,
        } => {
            let poll_interval = p.duration("source.local.poll_interval", &poll_interval);
            Source::Local {
                path: path.into(),
                poll_interval,
            }
        }
        SourceFile::Kinesis {
            stream,
            region,
            start,
            timestamp,
            poll_interval,
            max_records,
            split_lines,
        } => {
            let at = |k: &str| format!("source.kinesis.{k}");
            if !(1..=10_000).contains(&max_records) {
                p.add(
                    &at("max_records"),
                    format!("{max_records} is outside GetRecords' limit"),
                    "use 1 to 10000",
                );
            }
            let valid_name = !stream.is_empty()
                && (stream.starts_with("arn:")
                    || (stream.len() <= 128
                        && stream
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))));
            if !valid_name {
                p.add(
                    &at("stream"),
                    format!("`{stream}` is not a Kinesis stream name or ARN"),
                    "use the stream's name (1-128 letters, digits, `_`, `.`, `-`) or its ARN",
                );
            }
            let start = match (start.as_str(), &timestamp) {
                ("trim_horizon", None) => StartAt::TrimHorizon,
                ("latest", None) => StartAt::Latest,
                ("at_timestamp", Some(t)) => match chrono::DateTime::parse_from_rfc3339(t) {
                    Ok(t) => StartAt::AtTimestamp(t.timestamp_micros()),
                    Err(_) => {
                        p.add(
                            &at("timestamp"),
                            format!("`{t}` is not an RFC 3339 time"),
                            "write it like 2026-01-05T10:00:00Z",
                        );
                        StartAt::TrimHorizon
                    }
                },
                ("at_timestamp", None) => {
                    p.add(
                        &at("start"),
                        "`at_timestamp` needs a `timestamp`",
                        "add `timestamp: 2026-01-05T10:00:00Z` (RFC 3339) beside `start`",
                    );
                    StartAt::TrimHorizon
                }
                ("trim_horizon" | "latest", Some(_)) => {
                    p.add(
                        &at("timestamp"),
                        format!(
                            "`timestamp` is only read with `start: at_timestamp`, not `{start}`"
                        ),
                        "remove `timestamp`, or set `start: at_timestamp`",
                    );
                    StartAt::TrimHorizon
                }
                (other, _) => {
                    p.add(
                        &at("start"),
                        format!("`{other}` is not a start position"),
                        "use trim_horizon, latest or at_timestamp",
                    );
                    StartAt::TrimHorizon
                }
            };
            Source::Kinesis(KinesisSource {
                stream,
                region,
                start,
                poll_interval: p.duration(&at("poll_interval"), &poll_interval),
                max_records: max_records.clamp(1, 10_000) as usize,
                split_lines,
            })
        }
    };
    let lake = resolve_lake(p, "lake", f.lake.clone());
    let checkpoints = match f.checkpoints.clone() {
        CheckpointsFile::Local { path } => Checkpoints::Local { path: path.into() },
        CheckpointsFile::Dynamodb {
            table,
            region,
            failover_time,
            shard_sync_interval,
            max_leases,
        } => {
            let at = |k: &str| format!("checkpoints.dynamodb.{k}");
            let valid = (3..=255).contains(&table.len())
                && table
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !valid {
                p.add(
                    &at("table"),
                    format!("`{table}` is not a DynamoDB table name"),
                    "use 3-255 letters, digits, `_`, `.` or `-`, e.g. shardlake-<pipeline>",
                );
            }
            if !matches!(source, Source::Kinesis(_)) {
                p.add(
                    "checkpoints.dynamodb",
                    "DynamoDB leases share a Kinesis stream's shards between workers; this source is not Kinesis",
                    "use `checkpoints: {local: {path: ...}}` with a local stream",
                );
            }
            let failover_time = p.duration(&at("failover_time"), &failover_time);
            if failover_time < Duration::from_secs(1) {
                p.add(
                    &at("failover_time"),
                    "a lease must last at least 1s",
                    "use e.g. `10s` (renewed three times per period)",
                );
            }
            if !(1..=100).contains(&max_leases) {
                p.add(
                    &at("max_leases"),
                    format!("{max_leases} is outside 1..=100"),
                    "a commit writes every lease in one transaction of at most 100 items",
                );
            }
            Checkpoints::Dynamodb(LeaseTable {
                table,
                region,
                failover_time,
                shard_sync_interval: p.duration(&at("shard_sync_interval"), &shard_sync_interval),
                max_leases: max_leases.clamp(1, 100) as usize,
            })
        }
    };

    let et = &f.event_time;
    let allowed_lateness = p.duration("event_time.allowed_lateness", &et.allowed_lateness);
    let idle_shard_timeout = p.duration("event_time.idle_shard_timeout", &et.idle_shard_timeout);
    if let Some(s) = &schema {
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
    let max_record_bytes = p.bytes("limits.max_record_bytes", &f.limits.max_record_bytes);
    if max_record_bytes == 0 {
        p.add(
            "limits.max_record_bytes",
            "must be more than zero",
            "write e.g. 1MiB",
        );
    }
    let max_future_skew = p.duration("limits.max_future_skew", &f.limits.max_future_skew);
    if f.limits.window_buffer_records == 0 {
        p.add(
            "limits.window_buffer_records",
            "must be more than zero",
            "leave it out for the default (100000), or write a smaller count to use less memory",
        );
    }
    let rollover = check_rollover(
        p,
        "rollover",
        Some(&f.rollover.max_bytes),
        Some(&f.rollover.max_age),
        None,
    );
    let o = &f.outputs;
    let mut names = std::collections::HashMap::new();
    for (field, name) in o
        .raw
        .iter()
        .map(|r| ("outputs.raw.name", &r.name))
        .chain([
            ("outputs.dead_letter.name", &o.dead_letter.name),
            ("outputs.late.name", &o.late.name),
            ("outputs.alerts.name", &o.alerts.name),
        ])
        .map(|(a, b)| (a.to_string(), b))
        .chain(
            o.aggregations
                .iter()
                .enumerate()
                .map(|(i, a)| (format!("outputs.aggregations[{i}].name"), &a.name)),
        )
    {
        p.ident(&field, name);
        if let Some(first) = names.insert(name.clone(), field.clone()) {
            p.add(
                &field,
                format!("table name `{name}` is already used by {first}"),
                "give every output its own name",
            );
        }
    }
    let mut aggregations = Vec::new();
    for (i, a) in o.aggregations.iter().enumerate() {
        let at = format!("outputs.aggregations[{i}].window");
        let size = p.duration(&format!("{at}.size"), &a.window.size);
        let slide = match &a.window.slide {
            Some(s) => p.duration(&format!("{at}.slide"), s),
            None => size,
        };
        if size.is_zero() {
            p.add(
                &format!("{at}.size"),
                "a window must be longer than zero",
                "write e.g. 1m",
            );
        } else if slide.is_zero()
            || slide > size
            || !size.as_micros().is_multiple_of(slide.as_micros())
        {
            p.add(
                &format!("{at}.slide"),
                format!("slide {:?} does not divide size {:?}", slide, size),
                "use a slide that divides the size, e.g. size 5m with slide 1m",
            );
        } else if (size.as_micros() / slide.as_micros()) > 60 {
            p.add(
                &format!("{at}.slide"),
                "more than 60 windows overlap each record",
                "use a longer slide",
            );
        }
        aggregations.push(Aggregation {
            name: a.name.clone(),
            size: size.as_micros() as i64,
            slide: slide.as_micros() as i64,
            sql: a.sql.clone(),
        });
    }
    let mut alerts = Vec::new();
    let mut rule_names = std::collections::HashSet::new();
    for (i, r) in f.alerts.iter().enumerate() {
        if r.name.is_empty() || !rule_names.insert(r.name.clone()) {
            p.add(
                &format!("alerts[{i}].name"),
                format!("rule name `{}` is empty or used twice", r.name),
                "give every rule its own name",
            );
        }
        let aggregation = r.aggregation.as_ref().and_then(|name| {
            let idx = aggregations.iter().position(|a| &a.name == name);
            if idx.is_none() {
                p.add(
                    &format!("alerts[{i}].aggregation"),
                    format!("no aggregation is named `{name}`"),
                    format!(
                        "name one of: {}",
                        aggregations
                            .iter()
                            .map(|a| a.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
            idx
        });
        if r.aggregation.is_some() && aggregation.is_none() {
            continue;
        }
        alerts.push(AlertRule {
            index: i,
            name: r.name.clone(),
            when: r.when.clone(),
            aggregation,
        });
    }

    let notifiers = resolve_notifiers(p, &f.notifiers, &rule_names);
    let tables = o
        .raw
        .iter()
        .map(|r| ("outputs.raw".to_string(), &r.name, &r.rollover, &r.sink))
        .chain([
            (
                "outputs.dead_letter".to_string(),
                &o.dead_letter.name,
                &o.dead_letter.rollover,
                &o.dead_letter.sink,
            ),
            (
                "outputs.late".to_string(),
                &o.late.name,
                &o.late.rollover,
                &o.late.sink,
            ),
            (
                "outputs.alerts".to_string(),
                &o.alerts.name,
                &o.alerts.rollover,
                &o.alerts.sink,
            ),
        ])
        .chain(o.aggregations.iter().enumerate().map(|(i, a)| {
            (
                format!("outputs.aggregations[{i}]"),
                &a.name,
                &a.rollover,
                &a.sink,
            )
        }));
    let mut per_table = std::collections::BTreeMap::new();
    let mut sinks = std::collections::BTreeMap::new();
    for (field, name, own, sink) in tables {
        let sink = match sink {
            Some(s) => resolve_lake(p, &format!("{field}.sink"), s.clone()),
            None => lake.clone(),
        };
        sinks.insert(name.clone(), sink);
        let own = own.as_ref();
        let (bytes, age) = (
            own.and_then(|r| r.max_bytes.as_ref()),
            own.and_then(|r| r.max_age.as_ref()),
        );
        per_table.insert(
            name.clone(),
            check_rollover(p, &format!("{field}.rollover"), bytes, age, Some(&rollover)),
        );
    }

    Some(Pipeline {
        file: path.to_path_buf(),
        name: f.name,
        schema: schema?,
        source,
        lake,
        checkpoints,
        event_time: EventTime {
            field: et.field.clone(),
            format: et.format,
            allowed_lateness: allowed_lateness.as_micros() as i64,
            idle_shard_timeout,
        },
        max_record_bytes: max_record_bytes as usize,
        window_buffer_records: f.limits.window_buffer_records as usize,
        max_future_skew: max_future_skew.as_micros() as i64,
        rollover: rollover.clone(),
        outputs: Outputs {
            raw: o.raw.as_ref().map(|r| r.name.clone()),
            dead_letter: o.dead_letter.name.clone(),
            late: o.late.name.clone(),
            alerts: o.alerts.name.clone(),
            aggregations,
            rollover: per_table,
            sinks,
        },
        notifiers,
        alerts,
        lines,
    })
}

/// Parses and checks a rollover; values it leaves out come from `base`.
fn check_rollover(
    p: &mut Problems,
    at: &str,
    max_bytes: Option<&String>,
    max_age: Option<&String>,
    base: Option<&Rollover>,
) -> Rollover {
    let max_bytes = match max_bytes {
        Some(text) => {
            let field = format!("{at}.max_bytes");
            let n = p.bytes(&field, text);
            if n > 0 && n < 64 << 10 {
                p.add(
                    &field,
                    format!("{n} bytes makes tiny files"),
                    "use at least 64KiB; 64MiB-512MiB suits Athena",
                );
            }
            n
        }
        None => base.map_or(0, |b| b.max_bytes),
    };
    let max_age = match max_age {
        Some(text) => {
            let field = format!("{at}.max_age");
            let before = p.list.len();
            let d = p.duration(&field, text);
            if d.is_zero() && p.list.len() == before {
                p.add(&field, "must be more than zero", "write e.g. 1m or 5m");
            }
            d
        }
        None => base.map_or(Duration::ZERO, |b| b.max_age),
    };
    Rollover { max_bytes, max_age }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_variables_with_defaults() {
        let env = |k: &str| (k == "A").then(|| "x".to_string());
        assert_eq!(expand("${A}/b/${B:-c}", &env).unwrap(), "x/b/c");
        assert_eq!(expand("${MISSING}", &env).unwrap_err(), "MISSING");
        assert_eq!(expand("no vars", &env).unwrap(), "no vars");
    }

    /// Writes `s.yaml` (one timestamp field `ts`) into `dir`; returns the path for a pipeline
    /// named `pipeline` next to it.
    fn with_ts_schema(dir: &tempfile::TempDir, pipeline: &str) -> std::path::PathBuf {
        std::fs::write(
            dir.path().join("s.yaml"),
            "name: s\nfields:\n  - {name: ts, type: timestamp}\n",
        )
        .unwrap();
        dir.path().join(pipeline)
    }

    #[test]
    fn problems_never_show_what_a_variable_held() {
        let dir = tempfile::tempdir().unwrap();
        let pipe = with_ts_schema(&dir, "p.yaml");
        // A token pasted into the wrong fields: a stream name and a duration.
        std::fs::write(
            &pipe,
            "name: p\nschema: s.yaml\nsource: {kinesis: {stream: 'x/${TOKEN}', poll_interval: '${SHORT}'}}\nlake: {local: {path: l}}\ncheckpoints: {local: {path: z}}\nevent_time: {field: ts}\n",
        )
        .unwrap();
        let env = |k: &str| match k {
            "TOKEN" => Some("tok-9f8e7d6c5b".to_string()),
            "SHORT" => Some("abc".to_string()),
            _ => None,
        };
        let err = load_pipeline(&pipe, &env).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 2, "{text}");
        assert!(!text.contains("9f8e7d6c5b"), "{text}");
        assert!(!text.contains("`abc`"), "{text}");
        assert!(
            text.contains("`x/${TOKEN}` is not a Kinesis stream name"),
            "{text}"
        );
        assert!(
            text.contains("source.kinesis.poll_interval: `${SHORT}`"),
            "{text}"
        );
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("128MiB"), Some(128 << 20));
        assert_eq!(parse_bytes("64 KiB"), Some(64 << 10));
        assert_eq!(parse_bytes("1000"), Some(1000));
        assert_eq!(parse_bytes("12 parsecs"), None);
    }

    #[test]
    fn identifiers() {
        assert!(is_ident("well_1m"));
        assert!(!is_ident("Well"));
        assert!(!is_ident("1m"));
        assert!(!is_ident("a-b"));
    }

    #[test]
    fn a_table_rollover_falls_back_to_the_pipeline_default() {
        let dir = tempfile::tempdir().unwrap();
        let pipe = with_ts_schema(&dir, "p.yaml");
        std::fs::write(
            &pipe,
            "name: p\nschema: s.yaml\nsource: {local: {path: x}}\nlake: {local: {path: l}}\ncheckpoints: {local: {path: z}}\nevent_time: {field: ts}\nrollover: {max_bytes: 1MiB, max_age: 2m}\noutputs:\n  raw: {name: raw, rollover: {max_bytes: 8MiB}}\n  alerts: {name: alerts, rollover: {max_age: 10s}}\n",
        )
        .unwrap();
        let p = load_pipeline(&pipe, &|_| None).unwrap_or_else(|e| panic!("{e}"));
        let r = &p.outputs.rollover;
        assert_eq!(
            (r["raw"].max_bytes, r["raw"].max_age),
            (8 << 20, Duration::from_secs(120))
        );
        assert_eq!(
            (r["alerts"].max_bytes, r["alerts"].max_age),
            (1 << 20, Duration::from_secs(10))
        );
        assert_eq!(
            (r["late"].max_bytes, r["late"].max_age),
            (1 << 20, Duration::from_secs(120))
        );
    }

    #[test]
    fn the_raw_table_can_be_switched_off() {
        let dir = tempfile::tempdir().unwrap();
        let pipe = with_ts_schema(&dir, "p.yaml");
        let head = "name: p\nschema: s.yaml\nsource: {local: {path: x}}\nlake: {local: {path: l}}\ncheckpoints: {local: {path: z}}\nevent_time: {field: ts}\noutputs:\n";
        let load = |raw: &str| {
            std::fs::write(&pipe, format!("{head}  raw: {raw}\n")).unwrap();
            load_pipeline(&pipe, &|_| None)
        };
        let off = load("false").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(off.outputs.raw, None);
        assert_eq!(off.table_names(), ["dead_letter", "late", "alerts"]);
        assert!(!off.outputs.rollover.contains_key("records"));
        let on = load("true").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(on.outputs.raw.as_deref(), Some("records"));
        let named = load("{name: readings}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(named.table_names()[0], "readings");

        let err = load("{name: readings, colour: red}").unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].field, "outputs.raw.colour", "{err}");
        assert_eq!(err.problems[0].line, Some(8), "{err}");
        let err = load("7").unwrap_err();
        assert_eq!(err.problems[0].field, "outputs.raw", "{err}");
        assert!(
            err.to_string().contains("`false` for no raw table"),
            "{err}"
        );
    }

    #[test]
    fn every_unknown_key_is_reported_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let schema = dir.path().join("s.yaml");
        std::fs::write(
            &schema,
            "name: s\nfields:\n  - {name: ts, type: timestamp, required: true}\n",
        )
        .unwrap();
        let pipe = dir.path().join("p.yaml");
        std::fs::write(
            &pipe,
            "name: p\nschema: s.yaml\ncolour: red\nsource: {local: {path: x}}\nlake: {local: {path: y}}\ncheckpoints: {local: {path: z}}\nevent_time:\n  field: ts\n  lateness: 5s\n",
        )
        .unwrap();
        let err = load_pipeline(&pipe, &|_| None).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 2, "{text}");
        assert_eq!(err.problems[0].line, Some(3), "{text}");
        assert!(text.contains("unknown key `colour`"), "{text}");
        assert_eq!(err.problems[1].field, "event_time.lateness", "{text}");
        assert_eq!(err.problems[1].line, Some(9), "{text}");
        assert!(text.contains("allowed_lateness"), "{text}");
    }
}
