//! The SQLite store's dispatch queue: leased claims of lane heads, lease renewal, attempt
//! records, lane promotion and replay. Run by the writer thread inside its batch transaction.
//!
//! Only the head of each entity's lane is ever due (`due_at` set): [`super::ops`] makes a
//! delivery the head when its lane is empty, and [`finish_in_lane`] promotes the next one when
//! the head has no work left. So claims need no per-row lane check: different entities never
//! wait for each other, and one entity's deliveries come one at a time in lane order.

use rusqlite::{params, Connection, OptionalExtension};

use super::blob::BlobDir;
use super::ops::body_of;
use crate::delivery::{Payload, Status, UnixMillis};
use crate::ordering::Version;
use crate::store::{
    status_after_runs, AttemptResult, ChainRecord, Claimed, DueRun, ReplayOutcome, ReplayTarget,
    RunState, StoreError,
};

/// The columns a claim returns, in the order [`claimed_row`] reads them.
const CLAIM_COLUMNS: &str = "seq, delivery_id, topic, entity, version, project_id, fresh, \
    parse_error, received_at, blob_name, body_len, event, request_id, origin";

pub fn claim(
    conn: &Connection,
    blobs: &BlobDir,
    owner: &str,
    now: UnixMillis,
    until: UnixMillis,
    limit: u32,
    chain_max: u32,
) -> Result<Vec<Claimed>, StoreError> {
    let mut claimed = conn
        .prepare_cached(&format!(
            "UPDATE deliveries SET lease_owner = ?1, lease_until = ?2 WHERE seq IN ( \
                 SELECT d.seq FROM deliveries d \
                 WHERE d.due_at IS NOT NULL AND d.due_at <= ?3 \
                   AND (d.lease_until IS NULL OR d.lease_until < ?3) \
                 ORDER BY d.due_at, d.seq LIMIT ?4) \
             RETURNING {CLAIM_COLUMNS}"
        ))?
        .query_map(params![owner, until, now, i64::from(limit)], claimed_row)?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|row| with_body(conn, blobs, row))
        .collect::<Result<Vec<_>, StoreError>>()?;
    let mut due_runs = conn.prepare_cached(
        "SELECT handler, attempts FROM handler_runs \
         WHERE delivery_seq = ?1 AND state = 'pending' AND next_at <= ?2 ORDER BY handler",
    )?;
    for c in &mut claimed {
        c.runs = due_runs
            .query_map(params![c.seq, now], |row| {
                Ok(DueRun {
                    handler: row.get(0)?,
                    attempts: row.get::<_, i64>(1)?.max(0) as u32,
                })
            })?
            .collect::<Result<_, _>>()?;
        if chain_max > 0 {
            c.chain = chain_behind(conn, blobs, c, owner, now, until, chain_max)?;
        }
    }
    // Oldest first, so that a caller running them in order keeps arrival order.
    claimed.sort_by_key(|c| c.seq);
    Ok(claimed)
}

/// A claimed row, its body still to be read: the claim and where its body is.
type ClaimedRow = (Claimed, (Option<String>, i64));

fn claimed_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ClaimedRow> {
    let body_location = (row.get::<_, Option<String>>(9)?, row.get::<_, i64>(10)?);
    let claimed = Claimed {
        seq: row.get(0)?,
        delivery_id: row.get(1)?,
        topic: row.get(2)?,
        entity: row.get(3)?,
        version: row.get::<_, Option<i64>>(4)?.map(Version::from_nanos),
        project_id: row.get(5)?,
        fresh: row.get::<_, Option<bool>>(6)?.unwrap_or(true),
        body_is_json: row.get::<_, Option<String>>(7)?.is_none(),
        received_at: row.get(8)?,
        event: row.get(11)?,
        body: Payload::inline(bytes::Bytes::new()),
        runs: Vec::new(),
        request_id: row.get(12)?,
        chain: Vec::new(),
        origin: super::reads::origin_at(row, 13)?,
    };
    Ok((claimed, body_location))
}

fn with_body(
    conn: &Connection,
    blobs: &BlobDir,
    (mut claimed, (blob_name, len)): ClaimedRow,
) -> Result<Claimed, StoreError> {
    claimed.body = body_of(conn, blobs, claimed.seq, blob_name, len)?;
    Ok(claimed)
}

/// The deliveries waiting right behind the lane head `head`, each due for exactly the head's one
/// run and its first attempt, leased to `owner` with it; stops at the first that is not.
fn chain_behind(
    conn: &Connection,
    blobs: &BlobDir,
    head: &Claimed,
    owner: &str,
    now: UnixMillis,
    until: UnixMillis,
    chain_max: u32,
) -> Result<Vec<Claimed>, StoreError> {
    let (Some(entity), [run]) = (head.entity.as_deref(), head.runs.as_slice()) else {
        return Ok(Vec::new());
    };
    let waiting: Vec<(i64, bool)> = conn
        .prepare_cached(
            "SELECT seq, COALESCE(lease_until >= ?2, 0) FROM deliveries \
             WHERE entity = ?1 AND waiting = 1 ORDER BY lane_pos LIMIT ?3",
        )?
        .query_map(params![entity, now, i64::from(chain_max)], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut runs_of = conn.prepare_cached(
        "SELECT handler, state, attempts, next_at <= ?2 FROM handler_runs WHERE delivery_seq = ?1",
    )?;
    let mut lease = conn.prepare_cached(&format!(
        "UPDATE deliveries SET lease_owner = ?2, lease_until = ?3 WHERE seq = ?1 \
         RETURNING {CLAIM_COLUMNS}"
    ))?;
    let mut chain = Vec::new();
    for (seq, leased) in waiting {
        let runs: Vec<(String, String, i64, bool)> = runs_of
            .query_map(params![seq, now], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })?
            .collect::<Result<_, _>>()?;
        let same_first_run = matches!(
            runs.as_slice(),
            [(handler, state, 0, true)] if *handler == run.handler && state == "pending"
        );
        if leased || !same_first_run {
            break;
        }
        let row = lease.query_row(params![seq, owner, until], claimed_row)?;
        let mut member = with_body(conn, blobs, row)?;
        member.runs = vec![DueRun {
            handler: run.handler.clone(),
            attempts: 0,
        }];
        chain.push(member);
    }
    Ok(chain)
}

pub fn renew(
    conn: &Connection,
    owner: &str,
    seqs: &[i64],
    until: UnixMillis,
) -> Result<Vec<i64>, StoreError> {
    let mut extend = conn.prepare_cached(
        "UPDATE deliveries SET lease_until = ?3 WHERE seq = ?1 AND lease_owner = ?2",
    )?;
    let mut held = Vec::with_capacity(seqs.len());
    for &seq in seqs {
        if extend.execute(params![seq, owner, until])? == 1 {
            held.push(seq);
        }
    }
    Ok(held)
}

pub fn record_attempts(
    conn: &Connection,
    seq: i64,
    owner: &str,
    results: &[AttemptResult],
    now: UnixMillis,
) -> Result<Status, StoreError> {
    let holder = conn
        .prepare_cached("SELECT lease_owner FROM deliveries WHERE seq = ?1")?
        .query_row([seq], |row| row.get::<_, Option<String>>(0))
        .optional()?
        .flatten();
    if holder.as_deref() != Some(owner) {
        return Err(StoreError::LeaseLost(seq));
    }
    let mut update_run = conn.prepare_cached(
        "UPDATE handler_runs SET state = ?3, attempts = ?4, next_at = ?5, \
         last_error = COALESCE(?6, last_error) WHERE delivery_seq = ?1 AND handler = ?2",
    )?;
    let mut add_attempt = conn.prepare_cached(
        "INSERT INTO attempts (delivery_seq, handler, attempt, started_at, finished_at, \
         outcome, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for r in results {
        let error = r.outcome.error();
        update_run.execute(params![
            seq,
            r.handler,
            r.outcome.run_state().as_str(),
            r.attempt,
            r.outcome.next_at(),
            error
        ])?;
        add_attempt.execute(params![
            seq,
            r.handler,
            r.attempt,
            r.started_at,
            r.finished_at,
            r.outcome.kind().as_str(),
            error
        ])?;
    }
    let (next_due, dead, current) = conn
        .prepare_cached(
            "SELECT MIN(CASE WHEN state = 'pending' THEN next_at END), \
                    SUM(state = 'dead'), d.status \
             FROM deliveries d LEFT JOIN handler_runs h ON h.delivery_seq = d.seq \
             WHERE d.seq = ?1",
        )?
        .query_row([seq], |row| {
            Ok((
                row.get::<_, Option<i64>>(0)?,
                row.get::<_, Option<i64>>(1)?,
                row.get::<_, String>(2)?,
            ))
        })?;
    let current: Status = current.parse().map_err(StoreError::Corrupt)?;
    let status = status_after_runs(current, next_due.is_some(), dead.unwrap_or(0) > 0);
    conn.prepare_cached(
        // A chain member still waiting behind an unfinished delivery is not due, whatever it
        // has left.
        "UPDATE deliveries SET status = ?2, due_at = CASE WHEN waiting = 1 THEN NULL ELSE ?3 END, \
         lease_owner = NULL, lease_until = NULL WHERE seq = ?1",
    )?
    .execute(params![seq, status.as_str(), next_due])?;
    if next_due.is_none() {
        finish_in_lane(conn, seq, now)?;
    }
    Ok(status)
}

/// A head and its chain, in lane order: each member's attempts recorded, or its lease released
/// when it was not tried. Run inside a savepoint, so a lost lease records nothing.
pub fn record_chain(
    conn: &Connection,
    owner: &str,
    records: &[ChainRecord],
    now: UnixMillis,
) -> Result<(), StoreError> {
    let mut release = conn.prepare_cached(
        "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL \
         WHERE seq = ?1 AND lease_owner = ?2",
    )?;
    for record in records {
        if record.results.is_empty() {
            if release.execute(params![record.seq, owner])? == 0 {
                return Err(StoreError::LeaseLost(record.seq));
            }
        } else {
            record_attempts(conn, record.seq, owner, &record.results, now)?;
        }
    }
    Ok(())
}

/// Called when the lane head `seq` has no work left (done, dead, or taken back for replay):
/// the next waiting delivery of its entity, if any, becomes the head and is due now.
fn finish_in_lane(conn: &Connection, seq: i64, now: UnixMillis) -> Result<(), StoreError> {
    let head = conn
        .prepare_cached(
            "SELECT d.entity FROM deliveries d JOIN entities e ON e.entity = d.entity \
             WHERE d.seq = ?1 AND e.active_pos = d.lane_pos",
        )?
        .query_row([seq], |row| row.get::<_, String>(0))
        .optional()?;
    let Some(entity) = head else {
        return Ok(());
    };
    let next = conn
        .prepare_cached(
            "SELECT seq, lane_pos FROM deliveries WHERE entity = ?1 AND waiting = 1 \
             ORDER BY lane_pos LIMIT 1",
        )?
        .query_row([&entity], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
        })
        .optional()?;
    if let Some((next_seq, _)) = next {
        conn.prepare_cached("UPDATE deliveries SET waiting = 0, due_at = ?2 WHERE seq = ?1")?
            .execute(params![next_seq, now])?;
    }
    conn.prepare_cached("UPDATE entities SET active_pos = ?2 WHERE entity = ?1")?
        .execute(params![entity, next.map(|(_, pos)| pos)])?;
    Ok(())
}

pub fn replay(
    conn: &Connection,
    target: &ReplayTarget,
    now: UnixMillis,
) -> Result<ReplayOutcome, StoreError> {
    let rows: Vec<(i64, bool)> = match target {
        ReplayTarget::DeliveryId(id) => conn
            .prepare_cached(
                "SELECT seq, COALESCE(lease_until > ?2, 0) FROM deliveries WHERE delivery_id = ?1",
            )?
            .query_map(params![id, now], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?,
        ReplayTarget::Status(status) => conn
            .prepare_cached(
                "SELECT seq, COALESCE(lease_until > ?2, 0) FROM deliveries WHERE status = ?1",
            )?
            .query_map(params![status.as_str(), now], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?
            .collect::<Result<_, _>>()?,
    };
    // Runs that succeeded stay done; the others start over with fresh attempts.
    let mut forget_runs =
        conn.prepare_cached("DELETE FROM handler_runs WHERE delivery_seq = ?1 AND state <> ?2")?;
    // Back to the gate: the entity may have moved on meanwhile, and the ordering promise holds
    // for replays too (a replayed event older than what was applied since becomes `stale`).
    let mut reset = conn.prepare_cached(
        "UPDATE deliveries SET gated = 0, fresh = NULL, lane_pos = NULL, waiting = 0, \
         status = CASE WHEN status = 'unrecognized' THEN status ELSE 'pending' END, \
         due_at = NULL, lease_owner = NULL, lease_until = NULL WHERE seq = ?1",
    )?;
    let mut outcome = ReplayOutcome::default();
    for (seq, running) in rows {
        if running {
            // Being handled right now: replaying it would run it twice at once.
            outcome.running += 1;
            continue;
        }
        // A replayed lane head steps aside first, or it would wait behind itself.
        finish_in_lane(conn, seq, now)?;
        forget_runs.execute(params![seq, RunState::Done.as_str()])?;
        reset.execute([seq])?;
        outcome.replayed += 1;
    }
    Ok(outcome)
}
