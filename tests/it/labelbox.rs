//! `labelhook labelbox ...` as a user runs it: the real binary, its config pointing
//! `labelbox.api_url` at the stand-in of Labelbox's API (`tests/common/labelbox_standin.rs`,
//! written from LABELBOX.md section 9), and for a backfill a running `labelhook serve` whose
//! handlers' output is read back. The webhooks' tests are in `labelbox_webhooks.rs`, the
//! backfill's in `labelbox_backfill.rs`; what they share is here.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::helpers::*;
use crate::labelbox_standin::{StandIn, API_KEY};

/// The variable the test configs read the API key from.
pub const KEY_ENV: &str = "LH_TEST_LABELBOX_KEY";
pub const PROJECT: &str = "cprojectstandin0000000001";
pub const HOOK_URL: &str = "https://hooks.example.com/webhooks/labelbox";

/// The `[labelbox]` section for `standin`, polling fast (a stand-in is not Labelbox), and
/// whatever `extra` adds to it (keys first, then `[[labelbox.webhook]]` tables).
pub fn labelbox_section(standin: &StandIn, extra: &str) -> String {
    format!(
        r#"
[labelbox]
api_url = "{}"
api_key = {{ env = "{KEY_ENV}" }}
export_poll_interval = "20ms"
retry_backoff = "10ms"
{extra}
"#,
        standin.api_url()
    )
}

/// A `[[labelbox.webhook]]` for the test project.
pub fn project_webhook(topics: &str, extra: &str) -> String {
    format!(
        r#"
[[labelbox.webhook]]
project = "{PROJECT}"
topics = {topics}
url = "{HOOK_URL}"
endpoint = "labelbox"
{extra}
"#
    )
}

/// Runs `labelhook <args> --config <config>` with the test secrets and `key` as the API key.
pub fn labelhook(config: &Path, args: &[&str], key: &str) -> Output {
    Command::new(bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .env("LH_TEST_SECRET", SECRET)
        .env(KEY_ENV, key)
        .env_remove("LABELHOOK_CONFIG")
        .output()
        .expect("run labelhook")
}

/// A config file in a directory of its own, for commands that need no server.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Setup {
    pub fn new(config: &str) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("labelhook.toml");
        Setup { config: path, dir }.with(config)
    }

    /// Replaces the config.
    pub fn with(self, config: &str) -> Setup {
        std::fs::write(
            &self.config,
            config.replace("STORE_DIR", &self.dir.path().display().to_string()),
        )
        .expect("write config");
        self
    }

    pub fn run(&self, args: &[&str]) -> Output {
        labelhook(&self.config, args, API_KEY)
    }
}

/// The exit code, and the output for a failing assertion's message.
pub fn code(out: &Output) -> (Option<i32>, String) {
    (out.status.code(), output_text(out))
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn check_config_validates_the_labelbox_section_and_names_each_key() {
    let standin_free = r#"
[labelbox]
api_key = { env = "LH_TEST_LABELBOX_KEY" }
export_poll_interval = "100ms"

[[labelbox.webhook]]
project = "p1"
organization = true
topics = ["LABEL_CREATED", "REVIEW_CREATED"]
url = "http://hooks.example.com/webhooks/labelbox"
endpoint = "nope"
"#;
    let setup = Setup::new(&base_config(standin_free));
    let out = setup.run(&["check-config"]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for key in [
        "labelbox.export_poll_interval: must be at least 2s",
        "labelbox.webhook[0].project: give either",
        "labelbox.webhook[0].topics[1]: \"REVIEW_CREATED\"",
        "labelbox.webhook[0].url: must be an https:// URL",
        "labelbox.webhook[0].endpoint: no [[endpoint]] is named \"nope\"",
    ] {
        assert!(text.contains(key), "no {key:?} in:\n{text}");
    }
    // A value under api_key is never shown, even when it is wrong.
    let setup = setup.with(&base_config(
        "[labelbox]\napi_key = \"lb-pasted-key-in-clear\"\n",
    ));
    let out = setup.run(&["check-config"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("labelbox.api_key"),
        "{}",
        stderr(&out)
    );
    assert!(!output_text(&out).contains("lb-pasted-key-in-clear"));
    // And `serve` does not need the key at all.
    let fine = base_config(&labelbox_section_free());
    let out = Setup::new(&fine).run(&["check-config"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
}

/// `[labelbox]` with a key from a variable the test does not set.
fn labelbox_section_free() -> String {
    "[labelbox]\napi_key = { env = \"LH_TEST_UNSET_KEY_VARIABLE\" }\n".to_owned()
}
