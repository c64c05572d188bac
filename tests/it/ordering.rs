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

async fn run_case(deliveries: Vec<Delivery>, order: Vec<usize>) {
    let dir = tempfile::tempdir().expect("temp");
    let config_text = base_config(
        r#"
[dispatch]
poll_interval = "50ms"
concurrency = 8
"#,
    )
    .replace("STORE_DIR", &dir.path().display().to_string());
    let path = dir.path().join("labelhook.toml");
    std::fs::write(&path, config_text).expect("write");
    // The recorder is wired by a route naming it, like any configured handler.
    let with_route = format!(
        "{}\n[[handler]]\nname = \"recorder\"\nkind = \"log\"\n\n[[route]]\ntopics = [\"LABEL_*\"]\nhandlers = [\"recorder\"]\n",
        std::fs::read_to_string(&path).expect("read")
    );
    std::fs::write(&path, with_route).expect("write");
    let env = HashMap::from([("LH_TEST_SECRET".to_owned(), SECRET.to_owned())]);
    let config = Config::load(&path, &env, true).expect("config");
    let mut app = Application::build(config).await.expect("build");
    let seen: Seen = Arc::default();
    app.handlers_mut()
        .register("recorder", Arc::new(Recorder { seen: seen.clone() }));
    let url = format!("http://{}/webhooks/labelbox", app.local_addr());
    let store = app.store();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stop_rx.await;
    }));

    // Shuffled, and each delivery sent a second time with a fresh delivery id half of the time
    // (Labelbox redelivering), which the gate must treat as a re-application or as stale.
    let client = reqwest::Client::new();
    for (n, index) in order.into_iter().enumerate() {
        let d = &deliveries[index % deliveries.len()];
        let body = d.body();
        let response = client
            .post(&url)
            .header("content-type", "application/json")
            .header("x-labelbox-event", d.topic())
            .header("x-labelbox-id", format!("cprop{n:020}"))
            .header("x-hub-signature", sha1_sig(SECRET, body.as_bytes()))
            .body(body)
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 202);
    }
    // Bounded wait until everything is dispatched.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while store.queue_depth().await.expect("depth") > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dispatch did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(());
    server.await.expect("server");

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
