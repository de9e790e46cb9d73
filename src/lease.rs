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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TableStatus, TransactWriteItem, Update,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};

use crate::aws;
use crate::checkpoint::{
    CheckpointStore, Committed, Intent, ShardCheckpoint, StoreError, StoreState,
};
use crate::config::{LeaseTable, StartAt};
use crate::metrics::Metrics;
use crate::sink::StagedFile;
use crate::source::SourceError;
use crate::source::kinesis::KinesisStream;

type Item = HashMap<String, AttributeValue>;

/// A shard's checkpoint as its item keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ShardState {
    /// The commit that wrote it (commit ids name files; each worker's never repeat).
    commit_id: u64,
    checkpoint: ShardCheckpoint,
    watermark: Option<i64>,
}

/// A shard's share of a prepared commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PendingShare {
    files: Vec<StagedFile>,
    next: ShardState,
}

/// One item, read.
#[derive(Debug, Clone)]
struct Lease {
    key: String,
    owner: Option<String>,
    counter: u64,
    parents: Vec<String>,
    /// The KCL `checkpoint` attribute.
    checkpoint: String,
    state: Option<ShardState>,
    pending: Option<(String, PendingShare)>,
}

const SHARD_END: &str = "SHARD_END";

impl Lease {
    fn parse(item: &Item, table: &str) -> Result<Self, StoreError> {
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
    fn effective(&self) -> Option<&ShardState> {
        self.pending
            .as_ref()
            .map(|(_, p)| &p.next)
            .or(self.state.as_ref())
    }

    fn finished(&self, aggregations: &[String]) -> bool {
        self.effective().is_some_and(|s| {
            s.checkpoint
                .finished(aggregations.iter().map(String::as_str))
        })
    }
}

/// What the lease manager tells the pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Generation {
    /// Bumped when this worker took a lease.
    pub gained: u64,
    /// Bumped when this worker found a lease of its taken by another.
    pub lost: u64,
}

/// When this worker last saw a lease's counter change.
#[derive(Debug)]
struct Seen {
    counter: u64,
    owner: Option<String>,
    since: Instant,
}

/// A shard this worker holds.
#[derive(Debug, Clone)]
pub struct Held {
    pub counter: u64,
    pub parents: Vec<String>,
}

#[derive(Debug)]
pub struct LeaseManager {
    client: Client,
    cfg: LeaseTable,
    owner: String,
    start: &'static str,
    aggregations: Vec<String>,
    stream: KinesisStream,
    held: Mutex<BTreeMap<String, Held>>,
    seen: std::sync::Mutex<HashMap<String, Seen>>,
    generation: watch::Sender<Generation>,
    /// Scans done (the pipeline starts its first session after the first).
    scans: watch::Sender<u64>,
    /// The newest commit id this process wrote: commit ids never repeat within a worker.
    last_commit: AtomicU64,
    metrics: Arc<Metrics>,
}

impl LeaseManager {
    /// Connects, and creates the table if it is missing.
    pub async fn connect(
        cfg: &LeaseTable,
        owner: String,
        stream: KinesisStream,
        start: StartAt,
        aggregations: Vec<String>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StoreError> {
        let conf = aws::sdk_config(cfg.region.as_deref()).await;
        let m = Arc::new(Self {
            client: Client::from_conf(
                aws_sdk_dynamodb::config::Builder::from(&conf)
                    .interceptor(aws::FaultCounter::new(
                        metrics.clone(),
                        |m| &m.dynamodb_throttled,
                        |m| &m.dynamodb_errors_retried,
                    ))
                    .build(),
            ),
            cfg: cfg.clone(),
            owner,
            start: match start {
                StartAt::TrimHorizon => "TRIM_HORIZON",
                StartAt::Latest => "LATEST",
                StartAt::AtTimestamp(_) => "AT_TIMESTAMP",
            },
            aggregations,
            stream,
            held: Mutex::default(),
            seen: Default::default(),
            generation: watch::Sender::new(Generation::default()),
            scans: watch::Sender::new(0),
            last_commit: AtomicU64::new(0),
            metrics,
        });
        m.ensure_table().await?;
        Ok(m)
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    fn error(&self, message: String) -> StoreError {
        StoreError::Table {
            table: self.cfg.table.clone(),
            message,
        }
    }

    /// An SDK error, with the permission to add when it is a denial.
    fn sdk_error<E>(
        &self,
        doing: &str,
        action: &str,
        e: &aws_sdk_dynamodb::error::SdkError<E>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let text = aws::describe(e);
        if e.code() == Some("AccessDeniedException") || text.contains("AccessDenied") {
            return self.error(format!(
                "{doing}: access denied; the worker's role needs dynamodb:{action} on arn:aws:dynamodb:<region>:<account>:table/{} ({text})",
                self.cfg.table
            ));
        }
        self.error(format!("{doing}: {text}"))
    }

    async fn ensure_table(&self) -> Result<(), StoreError> {
        let t = &self.cfg.table;
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut created = false;
        loop {
            match self.client.describe_table().table_name(t).send().await {
                Ok(out) => {
                    let status = out.table().and_then(|d| d.table_status());
                    if status == Some(&TableStatus::Active) {
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        return Err(self.error(format!(
                            "still not ACTIVE after 5 minutes (status {status:?})"
                        )));
                    }
                }
                Err(e) if e.code() == Some("ResourceNotFoundException") && !created => {
                    tracing::info!(table = %t, "creating the lease table (on-demand capacity)");
                    let key = |b: ScalarAttributeType| {
                        AttributeDefinition::builder()
                            .attribute_name("leaseKey")
                            .attribute_type(b)
                            .build()
                            .expect("complete")
                    };
                    let create = self
                        .client
                        .create_table()
                        .table_name(t)
                        .attribute_definitions(key(ScalarAttributeType::S))
                        .key_schema(
                            KeySchemaElement::builder()
                                .attribute_name("leaseKey")
                                .key_type(KeyType::Hash)
                                .build()
                                .expect("complete"),
                        )
                        .billing_mode(BillingMode::PayPerRequest)
                        .send()
                        .await;
                    match create {
                        Ok(_) => {}
                        // Another worker created it at the same moment.
                        Err(e) if e.code() == Some("ResourceInUseException") => {}
                        Err(e) => return Err(self.sdk_error("creating it", "CreateTable", &e)),
                    }
                    created = true;
                }
                Err(e) => return Err(self.sdk_error("describing it", "DescribeTable", &e)),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every item of the table (consistent read).
    async fn scan(&self) -> Result<Vec<Lease>, StoreError> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.cfg.table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.sdk_error("scanning it", "Scan", &e))?;
            for item in page.items() {
                out.push(Lease::parse(item, &self.cfg.table)?);
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(out),
            }
        }
    }

    /// Creates an item for every shard of the stream that has none.
    async fn sync_shards(&self, known: &BTreeSet<String>) -> Result<usize, StoreError> {
        let shards = self.stream.list_shards().await.map_err(|e| match e {
            SourceError::Stream { message, .. } => self.error(format!("listing shards: {message}")),
            other => self.error(other.to_string()),
        })?;
        let mut created = 0;
        for s in shards.iter().filter(|s| !known.contains(&*s.id)) {
            let mut put = self
                .client
                .put_item()
                .table_name(&self.cfg.table)
                .item("leaseKey", AttributeValue::S(s.id.to_string()))
                .item("leaseCounter", AttributeValue::N("0".into()))
                .item("checkpoint", AttributeValue::S(self.start.into()))
                .item("checkpointSubSequenceNumber", AttributeValue::N("0".into()))
                .item(
                    "ownerSwitchesSinceCheckpoint",
                    AttributeValue::N("0".into()),
                )
                .condition_expression("attribute_not_exists(leaseKey)");
            // DynamoDB has no empty sets.
            if !s.parents.is_empty() {
                put = put.item("parentShardIds", AttributeValue::Ss(s.parents.clone()));
            }
            match put.send().await {
                Ok(_) => created += 1,
                Err(e) if e.code() == Some("ConditionalCheckFailedException") => {}
                Err(e) => return Err(self.sdk_error("adding a shard", "PutItem", &e)),
            }
        }
        if created > 0 {
            tracing::info!(created, "added lease items for new shards");
        }
        Ok(created)
    }

    /// Runs until `stop`: renews, scans, takes and balances; at the end releases every lease.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> Result<(), StoreError> {
        let renew_every = self.cfg.failover_time / 3;
        let scan_every = self.cfg.failover_time / 2;
        let mut renew = tokio::time::interval(renew_every);
        let mut scan = tokio::time::interval(scan_every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sync: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = renew.tick() => self.renew().await,
                _ = scan.tick() => {
                    let sync = last_sync.is_none_or(|t| t.elapsed() >= self.cfg.shard_sync_interval);
                    match self.scan_and_take(sync).await {
                        Ok(()) => {
                            self.metrics.lease_table_answered(self.cfg.failover_time);
                            if sync { last_sync = Some(Instant::now()); }
                            self.scans.send_modify(|n| *n += 1);
                        }
                        // The table or the stream is unreachable for now: leases held are
                        // still renewed (or expire), and the next scan tries again.
                        Err(e) => tracing::warn!(error = %e, "lease scan failed"),
                    }
                }
                _ = stop.changed() => break,
            }
        }
        Ok(())
    }

    /// Waits for the first scan (its takes included).
    pub async fn first_scan(&self) {
        let mut rx = self.scans.subscribe();
        let _ = rx.wait_for(|n| *n > 0).await;
    }

    pub fn generation(&self) -> watch::Receiver<Generation> {
        self.generation.subscribe()
    }

    /// The leases held now.
    pub async fn held(&self) -> BTreeMap<String, Held> {
        self.held.lock().await.clone()
    }

    fn lost(&self, shards: &[String]) {
        if shards.is_empty() {
            return;
        }
        tracing::warn!(shards = ?shards, "lease taken by another worker");
        Metrics::add(&self.metrics.leases_lost, shards.len() as u64);
        self.generation.send_modify(|g| g.lost += 1);
    }

    async fn renew(&self) {
        let mut held = self.held.lock().await;
        let owned: Vec<(String, u64)> = held.iter().map(|(k, h)| (k.clone(), h.counter)).collect();
        let renewals = owned.into_iter().map(|(key, counter)| async move {
            let r = self
                .fenced_update(&key, counter, "SET leaseCounter = :next")
                .send()
                .await;
            (key, counter, r)
        });
        let results: Vec<_> = futures::stream::iter(renewals)
            .buffer_unordered(16)
            .collect()
            .await;
        let mut lost = Vec::new();
        let mut answered = true;
        for (key, counter, r) in results {
            match r {
                Ok(_) => {
                    if let Some(h) = held.get_mut(&key) {
                        h.counter = counter + 1;
                    }
                }
                Err(e) if e.code() == Some("ConditionalCheckFailedException") => {
                    held.remove(&key);
                    lost.push(key);
                }
                // Unreachable for now: the next renewal tries again; if the lease expires
                // meanwhile, the next prepare fails and the session starts over.
                Err(e) => {
                    answered = false;
                    tracing::warn!(shard_id = %key, error = %aws::describe(&e), "lease renewal failed")
                }
            }
        }
        if answered && !held.is_empty() {
            self.metrics.lease_table_answered(self.cfg.failover_time);
        }
        Metrics::set(&self.metrics.leases_held, held.len() as u64);
        drop(held);
        self.lost(&lost);
    }

    async fn scan_and_take(&self, sync: bool) -> Result<(), StoreError> {
        let mut leases = self.scan().await?;
        if sync {
            let known: BTreeSet<String> = leases.iter().map(|l| l.key.clone()).collect();
            if self.sync_shards(&known).await? > 0 {
                leases = self.scan().await?;
            }
        }
        let now = Instant::now();
        let expired: BTreeSet<String> = {
            let mut seen = self.seen.lock().expect("not poisoned");
            seen.retain(|k, _| leases.iter().any(|l| &l.key == k));
            leases
                .iter()
                .filter(|l| {
                    let s = seen.entry(l.key.clone()).or_insert(Seen {
                        counter: l.counter,
                        owner: l.owner.clone(),
                        since: now,
                    });
                    if s.counter != l.counter || s.owner != l.owner {
                        *s = Seen {
                            counter: l.counter,
                            owner: l.owner.clone(),
                            since: now,
                        };
                    }
                    l.owner.is_none()
                        || (l.owner.as_deref() != Some(&self.owner)
                            && now - s.since >= self.cfg.failover_time)
                })
                .map(|l| l.key.clone())
                .collect()
        };
        let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
        let ended = |k: &str| by_key.get(k).is_none_or(|p| p.checkpoint == SHARD_END);
        // Leases worth holding: not finished, and every parent read to its end.
        let open: Vec<&Lease> = leases
            .iter()
            .filter(|l| !l.finished(&self.aggregations) && l.parents.iter().all(|p| ended(p)))
            .collect();

        let mut held = self.held.lock().await;
        // Finished leases are let go: nothing will ever be read from them again.
        let mut lost = Vec::new();
        for l in &leases {
            let mine = l.owner.as_deref() == Some(&self.owner);
            if let Some(h) = held.get(&l.key) {
                if !mine || l.counter != h.counter {
                    // Taken while this worker was not looking (renewal has not noticed yet).
                    if !mine {
                        held.remove(&l.key);
                        lost.push(l.key.clone());
                    }
                } else if l.finished(&self.aggregations) {
                    self.release(&l.key, h.counter).await;
                    held.remove(&l.key);
                }
            }
        }

        let mut load: BTreeMap<&str, usize> = BTreeMap::new();
        load.insert(&self.owner, 0);
        for l in &open {
            if let Some(o) = &l.owner
                && !expired.contains(&l.key)
            {
                *load.entry(o).or_default() += 1;
            }
        }
        let mine = open.iter().filter(|l| held.contains_key(&l.key)).count();
        let target = open.len().div_ceil(load.len()).min(self.cfg.max_leases);
        let mut gained = 0;
        if mine < target {
            let mut free: Vec<&&Lease> = open
                .iter()
                .filter(|l| expired.contains(&l.key) && !held.contains_key(&l.key))
                .collect();
            fastrand::shuffle(&mut free);
            for l in free.into_iter().take(target - mine) {
                if self.take(&mut held, l).await {
                    gained += 1;
                }
            }
            if gained == 0
                && let Some(v) = steal_from(&load, &self.owner, mine, target)
            {
                let theirs: Vec<&&Lease> = open
                    .iter()
                    .filter(|l| l.owner.as_deref() == Some(&v) && !expired.contains(&l.key))
                    .collect();
                if let Some(l) = theirs.get(fastrand::usize(..theirs.len().max(1))) {
                    tracing::info!(shard_id = %l.key, from = %v, target, "stealing a lease to balance");
                    if self.take(&mut held, l).await {
                        gained += 1;
                    }
                }
            }
        }
        Metrics::set(&self.metrics.leases_held, held.len() as u64);
        drop(held);
        self.lost(&lost);
        if gained > 0 {
            self.generation.send_modify(|g| g.gained += 1);
        }
        Ok(())
    }

    async fn take(&self, held: &mut BTreeMap<String, Held>, l: &Lease) -> bool {
        let r = self
            .client
            .update_item()
            .table_name(&self.cfg.table)
            .key("leaseKey", AttributeValue::S(l.key.clone()))
            .update_expression(
                "SET leaseOwner = :me, leaseCounter = :next, ownerSwitchesSinceCheckpoint = if_not_exists(ownerSwitchesSinceCheckpoint, :zero) + :one",
            )
            .condition_expression("leaseCounter = :seen")
            .expression_attribute_values(":me", AttributeValue::S(self.owner.clone()))
            .expression_attribute_values(":seen", n(l.counter))
            .expression_attribute_values(":next", n(l.counter + 1))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":one", n(1))
            .send()
            .await;
        match r {
            Ok(_) => {
                tracing::info!(shard_id = %l.key, previous_owner = ?l.owner, "took lease");
                Metrics::add(&self.metrics.leases_taken, 1);
                held.insert(
                    l.key.clone(),
                    Held {
                        counter: l.counter + 1,
                        parents: l.parents.clone(),
                    },
                );
                true
            }
            // Someone else moved first.
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => false,
            Err(e) => {
                tracing::warn!(shard_id = %l.key, error = %aws::describe(&e), "taking a lease failed");
                false
            }
        }
    }

    /// An UpdateItem of a lease this worker holds at `counter`; `update` sets `:next`.
    fn fenced_update(
        &self,
        key: &str,
        counter: u64,
        update: &str,
    ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.cfg.table)
            .key("leaseKey", AttributeValue::S(key.into()))
            .update_expression(update)
            .condition_expression("leaseOwner = :me AND leaseCounter = :held")
            .expression_attribute_values(":me", AttributeValue::S(self.owner.clone()))
            .expression_attribute_values(":held", n(counter))
            .expression_attribute_values(":next", n(counter + 1))
    }

    async fn release(&self, key: &str, counter: u64) {
        let r = self
            .fenced_update(key, counter, "REMOVE leaseOwner SET leaseCounter = :next")
            .send()
            .await;
        match r {
            Ok(_) => tracing::info!(shard_id = %key, "released lease"),
            Err(e) => {
                tracing::warn!(shard_id = %key, error = %aws::describe(&e), "releasing a lease failed; it expires instead")
            }
        }
    }

    /// Lets every lease go (after the last commit of a stopping worker), so others take
    /// them at once instead of after `failover_time`.
    pub async fn release_all(&self) {
        let mut held = self.held.lock().await;
        for (key, h) in std::mem::take(&mut *held) {
            self.release(&key, h.counter).await;
        }
        Metrics::set(&self.metrics.leases_held, 0);
    }

    /// The checkpoint store of a session reading `shards` (leases this worker holds).
    pub fn store(self: &Arc<Self>, shards: Vec<String>) -> Box<dyn CheckpointStore> {
        Box::new(LeaseStore {
            m: self.clone(),
            shards,
            prepared: Default::default(),
        })
    }

    /// The leases to read in a new session: held and not finished. Finished ones found
    /// here are released.
    pub async fn session_shards(&self) -> Result<BTreeMap<String, Held>, StoreError> {
        let held = self.held().await;
        let mut out = BTreeMap::new();
        for (key, h) in held {
            let item = self.get(&key).await?;
            if item
                .as_ref()
                .is_some_and(|l| l.finished(&self.aggregations))
            {
                let mut g = self.held.lock().await;
                if g.get(&key).is_some_and(|x| x.counter == h.counter) {
                    self.release(&key, h.counter).await;
                    g.remove(&key);
                }
                continue;
            }
            out.insert(key, h);
        }
        Ok(out)
    }

    async fn get(&self, key: &str) -> Result<Option<Lease>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.cfg.table)
            .key("leaseKey", AttributeValue::S(key.into()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.sdk_error("reading a lease", "GetItem", &e))?;
        out.item()
            .map(|i| Lease::parse(i, &self.cfg.table))
            .transpose()
    }
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// The KCL `checkpoint` and `checkpointSubSequenceNumber` attributes for a shard's state.
fn kcl_checkpoint(cp: &ShardCheckpoint, start: &str) -> (String, u64) {
    if cp.ended {
        return (SHARD_END.into(), 0);
    }
    cp.records.as_ref().map_or_else(
        || (start.to_string(), 0),
        |s| (s.record().to_string(), s.sub().unwrap_or(0)),
    )
}

/// A session's checkpoint store: the items of the shards it reads.
#[derive(Debug)]
struct LeaseStore {
    m: Arc<LeaseManager>,
    shards: Vec<String>,
    /// The last intent this session prepared, and the items it wrote.
    prepared: std::sync::Mutex<Option<(String, Vec<String>)>>,
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
                .key("leaseKey", AttributeValue::S(key.clone()))
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
                .expression_attribute_values(":held", n(h.counter))
                .expression_attribute_values(":next", n(h.counter + 1))
                .build()
                .expect("complete");
            writes.push(TransactWriteItem::builder().update(update).build());
            keys.push(key.clone());
        }
        self.m
            .last_commit
            .fetch_max(intent.next.commit_id, Ordering::SeqCst);
        *self.prepared.lock().expect("not poisoned") = Some((intent.id.clone(), keys.clone()));
        if writes.is_empty() {
            return Ok(());
        }
        // A transaction cancelled for throttling or a conflicting transaction applied nothing:
        // it is sent again (counted as throttled). The SDK does not retry these itself.
        let mut attempt = 0u32;
        let r = loop {
            let r = self
                .m
                .client
                .transact_write_items()
                .set_transact_items(Some(writes.clone()))
                .send()
                .await;
            if let Err(e) = &r
                && attempt < 20
                && transient_cancellation(e)
            {
                attempt += 1;
                self.m
                    .metrics
                    .dynamodb_throttled
                    .fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(crate::backoff::jittered(
                    Duration::from_millis(100),
                    attempt - 1,
                    Duration::from_millis(6_400),
                ))
                .await;
                continue;
            }
            break r;
        };
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
                use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
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
                let lost: Vec<String> = keys
                    .iter()
                    .zip(&reasons)
                    .filter(|(_, r)| r.as_str() == "ConditionalCheckFailed")
                    .map(|(k, _)| k.clone())
                    .collect();
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
fn transient_cancellation(
    e: &aws_sdk_dynamodb::error::SdkError<
        aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError,
    >,
) -> bool {
    use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
    let Some(TransactWriteItemsError::TransactionCanceledException(c)) = e.as_service_error()
    else {
        return false;
    };
    let transient = |c: &str| {
        matches!(
            c,
            "ThrottlingError" | "TransactionConflict" | "ProvisionedThroughputExceeded"
        )
    };
    let codes: Vec<&str> = c
        .cancellation_reasons()
        .iter()
        .map(|r| r.code().unwrap_or("None"))
        .collect();
    codes.iter().any(|c| transient(c)) && codes.iter().all(|c| *c == "None" || transient(c))
}

/// The worker to steal one lease from, if any: the most loaded other worker, when it holds
/// more than `target`, or exactly `target` while this worker is short by more than one (the
/// KCL's rule: without it, 4 shards on 3 workers would stay 2/2/0). Ties go to the
/// lexically first owner, so concurrent thieves tend to pick the same victim.
fn steal_from(
    load: &BTreeMap<&str, usize>,
    me: &str,
    mine: usize,
    target: usize,
) -> Option<String> {
    let (owner, n) = load.iter().filter(|(o, _)| **o != me).fold(
        None,
        |best: Option<(&str, usize)>, (o, n)| match best {
            Some((_, m)) if m >= *n => best,
            _ => Some((o, *n)),
        },
    )?;
    let short = target.saturating_sub(mine);
    (n > target || (n == target && short > 1)).then(|| owner.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs every worker's balancing step in turn (each steals at most one lease per scan, as
    /// the worker does) until nothing moves; returns the final counts.
    fn settle(mut counts: Vec<usize>) -> Vec<usize> {
        let names: Vec<String> = (0..counts.len()).map(|i| format!("w{i}")).collect();
        let total: usize = counts.iter().sum();
        for _ in 0..100 {
            let mut moved = false;
            for me in 0..counts.len() {
                let target = total.div_ceil(counts.len());
                let load: BTreeMap<&str, usize> = names
                    .iter()
                    .map(|n| n.as_str())
                    .zip(counts.iter().copied())
                    .collect();
                if counts[me] < target
                    && let Some(v) = steal_from(&load, &names[me], counts[me], target)
                {
                    let v = names.iter().position(|n| *n == v).unwrap();
                    counts[v] -= 1;
                    counts[me] += 1;
                    moved = true;
                }
            }
            if !moved {
                return counts;
            }
        }
        panic!("balancing did not settle: {counts:?}");
    }

    #[test]
    fn a_new_worker_gets_about_its_share() {
        for (start, total) in [
            (vec![2, 2, 0], 4),
            (vec![3, 3, 3, 0], 9),
            (vec![8, 0, 0], 8),
            (vec![4, 4, 0], 8),
            (vec![1, 0], 1),
            (vec![64, 0, 0, 0, 0], 64),
        ] {
            let end = settle(start.clone());
            assert_eq!(end.iter().sum::<usize>(), total);
            let (lo, hi) = (end.iter().min().unwrap(), end.iter().max().unwrap());
            assert!(
                hi - lo <= 1 || (total < end.len() && *hi == 1),
                "{start:?} -> {end:?}"
            );
        }
    }

    #[test]
    fn no_stealing_at_the_target_for_a_one_lease_gap() {
        let load: BTreeMap<&str, usize> = [("a", 2), ("b", 2), ("me", 1)].into();
        assert_eq!(steal_from(&load, "me", 1, 2), None);
        let load: BTreeMap<&str, usize> = [("a", 3), ("b", 2), ("me", 1)].into();
        assert_eq!(steal_from(&load, "me", 1, 2).as_deref(), Some("a"));
    }
}
