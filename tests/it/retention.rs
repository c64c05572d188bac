//! Retention against the real binary: `events prune` says what it would delete and deletes
//! it; the background pruner does the same by itself; unfinished deliveries stay.

use std::time::{Duration, Instant};

use crate::helpers::*;

const LABEL: &[u8] = br#"{"id":"clabelret","updatedAt":"2026-11-01T10:00:00Z","label":"{}"}"#;

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what} did not happen");
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

#[test]
fn events_prune_says_what_it_would_delete_then_deletes_it_and_keeps_unfinished_work() {
    // Finished deliveries may go at once; the pruner in the background is off.
    let server = TestServer::with_base(
        r#"
[store.retention]
delivered = "0s"
bodies = "0s"
investigate = "0s"
interval = "0s"

[dispatch]
poll_interval = "100ms"

[[handler]]
name = "stuck"
kind = "http"
url = "http://127.0.0.1:9/never"
max_attempts = 100
backoff = "1h"

[[route]]
topics = ["LABEL_DELETED"]
handlers = ["stuck"]
"#,
    );
    assert_eq!(
        deliver(&server, "cdone", "LABEL_UPDATED", LABEL).status,
        202
    );
    assert_eq!(
        deliver(&server, "cstuck", "LABEL_DELETED", LABEL).status,
        202
    );
    server.wait_for_status("cdone", "delivered");
    // The stuck one is retrying: pending, with work left.
    wait_until("a first failed attempt", || {
        let out = server.cli(&["events", "show", "cstuck"]);
        String::from_utf8_lossy(&out.stdout).contains("stuck pending attempts=1")
    });

    let dry = server.cli(&["events", "prune", "--dry-run"]);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let said = String::from_utf8_lossy(&dry.stdout);
    assert!(
        said.starts_with("would delete 1 deliveries (1 delivered)"),
        "{said}"
    );
    assert!(
        server.status_of("cdone").is_some(),
        "a dry run deletes nothing"
    );

    let done = server.cli(&["events", "prune", "--json"]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&done.stdout).expect("one JSON object");
    assert_eq!(report["deleted"]["delivered"], 1);
    assert_eq!(report["body_bytes"], LABEL.len());
    assert_eq!(server.status_of("cdone"), None);
    assert_eq!(server.status_of("cstuck").as_deref(), Some("pending"));
}

#[test]
fn the_background_pruner_removes_finished_deliveries_by_itself() {
    let server = TestServer::with_base(
        r#"
[store.retention]
delivered = "0s"
interval = "100ms"

[dispatch]
poll_interval = "100ms"
"#,
    );
    assert_eq!(
        deliver(&server, "cgone", "LABEL_UPDATED", LABEL).status,
        202
    );
    wait_until("the pruner", || server.status_of("cgone").is_none());
    // Its ordering state stays: the same label at an older version is stale.
    let older = br#"{"id":"clabelret","updatedAt":"2026-11-01T09:00:00Z","label":"{}"}"#;
    assert_eq!(
        deliver(&server, "colder", "LABEL_UPDATED", older).status,
        202
    );
    server.wait_for_status("colder", "stale");

    // What an operator watches: the pruned count, and the rows kept by status.
    let value = |metrics: &str, prefix: &str| -> Option<f64> {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    wait_until("the store's metrics", || {
        let metrics = curl(&server.admin("/metrics"), &[]).body;
        value(
            &metrics,
            "labelhook_pruned_deliveries_total{status=\"delivered\"}",
        )
        .is_some_and(|n| n >= 1.0)
            && value(&metrics, "labelhook_store_deliveries{status=\"stale\"}") == Some(1.0)
            && value(&metrics, "labelhook_store_deliveries{status=\"delivered\"}") == Some(0.0)
    });
}
