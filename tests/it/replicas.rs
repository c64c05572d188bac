//! Several `labelhook serve` processes on one PostgreSQL database, each test in a database of
//! its own: deliveries stored once whichever replica gets them, per-entity order kept across
//! replicas, work of a killed replica taken over once its lease runs out, outages of the
//! database answered with 503 and recovered from without a restart, and large bodies handed
//! from one replica to another with flat memory.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::postgres::{runtime, server_url, TestDb};

const PROJECT_ID: &str = "cprojreplicas000000000001";

/// A v1 LABEL_* body for label `label` at `updated_at`.
fn label_body(label: &str, updated_at: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{label}","createdAt":"2026-11-01T00:00:00Z","updatedAt":"{updated_at}","label":"{{\"objects\":[]}}","project":{{"id":"{PROJECT_ID}"}},"dataRow":{{"id":"cdrow"}}}}"#
    )
    .into_bytes()
}

/// Calls `probe` until it gives `Some`, at most `limit` long, with short pauses between calls;
/// `None` when time ran out.
fn poll_for<T>(limit: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

/// [`poll_for`], failing the test when time runs out.
fn poll<T>(what: &str, limit: Duration, probe: impl FnMut() -> Option<T>) -> T {
    poll_for(limit, probe).unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

/// Delivery id -> status, as `events list --json` shows them.
fn statuses(server: &TestServer) -> HashMap<String, String> {
    server
        .events()
        .into_iter()
        .map(|e| {
            (
                e["delivery_id"].as_str().unwrap_or_default().to_owned(),
                e["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Dedup across replicas.

#[test]
fn the_same_delivery_sent_to_two_replicas_is_stored_once() {
    let Some(db) = TestDb::create_blocking("the_same_delivery_sent_to_two_replicas_is_stored_once")
    else {
        return;
    };
    let a = TestServer::start(&pg_config(&db.url, ""));
    let b = a.replica();
    let body = label_body("clabeldup0000000000000001", "2026-11-20T10:00:00Z");

    // One after the other: the second replica knows the first one's delivery.
    let first = deliver(&a, "cdup-seq", "LABEL_UPDATED", &body);
    assert_eq!(first.status, 202, "{}", first.body);
    let second = deliver(&b, "cdup-seq", "LABEL_UPDATED", &body);
    assert_eq!(second.status, 200, "{}", second.body);
    assert!(second.body.contains("\"duplicate\""), "{}", second.body);

    // At the same moment, to both: one insert wins, the other waits for its commit and finds it.
    const RACES: usize = 10;
    for i in 0..RACES {
        let id = format!("cdup-race-{i}");
        let (x, y) = std::thread::scope(|s| {
            let x = s.spawn(|| deliver(&a, &id, "LABEL_UPDATED", &body));
            let y = s.spawn(|| deliver(&b, &id, "LABEL_UPDATED", &body));
            (x.join().expect("curl a"), y.join().expect("curl b"))
        });
        let mut got = [x.status, y.status];
        got.sort_unstable();
        assert_eq!(got, [200, 202], "{id}: {x:?} / {y:?}");
    }

    // Each replica's CLI reads the same store: one row per delivery.
    for server in [&a, &b] {
        let events = server.events();
        let mut rows: HashMap<String, usize> = HashMap::new();
        for e in &events {
            *rows
                .entry(e["delivery_id"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
        assert_eq!(events.len(), RACES + 1, "{events:?}");
        assert_eq!(rows.get("cdup-seq"), Some(&1));
        assert!(rows.values().all(|n| *n == 1), "{rows:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// An HTTP receiver for the `http` handler, shared by the replicas' handlers.

/// One request the receiver got, noted when it arrived.
#[derive(Debug, Clone)]
struct Arrival {
    /// Which replica sent it: each replica's handler posts to a path of its own.
    path: String,
    delivery_id: String,
    label: String,
    updated_at: String,
    at: Instant,
    /// Another request for the same label was still open at the receiver when this one came.
    overlapped: bool,
}

#[derive(Debug, Default)]
struct Seen {
    arrivals: Vec<Arrival>,
    /// Requests not answered yet: (token, label).
    open: Vec<(u64, String)>,
    /// Requests kept unanswered because their path is held: (path, delivery id, since).
    holding: Vec<(String, String, Instant)>,
    /// Requests answered 200: (path, delivery id).
    answered: Vec<(String, String)>,
    next_token: u64,
}

/// A thread-per-connection HTTP server that notes every request, waits `delay` (a slow handler),
/// and answers 200, except on a held path: see [`Receiver::hold`].
struct Receiver {
    port: u16,
    seen: Arc<Mutex<Seen>>,
    held: Arc<Mutex<Option<String>>>,
}

impl Receiver {
    fn start(delay: Duration) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let held = Arc::new(Mutex::new(None));
        let (s, h) = (seen.clone(), held.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let (s, h) = (s.clone(), h.clone());
                std::thread::spawn(move || serve_one(stream, &s, &h, delay));
            }
        });
        Receiver { port, seen, held }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// From now on, requests to `path` are kept open and never answered; on
    /// [`Receiver::release`] they are dropped unanswered (their sender is dead by then).
    fn hold(&self, path: &str) {
        *self.held.lock().expect("lock") = Some(path.to_owned());
    }

    fn release(&self) {
        *self.held.lock().expect("lock") = None;
    }

    fn seen<T>(&self, read: impl FnOnce(&Seen) -> T) -> T {
        read(&self.seen.lock().expect("lock"))
    }
}

/// Reads one request: its path, X-Labelbox-Id and body.
fn read_request(stream: &TcpStream) -> Option<(String, String, Vec<u8>)> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let path = request_line.split_whitespace().nth(1)?.to_owned();
    let (mut length, mut delivery_id) = (0, String::new());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        let (name, value) = line.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "x-labelbox-id" => value.trim().clone_into(&mut delivery_id),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((path, delivery_id, body))
}

fn serve_one(
    mut stream: TcpStream,
    seen: &Mutex<Seen>,
    held: &Mutex<Option<String>>,
    delay: Duration,
) {
    let Some((path, delivery_id, body)) = read_request(&stream) else {
        return;
    };
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let label = json["id"].as_str().unwrap_or_default().to_owned();
    let updated_at = json["updatedAt"].as_str().unwrap_or_default().to_owned();
    let token = {
        let mut seen = seen.lock().expect("lock");
        let token = seen.next_token;
        seen.next_token += 1;
        let overlapped = seen.open.iter().any(|(_, l)| *l == label);
        seen.open.push((token, label.clone()));
        seen.arrivals.push(Arrival {
            path: path.clone(),
            delivery_id: delivery_id.clone(),
            label,
            updated_at,
            at: Instant::now(),
            overlapped,
        });
        token
    };
    // A slow handler: the sender holds its claim meanwhile.
    std::thread::sleep(delay);
    let is_held = || held.lock().expect("lock").as_deref() == Some(path.as_str());
    let was_held = is_held();
    if was_held {
        let since = Instant::now();
        seen.lock()
            .expect("lock")
            .holding
            .push((path.clone(), delivery_id.clone(), since));
        while is_held() {
            std::thread::park_timeout(Duration::from_millis(10));
        }
    }
    // No longer open once the answer can reach the sender: the next request for the same label
    // may come at once.
    seen.lock()
        .expect("lock")
        .open
        .retain(|(open, _)| *open != token);
    if was_held {
        return;
    }
    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    if stream
        .write_all(answer)
        .and_then(|()| stream.flush())
        .is_ok()
    {
        seen.lock()
            .expect("lock")
            .answered
            .push((path, delivery_id));
    }
}

/// Route LABEL_* to an `http` handler posting to `url`.
fn http_route(url: &str, extra: &str) -> String {
    format!(
        r#"
[dispatch]
poll_interval = "50ms"
{extra}

[[handler]]
name = "forward"
kind = "http"
url = "{url}"
timeout = "20s"
backoff = "100ms"

[[route]]
topics = ["LABEL_*"]
handlers = ["forward"]
"#
    )
}

// ---------------------------------------------------------------------------------------------
// 2. Per-entity order across replicas.

#[test]
fn versions_of_one_entity_sent_alternately_to_two_replicas_reach_the_handler_in_order() {
    let Some(db) = TestDb::create_blocking(
        "versions_of_one_entity_sent_alternately_to_two_replicas_reach_the_handler_in_order",
    ) else {
        return;
    };
    // Each answer takes a while, so that a second call for the label, were the lane not kept
    // across replicas, would overlap the first at the receiver.
    let receiver = Receiver::start(Duration::from_millis(30));
    let a = TestServer::start(&pg_config(&db.url, &http_route(&receiver.url("/a"), "")));
    let b = TestServer::start(&pg_config(&db.url, &http_route(&receiver.url("/b"), "")));

    const VERSIONS: usize = 40;
    // Shuffled within windows of 5 consecutive versions: a full shuffle makes nearly every
    // version stale on arrival (only a handful reach the handler); this way about half of them
    // do, and the entity's lane is passed between the replicas many times.
    const WINDOW: usize = 5;
    let label = "clabelreplicaorder0000001";
    let updated_at = |v: usize| format!("2026-11-20T10:00:{v:02}Z");
    let seed = std::env::var("LH_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("versions_of_one_entity...: shuffle seed {seed} (LH_TEST_SEED to repeat)");
    let mut order: Vec<usize> = (0..VERSIONS).collect();
    let mut rng = fastrand::Rng::with_seed(seed);
    for window in order.chunks_mut(WINDOW) {
        rng.shuffle(window);
    }

    // Alternately to A and B: the even places of the shuffled order to A, the odd ones to B,
    // both senders at once.
    std::thread::scope(|s| {
        for (parity, server) in [(0, &a), (1, &b)] {
            let order = &order;
            s.spawn(move || {
                for (place, v) in order.iter().enumerate() {
                    if place % 2 != parity {
                        continue;
                    }
                    let body = label_body(label, &updated_at(*v));
                    let id = format!("corder-v{v:02}");
                    let answer = deliver(server, &id, "LABEL_UPDATED", &body);
                    assert_eq!(answer.status, 202, "{id}: {answer:?}");
                }
            });
        }
    });

    // Every version settles: delivered (handed on) or stale (a newer one was applied first).
    let settled = poll_for(Duration::from_secs(60), || {
        let now = statuses(&a);
        let done = now.len() == VERSIONS
            && now
                .values()
                .all(|s| matches!(s.as_str(), "delivered" | "stale"));
        done.then_some(now)
    })
    .unwrap_or_else(|| {
        let mut now: Vec<_> = statuses(&a).into_iter().collect();
        now.sort();
        panic!(
            "not every version settled: {now:?}; the receiver saw {:#?}",
            receiver.seen(|s| s.arrivals.clone())
        )
    });
    let arrivals = receiver.seen(|s| s.arrivals.clone());
    let by_replica = |p: &str| arrivals.iter().filter(|r| r.path == p).count();
    eprintln!(
        "order {:?}; receiver saw {:?} ({} from A, {} from B)",
        order,
        arrivals
            .iter()
            .map(|r| r.updated_at[17..19].to_owned())
            .collect::<Vec<_>>(),
        by_replica("/a"),
        by_replica("/b"),
    );
    assert!(!arrivals.is_empty(), "the handler was never called");
    assert!(arrivals.iter().all(|r| r.label == label));
    for r in &arrivals {
        assert!(
            !r.overlapped,
            "{} reached the handler while another call for the label was still open: {arrivals:#?}",
            r.delivery_id
        );
    }
    for pair in arrivals.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        assert!(
            after.updated_at > before.updated_at
                || (after.updated_at == before.updated_at
                    && after.delivery_id == before.delivery_id),
            "{} reached the handler after {}: {arrivals:#?}",
            after.updated_at,
            before.updated_at,
        );
    }
    let newest = format!("corder-v{:02}", VERSIONS - 1);
    assert_eq!(
        arrivals.last().map(|r| r.delivery_id.as_str()),
        Some(newest.as_str())
    );
    // What the store says agrees with what the receiver saw.
    let handed: HashSet<&str> = arrivals.iter().map(|r| r.delivery_id.as_str()).collect();
    for (id, status) in &settled {
        assert_eq!(
            status == "delivered",
            handed.contains(id.as_str()),
            "{id} is {status}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. A replica killed with work claimed.

#[test]
fn a_replica_killed_under_load_leaves_no_acknowledged_delivery_unhandled() {
    let Some(db) = TestDb::create_blocking(
        "a_replica_killed_under_load_leaves_no_acknowledged_delivery_unhandled",
    ) else {
        return;
    };
    const LEASE: Duration = Duration::from_secs(2);
    // Each call takes 50 ms, so that claims are in flight all the time.
    let receiver = Receiver::start(Duration::from_millis(50));
    let lease = r#"lease = "2s""#;
    let mut a = TestServer::start(&pg_config(&db.url, &http_route(&receiver.url("/a"), lease)));
    let b = TestServer::start(&pg_config(&db.url, &http_route(&receiver.url("/b"), lease)));

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let a_alive = Arc::new(AtomicBool::new(true));
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let (url_a, url_b) = (a.url("/webhooks/labelbox"), b.url("/webhooks/labelbox"));
    let dir = b.dir.path().to_owned();
    // Several senders, each delivery to another label, alternating between the replicas while
    // A lives.
    let workers: Vec<JoinHandle<()>> = (0..4)
        .map(|_| {
            let (acked, a_alive, stop, next) =
                (acked.clone(), a_alive.clone(), stop.clone(), next.clone());
            let (url_a, url_b, dir) = (url_a.clone(), url_b.clone(), dir.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    let url = if n % 2 == 0 && a_alive.load(Ordering::SeqCst) {
                        &url_a
                    } else {
                        &url_b
                    };
                    let id = format!("ckill{n:06}");
                    let body = label_body(&format!("clabelkill{n:015}"), "2026-11-20T10:00:00Z");
                    let answer = deliver_to(url, &dir, &id, "LABEL_UPDATED", &body);
                    if matches!(answer.status, 200 | 202) {
                        acked.lock().expect("lock").push(id);
                    }
                }
            })
        })
        .collect();
    let acked_count = || acked.lock().expect("lock").len();
    poll(
        "100 acknowledged deliveries",
        Duration::from_secs(60),
        || (acked_count() >= 100).then_some(()),
    );

    // How the killed replica is made to hold claimed work: from now on the receiver keeps A's
    // calls open without answering. A has claimed those deliveries (their leases renewed every
    // lease/3 while the calls hang) and will never record them. We wait until the oldest has
    // hung longer than the lease, so that renewal, not luck, kept B off it, then kill A.
    receiver.hold("/a");
    let held: Vec<(String, Instant)> = poll(
        "A to hold claimed work for longer than its lease",
        Duration::from_secs(30),
        || {
            receiver.seen(|s| {
                let held: Vec<(String, Instant)> = s
                    .holding
                    .iter()
                    .filter(|(p, _, _)| p == "/a")
                    .map(|(_, id, since)| (id.clone(), *since))
                    .collect();
                let oldest = held.iter().map(|(_, since)| *since).min()?;
                (held.len() >= 3 && oldest.elapsed() > LEASE + Duration::from_millis(500))
                    .then_some(held)
            })
        },
    );
    a.kill9();
    a_alive.store(false, Ordering::SeqCst);
    let killed_at = Instant::now();
    // Only now, with A dead, are the held calls let go (unanswered: A never hears back).
    let held_ids: Vec<String> = receiver.seen(|s| {
        s.holding
            .iter()
            .filter(|(p, _, _)| p == "/a")
            .map(|(_, id, _)| id.clone())
            .collect()
    });
    receiver.release();
    assert!(held_ids.len() >= held.len());
    let at_kill = acked_count();
    poll(
        "100 more acknowledged deliveries after the kill",
        Duration::from_secs(60),
        || (acked_count() >= at_kill + 100).then_some(()),
    );
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.join().expect("worker");
    }
    let acked = acked.lock().expect("lock").clone();

    // Every acknowledged delivery is delivered: A's claims taken over by B once their leases ran
    // out, the rest handled by B as usual.
    let deadline = Instant::now() + Duration::from_secs(90);
    let missing = loop {
        let now = statuses(&b);
        let missing: Vec<(String, Option<String>)> = acked
            .iter()
            .filter(|id| now.get(*id).map(String::as_str) != Some("delivered"))
            .map(|id| (id.clone(), now.get(id).cloned()))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        std::thread::park_timeout(Duration::from_millis(200));
    };
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged deliveries not delivered: {:?}; logs of B:\n{}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(20)],
        b.logs()
    );
    let (arrivals, answered) = receiver.seen(|s| (s.arrivals.clone(), s.answered.clone()));
    let answered_ids: HashSet<&str> = answered.iter().map(|(_, id)| id.as_str()).collect();
    let unhandled: Vec<&String> = acked
        .iter()
        .filter(|id| !answered_ids.contains(id.as_str()))
        .collect();
    assert!(
        unhandled.is_empty(),
        "delivered but never answered by the receiver: {unhandled:?}"
    );
    // The calls A held were taken over by B, and only after A died (never from a live lease).
    let mut takeover = Duration::ZERO;
    for id in &held_ids {
        let by_b: Vec<&Arrival> = arrivals
            .iter()
            .filter(|r| r.path == "/b" && r.delivery_id == *id)
            .collect();
        assert!(
            !by_b.is_empty(),
            "{id}, held by A when it died, never ran on B"
        );
        for r in &by_b {
            assert!(
                r.at >= killed_at,
                "{id} ran on B while A still held its lease"
            );
        }
        takeover = takeover.max(by_b[0].at - killed_at);
        assert!(
            answered.iter().any(|(p, a)| p == "/b" && a == id),
            "{id} not answered on B"
        );
    }
    eprintln!(
        "killed A holding {} calls (oldest held {:?}); B took the last over {takeover:?} after \
         the kill; {} deliveries acknowledged ({} after the kill), {} calls in all",
        held_ids.len(),
        held.iter().map(|(_, since)| killed_at - *since).max(),
        acked.len(),
        acked.len() - at_kill,
        arrivals.len(),
    );
}

// ---------------------------------------------------------------------------------------------
// 4. The database going away and coming back.

/// A TCP forwarder from a local port to the PostgreSQL server, which the test can cut (listener
/// closed, every live connection shut) and resume on the same port.
struct Forwarder {
    port: u16,
    target: SocketAddr,
    running: Option<Forwarding>,
}

struct Forwarding {
    stop: Arc<AtomicBool>,
    accepting: JoinHandle<()>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
}

impl Forwarder {
    /// Where the PostgreSQL test server really is, and its user.
    fn postgres() -> (SocketAddr, String) {
        let url = server_url();
        let rest = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
        let (user, host) = rest.rsplit_once('@').unwrap_or(("postgres", rest));
        let target = host
            .to_socket_addrs()
            .expect("PostgreSQL address")
            .next()
            .expect("an address");
        (target, user.to_owned())
    }

    /// A forwarder on a free port, not forwarding yet.
    fn stopped(target: SocketAddr) -> Forwarder {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        Forwarder {
            port,
            target,
            running: None,
        }
    }

    fn start(target: SocketAddr) -> Forwarder {
        let mut forwarder = Self::stopped(target);
        forwarder.resume();
        forwarder
    }

    /// The database `db` through this forwarder.
    fn url(&self, user: &str, db: &TestDb) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{}", self.port, db.name)
    }

    /// Listens (again) on the same port and forwards each connection.
    fn resume(&mut self) {
        assert!(self.running.is_none());
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("bind forwarder port");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::<TcpStream>::new()));
        let (stop2, conns, target) = (stop.clone(), connections.clone(), self.target);
        let accepting = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::park_timeout(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => continue,
                };
                let _ = client.set_nonblocking(false);
                let Ok(upstream) = TcpStream::connect(target) else {
                    continue;
                };
                let pipe = |mut from: TcpStream, mut to: TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                };
                let clones = (
                    client.try_clone(),
                    upstream.try_clone(),
                    client.try_clone(),
                    upstream.try_clone(),
                );
                let (Ok(c1), Ok(u1), Ok(c2), Ok(u2)) = clones else {
                    continue;
                };
                conns.lock().expect("lock").extend([c2, u2]);
                pipe(c1, upstream);
                pipe(u1, client);
            }
            // The listener is dropped here: new connections are refused.
        });
        self.running = Some(Forwarding {
            stop,
            accepting,
            connections,
        });
    }

    /// Closes the listener and every live connection, as a database that went away.
    fn cut(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        running.stop.store(true, Ordering::SeqCst);
        running.accepting.join().expect("forwarder thread");
        for conn in running.connections.lock().expect("lock").drain(..) {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.cut();
    }
}

fn has_retry_after(answer: &Answer) -> bool {
    answer
        .headers
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("retry-after:"))
}

/// Delivers new deliveries (ids `{prefix}-N`) until one gets `status`; asserts each answer is
/// either 202 or 503, and returns the one with `status` and the ids that got 202.
fn deliver_until(server: &TestServer, prefix: &str, status: u16) -> (Answer, Vec<String>) {
    let body = label_body("clabeloutage0000000000001", "2026-11-20T10:00:00Z");
    let mut n = 0;
    let mut stored = Vec::new();
    let answer = poll(
        &format!("a delivery answered {status}"),
        Duration::from_secs(45),
        || {
            n += 1;
            let id = format!("{prefix}-{n}");
            let answer = deliver(server, &id, "LABEL_UPDATED", &body);
            assert!(matches!(answer.status, 202 | 503), "{id}: {answer:?}");
            if answer.status == 202 {
                stored.push(id);
            }
            (answer.status == status).then_some(answer)
        },
    );
    (answer, stored)
}

fn readyz_until(server: &TestServer, status: u16) {
    poll(
        &format!("/readyz to answer {status}"),
        Duration::from_secs(45),
        || (curl(&server.admin("/readyz"), &[]).status == status).then_some(()),
    );
}

#[test]
fn postgres_unreachable_gives_503_and_not_ready_then_recovers_without_a_restart() {
    let Some(db) = TestDb::create_blocking(
        "postgres_unreachable_gives_503_and_not_ready_then_recovers_without_a_restart",
    ) else {
        return;
    };
    let (target, user) = Forwarder::postgres();
    let mut forwarder = Forwarder::start(target);
    let mut server = TestServer::start(&pg_config(&forwarder.url(&user, &db), ""));
    assert!(server.admin_url.is_some());
    let pid = server.pid();
    let body = label_body("clabeloutage0000000000001", "2026-11-20T10:00:00Z");
    assert_eq!(
        deliver(&server, "cup-1", "LABEL_UPDATED", &body).status,
        202
    );
    assert_eq!(curl(&server.admin("/readyz"), &[]).status, 200);

    // The database goes away: deliveries are refused with 503 and Retry-After (Labelbox
    // retries), and the replica says it is not ready.
    let cut_at = Instant::now();
    forwarder.cut();
    let (refused, stored_while_cutting) = deliver_until(&server, "cdown", 503);
    assert!(has_retry_after(&refused), "{refused:?}");
    readyz_until(&server, 503);
    let noticed = cut_at.elapsed();

    // It comes back on the same address: the same process recovers by itself.
    let resumed_at = Instant::now();
    forwarder.resume();
    readyz_until(&server, 200);
    let (accepted, stored_after) = deliver_until(&server, "cback", 202);
    assert_eq!(accepted.status, 202);
    let recovered = resumed_at.elapsed();
    assert!(server.is_running(), "the server exited");
    assert_eq!(server.pid(), pid, "the server was restarted");
    eprintln!(
        "outage noticed after {noticed:?}; recovered {recovered:?} after the database came back"
    );

    // Whatever got 202 is stored; nothing refused is.
    let now = statuses(&server);
    for id in std::iter::once(&"cup-1".to_owned())
        .chain(&stored_while_cutting)
        .chain(&stored_after)
    {
        assert!(now.contains_key(id), "{id} acknowledged but not stored");
    }
    let refused_stored = now
        .keys()
        .filter(|id| id.starts_with("cdown") && !stored_while_cutting.contains(*id))
        .count();
    assert_eq!(refused_stored, 0, "{now:?}");
}

/// Polls until `/metrics` has `labelhook_store_ready` at `value` and the log has `line` (the
/// probe runs every 10 s).
fn store_ready_until(server: &TestServer, value: u8, line: &str) {
    let sample = format!("labelhook_store_ready {value}");
    let found = poll_for(Duration::from_secs(45), || {
        let metrics = curl(&server.admin("/metrics"), &[]).body;
        (metrics.lines().any(|l| l == sample) && server.logs().contains(line)).then_some(())
    });
    assert!(
        found.is_some(),
        "timed out waiting for {sample} and a {line:?} log line; /metrics:\n{}\nlogs:\n{}",
        curl(&server.admin("/metrics"), &[]).body,
        server.logs()
    );
}

#[test]
fn a_database_that_does_not_exist_stops_the_start_with_the_command_that_creates_it() {
    // The server is there (this test's own database shows it); the database named is not.
    let Some(db) = TestDb::create_blocking(
        "a_database_that_does_not_exist_stops_the_start_with_the_command_that_creates_it",
    ) else {
        return;
    };
    let missing = format!("{}_missing", db.name);
    let (_, user) = Forwarder::postgres();
    // The server as the URL names it: what the message names.
    let server = server_url();
    let (host, port) = server
        .rsplit_once('@')
        .map_or(server.as_str(), |(_, at)| at)
        .rsplit_once(':')
        .expect("host:port");
    let dir = tempfile::tempdir().expect("temp");
    let config = dir.path().join("labelhook.toml");
    std::fs::write(&config, pg_config(&format!("{server}/{missing}"), "")).expect("write");
    let run = |args: &[&str]| {
        let mut command = Command::new(bin());
        command
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("LH_TEST_SECRET", SECRET)
            .env_remove("LABELHOOK_CONFIG");
        output_within(command, Duration::from_secs(30))
    };
    let expected = format!(
        "error: store.url names the database \"{missing}\" on {host}:{port}, which does not \
         exist. labelhook creates its tables but not the database; create it, owned by \
         \"{user}\", as a role that may create databases, then start again: createdb -h {host} \
         -p {port} -O {user} {missing}"
    );
    // `serve` exits 1 at once with that one error, before listening; so do the CLI's commands.
    for args in [&["serve"][..], &["events", "list"]] {
        let out = run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            output_text(&out)
        );
        assert!(out.stdout.is_empty(), "{args:?}: {}", output_text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(errors, [expected.as_str()], "{args:?}:\n{stderr}");
    }
    // Nothing was created on the way.
    let exists = runtime().block_on(async {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", server_url()))
            .await
            .expect("connect");
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(&missing)
            .fetch_one(&mut admin)
            .await
            .expect("query")
    });
    assert_eq!(exists, 0, "{missing} was created");
}

#[test]
fn a_replica_started_while_postgres_is_unreachable_answers_503_then_recovers() {
    let Some(db) = TestDb::create_blocking(
        "a_replica_started_while_postgres_is_unreachable_answers_503_then_recovers",
    ) else {
        return;
    };
    let (target, user) = Forwarder::postgres();
    let mut forwarder = Forwarder::stopped(target);
    // Starts (prints its listening line) although nothing answers on the database's port.
    let booting = Instant::now();
    let mut server = TestServer::start(&pg_config(&forwarder.url(&user, &db), ""));
    eprintln!("listening {:?} after the start", booting.elapsed());
    let pid = server.pid();
    let body = label_body("clabeloutage0000000000001", "2026-11-20T10:00:00Z");
    let refusing = Instant::now();
    let refused = deliver(&server, "cearly", "LABEL_UPDATED", &body);
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(has_retry_after(&refused), "{refused:?}");
    let refused_in = refusing.elapsed();
    assert_eq!(curl(&server.admin("/readyz"), &[]).status, 503);
    eprintln!(
        "503 in {refused_in:?}, then not ready in {:?}",
        refusing.elapsed() - refused_in
    );
    // The background probe says so too, whether or not anything polls /readyz: the gauge the
    // LabelhookStoreNotReady alert watches, and a log line with the reason.
    store_ready_until(&server, 0, "store not ready");

    let resumed_at = Instant::now();
    forwarder.resume();
    readyz_until(&server, 200);
    store_ready_until(&server, 1, "store ready again");
    let ready = resumed_at.elapsed();
    let (_, stored) = deliver_until(&server, "clate", 202);
    eprintln!(
        "started with the database down: ready {ready:?} and accepting {:?} after it came back",
        resumed_at.elapsed()
    );
    assert!(server.is_running());
    assert_eq!(server.pid(), pid);
    let now = statuses(&server);
    assert!(now.contains_key(&stored[0]), "{now:?}");
    assert!(!now.contains_key("cearly"), "{now:?}");
}

/// How long a delivery may wait for its 503 while the database is unreachable: the pool gives up
/// on a connection after 3 s, /readyz after 5 s; this leaves room for a slow debug build.
const REFUSE_WITHIN: Duration = Duration::from_secs(10);

#[test]
fn concurrent_deliveries_to_a_replica_that_never_reached_postgres_are_refused_promptly() {
    let Some(db) = TestDb::create_blocking(
        "concurrent_deliveries_to_a_replica_that_never_reached_postgres_are_refused_promptly",
    ) else {
        return;
    };
    let (target, user) = Forwarder::postgres();
    let forwarder = Forwarder::stopped(target);
    let server = TestServer::start(&pg_config(&forwarder.url(&user, &db), ""));
    let body = label_body("clabeloutage0000000000001", "2026-11-20T10:00:00Z");
    // Labelbox sends many deliveries at once; during an outage each must be told 503 (and when
    // to retry) within the pool's bound, not be kept waiting behind the others' attempts.
    let started = Instant::now();
    let answers: Vec<(u16, bool, Duration)> = std::thread::scope(|s| {
        let senders: Vec<_> = (0..8)
            .map(|i| {
                let (server, body) = (&server, &body);
                s.spawn(move || {
                    let answer = deliver(server, &format!("cburst{i}"), "LABEL_UPDATED", body);
                    (answer.status, has_retry_after(&answer), started.elapsed())
                })
            })
            .collect();
        senders
            .into_iter()
            .map(|h| h.join().expect("sender"))
            .collect()
    });
    assert!(
        answers
            .iter()
            .all(|(status, retry_after, _)| *status == 503 && *retry_after),
        "{answers:?}"
    );
    let slowest = answers.iter().map(|(_, _, t)| *t).max().unwrap_or_default();
    assert!(
        slowest < REFUSE_WITHIN,
        "the last of 8 concurrent deliveries got its 503 after {slowest:?}: {answers:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. A large body across replicas.

/// Size of the large body's `label` string: twice the memory bound, so that a process holding
/// the body whole would fail the bound. (200 MiB took about 60 s through the debug build on two
/// cores, most of it in hashing, parsing and copying at debug speed; 128 MiB takes about 40.)
/// `LABELHOOK_TEST_LARGE_MIB=512` runs it at the size the replicas issue names.
fn large_label_bytes() -> usize {
    std::env::var("LABELHOOK_TEST_LARGE_MIB")
        .ok()
        .and_then(|mib| mib.parse::<usize>().ok())
        .map_or(128 << 20, |mib| mib << 20)
}
const RSS_GROWTH_MAX: u64 = 64 << 20;

/// Writes a valid LABEL_UPDATED body whose `label` is `label_bytes` long, without holding it in
/// memory; the `label` field sits before `project` and `dataRow`, so the parser must stream
/// past it. Returns the body's length.
fn write_large_label(path: &Path, label_id: &str, label_bytes: usize) -> u64 {
    let file = std::fs::File::create(path).expect("create body");
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let head = format!(
        r#"{{"id":"{label_id}","createdAt":"2026-11-01T00:00:00Z","updatedAt":"2026-11-20T10:00:00Z","label":""#
    );
    let tail = format!(r#"","project":{{"id":"{PROJECT_ID}"}},"dataRow":{{"id":"cdrow"}}}}"#);
    out.write_all(head.as_bytes()).expect("write");
    let pattern: Vec<u8> = (0..1 << 16)
        .map(|i: u32| b"abcdefghijklmnopqrstuvwxyz0123456789"[(i % 36) as usize])
        .collect();
    let mut left = label_bytes;
    while left > 0 {
        let n = left.min(pattern.len());
        out.write_all(&pattern[..n]).expect("write");
        left -= n;
    }
    out.write_all(tail.as_bytes()).expect("write");
    out.flush().expect("flush");
    (head.len() + label_bytes + tail.len()) as u64
}

/// Checks that the file handler's output is exactly one line: the event's header, then
/// `"body":` followed by the body byte for byte, then `}`. Streams both files.
fn assert_line_holds_body(output: &Path, body: &Path, delivery_id: &str) {
    let mut line = BufReader::with_capacity(1 << 20, std::fs::File::open(output).expect("output"));
    let mut head = Vec::new();
    // The header is small JSON; it ends where the body begins.
    let marker = b",\"body\":";
    while !head.ends_with(marker) {
        let mut byte = [0];
        line.read_exact(&mut byte)
            .expect("the line ends before its body");
        head.push(byte[0]);
        assert!(
            head.len() < 4096,
            "no body in {:?}",
            String::from_utf8_lossy(&head)
        );
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with('{'), "{head}");
    assert!(
        head.contains(&format!("\"delivery_id\":\"{delivery_id}\"")),
        "{head}"
    );
    let mut expected = BufReader::with_capacity(1 << 20, std::fs::File::open(body).expect("body"));
    let (mut want, mut got) = (vec![0; 1 << 20], vec![0; 1 << 20]);
    let mut offset = 0_u64;
    loop {
        let n = expected.read(&mut want).expect("read body");
        if n == 0 {
            break;
        }
        line.read_exact(&mut got[..n])
            .unwrap_or_else(|e| panic!("the line's body ends at {offset}: {e}"));
        assert!(
            want[..n] == got[..n],
            "the line's body differs from {offset} on"
        );
        offset += n as u64;
    }
    let mut rest = Vec::new();
    line.read_to_end(&mut rest).expect("rest");
    assert_eq!(rest, b"}\n", "after the body");
}

#[test]
fn a_large_body_accepted_by_one_replica_is_handled_by_the_other_with_flat_memory() {
    let Some(db) = TestDb::create_blocking(
        "a_large_body_accepted_by_one_replica_is_handled_by_the_other_with_flat_memory",
    ) else {
        return;
    };
    let routes = r#"
[dispatch]
poll_interval = "100ms"
ENABLED

[[handler]]
name = "archive"
kind = "file"
path = "STORE_DIR/events.jsonl"

[[route]]
topics = ["LABEL_*"]
handlers = ["archive"]
"#;
    // A only receives; B only handles what A stored (B's listener gets no delivery).
    let a = TestServer::start(&pg_config(
        &db.url,
        &routes.replace("ENABLED", "enabled = false"),
    ));
    let b = TestServer::start(&pg_config(&db.url, &routes.replace("ENABLED", "")));
    let rss_at_start = [a.proc_status_bytes("VmRSS"), b.proc_status_bytes("VmRSS")];

    let started = Instant::now();
    let body_path = a.dir.path().join("large.json");
    let len = write_large_label(&body_path, "clabellarge00000000000001", large_label_bytes());
    let sig = format!("X-Hub-Signature: {}", sign_file(&body_path));
    let written = started.elapsed();
    let data = format!("@{}", body_path.display());
    let answer = curl(
        &a.url("/webhooks/labelbox"),
        &[
            "-H",
            "Content-Type: application/json",
            "-H",
            "X-Labelbox-Event: LABEL_UPDATED",
            "-H",
            "X-Labelbox-Id: clarge1",
            "-H",
            &sig,
            "--data-binary",
            &data,
            // curl's last --max-time wins: the upload alone may take minutes at debug speed.
            "--max-time",
            "900",
        ],
    );
    assert_eq!(answer.status, 202, "{answer:?}\n{}", a.logs());
    let accepted = started.elapsed();

    let output = b.dir.path().join("events.jsonl");
    // About a minute per 128 MiB at debug speed on two cores, with room to spare.
    let limit = Duration::from_secs(120 * (large_label_bytes() as u64).div_ceil(128 << 20));
    poll_for(limit, || {
        (b.status_of("clarge1").as_deref() == Some("delivered")).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the large delivery is {:?}, not delivered; logs of B:\n{}",
            b.status_of("clarge1"),
            b.logs()
        )
    });
    let delivered = started.elapsed();
    // A never handled anything: the line is B's.
    assert!(!a.dir.path().join("events.jsonl").exists());
    let listed = b.events();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["body_len"], len);
    assert_line_holds_body(&output, &body_path, "clarge1");

    let peaks = [a.proc_status_bytes("VmHWM"), b.proc_status_bytes("VmHWM")];
    eprintln!(
        "{len} bytes: written and signed in {written:?}, accepted (202) at {accepted:?}, \
         delivered at {delivered:?}, checked at {:?}; RSS at start A {} MiB, B {} MiB; \
         peak A {} MiB, B {} MiB",
        started.elapsed(),
        rss_at_start[0] >> 20,
        rss_at_start[1] >> 20,
        peaks[0] >> 20,
        peaks[1] >> 20,
    );
    for (name, (peak, start)) in ["A (receiving)", "B (handling)"]
        .iter()
        .zip(peaks.iter().zip(rss_at_start))
    {
        let growth = peak.saturating_sub(start);
        assert!(
            growth < RSS_GROWTH_MAX,
            "{name} grew by {} MiB handling a {} MiB body",
            growth >> 20,
            len >> 20
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 6. A database reached over TLS.

#[test]
fn a_database_url_with_sslmode_require_is_served_over_tls() {
    let Some(db) =
        TestDb::create_blocking("a_database_url_with_sslmode_require_is_served_over_tls")
    else {
        return;
    };
    let url = format!("{}?sslmode=require", db.url);
    let server = TestServer::start(&pg_config(&url, ""));
    let body = label_body("clabeltls0000000000000001", "2026-11-20T10:00:00Z");
    let answer = deliver(&server, "ctls-1", "LABEL_UPDATED", &body);
    assert_eq!(answer.status, 202, "{}", answer.body);
    // The server's own view: every connection of labelhook's to this database is encrypted.
    let query = format!(
        "SELECT coalesce(bool_and(s.ssl), false), count(*) FROM pg_stat_ssl s \
         JOIN pg_stat_activity a USING (pid) WHERE a.datname = '{}' \
         AND a.pid <> pg_backend_pid()",
        db.name
    );
    let (all_tls, count): (bool, i64) = runtime()
        .block_on(async {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&format!("{}/postgres", server_url()))
                .await
                .expect("connect");
            sqlx::query_as(&query).fetch_one(&mut conn).await
        })
        .expect("pg_stat_ssl");
    assert!(count > 0, "labelhook holds no connection to its database");
    assert!(all_tls, "a connection without TLS");
}
