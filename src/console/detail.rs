//! The console's pages about one thing: a delivery (every copy stored under its id, with the
//! gate's reasons, its handlers, its attempts, its headers and a preview of its body), its
//! body whole (streamed from the store), and an entity's history.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{Html, IntoResponse, Response};
use futures_util::StreamExt;
use maud::{html, Markup};

use super::pages::render;
use super::views::{cut, delivery_link, entity_link, status_badge, url, when, Section};
use super::{Console, ConsoleError};
use crate::delivery::{format_millis, Payload, UnixMillis};
use crate::store::{DeliveryDetail, DeliverySummary, EntityEntry, EntityState, VerdictBasis};

/// The most of a body the delivery page shows.
const PREVIEW_MAX_BYTES: usize = 64 * 1024;
/// The most of one header value shown.
const HEADER_SHOWN_CHARS: usize = 512;
/// Attempts shown per delivery (the most recent).
const ATTEMPTS_SHOWN: usize = 200;
/// Deliveries of one entity shown.
const ENTITY_DELIVERIES: u32 = 500;
/// Headers never shown, whatever the store kept: signatures and credentials.
const SECRET_HEADER_PARTS: [&str; 5] = ["signature", "authorization", "cookie", "token", "secret"];

#[derive(Debug, serde::Deserialize)]
pub struct DeliveryParams {
    id: String,
}

/// A delivery's body as the page shows it.
enum Preview {
    Shown { text: String, cut: bool },
    Pruned,
    Unreadable(String),
}

pub async fn delivery(
    State(console): State<Console>,
    headers: HeaderMap,
    Query(params): Query<DeliveryParams>,
) -> Result<Html<String>, ConsoleError> {
    let store = &console.0.store;
    let details = store.show(&params.id).await?;
    if details.is_empty() {
        return Err(ConsoleError::NotFound(format!(
            "no delivery with id {:?} is kept",
            cut(&params.id, 80)
        )));
    }
    let mut shown = Vec::with_capacity(details.len());
    for detail in details {
        let basis = store.verdict_basis(detail.summary.seq).await?;
        let preview = preview(&detail).await;
        shown.push((detail, basis, preview));
    }
    let now = console.0.clock.now();
    let title = format!("Delivery {}", cut(&params.id, 40));
    let copies = shown.len();
    Ok(render(
        &console,
        &headers,
        Section::Deliveries,
        &title,
        |csrf| {
            html! {
                @if copies > 1 {
                    p.alert {
                        "This delivery id was stored " (copies) " times, each time with another body. "
                        "Each is shown below."
                    }
                }
                @for (detail, basis, preview) in &shown {
                    (one_delivery(detail, basis.as_ref(), preview, now))
                }
                form method="post" action="/ui/replay/confirm" {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="id" value=(params.id);
                    button type="submit" { "Review replay…" }
                }
            }
        },
    ))
}

/// What only some deliveries have to say: that a backfill brought it, that its id came before
/// with another body.
fn unusual_facts(s: &DeliverySummary) -> Markup {
    html! {
        @if !s.origin.is_webhook() {
            dt { "origin" } dd { span.badge.backfill { "backfill" } " rebuilt from Labelbox's export by " code { "labelhook labelbox backfill" } }
        }
        @if s.id_conflict {
            dt { "id conflict" } dd { "the same id came before with another body" }
        }
    }
}

/// One stored copy of a delivery, section by section.
fn one_delivery(
    d: &DeliveryDetail,
    basis: Option<&VerdictBasis>,
    preview: &Preview,
    now: UnixMillis,
) -> Markup {
    let s = &d.summary;
    html! {
        article.delivery id={ "seq-" (s.seq) } {
            h2 { "seq " (s.seq) " " (status_badge(s.status)) }
            (facts(d))
            h3 { "Gate" }
            (verdict(d, basis))
            h3 { "Handlers" }
            (handler_runs(d))
            h3 { "Attempts" }
            (attempts(d))
            h3 { "Headers" }
            table.headers {
                tbody {
                    @for (name, value) in &d.headers {
                        tr { th.mono { (name) } td.mono { (shown_header(name, value)) } }
                    }
                }
            }
            h3 { "Body (" (s.body_len) " bytes)" }
            (body_preview(d, preview))
            p.note { "As of " (format_millis(now)) " UTC." }
        }
    }
}

/// What the delivery is: its id, when and where it came, what it is about.
fn facts(d: &DeliveryDetail) -> Markup {
    let s = &d.summary;
    html! {
        dl.facts {
            dt { "delivery id" } dd.mono { (s.delivery_id) }
            dt { "received" } dd.mono { (s.received_at) }
            dt { "endpoint" } dd.mono { (s.endpoint) }
            dt { "topic" } dd.mono { (s.topic.as_deref().unwrap_or("-")) }
            dt { "entity" } dd { (entity_link(s.entity.as_deref())) }
            dt { "version" } dd.mono { (s.version.as_deref().unwrap_or("-")) }
            dt { "project" } dd.mono { (s.project_id.as_deref().unwrap_or("-")) }
            dt { "client address" } dd.mono { (d.client_ip) }
            dt { "request id" } dd.mono { (d.request_id.as_deref().unwrap_or("-")) }
            (unusual_facts(s))
        }
    }
}

/// Each handler the delivery was routed to, and where it stands.
fn handler_runs(d: &DeliveryDetail) -> Markup {
    html! {
        @if d.handlers.is_empty() {
            p.muted { "No route gave it to a handler." }
        } @else {
            table {
                thead { tr { th { "handler" } th { "state" } th.num { "attempts" } th { "next attempt" } th { "last error" } } }
                tbody {
                    @for h in &d.handlers {
                        tr {
                            td.mono { (h.handler) }
                            td { span class={ "badge run-" (h.state.as_str()) } { (h.state.as_str()) } }
                            td.num { (h.attempts) }
                            td.mono { (h.next_attempt_at.as_deref().unwrap_or("-")) }
                            td.error { (h.last_error.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
    }
}

/// The most recent [`ATTEMPTS_SHOWN`] attempts, oldest first.
fn attempts(d: &DeliveryDetail) -> Markup {
    let hidden = d.attempts.len().saturating_sub(ATTEMPTS_SHOWN);
    html! {
        @if d.attempts.is_empty() {
            p.muted { "None yet." }
        } @else {
            @if hidden > 0 { p.muted { (hidden) " earlier attempts not shown." } }
            table {
                thead { tr { th { "started" } th { "finished" } th { "handler" } th.num { "#" } th { "outcome" } th { "error" } } }
                tbody {
                    @for a in d.attempts.iter().skip(hidden) {
                        tr {
                            td.mono { (a.started_at) }
                            td.mono { (a.finished_at) }
                            td.mono { (a.handler) }
                            td.num { (a.attempt) }
                            td { span class={ "badge attempt-" (a.outcome.as_str()) } { (a.outcome.as_str()) } }
                            td.error { (a.error.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
    }
}

/// The start of the body, or why it cannot be shown, and the link to all of it.
fn body_preview(d: &DeliveryDetail, preview: &Preview) -> Markup {
    let s = &d.summary;
    let download = url(
        "/ui/delivery/body",
        &[("id", s.delivery_id.as_str()), ("seq", &s.seq.to_string())],
    );
    html! {
        @match preview {
            Preview::Pruned => p.muted { "Dropped by retention (store.retention.bodies)." },
            Preview::Unreadable(why) => p.error { "Could not be read: " (why) },
            Preview::Shown { text, cut } => {
                @if *cut { p.muted { "The first " (PREVIEW_MAX_BYTES / 1024) " KiB:" } }
                pre.body { (text) }
                p { a.download href=(download) download { "Download the whole body" } }
            }
        }
    }
}

/// The gate's verdict on a delivery, and why.
fn verdict(d: &DeliveryDetail, basis: Option<&VerdictBasis>) -> Markup {
    let held = basis.and_then(|b| b.held_against.as_ref());
    let entity_now = basis.and_then(|b| b.entity.as_ref());
    html! {
        p.verdict {
            @match (d.fresh, &d.summary.entity) {
                (_, _) if d.parse_error.is_some() => {
                    "Not parsed: " (d.parse_error.as_deref().unwrap_or_default())
                    ". Kept whole (unrecognized), for a later version to handle."
                }
                (None, _) => { "Not judged yet: waiting for the gate." }
                (Some(_), None) => { "Applied: an event with no entity (nothing to order it against)." }
                (Some(true), Some(_)) => {
                    "Applied (fresh): "
                    @match held {
                        Some(h) => { "newer than " (applied_text(h)) "." }
                        None => { "nothing of its entity had been applied before it." }
                    }
                }
                (Some(false), Some(_)) => {
                    "Stale, so withheld from routes that do not deliver stale events: "
                    @match held {
                        Some(h) => { "held against " (applied_text(h)) ", which outranks it." }
                        None => { "what outranked it is no longer kept (retention)." }
                    }
                }
            }
        }
        @if let Some(state) = entity_now { (entity_state(state)) }
    }
}

/// "version V (updated) of delivery X".
fn applied_text(e: &EntityEntry) -> Markup {
    html! {
        "version " span.mono { (e.summary.version.as_deref().unwrap_or("none")) }
        @if let Some(change) = e.change { " (" (change) ")" }
        " of delivery " (delivery_link(&e.summary.delivery_id))
        " (seq " (e.summary.seq) ")"
    }
}

fn entity_state(state: &EntityState) -> Markup {
    html! {
        p.small {
            "Its entity now: version " span.mono { (state.version.as_deref().unwrap_or("none")) }
            @if let Some(change) = state.change { " (" (change) ")" }
            @if state.busy { ", a delivery of it is being handled or waits for a retry" }
            "."
        }
    }
}

/// A header's value, unless it may carry a secret.
fn shown_header(name: &str, value: &str) -> String {
    let name = name.to_ascii_lowercase();
    if SECRET_HEADER_PARTS.iter().any(|part| name.contains(part)) {
        "[redacted]".to_owned()
    } else {
        cut(value, HEADER_SHOWN_CHARS)
    }
}

/// The first [`PREVIEW_MAX_BYTES`] of a body, as sent (not reformatted: what is shown is what
/// came, byte for byte, bar invalid UTF-8).
async fn preview(d: &DeliveryDetail) -> Preview {
    if d.body_pruned {
        return Preview::Pruned;
    }
    match read_prefix(&d.body, PREVIEW_MAX_BYTES).await {
        Err(e) => Preview::Unreadable(e.to_string()),
        Ok(bytes) => Preview::Shown {
            cut: d.body.len() > bytes.len() as u64,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        },
    }
}

async fn read_prefix(body: &Payload, max: usize) -> std::io::Result<Vec<u8>> {
    if let Some(bytes) = body.as_inline() {
        return Ok(bytes[..bytes.len().min(max)].to_vec());
    }
    let mut stream = body.stream().await?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let room = max - out.len();
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= max {
            break;
        }
    }
    Ok(out)
}

#[derive(Debug, serde::Deserialize)]
pub struct BodyParams {
    id: String,
    seq: i64,
}

/// The whole body, streamed from the store as it is read (a body can be a GiB).
pub async fn body(
    State(console): State<Console>,
    Query(params): Query<BodyParams>,
) -> Result<Response, ConsoleError> {
    let details = console.0.store.show(&params.id).await?;
    let Some(detail) = details.into_iter().find(|d| d.summary.seq == params.seq) else {
        return Err(ConsoleError::NotFound(
            "no such delivery is kept".to_owned(),
        ));
    };
    if detail.body_pruned {
        return Err(ConsoleError::NotFound(
            "its body was dropped by retention".to_owned(),
        ));
    }
    let stream = detail.body.stream().await?;
    // The file name is made of the sequence number only: nothing a sender chose reaches a header.
    let disposition = format!("attachment; filename=\"delivery-{}.body\"", params.seq);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
            (header::CONTENT_LENGTH, detail.body.len().to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

#[derive(Debug, serde::Deserialize)]
pub struct EntityParams {
    key: String,
}

pub async fn entity(
    State(console): State<Console>,
    headers: HeaderMap,
    Query(params): Query<EntityParams>,
) -> Result<Html<String>, ConsoleError> {
    let history = console
        .0
        .store
        .entity_history(&params.key, ENTITY_DELIVERIES)
        .await?;
    let now = console.0.clock.now();
    let title = format!("Entity {}", cut(&params.key, 60));
    Ok(render(
        &console,
        &headers,
        Section::Deliveries,
        &title,
        |_| {
            html! {
                @match &history.state {
                    Some(state) => {
                        p {
                            "Applied now: version " span.mono { (state.version.as_deref().unwrap_or("none")) }
                            @if let Some(change) = state.change { " (" (change) ")" }
                            ", judged " (when(state.updated_at, now)) "."
                            @if state.busy { " A delivery of it is being handled or waits for a retry." }
                        }
                    }
                    None => p.muted { "The gate has judged no delivery of this entity." }
                }
                p.note {
                    "Oldest version first. A delivery is applied when it is newer than what was "
                    "applied before it in the gate's order (the lane); at equal versions a delete "
                    "outranks an update, which outranks a create."
                }
                @if history.deliveries.is_empty() {
                    p.muted { "No delivery of it is kept." }
                } @else {
                    table.history {
                        thead { tr { th { "version" } th { "change" } th { "verdict" } th { "status" } th.num { "gate order" } th { "delivery" } th { "received (UTC)" } } }
                        tbody {
                            @for e in &history.deliveries {
                                tr class=[verdict_class(e)] {
                                    td.mono { (e.summary.version.as_deref().unwrap_or("none")) }
                                    td { (e.change.map(|c| c.as_str()).unwrap_or("-")) }
                                    td { (verdict_word(e)) }
                                    td { (status_badge(e.summary.status)) }
                                    td.num { (e.lane_pos.map(|p| p.to_string()).unwrap_or_else(|| "-".to_owned())) }
                                    td { (delivery_link(&e.summary.delivery_id)) }
                                    td.mono { (e.summary.received_at) }
                                }
                            }
                        }
                    }
                    @if history.truncated {
                        p.muted { "Only the " (ENTITY_DELIVERIES) " most recent deliveries are shown." }
                    }
                }
            }
        },
    ))
}

fn verdict_word(e: &EntityEntry) -> &'static str {
    match e.fresh {
        Some(true) => "applied",
        Some(false) => "stale",
        None => "not judged yet",
    }
}

fn verdict_class(e: &EntityEntry) -> Option<&'static str> {
    (e.fresh == Some(false)).then_some("stale-row")
}
