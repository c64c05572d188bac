//! The console's HTML: the page around every view, and the pieces several pages share (status
//! badges, times, the chart). Everything is built with maud, which escapes every value it is
//! given; nothing from a client or a body is ever passed through unescaped.

use maud::{html, Markup, DOCTYPE};

use crate::delivery::{format_millis, Status, UnixMillis};
use crate::store::ReceivedBucket;

use super::tally::{self, Counts};

/// The sections of the navigation bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Overview,
    Deliveries,
    Dead,
    None,
}

/// What every page needs besides its content.
pub struct Chrome<'a> {
    pub section: Section,
    /// Set when a session is open: the page offers to log out.
    pub logout_csrf: Option<&'a str>,
}

/// The whole page: head, navigation, `title`, `content`.
pub fn page(title: &str, chrome: &Chrome<'_>, content: Markup) -> Markup {
    let link = |section: Section, href: &str, text: &str| {
        html! {
            a href=(href) class=[(chrome.section == section).then_some("active")] { (text) }
        }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · labelhook" }
                link rel="stylesheet" href="/ui/static/console.css";
            }
            body {
                header.top {
                    a.brand href="/ui/" { "labelhook" }
                    nav {
                        (link(Section::Overview, "/ui/", "Overview"))
                        (link(Section::Deliveries, "/ui/deliveries", "Deliveries"))
                        (link(Section::Dead, "/ui/dead", "Dead letters"))
                    }
                    @if let Some(csrf) = chrome.logout_csrf {
                        form.logout method="post" action="/ui/logout" {
                            input type="hidden" name="csrf" value=(csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (content)
                }
            }
        }
    }
}

/// A status as a coloured badge.
pub fn status_badge(status: Status) -> Markup {
    html! { span class={ "badge status-" (status.as_str()) } { (status.as_str()) } }
}

/// A time, with how long ago it was.
pub fn when(at: UnixMillis, now: UnixMillis) -> Markup {
    html! { time datetime=(format_millis(at)) title=(format_millis(at)) { (ago(at, now)) } }
}

/// "3 min ago".
pub fn ago(at: UnixMillis, now: UnixMillis) -> String {
    let seconds = (now - at).max(0) / 1000;
    match seconds {
        0..=59 => format!("{seconds} s ago"),
        60..=3599 => format!("{} min ago", seconds / 60),
        3600..=172_799 => format!("{} h ago", seconds / 3600),
        _ => format!("{} days ago", seconds / 86_400),
    }
}

/// A duration in seconds, short.
pub fn age(seconds: i64) -> String {
    match seconds.max(0) {
        s @ 0..=59 => format!("{s} s"),
        s @ 60..=3599 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// Text cut to `max` characters, with an ellipsis when it was longer.
pub fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// A link to an entity's history.
pub fn entity_link(entity: Option<&str>) -> Markup {
    match entity {
        Some(e) => html! { a href=(url("/ui/entity", &[("key", e)])) { (cut(e, 60)) } },
        None => html! { span.muted { "-" } },
    }
}

/// A link to one delivery (every stored delivery with its id).
pub fn delivery_link(delivery_id: &str) -> Markup {
    html! { a.mono href=(url("/ui/delivery", &[("id", delivery_id)])) { (cut(delivery_id, 40)) } }
}

/// `path?k=v&...`, each value percent-encoded.
pub fn url(path: &str, query: &[(&str, &str)]) -> String {
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for (k, v) in query {
        serializer.append_pair(k, v);
    }
    let query = serializer.finish();
    if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    }
}

/// Width and height of the overview's chart, in SVG units.
const CHART_WIDTH: u64 = 720;
const CHART_HEIGHT: u64 = 140;

/// One bar of the chart.
struct Bar {
    class: &'static str,
    x: u64,
    y: u64,
    width: u64,
    height: u64,
    label: String,
}

/// The last hour, bucket by bucket: deliveries stored (stacked by their status now) and
/// requests refused beside them, as bars drawn on the server (no script).
pub fn chart(buckets: &[ReceivedBucket], refused: &[Counts], bucket_ms: i64) -> Markup {
    let refused: Vec<u64> = refused
        .iter()
        .map(|c| tally::refusals(c).map(|(_, n)| n).sum())
        .collect();
    let refused_at = |i: usize| refused.get(i).copied().unwrap_or(0);
    let peak = buckets
        .iter()
        .enumerate()
        .map(|(i, b)| b.total().max(refused_at(i)))
        .max()
        .unwrap_or(0)
        .max(1);
    let slot = CHART_WIDTH / (buckets.len().max(1) as u64);
    let width = (slot.saturating_sub(6) / 2).max(1);
    // The bars stand on the axis and stop short of the label at the top.
    let plot = CHART_HEIGHT - 20;
    let scale = |n: u64| n * (plot - 16) / peak;
    let mut bars = Vec::new();
    for (i, bucket) in buckets.iter().enumerate() {
        let x = i as u64 * slot + 3;
        let mut top = plot;
        for (status, class) in [
            (Status::Delivered, "ok"),
            (Status::Pending, "pending"),
            (Status::Unrecognized, "unrecognized"),
            (Status::Stale, "stale"),
            (Status::Dead, "dead"),
        ] {
            let n = bucket.count(status);
            let height = scale(n);
            if height > 0 {
                top -= height;
                let label = format!("{n} {status}");
                bars.push(Bar {
                    class,
                    x,
                    y: top,
                    width,
                    height,
                    label,
                });
            }
        }
        let r = refused_at(i);
        if scale(r) > 0 {
            let label = format!("{r} refused");
            let (y, height) = (plot - scale(r), scale(r));
            bars.push(Bar {
                class: "refused",
                x: x + width,
                y,
                width,
                height,
                label,
            });
        }
    }
    html! {
        svg.chart viewBox={ "0 0 " (CHART_WIDTH) " " (CHART_HEIGHT) } role="img"
            aria-label="Deliveries stored and requests refused, per bucket" {
            line.axis x1="0" y1=(plot) x2=(CHART_WIDTH) y2=(plot) {}
            @for b in &bars {
                rect class={ "bar " (b.class) } x=(b.x) y=(b.y) width=(b.width) height=(b.height) {
                    title { (b.label) }
                }
            }
            @if let (Some(first), Some(last)) = (buckets.first(), buckets.last()) {
                text.tick x="0" y=(CHART_HEIGHT - 4) { (clock_time(first.start)) }
                text.tick.end x=(CHART_WIDTH) y=(CHART_HEIGHT - 4) {
                    (clock_time(last.start + bucket_ms)) " UTC"
                }
            }
            text.tick x="4" y="12" { "max " (peak) }
        }
    }
}

/// `HH:MM` of a time, UTC.
fn clock_time(at: UnixMillis) -> String {
    let full = format_millis(at);
    full.get(11..16).map_or(full.clone(), str::to_owned)
}

/// The colours of the chart, explained.
pub fn chart_legend() -> Markup {
    html! {
        p.legend {
            span.key.ok {} "delivered " span.key.pending {} "pending "
            span.key.unrecognized {} "unrecognized " span.key.stale {} "stale "
            span.key.dead {} "dead " span.key.refused {} "refused (not stored)"
        }
    }
}
