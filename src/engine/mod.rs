//! The pipeline's core, driven one decoded chunk at a time: raw and dead-letter rows are
//! written, each aggregation buffers the records of its open windows and, once it holds
//! `limits.window_buffer_records` of them, folds them into one aggregate state per window and
//! group (the parts of [`merge`]); a window is emitted through its SQL, over its buffered
//! records and its folded parts, once the watermark passes its end. Alert rules run, and
//! [`Engine::commit`] makes everything durable with the two-phase commit of DESIGN.md.
//!
//! Replay is how open windows survive a restart: each aggregation's checkpoint is where the
//! records of its oldest open window start, buffered or folded. Every output skips what it
//! already committed (the record outputs by sequence number; an aggregation by
//! `emitted_through`), so reading the same records again never writes them twice.

pub mod merge;
pub mod sql;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::prelude::SessionContext;

use crate::checkpoint::{CheckpointStore, Committed, Intent, ShardCheckpoint, StoreError};
use crate::clock::Clock;
use crate::columns;
use crate::config::{ConfigError, Pipeline};
use crate::decode::{DeadLetter, Decoded};
use crate::failpoint;
use crate::metrics::Metrics;
use crate::notify::Notifications;
use crate::record::{Position, SeqNo};
use crate::sink::writer::{OutputWriter, Table, WriteError};
use crate::sink::{Lakes, StagedFile};
use crate::window::{Watermark, WindowSpec};
use futures::{StreamExt, TryStreamExt};
use sql::{Compiled, Rule, WINDOW_START};

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

/// Records of one chunk kept for an aggregation's open windows.
struct Buffered {
    shard: Arc<str>,
    resume_from: Position,
    batch: RecordBatch,
    /// Earliest window end of any row: nothing here is due before it.
    min_first_end: i64,
    /// Latest window end of any row: the entry can go once that window is emitted.
    max_last_end: i64,
}

/// This worker's aggregate states of one window, folded from records no longer buffered.
#[derive(Default)]
struct Folded {
    /// State rows (the aggregation's stored schema), one or more per group.
    parts: Vec<RecordBatch>,
    /// Per shard: where replay must start to read this window's folded records again.
    resume: BTreeMap<Arc<str>, Position>,
}

/// Parts a window may gather before they are combined into one per group.
const MAX_PARTS: usize = 8;

struct AggState {
    name: String,
    spec: WindowSpec,
    emitted_through: Option<i64>,
    buffer: VecDeque<Buffered>,
    /// Rows in `buffer`.
    buffered: usize,
    /// Open windows folded into states, by window end (only for a mergeable SELECT).
    folded: BTreeMap<i64, Folded>,
    writer: OutputWriter,
    /// The record columns the SQL reads, and the event time (always), by index: buffered
    /// records keep only these.
    cols: Vec<usize>,
    /// The event time's index in `cols`.
    event_col: usize,
    /// The buffered columns and the window bounds: the `records` the queries read.
    input: SchemaRef,
    queries: Queries,
}

/// An aggregation's queries, planned once.
struct Queries {
    /// Over `records`: the parts when the SELECT can be merged, else the SELECT.
    stored: sql::Prepared,
    /// Over `records`: the SELECT, for window alerts when the parts are stored.
    select: Option<sql::Prepared>,
    /// Over parts: one part per window and group.
    combine: Option<sql::Prepared>,
    /// Over parts: the SELECT's rows, for window alerts.
    merge: Option<sql::Prepared>,
}

impl Queries {
    async fn plan(
        ctx: &SessionContext,
        sql: &str,
        merge: Option<&merge::Mergeable>,
        alerts: bool,
        input: &SchemaRef,
        parts: &SchemaRef,
    ) -> datafusion::error::Result<Self> {
        use sql::{PARTS_TABLE, Prepared, RECORDS_TABLE};
        let Some(m) = merge else {
            return Ok(Self {
                stored: Prepared::new(ctx, RECORDS_TABLE, input.clone(), sql).await?,
                select: None,
                combine: None,
                merge: None,
            });
        };
        let (select, merged) = match alerts {
            true => (
                Some(Prepared::new(ctx, RECORDS_TABLE, input.clone(), sql).await?),
                Some(
                    Prepared::new(
                        ctx,
                        PARTS_TABLE,
                        parts.clone(),
                        &m.merge_sql(PARTS_TABLE, &[]),
                    )
                    .await?,
                ),
            ),
            false => (None, None),
        };
        Ok(Self {
            stored: Prepared::new(ctx, RECORDS_TABLE, input.clone(), &m.state_sql).await?,
            select,
            combine: Some(
                Prepared::new(ctx, PARTS_TABLE, parts.clone(), &m.combine_sql(PARTS_TABLE)).await?,
            ),
            merge: merged,
        })
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
        let state = store.load().await?;
        for intent in &state.pending {
            tracing::info!(
                files = intent.files.len(),
                commit = intent.next.commit_id,
                shards = ?intent.next.shards.keys().collect::<Vec<_>>(),
                "completing a commit prepared earlier"
            );
            publish(&lakes, store.as_ref(), intent).await?;
        }
        let committed = state.committed;
        let removed = lakes
            .remove_orphans(worker, true)
            .await
            .map_err(EngineError::Lake)?;
        if removed > 0 {
            tracing::info!(removed, "removed staged files no commit names");
        }
        let mut watermark = Watermark::new(
            p.event_time.allowed_lateness,
            p.event_time.idle_shard_timeout.as_micros() as i64,
        );
        if let Some(w) = committed.watermark {
            watermark.set_floor(w);
        }
        let event_field = p
            .schema
            .fields
            .iter()
            .position(|f| f.name == p.event_time.field)
            .expect("validated");
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
            Ok(OutputWriter::new(name, schema, col, rollover, lake, kind))
        };
        let mut aggs = Vec::new();
        for (i, a) in p.outputs.aggregations.iter().enumerate() {
            let merge = compiled.agg_merge[i].as_ref();
            let planned = |source| EngineError::Query {
                name: a.name.clone(),
                source,
            };
            let mut sqls = vec![a.sql.as_str()];
            sqls.extend(merge.map(|m| m.state_sql.as_str()));
            let read = sql::columns_read(
                &ctx,
                &compiled.agg_input,
                compiled.records.fields().len(),
                &sqls,
            )
            .await
            .map_err(planned)?;
            let writer = writer(&a.name, WINDOW_START, Table::Aggregates)?;
            let alerts = !compiled.window_rules[i].is_empty();
            let every: Vec<usize> = (0..compiled.records.fields().len()).collect();
            // The columns come from the optimised plans; the queries are planned from their
            // text, which may name a column the optimiser dropped (a CTE's unused column):
            // then the buffers keep every column, as before.
            let mut planned_over = None;
            for mut cols in [read, every] {
                if let Err(at) = cols.binary_search(&event_field) {
                    cols.insert(at, event_field);
                }
                let input = aggregation_input(&compiled.agg_input, &cols);
                let queries =
                    Queries::plan(&ctx, &a.sql, merge, alerts, &input, writer.schema()).await;
                let fits = |q: &Queries| {
                    q.stored.schema().is_none_or(|s| {
                        s.fields().iter().map(|f| f.name()).eq(writer
                            .schema()
                            .fields()
                            .iter()
                            .map(|f| f.name()))
                    })
                };
                match queries {
                    Ok(q) if fits(&q) => {
                        planned_over = Some((cols, input, q));
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if cols.len() == compiled.records.fields().len() => {
                        return Err(planned(e));
                    }
                    Err(_) => {}
                }
            }
            let (cols, input, queries) = planned_over.ok_or_else(|| {
                planned(datafusion::error::DataFusionError::Plan(
                    "the stored columns do not match the table's".into(),
                ))
            })?;
            let event_col = cols.binary_search(&event_field).expect("inserted");
            aggs.push(AggState {
                name: a.name.clone(),
                spec: WindowSpec {
                    size: a.size,
                    slide: a.slide,
                },
                emitted_through: committed.emitted_through.get(&a.name).copied(),
                buffer: VecDeque::new(),
                buffered: 0,
                folded: BTreeMap::new(),
                writer,
                cols,
                event_col,
                input,
                queries,
            });
        }
        for (a, m) in p.outputs.aggregations.iter().zip(&compiled.agg_merge) {
            if m.is_none() {
                tracing::warn!(
                    aggregation = %a.name,
                    "this SELECT cannot be merged, so its open windows' records stay in memory until each window closes (limits.window_buffer_records does not bound it)"
                );
            }
        }
        Ok(Self {
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

    /// Starts tracking a shard; returns the position to read it from.
    pub fn add_shard(&mut self, shard: Arc<str>) -> Position {
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

    /// The shard has nothing more to read for now; after `idle_shard_timeout` of that, it
    /// stops holding the watermark.
    pub fn shard_caught_up(&mut self, shard: &Arc<str>) {
        self.watermark.caught_up(shard, self.clock.now_us());
    }

    /// The shard is closed and every record of it was handed over: the next commit records it.
    pub fn shard_ended(&mut self, shard: &Arc<str>) {
        if let Some(run) = self.shards.get_mut(shard) {
            run.ended = true;
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
        let cut = match &skip {
            None => 0,
            Some(s) => partition_point(n, |i| SeqNo(d.seq(i).to_string()) <= *s),
        };
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
        }
        let rules = self.compiled.record_rules.clone();
        let event_field = self.event_field;
        self.run_rules(&rules, "record", &fresh, event_field, now)
            .await?;

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
            let emitted = agg.emitted_through.max(floor);
            let (late_mask, keep_mask) = classify(&agg.spec, emitted, ts, cut);
            if let Some(mask) = late_mask {
                let late = filter_record_batch(&d.batch, &mask).expect("filter");
                if late.num_rows() > 0 {
                    Metrics::add(&self.metrics.late_records, late.num_rows() as u64);
                    let batch = with_aggregation(&late_schema, &agg.name, &late);
                    self.late.write(&batch, epoch, &self.worker, now).await?;
                }
            }
            // Replay for this buffer starts just before its first kept row, not at the chunk.
            let first_kept = keep_mask
                .as_ref()
                .map_or(Some(0), |m| m.values().set_indices().next());
            let resume_from = match first_kept {
                Some(0) | None => d.resume_from.clone(),
                Some(k) => Some(SeqNo(d.seq(k - 1).to_string())),
            };
            let read = d.batch.project(&agg.cols).expect("columns of the batch");
            let kept = match keep_mask {
                Some(mask) => filter_record_batch(&read, &mask).expect("filter"),
                None => read,
            };
            if kept.num_rows() > 0 {
                let kts = event_times(&kept, agg.event_col);
                let (lo, hi) = min_max(kts);
                agg.buffered += kept.num_rows();
                agg.buffer.push_back(Buffered {
                    shard: d.shard.clone(),
                    resume_from,
                    batch: kept,
                    min_first_end: agg.spec.first_end(lo),
                    max_last_end: agg.spec.last_end(hi),
                });
            }
        }
        for i in 0..self.aggs.len() {
            if self.aggs[i].buffered >= self.p.window_buffer_records
                && self.compiled.agg_merge[i].is_some()
            {
                self.fold(i).await?;
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
            let rows = window_rows(agg, lo, hi, &self.committed);
            // Windows up to `hi` that were folded already: their parts are combined with the
            // parts of the rows still buffered.
            let agg = &mut self.aggs[i];
            let open = agg.folded.split_off(&(hi + 1));
            let due = std::mem::replace(&mut agg.folded, open);
            let folded: Vec<RecordBatch> = due.into_values().flat_map(|f| f.parts).collect();
            if !rows.is_empty() || !folded.is_empty() {
                let name = agg.name.clone();
                let query = |source| EngineError::Query {
                    name: name.clone(),
                    source,
                };
                let merge = self.compiled.agg_merge[i].clone();
                let rules = self.compiled.window_rules[i].clone();
                // The lake gets this worker's part of each window (or the SELECT's rows when
                // they cannot be merged); alerts read the SELECT's rows over what it read.
                let mut stored = Vec::new();
                let mut finals = Vec::new();
                let q = &self.aggs[i].queries;
                if !rows.is_empty() {
                    let select = q.select.as_ref().filter(|_| folded.is_empty());
                    if let Some(select) = select {
                        finals = select.run(&self.ctx, rows.clone()).await.map_err(query)?;
                    }
                    stored = q.stored.run(&self.ctx, rows).await.map_err(query)?;
                    if merge.is_none() {
                        finals = stored.clone();
                    }
                }
                if merge.is_some() && !folded.is_empty() {
                    stored.extend(folded);
                    stored = self.combine(i, stored).await.map_err(query)?;
                    if let Some(m) = &self.aggs[i].queries.merge {
                        finals = m.run(&self.ctx, stored.clone()).await.map_err(query)?;
                    }
                }
                let epoch = self.committed.commit_id + 1;
                for batch in &stored {
                    Metrics::add(&self.metrics.windows_emitted, batch.num_rows() as u64);
                    self.aggs[i]
                        .writer
                        .write(batch, epoch, &self.worker, now)
                        .await?;
                }
                for batch in &finals {
                    let ws = batch.schema().index_of(WINDOW_START).expect("validated");
                    self.run_rules(&rules, "window", batch, ws, now).await?;
                }
            }
            let agg = &mut self.aggs[i];
            let through = lo.map_or(hi, |lo| lo.max(hi));
            agg.emitted_through = Some(through);
            agg.buffer.retain(|b| b.max_last_end > through);
            agg.buffered = agg.buffer.iter().map(|b| b.batch.num_rows()).sum();
        }
        Ok(())
    }

    /// Folds every buffered record of aggregation `i` into its open windows' states, so the
    /// records can go: what keeps memory bounded by `limits.window_buffer_records` and the
    /// number of open windows and groups, not by the read rate.
    async fn fold(&mut self, i: usize) -> Result<(), EngineError> {
        let agg = &self.aggs[i];
        let (spec, lo, event_col) = (agg.spec, agg.emitted_through, agg.event_col);
        let rows = window_rows(agg, lo, i64::MAX, &self.committed);
        let name = agg.name.clone();
        let query = |source| EngineError::Query {
            name: name.clone(),
            source,
        };
        let mut states = Vec::new();
        if !rows.is_empty() {
            states = agg
                .queries
                .stored
                .run(&self.ctx, rows)
                .await
                .map_err(query)?;
        }
        let agg = &mut self.aggs[i];
        // Every window a buffered entry's records fall in keeps the entry's replay position,
        // so a restart reads them again while the window is open.
        for b in std::mem::take(&mut agg.buffer) {
            let mut ends = std::collections::BTreeSet::new();
            let mut previous = None;
            for t in event_times(&b.batch, event_col).iter().flatten() {
                let first = spec.first_end(t);
                if previous.replace(first) != Some(first) {
                    ends.extend((0..spec.per_record() as i64).map(|k| first + k * spec.slide));
                }
            }
            for end in ends.into_iter().filter(|&e| lo.is_none_or(|lo| e > lo)) {
                let resume = &mut agg.folded.entry(end).or_default().resume;
                let oldest = resume
                    .entry(b.shard.clone())
                    .or_insert_with(|| b.resume_from.clone());
                if b.resume_from < *oldest {
                    *oldest = b.resume_from.clone();
                }
            }
        }
        agg.buffered = 0;
        let mut touched = std::collections::BTreeSet::new();
        for batch in states {
            for (end, part) in by_window_end(&batch, spec.size) {
                agg.folded.entry(end).or_default().parts.push(part);
                touched.insert(end);
            }
        }
        for end in touched {
            if self.aggs[i].folded[&end].parts.len() > MAX_PARTS {
                let parts = std::mem::take(
                    &mut self.aggs[i]
                        .folded
                        .get_mut(&end)
                        .expect("just touched")
                        .parts,
                );
                let one = self.combine(i, parts).await.map_err(query)?;
                self.aggs[i]
                    .folded
                    .get_mut(&end)
                    .expect("just touched")
                    .parts = one;
            }
        }
        Ok(())
    }

    /// One part per window and group from several, in the aggregation's stored schema.
    async fn combine(
        &self,
        i: usize,
        parts: Vec<RecordBatch>,
    ) -> datafusion::error::Result<Vec<RecordBatch>> {
        let agg = &self.aggs[i];
        let combine = agg.queries.combine.as_ref().expect("a mergeable SELECT");
        let schema = agg.writer.schema();
        combine
            .run(&self.ctx, parts)
            .await?
            .iter()
            .map(|b| conform(b, schema))
            .collect()
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
            Metrics::add(&self.metrics.alerts, alerts.num_rows() as u64);
            if let Some(n) = &self.notify {
                n.offer(&alerts);
            }
            self.alerts
                .write(&alerts, self.committed.commit_id + 1, &self.worker, now)
                .await?;
        }
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
        failpoint::hit("after_stage");
        let next = self.next_state();
        let intent = Intent {
            id: format!("{}-{}", self.worker, next.commit_id),
            files,
            next,
        };
        self.store.prepare(&self.committed, &intent).await?;
        failpoint::hit("after_prepare");
        publish(&self.lakes, self.store.as_ref(), &intent).await?;
        Metrics::add(&self.metrics.commits, 1);
        Metrics::add(&self.metrics.files_written, intent.files.len() as u64);
        Metrics::add(
            &self.metrics.bytes_written,
            intent.files.iter().map(|f| f.bytes).sum(),
        );
        self.metrics.committed(
            intent
                .files
                .iter()
                .map(|f| (f.output.as_str(), f.rows, f.bytes)),
        );
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
        self.committed = intent.next.clone();
        self.uncommitted_since = None;
        // Every open file was just published; nothing is staged until the next write.
        match self.lakes.remove_orphans(&self.worker, false).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "aborted uploads that retries left behind"),
            Err(e) => {
                tracing::warn!(error = %e, "could not sweep staged uploads; the next start will")
            }
        }
        Ok(intent.files)
    }

    fn next_state(&mut self) -> Committed {
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

/// Files published at once (S3 completes uploads in parallel).
const PUBLISH_CONCURRENCY: usize = 8;

/// Publishes an intent's files, then commits it. Recovery calls exactly this.
pub async fn publish(
    lakes: &Lakes,
    store: &dyn CheckpointStore,
    intent: &Intent,
) -> Result<(), EngineError> {
    if let Some((first, rest)) = intent.files.split_first() {
        lakes.publish(first).await.map_err(EngineError::Lake)?;
        failpoint::hit("after_publish_file");
        futures::stream::iter(rest.iter().map(|f| lakes.publish(f)))
            .buffer_unordered(PUBLISH_CONCURRENCY)
            .try_collect::<()>()
            .await
            .map_err(EngineError::Lake)?;
    }
    failpoint::hit("after_publish");
    store.commit(intent).await?;
    failpoint::hit("after_commit");
    Ok(())
}

fn partition_point(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if pred(mid) { lo = mid + 1 } else { hi = mid }
    }
    lo
}

fn event_times(batch: &RecordBatch, col: usize) -> &TimestampMicrosecondArray {
    batch
        .column(col)
        .as_any()
        .downcast_ref()
        .expect("event time is a microsecond timestamp")
}

fn min_max(ts: &TimestampMicrosecondArray) -> (i64, i64) {
    let lo = arrow::compute::min(ts).unwrap_or(0);
    let hi = arrow::compute::max(ts).unwrap_or(0);
    (lo, hi)
}

/// Which rows are late (their earliest window was emitted; only rows from `cut` on, the
/// ones not committed before) and which still belong to an open window. None: all or none.
fn classify(
    spec: &WindowSpec,
    emitted: Option<i64>,
    ts: &TimestampMicrosecondArray,
    cut: usize,
) -> (Option<BooleanArray>, Option<BooleanArray>) {
    let Some(e) = emitted else {
        return (None, None);
    };
    // Usually the oldest row alone says: nothing is late, everything is kept.
    let oldest = (ts.null_count() == 0)
        .then(|| arrow::compute::min(ts))
        .flatten();
    let late = match oldest {
        Some(t) if spec.first_end(t) > e => None,
        _ => {
            let late: BooleanArray = ts
                .iter()
                .enumerate()
                .map(|(i, t)| Some(i >= cut && t.is_some_and(|t| spec.first_end(t) <= e)))
                .collect();
            (late.true_count() > 0).then_some(late)
        }
    };
    let keep = match oldest {
        Some(t) if spec.last_end(t) > e => None,
        _ => {
            let keep: BooleanArray = ts
                .iter()
                .map(|t| Some(t.is_some_and(|t| spec.last_end(t) > e)))
                .collect();
            (keep.true_count() < ts.len()).then_some(keep)
        }
    };
    (late, keep)
}

/// The buffered rows of windows ending in `(lo, hi]`, each with that window's bounds; a row
/// of a hopping window appears once per window.
///
/// A shard that came from another worker may have emitted further than this worker (its
/// checkpoint's `emitted_through`): its rows skip the windows it emitted there.
fn window_rows(
    agg: &AggState,
    lo: Option<i64>,
    hi: i64,
    committed: &Committed,
) -> Vec<RecordBatch> {
    let spec = agg.spec;
    let mut out = Vec::new();
    for b in agg.buffer.iter().filter(|b| b.min_first_end <= hi) {
        let floor = committed
            .shards
            .get(&*b.shard)
            .and_then(|c| c.emitted_through.get(&agg.name))
            .copied();
        let lo = lo.max(floor);
        let ts = event_times(&b.batch, agg.event_col);
        for k in 0..spec.per_record() as i64 {
            let mut starts = Vec::with_capacity(ts.len());
            let mask: BooleanArray = ts
                .iter()
                .map(|t| {
                    let t = t.unwrap_or(i64::MIN / 2);
                    let start = spec.first_start(t) + k * spec.slide;
                    let end = start + spec.size;
                    let hit = end <= hi && lo.is_none_or(|lo| end > lo);
                    if hit {
                        starts.push(start);
                    }
                    Some(hit)
                })
                .collect();
            if starts.is_empty() {
                continue;
            }
            let rows = match starts.len() == ts.len() {
                true => b.batch.clone(),
                false => filter_record_batch(&b.batch, &mask).expect("filter"),
            };
            let end: ArrayRef = Arc::new(
                TimestampMicrosecondArray::from(
                    starts.iter().map(|s| s + spec.size).collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            );
            let start: ArrayRef =
                Arc::new(TimestampMicrosecondArray::from(starts).with_timezone("UTC"));
            let mut cols = rows.columns().to_vec();
            cols.push(start);
            cols.push(end);
            out.push(
                RecordBatch::try_new(agg.input.clone(), cols)
                    .expect("window rows match the aggregation input"),
            );
        }
    }
    out
}

/// What an aggregation's queries read as `records`: the record columns `cols` (by index) and
/// the window bounds.
fn aggregation_input(agg_input: &SchemaRef, cols: &[usize]) -> SchemaRef {
    let fields = agg_input.fields();
    let bounds = fields.len() - 2;
    let mut kept: Vec<_> = cols.iter().map(|&c| fields[c].clone()).collect();
    kept.extend(fields[bounds..].iter().cloned());
    Arc::new(arrow::datatypes::Schema::new(kept))
}

/// A batch of state rows split by window end (`window_start` + `size`).
fn by_window_end(batch: &RecordBatch, size: i64) -> Vec<(i64, RecordBatch)> {
    let ws = batch.schema().index_of(WINDOW_START).expect("validated");
    let starts = event_times(batch, ws);
    let mut rows: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for (r, s) in starts.iter().enumerate() {
        let s = s.expect("window_start is never null");
        rows.entry(s + size).or_default().push(r as u32);
    }
    if rows.len() == 1 {
        let end = *rows.keys().next().expect("one");
        return vec![(end, batch.clone())];
    }
    rows.into_iter()
        .map(|(end, idx)| {
            let idx = arrow::array::UInt32Array::from(idx);
            let part = arrow::compute::take_record_batch(batch, &idx).expect("indices in range");
            (end, part)
        })
        .collect()
}

/// The batch with `schema`'s types (a sum over parts can widen a column's type).
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> datafusion::error::Result<RecordBatch> {
    let cols = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| cast(c, f.data_type()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

fn with_aggregation(schema: &SchemaRef, name: &str, batch: &RecordBatch) -> RecordBatch {
    let agg: StringArray = std::iter::repeat_n(Some(name), batch.num_rows()).collect();
    let mut cols: Vec<ArrayRef> = vec![Arc::new(agg)];
    cols.extend(batch.columns().iter().cloned());
    RecordBatch::try_new(schema.clone(), cols).expect("late schema")
}

fn dead_letter_batch(shard: &str, arrival_us: i64, dead: &[&DeadLetter]) -> RecordBatch {
    let n = dead.len();
    let arrival = TimestampMicrosecondArray::from(vec![arrival_us; n]).with_timezone("UTC");
    let shard: StringArray = std::iter::repeat_n(Some(shard), n).collect();
    let seq: StringArray = dead.iter().map(|d| Some(d.seq.0.as_str())).collect();
    let reasons: Vec<String> = dead.iter().map(|d| d.reason.to_string()).collect();
    let kind: StringArray = reasons.iter().map(|r| r.split(':').next()).collect();
    let reason: StringArray = reasons.iter().map(|r| Some(r.as_str())).collect();
    let raw: BinaryArray = dead.iter().map(|d| Some(d.raw.as_slice())).collect();
    RecordBatch::try_new(
        sql::dead_letter_schema(),
        vec![
            Arc::new(arrival),
            Arc::new(shard),
            Arc::new(seq),
            Arc::new(kind),
            Arc::new(reason),
            Arc::new(raw),
        ],
    )
    .expect("dead-letter schema")
}

fn alert_batch(
    schema: &SchemaRef,
    rule: &str,
    kind: &str,
    hits: &RecordBatch,
    time_col: usize,
    key: Option<&str>,
) -> RecordBatch {
    let n = hits.num_rows();
    let rules: StringArray = std::iter::repeat_n(Some(rule), n).collect();
    let kinds: StringArray = std::iter::repeat_n(Some(kind), n).collect();
    let time = hits.column(time_col).clone();
    let keys: ArrayRef = match key.and_then(|k| hits.column_by_name(k)) {
        Some(col) => cast(col, &DataType::Utf8).expect("any column casts to text"),
        None => Arc::new(StringArray::new_null(n)),
    };
    let mut json = Vec::new();
    {
        let mut w = arrow::json::LineDelimitedWriter::new(&mut json);
        w.write(hits).expect("json");
        w.finish().expect("json");
    }
    let detail: StringArray = String::from_utf8_lossy(&json).lines().map(Some).collect();
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(rules),
            Arc::new(kinds),
            time,
            keys,
            Arc::new(detail),
        ],
    )
    .expect("alerts schema")
}
