//! The records appended after a delivery is stored, each written once: the gate's verdict (with
//! the entity's new state), every attempt of a handler, the closing of a delivery's work, and a
//! replay. Run by the writer inside its batch's transaction; what they change in the dispatch
//! state in memory is applied only once the batch is committed ([`super::ops::Done`]).

use std::collections::HashSet;

use rusqlite::{params, Connection, OptionalExtension};

use super::ops::{in_savepoint, Ctx, Done, Reply};
use super::queue::{Arrival, Gated, MemQueue, Outcome, Run};
use super::reads;
use crate::delivery::{Origin, Status, UnixMillis};
use crate::ordering::{Applied, Verdict, Version};
use crate::store::gate::{applied, decide};
use crate::store::{ChainRecord, GateRequest, ReplayItem, ReplayTarget, RunState, StoreError};

/// One gate decided: its verdict, and what joins the dispatch state.
type Decided = (Verdict, Gated);

/// The verdicts of a batch of gates, decided in order against each entity's applied state.
/// All in one savepoint; only when one fails are they done again one by one, so that the
/// failing one alone is left for the next round.
pub fn gate(
    ctx: &Ctx<'_>,
    gates: Vec<GateRequest>,
    now: UnixMillis,
    reply: Reply<Vec<Option<Verdict>>>,
) -> Done {
    let conn = ctx.conn;
    let all = in_savepoint(conn, || {
        let mut seen = HashSet::new();
        gates
            .iter()
            .map(|g| gate_one(ctx, g, now, &mut seen))
            .collect::<Result<Vec<_>, _>>()
    });
    let decided = match all {
        Ok(Ok(decided)) => decided,
        Ok(Err(_)) => {
            let mut seen = HashSet::new();
            let mut decided = Vec::with_capacity(gates.len());
            for g in &gates {
                match in_savepoint(conn, || gate_one(ctx, g, now, &mut seen)) {
                    Ok(Ok(d)) => decided.push(d),
                    Ok(Err(e)) => {
                        tracing::error!(seq = g.seq, error = %e, "gate failed; left for the next round");
                        decided.push(None);
                    }
                    Err(fatal) => return Done::answer(reply, Err(fatal)),
                }
            }
            decided
        }
        Err(fatal) => return Done::answer(reply, Err(fatal)),
    };
    Done::on_commit(reply, move |queue| {
        let mut verdicts = Vec::with_capacity(decided.len());
        let mut new_work = false;
        for d in decided {
            verdicts.push(d.as_ref().map(|(verdict, _)| *verdict));
            if let Some((_, gated)) = d {
                new_work |= gated.runs.iter().any(|r| r.state == RunState::Pending);
                queue.gated(gated);
            }
        }
        (verdicts, new_work)
    })
}

/// Decides one gate and appends its verdict; `None` when the delivery is not waiting for the
/// gate (gated already, by an earlier request of this batch or before).
fn gate_one(
    ctx: &Ctx<'_>,
    gate: &GateRequest,
    now: UnixMillis,
    seen: &mut HashSet<i64>,
) -> Result<Option<Decided>, StoreError> {
    let Some((round, done)) = ctx.queue.awaiting_gate(gate.seq) else {
        return Ok(None);
    };
    if !seen.insert(gate.seq) {
        return Ok(None);
    }
    let conn = ctx.conn;
    let verdict = match &gate.entity {
        None => Verdict::Fresh,
        Some(entity) => apply_to_entity(conn, entity, gate, now)?,
    };
    let fresh = verdict.is_fresh();
    let handlers = gate.handlers(fresh);
    let runs: Vec<Run> = handlers
        .iter()
        .filter(|h| !done.contains(h))
        .map(|h| Run::pending(h.clone(), now))
        .collect();
    let status = gate.status(fresh);
    let listed = serde_json::to_string(handlers)
        .map_err(|e| StoreError::Corrupt(format!("handlers: {e}")))?;
    let labels = gate
        .labels
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("labels: {e}")))?;
    conn.prepare_cached(
        "INSERT INTO verdicts (seq, round, entity, version, change, project_id, fresh, \
             parse_error, handlers, status, gated_at, data_row_id, labels) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        gate.seq,
        round,
        gate.entity,
        gate.version.map(Version::as_nanos),
        gate.change.as_str(),
        gate.project_id,
        fresh,
        gate.parse_error,
        listed,
        status.as_str(),
        now,
        gate.data_row_id,
        labels,
    ])?;
    let mut gated = Gated {
        seq: gate.seq,
        round,
        entity: gate.entity.clone(),
        version: gate.version,
        project_id: gate.project_id.clone(),
        fresh,
        body_is_json: gate.parse_error.is_none(),
        event: Some(gate.event.clone()),
        status,
        runs,
    };
    if !handlers.is_empty() && gated.runs.is_empty() {
        // Every handler did it in an earlier round: nothing runs again, and its work is over.
        gated.status = crate::store::status_after_runs(status, false, false);
        close(conn, gate.seq, round, gated.status, now)?;
    }
    Ok(Some((verdict, gated)))
}

/// Decides `gate` against its entity's applied state and keeps the new state.
fn apply_to_entity(
    conn: &Connection,
    entity: &str,
    gate: &GateRequest,
    now: UnixMillis,
) -> Result<Verdict, StoreError> {
    let last = conn
        .prepare_cached("SELECT version, change, backfilled FROM entities WHERE entity = ?1")?
        .query_row([entity], |row| {
            Ok((
                row.get::<_, Option<i64>>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, bool>(2)?,
            ))
        })
        .optional()?
        .map(|(version, change, backfilled)| applied(version, &change, backfilled))
        .transpose()?;
    let (verdict, newly) = decide(gate.origin, last.as_ref(), gate.version, gate.change);
    // A stale event leaves the entity as it was; the first event of an entity starts its state
    // whatever it is.
    let state = match (newly, &last) {
        (Some(state), _) => Some(state),
        (None, None) => Some(Applied {
            version: gate.version,
            change: gate.change,
            backfilled: gate.origin == Origin::Backfill,
        }),
        (None, Some(_)) => None,
    };
    if let Some(state) = state {
        conn.prepare_cached(
            "INSERT INTO entities (entity, version, change, updated_at, backfilled) \
             VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (entity) DO UPDATE SET version = excluded.version, \
             change = excluded.change, updated_at = excluded.updated_at, \
             backfilled = excluded.backfilled",
        )?
        .execute(params![
            entity,
            state.version.map(Version::as_nanos),
            state.change.as_str(),
            now,
            state.backfilled,
        ])?;
    }
    Ok(verdict)
}

/// Appends the closing of `seq`'s work in `round`.
fn close(
    conn: &Connection,
    seq: i64,
    round: i64,
    status: Status,
    now: UnixMillis,
) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT INTO closings (seq, round, status, at) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![seq, round, status.as_str(), now])?;
    Ok(())
}

/// What recording one member of a claim does.
enum Step {
    Record(Outcome),
    /// Not tried: its lease is let go.
    Release(i64),
}

/// Appends the attempts of claimed deliveries in lane order (with the closing of each whose
/// work is over). Every member's lease is checked first: when one is no longer `owner`'s,
/// nothing is recorded.
pub fn record(
    ctx: &Ctx<'_>,
    owner: &str,
    records: Vec<ChainRecord>,
    now: UnixMillis,
    reply: Reply<Vec<Status>>,
) -> Done {
    let mut steps = Vec::with_capacity(records.len());
    for r in &records {
        let step = if r.results.is_empty() {
            ctx.queue
                .holds(r.seq, owner)
                .then_some(Step::Release(r.seq))
                .ok_or(r.seq)
        } else {
            ctx.queue
                .outcome_of(r.seq, owner, &r.results)
                .map(Step::Record)
                .map_err(|lost| lost.0)
        };
        match step {
            Ok(step) => steps.push(step),
            Err(seq) => return Done::answer(reply, Err(StoreError::LeaseLost(seq))),
        }
    }
    let written = in_savepoint(ctx.conn, || {
        for (r, step) in records.iter().zip(&steps) {
            if let Step::Record(outcome) = step {
                append_attempts(ctx.conn, r, outcome, now)?;
            }
        }
        Ok(())
    });
    if let Err(e) = written.and_then(|w| w) {
        return Done::answer(reply, Err(e));
    }
    let owner = owner.to_owned();
    Done::on_commit(reply, move |queue| {
        let statuses = steps
            .into_iter()
            .map(|step| match step {
                Step::Record(outcome) => {
                    let status = outcome.status;
                    queue.recorded(outcome);
                    status
                }
                Step::Release(seq) => {
                    queue.release(seq, &owner);
                    Status::Pending
                }
            })
            .collect();
        (statuses, true)
    })
}

fn append_attempts(
    conn: &Connection,
    record: &ChainRecord,
    outcome: &Outcome,
    now: UnixMillis,
) -> Result<(), StoreError> {
    let mut add = conn.prepare_cached(
        "INSERT INTO attempts (delivery_seq, round, handler, attempt, started_at, finished_at, \
             outcome, error, next_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for r in &record.results {
        add.execute(params![
            record.seq,
            outcome.round,
            r.handler,
            r.attempt,
            r.started_at,
            r.finished_at,
            r.outcome.kind().as_str(),
            r.outcome.error(),
            r.outcome.next_at(),
        ])?;
    }
    if outcome.finished {
        close(conn, record.seq, outcome.round, outcome.status, now)?;
    }
    Ok(())
}

/// Replays `target` (each delivery as [`reads::replay_plan`] says, those being handled left
/// alone) and answers what it did to each. The replayed ones wait for the gate again once the
/// batch is committed.
pub fn replay(
    ctx: &Ctx<'_>,
    target: &ReplayTarget,
    now: UnixMillis,
    reply: Reply<Vec<ReplayItem>>,
) -> Done {
    let queue = ctx.queue;
    let running = |seq| queue.running(seq, now);
    let planned = in_savepoint(ctx.conn, || {
        let items = reads::replay_plan(ctx.conn, target, &running)?;
        let arrivals = append_replays(ctx.conn, &items, now)?;
        Ok((items, arrivals))
    })
    .and_then(|r| r);
    let (items, arrivals) = match planned {
        Ok(planned) => planned,
        Err(e) => return Done::answer(reply, Err(e)),
    };
    Done::on_commit(reply, move |queue| {
        let new_work = !arrivals.is_empty();
        apply_replays(queue, arrivals, now);
        (items, new_work)
    })
}

/// Appends a replay for each of `items` that replays: a new round, before the gate; the runs
/// that were done stay done. Lowers the dispatch mark to the earliest of them, so that a start
/// of the server finds them. Returns what waits for the gate, for the dispatch state.
pub fn append_replays(
    conn: &Connection,
    items: &[ReplayItem],
    now: UnixMillis,
) -> Result<Vec<(i64, Arrival)>, StoreError> {
    let mut arrivals = Vec::new();
    for item in items.iter().filter(|i| i.effect.replays()) {
        let seq = item.summary.seq;
        let round: i64 = conn
            .prepare_cached("SELECT COALESCE(MAX(round), 0) + 1 FROM replays WHERE seq = ?1")?
            .query_row([seq], |row| row.get(0))?;
        let shows = match item.summary.status {
            Status::Unrecognized => Status::Unrecognized,
            _ => Status::Pending,
        };
        conn.prepare_cached(
            "INSERT INTO replays (seq, round, status, at) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![seq, round, shows.as_str(), now])?;
        conn.prepare_cached("UPDATE dispatch_mark SET low_water = MIN(low_water, ?1)")?
            .execute([seq])?;
        let done = item
            .handlers
            .iter()
            .filter(|h| h.state == RunState::Done)
            .map(|h| h.handler.clone())
            .collect();
        arrivals.push((seq, arrival_of(conn, seq, round, done)?));
    }
    Ok(arrivals)
}

/// A stored delivery as it waits for the gate in `round`, its body to be read when taken.
pub fn arrival_of(
    conn: &Connection,
    seq: i64,
    round: i64,
    done: Vec<String>,
) -> Result<Arrival, StoreError> {
    let (delivery_id, request_id, topic, received_at, origin) = conn
        .prepare_cached(
            "SELECT delivery_id, request_id, topic, received_at, origin FROM deliveries \
             WHERE seq = ?1",
        )?
        .query_row([seq], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                reads::origin_at(row, 4)?,
            ))
        })?;
    Ok(Arrival {
        delivery_id,
        request_id,
        topic,
        received_at,
        round,
        body: None,
        done,
        origin,
    })
}

pub fn apply_replays(queue: &mut MemQueue, arrivals: Vec<(i64, Arrival)>, now: UnixMillis) {
    for (seq, arrival) in arrivals {
        queue.replayed(seq, arrival, now);
    }
}
