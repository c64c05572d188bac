//! The commands around `serve`: check-config, sign, send, healthcheck, events; and what
//! `serve` says at start (keys the environment overrides, a store it cannot write).

use std::process::Command;

use crate::helpers::*;

/// `labelhook check-config --config PATH` with `LH_UNSET_VARIABLE` surely unset.
fn check_config(path: &std::path::Path) -> std::process::Output {
    Command::new(bin())
        .args(["check-config", "--config"])
        .arg(path)
        .env_remove("LH_UNSET_VARIABLE")
        .output()
        .expect("run")
}

#[test]
fn check_config_names_the_key_of_every_problem_and_never_prints_a_secret() {
    let dir = tempfile::tempdir().expect("temp");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[[endpoint]]
name = "labelbox"
secrets = [{ value = "inline-very-secret" }, { env = "LH_UNSET_VARIABLE" }]

[[handler]]
name = "archive"
kind = "file"

[[route]]
topics = ["LABEL_*"]
handlers = ["missing"]
"#,
    )
    .expect("write");
    let out = check_config(&path);
    assert_eq!(out.status.code(), Some(1));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("handler[0].path: is required"), "{text}");
    assert!(text.contains("route[0].handlers[0]"), "{text}");
    assert!(!text.contains("inline-very-secret"), "{text}");

    // Once the structure is right, a missing secret is named by its key.
    std::fs::write(
        &path,
        "[[endpoint]]\nname = \"labelbox\"\nsecrets = [{ env = \"LH_UNSET_VARIABLE\" }]\n",
    )
    .expect("write");
    let out = check_config(&path);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("endpoint[0].secrets[0].env"), "{stderr}");

    // Unknown keys are errors that name the key.
    std::fs::write(&path, "[server]\nlisten_port = 8080\n").expect("write");
    let out = check_config(&path);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_port"));
}

#[test]
fn check_config_accepts_the_shipped_configs_without_printing_the_secret() {
    // The Kubernetes ConfigMap carries its file inline: checked as the pod would read it.
    let dir = tempfile::tempdir().expect("temp");
    let configmap = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/configmap.yaml"),
    )
    .expect("configmap");
    let inline: String = configmap
        .lines()
        .skip_while(|l| !l.trim_end().ends_with("labelhook.toml: |"))
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(inline.contains("[server]"), "no file in the ConfigMap");
    // The Secret the Deployment mounts, here a file of our own.
    let mounted = "/run/secrets/labelhook/webhook-secret";
    assert!(
        inline.contains(mounted),
        "the ConfigMap no longer reads {mounted}"
    );
    let secret = dir.path().join("webhook-secret");
    std::fs::write(&secret, "shipped-config-secret\n").expect("write");
    let inline = inline.replace(mounted, secret.to_str().expect("utf-8 path"));
    let from_configmap = dir.path().join("configmap-labelhook.toml");
    std::fs::write(&from_configmap, inline).expect("write");

    for file in [
        "config/labelhook.toml",
        "config/labelhook.example.toml",
        "config/labelhook.container.toml",
        "examples/custom_handler.toml",
        "deploy/compose/labelhook.toml",
        from_configmap.to_str().expect("utf-8 path"),
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let out = Command::new(bin())
            .args(["check-config", "--config"])
            .arg(&path)
            .env("LABELBOX_WEBHOOK_SECRET", "shipped-config-secret")
            .output()
            .expect("run");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{file}: {text}");
        assert!(!text.contains("shipped-config-secret"));
    }
}

#[test]
fn sign_prints_what_openssl_computes() {
    let dir = tempfile::tempdir().expect("temp");
    let path = dir.path().join("body.json");
    std::fs::write(&path, LABEL_UPDATED).expect("write");
    let out = Command::new(bin())
        .arg("sign")
        .arg(&path)
        .env("LABELBOX_WEBHOOK_SECRET", SECRET)
        .output()
        .expect("run");
    assert!(out.status.success());
    let ours = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let openssl = Command::new("openssl")
        .args(["dgst", "-sha1", "-hmac", SECRET, "-r"])
        .arg(&path)
        .output()
        .expect("openssl");
    let theirs = String::from_utf8_lossy(&openssl.stdout);
    let hex = theirs.split_whitespace().next().expect("digest");
    assert_eq!(ours, format!("sha1={hex}"));

    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).expect("write");
    let out = Command::new(bin())
        .args(["sign", "--sha256", "--secret-file"])
        .arg(&secret_file)
        .arg(&path)
        .env_remove("LABELBOX_WEBHOOK_SECRET")
        .output()
        .expect("run");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sha256_sig(SECRET, LABEL_UPDATED)
    );
}

#[test]
fn send_delivers_like_labelbox_and_healthcheck_reports_the_server() {
    let mut server = TestServer::with_base("");
    let body = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(body.path(), LABEL_UPDATED).expect("write");
    let out = Command::new(bin())
        .args(["send", "--url", &server.url("/webhooks/labelbox")])
        .args([
            "--topic",
            "LABEL_UPDATED",
            "--id",
            "csend1",
            "--secret-env",
            "LH_TEST_SECRET",
        ])
        .arg(body.path())
        .env("LH_TEST_SECRET", SECRET)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("202 "));
    assert!(server.status_of("csend1").is_some());

    let health = |url: &str| {
        Command::new(bin())
            .args(["healthcheck", "--url", url])
            .output()
            .expect("run")
            .status
    };
    let admin = server.admin("");
    assert!(health(&admin).success());
    assert!(
        !health(&server.base_url).success(),
        "probes are on the admin listener only"
    );
    let url = admin;
    server.kill9();
    assert!(!health(&url).success());
}

#[test]
fn failures_are_error_lines_with_their_cause_and_name_the_file() {
    let dir = tempfile::tempdir().expect("temp");
    let missing = dir.path().join("nosuch.json");
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[server]\nbody_timeout = 300\n").expect("write");
    let missing_arg = missing.display().to_string();
    let broken_arg = broken.display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["sign", &missing_arg], "cannot read"),
        (
            vec![
                "send",
                "--url",
                "http://127.0.0.1:1/webhooks/x",
                "--topic",
                "T",
                &missing_arg,
            ],
            "cannot read",
        ),
        (
            vec!["check-config", "--config", &broken_arg],
            "server.body_timeout",
        ),
        (
            vec!["serve", "--config", &broken_arg],
            "server.body_timeout",
        ),
        (
            vec!["serve", "--config", &missing_arg],
            "cannot read the config file",
        ),
        (vec!["events", "replay"], "--status"),
        (
            vec!["healthcheck", "--url", "http://127.0.0.1:1"],
            "http://127.0.0.1:1/healthz: no answer: Connection refused",
        ),
    ];
    for (args, cause) in cases {
        let out = Command::new(bin())
            .args(&args)
            .env("LABELBOX_WEBHOOK_SECRET", SECRET)
            .env_remove("LABELHOOK_CONFIG")
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(
            !stderr.lines().any(|l| l.starts_with("Error")),
            "{args:?}: {stderr}"
        );
        assert!(
            stderr.contains(cause),
            "{args:?}: {cause:?} not in {stderr}"
        );
        if args[0] == "sign" || args[0] == "send" {
            assert!(stderr.contains(&missing_arg), "{args:?}: {stderr}");
        }
    }
}

#[test]
fn replay_without_a_target_names_both_ways_to_give_one() {
    let out = Command::new(bin())
        .args(["events", "replay"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("<ID|--status <STATUS>>"), "{stderr}");
}

#[test]
fn sign_uses_the_configs_secret_only_when_config_is_on_the_command_line() {
    let dir = tempfile::tempdir().expect("temp");
    let body = dir.path().join("body.json");
    std::fs::write(&body, LABEL_UPDATED).expect("write");
    let config = dir.path().join("labelhook.toml");
    std::fs::write(
        &config,
        format!(
            "[[endpoint]]\nname = \"first\"\nsecrets = [{{ value = \"{ROTATED_SECRET}\" }}]\n\
             [[endpoint]]\nname = \"second\"\nsecrets = [{{ env = \"LH_SECOND\" }}]\n"
        ),
    )
    .expect("write");
    let sign = |args: &[&str], env_config: bool| {
        let mut command = Command::new(bin());
        command
            .arg("sign")
            .args(args)
            .arg(&body)
            .env("LABELBOX_WEBHOOK_SECRET", SECRET)
            .env("LH_SECOND", "second-secret");
        if env_config {
            command.env("LABELHOOK_CONFIG", &config);
        } else {
            command.env_remove("LABELHOOK_CONFIG");
        }
        let out = command.output().expect("run");
        assert!(out.status.success(), "{}", output_text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let config_arg = config.display().to_string();
    assert_eq!(
        sign(&["--config", &config_arg], false),
        sha1_sig(ROTATED_SECRET, LABEL_UPDATED)
    );
    assert_eq!(
        sign(&["--config", &config_arg, "--endpoint", "second"], false),
        sha1_sig("second-secret", LABEL_UPDATED)
    );
    // An explicit secret option wins over the configuration.
    assert_eq!(
        sign(
            &["--config", &config_arg, "--secret-env", "LH_SECOND"],
            false
        ),
        sha1_sig("second-secret", LABEL_UPDATED)
    );
    // LABELHOOK_CONFIG alone (the server's environment) does not change what sign uses.
    assert_eq!(sign(&[], true), sha1_sig(SECRET, LABEL_UPDATED));
}

#[test]
fn healthcheck_says_where_its_address_came_from() {
    let dir = tempfile::tempdir().expect("temp");
    let config = dir.path().join("labelhook.toml");
    // A secret that is not set does not matter to healthcheck: only the addresses do.
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\n\
         [[endpoint]]\nname = \"lb\"\nsecrets = [{ env = \"LH_UNSET_VARIABLE\" }]\n",
    )
    .expect("write");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(bin())
            .arg("healthcheck")
            .args(args)
            .envs(env.iter().copied())
            .env_remove("LH_UNSET_VARIABLE")
            .env_remove("LABELHOOK_CONFIG")
            .output()
            .expect("run");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let config_arg = config.display().to_string();
    let stderr = run(&["--config", &config_arg], &[]);
    // The probes are on the admin listener, never on `listen`.
    assert!(
        stderr.contains("http://127.0.0.1:2/healthz: no answer"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "the address is server.admin_listen in {config_arg}"
        )),
        "{stderr}"
    );
    // An admin port of its own (the file's `listen` is :1, and the two may not coincide).
    let stderr = run(
        &["--ready", "--config", &config_arg],
        &[("LABELHOOK__SERVER__ADMIN_LISTEN", "127.0.0.1:3")],
    );
    assert!(stderr.contains("http://127.0.0.1:3/readyz"), "{stderr}");
    assert!(
        stderr.contains("set by LABELHOOK__SERVER__ADMIN_LISTEN"),
        "{stderr}"
    );
    let nowhere = dir.path().join("nowhere.toml").display().to_string();
    let stderr = run(
        &["--config", &nowhere],
        &[("LABELHOOK__SERVER__ADMIN_LISTEN", "127.0.0.1:1")],
    );
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    let stderr = run(
        &["--config", &config_arg],
        &[("LABELHOOK__SERVER__LISTEN", "nope")],
    );
    assert!(
        stderr.contains("error: server.listen: expected an IP address and port"),
        "{stderr}"
    );
}

#[test]
fn events_list_columns_stay_aligned_whatever_the_ids_length() {
    let server = TestServer::with_base("");
    assert_eq!(
        deliver(&server, "cshort1", "LABEL_UPDATED", LABEL_UPDATED).status,
        202
    );
    // Without X-Labelbox-Id the delivery id is the body's SHA-256: 64 hex digits.
    let file = body_file(server.dir.path(), "no-id.json", LABEL_UPDATED);
    let sig = format!("X-Hub-Signature: {}", sha1_sig(SECRET, LABEL_UPDATED));
    let answer = curl(
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
    );
    assert_eq!(answer.status, 202, "{}", answer.body);
    let out = server.cli(&["events", "list"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines
        .iter()
        .any(|l| l.split_whitespace().nth(1).is_some_and(|id| id.len() == 64)));
    for column in ["TOPIC", "STATUS", "ENTITY"] {
        let at = lines[0].find(column).expect("header");
        for row in &lines[1..] {
            let before = &row[..at];
            assert!(
                before.ends_with("  ") && !row[at..].starts_with(' '),
                "{column} not at {at} in\n{text}"
            );
        }
    }
}

#[test]
fn serve_says_which_keys_the_environment_overrides() {
    let dir = tempfile::tempdir().expect("temp");
    let config = dir.path().join("labelhook.toml");
    std::fs::write(
        &config,
        base_config("").replace("STORE_DIR", &dir.path().display().to_string()),
    )
    .expect("write");
    let mut command = Command::new(bin());
    command
        .args(["serve", "--config"])
        .arg(&config)
        .env("LH_TEST_SECRET", SECRET)
        .env("LABELHOOK__SERVER__BODY_TIMEOUT", "45s")
        .env("LABELHOOK__DISPATCH__CONCURRENCY", "4")
        .env("RUST_LOG", "info")
        .env_remove("LABELHOOK_CONFIG");
    let server = Listening::start(command, &dir.path().join("stderr.log"));
    server.wait_for_log("LABELHOOK__DISPATCH__CONCURRENCY");
    let logs = server.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("LABELHOOK__SERVER__BODY_TIMEOUT"))
        .unwrap_or_else(|| panic!("no line about the variable:\n{logs}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("overrides this key of the config file"),
        "{line}"
    );
    assert!(line.contains("server.body_timeout"), "{line}");

    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&config)
        .env("LH_TEST_SECRET", SECRET)
        .env("LABELHOOK__SERVER__BODY_TIMEOUT", "45s")
        .env_remove("LABELHOOK_CONFIG")
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "server.body_timeout: set by LABELHOOK__SERVER__BODY_TIMEOUT (overrides the file)"
        ),
        "{stdout}"
    );
}

#[test]
fn a_labelhook_variable_that_sets_nothing_is_warned_about_with_the_form_it_meant() {
    let dir = tempfile::tempdir().expect("temp");
    let config = dir.path().join("labelhook.toml");
    // The admin token from a LABELHOOK_ variable: read, so never reported.
    let text = base_config("[admin]\ntoken = { env = \"LABELHOOK_ADMIN_TOKEN\" }\n")
        .replace("STORE_DIR", &dir.path().display().to_string());
    std::fs::write(&config, text).expect("write");
    let with_env = |command: &mut Command| {
        command
            .arg("--config")
            .arg(&config)
            .env("LH_TEST_SECRET", SECRET)
            .env("LABELHOOK_SERVER_LISTEN", "127.0.0.1:1")
            .env("LABELHOOK_ADMIN_TOKEN", "a-token-for-the-test")
            .env("RUST_LOG", "info")
            .env_remove("LABELHOOK_CONFIG");
    };
    let said = "LABELHOOK_SERVER_LISTEN is set but sets nothing; did you mean \
                LABELHOOK__SERVER__LISTEN? (an override has two underscores between its parts)";

    let mut command = Command::new(bin());
    command.arg("check-config");
    with_env(&mut command);
    let out = command.output().expect("run");
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("warning: {said}\n")
    );

    let mut command = Command::new(bin());
    command.arg("serve");
    with_env(&mut command);
    let server = Listening::start(command, &dir.path().join("stderr.log"));
    server.wait_for_log("LABELHOOK_SERVER_LISTEN");
    let logs = server.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("LABELHOOK_SERVER_LISTEN"))
        .unwrap_or_default();
    assert!(line.contains("WARN") && line.contains(said), "{line}");
    assert!(!logs.contains("LABELHOOK_ADMIN_TOKEN"), "{logs}");
}

/// Runs as root (which writes anywhere) through `setpriv` as the user "nobody", otherwise as
/// this user with the directory made read-only: the store's directory is not writable either
/// way, as a root-owned bind mount is for the image's uid 65532.
#[test]
fn serve_reports_an_unwritable_store_directory_and_is_not_ready() {
    let dir = tempfile::tempdir().expect("temp");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let config = dir.path().join("labelhook.toml");
    std::fs::write(
        &config,
        base_config("").replace("STORE_DIR", &data.display().to_string()),
    )
    .expect("write");
    use std::os::unix::fs::PermissionsExt;
    let root = current_uid() == 0;
    let mut command = if root {
        // "nobody" must reach the config and the binary; it cannot write `data`.
        for path in [dir.path(), data.as_path()] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let mut command = Command::new("setpriv");
        command.args(["--reuid=65534", "--regid=65534", "--clear-groups", bin()]);
        command
    } else {
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o555)).expect("chmod");
        Command::new(bin())
    };
    command
        .args(["serve", "--config"])
        .arg(&config)
        .env("LH_TEST_SECRET", SECRET)
        .env("RUST_LOG", "info")
        .env_remove("LABELHOOK_CONFIG");
    let server = Listening::start(command, &dir.path().join("stderr.log"));
    server.wait_for_log("not writable");
    let logs = server.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("not writable"))
        .expect("the line");
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(&data.display().to_string()), "{line}");
    assert!(line.contains("chown -R"), "{line}");
    let uid = if root { 65534 } else { current_uid() };
    assert!(line.contains(&format!("uid {uid}")), "{line}");

    // Alive, but not ready: what the image's HEALTHCHECK (--ready) sees.
    let health = |ready: bool| {
        let mut command = Command::new(bin());
        let admin = server.admin_url.as_deref().expect("admin listening line");
        command.args(["healthcheck", "--url", admin]);
        if ready {
            command.arg("--ready");
        }
        command.output().expect("run")
    };
    assert!(health(false).status.success());
    let out = health(true);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/readyz: answered 503"), "{stderr}");
    let answer = deliver_to(
        &format!("{}/webhooks/labelbox", server.url),
        dir.path(),
        "cunwritable1",
        "LABEL_UPDATED",
        LABEL_UPDATED,
    );
    assert_eq!(answer.status, 503, "{}", answer.body);
}
