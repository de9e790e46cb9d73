//! Where the tables go. A [`Lake`] stages files where readers do not see them and publishes
//! them (idempotently) when their commit is prepared; [`writer`] keeps one Parquet writer per
//! `year=/month=/day=/hour=` partition of each output. [`Lakes`] maps each output to its
//! lake (a table may have its own `sink`).

pub mod delta;
pub mod local;
pub mod partition;
pub mod s3;
pub mod stats;
pub mod writer;

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::{LakeLocation, Pipeline};
use crate::metrics::Metrics;
use local::LocalLake;
use s3::S3Lake;

/// The pseudo-output of detector state snapshots: `_state/<pipeline>/<shard>/state-….json.zst`
/// in the alerts' lake. Staged, published and swept like a table's files, never queried.
pub const STATE_OUTPUT: &str = "_state";

/// A file written but not yet visible, named in a commit intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedFile {
    pub output: String,
    /// Final key relative to the lake root: `<output>/year=…/hour=…/part-….parquet`.
    pub key: String,
    pub rows: u64,
    pub bytes: u64,
    /// The S3 multipart upload holding the file; `None` on a local lake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<Upload>,
    /// Its Delta `stats` ([`stats::from_footer`]), from the writer's footer. Kept in memory
    /// only (an intent stays small in the checkpoint store): a recovered intent has none, and
    /// the Delta step reads them from the published file's footer.
    #[serde(skip)]
    pub stats: Option<String>,
}

/// An S3 multipart upload whose parts are all uploaded, waiting to be completed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    pub id: String,
    /// Part ETags in part-number order (part 1 first).
    pub etags: Vec<String>,
    /// Bytes in all parts: the object's size once completed.
    pub size: u64,
}

/// A file being staged. Bytes arrive in order; `finish` makes them durable (not visible) and
/// says what publishing needs.
#[async_trait]
pub trait Staging: Send {
    async fn write(&mut self, bytes: Bytes) -> io::Result<()>;
    async fn finish(self: Box<Self>) -> io::Result<Option<Upload>>;
}

/// A lake location: a local directory or an S3 bucket and prefix.
#[async_trait]
pub trait Lake: Send + Sync + std::fmt::Debug {
    /// Opens a staging file for `key`.
    async fn stage(&self, key: &str) -> io::Result<Box<dyn Staging>>;
    /// Makes a staged file visible under its key. Doing it again is harmless.
    async fn publish(&self, file: &StagedFile) -> io::Result<()>;
    /// Removes `worker`'s staged files of `outputs` (call with no intent pending: none of
    /// them is named by a commit).
    async fn remove_orphans(&self, outputs: &[&str], worker: &str) -> io::Result<usize>;
    /// A published file's bytes (detector state snapshots are read back this way).
    async fn read(&self, key: &str) -> io::Result<Bytes>;
    /// Removes a published file no checkpoint names any more; a missing one is no error.
    async fn remove(&self, key: &str) -> io::Result<()>;
    /// Whether staging can leave orphans behind while the worker runs, so that they must be
    /// swept after each commit too (S3: a `CreateMultipartUpload` whose answer was lost and
    /// that the SDK retried).
    fn sweep_after_commit(&self) -> bool {
        false
    }
}

/// Each output's lake.
#[derive(Debug, Clone)]
pub struct Lakes {
    by_output: BTreeMap<String, Arc<dyn Lake>>,
    /// The outputs kept as Delta tables, if any.
    delta: Option<Arc<delta::DeltaTables>>,
}

impl Lakes {
    pub fn new(by_output: BTreeMap<String, Arc<dyn Lake>>) -> Self {
        Self {
            by_output,
            delta: None,
        }
    }

    /// Every output's lake, connected (an S3 lake checks its bucket). Outputs with the same
    /// sink share one.
    pub async fn open(p: &Pipeline, metrics: &Arc<Metrics>) -> io::Result<Self> {
        let mut opened: Vec<(&LakeLocation, Arc<dyn Lake>)> = Vec::new();
        let mut by_output = BTreeMap::new();
        for (output, cfg) in &p.outputs.sinks {
            let lake = match opened.iter().find(|(c, _)| *c == cfg) {
                Some((_, l)) => l.clone(),
                None => {
                    let l: Arc<dyn Lake> = match cfg {
                        LakeLocation::Local { path } => Arc::new(LocalLake::new(path)),
                        LakeLocation::S3(loc) => {
                            Arc::new(S3Lake::connect(loc, metrics.clone()).await?)
                        }
                    };
                    opened.push((cfg, l.clone()));
                    l
                }
            };
            by_output.insert(output.clone(), lake);
        }
        // Detector state snapshots live beside the alerts they explain.
        if let Some(lake) = by_output.get(&p.outputs.alerts).cloned() {
            by_output.insert(STATE_OUTPUT.to_string(), lake);
        }
        let mut lakes = Self::new(by_output);
        lakes.delta = delta::DeltaTables::open(p).await?.map(Arc::new);
        Ok(lakes)
    }

    /// Every output in one lake.
    pub fn single(lake: Arc<dyn Lake>, outputs: &[&str]) -> Self {
        Self::new(
            outputs
                .iter()
                .map(|o| (o.to_string(), lake.clone()))
                .collect(),
        )
    }

    pub fn get(&self, output: &str) -> io::Result<&Arc<dyn Lake>> {
        self.by_output.get(output).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no output is named `{output}` in this pipeline"),
            )
        })
    }

    pub async fn publish(&self, file: &StagedFile) -> io::Result<()> {
        self.get(&file.output)?.publish(file).await
    }

    /// After every file of `intent` is published: its commit to each Delta table (nothing
    /// for the hive layout, where publishing the files was the commit).
    pub async fn commit_tables(&self, intent: &crate::checkpoint::Intent) -> io::Result<()> {
        match &self.delta {
            Some(d) => d.commit(intent).await,
            None => Ok(()),
        }
    }

    /// Removes `worker`'s staged files in every lake (`all`), or in those that must be swept
    /// after a commit. Call it only while no file is staged for a commit to come.
    pub async fn remove_orphans(&self, worker: &str, all: bool) -> io::Result<usize> {
        let mut removed = 0;
        let mut done: Vec<&Arc<dyn Lake>> = Vec::new();
        for lake in self.by_output.values() {
            if done.iter().any(|d| Arc::ptr_eq(d, lake)) || !(all || lake.sweep_after_commit()) {
                continue;
            }
            done.push(lake);
            let outputs: Vec<&str> = self
                .by_output
                .iter()
                .filter(|(_, l)| Arc::ptr_eq(l, lake))
                .map(|(o, _)| o.as_str())
                .collect();
            removed += lake.remove_orphans(&outputs, worker).await?;
        }
        Ok(removed)
    }
}
