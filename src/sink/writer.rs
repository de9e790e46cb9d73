//! One output's open Parquet files, one per hour partition (and tenant, in a lake partitioned
//! by tenant). Rows go to the partition of a timestamp column (event time, window start or
//! arrival time) and, when partitioned by tenant, of their `tenant` value: that column then
//! lives in the path (`tenant=<t>/year=…`), not in the files, as Hive, Athena and DuckDB
//! expect of a partition column. `stage` closes every file and returns what was written, for
//! the commit.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, SchemaRef};
use bytes::Bytes;
use futures::future::BoxFuture;
use parquet::arrow::AsyncArrowWriter;
use parquet::arrow::async_writer::AsyncFileWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use super::partition::{file_key, hour_of, partition_value};
use super::{Lake, StagedFile, Staging};
use crate::config::Rollover;
use crate::decode::SEQ_COL;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The lake could not be written (disk full, permissions, ...).
    #[error("writing {key}: {source}")]
    Io { key: String, source: std::io::Error },
    /// Parquet encoding failed.
    #[error("encoding {key}: {source}")]
    Parquet {
        key: String,
        source: parquet::errors::ParquetError,
    },
}

/// Hands the Parquet writer's bytes to a lake's staging file. The encoder buffers a row
/// group in memory and passes it on whole; `finish` is called separately, after the footer.
struct ToStaging(Box<dyn Staging>);

impl AsyncFileWriter for ToStaging {
    fn write(&mut self, bs: Bytes) -> BoxFuture<'_, parquet::errors::Result<()>> {
        Box::pin(async move {
            self.0
                .write(bs)
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))
        })
    }

    fn complete(&mut self) -> BoxFuture<'_, parquet::errors::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

struct OpenFile {
    key: String,
    writer: AsyncArrowWriter<ToStaging>,
    rows: u64,
}

/// What a table holds, for its encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Records as they came (raw, dead-letter, late) and alerts.
    Records,
    /// Window aggregates: computed, nearly unique floats.
    Aggregates,
}

/// The Parquet settings of a table's files (what the sink writes, and compaction rewrites).
pub fn properties(schema: &arrow::datatypes::Schema, kind: Table) -> WriterProperties {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("level 1")))
        .set_max_row_group_row_count(Some(256 * 1024))
        .set_created_by(format!("shardlake {}", env!("CARGO_PKG_VERSION")));
    // A dictionary only costs where nearly every value differs: each value is hashed and
    // interned until the dictionary page overflows. Sequence numbers are unique and
    // timestamps nearly so (benches/README.md: the interner was 13% of a run), and so are
    // computed floats such as averages (7% of a run without the raw table). Sensors'
    // readings repeat (a tenth of a degree), so records keep their float dictionaries:
    // without them, the raw table of benches/compare.py grew by a fifth.
    for field in schema.fields() {
        let unique = match field.data_type() {
            DataType::Timestamp(..) => true,
            DataType::Float32 | DataType::Float64 => kind == Table::Aggregates,
            _ => false,
        };
        if field.name() == SEQ_COL || unique {
            props =
                props.set_column_dictionary_enabled(ColumnPath::from(field.name().as_str()), false);
        }
    }
    props.build()
}

pub struct OutputWriter {
    pub name: String,
    /// The rows' schema (what `write` takes).
    schema: SchemaRef,
    /// The files' schema: `schema` without the partition-by column.
    file_schema: SchemaRef,
    /// Column whose hour decides the partition.
    time_column: usize,
    /// The column whose value partitions the files before time (`tenant`), by index in
    /// `schema`, with its name.
    partition_by: Option<(usize, String)>,
    props: WriterProperties,
    /// Open files by (partition value, or "" when not partitioned; hour).
    open: BTreeMap<(String, i64), OpenFile>,
    rollover: Rollover,
    lake: Arc<dyn Lake>,
    /// Wall clock of the first write since the files were last staged.
    opened_at: Option<i64>,
}

impl OutputWriter {
    /// `partition_by`: a column of `schema` whose value partitions the files before time
    /// (`tenant`); ignored when the schema has no such column.
    pub fn new(
        name: &str,
        schema: SchemaRef,
        time_column: &str,
        partition_by: Option<&str>,
        rollover: Rollover,
        lake: Arc<dyn Lake>,
        kind: Table,
    ) -> Self {
        let time_column = schema
            .index_of(time_column)
            .expect("partition column exists");
        let partition_by =
            partition_by.and_then(|c| schema.index_of(c).ok().map(|i| (i, c.to_string())));
        let file_schema = match &partition_by {
            Some((i, _)) => {
                let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
                fields.remove(*i);
                Arc::new(arrow::datatypes::Schema::new_with_metadata(
                    fields,
                    schema.metadata().clone(),
                ))
            }
            None => schema.clone(),
        };
        let props = properties(&schema, kind);
        Self {
            name: name.to_string(),
            schema,
            file_schema,
            time_column,
            partition_by,
            props,
            open: BTreeMap::new(),
            rollover,
            lake,
            opened_at: None,
        }
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Bytes in the largest open file (written plus buffered).
    pub fn largest_file(&self) -> u64 {
        self.open
            .values()
            .map(|f| (f.writer.bytes_written() + f.writer.in_progress_size()) as u64)
            .max()
            .unwrap_or(0)
    }

    /// True when this table's largest open file or its oldest data reached its rollover.
    pub fn due(&self, now_us: i64) -> bool {
        let aged = self
            .opened_at
            .is_some_and(|t| now_us - t >= self.rollover.max_age.as_micros() as i64);
        aged || self.largest_file() >= self.rollover.max_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Writes rows, each to the partition of its time column. Rows with a null time go to
    /// the partition of `fallback_us`.
    pub async fn write(
        &mut self,
        batch: &RecordBatch,
        commit: u64,
        worker: &str,
        fallback_us: i64,
    ) -> Result<(), WriteError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.opened_at.get_or_insert(fallback_us);
        let ts = batch
            .column(self.time_column)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .expect("partition column is a microsecond timestamp");
        let hours: Vec<i64> = (0..ts.len())
            .map(|i| {
                hour_of(if ts.is_valid(i) {
                    ts.value(i)
                } else {
                    fallback_us
                })
            })
            .collect();
        let values: Option<Vec<String>> = self.partition_by.as_ref().map(|(i, _)| {
            let col = cast(batch.column(*i), &DataType::Utf8).expect("any column casts to text");
            let col = col.as_any().downcast_ref::<StringArray>().expect("utf8");
            (0..col.len())
                .map(|r| partition_value(col.is_valid(r).then(|| col.value(r))))
                .collect()
        });
        let part_of = |r: usize| values.as_ref().map_or("", |v| v[r].as_str());
        let first = (part_of(0), hours[0]);
        if (0..hours.len()).all(|r| (part_of(r), hours[r]) == first) {
            let first = (first.0.to_string(), first.1);
            return self.write_to(first, batch, commit, worker).await;
        }
        let mut distinct: Vec<(String, i64)> = (0..hours.len())
            .map(|r| (part_of(r).to_string(), hours[r]))
            .collect();
        distinct.sort_unstable();
        distinct.dedup();
        for part in distinct {
            let mask: BooleanArray = (0..hours.len())
                .map(|r| Some(part_of(r) == part.0 && hours[r] == part.1))
                .collect();
            let rows = filter_record_batch(batch, &mask).expect("filter");
            self.write_to(part, &rows, commit, worker).await?;
        }
        Ok(())
    }

    async fn write_to(
        &mut self,
        part: (String, i64),
        batch: &RecordBatch,
        commit: u64,
        worker: &str,
    ) -> Result<(), WriteError> {
        if !self.open.contains_key(&part) {
            let partition = self
                .partition_by
                .as_ref()
                .map(|(_, name)| (name.as_str(), part.0.as_str()));
            let key = file_key(
                &self.name,
                partition,
                part.1,
                commit,
                worker,
                self.open.len(),
            );
            let staging = self
                .lake
                .stage(&key)
                .await
                .map_err(|source| WriteError::Io {
                    key: key.clone(),
                    source,
                })?;
            let writer = AsyncArrowWriter::try_new(
                ToStaging(staging),
                self.file_schema.clone(),
                Some(self.props.clone()),
            )
            .map_err(|source| WriteError::Parquet {
                key: key.clone(),
                source,
            })?;
            self.open.insert(
                part.clone(),
                OpenFile {
                    key,
                    writer,
                    rows: 0,
                },
            );
        }
        let f = self.open.get_mut(&part).expect("opened");
        let mut columns = batch.columns().to_vec();
        if let Some((i, _)) = &self.partition_by {
            columns.remove(*i);
        }
        let batch = RecordBatch::try_new(self.file_schema.clone(), columns).expect("same columns");
        f.writer
            .write(&batch)
            .await
            .map_err(|source| WriteError::Parquet {
                key: f.key.clone(),
                source,
            })?;
        f.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Closes every open file; they stay invisible until published.
    pub async fn stage(&mut self) -> Result<Vec<StagedFile>, WriteError> {
        self.opened_at = None;
        let mut out = Vec::with_capacity(self.open.len());
        for (_, mut f) in std::mem::take(&mut self.open) {
            let key = f.key;
            // Writes the footer and hands every byte to the staging file.
            let footer = f
                .writer
                .finish()
                .await
                .map_err(|source| WriteError::Parquet {
                    key: key.clone(),
                    source,
                })?;
            let bytes = f.writer.bytes_written() as u64;
            let upload =
                f.writer
                    .into_inner()
                    .0
                    .finish()
                    .await
                    .map_err(|source| WriteError::Io {
                        key: key.clone(),
                        source,
                    })?;
            out.push(StagedFile {
                output: self.name.clone(),
                key,
                rows: f.rows,
                bytes,
                upload,
                stats: Some(super::stats::from_footer(&footer)),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::local::LocalLake;
    use arrow::array::{ArrayRef, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::time::Duration;

    #[tokio::test]
    async fn a_table_is_due_by_its_own_size_and_age() {
        let dir = tempfile::tempdir().unwrap();
        let lake: Arc<dyn Lake> = Arc::new(LocalLake::new(dir.path()));
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "t",
                DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("v", DataType::Int64, false),
        ]));
        let rollover = Rollover {
            max_bytes: 64 << 10,
            max_age: Duration::from_secs(60),
        };
        let mut w = OutputWriter::new(
            "t",
            schema.clone(),
            "t",
            None,
            rollover,
            lake,
            Table::Records,
        );
        assert!(!w.due(0), "nothing written");
        let batch = |n: i64| {
            let t: ArrayRef =
                Arc::new(TimestampMicrosecondArray::from(vec![0; n as usize]).with_timezone("UTC"));
            let v: ArrayRef = Arc::new(Int64Array::from(
                (0..n).map(|i| i * 7919 % 1_000_003).collect::<Vec<_>>(),
            ));
            RecordBatch::try_new(schema.clone(), vec![t, v]).unwrap()
        };
        w.write(&batch(10), 1, "w0", 1_000_000).await.unwrap();
        assert!(!w.due(1_000_000 + 59_999_999));
        assert!(w.due(1_000_000 + 60_000_000), "by age");
        let staged = w.stage().await.unwrap();
        assert_eq!(staged.iter().map(|f| f.rows).sum::<u64>(), 10);
        assert!(!w.due(i64::MAX / 2), "staging starts over");
        for _ in 0..20 {
            w.write(&batch(10_000), 2, "w0", 0).await.unwrap();
        }
        assert!(w.due(0), "by size: {} bytes", w.largest_file());
    }
}
