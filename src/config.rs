//! Typed settings and their loading: compiled defaults, then the TOML file, then
//! `LABELHOOK__SECTION__KEY` environment variables, then validation.
//!
//! Rules of thumb:
//! - every key of `config/labelhook.example.toml` has a field here with the same name, and
//!   unknown keys are errors (a typo must not silently fall back to a default);
//! - every problem is reported with the path of its key (`endpoint[0].secrets[0].env: ...`),
//!   all problems at once, so an operator fixes a file in one pass;
//! - secrets are resolved here (env var, file or inline value) into [`SecretString`]s and are
//!   never part of an error message or a `Debug` output.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use secrecy::SecretString;
use serde::Deserialize;

/// Strict field deserializers; `de::duration` is for any duration key (`#[serde(with = ...)]`).
pub(crate) mod de;
mod environment;
mod keys;
mod labelbox;
mod load;

/// `[log]` is telemetry's own section.
pub use crate::telemetry::{LogFormat, LogSettings};
pub use environment::{unused_variables, Meant, UnusedVariable};
pub use labelbox::{
    BackfillPayload, LabelboxSettings, LabelboxWebhook, LABELBOX_API_URL, MIN_POLL_INTERVAL,
    SECRET_ID_PARAM, WEBHOOK_TOPICS,
};
pub use load::EnvOverride;

/// Where the config file is looked for when neither `--config` nor `LABELHOOK_CONFIG` says.
pub const DEFAULT_CONFIG_PATH: &str = "config/labelhook.toml";

/// Largest `store.inline_body_max_bytes`: SQLite rows stay far below its blob limits.
pub const MAX_INLINE_BODY_BYTES: u64 = 16 * 1024 * 1024;

/// Labelbox's published egress addresses (LABELBOX.md section 5), the default allowlist.
pub const LABELBOX_EGRESS: [&str; 4] = [
    "35.223.142.181/32",
    "34.135.127.45/32",
    "35.224.108.6/32",
    "34.10.80.254/32",
];

/// The whole configuration, as loaded and validated. Each section is read on its own (see
/// [`load`]), so that a wrong value in one does not hide the problems of the others; a new
/// top-level section is added here and in `load::Draft::read_sections`.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub server: ServerSettings,
    pub network: NetworkSettings,
    pub store: StoreSettings,
    pub dispatch: DispatchSettings,
    pub log: LogSettings,
    pub endpoint: Vec<EndpointSettings>,
    pub model_training: Option<ModelTrainingSettings>,
    pub handler: Vec<HandlerSettings>,
    pub route: Vec<RouteSettings>,
    pub admin: AdminSettings,
    /// `[labelbox]`: for the `labelhook labelbox` commands only.
    pub labelbox: Option<LabelboxSettings>,
    /// The keys set by `LABELHOOK__` variables, which win over the file: `serve` logs them
    /// and `check-config` prints them, so that a file's value silently ignored is visible.
    pub from_environment: Vec<EnvOverride>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address of the webhook listener; port 0 picks a free port.
    #[serde(deserialize_with = "de::socket_addr")]
    pub listen: SocketAddr,
    /// Address of the console (`/ui/`), /metrics, /healthz and /readyz: localhost unless said
    /// otherwise. They are never served on `listen`.
    #[serde(deserialize_with = "de::socket_addr")]
    pub admin_listen: SocketAddr,
    /// Bodies above this size are refused with 413.
    pub max_body_bytes: u64,
    /// A client that has not sent its request headers by then is disconnected.
    #[serde(with = "de::duration")]
    pub header_timeout: Duration,
    /// The whole body must arrive within this, or the request gets 408.
    #[serde(with = "de::duration")]
    pub body_timeout: Duration,
    /// Writes waiting for the store writer; above this, new deliveries get 503.
    pub queue_capacity: usize,
    /// Bodies being written to blob files at once. Their signature is only known once they
    /// have arrived, so this bounds the disk an unauthenticated sender can take to
    /// `max_spilling_bodies * max_body_bytes`; further large bodies wait their turn (within
    /// `body_timeout`) with their bytes left in the socket.
    pub max_spilling_bodies: usize,
    /// Of `max_spilling_bodies`, the most one client address may hold at once, so that one
    /// sender cannot take every slot; its further large bodies wait their turn.
    pub max_spilling_bodies_per_client: usize,
    /// A body must arrive at least this fast (bytes per second, counting only the time spent
    /// waiting for the client), or the request gets 408 and gives up what it held (a spill
    /// slot, buffered bytes, the connection); 0 turns the rule off.
    pub min_body_bytes_per_second: u64,
    /// How far a body may fall behind `min_body_bytes_per_second`: the time it may stall at
    /// its start, and at most at any point later.
    #[serde(with = "de::duration")]
    pub body_rate_grace: Duration,
    /// Connections served at once on each listener; beyond it, new connections are answered
    /// 503 at once and closed.
    pub max_connections: usize,
    /// Body bytes held in memory by all requests in flight together; a request whose next
    /// bytes would go beyond it gets 503.
    pub max_buffered_bytes: u64,
    /// How long shutdown waits for in-flight requests before closing them.
    #[serde(with = "de::duration")]
    pub shutdown_timeout: Duration,
    /// Deliveries waiting for their handlers beyond which answers are held back (up to
    /// `backlog_max_delay`), so that a sender slows down to what the handlers get; 0 never.
    pub backlog_limit: u64,
    /// The longest an answer is held back, reached when the backlog is twice the limit.
    #[serde(with = "de::duration")]
    pub backlog_max_delay: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            max_body_bytes: 1 << 30,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(300),
            queue_capacity: 4096,
            max_spilling_bodies: 4,
            max_spilling_bodies_per_client: 2,
            min_body_bytes_per_second: crate::ingress::body::DEFAULT_MIN_BODY_BYTES_PER_SECOND,
            body_rate_grace: crate::ingress::body::DEFAULT_BODY_RATE_GRACE,
            max_connections: 1024,
            max_buffered_bytes: 64 * 1024 * 1024,
            shutdown_timeout: Duration::from_secs(30),
            backlog_limit: crate::ingress::admission::DEFAULT_BACKLOG_LIMIT,
            backlog_max_delay: crate::ingress::admission::DEFAULT_MAX_DELAY,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSettings {
    /// Client addresses allowed to deliver.
    #[serde(deserialize_with = "de::cidrs")]
    pub allowlist: Vec<IpNet>,
    /// Skip the allowlist entirely; must be said explicitly.
    pub allow_all: bool,
    /// Peers whose forwarding header is believed.
    #[serde(deserialize_with = "de::cidrs")]
    pub trusted_proxies: Vec<IpNet>,
    /// The one header the trusted proxies maintain: the other is ignored, since a proxy passes
    /// a header it does not maintain through unchanged, as the client wrote it.
    pub forwarded_header: ForwardedHeader,
}

/// Which forwarding header carries the client address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For`, what nginx, ingress-nginx, AWS and GCP load balancers append to.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded`.
    Forwarded,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        Self {
            allowlist: LABELBOX_EGRESS
                .iter()
                .filter_map(|cidr| cidr.parse().ok())
                .collect(),
            allow_all: false,
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::XForwardedFor,
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// `sqlite://path/to/file.db` (created when missing) or `postgres://user@host/db`.
    pub url: String,
    /// Bodies larger than this are kept apart from the delivery's row (SQLite: a file beside
    /// the database; PostgreSQL: chunks in a table of their own) and streamed in and out.
    pub inline_body_max_bytes: u64,
    /// SQLite: most deliveries committed together in one transaction (group commit).
    pub commit_batch_max: usize,
    /// PostgreSQL: connections this process keeps to the database.
    pub max_connections: u32,
    /// PostgreSQL: the password, from a secret source (a Kubernetes secret file, say) rather
    /// than written into `url`; wins over a password in `url`.
    pub password: Option<SecretSource>,
    /// `[store.retention]`: how long deliveries and their bodies are kept.
    pub retention: crate::store::RetentionSettings,
}

impl fmt::Debug for StoreSettings {
    // The URL may carry a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreSettings")
            .field("url", &crate::store::redact_url(&self.url))
            .field("inline_body_max_bytes", &self.inline_body_max_bytes)
            .field("commit_batch_max", &self.commit_batch_max)
            .field("max_connections", &self.max_connections)
            .field("password", &self.password)
            .field("retention", &self.retention)
            .finish()
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            url: "sqlite://data/labelhook.db".to_owned(),
            inline_body_max_bytes: 64 * 1024,
            commit_batch_max: 256,
            max_connections: 16,
            password: None,
            retention: crate::store::RetentionSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchSettings {
    /// False: this process only receives and stores; other replicas on the same PostgreSQL
    /// database handle the deliveries.
    pub enabled: bool,
    /// Entity lanes handled at the same time.
    pub concurrency: usize,
    /// How long claimed work stays reserved for this process without being renewed. It is
    /// renewed every third of this while handlers run; work of a process that died is taken
    /// over by another once this has passed.
    #[serde(with = "de::duration")]
    pub lease: Duration,
    /// The longest one handler attempt may take, whatever the handler itself allows.
    #[serde(with = "de::duration")]
    pub attempt_timeout: Duration,
    /// How often the store is polled when nothing wakes the dispatcher earlier.
    #[serde(with = "de::duration")]
    pub poll_interval: Duration,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            concurrency: 32,
            lease: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(30 * 60),
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// Where a secret comes from: exactly one of the three.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    pub env: Option<String>,
    pub file: Option<PathBuf>,
    /// Inline secret, for development only.
    pub value: Option<String>,
}

impl fmt::Debug for SecretSource {
    // Never print an inline value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretSource")
            .field("env", &self.env)
            .field("file", &self.file)
            .field("value", &self.value.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSettings {
    /// Served at `POST /webhooks/{name}`.
    pub name: String,
    /// Every secret is tried, so a rotation can keep the old and the new one for a while.
    pub secrets: Vec<SecretSource>,
    /// Accept `X-Hub-Signature: sha1=...` when no `X-Hub-Signature-256` is sent.
    #[serde(default = "default_true")]
    pub accept_sha1: bool,
}

/// `[admin]`: who may use the console and `/metrics`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// When set, the console wants it at its login form and `/metrics` as
    /// `Authorization: Bearer <token>`; for an admin listener reachable from other machines.
    pub token: Option<SecretSource>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelTrainingSettings {
    /// Base path: `GET {path}/models`, `POST {path}/model_run`.
    pub path: String,
    pub secrets: Vec<SecretSource>,
    /// Keys of the `/models` answer; Labelbox sends the chosen one back as `modelType`.
    #[serde(default)]
    pub model_types: Vec<String>,
    /// Source addresses allowed to call the model-training routes (Labelbox publishes none
    /// for them); empty means `network.allowlist`.
    #[serde(default, deserialize_with = "de::cidrs")]
    pub allowlist: Vec<IpNet>,
    /// Identical model-run requests (they carry no delivery id) within this window are one
    /// request; "0s" makes each a new training request.
    #[serde(default = "default_duplicate_window", with = "de::duration")]
    pub duplicate_window: Duration,
}

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
    fn as_str(self) -> &'static str {
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
    fn keys(self) -> Vec<&'static str> {
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// Topic globs (`LABEL_*`); `*` also matches unknown topics.
    pub topics: Vec<String>,
    /// Handler names.
    pub handlers: Vec<String>,
    /// Only deliveries of these projects; empty means all.
    #[serde(default)]
    pub project_ids: Vec<String>,
    /// Hand stale events to these handlers too (marked `fresh = false`).
    #[serde(default)]
    pub deliver_stale: bool,
}

fn default_true() -> bool {
    true
}
fn default_duplicate_window() -> Duration {
    Duration::from_secs(600)
}
fn default_max_attempts() -> u32 {
    8
}
fn default_backoff() -> Duration {
    Duration::from_secs(1)
}

/// A problem with the configuration, naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the config file: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// Secrets resolved at load time, by endpoint name (and `model_training`).
#[derive(Clone, Default)]
pub struct Secrets {
    by_owner: HashMap<String, Vec<SecretString>>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counts: HashMap<_, _> = self.by_owner.iter().map(|(k, v)| (k, v.len())).collect();
        f.debug_struct("Secrets").field("count", &counts).finish()
    }
}

impl Secrets {
    /// Key under which the model-training callback's secrets are kept.
    pub const MODEL_TRAINING: &'static str = "\0model_training";
    /// Key under which the store's password is kept.
    const STORE: &'static str = "\0store";
    /// Key under which `[admin] token` is kept.
    const ADMIN_TOKEN: &'static str = "\0admin";

    /// `[admin] token`, when the configuration gives one.
    pub fn admin_token(&self) -> Option<&SecretString> {
        self.for_endpoint(Self::ADMIN_TOKEN).first()
    }

    /// `store.password`, when the configuration gives one.
    pub fn store_password(&self) -> Option<&SecretString> {
        self.for_endpoint(Self::STORE).first()
    }

    pub fn for_endpoint(&self, name: &str) -> &[SecretString] {
        self.by_owner.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn for_handler(&self, name: &str) -> &[SecretString] {
        self.for_endpoint(&handler_owner(name))
    }

    /// One of a handler's single secrets (`token`, `password`, `credentials`), when given.
    pub fn handler_secret(&self, name: &str, key: &str) -> Option<&SecretString> {
        self.for_endpoint(&format!("{}:{key}", handler_owner(name)))
            .first()
    }
}

/// The key under which a handler's secrets are kept (cannot clash with an endpoint name).
fn handler_owner(name: &str) -> String {
    format!("\0handler:{name}")
}

/// Settings plus everything resolved from them.
#[derive(Debug, Clone)]
pub struct Config {
    pub settings: Settings,
    pub secrets: Secrets,
}

impl Config {
    /// Loads `path` (a missing file is an error only when `required`), applies the
    /// `LABELHOOK__` variables of `env`, validates, and resolves the secrets. Every problem
    /// is reported at once.
    pub fn load(
        path: &Path,
        env: &HashMap<String, String>,
        required: bool,
    ) -> Result<Config, ConfigError> {
        let mut draft = load::read(path, env, required)?;
        draft.check();
        let mut found = Vec::new();
        let secrets = draft.settings.resolve_secrets(env, &mut found);
        draft.add_checked(found);
        let settings = draft.finish()?;
        Ok(Config { settings, secrets })
    }

    /// Loads with the process environment; what the binary does.
    pub fn load_from_env(path: &Path, required: bool) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::load(path, &env, required)
    }
}

impl load::Draft {
    /// The checks across keys, once the values are read.
    fn check(&mut self) {
        let mut found = Vec::new();
        self.settings.validate(&mut found, &self.unread_handlers);
        self.settings.validate_labelbox(&mut found);
        self.add_checked(found);
    }
}

impl Settings {
    /// Loads and validates the settings without resolving secrets: for commands that only
    /// need the store or an address and may run where the secrets are not present.
    pub fn load(
        path: &Path,
        env: &HashMap<String, String>,
        required: bool,
    ) -> Result<Settings, ConfigError> {
        let mut draft = load::read(path, env, required)?;
        draft.check();
        draft.finish()
    }

    /// The settings as far as they can be read, and the problems found (a wrong value is
    /// replaced by its default): for `healthcheck`, which needs only the listen addresses.
    pub fn load_lenient(
        path: &Path,
        env: &HashMap<String, String>,
        required: bool,
    ) -> Result<(Settings, Vec<Problem>), ConfigError> {
        let mut draft = load::read(path, env, required)?;
        draft.check();
        let settings = draft.settings.clone();
        match draft.finish() {
            Ok(_) => Ok((settings, Vec::new())),
            Err(ConfigError::Invalid(problems)) => Ok((settings, problems)),
            Err(other) => Err(other),
        }
    }

    /// The first secret of the `[[endpoint]]` named `name` (the first endpoint when `None`),
    /// for `sign` and `send` given a configuration.
    pub fn endpoint_secret(
        &self,
        name: Option<&str>,
        env: &HashMap<String, String>,
    ) -> Result<SecretString, ConfigError> {
        let invalid =
            |key: String, message: String| ConfigError::Invalid(vec![Problem { key, message }]);
        let found = match name {
            Some(name) => self
                .endpoint
                .iter()
                .enumerate()
                .find(|(_, e)| e.name == name),
            None => self.endpoint.iter().enumerate().next(),
        };
        let Some((i, endpoint)) = found else {
            let names: Vec<&str> = self.endpoint.iter().map(|e| e.name.as_str()).collect();
            return Err(invalid(
                "endpoint".to_owned(),
                match name {
                    Some(name) => {
                        format!("no [[endpoint]] is named {name:?} (there are {names:?})")
                    }
                    None => "the configuration has no [[endpoint]]".to_owned(),
                },
            ));
        };
        let Some(source) = endpoint.secrets.first() else {
            return Err(invalid(
                format!("endpoint[{i}].secrets"),
                "needs at least one secret".to_owned(),
            ));
        };
        source.resolve(env).map_err(|(suffix, message)| {
            invalid(format!("endpoint[{i}].secrets[0]{suffix}"), message)
        })
    }

    /// Every secret source the settings name: endpoints', model training's, handlers' (lists
    /// and single ones), the admin token and the store's password.
    pub fn secret_sources(&self) -> impl Iterator<Item = &SecretSource> {
        let endpoints = self.endpoint.iter().flat_map(|e| &e.secrets);
        let training = self.model_training.iter().flat_map(|m| &m.secrets);
        let handlers = self.handler.iter().flat_map(|h| {
            let lists = h.secrets.iter().flatten();
            lists.chain(h.token.iter().chain(&h.password).chain(&h.credentials))
        });
        let singles = self.admin.token.iter().chain(&self.store.password);
        endpoints.chain(training).chain(handlers).chain(singles)
    }

    /// Resolves `store.password` alone: for commands that reach the store without the other
    /// secrets (`events`).
    pub fn store_password(
        &self,
        env: &HashMap<String, String>,
    ) -> Result<Option<SecretString>, ConfigError> {
        let Some(source) = &self.store.password else {
            return Ok(None);
        };
        source.resolve(env).map(Some).map_err(|(suffix, message)| {
            ConfigError::Invalid(vec![Problem {
                key: format!("store.password{suffix}"),
                message,
            }])
        })
    }

    /// Checks across keys. `unread_handlers` are `[[handler]]`s whose values were refused:
    /// a route naming one is not wrong.
    fn validate(&self, problems: &mut Vec<Problem>, unread_handlers: &BTreeSet<String>) {
        let mut problem = |key: String, message: &str| {
            problems.push(Problem {
                key,
                message: message.to_owned(),
            })
        };
        if self.server.max_body_bytes == 0 {
            problem("server.max_body_bytes".into(), "must be greater than 0");
        }
        if self.server.max_spilling_bodies == 0 {
            problem(
                "server.max_spilling_bodies".into(),
                "must be greater than 0",
            );
        }
        if self.server.max_spilling_bodies_per_client == 0 {
            problem(
                "server.max_spilling_bodies_per_client".into(),
                "must be greater than 0",
            );
        }
        if self.server.max_connections == 0 {
            problem("server.max_connections".into(), "must be greater than 0");
        }
        if self.server.max_buffered_bytes < self.store.inline_body_max_bytes {
            problem(
                "server.max_buffered_bytes".into(),
                "must be at least store.inline_body_max_bytes, or bodies of that size would \
                 always be refused",
            );
        }
        let (listen, admin) = (self.server.listen, self.server.admin_listen);
        let overlapping = listen.ip() == admin.ip()
            || listen.ip().is_unspecified()
            || admin.ip().is_unspecified();
        if listen.port() == admin.port() && listen.port() != 0 && overlapping {
            problem(
                "server.admin_listen".into(),
                "must differ from server.listen: the console and /metrics are never served \
                 where webhooks come in",
            );
        }
        if self.server.queue_capacity == 0 {
            problem("server.queue_capacity".into(), "must be greater than 0");
        }
        if self.store.inline_body_max_bytes > MAX_INLINE_BODY_BYTES {
            problem(
                "store.inline_body_max_bytes".into(),
                "must be at most 16777216 (16 MiB); larger bodies belong in blob files",
            );
        }
        if self.store.commit_batch_max == 0 {
            problem("store.commit_batch_max".into(), "must be greater than 0");
        }
        if self.dispatch.concurrency == 0 {
            problem("dispatch.concurrency".into(), "must be greater than 0");
        }
        if self.dispatch.lease < Duration::from_secs(1) {
            problem("dispatch.lease".into(), "must be at least 1s");
        }
        if self.dispatch.attempt_timeout.is_zero() {
            problem("dispatch.attempt_timeout".into(), "must be greater than 0");
        }
        if self.store.max_connections < 2 {
            // One connection listens for other replicas' wake-ups; the rest do the work.
            problem("store.max_connections".into(), "must be at least 2");
        }
        match crate::store::Backend::from_url(&self.store.url) {
            Err(_) => problem(
                "store.url".into(),
                "must be sqlite://PATH or postgres://USER@HOST/DATABASE",
            ),
            Ok(crate::store::Backend::Sqlite(_)) if self.store.password.is_some() => problem(
                "store.password".into(),
                "is for a PostgreSQL store.url; SQLite has no password",
            ),
            Ok(crate::store::Backend::Sqlite(_)) if !self.dispatch.enabled => problem(
                "dispatch.enabled".into(),
                "false needs a store shared with a replica that dispatches (PostgreSQL); \
                 with SQLite nothing would ever be handled",
            ),
            Ok(_) => {}
        }
        if self.network.allowlist.is_empty() && !self.network.allow_all {
            problem(
                "network.allowlist".into(),
                "is empty, so every delivery would be refused; list addresses or set network.allow_all = true",
            );
        }
        if self.endpoint.is_empty() && self.model_training.is_none() {
            problem(
                "endpoint".into(),
                "no [[endpoint]] and no [model_training]: nothing would be received",
            );
        }
        let mut names = BTreeSet::new();
        for (i, ep) in self.endpoint.iter().enumerate() {
            let valid = !ep.name.is_empty()
                && ep
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid {
                problem(
                    format!("endpoint[{i}].name"),
                    "must be non-empty letters, digits, '-' or '_'",
                );
            }
            if !names.insert(ep.name.as_str()) {
                problem(format!("endpoint[{i}].name"), "is used by another endpoint");
            }
            if ep.secrets.is_empty() {
                problem(
                    format!("endpoint[{i}].secrets"),
                    "needs at least one secret",
                );
            }
        }
        if let Some(mt) = &self.model_training {
            if !mt.path.starts_with('/')
                || mt.path.ends_with('/')
                || mt.path.starts_with("/webhooks")
            {
                problem(
                    "model_training.path".into(),
                    "must start with '/', not end with '/', and not be under /webhooks",
                );
            }
            let plain = mt
                .path
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'));
            if !plain || mt.path.contains("//") {
                problem(
                    "model_training.path".into(),
                    "may only hold letters, digits, '/', '-', '_' and '.'",
                );
            }
            if ["/healthz", "/readyz", "/metrics"].contains(&mt.path.as_str()) {
                problem(
                    "model_training.path".into(),
                    "collides with a built-in route",
                );
            }
            if mt.secrets.is_empty() {
                problem("model_training.secrets".into(), "needs at least one secret");
            }
        }
        let mut handler_names = BTreeSet::new();
        for (i, h) in self.handler.iter().enumerate() {
            if h.name.is_empty() {
                problem(format!("handler[{i}].name"), "must not be empty");
            }
            if !handler_names.insert(h.name.as_str()) {
                problem(format!("handler[{i}].name"), "is used by another handler");
            }
            if h.max_attempts == 0 {
                problem(format!("handler[{i}].max_attempts"), "must be at least 1");
            }
            h.validate_kind_keys(i, &mut problem);
        }
        for (i, r) in self.route.iter().enumerate() {
            if r.topics.is_empty() {
                problem(
                    format!("route[{i}].topics"),
                    "needs at least one topic glob",
                );
            }
            if r.handlers.is_empty() {
                problem(format!("route[{i}].handlers"), "needs at least one handler");
            }
            for (j, name) in r.handlers.iter().enumerate() {
                if !handler_names.contains(name.as_str()) && !unread_handlers.contains(name) {
                    problem(
                        format!("route[{i}].handlers[{j}]"),
                        &format!("no [[handler]] is named {name:?}"),
                    );
                }
            }
        }
    }

    fn resolve_secrets(
        &self,
        env: &HashMap<String, String>,
        problems: &mut Vec<Problem>,
    ) -> Secrets {
        let mut secrets = Secrets::default();
        let mut resolve_all = |owner: String, key: String, sources: &[SecretSource]| {
            let resolved = sources
                .iter()
                .enumerate()
                .filter_map(|(j, s)| match s.resolve(env) {
                    Ok(secret) => Some(secret),
                    Err(message) => {
                        problems.push(Problem {
                            key: format!("{key}[{j}]{}", message.0),
                            message: message.1,
                        });
                        None
                    }
                })
                .collect();
            secrets.by_owner.insert(owner, resolved);
        };
        for (i, ep) in self.endpoint.iter().enumerate() {
            resolve_all(
                ep.name.clone(),
                format!("endpoint[{i}].secrets"),
                &ep.secrets,
            );
        }
        if let Some(mt) = &self.model_training {
            resolve_all(
                Secrets::MODEL_TRAINING.to_owned(),
                "model_training.secrets".to_owned(),
                &mt.secrets,
            );
        }
        for (i, h) in self.handler.iter().enumerate() {
            if let Some(list) = &h.secrets {
                resolve_all(
                    handler_owner(&h.name),
                    format!("handler[{i}].secrets"),
                    list,
                );
            }
        }
        // Single secrets of handlers (`nats`: token, password, credentials).
        for (i, h) in self.handler.iter().enumerate() {
            let singles = [
                ("token", &h.token),
                ("password", &h.password),
                ("credentials", &h.credentials),
            ];
            for (key, source) in singles {
                let Some(source) = source else { continue };
                match source.resolve(env) {
                    Ok(secret) => {
                        secrets
                            .by_owner
                            .insert(format!("{}:{key}", handler_owner(&h.name)), vec![secret]);
                    }
                    Err((suffix, message)) => problems.push(Problem {
                        key: format!("handler[{i}].{key}{suffix}"),
                        message,
                    }),
                }
            }
        }
        if let Some(source) = &self.admin.token {
            match source.resolve(env) {
                Ok(token) => {
                    secrets
                        .by_owner
                        .insert(Secrets::ADMIN_TOKEN.to_owned(), vec![token]);
                }
                Err((suffix, message)) => problems.push(Problem {
                    key: format!("admin.token{suffix}"),
                    message,
                }),
            }
        }
        match self.store_password(env) {
            Ok(Some(password)) => {
                secrets
                    .by_owner
                    .insert(Secrets::STORE.to_owned(), vec![password]);
            }
            Ok(None) => {}
            Err(ConfigError::Invalid(found)) => problems.extend(found),
            Err(other) => problems.push(Problem {
                key: "store.password".to_owned(),
                message: other.to_string(),
            }),
        }
        secrets
    }
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
            if let Err(why) = crate::handlers::nats::check_stream_name(stream) {
                problem(format!("handler[{i}].stream"), &why);
            }
        }
        if let Some(subject) = &self.subject {
            if let Err(why) = crate::handlers::nats::SubjectTemplate::parse(subject) {
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

impl SecretSource {
    /// Reads the secret. On failure: (key suffix, message), never the secret.
    fn resolve(&self, env: &HashMap<String, String>) -> Result<SecretString, (String, String)> {
        match (&self.env, &self.file, &self.value) {
            (Some(var), None, None) => match env.get(var) {
                Some(v) if !v.is_empty() => Ok(SecretString::from(v.clone())),
                _ => Err((
                    ".env".into(),
                    format!("environment variable {var} is not set or empty"),
                )),
            },
            (None, Some(path), None) => match std::fs::read_to_string(path) {
                // Kubernetes secret files often end with a newline that is not part of the secret.
                Ok(v) if !v.trim_end_matches(['\n', '\r']).is_empty() => Ok(SecretString::from(
                    v.trim_end_matches(['\n', '\r']).to_owned(),
                )),
                Ok(_) => Err((".file".into(), format!("{} is empty", path.display()))),
                Err(e) => Err((
                    ".file".into(),
                    format!("cannot read {}: {e}", path.display()),
                )),
            },
            (None, None, Some(v)) if !v.is_empty() => Ok(SecretString::from(v.clone())),
            (None, None, Some(_)) => Err((".value".into(), "is empty".into())),
            _ => Err((
                String::new(),
                "give exactly one of env, file or value".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::io::Write;

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(toml.as_bytes()).expect("write");
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::load(file.path(), &env, true)
    }

    fn problems(result: Result<Config, ConfigError>) -> String {
        match result {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected a config error"),
        }
    }

    const MINIMAL: &str = r#"
[[endpoint]]
name = "labelbox"
secrets = [{ env = "LB_SECRET" }]
"#;

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let config = load_str(MINIMAL, &[("LB_SECRET", "s3cret")]).expect("valid");
        let s = &config.settings;
        assert_eq!(s.server.listen, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(s.server.max_body_bytes, 1_073_741_824);
        assert_eq!(s.server.header_timeout, Duration::from_secs(10));
        assert_eq!(s.server.body_timeout, Duration::from_secs(300));
        assert_eq!(s.network.allowlist.len(), 4);
        assert!(!s.network.allow_all);
        assert_eq!(s.store.url, "sqlite://data/labelhook.db");
        let secrets = config.secrets.for_endpoint("labelbox");
        assert_eq!(secrets.len(), 1);
        assert_eq!(secrets[0].expose_secret(), "s3cret");
    }

    #[test]
    fn environment_overrides_name_section_and_key() {
        let config = load_str(
            MINIMAL,
            &[
                ("LB_SECRET", "x"),
                ("LABELHOOK__SERVER__MAX_BODY_BYTES", "1234"),
                ("LABELHOOK__NETWORK__ALLOWLIST", "10.0.0.0/8,192.168.1.1/32"),
                ("LABELHOOK__NETWORK__ALLOW_ALL", "true"),
                ("LABELHOOK__SERVER__BODY_TIMEOUT", "5s"),
            ],
        )
        .expect("valid");
        assert_eq!(config.settings.server.max_body_bytes, 1234);
        assert_eq!(config.settings.network.allowlist.len(), 2);
        assert!(config.settings.network.allow_all);
        assert_eq!(config.settings.server.body_timeout, Duration::from_secs(5));
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let text = format!("{MINIMAL}\n[server]\nlisten_addr = \"0.0.0.0:1\"\n");
        let message = problems(load_str(&text, &[("LB_SECRET", "x")]));
        assert!(message.contains("server"), "{message}");
        assert!(message.contains("listen_addr"), "{message}");
    }

    #[test]
    fn an_unknown_key_is_told_the_near_miss_and_in_a_handler_only_its_kinds_keys() {
        let text = format!(
            "{MINIMAL}\n[sever]\nlisten = \"127.0.0.1:1\"\n\
             [[handler]]\nname = \"a\"\nkind = \"file\"\npth = \"x.jsonl\"\n\
             [[handler]]\nname = \"b\"\nkind = \"command\"\nargs = [\"true\"]\nsteps = 3\n\
             [[endpoint]]\nnme = \"other\"\nsecrets = [{{ value = \"x\" }}]\n"
        );
        let message = problems(load_str(
            &text,
            &[
                ("LB_SECRET", "x"),
                ("LABELHOOK__SERVER__LISTN", "127.0.0.1:2"),
            ],
        ));
        let lines: Vec<&str> = message.lines().collect();
        assert_eq!(
            lines,
            [
                "server.listn: unknown key; did you mean `listen`? (set by LABELHOOK__SERVER__LISTN)",
                "endpoint[1].nme: unknown key; did you mean `name`?",
                "handler[0].pth: unknown key for kind \"file\"; did you mean `path`?",
                "handler[1].args: unknown key for kind \"command\"; did you mean `argv`?",
                "handler[1].steps: unknown key for kind \"command\", which takes `name`, `kind`, \
                 `max_attempts`, `backoff`, `argv`, `timeout`",
                "sever: unknown key; did you mean `server`?",
            ],
            "{message}"
        );
        // A key of another kind says which keys this kind has.
        let text = format!("{MINIMAL}\n[[handler]]\nname = \"a\"\nkind = \"file\"\npath = \"x\"\nurl = \"http://h\"\n");
        let message = problems(load_str(&text, &[("LB_SECRET", "x")]));
        assert_eq!(
            message,
            "handler[0].url: is not a key of kind \"file\" (its own keys: `path`)"
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let text = format!("{MINIMAL}\n[network]\nallowlist = [\"not-a-cidr\"]\n");
        let message = problems(load_str(&text, &[("LB_SECRET", "x")]));
        assert!(message.starts_with("network.allowlist"), "{message}");
    }

    #[test]
    fn missing_secret_names_the_key_and_never_the_value() {
        let text = r#"
[[endpoint]]
name = "labelbox"
secrets = [{ value = "inline-dev-secret" }, { env = "NOT_SET_ANYWHERE" }]
"#;
        let message = problems(load_str(text, &[]));
        assert!(message.contains("endpoint[0].secrets[1].env"), "{message}");
        assert!(!message.contains("inline-dev-secret"), "{message}");
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let text = r#"
[[endpoint]]
name = "bad name"
secrets = []

[[handler]]
name = "fwd"
kind = "http"
path = "x.jsonl"

[[route]]
topics = ["LABEL_*"]
handlers = ["nope"]
"#;
        let message = problems(load_str(text, &[]));
        for key in [
            "endpoint[0].name",
            "endpoint[0].secrets",
            "handler[0].path",
            "handler[0].url",
            "route[0].handlers[0]",
        ] {
            assert!(message.contains(key), "{key} missing in {message}");
        }
    }

    #[test]
    fn a_malformed_secrets_key_is_named_without_its_value() {
        let text = "[[endpoint]]\nname = \"lb\"\nsecrets = \"hunter2\"\n";
        let message = problems(load_str(text, &[]));
        assert!(message.contains("endpoint[0].secrets"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn secret_files_lose_their_trailing_newline() {
        let mut secret = tempfile::NamedTempFile::new().expect("temp");
        secret.write_all(b"from-a-file\n").expect("write");
        let text = format!(
            "[[endpoint]]\nname = \"lb\"\nsecrets = [{{ file = {:?} }}]\n",
            secret.path().display().to_string()
        );
        let config = load_str(&text, &[]).expect("valid");
        assert_eq!(
            config.secrets.for_endpoint("lb")[0].expose_secret(),
            "from-a-file"
        );
    }

    #[test]
    fn debug_output_redacts_inline_secrets() {
        let text = "[[endpoint]]\nname = \"lb\"\nsecrets = [{ value = \"hunter2\" }]\n";
        let config = load_str(text, &[]).expect("valid");
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
    }

    #[test]
    fn store_urls_are_sqlite_or_postgres_and_never_shown_with_their_password() {
        let text = format!("{MINIMAL}\n[store]\nurl = \"mysql://app:hunter2@db/x\"\n");
        let message = problems(load_str(&text, &[("LB_SECRET", "x")]));
        assert!(message.contains("store.url"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        let text = format!("{MINIMAL}\n[store]\nurl = \"postgres://app:hunter2@db/x\"\n");
        let config = load_str(&text, &[("LB_SECRET", "x")]).expect("valid");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn the_store_password_comes_from_a_secret_source_and_is_never_shown() {
        let mut file = tempfile::NamedTempFile::new().expect("temp");
        file.write_all(b"pg-pass\n").expect("write");
        let text = format!(
            "{MINIMAL}\n[store]\nurl = \"postgres://app@db/x\"\npassword = {{ file = {:?} }}\n",
            file.path().display().to_string()
        );
        let config = load_str(&text, &[("LB_SECRET", "x")]).expect("valid");
        let password = config.secrets.store_password().expect("resolved");
        assert_eq!(password.expose_secret(), "pg-pass");
        assert!(!format!("{config:?}").contains("pg-pass"));

        let text =
            format!("{MINIMAL}\n[store]\nurl = \"postgres://app@db/x\"\npassword = \"hunter2\"\n");
        let message = problems(load_str(&text, &[("LB_SECRET", "x")]));
        assert!(message.contains("store.password"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        let text = format!(
            "{MINIMAL}\n[store]\nurl = \"postgres://app@db/x\"\npassword = {{ env = \"PG_PW\" }}\n"
        );
        let message = problems(load_str(&text, &[("LB_SECRET", "x")]));
        assert!(message.contains("store.password.env"), "{message}");
    }

    #[test]
    fn booleans_are_booleans_and_durations_are_strings_with_a_unit() {
        let text = format!(
            "{MINIMAL}\n[server]\nbody_timeout = 300\n[[handler]]\nname = \"h\"\nkind = \"log\"\n\
             [[route]]\ntopics = [\"*\"]\nhandlers = [\"h\"]\ndeliver_stale = \"yes\"\n"
        );
        let message = problems(load_str(&text, &[("LB_SECRET", "x")]));
        let lines: Vec<&str> = message.lines().collect();
        assert!(
            lines.contains(&"server.body_timeout: expected a duration like \"300s\", got 300"),
            "{message}"
        );
        assert!(
            lines.contains(&"route[0].deliver_stale: expected true or false, got \"yes\""),
            "{message}"
        );
        // TOML booleans stay booleans, and the environment's "true" is one too.
        let text = format!("{MINIMAL}\n[network]\nallow_all = true\n");
        let config = load_str(&text, &[("LB_SECRET", "x")]).expect("valid");
        assert!(config.settings.network.allow_all);
        let config = load_str(
            MINIMAL,
            &[
                ("LB_SECRET", "x"),
                ("LABELHOOK__NETWORK__ALLOW_ALL", "TRUE"),
            ],
        )
        .expect("valid");
        assert!(config.settings.network.allow_all);
        // A bare number from the environment is refused like one in the file, naming the
        // variable.
        let message = problems(load_str(
            MINIMAL,
            &[
                ("LB_SECRET", "x"),
                ("LABELHOOK__SERVER__BODY_TIMEOUT", "300"),
            ],
        ));
        assert_eq!(
            message,
            "server.body_timeout: expected a duration like \"300s\", got 300 \
             (set by LABELHOOK__SERVER__BODY_TIMEOUT)"
        );
    }

    #[test]
    fn every_bad_value_is_reported_in_one_run_with_its_key_and_value() {
        let text = r#"
[server]
listen = "localhost:8080"
header_timeout = "soon"
listen_port = 8080

[network]
allowlist = ["10.0.0.0/8", "not-a-cidr", "192.0.2.7", "also bad"]
allow_all = "no"

[[endpoint]]
name = "labelbox"
secrets = [{ env = "NOT_SET_ANYWHERE" }]

[[handler]]
name = "broken"
kind = "htp"

[[handler]]
name = "archive"
kind = "file"

[[route]]
topics = ["*"]
handlers = ["broken", "archive", "missing"]
deliver_stale = 1
"#;
        let message = problems(load_str(text, &[]));
        let expected = [
            "server.listen: expected an IP address and port like \"0.0.0.0:8080\" or \"[::1]:8080\", got \"localhost:8080\"",
            "server.header_timeout: expected a duration like \"300s\", got \"soon\"",
            "server.listen_port: unknown key",
            "network.allowlist[1]: expected a CIDR like \"10.0.0.0/8\" or \"192.0.2.7/32\", got \"not-a-cidr\"",
            "network.allowlist[2]: expected a CIDR like \"10.0.0.0/8\" or \"192.0.2.7/32\", got \"192.0.2.7\"",
            "network.allowlist[3]: expected a CIDR like \"10.0.0.0/8\" or \"192.0.2.7/32\", got \"also bad\"",
            "network.allow_all: expected true or false, got \"no\"",
            "handler[0].kind: expected one of `log`, `file`, `http`, `command`, `nats`, got \"htp\"",
            "handler[1].path: is required for kind \"file\"",
            "route[0].deliver_stale: expected true or false, got 1",
            "route[0].handlers[2]: no [[handler]] is named \"missing\"",
            "endpoint[0].secrets[0].env: environment variable NOT_SET_ANYWHERE is not set or empty",
        ];
        for line in expected {
            assert!(
                message.lines().any(|l| l.starts_with(line)),
                "{line:?} missing in\n{message}"
            );
        }
        // The handler that could not be read is not also reported as missing by the route.
        assert!(!message.contains("named \"broken\""), "{message}");
        assert_eq!(message.lines().count(), expected.len(), "{message}");
    }

    #[test]
    fn a_syntax_error_names_the_file_and_never_shows_its_lines() {
        let text = "[[endpoint]]\nname = \"lb\"\nsecrets = [{ value = \"hunter2\" }\n";
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(text.as_bytes()).expect("write");
        let message = match Config::load(file.path(), &HashMap::new(), true) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected a syntax error"),
        };
        let path = file.path().display().to_string();
        assert!(
            message.starts_with(&format!("{path}: not valid TOML: line 3")),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn values_under_secret_keys_are_never_shown() {
        for text in [
            "[[endpoint]]\nname = \"lb\"\nsecrets = [{ value = 8675309 }]\n",
            "[[endpoint]]\nname = \"lb\"\nsecrets = [{ valu = \"x\" }, \"8675309\"]\n",
            "[[endpoint]]\nname = \"lb\"\nsecrets = [{ value = \"x\" }]\n\
             [store]\nurl = \"postgres://u@h/db\"\npassword = 8675309\n",
            "[[endpoint]]\nname = \"lb\"\nsecrets = [{ value = \"x\" }]\n\
             [[handler]]\nname = \"bus\"\nkind = \"nats\"\nurl = \"nats://h:4222\"\ntoken = { value = [8675309] }\n",
        ] {
            let message = problems(load_str(text, &[]));
            assert!(!message.contains("8675309"), "{message}");
            assert!(message.contains("not shown"), "{message}");
        }
    }

    #[test]
    fn keys_set_by_the_environment_are_listed_with_what_they_override() {
        let text = format!("{MINIMAL}\n[server]\nlisten = \"127.0.0.1:8080\"\n");
        let config = load_str(
            &text,
            &[
                ("LB_SECRET", "x"),
                ("LABELHOOK__SERVER__LISTEN", "0.0.0.0:9000"),
                ("LABELHOOK__LOG__FORMAT", "json"),
            ],
        )
        .expect("valid");
        assert_eq!(
            config.settings.from_environment,
            vec![
                EnvOverride {
                    key: "log.format".into(),
                    variable: "LABELHOOK__LOG__FORMAT".into(),
                    overrides_file: false,
                },
                EnvOverride {
                    key: "server.listen".into(),
                    variable: "LABELHOOK__SERVER__LISTEN".into(),
                    overrides_file: true,
                },
            ]
        );
        assert_eq!(
            config.settings.server.listen,
            "0.0.0.0:9000".parse().expect("addr")
        );
    }

    #[test]
    fn an_ingest_only_replica_needs_a_shared_store() {
        let text = format!("{MINIMAL}\n[dispatch]\nenabled = false\n");
        let message = problems(load_str(&text, &[("LB_SECRET", "x")]));
        assert!(message.contains("dispatch.enabled"), "{message}");
        let text = format!(
            "{MINIMAL}\n[dispatch]\nenabled = false\n[store]\nurl = \"postgres://u@h/db\"\n"
        );
        assert!(load_str(&text, &[("LB_SECRET", "x")]).is_ok());
    }
}
