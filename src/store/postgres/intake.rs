//! Accepting deliveries into PostgreSQL: one transaction per delivery, committed with
//! synchronous commit before the caller answers 2xx. Dedup is the unique key on (delivery id,
//! body hash): a second replica inserting the same delivery at the same moment waits for the
//! first one's commit and then finds it.

use async_trait::async_trait;

use super::PgStore;
use crate::delivery::{IncomingBody, VerifiedDelivery};
use crate::store::{Accepted, BodyStore, Intake, StoreError};

#[async_trait]
impl Intake for PgStore {
    async fn accept(&self, delivery: VerifiedDelivery) -> Result<Accepted, StoreError> {
        self.ready().await?;
        let d = delivery.into_parts();
        let headers = serde_json::to_string(&d.headers)
            .map_err(|e| StoreError::Corrupt(format!("headers: {e}")))?;
        let (inline, blob_id): (Option<&[u8]>, Option<i64>) = match &d.body {
            IncomingBody::Inline(bytes) => (Some(bytes), None),
            IncomingBody::Staged(staged) => (None, Some(super::bodies::blob_id(staged.key())?)),
        };
        // From asking the pool for a connection to the commit: what the delivery waits for.
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        let inserted: Option<(i64, bool)> = sqlx::query_as(
            "INSERT INTO deliveries (delivery_id, body_sha256, id_conflict, endpoint, topic, \
                 client_ip, headers, body, blob_id, body_len, received_at, status, request_id, \
                 origin) \
             SELECT $1, $2, EXISTS (SELECT 1 FROM deliveries \
                                    WHERE delivery_id = $1 AND body_sha256 <> $2), \
                 $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13 \
             ON CONFLICT (delivery_id, body_sha256) DO NOTHING \
             RETURNING seq, id_conflict",
        )
        .bind(&d.delivery_id)
        .bind(&d.body_sha256[..])
        .bind(&d.endpoint)
        .bind(&d.topic)
        .bind(d.client_ip.to_string())
        .bind(&headers)
        .bind(inline)
        .bind(blob_id)
        .bind(d.body.len() as i64)
        .bind(d.received_at)
        .bind(d.status.as_str())
        .bind(&d.request_id)
        .bind(d.origin.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let accepted = match inserted {
            Some((seq, id_conflict)) => Accepted {
                seq,
                duplicate: false,
                id_conflict,
            },
            None => {
                let seq: i64 = sqlx::query_scalar(
                    "SELECT seq FROM deliveries WHERE delivery_id = $1 AND body_sha256 = $2",
                )
                .bind(&d.delivery_id)
                .bind(&d.body_sha256[..])
                .fetch_one(&mut *tx)
                .await?;
                Accepted {
                    seq,
                    duplicate: true,
                    id_conflict: false,
                }
            }
        };
        tx.commit().await?;
        crate::telemetry::record_commit("postgres", started.elapsed(), 1);
        if !accepted.duplicate {
            self.work_arrived();
        }
        if let IncomingBody::Staged(staged) = d.body {
            // A duplicate's body is dropped (and removed); a new one is now named by its row.
            if !accepted.duplicate {
                staged.keep();
            }
        }
        Ok(accepted)
    }

    fn bodies(&self) -> &dyn BodyStore {
        &self.bodies
    }

    /// Ready when the database answers and would take a write, found without writing: a
    /// readiness probe every few seconds from each replica must not add to the WAL. A server in
    /// recovery (a standby after a failover mix-up) or set read-only refuses every delivery.
    async fn check_ready(&self) -> Result<(), StoreError> {
        self.ready().await?;
        let (standby, read_only): (bool, String) =
            sqlx::query_as("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')")
                .fetch_one(&self.pool)
                .await?;
        if standby || read_only == "on" {
            return Err(StoreError::Unavailable(
                "the PostgreSQL server is read-only (a standby, or default_transaction_read_only \
                 is on); deliveries cannot be stored"
                    .into(),
            ));
        }
        Ok(())
    }
}
