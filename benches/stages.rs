//! Criterion benches of the stages a record goes through before the engine, each over the
//! same simulated well readings (100,000 records, 4 shards, already in memory):
//! reading the local shard files into chunks, shardlake's decoder (flat reader, strict
//! reader when it declines), the strict reader alone, and arrow-json for comparison.
//!
//! ```sh
//! cargo bench --bench stages --features bench-criterion
//! ```
//!
//! Criterion is an optional dependency (`bench-criterion`), so `cargo test` and CI never
//! build its tree. `benches/throughput.rs` times the same stages over 1M records in turns and
//! runs the whole pipeline; benches/README.md has the figures.

mod arrow_json;

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shardlake::agent::sim::{SimConfig, simulate};
use shardlake::decode::RecordDecoder;
use shardlake::engine::sql;
use shardlake::localstream::{self, LocalStreamWriter};
use shardlake::record::RawChunk;
use shardlake::source::local::{LocalShardReader, list_shards};

const RECORDS: usize = 100_000;
const DEVICES: usize = 2_000;

fn stages(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let stream = dir.path().join("stream");
    localstream::create(&stream, 4).unwrap();
    let cfg = SimConfig {
        devices: DEVICES,
        readings_per_device: RECORDS / DEVICES,
        start: chrono::DateTime::parse_from_rfc3339("2026-01-05T10:00:00Z")
            .unwrap()
            .into(),
        interval_ms: 7_200_000 / (RECORDS / DEVICES) as i64,
        // arrow-json, timed for comparison, cannot step over a malformed record.
        malformed: 0,
        ..Default::default()
    };
    simulate(&cfg, &mut LocalStreamWriter::open(&stream).unwrap()).unwrap();
    let env = {
        let d = dir.path().display().to_string();
        move |k: &str| (k == "SHARDLAKE_DATA").then(|| d.clone())
    };
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/pipelines/compare.yaml");
    let p = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(sql::load(&file, &env))
        .unwrap_or_else(|e| panic!("{e}"));
    let now = chrono::Utc::now().timestamp_micros();
    let read = || {
        let mut chunks = Vec::new();
        for shard in list_shards(&stream).unwrap() {
            let mut r = LocalShardReader::open(&stream, shard, &None);
            while let Some(chunk) = r.read_now(10_000, now).unwrap() {
                chunks.push(chunk);
            }
        }
        chunks
    };
    let chunks: Vec<RawChunk> = read();
    let n: usize = chunks.iter().map(|c| c.len()).sum();
    assert_eq!(n, RECORDS);

    let mut g = c.benchmark_group("stages");
    g.throughput(Throughput::Elements(n as u64));
    g.sample_size(20);
    g.measurement_time(std::time::Duration::from_secs(8));
    g.bench_function("read the local shard files", |b| {
        b.iter(|| black_box(read()))
    });
    for (name, decoder) in [
        ("shardlake decode", RecordDecoder::new(&p)),
        ("strict reader alone", RecordDecoder::new(&p).strict_only()),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let rows: usize = chunks
                    .iter()
                    .map(|c| decoder.decode(c, now).batch.num_rows())
                    .sum();
                assert_eq!(rows, n);
            })
        });
    }
    // As the decoder before shardlake's used it (benches/arrow_json).
    let schema = arrow_json::schema(&p);
    g.bench_function("arrow-json alone", |b| {
        b.iter(|| assert_eq!(arrow_json::decode(&schema, &chunks), n))
    });
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
