//! `labelhook bench`: what to expect of labelhook on this machine and this database.
//!
//! It runs the real service in process ([`Application`], the very code `serve` runs, durable
//! answers and all) with a configuration made for the run: a store of its own ([`scratch`]),
//! one endpoint on 127.0.0.1 with a random secret, and every label event routed to a handler
//! that does nothing but count ([`load::Discard`]), so what is measured is labelhook's way
//! from the socket to a handler, not a handler. Connections on loopback post signed
//! deliveries ([`load`]); every two seconds a line says how many were accepted and handled,
//! the backlog between the two and the slowest answers ([`report`]). When the load stops (at
//! `--duration`, Ctrl-C or SIGTERM) the bench waits, within `--drain-timeout`, for the handler
//! to catch up, then prints a summary.
//!
//! The configuration is the defaults but for what the run needs, and no `LABELHOOK__`
//! variable of the shell reaches it: an operator's production `LABELHOOK__STORE__URL` must not
//! become the bench's store.

mod body;
mod histogram;
mod load;
mod report;
mod scratch;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::{Application, StartError};
use body::BodyTemplate;
use histogram::Histogram;
use load::{Counters, Discard, Load, Shape};
use report::{Interval, Latency, Printer, Snapshot, Summary};
use scratch::{Scratch, ScratchError};

/// How often a line is printed.
const REPORT_INTERVAL: Duration = Duration::from_secs(2);
/// How often the drain looks whether the handler has caught up.
const DRAIN_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// The endpoint's name, so deliveries go to `/webhooks/bench`.
const ENDPOINT: &str = "bench";
/// The handler every label event is routed to.
const HANDLER: &str = "discard";
/// Where the endpoint's secret is looked up, in the map the configuration is loaded with
/// (never the process's environment).
const SECRET_VARIABLE: &str = "LABELHOOK_BENCH_SECRET";
/// The most connections: `server.max_connections` is 1024 by default, and more would be
/// answered 503 for it.
const MAX_CONNECTIONS: u64 = 1024;
/// The largest `--body-bytes`: every connection holds its body in memory.
const MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Measure PostgreSQL: a server's URL, postgres://USER[:PASSWORD]@HOST[:PORT][/DATABASE].
    /// The bench creates a database of its own there (the role needs CREATEDB) and drops it
    /// at the end; the database named is only connected to. [default: SQLite, a new database
    /// in a temporary directory]
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// Directory below which the SQLite bench makes its temporary directory: put it on the
    /// disk the service will use, since every answer waits for an fsync there [default: the
    /// system's temporary directory].
    #[arg(long, conflicts_with = "store")]
    pub dir: Option<PathBuf>,
    /// How long to send, e.g. 30s or 5m [default: until Ctrl-C or SIGTERM].
    #[arg(long, value_parser = positive_duration)]
    pub duration: Option<Duration>,
    /// Connections sending at once, each waiting for its answer before it sends again.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=MAX_CONNECTIONS))]
    pub connections: u64,
    /// Distinct labels the deliveries take turns over (1: one busy label, whose events are
    /// handled one at a time, in order).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=body::MAX_LABELS))]
    pub labels: u64,
    /// Size of every delivery's body, in bytes (a LABEL_UPDATED body in Labelbox's v1 shape).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=MAX_BODY_BYTES))]
    pub body_bytes: u64,
    /// Once the load stops, how long to wait for the handler to catch up.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// One JSON object per line (kind: start, interval, load_stopped, summary) instead of the
    /// table.
    #[arg(long)]
    pub json: bool,
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be more than 0s".to_owned()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Body(#[from] body::TooSmall),
    #[error(transparent)]
    Scratch(#[from] ScratchError),
    #[error("the bench's configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("cannot write the report: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot listen for Ctrl-C and SIGTERM: {0}")]
    Signals(std::io::Error),
    #[error(
        "no delivery was accepted ({non_2xx} answers other than 2xx, {errors} without an answer)"
    )]
    NothingAccepted { non_2xx: u64, errors: u64 },
    #[error("{left} accepted deliveries were not handled when the bench stopped waiting for them")]
    NotDrained { left: u64 },
}

/// What the `start` line of `--json` says.
#[derive(Debug, Serialize)]
struct Setup {
    store: &'static str,
    database: Option<String>,
    url: String,
    connections: u64,
    labels: u64,
    body_bytes: usize,
    duration_s: Option<f64>,
}

/// Runs the bench; the exit code is a failure when nothing was accepted or the handler did not
/// catch up.
pub async fn run(args: BenchArgs) -> Result<ExitCode, BenchError> {
    let template = BodyTemplate::of_size(usize::try_from(args.body_bytes).unwrap_or(usize::MAX))?;
    let mut stop = StopSignal::listen().map_err(BenchError::Signals)?;
    let scratch = Scratch::create(args.store.as_deref(), args.dir.as_deref()).await?;
    let outcome = run_in(&scratch, &args, template, &mut stop).await;
    // Whatever happened, the store made for the run goes (the service is stopped by now).
    let summary = match (outcome, scratch.remove().await) {
        (Ok(summary), Ok(())) => summary,
        (Err(e), Ok(())) => return Err(e),
        (Ok(_), Err(e)) => return Err(e.into()),
        (Err(e), Err(also)) => {
            // The run's own error is the one returned; this one names a database to drop.
            eprintln!("error: {also}");
            return Err(e);
        }
    };
    if summary.accepted == 0 {
        return Err(BenchError::NothingAccepted {
            non_2xx: summary.non_2xx,
            errors: summary.errors,
        });
    }
    if summary.drain_s.is_none() {
        return Err(BenchError::NotDrained {
            left: summary.accepted.saturating_sub(summary.handled),
        });
    }
    Ok(ExitCode::SUCCESS)
}

/// Serves, loads, drains and reports, then stops the service.
async fn run_in(
    scratch: &Scratch,
    args: &BenchArgs,
    template: BodyTemplate,
    stop: &mut StopSignal,
) -> Result<Summary, BenchError> {
    let secret = random_secret();
    let config = bench_config(scratch, &secret)?;
    crate::init_logging(&config.settings.log);
    let counters = Arc::new(Counters::default());
    let mut app = Application::build(config).await?;
    app.handlers_mut()
        .register(HANDLER, Arc::new(Discard(counters.clone())));
    let url = format!(
        "{}/webhooks/{ENDPOINT}",
        crate::server::display_addr(app.local_addr())
    );
    let printer = Printer::new(args.json);
    let setup = Setup {
        store: scratch.backend(),
        database: scratch.database().map(str::to_owned),
        url: url.clone(),
        connections: args.connections,
        labels: args.labels,
        body_bytes: template.len(),
        duration_s: args.duration.map(|d| d.as_secs_f64()),
    };
    printer.start(&start_lines(scratch, &setup, args.duration), &setup)?;
    let stop_service = CancellationToken::new();
    let service = tokio::spawn(app.run_until_stopped(stop_service.clone().cancelled_owned()));
    let shape = Shape {
        url,
        secret,
        template,
        labels: args.labels,
        first_update_ms: crate::delivery::now_millis(),
        run: fastrand::u32(..),
    };
    // From here on the service runs: whatever happens, it is stopped before the store goes.
    let outcome = measure(&printer, shape, args, &counters, stop).await;
    stop_service.cancel();
    let _ = service.await;
    let summary = outcome?;
    printer.summary(&summary)?;
    Ok(summary)
}

fn start_lines(scratch: &Scratch, setup: &Setup, duration: Option<Duration>) -> Vec<String> {
    let how_long = duration.map_or_else(
        || "until Ctrl-C".to_owned(),
        |d| {
            format!(
                "for {} (Ctrl-C stops it sooner)",
                humantime::format_duration(d)
            )
        },
    );
    vec![
        format!(
            "labelhook bench: {} connections post signed {}-byte LABEL_UPDATED deliveries \
             over {} labels, {how_long}",
            setup.connections, setup.body_bytes, setup.labels
        ),
        format!("service: {} (labelhook serve, in this process)", setup.url),
        format!(
            "store: {}; every answer waits for its delivery to be durable",
            scratch.describe()
        ),
        format!("handler: {HANDLER}, which does nothing, given every label event"),
    ]
}

/// The load, then the drain, with a line every [`REPORT_INTERVAL`].
async fn measure(
    printer: &Printer,
    shape: Shape,
    args: &BenchArgs,
    counters: &Arc<Counters>,
    stop: &mut StopSignal,
) -> Result<Summary, BenchError> {
    let connections = usize::try_from(args.connections).unwrap_or(1);
    let load = Load::start(shape, connections, counters.clone())?;
    let mut reports = Reports::new(counters);
    let why = reports.until_stopped(printer, args.duration, stop).await?;
    load.stop().await;
    let stopped = Snapshot::of(counters);
    let load_time = stopped.at.duration_since(reports.start);
    printer.load_stopped(why, load_time, stopped.backlog())?;
    let drained = reports.drain(printer, args.drain_timeout, stop).await?;
    let end = Snapshot::of(counters);
    let answers = reports.answers();
    let seconds = load_time.as_secs_f64().max(1e-9);
    Ok(Summary {
        load_s: seconds,
        accepted: end.accepted,
        handled: end.handled,
        accepted_per_s: stopped.accepted as f64 / seconds,
        handled_per_s: stopped.handled as f64 / seconds,
        backlog_at_stop: stopped.backlog(),
        drain_s: drained.map(|at| at.duration_since(stopped.at).as_secs_f64()),
        non_2xx: end.refused,
        errors: end.failed,
        latency: Latency::of(&answers),
        first_non_2xx: counters.first_refusal.get().cloned(),
        first_error: counters.first_failure.get().cloned(),
    })
}

/// The two-second lines, and the latencies of every answer for the summary.
struct Reports<'a> {
    counters: &'a Counters,
    start: Instant,
    last: Snapshot,
    answers: Histogram,
}

impl<'a> Reports<'a> {
    fn new(counters: &'a Counters) -> Reports<'a> {
        let last = Snapshot::of(counters);
        Reports {
            counters,
            start: last.at,
            last,
            answers: Histogram::default(),
        }
    }

    /// Prints the line of the interval that just ended.
    fn line(&mut self, printer: &Printer) -> std::io::Result<()> {
        let now = Snapshot::of(self.counters);
        let answers = self.counters.latency.take();
        printer.interval(&Interval::between(self.start, &self.last, &now, &answers))?;
        self.answers.merge(&answers);
        self.last = now;
        Ok(())
    }

    /// Reports until `duration` has passed or a signal came; says which.
    async fn until_stopped(
        &mut self,
        printer: &Printer,
        duration: Option<Duration>,
        stop: &mut StopSignal,
    ) -> std::io::Result<&'static str> {
        let mut ticks = tokio::time::interval_at(
            tokio::time::Instant::from_std(self.start) + REPORT_INTERVAL,
            REPORT_INTERVAL,
        );
        let ends = duration.map(|d| tokio::time::Instant::from_std(self.start) + d);
        let deadline = async {
            match ends {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = ticks.tick() => self.line(printer)?,
                () = &mut deadline => return Ok("--duration"),
                () = stop.next() => return Ok("signal"),
            }
        }
    }

    /// Waits, within `timeout`, for the handler to have been given every accepted delivery,
    /// still printing a line every two seconds. Returns when it caught up; `None` when it did
    /// not in time or a second signal cut the wait short.
    async fn drain(
        &mut self,
        printer: &Printer,
        timeout: Duration,
        stop: &mut StopSignal,
    ) -> std::io::Result<Option<Instant>> {
        let next_line = self.last.at + REPORT_INTERVAL;
        let mut ticks = tokio::time::interval_at(next_line.into(), REPORT_INTERVAL);
        let mut polls = tokio::time::interval(DRAIN_POLL_INTERVAL);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = polls.tick() => {
                    let now = Snapshot::of(self.counters);
                    if now.backlog() == 0 {
                        return Ok(Some(now.at));
                    }
                }
                _ = ticks.tick() => self.line(printer)?,
                () = &mut deadline => return Ok(None),
                () = stop.next() => return Ok(None),
            }
        }
    }

    /// Every answer's latency, the last interval's included.
    fn answers(&mut self) -> Histogram {
        self.answers.merge(&self.counters.latency.take());
        self.answers.clone()
    }
}

/// Ctrl-C and SIGTERM, listened for from the start of a run: one that comes while the service
/// starts is kept for the load to see, rather than ending the process there and leaving the
/// run's database behind. The first stops the load, a second the wait for the handler.
struct StopSignal {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignal {
    fn listen() -> std::io::Result<StopSignal> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(StopSignal {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignal {})
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {},
            _ = self.terminate.recv() => {},
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A secret for the run's endpoint, never shown: only the bench signs with it.
fn random_secret() -> SecretString {
    let mut key = [0u8; 32];
    if getrandom::fill(&mut key).is_err() {
        // Only the bench's own client ever sees this endpoint; any key will do.
        key = std::array::from_fn(|_| fastrand::u8(..));
    }
    SecretString::from(hex::encode(key))
}

/// The run's configuration, loaded and checked as `serve` loads a file: the defaults but for a
/// listener on 127.0.0.1 (a free port), the run's store, one endpoint and the no-op route.
fn bench_config(scratch: &Scratch, secret: &SecretString) -> Result<Config, BenchError> {
    let path = scratch.dir().join("bench.toml");
    let toml = format!(
        r#"# labelhook bench's configuration, made for one run.
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[network]
allowlist = ["127.0.0.0/8"]

[log]
level = "warn"

[[endpoint]]
name = "{ENDPOINT}"
secrets = [{{ env = "{SECRET_VARIABLE}" }}]

# Replaced by the bench's own handler, which only counts.
[[handler]]
name = "{HANDLER}"
kind = "log"

# Stale events too: the bench counts every delivery handed on.
[[route]]
topics = ["LABEL_*"]
handlers = ["{HANDLER}"]
deliver_stale = true
"#
    );
    std::fs::write(&path, toml)?;
    // The store's URL (a PostgreSQL one may carry a password) and the secret are given as
    // the environment would give them, but only to this load: they stay out of the file.
    let env = HashMap::from([
        ("LABELHOOK__STORE__URL".to_owned(), scratch.url()),
        (
            SECRET_VARIABLE.to_owned(),
            secrecy::ExposeSecret::expose_secret(secret).to_owned(),
        ),
    ]);
    Ok(Config::load(&path, &env, true)?)
}
