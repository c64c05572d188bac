//! The `log` handler: one `tracing` event per delivery, at the configured level.
//!
//! It writes the delivery's identity (id, topic, entity, version, freshness) and never the body:
//! bodies can be large and hold customer data that does not belong in logs.

use async_trait::async_trait;
use tracing::Level;

use super::settings::HandlerSettings;
use super::{BuildError, Handler, HandlerError, HandlerEvent};

/// Logs each event's identity at a fixed level.
#[derive(Debug, Clone)]
pub struct LogHandler {
    name: String,
    level: Level,
}

impl LogHandler {
    /// A handler named `name` that logs at `level`.
    pub fn new(name: impl Into<String>, level: Level) -> LogHandler {
        LogHandler {
            name: name.into(),
            level,
        }
    }

    pub(super) fn from_settings(settings: &HandlerSettings) -> Result<LogHandler, BuildError> {
        let level = match &settings.level {
            None => Level::INFO,
            Some(text) => text.parse().map_err(|_| BuildError::Invalid {
                name: settings.name.clone(),
                key: "level",
                problem: "must be one of trace, debug, info, warn, error".to_owned(),
            })?,
        };
        Ok(LogHandler::new(settings.name.clone(), level))
    }
}

// `tracing` needs the level of an event at compile time, hence one arm per level.
macro_rules! log_event {
    ($level:expr, $handler:expr, $event:expr) => {
        tracing::event!(
            $level,
            handler = %$handler,
            seq = $event.seq,
            delivery_id = %$event.delivery_id,
            topic = %$event.topic,
            entity = $event.entity.as_deref(),
            version = $event.version.map(|v| v.to_string()),
            fresh = $event.fresh,
            "event"
        )
    };
}

#[async_trait]
impl Handler for LogHandler {
    async fn handle(&self, event: &HandlerEvent) -> Result<(), HandlerError> {
        match self.level {
            Level::TRACE => log_event!(Level::TRACE, self.name, event),
            Level::DEBUG => log_event!(Level::DEBUG, self.name, event),
            Level::INFO => log_event!(Level::INFO, self.name, event),
            Level::WARN => log_event!(Level::WARN, self.name, event),
            _ => log_event!(Level::ERROR, self.name, event),
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::handlers::{test_event, Payload};
    use std::sync::{Arc, Mutex};
    use tracing::instrument::WithSubscriber;

    /// Collects everything a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    async fn logged(handler: &LogHandler, event: &HandlerEvent) -> String {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_max_level(Level::TRACE)
            .with_ansi(false)
            .finish();
        handler
            .handle(event)
            .with_subscriber(subscriber)
            .await
            .unwrap();
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[tokio::test]
    async fn logs_the_identity_at_the_configured_level_and_never_the_body() {
        let body = Payload::inline(bytes::Bytes::from_static(
            b"{\"secret_text\":\"do not log\"}",
        ));
        let event = test_event(7, body, true);
        let text = logged(&LogHandler::new("audit", Level::WARN), &event).await;
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("WARN"), "{text}");
        for part in [
            "delivery-7",
            "LABEL_CREATED",
            "label:ckabc",
            "2024-05-02T08:30:12.5Z",
            "fresh=true",
            "handler=audit",
        ] {
            assert!(text.contains(part), "{part} missing in {text}");
        }
        assert!(!text.contains("do not log"), "{text}");
    }

    #[test]
    fn the_default_level_is_info_and_bad_levels_are_refused() {
        let settings: HandlerSettings =
            serde_json::from_value(serde_json::json!({"name": "l", "kind": "log"})).unwrap();
        assert_eq!(
            LogHandler::from_settings(&settings).unwrap().level,
            Level::INFO
        );
        let settings: HandlerSettings = serde_json::from_value(
            serde_json::json!({"name": "l", "kind": "log", "level": "loud"}),
        )
        .unwrap();
        let message = LogHandler::from_settings(&settings)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("\"l\"") && message.contains("level"),
            "{message}"
        );
    }
}
