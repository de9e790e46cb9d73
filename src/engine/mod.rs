//! The pipeline's core, driven one decoded chunk at a time: raw and dead-letter rows are
//! written, each aggregation buffers the records of its open windows and, once it holds
//! `limits.window_buffer_records` of them, folds them into one aggregate state per window and
//! group (the parts of [`merge`]); a window is emitted through its SQL, over its buffered
//! records and its folded parts, once the watermark passes its end. Alert rules run, and
//! [`Engine::commit`] makes everything durable with the two-phase commit of
//! [`crate::checkpoint::commit`].
//!
//! Detector rules ([`detect`]) learn per series; their state is snapshotted with each
//! commit and restored from it.
//!
//! Replay is how open windows survive a restart: each aggregation's checkpoint is where the
//! records of its oldest open window start, buffered or folded. Every output skips what it
//! already committed (the record outputs by sequence number; an aggregation by
//! `emitted_through`), so reading the same records again never writes them twice.

mod aggregate;
pub mod detect;
pub mod merge;
pub mod sql;
mod tables;
pub mod window;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, RecordBatch, TimestampMicrosecondArray};
use arrow::compute::filter_record_batch;
use datafusion::prelude::SessionContext;

use crate::checkpoint::commit::{self, CommitError};
use crate::checkpoint::{CheckpointStore, Committed, ShardCheckpoint, StoreError};
use crate::clock::Clock;
use crate::columns;
use crate::config::{ConfigError, Pipeline};
use crate::decode::{DeadLetter, Decoded, Reason};
use crate::failpoint;
use crate::live::{self, Live};
use crate::metrics::Metrics;
use crate::notify::Notifications;
use crate::record::{Position, SeqNo};
use crate::sink::writer::{OutputWriter, Table, WriteError};
use crate::sink::{Lakes, STATE_OUTPUT, StagedFile};
use aggregate::AggState;
use detect::{Detectors, Raised};
use sql::{Compiled, Rule, WINDOW_START};
use tables::{alert_batch, dead_letter_batch, detect_alert_batch, with_aggregation};
use window::Watermark;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The pipeline's SQL does not plan.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The checkpoint store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A table could not be written.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// Publishing or cleaning up files failed.
    #[error("lake: {0}")]
    Lake(std::io::Error),
    /// A query failed while emitting windows.
    #[error("aggregation {name}: {source}")]
    Query {
        name: String,
        source: datafusion::error::DataFusionError,
    },
}

impl From<CommitError> for EngineError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::Store(e) => Self::Store(e),
            CommitError::Lake(e) => Self::Lake(e),
        }
    }
}

struct ShardRun {
    /// Position after the last record handed to the engine.
    read_to: Position,
    /// The shard is closed and every record of it was handed to the engine.
    ended: bool,
}

pub struct Engine {
    p: Arc<Pipeline>,
    clock: Arc<dyn Clock>,
    ctx: SessionContext,
    compiled: Compiled,
    lakes: Lakes,
    store: Box<dyn CheckpointStore>,
    worker: String,
    notify: Option<Arc<Notifications>>,
    /// The console's view of what this worker reads, when it serves one.
    live: Option<(Arc<Live>, live::Columns)>,
    metrics: Arc<Metrics>,
    committed: Committed,
    shards: BTreeMap<Arc<str>, ShardRun>,
    watermark: Watermark,
    aggs: Vec<AggState>,
    /// None: the pipeline writes no raw table.
    raw: Option<OutputWriter>,
    dead: OutputWriter,
    late: OutputWriter,
    alerts: OutputWriter,
    /// `None` without `detect:` rules.
    detect: Option<Detectors>,
    /// Shards added whose detector state is not read back yet.
    unrestored: Vec<Arc<str>>,
    /// Each added shard's parents (split or merge), all of them, read here or not.
    parents: HashMap<Arc<str>, Vec<String>>,
    /// Child shards that start from their parents' detector state at their first records
    /// (or their end), once the parents are read to their end.
    uninherited: BTreeSet<Arc<str>>,
    event_field: usize,
    key_field: Option<String>,
    /// Wall clock of the oldest uncommitted read.
    uncommitted_since: Option<i64>,
}

impl Engine {
    /// Opens the pipeline's state: completes a pending commit, removes orphaned staged files,
    /// and restores checkpoints, emitted windows and the watermark.
    pub async fn open(
        p: Arc<Pipeline>,
        lakes: Lakes,
        store: Box<dyn CheckpointStore>,
        clock: Arc<dyn Clock>,
        worker: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EngineError> {
        let ctx = sql::session();
        let compiled = sql::compile(&p, &ctx).await?;
        let committed = commit::recover(&lakes, store.as_ref(), worker).await?;
        let mut watermark = Watermark::new(
            p.event_time.allowed_lateness,
            p.event_time.idle_shard_timeout.as_micros() as i64,
        );
        if let Some(w) = committed.watermark {
            watermark.set_floor(w);
        }
        let event_field = p.event_field_index();
        let event_name = p.event_time.field.clone();
        let outputs = sql::output_schemas(&p, &compiled);
        let writer = |name: &str, col: &str, kind| -> Result<OutputWriter, EngineError> {
            let schema = outputs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.clone())
                .expect("every table has a schema");
            let rollover = p.outputs.rollover[name].clone();
            let lake = lakes.get(name).map_err(EngineError::Lake)?.clone();
            let by = p.outputs.partitioned_by(name);
            Ok(OutputWriter::new(
                name, schema, col, by, rollover, lake, kind,
            ))
        };
        let mut aggs = Vec::new();
        for (i, a) in p.outputs.aggregations.iter().enumerate() {
            let writer = writer(&a.name, WINDOW_START, Table::Aggregates)?;
            let emitted = committed.emitted_through.get(&a.name).copied();
            aggs.push(AggState::open(&ctx, a, i, &compiled, event_field, writer, emitted).await?);
        }
        for (a, m) in p.outputs.aggregations.iter().zip(&compiled.agg_merge) {
            if m.is_none() {
                tracing::warn!(
                    aggregation = %a.name,
                    "this SELECT cannot be merged, so its open windows' records stay in memory until each window closes (limits.window_buffer_records does not bound it)"
                );
            }
        }
        let detect = Detectors::new(
            compiled.detectors.clone(),
            p.schema.key.as_deref(),
            p.detector_series,
        );
        Ok(Self {
            detect,
            unrestored: Vec::new(),
            parents: HashMap::new(),
            uninherited: BTreeSet::new(),
            raw: match &p.outputs.raw {
                Some(name) => Some(writer(name, &event_name, Table::Records)?),
                None => None,
            },
            dead: writer(
                &p.outputs.dead_letter,
                columns::ARRIVAL_TIME,
                Table::Records,
            )?,
            late: writer(&p.outputs.late, &event_name, Table::Records)?,
            alerts: writer(&p.outputs.alerts, columns::EVENT_TIME, Table::Records)?,
            key_field: p.schema.key.clone(),
            p,
            clock,
            ctx,
            compiled,
            lakes,
            store,
            worker: worker.to_string(),
            notify: None,
            live: None,
            metrics,
            committed,
            shards: BTreeMap::new(),
            watermark,
            aggs,
            event_field,
            uncommitted_since: None,
        })
    }

    /// Sends every alert to these notifiers too (besides the alerts table).
    pub fn set_notifications(&mut self, n: Arc<Notifications>) {
        self.notify = Some(n);
    }

    /// Offers every alert to the worker's live state too (for the console), and says what the
    /// shard tasks offer it of the records ([`Engine::live_feed`]). Without a key field there
    /// is no device to show: nothing is offered.
    pub fn set_live(&mut self, live: Arc<Live>) {
        let Some(key) = self.p.schema.key.clone() else {
            return;
        };
        let tenant = self.p.tenant_field().map(str::to_string);
        let fields = (0..self.p.schema.fields.len())
            .filter(|&i| {
                let name = &self.p.schema.fields[i].name;
                i != self.event_field && *name != key && Some(name) != tenant.as_ref()
            })
            .collect();
        let cols = live::Columns {
            key,
            tenant,
            event_time: self.event_field,
            fields,
        };
        self.live = Some((live, cols));
    }

    /// The live state and its columns, for the shard tasks: they offer it each chunk as it is
    /// decoded, so what a console shows does not wait for the engine (a window's close, a
    /// commit) to take the chunk.
    pub fn live_feed(&self) -> Option<crate::source::LiveFeed> {
        (self.live.as_ref()).map(|(live, cols)| crate::source::LiveFeed {
            live: live.clone(),
            cols: cols.clone(),
        })
    }

    /// The shard's last committed record: records up to it that a session reads again (for
    /// open windows) are not fresh.
    pub fn committed_records(&self, shard: &str) -> Option<SeqNo> {
        self.committed
            .shards
            .get(shard)
            .and_then(|c| c.records.clone())
    }

    /// Whether shards need their hash-key ranges ([`Engine::set_hash_range`]): a `silent`
    /// rule watches `known:` devices.
    pub fn wants_hash_ranges(&self) -> bool {
        self.detect.as_ref().is_some_and(|d| d.wants_hash_ranges())
    }

    /// A shard's hash-key range, for the `known:` devices of `silent` rules.
    pub fn set_hash_range(&mut self, shard: Arc<str>, range: (u128, u128)) {
        if let Some(d) = &mut self.detect {
            d.set_hash_range(shard, range);
        }
    }

    /// Starts tracking a shard (`parents`: every shard it was split or merged from); returns
    /// the position to read it from.
    pub fn add_shard(&mut self, shard: Arc<str>, parents: &[String]) -> Position {
        let cp = self
            .committed
            .shards
            .get(&*shard)
            .cloned()
            .unwrap_or_default();
        let from = cp.resume_from(self.aggs.iter().map(|a| a.name.as_str()));
        // A shard that must re-read records for open windows holds the watermark until it has:
        // counting its restored newest event time would close those windows before their
        // records are back (they would then be neither counted nor late).
        if self.detect.is_some() {
            self.unrestored.push(shard.clone());
            if !parents.is_empty() {
                self.parents.insert(shard.clone(), parents.to_vec());
            }
        }
        let replaying = from < cp.records;
        let restored = if replaying { None } else { cp.max_event_time };
        self.watermark.add_shard(shard.clone(), restored);
        self.shards.insert(
            shard,
            ShardRun {
                read_to: from.clone(),
                ended: false,
            },
        );
        from
    }

    /// The shard's checkpoint says it ended and nothing of it is needed for an open window.
    pub fn finished(&self, shard: &str) -> bool {
        self.committed
            .shards
            .get(shard)
            .is_some_and(|cp| cp.finished(self.aggs.iter().map(|a| a.name.as_str())))
    }

    /// The shard's records are committed to its end (its windows may still be open).
    pub fn committed_to_end(&self, shard: &str) -> bool {
        self.committed.shards.get(shard).is_some_and(|cp| cp.ended)
    }

    /// Committed shards that still have to be read: not to their end, or with records an
    /// open window needs.
    pub fn unfinished(&self) -> Vec<Arc<str>> {
        let aggs = || self.aggs.iter().map(|a| a.name.as_str());
        (self.committed.shards.iter())
            .filter(|(_, cp)| !cp.finished(aggs()))
            .map(|(id, _)| Arc::from(id.as_str()))
            .collect()
    }

    /// The shard has nothing more to read for now; after `idle_shard_timeout` of that, it
    /// stops holding the watermark.
    pub fn shard_caught_up(&mut self, shard: &Arc<str>) {
        self.watermark.caught_up(shard, self.clock.now_us());
    }

    /// The shard is closed and every record of it was handed over: the next commit records it.
    /// Its detectors' series now belong to its children.
    pub fn shard_ended(&mut self, shard: &Arc<str>) {
        if let Some(run) = self.shards.get_mut(shard) {
            run.ended = true;
        }
        if let Some(detect) = &mut self.detect {
            detect.end(shard);
        }
    }

    /// Every window ending at or before this has been emitted, per aggregation.
    pub fn emitted_through(&self, aggregation: &str) -> Option<i64> {
        self.aggs
            .iter()
            .find(|a| a.name == aggregation)
            .and_then(|a| a.emitted_through)
    }

    /// Takes one decoded chunk through every output.
    pub async fn ingest(&mut self, d: Decoded) -> Result<(), EngineError> {
        let now = self.clock.now_us();
        let n = d.batch.num_rows();
        Metrics::add(&self.metrics.records_read, (n + d.dead.len()) as u64);
        let skip = self
            .committed
            .shards
            .get(&*d.shard)
            .and_then(|c| c.records.clone());
        let cut = d.replayed(skip.as_ref());
        let fresh = d.batch.slice(cut, n - cut);
        let epoch = self.committed.commit_id + 1;
        if let Some(raw) = &mut self.raw {
            raw.write(&fresh, epoch, &self.worker, now).await?;
            Metrics::add(&self.metrics.records_written, fresh.num_rows() as u64);
        }

        let dead: Vec<&DeadLetter> = d
            .dead
            .iter()
            .filter(|x| skip.as_ref().is_none_or(|s| x.seq > *s))
            .collect();
        if !dead.is_empty() {
            let batch = dead_letter_batch(&d.shard, d.arrival_us, &dead);
            self.dead.write(&batch, epoch, &self.worker, now).await?;
            Metrics::add(&self.metrics.dead_letters, dead.len() as u64);
            let spoofed = dead
                .iter()
                .filter(|x| matches!(x.reason, Reason::IdentityMismatch(_)))
                .count();
            Metrics::add(&self.metrics.identity_mismatches, spoofed as u64);
        }
        let rules = self.compiled.record_rules.clone();
        let event_field = self.event_field;
        self.run_rules(&rules, "record", &fresh, event_field, now)
            .await?;
        if self.detect.is_some() {
            self.restore_detectors().await?;
            self.inherit_detectors(&d.shard).await?;
            let detect = self.detect.as_mut().expect("checked");
            let raised = detect.observe(&d.shard, &fresh, event_field);
            self.raise(raised, now).await?;
        }

        let ts = event_times(&d.batch, self.event_field);
        let late_schema = self.late.schema().clone();
        let floors = self
            .committed
            .shards
            .get(&*d.shard)
            .map(|c| &c.emitted_through);
        for agg in &mut self.aggs {
            // This shard's records may have been emitted further by the worker that had it.
            let floor = floors.and_then(|f| f.get(&agg.name)).copied();
            if let Some(late) = agg.buffer(&d, ts, cut, floor) {
                Metrics::add(&self.metrics.late_records, late.num_rows() as u64);
                let batch = with_aggregation(&late_schema, &agg.name, &late);
                self.late.write(&batch, epoch, &self.worker, now).await?;
            }
        }
        for i in 0..self.aggs.len() {
            if self.aggs[i].buffered >= self.p.window_buffer_records
                && self.compiled.agg_merge[i].is_some()
            {
                self.aggs[i].fold(&self.ctx, &self.committed).await?;
            }
        }
        let max_ts = (ts.len() > ts.null_count()).then(|| min_max(ts).1);
        self.watermark.observe(&d.shard, max_ts);
        if let Some(run) = self.shards.get_mut(&d.shard) {
            run.read_to = d.end.clone();
        }
        self.uncommitted_since.get_or_insert(now);
        self.emit(now, false).await
    }

    /// Emits windows the watermark has passed (idle shards can move it without new records).
    pub async fn tick(&mut self) -> Result<(), EngineError> {
        let now = self.clock.now_us();
        self.emit(now, false).await
    }

    /// End of a bounded run: emits every window still open.
    pub async fn finish(&mut self) -> Result<(), EngineError> {
        let now = self.clock.now_us();
        self.emit(now, true).await
    }

    async fn emit(&mut self, now: i64, all: bool) -> Result<(), EngineError> {
        let wm = if all {
            None
        } else {
            self.watermark.current(now)
        };
        for i in 0..self.aggs.len() {
            let agg = &self.aggs[i];
            let hi = if all {
                let buffered = agg.buffer.iter().map(|b| b.max_last_end).max();
                buffered.max(agg.folded.last_key_value().map(|(end, _)| *end))
            } else {
                wm
            };
            let Some(hi) = hi else { continue };
            let lo = agg.emitted_through;
            if lo.is_some_and(|lo| hi <= lo) {
                continue;
            }
            let mergeable = self.compiled.agg_merge[i].is_some();
            let (stored, finals) = self.aggs[i]
                .due(&self.ctx, hi, &self.committed, mergeable)
                .await?;
            let epoch = self.committed.commit_id + 1;
            for batch in &stored {
                Metrics::add(&self.metrics.windows_emitted, batch.num_rows() as u64);
                self.aggs[i]
                    .writer
                    .write(batch, epoch, &self.worker, now)
                    .await?;
            }
            let rules = &self.compiled.window_rules[i];
            if !finals.is_empty() {
                let rules = rules.clone();
                for batch in &finals {
                    let ws = batch.schema().index_of(WINDOW_START).expect("validated");
                    self.run_rules(&rules, "window", batch, ws, now).await?;
                }
            }
            self.aggs[i].emitted(hi);
        }
        if let (Some(wm), Some(_)) = (wm, &self.detect) {
            self.restore_detectors().await?;
            let raised = self.detect.as_mut().expect("checked").watermark(wm);
            self.raise(raised, now).await?;
        }
        Ok(())
    }

    /// Reads the detector state of every shard added since the last call from the snapshot
    /// its checkpoint names. A shard with nothing new since its checkpoint still has series
    /// that can go silent, so this runs before records are observed and before the
    /// watermark judges them.
    async fn restore_detectors(&mut self) -> Result<(), EngineError> {
        while let Some(shard) = self.unrestored.pop() {
            self.restore_shard_detectors(&shard).await?;
        }
        Ok(())
    }

    async fn restore_shard_detectors(&mut self, shard: &Arc<str>) -> Result<(), EngineError> {
        let Some(detect) = self.detect.as_mut() else {
            return Ok(());
        };
        if detect.has(shard) {
            return Ok(());
        }
        let cp = self.committed.shards.get(&**shard);
        let key = cp.and_then(|c| c.detectors.clone());
        match key {
            None => {
                detect.start(shard.clone());
                // A child that never committed a record starts from its parents' state.
                if cp.is_none_or(|c| c.records.is_none()) && self.parents.contains_key(shard) {
                    self.uninherited.insert(shard.clone());
                }
            }
            Some(key) => {
                let lake = self.lakes.get(STATE_OUTPUT).map_err(EngineError::Lake)?;
                let bytes = lake.read(&key).await.map_err(|e| {
                    EngineError::Lake(std::io::Error::new(
                        e.kind(),
                        format!("the detector state the checkpoint of shard {shard} names: {e}"),
                    ))
                })?;
                detect.restore(shard.clone(), &bytes).map_err(|e| {
                    EngineError::Lake(std::io::Error::new(
                        e.kind(),
                        format!("the detector state snapshot {key} is damaged: {e}"),
                    ))
                })?;
                tracing::debug!(%shard, %key, series = detect.len(), "restored detector state");
            }
        }
        Ok(())
    }

    /// A child shard's detectors start from its parents' series (see
    /// [`detect`](self::detect)): from a parent's state in memory when this session read it
    /// (every record of it was ingested before the child's first), else from the snapshot
    /// its checkpoint names.
    async fn inherit_detectors(&mut self, child: &Arc<str>) -> Result<(), EngineError> {
        if !self.uninherited.remove(child) {
            return Ok(());
        }
        let Some(detect) = self.detect.as_mut() else {
            return Ok(());
        };
        let parents = self.parents.get(child).cloned().unwrap_or_default();
        let mut from = Vec::new();
        for parent in &parents {
            if detect.has(parent) {
                detect.end(parent);
                from.extend(detect.inheritance(parent));
                continue;
            }
            let cp = match self.committed.shards.get(parent) {
                Some(cp) => Some(cp.clone()),
                None => self.store.outside(parent).await?,
            };
            let Some(key) = cp.and_then(|c| c.detectors) else {
                continue;
            };
            let lake = self.lakes.get(STATE_OUTPUT).map_err(EngineError::Lake)?;
            let damaged = |e: std::io::Error, what: &str| {
                EngineError::Lake(std::io::Error::new(
                    e.kind(),
                    format!("the detector state of parent shard {parent} ({key}){what}: {e}"),
                ))
            };
            let bytes = lake.read(&key).await.map_err(|e| damaged(e, ""))?;
            from.push(
                detect
                    .inheritance_of_snapshot(&bytes)
                    .map_err(|e| damaged(e, " is damaged"))?,
            );
        }
        let series: usize = from.iter().flatten().map(|m| m.len()).sum();
        detect.inherit(child.clone(), from);
        tracing::info!(shard_id = %child, ?parents, series, "the child shard's detectors start from its parents' state");
        Ok(())
    }

    /// Writes the detectors' alerts (to the table, the notifiers and the console).
    async fn raise(&mut self, raised: Vec<Raised>, now: i64) -> Result<(), EngineError> {
        let Some(detect) = &mut self.detect else {
            return Ok(());
        };
        Metrics::add(&self.metrics.detector_series_evicted, detect.take_evicted());
        if raised.is_empty() {
            return Ok(());
        }
        let batch = detect_alert_batch(self.alerts.schema(), detect, &raised);
        self.deliver(&batch, now).await
    }
    async fn run_rules(
        &mut self,
        rules: &[Rule],
        kind: &str,
        batch: &RecordBatch,
        time_col: usize,
        now: i64,
    ) -> Result<(), EngineError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        for rule in rules {
            let value = rule
                .expr
                .evaluate(batch)
                .and_then(|v| v.into_array(batch.num_rows()));
            let mask = match value {
                Ok(v) => v
                    .as_any()
                    .downcast_ref::<BooleanArray>()
                    .cloned()
                    .unwrap_or_else(|| BooleanArray::from(vec![false; batch.num_rows()])),
                Err(e) => {
                    tracing::warn!(rule = %rule.name, error = %e, "alert rule failed on a batch; its rows are not alerted");
                    continue;
                }
            };
            if mask.true_count() == 0 {
                continue;
            }
            let hits = filter_record_batch(batch, &mask).expect("filter");
            let alerts = alert_batch(
                self.alerts.schema(),
                &rule.name,
                kind,
                &hits,
                time_col,
                self.key_field.as_deref(),
            );
            self.deliver(&alerts, now).await?;
        }
        Ok(())
    }

    async fn deliver(&mut self, alerts: &RecordBatch, now: i64) -> Result<(), EngineError> {
        Metrics::add(&self.metrics.alerts, alerts.num_rows() as u64);
        if let Some(n) = &self.notify {
            n.offer(alerts);
        }
        if let Some((live, cols)) = &self.live {
            live.alerts(alerts, cols.tenant.as_deref());
        }
        self.alerts
            .write(alerts, self.committed.commit_id + 1, &self.worker, now)
            .await?;
        Ok(())
    }

    fn writers(&mut self) -> impl Iterator<Item = &mut OutputWriter> {
        self.raw
            .as_mut()
            .into_iter()
            .chain([&mut self.dead, &mut self.late, &mut self.alerts])
            .chain(self.aggs.iter_mut().map(|a| &mut a.writer))
    }

    /// True when a table's open file is big enough, or its data old enough, to commit (each
    /// table by its own rollover), or reads are older than the pipeline's `max_age`.
    pub fn should_commit(&mut self) -> bool {
        let now = self.clock.now_us();
        // Reads that only went into open windows still need their checkpoints to move.
        let aged = self
            .uncommitted_since
            .is_some_and(|t| now - t >= self.p.rollover.max_age.as_micros() as i64);
        aged || self.writers().any(|w| w.due(now))
    }

    /// Stage → prepare → publish → commit. Returns the files the commit published.
    pub async fn commit(&mut self) -> Result<Vec<StagedFile>, EngineError> {
        // Nothing read and nothing written (windows emitted by `finish` or `tick` are written
        // without a read) since the last commit: nothing to do.
        if self.uncommitted_since.is_none() && self.writers().all(|w| w.is_empty()) {
            return Ok(Vec::new());
        }
        let started = std::time::Instant::now();
        let metrics = self.metrics.clone();
        let _running = metrics.commit_running();
        let mut files = Vec::new();
        for w in self.writers() {
            files.extend(w.stage().await?);
        }
        if self.detect.is_some() {
            // A child that ended without a record of its own still hands its parents'
            // series on to its children.
            self.restore_detectors().await?;
            let ended: Vec<Arc<str>> = (self.uninherited.iter())
                .filter(|s| self.shards.get(*s).is_some_and(|r| r.ended))
                .cloned()
                .collect();
            for child in ended {
                self.inherit_detectors(&child).await?;
                if let Some(detect) = &mut self.detect {
                    detect.end(&child);
                }
            }
        }
        let snapshots = self.stage_snapshots(&mut files).await?;
        failpoint::hit("after_stage");
        let next = self.next_state(&snapshots);
        let intent = commit::commit(
            &self.lakes,
            self.store.as_ref(),
            &self.worker,
            &self.committed,
            files,
            next,
        )
        .await?;
        Metrics::add(&self.metrics.commits, 1);
        let tables = || intent.files.iter().filter(|f| f.output != STATE_OUTPUT);
        Metrics::add(&self.metrics.files_written, tables().count() as u64);
        Metrics::add(&self.metrics.bytes_written, tables().map(|f| f.bytes).sum());
        self.metrics
            .committed(tables().map(|f| (f.output.as_str(), f.rows, f.bytes)));
        self.metrics
            .commit_seconds
            .lock()
            .expect("not poisoned")
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            commit = intent.next.commit_id,
            files = intent.files.len(),
            rows = intent.files.iter().map(|f| f.rows).sum::<u64>(),
            "committed"
        );
        let replaced: Vec<String> = snapshots
            .keys()
            .filter_map(|shard| self.committed.shards.get(&**shard)?.detectors.clone())
            .collect();
        self.committed = intent.next.clone();
        self.uncommitted_since = None;
        commit::sweep(&self.lakes, &self.worker).await;
        // No checkpoint names the snapshots this commit replaced.
        if let Ok(lake) = self.lakes.get(STATE_OUTPUT) {
            for key in replaced {
                if let Err(e) = lake.remove(&key).await {
                    tracing::warn!(%key, error = %e, "could not remove a replaced detector snapshot (nothing names it)");
                }
            }
        }
        Ok(intent
            .files
            .into_iter()
            .filter(|f| f.output != STATE_OUTPUT)
            .collect())
    }

    /// Stages a snapshot of every shard whose detector state changed; returns their keys.
    async fn stage_snapshots(
        &mut self,
        files: &mut Vec<StagedFile>,
    ) -> Result<BTreeMap<Arc<str>, String>, EngineError> {
        let mut keys = BTreeMap::new();
        let Some(detect) = self.detect.as_mut() else {
            return Ok(keys);
        };
        let snapshots = detect.snapshots();
        if snapshots.is_empty() {
            return Ok(keys);
        }
        let lake = self.lakes.get(STATE_OUTPUT).map_err(EngineError::Lake)?;
        let commit = self.committed.commit_id + 1;
        for (shard, bytes) in snapshots {
            let key = format!(
                "{STATE_OUTPUT}/{}/{}/state-{commit:010}-{}-0000.json.zst",
                self.p.name,
                path_safe(&shard),
                self.worker
            );
            let size = bytes.len() as u64;
            let mut staging = lake.stage(&key).await.map_err(EngineError::Lake)?;
            staging
                .write(bytes::Bytes::from(bytes))
                .await
                .map_err(EngineError::Lake)?;
            let upload = staging.finish().await.map_err(EngineError::Lake)?;
            files.push(StagedFile {
                output: STATE_OUTPUT.to_string(),
                key: key.clone(),
                rows: 0,
                bytes: size,
                upload,
                stats: None,
            });
            Metrics::add(&self.metrics.detector_snapshots, 1);
            keys.insert(shard, key);
        }
        Ok(keys)
    }

    fn next_state(&mut self, snapshots: &BTreeMap<Arc<str>, String>) -> Committed {
        let mut shards = BTreeMap::new();
        for (shard, run) in &self.shards {
            let before = self
                .committed
                .shards
                .get(&**shard)
                .cloned()
                .unwrap_or_default();
            // Replayed records were committed already: never move a checkpoint back.
            let records = run.read_to.clone().max(before.records.clone());
            let mut aggregations = BTreeMap::new();
            let mut emitted_through = BTreeMap::new();
            for agg in &self.aggs {
                let floor = before.emitted_through.get(&agg.name).copied();
                if let Some(t) = agg.emitted_through.max(floor) {
                    emitted_through.insert(agg.name.clone(), t);
                }
                let buffered = agg
                    .buffer
                    .iter()
                    .filter(|b| b.shard == *shard)
                    .map(|b| &b.resume_from);
                let folded = agg.folded.values().filter_map(|f| f.resume.get(shard));
                let oldest = buffered.chain(folded).min().cloned();
                aggregations.insert(
                    agg.name.clone(),
                    oldest.unwrap_or_else(|| run.read_to.clone()),
                );
            }
            let cp = ShardCheckpoint {
                ended: before.ended || (run.ended && records == run.read_to),
                records,
                aggregations,
                max_event_time: self.watermark.max_event(shard),
                emitted_through,
                detectors: snapshots.get(shard).cloned().or(before.detectors),
            };
            shards.insert(shard.to_string(), cp);
        }
        // Shards not read in this run keep their checkpoints.
        for (shard, cp) in &self.committed.shards {
            shards.entry(shard.clone()).or_insert_with(|| cp.clone());
        }
        let now = self.clock.now_us();
        Committed {
            commit_id: self.committed.commit_id + 1,
            shards,
            emitted_through: self
                .aggs
                .iter()
                .filter_map(|a| a.emitted_through.map(|t| (a.name.clone(), t)))
                .collect(),
            watermark: self.watermark.current(now),
        }
    }
}

/// A shard id as one path segment: every byte but `[A-Za-z0-9._-]` as `%XX`.
fn path_safe(shard: &str) -> String {
    let mut out = String::with_capacity(shard.len());
    for b in shard.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-') || (b == b'.' && !out.is_empty()) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(super) fn event_times(batch: &RecordBatch, col: usize) -> &TimestampMicrosecondArray {
    batch
        .column(col)
        .as_any()
        .downcast_ref()
        .expect("event time is a microsecond timestamp")
}

pub(super) fn min_max(ts: &TimestampMicrosecondArray) -> (i64, i64) {
    let lo = arrow::compute::min(ts).unwrap_or(0);
    let hi = arrow::compute::max(ts).unwrap_or(0);
    (lo, hi)
}
