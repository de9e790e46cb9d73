//! End-to-end and decode throughput on simulated well readings.
//!
//! `cargo bench --bench throughput -- [RECORDS]` (default 1,000,000). Prints records/s for
//! decoding alone (one core) and for the whole pipeline (`shardlake run --drain` in process:
//! decode, raw table, 1-minute and 5-minute-hop aggregations, alerts, zstd Parquet, commit),
//! and the process's peak RSS; `--live` keeps the worker's live state for the console too
//! (its cost: run once with and once without). Figures and what bounds them: benches/README.md.

mod arrow_json;
mod canned_kinesis;

use std::sync::Arc;
use std::time::{Duration, Instant};

use shardlake::agent::sim::{SimConfig, simulate};
use shardlake::clock::SystemClock;
use shardlake::config::{KinesisSource, StartAt};
use shardlake::decode::RecordDecoder;
use shardlake::engine::sql;
use shardlake::localstream::{self, LocalStreamWriter};
use shardlake::metrics::Metrics;
use shardlake::pipeline::{RunOptions, run};
use shardlake::source::ShardReader;
use shardlake::source::kinesis::KinesisStream;
use shardlake::source::local::{LocalShardReader, list_shards};

fn stage(name: &str, records: usize, seconds: f64) {
    println!("{name}: {:.0} records/s", records as f64 / seconds);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "kinesis") {
        return kinesis(&args);
    }
    if args.iter().any(|a| a == "pipeline") {
        return pipeline(&args);
    }
    // The first number that is not a flag's value.
    let records: usize = (0..args.len())
        .filter(|&i| i == 0 || !args[i - 1].starts_with("--"))
        .find_map(|i| args[i].parse().ok())
        .unwrap_or(1_000_000);
    let devices = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let stream = dir.path().join("stream");
    localstream::create(&stream, 4).unwrap();
    let cfg = SimConfig {
        devices,
        readings_per_device: records / devices,
        start: chrono::Utc::now() - chrono::Duration::hours(2),
        interval_ms: 7_200_000 / (records / devices) as i64,
        // arrow-json, timed below for comparison, cannot step over a malformed record.
        malformed: 0,
        ..Default::default()
    };
    let t = Instant::now();
    let sim = simulate(&cfg, &mut LocalStreamWriter::open(&stream).unwrap()).unwrap();
    let bytes: u64 = std::fs::read_dir(&stream)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    println!(
        "generated {} records ({:.0} bytes each) in {:.2}s",
        sim.readings,
        bytes as f64 / sim.readings as f64,
        t.elapsed().as_secs_f64()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let env = {
        let d = dir.path().display().to_string();
        move |k: &str| (k == "SHARDLAKE_DATA").then(|| d.clone())
    };
    let pipeline_file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/well-telemetry.yaml");
    let p = rt
        .block_on(sql::load(&pipeline_file, &env))
        .unwrap_or_else(|e| panic!("{e}"));

    // The whole pipeline first, so the peak RSS is its own (`--stages`: the stages alone).
    if !args.iter().any(|a| a == "--stages") {
        // `--live`: the worker also keeps its live state for the console, as with `--listen`.
        whole_pipeline(&rt, &p, args.iter().any(|a| a == "--live"));
    }
    stages(&p, &stream, opt(&args, "--repeat", 3) as usize);
}

fn whole_pipeline(rt: &tokio::runtime::Runtime, p: &shardlake::config::Pipeline, live: bool) {
    let metrics = Arc::new(Metrics::default());
    let t = Instant::now();
    let opts = RunOptions {
        drain: true,
        live: live.then(shardlake::live::Live::new),
        ..Default::default()
    };
    rt.block_on(run(
        Arc::new(p.clone()),
        opts,
        Arc::new(SystemClock),
        metrics.clone(),
        std::future::pending(),
    ))
    .unwrap();
    let s = t.elapsed().as_secs_f64();
    let n = Metrics::get(&metrics.records_read);
    println!(
        "pipeline end to end (2 cores): {:.0} records/s ({n} records in {s:.2}s, {} files)",
        n as f64 / s,
        Metrics::get(&metrics.files_written)
    );
    println!("peak RSS: {:.0} MiB", rss_mib("VmHWM:"));
}

/// Each stage alone over chunks in memory, best of `repeat`.
fn stages(p: &shardlake::config::Pipeline, stream: &std::path::Path, repeat: usize) {
    // The stages, one core. The chunks are read first, so decoding is timed on its own.
    let now = chrono::Utc::now().timestamp_micros();
    let t = Instant::now();
    let mut chunks = Vec::new();
    for shard in list_shards(stream).unwrap() {
        let mut r = LocalShardReader::open(stream, shard, &None);
        while let Some(chunk) = r.read_now(10_000, now).unwrap() {
            chunks.push(chunk);
        }
    }
    let n: usize = chunks.iter().map(|c| c.len()).sum();
    stage(
        "read the shard files into chunks",
        n,
        t.elapsed().as_secs_f64(),
    );

    let t = Instant::now();
    let mut copy = Vec::new();
    for c in &chunks {
        copy.clear();
        copy.extend_from_slice(std::hint::black_box(&c.data));
    }
    stage("memcpy of the same bytes", n, t.elapsed().as_secs_f64());

    // arrow-json on its own, as the decoder before this one used it (benches/arrow_json).
    let json_schema = arrow_json::schema(p);
    let arrow_json = || arrow_json::decode(&json_schema, &chunks);
    let decoder = RecordDecoder::new(p);
    let strict = decoder.clone().strict_only();
    let decode = |d: &RecordDecoder| {
        chunks
            .iter()
            .map(|c| d.decode(c, now).batch.num_rows())
            .sum::<usize>()
    };
    // Taken in turns, best of `repeat` each: the first pass over fresh memory pays page
    // faults, and this machine's speed wanders from one second to the next.
    let mut best = [f64::MAX; 3];
    for _ in 0..repeat {
        let t = Instant::now();
        assert_eq!(arrow_json(), n);
        best[0] = best[0].min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        assert_eq!(decode(&strict), n);
        best[1] = best[1].min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        assert_eq!(decode(&decoder), n);
        best[2] = best[2].min(t.elapsed().as_secs_f64());
    }
    stage(
        "arrow-json alone (timestamps as text, not strict)",
        n,
        best[0],
    );
    stage(
        "shardlake decode, strict serde_json reader alone",
        n,
        best[1],
    );
    stage(
        "shardlake decode (flat reader, strict reader when it declines; every check)",
        n,
        best[2],
    );
    #[cfg(feature = "bench-simd-json")]
    {
        // simd-json's parse alone, each record copied into one reused buffer (it parses in
        // place) with its scratch buffers reused too: no Arrow, no type checks, no
        // timestamps. A lower bound on the cost of a decoder built on it.
        let mut best = f64::MAX;
        let mut buf = Vec::new();
        let mut scratch = simd_json::Buffers::default();
        for _ in 0..repeat {
            let t = Instant::now();
            let mut ok = 0;
            for c in &chunks {
                for i in 0..c.len() {
                    buf.clear();
                    buf.extend_from_slice(c.record(i));
                    let v = simd_json::to_borrowed_value_with_buffers(&mut buf, &mut scratch);
                    ok += usize::from(std::hint::black_box(v).is_ok());
                }
            }
            assert_eq!(ok, n);
            best = best.min(t.elapsed().as_secs_f64());
        }
        stage(
            "simd-json parse alone (reused buffers; no Arrow, no checks)",
            n,
            best,
        );
    }
    drop(chunks);
}

/// The Kinesis path on its own: `shards` readers (default 64) poll an in-process endpoint
/// (`canned_kinesis`) that answers GetRecords with up to 10,000 well readings, each reader
/// at the pace a real shard allows (5 calls/s, 2 MB/s). Prints the records and bytes the
/// readers turned into chunks and the CPU time the consumer's threads spent doing it, apart
/// from the endpoint's own threads: hence the records per consumer CPU-second and the shards
/// one core can read at full rate.
///
/// `cargo bench --bench throughput -- kinesis [--shards 64] [--seconds 20]`
fn kinesis(args: &[String]) {
    let (shards, seconds) = (
        opt(args, "--shards", 64) as usize,
        opt(args, "--seconds", 20),
    );
    let start = chrono::Utc::now().timestamp_micros() - 3_600_000_000;
    let canned = Arc::new(canned_kinesis::Canned::new(
        shards,
        u64::MAX / 2,
        10_000,
        start,
        1_000,
    ));
    aws_env(&canned.start(1));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("consumer")
        .enable_all()
        .build()
        .unwrap();
    let (records, bytes, wall, cpu) = rt.block_on(async move {
        let src = KinesisSource {
            stream: "canned".into(),
            region: Some("us-east-1".into()),
            start: StartAt::TrimHorizon,
            poll_interval: Duration::from_millis(200),
            max_records: 10_000,
            split_lines: false,
            fan_out: None,
        };
        let stream = KinesisStream::connect(&src, Arc::new(Metrics::default())).await;
        let before = canned_kinesis::cpu_seconds("consumer");
        let t = Instant::now();
        let deadline = t + Duration::from_secs(seconds);
        let tasks: Vec<_> = (0..shards)
            .map(|s| {
                let mut reader = stream.poller(canned_kinesis::shard_id(s).into(), &None);
                tokio::spawn(async move {
                    let (mut records, mut bytes) = (0u64, 0u64);
                    while Instant::now() < deadline {
                        let now = chrono::Utc::now().timestamp_micros();
                        if let Some(chunk) = reader.read(10_000, now).await.unwrap() {
                            records += chunk.len() as u64;
                            bytes += chunk.data.len() as u64;
                        }
                    }
                    (records, bytes)
                })
            })
            .collect();
        let (mut records, mut bytes) = (0, 0);
        for task in tasks {
            let (r, b) = task.await.unwrap();
            records += r;
            bytes += b;
        }
        let wall = t.elapsed().as_secs_f64();
        let cpu = canned_kinesis::cpu_seconds("consumer") - before;
        (records, bytes, wall, cpu)
    });
    let endpoint_cpu = canned_kinesis::cpu_seconds("canned-kinesis");
    let per_core = records as f64 / cpu;
    let shard_rate = 2_000_000.0 * records as f64 / bytes as f64;
    println!(
        "kinesis: {shards} shards, {records} records ({:.0} bytes each) in {wall:.1}s: {:.0} records/s",
        bytes as f64 / records as f64,
        records as f64 / wall
    );
    println!(
        "kinesis: consumer CPU {cpu:.2}s (endpoint {endpoint_cpu:.2}s): {per_core:.0} records per consumer CPU-second"
    );
    println!(
        "kinesis: a shard at 2 MB/s is {shard_rate:.0} records/s of these, so one core reads {:.0} shards at full rate (before decoding)",
        per_core / shard_rate
    );
}

fn opt(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Points the AWS SDK at the canned endpoint.
fn aws_env(url: &str) {
    // SAFETY: called before any other thread of this process reads the environment.
    unsafe {
        std::env::set_var("AWS_ENDPOINT_URL", url);
        std::env::set_var("AWS_ACCESS_KEY_ID", "bench");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "bench");
        std::env::set_var("AWS_REGION", "us-east-1");
    }
}

fn rss_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The whole pipeline (`benches/pipelines/kinesis.yaml`: raw table, two aggregations, alerts
/// with a webhook) on the canned Kinesis endpoint, for `--seconds` (default 60):
/// - memory: `--shards 64` unpaced, every shard read as fast as Kinesis allows (5 calls/s,
///   2 MB/s), more than the consumer can process; prints the RSS every 5 s and the peak.
/// - latency: `--rate 100000` serves that many records/s in all, live (a record is served
///   once its event time has come); prints event-to-alert latency percentiles, measured
///   where the webhook receives the alert.
///
/// `--window-buffer N` overrides `limits.window_buffer_records`.
///
/// `cargo bench --bench throughput -- pipeline [--shards 64] [--seconds 60] [--rate R]`
fn pipeline(args: &[String]) {
    let shards = opt(args, "--shards", 64) as usize;
    let seconds = opt(args, "--seconds", 60);
    let rate = opt(args, "--rate", 0);
    let now = chrono::Utc::now().timestamp_micros();
    let mut canned = if rate > 0 {
        // Live: event time is the time a record is served.
        let step = (1e6 * shards as f64 / rate as f64) as i64;
        canned_kinesis::Canned::new(shards, u64::MAX / 2, 10_000, now, step.max(1))
    } else {
        canned_kinesis::Canned::new(shards, u64::MAX / 2, 10_000, now - 3_600_000_000, 1_000)
    };
    canned.paced = rate > 0;
    aws_env(&Arc::new(canned).start(1));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let webhook = canned_kinesis::receive_webhooks(latencies.clone());

    let dir = tempfile::tempdir().unwrap();
    let env = {
        let d = dir.path().display().to_string();
        move |k: &str| match k {
            "SHARDLAKE_DATA" => Some(d.clone()),
            "BENCH_WEBHOOK" => Some(webhook.clone()),
            _ => None,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/pipelines/kinesis.yaml");
    let mut p = rt
        .block_on(sql::load(&file, &env))
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(b) = args.iter().position(|a| a == "--window-buffer") {
        p.window_buffer_records = opt(args, "--window-buffer", 0) as usize;
        assert!(
            p.window_buffer_records > 0,
            "--window-buffer {:?}",
            args.get(b + 1)
        );
    }
    println!(
        "pipeline: {shards} shards, {}, {seconds}s, window buffer {} records",
        if rate > 0 {
            format!("live at {rate} records/s")
        } else {
            "unpaced (each shard at Kinesis' read limits)".into()
        },
        p.window_buffer_records
    );

    let metrics = Arc::new(Metrics::default());
    let sampler = {
        let metrics = metrics.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let mut last = 0;
            while t.elapsed() < Duration::from_secs(seconds) {
                std::thread::sleep(Duration::from_secs(5));
                let n = Metrics::get(&metrics.records_read);
                println!(
                    "  {:>3.0}s: RSS {:>4.0} MiB, {:>7.0} records/s, {} window rows emitted",
                    t.elapsed().as_secs_f64(),
                    rss_mib("VmRSS:"),
                    (n - last) as f64 / 5.0,
                    Metrics::get(&metrics.windows_emitted)
                );
                last = n;
            }
        })
    };
    let t = Instant::now();
    rt.block_on(async {
        let stop = tokio::time::sleep(Duration::from_secs(seconds));
        run(
            Arc::new(p),
            RunOptions::default(),
            Arc::new(SystemClock),
            metrics.clone(),
            stop,
        )
        .await
    })
    .unwrap();
    let wall = t.elapsed().as_secs_f64();
    sampler.join().unwrap();
    let n = Metrics::get(&metrics.records_read);
    println!(
        "pipeline: {n} records in {wall:.1}s ({:.0}/s), {} window rows, {} alerts, {} files",
        n as f64 / wall,
        Metrics::get(&metrics.windows_emitted),
        Metrics::get(&metrics.alerts),
        Metrics::get(&metrics.files_written)
    );
    println!("pipeline: peak RSS {:.0} MiB", rss_mib("VmHWM:"));
    let mut l = latencies.lock().unwrap().clone();
    // Unpaced, event times start an hour back: only a live run's latency means anything.
    if rate > 0 && !l.is_empty() {
        l.sort_by(f64::total_cmp);
        let q = |p: f64| l[((l.len() - 1) as f64 * p).round() as usize];
        println!(
            "pipeline: event-to-alert latency over {} webhook alerts: p50 {:.3}s, p99 {:.3}s, max {:.3}s",
            l.len(),
            q(0.5),
            q(0.99),
            l[l.len() - 1]
        );
    }
}
