//! The Raspberry Pi sensor agent: `run` samples the sensors of an `agent.yaml` into the
//! durable queue and sends it; `validate` checks the file; `simulate` writes a simulated
//! fleet into a local stream in one go.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use shardlake::agent::config as agent_config;
use shardlake::agent::sim::{Label, SimConfig, simulate};
use shardlake::config::process_env;
use shardlake::localstream::{self, LocalStreamWriter};

#[derive(Parser)]
#[command(name = "shardlake-agent", version, about = "shardlake's sensor agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample the configured sensors and send the readings until SIGTERM or Ctrl-C.
    Run {
        /// The agent configuration.
        #[arg(long, default_value = "/etc/shardlake-agent/agent.yaml")]
        config: PathBuf,
        /// After the stop signal, how long to keep sending what is queued.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        drain: std::time::Duration,
    },
    /// What the queue holds (pending readings, their seqs), without changing it.
    Status {
        #[arg(long, default_value = "/etc/shardlake-agent/agent.yaml")]
        config: PathBuf,
    },
    /// Check an agent configuration and report every problem.
    Validate {
        #[arg(long, default_value = "/etc/shardlake-agent/agent.yaml")]
        config: PathBuf,
    },
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
        /// Continue a fleet simulated before (same --start, --devices and --seed): the first
        /// reading is step N, at --start + N × --interval-ms with seq N + 1.
        #[arg(long, default_value_t = 0)]
        from_step: usize,
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
        /// Gaussian noise of each well's own level (3 to 25 psi) instead of the same uniform
        /// noise on every well.
        #[arg(long)]
        well_noise: bool,
        /// A 24 h cycle on pressure and temperature (implies --well-noise).
        #[arg(long)]
        diurnal: bool,
        /// Labelled anomalies of each kind (spike, level_shift, drift, stuck, dropout,
        /// noise_burst), each on a well of its own (implies --well-noise).
        #[arg(long, default_value_t = 0)]
        anomalies: usize,
        /// Write the injected anomalies here, one JSON object a line.
        #[arg(long)]
        labels: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { config, drain } => run(&config, drain),
        Command::Validate { config } => match agent_config::load(&config, &process_env) {
            Ok(cfg) => {
                println!("{}: ok ({} sensors)", config.display(), cfg.sensors.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Status { config } => {
            let status = agent_config::load(&config, &process_env)
                .map_err(|e| e.to_string())
                .and_then(|cfg| {
                    shardlake::agent::queue::inspect(&cfg.queue.path)
                        .map_err(|e| format!("{}: {e}", cfg.queue.path.display()))
                });
            match status {
                Ok(s) => {
                    println!("{}", serde_json::to_string(&s).expect("serializes"));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        command @ Command::Simulate { .. } => simulate_command(command),
    }
}

fn run(config: &std::path::Path, drain: std::time::Duration) -> ExitCode {
    shardlake::logs::init();
    let cfg = match agent_config::load(config, &process_env) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprint!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(shardlake::agent::run::run(cfg, stop_signal(), drain)) {
        Ok(summary) => {
            println!(
                "{}",
                serde_json::to_string(&summary).expect("a summary serializes")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn simulate_command(command: Command) -> ExitCode {
    let Command::Simulate {
        stream,
        shards,
        devices,
        readings,
        from_step,
        interval_ms,
        jitter_ms,
        start,
        spikes,
        malformed,
        seed,
        well_noise,
        diurnal,
        anomalies,
        labels,
    } = command
    else {
        unreachable!("only called for simulate")
    };
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
        first_step: from_step,
        interval_ms,
        jitter_ms,
        start,
        spikes,
        malformed,
        seed,
        well_noise,
        diurnal,
        anomalies,
        ..Default::default()
    };
    let result = localstream::create(&stream, shards)
        .and_then(|_| LocalStreamWriter::open(&stream))
        .and_then(|mut w| simulate(&cfg, &mut w));
    let result = result.and_then(|s| match &labels {
        Some(path) => write_labels(path, &s.labels).map(|_| s),
        None => Ok(s),
    });
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

fn write_labels(path: &std::path::Path, labels: &[Label]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out =
        std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("--labels {}: {e}", path.display()))
        })?);
    for l in labels {
        writeln!(
            out,
            "{}",
            serde_json::to_string(l).expect("a label serializes")
        )?;
    }
    out.flush()
}
