//! The Raspberry Pi sensor agent. For now it simulates oil wells into a local stream.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use shardlake::agent::sim::{SimConfig, simulate};
use shardlake::localstream::{self, LocalStreamWriter};

#[derive(Parser)]
#[command(name = "shardlake-agent", version, about = "shardlake's sensor agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate an oil-well fleet into a local stream (created if missing).
    Simulate {
        /// The local stream directory.
        #[arg(long)]
        stream: PathBuf,
        #[arg(long, default_value_t = 4)]
        shards: usize,
        #[arg(long, default_value_t = 120)]
        devices: usize,
        /// Readings per device, one every --interval-ms.
        #[arg(long, default_value_t = 1800)]
        readings: usize,
        #[arg(long, default_value_t = 1000)]
        interval_ms: i64,
        /// Event-time jitter (readings arrive up to this much out of order).
        #[arg(long, default_value_t = 2000)]
        jitter_ms: i64,
        /// Event time of the first reading (RFC 3339); default: so the last one is now.
        #[arg(long)]
        start: Option<String>,
        #[arg(long, default_value_t = 8)]
        spikes: usize,
        #[arg(long, default_value_t = 12)]
        malformed: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    let Command::Simulate {
        stream,
        shards,
        devices,
        readings,
        interval_ms,
        jitter_ms,
        start,
        spikes,
        malformed,
        seed,
    } = Cli::parse().command;
    let start = match start {
        Some(s) => match chrono::DateTime::parse_from_rfc3339(&s) {
            Ok(t) => t.to_utc(),
            Err(e) => {
                eprintln!(
                    "error: --start {s:?} is not RFC 3339 ({e}); write e.g. 2026-01-01T00:00:00Z"
                );
                return ExitCode::FAILURE;
            }
        },
        None => chrono::Utc::now() - chrono::Duration::milliseconds(readings as i64 * interval_ms),
    };
    let cfg = SimConfig {
        devices,
        readings_per_device: readings,
        interval_ms,
        jitter_ms,
        start,
        spikes,
        malformed,
        seed,
        ..Default::default()
    };
    let result = localstream::create(&stream, shards)
        .and_then(|_| LocalStreamWriter::open(&stream))
        .and_then(|mut w| simulate(&cfg, &mut w));
    match result {
        Ok(s) => {
            println!(
                "{{\"readings\":{},\"spikes\":{},\"malformed\":{}}}",
                s.readings, s.spikes, s.malformed
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", stream.display());
            ExitCode::FAILURE
        }
    }
}
