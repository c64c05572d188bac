//! Every write the SQLite store makes, each run by the writer thread on its one connection
//! inside the current batch's transaction. Ops other than single statements run inside a
//! savepoint, so one failing op is undone alone and the rest of the batch commits.
//!
//! This file holds the intake and the gate; the lanes (claims, attempts, replay) are in
//! [`super::lanes`]. Statements are prepared once and cached (`prepare_cached`): the writer
//! runs the same few thousands of times a second.

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};

use super::blob::BlobDir;
use super::{lanes, prune};
use crate::delivery::{IncomingBody, NewDelivery, Payload, Status, UnixMillis};
use crate::ordering::{Applied, Verdict, Version};
use crate::store::gate::{applied, decide_in_lane};
use crate::store::retention::{Cutoffs, PruneReport};
use crate::store::{
    Accepted, AttemptResult, ChainRecord, Claimed, GateRequest, ReplayOutcome, ReplayTarget,
    StoreError,
};

/// A write, as queued for the writer. Times are taken from the store's clock when the op is
/// made.
#[derive(Debug)]
pub enum Op {
    Accept(Box<NewDelivery>),
    /// Proves the store takes commits (`/readyz`).
    Probe {
        now: UnixMillis,
    },
    Gate {
        gates: Vec<GateRequest>,
        now: UnixMillis,
    },
    Claim {
        owner: String,
        now: UnixMillis,
        until: UnixMillis,
        limit: u32,
        chain_max: u32,
    },
    Renew {
        owner: String,
        seqs: Vec<i64>,
        until: UnixMillis,
    },
    Record {
        seq: i64,
        /// The claim's owner: a record from a claim that was lost (lease expired and taken
        /// again, or the delivery replayed meanwhile) is refused.
        owner: String,
        results: Vec<AttemptResult>,
        now: UnixMillis,
    },
    /// A claimed chain's attempts, in lane order.
    RecordChain {
        owner: String,
        records: Vec<ChainRecord>,
        now: UnixMillis,
    },
    Replay {
        target: ReplayTarget,
        now: UnixMillis,
    },
    /// At start: one server per SQLite file, so every lease found is a dead process's.
    ReleaseLeases,
    /// One batch of retention.
    Prune {
        cutoffs: Cutoffs,
        limit: u32,
    },
    /// Gives up to `pages` free pages back to the file system.
    Reclaim {
        pages: u32,
    },
}

/// What an op produced; handed to its caller once the batch is committed.
#[derive(Debug)]
pub enum Output {
    Accepted(Accepted),
    Probed,
    /// Per gate, in order: its verdict, or `None` when it failed or was gated already.
    Gated(Vec<Option<Verdict>>),
    Claimed(Vec<Claimed>),
    Renewed(Vec<i64>),
    Recorded(Status),
    RecordedChain,
    Replayed(ReplayOutcome),
    Released(u64),
    /// What the batch removed, and the blob files to delete now that it is committed.
    Pruned(PruneReport, Vec<String>),
    /// True when free pages are left.
    Reclaimed(bool),
}

impl Op {
    /// The dispatcher's bookkeeping (and the operator's), as opposed to deliveries coming in:
    /// committed first when both wait.
    pub fn is_dispatch(&self) -> bool {
        !matches!(self, Op::Accept(_) | Op::Probe { .. })
    }

    /// Single statements are atomic by themselves and skip the savepoint; `Gate` keeps its
    /// own, so that one failing gate does not undo the others; `Accept` undoes its row itself
    /// when its body cannot be stored.
    pub fn needs_savepoint(&self) -> bool {
        !matches!(
            self,
            Op::Accept(_)
                | Op::Probe { .. }
                | Op::ReleaseLeases
                | Op::Gate { .. }
                | Op::Renew { .. }
                | Op::Reclaim { .. }
        )
    }

    /// Runs the op on the writer's connection (inside the open transaction).
    pub fn run(&self, conn: &Connection, blobs: &BlobDir) -> Result<Output, StoreError> {
        match self {
            Op::Accept(d) => insert(conn, d).map(Output::Accepted),
            Op::Probe { now } => {
                conn.prepare_cached("UPDATE probe SET at = ?1 WHERE id = 1")?
                    .execute([now])?;
                Ok(Output::Probed)
            }
            Op::Gate { gates, now } => Ok(Output::Gated(record_gates(conn, gates, *now)?)),
            Op::Claim {
                owner,
                now,
                until,
                limit,
                chain_max,
            } => lanes::claim(conn, blobs, owner, *now, *until, *limit, *chain_max)
                .map(Output::Claimed),
            Op::Renew { owner, seqs, until } => {
                lanes::renew(conn, owner, seqs, *until).map(Output::Renewed)
            }
            Op::Record {
                seq,
                owner,
                results,
                now,
            } => lanes::record_attempts(conn, *seq, owner, results, *now).map(Output::Recorded),
            Op::RecordChain {
                owner,
                records,
                now,
            } => lanes::record_chain(conn, owner, records, *now).map(|()| Output::RecordedChain),
            Op::Replay { target, now } => lanes::replay(conn, target, *now).map(Output::Replayed),
            Op::ReleaseLeases => {
                let n = conn
                    .prepare_cached(
                        "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL \
                         WHERE lease_owner IS NOT NULL",
                    )?
                    .execute([])?;
                Ok(Output::Released(n as u64))
            }
            Op::Prune { cutoffs, limit } => {
                let (report, blobs) = prune::prune_batch(conn, cutoffs, *limit)?;
                Ok(Output::Pruned(report, blobs))
            }
            Op::Reclaim { pages } => prune::reclaim(conn, *pages).map(Output::Reclaimed),
        }
    }
}

fn insert(conn: &Connection, d: &NewDelivery) -> Result<Accepted, StoreError> {
    let headers = serde_json::to_string(&d.headers)
        .map_err(|e| StoreError::Corrupt(format!("headers: {e}")))?;
    let (inline, blob_name): (Option<&[u8]>, Option<&str>) = match &d.body {
        IncomingBody::Inline(bytes) => (Some(bytes), None),
        IncomingBody::Staged(staged) => (None, Some(staged.key())),
    };
    // One statement: the dedup (unique key), the id-conflict flag and the row.
    let inserted = conn
        .prepare_cached(
            "INSERT INTO deliveries (delivery_id, body_sha256, id_conflict, endpoint, topic, \
                 client_ip, headers, blob_name, body_len, received_at, status, request_id, origin) \
             SELECT ?1, ?2, EXISTS (SELECT 1 FROM deliveries WHERE delivery_id = ?1 AND body_sha256 <> ?2), \
                 ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12 WHERE true \
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
                d.body.len() as i64,
                d.received_at,
                d.status.as_str(),
                d.request_id,
                d.origin.as_str(),
            ],
            |row| Ok((row.get::<_, i64>(0)?, row.get::<_, bool>(1)?)),
        )
        .optional()?;
    match inserted {
        Some((seq, id_conflict)) => {
            if let Some(body) = inline {
                let stored = conn
                    .prepare_cached("INSERT INTO bodies (seq, body) VALUES (?1, ?2)")
                    .and_then(|mut insert| insert.execute(params![seq, body]));
                if let Err(e) = stored {
                    // Undone by hand rather than in a savepoint (which costs more than the
                    // insert): no delivery row without its body.
                    conn.prepare_cached("DELETE FROM deliveries WHERE seq = ?1")?
                        .execute([seq])?;
                    return Err(e.into());
                }
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

/// A row's body: the blob file it names, or its row in `bodies`.
pub(super) fn body_of(
    conn: &Connection,
    blobs: &BlobDir,
    seq: i64,
    blob_name: Option<String>,
    len: i64,
) -> Result<Payload, StoreError> {
    Ok(match blob_name {
        Some(name) => Payload::stored(len.max(0) as u64, blobs.source(&name)),
        None => Payload::inline(Bytes::from(
            conn.prepare_cached("SELECT body FROM bodies WHERE seq = ?1")?
                .query_row([seq], |row| row.get::<_, Vec<u8>>(0))
                .optional()?
                // Never an empty body in its place: that would hand handlers a wrong event.
                .ok_or_else(|| StoreError::Corrupt(format!("delivery {seq} has no body")))?,
        )),
    })
}

/// Runs `work` in a savepoint: kept when it succeeds, undone alone when it fails. The outer
/// error is the savepoint's own (the transaction is then in no state to go on).
///
/// The savepoint statements are prepared once and cached: `Connection::execute_batch`, which
/// rusqlite's `Savepoint` uses, parses its SQL on every call, and at one savepoint per op that
/// was a good share of the writer's time.
pub fn in_savepoint<T>(
    conn: &Connection,
    work: impl FnOnce() -> Result<T, StoreError>,
) -> Result<Result<T, StoreError>, StoreError> {
    conn.prepare_cached("SAVEPOINT op")?.execute([])?;
    let result = work();
    if result.is_err() {
        conn.prepare_cached("ROLLBACK TO op")?.execute([])?;
    }
    conn.prepare_cached("RELEASE op")?.execute([])?;
    Ok(result)
}

/// The gates of a batch; one that fails is left for the next round alone.
fn record_gates(
    conn: &Connection,
    gates: &[GateRequest],
    now: UnixMillis,
) -> Result<Vec<Option<Verdict>>, StoreError> {
    // All at once first; only when one fails, again one by one, each in a savepoint of its
    // own (a savepoint per gate costs a good share of the gate itself).
    let all = in_savepoint(conn, || {
        gates
            .iter()
            .map(|gate| record_gate(conn, gate, now))
            .collect::<Result<Vec<_>, _>>()
    })?;
    if let Ok(verdicts) = all {
        return Ok(verdicts);
    }
    let mut verdicts = Vec::with_capacity(gates.len());
    for gate in gates {
        match in_savepoint(conn, || record_gate(conn, gate, now))? {
            Ok(verdict) => verdicts.push(verdict),
            Err(e) => {
                tracing::error!(seq = gate.seq, error = %e, "gate failed; left for the next round");
                verdicts.push(None);
            }
        }
    }
    Ok(verdicts)
}

/// An entity's last applied state, the lane position its next delivery takes, and its lane's
/// head (nothing applied, position 0 and no head for an entity never seen).
fn entity_state(
    conn: &Connection,
    entity: &str,
) -> Result<(Option<Applied>, i64, Option<i64>), StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT version, change, lane_next, active_pos, backfilled FROM entities \
             WHERE entity = ?1",
        )?
        .query_row([entity], |row| {
            Ok((
                row.get::<_, Option<i64>>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, Option<i64>>(3)?,
                row.get::<_, bool>(4)?,
            ))
        })
        .optional()?;
    Ok(match row {
        None => (None, 0, None),
        Some((version, change, lane_next, active_pos, backfilled)) => (
            Some(applied(version, &change, backfilled)?),
            lane_next,
            active_pos,
        ),
    })
}

/// The gate: decide against the entity's last applied state and record everything at once.
/// `None` when the delivery was gated already.
fn record_gate(
    conn: &Connection,
    gate: &GateRequest,
    now: UnixMillis,
) -> Result<Option<Verdict>, StoreError> {
    let gated = conn
        .prepare_cached("SELECT gated FROM deliveries WHERE seq = ?1")?
        .query_row([gate.seq], |row| row.get::<_, bool>(0))
        .optional()?;
    if gated != Some(false) {
        return Ok(None);
    }
    let (verdict, lane_pos, lane_busy) = match &gate.entity {
        None => (Verdict::Fresh, None, false),
        Some(entity) => {
            let (last, lane_pos, active_pos) = entity_state(conn, entity)?;
            let decision = decide_in_lane(last, lane_pos, active_pos, gate);
            conn.prepare_cached(
                "INSERT INTO entities (entity, version, change, lane_next, active_pos, updated_at, \
                     backfilled) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT (entity) DO UPDATE SET version = excluded.version, \
                 change = excluded.change, lane_next = excluded.lane_next, \
                 active_pos = excluded.active_pos, updated_at = excluded.updated_at, \
                 backfilled = excluded.backfilled",
            )?
            .execute(params![
                entity,
                decision.state.version.map(Version::as_nanos),
                decision.state.change.as_str(),
                lane_pos + 1,
                decision.active_pos,
                now,
                decision.state.backfilled,
            ])?;
            (decision.verdict, Some(lane_pos), active_pos.is_some())
        }
    };
    let fresh = verdict.is_fresh();
    let handlers = gate.handlers(fresh);
    let waiting = lane_busy && !handlers.is_empty();
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
         due_at = ?10, waiting = ?11, event = ?12 WHERE seq = ?1",
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
        gate.status(fresh).as_str(),
        (!handlers.is_empty() && !waiting).then_some(now),
        waiting,
        gate.event,
    ])?;
    Ok(Some(verdict))
}
