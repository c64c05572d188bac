//! What the bench prints: a line every two seconds and a summary at the end, as a table for a
//! person or (`--json`) one JSON object per line for a program.
//!
//! Rates are per second of the interval they cover, measured with the clock rather than
//! assumed to be two seconds (a busy machine wakes the reporter late). The backlog is what the
//! sender saw accepted minus what the handler was given: deliveries stored and not yet handled.

use std::io::Write;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::histogram::Histogram;
use super::load::Counters;
use std::sync::atomic::Ordering;

/// The counters at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub at: Instant,
    pub accepted: u64,
    pub handled: u64,
    pub refused: u64,
    pub failed: u64,
}

impl Snapshot {
    pub fn of(counters: &Counters) -> Snapshot {
        // `handled` first: a delivery is handled only after it was accepted, so reading it
        // first keeps the backlog from going below zero.
        let handled = counters.handled.load(Ordering::Relaxed);
        Snapshot {
            at: Instant::now(),
            accepted: counters.accepted.load(Ordering::Relaxed),
            handled,
            refused: counters.refused.load(Ordering::Relaxed),
            failed: counters.failed.load(Ordering::Relaxed),
        }
    }

    /// Accepted and not yet handled.
    pub fn backlog(&self) -> u64 {
        self.accepted.saturating_sub(self.handled)
    }
}

/// One two-second line.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Interval {
    /// Since the load started.
    pub elapsed_s: f64,
    pub accepted_per_s: f64,
    pub handled_per_s: f64,
    pub backlog: u64,
    /// The 99th percentile of the answers received in the interval; `None` without answers.
    pub p99_ms: Option<f64>,
    /// Answers other than 2xx in the interval.
    pub non_2xx: u64,
    /// Requests without an answer in the interval.
    pub errors: u64,
}

impl Interval {
    pub fn between(start: Instant, before: &Snapshot, now: &Snapshot, answers: &Histogram) -> Self {
        let seconds = now.at.duration_since(before.at).as_secs_f64().max(1e-9);
        let rate = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / seconds;
        Interval {
            elapsed_s: now.at.duration_since(start).as_secs_f64(),
            accepted_per_s: rate(before.accepted, now.accepted),
            handled_per_s: rate(before.handled, now.handled),
            backlog: now.backlog(),
            p99_ms: answers.quantile(0.99).map(millis),
            non_2xx: now.refused - before.refused,
            errors: now.failed - before.failed,
        }
    }
}

/// Latencies of the answers, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(answers: &Histogram) -> Option<Latency> {
        Some(Latency {
            p50_ms: millis(answers.quantile(0.5)?),
            p99_ms: millis(answers.quantile(0.99)?),
            max_ms: millis(answers.max()?),
        })
    }
}

/// The end of a run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// How long deliveries were sent.
    pub load_s: f64,
    pub accepted: u64,
    pub handled: u64,
    /// Accepted per second of load.
    pub accepted_per_s: f64,
    /// Handled per second of load, counting those handled while the load ran.
    pub handled_per_s: f64,
    /// Accepted and not handled when the load stopped.
    pub backlog_at_stop: u64,
    /// How long the handler took, once the load stopped, to catch up; `None` when it did not
    /// within `--drain-timeout`, or the drain was cut short.
    pub drain_s: Option<f64>,
    pub non_2xx: u64,
    pub errors: u64,
    /// `None` when no request was answered.
    pub latency: Option<Latency>,
    /// The first answer other than 2xx, with its body.
    pub first_non_2xx: Option<String>,
    /// Why the first request without an answer got none.
    pub first_error: Option<String>,
}

fn millis(micros: u64) -> f64 {
    // Two decimals: hundredths of a millisecond are as far as a busy machine is steady.
    (micros as f64 / 10.0).round() / 100.0
}

/// Writes lines to standard output, flushed one at a time so that a pipe sees each at once.
pub struct Printer {
    json: bool,
}

/// The columns of the two-second lines and their widths.
const COLUMNS: [(&str, usize); 7] = [
    ("elapsed", 7),
    ("accepted/s", 10),
    ("handled/s", 9),
    ("backlog", 7),
    ("p99 ms", 8),
    ("non-2xx", 7),
    ("errors", 6),
];

impl Printer {
    pub fn new(json: bool) -> Printer {
        Printer { json }
    }

    fn line(&self, text: &str) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{text}")?;
        out.flush()
    }

    fn json_line(&self, kind: &str, value: &impl Serialize) -> std::io::Result<()> {
        let mut object = serde_json::to_value(value).map_err(std::io::Error::other)?;
        if let Some(map) = object.as_object_mut() {
            map.insert("kind".to_owned(), kind.into());
        }
        self.line(&object.to_string())
    }

    /// What is measured and where; `setup` is shown as it is given in `--json` output.
    pub fn start(&self, lines: &[String], setup: &impl Serialize) -> std::io::Result<()> {
        if self.json {
            return self.json_line("start", setup);
        }
        for line in lines {
            self.line(line)?;
        }
        let header: Vec<String> = COLUMNS
            .iter()
            .map(|(name, width)| format!("{name:>width$}"))
            .collect();
        self.line(&header.join("  "))
    }

    pub fn interval(&self, i: &Interval) -> std::io::Result<()> {
        if self.json {
            return self.json_line("interval", i);
        }
        let p99 = i
            .p99_ms
            .map_or_else(|| "-".to_owned(), |p| format!("{p:.2}"));
        let cells = [
            format!("{:.0}s", i.elapsed_s),
            format!("{:.0}", i.accepted_per_s),
            format!("{:.0}", i.handled_per_s),
            i.backlog.to_string(),
            p99,
            i.non_2xx.to_string(),
            i.errors.to_string(),
        ];
        let row: Vec<String> = cells
            .iter()
            .zip(COLUMNS)
            .map(|(cell, (_, width))| format!("{cell:>width$}"))
            .collect();
        self.line(&row.join("  "))
    }

    /// The load stopped: why, and how much is left for the handler.
    pub fn load_stopped(&self, why: &str, after: Duration, backlog: u64) -> std::io::Result<()> {
        if self.json {
            let event = serde_json::json!({
                "by": why,
                "elapsed_s": after.as_secs_f64(),
                "backlog": backlog,
            });
            return self.json_line("load_stopped", &event);
        }
        self.line(&format!(
            "load stopped ({why}) after {:.1}s; backlog {backlog}, waiting for the handler",
            after.as_secs_f64()
        ))
    }

    pub fn summary(&self, s: &Summary) -> std::io::Result<()> {
        if self.json {
            return self.json_line("summary", s);
        }
        for line in summary_lines(s) {
            self.line(&line)?;
        }
        Ok(())
    }
}

fn summary_lines(s: &Summary) -> Vec<String> {
    let drain = match s.drain_s {
        Some(d) => format!("drained in {d:.2}s after the load stopped"),
        None => format!(
            "{} not handled when the bench stopped waiting",
            s.accepted - s.handled.min(s.accepted)
        ),
    };
    let latency = s.latency.as_ref().map_or_else(
        || "no answers".to_owned(),
        |l| {
            format!(
                "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                l.p50_ms, l.p99_ms, l.max_ms
            )
        },
    );
    let mut lines = vec![
        "summary".to_owned(),
        format!(
            "  accepted  {} in {:.1}s: {:.0}/s",
            s.accepted, s.load_s, s.accepted_per_s
        ),
        format!(
            "  handled   {}: {:.0}/s during the load; backlog {} when it stopped, {drain}",
            s.handled, s.handled_per_s, s.backlog_at_stop
        ),
        format!("  answers   {latency}"),
        format!("  non-2xx   {}, errors {}", s.non_2xx, s.errors),
    ];
    if let Some(first) = &s.first_non_2xx {
        lines.push(format!("  first non-2xx answer: {first}"));
    }
    if let Some(first) = &s.first_error {
        lines.push(format!("  first error: {first}"));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::histogram::AtomicHistogram;

    #[test]
    fn an_interval_counts_per_second_of_the_time_it_covers() {
        let start = Instant::now();
        let before = Snapshot {
            at: start + Duration::from_secs(2),
            accepted: 100,
            handled: 90,
            refused: 1,
            failed: 0,
        };
        let now = Snapshot {
            at: start + Duration::from_millis(6_000),
            accepted: 900,
            handled: 850,
            refused: 3,
            failed: 1,
        };
        let answers = AtomicHistogram::default();
        for micros in [1_000, 2_000, 40_000] {
            answers.record(micros);
        }
        let i = Interval::between(start, &before, &now, &answers.take());
        assert_eq!(i.elapsed_s, 6.0);
        assert_eq!(i.accepted_per_s, 200.0);
        assert_eq!(i.handled_per_s, 190.0);
        assert_eq!(i.backlog, 50);
        assert_eq!(i.p99_ms, Some(40.0));
        assert_eq!((i.non_2xx, i.errors), (2, 1));
        let empty = Interval::between(start, &now, &now, &Histogram::default());
        assert_eq!(empty.p99_ms, None);
    }

    #[test]
    fn a_summary_says_what_was_left_when_the_drain_did_not_finish() {
        let summary = Summary {
            load_s: 3.0,
            accepted: 300,
            handled: 280,
            accepted_per_s: 100.0,
            handled_per_s: 90.0,
            backlog_at_stop: 30,
            drain_s: None,
            non_2xx: 0,
            errors: 0,
            latency: None,
            first_non_2xx: None,
            first_error: Some("Connection refused (os error 111)".to_owned()),
        };
        let text = summary_lines(&summary).join("\n");
        assert!(text.contains("20 not handled"), "{text}");
        assert!(text.contains("no answers"), "{text}");
        assert!(text.contains("first error: Connection refused"), "{text}");
    }
}
