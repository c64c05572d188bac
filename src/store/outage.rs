//! How the program tells an operator that the store is unavailable, and how it retries.
//!
//! A store that cannot be written is tried again and again (each delivery, the dispatcher's
//! rounds, the background probes), and a line per try would bury the one line that matters. So
//! each back-end's [`Outage`] says once that the store is unavailable and why, once that it is back (and how
//! long it was away), and in between at most one line every [`REMINDER_INTERVAL`] with how many
//! writes were refused since; `labelhook_store_refusals_total` counts every one. The reason is
//! the error the store gave, never a guess.
//!
//! [`Backoff`] spaces the retries of a loop that has nothing else to do while the store is away:
//! doubling from a short pause to a cap, with jitter so that replicas do not try in step.

use std::time::{Duration, Instant};

use super::StoreError;
use crate::telemetry;

/// While the store stays unavailable, a reminder at most this often.
pub const REMINDER_INTERVAL: Duration = Duration::from_secs(30);

/// The state of one reporter (the SQLite writer, a PostgreSQL store, the dispatcher).
#[derive(Debug)]
pub struct Outage {
    /// Names what is reporting, in each line (`store`, `dispatcher`).
    what: &'static str,
    /// The back-end whose refusals this counts.
    backend: &'static str,
    since: Option<Instant>,
    /// Refusals since the last line.
    refused: u64,
    last_line: Option<Instant>,
}

impl Outage {
    pub fn new(what: &'static str, backend: &'static str) -> Self {
        Self {
            what,
            backend,
            since: None,
            refused: 0,
            last_line: None,
        }
    }

    /// `refused` writes failed with `error`.
    pub fn failed(&mut self, error: &StoreError, refused: usize) {
        count_refusals(self.backend, refused);
        let refused = refused as u64;
        self.refused += refused;
        let now = Instant::now();
        match self.since {
            None => {
                self.since = Some(now);
                tracing::error!(
                    error = %error,
                    refused = self.refused,
                    "{}: store unavailable; retrying (a line every {}s until it is back)",
                    self.what,
                    REMINDER_INTERVAL.as_secs()
                );
            }
            Some(since)
                if self
                    .last_line
                    .is_none_or(|at| at.elapsed() >= REMINDER_INTERVAL) =>
            {
                tracing::warn!(
                    error = %error,
                    refused = self.refused,
                    unavailable_for_s = since.elapsed().as_secs(),
                    "{}: store still unavailable",
                    self.what
                );
            }
            Some(_) => return,
        }
        self.last_line = Some(now);
        self.refused = 0;
    }

    /// A write went through: the outage, if any, is over.
    pub fn succeeded(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                unavailable_for_s = since.elapsed().as_secs(),
                refused = self.refused,
                "{}: store available again",
                self.what
            );
        }
        self.refused = 0;
        self.last_line = None;
    }

    pub fn is_out(&self) -> bool {
        self.since.is_some()
    }
}

/// Counts `refused` writes the store refused because it was unavailable.
pub fn count_refusals(backend: &'static str, refused: usize) {
    metrics::counter!(telemetry::STORE_REFUSALS_TOTAL, "backend" => backend)
        .increment(refused as u64);
}

/// Pauses between retries: from `first`, doubling up to `cap`, each with up to a quarter more
/// at random.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Self {
        Self {
            first,
            cap,
            next: first,
        }
    }

    /// The pause before the next retry.
    pub fn pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.cap);
        let jitter = pause.mul_f64(fastrand::f64() / 4.0);
        pause + jitter
    }

    /// After a success: the next failure starts from `first` again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_a_bounded_jitter_and_starts_over_after_a_success() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let pauses: Vec<Duration> = (0..6).map(|_| b.pause()).collect();
        for (pause, base) in pauses.iter().zip([100, 200, 400, 800, 1000, 1000]) {
            let base = Duration::from_millis(base);
            assert!(*pause >= base && *pause <= base.mul_f64(1.25), "{pause:?}");
        }
        b.reset();
        assert!(b.pause() <= Duration::from_millis(125));
    }

    #[test]
    fn an_outage_is_told_once_then_reminded_then_ended() {
        let mut o = Outage::new("store", "sqlite");
        let e = StoreError::unavailable("disk full");
        o.failed(&e, 1);
        assert!(o.is_out());
        assert!(o.last_line.is_some());
        let first = o.last_line;
        o.failed(&e, 3);
        assert_eq!(o.last_line, first, "no second line within the interval");
        assert_eq!(o.refused, 3, "counted for the next line");
        o.succeeded();
        assert!(!o.is_out());
        assert_eq!(o.refused, 0);
    }
}
