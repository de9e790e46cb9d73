//! The Raspberry Pi sensor agent. For now: the oil-well simulator and the `local` transport
//! (a local stream, see [`crate::localstream`]). It never links DataFusion, Arrow or Parquet.

pub mod sim;
