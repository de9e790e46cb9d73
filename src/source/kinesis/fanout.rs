//! Enhanced fan-out: one shard's records pushed over `SubscribeToShard` to the pipeline's own
//! registered stream consumer (its own 2 MB/s per shard, records as they arrive) instead of
//! polled with GetRecords.
//!
//! A subscriber task per shard holds the subscription, renews it before its 5 minutes run
//! out (`fan_out.renew_after`), and hands each event over a channel of two: while the
//! pipeline is busy the task waits, stops reading the HTTP/2 stream, and flow control holds
//! Kinesis back, so memory stays bounded; a subscription that ended meanwhile is opened again
//! where the task stopped. Each subscription starts after the last record handed on
//! (`AFTER_SEQUENCE_NUMBER`, or `AT_SEQUENCE_NUMBER` inside a KPL aggregate or `split_lines`
//! record, whose read parts [`unpack`] leaves out), so a renewal has no gap and no double.
//! `ResourceInUseException` (the previous subscription of this shard and consumer still
//! open, as after a fast failover), `LimitExceededException` (one subscribe per second per
//! shard and consumer), throttling and 5xx are retried with backoff and counted.
//!
//! Which shards are read is the lease table's (or the local checkpoints') decision, exactly
//! as with polling; a shard ends at the event that names its child shards, and the children
//! are found by ListShards as with polling. A server that never names them (kinesis-local
//! does not) is covered too: a shard that ListShards says is closed, read to its tip
//! (`MillisBehindLatest` 0, no records), has ended; ListShards is asked at most every
//! [`CLOSED_CHECK_EVERY`] per shard, and only while it is caught up.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::types::{
    ConsumerStatus, Record, StartingPosition, SubscribeToShardEventStream,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::reader::unpack;
use super::{KinesisStream, api};
use crate::aws;
use crate::metrics::Metrics;
use crate::record::{Position, RawChunk, SeqNo};
use crate::retry::Fault;
use crate::source::{ShardReader, SourceError};

/// How long a caught-up shard waits for an event before telling the pipeline it has nothing
/// (Kinesis sends an event at least every 5 s, with or without records).
const CAUGHT_UP_AFTER: Duration = Duration::from_millis(500);
/// How long a shard not known to be caught up (no event yet, or the last one said it was
/// behind) waits for an event before saying it has nothing anyway, so a subscription that
/// takes long to open does not hold the pipeline's watermark.
const STALLED_AFTER: Duration = Duration::from_secs(30);
/// How often a caught-up shard asks ListShards whether it was closed.
const CLOSED_CHECK_EVERY: Duration = Duration::from_secs(5);

/// The stream consumer's ARN: described, registered if it does not exist yet, and waited for
/// until ACTIVE. Never deregistered here.
pub(super) async fn consumer_arn(s: &KinesisStream, name: &str) -> Result<String, String> {
    let stream_arn = if s.is_arn {
        s.stream.clone()
    } else {
        api::stream_arn(s).await?
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut registered = false;
    let mut failures = 0;
    loop {
        match s
            .client
            .describe_stream_consumer()
            .stream_arn(&stream_arn)
            .consumer_name(name)
            .send()
            .await
        {
            Ok(out) => {
                let c = out.consumer_description();
                match c.map(|c| c.consumer_status()) {
                    Some(ConsumerStatus::Active) => {
                        let arn = c.map(|c| c.consumer_arn().to_string()).unwrap_or_default();
                        tracing::info!(consumer = name, consumer_arn = %arn, "stream consumer active");
                        return Ok(arn);
                    }
                    Some(ConsumerStatus::Deleting) => {
                        tracing::info!(
                            consumer = name,
                            "stream consumer is being deleted; registering it again when it is gone"
                        );
                    }
                    _ => {}
                }
            }
            Err(e) if e.code() == Some("ResourceNotFoundException") && !registered => {
                match s
                    .client
                    .register_stream_consumer()
                    .stream_arn(&stream_arn)
                    .consumer_name(name)
                    .send()
                    .await
                {
                    Ok(_) => {
                        tracing::info!(consumer = name, stream_arn = %stream_arn, "registered the stream consumer");
                        registered = true;
                    }
                    // Another worker registered it first: describe it again.
                    Err(e) if e.code() == Some("ResourceInUseException") => registered = true,
                    Err(e) => match aws::fault(&e) {
                        Fault::Permanent => {
                            return Err(api::permanent("registering the stream consumer", &e));
                        }
                        fault => api::count(&s.metrics, fault),
                    },
                }
                continue;
            }
            Err(e) if e.code() == Some("ResourceNotFoundException") => {}
            Err(e) => match aws::fault(&e) {
                Fault::Permanent => {
                    return Err(api::permanent("describing the stream consumer", &e));
                }
                fault => api::count(&s.metrics, fault),
            },
        }
        if Instant::now() > deadline {
            return Err(format!(
                "stream consumer {name} did not become ACTIVE within 5 minutes"
            ));
        }
        failures += 1;
        tokio::time::sleep(api::BACKOFF.delay(failures.min(4))).await;
    }
}

/// What the subscriber task hands the reader.
enum Delivery {
    /// One event's records, with the shard's lag; `end` when the event names the shard's
    /// children (SHARD_END).
    Event {
        records: Vec<Record>,
        millis_behind: i64,
        end: bool,
    },
    Failed(String),
}

pub struct FanOutShardReader {
    stream: KinesisStream,
    shard: Arc<str>,
    /// After the last record handed out.
    position: Position,
    consumer: String,
    renew_after: Duration,
    task: Option<(mpsc::Receiver<Delivery>, tokio::task::JoinHandle<()>)>,
    /// The last event said the shard had nothing more (`MillisBehindLatest` 0): only then
    /// does a quiet subscription mean "caught up" (`--drain` stops on it).
    caught_up: bool,
    /// When ListShards was last asked whether this shard is closed.
    closed_checked: Option<Instant>,
    ended: bool,
}

impl FanOutShardReader {
    /// Whether ListShards lists this shard as closed (asked at most every
    /// [`CLOSED_CHECK_EVERY`]).
    async fn closed(&mut self) -> Result<bool, SourceError> {
        if self
            .closed_checked
            .is_some_and(|t| t.elapsed() < CLOSED_CHECK_EVERY)
        {
            return Ok(false);
        }
        self.closed_checked = Some(Instant::now());
        let shards = self.stream.list_shards().await?;
        Ok(shards.iter().any(|s| s.id == self.shard && s.closed))
    }

    pub(super) fn new(
        stream: KinesisStream,
        shard: Arc<str>,
        position: Position,
        consumer: String,
        renew_after: Duration,
    ) -> Self {
        Self {
            stream,
            shard,
            position,
            consumer,
            renew_after,
            task: None,
            caught_up: false,
            closed_checked: None,
            ended: false,
        }
    }

    fn error(&self, message: String) -> SourceError {
        SourceError::Io {
            shard: self.shard.to_string(),
            source: std::io::Error::other(message),
        }
    }
}

impl Drop for FanOutShardReader {
    fn drop(&mut self) {
        // A lease lost or a session over: the subscription goes with the reader.
        if let Some((_, task)) = &self.task {
            task.abort();
        }
    }
}

#[async_trait]
impl ShardReader for FanOutShardReader {
    fn ended(&self) -> bool {
        self.ended
    }

    async fn read(
        &mut self,
        _max_records: usize,
        now_us: i64,
    ) -> Result<Option<RawChunk>, SourceError> {
        if self.ended {
            return Ok(None);
        }
        if self.task.is_none() {
            let (tx, rx) = mpsc::channel(2);
            let sub = Subscriber {
                stream: self.stream.clone(),
                shard: self.shard.clone(),
                consumer: self.consumer.clone(),
                renew_after: self.renew_after,
                after: self.position.clone(),
            };
            self.task = Some((rx, tokio::spawn(sub.run(tx))));
        }
        let waited = Instant::now();
        loop {
            let rx = &mut self.task.as_mut().expect("started").0;
            let delivery = match tokio::time::timeout(CAUGHT_UP_AFTER, rx.recv()).await {
                Err(_) if self.caught_up || waited.elapsed() >= STALLED_AFTER => return Ok(None),
                Err(_) => continue,
                Ok(None) => return Err(self.error("the shard's subscriber stopped".into())),
                Ok(Some(d)) => d,
            };
            let (records, millis_behind, end) = match delivery {
                Delivery::Failed(message) => return Err(self.error(message)),
                Delivery::Event {
                    records,
                    millis_behind,
                    end,
                } => (records, millis_behind, end),
            };
            let metrics = &self.stream.metrics;
            metrics.set_lag(&self.shard, millis_behind);
            self.caught_up = millis_behind == 0;
            let bytes: usize = records.iter().map(|r| r.data().as_ref().len()).sum();
            Metrics::add(&metrics.kinesis_bytes_read, bytes as u64);
            let chunk = unpack(
                &records,
                bytes,
                self.stream.split_lines,
                metrics,
                &self.shard,
                &self.position,
            );
            if end {
                tracing::info!(shard_id = %self.shard, "shard ended (SHARD_END, child shards named)");
                self.ended = true;
            }
            if chunk.seqs.is_empty() {
                if !self.ended && millis_behind == 0 && records.is_empty() && self.closed().await? {
                    tracing::info!(shard_id = %self.shard, "shard ended (closed, and read to its tip)");
                    self.ended = true;
                }
                if self.ended || millis_behind == 0 {
                    return Ok(None);
                }
                continue;
            }
            let last = chunk.seqs.last().map(|s| SeqNo(s.to_string()));
            let resume_from = std::mem::replace(&mut self.position, last);
            return Ok(Some(chunk.into_raw(
                self.shard.clone(),
                resume_from,
                now_us,
            )));
        }
    }
}

/// The task that holds a shard's subscription.
struct Subscriber {
    stream: KinesisStream,
    shard: Arc<str>,
    consumer: String,
    renew_after: Duration,
    /// After the last record handed on.
    after: Position,
}

impl Subscriber {
    async fn run(mut self, tx: mpsc::Sender<Delivery>) {
        let metrics = self.stream.metrics.clone();
        let arn = match self.stream.consumer_arn(&self.consumer).await {
            Ok(arn) => arn,
            Err(e) => {
                let _ = tx.send(Delivery::Failed(e)).await;
                return;
            }
        };
        let mut failures = 0u32;
        let mut opened_before = false;
        let mut stream_failures = 0u32;
        loop {
            let start = self.starting_position();
            tracing::debug!(shard_id = %self.shard, starting_position = ?start.r#type(), sequence_number = ?start.sequence_number(), "subscribing");
            let req = self
                .stream
                .client
                .subscribe_to_shard()
                .consumer_arn(&arn)
                .shard_id(&*self.shard)
                .starting_position(start);
            let mut events = match req.send().await {
                Ok(out) => out.event_stream,
                Err(e) => {
                    let code = e.code().unwrap_or_default().to_string();
                    let retry = matches!(
                        code.as_str(),
                        "ResourceInUseException" | "LimitExceededException"
                    ) || aws::fault(&e) != Fault::Permanent;
                    if !retry {
                        let message = api::permanent("subscribing to the shard", &e);
                        let _ = tx.send(Delivery::Failed(message)).await;
                        return;
                    }
                    Metrics::add(&metrics.fanout_subscribe_retries, 1);
                    if code != "ResourceInUseException" && code != "LimitExceededException" {
                        api::count(&metrics, aws::fault(&e));
                    }
                    failures += 1;
                    tracing::debug!(shard_id = %self.shard, error = %aws::describe(&e), "SubscribeToShard failed; retrying");
                    tokio::time::sleep(api::BACKOFF.delay(failures - 1)).await;
                    continue;
                }
            };
            failures = 0;
            Metrics::add(
                if opened_before {
                    &metrics.fanout_renewals
                } else {
                    &metrics.fanout_subscriptions
                },
                1,
            );
            opened_before = true;
            let renew_at = Instant::now() + self.renew_after;
            loop {
                let next = tokio::select! {
                    e = events.recv() => e,
                    _ = tokio::time::sleep_until(renew_at) => break,
                };
                let event = match next {
                    Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(ev))) => ev,
                    Ok(Some(_)) => continue,
                    // Kinesis ended the subscription (its 5 minutes): subscribe again.
                    Ok(None) => break,
                    Err(e) => {
                        // ResourceInUse comes here too, as the stream's first message (the
                        // previous subscription still open): wait before trying again.
                        Metrics::add(&metrics.fanout_stream_errors, 1);
                        stream_failures += 1;
                        tracing::info!(shard_id = %self.shard, error = %aws::describe(&e), "the subscription's event stream failed; subscribing again after the last record");
                        tokio::time::sleep(api::BACKOFF.delay(stream_failures - 1)).await;
                        break;
                    }
                };
                stream_failures = 0;
                Metrics::add(&metrics.fanout_events, 1);
                tracing::debug!(shard_id = %self.shard, records = event.records().len(),
                    first = ?event.records().first().map(|r| r.sequence_number()),
                    millis_behind = event.millis_behind_latest(),
                    continuation = event.continuation_sequence_number(),
                    child_shards = event.child_shards().len(), "fan-out event");
                let end = !event.child_shards().is_empty();
                let records = event.records().to_vec();
                if let Some(last) = records.last() {
                    self.after = Some(SeqNo(last.sequence_number().to_string()));
                } else if self.after.is_none() && !event.continuation_sequence_number().is_empty() {
                    // Nothing read yet (`start: latest`): keep the place Kinesis gives, so a
                    // renewal does not skip what arrives in between.
                    self.after = Some(SeqNo(event.continuation_sequence_number().to_string()));
                }
                let delivery = Delivery::Event {
                    records,
                    millis_behind: event.millis_behind_latest(),
                    end,
                };
                // Waits while the pipeline is busy: the stream is not read meanwhile.
                if tx.send(delivery).await.is_err() || end {
                    return;
                }
            }
        }
    }

    /// After the last record handed on, or the configured start.
    fn starting_position(&self) -> StartingPosition {
        let at = api::start_at(&self.after, self.stream.start);
        StartingPosition::builder()
            .r#type(at.kind)
            .set_sequence_number(at.sequence.map(str::to_string))
            .set_timestamp(at.timestamp)
            .build()
            .expect("type is set")
    }
}
