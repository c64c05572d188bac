//! The signature headers as a request brings them, picked and decoded, then checked against a
//! body. Input: one flag byte (bit 0: an `X-Hub-Signature-256` line, bit 1: an
//! `X-Hub-Signature` line, bit 2: the endpoint accepts SHA-1), then the SHA-256 header value,
//! a newline, the SHA-1 header value, a newline, and the body the rest.
//!
//! Beyond "never panics", it holds the parser to what the ingress relies on: the header that
//! wins is the one documented, nothing is claimed without a header, and a claim only verifies
//! when it is, byte for byte (but for case and surrounding blanks), what signing the body with
//! the secret gives.

#![no_main]

use http::{HeaderMap, HeaderValue};
use labelhook::test_support::delivery::signature::{self, SHA1_HEADER, SHA256_HEADER};
use labelhook::test_support::delivery::{Algorithm, BodyVerifier, SignatureError};
use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;

/// The endpoint's secret: the seeds are signed with it (see `fuzz/seed.sh`).
const SECRET: &str = "fuzz-secret";

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.splitn(3, |b| *b == b'\n');
    let sha256_value = parts.next().unwrap_or_default();
    let sha1_value = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    let accept_sha1 = flags & 4 != 0;

    // Only what HTTP lets through reaches the parser.
    let mut headers = HeaderMap::new();
    for (bit, name, value) in [
        (1, SHA256_HEADER, sha256_value),
        (2, SHA1_HEADER, sha1_value),
    ] {
        if flags & bit != 0 {
            let Ok(value) = HeaderValue::from_bytes(value) else {
                return;
            };
            headers.insert(name, value);
        }
    }
    let has_sha256 = headers.contains_key(SHA256_HEADER);
    let has_sha1 = headers.contains_key(SHA1_HEADER);

    let claimed = labelhook::fuzzing::claimed_signature(&headers, accept_sha1);
    let (claimed, value) = match claimed {
        Err(SignatureError::Missing) => {
            assert!(
                !(has_sha256 || has_sha1 && accept_sha1),
                "missing, yet a header was sent"
            );
            return;
        }
        Err(SignatureError::Mismatch) => panic!("the header parser cannot know of a mismatch"),
        Err(SignatureError::Malformed) => {
            assert!(has_sha256 || (has_sha1 && accept_sha1));
            return;
        }
        Ok(claimed) => {
            let (expected, value) = if has_sha256 {
                (Algorithm::Sha256, sha256_value)
            } else {
                assert!(has_sha1 && accept_sha1, "SHA-1 taken when it is turned off");
                (Algorithm::Sha1, sha1_value)
            };
            assert_eq!(claimed.algorithm, expected, "the wrong header won");
            (claimed, value)
        }
    };

    let secrets = [
        SecretString::from(SECRET),
        SecretString::from("other-secret"),
    ];
    let mut verifier = BodyVerifier::new(claimed.algorithm, &secrets);
    // In two chunks, as a body streams in.
    let (first, second) = body.split_at(body.len() / 2);
    verifier.update(first);
    verifier.update(second);
    let verified = verifier.verify(&claimed);

    let text = std::str::from_utf8(value)
        .expect("a decoded claim came from text")
        .trim()
        .to_ascii_lowercase();
    let genuine = secrets.iter().any(|s| {
        use secrecy::ExposeSecret;
        signature::sign(s.expose_secret().as_bytes(), body, claimed.algorithm) == text
    });
    match verified {
        Ok(proof) => {
            assert!(genuine, "a signature verified that signing does not give");
            assert_eq!(proof.body_len(), body.len() as u64);
        }
        Err(e) => {
            assert_eq!(e, SignatureError::Mismatch);
            assert!(!genuine, "a genuine signature was refused");
        }
    }
});
