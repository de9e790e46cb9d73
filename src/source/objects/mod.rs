//! Objects as a source: the objects under an S3 prefix, or the files under a local
//! directory, each read once as a stream of records, through the same decoder, dead-letter
//! reasons, windows and exactly-once commits as a stream.
//!
//! Each object is a shard: its id is `<key>@<ETag>`, a record's position is the byte offset
//! (in the decompressed content) just after its line or CSV row, and the checkpoint store
//! remembers per shard how far it was committed and that it ended. So a crash resumes an
//! object at its committed position, an object read to its end is never read again, and an
//! object overwritten with new content (a new ETag) is a new shard, read again whole.
//!
//! Listing ([`ObjectStream::list_shards`]) sees every object under the prefix, after
//! `start_after`, in key order; the session skips the shards whose checkpoints say they
//! ended, and lists again every `poll_interval` for new objects (`--drain` ends once every
//! listed object is read). At most `concurrency` objects are read at once, each by a
//! blocking task ([`read`]) that streams the body through the decompressor and hands
//! chunks over a channel of two: memory depends on the chunk size, not the object's.
//!
//! With `notifications` ([`queue`]), the objects come from S3 event notifications in an
//! SQS queue instead of a listing; the session adds each as a shard while it runs and
//! deletes a message once its objects are committed.
//!
//! Both stores are `object_store`'s (`AmazonS3`, `LocalFileSystem`), the crate `shardlake
//! query` reads S3 lakes with; the S3 client has the SDK's credentials and endpoint
//! ([`crate::aws::s3_object_store`]).

pub mod queue;
mod read;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore};
use tokio::sync::{Semaphore, mpsc};

use super::{ShardReader, SourceError};
use crate::config::{FieldType, ObjectSource, ObjectStoreAt, Pipeline};
use crate::metrics::Metrics;
use crate::record::{Position, RawChunk, SeqNo};

/// A prefix of objects (or a directory of files), opened.
#[derive(Clone)]
pub struct ObjectStream {
    store: Arc<dyn ObjectStore>,
    /// What the configuration says: the store's name for messages, the prefix.
    what: String,
    prefix: String,
    cfg: ObjectSource,
    /// The schema's fields, so that CSV cells become JSON values of the schema's types.
    fields: Arc<HashMap<String, FieldType>>,
    permits: Arc<Semaphore>,
    /// The last listing (or the objects notifications named): shard id to its object.
    listed: Arc<Mutex<HashMap<String, ObjectMeta>>>,
    /// Objects given up on (a poison object's notification came back too often): why.
    poisoned: Arc<Mutex<HashMap<String, String>>>,
    /// With `notifications`: the queue.
    queue: Option<queue::Queue>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for ObjectStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStream")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl ObjectStream {
    pub async fn open(
        cfg: &ObjectSource,
        p: &Pipeline,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SourceError> {
        let mut queue = None;
        let (store, what, prefix): (Arc<dyn ObjectStore>, _, _) =
            match &cfg.store {
                ObjectStoreAt::S3 {
                    bucket,
                    prefix,
                    region,
                } => {
                    let what = format!("s3://{bucket}/{prefix}");
                    let store = crate::aws::s3_object_store(bucket, region.as_deref(), None)
                        .await
                        .map_err(|e| SourceError::Stream {
                            path: what.clone(),
                            message: e.to_string(),
                        })?;
                    if let Some(n) = &cfg.notifications {
                        queue = Some(queue::Queue::connect(n, bucket, region.as_deref()).await?);
                    }
                    (Arc::new(store), what, prefix.clone())
                }
                ObjectStoreAt::Files(dir) => {
                    let what = dir.display().to_string();
                    let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
                        .map_err(|e| SourceError::Stream {
                            path: what.clone(),
                            message: format!(
                                "{e}; source.files.path must be an existing directory"
                            ),
                        })?;
                    (Arc::new(store), what, String::new())
                }
            };
        let fields = p
            .schema
            .fields
            .iter()
            .map(|f| (f.name.clone(), f.ty))
            .collect();
        Ok(Self {
            store,
            what,
            prefix,
            cfg: cfg.clone(),
            fields: Arc::new(fields),
            permits: Arc::new(Semaphore::new(cfg.concurrency)),
            listed: Arc::default(),
            poisoned: Arc::default(),
            queue,
            metrics,
        })
    }

    /// With `notifications`: starts receiving (`wait`: the long poll) and hands the messages
    /// over a channel of one.
    pub fn receive(&self, wait: std::time::Duration) -> Option<mpsc::Receiver<queue::Polled>> {
        let queue = self.queue.clone()?;
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(queue.poll(self.store.clone(), self.prefix.clone(), wait, tx));
        Some(rx)
    }

    pub fn queue(&self) -> Option<&queue::Queue> {
        self.queue.as_ref()
    }

    /// An object a notification named: its shard, readable by [`ObjectStream::reader`].
    pub fn admit(&self, meta: ObjectMeta) -> Arc<str> {
        let id = shard_id(&meta);
        self.listed
            .lock()
            .expect("not poisoned")
            .insert(id.clone(), meta);
        Arc::from(id)
    }

    /// The rest of `shard` goes to dead-letter unread, with `why`.
    pub fn give_up(&self, shard: &str, why: String) {
        self.poisoned
            .lock()
            .expect("not poisoned")
            .insert(shard.to_string(), why);
    }

    /// How often the prefix is listed again.
    pub fn poll_interval(&self) -> std::time::Duration {
        self.cfg.poll_interval
    }

    /// Every object under the prefix after `start_after`, in key order, as shards.
    /// With `notifications`: none (the queue names them).
    pub async fn list_shards(&self) -> Result<Vec<Arc<str>>, SourceError> {
        if self.queue.is_some() {
            return Ok(Vec::new());
        }
        // object_store lists by whole path segments: list the prefix's folder, keep the keys
        // that start with the prefix (`uploads/2026-` is a prefix of keys, not a folder).
        let folder = self
            .prefix
            .rsplit_once('/')
            .map(|(dir, _)| dir)
            .unwrap_or("");
        let folder = (!folder.is_empty()).then(|| ObjectPath::from(folder));
        let mut listing = self.store.list(folder.as_ref());
        let mut objects = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| SourceError::Stream {
                path: self.what.clone(),
                message: format!("listing: {e}"),
            })?;
            let key = meta.location.as_ref();
            let after = self.cfg.start_after.as_deref().is_none_or(|s| key > s);
            if key.starts_with(&self.prefix) && after && !key.ends_with('/') {
                objects.push(meta);
            }
        }
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        let mut listed = self.listed.lock().expect("not poisoned");
        listed.clear();
        Ok(objects
            .into_iter()
            .map(|meta| {
                let id = shard_id(&meta);
                listed.insert(id.clone(), meta);
                Arc::from(id)
            })
            .collect())
    }

    /// A reader of the object `shard` after `from` (a byte offset).
    pub fn reader(&self, shard: Arc<str>, from: &Position) -> Box<dyn ShardReader> {
        let meta = self
            .listed
            .lock()
            .expect("not poisoned")
            .get(&*shard)
            .cloned();
        let poison = self.poisoned.lock().expect("not poisoned").remove(&*shard);
        Box::new(ObjectReader {
            shard,
            meta,
            poison,
            from: from.as_ref().and_then(SeqNo::as_u64).unwrap_or(0),
            stream: self.clone(),
            rx: None,
            ended: false,
        })
    }
}

/// `<key>@<ETag>`: a new version of an object is a new shard. (A store without ETags would
/// name the version by its size and time.)
fn shard_id(meta: &ObjectMeta) -> String {
    let version = match &meta.e_tag {
        Some(tag) => tag.trim_matches('"').to_string(),
        None => format!("{}-{}", meta.size, meta.last_modified.timestamp_micros()),
    };
    format!("{}@{version}", meta.location)
}

/// What an object's reading task hands its reader.
type Produced = Result<RawChunk, SourceError>;

struct ObjectReader {
    shard: Arc<str>,
    /// None: the object was not listed (it is looked up by its key).
    meta: Option<ObjectMeta>,
    poison: Option<String>,
    from: u64,
    stream: ObjectStream,
    rx: Option<mpsc::Receiver<Produced>>,
    ended: bool,
}

#[async_trait::async_trait]
impl ShardReader for ObjectReader {
    async fn read(
        &mut self,
        _max_records: usize,
        now_us: i64,
    ) -> Result<Option<RawChunk>, SourceError> {
        if self.ended {
            return Ok(None);
        }
        let stream = &self.stream;
        let rx = self.rx.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(2);
            let job = read::Job {
                shard: self.shard.clone(),
                meta: self.meta.take(),
                poison: self.poison.take(),
                from: self.from,
                store: stream.store.clone(),
                cfg: stream.cfg.clone(),
                fields: stream.fields.clone(),
                metrics: stream.metrics.clone(),
            };
            let permits = stream.permits.clone();
            tokio::spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                let rt = tokio::runtime::Handle::current();
                let _ = tokio::task::spawn_blocking(move || read::produce(job, &tx, &rt)).await;
            });
            rx
        });
        match rx.recv().await {
            Some(Ok(mut chunk)) => {
                chunk.arrival_us = now_us;
                Ok(Some(chunk))
            }
            Some(Err(e)) => Err(e),
            None => {
                self.ended = true;
                Ok(None)
            }
        }
    }

    fn ended(&self) -> bool {
        self.ended
    }
}
