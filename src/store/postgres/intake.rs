//! Accepting deliveries into PostgreSQL, written once: concurrent accepts of one replica share
//! one multi-row statement ([`super::batch`]), committed on its own (one round trip), which
//! writes each delivery's row (what was received, never rewritten), its status and its place
//! in the queue; every caller is answered after that statement's synchronous commit, so a 2xx
//! still means on disk, and one commit carries as many deliveries as arrived while the one
//! before it was being written.
//!
//! Dedup is the unique key on (delivery id, body hash) with `ON CONFLICT DO NOTHING`: the same
//! delivery twice in one batch is written once (the second answered as a duplicate of the
//! first), and one inserted by another replica at the same moment makes this insert wait for
//! that commit and then find it. A batch inserts its rows sorted by that key, so two replicas
//! inserting overlapping batches wait for each other in one order instead of deadlocking.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use async_trait::async_trait;

use sqlx::PgPool;

use super::{PgStore, Wakeups};
use crate::delivery::{IncomingBody, NewDelivery, VerifiedDelivery};
use crate::store::{Accepted, BodyStore, Intake, StoreError};

/// One delivery handed to the accept batch, its headers already serialized.
pub(super) struct Incoming {
    delivery: NewDelivery,
    headers: String,
}

/// The batch's rows as the statement binds them: one array per column, in insert order.
#[derive(Default)]
struct Columns<'a> {
    delivery_id: Vec<&'a str>,
    body_sha256: Vec<&'a [u8]>,
    conflict_in_batch: Vec<bool>,
    endpoint: Vec<&'a str>,
    topic: Vec<Option<&'a str>>,
    client_ip: Vec<String>,
    headers: Vec<&'a str>,
    body: Vec<Option<&'a [u8]>>,
    blob_id: Vec<Option<i64>>,
    body_len: Vec<i64>,
    received_at: Vec<i64>,
    status: Vec<&'static str>,
    request_id: Vec<Option<&'a str>>,
    origin: Vec<&'static str>,
}

/// Where each job's answer comes from: a row this batch writes (by its index in the insert), or
/// an earlier job of the batch with the same key (a duplicate of it).
enum Slot {
    Row(usize),
    SameAs(usize),
}

impl<'a> Columns<'a> {
    fn push(&mut self, incoming: &'a Incoming, conflict_in_batch: bool) -> Result<(), StoreError> {
        let d = &incoming.delivery;
        let (body, blob_id) = match &d.body {
            IncomingBody::Inline(bytes) => (Some(bytes.as_ref()), None),
            IncomingBody::Staged(staged) => (None, Some(super::bodies::blob_id(staged.key())?)),
        };
        self.delivery_id.push(&d.delivery_id);
        self.body_sha256.push(&d.body_sha256[..]);
        self.conflict_in_batch.push(conflict_in_batch);
        self.endpoint.push(&d.endpoint);
        self.topic.push(d.topic.as_deref());
        self.client_ip.push(d.client_ip.to_string());
        self.headers.push(&incoming.headers);
        self.body.push(body);
        self.blob_id.push(blob_id);
        self.body_len.push(d.body.len() as i64);
        self.received_at.push(d.received_at);
        self.status.push(d.status.as_str());
        self.request_id.push(d.request_id.as_deref());
        self.origin.push(d.origin.as_str());
        Ok(())
    }
}

/// Writes a batch of deliveries in one transaction; one answer per job, in order. Staged
/// bodies of new deliveries are kept, those of duplicates dropped, once the commit is done.
pub(super) async fn accept_batch(
    pool: &PgPool,
    wakeups: &Wakeups,
    jobs: Vec<Incoming>,
) -> Vec<Result<Accepted, StoreError>> {
    let started = Instant::now();
    let written = match plan(&jobs) {
        Ok((columns, slots)) => write(pool, &columns)
            .await
            .map(|found| answers(&columns, &slots, &found))
            .map_err(StoreError::from),
        Err(e) => Err(e),
    };
    let answers = match written {
        Ok(answers) => answers,
        Err(e) => {
            if matches!(e, StoreError::Unavailable(_)) {
                crate::store::outage::count_refusals("postgres", jobs.len());
            }
            return jobs.iter().map(|_| Err(clone_error(&e))).collect();
        }
    };
    crate::telemetry::record_commit("postgres", started.elapsed(), jobs.len());
    if answers.iter().any(|a| matches!(a, Ok(a) if !a.duplicate)) {
        wakeups.work_arrived();
    }
    for (job, answer) in jobs.into_iter().zip(&answers) {
        if let IncomingBody::Staged(staged) = job.delivery.body {
            // A duplicate's body is dropped (and removed); a new one is now named by its row.
            if matches!(answer, Ok(a) if !a.duplicate) {
                staged.keep();
            }
        }
    }
    answers
}

/// The same error for every caller of a failed batch.
fn clone_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Busy => StoreError::Busy,
        StoreError::Unavailable(m) => StoreError::unavailable(m.clone()),
        StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
        other => StoreError::database(other.to_string()),
    }
}

/// The batch's rows in insert order, and where each job's answer comes from.
fn plan(jobs: &[Incoming]) -> Result<(Columns<'_>, Vec<Slot>), StoreError> {
    // Sorted by the unique key, so that replicas lock keys in one order; a key seen before in
    // the batch is a duplicate of that job, an id seen with another body an id conflict.
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&jobs[a].delivery, &jobs[b].delivery);
        (&a.delivery_id, &a.body_sha256).cmp(&(&b.delivery_id, &b.body_sha256))
    });
    let mut columns = Columns::default();
    let mut slots: Vec<Option<Slot>> = (0..jobs.len()).map(|_| None).collect();
    let mut first_of_key: HashMap<(&str, &[u8]), usize> = HashMap::new();
    let mut ids: HashSet<&str> = HashSet::new();
    for &i in &order {
        let d = &jobs[i].delivery;
        let key = (d.delivery_id.as_str(), &d.body_sha256[..]);
        if let Some(&first) = first_of_key.get(&key) {
            slots[i] = Some(Slot::SameAs(first));
            continue;
        }
        first_of_key.insert(key, i);
        let conflict_in_batch = !ids.insert(&d.delivery_id);
        columns.push(&jobs[i], conflict_in_batch)?;
        slots[i] = Some(Slot::Row(columns.delivery_id.len() - 1));
    }
    let slots = slots
        .into_iter()
        .map(|s| s.ok_or_else(|| StoreError::database("a delivery left out of its batch")))
        .collect::<Result<_, _>>()?;
    Ok((columns, slots))
}

/// What became of each key: its row's seq, whether it was there before, whether its id had
/// been seen with another body.
type Found = HashMap<(String, Vec<u8>), (i64, bool, bool)>;

/// The batch's write: one statement, committed on its own (synchronous commit), that inserts
/// every new delivery with its status and queue row and finds the keys stored before. Tried
/// again when PostgreSQL broke a deadlock by failing it (sorted keys make that rare, not
/// impossible).
async fn write(pool: &PgPool, columns: &Columns<'_>) -> Result<Found, sqlx::Error> {
    super::retrying(|| write_once(pool, columns)).await
}

async fn write_once(pool: &PgPool, columns: &Columns<'_>) -> Result<Found, sqlx::Error> {
    let rows: Vec<(i64, String, Vec<u8>, bool, bool)> = sqlx::query_as(INSERT_BATCH)
        .bind(&columns.delivery_id)
        .bind(&columns.body_sha256)
        .bind(&columns.conflict_in_batch)
        .bind(&columns.endpoint)
        .bind(&columns.topic)
        .bind(&columns.client_ip)
        .bind(&columns.headers)
        .bind(&columns.body)
        .bind(&columns.blob_id)
        .bind(&columns.body_len)
        .bind(&columns.received_at)
        .bind(&columns.status)
        .bind(&columns.request_id)
        .bind(&columns.origin)
        .fetch_all(pool)
        .await?;
    let mut found: Found = rows
        .into_iter()
        .map(|(seq, id, sha, conflict, duplicate)| ((id, sha), (seq, duplicate, conflict)))
        .collect();
    if found.len() < columns.delivery_id.len() {
        // Inserted by another replica while this statement ran: the insert waited for that
        // commit, but the statement's snapshot is older. A new statement sees it.
        let stored: Vec<(i64, String, Vec<u8>)> = sqlx::query_as(
            "SELECT d.seq, d.delivery_id, d.body_sha256 FROM deliveries d \
             JOIN UNNEST($1::text[], $2::bytea[]) AS k(delivery_id, body_sha256) \
               ON d.delivery_id = k.delivery_id AND d.body_sha256 = k.body_sha256 \
             WHERE d.delivery_id = ANY($1::text[])",
        )
        .bind(&columns.delivery_id)
        .bind(&columns.body_sha256)
        .fetch_all(pool)
        .await?;
        for (seq, id, sha) in stored {
            found.entry((id, sha)).or_insert((seq, true, false));
        }
    }
    Ok(found)
}

/// Every new delivery of a batch in one statement: its row, its status and its queue row; then
/// the keys stored before (read with the statement's snapshot, which does not see its own
/// inserts), answered as duplicates. The rows stored before under the batch's ids are read
/// once, through the unique key (`known`): a correlated look-up per row may be planned as a
/// scan of the whole table, which only grows. A key stored before returns nothing from the insert (`ON
/// CONFLICT DO NOTHING`). An id conflict is an id stored before with another body, or seen
/// earlier in the batch with another body.
const INSERT_BATCH: &str = "WITH input AS ( \
        SELECT * FROM UNNEST($1::text[], $2::bytea[], $3::bool[], $4::text[], $5::text[], \
            $6::text[], $7::text[], $8::bytea[], $9::int8[], $10::int8[], $11::int8[], \
            $12::text[], $13::text[], $14::text[]) WITH ORDINALITY \
        AS i(delivery_id, body_sha256, conflict_in_batch, endpoint, topic, client_ip, \
             headers, body, blob_id, body_len, received_at, status, request_id, origin, n)), \
    known AS MATERIALIZED ( \
        SELECT seq, delivery_id, body_sha256 FROM deliveries \
        WHERE delivery_id = ANY($1::text[])), \
    added AS ( \
        INSERT INTO deliveries (delivery_id, body_sha256, id_conflict, endpoint, topic, \
            client_ip, headers, body, blob_id, body_len, received_at, request_id, origin) \
        SELECT delivery_id, body_sha256, conflict_in_batch OR EXISTS ( \
                SELECT 1 FROM known k WHERE k.delivery_id = i.delivery_id \
                AND k.body_sha256 <> i.body_sha256), \
            endpoint, topic, client_ip, headers, body, blob_id, body_len, received_at, \
            request_id, origin \
        FROM input i ORDER BY n \
        ON CONFLICT (delivery_id, body_sha256) DO NOTHING \
        RETURNING seq, delivery_id, body_sha256, id_conflict, received_at), \
    statuses AS ( \
        INSERT INTO delivery_status (seq, status) \
        SELECT added.seq, i.status FROM added JOIN input i USING (delivery_id, body_sha256)), \
    queued AS (INSERT INTO queue (seq, received_at) SELECT seq, received_at FROM added) \
    SELECT seq, delivery_id, body_sha256, id_conflict, false FROM added \
    UNION ALL \
    SELECT k.seq, k.delivery_id, k.body_sha256, false, true \
    FROM known k JOIN input i \
      ON k.delivery_id = i.delivery_id AND k.body_sha256 = i.body_sha256";

/// Each job's answer, from what the transaction found.
fn answers(
    columns: &Columns<'_>,
    slots: &[Slot],
    found: &Found,
) -> Vec<Result<Accepted, StoreError>> {
    let row_answer = |row: usize| {
        let key = (
            columns.delivery_id[row].to_owned(),
            columns.body_sha256[row].to_vec(),
        );
        found
            .get(&key)
            .map(|&(seq, duplicate, id_conflict)| Accepted {
                seq,
                duplicate,
                id_conflict,
            })
            .ok_or_else(|| StoreError::database("an accepted delivery was not found"))
    };
    slots
        .iter()
        .map(|slot| match slot {
            Slot::Row(row) => row_answer(*row),
            Slot::SameAs(first) => match &slots[*first] {
                Slot::Row(row) => row_answer(*row).map(|a| Accepted {
                    seq: a.seq,
                    duplicate: true,
                    id_conflict: false,
                }),
                Slot::SameAs(_) => Err(StoreError::database("a batch lost its first copy")),
            },
        })
        .collect()
}

#[async_trait]
impl Intake for PgStore {
    async fn accept(&self, delivery: VerifiedDelivery) -> Result<Accepted, StoreError> {
        self.ready().await?;
        let delivery = delivery.into_parts();
        let headers = serde_json::to_string(&delivery.headers)
            .map_err(|e| StoreError::Corrupt(format!("headers: {e}")))?;
        self.accepts().submit(Incoming { delivery, headers }).await
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
            return Err(StoreError::unavailable(
                "the PostgreSQL server is read-only (a standby, or default_transaction_read_only \
                 is on); deliveries cannot be stored",
            ));
        }
        Ok(())
    }
}
