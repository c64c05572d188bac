//! Durable storage of deliveries, their dispatch state and the ordering state per entity.
//!
//! [`Store`] is the one way the rest of the program reaches the database; nothing else writes
//! SQL. It owns durability: [`Store::accept`] returns only after the delivery's transaction is
//! on disk (SQLite in WAL mode with `synchronous = FULL`, fsync'd blobs and directory), so an
//! HTTP 2xx sent after it survives `kill -9` and power loss. The store serves the HTTP ingress,
//! the dispatcher and the CLI alike, so it knows nothing of HTTP.

pub mod blob;
pub mod sqlite;

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub use blob::{BlobDir, BlobWriter, StagedBlob};

use crate::config::Config;
use crate::ingress::VerifiedDelivery;
use crate::ordering::{Change, Verdict, Version};
pub use crate::payload::Payload;

/// Milliseconds since the Unix epoch: how the store keeps time.
pub type UnixMillis = i64;

pub fn now_millis() -> UnixMillis {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Too many deliveries are waiting for the writer; the sender should retry.
    #[error("store queue is full")]
    Busy,
    /// The database cannot be opened or written (missing directory, read-only, disk full).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A stored value the program cannot read back (written by a newer version?).
    #[error("unexpected stored value: {0}")]
    Corrupt(String),
    #[error("unsupported store url: {0}")]
    UnsupportedUrl(String),
    /// Attempts of a claim that is no longer this process's (its lease ran out and the
    /// delivery was taken again, or it was replayed); they are not recorded.
    #[error("delivery {0} is no longer claimed by this process")]
    LeaseLost(i64),
    /// Another process serves this database.
    #[error("{0}")]
    Locked(String),
}

/// Where a delivery stands, as `events list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Stored, not yet handled by all its handlers.
    Pending,
    /// Every handler confirmed it (or no route wanted it).
    Delivered,
    /// Older than what was already applied for its entity.
    Stale,
    /// A handler gave up on it after `max_attempts`; `events replay` brings it back.
    Dead,
    /// Authentic, but of an unknown topic or not parseable; kept whole for a later upgrade.
    Unrecognized,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Pending,
        Status::Delivered,
        Status::Stale,
        Status::Dead,
        Status::Unrecognized,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Delivered => "delivered",
            Status::Stale => "stale",
            Status::Dead => "dead",
            Status::Unrecognized => "unrecognized",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("unknown status {s:?} (pending, delivered, stale, dead, unrecognized)")
            })
    }
}

/// A delivery's body as the store receives it.
#[derive(Debug)]
pub enum IncomingBody {
    Inline(Bytes),
    Blob(StagedBlob),
}

/// What became of an accepted delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub seq: i64,
    /// The same (delivery id, body hash) was stored before; nothing new was written.
    pub duplicate: bool,
    /// The delivery id was seen before with a different body; stored as its own delivery.
    pub id_conflict: bool,
}

/// Filter for `events list`.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub status: Option<Status>,
    pub topic: Option<String>,
    pub limit: u32,
}

/// One line of `events list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeliverySummary {
    pub seq: i64,
    pub delivery_id: String,
    pub endpoint: String,
    pub topic: Option<String>,
    pub entity: Option<String>,
    pub version: Option<String>,
    pub status: String,
    pub received_at: String,
    pub body_len: u64,
    pub id_conflict: bool,
}

/// One handler's progress with one delivery.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HandlerRun {
    pub handler: String,
    pub state: String,
    pub attempts: u32,
    pub next_attempt_at: Option<String>,
    pub last_error: Option<String>,
}

/// One call of a handler.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttemptRecord {
    pub handler: String,
    pub attempt: u32,
    pub started_at: String,
    pub finished_at: String,
    pub outcome: String,
    pub error: Option<String>,
}

/// Everything `events show` prints.
#[derive(Debug, Clone)]
pub struct DeliveryDetail {
    pub summary: DeliverySummary,
    pub client_ip: String,
    pub headers: Vec<(String, String)>,
    pub body: Payload,
    pub fresh: Option<bool>,
    pub parse_error: Option<String>,
    pub handlers: Vec<HandlerRun>,
    pub attempts: Vec<AttemptRecord>,
}

/// What `events replay` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayOutcome {
    pub replayed: u64,
    /// Matching deliveries being handled at this moment, left alone.
    pub running: u64,
}

/// What `events replay` puts back in the queue.
#[derive(Debug, Clone)]
pub enum ReplayTarget {
    DeliveryId(String),
    Status(Status),
}

/// A stored delivery waiting to be parsed and gated.
#[derive(Debug, Clone)]
pub struct Ungated {
    pub seq: i64,
    pub topic: Option<String>,
    pub body: Payload,
}

/// What the dispatcher learned from parsing one delivery, and which handlers its routes want.
/// The store decides fresh or stale with [`crate::ordering::decide`] inside the transaction that
/// records it, so two deliveries of one entity can never both be judged against stale state.
#[derive(Debug, Clone)]
pub struct GateRequest {
    pub seq: i64,
    pub entity: Option<String>,
    pub version: Option<Version>,
    pub change: Change,
    pub project_id: Option<String>,
    /// Why the body could not be parsed, if it could not (the delivery becomes `unrecognized`).
    pub parse_error: Option<String>,
    /// False for unknown topics (also `unrecognized`).
    pub recognized: bool,
    /// Handlers to run when the event is fresh.
    pub handlers_if_fresh: Vec<String>,
    /// Handlers to run when it is stale (routes with `deliver_stale`).
    pub handlers_if_stale: Vec<String>,
    /// The canonical topic, for metrics.
    pub topic_label: &'static str,
}

impl GateRequest {
    /// The handlers for the gate's verdict.
    pub fn handlers(&self, fresh: bool) -> &[String] {
        if fresh {
            &self.handlers_if_fresh
        } else {
            &self.handlers_if_stale
        }
    }
}

/// A delivery claimed for dispatch, with the handler runs that are due.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub seq: i64,
    pub delivery_id: String,
    pub topic: Option<String>,
    pub entity: Option<String>,
    pub version: Option<Version>,
    pub project_id: Option<String>,
    pub fresh: bool,
    pub body_is_json: bool,
    pub received_at: UnixMillis,
    pub body: Payload,
    pub runs: Vec<DueRun>,
}

/// One handler to call for a claimed delivery.
#[derive(Debug, Clone)]
pub struct DueRun {
    pub handler: String,
    /// Attempts made before this one.
    pub attempts: u32,
}

/// How one attempt ended, as the dispatcher decided from the handler's answer.
#[derive(Debug, Clone)]
pub enum AttemptOutcome {
    Ok,
    /// Failed; try again at `next_at`.
    Retry {
        next_at: UnixMillis,
        error: String,
    },
    /// Failed for good (permanent error or out of attempts): dead-lettered for this handler.
    Dead {
        error: String,
    },
}

#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub handler: String,
    /// This attempt's number, from 1.
    pub attempt: u32,
    pub started_at: UnixMillis,
    pub finished_at: UnixMillis,
    pub outcome: AttemptOutcome,
}

/// The fields of a [`VerifiedDelivery`] that the store writes, taken apart.
#[derive(Debug)]
pub struct NewDelivery {
    pub delivery_id: String,
    pub body_sha256: [u8; 32],
    pub endpoint: String,
    pub topic: Option<String>,
    pub status: Status,
    pub client_ip: IpAddr,
    pub headers: Vec<(String, String)>,
    pub body: IncomingBody,
    pub received_at: UnixMillis,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a verified delivery durably. Returns after its commit is on disk, or with
    /// [`StoreError::Busy`] / [`StoreError::Unavailable`] when it could not be stored.
    async fn accept(&self, delivery: VerifiedDelivery) -> Result<Accepted, StoreError>;

    /// Where large bodies are written while they stream in.
    fn blob_dir(&self) -> &BlobDir;

    /// Ok when the store can be reached and written to (a real commit).
    async fn check_ready(&self) -> Result<(), StoreError>;

    async fn list(&self, query: &ListQuery) -> Result<Vec<DeliverySummary>, StoreError>;

    /// Every stored delivery with this id (one, or several when bodies differed).
    async fn show(&self, delivery_id: &str) -> Result<Vec<DeliveryDetail>, StoreError>;

    /// Puts deliveries back in the dispatch queue (not those being handled right now).
    async fn replay(&self, target: &ReplayTarget) -> Result<ReplayOutcome, StoreError>;

    /// Deliveries not yet parsed and gated, oldest first.
    async fn next_ungated(&self, limit: u32) -> Result<Vec<Ungated>, StoreError>;

    /// For each delivery, in order: decides fresh or stale against the entity's last applied
    /// state and records, in the same transaction, the decision, the entity's new state, the
    /// delivery's status and lane position, and a pending run per selected handler.
    /// A gate that fails is left undecided (`None`) for the next round; the others stand.
    async fn record_gates(
        &self,
        gates: Vec<GateRequest>,
    ) -> Result<Vec<Option<Verdict>>, StoreError>;

    /// Leases up to `limit` deliveries with due handler runs, never two of one entity at a
    /// time and each only after everything before it in its entity's lane is finished.
    async fn claim(
        &self,
        owner: &str,
        lease: std::time::Duration,
        limit: u32,
    ) -> Result<Vec<Claimed>, StoreError>;

    /// Records a claimed delivery's attempts, sets its status, and releases its lease.
    /// [`StoreError::LeaseLost`] when `owner` no longer holds the claim.
    async fn record_attempts(
        &self,
        seq: i64,
        owner: &str,
        results: &[AttemptResult],
    ) -> Result<Status, StoreError>;

    /// Holds the store for this server process: a second server on the same database fails
    /// to start instead of sharing it unsafely.
    async fn lock_for_serving(&self) -> Result<(), StoreError>;

    /// Gives up the leases of a previous run of this process (after a crash), so its work is
    /// taken again at once instead of when the leases run out.
    async fn release_stale_leases(&self) -> Result<u64, StoreError>;

    /// Deliveries with work left (pending handler runs or not yet gated).
    async fn queue_depth(&self) -> Result<u64, StoreError>;

    /// Removes blob files that no delivery names (left by a crash between write and commit).
    /// Only for a process that owns the store: not while another server writes to it.
    async fn sweep_orphan_blobs(&self) -> Result<usize, StoreError>;

    /// Waits until a delivery was accepted by this process (or a short while passed).
    async fn wait_for_work(&self, max_wait: std::time::Duration);

    /// Stops the writer after it committed everything it was given.
    async fn close(&self);
}

/// Opens the store named by the configuration. The SQLite store opens even when the database
/// cannot be reached yet: it keeps trying, and answers `Unavailable` meanwhile.
pub async fn open(config: &Config) -> Result<Arc<dyn Store>, StoreError> {
    let url = &config.settings.store.url;
    if crate::config::sqlite_path(url).is_some() {
        let store = sqlite::SqliteStore::open(
            &config.settings.store,
            config.settings.server.queue_capacity,
        )
        .await?;
        Ok(Arc::new(store))
    } else {
        Err(StoreError::UnsupportedUrl(url.clone()))
    }
}
