//! The embedded back-end: one SQLite file in WAL mode, `synchronous = FULL`, on rusqlite alone.
//!
//! Every write goes through the one writer thread in [`writer`], which commits in batches and
//! answers each caller after its batch is on disk; the writes themselves are in [`ops`] and
//! [`lanes`]. Reads ([`reads`]) run on read-only connections on blocking threads. Large bodies
//! are files beside the database ([`blob`]).
//!
//! One server per database file (its writer holds `<database>.lock`): SQLite is for a single
//! replica.
//! That is also why a lease found at start can only be a dead process's, and why the dispatcher
//! is woken in-process. [`SqliteInspector`] is what the CLI opens beside a running server: it
//! reads read-only and writes (replay) in short transactions of its own, never taking the
//! serving lock.

mod backfill;
mod blob;
mod files;
mod health;
mod lanes;
mod ops;
mod prune;
mod reads;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, Mutex, Notify};

use self::blob::BlobDir;
use self::health::{Health, Readiness};
use self::ops::{Op, Output};
use self::reads::Readers;
use self::writer::{Request, WriteRequest, Writer};
use super::{
    Accepted, AttemptResult, BodyStore, ChainRecord, Claimed, Cutoffs, DeliveryDetail,
    DeliverySummary, EntityHistory, GateRequest, HandlerActivity, Inspect, Intake, LeaseOwner,
    ListQuery, Maintenance, Overview, PruneReport, Queue, ReplayItem, ReplayOutcome, ReplayTarget,
    Store, StoreError, StoreStats, Ungated, VerdictBasis,
};
use crate::config::StoreSettings;
use crate::delivery::{after, Clock, Status, UnixMillis, VerifiedDelivery};
use crate::ordering::Verdict;

/// How long the CLI's writes (replay, prune) wait for the server writer's lock.
const WRITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(
                ErrorCode::CannotOpen
                | ErrorCode::DiskFull
                | ErrorCode::ReadOnly
                | ErrorCode::SystemIoFailure
                | ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::PermissionDenied,
            ) => StoreError::Unavailable(e.to_string()),
            _ => StoreError::Database(e.to_string()),
        }
    }
}

/// The directory of blob files that belongs to a database file.
fn blob_dir(path: &Path, health: Arc<Health>) -> BlobDir {
    // One blob directory per database, so that two databases side by side never sweep each
    // other's files.
    BlobDir::new(PathBuf::from(format!("{}.blobs", path.display())), health)
}

pub struct SqliteStore {
    clock: Arc<dyn Clock>,
    health: Arc<Health>,
    writer: mpsc::Sender<WriteRequest>,
    readers: Readers,
    /// The read side shared with the CLI's inspector.
    inspector: SqliteInspector,
    blobs: BlobDir,
    work: Arc<Notify>,
    writer_task: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Dropping it stops the checkpointer thread.
    checkpointer: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

impl SqliteStore {
    /// Opens the database for `serve`: starts the writer (which takes the serving lock), gives
    /// back the leases of a previous run and sweeps blob files no row names. Never fails for an
    /// unreachable database: that is reported by `check_ready` and `accept` until it can be
    /// opened, and the lock is taken then. Fails when another server holds the lock.
    pub async fn open_for_serving(
        path: PathBuf,
        settings: &StoreSettings,
        queue_capacity: usize,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        let (store, opened) = Self::start(path, settings, queue_capacity, clock).await?;
        match store.write(Op::ReleaseLeases, true).await {
            Ok(Output::Released(0)) => {}
            Ok(Output::Released(n)) => {
                tracing::info!(released = n, "taking back work of a previous run")
            }
            Ok(other) => return Err(unexpected(other)),
            Err(e) => tracing::warn!(error = %e, "could not release old leases"),
        }
        // Only with the lock held and before the first request is every unnamed blob an
        // orphan; a store that comes back later is swept at the next start.
        if opened {
            match store.sweep_orphan_blobs().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "removed blob files of unanswered deliveries"),
                Err(e) => tracing::warn!(error = %e, "could not sweep orphan blob files"),
            }
        }
        Ok(store)
    }

    /// Starts the writer and the checkpointer; says whether the database could be opened.
    async fn start(
        path: PathBuf,
        settings: &StoreSettings,
        queue_capacity: usize,
        clock: Arc<dyn Clock>,
    ) -> Result<(Self, bool), StoreError> {
        let health = Arc::new(Health::default());
        let blobs = blob_dir(&path, health.clone());
        let (tx, rx) = mpsc::channel(queue_capacity.max(1));
        let work = Arc::new(Notify::new());
        let writer = Writer {
            path: path.clone(),
            conn: None,
            batch_max: settings.commit_batch_max.max(1),
            blobs: blobs.clone(),
            work: work.clone(),
            health: health.clone(),
            lock: None,
            files: None,
            fatal_logged: None,
            reached: false,
        };
        // The writer opens (and migrates) right away so that readers find the schema.
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = std::thread::Builder::new()
            .name("lh-store-writer".into())
            .spawn(move || writer.run(rx, ready_tx))?;
        let opened = match ready_rx.await {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => {
                let _ = tokio::task::spawn_blocking(move || task.join()).await;
                return Err(e);
            }
            Err(_) => return Err(StoreError::Unavailable("store writer stopped".into())),
        };
        let (stop_checkpoints, checkpoint_stop) = std::sync::mpsc::channel();
        let checkpoint_path = path.clone();
        std::thread::Builder::new()
            .name("lh-checkpoint".into())
            .spawn(move || writer::run_checkpointer(checkpoint_path, checkpoint_stop))?;
        let store = Self {
            readers: Readers::new(path.clone()),
            inspector: SqliteInspector::open(path, clock.clone())?,
            clock,
            health,
            writer: tx,
            blobs,
            work,
            writer_task: Mutex::new(Some(task)),
            checkpointer: std::sync::Mutex::new(Some(stop_checkpoints)),
        };
        Ok((store, opened))
    }

    /// Queues a write and waits for its commit. `wait_for_room` false refuses at once with
    /// `Busy` when the queue is full (deliveries: the sender retries); true waits (the
    /// dispatcher's bookkeeping must not be dropped).
    async fn write(&self, op: Op, wait_for_room: bool) -> Result<Output, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = WriteRequest::Write(Request { op, reply });
        if wait_for_room {
            self.writer
                .send(request)
                .await
                .map_err(|_| StoreError::Unavailable("store is shutting down".into()))?;
        } else {
            self.writer.try_send(request).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => StoreError::Busy,
                mpsc::error::TrySendError::Closed(_) => {
                    StoreError::Unavailable("store is shutting down".into())
                }
            })?;
        }
        answer
            .await
            .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
    }

    /// Removes blob files that no delivery names (left by a crash between write and commit).
    async fn sweep_orphan_blobs(&self) -> Result<usize, StoreError> {
        let referenced = self.readers.run(reads::referenced_blobs).await?;
        Ok(self.blobs.sweep_orphans(&referenced)?)
    }
}

/// An op's output was not the kind its caller asked for: a bug, reported rather than panicked.
fn unexpected(output: Output) -> StoreError {
    StoreError::Corrupt(format!("unexpected writer output {output:?}"))
}

#[async_trait]
impl Intake for SqliteStore {
    async fn accept(&self, delivery: VerifiedDelivery) -> Result<Accepted, StoreError> {
        match self
            .write(Op::Accept(Box::new(delivery.into_parts())), false)
            .await?
        {
            Output::Accepted(accepted) => Ok(accepted),
            other => Err(unexpected(other)),
        }
    }

    fn bodies(&self) -> &dyn BodyStore {
        &self.blobs
    }

    /// From how real writes went (see [`health`]); a probe write only when nothing was
    /// committed lately.
    async fn check_ready(&self) -> Result<(), StoreError> {
        match self.health.readiness() {
            Readiness::Ready => Ok(()),
            Readiness::NotReady(why) => Err(StoreError::Unavailable(why)),
            Readiness::Unknown => {
                let now = self.clock.now();
                match self.write(Op::Probe { now }, false).await? {
                    Output::Probed => Ok(()),
                    other => Err(unexpected(other)),
                }
            }
        }
    }
}

#[async_trait]
impl Queue for SqliteStore {
    /// One process per SQLite database: nobody else gates, so nothing needs reserving, and
    /// this is a read (the gate itself skips a delivery gated meanwhile).
    async fn take_ungated(
        &self,
        _owner: &LeaseOwner,
        _lease: Duration,
        limit: u32,
    ) -> Result<Vec<Ungated>, StoreError> {
        let blobs = self.blobs.clone();
        self.readers
            .run(move |conn| reads::ungated(conn, &blobs, limit))
            .await
    }

    async fn record_gates(
        &self,
        gates: Vec<GateRequest>,
    ) -> Result<Vec<Option<Verdict>>, StoreError> {
        let now = self.clock.now();
        match self.write(Op::Gate { gates, now }, true).await? {
            Output::Gated(verdicts) => Ok(verdicts),
            other => Err(unexpected(other)),
        }
    }

    async fn claim(
        &self,
        owner: &LeaseOwner,
        lease: Duration,
        limit: u32,
        chain_max: u32,
    ) -> Result<Vec<Claimed>, StoreError> {
        let now = self.clock.now();
        let op = Op::Claim {
            owner: owner.as_str().to_owned(),
            now,
            until: after(now, lease),
            limit,
            chain_max,
        };
        match self.write(op, true).await? {
            Output::Claimed(claimed) => Ok(claimed),
            other => Err(unexpected(other)),
        }
    }

    async fn renew(
        &self,
        owner: &LeaseOwner,
        seqs: &[i64],
        lease: Duration,
    ) -> Result<Vec<i64>, StoreError> {
        let op = Op::Renew {
            owner: owner.as_str().to_owned(),
            seqs: seqs.to_vec(),
            until: after(self.clock.now(), lease),
        };
        match self.write(op, true).await? {
            Output::Renewed(held) => Ok(held),
            other => Err(unexpected(other)),
        }
    }

    async fn record_attempts(
        &self,
        seq: i64,
        owner: &LeaseOwner,
        results: &[AttemptResult],
    ) -> Result<Status, StoreError> {
        let op = Op::Record {
            seq,
            owner: owner.as_str().to_owned(),
            results: results.to_vec(),
            now: self.clock.now(),
        };
        match self.write(op, true).await? {
            Output::Recorded(status) => Ok(status),
            other => Err(unexpected(other)),
        }
    }

    async fn record_chain(
        &self,
        owner: &LeaseOwner,
        records: &[ChainRecord],
    ) -> Result<(), StoreError> {
        let op = Op::RecordChain {
            owner: owner.as_str().to_owned(),
            records: records.to_vec(),
            now: self.clock.now(),
        };
        match self.write(op, true).await? {
            Output::RecordedChain => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn queue_depth(&self) -> Result<u64, StoreError> {
        self.readers.run(reads::queue_depth).await
    }

    async fn oldest_unfinished(&self) -> Result<Option<crate::delivery::UnixMillis>, StoreError> {
        self.readers.run(reads::oldest_unfinished).await
    }

    async fn wait_for_work(&self, max_wait: Duration) {
        let _ = tokio::time::timeout(max_wait, self.work.notified()).await;
    }
}

#[async_trait]
impl Inspect for SqliteStore {
    // Reads go through the same code as the CLI's read-only inspector; only `replay` goes
    // through this server's writer.
    async fn list(&self, query: &ListQuery) -> Result<Vec<DeliverySummary>, StoreError> {
        self.inspector.list(query).await
    }

    async fn show(&self, delivery_id: &str) -> Result<Vec<DeliveryDetail>, StoreError> {
        self.inspector.show(delivery_id).await
    }

    async fn replay(&self, target: &ReplayTarget) -> Result<ReplayOutcome, StoreError> {
        let op = Op::Replay {
            target: target.clone(),
            now: self.clock.now(),
        };
        match self.write(op, true).await? {
            Output::Replayed(outcome) => Ok(outcome),
            other => Err(unexpected(other)),
        }
    }

    /// Decided and done in one transaction of its own beside the writer's (as the CLI's
    /// replay is), since the decision must see what the replay changes; the dispatcher is
    /// woken as after the writer's commits.
    async fn replay_each(&self, target: &ReplayTarget) -> Result<Vec<ReplayItem>, StoreError> {
        let items = self.inspector.replay_each(target).await?;
        if items.iter().any(|i| i.effect.replays()) {
            self.work.notify_one();
        }
        Ok(items)
    }

    async fn replay_preview(&self, target: &ReplayTarget) -> Result<Vec<ReplayItem>, StoreError> {
        self.inspector.replay_preview(target).await
    }

    async fn entity_history(&self, entity: &str, limit: u32) -> Result<EntityHistory, StoreError> {
        self.inspector.entity_history(entity, limit).await
    }

    async fn verdict_basis(&self, seq: i64) -> Result<Option<VerdictBasis>, StoreError> {
        self.inspector.verdict_basis(seq).await
    }

    async fn handler_activity(
        &self,
        since: UnixMillis,
    ) -> Result<Vec<HandlerActivity>, StoreError> {
        self.inspector.handler_activity(since).await
    }

    async fn overview(
        &self,
        since: UnixMillis,
        now: UnixMillis,
        bucket_ms: i64,
    ) -> Result<Overview, StoreError> {
        self.inspector.overview(since, now, bucket_ms).await
    }
}

/// Free pages given back per reclaim step: a short write each, between other writes.
const RECLAIM_PAGES: u32 = 2048;

#[async_trait]
impl Maintenance for SqliteStore {
    async fn prune_batch(
        &self,
        cutoffs: &Cutoffs,
        limit: u32,
        dry_run: bool,
    ) -> Result<PruneReport, StoreError> {
        if dry_run {
            let cutoffs = *cutoffs;
            return self
                .readers
                .run(move |conn| prune::dry_run(conn, &cutoffs))
                .await;
        }
        let op = Op::Prune {
            cutoffs: *cutoffs,
            limit,
        };
        match self.write(op, true).await? {
            Output::Pruned(report, blobs) => {
                self.blobs.remove(&blobs);
                Ok(report)
            }
            other => Err(unexpected(other)),
        }
    }

    async fn reclaim_space(&self) -> Result<(), StoreError> {
        loop {
            let op = Op::Reclaim {
                pages: RECLAIM_PAGES,
            };
            match self.write(op, true).await? {
                Output::Reclaimed(true) => tokio::task::yield_now().await,
                Output::Reclaimed(false) => return Ok(()),
                other => return Err(unexpected(other)),
            }
        }
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.readers.run(prune::stats).await
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn close(&self) {
        if let Ok(mut stop) = self.checkpointer.lock() {
            stop.take();
        }
        let (reply, done) = oneshot::channel();
        // `send` waits for room: close must reach the writer even when the queue is full.
        if self.writer.send(WriteRequest::Close(reply)).await.is_ok() {
            let _ = done.await;
        }
        if let Some(task) = self.writer_task.lock().await.take() {
            // The writer has answered the close, so this join does not block for long.
            let _ = tokio::task::spawn_blocking(move || task.join()).await;
        }
    }
}

/// The SQLite store as the CLI opens it beside a running server.
pub struct SqliteInspector {
    path: PathBuf,
    readers: Readers,
    blobs: BlobDir,
    clock: Arc<dyn Clock>,
}

impl SqliteInspector {
    pub fn open(path: PathBuf, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        Ok(Self {
            readers: Readers::new(path.clone()),
            blobs: blob_dir(&path, Arc::default()),
            path,
            clock,
        })
    }
}

#[async_trait]
impl Inspect for SqliteInspector {
    async fn list(&self, query: &ListQuery) -> Result<Vec<DeliverySummary>, StoreError> {
        let query = query.clone();
        self.readers
            .run(move |conn| reads::list(conn, &query))
            .await
    }

    async fn show(&self, delivery_id: &str) -> Result<Vec<DeliveryDetail>, StoreError> {
        let (blobs, id) = (self.blobs.clone(), delivery_id.to_owned());
        self.readers
            .run(move |conn| reads::show(conn, &blobs, &id))
            .await
    }

    /// One short write transaction of its own; a running server's writer waits for it (and it
    /// for the writer) through SQLite's lock. The server's dispatcher finds the replayed
    /// deliveries at its next poll.
    async fn replay(&self, target: &ReplayTarget) -> Result<ReplayOutcome, StoreError> {
        let (target, now) = (target.clone(), self.clock.now());
        self.write(move |conn| lanes::replay(conn, &target, now))
            .await
    }

    /// What each delivery gets is decided inside the replay's transaction, before it.
    async fn replay_each(&self, target: &ReplayTarget) -> Result<Vec<ReplayItem>, StoreError> {
        let (target, now) = (target.clone(), self.clock.now());
        self.write(move |conn| {
            let items = reads::replay_plan(conn, &target, now)?;
            lanes::replay(conn, &target, now)?;
            Ok(items)
        })
        .await
    }

    async fn replay_preview(&self, target: &ReplayTarget) -> Result<Vec<ReplayItem>, StoreError> {
        let (target, now) = (target.clone(), self.clock.now());
        self.readers
            .run(move |conn| reads::replay_plan(conn, &target, now))
            .await
    }

    async fn entity_history(&self, entity: &str, limit: u32) -> Result<EntityHistory, StoreError> {
        let entity = entity.to_owned();
        self.readers
            .run(move |conn| reads::entity_history(conn, &entity, limit))
            .await
    }

    async fn verdict_basis(&self, seq: i64) -> Result<Option<VerdictBasis>, StoreError> {
        self.readers
            .run(move |conn| reads::verdict_basis(conn, seq))
            .await
    }

    async fn handler_activity(
        &self,
        since: UnixMillis,
    ) -> Result<Vec<HandlerActivity>, StoreError> {
        self.readers
            .run(move |conn| reads::handler_activity(conn, since))
            .await
    }

    async fn overview(
        &self,
        since: UnixMillis,
        now: UnixMillis,
        bucket_ms: i64,
    ) -> Result<Overview, StoreError> {
        self.readers
            .run(move |conn| reads::overview(conn, since, now, bucket_ms))
            .await
    }
}

impl SqliteInspector {
    /// Runs `write` in one short transaction on a connection of its own, on a blocking thread.
    async fn write<T, F>(&self, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            if !path.exists() {
                return Err(StoreError::Unavailable(format!(
                    "no database at {}",
                    path.display()
                )));
            }
            let mut conn = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.busy_timeout(WRITE_BUSY_TIMEOUT)?;
            // As the writer does: a change acknowledged is a change on disk.
            conn.pragma_update(None, "synchronous", "FULL")?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let result = write(&tx)?;
            tx.commit()?;
            Ok(result)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("store thread failed: {e}")))?
    }
}

#[async_trait]
impl Maintenance for SqliteInspector {
    async fn prune_batch(
        &self,
        cutoffs: &Cutoffs,
        limit: u32,
        dry_run: bool,
    ) -> Result<PruneReport, StoreError> {
        let cutoffs = *cutoffs;
        if dry_run {
            return self
                .readers
                .run(move |conn| prune::dry_run(conn, &cutoffs))
                .await;
        }
        let (report, blobs) = self
            .write(move |conn| prune::prune_batch(conn, &cutoffs, limit))
            .await?;
        self.blobs.remove(&blobs);
        Ok(report)
    }

    async fn reclaim_space(&self) -> Result<(), StoreError> {
        while self
            .write(|conn| prune::reclaim(conn, RECLAIM_PAGES))
            .await?
        {}
        Ok(())
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.readers.run(prune::stats).await
    }
}
