//! The settings of the HTTP side: `[server]` (listeners, limits, timeouts), `[network]` (who
//! may deliver, which proxies to believe), each `[[endpoint]]` and `[model_training]`, with
//! their defaults and the checks that need nothing but these keys.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::settings::{de, Problem, SecretSource};

/// Labelbox's published egress addresses (LABELBOX.md section 5), the default allowlist.
pub const LABELBOX_EGRESS: [&str; 4] = [
    "35.223.142.181/32",
    "34.135.127.45/32",
    "35.224.108.6/32",
    "34.10.80.254/32",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address of the webhook listener; port 0 picks a free port.
    #[serde(deserialize_with = "de::socket_addr")]
    pub listen: SocketAddr,
    /// Address of the console (`/ui/`), /metrics, /healthz and /readyz: localhost unless said
    /// otherwise. They are never served on `listen`.
    #[serde(deserialize_with = "de::socket_addr")]
    pub admin_listen: SocketAddr,
    /// Bodies above this size are refused with 413.
    pub max_body_bytes: u64,
    /// A client that has not sent its request headers by then is disconnected.
    #[serde(with = "de::duration")]
    pub header_timeout: Duration,
    /// The whole body must arrive within this, or the request gets 408.
    #[serde(with = "de::duration")]
    pub body_timeout: Duration,
    /// Writes waiting for the store writer; above this, new deliveries get 503.
    pub queue_capacity: usize,
    /// Bodies being written to blob files at once. Their signature is only known once they
    /// have arrived, so this bounds the disk an unauthenticated sender can take to
    /// `max_spilling_bodies * max_body_bytes`; further large bodies wait their turn (within
    /// `body_timeout`) with their bytes left in the socket.
    pub max_spilling_bodies: usize,
    /// Of `max_spilling_bodies`, the most one client address may hold at once, so that one
    /// sender cannot take every slot; its further large bodies wait their turn.
    pub max_spilling_bodies_per_client: usize,
    /// A body must arrive at least this fast (bytes per second, counting only the time spent
    /// waiting for the client), or the request gets 408 and gives up what it held (a spill
    /// slot, buffered bytes, the connection); 0 turns the rule off.
    pub min_body_bytes_per_second: u64,
    /// How far a body may fall behind `min_body_bytes_per_second`: the time it may stall at
    /// its start, and at most at any point later.
    #[serde(with = "de::duration")]
    pub body_rate_grace: Duration,
    /// Connections served at once on each listener; beyond it, new connections are answered
    /// 503 at once and closed.
    pub max_connections: usize,
    /// Body bytes held in memory by all requests in flight together; a request whose next
    /// bytes would go beyond it gets 503.
    pub max_buffered_bytes: u64,
    /// How long shutdown waits for in-flight requests before closing them.
    #[serde(with = "de::duration")]
    pub shutdown_timeout: Duration,
    /// Deliveries waiting for their handlers beyond which answers are held back (up to
    /// `backlog_max_delay`), so that a sender slows down to what the handlers get; 0 never.
    pub backlog_limit: u64,
    /// The longest an answer is held back, reached when the backlog is twice the limit.
    #[serde(with = "de::duration")]
    pub backlog_max_delay: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            max_body_bytes: 1 << 30,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(300),
            queue_capacity: 4096,
            max_spilling_bodies: 4,
            max_spilling_bodies_per_client: 2,
            min_body_bytes_per_second: super::body::DEFAULT_MIN_BODY_BYTES_PER_SECOND,
            body_rate_grace: super::body::DEFAULT_BODY_RATE_GRACE,
            max_connections: 1024,
            max_buffered_bytes: 64 * 1024 * 1024,
            shutdown_timeout: Duration::from_secs(30),
            backlog_limit: super::admission::DEFAULT_BACKLOG_LIMIT,
            backlog_max_delay: super::admission::DEFAULT_MAX_DELAY,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSettings {
    /// Client addresses allowed to deliver.
    #[serde(deserialize_with = "de::cidrs")]
    pub allowlist: Vec<IpNet>,
    /// Skip the allowlist entirely; must be said explicitly.
    pub allow_all: bool,
    /// Peers whose forwarding header is believed.
    #[serde(deserialize_with = "de::cidrs")]
    pub trusted_proxies: Vec<IpNet>,
    /// The one header the trusted proxies maintain: the other is ignored, since a proxy passes
    /// a header it does not maintain through unchanged, as the client wrote it.
    pub forwarded_header: ForwardedHeader,
}

/// Which forwarding header carries the client address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For`, what nginx, ingress-nginx, AWS and GCP load balancers append to.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded`.
    Forwarded,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        Self {
            allowlist: LABELBOX_EGRESS
                .iter()
                .filter_map(|cidr| cidr.parse().ok())
                .collect(),
            allow_all: false,
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::XForwardedFor,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSettings {
    /// Served at `POST /webhooks/{name}`.
    pub name: String,
    /// Every secret is tried, so a rotation can keep the old and the new one for a while.
    pub secrets: Vec<SecretSource>,
    /// Accept `X-Hub-Signature: sha1=...` when no `X-Hub-Signature-256` is sent.
    #[serde(default = "default_true")]
    pub accept_sha1: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelTrainingSettings {
    /// Base path: `GET {path}/models`, `POST {path}/model_run`.
    pub path: String,
    pub secrets: Vec<SecretSource>,
    /// Keys of the `/models` answer; Labelbox sends the chosen one back as `modelType`.
    #[serde(default)]
    pub model_types: Vec<String>,
    /// Source addresses allowed to call the model-training routes (Labelbox publishes none
    /// for them); empty means `network.allowlist`.
    #[serde(default, deserialize_with = "de::cidrs")]
    pub allowlist: Vec<IpNet>,
    /// Identical model-run requests (they carry no delivery id) within this window are one
    /// request; "0s" makes each a new training request.
    #[serde(default = "default_duplicate_window", with = "de::duration")]
    pub duplicate_window: Duration,
}

fn default_true() -> bool {
    true
}
fn default_duplicate_window() -> Duration {
    Duration::from_secs(600)
}

/// Adds `key: message` to `problems` when `zero`.
fn positive(problems: &mut Vec<Problem>, key: &str, zero: bool) {
    if zero {
        problems.push(Problem::new(key, "must be greater than 0"));
    }
}

impl ServerSettings {
    /// The checks of `[server]` on its own, added to `problems`.
    pub fn check(&self, problems: &mut Vec<Problem>) {
        positive(problems, "server.max_body_bytes", self.max_body_bytes == 0);
        positive(
            problems,
            "server.max_spilling_bodies",
            self.max_spilling_bodies == 0,
        );
        positive(
            problems,
            "server.max_spilling_bodies_per_client",
            self.max_spilling_bodies_per_client == 0,
        );
        positive(
            problems,
            "server.max_connections",
            self.max_connections == 0,
        );
        let (listen, admin) = (self.listen, self.admin_listen);
        let overlapping = listen.ip() == admin.ip()
            || listen.ip().is_unspecified()
            || admin.ip().is_unspecified();
        if listen.port() == admin.port() && listen.port() != 0 && overlapping {
            problems.push(Problem::new(
                "server.admin_listen",
                "must differ from server.listen: the console and /metrics are never served \
                 where webhooks come in",
            ));
        }
        positive(problems, "server.queue_capacity", self.queue_capacity == 0);
    }
}

impl NetworkSettings {
    /// The checks of `[network]` on its own, added to `problems`.
    pub fn check(&self, problems: &mut Vec<Problem>) {
        if self.allowlist.is_empty() && !self.allow_all {
            problems.push(Problem::new(
                "network.allowlist",
                "is empty, so every delivery would be refused; list addresses or set network.allow_all = true",
            ));
        }
    }
}

/// The checks of the `[[endpoint]]`s and `[model_training]`, added to `problems`.
pub fn check_receivers(
    endpoints: &[EndpointSettings],
    model_training: Option<&ModelTrainingSettings>,
    problems: &mut Vec<Problem>,
) {
    if endpoints.is_empty() && model_training.is_none() {
        problems.push(Problem::new(
            "endpoint",
            "no [[endpoint]] and no [model_training]: nothing would be received",
        ));
    }
    let mut names = BTreeSet::new();
    for (i, ep) in endpoints.iter().enumerate() {
        let valid = !ep.name.is_empty()
            && ep
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            problems.push(Problem::new(
                format!("endpoint[{i}].name"),
                "must be non-empty letters, digits, '-' or '_'",
            ));
        }
        if !names.insert(ep.name.as_str()) {
            problems.push(Problem::new(
                format!("endpoint[{i}].name"),
                "is used by another endpoint",
            ));
        }
        if ep.secrets.is_empty() {
            problems.push(Problem::new(
                format!("endpoint[{i}].secrets"),
                "needs at least one secret",
            ));
        }
    }
    if let Some(mt) = model_training {
        mt.check(problems);
    }
}

impl ModelTrainingSettings {
    fn check(&self, problems: &mut Vec<Problem>) {
        let mut problem =
            |message: &str| problems.push(Problem::new("model_training.path", message));
        let path = self.path.as_str();
        if !path.starts_with('/') || path.ends_with('/') || path.starts_with("/webhooks") {
            problem("must start with '/', not end with '/', and not be under /webhooks");
        }
        let plain = path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'));
        if !plain || path.contains("//") {
            problem("may only hold letters, digits, '/', '-', '_' and '.'");
        }
        if ["/healthz", "/readyz", "/metrics"].contains(&path) {
            problem("collides with a built-in route");
        }
        if self.secrets.is_empty() {
            problems.push(Problem::new(
                "model_training.secrets",
                "needs at least one secret",
            ));
        }
    }
}
