//! A handler written in Rust and plugged into labelhook: counts the objects of each fresh
//! label. Run it with a config whose route names `count` (see README, "Writing a handler in
//! Rust"): `LABELBOX_WEBHOOK_SECRET=devsecret cargo run --example custom_handler`.

use std::sync::Arc;

use async_trait::async_trait;
use labelhook::handlers::{Handler, HandlerError, HandlerEvent};

struct CountAnnotations;

#[async_trait]
impl Handler for CountAnnotations {
    async fn handle(&self, event: &HandlerEvent) -> Result<(), HandlerError> {
        if !event.fresh {
            return Ok(()); // a stale event, given only to routes with deliver_stale
        }
        let Some(body) = event.body.as_inline() else {
            return Err(HandlerError::Permanent(
                "large bodies are read as a stream (event.body.stream())".into(),
            ));
        };
        let label = labelhook::events::decode_label(body)
            .map_err(|e| HandlerError::Permanent(e.to_string()))?;
        let objects = label["objects"].as_array().map_or(0, Vec::len);
        tracing::info!(entity = ?event.entity, objects, "label counted");
        Ok(()) // Err(HandlerError::Retryable(..)) is retried with backoff
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = labelhook::config::Config::load_from_env("config/labelhook.toml".as_ref(), true)?;
    labelhook::telemetry::init_logging(&config.settings.log);
    let mut app = labelhook::Application::build(config).await?;
    // A route in the config names it: handlers = ["count"]
    app.handlers_mut()
        .register("count", Arc::new(CountAnnotations));
    println!("listening on http://{}", app.local_addr());
    app.run_until_stopped(labelhook::server::shutdown_signal())
        .await;
    Ok(())
}
