//! The `file` handler's output across a crash (issue 22, fault 1): whatever a crash left at the
//! end of the file, every line a reader finds there afterwards is whole JSON, and each delivery
//! the store calls `delivered` has a line of its own.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::hostile::{archive_config, large_label};

/// A `file` handler on `STORE_DIR/events.jsonl` for every topic; bodies above 1 KiB are kept
/// as blob files, which the handler streams into the file in 64 KiB chunks.
fn events_jsonl_config() -> String {
    archive_config("STORE_DIR/events.jsonl", "")
}

/// Every line of the file parsed as JSON (a line that is not fails the test, naming it), and
/// whether the file ends with a newline.
fn parsed_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read(path).expect("read events.jsonl");
    assert!(
        text.is_empty() || text.ends_with(b"\n"),
        "the file ends in a partial line"
    );
    text.split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_slice(line).unwrap_or_else(|e| {
                let start = String::from_utf8_lossy(&line[..line.len().min(120)]);
                panic!(
                    "line {} ({} bytes) is not JSON: {e}: {start}...",
                    i + 1,
                    line.len()
                )
            })
        })
        .collect()
}

fn delivery_ids(lines: &[serde_json::Value]) -> Vec<&str> {
    lines
        .iter()
        .map(|l| l["delivery_id"].as_str().unwrap_or_default())
        .collect()
}

/// The server's log line saying what it cut, asserting it names `bytes`.
fn assert_cut_logged(server: &TestServer, bytes: u64) {
    let logs = server.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("bytes off the end of the file handler's output"))
        .unwrap_or_else(|| panic!("no line about the cut in the logs:\n{logs}"));
    assert!(line.contains(&format!("cut {bytes} bytes")), "{line}");
    assert!(line.contains("\"level\":\"WARN\""), "{line}");
}

/// A file that ends in a partial line before the server starts (what a crash in the middle of
/// an append leaves): before the fix the next record was appended right after it, glued into
/// one line that no reader could parse. Now the partial line is cut off (and logged with its
/// size) before the first append.
#[test]
fn a_partial_last_line_left_by_a_crash_is_cut_off_before_the_next_delivery_is_appended() {
    let config = events_jsonl_config();
    let dir = tempfile::tempdir().expect("temp");
    let whole = br#"{"seq":1,"delivery_id":"cearlier","body":{}}"#;
    let torn = format!(
        r#"{{"seq":2,"delivery_id":"ctorn","body":{{"padding":"{}"#,
        "p".repeat(70_000)
    );
    let mut text = whole.to_vec();
    text.push(b'\n');
    text.extend_from_slice(torn.as_bytes());
    // The server's temp dir is made by TestServer::start; the file must be there before it
    // starts, so the config names a file in this test's own directory.
    let path = dir.path().join("events.jsonl");
    std::fs::write(&path, &text).expect("write");
    let server =
        TestServer::start(&config.replace("STORE_DIR/events.jsonl", &path.display().to_string()));
    let answer = deliver(&server, "cafter", "LABEL_UPDATED", LABEL_UPDATED);
    assert_eq!(answer.status, 202, "{answer:?}");
    server.wait_for_status("cafter", "delivered");
    let lines = parsed_lines(&path);
    assert_eq!(delivery_ids(&lines), ["cearlier", "cafter"]);
    assert_cut_logged(&server, torn.len() as u64);
}

/// A `kill -9` while the handler streams a large body into the file leaves a partial line of
/// the chunks written so far. After the restart the delivery is still pending, so it is
/// handled again: the partial line is cut off first, the delivery's line written whole, and
/// the next delivery's line after it.
#[test]
fn a_kill_9_while_a_large_body_is_appended_leaves_every_line_whole_after_the_restart() {
    let mut server = TestServer::start(&events_jsonl_config());
    let path = server.dir.path().join("events.jsonl");
    let body = large_label(48 << 20);
    let url = server.url("/webhooks/labelbox");
    let dir = server.dir.path().to_owned();
    let sender =
        std::thread::spawn(move || deliver_to(&url, &dir, "clarge", "LABEL_UPDATED", &body));
    // Killed once the handler has written a first 64 KiB chunk of the body, as in the
    // issue: far from the line's end.
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&path).map_or(0, |m| m.len()) < 64 * 1024 {
        assert!(
            Instant::now() < deadline,
            "the handler never started writing"
        );
        std::thread::park_timeout(Duration::from_micros(200));
    }
    server.kill9();
    let answer = sender.join().expect("sender");
    assert_eq!(answer.status, 202, "{answer:?}");
    let torn = std::fs::read(&path).expect("read");
    assert!(
        !torn.is_empty() && !torn.ends_with(b"\n"),
        "the kill came after the line was complete ({} bytes): no torn line to test",
        torn.len()
    );

    server.restart();
    let answer = deliver(&server, "cnext", "LABEL_UPDATED", LABEL_UPDATED);
    assert_eq!(answer.status, 202, "{answer:?}");
    server.wait_for_status("clarge", "delivered");
    server.wait_for_status("cnext", "delivered");
    let lines = parsed_lines(&path);
    let mut ids = delivery_ids(&lines);
    ids.sort_unstable();
    assert_eq!(ids, ["clarge", "cnext"]);
    let large = lines
        .iter()
        .find(|l| l["delivery_id"] == "clarge")
        .expect("clarge");
    assert_eq!(
        large["body"]["padding"].as_str().map(str::len),
        Some(48 << 20)
    );
    assert_cut_logged(&server, torn.len() as u64);
    eprintln!(
        "figures: killed with {} bytes of the large line written; after the restart {} lines, \
         all JSON",
        torn.len(),
        lines.len()
    );
}
