//! The console's changes, all POSTs with a CSRF token and a same-origin check: replaying
//! deliveries (a confirmation page first, saying what replay will do to each, then the replay,
//! saying what it did), logging in and out.

use axum::extract::{RawForm, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::{html, Markup};

use super::auth::{expired_cookie, same_origin, session_cookie};
use super::pages::render;
use super::replay::{describe, effect_name};
use super::views::{cut, delivery_link, entity_link, page, status_badge, Chrome, Section};
use super::{Console, ConsoleError};
use crate::store::{ReplayItem, ReplayTarget};

/// Most deliveries one replay from the console takes (a page of dead letters is 50).
const MAX_SELECTED: usize = 100;
/// Longest delivery id accepted in a form (the ingress keeps ids of at most 200 characters).
const MAX_ID_LEN: usize = 256;

/// A submitted form's fields.
struct Submitted {
    csrf: String,
    ids: Vec<String>,
    token: Option<String>,
}

fn fields(form: &[u8]) -> Submitted {
    let mut submitted = Submitted {
        csrf: String::new(),
        ids: Vec::new(),
        token: None,
    };
    for (key, value) in form_urlencoded::parse(form) {
        match key.as_ref() {
            "csrf" => submitted.csrf = value.into_owned(),
            "token" => submitted.token = Some(value.into_owned()),
            "id" if !value.is_empty()
                && value.len() <= MAX_ID_LEN
                && !submitted.ids.iter().any(|id| *id == value) =>
            {
                submitted.ids.push(value.into_owned());
            }
            _ => {}
        }
    }
    submitted
}

/// A change is refused unless it comes from this console's own page.
fn check(console: &Console, headers: &HeaderMap, csrf: &str) -> Result<(), ConsoleError> {
    let now = console.0.clock.now();
    if same_origin(headers) && console.0.guard.csrf_valid(headers, csrf, now) {
        Ok(())
    } else {
        Err(ConsoleError::Forbidden)
    }
}

/// The selection of a replay form, checked.
fn selection(
    console: &Console,
    headers: &HeaderMap,
    form: &[u8],
) -> Result<Vec<String>, ConsoleError> {
    let submitted = fields(form);
    check(console, headers, &submitted.csrf)?;
    if submitted.ids.is_empty() {
        return Err(ConsoleError::BadRequest(
            "select at least one delivery".to_owned(),
        ));
    }
    if submitted.ids.len() > MAX_SELECTED {
        return Err(ConsoleError::BadRequest(format!(
            "select at most {MAX_SELECTED} deliveries at once"
        )));
    }
    Ok(submitted.ids)
}

/// What replay will do to each selected delivery; changes nothing.
pub async fn confirm_replay(
    State(console): State<Console>,
    headers: HeaderMap,
    RawForm(form): RawForm,
) -> Result<Html<String>, ConsoleError> {
    let ids = selection(&console, &headers, &form)?;
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for id in &ids {
        let items = console
            .0
            .store
            .replay_preview(&ReplayTarget::DeliveryId(id.clone()))
            .await?;
        if items.is_empty() {
            missing.push(id.clone());
        }
        found.extend(items);
    }
    let will_replay = found.iter().filter(|i| i.effect.replays()).count();
    Ok(render(
        &console,
        &headers,
        Section::Dead,
        "Replay: what it will do",
        |csrf| {
            html! {
                p { "Nothing has happened yet. Replay puts each delivery back before the ordering gate; "
                    "handlers that have done it are not run again." }
                (items_table(&console, &found))
                (missing_list(&missing))
                @if will_replay > 0 {
                    form method="post" action="/ui/replay" {
                        input type="hidden" name="csrf" value=(csrf);
                        @for id in &ids { input type="hidden" name="id" value=(id); }
                        button.primary type="submit" { "Replay " (will_replay) " deliveries" }
                        " " a href="/ui/dead" { "Cancel" }
                    }
                } @else {
                    p { "There is nothing to replay. " a href="/ui/dead" { "Back to the dead letters" } }
                }
            }
        },
    ))
}

/// Replays the selected deliveries and says what was done to each.
pub async fn replay(
    State(console): State<Console>,
    headers: HeaderMap,
    RawForm(form): RawForm,
) -> Result<Html<String>, ConsoleError> {
    let ids = selection(&console, &headers, &form)?;
    let mut done = Vec::new();
    let mut missing = Vec::new();
    for id in &ids {
        let items = console
            .0
            .store
            .replay_each(&ReplayTarget::DeliveryId(id.clone()))
            .await?;
        if items.is_empty() {
            missing.push(id.clone());
        }
        done.extend(items);
    }
    let replayed = done.iter().filter(|i| i.effect.replays()).count();
    tracing::info!(replayed, selected = ids.len(), "replayed from the console");
    Ok(render(
        &console,
        &headers,
        Section::Dead,
        "Replay: done",
        |_| {
            html! {
                p { (replayed) " deliveries were put back in the queue." }
                (items_table(&console, &done))
                (missing_list(&missing))
                p { a href="/ui/dead" { "Back to the dead letters" } }
            }
        },
    ))
}

fn items_table(console: &Console, items: &[ReplayItem]) -> Markup {
    html! {
        table.replay {
            thead { tr { th { "delivery" } th.num { "seq" } th { "status" } th { "entity" } th { "replay" } th { "what it does" } } }
            tbody {
                @for item in items {
                    tr {
                        td { (delivery_link(&item.summary.delivery_id)) }
                        td.num { (item.summary.seq) }
                        td { (status_badge(item.summary.status)) }
                        td { (entity_link(item.summary.entity.as_deref())) }
                        td { span class={ "badge effect-" (effect_name(&item.effect)) } { (effect_name(&item.effect)) } }
                        td { (describe(item, &console.0.routes)) }
                    }
                }
            }
        }
    }
}

fn missing_list(missing: &[String]) -> Markup {
    html! {
        @if !missing.is_empty() {
            p.alert {
                "No longer kept (removed by retention meanwhile?): "
                @for (i, id) in missing.iter().enumerate() {
                    @if i > 0 { ", " }
                    span.mono { (cut(id, 60)) }
                }
            }
        }
    }
}

pub(super) fn login_page(console: &Console, headers: &HeaderMap, failed: bool) -> Html<String> {
    let now = console.0.clock.now();
    let csrf = console.0.guard.csrf_token(headers, now);
    let chrome = Chrome {
        section: Section::None,
        logout_csrf: None,
    };
    let content = html! {
        @if failed { p.error { "That is not the token." } }
        form.login method="post" action="/ui/login" {
            input type="hidden" name="csrf" value=(csrf);
            label { "Admin token (" span.mono { "[admin] token" } ") "
                input type="password" name="token" autocomplete="current-password" autofocus required;
            }
            button.primary type="submit" { "Log in" }
        }
    };
    Html(page("Log in", &chrome, content).into_string())
}

pub async fn login_form(State(console): State<Console>, headers: HeaderMap) -> Response {
    if !console.0.guard.token_required() {
        return Redirect::to("/ui/").into_response();
    }
    login_page(&console, &headers, false).into_response()
}

pub async fn login(
    State(console): State<Console>,
    headers: HeaderMap,
    RawForm(form): RawForm,
) -> Result<Response, ConsoleError> {
    let submitted = fields(&form);
    check(&console, &headers, &submitted.csrf)?;
    let guard = &console.0.guard;
    let given = submitted.token.unwrap_or_default();
    if !guard.token_required() || !guard.token_matches(given.as_bytes()) {
        tracing::warn!("console: a login with a wrong token");
        return Ok((
            StatusCode::UNAUTHORIZED,
            login_page(&console, &headers, true),
        )
            .into_response());
    }
    let session = guard.new_session(console.0.clock.now());
    Ok((
        [(header::SET_COOKIE, session_cookie(&session))],
        Redirect::to("/ui/"),
    )
        .into_response())
}

pub async fn logout(
    State(console): State<Console>,
    headers: HeaderMap,
    RawForm(form): RawForm,
) -> Result<Response, ConsoleError> {
    check(&console, &headers, &fields(&form).csrf)?;
    Ok((
        [(header::SET_COOKIE, expired_cookie())],
        Redirect::to("/ui/login"),
    )
        .into_response())
}
