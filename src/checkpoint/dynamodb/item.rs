//! A lease item as DynamoDB stores it: the KCL's attributes and ours, parsed and written.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{ShardCheckpoint, StoreError};
use crate::sink::StagedFile;

pub(super) type Item = HashMap<String, AttributeValue>;

/// A shard's checkpoint as its item keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ShardState {
    /// The commit that wrote it (commit ids name files; each worker's never repeat).
    pub(super) commit_id: u64,
    pub(super) checkpoint: ShardCheckpoint,
    pub(super) watermark: Option<i64>,
}

/// A shard's share of a prepared commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct PendingShare {
    pub(super) files: Vec<StagedFile>,
    pub(super) next: ShardState,
}

/// One item, read.
#[derive(Debug, Clone)]
pub(super) struct Lease {
    pub(super) key: String,
    pub(super) owner: Option<String>,
    pub(super) counter: u64,
    pub(super) parents: Vec<String>,
    /// The KCL `checkpoint` attribute.
    pub(super) checkpoint: String,
    pub(super) state: Option<ShardState>,
    pub(super) pending: Option<(String, PendingShare)>,
}

pub(super) const SHARD_END: &str = "SHARD_END";

impl Lease {
    pub(super) fn parse(item: &Item, table: &str) -> Result<Self, StoreError> {
        let s = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
        let corrupt = |what: &str| StoreError::Table {
            table: table.into(),
            message: format!("item {:?} has a bad {what}", s("leaseKey")),
        };
        let json = |k: &str| -> Result<Option<serde_json::Value>, StoreError> {
            s(k).map(|t| serde_json::from_str(&t).map_err(|_| corrupt(k)))
                .transpose()
        };
        let state = json("shardlakeState")?
            .map(serde_json::from_value)
            .transpose()
            .map_err(|_| corrupt("shardlakeState"))?;
        let pending = match (s("pendingIntentId"), json("pendingIntent")?) {
            (Some(id), Some(v)) => Some((
                id,
                serde_json::from_value(v).map_err(|_| corrupt("pendingIntent"))?,
            )),
            _ => None,
        };
        Ok(Self {
            key: s("leaseKey").ok_or_else(|| corrupt("leaseKey"))?,
            owner: s("leaseOwner").filter(|o| !o.is_empty()),
            counter: item
                .get("leaseCounter")
                .and_then(|v| v.as_n().ok())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            parents: item
                .get("parentShardIds")
                .and_then(|v| v.as_ss().ok())
                .cloned()
                .unwrap_or_default(),
            checkpoint: s("checkpoint").unwrap_or_default(),
            state,
            pending,
        })
    }

    /// Its checkpoint once a pending commit is completed.
    pub(super) fn effective(&self) -> Option<&ShardState> {
        self.pending
            .as_ref()
            .map(|(_, p)| &p.next)
            .or(self.state.as_ref())
    }

    pub(super) fn finished(&self, aggregations: &[String]) -> bool {
        self.effective().is_some_and(|s| {
            s.checkpoint
                .finished(aggregations.iter().map(String::as_str))
        })
    }
}

pub(super) fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// The KCL `checkpoint` and `checkpointSubSequenceNumber` attributes for a shard's state.
pub(super) fn kcl_checkpoint(cp: &ShardCheckpoint, start: &str) -> (String, u64) {
    if cp.ended {
        return (SHARD_END.into(), 0);
    }
    cp.records.as_ref().map_or_else(
        || (start.to_string(), 0),
        |s| (s.record().to_string(), s.sub().unwrap_or(0)),
    )
}
