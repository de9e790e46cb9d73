//! One output's open Parquet files, one per hour partition. Rows go to the partition of a
//! timestamp column (event time, window start or arrival time); `stage` closes every file
//! and returns what was written, for the commit.

use arrow::array::{Array, BooleanArray, RecordBatch, TimestampMicrosecondArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use std::collections::BTreeMap;

use super::partition::{file_key, hour_of};
use super::{Lake, StagedFile, Staging};

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

struct OpenFile {
    key: String,
    writer: ArrowWriter<Box<dyn Staging>>,
    rows: u64,
}

pub struct OutputWriter {
    pub name: String,
    schema: SchemaRef,
    /// Column whose hour decides the partition.
    time_column: usize,
    props: WriterProperties,
    open: BTreeMap<i64, OpenFile>,
}

impl OutputWriter {
    pub fn new(name: &str, schema: SchemaRef, time_column: &str) -> Self {
        let time_column = schema
            .index_of(time_column)
            .expect("partition column exists");
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("level 1")))
            .set_max_row_group_row_count(Some(256 * 1024))
            .set_created_by(format!("shardlake {}", env!("CARGO_PKG_VERSION")))
            .build();
        Self {
            name: name.to_string(),
            schema,
            time_column,
            props,
            open: BTreeMap::new(),
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

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Writes rows, each to the partition of its time column. Rows with a null time go to
    /// the partition of `fallback_us`.
    pub fn write(
        &mut self,
        lake: &dyn Lake,
        batch: &RecordBatch,
        commit: u64,
        worker: &str,
        fallback_us: i64,
    ) -> Result<(), WriteError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
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
        let first = hours[0];
        if hours.iter().all(|&h| h == first) {
            return self.write_to(lake, first, batch, commit, worker);
        }
        let mut distinct = hours.clone();
        distinct.sort_unstable();
        distinct.dedup();
        for hour in distinct {
            let mask: BooleanArray = hours.iter().map(|&h| Some(h == hour)).collect();
            let part = filter_record_batch(batch, &mask).expect("filter");
            self.write_to(lake, hour, &part, commit, worker)?;
        }
        Ok(())
    }

    fn write_to(
        &mut self,
        lake: &dyn Lake,
        hour: i64,
        batch: &RecordBatch,
        commit: u64,
        worker: &str,
    ) -> Result<(), WriteError> {
        if !self.open.contains_key(&hour) {
            let key = file_key(&self.name, hour, commit, worker, self.open.len());
            let staging = lake.stage(&key).map_err(|source| WriteError::Io {
                key: key.clone(),
                source,
            })?;
            let writer =
                ArrowWriter::try_new(staging, self.schema.clone(), Some(self.props.clone()))
                    .map_err(|source| WriteError::Parquet {
                        key: key.clone(),
                        source,
                    })?;
            self.open.insert(
                hour,
                OpenFile {
                    key,
                    writer,
                    rows: 0,
                },
            );
        }
        let f = self.open.get_mut(&hour).expect("opened");
        let batch = if batch.schema() == self.schema {
            batch.clone()
        } else {
            RecordBatch::try_new(self.schema.clone(), batch.columns().to_vec())
                .expect("same columns")
        };
        f.writer
            .write(&batch)
            .map_err(|source| WriteError::Parquet {
                key: f.key.clone(),
                source,
            })?;
        f.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Closes every open file; they stay invisible until published.
    pub fn stage(&mut self) -> Result<Vec<StagedFile>, WriteError> {
        let mut out = Vec::with_capacity(self.open.len());
        for (_, f) in std::mem::take(&mut self.open) {
            let key = f.key;
            // Footer excluded: a few KiB at most.
            let bytes = (f.writer.bytes_written() + f.writer.in_progress_size()) as u64;
            // Writes the footer.
            let staging = f
                .writer
                .into_inner()
                .map_err(|source| WriteError::Parquet {
                    key: key.clone(),
                    source,
                })?;
            staging.finish().map_err(|source| WriteError::Io {
                key: key.clone(),
                source,
            })?;
            out.push(StagedFile {
                output: self.name.clone(),
                key,
                rows: f.rows,
                bytes,
            });
        }
        Ok(out)
    }
}
