//! Who may use the console and `/metrics`, and proof that a change was asked for from the
//! console's own pages.
//!
//! - **Token.** With `[admin] token` set, `/metrics` wants `Authorization: Bearer <token>` and
//!   the console a session cookie, which its login form sets once the token is given. Tokens
//!   are compared in constant time (as HMAC tags under this process's key, so their lengths
//!   leak nothing either). Without a token, whoever reaches the admin listener may use both:
//!   it binds to localhost unless told otherwise.
//! - **Sessions** are `issued.tag`, the tag an HMAC of the time under a key made at start:
//!   nothing to store, and a restart ends every session. The cookie is `HttpOnly` and
//!   `SameSite=Strict`.
//! - **Changes** (replay, login, logout) are POSTs carrying a CSRF token bound to the session,
//!   made the same way, and a request whose `Origin` or `Sec-Fetch-Site` says it comes from
//!   another site is refused before anything else.

use axum::http::{header, HeaderMap};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use crate::delivery::UnixMillis;

type HmacSha256 = Hmac<Sha256>;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "labelhook_session";
/// How long a login lasts.
pub const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;
/// How long a page's CSRF token stays good (a confirmation page left open over lunch).
const CSRF_TTL_MS: i64 = 12 * 3600 * 1000;
/// The CSRF context of a console without a token (there are no sessions then).
const NO_SESSION: &str = "-";

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("no random numbers from the operating system: {0}")]
    Random(String),
}

/// The console's keys: made at start, never stored.
pub struct Guard {
    key: [u8; 32],
    /// The token's tag under `key`, when a token is configured.
    token_tag: Option<Vec<u8>>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("token", &self.token_tag.as_ref().map(|_| "[set]"))
            .finish()
    }
}

impl Guard {
    pub fn new(token: Option<&SecretString>) -> Result<Guard, GuardError> {
        let mut key = [0_u8; 32];
        getrandom::fill(&mut key).map_err(|e| GuardError::Random(e.to_string()))?;
        let token_tag = token.map(|t| tag(&key, &[b"token", t.expose_secret().as_bytes()]));
        Ok(Guard { key, token_tag })
    }

    /// Whether `[admin] token` is set.
    pub fn token_required(&self) -> bool {
        self.token_tag.is_some()
    }

    /// Whether `presented` is the token, in constant time.
    pub fn token_matches(&self, presented: &[u8]) -> bool {
        let Some(expected) = &self.token_tag else {
            return false;
        };
        mac(&self.key, &[b"token", presented])
            .verify_slice(expected)
            .is_ok()
    }

    /// `/metrics`: open without a token, else only with `Authorization: Bearer <token>`.
    pub fn bearer_allows(&self, headers: &HeaderMap) -> bool {
        if !self.token_required() {
            return true;
        }
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .is_some_and(|token| self.token_matches(token))
    }

    /// A new session's cookie value.
    pub fn new_session(&self, now: UnixMillis) -> String {
        stamped(&self.key, b"session", NO_SESSION, now)
    }

    /// The session a request carries, when it is one of this process's and not expired.
    pub fn session<'a>(&self, headers: &'a HeaderMap, now: UnixMillis) -> Option<&'a str> {
        cookie(headers, SESSION_COOKIE)
            .filter(|v| check_stamp(&self.key, b"session", NO_SESSION, v, now, SESSION_TTL_MS))
    }

    /// Whether a request may see the console: always without a token, else with a session.
    pub fn admits(&self, headers: &HeaderMap, now: UnixMillis) -> bool {
        !self.token_required() || self.session(headers, now).is_some()
    }

    /// The CSRF token for forms shown to this request's session.
    pub fn csrf_token(&self, headers: &HeaderMap, now: UnixMillis) -> String {
        let context = self.session(headers, now).unwrap_or(NO_SESSION);
        stamped(&self.key, b"csrf", context, now)
    }

    /// Whether `token` was made by [`Guard::csrf_token`] for this request's session.
    pub fn csrf_valid(&self, headers: &HeaderMap, token: &str, now: UnixMillis) -> bool {
        let context = self.session(headers, now).unwrap_or(NO_SESSION);
        check_stamp(&self.key, b"csrf", context, token, now, CSRF_TTL_MS)
    }
}

/// False when the browser says the request comes from another site. `Sec-Fetch-Site`, which
/// every current browser sends, decides when present: only `same-origin` or `none` (typed or
/// bookmarked) pass. Without it, an `Origin` must name the host asked (`Host`); an `Origin` of
/// `null` says nothing (the console's `Referrer-Policy: no-referrer` makes browsers send it for
/// their own forms), so then, as for a client that sends neither (curl), the CSRF token alone
/// decides.
pub fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return matches!(site.as_bytes(), b"same-origin" | b"none");
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    if origin.as_bytes() == b"null" {
        return true;
    }
    let host = headers.get(header::HOST).map(|h| h.as_bytes());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest.as_bytes());
    matches!((origin_host, host), (Some(o), Some(h)) if o == h)
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The `Set-Cookie` value that starts a session.
pub fn session_cookie(value: &str) -> String {
    format!(
        "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_TTL_MS / 1000
    )
}

/// The `Set-Cookie` value that ends one.
pub fn expired_cookie() -> String {
    format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // Any key length is accepted by HMAC; `new_from_slice` cannot fail for it.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| <HmacSha256 as Mac>::new(&Default::default()));
    for part in parts {
        // Lengths first, so that parts cannot run into one another.
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac
}

fn tag(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    mac(key, parts).finalize().into_bytes().to_vec()
}

/// `issued.hex(tag(purpose, context, issued))`.
fn stamped(key: &[u8], purpose: &[u8], context: &str, now: UnixMillis) -> String {
    let issued = now.to_string();
    let tag = tag(key, &[purpose, context.as_bytes(), issued.as_bytes()]);
    format!("{issued}.{}", hex::encode(tag))
}

fn check_stamp(
    key: &[u8],
    purpose: &[u8],
    context: &str,
    value: &str,
    now: UnixMillis,
    ttl_ms: i64,
) -> bool {
    let Some((issued, tag_hex)) = value.split_once('.') else {
        return false;
    };
    let (Ok(at), Ok(tag)) = (issued.parse::<i64>(), hex::decode(tag_hex)) else {
        return false;
    };
    // A stamp from the future is as wrong as an old one.
    if at > now || now - at > ttl_ms {
        return false;
    }
    mac(key, &[purpose, context.as_bytes(), issued.as_bytes()])
        .verify_slice(&tag)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_cookie(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let cookie = format!("other=1; {SESSION_COOKIE}={value}");
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&cookie).expect("header"),
        );
        headers
    }

    #[test]
    fn the_token_matches_only_itself() {
        let guard = Guard::new(Some(&SecretString::from("s3cret".to_owned()))).expect("guard");
        assert!(guard.token_matches(b"s3cret"));
        assert!(!guard.token_matches(b"s3cre"));
        assert!(!guard.token_matches(b"s3cret "));
        let open = Guard::new(None).expect("guard");
        assert!(!open.token_matches(b""));
        assert!(open.bearer_allows(&HeaderMap::new()));
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        assert!(guard.bearer_allows(&headers));
        assert!(!guard.bearer_allows(&HeaderMap::new()));
    }

    #[test]
    fn sessions_and_csrf_tokens_are_this_processs_and_expire() {
        let guard = Guard::new(Some(&SecretString::from("t".to_owned()))).expect("guard");
        let other = Guard::new(Some(&SecretString::from("t".to_owned()))).expect("guard");
        let now = 1_000_000_000;
        let session = guard.new_session(now);
        let headers = with_cookie(&session);
        assert!(guard.admits(&headers, now + 1000));
        assert!(!guard.admits(&headers, now + SESSION_TTL_MS + 1));
        assert!(!other.admits(&headers, now + 1000), "another process's key");
        assert!(!guard.admits(&HeaderMap::new(), now));
        assert!(!guard.admits(&with_cookie("1.00"), now));

        let csrf = guard.csrf_token(&headers, now);
        assert!(guard.csrf_valid(&headers, &csrf, now + 1000));
        assert!(
            !guard.csrf_valid(&HeaderMap::new(), &csrf, now),
            "bound to the session"
        );
        assert!(!guard.csrf_valid(&headers, "", now));
        let forged = csrf.replacen(|c: char| c.is_ascii_digit(), "9", 1);
        assert!(!guard.csrf_valid(&headers, &forged, now + 1000));
    }

    #[test]
    fn requests_from_other_sites_are_told_apart() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9090"));
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:9090"),
        );
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!same_origin(&headers));
        headers.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(same_origin(&headers), "the token decides");
        headers.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(
            same_origin(&headers),
            "a browser's own form under no-referrer"
        );
        headers.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&headers));
        headers.remove(header::ORIGIN);
        assert!(!same_origin(&headers));
        headers.insert("sec-fetch-site", HeaderValue::from_static("same-site"));
        assert!(
            !same_origin(&headers),
            "a sibling subdomain is another site here"
        );
    }
}
