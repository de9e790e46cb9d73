//! Integration tests of the data path on the embedded default: shipped configs, the bad-input
//! corpora, event-time semantics (late, out of order, idle shards) and crash recovery at every
//! named failpoint. One test binary on purpose: each debug binary links all of DataFusion.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use arrow::util::display::array_value_to_string;
use shardlake::agent::sim::{SimConfig, simulate};
use shardlake::checkpoint::local::LocalStore;
use shardlake::clock::{Clock, ManualClock, SystemClock};
use shardlake::config::{Pipeline, load_schema};
use shardlake::decode::RecordDecoder;
use shardlake::engine::{Engine, sql};
use shardlake::localstream::{self, LocalStreamWriter};
use shardlake::metrics::Metrics;
use shardlake::pipeline::{RunOptions, run};
use shardlake::record::{RawChunk, SeqNo, SeqNos};
use shardlake::sink::Lakes;
use shardlake::tools::query;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn data_env(dir: &Path) -> impl Fn(&str) -> Option<String> + use<> {
    let d = dir.display().to_string();
    move |k: &str| (k == "SHARDLAKE_DATA").then(|| d.clone())
}

async fn load(file: &Path, data: &Path) -> Pipeline {
    sql::load(file, &data_env(data))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs SQL over the pipeline's lake; every value as text.
async fn rows(p: &Pipeline, q: &str) -> Vec<Vec<String>> {
    let schemas = query::output_schemas(p).await.unwrap();
    let ctx = query::lake_session(p, &schemas).await.unwrap();
    let mut out = Vec::new();
    for b in query::query(&ctx, q)
        .await
        .unwrap_or_else(|e| panic!("{q}: {e}"))
    {
        for r in 0..b.num_rows() {
            out.push(
                b.columns()
                    .iter()
                    .map(|c| array_value_to_string(c, r).unwrap())
                    .collect(),
            );
        }
    }
    out
}

async fn count(p: &Pipeline, q: &str) -> i64 {
    rows(p, q).await[0][0].parse().unwrap()
}

fn ts(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap()
        .timestamp_micros()
}

fn reading(device: &str, seq: i64, ts: &str, pressure: f64) -> String {
    format!(
        r#"{{"device_id":"{device}","tenant":"acme","seq":{seq},"ts":"{ts}","barrels_per_s":0.5,"pressure_psi":{pressure},"temp_c":70.0,"status":"ok"}}"#
    )
}

fn inprogress_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().ends_with(".inprogress") {
                found.push(path);
            }
        }
    }
    found
}

// ------------------------------------------------------------------ configuration

#[tokio::test]
async fn every_shipped_pipeline_and_schema_validates() {
    let mut checked = 0;
    for dir in ["pipelines", "schemas", "benches/pipelines"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                if dir == "schemas" {
                    load_schema(&path, &|_| None).unwrap_or_else(|e| panic!("{e}"));
                } else {
                    load(&path, Path::new("/tmp/unused")).await;
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 5, "found only {checked} files");
}

/// Each file in testdata/bad-config starts with `# expect: FIELD | LINE | TEXT` lines, one per
/// problem the loader must report (LINE `-` when it has none).
#[tokio::test]
async fn bad_config_corpus_gets_every_problem_with_line_and_fix() {
    let dir = repo().join("testdata/bad-config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 12, "corpus has {} files", files.len());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let expects: Vec<(String, Option<usize>, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(|l| {
                let parts: Vec<&str> = l.splitn(3, " | ").collect();
                (
                    parts[0].trim().to_string(),
                    parts[1].trim().parse().ok(),
                    parts[2].trim().to_string(),
                )
            })
            .collect();
        assert!(
            !expects.is_empty(),
            "{} has no `# expect:` line",
            file.display()
        );
        let problems = match sql::load(&file, &|_| None).await {
            Ok(_) => panic!("{} loaded without errors", file.display()),
            Err(e) => e.problems,
        };
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            problems.len(),
            expects.len(),
            "{}: got\n{}",
            file.display(),
            shown.join("\n")
        );
        for (field, line, text) in &expects {
            assert!(
                problems.iter().any(|p| &p.field == field
                    && (line.is_none() || p.line == *line)
                    && (p.message.contains(text) || p.fix.contains(text))),
                "{}: no problem at {field} line {line:?} mentioning {text:?}; got\n{}",
                file.display(),
                shown.join("\n")
            );
        }
        assert!(
            problems.iter().all(|p| !p.fix.is_empty()),
            "{}: every problem says what to do",
            file.display()
        );
    }
}

// ------------------------------------------------------------------ bad records

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_record_corpus_goes_to_dead_letter_with_reasons_and_the_rest_goes_on() {
    let corpus = repo().join("testdata/bad-records");
    let expected: Vec<(String, String, String)> =
        std::fs::read_to_string(corpus.join("expected.tsv"))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f[0].to_string(), f[1].to_string(), f[2].to_string())
            })
            .collect();
    assert!(expected.len() >= 30, "corpus has {} cases", expected.len());

    let data = tempfile::tempdir().unwrap();
    let stream = data.path().join("stream");
    localstream::create(&stream, 1).unwrap();
    let mut w = LocalStreamWriter::open(&stream).unwrap();
    let mut case_seq = Vec::new();
    let mut good = 0;
    for (i, (file, _, _)) in expected.iter().enumerate() {
        let bytes = std::fs::read(corpus.join(file)).unwrap();
        w.put(
            "k",
            reading(
                "well-0001",
                2 * i as i64 + 1,
                "2026-01-05T10:00:00Z",
                2000.0,
            )
            .as_bytes(),
        )
        .unwrap();
        let (_, seq) = w.put("k", &bytes).unwrap();
        w.put(
            "k",
            reading(
                "well-0001",
                2 * i as i64 + 2,
                "2026-01-05T10:00:01Z",
                2000.0,
            )
            .as_bytes(),
        )
        .unwrap();
        good += 2;
        case_seq.push((seq.to_string(), bytes));
    }
    drop(w);

    let p = Arc::new(load(&repo().join("testdata/pipelines/corpus.yaml"), data.path()).await);
    let opts = RunOptions {
        drain: true,
        ..Default::default()
    };
    run(
        p.clone(),
        opts,
        Arc::new(SystemClock),
        Arc::new(Metrics::default()),
        std::future::pending(),
    )
    .await
    .unwrap();

    let dead = rows(
        &p,
        "SELECT _sequence_number, error, reason, encode(raw, 'hex') FROM dead_letter",
    )
    .await;
    let mut failures = Vec::new();
    for ((file, kind, text), (seq, bytes)) in expected.iter().zip(&case_seq) {
        match dead.iter().find(|r| &r[0] == seq) {
            None => failures.push(format!("{file}: not in dead_letter")),
            Some(r) => {
                if &r[1] != kind || !r[2].contains(text.as_str()) {
                    failures.push(format!(
                        "{file}: got {} / {:?}, expected {kind} / {text:?}",
                        r[1], r[2]
                    ));
                }
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                if r[3] != hex {
                    failures.push(format!("{file}: raw bytes differ"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        dead.len(),
        expected.len(),
        "only the corpus records are dead letters"
    );
    assert_eq!(count(&p, "SELECT count(*) FROM readings").await, good);
    assert_eq!(
        count(&p, "SELECT count(DISTINCT seq) FROM readings").await,
        good
    );
}

// ------------------------------------------------------------------ event time

/// Feeds an engine directly, one shard at a time, with an injected clock.
struct Feed {
    decoder: RecordDecoder,
    offsets: std::collections::HashMap<String, u64>,
    clock: Arc<ManualClock>,
}

impl Feed {
    fn chunk(&mut self, shard: &str, lines: &[String]) -> shardlake::decode::Decoded {
        let off = self.offsets.entry(shard.to_string()).or_insert(0);
        let resume_from = (*off > 0).then(|| SeqNo::from_u64(*off));
        let mut data = Vec::new();
        let mut spans = Vec::new();
        let mut seqs = SeqNos::default();
        for l in lines {
            let start = data.len();
            data.extend_from_slice(l.as_bytes());
            spans.push(start..data.len());
            *off += l.len() as u64 + 1;
            seqs.push_u64(*off);
        }
        let chunk = RawChunk {
            shard: shard.into(),
            resume_from,
            data,
            spans,
            seqs,
            keys: Default::default(),
            arrival_us: self.clock.now_us(),
            as_read: Default::default(),
            rejected: Vec::new(),
        };
        self.decoder.decode(&chunk, self.clock.now_us())
    }
}

async fn engine_for(file: &str, data: &Path, clock: Arc<ManualClock>) -> (Engine, Feed, Pipeline) {
    let p = load(&repo().join(file), data).await;
    let store = Box::new(LocalStore::open(&data.join("state"), &p.name).unwrap());
    let engine = Engine::open(
        Arc::new(p.clone()),
        Lakes::open(&p, &Default::default()).await.unwrap(),
        store,
        clock.clone(),
        "w0",
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap();
    let feed = Feed {
        decoder: RecordDecoder::new(&p),
        offsets: Default::default(),
        clock,
    };
    (engine, feed, p)
}

#[tokio::test]
async fn late_and_out_of_order_records() {
    let data = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(ts("2026-01-05T10:00:00Z")));
    let (mut engine, mut feed, p) = engine_for(
        "testdata/pipelines/windows.yaml",
        data.path(),
        clock.clone(),
    )
    .await;
    engine.add_shard("a".into(), &[]);
    let r = |seq, t: &str| reading("well-0001", seq, &format!("2026-01-05T{t}Z"), 2000.0);

    engine
        .ingest(feed.chunk("a", &[r(1, "10:00:05"), r(2, "10:00:50"), r(3, "10:01:05")]))
        .await
        .unwrap();
    // Watermark 10:00:55: the 10:00 window is still open.
    assert_eq!(
        engine.emitted_through("per_device_1m"),
        Some(ts("2026-01-05T10:00:55Z"))
    );
    // Out of order but within the allowed lateness: counts in its window.
    engine
        .ingest(feed.chunk("a", &[r(4, "10:00:58")]))
        .await
        .unwrap();
    engine
        .ingest(feed.chunk("a", &[r(5, "10:01:20")]))
        .await
        .unwrap();
    assert_eq!(
        engine.emitted_through("per_device_1m"),
        Some(ts("2026-01-05T10:01:10Z"))
    );
    // Beyond it: the 10:00 window was emitted, so this one is late.
    engine
        .ingest(feed.chunk("a", &[r(6, "10:00:30"), r(7, "10:01:30")]))
        .await
        .unwrap();
    engine.finish().await.unwrap();
    engine.commit().await.unwrap();

    let w = rows(&p, "SELECT CAST(window_start AS VARCHAR) AS ws, n, seq_sum FROM per_device_1m ORDER BY window_start").await;
    assert_eq!(
        w,
        vec![
            vec!["2026-01-05T10:00:00Z", "3", "7"],
            vec!["2026-01-05T10:01:00Z", "3", "15"]
        ]
    );
    let late = rows(&p, "SELECT aggregation, seq FROM late ORDER BY aggregation").await;
    // Record 6 missed the 10:00 window of both aggregations (and the hop ending 10:01); the
    // 3-minute hops still open (ending 10:02 and 10:03) counted it.
    assert_eq!(late, vec![vec!["hop_3m", "6"], vec!["per_device_1m", "6"]]);
    let hops = rows(
        &p,
        "SELECT CAST(window_start AS VARCHAR) AS ws, n FROM hop_3m ORDER BY window_start",
    )
    .await;
    assert_eq!(
        hops,
        vec![
            vec!["2026-01-05T09:58:00Z", "3"],
            vec!["2026-01-05T09:59:00Z", "7"],
            vec!["2026-01-05T10:00:00Z", "7"],
            vec!["2026-01-05T10:01:00Z", "3"],
        ]
    );
    assert_eq!(count(&p, "SELECT count(*) FROM readings").await, 7);
    // The window rule saw each emitted window row once.
    let alerts = rows(
        &p,
        "SELECT rule, kind, CAST(event_time AS VARCHAR) AS t, key FROM alerts ORDER BY event_time",
    )
    .await;
    assert_eq!(
        alerts,
        vec![
            vec!["busy_minute", "window", "2026-01-05T10:00:00Z", "well-0001"],
            vec!["busy_minute", "window", "2026-01-05T10:01:00Z", "well-0001"],
        ]
    );
}

/// An aggregation whose SQL names a column its optimised plan does not read (a CTE's unused
/// column) still runs: its queries cannot be planned over the columns the plan reads, so its
/// buffers keep every column.
#[tokio::test]
async fn sql_naming_a_column_the_optimiser_drops_still_runs() {
    let data = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(ts("2026-01-05T10:00:00Z")));
    let (mut engine, mut feed, p) =
        engine_for("testdata/pipelines/cte.yaml", data.path(), clock.clone()).await;
    engine.add_shard("a".into(), &[]);
    let r = |seq, t: &str, psi| reading("well-0001", seq, &format!("2026-01-05T{t}Z"), psi);
    let chunk = [
        r(1, "10:00:05", 2000.0),
        r(2, "10:00:50", 2500.0),
        r(3, "10:01:05", 1000.0),
    ];
    engine.ingest(feed.chunk("a", &chunk)).await.unwrap();
    engine.finish().await.unwrap();
    engine.commit().await.unwrap();
    let w = rows(
        &p,
        "SELECT CAST(window_start AS VARCHAR) AS ws, n, p_max FROM per_device ORDER BY window_start",
    )
    .await;
    assert_eq!(
        w,
        vec![
            vec!["2026-01-05T10:00:00Z", "2", "2500.0"],
            vec!["2026-01-05T10:01:00Z", "1", "1000.0"]
        ]
    );
}

/// The shipped pipeline's aggregations (count, avg, min, max, stddev, count DISTINCT, a
/// hopping window, a window alert) give the same tables when every chunk is folded into
/// per-window states at once (`limits.window_buffer_records: 1`, and many parts per window,
/// so they are combined repeatedly) as when each window's records are kept until it closes.
#[tokio::test]
async fn folding_open_windows_into_states_changes_no_result() {
    let stream_dir = tempfile::tempdir().unwrap();
    let stream = stream_dir.path().join("stream");
    localstream::create(&stream, 1).unwrap();
    let cfg = SimConfig {
        devices: 24,
        readings_per_device: 600,
        start: chrono::DateTime::from_timestamp(1_767_607_200, 0).unwrap(),
        jitter_ms: 0,
        spikes: 4,
        malformed: 3,
        seed: 11,
        ..Default::default()
    };
    let sim = simulate(&cfg, &mut LocalStreamWriter::open(&stream).unwrap()).unwrap();
    let mut tables = Vec::new();
    for buffer in [None, Some(1)] {
        let data = tempfile::tempdir().unwrap();
        let mut p = load(&repo().join("pipelines/well-telemetry.yaml"), data.path()).await;
        if let Some(b) = buffer {
            p.window_buffer_records = b;
        }
        let clock = Arc::new(ManualClock::new(ts("2026-01-05T12:00:00Z")));
        let store = Box::new(LocalStore::open(&data.path().join("state"), &p.name).unwrap());
        let mut engine = Engine::open(
            Arc::new(p.clone()),
            Lakes::open(&p, &Default::default()).await.unwrap(),
            store,
            clock.clone(),
            "w0",
            Arc::new(Metrics::default()),
        )
        .await
        .unwrap();
        let decoder = RecordDecoder::new(&p);
        let shard = shardlake::source::local::list_shards(&stream).unwrap()[0].clone();
        let from = engine.add_shard(shard.clone(), &[]);
        let mut reader = shardlake::source::local::LocalShardReader::open(&stream, shard, &from);
        let mut chunks = 0;
        while let Some(chunk) = reader.read_now(40, clock.now_us()).unwrap() {
            engine
                .ingest(decoder.decode(&chunk, clock.now_us()))
                .await
                .unwrap();
            chunks += 1;
        }
        assert!(chunks > 300, "{chunks} chunks");
        engine.finish().await.unwrap();
        engine.commit().await.unwrap();
        let mut got = Vec::new();
        for q in [
            "SELECT window_start, device_id, readings, pressure_min, pressure_max, pressure_avg, \
             pressure_stddev, temp_avg, barrels_per_s_avg FROM well_1m ORDER BY window_start, device_id",
            "SELECT window_start, window_end, tenant, readings, devices, pressure_avg, pressure_max \
             FROM well_5m_hop ORDER BY window_start, tenant",
            "SELECT rule, kind, event_time, key FROM alerts ORDER BY rule, event_time, key",
            "SELECT count(*) FROM late",
            "SELECT count(*) FROM well_1m_parts",
        ] {
            got.push(rows(&p, q).await);
        }
        tables.push(got);
    }
    let (kept, folded) = (&tables[0], &tables[1]);
    // One window row per device and minute, one part each, and every reading counted once.
    let windows = kept[0].len();
    assert_eq!(windows, 24 * 10, "1-minute windows");
    assert_eq!(kept[4], vec![vec![windows.to_string()]]);
    assert_eq!(
        folded[4], kept[4],
        "one part per window and group, folded or not"
    );
    let readings: i64 = folded[0].iter().map(|r| r[2].parse::<i64>().unwrap()).sum();
    assert_eq!(readings, sim.readings as i64);
    assert!(kept[2].len() as u64 >= sim.spikes, "alerts: {:?}", kept[2]);
    // Floating-point sums may round differently when added in another order.
    let close = |a: &str, b: &str| match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => a == b,
    };
    for (t, (k, f)) in kept.iter().zip(folded).enumerate() {
        assert_eq!(k.len(), f.len(), "table {t}: row counts");
        for (kr, fr) in k.iter().zip(f) {
            assert!(
                kr.iter().zip(fr).all(|(a, b)| close(a, b)),
                "table {t}: {kr:?} kept, {fr:?} folded"
            );
        }
    }
}

#[tokio::test]
async fn epoch_millis_event_time() {
    let data = tempfile::tempdir().unwrap();
    let p = load(&repo().join("testdata/pipelines/epoch.yaml"), data.path()).await;
    let clock = Arc::new(ManualClock::new(ts("2026-01-05T10:00:00Z")));
    let mut feed = Feed {
        decoder: RecordDecoder::new(&p),
        offsets: Default::default(),
        clock,
    };
    let rec = |ts: &str| format!(r#"{{"device_id":"d","tenant":"t","seq":1,"ts":{ts}}}"#);
    let d = feed.chunk(
        "a",
        &[
            rec("1767607200123"),
            rec("\"2026-01-05T10:00:00Z\""),
            rec("1767607200123.5"),
        ],
    );
    assert_eq!(d.batch.num_rows(), 1);
    let col = d.batch.column_by_name("ts").unwrap();
    assert_eq!(
        array_value_to_string(col, 0).unwrap(),
        "2026-01-05T10:00:00.123Z"
    );
    let reasons: Vec<String> = d.dead.iter().map(|x| x.reason.to_string()).collect();
    assert!(
        reasons[0].starts_with("wrong_type:") && reasons[0].contains("ts"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("`ts`: 1767607200123.5 is not an integer"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn an_idle_shard_stops_holding_the_watermark() {
    let data = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(ts("2026-01-05T10:10:00Z")));
    let (mut engine, mut feed, p) = engine_for(
        "testdata/pipelines/windows.yaml",
        data.path(),
        clock.clone(),
    )
    .await;
    engine.add_shard("a".into(), &[]);
    engine.add_shard("b".into(), &[]);
    let r = |d: &str, seq, t: &str| reading(d, seq, &format!("2026-01-05T{t}Z"), 2000.0);
    let a: Vec<String> = (0..11)
        .map(|i| {
            r(
                "well-a",
                i + 1,
                &format!("10:0{}:{:02}", i * 30 / 60, i * 30 % 60),
            )
        })
        .collect();
    engine.ingest(feed.chunk("a", &a)).await.unwrap();
    engine
        .ingest(feed.chunk(
            "b",
            &[r("well-b", 1, "10:00:10"), r("well-b", 2, "10:00:30")],
        ))
        .await
        .unwrap();
    // b is behind: the watermark is b's newest event time minus the lateness.
    let held = Some(ts("2026-01-05T10:00:20Z"));
    assert_eq!(engine.emitted_through("per_device_1m"), held);
    clock.advance(10_000_000);
    engine.tick().await.unwrap();
    assert_eq!(
        engine.emitted_through("per_device_1m"),
        held,
        "b is slow, not idle: it never said it was caught up"
    );
    engine.shard_caught_up(&"b".into());
    clock.advance(4_000_000);
    engine.tick().await.unwrap();
    assert_eq!(
        engine.emitted_through("per_device_1m"),
        held,
        "caught up for 4 s: not idle yet"
    );
    clock.advance(2_000_000);
    engine
        .ingest(feed.chunk("a", &[r("well-a", 12, "10:05:05")]))
        .await
        .unwrap();
    // b has been caught up for 6 s (> 5 s): a alone decides.
    assert_eq!(
        engine.emitted_through("per_device_1m"),
        Some(ts("2026-01-05T10:04:55Z"))
    );
    engine
        .ingest(feed.chunk("b", &[r("well-b", 3, "10:00:40")]))
        .await
        .unwrap();
    engine.commit().await.unwrap();
    let emitted = rows(&p, "SELECT device_id, CAST(window_start AS VARCHAR) AS ws, n FROM per_device_1m ORDER BY device_id, window_start").await;
    assert_eq!(emitted.len(), 5, "{emitted:?}");
    assert_eq!(emitted[0], vec!["well-a", "2026-01-05T10:00:00Z", "2"]);
    assert_eq!(emitted[4], vec!["well-b", "2026-01-05T10:00:00Z", "2"]);
    assert_eq!(
        rows(
            &p,
            "SELECT seq FROM late WHERE aggregation = 'per_device_1m'"
        )
        .await,
        vec![vec!["3"]]
    );
}

// ------------------------------------------------------------------ crash recovery

/// The process aborts at each named point of the commit protocol and is restarted; every
/// output then holds each record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_every_failpoint_loses_and_duplicates_nothing() {
    let bin = env!("CARGO_BIN_EXE_shardlake");
    let pipeline = repo().join("testdata/pipelines/crash.yaml");
    for point in shardlake::failpoint::POINTS {
        let data = tempfile::tempdir().unwrap();
        let stream = data.path().join("stream");
        localstream::create(&stream, 2).unwrap();
        let cfg = SimConfig {
            devices: 30,
            readings_per_device: 800,
            start: chrono::DateTime::from_timestamp(1_767_607_200, 0).unwrap(),
            spikes: 3,
            malformed: 5,
            seed: 7,
            ..Default::default()
        };
        let sim = simulate(&cfg, &mut LocalStreamWriter::open(&stream).unwrap()).unwrap();
        let run = |fail: Option<&str>| {
            let mut c = Command::new(bin);
            c.args(["run", "--drain"])
                .arg(&pipeline)
                .env("SHARDLAKE_DATA", data.path())
                .env("SHARDLAKE_LOG_FORMAT", "json")
                .env("RUST_LOG", "warn");
            match fail {
                Some(f) => c.env("SHARDLAKE_FAILPOINTS", f),
                None => c.env_remove("SHARDLAKE_FAILPOINTS"),
            };
            c.output().unwrap()
        };
        let crashed = run(Some(&format!("{point}@2")));
        assert!(
            !crashed.status.success(),
            "{point}: the run did not crash: {}",
            String::from_utf8_lossy(&crashed.stderr)
        );
        assert!(
            String::from_utf8_lossy(&crashed.stderr)
                .contains(&format!("failpoint {point} reached"))
        );
        let done = run(None);
        assert!(
            done.status.success(),
            "{point}: restart failed: {}",
            String::from_utf8_lossy(&done.stderr)
        );

        let p = load(&pipeline, data.path()).await;
        let n = sim.readings as i64;
        let seq_total: i64 = (1..=cfg.readings_per_device as i64).sum::<i64>() * cfg.devices as i64;
        assert_eq!(
            count(&p, "SELECT count(*) FROM readings").await,
            n,
            "{point}: readings"
        );
        assert_eq!(
            count(
                &p,
                "SELECT count(*) FROM (SELECT DISTINCT device_id, seq FROM readings)"
            )
            .await,
            n,
            "{point}: distinct"
        );
        assert_eq!(
            count(&p, "SELECT sum(n) FROM per_device_1m").await,
            n,
            "{point}: windows count every reading once"
        );
        assert_eq!(
            count(&p, "SELECT sum(seq_sum) FROM per_device_1m").await,
            seq_total,
            "{point}: window sums"
        );
        assert_eq!(
            count(
                &p,
                "SELECT count(*) FROM (SELECT DISTINCT window_start, device_id FROM per_device_1m)"
            )
            .await,
            count(&p, "SELECT count(*) FROM per_device_1m").await,
            "{point}: one row per window"
        );
        assert_eq!(
            count(&p, "SELECT count(*) FROM late").await,
            0,
            "{point}: late"
        );
        assert_eq!(
            count(&p, "SELECT count(*) FROM dead_letter").await,
            sim.malformed as i64,
            "{point}: dead letters"
        );
        assert_eq!(
            count(&p, "SELECT count(*) FROM alerts").await,
            sim.spikes as i64,
            "{point}: alerts"
        );
        assert!(
            inprogress_files(&data.path().join("lake")).is_empty(),
            "{point}: staged files left behind"
        );
    }
}

// ------------------------------------------------------------------ Delta tables

/// A long-lived query session (the console's) over Delta tables: empty before the first
/// commit, then each commit is seen once the session reads the log again (within a second),
/// in the raw table and in an aggregation's merged view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_session_sees_each_delta_commit() {
    let data = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(ts("2026-01-05T10:10:00Z")));
    let mut p = load(&repo().join("testdata/pipelines/windows.yaml"), data.path()).await;
    for format in p.outputs.formats.values_mut() {
        *format = shardlake::config::TableFormat::Delta;
    }
    let store = Box::new(LocalStore::open(&data.path().join("state"), &p.name).unwrap());
    let mut engine = Engine::open(
        Arc::new(p.clone()),
        Lakes::open(&p, &Default::default()).await.unwrap(),
        store,
        clock.clone(),
        "w0",
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap();
    let mut feed = Feed {
        decoder: RecordDecoder::new(&p),
        offsets: Default::default(),
        clock: clock.clone(),
    };
    let schemas = query::output_schemas(&p).await.unwrap();
    let ctx = query::lake_session(&p, &schemas).await.unwrap();
    let count = |sql: &'static str| {
        let ctx = ctx.clone();
        async move {
            let b = query::query(&ctx, sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            array_value_to_string(b[0].column(0), 0)
                .unwrap()
                .parse::<i64>()
                .unwrap()
        }
    };
    let eventually = |sql: &'static str, want: i64| {
        let count = &count;
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let got = count(sql).await;
                if got == want {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{sql}: {got}, not {want}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(count("SELECT count(*) FROM readings").await, 0);

    engine.add_shard("a".into(), &[]);
    let r = |seq: i64, t: &str| reading("well-a", seq, &format!("2026-01-05T{t}Z"), 2000.0);
    let first: Vec<String> = (1..=4)
        .map(|i| r(i, &format!("10:00:{:02}", i * 10)))
        .collect();
    engine.ingest(feed.chunk("a", &first)).await.unwrap();
    engine.commit().await.unwrap();
    assert!(data.path().join("lake/readings/_delta_log").is_dir());
    eventually("SELECT count(*) FROM readings", 4).await;

    // A record in the next minute closes 10:00 (with the lateness): the merged view of the
    // aggregation's Delta parts shows the window.
    clock.advance(60_000_000);
    engine
        .ingest(feed.chunk("a", &[r(5, "10:01:30")]))
        .await
        .unwrap();
    engine.commit().await.unwrap();
    eventually("SELECT count(*) FROM readings", 5).await;
    eventually(
        "SELECT sum(n) FROM per_device_1m WHERE device_id = 'well-a'",
        4,
    )
    .await;
}
