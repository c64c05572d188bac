//! What the SQLite back-end knows of its own health, for `/readyz`: shared by the writer, the
//! blob files and the store.
//!
//! Readiness must track what deliveries meet. A probe write of its own is not enough: on an
//! almost full disk a one-row probe commits while every delivery is refused. So the writer and
//! the blob files record how real writes went, and `/readyz` answers from that; it writes a
//! probe only when nothing has been committed for a while (so a scrape every second does not
//! write every second).
//!
//! Some failures are not passing: the database file removed or replaced under the running
//! writer, or another server holding the lock. Those are `fatal` until a restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// A delivery refused for a store failure keeps the service not ready this long, unless a
/// delivery is stored meanwhile. Long enough for a readiness probe (every 10 s by default in
/// Kubernetes) to see it; short enough that a service with no traffic is tried again soon.
pub const FAILURE_HOLD: Duration = Duration::from_secs(10);
/// A commit this recent answers `/readyz` without a probe write.
pub const FRESH_COMMIT: Duration = Duration::from_secs(5);

/// Shared health of one SQLite store.
#[derive(Debug)]
pub struct Health {
    base: Instant,
    /// Milliseconds after `base` (plus one; 0 = never) of the last successful commit.
    committed: AtomicU64,
    /// ... of the last delivery refused for a store failure; cleared when a delivery is stored
    /// (a later success answers for the store; comparing stamps would tie within a millisecond).
    delivery_failed: AtomicU64,
    failure: Mutex<Option<String>>,
    fatal: Mutex<Option<String>>,
    /// Bumped when the writer could not write: every connection of this process to the
    /// database is then closed before it is used again (see [`Health::drop_connections`]).
    generation: AtomicU64,
    /// The idle connections of the readers, closed at once by [`Health::drop_connections`].
    idle_pools: Mutex<Vec<Weak<IdlePool>>>,
}

/// Idle reader connections, with the generation each was opened at.
pub type IdlePool = Mutex<Vec<(u64, rusqlite::Connection)>>;

/// What `/readyz` should answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Nothing recent to judge by: write a probe.
    Unknown,
    NotReady(String),
}

impl Default for Health {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            committed: AtomicU64::new(0),
            delivery_failed: AtomicU64::new(0),
            failure: Mutex::new(None),
            fatal: Mutex::new(None),
            generation: AtomicU64::new(0),
            idle_pools: Mutex::new(Vec::new()),
        }
    }
}

impl Health {
    fn stamp(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// A batch reached the disk; `deliveries` says whether it stored a new delivery.
    pub fn committed(&self, deliveries: bool) {
        let now = self.stamp();
        self.committed.store(now, Ordering::Relaxed);
        if deliveries {
            self.delivery_failed.store(0, Ordering::Relaxed);
        }
    }

    /// A delivery could not be stored because of the store (not the client).
    pub fn delivery_failed(&self, why: &str) {
        if let Ok(mut failure) = self.failure.lock() {
            *failure = Some(why.to_owned());
        }
        self.delivery_failed.store(self.stamp(), Ordering::Relaxed);
    }

    /// Nothing will be stored until a restart; `why` says what happened.
    pub fn set_fatal(&self, why: String) {
        if let Ok(mut fatal) = self.fatal.lock() {
            *fatal = Some(why);
        }
    }

    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().ok().and_then(|f| f.clone())
    }

    /// Asks every connection to the database in this process to be closed and opened again.
    /// SQLite shares one view of the database's shared memory (`-shm`) among all connections of
    /// a process to one file: opened while the disk was read-only, it stays read-only for the
    /// writer's fresh connections too, until the last connection that holds it is closed.
    pub fn drop_connections(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut pools) = self.idle_pools.lock() {
            pools.retain(|pool| match pool.upgrade() {
                Some(pool) => {
                    if let Ok(mut idle) = pool.lock() {
                        idle.clear();
                    }
                    true
                }
                None => false,
            });
        }
    }

    /// A pool of idle reader connections, to be emptied when connections must be closed.
    pub fn idle_pool(&self) -> Arc<IdlePool> {
        let pool = Arc::new(IdlePool::default());
        if let Ok(mut pools) = self.idle_pools.lock() {
            pools.push(Arc::downgrade(&pool));
        }
        pool
    }

    /// Connections opened at another generation are to be closed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    pub fn readiness(&self) -> Readiness {
        if let Some(why) = self.fatal() {
            return Readiness::NotReady(why);
        }
        let now = self.stamp();
        let age = |at: u64| Duration::from_millis(now.saturating_sub(at));
        let failed = self.delivery_failed.load(Ordering::Relaxed);
        if failed != 0 && age(failed) < FAILURE_HOLD {
            let why = self.failure.lock().ok().and_then(|f| f.clone());
            return Readiness::NotReady(why.unwrap_or_else(|| "deliveries are refused".into()));
        }
        let committed = self.committed.load(Ordering::Relaxed);
        if committed != 0 && age(committed) < FRESH_COMMIT {
            Readiness::Ready
        } else {
            Readiness::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_delivery_outweighs_later_commits_until_one_is_stored() {
        let health = Health::default();
        assert_eq!(health.readiness(), Readiness::Unknown);
        health.committed(false);
        assert_eq!(health.readiness(), Readiness::Ready);
        health.delivery_failed("disk full");
        // A probe or the dispatcher's bookkeeping committing is not a delivery stored.
        health.committed(false);
        assert_eq!(health.readiness(), Readiness::NotReady("disk full".into()));
        health.committed(true);
        assert_eq!(health.readiness(), Readiness::Ready);
        health.set_fatal("database removed".into());
        health.committed(true);
        assert_eq!(
            health.readiness(),
            Readiness::NotReady("database removed".into())
        );
    }
}
