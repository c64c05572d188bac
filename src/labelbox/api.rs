//! Calls to Labelbox's GraphQL API (LABELBOX.md 9.1): `POST {api_url}` with
//! `{"query", "variables"}` and `Authorization: Bearer <key>`; data under `data`, errors under
//! `errors[].extensions.code`, the rate limit as a top-level `message` that starts with
//! "You have exceeded".
//!
//! Retried, as the SDK does, with a wait that starts at `retry_backoff` and doubles (at most a
//! minute): the rate limit, server errors (5xx, `INTERNAL_SERVER_ERROR`) and timeouts; each
//! wait is said on stderr. Everything else is an error a user can act on ([`LabelboxError`]).
//! The key is a [`SecretString`], sent as a sensitive header and never formatted anywhere.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::progress::Remarks;
use super::settings::LabelboxSettings;
use super::LabelboxError;

/// The longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How much of an answer that is not Labelbox's JSON is quoted in an error.
const QUOTED_ANSWER_CHARS: usize = 200;

/// A handle on Labelbox's API for one command.
pub struct Api {
    http: reqwest::Client,
    url: reqwest::Url,
    key: SecretString,
    backoff: Duration,
    max_retries: u32,
    remarks: Arc<Remarks>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("url", &self.url.as_str())
            .field("key", &"[redacted]")
            .finish()
    }
}

#[derive(Deserialize)]
struct Answer {
    data: Option<Value>,
    #[serde(default)]
    errors: Vec<GraphqlError>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct GraphqlError {
    #[serde(default)]
    message: String,
    extensions: Option<Extensions>,
}

#[derive(Deserialize)]
struct Extensions {
    code: Option<String>,
}

/// One try's outcome: done, worth another try (and why), or failed.
enum Tried<T> {
    Done(T),
    Again(String),
    Failed(LabelboxError),
}

impl Api {
    pub fn new(
        settings: &LabelboxSettings,
        key: SecretString,
        remarks: Arc<Remarks>,
    ) -> Result<Self, LabelboxError> {
        let url = reqwest::Url::parse(&settings.api_url)
            .map_err(|e| LabelboxError::Setup(format!("labelbox.api_url: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .build()
            .map_err(|e| LabelboxError::Setup(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            url,
            key,
            backoff: settings.retry_backoff,
            max_retries: settings.max_retries,
            remarks,
        })
    }

    /// Runs one operation and returns its `data`, read as `T`. `what` names it in messages.
    pub async fn call<T: DeserializeOwned>(
        &self,
        what: &str,
        query: &str,
        variables: Value,
    ) -> Result<T, LabelboxError> {
        let body = serde_json::json!({ "query": query, "variables": variables });
        let mut wait = self.backoff;
        let mut attempt = 1;
        loop {
            let why = match self.try_once(what, &body).await {
                Tried::Done(data) => {
                    return serde_json::from_value(data).map_err(|e| LabelboxError::Answer {
                        what: what.to_owned(),
                        problem: e.to_string(),
                    })
                }
                Tried::Failed(e) => return Err(e),
                Tried::Again(why) => why,
            };
            if attempt > self.max_retries {
                return Err(LabelboxError::GaveUp {
                    what: what.to_owned(),
                    tries: attempt,
                    why,
                });
            }
            attempt += 1;
            self.remarks.say(&format!(
                "{why}; trying {what} again in {} (try {attempt} of {})",
                humantime::format_duration(wait),
                self.max_retries + 1
            ));
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_BACKOFF);
        }
    }

    async fn try_once(&self, what: &str, body: &Value) -> Tried<Value> {
        let Ok(mut bearer) = HeaderValue::from_str(&format!("Bearer {}", self.key.expose_secret()))
        else {
            return Tried::Failed(LabelboxError::Setup(
                "labelbox.api_key holds characters a header cannot carry".into(),
            ));
        };
        bearer.set_sensitive(true);
        let sent = self
            .http
            .post(self.url.clone())
            .header(AUTHORIZATION, bearer)
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .body(body.to_string())
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) if e.is_timeout() => return Tried::Again(format!("{what} timed out")),
            Err(e) => {
                return Tried::Failed(LabelboxError::Unreachable {
                    url: self.url.to_string(),
                    cause: root_cause(&e),
                })
            }
        };
        let status = response.status();
        let text = match response.text().await {
            Ok(text) => text,
            Err(e) if e.is_timeout() => return Tried::Again(format!("{what} timed out")),
            Err(e) => {
                return Tried::Failed(LabelboxError::Unreachable {
                    url: self.url.to_string(),
                    cause: root_cause(&e),
                })
            }
        };
        judge(what, status, &text)
    }
}

/// What one answer means.
fn judge(what: &str, status: reqwest::StatusCode, text: &str) -> Tried<Value> {
    let answer: Option<Answer> = serde_json::from_str(text).ok();
    let rate_limited = answer
        .as_ref()
        .and_then(|a| a.message.as_deref())
        .is_some_and(|m| m.starts_with("You have exceeded"));
    if rate_limited || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        return Tried::Again("Labelbox's rate limit was exceeded".into());
    }
    let Some(answer) = answer else {
        if status.is_server_error() {
            return Tried::Again(format!("Labelbox answered {status}"));
        }
        let quoted: String = text.chars().take(QUOTED_ANSWER_CHARS).collect();
        return Tried::Failed(LabelboxError::Answer {
            what: what.to_owned(),
            problem: format!("HTTP {status}, not Labelbox's JSON: {quoted:?}"),
        });
    };
    if let Some(error) = answer.errors.first() {
        let code = error
            .extensions
            .as_ref()
            .and_then(|e| e.code.clone())
            .unwrap_or_default();
        return match code.as_str() {
            "AUTHENTICATION_ERROR" => Tried::Failed(LabelboxError::Authentication),
            "INTERNAL_SERVER_ERROR" => Tried::Again(format!(
                "Labelbox had an internal error ({})",
                error.message
            )),
            "RESOURCE_NOT_FOUND" => Tried::Failed(LabelboxError::NotFound(error.message.clone())),
            _ => Tried::Failed(LabelboxError::Refused {
                what: what.to_owned(),
                code: if code.is_empty() {
                    "no code".into()
                } else {
                    code
                },
                message: error.message.clone(),
            }),
        };
    }
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return Tried::Failed(LabelboxError::Authentication);
    }
    if status.is_server_error() {
        return Tried::Again(format!("Labelbox answered {status}"));
    }
    match answer.data {
        Some(data) if status.is_success() => Tried::Done(data),
        _ => Tried::Failed(LabelboxError::Answer {
            what: what.to_owned(),
            problem: format!("HTTP {status} without data"),
        }),
    }
}

/// The innermost cause of an error: "Connection refused (os error 111)" rather than "error
/// sending request for url (...)".
pub(super) fn root_cause(error: &dyn std::error::Error) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    fn verdict(status: u16, text: &str) -> &'static str {
        match judge("test", StatusCode::from_u16(status).expect("status"), text) {
            Tried::Done(_) => "done",
            Tried::Again(_) => "again",
            Tried::Failed(LabelboxError::Authentication) => "authentication",
            Tried::Failed(LabelboxError::NotFound(_)) => "not found",
            Tried::Failed(_) => "failed",
        }
    }

    #[test]
    fn answers_are_told_apart_as_labelbox_documents_them() {
        assert_eq!(verdict(200, r#"{"data":{"user":{"id":"u"}}}"#), "done");
        let rate = r#"{"message":"You have exceeded the maximum number of requests"}"#;
        for status in [200, 400, 429] {
            assert_eq!(verdict(status, rate), "again", "{status}");
        }
        assert_eq!(verdict(429, "slow down"), "again");
        assert_eq!(verdict(502, "<html>bad gateway</html>"), "again");
        let auth = r#"{"errors":[{"message":"no","extensions":{"code":"AUTHENTICATION_ERROR"}}]}"#;
        assert_eq!(verdict(401, auth), "authentication");
        assert_eq!(verdict(200, auth), "authentication");
        let missing = r#"{"data":{"project":null},"errors":[{"message":"no such project","extensions":{"code":"RESOURCE_NOT_FOUND"}}]}"#;
        assert_eq!(verdict(200, missing), "not found");
        let internal =
            r#"{"errors":[{"message":"x","extensions":{"code":"INTERNAL_SERVER_ERROR"}}]}"#;
        assert_eq!(verdict(200, internal), "again");
        let invalid =
            r#"{"errors":[{"message":"bad","extensions":{"code":"GRAPHQL_VALIDATION_FAILED"}}]}"#;
        assert_eq!(verdict(400, invalid), "failed");
        assert_eq!(verdict(404, "not found"), "failed");
    }

    #[test]
    fn the_key_never_shows_in_debug() {
        let remarks = Arc::new(Remarks::silent());
        let api = Api::new(
            &LabelboxSettings::default(),
            SecretString::from("lb-key-do-not-print".to_owned()),
            remarks,
        )
        .expect("api");
        assert!(!format!("{api:?}").contains("do-not-print"));
    }
}
