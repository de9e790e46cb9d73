//! Where the tables go. A [`Lake`] stages files where readers do not see them and publishes
//! them (idempotently) when their commit is prepared; [`writer`] keeps one Parquet writer per
//! `year=/month=/day=/hour=` partition of each output.

pub mod local;
pub mod partition;
pub mod writer;

use std::io::{self, Write};

use serde::{Deserialize, Serialize};

/// A file written but not yet visible, named in a commit intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedFile {
    pub output: String,
    /// Final key relative to the lake root: `<output>/year=…/hour=…/part-….parquet`.
    pub key: String,
    pub rows: u64,
    pub bytes: u64,
}

/// A file being staged. `finish` makes its bytes durable (not yet visible).
pub trait Staging: Write + Send {
    fn finish(self: Box<Self>) -> io::Result<()>;
}

/// A lake location: the local directory now, S3 later.
pub trait Lake: Send + Sync + std::fmt::Debug {
    /// Opens a staging file for `key`.
    fn stage(&self, key: &str) -> io::Result<Box<dyn Staging>>;
    /// Makes a staged file visible under its key. Doing it again is harmless.
    fn publish(&self, file: &StagedFile) -> io::Result<()>;
    /// Removes staged files that no commit names (call with no intent pending).
    fn remove_orphans(&self, outputs: &[&str]) -> io::Result<usize>;
    /// Where `shardlake query` reads an output from (a directory or URL ending in `/`).
    fn table_url(&self, output: &str) -> String;
}
