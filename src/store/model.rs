//! The values that cross the store's traits: what the ingress hands in, what the dispatcher
//! takes out and reports back, and what the CLI reads. Plain data, the same for every back-end.

use std::fmt;
use std::str::FromStr;

use crate::delivery::{Origin, Payload, Status, UnixMillis};
use crate::ordering::{Change, Version};

/// What became of an accepted delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub seq: i64,
    /// The same (delivery id, body hash) was stored before; nothing new was written.
    pub duplicate: bool,
    /// The delivery id was seen before with a different body; stored as its own delivery.
    pub id_conflict: bool,
}

/// Who holds a lease: one id per process start, so a restarted process never mistakes the
/// leases of its previous life for its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseOwner(String);

impl LeaseOwner {
    /// A new owner id: host name (the pod name in Kubernetes), process id, start time and a
    /// random part.
    pub fn for_this_process() -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "labelhook".to_owned());
        Self(format!(
            "{host}-{}-{}-{:08x}",
            std::process::id(),
            crate::delivery::now_millis(),
            fastrand::u32(..)
        ))
    }

    /// An owner with a chosen name (tests, and tools that stand in for a dispatcher).
    pub fn named(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LeaseOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Filter for `events list` and the console's deliveries page: newest first, at most `limit`,
/// each filter optional. Pages are keyset pages by sequence number (`before_seq` is the lowest
/// `seq` of the page before), so a page costs the same however deep it is.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub status: Option<Status>,
    pub topic: Option<String>,
    pub limit: u32,
    pub project_id: Option<String>,
    pub entity: Option<String>,
    /// Deliveries a route gave to this handler.
    pub handler: Option<String>,
    /// Every stored delivery with this id (there may be several: same id, other body).
    pub delivery_id: Option<String>,
    /// Received at or after this.
    pub received_from: Option<UnixMillis>,
    /// Received before this.
    pub received_until: Option<UnixMillis>,
    /// Only deliveries with a smaller `seq`: the next page.
    pub before_seq: Option<i64>,
}

/// One line of `events list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeliverySummary {
    pub seq: i64,
    pub delivery_id: String,
    pub endpoint: String,
    pub topic: Option<String>,
    pub entity: Option<String>,
    pub version: Option<String>,
    pub status: Status,
    pub received_at: String,
    pub body_len: u64,
    pub id_conflict: bool,
    /// The project the gate found in the event (`None` before gating, or when it has none).
    pub project_id: Option<String>,
    /// A webhook, or a backfill.
    pub origin: Origin,
}

/// Where one handler stands with one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Not done yet: due now, or waiting for its next attempt.
    Pending,
    Done,
    /// Dead-lettered for this handler.
    Dead,
}

/// How one recorded attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptKind {
    Ok,
    Retry,
    Dead,
}

/// Text forms kept in the database and shown by the CLI, one place per enum.
macro_rules! text_enum {
    ($name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!("unknown {} {other:?}", stringify!($name))),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

text_enum!(RunState { Pending => "pending", Done => "done", Dead => "dead" });
text_enum!(AttemptKind { Ok => "ok", Retry => "retry", Dead => "dead" });

/// One handler's progress with one delivery.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HandlerRun {
    pub handler: String,
    pub state: RunState,
    pub attempts: u32,
    pub next_attempt_at: Option<String>,
    pub last_error: Option<String>,
}

/// One call of a handler.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttemptRecord {
    pub handler: String,
    pub attempt: u32,
    pub started_at: String,
    pub finished_at: String,
    pub outcome: AttemptKind,
    pub error: Option<String>,
}

/// Everything `events show` prints.
#[derive(Debug, Clone)]
pub struct DeliveryDetail {
    pub summary: DeliverySummary,
    pub client_ip: String,
    pub headers: Vec<(String, String)>,
    /// Empty when `body_pruned`.
    pub body: Payload,
    /// Retention dropped the body; the row describing it is kept a while longer.
    pub body_pruned: bool,
    pub fresh: Option<bool>,
    pub parse_error: Option<String>,
    pub handlers: Vec<HandlerRun>,
    pub attempts: Vec<AttemptRecord>,
    /// The id of the HTTP request that brought it, as in its log lines; `None` for deliveries
    /// stored before request ids were kept.
    pub request_id: Option<String>,
}

/// What `events replay` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayOutcome {
    pub replayed: u64,
    /// Matching deliveries being handled at this moment, left alone.
    pub running: u64,
}

impl ReplayOutcome {
    /// The counts of what a replay did to each delivery.
    pub fn of(items: &[ReplayItem]) -> Self {
        let replayed = items.iter().filter(|i| i.effect.replays()).count() as u64;
        Self {
            replayed,
            running: items.len() as u64 - replayed,
        }
    }
}

/// What `events replay` puts back in the queue.
#[derive(Debug, Clone)]
pub enum ReplayTarget {
    DeliveryId(String),
    Status(Status),
}

/// A stored delivery waiting to be parsed and gated.
#[derive(Debug, Clone)]
pub struct Ungated {
    pub seq: i64,
    pub delivery_id: String,
    /// For the gate's log lines (see [`Claimed::request_id`]).
    pub request_id: Option<String>,
    pub topic: Option<String>,
    pub body: Payload,
    /// For the gate: a backfilled delivery is judged by rule 7 of [`crate::ordering`].
    pub origin: Origin,
}

/// What the dispatcher learned from parsing one delivery, and which handlers its routes want.
/// The store decides fresh or stale with [`crate::ordering::decide`] inside the transaction that
/// records it, so two deliveries of one entity can never both be judged against stale state.
#[derive(Debug, Clone)]
pub struct GateRequest {
    pub seq: i64,
    pub entity: Option<String>,
    pub version: Option<Version>,
    pub change: Change,
    pub project_id: Option<String>,
    /// Why the body could not be parsed, if it could not (the delivery becomes `unrecognized`).
    pub parse_error: Option<String>,
    /// False for unknown topics (also `unrecognized`).
    pub recognized: bool,
    /// Handlers to run when the event is fresh.
    pub handlers_if_fresh: Vec<String>,
    /// Handlers to run when it is stale (routes with `deliver_stale`).
    pub handlers_if_stale: Vec<String>,
    /// The canonical topic, for metrics.
    pub topic_label: &'static str,
    /// The typed event, as JSON, kept for the handlers.
    pub event: String,
    /// The delivery's origin ([`Ungated::origin`]): a backfilled one is judged by rule 7 of
    /// [`crate::ordering`].
    pub origin: Origin,
    /// The data row the event is about ([`crate::events::Event::data_row_id`]).
    pub data_row_id: Option<String>,
    /// For a label event, the labels it says its data row has
    /// ([`crate::events::Event::labels_named`]): what a backfill compares an export with.
    pub labels: Option<Vec<String>>,
}

impl GateRequest {
    /// The handlers for the gate's verdict.
    pub fn handlers(&self, fresh: bool) -> &[String] {
        if fresh {
            &self.handlers_if_fresh
        } else {
            &self.handlers_if_stale
        }
    }

    /// The status a gated delivery takes, before any handler ran.
    pub fn status(&self, fresh: bool) -> Status {
        if self.parse_error.is_some() || !self.recognized {
            Status::Unrecognized
        } else if !fresh {
            Status::Stale
        } else if self.handlers(fresh).is_empty() {
            Status::Delivered
        } else {
            Status::Pending
        }
    }
}

/// A delivery claimed for dispatch, with the handler runs that are due.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub seq: i64,
    pub delivery_id: String,
    pub topic: Option<String>,
    pub entity: Option<String>,
    pub version: Option<Version>,
    pub project_id: Option<String>,
    pub fresh: bool,
    pub body_is_json: bool,
    pub received_at: UnixMillis,
    /// The typed event as the gate recorded it (JSON); `None` for deliveries gated by an
    /// older version.
    pub event: Option<String>,
    pub body: Payload,
    pub runs: Vec<DueRun>,
    /// The id of the HTTP request that brought the delivery, so that the log lines of its
    /// handler attempts (in another task, maybe on another replica) carry it too.
    pub request_id: Option<String>,
    /// The deliveries right behind this one in its entity's lane, leased with it, in lane
    /// order: each has the same one handler due for its first attempt, as this one has. The
    /// dispatcher hands them to that handler together (one fsync for many lines, say) and
    /// records them with [`crate::store::Queue::record_chain`]. Empty when the claim asked for
    /// no chains or nothing qualifies; never nested.
    pub chain: Vec<Claimed>,
    /// A webhook, or a backfill: handlers are told.
    pub origin: Origin,
}

/// What was done with one delivery of a claimed chain, for [`crate::store::Queue::record_chain`].
#[derive(Debug, Clone)]
pub struct ChainRecord {
    pub seq: i64,
    /// Its attempts; empty when it was not tried (a delivery before it failed), which releases
    /// its lease and leaves it waiting in its lane as before.
    pub results: Vec<AttemptResult>,
}

/// One handler to call for a claimed delivery.
#[derive(Debug, Clone)]
pub struct DueRun {
    pub handler: String,
    /// Attempts made before this one.
    pub attempts: u32,
}

/// How one attempt ended, as the dispatcher decided from the handler's answer.
#[derive(Debug, Clone)]
pub enum AttemptOutcome {
    Ok,
    /// Failed; try again at `next_at`.
    Retry {
        next_at: UnixMillis,
        error: String,
    },
    /// Failed for good (permanent error or out of attempts): dead-lettered for this handler.
    Dead {
        error: String,
    },
}

impl AttemptOutcome {
    /// The handler run's state after this attempt, when it is recorded.
    pub fn run_state(&self) -> RunState {
        match self {
            AttemptOutcome::Ok => RunState::Done,
            AttemptOutcome::Retry { .. } => RunState::Pending,
            AttemptOutcome::Dead { .. } => RunState::Dead,
        }
    }

    pub fn kind(&self) -> AttemptKind {
        match self {
            AttemptOutcome::Ok => AttemptKind::Ok,
            AttemptOutcome::Retry { .. } => AttemptKind::Retry,
            AttemptOutcome::Dead { .. } => AttemptKind::Dead,
        }
    }

    pub fn next_at(&self) -> Option<UnixMillis> {
        match self {
            AttemptOutcome::Retry { next_at, .. } => Some(*next_at),
            _ => None,
        }
    }

    pub fn error(&self) -> Option<&str> {
        match self {
            AttemptOutcome::Ok => None,
            AttemptOutcome::Retry { error, .. } | AttemptOutcome::Dead { error } => Some(error),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub handler: String,
    /// This attempt's number, from 1.
    pub attempt: u32,
    pub started_at: UnixMillis,
    pub finished_at: UnixMillis,
    pub outcome: AttemptOutcome,
}

/// A delivery's status once its handler runs are recorded: still `current` while a run is
/// pending, `Dead` when any run died, `Delivered` when a pending delivery's runs are all done.
pub fn status_after_runs(current: Status, any_pending: bool, any_dead: bool) -> Status {
    match (any_pending, any_dead, current) {
        (true, _, current) => current,
        (false, true, _) => Status::Dead,
        (false, false, Status::Pending) => Status::Delivered,
        (false, false, current) => current,
    }
}

/// One delivery in its entity's history, with what the gate made of it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EntityEntry {
    pub summary: DeliverySummary,
    /// How the gate ranked it at equal versions (created, updated, deleted).
    pub change: Option<Change>,
    /// The gate's verdict: `Some(false)` is stale; `None` not gated (yet, or again after a
    /// replay).
    pub fresh: Option<bool>,
    /// Its place in the entity's lane: the order in which the gate judged the entity's
    /// deliveries.
    pub lane_pos: Option<i64>,
}

/// What the gate remembers of one entity: the last state it applied.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EntityState {
    pub entity: String,
    pub version: Option<String>,
    pub change: Option<Change>,
    pub updated_at: UnixMillis,
    /// A delivery of the entity has handler work left, so later ones wait behind it.
    pub busy: bool,
}

/// One entity as the console shows it: "why is this stale?" answered by looking.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EntityHistory {
    /// `None` when the gate has never judged a delivery of this entity.
    pub state: Option<EntityState>,
    /// Oldest version first; deliveries without a version last; ties in the gate's order.
    pub deliveries: Vec<EntityEntry>,
    /// More deliveries of the entity are kept than the most recent ones read.
    pub truncated: bool,
}

/// Why the gate judged one delivery as it did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerdictBasis {
    pub delivery: EntityEntry,
    /// What it was held against: the last delivery of its entity applied before it in the
    /// gate's order (with a version, or a delete). `None` when nothing was applied before it,
    /// or when retention removed that delivery.
    pub held_against: Option<EntityEntry>,
    /// The entity's state now.
    pub entity: Option<EntityState>,
}

/// How one handler has been doing, for the console's overview.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HandlerActivity {
    pub handler: String,
    pub last_success_at: Option<UnixMillis>,
    pub last_failure_at: Option<UnixMillis>,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
    /// Failed attempts (retried or dead-lettered) that finished since the time asked about.
    pub failures_since: u64,
    pub successes_since: u64,
    /// Deliveries dead-lettered for this handler now.
    pub dead: u64,
    /// Deliveries waiting for this handler now.
    pub pending: u64,
}

impl HandlerActivity {
    /// Adds each handler's dead and pending counts (`(handler, dead, pending)` rows, as both
    /// back-ends read them) to `by_handler`, making an entry for a handler seen only here.
    pub fn add_run_counts(
        by_handler: &mut std::collections::BTreeMap<String, HandlerActivity>,
        runs: Vec<(String, i64, i64)>,
    ) {
        for (handler, dead, pending) in runs {
            let a = by_handler
                .entry(handler.clone())
                .or_insert_with(|| HandlerActivity {
                    handler,
                    ..HandlerActivity::default()
                });
            a.dead = u64::try_from(dead).unwrap_or(0);
            a.pending = u64::try_from(pending).unwrap_or(0);
        }
    }
}

/// Deliveries received in one stretch of time, by their status now.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReceivedBucket {
    pub start: UnixMillis,
    pub by_status: Vec<(Status, u64)>,
}

/// Most buckets an overview is cut into, whatever it is asked for.
pub const MAX_BUCKETS: i64 = 1440;
/// How far before a window the back-ends look for its rows: `seq` grows with `received_at`
/// only roughly, since a body that took long to arrive is committed after quicker ones.
pub(crate) const RECEIVED_WINDOW_MARGIN_MS: i64 = 3_600_000;

/// Counts read back as (status text, count).
pub(crate) fn counts_by_status(rows: Vec<(String, i64)>) -> Result<Vec<(Status, u64)>, String> {
    rows.into_iter()
        .map(|(status, n)| Ok((status.parse::<Status>()?, n.max(0) as u64)))
        .collect()
}

/// Oldest version first, versionless last; at equal versions in the gate's order, then by
/// arrival.
pub(crate) fn in_version_order(mut rows: Vec<(Option<i64>, EntityEntry)>) -> Vec<EntityEntry> {
    rows.sort_by_key(|(version, e)| {
        (
            version.is_none(),
            *version,
            e.lane_pos.is_none(),
            e.lane_pos,
            e.summary.seq,
        )
    });
    rows.into_iter().map(|(_, e)| e).collect()
}

impl ReceivedBucket {
    /// Empty buckets of `bucket_ms` from `since` up to `now` (at most [`MAX_BUCKETS`]).
    pub fn span(since: UnixMillis, now: UnixMillis, bucket_ms: i64) -> Vec<ReceivedBucket> {
        if bucket_ms <= 0 || now <= since {
            return Vec::new();
        }
        let count = ((now - since + bucket_ms - 1) / bucket_ms).min(MAX_BUCKETS);
        (0..count)
            .map(|i| ReceivedBucket {
                start: since + i * bucket_ms,
                by_status: Vec::new(),
            })
            .collect()
    }

    pub fn count(&self, status: Status) -> u64 {
        self.by_status
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    }

    pub fn total(&self) -> u64 {
        self.by_status.iter().map(|(_, n)| n).sum()
    }
}

/// What the store knows for the console's overview.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Overview {
    /// Every delivery kept, by status.
    pub by_status: Vec<(Status, u64)>,
    /// Deliveries received from the time asked about, bucket by bucket, oldest first; every
    /// bucket is there, empty or not.
    pub buckets: Vec<ReceivedBucket>,
}

/// What replaying one stored delivery does, said before (a preview) and after (what was
/// done). The gate decides again when the delivery comes back, so [`ReplayEffect::Superseded`]
/// is what the gate will find unless the entity changes meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum ReplayEffect {
    /// Put back before the gate; the handlers that have not done it run again.
    Queued,
    /// Its entity has applied a newer state since, so the gate will find it stale: it goes
    /// only to routes that deliver stale events.
    Superseded {
        /// The entity's applied version (and kind of change) that outranks it.
        version: Option<String>,
        change: Change,
    },
    /// Being handled right now: left alone.
    Running,
    /// Every handler it was routed to has done it: put back all the same, nothing runs again.
    Done,
}

impl ReplayEffect {
    /// Whether replay puts it back (all but [`ReplayEffect::Running`]).
    pub fn replays(&self) -> bool {
        !matches!(self, ReplayEffect::Running)
    }
}

/// One delivery a replay concerns, and what replay does to it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayItem {
    pub summary: DeliverySummary,
    pub effect: ReplayEffect,
    /// Its handler runs before the replay: done ones are not run again.
    pub handlers: Vec<HandlerRun>,
}

/// A label the store knows on one data row of one project, for `labelhook labelbox backfill`:
/// one an export no longer lists was deleted while the receiver was down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownLabel {
    pub data_row_id: String,
    pub label_id: String,
    /// The newest version the store applied for it: a v1 label's own entity, or the export-shaped
    /// snapshot of its data row that listed it.
    pub version: Option<Version>,
}

/// What one gated label delivery said: its data row, its entity and version, the labels it
/// named, and whether the entity is deleted now.
pub(crate) type NamedLabels = (String, String, Option<i64>, Vec<String>, bool);

/// The labels gated label deliveries say their data rows have (the same for every back-end).
/// `rows` are (data row id, entity, version, the labels its delivery named
/// ([`crate::events::Event::labels_named`]), whether the entity is deleted), the newest
/// delivery first per entity; only the newest counts, and a deleted entity names none.
pub(crate) fn known_labels_of(rows: Vec<NamedLabels>) -> Vec<KnownLabel> {
    let mut seen = std::collections::HashSet::new();
    let mut known = Vec::new();
    for (data_row_id, entity, version, labels, deleted) in rows {
        if !seen.insert(entity) || deleted {
            continue;
        }
        let version = version.map(Version::from_nanos);
        known.extend(labels.into_iter().map(|label_id| KnownLabel {
            data_row_id: data_row_id.clone(),
            label_id,
            version,
        }));
    }
    known
}

/// The labels a typed event recorded as JSON names ([`crate::events::Event::labels_named`]):
/// none when it is not a label event, or cannot be read back.
pub(crate) fn labels_named_in(event: &str) -> Vec<String> {
    serde_json::from_str::<crate::events::Event>(event)
        .ok()
        .and_then(|event| event.labels_named())
        .unwrap_or_default()
}
