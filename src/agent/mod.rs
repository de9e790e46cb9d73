//! The Raspberry Pi sensor agent. It never links DataFusion, Arrow or Parquet.
//!
//! - [`config`]: `agent.yaml` (device, sensors, queue, batching, transport).
//! - [`commands`]: desired state in, reported state out (retained MQTT topics).
//! - [`sensor`]: DS18B20, IIO, hwmon, thermal zones, a command, the oil-well simulator.
//! - [`queue`]: the durable on-disk queue; readings leave it only when acknowledged.
//! - [`run`]: one task per sensor → the queue → the transport.
//! - [`transport`]: where batches go (`local`: a local stream; [`transport::mqtt`]: IoT Core or any
//!   broker, TLS with the device certificate, QoS 1; `kinesis`: PutRecords). It depends on
//!   [`queue`] and [`config`] only; [`run`] depends on it, never the other way.
//! - [`sim`]: the bulk simulator behind `shardlake-agent simulate`.

pub mod commands;
pub mod config;
pub mod queue;
pub mod run;
pub mod sensor;
pub mod sim;
pub mod transport;
