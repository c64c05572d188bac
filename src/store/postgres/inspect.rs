//! What the CLI reads from PostgreSQL (`events list`, `events show`) and `events replay`,
//! which puts deliveries back before the gate and wakes every replica's dispatcher.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::Row;

use super::queue::finish_in_lane;
use super::PgStore;
use crate::delivery::format_millis;
use crate::ordering::Version;
use crate::store::{
    AttemptRecord, DeliveryDetail, DeliverySummary, HandlerRun, Inspect, ListQuery, ReplayOutcome,
    ReplayTarget, RunState, StoreError,
};

const SUMMARY_COLUMNS: &str = "seq, delivery_id, endpoint, topic, entity, version, status, \
    received_at, body_len, id_conflict";

fn summary(row: &PgRow) -> Result<DeliverySummary, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(DeliverySummary {
        seq: row.try_get("seq")?,
        delivery_id: row.try_get("delivery_id")?,
        endpoint: row.try_get("endpoint")?,
        topic: row.try_get("topic")?,
        entity: row.try_get("entity")?,
        version: row
            .try_get::<Option<i64>, _>("version")?
            .map(|v| Version::from_nanos(v).to_string()),
        status: status.parse().map_err(StoreError::Corrupt)?,
        received_at: format_millis(row.try_get("received_at")?),
        body_len: row.try_get::<i64, _>("body_len")?.max(0) as u64,
        id_conflict: row.try_get("id_conflict")?,
    })
}

#[async_trait]
impl Inspect for PgStore {
    async fn list(&self, query: &ListQuery) -> Result<Vec<DeliverySummary>, StoreError> {
        self.ready().await?;
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS} FROM deliveries \
             WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR topic = $2) \
             ORDER BY seq DESC LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(query.status.map(|s| s.as_str()))
            .bind(&query.topic)
            .bind(i64::from(query.limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(summary).collect()
    }

    async fn show(&self, delivery_id: &str) -> Result<Vec<DeliveryDetail>, StoreError> {
        self.ready().await?;
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS}, client_ip, headers, body, blob_id, fresh, parse_error, \
             body_pruned FROM deliveries WHERE delivery_id = $1 ORDER BY seq"
        );
        let rows = sqlx::query(&sql)
            .bind(delivery_id)
            .fetch_all(&self.pool)
            .await?;
        let mut details = Vec::with_capacity(rows.len());
        for row in &rows {
            let summary = summary(row)?;
            let headers: String = row.try_get("headers")?;
            let body_pruned: bool = row.try_get("body_pruned")?;
            let body = if body_pruned {
                crate::delivery::Payload::inline(bytes::Bytes::new())
            } else {
                self.body_of(row)?
            };
            details.push(DeliveryDetail {
                client_ip: row.try_get("client_ip")?,
                headers: serde_json::from_str(&headers)
                    .map_err(|e| StoreError::Corrupt(format!("headers: {e}")))?,
                body,
                body_pruned,
                fresh: row.try_get("fresh")?,
                parse_error: row.try_get("parse_error")?,
                handlers: self.handler_runs(summary.seq).await?,
                attempts: self.attempts(summary.seq).await?,
                summary,
            });
        }
        Ok(details)
    }

    async fn replay(&self, target: &ReplayTarget) -> Result<ReplayOutcome, StoreError> {
        self.ready().await?;
        let now = self.clock.now();
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(i64, bool)> = match target {
            ReplayTarget::DeliveryId(id) => {
                sqlx::query_as(
                    "SELECT seq, COALESCE(lease_until > $2, false) FROM deliveries \
                     WHERE delivery_id = $1 ORDER BY seq FOR UPDATE",
                )
                .bind(id)
                .bind(now)
                .fetch_all(&mut *tx)
                .await?
            }
            ReplayTarget::Status(status) => {
                sqlx::query_as(
                    "SELECT seq, COALESCE(lease_until > $2, false) FROM deliveries \
                     WHERE status = $1 ORDER BY seq FOR UPDATE",
                )
                .bind(status.as_str())
                .bind(now)
                .fetch_all(&mut *tx)
                .await?
            }
        };
        let mut outcome = ReplayOutcome::default();
        for (seq, running) in rows {
            if running {
                // Being handled right now: replaying it would run it twice at once.
                outcome.running += 1;
                continue;
            }
            // A replayed lane head steps aside first, or it would wait behind itself.
            finish_in_lane(&mut tx, seq, now).await?;
            // Runs that succeeded stay done; the others start over with fresh attempts.
            sqlx::query("DELETE FROM handler_runs WHERE delivery_seq = $1 AND state <> $2")
                .bind(seq)
                .bind(RunState::Done.as_str())
                .execute(&mut *tx)
                .await?;
            // Back to the gate: the entity may have moved on meanwhile, and the ordering
            // promise holds for replays too.
            sqlx::query(
                "UPDATE deliveries SET gated = false, fresh = NULL, lane_pos = NULL, \
                 waiting = false, \
                 status = CASE WHEN status = 'unrecognized' THEN status ELSE 'pending' END, \
                 due_at = NULL, lease_owner = NULL, lease_until = NULL, gate_owner = NULL, \
                 gate_until = NULL WHERE seq = $1",
            )
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            outcome.replayed += 1;
        }
        if outcome.replayed > 0 {
            Self::announce_work(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(outcome)
    }
}

/// `handler_runs` columns: handler, state, attempts, next_at, last_error.
type RunRow = (String, String, i32, Option<i64>, Option<String>);
/// `attempts` columns: handler, attempt, started_at, finished_at, outcome, error.
type AttemptRow = (String, i32, i64, i64, String, Option<String>);

impl PgStore {
    async fn handler_runs(&self, seq: i64) -> Result<Vec<HandlerRun>, StoreError> {
        let rows: Vec<RunRow> = sqlx::query_as(
            "SELECT handler, state, attempts, next_at, last_error FROM handler_runs \
             WHERE delivery_seq = $1 ORDER BY handler",
        )
        .bind(seq)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(handler, state, attempts, next_at, last_error)| {
                Ok(HandlerRun {
                    handler,
                    state: state.parse().map_err(StoreError::Corrupt)?,
                    attempts: attempts.max(0) as u32,
                    next_attempt_at: next_at.map(format_millis),
                    last_error,
                })
            })
            .collect()
    }

    async fn attempts(&self, seq: i64) -> Result<Vec<AttemptRecord>, StoreError> {
        let rows: Vec<AttemptRow> = sqlx::query_as(
            "SELECT handler, attempt, started_at, finished_at, outcome, error FROM attempts \
             WHERE delivery_seq = $1 ORDER BY started_at, handler",
        )
        .bind(seq)
        .fetch_all(&self.pool)
        .await?;
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
}
