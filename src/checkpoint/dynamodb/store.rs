//! A session's checkpoint store on the lease table: loads the checkpoints and pending intents
//! of the shards it reads, prepares a commit as one fenced `TransactWriteItems`, and completes
//! it item by item.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::{
    TransactWriteItemsError, TransactWriteItemsOutput,
};
use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem, Update};
use futures::StreamExt;

use super::item::{PendingShare, ShardState, kcl_checkpoint, n};
use super::manager::LeaseManager;
use crate::checkpoint::{
    CheckpointStore, Committed, Intent, ShardCheckpoint, StoreError, StoreState,
};
use crate::retry::{self, Backoff, Fault, Retry};

impl LeaseManager {
    /// The checkpoint store of a session reading `shards` (leases this worker holds).
    pub fn store(self: &Arc<Self>, shards: Vec<String>) -> Box<dyn CheckpointStore> {
        Box::new(LeaseStore {
            m: self.clone(),
            shards,
            prepared: Default::default(),
        })
    }
}

/// A session's checkpoint store: the items of the shards it reads.
#[derive(Debug)]
pub(super) struct LeaseStore {
    pub(super) m: Arc<LeaseManager>,
    pub(super) shards: Vec<String>,
    /// The last intent this session prepared, and the items it wrote.
    pub(super) prepared: std::sync::Mutex<Option<(String, Vec<String>)>>,
}

impl LeaseStore {
    /// The write that puts a shard's share of `intent` on its item, fenced on this worker
    /// holding the lease at `counter` (and moving the counter on).
    fn pending_write(
        &self,
        key: &str,
        counter: u64,
        intent: &Intent,
        next: &ShardCheckpoint,
    ) -> TransactWriteItem {
        let share = PendingShare {
            files: intent.files.clone(),
            next: ShardState {
                commit_id: intent.next.commit_id,
                checkpoint: next.clone(),
                watermark: intent.next.watermark,
            },
        };
        let update = Update::builder()
            .table_name(&self.m.cfg.table)
            .key("leaseKey", AttributeValue::S(key.to_string()))
            .update_expression(
                "SET pendingIntentId = :id, pendingIntent = :intent, leaseCounter = :next",
            )
            .condition_expression("leaseOwner = :me AND leaseCounter = :held")
            .expression_attribute_values(":id", AttributeValue::S(intent.id.clone()))
            .expression_attribute_values(
                ":intent",
                AttributeValue::S(serde_json::to_string(&share).expect("serializable")),
            )
            .expression_attribute_values(":me", AttributeValue::S(self.m.owner.clone()))
            .expression_attribute_values(":held", n(counter))
            .expression_attribute_values(":next", n(counter + 1))
            .build()
            .expect("complete");
        TransactWriteItem::builder().update(update).build()
    }

    /// Sends the prepare's transaction. One cancelled for throttling or a conflicting
    /// transaction applied nothing: it is sent again (counted as throttled); the SDK does not
    /// retry these itself.
    async fn transact(
        &self,
        writes: &[TransactWriteItem],
    ) -> Result<TransactWriteItemsOutput, SdkError<TransactWriteItemsError>> {
        let retry = Retry {
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_millis(6_400)),
            attempts: 21,
        };
        retry
            .run(
                || {
                    self.m
                        .client
                        .transact_write_items()
                        .set_transact_items(Some(writes.to_vec()))
                        .send()
                },
                |e| {
                    if transient_cancellation(e) {
                        Fault::Throttled
                    } else {
                        Fault::Permanent
                    }
                },
                |_, _, _| {
                    self.m
                        .metrics
                        .dynamodb_throttled
                        .fetch_add(1, Ordering::Relaxed);
                },
            )
            .await
    }
}

/// The shards of `keys` (in the transaction's order) whose fenced write failed its
/// condition: their leases were taken.
fn conditions_failed(e: &SdkError<TransactWriteItemsError>, keys: &[String]) -> Vec<String> {
    let reasons: Vec<String> = match e.as_service_error() {
        Some(TransactWriteItemsError::TransactionCanceledException(c)) => Some(c),
        _ => None,
    }
    .map(|c| {
        c.cancellation_reasons()
            .iter()
            .map(|r| r.code().unwrap_or("None").to_string())
            .collect()
    })
    .unwrap_or_default();
    keys.iter()
        .zip(&reasons)
        .filter(|(_, r)| r.as_str() == "ConditionalCheckFailed")
        .map(|(k, _)| k.clone())
        .collect()
}

#[async_trait::async_trait]
impl CheckpointStore for LeaseStore {
    async fn load(&self) -> Result<StoreState, StoreError> {
        let mut committed = Committed {
            commit_id: self.m.last_commit.load(Ordering::SeqCst),
            ..Default::default()
        };
        let mut pending: BTreeMap<String, Intent> = BTreeMap::new();
        let mut emitted: Option<BTreeMap<String, i64>> = None;
        let mut watermark: Option<Option<i64>> = None;
        for key in &self.shards {
            let Some(l) = self.m.get(key).await? else {
                continue;
            };
            let state = l.effective().cloned().unwrap_or_default();
            committed.commit_id = committed.commit_id.max(state.commit_id);
            // The session's windows start where every one of its shards had emitted them;
            // each shard's own floor keeps its records of later emitted windows out.
            let e = &state.checkpoint.emitted_through;
            emitted = Some(match emitted {
                None => e.clone(),
                Some(prev) => prev
                    .into_iter()
                    .filter_map(|(k, v)| e.get(&k).map(|w| (k, v.min(*w))))
                    .collect(),
            });
            watermark = Some(match watermark {
                None => state.watermark,
                Some(prev) => prev.zip(state.watermark).map(|(a, b)| a.min(b)),
            });
            if let Some((id, share)) = &l.pending {
                let intent = pending.entry(id.clone()).or_insert_with(|| Intent {
                    id: id.clone(),
                    files: share.files.clone(),
                    next: Committed {
                        commit_id: share.next.commit_id,
                        ..Default::default()
                    },
                });
                intent
                    .next
                    .shards
                    .insert(key.clone(), share.next.checkpoint.clone());
                intent.next.watermark = share.next.watermark;
            }
            committed.shards.insert(key.clone(), state.checkpoint);
        }
        committed.emitted_through = emitted.unwrap_or_default();
        committed.watermark = watermark.flatten();
        Ok(StoreState {
            committed,
            pending: pending.into_values().collect(),
        })
    }

    async fn outside(&self, shard: &str) -> Result<Option<ShardCheckpoint>, StoreError> {
        Ok(self
            .m
            .get(shard)
            .await?
            .and_then(|l| l.effective().map(|s| s.checkpoint.clone())))
    }

    async fn prepare(&self, committed: &Committed, intent: &Intent) -> Result<(), StoreError> {
        let mut held = self.m.held.lock().await;
        let aggs = &self.m.aggregations;
        let mut writes = Vec::new();
        let mut keys = Vec::new();
        for (key, next) in &intent.next.shards {
            let before = committed.shards.get(key);
            // A shard whose checkpoint does not move has no data in this commit; a finished
            // shard never has (its lease may already be released).
            let unchanged = before == Some(next);
            let finished = before.is_some_and(|b| b.finished(aggs.iter().map(String::as_str)));
            if unchanged || finished || !self.shards.contains(key) {
                continue;
            }
            let Some(h) = held.get(key) else {
                return Err(StoreError::LeaseLost(vec![key.clone()]));
            };
            writes.push(self.pending_write(key, h.counter, intent, next));
            keys.push(key.clone());
        }
        self.m
            .last_commit
            .fetch_max(intent.next.commit_id, Ordering::SeqCst);
        *self.prepared.lock().expect("not poisoned") = Some((intent.id.clone(), keys.clone()));
        if writes.is_empty() {
            return Ok(());
        }
        let r = self.transact(&writes).await;
        match r {
            Ok(_) => {
                for k in &keys {
                    if let Some(h) = held.get_mut(k) {
                        h.counter += 1;
                    }
                }
                Ok(())
            }
            Err(e) => {
                let lost = conditions_failed(&e, &keys);
                if lost.is_empty() {
                    return Err(self.m.sdk_error("preparing a commit", "UpdateItem", &e));
                }
                for k in &lost {
                    held.remove(k);
                }
                drop(held);
                self.m.lost(&lost);
                Err(StoreError::LeaseLost(lost))
            }
        }
    }

    async fn commit(&self, intent: &Intent) -> Result<(), StoreError> {
        // This session's own intent: the items it prepared. A recovered one: every item of
        // this session it is pending on.
        let ours = self
            .prepared
            .lock()
            .expect("not poisoned")
            .take()
            .filter(|(id, _)| *id == intent.id)
            .map(|(_, keys)| keys);
        let owned: Vec<(String, ShardCheckpoint)> = intent
            .next
            .shards
            .iter()
            .filter(|(k, _)| match &ours {
                Some(keys) => keys.contains(k),
                None => self.shards.contains(k),
            })
            .map(|(k, cp)| (k.clone(), cp.clone()))
            .collect();
        let writes = owned.into_iter().map(|(key, cp)| {
                let state = ShardState {
                    commit_id: intent.next.commit_id,
                    checkpoint: cp.clone(),
                    watermark: intent.next.watermark,
                };
                let (cp_attr, sub) = kcl_checkpoint(&cp, self.m.start);
                self.m
                    .client
                    .update_item()
                    .table_name(&self.m.cfg.table)
                    .key("leaseKey", AttributeValue::S(key))
                    .update_expression(
                        "SET shardlakeState = :state, checkpoint = :cp, checkpointSubSequenceNumber = :sub, ownerSwitchesSinceCheckpoint = :zero REMOVE pendingIntentId, pendingIntent",
                    )
                    // Whoever completes a prepared commit may: the prepare was fenced.
                    .condition_expression("pendingIntentId = :id")
                    .expression_attribute_values(":id", AttributeValue::S(intent.id.clone()))
                    .expression_attribute_values(
                        ":state",
                        AttributeValue::S(serde_json::to_string(&state).expect("serializable")),
                    )
                    .expression_attribute_values(
                        ":cp",
                        AttributeValue::S(cp_attr),
                    )
                    .expression_attribute_values(":sub", n(sub))
                    .expression_attribute_values(":zero", n(0))
                    .send()
            });
        let results: Vec<_> = futures::stream::iter(writes)
            .buffer_unordered(16)
            .collect()
            .await;
        for r in results {
            match r {
                Ok(_) => {}
                // Completed already (by the next owner of the shard), or never prepared
                // there because its checkpoint did not move.
                Err(e) if e.code() == Some("ConditionalCheckFailedException") => {}
                Err(e) => return Err(self.m.sdk_error("committing", "UpdateItem", &e)),
            }
        }
        self.m
            .last_commit
            .fetch_max(intent.next.commit_id, Ordering::SeqCst);
        Ok(())
    }
}

/// A `TransactionCanceledException` that only throttling or a conflicting transaction caused
/// (no condition failed): nothing was written, and the same transaction may be sent again.
fn transient_cancellation(e: &SdkError<TransactWriteItemsError>) -> bool {
    let Some(TransactWriteItemsError::TransactionCanceledException(c)) = e.as_service_error()
    else {
        return false;
    };
    retry::cancellation_is_retryable(
        c.cancellation_reasons()
            .iter()
            .map(|r| r.code().unwrap_or("None")),
    )
}
