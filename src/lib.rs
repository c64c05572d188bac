//! labelhook: receives Labelbox webhooks, checks they come from Labelbox, stores them durably
//! before answering, and hands typed events to handlers in per-entity order.
//!
//! One delivery's way, module by module: `server` (listeners, timeouts, the request layers)
//! → `ingress` (client IP, allowlist, streamed body, HMAC → the proof a `VerifiedDelivery`
//! needs) → `store` (durable commit, then the 2xx) → `dispatch` (claim, [`events`] parse,
//! [`ordering`] gate, route) → [`handlers`]. `delivery` sits below ingress and store and says
//! what a delivery is. `labelbox` is the client of Labelbox's API (webhooks, and the backfill
//! that stores what an export says through the same gate); `bench` (`labelhook bench`) runs
//! the whole service in process under a load of its own.
//!
//! Beside that way: `console` serves the operations pages on the admin listener; it reads
//! deliveries through the store's inspection trait, replays through the same store call and
//! the same words (`console::replay`) as `labelhook events replay`, and takes the counts of
//! requests the store never saw (refusals, duplicates) from `telemetry`. `telemetry`
//! (logs, the request span, metrics) is at the floor: every module may use it and it uses none
//! of ours. `known_series` publishes the metric series known at start. Each module owns its
//! settings, their defaults and checks, in the words of `settings` (the floor below them);
//! [`config`] composes, loads and reports them. No module on the way of a delivery imports
//! `config`; those that read the configuration as a whole sit above it with the commands
//! (`cli`, `bench`, `known_series`), and nothing else in the library depends on `cli`.
//!
//! The public face is what a program embedding labelhook needs: build and run the
//! [`Application`] from a [`Config`], plug in a [`Handler`] (its [`HandlerEvent`] carries the
//! [`Payload`]; [`Registry`] holds the handlers) and match on the typed [`Event`] it is given
//! ([`events`], with the versions of [`ordering`]). Everything else is `pub(crate)`. What lives
//! outside the library and needs the insides reaches them through `#[doc(hidden)]` paths that
//! promise nothing to embedders: the binary through `Cli` and `run_command_line`, the store's
//! conformance suite (`tests/store`), the fuzz targets and the benches through `test_support`
//! and `fuzzing`.

mod bench;
mod cli;
pub mod config;
mod console;
mod delivery;
mod dispatch;
pub mod events;
pub mod handlers;
mod ingress;
mod known_series;
mod labelbox;
pub mod ordering;
mod server;
mod settings;
mod store;
mod telemetry;

/// What the fuzz targets under `fuzz/` drive that is not otherwise public. Not part of the
/// public face: it exists so that the targets exercise the very functions a request meets,
/// without opening the modules they live in.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::ingress::claimed_signature;
    pub use crate::ingress::client_ip::resolve as resolve_client_ip;
}

/// The insides that the tests outside the library, the fuzz targets and the benches work
/// with: the store's traits and back-ends (one conformance suite holds both to the same
/// rules), what a delivery is, and the backfill's conversion of an export row. Not part of the
/// public face, and not a promise: it changes with the code.
#[doc(hidden)]
pub mod test_support {
    pub mod store {
        pub use crate::store::*;
    }
    pub mod delivery {
        pub use crate::delivery::*;
    }
    pub mod labelbox {
        pub use crate::labelbox::*;
    }
}

/// The command line of the `labelhook` binary (`src/main.rs`); not for embedders.
#[doc(hidden)]
pub use cli::{run as run_command_line, Cli};

pub use config::Config;
pub use delivery::Payload;
pub use events::Event;
pub use handlers::{Handler, HandlerError, HandlerEvent, Registry};
pub use server::shutdown_signal;
pub use store::StoreError;
pub use telemetry::init_logging;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::delivery::{Clock, SystemClock};
use crate::ingress::IngressState;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Handler(#[from] handlers::BuildError),
    #[error(transparent)]
    Console(#[from] console::GuardError),
}

/// A built service: listeners bound (so the real ports are known), store opened.
pub struct Application {
    config: Config,
    clock: Arc<dyn Clock>,
    store: Arc<dyn Store>,
    listener: TcpListener,
    admin_listener: TcpListener,
    handlers: handlers::Registry,
    console: console::Console,
    tally: Arc<console::Tally>,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartError> {
        // Installed before the first request so that no count is lost.
        telemetry::metrics_handle();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let store = store::open_for_serving(
            &config.settings.store,
            config.secrets.store_password(),
            config.settings.server.queue_capacity,
            clock.clone(),
        )
        .await?;
        let handlers = handlers::Registry::build_all(
            &config.settings.handler,
            &config.secrets,
            &config.settings.secret_env_vars(),
        )?;
        let server = &config.settings.server;
        let listener = bind(server.listen).await?;
        let admin_listener = bind(server.admin_listen).await?;
        if !server.admin_listen.ip().is_loopback() && config.secrets.admin_token().is_none() {
            tracing::warn!(
                admin_listen = %server.admin_listen,
                "the console and /metrics answer anyone who reaches server.admin_listen: \
                 set [admin] token, or keep the port private"
            );
        }
        let tally = Arc::new(console::Tally::of_this_process());
        let console = console::Console::new(
            &config.settings.route,
            &config.settings.handler,
            config.secrets.admin_token(),
            store.clone(),
            clock.clone(),
            tally.clone(),
        )?;
        Ok(Self {
            config,
            clock,
            store,
            listener,
            admin_listener,
            handlers,
            console,
            tally,
        })
    }

    /// The address deliveries are served on (the real port when the config said 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.config.settings.server.listen)
    }

    /// The admin listener's address: the console, /metrics, /healthz, /readyz.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .unwrap_or(self.config.settings.server.admin_listen)
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The handlers routes can name: the configured ones, plus any registered here before
    /// `run_until_stopped` (a Rust program embedding labelhook plugs its own in this way).
    pub fn handlers_mut(&mut self) -> &mut handlers::Registry {
        &mut self.handlers
    }

    /// Serves until `shutdown` resolves, then stops accepting, finishes in-flight requests and
    /// closes the store after its last commit.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) {
        known_series::publish(&self.config.settings, self.handlers.names());
        let server_settings = &self.config.settings.server;
        let admission = Arc::new(ingress::admission::Admission::new(
            server_settings.backlog_limit,
            server_settings.backlog_max_delay,
        ));
        let stop_background = CancellationToken::new();
        let background = self.spawn_background(&admission, &stop_background);
        let state = IngressState::new(
            receiving(&self.config),
            self.store.clone(),
            self.clock.clone(),
            admission,
        );
        let Application {
            config,
            clock,
            store,
            listener,
            admin_listener,
            handlers,
            console,
            ..
        } = self;
        let stop_dispatch = CancellationToken::new();
        let dispatching = spawn_dispatcher(&config, store.clone(), clock, handlers, &stop_dispatch);
        let stop = CancellationToken::new();
        let mut servers = spawn_servers(&config, [listener, admin_listener], state, console, &stop);

        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing open requests");
        stop.cancel();
        while servers.join_next().await.is_some() {}
        // Every accepted delivery is stored; now let running handlers finish.
        stop_dispatch.cancel();
        if let Some(dispatching) = dispatching {
            let waited = config.settings.server.shutdown_timeout;
            if tokio::time::timeout(waited, dispatching).await.is_err() {
                tracing::warn!("handlers still running at shutdown; they run again later");
            }
        }
        stop_background.cancel();
        for task in background {
            let _ = task.await;
        }
        store.close().await;
        tracing::info!("stopped");
    }

    /// The tasks that run beside the listeners until `stop`: the backlog watch (which holds
    /// answers back while handlers are far behind), the pruner, the readiness probe (so that
    /// `labelhook_store_ready` stays current whether or not anything polls /readyz), and the
    /// console's sampling of refusals over time (see `console::tally`).
    fn spawn_background(
        &self,
        admission: &Arc<ingress::admission::Admission>,
        stop: &CancellationToken,
    ) -> [JoinHandle<()>; 4] {
        [
            tokio::spawn(ingress::admission::watch_backlog(
                self.store.clone(),
                admission.clone(),
                stop.clone(),
            )),
            tokio::spawn(store::retention::run_pruner(
                self.store.clone(),
                self.config.settings.store.retention.clone(),
                self.clock.clone(),
                stop.clone(),
            )),
            tokio::spawn(server::watch_readiness(self.store.clone(), stop.clone())),
            tokio::spawn(console::tally::sample_until_stopped(
                self.tally.clone(),
                self.clock.clone(),
                stop.clone(),
            )),
        ]
    }
}

/// What the delivery routes are built from, out of the whole configuration.
pub(crate) fn receiving(config: &Config) -> ingress::Receiving<'_> {
    let s = &config.settings;
    ingress::Receiving {
        server: &s.server,
        network: &s.network,
        endpoints: &s.endpoint,
        model_training: s.model_training.as_ref(),
        inline_body_max_bytes: s.store.inline_body_max_bytes,
        secrets: &config.secrets,
    }
}

/// The dispatcher, running until `stop`; none when `dispatch.enabled` is false.
fn spawn_dispatcher(
    config: &Config,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    handlers: handlers::Registry,
    stop: &CancellationToken,
) -> Option<JoinHandle<()>> {
    if !config.settings.dispatch.enabled {
        tracing::info!("dispatch.enabled = false: receiving only");
        return None;
    }
    let s = &config.settings;
    let dispatcher =
        dispatch::Dispatcher::new(&s.dispatch, &s.handler, &s.route, store, clock, handlers);
    Some(tokio::spawn(dispatcher.run(stop.clone())))
}

/// The delivery routes on the first listener and the admin routes on the second, each served
/// until `stop`.
fn spawn_servers(
    config: &Config,
    [listener, admin_listener]: [TcpListener; 2],
    state: IngressState,
    console: console::Console,
    stop: &CancellationToken,
) -> JoinSet<()> {
    let settings = &config.settings;
    let limits = server::ServeLimits {
        header_timeout: settings.server.header_timeout,
        shutdown_timeout: settings.server.shutdown_timeout,
        max_connections: settings.server.max_connections,
    };
    let model_path = settings.model_training.as_ref().map(|m| m.path.as_str());
    let mut servers = JoinSet::new();
    servers.spawn(server::serve(
        listener,
        server::app(state.clone(), model_path),
        limits,
        stop.clone(),
    ));
    servers.spawn(server::serve(
        admin_listener,
        server::admin_app(state, console),
        limits,
        stop.clone(),
    ));
    servers
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}
