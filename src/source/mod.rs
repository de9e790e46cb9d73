//! Sources. A source lists shards and opens a reader per shard at a position; the pipeline
//! runs one task per shard ([`shard_task`]) that reads, decodes and sends chunks over a
//! bounded channel, so a slow sink slows reading instead of filling memory.

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
pub trait ShardReader: Send + 'static {
    /// The next records, or None when caught up with the shard's end for now.
    fn read(&mut self, max_records: usize, now_us: i64) -> Result<Option<RawChunk>, SourceError>;
}

/// What shard tasks tell the pipeline.
#[derive(Debug)]
pub enum ShardEvent {
    Chunk(Decoded),
    /// The shard has nothing more to read for now.
    CaughtUp(Arc<str>),
    Failed(Arc<str>, SourceError),
}

/// Settings for shard tasks.
#[derive(Debug, Clone)]
pub struct ShardTaskConfig {
    pub max_records: usize,
    pub poll_interval: Duration,
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
    let mut reader = Some(reader);
    let mut caught_up = false;
    while !*stop.borrow() {
        let mut r = reader.take().expect("reader is returned after each read");
        let (dec, clk) = (decoder.clone(), clock.clone());
        let max = cfg.max_records;
        // Reading a file and decoding are blocking work: keep them off the async workers.
        let joined = tokio::task::spawn_blocking(move || {
            let now = clk.now_us();
            let out = r.read(max, now).map(|c| c.map(|c| dec.decode(&c, now)));
            (r, out)
        })
        .await;
        let Ok((r, result)) = joined else { return };
        reader = Some(r);
        let event = match result {
            Ok(Some(decoded)) => {
                caught_up = false;
                ShardEvent::Chunk(decoded)
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
