//! The operations console: `/ui/` on the admin listener. It answers the questions of whoever
//! is on call (did Labelbox send it, did we accept it, was it stale, which handler failed and
//! why) on a few server-rendered pages, and replays dead letters.
//!
//! Rules of thumb:
//! - it reads through the store's [`Inspect`] trait (and the queue's depth), on SQLite and
//!   PostgreSQL alike, and replays through the same path as `labelhook events replay`; it
//!   writes no SQL of its own;
//! - pages are HTML built on the server (maud, which escapes every value); there is no script
//!   at all, so the Content-Security-Policy can forbid every script and every frame;
//! - everything a client or a body can make big is cut: page sizes, a body's preview, header
//!   values, the number of deliveries one replay takes;
//! - changes are POSTs with a CSRF token and a same-origin check ([`auth`]); with
//!   `[admin] token` set, every page wants a session (a login form) and `/metrics` the token;
//! - nothing secret is shown: signature and credential headers are redacted (again: the store
//!   keeps them redacted already), and no configuration value is ever rendered.
//!
//! [`Inspect`]: crate::store::Inspect

mod actions;
mod auth;
mod detail;
mod pages;
pub mod replay;
pub mod tally;
mod views;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::html;
use secrecy::SecretString;
use serde::Deserialize;

use crate::delivery::Clock;
use crate::dispatch::RouteSettings;
use crate::dispatch::Routes;
use crate::handlers::HandlerSettings;
use crate::settings::SecretSource;
use crate::store::{Store, StoreError};

pub use auth::{Guard, GuardError};
pub use tally::Tally;

/// The stylesheet, compiled into the binary.
const STYLESHEET: &str = include_str!("console.css");
/// Largest form the console accepts (a replay of a page of dead letters is a few KiB).
const FORM_MAX_BYTES: usize = 64 * 1024;
/// Sent with every console answer: no script from anywhere, no frames, nothing sniffed.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'none'; \
    object-src 'none'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'; \
    form-action 'self'; base-uri 'none'";

/// The console, shared by its pages.
#[derive(Clone)]
pub struct Console(Arc<Inner>);

struct Inner {
    store: Arc<dyn Store>,
    routes: Routes,
    /// The configured handlers' names, for the filters.
    handlers: Vec<String>,
    guard: Guard,
    tally: Arc<Tally>,
    clock: Arc<dyn Clock>,
}

/// `[admin]`: who may use the console and `/metrics`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// When set, the console wants it at its login form and `/metrics` as
    /// `Authorization: Bearer <token>`; for an admin listener reachable from other machines.
    pub token: Option<SecretSource>,
}

impl Console {
    /// The console of `routes` and `handlers`, behind `admin_token` (`[admin] token` as read)
    /// when there is one.
    pub fn new(
        routes: &[RouteSettings],
        handlers: &[HandlerSettings],
        admin_token: Option<&SecretString>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        tally: Arc<Tally>,
    ) -> Result<Console, GuardError> {
        Ok(Console(Arc::new(Inner {
            store,
            routes: Routes::new(routes),
            handlers: handlers.iter().map(|h| h.name.clone()).collect(),
            guard: Guard::new(admin_token)?,
            tally,
            clock,
        })))
    }

    /// The `/ui` routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
            .route("/ui/", get(pages::overview))
            .route("/ui/deliveries", get(pages::deliveries))
            .route("/ui/delivery", get(pages::delivery))
            .route("/ui/delivery/body", get(pages::body))
            .route("/ui/entity", get(pages::entity))
            .route("/ui/dead", get(pages::dead_letters))
            .route("/ui/replay/confirm", post(actions::confirm_replay))
            .route("/ui/replay", post(actions::replay))
            .route("/ui/login", get(actions::login_form).post(actions::login))
            .route("/ui/logout", post(actions::logout))
            .route("/ui/static/console.css", get(stylesheet))
            .route_layer(middleware::from_fn_with_state(self.clone(), admit))
            .layer(DefaultBodyLimit::max(FORM_MAX_BYTES))
            .layer(middleware::from_fn(security_headers))
            .with_state(self.clone())
    }
}

/// `/metrics` with `[admin] token` set: only for `Authorization: Bearer <token>`.
pub async fn require_bearer(
    State(console): State<Console>,
    request: Request,
    next: Next,
) -> Response {
    if console.0.guard.bearer_allows(request.headers()) {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "an admin token is required ([admin] token)\n",
    )
        .into_response()
}

/// Everything but the login form and the stylesheet wants a session when a token is set.
/// A page asked for without one is answered 401 with the login form in place of the page, so
/// a browser can log in and a script learns at once that it may not look.
async fn admit(State(console): State<Console>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let open = path == "/ui/login" || path.starts_with("/ui/static/");
    let now = console.0.clock.now();
    if open || console.0.guard.admits(request.headers(), now) {
        return next.run(request).await;
    }
    if request.method() == Method::GET {
        (
            StatusCode::UNAUTHORIZED,
            actions::login_page(&console, request.headers(), false),
        )
            .into_response()
    } else {
        ConsoleError::Unauthorized.into_response()
    }
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Pages show live state and, behind a token, private data: never from a cache.
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        STYLESHEET,
    )
        .into_response()
}

/// Why a console request failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("the store did not answer: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "this form is out of date or did not come from the console; reload the page and try again"
    )]
    Forbidden,
    #[error("log in first")]
    Unauthorized,
    #[error("the body could not be read: {0}")]
    Body(#[from] std::io::Error),
}

impl ConsoleError {
    fn status(&self) -> StatusCode {
        match self {
            ConsoleError::Store(_) | ConsoleError::Body(_) => StatusCode::SERVICE_UNAVAILABLE,
            ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
            ConsoleError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ConsoleError::Forbidden => StatusCode::FORBIDDEN,
            ConsoleError::Unauthorized => StatusCode::UNAUTHORIZED,
        }
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        if let ConsoleError::Store(e) = &self {
            tracing::warn!(error = %e, "console: store error");
        }
        let status = self.status();
        let page = html! {
            (maud::DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    title { (status.as_u16()) " · labelhook" }
                    link rel="stylesheet" href="/ui/static/console.css";
                }
                body {
                    main {
                        h1 { (status.canonical_reason().unwrap_or("Error")) }
                        p.error { (self.to_string()) }
                        p { a href="/ui/" { "Back to the overview" } }
                    }
                }
            }
        };
        (status, Html(page.into_string())).into_response()
    }
}
