//! Typed events: turns an authenticated delivery (topic header + raw body) into an [`Event`] a
//! handler can `match` on, and the [`Parsed`] view the ordering gate needs (entity key,
//! version, kind of change).
//!
//! Pure on purpose (no I/O, no async) so it can be fuzzed and property-tested.
//!
//! Rules of thumb:
//! - Unknown fields are never an error, and fields of an unexpected type are treated as absent:
//!   Labelbox documents little of its payloads (see LABELBOX.md section 3), so only what
//!   identifies and orders an event is required (a label id, a model run id and type).
//! - Bodies may be hundreds of MB, so nothing here builds a `serde_json::Value` of a body. The
//!   readers in [`bodies`] pick a handful of fields and skip everything else with `IgnoredAny`
//!   ([`lenient`]), which serde_json scans without allocating. The label's annotations (the
//!   double-encoded v1 `label` string, the v2 `annotations`) are skipped too and decoded only
//!   when a handler asks ([`label_content`]).
//! - Error messages never echo the body (it may hold signed URLs or personal data): only a
//!   field name or a line and column.

mod bodies;
mod lenient;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ordering::{Change, Version};

/// A webhook topic, from the `X-Labelbox-Event` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Topic {
    LabelCreated,
    LabelUpdated,
    LabelDeleted,
    /// `WORKFLOW_ACTION` in the SDK, `MOVE` in the docs: both are accepted.
    WorkflowAction,
    /// Legacy review topics: deprecated, but old webhooks may still send them.
    ReviewCreated,
    ReviewUpdated,
    ReviewDeleted,
    /// The model-training callback (`POST <base>/model_run`), not a real topic subscription.
    ModelRun,
    /// Anything else, kept whole and routed only by topic name or `*`.
    Unknown,
}

impl Topic {
    /// Parses a header value: surrounding whitespace is trimmed and case is ignored, since
    /// nothing documents that Labelbox is strict about either. Anything else is `Unknown`.
    pub fn parse(header: &str) -> Topic {
        const NAMES: [(&str, Topic); 9] = [
            ("LABEL_CREATED", Topic::LabelCreated),
            ("LABEL_UPDATED", Topic::LabelUpdated),
            ("LABEL_DELETED", Topic::LabelDeleted),
            ("WORKFLOW_ACTION", Topic::WorkflowAction),
            ("MOVE", Topic::WorkflowAction),
            ("REVIEW_CREATED", Topic::ReviewCreated),
            ("REVIEW_UPDATED", Topic::ReviewUpdated),
            ("REVIEW_DELETED", Topic::ReviewDeleted),
            ("MODEL_RUN", Topic::ModelRun),
        ];
        let header = header.trim();
        NAMES
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(header))
            .map_or(Topic::Unknown, |&(_, topic)| topic)
    }

    /// `false` only for [`Topic::Unknown`].
    /// The label metrics use for a raw topic header: its canonical name, or `unknown`, so that
    /// whatever a sender writes there cannot grow a metric without bound.
    pub fn metric_label(header: &str) -> &'static str {
        let topic = Topic::parse(header);
        if topic.is_known() {
            topic.as_str()
        } else {
            "unknown"
        }
    }

    pub fn is_known(&self) -> bool {
        *self != Topic::Unknown
    }

    /// The canonical topic string (`WORKFLOW_ACTION` for `MOVE`; `UNKNOWN` for unknown topics,
    /// whose real header value the caller keeps).
    pub fn as_str(&self) -> &'static str {
        match self {
            Topic::LabelCreated => "LABEL_CREATED",
            Topic::LabelUpdated => "LABEL_UPDATED",
            Topic::LabelDeleted => "LABEL_DELETED",
            Topic::WorkflowAction => "WORKFLOW_ACTION",
            Topic::ReviewCreated => "REVIEW_CREATED",
            Topic::ReviewUpdated => "REVIEW_UPDATED",
            Topic::ReviewDeleted => "REVIEW_DELETED",
            Topic::ModelRun => "MODEL_RUN",
            Topic::Unknown => "UNKNOWN",
        }
    }

    /// The kind of change a topic announces; topics that do not say are updates.
    pub(super) fn change(self) -> Change {
        match self {
            Topic::LabelCreated | Topic::ReviewCreated | Topic::ModelRun => Change::Created,
            Topic::LabelDeleted | Topic::ReviewDeleted => Change::Deleted,
            Topic::LabelUpdated | Topic::ReviewUpdated | Topic::WorkflowAction | Topic::Unknown => {
                Change::Updated
            }
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Labelbox event, typed: what a handler matches on. The raw body stays with the delivery
/// (`HandlerEvent::body`) for handlers that forward bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    LabelCreated(Label),
    LabelUpdated(Label),
    LabelDeleted(Label),
    /// `WORKFLOW_ACTION` (also sent as `MOVE`): a data row approved, rejected or moved between
    /// task queues.
    WorkflowAction(WorkflowAction),
    /// One of the legacy `REVIEW_*` topics.
    Review(Review),
    /// The model-training callback (`POST {model_training.path}/model_run`).
    ModelRun(ModelRun),
    /// An unknown topic, or a body that could not be read as its topic says: kept whole.
    Unknown(Unknown),
}

/// Which payload format a label event came in (LABELBOX.md 2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Shape {
    /// Legacy webhook: top-level `id`, `label` (a JSON string), `dataRow`, `project`.
    V1,
    /// UI-created webhook mimicking an export v2 row: top-level `data_row` and `projects`.
    ExportV2,
}

/// A label created, updated or deleted. The annotations themselves are not decoded here: ask
/// for them with [`label_content`] (they can be hundreds of MiB).
///
/// A v1 body is about one label. An export-shaped (v2) body is a snapshot of one data row in
/// one project, listing every label it has there: `label_id` is the one that changed last
/// (`None` when the snapshot lists none, as after the last one was deleted) and `label_ids`
/// all of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Label {
    pub label_id: Option<String>,
    /// Every label the body lists (v1: the one label).
    pub label_ids: Vec<String>,
    pub project_id: Option<String>,
    pub data_row_id: Option<String>,
    /// The data row's external id (the file name or key it was imported with).
    pub external_id: Option<String>,
    /// Who: v1 `user.email`, v2 `label_details.created_by`.
    pub user: Option<String>,
    pub created_at: Option<Version>,
    /// When: the label's last update, as Labelbox reports it.
    pub updated_at: Option<Version>,
    /// The v1 `deleted` flag when present (unverified whether it is `true` on LABEL_DELETED).
    pub deleted: Option<bool>,
    pub shape: Shape,
}

/// A workflow event. Its payload is undocumented, so every field is optional and read from
/// several plausible names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkflowAction {
    pub data_row_id: Option<String>,
    pub project_id: Option<String>,
    /// What happened last (v2: the newest `workflow_history` entry's `action`).
    pub action: Option<String>,
    /// The data row's workflow status after it (v2 `workflow_status`, e.g. `InReview`).
    pub workflow_status: Option<String>,
    /// Who did it (v2: the newest history entry's `created_by`).
    pub user: Option<String>,
    pub at: Option<Version>,
}

/// A legacy review event; no sample exists, so every field is optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Review {
    /// Created, updated or deleted, from the topic.
    pub change: Change,
    pub review_id: Option<String>,
    pub label_id: Option<String>,
    pub project_id: Option<String>,
    pub updated_at: Option<Version>,
}

/// The model-training callback: start training `model_type` for `model_run_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ModelRun {
    pub model_run_id: String,
    pub model_type: String,
    pub model_id: Option<String>,
}

/// A delivery that is not (or not readably) any of the known kinds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Unknown {
    /// The `X-Labelbox-Event` header as sent, when there was one.
    pub topic: Option<String>,
    /// Why a known topic's body could not be read (`None` for an unknown topic).
    pub reason: Option<String>,
}

impl Event {
    /// An event that is not one of the known kinds: an unknown `topic`, or a known one whose
    /// body could not be read (`reason`).
    pub fn unknown(topic: Option<&str>, reason: Option<String>) -> Event {
        Event::Unknown(Unknown {
            topic: topic.map(str::to_owned),
            reason,
        })
    }

    /// The label, for the three label events.
    pub fn label(&self) -> Option<&Label> {
        match self {
            Event::LabelCreated(l) | Event::LabelUpdated(l) | Event::LabelDeleted(l) => Some(l),
            _ => None,
        }
    }

    /// The data row the event is about, when it names one (label and workflow events).
    pub fn data_row_id(&self) -> Option<&str> {
        match self {
            Event::LabelCreated(l) | Event::LabelUpdated(l) | Event::LabelDeleted(l) => {
                l.data_row_id.as_deref()
            }
            Event::WorkflowAction(w) => w.data_row_id.as_deref(),
            _ => None,
        }
    }

    /// The labels a label event says its data row has: a v1 label its own (none once it is
    /// deleted), an export-shaped snapshot every label it lists. `None` for other events.
    pub fn labels_named(&self) -> Option<Vec<String>> {
        let label = self.label()?;
        Some(match (label.shape, self) {
            (Shape::ExportV2, _) => label.label_ids.clone(),
            (_, Event::LabelDeleted(_)) => Vec::new(),
            _ => label.label_id.iter().cloned().collect(),
        })
    }
}

/// A parsed delivery as the ordering gate sees it: the typed event, which entity it concerns,
/// and where it sits in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub topic: Topic,
    pub event: Event,
    /// Namespaced entity key for the ordering gate: `label:<id>` (v1 label events),
    /// `labels:<project>:<data row>` (export-shaped label snapshots), `workflow:<project>:<data
    /// row>`, `review:<id>`, `modelrun:<id>`; `None` when the event names no entity (it is then
    /// never gated).
    pub entity: Option<String>,
    /// Version for the ordering gate; `None` when the body has no usable timestamp.
    pub version: Option<Version>,
    pub change: Change,
    pub project_id: Option<String>,
}

/// Why a delivery could not be turned into an event. The messages name fields and positions
/// only, never body content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// The body is not a single valid JSON value.
    NotJson { line: usize, column: usize },
    /// A field needed to identify the event is absent, null or not a string.
    MissingField(&'static str),
    /// A timestamp the gate relies on is present but not RFC 3339.
    InvalidTimestamp(&'static str),
    /// The v1 `label` field does not hold JSON.
    LabelNotJson { line: usize, column: usize },
    /// Valid JSON that serde still refused (such as a duplicated key in an object we read).
    Malformed { line: usize, column: usize },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::NotJson { line, column } => {
                write!(f, "body is not valid JSON (line {line}, column {column})")
            }
            ParseError::MissingField(field) => write!(f, "missing field `{field}`"),
            ParseError::InvalidTimestamp(field) => {
                write!(f, "field `{field}` is not an RFC 3339 timestamp")
            }
            ParseError::LabelNotJson { line, column } => {
                write!(
                    f,
                    "field `label` does not hold valid JSON (line {line}, column {column})"
                )
            }
            ParseError::Malformed { line, column } => {
                write!(
                    f,
                    "body has an unexpected structure (line {line}, column {column})"
                )
            }
        }
    }
}

impl std::error::Error for ParseError {}

impl ParseError {
    /// Keeps only the position of a serde_json error: its message may quote body content.
    pub(super) fn from_json(err: &serde_json::Error) -> ParseError {
        let (line, column) = (err.line(), err.column());
        match err.classify() {
            serde_json::error::Category::Data => ParseError::Malformed { line, column },
            _ => ParseError::NotJson { line, column },
        }
    }
}

/// Parses an authenticated delivery. `topic` is the raw X-Labelbox-Event header value (None when
/// absent).
///
/// A missing topic is treated as unknown: whether that is acceptable is the ingress's call (a
/// model-run callback carries no topic header, so its route passes `Some("MODEL_RUN")`).
pub fn parse(topic: Option<&str>, body: &[u8]) -> Result<Parsed, ParseError> {
    bodies::parse(topic, body)
}

/// [`parse`] for a body read from `reader` (a stored body): the body is never held in memory
/// whole, and large values such as the `label` string are skipped as they stream past.
pub fn parse_reader<R: std::io::Read>(
    topic: Option<&str>,
    reader: R,
) -> Result<Parsed, ParseError> {
    bodies::parse(topic, bodies::Reader(reader))
}

/// The annotations of `label`, decoded: the v1 body's double-encoded `label` string, or the
/// v2 body's `annotations` of the label with this id. `body` is the delivery's body.
pub fn label_content(label: &Label, body: &[u8]) -> Result<serde_json::Value, ParseError> {
    bodies::label_content(label, body)
}

/// [`label_content`] for a body read from `reader`. The annotations are held in memory whole
/// (that is what decoding them means); the rest of the body streams past.
pub fn label_content_reader<R: std::io::Read>(
    label: &Label,
    reader: R,
) -> Result<serde_json::Value, ParseError> {
    bodies::label_content(label, bodies::Reader(reader))
}

#[cfg(test)]
// Panicking on an unexpected error is what a failing test should do.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn version(s: &str) -> Option<Version> {
        Version::parse_rfc3339(s)
    }

    /// The v1 `label` content, as a handler asks for it.
    fn decode_label(body: &[u8]) -> Result<serde_json::Value, ParseError> {
        let label = Label {
            label_id: Some("c1".to_owned()),
            label_ids: vec!["c1".to_owned()],
            project_id: None,
            data_row_id: None,
            external_id: None,
            user: None,
            created_at: None,
            updated_at: None,
            deleted: None,
            shape: Shape::V1,
        };
        label_content(&label, body)
    }

    fn label_of(event: &Parsed) -> &Label {
        match &event.event {
            Event::LabelCreated(l) | Event::LabelUpdated(l) | Event::LabelDeleted(l) => l,
            other => panic!("not a label event: {other:?}"),
        }
    }

    #[test]
    fn topic_parses_labelbox_strings_trimmed_and_case_insensitive() {
        assert_eq!(Topic::parse("LABEL_CREATED"), Topic::LabelCreated);
        assert_eq!(Topic::parse(" label_updated\t"), Topic::LabelUpdated);
        assert_eq!(Topic::parse("LABEL_DELETED"), Topic::LabelDeleted);
        assert_eq!(Topic::parse("REVIEW_CREATED"), Topic::ReviewCreated);
        assert_eq!(Topic::parse("REVIEW_UPDATED"), Topic::ReviewUpdated);
        assert_eq!(Topic::parse("REVIEW_DELETED"), Topic::ReviewDeleted);
        assert_eq!(Topic::parse("MODEL_RUN"), Topic::ModelRun);
        assert_eq!(Topic::parse("LABEL_CREATEDX"), Topic::Unknown);
        assert_eq!(Topic::parse(""), Topic::Unknown);
        assert!(!Topic::Unknown.is_known());
        assert!(Topic::ModelRun.is_known());
    }

    #[test]
    fn move_is_the_same_topic_as_workflow_action() {
        assert_eq!(Topic::parse("MOVE"), Topic::WorkflowAction);
        assert_eq!(Topic::parse("WORKFLOW_ACTION"), Topic::WorkflowAction);
        assert_eq!(Topic::parse("MOVE").as_str(), "WORKFLOW_ACTION");
        let body = include_bytes!("../../tests/fixtures/workflow_action.json");
        assert_eq!(
            parse(Some("MOVE"), body),
            parse(Some("WORKFLOW_ACTION"), body)
        );
    }

    #[test]
    fn topic_as_str_round_trips() {
        for topic in [
            Topic::LabelCreated,
            Topic::LabelUpdated,
            Topic::LabelDeleted,
            Topic::WorkflowAction,
            Topic::ReviewCreated,
            Topic::ReviewUpdated,
            Topic::ReviewDeleted,
            Topic::ModelRun,
        ] {
            assert_eq!(Topic::parse(topic.as_str()), topic);
        }
    }

    #[test]
    fn label_created_fixture_is_keyed_by_label_and_versioned_by_updated_at() {
        let body = include_bytes!("../../tests/fixtures/label_created.json");
        let event = parse(Some("LABEL_CREATED"), body).unwrap();
        assert_eq!(event.topic, Topic::LabelCreated);
        assert!(matches!(event.event, Event::LabelCreated(_)));
        assert_eq!(
            event.entity.as_deref(),
            Some("label:clv3k9x2a00013b6m8q7h4z1e")
        );
        assert_eq!(event.version, version("2024-05-01T10:00:00Z"));
        assert_eq!(event.change, Change::Created);
        assert_eq!(
            event.project_id.as_deref(),
            Some("clu8f2m1p000208l4c7ax9d3k")
        );
        let label = label_of(&event);
        assert_eq!(
            label.data_row_id.as_deref(),
            Some("clu9a7b3c000408jz2e5f6g7h")
        );
        assert_eq!(label.shape, Shape::V1);
    }

    #[test]
    fn label_updated_fixture_keeps_millisecond_version() {
        let body = include_bytes!("../../tests/fixtures/label_updated.json");
        let event = parse(Some("LABEL_UPDATED"), body).unwrap();
        assert_eq!(
            event.entity.as_deref(),
            Some("label:clv3k9x2a00013b6m8q7h4z1e")
        );
        assert_eq!(event.version, version("2024-05-02T08:30:12.345Z"));
        assert_eq!(
            event.version.map(Version::as_nanos),
            Some(1_714_638_612_345_000_000)
        );
        assert_eq!(event.change, Change::Updated);
        assert_eq!(
            event.project_id.as_deref(),
            Some("clu8f2m1p000208l4c7ax9d3k")
        );
        let label = label_of(&event);
        assert_eq!(label.created_at, version("2024-05-01T10:00:00Z"));
        assert_eq!(label.deleted, Some(false));
    }

    #[test]
    fn label_updated_whole_seconds_fixture_parses_without_fraction() {
        let body = include_bytes!("../../tests/fixtures/label_updated_whole_seconds.json");
        let event = parse(Some("LABEL_UPDATED"), body).unwrap();
        assert_eq!(
            event.entity.as_deref(),
            Some("label:clv3k9x2a00013b6m8q7h4z1e")
        );
        assert_eq!(
            event.version.map(Version::as_nanos),
            Some(1_714_638_612_000_000_000)
        );
    }

    #[test]
    fn label_deleted_fixture_is_a_delete() {
        let body = include_bytes!("../../tests/fixtures/label_deleted.json");
        let event = parse(Some("LABEL_DELETED"), body).unwrap();
        assert!(matches!(event.event, Event::LabelDeleted(_)));
        assert_eq!(event.change, Change::Deleted);
        assert_eq!(
            event.entity.as_deref(),
            Some("label:clv3k9x2a00013b6m8q7h4z1e")
        );
        assert_eq!(event.version, version("2024-05-03T14:05:59Z"));
        assert_eq!(label_of(&event).deleted, Some(true));
    }

    #[test]
    fn label_v2_export_fixture_is_a_snapshot_of_its_data_row_in_its_project() {
        let body = include_bytes!("../../tests/fixtures/label_updated_v2_export.json");
        let event = parse(Some("LABEL_UPDATED"), body).unwrap();
        let label = label_of(&event);
        assert_eq!(label.shape, Shape::ExportV2);
        assert_eq!(
            event.entity.as_deref(),
            Some("labels:clu8f2m1p000208l4c7ax9d3k:clu9a7b3c000408jz2e5f6g7h")
        );
        assert_eq!(label.label_id.as_deref(), Some("clw1n4r8s000a07mf3b2k6d9p"));
        assert_eq!(label.user.as_deref(), Some("labeler@example.com"));
        // The content's millisecond time, and the row's last activity (the same here).
        assert_eq!(event.version, version("2024-05-06T09:12:44.120Z"));
        assert_eq!(
            event.project_id.as_deref(),
            Some("clu8f2m1p000208l4c7ax9d3k")
        );
        assert_eq!(
            label.data_row_id.as_deref(),
            Some("clu9a7b3c000408jz2e5f6g7h")
        );
        assert_eq!(label.created_at, version("2024-05-06T09:10:01.003Z"));
    }

    #[test]
    fn an_export_shaped_workflow_is_keyed_by_project_and_data_row_and_versioned_by_its_newest_step()
    {
        let body = include_bytes!("../../tests/fixtures/workflow_action.json");
        let event = parse(Some("WORKFLOW_ACTION"), body).unwrap();
        assert_eq!(
            event.entity.as_deref(),
            Some("workflow:clu8f2m1p000208l4c7ax9d3k:clu9a7b3c000408jz2e5f6g7h")
        );
        assert_eq!(event.version, version("2024-05-06T09:20:31Z"));
        assert_eq!(event.change, Change::Updated);
        assert_eq!(
            event.project_id.as_deref(),
            Some("clu8f2m1p000208l4c7ax9d3k")
        );
        let Event::WorkflowAction(w) = &event.event else {
            panic!("not a workflow event: {:?}", event.event)
        };
        assert_eq!(w.action.as_deref(), Some("Approve"));
        assert_eq!(w.user.as_deref(), Some("reviewer@example.com"));
        assert_eq!(w.workflow_status.as_deref(), Some("Done"));
        assert_eq!(w.data_row_id.as_deref(), Some("clu9a7b3c000408jz2e5f6g7h"));
    }

    #[test]
    fn a_v2_snapshot_with_two_labels_is_about_the_one_that_changed_last() {
        let snapshot = |first_at: &str, second_at: &str| {
            format!(
                r#"{{"data_row": {{"id": "cdr"}}, "projects": {{"cpr": {{"labels": [
                    {{"id": "cl-one", "label_details": {{"updated_at": "{first_at}"}}}},
                    {{"id": "cl-two", "label_details": {{"content_last_updated_at": "{second_at}"}}}}
                ]}}}}}}"#
            )
        };
        let body = snapshot("2024-05-06T09:00:00Z", "2024-05-06T09:05:00.250Z");
        let event = parse(Some("LABEL_UPDATED"), body.as_bytes()).unwrap();
        let label = label_of(&event);
        assert_eq!(label.label_id.as_deref(), Some("cl-two"));
        assert_eq!(label.label_ids, ["cl-one", "cl-two"]);
        assert_eq!(event.entity.as_deref(), Some("labels:cpr:cdr"));
        assert_eq!(event.version, version("2024-05-06T09:05:00.250Z"));
        let body = snapshot("2024-05-06T09:10:00Z", "2024-05-06T09:05:00.250Z");
        let event = parse(Some("LABEL_UPDATED"), body.as_bytes()).unwrap();
        assert_eq!(label_of(&event).label_id.as_deref(), Some("cl-one"));
        assert_eq!(
            event.entity.as_deref(),
            Some("labels:cpr:cdr"),
            "one entity, both labels"
        );
    }

    #[test]
    fn a_v2_delete_that_left_no_label_keeps_its_project_and_is_not_final() {
        let body = include_bytes!("../../tests/fixtures/label_deleted_v2_export.json");
        let event = parse(Some("LABEL_DELETED"), body).unwrap();
        assert!(matches!(event.event, Event::LabelDeleted(_)));
        let label = label_of(&event);
        assert_eq!(label.label_id, None);
        assert!(label.label_ids.is_empty());
        assert_eq!(
            event.project_id.as_deref(),
            Some("clu8f2m1p000208l4c7ax9d3k")
        );
        // Ordered as an update: new labels may follow a snapshot without any.
        assert_eq!(event.change, Change::Updated);
        assert_eq!(event.version, version("2024-05-06T09:30:00Z"));
    }

    #[test]
    fn workflow_reads_alternative_field_names() {
        let body =
            br#"{"data_row_id": "cdr", "project_id": "cpr", "timestamp": "2024-05-04T16:20:07Z"}"#;
        let event = parse(Some("MOVE"), body).unwrap();
        assert_eq!(event.entity.as_deref(), Some("workflow:cpr:cdr"));
        assert_eq!(event.project_id.as_deref(), Some("cpr"));
        assert_eq!(event.version, version("2024-05-04T16:20:07Z"));
        let body = br#"{"data_row": {"id": "cdr2"}, "projectId": "cpr2", "createdAt": "bad"}"#;
        let event = parse(Some("MOVE"), body).unwrap();
        assert_eq!(event.entity.as_deref(), Some("workflow:cpr2:cdr2"));
        assert_eq!(event.project_id.as_deref(), Some("cpr2"));
        assert_eq!(event.version, None);
    }

    #[test]
    fn workflow_without_data_row_has_no_entity() {
        let event = parse(Some("WORKFLOW_ACTION"), br#"{"action": "MOVE"}"#).unwrap();
        assert_eq!(event.entity, None);
        assert_eq!(event.version, None);
    }

    #[test]
    fn review_fixture_is_keyed_by_review() {
        let body = include_bytes!("../../tests/fixtures/review_created.json");
        let event = parse(Some("REVIEW_CREATED"), body).unwrap();
        assert_eq!(
            event.entity.as_deref(),
            Some("review:clv5q2w8e000c3b6mz9y1x4t7")
        );
        assert_eq!(event.change, Change::Created);
        assert_eq!(event.version, version("2024-05-02T09:01:33Z"));
        assert_eq!(
            event.project_id.as_deref(),
            Some("clu8f2m1p000208l4c7ax9d3k")
        );
        let Event::Review(r) = &event.event else {
            panic!("not a review event: {:?}", event.event)
        };
        assert_eq!(r.label_id.as_deref(), Some("clv3k9x2a00013b6m8q7h4z1e"));
    }

    #[test]
    fn review_is_lenient_about_an_empty_body() {
        let event = parse(Some("REVIEW_DELETED"), b"{}").unwrap();
        assert_eq!(event.entity, None);
        assert_eq!(event.change, Change::Deleted);
    }

    #[test]
    fn model_run_fixture_is_keyed_by_model_run() {
        let body = include_bytes!("../../tests/fixtures/model_run.json");
        let event = parse(Some("MODEL_RUN"), body).unwrap();
        assert_eq!(
            event.entity.as_deref(),
            Some("modelrun:9da6c7e2-4b1f-4c3a-8e5d-2f7a6b1c0d93")
        );
        assert_eq!(event.version, None);
        assert_eq!(event.change, Change::Created);
        assert_eq!(
            event.event,
            Event::ModelRun(ModelRun {
                model_id: Some("3f1e2d4c-5b6a-4978-8a1b-0c9d8e7f6a5b".to_owned()),
                model_run_id: "9da6c7e2-4b1f-4c3a-8e5d-2f7a6b1c0d93".to_owned(),
                model_type: "image_single_classification".to_owned(),
            })
        );
    }

    #[test]
    fn model_run_requires_run_id_and_type() {
        assert_eq!(
            parse(Some("MODEL_RUN"), br#"{"modelType": "t"}"#),
            Err(ParseError::MissingField("modelRunId"))
        );
        assert_eq!(
            parse(
                Some("MODEL_RUN"),
                br#"{"modelRunId": "r", "modelType": null}"#
            ),
            Err(ParseError::MissingField("modelType"))
        );
    }

    #[test]
    fn unknown_topic_fixture_is_accepted_whole() {
        let body = include_bytes!("../../tests/fixtures/unknown_topic.json");
        let event = parse(Some("DATA_ROW_ARCHIVED"), body).unwrap();
        assert_eq!(event.topic, Topic::Unknown);
        assert!(
            matches!(event.event, Event::Unknown(_)),
            "{:?}",
            event.event
        );
        assert_eq!((event.entity, event.version), (None, None));
        assert_eq!(event.change, Change::Updated);
    }

    #[test]
    fn unknown_topic_accepts_any_json_value_and_missing_topic_is_unknown() {
        for body in [&b"[1, 2]"[..], b"\"text\"", b"null", b"42"] {
            assert_eq!(
                parse(Some("SOMETHING"), body).map(|e| e.event),
                Ok(Event::unknown(Some("SOMETHING"), None))
            );
        }
        assert_eq!(parse(None, b"{}").map(|e| e.topic), Ok(Topic::Unknown));
    }

    #[test]
    fn invalid_json_is_not_json_for_every_topic() {
        for topic in [
            None,
            Some("LABEL_UPDATED"),
            Some("MOVE"),
            Some("REVIEW_UPDATED"),
            Some("MODEL_RUN"),
            Some("X"),
        ] {
            for body in [&b""[..], b"{", b"{\"id\": }", b"{} {}", b"\xff"] {
                assert!(
                    matches!(parse(topic, body), Err(ParseError::NotJson { .. })),
                    "{topic:?} {body:?}"
                );
            }
        }
    }

    #[test]
    fn errors_do_not_echo_the_body() {
        let err = parse(Some("LABEL_UPDATED"), br#"{"id": "secret-value" "#).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        let err = decode_label(br#"{"label": "{\"secret-value"}"#).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn unknown_fields_and_odd_types_are_ignored() {
        let body = br#"{
            "id": "clabel",
            "brandNewField": {"nested": [1, 2, {"x": null}]},
            "updatedAt": "2024-05-02T08:30:12Z",
            "project": "not-an-object",
            "dataRow": [1, 2],
            "deleted": "nope",
            "label": "{\"objects\": []}"
        }"#;
        let event = parse(Some("LABEL_UPDATED"), body).unwrap();
        assert_eq!(event.entity.as_deref(), Some("label:clabel"));
        assert_eq!(event.project_id, None);
        let label = label_of(&event);
        assert_eq!((label.data_row_id.as_deref(), label.deleted), (None, None));
    }

    #[test]
    fn large_label_is_skipped_not_decoded() {
        // A 4 MB double-encoded label after the id: parse must still find the id and version.
        let inner = "{\\\"objects\\\":[]}".repeat(200_000);
        let body =
            format!(r#"{{"id": "c1", "label": "{inner}", "updatedAt": "2024-05-02T08:30:12Z"}}"#);
        let event = parse(Some("LABEL_UPDATED"), body.as_bytes()).unwrap();
        assert_eq!(event.entity.as_deref(), Some("label:c1"));
        assert_eq!(event.version, version("2024-05-02T08:30:12Z"));
    }

    #[test]
    fn missing_label_id_is_an_error() {
        for body in [
            &br#"{"updatedAt": "2024-05-02T08:30:12Z"}"#[..],
            br#"{"id": null}"#,
            b"[]",
        ] {
            assert_eq!(
                parse(Some("LABEL_UPDATED"), body),
                Err(ParseError::MissingField("id"))
            );
        }
        let v2 = br#"{"data_row": {"name": "x"}, "projects": {"cpr": {"labels": []}}}"#;
        assert_eq!(
            parse(Some("LABEL_CREATED"), v2),
            Err(ParseError::MissingField("data_row.id"))
        );
    }

    #[test]
    fn label_version_falls_back_to_created_at_and_rejects_bad_timestamps() {
        let body = br#"{"id": "c1", "createdAt": "2024-05-01T10:00:00Z"}"#;
        let event = parse(Some("LABEL_CREATED"), body).unwrap();
        assert_eq!(event.version, version("2024-05-01T10:00:00Z"));
        let body = br#"{"id": "c1"}"#;
        assert_eq!(
            parse(Some("LABEL_CREATED"), body).map(|e| e.version),
            Ok(None)
        );
        let body = br#"{"id": "c1", "updatedAt": "yesterday"}"#;
        assert_eq!(
            parse(Some("LABEL_UPDATED"), body),
            Err(ParseError::InvalidTimestamp("updatedAt"))
        );
    }

    #[test]
    fn label_versions_parse_with_and_without_fraction() {
        let at = |s: &str| {
            let body = format!(r#"{{"id": "c1", "updatedAt": "{s}"}}"#);
            parse(Some("LABEL_UPDATED"), body.as_bytes()).map(|e| e.version.map(Version::as_nanos))
        };
        assert_eq!(
            at("2024-05-02T08:30:12Z"),
            Ok(Some(1_714_638_612_000_000_000))
        );
        assert_eq!(
            at("2024-05-02T08:30:12.345Z"),
            Ok(Some(1_714_638_612_345_000_000))
        );
        assert_eq!(
            at("2024-05-02T10:30:12.345+02:00"),
            Ok(Some(1_714_638_612_345_000_000))
        );
    }

    #[test]
    fn decode_label_decodes_the_double_encoded_string() {
        let body = include_bytes!("../../tests/fixtures/label_updated.json");
        let label = decode_label(body).unwrap();
        assert_eq!(label["objects"][0]["title"], "car");
        assert_eq!(label["classifications"][0]["answer"]["title"], "day");
        // Already-decoded labels are accepted as they are.
        let label = decode_label(br#"{"label": {"objects": []}}"#).unwrap();
        assert_eq!(label, serde_json::json!({"objects": []}));
    }

    #[test]
    fn decode_label_reports_missing_or_broken_labels() {
        assert_eq!(
            decode_label(br#"{"id": "c1"}"#),
            Err(ParseError::MissingField("label"))
        );
        assert_eq!(
            decode_label(br#"{"label": null}"#),
            Err(ParseError::MissingField("label"))
        );
        assert!(matches!(
            decode_label(br#"{"label": "not json"}"#),
            Err(ParseError::LabelNotJson { .. })
        ));
        assert!(matches!(
            decode_label(b"{"),
            Err(ParseError::NotJson { .. })
        ));
    }
}
