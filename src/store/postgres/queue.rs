//! The PostgreSQL back-end's dispatch queue, safe for several replicas at once. Work lives in
//! `queue`, one small row per delivery with work left, apart from the delivery's row (which is
//! never rewritten):
//! - taking deliveries to gate and claiming due work are one statement each for a whole batch,
//!   `FOR UPDATE SKIP LOCKED`, so two replicas never get the same row, and reserve what they
//!   took for a lease (owner and expiry in the queue row; taken over only once expired);
//! - a claim leases only lane heads (the queue rows with a due time), and the chains waiting
//!   right behind them in two more statements for all heads together;
//! - leases are written through connections that commit without waiting for the WAL flush
//!   ([`super::lease_pool`] says why that loses nothing but, after a server crash, a repeat);
//! - gating a batch is [`super::gating`], recording outcomes [`super::outcomes`].
//!
//! Each write transaction (gate, claim, attempts) is counted as one store commit, as the
//! intake's are, so that `/metrics` shows the latency of every commit a delivery waits for.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::Row;

use super::outcomes::Outcome;
use super::PgStore;
use crate::delivery::{after, Origin, Payload, Status, UnixMillis};
use crate::ordering::{Verdict, Version};
use crate::store::{
    AttemptResult, ChainRecord, Claimed, DueRun, GateRequest, LeaseOwner, Queue, StoreError,
    Ungated,
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
            "WITH taken AS ( \
                 UPDATE queue q SET lease_owner = $1, lease_until = $2 \
                 FROM (SELECT seq FROM queue \
                       WHERE NOT gated AND (lease_until IS NULL OR lease_until < $3) \
                       ORDER BY seq LIMIT $4 FOR UPDATE SKIP LOCKED) t \
                 WHERE q.seq = t.seq RETURNING q.seq) \
             SELECT d.seq, d.delivery_id, d.request_id, d.topic, d.body, d.blob_id, d.body_len, \
                 d.origin \
             FROM deliveries d WHERE d.seq = ANY(ARRAY(SELECT seq FROM taken)) ORDER BY d.seq",
        )
        .bind(owner.as_str())
        .bind(after(now, lease))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.leases)
        .await?;
        // Oldest first: the gate decides in arrival order.
        rows.iter()
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
            .collect()
    }

    async fn record_gates(
        &self,
        gates: Vec<GateRequest>,
    ) -> Result<Vec<Option<Verdict>>, StoreError> {
        self.ready().await?;
        super::gating::record(&self.pool, &gates, self.clock.now()).await
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
        // One statement, committed on its own: the heads' leases and what they carry.
        let rows = sqlx::query(&format!(
            "WITH c AS ( \
                 UPDATE queue q SET lease_owner = $1, lease_until = $2 \
                 FROM (SELECT seq FROM queue \
                       WHERE due_at IS NOT NULL AND due_at <= $3 \
                         AND (lease_until IS NULL OR lease_until < $3) \
                       ORDER BY due_at, seq LIMIT $4 FOR UPDATE SKIP LOCKED) t \
                 WHERE q.seq = t.seq RETURNING q.seq) \
             SELECT {CLAIM_COLUMNS}, r.handlers, r.attempts \
             FROM {CLAIMED_ROWS} \
             CROSS JOIN LATERAL ( \
                 SELECT array_agg(h.handler ORDER BY h.handler) AS handlers, \
                        array_agg(h.attempts ORDER BY h.handler) AS attempts \
                 FROM handler_runs h \
                 WHERE h.delivery_seq = d.seq AND h.state = 'pending' AND h.next_at <= $3) r \
             WHERE {CLAIMED_ONLY}"
        ))
        .bind(owner.as_str())
        .bind(until)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.leases)
        .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut head = self.claimed_of(row)?;
            let handlers: Option<Vec<String>> = row.try_get("handlers")?;
            let attempts: Option<Vec<i32>> = row.try_get("attempts")?;
            head.runs = handlers
                .unwrap_or_default()
                .into_iter()
                .zip(attempts.unwrap_or_default())
                .map(|(handler, attempts)| DueRun {
                    handler,
                    attempts: attempts.max(0) as u32,
                })
                .collect();
            claimed.push(head);
        }
        if chain_max > 0 {
            self.chains_behind(&mut claimed, owner, now, until, chain_max)
                .await?;
        }
        telemetry::record_commit("postgres", started.elapsed(), claimed.len().max(1));
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
            "UPDATE queue SET lease_until = $3 \
             WHERE seq = ANY($1) AND lease_owner = $2 RETURNING seq",
        )
        .bind(seqs)
        .bind(owner.as_str())
        .bind(after(self.clock.now(), lease))
        .fetch_all(&self.leases)
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
        let record = ChainRecord {
            seq,
            results: results.to_vec(),
        };
        self.outcomes()
            .submit(Outcome::attempts(owner, record))
            .await
    }

    async fn record_chain(
        &self,
        owner: &LeaseOwner,
        records: &[ChainRecord],
    ) -> Result<(), StoreError> {
        self.ready().await?;
        self.outcomes()
            .submit(Outcome::chain(owner, records.to_vec()))
            .await
            .map(|_| ())
    }

    async fn queue_depth(&self) -> Result<u64, StoreError> {
        self.ready().await?;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM queue")
            .fetch_one(&self.pool)
            .await?;
        Ok(n.max(0) as u64)
    }

    async fn oldest_unfinished(&self) -> Result<Option<UnixMillis>, StoreError> {
        self.ready().await?;
        // Deliveries are queued in seq order, so the lowest seq with work left is the oldest.
        let at = sqlx::query_scalar("SELECT received_at FROM queue ORDER BY seq LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(at)
    }

    async fn wait_for_work(&self, max_wait: Duration) {
        let _ = tokio::time::timeout(max_wait, self.wakeups.work.notified()).await;
    }
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

/// The columns a claim returns, as [`PgStore::claimed_of`] reads them: the delivery's row as it
/// was received, and the gate's verdict.
const CLAIM_COLUMNS: &str = "d.seq, d.delivery_id, d.topic, v.entity, v.version, v.project_id, \
    v.fresh, COALESCE(v.parse_error IS NULL, true) AS body_is_json, d.received_at, d.body, \
    d.blob_id, d.body_len, v.event, d.request_id, d.origin";

/// The deliveries (`d`) and verdicts (`v`) of the rows a claim's `c` leased, to be followed by
/// [`CLAIMED_ONLY`]. Looked up by their keys as an array, so that each is found through its
/// primary key whatever the planner thinks of `c`'s size: a join would let it scan the whole
/// table, which only grows.
const CLAIMED_ROWS: &str = "deliveries d \
    LEFT JOIN verdicts v ON v.seq = d.seq AND v.seq = ANY(ARRAY(SELECT seq FROM c))";
/// The condition that goes with [`CLAIMED_ROWS`].
const CLAIMED_ONLY: &str = "d.seq = ANY(ARRAY(SELECT seq FROM c))";

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

    /// The first `chain_max` deliveries waiting in each of `entities`' lanes, with what each
    /// waits for; a delivery with any other run (or a second one) has a row of its own.
    async fn lanes_behind(
        &self,
        entities: &[String],
        now: UnixMillis,
        chain_max: u32,
    ) -> Result<Vec<LaneRun>, StoreError> {
        let waiting = sqlx::query_as(
            "WITH q AS MATERIALIZED ( \
                 SELECT entity, seq, lane_pos, lease_until FROM ( \
                     SELECT entity, seq, lane_pos, lease_until, \
                            row_number() OVER (PARTITION BY entity ORDER BY lane_pos) AS n \
                     FROM queue WHERE entity = ANY($1) AND waiting) w \
                 WHERE n <= $3) \
             SELECT q.entity, q.seq, COALESCE(q.lease_until >= $2, false), h.handler, h.state, \
                    h.attempts, h.next_at <= $2 \
             FROM q LEFT JOIN LATERAL ( \
                 SELECT handler, state, attempts, next_at FROM handler_runs r \
                 WHERE r.delivery_seq = q.seq OFFSET 0) h ON true \
             ORDER BY q.entity, q.lane_pos, h.handler",
        )
        .bind(entities)
        .bind(now)
        .bind(i64::from(chain_max))
        .fetch_all(&self.leases)
        .await?;
        Ok(waiting)
    }

    /// For each lane head in `heads` with exactly one run due: the deliveries waiting right
    /// behind it, each due for that same run and its first attempt, leased to `owner` with it;
    /// a chain stops at the first that is not, or that another transaction holds. Two
    /// statements for all heads together. They need no transaction with the heads' claim:
    /// nobody else claims what waits behind a head this owner holds.
    async fn chains_behind(
        &self,
        heads: &mut [Claimed],
        owner: &LeaseOwner,
        now: UnixMillis,
        until: UnixMillis,
        chain_max: u32,
    ) -> Result<(), StoreError> {
        let wanted: Vec<String> = heads
            .iter()
            .filter_map(|h| chain_handler(h).map(|(entity, _)| entity.to_owned()))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let waiting = self.lanes_behind(&wanted, now, chain_max).await?;
        let chains = pick_chains(heads, &waiting);
        let members: Vec<i64> = chains.iter().flatten().copied().collect();
        if members.is_empty() {
            return Ok(());
        }
        let rows = sqlx::query(&format!(
            "WITH c AS ( \
                 UPDATE queue q SET lease_owner = $2, lease_until = $3 \
                 FROM (SELECT seq FROM queue WHERE seq = ANY($1) AND waiting \
                       FOR UPDATE SKIP LOCKED) t \
                 WHERE q.seq = t.seq RETURNING q.seq) \
             SELECT {CLAIM_COLUMNS} FROM {CLAIMED_ROWS} WHERE {CLAIMED_ONLY}"
        ))
        .bind(&members)
        .bind(owner.as_str())
        .bind(until)
        .fetch_all(&self.leases)
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
                "UPDATE queue SET lease_owner = NULL, lease_until = NULL \
                 WHERE seq = ANY($1) AND lease_owner = $2",
            )
            .bind(&stray)
            .bind(owner.as_str())
            .execute(&self.leases)
            .await?;
        }
        Ok(())
    }
}

/// The entity and handler of a head that may bring a chain: one with exactly one run due.
fn chain_handler(head: &Claimed) -> Option<(&str, &str)> {
    match (head.entity.as_deref(), head.runs.as_slice()) {
        (Some(entity), [run]) => Some((entity, run.handler.as_str())),
        _ => None,
    }
}

/// Per head, the sequence numbers of its chain in lane order, from `waiting` (each lane's next
/// deliveries and their runs, ordered by entity and lane position): the deliveries right
/// behind it due for its one handler's first attempt and nothing else, up to the first that is
/// not, or that someone holds.
fn pick_chains(heads: &[Claimed], waiting: &[LaneRun]) -> Vec<Vec<i64>> {
    // Each lane's rows are one run of them.
    let lanes: HashMap<&str, &[LaneRun]> = waiting
        .chunk_by(|a, b| a.0 == b.0)
        .map(|lane| (lane[0].0.as_str(), lane))
        .collect();
    let mut chains: Vec<Vec<i64>> = vec![Vec::new(); heads.len()];
    for (head, chain) in heads.iter().zip(chains.iter_mut()) {
        let Some((entity, handler)) = chain_handler(head) else {
            continue;
        };
        let lane = lanes.get(entity).copied().unwrap_or_default();
        for (i, (_, seq, leased, run, state, attempts, due)) in lane.iter().enumerate() {
            // A delivery with any other run (or a second one) has a row of its own.
            let alone = lane.get(i + 1).is_none_or(|next| next.1 != *seq);
            let same_first_run = run.as_deref() == Some(handler)
                && state.as_deref() == Some("pending")
                && *attempts == Some(0)
                && *due == Some(true);
            if *leased || !alone || !same_first_run {
                break;
            }
            chain.push(*seq);
        }
    }
    chains
}

/// A row's `origin` column.
pub(super) fn origin_of(row: &PgRow) -> Result<Origin, StoreError> {
    let text: String = row.try_get("origin")?;
    Origin::parse(&text).ok_or_else(|| StoreError::Corrupt(format!("origin {text:?}")))
}
