//! The command line: `serve` and the tools around it (`check-config`, `sign`, `send`, `events`,
//! `healthcheck`). Every command takes `--config` and talks to the store the config names, so
//! the tools work while the server runs.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};

use crate::config::{Config, ConfigError, Settings, DEFAULT_CONFIG_PATH};
use crate::delivery::signature::{sign, sign_reader, Algorithm};
use crate::delivery::{Status, SystemClock};
use crate::store::{redact_url, Inspect, ListQuery, ReplayTarget, StoreError};
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
    /// Configuration file.
    #[arg(long, global = true, env = "LABELHOOK_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
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
    /// Exit 0 when /healthz answers 200 (for images without curl).
    Healthcheck {
        /// Base URL or full /healthz URL; default from the config's admin or main listener.
        #[arg(long)]
        url: Option<String>,
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
        #[arg(long)]
        status: Option<Status>,
        #[arg(long)]
        topic: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One delivery: headers kept, body, per-handler attempts and errors.
    Show { id: String },
    /// Put deliveries back in the queue: one by id, or all with a status.
    Replay {
        #[arg(required_unless_present = "status", conflicts_with = "status")]
        id: Option<String>,
        #[arg(long)]
        status: Option<Status>,
    },
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
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{0}")]
    Failed(String),
}

/// Runs a command; what `main` returns.
pub async fn run(cli: Cli) -> ExitCode {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode, CliError> {
    let env: HashMap<String, String> = std::env::vars().collect();
    match cli.command {
        Command::Serve => serve(&cli.config, &env).await,
        Command::CheckConfig => check_config(&cli.config, &env),
        Command::Sign(args) => {
            let secret = read_secret(&args.secret, &env)?;
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
                Some(p) => sign_reader(key, std::fs::File::open(p)?, algorithm)?,
            };
            println!("{signature}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Send(args) => send(args, &env).await,
        Command::Events(command) => events(&cli.config, &env, command).await,
        Command::Healthcheck { url } => healthcheck(&cli.config, &env, url).await,
    }
}

async fn serve(path: &Path, env: &HashMap<String, String>) -> Result<ExitCode, CliError> {
    let config = Config::load(path, env, true)?;
    telemetry::init_logging(&config.settings.log);
    let app = Application::build(config).await?;
    // Scripts and tests read these lines to learn the real ports.
    println!("listening on {}", server::display_addr(app.local_addr()));
    if let Some(admin) = app.admin_addr() {
        println!("admin listening on {}", server::display_addr(admin));
    }
    std::io::stdout().flush()?;
    tracing::info!(addr = %app.local_addr(), "labelhook started");
    app.run_until_stopped(server::shutdown_signal()).await;
    Ok(ExitCode::SUCCESS)
}

fn check_config(path: &Path, env: &HashMap<String, String>) -> Result<ExitCode, CliError> {
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
            Ok(ExitCode::SUCCESS)
        }
        Err(ConfigError::Invalid(problems)) => {
            for problem in problems {
                eprintln!("{problem}");
            }
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e.into()),
    }
}

fn read_secret(args: &SecretArgs, env: &HashMap<String, String>) -> Result<SecretString, CliError> {
    if let Some(path) = &args.secret_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::Secret(format!("cannot read {}: {e}", path.display())))?;
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
            "no secret: {var} is not set (or pass --secret-env VAR / --secret-file FILE)"
        ))),
    }
}

fn read_input(file: &Path) -> Result<Vec<u8>, CliError> {
    if file == Path::new("-") {
        let mut body = Vec::new();
        std::io::stdin().read_to_end(&mut body)?;
        Ok(body)
    } else {
        Ok(std::fs::read(file)?)
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

async fn send(args: SendArgs, env: &HashMap<String, String>) -> Result<ExitCode, CliError> {
    let secret = read_secret(&args.secret, env)?;
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
    let password = settings.store_password(env)?;
    let store = crate::store::open_for_inspection(
        &settings.store,
        password.as_ref(),
        std::sync::Arc::new(SystemClock),
    )
    .await?;
    events_with(store.as_ref(), command).await
}

async fn events_with(store: &dyn Inspect, command: EventsCommand) -> Result<ExitCode, CliError> {
    let mut out = std::io::stdout().lock();
    match command {
        EventsCommand::List {
            status,
            topic,
            limit,
            json,
        } => {
            let rows = store
                .list(&ListQuery {
                    status,
                    topic,
                    limit,
                })
                .await?;
            if json {
                for row in &rows {
                    let line =
                        serde_json::to_string(row).map_err(|e| CliError::Failed(e.to_string()))?;
                    writeln!(out, "{line}")?;
                }
            } else {
                writeln!(
                    out,
                    "{:<24}  {:<28}  {:<16}  {:<12}  ENTITY",
                    "RECEIVED_AT", "DELIVERY_ID", "TOPIC", "STATUS"
                )?;
                for row in &rows {
                    writeln!(
                        out,
                        "{:<24}  {:<28}  {:<16}  {:<12}  {}",
                        row.received_at,
                        row.delivery_id,
                        row.topic.as_deref().unwrap_or("-"),
                        row.status,
                        row.entity.as_deref().unwrap_or("-")
                    )?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        EventsCommand::Show { id } => {
            let details = store.show(&id).await?;
            if details.is_empty() {
                eprintln!("no delivery with id {id:?}");
                return Ok(ExitCode::FAILURE);
            }
            for d in details {
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
                writeln!(out, "body ({} bytes):", d.body.len())?;
                if d.body.len() > SHOW_BODY_MAX_BYTES {
                    writeln!(
                        out,
                        "  (larger than {SHOW_BODY_MAX_BYTES} bytes; not printed)"
                    )?;
                } else {
                    let bytes = d.body.read_all().await?;
                    writeln!(out, "{}", String::from_utf8_lossy(&bytes))?;
                }
                writeln!(out)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        EventsCommand::Replay { id, status } => {
            let target = match (id, status) {
                (Some(id), _) => ReplayTarget::DeliveryId(id),
                (None, Some(status)) => ReplayTarget::Status(status),
                (None, None) => return Err(CliError::Failed("give an id or --status".into())),
            };
            let outcome = store.replay(&target).await?;
            writeln!(out, "replayed {} deliveries", outcome.replayed)?;
            if outcome.running > 0 {
                writeln!(
                    out,
                    "left {} alone: being handled right now (replay them once they finish)",
                    outcome.running
                )?;
            }
            Ok(
                if outcome.replayed == 0 && matches!(target, ReplayTarget::DeliveryId(_)) {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                },
            )
        }
    }
}

async fn healthcheck(
    path: &Path,
    env: &HashMap<String, String>,
    url: Option<String>,
) -> Result<ExitCode, CliError> {
    let url = match url {
        Some(url) => url,
        None => {
            let settings = Settings::load(path, env, false)?;
            let mut addr = settings
                .server
                .admin_listen
                .unwrap_or(settings.server.listen);
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}")
        }
    };
    let url = if url.trim_end_matches('/').ends_with("/healthz") {
        url
    } else {
        format!("{}/healthz", url.trim_end_matches('/'))
    };
    let response = reqwest::Client::builder()
        .timeout(HEALTHCHECK_TIMEOUT)
        .build()?
        .get(&url)
        .send()
        .await?;
    if response.status().is_success() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{url}: {}", response.status());
        Ok(ExitCode::FAILURE)
    }
}
