//! Retries: how long to wait before the next attempt, and what a handler's answer means for a
//! delivery (done, retry later, or dead-lettered).

use std::time::Duration;

use crate::delivery::{after, UnixMillis};
use crate::handlers::HandlerError;
use crate::store::AttemptOutcome;

/// Longest wait between retries, whatever the backoff doubled to.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Retry policy of one handler.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt + 1`: `backoff * 2^(attempt-1)`, capped, with equal
    /// jitter (half fixed, half random) so that retries of many deliveries spread out.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let doubled = self
            .backoff
            .saturating_mul(1_u32 << attempt.saturating_sub(1).min(20))
            .min(MAX_BACKOFF);
        let half = doubled / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// What a handler's answer to attempt number `attempt` means, given its policy.
pub fn outcome_of(
    result: Result<(), HandlerError>,
    attempt: u32,
    policy: &RetryPolicy,
    now: UnixMillis,
) -> AttemptOutcome {
    match result {
        Ok(()) => AttemptOutcome::Ok,
        Err(HandlerError::Permanent(error)) => AttemptOutcome::Dead { error },
        Err(HandlerError::Retryable(error)) if attempt >= policy.max_attempts => {
            AttemptOutcome::Dead { error }
        }
        Err(HandlerError::Retryable(error)) => {
            let delay = policy.delay_after(attempt);
            AttemptOutcome::Retry {
                next_at: after(now, delay),
                error,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let policy = RetryPolicy {
            max_attempts: 8,
            backoff: Duration::from_secs(2),
        };
        for attempt in 1..=4 {
            let full = Duration::from_secs(2) * (1 << (attempt - 1));
            let delay = policy.delay_after(attempt);
            assert!(
                delay >= full / 2 && delay <= full,
                "attempt {attempt}: {delay:?}"
            );
        }
        assert!(policy.delay_after(40) <= MAX_BACKOFF);
    }

    #[test]
    fn retryable_errors_become_dead_after_max_attempts_and_permanent_ones_at_once() {
        let policy = RetryPolicy {
            max_attempts: 3,
            backoff: Duration::from_millis(100),
        };
        let retry = || Err(HandlerError::Retryable("down".into()));
        assert!(
            matches!(outcome_of(retry(), 1, &policy, 0), AttemptOutcome::Retry { next_at, .. } if (50..=100).contains(&next_at))
        );
        assert!(matches!(
            outcome_of(retry(), 3, &policy, 0),
            AttemptOutcome::Dead { .. }
        ));
        let permanent = Err(HandlerError::Permanent("404".into()));
        assert!(matches!(
            outcome_of(permanent, 1, &policy, 0),
            AttemptOutcome::Dead { .. }
        ));
        assert!(matches!(
            outcome_of(Ok(()), 3, &policy, 0),
            AttemptOutcome::Ok
        ));
    }
}
