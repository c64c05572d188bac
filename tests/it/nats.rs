//! The `nats` handler against the real binary and this machine's NATS server with JetStream,
//! each test in a stream of its own: fresh events published once each (even across a kill -9
//! during dispatch), stale ones only where a route asks, headers and subjects as documented,
//! bodies too large for a message in the object store.

use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::nats_stream::TestStream;

/// A v1 LABEL_UPDATED body for label `n` at `updated_at`, `padding` bytes of label content.
fn label_body(n: usize, updated_at: &str, padding: usize) -> Vec<u8> {
    let filler = "x".repeat(padding);
    format!(
        r#"{{"id":"clabelnats{n:015}","updatedAt":"{updated_at}","label":"{{\"objects\":[],\"note\":\"{filler}\"}}","project":{{"id":"cprojnats"}},"dataRow":{{"id":"cdrow{n}"}}}}"#
    )
    .into_bytes()
}

/// The server config: LABEL_* to the stream, plus `extra`.
fn nats_config(stream: &TestStream, extra: &str) -> String {
    base_config(&format!(
        r#"
[dispatch]
poll_interval = "100ms"
lease = "2s"

[[handler]]
name = "bus"
kind = "nats"
url = "{url}"
stream = "{stream}"
subject = "{prefix}.{{topic}}.{{project_id}}"

{extra}
"#,
        url = stream.url,
        stream = stream.stream,
        prefix = stream.prefix,
    ))
}

fn wait_for_count(stream: &TestStream, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = stream.count();
        if now >= count {
            return;
        }
        assert!(Instant::now() < deadline, "only {now} of {count} messages");
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

#[test]
fn fresh_events_are_published_once_with_their_headers_and_stale_ones_only_where_asked() {
    let Some(stream) = TestStream::create("nats_fresh_and_stale") else {
        return;
    };
    let server = TestServer::start(&nats_config(
        &stream,
        r#"
[[handler]]
name = "stale-bus"
kind = "log"

[[route]]
topics = ["LABEL_*"]
handlers = ["bus"]
"#,
    ));
    // Label 1 at t2, then its older t1 (stale), then label 2; label 1 at t2 again, from
    // Labelbox's retry with the same id (a duplicate, never handled twice).
    let sends = [
        ("cnats-1", label_body(1, "2026-11-01T10:00:02Z", 0)),
        ("cnats-2", label_body(1, "2026-11-01T10:00:01Z", 0)),
        ("cnats-3", label_body(2, "2026-11-01T10:00:01Z", 0)),
        ("cnats-1", label_body(1, "2026-11-01T10:00:02Z", 0)),
    ];
    for (id, body) in &sends {
        let answer = deliver(&server, id, "LABEL_UPDATED", body);
        assert!(answer.status == 202 || answer.status == 200, "{answer:?}");
    }
    server.wait_for_status("cnats-2", "stale");
    server.wait_for_status("cnats-3", "delivered");
    server.wait_for_status("cnats-1", "delivered");
    wait_for_count(&stream, 2);

    let messages = stream.messages();
    let ids: Vec<&str> = messages
        .iter()
        .filter_map(|m| m.header("Nats-Msg-Id"))
        .collect();
    assert_eq!(ids, ["cnats-1", "cnats-3"], "fresh ones, once each");
    let first = &messages[0];
    assert_eq!(
        first.subject,
        format!("{}.LABEL_UPDATED.cprojnats", stream.prefix)
    );
    assert_eq!(first.header("Labelbox-Topic"), Some("LABEL_UPDATED"));
    assert_eq!(
        first.header("Labelbox-Entity"),
        Some("label:clabelnats000000000000001")
    );
    assert_eq!(
        first.header("Labelbox-Version"),
        Some("2026-11-01T10:00:02Z")
    );
    assert_eq!(first.header("Labelbox-Fresh"), Some("true"));
    assert_eq!(first.header("Labelbox-Project-Id"), Some("cprojnats"));
    assert_eq!(
        first.payload, sends[0].1,
        "the body exactly as Labelbox sent it"
    );
    drop(server);

    // A route that asks for stale events gets them, marked.
    let Some(stale_stream) = TestStream::create("nats_deliver_stale") else {
        return;
    };
    let server = TestServer::start(&nats_config(
        &stale_stream,
        r#"
[[route]]
topics = ["LABEL_*"]
handlers = ["bus"]
deliver_stale = true
"#,
    ));
    deliver(
        &server,
        "cstale-1",
        "LABEL_UPDATED",
        &label_body(1, "2026-11-01T10:00:02Z", 0),
    );
    deliver(
        &server,
        "cstale-2",
        "LABEL_UPDATED",
        &label_body(1, "2026-11-01T10:00:01Z", 0),
    );
    server.wait_for_status("cstale-2", "stale");
    wait_for_count(&stale_stream, 2);
    let messages = stale_stream.messages();
    let marks: Vec<(Option<&str>, Option<&str>)> = messages
        .iter()
        .map(|m| (m.header("Nats-Msg-Id"), m.header("Labelbox-Fresh")))
        .collect();
    assert_eq!(
        marks,
        [
            (Some("cstale-1"), Some("true")),
            (Some("cstale-2"), Some("false"))
        ]
    );
}

#[test]
fn a_kill_9_between_publish_and_record_publishes_again_and_the_stream_keeps_one() {
    let Some(stream) = TestStream::create("nats_kill_9") else {
        return;
    };
    // Each delivery also goes to a command that blocks until the marker file exists, so its
    // attempts (the publish included) are not recorded when the server is killed: after the
    // restart they run again, and the publish is repeated with the same Nats-Msg-Id.
    let dir = tempfile::tempdir().expect("temp");
    let marker = dir.path().join("restarted");
    let config = nats_config(
        &stream,
        &format!(
            r#"
[[handler]]
name = "blocker"
kind = "command"
argv = ["sh", "-c", "while [ ! -e {marker} ]; do sleep 0.05; done"]
timeout = "60s"

[[route]]
topics = ["LABEL_*"]
handlers = ["bus", "blocker"]
"#,
            marker = marker.display()
        ),
    );
    let mut server = TestServer::start(&config);
    let count = 12;
    for n in 0..count {
        let body = label_body(n, "2026-11-01T10:00:00Z", 0);
        let answer = deliver(&server, &format!("ckill-{n}"), "LABEL_UPDATED", &body);
        assert_eq!(answer.status, 202, "{answer:?}");
    }
    // Published, but not recorded: the blocker holds every delivery.
    wait_for_count(&stream, count as u64);
    assert!(server.events().iter().all(|e| e["status"] == "pending"));
    server.kill9();
    std::fs::write(&marker, b"").expect("marker");
    server.restart();
    for n in 0..count {
        server.wait_for_status(&format!("ckill-{n}"), "delivered");
    }
    assert_eq!(stream.count(), count as u64, "one message per delivery");
    let ids: Vec<String> = stream
        .messages()
        .iter()
        .filter_map(|m| m.header("Nats-Msg-Id").map(str::to_owned))
        .collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(ids.len(), count, "published again, kept once: {ids:?}");
    assert_eq!(unique.len(), count);
}

#[test]
fn a_body_larger_than_a_message_goes_to_the_object_store() {
    let Some(stream) = TestStream::create("nats_large_body") else {
        return;
    };
    let server = TestServer::start(&nats_config(
        &stream,
        r#"
[[route]]
topics = ["LABEL_*"]
handlers = ["bus"]
"#,
    ));
    // Over the server's 1 MiB max_payload.
    let body = label_body(7, "2026-11-01T10:00:00Z", 3 * 1024 * 1024);
    assert_eq!(
        deliver(&server, "cbig-1", "LABEL_UPDATED", &body).status,
        202
    );
    server.wait_for_status("cbig-1", "delivered");
    let messages = stream.messages();
    assert_eq!(messages.len(), 1);
    let pointer: serde_json::Value =
        serde_json::from_slice(&messages[0].payload).expect("a JSON pointer");
    let bucket = pointer["object_store"]["bucket"].as_str().expect("bucket");
    let object = pointer["object_store"]["object"].as_str().expect("object");
    assert_eq!(pointer["object_store"]["size"], body.len());
    assert_eq!(
        messages[0].header("Labelbox-Body-Object"),
        Some(format!("{bucket}/{object}").as_str())
    );
    assert!(stream.object(bucket, object) == body, "the body, whole");
}

#[test]
fn check_config_accepts_a_nats_handler_and_names_every_bad_key() {
    let dir = tempfile::tempdir().expect("temp");
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        base_config(
            r#"
[[handler]]
name = "bus"
kind = "nats"
url = "nats://app@127.0.0.1:4222"
stream = "LABELBOX"
subject = "labelbox.{topic}.{project_id}.{entity}"
user = "app"
password = { value = "nats-password" }

[[route]]
topics = ["LABEL_*"]
handlers = ["bus"]
"#,
        )
        .replace("STORE_DIR", &dir.path().display().to_string()),
    )
    .expect("write");
    let ok = std::process::Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&good)
        .env("LH_TEST_SECRET", SECRET)
        .output()
        .expect("run");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(!String::from_utf8_lossy(&ok.stdout).contains("nats-password"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        base_config(
            r#"
[[handler]]
name = "bus"
kind = "nats"
url = "http://127.0.0.1:4222"
stream = "has.dots"
subject = "labelbox.x{topic}"
token = { value = "nats-token" }
user = "app"
"#,
        )
        .replace("STORE_DIR", &dir.path().display().to_string()),
    )
    .expect("write");
    let out = std::process::Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&bad)
        .env("LH_TEST_SECRET", SECRET)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "handler[0].url",
        "handler[0].stream",
        "handler[0].subject",
        "handler[0].token",
        "handler[0].password",
    ] {
        assert!(stderr.contains(key), "{key} not named in:\n{stderr}");
    }
    assert!(!stderr.contains("nats-token"), "{stderr}");
}
