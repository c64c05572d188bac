//! The vocabulary every module's settings are written in, below all of them: strict field
//! deserializers ([`de`]), where a secret comes from ([`SecretSource`]) and the secrets read
//! from those sources ([`Secrets`]), and a [`Problem`] found in a value, named by its key.
//!
//! Each module owns its settings, their defaults and their checks (`store::StoreSettings`,
//! `ingress::ServerSettings`, `handlers::HandlerSettings`, ...); `config` composes them, loads
//! the file and the environment into them and reports every problem at once. This module
//! imports nothing of ours, so that a module's settings never import `config`.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use secrecy::SecretString;
use serde::Deserialize;

/// Strict field deserializers; `de::duration` is for any duration key (`#[serde(with = ...)]`).
pub mod de;

/// A problem with the configuration, naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
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

impl SecretSource {
    /// Reads the secret. On failure: (key suffix, message), never the secret.
    pub fn resolve(&self, env: &HashMap<String, String>) -> Result<SecretString, (String, String)> {
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

/// Secrets resolved at load time, by their owner: an endpoint's name, a handler, the
/// model-training routes, the store, the admin token.
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
    pub const STORE: &'static str = "\0store";
    /// Key under which `[admin] token` is kept.
    pub const ADMIN_TOKEN: &'static str = "\0admin";

    /// Keeps `secrets` for `owner` (one of the keys above, an endpoint's name, or
    /// [`Secrets::handler_owner`]).
    pub fn insert(&mut self, owner: String, secrets: Vec<SecretString>) {
        self.by_owner.insert(owner, secrets);
    }

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
        self.for_endpoint(&Self::handler_owner(name))
    }

    /// One of a handler's single secrets (`token`, `password`, `credentials`), when given.
    pub fn handler_secret(&self, name: &str, key: &str) -> Option<&SecretString> {
        self.for_endpoint(&format!("{}:{key}", Self::handler_owner(name)))
            .first()
    }

    /// The key under which a handler's secrets are kept (cannot clash with an endpoint name).
    pub fn handler_owner(name: &str) -> String {
        format!("\0handler:{name}")
    }
}
