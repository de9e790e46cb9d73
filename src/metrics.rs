//! Counters the pipeline keeps; printed as progress lines and served to Prometheus by
//! `ops` (the pipeline feature) in the text exposition format.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Metrics {
    pub records_read: AtomicU64,
    pub records_written: AtomicU64,
    pub dead_letters: AtomicU64,
    /// Dead letters whose reason is `identity_mismatch` (a record claiming a device or tenant
    /// its channel did not prove).
    pub identity_mismatches: AtomicU64,
    pub late_records: AtomicU64,
    pub alerts: AtomicU64,
    /// Detector series forgotten to stay within `limits.detector_series`.
    pub detector_series_evicted: AtomicU64,
    /// Detector state snapshots published with commits.
    pub detector_snapshots: AtomicU64,
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
    /// Enhanced fan-out: subscriptions opened, renewed (after `renew_after` or Kinesis' 5
    /// minutes), retried (ResourceInUse, LimitExceeded, throttling, 5xx), event streams that
    /// failed mid-way, and events received.
    pub fanout_subscriptions: AtomicU64,
    pub fanout_renewals: AtomicU64,
    pub fanout_subscribe_retries: AtomicU64,
    pub fanout_stream_errors: AtomicU64,
    pub fanout_events: AtomicU64,
    /// Objects (S3 or files) read to their end, and objects gone or overwritten between
    /// their listing and their reading (the new version is listed on its own).
    pub objects_read: AtomicU64,
    pub objects_vanished: AtomicU64,
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
    /// Per output: rows, files and bytes committed.
    pub outputs: Mutex<BTreeMap<String, OutputCounts>>,
    /// How long commits took (stage → prepare → publish → commit).
    pub commit_seconds: Mutex<Histogram>,
    /// Reading and committing: the sinks answered and, with leases, the first lease scan is
    /// done; false again once shutting down.
    pub ready: AtomicBool,
    /// What `/healthz` checks beyond `ready`.
    pub health: Mutex<Health>,
}

/// A commit running longer than this means the lake is not answering: the worker is stuck.
pub const COMMIT_STALL: Duration = Duration::from_secs(120);

#[derive(Debug, Default)]
pub struct Health {
    /// With leases: when the lease table last answered every call of a renewal or a scan,
    /// and how long it may stay silent (the lease timeout: by then the leases are gone).
    pub leases: Option<(Instant, Duration)>,
    /// When the commit in progress, if any, started.
    pub commit_started: Option<Instant>,
}

/// See [`Metrics::commit_running`].
pub struct CommitRunning<'a>(&'a Metrics);

impl Drop for CommitRunning<'_> {
    fn drop(&mut self) {
        self.0.health.lock().expect("not poisoned").commit_started = None;
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutputCounts {
    pub rows: u64,
    pub files: u64,
    pub bytes: u64,
}

/// A Prometheus histogram with fixed buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Upper bounds, increasing.
    pub bounds: Vec<f64>,
    /// Observations per bucket (not cumulative), one more for +Inf.
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        let bounds = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        Self {
            counts: vec![0; bounds.len() + 1],
            bounds,
            sum: 0.0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
    }
}

impl Metrics {
    /// Why the worker is not healthy (`/healthz` answers 503 with it), or None.
    pub fn unhealthy(&self) -> Option<String> {
        if !self.ready.load(Relaxed) {
            return Some("starting or stopping".into());
        }
        let h = self.health.lock().expect("not poisoned");
        if let Some((at, allowed)) = h.leases
            && at.elapsed() > allowed
        {
            return Some(format!(
                "the lease table has not answered for {}s (leases expire after {}s)",
                at.elapsed().as_secs(),
                allowed.as_secs()
            ));
        }
        if let Some(at) = h.commit_started
            && at.elapsed() > COMMIT_STALL
        {
            return Some(format!(
                "a commit has been running for {}s: the lake is not answering",
                at.elapsed().as_secs()
            ));
        }
        None
    }

    /// The lease table answered a whole renewal or scan; silence longer than `allowed` makes
    /// the worker unhealthy.
    pub fn lease_table_answered(&self, allowed: Duration) {
        self.health.lock().expect("not poisoned").leases = Some((Instant::now(), allowed));
    }

    /// Marks a commit running until the returned guard is dropped.
    pub fn commit_running(&self) -> CommitRunning<'_> {
        self.health.lock().expect("not poisoned").commit_started = Some(Instant::now());
        CommitRunning(self)
    }

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

    /// Counts a commit's files for their outputs.
    /// `(output, rows, bytes)` per file.
    pub fn committed<'a>(&self, files: impl IntoIterator<Item = (&'a str, u64, u64)>) {
        let mut outputs = self.outputs.lock().expect("not poisoned");
        for (output, rows, bytes) in files {
            let c = outputs.entry(output.to_string()).or_default();
            c.rows += rows;
            c.files += 1;
            c.bytes += bytes;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_readiness_the_lease_table_and_commits() {
        let m = Metrics::default();
        assert_eq!(m.unhealthy().as_deref(), Some("starting or stopping"));
        m.ready.store(true, Relaxed);
        assert_eq!(m.unhealthy(), None);
        m.lease_table_answered(Duration::from_secs(60));
        assert_eq!(m.unhealthy(), None);
        {
            let _running = m.commit_running();
            assert!(m.health.lock().unwrap().commit_started.is_some());
        }
        assert!(m.health.lock().unwrap().commit_started.is_none());
        m.lease_table_answered(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        let why = m.unhealthy().unwrap();
        assert!(why.starts_with("the lease table has not answered"), "{why}");
    }
}
