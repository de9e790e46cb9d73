//! Which workers the console follows: found where the workers say where they are, so the
//! console shows the whole fleet whichever worker holds which shard, and follows a lease
//! that moves.
//!
//! - With the DynamoDB lease table, each worker writes its live-state address into every
//!   lease it takes or renews ([`LIVE_ADDR`]); the console scans the table (a projection of
//!   three attributes, every [`RESCAN`]) and follows each address that owns a lease.
//! - With local checkpoints, a running worker leaves `<checkpoints>/live/<worker>.url`.
//! - `--worker URL` names them by hand instead.
//!
//! A worker that stops owning leases is dropped at the next scan; its devices stay on the
//! page with their age growing until another worker reports them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use tokio::task::JoinHandle;

use super::fleet::{Feed, Fleet, follow};
use crate::checkpoint::dynamodb::LIVE_ADDR;
use crate::config::{Checkpoints, Pipeline};

/// How often the console looks for workers again.
pub const RESCAN: Duration = Duration::from_secs(3);

/// Where the workers are listed.
pub enum Workers {
    Fixed(Vec<String>),
    LeaseTable {
        client: aws_sdk_dynamodb::Client,
        table: String,
    },
    LocalDir(PathBuf),
}

impl Workers {
    /// The pipeline's own list: its lease table or its local checkpoints.
    pub async fn of(p: &Pipeline) -> Self {
        match &p.checkpoints {
            Checkpoints::Dynamodb(t) => Workers::LeaseTable {
                client: aws_sdk_dynamodb::Client::new(
                    &crate::aws::sdk_config(t.region.as_deref()).await,
                ),
                table: t.table.clone(),
            },
            Checkpoints::Local { path } => Workers::LocalDir(path.join(crate::pipeline::LIVE_DIR)),
            // One worker, no table of workers: the console is told where it is (`--worker`).
            Checkpoints::S3 { .. } => Workers::Fixed(Vec::new()),
        }
    }

    /// The addresses of the workers now.
    pub async fn list(&self) -> anyhow::Result<BTreeSet<String>> {
        match self {
            Workers::Fixed(v) => Ok(v.iter().cloned().collect()),
            Workers::LocalDir(dir) => {
                let mut out = BTreeSet::new();
                let Ok(entries) = std::fs::read_dir(dir) else {
                    return Ok(out);
                };
                for e in entries.flatten() {
                    if e.path().extension().is_some_and(|x| x == "url")
                        && let Ok(text) = std::fs::read_to_string(e.path())
                    {
                        out.insert(text.trim().to_string());
                    }
                }
                Ok(out)
            }
            Workers::LeaseTable { client, table } => {
                let mut out = BTreeSet::new();
                let mut start = None;
                loop {
                    let page = client
                        .scan()
                        .table_name(table)
                        .projection_expression("leaseOwner, #addr")
                        .expression_attribute_names("#addr", LIVE_ADDR)
                        .set_exclusive_start_key(start.take())
                        .send()
                        .await
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "scanning the lease table {table}: {}",
                                crate::aws::describe(&e)
                            )
                        })?;
                    for item in page.items() {
                        let s = |k: &str| item.get(k).and_then(|v: &AttributeValue| v.as_s().ok());
                        if s("leaseOwner").is_some_and(|o| !o.is_empty())
                            && let Some(addr) = s(LIVE_ADDR)
                        {
                            out.insert(addr.clone());
                        }
                    }
                    match page.last_evaluated_key() {
                        Some(k) if !k.is_empty() => start = Some(k.clone()),
                        _ => return Ok(out),
                    }
                }
            }
        }
    }

    /// Follows every worker listed, looking again every [`RESCAN`], until the process ends.
    pub fn follow_all(self, fleet: Arc<Fleet>) {
        tokio::spawn(async move {
            let mut following: BTreeMap<String, JoinHandle<()>> = BTreeMap::new();
            let mut failing = false;
            loop {
                match self.list().await {
                    Ok(now) => {
                        failing = false;
                        following.retain(|addr, task| {
                            let keep = now.contains(addr);
                            if !keep {
                                tracing::info!(worker = %addr, "no longer following a worker");
                                task.abort();
                            }
                            keep
                        });
                        for addr in now {
                            if let std::collections::btree_map::Entry::Vacant(slot) =
                                following.entry(addr)
                            {
                                tracing::info!(worker = %slot.key(), "following a worker's live state");
                                let feed = Feed::Remote(slot.key().clone());
                                slot.insert(follow(feed, fleet.clone()));
                            }
                        }
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "finding the workers failed; retrying");
                            failing = true;
                        }
                    }
                }
                tokio::time::sleep(RESCAN).await;
            }
        });
    }
}
