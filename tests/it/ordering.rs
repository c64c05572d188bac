//! The ordering promise end to end, in-process: histories of label events are delivered over
//! HTTP shuffled and duplicated, through the store, the gate and the lanes, to a Rust handler
//! that records what it sees. Per entity it must only ever see newer versions, and end at the
//! newest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use labelhook::config::Config;
use labelhook::handlers::{Handler, HandlerError, HandlerEvent};
use labelhook::ordering::{Change, Version};
use labelhook::Application;
use proptest::prelude::*;

use crate::helpers::{base_config, sha1_sig, SECRET};

/// What the recording handler saw, per entity, in order.
type Seen = Arc<Mutex<HashMap<String, Vec<(Version, Change)>>>>;

/// A user's handler: records each fresh event, taking a little time so that a broken lane
/// would let a later event overtake an earlier one.
struct Recorder {
    seen: Seen,
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, event: &HandlerEvent) -> Result<(), HandlerError> {
        assert!(
            event.fresh,
            "a stale event reached a route without deliver_stale"
        );
        let change = match event.topic.as_str() {
            "LABEL_CREATED" => Change::Created,
            "LABEL_UPDATED" => Change::Updated,
            _ => Change::Deleted,
        };
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..3))).await;
        let entity = event
            .entity
            .clone()
            .ok_or_else(|| HandlerError::Permanent("no entity".into()))?;
        let version = event
            .version
            .ok_or_else(|| HandlerError::Permanent("no version".into()))?;
        self.seen
            .lock()
            .map_err(|_| HandlerError::Permanent("poisoned".into()))?
            .entry(entity)
            .or_default()
            .push((version, change));
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Delivery {
    label: usize,
    second: u32,
    change: Change,
}

impl Delivery {
    fn topic(&self) -> &'static str {
        match self.change {
            Change::Created => "LABEL_CREATED",
            Change::Updated => "LABEL_UPDATED",
            Change::Deleted => "LABEL_DELETED",
        }
    }

    fn body(&self) -> String {
        format!(
            r#"{{"id":"clabelprop{:015}","updatedAt":"2026-11-20T10:{:02}:{:02}Z","label":"{{}}"}}"#,
            self.label,
            self.second / 60,
            self.second % 60
        )
    }

    fn version(&self) -> Version {
        Version::parse_rfc3339(&format!(
            "2026-11-20T10:{:02}:{:02}Z",
            self.second / 60,
            self.second % 60
        ))
        .expect("version")
    }
}

/// Per label: a create, updates at increasing seconds (some tied with the step before), and
/// sometimes a delete at the end.
fn histories() -> impl Strategy<Value = Vec<Delivery>> {
    prop::collection::vec(
        (
            prop::collection::vec((1u32..4, any::<bool>()), 1..6),
            any::<bool>(),
        ),
        1..4,
    )
    .prop_map(|labels| {
        let mut all = Vec::new();
        for (label, (steps, delete)) in labels.into_iter().enumerate() {
            let mut second = 0;
            all.push(Delivery {
                label,
                second,
                change: Change::Created,
            });
            for (gap, tie) in steps {
                if !tie {
                    second += gap;
                }
                all.push(Delivery {
                    label,
                    second,
                    change: Change::Updated,
                });
            }
            if delete {
                all.push(Delivery {
                    label,
                    second,
                    change: Change::Deleted,
                });
            }
        }
        all
    })
}

/// labelhook in this process, serving `extra` config, with `handler` registered as `name`
/// (which the config names as a `log` handler); stopped by sending on the returned channel.
struct InProcess {
    url: String,
    store: Arc<dyn labelhook::test_support::store::Store>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl InProcess {
    async fn start(extra: &str, name: &str, handler: Arc<dyn Handler>) -> InProcess {
        let dir = tempfile::tempdir().expect("temp");
        let config_text =
            base_config(extra).replace("STORE_DIR", &dir.path().display().to_string());
        let path = dir.path().join("labelhook.toml");
        std::fs::write(&path, config_text).expect("write");
        let env = HashMap::from([("LH_TEST_SECRET".to_owned(), SECRET.to_owned())]);
        let config = Config::load(&path, &env, true).expect("config");
        let mut app = Application::build(config).await.expect("build");
        app.handlers_mut().register(name, handler);
        let url = format!("http://{}/webhooks/labelbox", app.local_addr());
        let store = app.store();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            app.run_until_stopped(async {
                let _ = stop_rx.await;
            })
            .await;
        });
        InProcess {
            url,
            store,
            stop,
            server,
            _dir: dir,
        }
    }

    /// Posts `d` signed, under delivery id `id`; it must be accepted.
    async fn post(&self, client: &reqwest::Client, d: &Delivery, id: &str) {
        let body = d.body();
        let response = client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("x-labelbox-event", d.topic())
            .header("x-labelbox-id", id)
            .header("x-hub-signature", sha1_sig(SECRET, body.as_bytes()))
            .body(body)
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 202);
    }

    /// Waits (bounded) until everything is dispatched, then stops the server.
    async fn finish(self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.store.queue_depth().await.expect("depth") > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "dispatch did not finish"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.stop.send(());
        self.server.await.expect("server");
    }
}

async fn run_case(deliveries: Vec<Delivery>, order: Vec<usize>) {
    let seen: Seen = Arc::default();
    let app = InProcess::start(
        r#"
[dispatch]
poll_interval = "50ms"
concurrency = 8

[[handler]]
name = "recorder"
kind = "log"

[[route]]
topics = ["LABEL_*"]
handlers = ["recorder"]
"#,
        "recorder",
        Arc::new(Recorder { seen: seen.clone() }),
    )
    .await;

    // Shuffled, and each delivery sent a second time with a fresh delivery id half of the time
    // (Labelbox redelivering), which the gate must treat as a re-application or as stale.
    let client = reqwest::Client::new();
    for (n, index) in order.into_iter().enumerate() {
        let d = &deliveries[index % deliveries.len()];
        app.post(&client, d, &format!("cprop{n:020}")).await;
    }
    app.finish().await;

    let rank = |c: Change| c;
    let seen = seen.lock().expect("lock").clone();
    for (label, history) in group(&deliveries) {
        let entity = format!("label:clabelprop{label:015}");
        let got = seen.get(&entity).cloned().unwrap_or_default();
        assert!(!got.is_empty(), "{entity} received nothing");
        for pair in got.windows(2) {
            let (a, b) = ((pair[0].0, rank(pair[0].1)), (pair[1].0, rank(pair[1].1)));
            assert!(
                a <= b,
                "{entity}: {:?} after {:?} in {got:?}",
                pair[1],
                pair[0]
            );
        }
        let newest = history
            .iter()
            .map(|d| (d.version(), d.change))
            .max()
            .expect("history");
        assert_eq!(
            *got.last().expect("last"),
            newest,
            "{entity} did not end at the newest: {got:?}"
        );
    }
}

fn group(deliveries: &[Delivery]) -> HashMap<usize, Vec<Delivery>> {
    let mut by_label: HashMap<usize, Vec<Delivery>> = HashMap::new();
    for d in deliveries {
        by_label.entry(d.label).or_default().push(d.clone());
    }
    by_label
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn handlers_see_each_entity_only_move_forward_and_end_at_the_newest(
        (deliveries, order) in histories().prop_flat_map(|d| {
            let n = d.len();
            // Every delivery at least once, some twice, in any order.
            let extra = prop::collection::vec(0..n, 0..n);
            (Just(d), extra).prop_flat_map(move |(d, extra)| {
                let mut order: Vec<usize> = (0..n).chain(extra).collect();
                order.sort_unstable();
                (Just(d), Just(order).prop_shuffle())
            })
        })
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(run_case(deliveries, order));
    }
}

/// A handler that takes batches: records each batch it completes (all or nothing), holds the
/// first one long enough for the entity's later deliveries to queue up behind it, and fails
/// the first two times it is given the delivery at `fail_at` seconds, alone or in a batch (so
/// that taking the failed batch apart meets the failure again, and it is retried later).
struct Batcher {
    batches: Arc<Mutex<Vec<Vec<u32>>>>,
    failures: Arc<Mutex<u32>>,
    fail_at: u32,
}

impl Batcher {
    fn second_of(event: &HandlerEvent) -> u32 {
        let nanos = event.version.map(|v| v.as_nanos()).unwrap_or_default();
        let base = Version::parse_rfc3339("2026-11-20T10:00:00Z").expect("base");
        u32::try_from((nanos - base.as_nanos()) / 1_000_000_000).expect("seconds")
    }

    async fn take(&self, events: &[HandlerEvent]) -> Result<(), HandlerError> {
        let seconds: Vec<u32> = events.iter().map(Self::second_of).collect();
        if seconds.first() == Some(&0) {
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        {
            let mut failures = self.failures.lock().expect("lock");
            if *failures < 2 && seconds.contains(&self.fail_at) {
                *failures += 1;
                return Err(HandlerError::Retryable("disk hiccup".into()));
            }
        }
        self.batches.lock().expect("lock").push(seconds);
        Ok(())
    }
}

#[async_trait]
impl Handler for Batcher {
    async fn handle(&self, event: &HandlerEvent) -> Result<(), HandlerError> {
        self.take(std::slice::from_ref(event)).await
    }

    fn handles_batches(&self) -> bool {
        true
    }

    async fn handle_batch(&self, events: &[HandlerEvent]) -> Result<(), HandlerError> {
        self.take(events).await
    }
}

/// One busy label: its deliveries pile up behind a slow first one and reach a handler that
/// takes batches as batches, in version order, each exactly once. A batch that fails is taken
/// apart: the deliveries before the failing one are handled, the failing one is retried, and
/// those after it wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_entity_reaches_a_batching_handler_in_batches_and_in_order() {
    const N: u32 = 40;
    const FAIL_AT: u32 = 20;
    let batches: Arc<Mutex<Vec<Vec<u32>>>> = Arc::default();
    let batcher = Batcher {
        batches: batches.clone(),
        failures: Arc::default(),
        fail_at: FAIL_AT,
    };
    let app = InProcess::start(
        r#"
[dispatch]
poll_interval = "50ms"

[[handler]]
name = "batcher"
kind = "log"
backoff = "200ms"

[[route]]
topics = ["LABEL_*"]
handlers = ["batcher"]
"#,
        "batcher",
        Arc::new(batcher),
    )
    .await;
    let client = reqwest::Client::new();
    for second in 0..N {
        let d = Delivery {
            label: 7,
            second,
            change: Change::Updated,
        };
        app.post(&client, &d, &format!("cbatch{second:020}")).await;
    }
    app.finish().await;

    let batches = batches.lock().expect("lock").clone();
    let handled: Vec<u32> = batches.iter().flatten().copied().collect();
    assert_eq!(
        handled,
        (0..N).collect::<Vec<_>>(),
        "every delivery once, in version order: {batches:?}"
    );
    assert!(
        batches.iter().any(|b| b.len() > 1),
        "deliveries queued behind a slow one come as a batch: {batches:?}"
    );
    let retried = batches
        .iter()
        .position(|b| b.first() == Some(&FAIL_AT))
        .expect("the failing delivery, once retried, starts a batch");
    assert!(
        batches[..retried].iter().flatten().all(|s| *s < FAIL_AT),
        "nothing after the failing delivery was handled before it: {batches:?}"
    );
}
