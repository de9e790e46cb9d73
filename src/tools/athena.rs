//! `shardlake athena-ddl`: the lake's tables for Athena, with partition projection, and a view
//! merging each aggregation's parts.

use arrow::datatypes::{DataType, TimeUnit};

use super::query::Table;

/// The Athena (Hive DDL) type of an Arrow type.
pub fn athena_type(t: &DataType) -> Option<String> {
    Some(match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "string".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Int8 => "tinyint".into(),
        DataType::Int16 => "smallint".into(),
        DataType::Int32 => "int".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Float32 => "float".into(),
        DataType::Float64 => "double".into(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "binary".into(),
        DataType::Date32 => "date".into(),
        DataType::Timestamp(TimeUnit::Microsecond | TimeUnit::Millisecond, _) => "timestamp".into(),
        DataType::Decimal128(p, s) => format!("decimal({p},{s})"),
        DataType::List(f) | DataType::LargeList(f) => {
            format!("array<{}>", athena_type(f.data_type())?)
        }
        _ => return None,
    })
}

/// What `athena-ddl` is asked for beyond the tables.
#[derive(Debug, Clone, Default)]
pub struct DdlOptions {
    /// The first year the lake holds: the `year` projection runs from it to `NOW`.
    pub first_year: i32,
    /// The tenants, for an `enum` projection of `tenant` and a database of views per tenant;
    /// empty: `injected` (every query names its tenant).
    pub tenants: Vec<String>,
}

/// `CREATE EXTERNAL TABLE` statements for every output, with partition projection, and for
/// an aggregation stored as parts a `CREATE VIEW` that merges them under the output's name.
/// `location` is the lake's S3 URL (`s3://bucket/prefix`).
///
/// The `year` projection is a `date` in `yyyy` from `first_year` to `NOW`, one a year, so a
/// query without a time filter enumerates (years so far) × 12 × 31 × 24 locations, not the
/// 81 years of a fixed 2020–2100 range. A table partitioned by tenant has `tenant` first: an
/// `enum` of the given tenants, or `injected`. With tenants given, each gets a database
/// `<database>_<tenant>` whose views show only its rows.
pub fn athena_ddl(
    pipeline: &str,
    database: &str,
    location: &str,
    tables: &[Table],
    opts: &DdlOptions,
) -> std::result::Result<String, String> {
    let base = location.trim_end_matches('/');
    let mut out = String::new();
    let prefix = pipeline.replace('-', "_");
    for t in &opts.tenants {
        if crate::sink::partition::unsafe_in_path(t).is_some()
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "--tenants: {t:?} is not a tenant name Athena can enumerate (letters, digits, - and _)"
            ));
        }
    }
    let mut per_tenant = Vec::new();
    for t in tables {
        let (name, schema) = (&t.name, t.file_schema());
        let table = format!("{prefix}_{}", t.files_name());
        let mut cols = Vec::new();
        for f in schema.fields() {
            let ty = athena_type(f.data_type()).ok_or_else(|| {
                format!(
                    "output {name}: column {} has type {} that Athena cannot read",
                    f.name(),
                    f.data_type()
                )
            })?;
            cols.push(format!("  `{}` {ty}", f.name()));
        }
        let loc = format!("{base}/{name}/");
        let partitions = t.partition_columns();
        if t.delta {
            // Athena reads a Delta table's columns, partitions and files from its log.
            out.push_str(&format!(
                "CREATE EXTERNAL TABLE IF NOT EXISTS `{database}`.`{table}`\n\
                 LOCATION '{loc}'\n\
                 TBLPROPERTIES ('table_type'='DELTA');\n\n"
            ));
        } else {
            let (tenant_props, tenant_path) = match &t.partition_by {
                Some(c) if opts.tenants.is_empty() => (
                    format!("  'projection.{c}.type'='injected',\n"),
                    format!("{c}=${{{c}}}/"),
                ),
                Some(c) => (
                    format!(
                        "  'projection.{c}.type'='enum',\n  'projection.{c}.values'='{}',\n",
                        opts.tenants.join(",")
                    ),
                    format!("{c}=${{{c}}}/"),
                ),
                None => (String::new(), String::new()),
            };
            out.push_str(&format!(
            "CREATE EXTERNAL TABLE IF NOT EXISTS `{database}`.`{table}` (\n{}\n)\n\
             PARTITIONED BY ({})\n\
             STORED AS PARQUET\n\
             LOCATION '{loc}'\n\
             TBLPROPERTIES (\n  'parquet.compression'='ZSTD',\n  'projection.enabled'='true',\n\
             {tenant_props}  \
             'projection.year.type'='date',\n  'projection.year.format'='yyyy',\n  \
             'projection.year.range'='{},NOW',\n  'projection.year.interval'='1',\n  \
             'projection.year.interval.unit'='YEARS',\n  \
             'projection.month.type'='integer',\n  'projection.month.range'='1,12',\n  'projection.month.digits'='2',\n  \
             'projection.day.type'='integer',\n  'projection.day.range'='1,31',\n  'projection.day.digits'='2',\n  \
             'projection.hour.type'='integer',\n  'projection.hour.range'='0,23',\n  'projection.hour.digits'='2',\n  \
             'storage.location.template'='{loc}{tenant_path}year=${{year}}/month=${{month}}/day=${{day}}/hour=${{hour}}/'\n);\n\n",
            cols.join(",\n"),
            partitions
                .iter()
                .map(|c| format!("`{c}` string"))
                .collect::<Vec<_>>()
                .join(", "),
            opts.first_year,
        ));
        }
        let readable = match &t.merge {
            Some(m) => {
                // Athena views use Trino SQL; the merge is written in the subset DataFusion
                // and Trino share.
                let parts = format!("\"{database}\".\"{table}\"");
                out.push_str(&format!(
                    "CREATE OR REPLACE VIEW \"{database}\".\"{prefix}_{name}\" AS\n{};\n\n",
                    m.merge_sql(&parts, &partitions)
                ));
                format!("{prefix}_{name}")
            }
            None => table.clone(),
        };
        if let Some(c) = &t.partition_by {
            per_tenant.push((readable, c.clone()));
        }
    }
    for tenant in &opts.tenants {
        let db = format!("{database}_{}", tenant.replace('-', "_"));
        out.push_str(&format!("CREATE DATABASE IF NOT EXISTS `{db}`;\n\n"));
        for (readable, c) in &per_tenant {
            out.push_str(&format!(
                "CREATE OR REPLACE VIEW \"{db}\".\"{readable}\" AS\nSELECT * FROM \"{database}\".\"{readable}\" WHERE \"{c}\" = '{tenant}';\n\n"
            ));
        }
    }
    Ok(out)
}
