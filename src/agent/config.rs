//! `agent.yaml`: the device, its sensors, the on-disk queue and the transport. Loaded like a
//! pipeline (`${VAR}` substitution, every problem at once with its line and fix, secrets never
//! echoed); the commented example is `deploy/pi/agent.yaml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, Env, Problems, load_file};

/// A loaded, checked agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub file: PathBuf,
    pub device_id: String,
    pub tenant: String,
    /// Prefixed to every sysfs path (`/` on a Pi; a fake tree in tests); relative paths
    /// are relative to the file, like every other path in it.
    pub sysfs_root: PathBuf,
    pub queue: QueueConfig,
    pub batch: BatchConfig,
    pub transport: Transport,
    pub sensors: Vec<SensorConfig>,
    /// Desired state from the fleet, reported state back (`commands:`; MQTT only).
    pub commands: Option<CommandsConfig>,
}

/// `commands:`: what the agent lets the fleet change, within which bounds, and where it
/// keeps what it applied (see [`crate::agent::commands`]).
#[derive(Debug, Clone)]
pub struct CommandsConfig {
    /// The applied state, rewritten atomically after every change (survives a reboot).
    pub state: PathBuf,
    /// Retained desired state, written by the pipeline or an operator; the agent reads it.
    pub desired_topic: String,
    /// Retained reported state, written by the agent.
    pub reported_topic: String,
    /// The shortest and longest sampling interval a command may set.
    pub min_interval: Duration,
    pub max_interval: Duration,
    /// How long a (re)connect waits for the retained desired state before sending anyway.
    pub fetch_timeout: Duration,
    /// Actuators a command may drive, by name.
    pub outputs: std::collections::BTreeMap<String, Output>,
}

/// An actuator output.
#[derive(Debug, Clone)]
pub enum Output {
    /// A sysfs GPIO `value` file (under `sysfs_root`): 0 or 1.
    Gpio { path: PathBuf },
    /// A program run with its fixed arguments and then the value, which must be one of
    /// `values` (never a shell; nothing from the command but the value reaches it).
    Command {
        run: Vec<String>,
        values: Vec<String>,
        timeout: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub fsync: Fsync,
}

/// When appended readings and the send cursor reach the SD card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// After every append and every acknowledgement: nothing is lost on a power cut.
    Always,
    /// At most this often: a power cut loses at most this much of the newest readings.
    Every(Duration),
    /// Left to the kernel (a SIGKILL loses nothing; a power cut may lose ~30 s).
    Never,
}

#[derive(Debug, Clone)]
pub struct BatchConfig {
    pub max_readings: usize,
    pub max_bytes: usize,
    pub max_age: Duration,
}

#[derive(Debug, Clone)]
pub enum Transport {
    /// The embedded default: a local stream directory (see [`crate::localstream`]).
    Local { stream: PathBuf, shards: usize },
    /// MQTT over TLS with the device certificate (AWS IoT Core, Mosquitto).
    Mqtt(MqttConfig),
    /// Kinesis PutRecords straight from the device, keyed by device_id (builds with the
    /// `agent-kinesis` feature).
    Kinesis {
        stream: String,
        region: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// With `{tenant}` and `{device_id}` replaced.
    pub topic: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub keep_alive: Duration,
    pub ack_timeout: Duration,
    pub max_publishes_per_s: u32,
}

#[derive(Debug, Clone)]
pub struct SensorConfig {
    pub name: String,
    pub interval: Duration,
    /// Overrides the kind's field name (single-value sensors).
    pub field: Option<String>,
    /// Overrides the kind's unit (single-value sensors).
    pub unit: Option<String>,
    /// Multiplies the value after the kind's own conversion.
    pub factor: f64,
    pub kind: SensorKind,
}

#[derive(Debug, Clone)]
pub enum SensorKind {
    /// A 1-wire DS18B20 under `/sys/bus/w1/devices/<device>/w1_slave`.
    Ds18b20 { device: String },
    /// An IIO channel: `<device>/in_<channel>_input`, or `_raw` with `_offset`/`_scale`.
    Iio { device: String, channel: String },
    /// A hwmon input file, the chip found by its `name` (hwmonN numbers change across boots).
    Hwmon { chip: String, input: String },
    /// A thermal zone, by its `type` (e.g. `cpu-thermal`) or number.
    Thermal { zone: String },
    /// A command whose output is parsed: the `word`-th whitespace-separated number.
    Command {
        run: Vec<String>,
        word: usize,
        timeout: Duration,
    },
    /// The oil-well simulator: barrels/s, reservoir pressure, temperature, with anomalies.
    WellSim { seed: u64, spike_every: u64 },
}

// ---------------------------------------------------------------- the file's shape

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    /// The device's id: the partition key and the `device_id` of every reading.
    device_id: String,
    tenant: String,
    #[serde(default = "default_root")]
    sysfs_root: String,
    #[serde(default)]
    queue: QueueFile,
    #[serde(default)]
    batch: BatchFile,
    transport: TransportFile,
    sensors: Vec<SensorFile>,
    commands: Option<CommandsFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandsFile {
    #[serde(default = "default_commands_state")]
    state: String,
    #[serde(default = "default_desired_topic")]
    desired_topic: String,
    #[serde(default = "default_reported_topic")]
    reported_topic: String,
    #[serde(default = "default_min_interval")]
    min_interval: String,
    #[serde(default = "default_max_interval")]
    max_interval: String,
    #[serde(default = "default_fetch_timeout")]
    fetch_timeout: String,
    #[serde(default)]
    outputs: std::collections::BTreeMap<String, OutputFile>,
}

fn default_commands_state() -> String {
    "/var/lib/shardlake-agent/applied.json".into()
}
fn default_desired_topic() -> String {
    super::commands::DESIRED_TOPIC.into()
}
fn default_reported_topic() -> String {
    super::commands::REPORTED_TOPIC.into()
}
fn default_min_interval() -> String {
    "100ms".into()
}
fn default_max_interval() -> String {
    "1h".into()
}
fn default_fetch_timeout() -> String {
    "5s".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum OutputFile {
    Gpio(String),
    Command(OutputCommandFile),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputCommandFile {
    run: Vec<String>,
    values: Vec<String>,
    #[serde(default = "default_command_timeout")]
    timeout: String,
}

fn default_root() -> String {
    "/".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueFile {
    #[serde(default = "default_queue_path")]
    path: String,
    #[serde(default = "default_queue_bytes")]
    max_bytes: String,
    /// `always`, `never`, or a duration (`1s`): how often to fsync at most.
    #[serde(default = "default_fsync")]
    fsync: String,
}

impl Default for QueueFile {
    fn default() -> Self {
        Self {
            path: default_queue_path(),
            max_bytes: default_queue_bytes(),
            fsync: default_fsync(),
        }
    }
}

fn default_queue_path() -> String {
    "/var/lib/shardlake-agent/queue".into()
}
fn default_queue_bytes() -> String {
    "64MiB".into()
}
fn default_fsync() -> String {
    "1s".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchFile {
    #[serde(default = "default_batch_readings")]
    max_readings: usize,
    #[serde(default = "default_batch_bytes")]
    max_bytes: String,
    #[serde(default = "default_batch_age")]
    max_age: String,
}

impl Default for BatchFile {
    fn default() -> Self {
        Self {
            max_readings: default_batch_readings(),
            max_bytes: default_batch_bytes(),
            max_age: default_batch_age(),
        }
    }
}

fn default_batch_readings() -> usize {
    500
}
fn default_batch_bytes() -> String {
    "96KiB".into()
}
fn default_batch_age() -> String {
    "1s".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum TransportFile {
    /// Created with `shards` shards if it does not exist yet.
    Local {
        stream: String,
        #[serde(default = "default_shards")]
        shards: usize,
    },
    Mqtt(MqttFile),
    /// Credentials from the default chain; endpoint from AWS_ENDPOINT_URL(_KINESIS).
    Kinesis {
        stream: String,
        region: Option<String>,
    },
}

fn default_shards() -> usize {
    4
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MqttFile {
    /// The broker; for IoT Core `aws iot describe-endpoint --endpoint-type iot:Data-ATS`.
    host: String,
    #[serde(default = "default_mqtt_port")]
    port: u16,
    /// Defaults to device_id (IoT Core policies usually require the thing name).
    client_id: Option<String>,
    #[serde(default = "default_topic")]
    topic: String,
    ca: String,
    cert: String,
    key: String,
    #[serde(default = "default_keep_alive")]
    keep_alive: String,
    #[serde(default = "default_ack_timeout")]
    ack_timeout: String,
    #[serde(default = "default_publishes")]
    max_publishes_per_s: u32,
}

fn default_mqtt_port() -> u16 {
    8883
}
fn default_topic() -> String {
    "sensors/{tenant}/{device_id}/telemetry".into()
}
fn default_keep_alive() -> String {
    "30s".into()
}
fn default_ack_timeout() -> String {
    "20s".into()
}
fn default_publishes() -> u32 {
    100
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SensorFile {
    name: String,
    interval: String,
    field: Option<String>,
    unit: Option<String>,
    factor: Option<f64>,
    ds18b20: Option<Ds18b20File>,
    iio: Option<IioFile>,
    hwmon: Option<HwmonFile>,
    thermal: Option<ThermalFile>,
    command: Option<CommandFile>,
    well_sim: Option<WellSimFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ds18b20File {
    device: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IioFile {
    device: String,
    channel: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HwmonFile {
    chip: String,
    input: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ThermalFile {
    zone: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandFile {
    run: Vec<String>,
    #[serde(default)]
    word: usize,
    #[serde(default = "default_command_timeout")]
    timeout: String,
}

fn default_command_timeout() -> String {
    "5s".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WellSimFile {
    #[serde(default)]
    seed: u64,
    /// One pressure spike every this many samples (0: none).
    #[serde(default = "default_spike_every")]
    spike_every: u64,
}

fn default_spike_every() -> u64 {
    600
}

const KINDS: &str = "ds18b20, iio, hwmon, thermal, command or well_sim";

/// Loads and checks `agent.yaml`; relative paths are relative to the file's directory.
pub fn load(path: &Path, env: Env) -> Result<AgentConfig, ConfigError> {
    load_file(path, env, |f: AgentFile, p| resolve(path, f, p))
}

/// Characters that would break the MQTT topic or the partition key.
fn bad_id(s: &str) -> bool {
    s.is_empty()
        || s.len() > 128
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

fn resolve(path: &Path, f: AgentFile, p: &mut Problems) -> AgentConfig {
    let base = path.parent().unwrap_or(Path::new("."));
    for (field, value) in [("device_id", &f.device_id), ("tenant", &f.tenant)] {
        if bad_id(value) {
            p.add(
                field,
                format!("`{value}` cannot be used in an MQTT topic and a partition key"),
                "use 1 to 128 letters, digits and `-_.:` (for IoT Core, the thing name)",
            );
        }
    }
    // In the file's order, so the problems are listed in it.
    let queue = queue_config(base, f.queue, p);
    let batch = batch_config(f.batch, p);
    let transport = transport_config(base, f.transport, &f.device_id, p);
    let sensors = sensor_configs(f.sensors, p);
    let commands = f.commands.map(|c| {
        commands_config(
            base,
            &base.join(&f.sysfs_root),
            c,
            (&f.device_id, &f.tenant),
            &transport,
            p,
        )
    });
    AgentConfig {
        file: path.to_path_buf(),
        device_id: f.device_id,
        tenant: f.tenant,
        sysfs_root: base.join(&f.sysfs_root),
        queue,
        batch,
        transport,
        sensors,
        commands,
    }
}

/// `commands:` (device and tenant fill the topics' `{device_id}` and `{tenant}`).
fn commands_config(
    base: &Path,
    sysfs_root: &Path,
    c: CommandsFile,
    (device_id, tenant): (&str, &str),
    transport: &Transport,
    p: &mut Problems,
) -> CommandsConfig {
    if !matches!(transport, Transport::Mqtt(_)) {
        p.add(
            "commands",
            "commands reach the device over MQTT, and this agent's transport is not mqtt",
            "use transport.mqtt (IoT Core or Mosquitto), or remove `commands`",
        );
    }
    let mut topic = |field: &str, template: &str| {
        if !super::commands::is_device_topic(template) {
            p.add(
                &format!("commands.{field}"),
                format!("`{template}` is not a topic of this one device"),
                "include {device_id} and no wildcards, e.g. sensors/{tenant}/{device_id}/desired",
            );
        }
        super::commands::device_topic(template, tenant, device_id)
    };
    let desired_topic = topic("desired_topic", &c.desired_topic);
    let reported_topic = topic("reported_topic", &c.reported_topic);
    if desired_topic == reported_topic {
        p.add(
            "commands.reported_topic",
            "the same topic as desired_topic",
            "keep them apart, e.g. sensors/{tenant}/{device_id}/reported",
        );
    }
    let min_interval = p.duration("commands.min_interval", &c.min_interval);
    let max_interval = p.duration("commands.max_interval", &c.max_interval);
    if min_interval < Duration::from_millis(10) {
        p.add(
            "commands.min_interval",
            format!("{} is shorter than 10ms", c.min_interval),
            "sample at most 100 times a second, e.g. 100ms",
        );
    }
    if max_interval < min_interval {
        p.add(
            "commands.max_interval",
            format!("{} is shorter than min_interval", c.max_interval),
            "e.g. 1h",
        );
    }
    let fetch_timeout = p.duration("commands.fetch_timeout", &c.fetch_timeout);
    let mut outputs = std::collections::BTreeMap::new();
    for (name, o) in c.outputs {
        let at = format!("commands.outputs.{name}");
        if bad_id(&name) || name.contains('.') {
            p.add(
                &at,
                format!("`{name}` is not an output name"),
                "use letters, digits and `-_:`",
            );
        }
        let output = match o {
            OutputFile::Gpio(path) => {
                if !path.ends_with("/value") {
                    p.add(
                        &format!("{at}.gpio"),
                        format!("`{path}` is not a GPIO value file"),
                        "name the line's value file, e.g. sys/class/gpio/gpio17/value (under sysfs_root)",
                    );
                }
                Output::Gpio {
                    path: sysfs_root.join(path.trim_start_matches('/')),
                }
            }
            OutputFile::Command(cmd) => {
                if cmd.run.is_empty() {
                    p.add(
                        &format!("{at}.command.run"),
                        "the command is empty",
                        "give the program and its fixed arguments, e.g. [/usr/local/bin/valve]",
                    );
                }
                if cmd.values.is_empty() {
                    p.add(
                        &format!("{at}.command.values"),
                        "no values are allowed",
                        "list the values a command may pass, e.g. [open, closed]",
                    );
                }
                let timeout = p.duration(&format!("{at}.command.timeout"), &cmd.timeout);
                Output::Command {
                    run: cmd.run,
                    values: cmd.values,
                    timeout,
                }
            }
        };
        outputs.insert(name, output);
    }
    CommandsConfig {
        state: base.join(&c.state),
        desired_topic,
        reported_topic,
        min_interval,
        max_interval,
        fetch_timeout,
        outputs,
    }
}

fn queue_config(base: &Path, q: QueueFile, p: &mut Problems) -> QueueConfig {
    let max_bytes = p.bytes("queue.max_bytes", &q.max_bytes);
    if max_bytes > 0 && max_bytes < 1 << 20 {
        p.add(
            "queue.max_bytes",
            format!("{} is too small for a queue", q.max_bytes),
            "give at least 1MiB (e.g. 64MiB: about 400,000 readings)",
        );
    }
    let fsync = match q.fsync.trim() {
        "always" => Fsync::Always,
        "never" => Fsync::Never,
        other => match humantime::parse_duration(other) {
            Ok(d) if !d.is_zero() => Fsync::Every(d),
            _ => {
                p.add(
                    "queue.fsync",
                    format!("`{other}` is not a fsync policy"),
                    "write `always`, `never`, or the longest time between fsyncs, e.g. 1s",
                );
                Fsync::Never
            }
        },
    };
    QueueConfig {
        path: base.join(&q.path),
        max_bytes,
        fsync,
    }
}

fn batch_config(b: BatchFile, p: &mut Problems) -> BatchConfig {
    let max_bytes = p.bytes("batch.max_bytes", &b.max_bytes) as usize;
    // IoT Core refuses messages over 128 KB; leave room for the MQTT header and topic.
    if !(1024..=120 * 1024).contains(&max_bytes) {
        p.add(
            "batch.max_bytes",
            format!("{} is outside 1KiB..120KiB", b.max_bytes),
            "IoT Core takes messages up to 128 KB; 96KiB leaves room for the topic and header",
        );
    }
    if b.max_readings == 0 {
        p.add("batch.max_readings", "must be at least 1", "e.g. 500");
    }
    let max_age = p.duration("batch.max_age", &b.max_age);
    BatchConfig {
        max_readings: b.max_readings,
        max_bytes,
        max_age,
    }
}

fn transport_config(base: &Path, t: TransportFile, device_id: &str, p: &mut Problems) -> Transport {
    match t {
        TransportFile::Local { stream, shards } => {
            if shards == 0 {
                p.add(
                    "transport.local.shards",
                    "a stream needs at least one shard",
                    "e.g. 4",
                );
            }
            Transport::Local {
                stream: base.join(&stream),
                shards,
            }
        }
        TransportFile::Kinesis { stream, region } => Transport::Kinesis { stream, region },
        TransportFile::Mqtt(m) => Transport::Mqtt(mqtt_config(base, m, device_id, p)),
    }
}

fn mqtt_config(base: &Path, m: MqttFile, device_id: &str, p: &mut Problems) -> MqttConfig {
    let at = |f: &str| format!("transport.mqtt.{f}");
    if !super::commands::is_device_topic(&m.topic) {
        p.add(
            &at("topic"),
            format!("`{}` is not a publish topic for one device", m.topic),
            "include {device_id} and no wildcards, e.g. sensors/{tenant}/{device_id}/telemetry (the IoT rule keys the stream by the tenant and device levels)",
        );
    }
    if !(1..=1000).contains(&m.max_publishes_per_s) {
        p.add(
            &at("max_publishes_per_s"),
            format!("{} is outside 1..1000", m.max_publishes_per_s),
            "IoT Core allows 100 publishes per second per connection",
        );
    }
    let keep_alive = p.duration(&at("keep_alive"), &m.keep_alive);
    if keep_alive < Duration::from_secs(5) {
        p.add(
            &at("keep_alive"),
            "shorter than 5s",
            "IoT Core accepts 30s to 1200s; e.g. 30s",
        );
    }
    let ack_timeout = p.duration(&at("ack_timeout"), &m.ack_timeout);
    MqttConfig {
        host: m.host,
        port: m.port,
        client_id: m.client_id.unwrap_or_else(|| device_id.to_string()),
        topic: m.topic,
        ca: base.join(&m.ca),
        cert: base.join(&m.cert),
        key: base.join(&m.key),
        keep_alive,
        ack_timeout,
        max_publishes_per_s: m.max_publishes_per_s,
    }
}

fn sensor_configs(sensors: Vec<SensorFile>, p: &mut Problems) -> Vec<SensorConfig> {
    if sensors.is_empty() {
        p.add(
            "sensors",
            "no sensors are configured",
            "list at least one sensor (see deploy/pi/agent.yaml)",
        );
    }
    let mut names = std::collections::HashSet::new();
    sensors
        .into_iter()
        .enumerate()
        .filter_map(|(i, s)| sensor_config(&format!("sensors[{i}]"), s, &mut names, p))
        .collect()
}

/// One sensor, `None` if it has no kind or more than one (the problem is recorded); `names`
/// holds the names seen so far.
fn sensor_config(
    at: &str,
    mut s: SensorFile,
    names: &mut std::collections::HashSet<String>,
    p: &mut Problems,
) -> Option<SensorConfig> {
    if bad_id(&s.name) {
        p.add(
            &format!("{at}.name"),
            format!("`{}` is not a sensor name", s.name),
            "use letters, digits and `-_.:`",
        );
    }
    if !names.insert(s.name.clone()) {
        p.add(
            &format!("{at}.name"),
            format!("sensor `{}` is listed twice", s.name),
            "give every sensor its own name",
        );
    }
    let interval = p.duration(&format!("{at}.interval"), &s.interval);
    if interval < Duration::from_millis(10) && !interval.is_zero() {
        p.add(
            &format!("{at}.interval"),
            format!("{} is shorter than 10ms", s.interval),
            "sample at most 100 times a second",
        );
    }
    if let Some(f) = &s.field
        && !crate::config::is_ident(f)
    {
        p.add(
            &format!("{at}.field"),
            format!("`{f}` is not a valid field name"),
            "use lowercase letters, digits and `_` (Athena needs that)",
        );
    }
    let kind = sensor_kind(at, &mut s, p)?;
    if matches!(kind, SensorKind::WellSim { .. }) && (s.field.is_some() || s.unit.is_some()) {
        p.add(
            at,
            "well_sim reports three fields; `field` and `unit` do not apply",
            "remove `field` and `unit`",
        );
    }
    Some(SensorConfig {
        name: s.name,
        interval,
        field: s.field,
        unit: s.unit,
        factor: s.factor.unwrap_or(1.0),
        kind,
    })
}

/// The sensor's kind, taken out of `s`: exactly one of its kind sections must be set.
fn sensor_kind(at: &str, s: &mut SensorFile, p: &mut Problems) -> Option<SensorKind> {
    let mut kinds = Vec::new();
    if let Some(d) = s.ds18b20.take() {
        if !d.device.starts_with("28-") {
            p.add(
                &format!("{at}.ds18b20.device"),
                format!("`{}` is not a DS18B20 id", d.device),
                "DS18B20 ids start with 28- (ls /sys/bus/w1/devices)",
            );
        }
        kinds.push(SensorKind::Ds18b20 { device: d.device });
    }
    if let Some(d) = s.iio.take() {
        kinds.push(SensorKind::Iio {
            device: d.device,
            channel: d.channel,
        });
    }
    if let Some(h) = s.hwmon.take() {
        kinds.push(SensorKind::Hwmon {
            chip: h.chip,
            input: h.input,
        });
    }
    if let Some(t) = s.thermal.take() {
        kinds.push(SensorKind::Thermal { zone: t.zone });
    }
    if let Some(c) = s.command.take() {
        if c.run.is_empty() {
            p.add(
                &format!("{at}.command.run"),
                "the command is empty",
                "give the program and its arguments, e.g. [cat, /proc/loadavg]",
            );
        }
        let timeout = p.duration(&format!("{at}.command.timeout"), &c.timeout);
        kinds.push(SensorKind::Command {
            run: c.run,
            word: c.word,
            timeout,
        });
    }
    if let Some(w) = s.well_sim.take() {
        kinds.push(SensorKind::WellSim {
            seed: w.seed,
            spike_every: w.spike_every,
        });
    }
    match kinds.len() {
        1 => kinds.pop(),
        0 => {
            p.add(at, "the sensor has no kind", format!("add one of {KINDS}"));
            None
        }
        _ => {
            p.add(
                at,
                "the sensor has more than one kind",
                format!("keep exactly one of {KINDS}"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn every_problem_is_named_with_its_field_and_line() {
        let (_d, path) = write(
            "device_id: pi/1\ntenant: acme\ntransport: {local: {stream: s}}\nqueue: {fsync: sometimes}\nsensors:\n  - {name: a, interval: 1s}\n  - {name: a, interval: 1s, thermal: {zone: '0'}, hwmon: {chip: x, input: temp1_input}}\n  - {name: b, interval: 2 weeks, ds18b20: {device: 10-abc}, colour: red}\n",
        );
        let err = load(&path, &|_| None).unwrap_err();
        let text = err.to_string();
        for want in [
            "agent.yaml:1: device_id: `pi/1` cannot be used",
            "agent.yaml:4: queue.fsync: `sometimes` is not a fsync policy",
            "agent.yaml:6: sensors[0]: the sensor has no kind",
            "agent.yaml:7: sensors[1].name: sensor `a` is listed twice",
            "agent.yaml:7: sensors[1]: the sensor has more than one kind",
            "sensors[2].ds18b20.device: `10-abc` is not a DS18B20 id",
            "sensors[2].colour: unknown key `colour`",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn loads_the_example_with_relative_paths() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/pi/agent.yaml");
        let cfg = load(&path, &|v| (v == "DEVICE_ID").then(|| "pi-0042".into())).unwrap();
        assert_eq!(cfg.device_id, "pi-0042");
        assert!(cfg.sensors.len() >= 6, "{:?}", cfg.sensors);
        assert!(matches!(cfg.queue.fsync, Fsync::Every(d) if d == Duration::from_secs(1)));
    }
}
