//! Typed events through the gate to handlers, against the real binary: stale events withheld,
//! ordering kept across restarts, dead letters and replay, crash during dispatch.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::helpers::*;

const LABEL_ID: &str = "clabelorder00000000000001";

/// A v1 LABEL_* body for `LABEL_ID` at `updated_at`.
fn label_body(updated_at: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{LABEL_ID}","createdAt":"2026-11-01T00:00:00Z","updatedAt":"{updated_at}","label":"{{\"objects\":[]}}","project":{{"id":"cprojorder000000000000001"}},"dataRow":{{"id":"cdrow"}}}}"#
    )
    .into_bytes()
}

fn archive_config(dir_token: &str, extra: &str) -> String {
    base_config(&format!(
        r#"
[dispatch]
poll_interval = "100ms"

[[handler]]
name = "archive"
kind = "file"
path = "{dir_token}/events.jsonl"

[[route]]
topics = ["LABEL_*", "WORKFLOW_ACTION", "MODEL_RUN"]
handlers = ["archive"]
{extra}
"#
    ))
}

/// The JSON lines a file handler wrote.
fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn wait_for_lines(path: &Path, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = lines(path);
        if found.len() >= count {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {count} lines",
            found.len()
        );
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

#[test]
fn stale_events_are_marked_and_withheld_unless_a_route_asks_for_them() {
    let server = TestServer::start(&archive_config(
        "STORE_DIR",
        r#"
[[handler]]
name = "audit"
kind = "file"
path = "STORE_DIR/audit.jsonl"

[[route]]
topics = ["LABEL_*"]
handlers = ["audit"]
deliver_stale = true
"#,
    ));
    let archive = server.dir.path().join("events.jsonl");
    let audit = server.dir.path().join("audit.jsonl");
    let newer = label_body("2026-11-20T10:00:05.500Z");
    let older = label_body("2026-11-20T10:00:01Z");
    assert_eq!(
        deliver(&server, "cnew", "LABEL_UPDATED", &newer).status,
        202
    );
    server.wait_for_status("cnew", "delivered");
    assert_eq!(
        deliver(&server, "cold", "LABEL_UPDATED", &older).status,
        202
    );
    server.wait_for_status("cold", "stale");
    let audited = wait_for_lines(&audit, 2);
    let archived = lines(&archive);
    assert_eq!(
        archived.len(),
        1,
        "the stale event reached a route without deliver_stale"
    );
    assert_eq!(archived[0]["delivery_id"], "cnew");
    assert_eq!(archived[0]["fresh"], true);
    assert_eq!(archived[0]["entity"], format!("label:{LABEL_ID}"));
    assert_eq!(archived[0]["version"], "2026-11-20T10:00:05.5Z");
    assert_eq!(archived[0]["body"]["updatedAt"], "2026-11-20T10:00:05.500Z");
    let stale: Vec<_> = audited
        .iter()
        .filter(|l| l["delivery_id"] == "cold")
        .collect();
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0]["fresh"], false);
}

#[test]
fn ties_at_equal_versions_follow_delete_over_update_over_create() {
    let server = TestServer::start(&archive_config("STORE_DIR", ""));
    let at = "2026-11-20T10:00:00Z";
    let body = label_body(at);
    assert_eq!(
        deliver(&server, "ctie-upd", "LABEL_UPDATED", &body).status,
        202
    );
    server.wait_for_status("ctie-upd", "delivered");
    // Same second, lower rank: stale. Same kind again: applied again.
    assert_eq!(
        deliver(&server, "ctie-cre", "LABEL_CREATED", &body).status,
        202
    );
    server.wait_for_status("ctie-cre", "stale");
    assert_eq!(
        deliver(&server, "ctie-upd2", "LABEL_UPDATED", &body).status,
        202
    );
    server.wait_for_status("ctie-upd2", "delivered");
    // Delete outranks, and is terminal even for a newer update.
    assert_eq!(
        deliver(&server, "ctie-del", "LABEL_DELETED", &body).status,
        202
    );
    server.wait_for_status("ctie-del", "delivered");
    let later = label_body("2026-11-20T11:00:00Z");
    assert_eq!(
        deliver(&server, "ctie-late", "LABEL_UPDATED", &later).status,
        202
    );
    server.wait_for_status("ctie-late", "stale");
}

#[test]
fn ordering_state_survives_a_restart() {
    let mut server = TestServer::start(&archive_config("STORE_DIR", ""));
    assert_eq!(
        deliver(
            &server,
            "crst-new",
            "LABEL_UPDATED",
            &label_body("2026-11-20T12:00:00Z")
        )
        .status,
        202
    );
    server.wait_for_status("crst-new", "delivered");
    server.restart();
    assert_eq!(
        deliver(
            &server,
            "crst-old",
            "LABEL_UPDATED",
            &label_body("2026-11-20T11:59:59Z")
        )
        .status,
        202
    );
    server.wait_for_status("crst-old", "stale");
    let archived = lines(&server.dir.path().join("events.jsonl"));
    assert_eq!(archived.len(), 1);
}

/// A one-request-at-a-time HTTP server that answers 200 and reports each body it got.
fn start_target(listener: TcpListener) -> mpsc::Receiver<(String, Vec<u8>)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut head = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            if tx.send((head, body)).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn a_failing_http_handler_is_dead_lettered_then_delivered_by_replay() {
    // A port with nothing behind it yet: bound, noted, released.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let server = TestServer::start(&base_config(&format!(
        r#"
[dispatch]
poll_interval = "100ms"

[[handler]]
name = "forward"
kind = "http"
url = "http://127.0.0.1:{port}/labelbox"
timeout = "2s"
max_attempts = 3
backoff = "50ms"
secrets = [{{ value = "forward-secret" }}]

[[handler]]
name = "archive"
kind = "file"
path = "STORE_DIR/events.jsonl"

[[route]]
topics = ["LABEL_*"]
handlers = ["forward", "archive"]
"#
    )));
    let body = label_body("2026-11-20T10:00:00Z");
    assert_eq!(
        deliver(&server, "cdead1", "LABEL_UPDATED", &body).status,
        202
    );
    server.wait_for_status("cdead1", "dead");
    let shown =
        String::from_utf8_lossy(&server.cli(&["events", "show", "cdead1"]).stdout).into_owned();
    assert!(shown.contains("forward dead attempts=3"), "{shown}");
    assert!(shown.contains("#1 forward retry "), "{shown}");
    assert!(shown.contains("#2 forward retry "), "{shown}");
    assert!(shown.contains("#3 forward dead "), "{shown}");
    assert!(!shown.contains("forward-secret"));

    // The target comes up; replay brings the dead delivery back.
    let target = start_target(TcpListener::bind(("127.0.0.1", port)).expect("rebind"));
    let out = server.cli(&["events", "replay", "--status", "dead"]);
    assert!(out.status.success());
    // One line per delivery, saying what replay did; the handler that succeeded is not named.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "cdead1 seq=1 dead: queued again: gated again, then forward\nreplayed 1 deliveries"
    );
    let (head, got) = target
        .recv_timeout(Duration::from_secs(30))
        .expect("forwarded");
    assert_eq!(got, body);
    let head = head.to_ascii_lowercase();
    let expected = sha1_sig("forward-secret", &body);
    assert!(
        head.contains(&format!("x-hub-signature: {expected}")),
        "{head}"
    );
    assert!(head.contains("x-labelbox-id: cdead1"), "{head}");
    server.wait_for_status("cdead1", "delivered");
    // The handler that had succeeded is not run again by the replay.
    let archived = lines(&server.dir.path().join("events.jsonl"));
    assert_eq!(archived.len(), 1, "{archived:?}");
}

#[test]
fn a_kill_9_during_dispatch_is_followed_by_completion_after_restart() {
    let dir_marker = "STORE_DIR";
    // The command records each start, then waits for a `go` file that the test creates.
    let script = format!(
        "echo started >> {dir_marker}/starts; cat > /dev/null; \
         while [ ! -f {dir_marker}/go ]; do sleep 0.05; done"
    );
    let mut server = TestServer::start(&base_config(&format!(
        r#"
[dispatch]
poll_interval = "100ms"

[[handler]]
name = "slow"
kind = "command"
argv = ["sh", "-c", "{script}"]
timeout = "60s"

[[route]]
topics = ["LABEL_*"]
handlers = ["slow"]
"#
    )));
    let starts = server.dir.path().join("starts");
    assert_eq!(
        deliver(
            &server,
            "ccrash1",
            "LABEL_UPDATED",
            &label_body("2026-11-20T10:00:00Z")
        )
        .status,
        202
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !starts.exists() {
        assert!(Instant::now() < deadline, "handler never started");
        std::thread::park_timeout(Duration::from_millis(20));
    }
    server.kill9();
    assert_eq!(server.status_of("ccrash1").as_deref(), Some("pending"));
    std::fs::write(server.dir.path().join("go"), b"").expect("go");
    server.restart();
    server.wait_for_status("ccrash1", "delivered");
    let runs = std::fs::read_to_string(&starts).expect("starts");
    assert!(
        runs.lines().count() >= 2,
        "not run again after the crash: {runs:?}"
    );
}

#[test]
fn model_list_and_a_model_run_reach_a_handler() {
    let server = TestServer::start(&archive_config(
        "STORE_DIR",
        r#"
[model_training]
path = "/model-training"
secrets = [{ env = "LH_TEST_SECRET" }]
model_types = ["bounding_box"]
"#,
    ));
    let models = curl(&server.url("/model-training/models"), &[]);
    assert_eq!(models.body, r#"{"bounding_box":{}}"#);
    let body = include_bytes!("../fixtures/model_run.json");
    // As Labelbox sends it: no Content-Type, no delivery id, only `X-Hub-Signature`.
    let run = post_model_run_as_labelbox(&server, body, &[]);
    assert_eq!(run.status, 202, "{}", run.body);
    let archived = wait_for_lines(&server.dir.path().join("events.jsonl"), 1);
    assert_eq!(archived[0]["topic"], "MODEL_RUN");
    let expected: serde_json::Value = serde_json::from_slice(body).expect("json");
    assert_eq!(archived[0]["body"], expected);
    let run_id = expected["modelRunId"].as_str().expect("id");
    assert_eq!(archived[0]["entity"], format!("modelrun:{run_id}"));
}

#[test]
fn workflow_and_unknown_topics_are_routed_by_name_or_star() {
    let server = TestServer::start(&archive_config(
        "STORE_DIR",
        r#"
[[handler]]
name = "everything"
kind = "file"
path = "STORE_DIR/everything.jsonl"

[[route]]
topics = ["*"]
handlers = ["everything"]
"#,
    ));
    let workflow = include_bytes!("../fixtures/workflow_action.json");
    assert_eq!(deliver(&server, "cwf1", "MOVE", workflow).status, 202);
    assert_eq!(
        deliver(&server, "cnew-topic", "LABEL_SOMETHING_NEW", b"{\"x\":1}").status,
        202
    );
    server.wait_for_status("cwf1", "delivered");
    server.wait_for_status("cnew-topic", "unrecognized");
    let everything = wait_for_lines(&server.dir.path().join("everything.jsonl"), 2);
    assert_eq!(everything.len(), 2);
    // LABEL_* does not catch an unknown LABEL_ topic: only `*` does.
    let archived = lines(&server.dir.path().join("events.jsonl"));
    assert_eq!(archived.len(), 1);
    assert_eq!(archived[0]["delivery_id"], "cwf1");
    assert!(archived[0]["entity"]
        .as_str()
        .unwrap_or_default()
        .starts_with("workflow:"));
}

/// An export-shaped (v2) snapshot of data row `cdrsnap` in project `cpsnap` listing labels
/// `(id, content time)`, with the row's last activity at `row_at`.
fn snapshot(labels: &[(&str, &str)], row_at: &str) -> Vec<u8> {
    let labels: Vec<serde_json::Value> = labels
        .iter()
        .map(|(id, at)| {
            serde_json::json!({
                "id": id,
                "label_details": {"updated_at": "2026-11-01T00:00:00.000+00:00", "content_last_updated_at": at},
                "annotations": {"objects": [], "classifications": [], "relationships": []}
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "data_row": {"id": "cdrsnap", "external_id": "snap.jpg", "details": {"last_activity_at": row_at}},
        "projects": {"cpsnap": {"name": "p", "labels": labels, "project_details": {"workflow_history": []}}}
    }))
    .expect("json")
}

#[test]
fn export_shaped_snapshots_of_two_labels_are_ordered_per_data_row_and_a_delete_is_not_final() {
    let server = TestServer::start(&archive_config("STORE_DIR", ""));
    let (one, two) = ("clabelone", "clabeltwo");
    // The newest snapshot arrives first; the older ones are stale whichever label changed.
    let sends = [
        (
            "csnap-3",
            "LABEL_UPDATED",
            snapshot(
                &[
                    (one, "2026-11-01T10:00:03.000+00:00"),
                    (two, "2026-11-01T10:00:02.000+00:00"),
                ],
                "2026-11-01T10:00:03.000+00:00",
            ),
        ),
        (
            "csnap-1",
            "LABEL_UPDATED",
            snapshot(
                &[(one, "2026-11-01T10:00:01.000+00:00")],
                "2026-11-01T10:00:01.000+00:00",
            ),
        ),
        (
            "csnap-2",
            "LABEL_CREATED",
            snapshot(
                &[
                    (one, "2026-11-01T10:00:01.000+00:00"),
                    (two, "2026-11-01T10:00:02.000+00:00"),
                ],
                "2026-11-01T10:00:02.000+00:00",
            ),
        ),
        // Both labels deleted: a snapshot listing none, newer than everything before.
        (
            "csnap-4",
            "LABEL_DELETED",
            snapshot(&[], "2026-11-01T10:00:04.000+00:00"),
        ),
        // A new label after the delete is applied: the delete was not final for the row.
        (
            "csnap-5",
            "LABEL_CREATED",
            snapshot(
                &[("clabelthree", "2026-11-01T10:00:05.000+00:00")],
                "2026-11-01T10:00:05.000+00:00",
            ),
        ),
    ];
    for (id, topic, body) in &sends {
        assert_eq!(deliver(&server, id, topic, body).status, 202, "{id}");
        // One at a time: arrival order is what this test is about.
        let status = server.events().iter().any(|e| e["delivery_id"] == *id);
        assert!(status, "{id} stored");
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.status_of(id).as_deref() == Some("pending") {
            assert!(Instant::now() < deadline, "{id} stayed pending");
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }
    assert_eq!(server.status_of("csnap-1").as_deref(), Some("stale"));
    assert_eq!(server.status_of("csnap-2").as_deref(), Some("stale"));
    for fresh in ["csnap-3", "csnap-4", "csnap-5"] {
        assert_eq!(
            server.status_of(fresh).as_deref(),
            Some("delivered"),
            "{fresh}"
        );
    }
    let archived = wait_for_lines(&server.dir.path().join("events.jsonl"), 3);
    let seen: Vec<(&str, &str, &str)> = archived
        .iter()
        .map(|l| {
            (
                l["delivery_id"].as_str().unwrap_or_default(),
                l["entity"].as_str().unwrap_or_default(),
                l["project_id"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("csnap-3", "labels:cpsnap:cdrsnap", "cpsnap"),
            ("csnap-4", "labels:cpsnap:cdrsnap", "cpsnap"),
            ("csnap-5", "labels:cpsnap:cdrsnap", "cpsnap"),
        ]
    );
}

#[test]
fn an_export_shaped_workflow_action_is_routed_by_project_and_ordered_per_project_and_data_row() {
    let server = TestServer::start(&archive_config(
        "STORE_DIR",
        r#"
[[handler]]
name = "project-log"
kind = "file"
path = "STORE_DIR/project.jsonl"

[[route]]
topics = ["WORKFLOW_ACTION"]
project_ids = ["clu8f2m1p000208l4c7ax9d3k"]
handlers = ["project-log"]
"#,
    ));
    let newer = include_bytes!("../fixtures/workflow_action.json");
    // The same data row, an older move (its history ends earlier).
    let mut older: serde_json::Value = serde_json::from_slice(newer).expect("json");
    let history = older["projects"]["clu8f2m1p000208l4c7ax9d3k"]["project_details"]
        ["workflow_history"]
        .as_array_mut()
        .expect("history");
    history.pop();
    let older = serde_json::to_vec(&older).expect("json");
    assert_eq!(
        deliver(&server, "cmove-new", "WORKFLOW_ACTION", newer).status,
        202
    );
    server.wait_for_status("cmove-new", "delivered");
    assert_eq!(deliver(&server, "cmove-old", "MOVE", &older).status, 202);
    server.wait_for_status("cmove-old", "stale");
    let routed = wait_for_lines(&server.dir.path().join("project.jsonl"), 1);
    assert_eq!(routed[0]["delivery_id"], "cmove-new");
    assert_eq!(routed[0]["project_id"], "clu8f2m1p000208l4c7ax9d3k");
    assert_eq!(
        routed[0]["entity"],
        "workflow:clu8f2m1p000208l4c7ax9d3k:clu9a7b3c000408jz2e5f6g7h"
    );
    assert_eq!(routed[0]["version"], "2024-05-06T09:20:31Z");
}
