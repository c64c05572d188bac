//! `labelhook labelbox backfill`: what Labelbox's webhooks would have sent while the receiver
//! (or the ingress in front of it) was down, recovered from Labelbox's export and stored as
//! deliveries marked as a backfill.
//!
//! The export is read chunk by chunk and its rows in batches ([`BATCH_ROWS`]), each batch
//! stored in one short transaction through the CLI's store handle (as `events replay` writes)
//! before the next chunk is read, so memory stays flat whatever the export's size and an
//! interrupted run loses at most a batch: running it again stores what is missing, and what is
//! there already is skipped (a backfilled delivery's id names what it describes). The running
//! server's dispatcher hands the new deliveries through the ordering gate, whose rule 7 lets
//! through only what is newer than what a webhook already brought.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use super::api::Api;
use super::export::{self, Lines, Task};
use super::progress::{Progress, Remarks};
use super::rows::{ExportRow, Plan, Rebuilt};
use super::settings::WEBHOOK_TOPICS;
use super::Configured;
use super::{LabelboxError, Outcome};
use crate::delivery::signature::Verified;
use crate::delivery::{
    format_millis, now_millis, DeliveryId, Envelope, IncomingBody, UnixMillis, VerifiedDelivery,
};
use crate::ordering::Version;
use crate::store::{Backfill, KnownLabel};

/// Rows stored per transaction: short enough that a running server's writer hardly waits.
pub const BATCH_ROWS: usize = 100;
/// Or fewer, once their lines hold this many bytes.
const BATCH_BYTES: usize = 8 * 1024 * 1024;

/// From when changes were missed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// `--since 2024-05-01T12:00:00Z` (also `2024-05-01 12:00:00` or `2024-05-01`, UTC).
    At(UnixMillis),
    /// `--since 6h`: that long before now.
    Ago(Duration),
    /// `--since-last-seen`: the newest delivery of the project that came by webhook, less
    /// `labelbox.since_last_seen_margin`.
    LastSeen,
}

impl FromStr for Since {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let at = |s: &str| Version::parse_rfc3339(s).map(|v| v.as_nanos().div_euclid(1_000_000));
        let found = at(text)
            .or_else(|| at(&format!("{}Z", text.replacen(' ', "T", 1))))
            .or_else(|| at(&format!("{text}T00:00:00Z")));
        if let Some(ms) = found {
            return Ok(Since::At(ms));
        }
        humantime::parse_duration(text)
            .map(Since::Ago)
            .map_err(|_| {
                format!(
                    "{text:?} is neither a time (2024-05-01T12:00:00Z, 2024-05-01 12:00:00 UTC, \
                 2024-05-01) nor a duration before now (6h, 2days)"
                )
            })
    }
}

/// What `labelhook labelbox backfill` was asked.
#[derive(Debug, Clone)]
pub struct BackfillRequest {
    pub project: String,
    pub since: Since,
    /// The `[[endpoint]]` the deliveries are stored under [default: the one the project's
    /// `[[labelbox.webhook]]` names, else the first].
    pub endpoint: Option<String>,
}

/// A delivery from what a backfill fetched from Labelbox's API with our key (the only way to
/// make one besides the webhook verifier: see [`Verified`]). Its headers say it is a backfill
/// and from which export task; its request id names the task, so that its log lines can be
/// told apart too.
pub fn fetched_delivery(
    delivery_id: &str,
    topic: &str,
    body: Bytes,
    endpoint: &str,
    received_at: UnixMillis,
    task: &str,
) -> VerifiedDelivery {
    let proof = Verified::fetched_with_our_key(&body);
    let envelope = Envelope {
        delivery_id: DeliveryId::Given(delivery_id.to_owned()),
        endpoint: endpoint.to_owned(),
        topic: Some(topic.to_owned()),
        client_ip: Ipv4Addr::UNSPECIFIED.into(),
        headers: vec![
            ("x-labelbox-event".to_owned(), topic.to_owned()),
            ("x-labelhook-origin".to_owned(), "backfill".to_owned()),
            ("x-labelhook-export-task".to_owned(), task.to_owned()),
        ],
        received_at,
        request_id: Some(format!("backfill-{task}")),
    };
    VerifiedDelivery::new(proof, envelope, IncomingBody::Inline(body))
}

/// The topics the project's webhooks send, and the endpoint they come in on, from the
/// `[[labelbox.webhook]]` entries for the project (else for the organization); every topic and
/// the first endpoint when none is configured.
fn topics_and_endpoint(
    config: &Configured,
    request: &BackfillRequest,
) -> Result<(HashSet<String>, String), LabelboxError> {
    let hooks = config.labelbox.webhook.iter().collect::<Vec<_>>();
    let for_project: Vec<_> = hooks
        .iter()
        .filter(|h| h.scope() == Some(request.project.as_str()))
        .collect();
    let chosen: Vec<_> = if for_project.is_empty() {
        hooks.iter().filter(|h| h.organization).collect()
    } else {
        for_project
    };
    let topics: HashSet<String> = if chosen.is_empty() {
        WEBHOOK_TOPICS.iter().map(|t| (*t).to_owned()).collect()
    } else {
        chosen
            .iter()
            .flat_map(|h| h.topics.iter().cloned())
            .collect()
    };
    let endpoint = request
        .endpoint
        .clone()
        .or_else(|| chosen.first().map(|h| h.endpoint.clone()))
        .or_else(|| config.endpoints.first().cloned())
        .ok_or_else(|| LabelboxError::Setup("the configuration has no [[endpoint]]".into()))?;
    if !config.endpoints.contains(&endpoint) {
        return Err(LabelboxError::Setup(format!(
            "--endpoint: no [[endpoint]] is named {endpoint:?}"
        )));
    }
    Ok((topics, endpoint))
}

/// Checks that the project exists before anything else (an export of a missing one fails
/// less clearly).
async fn check_project(api: &Api, project: &str) -> Result<String, LabelboxError> {
    #[derive(Deserialize)]
    struct Data {
        project: Option<Named>,
    }
    #[derive(Deserialize)]
    struct Named {
        name: Option<String>,
    }
    let data: Data = api
        .call(
            "looking the project up",
            "query GetProjectPyApi($param_0: ID!) { project(where: {id: $param_0}) { id name } }",
            json!({ "param_0": project }),
        )
        .await
        .map_err(|e| e.for_project(project))?;
    let project_name = data
        .project
        .ok_or_else(|| LabelboxError::ProjectNotFound(project.to_owned()))?
        .name;
    Ok(project_name.unwrap_or_default())
}

/// When the backfill starts from.
async fn start_time(
    config: &Configured,
    store: &dyn Backfill,
    request: &BackfillRequest,
) -> Result<UnixMillis, LabelboxError> {
    Ok(match request.since {
        Since::At(at) => at,
        Since::Ago(ago) => now_millis() - i64::try_from(ago.as_millis()).unwrap_or(i64::MAX),
        Since::LastSeen => {
            let margin = config.labelbox.since_last_seen_margin;
            let newest = store
                .newest_received(&request.project)
                .await?
                .ok_or_else(|| LabelboxError::NeverSeen(request.project.clone()))?;
            newest - i64::try_from(margin.as_millis()).unwrap_or(i64::MAX)
        }
    })
}

/// Runs a backfill; says what it did on `out`, its progress on `remarks`.
pub async fn run(
    config: &Configured,
    api: &Api,
    store: &dyn Backfill,
    request: &BackfillRequest,
    remarks: Arc<Remarks>,
    out: &mut dyn std::io::Write,
) -> Result<Outcome, LabelboxError> {
    let settings = &config.labelbox;
    let (topics, endpoint) = topics_and_endpoint(config, request)?;
    let name = check_project(api, &request.project).await?;
    let since = start_time(config, store, request).await?;
    writeln!(
        out,
        "backfill of project {} ({name}): what changed since {}, as {} deliveries of endpoint {endpoint:?}",
        request.project,
        format_millis(since),
        settings.backfill_payload.as_str(),
    )?;
    let user = export::user_id(api).await?;
    let task = export::start(api, &request.project, since).await?;
    remarks.say(&format!("export task {} started", task.id));
    export::wait(api, &user, &task, settings.export_poll_interval, &remarks).await?;
    let Some((total_size, total_lines)) = export::header(api, &task, "RESULT").await? else {
        writeln!(
            out,
            "nothing to do: no data row of the project has changed since {}",
            format_millis(since)
        )?;
        return Ok(Outcome::NothingToDo);
    };
    let plan = Plan {
        project: request.project.clone(),
        payload: settings.backfill_payload,
        topics,
        since: Version::from_nanos(since.saturating_mul(1_000_000)),
    };
    let batch = Batch {
        store,
        plan: &plan,
        endpoint: &endpoint,
        task: &task.id,
        rows: Vec::new(),
        weight: 0,
    };
    let mut progress = Progress::new(&remarks, Some(total_size));
    read_all(api, &task, total_size, batch, &mut progress).await?;
    progress.finish();
    writeln!(
        out,
        "read {} of {total_lines} rows: {} new deliveries stored, {} stored already",
        progress.rows, progress.stored, progress.skipped
    )?;
    if let Some((_, failed)) = export::header(api, &task, "ERRORS").await? {
        return Err(LabelboxError::RowsNotExported(failed));
    }
    Ok(if progress.stored > 0 {
        Outcome::Done
    } else {
        Outcome::NothingToDo
    })
}

/// Reads the export's result chunk by chunk, storing its rows batch by batch.
async fn read_all(
    api: &Api,
    task: &Task,
    total_size: u64,
    mut batch: Batch<'_>,
    progress: &mut Progress<'_>,
) -> Result<(), LabelboxError> {
    // The storage URLs get no API key: a client of their own, with no default headers.
    let storage = reqwest::Client::new();
    let mut lines = Lines::default();
    let mut row_number = 0_u64;
    let mut offset = 0;
    while offset < total_size {
        let chunk = export::chunk_at(api, task, "RESULT", offset).await?;
        let mut reader = chunk.open(&storage).await?;
        while let Some(piece) = reader.next().await? {
            progress.bytes += piece.len() as u64;
            lines.push(&piece, |line| batch.add(line, &mut row_number))?;
            if batch.is_full() {
                batch.flush(progress).await?;
            }
            progress.tick();
        }
        offset = chunk.end + 1;
        // What came complete in this chunk is stored before the next one is asked for.
        batch.flush(progress).await?;
    }
    lines.finish(|line| batch.add(line, &mut row_number))?;
    batch.flush(progress).await
}

/// Rows read and not stored yet.
struct Batch<'a> {
    store: &'a dyn Backfill,
    plan: &'a Plan,
    endpoint: &'a str,
    task: &'a str,
    rows: Vec<ExportRow>,
    weight: usize,
}

impl Batch<'_> {
    fn add(&mut self, line: &[u8], number: &mut u64) -> Result<(), LabelboxError> {
        *number += 1;
        let row = ExportRow::parse(line).map_err(|why| LabelboxError::Row { row: *number, why })?;
        self.weight += row.weight();
        self.rows.push(row);
        Ok(())
    }

    fn is_full(&self) -> bool {
        self.rows.len() >= BATCH_ROWS || self.weight >= BATCH_BYTES
    }

    /// Rebuilds the rows' deliveries (with the labels the store knows on their data rows) and
    /// stores them in one transaction.
    async fn flush(&mut self, progress: &mut Progress<'_>) -> Result<(), LabelboxError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = self
            .rows
            .iter()
            .map(|r| r.data_row_id().to_owned())
            .collect();
        let known: Vec<KnownLabel> = self.store.known_labels(&self.plan.project, &ids).await?;
        let received_at = now_millis();
        let deliveries: Vec<VerifiedDelivery> = self
            .rows
            .iter()
            .flat_map(|row| self.plan.rebuild(row, &known))
            .map(
                |Rebuilt {
                     delivery_id,
                     topic,
                     body,
                 }| {
                    fetched_delivery(
                        &delivery_id,
                        topic,
                        body,
                        self.endpoint,
                        received_at,
                        self.task,
                    )
                },
            )
            .collect();
        progress.rows += self.rows.len() as u64;
        self.rows.clear();
        self.weight = 0;
        if !deliveries.is_empty() {
            let stored = self.store.accept_fetched(deliveries).await?;
            let new = stored.iter().filter(|s| s.is_some()).count() as u64;
            progress.stored += new;
            progress.skipped += stored.len() as u64 - new;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_time_or_a_duration_before_now() {
        let noon = Since::At(1_714_564_800_000);
        assert_eq!("2024-05-01T12:00:00Z".parse::<Since>(), Ok(noon.clone()));
        assert_eq!(
            "2024-05-01T14:00:00+02:00".parse::<Since>(),
            Ok(noon.clone())
        );
        assert_eq!("2024-05-01 12:00:00".parse::<Since>(), Ok(noon));
        assert_eq!(
            "2024-05-01".parse::<Since>(),
            Ok(Since::At(1_714_521_600_000))
        );
        assert_eq!(
            "6h".parse::<Since>(),
            Ok(Since::Ago(Duration::from_secs(6 * 3600)))
        );
        assert!("yesterday-ish".parse::<Since>().is_err());
    }

    #[test]
    fn a_fetched_delivery_says_it_is_a_backfill() {
        let delivery = fetched_delivery(
            "backfill:label:l1@2024-05-01T00:00:00Z",
            "LABEL_UPDATED",
            Bytes::from_static(b"{}"),
            "labelbox",
            0,
            "task-1",
        );
        assert_eq!(
            delivery.delivery_id(),
            "backfill:label:l1@2024-05-01T00:00:00Z"
        );
        let parts = delivery.into_parts();
        assert_eq!(parts.origin, crate::delivery::Origin::Backfill);
        assert_eq!(parts.request_id.as_deref(), Some("backfill-task-1"));
    }
}
