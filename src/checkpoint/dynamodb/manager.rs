//! The lease manager: one per worker, it scans the table, takes, renews, steals and releases
//! leases, and tells the pipeline when its set of shards changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TableStatus,
};
use futures::StreamExt;
use tokio::sync::{Mutex, watch};

use super::balance::steal_from;
use super::item::{Item, Lease, SHARD_END, n};
use crate::aws;
use crate::checkpoint::StoreError;
use crate::config::{LeaseTable, StartAt};
use crate::metrics::Metrics;
use crate::source::SourceError;
use crate::source::kinesis::KinesisStream;

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

/// The lease attribute naming the owner's live-state address (see [`LeaseManager`]).
pub const LIVE_ADDR: &str = "shardlakeLiveAddr";

#[derive(Debug)]
pub struct LeaseManager {
    pub(super) client: Client,
    pub(super) cfg: LeaseTable,
    pub(super) owner: String,
    pub(super) start: &'static str,
    pub(super) aggregations: Vec<String>,
    stream: KinesisStream,
    pub(super) held: Mutex<BTreeMap<String, Held>>,
    seen: std::sync::Mutex<HashMap<String, Seen>>,
    generation: watch::Sender<Generation>,
    /// Scans done (the pipeline starts its first session after the first).
    scans: watch::Sender<u64>,
    /// The newest commit id this process wrote: commit ids never repeat within a worker.
    pub(super) last_commit: AtomicU64,
    pub(super) metrics: Arc<Metrics>,
    /// Where this worker serves its live state (`GET /live`), written into every lease it
    /// takes or renews: the console finds the workers through the table.
    live_addr: Option<String>,
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
        live_addr: Option<String>,
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
            live_addr,
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
    pub(super) fn sdk_error<E>(
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

    pub(super) fn lost(&self, shards: &[String]) {
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
            let r = match &self.live_addr {
                None => self.fenced_update(&key, counter, "SET leaseCounter = :next"),
                Some(addr) => self
                    .fenced_update(
                        &key,
                        counter,
                        &format!("SET leaseCounter = :next, {LIVE_ADDR} = :addr"),
                    )
                    .expression_attribute_values(":addr", AttributeValue::S(addr.clone())),
            }
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

    /// The leases that may be taken: free ones, and others' whose counter stood still for
    /// `failover_time` by this worker's clock (expiry without clocks across workers).
    fn expired(&self, leases: &[Lease]) -> BTreeSet<String> {
        let now = Instant::now();
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
    }

    /// Forgets leases of this worker's that another took while it was not looking (renewal
    /// has not noticed yet), and lets finished ones go: nothing will ever be read from them
    /// again. Returns the lost ones.
    async fn let_go(&self, held: &mut BTreeMap<String, Held>, leases: &[Lease]) -> Vec<String> {
        let mut lost = Vec::new();
        for l in leases {
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
        lost
    }

    async fn scan_and_take(&self, sync: bool) -> Result<(), StoreError> {
        let mut leases = self.scan().await?;
        if sync {
            let known: BTreeSet<String> = leases.iter().map(|l| l.key.clone()).collect();
            if self.sync_shards(&known).await? > 0 {
                leases = self.scan().await?;
            }
        }
        let expired = self.expired(&leases);
        let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
        let ended = |k: &str| by_key.get(k).is_none_or(|p| p.checkpoint == SHARD_END);
        // Leases worth holding: not finished, and every parent read to its end.
        let open: Vec<&Lease> = leases
            .iter()
            .filter(|l| !l.finished(&self.aggregations) && l.parents.iter().all(|p| ended(p)))
            .collect();

        let mut held = self.held.lock().await;
        let lost = self.let_go(&mut held, &leases).await;
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
        let mut update = "SET leaseOwner = :me, leaseCounter = :next, ownerSwitchesSinceCheckpoint = if_not_exists(ownerSwitchesSinceCheckpoint, :zero) + :one".to_string();
        if self.live_addr.is_some() {
            update.push_str(&format!(", {LIVE_ADDR} = :addr"));
        }
        let r = self
            .client
            .update_item()
            .table_name(&self.cfg.table)
            .key("leaseKey", AttributeValue::S(l.key.clone()))
            .update_expression(update)
            .set_expression_attribute_values(
                self.live_addr
                    .as_ref()
                    .map(|a| [(":addr".to_string(), AttributeValue::S(a.clone()))].into()),
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

    pub(super) async fn get(&self, key: &str) -> Result<Option<Lease>, StoreError> {
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
