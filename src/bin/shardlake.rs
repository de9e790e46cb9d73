//! The shardlake service and its CLI.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use shardlake::agent::sim::{SimConfig, simulate};
use shardlake::clock::SystemClock;
use shardlake::config::{self, Pipeline, load_schema, process_env};
use shardlake::console;
use shardlake::engine::sql;
use shardlake::localstream::{self, LocalStreamWriter};
use shardlake::metrics::Metrics;
use shardlake::pipeline::{RunOptions, run};
use shardlake::tools::{athena, query};

/// mimalloc instead of the system allocator (see Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "shardlake",
    version,
    about = "Event-time stream processing for sensor fleets: windows and alerts in DataFusion, exactly-once partitioned Parquet."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum DeviceAction {
    /// Change settings (`key=value`, e.g. sensors.pressure.interval=1s, outputs.valve=1):
    /// publishes the next version of the whole desired state, retained.
    Set {
        device: String,
        #[arg(required_unless_present = "unset")]
        settings: Vec<String>,
        /// Remove a key (a sensor setting returns to the agent's configured value).
        #[arg(long)]
        unset: Vec<String>,
        /// Wait this long for the device's report of the new version (exit 1 if it refuses
        /// or does not answer in time).
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
        /// Who is asking (kept in the document's `by`).
        #[arg(long, env = "USER", default_value = "operator")]
        user: String,
        #[command(flatten)]
        device_args: DeviceArgs,
    },
    /// Print the device's retained desired and reported states as JSON.
    Show {
        device: String,
        #[command(flatten)]
        device_args: DeviceArgs,
    },
}

/// The broker and the device's topics.
#[derive(Args)]
struct DeviceArgs {
    #[arg(long)]
    tenant: String,
    #[arg(long, default_value = "localhost", env = "SHARDLAKE_MQTT_HOST")]
    host: String,
    #[arg(long, default_value_t = 8883, env = "SHARDLAKE_MQTT_PORT")]
    port: u16,
    /// TLS: the broker's CA (for IoT Core AmazonRootCA1.pem), and this operator's certificate
    /// and key (PEM). Plain TCP without them.
    #[arg(long, requires_all = ["cert", "key"], env = "SHARDLAKE_MQTT_CA")]
    ca: Option<PathBuf>,
    #[arg(long, requires = "ca", env = "SHARDLAKE_MQTT_CERT")]
    cert: Option<PathBuf>,
    #[arg(long, requires = "ca", env = "SHARDLAKE_MQTT_KEY")]
    key: Option<PathBuf>,
    #[arg(long, default_value = "shardlake-device-cli")]
    client_id: String,
    #[arg(long, default_value = shardlake::agent::commands::DESIRED_TOPIC)]
    desired_topic: String,
    #[arg(long, default_value = shardlake::agent::commands::REPORTED_TOPIC)]
    reported_topic: String,
    /// How long to wait for each answer of the broker.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

impl DeviceArgs {
    fn resolve(
        self,
        device: &str,
    ) -> Result<(
        shardlake::tools::device::Broker,
        shardlake::tools::device::Topics,
    )> {
        let topics = shardlake::tools::device::Topics::new(
            &self.desired_topic,
            &self.reported_topic,
            &self.tenant,
            device,
        )?;
        let tls = match (self.ca, self.cert, self.key) {
            (Some(ca), Some(cert), Some(key)) => Some((ca, cert, key)),
            _ => None,
        };
        let broker = shardlake::tools::device::Broker {
            host: self.host,
            port: self.port,
            tls,
            client_id: self.client_id,
            timeout: self.timeout,
        };
        Ok((broker, topics))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Subscribe to an MQTT broker and put each message on a Kinesis stream, keyed like the
    /// IoT rule in deploy/ (local runs: agent → Mosquitto → bridge → Kinesis → pipeline).
    Bridge {
        /// The Kinesis stream (endpoint from AWS_ENDPOINT_URL_KINESIS / AWS_ENDPOINT_URL).
        #[arg(long)]
        stream: String,
        #[arg(long, default_value = "localhost")]
        host: String,
        #[arg(long, default_value_t = 8883)]
        port: u16,
        /// TLS: the broker's CA, and this client's certificate and key (PEM). Plain TCP
        /// without them.
        #[arg(long, requires_all = ["cert", "key"])]
        ca: Option<PathBuf>,
        #[arg(long, requires = "ca")]
        cert: Option<PathBuf>,
        #[arg(long, requires = "ca")]
        key: Option<PathBuf>,
        #[arg(long, default_value = "sensors/+/+/telemetry")]
        topic: String,
        /// IoT SQL substitution template, as the topic rule's Kinesis action has it.
        #[arg(long, default_value = "${topic(2)}/${topic(3)}")]
        partition_key: String,
        #[arg(long, default_value = "shardlake-bridge")]
        client_id: String,
    },
    /// A device's desired state (what it should apply) and reported state (what it did), kept
    /// as retained MQTT messages on its own topics; the agent applies and reports.
    Device {
        #[command(subcommand)]
        action: DeviceAction,
    },
    /// Run a pipeline until stopped (SIGINT/SIGTERM), or until caught up with --drain.
    Run {
        #[arg(env = "SHARDLAKE_PIPELINE")]
        pipeline: PathBuf,
        /// Stop once every shard is read to its end, emitting every open window.
        #[arg(long)]
        drain: bool,
        /// Names this worker's files.
        #[arg(long, default_value = "w0", env = "SHARDLAKE_WORKER_ID")]
        worker_id: String,
        /// Print a progress line every second.
        #[arg(long)]
        progress: bool,
        /// Serve GET /metrics (Prometheus), /healthz and /live (for the console) on this
        /// address, e.g. 0.0.0.0:9090.
        #[arg(long, env = "SHARDLAKE_LISTEN")]
        listen: Option<std::net::SocketAddr>,
        /// Where the console reaches this worker's --listen address (written into its leases):
        /// default the ECS task's private IP, else the --listen address (127.0.0.1 for 0.0.0.0).
        #[arg(long, env = "SHARDLAKE_ADVERTISE")]
        advertise: Option<String>,
        /// Seconds from SIGTERM/SIGINT to exit: reading stops, what was read is committed
        /// and leases are released; past the budget the process exits anyway (the next start
        /// completes or drops what was left). Fargate kills 30 s after SIGTERM by default.
        #[arg(long, env = "SHARDLAKE_SHUTDOWN_BUDGET", default_value_t = 25.0)]
        shutdown_budget: f64,
    },
    /// Simulate an oil-well fleet, run pipelines/well-telemetry.yaml over it on a local
    /// stream and lake, and show the aggregates and alerts it found.
    Demo {
        /// Working directory for the stream, lake and checkpoints (recreated each run).
        #[arg(long, default_value = "shardlake-demo")]
        dir: PathBuf,
        #[arg(long, default_value_t = 120)]
        devices: usize,
        /// Minutes of readings (one per device per second).
        #[arg(long, default_value_t = 30)]
        minutes: usize,
        #[arg(long, default_value_t = 4)]
        shards: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Keep the fleet sending in real time and serve the console on --listen, until
        /// stopped (Ctrl-C).
        #[arg(long)]
        live: bool,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
    /// Serve the console (fleet page, alert feed, device history, query API) for a pipeline,
    /// showing the live state of the workers given with --worker.
    Console {
        #[arg(env = "SHARDLAKE_PIPELINE")]
        pipeline: PathBuf,
        #[arg(
            long,
            default_value = "127.0.0.1:8080",
            env = "SHARDLAKE_CONSOLE_LISTEN"
        )]
        listen: std::net::SocketAddr,
        /// A worker's ops address (its `run --listen`), e.g. http://10.0.1.5:9090; repeat for
        /// each worker. Default: the workers the lease table (or local checkpoints) lists.
        #[arg(
            long = "worker",
            env = "SHARDLAKE_CONSOLE_WORKERS",
            value_delimiter = ','
        )]
        workers: Vec<String>,
        /// Where acknowledgements of alerts are kept (default: `_console/acks` in a local lake).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Rows a query of the query API returns at most.
        #[arg(long, default_value_t = 10_000)]
        query_rows: usize,
        /// How long a query may run before it is cancelled (e.g. 30s, 500ms).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        query_timeout: Duration,
    },
    /// Check pipeline or schema files; reports every problem with file, line, field and fix.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run SQL over a pipeline's lake; every output is a table.
    Query {
        pipeline: PathBuf,
        sql: String,
        /// Delta tables only: read each table as of this version number of its log, or as it
        /// was at this time (RFC 3339, e.g. 2026-12-07T10:00:00Z).
        #[arg(long)]
        as_of: Option<query::AsOf>,
    },
    /// Compact the closed hour partitions of a pipeline's Delta tables (`format: delta`):
    /// their small files bin-packed into few, in one log entry per partition, so readers see
    /// the partition before or after, never between. Safe while workers run.
    Compact {
        pipeline: PathBuf,
        /// Only this output (default: every Delta table of the pipeline).
        #[arg(long)]
        output: Option<String>,
        /// A partition is closed once its hour ended this long ago.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// Size of the compacted files.
        #[arg(long, default_value = "256MiB", value_parser = parse_size)]
        target_size: u64,
        /// Cluster rows by these columns (Z-order), e.g. `device_id,ts`, so one device's
        /// queries skip most row groups.
        #[arg(long, value_delimiter = ',', conflicts_with = "sort")]
        zorder: Vec<String>,
        /// Sort each partition's rows by these columns, e.g. `device_id,ts`, into files of
        /// `--target-size`: each file holds a range of the first column, and its stats let a
        /// one-device query skip the others.
        #[arg(long, value_delimiter = ',')]
        sort: Vec<String>,
    },
    /// Delete the files of a pipeline's Delta tables that no version of the last `--retain`
    /// references (compactions' inputs, files a crash left outside the log).
    Vacuum {
        pipeline: PathBuf,
        #[arg(long)]
        output: Option<String>,
        /// Versions this recent keep their files (at least 7 days).
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        retain: Duration,
        /// List what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Exit 0 if the worker serving `--listen` on this machine says it is ready (GET
    /// /healthz), 1 otherwise: the container health check, without curl in the image.
    Health {
        /// The worker's --listen address (0.0.0.0 is asked on 127.0.0.1).
        #[arg(long, env = "SHARDLAKE_LISTEN", default_value = "127.0.0.1:9090")]
        listen: std::net::SocketAddr,
    },
    /// Print Athena CREATE EXTERNAL TABLE statements (partition projection) for every output.
    AthenaDdl {
        pipeline: PathBuf,
        #[arg(long, default_value = "shardlake")]
        database: String,
        /// The lake's S3 location, e.g. s3://my-bucket/lake.
        #[arg(long, default_value = "s3://CHANGE-ME/lake")]
        location: String,
        /// The first year the lake holds (default: this year): the `year` projection runs
        /// from it to NOW, so a query without a time filter enumerates only those years.
        #[arg(long)]
        first_year: Option<i32>,
        /// The tenants, comma-separated: `tenant` becomes an enum projection, and each tenant
        /// gets a database `<database>_<tenant>` of views over its rows only. Without it the
        /// projection is `injected`: every query must say `WHERE tenant = '...'`.
        #[arg(long, value_delimiter = ',')]
        tenants: Vec<String>,
    },
}

fn main() -> ExitCode {
    shardlake::logs::init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run {
            pipeline,
            drain,
            worker_id,
            progress,
            listen,
            advertise,
            shutdown_budget,
        } => {
            let p = load(&pipeline, &process_env).await?;
            // The live state costs a little per record: kept only where the console can ask.
            let live = listen.map(|_| shardlake::live::Live::new());
            let advertise = match (listen, advertise) {
                (Some(addr), None) => Some(advertised(addr).await),
                (_, given) => given,
            };
            let opts = RunOptions {
                drain,
                worker: worker_id,
                progress,
                live: live.clone(),
                advertise,
            };
            let metrics = Arc::new(Metrics::default());
            if let Some(addr) = listen {
                let mut routes = shardlake::ops::routes(metrics.clone());
                if let Some(live) = &live {
                    routes = routes.merge(shardlake::live::routes(live.clone()));
                }
                let bound = shardlake::ops::serve(addr, routes)
                    .await
                    .with_context(|| format!("serving /metrics on {addr}"))?;
                tracing::info!(addr = %bound, "serving /metrics and /healthz");
            }
            let budget = Duration::try_from_secs_f64(shutdown_budget)
                .context("--shutdown-budget must be a number of seconds")?;
            // The signal is watched by its own task, so the budget starts when it arrives,
            // whatever the run is doing then.
            let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                shutdown_signal().await;
                let _ = stop_tx.send(true);
            });
            let mut stopping = stop.clone();
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let deadline = async move {
                let _ = stopping.wait_for(|s| *s).await;
                tokio::time::sleep(budget).await;
            };
            tokio::select! {
                r = run(Arc::new(p), opts, Arc::new(SystemClock), metrics, shutdown) => r?,
                _ = deadline => {
                    tracing::error!(budget_s = shutdown_budget, "shutdown budget spent: exiting before the commit finished (the next start completes or drops it)");
                    return Ok(ExitCode::from(3));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            dir,
            devices,
            minutes,
            shards,
            seed,
            live,
            listen,
        } => {
            let live = live.then_some(listen);
            demo(&dir, devices, minutes, shards, seed, live).await
        }
        Command::Console {
            pipeline,
            listen,
            workers,
            state,
            query_rows,
            query_timeout,
        } => {
            let p = Arc::new(load(&pipeline, &process_env).await?);
            let feeds = workers
                .into_iter()
                .map(console::fleet::Feed::Remote)
                .collect();
            let mut opts = console::ConsoleOptions::new(listen, feeds);
            opts.acks_dir = state;
            opts.query_rows = query_rows;
            opts.query_timeout = query_timeout;
            let (bound, _) = console::serve(p, opts).await?;
            eprintln!("console: http://{bound}/");
            shutdown_signal().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { files } => validate(&files).await,
        Command::Device { action } => device(action).await,
        Command::Bridge {
            stream,
            host,
            port,
            ca,
            cert,
            key,
            topic,
            partition_key,
            client_id,
        } => {
            let tls = match (ca, cert, key) {
                (Some(ca), Some(cert), Some(key)) => Some((ca, cert, key)),
                _ => None,
            };
            let opts = shardlake::tools::bridge::BridgeOptions {
                host,
                port,
                tls,
                client_id,
                topic,
                stream,
                partition_key,
            };
            let summary = shardlake::tools::bridge::run(opts, shutdown_signal()).await?;
            println!("{}", serde_json::to_string(&summary)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Query {
            pipeline,
            sql,
            as_of,
        } => {
            let p = load(&pipeline, &process_env).await?;
            let schemas = query::output_schemas(&p).await?;
            let ctx = query::lake_session_as_of(&p, &schemas, as_of.as_ref()).await?;
            let batches = query::query(&ctx, &sql).await?;
            println!("{}", arrow::util::pretty::pretty_format_batches(&batches)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Compact {
            pipeline,
            output,
            older_than,
            target_size,
            zorder,
            sort,
        } => {
            let p = load(&pipeline, &process_env).await?;
            let opts = shardlake::tools::compact::CompactOptions {
                output,
                older_than,
                target_size,
                zorder,
                sort,
            };
            for c in shardlake::tools::compact::compact(&p, &opts).await? {
                let by = if !c.zorder.is_empty() {
                    format!(" (Z-order by {})", c.zorder.join(", "))
                } else if !c.sort.is_empty() {
                    format!(" (sorted by {})", c.sort.join(", "))
                } else {
                    String::new()
                };
                if c.busy {
                    println!(
                        "{}: busy, another compaction holds it (its claim in the table's log expires by itself if that compaction died)",
                        c.output
                    );
                    continue;
                }
                let failed = if c.failed > 0 {
                    format!(
                        "; {} partitions failed (logged), tried again next run",
                        c.failed
                    )
                } else {
                    String::new()
                };
                let merged = if c.parts_before > 0 {
                    format!(
                        "; {} parts merged into {} (one per window and group)",
                        c.parts_before, c.parts_after
                    )
                } else {
                    String::new()
                };
                println!(
                    "{}: {} partitions compacted, {} files into {}{by}{merged}{failed}",
                    c.output, c.partitions, c.files_removed, c.files_added
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Vacuum {
            pipeline,
            output,
            retain,
            dry_run,
        } => {
            let p = load(&pipeline, &process_env).await?;
            let done =
                shardlake::tools::compact::vacuum(&p, output.as_deref(), retain, dry_run).await?;
            for v in done {
                let verb = if dry_run { "would delete" } else { "deleted" };
                println!("{}: {verb} {} files", v.output, v.files_deleted);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Health { listen } => Ok(if healthy(listen) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
        Command::AthenaDdl {
            pipeline,
            database,
            location,
            first_year,
            tenants,
        } => {
            let p = load(&pipeline, &process_env).await?;
            let schemas = query::output_schemas(&p).await?;
            let opts = athena::DdlOptions {
                first_year: first_year
                    .unwrap_or_else(|| chrono::Datelike::year(&chrono::Utc::now())),
                tenants,
            };
            print!(
                "{}",
                athena::athena_ddl(&p.name, &database, &location, &schemas, &opts)
                    .map_err(anyhow::Error::msg)?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Loads a pipeline and plans its SQL, so every configuration problem surfaces before a run.
async fn load(path: &Path, env: config::Env<'_>) -> Result<Pipeline> {
    Ok(sql::load(path, env).await?)
}

async fn validate(files: &[PathBuf]) -> Result<ExitCode> {
    let mut failed = false;
    for f in files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let is_schema = text.lines().any(|l| l.starts_with("fields:"));
        let result = if is_schema {
            load_schema(f, &process_env)
                .map(|s| format!("schema {} with {} fields", s.name, s.fields.len()))
                .map_err(anyhow::Error::from)
        } else {
            load(f, &process_env).await.map(|p| {
                format!(
                    "pipeline {} with {} tables and {} alert rules",
                    p.name,
                    p.table_names().len(),
                    p.alerts.len()
                )
            })
        };
        match result {
            Ok(what) => println!("ok: {}: {what}", f.display()),
            Err(e) => {
                failed = true;
                eprint!("{e}");
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The address the console uses for a worker listening on `listen`: on ECS, the task's
/// private IP from the task metadata endpoint; elsewhere `listen` (loopback for 0.0.0.0).
async fn advertised(listen: std::net::SocketAddr) -> String {
    if let Ok(meta) = std::env::var("ECS_CONTAINER_METADATA_URI_V4") {
        let ip = async {
            let body = reqwest::get(format!("{meta}/task"))
                .await
                .ok()?
                .bytes()
                .await
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
            v["Containers"][0]["Networks"][0]["IPv4Addresses"][0]
                .as_str()
                .map(str::to_string)
        };
        match ip.await {
            Some(ip) => return format!("http://{ip}:{}", listen.port()),
            None => tracing::warn!(
                "the ECS task metadata names no IPv4 address; set SHARDLAKE_ADVERTISE"
            ),
        }
    }
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}")
}

/// GET /healthz on the worker's port answers 200.
fn healthy(mut addr: std::net::SocketAddr) -> bool {
    use std::io::{Read, Write};
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let timeout = Duration::from_secs(3);
    let Ok(mut conn) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(timeout));
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut answer = String::new();
    conn.write_all(request.as_bytes()).is_ok()
        && conn.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200 ")
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

const DEMO_MARKER: &str = ".shardlake-demo";
const DEMO_PIPELINE: &str = include_str!("../../pipelines/well-telemetry.yaml");
const DEMO_SCHEMA: &str = include_str!("../../schemas/well-reading.yaml");

async fn demo(
    dir: &Path,
    devices: usize,
    minutes: usize,
    shards: usize,
    seed: u64,
    live: Option<std::net::SocketAddr>,
) -> Result<ExitCode> {
    if dir.exists() {
        if !dir.join(DEMO_MARKER).exists() && std::fs::read_dir(dir)?.next().is_some() {
            bail!(
                "{} exists and is not a demo directory; pass --dir with a new path",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(DEMO_MARKER), b"")?;
    // The pipeline and schema as shipped, so the demo runs from any directory.
    let conf = dir.join("config");
    std::fs::create_dir_all(conf.join("pipelines"))?;
    std::fs::create_dir_all(conf.join("schemas"))?;
    let pipeline_path = conf.join("pipelines/well-telemetry.yaml");
    std::fs::write(&pipeline_path, DEMO_PIPELINE)?;
    std::fs::write(conf.join("schemas/well-reading.yaml"), DEMO_SCHEMA)?;

    let stream = dir.join("stream");
    localstream::create(&stream, shards)?;
    let cfg = SimConfig {
        devices,
        readings_per_device: minutes * 60,
        start: chrono::Utc::now() - chrono::Duration::minutes(minutes as i64),
        seed,
        ..Default::default()
    };
    eprintln!(
        "simulating {devices} wells for {minutes} minutes into {} ({shards} shards)",
        stream.display()
    );
    let sim = simulate(&cfg, &mut LocalStreamWriter::open(&stream)?)?;
    eprintln!(
        "wrote {} readings ({} pressure spikes, {} malformed records)",
        sim.readings, sim.spikes, sim.malformed
    );

    let data = dir.display().to_string();
    let env = move |k: &str| {
        if k == "SHARDLAKE_DATA" {
            Some(data.clone())
        } else {
            process_env(k)
        }
    };
    let p = Arc::new(
        load(&pipeline_path, &env)
            .await
            .context("loading the demo pipeline")?,
    );
    if let Some(listen) = live {
        return demo_live(p, &stream, &cfg, listen).await;
    }
    let started = std::time::Instant::now();
    let opts = RunOptions {
        drain: true,
        progress: true,
        ..Default::default()
    };
    run(
        p.clone(),
        opts,
        Arc::new(SystemClock),
        Arc::new(Metrics::default()),
        std::future::pending(),
    )
    .await?;
    eprintln!(
        "pipeline finished in {:.1}s; lake: {}/lake\n",
        started.elapsed().as_secs_f64(),
        dir.display()
    );

    let schemas = query::output_schemas(&p).await?;
    let ctx = query::lake_session(&p, &schemas).await?;
    for (title, q) in [
        (
            "Tables",
            "SELECT 'readings' AS table_name, count(*) AS row_count FROM readings UNION ALL SELECT 'well_1m', count(*) FROM well_1m UNION ALL SELECT 'well_5m_hop', count(*) FROM well_5m_hop UNION ALL SELECT 'alerts', count(*) FROM alerts UNION ALL SELECT 'dead_letter', count(*) FROM dead_letter UNION ALL SELECT 'late', count(*) FROM late",
        ),
        (
            "Per-device 1-minute aggregates (first 12)",
            "SELECT window_start, device_id, readings, round(barrels_per_s_avg, 3) AS barrels_per_s, round(pressure_avg, 1) AS pressure_avg, round(pressure_max, 1) AS pressure_max, round(temp_avg, 1) AS temp_avg FROM well_1m ORDER BY window_start, device_id LIMIT 12",
        ),
        (
            "Alerts",
            "SELECT rule, kind, event_time, key, substr(detail, 1, 90) AS detail FROM alerts ORDER BY event_time, rule LIMIT 30",
        ),
        (
            "Dead letters",
            "SELECT error, count(*) AS records, min(reason) AS example FROM dead_letter GROUP BY error ORDER BY error",
        ),
    ] {
        let batches = query::query(&ctx, q).await?;
        println!(
            "{title}\n{}\n",
            arrow::util::pretty::pretty_format_batches(&batches)?
        );
    }
    println!(
        "Query it yourself:\n  SHARDLAKE_DATA={} cargo run --release -- query pipelines/well-telemetry.yaml \"SELECT * FROM well_1m WHERE device_id = 'well-0007' ORDER BY window_start LIMIT 5\"",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `demo --live`: the pipeline keeps running over the simulated fleet, which goes on sending
/// one reading per well per second, and the console shows it on `listen`.
async fn demo_live(
    p: Arc<Pipeline>,
    stream: &Path,
    history: &SimConfig,
    listen: std::net::SocketAddr,
) -> Result<ExitCode> {
    let live = shardlake::live::Live::new();
    let opts = RunOptions {
        live: Some(live.clone()),
        ..Default::default()
    };
    let metrics = Arc::new(Metrics::default());
    let feeds = vec![console::fleet::Feed::InProcess(live)];
    let (bound, _) = console::serve(p.clone(), console::ConsoleOptions::new(listen, feeds)).await?;
    println!("console: http://{bound}/  (Ctrl-C stops)");
    // The same wells go on, one reading each per second of wall clock from now on.
    let stream = stream.to_path_buf();
    let mut cfg = history.clone();
    let sender = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut out = LocalStreamWriter::open(&stream)?;
        let mut step = cfg.readings_per_device;
        cfg.readings_per_device = 1;
        cfg.malformed = 0;
        cfg.jitter_ms = 0;
        loop {
            let due = cfg.start + chrono::Duration::milliseconds(step as i64 * cfg.interval_ms);
            let wait = (due - chrono::Utc::now()).to_std().unwrap_or_default();
            std::thread::sleep(wait);
            cfg.first_step = step;
            // Now and then a pressure spike, so the alert feed moves too.
            cfg.spikes = usize::from(step.is_multiple_of(20));
            simulate(&cfg, &mut out)?;
            step += 1;
        }
    });
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    let worker = run(p, opts, Arc::new(SystemClock), metrics, async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    tokio::pin!(worker);
    let mut sender = sender;
    tokio::select! {
        r = &mut worker => { r?; return Ok(ExitCode::SUCCESS); }
        _ = shutdown_signal() => {}
        r = &mut sender => { r??; }
    }
    let _ = stop_tx.send(true);
    worker.await?;
    Ok(ExitCode::SUCCESS)
}

/// `shardlake device set|show`.
async fn device(action: DeviceAction) -> Result<ExitCode> {
    use shardlake::tools::device as d;
    match action {
        DeviceAction::Show {
            device,
            device_args,
        } => {
            let (broker, topics) = device_args.resolve(&device)?;
            let state = d::show(&broker, &topics).await?;
            println!("{}", serde_json::to_string_pretty(&state)?);
            Ok(ExitCode::SUCCESS)
        }
        DeviceAction::Set {
            device,
            settings,
            unset,
            wait,
            user,
            device_args,
        } => {
            let (broker, topics) = device_args.resolve(&device)?;
            let settings = settings
                .iter()
                .map(|s| d::parse_setting(s))
                .collect::<Result<Vec<_>>>()?;
            let outcome = d::set(
                &broker,
                &topics,
                &settings,
                &unset,
                &format!("user:{user}"),
                wait,
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&outcome)?);
            let (text, ok) = d::verdict(&outcome, wait.is_some());
            eprintln!("{device}: {text}");
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// A size argument, as in pipeline files (`256MiB`).
fn parse_size(text: &str) -> Result<u64, String> {
    config::parse_bytes(text).ok_or_else(|| format!("{text:?} is not a size; write e.g. 256MiB"))
}
