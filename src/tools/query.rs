//! `shardlake query`: SQL over the lake with DataFusion, every output registered as a table
//! partitioned by year/month/day/hour (so `WHERE day = '07'` prunes directories), and before
//! them by tenant in a lake partitioned so (`WHERE tenant = 'acme'` reads no other tenant's
//! files).

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::Result;
use datafusion::prelude::SessionContext;

use crate::columns;
use crate::config::{ConfigError, LakeLocation, Pipeline};
use crate::engine::merge::Mergeable;
use crate::engine::sql;

pub const PARTITION_COLUMNS: [&str; 4] =
    [columns::YEAR, columns::MONTH, columns::DAY, columns::HOUR];

/// An output as the lake holds it.
#[derive(Debug, Clone)]
pub struct Table {
    pub name: String,
    /// The schema of its files.
    pub schema: SchemaRef,
    /// For an aggregation stored as parts: how they are merged (readers see the merge under
    /// the output's name, the files as `<name>_parts`).
    pub merge: Option<Mergeable>,
    /// The column in its paths before time (`tenant`), not in its files.
    pub partition_by: Option<String>,
    /// A Delta table (`format: delta`): readers take its files from its log.
    pub delta: bool,
}

impl Table {
    /// Its partition columns, outermost first: the partition-by column, then time.
    pub fn partition_columns(&self) -> Vec<&str> {
        self.partition_by
            .as_deref()
            .into_iter()
            .chain(PARTITION_COLUMNS)
            .collect()
    }

    /// The schema of its files: `schema` without the partition-by column.
    pub fn file_schema(&self) -> SchemaRef {
        match &self.partition_by {
            Some(c) => {
                let fields: Vec<_> = self
                    .schema
                    .fields()
                    .iter()
                    .filter(|f| f.name() != c)
                    .cloned()
                    .collect();
                Arc::new(arrow::datatypes::Schema::new(fields))
            }
            None => self.schema.clone(),
        }
    }

    /// The name its files are registered under.
    pub fn files_name(&self) -> String {
        match self.merge {
            Some(_) => format!("{}{PARTS_SUFFIX}", self.name),
            None => self.name.clone(),
        }
    }
}

pub const PARTS_SUFFIX: &str = "_parts";

/// How long a session trusts a listing of a table's files.
pub const LISTING_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// Every output, as the pipeline writes them.
pub async fn output_schemas(p: &Pipeline) -> std::result::Result<Vec<Table>, ConfigError> {
    let compiled = sql::compile(p, &sql::session()).await?;
    Ok(sql::output_tables(p, &compiled)
        .into_iter()
        .map(|(name, schema, merge)| Table {
            delta: p.outputs.formats.get(&name) == Some(&crate::config::TableFormat::Delta),
            partition_by: p
                .outputs
                .partitioned_by(&name)
                .filter(|c| schema.field_with_name(c).is_ok())
                .map(str::to_string),
            name,
            schema,
            merge,
        })
        .collect())
}

/// A session with every output of the pipeline registered as a table (an aggregation stored
/// as parts: its files as `<name>_parts` and the merged rows as `<name>`).
///
/// The session lists a table's files again at least every [`LISTING_TTL`]: DataFusion's
/// default keeps a listing for ever, so a long-lived session (the console) would never see a
/// file committed after its first query.
pub async fn lake_session(p: &Pipeline, tables: &[Table]) -> Result<SessionContext> {
    lake_session_as_of(p, tables, None).await
}

/// Which version of its Delta tables a session reads (`shardlake query --as-of`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AsOf {
    /// A version number of each table's log.
    Version(u64),
    /// The versions current at this time (RFC 3339).
    Time(String),
}

impl std::str::FromStr for AsOf {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Ok(v) = s.parse::<u64>() {
            return Ok(AsOf::Version(v));
        }
        chrono::DateTime::parse_from_rfc3339(s)
            .map(|_| AsOf::Time(s.to_string()))
            .map_err(|_| {
                format!("{s:?} is neither a table version (a number) nor a time like 2026-12-07T10:00:00Z")
            })
    }
}

/// [`lake_session`], its Delta tables read as they were `as_of` (each a fixed version; a
/// hive table cannot be read as of a time, and is refused).
pub async fn lake_session_as_of(
    p: &Pipeline,
    tables: &[Table],
    as_of: Option<&AsOf>,
) -> Result<SessionContext> {
    use datafusion::execution::cache::cache_manager::CacheManagerConfig;
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    let runtime = RuntimeEnvBuilder::new()
        .with_cache_manager(
            CacheManagerConfig::default().with_list_files_cache_ttl(Some(LISTING_TTL)),
        )
        .build_arc()?;
    let ctx = SessionContext::new_with_config_rt(Default::default(), runtime);
    let mut buckets = Vec::new();
    for t in tables {
        let name = &t.name;
        let lake = &p.outputs.sinks[name];
        let url = lake.table_url(name);
        match lake {
            LakeLocation::Local { .. } => std::fs::create_dir_all(&url)?,
            LakeLocation::S3(loc) => {
                if !buckets.contains(&loc.bucket) {
                    let store = s3_store(loc).await?;
                    let bucket_url = url::Url::parse(&format!("s3://{}", loc.bucket))
                        .map_err(|e| datafusion::error::DataFusionError::External(e.into()))?;
                    ctx.register_object_store(&bucket_url, store);
                    buckets.push(loc.bucket.clone());
                }
            }
        }
        let partitions = t.partition_columns();
        if as_of.is_some() && !t.delta {
            return Err(DataFusionError::Plan(format!(
                "--as-of reads Delta tables, and output `{name}` is in the hive layout (its files have no versions); set `format: delta` on its lake"
            )));
        }
        if t.delta {
            let provider = match as_of {
                Some(v) => delta_table_as_of(lake, t, v).await?,
                None => delta_table(lake, t).await?,
            };
            ctx.register_table(t.files_name(), provider)?;
            if let Some(m) = &t.merge {
                let view = ctx
                    .sql(&m.merge_sql(&t.files_name(), &partitions))
                    .await?
                    .into_view();
                ctx.register_table(name.as_str(), view)?;
            }
            continue;
        }
        let opts = ListingOptions::new(Arc::new(ParquetFormat::default()))
            .with_file_extension(".parquet")
            .with_table_partition_cols(
                partitions
                    .iter()
                    .map(|c| (c.to_string(), DataType::Utf8))
                    .collect(),
            );
        let config = ListingTableConfig::new(ListingTableUrl::parse(&url)?)
            .with_listing_options(opts)
            .with_schema(t.file_schema());
        ctx.register_table(t.files_name(), Arc::new(ListingTable::try_new(config)?))?;
        if let Some(m) = &t.merge {
            let view = ctx
                .sql(&m.merge_sql(&t.files_name(), &partitions))
                .await?
                .into_view();
            ctx.register_table(name.as_str(), view)?;
        }
    }
    Ok(ctx)
}

/// A Delta table's provider. The table's latest version is read again at most every
/// [`LISTING_TTL`] when a query scans it, as listings are, so a long-lived session (the
/// console) sees new commits. A table no commit has created yet reads as empty.
async fn delta_table(
    lake: &LakeLocation,
    t: &Table,
) -> Result<Arc<dyn datafusion::catalog::TableProvider>> {
    let table = crate::sink::delta::builder(lake, &t.name)
        .await
        .map_err(|e| DataFusionError::External(e.into()))?
        .build()
        .map_err(|e| DataFusionError::External(e.into()))?;
    let empty = crate::sink::delta::empty_table(t)
        .await
        .map_err(|e| DataFusionError::External(e.into()))?
        .table_provider()
        .await
        .map_err(|e| DataFusionError::External(e.into()))?;
    let fresh = FreshDelta {
        name: t.name.clone(),
        empty,
        state: tokio::sync::Mutex::new((table, None)),
        current: std::sync::Mutex::new(None),
    };
    let provider = fresh.provider().await?;
    *fresh.current.lock().expect("not poisoned") = Some(provider);
    Ok(Arc::new(fresh))
}

use datafusion::error::DataFusionError;

/// A Delta table's provider at one version: `as_of`'s number, or the version current then.
async fn delta_table_as_of(
    lake: &LakeLocation,
    t: &Table,
    as_of: &AsOf,
) -> Result<Arc<dyn datafusion::catalog::TableProvider>> {
    let b = crate::sink::delta::builder(lake, &t.name)
        .await
        .map_err(|e| DataFusionError::External(e.into()))?;
    let b = match as_of {
        AsOf::Version(v) => b.with_version(*v as _),
        AsOf::Time(s) => b
            .with_datestring(s)
            .map_err(|e| DataFusionError::External(e.into()))?,
    };
    let table = match b.load().await {
        Ok(t) => t,
        // No commit ever created it: empty then as now.
        Err(deltalake::DeltaTableError::NotATable(_)) => {
            crate::sink::delta::empty_table(t)
                .await
                .map_err(|e| DataFusionError::External(e.into()))?
        }
        Err(e) => {
            // Versions are per table: one past a table's last is the usual mistake.
            if let AsOf::Version(v) = as_of
                && let Some(last) = last_version(lake, &t.name).await
                && *v > last
            {
                return Err(DataFusionError::Plan(format!(
                    "the Delta table `{}` has versions 0 to {last}, and --as-of {v} is past its last. Version numbers are per table (each table's log counts its own commits): give a version of this table, or --as-of TIME (RFC 3339), which reads every table as it was at that time",
                    t.name
                )));
            }
            return Err(DataFusionError::Plan(format!(
                "the Delta table `{}` as of {as_of:?}: {e}",
                t.name
            )));
        }
    };
    table
        .table_provider()
        .await
        .map_err(|e| DataFusionError::External(e.into()))
}

/// The latest version of a Delta table, if it can be read.
async fn last_version(lake: &LakeLocation, name: &str) -> Option<u64> {
    let mut table = crate::sink::delta::builder(lake, name)
        .await
        .ok()?
        .build()
        .ok()?;
    table.load().await.ok()?;
    table.version()
}

struct FreshDelta {
    name: String,
    /// An empty table of the same shape, read while the table does not exist yet.
    empty: Arc<dyn datafusion::catalog::TableProvider>,
    /// The table, and when its version was last read.
    state: tokio::sync::Mutex<(deltalake::DeltaTable, Option<std::time::Instant>)>,
    /// The provider of the version read last.
    current: std::sync::Mutex<Option<Arc<dyn datafusion::catalog::TableProvider>>>,
}

impl std::fmt::Debug for FreshDelta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FreshDelta")
            .field("name", &self.name)
            .finish()
    }
}

impl FreshDelta {
    /// The provider of the table's latest version (read again after [`LISTING_TTL`]).
    async fn provider(&self) -> Result<Arc<dyn datafusion::catalog::TableProvider>> {
        let mut state = self.state.lock().await;
        if let Some(at) = state.1
            && at.elapsed() < LISTING_TTL
            && let Some(p) = self.current.lock().expect("not poisoned").clone()
        {
            return Ok(p);
        }
        let loaded = match state.0.version() {
            Some(_) => state.0.update_state().await,
            None => state.0.load().await,
        };
        let provider: Arc<dyn datafusion::catalog::TableProvider> = match loaded {
            Ok(()) => state
                .0
                .table_provider()
                .await
                .map_err(|e| DataFusionError::External(e.into()))?,
            Err(deltalake::DeltaTableError::NotATable(_)) => self.empty.clone(),
            Err(e) => {
                return Err(DataFusionError::Plan(format!(
                    "the Delta table `{}`: {e}",
                    self.name
                )));
            }
        };
        state.1 = Some(std::time::Instant::now());
        *self.current.lock().expect("not poisoned") = Some(provider.clone());
        Ok(provider)
    }

    fn current(&self) -> Arc<dyn datafusion::catalog::TableProvider> {
        self.current
            .lock()
            .expect("not poisoned")
            .clone()
            .expect("set when made")
    }
}

#[async_trait::async_trait]
impl datafusion::catalog::TableProvider for FreshDelta {
    fn schema(&self) -> SchemaRef {
        self.current().schema()
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        datafusion::datasource::TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&datafusion::prelude::Expr],
    ) -> Result<Vec<datafusion::logical_expr::TableProviderFilterPushDown>> {
        self.current().supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        filters: &[datafusion::prelude::Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        self.provider()
            .await?
            .scan(state, projection, filters, limit)
            .await
    }
}

/// An object store for an S3 lake, with the same credentials (the SDK's default chain),
/// region and endpoint as the writer.
async fn s3_store(loc: &crate::config::S3Location) -> Result<Arc<dyn object_store::ObjectStore>> {
    let store = crate::aws::s3_object_store(
        &loc.bucket,
        loc.region.as_deref(),
        loc.kms_key_id.as_deref(),
    )
    .await
    .map_err(|e| datafusion::error::DataFusionError::External(e.into()))?;
    Ok(Arc::new(store))
}

pub async fn query(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
    ctx.sql(sql).await?.collect().await
}
