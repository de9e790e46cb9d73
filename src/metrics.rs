//! Counters the pipeline keeps; printed as progress and (later) exported for Prometheus.

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
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}
