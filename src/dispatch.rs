//! The dispatcher: turns stored deliveries into handler calls, in per-entity order.
//!
//! One loop per process does two things over and over:
//! 1. **Gate**: take deliveries not yet parsed (oldest first), parse them with [`events`], pick
//!    the routes' handlers, and let the store decide fresh or stale against the entity's last
//!    applied version, in the same transaction that records the decision.
//! 2. **Run**: claim due work (the store only hands out a delivery once everything before it in
//!    its entity's lane is finished), call each due handler, and record every attempt: done,
//!    retry later (exponential backoff with jitter), or dead after `max_attempts`.
//!
//! Claims are leases: work claimed by a process that died is taken again. On shutdown no new
//! work is claimed and what is running is allowed to finish.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use wildmatch::WildMatch;

use crate::config::{Config, RouteSettings};
use crate::events::{self, Topic};
use crate::handlers::{HandlerError, HandlerEvent, Registry};
use crate::ordering::Change;
use crate::payload::Payload;
use crate::store::{
    format_millis, now_millis, AttemptOutcome, AttemptResult, Claimed, GateRequest, Store,
    StoreError, Ungated, UnixMillis,
};

/// Deliveries parsed and gated per round.
const GATE_BATCH: u32 = 256;
/// Longest wait between retries, whatever the backoff doubled to.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Pause after a store error before trying again.
const STORE_ERROR_PAUSE: Duration = Duration::from_millis(500);

/// Retry policy of one handler.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt + 1`: `backoff * 2^(attempt-1)`, capped, with equal
    /// jitter (half fixed, half random) so that retries of many deliveries spread out.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let doubled = self
            .backoff
            .saturating_mul(1_u32 << attempt.saturating_sub(1).min(20))
            .min(MAX_BACKOFF);
        let half = doubled / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// One `[[route]]`, compiled.
#[derive(Debug)]
struct Route {
    topics: Vec<WildMatch>,
    /// The patterns as written: an unknown topic is routed only by `*` or its exact name.
    patterns: Vec<String>,
    project_ids: Vec<String>,
    handlers: Vec<String>,
    deliver_stale: bool,
}

/// Topic and project to handler names.
#[derive(Debug, Default)]
pub struct Routes {
    routes: Vec<Route>,
}

impl Routes {
    pub fn new(settings: &[RouteSettings]) -> Self {
        let routes = settings
            .iter()
            .map(|r| Route {
                topics: r.topics.iter().map(|t| WildMatch::new(t)).collect(),
                patterns: r.topics.clone(),
                project_ids: r.project_ids.clone(),
                handlers: r.handlers.clone(),
                deliver_stale: r.deliver_stale,
            })
            .collect();
        Self { routes }
    }

    /// Handler names for a delivery, without repeats, in route order. `recognized` is false
    /// for unknown topics and unparseable bodies, which only `*` or the exact topic match.
    pub fn select(
        &self,
        topic: &str,
        recognized: bool,
        project_id: Option<&str>,
        fresh: bool,
    ) -> Vec<String> {
        // The canonical name matters for aliases: a route naming WORKFLOW_ACTION takes MOVE.
        let canonical = Topic::parse(topic);
        let mut selected: Vec<String> = Vec::new();
        for route in &self.routes {
            if !fresh && !route.deliver_stale {
                continue;
            }
            let topic_matches = if recognized {
                route
                    .topics
                    .iter()
                    .any(|p| p.matches(topic) || p.matches(canonical.as_str()))
            } else {
                route.patterns.iter().any(|p| p == "*" || p == topic)
            };
            let project_matches = route.project_ids.is_empty()
                || project_id.is_some_and(|id| route.project_ids.iter().any(|p| p == id));
            if topic_matches && project_matches {
                for handler in &route.handlers {
                    if !selected.contains(handler) {
                        selected.push(handler.clone());
                    }
                }
            }
        }
        selected
    }
}

/// Everything the dispatch loop needs.
pub struct Dispatcher {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    routes: Routes,
    policies: HashMap<String, RetryPolicy>,
    owner: String,
    concurrency: usize,
    lease: Duration,
    poll_interval: Duration,
}

impl Dispatcher {
    /// How long one handler attempt may take: half the lease.
    fn attempt_limit(&self) -> Duration {
        self.lease / 2
    }

    pub fn new(config: &Config, store: Arc<dyn Store>, registry: Registry) -> Self {
        let s = &config.settings;
        let policies = s
            .handler
            .iter()
            .map(|h| {
                let policy = RetryPolicy {
                    max_attempts: h.max_attempts,
                    backoff: h.backoff,
                };
                (h.name.clone(), policy)
            })
            .collect();
        Self {
            store,
            registry: Arc::new(registry),
            routes: Routes::new(&s.route),
            policies,
            owner: format!("{}-{}", std::process::id(), now_millis()),
            concurrency: s.dispatch.concurrency,
            lease: s.dispatch.lease,
            poll_interval: s.dispatch.poll_interval,
        }
    }

    /// Runs until `stop` is cancelled, then lets running deliveries finish.
    pub async fn run(self, stop: CancellationToken) {
        match self.store.release_stale_leases().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "taking back work of a previous run"),
            Err(e) => tracing::warn!(error = %e, "could not release old leases"),
        }
        let this = Arc::new(self);
        let mut running: JoinSet<()> = JoinSet::new();
        while !stop.is_cancelled() {
            let busy = match this.round(&mut running).await {
                Ok(busy) => busy,
                Err(e) => {
                    tracing::warn!(error = %e, "dispatch round failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(STORE_ERROR_PAUSE) => {}
                        () = stop.cancelled() => {}
                    }
                    false
                }
            };
            if busy && running.len() < this.concurrency {
                continue;
            }
            tokio::select! {
                Some(_) = running.join_next(), if !running.is_empty() => {}
                () = this.store.wait_for_work(this.poll_interval) => {}
                () = stop.cancelled() => {}
            }
            if let Ok(depth) = this.store.queue_depth().await {
                metrics::gauge!("labelhook_queue_depth").set(depth as f64);
            }
        }
        // Drain: what runs finishes and is recorded; nothing new is claimed.
        while running.join_next().await.is_some() {}
    }

    /// One gate pass and one claim pass. True when there may be more work right away.
    async fn round(self: &Arc<Self>, running: &mut JoinSet<()>) -> Result<bool, StoreError> {
        // A failure to gate must not stop the claims: retries and other lanes go on.
        let gated_any = match self.gate_round().await {
            Ok(gated) => gated,
            Err(e) => {
                tracing::warn!(error = %e, "gating failed; retrying next round");
                false
            }
        };
        let room = self.concurrency.saturating_sub(running.len());
        if room == 0 {
            return Ok(gated_any);
        }
        let limit = u32::try_from(room).unwrap_or(u32::MAX);
        let claimed = self.store.claim(&self.owner, self.lease, limit).await?;
        let claimed_all = claimed.len() == room;
        for delivery in claimed {
            let this = self.clone();
            running.spawn(async move { this.run_delivery(delivery).await });
        }
        Ok(gated_any || claimed_all)
    }

    /// Parses and gates the next batch of new deliveries. True when there were any.
    async fn gate_round(&self) -> Result<bool, StoreError> {
        let ungated = self.store.next_ungated(GATE_BATCH).await?;
        if ungated.is_empty() {
            return Ok(false);
        }
        let mut requests = Vec::with_capacity(ungated.len());
        for delivery in &ungated {
            match self.gate_request(delivery).await {
                Ok(request) => requests.push(request),
                // The body could not be read (a passing I/O error): it stays ungated and is
                // tried again, rather than being judged unparseable for good.
                Err(e) => {
                    tracing::warn!(seq = delivery.seq, error = %e, "cannot read the body; will retry");
                }
            }
        }
        // One op for the whole batch: decided in arrival order, committed together.
        let verdicts = self.store.record_gates(requests.clone()).await?;
        for (request, verdict) in requests.iter().zip(verdicts) {
            if verdict.is_some_and(|v| !v.is_fresh()) {
                metrics::counter!("labelhook_stale_events_total", "topic" => request.topic_label)
                    .increment(1);
                let entity = request.entity.as_deref();
                tracing::info!(seq = request.seq, entity, "stale event");
            }
        }
        Ok(true)
    }

    /// Parses one delivery and picks its handlers for either verdict of the gate. Errors only
    /// when the body cannot be read.
    async fn gate_request(&self, delivery: &Ungated) -> std::io::Result<GateRequest> {
        let topic = delivery.topic.clone().unwrap_or_default();
        let topic_label = Topic::metric_label(&topic);
        Ok(
            match parse_body(delivery.topic.as_deref(), &delivery.body).await? {
                Ok(event) => {
                    let recognized = event.topic.is_known();
                    let project = event.project_id.clone();
                    GateRequest {
                        seq: delivery.seq,
                        handlers_if_fresh: self.routes.select(
                            &topic,
                            recognized,
                            project.as_deref(),
                            true,
                        ),
                        handlers_if_stale: self.routes.select(
                            &topic,
                            recognized,
                            project.as_deref(),
                            false,
                        ),
                        entity: event.entity,
                        version: event.version,
                        change: event.change,
                        project_id: project,
                        parse_error: None,
                        recognized,
                        topic_label,
                    }
                }
                Err(error) => GateRequest {
                    seq: delivery.seq,
                    handlers_if_fresh: self.routes.select(&topic, false, None, true),
                    handlers_if_stale: Vec::new(),
                    entity: None,
                    version: None,
                    change: Change::Updated,
                    project_id: None,
                    parse_error: Some(error),
                    recognized: false,
                    topic_label,
                },
            },
        )
    }

    /// Calls every due handler of one claimed delivery and records the attempts.
    async fn run_delivery(&self, claimed: Claimed) {
        let event = HandlerEvent {
            seq: claimed.seq,
            delivery_id: claimed.delivery_id.clone(),
            topic: claimed.topic.clone().unwrap_or_default(),
            entity: claimed.entity.clone(),
            version: claimed.version,
            fresh: claimed.fresh,
            project_id: claimed.project_id.clone(),
            received_at: format_millis(claimed.received_at),
            body_is_json: claimed.body_is_json,
            body: claimed.body.clone(),
        };
        let attempts = claimed.runs.iter().map(|run| {
            let event = &event;
            async move {
                let attempt = run.attempts + 1;
                let started_at = now_millis();
                let result = match self.registry.get(&run.handler) {
                    // Bounded well inside the lease, so that no attempt is still running when
                    // another worker may take the delivery again.
                    Some(handler) => {
                        let limit = self.attempt_limit();
                        tokio::time::timeout(limit, handler.handle(event))
                            .await
                            .unwrap_or_else(|_| {
                                Err(HandlerError::Retryable(format!(
                                    "attempt took longer than {limit:?} (half of dispatch.lease)"
                                )))
                            })
                    }
                    None => Err(HandlerError::Permanent(format!(
                        "no handler named {:?} is configured",
                        run.handler
                    ))),
                };
                let finished_at = now_millis();
                let policy = self.policies.get(&run.handler).copied().unwrap_or_default();
                let outcome = outcome_of(result, attempt, &policy, finished_at);
                let label = match &outcome {
                    AttemptOutcome::Ok => "ok",
                    AttemptOutcome::Retry { .. } => "retry",
                    AttemptOutcome::Dead { .. } => "dead",
                };
                metrics::counter!(
                    "labelhook_handler_attempts_total",
                    "handler" => run.handler.clone(),
                    "outcome" => label,
                )
                .increment(1);
                match &outcome {
                    AttemptOutcome::Ok => {}
                    AttemptOutcome::Retry { error, .. } => tracing::warn!(
                        delivery_id = %event.delivery_id, handler = %run.handler, attempt, %error,
                        "handler failed; will retry"
                    ),
                    AttemptOutcome::Dead { error } => tracing::error!(
                        delivery_id = %event.delivery_id, handler = %run.handler, attempt, %error,
                        "handler failed for good; dead-lettered"
                    ),
                }
                AttemptResult {
                    handler: run.handler.clone(),
                    attempt,
                    started_at,
                    finished_at,
                    outcome,
                }
            }
        });
        let results = futures_util::future::join_all(attempts).await;
        // The attempts happened: keep trying to record them (a lost record means the handlers
        // run again after the lease runs out, which is safe but noisy).
        let mut pause = STORE_ERROR_PAUSE;
        loop {
            let recorded = self
                .store
                .record_attempts(claimed.seq, &self.owner, &results)
                .await;
            match recorded {
                Ok(status) => {
                    tracing::debug!(delivery_id = %claimed.delivery_id, %status, "dispatched");
                    return;
                }
                Err(e @ StoreError::LeaseLost(_)) => {
                    tracing::warn!(error = %e, "attempts not recorded");
                    return;
                }
                Err(e) if pause < Duration::from_secs(30) => {
                    tracing::warn!(error = %e, "could not record attempts; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(e) => {
                    tracing::error!(error = %e, delivery_id = %claimed.delivery_id,
                        "giving up recording attempts; the lease will expire and they run again");
                    return;
                }
            }
        }
    }
}

fn outcome_of(
    result: Result<(), HandlerError>,
    attempt: u32,
    policy: &RetryPolicy,
    now: UnixMillis,
) -> AttemptOutcome {
    match result {
        Ok(()) => AttemptOutcome::Ok,
        Err(HandlerError::Permanent(error)) => AttemptOutcome::Dead { error },
        Err(HandlerError::Retryable(error)) if attempt >= policy.max_attempts => {
            AttemptOutcome::Dead { error }
        }
        Err(HandlerError::Retryable(error)) => {
            let delay = policy.delay_after(attempt);
            AttemptOutcome::Retry {
                next_at: now + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 4),
                error,
            }
        }
    }
}

/// Parses a stored body: the outer error when it cannot be read (try again later), the inner
/// one when it is not a valid event (for good). Small bodies are parsed in memory, blob files
/// streamed on a blocking thread.
async fn parse_body(
    topic: Option<&str>,
    body: &Payload,
) -> std::io::Result<Result<events::Event, String>> {
    match body {
        Payload::Inline(bytes) => Ok(events::parse(topic, bytes).map_err(|e| e.to_string())),
        Payload::File { path, .. } => {
            let path = path.clone();
            let topic = topic.map(str::to_owned);
            tokio::task::spawn_blocking(move || {
                let reader = std::io::BufReader::new(std::fs::File::open(&path)?);
                Ok(events::parse_reader(topic.as_deref(), reader).map_err(|e| e.to_string()))
            })
            .await
            .map_err(std::io::Error::other)?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(topics: &[&str], handlers: &[&str], projects: &[&str], stale: bool) -> RouteSettings {
        RouteSettings {
            topics: topics.iter().map(|s| (*s).to_owned()).collect(),
            handlers: handlers.iter().map(|s| (*s).to_owned()).collect(),
            project_ids: projects.iter().map(|s| (*s).to_owned()).collect(),
            deliver_stale: stale,
        }
    }

    #[test]
    fn routes_match_globs_aliases_projects_and_staleness() {
        let routes = Routes::new(&[
            route(&["LABEL_*"], &["archive"], &[], false),
            route(&["WORKFLOW_ACTION"], &["forward"], &["cproj1"], false),
            route(&["*"], &["audit"], &[], true),
            route(&["LABEL_UPDATED"], &["archive", "log"], &[], false),
        ]);
        assert_eq!(
            routes.select("LABEL_UPDATED", true, None, true),
            ["archive", "audit", "log"]
        );
        assert_eq!(routes.select("LABEL_UPDATED", true, None, false), ["audit"]);
        assert_eq!(
            routes.select("MOVE", true, Some("cproj1"), true),
            ["forward", "audit"]
        );
        assert_eq!(routes.select("MOVE", true, Some("other"), true), ["audit"]);
        // Unknown topics: only `*` (or their exact name), never a glob like LABEL_*.
        assert_eq!(
            routes.select("LABEL_SOMETHING_NEW", false, None, true),
            ["audit"]
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let policy = RetryPolicy {
            max_attempts: 8,
            backoff: Duration::from_secs(2),
        };
        for attempt in 1..=4 {
            let full = Duration::from_secs(2) * (1 << (attempt - 1));
            let delay = policy.delay_after(attempt);
            assert!(
                delay >= full / 2 && delay <= full,
                "attempt {attempt}: {delay:?}"
            );
        }
        assert!(policy.delay_after(40) <= MAX_BACKOFF);
    }

    #[test]
    fn retryable_errors_become_dead_after_max_attempts_and_permanent_ones_at_once() {
        let policy = RetryPolicy {
            max_attempts: 3,
            backoff: Duration::from_millis(100),
        };
        let retry = || Err(HandlerError::Retryable("down".into()));
        assert!(
            matches!(outcome_of(retry(), 1, &policy, 0), AttemptOutcome::Retry { next_at, .. } if (50..=100).contains(&next_at))
        );
        assert!(matches!(
            outcome_of(retry(), 3, &policy, 0),
            AttemptOutcome::Dead { .. }
        ));
        let permanent = Err(HandlerError::Permanent("404".into()));
        assert!(matches!(
            outcome_of(permanent, 1, &policy, 0),
            AttemptOutcome::Dead { .. }
        ));
        assert!(matches!(
            outcome_of(Ok(()), 3, &policy, 0),
            AttemptOutcome::Ok
        ));
    }
}
