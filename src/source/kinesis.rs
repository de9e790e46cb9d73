//! A Kinesis Data Stream, polled with GetRecords: one reader per shard, paced within the
//! shard's read limits (5 calls/s, 2 MB/s), resuming `AFTER_SEQUENCE_NUMBER` of its
//! checkpoint, re-acquiring an expired iterator from where it stopped, and stopping at
//! `SHARD_END`.
//!
//! The SDK's own retries are off for this client: every throttling answer, 5xx and lost
//! connection comes back here, is counted, and is retried with jittered exponential backoff
//! for as long as it lasts (a consumer has nothing better to do). Errors that retrying cannot
//! fix (no stream, no permission) end the run with the SDK's message.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::http::HttpResponse;
use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::{ShardFilter, ShardFilterType, ShardIteratorType};
use tokio::time::Instant;

use super::{ShardReader, SourceError};
use crate::aws;
use crate::config::{KinesisSource, StartAt};
use crate::metrics::Metrics;
use crate::record::{Position, RawChunk, SeqNo, SeqNos, order};
use crate::source::kpl;

/// GetRecords: at most 5 calls a second per shard.
const MIN_CALL_GAP: Duration = Duration::from_millis(200);
/// GetRecords: at most 2 MB a second per shard (shared with other consumers of the stream).
const BYTES_PER_SEC: u64 = 2 * 1024 * 1024;
/// At most 10,000 records per GetRecords.
const MAX_LIMIT: usize = 10_000;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Throttling codes (Kinesis' and the generic ones).
const THROTTLING: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "LimitExceededException",
    "ThrottlingException",
    "Throttling",
    "RequestLimitExceeded",
];

/// A shard as ListShards describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: Arc<str>,
    pub parents: Vec<String>,
    /// Closed by a split or merge: it has an ending sequence number.
    pub closed: bool,
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
            metrics,
        }
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
            let page = retrying(&self.metrics, || {
                let mut req = self.client.list_shards();
                match &next {
                    // A page after the first names neither the stream nor the filter.
                    Some(token) => req = req.next_token(token),
                    None => {
                        req = if self.is_arn {
                            req.stream_arn(&self.stream)
                        } else {
                            req.stream_name(&self.stream)
                        };
                        req = req.shard_filter(
                            ShardFilter::builder()
                                .r#type(ShardFilterType::FromTrimHorizon)
                                .build()
                                .expect("type is set"),
                        );
                    }
                }
                req.send()
            })
            .await
            .map_err(|e| self.stream_error(permanent("listing its shards", &e)))?;
            for s in page.shards() {
                let mut parents = Vec::new();
                parents.extend(s.parent_shard_id().map(str::to_string));
                parents.extend(s.adjacent_parent_shard_id().map(str::to_string));
                shards.push(ShardInfo {
                    id: s.shard_id().into(),
                    parents,
                    closed: s
                        .sequence_number_range()
                        .is_some_and(|r| r.ending_sequence_number().is_some()),
                });
            }
            next = page.next_token().map(str::to_string);
            if next.is_none() {
                return Ok(shards);
            }
        }
    }

    /// A reader of `shard` after `after` (or from the configured start).
    pub fn reader(&self, shard: Arc<str>, after: &Position) -> KinesisShardReader {
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

pub struct KinesisShardReader {
    stream: KinesisStream,
    shard: Arc<str>,
    /// After the last record handed out.
    position: Position,
    iterator: Option<String>,
    next_call: Instant,
    ended: bool,
}

impl KinesisShardReader {
    async fn iterator(&self) -> Result<String, SourceError> {
        let s = &self.stream;
        let out = retrying(&s.metrics, || {
            let mut req = s.client.get_shard_iterator().shard_id(&*self.shard);
            req = if s.is_arn {
                req.stream_arn(&s.stream)
            } else {
                req.stream_name(&s.stream)
            };
            req = match (&self.position, s.start) {
                // Part-way through a KPL aggregate: read it again, skipping what was read.
                (Some(seq), _) if seq.sub().is_some() => req
                    .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                    .starting_sequence_number(seq.record()),
                (Some(seq), _) => req
                    .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                    .starting_sequence_number(&seq.0),
                (None, StartAt::TrimHorizon) => {
                    req.shard_iterator_type(ShardIteratorType::TrimHorizon)
                }
                (None, StartAt::Latest) => req.shard_iterator_type(ShardIteratorType::Latest),
                (None, StartAt::AtTimestamp(us)) => req
                    .shard_iterator_type(ShardIteratorType::AtTimestamp)
                    .timestamp(DateTime::from_secs_and_nanos(
                        us.div_euclid(1_000_000),
                        (us.rem_euclid(1_000_000) * 1_000) as u32,
                    )),
            };
            req.send()
        })
        .await
        .map_err(|e| self.error(permanent("getting a shard iterator", &e)))?;
        out.shard_iterator()
            .map(str::to_string)
            .ok_or_else(|| self.error("GetShardIterator returned no iterator".into()))
    }

    fn error(&self, message: String) -> SourceError {
        SourceError::Io {
            shard: self.shard.to_string(),
            source: std::io::Error::other(message),
        }
    }
}

#[async_trait]
impl ShardReader for KinesisShardReader {
    fn ended(&self) -> bool {
        self.ended
    }

    async fn read(
        &mut self,
        max_records: usize,
        now_us: i64,
    ) -> Result<Option<RawChunk>, SourceError> {
        if self.ended {
            return Ok(None);
        }
        let metrics = self.stream.metrics.clone();
        let mut failures = 0u32;
        loop {
            tokio::time::sleep_until(self.next_call).await;
            let iterator = match &self.iterator {
                Some(it) => it.clone(),
                None => {
                    let it = self.iterator().await?;
                    self.iterator = Some(it.clone());
                    it
                }
            };
            self.next_call = Instant::now() + MIN_CALL_GAP;
            let sent = self
                .stream
                .client
                .get_records()
                .shard_iterator(iterator)
                .limit(max_records.clamp(1, MAX_LIMIT) as i32)
                .send()
                .await;
            let out = match sent {
                Ok(out) => out,
                Err(e) if e.code() == Some("ExpiredIteratorException") => {
                    // Idle past the iterator's 5 minutes: start again from the position.
                    Metrics::add(&metrics.kinesis_expired_iterators, 1);
                    tracing::info!(shard_id = %self.shard, "shard iterator expired; resuming from the checkpoint position");
                    self.iterator = None;
                    continue;
                }
                Err(e) => match classify(&e) {
                    Fault::Permanent => {
                        return Err(self.error(permanent("reading records", &e)));
                    }
                    fault => {
                        count(&metrics, fault);
                        failures += 1;
                        // Never sooner than the 5 calls/s the shard allows.
                        self.next_call = self.next_call.max(Instant::now() + backoff(failures));
                        tracing::debug!(shard_id = %self.shard, error = %aws::describe(&e), "GetRecords failed; retrying");
                        continue;
                    }
                },
            };
            failures = 0;
            let bytes: u64 = out
                .records()
                .iter()
                .map(|r| r.data().as_ref().len() as u64)
                .sum();
            // Spend the shard's read budget evenly: a 2 MB answer waits a second.
            let budget = Duration::from_micros(bytes * 1_000_000 / BYTES_PER_SEC);
            self.next_call = Instant::now() + MIN_CALL_GAP.max(budget);
            if let Some(lag) = out.millis_behind_latest() {
                metrics.set_lag(&self.shard, lag);
            }
            self.iterator = out.next_shard_iterator().map(str::to_string);
            if self.iterator.is_none() {
                tracing::info!(shard_id = %self.shard, "shard ended (SHARD_END)");
                self.ended = true;
            }
            if out.records().is_empty() {
                if self.ended || out.millis_behind_latest().unwrap_or(0) == 0 {
                    self.next_call = Instant::now() + self.stream.poll_interval;
                    return Ok(None);
                }
                // Behind, but this stretch of the shard is empty: keep going.
                continue;
            }
            Metrics::add(&metrics.kinesis_bytes_read, bytes);
            let mut chunk = Chunk::with_capacity(bytes as usize, out.records().len());
            for r in out.records() {
                let (b, seq) = (r.data().as_ref(), r.sequence_number());
                match kpl::unpack(b) {
                    kpl::Unpacked::Plain
                        if self.stream.split_lines && lines(b).nth(1).is_some() =>
                    {
                        for (k, line) in lines(b).enumerate() {
                            chunk.push(line, seq, Some(k as u64), &self.position);
                        }
                    }
                    kpl::Unpacked::Plain => chunk.push(b, seq, None, &self.position),
                    kpl::Unpacked::Records(users) => {
                        Metrics::add(&metrics.kpl_aggregates, 1);
                        for (k, user) in users.into_iter().enumerate() {
                            chunk.push(user, seq, Some(k as u64), &self.position);
                        }
                    }
                    kpl::Unpacked::Corrupt(why) => {
                        tracing::warn!(shard_id = %self.shard, sequence_number = seq, reason = %why, "corrupt KPL aggregate; the record goes to dead-letter");
                        chunk.rejected.push((chunk.spans.len(), why));
                        chunk.push(b, seq, None, &self.position);
                    }
                }
            }
            if chunk.seqs.is_empty() {
                // Only the part of an aggregate that was read before: go on after it.
                continue;
            }
            let last = chunk.seqs.last().map(|s| SeqNo(s.to_string()));
            let resume_from = std::mem::replace(&mut self.position, last);
            return Ok(Some(RawChunk {
                shard: self.shard.clone(),
                resume_from,
                data: chunk.data,
                spans: chunk.spans,
                seqs: chunk.seqs,
                rejected: chunk.rejected,
                arrival_us: now_us,
            }));
        }
    }
}

/// The non-blank lines of a record (`\r\n` endings too), for `split_lines`.
fn lines(b: &[u8]) -> impl Iterator<Item = &[u8]> {
    b.split(|&c| c == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| l.iter().any(|c| !c.is_ascii_whitespace()))
}

/// The user records of one GetRecords answer, KPL aggregates unpacked.
struct Chunk {
    data: Vec<u8>,
    spans: Vec<std::ops::Range<usize>>,
    seqs: SeqNos,
    rejected: Vec<(usize, String)>,
}

impl Chunk {
    fn with_capacity(bytes: usize, records: usize) -> Self {
        Self {
            data: Vec::with_capacity(bytes),
            spans: Vec::with_capacity(records),
            seqs: SeqNos::with_capacity(records, records * 56),
            rejected: Vec::new(),
        }
    }

    /// Adds a record unless it is at or before `after` (an aggregate read again from its
    /// start after a restart part-way through it). `sub` is a user record's index in its aggregate (or line in a multi-line record).
    fn push(&mut self, b: &[u8], seq: &str, sub: Option<u64>, after: &Position) {
        match sub {
            Some(sub) => self.seqs.push_sub(seq, sub),
            None => self.seqs.push(seq),
        }
        let pushed = self.seqs.last().expect("just pushed");
        if after
            .as_ref()
            .is_some_and(|after| order(pushed, &after.0).is_le())
        {
            self.seqs.pop();
            if let Some(last) = self.rejected.last()
                && last.0 == self.spans.len()
            {
                self.rejected.pop();
            }
            return;
        }
        self.spans.push(self.data.len()..self.data.len() + b.len());
        self.data.extend_from_slice(b);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Throttled,
    /// 5xx, timeouts, lost connections.
    Transient,
    Permanent,
}

fn classify<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> Fault {
    match e {
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or("");
            if THROTTLING.contains(&code) {
                Fault::Throttled
            } else if s.raw().status().is_server_error() {
                Fault::Transient
            } else {
                Fault::Permanent
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Fault::Transient
        }
        _ => Fault::Permanent,
    }
}

fn count(metrics: &Metrics, fault: Fault) {
    match fault {
        Fault::Throttled => Metrics::add(&metrics.kinesis_throttled, 1),
        Fault::Transient => Metrics::add(&metrics.kinesis_errors_retried, 1),
        Fault::Permanent => {}
    }
}

/// Exponential from 100 ms, capped at 10 s, with jitter.
fn backoff(failures: u32) -> Duration {
    crate::backoff::jittered(BACKOFF_START, failures.saturating_sub(1), BACKOFF_MAX)
}

/// Sends a request until it succeeds or fails for a reason retrying cannot fix.
async fn retrying<T, E, F, Fut>(
    metrics: &Metrics,
    mut call: F,
) -> Result<T, SdkError<E, HttpResponse>>
where
    E: ProvideErrorMetadata,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
{
    let mut failures = 0;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) => match classify(&e) {
                Fault::Permanent => return Err(e),
                fault => {
                    count(metrics, fault);
                    failures += 1;
                    tokio::time::sleep(backoff(failures)).await;
                }
            },
        }
    }
}

fn permanent<E: std::error::Error>(what: &str, e: &E) -> String {
    let text = aws::describe(e);
    let hint = if text.contains("ResourceNotFoundException") {
        "; check source.kinesis.stream and the region"
    } else if text.contains("AccessDenied") {
        "; the role needs kinesis:ListShards, kinesis:GetShardIterator and kinesis:GetRecords on the stream"
    } else {
        ""
    };
    format!("{what}: {text}{hint}")
}
