//! The writer: the only connection that writes, on a thread of its own, and the group commit.
//!
//! Requests queue up on a bounded channel. The writer takes whatever is waiting (up to
//! `commit_batch_max`), runs it in one transaction, commits (one fsync of the WAL), and only
//! then answers each request. Deliveries, gate decisions, claims and attempt records all share
//! these commits, so there is never a second writer waiting on SQLite's lock.
//!
//! It talks to SQLite directly (rusqlite) on a dedicated thread rather than through sqlx's
//! async driver, which hands every statement to a worker thread and back: at a dozen statements
//! per delivery those hand-offs, not the disk, were the limit (see BENCHMARKS.md).
//!
//! When the database cannot be opened or written (directory missing, read-only, disk full,
//! another process holding SQLite's lock), the writer answers `Unavailable` and opens a fresh
//! connection for the next batch, so the service recovers by itself when the disk does. Each
//! batch waits at most `BUSY_TIMEOUT` for SQLite's lock, and a batch that fails takes what is
//! queued behind it down with it, so no request waits for more than about two such waits.
//!
//! The writer also holds the serving lock (`<database>.lock`), taken with its first connection,
//! so a store that was unreachable at start is locked when it comes back. After each commit it
//! checks that the files it wrote are still the ones at the database's path ([`files`]): a
//! database removed or replaced under a running server would take every acknowledged delivery
//! with it, so that is refused until a restart, never acknowledged.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, Notify};

use super::blob::BlobDir;
use super::files::{FileId, ServingLock, StoreFiles};
use super::health::Health;
use super::ops::{Op, Output};
use crate::delivery::IncomingBody;
use crate::store::StoreError;

/// Schema versions, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: [&str; 6] = [
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_event.sql"),
    include_str!("migrations/0003_body_pruned.sql"),
    include_str!("migrations/0004_request_id.sql"),
    include_str!("migrations/0005_unpruned_bodies.sql"),
    include_str!("migrations/0006_origin.sql"),
];
/// How long a batch waits for SQLite's lock held by another process (the CLI's replay or prune,
/// which are short; or something outside that should not be there). The deliveries in that batch
/// wait this long before their 503, so it is kept to a couple of seconds.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(2);
/// While the store is lost for good, its error is logged at most this often.
const FATAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Prepared statements kept per connection; the writer uses about twenty.
const STATEMENT_CACHE: usize = 64;
/// How often the checkpointer copies the WAL back into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
/// WAL pages after which the writer checkpoints at commit time. Under constant writes only a
/// writer can restart the WAL (a background checkpoint never catches up with it), so without
/// this the WAL would grow without bound; by then the checkpointer thread has copied most
/// pages already, so the writer's share is small.
const WRITER_CHECKPOINT_PAGES: u32 = 4096;
/// How many batches' worth of queued requests the writer looks at when it forms a batch.
const LOOKAHEAD_BATCHES: usize = 4;
/// After a WAL restart the file is cut back to this size instead of staying at its peak.
const WAL_KEEP_BYTES: u64 = 64 * 1024 * 1024;

/// One queued write and where its answer goes.
pub struct Request {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Output, StoreError>>,
}

pub enum WriteRequest {
    Write(Request),
    /// Commit what is queued, then stop.
    Close(oneshot::Sender<()>),
}

pub struct Writer {
    pub path: PathBuf,
    pub conn: Option<Connection>,
    pub batch_max: usize,
    pub blobs: BlobDir,
    /// Woken after a commit that gave the dispatcher something new to do.
    pub work: Arc<Notify>,
    pub health: Arc<Health>,
    /// `<database>.lock`, held from the first connection on.
    pub lock: Option<ServingLock>,
    /// The files of the database this writer opened first: a later connection must find the
    /// same database file at the path.
    pub files: Option<StoreFiles>,
    pub fatal_logged: Option<std::time::Instant>,
    /// Whether the last failed batch got as far as an open database. A batch refused because the store
    /// cannot be reached says nothing `/readyz`'s own probe will not find out; one refused by
    /// the database itself (a full disk, an I/O error) must hold readiness down.
    pub reached: bool,
}

impl Writer {
    /// The writer thread's loop; returns when closed or when every sender is gone.
    /// `ready` gets whether the first connection opened (and the serving lock is held); when
    /// another server holds the database it gets `Locked` and the writer stops.
    pub fn run(
        mut self,
        mut rx: mpsc::Receiver<WriteRequest>,
        ready: oneshot::Sender<Result<bool, StoreError>>,
    ) {
        let opened = match self.connection() {
            Ok(_) => true,
            Err(e @ StoreError::Locked(_)) => {
                let _ = ready.send(Err(e));
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "store not available yet; will retry");
                false
            }
        };
        let _ = ready.send(Ok(opened));
        // Requests taken off the channel, not yet committed: the dispatcher's go first, so
        // that a flood of deliveries never starves the handling of the ones already stored.
        let mut waiting: std::collections::VecDeque<Request> = std::collections::VecDeque::new();
        let mut close = None;
        while close.is_none() || !waiting.is_empty() {
            if waiting.is_empty() {
                let Some(first) = rx.blocking_recv() else {
                    break;
                };
                match first {
                    WriteRequest::Write(r) => waiting.push_back(r),
                    WriteRequest::Close(done) => close = Some(done),
                }
            }
            // Whatever is already waiting joins this commit; a few batches' worth are looked at
            // so that the dispatcher's requests behind deliveries are found.
            while close.is_none() && waiting.len() < self.batch_max * LOOKAHEAD_BATCHES {
                match rx.try_recv() {
                    Ok(WriteRequest::Write(r)) => waiting.push_back(r),
                    Ok(WriteRequest::Close(done)) => close = Some(done),
                    Err(_) => break,
                }
            }
            let batch = self.next_batch(&mut waiting);
            if batch.is_empty() {
                continue;
            }
            if let Err(failure) = self.commit(batch) {
                // What waits behind a failed batch would wait as long again for the same
                // answer, so it gets it now (senders retry; the dispatcher polls again).
                while close.is_none() {
                    match rx.try_recv() {
                        Ok(WriteRequest::Write(r)) => waiting.push_back(r),
                        Ok(WriteRequest::Close(done)) => close = Some(done),
                        Err(_) => break,
                    }
                }
                let refused: Vec<Request> = waiting.drain(..).collect();
                self.refuse(refused, &failure);
            }
        }
        rx.close();
        // Whatever raced in behind the close is refused, not lost: senders retry.
        while let Ok(late) = rx.try_recv() {
            if let WriteRequest::Write(r) = late {
                let _ = r.reply.send(Err(StoreError::Unavailable(
                    "store is shutting down".into(),
                )));
            }
        }
        self.conn = None;
        if let Some(done) = close {
            let _ = done.send(());
        }
    }

    /// Up to `batch_max` requests for the next commit: the dispatcher's first, then deliveries
    /// in arrival order.
    fn next_batch(&self, waiting: &mut std::collections::VecDeque<Request>) -> Vec<Request> {
        let (first, rest): (Vec<Request>, Vec<Request>) =
            waiting.drain(..).partition(|r| r.op.is_dispatch());
        let mut ordered: std::collections::VecDeque<Request> =
            first.into_iter().chain(rest).collect();
        let take = ordered.len().min(self.batch_max);
        let batch = ordered.drain(..take).collect();
        *waiting = ordered;
        batch
    }

    /// The open connection, or a new one. A new one must find the database this writer
    /// started with (never a fresh one made in place of a database that disappeared), and
    /// takes the serving lock first.
    fn connection(&mut self) -> Result<&mut Connection, StoreError> {
        if let Some(why) = self.health.fatal() {
            return Err(StoreError::Unavailable(why));
        }
        if self.conn.is_none() {
            if let Some(files) = &self.files {
                if let Err(why) = files.same_database(&self.path) {
                    return Err(self.lost(why));
                }
            }
            if let Err(e) = self.hold_lock() {
                if let StoreError::Locked(why) = &e {
                    // Another server serves this database: this one never will.
                    self.health.set_fatal(why.clone());
                }
                return Err(e);
            }
            let conn = open(&self.path)?;
            let database = FileId::of(&self.path)?.ok_or_else(|| {
                StoreError::Unavailable(format!("{} vanished as it opened", self.path.display()))
            })?;
            self.files = Some(StoreFiles::read(&self.path, database));
            self.conn = Some(conn);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("no connection".into()))
    }

    /// Takes `<database>.lock`, or checks that the one held is still the file at that path.
    fn hold_lock(&mut self) -> Result<(), StoreError> {
        if self.lock.as_ref().is_some_and(|lock| lock.still_at_path()) {
            return Ok(());
        }
        if self.lock.is_some() {
            tracing::warn!(
                database = %self.path.display(),
                "the serving lock file was removed or replaced; taking it again"
            );
        }
        self.lock = None;
        self.lock = Some(ServingLock::take(&self.path)?);
        Ok(())
    }

    /// The database under the writer is gone or another one took its place: everything is
    /// refused from now on, until a restart.
    fn lost(&mut self, why: String) -> StoreError {
        let message = format!(
            "{why}; deliveries are refused until labelhook is restarted (what it acknowledged \
             before went with the old file)"
        );
        self.health.set_fatal(message.clone());
        self.conn = None;
        StoreError::Unavailable(message)
    }

    /// Commits one batch and answers every request in it. On failure nothing was committed
    /// and everyone in the batch is told so.
    fn commit(&mut self, batch: Vec<Request>) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        match self.write(&batch) {
            Ok(results) => {
                crate::telemetry::record_commit("sqlite", started.elapsed(), batch.len());
                let mut new_work = false;
                let mut stored = false;
                for (request, result) in batch.into_iter().zip(results) {
                    new_work |= match &result {
                        Ok(Output::Accepted(a)) => !a.duplicate,
                        Ok(Output::Replayed(outcome)) => outcome.replayed > 0,
                        _ => false,
                    };
                    if let (Op::Accept(delivery), Ok(Output::Accepted(a))) = (request.op, &result) {
                        stored = true;
                        // A duplicate's blob is dropped (and removed); a new one is kept.
                        if let (false, IncomingBody::Staged(blob)) = (a.duplicate, delivery.body) {
                            blob.keep();
                        }
                    }
                    let _ = request.reply.send(result);
                }
                self.health.committed(stored);
                if new_work {
                    // One permit is kept even when the dispatcher is busy: no wake-up is lost.
                    self.work.notify_one();
                }
                Ok(())
            }
            Err(e) => {
                // A connection still open means the batch reached the database.
                self.reached = self.conn.is_some();
                // Start from a fresh connection next time: the file may have come back.
                self.conn = None;
                let failure = match e {
                    StoreError::Unavailable(_) => e,
                    other => StoreError::Unavailable(other.to_string()),
                };
                self.refuse(batch, &failure);
                Err(failure)
            }
        }
    }

    /// Answers `requests` with the store's failure, and logs it (while the store is lost for
    /// good, once in a while rather than once per batch).
    fn refuse(&mut self, requests: Vec<Request>, failure: &StoreError) {
        if requests.is_empty() {
            return;
        }
        let quiet = self.health.fatal().is_some()
            && self
                .fatal_logged
                .is_some_and(|at| at.elapsed() < FATAL_LOG_INTERVAL);
        if !quiet {
            tracing::error!(error = %failure, refused = requests.len(), "store write failed");
            if self.health.fatal().is_some() {
                self.fatal_logged = Some(std::time::Instant::now());
            }
        }
        if self.reached && requests.iter().any(|r| matches!(r.op, Op::Accept(_))) {
            self.health.delivery_failed(&failure.to_string());
        }
        for request in requests {
            let _ = request
                .reply
                .send(Err(StoreError::Unavailable(failure.to_string())));
        }
    }

    /// Runs every op of the batch in one transaction. The outer error means nothing was
    /// committed; an inner error means that op alone was rolled back.
    fn write(&mut self, batch: &[Request]) -> Result<Vec<Result<Output, StoreError>>, StoreError> {
        let any_blob = batch
            .iter()
            .any(|r| matches!(&r.op, Op::Accept(d) if matches!(d.body, IncomingBody::Staged(_))));
        if any_blob {
            // The blob files are fsync'd; their directory entries must be too before a row
            // names them.
            self.blobs.sync_dir()?;
        }
        let blobs = self.blobs.clone();
        // Checked before as well as after: a batch is not written into files already gone.
        self.check_files()?;
        let conn = self.connection()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut results = Vec::with_capacity(batch.len());
        for request in batch {
            let result = if request.op.needs_savepoint() {
                super::ops::in_savepoint(&tx, || request.op.run(&tx, &blobs))?
            } else {
                request.op.run(&tx, &blobs)
            };
            // Some errors (a full disk, an I/O error) make SQLite roll back the whole
            // transaction by itself; the ops after it would then each commit on their own.
            if result.is_err() && tx.is_autocommit() {
                return Err(StoreError::Unavailable(
                    "the database rolled back the batch after an error".to_owned(),
                ));
            }
            results.push(result);
        }
        tx.commit()?;
        self.check_files()?;
        Ok(results)
    }

    /// Before a batch, and after its commit before anyone hears of it: are the database's files
    /// still the ones at its path? A commit into a file that was unlinked or replaced will not
    /// survive.
    fn check_files(&mut self) -> Result<(), StoreError> {
        let Some(files) = self.files.as_mut() else {
            return Ok(());
        };
        match files.check(&self.path) {
            Ok(()) => {}
            Err(super::files::Changed::Database(why)) => return Err(self.lost(why)),
            Err(super::files::Changed::Log(why)) => {
                // The database file is still ours: copy the log's commits into it, so what was
                // acknowledged before survives, then stop acknowledging.
                if let Some(conn) = &self.conn {
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(FULL)", [], |_| Ok(())) {
                        tracing::error!(error = %e, "could not save the removed log's commits");
                    }
                }
                return Err(self.lost(why));
            }
        }
        match self.hold_lock() {
            Err(StoreError::Locked(why)) => Err(self.lost(why)),
            other => other,
        }
    }
}

/// Opens (creating it and its directory when missing) and migrates the database.
fn open(path: &std::path::Path) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", dir.display())))?;
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let unavailable = |e: rusqlite::Error| StoreError::Unavailable(e.to_string());
    let mut conn = Connection::open_with_flags(path, flags).map_err(unavailable)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(unavailable)?;
    // A new database gives pages freed by retention back to the file system, step by step
    // (`incremental_vacuum`). This can only be chosen before the first table exists; a database
    // made by an earlier version keeps reusing its free pages instead.
    let tables: i64 = conn
        .query_row("SELECT COUNT(*) FROM sqlite_master", [], |row| row.get(0))
        .map_err(unavailable)?;
    if tables == 0 {
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .map_err(unavailable)?;
    }
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(unavailable)?;
    // FULL: in WAL mode every commit fsyncs the log. NORMAL would lose commits on power loss.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(unavailable)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(unavailable)?;
    // Savepoints (one per op) keep their undo pages in memory rather than in a temp file.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(unavailable)?;
    // Checkpoints (copying the WAL into the database file, with its own fsync) are mostly done
    // by the checkpointer thread, not inside the writer's commits where every request waits.
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)
        .map_err(unavailable)?;
    conn.pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES)
        .map_err(unavailable)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// The checkpointer thread: every `CHECKPOINT_INTERVAL`, a passive checkpoint (it never blocks
/// the writer) on a connection of its own, until `stop` says so or is dropped.
pub fn run_checkpointer(path: PathBuf, stop: std::sync::mpsc::Receiver<()>) {
    let mut conn: Option<Connection> = None;
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        stop.recv_timeout(CHECKPOINT_INTERVAL)
    {
        if conn.is_none() && path.exists() {
            conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_WRITE).ok();
        }
        let Some(c) = &conn else { continue };
        if let Err(e) = c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "checkpoint failed; reopening");
            conn = None;
        }
    }
}

/// Applies the migrations not yet applied, under the write lock so two processes starting at
/// once do not both run them.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let applied: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let applied = usize::try_from(applied).unwrap_or(0);
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "database schema version {applied} is newer than this program ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
    }
    tx.commit()?;
    Ok(())
}
