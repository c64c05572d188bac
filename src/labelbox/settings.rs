//! `[labelbox]`: how `labelhook labelbox ...` reaches Labelbox's API (LABELBOX.md section 9),
//! the webhooks `labelbox webhooks apply` keeps in step with this file, and how a backfill
//! rebuilds what it fetches; with the checks that need nothing but these keys (`config` adds
//! those that look at the `[[endpoint]]`s).
//!
//! `serve` never reads the API key: it is resolved only by the `labelbox` commands, so a
//! server's environment need not hold it.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;

use crate::settings::{de, Problem, SecretSource};

/// Labelbox's GraphQL endpoint (LABELBOX.md 9.1).
pub const LABELBOX_API_URL: &str = "https://api.labelbox.com/graphql";
/// Labelbox's API host: the export task is polled no faster than [`MIN_POLL_INTERVAL`] there.
pub const LABELBOX_API_HOST: &str = "api.labelbox.com";
/// "Poll no faster than every 2 s" (LABELBOX.md 9.3, from the SDK's export task).
pub const MIN_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// The topics a webhook can be created with today (LABELBOX.md 9.2).
pub const WEBHOOK_TOPICS: [&str; 4] = [
    "LABEL_CREATED",
    "LABEL_UPDATED",
    "LABEL_DELETED",
    "WORKFLOW_ACTION",
];
/// The query parameter that carries a webhook's secret id in the URL it is created with.
pub const SECRET_ID_PARAM: &str = "labelhook_secret_id";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabelboxSettings {
    /// Labelbox's GraphQL endpoint.
    pub api_url: String,
    /// The API key (Workspace settings → API keys), from a secret source. Used only by the
    /// `labelbox` commands, never printed or logged.
    pub api_key: Option<SecretSource>,
    /// How long one call to the API may take (the SDK's limit).
    #[serde(with = "de::duration")]
    pub request_timeout: Duration,
    /// How often an export task is polled until it is done; at least 2s against Labelbox's
    /// own API, which asks for no more.
    #[serde(with = "de::duration")]
    pub export_poll_interval: Duration,
    /// The first wait after Labelbox's rate limit or a server error; it doubles with each try
    /// (at most a minute), and `max_retries` tries later the command gives up.
    #[serde(with = "de::duration")]
    pub retry_backoff: Duration,
    pub max_retries: u32,
    /// The shape of the label events a backfill rebuilds: `v1` (what webhooks made through the
    /// API or the SDK send: one per label) or `export` (what webhooks made in the project UI
    /// send: one snapshot of the data row with all its labels).
    pub backfill_payload: BackfillPayload,
    /// `backfill --since-last-seen` starts this long before the newest delivery received.
    #[serde(with = "de::duration")]
    pub since_last_seen_margin: Duration,
    /// `[[labelbox.webhook]]`: the webhooks `labelbox webhooks apply` keeps in Labelbox.
    pub webhook: Vec<LabelboxWebhook>,
}

impl Default for LabelboxSettings {
    fn default() -> Self {
        Self {
            api_url: LABELBOX_API_URL.to_owned(),
            api_key: None,
            request_timeout: Duration::from_secs(60),
            export_poll_interval: MIN_POLL_INTERVAL,
            retry_backoff: Duration::from_secs(1),
            max_retries: 8,
            backfill_payload: BackfillPayload::V1,
            since_last_seen_margin: Duration::from_secs(600),
            webhook: Vec::new(),
        }
    }
}

/// `labelbox.backfill_payload`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackfillPayload {
    #[default]
    V1,
    Export,
}

impl BackfillPayload {
    pub fn as_str(self) -> &'static str {
        match self {
            BackfillPayload::V1 => "v1",
            BackfillPayload::Export => "export",
        }
    }
}

/// One `[[labelbox.webhook]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelboxWebhook {
    /// The project the webhook is for; give this or `organization = true`.
    pub project: Option<String>,
    /// The webhook is for the whole organization (every project).
    #[serde(default)]
    pub organization: bool,
    /// Of LABEL_CREATED, LABEL_UPDATED, LABEL_DELETED and WORKFLOW_ACTION.
    pub topics: Vec<String>,
    /// The public HTTPS URL Labelbox calls: this server's `/webhooks/{endpoint}` as the
    /// internet sees it.
    pub url: String,
    /// The `[[endpoint]]` whose secret Labelbox signs with.
    pub endpoint: String,
    /// Which of the endpoint's secrets, counted from 0 [default: 0, the first, as for `sign`
    /// and `send`: during a rotation the new secret comes first].
    pub secret: Option<usize>,
}

impl LabelboxWebhook {
    /// The project id, or `None` for the organization.
    pub fn scope(&self) -> Option<&str> {
        self.project.as_deref()
    }

    /// Which of the endpoint's secrets this webhook uses.
    pub fn secret_index(&self) -> usize {
        self.secret.unwrap_or(0)
    }
}

impl LabelboxSettings {
    /// The checks of `[labelbox]` that need nothing but its own keys, added to `problems`.
    pub fn check(&self, problems: &mut Vec<Problem>) {
        let lb = self;
        let mut problem = |key: String, message: String| problems.push(Problem { key, message });
        match reqwest::Url::parse(&lb.api_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => {
                let labelbox = url.host_str() == Some(LABELBOX_API_HOST);
                if labelbox && lb.export_poll_interval < MIN_POLL_INTERVAL {
                    problem(
                        "labelbox.export_poll_interval".into(),
                        "must be at least 2s against Labelbox's API, which asks for no more \
                         (shorter is for a stand-in of it only)"
                            .into(),
                    );
                }
            }
            _ => problem(
                "labelbox.api_url".into(),
                "must be an http:// or https:// URL".into(),
            ),
        }
        if let Some(key) = &lb.api_key {
            let given = [key.env.is_some(), key.file.is_some(), key.value.is_some()];
            if given.iter().filter(|g| **g).count() != 1 {
                problem(
                    "labelbox.api_key".into(),
                    "give exactly one of env, file or value".into(),
                );
            }
        }
        for (key, value) in [
            ("request_timeout", lb.request_timeout),
            ("export_poll_interval", lb.export_poll_interval),
            ("retry_backoff", lb.retry_backoff),
        ] {
            if value.is_zero() {
                problem(format!("labelbox.{key}"), "must be greater than 0".into());
            }
        }
        let mut seen = BTreeSet::new();
        for (i, hook) in lb.webhook.iter().enumerate() {
            let key = |name: &str| format!("labelbox.webhook[{i}].{name}");
            check_webhook(hook, &key, &mut problem);
            if !seen.insert((hook.scope(), hook.url.as_str())) {
                problem(
                    key("url"),
                    "another [[labelbox.webhook]] has the same scope and url".into(),
                );
            }
        }
    }
}

/// The checks of one `[[labelbox.webhook]]` on its own.
fn check_webhook(
    hook: &LabelboxWebhook,
    key: &dyn Fn(&str) -> String,
    problem: &mut impl FnMut(String, String),
) {
    match (&hook.project, hook.organization) {
        (Some(p), false) if !p.trim().is_empty() && !p.contains(['"', '\\']) => {}
        (Some(_), false) => problem(key("project"), "must be a project id".into()),
        (None, true) => {}
        _ => problem(
            key("project"),
            "give either project = \"<id>\" or organization = true".into(),
        ),
    }
    if hook.topics.is_empty() {
        problem(key("topics"), "needs at least one topic".into());
    }
    for (j, topic) in hook.topics.iter().enumerate() {
        if !WEBHOOK_TOPICS.contains(&topic.as_str()) {
            problem(
                format!("{}[{j}]", key("topics")),
                format!(
                    "{topic:?} is not a topic a webhook can be made with (one of {})",
                    WEBHOOK_TOPICS.join(", ")
                ),
            );
        }
    }
    match reqwest::Url::parse(&hook.url) {
        Ok(url) if url.scheme() == "https" && url.fragment().is_none() => {
            if url.query_pairs().any(|(k, _)| k == SECRET_ID_PARAM) {
                problem(
                    key("url"),
                    format!("must not carry {SECRET_ID_PARAM}: labelhook adds it"),
                );
            }
        }
        _ => problem(
            key("url"),
            "must be an https:// URL without a #fragment (Labelbox calls HTTPS only)".into(),
        ),
    }
}
