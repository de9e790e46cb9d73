//! Kinesis PutRecords straight from the device (no IoT Core): each record is a message of
//! newline-separated readings (as the IoT rule would put an MQTT message), keyed by the
//! device id, so the pipeline reads it with `split_lines` exactly like the MQTT path.
//!
//! PutRecords can fail part of a batch (throttled records in a 200 answer). The records are
//! one device's, on one shard, in order; resending only the failed ones could put a later
//! message before an earlier one. So the batch is sent again from its first failed record:
//! what followed it and succeeded is sent twice (counted in `resent_readings`; `(device_id,
//! seq)` deduplicates), and first arrivals stay in order.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use tracing::warn;

use super::Message;
use crate::agent::queue::Entry;
use crate::retry::{self, Backoff, Fault, Retry};

/// PutRecords takes at most 500 records and 5 MB.
const MAX_RECORDS: usize = 500;
/// Attempts at one batch (whole-request errors and partial failures) before the queue takes
/// over with its own, longer backoff (which also gives way to a stop signal at once).
const ATTEMPTS: u32 = 4;

pub struct KinesisSender {
    client: Client,
    stream: String,
    max_message: usize,
    pub resent_readings: u64,
}

impl KinesisSender {
    pub async fn new(stream: &str, region: Option<&str>, max_message: usize) -> Self {
        let conf = crate::aws::sdk_config(region).await;
        // Retried (and counted) here, not by the SDK: a retry the SDK hid could duplicate.
        let client = Client::from_conf(
            aws_sdk_kinesis::config::Builder::from(&conf)
                .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1))
                .build(),
        );
        Self {
            client,
            stream: stream.to_string(),
            max_message,
            resent_readings: 0,
        }
    }

    pub async fn send(&mut self, device_id: &str, batch: &[Entry]) -> anyhow::Result<()> {
        let messages = super::messages(batch, self.max_message);
        for chunk in messages.chunks(MAX_RECORDS) {
            self.put_in_order(device_id, chunk).await?;
        }
        Ok(())
    }

    async fn put_in_order(&mut self, device_id: &str, messages: &[Message]) -> anyhow::Result<()> {
        // Shared by the attempts (each a future of its own): where the next one starts, and
        // what was sent twice.
        let from = AtomicUsize::new(0);
        let resent = AtomicU64::new(0);
        let put = Put {
            client: &self.client,
            stream: &self.stream,
            device_id,
            messages,
            from: &from,
            resent: &resent,
        };
        let retry = Retry {
            backoff: BACKOFF,
            attempts: ATTEMPTS,
        };
        let sent = retry
            .run(
                || put.once(),
                |e: &PutError| e.fault,
                |e, _, attempt| match e.partial {
                    Some(failed) => warn!(stream = %self.stream, attempt, failed, error = %e.text, "PutRecords failed in part; sending again from the first failed record"),
                    None => warn!(stream = %self.stream, attempt, error = %e.text, "PutRecords failed; retrying"),
                },
            )
            .await;
        self.resent_readings += resent.into_inner();
        match sent {
            Ok(()) => Ok(()),
            Err(e) if e.partial.is_some() => anyhow::bail!(
                "PutRecords to {}: records still failing after {ATTEMPTS} attempts",
                self.stream
            ),
            Err(e) => anyhow::bail!("PutRecords to {}: {}", self.stream, e.text),
        }
    }
}

/// 100 ms doubling up to 1 s, with jitter: the queue's own backoff takes over after that.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));

/// One batch's PutRecords, attempt by attempt.
struct Put<'a> {
    client: &'a Client,
    stream: &'a str,
    device_id: &'a str,
    messages: &'a [Message],
    /// The first message not yet known to be written.
    from: &'a AtomicUsize,
    /// Readings sent more than once (after a partial failure or a lost answer).
    resent: &'a AtomicU64,
}

/// A failed attempt.
struct PutError {
    fault: Fault,
    text: String,
    /// Records that failed, when the request itself went through.
    partial: Option<i32>,
}

impl Put<'_> {
    /// Sends the batch from `from` on; a partial failure moves `from` to the first failed
    /// record (what followed it and succeeded goes again, for order's sake).
    async fn once(&self) -> Result<(), PutError> {
        let from = self.from.load(Relaxed);
        let records = self.messages[from..]
            .iter()
            .map(|m| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(m.bytes.clone()))
                    .partition_key(self.device_id)
                    .build()
                    .expect("data and key are set")
            })
            .collect::<Vec<_>>();
        let result = self
            .client
            .put_records()
            .stream_name(self.stream)
            .set_records(Some(records))
            .send()
            .await;
        match result {
            Ok(out) if out.failed_record_count().unwrap_or(0) == 0 => Ok(()),
            Ok(out) => {
                let failed = out
                    .records()
                    .iter()
                    .position(|r| r.error_code().is_some())
                    .unwrap_or(0);
                let again: usize = out.records()[failed..]
                    .iter()
                    .zip(&self.messages[from + failed..])
                    .filter(|(r, _)| r.error_code().is_none())
                    .map(|(_, m)| m.readings)
                    .sum();
                self.resent.fetch_add(again as u64, Relaxed);
                self.from.store(from + failed, Relaxed);
                let code = out.records()[failed].error_code().unwrap_or("?");
                Err(PutError {
                    fault: retry::classify(Some(code), None).max_transient(),
                    text: code.to_string(),
                    partial: Some(out.failed_record_count().unwrap_or(0)),
                })
            }
            Err(e) => {
                let permanent = e.as_service_error().is_some_and(|s| {
                    s.is_resource_not_found_exception()
                        || s.is_invalid_argument_exception()
                        || s.is_kms_access_denied_exception()
                });
                // No answer (a lost connection, a timeout): it may have been written.
                if e.as_service_error().is_none() {
                    let pending: u64 = self.messages[from..]
                        .iter()
                        .map(|m| m.readings as u64)
                        .sum();
                    self.resent.fetch_add(pending, Relaxed);
                }
                Err(PutError {
                    fault: match permanent {
                        true => Fault::Permanent,
                        false => crate::aws::fault(&e).max_transient(),
                    },
                    text: crate::aws::describe(&e),
                    partial: None,
                })
            }
        }
    }
}
