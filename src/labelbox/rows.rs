//! One exported data row turned into the deliveries its webhooks would have sent while the
//! receiver was down. Pure: no I/O.
//!
//! What is confirmed and what is assumed (docs/labelbox.md says the same):
//! - [C] an export line is one data row with every label it has now in the project, each with
//!   `label_details` and `annotations`, and the project's `project_details` (workflow status
//!   and history): the same shape export-shaped (v2) webhooks send (LABELBOX.md 9.3, 3.4).
//! - [I] **v1** (webhooks made through the API or the SDK): one LABEL_CREATED (a label never
//!   updated: `updated_at` equal to `created_at`) or LABEL_UPDATED per label changed since the
//!   backfill's start, its body in the captured v1 shape (LABELBOX.md 3.1), `updatedAt` the
//!   later of `updated_at` and `content_last_updated_at` (milliseconds), and `label` holding
//!   the export's `annotations` as a JSON string: the export v2 form of the annotations, not
//!   the legacy v1 form a webhook would have sent.
//! - [I] **export-shaped** (webhooks made in the project UI): the exported line itself, as the
//!   data row's snapshot; LABEL_DELETED when a label the store knew is gone from it,
//!   LABEL_CREATED when its newest label is one the store did not know, LABEL_UPDATED else.
//! - [I] a label the store knew on the data row that the export no longer lists was deleted
//!   meanwhile: v1 gets a LABEL_DELETED with `deleted: true`, dated at the data row's
//!   `last_activity_at` (and never before the label's last known version).
//! - [I] the workflow state: one WORKFLOW_ACTION per data row whose newest
//!   `workflow_history` entry is newer than the start, export-shaped (`data_row` and the
//!   project's `project_details`), since no WORKFLOW_ACTION body has ever been captured.
//!
//! Each delivery's id names what it describes, `backfill:<entity>@<version>` (or `@deleted`),
//! so that running a backfill again finds it stored and changes nothing.

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::settings::BackfillPayload;
use crate::ordering::Version;
use crate::store::KnownLabel;

/// One line of the export, read.
#[derive(Deserialize)]
pub struct ExportRow {
    data_row: DataRow,
    #[serde(default)]
    projects: BTreeMap<String, ProjectPart>,
    /// The line as exported, for export-shaped snapshots.
    #[serde(skip)]
    line: Bytes,
}

#[derive(Deserialize)]
struct DataRow {
    id: String,
    global_key: Option<Value>,
    external_id: Option<Value>,
    row_data: Option<Value>,
    #[serde(default)]
    details: Details,
}

#[derive(Deserialize, Default)]
struct Details {
    created_at: Option<String>,
    updated_at: Option<String>,
    last_activity_at: Option<String>,
    dataset_id: Option<Value>,
    dataset_name: Option<Value>,
}

#[derive(Deserialize)]
struct ProjectPart {
    name: Option<Value>,
    #[serde(default)]
    labels: Vec<ExportLabel>,
    project_details: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct ExportLabel {
    id: String,
    #[serde(default)]
    label_details: LabelDetails,
    annotations: Option<Box<RawValue>>,
}

#[derive(Deserialize, Default)]
struct LabelDetails {
    created_at: Option<String>,
    updated_at: Option<String>,
    content_last_updated_at: Option<String>,
    created_by: Option<Value>,
}

impl ExportLabel {
    /// When it last changed: the later of `updated_at` and `content_last_updated_at`.
    fn changed_at(&self) -> Option<Version> {
        let d = &self.label_details;
        let at = |s: &Option<String>| s.as_deref().and_then(Version::parse_rfc3339);
        at(&d.updated_at).max(at(&d.content_last_updated_at))
    }
}

impl ExportRow {
    /// Reads one line; `Err` says why (without quoting the line, which may hold signed URLs).
    pub fn parse(line: &[u8]) -> Result<ExportRow, String> {
        let mut row: ExportRow = serde_json::from_slice(line).map_err(|e| {
            format!(
                "line {}, column {}: {}",
                e.line(),
                e.column(),
                e.classify_name()
            )
        })?;
        row.line = Bytes::copy_from_slice(line);
        Ok(row)
    }

    pub fn data_row_id(&self) -> &str {
        &self.data_row.id
    }

    /// How much memory it holds, roughly: the line, read twice.
    pub fn weight(&self) -> usize {
        self.line.len() * 2
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Data => "not an export row",
            serde_json::error::Category::Eof => "cut short",
        }
    }
}

/// What a backfill rebuilds, and from when.
pub struct Plan {
    pub project: String,
    pub payload: BackfillPayload,
    /// The topics the project's webhooks send.
    pub topics: HashSet<String>,
    /// Changes older than this were not missed.
    pub since: Version,
}

/// One rebuilt delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    pub delivery_id: String,
    pub topic: &'static str,
    pub body: Bytes,
}

impl Plan {
    fn wants(&self, topic: &str) -> bool {
        self.topics.contains(topic)
    }

    /// The deliveries `row` stands for. `known` are the labels the store knows on its data row.
    pub fn rebuild(&self, row: &ExportRow, known: &[KnownLabel]) -> Vec<Rebuilt> {
        let Some(part) = row.projects.get(&self.project) else {
            return Vec::new();
        };
        let now: HashSet<&str> = part.labels.iter().map(|l| l.id.as_str()).collect();
        let mut gone: Vec<&KnownLabel> = Vec::new();
        let mut seen = HashSet::new();
        for k in known {
            if k.data_row_id == row.data_row.id
                && !now.contains(k.label_id.as_str())
                && seen.insert(k.label_id.as_str())
            {
                gone.push(k);
            }
        }
        let mut out = match self.payload {
            BackfillPayload::V1 => self.v1_labels(row, part, &gone),
            BackfillPayload::Export => self.snapshot(row, part, known, &gone),
        };
        out.extend(self.workflow(row, part));
        out
    }

    fn recent(&self, at: Option<Version>) -> bool {
        at.is_some_and(|at| at >= self.since)
    }

    fn v1_labels(&self, row: &ExportRow, part: &ProjectPart, gone: &[&KnownLabel]) -> Vec<Rebuilt> {
        let mut out = Vec::new();
        for label in &part.labels {
            if !self.recent(label.changed_at()) {
                continue;
            }
            let d = &label.label_details;
            let topic = if d.updated_at.is_none() || d.updated_at == d.created_at {
                "LABEL_CREATED"
            } else {
                "LABEL_UPDATED"
            };
            if self.wants(topic) {
                out.extend(finish(topic, v1_body(&self.project, row, part, label)));
            }
        }
        if self.wants("LABEL_DELETED") {
            let activity = row
                .data_row
                .details
                .last_activity_at
                .as_deref()
                .and_then(Version::parse_rfc3339);
            for k in gone {
                let after_known = k
                    .version
                    .map(|v| Version::from_nanos(v.as_nanos() + 1_000_000));
                let Some(at) = activity.max(after_known) else {
                    continue;
                };
                let body = v1_deleted_body(&self.project, row, part, &k.label_id, at);
                out.extend(finish("LABEL_DELETED", body).map(|mut r| {
                    r.delivery_id = format!("backfill:label:{}@deleted", k.label_id);
                    r
                }));
            }
        }
        out
    }

    fn snapshot(
        &self,
        row: &ExportRow,
        part: &ProjectPart,
        known: &[KnownLabel],
        gone: &[&KnownLabel],
    ) -> Vec<Rebuilt> {
        let newest = part.labels.iter().max_by_key(|l| l.changed_at());
        if gone.is_empty() && !self.recent(newest.and_then(ExportLabel::changed_at)) {
            return Vec::new();
        }
        let topic = if !gone.is_empty() {
            "LABEL_DELETED"
        } else if newest.is_some_and(|l| {
            !known
                .iter()
                .any(|k| k.data_row_id == row.data_row.id && k.label_id == l.id)
        }) {
            "LABEL_CREATED"
        } else {
            "LABEL_UPDATED"
        };
        if !self.wants(topic) {
            return Vec::new();
        }
        finish(topic, row.line.clone()).into_iter().collect()
    }

    fn workflow(&self, row: &ExportRow, part: &ProjectPart) -> Option<Rebuilt> {
        if !self.wants("WORKFLOW_ACTION") {
            return None;
        }
        let details = part.project_details.as_ref()?;
        let body = json!({
            "data_row": {
                "id": row.data_row.id,
                "global_key": row.data_row.global_key,
                "external_id": row.data_row.external_id,
            },
            "projects": { &self.project: { "name": part.name, "project_details": details } },
        });
        let rebuilt = finish("WORKFLOW_ACTION", Bytes::from(body.to_string()))?;
        let parsed = crate::events::parse(Some("WORKFLOW_ACTION"), &rebuilt.body).ok()?;
        self.recent(parsed.version).then_some(rebuilt)
    }
}

/// Names a rebuilt body by what the gate will make of it; `None` when it names no entity.
fn finish(topic: &'static str, body: Bytes) -> Option<Rebuilt> {
    let parsed = crate::events::parse(Some(topic), &body).ok()?;
    let entity = parsed.entity?;
    let version = parsed
        .version
        .map_or_else(|| "none".to_owned(), |v| v.to_string());
    Some(Rebuilt {
        delivery_id: format!("backfill:{entity}@{version}"),
        topic,
        body,
    })
}

/// An export timestamp in the v1 form (RFC 3339, UTC).
fn v1_time(at: Option<&str>) -> Value {
    at.and_then(Version::parse_rfc3339)
        .map_or(Value::Null, |v| Value::from(v.to_string()))
}

fn v1_envelope(
    project: &str,
    row: &ExportRow,
    part: &ProjectPart,
) -> serde_json::Map<String, Value> {
    let details = &row.data_row.details;
    let body = json!({
        "project": {"id": project, "name": part.name},
        "dataRow": {
            "id": row.data_row.id,
            "createdAt": v1_time(details.created_at.as_deref()),
            "updatedAt": v1_time(details.updated_at.as_deref()),
            "deletedAt": null,
            "externalId": row.data_row.external_id,
            "rowData": row.data_row.row_data,
        },
        "dataset": {"id": details.dataset_id, "name": details.dataset_name},
    });
    match body {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}

fn v1_body(project: &str, row: &ExportRow, part: &ProjectPart, label: &ExportLabel) -> Bytes {
    let mut body = v1_envelope(project, row, part);
    let d = &label.label_details;
    body.insert("id".into(), Value::from(label.id.as_str()));
    body.insert("createdAt".into(), v1_time(d.created_at.as_deref()));
    body.insert(
        "updatedAt".into(),
        label
            .changed_at()
            .map_or(Value::Null, |v| Value::from(v.to_string())),
    );
    body.insert(
        "label".into(),
        Value::from(label.annotations.as_ref().map_or("{}", |a| a.get())),
    );
    body.insert("deleted".into(), Value::from(false));
    body.insert("user".into(), json!({ "email": d.created_by }));
    Bytes::from(Value::Object(body).to_string())
}

fn v1_deleted_body(
    project: &str,
    row: &ExportRow,
    part: &ProjectPart,
    label_id: &str,
    at: Version,
) -> Bytes {
    let mut body = v1_envelope(project, row, part);
    body.insert("id".into(), Value::from(label_id));
    body.insert("updatedAt".into(), Value::from(at.to_string()));
    body.insert("label".into(), Value::Null);
    body.insert("deleted".into(), Value::from(true));
    Bytes::from(Value::Object(body).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"data_row":{"id":"drow1","global_key":"g1","external_id":"img1.jpg","row_data":"https://storage.example/img1.jpg?sig=x","details":{"created_at":"2024-04-01T00:00:00.000+00:00","updated_at":"2024-04-01T00:00:00.000+00:00","last_activity_at":"2024-05-03T10:00:00.000+00:00","dataset_id":"ds1","dataset_name":"ds"}},"projects":{"proj1":{"name":"demo","labels":[{"id":"lab1","label_kind":"Default","label_details":{"created_at":"2024-05-01T09:00:00.000+00:00","updated_at":"2024-05-03T09:59:59.000+00:00","content_last_updated_at":"2024-05-03T09:59:59.250+00:00","created_by":"a@example.com","reviews":[]},"annotations":{"objects":[],"classifications":[],"relationships":[]}},{"id":"lab2","label_kind":"Default","label_details":{"created_at":"2024-05-02T08:00:00.000+00:00","updated_at":"2024-05-02T08:00:00.000+00:00","created_by":"b@example.com"},"annotations":{"objects":[{"name":"box"}],"classifications":[],"relationships":[]}}],"project_details":{"workflow_status":"InReview","workflow_history":[{"action":"Approve","created_at":"2024-05-03T10:00:00.000+00:00","created_by":"r@example.com"}]}}}}"#;

    fn plan(payload: BackfillPayload, since: &str) -> Plan {
        Plan {
            project: "proj1".to_owned(),
            payload,
            topics: [
                "LABEL_CREATED",
                "LABEL_UPDATED",
                "LABEL_DELETED",
                "WORKFLOW_ACTION",
            ]
            .iter()
            .map(|t| (*t).to_owned())
            .collect(),
            since: Version::parse_rfc3339(since).expect("since"),
        }
    }

    fn row() -> ExportRow {
        ExportRow::parse(LINE.as_bytes()).expect("row")
    }

    fn parsed(r: &Rebuilt) -> crate::events::Parsed {
        crate::events::parse(Some(r.topic), &r.body).expect("parses")
    }

    #[test]
    fn v1_users_get_one_label_event_each_as_the_webhook_would_send_it() {
        let out = plan(BackfillPayload::V1, "2024-05-01T00:00:00Z").rebuild(&row(), &[]);
        let ids: Vec<&str> = out.iter().map(|r| r.delivery_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "backfill:label:lab1@2024-05-03T09:59:59.25Z",
                "backfill:label:lab2@2024-05-02T08:00:00Z",
                "backfill:workflow:proj1:drow1@2024-05-03T10:00:00Z",
            ]
        );
        assert_eq!(out[0].topic, "LABEL_UPDATED");
        assert_eq!(out[1].topic, "LABEL_CREATED", "never updated since created");
        let first = parsed(&out[0]);
        assert_eq!(first.entity.as_deref(), Some("label:lab1"));
        assert_eq!(first.project_id.as_deref(), Some("proj1"));
        let label = first.event.label().expect("label").clone();
        assert_eq!(label.data_row_id.as_deref(), Some("drow1"));
        assert_eq!(label.user.as_deref(), Some("a@example.com"));
        // The annotations ride in `label` as a JSON string, as v1 bodies carry them.
        let content = crate::events::label_content(&label, &out[1].body).expect("content");
        assert_eq!(content["objects"][0]["name"], "box");
    }

    #[test]
    fn labels_not_changed_since_the_start_are_not_rebuilt() {
        let out = plan(BackfillPayload::V1, "2024-05-03T00:00:00Z").rebuild(&row(), &[]);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[0].delivery_id.starts_with("backfill:label:lab1@"));
    }

    #[test]
    fn a_known_label_the_export_no_longer_lists_becomes_a_delete() {
        let known = [KnownLabel {
            data_row_id: "drow1".to_owned(),
            label_id: "lab0".to_owned(),
            version: Version::parse_rfc3339("2024-05-03T11:00:00Z"),
        }];
        let out = plan(BackfillPayload::V1, "2024-05-04T00:00:00Z").rebuild(&row(), &known);
        let delete = out
            .iter()
            .find(|r| r.topic == "LABEL_DELETED")
            .expect("a delete");
        assert_eq!(delete.delivery_id, "backfill:label:lab0@deleted");
        let event = parsed(delete);
        assert_eq!(event.entity.as_deref(), Some("label:lab0"));
        // Never dated before what the store knew of the label.
        assert_eq!(
            event.version.map(|v| v.to_string()).as_deref(),
            Some("2024-05-03T11:00:00.001Z")
        );
    }

    #[test]
    fn export_shaped_users_get_the_line_as_the_data_rows_snapshot() {
        let out = plan(BackfillPayload::Export, "2024-05-01T00:00:00Z").rebuild(&row(), &[]);
        assert_eq!(out[0].body, LINE.as_bytes());
        assert_eq!(out[0].topic, "LABEL_CREATED", "no label of it was known");
        assert_eq!(
            out[0].delivery_id,
            "backfill:labels:proj1:drow1@2024-05-03T10:00:00Z"
        );
        let known = [
            KnownLabel {
                data_row_id: "drow1".to_owned(),
                label_id: "lab1".to_owned(),
                version: None,
            },
            KnownLabel {
                data_row_id: "drow1".to_owned(),
                label_id: "lab9".to_owned(),
                version: None,
            },
        ];
        let out = plan(BackfillPayload::Export, "2024-05-01T00:00:00Z").rebuild(&row(), &known);
        assert_eq!(out[0].topic, "LABEL_DELETED");
    }

    #[test]
    fn only_the_topics_the_webhooks_send_are_rebuilt() {
        let mut p = plan(BackfillPayload::V1, "2024-05-01T00:00:00Z");
        p.topics = ["LABEL_UPDATED".to_owned()].into_iter().collect();
        let out = p.rebuild(&row(), &[]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, "LABEL_UPDATED");
    }

    #[test]
    fn a_bad_line_is_named_without_being_quoted() {
        let error =
            ExportRow::parse(br#"{"data_row": {"row_data": "https://secret.example/?sig=abc""#)
                .err()
                .expect("refused");
        assert!(!error.contains("sig=abc"), "{error}");
    }
}
