//! Admission: what the service does when deliveries arrive faster than handlers take them.
//!
//! Past `server.backlog_limit` deliveries waiting for their handlers, each new delivery is
//! still stored and acknowledged, but its answer is held back for a while that grows with the
//! backlog (up to `server.backlog_max_delay` once the backlog is twice the limit). A sender that
//! waits for answers before sending more, as webhook senders do, then slows down to the rate
//! the handlers get, and the backlog stays near the limit instead of growing without bound.
//!
//! It never refuses a delivery for the backlog: Labelbox documents no retries, so a 503 could
//! lose an event, while a slower 2xx loses nothing. (The store's own queue, `queue_capacity`,
//! is the hard bound; past it a delivery gets 503.)
//!
//! The backlog is read from the store every [`SAMPLE_EVERY`] by [`watch_backlog`], which also
//! publishes it as the `labelhook_queue_depth` gauge, and the age of its oldest delivery as
//! `labelhook_oldest_pending_delivery_age_seconds`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Queue;

/// How often the backlog is read from the store.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// `server.backlog_limit` when not set.
pub const DEFAULT_BACKLOG_LIMIT: u64 = 5_000;
/// `server.backlog_max_delay` when not set.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(1);

/// The backlog as last read, and what to do about it.
#[derive(Debug)]
pub struct Admission {
    backlog: AtomicU64,
    limit: u64,
    max_delay: Duration,
}

impl Admission {
    /// `limit` 0 turns the slowing down off.
    pub fn new(limit: u64, max_delay: Duration) -> Self {
        Self {
            backlog: AtomicU64::new(0),
            limit,
            max_delay,
        }
    }

    pub fn set_backlog(&self, backlog: u64) {
        self.backlog.store(backlog, Ordering::Relaxed);
    }

    /// How long the answer to a delivery arriving now is held back.
    pub fn delay(&self) -> Duration {
        let backlog = self.backlog.load(Ordering::Relaxed);
        if self.limit == 0 || backlog <= self.limit {
            return Duration::ZERO;
        }
        let over = (backlog - self.limit) as f64 / self.limit as f64;
        self.max_delay.mul_f64(over.min(1.0))
    }
}

/// Reads the backlog every [`SAMPLE_EVERY`] until `stop`, for `admission` and the gauge.
pub async fn watch_backlog(
    queue: Arc<dyn Queue>,
    admission: Arc<Admission>,
    stop: CancellationToken,
) {
    loop {
        match queue.queue_depth().await {
            Ok(depth) => {
                admission.set_backlog(depth);
                metrics::gauge!("labelhook_queue_depth").set(depth as f64);
            }
            Err(e) => tracing::debug!(error = %e, "backlog not read this time"),
        }
        match queue.oldest_unfinished().await {
            Ok(oldest) => {
                let now = crate::delivery::now_millis();
                let age = oldest.map_or(0.0, |at| (now - at).max(0) as f64 / 1000.0);
                metrics::gauge!(crate::telemetry::OLDEST_PENDING_AGE_SECONDS).set(age);
            }
            Err(e) => tracing::debug!(error = %e, "oldest pending delivery not read this time"),
        }
        tokio::select! {
            () = tokio::time::sleep(SAMPLE_EVERY) => {}
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_grows_with_the_backlog_past_the_limit_and_is_capped() {
        let admission = Admission::new(1000, Duration::from_secs(2));
        for (backlog, delay_ms) in [(0, 0), (1000, 0), (1500, 1000), (2000, 2000), (9000, 2000)] {
            admission.set_backlog(backlog);
            assert_eq!(
                admission.delay(),
                Duration::from_millis(delay_ms),
                "{backlog}"
            );
        }
        let off = Admission::new(0, Duration::from_secs(2));
        off.set_backlog(1_000_000);
        assert_eq!(off.delay(), Duration::ZERO);
    }
}
