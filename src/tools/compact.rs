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
//! `zorder` clusters rows by the given columns (e.g. `device_id,ts`) so one device's query
//! skips most row groups.
//!
//! Aggregation tables are compacted as files, not merged: their parts stay parts, and the
//! merged views read them as before.
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

use crate::config::{Pipeline, TableFormat};

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
    for output in delta_outputs(p, opts.output.as_deref())? {
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
        let result =
            compact_table(&mut table, &mut claimed, &mut report, opts, cutoff, target).await;
        if let Err(e) = release(&mut table, claimed).await {
            tracing::warn!(output, error = %e, "could not release the compaction claim; it expires by itself");
        }
        result.with_context(|| format!("compacting `{output}`"))?;
        out.push(report);
    }
    Ok(out)
}

async fn compact_table(
    table: &mut DeltaTable,
    claimed: &mut i64,
    report: &mut Compacted,
    opts: &CompactOptions,
    cutoff: chrono::DateTime<Utc>,
    target: NonZeroU64,
) -> anyhow::Result<()> {
    // Closed partitions with more than one file, as the table is now that it is ours.
    let mut files: BTreeMap<BTreeMap<String, String>, usize> = BTreeMap::new();
    for path in table.get_files_by_partitions(&[]).await? {
        *files.entry(partition_of(path.as_ref())).or_default() += 1;
    }
    let closed: Vec<_> = files
        .into_iter()
        // (A partition whose value is null is left alone: Delta filters cannot name it.)
        .filter(|(part, n)| {
            *n > 1
                && hour_end(part).is_some_and(|end| end <= cutoff)
                && !part
                    .values()
                    .any(|v| v == crate::sink::partition::NULL_PARTITION)
        })
        .map(|(part, _)| part)
        .collect();
    // Z-order by the given columns this table has (an aggregation has no `ts`).
    let columns: Vec<String> = table
        .snapshot()?
        .schema()
        .fields()
        .map(|f| f.name().to_string())
        .collect();
    report.zorder = opts
        .zorder
        .iter()
        .filter(|c| columns.contains(c))
        .cloned()
        .collect();
    for part in closed {
        let left = *claimed - Utc::now().timestamp_millis();
        if left < (CLAIM * 3 / 4).as_millis() as i64 {
            *claimed = renew(table, *claimed).await?.ok_or_else(|| {
                anyhow::anyhow!("the compaction claim was taken over (it had expired); stopping")
            })?;
        }
        let t = std::mem::replace(table, table.clone());
        match compact_partition(t, &part, target, &report.zorder).await {
            Ok((t, m)) => {
                *table = t;
                report.partitions += 1;
                report.files_removed += m.num_files_removed;
                report.files_added += m.num_files_added;
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
    let values: Vec<(&str, String)> = part
        .iter()
        .map(|(k, v)| {
            let v = crate::sink::delta::partition_value(v).unwrap_or_default();
            (k.as_str(), v)
        })
        .collect();
    let filters: Vec<FilterLiteral> = values
        .iter()
        .map(|(k, v)| (*k, FilterOp::Eq, FilterValue::Scalar(v.as_str())))
        .collect();
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
