//! Listeners, the router, timeouts, and graceful shutdown.
//!
//! Connections are served by hyper directly rather than `axum::serve`, because only hyper's
//! connection builder can cut off a client that never finishes its headers
//! (`server.header_timeout`). The body deadline is enforced per request by the ingress.
//!
//! Shutdown: stop accepting, let in-flight requests finish (bounded by
//! `server.shutdown_timeout`), then the caller drains the dispatcher and closes the store.

use std::net::SocketAddr;
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
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::catch_panic::CatchPanicLayer;

use crate::ingress::{webhook, IngressState};

/// How long `/readyz` waits for the store's probe commit.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// The delivery routes (and the admin routes when they share the listener).
pub fn app(state: IngressState, model_training_path: Option<&str>, with_admin: bool) -> Router {
    let mut router = Router::new().route("/webhooks/{endpoint}", post(webhook::receive_delivery));
    if let Some(path) = model_training_path {
        router = router
            .route(&format!("{path}/models"), get(webhook::list_models))
            .route(
                &format!("{path}/model_run"),
                post(webhook::receive_model_run),
            );
    }
    let mut router = router
        .route_layer(middleware::from_fn(record_request))
        .with_state(state.clone());
    if with_admin {
        router = router.merge(admin_app(state));
    }
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

/// `/healthz`, `/readyz`, `/metrics`.
pub fn admin_app(state: IngressState) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|| async { crate::telemetry::metrics_handle().render() }),
        )
        .with_state(state)
}

async fn readyz(State(state): State<IngressState>) -> Response {
    match tokio::time::timeout(READY_TIMEOUT, state.store().check_ready()).await {
        Ok(Ok(())) => Json(json!({ "status": "ready" })).into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": "store unavailable" })),
            )
                .into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": "store did not answer in time" })),
        )
            .into_response(),
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

/// Serves `router` on `listener` until `stop` is cancelled, then waits (up to
/// `shutdown_timeout`) for open requests to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    shutdown_timeout: Duration,
    stop: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
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
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown timeout: closing connections with requests still open");
    }
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
