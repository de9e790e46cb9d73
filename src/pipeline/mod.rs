//! `run(pipeline, options, clock, metrics, shutdown)`: the one entry point `main`, the demo
//! and the tests share. A [`Worker`] opens the source, the leases (with many workers), the
//! lakes and the notifiers; then it runs [`session`]s one after another, each reading a fixed
//! set of shards, until shutdown or drain; [`progress`] reports along the way.

mod progress;
mod session;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::checkpoint::CheckpointStore;
use crate::checkpoint::StoreError;
use crate::checkpoint::dynamodb::{Generation, LeaseManager};
use crate::checkpoint::local::LocalStore;
use crate::checkpoint::s3::S3Store;
use crate::clock::Clock;
use crate::config::{Checkpoints, Pipeline, Source};
use crate::engine::EngineError;
use crate::metrics::Metrics;
use crate::notify::Notifications;
use crate::sink::Lakes;
use crate::source::{SourceError, Stream};
use session::{Plan, Session, SessionEnd};

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

/// With local checkpoints: the directory under the checkpoints' where each running worker
/// that serves its live state leaves `<worker>.url` (the console reads it).
pub const LIVE_DIR: &str = "live";

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
    /// Keep the worker's live state here, for the console (`GET /live` on the ops port).
    pub live: Option<Arc<crate::live::Live>>,
    /// Where the console reaches this worker's `GET /live` (`http://10.0.1.5:9090`): written
    /// into the leases it holds, or with local checkpoints into `<checkpoints>/live/`.
    pub advertise: Option<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            drain: false,
            worker: "w0".into(),
            progress: false,
            live: None,
            advertise: None,
        }
    }
}

/// What every session of a run shares: the pipeline, the opened source, leases, lakes and
/// notifiers.
struct Worker {
    p: Arc<Pipeline>,
    opts: RunOptions,
    source: Stream,
    /// With a DynamoDB checkpoint store: the leases deciding which shards this worker reads.
    leases: Option<Arc<LeaseManager>>,
    lakes: Lakes,
    notifications: Option<Arc<Notifications>>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

pub async fn run(
    p: Arc<Pipeline>,
    opts: RunOptions,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let w = Worker::open(p, opts, clock, metrics).await?;
    // With local checkpoints there is no lease table: the console finds this worker here.
    let registered = match (&w.p.checkpoints, &w.opts.advertise) {
        (Checkpoints::Local { path }, Some(addr)) => {
            let file = path.join(LIVE_DIR).join(format!("{}.url", w.opts.worker));
            let written = std::fs::create_dir_all(path.join(LIVE_DIR))
                .and_then(|()| std::fs::write(&file, addr));
            if let Err(e) = written {
                tracing::warn!(file = %file.display(), error = %e, "the console will not find this worker");
            }
            Some(file)
        }
        _ => None,
    };
    let progress = w
        .opts
        .progress
        .then(|| tokio::spawn(progress::report(w.metrics.clone())));
    let (stop_leases, stop_rx) = watch::channel(false);
    let lease_task = w.leases.clone().map(|m| tokio::spawn(m.run(stop_rx)));
    // Off the commit path: its own task, its own reads of the tables' logs.
    let compaction =
        w.p.compaction
            .clone()
            .map(|c| tokio::spawn(compact_every(w.p.clone(), c)));

    let ready = &w.metrics.ready;
    let shutdown = async {
        shutdown.await;
        ready.store(false, std::sync::atomic::Ordering::Relaxed);
    };
    tokio::pin!(shutdown);
    let result = w.run_sessions(&mut shutdown).await;
    if let Some(m) = &w.leases {
        let _ = stop_leases.send(true);
        if let Some(t) = lease_task {
            let _ = t.await;
        }
        if result.is_ok() {
            m.release_all().await;
        }
    }
    if let Some(n) = &w.notifications {
        n.close(NOTIFY_DRAIN).await;
        progress::log_notifiers(&w.metrics);
    }
    if let Some(file) = registered {
        let _ = std::fs::remove_file(file);
    }
    if let Some(h) = compaction {
        // A compaction stopped part-way committed the partitions it finished; the files of
        // the one it was writing are in no log entry, for vacuum.
        h.abort();
    }
    progress::log_summary(&w.metrics);
    if let Some(h) = progress {
        h.abort();
        eprintln!("{}", progress::line(&w.metrics, None));
    }
    result
}

/// `compaction:`: `shardlake compact` every `every`, the first time one `every` after the
/// start. A failure is logged and tried again at the next turn.
async fn compact_every(p: Arc<Pipeline>, c: crate::config::Compaction) {
    let opts = crate::tools::compact::CompactOptions {
        output: None,
        older_than: c.older_than,
        target_size: c.target_size,
        zorder: c.zorder,
        sort: c.sort,
    };
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + c.every, c.every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        timer.tick().await;
        match crate::tools::compact::compact(&p, &opts).await {
            Ok(done) => {
                for d in done.iter().filter(|d| d.partitions > 0) {
                    tracing::info!(output = %d.output, partitions = d.partitions, files_removed = d.files_removed, files_added = d.files_added, "compacted");
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "compaction failed; trying again at the next turn")
            }
        }
    }
}

impl Worker {
    async fn open(
        p: Arc<Pipeline>,
        mut opts: RunOptions,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RunError> {
        let source = Stream::open(&p, &metrics).await?;
        if let Checkpoints::S3 { .. } = &p.checkpoints {
            // No lock keeps a second worker off these checkpoints (its first write fails):
            // until then, its staged files must not take the first's names.
            opts.worker = format!("{}-{:08x}", opts.worker, fastrand::u32(..));
        }
        let leases = match (&p.checkpoints, &source, &p.source) {
            (Checkpoints::Dynamodb(table), Stream::Kinesis(stream), Source::Kinesis(k)) => {
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
                    opts.advertise.clone(),
                )
                .await?;
                tracing::info!(owner = %m.owner(), table = %table.table, "sharing the stream through leases");
                Some(m)
            }
            _ => None,
        };
        let lakes = Lakes::open(&p, &metrics).await.map_err(RunError::Lake)?;
        let notifications = Notifications::start(&p, metrics.clone())
            .await
            .map_err(RunError::Notify)?;
        Ok(Self {
            p,
            opts,
            source,
            leases,
            lakes,
            notifications,
            clock,
            metrics,
        })
    }

    /// Sessions one after another, until shutdown, drain or an error a new session cannot
    /// mend. A lost lease ends a session without its uncommitted work (the new owner reads
    /// it again) and starts the next.
    async fn run_sessions(
        &self,
        shutdown: &mut Pin<&mut impl Future<Output = ()>>,
    ) -> Result<(), RunError> {
        let ready = &self.metrics.ready;
        if let Some(m) = &self.leases {
            tokio::select! {
                _ = m.first_scan() => {}
                _ = shutdown.as_mut() => return Ok(()),
            }
        }
        // The sinks answered (an S3 lake checked its bucket) and the leases were scanned.
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut generation = self.leases.as_ref().map(|m| m.generation());
        loop {
            let plan = match &self.leases {
                None => self.local_plan().await?,
                Some(m) => {
                    let generation = generation.as_mut().expect("with leases");
                    match leased_plan(m, generation, shutdown, &self.metrics).await? {
                        Some(plan) => plan,
                        None => return Ok(()),
                    }
                }
            };
            let mut session = Session::open(self, plan, generation.as_ref()).await?;
            let outcome = session.run(generation.as_mut(), shutdown).await;
            match session.close(outcome).await {
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

    /// Without leases: every shard of the stream, checkpointed in the local store or one S3
    /// object.
    async fn local_plan(&self) -> Result<Plan, RunError> {
        let shards = self.source.list_shards().await?;
        let store: Box<dyn CheckpointStore> = match &self.p.checkpoints {
            Checkpoints::Local { path } => Box::new(LocalStore::open(path, &self.p.name)?),
            Checkpoints::S3 {
                bucket,
                prefix,
                region,
            } => Box::new(S3Store::open(bucket, prefix, region.as_deref(), &self.p.name).await?),
            Checkpoints::Dynamodb(_) => unreachable!("validated: leases need a Kinesis source"),
        };
        Ok(Plan { shards, store })
    }
}

/// With leases: the shards this worker holds, once it holds any (None: shut down while
/// waiting for one).
async fn leased_plan(
    m: &Arc<LeaseManager>,
    generation: &mut watch::Receiver<Generation>,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
    metrics: &Metrics,
) -> Result<Option<Plan>, RunError> {
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
            _ = shutdown.as_mut() => return Ok(None),
        }
    };
    let ids: Vec<String> = held.keys().cloned().collect();
    // Every parent: the session waits only for those it reads (the others were read to their
    // end already: their children's leases were not takeable before), and children start
    // from all their parents' detector state.
    let shards = held
        .into_iter()
        .map(|(id, h)| (Arc::from(id.as_str()), h.parents))
        .collect();
    Metrics::add(&metrics.lease_sessions, 1);
    Ok(Some(Plan {
        shards,
        store: m.store(ids),
    }))
}
