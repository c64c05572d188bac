//! The operations console (`/ui/` on the admin listener) against the real binary: its pages
//! show what the store holds, the admin token guards it and `/metrics`, a change without the
//! page's CSRF token changes nothing, signatures are never shown, a body downloads whole, and
//! `events replay` says what it does to each delivery.

use std::time::{Duration, Instant};

use crate::helpers::*;

/// The entity two versions of which are stored, the older one superseded by the newer.
pub const LABEL_A: &str = "clabelconsole0000000000001";
/// The label of the large body.
const LABEL_B: &str = "clabelconsole0000000000002";
pub const PROJECT: &str = "cprojconsole00000000000001";
/// The proxy's request id sent with the first delivery.
pub const REQUEST_ID: &str = "req-console-old-1";
/// The large body's size: well over the store's inline limit and the page's preview.
const BIG_BODY_BYTES: usize = 300 * 1024;
/// The admin token of the guarded console.
const ADMIN_TOKEN: &str = "admin-token-Zq81xv";

/// A LABEL_* body for label `id` at version `updated_at`, padded with `padding` bytes.
pub fn label(id: &str, updated_at: &str, padding: usize) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","createdAt":"2026-11-01T00:00:00Z","updatedAt":"{updated_at}","label":"{{\"objects\":[]}}","project":{{"id":"{PROJECT}"}},"dataRow":{{"id":"cdrowconsole"}},"padding":"{}"}}"#,
        "x".repeat(padding)
    )
    .into_bytes()
}

/// The console's server with something to show: dead letters (a handler that fails until the
/// file `go` exists in the server's directory), two versions of one entity, a large body, one
/// id stored with two bodies, a refusal and a duplicate.
pub struct Seeded {
    pub server: TestServer,
    /// Every signature header value sent: none may ever be shown or logged.
    pub signatures: Vec<String>,
    pub big_body: Vec<u8>,
}

impl Seeded {
    /// Makes the failing handler succeed from now on.
    pub fn heal(&self) {
        std::fs::write(self.server.dir.path().join("go"), b"").expect("write go");
    }

    pub fn admin(&self, path: &str) -> String {
        self.server.admin(path)
    }
}

/// The handlers and routes every console test runs with, plus `extra`.
fn console_config(extra: &str) -> String {
    base_config(&format!(
        r#"
[dispatch]
poll_interval = "100ms"

[[handler]]
name = "flaky"
kind = "command"
argv = ["sh", "-c", "cat > /dev/null; test -f STORE_DIR/go || {{ echo 'downstream said no' >&2; exit 3; }}"]
timeout = "10s"
max_attempts = 2
backoff = "50ms"

[[handler]]
name = "archive"
kind = "file"
path = "STORE_DIR/events.jsonl"

[[route]]
topics = ["LABEL_*"]
handlers = ["flaky", "archive"]
{extra}
"#
    ))
}

/// Posts a delivery signed as Labelbox signs it, with `extra` curl arguments; the answer and
/// the signature sent.
pub fn send(server: &TestServer, id: &str, body: &[u8], extra: &[&str]) -> (Answer, String) {
    let answer = post_signed(server, id, "LABEL_UPDATED", body, extra);
    (answer, sha1_sig(SECRET, body))
}

/// Polls (bounded) until every stored delivery with `id` has `status`, and there are `copies`.
fn wait_for_all(server: &TestServer, id: &str, copies: usize, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows: Vec<String> = server
            .events()
            .into_iter()
            .filter(|e| e["delivery_id"] == id)
            .map(|e| e["status"].as_str().unwrap_or_default().to_owned())
            .collect();
        if rows.len() == copies && rows.iter().all(|s| s == status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id}: {rows:?}, expected {copies} {status}; logs:\n{}",
            server.logs()
        );
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

pub fn seeded(extra: &str) -> Seeded {
    let server = TestServer::start(&console_config(extra));
    let mut signatures = Vec::new();
    let request_id = format!("X-Request-Id: {REQUEST_ID}");
    let old = label(LABEL_A, "2026-11-20T10:00:00Z", 0);
    let (answer, sig) = send(&server, "c-old", &old, &["-H", &request_id]);
    assert_eq!(answer.status, 202, "{answer:?}");
    signatures.push(sig);
    server.wait_for_status("c-old", "dead");
    let (answer, sig) = send(
        &server,
        "c-new",
        &label(LABEL_A, "2026-11-20T11:00:00Z", 0),
        &[],
    );
    assert_eq!(answer.status, 202, "{answer:?}");
    signatures.push(sig);
    let big_body = label(LABEL_B, "2026-11-20T09:00:00Z", BIG_BODY_BYTES);
    let (answer, sig) = send(&server, "c-big", &big_body, &[]);
    assert_eq!(answer.status, 202, "{answer:?}");
    signatures.push(sig);
    // One id, two bodies: both are kept, and both shown.
    for (n, updated) in ["2026-11-20T08:00:00Z", "2026-11-20T08:30:00Z"]
        .into_iter()
        .enumerate()
    {
        let body = label(&format!("clabelconsoletwin00000000{n}"), updated, 0);
        let (answer, sig) = send(&server, "c-twin", &body, &[]);
        assert!(answer.status == 202 || answer.status == 200, "{answer:?}");
        signatures.push(sig);
    }
    // The same delivery again: a duplicate, answered and not stored.
    let (answer, _) = send(&server, "c-old", &old, &[]);
    assert_eq!(answer.status, 200, "{answer:?}");
    // A forged one: refused for its signature.
    let forged = curl(
        &server.url("/webhooks/labelbox"),
        &[
            "-H",
            "Content-Type: application/json",
            "-H",
            "X-Hub-Signature: sha1=0000000000000000000000000000000000000000",
            "-H",
            "X-Labelbox-Id: c-forged",
            "--data-binary",
            "{}",
        ],
    );
    assert_eq!(forged.status, 401, "{forged:?}");
    for id in ["c-new", "c-big"] {
        server.wait_for_status(id, "dead");
    }
    wait_for_all(&server, "c-twin", 2, "dead");
    Seeded {
        server,
        signatures,
        big_body,
    }
}

/// `GET` a console page, asserting it answered 200 with the console's security headers.
pub fn page(url: &str, extra: &[&str]) -> String {
    let answer = curl(url, extra);
    assert_eq!(answer.status, 200, "{url}: {answer:?}");
    let headers = answer.headers.to_ascii_lowercase();
    assert!(
        headers.contains("content-security-policy: default-src 'self'; script-src 'none';"),
        "{url}: {headers}"
    );
    assert!(headers.contains("x-frame-options: deny"), "{headers}");
    answer.body
}

/// The first CSRF token in a page's forms.
pub fn csrf_of(html: &str) -> String {
    let marker = r#"name="csrf" value=""#;
    let start = html.find(marker).expect("a form with a CSRF token") + marker.len();
    html[start..].split('"').next().expect("token").to_owned()
}

/// Where `needle` is in `html`, for order checks.
fn at(html: &str, needle: &str) -> usize {
    html.find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in the page:\n{html}"))
}

#[test]
fn the_pages_show_what_the_store_holds_and_no_signature() {
    let s = seeded("");
    let mut shown = Vec::new();

    let overview = page(&s.admin("/ui/"), &[]);
    assert!(overview.contains("<h1>Overview</h1>"), "{overview}");
    // Five dead letters kept; the refusal by its reason; both handlers with their state.
    assert!(
        overview.contains(r#"<a href="/ui/dead">5</a>"#),
        "{overview}"
    );
    assert!(overview.contains("signature_mismatch"), "{overview}");
    assert!(overview.contains("1 duplicate"), "{overview}");
    assert!(overview.contains(">flaky<") && overview.contains(">archive<"));
    assert!(overview.contains("downstream said no"), "{overview}");
    assert!(overview.contains("<svg"), "the last hour's chart");
    assert!(overview.contains("nothing waiting"), "{overview}");
    shown.push(overview);

    let all = page(&s.admin("/ui/deliveries"), &[]);
    for id in ["c-old", "c-new", "c-big", "c-twin"] {
        assert!(all.contains(&format!(">{id}</a>")), "{id}: {all}");
    }
    assert!(
        !all.contains("c-forged"),
        "a refused request is never stored"
    );
    // Newest first, by sequence number.
    assert!(at(&all, ">c-big</a>") < at(&all, ">c-old</a>"));
    shown.push(all);

    // The second body under one id is listed, not hidden.
    let twins = page(&s.admin("/ui/deliveries?id=c-twin"), &[]);
    assert_eq!(twins.matches(">c-twin</a>").count(), 2, "{twins}");
    assert!(twins.contains("same id, other body"), "{twins}");
    assert!(!twins.contains(">c-old</a>"));

    let entity = format!("label:{LABEL_A}");
    let of_entity = page(&s.admin(&format!("/ui/deliveries?entity={entity}")), &[]);
    assert!(of_entity.contains(">c-old</a>") && of_entity.contains(">c-new</a>"));
    assert!(!of_entity.contains(">c-big</a>"), "{of_entity}");
    let dead = page(
        &s.admin("/ui/deliveries?status=dead&handler=flaky&topic=LABEL_UPDATED"),
        &[],
    );
    assert_eq!(dead.matches("badge status-dead").count(), 5, "{dead}");
    let of_project = page(&s.admin(&format!("/ui/deliveries?project={PROJECT}")), &[]);
    assert!(of_project.contains(">c-big</a>"), "{of_project}");
    let none = page(
        &s.admin("/ui/deliveries?status=delivered&from=2000-01-01T00:00&until=2001-01-01T00:00"),
        &[],
    );
    assert!(none.contains("No delivery matches."), "{none}");
    let paged = page(&s.admin("/ui/deliveries?status=dead"), &[]);
    assert!(!paged.contains("older »"), "one page holds five");
    let bad = curl(&s.admin("/ui/deliveries?status=lost"), &[]);
    assert_eq!(bad.status, 400, "{bad:?}");

    let one = page(&s.admin("/ui/delivery?id=c-old"), &[]);
    assert!(one.contains(REQUEST_ID), "the proxy's request id: {one}");
    assert!(one.contains("[redacted]"), "{one}");
    assert!(
        one.contains("Applied (fresh)") && one.contains("nothing of its entity"),
        "{one}"
    );
    // Every attempt with its error; the handler that succeeded is done.
    assert_eq!(one.matches("badge attempt-").count(), 3, "{one}");
    assert!(one.contains("downstream said no"), "{one}");
    assert!(one.contains("badge run-done") && one.contains("badge run-dead"));
    shown.push(one);
    let newer = page(&s.admin("/ui/delivery?id=c-new"), &[]);
    assert!(
        newer.contains("newer than version") && newer.contains("2026-11-20T10:00:00Z"),
        "the version it was held against: {newer}"
    );
    shown.push(newer);
    let big = page(&s.admin("/ui/delivery?id=c-big"), &[]);
    assert!(big.contains("The first 64 KiB"), "{big}");
    assert!(
        big.len() < 100 * 1024,
        "the preview is capped: {}",
        big.len()
    );
    assert!(big.contains("Download the whole body"));
    shown.push(big);
    let twin = page(&s.admin("/ui/delivery?id=c-twin"), &[]);
    assert!(twin.contains("stored 2 times"), "{twin}");
    shown.push(twin);
    let missing = curl(&s.admin("/ui/delivery?id=c-nothing"), &[]);
    assert_eq!(missing.status, 404, "{missing:?}");

    let history = page(&s.admin(&format!("/ui/entity?key=label%3A{LABEL_A}")), &[]);
    assert!(history.contains("Applied now: version"), "{history}");
    // Oldest version first, each with its verdict.
    let table = &history[at(&history, r#"<table class="history">"#)..];
    assert!(at(table, "2026-11-20T10:00:00Z") < at(table, "2026-11-20T11:00:00Z"));
    assert!(at(table, ">c-old</a>") < at(table, ">c-new</a>"));
    assert_eq!(table.matches("<td>applied</td>").count(), 2, "{history}");
    shown.push(history);

    let letters = page(&s.admin("/ui/dead"), &[]);
    assert_eq!(
        letters.matches(r#"type="checkbox""#).count(),
        5,
        "{letters}"
    );
    assert!(letters.contains("Review replay of the selected"));
    shown.push(letters);

    let css = curl(&s.admin("/ui/static/console.css"), &[]);
    assert_eq!(css.status, 200);
    assert!(css.headers.to_ascii_lowercase().contains("text/css"));

    // No signature that came in is ever shown, nor logged.
    let logs = s.server.logs();
    for signature in &s.signatures {
        let hex = signature.trim_start_matches("sha1=");
        for text in shown.iter().chain([&logs]) {
            assert!(!text.contains(hex), "a signature was shown or logged");
        }
    }
    assert!(!logs.contains(SECRET));
}

#[test]
fn a_body_downloads_whole() {
    let s = seeded("");
    let page_html = page(&s.admin("/ui/delivery?id=c-big"), &[]);
    let marker = r#"class="download" href=""#;
    let start = at(&page_html, marker) + marker.len();
    let href = page_html[start..]
        .split('"')
        .next()
        .expect("href")
        .replace("&amp;", "&");
    let path = s.server.dir.path().join("downloaded.body");
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "60", "-D", "-", "-o"])
        .arg(&path)
        .arg(s.admin(&href))
        .output()
        .expect("run curl");
    assert!(out.status.success());
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-disposition: attachment"), "{head}");
    let got = std::fs::read(&path).expect("downloaded");
    assert_eq!(got.len(), s.big_body.len());
    assert!(got == s.big_body, "the body, byte for byte");
}

#[test]
fn a_change_without_the_pages_csrf_token_is_refused_and_changes_nothing() {
    let s = seeded("");
    let letters = page(&s.admin("/ui/dead"), &[]);
    let csrf = csrf_of(&letters);
    let post = |path: &str, form: &str, extra: &[&str]| {
        let mut args = vec!["--data", form];
        args.extend_from_slice(extra);
        curl(&s.admin(path), &args)
    };
    let forged = csrf.replacen(|c: char| c.is_ascii_digit(), "0", 1);
    let refusals = [
        ("no token", "id=c-new".to_owned(), vec![]),
        ("an empty token", "csrf=&id=c-new".to_owned(), vec![]),
        ("a forged token", format!("csrf={forged}&id=c-new"), vec![]),
        (
            "another site",
            format!("csrf={csrf}&id=c-new"),
            vec!["-H", "Origin: http://evil.example"],
        ),
        (
            "a cross-site fetch",
            format!("csrf={csrf}&id=c-new"),
            vec!["-H", "Sec-Fetch-Site: cross-site"],
        ),
    ];
    s.heal();
    for (why, form, extra) in &refusals {
        for path in ["/ui/replay", "/ui/replay/confirm"] {
            let answer = post(path, form, extra);
            assert_eq!(answer.status, 403, "{why} on {path}: {answer:?}");
        }
    }
    // Nothing was replayed, though the handler would now succeed.
    let events = s.server.events();
    assert!(events.iter().all(|e| e["status"] == "dead"), "{events:?}");
    assert!(!s.server.logs().contains("replayed from the console"));

    // The page's own token: a confirmation first, saying what replay will do to each.
    let form = format!("csrf={csrf}&id=c-old&id=c-new");
    let confirm = post("/ui/replay/confirm", &form, &[]);
    assert_eq!(confirm.status, 200, "{confirm:?}");
    assert!(
        confirm.body.contains("Nothing has happened yet"),
        "{confirm:?}"
    );
    assert!(
        confirm
            .body
            .contains("superseded by version 2026-11-20T11:00:00Z"),
        "{}",
        confirm.body
    );
    assert!(confirm.body.contains("comes back stale and is withheld"));
    assert!(confirm
        .body
        .contains("queued again: gated again, then flaky"));
    assert_eq!(s.server.status_of("c-new").as_deref(), Some("dead"));
    let replayed = post(
        "/ui/replay",
        &format!("csrf={}&id=c-new", csrf_of(&confirm.body)),
        &[],
    );
    assert_eq!(replayed.status, 200, "{replayed:?}");
    assert!(
        replayed.body.contains("1 deliveries were put back"),
        "{replayed:?}"
    );
    s.server.wait_for_status("c-new", "delivered");
    assert_eq!(s.server.status_of("c-old").as_deref(), Some("dead"));
}

#[test]
fn the_admin_token_guards_the_console_and_metrics() {
    let s = seeded(&format!(
        "[admin]\ntoken = {{ value = \"{ADMIN_TOKEN}\" }}\n"
    ));
    // Without a session: 401, with the login form in place of the page.
    for path in [
        "/ui/",
        "/ui/deliveries",
        "/ui/dead",
        "/ui/delivery?id=c-old",
    ] {
        let answer = curl(&s.admin(path), &[]);
        assert_eq!(answer.status, 401, "{path}: {answer:?}");
        assert!(answer.body.contains(r#"action="/ui/login""#), "{path}");
        assert!(!answer.body.contains("c-old</a>"), "{path}");
    }
    let body_url = s.admin("/ui/delivery/body?id=c-big&seq=3");
    assert_eq!(curl(&body_url, &[]).status, 401);
    let metrics = curl(&s.admin("/metrics"), &[]);
    assert_eq!(metrics.status, 401, "{metrics:?}");
    let wrong = curl(
        &s.admin("/metrics"),
        &["-H", "Authorization: Bearer not-the-token"],
    );
    assert_eq!(wrong.status, 401);
    let bearer = format!("Authorization: Bearer {ADMIN_TOKEN}");
    let metrics = curl(&s.admin("/metrics"), &["-H", &bearer]);
    assert_eq!(metrics.status, 200, "{metrics:?}");
    assert!(metrics.body.contains("labelhook_deliveries_total"));
    // A POST without a session changes nothing.
    let replay = curl(&s.admin("/ui/replay"), &["--data", "csrf=x&id=c-new"]);
    assert_eq!(replay.status, 401, "{replay:?}");

    // Logging in: a wrong token is refused, the right one opens a session.
    let login = curl(&s.admin("/ui/login"), &[]);
    assert_eq!(login.status, 200, "{login:?}");
    let csrf = csrf_of(&login.body);
    let wrong = curl(
        &s.admin("/ui/login"),
        &["--data", &format!("csrf={csrf}&token=guess")],
    );
    assert_eq!(wrong.status, 401, "{wrong:?}");
    assert!(!wrong.headers.to_ascii_lowercase().contains("set-cookie"));
    let jar = s.server.dir.path().join("cookies");
    let jar = jar.display().to_string();
    let ok = curl(
        &s.admin("/ui/login"),
        &[
            "-c",
            &jar,
            "--data",
            &format!("csrf={csrf}&token={ADMIN_TOKEN}"),
        ],
    );
    assert_eq!(ok.status, 303, "{ok:?}");
    let cookie_header = ok.headers.to_ascii_lowercase();
    assert!(
        cookie_header.contains("httponly") && cookie_header.contains("samesite=strict"),
        "{cookie_header}"
    );
    let overview = page(&s.admin("/ui/"), &["-b", &jar]);
    assert!(overview.contains("<h1>Overview</h1>"), "{overview}");
    assert!(overview.contains("Log out"));
    let one = page(&s.admin("/ui/delivery?id=c-old"), &["-b", &jar]);
    // The token is never rendered, nor logged.
    for text in [&overview, &one, &login.body, &s.server.logs()] {
        assert!(!text.contains(ADMIN_TOKEN));
    }
    // A CSRF token made for no session is not good for a session's change.
    let replay = curl(
        &s.admin("/ui/replay"),
        &["-b", &jar, "--data", &format!("csrf={csrf}&id=c-new")],
    );
    assert_eq!(replay.status, 403, "{replay:?}");
    assert_eq!(s.server.status_of("c-new").as_deref(), Some("dead"));
}

#[test]
fn events_replay_says_what_it_does_to_each_and_names_an_unknown_id() {
    let s = seeded("");
    let text = |out: &std::process::Output| {
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // An unknown id: the same error line from `show` and `replay`, exit status 1.
    for command in ["show", "replay"] {
        let out = s.server.cli(&["events", command, "c-unknown-id"]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{command}: {stdout}");
        assert_eq!(
            stderr, "error: no delivery with id \"c-unknown-id\" is stored\n",
            "{command}"
        );
    }

    // Superseded: back as stale, withheld (no route delivers stale events).
    let out = s.server.cli(&["events", "replay", "c-old"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout.trim(),
        "c-old seq=1 dead: superseded by version 2026-11-20T11:00:00Z (updated) of its entity: \
         comes back stale and is withheld (no route delivers stale events)\nreplayed 1 deliveries"
    );
    s.server.wait_for_status("c-old", "stale");

    s.heal();
    let out = s.server.cli(&["events", "replay", "c-new"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout.trim(),
        "c-new seq=2 dead: queued again: gated again, then flaky\nreplayed 1 deliveries"
    );
    s.server.wait_for_status("c-new", "delivered");
    // Done: replay runs nothing again, and its count says the same as its line.
    let out = s.server.cli(&["events", "replay", "c-new"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout.trim(),
        "c-new seq=2 delivered: already done: every handler it was routed to has it; nothing \
         runs again\nreplayed 0 deliveries\nnothing to run for 1: already done"
    );
    // Both copies stored under one id are replayed, each said.
    let out = s.server.cli(&["events", "replay", "c-twin"]);
    let (stdout, _) = text(&out);
    assert_eq!(stdout.matches("c-twin seq=").count(), 2, "{stdout}");
}
