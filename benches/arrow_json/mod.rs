//! arrow-json on its own, as the decoder before shardlake's used it, for comparison in both
//! benches: each chunk copied into one newline-separated buffer and decoded with timestamps
//! left as text. No strict syntax, no integer checks, no timestamp parsing, no dead-letter
//! path.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::json::ReaderBuilder;
use shardlake::config::{FieldType, Pipeline};
use shardlake::decode::arrow_type;
use shardlake::record::RawChunk;

/// The pipeline's record schema as arrow-json reads it: timestamps as text.
pub fn schema(p: &Pipeline) -> SchemaRef {
    Arc::new(Schema::new(
        p.schema
            .fields
            .iter()
            .map(|f| match f.ty {
                FieldType::Timestamp => Field::new(&f.name, DataType::Utf8, true),
                ty => Field::new(&f.name, arrow_type(ty), true),
            })
            .collect::<Vec<_>>(),
    ))
}

/// Decodes every chunk; returns the rows read.
pub fn decode(schema: &SchemaRef, chunks: &[RawChunk]) -> usize {
    let mut rows = 0;
    for c in chunks {
        let mut buf = Vec::with_capacity(c.data.len() + c.len());
        for i in 0..c.len() {
            buf.extend_from_slice(c.record(i));
            buf.push(b'\n');
        }
        let mut d = ReaderBuilder::new(schema.clone())
            .with_batch_size(c.len())
            .build_decoder()
            .unwrap();
        d.decode(&buf).unwrap();
        rows += d.flush().unwrap().map_or(0, |b| b.num_rows());
    }
    rows
}
