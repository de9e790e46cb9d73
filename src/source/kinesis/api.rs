//! One function per Kinesis call, each with its retry (quickwit's shape): the reader and the
//! stream call these, never the client directly.
//!
//! ListShards and GetShardIterator are retried here for as long as throttling, 5xx or lost
//! connections last (a consumer has nothing better to do), each fault counted. GetRecords is
//! not: its retries are paced by the reader with the shard's read limits.

use std::time::Duration;

use aws_sdk_kinesis::config::http::HttpResponse;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::get_records::{GetRecordsError, GetRecordsOutput};
use aws_sdk_kinesis::operation::list_shards::ListShardsOutput;
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::{ShardFilter, ShardFilterType, ShardIteratorType};

use super::KinesisStream;
use crate::aws;
use crate::config::StartAt;
use crate::metrics::Metrics;
use crate::record::Position;
use crate::retry::{Backoff, Fault, Retry};

/// At most 10,000 records per GetRecords.
const MAX_LIMIT: usize = 10_000;

/// [ListShards](https://docs.aws.amazon.com/kinesis/latest/APIReference/API_ListShards.html),
/// one page: the first names the stream and asks for every shard from the trim horizon; a
/// later page names only the token.
pub(super) async fn list_shards(
    s: &KinesisStream,
    next: Option<&str>,
) -> Result<ListShardsOutput, String> {
    retrying(&s.metrics, || {
        let mut req = s.client.list_shards();
        match next {
            Some(token) => req = req.next_token(token),
            None => {
                req = if s.is_arn {
                    req.stream_arn(&s.stream)
                } else {
                    req.stream_name(&s.stream)
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
    .map_err(|e| permanent("listing its shards", &e))
}

/// [GetShardIterator](https://docs.aws.amazon.com/kinesis/latest/APIReference/API_GetShardIterator.html)
/// after `position`, or at the configured start. Part-way through a KPL aggregate (or a
/// split record) the iterator is at the record, whose read parts the reader skips.
pub(super) async fn get_shard_iterator(
    s: &KinesisStream,
    shard: &str,
    position: &Position,
) -> Result<String, String> {
    let out = retrying(&s.metrics, || {
        let mut req = s.client.get_shard_iterator().shard_id(shard);
        req = if s.is_arn {
            req.stream_arn(&s.stream)
        } else {
            req.stream_name(&s.stream)
        };
        let at = start_at(position, s.start);
        req.shard_iterator_type(at.kind)
            .set_starting_sequence_number(at.sequence.map(str::to_string))
            .set_timestamp(at.timestamp)
            .send()
    })
    .await
    .map_err(|e| permanent("getting a shard iterator", &e))?;
    out.shard_iterator()
        .map(str::to_string)
        .ok_or_else(|| "GetShardIterator returned no iterator".into())
}

/// Where reading a shard from `position` starts, for GetShardIterator and SubscribeToShard
/// alike.
pub(super) struct StartFrom<'a> {
    pub kind: ShardIteratorType,
    pub sequence: Option<&'a str>,
    pub timestamp: Option<DateTime>,
}

/// At the record of a checkpoint inside a KPL aggregate or a `split_lines` record (the parts
/// read are skipped), after any other checkpoint, or where the stream's `start` says.
pub(super) fn start_at(position: &Position, start: StartAt) -> StartFrom<'_> {
    let (kind, sequence, timestamp) = match (position, start) {
        (Some(seq), _) if seq.sub().is_some() => (
            ShardIteratorType::AtSequenceNumber,
            Some(seq.record()),
            None,
        ),
        (Some(seq), _) => (ShardIteratorType::AfterSequenceNumber, Some(&*seq.0), None),
        (None, StartAt::TrimHorizon) => (ShardIteratorType::TrimHorizon, None, None),
        (None, StartAt::Latest) => (ShardIteratorType::Latest, None, None),
        (None, StartAt::AtTimestamp(us)) => {
            let at = DateTime::from_secs_and_nanos(
                us.div_euclid(1_000_000),
                (us.rem_euclid(1_000_000) * 1_000) as u32,
            );
            (ShardIteratorType::AtTimestamp, None, Some(at))
        }
    };
    StartFrom {
        kind,
        sequence,
        timestamp,
    }
}

/// [GetRecords](https://docs.aws.amazon.com/kinesis/latest/APIReference/API_GetRecords.html),
/// once: at most `limit` records (and 10,000).
pub(super) async fn get_records(
    s: &KinesisStream,
    iterator: String,
    limit: usize,
) -> Result<GetRecordsOutput, SdkError<GetRecordsError, HttpResponse>> {
    s.client
        .get_records()
        .shard_iterator(iterator)
        .limit(limit.clamp(1, MAX_LIMIT) as i32)
        .send()
        .await
}

/// The stream's ARN ([DescribeStreamSummary](https://docs.aws.amazon.com/kinesis/latest/APIReference/API_DescribeStreamSummary.html)),
/// which the fan-out calls name it by.
pub(super) async fn stream_arn(s: &KinesisStream) -> Result<String, String> {
    let out = retrying(&s.metrics, || {
        s.client
            .describe_stream_summary()
            .stream_name(&s.stream)
            .send()
    })
    .await
    .map_err(|e| permanent("describing the stream", &e))?;
    out.stream_description_summary()
        .map(|d| d.stream_arn().to_string())
        .ok_or_else(|| "DescribeStreamSummary returned no description".into())
}

/// Counts a retried fault by kind.
pub(super) fn count(metrics: &Metrics, fault: Fault) {
    match fault {
        Fault::Throttled => Metrics::add(&metrics.kinesis_throttled, 1),
        Fault::Transient => Metrics::add(&metrics.kinesis_errors_retried, 1),
        Fault::Permanent => {}
    }
}

/// Exponential from 100 ms, capped at 10 s, with jitter.
pub(super) const BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// Sends a request until it succeeds or fails for a reason retrying cannot fix (a consumer
/// has nothing better to do), counting each retried fault.
async fn retrying<T, E, Fut>(
    metrics: &Metrics,
    call: impl FnMut() -> Fut,
) -> Result<T, SdkError<E, HttpResponse>>
where
    E: ProvideErrorMetadata,
    Fut: std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
{
    let forever = Retry {
        backoff: BACKOFF,
        attempts: u32::MAX,
    };
    forever
        .run(call, aws::fault, |_, fault, _| count(metrics, fault))
        .await
}

/// An error retrying cannot fix, with what to check.
pub(super) fn permanent<E: std::error::Error>(what: &str, e: &E) -> String {
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
