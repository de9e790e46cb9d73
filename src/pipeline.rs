//! `run(pipeline, options, clock, shutdown)`: the one entry point `main`, the demo and the
//! tests share. It opens the engine (which recovers), starts a task per shard, feeds the
//! engine their chunks, commits on rollover, and on shutdown commits what it has.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::checkpoint::local::LocalStore;
use crate::clock::Clock;
use crate::config::{Checkpoints, Lake as LakeConfig, Pipeline, Source};
use crate::decode::RecordDecoder;
use crate::engine::{Engine, EngineError};
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
pub async fn lakes_for(p: &Pipeline) -> std::io::Result<Lakes> {
    let mut opened: Vec<(&LakeConfig, Arc<dyn Lake>)> = Vec::new();
    let mut by_output = std::collections::BTreeMap::new();
    for (output, cfg) in &p.outputs.sinks {
        let lake = match opened.iter().find(|(c, _)| *c == cfg) {
            Some((_, l)) => l.clone(),
            None => {
                let l: Arc<dyn Lake> = match cfg {
                    LakeConfig::Local { path } => Arc::new(LocalLake::new(path)),
                    LakeConfig::S3(loc) => Arc::new(S3Lake::connect(loc).await?),
                };
                opened.push((cfg, l.clone()));
                l
            }
        };
        by_output.insert(output.clone(), lake);
    }
    Ok(Lakes::new(by_output))
}

pub async fn run(
    p: Arc<Pipeline>,
    opts: RunOptions,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let (source, shards) = match &p.source {
        Source::Local {
            path,
            poll_interval,
        } => {
            let shards = list_shards(path)?
                .into_iter()
                .map(|id| (id, Vec::new()))
                .collect();
            (Opened::Local(path.clone(), *poll_interval), shards)
        }
        Source::Kinesis(k) => {
            let stream = KinesisStream::connect(k, metrics.clone()).await;
            let listed = stream.list_shards().await?;
            let known: HashSet<&str> = listed.iter().map(|s| &*s.id).collect();
            let shards = listed
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
                .collect();
            (Opened::Kinesis(stream), shards)
        }
    };
    let shards: Vec<(Arc<str>, Vec<String>)> = shards;
    let Checkpoints::Local { path: state } = &p.checkpoints;
    let store = Box::new(LocalStore::open(state, &p.name)?);
    let lakes = lakes_for(&p).await.map_err(RunError::Lake)?;
    let mut engine = Engine::open(
        p.clone(),
        lakes,
        store,
        clock.clone(),
        &opts.worker,
        metrics.clone(),
    )
    .await?;
    let notifications = Notifications::start(&p, metrics.clone())
        .await
        .map_err(RunError::Notify)?;
    if let Some(n) = &notifications {
        engine.set_notifications(n.clone());
    }

    let decoder = RecordDecoder::new(&p);
    // Two chunks in flight per shard: enough to overlap reading with processing, and a
    // bound on memory whatever the backlog.
    let (tx, mut rx) = mpsc::channel(2 * shards.len());
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
        match &source {
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
    let progress = opts
        .progress
        .then(|| tokio::spawn(report_progress(metrics.clone())));

    let mut caught_up: HashSet<Arc<str>> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tokio::pin!(shutdown);
    let result: Result<(), RunError> = async {
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
                    Some(ShardEvent::Failed(_, e)) => return Err(e.into()),
                    None => return Ok(()),
                },
                _ = tick.tick() => engine.tick().await?,
                _ = &mut shutdown => {
                    tracing::info!("shutting down: committing what was read");
                    return Ok(());
                }
            }
            if opts.drain && caught_up.len() == shards.len() {
                tracing::info!("every shard is caught up: emitting open windows");
                engine.finish().await?;
                return Ok(());
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
        "run finished"
    );
    if let Some(h) = progress {
        h.abort();
        eprintln!("{}", progress_line(&metrics, None));
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
    format!(
        "records {}{rate} · dead-letter {} · late {} · windows {} · alerts {} · files {} · commits {}",
        g(&m.records_read),
        g(&m.dead_letters),
        g(&m.late_records),
        g(&m.windows_emitted),
        g(&m.alerts),
        g(&m.files_written),
        g(&m.commits)
    )
}
