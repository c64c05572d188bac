//! Reads of the SQLite store, on connections of their own and on blocking threads (rusqlite is
//! synchronous): `events list` and `show`, the console's pages (an entity's history, the gate's
//! reasons, handler activity, the overview, what a replay would do), the queue depth, and the
//! blob names the orphan sweep must keep. Readers never write, so they never wait for the writer's lock and never hold it.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OpenFlags, OptionalExtension, Row};

use super::blob::BlobDir;
use super::ops::body_of;
use crate::delivery::Status;
use crate::delivery::{format_millis, Origin, Payload, UnixMillis};
use crate::ordering::Change;
use crate::ordering::Version;
use crate::store::gate::{applied, replay_effect};
use crate::store::model::{counts_by_status, in_version_order, RECEIVED_WINDOW_MARGIN_MS};
use crate::store::{
    AttemptRecord, DeliveryDetail, DeliverySummary, EntityEntry, EntityHistory, EntityState,
    HandlerActivity, HandlerRun, ListQuery, Overview, ReceivedBucket, ReplayItem, ReplayTarget,
    StoreError, Ungated, VerdictBasis,
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

const SUMMARY_COLUMNS: &str = "d.seq, d.delivery_id, d.endpoint, d.topic, d.entity, d.version, \
    d.status, d.received_at, d.body_len, d.id_conflict, d.project_id, d.origin";
/// How many columns [`SUMMARY_COLUMNS`] has: a query's own columns follow them.
const SUMMARY_WIDTH: usize = 12;

/// A delivery's `origin` column.
pub(super) fn origin_at(row: &Row<'_>, index: usize) -> rusqlite::Result<Origin> {
    let text: String = row.get(index)?;
    Origin::parse(&text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Text,
            format!("origin {text:?}").into(),
        )
    })
}

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
        project_id: row.get(10)?,
        origin: origin_at(row, 11)?,
    })
}

pub fn list(conn: &Connection, query: &ListQuery) -> Result<Vec<DeliverySummary>, StoreError> {
    // Only the filters given become conditions, so that SQLite can use the index that fits
    // (status, delivery id) rather than scan for `?1 IS NULL OR ...`.
    let mut sql = format!("SELECT {SUMMARY_COLUMNS} FROM deliveries d WHERE 1 = 1");
    let mut args: Vec<Value> = Vec::new();
    let mut add = |condition: &str, value: Value| {
        sql.push_str(" AND ");
        sql.push_str(condition);
        args.push(value);
    };
    if let Some(status) = query.status {
        add("d.status = ?", Value::Text(status.as_str().to_owned()));
    }
    for (column, value) in [
        ("d.topic = ?", &query.topic),
        ("d.project_id = ?", &query.project_id),
        ("d.entity = ?", &query.entity),
        ("d.delivery_id = ?", &query.delivery_id),
    ] {
        if let Some(value) = value {
            add(column, Value::Text(value.clone()));
        }
    }
    if let Some(handler) = &query.handler {
        add(
            "EXISTS (SELECT 1 FROM handler_runs h WHERE h.delivery_seq = d.seq AND h.handler = ?)",
            Value::Text(handler.clone()),
        );
    }
    if let Some(from) = query.received_from {
        add("d.received_at >= ?", Value::Integer(from));
    }
    if let Some(until) = query.received_until {
        add("d.received_at < ?", Value::Integer(until));
    }
    if let Some(before) = query.before_seq {
        add("d.seq < ?", Value::Integer(before));
    }
    sql.push_str(" ORDER BY d.seq DESC LIMIT ?");
    args.push(Value::Integer(i64::from(query.limit)));
    let rows = conn
        .prepare_cached(&sql)?
        .query_map(params_from_iter(args), summary)?
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
         body_pruned, request_id FROM deliveries d WHERE delivery_id = ?1 ORDER BY d.seq"
    );
    let rows = conn
        .prepare_cached(&sql)?
        .query_map([delivery_id], |row| {
            let at = SUMMARY_WIDTH;
            Ok((
                summary(row)?,
                row.get::<_, String>(at)?,
                row.get::<_, String>(at + 1)?,
                row.get::<_, Option<String>>(at + 2)?,
                row.get::<_, Option<bool>>(at + 3)?,
                row.get::<_, Option<String>>(at + 4)?,
                row.get::<_, bool>(at + 5)?,
                row.get::<_, Option<String>>(at + 6)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut details = Vec::with_capacity(rows.len());
    for (summary, client_ip, headers, blob_name, fresh, parse_error, body_pruned, request_id) in
        rows
    {
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
            request_id,
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
            "SELECT d.seq, topic, blob_name, body_len, b.body, delivery_id, request_id, origin \
             FROM deliveries d \
             LEFT JOIN bodies b ON b.seq = d.seq WHERE gated = 0 ORDER BY d.seq LIMIT ?1",
        )?
        .query_map([i64::from(limit)], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, Option<String>>(1)?,
                row.get::<_, Option<String>>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, Option<Vec<u8>>>(4)?,
                row.get::<_, String>(5)?,
                row.get::<_, Option<String>>(6)?,
                origin_at(row, 7)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(
            |(seq, topic, blob_name, len, inline, delivery_id, request_id, origin)| {
                let body = match (blob_name, inline) {
                    (Some(name), _) => Payload::stored(len.max(0) as u64, blobs.source(&name)),
                    (None, Some(bytes)) => Payload::inline(bytes.into()),
                    (None, None) => {
                        return Err(StoreError::Corrupt(format!("delivery {seq} has no body")))
                    }
                };
                Ok(Ungated {
                    seq,
                    delivery_id,
                    request_id,
                    topic,
                    body,
                    origin,
                })
            },
        )
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

/// When the oldest delivery with work left was received. Each part is the smallest `seq` of
/// one of the partial indexes `queue_depth` counts, so no table row is read but one.
pub fn oldest_unfinished(conn: &Connection) -> Result<Option<UnixMillis>, StoreError> {
    let at = conn
        .prepare_cached(
            "SELECT received_at FROM deliveries WHERE seq = (SELECT MIN(s) FROM ( \
                 SELECT MIN(seq) AS s FROM deliveries WHERE gated = 0 \
                 UNION ALL SELECT MIN(seq) FROM deliveries WHERE due_at IS NOT NULL \
                 UNION ALL SELECT MIN(seq) FROM deliveries WHERE waiting = 1))",
        )?
        .query_row([], |row| row.get(0))
        .optional()?;
    Ok(at)
}

/// Every blob file name a delivery refers to.
pub fn referenced_blobs(conn: &Connection) -> Result<HashSet<String>, StoreError> {
    let names = conn
        .prepare_cached("SELECT blob_name FROM deliveries WHERE blob_name IS NOT NULL")?
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<Result<HashSet<_>, _>>()?;
    Ok(names)
}

/// The rows a replay target names.
fn target_condition(target: &ReplayTarget) -> (&'static str, String) {
    match target {
        ReplayTarget::DeliveryId(id) => ("d.delivery_id = ?1", id.clone()),
        ReplayTarget::Status(status) => ("d.status = ?1", status.as_str().to_owned()),
    }
}

/// What replaying `target` does to each delivery it names (see [`replay_effect`]). Run in the
/// replay's own transaction, it says what the replay did.
pub fn replay_plan(
    conn: &Connection,
    target: &ReplayTarget,
    now: UnixMillis,
) -> Result<Vec<ReplayItem>, StoreError> {
    let (condition, value) = target_condition(target);
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS}, COALESCE(d.lease_until > ?2, 0), d.change, e.version, \
         e.change, e.backfilled FROM deliveries d LEFT JOIN entities e ON e.entity = d.entity \
         WHERE {condition} ORDER BY d.seq"
    );
    let rows = conn
        .prepare_cached(&sql)?
        .query_map(params![value, now], |row| {
            let at = SUMMARY_WIDTH;
            Ok((
                summary(row)?,
                row.get::<_, Option<i64>>(5)?,
                row.get::<_, bool>(at)?,
                row.get::<_, Option<String>>(at + 1)?,
                row.get::<_, Option<i64>>(at + 2)?,
                row.get::<_, Option<String>>(at + 3)?,
                row.get::<_, Option<bool>>(at + 4)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut items = Vec::with_capacity(rows.len());
    for (summary, version, running, change, entity_version, entity_change, backfilled) in rows {
        let own = match (&summary.entity, change.as_deref().and_then(Change::parse)) {
            (Some(_), Some(change)) => Some((version.map(Version::from_nanos), change)),
            _ => None,
        };
        let last = match entity_change {
            Some(change) => Some(applied(
                entity_version,
                &change,
                backfilled.unwrap_or(false),
            )?),
            None => None,
        };
        let handlers = handler_runs(conn, summary.seq)?;
        let effect = replay_effect(
            running,
            summary.status,
            own,
            summary.origin,
            last,
            &handlers,
        );
        items.push(ReplayItem {
            summary,
            effect,
            handlers,
        });
    }
    Ok(items)
}

/// A delivery with the gate's view of it: [`SUMMARY_COLUMNS`] followed by these.
const ENTRY_COLUMNS: &str = "d.change, d.fresh, d.lane_pos";

fn entry(row: &Row<'_>) -> rusqlite::Result<EntityEntry> {
    let at = SUMMARY_WIDTH;
    Ok(EntityEntry {
        summary: summary(row)?,
        change: row
            .get::<_, Option<String>>(at)?
            .as_deref()
            .and_then(Change::parse),
        fresh: row.get(at + 1)?,
        lane_pos: row.get(at + 2)?,
    })
}

fn entity_state(conn: &Connection, entity: &str) -> Result<Option<EntityState>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT version, change, updated_at, active_pos FROM entities WHERE entity = ?1",
        )?
        .query_row([entity], |row| {
            Ok((
                row.get::<_, Option<i64>>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, Option<i64>>(3)?,
            ))
        })
        .optional()?;
    Ok(
        row.map(|(version, change, updated_at, active_pos)| EntityState {
            entity: entity.to_owned(),
            version: version.map(|v| Version::from_nanos(v).to_string()),
            change: Change::parse(&change),
            updated_at,
            busy: active_pos.is_some(),
        }),
    )
}

/// One entity's state and its most recent `limit` deliveries, in version order. The entity has
/// no index of its own (the dispatcher never looks deliveries up by it), so this reads the
/// table; it is for a person looking at one entity, not for a loop.
pub fn entity_history(
    conn: &Connection,
    entity: &str,
    limit: u32,
) -> Result<EntityHistory, StoreError> {
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS}, {ENTRY_COLUMNS} FROM deliveries d WHERE d.entity = ?1 \
         ORDER BY d.seq DESC LIMIT ?2"
    );
    let mut rows = conn
        .prepare_cached(&sql)?
        .query_map(params![entity, i64::from(limit) + 1], |row| {
            Ok((row.get::<_, Option<i64>>(5)?, entry(row)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let truncated = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    Ok(EntityHistory {
        state: entity_state(conn, entity)?,
        deliveries: in_version_order(rows),
        truncated,
    })
}

/// Delivery `seq`, what it was held against, and its entity's state now.
pub fn verdict_basis(conn: &Connection, seq: i64) -> Result<Option<VerdictBasis>, StoreError> {
    let sql =
        format!("SELECT {SUMMARY_COLUMNS}, {ENTRY_COLUMNS} FROM deliveries d WHERE d.seq = ?1");
    let Some(delivery) = conn
        .prepare_cached(&sql)?
        .query_row([seq], entry)
        .optional()?
    else {
        return Ok(None);
    };
    let (held_against, entity) = match (&delivery.summary.entity, delivery.lane_pos) {
        (Some(entity), lane_pos) => {
            let held = match lane_pos {
                Some(pos) => {
                    let sql = format!(
                        "SELECT {SUMMARY_COLUMNS}, {ENTRY_COLUMNS} FROM deliveries d \
                         WHERE d.entity = ?1 AND d.lane_pos < ?2 AND d.fresh = 1 \
                           AND (d.version IS NOT NULL OR d.change = 'deleted') \
                         ORDER BY d.lane_pos DESC LIMIT 1"
                    );
                    conn.prepare_cached(&sql)?
                        .query_row(params![entity, pos], entry)
                        .optional()?
                }
                None => None,
            };
            (held, entity_state(conn, entity)?)
        }
        (None, _) => (None, None),
    };
    Ok(Some(VerdictBasis {
        delivery,
        held_against,
        entity,
    }))
}

/// Per handler: its last success and failure from its attempts, what finished since `since`,
/// and its runs dead or pending now. One pass over each table.
pub fn handler_activity(
    conn: &Connection,
    since: UnixMillis,
) -> Result<Vec<HandlerActivity>, StoreError> {
    let mut by_handler: BTreeMap<String, HandlerActivity> = BTreeMap::new();
    let attempts = conn
        .prepare_cached(
            "SELECT handler, MAX(CASE WHEN outcome = 'ok' THEN finished_at END), \
                    MAX(CASE WHEN outcome <> 'ok' THEN finished_at END), \
                    COALESCE(SUM(outcome <> 'ok' AND finished_at >= ?1), 0), \
                    COALESCE(SUM(outcome = 'ok' AND finished_at >= ?1), 0) \
             FROM attempts GROUP BY handler",
        )?
        .query_map([since], |row| {
            Ok(HandlerActivity {
                handler: row.get(0)?,
                last_success_at: row.get(1)?,
                last_failure_at: row.get(2)?,
                failures_since: row.get::<_, i64>(3)?.max(0) as u64,
                successes_since: row.get::<_, i64>(4)?.max(0) as u64,
                ..HandlerActivity::default()
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for a in attempts {
        by_handler.insert(a.handler.clone(), a);
    }
    // SQLite takes the other columns of an aggregate query from the row that gave the MAX.
    let errors = conn
        .prepare_cached(
            "SELECT handler, error, MAX(finished_at) FROM attempts WHERE outcome <> 'ok' \
             GROUP BY handler",
        )?
        .query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for (handler, error) in errors {
        if let Some(a) = by_handler.get_mut(&handler) {
            a.last_error = error;
        }
    }
    let runs = conn
        .prepare_cached(
            "SELECT handler, COALESCE(SUM(state = 'dead'), 0), \
                    COALESCE(SUM(state = 'pending'), 0) \
             FROM handler_runs GROUP BY handler",
        )?
        .query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    HandlerActivity::add_run_counts(&mut by_handler, runs);
    Ok(by_handler.into_values().collect())
}

/// Deliveries kept by status, and those received in `[since, now)` in buckets of `bucket_ms`.
pub fn overview(
    conn: &Connection,
    since: UnixMillis,
    now: UnixMillis,
    bucket_ms: i64,
) -> Result<Overview, StoreError> {
    let by_status = conn
        .prepare_cached("SELECT status, COUNT(*) FROM deliveries GROUP BY status")?
        .query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let by_status = counts_by_status(by_status).map_err(StoreError::Corrupt)?;
    let mut buckets = ReceivedBucket::span(since, now, bucket_ms);
    if buckets.is_empty() {
        return Ok(Overview { by_status, buckets });
    }
    // `received_at` has no index; `seq` grows with it, so the window's rows are found by
    // walking back from the newest to the first row received well before it (a body that took
    // long to arrive is committed after quicker ones received later).
    let floor: i64 = conn
        .prepare_cached(
            "SELECT COALESCE((SELECT seq FROM deliveries WHERE received_at < ?1 \
             ORDER BY seq DESC LIMIT 1), 0)",
        )?
        .query_row([since.saturating_sub(RECEIVED_WINDOW_MARGIN_MS)], |row| {
            row.get(0)
        })?;
    let counts = conn
        .prepare_cached(
            "SELECT (received_at - ?1) / ?2, status, COUNT(*) FROM deliveries \
             WHERE seq > ?3 AND received_at >= ?1 AND received_at < ?4 GROUP BY 1, 2",
        )?
        .query_map(params![since, bucket_ms, floor, now], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for (index, status, n) in counts {
        let status: Status = status.parse().map_err(StoreError::Corrupt)?;
        if let Some(bucket) = usize::try_from(index).ok().and_then(|i| buckets.get_mut(i)) {
            bucket.by_status.push((status, n.max(0) as u64));
        }
    }
    Ok(Overview { by_status, buckets })
}
