//! The database `store.url` names must exist before labelhook uses it. labelhook creates and
//! migrates its own tables, but not the database: that is the operator's (its owner, encoding,
//! backups and grants are decided there), and a misspelt name must not quietly become a
//! second, empty store that replicas split their deliveries across.
//!
//! So the first contact tells two cases apart. A server that answers "database does not exist"
//! is a configuration mistake: opening the store fails with one error that says how to create
//! the database, and `serve` does not start. A server that cannot be reached (down, refusing,
//! too slow) is an outage: the store opens as usual, and the service starts, answers 503 and
//! recovers by itself when the database is back.

use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::store::StoreError;

/// PostgreSQL's SQLSTATE for a database that does not exist (`invalid_catalog_name`).
const NO_SUCH_DATABASE: &str = "3D000";
/// How long the first contact may take; past it the server counts as unreachable.
const FIRST_CONTACT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects once: an error when the server says the database does not exist, `Ok` otherwise
/// (reached, or not reachable at all).
pub async fn require_database(
    url: &str,
    password: Option<&SecretString>,
) -> Result<(), StoreError> {
    let mut options = PgConnectOptions::from_str(url)
        .map_err(|_| StoreError::UnsupportedUrl(crate::store::redact_url(url)))?;
    if let Some(password) = password {
        options = options.password(password.expose_secret());
    }
    match tokio::time::timeout(FIRST_CONTACT_TIMEOUT, options.connect()).await {
        Ok(Ok(connection)) => {
            let _ = connection.close().await;
            Ok(())
        }
        Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some(NO_SUCH_DATABASE) => {
            Err(StoreError::MissingDatabase(missing(&options)))
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "database not reachable at start; starting all the same");
            Ok(())
        }
        Err(_) => {
            tracing::debug!("database did not answer at start; starting all the same");
            Ok(())
        }
    }
}

/// What to run: `createdb` on the same server, owned by the user labelhook connects as.
fn missing(options: &PgConnectOptions) -> String {
    let user = options.get_username();
    // PostgreSQL's own default: a database named after the user.
    let database = options.get_database().unwrap_or(user);
    let (host, port) = (options.get_host(), options.get_port());
    format!(
        "store.url names the database {database:?} on {host}:{port}, which does not exist. \
         labelhook creates its tables but not the database; create it, owned by {user:?}, as \
         a role that may create databases, then start again: createdb -h {} -p {port} -O {} {}",
        shell_word(host),
        shell_word(user),
        shell_word(database)
    )
}

/// `word` as a shell reads it back: bare when it is plain, else in single quotes.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | ':'));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_says_which_database_and_the_command_that_creates_it() {
        let options =
            PgConnectOptions::from_str("postgres://app:hunter2@db.internal:5433/lh").expect("url");
        let message = missing(&options);
        assert!(
            message.ends_with("createdb -h db.internal -p 5433 -O app lh"),
            "{message}"
        );
        assert!(message.contains("\"lh\" on db.internal:5433"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        assert_eq!(shell_word("label hook"), "'label hook'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }
}
