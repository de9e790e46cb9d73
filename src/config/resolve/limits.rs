//! `limits:`: the per-record limits (size, clock skew) and the window buffer's bound.

use crate::config::Problems;
use crate::config::file::LimitsFile;

/// The resolved `limits:`, which the [`Pipeline`](crate::config::Pipeline) keeps as three
/// fields of its own.
pub(super) struct Limits {
    pub max_record_bytes: usize,
    /// Microseconds.
    pub max_future_skew: i64,
    pub window_buffer_records: usize,
    pub detector_series: usize,
}

pub(super) fn resolve_limits(p: &mut Problems, f: &LimitsFile) -> Limits {
    let max_record_bytes = p.bytes("limits.max_record_bytes", &f.max_record_bytes);
    if max_record_bytes == 0 {
        p.add(
            "limits.max_record_bytes",
            "must be more than zero",
            "write e.g. 1MiB",
        );
    }
    let max_future_skew = p.duration("limits.max_future_skew", &f.max_future_skew);
    if f.window_buffer_records == 0 {
        p.add(
            "limits.window_buffer_records",
            "must be more than zero",
            "leave it out for the default (100000), or write a smaller count to use less memory",
        );
    }
    if f.detector_series == 0 {
        p.add(
            "limits.detector_series",
            "must be more than zero",
            "leave it out for the default (100000), or write the number of series (device × rule × `by` values) one worker may track",
        );
    }
    Limits {
        detector_series: f.detector_series as usize,
        max_record_bytes: max_record_bytes as usize,
        max_future_skew: max_future_skew.as_micros() as i64,
        window_buffer_records: f.window_buffer_records as usize,
    }
}
