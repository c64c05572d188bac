//! Hostile input against the real binary: slow forged uploads, connection floods, bodies that
//! are JSON to a lenient parser but not UTF-8, stored bodies gone missing, and configuration
//! files that would echo a secret. Each test would fail on the code before issue 10's fixes.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::helpers::*;

/// A forged signature of the right shape: it passes every check until the body has arrived.
const FORGED: &str = "sha1=0000000000000000000000000000000000000000";

fn host_port(server: &TestServer) -> String {
    server.base_url.trim_start_matches("http://").to_owned()
}

/// Request headers for a delivery of `len` bytes, with any extra header lines.
fn head(id: &str, signature: &str, len: usize, extra: &str) -> String {
    format!(
        "POST /webhooks/labelbox HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         X-Labelbox-Event: LABEL_UPDATED\r\nX-Labelbox-Id: {id}\r\nX-Hub-Signature: {signature}\r\n\
         {extra}Content-Length: {len}\r\n\r\n"
    )
}

/// An upload that sends its headers and a first part at once, then one byte every half
/// second until the server answers, the connection breaks, or it is told to stop.
struct SlowUpload {
    stop: Arc<AtomicBool>,
    sender: JoinHandle<String>,
}

impl SlowUpload {
    fn start(addr: &str, head: String, first: Vec<u8>) -> SlowUpload {
        let stop = Arc::new(AtomicBool::new(false));
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.write_all(head.as_bytes()).expect("write head");
        stream.write_all(&first).expect("write first part");
        // The read timeout paces the trickle: each turn waits for an answer this long.
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("read timeout");
        let stopping = Arc::clone(&stop);
        let sender = std::thread::spawn(move || {
            let mut answer = Vec::new();
            let mut buf = [0u8; 1024];
            while !stopping.load(Ordering::SeqCst) {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        answer.extend_from_slice(&buf[..n]);
                        // The status line and headers are enough to know the verdict.
                        if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        if stream.write_all(b" ").is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            String::from_utf8_lossy(&answer).into_owned()
        });
        SlowUpload { stop, sender }
    }

    /// Waits (bounded) for the server to end the upload, then returns what it answered.
    fn answer_within(self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        while !self.sender.is_finished() && Instant::now() < deadline {
            std::thread::park_timeout(Duration::from_millis(50));
        }
        self.finish()
    }

    /// Stops trickling (if it still is) and returns what the server answered.
    fn finish(self) -> String {
        self.stop.store(true, Ordering::SeqCst);
        self.sender.join().expect("slow upload thread")
    }
}

/// Files in the SQLite store's blob directory: bodies being spilled or stored.
fn blob_count(server: &TestServer) -> usize {
    std::fs::read_dir(server.dir.path().join("labelhook.db.blobs")).map_or(0, |d| d.count())
}

/// Polls (bounded) until `ready` holds.
fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

/// A genuine label body of about `len` bytes (the fixture with a long field added).
pub(crate) fn large_label(len: usize) -> Vec<u8> {
    let mut value: serde_json::Value = serde_json::from_slice(LABEL_UPDATED).expect("fixture");
    value["padding"] = serde_json::Value::String("p".repeat(len));
    serde_json::to_vec(&value).expect("json")
}

fn stored_ids(server: &TestServer) -> Vec<String> {
    server
        .events()
        .iter()
        .map(|e| e["delivery_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Issue 10, hole 3: six forged uploads trickle a byte every half second after passing the
/// inline limit, so each wants a spill slot (there are four). Before the fix they held every
/// slot for the whole `body_timeout` (300 s here) and the genuine delivery waited that long;
/// now each is cut off once it falls `body_rate_grace` behind the minimum pace, and the genuine
/// one is stored long before.
#[test]
fn slow_forged_uploads_give_their_spill_slots_back_and_a_genuine_large_delivery_is_stored() {
    let config = base_config("")
        .replace(
            "body_timeout = \"30s\"",
            "body_timeout = \"300s\"\nbody_rate_grace = \"3s\"",
        )
        .replace(
            "url = \"sqlite://STORE_DIR/labelhook.db\"",
            "url = \"sqlite://STORE_DIR/labelhook.db\"\ninline_body_max_bytes = 1024",
        );
    let server = TestServer::start(&config);
    let addr = host_port(&server);
    let forged: Vec<SlowUpload> = (0..6)
        .map(|i| {
            SlowUpload::start(
                &addr,
                head(&format!("cforged{i}"), FORGED, 1 << 20, ""),
                vec![b' '; 4096],
            )
        })
        .collect();
    // The forged uploads hold spill slots (at least the two one address may have).
    wait_until("forged uploads to spill", Duration::from_secs(20), || {
        blob_count(&server) >= 2
    });

    let body = large_label(256 * 1024);
    let started = Instant::now();
    // curl gives up after 60 s, far below the forged uploads' 300 s body_timeout.
    let answer = deliver(&server, "cgenuine1", "LABEL_UPDATED", &body);
    let waited = started.elapsed();
    assert_eq!(answer.status, 202, "{answer:?}\n{}", server.logs());

    // Each forged upload is cut off in its turn (those waiting for a slot wait on labelhook,
    // which costs them no pace credit).
    let answers: Vec<String> = forged
        .into_iter()
        .map(|upload| upload.answer_within(Duration::from_secs(60)))
        .collect();
    for answer in &answers {
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    }
    assert_eq!(stored_ids(&server), vec!["cgenuine1"]);
    wait_until("forged blobs to go", Duration::from_secs(10), || {
        blob_count(&server) == 1
    });
    eprintln!(
        "figures: 7 uploads tried, 6 forged refused with 408, 1 stored, 0 lost; the genuine \
         one waited {waited:?}"
    );
}

/// Issue 10, hole 3, with the pace rule off: forged uploads from one client address (behind a
/// trusted proxy) take at most `max_spilling_bodies_per_client` of the slots, so a genuine
/// sender at another address gets one at once.
#[test]
fn one_client_address_cannot_take_every_spill_slot() {
    let config = base_config("")
        .replace(
            "body_timeout = \"30s\"",
            "body_timeout = \"300s\"\nmin_body_bytes_per_second = 0",
        )
        .replace(
            "allowlist = [\"127.0.0.1/32\"]",
            "allowlist = [\"192.0.2.0/24\"]\ntrusted_proxies = [\"127.0.0.1/32\"]",
        )
        .replace(
            "url = \"sqlite://STORE_DIR/labelhook.db\"",
            "url = \"sqlite://STORE_DIR/labelhook.db\"\ninline_body_max_bytes = 1024",
        );
    let server = TestServer::start(&config);
    let addr = host_port(&server);
    let forged: Vec<SlowUpload> = (0..6)
        .map(|i| {
            SlowUpload::start(
                &addr,
                head(
                    &format!("cforged{i}"),
                    FORGED,
                    1 << 20,
                    "X-Forwarded-For: 192.0.2.66\r\n",
                ),
                vec![b' '; 4096],
            )
        })
        .collect();
    wait_until("forged uploads to spill", Duration::from_secs(20), || {
        blob_count(&server) >= 2
    });

    let body = large_label(256 * 1024);
    let file = body_file(server.dir.path(), "genuine.json", &body);
    let sig = format!("X-Hub-Signature: {}", sha1_sig(SECRET, &body));
    let answer = curl(
        &server.url("/webhooks/labelbox"),
        &[
            "--max-time",
            "30",
            "-H",
            "Content-Type: application/json",
            "-H",
            "X-Labelbox-Event: LABEL_UPDATED",
            "-H",
            "X-Labelbox-Id: cgenuine2",
            "-H",
            "X-Forwarded-For: 192.0.2.10",
            "-H",
            &sig,
            "--data-binary",
            &file,
        ],
    );
    assert_eq!(answer.status, 202, "{answer:?}\n{}", server.logs());
    // Two forged bodies spilled (their share), and the genuine one.
    assert_eq!(blob_count(&server), 3);
    for upload in forged {
        upload.finish();
    }
    assert_eq!(stored_ids(&server), vec!["cgenuine2"]);
}

/// `VmRSS` of the server, in MiB.
fn rss_mib(server: &TestServer) -> u64 {
    server.proc_status_bytes("VmRSS") >> 20
}

/// What became of one connection of a flood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Nothing yet: the server is serving it (waiting for the rest of its body).
    Open,
    /// Answered 503 with `Retry-After` and closed.
    Answered503,
    /// Closed without an answer (not expected: every refusal is answered, the oldest lingering
    /// refusals being closed to make room; counted so a change there shows in the figures).
    Closed,
}

/// Reads what is there without waiting.
fn fate_of(stream: &mut TcpStream, seen: &mut Vec<u8>) -> Fate {
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                return if seen.is_empty() {
                    Fate::Open
                } else {
                    answer_fate(seen)
                };
            }
            Err(_) => break,
        }
    }
    if seen.is_empty() {
        Fate::Closed
    } else {
        answer_fate(seen)
    }
}

fn answer_fate(seen: &[u8]) -> Fate {
    let text = String::from_utf8_lossy(seen).to_ascii_lowercase();
    assert!(
        text.starts_with("http/1.1 503"),
        "unexpected answer {text:?}"
    );
    assert!(text.contains("retry-after: 5"), "{text:?}");
    Fate::Answered503
}

/// A connection of a flood, with what the server has answered it so far.
type Held = (TcpStream, Vec<u8>);

/// 2,500 connections that each send the headers and half of a small body, and hold; returns
/// them once no more than `LIMIT` are still open, with their fates and the server's RSS then.
fn flood(server: &TestServer, round: &str) -> (Vec<Held>, [usize; 3], u64) {
    let addr = host_port(server);
    let half = &LABEL_UPDATED[..LABEL_UPDATED.len() / 2];
    let mut flood: Vec<Held> = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let mut stream = TcpStream::connect(&addr).expect("connect");
        let head = head(&format!("c{round}{i}"), FORGED, LABEL_UPDATED.len(), "");
        // A refused connection may be closed before its request is written; that is its fate.
        let _ = stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(half));
        stream.set_nonblocking(true).expect("nonblocking");
        flood.push((stream, Vec::new()));
    }
    let mut fates = [0; 3];
    wait_until(
        "the connections past the limit to be refused",
        Duration::from_secs(30),
        || {
            fates = [0; 3];
            for (stream, seen) in &mut flood {
                fates[fate_of(stream, seen) as usize] += 1;
            }
            fates[Fate::Open as usize] <= LIMIT
        },
    );
    let holding = rss_mib(server);
    (flood, fates, holding)
}

/// Connections of a flood.
const FLOOD: usize = 2500;
/// `server.max_connections` by default.
const LIMIT: usize = 1024;

/// Delivers until it is stored (bounded): the server may still be closing a flood.
fn deliver_once_served(server: &TestServer, id: &str) {
    let started = Instant::now();
    let mut answer = deliver(server, id, "LABEL_UPDATED", LABEL_UPDATED);
    while answer.status != 202 && started.elapsed() < Duration::from_secs(30) {
        std::thread::park_timeout(Duration::from_millis(100));
        answer = deliver(server, id, "LABEL_UPDATED", LABEL_UPDATED);
    }
    assert_eq!(answer.status, 202, "{answer:?}");
}

/// Issue 10, hole 4: 2,500 connections each send the headers and half of a small body, and
/// hold. Before the fix every one of them was served (about 85 KiB each), and the memory stayed
/// taken after they closed. Now `max_connections` (1024 by default) are served and the rest
/// are answered 503 (or, in a flood, closed); a genuine delivery gets 503 with Retry-After
/// while the limit is reached and 202 once the connections close. The memory the flood takes
/// is bounded by the limit, and it is there for the next flood to use: a second flood after
/// the first has closed, and two more, leave the process about the size the second left it.
#[test]
fn connections_past_the_limit_are_refused_and_their_memory_is_bounded_and_reused() {
    let config = base_config("").replace(
        "body_timeout = \"30s\"",
        "body_timeout = \"300s\"\nbody_rate_grace = \"240s\"",
    );
    let server = TestServer::start(&config);
    // Warm up what every delivery touches (the store's caches, the dispatcher), then measure.
    for i in 0..20 {
        let answer = deliver(
            &server,
            &format!("cwarm{i}"),
            "LABEL_UPDATED",
            LABEL_UPDATED,
        );
        assert_eq!(answer.status, 202, "{answer:?}");
    }
    let baseline = rss_mib(&server);

    let (held, fates, holding) = flood(&server, "flood");
    assert_eq!(fates[Fate::Open as usize], LIMIT, "{fates:?}");
    assert!(fates[Fate::Answered503 as usize] > 0, "{fates:?}");
    // At the limit, a genuine delivery is told to come back.
    let refused = deliver(&server, "cgenuine4", "LABEL_UPDATED", LABEL_UPDATED);
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(
        refused
            .headers
            .to_ascii_lowercase()
            .contains("retry-after: 5"),
        "{refused:?}"
    );
    drop(held);
    deliver_once_served(&server, "cgenuine4");
    let after = rss_mib(&server);

    // Three more floods, each after the one before has closed.
    let mut again = Vec::new();
    for round in 2..=4 {
        let (held, fates, holding) = flood(&server, &format!("flood{round}x"));
        assert_eq!(fates[Fate::Open as usize], LIMIT, "{fates:?}");
        drop(held);
        deliver_once_served(&server, &format!("cgenuine{round}x"));
        again.push(holding);
    }
    eprintln!(
        "figures: 4 floods of {FLOOD} connections; the first: {} served and held, {} answered \
         503, {} closed unanswered; RSS {baseline} MiB before, {holding} MiB holding, {after} MiB \
         after they closed, {again:?} MiB holding the next three",
        fates[Fate::Open as usize],
        fates[Fate::Answered503 as usize],
        fates[Fate::Closed as usize],
    );
    // Unbounded, the 2,500 took about 200 MiB (85 KiB each); at the limit it is a third of it.
    assert!(
        holding <= baseline + 48,
        "RSS {holding} MiB holding the flood, {baseline} MiB before"
    );
    // What the connections held went back to the allocator and is reused: once a second
    // flood has settled the allocator's pools, two more add a few MiB between them (1 to 3
    // each, seen here). A leak of 2.5 KiB per connection would add 12 MiB over those two.
    assert!(
        again[2] <= again[0] + 12,
        "RSS grows flood after flood: {holding} MiB, then {again:?} MiB"
    );
    let ids = stored_ids(&server);
    assert_eq!(
        ids.len(),
        24,
        "only the warm-up and the genuine deliveries: {ids:?}"
    );
}

/// Issue 10, hole 4: body bytes held in memory by requests in flight are bounded by
/// `max_buffered_bytes`; a request whose bytes would go beyond it is answered 503 at once
/// (rather than waiting, which would leave every body waiting for the others), and the budget
/// comes back when the requests end.
#[test]
fn bodies_beyond_the_buffered_bytes_budget_get_503_and_the_budget_comes_back() {
    // 64 KiB of budget: sixteen bodies of up to 4 KiB each.
    let config = base_config("").replace(
        "body_timeout = \"30s\"",
        "body_timeout = \"300s\"\nbody_rate_grace = \"240s\"\nmax_buffered_bytes = 65536",
    );
    let server = TestServer::start(&config);
    let addr = host_port(&server);
    let half = &LABEL_UPDATED[..LABEL_UPDATED.len() / 2];
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..40 {
        let mut stream = TcpStream::connect(&addr).expect("connect");
        let head = head(&format!("cheld{i}"), FORGED, LABEL_UPDATED.len(), "");
        stream.write_all(head.as_bytes()).expect("write");
        stream.write_all(half).expect("write");
        stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut buf = [0u8; 1024];
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => {
                let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                assert!(text.starts_with("http/1.1 503"), "{text}");
                assert!(text.contains("retry-after: 5"), "{text}");
                assert!(text.contains("server busy"), "{text}");
                refused += 1;
            }
            _ => held.push(stream),
        }
    }
    assert_eq!(held.len(), 16, "{refused} refused");
    assert_eq!(refused, 24);
    let answer = deliver(&server, "cgenuine5", "LABEL_UPDATED", LABEL_UPDATED);
    assert_eq!(answer.status, 503, "{answer:?}");
    drop(held);
    let started = Instant::now();
    let mut answer = deliver(&server, "cgenuine5", "LABEL_UPDATED", LABEL_UPDATED);
    while answer.status != 202 && started.elapsed() < Duration::from_secs(30) {
        std::thread::park_timeout(Duration::from_millis(100));
        answer = deliver(&server, "cgenuine5", "LABEL_UPDATED", LABEL_UPDATED);
    }
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(stored_ids(&server), vec!["cgenuine5"]);
}

/// Waits (bounded) until the server's RSS has stopped moving, and returns it in KiB: what the
/// connections just opened take is only there once the server has read what they sent.
fn settled_rss_kib(server: &TestServer) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = server.proc_status_bytes("VmRSS") >> 10;
    let mut steady = 0;
    while steady < 5 && Instant::now() < deadline {
        std::thread::park_timeout(Duration::from_millis(200));
        let now = server.proc_status_bytes("VmRSS") >> 10;
        steady = if now.abs_diff(last) <= 64 {
            steady + 1
        } else {
            0
        };
        last = now;
    }
    last
}

/// Uploads of the largest body kept in memory (`store.inline_body_max_bytes`, 64 KiB).
const STALLED_BODY: usize = 64 * 1024;

/// 1,000 uploads that each send the headers and all but the last byte of their body, then
/// stall; checks that none was answered (or refused for the memory budget) once the server
/// has read them, and returns them with the server's RSS then, in KiB.
fn stall_uploads(server: &TestServer, round: &str) -> (Vec<TcpStream>, u64) {
    let addr = host_port(server);
    let body = vec![b' '; STALLED_BODY - 1];
    let mut held = Vec::with_capacity(1000);
    for i in 0..1000 {
        let mut stream = TcpStream::connect(&addr).expect("connect");
        let head = head(&format!("c{round}{i}"), FORGED, STALLED_BODY, "");
        stream.write_all(head.as_bytes()).expect("write head");
        stream.write_all(&body).expect("write body");
        held.push(stream);
    }
    let holding = settled_rss_kib(server);
    for stream in &mut held {
        stream.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 64];
        assert!(
            matches!(stream.read(&mut buf), Err(e) if e.kind() == ErrorKind::WouldBlock),
            "an upload was answered or closed"
        );
    }
    (held, holding)
}

/// Issue 22, fault 6: 1,000 uploads each send the headers and all but the last byte of a
/// 64 KiB body, then stall. Before the fix each took about 170 KiB (2.6 times its body):
/// hyper's read buffer grew up to 400 KiB as the bytes came in fast, and stayed large while
/// the upload stalled, and the body's own buffer, doubled from 4 KiB, left its smaller copies
/// behind as holes. Now the read buffer stops at 16 KiB and a body past 16 KiB is kept in
/// blocks; what is left is the body and about 30 KiB that every connection costs, whatever
/// it sends (see docs/reliability.md). What they held is reused once they close: a second
/// round takes no more than the first.
#[test]
fn stalled_uploads_hold_little_more_than_their_body_and_the_memory_is_reused() {
    let config = base_config("").replace(
        "body_timeout = \"30s\"",
        "body_timeout = \"300s\"\nbody_rate_grace = \"240s\"\nmax_buffered_bytes = 134217728",
    );
    let server = TestServer::start(&config);
    for i in 0..20 {
        deliver_once_served(&server, &format!("cwarmstall{i}"));
    }
    let baseline = settled_rss_kib(&server);
    let (held, holding) = stall_uploads(&server, "stall");
    drop(held);
    deliver_once_served(&server, "cafterstall");
    let after = settled_rss_kib(&server);
    let (held, again) = stall_uploads(&server, "stalltwo");
    drop(held);
    let per_upload = holding.saturating_sub(baseline) as usize * 1024 / 1000;
    eprintln!(
        "figures: 1000 uploads of {STALLED_BODY} bytes stalled one byte short; RSS {baseline} \
         KiB before, {holding} KiB holding ({per_upload} bytes an upload, {:.2} x the body), \
         {after} KiB after they closed, {again} KiB holding a second round",
        per_upload as f64 / STALLED_BODY as f64
    );
    assert!(
        per_upload < STALLED_BODY * 2,
        "{per_upload} bytes an upload for a {STALLED_BODY}-byte body"
    );
    assert!(
        again <= holding + (holding - baseline) / 10,
        "the second round took more: {holding} KiB holding the first, {again} KiB the second"
    );
}

/// A file handler on `path` for every topic, and bodies above 1 KiB kept as blob files.
pub(crate) fn archive_config(path: &str, extra_handler_keys: &str) -> String {
    base_config(&format!(
        r#"
[[handler]]
name = "archive"
kind = "file"
path = "{path}"
{extra_handler_keys}

[[route]]
topics = ["*"]
handlers = ["archive"]
"#
    ))
    .replace(
        "url = \"sqlite://STORE_DIR/labelhook.db\"",
        "url = \"sqlite://STORE_DIR/labelhook.db\"\ninline_body_max_bytes = 1024",
    )
}

/// `text` decoded by OpenSSL's base64 decoder (`-A`: all on one line), a decoder that is not
/// ours, and a program the README's quick start names already.
fn base64_decoded(dir: &Path, text: &str) -> Vec<u8> {
    let path = dir.join("body.b64");
    std::fs::write(&path, text).expect("write base64");
    let out = std::process::Command::new("openssl")
        .args(["base64", "-d", "-A", "-in"])
        .arg(&path)
        .output()
        .expect("run base64");
    assert!(out.status.success(), "{}", output_text(&out));
    out.stdout
}

/// Issue 10, hole 8: an authentic body that a lenient JSON parser takes, with bytes that are
/// not UTF-8 inside a string it skips. Before the fix the `file` handler copied it into
/// `events.jsonl` as it was, so the line was not JSON text; now such a body is written as
/// base64 with `"body_encoding":"base64"`, in memory and as a stored (streamed) body alike.
#[test]
fn events_jsonl_lines_are_json_text_even_when_an_authentic_body_is_not_utf8() {
    let server = TestServer::start(&archive_config("STORE_DIR/events.jsonl", ""));
    let small: &[u8] =
        b"{\"id\":\"clabelsmall0000000000001\",\"updatedAt\":\"2024-05-02T08:30:12Z\",\"note\":\"caf\xe9 \xff\"}";
    // The fixture (1.7 KiB, kept as a blob file) with such a field in front.
    let mut stored = b"{\"note\":\"\xc3\x28 \xa0\xa1\",".to_vec();
    stored.extend_from_slice(&LABEL_UPDATED[1..]);
    assert!(small.len() < 1024 && stored.len() > 1024);
    for (id, body) in [
        ("cnotutf8small", small),
        ("cnotutf8stored", &stored[..]),
        ("cplainjson", LABEL_UPDATED),
    ] {
        let answer = deliver(&server, id, "LABEL_UPDATED", body);
        assert_eq!(answer.status, 202, "{answer:?}");
    }
    let path = server.dir.path().join("events.jsonl");
    let mut lines = Vec::new();
    wait_until(
        "three lines in events.jsonl",
        Duration::from_secs(30),
        || {
            lines = std::fs::read(&path)
                .unwrap_or_default()
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(<[u8]>::to_vec)
                .collect();
            lines.len() == 3
        },
    );
    for line in &lines {
        assert!(
            std::str::from_utf8(line).is_ok(),
            "not UTF-8: {}",
            String::from_utf8_lossy(line)
        );
        let value: serde_json::Value = serde_json::from_slice(line).expect("a JSON line");
        let id = value["delivery_id"].as_str().expect("delivery_id");
        match id {
            "cplainjson" => {
                assert_eq!(value["body_encoding"], "json");
                assert_eq!(value["body"]["id"], "clv3k9x2a00013b6m8q7h4z1e");
            }
            "cnotutf8small" | "cnotutf8stored" => {
                assert_eq!(value["body_encoding"], "base64", "{value}");
                let expected = if id == "cnotutf8small" {
                    small
                } else {
                    &stored[..]
                };
                let text = value["body"].as_str().expect("a base64 string");
                assert_eq!(base64_decoded(server.dir.path(), text), expected);
            }
            other => panic!("unexpected line for {other}"),
        }
    }
}

/// Issue 10: a stored body whose blob file cannot be read was reported as an error of the
/// handler's output file (`.../events.jsonl: No such file or directory`), sending an operator
/// to look at the wrong file. The error now says it is the delivery's stored body.
#[test]
fn an_unreadable_blob_is_reported_as_the_body_not_as_the_output_file() {
    let server = TestServer::start(&archive_config(
        "STORE_DIR/out/events.jsonl",
        "backoff = \"100ms\"\nmax_attempts = 100",
    ));
    // The output path is a directory at first, so the first attempts fail on the file itself.
    let output = server.dir.path().join("out/events.jsonl");
    std::fs::create_dir_all(&output).expect("mkdir");
    let answer = deliver(&server, "cblobgone1", "LABEL_UPDATED", LABEL_UPDATED);
    assert_eq!(answer.status, 202, "{answer:?}");
    let shown = || {
        String::from_utf8_lossy(&server.cli(&["events", "show", "cblobgone1"]).stdout).into_owned()
    };
    wait_until(
        "an attempt failing on the output file",
        Duration::from_secs(30),
        || shown().contains("events.jsonl: "),
    );
    // Now the blob goes and the output file can be written: the body is what fails.
    let blobs = server.dir.path().join("labelhook.db.blobs");
    for entry in std::fs::read_dir(&blobs).expect("blob dir") {
        std::fs::remove_file(entry.expect("entry").path()).expect("remove blob");
    }
    std::fs::remove_dir(&output).expect("rmdir");
    let mut text = String::new();
    wait_until(
        "an attempt failing on the body",
        Duration::from_secs(30),
        || {
            text = shown();
            text.contains("cannot read the delivery's stored body")
        },
    );
    let line = text
        .lines()
        .find(|l| l.contains("cannot read the delivery's stored body"))
        .expect("the attempt's line");
    assert!(!line.contains("events.jsonl"), "{line}");
}

/// Issue 10, hole 5: a TOML syntax error on a line holding an inline secret must not quote the
/// line, in `check-config` or in `serve`, whatever the error.
#[test]
fn a_syntax_error_next_to_an_inline_secret_never_shows_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = "hunter2-inline-secret";
    let broken = [
        format!("secrets = [{{ value = \"{secret}\" }}, ]x"),
        format!("secrets = [{{ value = \"{secret}\" ]"),
        format!("secrets = [{{ value = \"{secret}\n\" }}]"),
        format!("secrets = [{{ value = \"{secret}\\q\" }}]"),
        format!("secrets = [{{ value = \"{secret}\", value = \"{secret}\" }}]"),
        format!("secrets = [{{ value = '''{secret}\nmore''' x }}]"),
    ];
    for (i, line) in broken.iter().enumerate() {
        let path = dir.path().join(format!("broken{i}.toml"));
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n\n[[endpoint]]\nname = \"labelbox\"\n{line}\n"
            ),
        )
        .expect("write config");
        for command in ["check-config", "serve"] {
            let out = std::process::Command::new(bin())
                .args([command, "--config"])
                .arg(&path)
                .env_remove("LABELHOOK_CONFIG")
                .output()
                .expect("run labelhook");
            let text = output_text(&out);
            assert!(!out.status.success(), "{command} {i}: {text}");
            assert!(text.contains("not valid TOML"), "{command} {i}: {text}");
            assert!(
                !text.contains("hunter2"),
                "{command} {i} shows the secret: {text}"
            );
        }
    }
}
