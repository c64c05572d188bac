//! What a delivery is, below both the HTTP ingress that receives it and the store that keeps
//! it: the proof that it is authentic ([`signature`]), its body ([`payload`]), the clock
//! ([`clock`]), and [`VerifiedDelivery`], the only thing the store accepts.
//!
//! A [`VerifiedDelivery`] can only be built from the [`Verified`] proof that
//! [`BodyVerifier::verify`] returns, and it takes its dedup hash from that proof, so "store before
//! verify" does not compile anywhere in the crate, and what is stored is keyed by exactly the
//! bytes that were authenticated. No I/O happens here.

pub mod clock;
pub mod payload;
pub mod signature;

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use bytes::Bytes;

pub use clock::{after, format_millis, now_millis, Clock, ManualClock, SystemClock, UnixMillis};
pub use payload::{BodyReadError, ChunkStream, Payload, PayloadSource, StagedBody, Staging};
pub use signature::{Algorithm, BodyVerifier, ClaimedSignature, SignatureError, Verified};

use crate::events::Topic;

/// Where a stored delivery stands, as `events list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Stored, not yet handled by all its handlers.
    Pending,
    /// Every handler confirmed it (or no route wanted it).
    Delivered,
    /// Older than what was already applied for its entity.
    Stale,
    /// A handler gave up on it after `max_attempts`; `events replay` brings it back.
    Dead,
    /// Authentic, but of an unknown topic or not parseable; kept whole for a later upgrade.
    Unrecognized,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Pending,
        Status::Delivered,
        Status::Stale,
        Status::Dead,
        Status::Unrecognized,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Delivered => "delivered",
            Status::Stale => "stale",
            Status::Dead => "dead",
            Status::Unrecognized => "unrecognized",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so that `{:<12}` lines columns up.
        f.pad(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("unknown status {s:?} (pending, delivered, stale, dead, unrecognized)")
            })
    }
}

impl serde::Serialize for Status {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Where a stored delivery came from: shown by `events list`, the console and every handler, so
/// that what a backfill recovered is never mistaken for what Labelbox sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Origin {
    /// Sent by Labelbox to a webhook endpoint, its signature checked.
    #[default]
    Webhook,
    /// Rebuilt from Labelbox's export by `labelhook labelbox backfill`.
    Backfill,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Webhook => "webhook",
            Origin::Backfill => "backfill",
        }
    }

    /// The stored text back; `None` for anything else.
    pub fn parse(s: &str) -> Option<Origin> {
        match s {
            "webhook" => Some(Origin::Webhook),
            "backfill" => Some(Origin::Backfill),
            _ => None,
        }
    }

    pub fn is_webhook(&self) -> bool {
        *self == Origin::Webhook
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl serde::Serialize for Origin {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// A delivery's body as the store receives it: small ones in memory, large ones already
/// written to the store's body storage while they streamed in.
#[derive(Debug)]
pub enum IncomingBody {
    Inline(Bytes),
    Staged(StagedBody),
}

impl IncomingBody {
    pub fn len(&self) -> u64 {
        match self {
            IncomingBody::Inline(bytes) => bytes.len() as u64,
            IncomingBody::Staged(staged) => staged.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a delivery's id comes from, and so which deliveries are one (dedup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryId {
    /// `X-Labelbox-Id`, as sent.
    Given(String),
    /// The body's SHA-256 in hex: identical bodies are one delivery, whenever they come.
    BodyHash,
    /// The body's SHA-256 and the window of time it arrived in: identical bodies within one
    /// window (aligned to the clock) are one delivery; `window_ms` 0 makes every one new.
    BodyHashWithin { window_ms: i64 },
}

/// What a request said about a delivery, besides its body.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub delivery_id: DeliveryId,
    /// The `[[endpoint]]` name, or `model_training`.
    pub endpoint: String,
    /// `X-Labelbox-Event` as sent (`MODEL_RUN` for model-training callbacks).
    pub topic: Option<String>,
    pub client_ip: IpAddr,
    /// Headers worth keeping, signatures already redacted.
    pub headers: Vec<(String, String)>,
    pub received_at: UnixMillis,
    /// The id of the HTTP request that brought it (`X-Request-Id`, or made by the ingress),
    /// kept so that later log lines of this delivery carry it too.
    pub request_id: Option<String>,
}

/// The fields of a [`VerifiedDelivery`] that the store writes, taken apart.
#[derive(Debug)]
pub struct NewDelivery {
    pub delivery_id: String,
    pub body_sha256: [u8; 32],
    pub endpoint: String,
    pub topic: Option<String>,
    /// `Pending`, or `Unrecognized` for an unknown or missing topic.
    pub status: Status,
    pub client_ip: IpAddr,
    pub headers: Vec<(String, String)>,
    pub body: IncomingBody,
    pub received_at: UnixMillis,
    pub request_id: Option<String>,
    /// From the proof: a webhook, or a backfill.
    pub origin: Origin,
}

/// A delivery proven authentic: its signature checked against its endpoint's secrets, or
/// fetched from Labelbox's API with our key (see [`Verified`]).
#[derive(Debug)]
pub struct VerifiedDelivery {
    inner: NewDelivery,
}

impl VerifiedDelivery {
    /// Consumes the proof: there is no other way to make one.
    pub fn new(proof: Verified, envelope: Envelope, body: IncomingBody) -> Self {
        debug_assert_eq!(
            proof.body_len(),
            body.len(),
            "the proof is for another body"
        );
        let status = match envelope.topic.as_deref().map(Topic::parse) {
            Some(topic) if topic.is_known() => Status::Pending,
            _ => Status::Unrecognized,
        };
        let hash = hex::encode(proof.body_sha256());
        let delivery_id = match envelope.delivery_id {
            DeliveryId::Given(id) => id,
            DeliveryId::BodyHash => hash,
            DeliveryId::BodyHashWithin { window_ms } if window_ms > 0 => {
                format!("{hash}@{}", envelope.received_at.div_euclid(window_ms))
            }
            DeliveryId::BodyHashWithin { .. } => {
                format!("{hash}@{}-{:08x}", envelope.received_at, fastrand::u32(..))
            }
        };
        Self {
            inner: NewDelivery {
                delivery_id,
                body_sha256: proof.body_sha256(),
                endpoint: envelope.endpoint,
                topic: envelope.topic,
                status,
                client_ip: envelope.client_ip,
                headers: envelope.headers,
                body,
                received_at: envelope.received_at,
                request_id: envelope.request_id,
                origin: proof.origin(),
            },
        }
    }

    pub fn delivery_id(&self) -> &str {
        &self.inner.delivery_id
    }

    /// Takes the delivery apart for writing; consumes the proof.
    pub fn into_parts(self) -> NewDelivery {
        self.inner
    }
}
