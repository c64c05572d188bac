//! The writer: the only connection that writes, on a thread of its own, and the group commit.
//!
//! Ops queue up on a bounded channel. The writer takes whatever is waiting (up to
//! `commit_batch_max`), runs it in one transaction, commits (one fsync of the WAL), and only
//! then answers each op and applies what it changes to the dispatch state in memory
//! ([`super::queue`]), in the batch's order. Deliveries, verdicts, attempt records and replays
//! all share these commits, so there is never a second writer waiting on SQLite's lock.
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

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, Notify};

use super::blob::BlobDir;
use super::files::{FileId, ServingLock, StoreFiles};
use super::health::Health;
use super::ops::{Ctx, Done, Effects, Op};
use super::queue::MemQueue;
use crate::store::outage::Outage;
use crate::store::StoreError;

/// Schema versions, applied in order; `PRAGMA user_version` records how many ran.
pub(super) const MIGRATIONS: [&str; 7] = [
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_event.sql"),
    include_str!("migrations/0003_body_pruned.sql"),
    include_str!("migrations/0004_request_id.sql"),
    include_str!("migrations/0005_unpruned_bodies.sql"),
    include_str!("migrations/0006_append_only.sql"),
    include_str!("migrations/0007_settled_verdicts.sql"),
];
/// How long a batch waits for SQLite's lock held by another process (the CLI's replay or prune,
/// which are short; or something outside that should not be there). The deliveries in that batch
/// wait this long before their 503, so it is kept to a couple of seconds.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(2);
/// Prepared statements kept per connection; the writer uses about twenty.
const STATEMENT_CACHE: usize = 64;
/// SQLite's page cache for the writer, in KiB (negative `cache_size`): the dedup index and the
/// entities are written at random places, and a cache that holds their pages spares a read per
/// insert. SQLite's default is 2 MiB.
const PAGE_CACHE_KIB: i64 = 16 * 1024;
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

pub enum WriteRequest {
    Write(Op),
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
    /// What the log says of failed writes: once when they start, a reminder now and then, once
    /// when they end.
    pub outage: Outage,
    /// Whether the last failed batch got as far as an open database. A batch refused because the store
    /// cannot be reached says nothing `/readyz`'s own probe will not find out; one refused by
    /// the database itself (a full disk, an I/O error) must hold readiness down.
    pub reached: bool,
    /// The dispatch state, rebuilt from the database when it is first opened and changed after
    /// each commit.
    pub queue: Arc<std::sync::Mutex<MemQueue>>,
    /// Whether the dispatch state has been read from the database yet.
    pub rebuilt: bool,
    /// SQLite's `data_version` as the writer's connection last read it: it moves when another
    /// connection (the CLI's replay or backfill) commits, and then the batch first reads what
    /// that process appended.
    pub data_version: Option<i64>,
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
        // The dispatch state is read before anyone is told the store is open.
        let opened = match self
            .connection()
            .map(|_| ())
            .and_then(|()| self.rebuild_once())
        {
            Ok(()) => true,
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
        // Ops taken off the channel, not yet committed: the dispatcher's go first, so that a
        // flood of deliveries never starves the handling of the ones already stored.
        let mut waiting: VecDeque<Op> = VecDeque::new();
        let mut close = None;
        while close.is_none() || !waiting.is_empty() {
            if waiting.is_empty() {
                let Some(first) = rx.blocking_recv() else {
                    break;
                };
                match first {
                    WriteRequest::Write(op) => waiting.push_back(op),
                    WriteRequest::Close(done) => close = Some(done),
                }
            }
            // Whatever is already waiting joins this commit; a few batches' worth are looked at
            // so that the dispatcher's ops behind deliveries are found.
            take_waiting(
                &mut rx,
                &mut waiting,
                &mut close,
                self.batch_max * LOOKAHEAD_BATCHES,
            );
            let batch = self.next_batch(&mut waiting);
            if batch.is_empty() {
                continue;
            }
            if let Err(failure) = self.commit(batch) {
                // What waits behind a failed batch would wait as long again for the same
                // answer, so it gets it now (senders retry; the dispatcher polls again).
                take_waiting(&mut rx, &mut waiting, &mut close, usize::MAX);
                let refused: Vec<Op> = waiting.drain(..).collect();
                self.refuse(refused, &failure);
            }
            if self.lock_queue().is_some_and(|q| q.has_gaps()) {
                // Another process stored deliveries between this one's: read them now.
                waiting.push_front(Op::CatchUp {
                    now: crate::delivery::now_millis(),
                    reply: None,
                });
            }
        }
        self.closed(rx, close);
    }

    /// After the last batch: whatever raced in behind the close is refused, not lost (senders
    /// retry); the connection goes, and whoever asked for the close is told.
    fn closed(&mut self, mut rx: mpsc::Receiver<WriteRequest>, close: Option<oneshot::Sender<()>>) {
        rx.close();
        let closing = StoreError::unavailable("store is shutting down");
        while let Ok(late) = rx.try_recv() {
            if let WriteRequest::Write(op) = late {
                op.refuse(&closing);
            }
        }
        self.conn = None;
        if let Some(done) = close {
            let _ = done.send(());
        }
    }

    fn lock_queue(&self) -> Option<std::sync::MutexGuard<'_, MemQueue>> {
        self.queue.lock().ok()
    }

    /// Up to `batch_max` ops for the next commit: the dispatcher's first, then deliveries in
    /// arrival order.
    fn next_batch(&self, waiting: &mut VecDeque<Op>) -> Vec<Op> {
        let (first, rest): (Vec<Op>, Vec<Op>) = waiting.drain(..).partition(Op::is_dispatch);
        let mut ordered: VecDeque<Op> = first.into_iter().chain(rest).collect();
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
            return Err(StoreError::unavailable(why));
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
                StoreError::unavailable(format!("{} vanished as it opened", self.path.display()))
            })?;
            self.files = Some(StoreFiles::read(&self.path, database));
            self.conn = Some(conn);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::unavailable("no connection"))
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
        StoreError::unavailable(message)
    }

    /// Commits one batch, then answers every op in it and applies what they change to the
    /// dispatch state, in order. On failure nothing was committed, nothing changes, and every op
    /// is told so.
    fn commit(&mut self, batch: Vec<Op>) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let ops = batch.len();
        let accepts = batch.iter().any(Op::is_accept);
        let (dones, written) = self.write(batch);
        match written {
            Ok(()) => {
                crate::telemetry::record_commit("sqlite", started.elapsed(), ops);
                self.outage.succeeded();
                let queue = self.queue.clone();
                let Ok(mut queue) = queue.lock() else {
                    return Err(StoreError::Corrupt("dispatch state poisoned".into()));
                };
                let mut effects = Effects::default();
                for done in dones {
                    let e = done.finish(Ok(&mut queue));
                    effects.new_work |= e.new_work;
                    effects.stored |= e.stored;
                }
                self.health.committed(effects.stored);
                if effects.new_work {
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
                self.data_version = None;
                let failure = e.again();
                self.log_refusal(ops, &failure);
                if self.reached && accepts {
                    self.health.delivery_failed(&failure.to_string());
                }
                for done in dones {
                    done.finish(Err(&failure));
                }
                Err(failure)
            }
        }
    }

    /// Answers `ops` with the store's failure, and logs it.
    fn refuse(&mut self, ops: Vec<Op>, failure: &StoreError) {
        if ops.is_empty() {
            return;
        }
        self.log_refusal(ops.len(), failure);
        if self.reached && ops.iter().any(Op::is_accept) {
            self.health.delivery_failed(&failure.to_string());
        }
        for op in ops {
            op.refuse(failure);
        }
    }

    /// Tells of a refusal (see [`Outage`]), and has every connection of this process to the
    /// database closed before its next use: the fault may clear, and a connection opened during
    /// it can keep it alive (a read-only disk made writable again).
    fn log_refusal(&mut self, refused: usize, failure: &StoreError) {
        self.outage.failed(failure, refused);
        self.health.drop_connections();
    }

    /// Runs every op of the batch in one transaction and commits it. Every op becomes a
    /// [`Done`], whatever happens: those not run (the batch failed before them) answer with the
    /// failure too.
    fn write(&mut self, batch: Vec<Op>) -> (Vec<Done>, Result<(), StoreError>) {
        let mut dones = Vec::with_capacity(batch.len());
        let mut ops = batch.into_iter();
        let written = self.write_ops(&mut ops, &mut dones);
        if let Err(failure) = &written {
            for op in ops {
                op.refuse(failure);
            }
        }
        (dones, written)
    }

    fn write_ops(
        &mut self,
        ops: &mut std::vec::IntoIter<Op>,
        dones: &mut Vec<Done>,
    ) -> Result<(), StoreError> {
        if ops.as_slice().iter().any(Op::is_staged_accept) {
            // The blob files are fsync'd; their directory entries must be too before a row
            // names them.
            self.blobs.sync_dir()?;
        }
        // Checked before as well as after: a batch is not written into files already gone.
        self.check_files()?;
        let blobs = self.blobs.clone();
        let queue = self.queue.clone();
        self.connection()?;
        self.rebuild_once()?;
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| StoreError::unavailable("no connection"))?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA data_version", [], |row| row.get(0))?;
        let others_wrote = self.data_version.replace(version) != Some(version);
        {
            let state = queue
                .lock()
                .map_err(|_| StoreError::Corrupt("dispatch state poisoned".into()))?;
            let ctx = Ctx {
                conn: &tx,
                blobs: &blobs,
                queue: &state,
            };
            if others_wrote {
                let now = crate::delivery::now_millis();
                dones.push(Op::CatchUp { now, reply: None }.run(&ctx));
            }
            for op in ops.by_ref() {
                dones.push(op.run(&ctx));
                // Some errors (a full disk, an I/O error) make SQLite roll back the whole
                // transaction by itself; the ops after it would then each commit on their own.
                if tx.is_autocommit() {
                    return Err(StoreError::unavailable(
                        "the database rolled back the batch after an error".to_owned(),
                    ));
                }
            }
        }
        tx.commit()?;
        self.check_files()
    }

    /// Reads the dispatch state from the database, the first time it can be opened.
    fn rebuild_once(&mut self) -> Result<(), StoreError> {
        if self.rebuilt {
            return Ok(());
        }
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| StoreError::unavailable("no connection"))?;
        let rebuilt = super::recover::rebuild(conn)?;
        let (gated, waiting) = (rebuilt.depth(), rebuilt.known_seq);
        if let Ok(mut queue) = self.queue.lock() {
            *queue = rebuilt;
        }
        self.rebuilt = true;
        if gated > 0 {
            tracing::info!(
                unfinished = gated,
                last_seq = waiting,
                "taking up the work of a previous run"
            );
            self.work.notify_one();
        }
        Ok(())
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
            .map_err(|e| StoreError::unavailable(format!("{}: {e}", dir.display())))?;
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let unavailable = |e: rusqlite::Error| StoreError::unavailable(e.to_string());
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
    conn.pragma_update(None, "cache_size", -PAGE_CACHE_KIB)
        .map_err(unavailable)?;
    // Savepoints keep their undo pages in memory rather than in a temp file.
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
/// the writer) on a connection of its own, until `stop` says so or is dropped. Its connection
/// is closed and opened again when the writer asks for it ([`Health::drop_connections`]).
pub fn run_checkpointer(path: PathBuf, health: &Health, stop: std::sync::mpsc::Receiver<()>) {
    let mut conn: Option<(u64, Connection)> = None;
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        stop.recv_timeout(CHECKPOINT_INTERVAL)
    {
        let generation = health.generation();
        if conn
            .as_ref()
            .is_some_and(|(opened, _)| *opened != generation)
        {
            conn = None;
        }
        if conn.is_none() && path.exists() {
            conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_WRITE)
                .ok()
                .map(|c| (generation, c));
        }
        let Some((_, c)) = &conn else { continue };
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

/// Moves up to `most` ops queued on the channel into `waiting`, stopping at a close (noted in
/// `close`).
fn take_waiting(
    rx: &mut mpsc::Receiver<WriteRequest>,
    waiting: &mut VecDeque<Op>,
    close: &mut Option<oneshot::Sender<()>>,
    most: usize,
) {
    while close.is_none() && waiting.len() < most {
        match rx.try_recv() {
            Ok(WriteRequest::Write(op)) => waiting.push_back(op),
            Ok(WriteRequest::Close(done)) => *close = Some(done),
            Err(_) => break,
        }
    }
}
