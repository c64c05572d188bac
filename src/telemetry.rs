//! Logs, traces and metrics: the tracing subscriber, the request id that ties one delivery's
//! log lines together, and the Prometheus recorder with every metric family's help text.
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
//! Metrics: the Prometheus recorder is process-wide, installed once, and every family is
//! described here ([`FAMILIES`]), in one place, so that `/metrics` passes
//! `promtool check metrics` and an operator reading it knows what each number is.

use std::io::IsTerminal;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::{LogFormat, LogSettings};
use crate::store::Intake;

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
        name: "labelhook_deliveries_total",
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

/// How often [`watch_readiness`] probes the store.
const READY_PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// How long one probe may take before the store counts as not ready.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes the store (the commit `/readyz` makes) every [`READY_PROBE_INTERVAL`] until `stop`,
/// so that [`STORE_READY`] is current whether or not anything polls `/readyz`. A change either
/// way is logged once, with the probe's error, so that the alert on [`STORE_READY`] leads to
/// the reason.
pub async fn watch_readiness(store: Arc<dyn Intake>, stop: CancellationToken) {
    let mut was_ready = true;
    loop {
        let failure = match tokio::time::timeout(READY_PROBE_TIMEOUT, store.check_ready()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "the probe commit took longer than {}",
                humantime::format_duration(READY_PROBE_TIMEOUT)
            )),
        };
        let ready = failure.is_none();
        match (&failure, was_ready) {
            (Some(error), true) => tracing::warn!(%error, "store not ready"),
            (None, false) => tracing::info!("store ready again"),
            _ => {}
        }
        was_ready = ready;
        set_store_ready(ready);
        tokio::select! {
            () = tokio::time::sleep(READY_PROBE_INTERVAL) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// The header a proxy may set, and that every answer on the delivery routes carries.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest request id taken from a proxy; a longer one is replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The id of one HTTP request: from `X-Request-Id` when a proxy sent a fit one, else made
/// here. Only `[A-Za-z0-9._-]`, at most 128 characters, so it is safe in any log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    /// A header value fit to be a request id, or `None`.
    pub fn parse(value: &[u8]) -> Option<RequestId> {
        let fit = !value.is_empty()
            && value.len() <= MAX_REQUEST_ID_LEN
            && value
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        fit.then(|| RequestId(String::from_utf8_lossy(value).into_owned()))
    }

    /// A new id: 128 random bits in hex. Not a secret, only unique enough to search logs by.
    pub fn generate() -> RequestId {
        RequestId(format!("{:032x}", fastrand::u128(..)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Middleware on the delivery routes: takes the request id from `X-Request-Id` (or makes one
/// when it is missing or unfit), puts it back on the request for the handler (an unfit one is
/// replaced, so nothing downstream sees it), runs the request inside a `request` span that the
/// handler fills in with the delivery's fields, echoes the id in the answer, and logs one line
/// when the answer is ready.
pub async fn request_span(mut request: Request, next: Next) -> Response {
    let given = request.headers().get(REQUEST_ID_HEADER);
    let replaced = given.is_some();
    let (id, replaced) = match given.and_then(|v| RequestId::parse(v.as_bytes())) {
        Some(id) => (id, false),
        None => (RequestId::generate(), replaced),
    };
    let header = HeaderValue::from_str(id.as_str()).ok();
    if let Some(value) = &header {
        request
            .headers_mut()
            .insert(REQUEST_ID_HEADER, value.clone());
    }
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(String::new, |p| p.as_str().to_owned());
    let span = tracing::info_span!(
        "request",
        request_id = %id.as_str(),
        method = %request.method(),
        route = %route,
        delivery_id = tracing::field::Empty,
        seq = tracing::field::Empty,
        topic = tracing::field::Empty,
    );
    let started = Instant::now();
    async move {
        if replaced {
            tracing::debug!("unfit X-Request-Id replaced by a new id");
        }
        let mut response = next.run(request).await;
        if let Some(value) = header {
            response.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        let status = response.status().as_u16();
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(status, duration_ms, "request finished");
        response
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_request_id_is_kept_only_when_short_and_plain() {
        assert_eq!(
            RequestId::parse(b"abc-123_x.y").map(|id| id.0),
            Some("abc-123_x.y".to_owned())
        );
        assert!(RequestId::parse(&[b'a'; MAX_REQUEST_ID_LEN]).is_some());
        assert!(RequestId::parse(&[b'a'; MAX_REQUEST_ID_LEN + 1]).is_none());
        for unfit in [
            &b""[..],
            b"a b",
            b"a\nb",
            b"id\"}",
            b"caf\xc3\xa9",
            b"a/b",
            b"a=b",
        ] {
            assert!(RequestId::parse(unfit).is_none(), "{unfit:?}");
        }
        let made = RequestId::generate();
        assert_eq!(made.as_str().len(), 32);
        assert!(RequestId::parse(made.as_str().as_bytes()).is_some());
        assert_ne!(made, RequestId::generate());
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
        assert!(recorded.iter().any(|n| n == "labelhook_deliveries_total"));
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
