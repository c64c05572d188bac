//! A handler written in Rust and plugged into labelhook: one arm per kind of Labelbox event,
//! no parsing of its own. Run it with a config whose route names `count` (see README,
//! "Writing a handler in Rust"):
//!
//! ```sh
//! LABELBOX_WEBHOOK_SECRET=devsecret cargo run --example custom_handler
//! ```

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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The same file and variable `labelhook serve` reads.
    let path = std::env::var("LABELHOOK_CONFIG").unwrap_or_else(|_| "config/labelhook.toml".into());
    let config = labelhook::Config::load_from_env(path.as_ref(), true)?;
    labelhook::init_logging(&config.settings.log);
    let mut app = labelhook::Application::build(config).await?;
    // A route in the config names it: handlers = ["count"]
    app.handlers_mut()
        .register("count", Arc::new(CountAnnotations));
    println!("listening on http://{}", app.local_addr());
    app.run_until_stopped(labelhook::shutdown_signal()).await;
    Ok(())
}
