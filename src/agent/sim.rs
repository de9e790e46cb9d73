//! Simulated oil wells: per device a reading every `interval` with `device_id`, `tenant`, a
//! per-device monotonic `seq`, an RFC 3339 `ts` (some devices report a local offset), barrels
//! per second, reservoir pressure, temperature and status. A few pressure spikes and a few
//! malformed records are injected at seeded random places, so a run is reproducible.
//!
//! Off by default (so the output above stays the same for a seed): per-well noise levels
//! (`well_noise`: Gaussian noise, each well its own standard deviation), a 24 h cycle of
//! pressure and temperature (`diurnal`), and labelled anomalies (`anomalies` of each kind in
//! [`ANOMALY_KINDS`], each on a well of its own), returned as [`Label`]s.

use std::io;

use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};

use crate::localstream::LocalStreamWriter;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub devices: usize,
    pub tenants: Vec<String>,
    /// Event time of the first reading.
    pub start: DateTime<Utc>,
    pub readings_per_device: usize,
    /// The first step simulated (0: from `start`). A later run with the same `start`,
    /// `devices` and `seed` continues the same wells: step `n` is at `start + n × interval`
    /// with `seq` n + 1, so a stream can be extended without repeating a `(device_id, seq)`.
    pub first_step: usize,
    pub interval_ms: i64,
    /// Readings arrive up to this much out of order (event time jitter).
    pub jitter_ms: i64,
    pub spikes: usize,
    pub malformed: usize,
    pub seed: u64,
    /// Gaussian noise with a standard deviation of each well's own (off: the same uniform
    /// noise on every well).
    pub well_noise: bool,
    /// A 24 h sine on pressure and temperature (amplitude and phase per well); turns on
    /// `well_noise` too.
    pub diurnal: bool,
    /// Labelled anomalies of each kind of [`ANOMALY_KINDS`]; each lands on a well of its
    /// own (at most `devices` in all). Any turns on `well_noise` too, whose standard
    /// deviation the magnitudes are given in.
    pub anomalies: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            devices: 120,
            tenants: vec!["acme".into(), "borealis".into(), "cascade".into()],
            start: Utc::now() - chrono::Duration::minutes(30),
            readings_per_device: 1_800,
            first_step: 0,
            interval_ms: 1_000,
            jitter_ms: 2_000,
            spikes: 8,
            malformed: 12,
            seed: 42,
            well_noise: false,
            diurnal: false,
            anomalies: 0,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimSummary {
    pub readings: u64,
    pub spikes: u64,
    pub malformed: u64,
    /// The labelled anomalies injected, in the order of [`ANOMALY_KINDS`], then device.
    pub labels: Vec<Label>,
}

/// The labelled anomaly kinds. `noise_burst` (the noise's variance times 6 to 12 for a
/// while) is a distractor: normal if noisy operation, labelled so that alerts on it can be
/// told apart from false positives elsewhere.
pub const ANOMALY_KINDS: &[&str] = &[
    "spike",
    "level_shift",
    "drift",
    "stuck",
    "dropout",
    "noise_burst",
];

/// One injected anomaly. `start` is the nominal event time of the first reading affected
/// (`start_seq`), `end` the latest event time the last one (`end_seq`) can have (its nominal
/// time plus the jitter bound). `field` is `None` for a dropout (the whole device is silent;
/// its seqs `start_seq..=end_seq` are never sent).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Label {
    pub kind: String,
    pub device_id: String,
    pub field: Option<String>,
    pub start: String,
    pub end: String,
    pub start_seq: u64,
    pub end_seq: u64,
}

/// An anomaly as the simulation applies it: steps relative to the run (`0..readings`).
#[derive(Debug, Clone, Copy)]
struct Anomaly {
    kind: usize,
    first: usize,
    last: usize,
    /// spike, level_shift, drift: pressure offset in the well's standard deviations (a
    /// drift's at its end); noise_burst: variance factor.
    magnitude: f64,
}

impl Anomaly {
    fn covers(&self, i: usize) -> bool {
        (self.first..=self.last).contains(&i)
    }
}

/// Draws the anomalies: each on a well of its own (a shuffle of the wells), kinds in turn.
fn plan_anomalies(cfg: &SimConfig) -> Vec<Option<Anomaly>> {
    let mut plan = vec![None; cfg.devices];
    let r = cfg.readings_per_device;
    if cfg.anomalies == 0 || r < 4 {
        return plan;
    }
    let mut rng = fastrand::Rng::with_seed(cfg.seed ^ 0xA20A_11E5);
    let mut wells: Vec<usize> = (0..cfg.devices).collect();
    rng.shuffle(&mut wells);
    let count = (cfg.anomalies * ANOMALY_KINDS.len()).min(cfg.devices);
    // Warm-up: no anomaly in the first fifth of a run (at most 300 readings).
    let margin = (r / 5).clamp(1, 300);
    for (j, &d) in wells.iter().take(count).enumerate() {
        let kind = j % ANOMALY_KINDS.len();
        let sign = if rng.bool() { 1.0 } else { -1.0 };
        let len = |rng: &mut fastrand::Rng, lo: usize, hi: usize, cap: usize| {
            rng.usize(lo..=hi).min(cap.max(1))
        };
        let (n, magnitude) = match ANOMALY_KINDS[kind] {
            "spike" => (1, sign * (12.0 + rng.f64() * 8.0)),
            "level_shift" => (0, sign * (5.0 + rng.f64() * 3.0)),
            "drift" => (
                len(&mut rng, 300, 600, r / 3),
                sign * (8.0 + rng.f64() * 4.0),
            ),
            "stuck" => (len(&mut rng, 60, 240, r / 4), 0.0),
            "dropout" => (len(&mut rng, 600, 1200, r / 3), 0.0),
            _ => (len(&mut rng, 120, 300, r / 4), 6.0 + rng.f64() * 6.0),
        };
        let (first, last) = if n == 0 {
            // A level shift stays to the end of the run.
            let first = rng.usize(margin..=(r - r / 5).max(margin));
            (first.min(r - 1), r - 1)
        } else {
            let latest = r.saturating_sub(n).max(margin);
            let first = rng.usize(margin..=latest).min(r - 1);
            (first, (first + n - 1).min(r - 1))
        };
        plan[d] = Some(Anomaly {
            kind,
            first,
            last,
            magnitude,
        });
    }
    plan
}

/// A standard normal draw (Box-Muller).
fn gauss(rng: &mut fastrand::Rng) -> f64 {
    let u = 1.0 - rng.f64();
    let v = rng.f64();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// Kinds of malformed record the simulator injects (each a different dead-letter reason).
const MALFORMED: &[&str] = &[
    r#"{"device_id":"well-x","tenant":"acme","seq":1,"ts":"2026-01-01T00:00:00Z","pressure_psi":"#,
    r#"{"device_id":"well-x","tenant":"acme","seq":1,"ts":"2026-01-01T00:00:00Z","pressure_psi":"high"}"#,
    r#"{"device_id":"well-x","tenant":"acme","seq":1,"pressure_psi":2000.0}"#,
    r#"{"device_id":"well-x","tenant":"acme","seq":1,"ts":"yesterday","pressure_psi":2000.0}"#,
    r#"["not","an","object"]"#,
    "\u{1}garbage",
];

pub fn simulate(cfg: &SimConfig, out: &mut LocalStreamWriter) -> io::Result<SimSummary> {
    // A continuation (`first_step`) draws other spikes and jitter than the steps before it.
    let mut rng = fastrand::Rng::with_seed(cfg.seed.wrapping_add(cfg.first_step as u64));
    let total = cfg.devices * cfg.readings_per_device;
    let pick = |rng: &mut fastrand::Rng, n: usize| {
        let mut v: Vec<usize> = (0..n).map(|_| rng.usize(0..total.max(1))).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let spikes = pick(&mut rng, cfg.spikes);
    let malformed = pick(&mut rng, cfg.malformed);
    // The wells come from a generator of their own, so that a continuation with other
    // spike or malformed counts (`first_step`) simulates the same wells.
    let mut well_rng = fastrand::Rng::with_seed(cfg.seed ^ 0x5EED_5EED);
    let wells: Vec<Well> = (0..cfg.devices)
        .map(|d| Well::new(d, cfg, &mut well_rng))
        .collect();
    let realistic = cfg.well_noise || cfg.diurnal || cfg.anomalies > 0;
    // Per-well noise levels and the daily cycle: a generator of their own again, drawn only
    // when asked for (the output without them stays what it was).
    let mut extra_rng = fastrand::Rng::with_seed(cfg.seed ^ 0xD1A5_0015);
    let extras: Vec<Extra> = if realistic {
        (0..cfg.devices)
            .map(|_| Extra::new(&mut extra_rng))
            .collect()
    } else {
        Vec::new()
    };
    let plan = plan_anomalies(cfg);
    let mut stuck: Vec<Option<f64>> = vec![None; cfg.devices];
    let mut summary = SimSummary::default();
    let mut line = String::with_capacity(256);
    let start_ms = cfg.start.timestamp_millis();
    for i in 0..cfg.readings_per_device {
        let step = cfg.first_step + i;
        for (d, well) in wells.iter().enumerate() {
            let n = i * cfg.devices + d;
            let jitter = if cfg.jitter_ms > 0 {
                rng.i64(0..cfg.jitter_ms)
            } else {
                0
            };
            let ts_ms = start_ms + step as i64 * cfg.interval_ms + jitter;
            let spike = spikes.binary_search(&n).is_ok();
            if realistic {
                let anomaly = plan[d].filter(|a| a.first <= i);
                if anomaly.is_some_and(|a| ANOMALY_KINDS[a.kind] == "dropout" && a.covers(i)) {
                    continue;
                }
                let values = well.realistic(
                    &extras[d],
                    cfg,
                    i,
                    ts_ms,
                    spike,
                    anomaly,
                    &mut stuck[d],
                    &mut rng,
                );
                well.format(&mut line, step, ts_ms, values);
            } else {
                well.reading(&mut line, step, ts_ms, spike, &mut rng);
            }
            out.put(&well.id, line.as_bytes())?;
            summary.readings += 1;
            summary.spikes += spike as u64;
            if let Ok(k) = malformed.binary_search(&n) {
                out.put(&well.id, MALFORMED[k % MALFORMED.len()].as_bytes())?;
                summary.malformed += 1;
            }
        }
    }
    out.flush()?;
    summary.labels = labels(cfg, &wells, &plan);
    Ok(summary)
}

fn labels(cfg: &SimConfig, wells: &[Well], plan: &[Option<Anomaly>]) -> Vec<Label> {
    let time = |step: usize, extra_ms: i64| {
        let ms = cfg.start.timestamp_millis() + step as i64 * cfg.interval_ms + extra_ms;
        DateTime::from_timestamp_millis(ms)
            .expect("in range")
            .to_rfc3339_opts(SecondsFormat::Millis, true)
    };
    let mut out: Vec<(usize, usize, Label)> = plan
        .iter()
        .enumerate()
        .filter_map(|(d, a)| a.map(|a| (d, a)))
        .map(|(d, a)| {
            let kind = ANOMALY_KINDS[a.kind];
            let first = cfg.first_step + a.first;
            let last = cfg.first_step + a.last;
            let label = Label {
                kind: kind.into(),
                device_id: wells[d].id.clone(),
                field: (kind != "dropout").then(|| "pressure_psi".into()),
                start: time(first, 0),
                end: time(last, (cfg.jitter_ms - 1).max(0)),
                start_seq: first as u64 + 1,
                end_seq: last as u64 + 1,
            };
            (a.kind, d, label)
        })
        .collect();
    out.sort_by_key(|(k, d, _)| (*k, *d));
    out.into_iter().map(|(_, _, l)| l).collect()
}

/// What a well has besides its bases when the simulation is realistic.
struct Extra {
    pressure_sd: f64,
    temp_sd: f64,
    flow_sd: f64,
    diurnal_pressure: f64,
    diurnal_temp: f64,
    phase: f64,
}

impl Extra {
    fn new(rng: &mut fastrand::Rng) -> Self {
        // Pressure noise 3 to 25 psi (log-uniform): quiet and noisy gauges in one fleet.
        Self {
            pressure_sd: 3.0 * (25.0f64 / 3.0).powf(rng.f64()),
            temp_sd: 0.1 + rng.f64() * 0.5,
            flow_sd: 0.005 + rng.f64() * 0.02,
            diurnal_pressure: 20.0 + rng.f64() * 60.0,
            diurnal_temp: 2.0 + rng.f64() * 6.0,
            phase: rng.f64() * std::f64::consts::TAU,
        }
    }
}

struct Values {
    flow: f64,
    pressure: f64,
    temp: f64,
}

struct Well {
    id: String,
    tenant: String,
    offset: FixedOffset,
    base_pressure: f64,
    base_flow: f64,
    base_temp: f64,
}

impl Well {
    fn new(d: usize, cfg: &SimConfig, rng: &mut fastrand::Rng) -> Self {
        // Every tenth well reports local time with an offset, as field gateways often do.
        let offset = if d % 10 == 7 {
            FixedOffset::east_opt(5 * 3600 + 1800)
        } else {
            FixedOffset::east_opt(0)
        };
        Self {
            id: format!("well-{d:04}"),
            tenant: cfg.tenants[d % cfg.tenants.len()].clone(),
            offset: offset.expect("valid offset"),
            base_pressure: 1_800.0 + rng.f64() * 800.0,
            base_flow: 0.3 + rng.f64() * 0.9,
            base_temp: 60.0 + rng.f64() * 35.0,
        }
    }

    fn reading(
        &self,
        line: &mut String,
        step: usize,
        ts_ms: i64,
        spike: bool,
        rng: &mut fastrand::Rng,
    ) {
        let t = step as f64 / 600.0;
        let noise = |rng: &mut fastrand::Rng, scale: f64| (rng.f64() - 0.5) * 2.0 * scale;
        let pressure = if spike {
            5_200.0 + rng.f64() * 800.0
        } else {
            self.base_pressure + 40.0 * t.sin() + noise(rng, 15.0)
        };
        let flow = (self.base_flow + 0.05 * (t * 1.3).cos() + noise(rng, 0.02)).max(0.0);
        let temp = self.base_temp + noise(rng, 0.5);
        self.format(
            line,
            step,
            ts_ms,
            Values {
                flow,
                pressure,
                temp,
            },
        );
    }

    /// One reading with the well's own noise level, the daily cycle (if asked for) and the
    /// anomaly of the well (if any has begun by run step `i`).
    #[allow(clippy::too_many_arguments)]
    fn realistic(
        &self,
        extra: &Extra,
        cfg: &SimConfig,
        i: usize,
        ts_ms: i64,
        spike: bool,
        anomaly: Option<Anomaly>,
        stuck: &mut Option<f64>,
        rng: &mut fastrand::Rng,
    ) -> Values {
        let step = cfg.first_step + i;
        let t = step as f64 / 600.0;
        let day = if cfg.diurnal {
            (ts_ms as f64 / 86_400_000.0 * std::f64::consts::TAU + extra.phase).sin()
        } else {
            0.0
        };
        let sd = extra.pressure_sd;
        let kind = anomaly.map(|a| ANOMALY_KINDS[a.kind]);
        let active = anomaly.is_some_and(|a| a.covers(i));
        let burst = match anomaly {
            Some(a) if active && kind == Some("noise_burst") => a.magnitude.sqrt(),
            _ => 1.0,
        };
        let mut pressure = self.base_pressure
            + 40.0 * t.sin()
            + extra.diurnal_pressure * day
            + gauss(rng) * sd * burst;
        if let Some(a) = anomaly {
            match kind.unwrap_or_default() {
                "spike" if active => pressure += a.magnitude * sd,
                "level_shift" => pressure += a.magnitude * sd,
                "drift" => {
                    let len = (a.last - a.first + 1) as f64;
                    let done = ((i - a.first + 1) as f64 / len).min(1.0);
                    pressure += a.magnitude * sd * done;
                }
                "stuck" if active => {
                    // The value written, rounded as written, repeats.
                    let v = *stuck.get_or_insert((pressure * 100.0).round() / 100.0);
                    pressure = v;
                }
                _ => {}
            }
        }
        if spike {
            pressure = 5_200.0 + rng.f64() * 800.0;
        }
        let flow = (self.base_flow + 0.05 * (t * 1.3).cos() + gauss(rng) * extra.flow_sd).max(0.0);
        let temp = self.base_temp + extra.diurnal_temp * day + gauss(rng) * extra.temp_sd;
        Values {
            flow,
            pressure,
            temp,
        }
    }

    fn format(&self, line: &mut String, step: usize, ts_ms: i64, values: Values) {
        let Values {
            flow,
            pressure,
            temp,
        } = values;
        let status = if step.is_multiple_of(997) && step > 0 {
            "maintenance"
        } else {
            "ok"
        };
        let ts = DateTime::from_timestamp_millis(ts_ms)
            .expect("in range")
            .with_timezone(&self.offset)
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        line.clear();
        use std::fmt::Write;
        let _ = write!(
            line,
            r#"{{"device_id":"{}","tenant":"{}","seq":{},"ts":"{}","barrels_per_s":{:.4},"pressure_psi":{:.2},"temp_c":{:.2},"status":"{}"}}"#,
            self.id,
            self.tenant,
            step + 1,
            ts,
            flow,
            pressure,
            temp,
            status
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_for_a_seed() {
        let run = || {
            let dir = tempfile::tempdir().unwrap();
            crate::localstream::create(dir.path(), 2).unwrap();
            let mut w = LocalStreamWriter::open(dir.path()).unwrap();
            let cfg = SimConfig {
                devices: 5,
                readings_per_device: 20,
                start: DateTime::from_timestamp(1_767_225_600, 0).unwrap(),
                spikes: 2,
                malformed: 3,
                ..Default::default()
            };
            let s = simulate(&cfg, &mut w).unwrap();
            drop(w);
            let a = std::fs::read(crate::localstream::shard_path(
                dir.path(),
                &crate::localstream::shard_id(0),
            ))
            .unwrap();
            (s, a)
        };
        let (s1, a1) = run();
        let (s2, a2) = run();
        assert_eq!(s1, s2);
        assert_eq!(a1, a2);
        assert_eq!(s1.readings, 100);
        assert_eq!((s1.spikes, s1.malformed), (2, 3));
    }

    #[test]
    fn a_continuation_goes_on_where_the_first_run_stopped() {
        let dir = tempfile::tempdir().unwrap();
        crate::localstream::create(dir.path(), 1).unwrap();
        let mut w = LocalStreamWriter::open(dir.path()).unwrap();
        let start = DateTime::from_timestamp(1_767_225_600, 0).unwrap();
        let base = SimConfig {
            devices: 2,
            readings_per_device: 3,
            start,
            jitter_ms: 0,
            spikes: 0,
            malformed: 0,
            ..Default::default()
        };
        simulate(&base, &mut w).unwrap();
        let more = SimConfig {
            first_step: 10,
            ..base
        };
        simulate(&more, &mut w).unwrap();
        drop(w);
        let text = std::fs::read_to_string(crate::localstream::shard_path(
            dir.path(),
            &crate::localstream::shard_id(0),
        ))
        .unwrap();
        let seen: Vec<(String, u64, String)> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let ts = v["ts"].as_str().unwrap().to_string();
                (
                    v["device_id"].as_str().unwrap().into(),
                    v["seq"].as_u64().unwrap(),
                    ts,
                )
            })
            .filter(|(d, _, _)| d == "well-0000")
            .collect();
        let seqs: Vec<u64> = seen.iter().map(|(_, s, _)| *s).collect();
        assert_eq!(seqs, [1, 2, 3, 11, 12, 13]);
        assert_eq!(seen[3].2, "2026-01-01T00:00:10.000Z");
    }

    /// A labelled run on one shard: the summary and every reading, parsed.
    fn labelled_run(cfg: &SimConfig) -> (SimSummary, Vec<serde_json::Value>) {
        let dir = tempfile::tempdir().unwrap();
        crate::localstream::create(dir.path(), 1).unwrap();
        let mut w = LocalStreamWriter::open(dir.path()).unwrap();
        let s = simulate(cfg, &mut w).unwrap();
        drop(w);
        let text = std::fs::read_to_string(crate::localstream::shard_path(
            dir.path(),
            &crate::localstream::shard_id(0),
        ))
        .unwrap();
        let rows = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (s, rows)
    }

    fn labelled_config() -> SimConfig {
        SimConfig {
            devices: 14,
            readings_per_device: 1_500,
            start: DateTime::from_timestamp(1_767_225_600, 0).unwrap(),
            spikes: 0,
            malformed: 0,
            diurnal: true,
            anomalies: 2,
            ..Default::default()
        }
    }

    fn series<'a>(rows: &'a [serde_json::Value], device: &str) -> Vec<&'a serde_json::Value> {
        rows.iter().filter(|r| r["device_id"] == device).collect()
    }

    fn in_label<'a>(
        rows: &'a [serde_json::Value],
        l: &Label,
    ) -> impl Iterator<Item = &'a serde_json::Value> {
        let (a, b) = (l.start_seq, l.end_seq);
        series(rows, &l.device_id)
            .into_iter()
            .filter(move |r| (a..=b).contains(&r["seq"].as_u64().unwrap()))
    }

    #[test]
    fn labelled_anomalies_are_deterministic_and_labelled() {
        let cfg = labelled_config();
        let (s1, rows1) = labelled_run(&cfg);
        let (s2, rows2) = labelled_run(&cfg);
        assert_eq!(s1, s2);
        assert_eq!(rows1, rows2);
        // Two of each kind, each on a well of its own.
        assert_eq!(s1.labels.len(), 2 * ANOMALY_KINDS.len());
        for k in ANOMALY_KINDS {
            assert_eq!(s1.labels.iter().filter(|l| l.kind == *k).count(), 2, "{k}");
        }
        let mut devices: Vec<&str> = s1.labels.iter().map(|l| l.device_id.as_str()).collect();
        devices.sort_unstable();
        devices.dedup();
        assert_eq!(devices.len(), s1.labels.len());
        // Every well sends every reading but those of its dropout.
        let dropped: u64 = s1
            .labels
            .iter()
            .filter(|l| l.kind == "dropout")
            .map(|l| l.end_seq - l.start_seq + 1)
            .sum();
        assert_eq!(s1.readings, 14 * 1_500 - dropped);
        assert_eq!(rows1.len() as u64, s1.readings);
        // Another seed, other anomalies.
        let (s3, _) = labelled_run(&SimConfig { seed: 7, ..cfg });
        assert_ne!(s1.labels, s3.labels);
    }

    #[test]
    fn the_labels_match_the_readings() {
        // Without the daily cycle the wander is known: what is left is base, noise, anomaly.
        let cfg = SimConfig {
            diurnal: false,
            ..labelled_config()
        };
        let (s, rows) = labelled_run(&cfg);
        let pressure = |r: &serde_json::Value| {
            let step = r["seq"].as_f64().unwrap() - 1.0;
            r["pressure_psi"].as_f64().unwrap() - 40.0 * (step / 600.0).sin()
        };
        let ts = |r: &serde_json::Value| {
            DateTime::parse_from_rfc3339(r["ts"].as_str().unwrap())
                .unwrap()
                .to_utc()
        };
        // The mean and standard deviation of a well's readings before its anomaly.
        let before = |l: &Label| {
            let v: Vec<f64> = series(&rows, &l.device_id)
                .into_iter()
                .filter(|r| r["seq"].as_u64().unwrap() < l.start_seq)
                .map(pressure)
                .collect();
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
            (mean, var.sqrt())
        };
        for l in &s.labels {
            let start = DateTime::parse_from_rfc3339(&l.start).unwrap().to_utc();
            let end = DateTime::parse_from_rfc3339(&l.end).unwrap().to_utc();
            assert!(l.start.ends_with('Z') && start <= end, "{l:?}");
            assert!(l.start_seq <= l.end_seq && l.start_seq > 300, "{l:?}");
            let inside: Vec<_> = in_label(&rows, l).collect();
            for r in &inside {
                assert!(start <= ts(r) && ts(r) <= end, "{l:?} {r}");
            }
            let (mean, sd) = before(l);
            match l.kind.as_str() {
                "dropout" => {
                    assert!(inside.is_empty(), "{l:?}");
                    assert!(l.field.is_none());
                    let n = series(&rows, &l.device_id).len() as u64;
                    assert_eq!(n, 1_500 - (l.end_seq - l.start_seq + 1));
                }
                "stuck" => {
                    assert!(inside.len() >= 60, "{l:?}");
                    let first = &inside[0]["pressure_psi"];
                    assert!(inside.iter().all(|r| &r["pressure_psi"] == first));
                    // Before and after, the gauge moves.
                    let next = series(&rows, &l.device_id)
                        .into_iter()
                        .find(|r| r["seq"].as_u64().unwrap() == l.end_seq + 1)
                        .unwrap();
                    assert_ne!(&next["pressure_psi"], first);
                }
                "spike" => {
                    assert_eq!(inside.len(), 1);
                    assert!((pressure(inside[0]) - mean).abs() > 8.0 * sd, "{l:?}");
                }
                "level_shift" => {
                    assert_eq!(l.end_seq, 1_500);
                    let v: Vec<f64> = inside.iter().map(|r| pressure(r)).collect();
                    let m = v.iter().sum::<f64>() / v.len() as f64;
                    assert!((m - mean).abs() > 3.0 * sd, "{l:?} {m} {mean} {sd}");
                }
                "drift" => {
                    let last = pressure(inside[inside.len() - 1]);
                    let first = pressure(inside[0]);
                    assert!((last - first).abs() > 3.0 * sd, "{l:?}");
                }
                "noise_burst" => {
                    let v: Vec<f64> = inside.iter().map(|r| pressure(r)).collect();
                    let d: Vec<f64> = v.windows(2).map(|w| w[1] - w[0]).collect();
                    let var = d.iter().map(|x| x * x).sum::<f64>() / d.len() as f64;
                    let calm: Vec<f64> = series(&rows, &l.device_id)
                        .into_iter()
                        .filter(|r| r["seq"].as_u64().unwrap() < l.start_seq)
                        .map(pressure)
                        .collect();
                    let dc: Vec<f64> = calm.windows(2).map(|w| w[1] - w[0]).collect();
                    let calm_var = dc.iter().map(|x| x * x).sum::<f64>() / dc.len() as f64;
                    assert!(var > 3.0 * calm_var, "{l:?} {var} {calm_var}");
                }
                k => panic!("unknown kind {k}"),
            }
        }
    }
}
