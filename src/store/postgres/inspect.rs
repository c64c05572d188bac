//! What the CLI and the console read from PostgreSQL (`events list`, `events show`, an
//! entity's history, the gate's reasons, handler activity, the overview), and `events replay`,
//! which puts deliveries back before the gate and wakes every replica's dispatcher.
//!
//! A delivery is read as its row as received (`deliveries`), its status (`delivery_status`,
//! indexed by status for the dead-letter page and `--status` filters) and the gate's verdict
//! (`verdicts`, none before it was gated); [`DELIVERIES`] joins them.

use std::collections::BTreeMap;

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};

use super::PgStore;
use crate::delivery::{format_millis, Status, UnixMillis};
use crate::ordering::{Change, Version};
use crate::store::gate::{applied, replay_effect};
use crate::store::model::{counts_by_status, in_version_order, RECEIVED_WINDOW_MARGIN_MS};
use crate::store::{
    AttemptRecord, DeliveryDetail, DeliverySummary, EntityEntry, EntityHistory, EntityState,
    HandlerActivity, HandlerRun, Inspect, ListQuery, Overview, ReceivedBucket, ReplayItem,
    ReplayOutcome, ReplayTarget, StoreError, VerdictBasis,
};

/// A delivery with its status and verdict: `d`, `s` and `v`.
const DELIVERIES: &str = "deliveries d JOIN delivery_status s ON s.seq = d.seq \
    LEFT JOIN verdicts v ON v.seq = d.seq";
/// Qualified, so that they can be read beside a join with `entities`.
const SUMMARY_COLUMNS: &str = "d.seq, d.delivery_id, d.endpoint, d.topic, v.entity, v.version, \
    s.status, d.received_at, d.body_len, d.id_conflict, v.project_id, d.origin";
/// A delivery with the gate's view of it: [`SUMMARY_COLUMNS`] followed by these.
const ENTRY_COLUMNS: &str = "v.change, v.fresh, v.lane_pos";

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
        project_id: row.try_get("project_id")?,
        origin: super::queue::origin_of(row)?,
    })
}

fn entry(row: &PgRow) -> Result<EntityEntry, StoreError> {
    Ok(EntityEntry {
        summary: summary(row)?,
        change: row
            .try_get::<Option<String>, _>("change")?
            .as_deref()
            .and_then(Change::parse),
        fresh: row.try_get("fresh")?,
        lane_pos: row.try_get("lane_pos")?,
    })
}

#[async_trait]
impl Inspect for PgStore {
    async fn list(&self, query: &ListQuery) -> Result<Vec<DeliverySummary>, StoreError> {
        self.ready().await?;
        // Only the filters given become conditions, so the planner sees what each query is.
        let mut sql: QueryBuilder<'_, Postgres> = QueryBuilder::new(format!(
            "SELECT {SUMMARY_COLUMNS} FROM {DELIVERIES} WHERE true"
        ));
        if let Some(status) = query.status {
            sql.push(" AND s.status = ").push_bind(status.as_str());
        }
        for (column, value) in [
            (" AND d.topic = ", &query.topic),
            (" AND v.project_id = ", &query.project_id),
            (" AND v.entity = ", &query.entity),
            (" AND d.delivery_id = ", &query.delivery_id),
        ] {
            if let Some(value) = value {
                sql.push(column).push_bind(value.clone());
            }
        }
        if let Some(handler) = &query.handler {
            sql.push(
                " AND EXISTS (SELECT 1 FROM handler_runs h WHERE h.delivery_seq = d.seq \
                 AND h.handler = ",
            )
            .push_bind(handler.clone())
            .push(")");
        }
        if let Some(from) = query.received_from {
            sql.push(" AND d.received_at >= ").push_bind(from);
        }
        if let Some(until) = query.received_until {
            sql.push(" AND d.received_at < ").push_bind(until);
        }
        if let Some(before) = query.before_seq {
            sql.push(" AND d.seq < ").push_bind(before);
        }
        sql.push(" ORDER BY d.seq DESC LIMIT ")
            .push_bind(i64::from(query.limit));
        let rows = sql.build().fetch_all(&self.pool).await?;
        rows.iter().map(summary).collect()
    }

    async fn show(&self, delivery_id: &str) -> Result<Vec<DeliveryDetail>, StoreError> {
        self.ready().await?;
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS}, d.client_ip, d.headers, d.body, d.blob_id, v.fresh, \
             v.parse_error, d.body_pruned, d.request_id FROM {DELIVERIES} \
             WHERE d.delivery_id = $1 ORDER BY d.seq"
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
                handlers: runs_of(&self.pool, summary.seq).await?,
                attempts: self.attempts(summary.seq).await?,
                summary,
                request_id: row.try_get("request_id")?,
            });
        }
        Ok(details)
    }

    async fn replay(&self, target: &ReplayTarget) -> Result<ReplayOutcome, StoreError> {
        let items = self.replay_each(target).await?;
        let running = items.iter().filter(|i| !i.effect.replays()).count() as u64;
        Ok(ReplayOutcome {
            replayed: items.len() as u64 - running,
            running,
        })
    }

    async fn replay_preview(&self, target: &ReplayTarget) -> Result<Vec<ReplayItem>, StoreError> {
        self.ready().await?;
        let mut conn = self.pool.acquire().await?;
        replay_plan(&mut conn, target, self.clock.now(), false).await
    }

    async fn replay_each(&self, target: &ReplayTarget) -> Result<Vec<ReplayItem>, StoreError> {
        self.ready().await?;
        let now = self.clock.now();
        let mut tx = self.pool.begin().await?;
        // The rows are locked while they are judged, so what is said is what is done.
        let items = replay_plan(&mut tx, target, now, true).await?;
        // Being handled right now: replaying it would run it twice at once.
        let seqs: Vec<i64> = items
            .iter()
            .filter(|i| i.effect.replays())
            .map(|i| i.summary.seq)
            .collect();
        if !seqs.is_empty() {
            send_back(&mut tx, &seqs, now).await?;
            Self::announce_work(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(items)
    }

    /// The entity has no index of its own (the dispatchers never look deliveries up by it),
    /// so this reads the verdicts: for a person looking at one entity, not for a loop.
    async fn entity_history(&self, entity: &str, limit: u32) -> Result<EntityHistory, StoreError> {
        self.ready().await?;
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS}, {ENTRY_COLUMNS} FROM {DELIVERIES} WHERE v.entity = $1 \
             ORDER BY d.seq DESC LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(entity)
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
            .await?;
        let truncated = rows.len() > limit as usize;
        let mut entries = Vec::with_capacity(rows.len());
        for row in rows.iter().take(limit as usize) {
            entries.push((row.try_get::<Option<i64>, _>("version")?, entry(row)?));
        }
        Ok(EntityHistory {
            state: self.entity_state(entity).await?,
            deliveries: in_version_order(entries),
            truncated,
        })
    }

    async fn verdict_basis(&self, seq: i64) -> Result<Option<VerdictBasis>, StoreError> {
        self.ready().await?;
        let sql =
            format!("SELECT {SUMMARY_COLUMNS}, {ENTRY_COLUMNS} FROM {DELIVERIES} WHERE d.seq = $1");
        let Some(row) = sqlx::query(&sql)
            .bind(seq)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let delivery = entry(&row)?;
        let Some(entity) = delivery.summary.entity.clone() else {
            return Ok(Some(VerdictBasis {
                delivery,
                held_against: None,
                entity: None,
            }));
        };
        let held_against = match delivery.lane_pos {
            Some(pos) => {
                let sql = format!(
                    "SELECT {SUMMARY_COLUMNS}, {ENTRY_COLUMNS} FROM {DELIVERIES} \
                     WHERE v.entity = $1 AND v.lane_pos < $2 AND v.fresh \
                       AND (v.version IS NOT NULL OR v.change = 'deleted') \
                     ORDER BY v.lane_pos DESC LIMIT 1"
                );
                let row = sqlx::query(&sql)
                    .bind(&entity)
                    .bind(pos)
                    .fetch_optional(&self.pool)
                    .await?;
                row.as_ref().map(entry).transpose()?
            }
            None => None,
        };
        Ok(Some(VerdictBasis {
            delivery,
            held_against,
            entity: self.entity_state(&entity).await?,
        }))
    }

    async fn handler_activity(
        &self,
        since: UnixMillis,
    ) -> Result<Vec<HandlerActivity>, StoreError> {
        self.ready().await?;
        let mut by_handler: BTreeMap<String, HandlerActivity> = BTreeMap::new();
        let attempts: Vec<(String, Option<i64>, Option<i64>, i64, i64)> = sqlx::query_as(
            "SELECT handler, MAX(finished_at) FILTER (WHERE outcome = 'ok'), \
                    MAX(finished_at) FILTER (WHERE outcome <> 'ok'), \
                    COUNT(*) FILTER (WHERE outcome <> 'ok' AND finished_at >= $1), \
                    COUNT(*) FILTER (WHERE outcome = 'ok' AND finished_at >= $1) \
             FROM attempts GROUP BY handler",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        for (handler, success, failure, failures, successes) in attempts {
            by_handler.insert(
                handler.clone(),
                HandlerActivity {
                    handler,
                    last_success_at: success,
                    last_failure_at: failure,
                    failures_since: failures.max(0) as u64,
                    successes_since: successes.max(0) as u64,
                    ..HandlerActivity::default()
                },
            );
        }
        let errors: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT DISTINCT ON (handler) handler, error FROM attempts WHERE outcome <> 'ok' \
             ORDER BY handler, finished_at DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        for (handler, error) in errors {
            if let Some(a) = by_handler.get_mut(&handler) {
                a.last_error = error;
            }
        }
        let runs: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT handler, COUNT(*) FILTER (WHERE state = 'dead'), \
                    COUNT(*) FILTER (WHERE state = 'pending') \
             FROM handler_runs GROUP BY handler",
        )
        .fetch_all(&self.pool)
        .await?;
        HandlerActivity::add_run_counts(&mut by_handler, runs);
        Ok(by_handler.into_values().collect())
    }

    async fn overview(
        &self,
        since: UnixMillis,
        now: UnixMillis,
        bucket_ms: i64,
    ) -> Result<Overview, StoreError> {
        self.ready().await?;
        let by_status: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM delivery_status GROUP BY status")
                .fetch_all(&self.pool)
                .await?;
        let by_status = counts_by_status(by_status).map_err(StoreError::Corrupt)?;
        let mut buckets = ReceivedBucket::span(since, now, bucket_ms);
        if buckets.is_empty() {
            return Ok(Overview { by_status, buckets });
        }
        // `received_at` has no index; `seq` grows with it, so the window's rows are found by
        // walking back from the newest to the first row received well before it.
        let floor: i64 = sqlx::query_scalar(
            "SELECT COALESCE((SELECT seq FROM deliveries WHERE received_at < $1 \
             ORDER BY seq DESC LIMIT 1), 0)",
        )
        .bind(since.saturating_sub(RECEIVED_WINDOW_MARGIN_MS))
        .fetch_one(&self.pool)
        .await?;
        let counts: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT (d.received_at - $1) / $2, s.status, COUNT(*) \
             FROM deliveries d JOIN delivery_status s ON s.seq = d.seq \
             WHERE d.seq > $3 AND d.received_at >= $1 AND d.received_at < $4 GROUP BY 1, 2",
        )
        .bind(since)
        .bind(bucket_ms)
        .bind(floor)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        for (index, status, n) in counts {
            let status: Status = status.parse().map_err(StoreError::Corrupt)?;
            if let Some(bucket) = usize::try_from(index).ok().and_then(|i| buckets.get_mut(i)) {
                bucket.by_status.push((status, n.max(0) as u64));
            }
        }
        Ok(Overview { by_status, buckets })
    }
}

/// What replaying `target` does to each delivery it names (see [`replay_effect`]); with
/// `lock`, the deliveries are locked until the transaction ends.
async fn replay_plan(
    conn: &mut PgConnection,
    target: &ReplayTarget,
    now: UnixMillis,
    lock: bool,
) -> Result<Vec<ReplayItem>, StoreError> {
    let (condition, value) = match target {
        ReplayTarget::DeliveryId(id) => ("d.delivery_id = $1", id.clone()),
        ReplayTarget::Status(status) => ("s.status = $1", status.as_str().to_owned()),
    };
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS}, COALESCE(q.gated AND q.lease_until > $2, false) AS running, \
         v.change, e.version AS entity_version, e.change AS entity_change, \
         e.backfilled AS entity_backfilled \
         FROM {DELIVERIES} LEFT JOIN queue q ON q.seq = d.seq \
         LEFT JOIN entities e ON e.entity = v.entity \
         WHERE {condition} ORDER BY d.seq{}",
        if lock { " FOR UPDATE OF s" } else { "" }
    );
    let rows = sqlx::query(&sql)
        .bind(value)
        .bind(now)
        .fetch_all(&mut *conn)
        .await?;
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        let summary = summary(row)?;
        let change = row
            .try_get::<Option<String>, _>("change")?
            .as_deref()
            .and_then(Change::parse);
        let own = match (&summary.entity, change) {
            (Some(_), Some(change)) => Some((
                row.try_get::<Option<i64>, _>("version")?
                    .map(Version::from_nanos),
                change,
            )),
            _ => None,
        };
        let last = match row.try_get::<Option<String>, _>("entity_change")? {
            Some(change) => Some(applied(
                row.try_get("entity_version")?,
                &change,
                row.try_get::<Option<bool>, _>("entity_backfilled")?
                    .unwrap_or(false),
            )?),
            None => None,
        };
        let handlers = runs_of(&mut *conn, summary.seq).await?;
        let effect = replay_effect(
            row.try_get("running")?,
            summary.status,
            own,
            summary.origin,
            last,
            &handlers,
        );
        items.push(ReplayItem {
            summary,
            effect,
            handlers,
        });
    }
    Ok(items)
}

/// Puts `seqs` back before the gate, inside the replay's transaction.
async fn send_back(
    conn: &mut PgConnection,
    seqs: &[i64],
    now: UnixMillis,
) -> Result<(), StoreError> {
    // A replayed lane head steps aside first, or its lane would wait behind it for ever.
    let heads: Vec<i64> = sqlx::query_scalar(
        "SELECT seq FROM queue WHERE seq = ANY($1) AND gated AND entity IS NOT NULL",
    )
    .bind(seqs)
    .fetch_all(&mut *conn)
    .await?;
    for seq in heads {
        step_aside(conn, seq, now).await?;
    }
    // Runs that succeeded stay done; the others start over with fresh attempts. Back to the
    // gate: the entity may have moved on meanwhile, and the ordering promise holds for replays
    // too. The verdict keeps the entity and version, for the console, until then.
    sqlx::query(
        "WITH runs AS (DELETE FROM handler_runs WHERE delivery_seq = ANY($1) AND state <> 'done'), \
              verdicts_undone AS (UPDATE verdicts SET fresh = NULL, lane_pos = NULL \
                                  WHERE seq = ANY($1)), \
              queued AS ( \
                  INSERT INTO queue (seq, received_at) \
                  SELECT seq, received_at FROM deliveries WHERE seq = ANY($1) \
                  ON CONFLICT (seq) DO UPDATE SET gated = false, entity = NULL, lane_pos = NULL, \
                      waiting = false, due_at = NULL, lease_owner = NULL, lease_until = NULL) \
         UPDATE delivery_status SET status = 'pending' \
         WHERE seq = ANY($1) AND status NOT IN ('pending', 'unrecognized')",
    )
    .bind(seqs)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// When `seq` heads its entity's lane: the next waiting delivery, if any, becomes the head and
/// is due now (under the entity's lock, as the gate and the outcomes move lanes).
async fn step_aside(conn: &mut PgConnection, seq: i64, now: UnixMillis) -> Result<(), StoreError> {
    let head: Option<String> = sqlx::query_scalar(
        "SELECT e.entity FROM queue q JOIN entities e ON e.entity = q.entity \
         WHERE q.seq = $1 AND e.active_pos = q.lane_pos FOR UPDATE OF e",
    )
    .bind(seq)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(entity) = head else {
        return Ok(());
    };
    sqlx::query(
        "WITH next AS (SELECT seq, lane_pos FROM queue WHERE entity = $1 AND waiting \
                       ORDER BY lane_pos LIMIT 1), \
              promoted AS (UPDATE queue q SET waiting = false, due_at = $2 FROM next \
                           WHERE q.seq = next.seq) \
         UPDATE entities SET active_pos = (SELECT lane_pos FROM next) WHERE entity = $1",
    )
    .bind(&entity)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// `handler_runs` columns: handler, state, attempts, next_at, last_error.
type RunRow = (String, String, i32, Option<i64>, Option<String>);
/// `attempts` columns: handler, attempt, started_at, finished_at, outcome, error.
type AttemptRow = (String, i32, i64, i64, String, Option<String>);

/// One delivery's handler runs, on the pool or inside a transaction.
async fn runs_of<'c, E>(executor: E, seq: i64) -> Result<Vec<HandlerRun>, StoreError>
where
    E: sqlx::PgExecutor<'c>,
{
    let rows: Vec<RunRow> = sqlx::query_as(
        "SELECT handler, state, attempts, next_at, last_error FROM handler_runs \
         WHERE delivery_seq = $1 ORDER BY handler",
    )
    .bind(seq)
    .fetch_all(executor)
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

/// An `entities` row as read for the console: version, change, updated_at, active_pos.
type EntityRow = (Option<i64>, Option<String>, i64, Option<i64>);

impl PgStore {
    async fn entity_state(&self, entity: &str) -> Result<Option<EntityState>, StoreError> {
        let row: Option<EntityRow> = sqlx::query_as(
            "SELECT version, change, updated_at, active_pos FROM entities WHERE entity = $1",
        )
        .bind(entity)
        .fetch_optional(&self.pool)
        .await?;
        Ok(
            row.map(|(version, change, updated_at, active_pos)| EntityState {
                entity: entity.to_owned(),
                version: version.map(|v| Version::from_nanos(v).to_string()),
                change: change.as_deref().and_then(Change::parse),
                updated_at,
                busy: active_pos.is_some(),
            }),
        )
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
