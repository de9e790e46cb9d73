//! The one place a shard task is spawned: a task per shard reads, decodes and sends chunks
//! over a bounded channel (so a slow sink slows reading instead of filling memory), after
//! waiting for the shard's parents to be read to their end.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::{ShardEvent, ShardReader};
use crate::clock::Clock;
use crate::decode::RecordDecoder;
use crate::live::{Columns, Live};
use crate::record::SeqNo;

/// The worker's live state (for the console) and the columns it reads: shard tasks offer it
/// every fresh record as soon as it is decoded (see [`crate::live`]).
#[derive(Debug, Clone)]
pub struct LiveFeed {
    pub live: Arc<Live>,
    pub cols: Columns,
}

/// Children after parents: a shard created by a split or merge is read only once every
/// parent was read to its end and all of the parent's records were handed to the pipeline,
/// so each device's records keep their order across resharding. (One worker: the gate is
/// in memory; a parent read to its end in an earlier run ends again at once when re-read
/// from its checkpoint.)
#[derive(Debug, Default)]
struct ShardGate {
    done: std::sync::Mutex<std::collections::HashSet<String>>,
    changed: tokio::sync::Notify,
}

impl ShardGate {
    pub fn finish(&self, shard: &str) {
        self.done
            .lock()
            .expect("not poisoned")
            .insert(shard.to_string());
        self.changed.notify_waiters();
    }

    fn all_done(&self, shards: &[String]) -> bool {
        let done = self.done.lock().expect("not poisoned");
        shards.iter().all(|s| done.contains(s))
    }

    /// Waits until every one of `parents` finished.
    pub async fn wait(&self, parents: &[String]) {
        loop {
            let changed = self.changed.notified();
            if self.all_done(parents) {
                return;
            }
            changed.await;
        }
    }
}

/// What a shard task waits for before reading.
#[derive(Debug, Clone, Default)]
struct Parents {
    gate: Arc<ShardGate>,
    /// Parents still in the stream (ones past retention are not waited for).
    shards: Vec<String>,
}

/// Settings for shard tasks.
#[derive(Debug, Clone)]
struct ShardTaskConfig {
    max_records: usize,
    poll_interval: Duration,
    /// Shards that must be read to their end first.
    parents: Parents,
    /// The live state, and the shard's last committed record (records up to it are read
    /// again for open windows, and were offered before): shared by the task's chunks, not
    /// copied for each.
    live: Option<Arc<(LiveFeed, Option<SeqNo>)>>,
}

/// Reads and decodes one shard until `stop` turns true or the pipeline hangs up.
async fn shard_task(
    shard: Arc<str>,
    reader: Box<dyn ShardReader>,
    decoder: RecordDecoder,
    clock: Arc<dyn Clock>,
    cfg: ShardTaskConfig,
    tx: mpsc::Sender<ShardEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let parents = cfg.parents.clone();
    let mut reader = reader;
    let mut caught_up = false;
    if !parents.shards.is_empty() && !parents.gate.all_done(&parents.shards) {
        tracing::info!(shard_id = %shard, parents = ?parents.shards, "waiting for the parent shards to be read to their end");
        // Nothing to read for now: the shard must not hold the watermark while it waits.
        if tx.send(ShardEvent::Waiting(shard.clone())).await.is_err() {
            return;
        }
        tokio::select! {
            _ = parents.gate.wait(&parents.shards) => {}
            _ = stop.changed() => return,
        }
    }
    let mut finished = false;
    while !*stop.borrow() {
        let read = tokio::select! {
            r = reader.read(cfg.max_records, clock.now_us()) => r,
            _ = stop.changed() => return,
        };
        // Decoding is CPU work: keep it off the async workers.
        let result = match read {
            Ok(Some(chunk)) => {
                let dec = decoder.clone();
                let now = clock.now_us();
                let live = cfg.live.clone();
                let decode = move || {
                    let d = dec.decode(&chunk, now);
                    if let Some(live) = live {
                        let (feed, committed) = &*live;
                        let cut = d.replayed(committed.as_ref());
                        let n = d.batch.num_rows();
                        feed.live.observe(&d.batch.slice(cut, n - cut), &feed.cols);
                    }
                    d
                };
                match tokio::task::spawn_blocking(decode).await {
                    Ok(d) => Ok(Some(d)),
                    Err(_) => return,
                }
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        let event = match result {
            Ok(Some(decoded)) => {
                caught_up = false;
                ShardEvent::Chunk(decoded)
            }
            Ok(None) if reader.ended() && !finished => {
                // Every record of the shard was sent before this: children may start.
                finished = true;
                parents.gate.finish(&shard);
                caught_up = true;
                ShardEvent::Ended(shard.clone())
            }
            Ok(None) if !caught_up => {
                caught_up = true;
                ShardEvent::CaughtUp(shard.clone())
            }
            Ok(None) => {
                tokio::select! {
                    _ = tokio::time::sleep(cfg.poll_interval) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            Err(e) => {
                let _ = tx.send(ShardEvent::Failed(shard.clone(), e)).await;
                return;
            }
        };
        tokio::select! {
            sent = tx.send(event) => if sent.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

/// The shard tasks of one session: they share the decoder, the clock, the channel to the
/// engine, the stop signal and the parents gate.
pub struct ShardTasks {
    tasks: JoinSet<()>,
    decoder: RecordDecoder,
    clock: Arc<dyn Clock>,
    tx: Option<mpsc::Sender<ShardEvent>>,
    stop_tx: watch::Sender<bool>,
    gate: Arc<ShardGate>,
    live: Option<LiveFeed>,
}

impl ShardTasks {
    /// Tasks that send to `tx`.
    pub fn new(
        decoder: RecordDecoder,
        clock: Arc<dyn Clock>,
        tx: mpsc::Sender<ShardEvent>,
    ) -> Self {
        Self {
            tasks: JoinSet::new(),
            decoder,
            clock,
            tx: Some(tx),
            stop_tx: watch::Sender::new(false),
            gate: Arc::new(ShardGate::default()),
            live: None,
        }
    }

    /// Every task offers the records it decodes to this live state.
    pub fn feed_live(&mut self, live: Option<LiveFeed>) {
        self.live = live;
    }

    /// Starts reading `shard` with `reader`, once every one of `parents` (shards of this
    /// session) was read to its end. `committed`: its last committed record (records up to it
    /// are not offered to the live state again).
    pub fn spawn(
        &mut self,
        shard: Arc<str>,
        reader: Box<dyn ShardReader>,
        max_records: usize,
        poll_interval: Duration,
        parents: Vec<String>,
        committed: Option<SeqNo>,
    ) {
        let cfg = ShardTaskConfig {
            max_records,
            poll_interval,
            parents: Parents {
                gate: self.gate.clone(),
                shards: parents,
            },
            live: self.live.clone().map(|feed| Arc::new((feed, committed))),
        };
        let tx = self.tx.clone().expect("spawned before close");
        self.tasks.spawn(shard_task(
            shard,
            reader,
            self.decoder.clone(),
            self.clock.clone(),
            cfg,
            tx,
            self.stop_tx.subscribe(),
        ));
    }

    /// Every task is spawned: the channel closes once the last one ends.
    pub fn spawned(&mut self) {
        self.tx = None;
    }

    /// Tells every task to stop and waits for them.
    pub async fn stop(mut self) {
        let _ = self.stop_tx.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}
