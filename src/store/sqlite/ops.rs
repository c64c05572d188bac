//! Every write the SQLite store makes, each a function run by the writer thread on its one
//! connection inside the current batch's transaction. Ops other than single statements run
//! inside a savepoint, so one failing op is undone alone and the rest of the batch commits.
//!
//! Statements are prepared once and cached (`prepare_cached`): the writer runs the same few
//! thousands of times a second.

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};

use crate::ordering::{self, Applied, Change, Verdict, Version};
use crate::store::{
    now_millis, Accepted, AttemptOutcome, AttemptResult, BlobDir, Claimed, DueRun, GateRequest,
    IncomingBody, NewDelivery, Payload, ReplayOutcome, ReplayTarget, Status, StoreError,
};

/// A write, as queued for the writer.
#[derive(Debug)]
pub enum Op {
    Accept(NewDelivery),
    /// Proves the store takes commits (`/readyz`).
    Probe,
    Gate(Vec<GateRequest>),
    Claim {
        owner: String,
        lease_ms: i64,
        limit: u32,
    },
    Record {
        seq: i64,
        /// The claim's owner: a record from a claim that was lost (lease expired and taken
        /// again, or the delivery replayed meanwhile) is refused.
        owner: String,
        results: Vec<AttemptResult>,
    },
    Replay(ReplayTarget),
    ReleaseLeases,
}

/// What an op produced; handed to its caller once the batch is committed.
#[derive(Debug)]
pub enum Output {
    Accepted(Accepted),
    Probed,
    /// Per gate, in order: its verdict, or `None` when it failed and stays ungated.
    Gated(Vec<Option<Verdict>>),
    Claimed(Vec<Claimed>),
    Recorded(Status),
    Replayed(ReplayOutcome),
    Released(u64),
}

impl Op {
    /// Single statements are atomic by themselves and skip the savepoint; `Gate` keeps one
    /// per delivery itself, so that one failing gate does not undo the others.
    pub fn needs_savepoint(&self) -> bool {
        !matches!(self, Op::Probe | Op::ReleaseLeases | Op::Gate(_))
    }

    /// Runs the op on the writer's connection (inside the open transaction).
    pub fn run(&self, conn: &Connection, blobs: &BlobDir) -> Result<Output, StoreError> {
        match self {
            Op::Accept(d) => insert(conn, d).map(Output::Accepted),
            Op::Probe => {
                conn.prepare_cached("UPDATE probe SET at = ?1 WHERE id = 1")?
                    .execute([now_millis()])?;
                Ok(Output::Probed)
            }
            Op::Gate(gates) => {
                let mut verdicts = Vec::with_capacity(gates.len());
                for gate in gates {
                    conn.execute_batch("SAVEPOINT gate")?;
                    match record_gate(conn, gate) {
                        Ok(verdict) => {
                            conn.execute_batch("RELEASE gate")?;
                            verdicts.push(Some(verdict));
                        }
                        Err(e) => {
                            conn.execute_batch("ROLLBACK TO gate; RELEASE gate")?;
                            tracing::error!(seq = gate.seq, error = %e, "gate failed; left for the next round");
                            verdicts.push(None);
                        }
                    }
                }
                Ok(Output::Gated(verdicts))
            }
            Op::Claim {
                owner,
                lease_ms,
                limit,
            } => claim(conn, blobs, owner, *lease_ms, *limit).map(Output::Claimed),
            Op::Record {
                seq,
                owner,
                results,
            } => record_attempts(conn, *seq, owner, results).map(Output::Recorded),
            Op::Replay(target) => replay(conn, target).map(Output::Replayed),
            Op::ReleaseLeases => {
                // One server per SQLite file: a lease found at start is a dead process's.
                let n = conn
                    .prepare_cached(
                        "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL \
                         WHERE lease_owner IS NOT NULL",
                    )?
                    .execute([])?;
                Ok(Output::Released(n as u64))
            }
        }
    }
}

fn insert(conn: &Connection, d: &NewDelivery) -> Result<Accepted, StoreError> {
    let headers = serde_json::to_string(&d.headers)
        .map_err(|e| StoreError::Corrupt(format!("headers: {e}")))?;
    let (inline, blob_name, body_len): (Option<&[u8]>, Option<String>, i64) = match &d.body {
        IncomingBody::Inline(bytes) => (Some(bytes), None, bytes.len() as i64),
        IncomingBody::Blob(blob) => (None, Some(blob.name()), blob.len() as i64),
    };
    // One statement: the dedup (unique key), the id-conflict flag and the row.
    let inserted = conn
        .prepare_cached(
            "INSERT INTO deliveries (delivery_id, body_sha256, id_conflict, endpoint, topic, \
                 client_ip, headers, blob_name, body_len, received_at, status) \
             SELECT ?1, ?2, EXISTS (SELECT 1 FROM deliveries WHERE delivery_id = ?1 AND body_sha256 <> ?2), \
                 ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10 WHERE true \
             ON CONFLICT (delivery_id, body_sha256) DO NOTHING \
             RETURNING seq, id_conflict",
        )?
        .query_row(
            params![
                d.delivery_id,
                &d.body_sha256[..],
                d.endpoint,
                d.topic,
                d.client_ip.to_string(),
                headers,
                blob_name,
                body_len,
                d.received_at,
                d.status.as_str(),
            ],
            |row| Ok((row.get::<_, i64>(0)?, row.get::<_, bool>(1)?)),
        )
        .optional()?;
    match inserted {
        Some((seq, id_conflict)) => {
            if let Some(body) = inline {
                conn.prepare_cached("INSERT INTO bodies (seq, body) VALUES (?1, ?2)")?
                    .execute(params![seq, body])?;
            }
            Ok(Accepted {
                seq,
                duplicate: false,
                id_conflict,
            })
        }
        None => {
            let seq = conn
                .prepare_cached(
                    "SELECT seq FROM deliveries WHERE delivery_id = ?1 AND body_sha256 = ?2",
                )?
                .query_row(params![d.delivery_id, &d.body_sha256[..]], |row| row.get(0))?;
            Ok(Accepted {
                seq,
                duplicate: true,
                id_conflict: false,
            })
        }
    }
}

/// The gate: decide against the entity's last applied state and record everything at once.
fn record_gate(conn: &Connection, gate: &GateRequest) -> Result<Verdict, StoreError> {
    let now = now_millis();
    let (verdict, lane_pos, lane_busy) = match &gate.entity {
        None => (Verdict::Fresh, None, false),
        Some(entity) => {
            let last = conn
                .prepare_cached(
                    "SELECT version, change, lane_next, active_pos FROM entities WHERE entity = ?1",
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
            let (last, lane_pos, active_pos) = match last {
                None => (None, 0_i64, None),
                Some((version, change, lane_next, active_pos)) => {
                    let applied = Applied {
                        version: version.map(Version::from_nanos),
                        change: Change::parse(&change)
                            .ok_or_else(|| StoreError::Corrupt(format!("change {change:?}")))?,
                    };
                    (Some(applied), lane_next, active_pos)
                }
            };
            let (verdict, applied) = ordering::decide(last.as_ref(), gate.version, gate.change);
            // A stale event keeps the entity's state but still takes a lane position, so a
            // route that delivers stale events sees them in arrival order too.
            let state = applied.or(last).unwrap_or(Applied {
                version: gate.version,
                change: gate.change,
            });
            let handlers = gate.handlers(verdict.is_fresh());
            // This delivery heads the lane when nothing before it has work left; otherwise it
            // waits to be promoted by the one before it.
            let becomes_head = !handlers.is_empty() && active_pos.is_none();
            conn.prepare_cached(
                "INSERT INTO entities (entity, version, change, lane_next, active_pos, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (entity) DO UPDATE SET version = excluded.version, \
                 change = excluded.change, lane_next = excluded.lane_next, \
                 active_pos = excluded.active_pos, updated_at = excluded.updated_at",
            )?
            .execute(params![
                entity,
                state.version.map(Version::as_nanos),
                state.change.as_str(),
                lane_pos + 1,
                if becomes_head { Some(lane_pos) } else { active_pos },
                now
            ])?;
            (verdict, Some(lane_pos), active_pos.is_some())
        }
    };
    let fresh = verdict.is_fresh();
    let handlers = gate.handlers(fresh);
    let waiting = lane_busy && !handlers.is_empty();
    let status = if gate.parse_error.is_some() || !gate.recognized {
        Status::Unrecognized
    } else if !fresh {
        Status::Stale
    } else if handlers.is_empty() {
        Status::Delivered
    } else {
        Status::Pending
    };
    let mut add_run = conn.prepare_cached(
        "INSERT INTO handler_runs (delivery_seq, handler, state, attempts, next_at) \
         VALUES (?1, ?2, 'pending', 0, ?3) ON CONFLICT DO NOTHING",
    )?;
    for handler in handlers {
        add_run.execute(params![gate.seq, handler, now])?;
    }
    conn.prepare_cached(
        "UPDATE deliveries SET gated = 1, entity = ?2, version = ?3, change = ?4, \
         project_id = ?5, fresh = ?6, lane_pos = ?7, parse_error = ?8, status = ?9, \
         due_at = ?10, waiting = ?11 WHERE seq = ?1",
    )?
    .execute(params![
        gate.seq,
        gate.entity,
        gate.version.map(Version::as_nanos),
        gate.change.as_str(),
        gate.project_id,
        fresh,
        lane_pos,
        gate.parse_error,
        status.as_str(),
        (!handlers.is_empty() && !waiting).then_some(now),
        waiting,
    ])?;
    Ok(verdict)
}

/// A claimed row's body: the blob file it names, or its row in `bodies`.
fn body_of(
    conn: &Connection,
    blobs: &BlobDir,
    seq: i64,
    blob_name: Option<String>,
    len: i64,
) -> Result<Payload, StoreError> {
    Ok(match blob_name {
        Some(name) => Payload::File {
            path: blobs.resolve(&name),
            len: len.max(0) as u64,
        },
        None => Payload::Inline(Bytes::from(
            conn.prepare_cached("SELECT body FROM bodies WHERE seq = ?1")?
                .query_row([seq], |row| row.get::<_, Vec<u8>>(0))
                .optional()?
                // Never an empty body in its place: that would hand handlers a wrong event.
                .ok_or_else(|| StoreError::Corrupt(format!("delivery {seq} has no body")))?,
        )),
    })
}

fn claim(
    conn: &Connection,
    blobs: &BlobDir,
    owner: &str,
    lease_ms: i64,
    limit: u32,
) -> Result<Vec<Claimed>, StoreError> {
    let now = now_millis();
    // Only the head of each entity's lane is ever due (see `record_gate` and `finish_in_lane`),
    // so this needs no per-row lane check: different entities never wait for each other, and
    // one entity's deliveries come one at a time in lane order.
    let mut claimed = conn
        .prepare_cached(
            "UPDATE deliveries SET lease_owner = ?1, lease_until = ?2 WHERE seq IN ( \
                 SELECT d.seq FROM deliveries d \
                 WHERE d.due_at IS NOT NULL AND d.due_at <= ?3 \
                   AND (d.lease_until IS NULL OR d.lease_until < ?3) \
                 ORDER BY d.due_at, d.seq LIMIT ?4) \
             RETURNING seq, delivery_id, topic, entity, version, project_id, fresh, \
                 parse_error, received_at, blob_name, body_len",
        )?
        .query_map(
            params![owner, now.saturating_add(lease_ms), now, i64::from(limit)],
            |row| {
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
                    body: Payload::Inline(Bytes::new()),
                    runs: Vec::new(),
                };
                Ok((claimed, body_location))
            },
        )?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|(mut claimed, (path, len))| {
            claimed.body = body_of(conn, blobs, claimed.seq, path, len)?;
            Ok(claimed)
        })
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
    }
    // Oldest first, so that a caller running them in order keeps arrival order.
    claimed.sort_by_key(|c| c.seq);
    Ok(claimed)
}

fn record_attempts(
    conn: &Connection,
    seq: i64,
    owner: &str,
    results: &[AttemptResult],
) -> Result<Status, StoreError> {
    let holder = conn
        .prepare_cached("SELECT lease_owner FROM deliveries WHERE seq = ?1")?
        .query_row([seq], |row| row.get::<_, Option<String>>(0))?;
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
        let (state, next_at, error, outcome) = match &r.outcome {
            AttemptOutcome::Ok => ("done", None, None, "ok"),
            AttemptOutcome::Retry { next_at, error } => {
                ("pending", Some(*next_at), Some(error.as_str()), "retry")
            }
            AttemptOutcome::Dead { error } => ("dead", None, Some(error.as_str()), "dead"),
        };
        update_run.execute(params![seq, r.handler, state, r.attempt, next_at, error])?;
        add_attempt.execute(params![
            seq,
            r.handler,
            r.attempt,
            r.started_at,
            r.finished_at,
            outcome,
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
    let status = match (next_due, dead.unwrap_or(0) > 0, current) {
        (Some(_), _, current) => current,
        (None, true, _) => Status::Dead,
        (None, false, Status::Pending) => Status::Delivered,
        (None, false, current) => current,
    };
    conn.prepare_cached(
        "UPDATE deliveries SET status = ?2, due_at = ?3, lease_owner = NULL, \
         lease_until = NULL WHERE seq = ?1",
    )?
    .execute(params![seq, status.as_str(), next_due])?;
    if next_due.is_none() {
        finish_in_lane(conn, seq)?;
    }
    Ok(status)
}

/// Called when the lane head `seq` has no work left (done, dead, or taken back for replay):
/// the next waiting delivery of its entity, if any, becomes the head and is due now.
fn finish_in_lane(conn: &Connection, seq: i64) -> Result<(), StoreError> {
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
            .execute(params![next_seq, now_millis()])?;
    }
    conn.prepare_cached("UPDATE entities SET active_pos = ?2 WHERE entity = ?1")?
        .execute(params![entity, next.map(|(_, pos)| pos)])?;
    Ok(())
}

fn replay(conn: &Connection, target: &ReplayTarget) -> Result<ReplayOutcome, StoreError> {
    let now = now_millis();
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
    let mut forget_runs = conn
        .prepare_cached("DELETE FROM handler_runs WHERE delivery_seq = ?1 AND state <> 'done'")?;
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
        finish_in_lane(conn, seq)?;
        forget_runs.execute([seq])?;
        reset.execute([seq])?;
        outcome.replayed += 1;
    }
    Ok(outcome)
}
