use super::*;
use crate::config::Detector;

const S: i64 = 1_000_000;

fn detector(kind: DetectorKind, warmup: u64, cooldown: i64) -> Detector {
    Detector {
        kind,
        value: Some("v".into()),
        filter: None,
        by: Vec::new(),
        warmup,
        cooldown,
        known: None,
    }
}

/// Feeds `xs` (one reading per second from t = 0) through one series; returns the indexes
/// of the readings that alerted, with their alerts.
fn run(d: &Detector, xs: &[f64]) -> Vec<(usize, Hit)> {
    let mut s = Series::new(&d.kind, 0);
    xs.iter()
        .enumerate()
        .filter_map(|(i, &x)| step(d, alpha(&d.kind), &mut s, i as i64 * S, x).map(|h| (i, h)))
        .collect()
}

/// The weight of a new reading that [`Detectors::new`] gives a rule of this kind.
fn alpha(kind: &DetectorKind) -> f64 {
    let r = DetectRule {
        name: "r".into(),
        detector: detector(kind.clone(), 0, 0),
        value: None,
        filter: None,
    };
    Detectors::new(vec![r], Some("k"), 1).unwrap().alpha[0]
}

fn at(hits: &[(usize, Hit)]) -> Vec<usize> {
    hits.iter().map(|(i, _)| *i).collect()
}

/// Seeded noise in [-1, 1) with a period no test reaches.
fn noise(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| rng.f64() * 2.0 - 1.0).collect()
}

fn zscore() -> DetectorKind {
    DetectorKind::Zscore {
        half_life: 50.0,
        threshold: 6.0,
    }
}

#[test]
fn zscore_fires_on_a_spike_once_and_not_on_noise() {
    let mut xs: Vec<f64> = noise(400, 1).iter().map(|n| 100.0 + n).collect();
    xs[200] = 130.0;
    let hits = run(&detector(zscore(), 30, 0), &xs);
    assert_eq!(at(&hits), vec![200]);
    let h = &hits[0].1;
    assert_eq!(h.value, 130.0);
    assert!(h.score > 6.0 && h.threshold == 6.0, "{h:?}");
    let mean = h.baseline["mean"].as_f64().unwrap();
    assert!((mean - 100.0).abs() < 0.5, "{h:?}");
    // The spike was clipped into the baseline: a second one soon after is found too.
    xs[210] = 130.0;
    assert_eq!(at(&run(&detector(zscore(), 30, 0), &xs)), vec![200, 210]);
}

#[test]
fn zscore_respects_warmup_and_cooldown() {
    let mut xs: Vec<f64> = noise(400, 2).iter().map(|n| 100.0 + n).collect();
    xs[20] = 150.0;
    xs[200] = 150.0;
    xs[230] = 150.0;
    // Warm-up 30: the spike at 20 does not alert (it still teaches the baseline, clipped).
    assert_eq!(at(&run(&detector(zscore(), 30, 0), &xs)), vec![200, 230]);
    // Cooldown 60 s: the spike 30 s after an alert is held back.
    assert_eq!(at(&run(&detector(zscore(), 30, 60 * S), &xs)), vec![200]);
    // Without warm-up the early spike alerts (and so do the first readings, whose baseline
    // is two or three readings: what the warm-up is for).
    assert!(at(&run(&detector(zscore(), 0, 0), &xs)).contains(&20));
}

#[test]
fn zscore_baseline_is_unbiased_when_the_warmup_ends() {
    // Uniform noise in [-1, 1): standard deviation 1/sqrt(3) = 0.577. A spike just after
    // the warm-up is judged against the spread of those 31 readings, not a fraction of it
    // (an exponentially weighted variance started at zero would say about 0.34).
    for seed in 20..30 {
        let mut xs: Vec<f64> = noise(40, seed).iter().map(|n| 100.0 + n).collect();
        xs[31] = 120.0;
        let hits = run(&detector(zscore(), 30, 0), &xs);
        assert_eq!(at(&hits), vec![31], "seed {seed}");
        let std = hits[0].1.baseline["std"].as_f64().unwrap();
        assert!((0.43..0.72).contains(&std), "seed {seed}: std {std}");
    }
}

#[test]
fn zscore_alerts_once_for_a_level_shift_then_learns_the_new_level() {
    let xs: Vec<f64> = noise(1200, 3)
        .iter()
        .enumerate()
        .map(|(i, n)| if i < 300 { 100.0 + n } else { 120.0 + n })
        .collect();
    assert_eq!(at(&run(&detector(zscore(), 30, 0), &xs)), vec![300]);
}

#[test]
fn mad_ignores_outliers_in_its_baseline() {
    let mut xs: Vec<f64> = noise(300, 4).iter().map(|n| 50.0 + n).collect();
    // A burst of outliers inside the window does not hide the next one (it would for a
    // mean and standard deviation over the same readings).
    for i in [100, 104, 108] {
        xs[i] = 90.0;
    }
    let d = detector(
        DetectorKind::Mad {
            window: 60,
            threshold: 7.0,
        },
        30,
        0,
    );
    let hits = run(&d, &xs);
    assert_eq!(at(&hits), vec![100, 104, 108]);
    let median = hits[0].1.baseline["median"].as_f64().unwrap();
    assert!((median - 50.0).abs() < 0.3, "{:?}", hits[0].1);
    // A quantised sensor (most readings equal) still has a scale.
    let mut q: Vec<f64> = (0..200)
        .map(|i| if i % 7 == 0 { 11.0 } else { 10.0 })
        .collect();
    q[150] = 30.0;
    assert_eq!(at(&run(&d, &q)), vec![150]);
}

#[test]
fn cusum_finds_a_drift_the_zscore_does_not() {
    // 0.02 standard deviations of the noise per reading from 300 on.
    let xs: Vec<f64> = noise(800, 5)
        .iter()
        .enumerate()
        .map(|(i, n)| {
            100.0
                + n
                + if i >= 300 {
                    (i - 300) as f64 * 0.01
                } else {
                    0.0
                }
        })
        .collect();
    // A baseline that follows slowly (half-life 1,000 readings) and a small slack: the
    // settings for a slow drift.
    let cusum = detector(
        DetectorKind::Cusum {
            k: 0.5,
            h: 10.0,
            half_life: 1000.0,
        },
        30,
        0,
    );
    let hits = run(&cusum, &xs);
    let first = hits.first().expect("the drift is found").0;
    assert!((300..500).contains(&first), "found at {first}");
    assert_eq!(hits[0].1.baseline["direction"], "up");
    assert!(hits[0].1.held_us > 0);
    assert!(run(&detector(zscore(), 30, 0), &xs).is_empty());
    // No drift, no alert.
    let flat: Vec<f64> = noise(800, 6).iter().map(|n| 100.0 + n).collect();
    assert!(run(&cusum, &flat).is_empty());
}

#[test]
fn cusum_alerts_once_for_a_shift_down() {
    let xs: Vec<f64> = noise(800, 7)
        .iter()
        .enumerate()
        .map(|(i, n)| if i < 400 { 100.0 + n } else { 97.0 + n })
        .collect();
    let hits = run(&detector(default_cusum(), 30, 0), &xs);
    assert_eq!(at(&hits).len(), 1, "{:?}", at(&hits));
    assert!((400..420).contains(&hits[0].0));
    assert_eq!(hits[0].1.baseline["direction"], "down");
}

/// The defaults of `detect: {kind: cusum}`.
fn default_cusum() -> DetectorKind {
    DetectorKind::Cusum {
        k: 1.0,
        h: 10.0,
        half_life: 20.0,
    }
}

#[test]
fn cusum_follows_slow_wander_and_finds_a_step() {
    // Uniform noise (standard deviation 0.58) on a wander of ±4 (about 7 deviations) with a
    // period of 3,600 readings, and a step of +3 (about 5 deviations) at reading 2,000.
    let xs: Vec<f64> = noise(3000, 9)
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let wander = 4.0 * (i as f64 * std::f64::consts::TAU / 3600.0).sin();
            100.0 + n + wander + if i >= 2000 { 3.0 } else { 0.0 }
        })
        .collect();
    let hits = run(&detector(default_cusum(), 30, 0), &xs);
    assert_eq!(at(&hits).len(), 1, "{:?}", at(&hits));
    assert!((2000..2010).contains(&hits[0].0), "{:?}", at(&hits));
    assert_eq!(hits[0].1.baseline["direction"], "up");
    // A baseline that follows ten times slower calls the wander a shift.
    let slow = DetectorKind::Cusum {
        k: 1.0,
        h: 10.0,
        half_life: 200.0,
    };
    assert!(run(&detector(slow, 30, 0), &xs).len() > 1);
}

#[test]
fn stuck_fires_once_per_episode_by_count_or_time() {
    let mut xs: Vec<f64> = noise(200, 8).iter().map(|n| 20.0 + n).collect();
    for x in &mut xs[50..90] {
        *x = 21.5;
    }
    let by_count = detector(
        DetectorKind::Stuck {
            duration: None,
            readings: Some(30),
            epsilon: 0.0,
        },
        0,
        0,
    );
    let hits = run(&by_count, &xs);
    assert_eq!(at(&hits), vec![79]);
    assert_eq!(hits[0].1.held_us, 29 * S);
    let by_time = detector(
        DetectorKind::Stuck {
            duration: Some(10 * S),
            readings: None,
            epsilon: 0.0,
        },
        0,
        0,
    );
    assert_eq!(at(&run(&by_time, &xs)), vec![60]);
    // Changes within epsilon count as stuck; noise of ±1 is not.
    let loose = detector(
        DetectorKind::Stuck {
            duration: None,
            readings: Some(30),
            epsilon: 2.5,
        },
        0,
        0,
    );
    assert!(!run(&loose, &xs).is_empty());
    assert!(run(&by_count, &noise(300, 9)).is_empty());
}

#[test]
fn rate_fires_when_the_change_per_second_is_too_fast() {
    let mut xs: Vec<f64> = (0..100).map(|i| i as f64 * 0.5).collect();
    for (j, x) in xs[60..66].iter_mut().enumerate() {
        *x += (j + 1) as f64 * 10.0;
    }
    let d = detector(
        DetectorKind::Rate {
            max_per_second: 5.0,
        },
        0,
        0,
    );
    let hits = run(&d, &xs);
    // Enters at 60 and stays over through the climb and the fall back at 66: one alert.
    assert_eq!(at(&hits), vec![60]);
    assert!((hits[0].1.score - 10.5).abs() < 1e-9, "{:?}", hits[0].1);
}

fn batch(rows: &[(&str, i64, f64)]) -> RecordBatch {
    use arrow::array::{Float64Array, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema};
    let schema = Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("ts", super::super::sql::ts_type(), false),
        Field::new("v", DataType::Float64, true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.1))
                    .with_timezone("UTC"),
            ),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2))),
        ],
    )
    .unwrap()
}

fn rules(kinds: Vec<(&str, DetectorKind)>) -> Vec<DetectRule> {
    use datafusion::physical_expr::expressions::Column;
    kinds
        .into_iter()
        .map(|(name, kind)| {
            let silent = matches!(kind, DetectorKind::Silent { .. });
            DetectRule {
                name: name.into(),
                detector: Detector {
                    value: (!silent).then(|| "v".into()),
                    ..detector(kind, 0, 0)
                },
                value: (!silent).then(|| {
                    Arc::new(Column::new("v", 2))
                        as Arc<dyn datafusion::physical_plan::PhysicalExpr>
                }),
                filter: None,
            }
        })
        .collect()
}

fn silent() -> DetectorKind {
    DetectorKind::Silent { after: 60 * S }
}

#[test]
fn silent_is_judged_by_the_watermark_and_found_the_same_by_a_late_reading() {
    let mut d = Detectors::new(rules(vec![("quiet", silent())]), Some("device_id"), 100).unwrap();
    let shard: Arc<str> = "s0".into();
    let rows: Vec<(&str, i64, f64)> = (0..10)
        .flat_map(|t| [("a", t * 10 * S, 1.0), ("b", t * 10 * S, 1.0)])
        .collect();
    assert!(d.observe(&shard, &batch(&rows), 1).is_empty());
    // Both last reported at 90 s: due at 150 s. A watermark at 150 s is not past it.
    assert!(d.watermark(150 * S).is_empty());
    // `b` goes on, `a` does not.
    let more: Vec<(&str, i64, f64)> = (10..30).map(|t| ("b", t * 10 * S, 1.0)).collect();
    assert!(d.observe(&shard, &batch(&more), 1).is_empty());
    let raised = d.watermark(151 * S);
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert_eq!(
        (raised[0].key.as_str(), raised[0].event_time),
        ("a", 150 * S)
    );
    assert!(
        d.watermark(400 * S).len() == 1,
        "b is silent by then, a not again"
    );
    // The same silence found by the reading that ends it, without the watermark: the same row.
    let mut e = Detectors::new(rules(vec![("quiet", silent())]), Some("device_id"), 100).unwrap();
    e.observe(&shard, &batch(&rows), 1);
    let late = e.observe(&shard, &batch(&[("a", 500 * S, 1.0)]), 1);
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].event_time, raised[0].event_time);
    assert_eq!(late[0].detail, raised[0].detail);
    // After reporting again, `a` can be silent again.
    assert!(
        e.watermark(561 * S)
            .iter()
            .any(|r| r.key == "a" && r.event_time == 560 * S)
    );
}

#[test]
fn a_restored_snapshot_goes_on_exactly_like_the_uninterrupted_state() {
    let kinds = || {
        rules(vec![
            ("z", zscore()),
            (
                "m",
                DetectorKind::Mad {
                    window: 20,
                    threshold: 7.0,
                },
            ),
            ("c", default_cusum()),
            ("st", stuck(5)),
            ("q", silent()),
            (
                "r",
                DetectorKind::Rate {
                    max_per_second: 3.0,
                },
            ),
        ])
    };
    let n = noise(600, 10);
    let rows: Vec<(String, i64, f64)> = (0..600)
        .map(|i| {
            let x = 10.0
                + n[i]
                + if i % 97 == 0 { 40.0 } else { 0.0 }
                + if i > 400 { 3.0 } else { 0.0 };
            (format!("d{}", i % 3), i as i64 * S, x)
        })
        .collect();
    let rows: Vec<(&str, i64, f64)> = rows.iter().map(|(d, t, x)| (d.as_str(), *t, *x)).collect();
    let shard: Arc<str> = "shardId-000000000001".into();
    let mut whole = Detectors::new(kinds(), Some("device_id"), 100).unwrap();
    let a = whole.observe(&shard, &batch(&rows), 1);
    let mut first = Detectors::new(kinds(), Some("device_id"), 100).unwrap();
    let mut b = first.observe(&shard, &batch(&rows[..250]), 1);
    let snap = first.snapshots();
    assert_eq!(snap.len(), 1);
    assert!(first.snapshots().is_empty(), "nothing changed since");
    let mut second = Detectors::new(kinds(), Some("device_id"), 100).unwrap();
    second.restore(shard.clone(), &snap[0].1).unwrap();
    b.extend(second.observe(&shard, &batch(&rows[250..]), 1));
    assert!(a.len() > 5, "{a:?}");
    let order = |v: &mut Vec<Raised>| {
        v.sort_by(|x, y| (x.event_time, x.rule, &x.key).cmp(&(y.event_time, y.rule, &y.key)))
    };
    let (mut a, mut b) = (a, b);
    order(&mut a);
    order(&mut b);
    assert_eq!(a, b);
    // A damaged snapshot is an error, not a fresh start.
    assert!(second.restore(shard, b"not zstd").is_err());
}

#[test]
fn the_series_bound_forgets_the_least_recently_seen() {
    let mut d = Detectors::new(rules(vec![("z", zscore())]), Some("device_id"), 1000).unwrap();
    let shard: Arc<str> = "s".into();
    let names: Vec<String> = (0..5000).map(|i| format!("dev-{i}")).collect();
    for chunk in names.chunks(100) {
        let rows: Vec<(&str, i64, f64)> = chunk.iter().map(|k| (k.as_str(), 0, 1.0)).collect();
        d.observe(&shard, &batch(&rows), 1);
        assert!(d.len() <= 1000, "{}", d.len());
        // One device keeps reporting: it is never the least recently seen.
        d.observe(&shard, &batch(&[("keeper", 0, 1.0)]), 1);
    }
    assert!(d.len() <= 1000 && d.len() >= 900, "{}", d.len());
    let kept = d.series_of("s", 0, false);
    assert!(kept.contains_key("keeper"));
    assert!(kept.contains_key("dev-4999"));
    assert!(!kept.contains_key("dev-0"));
    assert_eq!(d.take_evicted() as usize, 5001 - d.len());
}

#[test]
fn a_device_keeps_what_it_learned_across_a_split_and_silent_follows_it() {
    let kinds = || rules(vec![("z", zscore()), ("q", silent())]);
    let n = noise(200, 3);
    // Devices a and b report every second on the parent, 100 readings each.
    let learn: Vec<(&str, i64, f64)> = (0..100)
        .flat_map(|i| {
            [
                ("a", i * S, 100.0 + n[i as usize]),
                ("b", i * S, 50.0 + n[100 + i as usize]),
            ]
        })
        .collect();
    // After the split, a reports on child c1 (its first reading there a spike), then stops;
    // b never reports again.
    let after: Vec<(&str, i64, f64)> = vec![("a", 100 * S, 130.0), ("a", 101 * S, 100.0)];
    let (parent, c1, c2): (Arc<str>, Arc<str>, Arc<str>) = ("p".into(), "c1".into(), "c2".into());

    // One shard throughout: what the split must not change for a.
    let mut whole = Detectors::new(kinds(), Some("device_id"), 100).unwrap();
    whole.observe(&parent, &batch(&learn), 1);
    let want = whole.observe(&parent, &batch(&after), 1);
    assert_eq!(want.len(), 1, "the spike: {want:?}");

    let mut d = Detectors::new(kinds(), Some("device_id"), 100).unwrap();
    d.observe(&parent, &batch(&learn), 1);
    d.end(&parent);
    let from_memory = d.inheritance(&parent).unwrap();
    // The parent's snapshot after its end hands on the same.
    let snap = d
        .snapshots()
        .into_iter()
        .find(|(s, _)| *s == parent)
        .unwrap()
        .1;
    let from_snapshot = d.inheritance_of_snapshot(&snap).unwrap();
    assert_eq!(from_memory, from_snapshot);
    assert_eq!(from_memory[0].len(), 2);
    d.inherit(c1.clone(), vec![from_memory.clone()]);
    d.inherit(c2.clone(), vec![from_snapshot]);
    assert_eq!(
        d.len(),
        6 * 2,
        "every series kept, on the parent and on both children"
    );
    let got = d.observe(&c1, &batch(&after), 1);
    assert_eq!(
        got, want,
        "the spike is judged against the parent's baseline"
    );

    // Much later: a is silent on c1 (where it reported), found once; nobody is silent on
    // the ended parent, nor on c2, where no device ever reported.
    let raised = d.watermark(1_000 * S);
    let keys: Vec<&str> = raised.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, vec!["a"], "{raised:?}");
    assert_eq!(raised[0].event_time, 101 * S + 60 * S);

    // A restart of c1 from its own snapshot goes on the same: b is still inherited there.
    let c1_snap = d.snapshots().into_iter().find(|(s, _)| *s == c1).unwrap().1;
    let mut again = Detectors::new(kinds(), Some("device_id"), 100).unwrap();
    again.restore(c1.clone(), &c1_snap).unwrap();
    assert!(again.series_of("c1", 0, true).contains_key("b"));
    assert!(again.series_of("c1", 0, false).contains_key("a"));
    assert!(
        again.watermark(2_000 * S).is_empty(),
        "b is not judged where it never went"
    );
    // b reports on c1 after all: its gap is found by that reading, as on one shard.
    let late = again.observe(&c1, &batch(&[("b", 500 * S, 50.0)]), 1);
    assert!(
        late.iter()
            .any(|r| r.key == "b" && r.event_time == 99 * S + 60 * S),
        "{late:?}"
    );
}

#[test]
fn a_merge_takes_both_parents_and_the_newer_of_a_series_on_both() {
    let kinds = || rules(vec![("z", zscore())]);
    let mut d = Detectors::new(kinds(), Some("device_id"), 100).unwrap();
    let (p1, p2, c): (Arc<str>, Arc<str>, Arc<str>) = ("p1".into(), "p2".into(), "c".into());
    d.observe(&p1, &batch(&[("a", 0, 1.0), ("m", 5 * S, 1.0)]), 1);
    d.observe(&p2, &batch(&[("b", 0, 2.0), ("m", 9 * S, 7.0)]), 1);
    let (i1, i2) = (d.inheritance(&p1).unwrap(), d.inheritance(&p2).unwrap());
    d.inherit(c.clone(), vec![i1, i2]);
    let inherited = d.series_of("c", 0, true);
    assert_eq!(inherited.len(), 3);
    assert_eq!(inherited["m"].last, 9 * S, "the series seen last wins");
}

/// A `silent` rule (after 60 s) that expects `known` devices, each with the hash key given.
fn silent_known(known: &[(&str, u128)]) -> Vec<DetectRule> {
    let mut r = rules(vec![("quiet", silent())]);
    r[0].detector.known = Some(Arc::new(crate::config::KnownDevices {
        file: "devices.csv".into(),
        devices: known.iter().map(|(k, h)| (k.to_string(), *h)).collect(),
    }));
    r
}

const HALF: u128 = u128::MAX / 2;

/// Each alert's device and event time.
fn keys_at(raised: &[Raised]) -> Vec<(&str, i64)> {
    raised
        .iter()
        .map(|r| (r.key.as_str(), r.event_time))
        .collect()
}

#[test]
fn a_known_device_that_never_reports_is_silent_once_on_the_shard_its_key_hashes_to() {
    let known = [
        ("a", 1),
        ("b", 2),
        ("c", u128::MAX - 1),
        ("x", u128::MAX - 2),
    ];
    let (s0, s1): (Arc<str>, Arc<str>) = ("s0".into(), "s1".into());
    let fresh = || {
        let mut d = Detectors::new(silent_known(&known), Some("device_id"), 100).unwrap();
        d.set_hash_range(s0.clone(), (0, HALF));
        d.set_hash_range(s1.clone(), (HALF + 1, u128::MAX));
        d
    };
    // a reports on s0 and c on s1, from 0 s to 90 s; b and x never do.
    let on = |dev: &'static str| -> Vec<(&str, i64, f64)> {
        (0..10).map(|t| (dev, t * 10 * S, 1.0)).collect()
    };
    let mut d = fresh();
    assert!(d.observe(&s0, &batch(&on("a")), 1).is_empty());
    assert!(d.observe(&s1, &batch(&on("c")), 1).is_empty());
    let snap = d.snapshots();
    assert!(
        d.watermark(60 * S).is_empty(),
        "watched from 0 s: due at 60 s"
    );
    let raised = d.watermark(61 * S);
    let got = keys_at(&raised);
    assert_eq!(
        got,
        vec![("b", 60 * S), ("x", 60 * S)],
        "once each, each on its own shard"
    );
    let detail: Value = serde_json::from_str(&raised[0].detail).unwrap();
    assert_eq!(detail["baseline"]["last_seen"], Value::Null, "{detail}");
    assert!(detail["baseline"]["watched_since"].is_string(), "{detail}");
    assert!(
        d.watermark(100 * S).is_empty(),
        "not again while it stays silent"
    );
    assert_eq!(d.len(), 4);

    // The same silence found by b's first reading, without the watermark: the same row.
    let mut e = fresh();
    e.observe(&s0, &batch(&on("a")), 1);
    let late = e.observe(&s0, &batch(&[("b", 500 * S, 1.0)]), 1);
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(
        (late[0].event_time, &late[0].detail),
        (60 * S, &raised[0].detail)
    );
    // A known device that reports in time is not silent.
    let mut f = fresh();
    f.observe(&s0, &batch(&[("a", 0, 1.0), ("b", 30 * S, 1.0)]), 1);
    assert!(f.watermark(61 * S).iter().all(|r| r.key != "b"));

    // Restored from the snapshots: the same alerts, and nothing watched twice.
    let mut g = fresh();
    for (shard, bytes) in snap {
        g.restore(shard, &bytes).unwrap();
    }
    g.observe(&s0, &batch(&[("a", 100 * S, 1.0)]), 1);
    assert_eq!(g.len(), 4);
    let again: Vec<(String, i64, String)> = (g.watermark(61 * S).into_iter())
        .map(|r| (r.key, r.event_time, r.detail))
        .collect();
    let want: Vec<(String, i64, String)> = (raised.into_iter())
        .map(|r| (r.key, r.event_time, r.detail))
        .collect();
    assert_eq!(again, want);
}

#[test]
fn a_known_device_that_stops_at_a_split_is_silent_on_the_child_its_key_hashes_to() {
    // k reports on the parent until 90 s and stops at the split; m goes on, on child c2,
    // where k's key hashes too.
    let known = [("k", u128::MAX - 5), ("m", u128::MAX - 6)];
    let (parent, c1, c2): (Arc<str>, Arc<str>, Arc<str>) = ("p".into(), "c1".into(), "c2".into());
    let mut d = Detectors::new(silent_known(&known), Some("device_id"), 100).unwrap();
    d.set_hash_range(parent.clone(), (0, u128::MAX));
    d.set_hash_range(c1.clone(), (0, HALF));
    d.set_hash_range(c2.clone(), (HALF + 1, u128::MAX));
    let before: Vec<(&str, i64, f64)> = (0..10)
        .flat_map(|t| [("k", t * 10 * S, 1.0), ("m", t * 10 * S, 1.0)])
        .collect();
    d.observe(&parent, &batch(&before), 1);
    d.end(&parent);
    let from = d.inheritance(&parent).unwrap();
    d.inherit(c1.clone(), vec![from.clone()]);
    d.inherit(c2.clone(), vec![from]);
    d.observe(&c1, &batch(&[("z", 100 * S, 1.0)]), 1);
    let after: Vec<(&str, i64, f64)> = (10..40).map(|t| ("m", t * 10 * S, 1.0)).collect();
    d.observe(&c2, &batch(&after), 1);
    // (z, on c1, is due at 160 s.)
    let raised = d.watermark(155 * S);
    let got = keys_at(&raised);
    assert_eq!(
        got,
        vec![("k", 150 * S)],
        "found by the watermark, on c2 only: {raised:?}"
    );
    let detail: Value = serde_json::from_str(&raised[0].detail).unwrap();
    assert_eq!(
        detail["baseline"]["last_seen"], "1970-01-01T00:01:30Z",
        "{detail}"
    );
}

/// A `stuck` rule that fires after `readings` equal readings.
fn stuck(readings: u64) -> DetectorKind {
    DetectorKind::Stuck {
        duration: None,
        readings: Some(readings),
        epsilon: 0.0,
    }
}

/// A `where` that takes readings above 0 (`v > 0`).
fn positive_only() -> Arc<dyn datafusion::physical_plan::PhysicalExpr> {
    use datafusion::logical_expr::Operator;
    use datafusion::physical_expr::expressions::{BinaryExpr, Column, lit};
    Arc::new(BinaryExpr::new(
        Arc::new(Column::new("v", 2)),
        Operator::Gt,
        lit(0.0),
    ))
}

#[test]
fn rules_sharing_a_key_learn_and_alert_as_each_would_alone() {
    // Three rules keyed alike share one map: a zscore that takes only positive readings, a
    // stuck sensor, a rate.
    let kinds = || {
        let mut r = rules(vec![
            ("z", zscore()),
            ("st", stuck(5)),
            (
                "r",
                DetectorKind::Rate {
                    max_per_second: 10.0,
                },
            ),
        ]);
        r[0].filter = Some(positive_only());
        r
    };
    let n = noise(900, 4);
    let rows: Vec<(String, i64, f64)> = (0..900)
        .map(|i| {
            let dev = i % 3;
            let x = match (dev, i) {
                // Device 2 is stuck for a while, device 1 spikes now and then, device 0 is
                // negative (only the zscore skips it) for its first readings.
                (2, 300..600) => 7.0,
                (1, _) if i % 150 == 1 => 60.0 + n[i],
                (0, ..90) => -5.0 + n[i],
                _ => 10.0 + n[i],
            };
            (format!("d{dev}"), i as i64 * S, x)
        })
        .collect();
    let rows: Vec<(&str, i64, f64)> = rows.iter().map(|(d, t, x)| (d.as_str(), *t, *x)).collect();
    let shard: Arc<str> = "s".into();
    let mut all = Detectors::new(kinds(), Some("device_id"), 100).unwrap();
    let got = all.observe(&shard, &batch(&rows[..30]), 1);
    assert_eq!(all.groups.len(), 1);
    assert_eq!(all.len(), 3 + 3 + 2, "the zscore has no series for d0 yet");
    assert!(!all.series_of("s", 0, false).contains_key("d0"));
    let mut got = got;
    got.extend(all.observe(&shard, &batch(&rows[30..]), 1));
    assert_eq!(all.len(), 9);
    // Each rule alone, in a `Detectors` of its own.
    let mut want = Vec::new();
    for (i, rule) in kinds().into_iter().enumerate() {
        let mut one = Detectors::new(vec![rule], Some("device_id"), 100).unwrap();
        want.extend(
            (one.observe(&shard, &batch(&rows), 1).into_iter()).map(|r| Raised { rule: i, ..r }),
        );
    }
    let kinds_raised: Vec<usize> = want.iter().map(|r| r.rule).collect();
    for i in 0..3 {
        assert!(kinds_raised.contains(&i), "rule {i} alerts: {want:?}");
    }
    let order = |v: &mut Vec<Raised>| {
        v.sort_by(|x, y| (x.rule, x.event_time, &x.key).cmp(&(y.rule, y.event_time, &y.key)))
    };
    order(&mut got);
    order(&mut want);
    assert_eq!(got, want);
}

#[test]
fn rules_with_by_columns_share_a_map_of_their_own_and_restore_alike() {
    use arrow::array::{Float64Array, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema};
    use datafusion::physical_expr::expressions::Column;
    // (device, site, time, value)
    let sited = |rows: &[(&str, &str, i64, f64)]| {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("ts", super::super::sql::ts_type(), false),
            Field::new("v", DataType::Float64, true),
            Field::new("site", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.2))
                        .with_timezone("UTC"),
                ),
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.3))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            ],
        )
        .unwrap()
    };
    let kinds = || {
        let mut r = rules(vec![("z", zscore()), ("zs", zscore()), ("st", stuck(4))]);
        for rule in &mut r[1..] {
            rule.detector.by = vec!["site".into()];
        }
        r[0].value = Some(Arc::new(Column::new("v", 2)));
        r
    };
    let n = noise(600, 7);
    let rows: Vec<(&str, &str, i64, f64)> = (0..600)
        .map(|i| {
            let site = if i % 2 == 0 { "a" } else { "b" };
            // Site b sticks for a while; both spike now and then.
            let x = match i {
                200..260 if site == "b" => 3.0,
                _ if i % 101 == 0 => 40.0 + n[i],
                _ => 10.0 + n[i],
            };
            ("d0", site, i as i64 * S, x)
        })
        .collect();
    let shard: Arc<str> = "s".into();
    let mut whole = Detectors::new(kinds(), Some("device_id"), 100).unwrap();
    assert_eq!(
        whole.groups.len(),
        2,
        "the plain rule, and the two rules by site"
    );
    let all = whole.observe(&shard, &sited(&rows), 1);
    assert_eq!(whole.len(), 1 + 2 + 2);
    let keys = whole.series_of("s", 1, false);
    assert!(
        keys.contains_key(format!("d0{SEP}a").as_str())
            && keys.contains_key(format!("d0{SEP}b").as_str())
    );
    for i in 0..3 {
        assert!(all.iter().any(|r| r.rule == i), "rule {i} alerts: {all:?}");
    }
    // Stopped at a snapshot and restored, it goes on the same.
    let mut first = Detectors::new(kinds(), Some("device_id"), 100).unwrap();
    let mut got = first.observe(&shard, &sited(&rows[..230]), 1);
    let snap = first.snapshots().remove(0).1;
    let mut second = Detectors::new(kinds(), Some("device_id"), 100).unwrap();
    second.restore(shard.clone(), &snap).unwrap();
    assert_eq!(second.len(), first.len());
    got.extend(second.observe(&shard, &sited(&rows[230..]), 1));
    let order = |v: &mut Vec<Raised>| {
        v.sort_by(|x, y| (x.rule, x.event_time, &x.detail).cmp(&(y.rule, y.event_time, &y.detail)))
    };
    let mut all = all;
    order(&mut all);
    order(&mut got);
    assert_eq!(got, all);
}

#[test]
fn a_rule_that_has_not_seen_a_key_on_the_child_takes_the_parents_series_at_its_first_reading() {
    // z takes every reading; st only readings above 0.
    let kinds = || {
        let mut r = rules(vec![("z", zscore()), ("st", stuck(50))]);
        r[1].filter = Some(positive_only());
        r
    };
    let (p, c): (Arc<str>, Arc<str>) = ("p".into(), "c".into());
    let mut d = Detectors::new(kinds(), Some("device_id"), 100).unwrap();
    let on_parent: Vec<(&str, i64, f64)> = (0..10).map(|i| ("a", i * S, 5.0)).collect();
    d.observe(&p, &batch(&on_parent), 1);
    d.end(&p);
    // The child sees a first with a reading only z takes, then inherits from the parent.
    d.observe(&c, &batch(&[("a", 10 * S, -1.0)]), 1);
    let from = d.inheritance(&p).unwrap();
    d.inherit(c.clone(), vec![from]);
    assert_eq!(
        d.series_of("c", 0, false)["a"].n,
        1,
        "z keeps what the child learned"
    );
    d.observe(&c, &batch(&[("a", 11 * S, 5.0)]), 1);
    assert_eq!(
        d.series_of("c", 1, false)["a"].n,
        11,
        "st goes on from the parent's 10 readings"
    );
    assert!(d.series_of("c", 1, true).is_empty());
    // Parent (2 series, ended) + child (2 series): nothing counted twice.
    assert_eq!(d.len(), 4);
}
