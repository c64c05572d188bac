//! Time as the store and the dispatcher see it: milliseconds since the Unix epoch, from a
//! [`Clock`] that the program gets from the system and a test can move by hand (to let a lease
//! run out or a retry come due without waiting for it).
//!
//! Replicas sharing one PostgreSQL database compare each other's lease deadlines, so their
//! clocks must agree to well within `dispatch.lease` (NTP, as every Kubernetes node runs, gives
//! milliseconds).

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};

/// Milliseconds since the Unix epoch.
pub type UnixMillis = i64;

/// Where "now" comes from.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> UnixMillis;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixMillis {
        now_millis()
    }
}

/// A clock that moves only when told: for tests of leases, retries and backoff.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// Starts at the current system time, so stored times look like real ones.
    pub fn new() -> Self {
        Self(AtomicI64::new(now_millis()))
    }

    pub fn advance(&self, by: std::time::Duration) {
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX / 4);
        self.0.fetch_add(by, Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixMillis {
        self.0.load(Ordering::SeqCst)
    }
}

/// The system time in Unix milliseconds.
pub fn now_millis() -> UnixMillis {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// `at + by`, saturating: deadlines computed from durations never wrap.
pub fn after(at: UnixMillis, by: std::time::Duration) -> UnixMillis {
    at.saturating_add(i64::try_from(by.as_millis()).unwrap_or(i64::MAX))
}

/// RFC 3339 text for a stored time, always with milliseconds so that columns line up.
pub fn format_millis(ms: UnixMillis) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => ms.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = ManualClock::new();
        let start = clock.now();
        assert_eq!(clock.now(), start);
        clock.advance(std::time::Duration::from_secs(31));
        assert_eq!(clock.now(), start + 31_000);
    }

    #[test]
    fn stored_times_format_with_milliseconds() {
        assert_eq!(format_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_millis(1_714_638_612_345), "2024-05-02T08:30:12.345Z");
    }
}
