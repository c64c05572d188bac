//! The shared back-end: PostgreSQL through sqlx, for several replicas on one database and no
//! shared disk.
//!
//! **Written once.** A delivery's row (`deliveries`) is what was received, the dedup key and
//! the body, and nothing in it changes through its life (retention may drop its body). What
//! moves lives in small rows beside it: its status (`delivery_status`, indexed by status for
//! the dead-letter page and `--status` filters), the gate's verdict (`verdicts`, written once
//! per gating), its handler runs and attempts, and, while it has work left, one `queue` row
//! (not gated yet; or its lane position, whether it waits behind an earlier delivery of its
//! entity, when it is due, and its lease). A delivery with nothing left to do has no queue
//! row, so every question a dispatcher asks is answered from a table as small as the backlog,
//! and retention deletes whole deliveries with their rows in one statement.
//!
//! **Batched.** Every write a delivery waits for carries many deliveries: concurrent accepts
//! of one replica share one transaction and one multi-row `INSERT ... SELECT FROM UNNEST`
//! ([`intake`], [`batch`]); gating a batch is three statements whatever its size
//! ([`gating`]); a claim leases many lane heads in one statement, and their chains in two
//! more ([`queue`]); the outcomes of concurrent handler calls share one transaction of
//! multi-row statements ([`outcomes`]). So a commit's fsync is paid for by many deliveries,
//! and a second replica adds throughput rather than contending row by row.
//!
//! How each promise is kept when more than one process writes:
//! - **durable before 2xx**: an accept is answered only after its batch's transaction is
//!   committed with synchronous commit (turned on for each connection if the server had it
//!   off); a batch holds what arrived while the transaction before it was being written;
//! - **dedup**: the unique key on (delivery id, body hash), `ON CONFLICT DO NOTHING`; the same
//!   key twice in one batch is written once, and keys are inserted in sorted order so that
//!   replicas inserting overlapping batches wait for each other instead of deadlocking;
//! - **the gate**: the batch's entity rows are locked (`FOR UPDATE`, created first when
//!   missing, in sorted order) in the transaction that decides and records the verdicts, so
//!   two replicas gating versions of one entity decide one after the other ([`gating`]);
//! - **claims**: `FOR UPDATE SKIP LOCKED` on queue rows, only lane heads are ever due; leases
//!   carry their owner and are renewed while handlers run; expired leases are taken over, live
//!   ones never; recording checks the owner under the queue row's lock, and a lost lease fails
//!   only its own record ([`outcomes`]);
//! - **lanes**: a lane's head moves (gate, outcomes, replay) only under its entity's row lock;
//! - **wake-ups**: accepts are announced with `NOTIFY labelhook_work`, sent after their
//!   commits and at most one per [`ANNOUNCE_EVERY`] (a NOTIFY inside every accept would make
//!   PostgreSQL serialize the commits: it holds a global lock on the notification queue until
//!   each one is flushed); a replay notifies in its own transaction. Each serving replica
//!   listens on a connection of its own and wakes its dispatcher;
//! - **bodies of any size**: chunks in a table, streamed in and out ([`bodies`]);
//! - **outages**: the pool connects lazily and the schema is migrated on first contact, so the
//!   service starts with the database down, answers 503 meanwhile, and recovers by itself;
//! - **older stores**: migration 0010 moves a store written by an older version over in place,
//!   statuses, lanes, leases and pending runs as they were.

mod backfill;
mod batch;
mod bodies;
mod database;
mod gating;
mod inspect;
mod intake;
mod outcomes;
mod prune;
mod queue;

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Executor};
use tokio::sync::Notify;

pub use database::require_database;

use super::outage::Outage;
use super::{Reason, Store, StoreError};
use crate::delivery::Clock;
use crate::store::StoreSettings;

/// The channel accepts and replays are announced on.
const WORK_CHANNEL: &str = "labelhook_work";
/// How long a request waits for a connection before it is answered 503.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// After a failed try to reach the database, callers are answered with its error for this long
/// before the next try.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Accepts announced together: at most one NOTIFY per this long.
const ANNOUNCE_EVERY: Duration = Duration::from_millis(5);
/// Longest pause between attempts to reach the database for wake-ups.
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(5);

/// Accept transactions in flight per replica, and outcome transactions (fewer on a small
/// pool, see [`PgStore::in_flight`]).
const ACCEPTS_IN_FLIGHT: usize = 8;
const OUTCOMES_IN_FLIGHT: usize = 4;
/// Statements are planned for their arguments each time, never from a plan cached when the
/// tables were small: a batch's statements look rows up by arrays of keys, and a generic plan
/// made while a table was nearly empty scans it whole, for ever after, as it grows.
const PLAN_EACH_TIME: &str = "SET plan_cache_mode = force_custom_plan";
/// Connections for leases (the gate loop, the run loop and the renewals each use one).
const LEASE_CONNECTIONS: u32 = 3;
/// How often a batch is tried when PostgreSQL fails it to break a deadlock.
const DEADLOCK_TRIES: u32 = 3;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("src/store/postgres/migrations");

/// Whether `e` says the database cannot be reached or written now (rather than that it refused
/// this statement): the caller should try again later.
fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // Connection exceptions (08), insufficient resources such as a full disk (53),
        // the server shutting down or starting (57P), a read-only standby (25006).
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "25006"
        }),
        _ => false,
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if is_unavailable(&e) {
            StoreError::unavailable(Reason::from_error(e))
        } else {
            StoreError::database(Reason::from_error(e))
        }
    }
}

/// A transaction PostgreSQL failed to break a deadlock (or a serialization failure): trying it
/// again is the answer.
fn is_deadlock(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40P01" | "40001")))
}

/// Runs `attempt` (a transaction or a statement) until it ends otherwise than by PostgreSQL
/// failing it to break a deadlock, at most [`DEADLOCK_TRIES`] times. Lock orders are kept
/// (keys, queue rows and entities sorted) so that deadlocks are rare, not impossible.
async fn retrying<T, F, Fut>(mut attempt: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt().await {
            Err(e) if tries < DEADLOCK_TRIES && is_deadlock(&e) => continue,
            done => return done,
        }
    }
}

/// Who is told that new work was committed: this process's dispatcher at once, every
/// replica's through the coalesced NOTIFY.
#[derive(Clone)]
struct Wakeups {
    /// Woken by other replicas' (and this one's) NOTIFY.
    work: Arc<Notify>,
    /// Accepts not yet announced to other replicas.
    unannounced: Arc<Notify>,
}

impl Wakeups {
    /// New work was committed: wakes this process's dispatcher now, and every replica's soon.
    fn work_arrived(&self) {
        self.work.notify_one();
        self.unannounced.notify_one();
    }
}

/// The database's schema, migrated on first contact (sqlx's migrator holds an advisory lock,
/// so replicas starting together take turns).
///
/// One caller at a time tries (a try can take up to [`ACQUIRE_TIMEOUT`] while the database
/// cannot be reached); callers that arrive meanwhile wait for that try's outcome rather than
/// making their own, and for [`RETRY_PAUSE`] after a failed try everyone gets its error at
/// once. So no request waits for more than one try: they must not queue behind each other's
/// attempts, or a sender waiting for its 503 would time out first.
struct Schema {
    pool: PgPool,
    migrated: AtomicBool,
    /// The last failed try, when and why.
    last_failure: tokio::sync::Mutex<Option<(Instant, String)>>,
}

impl Schema {
    fn new(pool: PgPool) -> Self {
        Self {
            pool,
            migrated: AtomicBool::new(false),
            last_failure: tokio::sync::Mutex::new(None),
        }
    }

    async fn ready(&self) -> Result<(), StoreError> {
        if self.migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut last_failure = self.last_failure.lock().await;
        if self.migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some((at, error)) = last_failure.as_ref() {
            if at.elapsed() < RETRY_PAUSE {
                return Err(StoreError::unavailable(error.clone()));
            }
        }
        match MIGRATOR.run(&self.pool).await {
            Ok(()) => {
                self.migrated.store(true, Ordering::Release);
                *last_failure = None;
                Ok(())
            }
            Err(e) => {
                let error = match e {
                    sqlx::migrate::MigrateError::Execute(e) => StoreError::from(e),
                    other => StoreError::database(format!("migrating the schema: {other}")),
                };
                *last_failure = Some((Instant::now(), error.to_string()));
                Err(error)
            }
        }
    }
}

/// One process's handle on the shared database.
pub struct PgStore {
    pool: PgPool,
    /// For leases only (taking deliveries to gate, claims, renewals), committed without waiting
    /// for the WAL flush: see [`lease_pool`].
    leases: PgPool,
    clock: Arc<dyn Clock>,
    schema: Arc<Schema>,
    wakeups: Wakeups,
    bodies: bodies::ChunkStore,
    /// Most jobs in one accept or outcome transaction (`store.commit_batch_max`).
    batch_max: usize,
    /// The group commit of accepts, started on first use.
    accepts: OnceLock<batch::Batcher<intake::Incoming, super::Accepted>>,
    /// The group commit of handler outcomes, started on first use.
    outcomes: OnceLock<batch::Batcher<outcomes::Outcome, super::Status>>,
    background: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl PgStore {
    /// A handle that connects on first use. `serving` also starts the wake-up listener and,
    /// once the database answers, the sweep of bodies no delivery names.
    pub fn open(
        url: &str,
        password: Option<&SecretString>,
        settings: &StoreSettings,
        clock: Arc<dyn Clock>,
        serving: bool,
    ) -> Result<Arc<Self>, StoreError> {
        let mut options = PgConnectOptions::from_str(url)
            .map_err(|_| StoreError::UnsupportedUrl(super::redact_url(url)))?
            .application_name("labelhook")
            .disable_statement_logging();
        if let Some(password) = password {
            options = options.password(password.expose_secret());
        }
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections.max(2))
            .min_connections(0)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    // 2xx means durable: never acknowledge a commit that is not on disk.
                    let setting: String = sqlx::query_scalar("SHOW synchronous_commit")
                        .fetch_one(&mut *conn)
                        .await?;
                    if setting == "off" {
                        conn.execute("SET synchronous_commit = on").await?;
                    }
                    conn.execute(PLAN_EACH_TIME).await?;
                    Ok(())
                })
            })
            .connect_lazy_with(options.clone());
        let schema = Arc::new(Schema::new(pool.clone()));
        let leases = lease_pool(options);
        let store = Arc::new(Self {
            bodies: bodies::ChunkStore::new(pool.clone(), clock.clone(), schema.clone()),
            pool,
            leases,
            clock,
            schema,
            wakeups: Wakeups {
                work: Arc::new(Notify::new()),
                unannounced: Arc::new(Notify::new()),
            },
            batch_max: settings.commit_batch_max,
            accepts: OnceLock::new(),
            outcomes: OnceLock::new(),
            background: std::sync::Mutex::new(Vec::new()),
        });
        if serving {
            let tasks = [
                tokio::spawn(listen_for_work(Arc::downgrade(&store))),
                tokio::spawn(announce_work(
                    store.pool.clone(),
                    store.wakeups.unannounced.clone(),
                )),
            ];
            if let Ok(mut background) = store.background.lock() {
                background.extend(tasks);
            }
        }
        Ok(store)
    }

    /// Reaches the database, migrating the schema on first contact.
    async fn ready(&self) -> Result<(), StoreError> {
        self.schema.ready().await
    }

    /// `wanted` transactions in flight for one batcher, at most `1/share` of the pool (accepts
    /// a half, outcomes a quarter: a quarter is left for gating, the CLI and the console).
    fn in_flight(&self, wanted: usize, share: usize) -> usize {
        let pool = self.pool.options().get_max_connections() as usize;
        wanted.min(pool / share).max(1)
    }

    /// The accept batcher ([`intake`]), started on first use.
    fn accepts(&self) -> &batch::Batcher<intake::Incoming, super::Accepted> {
        self.accepts.get_or_init(|| {
            let (pool, wakeups) = (self.pool.clone(), self.wakeups.clone());
            batch::Batcher::start(
                self.batch_max,
                self.in_flight(ACCEPTS_IN_FLIGHT, 2),
                move |jobs| {
                    let (pool, wakeups) = (pool.clone(), wakeups.clone());
                    async move { intake::accept_batch(&pool, &wakeups, jobs).await }
                },
            )
        })
    }

    /// The outcome batcher ([`outcomes`]), started on first use.
    fn outcomes(&self) -> &batch::Batcher<outcomes::Outcome, super::Status> {
        self.outcomes.get_or_init(|| {
            let (pool, clock) = (self.pool.clone(), self.clock.clone());
            batch::Batcher::start(
                self.batch_max,
                self.in_flight(OUTCOMES_IN_FLIGHT, 4),
                move |jobs| {
                    let (pool, now) = (pool.clone(), clock.now());
                    async move { outcomes::record_batch(&pool, jobs, now).await }
                },
            )
        })
    }

    /// Wakes every dispatcher listening on the database, when `executor`'s transaction commits.
    async fn announce_work<'c, E>(executor: E) -> Result<(), StoreError>
    where
        E: sqlx::PgExecutor<'c>,
    {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(WORK_CHANNEL)
            .execute(executor)
            .await?;
        Ok(())
    }
}

/// Connections for the dispatchers' leases: reserving deliveries to gate, claiming lane
/// heads and their chains, renewing. They commit asynchronously (`synchronous_commit = off`):
/// a lease is answered without waiting for the WAL flush, which takes a whole commit's wait
/// off every delivery's way to its handler.
///
/// What that can cost: should the PostgreSQL server itself crash, the last leases it took in
/// the moment before may be lost, so those deliveries are handed out again and handled again,
/// as when a replica dies holding them (at least once, as always). Nothing else is at risk:
/// accepts, verdicts and outcomes still commit synchronously, and since a server replays its
/// log in order, a lease can only be lost together with everything committed after it, so an
/// outcome that was kept never refers to a lease that was not, and the lanes' order holds.
fn lease_pool(options: PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(LEASE_CONNECTIONS)
        .min_connections(0)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                conn.execute("SET synchronous_commit = off").await?;
                conn.execute(PLAN_EACH_TIME).await?;
                Ok(())
            })
        })
        .connect_lazy_with(options)
}

/// Listens for `NOTIFY labelhook_work` on a connection of its own and wakes the dispatcher;
/// reconnects with a growing pause when the database goes away. Ends when the store is gone.
/// Its connection is the replica's lookout: it tells once that the database is gone and why,
/// then now and then, and once that it is back ([`Outage`]).
async fn listen_for_work(store: std::sync::Weak<PgStore>) {
    let mut pause = Duration::from_millis(100);
    let mut swept = false;
    let mut outage = Outage::new("store", "postgres");
    loop {
        let Some(this) = store.upgrade() else { return };
        let listening = async {
            this.ready().await?;
            let mut listener = PgListener::connect_with(&this.pool).await?;
            listener.listen(WORK_CHANNEL).await?;
            Ok::<_, StoreError>(listener)
        }
        .await;
        match listening {
            Ok(mut listener) => {
                pause = Duration::from_millis(100);
                outage.succeeded();
                if !swept {
                    match this.bodies.sweep_orphans().await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(removed = n, "removed bodies of unanswered deliveries")
                        }
                        Err(e) => tracing::warn!(error = %e, "could not sweep orphan bodies"),
                    }
                    swept = true;
                }
                // Whatever was announced while nobody listened is found by this poll.
                this.wakeups.work.notify_one();
                let work = this.wakeups.work.clone();
                drop(this);
                loop {
                    match listener.try_recv().await {
                        Ok(Some(_)) => work.notify_one(),
                        Ok(None) => {
                            // The connection was lost (and will be re-made): look for work that
                            // may have been announced meanwhile.
                            work.notify_one();
                        }
                        Err(e) => {
                            outage.failed(&StoreError::from(e), 0);
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                outage.failed(&e, 0);
                drop(this);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LISTEN_RETRY_MAX);
            }
        }
    }
}

/// Sends one NOTIFY for however many accepts were committed since the last one, at most one
/// per [`ANNOUNCE_EVERY`]. Runs until the store is closed.
async fn announce_work(pool: PgPool, unannounced: Arc<Notify>) {
    loop {
        unannounced.notified().await;
        if let Err(e) = PgStore::announce_work(&pool).await {
            // Replicas find the work at their next poll (dispatch.poll_interval).
            tracing::debug!(error = %e, "could not announce new work");
        }
        tokio::time::sleep(ANNOUNCE_EVERY).await;
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    async fn close(&self) {
        // What was handed in is written before the pool goes.
        if let Some(accepts) = self.accepts.get() {
            accepts.close().await;
        }
        if let Some(outcomes) = self.outcomes.get() {
            outcomes.close().await;
        }
        let tasks = self
            .background
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default();
        for task in tasks {
            task.abort();
        }
        self.leases.close().await;
        self.pool.close().await;
    }
}
