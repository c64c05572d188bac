//! `[[handler]]`: the settings of each handler, whatever its kind, with their defaults and
//! checks (the keys each kind takes, the `nats` handler's own rules).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::settings::{de, Problem, SecretSource};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerKind {
    Log,
    File,
    Http,
    Command,
    Nats,
}

/// The keys every `[[handler]]` takes, whatever its kind.
const HANDLER_COMMON_KEYS: [&str; 4] = ["name", "kind", "max_attempts", "backoff"];

impl HandlerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Log => "log",
            Self::File => "file",
            Self::Http => "http",
            Self::Command => "command",
            Self::Nats => "nats",
        }
    }

    /// The keys of this kind besides [`HANDLER_COMMON_KEYS`]: those it requires, and those it
    /// may have.
    fn own_keys(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Self::Log => (&[], &["level"]),
            Self::File => (&["path"], &[]),
            Self::Http => (&["url"], &["timeout", "allowed_hosts", "secrets"]),
            Self::Command => (&["argv"], &["timeout"]),
            Self::Nats => (
                &["url"],
                &[
                    "stream",
                    "subject",
                    "timeout",
                    "token",
                    "user",
                    "password",
                    "credentials",
                ],
            ),
        }
    }

    /// Every key a `[[handler]]` of this kind takes.
    pub fn keys(self) -> Vec<&'static str> {
        let (required, optional) = self.own_keys();
        HANDLER_COMMON_KEYS
            .iter()
            .chain(required)
            .chain(optional)
            .copied()
            .collect()
    }
}

/// One `[[handler]]`. Flat rather than an enum per kind so that a key given to the wrong kind
/// is reported with its name (an internally tagged enum cannot deny unknown fields well).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerSettings {
    pub name: String,
    pub kind: HandlerKind,
    /// Attempts per delivery before it is dead-lettered for this handler.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt, with jitter.
    #[serde(default = "default_backoff", with = "de::duration")]
    pub backoff: Duration,
    /// `file`: the JSON-lines file.
    pub path: Option<PathBuf>,
    /// `http`: where to POST; `nats`: the server.
    pub url: Option<String>,
    /// `http` and `command`: per-attempt time limit.
    #[serde(default, with = "de::duration::option")]
    pub timeout: Option<Duration>,
    /// `http`: hosts the handler may reach (default: the host of `url` only).
    pub allowed_hosts: Option<Vec<String>>,
    /// `http`: secrets for the fresh `X-Hub-Signature` (default: none, unsigned).
    pub secrets: Option<Vec<SecretSource>>,
    /// `command`: program and arguments, no shell.
    pub argv: Option<Vec<String>>,
    /// `nats`: the JetStream stream, created when missing.
    pub stream: Option<String>,
    /// `nats`: subject template with `{topic}`, `{project_id}` and `{entity}`.
    pub subject: Option<String>,
    /// `nats`: a token for the server.
    pub token: Option<SecretSource>,
    /// `nats`: a user name, with `password`.
    pub user: Option<String>,
    /// `nats`: the password of `user`.
    pub password: Option<SecretSource>,
    /// `nats`: a `.creds` file's contents (JWT and NKey seed), usually `{ file = "..." }`.
    pub credentials: Option<SecretSource>,
    /// `log`: level of the line written per event.
    pub level: Option<String>,
}

fn default_max_attempts() -> u32 {
    8
}
fn default_backoff() -> Duration {
    Duration::from_secs(1)
}

/// The checks of every `[[handler]]`, added to `problems`; the names given, for the routes
/// that name them.
pub fn check_handlers<'a>(
    handlers: &'a [HandlerSettings],
    problems: &mut Vec<Problem>,
) -> BTreeSet<&'a str> {
    let mut problem = |key: String, message: &str| problems.push(Problem::new(key, message));
    let mut names = BTreeSet::new();
    for (i, h) in handlers.iter().enumerate() {
        if h.name.is_empty() {
            problem(format!("handler[{i}].name"), "must not be empty");
        }
        if !names.insert(h.name.as_str()) {
            problem(format!("handler[{i}].name"), "is used by another handler");
        }
        if h.max_attempts == 0 {
            problem(format!("handler[{i}].max_attempts"), "must be at least 1");
        }
        h.validate_kind_keys(i, &mut problem);
    }
    names
}

impl HandlerSettings {
    /// Checks that each kind gets the keys it needs and no key meant for another kind.
    fn validate_kind_keys(&self, i: usize, problem: &mut impl FnMut(String, &str)) {
        let given = [
            ("path", self.path.is_some()),
            ("url", self.url.is_some()),
            ("timeout", self.timeout.is_some()),
            ("allowed_hosts", self.allowed_hosts.is_some()),
            ("secrets", self.secrets.is_some()),
            ("argv", self.argv.is_some()),
            ("stream", self.stream.is_some()),
            ("subject", self.subject.is_some()),
            ("level", self.level.is_some()),
            ("token", self.token.is_some()),
            ("user", self.user.is_some()),
            ("password", self.password.is_some()),
            ("credentials", self.credentials.is_some()),
        ];
        let (required, optional) = self.kind.own_keys();
        let kind = self.kind.as_str();
        let own = || {
            let keys: Vec<String> = required
                .iter()
                .chain(optional)
                .map(|k| format!("`{k}`"))
                .collect();
            keys.join(", ")
        };
        for (key, present) in given {
            if present && !required.contains(&key) && !optional.contains(&key) {
                problem(
                    format!("handler[{i}].{key}"),
                    &format!("is not a key of kind {kind:?} (its own keys: {})", own()),
                );
            }
            if !present && required.contains(&key) {
                problem(
                    format!("handler[{i}].{key}"),
                    &format!("is required for kind {kind:?}"),
                );
            }
        }
        if self.kind == HandlerKind::Nats {
            self.validate_nats(i, problem);
        }
        if self.argv.as_ref().is_some_and(Vec::is_empty) {
            problem(format!("handler[{i}].argv"), "must name a program");
        }
        if let (HandlerKind::Http, Some(url)) = (self.kind, &self.url) {
            if reqwest::Url::parse(url).map_or(true, |u| !matches!(u.scheme(), "http" | "https")) {
                problem(
                    format!("handler[{i}].url"),
                    "must be an http:// or https:// URL",
                );
            }
        }
        if let Some(level) = &self.level {
            if level.parse::<tracing::Level>().is_err() {
                problem(
                    format!("handler[{i}].level"),
                    "must be one of trace, debug, info, warn, error",
                );
            }
        }
    }
}

impl HandlerSettings {
    /// The `nats` handler's own rules: a nats:// URL, a stream name JetStream accepts, a
    /// subject template whose placeholders are whole tokens, one way to authenticate.
    fn validate_nats(&self, i: usize, problem: &mut impl FnMut(String, &str)) {
        if let Some(url) = &self.url {
            let scheme_ok = ["nats://", "tls://"].iter().any(|s| url.starts_with(s));
            if !scheme_ok {
                problem(
                    format!("handler[{i}].url"),
                    "must be a nats:// or tls:// URL",
                );
            }
        }
        if let Some(stream) = &self.stream {
            if let Err(why) = super::nats::check_stream_name(stream) {
                problem(format!("handler[{i}].stream"), &why);
            }
        }
        if let Some(subject) = &self.subject {
            if let Err(why) = super::nats::SubjectTemplate::parse(subject) {
                problem(format!("handler[{i}].subject"), &why);
            }
        }
        let ways = [
            self.token.is_some(),
            self.user.is_some() || self.password.is_some(),
            self.credentials.is_some(),
        ];
        if ways.iter().filter(|w| **w).count() > 1 {
            problem(
                format!("handler[{i}].token"),
                "give one of token, user with password, or credentials",
            );
        }
        if self.user.is_some() != self.password.is_some() {
            problem(
                format!("handler[{i}].password"),
                "user and password go together",
            );
        }
    }
}
