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
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}
