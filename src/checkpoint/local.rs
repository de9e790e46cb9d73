//! The local checkpoint store: `<dir>/<pipeline>/checkpoint.json`, replaced by an atomic
//! rename after an fsync, with a lock file so two processes never share it.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{CheckpointStore, Committed, Intent, StoreError, StoreState};

/// The file's content (the S3 store's object holds the same).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StoreFile {
    committed: Committed,
    pending: Option<Intent>,
}

impl StoreFile {
    pub(super) fn prepared(committed: &Committed, intent: &Intent) -> Self {
        Self {
            committed: committed.clone(),
            pending: Some(intent.clone()),
        }
    }

    pub(super) fn committed(intent: &Intent) -> Self {
        Self {
            committed: intent.next.clone(),
            pending: None,
        }
    }

    /// What a store holding this reports: the state once a pending intent is done.
    pub(super) fn state(self) -> StoreState {
        StoreState {
            committed: self
                .pending
                .as_ref()
                .map_or(self.committed, |i| i.next.clone()),
            pending: self.pending.into_iter().collect(),
        }
    }
}

#[derive(Debug)]
pub struct LocalStore {
    path: PathBuf,
    _lock: File,
}

impl LocalStore {
    pub fn open(dir: &Path, pipeline: &str) -> Result<Self, StoreError> {
        let dir = dir.join(pipeline);
        let io = |source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        };
        fs::create_dir_all(&dir).map_err(io)?;
        let lock = File::create(dir.join("LOCK")).map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(dir.display().to_string()));
            }
            Err(fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        Ok(Self {
            path: dir.join("checkpoint.json"),
            _lock: lock,
        })
    }

    fn write(&self, state: &StoreFile) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            path: self.path.display().to_string(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&serde_json::to_vec_pretty(state).expect("serializable"))
            .map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &self.path).map_err(io)?;
        File::open(self.path.parent().expect("in a directory"))
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

#[async_trait::async_trait]
impl CheckpointStore for LocalStore {
    async fn load(&self) -> Result<StoreState, StoreError> {
        let file: StoreFile = match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                path: self.path.display().to_string(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoreFile::default(),
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.path.display().to_string(),
                    source,
                });
            }
        };
        Ok(file.state())
    }

    async fn prepare(&self, committed: &Committed, intent: &Intent) -> Result<(), StoreError> {
        self.write(&StoreFile::prepared(committed, intent))
    }

    async fn commit(&self, intent: &Intent) -> Result<(), StoreError> {
        self.write(&StoreFile::committed(intent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn prepare_then_commit_and_the_lock_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), "p").unwrap();
        assert!(matches!(
            LocalStore::open(dir.path(), "p"),
            Err(StoreError::Locked(_))
        ));
        assert_eq!(store.load().await.unwrap(), StoreState::default());
        let intent = Intent {
            id: "w0-1".into(),
            files: vec![],
            next: Committed {
                commit_id: 1,
                ..Default::default()
            },
        };
        store.prepare(&Committed::default(), &intent).await.unwrap();
        let s = store.load().await.unwrap();
        assert_eq!(s.pending, vec![intent.clone()]);
        assert_eq!(
            s.committed.commit_id, 1,
            "the state once the intent is done"
        );
        store.commit(&intent).await.unwrap();
        let s = store.load().await.unwrap();
        assert_eq!((s.committed.commit_id, s.pending), (1, vec![]));
    }
}
