//! The store conformance suite: every rule in [`rules`] runs against every back-end, each test
//! on a store of its own (SQLite: a temporary directory; PostgreSQL: a database of its own on
//! the server `LABELHOOK_TEST_POSTGRES` names, skipped with a printed reason where there is none,
//! and a failure instead when `LABELHOOK_REQUIRE_SERVICES=1`).

mod harness;
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
    a_delivery_taken_for_gating_is_taken_by_no_one_else_until_its_lease_runs_out,
    the_gate_applies_newer_versions_and_keeps_older_ones_as_stale,
    a_delete_is_final_and_outranks_an_update_at_the_same_version,
    two_replicas_gating_one_entity_at_once_hand_it_on_in_version_order,
    only_the_head_of_an_entity_lane_is_due,
    a_lease_keeps_others_out_until_it_runs_out_and_then_its_holder_cannot_record,
    a_retry_is_due_only_at_its_time_and_its_attempts_are_kept,
    a_dead_letter_frees_its_lane_and_replay_sends_it_through_the_gate_again,
    a_replica_is_woken_when_another_accepts,
    queue_depth_counts_what_is_not_finished,
    a_delivery_no_route_wants_is_delivered_without_a_claim,
);
