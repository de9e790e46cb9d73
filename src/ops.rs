//! The operator's port: `GET /metrics` (Prometheus text exposition 0.0.4) and `GET /healthz`
//! (200 while the worker reads and commits, 503 before and while it shuts down), for ECS
//! health checks and a Prometheus scraper or the CloudWatch agent; and `GET /live`, the
//! worker's live state for the console ([`crate::live`]).
//!
//! The port is meant for the VPC: no sign-in. It is served by the same HTTP stack as the
//! console (axum on hyper); the exposition format is written by `prometheus-client` from the
//! atomics of [`Metrics`], read at each scrape by a [`Collector`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::metrics::Metrics;

/// Binds `addr` and serves `router` until the process ends. Binding errors are returned (a
/// port in use must stop the start, not be found later by a failing health check).
pub async fn serve(addr: SocketAddr, router: Router) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "the HTTP server stopped");
        }
    });
    Ok(bound)
}

/// `/metrics` and `/healthz` over `metrics`.
pub fn routes(metrics: Arc<Metrics>) -> Router {
    let mut registry = Registry::with_prefix("shardlake");
    registry.register_collector(Box::new(Exposition(metrics.clone())));
    let state = Arc::new(Ops { metrics, registry });
    Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(healthz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "GET /metrics or /healthz\n") })
        .with_state(state)
}

struct Ops {
    metrics: Arc<Metrics>,
    registry: Registry,
}

async fn scrape(State(ops): State<Arc<Ops>>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::prometheus_text::encode(&mut body, &ops.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding: {e}\n"),
        )
            .into_response(),
    }
}

async fn healthz(State(ops): State<Arc<Ops>>) -> Response {
    match ops.metrics.unhealthy() {
        None => (StatusCode::OK, "ready\n".to_string()).into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

/// Every metric of [`Metrics`] in the exposition (the registry adds the `shardlake_` prefix,
/// and `_total` to counters).
#[derive(Debug)]
struct Exposition(Arc<Metrics>);

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &*self.0;
        let counters: [(&str, &str, &AtomicU64); 35] = [
            (
                "records_read",
                "Records read from the source (KPL user records counted one by one)",
                &m.records_read,
            ),
            (
                "records_written",
                "Records decoded into the raw output, before commit (none with `raw: false`)",
                &m.records_written,
            ),
            (
                "dead_letters",
                "Records sent to the dead-letter output",
                &m.dead_letters,
            ),
            (
                "fanout_subscriptions",
                "Enhanced fan-out subscriptions opened (SubscribeToShard)",
                &m.fanout_subscriptions,
            ),
            (
                "fanout_renewals",
                "Enhanced fan-out subscriptions renewed after their lifetime",
                &m.fanout_renewals,
            ),
            (
                "fanout_subscribe_retries",
                "SubscribeToShard calls retried (ResourceInUse, LimitExceeded, throttling, 5xx)",
                &m.fanout_subscribe_retries,
            ),
            (
                "fanout_stream_errors",
                "Enhanced fan-out event streams that failed mid-way (subscribed again)",
                &m.fanout_stream_errors,
            ),
            (
                "fanout_events",
                "Enhanced fan-out events received",
                &m.fanout_events,
            ),
            (
                "objects_read",
                "Objects (S3 or files) read to their end",
                &m.objects_read,
            ),
            (
                "objects_vanished",
                "Objects deleted or overwritten between their listing and their reading",
                &m.objects_vanished,
            ),
            (
                "identity_mismatches",
                "Dead letters that claimed a device or tenant their channel did not prove",
                &m.identity_mismatches,
            ),
            (
                "late_records",
                "Records later than the allowed lateness, sent to the late output",
                &m.late_records,
            ),
            ("alerts", "Alert rows written", &m.alerts),
            (
                "detector_series_evicted",
                "Detector series forgotten (least recently seen first) to stay within limits.detector_series",
                &m.detector_series_evicted,
            ),
            (
                "detector_snapshots",
                "Detector state snapshots published with commits",
                &m.detector_snapshots,
            ),
            (
                "windows_emitted",
                "Window rows (or parts) written by the aggregations",
                &m.windows_emitted,
            ),
            (
                "commits",
                "Commits (exactly-once flushes) completed",
                &m.commits,
            ),
            ("files_written", "Parquet files published", &m.files_written),
            ("bytes_written", "Parquet bytes published", &m.bytes_written),
            (
                "notifications_sent",
                "Alert messages delivered by notifiers",
                &m.notifications_sent,
            ),
            (
                "notifications_suppressed",
                "Alert messages held back by a notifier's cooldown",
                &m.notifications_suppressed,
            ),
            (
                "notifier_failures",
                "Alert messages a notifier gave up on after its retries",
                &m.notifier_failures,
            ),
            (
                "notifications_dropped",
                "Alert messages dropped because a notifier's queue was full",
                &m.notifications_dropped,
            ),
            (
                "kinesis_throttled",
                "Kinesis answers that said to slow down (retried)",
                &m.kinesis_throttled,
            ),
            (
                "kinesis_errors_retried",
                "Kinesis 5xx answers and lost connections (retried)",
                &m.kinesis_errors_retried,
            ),
            (
                "kinesis_expired_iterators",
                "Shard iterators that expired and were acquired again",
                &m.kinesis_expired_iterators,
            ),
            (
                "kinesis_bytes_read",
                "Bytes of Kinesis record data read",
                &m.kinesis_bytes_read,
            ),
            (
                "kpl_aggregates",
                "KPL aggregated records unpacked",
                &m.kpl_aggregates,
            ),
            (
                "dynamodb_throttled",
                "Lease-table answers that said to slow down (retried by the SDK)",
                &m.dynamodb_throttled,
            ),
            (
                "dynamodb_errors_retried",
                "Lease-table 5xx answers and lost connections (retried by the SDK)",
                &m.dynamodb_errors_retried,
            ),
            (
                "s3_throttled",
                "S3 answers that said to slow down (retried by the SDK)",
                &m.s3_throttled,
            ),
            (
                "s3_errors_retried",
                "S3 5xx answers and lost connections (retried by the SDK)",
                &m.s3_errors_retried,
            ),
            (
                "leases_taken",
                "Leases this worker took (free, expired or stolen)",
                &m.leases_taken,
            ),
            (
                "leases_lost",
                "Leases another worker took from this one",
                &m.leases_lost,
            ),
            (
                "lease_sessions",
                "Reading sessions started because the leases held changed",
                &m.lease_sessions,
            ),
        ];
        for (name, help, c) in counters {
            let counter = ConstCounter::new(Metrics::get(c));
            counter.encode(enc.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let gauge = |enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64| {
            let g = ConstGauge::new(v);
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
        };
        gauge(
            &mut enc,
            "leases_held",
            "Leases (shards) this worker holds",
            Metrics::get(&m.leases_held) as i64,
        )?;
        gauge(
            &mut enc,
            "ready",
            "1 while the worker reads and commits and its lease table and lake answer (what /healthz reports)",
            i64::from(m.unhealthy().is_none()),
        )?;

        let lag = m.lag_ms.lock().expect("not poisoned").clone();
        let mut family = enc.encode_descriptor(
            "shard_lag_milliseconds",
            "Kinesis MillisBehindLatest of the shard's last GetRecords",
            None,
            MetricType::Gauge,
        )?;
        for (shard, ms) in &lag {
            let labels = [("shard", shard.as_str())];
            ConstGauge::new(*ms).encode(family.encode_family(&labels)?)?;
        }

        let outputs = m.outputs.lock().expect("not poisoned").clone();
        for (name, help, value) in [
            (
                "output_rows",
                "Rows committed, per output",
                (|c| c.rows) as fn(&crate::metrics::OutputCounts) -> u64,
            ),
            ("output_files", "Files committed, per output", |c| c.files),
            ("output_bytes", "Bytes committed, per output", |c| c.bytes),
        ] {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (output, counts) in &outputs {
                let labels = [("output", output.as_str())];
                ConstCounter::new(value(counts)).encode(family.encode_family(&labels)?)?;
            }
        }

        let h = m.commit_seconds.lock().expect("not poisoned").clone();
        let buckets: Vec<(f64, u64)> = h
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(h.counts.iter().copied())
            .collect();
        let count = h.counts.iter().sum();
        enc.encode_descriptor(
            "commit_duration_seconds",
            "Time a commit took: stage, prepare, publish, commit",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            h.sum, count, &buckets, None,
        )?;
        Ok(())
    }
}

/// The exposition of `metrics` as `/metrics` serves it.
pub fn render(metrics: &Arc<Metrics>) -> String {
    let mut registry = Registry::with_prefix("shardlake");
    registry.register_collector(Box::new(Exposition(metrics.clone())));
    let mut body = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut body, &registry)
        .expect("writing to a String");
    body
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_labels_escaped() {
        let m = Arc::new(Metrics::default());
        for v in [0.001, 0.2, 0.2, 100.0] {
            m.commit_seconds.lock().unwrap().observe(v);
        }
        m.committed([("a\"b\\c\nd", 10, 100)]);
        Metrics::add(&m.records_read, 7);
        let text = render(&m);
        assert!(text.contains("shardlake_records_read_total 7\n"), "{text}");
        assert!(
            text.contains("shardlake_commit_duration_seconds_bucket{le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("shardlake_commit_duration_seconds_bucket{le=\"0.25\"} 3\n"));
        assert!(
            text.contains("shardlake_commit_duration_seconds_bucket{le=\"30\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("shardlake_commit_duration_seconds_bucket{le=\"+Inf\"} 4\n"));
        assert!(text.contains("shardlake_commit_duration_seconds_count 4\n"));
        assert!(
            text.contains("shardlake_output_rows_total{output=\"a\\\"b\\\\c\\nd\"} 10\n"),
            "{text}"
        );
    }

    #[test]
    fn ready_gauge_follows_health() {
        let m = Arc::new(Metrics::default());
        m.ready.store(true, Relaxed);
        assert!(render(&m).contains("shardlake_ready 1\n"));
        m.lease_table_answered(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        assert!(render(&m).contains("shardlake_ready 0\n"));
    }
}
