//! What a `labelbox` command says while it works, on stderr (its stdout is its result): remarks
//! (a wait for the rate limit, a warning), and a backfill's progress. On a terminal the progress
//! is one line rewritten in place; otherwise (CI, a test, a log file) a plain line now and then,
//! so that a log is not flooded.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a progress line is written when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);
/// How often the line is redrawn on a terminal.
const TERMINAL_EVERY: Duration = Duration::from_millis(200);

/// Where remarks go.
pub struct Remarks {
    out: Mutex<Box<dyn Write + Send>>,
    terminal: bool,
    /// A progress line is on the screen (terminal only): a remark clears it first.
    drawn: Mutex<bool>,
}

impl Remarks {
    /// Standard error, redrawn in place when it is a terminal.
    pub fn stderr() -> Self {
        use std::io::IsTerminal;
        let terminal = std::io::stderr().is_terminal();
        Self::to(Box::new(std::io::stderr()), terminal)
    }

    pub fn to(out: Box<dyn Write + Send>, terminal: bool) -> Self {
        Self {
            out: Mutex::new(out),
            terminal,
            drawn: Mutex::new(false),
        }
    }

    /// Says nothing (unit tests).
    pub fn silent() -> Self {
        Self::to(Box::new(std::io::sink()), false)
    }

    /// One remark, on a line of its own.
    pub fn say(&self, line: &str) {
        let Ok(mut out) = self.out.lock() else { return };
        if self.take_drawn() {
            let _ = write!(out, "\r\x1b[K");
        }
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// The progress line: in place on a terminal, else a line of its own.
    fn draw(&self, line: &str) {
        let Ok(mut out) = self.out.lock() else { return };
        if self.terminal {
            let _ = write!(out, "\r\x1b[K{line}");
            if let Ok(mut drawn) = self.drawn.lock() {
                *drawn = true;
            }
        } else {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }

    fn take_drawn(&self) -> bool {
        self.drawn
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or(false)
    }
}

/// A backfill's progress: rows and bytes read from the export, deliveries stored.
pub struct Progress<'a> {
    remarks: &'a Remarks,
    started: Instant,
    last_drawn: Option<Instant>,
    total_bytes: Option<u64>,
    pub rows: u64,
    pub bytes: u64,
    pub stored: u64,
    pub skipped: u64,
}

impl<'a> Progress<'a> {
    pub fn new(remarks: &'a Remarks, total_bytes: Option<u64>) -> Self {
        Self {
            remarks,
            started: Instant::now(),
            last_drawn: None,
            total_bytes,
            rows: 0,
            bytes: 0,
            stored: 0,
            skipped: 0,
        }
    }

    /// Redraws the line when it is due.
    pub fn tick(&mut self) {
        let every = if self.remarks.terminal {
            TERMINAL_EVERY
        } else {
            PLAIN_EVERY
        };
        if self.last_drawn.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        self.last_drawn = Some(Instant::now());
        self.remarks.draw(&self.line());
    }

    /// The last line, whatever the time, ended.
    pub fn finish(&mut self) {
        let line = self.line();
        if self.remarks.terminal {
            self.remarks.draw(&line);
            self.remarks.say("");
        } else {
            self.remarks.say(&line);
        }
    }

    fn line(&self) -> String {
        let seconds = self.started.elapsed().as_secs_f64().max(0.001);
        let share = match self.total_bytes {
            Some(total) if total > 0 => {
                format!(" ({:.0}%)", 100.0 * self.bytes as f64 / total as f64)
            }
            _ => String::new(),
        };
        format!(
            "backfill: {} rows, {}{share}, {:.0} rows/s; {} deliveries stored, {} already there",
            self.rows,
            human_bytes(self.bytes),
            self.rows as f64 / seconds,
            self.stored,
            self.skipped
        )
    }
}

/// `1.5 MiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A writer whose bytes the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn on_a_terminal_the_line_is_redrawn_in_place_and_a_remark_clears_it() {
        let out = Shared::default();
        let remarks = Remarks::to(Box::new(out.clone()), true);
        let mut progress = Progress::new(&remarks, Some(2048));
        progress.rows = 3;
        progress.bytes = 1024;
        progress.tick();
        remarks.say("waiting");
        let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        assert!(
            text.starts_with("\r\x1b[Kbackfill: 3 rows, 1.0 KiB (50%)"),
            "{text:?}"
        );
        assert!(text.ends_with("\r\x1b[Kwaiting\n"), "{text:?}");
    }

    #[test]
    fn elsewhere_progress_is_plain_lines_not_redrawn_every_tick() {
        let out = Shared::default();
        let remarks = Remarks::to(Box::new(out.clone()), false);
        let mut progress = Progress::new(&remarks, None);
        progress.tick();
        progress.tick();
        progress.finish();
        let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        assert_eq!(text.lines().count(), 2, "{text:?}");
        assert!(!text.contains('\r'));
    }

    #[test]
    fn bytes_read_as_people_do() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
    }
}
