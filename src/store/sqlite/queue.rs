//! The SQLite store's dispatch state, held in memory by the one process that serves the
//! database: which deliveries wait for the gate, which entity lanes have work, their heads,
//! leases and retry times.
//!
//! None of it is written to the database as it changes. What the database keeps is what
//! happened, appended once: the delivery, the gate's verdict, each attempt, the closing of a
//! delivery's work, a replay ([`super::ops`]). This state is rebuilt from those records at start
//! ([`super::recover`]) and changed only by the writer after each commit, in the order of the
//! batch's ops, so it never shows anything the disk does not hold: a delivery reaches a handler
//! only after its commit, and its verdict only after the verdict's.
//!
//! The rules are the store's, the same as the PostgreSQL back-end keeps in its tables (and the
//! conformance suite holds both to): only the head of an entity's lane is ever due, so one
//! entity's deliveries come one at a time in the gate's order; a head with exactly one run due
//! brings the deliveries right behind it that wait for that same handler's first attempt (its
//! chain); a lease keeps others out until it runs out, and a record from a lease that was taken
//! over is refused.
//!
//! Small bodies stay in memory from their accept until their work is done (up to
//! [`BODY_CACHE_BYTES`] in all), so the gate and the handlers get them without a read.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use bytes::Bytes;

use crate::delivery::{Origin, Payload, Status, UnixMillis};
use crate::ordering::Version;
use crate::store::{status_after_runs, AttemptResult, Claimed, DueRun, RunState, Ungated};

/// Most bytes of small bodies held in memory for the gate and the handlers; beyond it a body is
/// read back from the database when it is needed.
pub const BODY_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// A delivery waiting for the gate in its current round.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub delivery_id: String,
    pub request_id: Option<String>,
    pub topic: Option<String>,
    pub received_at: UnixMillis,
    /// 0 for its first gating; one more for each replay.
    pub round: i64,
    /// `None`: not held in memory, read it from the database.
    pub body: Option<Payload>,
    /// Handlers that did it in an earlier round: they do not run again.
    pub done: Vec<String>,
    pub origin: Origin,
}

/// What the gate recorded for a delivery with handlers to run.
#[derive(Debug, Clone)]
pub struct Gated {
    pub seq: i64,
    pub round: i64,
    pub entity: Option<String>,
    pub version: Option<Version>,
    pub project_id: Option<String>,
    pub fresh: bool,
    pub body_is_json: bool,
    /// The typed event as JSON, for the handlers.
    pub event: Option<String>,
    pub status: Status,
    /// The runs left: each handler the route gave it that has not done it yet.
    pub runs: Vec<Run>,
}

/// One handler's progress with one delivery in its current round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub handler: String,
    pub state: RunState,
    /// Attempts made in this round.
    pub attempts: u32,
    /// When it is due (pending runs).
    pub next_at: UnixMillis,
}

impl Run {
    pub fn pending(handler: String, next_at: UnixMillis) -> Self {
        Self {
            handler,
            state: RunState::Pending,
            attempts: 0,
            next_at,
        }
    }
}

/// A gated delivery with work left.
#[derive(Debug)]
struct Work {
    gated: Gated,
    delivery_id: String,
    request_id: Option<String>,
    topic: Option<String>,
    received_at: UnixMillis,
    body: Option<Payload>,
    origin: Origin,
    lease: Option<(String, UnixMillis)>,
    /// Queued behind an earlier delivery of its entity: not due until it heads the lane.
    waiting: bool,
    /// Its key in [`MemQueue::due`], while it is there.
    due_at: Option<UnixMillis>,
}

impl Work {
    fn leased_at(&self, now: UnixMillis) -> bool {
        self.lease.as_ref().is_some_and(|(_, until)| *until >= now)
    }

    fn next_due(&self) -> Option<UnixMillis> {
        self.gated
            .runs
            .iter()
            .filter(|r| r.state == RunState::Pending)
            .map(|r| r.next_at)
            .min()
    }
}

/// Why a record was refused: the lease of `seq` is not the recorder's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseLost(pub i64);

/// What recording attempts leaves of a delivery: its runs and status, and whether its work is
/// finished (its closing is appended beside the attempts).
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seq: i64,
    pub round: i64,
    pub runs: Vec<Run>,
    pub status: Status,
    pub finished: bool,
}

#[derive(Debug, Default)]
pub struct MemQueue {
    ungated: BTreeMap<i64, Arrival>,
    work: HashMap<i64, Work>,
    /// Per entity, its deliveries with work left in the gate's order; the first is the head.
    lanes: HashMap<String, VecDeque<i64>>,
    /// Lane heads with a run pending, by when the first of them is due.
    due: BTreeSet<(UnixMillis, i64)>,
    cached_bytes: usize,
    /// Every delivery up to this `seq` is known: held here, or finished.
    pub known_seq: i64,
    /// Every replay record up to this id is applied.
    pub known_replay: i64,
    /// Replays recorded by another process for deliveries being handled here: applied when
    /// their lease is let go.
    deferred_replays: HashMap<i64, Arrival>,
    /// Ranges of `seq` another process may have stored deliveries in (this process's own came
    /// after them), to be read by the next catch-up.
    gaps: Vec<(i64, i64)>,
}

impl MemQueue {
    /// Holds `body` in memory if the budget allows.
    fn cache(&mut self, body: Option<Payload>) -> Option<Payload> {
        let body = body?;
        match body.as_inline() {
            Some(bytes) if self.cached_bytes + bytes.len() > BODY_CACHE_BYTES => None,
            Some(bytes) => {
                self.cached_bytes += bytes.len();
                Some(body)
            }
            None => Some(body),
        }
    }

    fn uncache(&mut self, body: Option<&Payload>) {
        if let Some(bytes) = body.and_then(Payload::as_inline) {
            self.cached_bytes = self.cached_bytes.saturating_sub(bytes.len());
        }
    }

    /// A delivery committed and waiting for the gate.
    pub fn arrived(&mut self, seq: i64, mut arrival: Arrival) {
        if seq > self.known_seq + 1 {
            self.gaps.push((self.known_seq + 1, seq - 1));
        }
        self.known_seq = self.known_seq.max(seq);
        arrival.body = self.cache(arrival.body.take());
        if let Some(old) = self.ungated.insert(seq, arrival) {
            self.uncache(old.body.as_ref());
        }
    }

    /// Ranges of `seq` to read back (see [`MemQueue::gaps`]'s field).
    pub fn gaps(&self) -> Vec<(i64, i64)> {
        self.gaps.clone()
    }

    pub fn has_gaps(&self) -> bool {
        !self.gaps.is_empty()
    }

    /// Forgets the gaps up to `seq`: a catch-up read them.
    pub fn clear_gaps(&mut self, seq: i64) {
        self.gaps.retain(|(from, _)| *from > seq);
    }

    /// The oldest deliveries waiting for the gate, up to `limit`; those whose body is not in
    /// memory carry an empty one and are listed second, to be read by the caller.
    pub fn ungated(&self, limit: usize) -> (Vec<Ungated>, Vec<i64>) {
        let mut unread = Vec::new();
        let taken = self
            .ungated
            .iter()
            .take(limit)
            .map(|(&seq, a)| {
                let body = a.body.clone().unwrap_or_else(|| {
                    unread.push(seq);
                    Payload::inline(Bytes::new())
                });
                Ungated {
                    seq,
                    delivery_id: a.delivery_id.clone(),
                    request_id: a.request_id.clone(),
                    topic: a.topic.clone(),
                    body,
                    origin: a.origin,
                }
            })
            .collect();
        (taken, unread)
    }

    /// The round and the handlers done before of a delivery waiting for the gate; `None` when it
    /// is not waiting (gated already).
    pub fn awaiting_gate(&self, seq: i64) -> Option<(i64, &[String])> {
        self.ungated.get(&seq).map(|a| (a.round, a.done.as_slice()))
    }

    /// The gate's verdict is committed: with runs left, the delivery joins its entity's lane
    /// (heading it when nothing of the entity has work left) or heads a lane of its own when it
    /// has no entity.
    pub fn gated(&mut self, gated: Gated) {
        let Some(arrival) = self.ungated.remove(&gated.seq) else {
            return;
        };
        if gated.runs.iter().all(|r| r.state != RunState::Pending) {
            self.uncache(arrival.body.as_ref());
            return;
        }
        let seq = gated.seq;
        let waiting = match &gated.entity {
            Some(entity) => {
                let lane = self.lanes.entry(entity.clone()).or_default();
                lane.push_back(seq);
                lane.len() > 1
            }
            None => false,
        };
        let work = Work {
            gated,
            delivery_id: arrival.delivery_id,
            request_id: arrival.request_id,
            topic: arrival.topic,
            received_at: arrival.received_at,
            body: arrival.body,
            origin: arrival.origin,
            lease: None,
            waiting,
            due_at: None,
        };
        self.work.insert(seq, work);
        if !waiting {
            self.schedule(seq);
        }
    }

    /// Puts `seq` in the due set at its earliest pending run, or takes it out.
    fn schedule(&mut self, seq: i64) {
        let Some(work) = self.work.get_mut(&seq) else {
            return;
        };
        if let Some(at) = work.due_at.take() {
            self.due.remove(&(at, seq));
        }
        if work.waiting {
            return;
        }
        if let Some(at) = work.next_due() {
            work.due_at = Some(at);
            self.due.insert((at, seq));
        }
    }

    /// Leases up to `limit` due lane heads to `owner` until `until`, each with its due runs and
    /// (with `chain_max` above zero) its chain. Bodies not in memory are left empty and their
    /// `seq`s listed, for the caller to read. Oldest first.
    pub fn claim(
        &mut self,
        owner: &str,
        now: UnixMillis,
        until: UnixMillis,
        limit: usize,
        chain_max: usize,
    ) -> (Vec<Claimed>, Vec<i64>) {
        let heads: Vec<i64> = self
            .due
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|&(_, seq)| seq)
            .filter(|seq| self.work.get(seq).is_some_and(|w| !w.leased_at(now)))
            .take(limit)
            .collect();
        let mut unread = Vec::new();
        let mut claimed = Vec::with_capacity(heads.len());
        for seq in heads {
            let chain = if chain_max > 0 {
                self.chain_behind(seq, now, chain_max)
            } else {
                Vec::new()
            };
            let mut head = self.lease(seq, owner, until, now, &mut unread);
            head.chain = chain
                .into_iter()
                .map(|member| self.lease(member, owner, until, now, &mut unread))
                .collect();
            claimed.push(head);
        }
        claimed.sort_by_key(|c| c.seq);
        (claimed, unread)
    }

    /// The deliveries right behind lane head `seq` that wait for its one due run's handler, for
    /// their first attempt, and are not leased; stops at the first that does not.
    fn chain_behind(&self, seq: i64, now: UnixMillis, chain_max: usize) -> Vec<i64> {
        let Some(head) = self.work.get(&seq) else {
            return Vec::new();
        };
        let due: Vec<&Run> = due_runs(&head.gated.runs, now).collect();
        let (Some(entity), [run]) = (head.gated.entity.as_ref(), due.as_slice()) else {
            return Vec::new();
        };
        let Some(lane) = self.lanes.get(entity) else {
            return Vec::new();
        };
        lane.iter()
            .skip_while(|s| **s != seq)
            .skip(1)
            .map_while(|s| {
                let member = self.work.get(s)?;
                let same_first_run = matches!(
                    member.gated.runs.as_slice(),
                    [only] if only.handler == run.handler
                        && only.state == RunState::Pending
                        && only.attempts == 0
                        && only.next_at <= now
                );
                (same_first_run && !member.leased_at(now)).then_some(*s)
            })
            .take(chain_max)
            .collect()
    }

    fn lease(
        &mut self,
        seq: i64,
        owner: &str,
        until: UnixMillis,
        now: UnixMillis,
        unread: &mut Vec<i64>,
    ) -> Claimed {
        let Some(work) = self.work.get_mut(&seq) else {
            // Only called for `seq`s just found in `work`.
            return empty_claim(seq);
        };
        work.lease = Some((owner.to_owned(), until));
        let body = work.body.clone().unwrap_or_else(|| {
            unread.push(seq);
            Payload::inline(Bytes::new())
        });
        let g = &work.gated;
        Claimed {
            seq,
            delivery_id: work.delivery_id.clone(),
            topic: work.topic.clone(),
            entity: g.entity.clone(),
            version: g.version,
            project_id: g.project_id.clone(),
            fresh: g.fresh,
            body_is_json: g.body_is_json,
            received_at: work.received_at,
            event: g.event.clone(),
            body,
            runs: due_runs(&g.runs, now)
                .map(|r| DueRun {
                    handler: r.handler.clone(),
                    attempts: r.attempts,
                })
                .collect(),
            request_id: work.request_id.clone(),
            chain: Vec::new(),
            origin: work.origin,
        }
    }

    /// Extends the leases `owner` holds among `seqs`; returns those.
    pub fn renew(&mut self, owner: &str, seqs: &[i64], until: UnixMillis) -> Vec<i64> {
        seqs.iter()
            .copied()
            .filter(|seq| match self.work.get_mut(seq) {
                Some(w) => match &mut w.lease {
                    Some((holder, at)) if holder == owner => {
                        *at = until;
                        true
                    }
                    _ => false,
                },
                None => false,
            })
            .collect()
    }

    /// What recording `results` for `seq` by `owner` leaves (nothing is changed here: the
    /// writer applies it with [`MemQueue::recorded`] once the records are committed).
    pub fn outcome_of(
        &self,
        seq: i64,
        owner: &str,
        results: &[AttemptResult],
    ) -> Result<Outcome, LeaseLost> {
        let work = self.work.get(&seq).ok_or(LeaseLost(seq))?;
        if work.lease.as_ref().map(|(holder, _)| holder.as_str()) != Some(owner) {
            return Err(LeaseLost(seq));
        }
        let mut runs = work.gated.runs.clone();
        for r in results {
            if let Some(run) = runs.iter_mut().find(|run| run.handler == r.handler) {
                run.state = r.outcome.run_state();
                run.attempts = r.attempt;
                if let Some(next) = r.outcome.next_at() {
                    run.next_at = next;
                }
            }
        }
        let pending = runs.iter().any(|r| r.state == RunState::Pending);
        let dead = runs.iter().any(|r| r.state == RunState::Dead);
        Ok(Outcome {
            seq,
            round: work.gated.round,
            status: status_after_runs(work.gated.status, pending, dead),
            finished: !pending,
            runs,
        })
    }

    /// Whether `owner` holds the lease of `seq`.
    pub fn holds(&self, seq: i64, owner: &str) -> bool {
        self.work
            .get(&seq)
            .and_then(|w| w.lease.as_ref())
            .is_some_and(|(holder, _)| holder == owner)
    }

    /// Recorded attempts are committed: the delivery's runs move on and its lease is let go;
    /// when its work is finished it leaves its lane, and the next one there heads it.
    pub fn recorded(&mut self, outcome: Outcome) {
        let seq = outcome.seq;
        let Some(work) = self.work.get_mut(&seq) else {
            return;
        };
        work.gated.runs = outcome.runs;
        work.gated.status = outcome.status;
        work.lease = None;
        if outcome.finished {
            self.finish(seq);
        } else {
            self.schedule(seq);
        }
        self.apply_deferred_replay(seq);
    }

    /// Lets go of `owner`'s lease on `seq` (a chain member that was not tried).
    pub fn release(&mut self, seq: i64, owner: &str) {
        if let Some(work) = self.work.get_mut(&seq) {
            if work
                .lease
                .as_ref()
                .is_some_and(|(holder, _)| holder == owner)
            {
                work.lease = None;
            }
        }
        self.apply_deferred_replay(seq);
    }

    /// `seq` has no work left in this round: out of its lane, and the next one there heads it.
    fn finish(&mut self, seq: i64) {
        let Some(work) = self.work.remove(&seq) else {
            return;
        };
        if let Some(at) = work.due_at {
            self.due.remove(&(at, seq));
        }
        self.uncache(work.body.as_ref());
        let Some(entity) = work.gated.entity else {
            return;
        };
        let Some(lane) = self.lanes.get_mut(&entity) else {
            return;
        };
        lane.retain(|s| *s != seq);
        let next = lane.front().copied();
        if lane.is_empty() {
            self.lanes.remove(&entity);
        }
        if let Some(next) = next {
            if let Some(w) = self.work.get_mut(&next) {
                w.waiting = false;
            }
            self.schedule(next);
        }
    }

    /// Whether `seq` is being handled right now (leased, the lease live at `now`).
    pub fn running(&self, seq: i64, now: UnixMillis) -> bool {
        self.work.get(&seq).is_some_and(|w| w.leased_at(now))
    }

    /// The handlers that did `seq` in its current or an earlier round, and its round, when it
    /// is held here (waiting for the gate, or with work left).
    pub fn held(&self, seq: i64) -> Option<(i64, Vec<String>)> {
        if let Some(a) = self.ungated.get(&seq) {
            return Some((a.round, a.done.clone()));
        }
        self.work.get(&seq).map(|w| {
            let done = w
                .gated
                .runs
                .iter()
                .filter(|r| r.state == RunState::Done)
                .map(|r| r.handler.clone())
                .collect();
            (w.gated.round, done)
        })
    }

    /// A replay of `seq` is committed: it steps out of its lane (the next one there heads it)
    /// and waits for the gate again in its new round. One being handled by another process's
    /// record, which this process did not decide, waits until its lease is let go.
    pub fn replayed(&mut self, seq: i64, mut arrival: Arrival, now: UnixMillis) {
        if self.running(seq, now) {
            self.deferred_replays.insert(seq, arrival);
            return;
        }
        if let Some(work) = self.work.get(&seq) {
            if arrival.body.is_none() {
                arrival.body = work.body.clone();
            }
        }
        self.finish(seq);
        if let Some(old) = self.ungated.get(&seq) {
            if arrival.body.is_none() {
                arrival.body = old.body.clone();
            }
        }
        self.arrived(seq, arrival);
    }

    fn apply_deferred_replay(&mut self, seq: i64) {
        if let Some(arrival) = self.deferred_replays.remove(&seq) {
            self.replayed(seq, arrival, UnixMillis::MIN);
        }
    }

    /// Deliveries with work left: waiting for the gate, or gated with runs left.
    pub fn depth(&self) -> u64 {
        (self.ungated.len() + self.work.len()) as u64
    }

    /// When the oldest delivery with work left was received.
    pub fn oldest_received(&self) -> Option<UnixMillis> {
        let first_ungated = self
            .ungated
            .iter()
            .next()
            .map(|(seq, a)| (*seq, a.received_at));
        let first_work = self
            .work
            .iter()
            .min_by_key(|(seq, _)| **seq)
            .map(|(seq, w)| (*seq, w.received_at));
        [first_ungated, first_work]
            .into_iter()
            .flatten()
            .min_by_key(|(seq, _)| *seq)
            .map(|(_, at)| at)
    }

    /// The lowest `seq` that may still have work: every delivery below it is finished. What
    /// the start of the next run reads from (the dispatch mark).
    pub fn low_water(&self) -> i64 {
        let held = self
            .ungated
            .keys()
            .next()
            .copied()
            .into_iter()
            .chain(self.work.keys().copied())
            .chain(self.deferred_replays.keys().copied())
            .min();
        held.unwrap_or(self.known_seq + 1)
    }

    /// Fills the bodies read for `seq` (after a claim or a take of the gate's that found them
    /// not in memory).
    pub fn keep_body(&mut self, seq: i64, body: &Payload) {
        let cached = self.cache(Some(body.clone()));
        if let Some(work) = self.work.get_mut(&seq) {
            if work.body.is_none() {
                work.body = cached;
                return;
            }
        } else if let Some(a) = self.ungated.get_mut(&seq) {
            if a.body.is_none() {
                a.body = cached;
                return;
            }
        }
        self.uncache(cached.as_ref());
    }
}

fn due_runs(runs: &[Run], now: UnixMillis) -> impl Iterator<Item = &Run> {
    runs.iter()
        .filter(move |r| r.state == RunState::Pending && r.next_at <= now)
}

fn empty_claim(seq: i64) -> Claimed {
    Claimed {
        seq,
        delivery_id: String::new(),
        topic: None,
        entity: None,
        version: None,
        project_id: None,
        fresh: true,
        body_is_json: true,
        received_at: 0,
        event: None,
        body: Payload::inline(Bytes::new()),
        runs: Vec::new(),
        request_id: None,
        chain: Vec::new(),
        origin: Origin::Webhook,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AttemptOutcome;

    fn arrival(round: i64) -> Arrival {
        Arrival {
            delivery_id: "d".into(),
            request_id: None,
            topic: Some("LABEL_UPDATED".into()),
            received_at: 0,
            round,
            body: Some(Payload::inline(Bytes::from_static(b"{}"))),
            done: Vec::new(),
            origin: Origin::Webhook,
        }
    }

    fn gated(seq: i64, entity: &str, handlers: &[&str], now: UnixMillis) -> Gated {
        Gated {
            seq,
            round: 0,
            entity: Some(entity.into()),
            version: None,
            project_id: None,
            fresh: true,
            body_is_json: true,
            event: None,
            status: Status::Pending,
            runs: handlers
                .iter()
                .map(|h| Run::pending((*h).into(), now))
                .collect(),
        }
    }

    fn ok(handler: &str) -> AttemptResult {
        AttemptResult {
            handler: handler.into(),
            attempt: 1,
            started_at: 0,
            finished_at: 0,
            outcome: AttemptOutcome::Ok,
        }
    }

    #[test]
    fn only_a_lane_head_is_claimed_and_the_next_heads_the_lane_when_it_is_done() {
        let mut q = MemQueue::default();
        for seq in 1..=3 {
            q.arrived(seq, arrival(0));
        }
        q.gated(gated(1, "A", &["x", "y"], 0));
        q.gated(gated(2, "A", &["x"], 0));
        q.gated(gated(3, "B", &["x"], 0));
        let (claimed, unread) = q.claim("w", 0, 100, 10, 10);
        assert!(unread.is_empty());
        assert_eq!(claimed.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 3]);
        assert!(claimed[0].chain.is_empty(), "two runs due: no chain");
        assert!(q.claim("v", 0, 100, 10, 10).0.is_empty(), "leased");
        let outcome = q.outcome_of(1, "w", &[ok("x"), ok("y")]).expect("held");
        assert!(outcome.finished);
        assert_eq!(outcome.status, Status::Delivered);
        q.recorded(outcome);
        let (next, _) = q.claim("w", 0, 100, 10, 10);
        assert_eq!(next.iter().map(|c| c.seq).collect::<Vec<_>>(), [2]);
        assert_eq!(q.outcome_of(3, "v", &[ok("x")]).err(), Some(LeaseLost(3)));
    }

    #[test]
    fn a_replay_of_a_delivery_being_handled_waits_for_its_lease_to_be_let_go() {
        let mut q = MemQueue::default();
        q.arrived(1, arrival(0));
        q.gated(gated(1, "A", &["x"], 0));
        let (claimed, _) = q.claim("w", 0, 100, 10, 0);
        assert_eq!(claimed.len(), 1);
        q.replayed(1, arrival(1), 10);
        assert_eq!(q.awaiting_gate(1), None, "still being handled");
        let outcome = q.outcome_of(1, "w", &[ok("x")]).expect("held");
        q.recorded(outcome);
        assert_eq!(q.awaiting_gate(1).map(|(round, _)| round), Some(1));
        assert_eq!(q.low_water(), 1);
    }
}
