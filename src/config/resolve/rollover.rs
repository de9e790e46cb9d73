//! `rollover:`, the pipeline's default, and each table's own `rollover:` over it.

use std::time::Duration;

use crate::config::{Problems, Rollover};

/// Parses and checks a rollover; values it leaves out come from `base`.
pub(super) fn check_rollover(
    p: &mut Problems,
    at: &str,
    max_bytes: Option<&String>,
    max_age: Option<&String>,
    base: Option<&Rollover>,
) -> Rollover {
    let max_bytes = match max_bytes {
        Some(text) => {
            let field = format!("{at}.max_bytes");
            let n = p.bytes(&field, text);
            if n > 0 && n < 64 << 10 {
                p.add(
                    &field,
                    format!("{n} bytes makes tiny files"),
                    "use at least 64KiB; 64MiB-512MiB suits Athena",
                );
            }
            n
        }
        None => base.map_or(0, |b| b.max_bytes),
    };
    let max_age = match max_age {
        Some(text) => {
            let field = format!("{at}.max_age");
            let before = p.list.len();
            let d = p.duration(&field, text);
            if d.is_zero() && p.list.len() == before {
                p.add(&field, "must be more than zero", "write e.g. 1m or 5m");
            }
            d
        }
        None => base.map_or(Duration::ZERO, |b| b.max_age),
    };
    Rollover { max_bytes, max_age }
}
