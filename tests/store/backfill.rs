//! What `labelhook labelbox backfill` needs of every back-end, through the handle the CLI opens
//! beside a running server: its deliveries stored with their origin and each id only once,
//! the gate's rule 7 for them, and the two questions it asks first.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use labelhook::ordering::{Change, Verdict};
use labelhook::test_support::delivery::{Clock, Origin};
use labelhook::test_support::labelbox::fetched_delivery;
use labelhook::test_support::store::{GateRequest, ListQuery, ReplayEffect, ReplayTarget};

use crate::harness::{label_gate, Harness, LEASE};

fn all() -> ListQuery {
    ListQuery {
        limit: 1000,
        ..ListQuery::default()
    }
}

fn fetched(id: &str, body: &str, at: i64) -> labelhook::test_support::delivery::VerifiedDelivery {
    fetched_delivery(
        id,
        "LABEL_UPDATED",
        Bytes::from(body.to_owned()),
        "labelbox",
        at,
        "task-1",
    )
}

pub async fn a_fetched_delivery_is_kept_with_its_origin_and_each_id_only_once(h: &Harness) {
    let now = h.clock.now();
    h.accept("w1", "LABEL_UPDATED", b"{\"n\":0}").await;
    let stored = h
        .cli
        .accept_fetched(vec![
            fetched("b1", "{\"n\":1}", now),
            fetched("b2", "{\"n\":2}", now),
        ])
        .await
        .expect("accept");
    assert!(stored.iter().all(Option::is_some), "{stored:?}");
    // Again, with other bodies (an export's signed URLs change every time): nothing new.
    let again = h
        .cli
        .accept_fetched(vec![
            fetched("b1", "{\"n\":11}", now),
            fetched("b3", "{\"n\":3}", now),
        ])
        .await
        .expect("accept again");
    assert_eq!(again[0], None, "b1 is stored already");
    assert!(again[1].is_some());
    let rows = h.store.list(&all()).await.expect("list");
    let origins: BTreeSet<(String, Origin)> = rows
        .iter()
        .map(|r| (r.delivery_id.clone(), r.origin))
        .collect();
    assert_eq!(
        origins,
        [
            ("b1".to_owned(), Origin::Backfill),
            ("b2".to_owned(), Origin::Backfill),
            ("b3".to_owned(), Origin::Backfill),
            ("w1".to_owned(), Origin::Webhook),
        ]
        .into_iter()
        .collect()
    );
    let shown = h.store.show("b1").await.expect("show");
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0].body.read_all().await.expect("body"), "{\"n\":1}");
    assert!(shown[0]
        .headers
        .contains(&("x-labelhook-origin".to_owned(), "backfill".to_owned())));
    // The server's dispatcher finds them with their origin, to gate them by rule 7: at once
    // on a shared back-end, within its next look at what another process appended on SQLite.
    let owner = labelhook::test_support::store::LeaseOwner::named("g");
    let mut backfilled = 0;
    for _ in 0..50 {
        let ungated = h
            .store
            .take_ungated(&owner, LEASE, 100)
            .await
            .expect("take");
        backfilled = ungated
            .iter()
            .filter(|u| u.origin == Origin::Backfill)
            .count();
        if backfilled == 3 {
            break;
        }
        h.store.wait_for_work(Duration::from_millis(100)).await;
    }
    assert_eq!(backfilled, 3);
}

/// Gate requests for `label:L` at `version`, the origin as the dispatcher passes it on.
fn gate(seq: i64, version: &str, origin: Origin) -> GateRequest {
    GateRequest {
        origin,
        ..label_gate(seq, "label:L", version, Change::Updated, &[])
    }
}

pub async fn a_backfill_is_applied_only_when_newer_than_what_a_webhook_applied(h: &Harness) {
    let webhook = h.accept("w", "LABEL_UPDATED", b"{}").await.seq;
    h.gate_all(|s| gate(s, "2024-05-02T08:00:10Z", Origin::Webhook))
        .await;
    let now = h.clock.now();
    let stored = h
        .cli
        .accept_fetched(vec![
            fetched("same", "{}", now),
            fetched("older", "{}", now),
            fetched("newer", "{}", now),
        ])
        .await
        .expect("accept");
    let [Some(same), Some(older), Some(newer)] = stored[..] else {
        panic!("not all stored: {stored:?}");
    };
    let verdicts = h
        .gate_all(|s| {
            let version = match s {
                s if s == older => "2024-05-02T08:00:09Z",
                s if s == newer => "2024-05-02T08:00:11Z",
                _ => "2024-05-02T08:00:10Z",
            };
            gate(s, version, Origin::Backfill)
        })
        .await;
    let verdict = |seq| {
        verdicts
            .iter()
            .find(|(s, _)| *s == seq)
            .and_then(|(_, v)| *v)
    };
    assert_eq!(verdict(same), Some(Verdict::Stale), "a webhook brought it");
    assert_eq!(verdict(older), Some(Verdict::Stale));
    assert_eq!(verdict(newer), Some(Verdict::Fresh));
    assert!(webhook < same);

    // Its own state, replayed (after a dead letter, say), is handed on again.
    let target = ReplayTarget::DeliveryId("newer".to_owned());
    let preview = h.store.replay_preview(&target).await.expect("preview");
    assert!(
        !matches!(preview[0].effect, ReplayEffect::Superseded { .. }),
        "{:?}",
        preview[0].effect
    );
    h.store.replay(&target).await.expect("replay");
    let again = h
        .gate_all(|s| gate(s, "2024-05-02T08:00:11Z", Origin::Backfill))
        .await;
    assert_eq!(again, [(newer, Some(Verdict::Fresh))]);
    // While the same version brought again by a webhook stays a webhook's business (rule 4).
    h.clock.advance(Duration::from_secs(1));
    h.accept("w2", "LABEL_UPDATED", b"{\"w\":2}").await;
    let webhook_again = h
        .gate_all(|s| gate(s, "2024-05-02T08:00:11Z", Origin::Webhook))
        .await;
    assert_eq!(webhook_again[0].1, Some(Verdict::Fresh));
}

/// A gate request as the dispatcher makes it from a v1 label body.
fn label_event(
    seq: i64,
    topic: &str,
    project: &str,
    row: &str,
    label: &str,
    at: &str,
) -> GateRequest {
    let body = format!(
        r#"{{"id":"{label}","updatedAt":"{at}","project":{{"id":"{project}"}},"dataRow":{{"id":"{row}"}},"label":"{{}}"}}"#
    );
    let parsed = labelhook::events::parse(Some(topic), body.as_bytes()).expect("parses");
    GateRequest {
        entity: parsed.entity,
        version: parsed.version,
        change: parsed.change,
        project_id: parsed.project_id,
        event: serde_json::to_string(&parsed.event).expect("event json"),
        data_row_id: parsed.event.data_row_id().map(str::to_owned),
        labels: parsed.event.labels_named(),
        ..label_gate(seq, "-", at, Change::Updated, &[])
    }
}

pub async fn the_newest_webhook_of_a_project_and_the_labels_known_on_its_data_rows_are_found(
    h: &Harness,
) {
    assert_eq!(h.cli.newest_received("P").await.expect("newest"), None);
    // (delivery id, topic, project, data row, label, version)
    let plan: [(&str, &str, &str, &str, &str, &str); 6] = [
        (
            "a1",
            "LABEL_CREATED",
            "P",
            "D1",
            "L1",
            "2024-05-02T08:00:01Z",
        ),
        (
            "a2",
            "LABEL_CREATED",
            "P",
            "D1",
            "L2",
            "2024-05-02T08:00:02Z",
        ),
        (
            "a3",
            "LABEL_UPDATED",
            "P",
            "D2",
            "L3",
            "2024-05-02T08:00:03Z",
        ),
        (
            "a4",
            "LABEL_DELETED",
            "P",
            "D1",
            "L2",
            "2024-05-02T08:00:04Z",
        ),
        (
            "a5",
            "LABEL_CREATED",
            "P",
            "D9",
            "L9",
            "2024-05-02T08:00:05Z",
        ),
        (
            "q1",
            "LABEL_CREATED",
            "Q",
            "D1",
            "L7",
            "2024-05-02T08:00:06Z",
        ),
    ];
    let mut seqs = Vec::new();
    let mut last_p = 0;
    for (id, topic, project, ..) in plan {
        h.clock.advance(Duration::from_secs(60));
        seqs.push(h.accept(id, topic, b"{}").await.seq);
        if project == "P" {
            last_p = h.clock.now();
        }
    }
    // A backfilled delivery received later does not count as seen.
    h.clock.advance(Duration::from_secs(60));
    h.cli
        .accept_fetched(vec![fetched("b", "{}", h.clock.now())])
        .await
        .expect("accept");
    h.gate_all(|s| match seqs.iter().position(|x| *x == s) {
        Some(i) => {
            let (_, topic, project, row, label, at) = plan[i];
            label_event(s, topic, project, row, label, at)
        }
        None => GateRequest {
            project_id: Some("P".to_owned()),
            origin: Origin::Backfill,
            ..label_gate(s, "label:B", "2024-05-02T09:00:00Z", Change::Updated, &[])
        },
    })
    .await;
    assert_eq!(
        h.cli.newest_received("P").await.expect("newest"),
        Some(last_p)
    );

    let rows = ["D1".to_owned(), "D2".to_owned(), "D5".to_owned()];
    let known: BTreeSet<(String, String)> = h
        .cli
        .known_labels("P", &rows)
        .await
        .expect("known")
        .into_iter()
        .map(|k| (k.data_row_id, k.label_id))
        .collect();
    let expected = [("D1", "L1"), ("D2", "L3")]
        .iter()
        .map(|(r, l)| ((*r).to_owned(), (*l).to_owned()))
        .collect();
    assert_eq!(
        known, expected,
        "L2 was deleted, L7 is another project's, D9 not asked"
    );
}

/// An export-shaped snapshot names every label of its data row.
pub async fn a_snapshot_makes_every_label_it_lists_known(h: &Harness) {
    let body = include_bytes!("../fixtures/label_updated_v2_export.json");
    let seq = h.accept("s1", "LABEL_UPDATED", body).await.seq;
    let parsed = labelhook::events::parse(Some("LABEL_UPDATED"), body).expect("parses");
    let project = parsed.project_id.clone().expect("project");
    let label = parsed.event.label().expect("label").clone();
    let row = label.data_row_id.clone().expect("data row");
    h.gate_all(|s| GateRequest {
        entity: parsed.entity.clone(),
        version: parsed.version,
        change: parsed.change,
        project_id: parsed.project_id.clone(),
        event: serde_json::to_string(&parsed.event).expect("event json"),
        data_row_id: parsed.event.data_row_id().map(str::to_owned),
        labels: parsed.event.labels_named(),
        ..label_gate(s, "-", "2024-05-02T08:00:01Z", Change::Updated, &[])
    })
    .await;
    assert!(seq > 0);
    let known: BTreeSet<String> = h
        .cli
        .known_labels(&project, &[row])
        .await
        .expect("known")
        .into_iter()
        .map(|k| k.label_id)
        .collect();
    assert_eq!(known, label.label_ids.into_iter().collect());
}
