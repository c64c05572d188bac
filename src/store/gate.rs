//! The gate's decision for one delivery, as every back-end records it: fresh or stale against
//! the entity's last applied state ([`crate::ordering::decide`]), the state to keep, and where
//! the delivery stands in its entity's lane. Pure; the back-ends run it inside the transaction
//! that records it, with the entity's row locked. [`replay_effect`] says beforehand what the
//! gate and the dispatcher will do with a delivery put back by replay.

use crate::delivery::{Origin, Status};
use crate::ordering::{self, Applied, Change, Verdict, Version};
use crate::store::{GateRequest, HandlerRun, ReplayEffect, RunState, StoreError};

/// An entity's stored state, read back.
pub fn applied(
    version: Option<i64>,
    change: &str,
    backfilled: bool,
) -> Result<Applied, StoreError> {
    Ok(Applied {
        version: version.map(Version::from_nanos),
        change: Change::parse(change)
            .ok_or_else(|| StoreError::Corrupt(format!("change {change:?}")))?,
        backfilled,
    })
}

/// The gate's rules for a delivery of this origin: a backfilled one is judged by rule 7.
pub fn decide(
    origin: Origin,
    last: Option<&Applied>,
    version: Option<Version>,
    change: Change,
) -> (Verdict, Option<Applied>) {
    match origin {
        Origin::Webhook => ordering::decide(last, version, change),
        Origin::Backfill => ordering::decide_backfilled(last, version, change),
    }
}

/// What the gate decides for one delivery of an entity, the same for every back-end.
pub struct LaneDecision {
    pub verdict: Verdict,
    /// The entity's state to store: what was applied, or the old state for a stale event.
    pub state: Applied,
    /// The lane position of the entity's head after this delivery joins the lane.
    pub active_pos: Option<i64>,
}

/// Decides fresh or stale, and where the delivery stands in its entity's lane. A stale event
/// keeps the entity's state but still takes a lane position, so a route that delivers stale
/// events sees them in arrival order too. The delivery heads the lane when nothing before it
/// has work left; otherwise it waits to be promoted by the one before it.
pub fn decide_in_lane(
    last: Option<Applied>,
    lane_pos: i64,
    active_pos: Option<i64>,
    gate: &GateRequest,
) -> LaneDecision {
    let (verdict, applied) = decide(gate.origin, last.as_ref(), gate.version, gate.change);
    let state = applied.or(last).unwrap_or(Applied {
        version: gate.version,
        change: gate.change,
        backfilled: gate.origin == Origin::Backfill,
    });
    let becomes_head = !gate.handlers(verdict.is_fresh()).is_empty() && active_pos.is_none();
    LaneDecision {
        verdict,
        state,
        active_pos: if becomes_head {
            Some(lane_pos)
        } else {
            active_pos
        },
    }
}

/// What replay would do to one delivery, the same for every back-end (and said before it is
/// done): a delivery being handled is left alone; one that the entity's applied state outranks
/// now would come back stale; one whose handlers have all done it runs nothing again; anything
/// else is queued again. `own` is the delivery's version and change when the gate has judged
/// it, `origin` where it came from, `last` its entity's applied state.
pub fn replay_effect(
    running: bool,
    status: Status,
    own: Option<(Option<Version>, Change)>,
    origin: Origin,
    last: Option<Applied>,
    runs: &[HandlerRun],
) -> ReplayEffect {
    if running {
        return ReplayEffect::Running;
    }
    if let (Some((version, change)), Some(last)) = (own, last) {
        if !decide(origin, Some(&last), version, change).0.is_fresh() {
            return ReplayEffect::Superseded {
                version: last.version.map(|v| v.to_string()),
                change: last.change,
            };
        }
    }
    if status == Status::Delivered && runs.iter().all(|r| r.state == RunState::Done) {
        return ReplayEffect::Done;
    }
    ReplayEffect::Queued
}
