//! One delivery's log lines, found by its delivery id and its request id: the request, the
//! store commit, the gate and every handler attempt (which run in another task), with the
//! request id a proxy sent in `X-Request-Id`, or one labelhook made when there was none or it
//! was unfit.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::*;
use crate::postgres::TestDb;

/// A handler that fails the first attempt at each delivery and succeeds the next.
fn flaky_config(marks: &std::path::Path) -> String {
    base_config(&flaky_handler(marks))
}

/// JSON logs, and the flaky handler routed every label event.
fn flaky_handler(marks: &std::path::Path) -> String {
    format!(
        r#"
[log]
format = "json"

[[handler]]
name = "flaky"
kind = "command"
argv = ["sh", "-c", "m={marks}/$LABELHOOK_DELIVERY_ID; [ -e \"$m\" ] && exit 0; : > \"$m\"; exit 1"]
timeout = "30s"
max_attempts = 5
backoff = "50ms"

[[route]]
topics = ["LABEL_*"]
handlers = ["flaky"]
"#,
        marks = marks.display()
    )
}

/// A signed delivery with any extra headers.
fn deliver_with(server: &TestServer, id: &str, extra: &[&str]) -> Answer {
    let file = body_file(server.dir.path(), &format!("{id}.json"), LABEL_UPDATED);
    let sig = format!("X-Hub-Signature: {}", sha1_sig(SECRET, LABEL_UPDATED));
    let id_header = format!("X-Labelbox-Id: {id}");
    let mut args = vec![
        "-H",
        "Content-Type: application/json",
        "-H",
        "X-Labelbox-Event: LABEL_UPDATED",
        "-H",
        &sig,
        "-H",
        &id_header,
        "--data-binary",
        &file,
    ];
    args.extend_from_slice(extra);
    curl(&server.url("/webhooks/labelbox"), &args)
}

/// The value of `name` in an answer's headers.
fn header(answer: &Answer, name: &str) -> Option<String> {
    answer.headers.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

/// Every value of field `key` on a JSON log line: the event's own fields, and those of the
/// spans it was logged in.
fn field_values<'a>(line: &'a Value, key: &str) -> Vec<&'a str> {
    let mut objects = vec![line];
    if let Some(span) = line.get("span") {
        objects.push(span);
    }
    if let Some(Value::Array(spans)) = line.get("spans") {
        objects.extend(spans);
    }
    objects
        .into_iter()
        .filter_map(|o| o.get(key))
        .filter_map(|v| v.as_str())
        .collect()
}

fn has(line: &Value, key: &str, value: &str) -> bool {
    field_values(line, key).contains(&value)
}

fn message(line: &Value) -> &str {
    line["message"].as_str().unwrap_or_default()
}

/// The lines of the server's log, parsed (each must be JSON).
fn log_lines(server: &TestServer) -> Vec<Value> {
    server
        .logs()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Checks that the lines with `delivery_id` and those with `request_id` are the same lines,
/// and that they tell the whole way: request, commit, gate, a failed attempt, a good one.
fn assert_one_delivery_traced(lines: &[Value], delivery_id: &str, request_id: &str) {
    let by_delivery: BTreeSet<usize> = (0..lines.len())
        .filter(|&i| has(&lines[i], "delivery_id", delivery_id))
        .collect();
    let by_request: BTreeSet<usize> = (0..lines.len())
        .filter(|&i| has(&lines[i], "request_id", request_id))
        .collect();
    let show = |set: &BTreeSet<usize>| {
        set.iter()
            .map(|&i| lines[i].to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        by_delivery,
        by_request,
        "{delivery_id}: lines by delivery id:\n{}\nlines by request id:\n{}",
        show(&by_delivery),
        show(&by_request)
    );
    let found: Vec<&Value> = by_delivery.iter().map(|&i| &lines[i]).collect();
    let with = |text: &str| -> Vec<&Value> {
        found
            .iter()
            .copied()
            .filter(|l| message(l) == text)
            .collect()
    };
    let context = show(&by_delivery);
    assert_eq!(with("request finished").len(), 1, "{context}");
    assert!(has(
        with("request finished")[0],
        "route",
        "/webhooks/{endpoint}"
    ));
    assert_eq!(with("request finished")[0]["status"], 202, "{context}");
    let stored = with("delivery stored");
    assert_eq!(stored.len(), 1, "the store commit: {context}");
    let seq = stored[0]["spans"][0]["seq"].clone();
    assert!(seq.is_u64(), "the request span has the seq: {context}");
    let gated = with("gated");
    assert_eq!(gated.len(), 1, "the gate: {context}");
    assert!(
        has(gated[0], "entity", "label:clv3k9x2a00013b6m8q7h4z1e"),
        "{}",
        gated[0]
    );
    assert_eq!(gated[0]["verdict"], "fresh");
    let failed = with("handler failed; will retry");
    let done = with("handler done");
    assert_eq!((failed.len(), done.len()), (1, 1), "attempts: {context}");
    for (line, attempt) in [(failed[0], 1), (done[0], 2)] {
        assert_eq!(line["span"]["name"], "attempt", "{line}");
        assert_eq!(line["span"]["handler"], "flaky", "{line}");
        assert_eq!(line["span"]["attempt"], attempt, "{line}");
        assert!(has(line, "topic", "LABEL_UPDATED"), "{line}");
        assert!(
            has(line, "entity", "label:clv3k9x2a00013b6m8q7h4z1e"),
            "{line}"
        );
        let dispatch = &line["spans"][0];
        assert_eq!(dispatch["name"], "dispatch", "{line}");
        assert_eq!(dispatch["seq"], seq, "the same delivery: {line}");
    }
}

#[test]
fn one_deliverys_log_lines_are_found_by_its_delivery_id_and_its_request_id() {
    let marks = tempfile::tempdir().expect("temp dir");
    let server = TestServer::start(&flaky_config(marks.path()));

    // A proxy's id is kept and echoed.
    let given = "proxy-7f3a.b_91";
    let from_proxy = deliver_with(
        &server,
        "ctrace0000000000000000001",
        &["-H", &format!("X-Request-Id: {given}")],
    );
    assert_eq!(from_proxy.status, 202, "{}", from_proxy.body);
    assert_eq!(header(&from_proxy, "x-request-id").as_deref(), Some(given));

    // Without one, an id is made and echoed.
    let without = deliver_with(&server, "ctrace0000000000000000002", &[]);
    assert_eq!(without.status, 202, "{}", without.body);
    let made = header(&without, "x-request-id").expect("a request id is made");
    assert_eq!(made.len(), 32, "{made}");
    assert!(made.bytes().all(|b| b.is_ascii_hexdigit()), "{made}");

    // An unfit one (too long; a log line must stay bounded) is replaced, not echoed.
    let too_long = "a".repeat(129);
    let unfit = deliver_with(
        &server,
        "ctrace0000000000000000003",
        &["-H", &format!("X-Request-Id: {too_long}")],
    );
    assert_eq!(unfit.status, 202, "{}", unfit.body);
    let replaced = header(&unfit, "x-request-id").expect("a request id");
    assert_ne!(replaced, too_long);
    assert_eq!(replaced.len(), 32, "{replaced}");

    for id in [
        "ctrace0000000000000000001",
        "ctrace0000000000000000002",
        "ctrace0000000000000000003",
    ] {
        server.wait_for_status(id, "delivered");
    }
    let lines = log_lines(&server);
    assert!(
        !lines.iter().any(|l| l.to_string().contains(&too_long)),
        "the unfit id reached a log line"
    );
    assert_one_delivery_traced(&lines, "ctrace0000000000000000001", given);
    assert_one_delivery_traced(&lines, "ctrace0000000000000000002", &made);
    assert_one_delivery_traced(&lines, "ctrace0000000000000000003", &replaced);

    // A refused request has its id too, on its one line, and in the answer.
    let refused = curl(
        &server.url("/webhooks/labelbox"),
        &[
            "-H",
            "Content-Type: application/json",
            "-H",
            "X-Hub-Signature: sha1=0000000000000000000000000000000000000000",
            "-H",
            "X-Request-Id: refused-1",
            "--data-binary",
            "{}",
        ],
    );
    assert_eq!(refused.status, 401);
    assert_eq!(
        header(&refused, "x-request-id").as_deref(),
        Some("refused-1")
    );
    // Logged before the answer was sent.
    let lines = log_lines(&server);
    let refusal = lines
        .iter()
        .find(|l| message(l) == "delivery refused" && has(l, "request_id", "refused-1"))
        .unwrap_or_else(|| panic!("no refusal line with its request id:\n{}", server.logs()));
    assert_eq!(refusal["outcome"], "signature_mismatch");
}

/// On PostgreSQL too: the request id is kept with the delivery, so the dispatcher's lines (in
/// another task, on whichever replica claims it) carry it.
#[test]
fn on_postgres_one_deliverys_log_lines_are_found_by_its_delivery_id_and_its_request_id() {
    let Some(db) = TestDb::create_blocking(
        "on_postgres_one_deliverys_log_lines_are_found_by_its_delivery_id_and_its_request_id",
    ) else {
        return;
    };
    let marks = tempfile::tempdir().expect("temp dir");
    let server = TestServer::start(&pg_config(&db.url, &flaky_handler(marks.path())));
    let given = "pg-proxy-42";
    let answer = deliver_with(
        &server,
        "ctracepg00000000000000001",
        &["-H", &format!("X-Request-Id: {given}")],
    );
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(header(&answer, "x-request-id").as_deref(), Some(given));
    server.wait_for_status("ctracepg00000000000000001", "delivered");
    assert_one_delivery_traced(&log_lines(&server), "ctracepg00000000000000001", given);
}
