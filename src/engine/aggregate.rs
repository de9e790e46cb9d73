//! One aggregation's state: the records of its open windows (buffered, or folded into
//! aggregate states once `limits.window_buffer_records` is reached), its prepared queries,
//! and the arithmetic that picks a window's rows.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, TimestampMicrosecondArray};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::SchemaRef;
use datafusion::prelude::SessionContext;

use super::sql::{Compiled, WINDOW_START};
use super::window::WindowSpec;
use super::{EngineError, event_times, merge, min_max, sql};
use crate::checkpoint::Committed;
use crate::config::Aggregation;
use crate::decode::Decoded;
use crate::record::{Position, SeqNo};
use crate::sink::writer::OutputWriter;

/// Records of one chunk kept for an aggregation's open windows.
pub(super) struct Buffered {
    pub(super) shard: Arc<str>,
    pub(super) resume_from: Position,
    pub(super) batch: RecordBatch,
    /// Earliest window end of any row: nothing here is due before it.
    pub(super) min_first_end: i64,
    /// Latest window end of any row: the entry can go once that window is emitted.
    pub(super) max_last_end: i64,
}

/// This worker's aggregate states of one window, folded from records no longer buffered.
#[derive(Default)]
pub(super) struct Folded {
    /// State rows (the aggregation's stored schema), one or more per group.
    pub(super) parts: Vec<RecordBatch>,
    /// Per shard: where replay must start to read this window's folded records again.
    pub(super) resume: BTreeMap<Arc<str>, Position>,
}

/// Parts a window may gather before they are combined into one per group.
const MAX_PARTS: usize = 8;

pub(super) struct AggState {
    pub(super) name: String,
    pub(super) spec: WindowSpec,
    pub(super) emitted_through: Option<i64>,
    pub(super) buffer: VecDeque<Buffered>,
    /// Rows in `buffer`.
    pub(super) buffered: usize,
    /// Open windows folded into states, by window end (only for a mergeable SELECT).
    pub(super) folded: BTreeMap<i64, Folded>,
    pub(super) writer: OutputWriter,
    /// The record columns the SQL reads, and the event time (always), by index: buffered
    /// records keep only these.
    pub(super) cols: Vec<usize>,
    /// The event time's index in `cols`.
    pub(super) event_col: usize,
    /// The buffered columns and the window bounds: the `records` the queries read.
    pub(super) input: SchemaRef,
    pub(super) queries: Queries,
}

/// An aggregation's queries, planned once.
pub(super) struct Queries {
    /// Over `records`: the parts when the SELECT can be merged, else the SELECT.
    pub(super) stored: sql::Prepared,
    /// Over `records`: the SELECT, for window alerts when the parts are stored.
    pub(super) select: Option<sql::Prepared>,
    /// Over parts: one part per window and group.
    pub(super) combine: Option<sql::Prepared>,
    /// Over parts: the SELECT's rows, for window alerts.
    pub(super) merge: Option<sql::Prepared>,
}

impl Queries {
    pub(super) async fn plan(
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

impl AggState {
    /// Plans aggregation `i`'s queries over the columns its SQL reads (every column when the
    /// optimised plan and the SQL disagree) and starts with empty buffers.
    pub(super) async fn open(
        ctx: &SessionContext,
        a: &Aggregation,
        i: usize,
        compiled: &Compiled,
        event_field: usize,
        writer: OutputWriter,
        emitted_through: Option<i64>,
    ) -> Result<Self, EngineError> {
        let merge = compiled.agg_merge[i].as_ref();
        let planned = |source| EngineError::Query {
            name: a.name.clone(),
            source,
        };
        let mut sqls = vec![a.sql.as_str()];
        sqls.extend(merge.map(|m| m.state_sql.as_str()));
        let read = sql::columns_read(
            ctx,
            &compiled.agg_input,
            compiled.records.fields().len(),
            &sqls,
        )
        .await
        .map_err(planned)?;
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
            let queries = Queries::plan(ctx, &a.sql, merge, alerts, &input, writer.schema()).await;
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
        Ok(Self {
            name: a.name.clone(),
            spec: WindowSpec {
                size: a.size,
                slide: a.slide,
            },
            emitted_through,
            buffer: VecDeque::new(),
            buffered: 0,
            folded: BTreeMap::new(),
            writer,
            cols,
            event_col,
            input,
            queries,
        })
    }

    /// Buffers the rows of chunk `d` that belong to an open window; returns those that are
    /// late (their earliest window was emitted; only rows from `cut` on, the ones not
    /// committed before). `floor`: how far the shard's previous owner emitted.
    pub(super) fn buffer(
        &mut self,
        d: &Decoded,
        ts: &TimestampMicrosecondArray,
        cut: usize,
        floor: Option<i64>,
    ) -> Option<RecordBatch> {
        let emitted = self.emitted_through.max(floor);
        let (late_mask, keep_mask) = classify(&self.spec, emitted, ts, cut);
        let late = late_mask
            .map(|mask| filter_record_batch(&d.batch, &mask).expect("filter"))
            .filter(|late| late.num_rows() > 0);
        // Replay for this buffer starts just before its first kept row, not at the chunk.
        let first_kept = keep_mask
            .as_ref()
            .map_or(Some(0), |m| m.values().set_indices().next());
        let resume_from = match first_kept {
            Some(0) | None => d.resume_from.clone(),
            Some(k) => Some(SeqNo(d.seq(k - 1).to_string())),
        };
        let read = d.batch.project(&self.cols).expect("columns of the batch");
        let kept = match keep_mask {
            Some(mask) => filter_record_batch(&read, &mask).expect("filter"),
            None => read,
        };
        if kept.num_rows() > 0 {
            let kts = event_times(&kept, self.event_col);
            let (lo, hi) = min_max(kts);
            self.buffered += kept.num_rows();
            self.buffer.push_back(Buffered {
                shard: d.shard.clone(),
                resume_from,
                batch: kept,
                min_first_end: self.spec.first_end(lo),
                max_last_end: self.spec.last_end(hi),
            });
        }
        late
    }

    /// The output of the windows ending in `(emitted_through, hi]`: the rows the lake gets
    /// (this worker's part of each window, or the SELECT's rows when they cannot be merged)
    /// and the SELECT's rows, which window alerts read. Takes those windows' folded parts.
    pub(super) async fn due(
        &mut self,
        ctx: &SessionContext,
        hi: i64,
        committed: &Committed,
        mergeable: bool,
    ) -> Result<(Vec<RecordBatch>, Vec<RecordBatch>), EngineError> {
        let rows = window_rows(self, self.emitted_through, hi, committed);
        // Windows up to `hi` that were folded already: their parts are combined with the
        // parts of the rows still buffered.
        let open = self.folded.split_off(&(hi + 1));
        let due = std::mem::replace(&mut self.folded, open);
        let folded: Vec<RecordBatch> = due.into_values().flat_map(|f| f.parts).collect();
        let name = self.name.clone();
        let query = |source| EngineError::Query {
            name: name.clone(),
            source,
        };
        let mut stored = Vec::new();
        let mut finals = Vec::new();
        let q = &self.queries;
        if !rows.is_empty() {
            let select = q.select.as_ref().filter(|_| folded.is_empty());
            if let Some(select) = select {
                finals = select.run(ctx, rows.clone()).await.map_err(query)?;
            }
            stored = q.stored.run(ctx, rows).await.map_err(query)?;
            if !mergeable {
                finals = stored.clone();
            }
        }
        if mergeable && !folded.is_empty() {
            stored.extend(folded);
            stored = self.combine(ctx, stored).await.map_err(query)?;
            if let Some(m) = &self.queries.merge {
                finals = m.run(ctx, stored.clone()).await.map_err(query)?;
            }
        }
        Ok((stored, finals))
    }

    /// Every window through `hi` is emitted: buffered records no open window needs go.
    pub(super) fn emitted(&mut self, hi: i64) {
        let through = self.emitted_through.map_or(hi, |lo| lo.max(hi));
        self.emitted_through = Some(through);
        self.buffer.retain(|b| b.max_last_end > through);
        self.buffered = self.buffer.iter().map(|b| b.batch.num_rows()).sum();
    }

    /// Folds every buffered record of the aggregation into its open windows' states, so the
    /// records can go: what keeps memory bounded by `limits.window_buffer_records` and the
    /// number of open windows and groups, not by the read rate.
    pub(super) async fn fold(
        &mut self,
        ctx: &SessionContext,
        committed: &Committed,
    ) -> Result<(), EngineError> {
        let (spec, lo, event_col) = (self.spec, self.emitted_through, self.event_col);
        let rows = window_rows(self, lo, i64::MAX, committed);
        let name = self.name.clone();
        let query = |source| EngineError::Query {
            name: name.clone(),
            source,
        };
        let mut states = Vec::new();
        if !rows.is_empty() {
            states = self.queries.stored.run(ctx, rows).await.map_err(query)?;
        }
        let agg = &mut *self;
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
            if self.folded[&end].parts.len() > MAX_PARTS {
                let parts =
                    std::mem::take(&mut self.folded.get_mut(&end).expect("just touched").parts);
                let one = self.combine(ctx, parts).await.map_err(query)?;
                self.folded.get_mut(&end).expect("just touched").parts = one;
            }
        }
        Ok(())
    }

    /// One part per window and group from several, in the aggregation's stored schema.
    pub(super) async fn combine(
        &self,
        ctx: &SessionContext,
        parts: Vec<RecordBatch>,
    ) -> datafusion::error::Result<Vec<RecordBatch>> {
        let combine = self.queries.combine.as_ref().expect("a mergeable SELECT");
        let schema = self.writer.schema();
        combine
            .run(ctx, parts)
            .await?
            .iter()
            .map(|b| conform(b, schema))
            .collect()
    }
}

/// Which rows are late (their earliest window was emitted; only rows from `cut` on, the
/// ones not committed before) and which still belong to an open window. None: all or none.
pub(super) fn classify(
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
pub(super) fn aggregation_input(agg_input: &SchemaRef, cols: &[usize]) -> SchemaRef {
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000_000;

    fn ts(values: &[Option<i64>]) -> TimestampMicrosecondArray {
        TimestampMicrosecondArray::from(values.to_vec()).with_timezone("UTC")
    }

    fn bits(mask: &Option<BooleanArray>) -> Option<Vec<bool>> {
        mask.as_ref()
            .map(|m| m.iter().map(|b| b.unwrap_or(false)).collect())
    }

    #[test]
    fn nothing_is_late_before_a_window_was_emitted() {
        let spec = WindowSpec {
            size: MIN,
            slide: MIN,
        };
        let (late, keep) = classify(&spec, None, &ts(&[Some(0), Some(5 * MIN)]), 0);
        assert_eq!((bits(&late), bits(&keep)), (None, None));
    }

    #[test]
    fn rows_of_emitted_windows_are_late_from_the_cut_and_not_kept() {
        let spec = WindowSpec {
            size: MIN,
            slide: MIN,
        };
        // Windows ending at or before 2 min were emitted.
        let rows = ts(&[Some(30_000_000), Some(2 * MIN + 1), Some(MIN), None]);
        let (late, keep) = classify(&spec, Some(2 * MIN), &rows, 1);
        // Row 0 is late for an emitted window but was committed before the cut: not late
        // again. Row 2 (at 1 min) falls in the window ending at 2 min: late.
        assert_eq!(bits(&late), Some(vec![false, false, true, false]));
        assert_eq!(bits(&keep), Some(vec![false, true, false, false]));
        // All rows newer than what was emitted: no masks at all.
        let newer = ts(&[Some(2 * MIN), Some(3 * MIN)]);
        let (late, keep) = classify(&spec, Some(2 * MIN), &newer, 0);
        assert_eq!((bits(&late), bits(&keep)), (None, None));
    }

    #[test]
    fn a_hopping_row_is_kept_while_any_of_its_windows_is_open() {
        // 5-minute windows every minute: a row at 1 min is in windows ending 2..=6 min.
        let spec = WindowSpec {
            size: 5 * MIN,
            slide: MIN,
        };
        let rows = ts(&[Some(MIN), Some(MIN)]);
        let (late, keep) = classify(&spec, Some(3 * MIN), &rows, 0);
        assert_eq!(bits(&late), Some(vec![true, true]));
        assert_eq!(
            bits(&keep),
            None,
            "still in the windows ending at 4, 5 and 6 min"
        );
        let (_, keep) = classify(&spec, Some(6 * MIN), &rows, 0);
        assert_eq!(bits(&keep), Some(vec![false, false]));
    }

    #[test]
    fn state_rows_split_by_window_end() {
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new(
                WINDOW_START,
                arrow::datatypes::DataType::Timestamp(
                    arrow::datatypes::TimeUnit::Microsecond,
                    Some("UTC".into()),
                ),
                false,
            ),
            arrow::datatypes::Field::new("n", arrow::datatypes::DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(ts(&[Some(0), Some(MIN), Some(0)])),
                Arc::new(arrow::array::Int64Array::from(vec![1, 2, 3])),
            ],
        )
        .unwrap();
        let parts = by_window_end(&batch, MIN);
        let ends: Vec<i64> = parts.iter().map(|(e, _)| *e).collect();
        assert_eq!(ends, [MIN, 2 * MIN]);
        let rows: Vec<usize> = parts.iter().map(|(_, b)| b.num_rows()).collect();
        assert_eq!(rows, [2, 1]);
    }
}
