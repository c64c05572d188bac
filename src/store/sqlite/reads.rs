//! Reads of the SQLite store, on connections of their own and on blocking threads (rusqlite is
//! synchronous): `events list` and `show`, the console's pages (an entity's history, the gate's
//! reasons, handler activity, the overview, what a replay would do), and the blob names the
//! orphan sweep must keep. Readers never write, so they never wait for the writer's lock and
//! never hold it.
//!
//! Where a delivery stands is read off its records through the view `deliveries_now` (see the
//! migration `0006_append_only.sql`), which has the columns the table had before its rows
//! stopped being rewritten. A status other than `delivered` is looked for among the few records
//! that can give it (the dead letters among the closings, say, or from the dispatch mark on for
//! `pending`), never by reading every delivery.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OpenFlags, OptionalExtension, Row};

use super::blob::BlobDir;
use super::health::{Health, IdlePool};
use super::ops::body_of;
use crate::delivery::Status;
use crate::delivery::{format_millis, Origin, Payload, UnixMillis};
use crate::ordering::Change;
use crate::ordering::Version;
use crate::store::gate::{applied, replay_effect};
use crate::store::model::{in_version_order, RECEIVED_WINDOW_MARGIN_MS};
use crate::store::RunState;
use crate::store::{
    AttemptRecord, DeliveryDetail, DeliverySummary, EntityEntry, EntityHistory, EntityState,
    HandlerActivity, HandlerRun, ListQuery, Overview, ReceivedBucket, ReplayItem, ReplayTarget,
    StoreError, VerdictBasis,
};

/// How long a reader waits for a lock (the writer checkpointing, another process).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle reader connections kept for the next read.
const IDLE_READERS: usize = 4;

/// Read-only connections to one database, opened as needed and kept for reuse (each with the
/// [`Health`] generation it was opened at: an older one is closed instead of reused).
#[derive(Debug, Clone)]
pub struct Readers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    idle: Arc<IdlePool>,
    health: Arc<Health>,
}

impl Readers {
    pub fn new(path: PathBuf, health: Arc<Health>) -> Self {
        Self {
            inner: Arc::new(Inner {
                path,
                idle: health.idle_pool(),
                health,
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
            let generation = inner.health.generation();
            let idle = inner.idle.lock().ok().and_then(|mut idle| {
                idle.retain(|(opened, _)| *opened == generation);
                idle.pop()
            });
            let conn = match idle {
                Some((_, conn)) => conn,
                None => open_reader(&inner.path)?,
            };
            let result = read(&conn);
            // A connection that failed may be broken (the file replaced): drop it.
            if result.is_ok() && inner.health.generation() == generation {
                if let Ok(mut idle) = inner.idle.lock() {
                    if idle.len() < IDLE_READERS {
                        idle.push((generation, conn));
                    }
                }
            }
            result
        })
        .await
        .map_err(|e| StoreError::unavailable(format!("reader thread failed: {e}")))?
    }
}

fn open_reader(path: &std::path::Path) -> Result<Connection, StoreError> {
    if !path.exists() {
        return Err(StoreError::unavailable(format!(
            "no database at {}",
            path.display()
        )));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::unavailable(format!("{}: {e}", path.display())))?;
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

/// A condition that narrows a status filter down to the few deliveries that can have that
/// status, so that looking for dead letters does not read every delivery; `delivered`, which
/// most have, is found by reading newest first.
pub(super) fn status_candidates(status: Status) -> Option<&'static str> {
    Some(match status {
        Status::Dead => "d.seq IN (SELECT seq FROM closings WHERE status = 'dead')",
        Status::Stale => {
            "d.seq IN (SELECT seq FROM closings WHERE status = 'stale' \
             UNION ALL SELECT seq FROM verdicts WHERE status = 'stale')"
        }
        Status::Unrecognized => {
            "d.seq IN (SELECT seq FROM closings WHERE status = 'unrecognized' \
             UNION ALL SELECT seq FROM verdicts WHERE status = 'unrecognized' \
             UNION ALL SELECT seq FROM deliveries WHERE accepted_as = 'unrecognized' \
             UNION ALL SELECT seq FROM replays WHERE status = 'unrecognized')"
        }
        Status::Pending => "d.seq >= (SELECT low_water FROM dispatch_mark)",
        Status::Delivered => return None,
    })
}

pub fn list(conn: &Connection, query: &ListQuery) -> Result<Vec<DeliverySummary>, StoreError> {
    // Only the filters given become conditions, so that SQLite can use the index that fits
    // (delivery id) rather than scan for `?1 IS NULL OR ...`.
    let mut sql = format!("SELECT {SUMMARY_COLUMNS} FROM deliveries_now d WHERE 1 = 1");
    let mut args: Vec<Value> = Vec::new();
    if let Some(candidates) = query.status.and_then(status_candidates) {
        sql.push_str(" AND ");
        sql.push_str(candidates);
    }
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
            "EXISTS (SELECT 1 FROM json_each(d.handlers) h WHERE h.value = ?)",
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
        "SELECT {SUMMARY_COLUMNS}, client_ip, headers, fresh, parse_error, \
         body_pruned, request_id FROM deliveries_now d WHERE delivery_id = ?1 ORDER BY d.seq"
    );
    let rows = conn
        .prepare_cached(&sql)?
        .query_map([delivery_id], |row| {
            let at = SUMMARY_WIDTH;
            Ok((
                summary(row)?,
                row.get::<_, String>(at)?,
                row.get::<_, String>(at + 1)?,
                row.get::<_, Option<bool>>(at + 2)?,
                row.get::<_, Option<String>>(at + 3)?,
                row.get::<_, bool>(at + 4)?,
                row.get::<_, Option<String>>(at + 5)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut details = Vec::with_capacity(rows.len());
    for (summary, client_ip, headers, fresh, parse_error, body_pruned, request_id) in rows {
        let seq = summary.seq;
        let body = if body_pruned {
            Payload::inline(bytes::Bytes::new())
        } else {
            body_of(conn, blobs, seq)?
                // Never an empty body in its place: that would show a wrong delivery.
                .ok_or_else(|| StoreError::Corrupt(format!("delivery {seq} has no body")))?
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

/// One attempt as [`handler_runs`] reads it.
struct Tried {
    round: i64,
    handler: String,
    attempt: i64,
    outcome: String,
    error: Option<String>,
    next_at: Option<i64>,
}

/// Where each handler stands with delivery `seq`, from its attempts: the handlers its current
/// verdict gives it to (none while it waits for the gate again after a replay) and those that
/// did it in an earlier round. A run done in any round stays done; a run's attempts, next
/// attempt and last error are its current round's.
fn handler_runs(conn: &Connection, seq: i64) -> Result<Vec<HandlerRun>, StoreError> {
    let (handlers, round, gated): (Option<String>, i64, Option<bool>) = conn
        .prepare_cached("SELECT handlers, round, gated FROM deliveries_now WHERE seq = ?1")?
        .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    let tried = conn
        .prepare_cached(
            "SELECT round, handler, attempt, outcome, error, next_at FROM attempts \
             WHERE delivery_seq = ?1 ORDER BY round, attempt",
        )?
        .query_map([seq], |r| {
            Ok(Tried {
                round: r.get(0)?,
                handler: r.get(1)?,
                attempt: r.get(2)?,
                outcome: r.get(3)?,
                error: r.get(4)?,
                next_at: r.get(5)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut names: Vec<String> = match (gated, handlers) {
        (Some(true), Some(listed)) => serde_json::from_str(&listed)
            .map_err(|e| StoreError::Corrupt(format!("handlers: {e}")))?,
        _ => Vec::new(),
    };
    for t in tried.iter().filter(|t| t.outcome == "ok") {
        if !names.contains(&t.handler) {
            names.push(t.handler.clone());
        }
    }
    names.sort();
    Ok(names
        .into_iter()
        .map(|handler| run_of(handler, round, &tried))
        .collect())
}

fn run_of(handler: String, round: i64, tried: &[Tried]) -> HandlerRun {
    let mine: Vec<&Tried> = tried.iter().filter(|t| t.handler == handler).collect();
    let done = mine.iter().rev().find(|t| t.outcome == "ok");
    // The round that counts: the one it was done in, else the current one.
    let counted = done.map_or(round, |t| t.round);
    let this_round: Vec<&&Tried> = mine.iter().filter(|t| t.round == counted).collect();
    let last = this_round.last();
    let state = match (done, last) {
        (Some(_), _) => RunState::Done,
        (None, Some(t)) if t.outcome == "dead" => RunState::Dead,
        _ => RunState::Pending,
    };
    HandlerRun {
        state,
        attempts: last.map_or(0, |t| t.attempt.max(0) as u32),
        next_attempt_at: match (state, last) {
            (RunState::Pending, Some(t)) => t.next_at.map(format_millis),
            _ => None,
        },
        last_error: this_round.iter().rev().find_map(|t| t.error.clone()),
        handler,
    }
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

/// Every blob file name a delivery refers to.
pub fn referenced_blobs(conn: &Connection) -> Result<HashSet<String>, StoreError> {
    let names = conn
        .prepare_cached(
            "SELECT blob_name FROM deliveries d WHERE blob_name IS NOT NULL \
             AND NOT EXISTS (SELECT 1 FROM pruned_bodies p WHERE p.seq = d.seq)",
        )?
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<Result<HashSet<_>, _>>()?;
    Ok(names)
}

/// The rows a replay target names.
fn target_condition(target: &ReplayTarget) -> (String, String) {
    match target {
        ReplayTarget::DeliveryId(id) => ("d.delivery_id = ?1".to_owned(), id.clone()),
        ReplayTarget::Status(status) => {
            let narrowed = status_candidates(*status)
                .map(|c| format!("{c} AND "))
                .unwrap_or_default();
            (
                format!("{narrowed}d.status = ?1"),
                status.as_str().to_owned(),
            )
        }
    }
}

/// What replaying `target` does to each delivery it names (see [`replay_effect`]); `running`
/// says which are being handled at this moment. Run in the replay's own transaction, it says
/// what the replay did.
pub fn replay_plan(
    conn: &Connection,
    target: &ReplayTarget,
    running: &dyn Fn(i64) -> bool,
) -> Result<Vec<ReplayItem>, StoreError> {
    let (condition, value) = target_condition(target);
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS}, d.change, e.version, e.change, e.backfilled \
         FROM deliveries_now d LEFT JOIN entities e ON e.entity = d.entity \
         WHERE {condition} ORDER BY d.seq"
    );
    let rows = conn
        .prepare_cached(&sql)?
        .query_map(params![value], |row| {
            let at = SUMMARY_WIDTH;
            Ok((
                summary(row)?,
                row.get::<_, Option<i64>>(5)?,
                row.get::<_, Option<String>>(at)?,
                row.get::<_, Option<i64>>(at + 1)?,
                row.get::<_, Option<String>>(at + 2)?,
                row.get::<_, Option<bool>>(at + 3)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut items = Vec::with_capacity(rows.len());
    for (summary, version, change, entity_version, entity_change, backfilled) in rows {
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
            running(summary.seq),
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

/// One entity's gate state, and whether a delivery of it has work left (from the dispatch mark
/// on, the only place one can be).
fn entity_state(conn: &Connection, entity: &str) -> Result<Option<EntityState>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT version, change, updated_at, EXISTS (SELECT 1 FROM deliveries_now d \
                 WHERE d.seq >= (SELECT low_water FROM dispatch_mark) AND d.entity = ?1 \
                   AND d.gated AND NOT d.finished) \
             FROM entities WHERE entity = ?1",
        )?
        .query_row([entity], |row| {
            Ok((
                row.get::<_, Option<i64>>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, bool>(3)?,
            ))
        })
        .optional()?;
    Ok(row.map(|(version, change, updated_at, busy)| EntityState {
        entity: entity.to_owned(),
        version: version.map(|v| Version::from_nanos(v).to_string()),
        change: Change::parse(&change),
        updated_at,
        busy,
    }))
}

/// One entity's state and its most recent `limit` deliveries, in version order. The entity has
/// no index of its own (the dispatcher never looks deliveries up by it), so this reads the
/// verdicts; it is for a person looking at one entity, not for a loop.
pub fn entity_history(
    conn: &Connection,
    entity: &str,
    limit: u32,
) -> Result<EntityHistory, StoreError> {
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS}, {ENTRY_COLUMNS} FROM deliveries_now d \
         WHERE d.seq IN (SELECT seq FROM verdicts WHERE entity = ?1) AND d.entity = ?1 \
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
        format!("SELECT {SUMMARY_COLUMNS}, {ENTRY_COLUMNS} FROM deliveries_now d WHERE d.seq = ?1");
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
                    // The last verdict before it in the gate's order that applied something.
                    let sql = format!(
                        "SELECT {SUMMARY_COLUMNS}, {ENTRY_COLUMNS} FROM deliveries_now d \
                         WHERE d.seq = (SELECT seq FROM verdicts \
                             WHERE entity = ?1 AND id < ?2 AND fresh = 1 \
                               AND (version IS NOT NULL OR change = 'deleted') \
                             ORDER BY id DESC LIMIT 1)"
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
/// and its runs dead or pending now.
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
    HandlerActivity::add_run_counts(&mut by_handler, run_counts(conn)?);
    Ok(by_handler.into_values().collect())
}

/// Per handler, how many deliveries are dead-lettered for it and how many wait for it now: the
/// dead letters among the closings, the waiting ones from the dispatch mark on.
fn run_counts(conn: &Connection) -> Result<Vec<(String, i64, i64)>, StoreError> {
    let seqs: Vec<i64> = conn
        .prepare_cached(
            "SELECT d.seq FROM deliveries_now d \
             WHERE (d.seq IN (SELECT seq FROM closings WHERE status = 'dead') AND d.status = 'dead') \
                OR (d.seq >= (SELECT low_water FROM dispatch_mark) AND d.gated AND NOT d.finished)",
        )?
        .query_map([], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    let mut counts: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for seq in seqs {
        for run in handler_runs(conn, seq)? {
            let (dead, pending) = counts.entry(run.handler).or_default();
            match run.state {
                RunState::Dead => *dead += 1,
                RunState::Pending => *pending += 1,
                RunState::Done => {}
            }
        }
    }
    Ok(counts
        .into_iter()
        .map(|(handler, (dead, pending))| (handler, dead, pending))
        .collect())
}

/// Deliveries kept, by status: the rare statuses counted among the records that can give them,
/// `delivered` as what is left.
pub fn counts_by_status(conn: &Connection) -> Result<Vec<(Status, u64)>, StoreError> {
    let total: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM deliveries")?
        .query_row([], |row| row.get(0))?;
    let mut counts = Vec::with_capacity(Status::ALL.len());
    let mut others = 0;
    for status in Status::ALL {
        let Some(candidates) = status_candidates(status) else {
            continue;
        };
        let n: i64 = conn
            .prepare_cached(&format!(
                "SELECT COUNT(*) FROM deliveries_now d WHERE {candidates} AND d.status = ?1"
            ))?
            .query_row([status.as_str()], |row| row.get(0))?;
        others += n;
        if n > 0 {
            counts.push((status, n as u64));
        }
    }
    let delivered = (total - others).max(0);
    if delivered > 0 {
        counts.push((Status::Delivered, delivered as u64));
    }
    Ok(counts)
}

/// Deliveries kept by status, and those received in `[since, now)` in buckets of `bucket_ms`.
pub fn overview(
    conn: &Connection,
    since: UnixMillis,
    now: UnixMillis,
    bucket_ms: i64,
) -> Result<Overview, StoreError> {
    let by_status = counts_by_status(conn)?;
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
            "SELECT (received_at - ?1) / ?2, status, COUNT(*) FROM deliveries_now \
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
