//! Counters the pipeline keeps; printed as progress and (later) exported for Prometheus.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Metrics {
    pub records_read: AtomicU64,
    pub records_written: AtomicU64,
    pub dead_letters: AtomicU64,
    pub late_records: AtomicU64,
    pub alerts: AtomicU64,
    pub windows_emitted: AtomicU64,
    pub files_written: AtomicU64,
    pub bytes_written: AtomicU64,
    pub commits: AtomicU64,
    /// Alert messages a notifier delivered.
    pub notifications_sent: AtomicU64,
    /// Alerts a notifier did not send because of its cooldown.
    pub notifications_suppressed: AtomicU64,
    /// Alert messages a notifier gave up on after its retries.
    pub notifier_failures: AtomicU64,
    /// Alert messages dropped because a notifier's queue was full.
    pub notifications_dropped: AtomicU64,
    /// Kinesis answers that said to slow down (retried).
    pub kinesis_throttled: AtomicU64,
    /// Kinesis 5xx answers, timeouts and lost connections (retried).
    pub kinesis_errors_retried: AtomicU64,
    /// Shard iterators that expired and were acquired again.
    pub kinesis_expired_iterators: AtomicU64,
    pub kinesis_bytes_read: AtomicU64,
    /// DynamoDB and S3 answers that said to slow down, and 5xx or lost connections: retried
    /// by the SDK (standard mode, jittered backoff), counted by `aws::FaultCounter`.
    pub dynamodb_throttled: AtomicU64,
    pub dynamodb_errors_retried: AtomicU64,
    pub s3_throttled: AtomicU64,
    pub s3_errors_retried: AtomicU64,
    /// KPL aggregated records unpacked into their user records.
    pub kpl_aggregates: AtomicU64,
    /// Leases (shards) this worker holds now.
    pub leases_held: AtomicU64,
    /// Leases this worker took (free, expired or stolen).
    pub leases_taken: AtomicU64,
    /// Leases another worker took from this one.
    pub leases_lost: AtomicU64,
    /// Sessions started over because the leases held changed.
    pub lease_sessions: AtomicU64,
    /// Per shard: `MillisBehindLatest` of its last GetRecords.
    pub lag_ms: Mutex<BTreeMap<String, i64>>,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn set(gauge: &AtomicU64, n: u64) {
        gauge.store(n, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }

    /// The largest `MillisBehindLatest` over the shards read (None before any Kinesis read).
    pub fn max_lag_ms(&self) -> Option<i64> {
        self.lag_ms
            .lock()
            .expect("not poisoned")
            .values()
            .copied()
            .max()
    }

    pub fn set_lag(&self, shard: &str, ms: i64) {
        let mut lag = self.lag_ms.lock().expect("not poisoned");
        match lag.get_mut(shard) {
            Some(v) => *v = ms,
            None => {
                lag.insert(shard.to_string(), ms);
            }
        }
    }
}
