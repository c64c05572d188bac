//! The `file` handler: appends one JSON line per event to a file and answers only once the line
//! is on disk.
//!
//! An fsync per event would cap throughput at the disk's sync rate, so one writer task owns the
//! file and is fed through a channel: it takes every line queued so far, writes them, calls
//! `sync_data` once, and then answers each caller (group commit). A batch of one entity's
//! consecutive events ([`Handler::handle_batch`]) is one job: its lines land together or not at
//! all, under one fsync, which is how a single busy entity gets past the disk's sync rate. Inline bodies are rendered by
//! the caller; stored bodies are streamed by the writer itself in chunks, each in a batch of
//! its own, so no body is ever held whole in memory. A failed batch is cut off the file again,
//! so a half-written line never corrupts the lines after it; and a line torn by a crash (the
//! process killed while it wrote) is cut off when the file is opened, before anything is
//! appended. Every line in the file is therefore whole; a delivery may be in it twice, when
//! the process died after its line was synced but before the store heard of it.
//!
//! A failure names what failed: the output file (`path: error`), or the event's stored body
//! when that is what could not be read, which is no fault of the file.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::fs::{File, OpenOptions};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, OnceCell};

use super::settings::HandlerSettings;
use super::{write_event_json, BuildError, Handler, HandlerError, HandlerEvent};
use crate::delivery::BodyReadError;

/// Lines waiting for the writer; callers wait (back-pressure) beyond this.
const QUEUE_CAPACITY: usize = 1024;
/// Most lines written per fsync.
const BATCH_MAX: usize = 256;

/// Appends events as JSON lines, fsync'd, batching concurrent calls.
#[derive(Debug)]
pub struct FileHandler {
    path: PathBuf,
    // Started on first use, because building happens before (or outside) the runtime.
    writer: OnceCell<mpsc::Sender<Job>>,
}

/// Lines for the writer task, written together, and where to send the outcome.
#[derive(Debug)]
struct Job {
    lines: Vec<Line>,
    done: oneshot::Sender<Result<(), Failure>>,
}

impl Job {
    fn streams(&self) -> bool {
        self.lines
            .iter()
            .any(|line| matches!(line, Line::Streamed(_)))
    }
}

/// Why a line was not written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// The event's stored body could not be read; the message says so.
    Body(String),
    /// Writing or syncing the output file failed.
    File(String),
}

impl Failure {
    fn of(error: &std::io::Error) -> Self {
        match BodyReadError::find(error) {
            Some(body) => Self::Body(body.to_string()),
            None => Self::File(error.to_string()),
        }
    }
}

#[derive(Debug)]
enum Line {
    /// Rendered by the caller, newline included.
    Rendered(Vec<u8>),
    /// A stored body, streamed by the writer.
    Streamed(Box<HandlerEvent>),
}

impl FileHandler {
    /// A handler appending to `path`; the file and its parent directories are created on first
    /// use.
    pub fn new(path: impl Into<PathBuf>) -> FileHandler {
        FileHandler {
            path: path.into(),
            writer: OnceCell::new(),
        }
    }

    pub(super) fn from_settings(settings: &HandlerSettings) -> Result<FileHandler, BuildError> {
        let path = settings.path.clone().ok_or_else(|| BuildError::Missing {
            name: settings.name.clone(),
            kind: "file",
            key: "path",
        })?;
        Ok(FileHandler::new(path))
    }

    async fn writer(&self) -> &mpsc::Sender<Job> {
        self.writer
            .get_or_init(|| async {
                let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
                tokio::spawn(run_writer(self.path.clone(), rx));
                tx
            })
            .await
    }

    /// The line of one event: rendered now when its body is in memory, streamed by the writer
    /// when the store keeps it.
    async fn line(&self, event: &HandlerEvent) -> Result<Line, HandlerError> {
        if event.body.as_inline().is_none() {
            return Ok(Line::Streamed(Box::new(event.clone())));
        }
        let mut buf = Vec::new();
        write_event_json(event, &mut buf)
            .await
            .map_err(|e| retryable(&self.path, &e))?;
        buf.push(b'\n');
        Ok(Line::Rendered(buf))
    }

    /// Hands `lines` to the writer as one job and waits until they are on disk.
    async fn append(&self, lines: Vec<Line>) -> Result<(), HandlerError> {
        let (done, answer) = oneshot::channel();
        let stopped =
            || HandlerError::Retryable(format!("{}: the file writer stopped", self.path.display()));
        self.writer()
            .await
            .send(Job { lines, done })
            .await
            .map_err(|_| stopped())?;
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Failure::Body(message))) => Err(HandlerError::Retryable(message)),
            Ok(Err(Failure::File(message))) => Err(HandlerError::Retryable(format!(
                "{}: {message}",
                self.path.display()
            ))),
            Err(_) => Err(stopped()),
        }
    }
}

#[async_trait]
impl Handler for FileHandler {
    async fn handle(&self, event: &HandlerEvent) -> Result<(), HandlerError> {
        let line = self.line(event).await?;
        self.append(vec![line]).await
    }

    fn handles_batches(&self) -> bool {
        true
    }

    async fn handle_batch(&self, events: &[HandlerEvent]) -> Result<(), HandlerError> {
        let mut lines = Vec::with_capacity(events.len());
        for event in events {
            lines.push(self.line(event).await?);
        }
        self.append(lines).await
    }
}

fn retryable(path: &Path, error: &std::io::Error) -> HandlerError {
    HandlerError::Retryable(format!("{}: {error}", path.display()))
}

/// Owns the file: writes queued lines in batches, one fsync per batch. Ends when the handler is
/// dropped.
async fn run_writer(path: PathBuf, mut rx: mpsc::Receiver<Job>) {
    let mut file: Option<File> = None;
    let mut jobs = Vec::with_capacity(BATCH_MAX);
    while rx.recv_many(&mut jobs, BATCH_MAX).await > 0 {
        // Jobs with streamed bodies go alone: a long copy should not hold up the small lines,
        // and an unreadable body should fail only its own job.
        let (streamed, rendered): (Vec<Job>, Vec<Job>) = jobs.drain(..).partition(Job::streams);
        if !rendered.is_empty() {
            commit(&path, &mut file, rendered).await;
        }
        for job in streamed {
            commit(&path, &mut file, vec![job]).await;
        }
    }
}

/// Writes and syncs `jobs`, then answers each of them.
async fn commit(path: &Path, file: &mut Option<File>, jobs: Vec<Job>) {
    let outcome = write_batch(path, file, &jobs)
        .await
        .map_err(|e| Failure::of(&e));
    if outcome.is_err() {
        // Reopen next time: after a failed write the handle's state is not trusted.
        *file = None;
    }
    for job in jobs {
        let answer = outcome.clone();
        // The caller may have given up waiting; its line is on disk either way.
        let _ = job.done.send(answer);
    }
}

async fn write_batch(path: &Path, file: &mut Option<File>, jobs: &[Job]) -> std::io::Result<()> {
    let file = match file {
        Some(file) => file,
        None => file.insert(open(path).await?),
    };
    let start_len = file.metadata().await?.len();
    let written = write_lines(file, jobs).await;
    if written.is_err() {
        // Cut off the partial batch so the next line starts on a line of its own.
        let _ = file.set_len(start_len).await;
    }
    written
}

async fn write_lines(file: &mut File, jobs: &[Job]) -> std::io::Result<()> {
    let mut pending = Vec::new();
    for line in jobs.iter().flat_map(|job| &job.lines) {
        match line {
            Line::Rendered(bytes) => pending.extend_from_slice(bytes),
            Line::Streamed(event) => {
                file.write_all(&pending).await?;
                pending.clear();
                let mut out =
                    tokio::io::BufWriter::with_capacity(super::BODY_CHUNK_BYTES, &mut *file);
                write_event_json(event, &mut out).await?;
                out.write_all(b"\n").await?;
                out.flush().await?;
            }
        }
    }
    file.write_all(&pending).await?;
    // tokio's File completes writes in the background; flush surfaces their errors.
    file.flush().await?;
    file.sync_data().await
}

/// Opens the file for appending, first cutting off a torn last line (see [`cut_torn_tail`]).
async fn open(path: &Path) -> std::io::Result<File> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(parent).await?;
    }
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .await?
        .into_std()
        .await;
    let (file, cut) =
        tokio::task::spawn_blocking(move || cut_torn_tail(&file).map(|cut| (file, cut)))
            .await
            .map_err(std::io::Error::other)??;
    if cut > 0 {
        tracing::warn!(
            path = %path.display(),
            bytes = cut,
            "cut {cut} bytes off the end of the file handler's output: a last line without its \
             newline is a write that was never acknowledged (a crash in the middle of it), and \
             its delivery is written again whole"
        );
    }
    Ok(File::from_std(file))
}

/// How far back [`cut_torn_tail`] reads at a time.
const TAIL_READ_BYTES: u64 = 64 * 1024;

/// Cuts the file back to just after its last newline and returns how many bytes went.
///
/// Every acknowledged line ends with a newline that was fsync'd with it, so bytes after the
/// last newline are a write cut short by a crash (a process killed while it streamed a large
/// body leaves the chunks already written): nobody was told they were written, and the
/// delivery is still pending, so its line is written again whole. Left there, they would glue
/// the next line onto the torn one and make both unreadable. The cut is synced before anything
/// is appended, so a crash right after it cannot bring the torn bytes back under a new line.
fn cut_torn_tail(file: &std::fs::File) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0u8; TAIL_READ_BYTES as usize];
    while end > 0 {
        let start = end.saturating_sub(TAIL_READ_BYTES);
        let piece = &mut chunk[..(end - start) as usize];
        file.read_exact_at(piece, start)?;
        if let Some(at) = piece.iter().rposition(|b| *b == b'\n') {
            end = start + at as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        file.set_len(end)?;
        file.sync_data()?;
    }
    Ok(len - end)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::handlers::{test_event, Payload};
    use std::io::Write;
    use std::sync::Arc;

    fn inline(seq: i64, body: &'static [u8], is_json: bool) -> HandlerEvent {
        test_event(
            seq,
            Payload::inline(bytes::Bytes::from_static(body)),
            is_json,
        )
    }

    fn read_lines(path: &Path) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.ends_with('\n'));
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_events_all_land_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dirs/events.jsonl");
        let handler = Arc::new(FileHandler::new(&path));
        let mut tasks = tokio::task::JoinSet::new();
        for seq in 0..500 {
            let handler = Arc::clone(&handler);
            tasks.spawn(async move {
                let event = inline(seq, br#"{"label":"x\ny","n":1}"#, true);
                handler.handle(&event).await
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap().unwrap();
        }
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 500);
        let mut seqs: Vec<i64> = lines.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (0..500).collect::<Vec<_>>());
        assert!(lines.iter().all(|l| l["body"]["label"] == "x\ny"));
    }

    #[tokio::test]
    async fn a_large_file_body_is_copied_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut blob = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
        let items: Vec<String> = (0..200_000).map(|i| format!("item-{i}-ü")).collect();
        let body = serde_json::to_vec(&serde_json::json!({ "items": items })).unwrap();
        assert!(body.len() > 2 << 20);
        blob.write_all(&body).unwrap();
        let path = dir.path().join("events.jsonl");
        let handler = FileHandler::new(&path);
        handler.handle(&inline(1, b"{}", true)).await.unwrap();
        let event = test_event(
            2,
            crate::handlers::file_payload(blob.path().to_owned(), body.len() as u64),
            true,
        );
        handler.handle(&event).await.unwrap();
        handler.handle(&inline(3, b"{}", true)).await.unwrap();
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 3);
        let expected: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(lines[1]["body"], expected);
        assert_eq!(lines[2]["seq"], 3);
    }

    #[tokio::test]
    async fn a_non_json_body_is_kept_as_a_string() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let handler = FileHandler::new(&path);
        handler
            .handle(&inline(1, b"plain text\nwith \"quotes\"", false))
            .await
            .unwrap();
        let lines = read_lines(&path);
        assert_eq!(lines[0]["body"], "plain text\nwith \"quotes\"");
    }

    #[tokio::test]
    async fn a_missing_body_file_is_retryable_and_leaves_no_partial_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let handler = FileHandler::new(&path);
        let gone = test_event(
            1,
            crate::handlers::file_payload(dir.path().join("no-such-blob"), 10),
            true,
        );
        let err = handler.handle(&gone).await.unwrap_err();
        assert!(matches!(err, HandlerError::Retryable(_)), "{err:?}");
        // The body is what could not be read, not the output file.
        let message = err.to_string();
        assert!(
            message.starts_with("cannot read the delivery's stored body: "),
            "{message}"
        );
        assert!(!message.contains("events.jsonl"), "{message}");
        handler.handle(&inline(2, b"{}", true)).await.unwrap();
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["seq"], 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_unreadable_blob_fails_only_its_own_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let handler = Arc::new(FileHandler::new(&path));
        let mut tasks = tokio::task::JoinSet::new();
        for seq in 0..100 {
            let handler = Arc::clone(&handler);
            let event = if seq == 50 {
                let body = crate::handlers::file_payload(dir.path().join("no-such-blob"), 10);
                test_event(seq, body, true)
            } else {
                inline(seq, b"{}", true)
            };
            tasks.spawn(async move { (seq, handler.handle(&event).await) });
        }
        while let Some(joined) = tasks.join_next().await {
            let (seq, result) = joined.unwrap();
            assert_eq!(result.is_err(), seq == 50, "{seq}: {result:?}");
        }
        assert_eq!(read_lines(&path).len(), 99);
    }

    /// A file as a crash leaves it: whole lines, then a line cut short (of `torn` bytes).
    fn torn_file(path: &Path, torn: usize) -> Vec<u8> {
        let mut text = b"{\"seq\":1}\n{\"seq\":2}\n".to_vec();
        let whole = text.len();
        text.extend(std::iter::repeat_n(b'x', torn));
        std::fs::write(path, &text).unwrap();
        text.truncate(whole);
        text
    }

    #[tokio::test]
    async fn a_torn_last_line_is_cut_off_before_the_first_append() {
        // Shorter than one read back, and longer than several (the torn part of a large
        // streamed body).
        for torn in [1, 200, 3 * TAIL_READ_BYTES as usize + 17] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("events.jsonl");
            let whole = torn_file(&path, torn);
            let handler = FileHandler::new(&path);
            handler.handle(&inline(3, b"{}", true)).await.unwrap();
            let text = std::fs::read(&path).unwrap();
            assert!(text.starts_with(&whole), "{torn}: the whole lines are kept");
            let lines = read_lines(&path);
            let seqs: Vec<_> = lines.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
            assert_eq!(seqs, [1, 2, 3], "{torn}");
        }
    }

    #[test]
    fn cutting_the_tail_keeps_whole_lines_and_drops_a_file_of_one_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let whole = torn_file(&path, 0);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .unwrap();
        assert_eq!(cut_torn_tail(&file).unwrap(), 0);
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        std::fs::write(&path, vec![b'{'; 100_000]).unwrap();
        assert_eq!(cut_torn_tail(&file).unwrap(), 100_000);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        assert_eq!(cut_torn_tail(&file).unwrap(), 0);
    }

    #[tokio::test]
    async fn an_unwritable_path_is_retryable() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: opening it for appending fails.
        let handler = FileHandler::new(dir.path());
        let err = handler.handle(&inline(1, b"{}", true)).await.unwrap_err();
        assert!(matches!(err, HandlerError::Retryable(_)), "{err:?}");
    }
}
