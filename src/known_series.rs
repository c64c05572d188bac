//! The metric series known before anything happens, published when the service starts: every
//! counter at 0 and every histogram empty, for each label value the configuration already
//! tells (its endpoints, handlers, store back-end), so that `/metrics` lists every family from
//! its first scrape. A counter that only appears when it first moves is read by Prometheus as
//! starting at its first value: `increase()` misses that first event, and a dashboard shows "no
//! data" where it means 0.
//!
//! Gauges are not here: each is set by its first reading, which is made at start (the backlog,
//! the readiness probe, the pruner's statistics); a 0 put there first could be a lie.
//!
//! Label values that are not known in advance (a topic a delivery names, a status code other
//! than the usual one) appear when they first occur, as before.

use crate::config::Settings;
use crate::delivery::Status;
use crate::ingress::webhook::{MODEL_RUN_TOPIC, MODEL_TRAINING_ENDPOINT, OUTCOMES};
use crate::store::{AttemptKind, Backend};
use crate::telemetry;

/// The topic label of a delivery that names none; deliveries to a webhook endpoint are counted
/// under it until their topic is known.
const NO_TOPIC: &str = "none";
/// The canonical topics whose events the gate can find stale (a model run has no version).
const VERSIONED_TOPICS: [&str; 7] = [
    "LABEL_CREATED",
    "LABEL_UPDATED",
    "LABEL_DELETED",
    "WORKFLOW_ACTION",
    "REVIEW_CREATED",
    "REVIEW_UPDATED",
    "REVIEW_DELETED",
];

/// Publishes the known series, before the first request is served; `handlers` are the names
/// routes can give work to (configured and registered), when this process dispatches.
pub fn publish<'a>(settings: &Settings, handlers: impl Iterator<Item = &'a str>) {
    deliveries(settings);
    if let Ok(backend) = Backend::from_url(&settings.store.url) {
        // The label `telemetry::record_commit` is given by each back-end.
        let backend = match backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        };
        let _ = metrics::histogram!(telemetry::STORE_COMMIT_SECONDS, "backend" => backend);
        metrics::counter!(telemetry::STORE_REFUSALS_TOTAL, "backend" => backend).increment(0);
        let _ = metrics::histogram!(telemetry::STORE_COMMIT_BATCH_SIZE, "backend" => backend);
    }
    for status in Status::ALL.into_iter().filter(|s| *s != Status::Pending) {
        // Retention never deletes a delivery with work left.
        metrics::counter!("labelhook_pruned_deliveries_total", "status" => status.as_str())
            .increment(0);
    }
    metrics::counter!("labelhook_pruned_bodies_total").increment(0);
    if settings.dispatch.enabled {
        for topic in VERSIONED_TOPICS {
            metrics::counter!("labelhook_stale_events_total", "topic" => topic).increment(0);
        }
        for handler in handlers {
            handler_series(handler);
        }
    }
}

/// Every outcome of each endpoint, and its route's usual answer.
fn deliveries(settings: &Settings) {
    let mut sources: Vec<(String, &'static str)> = settings
        .endpoint
        .iter()
        .map(|e| (e.name.clone(), NO_TOPIC))
        .collect();
    let mut routes = vec![(crate::server::WEBHOOK_ROUTE.to_owned(), "POST", "202")];
    if let Some(mt) = &settings.model_training {
        sources.push((MODEL_TRAINING_ENDPOINT.to_owned(), MODEL_RUN_TOPIC));
        routes.push((format!("{}/model_run", mt.path), "POST", "202"));
        routes.push((format!("{}/models", mt.path), "GET", "200"));
    }
    for (endpoint, topic) in sources {
        for outcome in OUTCOMES {
            metrics::counter!(
                telemetry::DELIVERIES_TOTAL,
                "endpoint" => endpoint.clone(),
                "topic" => topic,
                "outcome" => outcome,
            )
            .increment(0);
        }
    }
    for (route, method, status) in routes {
        let _ = metrics::histogram!(
            "labelhook_http_request_duration_seconds",
            "route" => route.clone(),
            "method" => method,
            "status" => status,
        );
        metrics::counter!(
            "labelhook_http_requests_total",
            "route" => route,
            "method" => method,
            "status" => status,
        )
        .increment(0);
    }
}

/// A handler's attempts by outcome, failures, dead letters and attempt durations.
fn handler_series(handler: &str) {
    for outcome in [AttemptKind::Ok, AttemptKind::Retry, AttemptKind::Dead] {
        metrics::counter!(
            "labelhook_handler_attempts_total",
            "handler" => handler.to_owned(),
            "outcome" => outcome.as_str(),
        )
        .increment(0);
    }
    metrics::counter!(telemetry::HANDLER_FAILURES_TOTAL, "handler" => handler.to_owned())
        .increment(0);
    metrics::counter!(telemetry::DEAD_LETTERS_TOTAL, "handler" => handler.to_owned()).increment(0);
    let _ =
        metrics::histogram!(telemetry::HANDLER_ATTEMPT_SECONDS, "handler" => handler.to_owned());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Topic;

    #[test]
    fn the_versioned_topics_are_canonical_ones_other_than_the_model_runs() {
        for topic in VERSIONED_TOPICS {
            assert_eq!(Topic::metric_label(topic), topic);
        }
        assert!(!VERSIONED_TOPICS.contains(&MODEL_RUN_TOPIC));
    }
}
