//! The embedded back-end: one SQLite file in WAL mode, `synchronous = FULL`, on rusqlite alone.
//!
//! A delivery is written once, at accept; what happens to it later (the gate's verdict, each
//! attempt, the closing of its work, a replay) is appended beside it, never rewritten. Every
//! write goes through the one writer thread in [`writer`], which commits in batches and answers
//! each caller after its batch is on disk; the writes themselves are in [`ops`] and [`appends`].
//! Reads ([`reads`]) run on read-only connections on blocking threads, against the view
//! `deliveries_now` that says where each delivery stands. Large bodies are files beside the
//! database ([`blob`]).
//!
//! One server per database file (its writer holds `<database>.lock`): SQLite is for a single
//! replica. So the dispatch state (what waits for the gate, the lanes, their heads, leases and
//! retry times) is kept in that server's memory ([`queue`]), rebuilt from the records at start
//! ([`recover`]): claiming work and renewing leases write nothing. [`SqliteInspector`] is what
//! the CLI opens beside a running server: it reads read-only and appends (replays) in short
//! transactions of its own, never taking the serving lock; the server reads what it appended
//! within a second.

mod appends;
mod backfill;
mod blob;
mod files;
mod health;
mod ops;
mod prune;
mod queue;
mod reads;
mod recover;
mod writer;

#[cfg(test)]
mod carried_over;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, Mutex, Notify};

use self::blob::BlobDir;
use self::health::{Health, Readiness};
use self::ops::{Op, Reply};
use self::queue::MemQueue;
use self::reads::Readers;
use self::writer::{WriteRequest, Writer};
use super::{
    Accepted, AttemptResult, BodyStore, ChainRecord, Claimed, Cutoffs, DeliveryDetail,
    DeliverySummary, EntityHistory, GateRequest, HandlerActivity, Inspect, Intake, LeaseOwner,
    ListQuery, Maintenance, Overview, PruneReport, Queue, Reason, ReplayItem, ReplayOutcome,
    ReplayTarget, Store, StoreError, StoreStats, Ungated, VerdictBasis,
};
use crate::delivery::{after, Clock, Payload, Status, UnixMillis, VerifiedDelivery};
use crate::ordering::Verdict;
use crate::store::StoreSettings;

/// How long the CLI's writes (replay, prune) wait for the server writer's lock.
const WRITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the server reads what another process appended (a replay from the CLI, say) and
/// writes down how far its work is finished.
const CATCH_UP_INTERVAL: Duration = Duration::from_secs(1);

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
            ) => StoreError::unavailable(Reason::from_error(e)),
            _ => StoreError::database(Reason::from_error(e)),
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
    /// The dispatch state (see [`queue`]); the writer changes it after each commit.
    queue: Arc<std::sync::Mutex<MemQueue>>,
    writer_task: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Stops the catch-up ticker when the store is closed.
    ticking: tokio_util::sync::CancellationToken,
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
        let queue = Arc::new(std::sync::Mutex::new(MemQueue::default()));
        let writer = Writer {
            path: path.clone(),
            conn: None,
            batch_max: settings.commit_batch_max.max(1),
            blobs: blobs.clone(),
            work: work.clone(),
            health: health.clone(),
            lock: None,
            files: None,
            outage: crate::store::outage::Outage::new("store", "sqlite"),
            reached: false,
            queue: queue.clone(),
            rebuilt: false,
            data_version: None,
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
            Err(_) => return Err(StoreError::unavailable("store writer stopped")),
        };
        let (stop_checkpoints, checkpoint_stop) = std::sync::mpsc::channel();
        let checkpoint_path = path.clone();
        std::thread::Builder::new()
            .name("lh-checkpoint".into())
            .spawn({
                let health = health.clone();
                move || writer::run_checkpointer(checkpoint_path, &health, checkpoint_stop)
            })?;
        let ticking = tokio_util::sync::CancellationToken::new();
        tokio::spawn(catch_up_every_second(
            tx.clone(),
            clock.clone(),
            ticking.clone(),
        ));
        let store = Self {
            readers: Readers::new(path.clone(), health.clone()),
            inspector: SqliteInspector::with_health(path, clock.clone(), health.clone()),
            clock,
            health,
            writer: tx,
            blobs,
            work,
            queue,
            writer_task: Mutex::new(Some(task)),
            ticking,
            checkpointer: std::sync::Mutex::new(Some(stop_checkpoints)),
        };
        Ok((store, opened))
    }

    /// Queues an op made with its reply channel and waits for its commit. `wait_for_room`
    /// false refuses at once with `Busy` when the queue is full (deliveries: the sender
    /// retries); true waits (the dispatcher's bookkeeping must not be dropped).
    async fn write<T>(
        &self,
        op: impl FnOnce(Reply<T>) -> Op,
        wait_for_room: bool,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = WriteRequest::Write(op(reply));
        if wait_for_room {
            self.writer
                .send(request)
                .await
                .map_err(|_| StoreError::unavailable("store is shutting down"))?;
        } else {
            self.writer.try_send(request).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => StoreError::Busy,
                mpsc::error::TrySendError::Closed(_) => {
                    StoreError::unavailable("store is shutting down")
                }
            })?;
        }
        answer
            .await
            .map_err(|_| StoreError::unavailable("store writer stopped"))?
    }

    /// The dispatch state, for a short look or change.
    fn queue(&self) -> Result<std::sync::MutexGuard<'_, MemQueue>, StoreError> {
        self.queue
            .lock()
            .map_err(|_| StoreError::Corrupt("dispatch state poisoned".into()))
    }

    /// Reads the bodies of `seqs` that were not in memory into `fill`'s payloads, and keeps
    /// them in memory for the next time.
    async fn read_bodies(&self, seqs: Vec<i64>) -> Result<Vec<(i64, Payload)>, StoreError> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let blobs = self.blobs.clone();
        let read = self
            .readers
            .run(move |conn| {
                seqs.iter()
                    .map(|&seq| Ok((seq, ops::body_required(conn, &blobs, seq)?)))
                    .collect::<Result<Vec<_>, StoreError>>()
            })
            .await?;
        let mut queue = self.queue()?;
        for (seq, body) in &read {
            queue.keep_body(*seq, body);
        }
        Ok(read)
    }

    /// Removes blob files that no delivery names (left by a crash between write and commit).
    async fn sweep_orphan_blobs(&self) -> Result<usize, StoreError> {
        let referenced = self.readers.run(reads::referenced_blobs).await?;
        Ok(self.blobs.sweep_orphans(&referenced)?)
    }
}

/// Asks the writer to read what other processes appended, every [`CATCH_UP_INTERVAL`], until
/// `stop`. A full queue skips a tick: the writer is busy, and the next tick comes soon.
async fn catch_up_every_second(
    writer: mpsc::Sender<WriteRequest>,
    clock: Arc<dyn Clock>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut ticks = tokio::time::interval(CATCH_UP_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        let op = Op::CatchUp {
            now: clock.now(),
            reply: None,
        };
        if let Err(mpsc::error::TrySendError::Closed(_)) = writer.try_send(WriteRequest::Write(op))
        {
            return;
        }
    }
}

/// Fills the empty bodies of `claimed` (and of their chains) from `read`.
fn fill_bodies(claimed: &mut [Claimed], read: &[(i64, Payload)]) {
    for c in claimed {
        if let Some((_, body)) = read.iter().find(|(seq, _)| *seq == c.seq) {
            c.body = body.clone();
        }
        fill_bodies(&mut c.chain, read);
    }
}

#[async_trait]
impl Intake for SqliteStore {
    async fn accept(&self, delivery: VerifiedDelivery) -> Result<Accepted, StoreError> {
        let delivery = Box::new(delivery.into_parts());
        self.write(|reply| Op::Accept { delivery, reply }, false)
            .await
    }

    fn bodies(&self) -> &dyn BodyStore {
        &self.blobs
    }

    /// From how real writes went (see [`health`]); a probe write only when nothing was
    /// committed lately.
    async fn check_ready(&self) -> Result<(), StoreError> {
        match self.health.readiness() {
            Readiness::Ready => Ok(()),
            Readiness::NotReady(why) => Err(StoreError::unavailable(why)),
            Readiness::Unknown => {
                let now = self.clock.now();
                self.write(|reply| Op::Probe { now, reply }, false).await
            }
        }
    }
}

/// The dispatch state is this process's (see [`queue`]): taking deliveries to gate, claiming,
/// renewing leases, the queue's depth read it without a write; verdicts and attempts are
/// appended through the writer.
#[async_trait]
impl Queue for SqliteStore {
    /// Nobody else gates a SQLite database, so nothing needs reserving; the gate itself skips a
    /// delivery gated meanwhile.
    async fn take_ungated(
        &self,
        _owner: &LeaseOwner,
        _lease: Duration,
        limit: u32,
    ) -> Result<Vec<Ungated>, StoreError> {
        let (mut taken, mut unread) = self.queue()?.ungated(limit as usize);
        if taken.is_empty() {
            // Nothing here: another process (a backfill) may have stored some since.
            let now = self.clock.now();
            self.write(
                |reply| Op::CatchUp {
                    now,
                    reply: Some(reply),
                },
                true,
            )
            .await?;
            (taken, unread) = self.queue()?.ungated(limit as usize);
        }
        let read = self.read_bodies(unread).await?;
        for u in &mut taken {
            if let Some((_, body)) = read.iter().find(|(seq, _)| *seq == u.seq) {
                u.body = body.clone();
            }
        }
        Ok(taken)
    }

    async fn record_gates(
        &self,
        gates: Vec<GateRequest>,
    ) -> Result<Vec<Option<Verdict>>, StoreError> {
        let now = self.clock.now();
        self.write(|reply| Op::Gate { gates, now, reply }, true)
            .await
    }

    async fn claim(
        &self,
        owner: &LeaseOwner,
        lease: Duration,
        limit: u32,
        chain_max: u32,
    ) -> Result<Vec<Claimed>, StoreError> {
        let now = self.clock.now();
        let (mut claimed, unread) = self.queue()?.claim(
            owner.as_str(),
            now,
            after(now, lease),
            limit as usize,
            chain_max as usize,
        );
        let read = self.read_bodies(unread).await?;
        fill_bodies(&mut claimed, &read);
        Ok(claimed)
    }

    async fn renew(
        &self,
        owner: &LeaseOwner,
        seqs: &[i64],
        lease: Duration,
    ) -> Result<Vec<i64>, StoreError> {
        let until = after(self.clock.now(), lease);
        Ok(self.queue()?.renew(owner.as_str(), seqs, until))
    }

    async fn record_attempts(
        &self,
        seq: i64,
        owner: &LeaseOwner,
        results: &[AttemptResult],
    ) -> Result<Status, StoreError> {
        let records = vec![ChainRecord {
            seq,
            results: results.to_vec(),
        }];
        let statuses = self.record(owner, records).await?;
        statuses
            .first()
            .copied()
            .ok_or_else(|| StoreError::Corrupt(format!("no status recorded for {seq}")))
    }

    async fn record_chain(
        &self,
        owner: &LeaseOwner,
        records: &[ChainRecord],
    ) -> Result<(), StoreError> {
        self.record(owner, records.to_vec()).await.map(|_| ())
    }

    async fn queue_depth(&self) -> Result<u64, StoreError> {
        Ok(self.queue()?.depth())
    }

    async fn oldest_unfinished(&self) -> Result<Option<crate::delivery::UnixMillis>, StoreError> {
        Ok(self.queue()?.oldest_received())
    }

    async fn wait_for_work(&self, max_wait: Duration) {
        let _ = tokio::time::timeout(max_wait, self.work.notified()).await;
    }
}

impl SqliteStore {
    async fn record(
        &self,
        owner: &LeaseOwner,
        records: Vec<ChainRecord>,
    ) -> Result<Vec<Status>, StoreError> {
        let (owner, now) = (owner.as_str().to_owned(), self.clock.now());
        self.write(
            |reply| Op::Record {
                owner,
                records,
                now,
                reply,
            },
            true,
        )
        .await
    }

    async fn replay_through_writer(
        &self,
        target: &ReplayTarget,
    ) -> Result<Vec<ReplayItem>, StoreError> {
        let (target, now) = (target.clone(), self.clock.now());
        self.write(|reply| Op::Replay { target, now, reply }, true)
            .await
    }
}

#[async_trait]
impl Inspect for SqliteStore {
    // Reads go through the same code as the CLI's read-only inspector; replays go through this
    // server's writer, which knows what is being handled right now.
    async fn list(&self, query: &ListQuery) -> Result<Vec<DeliverySummary>, StoreError> {
        self.inspector.list(query).await
    }

    async fn show(&self, delivery_id: &str) -> Result<Vec<DeliveryDetail>, StoreError> {
        self.inspector.show(delivery_id).await
    }

    async fn replay(&self, target: &ReplayTarget) -> Result<ReplayOutcome, StoreError> {
        Ok(ReplayOutcome::of(
            &self.replay_through_writer(target).await?,
        ))
    }

    async fn replay_each(&self, target: &ReplayTarget) -> Result<Vec<ReplayItem>, StoreError> {
        self.replay_through_writer(target).await
    }

    async fn replay_preview(&self, target: &ReplayTarget) -> Result<Vec<ReplayItem>, StoreError> {
        let target = target.clone();
        let queue = self.queue.clone();
        let now = self.clock.now();
        self.readers
            .run(move |conn| {
                let running = |seq| queue.lock().is_ok_and(|q| q.running(seq, now));
                reads::replay_plan(conn, &target, &running)
            })
            .await
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
        let cutoffs = *cutoffs;
        let (report, blobs) = self
            .write(
                |reply| Op::Prune {
                    cutoffs,
                    limit,
                    reply,
                },
                true,
            )
            .await?;
        self.blobs.remove(&blobs);
        Ok(report)
    }

    async fn reclaim_space(&self) -> Result<(), StoreError> {
        while self
            .write(
                |reply| Op::Reclaim {
                    pages: RECLAIM_PAGES,
                    reply,
                },
                true,
            )
            .await?
        {
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.readers.run(prune::stats).await
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn close(&self) {
        self.ticking.cancel();
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
        Ok(Self::with_health(path, clock, Arc::default()))
    }

    /// The read side of a serving store, sharing its health (and so closing its connections
    /// when the writer asks).
    fn with_health(path: PathBuf, clock: Arc<dyn Clock>, health: Arc<Health>) -> Self {
        Self {
            readers: Readers::new(path.clone(), health.clone()),
            blobs: blob_dir(&path, health),
            path,
            clock,
        }
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

    /// Appends the replays in one short write transaction of its own; a running server's writer
    /// waits for it (and it for the writer) through SQLite's lock, and reads the replays within
    /// a second. This process cannot see what the server is handling at this moment: a replay of
    /// such a delivery takes effect once its attempts are recorded.
    async fn replay(&self, target: &ReplayTarget) -> Result<ReplayOutcome, StoreError> {
        Ok(ReplayOutcome::of(&self.replay_each(target).await?))
    }

    /// What each delivery gets is decided inside the replay's transaction, before it.
    async fn replay_each(&self, target: &ReplayTarget) -> Result<Vec<ReplayItem>, StoreError> {
        let (target, now) = (target.clone(), self.clock.now());
        self.write(move |conn| {
            let items = reads::replay_plan(conn, &target, &|_| false)?;
            appends::append_replays(conn, &items, now)?;
            Ok(items)
        })
        .await
    }

    async fn replay_preview(&self, target: &ReplayTarget) -> Result<Vec<ReplayItem>, StoreError> {
        let target = target.clone();
        self.readers
            .run(move |conn| reads::replay_plan(conn, &target, &|_| false))
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
                return Err(StoreError::unavailable(format!(
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
        .map_err(|e| StoreError::unavailable(format!("store thread failed: {e}")))?
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
