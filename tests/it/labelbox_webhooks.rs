//! `labelhook labelbox webhooks list|apply [--dry-run]` against the stand-in: the plan, what it
//! changes and what it never touches, rotation, and the errors a user can act on.

use crate::helpers::*;
use crate::labelbox::*;
use crate::labelbox_standin::StandIn;

const ALL_LABEL_TOPICS: &str = r#"["LABEL_CREATED", "LABEL_UPDATED", "LABEL_DELETED"]"#;

fn standin_with_project() -> StandIn {
    let standin = StandIn::start();
    standin.with(|s| s.add_project(PROJECT, "standin project"));
    standin
}

fn setup(standin: &StandIn, hooks: &str) -> Setup {
    Setup::new(&base_config(&labelbox_section(standin, hooks)))
}

#[test]
fn apply_prints_its_plan_changes_nothing_on_a_dry_run_then_creates_and_has_nothing_left_to_do() {
    let standin = standin_with_project();
    let setup = setup(&standin, &project_webhook(ALL_LABEL_TOPICS, ""));

    let dry = setup.run(&["labelbox", "webhooks", "apply", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", output_text(&dry));
    let plan = stdout(&dry);
    assert!(
        plan.contains("1 to create, 0 to update, 0 to retire"),
        "{plan}"
    );
    assert!(
        plan.contains(&format!("+ create  project {PROJECT}  LABEL_CREATED,LABEL_DELETED,LABEL_UPDATED  {HOOK_URL}?labelhook_secret_id=")),
        "{plan}"
    );
    assert!(plan.contains("dry run: nothing was changed"), "{plan}");
    assert!(standin.with(|s| s.webhooks.is_empty()));
    assert!(!standin.with(|s| s.operations.iter().any(|o| o == "createWebhook")));

    let applied = setup.run(&["labelbox", "webhooks", "apply"]);
    assert_eq!(applied.status.code(), Some(0), "{}", output_text(&applied));
    assert!(
        stdout(&applied).contains("created "),
        "{}",
        stdout(&applied)
    );
    let hooks = standin.with(|s| s.webhooks.clone());
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0].project.as_deref(), Some(PROJECT));
    assert_eq!(hooks[0].status, "ACTIVE");
    assert!(hooks[0]
        .url
        .starts_with(&format!("{HOOK_URL}?labelhook_secret_id=")));
    // The endpoint's first secret (the current one) is the one Labelbox signs with.
    assert_eq!(hooks[0].secret, SECRET);
    assert!(!hooks[0].url.contains(SECRET));

    let again = setup.run(&["labelbox", "webhooks", "apply"]);
    assert_eq!(code(&again).0, Some(3), "nothing to do: {}", code(&again).1);
    assert!(
        stdout(&again).contains("nothing to do"),
        "{}",
        stdout(&again)
    );
    assert_eq!(standin.with(|s| s.webhooks.len()), 1);
}

#[test]
fn apply_updates_topics_and_retires_only_what_points_at_us_and_is_no_longer_wanted() {
    let standin = standin_with_project();
    let setup = setup(&standin, &project_webhook(ALL_LABEL_TOPICS, ""));
    assert_eq!(
        setup.run(&["labelbox", "webhooks", "apply"]).status.code(),
        Some(0)
    );
    let ours = standin.with(|s| s.webhooks[0].clone());
    let (foreign, stray) = standin.with(|s| {
        // Somebody else's webhook, and one of ours for the whole organization that the
        // configuration does not want (made in the UI with our URL).
        let foreign = s.add_webhook(
            Some(PROJECT),
            &["LABEL_CREATED"],
            "https://other.example.com/hook",
            "x",
        );
        let stray = s.add_webhook(None, &["WORKFLOW_ACTION"], HOOK_URL, "y");
        (foreign, stray)
    });
    let setup = setup.with(&base_config(&labelbox_section(
        &standin,
        &project_webhook(r#"["LABEL_UPDATED", "WORKFLOW_ACTION"]"#, ""),
    )));

    let listed = setup.run(&["labelbox", "webhooks", "list"]);
    assert_eq!(listed.status.code(), Some(0), "{}", output_text(&listed));
    let list = stdout(&listed);
    let line_of = |id: &str| {
        list.lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no {id} in\n{list}"))
            .to_owned()
    };
    let words = |id: &str| {
        line_of(id)
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        words(&ours.id)[1..6],
        ["ACTIVE", "project", PROJECT, "yes", "yes"],
        "{list}"
    );
    assert_eq!(words(&foreign)[4..6], ["no", "-"], "{list}");
    assert_eq!(
        words(&stray)[1..5],
        ["ACTIVE", "organization", "yes", "no"],
        "{list}"
    );

    let applied = setup.run(&["labelbox", "webhooks", "apply"]);
    assert_eq!(applied.status.code(), Some(0), "{}", output_text(&applied));
    let plan = stdout(&applied);
    assert!(
        plan.contains("0 to create, 1 to update, 1 to retire"),
        "{plan}"
    );
    let after = standin.with(|s| s.webhooks.clone());
    let find = |id: &str| after.iter().find(|h| h.id == id).expect("kept").clone();
    assert_eq!(find(&ours.id).topics, ["LABEL_UPDATED", "WORKFLOW_ACTION"]);
    assert_eq!(find(&ours.id).status, "ACTIVE");
    assert_eq!(
        find(&stray).status,
        "INACTIVE",
        "no hard delete: set INACTIVE"
    );
    assert_eq!(find(&foreign).status, "ACTIVE");
    assert_eq!(find(&foreign).updates, 0, "not ours: never touched");
}

#[test]
fn a_new_secret_means_a_new_webhook_and_the_old_one_is_retired_after_it_is_active() {
    let standin = standin_with_project();
    // First with the endpoint's first secret (the default).
    let setup = setup(&standin, &project_webhook(ALL_LABEL_TOPICS, ""));
    assert_eq!(
        setup.run(&["labelbox", "webhooks", "apply"]).status.code(),
        Some(0)
    );
    let old = standin.with(|s| s.webhooks[0].clone());
    assert_eq!(old.secret, SECRET);

    // Rotation as documented: the new secret goes first in the endpoint's list, the old one
    // stays after it (the endpoint accepts both meanwhile), and the webhook follows the first.
    let rotated = |hooks: &str| {
        base_config(&labelbox_section(&standin, hooks)).replace(
            &format!(
                "secrets = [{{ env = \"LH_TEST_SECRET\" }}, {{ value = \"{ROTATED_SECRET}\" }}]"
            ),
            &format!(
                "secrets = [{{ value = \"{ROTATED_SECRET}\" }}, {{ env = \"LH_TEST_SECRET\" }}]"
            ),
        )
    };
    let config = rotated(&project_webhook(ALL_LABEL_TOPICS, ""));
    assert!(config.contains(&format!("secrets = [{{ value = \"{ROTATED_SECRET}\" }}")));
    let setup = setup.with(&config);
    let applied = setup.run(&["labelbox", "webhooks", "apply"]);
    assert_eq!(applied.status.code(), Some(0), "{}", output_text(&applied));
    let plan = stdout(&applied);
    assert!(
        plan.contains("1 to create, 0 to update, 1 to retire"),
        "{plan}"
    );
    let hooks = standin.with(|s| s.webhooks.clone());
    let new = hooks
        .iter()
        .find(|h| h.id != old.id)
        .expect("a new webhook");
    assert_eq!(new.secret, ROTATED_SECRET);
    assert_eq!(new.status, "ACTIVE");
    assert_ne!(new.url, old.url, "its URL names another secret");
    assert_eq!(
        hooks
            .iter()
            .find(|h| h.id == old.id)
            .map(|h| h.status.as_str()),
        Some("INACTIVE")
    );
    // Created first, retired after.
    let ops = standin.with(|s| s.operations.clone());
    let created = ops
        .iter()
        .rposition(|o| o == "createWebhook")
        .expect("created");
    let retired = ops
        .iter()
        .rposition(|o| o == "updateWebhook")
        .expect("retired");
    assert!(created < retired, "{ops:?}");
    // The spliced secret was escaped as a GraphQL string.
    let query = standin
        .with(|s| s.create_queries.last().cloned())
        .expect("query");
    assert!(
        query.contains(&format!("secret:\"{ROTATED_SECRET}\"")),
        "{query}"
    );

    // Rolled back to the old secret, the INACTIVE webhook with it is made ACTIVE again.
    let setup = setup.with(&rotated(&project_webhook(ALL_LABEL_TOPICS, "secret = 1")));
    let back = setup.run(&["labelbox", "webhooks", "apply"]);
    assert!(
        stdout(&back).contains("status INACTIVE -> ACTIVE"),
        "{}",
        stdout(&back)
    );
    assert_eq!(standin.with(|s| s.webhooks.len()), 2);
    assert_eq!(
        standin.with(|s| s
            .active_webhooks()
            .iter()
            .map(|h| h.id.clone())
            .collect::<Vec<_>>()),
        [old.id]
    );
}

#[test]
fn a_wrong_key_is_said_as_labelboxs_authentication_error_and_never_printed() {
    let standin = standin_with_project();
    let setup = setup(&standin, "");
    let out = labelhook(
        &setup.config,
        &["labelbox", "webhooks", "list"],
        "lb-wrong-key-4242",
    );
    let (status, text) = code(&out);
    assert_eq!(status, Some(1), "{text}");
    assert!(
        text.contains("AUTHENTICATION_ERROR") && text.contains("labelbox.api_key"),
        "{text}"
    );
    assert!(!text.contains("lb-wrong-key-4242"), "{text}");
    assert!(standin.with(|s| s.refused_keys) >= 1);
}

#[test]
fn no_network_and_a_missing_key_are_said_plainly() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let config = base_config(&format!(
        "[labelbox]\napi_url = \"http://127.0.0.1:{port}/graphql\"\napi_key = {{ env = \"{KEY_ENV}\" }}\n"
    ));
    let setup = Setup::new(&config);
    let (status, text) = code(&setup.run(&["labelbox", "webhooks", "list"]));
    assert_eq!(status, Some(1), "{text}");
    assert!(
        text.contains("cannot reach Labelbox's API") && text.contains("refused"),
        "{text}"
    );

    let setup = setup.with(&base_config("[labelbox]\n"));
    let (status, text) = code(&setup.run(&["labelbox", "webhooks", "list"]));
    assert_eq!(status, Some(1), "{text}");
    assert!(text.contains("labelbox.api_key: is required"), "{text}");
}

#[test]
fn the_rate_limit_is_waited_out_and_said() {
    let standin = standin_with_project();
    standin.with(|s| s.rate_limit_next = 2);
    let setup = setup(&standin, &project_webhook(ALL_LABEL_TOPICS, ""));
    let out = setup.run(&["labelbox", "webhooks", "list"]);
    let (status, text) = code(&out);
    assert_eq!(status, Some(0), "{text}");
    let waits = stderr(&out)
        .matches("Labelbox's rate limit was exceeded; trying")
        .count();
    assert_eq!(waits, 2, "{text}");
    assert_eq!(
        standin.with(|s| s.operations.iter().filter(|o| *o == "rate-limited").count()),
        2
    );

    // And given up on, with its reason, after labelbox.max_retries.
    standin.with(|s| s.rate_limit_next = 100);
    let setup = setup.with(&base_config(&labelbox_section(&standin, "max_retries = 1")));
    let (status, text) = code(&setup.run(&["labelbox", "webhooks", "list"]));
    assert_eq!(status, Some(1), "{text}");
    assert!(
        text.contains("gave up") && text.contains("after 2 tries"),
        "{text}"
    );
}

#[test]
fn a_configured_project_that_does_not_exist_is_named() {
    let standin = StandIn::start();
    let setup = setup(&standin, &project_webhook(ALL_LABEL_TOPICS, ""));
    let (status, text) = code(&setup.run(&["labelbox", "webhooks", "list"]));
    assert_eq!(status, Some(1), "{text}");
    assert!(
        text.contains(&format!("project {PROJECT} does not exist")),
        "{text}"
    );
}

#[test]
fn labelbox_can_deliver_to_the_url_apply_gives_it() {
    let server = TestServer::with_base("");
    let url = server.url("/webhooks/labelbox?labelhook_secret_id=0123456789ab");
    let answer = deliver_to(
        &url,
        server.dir.path(),
        "cquery00000000000000000001",
        "LABEL_UPDATED",
        LABEL_UPDATED,
    );
    assert_eq!(answer.status, 202, "{answer:?}");
}
