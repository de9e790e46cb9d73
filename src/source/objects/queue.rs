//! `source.s3.notifications`: the objects to read come from S3 event notifications in an
//! SQS queue (S3 → SQS directly, or EventBridge → SQS) instead of a listing.
//!
//! A poller task long-polls the queue and hands each message, with the objects it names, to
//! the session over a channel of one (a busy pipeline stops receiving). The session reads
//! each object as a shard and deletes a message only once every object it names is committed
//! to its end, extending the message's visibility timeout while it works. A crash before
//! that leaves the message to come back after its visibility timeout; an object already
//! committed is then not read again, only its message deleted. A message received more than
//! `max_receives` times sends its unfinished objects to dead-letter whole
//! (`object_unreadable`) and is deleted, so a poison object does not come back forever. S3's
//! test event, messages for another bucket or outside the prefix are deleted unread (logged).

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::MessageSystemAttributeName;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::aws;
use crate::config::ObjectNotifications;
use crate::retry::{self, Fault};
use crate::source::SourceError;

/// The queue, connected.
#[derive(Debug, Clone)]
pub struct Queue {
    client: aws_sdk_sqs::Client,
    url: String,
    cfg: ObjectNotifications,
    bucket: String,
}

/// One message: the objects it names (under the prefix, in the bucket), as they are now.
#[derive(Debug, Clone)]
pub struct Message {
    pub receipt: String,
    /// How often it was received, this time included.
    pub receives: u32,
    pub objects: Vec<ObjectMeta>,
}

/// An object as a notification names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub key: String,
    pub etag: Option<String>,
    pub size: u64,
}

/// What the poller hands the session.
#[derive(Debug)]
pub enum Polled {
    Message(Message),
    /// A receive found the queue empty.
    Empty,
    Failed(SourceError),
}

impl Queue {
    pub async fn connect(
        cfg: &ObjectNotifications,
        bucket: &str,
        region: Option<&str>,
    ) -> Result<Self, SourceError> {
        let client = aws_sdk_sqs::Client::new(&aws::sdk_config(region).await);
        let url = if cfg.queue.starts_with("https://") || cfg.queue.starts_with("http://") {
            cfg.queue.clone()
        } else {
            let got = client
                .get_queue_url()
                .queue_name(&cfg.queue)
                .send()
                .await
                .map_err(|e| SourceError::Stream {
                    path: cfg.queue.clone(),
                    message: format!("looking up the queue: {}", aws::describe(&e)),
                })?;
            got.queue_url().unwrap_or_default().to_string()
        };
        Ok(Self {
            client,
            url,
            cfg: cfg.clone(),
            bucket: bucket.to_string(),
        })
    }

    pub fn max_receives(&self) -> u32 {
        self.cfg.max_receives
    }

    pub fn visibility_timeout(&self) -> Duration {
        self.cfg.visibility_timeout
    }

    /// Receives until the session hangs up; `wait` is the long poll. Each object named is
    /// looked up (HEAD): one gone, or overwritten since (another ETag: its own notification
    /// names the new version), is left out; one that cannot be looked up now leaves the
    /// message in the queue, to come back.
    pub async fn poll(
        self,
        store: Arc<dyn ObjectStore>,
        prefix: String,
        wait: Duration,
        tx: mpsc::Sender<Polled>,
    ) {
        let mut failures = 0;
        loop {
            let got = self
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(10)
                .wait_time_seconds(wait.as_secs().min(20) as i32)
                .visibility_timeout(self.cfg.visibility_timeout.as_secs() as i32)
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .send()
                .await;
            let messages = match got {
                Ok(out) => {
                    failures = 0;
                    out.messages.unwrap_or_default()
                }
                Err(e) if aws::fault(&e) == Fault::Permanent => {
                    let failed = SourceError::Stream {
                        path: self.url.clone(),
                        message: format!("receiving: {}", aws::describe(&e)),
                    };
                    let _ = tx.send(Polled::Failed(failed)).await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(queue = %self.url, error = %aws::describe(&e), "receiving from the queue failed; trying again");
                    tokio::time::sleep(retry::SDK.delay(failures)).await;
                    failures += 1;
                    continue;
                }
            };
            if messages.is_empty() && tx.send(Polled::Empty).await.is_err() {
                return;
            }
            for m in messages {
                let receipt = m.receipt_handle().unwrap_or_default().to_string();
                let receives = m
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(1);
                let named = match named_objects(m.body().unwrap_or_default(), &self.bucket) {
                    Ok(objects) => objects,
                    Err(why) => {
                        tracing::warn!(queue = %self.url, reason = %why, "a message that names no object of this source: deleted");
                        Vec::new()
                    }
                };
                let Some(objects) = look_up(store.as_ref(), &prefix, named).await else {
                    continue;
                };
                let message = Message {
                    receipt,
                    receives,
                    objects,
                };
                if tx.send(Polled::Message(message)).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Deletes messages whose objects are committed; a failure is logged (the message comes
    /// back, and its objects are not read again).
    pub async fn delete(&self, receipts: Vec<String>) {
        for receipt in receipts {
            let done = self
                .client
                .delete_message()
                .queue_url(&self.url)
                .receipt_handle(receipt)
                .send()
                .await;
            if let Err(e) = done {
                tracing::warn!(queue = %self.url, error = %aws::describe(&e), "deleting a message failed: it comes back, and its objects are skipped as read");
            }
        }
    }

    /// Keeps messages being worked on invisible for another visibility timeout.
    pub async fn extend(&self, receipts: Vec<String>) {
        for receipt in receipts {
            let done = self
                .client
                .change_message_visibility()
                .queue_url(&self.url)
                .receipt_handle(receipt)
                .visibility_timeout(self.cfg.visibility_timeout.as_secs() as i32)
                .send()
                .await;
            if let Err(e) = done {
                tracing::warn!(queue = %self.url, error = %aws::describe(&e), "extending a message's visibility failed");
            }
        }
    }
}

/// The objects as they are now; None when one could not be looked up.
async fn look_up(
    store: &dyn ObjectStore,
    prefix: &str,
    named: Vec<Named>,
) -> Option<Vec<ObjectMeta>> {
    let mut found = Vec::new();
    for n in named {
        if !n.key.starts_with(prefix) {
            tracing::info!(object = %n.key, "a notification for an object outside the prefix: skipped");
            continue;
        }
        let path = object_store::path::Path::from(n.key.as_str());
        match store.head(&path).await {
            Ok(meta) => {
                let now = meta.e_tag.as_deref().map(|t| t.trim_matches('"'));
                let named = n.etag.as_deref().map(|t| t.trim_matches('"'));
                if named.is_some() && now.is_some() && named != now {
                    tracing::info!(object = %n.key, "overwritten since its notification: the new version's own notification reads it");
                    continue;
                }
                found.push(meta);
            }
            Err(object_store::Error::NotFound { .. }) => {
                tracing::warn!(object = %n.key, "a notification for an object that no longer exists: skipped");
            }
            Err(e) => {
                tracing::warn!(object = %n.key, error = %e, "cannot look the object up: its message comes back after its visibility timeout");
                return None;
            }
        }
    }
    Some(found)
}

/// Messages being worked on, each with the objects it waits for.
#[derive(Debug, Default)]
pub struct Pending {
    messages: Vec<(String, Vec<std::sync::Arc<str>>)>,
}

impl Pending {
    pub fn add(&mut self, receipt: String, shards: Vec<std::sync::Arc<str>>) {
        self.messages.push((receipt, shards));
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Takes off the messages whose objects are all committed to their end.
    pub fn done(&mut self, committed: impl Fn(&str) -> bool) -> Vec<String> {
        let (done, waiting) = std::mem::take(&mut self.messages)
            .into_iter()
            .partition(|(_, shards)| shards.iter().all(|s| committed(s)));
        self.messages = waiting;
        done.into_iter().map(|(receipt, _)| receipt).collect()
    }

    pub fn receipts(&self) -> Vec<String> {
        self.messages.iter().map(|(r, _)| r.clone()).collect()
    }
}

/// The created objects of `bucket` an S3 event notification (or an EventBridge event)
/// names. Err: a message of another shape.
pub fn named_objects(body: &str, bucket: &str) -> Result<Vec<Named>, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    // An SNS envelope (S3 → SNS → SQS) carries the notification as a string.
    if let Some(inner) = v.get("Message").and_then(Value::as_str) {
        return named_objects(inner, bucket);
    }
    if v.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    if let Some(records) = v.get("Records").and_then(Value::as_array) {
        for r in records {
            let created = r
                .get("eventName")
                .and_then(Value::as_str)
                .is_some_and(|n| n.starts_with("ObjectCreated:"));
            let s3 = &r["s3"];
            if !created || s3["bucket"]["name"].as_str() != Some(bucket) {
                continue;
            }
            let Some(key) = s3["object"]["key"].as_str() else {
                continue;
            };
            out.push(Named {
                // Keys in S3 event notifications are URL-encoded (`+` for a space).
                key: url::form_urlencoded::parse(key.as_bytes())
                    .map(|(k, _)| k.into_owned())
                    .next()
                    .unwrap_or_default(),
                etag: s3["object"]["eTag"].as_str().map(str::to_string),
                size: s3["object"]["size"].as_u64().unwrap_or(0),
            });
        }
        return Ok(out);
    }
    if v.get("detail-type").and_then(Value::as_str) == Some("Object Created") {
        let d = &v["detail"];
        if d["bucket"]["name"].as_str() == Some(bucket)
            && let Some(key) = d["object"]["key"].as_str()
        {
            out.push(Named {
                key: key.to_string(),
                etag: d["object"]["etag"].as_str().map(str::to_string),
                size: d["object"]["size"].as_u64().unwrap_or(0),
            });
        }
        return Ok(out);
    }
    Err("neither an S3 event notification nor an EventBridge Object Created event".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_name_their_created_objects() {
        let s3 = r#"{"Records":[
            {"eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"up"},"object":{"key":"gw/a+b%2Bc.ndjson","size":12,"eTag":"abc"}}},
            {"eventName":"ObjectRemoved:Delete","s3":{"bucket":{"name":"up"},"object":{"key":"gw/gone"}}},
            {"eventName":"ObjectCreated:Copy","s3":{"bucket":{"name":"other"},"object":{"key":"gw/x"}}}]}"#;
        let named = named_objects(s3, "up").unwrap();
        assert_eq!(
            named,
            [Named {
                key: "gw/a b+c.ndjson".into(),
                etag: Some("abc".into()),
                size: 12
            }]
        );
        let sns = serde_json::json!({"Type": "Notification", "Message": s3}).to_string();
        assert_eq!(named_objects(&sns, "up").unwrap(), named);
        let eb = r#"{"detail-type":"Object Created","detail":{"bucket":{"name":"up"},"object":{"key":"gw/b.csv","size":3,"etag":"e"}}}"#;
        assert_eq!(named_objects(eb, "up").unwrap()[0].key, "gw/b.csv");
        assert!(
            named_objects(r#"{"Event":"s3:TestEvent"}"#, "up")
                .unwrap()
                .is_empty()
        );
        assert!(named_objects("{}", "up").is_err());
        assert!(named_objects("nope", "up").is_err());
    }
}
