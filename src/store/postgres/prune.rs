//! Retention for the PostgreSQL store: batched deletes, each batch a short transaction that
//! locks only the rows it removes (`FOR UPDATE SKIP LOCKED`, so replicas pruning at once take
//! different rows and never wait on each other or on dispatch). Freed space is left to
//! autovacuum, which follows batched deletes without long locks.
//!
//! A delivery is finished when it has no queue row (nothing left to do) and its status is not
//! `pending`; its row, status, verdict, runs and attempts go together, oldest first.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use super::PgStore;
use crate::delivery::Status;
use crate::store::{Cutoffs, Maintenance, PruneReport, StoreError, StoreStats};

/// Finished: nothing left to do for it.
const FINISHED: &str =
    "s.status <> 'pending' AND NOT EXISTS (SELECT 1 FROM queue q WHERE q.seq = d.seq)";
/// A delivery with its status, as [`doomed`] reads it.
const DOOMED: &str = "SELECT d.seq, s.status, d.blob_id, d.body_len, d.body_pruned \
    FROM deliveries d JOIN delivery_status s ON s.seq = d.seq";

/// One prunable row: what it is and what it holds.
struct Doomed {
    seq: i64,
    status: Status,
    blob_id: Option<i64>,
    /// Bytes of body still kept (0 when it was dropped already).
    body_bytes: u64,
}

fn doomed(row: &PgRow) -> Result<Doomed, StoreError> {
    let status: String = row.try_get("status")?;
    let pruned: bool = row.try_get("body_pruned")?;
    Ok(Doomed {
        seq: row.try_get("seq")?,
        status: status.parse().map_err(StoreError::Corrupt)?,
        blob_id: row.try_get("blob_id")?,
        body_bytes: if pruned {
            0
        } else {
            row.try_get::<i64, _>("body_len")?.max(0) as u64
        },
    })
}

/// Rows past their retention and bodies past theirs (or over the budget), oldest first; with
/// `lock`, locked for this transaction (others prune other rows meanwhile).
async fn plan(
    conn: &mut PgConnection,
    c: &Cutoffs,
    limit: i64,
    lock: bool,
) -> Result<(Vec<Doomed>, Vec<Doomed>), StoreError> {
    let lock = if lock {
        "FOR UPDATE OF d SKIP LOCKED"
    } else {
        ""
    };
    let rows: Vec<Doomed> = sqlx::query(&format!(
        "{DOOMED} WHERE {FINISHED} AND ((s.status = 'delivered' AND d.received_at < $1) \
            OR (s.status IN ('stale', 'unrecognized', 'dead') AND d.received_at < $2)) \
         ORDER BY d.seq LIMIT $3 {lock}"
    ))
    .bind(c.delivered_before)
    .bind(c.investigated_before)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(doomed)
    .collect::<Result<_, _>>()?;
    let deleted: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    let mut bodies: Vec<Doomed> = sqlx::query(&format!(
        "{DOOMED} WHERE {FINISHED} AND s.status = 'delivered' AND NOT d.body_pruned \
           AND d.received_at < $1 AND NOT (d.seq = ANY($2)) \
         ORDER BY d.seq LIMIT $3 {lock}"
    ))
    .bind(c.bodies_before)
    .bind(&deleted)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(doomed)
    .collect::<Result<_, _>>()?;
    if let Some(budget) = c.max_body_bytes {
        let kept: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(body_len), 0)::BIGINT FROM deliveries WHERE NOT body_pruned",
        )
        .fetch_one(&mut *conn)
        .await?;
        let freed: u64 = rows.iter().chain(&bodies).map(|d| d.body_bytes).sum();
        let mut excess = (kept.max(0) as u64)
            .saturating_sub(freed)
            .saturating_sub(budget);
        if excess > 0 {
            let mut skip = deleted;
            skip.extend(bodies.iter().map(|b| b.seq));
            let oldest: Vec<Doomed> = sqlx::query(&format!(
                "{DOOMED} WHERE {FINISHED} AND NOT d.body_pruned AND d.body_len > 0 \
                   AND NOT (d.seq = ANY($1)) \
                 ORDER BY d.seq LIMIT $2 {lock}"
            ))
            .bind(&skip)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(doomed)
            .collect::<Result<_, _>>()?;
            for body in oldest {
                if excess == 0 {
                    break;
                }
                excess = excess.saturating_sub(body.body_bytes);
                bodies.push(body);
            }
        }
    }
    Ok((rows, bodies))
}

fn report(rows: &[Doomed], bodies: &[Doomed]) -> PruneReport {
    PruneReport::of(
        rows.iter().map(|r| (r.status, r.body_bytes)),
        bodies.iter().map(|b| b.body_bytes),
    )
}

#[async_trait]
impl Maintenance for PgStore {
    async fn prune_batch(
        &self,
        cutoffs: &Cutoffs,
        limit: u32,
        dry_run: bool,
    ) -> Result<PruneReport, StoreError> {
        self.ready().await?;
        let mut tx = self.pool.begin().await?;
        if dry_run {
            let (rows, bodies) = plan(&mut tx, cutoffs, i64::MAX, false).await?;
            return Ok(report(&rows, &bodies));
        }
        let (rows, bodies) = plan(&mut tx, cutoffs, i64::from(limit), true).await?;
        let deleted: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        // One statement for everything kept of them.
        sqlx::query(
            "WITH a AS (DELETE FROM attempts WHERE delivery_seq = ANY($1)), \
                  r AS (DELETE FROM handler_runs WHERE delivery_seq = ANY($1)), \
                  v AS (DELETE FROM verdicts WHERE seq = ANY($1)), \
                  s AS (DELETE FROM delivery_status WHERE seq = ANY($1)) \
             DELETE FROM deliveries WHERE seq = ANY($1)",
        )
        .bind(&deleted)
        .execute(&mut *tx)
        .await?;
        let dropped: Vec<i64> = bodies.iter().map(|b| b.seq).collect();
        sqlx::query(
            "UPDATE deliveries SET body = NULL, blob_id = NULL, body_pruned = true \
             WHERE seq = ANY($1)",
        )
        .bind(&dropped)
        .execute(&mut *tx)
        .await?;
        let blobs: Vec<i64> = rows
            .iter()
            .chain(&bodies)
            .filter_map(|d| d.blob_id)
            .collect();
        // Their chunks go with them (ON DELETE CASCADE).
        sqlx::query("DELETE FROM blobs WHERE id = ANY($1)")
            .bind(&blobs)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(report(&rows, &bodies))
    }

    async fn reclaim_space(&self) -> Result<(), StoreError> {
        // Autovacuum follows the deletes; nothing to do by hand.
        Ok(())
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.ready().await?;
        let database_bytes: i64 = sqlx::query_scalar(
            "SELECT (pg_total_relation_size('deliveries') + pg_total_relation_size('blobs') \
                  + pg_total_relation_size('blob_chunks') + pg_total_relation_size('handler_runs') \
                  + pg_total_relation_size('attempts') + pg_total_relation_size('entities') \
                  + pg_total_relation_size('delivery_status') + pg_total_relation_size('verdicts') \
                  + pg_total_relation_size('queue'))::BIGINT",
        )
        .fetch_one(&self.pool)
        .await?;
        let body_bytes: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(body_len), 0)::BIGINT FROM deliveries WHERE NOT body_pruned",
        )
        .fetch_one(&self.pool)
        .await?;
        let deliveries = sqlx::query_as::<_, (String, i64)>(
            "SELECT status, COUNT(*) FROM delivery_status GROUP BY status",
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|(status, n)| {
            Ok((
                status.parse().map_err(StoreError::Corrupt)?,
                n.max(0) as u64,
            ))
        })
        .collect::<Result<Vec<(Status, u64)>, StoreError>>()?;
        let oldest: Option<i64> = sqlx::query_scalar("SELECT MIN(received_at) FROM deliveries")
            .fetch_one(&self.pool)
            .await?;
        Ok(StoreStats {
            database_bytes: database_bytes.max(0) as u64,
            body_bytes: body_bytes.max(0) as u64,
            deliveries,
            oldest_received_at: oldest,
        })
    }
}
