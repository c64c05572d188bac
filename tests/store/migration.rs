//! A PostgreSQL store written by an older labelhook (every delivery's dispatch state in its own
//! row) is migrated in place when a newer one opens it: statuses are kept, pending work stays
//! pending and in its lane's order, and what was done stays done.

use std::time::Duration;

use labelhook::test_support::delivery::{Clock, ManualClock, Status};
use labelhook::test_support::store::{self, LeaseOwner, ListQuery, ReplayTarget, RunState};
use sqlx::{Connection, Executor, PgConnection};

use crate::harness::{body, LEASE};
use crate::test_db::TestDb;

/// The schema's versions before deliveries were written once.
const OLD_MIGRATIONS: &[&str] = &[
    "0001_init.sql",
    "0002_event.sql",
    "0003_uncompressed_bodies.sql",
    "0004_body_pruned.sql",
    "0005_request_id.sql",
    "0006_unpruned_bodies.sql",
];

/// Migrates `url` to the old schema, as the older labelhook left it.
async fn old_schema(url: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/src/store/postgres/migrations");
    for name in OLD_MIGRATIONS {
        std::fs::copy(format!("{source}/{name}"), dir.path().join(name)).expect("copy migration");
    }
    let migrator = sqlx::migrate::Migrator::new(dir.path())
        .await
        .expect("old migrations");
    let mut conn = PgConnection::connect(url).await.expect("connect");
    migrator.run(&mut conn).await.expect("old schema");
    conn.close().await.expect("close");
}

/// Old rows at `now`: label:M with m1 heading its lane (due) and m2 waiting behind it, n1
/// delivered (one attempt), u1 not gated yet, p1 dead for `archive`.
async fn old_rows(url: &str, now: i64) {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let rows = [
        // (seq, id, status, gated, entity, lane_pos, waiting, due_at)
        (
            1,
            "m1",
            "pending",
            true,
            Some("label:M"),
            Some(0),
            false,
            Some(now),
        ),
        (
            2,
            "m2",
            "pending",
            true,
            Some("label:M"),
            Some(1),
            true,
            None,
        ),
        (
            3,
            "n1",
            "delivered",
            true,
            Some("label:N"),
            Some(0),
            false,
            None,
        ),
        (4, "u1", "pending", false, None, None, false, None),
        (5, "p1", "dead", true, Some("label:P"), Some(0), false, None),
    ];
    for (seq, id, status, gated, entity, lane_pos, waiting, due_at) in rows {
        sqlx::query(
            "INSERT INTO deliveries (seq, delivery_id, body_sha256, endpoint, topic, client_ip, \
                 headers, body, body_len, received_at, status, gated, entity, version, change, \
                 project_id, fresh, lane_pos, waiting, due_at, event, request_id) \
             VALUES ($1, $2, sha256($3), 'labelbox', 'LABEL_UPDATED', '127.0.0.1', '[]', $3, \
                 length($3), $4, $5, $6, $7, CASE WHEN $6 THEN $1 END, \
                 CASE WHEN $6 THEN 'updated' END, CASE WHEN $6 THEN 'cproject' END, \
                 CASE WHEN $6 THEN true END, $8, $9, $10, CASE WHEN $6 THEN '{}' END, $2)",
        )
        .bind(seq)
        .bind(id)
        .bind(body(seq as usize))
        .bind(now - 1000 + seq)
        .bind(status)
        .bind(gated)
        .bind(entity)
        .bind(lane_pos)
        .bind(waiting)
        .bind(due_at)
        .execute(&mut conn)
        .await
        .expect("old delivery");
    }
    conn.execute(
        format!(
            "SELECT setval('deliveries_seq_seq', 5); \
             INSERT INTO entities (entity, version, change, lane_next, active_pos, updated_at) \
             VALUES ('label:M', 2, 'updated', 2, 0, {now}), \
                    ('label:N', 3, 'updated', 1, NULL, {now}), \
                    ('label:P', 5, 'updated', 1, NULL, {now}); \
             INSERT INTO handler_runs (delivery_seq, handler, state, attempts, next_at, last_error) \
             VALUES (1, 'archive', 'pending', 0, {now}, NULL), \
                    (2, 'archive', 'pending', 0, {now}, NULL), \
                    (3, 'archive', 'done', 1, NULL, NULL), \
                    (5, 'archive', 'dead', 1, NULL, 'gone'); \
             INSERT INTO attempts (delivery_seq, handler, attempt, started_at, finished_at, \
                 outcome, error) \
             VALUES (3, 'archive', 1, {now}, {now}, 'ok', NULL), \
                    (5, 'archive', 1, {now}, {now}, 'dead', 'gone');"
        )
        .as_str(),
    )
    .await
    .expect("old state");
    conn.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_old_store_is_migrated_in_place() {
    let Some(db) = TestDb::create("postgres_an_old_store_is_migrated_in_place").await else {
        return;
    };
    let clock = std::sync::Arc::new(ManualClock::new());
    let now = clock.now();
    old_schema(&db.url).await;
    old_rows(&db.url, now).await;

    let settings = labelhook::config::StoreSettings {
        url: db.url.clone(),
        max_connections: 4,
        ..labelhook::config::StoreSettings::default()
    };
    let store = store::open_for_serving(&settings, None, 1024, clock.clone())
        .await
        .expect("open");
    let all = ListQuery {
        limit: 100,
        ..ListQuery::default()
    };
    let listed: Vec<(String, Status)> = store
        .list(&all)
        .await
        .expect("list")
        .into_iter()
        .map(|d| (d.delivery_id, d.status))
        .collect();
    let want = [
        ("p1", Status::Dead),
        ("u1", Status::Pending),
        ("n1", Status::Delivered),
        ("m2", Status::Pending),
        ("m1", Status::Pending),
    ];
    let want: Vec<(String, Status)> = want.iter().map(|(i, s)| ((*i).to_owned(), *s)).collect();
    assert_eq!(listed, want, "statuses are kept");
    assert_eq!(
        store.queue_depth().await.expect("depth"),
        3,
        "m1, m2 and u1"
    );
    let n1 = store.show("n1").await.expect("show");
    assert_eq!(n1[0].attempts.len(), 1, "attempts are kept");
    assert_eq!(n1[0].handlers[0].state, RunState::Done);
    assert_eq!(n1[0].summary.entity.as_deref(), Some("label:N"));

    // Pending work is still pending, and in order: u1 waits for the gate, m1 heads label:M's
    // lane, and m2 comes only after it.
    let owner = LeaseOwner::named("w");
    let ungated = store.take_ungated(&owner, LEASE, 10).await.expect("take");
    assert_eq!(ungated.iter().map(|u| u.seq).collect::<Vec<_>>(), [4]);
    let claimed = store.claim(&owner, LEASE, 10, 0).await.expect("claim");
    assert_eq!(claimed.iter().map(|c| c.seq).collect::<Vec<_>>(), [1]);
    assert_eq!(claimed[0].runs.len(), 1);
    assert_eq!(claimed[0].entity.as_deref(), Some("label:M"));
    let done = labelhook::test_support::store::AttemptResult {
        handler: "archive".to_owned(),
        attempt: 1,
        started_at: now,
        finished_at: now,
        outcome: labelhook::test_support::store::AttemptOutcome::Ok,
    };
    store
        .record_attempts(1, &owner, std::slice::from_ref(&done))
        .await
        .expect("record");
    clock.advance(Duration::from_millis(1));
    let next = store.claim(&owner, LEASE, 10, 0).await.expect("claim");
    assert_eq!(
        next.iter().map(|c| c.seq).collect::<Vec<_>>(),
        [2],
        "m2 after m1"
    );

    // The dead letter can be replayed, and new deliveries follow the old ones.
    let replayed = store
        .replay(&ReplayTarget::Status(Status::Dead))
        .await
        .expect("replay");
    assert_eq!(replayed.replayed, 1);
    let delivery = crate::harness::verified(
        "new",
        "LABEL_UPDATED",
        &body(9),
        labelhook::test_support::delivery::IncomingBody::Inline(bytes::Bytes::from(body(9))),
    );
    let accepted = store.accept(delivery).await.expect("accept");
    assert_eq!(accepted.seq, 6);
    store.close().await;
}
