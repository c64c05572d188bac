//! The PostgreSQL back-end's dispatch queue, safe for several replicas at once:
//! - taking deliveries to gate and claiming due work use `FOR UPDATE SKIP LOCKED`, so two
//!   replicas never get the same row, and reserve what they took for a lease;
//! - the gate locks the entity's row before deciding, so verdicts on one entity are decided one
//!   after the other whichever replicas decide them, and skips a delivery gated meanwhile;
//! - recording attempts checks the lease's owner under the delivery's row lock, and lane
//!   promotion happens under the entity's row lock.
//!
//! Each write transaction (gate, claim, attempts) is counted as one store commit, as the
//! intake's are, so that `/metrics` shows the latency of every commit a delivery waits for.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use super::PgStore;
use crate::delivery::{after, Origin, Payload, Status, UnixMillis};
use crate::ordering::{Verdict, Version};
use crate::store::gate::{applied, decide_in_lane};
use crate::store::{
    status_after_runs, AttemptResult, ChainRecord, Claimed, DueRun, GateRequest, LeaseOwner, Queue,
    StoreError, Ungated,
};
use crate::telemetry;

impl PgStore {
    /// A row's body (`body`, `blob_id`, `body_len` columns).
    pub(super) fn body_of(&self, row: &PgRow) -> Result<Payload, StoreError> {
        let seq: i64 = row.try_get("seq")?;
        let len = row.try_get::<i64, _>("body_len")?.max(0) as u64;
        match row.try_get::<Option<i64>, _>("blob_id")? {
            Some(id) => Ok(Payload::stored(len, self.bodies.source(id))),
            None => row
                .try_get::<Option<Vec<u8>>, _>("body")?
                .map(|body| Payload::inline(body.into()))
                // Never an empty body in its place: that would hand handlers a wrong event.
                .ok_or_else(|| StoreError::Corrupt(format!("delivery {seq} has no body"))),
        }
    }
}

#[async_trait]
impl Queue for PgStore {
    async fn take_ungated(
        &self,
        owner: &LeaseOwner,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<Ungated>, StoreError> {
        self.ready().await?;
        let now = self.clock.now();
        let rows = sqlx::query(
            "UPDATE deliveries d SET gate_owner = $1, gate_until = $2 \
             FROM (SELECT seq FROM deliveries \
                   WHERE NOT gated AND (gate_until IS NULL OR gate_until < $3) \
                   ORDER BY seq LIMIT $4 FOR UPDATE SKIP LOCKED) t \
             WHERE d.seq = t.seq \
             RETURNING d.seq, d.delivery_id, d.request_id, d.topic, d.body, d.blob_id, \
                 d.body_len, d.origin",
        )
        .bind(owner.as_str())
        .bind(after(now, lease))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut ungated = rows
            .iter()
            .map(|row| {
                Ok(Ungated {
                    seq: row.try_get("seq")?,
                    delivery_id: row.try_get("delivery_id")?,
                    request_id: row.try_get("request_id")?,
                    topic: row.try_get("topic")?,
                    body: self.body_of(row)?,
                    origin: origin_of(row)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // Oldest first: the gate decides in arrival order.
        ungated.sort_by_key(|u| u.seq);
        Ok(ungated)
    }

    async fn record_gates(
        &self,
        gates: Vec<GateRequest>,
    ) -> Result<Vec<Option<Verdict>>, StoreError> {
        self.ready().await?;
        let now = self.clock.now();
        // Entities in one order in every transaction, so that two replicas gating overlapping
        // batches wait for each other instead of deadlocking; one entity's deliveries stay in
        // arrival order.
        let mut order: Vec<usize> = (0..gates.len()).collect();
        order.sort_by(|&a, &b| {
            (&gates[a].entity, gates[a].seq).cmp(&(&gates[b].entity, gates[b].seq))
        });
        let mut verdicts = vec![None; gates.len()];
        // The whole batch in one transaction; should a gate fail, each again in a savepoint of
        // its own, so that only the failing one is left for another round.
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        let mut failed = false;
        for &i in &order {
            match record_gate(&mut tx, &gates[i], now).await {
                Ok(verdict) => verdicts[i] = verdict,
                Err(e) => {
                    tracing::warn!(seq = gates[i].seq, error = %e, "gate failed; gating the batch one by one");
                    failed = true;
                    break;
                }
            }
        }
        if !failed {
            tx.commit().await?;
            telemetry::record_commit("postgres", started.elapsed(), 1);
            return Ok(verdicts);
        }
        tx.rollback().await?;
        let mut verdicts = vec![None; gates.len()];
        let mut tx = self.pool.begin().await?;
        for &i in &order {
            let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
            match record_gate(&mut savepoint, &gates[i], now).await {
                Ok(verdict) => {
                    savepoint.commit().await?;
                    verdicts[i] = verdict;
                }
                Err(e) => {
                    savepoint.rollback().await?;
                    tracing::error!(seq = gates[i].seq, error = %e, "gate failed; left for the next round");
                }
            }
        }
        tx.commit().await?;
        // Timed from the first try: the delivery waited for both.
        telemetry::record_commit("postgres", started.elapsed(), 1);
        Ok(verdicts)
    }

    async fn claim(
        &self,
        owner: &LeaseOwner,
        lease: Duration,
        limit: u32,
        chain_max: u32,
    ) -> Result<Vec<Claimed>, StoreError> {
        self.ready().await?;
        let now = self.clock.now();
        let until = after(now, lease);
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(&format!(
            "UPDATE deliveries d SET lease_owner = $1, lease_until = $2 \
             FROM (SELECT seq FROM deliveries \
                   WHERE due_at IS NOT NULL AND due_at <= $3 \
                     AND (lease_until IS NULL OR lease_until < $3) \
                   ORDER BY due_at, seq LIMIT $4 FOR UPDATE SKIP LOCKED) c \
             WHERE d.seq = c.seq \
             RETURNING {CLAIM_COLUMNS}"
        ))
        .bind(owner.as_str())
        .bind(until)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let mut claimed = rows
            .iter()
            .map(|row| self.claimed_of(row))
            .collect::<Result<Vec<_>, _>>()?;
        let seqs: Vec<i64> = claimed.iter().map(|c| c.seq).collect();
        let runs: Vec<(i64, String, i32)> = sqlx::query_as(
            "SELECT delivery_seq, handler, attempts FROM handler_runs \
             WHERE delivery_seq = ANY($1) AND state = 'pending' AND next_at <= $2 \
             ORDER BY delivery_seq, handler",
        )
        .bind(&seqs)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        for (seq, handler, attempts) in runs {
            if let Some(c) = claimed.iter_mut().find(|c| c.seq == seq) {
                c.runs.push(DueRun {
                    handler,
                    attempts: attempts.max(0) as u32,
                });
            }
        }
        if chain_max > 0 {
            self.chains_behind(&mut tx, &mut claimed, owner, now, until, chain_max)
                .await?;
        }
        tx.commit().await?;
        telemetry::record_commit("postgres", started.elapsed(), 1);
        // Oldest first, so that a caller running them in order keeps arrival order.
        claimed.sort_by_key(|c| c.seq);
        Ok(claimed)
    }

    async fn renew(
        &self,
        owner: &LeaseOwner,
        seqs: &[i64],
        lease: Duration,
    ) -> Result<Vec<i64>, StoreError> {
        self.ready().await?;
        let held = sqlx::query_scalar(
            "UPDATE deliveries SET lease_until = $3 \
             WHERE seq = ANY($1) AND lease_owner = $2 RETURNING seq",
        )
        .bind(seqs)
        .bind(owner.as_str())
        .bind(after(self.clock.now(), lease))
        .fetch_all(&self.pool)
        .await?;
        Ok(held)
    }

    async fn record_attempts(
        &self,
        seq: i64,
        owner: &LeaseOwner,
        results: &[AttemptResult],
    ) -> Result<Status, StoreError> {
        self.ready().await?;
        let now = self.clock.now();
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        let status = record_in(&mut tx, seq, owner, results, now).await?;
        tx.commit().await?;
        telemetry::record_commit("postgres", started.elapsed(), 1);
        Ok(status)
    }

    async fn record_chain(
        &self,
        owner: &LeaseOwner,
        records: &[ChainRecord],
    ) -> Result<(), StoreError> {
        self.ready().await?;
        let now = self.clock.now();
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        for record in records {
            if record.results.is_empty() {
                let released = sqlx::query(
                    "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL \
                     WHERE seq = $1 AND lease_owner = $2",
                )
                .bind(record.seq)
                .bind(owner.as_str())
                .execute(&mut *tx)
                .await?;
                if released.rows_affected() == 0 {
                    return Err(StoreError::LeaseLost(record.seq));
                }
            } else {
                record_in(&mut tx, record.seq, owner, &record.results, now).await?;
            }
        }
        tx.commit().await?;
        telemetry::record_commit("postgres", started.elapsed(), 1);
        Ok(())
    }

    async fn queue_depth(&self) -> Result<u64, StoreError> {
        self.ready().await?;
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM deliveries WHERE due_at IS NOT NULL) \
                  + (SELECT COUNT(*) FROM deliveries WHERE waiting) \
                  + (SELECT COUNT(*) FROM deliveries WHERE NOT gated)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }

    async fn oldest_unfinished(&self) -> Result<Option<UnixMillis>, StoreError> {
        self.ready().await?;
        // Each part is the smallest seq of one partial index that `queue_depth` counts.
        let at = sqlx::query_scalar(
            "SELECT received_at FROM deliveries WHERE seq = (SELECT MIN(s) FROM ( \
                 SELECT MIN(seq) AS s FROM deliveries WHERE NOT gated \
                 UNION ALL SELECT MIN(seq) FROM deliveries WHERE due_at IS NOT NULL \
                 UNION ALL SELECT MIN(seq) FROM deliveries WHERE waiting) AS heads)",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(at)
    }

    async fn wait_for_work(&self, max_wait: Duration) {
        let _ = tokio::time::timeout(max_wait, self.work.notified()).await;
    }
}

/// The entity's state as the gate reads it: version, change, lane_next, active_pos, backfilled.
type EntityRow = (Option<i64>, Option<String>, i64, Option<i64>, bool);
/// Whether the delivery is gated, and its entity's state.
type GatedAndEntity = (bool, Option<i64>, Option<String>, i64, Option<i64>, bool);

/// Locks the delivery and its entity (creating the entity's row when missing) and reads whether
/// the delivery is gated and the entity's state: a replica gating the same entity now waits on
/// the entity's row until this transaction is committed, and then reads its verdict.
async fn lock_for_gate(
    conn: &mut PgConnection,
    gate: &GateRequest,
    now: UnixMillis,
) -> Result<(Option<bool>, Option<EntityRow>), StoreError> {
    let Some(entity) = &gate.entity else {
        let gated = sqlx::query_scalar("SELECT gated FROM deliveries WHERE seq = $1 FOR UPDATE")
            .bind(gate.seq)
            .fetch_optional(&mut *conn)
            .await?;
        return Ok((gated, None));
    };
    let row: Option<GatedAndEntity> = sqlx::query_as(
        "WITH d AS (SELECT gated FROM deliveries WHERE seq = $1 FOR UPDATE), \
             e AS (INSERT INTO entities (entity, lane_next, updated_at) VALUES ($2, 0, $3) \
                   ON CONFLICT (entity) DO UPDATE SET entity = excluded.entity \
                   RETURNING version, change, lane_next, active_pos, backfilled) \
             SELECT d.gated, e.version, e.change, e.lane_next, e.active_pos, \
                 e.backfilled FROM d, e",
    )
    .bind(gate.seq)
    .bind(entity)
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map_or(
        (None, None),
        |(gated, version, change, next, active, backfilled)| {
            (
                Some(gated),
                Some((version, change, next, active, backfilled)),
            )
        },
    ))
}

/// The gate for one delivery, with its entity's row locked, in two round trips: one locks the
/// delivery and the entity (creating its row when missing) and reads the entity's state, one
/// writes the verdict. `None` when the delivery was gated already (by another replica, or
/// before a replay's reset was undone).
async fn record_gate(
    conn: &mut PgConnection,
    gate: &GateRequest,
    now: UnixMillis,
) -> Result<Option<Verdict>, StoreError> {
    let (gated, state) = lock_for_gate(conn, gate, now).await?;
    if gated != Some(false) {
        return Ok(None);
    }
    let (verdict, lane_pos, lane_busy, entity_update) = match state {
        None => (Verdict::Fresh, None, false, None),
        Some((version, change, lane_pos, active_pos, backfilled)) => {
            let last = change
                .map(|change| applied(version, &change, backfilled))
                .transpose()?;
            let decision = decide_in_lane(last, lane_pos, active_pos, gate);
            (
                decision.verdict,
                Some(lane_pos),
                active_pos.is_some(),
                Some((decision.state, lane_pos + 1, decision.active_pos)),
            )
        }
    };
    let fresh = verdict.is_fresh();
    let handlers = gate.handlers(fresh);
    let waiting = lane_busy && !handlers.is_empty();
    let (state, lane_next, active_pos) = match entity_update {
        Some((state, next, active)) => (Some(state), Some(next), active),
        None => (None, None, None),
    };
    // The entity's new state, the handler runs and the delivery's verdict, in one statement.
    sqlx::query(
        "WITH e AS (UPDATE entities SET version = $12, change = $13, lane_next = $14, \
                    active_pos = $15, updated_at = $16, backfilled = $19 \
                    WHERE entity = $2 AND $14 IS NOT NULL), \
              r AS (INSERT INTO handler_runs (delivery_seq, handler, state, attempts, next_at) \
                    SELECT $1, h, 'pending', 0, $16 FROM UNNEST($17::text[]) AS h \
                    ON CONFLICT DO NOTHING) \
         UPDATE deliveries SET gated = true, entity = $2, version = $3, change = $4, \
             project_id = $5, fresh = $6, lane_pos = $7, parse_error = $8, status = $9, \
             due_at = $10, waiting = $11, event = $18, gate_owner = NULL, gate_until = NULL \
         WHERE seq = $1",
    )
    .bind(gate.seq)
    .bind(&gate.entity)
    .bind(gate.version.map(Version::as_nanos))
    .bind(gate.change.as_str())
    .bind(&gate.project_id)
    .bind(fresh)
    .bind(lane_pos)
    .bind(&gate.parse_error)
    .bind(gate.status(fresh).as_str())
    .bind((!handlers.is_empty() && !waiting).then_some(now))
    .bind(waiting)
    .bind(state.and_then(|s| s.version).map(Version::as_nanos))
    .bind(state.map(|s| s.change.as_str()))
    .bind(lane_next)
    .bind(active_pos)
    .bind(now)
    .bind(handlers)
    .bind(&gate.event)
    .bind(state.is_some_and(|s| s.backfilled))
    .execute(&mut *conn)
    .await?;
    Ok(Some(verdict))
}

/// A delivery waiting in a lane (entity, seq), whether someone holds its lease, and one of its
/// runs (handler, state, attempts, due) when it has any.
type LaneRun = (
    String,
    i64,
    bool,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<bool>,
);

/// The columns a claim returns, as [`PgStore::claimed_of`] reads them.
const CLAIM_COLUMNS: &str = "d.seq, d.delivery_id, d.topic, d.entity, d.version, d.project_id, \
    d.fresh, d.parse_error IS NULL AS body_is_json, d.received_at, d.body, d.blob_id, d.body_len, \
    d.event, d.request_id, d.origin";

impl PgStore {
    fn claimed_of(&self, row: &PgRow) -> Result<Claimed, StoreError> {
        Ok(Claimed {
            seq: row.try_get("seq")?,
            delivery_id: row.try_get("delivery_id")?,
            topic: row.try_get("topic")?,
            entity: row.try_get("entity")?,
            version: row
                .try_get::<Option<i64>, _>("version")?
                .map(Version::from_nanos),
            project_id: row.try_get("project_id")?,
            fresh: row.try_get::<Option<bool>, _>("fresh")?.unwrap_or(true),
            body_is_json: row.try_get("body_is_json")?,
            received_at: row.try_get("received_at")?,
            event: row.try_get("event")?,
            body: self.body_of(row)?,
            runs: Vec::new(),
            request_id: row.try_get("request_id")?,
            chain: Vec::new(),
            origin: origin_of(row)?,
        })
    }

    /// For each lane head in `heads` with exactly one run due: the deliveries waiting right
    /// behind it, each due for that same run and its first attempt, leased to `owner` with it;
    /// a chain stops at the first that is not, or that another transaction holds. Two
    /// statements for all heads together, so that a claim of many lanes with nothing behind
    /// them costs no more round trips than before.
    async fn chains_behind(
        &self,
        conn: &mut PgConnection,
        heads: &mut [Claimed],
        owner: &LeaseOwner,
        now: UnixMillis,
        until: UnixMillis,
        chain_max: u32,
    ) -> Result<(), StoreError> {
        let handler_of = |head: &Claimed| match (head.entity.as_deref(), head.runs.as_slice()) {
            (Some(entity), [run]) => Some((entity.to_owned(), run.handler.clone())),
            _ => None,
        };
        let wanted: Vec<String> = heads
            .iter()
            .filter_map(|h| handler_of(h).map(|(entity, _)| entity))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        // Each lane's next deliveries with what each waits for; a delivery with any other run
        // (or a second one) has a row of its own that ends its chain.
        let waiting: Vec<LaneRun> = sqlx::query_as(
            "SELECT d.entity, d.seq, COALESCE(d.lease_until >= $2, false), h.handler, h.state, \
                    h.attempts, h.next_at <= $2 \
             FROM (SELECT entity, seq, lane_pos, lease_until, \
                          row_number() OVER (PARTITION BY entity ORDER BY lane_pos) AS n \
                   FROM deliveries WHERE entity = ANY($1) AND waiting) d \
             LEFT JOIN handler_runs h ON h.delivery_seq = d.seq \
             WHERE d.n <= $3 \
             ORDER BY d.entity, d.lane_pos, h.handler",
        )
        .bind(&wanted)
        .bind(now)
        .bind(i64::from(chain_max))
        .fetch_all(&mut *conn)
        .await?;
        // The rows come ordered by entity: each lane's rows are one run of them.
        let lanes: HashMap<&str, &[LaneRun]> = waiting
            .chunk_by(|a, b| a.0 == b.0)
            .map(|lane| (lane[0].0.as_str(), lane))
            .collect();
        // Per head, the sequence numbers of its chain, in lane order.
        let mut chains: Vec<Vec<i64>> = vec![Vec::new(); heads.len()];
        for (head, chain) in heads.iter().zip(chains.iter_mut()) {
            let Some((entity, handler)) = handler_of(head) else {
                continue;
            };
            let lane = lanes.get(entity.as_str()).copied().unwrap_or_default();
            for (i, (_, seq, leased, run, state, attempts, due)) in lane.iter().enumerate() {
                let alone = lane.get(i + 1).is_none_or(|next| next.1 != *seq);
                let same_first_run = run.as_deref() == Some(handler.as_str())
                    && state.as_deref() == Some("pending")
                    && *attempts == Some(0)
                    && *due == Some(true);
                if *leased || !alone || !same_first_run {
                    break;
                }
                chain.push(*seq);
            }
        }
        let members: Vec<i64> = chains.iter().flatten().copied().collect();
        if members.is_empty() {
            return Ok(());
        }
        let rows = sqlx::query(&format!(
            "UPDATE deliveries d SET lease_owner = $2, lease_until = $3 \
             FROM (SELECT seq FROM deliveries WHERE seq = ANY($1) AND waiting \
                   FOR UPDATE SKIP LOCKED) c \
             WHERE d.seq = c.seq \
             RETURNING {CLAIM_COLUMNS}"
        ))
        .bind(&members)
        .bind(owner.as_str())
        .bind(until)
        .fetch_all(&mut *conn)
        .await?;
        let mut leased: HashMap<i64, Claimed> = rows
            .iter()
            .map(|row| self.claimed_of(row).map(|c| (c.seq, c)))
            .collect::<Result<_, _>>()?;
        for (head, chain) in heads.iter_mut().zip(chains) {
            let Some(run) = head.runs.first().cloned() else {
                continue;
            };
            for seq in chain {
                // A chain ends at the first delivery another transaction held.
                let Some(mut member) = leased.remove(&seq) else {
                    break;
                };
                member.runs = vec![DueRun {
                    handler: run.handler.clone(),
                    attempts: 0,
                }];
                head.chain.push(member);
            }
        }
        // Rows leased past a gap are not part of a chain: their leases go back.
        let stray: Vec<i64> = leased.into_keys().collect();
        if !stray.is_empty() {
            sqlx::query(
                "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL WHERE seq = ANY($1)",
            )
            .bind(&stray)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}

/// Records one claimed delivery's attempts inside `conn`'s transaction: its runs, its attempt
/// log, its status, the release of its lease, and its lane's promotion when it is finished.
async fn record_in(
    conn: &mut PgConnection,
    seq: i64,
    owner: &LeaseOwner,
    results: &[AttemptResult],
    now: UnixMillis,
) -> Result<Status, StoreError> {
    let row: Option<(Option<String>, String)> =
        sqlx::query_as("SELECT lease_owner, status FROM deliveries WHERE seq = $1 FOR UPDATE")
            .bind(seq)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((Some(holder), current)) = row else {
        return Err(StoreError::LeaseLost(seq));
    };
    if holder != owner.as_str() {
        return Err(StoreError::LeaseLost(seq));
    }
    for r in results {
        let error = r.outcome.error();
        sqlx::query(
            "UPDATE handler_runs SET state = $3, attempts = $4, next_at = $5, \
                 last_error = COALESCE($6, last_error) WHERE delivery_seq = $1 AND handler = $2",
        )
        .bind(seq)
        .bind(&r.handler)
        .bind(r.outcome.run_state().as_str())
        .bind(r.attempt as i32)
        .bind(r.outcome.next_at())
        .bind(error)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO attempts (delivery_seq, handler, attempt, started_at, finished_at, \
                 outcome, error) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(seq)
        .bind(&r.handler)
        .bind(r.attempt as i32)
        .bind(r.started_at)
        .bind(r.finished_at)
        .bind(r.outcome.kind().as_str())
        .bind(error)
        .execute(&mut *conn)
        .await?;
    }
    let (next_due, dead): (Option<i64>, i64) = sqlx::query_as(
        "SELECT MIN(next_at) FILTER (WHERE state = 'pending'), \
                    COUNT(*) FILTER (WHERE state = 'dead') \
             FROM handler_runs WHERE delivery_seq = $1",
    )
    .bind(seq)
    .fetch_one(&mut *conn)
    .await?;
    let current: Status = current.parse().map_err(StoreError::Corrupt)?;
    let status = status_after_runs(current, next_due.is_some(), dead > 0);
    sqlx::query(
        // A chain member still waiting behind an unfinished delivery is not due, whatever
        // it has left.
        "UPDATE deliveries SET status = $2, \
             due_at = CASE WHEN waiting THEN NULL ELSE $3 END, lease_owner = NULL, \
             lease_until = NULL WHERE seq = $1",
    )
    .bind(seq)
    .bind(status.as_str())
    .bind(next_due)
    .execute(&mut *conn)
    .await?;
    if next_due.is_none() {
        finish_in_lane(&mut *conn, seq, now).await?;
    }
    Ok(status)
}

/// Called when the lane head `seq` has no work left (done, dead, or taken back for replay):
/// the next waiting delivery of its entity, if any, becomes the head and is due now.
pub(super) async fn finish_in_lane(
    conn: &mut PgConnection,
    seq: i64,
    now: UnixMillis,
) -> Result<(), StoreError> {
    let head: Option<String> = sqlx::query_scalar(
        "SELECT e.entity FROM deliveries d JOIN entities e ON e.entity = d.entity \
         WHERE d.seq = $1 AND e.active_pos = d.lane_pos FOR UPDATE OF e",
    )
    .bind(seq)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(entity) = head else {
        return Ok(());
    };
    let next: Option<(i64, i64)> = sqlx::query_as(
        "SELECT seq, lane_pos FROM deliveries WHERE entity = $1 AND waiting \
         ORDER BY lane_pos LIMIT 1",
    )
    .bind(&entity)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((next_seq, _)) = next {
        sqlx::query("UPDATE deliveries SET waiting = false, due_at = $2 WHERE seq = $1")
            .bind(next_seq)
            .bind(now)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("UPDATE entities SET active_pos = $2 WHERE entity = $1")
        .bind(&entity)
        .bind(next.map(|(_, pos)| pos))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A row's `origin` column.
pub(super) fn origin_of(row: &PgRow) -> Result<Origin, StoreError> {
    let text: String = row.try_get("origin")?;
    Origin::parse(&text).ok_or_else(|| StoreError::Corrupt(format!("origin {text:?}")))
}
