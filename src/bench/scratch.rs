//! Where the bench keeps its deliveries, made for the run and removed after it, so that a bench
//! never writes into a store that holds anything else.
//!
//! - SQLite (the default): a new database in a new temporary directory, below `--dir` when
//!   given (the disk matters: every answer waits for an fsync there).
//! - PostgreSQL (`--store postgres://...`): a database of its own, `labelhook_bench_<random>`,
//!   created on the server the URL names and dropped at the end. The database the URL names is
//!   only connected to, to create and drop the new one; nothing is written in it. The role
//!   needs the CREATEDB privilege.
//!
//! The CREATE and DROP DATABASE here are the only SQL outside `store`: they manage a database
//! around the store, never what is in it.

use std::path::{Path, PathBuf};

use sqlx::{Connection, Executor, PgConnection};

use crate::store::redact_url;

/// Why the bench's store could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    #[error("cannot create a directory for the bench below {}: {source}", dir.display())]
    Directory {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "--store {0}: not a PostgreSQL URL (postgres://USER@HOST[:PORT][/DATABASE]); \
         the SQLite bench needs no --store (--dir picks its disk)"
    )]
    NotPostgres(String),
    #[error("cannot connect to PostgreSQL at {server}: {source}")]
    Unreachable { server: String, source: sqlx::Error },
    #[error(
        "cannot create the bench's database {name} on {server}: {source} \
         (the role needs the CREATEDB privilege)"
    )]
    Create {
        name: String,
        server: String,
        source: sqlx::Error,
    },
    #[error("cannot drop the bench's database {name} on {server}: {source}; drop it by hand")]
    Drop {
        name: String,
        server: String,
        source: sqlx::Error,
    },
}

/// The run's store: its URL for the configuration, and what to remove afterwards.
pub struct Scratch {
    /// Holds the configuration file and, with SQLite, the database. Removed when dropped.
    dir: tempfile::TempDir,
    postgres: Option<ScratchDatabase>,
}

struct ScratchDatabase {
    /// The URL given, which reaches the server (and a database to connect to).
    admin_url: String,
    name: String,
}

impl Scratch {
    /// Makes the run's store: a temporary directory (below `dir` when given) and, for a
    /// PostgreSQL `store`, a new database on its server.
    pub async fn create(store: Option<&str>, dir: Option<&Path>) -> Result<Scratch, ScratchError> {
        let parent = dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let dir = tempfile::Builder::new()
            .prefix("labelhook-bench-")
            .tempdir_in(&parent)
            .map_err(|source| ScratchError::Directory {
                dir: parent,
                source,
            })?;
        let Some(url) = store else {
            return Ok(Scratch {
                dir,
                postgres: None,
            });
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ScratchError::NotPostgres(redact_url(url)));
        }
        let name = format!("labelhook_bench_{:08x}", fastrand::u32(..));
        let server = redact_url(url);
        let mut admin =
            PgConnection::connect(url)
                .await
                .map_err(|source| ScratchError::Unreachable {
                    server: server.clone(),
                    source,
                })?;
        // The name is ours (letters, digits, underscores): nothing to escape.
        let created = admin
            .execute(format!("CREATE DATABASE \"{name}\"").as_str())
            .await;
        let _ = admin.close().await;
        created.map_err(|source| ScratchError::Create {
            name: name.clone(),
            server,
            source,
        })?;
        Ok(Scratch {
            dir,
            postgres: Some(ScratchDatabase {
                admin_url: url.to_owned(),
                name,
            }),
        })
    }

    /// The temporary directory (the configuration goes here).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The store's URL, for `store.url`.
    pub fn url(&self) -> String {
        match &self.postgres {
            Some(db) => with_database(&db.admin_url, &db.name),
            None => format!("sqlite://{}", self.dir.path().join("bench.db").display()),
        }
    }

    /// Says which store, where, and that it goes away after the run.
    pub fn describe(&self) -> String {
        match &self.postgres {
            Some(db) => format!(
                "PostgreSQL at {}, in a database of its own, {}, dropped at the end",
                redact_url(&with_database(&db.admin_url, "")),
                db.name
            ),
            None => format!(
                "SQLite in {}, removed at the end",
                self.dir.path().display()
            ),
        }
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        if self.postgres.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
    }

    /// The name of the PostgreSQL database made for the run.
    pub fn database(&self) -> Option<&str> {
        self.postgres.as_ref().map(|db| db.name.as_str())
    }

    /// Drops the run's database (the directory goes when this is dropped). Call it once the
    /// service has closed its store.
    pub async fn remove(self) -> Result<(), ScratchError> {
        let Some(db) = self.postgres else {
            return Ok(());
        };
        let server = redact_url(&db.admin_url);
        let failed = |source| ScratchError::Drop {
            name: db.name.clone(),
            server: server.clone(),
            source,
        };
        let mut admin = PgConnection::connect(&db.admin_url).await.map_err(failed)?;
        // FORCE: a connection of the service's pool still closing must not keep it.
        let dropped = admin
            .execute(format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", db.name).as_str())
            .await;
        let _ = admin.close().await;
        dropped.map(|_| ()).map_err(failed)
    }
}

/// `url` naming the database `name` instead of its own (or none), keeping its user, host and
/// parameters.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map_or("", |q| &tail[q..]);
    format!("{scheme}://{authority}/{name}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_database_replaces_the_one_named_keeping_the_rest() {
        for (given, expected) in [
            ("postgres://u@h:5432", "postgres://u@h:5432/b"),
            ("postgres://u@h:5432/", "postgres://u@h:5432/b"),
            ("postgres://u:p@h/app", "postgres://u:p@h/b"),
            (
                "postgresql://u@h/app?sslmode=require",
                "postgresql://u@h/b?sslmode=require",
            ),
            (
                "postgres://u@h?sslmode=disable",
                "postgres://u@h/b?sslmode=disable",
            ),
        ] {
            assert_eq!(with_database(given, "b"), expected, "{given}");
        }
    }

    #[tokio::test]
    async fn a_store_url_that_is_not_postgres_is_refused_and_leaves_no_directory() {
        let parent = tempfile::tempdir().expect("temp");
        let e = Scratch::create(Some("sqlite://x.db"), Some(parent.path()))
            .await
            .err()
            .expect("refused");
        assert!(matches!(e, ScratchError::NotPostgres(_)), "{e}");
        let left: Vec<_> = std::fs::read_dir(parent.path()).expect("read").collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn a_sqlite_scratch_store_is_removed_with_its_directory() {
        let parent = tempfile::tempdir().expect("temp");
        let scratch = Scratch::create(None, Some(parent.path()))
            .await
            .expect("scratch");
        let dir = scratch.dir().to_owned();
        assert!(dir.starts_with(parent.path()) && dir.is_dir());
        assert!(scratch.url().starts_with("sqlite://"));
        assert!(scratch.describe().contains(&dir.display().to_string()));
        scratch.remove().await.expect("removed");
        assert!(!dir.exists());
    }
}
