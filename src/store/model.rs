//! The values that cross the store's traits: what the ingress hands in, what the dispatcher
//! takes out and reports back, and what the CLI reads. Plain data, the same for every back-end.

use std::fmt;
use std::str::FromStr;

use crate::delivery::{Payload, Status, UnixMillis};
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

/// Filter for `events list`.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub status: Option<Status>,
    pub topic: Option<String>,
    pub limit: u32,
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
}

/// What `events replay` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayOutcome {
    pub replayed: u64,
    /// Matching deliveries being handled at this moment, left alone.
    pub running: u64,
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
    pub topic: Option<String>,
    pub body: Payload,
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
