//! shardlake: event-time stream processing for sensor fleets.
//!
//! # Layout
//!
//! A record's path through the crate, in order:
//!
//! - **Source** — [`source`]: one task per shard reads chunks of raw records
//!   ([`record::RawChunk`]: shard, sequence numbers, bytes) from the local stream
//!   ([`source::local`], the files [`localstream`] defines) or Kinesis ([`source::kinesis`]).
//! - **Decode** — [`decode`]: JSON to Arrow in one strict pass per record, against the record
//!   schema; records that do not fit become dead letters with a reason.
//! - **Windows and alerts** — [`engine`]: event-time watermark ([`window`]), per-aggregation
//!   buffers of open windows emitted through DataFusion SQL ([`engine::sql`]), alert
//!   predicates on records and on window rows, late records.
//! - **Sink** — [`sink`]: one Parquet file per `year=/month=/day=/hour=` partition of each
//!   output ([`sink::writer`], [`sink::partition`]), staged then published in a lake
//!   ([`sink::local`], [`sink::s3`]).
//! - **Checkpoint** — [`checkpoint`]: the two-phase commit's intents and the per-shard,
//!   per-output checkpoints ([`checkpoint::local`]); with many workers, the DynamoDB lease
//!   table ([`lease`]).
//!
//! Around it: [`config`] (pipeline and schema YAML, validation), [`pipeline`] (the run loop
//! shared by `main`, the demo and the tests), [`notify`] (alerts to SNS and webhooks),
//! [`aws`] (SDK set-up), [`query`] (SQL over the lake, Athena DDL), [`bridge`] (MQTT → Kinesis
//! for local runs, as the IoT rule does),
//! [`clock`], [`failpoint`], [`metrics`], [`logs`]. The Pi agent is [`agent`]; it and the modules it
//! uses ([`localstream`], [`config`]) build without the `pipeline` feature.

pub mod agent;
pub mod backoff;
pub mod clock;
pub mod columns;
pub mod config;
pub mod failpoint;
pub mod localstream;
pub mod logs;
pub mod metrics;
pub mod record;
pub mod window;

#[cfg(any(feature = "pipeline", feature = "agent-kinesis"))]
pub mod aws;
#[cfg(feature = "pipeline")]
pub mod bridge;
#[cfg(feature = "pipeline")]
pub mod checkpoint;
#[cfg(feature = "pipeline")]
pub mod decode;
#[cfg(feature = "pipeline")]
pub mod engine;
#[cfg(feature = "pipeline")]
pub mod lease;
#[cfg(feature = "pipeline")]
pub mod notify;
#[cfg(feature = "pipeline")]
pub mod ops;
#[cfg(feature = "pipeline")]
pub mod pipeline;
#[cfg(feature = "pipeline")]
pub mod query;
#[cfg(feature = "pipeline")]
pub mod sink;
#[cfg(feature = "pipeline")]
pub mod source;
