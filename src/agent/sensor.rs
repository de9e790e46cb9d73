//! Reading sensors: 1-wire DS18B20, IIO, hwmon, thermal zones, a command's output and the
//! oil-well simulator. Each sample gives one value per field, already in the unit it reports
//! (IIO and hwmon report milli-units; they are converted to °C, V, A, W, kPa, %RH).
//!
//! Files are read through `tokio::fs` (a blocking pool): reading a DS18B20's `w1_slave` makes
//! the kernel convert for ~750 ms, which must not hold up the other sensors.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::config::{SensorConfig, SensorKind};

/// One value of a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub field: String,
    pub value: f64,
    pub unit: String,
}

/// Why a sample failed. The sensor is retried at its next interval.
#[derive(Debug, thiserror::Error)]
pub enum SensorError {
    /// The device or file is not there (unplugged, driver not loaded, wrong id).
    #[error("{path} does not exist: {hint}")]
    Missing { path: PathBuf, hint: &'static str },
    /// Reading the file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A DS18B20 scratchpad whose CRC does not match (a noisy or long 1-wire line).
    #[error("{path}: CRC mismatch: {detail}")]
    Crc { path: PathBuf, detail: String },
    /// A DS18B20 that returned its power-on value (85 °C) instead of a conversion.
    #[error(
        "{path}: 85 °C is the DS18B20's power-on value, not a reading (check the power wiring)"
    )]
    PowerOnReset { path: PathBuf },
    /// The text is not what the kernel (or the command) writes.
    #[error("{path}: cannot parse {text:?}: {why}")]
    Parse {
        path: PathBuf,
        text: String,
        why: String,
    },
    /// The command failed, timed out or printed no number.
    #[error("command {command:?}: {why}")]
    Command { command: String, why: String },
}

/// A configured sensor and what it keeps between samples.
pub struct Sensor {
    pub config: SensorConfig,
    root: PathBuf,
    sim: Option<WellSim>,
}

impl Sensor {
    pub fn new(config: SensorConfig, sysfs_root: &Path) -> Self {
        let sim = match config.kind {
            SensorKind::WellSim { seed, spike_every } => {
                Some(WellSim::new(seed ^ name_hash(&config.name), spike_every))
            }
            _ => None,
        };
        Self {
            config,
            root: sysfs_root.to_path_buf(),
            sim,
        }
    }

    pub async fn sample(&mut self) -> Result<Vec<Value>, SensorError> {
        let c = &self.config;
        let one = |field: String, value: f64, unit: &str| {
            vec![Value {
                field: c.field.clone().unwrap_or(field),
                value: value * c.factor,
                unit: c.unit.clone().unwrap_or_else(|| unit.to_string()),
            }]
        };
        match &c.kind {
            SensorKind::Ds18b20 { device } => {
                let path = self.sys("sys/bus/w1/devices").join(device).join("w1_slave");
                let text = read(
                    &path,
                    "is the 1-wire overlay on (dtoverlay=w1-gpio) and the id right?",
                )
                .await?;
                Ok(one("temp_c".into(), parse_w1_slave(&path, &text)?, "degC"))
            }
            SensorKind::Iio { device, channel } => {
                let dir = self
                    .find_by_name("sys/bus/iio/devices", "iio:device", device)
                    .await?;
                let raw = iio_value(&dir, channel).await?;
                let (factor, unit, field) = iio_unit(channel);
                Ok(one(field, raw * factor, unit))
            }
            SensorKind::Hwmon { chip, input } => {
                let dir = self.find_by_name("sys/class/hwmon", "hwmon", chip).await?;
                let path = dir.join(input);
                let v = read_number(&path, "list the chip's *_input files").await?;
                let (factor, unit) = hwmon_unit(input);
                let field = input.strip_suffix("_input").unwrap_or(input).to_string();
                Ok(one(field, v * factor, unit))
            }
            SensorKind::Thermal { zone } => {
                let dir = self
                    .find_by_file("sys/class/thermal", "thermal_zone", zone, "type")
                    .await?;
                let v = read_number(&dir.join("temp"), "").await?;
                Ok(one("temp_c".into(), v / 1000.0, "degC"))
            }
            SensorKind::Command { run, word, timeout } => {
                let out = run_command(run, *timeout).await?;
                let v = nth_number(&out, *word).ok_or_else(|| SensorError::Command {
                    command: run.join(" "),
                    why: format!("its output {:?} has no number #{word}", out.trim()),
                })?;
                Ok(one("value".into(), v, ""))
            }
            SensorKind::WellSim { .. } => {
                let sim = self.sim.as_mut().expect("set for well_sim");
                Ok(sim.next(self.config.factor))
            }
        }
    }

    fn sys(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// `dir/<prefix>N` by its `name` file, or `<prefix>N` itself.
    async fn find_by_name(
        &self,
        dir: &str,
        prefix: &str,
        want: &str,
    ) -> Result<PathBuf, SensorError> {
        self.find_by_file(dir, prefix, want, "name").await
    }

    async fn find_by_file(
        &self,
        dir: &str,
        prefix: &str,
        want: &str,
        file: &str,
    ) -> Result<PathBuf, SensorError> {
        let base = self.sys(dir);
        let direct = if want.starts_with(prefix) {
            base.join(want)
        } else if want.chars().all(|c| c.is_ascii_digit()) {
            base.join(format!("{prefix}{want}"))
        } else {
            PathBuf::new()
        };
        if !direct.as_os_str().is_empty() {
            return if tokio::fs::metadata(&direct).await.is_ok() {
                Ok(direct)
            } else {
                Err(SensorError::Missing {
                    path: direct,
                    hint: "is the driver loaded?",
                })
            };
        }
        let mut entries = tokio::fs::read_dir(&base)
            .await
            .map_err(|_| SensorError::Missing {
                path: base.clone(),
                hint: "no such class of device on this machine",
            })?;
        while let Ok(Some(e)) = entries.next_entry().await {
            if !e.file_name().to_string_lossy().starts_with(prefix) {
                continue;
            }
            if let Ok(name) = tokio::fs::read_to_string(e.path().join(file)).await
                && name.trim() == want
            {
                return Ok(e.path());
            }
        }
        Err(SensorError::Missing {
            path: base.join(format!("{prefix}*/{file} = {want}")),
            hint: "no device has that name; is it connected and its driver loaded?",
        })
    }
}

async fn read(path: &Path, hint: &'static str) -> Result<String, SensorError> {
    tokio::fs::read_to_string(path).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            SensorError::Missing {
                path: path.to_path_buf(),
                hint,
            }
        } else {
            SensorError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })
}

async fn read_number(path: &Path, hint: &'static str) -> Result<f64, SensorError> {
    let text = read(path, hint).await?;
    text.trim().parse().map_err(|e| SensorError::Parse {
        path: path.to_path_buf(),
        text: text.trim().to_string(),
        why: format!("{e}"),
    })
}

/// Dallas/Maxim CRC-8 (x⁸ + x⁵ + x⁴ + 1, reflected), as the DS18B20 computes it.
pub fn crc8(data: &[u8]) -> u8 {
    let mut crc = 0u8;
    for &byte in data {
        let mut b = byte;
        for _ in 0..8 {
            let mix = (crc ^ b) & 1;
            crc >>= 1;
            if mix != 0 {
                crc ^= 0x8C;
            }
            b >>= 1;
        }
    }
    crc
}

/// `w1_slave`: the scratchpad twice, the first line ending `crc=XX YES|NO`, the second
/// `t=<millidegrees>`. The CRC is checked here too, not only trusted from the kernel's YES.
pub fn parse_w1_slave(path: &Path, text: &str) -> Result<f64, SensorError> {
    let bad = |why: &str| SensorError::Parse {
        path: path.to_path_buf(),
        text: text.trim().to_string(),
        why: why.to_string(),
    };
    let mut lines = text.lines();
    let (first, second) = (
        lines.next().ok_or_else(|| bad("empty"))?,
        lines.next().ok_or_else(|| bad("one line; expected two"))?,
    );
    let bytes: Vec<u8> = first
        .split(':')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| bad("the scratchpad is not hex bytes"))?;
    if bytes.len() != 9 {
        return Err(bad("the scratchpad is not 9 bytes"));
    }
    let computed = crc8(&bytes[..8]);
    if computed != bytes[8] || !first.trim_end().ends_with("YES") {
        return Err(SensorError::Crc {
            path: path.to_path_buf(),
            detail: format!(
                "scratchpad CRC {:02x}, computed {computed:02x}, kernel says {}",
                bytes[8],
                first.split_whitespace().last().unwrap_or("?")
            ),
        });
    }
    let milli: i64 = second
        .rsplit_once("t=")
        .ok_or_else(|| bad("no t= on the second line"))?
        .1
        .trim()
        .parse()
        .map_err(|_| bad("t= is not an integer"))?;
    // 0x0550 in the temperature register with the reset configuration: no conversion happened.
    if bytes[0] == 0x50 && bytes[1] == 0x05 && milli == 85_000 {
        return Err(SensorError::PowerOnReset {
            path: path.to_path_buf(),
        });
    }
    Ok(milli as f64 / 1000.0)
}

/// `in_<channel>_input` if the driver gives a processed value, else
/// `(in_<channel>_raw + offset) × scale`, the scale and offset per channel or per type
/// (`in_voltage0_raw` with `in_voltage_scale`), as the IIO ABI describes.
async fn iio_value(dir: &Path, channel: &str) -> Result<f64, SensorError> {
    let input = dir.join(format!("in_{channel}_input"));
    if tokio::fs::metadata(&input).await.is_ok() {
        return read_number(&input, "").await;
    }
    let raw = read_number(
        &dir.join(format!("in_{channel}_raw")),
        "the device has no such channel (ls its in_*_raw files)",
    )
    .await?;
    let kind = iio_type(channel);
    let attr = |name: &str| {
        [
            dir.join(format!("in_{channel}_{name}")),
            dir.join(format!("in_{kind}_{name}")),
        ]
    };
    let mut scale = 1.0;
    for p in attr("scale") {
        if tokio::fs::metadata(&p).await.is_ok() {
            scale = read_number(&p, "").await?;
            break;
        }
    }
    let mut offset = 0.0;
    for p in attr("offset") {
        if tokio::fs::metadata(&p).await.is_ok() {
            offset = read_number(&p, "").await?;
            break;
        }
    }
    Ok((raw + offset) * scale)
}

/// `voltage0` → `voltage`, `accel_x` → `accel`, `temp` → `temp`.
fn iio_type(channel: &str) -> &str {
    let head = channel.split('_').next().unwrap_or(channel);
    head.trim_end_matches(|c: char| c.is_ascii_digit())
}

/// IIO's units (milli °C, mV, mA, kPa, milli %RH) to what a reading reports.
fn iio_unit(channel: &str) -> (f64, &'static str, String) {
    let field = |suffix: &str| format!("{}_{suffix}", channel.replace('-', "_"));
    match iio_type(channel) {
        "temp" => (0.001, "degC", field("c")),
        "voltage" => (0.001, "V", field("v")),
        "current" => (0.001, "A", field("a")),
        "pressure" => (1.0, "kPa", field("kpa")),
        "humidityrelative" => (0.001, "%RH", field("pct")),
        "illuminance" => (1.0, "lux", field("lux")),
        _ => (1.0, "", channel.replace('-', "_")),
    }
}

/// hwmon's units (milli °C, mV, mA, µW, µJ, RPM) to what a reading reports.
fn hwmon_unit(input: &str) -> (f64, &'static str) {
    let kind = input.trim_start_matches(|c: char| c.is_ascii_alphabetic());
    let prefix = &input[..input.len() - kind.len()];
    match prefix {
        "temp" => (0.001, "degC"),
        "in" => (0.001, "V"),
        "curr" => (0.001, "A"),
        "power" => (1e-6, "W"),
        "energy" => (1e-6, "J"),
        "fan" => (1.0, "rpm"),
        "humidity" => (0.001, "%RH"),
        _ => (1.0, ""),
    }
}

/// The `n`-th number in `text` (`temp=45.1'C` → 45.1; `0.52 0.58 0.59 1/389` → 0.52, …).
pub fn nth_number(text: &str, n: usize) -> Option<f64> {
    let b = text.as_bytes();
    // A number starts after a non-word character: `in_voltage0` holds none, `1/389` two.
    let boundary = |i: usize| i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'.');
    let (mut found, mut i) = (0, 0);
    while i < b.len() {
        let negative = b[i] == b'-' && b.get(i + 1).is_some_and(u8::is_ascii_digit);
        if !((b[i].is_ascii_digit() || negative) && boundary(i)) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.') {
            j += 1;
        }
        if found == n {
            return text[i..j].trim_end_matches('.').parse().ok();
        }
        found += 1;
        i = j;
    }
    None
}

async fn run_command(run: &[String], timeout: Duration) -> Result<String, SensorError> {
    let fail = |why: String| SensorError::Command {
        command: run.join(" "),
        why,
    };
    let child = tokio::process::Command::new(&run[0])
        .args(&run[1..])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, child)
        .await
        .map_err(|_| fail(format!("did not finish within {timeout:?}")))?
        .map_err(|e| fail(format!("cannot start: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(fail(format!(
            "{}: {}",
            out.status,
            err.lines().next().unwrap_or("").trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a: stable across runs and builds (std's hasher is not).
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One simulated well: flow drifting around a base, reservoir pressure with slow waves and
/// a spike every `spike_every` samples, temperature with noise.
struct WellSim {
    rng: fastrand::Rng,
    step: u64,
    spike_every: u64,
    base_pressure: f64,
    base_flow: f64,
    base_temp: f64,
}

impl WellSim {
    fn new(seed: u64, spike_every: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        Self {
            base_pressure: 1_800.0 + rng.f64() * 800.0,
            base_flow: 0.3 + rng.f64() * 0.9,
            base_temp: 60.0 + rng.f64() * 35.0,
            rng,
            step: 0,
            spike_every,
        }
    }

    fn next(&mut self, factor: f64) -> Vec<Value> {
        self.step += 1;
        let t = self.step as f64 / 600.0;
        let mut noise = |scale: f64| (self.rng.f64() - 0.5) * 2.0 * scale;
        let spike = self.spike_every > 0 && self.step.is_multiple_of(self.spike_every);
        let pressure = if spike {
            5_200.0 + noise(400.0).abs() * 2.0
        } else {
            self.base_pressure + 40.0 * t.sin() + noise(15.0)
        };
        let flow = (self.base_flow + 0.05 * (t * 1.3).cos() + noise(0.02)).max(0.0);
        let temp = self.base_temp + noise(0.5);
        [
            ("barrels_per_s", flow, "bbl/s"),
            ("pressure_psi", pressure, "psi"),
            ("temp_c", temp, "degC"),
        ]
        .into_iter()
        .map(|(f, v, u)| Value {
            field: f.into(),
            value: v * factor,
            unit: u.into(),
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc8_matches_a_real_scratchpad() {
        // From a DS18B20 at 23.125 °C: `72 01 4b 46 7f ff 0e 10 57 : crc=57 YES`.
        assert_eq!(
            crc8(&[0x72, 0x01, 0x4b, 0x46, 0x7f, 0xff, 0x0e, 0x10]),
            0x57
        );
    }

    #[test]
    fn numbers_in_command_output() {
        assert_eq!(nth_number("temp=45.1'C\n", 0), Some(45.1));
        assert_eq!(nth_number("0.52 0.58 0.59 1/389 12345", 2), Some(0.59));
        assert_eq!(nth_number("0.52 0.58 0.59 1/389 12345", 4), Some(389.0));
        assert_eq!(nth_number("0.52 0.58 0.59 1/389 12345", 5), Some(12345.0));
        assert_eq!(nth_number("level: -3.5 dB", 0), Some(-3.5));
        assert_eq!(nth_number("no digits", 0), None);
    }

    #[test]
    fn units_follow_the_kernel_abis() {
        assert_eq!(hwmon_unit("temp1_input"), (0.001, "degC"));
        assert_eq!(hwmon_unit("fan2_input"), (1.0, "rpm"));
        assert_eq!(hwmon_unit("power1_input"), (1e-6, "W"));
        assert_eq!(iio_type("voltage0"), "voltage");
        assert_eq!(iio_type("accel_x"), "accel");
        assert_eq!(iio_unit("voltage0").2, "voltage0_v");
    }

    fn sensor(kind: SensorKind) -> Sensor {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/sysfs");
        Sensor::new(
            SensorConfig {
                name: "s".into(),
                interval: Duration::from_secs(1),
                field: None,
                unit: None,
                factor: 1.0,
                kind,
            },
            &root,
        )
    }

    async fn one(kind: SensorKind) -> Result<(String, f64, String), SensorError> {
        let v = sensor(kind).sample().await?;
        assert_eq!(v.len(), 1, "{v:?}");
        let v = v.into_iter().next().unwrap();
        Ok((v.field, v.value, v.unit))
    }

    fn close(got: (String, f64, String), field: &str, value: f64, unit: &str) {
        assert_eq!((got.0.as_str(), got.2.as_str()), (field, unit));
        assert!((got.1 - value).abs() < 1e-9, "{} != {value}", got.1);
    }

    fn ds(id: &str) -> SensorKind {
        SensorKind::Ds18b20 { device: id.into() }
    }

    fn iio(device: &str, channel: &str) -> SensorKind {
        SensorKind::Iio {
            device: device.into(),
            channel: channel.into(),
        }
    }

    #[tokio::test]
    async fn ds18b20_readings_crc_failures_and_missing_devices() {
        close(
            one(ds("28-0316a2793fff")).await.unwrap(),
            "temp_c",
            23.125,
            "degC",
        );
        close(
            one(ds("28-0516b0c4e2ff")).await.unwrap(),
            "temp_c",
            -10.125,
            "degC",
        );
        let e = one(ds("28-03172179a1ff")).await.unwrap_err();
        assert!(matches!(e, SensorError::Crc { .. }), "{e}");
        assert!(e.to_string().contains("kernel says NO"), "{e}");
        // The kernel said YES, but the scratchpad's CRC is wrong: not trusted.
        let e = one(ds("28-0417c1b2c3ff")).await.unwrap_err();
        assert!(e.to_string().contains("kernel says YES"), "{e}");
        let e = one(ds("28-0118d4e5f6ff")).await.unwrap_err();
        assert!(matches!(e, SensorError::PowerOnReset { .. }), "{e}");
        let e = one(ds("28-00000badbeef")).await.unwrap_err();
        assert!(matches!(e, SensorError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("w1-gpio"), "{e}");
    }

    #[tokio::test]
    async fn iio_processed_raw_scaled_and_offset() {
        close(
            one(iio("bme280", "temp")).await.unwrap(),
            "temp_c",
            23.45,
            "degC",
        );
        close(
            one(iio("bme280", "pressure")).await.unwrap(),
            "pressure_kpa",
            101.325,
            "kPa",
        );
        close(
            one(iio("iio:device0", "humidityrelative")).await.unwrap(),
            "humidityrelative_pct",
            45.123,
            "%RH",
        );
        // 13200 × 0.125 mV (the type's shared scale).
        close(
            one(iio("ads1115", "voltage0")).await.unwrap(),
            "voltage0_v",
            1.65,
            "V",
        );
        // (1000 − 500) × 62.5 m°C.
        close(
            one(iio("tmp117", "temp")).await.unwrap(),
            "temp_c",
            31.25,
            "degC",
        );
        let e = one(iio("bme680", "temp")).await.unwrap_err();
        assert!(matches!(e, SensorError::Missing { .. }), "{e}");
        let e = one(iio("ads1115", "voltage3")).await.unwrap_err();
        assert!(matches!(e, SensorError::Missing { .. }), "{e}");
    }

    #[tokio::test]
    async fn hwmon_and_thermal_zones_by_name() {
        let hw = |chip: &str, input: &str| SensorKind::Hwmon {
            chip: chip.into(),
            input: input.into(),
        };
        close(
            one(hw("cpu_thermal", "temp1_input")).await.unwrap(),
            "temp1",
            48.312,
            "degC",
        );
        close(
            one(hw("pwmfan", "fan1_input")).await.unwrap(),
            "fan1",
            3120.0,
            "rpm",
        );
        close(
            one(hw("hwmon1", "fan1_input")).await.unwrap(),
            "fan1",
            3120.0,
            "rpm",
        );
        assert!(one(hw("pwmfan", "fan2_input")).await.is_err());
        let zone = |z: &str| SensorKind::Thermal { zone: z.into() };
        close(
            one(zone("cpu-thermal")).await.unwrap(),
            "temp_c",
            48.312,
            "degC",
        );
        close(one(zone("0")).await.unwrap(), "temp_c", 48.312, "degC");
        let e = one(zone("gpu-thermal")).await.unwrap_err();
        assert!(matches!(e, SensorError::Parse { .. }), "{e}");
    }

    #[tokio::test]
    async fn commands_and_the_well_simulator() {
        let cmd = |run: &[&str], word| SensorKind::Command {
            run: run.iter().map(|s| s.to_string()).collect(),
            word,
            timeout: Duration::from_secs(5),
        };
        close(
            one(cmd(&["echo", "temp=45.1'C"], 0)).await.unwrap(),
            "value",
            45.1,
            "",
        );
        let e = one(cmd(&["sh", "-c", "echo broken >&2; exit 3"], 0))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("broken"), "{e}");
        let e = one(cmd(&["/nonexistent/vcgencmd"], 0)).await.unwrap_err();
        assert!(e.to_string().contains("cannot start"), "{e}");
        let slow = SensorKind::Command {
            run: vec!["sleep".into(), "5".into()],
            word: 0,
            timeout: Duration::from_millis(200),
        };
        assert!(
            one(slow)
                .await
                .unwrap_err()
                .to_string()
                .contains("did not finish")
        );
        let mut well = sensor(SensorKind::WellSim {
            seed: 1,
            spike_every: 3,
        });
        let samples: Vec<Vec<Value>> = [0; 3].iter().map(|_| sim_next(&mut well)).collect();
        let fields: Vec<&str> = samples[0].iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["barrels_per_s", "pressure_psi", "temp_c"]);
        assert!(samples[0][1].value < 3_000.0 && samples[2][1].value > 5_000.0);
    }

    fn sim_next(s: &mut Sensor) -> Vec<Value> {
        let sim = s.sim.as_mut().unwrap();
        sim.next(1.0)
    }
}
