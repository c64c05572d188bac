//! The dispatcher: turns stored deliveries into handler calls, in per-entity order.
//!
//! Two loops per process, side by side, so that neither waits for the other's round trips to
//! the store:
//! 1. **Gate**: take deliveries not yet parsed (oldest first; on a shared store reserved for
//!    this process for a while so another replica does not parse them too), parse them with
//!    [`events`], pick the routes' handlers ([`routes`]), and let the store decide fresh or
//!    stale against the entity's last applied version as it records the decision.
//! 2. **Run**: claim due work (the store only hands out a delivery once everything before it in
//!    its entity's lane is finished, with the deliveries waiting right behind it for the same
//!    handler), call each due handler, and record every attempt: done, retry later ([`retry`]:
//!    exponential backoff with jitter), or dead after `max_attempts`.
//!
//! Where the lanes live is the store's business: the SQLite back-end keeps them in this
//! process's memory (one server per database), the PostgreSQL one in rows the replicas share.
//!
//! Claims are leases, renewed while the handlers run ([`leases`]): work claimed by a process
//! that died is taken again once its lease runs out, never while it is alive. On shutdown no
//! new work is claimed and what is running is allowed to finish.

mod leases;
mod retry;
mod routes;
pub mod settings;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::delivery::{format_millis, Clock, Payload};
use crate::events::{self, Event, Topic};
use crate::handlers::{HandlerError, HandlerEvent, HandlerSettings, Registry};
use crate::ordering::Change;
use crate::store::outage::Backoff;
use crate::store::{
    AttemptOutcome, AttemptResult, ChainRecord, Claimed, DueRun, GateRequest, LeaseOwner, Queue,
    StoreError, Ungated,
};
use crate::telemetry;
use crate::telemetry::bounded_for_log;

pub use retry::RetryPolicy;
pub use routes::Routes;
pub use settings::{DispatchSettings, RouteSettings};

use leases::Running;
use retry::outcome_of;

/// Deliveries parsed and gated per round.
const GATE_BATCH: u32 = 256;
/// Most deliveries claimed behind one lane head, to go to its handler in one batch.
const CHAIN_MAX: u32 = 256;
/// Stored bodies up to this size are read into memory to be parsed; larger ones are parsed as
/// they are read.
const PARSE_IN_MEMORY_MAX: u64 = 4 * 1024 * 1024;
/// Pause after a store error before trying again, doubling (with jitter) up to
/// [`STORE_ERROR_PAUSE_MAX`] while the store stays unavailable.
const STORE_ERROR_PAUSE: Duration = Duration::from_millis(500);
const STORE_ERROR_PAUSE_MAX: Duration = Duration::from_secs(10);

/// Everything the dispatch loop needs.
pub struct Dispatcher {
    queue: Arc<dyn Queue>,
    clock: Arc<dyn Clock>,
    registry: Arc<Registry>,
    routes: Routes,
    policies: HashMap<String, RetryPolicy>,
    owner: LeaseOwner,
    concurrency: usize,
    lease: Duration,
    attempt_timeout: Duration,
    poll_interval: Duration,
    running: Running,
}

impl Dispatcher {
    pub fn new(
        settings: &DispatchSettings,
        handlers: &[HandlerSettings],
        routes: &[RouteSettings],
        queue: Arc<dyn Queue>,
        clock: Arc<dyn Clock>,
        registry: Registry,
    ) -> Self {
        let policies = handlers
            .iter()
            .map(|h| {
                let policy = RetryPolicy {
                    max_attempts: h.max_attempts,
                    backoff: h.backoff,
                };
                (h.name.clone(), policy)
            })
            .collect();
        // Its handlers' counters are published at 0 at start by `known_series`.
        Self {
            queue,
            clock,
            registry: Arc::new(registry),
            routes: Routes::new(routes),
            policies,
            owner: LeaseOwner::for_this_process(),
            concurrency: settings.concurrency,
            lease: settings.lease,
            attempt_timeout: settings.attempt_timeout,
            poll_interval: settings.poll_interval,
            running: Running::default(),
        }
    }

    /// Runs until `stop` is cancelled, then lets running deliveries finish (their leases kept
    /// alive meanwhile).
    ///
    /// Gating and running are two loops side by side: the gate loop parses and gates new
    /// deliveries as they arrive, in batches, and says when it made work due; the run loop
    /// claims due work whenever there is room and calls the handlers. Neither waits for the
    /// other's round trips to the store, so handlers are never starved by the stream of new
    /// deliveries, nor gating by slow handlers.
    pub async fn run(self, stop: CancellationToken) {
        tracing::info!(owner = %self.owner, "dispatcher started");
        let this = Arc::new(self);
        let stop_renewing = CancellationToken::new();
        let renewing = tokio::spawn(leases::renew_until_stopped(
            this.queue.clone(),
            this.owner.clone(),
            this.lease,
            this.running.clone(),
            stop_renewing.clone(),
        ));
        let due = Arc::new(tokio::sync::Notify::new());
        let gating = tokio::spawn(this.clone().gate_until_stopped(due.clone(), stop.clone()));
        this.run_until_stopped(&due, &stop).await;
        let _ = gating.await;
        stop_renewing.cancel();
        let _ = renewing.await;
    }

    /// The gate loop: gates new deliveries until there are none, then waits for more (a
    /// delivery accepted here or, on a shared store, by another replica) or `poll_interval`.
    async fn gate_until_stopped(
        self: Arc<Self>,
        due: Arc<tokio::sync::Notify>,
        stop: CancellationToken,
    ) {
        let mut backoff = Backoff::new(STORE_ERROR_PAUSE, STORE_ERROR_PAUSE_MAX);
        while !stop.is_cancelled() {
            match self.gate_round().await {
                Ok(gated) => {
                    backoff.reset();
                    if gated {
                        due.notify_one();
                        continue;
                    }
                }
                Err(e) => {
                    // The store tells of its outage itself; this loop only waits it out.
                    tracing::debug!(error = %e, "gating failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff.pause()) => {}
                        () = stop.cancelled() => {}
                    }
                    continue;
                }
            }
            tokio::select! {
                () = self.queue.wait_for_work(self.poll_interval) => {}
                () = stop.cancelled() => {}
            }
        }
    }

    /// The run loop: claims due work whenever a good share of the lanes is free, runs it, and
    /// waits for a handler to finish, new due work, or `poll_interval` (retries coming due).
    async fn run_until_stopped(
        self: &Arc<Self>,
        due: &tokio::sync::Notify,
        stop: &CancellationToken,
    ) {
        let mut running: JoinSet<()> = JoinSet::new();
        // Claims are batched: wait for a quarter of the lanes to be free, unless all are.
        let claim_at = (self.concurrency / 4).max(1);
        let mut backoff = Backoff::new(STORE_ERROR_PAUSE, STORE_ERROR_PAUSE_MAX);
        while !stop.is_cancelled() {
            while running.try_join_next().is_some() {}
            let room = self.concurrency.saturating_sub(running.len());
            if room >= claim_at || running.is_empty() {
                match self.claim_into(&mut running, room).await {
                    Ok(all_due) => {
                        backoff.reset();
                        // Everything asked for was due: there may be more.
                        if all_due && running.len() < self.concurrency {
                            continue;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "claiming failed; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(backoff.pause()) => {}
                            () = stop.cancelled() => {}
                        }
                        continue;
                    }
                }
            }
            tokio::select! {
                Some(_) = running.join_next(), if !running.is_empty() => {}
                () = due.notified() => {}
                () = tokio::time::sleep(self.poll_interval) => {}
                () = stop.cancelled() => {}
            }
        }
        // Drain: what runs finishes and is recorded; nothing new is claimed.
        while running.join_next().await.is_some() {}
    }

    /// Claims up to `room` due deliveries and starts them. True when all `room` were due.
    async fn claim_into(
        self: &Arc<Self>,
        running: &mut JoinSet<()>,
        room: usize,
    ) -> Result<bool, StoreError> {
        if room == 0 {
            return Ok(false);
        }
        let limit = u32::try_from(room).unwrap_or(u32::MAX);
        let claimed = self
            .queue
            .claim(&self.owner, self.lease, limit, CHAIN_MAX)
            .await?;
        let claimed_all = claimed.len() == room;
        for delivery in claimed {
            let this = self.clone();
            let seqs: Vec<i64> = std::iter::once(delivery.seq)
                .chain(delivery.chain.iter().map(|c| c.seq))
                .collect();
            let lost = self.running.start(&seqs);
            running.spawn(async move {
                if delivery.chain.is_empty() {
                    this.run_delivery(delivery, lost).await;
                } else {
                    this.run_chain(delivery, lost).await;
                }
                this.running.finish(&seqs);
            });
        }
        Ok(claimed_all)
    }

    /// Parses and gates the next batch of new deliveries. True when there were any.
    async fn gate_round(&self) -> Result<bool, StoreError> {
        let ungated = self
            .queue
            .take_ungated(&self.owner, self.lease, GATE_BATCH)
            .await?;
        if ungated.is_empty() {
            return Ok(false);
        }
        let mut requests = Vec::with_capacity(ungated.len());
        let mut spans = Vec::with_capacity(ungated.len());
        for delivery in &ungated {
            let span = gate_span(delivery);
            match self.gate_request(delivery).instrument(span.clone()).await {
                Ok(request) => {
                    span.record("entity", request.entity.as_deref());
                    requests.push(request);
                    spans.push(span);
                }
                // The body could not be read (a passing I/O error): it stays ungated and is
                // tried again, rather than being judged unparseable for good.
                Err(e) => span.in_scope(|| {
                    tracing::warn!(error = %e, "cannot read the body; will retry");
                }),
            }
        }
        // One op for the whole batch: decided in arrival order, committed together.
        let verdicts = self.queue.record_gates(requests.clone()).await?;
        for ((request, verdict), span) in requests.iter().zip(verdicts).zip(&spans) {
            let _in_gate = span.enter();
            let Some(verdict) = verdict else {
                tracing::debug!("not gated here: the gate failed, or another dispatcher gated it");
                continue;
            };
            let fresh = verdict.is_fresh();
            let handlers = request.handlers(fresh).len();
            let version = request.version.map(|v| v.to_string());
            let verdict = if fresh {
                "fresh"
            } else {
                metrics::counter!("labelhook_stale_events_total", "topic" => request.topic_label)
                    .increment(1);
                "stale"
            };
            tracing::info!(verdict, version, handlers, "gated");
        }
        Ok(true)
    }

    /// One attempt of one handler, counted and logged (one line whatever its outcome) inside an
    /// `attempt` span, itself inside the delivery's `dispatch` span.
    #[tracing::instrument(
        name = "attempt",
        skip_all,
        fields(handler = %run.handler, attempt = run.attempts + 1)
    )]
    async fn attempt(&self, event: &HandlerEvent, run: &DueRun) -> AttemptResult {
        let attempt = run.attempts + 1;
        let started_at = self.clock.now();
        let started = Instant::now();
        let result = match self.registry.get(&run.handler) {
            // A handler that hangs must not hold its entity's lane for ever.
            Some(handler) => {
                let limit = self.attempt_timeout;
                tokio::time::timeout(limit, handler.handle(event))
                    .await
                    .unwrap_or_else(|_| {
                        Err(HandlerError::Retryable(format!(
                            "attempt took longer than {} (dispatch.attempt_timeout)",
                            humantime::format_duration(limit)
                        )))
                    })
            }
            None => Err(HandlerError::Permanent(format!(
                "no handler named {:?} is configured",
                run.handler
            ))),
        };
        let took = started.elapsed();
        let finished_at = self.clock.now();
        let policy = self.policies.get(&run.handler).copied().unwrap_or_default();
        let outcome = outcome_of(result, attempt, &policy, finished_at);
        count_attempt(&run.handler, &outcome, took);
        let duration_ms = took.as_secs_f64() * 1000.0;
        match &outcome {
            AttemptOutcome::Ok => tracing::info!(duration_ms, "handler done"),
            AttemptOutcome::Retry { error, next_at } => tracing::warn!(
                delivery_id = %event.delivery_id, handler = %run.handler, attempt, %error,
                duration_ms, next_attempt_at = %format_millis(*next_at),
                "handler failed; will retry"
            ),
            AttemptOutcome::Dead { error } => tracing::error!(
                delivery_id = %event.delivery_id, handler = %run.handler, attempt, %error,
                duration_ms, "handler failed for good; dead-lettered"
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

    /// Parses one delivery and picks its handlers for either verdict of the gate. Errors only
    /// when the body cannot be read.
    async fn gate_request(&self, delivery: &Ungated) -> std::io::Result<GateRequest> {
        let topic = delivery.topic.clone().unwrap_or_default();
        let topic_label = Topic::metric_label(&topic);
        let request = match parse_body(delivery.topic.as_deref(), &delivery.body).await? {
            Ok(parsed) => {
                let recognized = parsed.topic.is_known();
                let project = parsed.project_id.as_deref();
                GateRequest {
                    seq: delivery.seq,
                    handlers_if_fresh: self.routes.select(&topic, recognized, project, true),
                    handlers_if_stale: self.routes.select(&topic, recognized, project, false),
                    event: event_json(&parsed.event),
                    data_row_id: parsed.event.data_row_id().map(str::to_owned),
                    labels: parsed.event.labels_named(),
                    entity: parsed.entity,
                    version: parsed.version,
                    change: parsed.change,
                    project_id: parsed.project_id,
                    parse_error: None,
                    recognized,
                    topic_label,
                    origin: delivery.origin,
                }
            }
            Err(error) => GateRequest {
                seq: delivery.seq,
                handlers_if_fresh: self.routes.select(&topic, false, None, true),
                handlers_if_stale: Vec::new(),
                event: event_json(&Event::unknown(
                    delivery.topic.as_deref(),
                    Some(error.clone()),
                )),
                entity: None,
                version: None,
                change: Change::Updated,
                project_id: None,
                parse_error: Some(error),
                recognized: false,
                topic_label,
                origin: delivery.origin,
                data_row_id: None,
                labels: None,
            },
        };
        Ok(request)
    }

    /// The typed event of a claimed delivery: as the gate recorded it, or parsed again for a
    /// delivery gated before events were recorded. `Err` when the body cannot be read now.
    async fn typed_event(&self, claimed: &Claimed) -> std::io::Result<Event> {
        if let Some(event) = claimed
            .event
            .as_deref()
            .and_then(|json| serde_json::from_str(json).ok())
        {
            return Ok(event);
        }
        let topic = claimed.topic.as_deref();
        Ok(match parse_body(topic, &claimed.body).await? {
            Ok(parsed) => parsed.event,
            Err(reason) => Event::unknown(topic, Some(reason)),
        })
    }

    /// Calls every due handler of one claimed delivery and records the attempts, unless `lost`
    /// says the lease went to someone else meanwhile. Runs in the delivery's `dispatch` span.
    async fn run_delivery(&self, claimed: Claimed, lost: CancellationToken) {
        let span = dispatch_span(&claimed);
        self.handle_delivery(claimed, lost).instrument(span).await;
    }

    async fn handle_delivery(&self, claimed: Claimed, lost: CancellationToken) {
        let typed = match self.typed_event(&claimed).await {
            Ok(typed) => typed,
            Err(e) => {
                // Left to its lease: it is taken again, and read again, once the lease runs out.
                tracing::warn!(seq = claimed.seq, error = %e, "cannot read the body; will retry");
                return;
            }
        };
        let event = handler_event(&claimed, typed);
        let attempts = claimed.runs.iter().map(|run| self.attempt(&event, run));
        let results = tokio::select! {
            results = futures_util::future::join_all(attempts) => results,
            () = lost.cancelled() => {
                tracing::warn!("lease lost while handling; abandoning its attempts");
                return;
            }
        };
        let records = [ChainRecord {
            seq: claimed.seq,
            results,
        }];
        self.record(&records).await;
    }

    /// Hands a lane head and the chain claimed behind it to their one handler, in lane order:
    /// as one batch when the handler takes batches, else one at a time. Each delivery's attempt
    /// is recorded, and logged in its own `dispatch` span (its delivery and request ids); those
    /// after a failure are not tried and wait for the next claim.
    async fn run_chain(&self, mut head: Claimed, lost: CancellationToken) {
        let chain = std::mem::take(&mut head.chain);
        let mut members = Vec::with_capacity(chain.len() + 1);
        members.push(head);
        members.extend(chain);
        // Events up to the first whose body cannot be read now; that one and those after it wait.
        let mut events = Vec::with_capacity(members.len());
        let mut batch = Vec::with_capacity(members.len());
        for member in &members {
            let Some(run) = member.runs.first() else {
                break;
            };
            let span = dispatch_span(member);
            match self.typed_event(member).instrument(span.clone()).await {
                Ok(typed) => {
                    events.push(handler_event(member, typed));
                    batch.push(Member {
                        run: run.clone(),
                        span,
                    });
                }
                Err(e) => {
                    span.in_scope(|| {
                        tracing::warn!(error = %e, "cannot read the body; will retry");
                    });
                    break;
                }
            }
        }
        let Some(head_span) = batch.first().map(|m| m.span.clone()) else {
            // Left to its lease, as a single delivery is.
            return;
        };
        let results = tokio::select! {
            results = self.attempt_batch(&events, &batch) => results,
            () = lost.cancelled() => {
                head_span.in_scope(|| {
                    tracing::warn!(
                        chain = batch.len(),
                        "lease lost while handling; abandoning its attempts"
                    );
                });
                return;
            }
        };
        let mut results = results.into_iter();
        let records: Vec<ChainRecord> = members
            .iter()
            .map(|member| ChainRecord {
                seq: member.seq,
                results: results.next().into_iter().collect(),
            })
            .collect();
        self.record(&records).await;
    }

    /// One attempt of one handler at each of `events` (one entity's deliveries, in lane order;
    /// `batch` holds each one's run and span), as one call when the handler takes batches;
    /// after a failed batch, or for a
    /// handler that does not take them, one at a time up to the first failure. One result per
    /// member tried.
    async fn attempt_batch(&self, events: &[HandlerEvent], batch: &[Member]) -> Vec<AttemptResult> {
        let Some(name) = batch.first().map(|m| m.run.handler.clone()) else {
            return Vec::new();
        };
        if let Some(handler) = self.registry.get(&name).filter(|h| h.handles_batches()) {
            let started_at = self.clock.now();
            let started = Instant::now();
            let limit = self.attempt_timeout;
            if let Ok(Ok(())) = tokio::time::timeout(limit, handler.handle_batch(events)).await {
                let took = started.elapsed();
                let finished_at = self.clock.now();
                let duration_ms = took.as_secs_f64() * 1000.0;
                return batch
                    .iter()
                    .map(|m| {
                        let attempt = m.run.attempts + 1;
                        count_attempt(&name, &AttemptOutcome::Ok, took);
                        let span = tracing::info_span!(
                            parent: &m.span, "attempt", handler = %name, attempt
                        );
                        span.in_scope(|| {
                            tracing::info!(duration_ms, batch = batch.len(), "handler done");
                        });
                        AttemptResult {
                            handler: name.clone(),
                            attempt,
                            started_at,
                            finished_at,
                            outcome: AttemptOutcome::Ok,
                        }
                    })
                    .collect();
            }
            tracing::debug!(
                handler = %name,
                batch = batch.len(),
                "batch failed; trying its events one at a time"
            );
        }
        let mut results = Vec::with_capacity(batch.len());
        for (event, m) in events.iter().zip(batch) {
            let result = self.attempt(event, &m.run).instrument(m.span.clone()).await;
            let failed = !matches!(result.outcome, AttemptOutcome::Ok);
            results.push(result);
            if failed {
                break;
            }
        }
        results
    }

    /// Records what was done with claimed deliveries. The attempts happened: keep trying to
    /// record them (a lost record means the handlers run again after the lease runs out, which
    /// is safe but noisy).
    async fn record(&self, records: &[ChainRecord]) {
        let mut pause = STORE_ERROR_PAUSE;
        loop {
            let recorded = match records {
                [one] => self
                    .queue
                    .record_attempts(one.seq, &self.owner, &one.results)
                    .await
                    .map(|status| tracing::debug!(seq = one.seq, %status, "dispatched")),
                _ => self.queue.record_chain(&self.owner, records).await,
            };
            match recorded {
                Ok(()) => return,
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
                    let seq = records.first().map(|r| r.seq);
                    tracing::error!(error = %e, seq,
                        "giving up recording attempts; the lease will expire and they run again");
                    return;
                }
            }
        }
    }
}

/// One delivery of a claimed chain, beside its event: the run it is due for and its span.
struct Member {
    run: DueRun,
    /// Its `dispatch` span, which its attempt's log lines go in.
    span: tracing::Span,
}

/// The span of one delivery's way through its handlers: its ids go on every line logged in it.
fn dispatch_span(claimed: &Claimed) -> tracing::Span {
    let topic = claimed.topic.as_deref().map(bounded_for_log);
    tracing::info_span!(
        "dispatch",
        delivery_id = %claimed.delivery_id,
        seq = claimed.seq,
        request_id = claimed.request_id.as_deref(),
        topic = topic.as_deref(),
        entity = claimed.entity.as_deref(),
    )
}

/// What a handler is given for a claimed delivery.
fn handler_event(claimed: &Claimed, typed: Event) -> HandlerEvent {
    HandlerEvent {
        seq: claimed.seq,
        delivery_id: claimed.delivery_id.clone(),
        topic: claimed.topic.clone().unwrap_or_default(),
        event: typed,
        entity: claimed.entity.clone(),
        version: claimed.version,
        fresh: claimed.fresh,
        project_id: claimed.project_id.clone(),
        received_at: format_millis(claimed.received_at),
        body_is_json: claimed.body_is_json,
        body: claimed.body.clone(),
        origin: claimed.origin,
    }
}

/// The span of one delivery's way through the gate; `entity` is recorded once it is parsed.
fn gate_span(delivery: &Ungated) -> tracing::Span {
    let topic = delivery.topic.as_deref().map(bounded_for_log);
    tracing::info_span!(
        "gate",
        delivery_id = %delivery.delivery_id,
        seq = delivery.seq,
        request_id = delivery.request_id.as_deref(),
        topic = topic.as_deref(),
        entity = tracing::field::Empty,
    )
}

/// Counts one attempt: every outcome, and failures and dead letters by handler, which is what
/// an operator is paged on.
fn count_attempt(handler: &str, outcome: &AttemptOutcome, took: Duration) {
    let handler = handler.to_owned();
    metrics::histogram!(telemetry::HANDLER_ATTEMPT_SECONDS, "handler" => handler.clone())
        .record(took.as_secs_f64());
    metrics::counter!(
        "labelhook_handler_attempts_total",
        "handler" => handler.clone(),
        "outcome" => outcome.kind().as_str(),
    )
    .increment(1);
    if matches!(outcome, AttemptOutcome::Ok) {
        return;
    }
    metrics::counter!(telemetry::HANDLER_FAILURES_TOTAL, "handler" => handler.clone()).increment(1);
    if matches!(outcome, AttemptOutcome::Dead { .. }) {
        metrics::counter!(telemetry::DEAD_LETTERS_TOTAL, "handler" => handler).increment(1);
    }
}

/// The typed event as the store keeps it.
fn event_json(event: &Event) -> String {
    // Serializing plain data to a string cannot fail; an empty object would parse again anyway.
    serde_json::to_string(event).unwrap_or_else(|_| "{}".to_owned())
}

/// Parses a stored body: the outer error when it cannot be read (try again later), the inner
/// one when it is not a valid event (for good). Small bodies are parsed in memory, stored ones
/// streamed through a reader on a blocking thread.
async fn parse_body(
    topic: Option<&str>,
    body: &Payload,
) -> std::io::Result<Result<events::Parsed, String>> {
    if let Some(bytes) = body.as_inline() {
        return Ok(events::parse(topic, bytes).map_err(|e| e.to_string()));
    }
    if body.len() <= PARSE_IN_MEMORY_MAX {
        // Parsing a slice skips strings many times faster than parsing a reader, which goes
        // byte by byte; a body this size costs little memory for the moment it is parsed.
        let bytes = body.read_all().await?;
        return Ok(events::parse(topic, &bytes).map_err(|e| e.to_string()));
    }
    let reader = body.blocking_reader().await?;
    let topic = topic.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        // serde_json reports a read error as a JSON error; the wrapper keeps the real one. It
        // sits below the buffer, and the buffer is given by value: std reads single bytes
        // straight from a `BufReader`'s buffer only when the parser holds the `BufReader`
        // itself (not a `&mut`), which makes parsing several times faster.
        let (keeping, error) = ErrorKeeping::new(reader);
        let parsed = events::parse_reader(topic.as_deref(), std::io::BufReader::new(keeping));
        let error = error.lock().ok().and_then(|mut e| e.take());
        match error {
            Some(e) => Err(e),
            None => Ok(parsed.map_err(|e| e.to_string())),
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Where an [`ErrorKeeping`] reader leaves the first I/O error it saw.
type KeptError = std::sync::Arc<std::sync::Mutex<Option<std::io::Error>>>;

/// A reader that remembers the first I/O error it passed on, so that a body the store could
/// not read is retried rather than judged unparseable for good.
struct ErrorKeeping<R> {
    inner: R,
    error: KeptError,
}

impl<R> ErrorKeeping<R> {
    fn new(inner: R) -> (Self, KeptError) {
        let error = KeptError::default();
        (
            Self {
                inner,
                error: error.clone(),
            },
            error,
        )
    }
}

impl<R: std::io::Read> std::io::Read for ErrorKeeping<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if let Ok(mut kept) = self.error.lock() {
                kept.get_or_insert_with(|| std::io::Error::new(e.kind(), e.to_string()));
            }
        })
    }
}
