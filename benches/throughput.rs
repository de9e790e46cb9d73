//! End-to-end and decode throughput on simulated well readings.
//!
//! `cargo bench --bench throughput -- [RECORDS]` (default 1,000,000). Prints records/s for
//! decoding alone (one core) and for the whole pipeline (`shardlake run --drain` in process:
//! decode, raw table, 1-minute and 5-minute-hop aggregations, alerts, zstd Parquet, commit),
//! and the process's peak RSS. Figures and what bounds them: benches/README.md.

use std::sync::Arc;
use std::time::Instant;

use shardlake::agent::sim::{SimConfig, simulate};
use shardlake::clock::SystemClock;
use shardlake::decode::RecordDecoder;
use shardlake::engine::sql;
use shardlake::localstream::{self, LocalStreamWriter};
use shardlake::metrics::Metrics;
use shardlake::pipeline::{RunOptions, run};
use shardlake::source::local::{LocalShardReader, list_shards};

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let records: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
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

    // Decode alone, one core.
    let decoder = RecordDecoder::new(&p);
    let now = chrono::Utc::now().timestamp_micros();
    let t = Instant::now();
    let mut decoded = 0;
    for shard in list_shards(&stream).unwrap() {
        let mut r = LocalShardReader::open(&stream, shard, &None);
        while let Some(chunk) = r.read_now(10_000, now).unwrap() {
            decoded += decoder.decode(&chunk, now).batch.num_rows();
        }
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "decode (read + strict JSON check + arrow-json, 1 core): {:.0} records/s",
        decoded as f64 / s
    );

    // The whole pipeline.
    let metrics = Arc::new(Metrics::default());
    let t = Instant::now();
    let opts = RunOptions {
        drain: true,
        ..Default::default()
    };
    rt.block_on(run(
        Arc::new(p),
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
    println!("peak RSS: {:.0} MiB", peak_rss_mib());
}
