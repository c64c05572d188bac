//! Opens a fresh store of each back-end for one test, with a clock the test moves by hand, and
//! builds what the rules feed it: verified deliveries (through the real verifier) and gate
//! requests.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use labelhook::config::StoreSettings;
use labelhook::ordering::{Change, Version};
use labelhook::test_support::delivery::signature::sign;
use labelhook::test_support::delivery::Clock;
use labelhook::test_support::delivery::{
    Algorithm, BodyVerifier, ClaimedSignature, DeliveryId, Envelope, IncomingBody, ManualClock,
    VerifiedDelivery,
};
use labelhook::test_support::store::{self, Accepted, GateRequest, LeaseOwner, Operations, Store};
use secrecy::SecretString;

use crate::test_db::TestDb;

const SECRET: &str = "conformance-secret";
/// The lease every rule uses; the clock is moved past it when a rule needs it to run out.
pub const LEASE: Duration = Duration::from_secs(30);

/// A store under test, and a second handle on the same database as another replica would
/// have it (for SQLite, one process per database, it is the same handle).
pub struct Harness {
    pub store: Arc<dyn Store>,
    pub clock: Arc<ManualClock>,
    /// What the CLI opens beside the server (`events`, `labelbox backfill`).
    pub cli: Arc<dyn Operations>,
    other: Option<Arc<dyn Store>>,
    _dir: Option<tempfile::TempDir>,
    db: Option<TestDb>,
}

fn settings(url: String) -> StoreSettings {
    StoreSettings {
        url,
        max_connections: 4,
        ..StoreSettings::default()
    }
}

impl Harness {
    pub async fn sqlite() -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}/labelhook.db", dir.path().display());
        let clock = Arc::new(ManualClock::new());
        let store = store::open_for_serving(&settings(url.clone()), None, 1024, clock.clone())
            .await
            .expect("open sqlite");
        let cli = store::open_for_inspection(&settings(url), None, clock.clone())
            .await
            .expect("open sqlite for the CLI");
        Harness {
            store,
            clock,
            cli,
            other: None,
            _dir: Some(dir),
            db: None,
        }
    }

    /// `None` (the skip reason printed) where PostgreSQL is not running.
    pub async fn postgres(test: &str) -> Option<Harness> {
        let db = TestDb::create(test).await?;
        let clock = Arc::new(ManualClock::new());
        let settings = settings(db.url.clone());
        let store = store::open_for_serving(&settings, None, 1024, clock.clone())
            .await
            .expect("open postgres");
        let other = store::open_for_serving(&settings, None, 1024, clock.clone())
            .await
            .expect("open postgres again");
        let cli = store::open_for_inspection(&settings, None, clock.clone())
            .await
            .expect("open postgres for the CLI");
        Some(Harness {
            store,
            clock,
            cli,
            other: Some(other),
            _dir: None,
            db: Some(db),
        })
    }

    /// The SQLite database file, for the SQLite back-end.
    pub fn sqlite_file(&self) -> Option<std::path::PathBuf> {
        self._dir.as_ref().map(|d| d.path().join("labelhook.db"))
    }

    /// Another replica's handle on the same database.
    pub fn other(&self) -> Arc<dyn Store> {
        self.other.clone().unwrap_or_else(|| self.store.clone())
    }

    /// Waits (bounded) until both handles listen for each other's wake-ups, so that a test of
    /// wake-ups is not woken by a listener announcing its own start.
    pub async fn wait_until_listening(&self) {
        let Some(db) = &self.db else { return };
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
            .await
            .expect("connect");
        for _ in 0..200 {
            let listening: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity \
                 WHERE datname = $1 AND query LIKE 'LISTEN%'",
            )
            .bind(&db.name)
            .fetch_one(&mut conn)
            .await
            .expect("pg_stat_activity");
            if listening >= 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the stores never started listening");
    }

    /// The store as a restarted server opens it: for SQLite the same database after this
    /// handle is closed (one server per file); for PostgreSQL a new handle beside the others.
    /// What the old handle had in memory is gone; what it stored is all there is.
    pub async fn reopened(&self) -> Arc<dyn Store> {
        match &self.db {
            Some(db) => {
                store::open_for_serving(&settings(db.url.clone()), None, 1024, self.clock.clone())
                    .await
                    .expect("open postgres again")
            }
            None => {
                self.store.close().await;
                let url = format!(
                    "sqlite://{}",
                    self.sqlite_file().expect("a SQLite harness").display()
                );
                store::open_for_serving(&settings(url), None, 1024, self.clock.clone())
                    .await
                    .expect("open sqlite again")
            }
        }
    }

    pub async fn close(self) {
        self.store.close().await;
        if let Some(other) = &self.other {
            other.close().await;
        }
    }

    /// Accepts `body` as delivery `id` of `topic`, verified as the ingress would.
    pub async fn accept(&self, id: &str, topic: &str, body: &[u8]) -> Accepted {
        let inline = IncomingBody::Inline(Bytes::copy_from_slice(body));
        let delivery = verified_at(id, topic, body, inline, self.clock.now());
        self.store.accept(delivery).await.expect("accept")
    }

    /// Takes everything ungated for `owner`, gates each as `gates` says, and returns the
    /// verdicts (for deliveries given no gate, a default fresh one without entity).
    pub async fn gate_all(
        &self,
        plan: impl Fn(i64) -> GateRequest,
    ) -> Vec<(i64, Option<labelhook::ordering::Verdict>)> {
        let owner = LeaseOwner::named("gater");
        let mut all = Vec::new();
        loop {
            let ungated = self
                .store
                .take_ungated(&owner, LEASE, 1000)
                .await
                .expect("take ungated");
            if ungated.is_empty() {
                return all;
            }
            let requests: Vec<GateRequest> = ungated.iter().map(|u| plan(u.seq)).collect();
            let seqs: Vec<i64> = requests.iter().map(|g| g.seq).collect();
            let verdicts = self.store.record_gates(requests).await.expect("gate");
            all.extend(seqs.into_iter().zip(verdicts));
        }
    }
}

/// The request id the harness gives delivery `id`.
pub fn request_id_of(id: &str) -> String {
    format!("req-{id}")
}

/// A delivery verified by the real verifier: there is no other way to make one.
pub fn verified(id: &str, topic: &str, bytes: &[u8], body: IncomingBody) -> VerifiedDelivery {
    verified_at(
        id,
        topic,
        bytes,
        body,
        labelhook::test_support::delivery::now_millis(),
    )
}

/// [`verified`], received at `received_at`.
pub fn verified_at(
    id: &str,
    topic: &str,
    bytes: &[u8],
    body: IncomingBody,
    received_at: i64,
) -> VerifiedDelivery {
    let header = sign(SECRET.as_bytes(), bytes, Algorithm::Sha256);
    let claimed = ClaimedSignature::pick(Some(header.as_bytes()), None, true).expect("claimed");
    let mut verifier =
        BodyVerifier::new(Algorithm::Sha256, &[SecretString::from(SECRET.to_owned())]);
    for chunk in bytes.chunks(64 * 1024) {
        verifier.update(chunk);
    }
    let proof = verifier.verify(&claimed).expect("verified");
    let envelope = Envelope {
        delivery_id: DeliveryId::Given(id.to_owned()),
        endpoint: "labelbox".to_owned(),
        topic: Some(topic.to_owned()),
        client_ip: [127, 0, 0, 1].into(),
        headers: vec![("x-labelbox-event".to_owned(), topic.to_owned())],
        received_at,
        request_id: Some(request_id_of(id)),
    };
    VerifiedDelivery::new(proof, envelope, body)
}

/// A label event's gate request: `entity` at `version` (RFC 3339), going to `handlers` when
/// fresh.
pub fn label_gate(
    seq: i64,
    entity: &str,
    version: &str,
    change: Change,
    handlers: &[&str],
) -> GateRequest {
    GateRequest {
        seq,
        entity: Some(entity.to_owned()),
        version: Some(Version::parse_rfc3339(version).expect("version")),
        change,
        project_id: Some("cproject".to_owned()),
        parse_error: None,
        recognized: true,
        handlers_if_fresh: handlers.iter().map(|h| (*h).to_owned()).collect(),
        handlers_if_stale: Vec::new(),
        topic_label: "LABEL_UPDATED",
        event: "{}".to_owned(),
        origin: labelhook::test_support::delivery::Origin::Webhook,
        data_row_id: None,
        labels: None,
    }
}

/// A small JSON body that differs per `n`.
pub fn body(n: usize) -> Vec<u8> {
    format!("{{\"n\":{n}}}").into_bytes()
}
