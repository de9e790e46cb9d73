//! Leases in DynamoDB: many workers share a Kinesis stream's shards, the KCL's way.
//!
//! One item per shard, keyed `leaseKey` = shard id, with the KCL's attributes: `leaseOwner`
//! (absent when free), `leaseCounter` (bumped by every renewal, take and prepare),
//! `checkpoint` (`TRIM_HORIZON` / `LATEST` / `AT_TIMESTAMP`, the last committed sequence
//! number, or `SHARD_END`), `checkpointSubSequenceNumber`, `parentShardIds`,
//! `ownerSwitchesSinceCheckpoint`. Ours beside them: `shardlakeState` (the shard's whole
//! checkpoint: per-aggregation positions, emitted windows, watermark, commit id) and
//! `pendingIntentId` / `pendingIntent` (this shard's share of a prepared commit).
//!
//! **Expiry without clocks**: a worker notes when it last saw each lease's counter change; a
//! lease whose counter stood still for `failover_time` (by this worker's own clock) is
//! expired and may be taken. Owners renew three times per period.
//!
//! **Balance**: every scan, a worker counts the live workers (owners of unexpired leases,
//! itself included) and aims at `ceil(shards / workers)` leases. Below that it takes expired
//! or free leases; if there are none, it steals one lease per scan from the most loaded
//! worker, provided that one is above the target. A child shard's lease is not taken before
//! every parent's item says `SHARD_END`, so each device's records stay in order.
//!
//! **Fencing**: a commit's prepare writes the intent to every shard item it moves, in one
//! `TransactWriteItems`, each write conditional on `leaseOwner` = this worker and
//! `leaseCounter` = the counter it holds. A worker whose lease was taken cannot prepare,
//! so it cannot publish. Once prepared, a commit is completed by whoever finds it: the
//! preparing worker, or the next owner of any of its shards (publishing is idempotent, and
//! the completion of each item is conditional on its `pendingIntentId`).
//!
//! Files: [`item`] (the item format), [`manager`] (taking, renewing, balancing and releasing
//! leases), [`balance`] (the stealing rule, pure), [`store`] (the [`CheckpointStore`] of a
//! session: load, prepare and commit against the items it holds).
//!
//! [`CheckpointStore`]: crate::checkpoint::CheckpointStore

mod balance;
mod item;
mod manager;
mod store;

pub use manager::{Generation, Held, LIVE_ADDR, LeaseManager};
