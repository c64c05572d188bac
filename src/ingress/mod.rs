//! The HTTP side of a delivery: who sent it, whether it is authentic, and the answer.
//!
//! Checks run cheapest first: endpoint, client IP against the allowlist, content type and
//! encoding, declared size, signature header, then the streamed body (size, HMAC). Only a body
//! whose signature matched becomes a [`VerifiedDelivery`], and only a `VerifiedDelivery` can be
//! given to the store: its fields are private and its constructor is visible to this module
//! alone, so "store before verify" does not compile.

pub mod body;
pub mod client_ip;
pub mod signature;
pub mod webhook;

use std::net::IpAddr;

use crate::store::{IncomingBody, NewDelivery, Status, UnixMillis};

pub use webhook::{IngressError, IngressState};

/// A delivery whose signature was checked against the endpoint's secrets.
#[derive(Debug)]
pub struct VerifiedDelivery {
    inner: NewDelivery,
}

impl VerifiedDelivery {
    /// Visible to the ingress only: the proof that a signature was verified.
    #[allow(clippy::too_many_arguments)]
    fn new(
        delivery_id: String,
        body_sha256: [u8; 32],
        endpoint: String,
        topic: Option<String>,
        status: Status,
        client_ip: IpAddr,
        headers: Vec<(String, String)>,
        body: IncomingBody,
        received_at: UnixMillis,
    ) -> Self {
        Self {
            inner: NewDelivery {
                delivery_id,
                body_sha256,
                endpoint,
                topic,
                status,
                client_ip,
                headers,
                body,
                received_at,
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
