//! The embedded store: one SQLite file in WAL mode, `synchronous = FULL`.
//!
//! All deliveries are written by one writer task that owns one connection. Requests queue up
//! on a bounded channel; the writer takes whatever is waiting (up to `commit_batch_max`), writes
//! it in one transaction and wakes every waiting request after the commit, so many requests
//! share one fsync (group commit) and none is answered before its own commit.
//!
//! When the database cannot be opened or written (directory missing, read-only, disk full),
//! the writer answers `Unavailable` and tries again with the next request: the service keeps
//! running and recovers by itself.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Executor, Row};
use tokio::sync::{mpsc, oneshot, Mutex, Notify};

use super::{
    format_millis, now_millis, Accepted, AttemptOutcome, AttemptRecord, AttemptResult, BlobDir,
    Claimed, DeliveryDetail, DeliverySummary, DueRun, GateRequest, HandlerRun, IncomingBody,
    ListQuery, NewDelivery, ReplayTarget, Status, Store, StoreError, StoredBody, Ungated,
};
use crate::config::{sqlite_path, StoreSettings};
use crate::ingress::VerifiedDelivery;
use crate::ordering::{self, Applied, Change, Verdict, Version};

/// Schema versions, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: [&str; 1] = [include_str!("migrations/sqlite/0001_init.sql")];
/// How long a connection waits for another writer (the CLI, the dispatcher) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections for readers and dispatch bookkeeping.
const POOL_CONNECTIONS: u32 = 4;

enum WriteRequest {
    Accept(NewDelivery, oneshot::Sender<Result<Accepted, StoreError>>),
    Probe(oneshot::Sender<Result<(), StoreError>>),
    Close(oneshot::Sender<()>),
}

pub struct SqliteStore {
    writer: mpsc::Sender<WriteRequest>,
    pool: SqlitePool,
    blobs: BlobDir,
    work: Arc<Notify>,
    writer_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl SqliteStore {
    /// Starts the writer. Never fails for an unreachable database: that is reported by
    /// `check_ready` and `accept` until it can be opened.
    pub async fn open(settings: &StoreSettings) -> Result<Self, StoreError> {
        let path = sqlite_path(&settings.url)
            .ok_or_else(|| StoreError::UnsupportedUrl(settings.url.clone()))?;
        let options = connect_options(&path);
        let blobs = BlobDir::new(
            path.parent()
                .unwrap_or_else(|| Path::new("."))
                .join("blobs"),
        );
        // Readers are lazy so that a missing database does not stop the service from starting.
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_CONNECTIONS)
            .connect_lazy_with(options.clone());
        let (tx, rx) = mpsc::channel(settings.commit_batch_max.max(1) * 16);
        let work = Arc::new(Notify::new());
        let writer = Writer {
            path,
            options,
            conn: None,
            batch_max: settings.commit_batch_max.max(1),
            blobs: blobs.clone(),
            work: work.clone(),
        };
        // The writer opens (and migrates) right away so that readers find the schema.
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(writer.run(rx, ready_tx));
        let _ = ready_rx.await;
        Ok(Self {
            writer: tx,
            pool,
            blobs,
            work,
            writer_task: Mutex::new(Some(task)),
        })
    }

    async fn sweep_blobs(&self) -> Result<usize, StoreError> {
        let rows = sqlx::query("SELECT body_path FROM deliveries WHERE body_path IS NOT NULL")
            .fetch_all(&self.pool)
            .await?;
        let referenced: HashSet<PathBuf> = rows
            .iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok())
            .map(PathBuf::from)
            .collect();
        Ok(self.blobs.sweep_orphans(&referenced)?)
    }

    async fn send(&self, request: WriteRequest) -> Result<(), StoreError> {
        self.writer.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StoreError::Busy,
            mpsc::error::TrySendError::Closed(_) => {
                StoreError::Unavailable("store is shutting down".into())
            }
        })
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

struct Writer {
    path: PathBuf,
    options: SqliteConnectOptions,
    conn: Option<SqliteConnection>,
    batch_max: usize,
    blobs: BlobDir,
    work: Arc<Notify>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<WriteRequest>, ready: oneshot::Sender<()>) {
        if let Err(e) = self.connection().await {
            tracing::warn!(error = %e, "store not available yet; will retry");
        }
        let _ = ready.send(());
        let mut batch = Vec::with_capacity(self.batch_max);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < self.batch_max {
                match rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let close = self.commit(&mut batch).await;
            if let Some(done) = close {
                rx.close();
                // Whatever raced in behind the close is refused, not lost: senders retry.
                while let Ok(late) = rx.try_recv() {
                    refuse(late, "store is shutting down");
                }
                let _ = done.send(());
                break;
            }
        }
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
    }

    async fn connection(&mut self) -> Result<&mut SqliteConnection, StoreError> {
        if self.conn.is_none() {
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StoreError::Unavailable(format!("{}: {e}", dir.display())))?;
            }
            let mut conn = self
                .options
                .connect()
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            migrate(&mut conn).await?;
            self.conn = Some(conn);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("no connection".into()))
    }

    /// Writes one batch and answers it. Returns the closer's reply channel when asked to stop.
    async fn commit(&mut self, batch: &mut Vec<WriteRequest>) -> Option<oneshot::Sender<()>> {
        let mut close = None;
        let mut accepts = Vec::new();
        let mut probes = Vec::new();
        for request in batch.drain(..) {
            match request {
                WriteRequest::Accept(d, reply) => accepts.push((d, reply)),
                WriteRequest::Probe(reply) => probes.push(reply),
                WriteRequest::Close(reply) => close = Some(reply),
            }
        }
        if accepts.is_empty() && probes.is_empty() {
            return close;
        }
        let deliveries: Vec<&NewDelivery> = accepts.iter().map(|(d, _)| d).collect();
        let result = self.write(&deliveries).await;
        if let Err(e) = &result {
            tracing::error!(error = %e, batch = accepts.len(), "store commit failed");
            // Start from a fresh connection next time: the file may have come back.
            if let Some(conn) = self.conn.take() {
                let _ = conn.close().await;
            }
        }
        match result {
            Ok(outcomes) => {
                let any_new = outcomes.iter().any(|a| !a.duplicate);
                for ((delivery, reply), outcome) in accepts.into_iter().zip(outcomes) {
                    if let IncomingBody::Blob(blob) = delivery.body {
                        if !outcome.duplicate {
                            blob.keep();
                        }
                    }
                    let _ = reply.send(Ok(outcome));
                }
                for reply in probes {
                    let _ = reply.send(Ok(()));
                }
                if any_new {
                    // One permit is kept even when the dispatcher is busy, so no wake-up is lost.
                    self.work.notify_one();
                }
            }
            Err(e) => {
                let message = e.to_string();
                for (_, reply) in accepts {
                    let _ = reply.send(Err(StoreError::Unavailable(message.clone())));
                }
                for reply in probes {
                    let _ = reply.send(Err(StoreError::Unavailable(message.clone())));
                }
            }
        }
        close
    }

    // Boxed: sqlx's executor bounds defeat the compiler's `Send` inference for this future
    // when it is awaited inside the spawned writer task.
    fn write<'a>(
        &'a mut self,
        deliveries: &'a [&'a NewDelivery],
    ) -> BoxFuture<'a, Result<Vec<Accepted>, StoreError>> {
        Box::pin(async move {
            let mut any_blob = false;
            for d in deliveries {
                any_blob |= matches!(d.body, IncomingBody::Blob(_));
            }
            if any_blob {
                // The blob files are fsync'd; their directory entries must be too before a row
                // names them.
                self.blobs.sync_dir()?;
            }
            let conn = self.connection().await?;
            let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
            let mut outcomes = Vec::with_capacity(deliveries.len());
            for d in deliveries {
                outcomes.push(insert(&mut tx, d).await?);
            }
            touch_probe(&mut tx).await?;
            tx.commit().await?;
            Ok(outcomes)
        })
    }
}

fn touch_probe(conn: &mut SqliteConnection) -> BoxFuture<'_, Result<(), StoreError>> {
    Box::pin(async move {
        sqlx::query("UPDATE probe SET at = ?1 WHERE id = 1")
            .bind(now_millis())
            .execute(&mut *conn)
            .await?;
        Ok(())
    })
}

fn refuse(request: WriteRequest, why: &str) {
    match request {
        WriteRequest::Accept(_, reply) => {
            let _ = reply.send(Err(StoreError::Unavailable(why.to_owned())));
        }
        WriteRequest::Probe(reply) => {
            let _ = reply.send(Err(StoreError::Unavailable(why.to_owned())));
        }
        WriteRequest::Close(reply) => {
            let _ = reply.send(());
        }
    }
}

fn insert<'a>(
    conn: &'a mut SqliteConnection,
    d: &'a NewDelivery,
) -> BoxFuture<'a, Result<Accepted, StoreError>> {
    Box::pin(async move {
        let headers = serde_json::to_string(&d.headers)
            .map_err(|e| StoreError::Corrupt(format!("headers: {e}")))?;
        let (body, body_path, body_len): (Option<&[u8]>, Option<String>, i64) = match &d.body {
            IncomingBody::Inline(bytes) => (Some(bytes), None, bytes.len() as i64),
            IncomingBody::Blob(blob) => (
                None,
                Some(blob.path().display().to_string()),
                blob.len() as i64,
            ),
        };
        // One statement: the dedup (unique key), the id-conflict flag and the row.
        let row = sqlx::query(
        "INSERT INTO deliveries (delivery_id, body_sha256, id_conflict, endpoint, topic, \
             client_ip, headers, body, body_path, body_len, received_at, status, due_at) \
         SELECT ?1, ?2, EXISTS (SELECT 1 FROM deliveries WHERE delivery_id = ?1 AND body_sha256 <> ?2), \
             ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?10 WHERE true \
         ON CONFLICT (delivery_id, body_sha256) DO NOTHING \
         RETURNING seq, id_conflict",
    )
    .bind(&d.delivery_id)
    .bind(&d.body_sha256[..])
    .bind(&d.endpoint)
    .bind(&d.topic)
    .bind(d.client_ip.to_string())
    .bind(headers)
    .bind(body)
    .bind(body_path)
    .bind(body_len)
    .bind(d.received_at)
    .bind(d.status.as_str())
    .fetch_optional(&mut *conn)
    .await?;
        match row {
            Some(row) => Ok(Accepted {
                seq: row.try_get("seq")?,
                duplicate: false,
                id_conflict: row.try_get::<bool, _>("id_conflict")?,
            }),
            None => {
                let seq: i64 = sqlx::query_scalar(
                    "SELECT seq FROM deliveries WHERE delivery_id = ?1 AND body_sha256 = ?2",
                )
                .bind(&d.delivery_id)
                .bind(&d.body_sha256[..])
                .fetch_one(&mut *conn)
                .await?;
                Ok(Accepted {
                    seq,
                    duplicate: true,
                    id_conflict: false,
                })
            }
        }
    })
}

/// Applies the migrations not yet applied, under the write lock so two processes starting at
/// once do not both run them.
fn migrate(conn: &mut SqliteConnection) -> BoxFuture<'_, Result<(), StoreError>> {
    Box::pin(async move {
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let tx_conn: &mut SqliteConnection = &mut tx;
        let applied: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *tx_conn)
            .await?;
        let applied = usize::try_from(applied).unwrap_or(0);
        if applied > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "database schema version {applied} is newer than this program ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
            // Plain strings run as unprepared statements, several per string.
            let version = format!("PRAGMA user_version = {}", i + 1);
            Executor::execute(&mut *tx_conn, *sql).await?;
            Executor::execute(&mut *tx_conn, version.as_str()).await?;
        }
        tx.commit().await?;
        Ok(())
    })
}

/// The body columns of a row (`body`, `body_path`, `body_len`).
fn stored_body(row: &SqliteRow) -> Result<StoredBody, StoreError> {
    Ok(match row.try_get::<Option<String>, _>("body_path")? {
        Some(path) => StoredBody::File {
            path: PathBuf::from(path),
            len: row.try_get::<i64, _>("body_len")?.max(0) as u64,
        },
        None => StoredBody::Inline(Bytes::from(
            row.try_get::<Option<Vec<u8>>, _>("body")?
                .unwrap_or_default(),
        )),
    })
}

const SUMMARY_COLUMNS: &str = "seq, delivery_id, endpoint, topic, entity, version, status, \
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
        let (reply, answer) = oneshot::channel();
        self.send(WriteRequest::Accept(delivery.into_parts(), reply))
            .await?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
    }

    fn blob_dir(&self) -> &BlobDir {
        &self.blobs
    }

    async fn check_ready(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(WriteRequest::Probe(reply)).await?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<DeliverySummary>, StoreError> {
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS} FROM deliveries \
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
            "SELECT {SUMMARY_COLUMNS}, client_ip, headers, body, body_path, fresh, parse_error \
             FROM deliveries WHERE delivery_id = ?1 ORDER BY seq"
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
            let body = stored_body(row)?;
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

    async fn replay(&self, target: &ReplayTarget) -> Result<u64, StoreError> {
        let now = now_millis();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let seqs: Vec<i64> = match target {
            ReplayTarget::DeliveryId(id) => {
                sqlx::query_scalar("SELECT seq FROM deliveries WHERE delivery_id = ?1")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?
            }
            ReplayTarget::Status(status) => {
                sqlx::query_scalar("SELECT seq FROM deliveries WHERE status = ?1")
                    .bind(status.as_str())
                    .fetch_all(&mut *tx)
                    .await?
            }
        };
        for seq in &seqs {
            // Back to the start: gated again (the entity may have moved on meanwhile) and
            // every handler run again with fresh attempts.
            sqlx::query("DELETE FROM handler_runs WHERE delivery_seq = ?1")
                .bind(seq)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE deliveries SET gated = 0, fresh = NULL, lane_pos = NULL, \
                 status = CASE WHEN status = 'unrecognized' THEN status ELSE 'pending' END, \
                 due_at = ?2, lease_owner = NULL, lease_until = NULL WHERE seq = ?1",
            )
            .bind(seq)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(seqs.len() as u64)
    }

    async fn sweep_orphan_blobs(&self) -> Result<usize, StoreError> {
        self.sweep_blobs().await
    }

    async fn next_ungated(&self, limit: u32) -> Result<Vec<Ungated>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, topic, body, body_path, body_len FROM deliveries \
             WHERE gated = 0 ORDER BY seq LIMIT ?1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Ungated {
                    seq: row.try_get("seq")?,
                    topic: row.try_get("topic")?,
                    body: stored_body(row)?,
                })
            })
            .collect()
    }

    async fn record_gate(&self, gate: &GateRequest) -> Result<Verdict, StoreError> {
        let now = now_millis();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let conn: &mut SqliteConnection = &mut tx;
        let (verdict, lane_pos) = match &gate.entity {
            None => (Verdict::Fresh, None),
            Some(entity) => {
                let last = sqlx::query(
                    "SELECT version, change, lane_next FROM entities WHERE entity = ?1",
                )
                .bind(entity)
                .fetch_optional(&mut *conn)
                .await?;
                let (last, lane_pos) = match last {
                    None => (None, 0_i64),
                    Some(row) => {
                        let change: String = row.try_get("change")?;
                        let applied = Applied {
                            version: row
                                .try_get::<Option<i64>, _>("version")?
                                .map(Version::from_nanos),
                            change: Change::parse(&change)
                                .ok_or_else(|| StoreError::Corrupt(format!("change {change:?}")))?,
                        };
                        (Some(applied), row.try_get("lane_next")?)
                    }
                };
                let (verdict, applied) = ordering::decide(last.as_ref(), gate.version, gate.change);
                // A stale event keeps the entity's state but still takes a lane position, so a
                // route that delivers stale events sees them in arrival order too.
                let state = applied.or(last).unwrap_or(Applied {
                    version: gate.version,
                    change: gate.change,
                });
                sqlx::query(
                    "INSERT INTO entities (entity, version, change, lane_next, updated_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5) \
                     ON CONFLICT (entity) DO UPDATE SET version = excluded.version, \
                     change = excluded.change, lane_next = excluded.lane_next, \
                     updated_at = excluded.updated_at",
                )
                .bind(entity)
                .bind(state.version.map(Version::as_nanos))
                .bind(state.change.as_str())
                .bind(lane_pos + 1)
                .bind(now)
                .execute(&mut *conn)
                .await?;
                (verdict, Some(lane_pos))
            }
        };
        let fresh = verdict.is_fresh();
        let handlers = if fresh {
            &gate.handlers_if_fresh
        } else {
            &gate.handlers_if_stale
        };
        let status = if gate.parse_error.is_some() || !gate.recognized {
            Status::Unrecognized
        } else if !fresh {
            Status::Stale
        } else if handlers.is_empty() {
            Status::Delivered
        } else {
            Status::Pending
        };
        for handler in handlers {
            sqlx::query(
                "INSERT INTO handler_runs (delivery_seq, handler, state, attempts, next_at) \
                 VALUES (?1, ?2, 'pending', 0, ?3) ON CONFLICT DO NOTHING",
            )
            .bind(gate.seq)
            .bind(handler)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        }
        sqlx::query(
            "UPDATE deliveries SET gated = 1, entity = ?2, version = ?3, change = ?4, \
             project_id = ?5, fresh = ?6, lane_pos = ?7, parse_error = ?8, status = ?9, \
             due_at = ?10 WHERE seq = ?1",
        )
        .bind(gate.seq)
        .bind(&gate.entity)
        .bind(gate.version.map(Version::as_nanos))
        .bind(gate.change.as_str())
        .bind(&gate.project_id)
        .bind(fresh)
        .bind(lane_pos)
        .bind(&gate.parse_error)
        .bind(status.as_str())
        .bind((!handlers.is_empty()).then_some(now))
        .execute(&mut *conn)
        .await?;
        tx.commit().await?;
        Ok(verdict)
    }

    async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<Claimed>, StoreError> {
        let now = now_millis();
        let lease_until = now + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let conn: &mut SqliteConnection = &mut tx;
        // Lane rule: a delivery waits while anything before it in its entity's lane has work
        // left (running, or waiting for a retry). Different entities never wait for each other.
        let rows = sqlx::query(
            "UPDATE deliveries SET lease_owner = ?1, lease_until = ?2 WHERE seq IN ( \
                 SELECT d.seq FROM deliveries d \
                 WHERE d.gated = 1 AND d.due_at IS NOT NULL AND d.due_at <= ?3 \
                   AND (d.lease_until IS NULL OR d.lease_until < ?3) \
                   AND (d.entity IS NULL OR NOT EXISTS ( \
                       SELECT 1 FROM deliveries e WHERE e.entity = d.entity \
                         AND e.due_at IS NOT NULL AND e.lane_pos < d.lane_pos)) \
                 ORDER BY d.due_at, d.seq LIMIT ?4) \
             RETURNING seq, delivery_id, topic, entity, version, project_id, fresh, \
                 parse_error, received_at, body, body_path, body_len",
        )
        .bind(owner)
        .bind(lease_until)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            let seq: i64 = row.try_get("seq")?;
            let runs = sqlx::query(
                "SELECT handler, attempts FROM handler_runs \
                 WHERE delivery_seq = ?1 AND state = 'pending' AND next_at <= ?2 ORDER BY handler",
            )
            .bind(seq)
            .bind(now)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| {
                Ok(DueRun {
                    handler: r.try_get("handler")?,
                    attempts: r.try_get::<i64, _>("attempts")?.max(0) as u32,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
            claimed.push(Claimed {
                seq,
                delivery_id: row.try_get("delivery_id")?,
                topic: row.try_get("topic")?,
                entity: row.try_get("entity")?,
                version: row
                    .try_get::<Option<i64>, _>("version")?
                    .map(Version::from_nanos),
                project_id: row.try_get("project_id")?,
                fresh: row.try_get::<Option<bool>, _>("fresh")?.unwrap_or(true),
                body_is_json: row.try_get::<Option<String>, _>("parse_error")?.is_none(),
                received_at: row.try_get("received_at")?,
                body: stored_body(row)?,
                runs,
            });
        }
        tx.commit().await?;
        // Returned oldest first so that a caller running them in order keeps arrival order.
        claimed.sort_by_key(|c| c.seq);
        Ok(claimed)
    }

    async fn record_attempts(
        &self,
        seq: i64,
        results: &[AttemptResult],
    ) -> Result<Status, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let conn: &mut SqliteConnection = &mut tx;
        for r in results {
            let (state, next_at, error, outcome) = match &r.outcome {
                AttemptOutcome::Ok => ("done", None, None, "ok"),
                AttemptOutcome::Retry { next_at, error } => {
                    ("pending", Some(*next_at), Some(error.as_str()), "retry")
                }
                AttemptOutcome::Dead { error } => ("dead", None, Some(error.as_str()), "dead"),
            };
            sqlx::query(
                "UPDATE handler_runs SET state = ?3, attempts = ?4, next_at = ?5, \
                 last_error = COALESCE(?6, last_error) WHERE delivery_seq = ?1 AND handler = ?2",
            )
            .bind(seq)
            .bind(&r.handler)
            .bind(state)
            .bind(i64::from(r.attempt))
            .bind(next_at)
            .bind(error)
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "INSERT INTO attempts (delivery_seq, handler, attempt, started_at, finished_at, \
                 outcome, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .bind(seq)
            .bind(&r.handler)
            .bind(i64::from(r.attempt))
            .bind(r.started_at)
            .bind(r.finished_at)
            .bind(outcome)
            .bind(error)
            .execute(&mut *conn)
            .await?;
        }
        let row = sqlx::query(
            "SELECT MIN(CASE WHEN state = 'pending' THEN next_at END) AS next_due, \
                    SUM(state = 'dead') AS dead, d.status AS status \
             FROM deliveries d LEFT JOIN handler_runs h ON h.delivery_seq = d.seq \
             WHERE d.seq = ?1",
        )
        .bind(seq)
        .fetch_one(&mut *conn)
        .await?;
        let next_due: Option<i64> = row.try_get("next_due")?;
        let dead: Option<i64> = row.try_get("dead")?;
        let current: String = row.try_get("status")?;
        let current: Status = current.parse().map_err(StoreError::Corrupt)?;
        let status = match (next_due, dead.unwrap_or(0) > 0, current) {
            (Some(_), _, current) => current,
            (None, true, _) => Status::Dead,
            (None, false, Status::Pending) => Status::Delivered,
            (None, false, current) => current,
        };
        sqlx::query(
            "UPDATE deliveries SET status = ?2, due_at = ?3, lease_owner = NULL, \
             lease_until = NULL WHERE seq = ?1",
        )
        .bind(seq)
        .bind(status.as_str())
        .bind(next_due)
        .execute(&mut *conn)
        .await?;
        tx.commit().await?;
        Ok(status)
    }

    async fn release_stale_leases(&self) -> Result<u64, StoreError> {
        // One server per SQLite file: any lease found at start belongs to a dead process.
        let done = sqlx::query(
            "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL \
             WHERE lease_owner IS NOT NULL",
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn queue_depth(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM deliveries WHERE due_at IS NOT NULL) \
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
        let (reply, done) = oneshot::channel();
        // `send` waits for room: close must reach the writer even when the queue is full.
        if self.writer.send(WriteRequest::Close(reply)).await.is_ok() {
            let _ = done.await;
        }
        if let Some(task) = self.writer_task.lock().await.take() {
            let _ = task.await;
        }
        self.pool.close().await;
    }
}
