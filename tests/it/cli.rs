//! The commands around `serve`: check-config, sign, send, healthcheck.

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
    for file in ["config/labelhook.toml", "config/labelhook.example.toml"] {
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
    assert!(health(&server.base_url).success());
    let url = server.base_url.clone();
    server.kill9();
    assert!(!health(&url).success());
}
