//! Exponential backoff with jitter, for the retry loops of our own (Kinesis reads, the
//! lease table's cancelled transactions, alert notifiers); the SDK has its own for the rest.

use std::time::Duration;

/// The wait before a retry after `n` retries already: a random time between half of and
/// `first × 2ⁿ`, capped at `max` (the cap is jittered too, so retries never synchronise).
pub fn jittered(first: Duration, n: u32, max: Duration) -> Duration {
    let cap = first
        .saturating_mul(2u32.saturating_pow(n.min(16)))
        .min(max)
        .as_millis() as u64;
    Duration::from_millis(fastrand::u64(cap / 2..=cap.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_its_cap_with_jitter() {
        let (first, max) = (Duration::from_millis(100), Duration::from_secs(10));
        for n in 0..20 {
            let b = jittered(first, n, max);
            let cap = (first * 2u32.pow(n.min(8))).min(max);
            assert!(b <= cap && b >= cap / 2, "{n}: {b:?} vs {cap:?}");
        }
    }
}
