//! The client of Labelbox's API (LABELBOX.md section 9), for the two jobs no receiver did for
//! its users: keeping Labelbox's webhooks in step with the configuration
//! (`labelhook labelbox webhooks list|apply`, [`webhooks`]), and recovering what was missed
//! while the receiver was down (`labelhook labelbox backfill`, [`backfill`]).
//!
//! A backfill's way: Labelbox's export ([`export`]) ─▶ each data row rebuilt into the
//! deliveries its webhooks would have sent ([`rows`]) ─▶ the store, marked as a backfill, as
//! `events replay` writes ─▶ the server's dispatcher and the same ordering gate, which hands on
//! only what is newer than what handlers already have.
//!
//! The API key is a secret: it is sent to the GraphQL endpoint only (never to the signed
//! storage URLs the export is read from), and never printed, logged or formatted into an error.

mod api;
pub mod backfill;
mod export;
mod progress;
pub mod rows;
pub mod settings;
pub mod webhooks;

use std::collections::HashMap;
use std::sync::Arc;

use secrecy::SecretString;

pub use api::Api;
pub use backfill::{fetched_delivery, run as backfill, BackfillRequest, Since};
pub use progress::Remarks;
pub use settings::{
    BackfillPayload, LabelboxSettings, LabelboxWebhook, LABELBOX_API_URL, MIN_POLL_INTERVAL,
    SECRET_ID_PARAM, WEBHOOK_TOPICS,
};

use crate::store::StoreError;

/// Every `[[endpoint]]`'s secrets by endpoint name, resolved (what Labelbox signs with).
pub type EndpointSecrets = HashMap<String, Vec<SecretString>>;

/// How a command ended, when it did not fail: the CLI exits 0 for [`Outcome::Done`] and 3 for
/// [`Outcome::NothingToDo`], 1 being a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Something was (or, for a dry run, would be) changed.
    Done,
    /// Everything was as wanted already.
    NothingToDo,
}

/// What went wrong, said so that a user can act on it. No variant holds the API key or a
/// signed URL.
#[derive(Debug, thiserror::Error)]
pub enum LabelboxError {
    #[error("{0}")]
    Setup(String),
    #[error(
        "Labelbox refused the API key (AUTHENTICATION_ERROR): check labelbox.api_key. Keys \
         expire (after 6 months at most) and stop working when their user leaves"
    )]
    Authentication,
    #[error("project {0} does not exist, or the API key's organization cannot see it")]
    ProjectNotFound(String),
    #[error("Labelbox found nothing: {0}")]
    NotFound(String),
    #[error("Labelbox refused {what} ({code}): {message}")]
    Refused {
        what: String,
        code: String,
        message: String,
    },
    #[error(
        "cannot reach Labelbox's API at {url}: {cause} (is the network up, and the URL right?)"
    )]
    Unreachable { url: String, cause: String },
    #[error("{why}; gave up {what} after {tries} tries (labelbox.max_retries)")]
    GaveUp {
        what: String,
        tries: u32,
        why: String,
    },
    #[error("unexpected answer to {what}: {problem}")]
    Answer { what: String, problem: String },
    #[error("the new webhook {0} is not ACTIVE: the webhooks it was to replace were left alone")]
    NotActive(String),
    #[error("the export task {task} failed: {errors}")]
    ExportFailed { task: String, errors: String },
    #[error("reading the export: {0}")]
    Chunk(String),
    #[error("the export's row {row} cannot be read ({why}); nothing after it was stored")]
    Row { row: u64, why: String },
    #[error(
        "Labelbox could not export {0} row(s) (the task's ERRORS stream); the others were \
         stored: run the backfill again later"
    )]
    RowsNotExported(u64),
    #[error(
        "--since-last-seen: no delivery of project {0} came by webhook yet (or none is gated \
         yet); give --since TIME instead"
    )]
    NeverSeen(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl LabelboxError {
    /// A "not found" while asking about `project` means that project.
    fn for_project(self, project: &str) -> Self {
        match self {
            LabelboxError::NotFound(_) => LabelboxError::ProjectNotFound(project.to_owned()),
            other => other,
        }
    }
}

/// What the `labelbox` commands read of the configuration: `[labelbox]` (or its defaults),
/// and the names of the `[[endpoint]]`s that deliveries come in on.
#[derive(Debug, Clone, Default)]
pub struct Configured {
    pub labelbox: LabelboxSettings,
    pub endpoints: Vec<String>,
}

/// A client of the API with the configured key.
pub fn api(
    settings: &Configured,
    key: SecretString,
    remarks: Arc<Remarks>,
) -> Result<Api, LabelboxError> {
    Api::new(&settings.labelbox, key, remarks)
}

/// What the configuration wants, what Labelbox has, and the plan between them.
struct Current {
    ours: webhooks::Ours,
    wanted: Vec<webhooks::Wanted>,
    existing: Vec<webhooks::Webhook>,
    steps: Vec<webhooks::Step>,
}

async fn current(
    settings: &Configured,
    secrets: &EndpointSecrets,
    api: &Api,
) -> Result<Current, LabelboxError> {
    let lb = &settings.labelbox;
    let ours = webhooks::Ours::new(lb, secrets);
    let wanted = webhooks::wanted(lb, secrets)?;
    let existing = webhooks::fetch(api, lb, &ours).await?;
    let steps = webhooks::plan(&wanted, &existing, &ours);
    Ok(Current {
        ours,
        wanted,
        existing,
        steps,
    })
}

/// `labelhook labelbox webhooks list`.
pub async fn list_webhooks(
    settings: &Configured,
    secrets: &EndpointSecrets,
    api: &Api,
    out: &mut dyn std::io::Write,
) -> Result<Outcome, LabelboxError> {
    let now = current(settings, secrets, api).await?;
    webhooks::render_list(out, &now.existing, &now.steps, &now.ours)?;
    Ok(Outcome::Done)
}

/// `labelhook labelbox webhooks apply [--dry-run]`: the plan, then (unless a dry run) what it
/// says.
pub async fn apply_webhooks(
    settings: &Configured,
    secrets: &EndpointSecrets,
    api: &Api,
    out: &mut dyn std::io::Write,
    dry_run: bool,
) -> Result<Outcome, LabelboxError> {
    let now = current(settings, secrets, api).await?;
    if now.steps.is_empty() {
        writeln!(
            out,
            "Labelbox webhooks: nothing to do, they match the configuration"
        )?;
        return Ok(Outcome::NothingToDo);
    }
    webhooks::render_plan(out, &now.steps, &now.wanted, &now.existing)?;
    if dry_run {
        writeln!(out, "dry run: nothing was changed")?;
        return Ok(Outcome::Done);
    }
    webhooks::carry_out(api, out, &now.steps, &now.wanted).await
}
