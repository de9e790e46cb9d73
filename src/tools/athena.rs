//! `shardlake athena-ddl`: the lake's tables for Athena, with partition projection, and a view
//! merging each aggregation's parts.

use arrow::datatypes::{DataType, TimeUnit};

use super::query::{PARTITION_COLUMNS, Table};

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

/// `CREATE EXTERNAL TABLE` statements for every output, with partition projection, and for
/// an aggregation stored as parts a `CREATE VIEW` that merges them under the output's name.
/// `location` is the lake's S3 URL (`s3://bucket/prefix`).
pub fn athena_ddl(
    pipeline: &str,
    database: &str,
    location: &str,
    tables: &[Table],
) -> std::result::Result<String, String> {
    let base = location.trim_end_matches('/');
    let mut out = String::new();
    let prefix = pipeline.replace('-', "_");
    for t in tables {
        let (name, schema) = (&t.name, &t.schema);
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
        out.push_str(&format!(
            "CREATE EXTERNAL TABLE IF NOT EXISTS `{database}`.`{table}` (\n{}\n)\n\
             PARTITIONED BY (`year` string, `month` string, `day` string, `hour` string)\n\
             STORED AS PARQUET\n\
             LOCATION '{loc}'\n\
             TBLPROPERTIES (\n  'parquet.compression'='ZSTD',\n  'projection.enabled'='true',\n  \
             'projection.year.type'='integer',\n  'projection.year.range'='2020,2100',\n  \
             'projection.month.type'='integer',\n  'projection.month.range'='1,12',\n  'projection.month.digits'='2',\n  \
             'projection.day.type'='integer',\n  'projection.day.range'='1,31',\n  'projection.day.digits'='2',\n  \
             'projection.hour.type'='integer',\n  'projection.hour.range'='0,23',\n  'projection.hour.digits'='2',\n  \
             'storage.location.template'='{loc}year=${{year}}/month=${{month}}/day=${{day}}/hour=${{hour}}/'\n);\n\n",
            cols.join(",\n")
        ));
        if let Some(m) = &t.merge {
            // Athena views use Trino SQL; the merge is written in the subset DataFusion and
            // Trino share.
            let parts = format!("\"{database}\".\"{table}\"");
            out.push_str(&format!(
                "CREATE OR REPLACE VIEW \"{database}\".\"{prefix}_{name}\" AS\n{};\n\n",
                m.merge_sql(&parts, &PARTITION_COLUMNS)
            ));
        }
    }
    Ok(out)
}
