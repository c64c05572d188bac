//! A handler written in Rust and plugged into labelhook: one arm per kind of Labelbox event,
//! no parsing of its own (see README, "Writing a handler in Rust"). From the repository:
//!
//! ```sh
//! LABELBOX_WEBHOOK_SECRET=devsecret cargo run --example custom_handler
//! ```
//!
//! It reads `LABELHOOK_CONFIG`, else `examples/custom_handler.toml`, whose route names
//! `count` and which listens on 127.0.0.1:8081 with a database of its own, so it runs beside
//! the quick start's server.

use std::process::ExitCode;
use std::sync::Arc;

use async_trait::async_trait;
use labelhook::events::Event;
use labelhook::{Handler, HandlerError, HandlerEvent};

struct CountAnnotations;

#[async_trait]
impl Handler for CountAnnotations {
    async fn handle(&self, event: &HandlerEvent) -> Result<(), HandlerError> {
        if !event.fresh {
            return Ok(()); // a stale event, given only to routes with deliver_stale
        }
        match &event.event {
            Event::LabelCreated(label) | Event::LabelUpdated(label) => {
                // Decoded only when asked: the annotations can be hundreds of MiB.
                let content = event.label_content().await?.unwrap_or_default();
                let objects = content["objects"].as_array().map_or(0, Vec::len);
                tracing::info!(label = ?label.label_id, project = ?label.project_id, objects, "label counted");
            }
            Event::LabelDeleted(label) => {
                tracing::info!(label = ?label.label_id, "label deleted");
            }
            Event::WorkflowAction(action) => {
                tracing::info!(data_row = ?action.data_row_id, action = ?action.action, "moved");
            }
            Event::Review(review) => {
                tracing::info!(review = ?review.review_id, change = ?review.change, "review");
            }
            Event::ModelRun(run) => {
                tracing::info!(run = %run.model_run_id, model_type = %run.model_type, "train");
            }
            Event::Unknown(unknown) => {
                // The raw body is still there: event.body.stream() forwards it byte for byte.
                tracing::info!(topic = ?unknown.topic, bytes = event.body.len(), "unknown event");
            }
            // Labelbox may add kinds of events; a newer labelhook may hand them on.
            _ => {}
        }
        Ok(()) // Err(HandlerError::Retryable(..)) is retried with backoff
    }
}

/// The configuration when `LABELHOOK_CONFIG` does not name one.
const DEFAULT_CONFIG: &str = "examples/custom_handler.toml";

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Like the labelhook binary: `error: ...` lines.
            for line in e.lines() {
                eprintln!("error: {line}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let path = std::env::var("LABELHOOK_CONFIG").unwrap_or_else(|_| DEFAULT_CONFIG.to_owned());
    let config =
        labelhook::Config::load_from_env(path.as_ref(), true).map_err(|e| e.to_string())?;
    labelhook::init_logging(&config.settings.log);
    let mut app = labelhook::Application::build(config).await.map_err(|e| {
        use labelhook::{StartError, StoreError};
        // A SQLite database and a port are held by one process: say how to run beside one.
        let taken = matches!(
            e,
            StartError::Bind { .. } | StartError::Store(StoreError::Locked(_))
        );
        let hint = if taken {
            "\nanother process holds it: give this program a configuration of its own \
             (LABELHOOK_CONFIG), or another store and port, e.g. \
             LABELHOOK__STORE__URL=sqlite://data/other.db LABELHOOK__SERVER__LISTEN=127.0.0.1:8082"
        } else {
            ""
        };
        format!("{e}{hint}")
    })?;
    // A route in the config names it: handlers = ["count"]
    app.handlers_mut()
        .register("count", Arc::new(CountAnnotations));
    println!("listening on http://{}", app.local_addr());
    app.run_until_stopped(labelhook::shutdown_signal()).await;
    Ok(())
}
