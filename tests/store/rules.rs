//! The rules every store back-end keeps, each written once against the store's traits.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use labelhook::ordering::{Change, Verdict};
use labelhook::test_support::delivery::{Clock, IncomingBody, Status};
use labelhook::test_support::store::{
    AttemptKind, AttemptOutcome, AttemptResult, ChainRecord, Claimed, Cutoffs, GateRequest,
    LeaseOwner, ListQuery, PruneReport, ReplayTarget, RetentionSettings, RunState, StoreError,
};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::harness::{body, label_gate, verified, Harness, LEASE};

// The console's reads and replay's report, kept in a file of their own; so is what a backfill
// needs.
pub use crate::backfill::*;
pub use crate::inspect::*;

const FRESH_TO: &[&str] = &["archive"];

fn all() -> ListQuery {
    ListQuery {
        limit: 1000,
        ..ListQuery::default()
    }
}

async fn status_of(h: &Harness, id: &str) -> Vec<Status> {
    let rows = h.store.show(id).await.expect("show");
    rows.iter().map(|d| d.summary.status).collect()
}

fn ok(handler: &str, attempt: u32, now: i64) -> AttemptResult {
    result(handler, attempt, now, AttemptOutcome::Ok)
}

fn result(handler: &str, attempt: u32, now: i64, outcome: AttemptOutcome) -> AttemptResult {
    AttemptResult {
        handler: handler.to_owned(),
        attempt,
        started_at: now,
        finished_at: now,
        outcome,
    }
}

/// Claims what is due for `owner` and returns it.
async fn claim(h: &Harness, owner: &str) -> Vec<Claimed> {
    h.store
        .claim(&LeaseOwner::named(owner), LEASE, 100, 0)
        .await
        .expect("claim")
}

// --- intake ---------------------------------------------------------------------------------

pub async fn a_delivery_is_stored_once_and_a_changed_body_is_kept_apart(h: &Harness) {
    let first = h.accept("d1", "LABEL_UPDATED", &body(1)).await;
    assert!(!first.duplicate && !first.id_conflict);
    let again = h.accept("d1", "LABEL_UPDATED", &body(1)).await;
    assert!(again.duplicate, "same id and body is a duplicate");
    assert_eq!(again.seq, first.seq);
    let changed = h.accept("d1", "LABEL_UPDATED", &body(2)).await;
    assert!(!changed.duplicate && changed.id_conflict);
    assert_ne!(changed.seq, first.seq);
    let unknown = h.accept("d2", "SOMETHING_NEW", &body(3)).await;
    assert!(!unknown.duplicate);

    assert_eq!(h.store.list(&all()).await.expect("list").len(), 3);
    let shown = h.store.show("d1").await.expect("show");
    let bodies: Vec<Bytes> =
        futures_util::future::try_join_all(shown.iter().map(|d| d.body.read_all()))
            .await
            .expect("bodies");
    assert_eq!(bodies, [Bytes::from(body(1)), Bytes::from(body(2))]);
    assert!(shown.iter().all(|d| d.summary.status == Status::Pending));
    assert_eq!(status_of(h, "d2").await, [Status::Unrecognized]);
}

pub async fn two_replicas_accepting_one_delivery_at_once_store_it_once(h: &Harness) {
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..8 {
        let store = if n % 2 == 0 {
            h.store.clone()
        } else {
            h.other()
        };
        tasks.spawn(async move {
            let d = verified(
                "same",
                "LABEL_UPDATED",
                &body(7),
                IncomingBody::Inline(Bytes::from(body(7))),
            );
            store.accept(d).await.expect("accept")
        });
    }
    let mut new = 0;
    let mut seqs = HashSet::new();
    while let Some(accepted) = tasks.join_next().await {
        let accepted = accepted.expect("task");
        new += usize::from(!accepted.duplicate);
        seqs.insert(accepted.seq);
    }
    assert_eq!(new, 1, "exactly one accept stores it");
    assert_eq!(seqs.len(), 1, "every answer names the same row");
    assert_eq!(h.store.list(&all()).await.expect("list").len(), 1);
}

pub async fn a_large_body_is_streamed_in_and_back_whole(h: &Harness) {
    // Larger than a chunk of either back-end, written in uneven pieces.
    let large: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut writer = h.store.bodies().create().await.expect("create body");
    for piece in large.chunks(65_537) {
        writer
            .write(Bytes::copy_from_slice(piece))
            .await
            .expect("write");
    }
    let staged = writer.finish().await.expect("finish");
    assert_eq!(staged.len(), large.len() as u64);
    let d = verified("big", "LABEL_UPDATED", &large, IncomingBody::Staged(staged));
    assert!(!h.store.accept(d).await.expect("accept").duplicate);

    // A duplicate's own copy is dropped; the stored one stays whole.
    let mut writer = h.store.bodies().create().await.expect("create body");
    writer
        .write(Bytes::from(large.clone()))
        .await
        .expect("write");
    let again = verified(
        "big",
        "LABEL_UPDATED",
        &large,
        IncomingBody::Staged(writer.finish().await.expect("finish")),
    );
    assert!(h.store.accept(again).await.expect("accept").duplicate);

    let ungated = h
        .other()
        .take_ungated(&LeaseOwner::named("reader"), LEASE, 10)
        .await
        .expect("take");
    assert_eq!(ungated.len(), 1);
    let payload = &ungated[0].body;
    assert!(payload.as_inline().is_none(), "a large body is streamed");
    assert_eq!(payload.len(), large.len() as u64);
    let mut hasher = Sha256::new();
    let mut pieces = 0;
    let mut stream = payload.stream().await.expect("open");
    while let Some(piece) = stream.next().await {
        hasher.update(piece.expect("read"));
        pieces += 1;
    }
    assert!(pieces > 1, "read back in pieces, not whole");
    assert_eq!(hasher.finalize()[..], Sha256::digest(&large)[..]);
}

pub async fn a_dropped_body_writer_leaves_nothing_to_read(h: &Harness) {
    let mut writer = h.store.bodies().create().await.expect("create");
    writer
        .write(Bytes::from_static(b"half a body"))
        .await
        .expect("write");
    drop(writer);
    // Nothing was accepted, so there is nothing to list, take or claim.
    assert!(h.store.list(&all()).await.expect("list").is_empty());
    assert_eq!(h.store.queue_depth().await.expect("depth"), 0);
    h.store.check_ready().await.expect("ready");
}

// --- gating ---------------------------------------------------------------------------------

pub async fn a_delivery_is_gated_once_whoever_takes_it(h: &Harness) {
    for n in 0..3 {
        h.accept(&format!("g{n}"), "LABEL_UPDATED", &body(n)).await;
    }
    let (a, b) = (LeaseOwner::named("a"), LeaseOwner::named("b"));
    let taken = h.store.take_ungated(&a, LEASE, 10).await.expect("take");
    assert_eq!(taken.len(), 3);
    assert!(
        taken.windows(2).all(|w| w[0].seq < w[1].seq),
        "oldest first"
    );
    // Once the lease has run out (if the back-end reserves at all), another takes them too.
    h.clock.advance(LEASE + Duration::from_secs(1));
    let retaken = h.other().take_ungated(&b, LEASE, 10).await.expect("take");
    assert_eq!(retaken.len(), 3);

    // Whoever records first gates it; the other finds it gated and changes nothing.
    let gate = |seq| {
        label_gate(
            seq,
            &format!("label:g{seq}"),
            "2024-05-02T08:00:12Z",
            Change::Updated,
            FRESH_TO,
        )
    };
    let first = h
        .store
        .record_gates(taken.iter().map(|u| gate(u.seq)).collect())
        .await
        .expect("gate");
    assert!(first.iter().all(|v| *v == Some(Verdict::Fresh)));
    let second = h
        .other()
        .record_gates(retaken.iter().map(|u| gate(u.seq)).collect())
        .await
        .expect("gate");
    assert!(second.iter().all(Option::is_none), "gated once: {second:?}");
    assert_eq!(claim(h, "x").await.len(), 3, "one run each, not two");
    assert!(h
        .store
        .take_ungated(&a, LEASE, 10)
        .await
        .expect("take")
        .is_empty());
}

pub async fn the_gate_applies_newer_versions_and_keeps_older_ones_as_stale(h: &Harness) {
    // Arrival order: t2, t1 (late), t3, then t3 again as a re-delivery with a new id.
    let plan = [
        (
            "v2",
            "2024-05-02T08:00:02Z",
            Change::Updated,
            Verdict::Fresh,
        ),
        (
            "v1",
            "2024-05-02T08:00:01Z",
            Change::Updated,
            Verdict::Stale,
        ),
        (
            "v3",
            "2024-05-02T08:00:03Z",
            Change::Updated,
            Verdict::Fresh,
        ),
        (
            "v3b",
            "2024-05-02T08:00:03Z",
            Change::Updated,
            Verdict::Fresh,
        ),
        (
            "c3",
            "2024-05-02T08:00:03Z",
            Change::Created,
            Verdict::Stale,
        ),
    ];
    let mut seqs = Vec::new();
    for (n, (id, ..)) in plan.iter().enumerate() {
        seqs.push(h.accept(id, "LABEL_UPDATED", &body(n)).await.seq);
    }
    let verdicts = h
        .gate_all(|seq| {
            let i = seqs.iter().position(|s| *s == seq).expect("known seq");
            let (_, version, change, _) = plan[i];
            label_gate(seq, "label:A", version, change, FRESH_TO)
        })
        .await;
    let got: Vec<Option<Verdict>> = verdicts.iter().map(|(_, v)| *v).collect();
    let want: Vec<Option<Verdict>> = plan.iter().map(|p| Some(p.3)).collect();
    assert_eq!(got, want);
    assert_eq!(status_of(h, "v1").await, [Status::Stale]);
    assert_eq!(status_of(h, "c3").await, [Status::Stale]);
    assert_eq!(status_of(h, "v3").await, [Status::Pending]);
}

pub async fn a_delete_is_final_and_outranks_an_update_at_the_same_version(h: &Harness) {
    let plan = [
        ("u", "2024-05-02T08:00:05Z", Change::Updated, Verdict::Fresh),
        ("d", "2024-05-02T08:00:05Z", Change::Deleted, Verdict::Fresh),
        (
            "u-again",
            "2024-05-02T08:00:05Z",
            Change::Updated,
            Verdict::Stale,
        ),
        (
            "later",
            "2024-05-02T09:00:00Z",
            Change::Updated,
            Verdict::Stale,
        ),
    ];
    let mut seqs = Vec::new();
    for (n, (id, ..)) in plan.iter().enumerate() {
        seqs.push(h.accept(id, "LABEL_UPDATED", &body(n)).await.seq);
    }
    let verdicts = h
        .gate_all(|seq| {
            let i = seqs.iter().position(|s| *s == seq).expect("known seq");
            label_gate(seq, "label:D", plan[i].1, plan[i].2, FRESH_TO)
        })
        .await;
    let got: Vec<Option<Verdict>> = verdicts.iter().map(|(_, v)| *v).collect();
    assert_eq!(got, plan.iter().map(|p| Some(p.3)).collect::<Vec<_>>());
}

pub async fn two_replicas_gating_one_entity_at_once_hand_it_on_in_version_order(h: &Harness) {
    // Versions of one label arrive shuffled; two replicas (two dispatchers each) gate them at
    // the same time, one delivery per transaction, so their decisions interleave.
    const NEWEST: u32 = 400;
    let mut versions: Vec<u32> = (1..=NEWEST).collect();
    fastrand::shuffle(&mut versions);
    let mut by_seq = std::collections::HashMap::new();
    for v in &versions {
        let accepted = h
            .accept(&format!("e{v}"), "LABEL_UPDATED", &body(*v as usize))
            .await;
        by_seq.insert(accepted.seq, *v);
    }
    let by_seq = std::sync::Arc::new(by_seq);
    let mut gaters = tokio::task::JoinSet::new();
    let stores = [h.store.clone(), h.other(), h.store.clone(), h.other()];
    for (n, store) in stores.into_iter().enumerate() {
        let by_seq = by_seq.clone();
        gaters.spawn(async move {
            let owner = LeaseOwner::named(format!("gater-{n}"));
            loop {
                let taken = store.take_ungated(&owner, LEASE, 1).await.expect("take");
                let Some(u) = taken.first() else { break };
                let v = by_seq[&u.seq];
                let version = format!(
                    "2024-05-02T{:02}:{:02}:{:02}Z",
                    v / 3600,
                    v / 60 % 60,
                    v % 60
                );
                let gate = label_gate(u.seq, "label:R", &version, Change::Updated, FRESH_TO);
                store.record_gates(vec![gate]).await.expect("gate");
            }
        });
    }
    while let Some(done) = gaters.join_next().await {
        done.expect("gater");
    }
    // Handing on in lane order, the versions only ever grow and end at the newest.
    let mut seen = Vec::new();
    loop {
        let claimed = claim(h, "runner").await;
        assert!(claimed.len() <= 1, "one head per entity at a time");
        let Some(c) = claimed.into_iter().next() else {
            break;
        };
        seen.push(by_seq[&c.seq]);
        let now = h.clock.now();
        h.store
            .record_attempts(
                c.seq,
                &LeaseOwner::named("runner"),
                &[ok("archive", 1, now)],
            )
            .await
            .expect("record");
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "out of order: {seen:?}"
    );
    assert_eq!(seen.last(), Some(&NEWEST), "ends at the newest: {seen:?}");
}

// --- lanes, leases, retries -----------------------------------------------------------------

pub async fn only_the_head_of_an_entity_lane_is_due(h: &Harness) {
    let mut seqs = Vec::new();
    for (n, id) in ["a1", "a2", "b1"].iter().enumerate() {
        seqs.push(h.accept(id, "LABEL_UPDATED", &body(n)).await.seq);
    }
    h.gate_all(|seq| {
        let (entity, version) = match seqs.iter().position(|s| *s == seq) {
            Some(0) => ("label:A", "2024-05-02T08:00:01Z"),
            Some(1) => ("label:A", "2024-05-02T08:00:02Z"),
            _ => ("label:B", "2024-05-02T08:00:01Z"),
        };
        label_gate(seq, entity, version, Change::Updated, FRESH_TO)
    })
    .await;
    let first = claim(h, "w").await;
    let claimed: Vec<i64> = first.iter().map(|c| c.seq).collect();
    assert_eq!(
        claimed,
        [seqs[0], seqs[2]],
        "a2 waits behind a1; B does not wait"
    );
    assert_eq!(first[0].runs.len(), 1);
    assert_eq!(first[0].runs[0].handler, "archive");
    assert!(
        claim(h, "w2").await.is_empty(),
        "a2 is not due while a1 runs"
    );
    let now = h.clock.now();
    h.store
        .record_attempts(seqs[0], &LeaseOwner::named("w"), &[ok("archive", 1, now)])
        .await
        .expect("record");
    let next: Vec<i64> = claim(h, "w").await.iter().map(|c| c.seq).collect();
    assert_eq!(next, [seqs[1]], "a2 is promoted once a1 is done");
    assert_eq!(status_of(h, "a1").await, [Status::Delivered]);
}

/// Five deliveries of entity A (the fourth for two handlers) and one of B, gated in order;
/// their sequence numbers.
async fn busy_lane(h: &Harness) -> Vec<i64> {
    let mut seqs = Vec::new();
    for (n, id) in ["a1", "a2", "a3", "a4", "a5", "b1"].iter().enumerate() {
        seqs.push(h.accept(id, "LABEL_UPDATED", &body(n)).await.seq);
    }
    let lane = seqs.clone();
    h.gate_all(|seq| {
        let n = lane.iter().position(|s| *s == seq).unwrap_or(5);
        let entity = if n == 5 { "label:B" } else { "label:A" };
        let version = format!("2024-05-02T08:00:0{n}Z");
        let handlers: &[&str] = if n == 3 {
            &["archive", "audit"]
        } else {
            FRESH_TO
        };
        label_gate(seq, entity, &version, Change::Updated, handlers)
    })
    .await;
    seqs
}

fn seqs_of(claimed: &[Claimed]) -> Vec<i64> {
    claimed.iter().map(|c| c.seq).collect()
}

pub async fn a_busy_lane_is_claimed_as_a_chain_and_recorded_in_lane_order(h: &Harness) {
    let seqs = busy_lane(h).await;
    let owner = LeaseOwner::named("w");
    let heads = h.store.claim(&owner, LEASE, 10, 10).await.expect("claim");
    assert_eq!(
        seqs_of(&heads),
        [seqs[0], seqs[5]],
        "only lane heads are claimed"
    );
    assert_eq!(
        seqs_of(&heads[0].chain),
        [seqs[1], seqs[2]],
        "a2 and a3 come with a1; a4 waits for a second handler, so the chain ends before it"
    );
    assert!(heads[0]
        .chain
        .iter()
        .all(|c| c.runs.len() == 1 && c.runs[0].handler == "archive" && c.runs[0].attempts == 0));
    let chained = heads[0].chain[1].body.read_all().await.expect("body");
    assert_eq!(
        chained,
        Bytes::from(body(2)),
        "a chain member comes with its own body"
    );
    assert!(heads[1].chain.is_empty(), "B has nothing behind it");
    assert!(
        h.other()
            .claim(&LeaseOwner::named("w2"), LEASE, 10, 10)
            .await
            .expect("claim")
            .is_empty(),
        "the chain is leased with its head"
    );

    // a1 handled, a2 failed (to be retried), a3 not tried.
    let now = h.clock.now();
    let retry = AttemptOutcome::Retry {
        next_at: now + 10_000,
        error: "disk full".to_owned(),
    };
    let records = [
        ChainRecord {
            seq: seqs[0],
            results: vec![ok("archive", 1, now)],
        },
        ChainRecord {
            seq: seqs[1],
            results: vec![result("archive", 1, now, retry)],
        },
        ChainRecord {
            seq: seqs[2],
            results: Vec::new(),
        },
    ];
    h.store
        .record_chain(&owner, &records)
        .await
        .expect("record chain");
    assert_eq!(status_of(h, "a1").await, [Status::Delivered]);
    assert_eq!(status_of(h, "a2").await, [Status::Pending]);
    assert_eq!(status_of(h, "a3").await, [Status::Pending]);
    let a2 = h.store.show("a2").await.expect("show");
    assert_eq!(a2[0].attempts.len(), 1, "a2's failed attempt is kept");
    assert!(
        h.store.show("a3").await.expect("show")[0]
            .attempts
            .is_empty(),
        "a3 was not tried"
    );
    assert!(
        seqs_of(&claim(h, "w").await).is_empty(),
        "a2 is not due before its retry; a3 still waits behind it"
    );

    // The retry comes due: a2 heads the lane with a3 behind it again.
    h.clock.advance(Duration::from_secs(10));
    let again = h.store.claim(&owner, LEASE, 10, 10).await.expect("claim");
    assert_eq!(seqs_of(&again), [seqs[1]]);
    assert_eq!(again[0].runs[0].attempts, 1, "the earlier attempt counts");
    assert_eq!(seqs_of(&again[0].chain), [seqs[2]]);
    assert_eq!(again[0].chain[0].runs[0].attempts, 0);
    let now = h.clock.now();
    let records = [
        ChainRecord {
            seq: seqs[1],
            results: vec![ok("archive", 2, now)],
        },
        ChainRecord {
            seq: seqs[2],
            results: vec![ok("archive", 1, now)],
        },
    ];
    h.store
        .record_chain(&owner, &records)
        .await
        .expect("record chain");
    assert_eq!(status_of(h, "a2").await, [Status::Delivered]);
    assert_eq!(status_of(h, "a3").await, [Status::Delivered]);
    let fourth = h.store.claim(&owner, LEASE, 10, 10).await.expect("claim");
    assert_eq!(
        seqs_of(&fourth),
        [seqs[3]],
        "a4 heads the lane after the chain"
    );
    assert_eq!(fourth[0].runs.len(), 2);
    assert!(
        fourth[0].chain.is_empty(),
        "a head with two runs due brings no chain"
    );
}

pub async fn a_chain_whose_lease_ran_out_is_not_recorded_by_its_old_holder(h: &Harness) {
    let seqs = busy_lane(h).await;
    let (a, b) = (LeaseOwner::named("a"), LeaseOwner::named("b"));
    let first = h.store.claim(&a, LEASE, 10, 1).await.expect("claim");
    assert_eq!(seqs_of(&first[0].chain), [seqs[1]], "chain_max is kept to");
    h.clock.advance(LEASE * 2);
    let taken = h.other().claim(&b, LEASE, 10, 10).await.expect("claim");
    assert_eq!(seqs_of(&taken[0].chain), [seqs[1], seqs[2]]);
    let now = h.clock.now();
    let late = h
        .store
        .record_chain(
            &a,
            &[
                ChainRecord {
                    seq: seqs[0],
                    results: vec![ok("archive", 1, now)],
                },
                ChainRecord {
                    seq: seqs[1],
                    results: vec![ok("archive", 1, now)],
                },
            ],
        )
        .await;
    assert!(matches!(late, Err(StoreError::LeaseLost(_))), "{late:?}");
    assert_eq!(status_of(h, "a1").await, [Status::Pending]);
    assert_eq!(status_of(h, "a2").await, [Status::Pending]);
    let records: Vec<ChainRecord> = seqs[..3]
        .iter()
        .map(|&seq| ChainRecord {
            seq,
            results: vec![ok("archive", 1, now)],
        })
        .collect();
    h.other()
        .record_chain(&b, &records)
        .await
        .expect("the new holder records");
    for id in ["a1", "a2", "a3"] {
        assert_eq!(status_of(h, id).await, [Status::Delivered], "{id}");
    }
    let next = claim(h, "b").await;
    assert_eq!(
        seqs_of(&next),
        [seqs[3]],
        "a4 heads the lane after the chain"
    );
}

pub async fn a_lease_keeps_others_out_until_it_runs_out_and_then_its_holder_cannot_record(
    h: &Harness,
) {
    let seq = h.accept("l1", "LABEL_UPDATED", &body(1)).await.seq;
    h.gate_all(|s| {
        label_gate(
            s,
            "label:L",
            "2024-05-02T08:00:01Z",
            Change::Updated,
            FRESH_TO,
        )
    })
    .await;
    let (a, b) = (LeaseOwner::named("a"), LeaseOwner::named("b"));
    assert_eq!(
        h.store.claim(&a, LEASE, 10, 0).await.expect("claim").len(),
        1
    );
    assert!(h
        .other()
        .claim(&b, LEASE, 10, 0)
        .await
        .expect("claim")
        .is_empty());

    // Renewed by its holder, a lease outlives its first term; nobody else can renew it.
    h.clock.advance(LEASE / 2);
    assert_eq!(
        h.store.renew(&a, &[seq], LEASE).await.expect("renew"),
        [seq]
    );
    assert!(h
        .other()
        .renew(&b, &[seq], LEASE)
        .await
        .expect("renew")
        .is_empty());
    h.clock.advance(LEASE * 3 / 4);
    assert!(
        h.other()
            .claim(&b, LEASE, 10, 0)
            .await
            .expect("claim")
            .is_empty(),
        "a renewed lease is live"
    );

    // Not renewed any more (its holder died): taken over once it runs out.
    h.clock.advance(LEASE);
    let taken = h.other().claim(&b, LEASE, 10, 0).await.expect("claim");
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].runs[0].attempts, 0);
    let now = h.clock.now();
    let late = h
        .store
        .record_attempts(seq, &a, &[ok("archive", 1, now)])
        .await;
    assert!(
        matches!(late, Err(StoreError::LeaseLost(s)) if s == seq),
        "{late:?}"
    );
    assert!(h
        .store
        .renew(&a, &[seq], LEASE)
        .await
        .expect("renew")
        .is_empty());
    h.other()
        .record_attempts(seq, &b, &[ok("archive", 1, now)])
        .await
        .expect("the new holder records");
    assert_eq!(status_of(h, "l1").await, [Status::Delivered]);
}

/// Handlers finish at the same moment and their outcomes are recorded together (a back-end may
/// write them in one transaction): one whose lease was taken over meanwhile is refused alone,
/// and every other is recorded.
pub async fn a_lost_lease_fails_only_its_own_record_among_records_made_at_once(h: &Harness) {
    const N: usize = 12;
    for n in 0..N {
        h.accept(&format!("m{n}"), "LABEL_UPDATED", &body(n)).await;
    }
    h.gate_all(|s| {
        label_gate(
            s,
            &format!("label:M{s}"),
            "2024-05-02T08:00:01Z",
            Change::Updated,
            FRESH_TO,
        )
    })
    .await;
    let a = LeaseOwner::named("a");
    let claimed = h.store.claim(&a, LEASE, 100, 0).await.expect("claim");
    assert_eq!(claimed.len(), N);
    // a's leases run out; b takes one of them over.
    h.clock.advance(LEASE + Duration::from_secs(1));
    let b = LeaseOwner::named("b");
    let taken = h.other().claim(&b, LEASE, 1, 0).await.expect("claim");
    assert_eq!(taken.len(), 1);
    let lost = taken[0].seq;
    let now = h.clock.now();
    let mut records = tokio::task::JoinSet::new();
    for c in &claimed {
        let (store, owner, seq) = (h.store.clone(), a.clone(), c.seq);
        records.spawn(async move {
            let recorded = store
                .record_attempts(seq, &owner, &[ok("archive", 1, now)])
                .await;
            (seq, recorded)
        });
    }
    while let Some(done) = records.join_next().await {
        let (seq, recorded) = done.expect("task");
        if seq == lost {
            assert!(
                matches!(recorded, Err(StoreError::LeaseLost(s)) if s == lost),
                "{recorded:?}"
            );
        } else {
            assert_eq!(recorded.expect("recorded"), Status::Delivered, "seq {seq}");
        }
    }
    let delivered = h
        .store
        .list(&ListQuery {
            status: Some(Status::Delivered),
            ..all()
        })
        .await
        .expect("list");
    assert_eq!(delivered.len(), N - 1, "every record but the lost one");
    assert_eq!(h.store.queue_depth().await.expect("depth"), 1);
    h.other()
        .record_attempts(lost, &b, &[ok("archive", 1, now)])
        .await
        .expect("the new holder records");
    assert_eq!(h.store.queue_depth().await.expect("depth"), 0);
}

pub async fn a_retry_is_due_only_at_its_time_and_its_attempts_are_kept(h: &Harness) {
    let seq = h.accept("r1", "LABEL_UPDATED", &body(1)).await.seq;
    h.gate_all(|s| {
        label_gate(
            s,
            "label:R",
            "2024-05-02T08:00:01Z",
            Change::Updated,
            FRESH_TO,
        )
    })
    .await;
    let owner = LeaseOwner::named("w");
    assert_eq!(claim(h, "w").await.len(), 1);
    let now = h.clock.now();
    let retry = AttemptOutcome::Retry {
        next_at: now + 10_000,
        error: "503 from downstream".to_owned(),
    };
    let status = h
        .store
        .record_attempts(seq, &owner, &[result("archive", 1, now, retry)])
        .await
        .expect("record");
    assert_eq!(status, Status::Pending);
    assert!(claim(h, "w").await.is_empty(), "not due before its time");
    h.clock.advance(Duration::from_secs(10));
    let again = claim(h, "w").await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].runs[0].attempts, 1, "the earlier attempt counts");
    let now = h.clock.now();
    h.store
        .record_attempts(seq, &owner, &[ok("archive", 2, now)])
        .await
        .expect("record");
    let shown = h.store.show("r1").await.expect("show");
    let detail = &shown[0];
    assert_eq!(detail.summary.status, Status::Delivered);
    assert_eq!(detail.handlers[0].state, RunState::Done);
    assert_eq!(detail.handlers[0].attempts, 2);
    assert_eq!(
        detail.handlers[0].last_error.as_deref(),
        Some("503 from downstream")
    );
    let outcomes: Vec<AttemptKind> = detail.attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, [AttemptKind::Retry, AttemptKind::Ok]);
}

pub async fn a_dead_letter_frees_its_lane_and_replay_sends_it_through_the_gate_again(h: &Harness) {
    let first = h.accept("x1", "LABEL_UPDATED", &body(1)).await.seq;
    let second = h.accept("x2", "LABEL_UPDATED", &body(2)).await.seq;
    let two_handlers: &[&str] = &["archive", "forward"];
    h.gate_all(|s| {
        let version = if s == first {
            "2024-05-02T08:00:01Z"
        } else {
            "2024-05-02T08:00:02Z"
        };
        label_gate(s, "label:X", version, Change::Updated, two_handlers)
    })
    .await;
    let owner = LeaseOwner::named("w");
    assert_eq!(claim(h, "w").await.len(), 1);
    let now = h.clock.now();
    let dead = AttemptOutcome::Dead {
        error: "404".to_owned(),
    };
    let status = h
        .store
        .record_attempts(
            first,
            &owner,
            &[ok("archive", 1, now), result("forward", 1, now, dead)],
        )
        .await
        .expect("record");
    assert_eq!(status, Status::Dead);
    let next = claim(h, "w").await;
    assert_eq!(next.iter().map(|c| c.seq).collect::<Vec<_>>(), [second]);
    assert_eq!(next[0].runs.len(), 2);

    // The replay leaves x2 (being handled) alone and puts x1 back before the gate.
    let replayed = h
        .store
        .replay(&ReplayTarget::Status(Status::Dead))
        .await
        .expect("replay");
    assert_eq!((replayed.replayed, replayed.running), (1, 0));
    let running = h
        .store
        .replay(&ReplayTarget::DeliveryId("x2".to_owned()))
        .await
        .expect("replay");
    assert_eq!((running.replayed, running.running), (0, 1));
    assert_eq!(status_of(h, "x1").await, [Status::Pending]);
    let shown = h.store.show("x1").await.expect("show");
    let runs: Vec<(String, RunState)> = shown[0]
        .handlers
        .iter()
        .map(|r| (r.handler.clone(), r.state))
        .collect();
    assert_eq!(
        runs,
        [("archive".to_owned(), RunState::Done)],
        "done runs stay done"
    );

    // x2 (newer) is applied meanwhile, so the replayed x1 comes back stale.
    let now = h.clock.now();
    h.store
        .record_attempts(
            second,
            &owner,
            &[ok("archive", 1, now), ok("forward", 1, now)],
        )
        .await
        .expect("record");
    let regated = h
        .gate_all(|s| {
            label_gate(
                s,
                "label:X",
                "2024-05-02T08:00:01Z",
                Change::Updated,
                two_handlers,
            )
        })
        .await;
    assert_eq!(regated, [(first, Some(Verdict::Stale))]);
    assert_eq!(status_of(h, "x1").await, [Status::Stale]);
    assert_eq!(h.store.queue_depth().await.expect("depth"), 0);
}

/// A server that stops (or dies) with work left finds all of it when it starts again: what
/// waited for the gate, a retry at its time, and a delivery waiting in its lane behind it.
pub async fn work_left_when_the_store_is_reopened_is_taken_up(h: &Harness) {
    let a1 = h.accept("a1", "LABEL_UPDATED", &body(1)).await.seq;
    let a2 = h.accept("a2", "LABEL_UPDATED", &body(2)).await.seq;
    h.gate_all(|seq| {
        let version = if seq == a1 {
            "2024-05-02T08:00:01Z"
        } else {
            "2024-05-02T08:00:02Z"
        };
        label_gate(seq, "label:A", version, Change::Updated, FRESH_TO)
    })
    .await;
    let b1 = h.accept("b1", "LABEL_UPDATED", &body(3)).await.seq;
    assert_eq!(seqs_of(&claim(h, "w").await), [a1]);
    let now = h.clock.now();
    let retry = AttemptOutcome::Retry {
        next_at: now + 10_000,
        error: "503 from downstream".to_owned(),
    };
    h.store
        .record_attempts(
            a1,
            &LeaseOwner::named("w"),
            &[result("archive", 1, now, retry)],
        )
        .await
        .expect("record");

    let store = h.reopened().await;
    let owner = LeaseOwner::named("after");
    assert_eq!(store.queue_depth().await.expect("depth"), 3);
    let ungated = store.take_ungated(&owner, LEASE, 10).await.expect("take");
    assert_eq!(ungated.iter().map(|u| u.seq).collect::<Vec<_>>(), [b1]);
    assert_eq!(
        ungated[0].body.read_all().await.expect("body"),
        Bytes::from(body(3)),
        "its body comes with it"
    );
    assert!(
        store
            .claim(&owner, LEASE, 10, 0)
            .await
            .expect("claim")
            .is_empty(),
        "a1 waits for its retry, a2 behind it"
    );
    h.clock.advance(Duration::from_secs(10));
    let retried = store.claim(&owner, LEASE, 10, 0).await.expect("claim");
    assert_eq!(seqs_of(&retried), [a1]);
    assert_eq!(retried[0].runs[0].attempts, 1, "the earlier attempt counts");
    let now = h.clock.now();
    store
        .record_attempts(a1, &owner, &[ok("archive", 2, now)])
        .await
        .expect("record");
    assert_eq!(
        seqs_of(&store.claim(&owner, LEASE, 10, 0).await.expect("claim")),
        [a2]
    );
    store.close().await;
}

pub async fn a_replica_is_woken_when_another_accepts(h: &Harness) {
    h.wait_until_listening().await;
    let other = h.other();
    // Use up any wake-up left from before (a listener announces its own start).
    other.wait_for_work(Duration::from_millis(100)).await;
    other.wait_for_work(Duration::from_millis(100)).await;
    let waiting = tokio::spawn(async move {
        other.wait_for_work(Duration::from_secs(600)).await;
    });
    h.accept("wake", "LABEL_UPDATED", &body(1)).await;
    tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("woken by the accept, not by the 600 s timeout")
        .expect("task");
}

pub async fn queue_depth_counts_what_is_not_finished(h: &Harness) {
    assert_eq!(h.store.queue_depth().await.expect("depth"), 0);
    for n in 0..3 {
        h.accept(&format!("q{n}"), "LABEL_UPDATED", &body(n)).await;
    }
    assert_eq!(
        h.store.queue_depth().await.expect("depth"),
        3,
        "not gated yet"
    );
    h.gate_all(|s| {
        label_gate(
            s,
            "label:Q",
            "2024-05-02T08:00:01Z",
            Change::Updated,
            FRESH_TO,
        )
    })
    .await;
    // One head due, two waiting behind it (same entity, same version: re-applications).
    assert_eq!(h.store.queue_depth().await.expect("depth"), 3);
    let owner = LeaseOwner::named("w");
    for _ in 0..3 {
        let c = claim(h, "w").await;
        let now = h.clock.now();
        h.store
            .record_attempts(c[0].seq, &owner, &[ok("archive", 1, now)])
            .await
            .expect("record");
    }
    assert_eq!(h.store.queue_depth().await.expect("depth"), 0);
}

/// The age an operator is paged on: the oldest delivery not gated, due, retrying or waiting in
/// its lane; not one that is finished or dead.
pub async fn oldest_unfinished_is_the_oldest_delivery_with_work_left(h: &Harness) {
    assert_eq!(h.store.oldest_unfinished().await.expect("oldest"), None);
    let t0 = h.clock.now();
    h.accept("o0", "LABEL_UPDATED", &body(0)).await;
    h.clock.advance(Duration::from_secs(10));
    h.accept("o1", "LABEL_UPDATED", &body(1)).await;
    assert_eq!(
        h.store.oldest_unfinished().await.expect("oldest"),
        Some(t0),
        "not gated yet"
    );
    h.gate_all(|s| {
        label_gate(
            s,
            "label:O",
            "2024-05-02T08:00:01Z",
            Change::Updated,
            FRESH_TO,
        )
    })
    .await;
    // o0 is due, o1 waits behind it in the lane.
    assert_eq!(h.store.oldest_unfinished().await.expect("oldest"), Some(t0));
    let owner = LeaseOwner::named("w");
    let first = claim(h, "w").await;
    let now = h.clock.now();
    let dead = AttemptOutcome::Dead {
        error: "gone".to_owned(),
    };
    h.store
        .record_attempts(first[0].seq, &owner, &[result("archive", 1, now, dead)])
        .await
        .expect("record");
    assert_eq!(
        h.store.oldest_unfinished().await.expect("oldest"),
        Some(t0 + 10_000),
        "a dead letter has no work left; the one behind it has"
    );
    let second = claim(h, "w").await;
    h.store
        .record_attempts(second[0].seq, &owner, &[ok("archive", 1, now)])
        .await
        .expect("record");
    assert_eq!(h.store.oldest_unfinished().await.expect("oldest"), None);
}

/// The id of the request that brought a delivery goes with it: to the gate, to the handlers'
/// claim, and to `events show`.
pub async fn the_request_id_goes_with_the_delivery(h: &Harness) {
    h.accept("r1", "LABEL_UPDATED", &body(1)).await;
    let expected = Some(crate::harness::request_id_of("r1"));
    let taken = h
        .store
        .take_ungated(&LeaseOwner::named("g"), LEASE, 10)
        .await
        .expect("take");
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].delivery_id, "r1");
    assert_eq!(taken[0].request_id, expected);
    h.clock.advance(LEASE + Duration::from_secs(1));
    h.gate_all(|s| {
        label_gate(
            s,
            "label:R",
            "2024-05-02T08:00:01Z",
            Change::Updated,
            FRESH_TO,
        )
    })
    .await;
    let claimed = claim(h, "w").await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].request_id, expected);
    let shown = h.store.show("r1").await.expect("show");
    assert_eq!(shown[0].request_id, expected);
}

/// Gate requests for deliveries no route wants: delivered at once, nothing to claim.
pub async fn a_delivery_no_route_wants_is_delivered_without_a_claim(h: &Harness) {
    h.accept("n1", "LABEL_UPDATED", &body(1)).await;
    let plan = |seq| GateRequest {
        handlers_if_fresh: Vec::new(),
        ..label_gate(seq, "label:N", "2024-05-02T08:00:01Z", Change::Updated, &[])
    };
    h.gate_all(plan).await;
    assert_eq!(status_of(h, "n1").await, [Status::Delivered]);
    assert!(claim(h, "w").await.is_empty());
}

// --- retention ------------------------------------------------------------------------------

const DAY: Duration = Duration::from_secs(24 * 3600);

fn retention(max_body_bytes: Option<u64>) -> RetentionSettings {
    RetentionSettings {
        delivered: DAY * 10,
        bodies: DAY * 3,
        investigate: DAY * 30,
        max_body_bytes,
        ..RetentionSettings::default()
    }
}

async fn prune_now(h: &Harness, settings: &RetentionSettings) -> PruneReport {
    let cutoffs = Cutoffs::at(h.clock.now(), settings);
    let stop = CancellationToken::new();
    let dry =
        labelhook::test_support::store::retention::prune(h.store.as_ref(), &cutoffs, true, &stop)
            .await
            .expect("dry run");
    let done =
        labelhook::test_support::store::retention::prune(h.store.as_ref(), &cutoffs, false, &stop)
            .await
            .expect("prune");
    assert_eq!(dry, done, "the dry run says what pruning does");
    done
}

fn deleted(report: &PruneReport, status: Status) -> u64 {
    report
        .deleted
        .iter()
        .find(|(s, _)| *s == status)
        .map_or(0, |(_, n)| *n)
}

pub async fn retention_prunes_what_is_finished_and_keeps_what_is_not_and_the_gate_state(
    h: &Harness,
) {
    let p_new = h.accept("p-new", "LABEL_UPDATED", &body(1)).await.seq;
    let pending = h.accept("q-pending", "LABEL_UPDATED", &body(2)).await.seq;
    let p_old = h.accept("p-old", "LABEL_UPDATED", &body(3)).await.seq;
    let dead = h.accept("r-dead", "LABEL_UPDATED", &body(4)).await.seq;
    h.gate_all(|seq| match seq {
        s if s == p_new => label_gate(
            s,
            "label:P",
            "2024-05-02T08:00:02Z",
            Change::Updated,
            FRESH_TO,
        ),
        s if s == p_old => label_gate(
            s,
            "label:P",
            "2024-05-02T08:00:01Z",
            Change::Updated,
            FRESH_TO,
        ),
        s if s == pending => label_gate(
            s,
            "label:Q",
            "2024-05-02T08:00:01Z",
            Change::Updated,
            FRESH_TO,
        ),
        s => label_gate(
            s,
            "label:R",
            "2024-05-02T08:00:01Z",
            Change::Updated,
            FRESH_TO,
        ),
    })
    .await;
    // p-new is handled, r-dead dead-lettered; q-pending is claimed and never recorded.
    let owner = LeaseOwner::named("w");
    for c in claim(h, "w").await {
        let now = h.clock.now();
        let outcome = match c.seq {
            s if s == p_new => AttemptOutcome::Ok,
            s if s == dead => AttemptOutcome::Dead {
                error: "404".to_owned(),
            },
            _ => continue,
        };
        h.store
            .record_attempts(c.seq, &owner, &[result("archive", 1, now, outcome)])
            .await
            .expect("record");
    }
    assert_eq!(status_of(h, "p-old").await, [Status::Stale]);
    let stats = h.store.stats().await.expect("stats");
    let body_bytes = stats.body_bytes;
    assert_eq!(
        body_bytes,
        (1..=4).map(|n| body(n).len() as u64).sum::<u64>()
    );

    let settings = retention(None);
    // Nothing is old enough yet.
    assert!(prune_now(h, &settings).await.is_empty());

    // Past the bodies' retention: the delivered body goes, its row stays.
    h.clock.advance(DAY * 4);
    let report = prune_now(h, &settings).await;
    assert_eq!((report.deleted_total(), report.bodies_dropped), (0, 1));
    let shown = h.store.show("p-new").await.expect("show");
    assert!(shown[0].body_pruned);
    assert_eq!(shown[0].summary.status, Status::Delivered);

    // Past the delivered rows' retention: p-new goes; stale, dead and pending stay.
    h.clock.advance(DAY * 7);
    let report = prune_now(h, &settings).await;
    assert_eq!(deleted(&report, Status::Delivered), 1);
    assert_eq!(report.deleted_total(), 1);
    assert!(h.store.show("p-new").await.expect("show").is_empty());
    assert_eq!(status_of(h, "p-old").await, [Status::Stale]);
    assert_eq!(status_of(h, "r-dead").await, [Status::Dead]);

    // Past the investigation window: stale and dead go too; pending never does.
    h.clock.advance(DAY * 30);
    let report = prune_now(h, &settings).await;
    assert_eq!(deleted(&report, Status::Stale), 1);
    assert_eq!(deleted(&report, Status::Dead), 1);
    assert_eq!(status_of(h, "q-pending").await, [Status::Pending]);
    assert_eq!(h.store.queue_depth().await.expect("depth"), 1);
    let stats = h.store.stats().await.expect("stats");
    assert_eq!(stats.body_bytes, body(2).len() as u64);
    assert_eq!(stats.deliveries, [(Status::Pending, 1)]);

    // The gate still remembers label P at 08:00:02: an older event stays stale.
    let late = h.accept("p-late", "LABEL_UPDATED", &body(5)).await.seq;
    let verdicts = h
        .gate_all(|s| {
            label_gate(
                s,
                "label:P",
                "2024-05-02T08:00:01Z",
                Change::Updated,
                FRESH_TO,
            )
        })
        .await;
    assert_eq!(verdicts, [(late, Some(Verdict::Stale))]);
}

pub async fn a_body_budget_drops_the_oldest_finished_bodies_first(h: &Harness) {
    let mut seqs = Vec::new();
    for n in 0..6 {
        seqs.push(
            h.accept(&format!("b{n}"), "LABEL_UPDATED", &[b'x'; 1000])
                .await
                .seq,
        );
        h.clock.advance(Duration::from_secs(1));
    }
    // All delivered at once (no route wants them), the last one left pending.
    let last = seqs[5];
    h.gate_all(|s| {
        let handlers: &[&str] = if s == last { FRESH_TO } else { &[] };
        label_gate(
            s,
            &format!("label:B{s}"),
            "2024-05-02T08:00:01Z",
            Change::Updated,
            handlers,
        )
    })
    .await;
    // Keep at most 2,500 bytes of bodies: of 6,000, the oldest finished ones go until 2,000
    // are left (the pending one is not finished, so it keeps its body).
    let report = prune_now(h, &retention(Some(2_500))).await;
    assert_eq!((report.deleted_total(), report.bodies_dropped), (0, 4));
    assert_eq!(report.body_bytes, 4_000);
    for (n, seq) in seqs.iter().enumerate() {
        let shown = h.store.show(&format!("b{n}")).await.expect("show");
        assert_eq!(shown[0].summary.seq, *seq);
        assert_eq!(shown[0].body_pruned, n < 4, "b{n}");
    }
    assert_eq!(h.store.stats().await.expect("stats").body_bytes, 2_000);
}

pub async fn retention_removes_large_bodies_from_the_body_store(h: &Harness) {
    let large = vec![b'y'; 3_000_000];
    let mut writer = h.store.bodies().create().await.expect("create");
    writer
        .write(Bytes::from(large.clone()))
        .await
        .expect("write");
    let staged = writer.finish().await.expect("finish");
    let delivery = verified(
        "big-old",
        "LABEL_UPDATED",
        &large,
        IncomingBody::Staged(staged),
    );
    h.store.accept(delivery).await.expect("accept");
    h.gate_all(|s| label_gate(s, "label:BIG", "2024-05-02T08:00:01Z", Change::Updated, &[]))
        .await;
    let before = h.store.stats().await.expect("stats").body_bytes;
    assert_eq!(before, large.len() as u64);
    h.clock.advance(DAY * 11);
    let report = prune_now(h, &retention(None)).await;
    assert_eq!(report.body_bytes, large.len() as u64);
    assert_eq!(h.store.stats().await.expect("stats").body_bytes, 0);
}
