//! The S3 checkpoint store: `<prefix>/<pipeline>/checkpoint.json` in a bucket, for one worker
//! whose checkpoints must outlive its machine (an ECS task reading objects, with nothing but
//! ephemeral disk). The same content as the local store's file, replaced whole on every
//! prepare and commit.
//!
//! Every write is conditional on the version this store last read or wrote (`If-Match`, or
//! `If-None-Match: *` for the first), and loading writes the state back at once: it claims
//! the checkpoints. So the newest worker on them takes over and the one before fails at its
//! next write with [`StoreError::Conflict`] (an ECS task replaced while the old one still
//! runs), never overwriting each other; and no worker prepares a commit after another began
//! its recovery (which removes files staged and never prepared), which the local store's lock
//! file ensures on one machine.

use std::sync::Mutex;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, UpdateVersion};

use super::local::StoreFile;
use super::{CheckpointStore, Committed, Intent, StoreError, StoreState};

#[derive(Debug)]
pub struct S3Store {
    store: Box<dyn ObjectStore>,
    path: Path,
    /// `s3://bucket/key`, for messages.
    url: String,
    /// The ETag of the version last read or written; None: there is none yet.
    version: Mutex<Option<String>>,
}

impl S3Store {
    pub async fn open(
        bucket: &str,
        prefix: &str,
        region: Option<&str>,
        pipeline: &str,
    ) -> Result<Self, StoreError> {
        let key = [prefix, pipeline, "checkpoint.json"]
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("/");
        let url = format!("s3://{bucket}/{key}");
        let store = crate::aws::s3_object_store(bucket, region, None)
            .await
            .map_err(|e| io(&url, e))?;
        Ok(Self::on(Box::new(store), Path::from(key), url))
    }

    /// The store at `path` of `store` (tests use a local one).
    pub fn on(store: Box<dyn ObjectStore>, path: Path, url: String) -> Self {
        Self {
            store,
            path,
            url,
            version: Mutex::new(None),
        }
    }

    async fn write(&self, state: &StoreFile) -> Result<(), StoreError> {
        let body = serde_json::to_vec_pretty(state).expect("serializable");
        let known = self.version.lock().expect("not poisoned").clone();
        let mode = match known {
            Some(e_tag) => PutMode::Update(UpdateVersion {
                e_tag: Some(e_tag),
                version: None,
            }),
            None => PutMode::Create,
        };
        let put = self
            .store
            .put_opts(&self.path, body.into(), PutOptions::from(mode))
            .await;
        match put {
            Ok(done) => {
                *self.version.lock().expect("not poisoned") = done.e_tag;
                Ok(())
            }
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. },
            ) => Err(StoreError::Conflict(self.url.clone())),
            Err(e) => Err(io(&self.url, e)),
        }
    }
}

fn io(url: &str, e: object_store::Error) -> StoreError {
    StoreError::Io {
        path: url.to_string(),
        source: std::io::Error::other(e),
    }
}

#[async_trait::async_trait]
impl CheckpointStore for S3Store {
    async fn load(&self) -> Result<StoreState, StoreError> {
        let (file, version) = match self.store.get(&self.path).await {
            Ok(got) => {
                let version = got.meta.e_tag.clone();
                let bytes = got.bytes().await.map_err(|e| io(&self.url, e))?;
                let file: StoreFile =
                    serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                        path: self.url.clone(),
                        source,
                    })?;
                (file, version)
            }
            Err(object_store::Error::NotFound { .. }) => (StoreFile::default(), None),
            Err(e) => return Err(io(&self.url, e)),
        };
        *self.version.lock().expect("not poisoned") = version;
        // The claim: from here on, a worker that loaded before this cannot write.
        self.write(&file).await?;
        Ok(file.state())
    }

    async fn prepare(&self, committed: &Committed, intent: &Intent) -> Result<(), StoreError> {
        self.write(&StoreFile::prepared(committed, intent)).await
    }

    async fn commit(&self, intent: &Intent) -> Result<(), StoreError> {
        self.write(&StoreFile::committed(intent)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_are_conditional_on_the_version_read() {
        // Two stores on one bucket (object_store's in-memory one applies conditions as S3 does).
        let bucket = std::sync::Arc::new(object_store::memory::InMemory::new());
        let at = || {
            let shared: Box<dyn ObjectStore> = Box::new(bucket.clone());
            S3Store::on(shared, Path::from("p/checkpoint.json"), "test".into())
        };
        let (a, b) = (at(), at());
        let intent = Intent {
            id: "w0-1".into(),
            files: vec![],
            next: Committed {
                commit_id: 1,
                ..Default::default()
            },
        };
        assert_eq!(a.load().await.unwrap(), StoreState::default());
        a.prepare(&Committed::default(), &intent).await.unwrap();
        a.commit(&intent).await.unwrap();
        // b loads: it claims the checkpoints, a can no longer write.
        let s = b.load().await.unwrap();
        assert_eq!((s.committed.commit_id, s.pending), (1, vec![]));
        assert!(
            matches!(
                a.prepare(&Committed::default(), &intent).await,
                Err(StoreError::Conflict(_))
            ),
            "the worker that loaded before the other's claim cannot write"
        );
        b.prepare(&s.committed, &intent).await.unwrap();
        b.commit(&intent).await.unwrap();
        // Two loads racing on a missing object: one claim wins.
        let fresh = || {
            S3Store::on(
                Box::new(bucket.clone()),
                Path::from("q/checkpoint.json"),
                "test".into(),
            )
        };
        let (c, d) = (fresh(), fresh());
        let (lc, ld) = tokio::join!(c.load(), d.load());
        assert!(lc.is_ok() || ld.is_ok(), "one of them claims it");
    }
}
