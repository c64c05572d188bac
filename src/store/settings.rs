//! `[store]`: where deliveries are kept and how, with its defaults and the checks that need
//! nothing but these keys. `config` composes it with the other sections.

use std::fmt;

use serde::Deserialize;

use super::{redact_url, Backend, RetentionSettings};
use crate::settings::{Problem, SecretSource};

/// Largest `store.inline_body_max_bytes`: SQLite rows stay far below its blob limits.
pub const MAX_INLINE_BODY_BYTES: u64 = 16 * 1024 * 1024;

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
    pub retention: RetentionSettings,
}

impl fmt::Debug for StoreSettings {
    // The URL may carry a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreSettings")
            .field("url", &redact_url(&self.url))
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
            retention: RetentionSettings::default(),
        }
    }
}

impl StoreSettings {
    /// The checks of `[store]` on its own, added to `problems`.
    pub fn check(&self, problems: &mut Vec<Problem>) {
        if self.inline_body_max_bytes > MAX_INLINE_BODY_BYTES {
            problems.push(Problem::new(
                "store.inline_body_max_bytes",
                "must be at most 16777216 (16 MiB); larger bodies belong in blob files",
            ));
        }
        if self.commit_batch_max == 0 {
            problems.push(Problem::new(
                "store.commit_batch_max",
                "must be greater than 0",
            ));
        }
        if self.max_connections < 2 {
            // One connection listens for other replicas' wake-ups; the rest do the work.
            problems.push(Problem::new("store.max_connections", "must be at least 2"));
        }
        match Backend::from_url(&self.url) {
            Err(_) => problems.push(Problem::new(
                "store.url",
                "must be sqlite://PATH or postgres://USER@HOST/DATABASE",
            )),
            Ok(Backend::Sqlite(_)) if self.password.is_some() => problems.push(Problem::new(
                "store.password",
                "is for a PostgreSQL store.url; SQLite has no password",
            )),
            Ok(_) => {}
        }
    }
}
