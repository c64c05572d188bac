//! Listeners, the router and its request layers, timeouts, readiness, and graceful shutdown.
//!
//! Connections are served by hyper directly rather than `axum::serve`, because only hyper's
//! connection builder can cut off a client that never finishes its headers
//! (`server.header_timeout`). The body deadline is enforced per request by the ingress.
//!
//! Shutdown: stop accepting, let in-flight requests finish (bounded by
//! `server.shutdown_timeout`), then the caller drains the dispatcher and closes the store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::console::Console;
use crate::ingress::{webhook, IngressState};
use crate::store::{Intake, StoreError};
use crate::telemetry::{self, MakeHexRequestId, REQUEST_ID_HEADER};

/// The route of topic deliveries (also the `route` label of their HTTP metrics).
pub const WEBHOOK_ROUTE: &str = "/webhooks/{endpoint}";
/// How long `/readyz` (and [`watch_readiness`]) waits for the store's probe commit; a probe
/// that takes longer counts as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often [`watch_readiness`] probes the store.
const READY_PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// The delivery routes. The admin routes are never among them: they are [`admin_app`], on a
/// listener of their own.
pub fn app(state: IngressState, model_training_path: Option<&str>) -> Router {
    let mut router = Router::new().route(WEBHOOK_ROUTE, post(webhook::receive_delivery));
    if let Some(path) = model_training_path {
        router = router
            .route(&format!("{path}/models"), get(webhook::list_models))
            .route(
                &format!("{path}/model_run"),
                post(webhook::receive_model_run),
            );
    }
    // Outermost first: the request id is settled (a proxy's fit one kept, else one made) and
    // echoed in the answer whatever it is; then the request span, so that everything below
    // logs inside it; then the request's metrics.
    let request_layers = ServiceBuilder::new()
        .map_request(telemetry::keep_fit_request_id)
        .layer(SetRequestIdLayer::new(REQUEST_ID_HEADER, MakeHexRequestId))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(telemetry::request_span)
                .on_request(telemetry::request_started)
                .on_response(telemetry::request_finished)
                // One line per request, the one above; a refusal logs its own reason.
                .on_body_chunk(())
                .on_eos(())
                .on_failure(()),
        );
    let router = router
        .route_layer(middleware::from_fn(record_request))
        .route_layer(request_layers)
        .with_state(state);
    router
        // Bodies are streamed and limited by the ingress itself (`server.max_body_bytes`).
        .layer(DefaultBodyLimit::disable())
        .layer(CatchPanicLayer::custom(|_| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({ "error": "internal error" })),
            )
                .into_response()
        }))
}

/// The admin listener's routes: `/healthz`, `/readyz`, `/metrics` and the console.
pub fn admin_app(state: IngressState, console: Console) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|| async { telemetry::metrics_handle().render() }).route_layer(
                middleware::from_fn_with_state(console.clone(), crate::console::require_bearer),
            ),
        )
        .with_state(state)
        // The operations console, `/ui/`.
        .merge(console.router())
}

async fn readyz(State(state): State<IngressState>) -> Response {
    let probed = probe(state.store().as_ref()).await;
    telemetry::set_store_ready(probed.is_ok());
    match probed {
        Ok(()) => Json(json!({ "status": "ready" })).into_response(),
        Err(ProbeFailure::Store(e)) => {
            tracing::warn!(error = %e, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": "store unavailable" })),
            )
                .into_response()
        }
        Err(ProbeFailure::TimedOut) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": "store did not answer in time" })),
        )
            .into_response(),
    }
}

/// Why the store did not take a probe commit.
#[derive(Debug, thiserror::Error)]
enum ProbeFailure {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the probe commit took longer than {}",
        humantime::format_duration(READY_TIMEOUT)
    )]
    TimedOut,
}

/// The commit `/readyz` makes, bounded by [`READY_TIMEOUT`].
async fn probe(store: &dyn Intake) -> Result<(), ProbeFailure> {
    match tokio::time::timeout(READY_TIMEOUT, store.check_ready()).await {
        Ok(checked) => Ok(checked?),
        Err(_) => Err(ProbeFailure::TimedOut),
    }
}

/// Probes the store (the commit `/readyz` makes) every [`READY_PROBE_INTERVAL`] until `stop`,
/// so that `labelhook_store_ready` is current whether or not anything polls `/readyz`. A change
/// either way is logged once, with the probe's error, so that the alert on the gauge leads to
/// the reason.
pub async fn watch_readiness(store: Arc<dyn Intake>, stop: CancellationToken) {
    let mut was_ready = true;
    loop {
        let probed = probe(store.as_ref()).await;
        match (&probed, was_ready) {
            (Err(e), true) => tracing::warn!(error = %e, "store not ready"),
            (Ok(()), false) => tracing::info!("store ready again"),
            _ => {}
        }
        was_ready = probed.is_ok();
        telemetry::set_store_ready(was_ready);
        tokio::select! {
            () = tokio::time::sleep(READY_PROBE_INTERVAL) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Request counts and durations, labelled by the matched route (never the raw path).
async fn record_request(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(String::new, |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(
        "labelhook_http_request_duration_seconds",
        "route" => route.clone(),
        "method" => method.clone(),
        "status" => status.clone(),
    )
    .record(started.elapsed().as_secs_f64());
    metrics::counter!(
        "labelhook_http_requests_total",
        "route" => route,
        "method" => method,
        "status" => status,
    )
    .increment(1);
    response
}

/// How one listener's connections are bounded.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// `server.header_timeout`.
    pub header_timeout: Duration,
    /// `server.shutdown_timeout`.
    pub shutdown_timeout: Duration,
    /// `server.max_connections`: connections served at once on this listener.
    pub max_connections: usize,
}

/// Refused connections left lingering at once (see [`refuse`]). Past this, the one refused
/// longest ago is closed to make room: its answer was written when it was refused, so cutting
/// its linger short costs little, while every newcomer still learns it must come back. The
/// answer must not itself become a way to hold descriptors.
const MAX_REFUSING: usize = 64;
/// How long a refused connection may take to read its 503, and how long it is drained so the
/// close does not reset the connection before the client has read it.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Most bytes read and dropped from a refused connection while it lingers.
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;
/// Least time between two warnings that connections are being refused (one line per refusal
/// would let a flood write the log).
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

/// How large hyper's read buffer of a connection may grow (its default is 400 KiB), and so
/// the largest request head (431 beyond it). The buffer grows while bytes arrive fast and
/// keeps its size while a client stalls: at 400 KiB, 1,000 stalled 64 KiB uploads held 2.6
/// times their bodies (issue 22). Reads of a large body are 16 KiB each; the body is
/// streamed anyway.
const MAX_READ_BUFFER_BYTES: usize = 16 * 1024;

/// Serves `router` on `listener` until `stop` is cancelled, then waits (up to
/// `shutdown_timeout`) for open requests to finish.
///
/// Each connection holds one of `max_connections` permits until it closes. A connection
/// beyond them is accepted only to be answered `503` with `Retry-After` and closed, rather
/// than left in the kernel's queue: a sender learns at once that it must come back, and the
/// queue does not fill with connections nobody will serve in time. The body pace rule and
/// the header timeout make sure the permits held by slow clients come back.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    stop: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let mut refusing = Lingering::default();
    let mut last_warned: Option<Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: log, breathe, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            metrics::counter!("labelhook_connections_refused_total").increment(1);
            if last_warned.is_none_or(|at| at.elapsed() >= REFUSAL_WARN_EVERY) {
                last_warned = Some(Instant::now());
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "connection limit reached: new connections are answered 503"
                );
            }
            refusing.refuse(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = router
            .clone()
            .map_request(move |mut request: hyper::Request<Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                request
            });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(MAX_READ_BUFFER_BYTES)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown timeout: closing connections with requests still open");
    }
}

/// Refused connections still lingering, oldest first, each with the token that cuts its
/// linger short.
#[derive(Default)]
struct Lingering {
    refusals: std::collections::VecDeque<(tokio::task::JoinHandle<()>, CancellationToken)>,
}

impl Lingering {
    /// Answers `stream` 503 and lets it linger, closing the oldest lingering one first when
    /// [`MAX_REFUSING`] are.
    fn refuse(&mut self, stream: tokio::net::TcpStream) {
        self.refusals.retain(|(task, _)| !task.is_finished());
        while self.refusals.len() >= MAX_REFUSING {
            if let Some((_, cut)) = self.refusals.pop_front() {
                cut.cancel();
            }
        }
        // Written here rather than in the task, so that even a refusal cut short at once has
        // been answered: a fresh socket's send buffer takes the few hundred bytes.
        let answer = refusal_response();
        let written = stream.try_write(&answer).unwrap_or(0);
        let cut = CancellationToken::new();
        let cutting = cut.clone();
        let task = tokio::spawn(async move {
            let mut stream = stream;
            tokio::select! {
                () = refuse(&mut stream, answer, written) => {},
                () = cutting.cancelled() => {
                    // Whatever already arrived is read, so the close is a FIN, not a reset.
                    let mut buf = [0u8; 4096];
                    let mut drained = 0;
                    while drained < REFUSAL_DRAIN_BYTES {
                        match stream.try_read(&mut buf) {
                            Ok(n) if n > 0 => drained += n,
                            _ => break,
                        }
                    }
                },
            }
        });
        self.refusals.push_back((task, cut));
    }
}

/// The whole answer to a connection over the limit: written by hand, since hyper (and the
/// memory of a served connection) is what the limit keeps it from.
fn refusal_response() -> Vec<u8> {
    let body = json!({ "error": "too many connections" }).to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: {}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        crate::ingress::webhook::RETRY_AFTER_SECONDS,
        body.len()
    )
    .into_bytes()
}

/// Answers 503 and closes, reading (and dropping) what the client sends meanwhile: closing a
/// socket with unread bytes resets it, and a reset can destroy the answer before it is read.
/// `written` bytes of `answer` were sent already.
async fn refuse(stream: &mut tokio::net::TcpStream, answer: Vec<u8>, written: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answer = async {
        stream
            .write_all(answer.get(written..).unwrap_or_default())
            .await?;
        stream.shutdown().await?;
        let mut drained = 0;
        let mut buf = [0u8; 4096];
        while drained < REFUSAL_DRAIN_BYTES {
            match stream.read(&mut buf).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, answer).await;
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let kind = tokio::signal::unix::SignalKind::terminate();
        let Ok(mut term) = tokio::signal::unix::signal(kind) else {
            let _ = ctrl_c.await;
            return;
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A bound listener's address, as printed in the `listening on` line.
pub fn display_addr(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

#[cfg(test)]
mod router_tests;
