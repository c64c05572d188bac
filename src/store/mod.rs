//! Durable storage of deliveries, their dispatch state and the ordering state per entity.
//!
//! The store is a set of traits by role, so each caller sees only what it needs:
//! - [`Intake`] for the HTTP ingress: accept a [`VerifiedDelivery`] durably, stage large bodies
//!   while they stream in ([`BodyStore`]), and prove the store takes writes (`/readyz`);
//! - [`Queue`] for the dispatcher: take deliveries to gate, record the gate's verdicts, claim
//!   due work under a lease, renew it, record attempts;
//! - [`Inspect`] for the CLI and the console: list, show, an entity's history, the gate's
//!   reasons, handler activity, replay (with what it does to each delivery);
//! - [`Backfill`] for `labelhook labelbox backfill`: store what it rebuilt from Labelbox's
//!   export, and the two questions it asks first.
//!
//! Two back-ends implement all of them ([`Store`]): [`sqlite`] (the embedded default, one
//! process per database file) and [`postgres`] (several replicas on one database, no shared
//! disk). Nothing else in the program writes SQL. `tests/store` runs one conformance suite
//! against both.
//!
//! Durability is the store's: [`Intake::accept`] returns only after the delivery's transaction
//! is on disk (SQLite in WAL mode with `synchronous = FULL`; PostgreSQL with synchronous
//! commit), so an HTTP 2xx sent after it survives `kill -9` and power loss. A delivery is
//! written once; what happens to it later is appended beside it, in batches that ride the same
//! commits (docs/store.md). The store serves the ingress, the dispatcher and the CLI alike, so
//! it knows nothing of HTTP.

mod gate;
mod model;
pub mod outage;
pub mod postgres;
pub mod retention;
pub mod settings;
pub mod sqlite;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use secrecy::SecretString;

use crate::delivery::{Clock, StagedBody, Status, UnixMillis, VerifiedDelivery};
use crate::ordering::Verdict;

pub use retention::{Cutoffs, PruneReport, RetentionSettings, StoreStats};
pub use settings::StoreSettings;

pub use model::{
    status_after_runs, Accepted, AttemptKind, AttemptOutcome, AttemptRecord, AttemptResult,
    ChainRecord, Claimed, DeliveryDetail, DeliverySummary, DueRun, EntityEntry, EntityHistory,
    EntityState, GateRequest, HandlerActivity, HandlerRun, KnownLabel, LeaseOwner, ListQuery,
    Overview, ReceivedBucket, ReplayEffect, ReplayItem, ReplayOutcome, ReplayTarget, RunState,
    Ungated, VerdictBasis,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Too many deliveries are waiting for the store; the sender should retry.
    #[error("store queue is full")]
    Busy,
    /// The database cannot be reached or written (missing directory, read-only, disk full,
    /// server down); the sender should retry.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Reason),
    /// The database answered with an error.
    #[error("database error: {0}")]
    Database(#[source] Reason),
    /// A stored value the program cannot read back (written by a newer version?).
    #[error("unexpected stored value: {0}")]
    Corrupt(String),
    #[error("unsupported store url {0:?} (sqlite://PATH or postgres://...)")]
    UnsupportedUrl(String),
    /// Attempts of a claim that is no longer this owner's (its lease ran out and the delivery
    /// was taken again, or it was replayed); they are not recorded.
    #[error("delivery {0} is no longer claimed by this process")]
    LeaseLost(i64),
    /// Another process serves this database.
    #[error("{0}")]
    Locked(String),
    /// The PostgreSQL server says the database `store.url` names does not exist: a mistake
    /// in the configuration, not an outage (see `postgres::require_database`).
    #[error("{0}")]
    MissingDatabase(String),
}

/// Why the store failed: what to tell (the message), and the error of the database driver or
/// the file system that said so, kept whole for whoever follows the error's sources. Cheap to
/// clone, so that every caller of a failed batch gets the same cause.
#[derive(Debug, Clone)]
pub struct Reason {
    message: String,
    cause: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Reason {
    /// A reason with the error it comes from.
    pub fn from_error(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            message: error.to_string(),
            cause: Some(Arc::new(error)),
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Reason {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<String> for Reason {
    fn from(message: String) -> Self {
        Self {
            message,
            cause: None,
        }
    }
}

impl From<&str> for Reason {
    fn from(message: &str) -> Self {
        message.to_owned().into()
    }
}

impl StoreError {
    /// The store is unavailable for `reason`.
    pub fn unavailable(reason: impl Into<Reason>) -> Self {
        StoreError::Unavailable(reason.into())
    }

    /// The database answered with an error: `reason`.
    pub fn database(reason: impl Into<Reason>) -> Self {
        StoreError::Database(reason.into())
    }

    /// This failure again, as another caller that met it is told: the store is unavailable,
    /// for the reason this one gives (its cause kept).
    pub fn again(&self) -> StoreError {
        match self {
            StoreError::Unavailable(why) => StoreError::unavailable(why.clone()),
            StoreError::Database(why) => StoreError::unavailable(why.clone()),
            other => StoreError::unavailable(other.to_string()),
        }
    }
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        StoreError::unavailable(Reason::from_error(e))
    }
}

/// Where large bodies go while they stream in, before their delivery is accepted.
#[async_trait]
pub trait BodyStore: Send + Sync {
    /// Starts a new body.
    async fn create(&self) -> io::Result<Box<dyn BodyWriter>>;
}

/// One large body being written.
#[async_trait]
pub trait BodyWriter: Send {
    async fn write(&mut self, chunk: Bytes) -> io::Result<()>;

    /// Makes the written bytes durable; the result is discarded when dropped unaccepted.
    async fn finish(self: Box<Self>) -> io::Result<StagedBody>;
}

/// What the HTTP ingress needs.
#[async_trait]
pub trait Intake: Send + Sync {
    /// Stores a verified delivery durably. Returns after its commit is on disk, or with
    /// [`StoreError::Busy`] / [`StoreError::Unavailable`] when it could not be stored.
    async fn accept(&self, delivery: VerifiedDelivery) -> Result<Accepted, StoreError>;

    /// Where bodies too large to keep in memory are written while they arrive.
    fn bodies(&self) -> &dyn BodyStore;

    /// Ok when the store can be reached and written to (a real commit).
    async fn check_ready(&self) -> Result<(), StoreError>;
}

/// What the dispatcher needs. Every method that hands out work takes a [`LeaseOwner`] and a
/// lease: work is reserved for that owner until the lease runs out, then anyone may take it.
#[async_trait]
pub trait Queue: Send + Sync {
    /// Up to `limit` deliveries not yet gated, oldest first. A back-end that several processes
    /// share reserves them for `owner` for `lease`, so that two dispatchers do not parse the
    /// same bodies; whoever takes them, [`Queue::record_gates`] gates each only once.
    async fn take_ungated(
        &self,
        owner: &LeaseOwner,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<Ungated>, StoreError>;

    /// For each delivery, in order: decides fresh or stale against the entity's last applied
    /// state and records, in the same transaction, the decision, the entity's new state, the
    /// delivery's status and lane position, and a pending run per selected handler.
    /// `None` for a gate that failed (it stays ungated for another round) or a delivery that was
    /// gated meanwhile by someone else (it is not gated twice).
    async fn record_gates(
        &self,
        gates: Vec<GateRequest>,
    ) -> Result<Vec<Option<Verdict>>, StoreError>;

    /// Leases up to `limit` deliveries with due handler runs. Only the head of an entity's lane
    /// is ever due, so two deliveries of one entity are never out at once, and each comes only
    /// after everything before it in its lane is finished.
    ///
    /// With `chain_max` above zero, a head with exactly one run due also brings up to
    /// `chain_max` of the deliveries waiting right behind it in its lane ([`Claimed::chain`]),
    /// as long as each waits for that same handler only and for its first attempt. They are
    /// leased with the head and meant to be handed to the handler in one call, in lane order,
    /// and recorded in one go ([`Queue::record_chain`]): a busy entity is then served at the
    /// rate of batches, not of round trips.
    async fn claim(
        &self,
        owner: &LeaseOwner,
        lease: Duration,
        limit: u32,
        chain_max: u32,
    ) -> Result<Vec<Claimed>, StoreError>;

    /// Extends the leases `owner` still holds among `seqs` to `lease` from now; returns those.
    async fn renew(
        &self,
        owner: &LeaseOwner,
        seqs: &[i64],
        lease: Duration,
    ) -> Result<Vec<i64>, StoreError>;

    /// Records a claimed delivery's attempts, sets its status, and releases its lease.
    /// [`StoreError::LeaseLost`] when `owner` no longer holds the claim.
    async fn record_attempts(
        &self,
        seq: i64,
        owner: &LeaseOwner,
        results: &[AttemptResult],
    ) -> Result<Status, StoreError>;

    /// Records a claimed head and its chain in lane order, in one transaction: each member's
    /// attempts as [`Queue::record_attempts`] does (a member whose predecessor finished has
    /// become its lane's head by then), and for a member that was not tried, only the release
    /// of its lease. [`StoreError::LeaseLost`] (and nothing recorded) when `owner` no longer
    /// holds one of them.
    async fn record_chain(
        &self,
        owner: &LeaseOwner,
        records: &[ChainRecord],
    ) -> Result<(), StoreError>;

    /// Deliveries with work left (not yet gated, or with handler runs left).
    async fn queue_depth(&self) -> Result<u64, StoreError>;

    /// When the oldest of the deliveries [`Queue::queue_depth`] counts was received; `None`
    /// when there is none. (Deliveries are taken in `seq` order, so the lowest `seq` with work
    /// left is the one asked for.)
    async fn oldest_unfinished(&self) -> Result<Option<UnixMillis>, StoreError>;

    /// Waits until new work may have arrived (a delivery accepted or replayed, by this process
    /// or, on a shared back-end, any other), or `max_wait` passed.
    async fn wait_for_work(&self, max_wait: Duration);
}

/// What the CLI and the console read, and replay. Reads only, except the replays.
#[async_trait]
pub trait Inspect: Send + Sync {
    /// Deliveries matching every filter of `query`, newest first.
    async fn list(&self, query: &ListQuery) -> Result<Vec<DeliverySummary>, StoreError>;

    /// Every stored delivery with this id (one, or several when bodies differed).
    async fn show(&self, delivery_id: &str) -> Result<Vec<DeliveryDetail>, StoreError>;

    /// Puts deliveries back in the dispatch queue (not those being handled right now).
    async fn replay(&self, target: &ReplayTarget) -> Result<ReplayOutcome, StoreError>;

    /// What [`Inspect::replay_each`] would do to each delivery `target` names; changes nothing.
    async fn replay_preview(&self, target: &ReplayTarget) -> Result<Vec<ReplayItem>, StoreError>;

    /// [`Inspect::replay`], saying per delivery what it did, decided in the same transaction.
    /// Empty when `target` names no stored delivery.
    async fn replay_each(&self, target: &ReplayTarget) -> Result<Vec<ReplayItem>, StoreError>;

    /// One entity: the gate's state and its most recent `limit` deliveries, in version order.
    async fn entity_history(&self, entity: &str, limit: u32) -> Result<EntityHistory, StoreError>;

    /// Why the gate judged delivery `seq` as it did; `None` when no such delivery is kept.
    async fn verdict_basis(&self, seq: i64) -> Result<Option<VerdictBasis>, StoreError>;

    /// Per handler named in a handler run: its last success and failure, and its failures and
    /// successes that finished at or after `since`.
    async fn handler_activity(&self, since: UnixMillis)
        -> Result<Vec<HandlerActivity>, StoreError>;

    /// Deliveries kept by status, and those received from `since` to `now` in buckets of
    /// `bucket_ms`.
    async fn overview(
        &self,
        since: UnixMillis,
        now: UnixMillis,
        bucket_ms: i64,
    ) -> Result<Overview, StoreError>;
}

/// Retention and the store's statistics: for the background pruner and `events prune`.
#[async_trait]
pub trait Maintenance: Send + Sync {
    /// Removes up to `limit` deliveries (and bodies) past their retention, oldest first, each
    /// only when nothing is left to do for it; with `dry_run`, counts all of them and changes
    /// nothing.
    async fn prune_batch(
        &self,
        cutoffs: &Cutoffs,
        limit: u32,
        dry_run: bool,
    ) -> Result<PruneReport, StoreError>;

    /// Gives space freed by pruning back to the file system where the database does not do it
    /// itself (SQLite's incremental vacuum; PostgreSQL leaves it to autovacuum).
    async fn reclaim_space(&self) -> Result<(), StoreError>;

    async fn stats(&self) -> Result<StoreStats, StoreError>;
}

/// What `labelhook labelbox backfill` needs from the store, through the same handle as the
/// `events` commands, so that it works whether or not a server runs: it writes in short
/// transactions of its own (as `events replay` does), and the server's dispatcher finds the new
/// deliveries as it finds any (SQLite: at its next poll; PostgreSQL: woken by NOTIFY).
#[async_trait]
pub trait Backfill: Send + Sync {
    /// Stores deliveries fetched from Labelbox's API, in one transaction, durably. One whose
    /// delivery id is stored already is skipped, whatever its body: a backfilled delivery's id
    /// names what it describes (an entity at a version), while its body holds what the export
    /// said that day (signed URLs that change at every export). So running a backfill again
    /// stores nothing twice. Per delivery, in order: `Some(seq)` stored, `None` skipped.
    async fn accept_fetched(
        &self,
        deliveries: Vec<VerifiedDelivery>,
    ) -> Result<Vec<Option<i64>>, StoreError>;

    /// When the newest delivery that came by webhook for `project_id` was received (as far as
    /// the gate has seen deliveries: the project is known once a delivery is gated); `None`
    /// when there is none. Backfilled deliveries do not count: they are stored after the
    /// export they come from was taken, so counting them could skip what changed meanwhile.
    async fn newest_received(&self, project_id: &str) -> Result<Option<UnixMillis>, StoreError>;

    /// The labels the store knows on these data rows of `project_id` (from gated label
    /// deliveries the gate applied, not deleted since).
    async fn known_labels(
        &self,
        project_id: &str,
        data_row_ids: &[String],
    ) -> Result<Vec<KnownLabel>, StoreError>;
}

/// What the CLI's `events` and `labelbox backfill` commands use.
pub trait Operations: Inspect + Maintenance + Backfill {}

impl<T: Inspect + Maintenance + Backfill> Operations for T {}

/// A whole back-end, as `serve` uses it.
#[async_trait]
pub trait Store: Intake + Queue + Inspect + Maintenance {
    /// Finishes what was handed to the store, then lets go of it.
    async fn close(&self);
}

/// Which back-end a `store.url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Backend {
    /// `sqlite://path` or `sqlite:path`; `postgres://...` or `postgresql://...`.
    pub fn from_url(url: &str) -> Result<Backend, StoreError> {
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            let path = rest.split('?').next().unwrap_or(rest);
            if path.is_empty() {
                return Err(StoreError::UnsupportedUrl(url.to_owned()));
            }
            return Ok(Backend::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Backend::Postgres(url.to_owned()));
        }
        Err(StoreError::UnsupportedUrl(redact_url(url)))
    }
}

/// A store URL fit for a log line or an error: any password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

/// Opens the store for `serve`. Starts even when the database cannot be reached yet: it keeps
/// trying and answers `Unavailable` meanwhile. Fails only when the database belongs to another
/// server ([`StoreError::Locked`], SQLite) or the URL is not understood.
/// `password` is `store.password` resolved (PostgreSQL only).
pub async fn open_for_serving(
    settings: &StoreSettings,
    password: Option<&SecretString>,
    queue_capacity: usize,
    clock: Arc<dyn Clock>,
) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match Backend::from_url(&settings.url)? {
        Backend::Sqlite(path) => Arc::new(
            sqlite::SqliteStore::open_for_serving(path, settings, queue_capacity, clock).await?,
        ),
        Backend::Postgres(url) => {
            postgres::require_database(&url, password).await?;
            postgres::PgStore::open(&url, password, settings, clock, true)?
        }
    })
}

/// Opens the store for the CLI's `events` commands, beside a running server: SQLite read-only
/// (replay takes a short write transaction), PostgreSQL through a small pool.
pub async fn open_for_inspection(
    settings: &StoreSettings,
    password: Option<&SecretString>,
    clock: Arc<dyn Clock>,
) -> Result<Arc<dyn Operations>, StoreError> {
    Ok(match Backend::from_url(&settings.url)? {
        Backend::Sqlite(path) => Arc::new(sqlite::SqliteInspector::open(path, clock)?),
        Backend::Postgres(url) => {
            postgres::require_database(&url, password).await?;
            postgres::PgStore::open(&url, password, settings, clock, false)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_name_their_back_end() {
        assert_eq!(
            Backend::from_url("sqlite://data/labelhook.db").ok(),
            Some(Backend::Sqlite(PathBuf::from("data/labelhook.db")))
        );
        assert_eq!(
            Backend::from_url("sqlite:///var/lib/x.db?mode=rwc").ok(),
            Some(Backend::Sqlite(PathBuf::from("/var/lib/x.db")))
        );
        assert!(matches!(
            Backend::from_url("postgresql://u@h/db"),
            Ok(Backend::Postgres(_))
        ));
        assert!(Backend::from_url("mysql://u:pw@h/db").is_err());
        assert!(Backend::from_url("sqlite://").is_err());
    }

    #[test]
    fn passwords_never_reach_a_message() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/labelhook?sslmode=require"),
            "postgres://app:***@db:5432/labelhook?sslmode=require"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
        let refused = Backend::from_url("mysql://u:hunter2@h/db").expect_err("refused");
        assert!(!refused.to_string().contains("hunter2"), "{refused}");
    }

    #[test]
    fn a_store_error_keeps_the_error_it_comes_from() {
        use std::error::Error as _;
        let refused = io::Error::new(io::ErrorKind::PermissionDenied, "read-only file system");
        let error = StoreError::from(refused);
        assert_eq!(
            error.to_string(),
            "store unavailable: read-only file system"
        );
        let cause = error
            .source()
            .and_then(|reason| reason.source())
            .and_then(|cause| cause.downcast_ref::<io::Error>())
            .expect("the io::Error is kept");
        assert_eq!(cause.kind(), io::ErrorKind::PermissionDenied);
        // Told again to another caller of the same failed batch, the cause is still there.
        assert!(error.again().source().and_then(|r| r.source()).is_some());
        // So is the database driver's error, with what it knows (SQLite's code here).
        let conn = rusqlite::Connection::open_in_memory().expect("in memory");
        let refused = conn
            .execute("INSERT INTO nowhere VALUES (1)", [])
            .expect_err("no table");
        let error = StoreError::from(refused);
        assert!(matches!(error, StoreError::Database(_)), "{error:?}");
        assert!(error
            .source()
            .and_then(|reason| reason.source())
            .and_then(|cause| cause.downcast_ref::<rusqlite::Error>())
            .is_some());
        // A message of our own has no cause behind it.
        let ours = StoreError::unavailable("the writer stopped");
        assert!(ours.source().and_then(|r| r.source()).is_none());
    }
}
