//! Recording what handlers did, in PostgreSQL: the outcomes that concurrent handler calls
//! report at the same moment (single deliveries and chains) are gathered by
//! [`super::batch`] into one transaction of a few statements whatever their number:
//! 1. lock the queue rows of every delivery in the batch (in `seq` order) and read their
//!    status and handler runs; a job with a delivery its owner no longer holds fails alone
//!    with [`StoreError::LeaseLost`] and records nothing, the others go on;
//! 2. work out in memory each delivery's runs, status and due time, in the order given (a
//!    chain's members one after the other);
//! 3. where a lane head finished, lock its entity (sorted, as the gate does) and read the
//!    deliveries waiting next in its lane, to promote them;
//! 4. write it all in one statement: the attempts appended, the runs, the statuses that
//!    changed, the queue rows of finished deliveries deleted and the others' due times and
//!    leases, and the lanes' new heads.
//!
//! Should the batch fail otherwise, each job is tried again alone, so that only a failing one
//! fails.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use sqlx::{PgConnection, PgPool};

use crate::delivery::{Status, UnixMillis};
use crate::store::{status_after_runs, ChainRecord, LeaseOwner, RunState, StoreError};
use crate::telemetry;

/// One caller's outcomes: a delivery's attempts, or a chain's in lane order.
pub(super) struct Outcome {
    owner: LeaseOwner,
    records: Vec<ChainRecord>,
    /// One delivery's attempts ([`crate::store::Queue::record_attempts`]): recorded even when
    /// there are none (its runs were all done already), where a chain's member without
    /// attempts was not tried.
    single: bool,
}

impl Outcome {
    /// One delivery's attempts.
    pub fn attempts(owner: &LeaseOwner, record: ChainRecord) -> Self {
        Self {
            owner: owner.clone(),
            records: vec![record],
            single: true,
        }
    }

    /// A chain's, in lane order.
    pub fn chain(owner: &LeaseOwner, records: Vec<ChainRecord>) -> Self {
        Self {
            owner: owner.clone(),
            records,
            single: false,
        }
    }

    /// Whether `record` (one of this outcome's) says what its handlers did.
    fn tried(&self, record: &ChainRecord) -> bool {
        self.single || !record.results.is_empty()
    }
}

/// Records a batch of outcomes; one answer per job: the status of its first delivery tried.
pub(super) async fn record_batch(
    pool: &PgPool,
    jobs: Vec<Outcome>,
    now: UnixMillis,
) -> Vec<Result<Status, StoreError>> {
    let started = Instant::now();
    match with_retries(pool, &jobs, now).await {
        Ok(answers) => {
            telemetry::record_commit("postgres", started.elapsed(), jobs.len());
            answers
        }
        Err(e) if jobs.len() > 1 && !super::is_unavailable(&e) => {
            tracing::warn!(error = %e, "recording outcomes failed; recording them one by one");
            let mut answers = Vec::with_capacity(jobs.len());
            for job in &jobs {
                answers.push(
                    match with_retries(pool, std::slice::from_ref(job), now).await {
                        Ok(mut one) => one
                            .pop()
                            .unwrap_or(Err(StoreError::database("an outcome gave no answer"))),
                        Err(e) => Err(e.into()),
                    },
                );
            }
            answers
        }
        Err(e) => {
            let unavailable = super::is_unavailable(&e);
            let text = e.to_string();
            jobs.iter()
                .map(|_| {
                    Err(if unavailable {
                        StoreError::unavailable(text.clone())
                    } else {
                        StoreError::database(text.clone())
                    })
                })
                .collect()
        }
    }
}

/// One transaction for `jobs`, tried again when PostgreSQL broke a deadlock by failing it.
async fn with_retries(
    pool: &PgPool,
    jobs: &[Outcome],
    now: UnixMillis,
) -> Result<Vec<Result<Status, StoreError>>, sqlx::Error> {
    super::retrying(|| async move {
        let mut tx = pool.begin().await?;
        let answers = record_in(&mut tx, jobs, now).await?;
        tx.commit().await?;
        Ok(answers)
    })
    .await
}

/// A delivery's queue row as the batch found it (locked), with its status and runs.
struct Held {
    entity: Option<String>,
    lane_pos: Option<i64>,
    waiting: bool,
    due_at: Option<i64>,
    owner: Option<String>,
    status: Status,
    /// handler → (state, next attempt due).
    runs: BTreeMap<String, (RunState, Option<i64>)>,
}

/// A queue row as it is left: waiting or not, when it is due, and whether its lease goes.
#[derive(Clone, Copy)]
struct Left {
    waiting: bool,
    due_at: Option<i64>,
    release: bool,
}

/// A run as the batch leaves it: state, attempts, next attempt due, last error.
type RunWrite = (RunState, i32, Option<i64>, Option<String>);

/// What the batch writes, one array per column.
#[derive(Default)]
struct Writes {
    attempt_seq: Vec<i64>,
    attempt_handler: Vec<String>,
    attempt_no: Vec<i32>,
    attempt_started: Vec<i64>,
    attempt_finished: Vec<i64>,
    attempt_outcome: Vec<&'static str>,
    attempt_error: Vec<Option<String>>,
    /// (seq, handler) → (state, attempts, next_at, error), the last of each.
    runs: BTreeMap<(i64, String), RunWrite>,
    /// seq → status, for those that changed.
    statuses: BTreeMap<i64, Status>,
    finished: Vec<i64>,
    /// seq → what is left of its queue row.
    left: BTreeMap<i64, Left>,
    /// entity → its lane's new head.
    heads: BTreeMap<String, Option<i64>>,
}

/// The batch inside `conn`'s transaction.
async fn record_in(
    conn: &mut PgConnection,
    jobs: &[Outcome],
    now: UnixMillis,
) -> Result<Vec<Result<Status, StoreError>>, sqlx::Error> {
    let mut seqs: Vec<i64> = jobs
        .iter()
        .flat_map(|j| j.records.iter().map(|r| r.seq))
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    let mut held = lock_held(conn, &seqs).await?;
    let mut answers = Vec::with_capacity(jobs.len());
    let mut accepted: Vec<&Outcome> = Vec::new();
    for job in jobs {
        let lost = job.records.iter().find(|r| {
            held.get(&r.seq)
                .is_none_or(|h| h.owner.as_deref() != Some(job.owner.as_str()))
        });
        answers.push(match lost {
            Some(r) => Err(StoreError::LeaseLost(r.seq)),
            None => {
                accepted.push(job);
                Ok(Status::Pending)
            }
        });
    }
    let mut writes = Writes::default();
    // Per record tried: whether it finished (nothing left to do) and when it is due next.
    let mut tried: HashMap<i64, Option<i64>> = HashMap::new();
    for (job, answer) in jobs.iter().zip(answers.iter_mut()) {
        if answer.is_err() {
            continue;
        }
        let mut first = None;
        for record in job.records.iter().filter(|r| job.tried(r)) {
            let Some(h) = held.get_mut(&record.seq) else {
                continue;
            };
            let next_due = apply(record, h, &mut writes);
            tried.insert(record.seq, next_due);
            first.get_or_insert(h.status);
        }
        if let Some(status) = first {
            *answer = Ok(status);
        }
    }
    let lanes = lock_lanes(conn, &accepted, &held, &tried).await?;
    settle(&accepted, &held, &tried, lanes, now, &mut writes);
    write(conn, &writes).await?;
    Ok(answers)
}

/// Locks the queue rows of `seqs` (in order) and reads each one's status and runs.
async fn lock_held(
    conn: &mut PgConnection,
    seqs: &[i64],
) -> Result<HashMap<i64, Held>, sqlx::Error> {
    type Row = (
        i64,
        Option<String>,
        Option<i64>,
        bool,
        Option<i64>,
        Option<String>,
        String,
        Vec<String>,
        Vec<String>,
        Vec<Option<i64>>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT q.seq, q.entity, q.lane_pos, q.waiting, q.due_at, q.lease_owner, s.status, \
             ARRAY(SELECT handler FROM handler_runs h WHERE h.delivery_seq = q.seq \
                   ORDER BY handler), \
             ARRAY(SELECT state FROM handler_runs h WHERE h.delivery_seq = q.seq \
                   ORDER BY handler), \
             ARRAY(SELECT next_at FROM handler_runs h WHERE h.delivery_seq = q.seq \
                   ORDER BY handler) \
         FROM queue q JOIN delivery_status s ON s.seq = q.seq AND s.seq = ANY($1) \
         WHERE q.seq = ANY($1) ORDER BY q.seq FOR UPDATE OF q",
    )
    .bind(seqs)
    .fetch_all(&mut *conn)
    .await?;
    let mut held = HashMap::with_capacity(rows.len());
    for (seq, entity, lane_pos, waiting, due_at, owner, status, handlers, states, next_ats) in rows
    {
        let status = status.parse().map_err(corrupt)?;
        let mut runs = BTreeMap::new();
        for ((handler, state), next_at) in handlers.into_iter().zip(states).zip(next_ats) {
            runs.insert(handler, (state.parse().map_err(corrupt)?, next_at));
        }
        let h = Held {
            entity,
            lane_pos,
            waiting,
            due_at,
            owner,
            status,
            runs,
        };
        held.insert(seq, h);
    }
    Ok(held)
}

/// A stored value that cannot be read, as the transaction's error.
fn corrupt(e: String) -> sqlx::Error {
    sqlx::Error::Decode(e.into())
}

/// Applies one record's attempts to its delivery's runs and status; returns when it is due
/// next (`None`: nothing left to do).
fn apply(record: &ChainRecord, h: &mut Held, writes: &mut Writes) -> Option<i64> {
    for r in &record.results {
        let error = r.outcome.error().map(str::to_owned);
        writes.attempt_seq.push(record.seq);
        writes.attempt_handler.push(r.handler.clone());
        writes.attempt_no.push(r.attempt as i32);
        writes.attempt_started.push(r.started_at);
        writes.attempt_finished.push(r.finished_at);
        writes.attempt_outcome.push(r.outcome.kind().as_str());
        writes.attempt_error.push(error.clone());
        let state = r.outcome.run_state();
        h.runs
            .insert(r.handler.clone(), (state, r.outcome.next_at()));
        let run = writes
            .runs
            .entry((record.seq, r.handler.clone()))
            .or_insert((state, 0, None, None));
        *run = (
            state,
            r.attempt as i32,
            r.outcome.next_at(),
            error.or(run.3.take()),
        );
    }
    let next_due = h
        .runs
        .values()
        .filter(|(state, _)| *state == RunState::Pending)
        .filter_map(|(_, at)| *at)
        .min();
    let dead = h.runs.values().any(|(state, _)| *state == RunState::Dead);
    let status = status_after_runs(h.status, next_due.is_some(), dead);
    if status != h.status {
        writes.statuses.insert(record.seq, status);
        h.status = status;
    }
    next_due
}

/// A lane whose head may move: the position of its head, and the deliveries waiting next.
struct Lane {
    active_pos: Option<i64>,
    waiting: VecDeque<(i64, i64)>,
}

/// Locks the entities of the lanes whose deliveries finished (sorted), and reads as many of
/// each lane's waiting deliveries as could be promoted.
async fn lock_lanes(
    conn: &mut PgConnection,
    accepted: &[&Outcome],
    held: &HashMap<i64, Held>,
    tried: &HashMap<i64, Option<i64>>,
) -> Result<HashMap<String, Lane>, sqlx::Error> {
    let mut finishing: BTreeMap<&str, i64> = BTreeMap::new();
    for record in accepted.iter().flat_map(|j| &j.records) {
        if let (Some(None), Some(h)) = (tried.get(&record.seq), held.get(&record.seq)) {
            if let Some(entity) = &h.entity {
                *finishing.entry(entity.as_str()).or_insert(1) += 1;
            }
        }
    }
    if finishing.is_empty() {
        return Ok(HashMap::new());
    }
    let entities: Vec<&str> = finishing.keys().copied().collect();
    let limits: Vec<i64> = finishing.values().copied().collect();
    // The lock first, in a statement of its own: the waiting deliveries are read after it, so
    // none that a gate adds to the lane meanwhile is missed.
    let heads: Vec<(String, Option<i64>)> = sqlx::query_as(
        "SELECT entity, active_pos FROM entities WHERE entity = ANY($1) \
         ORDER BY entity FOR UPDATE",
    )
    .bind(&entities)
    .fetch_all(&mut *conn)
    .await?;
    let waiting: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT e.entity, w.seq, w.lane_pos \
         FROM UNNEST($1::text[], $2::int8[]) AS e(entity, k) \
         CROSS JOIN LATERAL (SELECT seq, lane_pos FROM queue q \
                             WHERE q.entity = e.entity AND q.waiting \
                             ORDER BY lane_pos LIMIT e.k) w \
         ORDER BY e.entity, w.lane_pos",
    )
    .bind(&entities)
    .bind(&limits)
    .fetch_all(&mut *conn)
    .await?;
    let mut lanes: HashMap<String, Lane> = heads
        .into_iter()
        .map(|(entity, active_pos)| {
            let lane = Lane {
                active_pos,
                waiting: VecDeque::new(),
            };
            (entity, lane)
        })
        .collect();
    for (entity, seq, lane_pos) in waiting {
        if let Some(lane) = lanes.get_mut(&entity) {
            lane.waiting.push_back((seq, lane_pos));
        }
    }
    Ok(lanes)
}

/// Walks the records in order again: what is left of each queue row, and the lanes' heads
/// moving on past deliveries that finished (a chain's next member is its lane's head by the
/// time its own record is reached, as if each were recorded alone).
fn settle(
    accepted: &[&Outcome],
    held: &HashMap<i64, Held>,
    tried: &HashMap<i64, Option<i64>>,
    mut lanes: HashMap<String, Lane>,
    now: UnixMillis,
    writes: &mut Writes,
) {
    for record in accepted.iter().flat_map(|j| &j.records) {
        let Some(h) = held.get(&record.seq) else {
            continue;
        };
        let current = writes.left.get(&record.seq).copied().unwrap_or(Left {
            waiting: h.waiting,
            due_at: h.due_at,
            release: false,
        });
        let next_due = match tried.get(&record.seq) {
            // Not tried: only its lease goes; it waits as before.
            None => {
                writes.left.insert(
                    record.seq,
                    Left {
                        release: true,
                        ..current
                    },
                );
                continue;
            }
            Some(next_due) => *next_due,
        };
        if next_due.is_some() {
            // A member still waiting behind an unfinished delivery is not due, whatever it has
            // left.
            let due_at = if current.waiting { None } else { next_due };
            let left = Left {
                waiting: current.waiting,
                due_at,
                release: true,
            };
            writes.left.insert(record.seq, left);
            continue;
        }
        writes.left.remove(&record.seq);
        writes.finished.push(record.seq);
        let (Some(entity), Some(pos)) = (&h.entity, h.lane_pos) else {
            continue;
        };
        let Some(lane) = lanes.get_mut(entity) else {
            continue;
        };
        lane.waiting.retain(|(seq, _)| *seq != record.seq);
        if lane.active_pos != Some(pos) {
            continue;
        }
        // The next waiting delivery, if any, heads the lane and is due now.
        let next = lane.waiting.pop_front();
        if let Some((seq, _)) = next {
            let release = writes.left.get(&seq).is_some_and(|l| l.release);
            let promoted = Left {
                waiting: false,
                due_at: Some(now),
                release,
            };
            writes.left.insert(seq, promoted);
        }
        lane.active_pos = next.map(|(_, pos)| pos);
        writes.heads.insert(entity.clone(), lane.active_pos);
    }
}

/// Writes the batch in one statement.
async fn write(conn: &mut PgConnection, w: &Writes) -> Result<(), sqlx::Error> {
    let run_seq: Vec<i64> = w.runs.keys().map(|(seq, _)| *seq).collect();
    let run_handler: Vec<&str> = w.runs.keys().map(|(_, h)| h.as_str()).collect();
    let run_state: Vec<&str> = w.runs.values().map(|r| r.0.as_str()).collect();
    let run_attempts: Vec<i32> = w.runs.values().map(|r| r.1).collect();
    let run_next: Vec<Option<i64>> = w.runs.values().map(|r| r.2).collect();
    let run_error: Vec<Option<&str>> = w.runs.values().map(|r| r.3.as_deref()).collect();
    let status_seq: Vec<i64> = w.statuses.keys().copied().collect();
    let status: Vec<&str> = w.statuses.values().map(|s| s.as_str()).collect();
    let head_entity: Vec<&str> = w.heads.keys().map(String::as_str).collect();
    let head_pos: Vec<Option<i64>> = w.heads.values().copied().collect();
    let left_seq: Vec<i64> = w.left.keys().copied().collect();
    let left_waiting: Vec<bool> = w.left.values().map(|l| l.waiting).collect();
    let left_due: Vec<Option<i64>> = w.left.values().map(|l| l.due_at).collect();
    let left_release: Vec<bool> = w.left.values().map(|l| l.release).collect();
    sqlx::query(WRITE_OUTCOMES)
        .bind(&w.attempt_seq)
        .bind(&w.attempt_handler)
        .bind(&w.attempt_no)
        .bind(&w.attempt_started)
        .bind(&w.attempt_finished)
        .bind(&w.attempt_outcome)
        .bind(&w.attempt_error)
        .bind(&run_seq)
        .bind(&run_handler)
        .bind(&run_state)
        .bind(&run_attempts)
        .bind(&run_next)
        .bind(&run_error)
        .bind(&status_seq)
        .bind(&status)
        .bind(&w.finished)
        .bind(&head_entity)
        .bind(&head_pos)
        .bind(&left_seq)
        .bind(&left_waiting)
        .bind(&left_due)
        .bind(&left_release)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A batch of outcomes in one statement. Every row to change is also named by its key as an
/// array, so that it is found through its index (see the gate's `WRITE_GATES`).
const WRITE_OUTCOMES: &str = "WITH attempts_added AS ( \
        INSERT INTO attempts (delivery_seq, handler, attempt, started_at, finished_at, \
            outcome, error) \
        SELECT * FROM UNNEST($1::int8[], $2::text[], $3::int4[], $4::int8[], $5::int8[], \
            $6::text[], $7::text[])), \
    runs_moved AS ( \
        UPDATE handler_runs h SET state = u.state, attempts = u.attempts, next_at = u.next_at, \
            last_error = COALESCE(u.error, h.last_error) \
        FROM UNNEST($8::int8[], $9::text[], $10::text[], $11::int4[], $12::int8[], \
            $13::text[]) AS u(seq, handler, state, attempts, next_at, error) \
        WHERE h.delivery_seq = u.seq AND h.handler = u.handler AND h.delivery_seq = ANY($8)), \
    statuses_moved AS ( \
        UPDATE delivery_status s SET status = u.status \
        FROM UNNEST($14::int8[], $15::text[]) AS u(seq, status) \
        WHERE s.seq = u.seq AND s.seq = ANY($14)), \
    finished AS (DELETE FROM queue WHERE seq = ANY($16::int8[])), \
    heads_moved AS ( \
        UPDATE entities e SET active_pos = u.active_pos \
        FROM UNNEST($17::text[], $18::int8[]) AS u(entity, active_pos) \
        WHERE e.entity = u.entity AND e.entity = ANY($17)) \
    UPDATE queue q SET waiting = u.waiting, due_at = u.due_at, \
        lease_owner = CASE WHEN u.release THEN NULL ELSE q.lease_owner END, \
        lease_until = CASE WHEN u.release THEN NULL ELSE q.lease_until END \
    FROM UNNEST($19::int8[], $20::bool[], $21::int8[], $22::bool[]) \
        AS u(seq, waiting, due_at, release) \
    WHERE q.seq = u.seq AND q.seq = ANY($19)";
