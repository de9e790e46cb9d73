//! Partition paths from event time: `year=YYYY/month=MM/day=DD/hour=HH`, UTC, two-digit
//! month, day and hour, as Athena's partition projection expects them.

use chrono::{DateTime, Datelike, Timelike};

use crate::columns::{DAY, HOUR, MONTH, YEAR};

pub const HOUR_US: i64 = 3_600_000_000;

/// The start of the hour holding `ts_us`.
pub fn hour_of(ts_us: i64) -> i64 {
    ts_us.div_euclid(HOUR_US) * HOUR_US
}

/// The partition directory of the hour starting at `hour_us`.
pub fn partition_dir(hour_us: i64) -> String {
    let t = DateTime::from_timestamp_micros(hour_us).unwrap_or_default();
    format!(
        "{YEAR}={:04}/{MONTH}={:02}/{DAY}={:02}/{HOUR}={:02}",
        t.year(),
        t.month(),
        t.day(),
        t.hour()
    )
}

/// The key of a data file: deterministic in the commit, so redoing a commit names the same
/// files and never writes a second copy.
pub fn file_key(output: &str, hour_us: i64, commit: u64, worker: &str, n: usize) -> String {
    format!(
        "{output}/{}/part-{commit:010}-{worker}-{n:04}.parquet",
        partition_dir(hour_us)
    )
}

/// The worker that wrote a data file, from its name (`part-<commit>-<worker>-<n>.parquet`),
/// with or without the local lake's staging decoration (`.<name>.inprogress`).
pub fn file_worker(name: &str) -> Option<&str> {
    let name = name.rsplit('/').next()?;
    let name = name.strip_prefix('.').unwrap_or(name);
    let name = name.strip_suffix(".inprogress").unwrap_or(name);
    let rest = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
    let (commit, rest) = rest.split_once('-')?;
    let (worker, n) = rest.rsplit_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(commit) && digits(n) && !worker.is_empty()).then_some(worker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_paths() {
        let ts = chrono::DateTime::parse_from_rfc3339("2026-03-07T09:59:59.999+00:00")
            .unwrap()
            .timestamp_micros();
        assert_eq!(
            partition_dir(hour_of(ts)),
            "year=2026/month=03/day=07/hour=09"
        );
        let ts = chrono::DateTime::parse_from_rfc3339("2026-12-31T23:30:00-02:00")
            .unwrap()
            .timestamp_micros();
        assert_eq!(
            partition_dir(hour_of(ts)),
            "year=2027/month=01/day=01/hour=01"
        );
        assert_eq!(
            file_key("readings", 0, 7, "w0", 2),
            "readings/year=1970/month=01/day=01/hour=00/part-0000000007-w0-0002.parquet"
        );
        let key = file_key("t", 0, 7, "task-3f2a-b", 12);
        assert_eq!(file_worker(&key), Some("task-3f2a-b"));
        assert_eq!(
            file_worker("t/x/.part-0000000001-w1-0000.parquet.inprogress"),
            Some("w1")
        );
        assert_eq!(file_worker("t/x/part-1-w1.parquet"), None);
        assert_eq!(file_worker("t/x/other.parquet"), None);
    }
}
