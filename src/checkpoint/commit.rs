//! The exactly-once commit protocol: how staged files become visible together with the
//! checkpoints that say which records they hold, so that a crash or a lost lease at any point
//! leaves every record in every output exactly once.
//!
//! # The steps
//!
//! 1. **Stage** (the caller, through [`crate::sink`]): every open file is written where
//!    readers do not look: on S3 a multipart upload that is not completed; locally a hidden
//!    `.<name>.parquet.inprogress` file. Staged files are named after the worker and the
//!    commit id, so the files of two workers, or of two commits, never collide.
//! 2. **Prepare** ([`CheckpointStore::prepare`]): one [`Intent`] is written to the checkpoint
//!    store beside the last committed state. It names the staged files (keys, upload ids,
//!    part ETags) and the state after the commit: per shard and per output, how far the
//!    records are committed (`(from, to]` is the range between the two states). This is the
//!    decisive write: once it succeeded, the commit happens, here or in a recovery.
//! 3. **Publish** ([`publish`]): every staged file is made visible (S3 completes the upload,
//!    locally a rename); a lake with `format: delta` then appends them to each table in one
//!    log entry that records the intent's commit number ([`crate::sink::delta`]); then
//!    [`CheckpointStore::commit`] makes the intent's state the committed one and clears the
//!    intent.
//!
//! # Fencing
//!
//! On the DynamoDB lease table ([`super::dynamodb`]) the prepare is one `TransactWriteItems`
//! whose writes are each conditional on this worker owning the shard at the lease counter it
//! holds: a worker whose lease was taken cannot prepare, so it cannot publish anything. The
//! completion of each item is conditional on its pending intent id, so a late completion by a
//! worker that lost the lease cannot overwrite a newer state. The local store
//! ([`super::local`]) is one worker's, held by a lock file.
//!
//! # Recovery is the same steps again
//!
//! [`recover`] runs when a worker opens the store (at start, and when it takes a lease): every
//! pending intent it finds is published and committed with the same [`publish`] the normal
//! path runs (both steps are idempotent: a completed upload or a renamed file is checked, not
//! written twice), then staged files that no intent names are removed, and reading resumes
//! after the committed checkpoints. There is no separate recovery code to get wrong.
//!
//! # Failure points
//!
//! Tests crash the process at each named point ([`crate::failpoint::POINTS`]), in order:
//! `after_stage`, `after_prepare`, `after_publish_file` (one file visible, the others not),
//! `after_publish`, `after_commit`.
//!
//! # Why each output keeps its own checkpoint
//!
//! The raw, dead-letter, late and alert tables commit as soon as their files roll; a windowed
//! aggregation commits only up to the first record of its oldest open window. The source
//! resumes from the lowest checkpoint of a shard and each output skips what it already
//! committed, so open windows are rebuilt by replay.

use futures::{StreamExt, TryStreamExt};

use super::{CheckpointStore, Committed, Intent, StoreError};
use crate::failpoint;
use crate::sink::{Lakes, StagedFile};

/// Why a commit or a recovery stopped. Either way nothing is lost: what was prepared is
/// completed by the next recovery, what was not is read again.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The checkpoint store failed, or refused a fenced write (a lost lease).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Publishing or cleaning up files failed.
    #[error("lake: {0}")]
    Lake(std::io::Error),
}

/// Files published at once (S3 completes uploads in parallel).
const PUBLISH_CONCURRENCY: usize = 8;

/// Opens the store: completes every commit prepared earlier, removes staged files no intent
/// names, and returns the committed state to resume from.
pub async fn recover(
    lakes: &Lakes,
    store: &dyn CheckpointStore,
    worker: &str,
) -> Result<Committed, CommitError> {
    let state = store.load().await?;
    for intent in &state.pending {
        tracing::info!(
            files = intent.files.len(),
            commit = intent.next.commit_id,
            shards = ?intent.next.shards.keys().collect::<Vec<_>>(),
            "completing a commit prepared earlier"
        );
        publish(lakes, store, intent).await?;
    }
    let removed = lakes
        .remove_orphans(worker, true)
        .await
        .map_err(CommitError::Lake)?;
    if removed > 0 {
        tracing::info!(removed, "removed staged files no commit names");
    }
    Ok(state.committed)
}

/// Prepares and publishes a commit of `files` (staged by the caller) that moves the store
/// from `committed` to `next`. Returns the intent it completed.
pub async fn commit(
    lakes: &Lakes,
    store: &dyn CheckpointStore,
    worker: &str,
    committed: &Committed,
    files: Vec<StagedFile>,
    next: Committed,
) -> Result<Intent, CommitError> {
    let intent = Intent {
        id: format!("{worker}-{}", next.commit_id),
        files,
        next,
    };
    store.prepare(committed, &intent).await?;
    failpoint::hit("after_prepare");
    publish(lakes, store, &intent).await?;
    Ok(intent)
}

/// Publishes an intent's files, then commits it. Recovery calls exactly this.
pub async fn publish(
    lakes: &Lakes,
    store: &dyn CheckpointStore,
    intent: &Intent,
) -> Result<(), CommitError> {
    if let Some((first, rest)) = intent.files.split_first() {
        lakes.publish(first).await.map_err(CommitError::Lake)?;
        failpoint::hit("after_publish_file");
        futures::stream::iter(rest.iter().map(|f| lakes.publish(f)))
            .buffer_unordered(PUBLISH_CONCURRENCY)
            .try_collect::<()>()
            .await
            .map_err(CommitError::Lake)?;
    }
    lakes
        .commit_tables(intent)
        .await
        .map_err(CommitError::Lake)?;
    failpoint::hit("after_publish");
    store.commit(intent).await?;
    failpoint::hit("after_commit");
    Ok(())
}

/// After a commit every open file was just published and nothing is staged: aborts what
/// retries left behind. A failure here only leaves work for the next start's recovery.
pub async fn sweep(lakes: &Lakes, worker: &str) {
    match lakes.remove_orphans(worker, false).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "aborted uploads that retries left behind"),
        Err(e) => {
            tracing::warn!(error = %e, "could not sweep staged uploads; the next start will")
        }
    }
}
