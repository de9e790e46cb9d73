//! Partition paths from event time: `year=YYYY/month=MM/day=DD/hour=HH`, UTC, two-digit
//! month, day and hour, as Athena's partition projection expects them.

use chrono::{DateTime, Datelike, Timelike};

pub const HOUR_US: i64 = 3_600_000_000;

/// The start of the hour holding `ts_us`.
pub fn hour_of(ts_us: i64) -> i64 {
    ts_us.div_euclid(HOUR_US) * HOUR_US
}

/// The partition directory of the hour starting at `hour_us`.
pub fn partition_dir(hour_us: i64) -> String {
    let t = DateTime::from_timestamp_micros(hour_us).unwrap_or_default();
    format!(
        "year={:04}/month={:02}/day={:02}/hour={:02}",
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
    }
}
