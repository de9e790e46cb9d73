//! Kinesis PutRecords straight from the device (no IoT Core): each record is a message of
//! newline-separated readings (as the IoT rule would put an MQTT message), keyed by the
//! device id, so the pipeline reads it with `split_lines` exactly like the MQTT path.
//!
//! PutRecords can fail part of a batch (throttled records in a 200 answer). The records are
//! one device's, on one shard, in order; resending only the failed ones could put a later
//! message before an earlier one. So the batch is sent again from its first failed record:
//! what followed it and succeeded is sent twice (counted in `resent_readings`; `(device_id,
//! seq)` deduplicates), and first arrivals stay in order.

use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use tracing::warn;

use super::Message;
use crate::agent::queue::Entry;

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
        let mut from = 0;
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=ATTEMPTS {
            let records = messages[from..]
                .iter()
                .map(|m| {
                    PutRecordsRequestEntry::builder()
                        .data(Blob::new(m.bytes.clone()))
                        .partition_key(device_id)
                        .build()
                        .expect("data and key are set")
                })
                .collect::<Vec<_>>();
            let result = self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(records))
                .send()
                .await;
            match result {
                Ok(out) if out.failed_record_count().unwrap_or(0) == 0 => return Ok(()),
                Ok(out) => {
                    let failed = out
                        .records()
                        .iter()
                        .position(|r| r.error_code().is_some())
                        .unwrap_or(0);
                    // What succeeded after the first failure goes again, for order's sake.
                    let again: usize = out.records()[failed..]
                        .iter()
                        .zip(&messages[from + failed..])
                        .filter(|(r, _)| r.error_code().is_none())
                        .map(|(_, m)| m.readings)
                        .sum();
                    self.resent_readings += again as u64;
                    let code = out.records()[failed]
                        .error_code()
                        .unwrap_or("?")
                        .to_string();
                    warn!(stream = %self.stream, attempt, failed = out.failed_record_count().unwrap_or(0), error = %code, "PutRecords failed in part; sending again from the first failed record");
                    from += failed;
                }
                Err(e) => {
                    let text = crate::aws::describe(&e);
                    let permanent = e.as_service_error().is_some_and(|s| {
                        s.is_resource_not_found_exception()
                            || s.is_invalid_argument_exception()
                            || s.is_kms_access_denied_exception()
                    });
                    if permanent || attempt == ATTEMPTS {
                        anyhow::bail!("PutRecords to {}: {text}", self.stream);
                    }
                    // No answer (a lost connection, a timeout): it may have been written.
                    if e.as_service_error().is_none() {
                        self.resent_readings += messages[from..]
                            .iter()
                            .map(|m| m.readings as u64)
                            .sum::<u64>();
                    }
                    warn!(stream = %self.stream, attempt, error = %text, "PutRecords failed; retrying");
                }
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(backoff + backoff.mul_f64(fastrand::f64() * 0.5)).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
        anyhow::bail!(
            "PutRecords to {}: records still failing after {ATTEMPTS} attempts",
            self.stream
        )
    }
}
