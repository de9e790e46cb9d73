//! `run(pipeline, options, clock, shutdown)`: the one entry point `main`, the demo and the
//! tests share. It opens the engine (which recovers), starts a task per shard, feeds the
//! engine their chunks, commits on rollover, and on shutdown commits what it has.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::checkpoint::StoreError;
use crate::checkpoint::local::LocalStore;
use crate::clock::Clock;
use crate::config::{Checkpoints, Lake as LakeConfig, Pipeline, Source};
use crate::decode::RecordDecoder;
use crate::engine::{Engine, EngineError};
use crate::lease::{Generation, LeaseManager};
use crate::metrics::Metrics;
use crate::notify::Notifications;
use crate::sink::local::LocalLake;
use crate::sink::s3::S3Lake;
use crate::sink::{Lake, Lakes};
use crate::source::kinesis::KinesisStream;
use crate::source::local::{LocalShardReader, list_shards};
use crate::source::{
    Parents, ShardEvent, ShardGate, ShardTaskConfig, SourceError, shard_task, show,
};

/// The source, opened.
enum Opened {
    Local(std::path::PathBuf, Duration),
    Kinesis(KinesisStream),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] crate::checkpoint::StoreError),
    #[error("opening the lake: {0}")]
    Lake(std::io::Error),
    #[error("starting the notifiers: {0}")]
    Notify(anyhow::Error),
}

/// How long a run waits at its end for notifiers to send what they have queued.
const NOTIFY_DRAIN: Duration = Duration::from_secs(10);

/// Decoded chunks queued for the engine, at most.
const MAX_QUEUED_CHUNKS: usize = 8;

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Stop once every shard is caught up, emitting every open window (a bounded run).
    pub drain: bool,
    /// Names this worker's files.
    pub worker: String,
    /// Print a progress line to stderr every second.
    pub progress: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            drain: false,
            worker: "w0".into(),
            progress: false,
        }
    }
}

/// Every output's lake, connected (an S3 lake checks its bucket). Outputs with the same
/// sink share one.
pub async fn lakes_for(p: &Pipeline, metrics: &Arc<Metrics>) -> std::io::Result<Lakes> {
    let mut opened: Vec<(&LakeConfig, Arc<dyn Lake>)> = Vec::new();
    let mut by_output = std::collections::BTreeMap::new();
    for (output, cfg) in &p.outputs.sinks {
        let lake = match opened.iter().find(|(c, _)| *c == cfg) {
            Some((_, l)) => l.clone(),
            None => {
                let l: Arc<dyn Lake> = match cfg {
                    LakeConfig::Local { path } => Arc::new(LocalLake::new(path)),
                    LakeConfig::S3(loc) => Arc::new(S3Lake::connect(loc, metrics.clone()).await?),
                };
                opened.push((cfg, l.clone()));
                l
            }
        };
        by_output.insert(output.clone(), lake);
    }
    Ok(Lakes::new(by_output))
}

/// How often a Kinesis source without leases lists its shards again (new shards after a
/// split or merge start a new session).
const RELIST_INTERVAL: Duration = Duration::from_secs(60);

/// Which shards a session reads, and where their checkpoints are.
struct Session {
    shards: Vec<(Arc<str>, Vec<String>)>,
    store: Box<dyn crate::checkpoint::CheckpointStore>,
}

/// Why a session ended.
enum SessionEnd {
    /// Shut down, or drained: the run is over.
    Done,
    /// The shards to read changed (a lease taken, a new shard): start over from the
    /// checkpoints with the new set.
    Changed,
}

pub async fn run(
    p: Arc<Pipeline>,
    opts: RunOptions,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let source = match &p.source {
        Source::Local {
            path,
            poll_interval,
        } => Opened::Local(path.clone(), *poll_interval),
        Source::Kinesis(k) => Opened::Kinesis(KinesisStream::connect(k, metrics.clone()).await),
    };
    let mut opts = opts;
    let leases = match (&p.checkpoints, &source, &p.source) {
        (Checkpoints::Dynamodb(table), Opened::Kinesis(stream), Source::Kinesis(k)) => {
            // A fresh identity per process: file names and commit ids never repeat, even
            // after a restart with the same worker id.
            opts.worker = format!("{}-{:08x}", opts.worker, fastrand::u32(..));
            let m = LeaseManager::connect(
                table,
                opts.worker.clone(),
                stream.clone(),
                k.start,
                p.outputs
                    .aggregations
                    .iter()
                    .map(|a| a.name.clone())
                    .collect(),
                metrics.clone(),
            )
            .await?;
            tracing::info!(owner = %m.owner(), table = %table.table, "sharing the stream through leases");
            Some(m)
        }
        _ => None,
    };
    let lakes = lakes_for(&p, &metrics).await.map_err(RunError::Lake)?;
    let notifications = Notifications::start(&p, metrics.clone())
        .await
        .map_err(RunError::Notify)?;
    let progress = opts
        .progress
        .then(|| tokio::spawn(report_progress(metrics.clone())));
    let (stop_leases, stop_rx) = watch::channel(false);
    let lease_task = leases.clone().map(|m| tokio::spawn(m.run(stop_rx)));

    let ready = &metrics.ready;
    let shutdown = async {
        shutdown.await;
        ready.store(false, std::sync::atomic::Ordering::Relaxed);
    };
    tokio::pin!(shutdown);
    let result = async {
        if let Some(m) = &leases {
            tokio::select! {
                _ = m.first_scan() => {}
                _ = &mut shutdown => return Ok(()),
            }
        }
        // The sinks answered (an S3 lake checked its bucket) and the leases were scanned.
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut generation = leases.as_ref().map(|m| m.generation());
        loop {
            let session = match &leases {
                None => {
                    let shards = list_all(&source).await?;
                    let Checkpoints::Local { path: state } = &p.checkpoints else {
                        unreachable!("validated: leases need a Kinesis source")
                    };
                    Session {
                        shards,
                        store: Box::new(LocalStore::open(state, &p.name)?),
                    }
                }
                Some(m) => {
                    let generation = generation.as_mut().expect("with leases");
                    let held = loop {
                        // Whatever changes from here on ends the session about to start.
                        generation.borrow_and_update();
                        let held = m.session_shards().await?;
                        if !held.is_empty() {
                            break held;
                        }
                        tracing::info!("no lease to hold for now; waiting");
                        tokio::select! {
                            _ = generation.changed() => {}
                            _ = &mut shutdown => return Ok(()),
                        }
                    };
                    let ids: Vec<String> = held.keys().cloned().collect();
                    let shards = held
                        .into_iter()
                        .map(|(id, h)| {
                            // Parents outside this session were read to their end already
                            // (their leases were not takeable before).
                            let parents = h.parents.into_iter().filter(|p| ids.contains(p)).collect();
                            (Arc::from(id.as_str()), parents)
                        })
                        .collect();
                    Metrics::add(&metrics.lease_sessions, 1);
                    Session {
                        shards,
                        store: m.store(ids),
                    }
                }
            };
            let outcome = run_session(
                &p,
                &opts,
                &source,
                session,
                &lakes,
                notifications.as_ref(),
                generation.as_mut(),
                &clock,
                &metrics,
                &mut shutdown,
            )
            .await;
            match outcome {
                Ok(SessionEnd::Done) => return Ok(()),
                Ok(SessionEnd::Changed) => {}
                Err(RunError::Engine(EngineError::Store(StoreError::LeaseLost(shards))))
                | Err(RunError::Store(StoreError::LeaseLost(shards))) => {
                    tracing::warn!(shards = ?shards, "a lease was lost: dropping this session's uncommitted work (the new owner reads it again)");
                }
                Err(e) => return Err(e),
            }
        }
    }
    .await;
    if let Some(m) = &leases {
        let _ = stop_leases.send(true);
        if let Some(t) = lease_task {
            let _ = t.await;
        }
        if result.is_ok() {
            m.release_all().await;
        }
    }
    if let Some(n) = notifications {
        n.close(NOTIFY_DRAIN).await;
        let g = Metrics::get;
        tracing::info!(
            sent = g(&metrics.notifications_sent),
            suppressed = g(&metrics.notifications_suppressed),
            failed = g(&metrics.notifier_failures),
            dropped = g(&metrics.notifications_dropped),
            "notifiers closed"
        );
    }
    let g = Metrics::get;
    tracing::info!(
        records = g(&metrics.records_read),
        dead_letters = g(&metrics.dead_letters),
        commits = g(&metrics.commits),
        kinesis_throttled = g(&metrics.kinesis_throttled),
        kinesis_errors_retried = g(&metrics.kinesis_errors_retried),
        kinesis_expired_iterators = g(&metrics.kinesis_expired_iterators),
        kpl_aggregates = g(&metrics.kpl_aggregates),
        dynamodb_throttled = g(&metrics.dynamodb_throttled),
        dynamodb_errors_retried = g(&metrics.dynamodb_errors_retried),
        s3_throttled = g(&metrics.s3_throttled),
        s3_errors_retried = g(&metrics.s3_errors_retried),
        leases_taken = g(&metrics.leases_taken),
        leases_lost = g(&metrics.leases_lost),
        lease_sessions = g(&metrics.lease_sessions),
        "run finished"
    );
    if let Some(h) = progress {
        h.abort();
        eprintln!("{}", progress_line(&metrics, None));
    }
    result
}

/// Every shard of the source, each with its parents still in the stream.
async fn list_all(source: &Opened) -> Result<Vec<(Arc<str>, Vec<String>)>, RunError> {
    Ok(match source {
        Opened::Local(path, _) => list_shards(path)?
            .into_iter()
            .map(|id| (id, Vec::new()))
            .collect(),
        Opened::Kinesis(stream) => {
            let listed = stream.list_shards().await?;
            let known: HashSet<&str> = listed.iter().map(|s| &*s.id).collect();
            listed
                .iter()
                .map(|s| {
                    let parents = s
                        .parents
                        .iter()
                        .filter(|p| known.contains(p.as_str()))
                        .cloned()
                        .collect();
                    (s.id.clone(), parents)
                })
                .collect()
        }
    })
}

/// Reads a fixed set of shards until shutdown, drain, or a change of that set. Opening the
/// engine recovers (pending commits, orphaned files); every session starts from the
/// committed checkpoints, so open windows are rebuilt by replay.
#[allow(clippy::too_many_arguments)]
async fn run_session(
    p: &Arc<Pipeline>,
    opts: &RunOptions,
    source: &Opened,
    session: Session,
    lakes: &Lakes,
    notifications: Option<&Arc<Notifications>>,
    mut generation: Option<&mut watch::Receiver<Generation>>,
    clock: &Arc<dyn Clock>,
    metrics: &Arc<Metrics>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<SessionEnd, RunError> {
    let Session { shards, store } = session;
    let mut engine = Engine::open(
        p.clone(),
        lakes.clone(),
        store,
        clock.clone(),
        &opts.worker,
        metrics.clone(),
    )
    .await?;
    if let Some(n) = notifications {
        engine.set_notifications(n.clone());
    }

    let decoder = RecordDecoder::new(p);
    // Decoded chunks waiting for the engine: enough to overlap reading and decoding with
    // processing. Not more per shard: with many shards, each reader also holds the chunk it
    // is decoding or waiting to send, so what is in memory is about (8 + shards) chunks of at
    // most `max_records`, whatever the backlog.
    let (tx, mut rx) = mpsc::channel((2 * shards.len()).clamp(2, MAX_QUEUED_CHUNKS));
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(ShardGate::default());
    let mut tasks = JoinSet::new();
    for (shard, parents) in &shards {
        let from = engine.add_shard(shard.clone());
        tracing::info!(shard_id = %shard, from = %show(&from), "reading shard");
        let parents = Parents {
            gate: gate.clone(),
            shards: parents.clone(),
        };
        let (clock, decoder, tx, stop) =
            (clock.clone(), decoder.clone(), tx.clone(), stop_rx.clone());
        match source {
            Opened::Local(stream, poll_interval) => {
                let cfg = ShardTaskConfig {
                    max_records: 10_000,
                    poll_interval: *poll_interval,
                    parents,
                };
                let reader = LocalShardReader::open(stream, shard.clone(), &from);
                tasks.spawn(shard_task(
                    shard.clone(),
                    reader,
                    decoder,
                    clock,
                    cfg,
                    tx,
                    stop,
                ));
            }
            Opened::Kinesis(stream) => {
                // The reader paces itself (poll interval, read limits).
                let cfg = ShardTaskConfig {
                    max_records: stream.max_records(),
                    poll_interval: Duration::ZERO,
                    parents,
                };
                let reader = stream.reader(shard.clone(), &from);
                tasks.spawn(shard_task(
                    shard.clone(),
                    reader,
                    decoder,
                    clock,
                    cfg,
                    tx,
                    stop,
                ));
            }
        }
    }
    drop(tx);

    let start_gen = generation.as_ref().map(|g| *g.borrow());
    let lease_change = async |g: &mut Option<&mut watch::Receiver<Generation>>| match g {
        Some(g) => {
            let _ = g.changed().await;
        }
        None => std::future::pending().await,
    };
    let mut relist = tokio::time::interval_at(
        tokio::time::Instant::now() + RELIST_INTERVAL,
        RELIST_INTERVAL,
    );
    let relisting = generation.is_none() && matches!(source, Opened::Kinesis(_));
    let mut caught_up: HashSet<Arc<str>> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let result: Result<SessionEnd, RunError> = async {
        loop {
            tokio::select! {
                event = rx.recv() => match event {
                    Some(ShardEvent::Chunk(d)) => {
                        caught_up.remove(&d.shard);
                        engine.ingest(d).await?;
                    }
                    Some(ShardEvent::Waiting(shard)) => engine.shard_caught_up(&shard),
                    Some(ShardEvent::CaughtUp(shard)) => {
                        engine.shard_caught_up(&shard);
                        caught_up.insert(shard);
                    }
                    Some(ShardEvent::Ended(shard)) => {
                        engine.shard_caught_up(&shard);
                        engine.shard_ended(&shard);
                        caught_up.insert(shard);
                    }
                    Some(ShardEvent::Failed(_, e)) => return Err(e.into()),
                    None => return Ok(SessionEnd::Done),
                },
                _ = tick.tick() => engine.tick().await?,
                _ = lease_change(&mut generation) => {
                    let now = generation.as_mut().map(|g| *g.borrow_and_update());
                    if now.map(|g| g.lost) != start_gen.map(|g| g.lost) {
                        return Err(StoreError::LeaseLost(Vec::new()).into());
                    }
                    tracing::info!("took a lease: committing, then reading the new set of shards");
                    return Ok(SessionEnd::Changed);
                }
                _ = relist.tick(), if relisting => {
                    let now = list_all(source).await?;
                    let ids = |v: &[(Arc<str>, Vec<String>)]| v.iter().map(|(s, _)| s.clone()).collect::<HashSet<_>>();
                    if ids(&now) != ids(&shards) {
                        tracing::info!(shards = now.len(), "the stream's shards changed: committing, then reading the new set");
                        return Ok(SessionEnd::Changed);
                    }
                }
                _ = shutdown.as_mut() => {
                    tracing::info!("shutting down: committing what was read");
                    return Ok(SessionEnd::Done);
                }
            }
            if opts.drain && caught_up.len() == shards.len() {
                tracing::info!("every shard is caught up: emitting open windows");
                engine.finish().await?;
                return Ok(SessionEnd::Done);
            }
            if engine.should_commit() {
                engine.commit().await?;
            }
        }
    }
    .await;
    let _ = stop_tx.send(true);
    drop(rx);
    while tasks.join_next().await.is_some() {}
    if result.is_ok() {
        engine.commit().await?;
    }
    result
}

async fn report_progress(m: Arc<Metrics>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.tick().await;
    let mut last = 0;
    loop {
        every.tick().await;
        let now = Metrics::get(&m.records_read);
        eprintln!("{}", progress_line(&m, Some(now - last)));
        last = now;
    }
}

fn progress_line(m: &Metrics, rate: Option<u64>) -> String {
    let g = Metrics::get;
    let rate = rate.map(|r| format!(" ({r}/s)")).unwrap_or_default();
    // Kinesis' MillisBehindLatest, the largest over the shards (Prometheus export: issue 6).
    let lag = m
        .max_lag_ms()
        .map(|ms| format!(" · behind {ms} ms"))
        .unwrap_or_default();
    format!(
        "records {}{rate} · dead-letter {} · late {} · windows {} · alerts {} · files {} · commits {}{lag}",
        g(&m.records_read),
        g(&m.dead_letters),
        g(&m.late_records),
        g(&m.windows_emitted),
        g(&m.alerts),
        g(&m.files_written),
        g(&m.commits)
    )
}
