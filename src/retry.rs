//! Retrying, written once: the backoff every loop of ours waits with, the classification of
//! a failed call (throttled, transient, permanent) by its error code and HTTP status, and
//! [`Retry::run`], the loop itself. Used by the Kinesis reader's calls, the lease table's
//! cancelled transactions, the notifiers and the agent's Kinesis sender; the SDK clients'
//! own retry policy ([`crate::aws`]) takes its figures from [`SDK`].
//!
//! Agent-safe: no SDK types; callers pass the code and status they read from their errors.

use std::time::Duration;

/// Exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait before the first retry (at most; jitter takes up to half off).
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
}

/// The SDK clients' policy: 100 ms doubling up to 10 s; with [`SDK_ATTEMPTS`] attempts that
/// rides out about a minute of throttling or 5xx.
pub const SDK: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// Attempts per SDK request, the first included.
pub const SDK_ATTEMPTS: u32 = 10;

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max }
    }

    /// The wait before a retry after `n` retries already: a random time between half of and
    /// `first × 2ⁿ`, capped at `max` (the cap is jittered too, so retries never synchronise).
    pub fn delay(&self, n: u32) -> Duration {
        let cap = self
            .first
            .saturating_mul(2u32.saturating_pow(n.min(16)))
            .min(self.max)
            .as_millis() as u64;
        Duration::from_millis(fastrand::u64(cap / 2..=cap.max(1)))
    }
}

/// What a failed call calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The service asked us to slow down: retry after a backoff, and count it as throttling.
    Throttled,
    /// 5xx, a timeout, a lost connection: retry after a backoff.
    Transient,
    /// Retrying cannot fix it (a missing stream, a denied permission, a bad request).
    Permanent,
}

impl Fault {
    pub fn retryable(self) -> bool {
        self != Self::Permanent
    }

    /// At least [`Fault::Transient`]: for a loop that retries whatever it is not told is
    /// permanent (the agent's PutRecords, which knows its permanent errors by name).
    pub fn max_transient(self) -> Self {
        match self {
            Self::Permanent => Self::Transient,
            f => f,
        }
    }
}

/// Error codes that mean "slow down" in the services shardlake calls (Kinesis, DynamoDB, S3,
/// SNS, STS).
pub const THROTTLING_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "LimitExceededException",
    "SlowDown",
    "TooManyRequestsException",
];

/// DynamoDB's reasons for cancelling a transaction that mean nothing was written and the same
/// transaction may be sent again (throttling, or a conflicting transaction in flight).
const RETRYABLE_CANCELLATIONS: &[&str] = &[
    "ThrottlingError",
    "ProvisionedThroughputExceeded",
    "TransactionConflict",
];

pub fn is_throttling(code: &str) -> bool {
    THROTTLING_CODES.contains(&code)
}

/// Whether a raw error body (XML or JSON, as the SDK's interceptors see it) names a
/// throttling code as a whole word: `Throttling` must not match inside `ThrottlingError`, a
/// DynamoDB cancellation reason that a retry loop of ours counts on its own.
pub fn body_names_throttling(body: &[u8]) -> bool {
    THROTTLING_CODES.iter().any(|c| {
        let c = c.as_bytes();
        body.windows(c.len()).enumerate().any(|(i, w)| {
            w == c
                && body
                    .get(i + c.len())
                    .is_none_or(|b| !b.is_ascii_alphanumeric())
        })
    })
}

/// A failed call, by the error code the service answered and its HTTP status; `None` for
/// both when no answer came (a lost connection, a timeout).
pub fn classify(code: Option<&str>, status: Option<u16>) -> Fault {
    match (code, status) {
        (Some(c), _) if is_throttling(c) => Fault::Throttled,
        (_, Some(429)) => Fault::Throttled,
        (_, Some(s)) if s >= 500 => Fault::Transient,
        (_, Some(_)) => Fault::Permanent,
        (_, None) => Fault::Transient,
    }
}

/// A `TransactionCanceledException` whose every reason is `None` or retryable, and at least
/// one retryable: no condition failed, nothing was written, the same transaction may be sent
/// again.
pub fn cancellation_is_retryable<'a>(reasons: impl IntoIterator<Item = &'a str>) -> bool {
    let mut any = false;
    for r in reasons {
        if RETRYABLE_CANCELLATIONS.contains(&r) {
            any = true;
        } else if r != "None" {
            return false;
        }
    }
    any
}

/// A retry loop: how long to wait, and how many attempts at most.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub backoff: Backoff,
    /// Attempts, the first included; `u32::MAX` for a loop that has nothing better to do
    /// than to try again (a stream consumer).
    pub attempts: u32,
}

impl Retry {
    /// Calls `call` until it succeeds, fails for good (`classify` says [`Fault::Permanent`])
    /// or runs out of attempts; `on_retry(error, fault, attempt)` hears of every failure that
    /// is retried (to count and log it) before the wait.
    pub async fn run<T, E, Fut>(
        &self,
        mut call: impl FnMut() -> Fut,
        classify: impl Fn(&E) -> Fault,
        mut on_retry: impl FnMut(&E, Fault, u32),
    ) -> Result<T, E>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let fault = classify(&e);
                    if !fault.retryable() || attempt >= self.attempts {
                        return Err(e);
                    }
                    on_retry(&e, fault, attempt);
                    tokio::time::sleep(self.backoff.delay(attempt - 1)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_its_cap_with_jitter() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for n in 0..20 {
            let d = b.delay(n);
            let cap = (b.first * 2u32.pow(n.min(8))).min(b.max);
            assert!(d <= cap && d >= cap / 2, "{n}: {d:?} vs {cap:?}");
        }
    }

    #[test]
    fn faults_by_code_and_status() {
        assert_eq!(
            classify(Some("ProvisionedThroughputExceededException"), Some(400)),
            Fault::Throttled
        );
        assert_eq!(classify(Some("SlowDown"), Some(503)), Fault::Throttled);
        assert_eq!(classify(None, Some(429)), Fault::Throttled);
        assert_eq!(
            classify(Some("InternalFailure"), Some(500)),
            Fault::Transient
        );
        assert_eq!(classify(None, None), Fault::Transient);
        assert_eq!(
            classify(Some("ResourceNotFoundException"), Some(400)),
            Fault::Permanent
        );
        assert_eq!(
            classify(Some("AccessDeniedException"), Some(403)),
            Fault::Permanent
        );
    }

    #[test]
    fn bodies_name_throttling_codes_as_whole_words() {
        assert!(body_names_throttling(
            b"<Error><Code>SlowDown</Code></Error>"
        ));
        assert!(body_names_throttling(
            br#"{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException"}"#
        ));
        assert!(!body_names_throttling(
            br#"{"CancellationReasons":[{"Code":"ThrottlingError"}]}"#
        ));
        assert!(!body_names_throttling(b"<Code>InternalError</Code>"));
    }

    #[test]
    fn a_cancellation_is_retried_only_when_no_condition_failed() {
        assert!(cancellation_is_retryable(["None", "ThrottlingError"]));
        assert!(cancellation_is_retryable(["TransactionConflict"]));
        assert!(!cancellation_is_retryable(["None", "None"]));
        assert!(!cancellation_is_retryable([
            "ConditionalCheckFailed",
            "ThrottlingError"
        ]));
        assert!(!cancellation_is_retryable(std::iter::empty::<&str>()));
    }

    fn quick(attempts: u32) -> Retry {
        Retry {
            backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(2)),
            attempts,
        }
    }

    #[tokio::test]
    async fn retries_until_success_and_reports_each_failure() {
        let mut calls = 0;
        let mut heard = Vec::new();
        let r: Result<u32, Fault> = quick(10)
            .run(
                || {
                    calls += 1;
                    let n = calls;
                    async move {
                        match n {
                            1 => Err(Fault::Throttled),
                            2 => Err(Fault::Transient),
                            n => Ok(n),
                        }
                    }
                },
                |e| *e,
                |_, f, n| heard.push((f, n)),
            )
            .await;
        assert_eq!(r, Ok(3));
        assert_eq!(heard, [(Fault::Throttled, 1), (Fault::Transient, 2)]);
    }

    #[tokio::test]
    async fn stops_at_a_permanent_fault_or_the_last_attempt() {
        let mut calls = 0;
        let r: Result<(), Fault> = quick(10)
            .run(
                || {
                    calls += 1;
                    std::future::ready(Err(Fault::Permanent))
                },
                |e| *e,
                |_, _, _| panic!("a permanent fault is not retried"),
            )
            .await;
        assert_eq!((r, calls), (Err(Fault::Permanent), 1));
        let mut calls = 0;
        let r: Result<(), Fault> = quick(3)
            .run(
                || {
                    calls += 1;
                    std::future::ready(Err(Fault::Transient))
                },
                |e| *e,
                |_, _, _| {},
            )
            .await;
        assert_eq!((r, calls), (Err(Fault::Transient), 3));
    }
}
