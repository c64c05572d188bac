//! Every row of the answer table in README.md's "Answers" section, against the real binary.

use crate::helpers::*;

fn post(server: &TestServer, headers: &[String], body: &[u8]) -> Answer {
    let file = body_file(server.dir.path(), "post.json", body);
    let mut args: Vec<&str> = Vec::new();
    for h in headers {
        args.push("-H");
        args.push(h);
    }
    args.push("--data-binary");
    args.push(&file);
    curl(&server.url("/webhooks/labelbox"), &args)
}

fn signed_headers(id: &str, sig_header: &str, sig: &str) -> Vec<String> {
    vec![
        "Content-Type: application/json".to_owned(),
        "X-Labelbox-Event: LABEL_UPDATED".to_owned(),
        format!("X-Labelbox-Id: {id}"),
        format!("{sig_header}: {sig}"),
    ]
}

fn stored_ids(server: &TestServer) -> Vec<String> {
    server
        .events()
        .iter()
        .map(|e| e["delivery_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn new_delivery_is_accepted_then_its_duplicate_is_answered_200_without_a_second_copy() {
    let server = TestServer::with_base("");
    let first = deliver(
        &server,
        "cdup00000000000000000001",
        "LABEL_UPDATED",
        LABEL_UPDATED,
    );
    assert_eq!(first.status, 202, "{}", first.body);
    assert!(
        first.body.contains(r#""status":"accepted""#),
        "{}",
        first.body
    );
    let again = deliver(
        &server,
        "cdup00000000000000000001",
        "LABEL_UPDATED",
        LABEL_UPDATED,
    );
    assert_eq!(again.status, 200, "{}", again.body);
    assert!(
        again.body.contains(r#""status":"duplicate""#),
        "{}",
        again.body
    );
    assert_eq!(stored_ids(&server), vec!["cdup00000000000000000001"]);
}

#[test]
fn same_id_with_another_body_is_kept_as_its_own_flagged_delivery() {
    let server = TestServer::with_base("");
    let id = "cconflict000000000000001";
    assert_eq!(
        deliver(&server, id, "LABEL_UPDATED", LABEL_UPDATED).status,
        202
    );
    let other = br#"{"id":"clabel","updatedAt":"2026-01-01T00:00:00Z"}"#;
    assert_eq!(deliver(&server, id, "LABEL_UPDATED", other).status, 202);
    let events = server.events();
    assert_eq!(events.len(), 2);
    let flagged: Vec<bool> = events.iter().map(|e| e["id_conflict"] == true).collect();
    assert_eq!(flagged, vec![true, false], "newest first: {events:?}");
}

#[test]
fn missing_delivery_id_is_derived_from_the_body_hash() {
    let server = TestServer::with_base("");
    let sig = sha1_sig(SECRET, LABEL_UPDATED);
    let headers = vec![
        "Content-Type: application/json".to_owned(),
        "X-Labelbox-Event: LABEL_UPDATED".to_owned(),
        format!("X-Hub-Signature: {sig}"),
    ];
    let answer = post(&server, &headers, LABEL_UPDATED);
    assert_eq!(answer.status, 202, "{}", answer.body);
    let expected: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(LABEL_UPDATED).into();
    assert_eq!(stored_ids(&server), vec![hex::encode(expected)]);
    // The same body again is the same delivery.
    assert_eq!(post(&server, &headers, LABEL_UPDATED).status, 200);
}

#[test]
fn signatures_sha1_sha256_and_a_rotated_secret_are_accepted() {
    let server = TestServer::with_base("");
    let cases = [
        (
            "csig000000000000000000001",
            "X-Hub-Signature",
            sha1_sig(SECRET, LABEL_UPDATED),
        ),
        (
            "csig000000000000000000002",
            "X-Hub-Signature-256",
            sha256_sig(SECRET, LABEL_UPDATED),
        ),
        (
            "csig000000000000000000003",
            "X-Hub-Signature",
            sha1_sig(ROTATED_SECRET, LABEL_UPDATED),
        ),
        (
            "csig000000000000000000004",
            "X-Hub-Signature-256",
            sha256_sig(ROTATED_SECRET, LABEL_UPDATED),
        ),
    ];
    for (id, header, sig) in &cases {
        let answer = post(&server, &signed_headers(id, header, sig), LABEL_UPDATED);
        assert_eq!(answer.status, 202, "{header} {id}: {}", answer.body);
    }
    assert_eq!(server.events().len(), 4);
}

#[test]
fn missing_malformed_or_wrong_signatures_get_401_and_store_nothing() {
    let server = TestServer::with_base("");
    let good_sha1 = sha1_sig(SECRET, LABEL_UPDATED);
    let mut tampered = LABEL_UPDATED.to_vec();
    tampered[10] ^= 0x01;
    let cases: Vec<(Vec<String>, &[u8], &str)> = vec![
        (
            vec![
                "Content-Type: application/json".to_owned(),
                "X-Labelbox-Event: LABEL_UPDATED".to_owned(),
            ],
            LABEL_UPDATED,
            "signature missing",
        ),
        (
            signed_headers("cbad1", "X-Hub-Signature", "sha1=nothex"),
            LABEL_UPDATED,
            "signature malformed",
        ),
        (
            signed_headers(
                "cbad2",
                "X-Hub-Signature",
                &sha1_sig("wrong", LABEL_UPDATED),
            ),
            LABEL_UPDATED,
            "signature mismatch",
        ),
        (
            signed_headers("cbad3", "X-Hub-Signature", &good_sha1),
            &tampered,
            "signature mismatch",
        ),
        (
            // A good SHA-1 does not rescue a wrong SHA-256: the stronger header wins.
            {
                let mut h = signed_headers(
                    "cbad4",
                    "X-Hub-Signature-256",
                    &sha256_sig("wrong", LABEL_UPDATED),
                );
                h.push(format!("X-Hub-Signature: {good_sha1}"));
                h
            },
            LABEL_UPDATED,
            "signature mismatch",
        ),
    ];
    for (headers, body, message) in &cases {
        let answer = post(&server, headers, body);
        assert_eq!(answer.status, 401, "{headers:?}: {}", answer.body);
        // A mismatch says its two usual causes, and nothing of the configuration.
        let expected = if *message == "signature mismatch" {
            format!(
                r#"{{"error":"{message}","hint":"signed with another secret, or the body changed after signing (send the exact bytes: curl --data-binary @file, not -d)"}}"#
            )
        } else {
            format!(r#"{{"error":"{message}"}}"#)
        };
        assert_eq!(answer.body, expected);
        // Nothing secret or signature-like comes back.
        assert!(!answer.body.contains(&good_sha1[5..]));
        assert!(!answer.body.contains(SECRET));
    }
    assert!(stored_ids(&server).is_empty());
    // The operator's log line says where to look: the endpoint's secrets, or the body's way.
    let mismatches: Vec<serde_json::Value> = refusals(&server)
        .into_iter()
        .filter(|line| line["outcome"] == "signature_mismatch")
        .collect();
    assert_eq!(mismatches.len(), 3);
    for line in &mismatches {
        let hint = line["hint"].as_str().unwrap_or_default();
        assert!(hint.contains("this endpoint's secrets"), "{line}");
        assert!(hint.contains("--data-binary"), "{line}");
    }
    let logs = server.logs();
    assert!(!logs.contains(SECRET) && !logs.contains(ROTATED_SECRET));
    assert!(
        !logs.contains(&good_sha1[5..]),
        "a signature reached the log"
    );
}

#[test]
fn source_address_outside_the_allowlist_gets_403() {
    let server = TestServer::start(&base_config("").replace(
        r#"allowlist = ["127.0.0.1/32"]"#,
        r#"allowlist = ["35.223.142.181/32"]"#,
    ));
    let answer = deliver(
        &server,
        "cip0000000000000000000001",
        "LABEL_UPDATED",
        LABEL_UPDATED,
    );
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert_eq!(answer.body, r#"{"error":"source address not allowed"}"#);
    // Without a trusted proxy, a forwarded header cannot talk its way in.
    let file = body_file(server.dir.path(), "b.json", LABEL_UPDATED);
    let sig = format!("X-Hub-Signature: {}", sha1_sig(SECRET, LABEL_UPDATED));
    let answer = curl(
        &server.url("/webhooks/labelbox"),
        &[
            "-H",
            "Content-Type: application/json",
            "-H",
            "X-Labelbox-Event: LABEL_UPDATED",
            "-H",
            "X-Forwarded-For: 35.223.142.181",
            "-H",
            "Forwarded: for=35.223.142.181",
            "-H",
            &sig,
            "--data-binary",
            &file,
        ],
    );
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert_eq!(answer.body, r#"{"error":"source address not allowed"}"#);
    assert!(stored_ids(&server).is_empty());

    // The answer names no configuration key (whoever is refused cannot change it); the log
    // line, the operator's, names the address and the key to change: the allowlist, or, for a
    // request that came with a forwarding header from a peer that is not a trusted proxy,
    // trusted_proxies.
    let hints: Vec<(String, String)> = refusals(&server)
        .into_iter()
        .map(|line| (line["client"].to_string(), line["hint"].to_string()))
        .collect();
    assert_eq!(hints.len(), 2, "{hints:?}");
    assert_eq!(hints[0].0, "\"127.0.0.1\"");
    assert!(
        hints[0].1.contains("add the address to network.allowlist"),
        "{hints:?}"
    );
    assert!(
        hints[1]
            .1
            .contains("its peer is not in network.trusted_proxies"),
        "{hints:?}"
    );
}

/// The `delivery refused` log lines, parsed, in order.
fn refusals(server: &TestServer) -> Vec<serde_json::Value> {
    server
        .logs()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "delivery refused")
        .collect()
}

#[test]
fn behind_a_trusted_proxy_the_rightmost_untrusted_forwarded_address_is_the_client() {
    let config = base_config("").replace(
        r#"allowlist = ["127.0.0.1/32"]"#,
        "allowlist = [\"35.223.142.181/32\"]\ntrusted_proxies = [\"127.0.0.0/8\", \"10.0.0.0/8\"]",
    );
    let server = TestServer::start(&config);
    let file = body_file(server.dir.path(), "b.json", LABEL_UPDATED);
    let sig = format!("X-Hub-Signature: {}", sha1_sig(SECRET, LABEL_UPDATED));
    let send = |id: &str, xff: &str| {
        let id_header = format!("X-Labelbox-Id: {id}");
        let xff = format!("X-Forwarded-For: {xff}");
        curl(
            &server.url("/webhooks/labelbox"),
            &[
                "-H",
                "Content-Type: application/json",
                "-H",
                "X-Labelbox-Event: LABEL_UPDATED",
                "-H",
                &id_header,
                "-H",
                &xff,
                "-H",
                &sig,
                "--data-binary",
                &file,
            ],
        )
    };
    assert_eq!(send("cproxy1", "35.223.142.181").status, 202);
    assert_eq!(send("cproxy2", "35.223.142.181, 10.1.2.3").status, 202);
    // A spoofed allowed address on the left does not help an outside client.
    assert_eq!(send("cproxy3", "35.223.142.181, 198.51.100.7").status, 403);
    assert_eq!(send("cproxy4", "198.51.100.7").status, 403);
    let mut ids = stored_ids(&server);
    ids.sort();
    assert_eq!(ids, vec!["cproxy1", "cproxy2"]);
    let shown = server.cli(&["events", "show", "cproxy1"]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("client_ip:   35.223.142.181"));
}

/// Issue 22, fault 4: on a dual-stack listener an IPv4 client's address is `::ffff:a.b.c.d`,
/// which the ingress turns into `a.b.c.d` before checking it. An allowlist or trusted-proxy
/// entry written in the mapped form was compared as it was written and never matched (403,
/// while `check-config` said ok); such entries are now the IPv4 networks they stand for.
#[test]
fn ipv4_mapped_allowlist_and_proxy_entries_match_their_ipv4_clients_on_a_dual_stack_listener() {
    let dual_stack = |network: &str| {
        base_config("")
            .replace("listen = \"127.0.0.1:0\"", "listen = \"[::]:0\"")
            .replace(r#"allowlist = ["127.0.0.1/32"]"#, network)
    };
    let send = |server: &TestServer, id: &str, extra: &[&str]| {
        // To 127.0.0.1 (not the [::] of the listening line): an IPv4 client.
        let port = server.base_url.rsplit(':').next().expect("a port");
        let url = format!("http://127.0.0.1:{port}/webhooks/labelbox");
        post_signed_to(
            &url,
            server.dir.path(),
            id,
            "LABEL_UPDATED",
            LABEL_UPDATED,
            extra,
        )
    };
    let server = TestServer::start(&dual_stack(r#"allowlist = ["::ffff:127.0.0.1/128"]"#));
    let answer = send(&server, "cmapped1", &[]);
    assert_eq!(answer.status, 202, "{answer:?}");
    let check = server.cli(&["check-config"]);
    assert!(check.status.success(), "{}", output_text(&check));

    let server = TestServer::start(&dual_stack(
        "allowlist = [\"35.223.142.181/32\"]\ntrusted_proxies = [\"::ffff:127.0.0.0/104\"]",
    ));
    let forwarded = send(
        &server,
        "cmapped2",
        &["-H", "X-Forwarded-For: 35.223.142.181"],
    );
    assert_eq!(forwarded.status, 202, "{forwarded:?}");
    let outside = send(
        &server,
        "cmapped3",
        &["-H", "X-Forwarded-For: 198.51.100.7"],
    );
    assert_eq!(outside.status, 403, "{outside:?}");
    assert_eq!(stored_ids(&server), vec!["cmapped2"]);
}

#[test]
fn bodies_over_the_limit_get_413_whether_declared_or_streamed() {
    let server = TestServer::start(&base_config("").replace(
        "body_timeout = \"30s\"",
        "body_timeout = \"30s\"\nmax_body_bytes = 1000",
    ));
    assert!(LABEL_UPDATED.len() > 1000);
    let declared = deliver(&server, "cbig1", "LABEL_UPDATED", LABEL_UPDATED);
    assert_eq!(declared.status, 413, "{}", declared.body);
    assert_eq!(declared.body, r#"{"error":"body too large"}"#);
    // Chunked: no Content-Length, so the limit is found while streaming.
    let streamed = deliver_chunked(&server, "cbig2", LABEL_UPDATED);
    assert_eq!(streamed.status, 413, "{}", streamed.body);
    // A small chunked body under the limit is fine.
    let small = br#"{"id":"csmall","updatedAt":"2026-01-01T00:00:00Z"}"#;
    let ok = deliver_chunked(&server, "csmall", small);
    assert_eq!(ok.status, 202, "{}", ok.body);
    assert_eq!(stored_ids(&server), vec!["csmall"]);
}

#[test]
fn content_encoding_or_a_non_json_type_gets_415() {
    let server = TestServer::with_base("");
    let sig = sha1_sig(SECRET, LABEL_UPDATED);
    let mut gzip = signed_headers("cenc1", "X-Hub-Signature", &sig);
    gzip.push("Content-Encoding: gzip".to_owned());
    let answer = post(&server, &gzip, LABEL_UPDATED);
    assert_eq!(answer.status, 415, "{}", answer.body);
    assert_eq!(answer.body, r#"{"error":"content encoding not supported"}"#);
    let mut text = signed_headers("cenc2", "X-Hub-Signature", &sig);
    text[0] = "Content-Type: text/plain".to_owned();
    let answer = post(&server, &text, LABEL_UPDATED);
    assert_eq!(answer.status, 415, "{}", answer.body);
    // A charset parameter is still JSON.
    let mut charset = signed_headers("cenc3", "X-Hub-Signature", &sig);
    charset[0] = "Content-Type: application/json; charset=utf-8".to_owned();
    assert_eq!(post(&server, &charset, LABEL_UPDATED).status, 202);
    // `identity` is no encoding at all (issue 22): the body is what was signed.
    let mut identity = signed_headers("cenc4", "X-Hub-Signature", &sig);
    identity.push("Content-Encoding: Identity".to_owned());
    let answer = post(&server, &identity, LABEL_UPDATED);
    assert_eq!(answer.status, 202, "{}", answer.body);
    // ...but not when another coding comes with it.
    let mut both = signed_headers("cenc5", "X-Hub-Signature", &sig);
    both.push("Content-Encoding: identity, gzip".to_owned());
    assert_eq!(post(&server, &both, LABEL_UPDATED).status, 415);
    let mut ids = stored_ids(&server);
    ids.sort();
    assert_eq!(ids, vec!["cenc3", "cenc4"]);
}

#[test]
fn unknown_endpoint_gets_404() {
    let server = TestServer::with_base("");
    let file = body_file(server.dir.path(), "b.json", LABEL_UPDATED);
    let sig = format!("X-Hub-Signature: {}", sha1_sig(SECRET, LABEL_UPDATED));
    let answer = curl(
        &server.url("/webhooks/nope"),
        &[
            "-H",
            "Content-Type: application/json",
            "-H",
            &sig,
            "--data-binary",
            &file,
        ],
    );
    assert_eq!(answer.status, 404, "{}", answer.body);
    assert_eq!(answer.body, r#"{"error":"unknown endpoint"}"#);
    assert!(stored_ids(&server).is_empty());
}

#[test]
fn authentic_but_unknown_or_missing_topic_is_kept_as_unrecognized() {
    let server = TestServer::with_base("");
    assert_eq!(
        deliver(&server, "cunk1", "SOMETHING_NEW", LABEL_UPDATED).status,
        202
    );
    let sig = format!("X-Hub-Signature: {}", sha1_sig(SECRET, LABEL_UPDATED));
    let no_topic = vec![
        "Content-Type: application/json".to_owned(),
        "X-Labelbox-Id: cunk2".to_owned(),
        sig,
    ];
    assert_eq!(post(&server, &no_topic, LABEL_UPDATED).status, 202);
    server.wait_for_status("cunk1", "unrecognized");
    server.wait_for_status("cunk2", "unrecognized");
}

#[test]
fn authentic_body_that_is_not_json_is_kept_as_unrecognized() {
    let server = TestServer::with_base("");
    let body = b"this is not json {";
    assert_eq!(
        deliver(&server, "cnotjson1", "LABEL_UPDATED", body).status,
        202
    );
    server.wait_for_status("cnotjson1", "unrecognized");
    let shown = server.cli(&["events", "show", "cnotjson1"]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("this is not json {"));
}

#[test]
fn store_unavailable_gets_503_with_retry_after_and_recovers_by_itself() {
    // The store's directory is blocked by a plain file: the server must start anyway.
    let dir = tempfile::tempdir().expect("temp");
    let (blocked, config) = blocked_store_config(dir.path());
    let server = TestServer::start(&config);
    let ready = curl(&server.admin("/readyz"), &[]);
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_eq!(curl(&server.admin("/healthz"), &[]).status, 200);
    let answer = deliver(&server, "cdown1", "LABEL_UPDATED", LABEL_UPDATED);
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert!(
        answer
            .headers
            .to_ascii_lowercase()
            .contains("retry-after: 5"),
        "{}",
        answer.headers
    );
    // The disk comes back: no restart needed.
    std::fs::remove_file(&blocked).expect("rm");
    std::fs::create_dir(&blocked).expect("mkdir");
    assert_eq!(curl(&server.admin("/readyz"), &[]).status, 200);
    assert_eq!(
        deliver(&server, "cdown1", "LABEL_UPDATED", LABEL_UPDATED).status,
        202
    );
    assert!(server.status_of("cdown1").is_some());
}

#[test]
fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use std::io::{Read, Write};
    let server = TestServer::start(&base_config("").replace(
        "body_timeout = \"30s\"",
        "body_timeout = \"30s\"\nheader_timeout = \"1s\"",
    ));
    let addr = server.base_url.trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(&addr).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(b"POST /webhooks/labelbox HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    // The server closes the connection (possibly after a 408); a read timeout would fail here.
    let read = stream.read_to_end(&mut buf);
    assert!(read.is_ok(), "connection was not closed: {read:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(9));
}

#[test]
fn a_body_that_stops_arriving_gets_408_and_is_not_stored() {
    use std::io::{Read, Write};
    let server = TestServer::start(
        &base_config("").replace("body_timeout = \"30s\"", "body_timeout = \"1s\""),
    );
    let addr = server.base_url.trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(&addr).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let sig = sha1_sig(SECRET, LABEL_UPDATED);
    let head = format!(
        "POST /webhooks/labelbox HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         X-Labelbox-Event: LABEL_UPDATED\r\nX-Labelbox-Id: cslow1\r\nX-Hub-Signature: {sig}\r\n\
         Content-Length: {}\r\n\r\n",
        LABEL_UPDATED.len()
    );
    stream.write_all(head.as_bytes()).expect("write");
    stream.write_all(&LABEL_UPDATED[..100]).expect("write");
    let mut buf = [0u8; 1024];
    let n = stream
        .read(&mut buf)
        .expect("an answer before the read timeout");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(server.events().is_empty());
}

#[test]
fn model_training_callbacks_list_models_and_store_a_model_run() {
    let server = TestServer::with_base(
        r#"
[model_training]
path = "/model-training"
secrets = [{ env = "LH_TEST_SECRET" }]
model_types = ["image_single_classification", "bounding_box"]
"#,
    );
    let models = curl(&server.url("/model-training/models"), &[]);
    assert_eq!(models.status, 200);
    let list: serde_json::Value = serde_json::from_str(&models.body).expect("json");
    let mut keys: Vec<&String> = list.as_object().expect("object").keys().collect();
    keys.sort();
    assert_eq!(keys, ["bounding_box", "image_single_classification"]);
    // Signed over the empty body, as Labelbox's reference receiver checks.
    let empty_sig = format!("X-Hub-Signature: {}", sha1_sig(SECRET, b""));
    assert_eq!(
        curl(&server.url("/model-training/models"), &["-H", &empty_sig]).status,
        200
    );
    let wrong = format!("X-Hub-Signature: {}", sha1_sig("wrong", b""));
    assert_eq!(
        curl(&server.url("/model-training/models"), &["-H", &wrong]).status,
        401
    );

    let body = include_bytes!("../fixtures/model_run.json");
    let run = post_model_run(&server, body, Some(SECRET));
    assert_eq!(run.status, 202, "{}", run.body);
    let unsigned = post_model_run(&server, body, None);
    assert_eq!(unsigned.status, 401);
    let events = server.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["topic"], "MODEL_RUN");
    assert_eq!(events[0]["endpoint"], "model_training");
}

#[test]
fn metrics_count_deliveries_by_outcome() {
    let server = TestServer::with_base("");
    assert_eq!(
        deliver(&server, "cmet1", "LABEL_UPDATED", LABEL_UPDATED).status,
        202
    );
    assert_eq!(
        deliver(&server, "cmet1", "LABEL_UPDATED", LABEL_UPDATED).status,
        200
    );
    let metrics = curl(&server.admin("/metrics"), &[]);
    assert_eq!(metrics.status, 200);
    let line = |outcome: &str| {
        metrics
            .body
            .lines()
            .find(|l| {
                l.starts_with("labelhook_deliveries_total")
                    && l.contains(&format!("outcome=\"{outcome}\""))
                    && l.contains("topic=\"LABEL_UPDATED\"")
            })
            .map(str::to_owned)
    };
    assert!(
        line("accepted").is_some_and(|l| l.ends_with(" 1")),
        "{}",
        metrics.body
    );
    assert!(
        line("duplicate").is_some_and(|l| l.ends_with(" 1")),
        "{}",
        metrics.body
    );
    assert!(metrics
        .body
        .contains("labelhook_http_request_duration_seconds_bucket"));
    assert!(metrics.body.contains("route=\"/webhooks/{endpoint}\""));
}

#[test]
fn admin_routes_answer_only_on_their_own_listener() {
    let server = TestServer::with_base("");
    let admin = server.admin_url.clone().expect("admin listening line");
    assert_eq!(curl(&format!("{admin}/healthz"), &[]).status, 200);
    assert_eq!(curl(&format!("{admin}/readyz"), &[]).status, 200);
    assert_eq!(curl(&format!("{admin}/metrics"), &[]).status, 200);
    assert_eq!(curl(&format!("{admin}/ui/"), &[]).status, 200);
    // Not on the public listener, whoever asks (127.0.0.1 is allowed to deliver here).
    for path in ["/metrics", "/healthz", "/readyz", "/ui/", "/ui/dead"] {
        assert_eq!(curl(&server.url(path), &[]).status, 404, "{path}");
    }
}

#[test]
fn admin_listen_is_localhost_by_default_and_never_the_webhook_listener() {
    let defaults = labelhook::config::ServerSettings::default();
    assert!(defaults.admin_listen.ip().is_loopback());
    let dir = tempfile::tempdir().expect("temp");
    let path = dir.path().join("same.toml");
    std::fs::write(
        &path,
        base_config("")
            .replace(
                "admin_listen = \"127.0.0.1:0\"",
                "admin_listen = \"0.0.0.0:8097\"",
            )
            .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:8097\""),
    )
    .expect("write");
    let out = std::process::Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .env("LH_TEST_SECRET", SECRET)
        .env_remove("LABELHOOK_CONFIG")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: server.admin_listen: must differ from server.listen"),
        "{stderr}"
    );
}

#[test]
fn large_bodies_beyond_max_spilling_bodies_wait_instead_of_filling_the_disk() {
    use std::io::Write;
    let config = base_config("")
        .replace(
            "body_timeout = \"30s\"",
            "body_timeout = \"30s\"\nmax_spilling_bodies = 1",
        )
        .replace(
            "url = \"sqlite://STORE_DIR/labelhook.db\"",
            "url = \"sqlite://STORE_DIR/labelhook.db\"\ninline_body_max_bytes = 1024",
        );
    let server = TestServer::start(&config);
    assert!(LABEL_UPDATED.len() > 1500);
    // A: past the inline limit, then silent, holding the only spill permit.
    let addr = server.base_url.trim_start_matches("http://").to_owned();
    let mut stalled = std::net::TcpStream::connect(&addr).expect("connect");
    let head = format!(
        "POST /webhooks/labelbox HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         X-Labelbox-Event: LABEL_UPDATED\r\nX-Labelbox-Id: cstall1\r\nX-Hub-Signature: sha1={}\r\n\
         Content-Length: {}\r\n\r\n",
        "0".repeat(40),
        LABEL_UPDATED.len()
    );
    stalled.write_all(head.as_bytes()).expect("write");
    stalled.write_all(&LABEL_UPDATED[..1500]).expect("write");
    let blobs = server.dir.path().join("labelhook.db.blobs");
    let spilled = || std::fs::read_dir(&blobs).map_or(0, |d| d.count());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while spilled() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first body never spilled"
        );
        std::thread::park_timeout(std::time::Duration::from_millis(10));
    }
    // B: a genuine large delivery waits for the permit; its sender gives up after 3 s.
    let file = body_file(server.dir.path(), "b.json", LABEL_UPDATED);
    let sig = format!("X-Hub-Signature: {}", sha1_sig(SECRET, LABEL_UPDATED));
    let waited = curl(
        &server.url("/webhooks/labelbox"),
        &[
            "--max-time",
            "3",
            "-H",
            "Content-Type: application/json",
            "-H",
            "X-Labelbox-Event: LABEL_UPDATED",
            "-H",
            "X-Labelbox-Id: cwait1",
            "-H",
            &sig,
            "--data-binary",
            &file,
        ],
    );
    assert_ne!(
        waited.status, 202,
        "a second body spilled while the permit was held"
    );
    assert_eq!(spilled(), 1);
    // A goes away: its blob is removed and large deliveries are taken again.
    drop(stalled);
    let later = deliver(&server, "cafter1", "LABEL_UPDATED", LABEL_UPDATED);
    assert_eq!(later.status, 202, "{}", later.body);
    let ids: Vec<String> = server
        .events()
        .iter()
        .map(|e| e["delivery_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(ids, vec!["cafter1"]);
    assert_eq!(spilled(), 1, "only the accepted delivery's blob is left");
}

const MODEL_TRAINING: &str = r#"
[model_training]
path = "/model-training"
secrets = [{ env = "LH_TEST_SECRET" }]
model_types = ["image_single_classification"]
"#;

#[test]
fn a_model_run_sent_as_labelbox_sends_it_is_taken_and_a_repeat_within_the_window_is_one_request() {
    let server = TestServer::with_base(MODEL_TRAINING);
    let body = include_bytes!("../fixtures/model_run.json");
    let first = post_model_run_as_labelbox(&server, body, &[]);
    assert_eq!(first.status, 202, "{}", first.body);
    let again = post_model_run_as_labelbox(&server, body, &[]);
    assert_eq!(again.status, 200, "{}", again.body);
    assert!(again.body.contains("duplicate"), "{}", again.body);
    // A Content-Type that is there and not JSON is still refused.
    let typed = post_model_run_as_labelbox(&server, body, &["-H", "Content-Type: text/plain"]);
    assert_eq!(typed.status, 415, "{}", typed.body);
    let events = server.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["topic"], "MODEL_RUN");
    drop(server);

    // With no window, the same run requested again is a new training request.
    let server = TestServer::with_base(&format!("{MODEL_TRAINING}duplicate_window = \"0s\"\n"));
    assert_eq!(post_model_run_as_labelbox(&server, body, &[]).status, 202);
    assert_eq!(post_model_run_as_labelbox(&server, body, &[]).status, 202);
    assert_eq!(server.events().len(), 2);
}

#[test]
fn model_training_calls_have_their_own_allowlist_and_a_refused_address_is_logged() {
    // Deliveries from 127.0.0.1 are allowed (network.allowlist); model-training calls are not.
    let server = TestServer::with_base(&format!("{MODEL_TRAINING}allowlist = [\"10.9.9.9/32\"]\n"));
    let body = include_bytes!("../fixtures/model_run.json");
    assert_eq!(post_model_run_as_labelbox(&server, body, &[]).status, 403);
    assert_eq!(curl(&server.url("/model-training/models"), &[]).status, 403);
    assert_eq!(
        deliver(&server, "callowed", "LABEL_UPDATED", LABEL_UPDATED).status,
        202
    );
    let logs = server.logs();
    let refused = logs
        .lines()
        .find(|l| l.contains("model-training call refused"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{logs}"));
    assert!(refused.contains("127.0.0.1"), "{refused}");
    assert!(server.events().iter().all(|e| e["topic"] != "MODEL_RUN"));
}

#[test]
fn a_refused_request_writes_a_bounded_line_to_the_log_whatever_it_sends() {
    let server = TestServer::with_base("");
    let before = server.logs().len();
    // As large as a request head may be (16 KiB in all).
    let topic = format!("X-Labelbox-Event: {}", "T".repeat(12_000));
    let bad_sig = "X-Hub-Signature: sha1=0000000000000000000000000000000000000000";
    for _ in 0..20 {
        let answer = curl(
            &server.url("/webhooks/labelbox"),
            &[
                "-H",
                "Content-Type: application/json",
                "-H",
                &topic,
                "-H",
                bad_sig,
                "--data-binary",
                "{}",
            ],
        );
        assert_eq!(answer.status, 401);
    }
    // Every refusal is logged, each in about a kilobyte (two lines, with their spans' fields
    // and the operator's hint for a mismatch), not the 12 KB it was sent.
    let written = server.logs().len() - before;
    assert!(written > 20 * 64, "refusals not logged? {written} bytes");
    assert!(
        written < 20 * 1536,
        "{written} bytes of log for 20 refusals"
    );
    // A larger head is refused before it reaches the service (431), and logs nothing of it.
    let before = server.logs().len();
    let topic = format!("X-Labelbox-Event: {}", "T".repeat(100_000));
    let answer = curl(
        &server.url("/webhooks/labelbox"),
        &["-H", &topic, "-H", bad_sig, "--data-binary", "{}"],
    );
    assert_eq!(answer.status, 431);
    assert!(server.logs().len() - before < 1024);
}
