//! The embedded store: one SQLite file in WAL mode, `synchronous = FULL`.
//!
//! Reads (the CLI, `events list`, the dispatcher looking for new deliveries) use a small pool;
//! every write goes through the one writer task in [`writer`], which commits in batches and
//! answers each caller after its batch is on disk. The writes themselves are in [`ops`].
//!
//! One server per database file: SQLite is for a single replica (use PostgreSQL for several).

mod ops;
mod writer;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row};
use tokio::sync::{mpsc, oneshot, Mutex, Notify};

use self::ops::{Op, Output};
use self::writer::{Request, WriteRequest, Writer};
use super::{
    format_millis, Accepted, AttemptRecord, AttemptResult, BlobDir, Claimed, DeliveryDetail,
    DeliverySummary, GateRequest, HandlerRun, ListQuery, Payload, ReplayOutcome, ReplayTarget,
    Status, Store, StoreError, Ungated,
};
use crate::config::{sqlite_path, StoreSettings};
use crate::ingress::VerifiedDelivery;
use crate::ordering::Verdict;

/// How long a reader waits for a lock (the writer checkpointing, another process).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections for readers.
const POOL_CONNECTIONS: u32 = 4;

pub struct SqliteStore {
    path: PathBuf,
    /// Held by `serve` for its lifetime (see `lock_for_serving`).
    serving_lock: std::sync::Mutex<Option<std::fs::File>>,
    writer: mpsc::Sender<WriteRequest>,
    pool: SqlitePool,
    blobs: BlobDir,
    work: Arc<Notify>,
    writer_task: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Dropping it stops the checkpointer thread.
    checkpointer: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

impl SqliteStore {
    /// Starts the writer. Never fails for an unreachable database: that is reported by
    /// `check_ready` and `accept` until it can be opened.
    pub async fn open(settings: &StoreSettings, queue_capacity: usize) -> Result<Self, StoreError> {
        let path = sqlite_path(&settings.url)
            .ok_or_else(|| StoreError::UnsupportedUrl(settings.url.clone()))?;
        let options = connect_options(&path);
        // One blob directory per database, so that two databases side by side never sweep
        // each other's files.
        let blobs = BlobDir::new(PathBuf::from(format!("{}.blobs", path.display())));
        // Readers are lazy so that a missing database does not stop the service from starting.
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_CONNECTIONS)
            .connect_lazy_with(options.clone());
        let batch_max = settings.commit_batch_max.max(1);
        let (tx, rx) = mpsc::channel(queue_capacity.max(1));
        let work = Arc::new(Notify::new());
        let (stop_checkpoints, checkpoint_stop) = std::sync::mpsc::channel();
        let checkpoint_path = path.clone();
        std::thread::Builder::new()
            .name("lh-checkpoint".into())
            .spawn(move || writer::run_checkpointer(checkpoint_path, checkpoint_stop))?;
        let writer = Writer {
            path: path.clone(),
            conn: None,
            batch_max,
            blobs: blobs.clone(),
            work: work.clone(),
        };
        // The writer opens (and migrates) right away so that readers find the schema.
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = std::thread::Builder::new()
            .name("lh-store-writer".into())
            .spawn(move || writer.run(rx, ready_tx))?;
        let _ = ready_rx.await;
        Ok(Self {
            path,
            serving_lock: std::sync::Mutex::new(None),
            writer: tx,
            pool,
            blobs,
            work,
            writer_task: Mutex::new(Some(task)),
            checkpointer: std::sync::Mutex::new(Some(stop_checkpoints)),
        })
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
}

fn connect_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL: in WAL mode every commit fsyncs the log. NORMAL would lose commits on power loss.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true)
        .disable_statement_logging()
}

/// An op's output was not the kind its caller asked for: a bug, reported rather than panicked.
fn unexpected(output: Output) -> StoreError {
    StoreError::Corrupt(format!("unexpected writer output {output:?}"))
}

/// The body columns of a row (`inline_body` from `bodies`, `blob_name`, `body_len`).
fn stored_body(row: &SqliteRow, blobs: &BlobDir) -> Result<Payload, StoreError> {
    Ok(match row.try_get::<Option<String>, _>("blob_name")? {
        Some(name) => Payload::File {
            path: blobs.resolve(&name),
            len: row.try_get::<i64, _>("body_len")?.max(0) as u64,
        },
        None => Payload::Inline(Bytes::from(
            row.try_get::<Option<Vec<u8>>, _>("inline_body")?
                .unwrap_or_default(),
        )),
    })
}

const SUMMARY_COLUMNS: &str =
    "d.seq AS seq, delivery_id, endpoint, topic, entity, version, status, \
    received_at, body_len, id_conflict";

fn summary(row: &SqliteRow) -> Result<DeliverySummary, StoreError> {
    let version: Option<i64> = row.try_get("version")?;
    Ok(DeliverySummary {
        seq: row.try_get("seq")?,
        delivery_id: row.try_get("delivery_id")?,
        endpoint: row.try_get("endpoint")?,
        topic: row.try_get("topic")?,
        entity: row.try_get("entity")?,
        version: version.map(|v| crate::ordering::Version::from_nanos(v).to_string()),
        status: row.try_get("status")?,
        received_at: format_millis(row.try_get("received_at")?),
        body_len: row.try_get::<i64, _>("body_len")?.max(0) as u64,
        id_conflict: row.try_get("id_conflict")?,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn accept(&self, delivery: VerifiedDelivery) -> Result<Accepted, StoreError> {
        match self.write(Op::Accept(delivery.into_parts()), false).await? {
            Output::Accepted(accepted) => Ok(accepted),
            other => Err(unexpected(other)),
        }
    }

    fn blob_dir(&self) -> &BlobDir {
        &self.blobs
    }

    async fn check_ready(&self) -> Result<(), StoreError> {
        match self.write(Op::Probe, false).await? {
            Output::Probed => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<DeliverySummary>, StoreError> {
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS} FROM deliveries d \
             WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR topic = ?2) \
             ORDER BY seq DESC LIMIT ?3"
        );
        let rows = sqlx::query(&sql)
            .bind(query.status.map(Status::as_str))
            .bind(&query.topic)
            .bind(i64::from(query.limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(summary).collect()
    }

    async fn show(&self, delivery_id: &str) -> Result<Vec<DeliveryDetail>, StoreError> {
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS}, client_ip, headers, b.body AS inline_body, blob_name, fresh, \
             parse_error FROM deliveries d LEFT JOIN bodies b ON b.seq = d.seq \
             WHERE delivery_id = ?1 ORDER BY d.seq"
        );
        let rows = sqlx::query(&sql)
            .bind(delivery_id)
            .fetch_all(&self.pool)
            .await?;
        let mut details = Vec::with_capacity(rows.len());
        for row in &rows {
            let summary = summary(row)?;
            let headers: String = row.try_get("headers")?;
            let headers = serde_json::from_str(&headers)
                .map_err(|e| StoreError::Corrupt(format!("headers: {e}")))?;
            let body = stored_body(row, &self.blobs)?;
            let handlers = sqlx::query(
                "SELECT handler, state, attempts, next_at, last_error FROM handler_runs \
                 WHERE delivery_seq = ?1 ORDER BY handler",
            )
            .bind(summary.seq)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(HandlerRun {
                    handler: r.try_get("handler")?,
                    state: r.try_get("state")?,
                    attempts: r.try_get::<i64, _>("attempts")?.max(0) as u32,
                    next_attempt_at: r.try_get::<Option<i64>, _>("next_at")?.map(format_millis),
                    last_error: r.try_get("last_error")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
            let attempts = sqlx::query(
                "SELECT handler, attempt, started_at, finished_at, outcome, error FROM attempts \
                 WHERE delivery_seq = ?1 ORDER BY started_at, handler",
            )
            .bind(summary.seq)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(AttemptRecord {
                    handler: r.try_get("handler")?,
                    attempt: r.try_get::<i64, _>("attempt")?.max(0) as u32,
                    started_at: format_millis(r.try_get("started_at")?),
                    finished_at: format_millis(r.try_get("finished_at")?),
                    outcome: r.try_get("outcome")?,
                    error: r.try_get("error")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
            details.push(DeliveryDetail {
                client_ip: row.try_get("client_ip")?,
                headers,
                body,
                fresh: row.try_get("fresh")?,
                parse_error: row.try_get("parse_error")?,
                handlers,
                attempts,
                summary,
            });
        }
        Ok(details)
    }

    async fn replay(&self, target: &ReplayTarget) -> Result<ReplayOutcome, StoreError> {
        match self.write(Op::Replay(target.clone()), true).await? {
            Output::Replayed(outcome) => Ok(outcome),
            other => Err(unexpected(other)),
        }
    }

    async fn sweep_orphan_blobs(&self) -> Result<usize, StoreError> {
        let rows = sqlx::query("SELECT blob_name FROM deliveries WHERE blob_name IS NOT NULL")
            .fetch_all(&self.pool)
            .await?;
        let referenced: HashSet<String> = rows
            .iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok())
            .collect();
        Ok(self.blobs.sweep_orphans(&referenced)?)
    }

    async fn next_ungated(&self, limit: u32) -> Result<Vec<Ungated>, StoreError> {
        let rows = sqlx::query(
            "SELECT d.seq, topic, b.body AS inline_body, blob_name, body_len \
             FROM deliveries d LEFT JOIN bodies b ON b.seq = d.seq \
             WHERE gated = 0 ORDER BY d.seq LIMIT ?1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Ungated {
                    seq: row.try_get("seq")?,
                    topic: row.try_get("topic")?,
                    body: stored_body(row, &self.blobs)?,
                })
            })
            .collect()
    }

    async fn record_gates(
        &self,
        gates: Vec<GateRequest>,
    ) -> Result<Vec<Option<Verdict>>, StoreError> {
        match self.write(Op::Gate(gates), true).await? {
            Output::Gated(verdicts) => Ok(verdicts),
            other => Err(unexpected(other)),
        }
    }

    async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<Claimed>, StoreError> {
        let op = Op::Claim {
            owner: owner.to_owned(),
            lease_ms: i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2),
            limit,
        };
        match self.write(op, true).await? {
            Output::Claimed(claimed) => Ok(claimed),
            other => Err(unexpected(other)),
        }
    }

    async fn record_attempts(
        &self,
        seq: i64,
        owner: &str,
        results: &[AttemptResult],
    ) -> Result<Status, StoreError> {
        let op = Op::Record {
            seq,
            owner: owner.to_owned(),
            results: results.to_vec(),
        };
        match self.write(op, true).await? {
            Output::Recorded(status) => Ok(status),
            other => Err(unexpected(other)),
        }
    }

    async fn lock_for_serving(&self) -> Result<(), StoreError> {
        let lock_path = PathBuf::from(format!("{}.lock", self.path.display()));
        if let Some(dir) = lock_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(format!(
                    "another labelhook server is using {} (one server per SQLite database; \
                     use PostgreSQL for several)",
                    self.path.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        if let Ok(mut held) = self.serving_lock.lock() {
            *held = Some(file);
        }
        Ok(())
    }

    async fn release_stale_leases(&self) -> Result<u64, StoreError> {
        match self.write(Op::ReleaseLeases, true).await? {
            Output::Released(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    async fn queue_depth(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM deliveries WHERE due_at IS NOT NULL) \
                  + (SELECT COUNT(*) FROM deliveries WHERE waiting = 1) \
                  + (SELECT COUNT(*) FROM deliveries WHERE gated = 0)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }

    async fn wait_for_work(&self, max_wait: Duration) {
        let _ = tokio::time::timeout(max_wait, self.work.notified()).await;
    }

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
        self.pool.close().await;
    }
}
