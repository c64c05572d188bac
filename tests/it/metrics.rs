//! `/metrics` as Prometheus reads it, after real traffic: every family described (so that
//! `promtool check metrics` passes), and the families an operator pages on present and moving
//! (dead letters, handler failures, the oldest pending delivery, store commits, refusals,
//! readiness). The alert rules and the Grafana dashboard in `deploy/` are checked against the
//! same output: `promtool check rules`, their unit tests (`promtool test rules`), and every
//! metric they name must be one the service publishes.
//!
//! promtool comes with Debian's `prometheus` package (`.ci/run` installs it). Without it the
//! promtool steps are skipped with a printed reason, unless `LABELHOOK_REQUIRE_SERVICES=1`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::postgres::{services_required, TestDb};

/// The families an operator's alerts and dashboard rest on.
const ALERTING_FAMILIES: &[&str] = &[
    "labelhook_deliveries_total",
    "labelhook_queue_depth",
    "labelhook_oldest_pending_delivery_age_seconds",
    "labelhook_store_ready",
    "labelhook_store_commit_duration_seconds",
    "labelhook_store_commit_batch_size",
    "labelhook_dead_letters",
    "labelhook_dead_letters_total",
    "labelhook_handler_failures_total",
    "labelhook_handler_attempts_total",
    "labelhook_handler_attempt_duration_seconds",
    "labelhook_http_requests_total",
    "labelhook_http_request_duration_seconds",
];

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `promtool`, or `None` (with the reason printed) where it is not installed.
fn promtool(test: &str) -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if found {
        return Some("promtool");
    }
    let reason = "promtool not found (Debian's `prometheus` package has it)";
    assert!(
        !services_required(),
        "{test}: {reason}; LABELHOOK_REQUIRE_SERVICES=1 makes this a failure"
    );
    eprintln!("skipped {test}'s promtool checks: {reason}");
    None
}

/// Runs `promtool args...` with `stdin`, failing the test with its output unless it succeeds.
fn run_promtool(promtool: &str, args: &[&str], stdin: &str) {
    let mut child = Command::new(promtool)
        .args(args)
        .current_dir(repo_file("deploy/prometheus"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}\ninput:\n{stdin}",
        output_text(&out)
    );
}

/// The answer of `GET url`, polled (bounded) until `ready` says it is what the test waits for.
fn poll_metrics(url: &str, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = curl(url, &[]);
        if answer.status == 200 && ready(&answer.body) {
            return answer.body;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; /metrics:\n{}",
            answer.body
        );
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

/// The value of the first sample of `name` whose labels contain every one of `labels`.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let bare = series.split('{').next()?;
        (bare == name && labels.iter().all(|l| series.contains(l))).then(|| value.parse().ok())?
    })
}

/// Families in `/metrics`, from its `# TYPE` lines.
fn families(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Every `labelhook_...` name in a file, with a histogram's `_bucket`/`_sum`/`_count` cut off.
fn names_in(path: &Path) -> BTreeSet<String> {
    names_in_text(&std::fs::read_to_string(path).expect("read deploy file"))
}

/// [`names_in`] of a text.
fn names_in_text(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("labelhook_") {
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        names.insert(family.to_owned());
    }
    names
}

/// A LABEL_UPDATED v1 body for a label of its own (an entity of its own) at `updated_at`.
fn label_body_at(label: &str, updated_at: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{label}","createdAt":"2026-11-01T00:00:00Z","updatedAt":"{updated_at}","label":"{{}}","project":{{"id":"cprojmetrics"}},"dataRow":{{"id":"cdrow"}}}}"#
    )
    .into_bytes()
}

fn label_body(label: &str) -> Vec<u8> {
    label_body_at(label, "2026-11-02T00:00:00Z")
}

#[test]
fn metrics_pass_promtool_and_expose_what_an_operator_pages_on() {
    let release = tempfile::tempdir().expect("temp dir");
    let marker = release.path().join("go");
    // Deliveries whose id says "block" wait for the marker; every other one fails for good.
    let server = TestServer::with_base(&format!(
        r#"
[store.retention]
interval = "200ms"

[[handler]]
name = "picky"
kind = "command"
argv = ["sh", "-c", "case $LABELHOOK_DELIVERY_ID in *block*) while [ ! -e {marker} ]; do sleep 0.05; done;; *) exit 3;; esac"]
timeout = "60s"
max_attempts = 1

[[route]]
topics = ["LABEL_*"]
handlers = ["picky"]
"#,
        marker = marker.display()
    ));
    let metrics_url = server.admin("/metrics");
    let fresh = poll_metrics(&metrics_url, "readiness and handler counters", |m| {
        sample(m, "labelhook_store_ready", &[]) == Some(1.0)
            && sample(m, "labelhook_dead_letters_total", &["handler=\"picky\""]).is_some()
    });
    // Published at zero before anything failed, so that the first failure is an increase.
    assert_eq!(
        sample(
            &fresh,
            "labelhook_dead_letters_total",
            &["handler=\"picky\""]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &fresh,
            "labelhook_handler_failures_total",
            &["handler=\"picky\""]
        ),
        Some(0.0)
    );

    // A dead letter, a stale event, a refusal, and a delivery held by its handler.
    let dead = deliver(
        &server,
        "cmetricsdead",
        "LABEL_UPDATED",
        &label_body("clabeldead"),
    );
    assert_eq!(dead.status, 202, "{}", dead.body);
    server.wait_for_status("cmetricsdead", "dead");
    let older = label_body_at("clabeldead", "2026-11-01T12:00:00Z");
    let stale = deliver(&server, "cmetricsstale", "LABEL_UPDATED", &older);
    assert_eq!(stale.status, 202, "{}", stale.body);
    let refused = post_signed_with_secret(&server, "wrong-secret");
    assert_eq!(refused.status, 401, "{}", refused.body);
    let held = deliver(
        &server,
        "cmetricsblock",
        "LABEL_UPDATED",
        &label_body("clabelheld"),
    );
    assert_eq!(held.status, 202, "{}", held.body);

    let busy = poll_metrics(
        &metrics_url,
        "a dead letter and a pending delivery aging",
        |m| {
            sample(m, "labelhook_dead_letters", &[]) == Some(1.0)
                && sample(
                    m,
                    "labelhook_stale_events_total",
                    &["topic=\"LABEL_UPDATED\""],
                ) == Some(1.0)
                && sample(m, "labelhook_dead_letters_total", &["handler=\"picky\""]) == Some(1.0)
                && sample(m, "labelhook_oldest_pending_delivery_age_seconds", &[])
                    .is_some_and(|age| age >= 0.5)
        },
    );
    assert_eq!(
        sample(
            &busy,
            "labelhook_handler_failures_total",
            &["handler=\"picky\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &busy,
            "labelhook_stale_events_total",
            &["topic=\"LABEL_UPDATED\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &busy,
            "labelhook_deliveries_total",
            &["outcome=\"signature_mismatch\"", "topic=\"LABEL_UPDATED\""]
        ),
        Some(1.0)
    );
    assert!(sample(&busy, "labelhook_queue_depth", &[]).is_some_and(|d| d >= 1.0));
    let commits = sample(
        &busy,
        "labelhook_store_commit_duration_seconds_count",
        &["backend=\"sqlite\""],
    );
    assert!(commits.is_some_and(|n| n >= 2.0), "{commits:?}");
    assert!(sample(
        &busy,
        "labelhook_store_commit_batch_size_bucket",
        &["backend=\"sqlite\"", "le=\"1\""]
    )
    .is_some());

    // Once handled, nothing is pending: the age is back to 0.
    std::fs::write(&marker, b"").expect("release the handler");
    let idle = poll_metrics(&metrics_url, "no pending delivery", |m| {
        sample(m, "labelhook_oldest_pending_delivery_age_seconds", &[]) == Some(0.0)
            && sample(m, "labelhook_queue_depth", &[]) == Some(0.0)
            && sample(m, "labelhook_handler_attempts_total", &["outcome=\"ok\""]) == Some(1.0)
    });

    let present = families(&idle);
    for family in ALERTING_FAMILIES {
        assert!(present.contains(*family), "{family} missing:\n{idle}");
    }
    // What the alert rules and the dashboard query, and the operator's guide names, is what
    // the service publishes. (`labelhook_work` is the PostgreSQL NOTIFY channel, not a metric.)
    for file in [
        "deploy/prometheus/alerts.yaml",
        "deploy/grafana/labelhook.json",
        "deploy/README.md",
    ] {
        for name in names_in(&repo_file(file)) {
            if name == "labelhook_work" {
                continue;
            }
            assert!(
                present.contains(&name),
                "{file} names {name}, not published"
            );
        }
    }
    if let Some(promtool) = promtool("metrics_pass_promtool") {
        run_promtool(promtool, &["check", "metrics"], &idle);
    }
}

/// Label events routed to a `log` handler named `logged`.
const LOGGED_LABELS: &str = r#"
[[handler]]
name = "logged"
kind = "log"

[[route]]
topics = ["LABEL_*"]
handlers = ["logged"]
"#;

/// The families README.md's list of metrics names.
fn readme_families() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(repo_file("README.md")).expect("read README.md");
    let list = readme
        .split("- **Metrics**")
        .nth(1)
        .and_then(|rest| rest.split("\n- **").next())
        .expect("README.md's Metrics list");
    names_in_text(list)
}

#[test]
fn every_family_the_readme_lists_is_on_metrics_from_the_start() {
    let server = TestServer::with_base(&format!(
        "[model_training]\npath = \"/model-training\"\nsecrets = [{{ env = \"LH_TEST_SECRET\" }}]\n\
         {LOGGED_LABELS}"
    ));
    let listed = readme_families();
    assert!(listed.len() >= 20, "{listed:?}");
    // The very first scrape, before any delivery.
    let first = curl(&server.admin("/metrics"), &[]);
    assert_eq!(first.status, 200, "{first:?}");
    // Gauges are set by their first reading, made at start: still without any delivery.
    let later = poll_metrics(
        &server.admin("/metrics"),
        "every gauge's first reading",
        |m| listed.is_subset(&families(m)),
    );
    let gauges: BTreeSet<String> = later
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" gauge"))
        .map(str::to_owned)
        .collect();
    // Counters and histograms are there from the first scrape, every counter at 0: a
    // counter that appeared only when it first moved would hide that first increase.
    let at_first = families(&first.body);
    for family in listed.difference(&gauges) {
        assert!(
            at_first.contains(family),
            "{family} is not in the first scrape:\n{}",
            first.body
        );
    }
    for line in first
        .body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample");
        if series
            .split('{')
            .next()
            .is_some_and(|n| n.ends_with("_total"))
        {
            assert_eq!(value, "0", "{line}");
        }
    }
    // For the label values the configuration tells: each endpoint's outcomes, each
    // handler's, what retention may delete.
    for (family, labels) in [
        (
            "labelhook_deliveries_total",
            &["endpoint=\"labelbox\"", "outcome=\"signature_mismatch\""][..],
        ),
        (
            "labelhook_deliveries_total",
            &["endpoint=\"model_training\"", "outcome=\"accepted\""],
        ),
        (
            "labelhook_handler_attempts_total",
            &["handler=\"logged\"", "outcome=\"dead\""],
        ),
        ("labelhook_dead_letters_total", &["handler=\"logged\""]),
        ("labelhook_pruned_deliveries_total", &["status=\"dead\""]),
        ("labelhook_stale_events_total", &["topic=\"LABEL_UPDATED\""]),
        (
            "labelhook_handler_attempt_duration_seconds_count",
            &["handler=\"logged\""],
        ),
        (
            "labelhook_store_commit_duration_seconds_count",
            &["backend=\"sqlite\""],
        ),
    ] {
        assert!(
            sample(&first.body, family, labels).is_some(),
            "{family} {labels:?} missing:\n{}",
            first.body
        );
    }
    if let Some(promtool) = promtool("every_family_the_readme_lists_is_on_metrics_from_the_start") {
        run_promtool(promtool, &["check", "metrics"], &first.body);
    }
}

/// A model-less delivery signed with `secret` (refused unless it is the endpoint's).
fn post_signed_with_secret(server: &TestServer, secret: &str) -> Answer {
    let body = label_body("clabelrefused");
    let file = body_file(server.dir.path(), "refused.json", &body);
    let sig = format!("X-Hub-Signature: {}", sha1_sig(secret, &body));
    curl(
        &server.url("/webhooks/labelbox"),
        &[
            "-H",
            "Content-Type: application/json",
            "-H",
            "X-Labelbox-Event: LABEL_UPDATED",
            "-H",
            &sig,
            "--data-binary",
            &file,
        ],
    )
}

#[test]
fn a_postgres_store_reports_its_commits_and_its_metrics_pass_promtool() {
    let test = "a_postgres_store_reports_its_commits_and_its_metrics_pass_promtool";
    let Some(db) = TestDb::create_blocking(test) else {
        return;
    };
    let server = TestServer::start(&pg_config(&db.url, LOGGED_LABELS));
    let answer = deliver(
        &server,
        "cmetricspg",
        "LABEL_UPDATED",
        &label_body("clabelpg"),
    );
    assert_eq!(answer.status, 202, "{}", answer.body);
    server.wait_for_status("cmetricspg", "delivered");
    let commits =
        |m: &str, family: &str| sample(m, family, &["backend=\"postgres\""]).unwrap_or_default();
    // The delivery's own transaction, then the dispatcher's: its gate, its claim, its attempts
    // (and the claims that found nothing meanwhile). Each commit is timed and sized.
    let metrics = poll_metrics(&server.admin("/metrics"), "PostgreSQL commits", |m| {
        let timed = commits(m, "labelhook_store_commit_duration_seconds_count");
        timed >= 4.0
            && commits(m, "labelhook_store_commit_batch_size_count") == timed
            && sample(m, "labelhook_store_ready", &[]) == Some(1.0)
    });
    // PostgreSQL commits each write on its own.
    assert_eq!(
        sample(
            &metrics,
            "labelhook_store_commit_batch_size_sum",
            &["backend=\"postgres\""]
        ),
        Some(commits(&metrics, "labelhook_store_commit_batch_size_count"))
    );
    if let Some(promtool) = promtool(test) {
        run_promtool(promtool, &["check", "metrics"], &metrics);
    }
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = promtool("the_alert_rules_pass_promtool_and_their_unit_tests") else {
        return;
    };
    run_promtool(promtool, &["check", "rules", "alerts.yaml"], "");
    run_promtool(promtool, &["test", "rules", "alerts.test.yaml"], "");
}

/// Every query of the Grafana dashboard, with its variables filled in.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(repo_file("deploy/grafana/labelhook.json"))
        .expect("read the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a target's expr");
            queries.push(
                expr.replace("$__rate_interval", "5m")
                    .replace("$job", ".*")
                    .replace("$instance", ".*"),
            );
        }
    }
    queries
}

/// The dashboard's queries are PromQL that Prometheus accepts: written as recording rules in a
/// rule file of their own, which `promtool check rules` parses.
#[test]
fn the_dashboards_queries_are_valid_promql() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "{queries:?}");
    let Some(promtool) = promtool("the_dashboards_queries_are_valid_promql") else {
        return;
    };
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in queries.iter().enumerate() {
        // A JSON string is a YAML string too, whatever quotes the query holds.
        let expr = serde_json::to_string(query).expect("quote");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {expr}\n"
        ));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("dashboard.rules.yaml");
    std::fs::write(&path, &rules).expect("write rules");
    let path = path.display().to_string();
    run_promtool(promtool, &["check", "rules", &path], &rules);
}
