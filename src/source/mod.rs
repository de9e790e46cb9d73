//! Sources. A source lists shards and opens a reader per shard at a position; the pipeline
//! runs one task per shard ([`shard_task`]) that reads, decodes and sends chunks over a
//! bounded channel, so a slow sink slows reading instead of filling memory.

pub mod kinesis;
pub mod kpl;
pub mod local;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::clock::Clock;
use crate::decode::{Decoded, RecordDecoder};
use crate::record::{Position, RawChunk};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The stream does not exist or is not readable.
    #[error("stream {path}: {message}")]
    Stream { path: String, message: String },
    /// Reading a shard failed.
    #[error("shard {shard}: {source}")]
    Io {
        shard: String,
        source: std::io::Error,
    },
}

/// Reads one shard from a position, in order.
#[async_trait::async_trait]
pub trait ShardReader: Send + 'static {
    /// The next records, or None when caught up with the shard's end for now.
    async fn read(
        &mut self,
        max_records: usize,
        now_us: i64,
    ) -> Result<Option<RawChunk>, SourceError>;

    /// The shard is closed and was read to its end: it will never have more records.
    fn ended(&self) -> bool {
        false
    }
}

/// Children after parents: a shard created by a split or merge is read only once every
/// parent was read to its end and all of the parent's records were handed to the pipeline,
/// so each device's records keep their order across resharding. (One worker: the gate is
/// in memory; a parent read to its end in an earlier run ends again at once when re-read
/// from its checkpoint.)
#[derive(Debug, Default)]
pub struct ShardGate {
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
pub struct Parents {
    pub gate: Arc<ShardGate>,
    /// Parents still in the stream (ones past retention are not waited for).
    pub shards: Vec<String>,
}

/// What shard tasks tell the pipeline.
#[derive(Debug)]
pub enum ShardEvent {
    Chunk(Decoded),
    /// The shard has nothing more to read for now.
    CaughtUp(Arc<str>),
    /// The shard waits for its parents to be read to their end (it is not caught up: it
    /// will have records, but it must not hold the watermark either).
    Waiting(Arc<str>),
    /// The shard is closed and every record of it was sent before this (it is caught up,
    /// for good).
    Ended(Arc<str>),
    Failed(Arc<str>, SourceError),
}

/// Settings for shard tasks.
#[derive(Debug, Clone)]
pub struct ShardTaskConfig {
    pub max_records: usize,
    pub poll_interval: Duration,
    /// Shards that must be read to their end first.
    pub parents: Parents,
}

/// Reads and decodes one shard until `stop` turns true or the pipeline hangs up.
pub async fn shard_task<R: ShardReader>(
    shard: Arc<str>,
    reader: R,
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
                match tokio::task::spawn_blocking(move || dec.decode(&chunk, now)).await {
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

/// A position for the log.
pub fn show(p: &Position) -> String {
    p.as_ref()
        .map_or_else(|| "start".to_string(), |s| s.to_string())
}
