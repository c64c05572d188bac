//! The delivery routes: `POST /webhooks/{endpoint}` for topic deliveries, and Labelbox's
//! model-training callbacks `GET {path}/models` and `POST {path}/model_run`.
//!
//! Every answer is a row of the table in README.md's "Answers" section; error bodies are
//! `{"error": "..."}` and never carry a secret, an expected signature or the body.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ipnet::IpNet;
use secrecy::SecretString;
use serde_json::json;

use super::admission::Admission;
use super::body::{self, BodyError};
use super::claimed_signature;
use super::client_ip::{self, Allowlist};
use super::settings::{
    EndpointSettings, ForwardedHeader, ModelTrainingSettings, NetworkSettings, ServerSettings,
};
use crate::delivery::{
    BodyVerifier, ClaimedSignature, Clock, DeliveryId, Envelope, SignatureError, VerifiedDelivery,
};
use crate::events::Topic;
use crate::settings::Secrets;
use crate::store::{Intake, StoreError};
use crate::telemetry::{self, bounded_for_log};

/// Seconds a sender is asked to wait before retrying a 503.
pub const RETRY_AFTER_SECONDS: u64 = 5;
/// Longest `X-Labelbox-Id` kept; Labelbox sends 25-character cuids.
const MAX_DELIVERY_ID_LEN: usize = 200;
/// The topic recorded for model-training callbacks, which carry no event header.
pub const MODEL_RUN_TOPIC: &str = "MODEL_RUN";
/// The endpoint name recorded for model-training callbacks.
pub const MODEL_TRAINING_ENDPOINT: &str = "model_training";
/// Every outcome `labelhook_deliveries_total` counts for a configured endpoint: accepted,
/// duplicate, and each refusal's [`IngressError::outcome`] but `unknown_endpoint` (counted under
/// the endpoint `unknown`).
pub const OUTCOMES: [&str; 15] = [
    "accepted",
    "duplicate",
    "address_not_allowed",
    "signature_missing",
    "signature_malformed",
    "signature_mismatch",
    "too_large",
    "unsupported_media",
    "bad_delivery_id",
    "body_timeout",
    "body_too_slow",
    "overloaded",
    "body_read_error",
    "store_unavailable",
    "queue_full",
];
/// Headers kept with a delivery only as `[redacted]`.
const REDACTED_HEADERS: [&str; 4] = [
    "x-hub-signature",
    "x-hub-signature-256",
    "authorization",
    "cookie",
];

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("unknown endpoint")]
    UnknownEndpoint,
    /// `hint` says which key to change: for the operator's log, never for the sender.
    #[error("source address not allowed")]
    AddressNotAllowed { hint: &'static str },
    #[error("content encoding not supported")]
    ContentEncoding,
    #[error("content type must be application/json")]
    ContentType,
    #[error("body too large")]
    TooLarge,
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("invalid X-Labelbox-Id")]
    BadDeliveryId,
    #[error("body not received in time")]
    BodyTimeout,
    #[error("body arrived too slowly")]
    BodyTooSlow,
    #[error("server busy")]
    Overloaded,
    #[error("body could not be read")]
    BodyRead,
    #[error("store unavailable")]
    StoreUnavailable,
    #[error("queue full")]
    QueueFull,
}

impl IngressError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownEndpoint => StatusCode::NOT_FOUND,
            Self::AddressNotAllowed { .. } => StatusCode::FORBIDDEN,
            Self::ContentEncoding | Self::ContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Signature(_) => StatusCode::UNAUTHORIZED,
            Self::BadDeliveryId | Self::BodyRead => StatusCode::BAD_REQUEST,
            Self::BodyTimeout | Self::BodyTooSlow => StatusCode::REQUEST_TIMEOUT,
            Self::StoreUnavailable | Self::QueueFull | Self::Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// A short, bounded label for logs and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::UnknownEndpoint => "unknown_endpoint",
            Self::AddressNotAllowed { .. } => "address_not_allowed",
            Self::ContentEncoding | Self::ContentType => "unsupported_media",
            Self::TooLarge => "too_large",
            Self::Signature(SignatureError::Missing) => "signature_missing",
            Self::Signature(SignatureError::Malformed) => "signature_malformed",
            Self::Signature(SignatureError::Mismatch) => "signature_mismatch",
            Self::BadDeliveryId => "bad_delivery_id",
            Self::BodyTimeout => "body_timeout",
            Self::BodyTooSlow => "body_too_slow",
            Self::Overloaded => "overloaded",
            Self::BodyRead => "body_read_error",
            Self::StoreUnavailable => "store_unavailable",
            Self::QueueFull => "queue_full",
        }
    }
}

impl IngressError {
    /// What the operator can do about a refusal, for its log line: the configuration keys
    /// involved and the usual causes.
    fn operator_hint(&self) -> Option<&'static str> {
        match self {
            Self::AddressNotAllowed { hint } => Some(hint),
            Self::Signature(SignatureError::Mismatch) => Some(MISMATCH_OPERATOR_HINT),
            _ => None,
        }
    }

    /// What the sender is told besides the error: only what helps whoever signed the request
    /// and names nothing of the configuration (the sender is not the one who can change it).
    fn sender_hint(&self) -> Option<&'static str> {
        match self {
            Self::Signature(SignatureError::Mismatch) => Some(MISMATCH_SENDER_HINT),
            _ => None,
        }
    }
}

/// The two usual causes of a signature mismatch, as the sender can check them.
pub const MISMATCH_SENDER_HINT: &str = "signed with another secret, or the body changed after \
     signing (send the exact bytes: curl --data-binary @file, not -d)";
/// The same for the operator, with the key that lists the secrets.
const MISMATCH_OPERATOR_HINT: &str = "signed with a secret not in this endpoint's secrets, \
     or the body changed on its way (a proxy re-encoding it; curl -d, not --data-binary)";
/// A refused address that came straight to the listener (or through a trusted proxy).
const ADDRESS_NOT_LISTED_HINT: &str = "add the address to network.allowlist if it is a sender \
     you expect; behind a proxy, list the proxy in network.trusted_proxies so that the address \
     it forwards is the one checked";
/// A refused address that sent a forwarding header without being a trusted proxy.
const UNTRUSTED_PROXY_HINT: &str = "the request carries a forwarding header, but its peer is \
     not in network.trusted_proxies, so the peer's own address was checked: list the proxy \
     there if it is yours";
/// A refused model-training call.
const MODEL_TRAINING_ADDRESS_HINT: &str =
    "add the address to model_training.allowlist if it is Labelbox's";

impl IntoResponse for IngressError {
    fn into_response(self) -> Response {
        let body = match self.sender_hint() {
            Some(hint) => json!({ "error": self.to_string(), "hint": hint }),
            None => json!({ "error": self.to_string() }),
        };
        let mut response = (self.status(), Json(body)).into_response();
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}

impl From<StoreError> for IngressError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Busy => Self::QueueFull,
            _ => Self::StoreUnavailable,
        }
    }
}

impl From<BodyError> for IngressError {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::TooLarge => Self::TooLarge,
            BodyError::TooSlow => Self::BodyTooSlow,
            BodyError::Overloaded => Self::Overloaded,
            BodyError::Read(_) => Self::BodyRead,
            // Could not write the blob: disk full or read-only, the sender should retry.
            BodyError::Spill(_) => Self::StoreUnavailable,
        }
    }
}

/// Who may deliver to one endpoint.
struct EndpointAuth {
    secrets: Vec<SecretString>,
    accept_sha1: bool,
}

/// The model-training routes' own settings.
struct ModelTraining {
    auth: EndpointAuth,
    types: Vec<String>,
    /// `model_training.allowlist`, or `network.allowlist` when that is empty.
    allowlist: Allowlist,
    /// `model_training.duplicate_window`.
    duplicate_window_ms: i64,
}

/// What the delivery routes are built from: the sections of the settings they read, and the
/// secrets read for the endpoints.
pub struct Receiving<'a> {
    pub server: &'a ServerSettings,
    pub network: &'a NetworkSettings,
    pub endpoints: &'a [EndpointSettings],
    pub model_training: Option<&'a ModelTrainingSettings>,
    /// `store.inline_body_max_bytes`: larger bodies go to the store as they arrive.
    pub inline_body_max_bytes: u64,
    pub secrets: &'a Secrets,
}

/// Everything the delivery routes need, shared by all requests.
#[derive(Clone)]
pub struct IngressState(Arc<Inner>);

struct Inner {
    endpoints: HashMap<String, EndpointAuth>,
    model_training: Option<ModelTraining>,
    allowlist: Allowlist,
    trusted_proxies: Vec<IpNet>,
    forwarded_header: ForwardedHeader,
    max_body_bytes: u64,
    inline_body_max_bytes: u64,
    spill_slots: Arc<body::SpillSlots>,
    buffered: body::MemoryBudget,
    pace: body::Pace,
    body_timeout: Duration,
    store: Arc<dyn Intake>,
    clock: Arc<dyn Clock>,
    admission: Arc<Admission>,
}

impl IngressState {
    pub fn new(
        from: Receiving<'_>,
        store: Arc<dyn Intake>,
        clock: Arc<dyn Clock>,
        admission: Arc<Admission>,
    ) -> Self {
        let (server, network, secrets) = (from.server, from.network, from.secrets);
        let endpoints = from
            .endpoints
            .iter()
            .map(|ep| {
                let auth = EndpointAuth {
                    secrets: secrets.for_endpoint(&ep.name).to_vec(),
                    accept_sha1: ep.accept_sha1,
                };
                (ep.name.clone(), auth)
            })
            .collect();
        let model_training = from.model_training.map(|mt| ModelTraining {
            auth: EndpointAuth {
                secrets: secrets.for_endpoint(Secrets::MODEL_TRAINING).to_vec(),
                accept_sha1: true,
            },
            types: mt.model_types.clone(),
            allowlist: if mt.allowlist.is_empty() {
                Allowlist::new(network.allowlist.clone(), network.allow_all)
            } else {
                Allowlist::new(mt.allowlist.clone(), false)
            },
            duplicate_window_ms: i64::try_from(mt.duplicate_window.as_millis()).unwrap_or(i64::MAX),
        });
        Self(Arc::new(Inner {
            endpoints,
            model_training,
            allowlist: Allowlist::new(network.allowlist.clone(), network.allow_all),
            trusted_proxies: network.trusted_proxies.clone(),
            forwarded_header: network.forwarded_header,
            max_body_bytes: server.max_body_bytes,
            inline_body_max_bytes: from.inline_body_max_bytes,
            spill_slots: body::SpillSlots::new(
                server.max_spilling_bodies,
                server.max_spilling_bodies_per_client,
            ),
            buffered: body::MemoryBudget::new(server.max_buffered_bytes),
            pace: body::Pace {
                min_bytes_per_second: server.min_body_bytes_per_second,
                grace: server.body_rate_grace,
            },
            body_timeout: server.body_timeout,
            store,
            clock,
            admission,
        }))
    }

    pub fn store(&self) -> &Arc<dyn Intake> {
        &self.0.store
    }

    /// The client address, checked against `allowlist`.
    fn allowed_client(
        &self,
        peer: SocketAddr,
        headers: &HeaderMap,
        allowlist: &Allowlist,
    ) -> Result<IpAddr, IpAddr> {
        let client = client_ip::resolve(
            peer.ip(),
            headers,
            &self.0.trusted_proxies,
            self.0.forwarded_header,
        );
        if allowlist.allows(client) {
            Ok(client)
        } else {
            Err(client)
        }
    }
}

impl IngressState {
    /// The refusal of a client address `allowlist` does not list, with the hint that fits how
    /// it arrived: a forwarding header from a peer that is not a trusted proxy means the
    /// proxy's own address was checked (the usual mistake behind an ingress).
    fn address_refused(&self, peer: SocketAddr, headers: &HeaderMap) -> IngressError {
        let forwarded =
            headers.contains_key("x-forwarded-for") || headers.contains_key("forwarded");
        let trusted = self
            .0
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&peer.ip()));
        let hint = if forwarded && !trusted {
            UNTRUSTED_PROXY_HINT
        } else {
            ADDRESS_NOT_LISTED_HINT
        };
        IngressError::AddressNotAllowed { hint }
    }
}

/// `POST /webhooks/{endpoint}`
pub async fn receive_delivery(
    State(state): State<IngressState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(endpoint): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let topic = header_text(&headers, "x-labelbox-event");
    let outcome = match state.allowed_client(peer, &headers, &state.0.allowlist) {
        Err(client) => Err((client, state.address_refused(peer, &headers))),
        Ok(client) => match state.0.endpoints.get(&endpoint) {
            None => Err((client, IngressError::UnknownEndpoint)),
            Some(auth) => {
                let source = Source {
                    endpoint: &endpoint,
                    auth,
                    topic: topic.clone(),
                    content_type_required: true,
                    duplicate_window_ms: None,
                };
                accept(&state, client, &headers, body, source)
                    .await
                    .map(|answer| (client, answer))
                    .map_err(|e| (client, e))
            }
        },
    };
    let endpoint_label = if state.0.endpoints.contains_key(&endpoint) {
        endpoint.as_str()
    } else {
        "unknown"
    };
    respond(endpoint_label, topic.as_deref(), outcome)
}

/// `POST {model_training.path}/model_run`: authenticated like a delivery, topic `MODEL_RUN`.
/// Labelbox's reference sends only `X-Hub-Signature`: a JSON body without `Content-Type` is
/// taken, and without `X-Labelbox-Id` identical bodies within `model_training.duplicate_window`
/// are one request.
pub async fn receive_model_run(
    State(state): State<IngressState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let outcome = match &state.0.model_training {
        None => Err((peer.ip(), IngressError::UnknownEndpoint)),
        Some(mt) => match model_training_client(&state, mt, peer, &headers) {
            Err(client) => Err((
                client,
                IngressError::AddressNotAllowed {
                    hint: MODEL_TRAINING_ADDRESS_HINT,
                },
            )),
            Ok(client) => {
                let source = Source {
                    endpoint: MODEL_TRAINING_ENDPOINT,
                    auth: &mt.auth,
                    topic: Some(MODEL_RUN_TOPIC.to_owned()),
                    content_type_required: false,
                    duplicate_window_ms: Some(mt.duplicate_window_ms),
                };
                accept(&state, client, &headers, body, source)
                    .await
                    .map(|answer| (client, answer))
                    .map_err(|e| (client, e))
            }
        },
    };
    respond(MODEL_TRAINING_ENDPOINT, Some(MODEL_RUN_TOPIC), outcome)
}

/// The caller of a model-training route, checked against its own allowlist. Labelbox does not
/// publish the addresses these calls come from, so a refusal is logged with the address, for
/// an operator to find and allow.
fn model_training_client(
    state: &IngressState,
    mt: &ModelTraining,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<IpAddr, IpAddr> {
    state
        .allowed_client(peer, headers, &mt.allowlist)
        .inspect_err(|client| {
            tracing::warn!(%client, "model-training call refused: add its address to model_training.allowlist if it is Labelbox's");
        })
}

/// `GET {model_training.path}/models`: the model types Labelbox offers in its UI. Labelbox
/// signs this GET over an empty body; a request without a signature is answered too (the list
/// is not secret, and some Labelbox set-ups send none), but a wrong signature is refused.
pub async fn list_models(
    State(state): State<IngressState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let Some(mt) = &state.0.model_training else {
        return IngressError::UnknownEndpoint.into_response();
    };
    if model_training_client(&state, mt, peer, &headers).is_err() {
        return IngressError::AddressNotAllowed {
            hint: MODEL_TRAINING_ADDRESS_HINT,
        }
        .into_response();
    }
    match claimed_signature(&headers, mt.auth.accept_sha1) {
        Err(SignatureError::Missing) => {}
        Err(e) => return IngressError::Signature(e).into_response(),
        Ok(claimed) => {
            let verifier = BodyVerifier::new(claimed.algorithm, &mt.auth.secrets);
            if let Err(e) = verifier.verify(&claimed) {
                return IngressError::Signature(e).into_response();
            }
        }
    }
    let models: serde_json::Map<String, serde_json::Value> =
        mt.types.iter().map(|t| (t.clone(), json!({}))).collect();
    Json(models).into_response()
}

struct Source<'a> {
    endpoint: &'a str,
    auth: &'a EndpointAuth,
    topic: Option<String>,
    /// False where a sender is known to leave `Content-Type` out (a present, non-JSON type is
    /// still refused).
    content_type_required: bool,
    /// Without `X-Labelbox-Id`: `None` keys the delivery by its body alone; `Some` by its body
    /// and the window it arrived in.
    duplicate_window_ms: Option<i64>,
}

enum Answer {
    Accepted {
        delivery_id: String,
        id_conflict: bool,
    },
    Duplicate {
        delivery_id: String,
    },
}

/// True when `Content-Encoding` names any coding but `identity` (which means none, so the body
/// is the bytes that were signed).
fn is_encoded(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|line| {
            line.to_str().map_or(true, |codings| {
                codings
                    .split(',')
                    .map(str::trim)
                    .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case("identity"))
            })
        })
}

/// The checks after the client address, the body, and the store.
async fn accept(
    state: &IngressState,
    client: IpAddr,
    headers: &HeaderMap,
    body: Body,
    source: Source<'_>,
) -> Result<Answer, IngressError> {
    let received_at = state.0.clock.now();
    let Heads { claimed, given_id } = check_heads(state, headers, &source)?;
    let mut verifier = BodyVerifier::new(claimed.algorithm, &source.auth.secrets);
    // The memory an inline body holds counts against `server.max_buffered_bytes` until the
    // store has it.
    let body::Received {
        body: received,
        memory: buffered,
    } = receive_body(state, client, body, &mut verifier).await?;
    let proof = verifier.verify(&claimed)?;

    let delivery_id = match (given_id, source.duplicate_window_ms) {
        (Some(id), _) => DeliveryId::Given(id),
        (None, None) => DeliveryId::BodyHash,
        (None, Some(window_ms)) => DeliveryId::BodyHashWithin { window_ms },
    };
    // The request span (`telemetry::request_span`) learns which delivery this is once it is
    // authentic, so that the rest of this request's log lines, and the answer's, carry it.
    let span = tracing::Span::current();
    if let Some(topic) = &source.topic {
        span.record("topic", bounded_for_log(topic).as_str());
    }
    let envelope = Envelope {
        delivery_id,
        endpoint: source.endpoint.to_owned(),
        topic: source.topic,
        client_ip: client,
        headers: kept_headers(headers),
        received_at,
        request_id: telemetry::request_id(headers),
    };
    let verified = VerifiedDelivery::new(proof, envelope, received);
    let delivery_id = verified.delivery_id().to_owned();
    span.record("delivery_id", delivery_id.as_str());
    let accepted = state.0.store.accept(verified).await?;
    drop(buffered);
    span.record("seq", accepted.seq);
    if !accepted.duplicate {
        // Stored and safe; the answer waits while handlers are far behind (see `admission`).
        let delay = state.0.admission.delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
    Ok(if accepted.duplicate {
        Answer::Duplicate { delivery_id }
    } else {
        Answer::Accepted {
            delivery_id,
            id_conflict: accepted.id_conflict,
        }
    })
}

/// What the request's headers claim, once they pass the checks made before any of the body
/// is read.
struct Heads {
    claimed: ClaimedSignature,
    /// `X-Labelbox-Id`, when given.
    given_id: Option<String>,
}

/// The checks the headers alone allow, cheapest first: encoding, content type, declared
/// length, the signature's form, the delivery id's form.
fn check_heads(
    state: &IngressState,
    headers: &HeaderMap,
    source: &Source<'_>,
) -> Result<Heads, IngressError> {
    if is_encoded(headers) {
        return Err(IngressError::ContentEncoding);
    }
    let content_type_ok = match headers.get(header::CONTENT_TYPE) {
        None => !source.content_type_required,
        Some(_) => is_json(headers),
    };
    if !content_type_ok {
        return Err(IngressError::ContentType);
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > state.0.max_body_bytes) {
        return Err(IngressError::TooLarge);
    }
    let claimed = claimed_signature(headers, source.auth.accept_sha1)?;
    let given_id = match headers.get("x-labelbox-id") {
        None => None,
        Some(v) => Some(valid_delivery_id(v).ok_or(IngressError::BadDeliveryId)?),
    };
    Ok(Heads { claimed, given_id })
}

/// Reads the body whole within the server's limits and `server.body_timeout`, feeding
/// `verifier` as it comes.
async fn receive_body(
    state: &IngressState,
    client: IpAddr,
    body: Body,
    verifier: &mut BodyVerifier,
) -> Result<body::Received, IngressError> {
    let limits = body::BodyLimits {
        max_bytes: state.0.max_body_bytes,
        inline_max: state.0.inline_body_max_bytes,
        bodies: state.0.store.bodies(),
        spill_slots: &state.0.spill_slots,
        memory: &state.0.buffered,
        pace: state.0.pace,
        client,
    };
    let received =
        tokio::time::timeout(state.0.body_timeout, body::receive(body, &limits, verifier))
            .await
            .map_err(|_| IngressError::BodyTimeout)??;
    Ok(received)
}

/// Logs, counts and answers.
fn respond(
    endpoint: &str,
    topic: Option<&str>,
    outcome: Result<(IpAddr, Answer), (IpAddr, IngressError)>,
) -> Response {
    // Raw topics are unbounded; metrics only see the canonical ones, logs a bounded copy.
    let topic_label = topic.map_or("none", Topic::metric_label);
    let topic = topic.map(bounded_for_log);
    let topic = topic.as_deref();
    let (label, response) = match outcome {
        Ok((
            client,
            Answer::Accepted {
                delivery_id,
                id_conflict,
            },
        )) => {
            tracing::info!(%delivery_id, topic, %client, endpoint, id_conflict, outcome = "accepted", "delivery stored");
            let body = json!({ "status": "accepted", "delivery_id": delivery_id });
            (
                "accepted",
                (StatusCode::ACCEPTED, Json(body)).into_response(),
            )
        }
        Ok((client, Answer::Duplicate { delivery_id })) => {
            tracing::info!(%delivery_id, topic, %client, endpoint, outcome = "duplicate", "delivery already stored");
            let body = json!({ "status": "duplicate", "delivery_id": delivery_id });
            ("duplicate", (StatusCode::OK, Json(body)).into_response())
        }
        Err((client, e)) => {
            let status = e.status();
            let hint = e.operator_hint();
            if status.is_server_error() {
                tracing::warn!(topic, %client, endpoint, outcome = e.outcome(), hint, "delivery refused");
            } else {
                tracing::info!(topic, %client, endpoint, outcome = e.outcome(), hint, "delivery refused");
            }
            (e.outcome(), e.into_response())
        }
    };
    telemetry::count_delivery(endpoint, topic_label, label);
    response
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_owned())
}

/// `application/json`, with parameters, or any `+json` type.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Visible ASCII, bounded: the id appears in logs and the CLI.
fn valid_delivery_id(value: &HeaderValue) -> Option<String> {
    let bytes = value.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_DELIVERY_ID_LEN
        && bytes.iter().all(|b| b.is_ascii_graphic());
    ok.then(|| String::from_utf8_lossy(bytes).into_owned())
}

/// The headers worth keeping with the delivery, signatures and credentials redacted.
fn kept_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let name = name.as_str().to_owned();
            let value = if REDACTED_HEADERS.contains(&name.as_str()) {
                "[redacted]".to_owned()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            (name, value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_of_a_configured_endpoint_is_an_outcome_published_at_start() {
        let refusals = [
            IngressError::AddressNotAllowed { hint: "" },
            IngressError::ContentEncoding,
            IngressError::ContentType,
            IngressError::TooLarge,
            IngressError::Signature(SignatureError::Missing),
            IngressError::Signature(SignatureError::Malformed),
            IngressError::Signature(SignatureError::Mismatch),
            IngressError::BadDeliveryId,
            IngressError::BodyTimeout,
            IngressError::BodyTooSlow,
            IngressError::Overloaded,
            IngressError::BodyRead,
            IngressError::StoreUnavailable,
            IngressError::QueueFull,
        ];
        let mut outcomes: Vec<&str> = refusals.iter().map(IngressError::outcome).collect();
        outcomes.extend(["accepted", "duplicate"]);
        outcomes.sort_unstable();
        // Both content refusals are `unsupported_media`.
        outcomes.dedup();
        let mut published = OUTCOMES.to_vec();
        published.sort_unstable();
        assert_eq!(outcomes, published);
    }
}
