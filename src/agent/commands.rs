//! Commands to the device: a **desired state** the fleet writes, a **reported state** the agent
//! writes back, each a retained MQTT message on the device's own topics
//! (`sensors/<tenant>/<device>/desired` and `.../reported` by default).
//!
//! # Why retained topics, not a Device Shadow
//! Both keep the last desired state for a device that is offline. Retained messages work the
//! same on IoT Core and on Mosquitto (the local stand-in), so the path the tests run is the path
//! that runs on AWS; a shadow exists only on IoT Core, and Mosquitto has no shadow service to
//! test against. The IoT policy pins both topics to the certificate's thing exactly as it pins
//! telemetry (`deploy/shardlake.yaml`, `DevicePolicy`), and one connection carries both
//! directions (IoT Core lets a thing connect once, with its own name as the client id).
//!
//! # The documents
//! Desired, written by `shardlake device set` (and, later, by alert actions):
//! `{"version": 7, "state": {"sensors.pressure.interval": "1s", "outputs.valve": 1}, "by": "…", "at": "…"}`.
//! It is the **whole** desired state, not a change: a key that is not in it takes the agent's
//! configured default again (for a sensor; an output keeps its last value). `version` grows by
//! one with each write.
//!
//! Reported, written by the agent after each desired document it handles:
//! `{"version": 7, "desired_version": 7, "status": "applied", "applied": {…}, "refused": {…}, "at": "…"}`.
//! `version` is the desired version in force; `applied` the state in force; `status` one of
//! `applied`, `refused` (nothing changed; `refused` names each key and why), `stale` (a version
//! older than the one in force: ignored) or `failed` (an output could not be driven).
//!
//! # What a command may change (every other key is refused)
//! - `sensors.<name>.interval`: a duration (`"1s"`, `"250ms"`) within `commands.min_interval`
//!   and `commands.max_interval`.
//! - `sensors.<name>.enabled`: `true` or `false`.
//! - `outputs.<name>`: a configured actuator: a GPIO `value` file takes `0`/`1` (or
//!   `false`/`true`); a command output takes one of its listed `values`, passed as the last
//!   argument of a fixed program (no shell).
//!
//! A document with any refused key is refused whole: a valve and the sampling rate that goes
//! with it change together or not at all.
//!
//! # Order and durability
//! The applied state is written to `commands.state` (temporary file, fsync, rename) before it
//! is reported, and read at start, so a reboot keeps the settings and drives the outputs again.
//! On every (re)connect the agent subscribes to its desired topic and waits (up to
//! `commands.fetch_timeout`) until the retained document, if any, has been handled before it
//! sends its next batch: a command sent while it was offline takes effect first. A document
//! seen again (a reconnect) changes nothing and is reported again.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tokio::sync::watch;
use tracing::{info, warn};

use super::config::{CommandsConfig, Output, SensorConfig};

/// The device's desired-state topic by default (`{tenant}` and `{device_id}` filled in).
pub const DESIRED_TOPIC: &str = "sensors/{tenant}/{device_id}/desired";
/// The device's reported-state topic by default.
pub const REPORTED_TOPIC: &str = "sensors/{tenant}/{device_id}/reported";

/// A topic template with `{tenant}` and `{device_id}` filled in.
pub fn device_topic(template: &str, tenant: &str, device_id: &str) -> String {
    template
        .replace("{device_id}", device_id)
        .replace("{tenant}", tenant)
}

/// Whether `template` names one device's topic: it holds `{device_id}` and no wildcard.
pub fn is_device_topic(template: &str) -> bool {
    template.contains("{device_id}") && !template.contains(['+', '#'])
}

/// Whether `key` is one of the three kinds of key a device takes (`sensors.<name>.interval`,
/// `sensors.<name>.enabled`, `outputs.<name>`); what the device accepts is still its own call.
pub fn is_command_key(key: &str) -> bool {
    let parts: Vec<&str> = key.split('.').collect();
    match parts.as_slice() {
        ["sensors", name, "interval" | "enabled"] | ["outputs", name] => !name.is_empty(),
        _ => false,
    }
}

/// What a sensor's sampling loop follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub interval: Duration,
    pub enabled: bool,
}

/// The desired state, as written to the desired topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Desired {
    pub version: u64,
    #[serde(default)]
    pub state: BTreeMap<String, Json>,
    /// Who wrote it (`user:<name>`, `rule:<alert rule>`): for people reading the topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Applied,
    Refused,
    Stale,
    Failed,
}

/// The reported state, as written to the reported topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reported {
    /// The desired version in force.
    pub version: u64,
    /// The desired version this report answers.
    pub desired_version: u64,
    pub status: Status,
    /// The state in force (the desired keys applied).
    pub applied: BTreeMap<String, Json>,
    /// Each refused key and why (`version` for a stale document, `document` for one that is
    /// not a desired state at all).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub refused: BTreeMap<String, String>,
    pub at: String,
}

/// What is in force, as kept in `commands.state`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Applied {
    version: u64,
    state: BTreeMap<String, Json>,
}

/// One validated change.
enum Change {
    Interval(String, Duration),
    Enabled(String, bool),
    Output(String, String),
}

/// The device's side of commands: validates desired documents, drives sensors and outputs,
/// keeps what it applied.
pub struct Commands {
    cfg: CommandsConfig,
    /// Each sensor's configured interval and the channel its sampling loop follows.
    sensors: BTreeMap<String, (Duration, watch::Sender<Settings>)>,
    applied: Applied,
    /// Each output's value as last driven successfully (empty at start until driven): what
    /// a document is compared with, not `applied`, which a failed document leaves behind.
    driven: BTreeMap<String, String>,
}

impl Commands {
    /// Reads the applied state (a missing file is a device never commanded), sets each sensor
    /// accordingly and drives the outputs again; returns the channel of each sensor.
    pub async fn open(
        cfg: CommandsConfig,
        sensors: &[SensorConfig],
    ) -> anyhow::Result<(Self, BTreeMap<String, watch::Receiver<Settings>>)> {
        let applied = match tokio::fs::read(&cfg.state).await {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not an applied state ({e}); move it away to start from the configured settings",
                    cfg.state.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Applied::default(),
            Err(e) => anyhow::bail!("cannot read {}: {e}", cfg.state.display()),
        };
        let mut receivers = BTreeMap::new();
        let mut map = BTreeMap::new();
        for s in sensors {
            let settings = Settings {
                interval: s.interval,
                enabled: true,
            };
            let (tx, rx) = watch::channel(settings);
            receivers.insert(s.name.clone(), rx);
            map.insert(s.name.clone(), (s.interval, tx));
        }
        let mut commands = Self {
            cfg,
            sensors: map,
            applied: Applied::default(),
            driven: BTreeMap::new(),
        };
        // What was applied before is applied again, checked as a new document would be (the
        // configuration may have changed since: what it no longer allows is dropped, and the
        // state in force is then the configured one, so the retained document, when it comes,
        // is checked again and reported as it is).
        if applied.version > 0 {
            match commands.validate(&applied.state) {
                Ok(changes) => {
                    // Sensors first, then every output, each failure logged: at start the
                    // device does what it can.
                    commands.set_sensors(&changes);
                    for c in &changes {
                        if let Change::Output(name, value) = c
                            && let Err(why) = commands.drive_output(name, value).await
                        {
                            warn!(output = %name, why, "driving an output at start failed; the next desired state drives it again");
                        }
                    }
                    commands.applied = applied;
                }
                Err(refused) => {
                    warn!(state = %commands.cfg.state.display(), ?refused, "the applied state is no longer allowed by agent.yaml; starting from the configured settings");
                    commands.applied = Applied {
                        version: applied.version,
                        state: BTreeMap::new(),
                    };
                }
            }
            info!(version = commands.applied.version, "applied state restored");
        }
        Ok((commands, receivers))
    }

    /// Handles one desired document; `None` for an empty payload (a retained message being
    /// cleared), which changes nothing.
    pub async fn handle(&mut self, payload: &[u8]) -> Option<Reported> {
        if payload.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let desired: Desired = match serde_json::from_slice(payload) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "a desired state that is not one; refused");
                return Some(self.report(
                    0,
                    Status::Refused,
                    BTreeMap::from([(
                        "document".to_string(),
                        format!("not a desired-state document ({e}); expected {{\"version\": N, \"state\": {{…}}}}"),
                    )]),
                ));
            }
        };
        let v = desired.version;
        if v < self.applied.version {
            let why = format!(
                "version {v} is older than version {} in force; ignored",
                self.applied.version
            );
            info!(
                version = v,
                applied = self.applied.version,
                "stale desired state ignored"
            );
            return Some(self.report(
                v,
                Status::Stale,
                BTreeMap::from([("version".to_string(), why)]),
            ));
        }
        if v == self.applied.version
            && desired.state == self.applied.state
            && self.outputs_driven(&desired.state)
        {
            // Seen again (a reconnect): in force already.
            return Some(self.report(v, Status::Applied, BTreeMap::new()));
        }
        let changes = match self.validate(&desired.state) {
            Ok(changes) => changes,
            Err(refused) => {
                warn!(
                    version = v,
                    ?refused,
                    "desired state refused; nothing changed"
                );
                return Some(self.report(v, Status::Refused, refused));
            }
        };
        if let Err((key, why)) = self.apply(&changes).await {
            warn!(version = v, key, why, "desired state failed");
            return Some(self.report(v, Status::Failed, BTreeMap::from([(key, why)])));
        }
        let applied = Applied {
            version: v,
            state: desired.state,
        };
        if let Err(e) = write_atomically(&self.cfg.state, &applied).await {
            // Applied but not kept: a reboot would start from the previous state. Said, and
            // reported as failed so whoever commanded it knows.
            self.applied = applied;
            let why = format!(
                "applied, but {} could not be written: {e}",
                self.cfg.state.display()
            );
            warn!(version = v, why, "applied state not kept");
            return Some(self.report(
                v,
                Status::Failed,
                BTreeMap::from([("state".to_string(), why)]),
            ));
        }
        self.applied = applied;
        info!(
            version = v,
            by = desired.by.as_deref().unwrap_or(""),
            "desired state applied"
        );
        Some(self.report(v, Status::Applied, BTreeMap::new()))
    }

    fn report(
        &self,
        desired_version: u64,
        status: Status,
        refused: BTreeMap<String, String>,
    ) -> Reported {
        Reported {
            version: self.applied.version,
            desired_version,
            status,
            applied: self.applied.state.clone(),
            refused,
            at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        }
    }

    /// Every key checked; the changes, or each refused key with its reason.
    fn validate(
        &self,
        state: &BTreeMap<String, Json>,
    ) -> Result<Vec<Change>, BTreeMap<String, String>> {
        let mut changes = Vec::new();
        let mut refused = BTreeMap::new();
        for (key, value) in state {
            match self.check(key, value) {
                Ok(c) => changes.push(c),
                Err(why) => {
                    refused.insert(key.clone(), why);
                }
            }
        }
        if refused.is_empty() {
            Ok(changes)
        } else {
            Err(refused)
        }
    }

    fn check(&self, key: &str, value: &Json) -> Result<Change, String> {
        let parts: Vec<&str> = key.split('.').collect();
        match parts.as_slice() {
            ["sensors", name, what] => {
                if !self.sensors.contains_key(*name) {
                    return Err(format!(
                        "unknown sensor `{name}` (this device has: {})",
                        self.sensors.keys().cloned().collect::<Vec<_>>().join(", ")
                    ));
                }
                match *what {
                    "interval" => {
                        let text = value
                            .as_str()
                            .ok_or_else(|| format!("{value} is not a duration; write e.g. \"1s\""))?;
                        let d = humantime::parse_duration(text)
                            .map_err(|e| format!("`{text}` is not a duration ({e}); write e.g. \"1s\""))?;
                        let (min, max) = (self.cfg.min_interval, self.cfg.max_interval);
                        if d < min || d > max {
                            return Err(format!(
                                "{text} is outside {} to {} (commands.min_interval, max_interval)",
                                humantime::format_duration(min),
                                humantime::format_duration(max)
                            ));
                        }
                        Ok(Change::Interval(name.to_string(), d))
                    }
                    "enabled" => value
                        .as_bool()
                        .map(|b| Change::Enabled(name.to_string(), b))
                        .ok_or_else(|| format!("{value} is not true or false")),
                    other => Err(format!(
                        "a sensor has no setting `{other}`; it takes interval and enabled"
                    )),
                }
            }
            ["outputs", name] => {
                let Some(output) = self.cfg.outputs.get(*name) else {
                    return Err(if self.cfg.outputs.is_empty() {
                        format!("unknown output `{name}` (this device has no outputs)")
                    } else {
                        format!(
                            "unknown output `{name}` (this device has: {})",
                            self.cfg.outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                        )
                    });
                };
                let text = match value {
                    Json::String(s) => s.clone(),
                    Json::Bool(b) => u8::from(*b).to_string(),
                    Json::Number(n) => n.to_string(),
                    other => return Err(format!("{other} is not an output value")),
                };
                match output {
                    Output::Gpio { .. } => match text.as_str() {
                        "0" | "1" => Ok(Change::Output(name.to_string(), text)),
                        "false" => Ok(Change::Output(name.to_string(), "0".into())),
                        "true" => Ok(Change::Output(name.to_string(), "1".into())),
                        _ => Err(format!("a GPIO output takes 0 or 1, not {value}")),
                    },
                    Output::Command { values, .. } => {
                        if values.contains(&text) {
                            Ok(Change::Output(name.to_string(), text))
                        } else {
                            Err(format!(
                                "`{text}` is not one of this output's values ({})",
                                values.join(", ")
                            ))
                        }
                    }
                }
            }
            _ => Err("unknown key; this agent takes sensors.<name>.interval, sensors.<name>.enabled and outputs.<name>".into()),
        }
    }

    /// Whether every output `state` names was driven to its value (false for one that failed
    /// at start or in a document that failed part-way).
    fn outputs_driven(&self, state: &BTreeMap<String, Json>) -> bool {
        state.iter().all(|(k, v)| {
            k.strip_prefix("outputs.").is_none_or(|name| {
                self.driven.get(name).map(String::as_str) == Some(json_value(v).as_str())
            })
        })
    }

    /// Drives the outputs whose value differs from the one last driven (in key order), then
    /// sets every sensor: the changes over the configured defaults. The first output that
    /// fails stops it, sensors unchanged: `(key, why)`.
    async fn apply(&mut self, changes: &[Change]) -> Result<(), (String, String)> {
        for c in changes {
            if let Change::Output(name, value) = c {
                if self.driven.get(name) == Some(value) {
                    continue;
                }
                self.drive_output(name, value)
                    .await
                    .map_err(|why| (format!("outputs.{name}"), why))?;
            }
        }
        self.set_sensors(changes);
        Ok(())
    }

    async fn drive_output(&mut self, name: &str, value: &str) -> Result<(), String> {
        drive(&self.cfg.outputs[name], value).await?;
        info!(output = %name, value = %value, "output driven");
        self.driven.insert(name.to_string(), value.to_string());
        Ok(())
    }

    /// Every sensor's settings: the configured ones with `changes` over them.
    fn set_sensors(&self, changes: &[Change]) {
        for (name, (interval, tx)) in &self.sensors {
            let mut s = Settings {
                interval: *interval,
                enabled: true,
            };
            for c in changes {
                match c {
                    Change::Interval(n, d) if n == name => s.interval = *d,
                    Change::Enabled(n, b) if n == name => s.enabled = *b,
                    _ => {}
                }
            }
            tx.send_if_modified(|cur| {
                let changed = *cur != s;
                *cur = s;
                changed
            });
        }
    }
}

/// An output's value as a document gives it, as `check` normalises it (`true` → `1`).
fn json_value(v: &Json) -> String {
    match v {
        Json::String(s) => match s.as_str() {
            "true" => "1".into(),
            "false" => "0".into(),
            _ => s.clone(),
        },
        Json::Bool(b) => u8::from(*b).to_string(),
        other => other.to_string(),
    }
}

/// Sets one output to an already validated value.
async fn drive(output: &Output, value: &str) -> Result<(), String> {
    match output {
        Output::Gpio { path } => tokio::fs::write(path, value).await.map_err(|e| {
            format!(
                "cannot write {}: {e} (is the line exported and an output?)",
                path.display()
            )
        }),
        Output::Command { run, timeout, .. } => {
            let mut cmd = tokio::process::Command::new(&run[0]);
            cmd.args(&run[1..]).arg(value).kill_on_drop(true);
            let out = tokio::time::timeout(*timeout, cmd.output())
                .await
                .map_err(|_| format!("`{}` did not finish within {timeout:?}", run.join(" ")))?
                .map_err(|e| format!("cannot run `{}`: {e}", run[0]))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "`{} {value}` failed ({}): {}",
                    run.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        }
    }
}

/// Temporary file, fsync, rename, fsync of the directory: the old state or the new one.
async fn write_atomically(path: &Path, applied: &Applied) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(applied).expect("the applied state serialises");
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    })
    .await
    .expect("the write task does not panic")
}

#[cfg(test)]
mod tests;
