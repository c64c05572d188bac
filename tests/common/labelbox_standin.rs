//! A STAND-IN for Labelbox's API, for tests and benchmarks: Labelbox's real API cannot be
//! reached from here. It answers the operations `labelhook labelbox ...` sends with the shapes
//! and error forms that LABELBOX.md section 9 documents, and nothing more. Where section 9 is
//! silent it says so beside what it picked. Its sources, as section 9 names them: Labelbox's
//! Python SDK (labelbox-python 6.0.0 and 7.17.0: `request_client.py`, `schema/webhook.py`,
//! `schema/project.py`, `schema/export_filters.py`, `schema/export_task.py`, `schema/task.py`,
//! and its integration tests) and docs.labelbox.com (webhooks, export overview, limits).
//!
//! - `POST /graphql` with `Authorization: Bearer <key>` (9.1): a wrong key gets
//!   `AUTHENTICATION_ERROR`; the rate limit is a top-level `message` starting with "You have
//!   exceeded" (its HTTP status is not documented: 400 here, so that only the message, which
//!   the SDK goes by, can tell it);
//! - webhooks (9.2): `createWebhook` and `updateWebhook` with their values spliced into the
//!   query text (parsed here, so that bad escaping shows), the lists of the organization and
//!   of a project 100 a page (`skip`/`first`), `webhook(where: {id}) { project { id } }`; no
//!   hard delete (INACTIVE stays listed), and no secret in an update;
//! - the export (9.3): `exportDataRowsInProject` with a `data_row_last_activity_at` filter
//!   (both value forms of 9.3 and 9.3a), the task polled through `user { createdTasks }`
//!   (`IN_PROGRESS`, then `COMPLETE` or `FAILED`), `exportMetadataHeader` (`null` for no rows),
//!   `exportFileFromOffset` (the offset a string) pointing at `GET /files/...`, a signed URL
//!   fetched without the key, whose chunks cut lines anywhere.
//!
//! Tests script it through [`StandIn::state`] and read back what it was sent.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// The key the stand-in accepts.
pub const API_KEY: &str = "lb-standin-key-0123456789";
pub const USER_ID: &str = "cuserstandin0000000000001";

/// One data row of a project, as the export has it.
#[derive(Debug, Clone)]
pub struct Row {
    /// `data_row.details.last_activity_at`, Unix milliseconds (what the filter compares).
    pub last_activity_ms: i64,
    /// The NDJSON line, without its newline.
    pub line: String,
}

#[derive(Debug, Clone)]
pub struct Project {
    pub name: String,
    pub rows: Vec<Row>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub id: String,
    pub project: Option<String>,
    pub topics: Vec<String>,
    pub url: String,
    pub secret: String,
    pub status: String,
    pub updates: u32,
}

#[derive(Debug, Clone)]
pub struct Task {
    pub project: String,
    pub data: Arc<Vec<u8>>,
    pub lines: u64,
    pub polls_left: u32,
    pub failure: Option<String>,
}

/// A chunk download, as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct ChunkGet {
    pub start: u64,
    pub had_authorization: bool,
    pub signed: bool,
}

/// Everything a test can script or read back.
#[derive(Debug, Default)]
pub struct StandInState {
    pub projects: BTreeMap<String, Project>,
    pub webhooks: Vec<Hook>,
    pub tasks: BTreeMap<String, Task>,
    /// The next this many GraphQL calls get the rate-limit answer.
    pub rate_limit_next: u32,
    /// Polls a task answers IN_PROGRESS before it is done.
    pub polls_before_done: u32,
    /// The next export task fails with this error.
    pub fail_next_export: Option<String>,
    /// Bytes per chunk of an export file.
    pub chunk_bytes: u64,
    /// A chunk (by start offset) that is never answered: a backfill waiting for it can be
    /// interrupted. `None`: all are answered.
    pub hold_chunk_at: Option<u64>,
    /// Set once the held chunk was asked for.
    pub held_chunk_asked: bool,
    /// The operations received, in order (their names, e.g. `createWebhook`).
    pub operations: Vec<String>,
    /// The queries of `createWebhook` calls, as sent (to check the splicing).
    pub create_queries: Vec<String>,
    /// The `data_row_last_activity_at` filter values of the exports started.
    pub export_filters: Vec<String>,
    pub polls: Vec<Instant>,
    pub chunk_gets: Vec<ChunkGet>,
    /// GraphQL calls refused for a wrong key.
    pub refused_keys: u32,
    next_id: u64,
}

impl StandInState {
    fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("c{prefix}{:0>20}", self.next_id)
    }

    /// Adds a webhook as if made in Labelbox's UI or by another tool.
    pub fn add_webhook(
        &mut self,
        project: Option<&str>,
        topics: &[&str],
        url: &str,
        secret: &str,
    ) -> String {
        let id = self.new_id("wh");
        self.webhooks.push(Hook {
            id: id.clone(),
            project: project.map(str::to_owned),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            url: url.to_owned(),
            secret: secret.to_owned(),
            status: "ACTIVE".to_owned(),
            updates: 0,
        });
        id
    }

    pub fn add_project(&mut self, id: &str, name: &str) {
        self.projects.insert(
            id.to_owned(),
            Project {
                name: name.to_owned(),
                rows: Vec::new(),
            },
        );
    }

    /// Sets (or replaces, by data row id) a row of a project's export.
    pub fn put_row(&mut self, project: &str, data_row_id: &str, row: Row) {
        let rows = &mut self.projects.get_mut(project).expect("project").rows;
        let key = format!("\"data_row\":{{\"id\":\"{data_row_id}\"");
        rows.retain(|r| !r.line.contains(&key));
        rows.push(row);
    }

    pub fn active_webhooks(&self) -> Vec<&Hook> {
        self.webhooks
            .iter()
            .filter(|h| h.status == "ACTIVE")
            .collect()
    }
}

/// A running stand-in; stops when dropped.
pub struct StandIn {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<StandInState>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StandIn {
    /// Starts on a free port of 127.0.0.1, on a thread of its own.
    pub fn start() -> StandIn {
        let state = Arc::new(Mutex::new(StandInState {
            polls_before_done: 1,
            chunk_bytes: 64 * 1024,
            ..StandInState::default()
        }));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = state.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let addr = listener.local_addr().expect("addr");
                addr_tx.send(addr).expect("send addr");
                let app = Router::new()
                    .route("/graphql", post(graphql))
                    .route("/files/{task}/{start}", get(file))
                    .with_state(Served {
                        state: shared,
                        addr,
                    });
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("serve");
            });
        });
        let addr = addr_rx.recv().expect("stand-in address");
        StandIn {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Runs in the caller's runtime until `shutdown` resolves (the example binary).
    pub async fn serve_until(
        listener: tokio::net::TcpListener,
        state: Arc<Mutex<StandInState>>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let addr = listener.local_addr().expect("addr");
        let app = Router::new()
            .route("/graphql", post(graphql))
            .route("/files/{task}/{start}", get(file))
            .with_state(Served { state, addr });
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .expect("serve");
    }

    pub fn api_url(&self) -> String {
        format!("http://{}/graphql", self.addr)
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut StandInState) -> T) -> T {
        f(&mut self.state.lock().expect("stand-in state"))
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // A held chunk request keeps a connection open: the thread is not waited for.
        drop(self.thread.take());
    }
}

#[derive(Clone)]
struct Served {
    state: Arc<Mutex<StandInState>>,
    addr: SocketAddr,
}

fn errors(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"errors": [{"message": message, "extensions": {"code": code}}]})),
    )
        .into_response()
}

fn data(value: Value) -> Response {
    Json(json!({ "data": value })).into_response()
}

async fn graphql(
    State(served): State<Served>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let query = body["query"].as_str().unwrap_or_default().to_owned();
    let variables = body["variables"].clone();
    let mut state = served.state.lock().expect("stand-in state");
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if bearer != format!("Bearer {API_KEY}") {
        state.refused_keys += 1;
        // 9.1: a bad key is AUTHENTICATION_ERROR (its HTTP status is not documented).
        return errors(
            StatusCode::UNAUTHORIZED,
            "AUTHENTICATION_ERROR",
            "Invalid API key",
        );
    }
    if state.rate_limit_next > 0 {
        state.rate_limit_next -= 1;
        state.operations.push("rate-limited".to_owned());
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"message": "You have exceeded the maximum number of requests per minute."}),
            ),
        )
            .into_response();
    }
    let op = operation(&query);
    state.operations.push(op.to_owned());
    match op {
        "createWebhook" => create_webhook(&mut state, &query),
        "updateWebhook" => update_webhook(&mut state, &query),
        "exportDataRowsInProject" => start_export(&mut state, &variables),
        "createdTasks" => poll_task(&mut state, &variables),
        "exportMetadataHeader" => metadata_header(&state, &variables),
        "exportFileFromOffset" => file_from_offset(&state, &variables, served.addr),
        "webhook" => webhook_project(&state, &variables),
        "organizationWebhooks" => {
            let all: Vec<&Hook> = state.webhooks.iter().collect();
            data(json!({"organization": {"webhooks": page(&query, &all)}}))
        }
        "projectWebhooks" => {
            let id = variables["param_0"].as_str().unwrap_or_default();
            if !state.projects.contains_key(id) {
                // The SDK takes a null project for a missing one.
                return data(json!({ "project": null }));
            }
            let own: Vec<&Hook> = state
                .webhooks
                .iter()
                .filter(|h| h.project.as_deref() == Some(id))
                .collect();
            data(json!({"project": {"webhooks": page(&query, &own)}}))
        }
        "project" => {
            let id = variables["param_0"].as_str().unwrap_or_default();
            match state.projects.get(id) {
                Some(p) => data(json!({"project": {"id": id, "name": p.name}})),
                None => data(json!({ "project": null })),
            }
        }
        "user" => data(json!({"user": {"id": USER_ID}})),
        _ => errors(
            StatusCode::BAD_REQUEST,
            "GRAPHQL_VALIDATION_FAILED",
            "the stand-in does not know this operation",
        ),
    }
}

/// Which documented operation a query is.
fn operation(query: &str) -> &'static str {
    let has = |s: &str| query.contains(s);
    if has("createWebhook") {
        "createWebhook"
    } else if has("updateWebhook") {
        "updateWebhook"
    } else if has("exportDataRowsInProject") {
        "exportDataRowsInProject"
    } else if has("createdTasks") {
        "createdTasks"
    } else if has("exportMetadataHeader") {
        "exportMetadataHeader"
    } else if has("exportFileFromOffset") {
        "exportFileFromOffset"
    } else if has("webhook(where") {
        "webhook"
    } else if has("organization") && has("webhooks(") {
        "organizationWebhooks"
    } else if has("project(where") && has("webhooks(") {
        "projectWebhooks"
    } else if has("project(where") {
        "project"
    } else if has("user") {
        "user"
    } else {
        "unknown"
    }
}

fn hook_json(h: &Hook) -> Value {
    json!({"createdAt": "2024-05-01T00:00:00.000Z", "status": h.status, "topics": h.topics,
           "id": h.id, "updatedAt": "2024-05-01T00:00:00.000Z", "url": h.url})
}

/// One page of a list: `webhooks(skip: N first: M)` as the query text has it.
fn page(query: &str, all: &[&Hook]) -> Value {
    let number = |name: &str| -> usize {
        query
            .split_once(&format!("{name}:"))
            .and_then(|(_, rest)| {
                rest.trim_start()
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0)
    };
    let (skip, first) = (number("skip"), number("first").min(100));
    Value::Array(
        all.iter()
            .skip(skip)
            .take(first)
            .map(|h| hook_json(h))
            .collect(),
    )
}

fn create_webhook(state: &mut StandInState, query: &str) -> Response {
    state.create_queries.push(query.to_owned());
    let Some(args) = gql::arguments(query, "createWebhook") else {
        return errors(
            StatusCode::BAD_REQUEST,
            "GRAPHQL_PARSE_FAILED",
            "cannot parse createWebhook",
        );
    };
    let Some(data_arg) = gql::field(&args, "data") else {
        return errors(
            StatusCode::BAD_REQUEST,
            "GRAPHQL_VALIDATION_FAILED",
            "data is required",
        );
    };
    let project = gql::field(data_arg, "project")
        .and_then(|p| gql::field(p, "id"))
        .and_then(gql::string);
    let topics = gql::field(data_arg, "topics")
        .and_then(|t| gql::field(t, "set"))
        .map(gql::enums)
        .unwrap_or_default();
    let url = gql::field(data_arg, "url")
        .and_then(gql::string)
        .unwrap_or_default();
    let secret = gql::field(data_arg, "secret")
        .and_then(gql::string)
        .unwrap_or_default();
    const TOPICS: [&str; 4] = [
        "LABEL_CREATED",
        "LABEL_UPDATED",
        "LABEL_DELETED",
        "WORKFLOW_ACTION",
    ];
    if topics.iter().any(|t| !TOPICS.contains(&t.as_str())) {
        return errors(
            StatusCode::BAD_REQUEST,
            "GRAPHQL_VALIDATION_FAILED",
            "unknown topic",
        );
    }
    if url.is_empty() || secret.is_empty() || topics.is_empty() {
        return errors(
            StatusCode::BAD_REQUEST,
            "MALFORMED_REQUEST",
            "url, secret and topics are required",
        );
    }
    if let Some(p) = &project {
        if !state.projects.contains_key(p) {
            return errors(StatusCode::OK, "RESOURCE_NOT_FOUND", "project not found");
        }
    }
    let id = state.new_id("wh");
    let hook = Hook {
        id,
        project,
        topics,
        url,
        secret,
        status: "ACTIVE".to_owned(),
        updates: 0,
    };
    let answer = hook_json(&hook);
    state.webhooks.push(hook);
    data(json!({ "createWebhook": answer }))
}

fn update_webhook(state: &mut StandInState, query: &str) -> Response {
    let Some(args) = gql::arguments(query, "updateWebhook") else {
        return errors(
            StatusCode::BAD_REQUEST,
            "GRAPHQL_PARSE_FAILED",
            "cannot parse updateWebhook",
        );
    };
    let id = gql::field(&args, "where")
        .and_then(|w| gql::field(w, "id"))
        .and_then(gql::string)
        .unwrap_or_default();
    let Some(changes) = gql::field(&args, "data") else {
        return errors(
            StatusCode::BAD_REQUEST,
            "GRAPHQL_VALIDATION_FAILED",
            "data is required",
        );
    };
    if gql::field(changes, "secret").is_some() {
        // 9.2: the secret cannot be updated.
        return errors(
            StatusCode::BAD_REQUEST,
            "GRAPHQL_VALIDATION_FAILED",
            "secret is not a field of the update",
        );
    }
    let Some(hook) = state.webhooks.iter_mut().find(|h| h.id == id) else {
        return errors(StatusCode::OK, "RESOURCE_NOT_FOUND", "webhook not found");
    };
    if let Some(set) = gql::field(changes, "topics").and_then(|t| gql::field(t, "set")) {
        hook.topics = gql::enums(set);
    }
    if let Some(url) = gql::field(changes, "url").and_then(gql::string) {
        hook.url = url;
    }
    if let Some(status) = gql::field(changes, "status").and_then(gql::enum_name) {
        hook.status = status;
    }
    hook.updates += 1;
    data(json!({ "updateWebhook": hook_json(hook) }))
}

fn webhook_project(state: &StandInState, variables: &Value) -> Response {
    let id = variables["param_0"].as_str().unwrap_or_default();
    match state.webhooks.iter().find(|h| h.id == id) {
        Some(h) => {
            data(json!({"webhook": {"project": h.project.as_ref().map(|p| json!({"id": p}))}}))
        }
        None => data(json!({ "webhook": null })),
    }
}

/// `2024-05-01T12:00:00+0000` (9.3) or `2024-05-01 12:00:00` (9.3a), UTC, as milliseconds.
fn filter_millis(value: &str) -> Option<i64> {
    let text = value.trim().replacen(' ', "T", 1);
    let text = text.strip_suffix("+0000").unwrap_or(&text);
    let text = text.strip_suffix('Z').unwrap_or(text);
    let at = time::PrimitiveDateTime::parse(
        text,
        &time::format_description::well_known::Iso8601::DEFAULT,
    )
    .ok()?;
    Some((at.assume_utc().unix_timestamp_nanos() / 1_000_000) as i64)
}

fn start_export(state: &mut StandInState, variables: &Value) -> Response {
    let input = &variables["input"];
    let project = input["filters"]["projectId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let Some(rows) = state.projects.get(&project).map(|p| p.rows.clone()) else {
        return errors(StatusCode::OK, "RESOURCE_NOT_FOUND", "project not found");
    };
    let filter = &input["filters"]["searchQuery"]["query"][0];
    if filter["type"] != "data_row_last_activity_at"
        || filter["value"]["operator"] != "GREATER_THAN_OR_EQUAL"
        || filter["value"]["timezone"] != "UTC"
    {
        return errors(
            StatusCode::BAD_REQUEST,
            "GRAPHQL_VALIDATION_FAILED",
            "unexpected filter",
        );
    }
    let value = filter["value"]["value"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let Some(since) = filter_millis(&value) else {
        return errors(
            StatusCode::BAD_REQUEST,
            "MALFORMED_REQUEST",
            "cannot read the time",
        );
    };
    state.export_filters.push(value);
    let mut bytes = Vec::new();
    let mut lines = 0;
    for row in rows.iter().filter(|r| r.last_activity_ms >= since) {
        bytes.extend_from_slice(row.line.as_bytes());
        bytes.push(b'\n');
        lines += 1;
    }
    let id = state.new_id("task");
    let task = Task {
        project,
        data: Arc::new(bytes),
        lines,
        polls_left: state.polls_before_done,
        failure: state.fail_next_export.take(),
    };
    state.tasks.insert(id.clone(), task);
    data(json!({"exportDataRowsInProject": {"taskId": id, "isStreamable": true}}))
}

fn poll_task(state: &mut StandInState, variables: &Value) -> Response {
    state.polls.push(Instant::now());
    if variables["userId"] != USER_ID {
        return data(json!({"user": null}));
    }
    let id = variables["taskId"].as_str().unwrap_or_default();
    let Some(task) = state.tasks.get_mut(id) else {
        return data(json!({"user": {"createdTasks": []}}));
    };
    let answer = if task.polls_left > 0 {
        task.polls_left -= 1;
        json!({"status": "IN_PROGRESS", "completionPercentage": 50.0, "errors": null, "id": id})
    } else if let Some(failure) = &task.failure {
        json!({"status": "FAILED", "completionPercentage": 100.0, "errors": {"error": failure}, "id": id})
    } else {
        json!({"status": "COMPLETE", "completionPercentage": 100.0, "errors": null, "id": id})
    };
    data(json!({"user": {"createdTasks": [answer]}}))
}

fn metadata_header(state: &StandInState, variables: &Value) -> Response {
    let id = variables["where"]["id"].as_str().unwrap_or_default();
    let Some(task) = state.tasks.get(id) else {
        return errors(StatusCode::OK, "RESOURCE_NOT_FOUND", "task not found");
    };
    // 9.3: `null` means no rows; the ERRORS stream is always empty here.
    let header = if variables["streamType"] == "RESULT" && !task.data.is_empty() {
        json!({"totalSize": task.data.len(), "totalLines": task.lines})
    } else {
        Value::Null
    };
    data(json!({"task": {"exportMetadataHeader": header}}))
}

fn file_from_offset(state: &StandInState, variables: &Value, addr: SocketAddr) -> Response {
    let id = variables["where"]["id"].as_str().unwrap_or_default();
    let Some(task) = state.tasks.get(id) else {
        return errors(StatusCode::OK, "RESOURCE_NOT_FOUND", "task not found");
    };
    // 9.3: the offset is sent as a string.
    let Some(start) = variables["offset"]
        .as_str()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return errors(
            StatusCode::BAD_REQUEST,
            "GRAPHQL_VALIDATION_FAILED",
            "offset must be a UInt64 string",
        );
    };
    let total = task.data.len() as u64;
    if start >= total {
        return errors(
            StatusCode::BAD_REQUEST,
            "MALFORMED_REQUEST",
            "offset past the end",
        );
    }
    let end = (start + state.chunk_bytes.max(1)).min(total) - 1;
    let line_at = |at: u64| {
        task.data[..at as usize]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
    };
    data(json!({"task": {"exportFileFromOffset": {
        "offsets": {"start": start.to_string(), "end": end.to_string()},
        "lines": {"start": line_at(start).to_string(), "end": line_at(end).to_string()},
        "file": format!("http://{addr}/files/{id}/{start}?X-Goog-Signature=standin-signature"),
    }}}))
}

async fn file(
    State(served): State<Served>,
    Path((task, start)): Path<(String, u64)>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let held = {
        let mut state = served.state.lock().expect("stand-in state");
        state.chunk_gets.push(ChunkGet {
            start,
            had_authorization: headers.contains_key("authorization"),
            signed: query
                .get("X-Goog-Signature")
                .is_some_and(|s| s == "standin-signature"),
        });
        let held = state.hold_chunk_at == Some(start);
        if held {
            state.held_chunk_asked = true;
        }
        held
    };
    if held {
        // Never answered: the backfill waiting for it is interrupted by the test.
        std::future::pending::<()>().await;
    }
    let state = served.state.lock().expect("stand-in state");
    let Some(task) = state.tasks.get(&task) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let total = task.data.len() as u64;
    if start >= total || !query.contains_key("X-Goog-Signature") {
        return StatusCode::FORBIDDEN.into_response();
    }
    let end = (start + state.chunk_bytes.max(1)).min(total);
    task.data[start as usize..end as usize]
        .to_vec()
        .into_response()
}

/// Export rows as the export writes them (9.3 "A line"), for tests to build projects with.
pub mod rows {
    use serde_json::{json, Value};

    /// A label of a data row: id, `created_at`, `updated_at` (RFC 3339), and a word the test
    /// can find in its annotations.
    pub struct Label<'a> {
        pub id: &'a str,
        pub created_at: &'a str,
        pub updated_at: &'a str,
        pub mark: &'a str,
    }

    fn export_time(rfc3339: &str) -> String {
        // Export timestamps look like 2024-04-08T16:34:02.000+00:00 (LABELBOX.md 8).
        let at =
            time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
                .expect("RFC 3339");
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}+00:00",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second(),
            at.millisecond()
        )
    }

    /// One line: a data row of `project`, active last at `last_activity`, with `labels` and,
    /// when given, a workflow step (action, at).
    pub fn line(
        project: &str,
        data_row: &str,
        last_activity: &str,
        labels: &[Label<'_>],
        workflow: Option<(&str, &str)>,
    ) -> super::Row {
        let labels: Vec<Value> = labels
            .iter()
            .map(|l| {
                json!({"id": l.id, "label_kind": "Default", "label_details": {
                    "created_at": export_time(l.created_at), "updated_at": export_time(l.updated_at),
                    "created_by": "labeler@example.com", "content_last_updated_at": export_time(l.updated_at),
                    "reviews": []},
                    "annotations": {"objects": [{"name": l.mark, "value": "box"}], "classifications": [], "relationships": []}})
            })
            .collect();
        let history: Vec<Value> = workflow
            .iter()
            .map(|(action, at)| json!({"action": action, "created_at": export_time(at), "created_by": "reviewer@example.com"}))
            .collect();
        let value = json!({
            "data_row": {"id": data_row, "global_key": format!("{data_row}.jpg"),
                "external_id": format!("{data_row}.jpg"),
                "row_data": format!("https://storage.example/{data_row}.jpg?signature=changes-every-export"),
                "details": {"dataset_id": "cdataset", "dataset_name": "dataset",
                    "created_at": export_time("2024-04-01T00:00:00Z"),
                    "updated_at": export_time(last_activity),
                    "last_activity_at": export_time(last_activity), "created_by": "owner@example.com"}},
            "projects": {project: {"name": "standin project", "labels": labels,
                "project_details": {"batch_id": "cbatch", "priority": 5,
                    "workflow_status": if workflow.is_some() { "Done" } else { "ToLabel" },
                    "workflow_history": history}}}
        });
        let last = time::OffsetDateTime::parse(
            last_activity,
            &time::format_description::well_known::Rfc3339,
        )
        .expect("RFC 3339");
        super::Row {
            last_activity_ms: (last.unix_timestamp_nanos() / 1_000_000) as i64,
            line: value.to_string(),
        }
    }

    /// `n` rows of one label each, all active at `at`, for a benchmark: about 1 KiB a line.
    pub fn many(project: &str, n: usize, at: &str) -> Vec<super::Row> {
        (0..n)
            .map(|i| {
                let row = format!("cdatarow{i:017}");
                let label = format!("clabel{i:019}");
                let mark = "x".repeat(400);
                line(
                    project,
                    &row,
                    at,
                    &[Label {
                        id: &label,
                        created_at: "2024-05-01T00:00:00Z",
                        updated_at: at,
                        mark: &mark,
                    }],
                    None,
                )
            })
            .collect()
    }
}

/// The little of GraphQL's syntax the stand-in needs to read the values spliced into
/// `createWebhook` and `updateWebhook`: strings (with JSON's escapes, which are GraphQL's),
/// enum names, numbers, lists and objects; commas are whitespace.
mod gql {
    #[derive(Debug, Clone)]
    pub enum V {
        Str(String),
        Name(String),
        List(Vec<V>),
        Obj(Vec<(String, V)>),
    }

    /// The arguments of the first `name(...)` in `query`, as an object.
    pub fn arguments(query: &str, name: &str) -> Option<V> {
        let start = query.find(&format!("{name}("))? + name.len() + 1;
        let mut p = Parser {
            s: &query.as_bytes()[start..],
            at: 0,
        };
        let fields = p.fields(b')')?;
        Some(V::Obj(fields))
    }

    pub fn field<'a>(v: &'a V, name: &str) -> Option<&'a V> {
        match v {
            V::Obj(fields) => fields.iter().find(|(k, _)| k == name).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn string(v: &V) -> Option<String> {
        match v {
            V::Str(s) => Some(s.clone()),
            _ => None,
        }
    }

    pub fn enum_name(v: &V) -> Option<String> {
        match v {
            V::Name(s) => Some(s.clone()),
            _ => None,
        }
    }

    pub fn enums(v: &V) -> Vec<String> {
        match v {
            V::List(items) => items.iter().filter_map(enum_name).collect(),
            _ => Vec::new(),
        }
    }

    struct Parser<'a> {
        s: &'a [u8],
        at: usize,
    }

    impl Parser<'_> {
        fn skip(&mut self) {
            while self.at < self.s.len()
                && (self.s[self.at].is_ascii_whitespace() || self.s[self.at] == b',')
            {
                self.at += 1;
            }
        }

        fn peek(&mut self) -> Option<u8> {
            self.skip();
            self.s.get(self.at).copied()
        }

        fn name(&mut self) -> Option<String> {
            self.skip();
            let start = self.at;
            while self.at < self.s.len()
                && (self.s[self.at].is_ascii_alphanumeric() || self.s[self.at] == b'_')
            {
                self.at += 1;
            }
            (self.at > start).then(|| String::from_utf8_lossy(&self.s[start..self.at]).into_owned())
        }

        fn fields(&mut self, close: u8) -> Option<Vec<(String, V)>> {
            let mut fields = Vec::new();
            loop {
                if self.peek()? == close {
                    self.at += 1;
                    return Some(fields);
                }
                let name = self.name()?;
                if self.peek()? != b':' {
                    return None;
                }
                self.at += 1;
                fields.push((name, self.value()?));
            }
        }

        fn value(&mut self) -> Option<V> {
            match self.peek()? {
                b'"' => self.string(),
                b'{' => {
                    self.at += 1;
                    self.fields(b'}').map(V::Obj)
                }
                b'[' => {
                    self.at += 1;
                    let mut items = Vec::new();
                    loop {
                        if self.peek()? == b']' {
                            self.at += 1;
                            return Some(V::List(items));
                        }
                        items.push(self.value()?);
                    }
                }
                _ => self.name().map(V::Name),
            }
        }

        fn string(&mut self) -> Option<V> {
            let start = self.at;
            self.at += 1;
            while self.at < self.s.len() {
                match self.s[self.at] {
                    b'\\' => self.at += 2,
                    b'"' => {
                        self.at += 1;
                        let literal = std::str::from_utf8(&self.s[start..self.at]).ok()?;
                        return serde_json::from_str::<String>(literal).ok().map(V::Str);
                    }
                    b'\n' => return None,
                    _ => self.at += 1,
                }
            }
            None
        }
    }
}
