//! `[dispatch]` and `[[route]]`: how many lanes run at once and how long work is held, and
//! which handlers get which topics, with their checks.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;

use crate::settings::{de, Problem};

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

impl DispatchSettings {
    /// The checks of `[dispatch]` on its own, added to `problems`.
    pub fn check(&self, problems: &mut Vec<Problem>) {
        if self.concurrency == 0 {
            problems.push(Problem::new(
                "dispatch.concurrency",
                "must be greater than 0",
            ));
        }
        if self.lease < Duration::from_secs(1) {
            problems.push(Problem::new("dispatch.lease", "must be at least 1s"));
        }
        if self.attempt_timeout.is_zero() {
            problems.push(Problem::new(
                "dispatch.attempt_timeout",
                "must be greater than 0",
            ));
        }
    }
}

/// The checks of every `[[route]]`, added to `problems`. A route may name a handler of
/// `handlers` (those given) or of `unread` (given, but whose values were refused: the route
/// is not what is wrong).
pub fn check_routes(
    routes: &[RouteSettings],
    handlers: &BTreeSet<&str>,
    unread: &BTreeSet<String>,
    problems: &mut Vec<Problem>,
) {
    for (i, r) in routes.iter().enumerate() {
        if r.topics.is_empty() {
            problems.push(Problem::new(
                format!("route[{i}].topics"),
                "needs at least one topic glob",
            ));
        }
        if r.handlers.is_empty() {
            problems.push(Problem::new(
                format!("route[{i}].handlers"),
                "needs at least one handler",
            ));
        }
        for (j, name) in r.handlers.iter().enumerate() {
            if !handlers.contains(name.as_str()) && !unread.contains(name) {
                problems.push(Problem::new(
                    format!("route[{i}].handlers[{j}]"),
                    format!("no [[handler]] is named {name:?}"),
                ));
            }
        }
    }
}
