//! `LABELHOOK_` variables that set nothing. An override spelt with single underscores
//! (`LABELHOOK_SERVER_LISTEN` for `LABELHOOK__SERVER__LISTEN`) would otherwise be ignored
//! without a word; `serve` logs a warning for each such variable and `check-config` prints one,
//! with the double-underscore form when the name reads as a key.
//!
//! Not reported: `LABELHOOK__...` (an override sets its key, or is a problem of its own), the
//! variables labelhook reads itself (`LABELHOOK_CONFIG`, and any a secret source names, such
//! as `{ env = "LABELHOOK_ADMIN_TOKEN" }`), those it gives a `command` handler's program (a
//! program that runs labelhook in turn inherits them), and the test suite's.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use super::load::SECRET_KEYS;
use super::{keys, Settings};

/// What an override starts with.
const OVERRIDE_PREFIX: &str = "LABELHOOK__";
/// What every variable of labelhook's starts with.
const PREFIX: &str = "LABELHOOK_";

/// Variables read or set elsewhere: by the command line (`--config`), by the `command` handler
/// for its program (see `handlers::command`), and by the test suite (README's quick start).
const KNOWN_ELSEWHERE: [&str; 9] = [
    "LABELHOOK_CONFIG",
    "LABELHOOK_DELIVERY_ID",
    "LABELHOOK_TOPIC",
    "LABELHOOK_ENTITY",
    "LABELHOOK_PROJECT_ID",
    "LABELHOOK_VERSION",
    "LABELHOOK_FRESH",
    "LABELHOOK_REQUIRE_SERVICES",
    "LABELHOOK_UPDATE_SCREENSHOTS",
];
/// The test suite's service addresses (`LABELHOOK_TEST_POSTGRES`, `LABELHOOK_TEST_NATS`).
const TEST_PREFIX: &str = "LABELHOOK_TEST_";

/// A `LABELHOOK_` variable that sets nothing, and what it was probably meant for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnusedVariable {
    pub variable: String,
    pub meant: Option<Meant>,
}

/// What an unused variable's name spells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Meant {
    /// The override of a key: `LABELHOOK__SERVER__LISTEN`.
    Override(String),
    /// A key whose value is a secret source (`admin.token`), which no override sets: the
    /// configuration names the variable instead.
    SecretSource(String),
}

impl fmt::Display for UnusedVariable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is set but sets nothing", self.variable)?;
        match &self.meant {
            Some(Meant::Override(variable)) => write!(
                f,
                "; did you mean {variable}? (an override has two underscores between its parts)"
            ),
            Some(Meant::SecretSource(key)) => {
                let (section, name) = key.rsplit_once('.').unwrap_or(("", key));
                write!(
                    f,
                    "; no secret source of the configuration names it (for {key}: \
                     {name} = {{ env = \"{}\" }} in [{section}])",
                    self.variable
                )
            }
            None => write!(
                f,
                "; an override is LABELHOOK__SECTION__KEY, with two underscores between the parts"
            ),
        }
    }
}

/// The `LABELHOOK_` variables of `env` that neither override a key nor are read by labelhook
/// (`settings` name the secret sources' variables), sorted by name.
pub fn unused_variables(env: &HashMap<String, String>, settings: &Settings) -> Vec<UnusedVariable> {
    let read: BTreeSet<&str> = settings
        .secret_sources()
        .filter_map(|source| source.env.as_deref())
        .collect();
    let mut found: Vec<UnusedVariable> = env
        .keys()
        .filter(|name| name.starts_with(PREFIX) && !name.starts_with(OVERRIDE_PREFIX))
        .filter(|name| !name.starts_with(TEST_PREFIX))
        .filter(|name| !KNOWN_ELSEWHERE.contains(&name.as_str()) && !read.contains(name.as_str()))
        .map(|name| UnusedVariable {
            variable: name.clone(),
            meant: meant_by(name),
        })
        .collect();
    found.sort_by(|a, b| a.variable.cmp(&b.variable));
    found
}

/// `LABELHOOK__SERVER__LISTEN` for `LABELHOOK_SERVER_LISTEN` (or a near miss of it).
fn meant_by(variable: &str) -> Option<Meant> {
    let spelt = variable.strip_prefix(PREFIX)?.to_lowercase();
    let keys = keys::overridable_keys();
    let flat: Vec<String> = keys.iter().map(|k| k.replace('.', "_")).collect();
    let near = keys::closest(&spelt, flat.iter().map(String::as_str))?;
    let key = flat
        .iter()
        .position(|f| f == near)
        .and_then(|i| keys.get(i))?;
    let last = key.rsplit('.').next().unwrap_or(key);
    Some(if SECRET_KEYS.contains(&last) {
        Meant::SecretSource(key.clone())
    } else {
        Meant::Override(format!(
            "{OVERRIDE_PREFIX}{}",
            key.to_uppercase().replace('.', "__")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretSource;

    fn env(names: &[&str]) -> HashMap<String, String> {
        names
            .iter()
            .map(|n| ((*n).to_owned(), "x".to_owned()))
            .collect()
    }

    #[test]
    fn a_single_underscore_override_is_named_with_the_form_it_meant() {
        let found = unused_variables(
            &env(&[
                "LABELHOOK_SERVER_LISTEN",
                "LABELHOOK_STORE_RETENTION_INTERVAL",
                "LABELHOOK_NOTHING_LIKE_A_KEY",
                "LABELHOOK__SERVER__LISTEN",
                "LABELHOOK_CONFIG",
                "LABELHOOK_TEST_POSTGRES",
                "OTHER_SERVER_LISTEN",
            ]),
            &Settings::default(),
        );
        let said: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            said,
            [
                "LABELHOOK_NOTHING_LIKE_A_KEY is set but sets nothing; an override is \
                 LABELHOOK__SECTION__KEY, with two underscores between the parts",
                "LABELHOOK_SERVER_LISTEN is set but sets nothing; did you mean \
                 LABELHOOK__SERVER__LISTEN? (an override has two underscores between its parts)",
                "LABELHOOK_STORE_RETENTION_INTERVAL is set but sets nothing; did you mean \
                 LABELHOOK__STORE__RETENTION__INTERVAL? (an override has two underscores \
                 between its parts)",
            ]
        );
    }

    #[test]
    fn a_variable_a_secret_source_names_is_read() {
        let mut settings = Settings::default();
        settings.admin.token = Some(SecretSource {
            env: Some("LABELHOOK_ADMIN_TOKEN".to_owned()),
            file: None,
            value: None,
        });
        let found = unused_variables(&env(&["LABELHOOK_ADMIN_TOKEN"]), &settings);
        assert!(found.is_empty(), "{found:?}");
        let found = unused_variables(&env(&["LABELHOOK_ADMIN_TOKEN"]), &Settings::default());
        let said: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            said,
            [
                "LABELHOOK_ADMIN_TOKEN is set but sets nothing; no secret source of the \
              configuration names it (for admin.token: token = { env = \"LABELHOOK_ADMIN_TOKEN\" } \
              in [admin])"
            ]
        );
    }
}
