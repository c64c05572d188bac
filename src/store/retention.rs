//! Retention: the store does not grow for ever. Finished deliveries are deleted after a while
//! (their bodies may go sooner than the rows that describe them), stale, unrecognized and dead
//! ones are kept longer (they are what an operator investigates), and an optional budget bounds
//! the bytes of bodies kept.
//!
//! Never pruned: a delivery with work left (not gated yet, pending, waiting in its lane, being
//! handled, or retrying), and the ordering state of an entity (its last applied version, and
//! whether it was deleted), so that a stale event stays stale after its elders are gone.
//!
//! Pruning runs in the background in small batches, each its own short transaction, with a
//! pause between them, so that ingest and dispatch are never stalled behind it; and on demand
//! with `labelhook events prune [--dry-run]`.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::{Maintenance, StoreError};
use crate::delivery::{Clock, Status, UnixMillis};

/// `[store.retention]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// Delivered deliveries are deleted this long after they were received.
    #[serde(with = "crate::settings::de::duration")]
    pub delivered: Duration,
    /// The bodies of delivered deliveries are dropped this long after they were received (the
    /// rows stay until `delivered`).
    #[serde(with = "crate::settings::de::duration")]
    pub bodies: Duration,
    /// Stale, unrecognized and dead deliveries are deleted this long after they were received.
    #[serde(with = "crate::settings::de::duration")]
    pub investigate: Duration,
    /// Most bytes of bodies kept; beyond it the bodies of the oldest finished deliveries are
    /// dropped first, whatever their age. `None`: no budget.
    pub max_body_bytes: Option<u64>,
    /// How often the background pruner runs; "0s" turns it off (`events prune` still works).
    #[serde(with = "crate::settings::de::duration")]
    pub interval: Duration,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            delivered: Duration::from_secs(14 * DAY),
            bodies: Duration::from_secs(7 * DAY),
            investigate: Duration::from_secs(90 * DAY),
            max_body_bytes: None,
            interval: Duration::from_secs(60),
        }
    }
}

/// What may be pruned at one moment, as times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutoffs {
    /// Delivered deliveries received before this are deleted.
    pub delivered_before: UnixMillis,
    /// Bodies of delivered deliveries received before this are dropped.
    pub bodies_before: UnixMillis,
    /// Stale, unrecognized and dead deliveries received before this are deleted.
    pub investigated_before: UnixMillis,
    pub max_body_bytes: Option<u64>,
}

impl Cutoffs {
    pub fn at(now: UnixMillis, settings: &RetentionSettings) -> Self {
        let before = |keep: Duration| {
            now.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX))
        };
        Self {
            delivered_before: before(settings.delivered),
            bodies_before: before(settings.bodies.min(settings.delivered)),
            investigated_before: before(settings.investigate),
            max_body_bytes: settings.max_body_bytes,
        }
    }
}

/// What one prune (or one batch of it) removed, or would remove (`dry_run`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneReport {
    /// Deliveries deleted, by their status.
    pub deleted: Vec<(Status, u64)>,
    /// Bodies dropped from deliveries that are kept.
    pub bodies_dropped: u64,
    /// Bytes of bodies freed, both ways.
    pub body_bytes: u64,
}

impl PruneReport {
    pub fn deleted_total(&self) -> u64 {
        self.deleted.iter().map(|(_, n)| n).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.deleted_total() == 0 && self.bodies_dropped == 0
    }

    /// What removing `rows` (each its status and the body bytes it still held) and dropping
    /// bodies of `bodies` bytes each comes to; both back-ends report a batch this way.
    pub fn of(
        rows: impl IntoIterator<Item = (Status, u64)>,
        bodies: impl IntoIterator<Item = u64>,
    ) -> Self {
        let mut report = PruneReport::default();
        for (status, body_bytes) in rows {
            report.add(&PruneReport {
                deleted: vec![(status, 1)],
                bodies_dropped: 0,
                body_bytes,
            });
        }
        for body_bytes in bodies {
            report.bodies_dropped += 1;
            report.body_bytes += body_bytes;
        }
        report
    }

    /// Adds another batch's counts.
    pub fn add(&mut self, other: &PruneReport) {
        for (status, n) in &other.deleted {
            match self.deleted.iter_mut().find(|(s, _)| s == status) {
                Some((_, total)) => *total += n,
                None => self.deleted.push((*status, *n)),
            }
        }
        self.bodies_dropped += other.bodies_dropped;
        self.body_bytes += other.body_bytes;
    }
}

/// The store's size and contents, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    /// Bytes the database takes (SQLite: its pages in use; PostgreSQL: its tables and indexes).
    pub database_bytes: u64,
    /// Bytes of bodies kept.
    pub body_bytes: u64,
    pub deliveries: Vec<(Status, u64)>,
    /// When the oldest delivery kept was received.
    pub oldest_received_at: Option<UnixMillis>,
}

/// Deliveries removed per batch: small enough that a batch's transaction is short.
pub const PRUNE_BATCH: u32 = 500;
/// Pause between two batches, leaving the store to ingest and dispatch.
const BATCH_PAUSE: Duration = Duration::from_millis(50);

/// Prunes everything `cutoffs` allows, batch by batch; stops early when `stop` is cancelled.
/// With `dry_run`, only counts.
pub async fn prune(
    store: &dyn Maintenance,
    cutoffs: &Cutoffs,
    dry_run: bool,
    stop: &CancellationToken,
) -> Result<PruneReport, StoreError> {
    if dry_run {
        return store.prune_batch(cutoffs, u32::MAX, true).await;
    }
    let mut total = PruneReport::default();
    loop {
        let batch = store.prune_batch(cutoffs, PRUNE_BATCH, false).await?;
        total.add(&batch);
        if batch.is_empty() || stop.is_cancelled() {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(BATCH_PAUSE) => {}
            () = stop.cancelled() => break,
        }
    }
    if !total.is_empty() {
        store.reclaim_space().await?;
    }
    Ok(total)
}

/// The background pruner: every `settings.interval`, prunes what retention allows and
/// publishes the store's metrics. Runs until `stop` is cancelled.
pub async fn run_pruner(
    store: Arc<dyn Maintenance>,
    settings: RetentionSettings,
    clock: Arc<dyn Clock>,
    stop: CancellationToken,
) {
    if settings.interval.is_zero() {
        return;
    }
    loop {
        let cutoffs = Cutoffs::at(clock.now(), &settings);
        match prune(store.as_ref(), &cutoffs, false, &stop).await {
            Ok(report) => {
                for (status, n) in &report.deleted {
                    metrics::counter!("labelhook_pruned_deliveries_total", "status" => status.as_str())
                        .increment(*n);
                }
                metrics::counter!("labelhook_pruned_bodies_total").increment(report.bodies_dropped);
                metrics::gauge!("labelhook_prune_last_run_deliveries")
                    .set(report.deleted_total() as f64);
                if !report.is_empty() {
                    tracing::info!(
                        deliveries = report.deleted_total(),
                        bodies = report.bodies_dropped,
                        body_bytes = report.body_bytes,
                        "pruned what retention allows"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "pruning failed; trying again later"),
        }
        match store.stats().await {
            Ok(stats) => publish(&stats, clock.now()),
            Err(e) => tracing::debug!(error = %e, "no store statistics this round"),
        }
        tokio::select! {
            () = tokio::time::sleep(settings.interval) => {}
            () = stop.cancelled() => return,
        }
    }
}

fn publish(stats: &StoreStats, now: UnixMillis) {
    metrics::gauge!("labelhook_store_bytes", "part" => "database").set(stats.database_bytes as f64);
    metrics::gauge!("labelhook_store_bytes", "part" => "bodies").set(stats.body_bytes as f64);
    for status in Status::ALL {
        let n = stats
            .deliveries
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n);
        metrics::gauge!("labelhook_store_deliveries", "status" => status.as_str()).set(n as f64);
    }
    let dead = stats
        .deliveries
        .iter()
        .find(|(s, _)| *s == Status::Dead)
        .map_or(0, |(_, n)| *n);
    metrics::gauge!(crate::telemetry::DEAD_LETTERS).set(dead as f64);
    let age = stats
        .oldest_received_at
        .map_or(0.0, |at| (now - at).max(0) as f64 / 1000.0);
    metrics::gauge!("labelhook_store_oldest_delivery_age_seconds").set(age);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_never_outlive_their_rows_and_reports_add_up() {
        let settings = RetentionSettings {
            delivered: Duration::from_secs(10),
            bodies: Duration::from_secs(60),
            ..RetentionSettings::default()
        };
        let cutoffs = Cutoffs::at(100_000, &settings);
        assert_eq!(cutoffs.delivered_before, 90_000);
        assert_eq!(
            cutoffs.bodies_before, 90_000,
            "a body goes at the latest with its row"
        );
        let mut total = PruneReport::default();
        total.add(&PruneReport {
            deleted: vec![(Status::Delivered, 2)],
            bodies_dropped: 1,
            body_bytes: 10,
        });
        total.add(&PruneReport {
            deleted: vec![(Status::Delivered, 3), (Status::Dead, 1)],
            bodies_dropped: 0,
            body_bytes: 5,
        });
        assert_eq!(total.deleted_total(), 6);
        assert_eq!(total.body_bytes, 15);
        assert!(!total.is_empty());
    }
}
