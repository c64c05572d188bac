//! Handlers: what is done with a delivery once it is stored, parsed and through the ordering
//! gate.
//!
//! Rules of thumb:
//! - a [`Handler`] makes exactly one attempt per call; retries, backoff and dead letters belong to
//!   the dispatcher, which only needs to know whether a failure is worth retrying;
//! - handlers know nothing of HTTP ingress or SQL: they get a [`HandlerEvent`], whose body is
//!   either in memory or kept by the store and read as a stream, never whole;
//! - built-ins (`log`, `file`, `http`, `command`) are built from `[[handler]]` settings by
//!   [`build`]; a Rust user adds their own with [`Registry::register`];
//! - no secret ever reaches a log line or an error message.

mod command;
mod file;
mod http;
mod log;
pub(crate) mod nats;
pub mod settings;

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::prelude::{Engine as _, BASE64_STANDARD};
use futures_util::StreamExt;
use secrecy::SecretString;
use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};

pub use crate::delivery::Payload;
use crate::events::Event;
use crate::settings::Secrets;
pub use settings::{HandlerKind, HandlerSettings};

pub use command::CommandHandler;
pub use file::FileHandler;
pub use http::HttpHandler;
pub use log::LogHandler;
pub use nats::NatsHandler;

/// Size of the buffers a stored body is written out through, so memory stays bounded whatever
/// the body size.
pub const BODY_CHUNK_BYTES: usize = 64 * 1024;

/// What a handler is given: one delivery, parsed and gated. Match on [`HandlerEvent::event`];
/// the raw body is there too, as a stream, for handlers that forward bytes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HandlerEvent {
    /// Store sequence number.
    pub seq: i64,
    pub delivery_id: String,
    /// As received (`X-Labelbox-Event`), `MODEL_RUN` for model runs, `""` when absent.
    pub topic: String,
    /// The typed event.
    pub event: Event,
    /// The entity key the ordering gate used, e.g. `label:ck...`.
    pub entity: Option<String>,
    /// The version the ordering gate used (displays as RFC 3339).
    pub version: Option<crate::ordering::Version>,
    /// `false` when the ordering gate found the event stale (routes with `deliver_stale`).
    pub fresh: bool,
    pub project_id: Option<String>,
    /// RFC 3339.
    pub received_at: String,
    /// `false` for authentic but unparseable bodies.
    pub body_is_json: bool,
    /// The raw body, exactly as Labelbox sent it (for a backfill: as labelhook rebuilt it
    /// from Labelbox's export).
    pub body: Payload,
    /// Sent by Labelbox to a webhook, or recovered by `labelhook labelbox backfill`.
    pub origin: crate::delivery::Origin,
}

impl HandlerEvent {
    /// The label's annotations, decoded (Labelbox double-encodes them in v1 bodies), for the
    /// three label events; `None` for other events. The annotations can be hundreds of MiB:
    /// they are read from the body only when asked, on a blocking thread for stored bodies.
    /// An error is [`HandlerError::Permanent`] when the body holds no readable annotations,
    /// [`HandlerError::Retryable`] when the body could not be read.
    pub async fn label_content(&self) -> Result<Option<serde_json::Value>, HandlerError> {
        let Some(label) = self.event.label() else {
            return Ok(None);
        };
        let permanent = |e: crate::events::ParseError| HandlerError::Permanent(e.to_string());
        if let Some(bytes) = self.body.as_inline() {
            return crate::events::label_content(label, bytes)
                .map(Some)
                .map_err(permanent);
        }
        let retryable =
            |e: std::io::Error| HandlerError::Retryable(format!("reading the label failed: {e}"));
        let reader = self.body.blocking_reader().await.map_err(retryable)?;
        let label = label.clone();
        tokio::task::spawn_blocking(move || {
            crate::events::label_content_reader(&label, std::io::BufReader::new(reader))
        })
        .await
        .map_err(|e| HandlerError::Retryable(format!("decoding the label failed: {e}")))?
        .map(Some)
        .map_err(permanent)
    }
}

/// Outcome of a failed attempt; the dispatcher retries only [`HandlerError::Retryable`].
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Might work later (I/O, timeouts, 5xx, non-zero exit).
    #[error("{0}")]
    Retryable(String),
    /// Will not work however often it is tried (e.g. a 4xx answer); dead-lettered at once.
    #[error("{0}")]
    Permanent(String),
}

/// Does something with an event. Object-safe (through `async_trait`) so handlers of any kind
/// live side by side as `Arc<dyn Handler>`.
#[async_trait::async_trait]
pub trait Handler: Send + Sync {
    /// One attempt at handling `event`.
    async fn handle(&self, event: &HandlerEvent) -> Result<(), HandlerError>;

    /// Whether [`Handler::handle_batch`] does better than one [`Handler::handle`] per event
    /// (one fsync for many lines, say). Only then does the dispatcher hand it batches.
    fn handles_batches(&self) -> bool {
        false
    }

    /// One attempt at each of `events`, consecutive deliveries of one entity in lane order, at
    /// once. `Ok` only when every one of them was handled. After an error the dispatcher tries
    /// them again one at a time, in order, so that each failure is pinned on its own event;
    /// a handler that may have done part of a batch must be fine with doing it again, as it
    /// must be for any retry.
    async fn handle_batch(&self, events: &[HandlerEvent]) -> Result<(), HandlerError> {
        for event in events {
            self.handle(event).await?;
        }
        Ok(())
    }
}

/// A `[[handler]]` that cannot be built; every variant names the handler.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("handler {name:?}: {key} is required for kind {kind:?}")]
    Missing {
        name: String,
        kind: &'static str,
        key: &'static str,
    },
    #[error("handler {name:?}: {key} {problem}")]
    Invalid {
        name: String,
        key: &'static str,
        problem: String,
    },
    #[error("handler {name:?}: the host {host:?} of url is not in allowed_hosts")]
    HostNotAllowed { name: String, host: String },
    #[error("handler {name:?}: cannot build the HTTP client: {source}")]
    HttpClient {
        name: String,
        #[source]
        source: reqwest::Error,
    },
}

/// Builds the configured handler. `secrets` are the handler's resolved secrets (http signing).
pub fn build(
    settings: &HandlerSettings,
    secrets: &[SecretString],
) -> Result<Arc<dyn Handler>, BuildError> {
    build_with(settings, secrets, &[], None)
}

/// [`build`], plus the names of environment variables that hold labelhook's own secrets, which
/// the `command` handler removes from its children's environment: a script has no business
/// seeing the webhook secret just because it inherits the service's environment.
fn build_with(
    settings: &HandlerSettings,
    secrets: &[SecretString],
    secret_env_vars: &[String],
    all_secrets: Option<&Secrets>,
) -> Result<Arc<dyn Handler>, BuildError> {
    Ok(match settings.kind {
        HandlerKind::Log => Arc::new(LogHandler::from_settings(settings)?),
        HandlerKind::File => Arc::new(FileHandler::from_settings(settings)?),
        HandlerKind::Http => Arc::new(HttpHandler::from_settings(settings, secrets)?),
        HandlerKind::Command => {
            Arc::new(CommandHandler::from_settings(settings)?.without_env(secret_env_vars))
        }
        HandlerKind::Nats => Arc::new(NatsHandler::from_settings(settings, all_secrets)?),
    })
}

/// Handlers by name: the configured ones plus any a Rust user registers.
#[derive(Default)]
pub struct Registry {
    // A BTreeMap so `names()` is in a stable order (logs, `check-config` output).
    handlers: BTreeMap<String, Arc<dyn Handler>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("names", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Builds every `[[handler]]` with the secrets read for them; stops at the first that
    /// cannot be built. `secret_env_vars`: the environment variables that hold labelhook's own
    /// secrets, which no `command` handler's child inherits.
    pub fn build_all(
        handlers: &[HandlerSettings],
        secrets: &Secrets,
        secret_env_vars: &[String],
    ) -> Result<Registry, BuildError> {
        let mut registry = Registry::new();
        for settings in handlers {
            let own = secrets.for_handler(&settings.name);
            let handler = build_with(settings, own, secret_env_vars, Some(secrets))?;
            registry.register(settings.name.clone(), handler);
        }
        Ok(registry)
    }

    /// Adds `handler` under `name`, replacing a same-named one.
    pub fn register(&mut self, name: impl Into<String>, handler: Arc<dyn Handler>) {
        self.handlers.insert(name.into(), handler);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Handler>> {
        self.handlers.get(name)
    }

    /// Names of all handlers, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }
}

/// The fields written before the body, in this order.
#[derive(Serialize)]
struct EventHeader<'a> {
    seq: i64,
    delivery_id: &'a str,
    topic: &'a str,
    entity: Option<&'a str>,
    version: Option<String>,
    fresh: bool,
    project_id: Option<&'a str>,
    received_at: &'a str,
    /// Only on events a backfill recovered (`"backfill"`): a line without it came by webhook.
    #[serde(skip_serializing_if = "crate::delivery::Origin::is_webhook")]
    origin: crate::delivery::Origin,
    body_encoding: BodyEncoding,
}

/// How a line's `body` holds the delivery's bytes, stated in the line as `body_encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyEncoding {
    /// The body's JSON itself, embedded.
    Json,
    /// A JSON string holding the body, which is UTF-8 text but not JSON.
    Text,
    /// A base64 string (standard alphabet, padded) of the exact bytes, which are not UTF-8
    /// text. JSON text must be UTF-8, and a body with stray bytes inside a string can still
    /// pass a JSON parser that skips what it does not need.
    Base64,
}

/// Writes the event as one JSON object (no trailing newline) with `seq`, `delivery_id`, `topic`,
/// `entity`, `version` (RFC 3339 or null), `fresh`, `project_id`, `received_at`,
/// `body_encoding` ([`BodyEncoding`]) and `body`.
///
/// `body` is the body's JSON embedded as-is when it is JSON and UTF-8, except that line breaks
/// (which in valid JSON can only be whitespace between tokens) become spaces so the object
/// stays on one line; otherwise a JSON string of the body when it is UTF-8; otherwise base64
/// of its bytes. So the line is always valid JSON text and the body can be had back exactly.
/// A stored body is streamed piece by piece without loading it (read twice when it is not in
/// memory: once to learn whether it is UTF-8, once to write it).
pub async fn write_event_json<W: AsyncWrite + Unpin>(
    event: &HandlerEvent,
    out: &mut W,
) -> std::io::Result<()> {
    let encoding = body_encoding(event).await?;
    let header = EventHeader {
        seq: event.seq,
        delivery_id: &event.delivery_id,
        topic: &event.topic,
        entity: event.entity.as_deref(),
        version: event.version.map(|v| v.to_string()),
        fresh: event.fresh,
        project_id: event.project_id.as_deref(),
        received_at: &event.received_at,
        origin: event.origin,
        body_encoding: encoding,
    };
    let mut head = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    // Reopen the object to append the body, which may be too large to build in memory.
    head.pop();
    head.extend_from_slice(b",\"body\":");
    out.write_all(&head).await?;
    if let Some(bytes) = event.body.as_inline() {
        let mut buf = Vec::with_capacity(bytes.len() + 2);
        match encoding {
            BodyEncoding::Json => {
                buf.extend_from_slice(bytes);
                flatten_line_breaks(&mut buf);
            }
            BodyEncoding::Text => {
                let mut escaper = JsonStringEscaper::new();
                escaper.push(bytes, &mut buf);
                escaper.finish(&mut buf);
            }
            BodyEncoding::Base64 => {
                let mut encoder = Base64String::new();
                encoder.push(bytes, &mut buf);
                encoder.finish(&mut buf);
            }
        }
        out.write_all(&buf).await?;
        return out.write_all(b"}").await;
    }
    let mut chunks = event.body.stream().await?;
    let mut piece = Vec::with_capacity(BODY_CHUNK_BYTES * 4 / 3 + 16);
    match encoding {
        BodyEncoding::Json => {
            while let Some(chunk) = chunks.next().await {
                piece.clear();
                piece.extend_from_slice(&chunk?);
                flatten_line_breaks(&mut piece);
                out.write_all(&piece).await?;
            }
        }
        BodyEncoding::Text => {
            let mut escaper = JsonStringEscaper::new();
            while let Some(chunk) = chunks.next().await {
                piece.clear();
                escaper.push(&chunk?, &mut piece);
                out.write_all(&piece).await?;
            }
            piece.clear();
            escaper.finish(&mut piece);
            out.write_all(&piece).await?;
        }
        BodyEncoding::Base64 => {
            let mut encoder = Base64String::new();
            while let Some(chunk) = chunks.next().await {
                piece.clear();
                encoder.push(&chunk?, &mut piece);
                out.write_all(&piece).await?;
            }
            piece.clear();
            encoder.finish(&mut piece);
            out.write_all(&piece).await?;
        }
    }
    out.write_all(b"}").await
}

/// How `event`'s body can be written into a JSON line without changing a byte of it.
async fn body_encoding(event: &HandlerEvent) -> std::io::Result<BodyEncoding> {
    let utf8 = match event.body.as_inline() {
        Some(bytes) => std::str::from_utf8(bytes).is_ok(),
        None => stored_body_is_utf8(&event.body).await?,
    };
    let json = match event.body.as_inline() {
        // The flag comes from the dispatcher's parse; an inline body is checked again, cheaply.
        Some(bytes) => event.body_is_json && is_json(bytes),
        // An empty "JSON" body would leave `"body":}`.
        None => event.body_is_json && !event.body.is_empty(),
    };
    Ok(match (utf8, json) {
        (true, true) => BodyEncoding::Json,
        (true, false) => BodyEncoding::Text,
        (false, _) => BodyEncoding::Base64,
    })
}

/// Reads a stored body through once, in chunks, to learn whether it is UTF-8 text.
async fn stored_body_is_utf8(body: &Payload) -> std::io::Result<bool> {
    let mut chunks = body.stream().await?;
    // The start of a character cut off at the end of the previous chunk (at most 3 bytes).
    let mut carry: Vec<u8> = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        let joined;
        let data: &[u8] = if carry.is_empty() {
            &chunk
        } else {
            // Rare (a character cut by a chunk boundary), so a copy is fine.
            carry.extend_from_slice(&chunk);
            joined = std::mem::take(&mut carry);
            &joined
        };
        match std::str::from_utf8(data) {
            Ok(_) => {}
            Err(e) if e.error_len().is_none() => carry = data[e.valid_up_to()..].to_vec(),
            Err(_) => return Ok(false),
        }
    }
    Ok(carry.is_empty())
}

/// Turns bytes into a JSON string of their base64 (standard alphabet, padded), piece by piece:
/// the `base64` crate encodes whole groups of three bytes, and the one to two bytes of a group
/// cut by the end of a piece wait for the next.
struct Base64String {
    started: bool,
    /// Bytes of an unfinished group of three.
    carry: Vec<u8>,
}

impl Base64String {
    fn new() -> Self {
        Self {
            started: false,
            carry: Vec::with_capacity(3),
        }
    }

    fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        if !self.started {
            out.push(b'"');
            self.started = true;
        }
        let mut data = input;
        if !self.carry.is_empty() {
            let take = data.len().min(3 - self.carry.len());
            self.carry.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.carry.len() < 3 {
                return;
            }
            let group = std::mem::take(&mut self.carry);
            Self::encode(&group, out);
        }
        let whole = data.len() - data.len() % 3;
        Self::encode(&data[..whole], out);
        self.carry.extend_from_slice(&data[whole..]);
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.started {
            out.push(b'"');
        }
        let rest = std::mem::take(&mut self.carry);
        Self::encode(&rest, out);
        out.push(b'"');
    }

    /// Groups of three bytes as four characters; a last, shorter group padded with `=`.
    fn encode(bytes: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(BASE64_STANDARD.encode(bytes).as_bytes());
    }
}

fn is_json(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

/// Inside valid JSON a raw CR or LF can only be whitespace between tokens (strings must escape
/// them), so replacing them with spaces keeps the meaning and puts the value on one line.
fn flatten_line_breaks(bytes: &mut [u8]) {
    for b in bytes.iter_mut() {
        if *b == b'\n' || *b == b'\r' {
            *b = b' ';
        }
    }
}

/// Turns bytes into the inside of a JSON string, piece by piece, with the result of
/// `String::from_utf8_lossy` on the whole: a UTF-8 sequence split across two pieces is kept
/// until it is complete.
struct JsonStringEscaper {
    started: bool,
    carry: Vec<u8>,
}

impl JsonStringEscaper {
    fn new() -> Self {
        Self {
            started: false,
            carry: Vec::new(),
        }
    }

    fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        if !self.started {
            out.push(b'"');
            self.started = true;
        }
        let joined;
        let mut data = if self.carry.is_empty() {
            input
        } else {
            let mut carry = std::mem::take(&mut self.carry);
            carry.extend_from_slice(input);
            joined = carry;
            &joined[..]
        };
        loop {
            match std::str::from_utf8(data) {
                Ok(s) => {
                    escape_into(s, out);
                    return;
                }
                Err(e) => {
                    let (valid, rest) = data.split_at(e.valid_up_to());
                    if let Ok(s) = std::str::from_utf8(valid) {
                        escape_into(s, out);
                    }
                    match e.error_len() {
                        Some(bad) => {
                            out.extend_from_slice("\u{FFFD}".as_bytes());
                            data = rest.get(bad..).unwrap_or_default();
                        }
                        None => {
                            // Incomplete sequence at the end: wait for the next piece.
                            self.carry = rest.to_vec();
                            return;
                        }
                    }
                }
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.started {
            out.push(b'"');
        }
        if !self.carry.is_empty() {
            self.carry.clear();
            out.extend_from_slice("\u{FFFD}".as_bytes());
        }
        out.push(b'"');
    }
}

/// JSON string escaping, the same as serde_json's.
fn escape_into(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x00..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            _ => out.push(b),
        }
    }
}

/// A body read from a file, as a stored body is, for tests in this module and its children.
#[cfg(test)]
pub(crate) fn file_payload(path: std::path::PathBuf, len: u64) -> Payload {
    #[derive(Debug)]
    struct TestFile(std::path::PathBuf);

    #[async_trait::async_trait]
    impl crate::delivery::PayloadSource for TestFile {
        async fn open(&self) -> std::io::Result<crate::delivery::ChunkStream> {
            let file = tokio::fs::File::open(&self.0).await?;
            Ok(tokio_util::io::ReaderStream::new(file).boxed())
        }
    }

    Payload::stored(len, Arc::new(TestFile(path)))
}

/// Builds an event for tests in this module and its children.
#[cfg(test)]
pub(crate) fn test_event(seq: i64, body: Payload, body_is_json: bool) -> HandlerEvent {
    HandlerEvent {
        seq,
        delivery_id: format!("delivery-{seq}"),
        topic: "LABEL_CREATED".to_owned(),
        event: Event::LabelCreated(crate::events::Label {
            label_id: Some("ckabc".to_owned()),
            label_ids: vec!["ckabc".to_owned()],
            project_id: Some("proj-1".to_owned()),
            data_row_id: None,
            external_id: None,
            user: None,
            created_at: None,
            updated_at: crate::ordering::Version::parse_rfc3339("2024-05-02T08:30:12.5Z"),
            deleted: None,
            shape: crate::events::Shape::V1,
        }),
        entity: Some("label:ckabc".to_owned()),
        version: crate::ordering::Version::parse_rfc3339("2024-05-02T08:30:12.5Z"),
        fresh: true,
        project_id: Some("proj-1".to_owned()),
        received_at: "2024-05-02T08:30:13Z".to_owned(),
        body_is_json,
        body,
        origin: crate::delivery::Origin::Webhook,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Config;
    use proptest::prelude::*;
    use std::io::Write;

    async fn render(event: &HandlerEvent) -> serde_json::Value {
        let mut out = Vec::new();
        write_event_json(event, &mut out).await.unwrap();
        assert!(!out.contains(&b'\n'), "not on one line");
        serde_json::from_slice(&out).unwrap()
    }

    fn inline(body: &[u8], is_json: bool) -> HandlerEvent {
        test_event(
            1,
            Payload::inline(bytes::Bytes::copy_from_slice(body)),
            is_json,
        )
    }

    #[tokio::test]
    async fn json_bodies_are_embedded_with_every_field() {
        let value = render(&inline(br#"{"id":"ckabc","n":[1,2]}"#, true)).await;
        assert_eq!(value["seq"], 1);
        assert_eq!(value["delivery_id"], "delivery-1");
        assert_eq!(value["topic"], "LABEL_CREATED");
        assert_eq!(value["entity"], "label:ckabc");
        assert_eq!(value["version"], "2024-05-02T08:30:12.5Z");
        assert_eq!(value["fresh"], true);
        assert_eq!(value["project_id"], "proj-1");
        assert_eq!(value["received_at"], "2024-05-02T08:30:13Z");
        assert_eq!(
            value["body"],
            serde_json::json!({"id": "ckabc", "n": [1, 2]})
        );
    }

    #[tokio::test]
    async fn missing_values_are_null() {
        let mut event = inline(b"{}", true);
        event.entity = None;
        event.version = None;
        event.project_id = None;
        event.topic = String::new();
        let value = render(&event).await;
        assert!(value["entity"].is_null());
        assert!(value["version"].is_null());
        assert!(value["project_id"].is_null());
        assert_eq!(value["topic"], "");
    }

    #[tokio::test]
    async fn pretty_printed_json_stays_on_one_line() {
        let body = b"{\r\n  \"text\": \"a\\nb\",\n  \"k\": 1\n}\n";
        let value = render(&inline(body, true)).await;
        assert_eq!(value["body"], serde_json::json!({"text": "a\nb", "k": 1}));
    }

    #[tokio::test]
    async fn non_json_text_becomes_a_string_and_says_so() {
        let value = render(&inline(b"not \"json\"\n\x01", false)).await;
        assert_eq!(value["body_encoding"], "text");
        assert_eq!(value["body"], "not \"json\"\n\u{1}");
    }

    #[tokio::test]
    async fn bytes_that_are_not_utf8_become_base64_and_say_so() {
        let value = render(&inline(b"not \"json\"\n\xff\x01", false)).await;
        assert_eq!(value["body_encoding"], "base64");
        assert_eq!(
            decode_base64(value["body"].as_str().unwrap()),
            b"not \"json\"\n\xff\x01"
        );
    }

    #[tokio::test]
    async fn json_with_stray_bytes_inside_a_string_becomes_base64() {
        // A JSON parser that skips the string lets this pass; the line must still be UTF-8.
        let body: &[u8] = b"{\"id\":\"ckabc\",\"note\":\"\xff\xfe\xc3\"}";
        assert!(is_json(body));
        let value = render(&inline(body, true)).await;
        assert_eq!(value["body_encoding"], "base64");
        assert_eq!(decode_base64(value["body"].as_str().unwrap()), body);
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(body).unwrap();
        let stored = file_payload(file.path().to_owned(), body.len() as u64);
        let value = render(&test_event(4, stored, true)).await;
        assert_eq!(value["body_encoding"], "base64");
        assert_eq!(decode_base64(value["body"].as_str().unwrap()), body);
    }

    #[tokio::test]
    async fn json_bodies_say_they_are_json() {
        let value = render(&inline(b"{\"text\":\"\xc3\xa9\"}", true)).await;
        assert_eq!(value["body_encoding"], "json");
        assert_eq!(value["body"]["text"], "\u{e9}");
    }

    /// Standard padded base64, decoded; for checking the encoder.
    fn decode_base64(text: &str) -> Vec<u8> {
        BASE64_STANDARD
            .decode(text)
            .expect("standard padded base64")
    }

    /// A stored body read back in the given pieces.
    #[derive(Debug)]
    struct Pieces(Vec<Vec<u8>>);

    #[async_trait::async_trait]
    impl crate::delivery::PayloadSource for Pieces {
        async fn open(&self) -> std::io::Result<crate::delivery::ChunkStream> {
            let chunks: Vec<std::io::Result<bytes::Bytes>> = self
                .0
                .iter()
                .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
                .collect();
            Ok(futures_util::stream::iter(chunks).boxed())
        }
    }

    fn cut(bytes: &[u8], cuts: Vec<usize>) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
        cuts.sort_unstable();
        let mut pieces = Vec::new();
        let mut start = 0;
        for cut in cuts.into_iter().chain([bytes.len()]) {
            pieces.push(bytes[start..cut].to_vec());
            start = cut;
        }
        pieces
    }

    #[tokio::test]
    async fn bodies_wrongly_flagged_as_json_are_written_as_strings() {
        let value = render(&inline(b"{oops", true)).await;
        assert_eq!(value["body"], "{oops");
    }

    #[tokio::test]
    async fn file_bodies_are_streamed_whole() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        // Larger than several chunks, with a multi-byte character across a chunk boundary.
        let mut text = "x".repeat(BODY_CHUNK_BYTES - 1);
        text.push('é');
        text.push_str(&"y\"".repeat(100_000));
        let json = serde_json::to_vec(&serde_json::json!({ "text": text })).unwrap();
        file.write_all(&json).unwrap();
        let body = file_payload(file.path().to_owned(), json.len() as u64);
        let value = render(&test_event(2, body.clone(), true)).await;
        assert_eq!(value["body"]["text"], text.as_str());
        let value = render(&test_event(2, body, false)).await;
        assert_eq!(value["body"].as_str().unwrap().as_bytes(), &json[..]);
    }

    #[tokio::test]
    async fn a_truncated_body_file_is_an_error() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"{}").unwrap();
        let body = file_payload(file.path().to_owned(), 10);
        let mut out = Vec::new();
        let err = write_event_json(&test_event(3, body, true), &mut out)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    proptest! {
        #[test]
        fn utf8_is_recognised_whatever_the_chunks(
            text in "\\PC{0,40}",
            noise in proptest::collection::vec(any::<u8>(), 0..4),
            at in 0usize..200,
            cuts in proptest::collection::vec(0usize..200, 0..6),
        ) {
            let mut bytes = text.into_bytes();
            let at = at.min(bytes.len());
            bytes.splice(at..at, noise);
            let expected = std::str::from_utf8(&bytes).is_ok();
            let len = bytes.len() as u64;
            let body = Payload::stored(len, Arc::new(Pieces(cut(&bytes, cuts))));
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let found = runtime.block_on(stored_body_is_utf8(&body)).unwrap();
            prop_assert_eq!(found, expected);
        }

        #[test]
        fn streamed_base64_decodes_to_the_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..100),
            cuts in proptest::collection::vec(0usize..100, 0..6),
        ) {
            let mut out = Vec::new();
            let mut encoder = Base64String::new();
            for piece in cut(&bytes, cuts) {
                encoder.push(&piece, &mut out);
            }
            encoder.finish(&mut out);
            let text: String = serde_json::from_slice(&out).unwrap();
            prop_assert_eq!(text.len(), bytes.len().div_ceil(3) * 4);
            prop_assert_eq!(decode_base64(&text), bytes);
        }

        #[test]
        fn streamed_escaping_matches_lossy_utf8(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            cuts in proptest::collection::vec(0usize..200, 0..6),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut out = Vec::new();
            let mut escaper = JsonStringEscaper::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                escaper.push(&bytes[start..cut], &mut out);
                start = cut;
            }
            escaper.finish(&mut out);
            let expected = serde_json::to_vec(&String::from_utf8_lossy(&bytes)).unwrap();
            prop_assert_eq!(out, expected);
        }
    }

    struct Nop;
    #[async_trait::async_trait]
    impl Handler for Nop {
        async fn handle(&self, _event: &HandlerEvent) -> Result<(), HandlerError> {
            Ok(())
        }
    }

    fn load_config(toml: &str, env: &[(&str, &str)]) -> Config {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(toml.as_bytes()).unwrap();
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::load(file.path(), &env, true).unwrap()
    }

    const ENDPOINT: &str = "[[endpoint]]\nname = \"lb\"\nsecrets = [{ env = \"LB_SECRET\" }]\n";

    #[tokio::test]
    async fn the_registry_builds_configured_handlers_and_takes_registered_ones() {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "{ENDPOINT}
[[handler]]
name = \"audit\"
kind = \"log\"
level = \"debug\"

[[handler]]
name = \"archive\"
kind = \"file\"
path = {path:?}

[[handler]]
name = \"script\"
kind = \"command\"
argv = [\"true\"]
",
            path = dir.path().join("events.jsonl").display().to_string()
        );
        let config = load_config(&toml, &[("LB_SECRET", "s")]);
        let mut registry = registry_of(&config).unwrap();
        assert_eq!(
            registry.names().collect::<Vec<_>>(),
            ["archive", "audit", "script"]
        );
        let event = inline(b"{}", true);
        registry
            .get("archive")
            .unwrap()
            .handle(&event)
            .await
            .unwrap();
        let written = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
        assert_eq!(written.lines().count(), 1);

        let custom: Arc<dyn Handler> = Arc::new(Nop);
        registry.register("audit", Arc::clone(&custom));
        registry.register("mine", custom);
        assert_eq!(registry.names().count(), 4);
        assert!(registry.get("nope").is_none());
    }

    fn registry_of(config: &Config) -> Result<Registry, BuildError> {
        let s = &config.settings;
        Registry::build_all(&s.handler, &config.secrets, &s.secret_env_vars())
    }

    #[test]
    fn secret_env_vars_are_collected_from_every_owner() {
        let toml = format!(
            "{ENDPOINT}
[[handler]]
name = \"fwd\"
kind = \"http\"
url = \"http://127.0.0.1:1/x\"
secrets = [{{ env = \"FWD_SECRET\" }}]
"
        );
        let config = load_config(&toml, &[("LB_SECRET", "s"), ("FWD_SECRET", "t")]);
        assert_eq!(
            config.settings.secret_env_vars(),
            ["FWD_SECRET", "LB_SECRET"]
        );
    }
}
