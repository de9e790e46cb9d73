//! One schema field as both readers see it, and the conversion of its JSON value to a typed
//! slot. The flat reader and the strict serde_json reader hand each scalar to the same
//! [`Value`], so they fill the same slots and word type errors alike without calling each
//! other: both depend on this file, and it on neither.

use std::borrow::Cow;
use std::fmt;

use arrow::compute::kernels::cast_utils::string_to_datetime;
use chrono::Utc;

/// How a schema field's JSON value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Str,
    I32,
    I64,
    F32,
    F64,
    Bool,
    /// RFC 3339 text (and the variants arrow's cast accepts), to microseconds.
    Rfc3339,
    /// The event time as milliseconds since the epoch (`event_time.format: epoch_millis`).
    EpochMillis,
}

impl Kind {
    pub(super) fn expected(self) -> &'static str {
        match self {
            Kind::Str => "a string",
            Kind::I32 | Kind::I64 => "an integer",
            Kind::F32 | Kind::F64 => "a number",
            Kind::Bool => "true or false",
            Kind::Rfc3339 => "an RFC 3339 timestamp string",
            Kind::EpochMillis => "an integer of milliseconds since the epoch",
        }
    }
}

#[derive(Debug)]
pub(super) struct FieldSpec {
    pub(super) name: String,
    /// `name`, for the flat reader's comparisons.
    pub(super) key: Name,
    pub(super) kind: Kind,
    pub(super) required: bool,
}

/// One field's value in the record being read, borrowed from the record where it can be.
#[derive(Debug)]
pub(super) enum Slot<'a> {
    /// Absent, or JSON `null`.
    Absent,
    Str(Cow<'a, str>),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Microseconds since the epoch.
    Time(i64),
    /// Text that is not a timestamp: a reason of its own, after type errors.
    BadTime(Cow<'a, str>),
}

/// A field name as keys are compared with it: names of up to 16 bytes (nearly all) as two
/// words, so a key is matched with two loads and compares, not a call to `memcmp`.
#[derive(Debug, Clone)]
pub(super) struct Name {
    bytes: Box<[u8]>,
    /// The first 16 bytes of the name, zero beyond its end.
    words: [u64; 2],
    /// Which bits of two words read at a key's start are the key's.
    masks: [u64; 2],
}

impl Name {
    pub(super) fn new(name: &str) -> Self {
        let bytes: Box<[u8]> = name.as_bytes().into();
        let mut padded = [0u8; 16];
        let n = bytes.len().min(16);
        padded[..n].copy_from_slice(&bytes[..n]);
        let mask = |n: usize| match n {
            0 => 0,
            1..=7 => (1u64 << (8 * n)) - 1,
            _ => u64::MAX,
        };
        Self {
            words: [word(&padded[..8]), word(&padded[8..])],
            masks: [mask(n), mask(n.saturating_sub(8))],
            bytes,
        }
    }

    /// Whether `b[key]` is this name.
    #[inline]
    pub(super) fn is_at(&self, b: &[u8], key: &std::ops::Range<usize>) -> bool {
        if key.len() != self.bytes.len() {
            return false;
        }
        match b.get(key.start..key.start + 16) {
            // Sixteen bytes from the key's start are in the record (a key is followed by at
            // least `":` and a value): those past the key are masked off.
            Some(w) if key.len() <= 16 => {
                (word(&w[..8]) & self.masks[0]) == self.words[0]
                    && (word(&w[8..]) & self.masks[1]) == self.words[1]
            }
            _ => b[key.clone()] == *self.bytes,
        }
    }
}

#[inline]
fn word(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

/// A schema field's value.
pub(super) struct Value<'s> {
    pub field: &'s FieldSpec,
    pub wrong: &'s mut Option<String>,
}

impl<'a> Value<'_> {
    #[cold]
    pub(super) fn mismatch(self, got: &str) -> Slot<'a> {
        let f = self.field;
        self.fail(format!(
            "field `{}`: expected {}, got {got}",
            f.name,
            f.kind.expected()
        ))
    }

    #[cold]
    fn fail(self, message: String) -> Slot<'a> {
        if self.wrong.is_none() {
            *self.wrong = Some(message);
        }
        Slot::Absent
    }

    #[cold]
    fn out_of_range(self, v: impl fmt::Display) -> Slot<'a> {
        let name = &self.field.name;
        let m = format!("field `{name}`: {v} is out of range");
        self.fail(m)
    }

    #[inline]
    pub(super) fn int(self, v: i64) -> Slot<'a> {
        match self.field.kind {
            Kind::I32 if i32::try_from(v).is_err() => self.out_of_range(v),
            Kind::I32 | Kind::I64 => Slot::Int(v),
            Kind::F32 | Kind::F64 => Slot::Float(v as f64),
            Kind::EpochMillis => match v.checked_mul(1000) {
                Some(us) => Slot::Time(us),
                None => self.out_of_range(v),
            },
            Kind::Str | Kind::Bool | Kind::Rfc3339 => self.mismatch("a number"),
        }
    }

    #[inline]
    pub(super) fn text(self, v: Cow<'a, str>) -> Slot<'a> {
        match self.field.kind {
            Kind::Str => Slot::Str(v),
            Kind::Rfc3339 => match utc_micros(&v) {
                Some(us) => Slot::Time(us),
                None => match string_to_datetime(&Utc, &v) {
                    Ok(t) => Slot::Time(t.timestamp_micros()),
                    Err(_) => Slot::BadTime(v),
                },
            },
            Kind::Bool => self.mismatch("a string"),
            // Numbers written as strings are read, as arrow-json reads them.
            Kind::I32 | Kind::I64 | Kind::EpochMillis => match v.parse::<i64>() {
                Ok(n) => self.int(n),
                Err(_) => self.unparsable(&v),
            },
            Kind::F32 | Kind::F64 => match v.parse::<f64>() {
                Ok(x) => Slot::Float(x),
                Err(_) => self.unparsable(&v),
            },
        }
    }

    #[inline]
    pub(super) fn uint(self, v: u64) -> Slot<'a> {
        match i64::try_from(v) {
            Ok(v) => self.int(v),
            Err(_) if matches!(self.field.kind, Kind::F32 | Kind::F64) => Slot::Float(v as f64),
            Err(_) if matches!(self.field.kind, Kind::Str | Kind::Bool | Kind::Rfc3339) => {
                self.mismatch("a number")
            }
            Err(_) => self.out_of_range(v),
        }
    }

    #[inline]
    pub(super) fn float(self, v: f64) -> Slot<'a> {
        match self.field.kind {
            Kind::F32 | Kind::F64 => Slot::Float(v),
            Kind::I32 | Kind::I64 | Kind::EpochMillis => {
                // serde_json gives a float for `1.5`, `1e3` and integers beyond u64.
                let within = v.fract() == 0.0 && v.abs() < 9.2e18;
                if v.fract() != 0.0 || within {
                    let name = &self.field.name;
                    let m = format!("field `{name}`: {v} is not an integer");
                    self.fail(m)
                } else {
                    self.out_of_range(v)
                }
            }
            Kind::Str | Kind::Bool | Kind::Rfc3339 => self.mismatch("a number"),
        }
    }

    #[inline]
    pub(super) fn boolean(self, v: bool) -> Slot<'a> {
        match self.field.kind {
            Kind::Bool => Slot::Bool(v),
            _ => self.mismatch("a boolean"),
        }
    }

    #[cold]
    fn unparsable(self, v: &str) -> Slot<'a> {
        let ty = match self.field.kind {
            Kind::I32 => "Int32",
            Kind::F32 => "Float32",
            Kind::F64 => "Float64",
            _ => "Int64",
        };
        let name = &self.field.name;
        let m = format!("field `{name}`: failed to parse {v:?} as {ty}");
        self.fail(m)
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]` then `Z` or `±HH:MM`, the forms nearly every sensor
/// writes, in microseconds since the epoch (a fraction beyond them truncated, as the full
/// parser does), or `None` for any other form, which arrow's RFC 3339 parser then reads.
pub(super) fn utc_micros(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    if b.len() < 20 || !(at(4, b'-') && at(7, b'-') && at(10, b'T') && at(13, b':')) {
        return None;
    }
    if !at(16, b':') {
        return None;
    }
    let num = |from: usize, to: usize| digits_value(&b[from..to]);
    let n = b.len();
    let (body_end, offset) = match b[n - 1] {
        b'Z' => (n - 1, 0),
        _ if n >= 25 && matches!(b[n - 6], b'+' | b'-') && b[n - 3] == b':' => {
            let (hours, minutes) = (num(n - 5, n - 3)?, num(n - 2, n)?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let east = i64::from(hours * 3600 + minutes * 60);
            (n - 6, if b[n - 6] == b'-' { -east } else { east })
        }
        _ => return None,
    };
    let micros = match &b[19..body_end] {
        [] => 0,
        [b'.', digits @ ..] if (1..=9).contains(&digits.len()) => {
            let kept = digits.len().min(6);
            num(20, 20 + digits.len())?;
            num(20, 20 + kept)? * 10u32.pow((6 - kept) as u32)
        }
        _ => return None,
    };
    let (minute, second) = (num(14, 16)?, num(17, 19)?);
    if minute > 59 || second > 59 {
        return None;
    }
    // `YYYY-MM-DDTHH` as two overlapping words: a stream's readings mostly share their date
    // and hour, so the last valid one's seconds are kept (a key of ASCII bytes is never 0).
    let key = (word(&b[..8]), word(&b[5..13]));
    let (k0, k1, cached) = LAST_HOUR.get();
    let hour_start = if (k0, k1) == key {
        cached
    } else {
        let (year, month, day, hour) = (num(0, 4)?, num(5, 7)?, num(8, 10)?, num(11, 13)?);
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let month_days = match month {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            1..=12 => 31,
            _ => return None,
        };
        if day == 0 || day > month_days || hour > 23 {
            return None;
        }
        let start = days_from_civil(year.into(), month.into(), day.into()) * 86_400
            + i64::from(hour) * 3600;
        LAST_HOUR.set((key.0, key.1, start));
        start
    };
    let seconds = hour_start + i64::from(minute * 60 + second) - offset;
    Some(seconds * 1_000_000 + i64::from(micros))
}

thread_local! {
    /// The last valid `YYYY-MM-DDTHH` [`utc_micros`] read, as two words, and its seconds
    /// since the epoch.
    static LAST_HOUR: std::cell::Cell<(u64, u64, i64)> = const { std::cell::Cell::new((0, 0, 0)) };
}

/// The value of a few ASCII digits, or `None` if one is not a digit.
#[inline(always)]
fn digits_value(digits: &[u8]) -> Option<u32> {
    digits.iter().try_fold(0u32, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
    })
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (Howard Hinnant's
/// `days_from_civil`).
#[inline]
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::{Name, utc_micros};

    /// Every name length to 20 against keys equal to it, one byte off at each position,
    /// one byte longer or shorter, with and without sixteen bytes of record after the key.
    #[test]
    fn a_name_matches_exactly_its_own_key() {
        for len in 0..=20 {
            let name: String = (0..len).map(|i| (b'a' + (i as u8 % 26)) as char).collect();
            let n = Name::new(&name);
            let mut keys = vec![(name.clone().into_bytes(), true)];
            for at in 0..len {
                let mut k = name.clone().into_bytes();
                k[at] ^= 0x20;
                keys.push((k, false));
            }
            keys.push((format!("{name}a").into_bytes(), false));
            if len > 0 {
                keys.push((name.as_bytes()[..len - 1].to_vec(), false));
            }
            for (key, same) in keys {
                for tail in [&b""[..], b"\":1}", b"\":\"0123456789abcdefghij\"}"] {
                    let record = [&key[..], tail].concat();
                    assert_eq!(
                        n.is_at(&record, &(0..key.len())),
                        same,
                        "{name:?} vs {:?}",
                        String::from_utf8_lossy(&record)
                    );
                    // The same key in the middle of a record.
                    let record = [b"{\"", &key[..], tail].concat();
                    assert_eq!(n.is_at(&record, &(2..2 + key.len())), same);
                }
            }
        }
    }

    /// The fast timestamp form gives arrow's parser's microseconds, or leaves the text to it.
    // Over 80 lines: the edge cases and the generator of random forms read best together.
    #[test]
    fn fast_timestamps_read_as_arrows_parser_reads_them() {
        use arrow::compute::kernels::cast_utils::string_to_datetime;
        let mut rng = fastrand::Rng::with_seed(42);
        let mut fast = 0;
        let mut fast_offsets = 0;
        let mut prefix = String::from("2026-01-05T10");
        let edges = [
            "1900-02-29T00:00:00Z",
            "2000-02-29T00:00:00Z",
            "2100-02-29T00:00:00Z",
            "2024-02-29T12:00:00Z",
            "2023-02-29T12:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-12-31T23:59:59.999999999Z",
            "1969-12-31T23:59:59.999999Z",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "2026-01-05T10:00:00.123+05:30",
            "2026-01-05T00:00:00-00:00",
            "2026-01-01T00:30:00+01:00",
            "2026-03-01T23:59:59.5-23:59",
            "0000-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
        ];
        for text in edges {
            let full = string_to_datetime(&chrono::Utc, text).map(|t| t.timestamp_micros());
            assert_eq!(utc_micros(text).ok_or(()), full.map_err(|_| ()), "{text}");
        }
        // Offsets arrow accepts (`+05:60` as `+06:00`) or not, which the fast path leaves
        // to it.
        for text in ["2026-01-05T10:00:00+24:00", "2026-01-05T10:00:00+05:60"] {
            assert_eq!(utc_micros(text), None, "{text}");
        }
        for _ in 0..50_000 {
            let fraction = match rng.u8(..4) {
                0 => String::new(),
                _ => format!(
                    ".{}",
                    (0..rng.usize(1..12))
                        .map(|_| rng.digit(10))
                        .collect::<String>()
                ),
            };
            // A third of the time the date and hour of the one before, and a third of the time
            // those with one digit changed, so the fast path's cache of the last date and
            // hour is tried against other minutes, seconds and zones, and near misses.
            let turn = rng.u8(..3);
            if turn == 1 {
                let at = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12][rng.usize(..10)];
                let mut bytes = prefix.clone().into_bytes();
                bytes[at] = rng.digit(10) as u8;
                prefix = String::from_utf8(bytes).unwrap();
            } else if turn == 2 {
                prefix = format!(
                    "{:04}-{:02}-{:02}{}{:02}",
                    rng.u16(..10_000),
                    rng.u8(..14),
                    rng.u8(..32),
                    ['T', 'T', 'T', ' '][rng.usize(..4)],
                    rng.u8(..25),
                );
            }
            let text = format!(
                "{prefix}:{:02}:{:02}{fraction}{}",
                rng.u8(..61),
                rng.u8(..61),
                match rng.u8(..8) {
                    0..3 => "Z".to_string(),
                    3 => ["z", "", "+0530", "+05", "UTC"][rng.usize(..5)].to_string(),
                    _ => format!(
                        "{}{:02}:{:02}",
                        ['+', '-'][rng.usize(..2)],
                        rng.u8(..26),
                        rng.u8(..62)
                    ),
                },
            );
            let full = string_to_datetime(&chrono::Utc, &text).map(|t| t.timestamp_micros());
            if let Some(us) = utc_micros(&text) {
                assert_eq!(Ok(us), full.map_err(|e| e.to_string()), "{text}");
                fast += 1;
                fast_offsets += usize::from(!text.ends_with('Z'));
            }
        }
        assert!(fast > 10_000, "only {fast} in the fast form");
        assert!(fast_offsets > 5_000, "only {fast_offsets} with an offset");
    }
}
