//! Logs, traces and metrics: the tracing subscriber and its settings, what a request's span
//! and log lines hold (its request id, its delivery once known, a bounded copy of any value a
//! client sent), and the Prometheus recorder with every metric family's help text.
//!
//! It imports nothing of ours: every other module logs and counts through it, so it sits at
//! the floor of the house (`config` composes its [`LogSettings`]).
//!
//! Logs go to stderr (stdout carries the `listening on` lines that scripts read), as JSON or, on
//! a terminal, pretty. A JSON line carries the fields of the spans it was logged in, so a line
//! logged inside a delivery's span can be found by that delivery's id and request id:
//! - `request` (one per HTTP request on the delivery routes, see [`request_span`]):
//!   `request_id`, `method`, `route`, then `delivery_id`, `seq`, `topic` once they are known;
//! - `gate` and `dispatch` (the dispatcher, in another task and maybe another replica):
//!   `delivery_id`, `seq`, `request_id` (read back from the store), `topic`, `entity`;
//! - `attempt` (inside `dispatch`): `handler`, `attempt`.
//!
//! The request's id and span are tower-http's middleware (`SetRequestId`, `PropagateRequestId`
//! and `TraceLayer`, put together by the server); this module gives them what is labelhook's
//! own: which ids are fit to keep ([`keep_fit_request_id`]), how a new one is made
//! ([`MakeHexRequestId`]), the span's fields ([`request_span`]) and its last line
//! ([`request_finished`]).
//!
//! Metrics: the Prometheus recorder is process-wide, installed once, and every family is
//! described here ([`FAMILIES`]), in one place, so that `/metrics` passes
//! `promtool check metrics` and an operator reading it knows what each number is.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use axum::extract::MatchedPath;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use tower_http::request_id::{MakeRequestId, RequestId};
use tracing::Span;
use tracing_subscriber::{fmt, EnvFilter};

/// Seconds; request durations from sub-millisecond acks to multi-minute huge bodies.
const DURATION_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 10.0, 60.0,
];
/// Writes per commit: one, up to the largest `store.commit_batch_max` worth having.
const BATCH_SIZE_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

// Names of the families this module's callers record. Each is also in [`FAMILIES`].

/// Histogram: how long one store commit took (`backend` label).
pub const STORE_COMMIT_SECONDS: &str = "labelhook_store_commit_duration_seconds";
/// Histogram: writes per store commit (`backend` label).
pub const STORE_COMMIT_BATCH_SIZE: &str = "labelhook_store_commit_batch_size";
/// Counter: deliveries answered (`endpoint`, `topic` and `outcome` labels).
pub const DELIVERIES_TOTAL: &str = "labelhook_deliveries_total";
/// Gauge: 1 while the store takes commits, 0 when its last probe failed.
pub const STORE_READY: &str = "labelhook_store_ready";
pub const STORE_REFUSALS_TOTAL: &str = "labelhook_store_refusals_total";
/// Gauge: age of the oldest delivery with work left.
pub const OLDEST_PENDING_AGE_SECONDS: &str = "labelhook_oldest_pending_delivery_age_seconds";
/// Gauge: deliveries dead-lettered now.
pub const DEAD_LETTERS: &str = "labelhook_dead_letters";
/// Counter: handler runs dead-lettered (`handler` label).
pub const DEAD_LETTERS_TOTAL: &str = "labelhook_dead_letters_total";
/// Counter: failed handler attempts (`handler` label).
pub const HANDLER_FAILURES_TOTAL: &str = "labelhook_handler_failures_total";
/// Histogram: how long one handler attempt took (`handler` label).
pub const HANDLER_ATTEMPT_SECONDS: &str = "labelhook_handler_attempt_duration_seconds";

/// Prometheus metric types, as described to the recorder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric family: what `# HELP` says about it.
struct Family {
    name: &'static str,
    kind: Kind,
    unit: Option<Unit>,
    help: &'static str,
}

/// Every metric family the service publishes. A family recorded anywhere in `src/` and missing
/// here fails the unit test below (and `promtool check metrics`, for want of help text).
const FAMILIES: &[Family] = &[
    // HTTP
    Family {
        name: "labelhook_http_requests_total",
        kind: Kind::Counter,
        unit: None,
        help: "HTTP requests answered on the delivery routes, by matched route, method and status code.",
    },
    Family {
        name: "labelhook_http_request_duration_seconds",
        kind: Kind::Histogram,
        unit: Some(Unit::Seconds),
        help: "Time to answer an HTTP request on the delivery routes (body, signature, store commit), by matched route, method and status code.",
    },
    Family {
        name: "labelhook_connections_refused_total",
        kind: Kind::Counter,
        unit: None,
        help: "Connections turned away (answered 503, or closed) because server.max_connections were open already.",
    },
    // Ingress
    Family {
        name: DELIVERIES_TOTAL,
        kind: Kind::Counter,
        unit: None,
        help: "Deliveries answered, by endpoint, canonical topic and outcome: accepted, duplicate, or the reason one was refused (address_not_allowed, signature_missing, signature_malformed, signature_mismatch, too_large, unsupported_media, bad_delivery_id, body_timeout, body_too_slow, overloaded, body_read_error, unknown_endpoint, store_unavailable, queue_full).",
    },
    Family {
        name: "labelhook_queue_depth",
        kind: Kind::Gauge,
        unit: None,
        help: "Deliveries with work left: not yet gated, due or retrying, or waiting behind an earlier delivery of their entity.",
    },
    Family {
        name: OLDEST_PENDING_AGE_SECONDS,
        kind: Kind::Gauge,
        unit: Some(Unit::Seconds),
        help: "Age (since it was received) of the oldest delivery with work left; 0 when there is none.",
    },
    // Store
    Family {
        name: STORE_READY,
        kind: Kind::Gauge,
        unit: None,
        help: "1 when the store's last probe commit succeeded (what /readyz checks), 0 when it failed.",
    },
    Family {
        name: STORE_REFUSALS_TOTAL,
        kind: Kind::Counter,
        unit: None,
        help: "Writes the store refused because it was unavailable (deliveries, the dispatcher's records, probes), by back-end.",
    },
    Family {
        name: STORE_COMMIT_SECONDS,
        kind: Kind::Histogram,
        unit: Some(Unit::Seconds),
        help: "Time one store commit took, by backend: a SQLite group commit of queued writes, or one PostgreSQL write transaction (a delivery, a batch of gates, a claim, or a delivery's attempts).",
    },
    Family {
        name: STORE_COMMIT_BATCH_SIZE,
        kind: Kind::Histogram,
        unit: Some(Unit::Count),
        help: "Writes committed together, by backend: SQLite's group commit takes whatever writes are queued; PostgreSQL commits each write in a transaction of its own, so its batches are of one.",
    },
    Family {
        name: DEAD_LETTERS,
        kind: Kind::Gauge,
        unit: None,
        help: "Deliveries dead-lettered now (status dead), waiting for a replay; read with the store statistics.",
    },
    Family {
        name: "labelhook_store_deliveries",
        kind: Kind::Gauge,
        unit: None,
        help: "Deliveries kept in the store, by status.",
    },
    Family {
        name: "labelhook_store_bytes",
        kind: Kind::Gauge,
        unit: Some(Unit::Bytes),
        help: "Bytes the store takes, by part: database, or bodies.",
    },
    Family {
        name: "labelhook_store_oldest_delivery_age_seconds",
        kind: Kind::Gauge,
        unit: Some(Unit::Seconds),
        help: "Age of the oldest delivery kept in the store, whatever its status (retention bounds it).",
    },
    Family {
        name: "labelhook_pruned_deliveries_total",
        kind: Kind::Counter,
        unit: None,
        help: "Deliveries deleted by retention, by status.",
    },
    Family {
        name: "labelhook_pruned_bodies_total",
        kind: Kind::Counter,
        unit: None,
        help: "Bodies dropped by retention from deliveries whose rows are kept.",
    },
    Family {
        name: "labelhook_prune_last_run_deliveries",
        kind: Kind::Gauge,
        unit: None,
        help: "Deliveries deleted by the last run of the background pruner.",
    },
    // Dispatch
    Family {
        name: "labelhook_stale_events_total",
        kind: Kind::Counter,
        unit: None,
        help: "Events the gate judged stale (older than what was applied for their entity), by canonical topic.",
    },
    Family {
        name: "labelhook_handler_attempts_total",
        kind: Kind::Counter,
        unit: None,
        help: "Handler attempts, by handler and outcome: ok, retry (failed, tried again later) or dead (failed for good).",
    },
    Family {
        name: HANDLER_FAILURES_TOTAL,
        kind: Kind::Counter,
        unit: None,
        help: "Failed handler attempts, by handler, whether retried later or dead-lettered.",
    },
    Family {
        name: DEAD_LETTERS_TOTAL,
        kind: Kind::Counter,
        unit: None,
        help: "Handler runs dead-lettered (a permanent error, or out of attempts), by handler.",
    },
    Family {
        name: HANDLER_ATTEMPT_SECONDS,
        kind: Kind::Histogram,
        unit: Some(Unit::Seconds),
        help: "Time one handler attempt took, by handler.",
    },
];

/// How log lines are written: `[log]` in the configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Pretty on a terminal, JSON otherwise.
    #[default]
    Auto,
    Json,
    Pretty,
}

/// The `[log]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `labelhook=debug,info`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            level: "info".to_owned(),
        }
    }
}

/// Installs the global subscriber; `RUST_LOG` wins over the configured level.
pub fn init_logging(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match settings.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests building several apps in one process) is harmless. JSON lines carry
    // the current span and the list of spans they were logged in, with their fields.
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .try_init()
    } else {
        builder.try_init()
    };
}

/// The process-wide Prometheus recorder, with every family described.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        // Fails only when another recorder is installed (an embedding program's): then ours
        // still renders what it saw, which is nothing, rather than panicking.
        if metrics::set_global_recorder(recorder).is_ok() {
            describe_all();
        }
        handle
    })
}

/// Buckets: durations by default, counts for the batch size. (Neither can fail: the bucket
/// lists are not empty.)
fn builder() -> PrometheusBuilder {
    let durations = || {
        PrometheusBuilder::new()
            .set_buckets(&DURATION_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new())
    };
    durations()
        .set_buckets_for_metric(
            Matcher::Full(STORE_COMMIT_BATCH_SIZE.to_owned()),
            &BATCH_SIZE_BUCKETS,
        )
        .unwrap_or_else(|_| durations())
}

fn describe_all() {
    metrics::with_recorder(|recorder| {
        for family in FAMILIES {
            let name = metrics::KeyName::from_const_str(family.name);
            let help = metrics::SharedString::const_str(family.help);
            match family.kind {
                Kind::Counter => recorder.describe_counter(name, family.unit, help),
                Kind::Gauge => recorder.describe_gauge(name, family.unit, help),
                Kind::Histogram => recorder.describe_histogram(name, family.unit, help),
            }
        }
    });
}

/// One store commit: how long it took and how many writes it carried.
pub fn record_commit(backend: &'static str, took: Duration, writes: usize) {
    metrics::histogram!(STORE_COMMIT_SECONDS, "backend" => backend).record(took.as_secs_f64());
    metrics::histogram!(STORE_COMMIT_BATCH_SIZE, "backend" => backend).record(writes as f64);
}

/// Publishes whether the store took its last probe commit.
pub fn set_store_ready(ready: bool) {
    metrics::gauge!(STORE_READY).set(if ready { 1.0 } else { 0.0 });
}

/// The answers to deliveries this process gave, by outcome: what [`DELIVERIES_TOTAL`] counts,
/// summed over its endpoints and topics. Kept beside the counter, by the one call that
/// increments both, so that the console can read it without rendering `/metrics` (a
/// Prometheus counter cannot be read back through its handle) and it cannot drift from it.
fn outcome_counts() -> &'static Mutex<BTreeMap<&'static str, u64>> {
    static COUNTS: OnceLock<Mutex<BTreeMap<&'static str, u64>>> = OnceLock::new();
    COUNTS.get_or_init(Mutex::default)
}

/// Counts one answer to a delivery in [`DELIVERIES_TOTAL`] (and in the per-outcome totals
/// [`deliveries_by_outcome`] reads).
pub fn count_delivery(endpoint: &str, topic: &'static str, outcome: &'static str) {
    metrics::counter!(
        DELIVERIES_TOTAL,
        "endpoint" => endpoint.to_owned(),
        "topic" => topic,
        "outcome" => outcome,
    )
    .increment(1);
    if let Ok(mut counts) = outcome_counts().lock() {
        *counts.entry(outcome).or_insert(0) += 1;
    }
}

/// The answers to deliveries this process gave since it started, by outcome.
pub fn deliveries_by_outcome() -> BTreeMap<String, u64> {
    outcome_counts().lock().map_or_else(
        |_| BTreeMap::new(),
        |counts| counts.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect(),
    )
}

/// Longest piece of a client-sent value that reaches a log line.
const LOGGED_VALUE_MAX_CHARS: usize = 64;

/// A client-sent value fit for a log line whoever sent it: at most `LOGGED_VALUE_MAX_CHARS`
/// characters, anything but printable ASCII shown as `?`. A refused request must not be able to
/// write more to the log than a few hundred bytes.
pub fn bounded_for_log(value: &str) -> String {
    let mut shown: String = value
        .chars()
        .take(LOGGED_VALUE_MAX_CHARS)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if value.chars().nth(LOGGED_VALUE_MAX_CHARS).is_some() {
        shown.push_str("...");
    }
    shown
}

/// The header a proxy may set, and that every answer on the delivery routes carries.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// Longest request id taken from a proxy; a longer one is replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Whether a request id is fit to keep: only `[A-Za-z0-9._-]`, at most 128 characters, so it
/// is safe in any log line.
fn is_fit_request_id(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= MAX_REQUEST_ID_LEN
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The request's id, as the request layers left it in `X-Request-Id` (when it is fit).
pub fn request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get(REQUEST_ID_HEADER)
        .filter(|v| is_fit_request_id(v.as_bytes()))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Marks a request whose `X-Request-Id` was unfit and removed, for [`request_started`].
#[derive(Debug, Clone, Copy)]
struct UnfitRequestIdRemoved;

/// The first request layer: keeps a proxy's `X-Request-Id` when it is fit (one value only),
/// and removes an unfit one, so that `SetRequestId` makes a new id in its place and nothing
/// downstream (the span, the stored delivery, the answer) ever sees it.
pub fn keep_fit_request_id<B>(mut request: Request<B>) -> Request<B> {
    let given = request.headers().get(REQUEST_ID_HEADER).cloned();
    match given {
        None => {}
        Some(value) if is_fit_request_id(value.as_bytes()) => {
            request.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        Some(_) => {
            request.headers_mut().remove(REQUEST_ID_HEADER);
            request.extensions_mut().insert(UnfitRequestIdRemoved);
        }
    }
    request
}

/// Makes the id of a request that came without a fit one: 128 random bits in hex. Not a
/// secret, only unique enough to search logs by.
#[derive(Debug, Clone, Copy, Default)]
pub struct MakeHexRequestId;

impl MakeRequestId for MakeHexRequestId {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&format!("{:032x}", fastrand::u128(..)))
            .ok()
            .map(RequestId::new)
    }
}

/// The `request` span of one request on the delivery routes, with its id, method and matched
/// route; the ingress fills in the delivery's fields once they are known.
pub fn request_span<B>(request: &Request<B>) -> Span {
    let id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("", MatchedPath::as_str);
    tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        route = %route,
        delivery_id = tracing::field::Empty,
        seq = tracing::field::Empty,
        topic = tracing::field::Empty,
    )
}

/// Inside the request's span, as it starts: says when a proxy's id was replaced.
pub fn request_started<B>(request: &Request<B>, _span: &Span) {
    if request
        .extensions()
        .get::<UnfitRequestIdRemoved>()
        .is_some()
    {
        tracing::debug!("unfit X-Request-Id replaced by a new id");
    }
}

/// Inside the request's span, when the answer is ready: its one line.
pub fn request_finished<B>(response: &Response<B>, latency: Duration, _span: &Span) {
    let status = response.status().as_u16();
    let duration_ms = latency.as_secs_f64() * 1000.0;
    tracing::info!(status, duration_ms, "request finished");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_request_id_is_kept_only_when_short_and_plain() {
        assert!(is_fit_request_id(b"abc-123_x.y"));
        assert!(is_fit_request_id(&[b'a'; MAX_REQUEST_ID_LEN]));
        assert!(!is_fit_request_id(&[b'a'; MAX_REQUEST_ID_LEN + 1]));
        for unfit in [
            &b""[..],
            b"a b",
            b"a\nb",
            b"id\"}",
            b"caf\xc3\xa9",
            b"a/b",
            b"a=b",
        ] {
            assert!(!is_fit_request_id(unfit), "{unfit:?}");
        }
        let make = || {
            MakeHexRequestId
                .make_request_id(&Request::new(()))
                .expect("an id")
                .into_header_value()
        };
        let made = make();
        assert_eq!(made.len(), 32);
        assert!(is_fit_request_id(made.as_bytes()));
        assert_ne!(made, make());
    }

    #[test]
    fn an_unfit_request_id_is_removed_and_a_fit_one_kept_alone() {
        let with = |values: &[&str]| {
            let mut request = Request::new(());
            for v in values {
                request.headers_mut().append(
                    REQUEST_ID_HEADER,
                    HeaderValue::from_str(v).expect("a value"),
                );
            }
            keep_fit_request_id(request)
        };
        let kept = with(&["proxy-1", "second"]);
        let values: Vec<_> = kept.headers().get_all(REQUEST_ID_HEADER).iter().collect();
        assert_eq!(values, ["proxy-1"]);
        assert_eq!(request_id(kept.headers()).as_deref(), Some("proxy-1"));
        assert!(kept.extensions().get::<UnfitRequestIdRemoved>().is_none());

        let removed = with(&["has space"]);
        assert!(removed.headers().get(REQUEST_ID_HEADER).is_none());
        assert!(removed
            .extensions()
            .get::<UnfitRequestIdRemoved>()
            .is_some());
        assert!(with(&[]).headers().get(REQUEST_ID_HEADER).is_none());
    }

    #[test]
    fn client_sent_values_reach_logs_bounded_and_printable() {
        assert_eq!(bounded_for_log("LABEL_UPDATED"), "LABEL_UPDATED");
        let long = "A".repeat(300_000);
        let shown = bounded_for_log(&long);
        assert_eq!(shown.len(), LOGGED_VALUE_MAX_CHARS + 3);
        assert!(shown.ends_with("..."));
        assert_eq!(bounded_for_log("a\nb\u{1b}[31mc\u{e9}"), "a?b?[31mc?");
    }

    /// The per-outcome totals move with the counter, whatever the endpoint and topic. (An
    /// outcome of this test's own, since other tests in the process count deliveries too.)
    #[test]
    fn each_counted_delivery_moves_its_outcome_total() {
        const OUTCOME: &str = "test_only_outcome";
        let before = deliveries_by_outcome().get(OUTCOME).copied().unwrap_or(0);
        count_delivery("labelbox", "LABEL_UPDATED", OUTCOME);
        count_delivery("unknown", "none", OUTCOME);
        let after = deliveries_by_outcome().get(OUTCOME).copied();
        assert_eq!(after, Some(before + 2));
    }

    /// Every `"labelhook_..."` name recorded in the sources is described, once, with a name
    /// Prometheus accepts (counters end in `_total`, nothing else does).
    #[test]
    fn every_metric_family_in_the_sources_has_help_text() {
        let described: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
        let mut unique = described.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), described.len(), "a family described twice");
        for family in FAMILIES {
            let total = family.name.ends_with("_total");
            assert_eq!(total, family.kind == Kind::Counter, "{}", family.name);
            assert!(!family.help.is_empty() && !family.help.contains('\n'));
        }
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut recorded = Vec::new();
        collect_metric_names(&src, &mut recorded);
        assert!(recorded
            .iter()
            .any(|n| n == "labelhook_http_requests_total"));
        for name in recorded {
            assert!(
                described.contains(&name.as_str()),
                "{name} is recorded but not described in FAMILIES"
            );
        }
    }

    /// Names given as string literals to the `counter!`, `gauge!` and `histogram!` macros in
    /// the sources under `dir`.
    fn collect_metric_names(dir: &std::path::Path, names: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                collect_metric_names(&path, names);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            for kind in ["counter", "gauge", "histogram"] {
                let call = format!("{kind}!(");
                for (at, _) in text.match_indices(&call) {
                    let rest = text[at + call.len()..].trim_start();
                    if let Some(quoted) = rest.strip_prefix('"') {
                        if let Some(end) = quoted.find('"') {
                            names.push(quoted[..end].to_owned());
                        }
                    }
                }
            }
        }
    }
}
