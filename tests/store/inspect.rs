//! The rules of what the console and the CLI read (filtered pages of deliveries, an entity's
//! history, the gate's reasons, handler activity, the overview) and of replay saying what it
//! does, written once against the store's traits.

use std::time::Duration;

use labelhook::ordering::Change;
use labelhook::test_support::delivery::{Clock, Status};
use labelhook::test_support::store::{
    AttemptOutcome, AttemptResult, GateRequest, LeaseOwner, ListQuery, ReplayEffect, ReplayTarget,
    RunState,
};

use crate::harness::{body, label_gate, Harness, LEASE};

fn attempt(handler: &str, at: i64, outcome: AttemptOutcome) -> AttemptResult {
    AttemptResult {
        handler: handler.to_owned(),
        attempt: 1,
        started_at: at,
        finished_at: at,
        outcome,
    }
}

fn dead(error: &str) -> AttemptOutcome {
    AttemptOutcome::Dead {
        error: error.to_owned(),
    }
}

fn seqs(rows: &[labelhook::test_support::store::DeliverySummary]) -> Vec<i64> {
    rows.iter().map(|r| r.seq).collect()
}

/// `label_gate` with its project.
fn in_project(mut gate: GateRequest, project: &str) -> GateRequest {
    gate.project_id = Some(project.to_owned());
    gate
}

pub async fn deliveries_are_filtered_and_paged_by_sequence_number(h: &Harness) {
    let t0 = h.clock.now();
    let a = h.accept("f-a", "LABEL_UPDATED", &body(1)).await.seq;
    h.clock.advance(Duration::from_secs(60));
    let b = h.accept("f-b", "LABEL_CREATED", &body(2)).await.seq;
    h.clock.advance(Duration::from_secs(60));
    let c = h.accept("f-c", "LABEL_UPDATED", &body(3)).await.seq;
    // The same id with another body: a delivery of its own, found by the id too.
    let c2 = h.accept("f-c", "LABEL_UPDATED", &body(4)).await.seq;
    h.gate_all(|s| {
        let (entity, project, handlers): (&str, &str, &[&str]) = if s == a {
            ("label:A", "p1", &["archive", "forward"])
        } else if s == b {
            ("label:B", "p2", &["archive"])
        } else {
            ("label:C", "p1", &[])
        };
        let gate = label_gate(s, entity, "2024-05-02T08:00:01Z", Change::Updated, handlers);
        in_project(gate, project)
    })
    .await;
    let query = |q: ListQuery| async move {
        let rows = h
            .store
            .list(&ListQuery { limit: 100, ..q })
            .await
            .expect("list");
        seqs(&rows)
    };
    assert_eq!(
        query(ListQuery::default()).await,
        [c2, c, b, a],
        "newest first"
    );
    let topic = Some("LABEL_UPDATED".to_owned());
    assert_eq!(
        query(ListQuery {
            topic,
            ..ListQuery::default()
        })
        .await,
        [c2, c, a]
    );
    let project = Some("p1".to_owned());
    assert_eq!(
        query(ListQuery {
            project_id: project,
            ..ListQuery::default()
        })
        .await,
        [c2, c, a]
    );
    let entity = Some("label:B".to_owned());
    assert_eq!(
        query(ListQuery {
            entity,
            ..ListQuery::default()
        })
        .await,
        [b]
    );
    let handler = Some("forward".to_owned());
    assert_eq!(
        query(ListQuery {
            handler,
            ..ListQuery::default()
        })
        .await,
        [a]
    );
    let id = Some("f-c".to_owned());
    assert_eq!(
        query(ListQuery {
            delivery_id: id,
            ..ListQuery::default()
        })
        .await,
        [c2, c],
        "a second delivery with the same id is shown"
    );
    let status = Some(Status::Pending);
    assert_eq!(
        query(ListQuery {
            status,
            ..ListQuery::default()
        })
        .await,
        [b, a]
    );
    let window = ListQuery {
        received_from: Some(t0 + 60_000),
        received_until: Some(t0 + 120_000),
        ..ListQuery::default()
    };
    assert_eq!(query(window).await, [b]);
    let rows = h
        .store
        .list(&ListQuery {
            limit: 2,
            ..ListQuery::default()
        })
        .await
        .expect("list");
    assert_eq!(seqs(&rows), [c2, c]);
    let before = rows.last().map(|r| r.seq);
    let next = ListQuery {
        before_seq: before,
        limit: 2,
        ..ListQuery::default()
    };
    assert_eq!(seqs(&h.store.list(&next).await.expect("list")), [b, a]);
    let shown = h
        .store
        .list(&ListQuery {
            limit: 100,
            ..ListQuery::default()
        })
        .await
        .expect("list");
    let first = shown.iter().find(|r| r.seq == a).expect("a");
    assert_eq!(first.project_id.as_deref(), Some("p1"));
}

pub async fn replay_says_per_delivery_what_it_does_and_does_it(h: &Harness) {
    let owner = LeaseOwner::named("w");
    // x1 (label:X, v1) dies; x2 (label:X, v2) is applied after it: x1 is superseded.
    // y1 (label:Y) dies: queued again. z1 is done.
    let x1 = h.accept("x1", "LABEL_UPDATED", &body(1)).await.seq;
    let y1 = h.accept("y1", "LABEL_UPDATED", &body(2)).await.seq;
    let z1 = h.accept("z1", "LABEL_UPDATED", &body(3)).await.seq;
    h.gate_all(|s| {
        let entity = if s == x1 {
            "label:X"
        } else if s == y1 {
            "label:Y"
        } else {
            "label:Z"
        };
        label_gate(
            s,
            entity,
            "2024-05-02T08:00:01Z",
            Change::Updated,
            &["forward"],
        )
    })
    .await;
    let now = h.clock.now();
    for claimed in h.store.claim(&owner, LEASE, 10, 0).await.expect("claim") {
        let outcome = if claimed.seq == z1 {
            AttemptOutcome::Ok
        } else {
            dead("503 from forward")
        };
        h.store
            .record_attempts(claimed.seq, &owner, &[attempt("forward", now, outcome)])
            .await
            .expect("record");
    }
    h.accept("x2", "LABEL_UPDATED", &body(4)).await;
    h.gate_all(|s| label_gate(s, "label:X", "2024-05-02T09:00:00Z", Change::Updated, &[]))
        .await;
    let effect_of = |items: Vec<labelhook::test_support::store::ReplayItem>| {
        assert_eq!(items.len(), 1, "{items:?}");
        items[0].effect.clone()
    };
    let id = |s: &str| ReplayTarget::DeliveryId(s.to_owned());

    let superseded = ReplayEffect::Superseded {
        version: Some("2024-05-02T09:00:00Z".to_owned()),
        change: Change::Updated,
    };
    assert_eq!(
        effect_of(h.store.replay_preview(&id("x1")).await.expect("preview")),
        superseded
    );
    assert_eq!(
        effect_of(h.store.replay_preview(&id("y1")).await.expect("preview")),
        ReplayEffect::Queued
    );
    assert_eq!(
        effect_of(h.store.replay_preview(&id("z1")).await.expect("preview")),
        ReplayEffect::Done
    );
    assert!(h
        .store
        .replay_preview(&id("nope"))
        .await
        .expect("preview")
        .is_empty());
    // A preview changes nothing.
    let statuses = |id: &'static str| async move {
        let shown = h.store.show(id).await.expect("show");
        shown.iter().map(|d| d.summary.status).collect::<Vec<_>>()
    };
    assert_eq!(statuses("x1").await, [Status::Dead]);
    assert_eq!(statuses("y1").await, [Status::Dead]);

    // All dead ones, said and done in one go.
    let items = h
        .store
        .replay_each(&ReplayTarget::Status(Status::Dead))
        .await
        .expect("replay");
    let effects: Vec<(i64, ReplayEffect)> = items
        .iter()
        .map(|i| (i.summary.seq, i.effect.clone()))
        .collect();
    assert_eq!(effects, [(x1, superseded), (y1, ReplayEffect::Queued)]);
    let runs = &items[1].handlers;
    assert_eq!(runs.len(), 1);
    assert_eq!(
        (runs[0].handler.as_str(), runs[0].state),
        ("forward", RunState::Dead)
    );
    assert_eq!(statuses("x1").await, [Status::Pending]);
    assert_eq!(statuses("y1").await, [Status::Pending]);
    let again = h.store.take_ungated(&owner, LEASE, 10).await.expect("take");
    let mut back: Vec<i64> = again.iter().map(|u| u.seq).collect();
    back.sort_unstable();
    assert_eq!(back, [x1, y1], "both are back before the gate");
    assert!(h
        .store
        .replay_each(&id("nope"))
        .await
        .expect("replay")
        .is_empty());
}

pub async fn a_delivery_being_handled_is_left_alone_by_replay_and_says_so(h: &Harness) {
    let owner = LeaseOwner::named("w");
    h.accept("busy", "LABEL_UPDATED", &body(1)).await;
    h.gate_all(|s| {
        label_gate(
            s,
            "label:B",
            "2024-05-02T08:00:01Z",
            Change::Updated,
            &["forward"],
        )
    })
    .await;
    assert_eq!(
        h.store
            .claim(&owner, LEASE, 10, 0)
            .await
            .expect("claim")
            .len(),
        1
    );
    let target = ReplayTarget::DeliveryId("busy".to_owned());
    let preview = h.store.replay_preview(&target).await.expect("preview");
    assert_eq!(preview[0].effect, ReplayEffect::Running);
    let done = h.store.replay_each(&target).await.expect("replay");
    assert_eq!(done[0].effect, ReplayEffect::Running);
    assert!(!done[0].effect.replays());
    // Still claimed: its lease holder can record it.
    let now = h.clock.now();
    let seq = done[0].summary.seq;
    h.store
        .record_attempts(seq, &owner, &[attempt("forward", now, AttemptOutcome::Ok)])
        .await
        .expect("the holder records it");
}

pub async fn an_entity_history_is_in_version_order_with_verdicts(h: &Harness) {
    let v2 = h.accept("e-v2", "LABEL_UPDATED", &body(1)).await.seq;
    let v1 = h.accept("e-v1", "LABEL_UPDATED", &body(2)).await.seq;
    let v3 = h.accept("e-v3", "LABEL_UPDATED", &body(3)).await.seq;
    let other = h.accept("e-other", "LABEL_UPDATED", &body(4)).await.seq;
    h.gate_all(|s| {
        let (entity, version) = match s {
            s if s == v2 => ("label:E", "2024-05-02T08:00:02Z"),
            s if s == v1 => ("label:E", "2024-05-02T08:00:01Z"),
            s if s == v3 => ("label:E", "2024-05-02T08:00:03Z"),
            _ => ("label:O", "2024-05-02T08:00:01Z"),
        };
        label_gate(s, entity, version, Change::Updated, &[])
    })
    .await;
    let history = h
        .store
        .entity_history("label:E", 10)
        .await
        .expect("history");
    let order: Vec<(i64, Option<bool>)> = history
        .deliveries
        .iter()
        .map(|e| (e.summary.seq, e.fresh))
        .collect();
    assert_eq!(
        order,
        [(v1, Some(false)), (v2, Some(true)), (v3, Some(true))]
    );
    assert!(!order.iter().any(|(s, _)| *s == other));
    assert_eq!(history.deliveries[0].change, Some(Change::Updated));
    assert!(!history.truncated);
    let state = history.state.expect("the gate's state");
    assert_eq!(state.version.as_deref(), Some("2024-05-02T08:00:03Z"));
    assert_eq!(state.change, Some(Change::Updated));
    // Only the most recent deliveries, in version order.
    let recent = h.store.entity_history("label:E", 2).await.expect("history");
    assert!(recent.truncated);
    assert_eq!(
        seqs(
            &recent
                .deliveries
                .iter()
                .map(|e| e.summary.clone())
                .collect::<Vec<_>>()
        ),
        [v1, v3]
    );
    let unknown = h
        .store
        .entity_history("label:none", 10)
        .await
        .expect("history");
    assert!(unknown.state.is_none() && unknown.deliveries.is_empty());
}

pub async fn the_verdict_basis_names_what_a_stale_delivery_was_held_against(h: &Harness) {
    let newer = h.accept("b-new", "LABEL_UPDATED", &body(1)).await.seq;
    let older = h.accept("b-old", "LABEL_UPDATED", &body(2)).await.seq;
    let unparsed = h.accept("b-x", "NOT_A_TOPIC", &body(3)).await.seq;
    h.gate_all(|s| {
        let version = if s == newer {
            "2024-05-02T08:00:02Z"
        } else {
            "2024-05-02T08:00:01Z"
        };
        if s == unparsed {
            let mut gate = label_gate(s, "x", version, Change::Updated, &[]);
            gate.entity = None;
            gate.recognized = false;
            return gate;
        }
        label_gate(s, "label:V", version, Change::Updated, &[])
    })
    .await;
    let basis = h
        .store
        .verdict_basis(older)
        .await
        .expect("basis")
        .expect("kept");
    assert_eq!(basis.delivery.fresh, Some(false));
    let held = basis.held_against.expect("what outranked it");
    assert_eq!(held.summary.seq, newer);
    assert_eq!(
        held.summary.version.as_deref(),
        Some("2024-05-02T08:00:02Z")
    );
    assert_eq!(
        basis.entity.and_then(|e| e.version).as_deref(),
        Some("2024-05-02T08:00:02Z")
    );
    let first = h
        .store
        .verdict_basis(newer)
        .await
        .expect("basis")
        .expect("kept");
    assert_eq!(first.delivery.fresh, Some(true));
    assert!(
        first.held_against.is_none(),
        "nothing was applied before it"
    );
    let none = h
        .store
        .verdict_basis(unparsed)
        .await
        .expect("basis")
        .expect("kept");
    assert!(none.entity.is_none() && none.held_against.is_none());
    assert!(h
        .store
        .verdict_basis(999_999)
        .await
        .expect("basis")
        .is_none());
}

pub async fn handler_activity_tells_each_handlers_last_success_and_recent_failures(h: &Harness) {
    let owner = LeaseOwner::named("w");
    for n in 0..3 {
        h.accept(&format!("h{n}"), "LABEL_UPDATED", &body(n)).await;
    }
    h.gate_all(|s| {
        label_gate(
            s,
            &format!("label:H{s}"),
            "2024-05-02T08:00:01Z",
            Change::Updated,
            &["forward", "archive"],
        )
    })
    .await;
    let t0 = h.clock.now();
    let claimed = h.store.claim(&owner, LEASE, 10, 0).await.expect("claim");
    assert_eq!(claimed.len(), 3);
    // An hour ago: one failure of forward. Now: forward fails twice (one retried, one dead),
    // archive succeeds three times.
    let old = t0 - 2 * 3_600_000;
    let retry = AttemptOutcome::Retry {
        next_at: t0 + 60_000,
        error: "timeout".to_owned(),
    };
    let plans = [
        vec![
            attempt("forward", old, dead("old failure")),
            attempt("archive", t0, AttemptOutcome::Ok),
        ],
        vec![
            attempt("forward", t0 + 1, retry),
            attempt("archive", t0, AttemptOutcome::Ok),
        ],
        vec![
            attempt("forward", t0 + 2, dead("connection refused")),
            attempt("archive", t0, AttemptOutcome::Ok),
        ],
    ];
    for (c, plan) in claimed.iter().zip(plans) {
        h.store
            .record_attempts(c.seq, &owner, &plan)
            .await
            .expect("record");
    }
    let activity = h
        .store
        .handler_activity(t0 - 3_600_000)
        .await
        .expect("activity");
    let get = |name: &str| {
        activity
            .iter()
            .find(|a| a.handler == name)
            .expect(name)
            .clone()
    };
    let forward = get("forward");
    assert_eq!(forward.last_success_at, None);
    assert_eq!(forward.last_failure_at, Some(t0 + 2));
    assert_eq!(forward.last_error.as_deref(), Some("connection refused"));
    assert_eq!(
        forward.failures_since, 2,
        "the old failure is before the window"
    );
    assert_eq!((forward.dead, forward.pending), (2, 1));
    let archive = get("archive");
    assert_eq!(archive.last_success_at, Some(t0));
    assert_eq!((archive.successes_since, archive.failures_since), (3, 0));
    assert_eq!(archive.last_failure_at, None);
}

pub async fn the_overview_counts_by_status_and_by_when_deliveries_came(h: &Harness) {
    let t0 = h.clock.now();
    h.accept("w0", "LABEL_UPDATED", &body(0)).await;
    h.clock.advance(Duration::from_secs(60));
    h.accept("w1", "LABEL_UPDATED", &body(1)).await;
    h.clock.advance(Duration::from_secs(6 * 60));
    h.accept("w2", "LABEL_UPDATED", &body(2)).await;
    let w2 = h.store.show("w2").await.expect("show")[0].summary.seq;
    h.gate_all(|s| {
        let version = if s == w2 {
            "2024-05-02T08:00:00Z"
        } else {
            "2024-05-02T08:00:01Z"
        };
        label_gate(s, "label:W", version, Change::Updated, &[])
    })
    .await;
    let now = h.clock.now() + 1;
    let overview = h
        .store
        .overview(t0, now, 5 * 60_000)
        .await
        .expect("overview");
    let kept = |status: Status| {
        overview
            .by_status
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    };
    assert_eq!((kept(Status::Delivered), kept(Status::Stale)), (2, 1));
    assert_eq!(overview.buckets.len(), 2);
    assert_eq!(overview.buckets[0].start, t0);
    assert_eq!(overview.buckets[0].count(Status::Delivered), 2);
    assert_eq!(overview.buckets[1].start, t0 + 5 * 60_000);
    assert_eq!(overview.buckets[1].count(Status::Stale), 1);
    assert_eq!(overview.buckets[1].total(), 1);
    // A window after them all counts none of them.
    let later = h
        .store
        .overview(now, now + 60_000, 60_000)
        .await
        .expect("overview");
    assert_eq!(later.buckets.iter().map(|b| b.total()).sum::<u64>(), 0);
}
