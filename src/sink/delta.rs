//! `format: delta`: each output of a lake is a Delta Lake table, and each shardlake commit is
//! one commit of its transaction log.
//!
//! # What stays, what the log adds
//!
//! The data files are the hive layout's own: the same writer, the same
//! `year=/month=/day=/hour=` directories (partition columns of the Delta schema, as strings,
//! as `shardlake query` has always typed them), zstd, µs UTC timestamps. Staging and the
//! commit protocol ([`crate::checkpoint::commit`]) are unchanged: the intent decides what is
//! published, then every file is published (renamed, or its upload completed). The log is one
//! more idempotent step at the end of publishing, before the checkpoint store's commit:
//!
//! 1. stage, 2. prepare the intent, 3. publish each file, **4. one Delta commit per table
//!    that has files in the intent**, 5. commit the checkpoints.
//!
//! A Delta reader sees nothing of a commit until step 4 and all of it after: a file published
//! in step 3 is in the table's directory but in no log entry, so it is not part of the table.
//!
//! # Exactly once: the application transaction
//!
//! The Delta commit carries a `txn` action: app id `shardlake/<pipeline>/<worker>` (the
//! worker that prepared the intent, from the intent's id), version = that intent's commit
//! number. A worker's commit numbers only grow, so before committing the step reads the
//! table's latest version for the app id; if it is at or past this intent's, the step was
//! done (by this worker before a crash, or by the worker that recovered the intent after
//! this one lost its lease) and is skipped. Two workers completing the same intent at once
//! both write a `txn` of the same app id: Delta's conflict checker refuses the second
//! (`ConcurrentTransaction`), which then reads the table again and finds it done.
//!
//! # Many writers
//!
//! Workers append to one table concurrently. A log entry is written with put-if-absent: the
//! local file system's atomic create, or on S3 a conditional `PutObject` (`If-None-Match`,
//! which S3 has supported since 2024), through the same object_store client `shardlake
//! query` uses. So no DynamoDB lock table is needed; a commit that loses the race is rebased
//! by delta-rs (appends do not conflict) and tried again.
//!
//! # Stats
//!
//! Each `add` carries the file's row count and, per column, its range and null count
//! ([`crate::sink::stats`]), taken from the footer the writer just wrote (or, for an intent
//! recovered after a crash, read back from the published file's footer). Readers skip the
//! files whose range a filter excludes (a time range, or a device once compaction has
//! clustered a partition's rows).
//!
//! The first commit to a table creates it (its schema from the pipeline's SQL, its partition
//! columns from the layout); two workers creating it at once is one create and one retry.
//!
//! # Schema changes
//!
//! A worker reads each table when it starts and compares its schema with what the pipeline
//! writes now: columns added to the SQL are added to the table (nullable; older rows read them
//! as null), a dropped nullable column stays (new rows read it as null), and anything else (a
//! changed type, a NOT NULL older files or newer rows would break) stops the run before it
//! reads a record, with the columns that differ and the fix.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Once};

use arrow::datatypes::SchemaRef;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, DataType, StructField, StructType, Transaction};
use deltalake::logstore::{
    LogStore, LogStoreFactory, StorageConfig, default_logstore, logstore_factories,
};
use deltalake::operations::create::CreateBuilder;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError, ObjectStore};
use tokio::sync::Mutex;
use url::Url;

use crate::checkpoint::Intent;
use crate::config::{LakeLocation, Pipeline, TableFormat};
use crate::sink::StagedFile;
use crate::sink::partition::NULL_PARTITION;
use crate::tools::query::{Table, output_schemas};

/// The Delta tables of a pipeline: every output whose lake has `format: delta`.
#[derive(Debug)]
pub struct DeltaTables {
    pipeline: String,
    by_output: BTreeMap<String, Target>,
}

struct Target {
    url: Url,
    /// The bucket's object store, for an S3 lake (a local lake uses delta-rs's own).
    store: Option<Arc<dyn ObjectStore>>,
    /// The schema of the data files.
    file_schema: SchemaRef,
    /// Outermost first: the partition-by column if any, then year, month, day, hour.
    partition_columns: Vec<String>,
    /// Loaded at the first commit; one commit at a time per table in this process.
    table: Mutex<Option<DeltaTable>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.url.as_str())
            .finish()
    }
}

/// delta-rs finds a log store by the table URL's scheme. For `s3://` it would want its AWS
/// crate (a second AWS stack, and a DynamoDB lock table unless told otherwise); the default
/// log store over our own object_store client does what is needed, since S3's conditional
/// writes make put-if-absent atomic.
struct ConditionalPutLogStores;

impl LogStoreFactory for ConditionalPutLogStores {
    fn with_options(
        &self,
        prefixed_store: Arc<dyn ObjectStore>,
        root_store: Arc<dyn ObjectStore>,
        location: &Url,
        options: &StorageConfig,
    ) -> deltalake::DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

fn register_s3_log_store() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        logstore_factories().insert(
            Url::parse("s3://").expect("a URL"),
            Arc::new(ConditionalPutLogStores),
        );
    });
}

/// The table URL of `output` in `lake` (no trailing `/`).
pub fn table_url(lake: &LakeLocation, output: &str) -> io::Result<Url> {
    let s = lake.table_url(output);
    let s = s.trim_end_matches('/');
    match lake {
        LakeLocation::Local { .. } => Url::from_directory_path(s)
            .map_err(|()| io::Error::other(format!("{s} is not an absolute directory"))),
        LakeLocation::S3(_) => Url::parse(s).map_err(io::Error::other),
    }
}

/// A Delta table of `lake`, with the object store it must be read through.
pub async fn builder(lake: &LakeLocation, output: &str) -> io::Result<DeltaTableBuilder> {
    let url = table_url(lake, output)?;
    let b = DeltaTableBuilder::from_url(url.clone()).map_err(io::Error::other)?;
    Ok(match lake {
        LakeLocation::Local { .. } => b,
        LakeLocation::S3(loc) => {
            register_s3_log_store();
            let store = crate::aws::s3_object_store(
                &loc.bucket,
                loc.region.as_deref(),
                loc.kms_key_id.as_deref(),
            )
            .await
            .map_err(io::Error::other)?;
            let root = Url::parse(&format!("s3://{}", loc.bucket)).map_err(io::Error::other)?;
            b.with_storage_backend(Arc::new(store), root)
        }
    })
}

impl DeltaTables {
    /// The pipeline's Delta tables; `None` if every output is in the hive layout.
    pub async fn open(p: &Pipeline) -> io::Result<Option<Self>> {
        if !p.outputs.formats.values().any(|f| *f == TableFormat::Delta) {
            return Ok(None);
        }
        let tables = output_schemas(p).await.map_err(io::Error::other)?;
        let mut by_output = BTreeMap::new();
        for t in tables {
            if p.outputs.formats.get(&t.name) != Some(&TableFormat::Delta) {
                continue;
            }
            let lake = &p.outputs.sinks[&t.name];
            let store: Option<Arc<dyn ObjectStore>> = match lake {
                LakeLocation::Local { path } => {
                    std::fs::create_dir_all(path.join(&t.name))?;
                    None
                }
                LakeLocation::S3(loc) => {
                    register_s3_log_store();
                    Some(Arc::new(
                        crate::aws::s3_object_store(
                            &loc.bucket,
                            loc.region.as_deref(),
                            loc.kms_key_id.as_deref(),
                        )
                        .await
                        .map_err(io::Error::other)?,
                    ))
                }
            };
            by_output.insert(
                t.name.clone(),
                Target {
                    url: table_url(lake, &t.name)?,
                    store,
                    file_schema: t.file_schema(),
                    partition_columns: partition_columns(&t),
                    table: Mutex::new(None),
                },
            );
        }
        // Each existing table is read now: a schema the pipeline no longer matches stops the
        // run before it reads anything, not at its first commit. (A table no commit created
        // yet is created by its first commit, as before.)
        for target in by_output.values() {
            target
                .check_existing()
                .await
                .map_err(|e| io::Error::other(format!("delta table {}: {e}", target.url)))?;
        }
        Ok(Some(Self {
            pipeline: p.name.clone(),
            by_output,
        }))
    }

    /// Step 4 of publishing: one Delta commit per table with files in `intent`, each skipped
    /// if the table already has it. Idempotent, as every step of publishing is.
    pub async fn commit(&self, intent: &Intent) -> io::Result<()> {
        let worker = intent
            .id
            .strip_suffix(&format!("-{}", intent.next.commit_id))
            .unwrap_or(&intent.id);
        let app_id = format!("shardlake/{}/{worker}", self.pipeline);
        let version = intent.next.commit_id as i64;
        for (output, target) in &self.by_output {
            let files: Vec<&StagedFile> = intent
                .files
                .iter()
                .filter(|f| &f.output == output)
                .collect();
            if files.is_empty() {
                continue;
            }
            target
                .commit(&files, &app_id, version)
                .await
                .map_err(|e| io::Error::other(format!("delta table {}: {e}", target.url)))?;
        }
        Ok(())
    }
}

/// A table's Delta schema: the files' columns, then the partition columns as strings.
pub fn columns(
    file_schema: &arrow::datatypes::Schema,
    partition_columns: &[String],
) -> deltalake::DeltaResult<Vec<StructField>> {
    use deltalake::kernel::engine::arrow_conversion::TryIntoKernel as _;
    let files: StructType = file_schema.try_into_kernel()?;
    let mut cols: Vec<StructField> = files.fields().cloned().collect();
    cols.extend(
        partition_columns
            .iter()
            .map(|c| StructField::new(c.clone(), DataType::STRING, true)),
    );
    Ok(cols)
}

/// An empty table of `t`'s shape, in memory: a reader of a table no commit has created yet
/// reads this, with exactly the types delta-rs gives the real one.
pub async fn empty_table(t: &Table) -> deltalake::DeltaResult<DeltaTable> {
    let partitions = partition_columns(t);
    DeltaTable::new_in_memory()
        .create()
        .with_columns(columns(&t.file_schema(), &partitions)?)
        .with_partition_columns(partitions)
        .await
}

fn partition_columns(t: &Table) -> Vec<String> {
    t.partition_columns()
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// Attempts at a table's commit before the step fails (the next recovery does it again):
/// backoff from 0.1 s doubling to 5 s, about 25 s in all.
const ATTEMPTS: usize = 10;

impl Target {
    fn builder(&self) -> deltalake::DeltaResult<DeltaTableBuilder> {
        let b = DeltaTableBuilder::from_url(self.url.clone())?;
        Ok(match &self.store {
            None => b,
            Some(store) => {
                let root = Url::parse(&format!("s3://{}", self.url.host_str().unwrap_or_default()))
                    .map_err(|e| DeltaTableError::Generic(e.to_string()))?;
                b.with_storage_backend(store.clone(), root)
            }
        })
    }

    /// Loads the table if it exists, its schema reconciled with the pipeline's.
    async fn check_existing(&self) -> deltalake::DeltaResult<()> {
        let mut table = self.builder()?.build()?;
        match table.load().await {
            Ok(()) => {
                self.reconcile_schema(&mut table).await?;
                *self.table.lock().await = Some(table);
                Ok(())
            }
            Err(DeltaTableError::NotATable(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The table at its latest version, created if it does not exist yet.
    async fn latest(&self, slot: &mut Option<DeltaTable>) -> deltalake::DeltaResult<()> {
        if let Some(t) = slot.as_mut() {
            return t.update_state().await;
        }
        let mut table = self.builder()?.build()?;
        match table.load().await {
            Ok(()) => {}
            Err(DeltaTableError::NotATable(_)) => {
                let created = CreateBuilder::new()
                    .with_log_store(table.log_store())
                    .with_columns(self.columns()?)
                    .with_partition_columns(self.partition_columns.clone())
                    // Old log entries are removed by maintenance with the rights for it,
                    // never by a worker's commit or compaction (its role may not delete).
                    .with_configuration_property(
                        deltalake::TableProperty::EnableExpiredLogCleanup,
                        Some("false"),
                    )
                    .with_save_mode(SaveMode::Ignore)
                    .await;
                match created {
                    Ok(t) => table = t,
                    // Another worker created it first; if not, the create's own error
                    // says why (e.g. access denied), not the reload's "not a table".
                    Err(create) => {
                        table = self.builder()?.build()?;
                        if table.load().await.is_err() {
                            return Err(create);
                        }
                    }
                }
            }
            Err(e) => return Err(e),
        }
        self.reconcile_schema(&mut table).await?;
        *slot = Some(table);
        Ok(())
    }

    /// Checks the table's schema against what the pipeline writes. The same: nothing to do.
    /// Columns the pipeline added (a new item in its SQL) are added to the table, nullable:
    /// older files read them as null. A column the pipeline dropped stays in the table if it
    /// is nullable (new files read it as null). Anything else (a changed type, a new NOT NULL
    /// the old files break) refuses the run with what differs and the fix.
    async fn reconcile_schema(&self, table: &mut DeltaTable) -> deltalake::DeltaResult<()> {
        let expected = self.columns()?;
        let current: Vec<StructField> = table.snapshot()?.schema().fields().cloned().collect();
        let mut problems = Vec::new();
        let mut added = Vec::new();
        for e in &expected {
            match current.iter().find(|c| c.name() == e.name()) {
                Some(c) if c.data_type() != e.data_type() => problems.push(format!(
                    "column `{}` is {} in the table and {} in the pipeline",
                    e.name(),
                    type_name(c.data_type()),
                    type_name(e.data_type())
                )),
                Some(c) if !c.is_nullable() && e.is_nullable() => problems.push(format!(
                    "column `{}` is NOT NULL in the table and may be null in the pipeline",
                    e.name()
                )),
                Some(_) => {}
                None => added.push(StructField::new(e.name(), e.data_type().clone(), true)),
            }
        }
        for c in &current {
            if !expected.iter().any(|e| e.name() == c.name()) {
                if c.is_nullable() {
                    tracing::warn!(table = %self.url, column = c.name(), "the pipeline no longer writes this column; new rows read it as null");
                } else {
                    problems.push(format!(
                        "column `{}` is NOT NULL in the table and the pipeline no longer writes it",
                        c.name()
                    ));
                }
            }
        }
        if !problems.is_empty() {
            return Err(DeltaTableError::SchemaMismatch {
                msg: format!(
                    "the pipeline's output no longer fits this table: {}. Fix: make the SQL give the table's type again (e.g. CAST(… AS BIGINT)), or write the changed output as a new table (a new output name, or a new path for its lake or sink); the table's old files keep their schema",
                    problems.join("; ")
                ),
            });
        }
        if !added.is_empty() {
            let names: Vec<&str> = added.iter().map(|f| f.name().as_str()).collect();
            tracing::info!(table = %self.url, columns = ?names, "adding the pipeline's new columns to the table (older rows read them as null)");
            *table = table.clone().add_columns().with_fields(added).await?;
        }
        Ok(())
    }

    fn columns(&self) -> deltalake::DeltaResult<Vec<StructField>> {
        columns(&self.file_schema, &self.partition_columns)
    }

    /// Commits `files` under (`app_id`, `version`) unless the table has it. Any failure (a
    /// conflict on the same `txn`, a lost answer to a log entry's conditional put, which the
    /// object_store client does not retry since it is not idempotent, S3 throttling past the
    /// client's retries) is tried again on a freshly read table, with backoff: an entry that
    /// did land is then found by its `txn`.
    async fn commit(
        &self,
        files: &[&StagedFile],
        app_id: &str,
        version: i64,
    ) -> deltalake::DeltaResult<()> {
        let mut slot = self.table.lock().await;
        let mut delay = std::time::Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            match self.try_commit(&mut slot, files, app_id, version).await {
                Ok(()) => return Ok(()),
                // Checkpoints older than the table: no retry mends that.
                Err(e @ DeltaTableError::InvalidTableLocation(_)) => return Err(e),
                // The pipeline's schema does not fit the table: no retry mends that either.
                Err(e @ DeltaTableError::SchemaMismatch { .. }) => return Err(e),
                Err(e) if attempt < ATTEMPTS => {
                    tracing::warn!(table = %self.url, app_id, version, attempt, error = %e, "delta commit failed; reading the table again and retrying");
                    *slot = None;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_commit(
        &self,
        slot: &mut Option<DeltaTable>,
        files: &[&StagedFile],
        app_id: &str,
        version: i64,
    ) -> deltalake::DeltaResult<()> {
        self.latest(slot).await?;
        let table = slot.as_ref().expect("loaded");
        let state = table.snapshot()?;
        let done = state
            .transaction_version(table.log_store().as_ref(), app_id)
            .await?;
        match done {
            // Done before: by this worker before a crash, or by the one that recovered the
            // intent after this one lost its lease.
            Some(v) if v == version => {
                tracing::debug!(table = %self.url, app_id, version, "delta commit was done before");
                return Ok(());
            }
            // A worker commits its intents in order, so a later one in the table means these
            // checkpoints are older than the table: skipping would drop this commit's rows.
            Some(v) if v > version => {
                return Err(DeltaTableError::InvalidTableLocation(format!(
                    "the table already holds commit {v} of {app_id}, and these checkpoints are at commit {version}: were the checkpoints reset or restored while the lake was kept? Give the worker a new --worker-id (a new app id) to write on, or move the checkpoints back"
                )));
            }
            _ => {}
        }
        let now = chrono::Utc::now().timestamp_millis();
        let mut actions = Vec::with_capacity(files.len());
        for f in files {
            let stats = match &f.stats {
                Some(s) => s.clone(),
                None => footer_stats(table, f).await,
            };
            actions.push(Action::Add(self.add(f, now, stats)?));
        }
        // A log checkpoint every `delta.checkpointInterval` (100) entries, so readers do not
        // replay every entry; expired entries are left for maintenance, off the commit path
        // (and the workers' role may not delete in the log).
        let props = CommitProperties::default()
            .with_application_transaction(Transaction::new_with_last_update(
                app_id,
                version,
                Some(now),
            ))
            .with_create_checkpoint(true)
            .with_cleanup_expired_logs(Some(false));
        // A conflict with another worker's commit of the same intent (the same `txn`) is an
        // error here; the retry reads the table again and finds it done.
        CommitBuilder::from(props)
            .with_actions(actions)
            .build(
                Some(state),
                table.log_store(),
                DeltaOperation::Write {
                    mode: SaveMode::Append,
                    partition_by: Some(self.partition_columns.clone()),
                    predicate: None,
                },
            )
            .await?;
        Ok(())
    }

    /// The `add` action of a published file.
    fn add(&self, f: &StagedFile, now: i64, stats: String) -> deltalake::DeltaResult<Add> {
        let (_, rel) = f.key.split_once('/').ok_or_else(|| {
            DeltaTableError::Generic(format!("{} is not under its output's directory", f.key))
        })?;
        let mut partition_values = HashMap::new();
        for segment in rel.split('/') {
            if let Some((k, v)) = segment.split_once('=')
                && self.partition_columns.iter().any(|c| c == k)
            {
                partition_values.insert(k.to_string(), partition_value(v));
            }
        }
        if partition_values.len() != self.partition_columns.len() {
            return Err(DeltaTableError::Generic(format!(
                "{} does not name every partition column ({})",
                f.key,
                self.partition_columns.join(", ")
            )));
        }
        Ok(Add {
            path: uri_path(rel),
            partition_values,
            size: f.bytes as i64,
            modification_time: now,
            data_change: true,
            stats: Some(stats),
            ..Default::default()
        })
    }
}

/// The stats of a published file whose intent was recovered (the writer's are not kept in
/// the checkpoint store), from its footer; the row count alone if the footer cannot be read
/// (the file is then read by every query, as before stats).
async fn footer_stats(table: &DeltaTable, f: &StagedFile) -> String {
    let rel = f.key.split_once('/').map_or(f.key.as_str(), |(_, r)| r);
    let path = deltalake::Path::parse(rel).unwrap_or_else(|_| deltalake::Path::from(rel));
    match crate::sink::stats::from_object(table.object_store().as_ref(), &path, f.bytes).await {
        Ok(stats) => stats,
        Err(e) => {
            tracing::warn!(key = %f.key, error = %e, "could not read a data file's footer for its Delta stats; writing its row count only");
            format!("{{\"numRecords\":{}}}", f.rows)
        }
    }
}

/// A Delta type as a user reads it (`long`, `double`, `timestamp`, …).
fn type_name(t: &DataType) -> String {
    match t {
        DataType::Primitive(p) => serde_json::to_value(p)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{p:?}")),
        other => format!("{other:?}"),
    }
}

/// A relative key as the URI path Delta's `add.path` is: every byte but unreserved ones, `/`
/// and `=` percent-encoded (a tenant directory may hold `%` escapes, spaces, `#`, non-ASCII).
pub(crate) fn uri_path(rel: &str) -> String {
    let mut out = String::with_capacity(rel.len());
    for b in rel.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/=".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A directory's partition value as Delta records it: unescaped, and null for the hive
/// layout's null directory.
pub fn partition_value(dir: &str) -> Option<String> {
    if dir == NULL_PARTITION {
        return None;
    }
    let bytes = dir.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_paths_are_uri_paths_of_the_keys() {
        assert_eq!(
            uri_path("tenant=a%2Fb c/year=2026/part-1-w0-0.parquet"),
            "tenant=a%252Fb%20c/year=2026/part-1-w0-0.parquet"
        );
    }

    #[test]
    fn partition_values_are_unescaped_and_null_is_none() {
        assert_eq!(partition_value("07").as_deref(), Some("07"));
        assert_eq!(
            partition_value("a%2F%2E%2E%2Fb%3Dc").as_deref(),
            Some("a/../b=c")
        );
        assert_eq!(partition_value(NULL_PARTITION), None);
    }
}
