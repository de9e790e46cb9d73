//! Sources. A [`Stream`] lists its shards and opens a [`ShardReader`] per shard at a
//! position; the pipeline runs one task per shard ([`task`]) that reads, decodes and sends
//! chunks over a bounded channel, so a slow sink slows reading instead of filling memory.

pub mod kinesis;
pub mod local;
pub mod objects;
pub mod task;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Pipeline, Source};
use crate::decode::Decoded;
use crate::metrics::Metrics;
use crate::record::{Position, RawChunk};
use kinesis::KinesisStream;
use local::LocalShardReader;
use objects::ObjectStream;

pub use task::{LiveFeed, ShardTasks};

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

/// A pipeline's source, opened.
#[derive(Debug, Clone)]
pub enum Stream {
    /// A directory of per-shard files, polled at the interval.
    Local(std::path::PathBuf, Duration),
    Kinesis(KinesisStream),
    /// Objects in S3 or files in a directory: each object a shard.
    Objects(Box<ObjectStream>),
}

/// A shard's reader, and how its task calls it.
pub struct OpenedShard {
    pub reader: Box<dyn ShardReader>,
    /// Records per read, at most.
    pub max_records: usize,
    /// How long the task waits after a read that found nothing (a Kinesis reader paces
    /// itself: poll interval, read limits).
    pub poll_interval: Duration,
}

impl Stream {
    pub async fn open(
        p: &Pipeline,
        metrics: &std::sync::Arc<Metrics>,
    ) -> Result<Self, SourceError> {
        Ok(match &p.source {
            Source::Local {
                path,
                poll_interval,
            } => Self::Local(path.clone(), *poll_interval),
            Source::Kinesis(k) => Self::Kinesis(KinesisStream::connect(k, metrics.clone()).await),
            Source::Objects(o) => {
                Self::Objects(Box::new(ObjectStream::open(o, p, metrics.clone()).await?))
            }
        })
    }

    /// Shards whose checkpoints say they ended are not read again (objects: one read each).
    /// A Kinesis shard is, and ends again at once: its children wait for that.
    pub fn skips_finished(&self) -> bool {
        matches!(self, Self::Objects(_))
    }

    /// How often a session without leases lists the shards again (None: never).
    pub fn relist_interval(&self) -> Option<Duration> {
        match self {
            Self::Local(..) => None,
            Self::Kinesis(_) => Some(KINESIS_RELIST_INTERVAL),
            Self::Objects(o) if o.queue().is_some() => None,
            Self::Objects(o) => Some(o.poll_interval()),
        }
    }

    /// A shard's hash-key range (inclusive; None where a source has none: objects).
    pub async fn hash_range(&self, shard: &str) -> Result<Option<(u128, u128)>, SourceError> {
        Ok(match self {
            Self::Local(path, _) => {
                let shards = local::list_shards(path)?;
                (shards.iter().position(|s| &**s == shard))
                    .map(|i| crate::localstream::hash_range(i, shards.len()))
            }
            Self::Kinesis(stream) => stream.hash_range(shard).await?,
            Self::Objects(_) => None,
        })
    }

    /// Every shard, each with its parents still in the stream.
    pub async fn list_shards(&self) -> Result<Vec<(Arc<str>, Vec<String>)>, SourceError> {
        Ok(match self {
            Self::Local(path, _) => local::list_shards(path)?
                .into_iter()
                .map(|id| (id, Vec::new()))
                .collect(),
            Self::Kinesis(stream) => {
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
            Self::Objects(objects) => objects
                .list_shards()
                .await?
                .into_iter()
                .map(|id| (id, Vec::new()))
                .collect(),
        })
    }

    /// A reader of `shard` after `from`.
    pub fn open_shard(&self, shard: Arc<str>, from: &Position) -> OpenedShard {
        match self {
            Self::Local(dir, poll_interval) => OpenedShard {
                reader: Box::new(LocalShardReader::open(dir, shard, from)),
                max_records: LOCAL_MAX_RECORDS,
                poll_interval: *poll_interval,
            },
            Self::Kinesis(stream) => OpenedShard {
                reader: stream.reader(shard, from),
                max_records: stream.max_records(),
                poll_interval: Duration::ZERO,
            },
            Self::Objects(objects) => OpenedShard {
                reader: objects.reader(shard, from),
                max_records: LOCAL_MAX_RECORDS,
                poll_interval: objects.poll_interval(),
            },
        }
    }
}

/// How often a Kinesis source without leases lists its shards again (new shards after a
/// split or merge start a new session).
const KINESIS_RELIST_INTERVAL: Duration = Duration::from_secs(60);

/// Records per read of a local shard file.
const LOCAL_MAX_RECORDS: usize = 10_000;

/// A position for the log.
pub fn show(p: &Position) -> String {
    p.as_ref()
        .map_or_else(|| "start".to_string(), |s| s.to_string())
}
