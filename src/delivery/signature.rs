//! The HMAC signature Labelbox puts on every delivery, checked over the raw body as it streams
//! in, and the proof that it was: [`BodyVerifier::verify`] is the only way to get a [`Verified`],
//! and a [`super::VerifiedDelivery`] cannot be built without one.
//!
//! `X-Hub-Signature-256: sha256=<hex>` wins when present; otherwise `X-Hub-Signature: sha1=<hex>`
//! (unless the endpoint turned SHA-1 off). Hex may be upper or lower case. The body is fed to one
//! MAC per configured secret (rotation keeps two valid for a while) and each is compared with
//! `verify_slice`, which is constant time. The verifier hashes the same bytes with SHA-256, so
//! the dedup key a delivery is stored under is the hash of exactly what was authenticated.
//! Nothing here ever formats a secret or a digest into an error.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// `X-Hub-Signature-256`: HMAC-SHA256, preferred when present.
pub const SHA256_HEADER: &str = "x-hub-signature-256";
/// `X-Hub-Signature`: HMAC-SHA1, what Labelbox has always sent.
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
    /// Picks and decodes a signature from the raw values of the two headers: SHA-256 when its
    /// header is present, otherwise SHA-1 when `accept_sha1`.
    pub fn pick(
        sha256_header: Option<&[u8]>,
        sha1_header: Option<&[u8]>,
        accept_sha1: bool,
    ) -> Result<Self, SignatureError> {
        if let Some(value) = sha256_header {
            return Self::parse(value, Algorithm::Sha256);
        }
        match sha1_header {
            Some(value) if accept_sha1 => Self::parse(value, Algorithm::Sha1),
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

/// Proof that a body is authentic, with the SHA-256 and length of exactly those bytes. Two
/// things make one (its fields are private to this module): [`BodyVerifier::verify`], when a
/// body's signature matched one of its endpoint's secrets, and [`Verified::fetched_with_our_key`],
/// for a body labelhook fetched from Labelbox's API itself (a backfill).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    body_sha256: [u8; 32],
    body_len: u64,
    origin: super::Origin,
}

impl Verified {
    /// The proof for a body built from what labelhook fetched from Labelbox's API with our
    /// key (`labelhook labelbox backfill`): no signature to check, since it did not come over
    /// the webhook route, but no one else could have put it there either. For the `labelbox`
    /// module only (the crate cannot narrow `pub(crate)` further from here): anything else that
    /// made one would bypass the verifier.
    pub(crate) fn fetched_with_our_key(body: &[u8]) -> Verified {
        Verified {
            body_sha256: Sha256::digest(body).into(),
            body_len: body.len() as u64,
            origin: super::Origin::Backfill,
        }
    }

    /// How the body came: by webhook (verified) or fetched by a backfill.
    pub fn origin(&self) -> super::Origin {
        self.origin
    }

    /// SHA-256 of the authenticated body: half of the dedup key.
    pub fn body_sha256(&self) -> [u8; 32] {
        self.body_sha256
    }

    pub fn body_len(&self) -> u64 {
        self.body_len
    }
}

/// The HMACs of a body under every secret, and its SHA-256, updated chunk by chunk.
#[derive(Clone)]
pub struct BodyVerifier {
    macs: Macs,
    sha256: Sha256,
    len: u64,
}

#[derive(Clone)]
enum Macs {
    Sha1(Vec<Hmac<Sha1>>),
    Sha256(Vec<Hmac<Sha256>>),
}

impl BodyVerifier {
    pub fn new(algorithm: Algorithm, secrets: &[SecretString]) -> Self {
        // HMAC accepts keys of any length, so `new_from_slice` cannot fail for these types.
        let keys = secrets.iter().map(|s| s.expose_secret().as_bytes());
        let macs = match algorithm {
            Algorithm::Sha1 => Macs::Sha1(
                keys.filter_map(|k| Hmac::<Sha1>::new_from_slice(k).ok())
                    .collect(),
            ),
            Algorithm::Sha256 => Macs::Sha256(
                keys.filter_map(|k| Hmac::<Sha256>::new_from_slice(k).ok())
                    .collect(),
            ),
        };
        Self {
            macs,
            sha256: Sha256::new(),
            len: 0,
        }
    }

    pub fn update(&mut self, chunk: &[u8]) {
        match &mut self.macs {
            Macs::Sha1(macs) => macs.iter_mut().for_each(|m| m.update(chunk)),
            Macs::Sha256(macs) => macs.iter_mut().for_each(|m| m.update(chunk)),
        }
        self.sha256.update(chunk);
        self.len += chunk.len() as u64;
    }

    /// The proof, when any secret's MAC equals the claimed digest (each compared in constant
    /// time, all of them every time).
    pub fn verify(self, claimed: &ClaimedSignature) -> Result<Verified, SignatureError> {
        let matched = match self.macs {
            Macs::Sha1(macs) if claimed.algorithm == Algorithm::Sha1 => macs
                .into_iter()
                .fold(false, |ok, m| m.verify_slice(&claimed.digest).is_ok() | ok),
            Macs::Sha256(macs) if claimed.algorithm == Algorithm::Sha256 => macs
                .into_iter()
                .fold(false, |ok, m| m.verify_slice(&claimed.digest).is_ok() | ok),
            _ => false,
        };
        if !matched {
            return Err(SignatureError::Mismatch);
        }
        Ok(Verified {
            body_sha256: self.sha256.finalize().into(),
            body_len: self.len,
            origin: super::Origin::Webhook,
        })
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

    const BODY: &[u8] = br#"{"id":"clabel","updatedAt":"2024-05-02T08:30:12Z"}"#;

    fn secrets(list: &[&str]) -> Vec<SecretString> {
        list.iter()
            .map(|s| SecretString::from((*s).to_owned()))
            .collect()
    }

    /// The two header values, as `pick` takes them.
    struct Headers<'a> {
        sha256: Option<&'a str>,
        sha1: Option<&'a str>,
    }

    fn headers<'a>(pairs: &[(&'static str, &'a str)]) -> Headers<'a> {
        let find = |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        Headers {
            sha256: find(SHA256_HEADER),
            sha1: find(SHA1_HEADER),
        }
    }

    fn claimed(hdrs: &Headers<'_>, accept_sha1: bool) -> Result<ClaimedSignature, SignatureError> {
        ClaimedSignature::pick(
            hdrs.sha256.map(str::as_bytes),
            hdrs.sha1.map(str::as_bytes),
            accept_sha1,
        )
    }

    fn check(hdrs: &Headers<'_>, secret_list: &[&str], body: &[u8]) -> Result<(), SignatureError> {
        let claimed = claimed(hdrs, true)?;
        let mut verifier = BodyVerifier::new(claimed.algorithm, &secrets(secret_list));
        // Feed in uneven chunks, as a streamed body arrives.
        for chunk in body.chunks(7) {
            verifier.update(chunk);
        }
        verifier.verify(&claimed).map(|_| ())
    }

    #[test]
    fn the_proof_carries_the_sha256_and_length_of_the_verified_bytes() {
        let sig = sign(b"s3cret", BODY, Algorithm::Sha256);
        let claimed = claimed(&headers(&[(SHA256_HEADER, &sig)]), true).expect("claimed");
        let mut verifier = BodyVerifier::new(Algorithm::Sha256, &secrets(&["s3cret"]));
        verifier.update(BODY);
        let proof = verifier.verify(&claimed).expect("verified");
        assert_eq!(proof.body_sha256(), <[u8; 32]>::from(Sha256::digest(BODY)));
        assert_eq!(proof.body_len(), BODY.len() as u64);
        assert_eq!(proof.origin(), crate::delivery::Origin::Webhook);
    }

    #[test]
    fn a_fetched_body_is_proven_as_a_backfill_with_the_same_hash() {
        let proof = Verified::fetched_with_our_key(BODY);
        assert_eq!(proof.body_sha256(), <[u8; 32]>::from(Sha256::digest(BODY)));
        assert_eq!(proof.body_len(), BODY.len() as u64);
        assert_eq!(proof.origin(), crate::delivery::Origin::Backfill);
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
                claimed(&hdrs, true),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn sha1_can_be_turned_off() {
        let sig = sign(b"s3cret", BODY, Algorithm::Sha1);
        let hdrs = headers(&[(SHA1_HEADER, &sig)]);
        assert_eq!(claimed(&hdrs, false), Err(SignatureError::Missing));
    }

    #[test]
    fn debug_output_hides_the_digest() {
        let sig = sign(b"s3cret", BODY, Algorithm::Sha1);
        let claimed = claimed(&headers(&[(SHA1_HEADER, &sig)]), true).expect("ok");
        assert!(!format!("{claimed:?}").contains(&sig[5..15]));
    }
}
