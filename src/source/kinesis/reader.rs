//! One shard's reader: GetRecords paced within the shard's read limits (5 calls/s, 2 MB/s),
//! resuming after its position, re-acquiring an expired iterator from where it stopped,
//! unpacking KPL aggregates (and `split_lines` records), and stopping at `SHARD_END`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::operation::get_records::GetRecordsOutput;
use aws_sdk_kinesis::types::Record;
use tokio::time::Instant;

use super::{KinesisStream, api, kpl};
use crate::aws;
use crate::metrics::Metrics;
use crate::record::{Position, RawChunk, SeqNo, SeqNos, order};
use crate::retry::Fault;
use crate::source::{ShardReader, SourceError};

/// GetRecords: at most 5 calls a second per shard.
const MIN_CALL_GAP: Duration = Duration::from_millis(200);
/// GetRecords: at most 2 MB a second per shard (shared with other consumers of the stream).
const BYTES_PER_SEC: u64 = 2 * 1024 * 1024;

pub struct KinesisShardReader {
    pub(super) stream: KinesisStream,
    pub(super) shard: Arc<str>,
    /// After the last record handed out.
    pub(super) position: Position,
    pub(super) iterator: Option<String>,
    pub(super) next_call: Instant,
    pub(super) ended: bool,
}

impl KinesisShardReader {
    fn error(&self, message: String) -> SourceError {
        SourceError::Io {
            shard: self.shard.to_string(),
            source: std::io::Error::other(message),
        }
    }

    /// The next answer of GetRecords, paced: retries throttling, 5xx and lost connections
    /// (never sooner than the shard allows) and re-acquires an expired iterator. Notes the
    /// next call's time by the bytes read, the lag, the next iterator and `SHARD_END`.
    async fn fetch(&mut self, max_records: usize) -> Result<(GetRecordsOutput, u64), SourceError> {
        let metrics = self.stream.metrics.clone();
        let mut failures = 0u32;
        loop {
            tokio::time::sleep_until(self.next_call).await;
            let iterator = match &self.iterator {
                Some(it) => it.clone(),
                None => {
                    let it = api::get_shard_iterator(&self.stream, &self.shard, &self.position)
                        .await
                        .map_err(|e| self.error(e))?;
                    self.iterator = Some(it.clone());
                    it
                }
            };
            self.next_call = Instant::now() + MIN_CALL_GAP;
            let out = match api::get_records(&self.stream, iterator, max_records).await {
                Ok(out) => out,
                Err(e) if e.code() == Some("ExpiredIteratorException") => {
                    // Idle past the iterator's 5 minutes: start again from the position.
                    Metrics::add(&metrics.kinesis_expired_iterators, 1);
                    tracing::info!(shard_id = %self.shard, "shard iterator expired; resuming from the checkpoint position");
                    self.iterator = None;
                    continue;
                }
                Err(e) => match aws::fault(&e) {
                    Fault::Permanent => {
                        return Err(self.error(api::permanent("reading records", &e)));
                    }
                    fault => {
                        api::count(&metrics, fault);
                        failures += 1;
                        // Never sooner than the 5 calls/s the shard allows.
                        self.next_call = self
                            .next_call
                            .max(Instant::now() + api::BACKOFF.delay(failures - 1));
                        tracing::debug!(shard_id = %self.shard, error = %aws::describe(&e), "GetRecords failed; retrying");
                        continue;
                    }
                },
            };
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
            return Ok((out, bytes));
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
        loop {
            let (out, bytes) = self.fetch(max_records).await?;
            if out.records().is_empty() {
                if self.ended || out.millis_behind_latest().unwrap_or(0) == 0 {
                    self.next_call = Instant::now() + self.stream.poll_interval;
                    return Ok(None);
                }
                // Behind, but this stretch of the shard is empty: keep going.
                continue;
            }
            Metrics::add(&self.stream.metrics.kinesis_bytes_read, bytes);
            let chunk = unpack(
                out.records(),
                bytes as usize,
                self.stream.split_lines,
                &self.stream.metrics,
                &self.shard,
                &self.position,
            );
            if chunk.seqs.is_empty() {
                // Only the part of an aggregate that was read before: go on after it.
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

/// The non-blank lines of a record (`\r\n` endings too), for `split_lines`.
fn lines(b: &[u8]) -> impl Iterator<Item = &[u8]> {
    b.split(|&c| c == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| l.iter().any(|c| !c.is_ascii_whitespace()))
}

/// The user records of one GetRecords answer (or one fan-out event), KPL aggregates and
/// `split_lines` records unpacked; what is at or before `after` (read before) left out.
pub(super) fn unpack(
    records: &[Record],
    bytes: usize,
    split_lines: bool,
    metrics: &Metrics,
    shard: &str,
    after: &Position,
) -> Chunk {
    let mut chunk = Chunk::with_capacity(bytes, records.len());
    for r in records {
        let (b, seq, key) = (r.data().as_ref(), r.sequence_number(), r.partition_key());
        match kpl::unpack(b) {
            kpl::Unpacked::Plain if split_lines && lines(b).nth(1).is_some() => {
                for (k, line) in lines(b).enumerate() {
                    chunk.push(line, seq, key, Some(k as u64), after);
                }
            }
            kpl::Unpacked::Plain => chunk.push(b, seq, key, None, after),
            kpl::Unpacked::Records(users) => {
                Metrics::add(&metrics.kpl_aggregates, 1);
                for (k, user) in users.into_iter().enumerate() {
                    chunk.push(user.data, seq, user.key, Some(k as u64), after);
                }
            }
            kpl::Unpacked::Corrupt(why) => {
                tracing::warn!(shard_id = %shard, sequence_number = seq, reason = %why, "corrupt KPL aggregate; the record goes to dead-letter");
                chunk.rejected.push((chunk.spans.len(), why));
                chunk.push(b, seq, key, None, after);
            }
        }
    }
    chunk
}

/// The user records of one GetRecords answer, KPL aggregates unpacked.
pub(super) struct Chunk {
    pub(super) data: Vec<u8>,
    pub(super) spans: Vec<std::ops::Range<usize>>,
    pub(super) seqs: SeqNos,
    /// Each record's partition key (a KPL user record's own).
    pub(super) keys: SeqNos,
    pub(super) rejected: Vec<(usize, String)>,
}

impl Chunk {
    /// The chunk as the pipeline takes it, read at `now_us`, after `resume_from`.
    pub(super) fn into_raw(self, shard: Arc<str>, resume_from: Position, now_us: i64) -> RawChunk {
        RawChunk {
            shard,
            resume_from,
            data: self.data,
            spans: self.spans,
            seqs: self.seqs,
            keys: self.keys,
            rejected: (self.rejected.into_iter())
                .map(|(i, why)| (i, crate::record::Rejection::CorruptAggregate, why))
                .collect(),
            arrival_us: now_us,
            as_read: Default::default(),
        }
    }
}

impl Chunk {
    fn with_capacity(bytes: usize, records: usize) -> Self {
        Self {
            data: Vec::with_capacity(bytes),
            spans: Vec::with_capacity(records),
            seqs: SeqNos::with_capacity(records, records * 56),
            keys: SeqNos::with_capacity(records, records * 24),
            rejected: Vec::new(),
        }
    }

    /// Adds a record unless it is at or before `after` (an aggregate read again from its
    /// start after a restart part-way through it). `sub` is a user record's index in its aggregate (or line in a multi-line record).
    fn push(&mut self, b: &[u8], seq: &str, key: &str, sub: Option<u64>, after: &Position) {
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
        self.keys.push(key);
        self.spans.push(self.data.len()..self.data.len() + b.len());
        self.data.extend_from_slice(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_lines_skips_blank_lines_and_carriage_returns() {
        let b = b"{\"a\":1}\r\n\n  \n{\"a\":2}\n";
        let got: Vec<&[u8]> = lines(b).collect();
        assert_eq!(got, [&b"{\"a\":1}"[..], &b"{\"a\":2}"[..]]);
        assert_eq!(lines(b"one").count(), 1);
    }

    #[test]
    fn a_chunk_leaves_out_what_was_read_before() {
        // Restarted part-way through the aggregate 200: its first two user records (0, 1)
        // were committed, so only 2 and the next record are new.
        let after: Position = Some(SeqNo("200:1".into()));
        let mut c = Chunk::with_capacity(64, 4);
        for sub in 0..3 {
            c.push(
                format!("u{sub}").as_bytes(),
                "200",
                &format!("k{sub}"),
                Some(sub),
                &after,
            );
        }
        c.push(b"next", "300", "k", None, &after);
        let seqs: Vec<String> = (0..c.seqs.len())
            .map(|i| c.seqs.get(i).to_string())
            .collect();
        assert_eq!(seqs, ["200:2", "300"]);
        let records: Vec<&[u8]> = c.spans.iter().map(|s| &c.data[s.clone()]).collect();
        assert_eq!(records, [&b"u2"[..], &b"next"[..]]);
        assert_eq!(
            c.keys.iter().collect::<Vec<_>>(),
            ["k2", "k"],
            "keys go with their records"
        );
    }

    #[test]
    fn a_corrupt_record_read_before_takes_its_reason_along() {
        let after: Position = Some(SeqNo("100".into()));
        let mut c = Chunk::with_capacity(16, 2);
        c.rejected.push((c.spans.len(), "corrupt".into()));
        c.push(b"x", "100", "k", None, &after);
        assert!(c.rejected.is_empty() && c.spans.is_empty());
        c.rejected.push((c.spans.len(), "corrupt".into()));
        c.push(b"y", "101", "k", None, &after);
        assert_eq!(c.rejected, [(0, "corrupt".to_string())]);
    }
}
