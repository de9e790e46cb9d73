//! `shardlake compact` and `shardlake vacuum`: maintenance of the Delta tables of a pipeline
//! (`format: delta`, [`crate::sink::delta`]).
//!
//! **Compaction** bin-packs the files of each closed hour partition (its hour ended at least
//! `older_than` ago, by the wall clock) that has more than one file, into files of about
//! `target_size`, with delta-rs's `optimize`: the new files and the removal of the old ones
//! are one log entry (`dataChange: false`), so a reader sees the partition before or after,
//! never between, and the rows are the same rows. One entry per partition, so a long run
//! makes progress a partition at a time and a crash loses at most one partition's work (its
//! new files, unreferenced, go at the next vacuum). Workers' appends do not conflict with it:
//! they read nothing, and compaction reads no predicate. Two compactions, though, would not
//! conflict either (their removes are `dataChange: false`, which the conflict checker lets
//! through) and would both commit, doubling a partition's rows: so a compaction first claims
//! the table ([`CLAIM_APP`]), and a table another compaction holds is skipped as busy. A
//! failed commit (throttling, a lost answer) is tried again on the table's new version.
//! `zorder` clusters rows by the given columns with delta-rs's Z-order. `sort` (e.g.
//! `device_id,ts`) instead sorts each closed partition's rows into files of `target_size`
//! ([`sort_partition`]): each file a range of devices, whose `add` stats let a one-device
//! query skip the rest. On device ids with a long shared prefix (`well-0042`) delta-rs's
//! Z-order key hardly tells devices apart, and its files each spanned every device; `sort` is
//! what makes one device's queries cheap.
//!
//! **Aggregation parts are merged**: an aggregation stored as mergeable parts (one per worker,
//! reshard or restart that saw part of a window) has each closed partition rewritten as one
//! part per window and group, with the aggregation's own combine SQL
//! ([`crate::engine::merge::Mergeable::combine_sql`], the one the engine folds parts with):
//! still parts, so the merged views give the same rows before and after, and a part a worker
//! appends later (a late record) merges with it as with any other. The removes and the add are
//! one log entry, `dataChange: true` (the rows differ, the views' answers do not). An
//! aggregation that is not mergeable is compacted as files.
//!
//! **Vacuum** deletes files no version within `retain` (default 7 days) still references:
//! the inputs of compactions, and (full mode) files a crash left outside the log. delta-rs
//! refuses a retention shorter than the table's `delta.deletedFileRetentionDuration` (7 days)
//! unless told to; `--retain` below it is refused here too, since a reader of an older version
//! (time travel, a long query) would lose its files.

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{NaiveDate, TimeZone, Utc};
use deltalake::operations::optimize::OptimizeType;
use deltalake::{DeltaTable, FilterLiteral, FilterOp, FilterValue};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, new_null_array};
use arrow::compute::cast;
use arrow::datatypes::SchemaRef;
use datafusion::datasource::MemTable;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add};
use deltalake::protocol::{DeltaOperation, SaveMode};
use object_store::ObjectStoreExt as _;
use parquet::arrow::ArrowWriter;

use crate::config::{Pipeline, TableFormat};
use crate::tools::query::Table;

#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// Only this output (default: every Delta output).
    pub output: Option<String>,
    /// A partition is closed once its hour ended this long ago.
    pub older_than: Duration,
    /// Bytes per compacted file (delta-rs bin-packs up to it).
    pub target_size: u64,
    /// Cluster rows by these columns (Z-order) instead of plain bin-packing.
    pub zorder: Vec<String>,
    /// Sort rows by these columns into files of `target_size` instead (see
    /// [`sort_partition`]).
    pub sort: Vec<String>,
}

/// What one output's compaction did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Compacted {
    pub output: String,
    pub partitions: usize,
    pub files_removed: u64,
    pub files_added: u64,
    /// Partitions that failed (logged; the next run tries them again).
    pub failed: u64,
    /// Another compaction held the table: nothing was done.
    pub busy: bool,
    /// The Z-order columns used (those of `--zorder` the table has).
    pub zorder: Vec<String>,
    /// The sort columns used (those of `--sort` the table's files have).
    pub sort: Vec<String>,
    /// An aggregation's parts: rows read from the compacted partitions' files, and the parts
    /// (one per window and group) written instead.
    pub parts_before: u64,
    pub parts_after: u64,
}

/// The outputs `opts.output` names (or every Delta output), or why not.
fn delta_outputs<'a>(p: &'a Pipeline, only: Option<&'a str>) -> anyhow::Result<Vec<&'a str>> {
    let outputs: Vec<&str> = p
        .outputs
        .formats
        .iter()
        .filter(|(_, f)| **f == TableFormat::Delta)
        .map(|(o, _)| o.as_str())
        .collect();
    match only {
        Some(o) if outputs.contains(&o) => Ok(vec![o]),
        Some(o) if p.outputs.formats.contains_key(o) => bail!(
            "output `{o}` is not a Delta table: set `format: delta` on its lake or sink (the hive layout cannot be compacted safely: readers would see old and new files at once)"
        ),
        Some(o) => bail!(
            "no output is named `{o}` in pipeline {}; its outputs: {}",
            p.name,
            p.outputs
                .formats
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None if outputs.is_empty() => bail!(
            "pipeline {} has no Delta tables: set `format: delta` under `lake:` (or a table's `sink:`) to keep its outputs as Delta tables, which can be compacted",
            p.name
        ),
        None => Ok(outputs),
    }
}

async fn load(p: &Pipeline, output: &str) -> anyhow::Result<Option<DeltaTable>> {
    let lake = &p.outputs.sinks[output];
    let mut table = crate::sink::delta::builder(lake, output).await?.build()?;
    match table.load().await {
        Ok(()) => Ok(Some(table)),
        Err(deltalake::DeltaTableError::NotATable(_)) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading the Delta table of `{output}`")),
    }
}

/// The end of a partition's hour, from its `year=/month=/day=/hour=` values.
fn hour_end(values: &BTreeMap<String, String>) -> Option<chrono::DateTime<Utc>> {
    let n = |k: &str| values.get(k)?.parse::<u32>().ok();
    let date = NaiveDate::from_ymd_opt(n("year")? as i32, n("month")?, n("day")?)?;
    let start = Utc.from_utc_datetime(&date.and_hms_opt(n("hour")?, 0, 0)?);
    Some(start + chrono::Duration::hours(1))
}

/// A data file's partition, from its path (`[tenant=…/]year=…/month=…/day=…/hour=…/part-…`).
fn partition_of(path: &str) -> BTreeMap<String, String> {
    path.split('/')
        .filter_map(|s| s.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub async fn compact(p: &Pipeline, opts: &CompactOptions) -> anyhow::Result<Vec<Compacted>> {
    let mut out = Vec::new();
    let cutoff = Utc::now() - chrono::Duration::from_std(opts.older_than)?;
    let target = NonZeroU64::new(opts.target_size).context("--target-size must not be 0")?;
    let tables = crate::tools::query::output_schemas(p).await?;
    for output in delta_outputs(p, opts.output.as_deref())? {
        // An aggregation stored as mergeable parts: its partitions are merged, not packed.
        let shape = tables.iter().find(|t| t.name == output);
        let parts = shape.filter(|t| t.merge.is_some());
        let mut report = Compacted {
            output: output.to_string(),
            ..Default::default()
        };
        let Some(mut table) = load(p, output).await? else {
            out.push(report);
            continue;
        };
        let Some(mut claimed) = claim(&mut table).await? else {
            report.busy = true;
            out.push(report);
            continue;
        };
        let how = Compaction {
            opts,
            cutoff,
            target,
            parts,
            shape,
        };
        let result = compact_table(&mut table, &mut claimed, &mut report, &how).await;
        if let Err(e) = release(&mut table, claimed).await {
            tracing::warn!(output, error = %e, "could not release the compaction claim; it expires by itself");
        }
        result.with_context(|| format!("compacting `{output}`"))?;
        out.push(report);
    }
    Ok(out)
}

/// How one table is compacted.
struct Compaction<'a> {
    opts: &'a CompactOptions,
    cutoff: chrono::DateTime<Utc>,
    target: NonZeroU64,
    /// The table, if it is an aggregation stored as mergeable parts.
    parts: Option<&'a Table>,
    /// The table as the pipeline writes it.
    shape: Option<&'a Table>,
}

/// The tag a sorted file carries in its `add` action: the sort columns, comma-separated. A
/// partition whose files all carry the requested one is not sorted again.
const SORTED_TAG: &str = "shardlake.sortedBy";

/// A partition larger than this (its files' bytes) is bin-packed instead of sorted: the sort
/// holds the partition's rows in memory.
const SORT_MAX_BYTES: i64 = 1 << 30;

async fn compact_table(
    table: &mut DeltaTable,
    claimed: &mut i64,
    report: &mut Compacted,
    how: &Compaction<'_>,
) -> anyhow::Result<()> {
    let (opts, cutoff, target) = (how.opts, how.cutoff, how.target);
    // Z-order or sort by the given columns this table has (an aggregation has no `ts`).
    let columns: Vec<String> = table
        .snapshot()?
        .schema()
        .fields()
        .map(|f| f.name().to_string())
        .collect();
    // (Merged parts are not Z-ordered nor sorted: one part per window and group is small.)
    let usable = |cols: &[String]| -> Vec<String> {
        cols.iter()
            .filter(|c| columns.contains(c) && how.parts.is_none())
            .cloned()
            .collect()
    };
    report.zorder = usable(&opts.zorder);
    report.sort = match how.shape {
        // Sorted by columns of the files (not the partition columns).
        Some(t) => usable(&opts.sort)
            .into_iter()
            .filter(|c| t.file_schema().field_with_name(c).is_ok())
            .collect(),
        None => Vec::new(),
    };
    let sort_tag = report.sort.join(",");
    // Closed partitions with more than one file (or, when sorting, any file not sorted so),
    // as the table is now that it is ours.
    let mut files: BTreeMap<BTreeMap<String, String>, (usize, bool)> = BTreeMap::new();
    for f in table.snapshot()?.log_data().iter() {
        // (The tags are read from the `add` the view rebuilds; delta-rs has no accessor.)
        #[allow(deprecated)]
        let sorted = !sort_tag.is_empty()
            && f.add_action()
                .tags
                .as_ref()
                .and_then(|t| t.get(SORTED_TAG).cloned().flatten())
                .is_some_and(|k| k == sort_tag);
        let e = files
            .entry(partition_of(f.object_store_path().as_ref()))
            .or_insert((0, true));
        e.0 += 1;
        e.1 &= sorted;
    }
    let closed: Vec<_> = files
        .into_iter()
        // (A partition whose value is null is left alone: Delta filters cannot name it.)
        .filter(|(part, (n, sorted))| {
            let wanted = if sort_tag.is_empty() {
                *n > 1
            } else {
                !*sorted
            };
            wanted
                && hour_end(part).is_some_and(|end| end <= cutoff)
                && !part
                    .values()
                    .any(|v| v == crate::sink::partition::NULL_PARTITION)
        })
        .map(|(part, _)| part)
        .collect();
    for part in closed {
        let left = *claimed - Utc::now().timestamp_millis();
        if left < (CLAIM * 3 / 4).as_millis() as i64 {
            *claimed = renew(table, *claimed).await?.ok_or_else(|| {
                anyhow::anyhow!("the compaction claim was taken over (it had expired); stopping")
            })?;
        }
        let t = std::mem::replace(table, table.clone());
        let done = match (how.parts, how.shape) {
            (Some(parts), _) => merge_partition(t, &part, parts).await,
            (None, Some(shape)) if !report.sort.is_empty() => {
                sort_partition(t, &part, target, &report.sort, shape).await
            }
            _ => compact_partition(t, &part, target, &report.zorder)
                .await
                .map(|(t, m)| {
                    let done = Merged {
                        files_removed: m.num_files_removed,
                        files_added: m.num_files_added,
                        ..Default::default()
                    };
                    (t, done)
                }),
        };
        match done {
            Ok((t, m)) => {
                *table = t;
                report.partitions += 1;
                report.files_removed += m.files_removed;
                report.files_added += m.files_added;
                report.parts_before += m.parts_before;
                report.parts_after += m.parts_after;
            }
            // One partition's failure does not stop the others; the next run tries again.
            Err(e) => {
                tracing::warn!(partition = ?part, error = %format!("{e:#}"), "could not compact a partition");
                report.failed += 1;
                table.update_state().await?;
            }
        }
    }
    Ok(())
}

/// The application id under which a table's compaction is claimed. Its `txn` version is the
/// claim's expiry (ms since the epoch): a version in the future means a compaction holds the
/// table. Compaction removes files with `dataChange: false`, which Delta's conflict checker
/// lets through, so two compactions of one partition at once would both commit and double
/// its rows; the claim is what keeps them apart. Claims of one table conflict in the log
/// (the same app id), so of two claims at once only one commits.
const CLAIM_APP: &str = "shardlake/compaction";

/// How long a claim holds without being renewed (a compactor that died frees the table after
/// this); renewed before each partition once a quarter of it has passed.
const CLAIM: Duration = Duration::from_secs(3600);

async fn claim_txn(table: &mut DeltaTable, until_ms: i64) -> anyhow::Result<bool> {
    use deltalake::kernel::Transaction;
    use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
    use deltalake::protocol::{DeltaOperation, SaveMode};
    let props = CommitProperties::default()
        .with_application_transaction(Transaction::new_with_last_update(
            CLAIM_APP,
            until_ms,
            Some(Utc::now().timestamp_millis()),
        ))
        .with_cleanup_expired_logs(Some(false));
    let committed = CommitBuilder::from(props)
        .build(
            Some(table.snapshot()?),
            table.log_store(),
            DeltaOperation::Write {
                mode: SaveMode::Append,
                partition_by: None,
                predicate: None,
            },
        )
        .await;
    match committed {
        Ok(_) => {
            table.update_state().await?;
            Ok(true)
        }
        // Another claim (or release) of the same table committed first.
        Err(deltalake::DeltaTableError::Transaction { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The table's claim: its expiry (ms), if any.
async fn held(table: &mut DeltaTable) -> anyhow::Result<Option<i64>> {
    table.update_state().await?;
    Ok(table
        .snapshot()?
        .transaction_version(table.log_store().as_ref(), CLAIM_APP)
        .await?)
}

/// Claims the table for a compaction: its expiry, or `None` if another compaction holds it.
async fn claim(table: &mut DeltaTable) -> anyhow::Result<Option<i64>> {
    let now = Utc::now().timestamp_millis();
    if held(table).await?.is_some_and(|until| until > now) {
        return Ok(None);
    }
    let until = now + CLAIM.as_millis() as i64;
    Ok(claim_txn(table, until).await?.then_some(until))
}

/// Extends this compaction's claim (ours while the table's is `until`): the new expiry, or
/// `None` if it was lost.
async fn renew(table: &mut DeltaTable, until: i64) -> anyhow::Result<Option<i64>> {
    if held(table).await? != Some(until) {
        return Ok(None);
    }
    let next = Utc::now().timestamp_millis() + CLAIM.as_millis() as i64;
    Ok(claim_txn(table, next).await?.then_some(next))
}

/// Ends this compaction's claim, if still ours: its version becomes now, which is past.
async fn release(table: &mut DeltaTable, until: i64) -> anyhow::Result<()> {
    if held(table).await? == Some(until) {
        claim_txn(table, Utc::now().timestamp_millis()).await?;
    }
    Ok(())
}

/// Compaction tries again on a failed commit (throttling, a lost answer).
const ATTEMPTS: usize = 5;

async fn compact_partition(
    mut table: DeltaTable,
    part: &BTreeMap<String, String>,
    target: NonZeroU64,
    zorder: &[String],
) -> anyhow::Result<(DeltaTable, deltalake::operations::optimize::Metrics)> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
        .set_created_by(format!("shardlake {}", env!("CARGO_PKG_VERSION")))
        .build();
    let values = partition_filters(part);
    let filters: Vec<FilterLiteral> = values
        .iter()
        .map(|(k, v)| (k.as_str(), FilterOp::Eq, FilterValue::Scalar(v.as_str())))
        .collect();
    // Strings are rewritten as the sink writes them (`Utf8`), not as DataFusion reads them by
    // default (`Utf8View`): a file whose embedded Arrow schema said string_view would not mix
    // with the table's other files in a pyarrow dataset (its filters refuse the two types).
    let mut config = datafusion::prelude::SessionConfig::new();
    config
        .options_mut()
        .execution
        .parquet
        .schema_force_view_types = false;
    let session: Arc<dyn datafusion::catalog::Session> = Arc::new(
        datafusion::execution::SessionStateBuilder::new()
            .with_config(config)
            .with_default_features()
            .build(),
    );
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let kind = if zorder.is_empty() {
            OptimizeType::Compact
        } else {
            OptimizeType::ZOrder(zorder.to_vec())
        };
        let result = table
            .clone()
            .optimize()
            .with_session_state(session.clone())
            .with_filters(&filters)
            .with_target_size(target)
            .with_writer_properties(props.clone())
            .with_type(kind)
            .await;
        match result {
            Ok(done) => return Ok(done),
            Err(e @ deltalake::DeltaTableError::Transaction { .. }) => {
                tracing::info!(error = %e, "compaction conflicted with a commit; trying again");
                last = Some(e);
                table.update_state().await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.expect("an attempt").into())
}

/// What compacting one partition did.
#[derive(Debug, Default)]
struct Merged {
    files_removed: u64,
    files_added: u64,
    parts_before: u64,
    parts_after: u64,
}

/// The partition filters of `part` (its directory values, unescaped as Delta records them).
fn partition_filters(part: &BTreeMap<String, String>) -> Vec<(String, String)> {
    part.iter()
        .map(|(k, v)| {
            let v = crate::sink::delta::partition_value(v).unwrap_or_default();
            (k.clone(), v)
        })
        .collect()
}

/// Rewrites the parts of one closed partition of an aggregation as one part per window and
/// group: read every file the table lists there, combine them with the aggregation's SQL,
/// write one file (the sink's Parquet settings, stats from its footer), and commit its add
/// with the removes of what was read. A conflict (another writer removed one of those files)
/// starts again from the new version; the file written for a failed attempt is deleted.
async fn merge_partition(
    mut table: DeltaTable,
    part: &BTreeMap<String, String>,
    t: &Table,
) -> anyhow::Result<(DeltaTable, Merged)> {
    use futures::TryStreamExt as _;
    let values = partition_filters(part);
    let filters: Vec<FilterLiteral> = values
        .iter()
        .map(|(k, v)| (k.as_str(), FilterOp::Eq, FilterValue::Scalar(v.as_str())))
        .collect();
    let merge = t.merge.as_ref().context("not a mergeable aggregation")?;
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let files: Vec<_> = table
            .get_active_add_actions_by_partitions(&filters)
            .try_collect()
            .await?;
        if files.len() < 2 {
            return Ok((table, Merged::default()));
        }
        let store = table.object_store();
        let mut batches = Vec::new();
        let mut parts_before = 0;
        for f in &files {
            let bytes = store.get(&f.object_store_path()).await?.bytes().await?;
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?
                    .build()?;
            for batch in reader {
                let batch = batch?;
                parts_before += batch.num_rows() as u64;
                batches.push(with_partition_column(&batch, t, part)?);
            }
        }
        let ctx = crate::engine::sql::session();
        ctx.register_table(
            "parts",
            Arc::new(MemTable::try_new(t.schema.clone(), vec![batches])?),
        )?;
        let combined = ctx
            .sql(&merge.combine_sql("parts"))
            .await?
            .collect()
            .await?;
        let file_schema = t.file_schema();
        let mut bytes = Vec::new();
        let mut writer = ArrowWriter::try_new(
            &mut bytes,
            file_schema.clone(),
            Some(crate::sink::writer::properties(
                &file_schema,
                crate::sink::writer::Table::Aggregates,
            )),
        )?;
        let mut parts_after = 0;
        for batch in &combined {
            parts_after += batch.num_rows() as u64;
            writer.write(&project(batch, &file_schema)?)?;
        }
        let footer = writer.close()?;
        let dir = files[0]
            .object_store_path()
            .as_ref()
            .rsplit_once('/')
            .map(|(d, _)| d.to_string())
            .unwrap_or_default();
        let rel = format!("{dir}/part-merged-{}.parquet", uuid::Uuid::new_v4());
        let path = deltalake::Path::parse(&rel)?;
        let size = bytes.len() as i64;
        store.put(&path, bytes.into()).await?;

        let now = Utc::now().timestamp_millis();
        let mut actions: Vec<Action> = files
            .iter()
            .map(|f| Action::Remove(f.remove_action(true)))
            .collect();
        actions.push(Action::Add(Add {
            path: crate::sink::delta::uri_path(&rel),
            partition_values: files[0].partition_values_map(),
            size,
            modification_time: now,
            data_change: true,
            stats: Some(crate::sink::stats::from_footer(&footer)),
            ..Default::default()
        }));
        let props = CommitProperties::default()
            .with_create_checkpoint(true)
            .with_cleanup_expired_logs(Some(false));
        let committed = CommitBuilder::from(props)
            .with_actions(actions)
            .build(
                Some(table.snapshot()?),
                table.log_store(),
                DeltaOperation::Write {
                    mode: SaveMode::Overwrite,
                    partition_by: Some(
                        t.partition_columns()
                            .iter()
                            .map(|c| c.to_string())
                            .collect(),
                    ),
                    predicate: None,
                },
            )
            .await;
        match committed {
            Ok(_) => {
                table.update_state().await?;
                let merged = Merged {
                    files_removed: files.len() as u64,
                    files_added: 1,
                    parts_before,
                    parts_after,
                };
                return Ok((table, merged));
            }
            Err(e) => {
                // Not in the log: nobody reads it. (If the commit did land and only its answer
                // was lost, the file is live and the next attempt merges it with the rest.)
                if let Err(e) = table.update_state().await {
                    tracing::warn!(error = %e, "could not read the table again after a failed merge");
                }
                let live = table
                    .get_files_by_partitions(&filters)
                    .await
                    .is_ok_and(|live| live.contains(&path));
                if !live && let Err(e) = store.delete(&path).await {
                    tracing::warn!(%path, error = %e, "could not delete the file of a failed merge; vacuum removes it");
                }
                tracing::info!(error = %e, "merging a partition's parts failed; trying again");
                last = Some(e);
            }
        }
    }
    Err(last.expect("an attempt").into())
}

/// Rewrites one closed partition's rows sorted by `sort` (e.g. `device_id, ts`) into files of
/// about `target` bytes, the sink's Parquet settings: each file then holds a range of the first
/// sort column, and the stats of its `add` let a one-device query skip the others (delta-rs's
/// Z-order did not, on device ids that share a long prefix such as `well-0042`: its files each
/// spanned every device). Removes and adds are one log entry, `dataChange: false` (the same
/// rows), each add tagged with the sort so the next run leaves the partition alone. A partition
/// over [`SORT_MAX_BYTES`] is bin-packed instead (the sort holds its rows in memory).
async fn sort_partition(
    mut table: DeltaTable,
    part: &BTreeMap<String, String>,
    target: NonZeroU64,
    sort: &[String],
    t: &Table,
) -> anyhow::Result<(DeltaTable, Merged)> {
    use futures::{StreamExt as _, TryStreamExt as _};
    let values = partition_filters(part);
    let filters: Vec<FilterLiteral> = values
        .iter()
        .map(|(k, v)| (k.as_str(), FilterOp::Eq, FilterValue::Scalar(v.as_str())))
        .collect();
    let file_schema = t.file_schema();
    let props = crate::sink::writer::properties(&file_schema, crate::sink::writer::Table::Records);
    let tag = sort.join(",");
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let files: Vec<_> = table
            .get_active_add_actions_by_partitions(&filters)
            .try_collect()
            .await?;
        if files.is_empty() {
            return Ok((table, Merged::default()));
        }
        let bytes_in: i64 = files.iter().map(|f| f.size()).sum();
        if bytes_in > SORT_MAX_BYTES {
            tracing::warn!(partition = ?part, bytes = bytes_in, "partition too large to sort in memory; bin-packing it instead");
            let (t, m) = compact_partition(table, part, target, &[]).await?;
            let merged = Merged {
                files_removed: m.num_files_removed,
                files_added: m.num_files_added,
                ..Default::default()
            };
            return Ok((t, merged));
        }
        let store = table.object_store();
        let mut batches = Vec::new();
        for f in &files {
            let bytes = store.get(&f.object_store_path()).await?.bytes().await?;
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?
                    .build()?;
            for batch in reader {
                batches.push(conform(&batch?, &file_schema)?);
            }
        }
        let ctx = crate::engine::sql::session();
        ctx.register_table(
            "rows",
            Arc::new(MemTable::try_new(file_schema.clone(), vec![batches])?),
        )?;
        let order: Vec<String> = sort
            .iter()
            .map(|c| format!("\"{}\"", c.replace('"', "\"\"")))
            .collect();
        let mut sorted = ctx
            .sql(&format!("SELECT * FROM rows ORDER BY {}", order.join(", ")))
            .await?
            .execute_stream()
            .await?;
        let dir = files[0]
            .object_store_path()
            .as_ref()
            .rsplit_once('/')
            .map(|(d, _)| d.to_string())
            .unwrap_or_default();
        let partition_values = files[0].partition_values_map();
        let now = Utc::now().timestamp_millis();
        let mut adds: Vec<Add> = Vec::new();
        let mut written: Vec<deltalake::Path> = Vec::new();
        let mut writer: Option<ArrowWriter<Vec<u8>>> = None;
        let mut done = false;
        while !done {
            let next = sorted.next().await.transpose()?;
            if let Some(batch) = &next {
                let w = match writer.as_mut() {
                    Some(w) => w,
                    None => writer.insert(ArrowWriter::try_new(
                        Vec::new(),
                        file_schema.clone(),
                        Some(props.clone()),
                    )?),
                };
                w.write(&project(batch, &file_schema)?)?;
            } else {
                done = true;
            }
            let full = writer
                .as_ref()
                .is_some_and(|w| (w.bytes_written() + w.in_progress_size()) as u64 >= target.get());
            if (full || done)
                && let Some(mut w) = writer.take()
            {
                let footer = w.finish()?;
                let bytes = w.inner().clone();
                let rel = format!("{dir}/part-sorted-{}.parquet", uuid::Uuid::new_v4());
                let path = deltalake::Path::parse(&rel)?;
                let size = bytes.len() as i64;
                store.put(&path, bytes.into()).await?;
                written.push(path);
                adds.push(Add {
                    path: crate::sink::delta::uri_path(&rel),
                    partition_values: partition_values.clone(),
                    size,
                    modification_time: now,
                    data_change: false,
                    stats: Some(crate::sink::stats::from_footer(&footer)),
                    tags: Some([(SORTED_TAG.to_string(), Some(tag.clone()))].into()),
                    ..Default::default()
                });
            }
        }
        let mut actions: Vec<Action> = files
            .iter()
            .map(|f| Action::Remove(f.remove_action(false)))
            .collect();
        let added = adds.len() as u64;
        actions.extend(adds.into_iter().map(Action::Add));
        let props = CommitProperties::default()
            .with_create_checkpoint(true)
            .with_cleanup_expired_logs(Some(false));
        let committed = CommitBuilder::from(props)
            .with_actions(actions)
            .build(
                Some(table.snapshot()?),
                table.log_store(),
                DeltaOperation::Optimize {
                    predicate: None,
                    target_size: target.get() as i64,
                },
            )
            .await;
        match committed {
            Ok(_) => {
                table.update_state().await?;
                let merged = Merged {
                    files_removed: files.len() as u64,
                    files_added: added,
                    ..Default::default()
                };
                return Ok((table, merged));
            }
            Err(e) => {
                if let Err(e) = table.update_state().await {
                    tracing::warn!(error = %e, "could not read the table again after a failed sort");
                }
                let live = table
                    .get_files_by_partitions(&filters)
                    .await
                    .unwrap_or_default();
                for path in written.iter().filter(|p| !live.contains(p)) {
                    if let Err(e) = store.delete(path).await {
                        tracing::warn!(%path, error = %e, "could not delete the file of a failed sort; vacuum removes it");
                    }
                }
                tracing::info!(error = %e, "sorting a partition failed; trying again");
                last = Some(e);
            }
        }
    }
    Err(last.expect("an attempt").into())
}

/// A batch of a data file with `schema`'s columns by name: cast where a type differs, nulls
/// for a column older files lack.
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> anyhow::Result<RecordBatch> {
    let n = batch.num_rows();
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            Ok(match batch.column_by_name(f.name()) {
                Some(c) if c.data_type() == f.data_type() => c.clone(),
                Some(c) => cast(c, f.data_type())?,
                None => new_null_array(f.data_type(), n),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// A batch of a part file with the table's columns: the partition-by column (`tenant`, in
/// the path, not the file) from the partition's value, a column older files lack as nulls.
fn with_partition_column(
    batch: &RecordBatch,
    t: &Table,
    part: &BTreeMap<String, String>,
) -> anyhow::Result<RecordBatch> {
    let n = batch.num_rows();
    let mut columns = Vec::with_capacity(t.schema.fields().len());
    for field in t.schema.fields() {
        let column: ArrayRef = if t.partition_by.as_deref() == Some(field.name().as_str()) {
            let value = part
                .get(field.name())
                .and_then(|v| crate::sink::delta::partition_value(v));
            let text: ArrayRef = Arc::new(StringArray::from(vec![value; n]));
            cast(&text, field.data_type())?
        } else {
            match batch.column_by_name(field.name()) {
                Some(c) if c.data_type() == field.data_type() => c.clone(),
                Some(c) => cast(c, field.data_type())?,
                None => new_null_array(field.data_type(), n),
            }
        };
        columns.push(column);
    }
    Ok(RecordBatch::try_new(t.schema.clone(), columns)?)
}

/// The combined rows as the parts' files hold them: the file schema's columns, by name.
fn project(batch: &RecordBatch, schema: &SchemaRef) -> anyhow::Result<RecordBatch> {
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            let c = batch
                .column_by_name(f.name())
                .with_context(|| format!("the combined parts have no column `{}`", f.name()))?;
            Ok(if c.data_type() == f.data_type() {
                c.clone()
            } else {
                cast(c, f.data_type())?
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// The shortest retention `vacuum` takes: a version younger than this may still be read.
pub const MIN_RETAIN: Duration = Duration::from_secs(7 * 24 * 3600);

/// What one output's vacuum did (or would do, on a dry run).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Vacuumed {
    pub output: String,
    pub files_deleted: usize,
}

pub async fn vacuum(
    p: &Pipeline,
    output: Option<&str>,
    retain: Duration,
    dry_run: bool,
) -> anyhow::Result<Vec<Vacuumed>> {
    if retain < MIN_RETAIN {
        bail!(
            "--retain {} is shorter than 7 days: a reader of a version that recent (a long query, time travel) could lose its files; give 7d or more",
            humantime::format_duration(retain)
        );
    }
    let mut out = Vec::new();
    for output in delta_outputs(p, output)? {
        let Some(table) = load(p, output).await? else {
            out.push(Vacuumed {
                output: output.to_string(),
                files_deleted: 0,
            });
            continue;
        };
        let (_, m) = table
            .vacuum()
            .with_retention_period(chrono::Duration::from_std(retain)?)
            // Full: also the files no log entry ever named (a crash between publishing a
            // file and its log entry, an interrupted compaction), once older than `retain`.
            .with_mode(deltalake::operations::vacuum::VacuumMode::Full)
            .with_dry_run(dry_run)
            .await
            .with_context(|| format!("vacuuming `{output}`"))?;
        out.push(Vacuumed {
            output: output.to_string(),
            files_deleted: m.files_deleted.len(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_read_from_its_path_and_its_hour_ends_an_hour_later() {
        let part =
            partition_of("tenant=acme/year=2026/month=01/day=05/hour=23/part-1-w0-0.parquet");
        assert_eq!(part.len(), 5);
        assert_eq!(
            hour_end(&part),
            Some(Utc.with_ymd_and_hms(2026, 1, 6, 0, 0, 0).unwrap())
        );
        assert_eq!(hour_end(&partition_of("x/part.parquet")), None);
    }
}
