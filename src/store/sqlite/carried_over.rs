//! A store made by the version before the append-only schema, with a delivery in every state it
//! could be in, opened by this one: each delivery keeps where it stood (status, handler runs,
//! its place in its lane, a retry's time), and the work it had left is taken up again.

use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

use super::writer::MIGRATIONS;
use super::SqliteStore;
use crate::delivery::{Clock, ManualClock, Status};
use crate::store::StoreSettings;
use crate::store::{
    AttemptOutcome, AttemptResult, Inspect, LeaseOwner, ListQuery, Queue, RunState,
};

/// The deliveries of the old store, one per state, at time `T`: label B's lane has a delivery
/// waiting for its retry and one waiting behind it; label D's head was leased by a process that
/// died.
const OLD_ROWS: &str = "
INSERT INTO deliveries (seq, delivery_id, body_sha256, endpoint, topic, client_ip, headers,
    body_len, received_at, status, gated, entity, version, change, project_id, fresh, lane_pos,
    waiting, due_at, lease_owner, lease_until, request_id) VALUES
 (1, 'done',     x'01', 'labelbox', 'LABEL_UPDATED', '127.0.0.1', '[]', 2, {T}, 'delivered', 1, 'label:A', 1, 'updated', 'p', 1, 0, 0, NULL, NULL, NULL, 'r1'),
 (2, 'retrying', x'02', 'labelbox', 'LABEL_UPDATED', '127.0.0.1', '[]', 2, {T}, 'pending',   1, 'label:B', 1, 'updated', 'p', 1, 0, 0, {R}, NULL, NULL, 'r2'),
 (3, 'behind',   x'03', 'labelbox', 'LABEL_UPDATED', '127.0.0.1', '[]', 2, {T}, 'pending',   1, 'label:B', 2, 'updated', 'p', 1, 1, 1, NULL, NULL, NULL, 'r3'),
 (4, 'dead',     x'04', 'labelbox', 'LABEL_UPDATED', '127.0.0.1', '[]', 2, {T}, 'dead',      1, 'label:C', 1, 'updated', 'p', 1, 0, 0, NULL, NULL, NULL, 'r4'),
 (5, 'stale',    x'05', 'labelbox', 'LABEL_UPDATED', '127.0.0.1', '[]', 2, {T}, 'stale',     1, 'label:A', 0, 'updated', 'p', 0, 1, 0, NULL, NULL, NULL, 'r5'),
 (6, 'new',      x'06', 'labelbox', 'LABEL_UPDATED', '127.0.0.1', '[]', 2, {T}, 'pending',   0, NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL, NULL, NULL, 'r6'),
 (7, 'replayed', x'07', 'labelbox', 'LABEL_UPDATED', '127.0.0.1', '[]', 2, {T}, 'pending',   0, 'label:E', 1, 'updated', 'p', NULL, NULL, 0, NULL, NULL, NULL, 'r7'),
 (8, 'leased',   x'08', 'labelbox', 'LABEL_UPDATED', '127.0.0.1', '[]', 2, {T}, 'pending',   1, 'label:D', 1, 'updated', 'p', 1, 0, 0, {T}, 'gone', {L}, 'r8'),
 (9, 'weird',    x'09', 'labelbox', 'NOPE',          '127.0.0.1', '[]', 2, {T}, 'unrecognized', 0, NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL, NULL, NULL, 'r9');
INSERT INTO bodies (seq, body) SELECT seq, CAST('{}' AS BLOB) FROM deliveries;
INSERT INTO handler_runs (delivery_seq, handler, state, attempts, next_at, last_error) VALUES
 (1, 'archive', 'done', 1, NULL, NULL),
 (2, 'archive', 'pending', 1, {R}, '503 from downstream'),
 (3, 'archive', 'pending', 0, {T}, NULL),
 (4, 'archive', 'dead', 3, NULL, '404'),
 (7, 'archive', 'done', 1, NULL, NULL),
 (8, 'archive', 'pending', 0, {T}, NULL);
INSERT INTO attempts (delivery_seq, handler, attempt, started_at, finished_at, outcome, error) VALUES
 (1, 'archive', 1, {T}, {T}, 'ok', NULL),
 (2, 'archive', 1, {T}, {T}, 'retry', '503 from downstream'),
 (4, 'archive', 3, {T}, {T}, 'dead', '404'),
 (7, 'archive', 1, {T}, {T}, 'ok', NULL);
INSERT INTO entities (entity, version, change, lane_next, active_pos, updated_at) VALUES
 ('label:A', 1, 'updated', 2, NULL, {T}),
 ('label:B', 2, 'updated', 2, 0, {T}),
 ('label:C', 1, 'updated', 1, NULL, {T}),
 ('label:D', 1, 'updated', 1, 0, {T}),
 ('label:E', 1, 'updated', 1, NULL, {T});
";

/// Makes the old store: its five migrations, then [`OLD_ROWS`] at time `t` (retries due 10 s
/// later, the dead process's lease running out 30 s later).
fn old_store(path: &std::path::Path, t: i64) {
    let conn = Connection::open(path).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    for sql in &MIGRATIONS[..5] {
        conn.execute_batch(sql).expect("old migration");
    }
    conn.pragma_update(None, "user_version", 5)
        .expect("version");
    let rows = OLD_ROWS
        .replace("{T}", &t.to_string())
        .replace("{R}", &(t + 10_000).to_string())
        .replace("{L}", &(t + 30_000).to_string());
    conn.execute_batch(&rows).expect("old rows");
}

fn ok(attempt: u32, now: i64) -> AttemptResult {
    AttemptResult {
        handler: "archive".into(),
        attempt,
        started_at: now,
        finished_at: now,
        outcome: AttemptOutcome::Ok,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_the_previous_schema_is_carried_over_in_place() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("labelhook.db");
    let clock = Arc::new(ManualClock::new());
    let t = clock.now();
    old_store(&path, t);
    let settings = StoreSettings {
        url: format!("sqlite://{}", path.display()),
        ..StoreSettings::default()
    };
    let store = SqliteStore::open_for_serving(path, &settings, 64, clock.clone())
        .await
        .expect("open");
    every_delivery_keeps_its_status(&store).await;
    handler_runs_keep_their_attempts(&store).await;
    work_left_is_taken_up(&store, &clock).await;

    // A new delivery gets a sequence number after the old ones.
    let seq = crate::store::Intake::accept(&store, new_delivery())
        .await
        .expect("accept")
        .seq;
    assert_eq!(seq, 10);
    crate::store::Store::close(&store).await;
}

async fn every_delivery_keeps_its_status(store: &SqliteStore) {
    let query = ListQuery {
        limit: 100,
        ..ListQuery::default()
    };
    let mut statuses: Vec<(String, Status)> = store
        .list(&query)
        .await
        .expect("list")
        .into_iter()
        .map(|d| (d.delivery_id, d.status))
        .collect();
    statuses.sort_by(|a, b| a.0.cmp(&b.0));
    let expected = [
        ("behind", Status::Pending),
        ("dead", Status::Dead),
        ("done", Status::Delivered),
        ("leased", Status::Pending),
        ("new", Status::Pending),
        ("replayed", Status::Pending),
        ("retrying", Status::Pending),
        ("stale", Status::Stale),
        ("weird", Status::Unrecognized),
    ];
    let expected: Vec<(String, Status)> = expected
        .iter()
        .map(|(id, s)| ((*id).to_owned(), *s))
        .collect();
    assert_eq!(statuses, expected);
}

async fn handler_runs_keep_their_attempts(store: &SqliteStore) {
    let retrying = &store.show("retrying").await.expect("show")[0];
    let run = &retrying.handlers[0];
    assert_eq!((run.state, run.attempts), (RunState::Pending, 1));
    assert_eq!(run.last_error.as_deref(), Some("503 from downstream"));
    assert!(run.next_attempt_at.is_some(), "the retry keeps its time");
    let replayed = &store.show("replayed").await.expect("show")[0];
    assert_eq!(
        replayed.handlers[0].state,
        RunState::Done,
        "done stays done"
    );
}

async fn work_left_is_taken_up(store: &SqliteStore, clock: &ManualClock) {
    // What had work left is taken up: the new, the replayed and the unrecognized wait for the
    // gate; of the lanes, only the dead process's head is due now.
    let owner = LeaseOwner::named("w");
    let lease = Duration::from_secs(30);
    let ungated: Vec<i64> = store
        .take_ungated(&owner, lease, 10)
        .await
        .expect("take")
        .iter()
        .map(|u| u.seq)
        .collect();
    assert_eq!(ungated, [6, 7, 9]);
    assert_eq!(store.queue_depth().await.expect("depth"), 6);
    let due: Vec<i64> = store
        .claim(&owner, lease, 10, 0)
        .await
        .expect("claim")
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(due, [8], "a lease of the previous run holds nothing");

    // The retry comes due at its time, and the delivery behind it only after it.
    clock.advance(Duration::from_secs(10));
    let retried = store.claim(&owner, lease, 10, 0).await.expect("claim");
    assert_eq!(retried.iter().map(|c| c.seq).collect::<Vec<_>>(), [2]);
    assert_eq!(retried[0].runs[0].attempts, 1, "the earlier attempt counts");
    store
        .record_attempts(2, &owner, &[ok(2, clock.now())])
        .await
        .expect("record");
    let next = store.claim(&owner, lease, 10, 0).await.expect("claim");
    assert_eq!(next.iter().map(|c| c.seq).collect::<Vec<_>>(), [3]);
}

/// A delivery verified as the ingress would verify it.
fn new_delivery() -> crate::delivery::VerifiedDelivery {
    use crate::delivery::signature::sign;
    use crate::delivery::{
        Algorithm, BodyVerifier, ClaimedSignature, DeliveryId, Envelope, IncomingBody,
    };
    use secrecy::SecretString;
    let body = b"{\"n\":1}";
    let header = sign(b"s", body, Algorithm::Sha256);
    let claimed = ClaimedSignature::pick(Some(header.as_bytes()), None, true).expect("claimed");
    let mut verifier = BodyVerifier::new(Algorithm::Sha256, &[SecretString::from("s".to_owned())]);
    verifier.update(body);
    let proof = verifier.verify(&claimed).expect("verified");
    let envelope = Envelope {
        delivery_id: DeliveryId::Given("after".into()),
        endpoint: "labelbox".into(),
        topic: Some("LABEL_UPDATED".into()),
        client_ip: [127, 0, 0, 1].into(),
        headers: Vec::new(),
        received_at: 0,
        request_id: None,
    };
    crate::delivery::VerifiedDelivery::new(
        proof,
        envelope,
        IncomingBody::Inline(bytes::Bytes::from_static(body)),
    )
}
