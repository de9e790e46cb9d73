//! Partition paths from event time: `year=YYYY/month=MM/day=DD/hour=HH`, UTC, two-digit
//! month, day and hour, as Athena's partition projection expects them; in a lake partitioned
//! by tenant, `tenant=<t>/` comes first.
//!
//! A tenant value goes into a path, so it must be safe there: [`unsafe_in_path`] says why a
//! value is not (the decoder sends such a record to dead-letter), and [`partition_value`]
//! escapes what still gets through (a value an aggregation's SQL made), as Hive does.

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
/// files and never writes a second copy. `partition`: the (column, escaped value) that comes
/// before time.
pub fn file_key(
    output: &str,
    partition: Option<(&str, &str)>,
    hour_us: i64,
    commit: u64,
    worker: &str,
    n: usize,
) -> String {
    let before = partition
        .map(|(column, value)| format!("{column}={value}/"))
        .unwrap_or_default();
    format!(
        "{output}/{before}{}/part-{commit:010}-{worker}-{n:04}.parquet",
        partition_dir(hour_us)
    )
}

/// Hive's name for the partition of a null value.
pub const NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

/// Why `value` cannot name a partition directory, if it cannot.
pub fn unsafe_in_path(value: &str) -> Option<&'static str> {
    if value.is_empty() {
        return Some("is empty");
    }
    if value == "." || value == ".." {
        return Some("is a relative directory name");
    }
    if value.len() > 128 {
        return Some("is longer than 128 bytes");
    }
    value.chars().find_map(|c| match c {
        '/' => Some("contains `/`"),
        '\\' => Some("contains `\\`"),
        '=' => Some("contains `=`"),
        '%' => Some("contains `%`"),
        c if c.is_control() => Some("contains a control character"),
        _ => None,
    })
}

/// A column value as it is written in a partition directory: as it is when safe, else with
/// each unsafe byte as `%XX` (and `.`/`..` escaped whole); null is Hive's default partition.
pub fn partition_value(value: Option<&str>) -> String {
    let Some(v) = value else {
        return NULL_PARTITION.to_string();
    };
    if unsafe_in_path(v).is_none() {
        return v.to_string();
    }
    if v.is_empty() {
        return NULL_PARTITION.to_string();
    }
    let mut out = String::with_capacity(v.len() * 3);
    for c in v.chars() {
        if matches!(c, '/' | '\\' | '=' | '%' | '.') || c.is_control() {
            let mut b = [0; 4];
            for byte in c.encode_utf8(&mut b).bytes() {
                out.push_str(&format!("%{byte:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The worker that wrote a data file, from its name (`part-<commit>-<worker>-<n>.parquet`),
/// with or without the local lake's staging decoration (`.<name>.inprogress`).
pub fn file_worker(name: &str) -> Option<&str> {
    let name = name.rsplit('/').next()?;
    let name = name.strip_prefix('.').unwrap_or(name);
    let name = name.strip_suffix(".inprogress").unwrap_or(name);
    // Data files, and detector state snapshots (`state-…` beside the lake's tables).
    let rest = (name
        .strip_prefix("part-")
        .and_then(|n| n.strip_suffix(".parquet")))
    .or_else(|| name.strip_prefix("state-")?.strip_suffix(".json.zst"))?;
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
            file_key("readings", None, 0, 7, "w0", 2),
            "readings/year=1970/month=01/day=01/hour=00/part-0000000007-w0-0002.parquet"
        );
        assert_eq!(
            file_key("readings", Some(("tenant", "acme")), 0, 7, "w0", 2),
            "readings/tenant=acme/year=1970/month=01/day=01/hour=00/part-0000000007-w0-0002.parquet"
        );
        let key = file_key("t", Some(("tenant", "a")), 0, 7, "task-3f2a-b", 12);
        assert_eq!(file_worker(&key), Some("task-3f2a-b"));
        assert_eq!(
            file_worker("t/x/.part-0000000001-w1-0000.parquet.inprogress"),
            Some("w1")
        );
        assert_eq!(file_worker("t/x/part-1-w1.parquet"), None);
        assert_eq!(file_worker("t/x/other.parquet"), None);
    }

    #[test]
    fn tenant_values_are_safe_in_a_path_or_escaped() {
        assert_eq!(unsafe_in_path("acme-1.eu"), None);
        for (v, why) in [
            ("a/b", "`/`"),
            ("..", "relative"),
            ("a=b", "`=`"),
            ("a\nb", "control"),
            ("", "empty"),
            ("50%", "`%`"),
        ] {
            assert!(unsafe_in_path(v).unwrap().contains(why), "{v:?}");
        }
        assert_eq!(partition_value(Some("acme")), "acme");
        assert_eq!(partition_value(Some("a/../b=c")), "a%2F%2E%2E%2Fb%3Dc");
        assert_eq!(partition_value(Some("..")), "%2E%2E");
        assert_eq!(partition_value(None), NULL_PARTITION);
        assert_eq!(partition_value(Some("")), NULL_PARTITION);
        assert!(!partition_value(Some("x\u{7}")).contains('\u{7}'));
    }
}
