//! Command-line tools around the pipeline: SQL over the lake ([`query`]), Athena DDL for the
//! same tables ([`athena`]), the local stand-in for the IoT rule ([`bridge`]), and a device's
//! desired state by hand ([`device`]).

pub mod athena;
pub mod bridge;
pub mod compact;
pub mod device;
pub mod query;
