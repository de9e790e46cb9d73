//! `source:`: a local stream directory, a Kinesis stream (and where a shard without a
//! checkpoint starts), or objects in S3 / files in a directory (how each is read).

use crate::config::Problems;
use crate::config::file::{ObjectsFile, SourceFile};
use crate::config::{
    Compression, FanOut, KinesisSource, ObjectFormat, ObjectNotifications, ObjectSource,
    ObjectStoreAt, Source, StartAt,
};

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
        SourceFile::S3(f) => Source::Objects(resolve_objects(p, "s3", f)),
        SourceFile::Files(f) => Source::Objects(resolve_objects(p, "files", f)),
    }
}

/// `source.s3` or `source.files` (`kind`): where the objects are and how each is read.
fn resolve_objects(p: &mut Problems, kind: &str, f: ObjectsFile) -> ObjectSource {
    let at = |k: &str| format!("source.{kind}.{k}");
    let store = if kind == "s3" {
        if let Some(path) = &f.path {
            p.add(
                &at("path"),
                format!("`path: {path}` is for `source.files`"),
                "name the objects with `bucket` and `prefix`, or use `source: {files: {path: ...}}`",
            );
        }
        let bucket = f.bucket.unwrap_or_default();
        if !super::lake::is_bucket_name(&bucket) {
            p.add(
                &at("bucket"),
                format!("`{bucket}` is not an S3 bucket name"),
                "use the bucket's name (3-63 lowercase letters, digits, `.`, `-`), without s3://",
            );
        }
        ObjectStoreAt::S3 {
            bucket,
            prefix: f.prefix.trim_start_matches('/').to_string(),
            region: f.region,
        }
    } else {
        for (name, set) in [
            ("bucket", f.bucket.is_some()),
            ("prefix", !f.prefix.is_empty()),
            ("region", f.region.is_some()),
        ] {
            if set {
                p.add(
                    &at(name),
                    format!("`{name}` is for `source.s3`"),
                    "a directory is named by `path` alone",
                );
            }
        }
        let path = f.path.unwrap_or_default();
        if path.is_empty() {
            p.add(
                &at("path"),
                "no directory",
                "add `path: <directory>`: every file under it is read",
            );
        }
        ObjectStoreAt::Files(path.into())
    };
    let format = match f.format.as_str() {
        "auto" => None,
        "ndjson" => Some(ObjectFormat::Ndjson),
        "csv" => Some(ObjectFormat::Csv),
        other => {
            p.add(
                &at("format"),
                format!("`{other}` is not an object format"),
                "use ndjson, csv or auto (by each key's extension)",
            );
            None
        }
    };
    let compression = match f.compression.as_str() {
        "auto" => None,
        "none" => Some(Compression::None),
        "gzip" => Some(Compression::Gzip),
        "zstd" => Some(Compression::Zstd),
        other => {
            p.add(
                &at("compression"),
                format!("`{other}` is not a compression"),
                "use none, gzip, zstd or auto (by each key's extension: .gz, .zst)",
            );
            None
        }
    };
    if !(1..=64).contains(&f.concurrency) {
        p.add(
            &at("concurrency"),
            format!("{} objects at once is outside 1 to 64", f.concurrency),
            "use e.g. 4 (each object read at once holds a connection and a chunk or two)",
        );
    }
    let poll_interval = p.duration(&at("poll_interval"), &f.poll_interval);
    if poll_interval.is_zero() && humantime::parse_duration(&f.poll_interval).is_ok() {
        p.add(
            &at("poll_interval"),
            "listing again without pause",
            "use e.g. 30s",
        );
    }
    let max_object_bytes = p.bytes(&at("max_object_bytes"), &f.max_object_bytes);
    let notifications = f.notifications.map(|n| {
        if kind != "s3" {
            p.add(
                &at("notifications"),
                "event notifications come from S3",
                "use `source.s3` with `notifications`, or list the directory (leave it out)",
            );
        }
        if n.queue.is_empty() {
            p.add(
                &at("notifications.queue"),
                "no queue",
                "name the SQS queue the bucket's event notifications go to (its URL or name)",
            );
        }
        let visibility_timeout = p.duration(
            &at("notifications.visibility_timeout"),
            &n.visibility_timeout,
        );
        if !(std::time::Duration::from_secs(10)..=std::time::Duration::from_secs(12 * 3600))
            .contains(&visibility_timeout)
        {
            p.add(
                &at("notifications.visibility_timeout"),
                format!(
                    "{} is outside SQS's visibility timeouts used here",
                    n.visibility_timeout
                ),
                "use 10s to 12h, e.g. 5m (it is extended while the objects are read)",
            );
        }
        if n.max_receives == 0 {
            p.add(
                &at("notifications.max_receives"),
                "a message must be received at least once",
                "use e.g. 5",
            );
        }
        ObjectNotifications {
            queue: n.queue,
            visibility_timeout,
            max_receives: n.max_receives.max(1),
        }
    });
    ObjectSource {
        store,
        format,
        compression,
        start_after: f.start_after,
        concurrency: f.concurrency.clamp(1, 64) as usize,
        poll_interval,
        max_object_bytes,
        notifications,
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
