//! Command-line tools around the pipeline: SQL over the lake ([`query`]), Athena DDL for the
//! same tables ([`athena`]), and the local stand-in for the IoT rule ([`bridge`]).

pub mod athena;
pub mod bridge;
pub mod query;
