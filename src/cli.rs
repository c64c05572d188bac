//! The command line: `serve` and the tools around it (`check-config`, `sign`, `send`, `events`,
//! `labelbox`, `healthcheck`). Every command takes `--config` and talks to the store the config names, so
//! the tools work while the server runs.
//!
//! Rules of thumb: every option has a help text (a test walks them all); every failure is
//! printed as `error: ...` lines on stderr with its cause, and a file that cannot be read is
//! named.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgGroup, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};

use crate::config::{
    Config, ConfigError, ServerSettings, Settings, StoreSettings, DEFAULT_CONFIG_PATH,
};
use crate::delivery::signature::{sign, sign_reader, Algorithm};
use crate::delivery::{Status, SystemClock};
use crate::store::{redact_url, Backend, ListQuery, ReplayEffect, ReplayTarget, StoreError};
use crate::{server, telemetry, Application, StartError};

/// The secret `sign` and `send` use when no option names one.
const DEFAULT_SECRET_ENV: &str = "LABELBOX_WEBHOOK_SECRET";
/// Bodies up to this size are printed by `events show`.
const SHOW_BODY_MAX_BYTES: u64 = 64 * 1024;
const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(
    name = "labelhook",
    version,
    about = "Receives Labelbox webhooks and never loses one"
)]
pub struct Cli {
    /// Configuration file. `sign` and `send` read it only when it is given on the command
    /// line (then they sign with the secret of its endpoint).
    #[arg(long, global = true, env = "LABELHOOK_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Whether `--config` was given on the command line (rather than by LABELHOOK_CONFIG or
    /// the default).
    #[arg(skip)]
    pub config_on_command_line: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the process's arguments (exiting with clap's message on a mistake), noting
    /// whether `--config` was given on the command line.
    pub fn parse_args() -> Cli {
        Self::parse_from_args(std::env::args_os())
    }

    /// [`Cli::parse_args`] from given arguments.
    pub fn parse_from_args<I, T>(args: I) -> Cli
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Cli::command().get_matches_from(args);
        let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        let mut level = Some(&matches);
        while let Some(m) = level {
            if m.value_source("config") == Some(ValueSource::CommandLine) {
                cli.config_on_command_line = true;
            }
            level = m.subcommand().map(|(_, sub)| sub);
        }
        cli
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve,
    /// Load and validate the configuration; exit 1 on any problem.
    CheckConfig,
    /// Print the signature header value Labelbox would send for a body.
    Sign(SignArgs),
    /// Send a signed delivery exactly as Labelbox would.
    Send(SendArgs),
    /// Inspect and replay stored deliveries.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Measure this machine and store: signed deliveries over loopback through the real
    /// service, durable answers and all, to a handler that does nothing.
    Bench(crate::bench::BenchArgs),
    /// Labelbox's side, through its API: the webhooks, and a backfill after an outage.
    #[command(subcommand)]
    Labelbox(LabelboxCommand),
    /// Exit 0 when /healthz (or, with --ready, /readyz) answers 200: for images without curl.
    Healthcheck {
        /// Base URL, or a full /healthz or /readyz URL [default: the configured admin
        /// listener, else the main one, on this host].
        #[arg(long)]
        url: Option<String>,
        /// Probe /readyz (the store is reachable and writable) instead of /healthz (the
        /// process is up).
        #[arg(long)]
        ready: bool,
    },
}

#[derive(Debug, Args)]
pub struct SecretArgs {
    /// Environment variable holding the secret [default: LABELBOX_WEBHOOK_SECRET].
    #[arg(long, conflicts_with = "secret_file")]
    pub secret_env: Option<String>,
    /// File holding the secret (a trailing newline is ignored).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// With --config on the command line: use the first secret of this [[endpoint]]
    /// [default: the first endpoint].
    #[arg(long, conflicts_with_all = ["secret_env", "secret_file"])]
    pub endpoint: Option<String>,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    #[command(flatten)]
    pub secret: SecretArgs,
    /// HMAC-SHA256 (`sha256=...`) instead of HMAC-SHA1.
    #[arg(long)]
    pub sha256: bool,
    /// The body; `-` or nothing reads standard input.
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Where to deliver, e.g. http://127.0.0.1:8080/webhooks/labelbox.
    #[arg(long)]
    pub url: String,
    /// The X-Labelbox-Event header, e.g. LABEL_UPDATED.
    #[arg(long)]
    pub topic: String,
    /// The X-Labelbox-Id header [default: a new random id].
    #[arg(long)]
    pub id: Option<String>,
    #[command(flatten)]
    pub secret: SecretArgs,
    /// The JSON body; `-` reads standard input.
    pub file: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Recent deliveries, newest first.
    List {
        /// Only deliveries with this status: pending, delivered, stale, dead or
        /// unrecognized.
        #[arg(long)]
        status: Option<Status>,
        /// Only deliveries with this topic (X-Labelbox-Event), e.g. LABEL_UPDATED.
        #[arg(long)]
        topic: Option<String>,
        /// At most this many deliveries.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One delivery: headers kept, body, per-handler attempts and errors.
    Show {
        /// The delivery id (X-Labelbox-Id, or the body's SHA-256 when it had none).
        id: String,
    },
    /// Put deliveries back in the queue: one by id, or all with a status.
    #[command(group(ArgGroup::new("target").required(true).args(["id", "status"])))]
    Replay {
        /// The delivery id to replay.
        id: Option<String>,
        /// Replay every delivery with this status, e.g. dead (handlers that already
        /// succeeded are not run again).
        #[arg(long)]
        status: Option<Status>,
    },
    /// Delete what `[store.retention]` no longer keeps (finished deliveries past their time,
    /// bodies past theirs, bodies over the budget); never a delivery with work left.
    Prune {
        /// Only say what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// One JSON object instead of lines of text.
        #[arg(long)]
        json: bool,
    },
}

// ---- labelhook labelbox ... -------------------------------------------------------------------

/// Exit code of a `labelbox` command that found nothing to do (0: done; 1: failed).
pub const EXIT_NOTHING_TO_DO: u8 = 3;

#[derive(Debug, Subcommand)]
pub enum LabelboxCommand {
    /// Labelbox's webhooks, held against the [[labelbox.webhook]] entries.
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// Store what the webhooks would have sent since a time, from Labelbox's export; handlers
    /// get only what is newer than what they have. Exit 3 when nothing was missed.
    Backfill(BackfillArgs),
}

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Every webhook of the organization and of the configured projects: status, scope,
    /// whether it points at labelhook and whether the configuration wants it.
    List,
    /// Make Labelbox match the configuration: the plan first, then create, update, and set
    /// INACTIVE what the configuration no longer wants (only webhooks that point at
    /// labelhook). Exit 3 when nothing is to be done.
    Apply {
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("start").required(true).args(["since", "since_last_seen"])))]
pub struct BackfillArgs {
    /// The project to recover.
    #[arg(long)]
    pub project: String,
    /// From when: 2024-05-01T12:00:00Z, `2024-05-01 12:00:00` (UTC), 2024-05-01, or a
    /// duration before now such as 6h.
    #[arg(long)]
    pub since: Option<crate::labelbox::Since>,
    /// From the newest delivery of the project received by webhook, less
    /// labelbox.since_last_seen_margin.
    #[arg(long)]
    pub since_last_seen: bool,
    /// Store the deliveries under this [[endpoint]] [default: the one the project's
    /// [[labelbox.webhook]] names, else the first].
    #[arg(long)]
    pub endpoint: Option<String>,
}

/// `labelhook labelbox ...`: Labelbox's API with `labelbox.api_key`. Reads only the secrets it
/// needs (the key, the endpoints' secrets for webhooks, the store's password for a backfill).
async fn labelbox(
    path: &Path,
    env: &HashMap<String, String>,
    command: LabelboxCommand,
) -> Result<ExitCode, CliError> {
    use crate::labelbox::{self, Outcome, Remarks};
    let settings = Settings::load(path, env, true)?;
    let key = settings.labelbox_api_key(env)?;
    let remarks = std::sync::Arc::new(Remarks::stderr());
    let configured = labelbox::Configured {
        labelbox: settings.labelbox.clone().unwrap_or_default(),
        endpoints: settings.endpoint.iter().map(|e| e.name.clone()).collect(),
    };
    let api = labelbox::api(&configured, key, remarks.clone())?;
    let mut out = std::io::stdout();
    let outcome = match command {
        LabelboxCommand::Webhooks(command) => {
            let secrets = settings.endpoint_secrets(env)?;
            match command {
                WebhooksCommand::List => {
                    labelbox::list_webhooks(&configured, &secrets, &api, &mut out).await?
                }
                WebhooksCommand::Apply { dry_run } => {
                    labelbox::apply_webhooks(&configured, &secrets, &api, &mut out, dry_run).await?
                }
            }
        }
        LabelboxCommand::Backfill(args) => {
            let store = open_store(&settings, env).await?;
            let request = labelbox::BackfillRequest {
                project: args.project,
                since: args.since.unwrap_or(labelbox::Since::LastSeen),
                endpoint: args.endpoint,
            };
            labelbox::backfill(
                &configured,
                &api,
                store.as_ref(),
                &request,
                remarks,
                &mut out,
            )
            .await?
        }
    };
    Ok(match outcome {
        Outcome::Done => ExitCode::SUCCESS,
        Outcome::NothingToDo => ExitCode::from(EXIT_NOTHING_TO_DO),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Secret(String),
    #[error("cannot read {}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Labelbox(#[from] crate::labelbox::LabelboxError),
}

/// Runs a command; what `main` returns.
pub async fn run(cli: Cli) -> ExitCode {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

/// Prints an error and its causes, each line as `error: ...`.
pub fn report(error: &dyn std::error::Error) {
    for line in with_causes(error).lines() {
        eprintln!("error: {line}");
    }
}

/// An error's message followed by those of its sources that it does not already contain
/// (reqwest's "error sending request" says why only in its sources).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The innermost cause: "Connection refused (os error 111)" rather than reqwest's "error
/// sending request for url (...)".
fn root_cause(error: &dyn std::error::Error) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

async fn dispatch(cli: Cli) -> Result<ExitCode, CliError> {
    let env: HashMap<String, String> = std::env::vars().collect();
    // `sign` and `send` read no configuration unless told to on the command line.
    let given_config = cli.config_on_command_line.then_some(cli.config.as_path());
    match cli.command {
        Command::Serve => serve(&cli.config, &env).await,
        Command::CheckConfig => check_config(&cli.config, &env),
        Command::Sign(args) => {
            let secret = secret_for(&args.secret, given_config, &env)?;
            let algorithm = if args.sha256 {
                Algorithm::Sha256
            } else {
                Algorithm::Sha1
            };
            let key = secret.expose_secret().as_bytes();
            // Streamed: a body of hundreds of MB is signed without reading it into memory.
            let signature = match args.file.as_deref() {
                None => sign_reader(key, std::io::stdin().lock(), algorithm)?,
                Some(p) if p == Path::new("-") => {
                    sign_reader(key, std::io::stdin().lock(), algorithm)?
                }
                Some(p) => {
                    let file = std::fs::File::open(p).map_err(|source| CliError::File {
                        path: p.to_owned(),
                        source,
                    })?;
                    sign_reader(key, file, algorithm).map_err(|source| CliError::File {
                        path: p.to_owned(),
                        source,
                    })?
                }
            };
            println!("{signature}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Send(args) => {
            let secret = secret_for(&args.secret, given_config, &env)?;
            send(args, &secret).await
        }
        Command::Events(command) => events(&cli.config, &env, command).await,
        Command::Labelbox(command) => labelbox(&cli.config, &env, command).await,
        Command::Healthcheck { url, ready } => healthcheck(&cli.config, &env, url, ready).await,
        Command::Bench(args) => crate::bench::run(args)
            .await
            .map_err(|e| CliError::Failed(with_causes(&e))),
    }
}

async fn serve(path: &Path, env: &HashMap<String, String>) -> Result<ExitCode, CliError> {
    let config = Config::load(path, env, true)?;
    telemetry::init_logging(&config.settings.log);
    log_environment_overrides(path, &config.settings);
    for unused in crate::config::unused_variables(env, &config.settings) {
        tracing::warn!(variable = %unused.variable, "{unused}");
    }
    check_store_directory(&config.settings.store);
    let app = Application::build(config).await?;
    // Scripts and tests read these lines to learn the real ports.
    println!("listening on {}", server::display_addr(app.local_addr()));
    println!(
        "admin listening on {}",
        server::display_addr(app.admin_addr())
    );
    std::io::stdout().flush()?;
    tracing::info!(addr = %app.local_addr(), "labelhook started");
    app.run_until_stopped(server::shutdown_signal()).await;
    Ok(ExitCode::SUCCESS)
}

/// Says which keys the environment set, and which of them override the file: a value in the
/// file that an image's or a platform's variable replaces must not go unnoticed.
fn log_environment_overrides(path: &Path, settings: &Settings) {
    for o in &settings.from_environment {
        if o.overrides_file {
            tracing::warn!(
                key = %o.key,
                variable = %o.variable,
                file = %path.display(),
                "the environment overrides this key of the config file"
            );
        } else {
            tracing::info!(key = %o.key, variable = %o.variable, "key set by the environment");
        }
    }
}

/// With SQLite, the store's directory must be writable by this process. Otherwise the
/// server runs but answers every delivery 503 (and /readyz 503): say so at start, as an
/// error, with what to do. The usual cause is a bind mount owned by root over the image's
/// /data, which belongs to the image's user.
fn check_store_directory(store: &StoreSettings) {
    let Ok(Backend::Sqlite(database)) = Backend::from_url(&store.url) else {
        return;
    };
    let Err((dir, error)) = probe_writable(&database) else {
        return;
    };
    let uid = current_uid();
    let who = uid.map_or_else(|| "this process's user".to_owned(), |u| format!("uid {u}"));
    let owner = uid.map_or_else(|| "<uid>".to_owned(), |u| format!("{u}:{u}"));
    tracing::error!(
        directory = %dir.display(),
        error = %error,
        "the SQLite store's directory {} is not writable by {who}: every delivery will be \
         answered 503 and /readyz will fail until it is. Make it writable by that user: for a \
         bind mount, `chown -R {owner} <host directory>` (Kubernetes: fsGroup); or use a named \
         volume (`-v labelhook-data:/data`), which Docker creates owned by the image's user",
        dir.display()
    );
}

/// Tries to create a file where the database lives (or in the nearest directory that exists,
/// since the store creates the missing ones), and to open the database for writing.
fn probe_writable(database: &Path) -> Result<(), (PathBuf, std::io::Error)> {
    let mut dir = database
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    while !dir.exists() {
        dir = dir
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
    }
    let probe = dir.join(format!(".labelhook-write-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
        }
        Err(e) => return Err((dir.to_owned(), e)),
    }
    if database.exists() {
        if let Err(e) = std::fs::OpenOptions::new().write(true).open(database) {
            return Err((database.to_owned(), e));
        }
    }
    Ok(())
}

/// The real user id, from /proc (Linux); `None` elsewhere.
fn current_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().next()?.parse().ok()
}

fn check_config(path: &Path, env: &HashMap<String, String>) -> Result<ExitCode, CliError> {
    // A variable that sets nothing is said whether or not the file is valid; the settings
    // that could be read tell which variables their secret sources read.
    if let Ok((settings, _)) = Settings::load_lenient(path, env, true) {
        for unused in crate::config::unused_variables(env, &settings) {
            eprintln!("warning: {unused}");
        }
    }
    match Config::load(path, env, true) {
        Ok(config) => {
            let s = &config.settings;
            println!(
                "{}: ok ({} endpoint(s), {} handler(s), {} route(s), store {})",
                path.display(),
                s.endpoint.len(),
                s.handler.len(),
                s.route.len(),
                redact_url(s.store.url.split('?').next().unwrap_or_default())
            );
            for o in &s.from_environment {
                let how = if o.overrides_file {
                    "overrides the file"
                } else {
                    "not in the file"
                };
                println!("{}: set by {} ({how})", o.key, o.variable);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(ConfigError::Invalid(problems)) => {
            for problem in problems {
                eprintln!("error: {problem}");
            }
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e.into()),
    }
}

/// The secret for `sign` and `send`: from --secret-file or --secret-env; else, when
/// `--config` was given on the command line, from the configuration's endpoint; else from
/// LABELBOX_WEBHOOK_SECRET.
fn secret_for(
    args: &SecretArgs,
    given_config: Option<&Path>,
    env: &HashMap<String, String>,
) -> Result<SecretString, CliError> {
    match given_config {
        Some(path) if args.secret_env.is_none() && args.secret_file.is_none() => {
            let settings = Settings::load(path, env, true)?;
            Ok(settings.endpoint_secret(args.endpoint.as_deref(), env)?)
        }
        _ if args.endpoint.is_some() => Err(CliError::Failed(
            "--endpoint picks a secret of the configuration: give --config PATH too".into(),
        )),
        _ => read_secret(args, env),
    }
}

fn read_secret(args: &SecretArgs, env: &HashMap<String, String>) -> Result<SecretString, CliError> {
    if let Some(path) = &args.secret_file {
        let text = std::fs::read_to_string(path).map_err(|source| CliError::File {
            path: path.clone(),
            source,
        })?;
        let secret = text.trim_end_matches(['\n', '\r']);
        if secret.is_empty() {
            return Err(CliError::Secret(format!("{} is empty", path.display())));
        }
        return Ok(SecretString::from(secret.to_owned()));
    }
    let var = args.secret_env.as_deref().unwrap_or(DEFAULT_SECRET_ENV);
    match env.get(var) {
        Some(v) if !v.is_empty() => Ok(SecretString::from(v.clone())),
        _ => Err(CliError::Secret(format!(
            "no secret: {var} is not set (or pass --secret-env VAR / --secret-file FILE, or \
             --config PATH to use its endpoint's secret)"
        ))),
    }
}

fn read_input(file: &Path) -> Result<Vec<u8>, CliError> {
    if file == Path::new("-") {
        let mut body = Vec::new();
        std::io::stdin().read_to_end(&mut body)?;
        Ok(body)
    } else {
        std::fs::read(file).map_err(|source| CliError::File {
            path: file.to_owned(),
            source,
        })
    }
}

/// A cuid-shaped id like Labelbox's (`c` and 24 lowercase letters or digits).
fn new_delivery_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let tail: String = (0..24)
        .map(|_| char::from(ALPHABET[fastrand::usize(..ALPHABET.len())]))
        .collect();
    format!("c{tail}")
}

async fn send(args: SendArgs, secret: &SecretString) -> Result<ExitCode, CliError> {
    let body = read_input(&args.file)?;
    let key = secret.expose_secret().as_bytes();
    let id = args.id.unwrap_or_else(new_delivery_id);
    let response = reqwest::Client::new()
        .post(&args.url)
        .header("content-type", "application/json")
        .header("x-labelbox-event", &args.topic)
        .header("x-labelbox-id", &id)
        .header("x-hub-signature", sign(key, &body, Algorithm::Sha1))
        .header("x-hub-signature-256", sign(key, &body, Algorithm::Sha256))
        .body(body)
        .send()
        .await?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    println!("{} {}", status.as_u16(), text.trim_end());
    Ok(if status.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn events(
    path: &Path,
    env: &HashMap<String, String>,
    command: EventsCommand,
) -> Result<ExitCode, CliError> {
    // Secrets are not needed to read the store: load the settings only.
    let settings = Settings::load(path, env, true)?;
    let store = open_store(&settings, env).await?;
    events_with(store.as_ref(), &settings, command).await
}

/// The store as the CLI opens it beside a running server, with only its own password read.
async fn open_store(
    settings: &Settings,
    env: &HashMap<String, String>,
) -> Result<std::sync::Arc<dyn crate::store::Operations>, CliError> {
    let password = settings.store_password(env)?;
    Ok(crate::store::open_for_inspection(
        &settings.store,
        password.as_ref(),
        std::sync::Arc::new(SystemClock),
    )
    .await?)
}

/// `events prune`: what retention allows now, or what it would remove.
async fn prune(
    store: &dyn crate::store::Maintenance,
    retention: &crate::store::RetentionSettings,
    dry_run: bool,
    json: bool,
) -> Result<ExitCode, CliError> {
    let cutoffs = crate::store::Cutoffs::at(crate::delivery::now_millis(), retention);
    let stop = tokio_util::sync::CancellationToken::new();
    let report = crate::store::retention::prune(store, &cutoffs, dry_run, &stop).await?;
    let mut out = std::io::stdout().lock();
    if json {
        let line = serde_json::json!({
            "dry_run": dry_run,
            "deleted": report.deleted.iter().map(|(s, n)| (s.as_str(), n)).collect::<std::collections::BTreeMap<_, _>>(),
            "bodies_dropped": report.bodies_dropped,
            "body_bytes": report.body_bytes,
        });
        writeln!(out, "{line}")?;
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if dry_run { "would delete" } else { "deleted" };
    let by_status: Vec<String> = report
        .deleted
        .iter()
        .map(|(status, n)| format!("{n} {status}"))
        .collect();
    let deliveries = if by_status.is_empty() {
        "no deliveries".to_owned()
    } else {
        format!(
            "{} deliveries ({})",
            report.deleted_total(),
            by_status.join(", ")
        )
    };
    writeln!(
        out,
        "{verb} {deliveries} and the bodies of {} more, freeing {} bytes of bodies",
        report.bodies_dropped, report.body_bytes
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `events ...` on an open store: one function per subcommand, each taking stdout for itself.
async fn events_with(
    store: &dyn crate::store::Operations,
    settings: &Settings,
    command: EventsCommand,
) -> Result<ExitCode, CliError> {
    match command {
        EventsCommand::Prune { dry_run, json } => {
            prune(store, &settings.store.retention, dry_run, json).await
        }
        EventsCommand::List {
            status,
            topic,
            limit,
            json,
        } => {
            let query = ListQuery {
                status,
                topic,
                limit,
                ..ListQuery::default()
            };
            list(store, &query, json).await
        }
        EventsCommand::Show { id } => show(store, &id).await,
        EventsCommand::Replay { id, status } => replay(store, settings, id, status).await,
    }
}

/// `events list`: a table, or with `--json` one object per line.
async fn list(
    store: &dyn crate::store::Operations,
    query: &ListQuery,
    json: bool,
) -> Result<ExitCode, CliError> {
    let rows = store.list(query).await?;
    let mut out = std::io::stdout().lock();
    if json {
        for row in &rows {
            let line = serde_json::to_string(row).map_err(|e| CliError::Failed(e.to_string()))?;
            writeln!(out, "{line}")?;
        }
    } else {
        write_list(&mut out, &rows)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `events show`: every stored delivery with the id (one per endpoint that received it), each
/// followed by an empty line; an id that names none is an error that names it.
async fn show(store: &dyn crate::store::Operations, id: &str) -> Result<ExitCode, CliError> {
    let details = store.show(id).await?;
    if details.is_empty() {
        return Err(not_stored(id));
    }
    let mut out = std::io::stdout().lock();
    for d in &details {
        write_detail(&mut out, d).await?;
        writeln!(out)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One delivery of `events show`: its fields one a line, then the headers kept, the handlers'
/// state, every attempt and the body. A field that is not known prints as `-`.
async fn write_detail(
    out: &mut impl Write,
    d: &crate::store::DeliveryDetail,
) -> std::io::Result<()> {
    let s = &d.summary;
    writeln!(out, "delivery_id: {}", s.delivery_id)?;
    writeln!(out, "seq:         {}", s.seq)?;
    writeln!(out, "endpoint:    {}", s.endpoint)?;
    writeln!(out, "topic:       {}", s.topic.as_deref().unwrap_or("-"))?;
    writeln!(out, "status:      {}", s.status)?;
    writeln!(out, "entity:      {}", s.entity.as_deref().unwrap_or("-"))?;
    writeln!(out, "version:     {}", s.version.as_deref().unwrap_or("-"))?;
    let fresh = d.fresh.map_or("-", |f| if f { "yes" } else { "no" });
    writeln!(out, "fresh:       {fresh}")?;
    writeln!(out, "received_at: {}", s.received_at)?;
    // Most deliveries came by webhook; the line is there only for those that did not.
    if !s.origin.is_webhook() {
        writeln!(out, "origin:      {}", s.origin)?;
    }
    writeln!(out, "client_ip:   {}", d.client_ip)?;
    writeln!(out, "id_conflict: {}", s.id_conflict)?;
    if let Some(error) = &d.parse_error {
        writeln!(out, "parse_error: {error}")?;
    }
    writeln!(out, "headers:")?;
    for (name, value) in &d.headers {
        writeln!(out, "  {name}: {value}")?;
    }
    writeln!(out, "handlers:")?;
    for h in &d.handlers {
        writeln!(
            out,
            "  {} {} attempts={} next={} error={}",
            h.handler,
            h.state,
            h.attempts,
            h.next_attempt_at.as_deref().unwrap_or("-"),
            h.last_error.as_deref().unwrap_or("-")
        )?;
    }
    writeln!(out, "attempts:")?;
    for a in &d.attempts {
        writeln!(
            out,
            "  {} #{} {} {} {}",
            a.started_at,
            a.attempt,
            a.handler,
            a.outcome,
            a.error.as_deref().unwrap_or("")
        )?;
    }
    write_body(out, d).await
}

/// The body of `events show`, printed only up to [`SHOW_BODY_MAX_BYTES`]: a body can be
/// hundreds of MB and a terminal is no place for it. One that retention dropped says so, so it
/// is not taken for an empty body.
async fn write_body(out: &mut impl Write, d: &crate::store::DeliveryDetail) -> std::io::Result<()> {
    if d.body_pruned {
        writeln!(
            out,
            "body ({} bytes): dropped by retention (store.retention.bodies)",
            d.summary.body_len
        )?;
    } else if d.body.len() > SHOW_BODY_MAX_BYTES {
        writeln!(out, "body ({} bytes):", d.body.len())?;
        writeln!(
            out,
            "  (larger than {SHOW_BODY_MAX_BYTES} bytes; not printed)"
        )?;
    } else {
        writeln!(out, "body ({} bytes):", d.body.len())?;
        let bytes = d.body.read_all().await?;
        writeln!(out, "{}", String::from_utf8_lossy(&bytes))?;
    }
    Ok(())
}

/// `events list` as a table.
fn write_list(out: &mut impl Write, rows: &[crate::store::DeliverySummary]) -> std::io::Result<()> {
    // Each column as wide as its widest value: a delivery id can be a 64-digit
    // body hash, a topic anything a sender chose.
    let width =
        |least: usize, values: &mut dyn Iterator<Item = usize>| values.fold(least, usize::max);
    let time = width(24, &mut rows.iter().map(|r| r.received_at.len()));
    let id = width(28, &mut rows.iter().map(|r| r.delivery_id.len()));
    let topic = width(
        16,
        &mut rows.iter().map(|r| r.topic.as_deref().map_or(1, str::len)),
    );
    // ORIGIN only when a backfill brought some of them.
    let origins = rows.iter().any(|r| !r.origin.is_webhook());
    let entity = width(
        6,
        &mut rows
            .iter()
            .map(|r| r.entity.as_ref().map_or(1, String::len)),
    );
    let (entity, origin) = if origins {
        (entity, "  ORIGIN")
    } else {
        (0, "")
    };
    writeln!(
        out,
        "{:<time$}  {:<id$}  {:<topic$}  {:<12}  {:<entity$}{origin}",
        "RECEIVED_AT", "DELIVERY_ID", "TOPIC", "STATUS", "ENTITY"
    )?;
    for row in rows {
        let origin = if origins {
            format!("  {}", row.origin)
        } else {
            String::new()
        };
        writeln!(
            out,
            "{:<time$}  {:<id$}  {:<topic$}  {:<12}  {:<entity$}{origin}",
            row.received_at,
            row.delivery_id,
            row.topic.as_deref().unwrap_or("-"),
            row.status,
            row.entity.as_deref().unwrap_or("-")
        )?;
    }
    Ok(())
}

/// `events replay`: says per delivery what was done (as the console's replay page does); an
/// id that names no stored delivery is an error that names it.
async fn replay(
    store: &dyn crate::store::Operations,
    settings: &Settings,
    id: Option<String>,
    status: Option<Status>,
) -> Result<ExitCode, CliError> {
    let target = match (id, status) {
        (Some(id), _) => ReplayTarget::DeliveryId(id),
        (None, Some(status)) => ReplayTarget::Status(status),
        (None, None) => return Err(CliError::Failed("give a delivery id or --status".into())),
    };
    let items = store.replay_each(&target).await?;
    if let (ReplayTarget::DeliveryId(id), true) = (&target, items.is_empty()) {
        return Err(not_stored(id));
    }
    let routes = crate::dispatch::Routes::new(&settings.route);
    let mut out = std::io::stdout().lock();
    for item in &items {
        let s = &item.summary;
        writeln!(
            out,
            "{} seq={} {}: {}",
            s.delivery_id,
            s.seq,
            s.status,
            crate::console::replay::describe(item, &routes)
        )?;
    }
    let count =
        |effect: fn(&ReplayEffect) -> bool| items.iter().filter(|i| effect(&i.effect)).count();
    // A delivery already done is put back all the same, but nothing runs for it: counting it
    // as replayed would contradict the line above that says so.
    let replayed = count(|e| matches!(e, ReplayEffect::Queued | ReplayEffect::Superseded { .. }));
    let done = count(|e| matches!(e, ReplayEffect::Done));
    let running = count(|e| matches!(e, ReplayEffect::Running));
    writeln!(out, "replayed {replayed} deliveries")?;
    if done > 0 {
        writeln!(out, "nothing to run for {done}: already done")?;
    }
    if running > 0 {
        writeln!(
            out,
            "left {running} alone: being handled right now (replay them once they finish)"
        )?;
    }
    // A delivery asked for and left alone (being handled) is not what was asked; one already
    // done is.
    Ok(match target {
        ReplayTarget::DeliveryId(_) if running == items.len() => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

/// The error of `events show` and `events replay` for an id that names no stored delivery.
fn not_stored(id: &str) -> CliError {
    CliError::Failed(format!("no delivery with id {id:?} is stored"))
}

/// Where `healthcheck` looks, and, for a failure's message, why there.
fn probe_url(
    path: &Path,
    env: &HashMap<String, String>,
    url: Option<String>,
    ready: bool,
) -> Result<(String, Option<String>), CliError> {
    let route = if ready { "/readyz" } else { "/healthz" };
    if let Some(url) = url {
        let trimmed = url.trim_end_matches('/');
        let url = if trimmed.ends_with("/healthz") || trimmed.ends_with("/readyz") {
            url
        } else {
            format!("{trimmed}{route}")
        };
        return Ok((url, None));
    }
    // Only the listen addresses matter here; a problem elsewhere in the file (a secret not
    // set in this shell, say) does not.
    let (settings, problems) = Settings::load_lenient(path, env, false)?;
    let server_problems: Vec<_> = problems
        .into_iter()
        .filter(|p| p.key.starts_with("server."))
        .collect();
    if !server_problems.is_empty() {
        return Err(ConfigError::Invalid(server_problems).into());
    }
    let (key, mut addr) = ("server.admin_listen", settings.server.admin_listen);
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let origin = if let Some(o) = settings.from_environment.iter().find(|o| o.key == key) {
        format!("the address is {key}, set by {}", o.variable)
    } else if !path.exists() {
        format!(
            "{} does not exist, so this is the default {key}; run healthcheck with the \
             server's --config (or LABELHOOK_CONFIG), or pass --url",
            path.display()
        )
    } else if settings.server.admin_listen == ServerSettings::default().admin_listen {
        format!(
            "the address is {key} in {} (its default, unless the file sets it to that)",
            path.display()
        )
    } else {
        format!("the address is {key} in {}", path.display())
    };
    Ok((format!("http://{addr}{route}"), Some(origin)))
}

async fn healthcheck(
    path: &Path,
    env: &HashMap<String, String>,
    url: Option<String>,
    ready: bool,
) -> Result<ExitCode, CliError> {
    let (url, origin) = probe_url(path, env, url, ready)?;
    let failed = |what: String| {
        let origin = origin
            .as_deref()
            .map_or_else(String::new, |o| format!("\n{o}"));
        CliError::Failed(format!("{url}: {what}{origin}"))
    };
    let client = reqwest::Client::builder()
        .timeout(HEALTHCHECK_TIMEOUT)
        .build()?;
    let response = match client.get(&url).send().await {
        Ok(response) => response,
        Err(e) => return Err(failed(format!("no answer: {}", root_cause(&e)))),
    };
    let status = response.status();
    if status.is_success() {
        return Ok(ExitCode::SUCCESS);
    }
    // /readyz says why in a small JSON body ({"error":"store unavailable"}).
    let body = response.text().await.unwrap_or_default();
    Err(failed(format!("answered {status} {}", body.trim())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_and_argument_has_a_help_text() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "labelhook", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }

    #[test]
    fn config_on_the_command_line_is_told_apart_from_the_default() {
        let cli = Cli::parse_from_args(["labelhook", "sign", "--config", "x.toml", "body.json"]);
        assert!(cli.config_on_command_line);
        let cli = Cli::parse_from_args(["labelhook", "--config", "x.toml", "sign"]);
        assert!(cli.config_on_command_line);
        let cli = Cli::parse_from_args(["labelhook", "sign", "body.json"]);
        assert!(!cli.config_on_command_line);
    }

    #[test]
    fn causes_are_appended_once() {
        let inner = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let outer = CliError::File {
            path: PathBuf::from("body.json"),
            source: inner,
        };
        assert_eq!(with_causes(&outer), "cannot read body.json: gone");
    }
}
