//! The store conformance suite: every rule in [`rules`] runs against every back-end, each test
//! on a store of its own (SQLite: a temporary directory; PostgreSQL: a database of its own on
//! the server `LABELHOOK_TEST_POSTGRES` names, skipped with a printed reason where there is none,
//! and a failure instead when `LABELHOOK_REQUIRE_SERVICES=1`).

mod backfill;
mod harness;
mod inspect;
mod migration;
mod rules;
#[path = "../common/postgres.rs"]
mod test_db;

/// One test per (back-end, rule).
macro_rules! conformance {
    ($($rule:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $rule() {
                    let h = crate::harness::Harness::sqlite().await;
                    crate::rules::$rule(&h).await;
                    h.close().await;
                }
            )+
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $rule() {
                    let Some(h) = crate::harness::Harness::postgres(stringify!($rule)).await
                    else {
                        return;
                    };
                    crate::rules::$rule(&h).await;
                    h.close().await;
                }
            )+
        }
    };
}

conformance!(
    a_delivery_is_stored_once_and_a_changed_body_is_kept_apart,
    two_replicas_accepting_one_delivery_at_once_store_it_once,
    a_large_body_is_streamed_in_and_back_whole,
    a_dropped_body_writer_leaves_nothing_to_read,
    a_delivery_is_gated_once_whoever_takes_it,
    the_gate_applies_newer_versions_and_keeps_older_ones_as_stale,
    a_delete_is_final_and_outranks_an_update_at_the_same_version,
    two_replicas_gating_one_entity_at_once_hand_it_on_in_version_order,
    only_the_head_of_an_entity_lane_is_due,
    a_busy_lane_is_claimed_as_a_chain_and_recorded_in_lane_order,
    a_chain_whose_lease_ran_out_is_not_recorded_by_its_old_holder,
    a_lease_keeps_others_out_until_it_runs_out_and_then_its_holder_cannot_record,
    a_lost_lease_fails_only_its_own_record_among_records_made_at_once,
    a_retry_is_due_only_at_its_time_and_its_attempts_are_kept,
    a_dead_letter_frees_its_lane_and_replay_sends_it_through_the_gate_again,
    work_left_when_the_store_is_reopened_is_taken_up,
    a_replica_is_woken_when_another_accepts,
    queue_depth_counts_what_is_not_finished,
    oldest_unfinished_is_the_oldest_delivery_with_work_left,
    the_request_id_goes_with_the_delivery,
    a_delivery_no_route_wants_is_delivered_without_a_claim,
    retention_prunes_what_is_finished_and_keeps_what_is_not_and_the_gate_state,
    a_body_budget_drops_the_oldest_finished_bodies_first,
    retention_removes_large_bodies_from_the_body_store,
    deliveries_are_filtered_and_paged_by_sequence_number,
    replay_says_per_delivery_what_it_does_and_does_it,
    a_delivery_being_handled_is_left_alone_by_replay_and_says_so,
    an_entity_history_is_in_version_order_with_verdicts,
    the_verdict_basis_names_what_a_stale_delivery_was_held_against,
    handler_activity_tells_each_handlers_last_success_and_recent_failures,
    the_overview_counts_by_status_and_by_when_deliveries_came,
    a_fetched_delivery_is_kept_with_its_origin_and_each_id_only_once,
    a_backfill_is_applied_only_when_newer_than_what_a_webhook_applied,
    the_newest_webhook_of_a_project_and_the_labels_known_on_its_data_rows_are_found,
    a_snapshot_makes_every_label_it_lists_known,
);

/// SQLite gives the pages retention freed back to the file system, and deletes the files of
/// large bodies with their rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_files_shrink_when_retention_prunes() {
    use std::time::Duration;

    use labelhook::ordering::Change;
    use labelhook::test_support::delivery::Clock;
    use labelhook::test_support::store::{retention, Cutoffs, RetentionSettings};

    let h = harness::Harness::sqlite().await;
    let file = h.sqlite_file().expect("a SQLite file");
    let blobs = std::path::PathBuf::from(format!("{}.blobs", file.display()));
    let body = vec![b'z'; 8 * 1024];
    for n in 0..1500 {
        h.accept(&format!("s{n}"), "LABEL_UPDATED", &body).await;
    }
    let large = vec![b'L'; 1_000_000];
    let mut writer = h.store.bodies().create().await.expect("create");
    writer
        .write(bytes::Bytes::from(large.clone()))
        .await
        .expect("write");
    let staged = writer.finish().await.expect("finish");
    let delivery = harness::verified_at(
        "s-large",
        "LABEL_UPDATED",
        &large,
        labelhook::test_support::delivery::IncomingBody::Staged(staged),
        h.clock.now(),
    );
    h.store.accept(delivery).await.expect("accept");
    h.gate_all(|s| {
        harness::label_gate(
            s,
            &format!("label:S{s}"),
            "2024-05-02T08:00:01Z",
            Change::Updated,
            &[],
        )
    })
    .await;
    let size = || std::fs::metadata(&file).map_or(0, |m| m.len());
    let blob_files = || std::fs::read_dir(&blobs).map_or(0, |d| d.count());
    // Everything on disk in the database file first (the checkpointer copies the WAL back).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while size() < 1500 * 8 * 1024 {
        assert!(
            std::time::Instant::now() < deadline,
            "never checkpointed: {}",
            size()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = size();
    assert_eq!(blob_files(), 1);

    h.clock.advance(Duration::from_secs(30 * 24 * 3600));
    let cutoffs = Cutoffs::at(h.clock.now(), &RetentionSettings::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let report = retention::prune(h.store.as_ref(), &cutoffs, false, &stop)
        .await
        .expect("prune");
    assert_eq!(report.deleted_total(), 1501);
    assert_eq!(blob_files(), 0, "the large body's file went with its row");
    // Freed pages leave the file at the next checkpoint.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while size() > before / 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the file did not shrink: {} of {before} bytes",
            size()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.close().await;
}

/// Replicas sharing PostgreSQL reserve what they take for gating, so that two of them do not
/// parse the same (possibly huge) bodies at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_reserve_what_they_take_for_gating() {
    use std::time::Duration;

    use labelhook::test_support::store::LeaseOwner;

    let Some(h) = harness::Harness::postgres("postgres_replicas_reserve").await else {
        return;
    };
    for n in 0..3 {
        h.accept(&format!("r{n}"), "LABEL_UPDATED", b"{}").await;
    }
    let (a, b) = (LeaseOwner::named("a"), LeaseOwner::named("b"));
    let lease = harness::LEASE;
    assert_eq!(
        h.store
            .take_ungated(&a, lease, 10)
            .await
            .expect("take")
            .len(),
        3
    );
    assert!(h
        .other()
        .take_ungated(&b, lease, 10)
        .await
        .expect("take")
        .is_empty());
    h.clock.advance(lease + Duration::from_secs(1));
    assert_eq!(
        h.other()
            .take_ungated(&b, lease, 10)
            .await
            .expect("take")
            .len(),
        3
    );
    h.close().await;
}
