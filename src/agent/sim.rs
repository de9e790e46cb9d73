//! Simulated oil wells: per device a reading every `interval` with `device_id`, `tenant`, a
//! per-device monotonic `seq`, an RFC 3339 `ts` (some devices report a local offset), barrels
//! per second, reservoir pressure, temperature and status. A few pressure spikes and a few
//! malformed records are injected at seeded random places, so a run is reproducible.

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
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimSummary {
    pub readings: u64,
    pub spikes: u64,
    pub malformed: u64,
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
            well.reading(&mut line, step, ts_ms, spike, &mut rng);
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
    Ok(summary)
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
}
