//! What `labelhook labelbox backfill` asks of the SQLite store ([`Backfill`]), through the CLI's
//! [`SqliteInspector`]: its writes are short transactions of their own beside a running
//! server's writer (as `events replay` is), and the server's dispatcher finds the new rows at
//! next catch-up (within a second, or at once when it looks for work and has none).

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::SqliteInspector;
use crate::delivery::{IncomingBody, NewDelivery, UnixMillis, VerifiedDelivery};
use crate::store::model::known_labels_of;
use crate::store::{Backfill, KnownLabel, StoreError};

#[async_trait]
impl Backfill for SqliteInspector {
    async fn accept_fetched(
        &self,
        deliveries: Vec<VerifiedDelivery>,
    ) -> Result<Vec<Option<i64>>, StoreError> {
        let deliveries: Vec<NewDelivery> = deliveries
            .into_iter()
            .map(VerifiedDelivery::into_parts)
            .collect();
        self.write(move |conn| deliveries.iter().map(|d| insert_fetched(conn, d)).collect())
            .await
    }

    async fn newest_received(&self, project_id: &str) -> Result<Option<UnixMillis>, StoreError> {
        let project_id = project_id.to_owned();
        self.readers
            .run(move |conn| {
                Ok(conn
                    .prepare_cached(
                        "SELECT MAX(d.received_at) FROM verdicts v \
                         JOIN deliveries d ON d.seq = v.seq \
                         WHERE v.project_id = ?1 AND d.origin = 'webhook'",
                    )?
                    .query_row([project_id], |row| row.get(0))?)
            })
            .await
    }

    async fn known_labels(
        &self,
        project_id: &str,
        data_row_ids: &[String],
    ) -> Result<Vec<KnownLabel>, StoreError> {
        let project_id = project_id.to_owned();
        let rows = serde_json::to_string(data_row_ids)
            .map_err(|e| StoreError::Corrupt(format!("data row ids: {e}")))?;
        self.readers
            .run(move |conn| known_labels(conn, &project_id, &rows))
            .await
    }
}

/// Inserts one fetched delivery unless its id is stored already; its body goes in the row's
/// `bodies` entry whatever its size (it was in memory anyway).
fn insert_fetched(conn: &Connection, d: &NewDelivery) -> Result<Option<i64>, StoreError> {
    let IncomingBody::Inline(body) = &d.body else {
        return Err(StoreError::Corrupt(
            "a fetched delivery's body is kept in memory".into(),
        ));
    };
    let headers = serde_json::to_string(&d.headers)
        .map_err(|e| StoreError::Corrupt(format!("headers: {e}")))?;
    let seq: Option<i64> = conn
        .prepare_cached(
            "INSERT INTO deliveries (delivery_id, body_sha256, id_conflict, endpoint, topic, \
                 client_ip, headers, body_len, received_at, accepted_as, request_id, origin) \
             SELECT ?1, ?2, 0, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11 \
             WHERE NOT EXISTS (SELECT 1 FROM deliveries WHERE delivery_id = ?1) \
             RETURNING seq",
        )?
        .query_row(
            params![
                d.delivery_id,
                &d.body_sha256[..],
                d.endpoint,
                d.topic,
                d.client_ip.to_string(),
                headers,
                body.len() as i64,
                d.received_at,
                d.status.as_str(),
                d.request_id,
                d.origin.as_str(),
            ],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(seq) = seq {
        conn.prepare_cached("INSERT INTO bodies (seq, body) VALUES (?1, ?2)")?
            .execute(params![seq, &body[..]])?;
    }
    Ok(seq)
}

/// The labels the gate's fresh verdicts on these data rows (a JSON array of ids) named, newest
/// first per entity, read through the `verdicts_data_rows` index.
fn known_labels(
    conn: &Connection,
    project_id: &str,
    data_row_ids: &str,
) -> Result<Vec<KnownLabel>, StoreError> {
    let rows = conn
        .prepare_cached(
            "SELECT v.data_row_id, v.entity, v.version, v.labels, \
                 COALESCE(e.change = 'deleted', 0) \
             FROM verdicts v LEFT JOIN entities e ON e.entity = v.entity \
             WHERE v.project_id = ?1 AND v.labels IS NOT NULL \
               AND v.data_row_id IN (SELECT value FROM json_each(?2)) AND v.fresh = 1 \
             ORDER BY v.entity, v.version DESC, v.id DESC",
        )?
        .query_map(params![project_id, data_row_ids], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, Option<i64>>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, bool>(4)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(row, entity, version, labels, deleted)| {
            let labels: Vec<String> = serde_json::from_str(&labels)
                .map_err(|e| StoreError::Corrupt(format!("labels: {e}")))?;
            Ok((row, entity, version, labels, deleted))
        })
        .collect::<Result<Vec<_>, StoreError>>()
        .map(known_labels_of)
}
