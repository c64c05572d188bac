//! The `http` handler: forwards the delivery's body with a POST, signed afresh with the
//! handler's own secret the way Labelbox signs (`X-Hub-Signature`, `X-Hub-Signature-256`).
//!
//! Rules of thumb:
//! - only hosts in `allowed_hosts` (default: the host of `url`) may be configured, and redirects
//!   are not followed, so a receiver cannot bounce signed bodies elsewhere;
//! - a stored body is read twice, once for the HMACs and once as the streamed request body,
//!   rather than held in memory;
//! - 2xx is success; 408, 429, 5xx, timeouts and connection errors are worth retrying; any other
//!   answer (3xx included) will not get better by itself;
//! - error messages carry the status and a short reason, never the URL's path or query (they
//!   may hold tokens) and never a signature.

use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{redirect, Body, Client, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use sha1::Sha1;
use sha2::Sha256;

use futures_util::StreamExt;

use super::settings::HandlerSettings;
use super::{BuildError, Handler, HandlerError, HandlerEvent, Payload};

/// Per-attempt limit when `timeout` is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upload rate a large body is given time for, on top of `timeout`: a 1 GiB label must not
/// time out merely for being large.
const MIN_UPLOAD_BYTES_PER_SECOND: u64 = 1024 * 1024;

/// Forwards events to one URL.
pub struct HttpHandler {
    name: String,
    url: Url,
    /// Host and port for error messages: identifies the receiver without path or query.
    target: String,
    timeout: Duration,
    client: Client,
    /// Only the first configured secret signs; the others exist for the receiver's rotation.
    secret: Option<SecretString>,
}

impl std::fmt::Debug for HttpHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpHandler")
            .field("name", &self.name)
            .field("target", &self.target)
            .field("timeout", &self.timeout)
            .field("signed", &self.secret.is_some())
            .finish()
    }
}

impl HttpHandler {
    pub(super) fn from_settings(
        settings: &HandlerSettings,
        secrets: &[SecretString],
    ) -> Result<HttpHandler, BuildError> {
        let name = settings.name.clone();
        let invalid = |key, problem: &str| BuildError::Invalid {
            name: name.clone(),
            key,
            problem: problem.to_owned(),
        };
        let url = settings.url.as_deref().ok_or_else(|| BuildError::Missing {
            name: name.clone(),
            kind: "http",
            key: "url",
        })?;
        let url = Url::parse(url).map_err(|_| invalid("url", "is not a valid URL"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("url", "must be an http:// or https:// URL"));
        }
        let host = url
            .host_str()
            .ok_or_else(|| invalid("url", "has no host"))?
            .to_ascii_lowercase();
        let allowed = match &settings.allowed_hosts {
            None => true,
            Some(hosts) => hosts.iter().any(|h| h.eq_ignore_ascii_case(&host)),
        };
        if !allowed {
            return Err(BuildError::HostNotAllowed { name, host });
        }
        let timeout = settings.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(invalid("timeout", "must be greater than 0"));
        }
        let client = Client::builder()
            .redirect(redirect::Policy::none())
            .connect_timeout(timeout)
            .build()
            .map_err(|source| BuildError::HttpClient {
                name: name.clone(),
                source,
            })?;
        let target = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host,
        };
        Ok(HttpHandler {
            name,
            url,
            target,
            timeout,
            client,
            secret: secrets.first().cloned(),
        })
    }

    /// The `X-Hub-Signature` and `X-Hub-Signature-256` values for `body`.
    async fn signatures(
        &self,
        secret: &SecretString,
        body: &Payload,
    ) -> Result<(String, String), HandlerError> {
        let key = secret.expose_secret().as_bytes();
        let mut sha1 = Hmac::<Sha1>::new_from_slice(key)
            .map_err(|_| HandlerError::Permanent("the signing secret is unusable".to_owned()))?;
        let mut sha256 = Hmac::<Sha256>::new_from_slice(key)
            .map_err(|_| HandlerError::Permanent("the signing secret is unusable".to_owned()))?;
        let mut chunks = body.stream().await.map_err(|e| self.body_error(&e))?;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| self.body_error(&e))?;
            sha1.update(&chunk);
            sha256.update(&chunk);
        }
        Ok((
            format!("sha1={}", hex::encode(sha1.finalize().into_bytes())),
            format!("sha256={}", hex::encode(sha256.finalize().into_bytes())),
        ))
    }

    fn body_error(&self, error: &std::io::Error) -> HandlerError {
        HandlerError::Retryable(format!(
            "http handler {:?}: cannot read the body: {error}",
            self.name
        ))
    }

    /// Classifies a transport failure; reqwest's own text is not used because it names the URL.
    fn send_error(&self, error: &reqwest::Error) -> HandlerError {
        let what = if error.is_timeout() {
            format!(
                "timed out after {}",
                humantime::format_duration(self.timeout)
            )
        } else if error.is_connect() {
            "cannot connect".to_owned()
        } else {
            "request failed".to_owned()
        };
        let cause = root_cause(error);
        HandlerError::Retryable(format!("POST to {} {what}: {cause}", self.target))
    }
}

/// The innermost error's text (e.g. "Connection refused (os error 111)"), which is the useful
/// part and, being below reqwest, does not contain the URL.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// What an answer means for the dispatcher.
fn classify(status: StatusCode) -> Option<bool> {
    if status.is_success() {
        None
    } else {
        let retryable = status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error();
        Some(retryable)
    }
}

#[async_trait]
impl Handler for HttpHandler {
    async fn handle(&self, event: &HandlerEvent) -> Result<(), HandlerError> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(event.body.len()));
        let text_header = |value: &str, what: &str| {
            HeaderValue::from_str(value).map_err(|_| {
                HandlerError::Permanent(format!("the {what} cannot be sent as a header"))
            })
        };
        headers.insert("x-labelbox-event", text_header(&event.topic, "topic")?);
        headers.insert(
            "x-labelbox-id",
            text_header(&event.delivery_id, "delivery id")?,
        );
        headers.insert(
            "x-labelhook-origin",
            HeaderValue::from_static(event.origin.as_str()),
        );
        if let Some(secret) = &self.secret {
            let (sha1, sha256) = self.signatures(secret, &event.body).await?;
            headers.insert("x-hub-signature", text_header(&sha1, "signature")?);
            headers.insert("x-hub-signature-256", text_header(&sha256, "signature")?);
        }
        let body = match event.body.as_inline() {
            Some(bytes) => Body::from(bytes.clone()),
            None => Body::wrap_stream(event.body.stream().await.map_err(|e| self.body_error(&e))?),
        };
        let limit =
            self.timeout + Duration::from_secs(event.body.len() / MIN_UPLOAD_BYTES_PER_SECOND);
        let response = self
            .client
            .post(self.url.clone())
            .timeout(limit)
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| self.send_error(&e))?;
        let status = response.status();
        match classify(status) {
            None => Ok(()),
            Some(retryable) => {
                let reason = status.canonical_reason().unwrap_or("unknown status");
                let note = if status.is_redirection() {
                    " (redirects are not followed)"
                } else {
                    ""
                };
                let message = format!(
                    "POST to {} answered {} {reason}{note}",
                    self.target,
                    status.as_u16()
                );
                Err(if retryable {
                    HandlerError::Retryable(message)
                } else {
                    HandlerError::Permanent(message)
                })
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::handlers::test_event;
    use axum::body::Bytes;
    use axum::extract::Path as UrlPath;
    use axum::http::{HeaderMap as AxumHeaders, StatusCode as AxumStatus};
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use axum::Router;
    use std::io::Write;
    use tokio::sync::mpsc;

    const SECRET: &str = "forwarding-secret";

    /// What the test server saw.
    struct Received {
        headers: AxumHeaders,
        body: Bytes,
    }

    /// A real HTTP server on a free loopback port: `POST /status/{code}` answers `code` and
    /// reports the request on the channel.
    async fn serve() -> (String, mpsc::UnboundedReceiver<Received>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let app = Router::new()
            .route(
                "/status/{code}",
                post(
                    move |UrlPath(code): UrlPath<u16>, headers: AxumHeaders, body: Bytes| {
                        let tx = tx.clone();
                        async move {
                            let _ = tx.send(Received { headers, body });
                            let status = AxumStatus::from_u16(code).unwrap();
                            let mut response: Response = status.into_response();
                            if status.is_redirection() {
                                response.headers_mut().insert(
                                    "location",
                                    "http://127.0.0.1:1/elsewhere".parse().unwrap(),
                                );
                            }
                            response
                        }
                    },
                ),
            )
            // Multi-megabyte bodies are part of the tests.
            .layer(axum::extract::DefaultBodyLimit::disable());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), rx)
    }

    fn settings(url: &str) -> HandlerSettings {
        serde_json::from_value(serde_json::json!({"name": "fwd", "kind": "http", "url": url}))
            .unwrap()
    }

    fn handler(url: &str) -> HttpHandler {
        HttpHandler::from_settings(&settings(url), &[SecretString::from(SECRET)]).unwrap()
    }

    fn json_event(body: &'static [u8]) -> HandlerEvent {
        test_event(1, Payload::inline(Bytes::from_static(body)), true)
    }

    fn verify(headers: &AxumHeaders, body: &[u8]) {
        let sha256 = headers["x-hub-signature-256"].to_str().unwrap();
        let sha256 = hex::decode(sha256.strip_prefix("sha256=").unwrap()).unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(body);
        mac.verify_slice(&sha256).unwrap();
        let sha1 = headers["x-hub-signature"].to_str().unwrap();
        let sha1 = hex::decode(sha1.strip_prefix("sha1=").unwrap()).unwrap();
        let mut mac = Hmac::<Sha1>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(body);
        mac.verify_slice(&sha1).unwrap();
    }

    #[tokio::test]
    async fn forwards_the_body_with_a_signature_that_verifies() {
        let (base, mut rx) = serve().await;
        let body = br#"{"id":"ckabc"}"#;
        handler(&format!("{base}/status/204"))
            .handle(&json_event(body))
            .await
            .unwrap();
        let got = rx.recv().await.unwrap();
        assert_eq!(&got.body[..], body);
        assert_eq!(got.headers["content-type"], "application/json");
        assert_eq!(got.headers["x-labelbox-event"], "LABEL_CREATED");
        assert_eq!(got.headers["x-labelbox-id"], "delivery-1");
        verify(&got.headers, &got.body);
    }

    #[tokio::test]
    async fn without_secrets_nothing_is_signed() {
        let (base, mut rx) = serve().await;
        let unsigned =
            HttpHandler::from_settings(&settings(&format!("{base}/status/200")), &[]).unwrap();
        unsigned.handle(&json_event(b"{}")).await.unwrap();
        let got = rx.recv().await.unwrap();
        assert!(!got.headers.contains_key("x-hub-signature"));
        assert!(!got.headers.contains_key("x-hub-signature-256"));
    }

    #[tokio::test]
    async fn a_file_body_arrives_intact_and_signed() {
        let (base, mut rx) = serve().await;
        let mut blob = tempfile::NamedTempFile::new().unwrap();
        let body: Vec<u8> = (0..3_000_000u32)
            .map(|i| b"{}[]ab\"\n"[(i % 8) as usize])
            .collect();
        blob.write_all(&body).unwrap();
        let event = test_event(
            5,
            crate::handlers::file_payload(blob.path().to_owned(), body.len() as u64),
            false,
        );
        handler(&format!("{base}/status/200"))
            .handle(&event)
            .await
            .unwrap();
        let got = rx.recv().await.unwrap();
        assert_eq!(got.body.len(), body.len());
        assert!(got.body[..] == body[..]);
        verify(&got.headers, &got.body);
    }

    async fn outcome(status: u16) -> HandlerError {
        let (base, mut rx) = serve().await;
        let err = handler(&format!("{base}/status/{status}?token=hidden"))
            .handle(&json_event(b"{}"))
            .await
            .unwrap_err();
        assert!(rx.recv().await.is_some());
        let text = err.to_string();
        assert!(text.contains(&status.to_string()), "{text}");
        assert!(!text.contains("sha"), "{text}");
        assert!(!text.contains("hidden"), "{text}");
        err
    }

    #[tokio::test]
    async fn server_errors_and_throttling_are_retryable() {
        for status in [500, 503, 408, 429] {
            let err = outcome(status).await;
            assert!(
                matches!(err, HandlerError::Retryable(_)),
                "{status}: {err:?}"
            );
        }
    }

    #[tokio::test]
    async fn client_errors_are_permanent() {
        for status in [404, 400, 401] {
            let err = outcome(status).await;
            assert!(
                matches!(err, HandlerError::Permanent(_)),
                "{status}: {err:?}"
            );
        }
    }

    #[tokio::test]
    async fn redirects_are_not_followed_and_permanent() {
        let err = outcome(302).await;
        assert!(matches!(err, HandlerError::Permanent(_)), "{err:?}");
        assert!(
            err.to_string().contains("redirects are not followed"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn connection_refused_is_retryable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = handler(&format!("http://{addr}/x?token=hidden"))
            .handle(&json_event(b"{}"))
            .await
            .unwrap_err();
        assert!(matches!(err, HandlerError::Retryable(_)), "{err:?}");
        assert!(!err.to_string().contains("hidden"), "{err}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out_as_retryable() {
        // Accepts connections but never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut settings = settings(&format!("http://{addr}/x"));
        settings.timeout = Some(Duration::from_millis(200));
        let handler = HttpHandler::from_settings(&settings, &[]).unwrap();
        let started = std::time::Instant::now();
        let err = handler.handle(&json_event(b"{}")).await.unwrap_err();
        assert!(matches!(err, HandlerError::Retryable(_)), "{err:?}");
        assert!(err.to_string().contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(listener);
    }

    #[test]
    fn hosts_outside_allowed_hosts_are_refused() {
        let mut s = settings("https://evil.example/hook");
        s.allowed_hosts = Some(vec!["internal.example".to_owned()]);
        let err = HttpHandler::from_settings(&s, &[]).unwrap_err();
        assert!(matches!(err, BuildError::HostNotAllowed { .. }), "{err:?}");
        assert!(err.to_string().contains("\"fwd\""), "{err}");
        s.allowed_hosts = Some(vec!["Evil.Example".to_owned()]);
        assert!(HttpHandler::from_settings(&s, &[]).is_ok());
        assert!(HttpHandler::from_settings(&settings("ftp://x/y"), &[]).is_err());
    }
}
