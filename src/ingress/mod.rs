//! The HTTP side of a delivery: who sent it, whether it is authentic, and the answer.
//!
//! Checks run cheapest first: endpoint, client IP against the allowlist, content type and
//! encoding, declared size, signature header, then the streamed body (size, HMAC). Only a body
//! whose signature matched yields the [`crate::delivery::Verified`] proof that building a
//! [`crate::delivery::VerifiedDelivery`] takes, and only that can be given to the store.

pub mod admission;
pub mod body;
pub mod client_ip;
pub mod settings;
pub mod webhook;

use axum::http::HeaderMap;

use crate::delivery::signature::{SHA1_HEADER, SHA256_HEADER};
use crate::delivery::{ClaimedSignature, SignatureError};

pub use webhook::{IngressState, Receiving};

/// The signature a request claims, from its headers.
pub fn claimed_signature(
    headers: &HeaderMap,
    accept_sha1: bool,
) -> Result<ClaimedSignature, SignatureError> {
    ClaimedSignature::pick(
        headers.get(SHA256_HEADER).map(|v| v.as_bytes()),
        headers.get(SHA1_HEADER).map(|v| v.as_bytes()),
        accept_sha1,
    )
}
