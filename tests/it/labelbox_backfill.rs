//! `labelhook labelbox backfill` against the stand-in, beside a running `labelhook serve`
//! whose file and command handlers say what they were handed.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use std::process::Output;

use crate::helpers::*;
use crate::labelbox::*;
use crate::labelbox_standin::rows::{line, Label};
use crate::labelbox_standin::StandIn;
use crate::labelbox_standin::API_KEY;

/// serve's handlers: every event to a file, and its origin (from the command handler's
/// environment) to another.
const HANDLERS: &str = r#"
[[handler]]
name = "archive"
kind = "file"
path = "STORE_DIR/events.jsonl"

[[handler]]
name = "origin"
kind = "command"
argv = ["sh", "-c", "echo \"$LABELHOOK_ORIGIN $LABELHOOK_DELIVERY_ID\" >> STORE_DIR/origins.txt"]

[[route]]
topics = ["LABEL_*", "WORKFLOW_ACTION"]
handlers = ["archive", "origin"]

[dispatch]
poll_interval = "50ms"
"#;

const SINCE: &str = "2024-05-01T00:00:00Z";

/// D1: L1 (updated after it was made), L2 (never updated), a workflow step; D2: L3.
fn two_rows(standin: &StandIn) {
    standin.with(|s| {
        s.add_project(PROJECT, "standin project");
        s.put_row(
            PROJECT,
            "cdrow1",
            line(
                PROJECT,
                "cdrow1",
                "2024-05-03T10:00:00Z",
                &[
                    Label {
                        id: "clab1",
                        created_at: "2024-05-01T09:00:00Z",
                        updated_at: "2024-05-03T09:00:00Z",
                        mark: "one",
                    },
                    Label {
                        id: "clab2",
                        created_at: "2024-05-02T08:00:00Z",
                        updated_at: "2024-05-02T08:00:00Z",
                        mark: "two",
                    },
                ],
                Some(("Approve", "2024-05-03T10:00:00Z")),
            ),
        );
        s.put_row(
            PROJECT,
            "cdrow2",
            line(
                PROJECT,
                "cdrow2",
                "2024-05-03T11:00:00Z",
                &[Label {
                    id: "clab3",
                    created_at: "2024-05-03T11:00:00Z",
                    updated_at: "2024-05-03T11:00:00Z",
                    mark: "three",
                }],
                None,
            ),
        );
    });
}

/// What `two_rows` rebuilds as v1 deliveries.
const REBUILT: [&str; 4] = [
    "backfill:label:clab1@2024-05-03T09:00:00Z",
    "backfill:label:clab2@2024-05-02T08:00:00Z",
    "backfill:workflow:cprojectstandin0000000001:cdrow1@2024-05-03T10:00:00Z",
    "backfill:label:clab3@2024-05-03T11:00:00Z",
];

fn serve(standin: &StandIn, extra: &str) -> TestServer {
    TestServer::start(&base_config(&format!(
        "{HANDLERS}\n{}",
        labelbox_section(standin, extra)
    )))
}

fn backfill(server: &TestServer, args: &[&str]) -> Output {
    let mut all = vec!["labelbox", "backfill", "--project", PROJECT];
    all.extend_from_slice(args);
    labelhook(&server.config_path, &all, API_KEY)
}

/// The file handler's lines, by delivery id (each id with how many lines it got).
fn handed_on(server: &TestServer) -> BTreeMap<String, Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(server.dir.path().join("events.jsonl")).unwrap_or_default();
    let mut by_id: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for line in text.lines() {
        let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        let id = value["delivery_id"].as_str().unwrap_or_default().to_owned();
        by_id.entry(id).or_default().push(value);
    }
    by_id
}

/// Waits (bounded) until every delivery in `ids` has a final status, and returns them.
fn settled(server: &TestServer, ids: &[&str]) -> BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let statuses: BTreeMap<String, String> = server
            .events()
            .into_iter()
            .map(|e| {
                (
                    e["delivery_id"].as_str().unwrap_or_default().to_owned(),
                    e["status"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let done = ids.iter().all(|id| {
            matches!(
                statuses.get(*id).map(String::as_str),
                Some("delivered" | "stale" | "dead")
            )
        });
        if done {
            return statuses;
        }
        assert!(
            Instant::now() < deadline,
            "not settled: {statuses:?}\n{}",
            server.logs()
        );
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

/// A v1 label delivery as Labelbox would send it.
fn v1_label(label: &str, data_row: &str, updated_at: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{label}","createdAt":"2024-05-01T09:00:00Z","updatedAt":"{updated_at}","label":"{{\"objects\":[]}}","deleted":false,"project":{{"id":"{PROJECT}"}},"dataRow":{{"id":"{data_row}"}},"user":{{"email":"labeler@example.com"}}}}"#
    )
    .into_bytes()
}

#[test]
fn a_backfill_hands_each_missed_event_on_once_marked_as_a_backfill_across_chunk_cuts() {
    let standin = StandIn::start();
    two_rows(&standin);
    // Chunks far smaller than a line: every line is cut at least once.
    standin.with(|s| {
        s.chunk_bytes = 150;
        s.polls_before_done = 2;
    });
    let server = serve(&standin, "");
    let out = backfill(&server, &["--since", SINCE]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    assert!(
        stdout(&out).contains("4 new deliveries stored, 0 stored already"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("backfill: 2 rows"),
        "the progress: {}",
        stderr(&out)
    );

    let statuses = settled(&server, &REBUILT);
    assert!(
        REBUILT.iter().all(|id| statuses[*id] == "delivered"),
        "{statuses:?}"
    );
    let lines = handed_on(&server);
    for id in REBUILT {
        assert_eq!(
            lines.get(id).map(Vec::len),
            Some(1),
            "{id} handed on once: {lines:?}"
        );
        assert_eq!(lines[id][0]["origin"], "backfill", "{id}");
    }
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[REBUILT[1]][0]["topic"], "LABEL_CREATED");
    assert_eq!(lines[REBUILT[0]][0]["topic"], "LABEL_UPDATED");
    assert_eq!(lines[REBUILT[2]][0]["topic"], "WORKFLOW_ACTION");
    // The label's annotations came through the chunk cuts whole.
    let body = &lines[REBUILT[0]][0]["body"];
    assert!(
        body["label"]
            .as_str()
            .unwrap_or_default()
            .contains("\"one\""),
        "{body}"
    );
    // The command handler saw the origin in its environment; `events list` shows it too.
    let origins = std::fs::read_to_string(server.dir.path().join("origins.txt")).expect("origins");
    assert_eq!(
        origins
            .lines()
            .filter(|l| l.starts_with("backfill backfill:"))
            .count(),
        4,
        "{origins}"
    );
    let listed = server.events();
    assert!(
        listed.iter().all(|e| e["origin"] == "backfill"),
        "{listed:?}"
    );
    // So does the console, in its list and on the delivery's page.
    let list = curl(&server.admin("/ui/deliveries"), &[]).body;
    assert_eq!(
        list.matches(r#"class="badge backfill""#).count(),
        4,
        "{list}"
    );
    let one = curl(
        &server.admin("/ui/delivery?id=backfill:label:clab2@2024-05-02T08:00:00Z"),
        &[],
    )
    .body;
    assert!(
        one.contains("rebuilt from Labelbox&#39;s export")
            || one.contains("rebuilt from Labelbox's export"),
        "{one}"
    );
    let text = stdout(&server.cli(&["events", "list"]));
    assert!(
        text.lines().next().unwrap_or_default().ends_with("ORIGIN"),
        "{text}"
    );

    // The signed chunk URLs were fetched without the API key.
    let gets = standin.with(|s| s.chunk_gets.clone());
    assert!(gets.len() > 10, "{gets:?}");
    assert!(
        gets.iter().all(|g| !g.had_authorization && g.signed),
        "{gets:?}"
    );
    // The export asked for what changed since the start, in the SDK's form.
    assert_eq!(
        standin.with(|s| s.export_filters.clone()),
        ["2024-05-01 00:00:00"]
    );
}

#[test]
fn running_the_same_backfill_again_changes_nothing() {
    let standin = StandIn::start();
    two_rows(&standin);
    let server = serve(&standin, "");
    assert_eq!(
        backfill(&server, &["--since", SINCE]).status.code(),
        Some(0)
    );
    settled(&server, &REBUILT);
    let before = server.events().len();

    // The export's signed URLs differ at every export: a new body, the same delivery.
    standin.with(|s| {
        for row in &mut s.projects.get_mut(PROJECT).expect("project").rows {
            row.line = row.line.replace("changes-every-export", "changed-again");
        }
    });
    let again = backfill(&server, &["--since", SINCE]);
    assert_eq!(
        again.status.code(),
        Some(3),
        "nothing to do: {}",
        output_text(&again)
    );
    assert!(
        stdout(&again).contains("0 new deliveries stored, 4 stored already"),
        "{}",
        stdout(&again)
    );
    assert_eq!(server.events().len(), before);
    let lines = handed_on(&server);
    assert!(lines.values().all(|l| l.len() == 1), "{lines:?}");
}

#[test]
fn an_export_row_older_than_a_webhook_is_stale_and_not_handed_on() {
    let standin = StandIn::start();
    two_rows(&standin);
    let server = serve(&standin, "");
    // Webhooks came for clab1 after the exported version, and for clab3 at the same version.
    let newer = v1_label("clab1", "cdrow1", "2024-05-03T09:30:00Z");
    assert_eq!(
        deliver(
            &server,
            "cwebhook00000000000000001",
            "LABEL_UPDATED",
            &newer
        )
        .status,
        202
    );
    // The same kind at the same version: a webhook's re-delivery would be applied again (rule
    // 4), a backfill's is not (rule 7).
    let same = v1_label("clab3", "cdrow2", "2024-05-03T11:00:00Z");
    assert_eq!(
        deliver(&server, "cwebhook00000000000000003", "LABEL_CREATED", &same).status,
        202
    );
    server.wait_for_status("cwebhook00000000000000001", "delivered");
    server.wait_for_status("cwebhook00000000000000003", "delivered");

    assert_eq!(
        backfill(&server, &["--since", SINCE]).status.code(),
        Some(0)
    );
    let statuses = settled(&server, &REBUILT);
    assert_eq!(statuses[REBUILT[0]], "stale", "older than the webhook's");
    assert_eq!(
        statuses[REBUILT[3]], "stale",
        "the same version a webhook brought"
    );
    assert_eq!(statuses[REBUILT[1]], "delivered");
    let lines = handed_on(&server);
    assert!(
        !lines.contains_key(REBUILT[0]) && !lines.contains_key(REBUILT[3]),
        "{lines:?}"
    );
    assert!(lines.contains_key(REBUILT[1]));
}

#[test]
fn a_label_deleted_while_down_becomes_a_delete() {
    let standin = StandIn::start();
    two_rows(&standin);
    let server = serve(&standin, "");
    // Before the outage, cdrow1 had a label the export no longer lists.
    let gone = v1_label("clab9", "cdrow1", "2024-05-01T12:00:00Z");
    assert_eq!(
        deliver(&server, "cwebhook00000000000000009", "LABEL_CREATED", &gone).status,
        202
    );
    server.wait_for_status("cwebhook00000000000000009", "delivered");

    let out = backfill(&server, &["--since", SINCE]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let delete = "backfill:label:clab9@deleted";
    let statuses = settled(&server, &[delete]);
    assert_eq!(statuses[delete], "delivered");
    let lines = handed_on(&server);
    let line = &lines[delete][0];
    assert_eq!(line["topic"], "LABEL_DELETED");
    assert_eq!(line["entity"], "label:clab9");
    assert_eq!(line["body"]["deleted"], true);
    // Dated at the data row's last activity: after everything known of the label.
    assert_eq!(line["version"], "2024-05-03T10:00:00Z");
}

#[test]
fn an_interrupted_backfill_run_again_stores_the_rest_and_nothing_twice() {
    let standin = StandIn::start();
    standin.with(|s| {
        s.add_project(PROJECT, "standin project");
        for n in 0..30 {
            let row = format!("cdrow{n:02}");
            let label = format!("clab{n:02}");
            s.put_row(
                PROJECT,
                &row,
                line(
                    PROJECT,
                    &row,
                    "2024-05-03T10:00:00Z",
                    &[Label {
                        id: &label,
                        created_at: "2024-05-02T00:00:00Z",
                        updated_at: "2024-05-03T10:00:00Z",
                        mark: "m",
                    }],
                    None,
                ),
            );
        }
        s.chunk_bytes = 2048;
        // The eighth chunk never comes: the run is stopped while it waits for it.
        s.hold_chunk_at = Some(7 * 2048);
    });
    let server = serve(&standin, "");
    let mut first = std::process::Command::new(bin())
        .args([
            "labelbox",
            "backfill",
            "--project",
            PROJECT,
            "--since",
            SINCE,
            "--config",
        ])
        .arg(&server.config_path)
        .env("LH_TEST_SECRET", SECRET)
        .env(KEY_ENV, API_KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn backfill");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !standin.with(|s| s.held_chunk_asked) {
        assert!(
            Instant::now() < deadline,
            "the held chunk was never asked for"
        );
        std::thread::park_timeout(Duration::from_millis(20));
    }
    first.kill().expect("kill");
    first.wait().expect("wait");
    let stored_first = server.events().len();
    assert!(
        stored_first > 0 && stored_first < 30,
        "{stored_first} stored before the interruption"
    );

    standin.with(|s| s.hold_chunk_at = None);
    let again = backfill(&server, &["--since", SINCE]);
    assert_eq!(again.status.code(), Some(0), "{}", output_text(&again));
    assert!(
        stdout(&again).contains(&format!(
            "{} new deliveries stored, {stored_first} stored already",
            30 - stored_first
        )),
        "{}",
        stdout(&again)
    );
    let ids: Vec<String> = (0..30)
        .map(|n| format!("backfill:label:clab{n:02}@2024-05-03T10:00:00Z"))
        .collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    settled(&server, &refs);
    let listed = server.events();
    assert_eq!(listed.len(), 30, "each stored once");
    let lines = handed_on(&server);
    assert!(
        ids.iter().all(|id| lines.get(id).map(Vec::len) == Some(1)),
        "{lines:?}"
    );
}

#[test]
fn since_last_seen_starts_from_the_newest_webhook_less_the_margin() {
    let standin = StandIn::start();
    two_rows(&standin);
    let server = serve(&standin, "since_last_seen_margin = \"1h\"");
    let never = backfill(&server, &["--since-last-seen"]);
    assert_eq!(never.status.code(), Some(1));
    assert!(
        stderr(&never).contains("no delivery of project"),
        "{}",
        stderr(&never)
    );

    let body = v1_label("clab1", "cdrow1", "2024-05-03T09:30:00Z");
    assert_eq!(
        deliver(&server, "cwebhook00000000000000001", "LABEL_UPDATED", &body).status,
        202
    );
    server.wait_for_status("cwebhook00000000000000001", "delivered");
    let received = server.events()[0]["received_at"]
        .as_str()
        .expect("received_at")
        .to_owned();
    let received =
        time::OffsetDateTime::parse(&received, &time::format_description::well_known::Rfc3339)
            .expect("time");

    let out = backfill(&server, &["--since-last-seen"]);
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{}",
        output_text(&out)
    );
    let start = received - time::Duration::hours(1);
    let expected = format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        start.year(),
        u8::from(start.month()),
        start.day(),
        start.hour(),
        start.minute(),
        start.second()
    );
    assert_eq!(standin.with(|s| s.export_filters.clone()), [expected]);
}

#[test]
fn an_empty_export_is_nothing_to_do_and_a_failed_task_or_a_missing_project_is_an_error() {
    let standin = StandIn::start();
    two_rows(&standin);
    let section = labelbox_section(&standin, "").replace(
        "export_poll_interval = \"20ms\"",
        "export_poll_interval = \"150ms\"",
    );
    let server = TestServer::start(&base_config(&format!("{HANDLERS}\n{section}")));
    standin.with(|s| s.polls_before_done = 3);
    let empty = backfill(&server, &["--since", "2030-01-01"]);
    assert_eq!(empty.status.code(), Some(3), "{}", output_text(&empty));
    assert!(
        stdout(&empty).contains("nothing to do"),
        "{}",
        stdout(&empty)
    );
    // Polled no faster than the configured interval.
    let polls = standin.with(|s| s.polls.clone());
    assert_eq!(polls.len(), 4);
    assert!(
        polls
            .windows(2)
            .all(|w| w[1] - w[0] >= Duration::from_millis(150)),
        "{polls:?}"
    );

    standin.with(|s| {
        s.polls_before_done = 0;
        s.fail_next_export = Some("export ran out of time".to_owned());
    });
    let failed = backfill(&server, &["--since", SINCE]);
    let (status, text) = code(&failed);
    assert_eq!(status, Some(1), "{text}");
    assert!(
        text.contains("the export task")
            && text.contains("failed")
            && text.contains("export ran out of time"),
        "{text}"
    );

    let missing = labelhook(
        &server.config_path,
        &[
            "labelbox",
            "backfill",
            "--project",
            "cnosuchproject",
            "--since",
            SINCE,
        ],
        API_KEY,
    );
    let (status, text) = code(&missing);
    assert_eq!(status, Some(1), "{text}");
    assert!(
        text.contains("project cnosuchproject does not exist"),
        "{text}"
    );
    assert!(server.events().is_empty());
}

#[test]
fn export_shaped_users_get_each_data_rows_snapshot() {
    let standin = StandIn::start();
    two_rows(&standin);
    let server = serve(&standin, "backfill_payload = \"export\"");
    assert_eq!(
        backfill(&server, &["--since", SINCE]).status.code(),
        Some(0)
    );
    let snapshots = [
        "backfill:labels:cprojectstandin0000000001:cdrow1@2024-05-03T10:00:00Z",
        "backfill:labels:cprojectstandin0000000001:cdrow2@2024-05-03T11:00:00Z",
    ];
    settled(&server, &snapshots);
    let lines = handed_on(&server);
    let first = &lines[snapshots[0]][0];
    assert_eq!(first["topic"], "LABEL_CREATED");
    assert_eq!(first["body"]["data_row"]["id"], "cdrow1");
    assert_eq!(
        first["body"]["projects"][PROJECT]["labels"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
}
