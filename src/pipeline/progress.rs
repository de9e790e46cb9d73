//! What a run tells its operator: the progress line printed every second (`--progress`) and
//! the summaries logged when the notifiers close and when the run ends.

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;

/// Prints a progress line to stderr every second until aborted.
pub(super) async fn report(m: Arc<Metrics>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.tick().await;
    let mut last = 0;
    loop {
        every.tick().await;
        let now = Metrics::get(&m.records_read);
        eprintln!("{}", line(&m, Some(now - last)));
        last = now;
    }
}

/// One progress line; `rate` is the records read in the last second.
pub(super) fn line(m: &Metrics, rate: Option<u64>) -> String {
    let g = Metrics::get;
    let rate = rate.map(|r| format!(" ({r}/s)")).unwrap_or_default();
    // Kinesis' MillisBehindLatest, the largest over the shards (Prometheus export: issue 6).
    let lag = m
        .max_lag_ms()
        .map(|ms| format!(" · behind {ms} ms"))
        .unwrap_or_default();
    format!(
        "records {}{rate} · dead-letter {} · late {} · windows {} · alerts {} · files {} · commits {}{lag}",
        g(&m.records_read),
        g(&m.dead_letters),
        g(&m.late_records),
        g(&m.windows_emitted),
        g(&m.alerts),
        g(&m.files_written),
        g(&m.commits)
    )
}

/// What the notifiers did, once they are closed.
pub(super) fn log_notifiers(metrics: &Metrics) {
    let g = Metrics::get;
    tracing::info!(
        sent = g(&metrics.notifications_sent),
        suppressed = g(&metrics.notifications_suppressed),
        failed = g(&metrics.notifier_failures),
        dropped = g(&metrics.notifications_dropped),
        "notifiers closed"
    );
}

/// The run's totals: records, dead letters, commits, and every retried fault by service.
pub(super) fn log_summary(metrics: &Metrics) {
    let g = Metrics::get;
    tracing::info!(
        records = g(&metrics.records_read),
        dead_letters = g(&metrics.dead_letters),
        identity_mismatches = g(&metrics.identity_mismatches),
        alerts = g(&metrics.alerts),
        detector_series_evicted = g(&metrics.detector_series_evicted),
        commits = g(&metrics.commits),
        kinesis_throttled = g(&metrics.kinesis_throttled),
        kinesis_errors_retried = g(&metrics.kinesis_errors_retried),
        kinesis_expired_iterators = g(&metrics.kinesis_expired_iterators),
        kpl_aggregates = g(&metrics.kpl_aggregates),
        fanout_subscriptions = g(&metrics.fanout_subscriptions),
        fanout_renewals = g(&metrics.fanout_renewals),
        fanout_subscribe_retries = g(&metrics.fanout_subscribe_retries),
        fanout_stream_errors = g(&metrics.fanout_stream_errors),
        dynamodb_throttled = g(&metrics.dynamodb_throttled),
        dynamodb_errors_retried = g(&metrics.dynamodb_errors_retried),
        s3_throttled = g(&metrics.s3_throttled),
        s3_errors_retried = g(&metrics.s3_errors_retried),
        leases_taken = g(&metrics.leases_taken),
        leases_lost = g(&metrics.leases_lost),
        lease_sessions = g(&metrics.lease_sessions),
        "run finished"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line_counts_and_shows_rate_and_lag_when_known() {
        let m = Metrics::default();
        Metrics::add(&m.records_read, 1200);
        Metrics::add(&m.dead_letters, 3);
        Metrics::add(&m.commits, 2);
        let plain = line(&m, None);
        assert!(
            plain.starts_with("records 1200 · dead-letter 3 · "),
            "{plain}"
        );
        assert!(plain.ends_with("commits 2"), "{plain}");
        m.set_lag("shardId-000000000000", 40);
        m.set_lag("shardId-000000000001", 900);
        let busy = line(&m, Some(600));
        assert!(busy.starts_with("records 1200 (600/s) · "), "{busy}");
        assert!(busy.ends_with("commits 2 · behind 900 ms"), "{busy}");
    }
}
