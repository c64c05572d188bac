//! The load: connections that post signed LABEL_UPDATED deliveries over loopback as fast as
//! they are answered, and the handler at the other end that does nothing but count.
//!
//! Each connection sends, waits for the whole answer, and sends again (a closed loop, as
//! Labelbox's own sender and `wrk` do), so the load is as high as labelhook lets it be and the
//! latencies are those of the answers, not of a queue in the client. Every delivery has an id
//! of its own and a later `updatedAt` than the one before, and the labels take turns, so each
//! label's events arrive in order, as a labelling project's do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::body::BodyTemplate;
use super::histogram::AtomicHistogram;
use crate::delivery::signature::{sign, Algorithm};
use crate::handlers::{Handler, HandlerError, HandlerEvent};

/// The longest one request may take. labelhook holds answers back by at most
/// `server.backlog_max_delay` (1 s by default); a minute is a server that stopped answering.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// What both ends count, read by the reports.
#[derive(Default)]
pub struct Counters {
    /// Deliveries answered 2xx: stored, as far as the sender can tell.
    pub accepted: AtomicU64,
    /// Deliveries the no-op handler was given.
    pub handled: AtomicU64,
    /// Answers other than 2xx.
    pub refused: AtomicU64,
    /// Requests that got no answer (connection refused or reset, timeout).
    pub failed: AtomicU64,
    /// Time from sending a request to having read its whole answer, in microseconds.
    pub latency: AtomicHistogram,
    /// The first answer other than 2xx, and the first request that failed, for the summary:
    /// a bench where everything is refused should say why.
    pub first_refusal: OnceLock<String>,
    pub first_failure: OnceLock<String>,
}

/// The handler the bench routes every label event to: it only counts. The bench measures
/// labelhook's way from socket to handler, not a handler.
pub struct Discard(pub Arc<Counters>);

#[async_trait]
impl Handler for Discard {
    async fn handle(&self, _event: &HandlerEvent) -> Result<(), HandlerError> {
        self.0.handled.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// What every connection needs to build and send a delivery.
pub struct Shape {
    pub url: String,
    pub secret: SecretString,
    pub template: BodyTemplate,
    pub labels: u64,
    /// The first delivery's `updatedAt` (ms since the epoch); each next one is a millisecond
    /// later.
    pub first_update_ms: i64,
    /// A random prefix of this run's delivery ids.
    pub run: u32,
}

/// The connections at work.
pub struct Load {
    stop: CancellationToken,
    connections: JoinSet<()>,
}

impl Load {
    /// Starts `connections` connections posting to `shape.url`.
    pub fn start(
        shape: Shape,
        connections: usize,
        counters: Arc<Counters>,
    ) -> Result<Load, reqwest::Error> {
        // One pooled connection per task, kept alive; no proxy from the environment between
        // the bench and a server on loopback.
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(connections)
            .timeout(REQUEST_TIMEOUT)
            .build()?;
        let shape = Arc::new(shape);
        let next = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for _ in 0..connections {
            tasks.spawn(post_until_stopped(
                client.clone(),
                shape.clone(),
                next.clone(),
                counters.clone(),
                stop.clone(),
            ));
        }
        Ok(Load {
            stop,
            connections: tasks,
        })
    }

    /// Stops sending and waits for the answers to the requests under way, so that every
    /// delivery the server accepted is counted as accepted.
    pub async fn stop(mut self) {
        self.stop.cancel();
        while self.connections.join_next().await.is_some() {}
    }
}

async fn post_until_stopped(
    client: reqwest::Client,
    shape: Arc<Shape>,
    next: Arc<AtomicU64>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    let key = shape.secret.expose_secret().as_bytes();
    while !stop.is_cancelled() {
        let n = next.fetch_add(1, Ordering::Relaxed);
        let updated_at = shape.first_update_ms.saturating_add(n as i64);
        let body = shape.template.render(n % shape.labels, updated_at);
        let signature = sign(key, &body, Algorithm::Sha1);
        let started = Instant::now();
        let request = client
            .post(&shape.url)
            .header("content-type", "application/json")
            .header("x-labelbox-event", "LABEL_UPDATED")
            .header("x-labelbox-id", delivery_id(shape.run, n))
            .header("x-hub-signature", signature)
            .body(body);
        match answer(request).await {
            Ok((status, text)) => {
                counters
                    .latency
                    .record(started.elapsed().as_micros() as u64);
                if status.is_success() {
                    counters.accepted.fetch_add(1, Ordering::Relaxed);
                } else {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    let _ =
                        counters
                            .first_refusal
                            .set(format!("{} {}", status.as_u16(), text.trim()));
                }
            }
            Err(e) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                let _ = counters.first_failure.set(root_cause(&e));
            }
        }
    }
}

/// Sends and reads the whole answer (so the connection can be used again).
async fn answer(
    request: reqwest::RequestBuilder,
) -> Result<(reqwest::StatusCode, String), reqwest::Error> {
    let response = request.send().await?;
    let status = response.status();
    let text = response.text().await?;
    Ok((status, text))
}

/// Delivery `n` of run `run`: 25 characters, as Labelbox's ids, and never the same twice in
/// a run.
fn delivery_id(run: u32, n: u64) -> String {
    format!("c{:06x}{n:018}", run & 0xff_ffff)
}

/// The innermost cause: "Connection refused (os error 111)" rather than "error sending
/// request".
fn root_cause(error: &dyn std::error::Error) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_are_as_long_as_labelboxs_and_differ() {
        let (a, b) = (delivery_id(0xabcdef12, 0), delivery_id(0xabcdef12, 1));
        assert_eq!(a.len(), 25);
        assert_eq!(a, "ccdef12000000000000000000");
        assert_ne!(a, b);
    }
}
