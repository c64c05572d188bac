//! What `labelhook labelbox backfill` asks of the shared store ([`Backfill`]): its deliveries
//! are written in one transaction per batch, which also wakes every serving replica (NOTIFY at
//! commit), as a replay does.

use async_trait::async_trait;
use sqlx::Row;

use super::PgStore;
use crate::delivery::{IncomingBody, UnixMillis, VerifiedDelivery};
use crate::store::model::{known_labels_of, labels_named_in};
use crate::store::{Backfill, KnownLabel, StoreError};

/// Serializes backfills' batches against each other (any number of processes): a delivery id
/// found absent is then still absent when it is inserted. Webhook accepts are not held up.
const BACKFILL_LOCK: i64 = 0x6c61_6265_6c68_6f6f;

/// The data row a verdict's typed event names, as the `verdicts_data_rows` index has it (an
/// event holding an escaped NUL, which PostgreSQL cannot turn into text, names none).
const DATA_ROW: &str =
    "(CASE WHEN strpos(v.event, '\\u0000') = 0 THEN v.event::json ->> 'data_row_id' END)";

#[async_trait]
impl Backfill for PgStore {
    async fn accept_fetched(
        &self,
        deliveries: Vec<VerifiedDelivery>,
    ) -> Result<Vec<Option<i64>>, StoreError> {
        self.ready().await?;
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(BACKFILL_LOCK)
            .execute(&mut *tx)
            .await?;
        let mut stored = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let d = delivery.into_parts();
            let IncomingBody::Inline(body) = &d.body else {
                return Err(StoreError::Corrupt(
                    "a fetched delivery's body is kept in memory".into(),
                ));
            };
            let headers = serde_json::to_string(&d.headers)
                .map_err(|e| StoreError::Corrupt(format!("headers: {e}")))?;
            // Written as an accept writes it: the delivery once, its status, its queue row.
            let seq: Option<i64> = sqlx::query_scalar(
                "WITH added AS ( \
                     INSERT INTO deliveries (delivery_id, body_sha256, endpoint, topic, \
                         client_ip, headers, body, body_len, received_at, request_id, origin) \
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $11, $12 \
                     WHERE NOT EXISTS (SELECT 1 FROM deliveries WHERE delivery_id = $1) \
                     RETURNING seq, received_at), \
                 status AS (INSERT INTO delivery_status (seq, status) \
                     SELECT seq, $10 FROM added), \
                 queued AS (INSERT INTO queue (seq, received_at) \
                     SELECT seq, received_at FROM added) \
                 SELECT seq FROM added",
            )
            .bind(&d.delivery_id)
            .bind(&d.body_sha256[..])
            .bind(&d.endpoint)
            .bind(&d.topic)
            .bind(d.client_ip.to_string())
            .bind(&headers)
            .bind(&body[..])
            .bind(body.len() as i64)
            .bind(d.received_at)
            .bind(d.status.as_str())
            .bind(&d.request_id)
            .bind(d.origin.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            stored.push(seq);
        }
        if stored.iter().any(Option::is_some) {
            Self::announce_work(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(stored)
    }

    async fn newest_received(&self, project_id: &str) -> Result<Option<UnixMillis>, StoreError> {
        self.ready().await?;
        Ok(sqlx::query_scalar(
            "SELECT MAX(d.received_at) FROM verdicts v JOIN deliveries d ON d.seq = v.seq \
             WHERE v.project_id = $1 AND d.origin = 'webhook'",
        )
        .bind(project_id)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn known_labels(
        &self,
        project_id: &str,
        data_row_ids: &[String],
    ) -> Result<Vec<KnownLabel>, StoreError> {
        self.ready().await?;
        let rows = sqlx::query(&format!(
            "SELECT {DATA_ROW} AS data_row_id, v.entity, v.version, v.event, \
                 COALESCE(e.change = 'deleted', false) AS deleted \
             FROM verdicts v LEFT JOIN entities e ON e.entity = v.entity \
             WHERE v.project_id = $1 AND v.event IS NOT NULL AND {DATA_ROW} = ANY($2) \
               AND v.fresh AND (v.entity LIKE 'label:%' OR v.entity LIKE 'labels:%') \
             ORDER BY v.entity, v.version DESC NULLS LAST, v.seq DESC"
        ))
        .bind(project_id)
        .bind(data_row_ids)
        .fetch_all(&self.pool)
        .await?;
        let rows = rows
            .iter()
            .map(|row| {
                let event: String = row.try_get("event")?;
                Ok((
                    row.try_get("data_row_id")?,
                    row.try_get("entity")?,
                    row.try_get("version")?,
                    labels_named_in(&event),
                    row.try_get("deleted")?,
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(known_labels_of(rows))
    }
}
