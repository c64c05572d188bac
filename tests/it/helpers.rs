//! Starts the real `labelhook` binary on port 0 in a temporary directory and drives it with
//! curl, as an operator would.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The secret every test endpoint is configured with (through `LH_TEST_SECRET`).
pub const SECRET: &str = "test-secret-1";
/// A second, rotated-in secret configured inline on the endpoint.
pub const ROTATED_SECRET: &str = "test-secret-2";
/// How long the binary may take to print its `listening on` line.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

pub const LABEL_UPDATED: &[u8] = include_bytes!("../fixtures/label_updated.json");

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_labelhook")
}

/// The lines `child` writes to its piped stdout, as they come (read on a thread of their own,
/// so a test can wait for one with a timeout).
pub fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// The config used unless a test gives its own: loopback allowed, one endpoint, two secrets,
/// the admin listener (console, /metrics, /healthz, /readyz) on a port of its own.
pub fn base_config(extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
body_timeout = "30s"

[network]
allowlist = ["127.0.0.1/32"]

[store]
url = "sqlite://STORE_DIR/labelhook.db"

[[endpoint]]
name = "labelbox"
secrets = [{{ env = "LH_TEST_SECRET" }}, {{ value = "{ROTATED_SECRET}" }}]

{extra}
"#
    )
}

/// [`base_config`] with its store below `dir/store`, where a plain file stands instead of a
/// directory: the store cannot be opened until the test puts a directory at the returned path.
pub fn blocked_store_config(dir: &Path) -> (PathBuf, String) {
    let blocked = dir.join("store");
    std::fs::write(&blocked, b"not a directory").expect("write");
    let config = base_config("").replace(
        "sqlite://STORE_DIR/labelhook.db",
        &format!("sqlite://{}/labelhook.db", blocked.display()),
    );
    (blocked, config)
}

/// [`base_config`] on a shared PostgreSQL database at `store_url`, with a small connection
/// pool (the test server allows 100 connections in all, and tests run in parallel).
pub fn pg_config(store_url: &str, extra: &str) -> String {
    let sqlite = "url = \"sqlite://STORE_DIR/labelhook.db\"";
    let config = base_config(extra);
    assert!(config.contains(sqlite));
    config
        .replace("body_timeout = \"30s\"", "body_timeout = \"300s\"")
        .replace(
            sqlite,
            &format!("url = \"{store_url}\"\nmax_connections = 4"),
        )
}

pub struct TestServer {
    pub dir: tempfile::TempDir,
    /// The config as given, `STORE_DIR` not yet replaced, for [`TestServer::replica`].
    template: String,
    pub config_path: PathBuf,
    pub base_url: String,
    pub admin_url: Option<String>,
    child: Option<Child>,
    stderr_path: PathBuf,
}

impl TestServer {
    /// Writes `config` (with `STORE_DIR` replaced by the temp dir) and starts the server.
    pub fn start(config: &str) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("labelhook.toml");
        std::fs::write(
            &config_path,
            config.replace("STORE_DIR", &dir.path().display().to_string()),
        )
        .expect("write config");
        let stderr_path = dir.path().join("stderr.log");
        let mut server = TestServer {
            dir,
            template: config.to_owned(),
            config_path,
            base_url: String::new(),
            admin_url: None,
            child: None,
            stderr_path,
        };
        server.boot();
        server
    }

    pub fn with_base(extra: &str) -> TestServer {
        Self::start(&base_config(extra))
    }

    /// Another server on the same config (so the same store when it is shared), in a temp dir
    /// of its own: `STORE_DIR` names the new one's directory.
    pub fn replica(&self) -> TestServer {
        Self::start(&self.template)
    }

    /// Starts the binary and waits for its `listening on` line (bounded, no sleeping).
    fn boot(&mut self) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .expect("stderr log");
        let mut child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("LH_TEST_SECRET", SECRET)
            .env("RUST_LOG", "info")
            .env_remove("LABELHOOK_CONFIG")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn labelhook");
        let rx = stdout_lines(&mut child);
        self.child = Some(child);
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("listening on ") {
                        self.base_url = url.to_owned();
                        // The admin line, when there is one, follows at once.
                        if let Ok(next) = rx.recv_timeout(Duration::from_millis(200)) {
                            self.admin_url =
                                next.strip_prefix("admin listening on ").map(str::to_owned);
                        }
                        return;
                    }
                }
                Err(_) => panic!(
                    "labelhook did not print its listening line in time; stderr:\n{}",
                    self.logs()
                ),
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// True while the process has not exited (it is the same process: never restarted).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// A `kB` field of `/proc/<pid>/status`, such as `VmRSS` or `VmHWM`, in bytes.
    pub fn proc_status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in /proc/<pid>/status"));
        let kib: u64 = line
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .expect("kB value");
        kib * 1024
    }

    /// A URL on the admin listener (or on the main one when there is no separate admin).
    pub fn admin(&self, path: &str) -> String {
        format!(
            "{}{path}",
            self.admin_url.as_deref().unwrap_or(&self.base_url)
        )
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "labelhook did not stop after SIGTERM"
            );
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }

    /// Starts the binary again on the same config and store (a new port).
    pub fn restart(&mut self) {
        self.kill9();
        self.boot();
    }

    /// Runs a CLI command against this server's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .env("LH_TEST_SECRET", SECRET)
            .env_remove("LABELHOOK_CONFIG")
            .output()
            .expect("run labelhook")
    }

    /// `events list --json` as parsed objects.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["events", "list", "--json", "--limit", "100000"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    }

    pub fn status_of(&self, delivery_id: &str) -> Option<String> {
        self.events()
            .into_iter()
            .find(|e| e["delivery_id"] == delivery_id)
            .map(|e| e["status"].as_str().unwrap_or_default().to_owned())
    }

    /// Polls (bounded) until `delivery_id` has `status`.
    pub fn wait_for_status(&self, delivery_id: &str, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.status_of(delivery_id);
            if now.as_deref() == Some(status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{delivery_id} stayed {now:?}, expected {status}; logs:\n{}",
                self.logs()
            );
            std::thread::park_timeout(Duration::from_millis(50));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An HTTP answer as curl saw it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub headers: String,
}

/// Runs curl with `args` against `url`, returning status, headers and body.
pub fn curl(url: &str, args: &[&str]) -> Answer {
    let dir = tempfile::tempdir().expect("temp");
    let headers_path = dir.path().join("headers");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "-o", "-", "-D"])
        .arg(&headers_path)
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    Answer {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        headers: std::fs::read_to_string(headers_path).unwrap_or_default(),
    }
}

/// `sha1=<hex>` as Labelbox computes it.
pub fn sha1_sig(secret: &str, body: &[u8]) -> String {
    labelhook::test_support::delivery::signature::sign(
        secret.as_bytes(),
        body,
        labelhook::test_support::delivery::Algorithm::Sha1,
    )
}

pub fn sha256_sig(secret: &str, body: &[u8]) -> String {
    labelhook::test_support::delivery::signature::sign(
        secret.as_bytes(),
        body,
        labelhook::test_support::delivery::Algorithm::Sha256,
    )
}

/// Writes `body` to a file curl can post with `--data-binary @file`.
pub fn body_file(dir: &Path, name: &str, body: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write body");
    format!("@{}", path.display())
}

/// Posts a signed delivery the way Labelbox does (SHA-1 header only).
pub fn deliver(server: &TestServer, id: &str, topic: &str, body: &[u8]) -> Answer {
    post_signed(server, id, topic, body, &[])
}

/// Posts a signed delivery with chunked transfer encoding (no Content-Length), so any size limit
/// is found while the body streams.
pub fn deliver_chunked(server: &TestServer, id: &str, body: &[u8]) -> Answer {
    post_signed(
        server,
        id,
        "LABEL_UPDATED",
        body,
        &["-H", "Transfer-Encoding: chunked"],
    )
}

/// A delivery signed with `SECRET`, with any extra curl arguments.
pub fn post_signed(
    server: &TestServer,
    id: &str,
    topic: &str,
    body: &[u8],
    extra: &[&str],
) -> Answer {
    post_signed_to(
        &server.url("/webhooks/labelbox"),
        server.dir.path(),
        id,
        topic,
        body,
        extra,
    )
}

/// [`deliver`] to any webhook URL (e.g. from a thread that holds no [`TestServer`]), the body
/// written to a file in `dir` first.
pub fn deliver_to(url: &str, dir: &Path, id: &str, topic: &str, body: &[u8]) -> Answer {
    post_signed_to(url, dir, id, topic, body, &[])
}

/// [`post_signed`] to any webhook URL, with the body written to a file in `dir` first.
pub fn post_signed_to(
    url: &str,
    dir: &Path,
    id: &str,
    topic: &str,
    body: &[u8],
    extra: &[&str],
) -> Answer {
    let file = body_file(dir, &format!("body-{id}.json"), body);
    let sig = format!("X-Hub-Signature: {}", sha1_sig(SECRET, body));
    let event = format!("X-Labelbox-Event: {topic}");
    let id_header = format!("X-Labelbox-Id: {id}");
    let mut args = vec![
        "-H",
        "Content-Type: application/json",
        "-H",
        &sig,
        "-H",
        &event,
        "-H",
        &id_header,
        "--data-binary",
        &file,
    ];
    args.extend_from_slice(extra);
    curl(url, &args)
}

/// Posts a model-training callback, signed with `secret` when one is given.
pub fn post_model_run(server: &TestServer, body: &[u8], secret: Option<&str>) -> Answer {
    let file = body_file(server.dir.path(), "model-run.json", body);
    let sig = secret.map(|s| format!("X-Hub-Signature: {}", sha1_sig(s, body)));
    let mut args = vec![
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &file,
    ];
    if let Some(sig) = &sig {
        args.extend(["-H", sig.as_str()]);
    }
    curl(&server.url("/model-training/model_run"), &args)
}

/// A model-run call as Labelbox's reference sends it: the body and `X-Hub-Signature`, no
/// `Content-Type`, no `X-Labelbox-Id`.
pub fn post_model_run_as_labelbox(server: &TestServer, body: &[u8], extra: &[&str]) -> Answer {
    let file = body_file(server.dir.path(), "model-run-ref.json", body);
    let sig = format!("X-Hub-Signature: {}", sha1_sig(SECRET, body));
    // curl adds a form Content-Type to --data-binary unless told to send none.
    let mut args = vec!["-H", "Content-Type:", "-H", &sig, "--data-binary", &file];
    args.extend_from_slice(extra);
    curl(&server.url("/model-training/model_run"), &args)
}

/// `sha1=<hex>` of a file, computed by `labelhook sign`, which streams it.
pub fn sign_file(path: &Path) -> String {
    let out = Command::new(bin())
        .arg("sign")
        .arg(path)
        .args(["--secret-env", "LH_TEST_SECRET"])
        .env("LH_TEST_SECRET", SECRET)
        .env_remove("LABELHOOK_CONFIG")
        .output()
        .expect("run labelhook sign");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A program that prints a `listening on URL` line (`labelhook serve`, the custom handler
/// example), started with a command the test builds itself: its own working directory,
/// environment or wrapper, where [`TestServer`] fixes them. Killed on drop.
pub struct Listening {
    child: Child,
    /// The URL of its `listening on` line.
    pub url: String,
    /// The URL of its `admin listening on` line, when it prints one.
    pub admin_url: Option<String>,
    /// That line, as printed.
    pub line: String,
    stderr_path: PathBuf,
}

impl Listening {
    /// Spawns `command` with stdout piped and stderr to `stderr_path`, and waits (bounded)
    /// for its `listening on` line.
    pub fn start(mut command: Command, stderr_path: &Path) -> Listening {
        let stderr = std::fs::File::create(stderr_path).expect("stderr log");
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn");
        let rx = stdout_lines(&mut child);
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("listening on ") {
                        // The admin line, when there is one, follows at once.
                        let admin_url =
                            rx.recv_timeout(Duration::from_millis(200))
                                .ok()
                                .and_then(|next| {
                                    next.strip_prefix("admin listening on ").map(str::to_owned)
                                });
                        return Listening {
                            url: url.to_owned(),
                            admin_url,
                            line,
                            child,
                            stderr_path: stderr_path.to_owned(),
                        };
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "no `listening on` line in time; stderr:\n{}",
                        std::fs::read_to_string(stderr_path).unwrap_or_default()
                    )
                }
            }
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Polls (bounded) until the logs contain `text`.
    pub fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.logs().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the logs:\n{}",
                self.logs()
            );
            std::thread::park_timeout(Duration::from_millis(50));
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The combined stdout and stderr of a finished command, for messages.
/// Runs `command` to its end, which must come within `limit` (the process is killed and the
/// test fails otherwise): for a command expected to exit, such as a `serve` that must refuse
/// to start.
pub fn output_within(mut command: Command, limit: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("still running after {limit:?}:\n{}", output_text(&out));
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// This process's user id (from /proc), to tell whether file permissions bind it.
pub fn current_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|uid| uid.parse().ok())
        .expect("a Uid line")
}
