//! The Raspberry Pi sensor agent. It never links DataFusion, Arrow or Parquet.
//!
//! - [`config`]: `agent.yaml` (device, sensors, queue, batching, transport).
//! - [`sensor`]: DS18B20, IIO, hwmon, thermal zones, a command, the oil-well simulator.
//! - [`queue`]: the durable on-disk queue; readings leave it only when acknowledged.
//! - [`run`]: one task per sensor → the queue → the transport (`local`: a local stream;
//!   [`mqtt`]: IoT Core or any broker, TLS with the device certificate, QoS 1).
//! - [`sim`]: the bulk simulator behind `shardlake-agent simulate`.

pub mod config;
#[cfg(feature = "agent-kinesis")]
pub mod kinesis;
pub mod mqtt;
pub mod queue;
pub mod run;
pub mod sensor;
pub mod sim;
