//! A session reads a fixed set of shards until shutdown, drain, or a change of that set.
//! Opening it opens the engine, which recovers (pending commits, orphaned files); every
//! session starts from the committed checkpoints, so open windows are rebuilt by replay.
//!
//! [`Session::open`] starts one reader task per shard, [`Session::run`] feeds the engine
//! their chunks and commits on rollover, [`Session::close`] stops the readers and commits
//! what was read.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::{RunError, Worker};
use crate::checkpoint::dynamodb::Generation;
use crate::checkpoint::{CheckpointStore, StoreError};
use crate::decode::RecordDecoder;
use crate::engine::Engine;
use crate::source::objects::ObjectStream;
use crate::source::objects::queue::{Message, Pending, Polled};
use crate::source::{ShardEvent, ShardTasks, Stream, show};

/// Decoded chunks queued for the engine, at most.
const MAX_QUEUED_CHUNKS: usize = 8;

/// How often the engine looks at the clock without a chunk (idle shards, rollover by age).
const TICK: Duration = Duration::from_millis(250);

/// Which shards a session reads (each with all its parents), and where their
/// checkpoints are.
pub(super) struct Plan {
    pub shards: Vec<(Arc<str>, Vec<String>)>,
    pub store: Box<dyn CheckpointStore>,
}

/// Why a session ended.
pub(super) enum SessionEnd {
    /// Shut down, or drained: the run is over.
    Done,
    /// The shards to read changed (a lease taken, a new shard): start over from the
    /// checkpoints with the new set.
    Changed,
}

pub(super) struct Session<'w> {
    worker: &'w Worker,
    engine: Engine,
    /// Every shard listed, read or not.
    shards: Vec<(Arc<str>, Vec<String>)>,
    /// Shards read (objects read to their end in an earlier run are not).
    reading: usize,
    rx: mpsc::Receiver<ShardEvent>,
    tasks: ShardTasks,
    /// The lease generation when the session started (None without leases).
    start_gen: Option<Generation>,
    /// With S3 event notifications: the objects they name are added as the session runs.
    notified: Option<Notified>,
}

/// A session's S3 event notifications: what the queue hands over, and the messages whose
/// objects are not committed yet.
struct Notified {
    objects: ObjectStream,
    inbox: mpsc::Receiver<Polled>,
    pending: Pending,
    /// The last receive found the queue empty (`--drain` may end).
    empty: bool,
    reading: HashSet<Arc<str>>,
    /// Deletes under way (awaited when the session closes).
    deleting: Vec<tokio::task::JoinHandle<()>>,
}

/// Deletes the messages whose objects are committed to their end, in the background (a
/// slow queue never holds the data path; the session waits for the deletes when it closes).
fn acknowledge(notified: &mut Option<Notified>, engine: &Engine) {
    let Some(n) = notified.as_mut() else { return };
    n.deleting.retain(|d| !d.is_finished());
    let done = n.pending.done(|s| engine.committed_to_end(s));
    if let Some(queue) = n.objects.queue().filter(|_| !done.is_empty()) {
        let queue = queue.clone();
        n.deleting
            .push(tokio::spawn(async move { queue.delete(done).await }));
    }
}

/// The next thing the queue's poller hands over (never, without notifications).
async fn next_polled(n: &mut Option<Notified>) -> Polled {
    match n {
        Some(n) => match n.inbox.recv().await {
            Some(p) => p,
            // The poller stopped after it sent a failure.
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// How long a receive waits for a message: less with `--drain`, which ends at an empty queue.
fn long_poll(drain: bool) -> Duration {
    Duration::from_secs(if drain { 1 } else { 20 })
}

impl<'w> Session<'w> {
    /// Opens the engine on the plan's store (recovering) and starts a reader per shard.
    pub async fn open(
        worker: &'w Worker,
        plan: Plan,
        generation: Option<&watch::Receiver<Generation>>,
    ) -> Result<Self, RunError> {
        let Plan { shards, store } = plan;
        let mut engine = Engine::open(
            worker.p.clone(),
            worker.lakes.clone(),
            store,
            worker.clock.clone(),
            &worker.opts.worker,
            worker.metrics.clone(),
        )
        .await?;
        if let Some(n) = &worker.notifications {
            engine.set_notifications(n.clone());
        }
        if let Some(live) = &worker.opts.live {
            engine.set_live(live.clone());
        }
        // Decoded chunks waiting for the engine: enough to overlap reading and decoding with
        // processing. Not more per shard: with many shards, each reader also holds the chunk
        // it is decoding or waiting to send, so what is in memory is about (8 + shards)
        // chunks of at most `max_records`, whatever the backlog.
        let mut notified = match &worker.source {
            Stream::Objects(o) => o
                .receive(long_poll(worker.opts.drain))
                .map(|inbox| Notified {
                    objects: (**o).clone(),
                    inbox,
                    pending: Pending::default(),
                    empty: false,
                    reading: HashSet::new(),
                    deleting: Vec::new(),
                }),
            _ => None,
        };
        let capacity = match notified {
            Some(_) => MAX_QUEUED_CHUNKS,
            None => (2 * shards.len()).clamp(2, MAX_QUEUED_CHUNKS),
        };
        let (tx, rx) = mpsc::channel(capacity);
        let mut tasks = ShardTasks::new(RecordDecoder::new(&worker.p), worker.clock.clone(), tx);
        tasks.feed_live(engine.live_feed());
        let mut reading = 0;
        // Notified objects read in part (or with records open windows need) before a restart:
        // their messages come back too, but the windows need them now.
        let unfinished = match &mut notified {
            Some(n) => {
                let ids = engine.unfinished();
                n.reading.extend(ids.iter().cloned());
                ids.into_iter().map(|id| (id, Vec::new())).collect()
            }
            None => Vec::new(),
        };
        let listed: HashSet<&str> = shards.iter().map(|(s, _)| &**s).collect();
        for (shard, parents) in shards.iter().chain(&unfinished) {
            if worker.source.skips_finished() && engine.finished(shard) {
                continue;
            }
            reading += 1;
            let from = engine.add_shard(shard.clone(), parents);
            if engine.wants_hash_ranges()
                && let Some(range) = worker.source.hash_range(shard).await?
            {
                engine.set_hash_range(shard.clone(), range);
            }
            tracing::info!(shard_id = %shard, from = %show(&from), "reading shard");
            let opened = worker.source.open_shard(shard.clone(), &from);
            tasks.spawn(
                shard.clone(),
                opened.reader,
                opened.max_records,
                opened.poll_interval,
                // Parents outside the session (a lease store's) were read to their end.
                (parents.iter())
                    .filter(|p| listed.contains(p.as_str()))
                    .cloned()
                    .collect(),
                engine.committed_records(shard),
            );
        }
        if notified.is_none() {
            tasks.spawned();
        }
        Ok(Self {
            worker,
            engine,
            shards,
            reading,
            rx,
            tasks,
            start_gen: generation.map(|g| *g.borrow()),
            notified,
        })
    }

    /// A message of the queue: its objects are read (unless committed already), and it is
    /// deleted once they are committed.
    fn notification(&mut self, m: Message) {
        let Some(n) = &mut self.notified else { return };
        n.empty = false;
        let Some(queue) = n.objects.queue() else {
            return;
        };
        let max_receives = queue.max_receives();
        let mut shards = Vec::new();
        for meta in m.objects {
            let id = n.objects.admit(meta);
            if !self.engine.committed_to_end(&id) && n.reading.insert(id.clone()) {
                if m.receives > max_receives {
                    tracing::warn!(shard_id = %id, receives = m.receives, "a notification came back too often: the object goes to dead-letter");
                    n.objects.give_up(
                        &id,
                        format!(
                            "its notification was received {} times without the object read to its end (max_receives {max_receives})",
                            m.receives
                        ),
                    );
                }
                let from = self.engine.add_shard(id.clone(), &[]);
                tracing::info!(shard_id = %id, from = %show(&from), "reading object");
                let opened = self.worker.source.open_shard(id.clone(), &from);
                self.tasks.spawn(
                    id.clone(),
                    opened.reader,
                    opened.max_records,
                    opened.poll_interval,
                    Vec::new(),
                    self.engine.committed_records(&id),
                );
                self.reading += 1;
            }
            shards.push(id);
        }
        n.pending.add(m.receipt, shards);
        acknowledge(&mut self.notified, &self.engine);
    }

    /// Feeds the engine until the session ends; commits on rollover.
    pub async fn run(
        &mut self,
        mut generation: Option<&mut watch::Receiver<Generation>>,
        shutdown: &mut Pin<&mut impl Future<Output = ()>>,
    ) -> Result<SessionEnd, RunError> {
        let lease_change = async |g: &mut Option<&mut watch::Receiver<Generation>>| match g {
            Some(g) => {
                let _ = g.changed().await;
            }
            None => std::future::pending().await,
        };
        let every = self.worker.source.relist_interval();
        let relisting = generation.is_none() && every.is_some();
        let every = every.unwrap_or(Duration::from_secs(3600));
        let mut relist = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        // No shard to read (every object was read before): nothing will arrive, but new
        // objects may be listed.
        let mut open = self.reading > 0 || !relisting;
        let mut caught_up: HashSet<Arc<str>> = HashSet::new();
        let mut tick = tokio::time::interval(TICK);
        // Messages being worked on stay invisible: extended at half their timeout.
        let visibility = (self.notified.as_ref())
            .and_then(|n| n.objects.queue())
            .map(|q| q.visibility_timeout() / 2);
        let half = visibility.unwrap_or(Duration::from_secs(3600));
        let mut extend = tokio::time::interval_at(tokio::time::Instant::now() + half, half);
        loop {
            tokio::select! {
                polled = next_polled(&mut self.notified) => match polled {
                    Polled::Message(m) => self.notification(m),
                    Polled::Empty => if let Some(n) = &mut self.notified { n.empty = true },
                    Polled::Failed(e) => return Err(e.into()),
                },
                _ = extend.tick(), if visibility.is_some() => {
                    if let Some(n) = &self.notified
                        && let Some(q) = n.objects.queue()
                        && !n.pending.is_empty()
                    {
                        let (q, receipts) = (q.clone(), n.pending.receipts());
                        tokio::spawn(async move { q.extend(receipts).await });
                    }
                }
                event = self.rx.recv(), if open => match event {
                    Some(event) => {
                        let t = std::time::Instant::now();
                        self.handle(event, &mut caught_up).await?;
                        busy("a shard's event", t);
                    }
                    None if relisting && self.reading == 0 => open = false,
                    None => return Ok(SessionEnd::Done),
                },
                _ = tick.tick() => {
                    let t = std::time::Instant::now();
                    self.engine.tick().await?;
                    busy("the tick", t);
                }
                _ = lease_change(&mut generation) => {
                    let now = generation.as_mut().map(|g| *g.borrow_and_update());
                    if now.map(|g| g.lost) != self.start_gen.map(|g| g.lost) {
                        return Err(StoreError::LeaseLost(Vec::new()).into());
                    }
                    tracing::info!("took a lease: committing, then reading the new set of shards");
                    return Ok(SessionEnd::Changed);
                }
                _ = relist.tick(), if relisting => {
                    if self.shards_changed().await? {
                        return Ok(SessionEnd::Changed);
                    }
                }
                _ = shutdown.as_mut() => {
                    tracing::info!("shutting down: committing what was read");
                    return Ok(SessionEnd::Done);
                }
            }
            let queue_empty = self.notified.as_ref().is_none_or(|n| n.empty);
            if self.worker.opts.drain && caught_up.len() == self.reading && queue_empty {
                tracing::info!("every shard is caught up: emitting open windows");
                self.engine.finish().await?;
                return Ok(SessionEnd::Done);
            }
            if self.engine.should_commit() {
                let t = std::time::Instant::now();
                self.engine.commit().await?;
                busy("a commit", t);
                acknowledge(&mut self.notified, &self.engine);
            }
        }
    }

    /// One event of a shard task.
    async fn handle(
        &mut self,
        event: ShardEvent,
        caught_up: &mut HashSet<Arc<str>>,
    ) -> Result<(), RunError> {
        match event {
            ShardEvent::Chunk(d) => {
                caught_up.remove(&d.shard);
                self.engine.ingest(d).await?;
            }
            ShardEvent::Waiting(shard) => self.engine.shard_caught_up(&shard),
            ShardEvent::CaughtUp(shard) => {
                self.engine.shard_caught_up(&shard);
                caught_up.insert(shard);
            }
            ShardEvent::Ended(shard) => {
                self.engine.shard_caught_up(&shard);
                self.engine.shard_ended(&shard);
                caught_up.insert(shard);
            }
            ShardEvent::Failed(_, e) => return Err(e.into()),
        }
        Ok(())
    }

    /// The stream's shards are no longer the session's (a split or merge without leases).
    async fn shards_changed(&self) -> Result<bool, RunError> {
        let now = self.worker.source.list_shards().await?;
        let ids = |v: &[(Arc<str>, Vec<String>)]| {
            v.iter().map(|(s, _)| s.clone()).collect::<HashSet<_>>()
        };
        let changed = ids(&now) != ids(&self.shards);
        if changed {
            tracing::info!(
                shards = now.len(),
                "the stream's shards changed: committing, then reading the new set"
            );
        }
        Ok(changed)
    }

    /// Stops the readers, then commits what was read unless the session failed (a lost
    /// lease's uncommitted work is the new owner's to read again).
    /// Then deletes the messages whose objects that commit finished.
    pub async fn close(self, result: Result<SessionEnd, RunError>) -> Result<SessionEnd, RunError> {
        let Self {
            mut engine,
            rx,
            tasks,
            mut notified,
            ..
        } = self;
        drop(rx);
        tasks.stop().await;
        if result.is_ok() {
            engine.commit().await?;
            acknowledge(&mut notified, &engine);
            for deleting in notified.into_iter().flat_map(|n| n.deleting) {
                let _ = deleting.await;
            }
        }
        result
    }
}

/// Says (at debug) when one step held the engine's task for long: while it runs, the shard
/// tasks' queue fills and they stop reading.
fn busy(step: &str, since: std::time::Instant) {
    let took = since.elapsed();
    if took >= Duration::from_millis(200) {
        tracing::debug!(
            step,
            ms = took.as_millis() as u64,
            "the engine's task was busy"
        );
    }
}
