//! A Kinesis Data Stream, polled with GetRecords: one reader per shard, paced within the
//! shard's read limits (5 calls/s, 2 MB/s), resuming `AFTER_SEQUENCE_NUMBER` of its
//! checkpoint, re-acquiring an expired iterator from where it stopped, and stopping at
//! `SHARD_END`.
//!
//! The SDK's own retries are off for this client: every throttling answer, 5xx and lost
//! connection comes back here, is counted, and is retried with jittered exponential backoff
//! for as long as it lasts (a consumer has nothing better to do). Errors that retrying cannot
//! fix (no stream, no permission) end the run with the SDK's message.
//!
//! With `fan_out`, records are pushed instead ([`fanout`]): the same positions, KPL and
//! `split_lines` handling, and leases; each shard's subscription to the pipeline's stream
//! consumer replaces its polling.
//!
//! Files: this one holds the stream (its client and settings); [`api`] one function per AWS
//! call; [`reader`] one shard's polling reader; [`fanout`] one shard's subscription; [`kpl`]
//! the KPL aggregate format.

pub mod api;
pub mod fanout;
pub mod kpl;
pub mod reader;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::retry::RetryConfig;
use tokio::time::Instant;

use super::SourceError;
use crate::aws;
use crate::config::{FanOut, KinesisSource, StartAt};
use crate::metrics::Metrics;
use crate::record::Position;

pub use reader::KinesisShardReader;

/// A shard as ListShards describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: Arc<str>,
    pub parents: Vec<String>,
    /// Closed by a split or merge: it has an ending sequence number.
    pub closed: bool,
    /// Its hash-key range, inclusive (the partition keys whose MD5 it holds).
    pub hash_range: Option<(u128, u128)>,
}

/// A Kinesis client and the stream it reads.
#[derive(Clone, Debug)]
pub struct KinesisStream {
    client: Client,
    /// Name, or ARN when configured so.
    stream: String,
    is_arn: bool,
    start: StartAt,
    poll_interval: Duration,
    max_records: usize,
    split_lines: bool,
    fan_out: Option<FanOut>,
    /// The stream consumer's ARN, once registered (fan-out only).
    consumer: Arc<tokio::sync::OnceCell<String>>,
    /// Each shard's hash-key range, as the last ListShards said (shared by every clone).
    ranges: Arc<std::sync::Mutex<HashMap<String, (u128, u128)>>>,
    metrics: Arc<Metrics>,
}

impl KinesisStream {
    pub async fn connect(src: &KinesisSource, metrics: Arc<Metrics>) -> Self {
        let conf = aws::sdk_config(src.region.as_deref()).await;
        let client = Client::from_conf(
            aws_sdk_kinesis::config::Builder::from(&conf)
                // Retried here, counted by kind (see the module's doc).
                .retry_config(RetryConfig::standard().with_max_attempts(1))
                .build(),
        );
        Self {
            client,
            stream: src.stream.clone(),
            is_arn: src.stream.starts_with("arn:"),
            start: src.start,
            poll_interval: src.poll_interval,
            max_records: src.max_records,
            split_lines: src.split_lines,
            fan_out: src.fan_out.clone(),
            consumer: Default::default(),
            ranges: Default::default(),
            metrics,
        }
    }

    /// A shard's hash-key range (inclusive), listing the shards again if it is not known yet.
    pub async fn hash_range(&self, shard: &str) -> Result<Option<(u128, u128)>, SourceError> {
        if let Some(r) = self.ranges.lock().expect("not poisoned").get(shard) {
            return Ok(Some(*r));
        }
        let listed = self.list_shards().await?;
        Ok(listed
            .into_iter()
            .find(|s| &*s.id == shard)
            .and_then(|s| s.hash_range))
    }

    /// The stream consumer's ARN: registered (and waited for) once per process.
    pub(crate) async fn consumer_arn(&self, name: &str) -> Result<String, String> {
        self.consumer
            .get_or_try_init(|| fanout::consumer_arn(self, name))
            .await
            .cloned()
    }

    pub fn max_records(&self) -> usize {
        self.max_records
    }

    fn stream_error(&self, message: String) -> SourceError {
        SourceError::Stream {
            path: format!("kinesis stream {}", self.stream),
            message,
        }
    }

    /// Every shard of the stream (open and closed ones still in the retention period).
    pub async fn list_shards(&self) -> Result<Vec<ShardInfo>, SourceError> {
        let mut shards = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = api::list_shards(self, next.as_deref())
                .await
                .map_err(|e| self.stream_error(e))?;
            for s in page.shards() {
                let mut parents = Vec::new();
                parents.extend(s.parent_shard_id().map(str::to_string));
                parents.extend(s.adjacent_parent_shard_id().map(str::to_string));
                let hash_range = s.hash_key_range().and_then(|r| {
                    Some((
                        r.starting_hash_key().parse().ok()?,
                        r.ending_hash_key().parse().ok()?,
                    ))
                });
                if let Some(r) = hash_range {
                    (self.ranges.lock().expect("not poisoned")).insert(s.shard_id().to_string(), r);
                }
                shards.push(ShardInfo {
                    id: s.shard_id().into(),
                    parents,
                    closed: s
                        .sequence_number_range()
                        .is_some_and(|r| r.ending_sequence_number().is_some()),
                    hash_range,
                });
            }
            next = page.next_token().map(str::to_string);
            if next.is_none() {
                return Ok(shards);
            }
        }
    }

    /// A reader of `shard` after `after` (or from the configured start): its subscription
    /// with fan-out, its GetRecords poller without.
    pub fn reader(&self, shard: Arc<str>, after: &Position) -> Box<dyn crate::source::ShardReader> {
        match &self.fan_out {
            Some(f) => Box::new(fanout::FanOutShardReader::new(
                self.clone(),
                shard,
                after.clone(),
                f.consumer.clone(),
                f.renew_after,
            )),
            None => Box::new(self.poller(shard, after)),
        }
    }

    /// A GetRecords reader of `shard` after `after`.
    pub fn poller(&self, shard: Arc<str>, after: &Position) -> KinesisShardReader {
        KinesisShardReader {
            stream: self.clone(),
            shard,
            position: after.clone(),
            iterator: None,
            next_call: Instant::now(),
            ended: false,
        }
    }
}
