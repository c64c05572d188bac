//! The configuration as a whole: compiled defaults, then the TOML file, then
//! `LABELHOOK__SECTION__KEY` environment variables, then validation.
//!
//! Each module owns its section: its settings type, defaults and the checks that need nothing
//! but its own keys (`store::StoreSettings`, `ingress::ServerSettings`,
//! `handlers::HandlerSettings`, ...), written in the words of [`crate::settings`]. This module
//! composes them, loads them, adds the checks across sections, resolves the secrets, and
//! reports every problem at once; no module below imports it.
//!
//! Rules of thumb:
//! - every key of `config/labelhook.example.toml` has a field with the same name, and
//!   unknown keys are errors (a typo must not silently fall back to a default);
//! - every problem is reported with the path of its key (`endpoint[0].secrets[0].env: ...`),
//!   all problems at once, so an operator fixes a file in one pass;
//! - secrets are resolved here (env var, file or inline value) into [`SecretString`]s and are
//!   never part of an error message or a `Debug` output.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use secrecy::SecretString;

mod environment;
mod keys;
mod labelbox;
mod load;

pub use crate::console::AdminSettings;
pub use crate::dispatch::settings::{DispatchSettings, RouteSettings};
pub use crate::handlers::settings::{HandlerKind, HandlerSettings};
pub use crate::ingress::settings::{
    EndpointSettings, ForwardedHeader, ModelTrainingSettings, NetworkSettings, ServerSettings,
    LABELBOX_EGRESS,
};
pub use crate::labelbox::settings::{
    BackfillPayload, LabelboxSettings, LabelboxWebhook, LABELBOX_API_URL, MIN_POLL_INTERVAL,
    SECRET_ID_PARAM, WEBHOOK_TOPICS,
};
pub use crate::settings::{de, Problem, SecretSource, Secrets};
pub use crate::store::settings::{StoreSettings, MAX_INLINE_BODY_BYTES};
/// `[log]` is telemetry's own section.
pub use crate::telemetry::{LogFormat, LogSettings};
pub use environment::{unused_variables, Meant, UnusedVariable};
pub use load::EnvOverride;

/// Where the config file is looked for when neither `--config` nor `LABELHOOK_CONFIG` says.
pub const DEFAULT_CONFIG_PATH: &str = "config/labelhook.toml";

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

    /// Every environment variable the configuration reads a secret from: the `command`
    /// handler removes them from its children's environment (a script has no business seeing
    /// the webhook secret just because it inherits the service's environment).
    pub fn secret_env_vars(&self) -> Vec<String> {
        let mut vars: Vec<String> = self
            .secret_sources()
            .filter_map(|source| source.env.clone())
            .collect();
        vars.sort();
        vars.dedup();
        vars
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

    /// Every section's own checks, then those across sections. `unread_handlers` are
    /// `[[handler]]`s whose values were refused: a route naming one is not wrong.
    fn validate(&self, problems: &mut Vec<Problem>, unread_handlers: &BTreeSet<String>) {
        self.server.check(problems);
        if self.server.max_buffered_bytes < self.store.inline_body_max_bytes {
            problems.push(Problem::new(
                "server.max_buffered_bytes",
                "must be at least store.inline_body_max_bytes, or bodies of that size would \
                 always be refused",
            ));
        }
        self.store.check(problems);
        self.dispatch.check(problems);
        let sqlite = matches!(
            crate::store::Backend::from_url(&self.store.url),
            Ok(crate::store::Backend::Sqlite(_))
        );
        if sqlite && !self.dispatch.enabled {
            problems.push(Problem::new(
                "dispatch.enabled",
                "false needs a store shared with a replica that dispatches (PostgreSQL); \
                 with SQLite nothing would ever be handled",
            ));
        }
        self.network.check(problems);
        crate::ingress::settings::check_receivers(
            &self.endpoint,
            self.model_training.as_ref(),
            problems,
        );
        let handlers = crate::handlers::settings::check_handlers(&self.handler, problems);
        crate::dispatch::settings::check_routes(&self.route, &handlers, unread_handlers, problems);
    }

    /// Reads every secret the settings name, each problem added to `problems`.
    fn resolve_secrets(
        &self,
        env: &HashMap<String, String>,
        problems: &mut Vec<Problem>,
    ) -> Secrets {
        let mut secrets = Secrets::default();
        for (owner, key, sources) in self.secret_lists() {
            let resolved = sources
                .iter()
                .enumerate()
                .filter_map(|(j, source)| {
                    resolve_into(source, env, format!("{key}[{j}]"), problems)
                })
                .collect();
            secrets.insert(owner, resolved);
        }
        for (owner, key, source) in self.single_secrets() {
            if let Some(secret) = resolve_into(source, env, key, problems) {
                secrets.insert(owner, vec![secret]);
            }
        }
        secrets
    }

    /// The lists of secrets (any of them may sign): (owner, key, sources).
    fn secret_lists(&self) -> Vec<(String, String, &[SecretSource])> {
        let mut lists = Vec::new();
        for (i, ep) in self.endpoint.iter().enumerate() {
            lists.push((
                ep.name.clone(),
                format!("endpoint[{i}].secrets"),
                ep.secrets.as_slice(),
            ));
        }
        if let Some(mt) = &self.model_training {
            lists.push((
                Secrets::MODEL_TRAINING.to_owned(),
                "model_training.secrets".to_owned(),
                mt.secrets.as_slice(),
            ));
        }
        for (i, h) in self.handler.iter().enumerate() {
            if let Some(list) = &h.secrets {
                lists.push((
                    Secrets::handler_owner(&h.name),
                    format!("handler[{i}].secrets"),
                    list.as_slice(),
                ));
            }
        }
        lists
    }

    /// The single secrets: a `nats` handler's token, password and credentials, the admin
    /// token and the store's password: (owner, key, source).
    fn single_secrets(&self) -> Vec<(String, String, &SecretSource)> {
        let mut singles = Vec::new();
        for (i, h) in self.handler.iter().enumerate() {
            let own = [
                ("token", &h.token),
                ("password", &h.password),
                ("credentials", &h.credentials),
            ];
            for (key, source) in own {
                if let Some(source) = source {
                    let owner = format!("{}:{key}", Secrets::handler_owner(&h.name));
                    singles.push((owner, format!("handler[{i}].{key}"), source));
                }
            }
        }
        if let Some(source) = &self.admin.token {
            singles.push((
                Secrets::ADMIN_TOKEN.to_owned(),
                "admin.token".to_owned(),
                source,
            ));
        }
        if let Some(source) = &self.store.password {
            singles.push((
                Secrets::STORE.to_owned(),
                "store.password".to_owned(),
                source,
            ));
        }
        singles
    }
}

/// Reads `source`; a failure is added to `problems` under `key` (and the suffix that names
/// the part of the source at fault), never with the secret.
fn resolve_into(
    source: &SecretSource,
    env: &HashMap<String, String>,
    key: String,
    problems: &mut Vec<Problem>,
) -> Option<SecretString> {
    match source.resolve(env) {
        Ok(secret) => Some(secret),
        Err((suffix, message)) => {
            problems.push(Problem::new(format!("{key}{suffix}"), message));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::io::Write;
    use std::time::Duration;

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
