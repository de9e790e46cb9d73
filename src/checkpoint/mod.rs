//! Checkpoints and the commit protocol's record of pending work.
//!
//! A commit is two writes to the store: `prepare` records the intent (the staged files and the
//! state after the commit) beside the last committed state; `commit` replaces the committed
//! state with the intent's and clears it. Whoever opens the store next and finds an intent
//! publishes its files and commits it: the same steps as the normal path.
//!
//! Two stores: [`local`] (one file, one worker: the embedded default) and
//! [`dynamodb`]'s lease table (one item per shard, many workers), where each
//! shard's item holds its own checkpoint and its share of a pending intent.

pub mod commit;
pub mod dynamodb;
pub mod local;
pub mod s3;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::record::Position;
use crate::sink::StagedFile;

/// Per shard.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCheckpoint {
    /// Raw records, dead letters, late records and record alerts are committed through here.
    pub records: Position,
    /// Per aggregation: reading again from here rebuilds its open windows.
    #[serde(default)]
    pub aggregations: BTreeMap<String, Position>,
    /// The newest event time read from the shard (microseconds).
    pub max_event_time: Option<i64>,
    /// Per aggregation: every window ending at or before this was emitted with this shard's
    /// records in it. A shard that moves between workers brings this along, so that a
    /// worker whose own windows are behind still treats the shard's records of those windows
    /// as emitted.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub emitted_through: BTreeMap<String, i64>,
    /// The shard is closed and every record of it is committed (Kinesis `SHARD_END`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ended: bool,
    /// The detectors' state after `records`: the key of its snapshot in the lake
    /// (`_state/…`, see [`crate::engine::detect`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detectors: Option<String>,
}

impl ShardCheckpoint {
    /// Where reading resumes: the earliest position any of `aggregations` (the pipeline's
    /// current ones; a removed aggregation's checkpoint must not hold reading back) or the
    /// record outputs still need. An aggregation added since the commit starts at `records`.
    pub fn resume_from<'a>(&self, aggregations: impl IntoIterator<Item = &'a str>) -> Position {
        let mut from = self.records.clone();
        for name in aggregations {
            if let Some(pos) = self.aggregations.get(name) {
                from = from.min(pos.clone());
            }
        }
        from
    }

    /// Closed, and nothing of it is still needed for an open window: it will never be read
    /// again.
    pub fn finished<'a>(&self, aggregations: impl IntoIterator<Item = &'a str>) -> bool {
        self.ended && self.resume_from(aggregations) == self.records
    }
}

/// What a commit leaves behind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// Commits so far; names the data files of the next one.
    pub commit_id: u64,
    pub shards: BTreeMap<String, ShardCheckpoint>,
    /// Per aggregation: every window ending at or before this (microseconds) was emitted.
    pub emitted_through: BTreeMap<String, i64>,
    /// The watermark at the commit; it does not move back after a restart.
    pub watermark: Option<i64>,
}

/// A prepared commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// Unique among every worker's intents (`<worker>-<commit id>`): completing an intent
    /// is conditional on it.
    #[serde(default)]
    pub id: String,
    pub files: Vec<StagedFile>,
    pub next: Committed,
}

/// What a store holds, as `load` returns it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreState {
    /// The state once every pending intent is committed.
    pub committed: Committed,
    /// Prepared commits not known to be finished: their files must be published and the
    /// intents committed before anything else is written.
    pub pending: Vec<Intent>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds this checkpoint store.
    #[error("{0} is in use by another shardlake process (one worker per local state directory)")]
    Locked(String),
    /// An S3 checkpoint object was written by another worker since this one read it.
    #[error(
        "{0}: another worker wrote these checkpoints since this one read them: the newest worker on an S3 checkpoint object takes it over; run one worker per pipeline, or give each its own prefix"
    )]
    Conflict(String),
    /// The store could not be read or written.
    #[error("checkpoint store {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The stored state does not parse.
    #[error(
        "checkpoint store {path} is corrupt: {source}; move it aside to start over (outputs will be written again)"
    )]
    Corrupt {
        path: String,
        source: serde_json::Error,
    },
    /// Another worker took one of the shards since this worker's session began: the
    /// session's uncommitted work must be dropped (the new owner reads it again).
    #[error("lost the lease of shard(s) {}", .0.join(", "))]
    LeaseLost(Vec<String>),
    /// The lease table could not be read or written.
    #[error("lease table {table}: {message}")]
    Table { table: String, message: String },
}

/// Where checkpoints and pending intents live.
#[async_trait::async_trait]
pub trait CheckpointStore: Send + Sync + std::fmt::Debug {
    async fn load(&self) -> Result<StoreState, StoreError>;
    /// Records `intent` as pending beside `committed`. This is the decisive write: once it
    /// succeeded, the commit happens (here or in a recovery).
    async fn prepare(&self, committed: &Committed, intent: &Intent) -> Result<(), StoreError>;
    /// Makes `intent.next` the committed state and clears the intent.
    async fn commit(&self, intent: &Intent) -> Result<(), StoreError>;
    /// The committed checkpoint of a shard this store does not hold: a lease store reads a
    /// parent shard's item (read to its end, so it no longer changes). Other stores hold
    /// every shard.
    async fn outside(&self, _shard: &str) -> Result<Option<ShardCheckpoint>, StoreError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SeqNo;

    #[test]
    fn resume_from_is_the_earliest_position_needed() {
        let mut c = ShardCheckpoint {
            records: Some(SeqNo::from_u64(500)),
            ..Default::default()
        };
        assert_eq!(c.resume_from(["a"]), Some(SeqNo::from_u64(500)));
        c.aggregations.insert("a".into(), Some(SeqNo::from_u64(90)));
        c.aggregations
            .insert("b".into(), Some(SeqNo::from_u64(120)));
        assert_eq!(c.resume_from(["a", "b"]), Some(SeqNo::from_u64(90)));
        assert_eq!(
            c.resume_from(["b"]),
            Some(SeqNo::from_u64(120)),
            "a was removed"
        );
        c.aggregations.insert("c".into(), None);
        assert_eq!(c.resume_from(["a", "b", "c"]), None);
    }

    #[test]
    fn a_shard_is_finished_when_closed_and_no_window_needs_it() {
        let mut c = ShardCheckpoint {
            records: Some(SeqNo::from_u64(500)),
            ..Default::default()
        };
        c.aggregations
            .insert("a".into(), Some(SeqNo::from_u64(400)));
        assert!(!c.finished(["a"]), "not closed");
        c.ended = true;
        assert!(
            !c.finished(["a"]),
            "an open window still needs records from 400"
        );
        assert!(c.finished(["b"]), "a removed aggregation does not count");
        c.aggregations
            .insert("a".into(), Some(SeqNo::from_u64(500)));
        assert!(c.finished(["a"]));
    }
}
