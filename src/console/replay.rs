//! What replay does to a delivery, in words: one text for the console's confirmation and
//! result pages and for `labelhook events replay`, so both say the same.
//!
//! The store says what it found ([`ReplayEffect`]); which handlers that means is the routes'
//! business, so it is worked out here from the configuration the process runs with.

use crate::delivery::Status;
use crate::dispatch::Routes;
use crate::store::{ReplayEffect, ReplayItem, RunState};

/// The handlers a replayed delivery will go to: for a fresh verdict, its routes' handlers
/// minus those that have done it; for a stale one, the routes that deliver stale events.
pub fn handlers_after_replay(item: &ReplayItem, routes: &Routes) -> Vec<String> {
    let s = &item.summary;
    let topic = s.topic.as_deref().unwrap_or_default();
    let recognized = s.status != Status::Unrecognized;
    let fresh = !matches!(item.effect, ReplayEffect::Superseded { .. });
    routes
        .select(topic, recognized, s.project_id.as_deref(), fresh)
        .into_iter()
        .filter(|h| {
            !item
                .handlers
                .iter()
                .any(|run| &run.handler == h && run.state == RunState::Done)
        })
        .collect()
}

/// A short name for the effect, as a CSS class and in `events replay` output.
pub fn effect_name(effect: &ReplayEffect) -> &'static str {
    match effect {
        ReplayEffect::Queued => "queued",
        ReplayEffect::Superseded { .. } => "superseded",
        ReplayEffect::Running => "running",
        ReplayEffect::Done => "done",
    }
}

/// What replay does to one delivery, in a sentence (the same before and after).
pub fn describe(item: &ReplayItem, routes: &Routes) -> String {
    let to = handlers_after_replay(item, routes);
    let list = to.join(", ");
    match &item.effect {
        ReplayEffect::Running => "already running: being handled right now, left alone".to_owned(),
        ReplayEffect::Done => {
            "already done: every handler it was routed to has it; nothing runs again".to_owned()
        }
        ReplayEffect::Superseded { version, change } => {
            let by = match version {
                Some(v) => format!("version {v} ({change})"),
                None => format!("a {change} event"),
            };
            if to.is_empty() {
                format!(
                    "superseded by {by} of its entity: comes back stale and is withheld \
                     (no route delivers stale events)"
                )
            } else {
                format!(
                    "superseded by {by} of its entity: comes back stale, for the routes that \
                     deliver stale events ({list})"
                )
            }
        }
        ReplayEffect::Queued if item.summary.status == Status::Unrecognized => {
            "queued again: parsed and gated again".to_owned()
        }
        ReplayEffect::Queued if to.is_empty() => {
            "queued again: gated again; no handler is left to run it".to_owned()
        }
        ReplayEffect::Queued => format!("queued again: gated again, then {list}"),
    }
}
