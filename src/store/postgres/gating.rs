//! The gate's verdicts for a batch of deliveries, recorded in PostgreSQL in one transaction of
//! three statements whatever the batch's size:
//! 1. lock the batch's queue rows still waiting for the gate (in `seq` order); a delivery gated
//!    meanwhile by another replica is left out (it is not gated twice);
//! 2. lock the batch's entities (created when missing), in sorted order, so that two replicas
//!    gating overlapping batches wait for each other instead of deadlocking, and read their
//!    state;
//! 3. write it all in one statement: the verdicts, the queue rows (lane position, due time, or
//!    gone when no handler wants the delivery), the handler runs, the entities' new state and
//!    the statuses that changed.
//!
//! Between 2 and 3 each delivery is decided in memory with [`crate::store::gate`], entity by
//! entity in arrival order, each decision seeing the state the one before it left. Should the
//! batch fail, each delivery is tried again alone, so that only a failing one is left ungated
//! for another round.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Instant;

use sqlx::{PgConnection, PgPool};

use crate::delivery::UnixMillis;
use crate::ordering::{Verdict, Version};
use crate::store::gate::{applied, decide_in_lane};
use crate::store::{GateRequest, StoreError};
use crate::telemetry;

/// Records the gate's verdicts for `gates`; see the module's doc.
pub(super) async fn record(
    pool: &PgPool,
    gates: &[GateRequest],
    now: UnixMillis,
) -> Result<Vec<Option<Verdict>>, StoreError> {
    let started = Instant::now();
    match with_retries(pool, gates, now).await {
        Ok(verdicts) => {
            telemetry::record_commit("postgres", started.elapsed(), gates.len());
            Ok(verdicts)
        }
        Err(e) if gates.len() > 1 && !super::is_unavailable(&e) => {
            tracing::warn!(error = %e, "gate failed; gating the batch one by one");
            let mut verdicts = Vec::with_capacity(gates.len());
            for gate in gates {
                match with_retries(pool, std::slice::from_ref(gate), now).await {
                    Ok(mut one) => verdicts.push(one.pop().flatten()),
                    Err(e) => {
                        tracing::error!(seq = gate.seq, error = %e,
                            "gate failed; left for the next round");
                        verdicts.push(None);
                    }
                }
            }
            // Timed from the first try: the deliveries waited for both.
            telemetry::record_commit("postgres", started.elapsed(), gates.len());
            Ok(verdicts)
        }
        Err(e) => Err(e.into()),
    }
}

/// [`gate_batch`] in a transaction of its own, tried again when PostgreSQL broke a deadlock by
/// failing it.
async fn with_retries(
    pool: &PgPool,
    gates: &[GateRequest],
    now: UnixMillis,
) -> Result<Vec<Option<Verdict>>, sqlx::Error> {
    super::retrying(|| async move {
        let mut tx = pool.begin().await?;
        let verdicts = gate_batch(&mut tx, gates, now).await?;
        tx.commit().await?;
        Ok(verdicts)
    })
    .await
}

/// An entity's state as the gate keeps it: last applied version and change, the next lane
/// position, and the position of the lane's head (`None`: nothing of it has work left).
struct EntityState {
    version: Option<i64>,
    change: Option<String>,
    lane_next: i64,
    active_pos: Option<i64>,
    /// The state was applied by a backfilled delivery (the gate's rule 7).
    backfilled: bool,
    /// Its stored state could not be read: its deliveries stay ungated.
    broken: bool,
}

/// One decided delivery, as the write statement takes it.
struct Decided {
    verdict: Verdict,
    lane_pos: Option<i64>,
    waiting: bool,
    handlers: Vec<String>,
}

/// The batch inside `conn`'s transaction; `None` for a delivery gated meanwhile, or whose
/// entity's stored state cannot be read.
async fn gate_batch(
    conn: &mut PgConnection,
    gates: &[GateRequest],
    now: UnixMillis,
) -> Result<Vec<Option<Verdict>>, sqlx::Error> {
    let seqs: Vec<i64> = gates.iter().map(|g| g.seq).collect();
    let open: HashSet<i64> = sqlx::query_scalar(
        "SELECT seq FROM queue WHERE seq = ANY($1) AND NOT gated ORDER BY seq FOR UPDATE",
    )
    .bind(&seqs)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    let entities: Vec<String> = gates
        .iter()
        .filter(|g| open.contains(&g.seq))
        .filter_map(|g| g.entity.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut states = lock_entities(conn, &entities, now).await?;
    // Entities in one order in every transaction; one entity's deliveries in arrival order.
    let mut order: Vec<usize> = (0..gates.len())
        .filter(|&i| open.contains(&gates[i].seq))
        .collect();
    order.sort_by(|&a, &b| (&gates[a].entity, gates[a].seq).cmp(&(&gates[b].entity, gates[b].seq)));
    let mut decided: Vec<Option<Decided>> = (0..gates.len()).map(|_| None).collect();
    for i in order {
        decided[i] = decide(&gates[i], &mut states);
    }
    write(conn, gates, &decided, &states, now).await?;
    Ok(decided
        .iter()
        .map(|d| d.as_ref().map(|d| d.verdict))
        .collect())
}

/// An entity's row as the gate reads it: entity, version, change, lane_next, active_pos.
type EntityRow = (String, Option<i64>, Option<String>, i64, Option<i64>, bool);

/// Locks `entities` (sorted), creating the missing ones, and reads their state.
async fn lock_entities(
    conn: &mut PgConnection,
    entities: &[String],
    now: UnixMillis,
) -> Result<HashMap<String, EntityState>, sqlx::Error> {
    if entities.is_empty() {
        return Ok(HashMap::new());
    }
    // A replica gating the same entity now waits on its row until this transaction is
    // committed, and then reads the state it left.
    let rows: Vec<EntityRow> = sqlx::query_as(
        "INSERT INTO entities (entity, lane_next, updated_at) \
         SELECT e, 0, $2 FROM UNNEST($1::text[]) AS e ORDER BY e \
         ON CONFLICT (entity) DO UPDATE SET entity = excluded.entity \
         RETURNING entity, version, change, lane_next, active_pos, backfilled",
    )
    .bind(entities)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(entity, version, change, lane_next, active_pos, backfilled)| {
                let state = EntityState {
                    version,
                    change,
                    lane_next,
                    active_pos,
                    backfilled,
                    broken: false,
                };
                (entity, state)
            },
        )
        .collect())
}

/// Decides one delivery against its entity's state, and moves that state on.
fn decide(gate: &GateRequest, states: &mut HashMap<String, EntityState>) -> Option<Decided> {
    let Some(entity) = &gate.entity else {
        return Some(Decided {
            verdict: Verdict::Fresh,
            lane_pos: None,
            waiting: false,
            handlers: gate.handlers(true).to_vec(),
        });
    };
    let state = states.get_mut(entity)?;
    if state.broken {
        return None;
    }
    let last = match &state.change {
        Some(change) => match applied(state.version, change, state.backfilled) {
            Ok(last) => Some(last),
            Err(e) => {
                tracing::error!(seq = gate.seq, %entity, error = %e,
                    "the entity's stored state cannot be read; its deliveries stay ungated");
                state.broken = true;
                return None;
            }
        },
        None => None,
    };
    let lane_pos = state.lane_next;
    let decision = decide_in_lane(last, lane_pos, state.active_pos, gate);
    let handlers = gate.handlers(decision.verdict.is_fresh()).to_vec();
    let waiting = state.active_pos.is_some() && !handlers.is_empty();
    state.version = decision.state.version.map(Version::as_nanos);
    state.change = Some(decision.state.change.as_str().to_owned());
    state.lane_next = lane_pos + 1;
    state.active_pos = decision.active_pos;
    state.backfilled = decision.state.backfilled;
    Some(Decided {
        verdict: decision.verdict,
        lane_pos: Some(lane_pos),
        waiting,
        handlers,
    })
}

/// The batch's decisions as the write statement binds them, one array per column.
#[derive(Default)]
struct Rows<'a> {
    seq: Vec<i64>,
    entity: Vec<Option<&'a str>>,
    version: Vec<Option<i64>>,
    change: Vec<&'static str>,
    project_id: Vec<Option<&'a str>>,
    fresh: Vec<bool>,
    lane_pos: Vec<Option<i64>>,
    parse_error: Vec<Option<&'a str>>,
    event: Vec<&'a str>,
    status: Vec<&'static str>,
    /// Queued for handlers (the rest are finished at once).
    queued: Vec<bool>,
    waiting: Vec<bool>,
    due_at: Vec<Option<i64>>,
    run_seq: Vec<i64>,
    run_handler: Vec<&'a str>,
}

/// Writes the decisions, the entities' new state and what changed in the queue.
async fn write(
    conn: &mut PgConnection,
    gates: &[GateRequest],
    decided: &[Option<Decided>],
    states: &HashMap<String, EntityState>,
    now: UnixMillis,
) -> Result<(), sqlx::Error> {
    let mut rows = Rows::default();
    for (gate, decided) in gates.iter().zip(decided) {
        let Some(d) = decided else { continue };
        let fresh = d.verdict.is_fresh();
        rows.seq.push(gate.seq);
        rows.entity.push(gate.entity.as_deref());
        rows.version.push(gate.version.map(Version::as_nanos));
        rows.change.push(gate.change.as_str());
        rows.project_id.push(gate.project_id.as_deref());
        rows.fresh.push(fresh);
        rows.lane_pos.push(d.lane_pos);
        rows.parse_error.push(gate.parse_error.as_deref());
        rows.event.push(&gate.event);
        rows.status.push(gate.status(fresh).as_str());
        rows.queued.push(!d.handlers.is_empty());
        rows.waiting.push(d.waiting);
        rows.due_at
            .push((!d.handlers.is_empty() && !d.waiting).then_some(now));
        for handler in &d.handlers {
            rows.run_seq.push(gate.seq);
            rows.run_handler.push(handler);
        }
    }
    if rows.seq.is_empty() {
        return Ok(());
    }
    let moved: Vec<(&str, &EntityState)> = states
        .iter()
        .filter(|(_, s)| !s.broken)
        .map(|(e, s)| (e.as_str(), s))
        .collect();
    let touched: Vec<&str> = moved.iter().map(|(e, _)| *e).collect();
    let entity_version: Vec<Option<i64>> = moved.iter().map(|(_, s)| s.version).collect();
    let entity_change: Vec<Option<&str>> = moved.iter().map(|(_, s)| s.change.as_deref()).collect();
    let lane_next: Vec<i64> = moved.iter().map(|(_, s)| s.lane_next).collect();
    let active_pos: Vec<Option<i64>> = moved.iter().map(|(_, s)| s.active_pos).collect();
    let backfilled: Vec<bool> = moved.iter().map(|(_, s)| s.backfilled).collect();
    sqlx::query(WRITE_GATES)
        .bind(&rows.seq)
        .bind(&rows.entity)
        .bind(&rows.version)
        .bind(&rows.change)
        .bind(&rows.project_id)
        .bind(&rows.fresh)
        .bind(&rows.lane_pos)
        .bind(&rows.parse_error)
        .bind(&rows.event)
        .bind(&rows.status)
        .bind(&rows.queued)
        .bind(&rows.waiting)
        .bind(&rows.due_at)
        .bind(&rows.run_seq)
        .bind(&rows.run_handler)
        .bind(now)
        .bind(&touched)
        .bind(&entity_version)
        .bind(&entity_change)
        .bind(&lane_next)
        .bind(&active_pos)
        .bind(&backfilled)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A batch of verdicts in one statement. Every row to change is also named by its key as an
/// array, so that it is found through its index: a join with the batch alone would let the
/// planner scan the whole table, which only grows. A replayed delivery has its verdict row already (its
/// entity and version kept for the console): it is overwritten.
const WRITE_GATES: &str = "WITH g AS ( \
        SELECT * FROM UNNEST($1::int8[], $2::text[], $3::int8[], $4::text[], $5::text[], \
            $6::bool[], $7::int8[], $8::text[], $9::text[], $10::text[], $11::bool[], \
            $12::bool[], $13::int8[]) \
        AS g(seq, entity, version, change, project_id, fresh, lane_pos, parse_error, event, \
             status, queued, waiting, due_at)), \
    verdicts_written AS ( \
        INSERT INTO verdicts (seq, entity, version, change, project_id, fresh, lane_pos, \
            parse_error, event) \
        SELECT seq, entity, version, change, project_id, fresh, lane_pos, parse_error, event \
        FROM g \
        ON CONFLICT (seq) DO UPDATE SET entity = excluded.entity, version = excluded.version, \
            change = excluded.change, project_id = excluded.project_id, \
            fresh = excluded.fresh, lane_pos = excluded.lane_pos, \
            parse_error = excluded.parse_error, event = excluded.event), \
    queued AS ( \
        UPDATE queue q SET gated = true, entity = g.entity, lane_pos = g.lane_pos, \
            waiting = g.waiting, due_at = g.due_at, lease_owner = NULL, lease_until = NULL \
        FROM g WHERE q.seq = g.seq AND g.queued AND q.seq = ANY($1)), \
    finished AS ( \
        DELETE FROM queue q USING g \
        WHERE q.seq = g.seq AND NOT g.queued AND q.seq = ANY($1)), \
    runs AS ( \
        INSERT INTO handler_runs (delivery_seq, handler, state, attempts, next_at) \
        SELECT s, h, 'pending', 0, $16 FROM UNNEST($14::int8[], $15::text[]) AS r(s, h) \
        ON CONFLICT DO NOTHING), \
    entities_moved AS ( \
        UPDATE entities e SET version = u.version, change = u.change, \
            lane_next = u.lane_next, active_pos = u.active_pos, updated_at = $16, \
            backfilled = u.backfilled \
        FROM UNNEST($17::text[], $18::int8[], $19::text[], $20::int8[], $21::int8[], \
                    $22::bool[]) \
            AS u(entity, version, change, lane_next, active_pos, backfilled) \
        WHERE e.entity = u.entity AND e.entity = ANY($17)) \
    UPDATE delivery_status s SET status = g.status FROM g \
    WHERE s.seq = g.seq AND s.status <> g.status AND s.seq = ANY($1)";
