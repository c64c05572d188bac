//! `labelhook bench`, the real binary: its two-second lines and summary (as the README shows
//! them), every accepted delivery handled once the load stops, `--json`, Ctrl-C, PostgreSQL in
//! a database of its own that is dropped afterwards, and bad input refused before anything is
//! made.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::postgres::{runtime, TestDb};
use crate::readme::{readme_blocks, RUN_BY_BENCH_TEST};

/// A bench of a few seconds, its drain and its start and stop must fit in this.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A running `labelhook bench`, its stdout read line by line.
struct Bench {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Bench {
    fn start(args: &[&str]) -> Bench {
        Self::spawn(Command::new(bin()).arg("bench").args(args))
    }

    fn spawn(command: &mut Command) -> Bench {
        let mut child = command
            .env_remove("LABELHOOK_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn labelhook bench");
        let lines = stdout_lines(&mut child);
        Bench {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one satisfies `found` (bounded).
    fn wait_for_line(&mut self, found: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + RUN_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!("no such line; stdout so far:\n{}", self.seen.join("\n"))
            });
            self.seen.push(line.clone());
            if found(&line) {
                return;
            }
        }
    }

    /// Waits (bounded) for the exit; its status, all of stdout and stderr.
    fn finish(mut self) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + RUN_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("labelhook bench did not end:\n{}", self.seen.join("\n"));
            }
            std::thread::park_timeout(Duration::from_millis(20));
        };
        // The reader thread ends with the pipe.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.seen.push(line);
        }
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        (status, self.seen.join("\n") + "\n", stderr)
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The number after `label` in the summary line that starts with it.
fn summary_count(out: &str, label: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label} line:\n{out}"));
    let number = line.trim_start()[label.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap_or_default();
    number
        .parse()
        .unwrap_or_else(|_| panic!("no count in {line:?}"))
}

/// A two-second line: seven columns, the first `<n>s`, the rest numbers (p99 `-` without
/// answers).
fn is_interval_line(line: &str) -> bool {
    let cells: Vec<&str> = line.split_whitespace().collect();
    cells.len() == 7
        && cells[0].strip_suffix('s').is_some_and(is_number)
        && cells[1..].iter().all(|c| is_number(c) || *c == "-")
}

fn is_number(text: &str) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_ascii_digit() || c == '.')
}

/// A line with what changes from run to run masked: paths (`/tmp/labelhook-bench-x1Y2z3`)
/// and numbers, and runs of spaces collapsed.
fn shape(line: &str) -> String {
    let words: Vec<String> = line
        .split_whitespace()
        .map(|w| {
            if w.starts_with('/') {
                return "<path>".to_owned();
            }
            let mut masked = String::new();
            let mut in_number = false;
            for c in w.chars() {
                let digit = c.is_ascii_digit() || (in_number && c == '.');
                if digit && !in_number {
                    masked.push('#');
                } else if !digit {
                    masked.push(c);
                }
                in_number = digit;
            }
            masked
        })
        .collect();
    words.join(" ")
}

/// Everything but the two-second lines, masked, in order.
fn shape_of_the_rest(output: &str) -> Vec<String> {
    output
        .lines()
        .filter(|l| !l.trim().is_empty() && !is_interval_line(l))
        .map(shape)
        .collect()
}

/// The README's bench command, with its 10 s cut to 3 s: prints what the README shows (to the
/// numbers, which are the machine's), a line every two seconds, and a summary in which every
/// accepted delivery was handled; its temporary store is gone afterwards.
#[test]
fn the_readmes_bench_prints_its_lines_and_a_summary_with_everything_accepted_handled() {
    let blocks: Vec<_> = readme_blocks()
        .into_iter()
        .filter(|b| b.section == RUN_BY_BENCH_TEST)
        .collect();
    let command = blocks.iter().find(|b| b.lang == "sh").expect("a sh block");
    let shown = blocks
        .iter()
        .find(|b| b.lang.is_empty())
        .expect("its output");
    assert!(command.text.contains("--duration 10s"), "{}", command.text);
    let script = command
        .text
        .replace("./target/release/labelhook", bin())
        .replace("--duration 10s", "--duration 3s");
    let dir = tempfile::tempdir().expect("temp");
    let bench = Bench::spawn(
        Command::new("sh")
            .args(["-c", &script])
            .current_dir(dir.path()),
    );
    let (status, out, stderr) = bench.finish();
    assert!(status.success(), "{out}{stderr}");

    assert_eq!(
        shape_of_the_rest(&out),
        shape_of_the_rest(&shown.text),
        "README.md shows\n{}\nbut the command printed\n{out}",
        shown.text
    );
    assert!(shown.text.lines().any(is_interval_line), "{}", shown.text);
    let intervals = out.lines().filter(|l| is_interval_line(l)).count();
    assert!(intervals >= 1, "{out}");
    assert!(out.contains("load stopped (--duration) after 3."), "{out}");
    let accepted = summary_count(&out, "accepted");
    assert!(accepted > 0, "{out}");
    assert_eq!(summary_count(&out, "handled"), accepted, "{out}");
    assert!(out.contains("drained in "), "{out}");

    let store = out
        .split("SQLite in ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .expect("the store's directory");
    assert!(store.contains("labelhook-bench-"), "{store}");
    assert!(!Path::new(store).exists(), "{store} was left behind");
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn of_kind<'a>(lines: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|l| l["kind"] == kind).collect()
}

/// Checks a `--json` run's lines and returns its start and summary objects.
fn check_json_run(out: &str) -> (serde_json::Value, serde_json::Value) {
    let lines = json_lines(out);
    let kinds: Vec<&str> = lines.iter().filter_map(|l| l["kind"].as_str()).collect();
    assert_eq!(kinds.len(), lines.len(), "{out}");
    assert_eq!(kinds.first(), Some(&"start"), "{out}");
    assert_eq!(kinds.last(), Some(&"summary"), "{out}");
    assert_eq!(of_kind(&lines, "load_stopped").len(), 1, "{out}");
    let intervals = of_kind(&lines, "interval");
    assert!(!intervals.is_empty(), "{out}");
    for i in &intervals {
        for key in [
            "elapsed_s",
            "accepted_per_s",
            "handled_per_s",
            "backlog",
            "non_2xx",
        ] {
            assert!(i[key].is_number(), "{key} in {i}");
        }
        assert!(i["p99_ms"].is_number() || i["p99_ms"].is_null(), "{i}");
    }
    // While the load runs, answers come and their p99 is known.
    assert!(
        intervals[0]["p99_ms"].as_f64().is_some_and(|p| p > 0.0),
        "{out}"
    );
    let summary = (*of_kind(&lines, "summary")[0]).clone();
    let accepted = summary["accepted"].as_u64().expect("accepted");
    assert!(accepted > 0, "{summary}");
    assert_eq!(summary["handled"].as_u64(), Some(accepted), "{summary}");
    assert!(summary["drain_s"].is_number(), "{summary}");
    assert_eq!(summary["non_2xx"], 0, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");
    let latency = &summary["latency"];
    let (p50, p99, max) = (
        latency["p50_ms"].as_f64().expect("p50"),
        latency["p99_ms"].as_f64().expect("p99"),
        latency["max_ms"].as_f64().expect("max"),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{latency}");
    (lines[0].clone(), summary)
}

/// One busy label (every delivery in one lane, handled in order) with bodies too large to be
/// kept in the row (store.inline_body_max_bytes, 64 KiB): still every accepted one handled.
#[test]
fn bench_json_on_one_label_with_large_bodies_hands_every_accepted_delivery_on() {
    let dir = tempfile::tempdir().expect("temp");
    let bench = Bench::start(&[
        "--json",
        "--duration",
        "3s",
        "--connections",
        "4",
        "--labels",
        "1",
        "--body-bytes",
        "70000",
        "--dir",
        &dir.path().display().to_string(),
    ]);
    let (status, out, stderr) = bench.finish();
    assert!(status.success(), "{out}{stderr}");
    let (start, summary) = check_json_run(&out);
    assert_eq!(start["store"], "sqlite", "{start}");
    assert_eq!(start["body_bytes"], 70000, "{start}");
    assert_eq!(start["labels"], 1, "{start}");
    assert!(
        summary["load_s"].as_f64().is_some_and(|s| s >= 3.0),
        "{summary}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).expect("read").collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Without `--duration` the load runs until Ctrl-C (SIGINT); then the bench drains and sums
/// up, and exits 0.
#[test]
fn bench_stops_its_load_at_ctrl_c_and_still_drains_and_sums_up() {
    let dir = tempfile::tempdir().expect("temp");
    let mut bench = Bench::start(&[
        "--connections",
        "2",
        "--labels",
        "10",
        "--dir",
        &dir.path().display().to_string(),
    ]);
    bench.wait_for_line(|l| l.contains("until Ctrl-C"));
    bench.wait_for_line(is_interval_line);
    let status = Command::new("kill")
        .args(["-INT", &bench.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let (status, out, stderr) = bench.finish();
    assert!(status.success(), "{out}{stderr}");
    assert!(out.contains("load stopped (signal) after "), "{out}");
    let accepted = summary_count(&out, "accepted");
    assert!(accepted > 0, "{out}");
    assert_eq!(summary_count(&out, "handled"), accepted, "{out}");
}

/// `--store` on PostgreSQL: the bench runs in a database it creates on that server and drops
/// afterwards; the database the URL names is left as it was (empty here).
#[test]
fn bench_on_postgres_uses_a_database_of_its_own_and_drops_it() {
    let Some(db) = TestDb::create_blocking("bench_on_postgres") else {
        return;
    };
    let bench = Bench::start(&[
        "--json",
        "--store",
        &db.url,
        "--duration",
        "3s",
        "--connections",
        "4",
    ]);
    let (status, out, stderr) = bench.finish();
    assert!(status.success(), "{out}{stderr}");
    let (start, _summary) = check_json_run(&out);
    assert_eq!(start["store"], "postgres", "{start}");
    let made = start["database"].as_str().expect("the database it made");
    assert!(made.starts_with("labelhook_bench_"), "{made}");

    runtime().block_on(async {
        use sqlx::Connection;
        let mut named = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .fetch_one(&mut named)
        .await
        .expect("count tables");
        assert_eq!(tables, 0, "the bench wrote into the database --store named");
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(made)
            .fetch_one(&mut named)
            .await
            .expect("look for the bench's database");
        assert_eq!(left, 0, "{made} was not dropped");
        let _ = named.close().await;
    });
}

/// Input the bench cannot use is refused with a message that says why, before any store is
/// made.
#[test]
fn bench_refuses_bad_input_with_a_clear_message_and_makes_nothing() {
    let dir = tempfile::tempdir().expect("temp");
    let dir_arg = dir.path().display().to_string();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--body-bytes", "100", "--dir", &dir_arg],
            "error: --body-bytes 100: a LABEL_UPDATED body takes at least ",
        ),
        (
            &["--store", "sqlite://bench.db"],
            "error: --store sqlite://bench.db: not a PostgreSQL URL",
        ),
        (
            &["--store", "postgres://bench:hunter2@127.0.0.1:1/x"],
            "error: cannot connect to PostgreSQL at postgres://bench:***@127.0.0.1:1/x",
        ),
        (&["--duration", "0s"], "must be more than 0s"),
    ];
    for (args, expected) in cases {
        let out = Command::new(bin())
            .arg("bench")
            .args(args)
            .env_remove("LABELHOOK_CONFIG")
            .output()
            .expect("run");
        let text = output_text(&out);
        assert!(!out.status.success(), "{args:?}: {text}");
        assert!(text.contains(expected), "{args:?}: {text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).expect("read").collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
