//! A 2xx means the delivery is on disk: kill -9 right after a run of answers loses none, and
//! SIGTERM lets open requests finish.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::helpers::*;

#[test]
fn every_acknowledged_delivery_survives_kill_9_and_a_restart() {
    let mut server = TestServer::with_base("");
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let url = server.url("/webhooks/labelbox");
    let dir = server.dir.path().to_owned();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (acked, count, stop, url, dir) =
                (acked.clone(), count.clone(), stop.clone(), url.clone(), dir.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let id = format!("ckill{w:02}{n:018}");
                    let body = format!(
                        r#"{{"id":"clabel{w}{n}","updatedAt":"2026-01-01T00:00:{:02}Z","label":"{{}}"}}"#,
                        n % 60
                    );
                    let file = body_file(&dir, &format!("w{w}.json"), body.as_bytes());
                    let sig = format!("X-Hub-Signature: {}", sha1_sig(SECRET, body.as_bytes()));
                    let id_header = format!("X-Labelbox-Id: {id}");
                    let answer = curl(
                        &url,
                        &[
                            "-H", "Content-Type: application/json",
                            "-H", "X-Labelbox-Event: LABEL_UPDATED",
                            "-H", &id_header,
                            "-H", &sig,
                            "--data-binary", &file,
                        ],
                    );
                    if answer.status == 202 {
                        acked.lock().expect("lock").push(id);
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(Ordering::SeqCst) < 60 {
        assert!(Instant::now() < deadline, "too few deliveries acknowledged");
        std::thread::park_timeout(Duration::from_millis(5));
    }
    // Killed while the workers are still sending.
    server.kill9();
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.join().expect("worker");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() >= 60);
    // Read by the CLI straight from the store, with the server dead...
    let stored: std::collections::HashSet<String> = server
        .events()
        .iter()
        .map(|e| e["delivery_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    // ...and the server comes back on the same store and knows them as duplicates.
    server.restart();
    let again = deliver(&server, &acked[0], "LABEL_UPDATED", b"{}");
    assert_eq!(again.status, 202, "same id, other body: a new delivery");
    assert_eq!(curl(&server.admin("/readyz"), &[]).status, 200);
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits_0() {
    use std::io::{Read, Write};
    // A small inline limit makes the partial body spill to a blob file: the proof, visible from
    // outside, that the server is reading this request when the signal arrives.
    let mut server = TestServer::start(&base_config("").replace(
        "url = \"sqlite://STORE_DIR/labelhook.db\"",
        "url = \"sqlite://STORE_DIR/labelhook.db\"\ninline_body_max_bytes = 1024",
    ));
    let addr = server.base_url.trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(&addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let sig = sha1_sig(SECRET, LABEL_UPDATED);
    let sent = 1500;
    assert!(LABEL_UPDATED.len() > sent);
    let head = format!(
        "POST /webhooks/labelbox HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         X-Labelbox-Event: LABEL_UPDATED\r\nX-Labelbox-Id: cterm1\r\nX-Hub-Signature: {sig}\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n",
        LABEL_UPDATED.len()
    );
    stream.write_all(head.as_bytes()).expect("write");
    stream.write_all(&LABEL_UPDATED[..sent]).expect("write");
    let blobs = server.dir.path().join("labelhook.db.blobs");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&blobs).map_or(0, |d| d.count()) == 0 {
        assert!(
            Instant::now() < deadline,
            "the server never started reading the body"
        );
        std::thread::park_timeout(Duration::from_millis(10));
    }
    let pid = server.pid();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    // Wait (bounded) for the shutdown to begin, then finish the body.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.logs().contains("shutting down") {
        assert!(Instant::now() < deadline, "no shutdown log");
        std::thread::park_timeout(Duration::from_millis(10));
    }
    stream
        .write_all(&LABEL_UPDATED[sent..])
        .expect("write rest");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    let status = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(server.status_of("cterm1").is_some());
}

#[test]
fn a_second_server_on_the_same_database_refuses_to_start() {
    let server = TestServer::with_base("");
    let out = std::process::Command::new(bin())
        .args(["serve", "--config"])
        .arg(&server.config_path)
        .env("LH_TEST_SECRET", SECRET)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another labelhook server is using"),
        "{stderr}"
    );
    // The first one is unharmed.
    assert_eq!(curl(&server.admin("/readyz"), &[]).status, 200);
}

#[test]
fn a_body_kept_in_a_blob_file_survives_a_restart_with_the_store_url_spelled_differently() {
    let config = base_config("").replace(
        "url = \"sqlite://STORE_DIR/labelhook.db\"",
        "url = \"sqlite://STORE_DIR/labelhook.db\"\ninline_body_max_bytes = 1024",
    );
    let mut server = TestServer::start(&config);
    assert!(LABEL_UPDATED.len() > 1024);
    assert_eq!(
        deliver(&server, "cblob1", "LABEL_UPDATED", LABEL_UPDATED).status,
        202
    );
    let blobs = server.dir.path().join("labelhook.db.blobs");
    assert_eq!(std::fs::read_dir(&blobs).expect("blob dir").count(), 1);
    // Same database, another spelling of its path.
    let text = std::fs::read_to_string(&server.config_path).expect("config");
    let respelled = text.replace("/labelhook.db\"", "/./labelhook.db\"");
    assert_ne!(text, respelled);
    std::fs::write(&server.config_path, respelled).expect("write");
    server.restart();
    let shown = server.cli(&["events", "show", "cblob1"]);
    let stdout = String::from_utf8_lossy(&shown.stdout);
    let body = String::from_utf8_lossy(LABEL_UPDATED);
    assert!(stdout.contains(body.trim()), "{stdout}");
}
