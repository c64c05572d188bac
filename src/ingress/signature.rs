//! The HMAC signature Labelbox puts on every delivery, checked over the raw body as it streams in.
//!
//! `X-Hub-Signature-256: sha256=<hex>` wins when present; otherwise `X-Hub-Signature: sha1=<hex>`
//! (unless the endpoint turned SHA-1 off). Hex may be upper or lower case. The body is fed to one
//! MAC per configured secret (rotation keeps two valid for a while) and each is compared with
//! `verify_slice`, which is constant time. Nothing here ever formats a secret or a digest into
//! an error.

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha1::Sha1;
use sha2::Sha256;

pub const SHA256_HEADER: &str = "x-hub-signature-256";
pub const SHA1_HEADER: &str = "x-hub-signature";

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("signature missing")]
    Missing,
    #[error("signature malformed")]
    Malformed,
    #[error("signature mismatch")]
    Mismatch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha1,
    Sha256,
}

impl Algorithm {
    fn prefix(self) -> &'static str {
        match self {
            Self::Sha1 => "sha1=",
            Self::Sha256 => "sha256=",
        }
    }

    fn digest_len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
        }
    }
}

/// The signature a request claims, decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct ClaimedSignature {
    pub algorithm: Algorithm,
    digest: Vec<u8>,
}

impl std::fmt::Debug for ClaimedSignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClaimedSignature({:?}, [redacted])", self.algorithm)
    }
}

impl ClaimedSignature {
    /// Picks and decodes the signature header.
    pub fn from_headers(headers: &HeaderMap, accept_sha1: bool) -> Result<Self, SignatureError> {
        if let Some(value) = headers.get(SHA256_HEADER) {
            return Self::parse(value.as_bytes(), Algorithm::Sha256);
        }
        match headers.get(SHA1_HEADER) {
            Some(value) if accept_sha1 => Self::parse(value.as_bytes(), Algorithm::Sha1),
            _ => Err(SignatureError::Missing),
        }
    }

    fn parse(value: &[u8], algorithm: Algorithm) -> Result<Self, SignatureError> {
        let text = std::str::from_utf8(value)
            .map_err(|_| SignatureError::Malformed)?
            .trim();
        let prefix = algorithm.prefix();
        let hex_part = text
            .get(..prefix.len())
            .filter(|p| p.eq_ignore_ascii_case(prefix))
            .map(|_| &text[prefix.len()..])
            .ok_or(SignatureError::Malformed)?;
        let digest = hex::decode(hex_part).map_err(|_| SignatureError::Malformed)?;
        if digest.len() != algorithm.digest_len() {
            return Err(SignatureError::Malformed);
        }
        Ok(Self { algorithm, digest })
    }
}

/// HMACs of the body under every secret, updated chunk by chunk.
#[derive(Clone)]
pub enum BodyMac {
    Sha1(Vec<Hmac<Sha1>>),
    Sha256(Vec<Hmac<Sha256>>),
}

impl BodyMac {
    pub fn new(algorithm: Algorithm, secrets: &[SecretString]) -> Self {
        // HMAC accepts keys of any length, so `new_from_slice` cannot fail for these types.
        let keys = secrets.iter().map(|s| s.expose_secret().as_bytes());
        match algorithm {
            Algorithm::Sha1 => Self::Sha1(
                keys.filter_map(|k| Hmac::<Sha1>::new_from_slice(k).ok())
                    .collect(),
            ),
            Algorithm::Sha256 => Self::Sha256(
                keys.filter_map(|k| Hmac::<Sha256>::new_from_slice(k).ok())
                    .collect(),
            ),
        }
    }

    pub fn update(&mut self, chunk: &[u8]) {
        match self {
            Self::Sha1(macs) => macs.iter_mut().for_each(|m| m.update(chunk)),
            Self::Sha256(macs) => macs.iter_mut().for_each(|m| m.update(chunk)),
        }
    }

    /// True when any secret's MAC equals the claimed digest (each compared in constant time).
    pub fn verify(self, claimed: &ClaimedSignature) -> Result<(), SignatureError> {
        let matched = match self {
            Self::Sha1(macs) if claimed.algorithm == Algorithm::Sha1 => macs
                .into_iter()
                .fold(false, |ok, m| m.verify_slice(&claimed.digest).is_ok() | ok),
            Self::Sha256(macs) if claimed.algorithm == Algorithm::Sha256 => macs
                .into_iter()
                .fold(false, |ok, m| m.verify_slice(&claimed.digest).is_ok() | ok),
            _ => false,
        };
        matched.then_some(()).ok_or(SignatureError::Mismatch)
    }
}

/// The header value Labelbox would send for `body` (`sha1=<hex>` or `sha256=<hex>`).
pub fn sign(secret: &[u8], body: &[u8], algorithm: Algorithm) -> String {
    // Reading from a slice cannot fail.
    sign_reader(secret, body, algorithm).unwrap_or_default()
}

/// [`sign`] for a body read from `input` in chunks, so a body of any size is signed in
/// constant memory.
pub fn sign_reader(
    secret: &[u8],
    input: impl std::io::Read,
    algorithm: Algorithm,
) -> std::io::Result<String> {
    let digest = match algorithm {
        Algorithm::Sha1 => hex_mac::<Hmac<Sha1>>(secret, input)?,
        Algorithm::Sha256 => hex_mac::<Hmac<Sha256>>(secret, input)?,
    };
    Ok(format!("{}{digest}", algorithm.prefix()))
}

/// Bytes read per call while signing a stream.
const SIGN_CHUNK_BYTES: usize = 1 << 20;

fn hex_mac<M: Mac + hmac::digest::KeyInit>(
    secret: &[u8],
    mut input: impl std::io::Read,
) -> std::io::Result<String> {
    let mut mac = <M as hmac::digest::KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    let mut buffer = vec![0; SIGN_CHUNK_BYTES];
    loop {
        match input.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => mac.update(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const BODY: &[u8] = br#"{"id":"clabel","updatedAt":"2024-05-02T08:30:12Z"}"#;

    fn secrets(list: &[&str]) -> Vec<SecretString> {
        list.iter()
            .map(|s| SecretString::from((*s).to_owned()))
            .collect()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).expect("header"));
        }
        map
    }

    fn check(hdrs: &HeaderMap, secret_list: &[&str], body: &[u8]) -> Result<(), SignatureError> {
        let claimed = ClaimedSignature::from_headers(hdrs, true)?;
        let mut mac = BodyMac::new(claimed.algorithm, &secrets(secret_list));
        // Feed in uneven chunks, as a streamed body arrives.
        for chunk in body.chunks(7) {
            mac.update(chunk);
        }
        mac.verify(&claimed)
    }

    #[test]
    fn known_sha1_vector_matches_openssl() {
        // printf 'hello' | openssl dgst -sha1 -hmac key
        assert_eq!(
            sign(b"key", b"hello", Algorithm::Sha1),
            "sha1=b34ceac4516ff23a143e61d79d0fa7a4fbe5f266"
        );
    }

    #[test]
    fn sha1_signature_verifies_and_tampering_fails() {
        let sig = sign(b"s3cret", BODY, Algorithm::Sha1);
        let hdrs = headers(&[(SHA1_HEADER, &sig)]);
        assert_eq!(check(&hdrs, &["s3cret"], BODY), Ok(()));
        let mut tampered = BODY.to_vec();
        tampered[5] ^= 1;
        assert_eq!(
            check(&hdrs, &["s3cret"], &tampered),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(&hdrs, &["other"], BODY),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn sha256_header_wins_over_sha1() {
        let good256 = sign(b"s3cret", BODY, Algorithm::Sha256);
        let bad1 = sign(b"wrong", BODY, Algorithm::Sha1);
        let hdrs = headers(&[(SHA256_HEADER, &good256), (SHA1_HEADER, &bad1)]);
        assert_eq!(check(&hdrs, &["s3cret"], BODY), Ok(()));
        let bad256 = sign(b"wrong", BODY, Algorithm::Sha256);
        let good1 = sign(b"s3cret", BODY, Algorithm::Sha1);
        let hdrs = headers(&[(SHA256_HEADER, &bad256), (SHA1_HEADER, &good1)]);
        assert_eq!(
            check(&hdrs, &["s3cret"], BODY),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn any_rotated_secret_is_accepted() {
        let sig = sign(b"new-secret", BODY, Algorithm::Sha1);
        let hdrs = headers(&[(SHA1_HEADER, &sig)]);
        assert_eq!(check(&hdrs, &["old-secret", "new-secret"], BODY), Ok(()));
    }

    #[test]
    fn uppercase_hex_and_prefix_are_accepted() {
        let sig = sign(b"s3cret", BODY, Algorithm::Sha1).to_uppercase();
        let hdrs = headers(&[(SHA1_HEADER, &sig)]);
        assert_eq!(check(&hdrs, &["s3cret"], BODY), Ok(()));
    }

    #[test]
    fn missing_and_malformed_headers_are_told_apart() {
        assert_eq!(
            check(&headers(&[]), &["s"], BODY),
            Err(SignatureError::Missing)
        );
        for bad in [
            "sha1=",
            "sha1=xyz",
            "md5=b34ceac4516ff23a143e61d79d0fa7a4fbe5f266",
            "b34ceac4516ff23a143e61d79d0fa7a4fbe5f266",
            "sha1=b34ceac4516ff23a143e61d79d0fa7a4fbe5f2",
            "sha256=b34ceac4516ff23a143e61d79d0fa7a4fbe5f266",
        ] {
            let hdrs = headers(&[(SHA1_HEADER, bad)]);
            assert_eq!(
                ClaimedSignature::from_headers(&hdrs, true),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn sha1_can_be_turned_off() {
        let sig = sign(b"s3cret", BODY, Algorithm::Sha1);
        let hdrs = headers(&[(SHA1_HEADER, &sig)]);
        assert_eq!(
            ClaimedSignature::from_headers(&hdrs, false),
            Err(SignatureError::Missing)
        );
    }

    #[test]
    fn debug_output_hides_the_digest() {
        let sig = sign(b"s3cret", BODY, Algorithm::Sha1);
        let claimed =
            ClaimedSignature::from_headers(&headers(&[(SHA1_HEADER, &sig)]), true).expect("ok");
        assert!(!format!("{claimed:?}").contains(&sig[5..15]));
    }
}
