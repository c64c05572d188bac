//! The console's list pages: the overview, the deliveries (filtered, keyset-paged by sequence
//! number) and the dead letters (selected for replay).

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Html;
use maud::{html, Markup};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::tally::{self, ACCEPTED, DUPLICATE};
use super::views::{
    self, age, cut, delivery_link, entity_link, page, status_badge, url, when, Chrome, Section,
};
use super::{Console, ConsoleError};
use crate::delivery::{format_millis, Status, UnixMillis};
use crate::store::{DeliverySummary, HandlerActivity, ListQuery, Overview};

pub use super::detail::{body, delivery, entity};

/// The overview's window.
const HOUR_MS: i64 = 3_600_000;
/// The overview chart's bars.
const BUCKET_MS: i64 = 5 * 60 * 1000;
/// Deliveries per page.
const PAGE_SIZE: u32 = 50;
/// Longest error text shown in a table cell.
const ERROR_SHOWN_CHARS: usize = 160;

/// A page, with the log-out button when sessions are in use; `content` is given the CSRF token
/// for its forms.
pub(super) fn render(
    console: &Console,
    headers: &HeaderMap,
    section: Section,
    title: &str,
    content: impl FnOnce(&str) -> Markup,
) -> Html<String> {
    let now = console.0.clock.now();
    let csrf = console.0.guard.csrf_token(headers, now);
    let body = content(&csrf);
    let chrome = Chrome {
        section,
        logout_csrf: console.0.guard.token_required().then_some(csrf.as_str()),
    };
    Html(page(title, &chrome, body).into_string())
}

pub async fn overview(
    State(console): State<Console>,
    headers: HeaderMap,
) -> Result<Html<String>, ConsoleError> {
    let c = &console.0;
    let now = c.clock.now();
    let since = now - HOUR_MS;
    let (overview, activity, depth, oldest) = tokio::try_join!(
        c.store.overview(since, now, BUCKET_MS),
        c.store.handler_activity(since),
        c.store.queue_depth(),
        c.store.oldest_unfinished(),
    )?;
    let answered = c.tally.since(since);
    let starts: Vec<UnixMillis> = overview.buckets.iter().map(|b| b.start).collect();
    let refused_per_bucket = c.tally.per_bucket(&starts, BUCKET_MS);
    let queue = Queue {
        depth,
        oldest_age_seconds: oldest.map(|at| (now - at) / 1000),
    };
    let handlers = with_configured(activity, &c.handlers);
    let content = html! {
        (overview_cards(&overview, &answered, &queue))
        section {
            h2 { "The last hour" }
            (views::chart(&overview.buckets, &refused_per_bucket, BUCKET_MS))
            (views::chart_legend())
            p.note {
                "Stored deliveries are counted by the store (on every replica's behalf); "
                "refusals and duplicates by this process since it started, which is all it can "
                "know of requests it did not store."
            }
        }
        section.columns {
            div {
                h2 { "Refused, last hour" }
                (refused_table(&answered))
            }
            div {
                h2 { "Kept now, by status" }
                (kept_table(&overview))
            }
        }
        section {
            h2 { "Handlers" }
            (handler_table(&handlers, now))
        }
    };
    Ok(render(
        &console,
        &headers,
        Section::Overview,
        "Overview",
        |_| content,
    ))
}

/// The queue, as the overview's card shows it.
struct Queue {
    depth: u64,
    /// How long the oldest delivery with work left has waited; `None` when there is none.
    oldest_age_seconds: Option<i64>,
}

/// Deliveries kept now with `status`, all time.
fn kept(overview: &Overview, status: Status) -> u64 {
    overview
        .by_status
        .iter()
        .find(|(s, _)| *s == status)
        .map_or(0, |(_, n)| *n)
}

/// The overview's four cards: what was received (the answers this process gave), what was
/// stored, the queue, and the dead letters kept.
fn overview_cards(overview: &Overview, answered: &tally::Counts, queue: &Queue) -> Markup {
    let count = |outcome: &str| answered.get(outcome).copied().unwrap_or(0);
    let refused_total: u64 = tally::refusals(answered).map(|(_, n)| n).sum();
    let in_window =
        |status: Status| -> u64 { overview.buckets.iter().map(|b| b.count(status)).sum() };
    let stored: u64 = overview.buckets.iter().map(|b| b.total()).sum();
    let dead = kept(overview, Status::Dead);
    html! {
        section.cards {
            div.card {
                h2 { "Received, last hour" }
                p.big { (tally::total(answered)) }
                p.small {
                    (count(ACCEPTED)) " accepted · " (count(DUPLICATE)) " duplicate · "
                    (refused_total) " refused"
                }
            }
            div.card {
                h2 { "Stored, last hour" }
                p.big { (stored) }
                p.small {
                    a href=(url("/ui/deliveries", &[("status", "stale")])) { (in_window(Status::Stale)) " stale" }
                    " · "
                    a href="/ui/dead" { (in_window(Status::Dead)) " dead" }
                    " · " (in_window(Status::Unrecognized)) " unrecognized"
                }
            }
            div.card {
                h2 { "Queue" }
                p.big { (queue.depth) }
                p.small {
                    @match queue.oldest_age_seconds {
                        Some(seconds) => { "oldest waiting " (age(seconds)) }
                        None => { "nothing waiting" }
                    }
                }
            }
            div.card.alert[dead > 0] {
                h2 { "Dead letters" }
                p.big { a href="/ui/dead" { (dead) } }
                p.small { "kept now, all time" }
            }
        }
    }
}

/// Requests refused, by reason.
fn refused_table(answered: &tally::Counts) -> Markup {
    let refused: Vec<(&str, u64)> = tally::refusals(answered).collect();
    html! {
        @if refused.is_empty() {
            p.muted { "None." }
        } @else {
            table {
                thead { tr { th { "reason" } th.num { "requests" } } }
                tbody {
                    @for (reason, n) in &refused {
                        tr { td.mono { (reason) } td.num { (n) } }
                    }
                }
            }
        }
    }
}

/// Deliveries kept now, by status, each linked to its list.
fn kept_table(overview: &Overview) -> Markup {
    html! {
        table {
            tbody {
                @for status in Status::ALL {
                    tr {
                        td { a href=(url("/ui/deliveries", &[("status", status.as_str())])) { (status_badge(status)) } }
                        td.num { (kept(overview, status)) }
                    }
                }
            }
        }
    }
}

/// Every configured handler, whether or not it has run yet, then any other named in a run.
fn with_configured(
    mut activity: Vec<HandlerActivity>,
    configured: &[String],
) -> Vec<HandlerActivity> {
    let mut out = Vec::with_capacity(configured.len());
    for name in configured {
        match activity.iter().position(|a| &a.handler == name) {
            Some(i) => out.push(activity.swap_remove(i)),
            None => out.push(HandlerActivity {
                handler: name.clone(),
                ..HandlerActivity::default()
            }),
        }
    }
    activity.sort_by(|a, b| a.handler.cmp(&b.handler));
    out.extend(activity);
    out
}

fn handler_table(handlers: &[HandlerActivity], now: UnixMillis) -> Markup {
    html! {
        table.handlers {
            thead {
                tr {
                    th { "handler" } th { "last success" } th { "last failure" }
                    th.num { "failures, last hour" } th.num { "pending" } th.num { "dead" }
                    th { "last error" }
                }
            }
            tbody {
                @for h in handlers {
                    tr.failing[h.failures_since > 0 || h.dead > 0] {
                        td.mono { (h.handler) }
                        td { @match h.last_success_at { Some(at) => (when(at, now)), None => span.muted { "never" } } }
                        td { @match h.last_failure_at { Some(at) => (when(at, now)), None => span.muted { "never" } } }
                        td.num { (h.failures_since) }
                        td.num { (h.pending) }
                        td.num {
                            @if h.dead > 0 {
                                a href=(url("/ui/dead", &[("handler", h.handler.as_str())])) { (h.dead) }
                            } @else { "0" }
                        }
                        td.error { (h.last_error.as_deref().map(|e| cut(e, ERROR_SHOWN_CHARS)).unwrap_or_default()) }
                    }
                }
            }
        }
    }
}

/// The deliveries page's query string; every field optional, empty meaning absent.
#[derive(Debug, Default, serde::Deserialize)]
pub struct ListParams {
    status: Option<String>,
    topic: Option<String>,
    project: Option<String>,
    entity: Option<String>,
    handler: Option<String>,
    id: Option<String>,
    /// `YYYY-MM-DDTHH:MM` (UTC, as a `datetime-local` input sends it) or RFC 3339.
    from: Option<String>,
    until: Option<String>,
    /// The next page: deliveries below this sequence number.
    before: Option<String>,
}

impl ListParams {
    fn get(value: &Option<String>) -> Option<String> {
        value
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    }

    /// The store query, or what is wrong with the parameters.
    fn query(&self, limit: u32) -> Result<ListQuery, ConsoleError> {
        let status = match Self::get(&self.status) {
            Some(s) => Some(s.parse::<Status>().map_err(ConsoleError::BadRequest)?),
            None => None,
        };
        let before = match Self::get(&self.before) {
            Some(b) => Some(b.parse::<i64>().map_err(|_| {
                ConsoleError::BadRequest("before: expected a sequence number".into())
            })?),
            None => None,
        };
        Ok(ListQuery {
            status,
            topic: Self::get(&self.topic),
            project_id: Self::get(&self.project),
            entity: Self::get(&self.entity),
            handler: Self::get(&self.handler),
            delivery_id: Self::get(&self.id),
            received_from: parse_time("from", Self::get(&self.from))?,
            received_until: parse_time("until", Self::get(&self.until))?,
            before_seq: before,
            // One more than shown, to know whether there is a next page.
            limit: limit + 1,
        })
    }

    /// The same filters, for the next page's link.
    fn pairs(&self) -> Vec<(&'static str, String)> {
        [
            ("status", &self.status),
            ("topic", &self.topic),
            ("project", &self.project),
            ("entity", &self.entity),
            ("handler", &self.handler),
            ("id", &self.id),
            ("from", &self.from),
            ("until", &self.until),
        ]
        .into_iter()
        .filter_map(|(k, v)| Self::get(v).map(|v| (k, v)))
        .collect()
    }
}

/// A time from a filter: RFC 3339, or a `datetime-local` value (with or without seconds)
/// taken as UTC.
fn parse_time(key: &str, value: Option<String>) -> Result<Option<UnixMillis>, ConsoleError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let at = [value.clone(), format!("{value}Z"), format!("{value}:00Z")]
        .iter()
        .find_map(|v| OffsetDateTime::parse(v, &Rfc3339).ok())
        .ok_or_else(|| {
            ConsoleError::BadRequest(format!("{key}: expected a time like 2026-11-26T21:14"))
        })?;
    Ok(Some((at.unix_timestamp_nanos() / 1_000_000) as i64))
}

/// Reads one page; the rows and the next page's link, if there is one.
async fn page_of(
    console: &Console,
    params: &ListParams,
    query: ListQuery,
    path: &str,
) -> Result<(Vec<DeliverySummary>, Option<String>), ConsoleError> {
    let shown = query.limit.saturating_sub(1) as usize;
    let mut rows = console.0.store.list(&query).await?;
    let next = if rows.len() > shown {
        rows.truncate(shown);
        rows.last().map(|last| {
            let mut pairs = params.pairs();
            pairs.push(("before", last.seq.to_string()));
            let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            url(path, &pairs)
        })
    } else {
        None
    };
    Ok((rows, next))
}

pub async fn deliveries(
    State(console): State<Console>,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> Result<Html<String>, ConsoleError> {
    let query = params.query(PAGE_SIZE)?;
    let (rows, next) = page_of(&console, &params, query, "/ui/deliveries").await?;
    let handlers = console.0.handlers.clone();
    let value = |v: &Option<String>| ListParams::get(v).unwrap_or_default();
    let chosen_status = value(&params.status);
    let chosen_handler = value(&params.handler);
    let content = html! {
        form.filters method="get" action="/ui/deliveries" {
            label { "Status "
                select name="status" {
                    option value="" { "any" }
                    @for s in Status::ALL {
                        option value=(s.as_str()) selected[chosen_status == s.as_str()] { (s.as_str()) }
                    }
                }
            }
            label { "Topic " input type="text" name="topic" value=(value(&params.topic)) placeholder="LABEL_UPDATED"; }
            label { "Project " input type="text" name="project" value=(value(&params.project)); }
            label { "Entity " input type="text" name="entity" value=(value(&params.entity)) placeholder="label:..."; }
            label { "Handler "
                select name="handler" {
                    option value="" { "any" }
                    @for h in &handlers {
                        option value=(h) selected[&chosen_handler == h] { (h) }
                    }
                }
            }
            label { "Delivery id " input type="search" name="id" value=(value(&params.id)); }
            label { "From (UTC) " input type="datetime-local" name="from" value=(value(&params.from)); }
            label { "Until (UTC) " input type="datetime-local" name="until" value=(value(&params.until)); }
            button type="submit" { "Filter" }
            " " a href="/ui/deliveries" { "clear" }
        }
        (summary_table(&rows, None))
        (pager(next.as_deref(), params.before.is_some()))
    };
    Ok(render(
        &console,
        &headers,
        Section::Deliveries,
        "Deliveries",
        |_| content,
    ))
}

/// Newer pages are reached by going back (the browser's back button, or the first page).
fn pager(next: Option<&str>, deeper: bool) -> Markup {
    html! {
        p.pager {
            @if deeper { a href="/ui/deliveries" { "« newest" } " " }
            @if let Some(next) = next { a.next href=(next) { "older »" } }
        }
    }
}

/// Deliveries as a table; with `select`, a checkbox per row named `id`, in form `select`.
pub(super) fn summary_table(rows: &[DeliverySummary], select: Option<&str>) -> Markup {
    html! {
        @if rows.is_empty() {
            p.muted { "No delivery matches." }
        } @else {
            table.deliveries {
                thead {
                    tr {
                        @if select.is_some() { th { "replay" } }
                        th.num { "seq" } th { "received (UTC)" } th { "delivery id" } th { "topic" }
                        th { "status" } th { "entity" } th { "project" } th.num { "bytes" }
                    }
                }
                tbody {
                    @for r in rows {
                        tr {
                            @if let Some(form) = select {
                                td { input type="checkbox" name="id" value=(r.delivery_id) form=(form)
                                    aria-label={ "replay " (r.delivery_id) }; }
                            }
                            td.num { (r.seq) }
                            td.mono { (r.received_at) }
                            td {
                                (delivery_link(&r.delivery_id))
                                @if r.id_conflict { " " span.badge.conflict title="the same id came before with another body" { "same id, other body" } }
                                @if !r.origin.is_webhook() { " " span.badge.backfill title="rebuilt from Labelbox's export by `labelhook labelbox backfill`" { "backfill" } }
                            }
                            td.mono { (r.topic.as_deref().map(|t| cut(t, 40)).unwrap_or_else(|| "-".to_owned())) }
                            td { (status_badge(r.status)) }
                            td { (entity_link(r.entity.as_deref())) }
                            td.mono { (r.project_id.as_deref().map(|p| cut(p, 30)).unwrap_or_else(|| "-".to_owned())) }
                            td.num { (r.body_len) }
                        }
                    }
                }
            }
        }
    }
}

/// The dead letters page's query string.
#[derive(Debug, Default, serde::Deserialize)]
pub struct DeadParams {
    handler: Option<String>,
    before: Option<String>,
}

pub async fn dead_letters(
    State(console): State<Console>,
    headers: HeaderMap,
    Query(dead): Query<DeadParams>,
) -> Result<Html<String>, ConsoleError> {
    let params = ListParams {
        status: Some(Status::Dead.as_str().to_owned()),
        handler: dead.handler,
        before: dead.before,
        ..ListParams::default()
    };
    let query = params.query(PAGE_SIZE)?;
    let (rows, next) = page_of(&console, &params, query, "/ui/dead").await?;
    let handlers = console.0.handlers.clone();
    let chosen = ListParams::get(&params.handler).unwrap_or_default();
    let now = console.0.clock.now();
    let title = "Dead letters";
    Ok(render(&console, &headers, Section::Dead, title, |csrf| {
        html! {
            p {
                "Deliveries that a handler gave up on. Select some and review what replay will "
                "do to each before anything happens. A delivery id stored twice (same id, "
                "another body) is replayed as a whole: both are shown on the next page."
            }
            form.filters method="get" action="/ui/dead" {
                label { "Handler "
                    select name="handler" {
                        option value="" { "any" }
                        @for h in &handlers {
                            option value=(h) selected[&chosen == h] { (h) }
                        }
                    }
                }
                button type="submit" { "Filter" }
            }
            form id="replay" method="post" action="/ui/replay/confirm" {
                input type="hidden" name="csrf" value=(csrf);
            }
            (summary_table(&rows, Some("replay")))
            @if !rows.is_empty() {
                p { button type="submit" form="replay" { "Review replay of the selected…" } }
            }
            (pager(next.as_deref(), params.before.is_some()))
            p.note { "As of " (format_millis(now)) " UTC." }
        }
    }))
}
