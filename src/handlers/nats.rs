//! The `nats` handler: publishes each event to a NATS JetStream stream and counts it done only
//! once the server has acknowledged it (stored it).
//!
//! Rules of thumb:
//! - `Nats-Msg-Id` is the delivery id, so a second publish of the same delivery (after a crash
//!   or a lost lease, which make labelhook hand a delivery on again) within the stream's
//!   duplicate window is dropped by JetStream: consumers see each delivery once;
//! - the message is the raw body as Labelbox sent it; what labelhook knows about it travels in
//!   headers (`Labelbox-Topic`, `Labelbox-Entity`, `Labelbox-Version`, `Labelbox-Fresh`, ...);
//! - a body larger than the server's `max_payload` goes to a JetStream object store
//!   (`<stream>_bodies`, streamed, never whole in memory) and the message carries a small JSON
//!   pointer to it instead (`Labelbox-Body-Object` names it);
//! - the stream is created when missing, with the subjects the template can produce;
//! - credentials (token, user and password, or a `.creds` file) come from the usual secret
//!   sources and are never printed; errors name the server's host, never the URL's user info.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::{ConnectOptions, HeaderMap};
use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::OnceCell;

use super::settings::HandlerSettings;
use super::{BuildError, Handler, HandlerError, HandlerEvent};
use crate::events::Topic;
use crate::settings::Secrets;

/// The stream used when `stream` is not set (README.md "Handlers and routes", and the
/// example configuration).
pub const DEFAULT_STREAM: &str = "LABELBOX";
/// The subject template used when `subject` is not set (documented in the same places).
pub const DEFAULT_SUBJECT: &str = "labelbox.{topic}.{project_id}";
/// How long a connection, a publish's ack or an object upload may take when `timeout` is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// What a missing value becomes in a subject (a subject token cannot be empty).
const MISSING: &str = "none";
/// Room kept beside the body for the message's headers when deciding whether it fits.
const HEADER_ROOM: usize = 4 * 1024;

/// A subject with `{topic}`, `{project_id}` and `{entity}` placeholders, each a whole token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    Topic,
    ProjectId,
    Entity,
}

impl SubjectTemplate {
    /// Checks and compiles a template; the error says what is wrong with it.
    pub fn parse(template: &str) -> Result<SubjectTemplate, String> {
        if template.is_empty() {
            return Err("must not be empty".to_owned());
        }
        let tokens = template
            .split('.')
            .map(|token| match token {
                "{topic}" => Ok(Token::Topic),
                "{project_id}" => Ok(Token::ProjectId),
                "{entity}" => Ok(Token::Entity),
                "" => Err("has an empty token (two dots in a row, or a dot at an end)".to_owned()),
                t if t.contains(['{', '}']) => Err(format!(
                    "token {t:?}: placeholders are {{topic}}, {{project_id}} and {{entity}}, \
                     each a whole token between dots"
                )),
                t if t.contains(['*', '>']) || t.chars().any(char::is_whitespace) => Err(format!(
                    "token {t:?}: wildcards and spaces cannot be published to"
                )),
                t => Ok(Token::Literal(t.to_owned())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SubjectTemplate { tokens })
    }

    /// The subject for one event; values are made safe for a subject token.
    pub fn render(&self, event: &HandlerEvent) -> String {
        let topic = match Topic::parse(&event.topic) {
            Topic::Unknown => event.topic.as_str(),
            // MOVE and WORKFLOW_ACTION are one topic: consumers subscribe to one name.
            known => known.as_str(),
        };
        self.tokens
            .iter()
            .map(|token| match token {
                Token::Literal(text) => text.clone(),
                Token::Topic => subject_token(Some(topic)),
                Token::ProjectId => subject_token(event.project_id.as_deref()),
                Token::Entity => subject_token(event.entity.as_deref()),
            })
            .collect::<Vec<_>>()
            .join(".")
    }

    /// The subjects a stream needs to take every subject this template renders: the literal
    /// prefix followed by `>`, or the subject itself when it has no placeholder.
    pub fn stream_subjects(&self) -> String {
        let literal: Vec<&str> = self
            .tokens
            .iter()
            .map_while(|t| match t {
                Token::Literal(text) => Some(text.as_str()),
                _ => None,
            })
            .collect();
        if literal.len() == self.tokens.len() {
            literal.join(".")
        } else if literal.is_empty() {
            ">".to_owned()
        } else {
            format!("{}.>", literal.join("."))
        }
    }
}

/// A value as one subject token: dots, wildcards and white space become `_`.
fn subject_token(value: Option<&str>) -> String {
    match value.filter(|v| !v.is_empty()) {
        None => MISSING.to_owned(),
        Some(v) => v
            .chars()
            .map(|c| {
                if matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control() {
                    '_'
                } else {
                    c
                }
            })
            .collect(),
    }
}

/// Whether JetStream takes `name` as a stream name.
pub fn check_stream_name(name: &str) -> Result<(), String> {
    let bad = name.is_empty()
        || name.len() > 200
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if bad {
        Err("must be 1-200 letters, digits, '-' or '_'".to_owned())
    } else {
        Ok(())
    }
}

/// How the handler proves who it is to the server.
enum Auth {
    None,
    Token(SecretString),
    UserPassword(String, SecretString),
    Credentials(SecretString),
}

/// Publishes events to a JetStream stream.
pub struct NatsHandler {
    name: String,
    url: String,
    /// Host and port for messages: never the URL's user info.
    target: String,
    stream: String,
    subject: SubjectTemplate,
    timeout: Duration,
    auth: Auth,
    // Connected on first use, and again after a failed first connection.
    connection: OnceCell<Connection>,
}

struct Connection {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    bodies: OnceCell<jetstream::object_store::ObjectStore>,
}

impl std::fmt::Debug for NatsHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = match self.auth {
            Auth::None => "none",
            Auth::Token(_) => "token",
            Auth::UserPassword(..) => "user and password",
            Auth::Credentials(_) => "credentials",
        };
        f.debug_struct("NatsHandler")
            .field("name", &self.name)
            .field("target", &self.target)
            .field("stream", &self.stream)
            .field("subject", &self.subject)
            .field("auth", &auth)
            .finish()
    }
}

impl NatsHandler {
    pub(super) fn from_settings(
        settings: &HandlerSettings,
        secrets: Option<&Secrets>,
    ) -> Result<NatsHandler, BuildError> {
        let name = settings.name.clone();
        let invalid = |key, problem: String| BuildError::Invalid {
            name: name.clone(),
            key,
            problem,
        };
        let url = settings.url.clone().ok_or_else(|| BuildError::Missing {
            name: name.clone(),
            kind: "nats",
            key: "url",
        })?;
        let stream = settings
            .stream
            .clone()
            .unwrap_or_else(|| DEFAULT_STREAM.to_owned());
        check_stream_name(&stream).map_err(|why| invalid("stream", why))?;
        let subject =
            SubjectTemplate::parse(settings.subject.as_deref().unwrap_or(DEFAULT_SUBJECT))
                .map_err(|why| invalid("subject", why))?;
        let secret = |key| secrets.and_then(|s| s.handler_secret(&name, key)).cloned();
        let auth = match (
            secret("token"),
            &settings.user,
            secret("password"),
            secret("credentials"),
        ) {
            (Some(token), None, None, None) => Auth::Token(token),
            (None, Some(user), Some(password), None) => Auth::UserPassword(user.clone(), password),
            (None, None, None, Some(creds)) => Auth::Credentials(creds),
            (None, None, None, None) => Auth::None,
            _ => {
                return Err(invalid(
                    "token",
                    "give one of token, user with password, or credentials".to_owned(),
                ))
            }
        };
        Ok(NatsHandler {
            target: host_of(&url),
            name,
            url,
            stream,
            subject,
            timeout: settings.timeout.unwrap_or(DEFAULT_TIMEOUT),
            auth,
            connection: OnceCell::new(),
        })
    }

    fn error(&self, what: &str, error: impl std::fmt::Display) -> HandlerError {
        HandlerError::Retryable(format!(
            "nats {} at {}: {what}: {error}",
            self.stream, self.target
        ))
    }

    async fn connection(&self) -> Result<&Connection, HandlerError> {
        self.connection
            .get_or_try_init(|| async {
                let options = match &self.auth {
                    Auth::None => ConnectOptions::new(),
                    Auth::Token(token) => {
                        ConnectOptions::with_token(token.expose_secret().to_owned())
                    }
                    Auth::UserPassword(user, password) => ConnectOptions::with_user_and_password(
                        user.clone(),
                        password.expose_secret().to_owned(),
                    ),
                    Auth::Credentials(creds) => {
                        ConnectOptions::with_credentials(creds.expose_secret())
                            // The parser's message may quote the file; say only that it failed.
                            .map_err(|_| self.error("credentials", "not a valid .creds file"))?
                    }
                };
                let client = options
                    .name("labelhook")
                    .connection_timeout(self.timeout)
                    .request_timeout(Some(self.timeout))
                    .connect(self.url.as_str())
                    .await
                    .map_err(|e| self.error("cannot connect", e.kind()))?;
                let jetstream = jetstream::new(client.clone());
                jetstream
                    .get_or_create_stream(jetstream::stream::Config {
                        name: self.stream.clone(),
                        subjects: vec![self.subject.stream_subjects()],
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| self.error("cannot find or create the stream", e))?;
                Ok(Connection {
                    client,
                    jetstream,
                    bodies: OnceCell::new(),
                })
            })
            .await
    }

    /// Streams a body too large for one message into the object store; returns its bucket and
    /// object name.
    async fn store_body(
        &self,
        connection: &Connection,
        event: &HandlerEvent,
    ) -> Result<(String, String), HandlerError> {
        let bucket = format!("{}_bodies", self.stream);
        let store = connection
            .bodies
            .get_or_try_init(|| async {
                connection
                    .jetstream
                    .create_object_store(jetstream::object_store::Config {
                        bucket: bucket.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| self.error("cannot find or create the object store", e))
            })
            .await?;
        // The same delivery always gets the same name: a retry overwrites, never duplicates.
        let object: String = format!("{}-{}", event.seq, event.delivery_id)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_=".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let stream = event
            .body
            .stream()
            .await
            .map_err(|e| self.error("cannot read the body", e))?;
        let mut reader = tokio_util::io::StreamReader::new(stream);
        store
            .put(object.as_str(), &mut reader)
            .await
            .map_err(|e| self.error("cannot store the body", e))?;
        Ok((bucket, object))
    }
}

/// `host:port` of a NATS URL, without user info.
fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
        .to_owned()
}

#[async_trait]
impl Handler for NatsHandler {
    async fn handle(&self, event: &HandlerEvent) -> Result<(), HandlerError> {
        let connection = self.connection().await?;
        let mut headers = HeaderMap::new();
        headers.insert("Labelbox-Delivery-Id", event.delivery_id.as_str());
        headers.insert("Labelbox-Topic", event.topic.as_str());
        if let Some(entity) = &event.entity {
            headers.insert("Labelbox-Entity", entity.as_str());
        }
        if let Some(version) = event.version {
            headers.insert("Labelbox-Version", version.to_string().as_str());
        }
        if let Some(project) = &event.project_id {
            headers.insert("Labelbox-Project-Id", project.as_str());
        }
        headers.insert("Labelbox-Fresh", if event.fresh { "true" } else { "false" });
        headers.insert("Labelhook-Origin", event.origin.as_str());
        let max_payload = connection.client.server_info().max_payload;
        let fits = event.body.len() + HEADER_ROOM as u64 <= max_payload as u64;
        let payload = if fits {
            headers.insert("Content-Type", "application/json");
            event
                .body
                .read_all()
                .await
                .map_err(|e| self.error("cannot read the body", e))?
        } else {
            let (bucket, object) = self.store_body(connection, event).await?;
            headers.insert(
                "Labelbox-Body-Object",
                format!("{bucket}/{object}").as_str(),
            );
            let pointer = serde_json::json!({
                "object_store": { "bucket": bucket, "object": object, "size": event.body.len() }
            });
            bytes::Bytes::from(pointer.to_string())
        };
        let publish = PublishMessage::build()
            .payload(payload)
            .headers(headers)
            .message_id(&event.delivery_id);
        let subject = self.subject.render(event);
        let ack = connection
            .jetstream
            .send_publish(subject, publish)
            .await
            .map_err(|e| self.error("publish failed", e))?;
        // Done only once the server has the message.
        tokio::time::timeout(self.timeout, ack)
            .await
            .map_err(|_| self.error("no ack", "timed out"))?
            .map_err(|e| self.error("no ack", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::{test_event, Payload};

    fn event(topic: &str, project: Option<&str>, entity: Option<&str>) -> HandlerEvent {
        let mut event = test_event(1, Payload::inline(bytes::Bytes::from_static(b"{}")), true);
        event.topic = topic.to_owned();
        event.project_id = project.map(str::to_owned);
        event.entity = entity.map(str::to_owned);
        event
    }

    #[test]
    fn subjects_render_from_the_event_with_safe_tokens() {
        let template = SubjectTemplate::parse("labelbox.{topic}.{project_id}.{entity}")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            template.render(&event("MOVE", Some("cproj"), Some("datarow:c1"))),
            "labelbox.WORKFLOW_ACTION.cproj.datarow:c1"
        );
        assert_eq!(
            template.render(&event("NEW THING.x*", None, Some("a.b>c"))),
            "labelbox.NEW_THING_x_.none.a_b_c"
        );
        assert_eq!(template.stream_subjects(), "labelbox.>");
        let fixed = SubjectTemplate::parse("events.labels").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fixed.stream_subjects(), "events.labels");
    }

    #[test]
    fn bad_templates_and_stream_names_say_why() {
        for bad in ["", "a..b", "a.{topic}x", "a.{nope}", "a.*", "a.>", "a b"] {
            assert!(SubjectTemplate::parse(bad).is_err(), "{bad:?}");
        }
        assert!(check_stream_name("LABELBOX-1_x").is_ok());
        for bad in ["", "a.b", "a b", "a*"] {
            assert!(check_stream_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn messages_never_show_user_info() {
        assert_eq!(
            host_of("nats://app:s3cret@nats.internal:4222"),
            "nats.internal:4222"
        );
        assert_eq!(host_of("tls://nats:4222/"), "nats:4222");
    }
}
