//! Reads of the SQLite store, on connections of their own and on blocking threads (rusqlite is
//! synchronous): `events list` and `show`, the queue depth, and the blob names the orphan sweep
//! must keep. Readers never write, so they never wait for the writer's lock and never hold it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, Row};

use super::blob::BlobDir;
use super::ops::body_of;
use crate::delivery::{format_millis, Payload};
use crate::ordering::Version;
use crate::store::{
    AttemptRecord, DeliveryDetail, DeliverySummary, HandlerRun, ListQuery, StoreError, Ungated,
};

/// How long a reader waits for a lock (the writer checkpointing, another process).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle reader connections kept for the next read.
const IDLE_READERS: usize = 4;

/// Read-only connections to one database, opened as needed and kept for reuse.
#[derive(Debug, Clone)]
pub struct Readers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    pub fn new(path: PathBuf) -> Self {
        Self {
            inner: Arc::new(Inner {
                path,
                idle: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Runs `read` on a reader connection on a blocking thread.
    pub async fn run<T, F>(&self, read: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let idle = inner.idle.lock().ok().and_then(|mut idle| idle.pop());
            let conn = match idle {
                Some(conn) => conn,
                None => open_reader(&inner.path)?,
            };
            let result = read(&conn);
            // A connection that failed may be broken (the file replaced): drop it.
            if result.is_ok() {
                if let Ok(mut idle) = inner.idle.lock() {
                    if idle.len() < IDLE_READERS {
                        idle.push(conn);
                    }
                }
            }
            result
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("reader thread failed: {e}")))?
    }
}

fn open_reader(path: &std::path::Path) -> Result<Connection, StoreError> {
    if !path.exists() {
        return Err(StoreError::Unavailable(format!(
            "no database at {} (has the server started with this configuration?)",
            path.display()
        )));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

const SUMMARY_COLUMNS: &str = "d.seq, delivery_id, endpoint, topic, entity, version, status, \
    received_at, body_len, id_conflict";

fn summary(row: &Row<'_>) -> rusqlite::Result<DeliverySummary> {
    let status: String = row.get(6)?;
    Ok(DeliverySummary {
        seq: row.get(0)?,
        delivery_id: row.get(1)?,
        endpoint: row.get(2)?,
        topic: row.get(3)?,
        entity: row.get(4)?,
        version: row
            .get::<_, Option<i64>>(5)?
            .map(|v| Version::from_nanos(v).to_string()),
        status: status.parse().map_err(|e: String| {
            rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Text, e.into())
        })?,
        received_at: format_millis(row.get(7)?),
        body_len: row.get::<_, i64>(8)?.max(0) as u64,
        id_conflict: row.get(9)?,
    })
}

pub fn list(conn: &Connection, query: &ListQuery) -> Result<Vec<DeliverySummary>, StoreError> {
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS} FROM deliveries d \
         WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR topic = ?2) \
         ORDER BY seq DESC LIMIT ?3"
    );
    let rows = conn
        .prepare_cached(&sql)?
        .query_map(
            params![
                query.status.map(|s| s.as_str()),
                query.topic,
                i64::from(query.limit)
            ],
            summary,
        )?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn show(
    conn: &Connection,
    blobs: &BlobDir,
    delivery_id: &str,
) -> Result<Vec<DeliveryDetail>, StoreError> {
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS}, client_ip, headers, blob_name, fresh, parse_error, \
         body_pruned FROM deliveries d WHERE delivery_id = ?1 ORDER BY d.seq"
    );
    let rows = conn
        .prepare_cached(&sql)?
        .query_map([delivery_id], |row| {
            Ok((
                summary(row)?,
                row.get::<_, String>(10)?,
                row.get::<_, String>(11)?,
                row.get::<_, Option<String>>(12)?,
                row.get::<_, Option<bool>>(13)?,
                row.get::<_, Option<String>>(14)?,
                row.get::<_, bool>(15)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut details = Vec::with_capacity(rows.len());
    for (summary, client_ip, headers, blob_name, fresh, parse_error, body_pruned) in rows {
        let seq = summary.seq;
        let body = if body_pruned {
            Payload::inline(bytes::Bytes::new())
        } else {
            body_of(conn, blobs, seq, blob_name, summary.body_len as i64)?
        };
        details.push(DeliveryDetail {
            client_ip,
            headers: serde_json::from_str(&headers)
                .map_err(|e| StoreError::Corrupt(format!("headers: {e}")))?,
            body,
            body_pruned,
            fresh,
            parse_error,
            handlers: handler_runs(conn, seq)?,
            attempts: attempts(conn, seq)?,
            summary,
        });
    }
    Ok(details)
}

fn handler_runs(conn: &Connection, seq: i64) -> Result<Vec<HandlerRun>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT handler, state, attempts, next_at, last_error FROM handler_runs \
         WHERE delivery_seq = ?1 ORDER BY handler",
    )?;
    let rows = stmt
        .query_map([seq], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, Option<String>>(4)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(handler, state, attempts, next_at, last_error)| {
            Ok(HandlerRun {
                handler,
                state: state.parse().map_err(StoreError::Corrupt)?,
                attempts: attempts.max(0) as u32,
                next_attempt_at: next_at.map(format_millis),
                last_error,
            })
        })
        .collect()
}

fn attempts(conn: &Connection, seq: i64) -> Result<Vec<AttemptRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT handler, attempt, started_at, finished_at, outcome, error FROM attempts \
         WHERE delivery_seq = ?1 ORDER BY started_at, handler",
    )?;
    let rows = stmt
        .query_map([seq], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<String>>(5)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(handler, attempt, started, finished, outcome, error)| {
            Ok(AttemptRecord {
                handler,
                attempt: attempt.max(0) as u32,
                started_at: format_millis(started),
                finished_at: format_millis(finished),
                outcome: outcome.parse().map_err(StoreError::Corrupt)?,
                error,
            })
        })
        .collect()
}

/// The oldest deliveries not gated yet, with their bodies.
pub fn ungated(conn: &Connection, blobs: &BlobDir, limit: u32) -> Result<Vec<Ungated>, StoreError> {
    let rows = conn
        .prepare_cached(
            "SELECT d.seq, topic, blob_name, body_len, b.body FROM deliveries d \
             LEFT JOIN bodies b ON b.seq = d.seq WHERE gated = 0 ORDER BY d.seq LIMIT ?1",
        )?
        .query_map([i64::from(limit)], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, Option<String>>(1)?,
                row.get::<_, Option<String>>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, Option<Vec<u8>>>(4)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(seq, topic, blob_name, len, inline)| {
            let body = match (blob_name, inline) {
                (Some(name), _) => Payload::stored(len.max(0) as u64, blobs.source(&name)),
                (None, Some(bytes)) => Payload::inline(bytes.into()),
                (None, None) => {
                    return Err(StoreError::Corrupt(format!("delivery {seq} has no body")))
                }
            };
            Ok(Ungated { seq, topic, body })
        })
        .collect()
}

/// Deliveries with work left: not gated yet, due, or waiting in a lane.
pub fn queue_depth(conn: &Connection) -> Result<u64, StoreError> {
    let n: i64 = conn
        .prepare_cached(
            "SELECT (SELECT COUNT(*) FROM deliveries WHERE due_at IS NOT NULL) \
                  + (SELECT COUNT(*) FROM deliveries WHERE waiting = 1) \
                  + (SELECT COUNT(*) FROM deliveries WHERE gated = 0)",
        )?
        .query_row([], |row| row.get(0))?;
    Ok(n.max(0) as u64)
}

/// Every blob file name a delivery refers to.
pub fn referenced_blobs(conn: &Connection) -> Result<HashSet<String>, StoreError> {
    let names = conn
        .prepare_cached("SELECT blob_name FROM deliveries WHERE blob_name IS NOT NULL")?
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<Result<HashSet<_>, _>>()?;
    Ok(names)
}
