//! Retention for the SQLite store: which deliveries and bodies may go, removing them in one
//! batch (run by the writer, inside its transaction), counting them for a dry run (on a reader),
//! and the statistics the metrics show.
//!
//! A delivery may go only when it has no work left: gated, nothing due, not waiting in a lane,
//! not `pending`. Rows are taken oldest first. Blob files of removed bodies are deleted by the
//! writer once the batch is committed.

use rusqlite::{params, Connection};

use crate::delivery::Status;
use crate::store::retention::{Cutoffs, PruneReport, StoreStats};
use crate::store::StoreError;

/// Finished: nothing left to do for it.
const FINISHED: &str = "gated = 1 AND due_at IS NULL AND waiting = 0 AND status <> 'pending'";

/// One prunable row: what it is and what it holds.
struct Doomed {
    seq: i64,
    status: Status,
    blob_name: Option<String>,
    /// Bytes of body still kept (0 when it was dropped already).
    body_bytes: u64,
}

fn doomed(row: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, String, Option<String>, i64, bool)> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ))
}

fn read_doomed(
    rows: Vec<(i64, String, Option<String>, i64, bool)>,
) -> Result<Vec<Doomed>, StoreError> {
    rows.into_iter()
        .map(|(seq, status, blob_name, len, pruned)| {
            Ok(Doomed {
                seq,
                status: status.parse().map_err(StoreError::Corrupt)?,
                blob_name,
                body_bytes: if pruned { 0 } else { len.max(0) as u64 },
            })
        })
        .collect()
}

/// Rows past their retention, oldest first.
fn rows_to_delete(conn: &Connection, c: &Cutoffs, limit: u32) -> Result<Vec<Doomed>, StoreError> {
    let sql = format!(
        "SELECT seq, status, blob_name, body_len, body_pruned FROM deliveries \
         WHERE {FINISHED} AND ((status = 'delivered' AND received_at < ?1) \
            OR (status IN ('stale', 'unrecognized', 'dead') AND received_at < ?2)) \
         ORDER BY seq LIMIT ?3"
    );
    let rows = conn
        .prepare_cached(&sql)?
        .query_map(
            params![c.delivered_before, c.investigated_before, i64::from(limit)],
            doomed,
        )?
        .collect::<Result<Vec<_>, _>>()?;
    read_doomed(rows)
}

/// Delivered rows whose bodies are past their retention (the rows stay), oldest first.
fn bodies_to_drop(conn: &Connection, c: &Cutoffs, limit: u32) -> Result<Vec<Doomed>, StoreError> {
    let sql = format!(
        "SELECT seq, status, blob_name, body_len, body_pruned FROM deliveries \
         WHERE {FINISHED} AND status = 'delivered' AND body_pruned = 0 AND received_at < ?1 \
         ORDER BY seq LIMIT ?2"
    );
    let rows = conn
        .prepare_cached(&sql)?
        .query_map(params![c.bodies_before, i64::from(limit)], doomed)?
        .collect::<Result<Vec<_>, _>>()?;
    read_doomed(rows)
}

/// Bytes of bodies kept.
fn body_bytes(conn: &Connection) -> Result<u64, StoreError> {
    let bytes: i64 = conn
        .prepare_cached("SELECT COALESCE(SUM(body_len), 0) FROM deliveries WHERE body_pruned = 0")?
        .query_row([], |row| row.get(0))?;
    Ok(bytes.max(0) as u64)
}

/// Over the budget: the oldest finished deliveries whose bodies, dropped, bring the bytes kept
/// back under it (at most `limit` of them), skipping those in `already`.
fn bodies_over_budget(
    conn: &Connection,
    c: &Cutoffs,
    limit: u32,
    freed: u64,
    already: &[i64],
) -> Result<Vec<Doomed>, StoreError> {
    let Some(budget) = c.max_body_bytes else {
        return Ok(Vec::new());
    };
    let kept = body_bytes(conn)?.saturating_sub(freed);
    let mut excess = kept.saturating_sub(budget);
    if excess == 0 {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT seq, status, blob_name, body_len, body_pruned FROM deliveries \
         WHERE {FINISHED} AND body_pruned = 0 ORDER BY seq LIMIT ?1"
    );
    let rows = conn
        .prepare_cached(&sql)?
        .query_map(params![i64::from(limit) + already.len() as i64], doomed)?
        .collect::<Result<Vec<_>, _>>()?;
    let mut picked = Vec::new();
    for row in read_doomed(rows)? {
        if excess == 0 || picked.len() as u32 >= limit {
            break;
        }
        if already.contains(&row.seq) || row.body_bytes == 0 {
            continue;
        }
        excess = excess.saturating_sub(row.body_bytes);
        picked.push(row);
    }
    Ok(picked)
}

/// What one batch removes: rows, then bodies by age, then bodies over the budget.
fn plan(
    conn: &Connection,
    c: &Cutoffs,
    limit: u32,
) -> Result<(Vec<Doomed>, Vec<Doomed>), StoreError> {
    let rows = rows_to_delete(conn, c, limit)?;
    let deleted: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    let mut bodies: Vec<Doomed> = bodies_to_drop(conn, c, limit)?
        .into_iter()
        .filter(|b| !deleted.contains(&b.seq))
        .collect();
    let freed: u64 = rows.iter().chain(&bodies).map(|d| d.body_bytes).sum();
    let mut skip = deleted;
    skip.extend(bodies.iter().map(|b| b.seq));
    bodies.extend(bodies_over_budget(conn, c, limit, freed, &skip)?);
    Ok((rows, bodies))
}

fn report(rows: &[Doomed], bodies: &[Doomed]) -> PruneReport {
    let mut report = PruneReport::default();
    for row in rows {
        report.add(&PruneReport {
            deleted: vec![(row.status, 1)],
            bodies_dropped: 0,
            body_bytes: row.body_bytes,
        });
    }
    report.bodies_dropped = bodies.len() as u64;
    report.body_bytes += bodies.iter().map(|b| b.body_bytes).sum::<u64>();
    report
}

/// Counts what pruning would remove now, changing nothing.
pub fn dry_run(conn: &Connection, c: &Cutoffs) -> Result<PruneReport, StoreError> {
    let (rows, bodies) = plan(conn, c, u32::MAX)?;
    Ok(report(&rows, &bodies))
}

/// Removes one batch; returns what it removed and the blob files to delete after the commit.
pub fn prune_batch(
    conn: &Connection,
    c: &Cutoffs,
    limit: u32,
) -> Result<(PruneReport, Vec<String>), StoreError> {
    let (rows, bodies) = plan(conn, c, limit)?;
    let mut blobs = Vec::new();
    for row in &rows {
        for sql in [
            "DELETE FROM attempts WHERE delivery_seq = ?1",
            "DELETE FROM handler_runs WHERE delivery_seq = ?1",
            "DELETE FROM bodies WHERE seq = ?1",
            "DELETE FROM deliveries WHERE seq = ?1",
        ] {
            conn.prepare_cached(sql)?.execute([row.seq])?;
        }
        blobs.extend(row.blob_name.clone());
    }
    for body in &bodies {
        conn.prepare_cached("DELETE FROM bodies WHERE seq = ?1")?
            .execute([body.seq])?;
        conn.prepare_cached(
            "UPDATE deliveries SET body_pruned = 1, blob_name = NULL WHERE seq = ?1",
        )?
        .execute([body.seq])?;
        blobs.extend(body.blob_name.clone());
    }
    Ok((report(&rows, &bodies), blobs))
}

/// Gives up to `pages` free pages back to the file system; true when some are left.
pub fn reclaim(conn: &Connection, pages: u32) -> Result<bool, StoreError> {
    conn.execute_batch(&format!("PRAGMA incremental_vacuum({pages})"))?;
    let left: i64 = conn.query_row("PRAGMA freelist_count", [], |row| row.get(0))?;
    Ok(left > 0)
}

pub fn stats(conn: &Connection) -> Result<StoreStats, StoreError> {
    let pragma = |name: &str| -> Result<i64, StoreError> {
        Ok(conn.query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))?)
    };
    let used_pages = pragma("page_count")? - pragma("freelist_count")?;
    let deliveries = conn
        .prepare_cached("SELECT status, COUNT(*) FROM deliveries GROUP BY status")?
        .query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|(status, n)| {
            Ok((
                status.parse().map_err(StoreError::Corrupt)?,
                n.max(0) as u64,
            ))
        })
        .collect::<Result<Vec<(Status, u64)>, StoreError>>()?;
    let oldest: Option<i64> = conn
        .prepare_cached("SELECT MIN(received_at) FROM deliveries")?
        .query_row([], |row| row.get(0))?;
    Ok(StoreStats {
        database_bytes: (used_pages.max(0) * pragma("page_size")?) as u64,
        body_bytes: body_bytes(conn)?,
        deliveries,
        oldest_received_at: oldest,
    })
}
