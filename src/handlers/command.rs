//! The `command` handler: runs a program (argv, no shell) per event, with the event JSON on
//! stdin and its identity in `LABELHOOK_*` environment variables.
//!
//! Rules of thumb:
//! - exit 0 is success; any other exit, a signal, a failed start or the timeout is worth
//!   retrying (the dispatcher dead-letters after `max_attempts`), and the message carries the
//!   code and the last ~2 KiB of stderr, which is what explains a script's failure;
//! - stdout and stderr are always drained, so a chatty program cannot block on a full pipe;
//! - a program that exits without reading stdin is fine: the broken pipe is ignored;
//! - on timeout the process is killed, never left running behind a retry;
//! - environment variables that hold labelhook's own secrets are not passed on.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use super::settings::HandlerSettings;
use super::{write_event_json, BuildError, Handler, HandlerError, HandlerEvent};

/// Per-attempt limit when `timeout` is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of the end of stderr is kept for the error message.
const STDERR_TAIL_BYTES: usize = 2048;

/// Runs a program per event.
#[derive(Debug, Clone)]
pub struct CommandHandler {
    name: String,
    argv: Vec<String>,
    timeout: Duration,
    removed_env: Vec<String>,
}

impl CommandHandler {
    /// A handler named `name` running `argv` (program first) with a time limit; `None` when
    /// `argv` is empty.
    pub fn new(name: impl Into<String>, argv: Vec<String>, timeout: Duration) -> Option<Self> {
        (!argv.is_empty() && !timeout.is_zero()).then(|| CommandHandler {
            name: name.into(),
            argv,
            timeout,
            removed_env: Vec::new(),
        })
    }

    /// Keeps these environment variables from the program.
    pub fn without_env(mut self, names: &[String]) -> Self {
        self.removed_env.extend_from_slice(names);
        self
    }

    pub(super) fn from_settings(settings: &HandlerSettings) -> Result<Self, BuildError> {
        let name = settings.name.clone();
        let argv = settings.argv.clone().ok_or_else(|| BuildError::Missing {
            name: name.clone(),
            kind: "command",
            key: "argv",
        })?;
        let invalid = |key, problem: &str| BuildError::Invalid {
            name: name.clone(),
            key,
            problem: problem.to_owned(),
        };
        if argv.is_empty() {
            return Err(invalid("argv", "must name a program"));
        }
        let timeout = settings.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(invalid("timeout", "must be greater than 0"));
        }
        CommandHandler::new(name.clone(), argv, timeout)
            .ok_or_else(|| invalid("argv", "must name a program"))
    }

    fn command(&self, event: &HandlerEvent) -> Option<Command> {
        let (program, args) = self.argv.split_first()?;
        let mut command = Command::new(program);
        command
            .args(args)
            .env("LABELHOOK_DELIVERY_ID", &event.delivery_id)
            .env("LABELHOOK_TOPIC", &event.topic)
            .env("LABELHOOK_ENTITY", event.entity.as_deref().unwrap_or(""))
            .env(
                "LABELHOOK_PROJECT_ID",
                event.project_id.as_deref().unwrap_or(""),
            )
            .env(
                "LABELHOOK_VERSION",
                event.version.map(|v| v.to_string()).unwrap_or_default(),
            )
            .env(
                "LABELHOOK_FRESH",
                if event.fresh { "true" } else { "false" },
            )
            .env("LABELHOOK_ORIGIN", event.origin.as_str())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Whatever happens to this future, the program does not outlive the attempt.
            .kill_on_drop(true);
        for name in &self.removed_env {
            command.env_remove(name);
        }
        Some(command)
    }

    fn retryable(&self, what: &str) -> HandlerError {
        HandlerError::Retryable(format!("command handler {:?}: {what}", self.name))
    }
}

#[async_trait]
impl Handler for CommandHandler {
    async fn handle(&self, event: &HandlerEvent) -> Result<(), HandlerError> {
        let mut command = self
            .command(event)
            .ok_or_else(|| HandlerError::Permanent("argv is empty".to_owned()))?;
        let program = self.argv.first().map(String::as_str).unwrap_or_default();
        let mut child = command
            .spawn()
            .map_err(|e| self.retryable(&format!("cannot start {program}: {e}")))?;
        let outcome = tokio::time::timeout(self.timeout, run(&mut child, event)).await;
        match outcome {
            Err(_elapsed) => {
                // kill_on_drop would do it too, but waiting here reaps the process now.
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(self.retryable(&format!(
                    "{program} timed out after {} and was killed",
                    humantime::format_duration(self.timeout)
                )))
            }
            Ok(Err(e)) => Err(self.retryable(&format!("{program}: {e}"))),
            Ok(Ok((status, _, _))) if status.success() => Ok(()),
            Ok(Ok((status, _stdout, stderr))) => {
                let tail = String::from_utf8_lossy(&stderr);
                let tail = tail.trim();
                let how = describe(status);
                Err(self.retryable(&if tail.is_empty() {
                    format!("{program} {how}")
                } else {
                    format!("{program} {how}: {tail}")
                }))
            }
        }
    }
}

/// Feeds stdin and drains both outputs while waiting for the exit, all at once: done in
/// sequence, a program writing a lot before reading would deadlock against us.
async fn run(
    child: &mut Child,
    event: &HandlerEvent,
) -> std::io::Result<(ExitStatus, Vec<u8>, Vec<u8>)> {
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let feed = async {
        let Some(stdin) = stdin else { return Ok(()) };
        let mut writer = tokio::io::BufWriter::with_capacity(super::BODY_CHUNK_BYTES, stdin);
        let written = async {
            write_event_json(event, &mut writer).await?;
            writer.flush().await?;
            writer.shutdown().await
        }
        .await;
        // Dropping the writer closes the pipe, so the program sees end of input.
        drop(writer);
        match written {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other,
        }
    };
    let (fed, out, err) = tokio::join!(feed, tail(stdout), tail(stderr));
    let status = child.wait().await?;
    fed?;
    Ok((status, out?, err?))
}

/// Reads a pipe to its end, keeping only the last [`STDERR_TAIL_BYTES`].
async fn tail<R: AsyncRead + Unpin>(pipe: Option<R>) -> std::io::Result<Vec<u8>> {
    let Some(mut pipe) = pipe else {
        return Ok(Vec::new());
    };
    let mut kept = Vec::with_capacity(2 * STDERR_TAIL_BYTES);
    let mut buf = [0u8; 4096];
    loop {
        let n = pipe.read(&mut buf).await?;
        let Some(read) = buf.get(..n).filter(|r| !r.is_empty()) else {
            return Ok(kept);
        };
        kept.extend_from_slice(read);
        if kept.len() > STDERR_TAIL_BYTES {
            kept.drain(..kept.len() - STDERR_TAIL_BYTES);
        }
    }
}

fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with code {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("was killed by signal {signal}");
        }
    }
    "ended abnormally".to_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::handlers::{test_event, Payload};
    use std::time::Instant;

    fn sh(script: &str, timeout: Duration) -> CommandHandler {
        let argv = ["sh", "-c", script].map(str::to_owned).to_vec();
        CommandHandler::new("script", argv, timeout).unwrap()
    }

    fn event() -> HandlerEvent {
        test_event(
            4,
            Payload::inline(bytes::Bytes::from_static(br#"{"id":"ckabc"}"#)),
            true,
        )
    }

    #[tokio::test]
    async fn exit_zero_is_success() {
        sh("exit 0", DEFAULT_TIMEOUT)
            .handle(&event())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_non_zero_exit_is_retryable_with_the_stderr_tail() {
        let script = "i=0; while [ $i -lt 500 ]; do echo noise $i >&2; i=$((i+1)); done; \
                      echo 'the real reason' >&2; exit 3";
        let err = sh(script, DEFAULT_TIMEOUT)
            .handle(&event())
            .await
            .unwrap_err();
        let HandlerError::Retryable(text) = err else {
            panic!("expected retryable, got {err:?}");
        };
        assert!(text.contains("code 3"), "{text}");
        assert!(text.contains("the real reason"), "{text}");
        assert!(!text.contains("noise 1\n"), "{text}");
        assert!(text.len() < STDERR_TAIL_BYTES + 200, "{}", text.len());
    }

    #[tokio::test]
    async fn the_event_is_in_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let script = format!(
            "printf '%s|%s|%s|%s|%s|%s' \"$LABELHOOK_TOPIC\" \"$LABELHOOK_DELIVERY_ID\" \
             \"$LABELHOOK_ENTITY\" \"$LABELHOOK_PROJECT_ID\" \"$LABELHOOK_VERSION\" \
             \"$LABELHOOK_FRESH\" > '{}'",
            out.display()
        );
        sh(&script, DEFAULT_TIMEOUT).handle(&event()).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "LABEL_CREATED|delivery-4|label:ckabc|proj-1|2024-05-02T08:30:12.5Z|true"
        );
    }

    #[tokio::test]
    async fn secret_variables_are_not_passed_on() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        // Any variable of the test's own environment stands in for a secret; not one the
        // shell sets itself when missing (PATH, PWD, ...).
        let shell_owned = [
            "PATH", "PWD", "OLDPWD", "SHLVL", "IFS", "OPTIND", "HOME", "_",
        ];
        let name = std::env::vars()
            .map(|(name, _)| name)
            .find(|name| {
                !shell_owned.contains(&name.as_str())
                    && !name.starts_with("PS")
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
            .unwrap();
        let script = format!("printf '%s' \"${{{name}:-unset}}\" > '{}'", out.display());
        sh(&script, DEFAULT_TIMEOUT)
            .without_env(&[name])
            .handle(&event())
            .await
            .unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "unset");
    }

    #[tokio::test]
    async fn the_event_json_arrives_on_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("stdin.json");
        let script = format!("cat > '{}'", out.display());
        sh(&script, DEFAULT_TIMEOUT).handle(&event()).await.unwrap();
        let value: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(value["delivery_id"], "delivery-4");
        assert_eq!(value["body"]["id"], "ckabc");
    }

    #[tokio::test]
    async fn a_program_that_ignores_stdin_is_fine() {
        // Bigger than a pipe buffer, so writing stdin hits the closed pipe.
        let big = "x".repeat(1 << 20);
        let event = test_event(
            5,
            Payload::inline(bytes::Bytes::from(big.into_bytes())),
            false,
        );
        sh("exit 0", DEFAULT_TIMEOUT).handle(&event).await.unwrap();
    }

    #[tokio::test]
    async fn a_timeout_kills_the_program_and_is_retryable() {
        let argv = vec!["sleep".to_owned(), "5".to_owned()];
        let handler = CommandHandler::new("slow", argv, Duration::from_millis(200)).unwrap();
        let started = Instant::now();
        let err = handler.handle(&event()).await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let HandlerError::Retryable(text) = err else {
            panic!("expected retryable, got {err:?}");
        };
        assert!(text.contains("timed out"), "{text}");
    }

    #[tokio::test]
    async fn a_missing_program_is_retryable() {
        let argv = vec!["/nonexistent/labelhook-test-program".to_owned()];
        let handler = CommandHandler::new("gone", argv, DEFAULT_TIMEOUT).unwrap();
        let err = handler.handle(&event()).await.unwrap_err();
        assert!(matches!(err, HandlerError::Retryable(_)), "{err:?}");
    }

    #[test]
    fn settings_need_a_program() {
        let settings: HandlerSettings =
            serde_json::from_value(serde_json::json!({"name": "c", "kind": "command", "argv": []}))
                .unwrap();
        let message = CommandHandler::from_settings(&settings)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("\"c\"") && message.contains("argv"),
            "{message}"
        );
    }
}
