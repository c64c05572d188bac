//! Routes: which handlers a delivery goes to, by topic glob and project id, and whether stale
//! events are wanted.

use wildmatch::WildMatch;

use super::settings::RouteSettings;
use crate::events::Topic;

/// One `[[route]]`, compiled.
#[derive(Debug)]
struct Route {
    topics: Vec<WildMatch>,
    /// The patterns as written: an unknown topic is routed only by `*` or its exact name.
    patterns: Vec<String>,
    project_ids: Vec<String>,
    handlers: Vec<String>,
    deliver_stale: bool,
}

/// Topic and project to handler names.
#[derive(Debug, Default)]
pub struct Routes {
    routes: Vec<Route>,
}

impl Routes {
    pub fn new(settings: &[RouteSettings]) -> Self {
        let routes = settings
            .iter()
            .map(|r| Route {
                topics: r.topics.iter().map(|t| WildMatch::new(t)).collect(),
                patterns: r.topics.clone(),
                project_ids: r.project_ids.clone(),
                handlers: r.handlers.clone(),
                deliver_stale: r.deliver_stale,
            })
            .collect();
        Self { routes }
    }

    /// Handler names for a delivery, without repeats, in route order. `recognized` is false
    /// for unknown topics and unparseable bodies, which only `*` or the exact topic match.
    pub fn select(
        &self,
        topic: &str,
        recognized: bool,
        project_id: Option<&str>,
        fresh: bool,
    ) -> Vec<String> {
        // The canonical name matters for aliases: a route naming WORKFLOW_ACTION takes MOVE.
        let canonical = Topic::parse(topic);
        let mut selected: Vec<String> = Vec::new();
        for route in &self.routes {
            if !fresh && !route.deliver_stale {
                continue;
            }
            let topic_matches = if recognized {
                route
                    .topics
                    .iter()
                    .any(|p| p.matches(topic) || p.matches(canonical.as_str()))
            } else {
                route.patterns.iter().any(|p| p == "*" || p == topic)
            };
            let project_matches = route.project_ids.is_empty()
                || project_id.is_some_and(|id| route.project_ids.iter().any(|p| p == id));
            if topic_matches && project_matches {
                for handler in &route.handlers {
                    if !selected.contains(handler) {
                        selected.push(handler.clone());
                    }
                }
            }
        }
        selected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(topics: &[&str], handlers: &[&str], projects: &[&str], stale: bool) -> RouteSettings {
        RouteSettings {
            topics: topics.iter().map(|s| (*s).to_owned()).collect(),
            handlers: handlers.iter().map(|s| (*s).to_owned()).collect(),
            project_ids: projects.iter().map(|s| (*s).to_owned()).collect(),
            deliver_stale: stale,
        }
    }

    #[test]
    fn routes_match_globs_aliases_projects_and_staleness() {
        let routes = Routes::new(&[
            route(&["LABEL_*"], &["archive"], &[], false),
            route(&["WORKFLOW_ACTION"], &["forward"], &["cproj1"], false),
            route(&["*"], &["audit"], &[], true),
            route(&["LABEL_UPDATED"], &["archive", "log"], &[], false),
        ]);
        assert_eq!(
            routes.select("LABEL_UPDATED", true, None, true),
            ["archive", "audit", "log"]
        );
        assert_eq!(routes.select("LABEL_UPDATED", true, None, false), ["audit"]);
        assert_eq!(
            routes.select("MOVE", true, Some("cproj1"), true),
            ["forward", "audit"]
        );
        assert_eq!(routes.select("MOVE", true, Some("other"), true), ["audit"]);
        // Unknown topics: only `*` (or their exact name), never a glob like LABEL_*.
        assert_eq!(
            routes.select("LABEL_SOMETHING_NEW", false, None, true),
            ["audit"]
        );
    }
}
