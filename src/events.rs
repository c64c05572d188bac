//! Typed events: turns an authenticated delivery (topic header + raw body) into an [`Event`]
//! with its entity key, version and kind of change, ready for the ordering gate.
//!
//! Pure on purpose (no I/O, no async) so it can be fuzzed and property-tested.
//!
//! Rules of thumb:
//! - Unknown fields are never an error, and fields of an unexpected type are treated as absent:
//!   Labelbox documents little of its payloads (see LABELBOX.md section 3), so only what
//!   identifies and orders an event is required (a label id, a model run id and type).
//! - Bodies may be hundreds of MB, so nothing here builds a `serde_json::Value` of a body. The
//!   structs below read a handful of fields and skip everything else with `IgnoredAny`, which
//!   serde_json scans without allocating. The double-encoded v1 `label` string is skipped too and
//!   decoded only on request by [`decode_label`].
//! - Error messages never echo the body (it may hold signed URLs or personal data): only a
//!   field name or a line and column.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::ordering::{Change, Version};

/// A webhook topic, from the `X-Labelbox-Event` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    fn change(self) -> Change {
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

/// A parsed delivery: what it is, which entity it concerns and where it sits in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub topic: Topic,
    pub kind: EventKind,
    /// Namespaced entity key for the ordering gate (`label:<id>`, `datarow:<id>`, `review:<id>`,
    /// `modelrun:<id>`); `None` when the event names no entity (it is then never gated).
    pub entity: Option<String>,
    /// Version for the ordering gate; `None` when the body has no usable timestamp.
    pub version: Option<Version>,
    pub change: Change,
    pub project_id: Option<String>,
}

impl Event {
    /// Project the event belongs to, when the body names one (used by routes).
    pub fn project_id(&self) -> Option<&str> {
        self.project_id.as_deref()
    }

    /// Entity key for the ordering gate.
    pub fn entity(&self) -> Option<&str> {
        self.entity.as_deref()
    }
}

/// The typed payload of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    LabelCreated(LabelEvent),
    LabelUpdated(LabelEvent),
    LabelDeleted(LabelEvent),
    WorkflowAction(WorkflowEvent),
    /// Any of the three legacy review topics; [`Event::topic`] says which.
    Review(ReviewEvent),
    ModelRunTraining(ModelRunEvent),
    /// An unknown topic: the body is valid JSON and kept whole by the store.
    Unknown,
}

/// Which payload format a label event came in (LABELBOX.md 2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// Legacy webhook: top-level `id`, `label` (a JSON string), `dataRow`, `project`.
    V1,
    /// UI-created webhook mimicking an export v2 row: top-level `data_row` and `projects`.
    ExportV2,
}

/// A label event. The annotations themselves are not decoded here (see [`decode_label`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelEvent {
    pub label_id: String,
    pub data_row_id: Option<String>,
    pub project_id: Option<String>,
    pub created_at: Option<Version>,
    pub updated_at: Option<Version>,
    /// The v1 `deleted` flag when present (unverified whether it is `true` on LABEL_DELETED).
    pub deleted: Option<bool>,
    pub shape: Shape,
}

/// A workflow event (a data row approved, rejected or moved between task queues). Its payload
/// is undocumented, so every field is optional and read from several plausible names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowEvent {
    pub data_row_id: Option<String>,
    pub project_id: Option<String>,
    pub action: Option<String>,
    pub at: Option<Version>,
}

/// A legacy review event; no sample exists, so every field is optional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewEvent {
    pub review_id: Option<String>,
    pub label_id: Option<String>,
    pub project_id: Option<String>,
    pub updated_at: Option<Version>,
}

/// The model-training callback: start training `model_type` for `model_run_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRunEvent {
    pub model_id: Option<String>,
    pub model_run_id: String,
    pub model_type: String,
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
    fn from_json(err: &serde_json::Error) -> ParseError {
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
pub fn parse(topic: Option<&str>, body: &[u8]) -> Result<Event, ParseError> {
    parse_from(topic, body)
}

/// [`parse`] for a body read from `reader` (a blob file): the body is never held in memory
/// whole, and large values such as the `label` string are skipped as they stream past.
pub fn parse_reader<R: std::io::Read>(topic: Option<&str>, reader: R) -> Result<Event, ParseError> {
    parse_from(topic, Reader(reader))
}

/// Where a body comes from: a slice in memory, or a reader.
trait BodySource {
    fn read<T: serde::de::DeserializeOwned>(self) -> Result<T, ParseError>;
}

impl BodySource for &[u8] {
    fn read<T: serde::de::DeserializeOwned>(self) -> Result<T, ParseError> {
        serde_json::from_slice(self).map_err(|e| ParseError::from_json(&e))
    }
}

struct Reader<R>(R);

impl<R: std::io::Read> BodySource for Reader<R> {
    fn read<T: serde::de::DeserializeOwned>(self) -> Result<T, ParseError> {
        serde_json::from_reader(self.0).map_err(|e| ParseError::from_json(&e))
    }
}

fn parse_from(topic: Option<&str>, body: impl BodySource) -> Result<Event, ParseError> {
    let topic = topic.map_or(Topic::Unknown, Topic::parse);
    match topic {
        Topic::LabelCreated | Topic::LabelUpdated | Topic::LabelDeleted => parse_label(topic, body),
        Topic::WorkflowAction => parse_workflow(body),
        Topic::ReviewCreated | Topic::ReviewUpdated | Topic::ReviewDeleted => {
            parse_review(topic, body)
        }
        Topic::ModelRun => parse_model_run(body),
        Topic::Unknown => {
            // Any JSON value will do; IgnoredAny validates it without building it.
            body.read::<IgnoredAny>()?;
            Ok(Event {
                topic,
                kind: EventKind::Unknown,
                entity: None,
                version: None,
                change: Change::Updated,
                project_id: None,
            })
        }
    }
}

/// Decodes the double-encoded v1 `label` field (a string holding JSON) into JSON, for handlers
/// that need the annotations. A `label` that is already a JSON object or array is returned as is.
pub fn decode_label(body: &[u8]) -> Result<serde_json::Value, ParseError> {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        label: Option<&'a RawValue>,
    }
    let raw = from_body::<Obj<Body<'_>>>(body)?
        .0
        .and_then(|b| b.label)
        .ok_or(ParseError::MissingField("label"))?;
    let label_error = |e: serde_json::Error| ParseError::LabelNotJson {
        line: e.line(),
        column: e.column(),
    };
    match serde_json::from_str::<serde_json::Value>(raw.get()).map_err(label_error)? {
        serde_json::Value::String(inner) => serde_json::from_str(&inner).map_err(label_error),
        serde_json::Value::Null => Err(ParseError::MissingField("label")),
        value => Ok(value),
    }
}

fn from_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ParseError> {
    serde_json::from_slice(body).map_err(|e| ParseError::from_json(&e))
}

/// Parses a timestamp that orders events: absent is fine, present but unreadable is an error,
/// because silently treating it as versionless would let an old event overwrite a newer one.
fn strict_version(value: Option<&str>, field: &'static str) -> Result<Option<Version>, ParseError> {
    value
        .map(|s| Version::parse_rfc3339(s).ok_or(ParseError::InvalidTimestamp(field)))
        .transpose()
}

/// The first readable timestamp among candidates, for lenient (undocumented) payloads.
fn lenient_version(candidates: &[&OptStr]) -> Option<Version> {
    candidates
        .iter()
        .find_map(|c| c.0.as_deref().and_then(Version::parse_rfc3339))
}

fn first_id(candidates: &[&OptStr]) -> Option<String> {
    candidates.iter().find_map(|c| c.0.clone())
}

// ---- Label events ----------------------------------------------------------------------------

/// Both label shapes in one pass: the v2 fields are simply absent from a v1 body and vice versa.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct LabelBody {
    id: OptStr,
    #[serde(rename = "createdAt")]
    created_at: OptStr,
    #[serde(rename = "updatedAt")]
    updated_at: OptStr,
    deleted: OptBool,
    project: Obj<IdOnly>,
    #[serde(rename = "dataRow")]
    data_row_v1: Obj<IdOnly>,
    data_row: Obj<IdOnly>,
    projects: FirstEntry<Obj<ExportProject>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ExportProject {
    labels: First<Obj<ExportLabel>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ExportLabel {
    id: OptStr,
    label_details: Obj<ExportLabelDetails>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ExportLabelDetails {
    created_at: OptStr,
    updated_at: OptStr,
}

fn parse_label(topic: Topic, body: impl BodySource) -> Result<Event, ParseError> {
    let body = body.read::<Obj<LabelBody>>()?.0.unwrap_or_default();
    // Detected by shape because no header says which format a webhook uses (LABELBOX.md 2.5).
    let is_v2 = body.data_row.0.is_some() && body.projects.0.is_some();
    let label = if is_v2 {
        let (project_id, project) = body.projects.0.unwrap_or_default();
        let first = project
            .0
            .and_then(|p| p.labels.0)
            .and_then(|l| l.0)
            .unwrap_or_default();
        let details = first.label_details.0.unwrap_or_default();
        LabelEvent {
            label_id: first
                .id
                .0
                .ok_or(ParseError::MissingField("projects.*.labels[0].id"))?,
            data_row_id: body.data_row.0.and_then(|d| d.id.0),
            project_id: Some(project_id),
            created_at: strict_version(
                details.created_at.0.as_deref(),
                "label_details.created_at",
            )?,
            updated_at: strict_version(
                details.updated_at.0.as_deref(),
                "label_details.updated_at",
            )?,
            deleted: None,
            shape: Shape::ExportV2,
        }
    } else {
        LabelEvent {
            label_id: body.id.0.ok_or(ParseError::MissingField("id"))?,
            data_row_id: body.data_row_v1.0.and_then(|d| d.id.0),
            project_id: body.project.0.and_then(|p| p.id.0),
            created_at: strict_version(body.created_at.0.as_deref(), "createdAt")?,
            updated_at: strict_version(body.updated_at.0.as_deref(), "updatedAt")?,
            deleted: body.deleted.0,
            shape: Shape::V1,
        }
    };
    let entity = Some(format!("label:{}", label.label_id));
    // updatedAt orders label changes; createdAt stands in when a body has no update time.
    let version = label.updated_at.or(label.created_at);
    let project_id = label.project_id.clone();
    let change = topic.change();
    let kind = match change {
        Change::Created => EventKind::LabelCreated(label),
        Change::Updated => EventKind::LabelUpdated(label),
        Change::Deleted => EventKind::LabelDeleted(label),
    };
    Ok(Event {
        topic,
        kind,
        entity,
        version,
        change,
        project_id,
    })
}

// ---- Workflow events -------------------------------------------------------------------------

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WorkflowBody {
    #[serde(rename = "dataRow")]
    data_row_obj_camel: Obj<IdOnly>,
    #[serde(rename = "data_row")]
    data_row_obj_snake: Obj<IdOnly>,
    #[serde(rename = "dataRowId")]
    data_row_id_camel: OptStr,
    data_row_id: OptStr,
    #[serde(rename = "updatedAt")]
    updated_at_camel: OptStr,
    updated_at: OptStr,
    timestamp: OptStr,
    #[serde(rename = "createdAt")]
    created_at_camel: OptStr,
    created_at: OptStr,
    project: Obj<IdOnly>,
    #[serde(rename = "projectId")]
    project_id_camel: OptStr,
    project_id: OptStr,
    action: OptStr,
}

fn parse_workflow(body: impl BodySource) -> Result<Event, ParseError> {
    let b = body.read::<Obj<WorkflowBody>>()?.0.unwrap_or_default();
    let camel = b.data_row_obj_camel.0.map(|d| d.id).unwrap_or_default();
    let snake = b.data_row_obj_snake.0.map(|d| d.id).unwrap_or_default();
    let data_row_id = first_id(&[&camel, &snake, &b.data_row_id_camel, &b.data_row_id]);
    let project = b.project.0.map(|p| p.id).unwrap_or_default();
    let project_id = first_id(&[&project, &b.project_id_camel, &b.project_id]);
    // An update time, when there is one, is preferred over a creation time: if the body turns
    // out to describe the data row rather than the action, its createdAt never moves and would
    // tie every event, while updatedAt still orders them.
    let at = lenient_version(&[
        &b.updated_at_camel,
        &b.updated_at,
        &b.timestamp,
        &b.created_at_camel,
        &b.created_at,
    ]);
    Ok(Event {
        topic: Topic::WorkflowAction,
        entity: data_row_id.as_ref().map(|id| format!("datarow:{id}")),
        version: at,
        change: Change::Updated,
        project_id: project_id.clone(),
        kind: EventKind::WorkflowAction(WorkflowEvent {
            data_row_id,
            project_id,
            action: b.action.0,
            at,
        }),
    })
}

// ---- Review events ---------------------------------------------------------------------------

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ReviewBody {
    id: OptStr,
    label: Obj<IdOnly>,
    #[serde(rename = "labelId")]
    label_id: OptStr,
    project: Obj<IdOnly>,
    #[serde(rename = "projectId")]
    project_id_camel: OptStr,
    project_id: OptStr,
    #[serde(rename = "updatedAt")]
    updated_at: OptStr,
    #[serde(rename = "createdAt")]
    created_at: OptStr,
}

fn parse_review(topic: Topic, body: impl BodySource) -> Result<Event, ParseError> {
    let b = body.read::<Obj<ReviewBody>>()?.0.unwrap_or_default();
    let label = b.label.0.map(|l| l.id).unwrap_or_default();
    let project = b.project.0.map(|p| p.id).unwrap_or_default();
    let project_id = first_id(&[&project, &b.project_id_camel, &b.project_id]);
    let updated_at = lenient_version(&[&b.updated_at, &b.created_at]);
    let review_id = b.id.0;
    Ok(Event {
        topic,
        entity: review_id.as_ref().map(|id| format!("review:{id}")),
        version: updated_at,
        change: topic.change(),
        project_id: project_id.clone(),
        kind: EventKind::Review(ReviewEvent {
            review_id,
            label_id: first_id(&[&label, &b.label_id]),
            project_id,
            updated_at,
        }),
    })
}

// ---- Model-run callback ----------------------------------------------------------------------

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ModelRunBody {
    #[serde(rename = "modelId")]
    model_id: OptStr,
    #[serde(rename = "modelRunId")]
    model_run_id: OptStr,
    #[serde(rename = "modelType")]
    model_type: OptStr,
}

fn parse_model_run(body: impl BodySource) -> Result<Event, ParseError> {
    let b = body.read::<Obj<ModelRunBody>>()?.0.unwrap_or_default();
    // Both are required by Labelbox's own reference receiver (LABELBOX.md 3.5).
    let model_run_id = b
        .model_run_id
        .0
        .ok_or(ParseError::MissingField("modelRunId"))?;
    let model_type = b
        .model_type
        .0
        .ok_or(ParseError::MissingField("modelType"))?;
    Ok(Event {
        topic: Topic::ModelRun,
        entity: Some(format!("modelrun:{model_run_id}")),
        // A training request is a one-off command, not a versioned state.
        version: None,
        change: Change::Created,
        project_id: None,
        kind: EventKind::ModelRunTraining(ModelRunEvent {
            model_id: b.model_id.0,
            model_run_id,
            model_type,
        }),
    })
}

// ---- Lenient building blocks -----------------------------------------------------------------
//
// Each wrapper accepts any JSON value: the expected kind is read, anything else is skipped
// (without allocating) and read as absent, so an odd type in an undocumented payload never fails
// the whole delivery. They all drive serde_json through `deserialize_any`.

/// Generates the visitor methods that skip a value of the wrong kind and yield `Default`.
macro_rules! skip_other_kinds {
    ($($method:ident($ty:ty)),*) => {
        $(fn $method<E: de::Error>(self, _: $ty) -> Result<Self::Value, E> {
            Ok(Default::default())
        })*
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
    };
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// A string (or a number, rendered as a string: ids are opaque); `None` for anything else.
#[derive(Debug, Default)]
struct OptStr(Option<String>);

impl<'de> Deserialize<'de> for OptStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OptStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<OptStr, E> {
                Ok(OptStr(Some(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<OptStr, E> {
                Ok(OptStr(Some(s)))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<OptStr, E> {
                Ok(OptStr(Some(n.to_string())))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<OptStr, E> {
                Ok(OptStr(Some(n.to_string())))
            }
            skip_other_kinds!(visit_bool(bool), visit_f64(f64));
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<OptStr, A::Error> {
                skip_map(map).map(|()| OptStr(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<OptStr, A::Error> {
                skip_seq(seq).map(|()| OptStr(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// A boolean; `None` for anything else.
#[derive(Debug, Default)]
struct OptBool(Option<bool>);

impl<'de> Deserialize<'de> for OptBool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OptBool;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
                Ok(OptBool(Some(b)))
            }
            skip_other_kinds!(
                visit_str(&str),
                visit_i64(i64),
                visit_u64(u64),
                visit_f64(f64)
            );
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                skip_map(map).map(|()| OptBool(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                skip_seq(seq).map(|()| OptBool(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// A JSON object read as `T` (a struct of lenient fields); `None` for anything else.
#[derive(Debug)]
struct Obj<T>(Option<T>);

impl<T> Default for Obj<T> {
    fn default() -> Self {
        Obj(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(|t| Obj(Some(t)))
            }
            skip_other_kinds!(
                visit_str(&str),
                visit_bool(bool),
                visit_i64(i64),
                visit_u64(u64),
                visit_f64(f64)
            );
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Obj<T>, A::Error> {
                skip_seq(seq).map(|()| Obj(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// The first element of a JSON array (the rest skipped); `None` for an empty array or anything
/// else.
#[derive(Debug)]
struct First<T>(Option<T>);

impl<T> Default for First<T> {
    fn default() -> Self {
        First(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for First<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = First<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<First<T>, A::Error> {
                let first = seq.next_element::<T>()?;
                skip_seq(seq).map(|()| First(first))
            }
            skip_other_kinds!(
                visit_str(&str),
                visit_bool(bool),
                visit_i64(i64),
                visit_u64(u64),
                visit_f64(f64)
            );
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<First<T>, A::Error> {
                skip_map(map).map(|()| First(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// The first entry of a JSON object as (key, value), the rest skipped; `None` for an empty
/// object or anything else. Used for the v2 `projects` map, keyed by project id.
#[derive(Debug)]
struct FirstEntry<T>(Option<(String, T)>);

impl<T> Default for FirstEntry<T> {
    fn default() -> Self {
        FirstEntry(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for FirstEntry<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = FirstEntry<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FirstEntry<T>, A::Error> {
                let first = map.next_entry::<String, T>()?;
                skip_map(map).map(|()| FirstEntry(first))
            }
            skip_other_kinds!(
                visit_str(&str),
                visit_bool(bool),
                visit_i64(i64),
                visit_u64(u64),
                visit_f64(f64)
            );
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<FirstEntry<T>, A::Error> {
                skip_seq(seq).map(|()| FirstEntry(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// An object of which only `id` matters (`project`, `dataRow`, `label`, ...).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct IdOnly {
    id: OptStr,
}

#[cfg(test)]
// Panicking on an unexpected error is what a failing test should do.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn version(s: &str) -> Option<Version> {
        Version::parse_rfc3339(s)
    }

    fn label_of(event: &Event) -> &LabelEvent {
        match &event.kind {
            EventKind::LabelCreated(l)
            | EventKind::LabelUpdated(l)
            | EventKind::LabelDeleted(l) => l,
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
        let body = include_bytes!("../tests/fixtures/workflow_action.json");
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
        let body = include_bytes!("../tests/fixtures/label_created.json");
        let event = parse(Some("LABEL_CREATED"), body).unwrap();
        assert_eq!(event.topic, Topic::LabelCreated);
        assert!(matches!(event.kind, EventKind::LabelCreated(_)));
        assert_eq!(event.entity(), Some("label:clv3k9x2a00013b6m8q7h4z1e"));
        assert_eq!(event.version, version("2024-05-01T10:00:00Z"));
        assert_eq!(event.change, Change::Created);
        assert_eq!(event.project_id(), Some("clu8f2m1p000208l4c7ax9d3k"));
        let label = label_of(&event);
        assert_eq!(
            label.data_row_id.as_deref(),
            Some("clu9a7b3c000408jz2e5f6g7h")
        );
        assert_eq!(label.shape, Shape::V1);
    }

    #[test]
    fn label_updated_fixture_keeps_millisecond_version() {
        let body = include_bytes!("../tests/fixtures/label_updated.json");
        let event = parse(Some("LABEL_UPDATED"), body).unwrap();
        assert_eq!(event.entity(), Some("label:clv3k9x2a00013b6m8q7h4z1e"));
        assert_eq!(event.version, version("2024-05-02T08:30:12.345Z"));
        assert_eq!(
            event.version.map(Version::as_nanos),
            Some(1_714_638_612_345_000_000)
        );
        assert_eq!(event.change, Change::Updated);
        assert_eq!(event.project_id(), Some("clu8f2m1p000208l4c7ax9d3k"));
        let label = label_of(&event);
        assert_eq!(label.created_at, version("2024-05-01T10:00:00Z"));
        assert_eq!(label.deleted, Some(false));
    }

    #[test]
    fn label_updated_whole_seconds_fixture_parses_without_fraction() {
        let body = include_bytes!("../tests/fixtures/label_updated_whole_seconds.json");
        let event = parse(Some("LABEL_UPDATED"), body).unwrap();
        assert_eq!(event.entity(), Some("label:clv3k9x2a00013b6m8q7h4z1e"));
        assert_eq!(
            event.version.map(Version::as_nanos),
            Some(1_714_638_612_000_000_000)
        );
    }

    #[test]
    fn label_deleted_fixture_is_a_delete() {
        let body = include_bytes!("../tests/fixtures/label_deleted.json");
        let event = parse(Some("LABEL_DELETED"), body).unwrap();
        assert!(matches!(event.kind, EventKind::LabelDeleted(_)));
        assert_eq!(event.change, Change::Deleted);
        assert_eq!(event.entity(), Some("label:clv3k9x2a00013b6m8q7h4z1e"));
        assert_eq!(event.version, version("2024-05-03T14:05:59Z"));
        assert_eq!(label_of(&event).deleted, Some(true));
    }

    #[test]
    fn label_v2_export_fixture_is_recognised_by_shape() {
        let body = include_bytes!("../tests/fixtures/label_updated_v2_export.json");
        let event = parse(Some("LABEL_UPDATED"), body).unwrap();
        let label = label_of(&event);
        assert_eq!(label.shape, Shape::ExportV2);
        assert_eq!(event.entity(), Some("label:clw1n4r8s000a07mf3b2k6d9p"));
        assert_eq!(event.version, version("2024-05-06T09:12:44.120Z"));
        assert_eq!(event.project_id(), Some("clu8f2m1p000208l4c7ax9d3k"));
        assert_eq!(
            label.data_row_id.as_deref(),
            Some("clu9a7b3c000408jz2e5f6g7h")
        );
        assert_eq!(label.created_at, version("2024-05-06T09:10:01.003Z"));
    }

    #[test]
    fn workflow_fixture_is_keyed_by_data_row() {
        let body = include_bytes!("../tests/fixtures/workflow_action.json");
        let event = parse(Some("WORKFLOW_ACTION"), body).unwrap();
        assert_eq!(event.entity(), Some("datarow:clu9a7b3c000408jz2e5f6g7h"));
        assert_eq!(event.version, version("2024-05-04T16:20:07.512Z"));
        assert_eq!(event.change, Change::Updated);
        assert_eq!(event.project_id(), Some("clu8f2m1p000208l4c7ax9d3k"));
        let EventKind::WorkflowAction(w) = &event.kind else {
            panic!("not a workflow event: {:?}", event.kind)
        };
        assert_eq!(w.action.as_deref(), Some("APPROVE"));
    }

    #[test]
    fn workflow_reads_alternative_field_names() {
        let body =
            br#"{"data_row_id": "cdr", "project_id": "cpr", "timestamp": "2024-05-04T16:20:07Z"}"#;
        let event = parse(Some("MOVE"), body).unwrap();
        assert_eq!(event.entity(), Some("datarow:cdr"));
        assert_eq!(event.project_id(), Some("cpr"));
        assert_eq!(event.version, version("2024-05-04T16:20:07Z"));
        let body = br#"{"data_row": {"id": "cdr2"}, "projectId": "cpr2", "createdAt": "bad"}"#;
        let event = parse(Some("MOVE"), body).unwrap();
        assert_eq!(event.entity(), Some("datarow:cdr2"));
        assert_eq!(event.project_id(), Some("cpr2"));
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
        let body = include_bytes!("../tests/fixtures/review_created.json");
        let event = parse(Some("REVIEW_CREATED"), body).unwrap();
        assert_eq!(event.entity(), Some("review:clv5q2w8e000c3b6mz9y1x4t7"));
        assert_eq!(event.change, Change::Created);
        assert_eq!(event.version, version("2024-05-02T09:01:33Z"));
        assert_eq!(event.project_id(), Some("clu8f2m1p000208l4c7ax9d3k"));
        let EventKind::Review(r) = &event.kind else {
            panic!("not a review event: {:?}", event.kind)
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
        let body = include_bytes!("../tests/fixtures/model_run.json");
        let event = parse(Some("MODEL_RUN"), body).unwrap();
        assert_eq!(
            event.entity(),
            Some("modelrun:9da6c7e2-4b1f-4c3a-8e5d-2f7a6b1c0d93")
        );
        assert_eq!(event.version, None);
        assert_eq!(event.change, Change::Created);
        assert_eq!(
            event.kind,
            EventKind::ModelRunTraining(ModelRunEvent {
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
        let body = include_bytes!("../tests/fixtures/unknown_topic.json");
        let event = parse(Some("DATA_ROW_ARCHIVED"), body).unwrap();
        assert_eq!(event.topic, Topic::Unknown);
        assert_eq!(event.kind, EventKind::Unknown);
        assert_eq!((event.entity, event.version), (None, None));
        assert_eq!(event.change, Change::Updated);
    }

    #[test]
    fn unknown_topic_accepts_any_json_value_and_missing_topic_is_unknown() {
        for body in [&b"[1, 2]"[..], b"\"text\"", b"null", b"42"] {
            assert_eq!(
                parse(Some("SOMETHING"), body).map(|e| e.kind),
                Ok(EventKind::Unknown)
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
        assert_eq!(event.entity(), Some("label:clabel"));
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
        assert_eq!(event.entity(), Some("label:c1"));
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
        let v2 = br#"{"data_row": {"id": "cdr"}, "projects": {"cpr": {"labels": []}}}"#;
        assert_eq!(
            parse(Some("LABEL_CREATED"), v2),
            Err(ParseError::MissingField("projects.*.labels[0].id"))
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
        let body = include_bytes!("../tests/fixtures/label_updated.json");
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
