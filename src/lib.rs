//! shardlake: event-time stream processing for sensor fleets.
//!
//! # Layout
//!
//! A record's path through the crate, in order:
//!
//! - **Record** — [`record`]: what every stage hands on: [`record::RawChunk`] (shard,
//!   sequence numbers, bytes) and positions in a shard; [`columns`] names every column
//!   shardlake adds to a table.
//! - **Source** — [`source`]: a [`source::Stream`] lists its shards and opens a reader per
//!   shard: the local stream ([`source::local`], the files [`localstream`] defines) or
//!   Kinesis ([`source::kinesis`], with KPL de-aggregation in [`source::kinesis::kpl`]),
//!   or objects in S3 and files in a directory ([`source::objects`]);
//!   [`source::task`] is the one place a shard's task is spawned (children after parents).
//! - **Decode** — [`decode`]: JSON to Arrow against the record schema; records that do not
//!   fit become dead letters with a reason.
//! - **Windows and alerts** — [`engine`]: the event-time watermark and window arithmetic
//!   ([`engine::window`]), per-aggregation buffers of open windows emitted through DataFusion
//!   SQL ([`engine::sql`]), mergeable partial aggregates ([`engine::merge`]), alert
//!   predicates on records and on window rows, late records.
//! - **Sink** — [`sink`]: one Parquet file per `year=/month=/day=/hour=` partition of each
//!   output ([`sink::writer`], [`sink::partition`]), staged then published in a lake
//!   ([`sink::local`], [`sink::s3`]); with `format: delta` each output is also a Delta table
//!   whose log makes a commit's files visible at once ([`sink::delta`]).
//! - **Checkpoint** — [`checkpoint`]: the exactly-once commit protocol
//!   ([`checkpoint::commit`]: stage, prepare, publish, commit; recovery runs the same steps),
//!   and where checkpoints and intents live: one worker's file ([`checkpoint::local`]) or the
//!   DynamoDB lease table shared by many workers ([`checkpoint::dynamodb`]).
//!
//! The run loop is [`pipeline`]: one entry point shared by `main`, the demo and the tests,
//! running sessions over a set of shards.
//!
//! People see it through the [`console`] (fleet page, alert feed, device history, query API),
//! fed by every worker's [`live`] state.
//!
//! Around it: [`config`] (pipeline and schema YAML, validation), [`notify`] (alerts to SNS and
//! webhooks), [`tools`] (`shardlake query`, `athena-ddl`, `compact` and `vacuum`, the MQTT bridge), [`ops`]
//! (`/metrics`, `/healthz` and `/live`), [`aws`] (SDK set-up), [`retry`] (backoff and the
//! classification of retryable errors), [`clock`], [`failpoint`], [`metrics`], [`logs`].
//!
//! The Pi agent is [`agent`]; it and the modules it uses ([`localstream`], [`config`],
//! [`columns`], [`retry`]) build without the `pipeline` feature, so the agent never links
//! DataFusion, Arrow or Parquet.
//!
//! The design decisions behind this layout are in `docs/ARCHITECTURE.md`.

pub mod agent;
pub mod clock;
pub mod columns;
pub mod config;
pub mod failpoint;
pub mod localstream;
pub mod logs;
pub mod metrics;
pub mod record;
pub mod retry;

#[cfg(any(feature = "pipeline", feature = "agent-kinesis"))]
pub mod aws;
#[cfg(feature = "pipeline")]
pub mod checkpoint;
#[cfg(feature = "pipeline")]
pub mod console;
#[cfg(feature = "pipeline")]
pub mod decode;
#[cfg(feature = "pipeline")]
pub mod engine;
#[cfg(feature = "pipeline")]
pub mod live;
#[cfg(feature = "pipeline")]
pub mod notify;
#[cfg(feature = "pipeline")]
pub mod ops;
#[cfg(feature = "pipeline")]
pub mod pipeline;
#[cfg(feature = "pipeline")]
pub mod sink;
#[cfg(feature = "pipeline")]
pub mod source;
#[cfg(feature = "pipeline")]
pub mod tools;
