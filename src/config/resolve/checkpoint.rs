//! `checkpoints:`: a local directory, or a DynamoDB lease table shared by the workers of a
//! Kinesis source.

use std::time::Duration;

use crate::config::file::CheckpointsFile;
use crate::config::{Checkpoints, LeaseTable, Problems, Source};

/// `source` is the resolved source: leases only make sense with Kinesis.
pub(super) fn resolve_checkpoints(
    p: &mut Problems,
    f: CheckpointsFile,
    source: &Source,
) -> Checkpoints {
    match f {
        CheckpointsFile::Local { path } => Checkpoints::Local { path: path.into() },
        CheckpointsFile::S3 {
            bucket,
            prefix,
            region,
        } => {
            if !super::lake::is_bucket_name(&bucket) {
                p.add(
                    "checkpoints.s3.bucket",
                    format!("`{bucket}` is not an S3 bucket name"),
                    "give the bucket's name only (3-63 lowercase letters, digits, `.` and `-`); put the path in `prefix`",
                );
            }
            Checkpoints::S3 {
                bucket,
                prefix: prefix.trim_matches('/').to_string(),
                region,
            }
        }
        CheckpointsFile::Dynamodb {
            table,
            region,
            failover_time,
            shard_sync_interval,
            max_leases,
        } => {
            let at = |k: &str| format!("checkpoints.dynamodb.{k}");
            let valid = (3..=255).contains(&table.len())
                && table
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !valid {
                p.add(
                    &at("table"),
                    format!("`{table}` is not a DynamoDB table name"),
                    "use 3-255 letters, digits, `_`, `.` or `-`, e.g. shardlake-<pipeline>",
                );
            }
            if !matches!(source, Source::Kinesis(_)) {
                p.add(
                    "checkpoints.dynamodb",
                    "DynamoDB leases share a Kinesis stream's shards between workers; this source is not Kinesis",
                    "use `checkpoints: {local: {path: ...}}` with a local stream",
                );
            }
            let failover_time = p.duration(&at("failover_time"), &failover_time);
            if failover_time < Duration::from_secs(1) {
                p.add(
                    &at("failover_time"),
                    "a lease must last at least 1s",
                    "use e.g. `10s` (renewed three times per period)",
                );
            }
            if !(1..=100).contains(&max_leases) {
                p.add(
                    &at("max_leases"),
                    format!("{max_leases} is outside 1..=100"),
                    "a commit writes every lease in one transaction of at most 100 items",
                );
            }
            Checkpoints::Dynamodb(LeaseTable {
                table,
                region,
                failover_time,
                shard_sync_interval: p.duration(&at("shard_sync_interval"), &shard_sync_interval),
                max_leases: max_leases.clamp(1, 100) as usize,
            })
        }
    }
}
