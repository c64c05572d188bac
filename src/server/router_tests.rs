//! The delivery routes' answers, in process: the real router ([`app`]) over a real SQLite
//! store in a temporary directory, driven with `tower::ServiceExt::oneshot`, the client's
//! address given by `MockConnectInfo`. Each test takes milliseconds, so the whole status
//! matrix (README.md's "Answers") runs in the default `cargo test`. tests/it/ingress.rs checks
//! the same answers against the real binary over real sockets, and what only a socket shows
//! (timeouts, the connection limit, chunked uploads, the logs).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::request::Builder;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::Router;
use tower::ServiceExt;

use super::app;
use crate::config::Config;
use crate::delivery::signature::sign;
use crate::delivery::{Algorithm, Clock, SystemClock};
use crate::ingress::admission::Admission;
use crate::ingress::IngressState;
use crate::store::Store;

const SECRET: &str = "router-test-secret";
/// The variable the configuration names for [`SECRET`] (given to `Config::load`, not set in
/// the process's environment).
const SECRET_ENV: &str = "LH_ROUTER_TEST_SECRET";
const LABEL_UPDATED: &[u8] = include_bytes!("../../tests/fixtures/label_updated.json");
const MODEL_RUN: &[u8] = include_bytes!("../../tests/fixtures/model_run.json");
/// The client address the default allowlist lets in.
const LOOPBACK: &str = "127.0.0.1:40000";
const MISMATCH_BODY: &str = r#"{"error":"signature mismatch","hint":"signed with another secret, or the body changed after signing (send the exact bytes: curl --data-binary @file, not -d)"}"#;

/// The router of one configuration, over its own store.
struct Harness {
    router: Router,
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

/// An answer, read whole.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    request_id: Option<String>,
    body: String,
}

impl Harness {
    /// `server` and `network` are lines added to those sections; `extra`, more sections.
    async fn start(server: &str, network: &str, extra: &str) -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let toml = format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{server}

[network]
{network}

[store]
url = "sqlite://{store}/labelhook.db"

[[endpoint]]
name = "labelbox"
secrets = [{{ env = "{SECRET_ENV}" }}]

{extra}
"#,
            store = dir.path().display(),
        );
        let path = dir.path().join("labelhook.toml");
        std::fs::write(&path, toml).expect("write config");
        let env = HashMap::from([(SECRET_ENV.to_owned(), SECRET.to_owned())]);
        let config = Config::load(&path, &env, true).expect("a valid config");
        let settings = &config.settings;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let store = crate::store::open_for_serving(
            &settings.store,
            None,
            settings.server.queue_capacity,
            clock.clone(),
        )
        .await
        .expect("open the store");
        let admission = Arc::new(Admission::new(
            settings.server.backlog_limit,
            settings.server.backlog_max_delay,
        ));
        let state = IngressState::new(crate::receiving(&config), store.clone(), clock, admission);
        let model_path = settings.model_training.as_ref().map(|m| m.path.as_str());
        Harness {
            router: app(state, model_path),
            store,
            _dir: dir,
        }
    }

    /// The default allowlist (loopback), nothing else.
    async fn plain() -> Harness {
        Harness::start("", r#"allowlist = ["127.0.0.1/32"]"#, "").await
    }

    /// Sends `request` as if from `peer`.
    async fn send(&self, peer: &str, request: Request<Body>) -> Answer {
        let peer: SocketAddr = peer.parse().expect("a socket address");
        let response = self
            .router
            .clone()
            .layer(MockConnectInfo(peer))
            .oneshot(request)
            .await
            .expect("the router answers");
        let status = response.status();
        let request_id = response
            .headers()
            .get("x-request-id")
            .map(|v| v.to_str().expect("ASCII").to_owned());
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("the body");
        Answer {
            status,
            request_id,
            body: String::from_utf8(body.to_vec()).expect("UTF-8"),
        }
    }

    /// The copies of delivery `id` the store keeps.
    async fn stored(&self, id: &str) -> Vec<crate::store::DeliveryDetail> {
        self.store.show(id).await.expect("show")
    }

    async fn close(self) {
        self.store.close().await;
    }
}

/// A delivery to `/webhooks/labelbox` as Labelbox sends one, but for its signature.
fn unsigned(id: &str) -> Builder {
    Request::post("/webhooks/labelbox")
        .header("content-type", "application/json")
        .header("x-labelbox-event", "LABEL_UPDATED")
        .header("x-labelbox-id", id)
}

/// [`unsigned`], signed as Labelbox signs it.
fn delivery(id: &str, body: &[u8]) -> Builder {
    unsigned(id).header("x-hub-signature", sha1(SECRET, body))
}

fn sha1(secret: &str, body: &[u8]) -> String {
    sign(secret.as_bytes(), body, Algorithm::Sha1)
}

/// The fixture `LABEL_UPDATED`, delivered as [`delivery`] `id`.
fn signed_label(id: &str) -> Request<Body> {
    with_body(delivery(id, LABEL_UPDATED), LABEL_UPDATED)
}

/// The request with `body`, its length declared.
fn with_body(builder: Builder, body: &[u8]) -> Request<Body> {
    builder
        .header("content-length", body.len())
        .body(Body::from(body.to_vec()))
        .expect("a request")
}

/// `request` with header `name` set to `value` alone, or removed when `value` is `None`.
fn setting(mut request: Request<Body>, name: &'static str, value: Option<&str>) -> Request<Body> {
    match value {
        Some(value) => {
            let value = HeaderValue::from_bytes(value.as_bytes()).expect("a header value");
            request.headers_mut().insert(name, value);
        }
        None => {
            request.headers_mut().remove(name);
        }
    }
    request
}

#[tokio::test]
async fn a_new_delivery_is_accepted_202_and_its_repeat_answered_200_without_a_second_copy() {
    let h = Harness::plain().await;
    let first = h.send(LOOPBACK, signed_label("crt1")).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{first:?}");
    assert_eq!(first.body, r#"{"delivery_id":"crt1","status":"accepted"}"#);
    let again = h.send(LOOPBACK, signed_label("crt1")).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_eq!(again.body, r#"{"delivery_id":"crt1","status":"duplicate"}"#);
    let stored = h.stored("crt1").await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].client_ip, "127.0.0.1");
    h.close().await;
}

#[tokio::test]
async fn an_address_outside_the_allowlist_gets_403_and_a_forwarded_header_cannot_talk_its_way_in() {
    let h = Harness::start("", r#"allowlist = ["35.223.142.181/32"]"#, "").await;
    let outside = h.send(LOOPBACK, signed_label("crt2")).await;
    assert_eq!(outside.status, StatusCode::FORBIDDEN, "{outside:?}");
    assert_eq!(outside.body, r#"{"error":"source address not allowed"}"#);
    // Without a trusted proxy, the allowed address in a forwarding header is not looked at.
    let forwarded = delivery("crt2", LABEL_UPDATED)
        .header("x-forwarded-for", "35.223.142.181")
        .header("forwarded", "for=35.223.142.181");
    let answer = h.send(LOOPBACK, with_body(forwarded, LABEL_UPDATED)).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{answer:?}");
    // The allowed address itself is let in.
    let allowed = h.send("35.223.142.181:443", signed_label("crt3")).await;
    assert_eq!(allowed.status, StatusCode::ACCEPTED, "{allowed:?}");
    assert!(h.stored("crt2").await.is_empty());
    h.close().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_rightmost_untrusted_forwarded_address_is_the_client() {
    let network = "allowlist = [\"35.223.142.181/32\"]\ntrusted_proxies = [\"10.0.0.0/8\"]";
    let h = Harness::start("", network, "").await;
    let proxy = "10.1.2.3:5000";
    let via = |id: &str, xff: &str| {
        with_body(
            delivery(id, LABEL_UPDATED).header("x-forwarded-for", xff),
            LABEL_UPDATED,
        )
    };
    let cases = [
        ("cproxy1", "35.223.142.181", StatusCode::ACCEPTED),
        ("cproxy2", "35.223.142.181, 10.4.5.6", StatusCode::ACCEPTED),
        // A spoofed allowed address on the left does not help an outside client.
        (
            "cproxy3",
            "35.223.142.181, 198.51.100.7",
            StatusCode::FORBIDDEN,
        ),
        ("cproxy4", "198.51.100.7", StatusCode::FORBIDDEN),
    ];
    for (id, xff, expected) in cases {
        let answer = h.send(proxy, via(id, xff)).await;
        assert_eq!(answer.status, expected, "{xff}: {answer:?}");
    }
    // A peer that is not a trusted proxy is the client, whatever it forwards.
    let untrusted = h
        .send("198.51.100.9:5000", via("cproxy5", "35.223.142.181"))
        .await;
    assert_eq!(untrusted.status, StatusCode::FORBIDDEN, "{untrusted:?}");
    assert_eq!(h.stored("cproxy1").await[0].client_ip, "35.223.142.181");
    assert_eq!(h.stored("cproxy2").await.len(), 1);
    for refused in ["cproxy3", "cproxy4", "cproxy5"] {
        assert!(h.stored(refused).await.is_empty(), "{refused}");
    }
    h.close().await;
}

#[tokio::test]
async fn missing_malformed_or_wrong_signatures_get_401_and_a_right_one_202() {
    let h = Harness::plain().await;
    let mut tampered = LABEL_UPDATED.to_vec();
    tampered[10] ^= 0x01;
    let malformed = unsigned("csig2").header("x-hub-signature", "sha1=nothex");
    let wrong_secret = unsigned("csig3").header("x-hub-signature", sha1("wrong", LABEL_UPDATED));
    // A good SHA-1 does not rescue a wrong SHA-256: the stronger header wins.
    let wrong_sha256 = delivery("csig4", LABEL_UPDATED).header(
        "x-hub-signature-256",
        sign(b"wrong", LABEL_UPDATED, Algorithm::Sha256),
    );
    let cases = [
        (
            unsigned("csig1"),
            LABEL_UPDATED,
            r#"{"error":"signature missing"}"#,
        ),
        (
            malformed,
            LABEL_UPDATED,
            r#"{"error":"signature malformed"}"#,
        ),
        (wrong_secret, LABEL_UPDATED, MISMATCH_BODY),
        (
            delivery("csig5", LABEL_UPDATED),
            tampered.as_slice(),
            MISMATCH_BODY,
        ),
        (wrong_sha256, LABEL_UPDATED, MISMATCH_BODY),
    ];
    for (request, body, expected) in cases {
        let answer = h.send(LOOPBACK, with_body(request, body)).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{answer:?}");
        assert_eq!(answer.body, expected);
    }
    for id in ["csig1", "csig2", "csig3", "csig4", "csig5"] {
        assert!(h.stored(id).await.is_empty(), "{id}");
    }
    let sha256 = unsigned("csig6").header(
        "x-hub-signature-256",
        sign(SECRET.as_bytes(), LABEL_UPDATED, Algorithm::Sha256),
    );
    let right = h.send(LOOPBACK, with_body(sha256, LABEL_UPDATED)).await;
    assert_eq!(right.status, StatusCode::ACCEPTED, "{right:?}");
    h.close().await;
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_whether_its_length_is_declared_or_not() {
    let h = Harness::start(
        "max_body_bytes = 1000",
        r#"allowlist = ["127.0.0.1/32"]"#,
        "",
    )
    .await;
    assert!(LABEL_UPDATED.len() > 1000);
    let declared = h.send(LOOPBACK, signed_label("cbig1")).await;
    assert_eq!(
        declared.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{declared:?}"
    );
    assert_eq!(declared.body, r#"{"error":"body too large"}"#);
    // No Content-Length: the limit is found while the body streams in.
    let undeclared = signed_label("cbig2");
    let streamed = h
        .send(LOOPBACK, setting(undeclared, "content-length", None))
        .await;
    assert_eq!(
        streamed.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{streamed:?}"
    );
    let small = br#"{"id":"csmall","updatedAt":"2026-01-01T00:00:00Z"}"#;
    let fits = h
        .send(LOOPBACK, with_body(delivery("csmall", small), small))
        .await;
    assert_eq!(fits.status, StatusCode::ACCEPTED, "{fits:?}");
    assert!(h.stored("cbig1").await.is_empty() && h.stored("cbig2").await.is_empty());
    h.close().await;
}

#[tokio::test]
async fn an_encoded_body_or_a_type_that_is_not_json_gets_415() {
    let h = Harness::plain().await;
    let with =
        |id: &str, name: &'static str, value: Option<&str>| setting(signed_label(id), name, value);
    let cases = [
        (
            "cenc1",
            "content-encoding",
            Some("gzip"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "cenc2",
            "content-encoding",
            Some("identity, gzip"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "cenc3",
            "content-type",
            Some("text/plain"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        // A topic delivery must say it is JSON.
        (
            "cenc4",
            "content-type",
            None,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        // `identity` is no encoding at all, and a charset parameter is still JSON.
        (
            "cenc5",
            "content-encoding",
            Some("Identity"),
            StatusCode::ACCEPTED,
        ),
        (
            "cenc6",
            "content-type",
            Some("application/json; charset=utf-8"),
            StatusCode::ACCEPTED,
        ),
        (
            "cenc7",
            "content-type",
            Some("application/vnd.api+json"),
            StatusCode::ACCEPTED,
        ),
    ];
    for (id, name, value, expected) in cases {
        let answer = h.send(LOOPBACK, with(id, name, value)).await;
        assert_eq!(answer.status, expected, "{name}: {value:?}: {answer:?}");
        if expected == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            let error = if name == "content-type" {
                r#"{"error":"content type must be application/json"}"#
            } else {
                r#"{"error":"content encoding not supported"}"#
            };
            assert_eq!(answer.body, error);
        }
    }
    for (id, stored) in [("cenc1", 0), ("cenc3", 0), ("cenc4", 0), ("cenc5", 1)] {
        assert_eq!(h.stored(id).await.len(), stored, "{id}");
    }
    h.close().await;
}

#[tokio::test]
async fn an_unknown_endpoint_gets_404() {
    let h = Harness::plain().await;
    let request = Request::post("/webhooks/nope")
        .header("content-type", "application/json")
        .header("x-hub-signature", sha1(SECRET, LABEL_UPDATED));
    let answer = h.send(LOOPBACK, with_body(request, LABEL_UPDATED)).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{answer:?}");
    assert_eq!(answer.body, r#"{"error":"unknown endpoint"}"#);
    h.close().await;
}

#[tokio::test]
async fn a_delivery_id_that_is_empty_too_long_or_not_printable_gets_400() {
    let h = Harness::plain().await;
    let too_long = "c".repeat(201);
    for id in ["", too_long.as_str(), "c id", "c\u{e9}"] {
        let request = signed_label("placeholder");
        let answer = h
            .send(LOOPBACK, setting(request, "x-labelbox-id", Some(id)))
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{id:?}: {answer:?}");
        assert_eq!(answer.body, r#"{"error":"invalid X-Labelbox-Id"}"#);
    }
    let longest = "c".repeat(200);
    let fits = h.send(LOOPBACK, signed_label(&longest)).await;
    assert_eq!(fits.status, StatusCode::ACCEPTED, "{fits:?}");
    h.close().await;
}

/// Labelbox's model-training callbacks, from the one address `model_training.allowlist` lets
/// in (deliveries' own allowlist is another).
#[tokio::test]
async fn model_training_lists_models_and_takes_a_run_as_labelbox_sends_it() {
    let model_training = format!(
        r#"
[model_training]
path = "/model-training"
secrets = [{{ env = "{SECRET_ENV}" }}]
model_types = ["image_single_classification", "bounding_box"]
allowlist = ["10.9.9.9/32"]
"#
    );
    let h = Harness::start("", r#"allowlist = ["127.0.0.1/32"]"#, &model_training).await;
    let labelbox = "10.9.9.9:443";
    let models = |signature: Option<String>| {
        let mut request = Request::get("/model-training/models");
        if let Some(signature) = signature {
            request = request.header("x-hub-signature", signature);
        }
        request.body(Body::empty()).expect("a request")
    };
    let listed = h.send(labelbox, models(None)).await;
    assert_eq!(listed.status, StatusCode::OK, "{listed:?}");
    assert_eq!(
        listed.body,
        r#"{"bounding_box":{},"image_single_classification":{}}"#
    );
    let signed = h.send(labelbox, models(Some(sha1(SECRET, b"")))).await;
    assert_eq!(signed.status, StatusCode::OK, "{signed:?}");
    let wrong = h.send(labelbox, models(Some(sha1("wrong", b"")))).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{wrong:?}");
    let elsewhere = h.send(LOOPBACK, models(None)).await;
    assert_eq!(elsewhere.status, StatusCode::FORBIDDEN, "{elsewhere:?}");

    // As Labelbox sends a run: no Content-Type, no X-Labelbox-Id, an X-Hub-Signature.
    let run = |signature: Option<String>| {
        let mut request = Request::post("/model-training/model_run");
        if let Some(signature) = signature {
            request = request.header("x-hub-signature", signature);
        }
        request
    };
    let taken = h
        .send(
            labelbox,
            with_body(run(Some(sha1(SECRET, MODEL_RUN))), MODEL_RUN),
        )
        .await;
    assert_eq!(taken.status, StatusCode::ACCEPTED, "{taken:?}");
    let again = h
        .send(
            labelbox,
            with_body(run(Some(sha1(SECRET, MODEL_RUN))), MODEL_RUN),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert!(again.body.contains(r#""status":"duplicate""#), "{again:?}");
    let unsigned = h.send(labelbox, with_body(run(None), MODEL_RUN)).await;
    assert_eq!(unsigned.status, StatusCode::UNAUTHORIZED, "{unsigned:?}");
    let text = run(Some(sha1(SECRET, MODEL_RUN))).header("content-type", "text/plain");
    let typed = h.send(labelbox, with_body(text, MODEL_RUN)).await;
    assert_eq!(
        typed.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{typed:?}"
    );
    let refused = h
        .send(
            LOOPBACK,
            with_body(run(Some(sha1(SECRET, MODEL_RUN))), MODEL_RUN),
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{refused:?}");
    h.close().await;
}

/// The request layers: a proxy's fit `X-Request-Id` is kept, echoed and stored with the
/// delivery; a missing or unfit one is replaced by a made one; a refusal is answered with its
/// id too.
#[tokio::test]
async fn a_fit_request_id_is_kept_and_stored_and_a_missing_or_unfit_one_is_made() {
    let h = Harness::plain().await;
    let given = "proxy-7f3a.b_91";
    let from_proxy = delivery("crid1", LABEL_UPDATED).header("x-request-id", given);
    let answer = h.send(LOOPBACK, with_body(from_proxy, LABEL_UPDATED)).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    assert_eq!(answer.request_id.as_deref(), Some(given));
    assert_eq!(
        h.stored("crid1").await[0].request_id.as_deref(),
        Some(given)
    );

    let made = |answer: &Answer| {
        let id = answer.request_id.clone().expect("a request id");
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        id
    };
    let without = h.send(LOOPBACK, signed_label("crid2")).await;
    let id = made(&without);
    assert_eq!(h.stored("crid2").await[0].request_id, Some(id));

    let too_long = "a".repeat(129);
    let unfit = delivery("crid3", LABEL_UPDATED).header("x-request-id", &too_long);
    let replaced = h.send(LOOPBACK, with_body(unfit, LABEL_UPDATED)).await;
    let id = made(&replaced);
    let stored = &h.stored("crid3").await[0];
    assert_eq!(stored.request_id, Some(id.clone()));
    // Nothing of the unfit id is kept, not even among the delivery's headers.
    let header = stored
        .headers
        .iter()
        .find(|(name, _)| name == "x-request-id");
    assert_eq!(header.map(|(_, v)| v.as_str()), Some(id.as_str()));

    let refused = unsigned("crid4")
        .header("x-hub-signature", sha1("wrong", LABEL_UPDATED))
        .header("x-request-id", "refused-1");
    let answer = h.send(LOOPBACK, with_body(refused, LABEL_UPDATED)).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{answer:?}");
    assert_eq!(answer.request_id.as_deref(), Some("refused-1"));
    h.close().await;
}
