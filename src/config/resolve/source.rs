//! `source:`: a local stream directory or a Kinesis stream, and where a Kinesis shard without
//! a checkpoint starts.

use crate::config::Problems;
use crate::config::file::SourceFile;
use crate::config::{FanOut, KinesisSource, Source, StartAt};

pub(super) fn resolve_source(p: &mut Problems, f: SourceFile) -> Source {
    match f {
        SourceFile::Local {
            path,
            poll_interval,
        } => {
            let poll_interval = p.duration("source.local.poll_interval", &poll_interval);
            Source::Local {
                path: path.into(),
                poll_interval,
            }
        }
        SourceFile::Kinesis {
            stream,
            region,
            start,
            timestamp,
            poll_interval,
            max_records,
            split_lines,
            fan_out,
        } => {
            let at = |k: &str| format!("source.kinesis.{k}");
            if !(1..=10_000).contains(&max_records) {
                p.add(
                    &at("max_records"),
                    format!("{max_records} is outside GetRecords' limit"),
                    "use 1 to 10000",
                );
            }
            let valid_name = !stream.is_empty()
                && (stream.starts_with("arn:")
                    || (stream.len() <= 128
                        && stream
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))));
            if !valid_name {
                p.add(
                    &at("stream"),
                    format!("`{stream}` is not a Kinesis stream name or ARN"),
                    "use the stream's name (1-128 letters, digits, `_`, `.`, `-`) or its ARN",
                );
            }
            let start = start_at(p, &start, timestamp.as_ref());
            let fan_out = fan_out.map(|f| {
                let consumer_ok = !f.consumer.is_empty()
                    && f.consumer.len() <= 128
                    && f
                        .consumer
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
                if !consumer_ok {
                    p.add(
                        &at("fan_out.consumer"),
                        format!("`{}` is not a stream consumer name", f.consumer),
                        "use 1-128 letters, digits, `_`, `.`, `-`, e.g. the pipeline's name",
                    );
                }
                let renew_after = p.duration(&at("fan_out.renew_after"), &f.renew_after);
                if renew_after.is_zero() || renew_after > std::time::Duration::from_secs(300) {
                    p.add(
                        &at("fan_out.renew_after"),
                        format!("{} is outside a subscription's life", f.renew_after),
                        "use more than 0 and at most 5m (Kinesis ends a subscription after 5 minutes)",
                    );
                }
                FanOut {
                    consumer: f.consumer,
                    renew_after,
                }
            });
            Source::Kinesis(KinesisSource {
                stream,
                region,
                start,
                poll_interval: p.duration(&at("poll_interval"), &poll_interval),
                max_records: max_records.clamp(1, 10_000) as usize,
                split_lines,
                fan_out,
            })
        }
    }
}

/// `start` with its `timestamp`; a wrong pair is reported and reads as `trim_horizon`.
fn start_at(p: &mut Problems, start: &str, timestamp: Option<&String>) -> StartAt {
    let at = |k: &str| format!("source.kinesis.{k}");
    match (start, timestamp) {
        ("trim_horizon", None) => StartAt::TrimHorizon,
        ("latest", None) => StartAt::Latest,
        ("at_timestamp", Some(t)) => match chrono::DateTime::parse_from_rfc3339(t) {
            Ok(t) => StartAt::AtTimestamp(t.timestamp_micros()),
            Err(_) => {
                p.add(
                    &at("timestamp"),
                    format!("`{t}` is not an RFC 3339 time"),
                    "write it like 2026-01-05T10:00:00Z",
                );
                StartAt::TrimHorizon
            }
        },
        ("at_timestamp", None) => {
            p.add(
                &at("start"),
                "`at_timestamp` needs a `timestamp`",
                "add `timestamp: 2026-01-05T10:00:00Z` (RFC 3339) beside `start`",
            );
            StartAt::TrimHorizon
        }
        ("trim_horizon" | "latest", Some(_)) => {
            p.add(
                &at("timestamp"),
                format!("`timestamp` is only read with `start: at_timestamp`, not `{start}`"),
                "remove `timestamp`, or set `start: at_timestamp`",
            );
            StartAt::TrimHorizon
        }
        (other, _) => {
            p.add(
                &at("start"),
                format!("`{other}` is not a start position"),
                "use trim_horizon, latest or at_timestamp",
            );
            StartAt::TrimHorizon
        }
    }
}
