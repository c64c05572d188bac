//! Reading each topic's body: a handful of fields picked out of the JSON (the rest skipped as
//! it streams past), turned into the typed [`Event`] and the gate's view of it ([`Parsed`]).

use serde::de::IgnoredAny;
use serde_json::value::RawValue;

use super::lenient::{FirstEntry, IdOnly, Many, Obj, OptBool, OptStr};
use super::{
    Event, Label, ModelRun, ParseError, Parsed, Review, Shape, Topic, Unknown, WorkflowAction,
};
use crate::ordering::{Change, Version};

/// Where a body comes from: a slice in memory, or a reader.
pub(super) trait BodySource {
    fn read<T: serde::de::DeserializeOwned>(self) -> Result<T, ParseError>;
}

impl BodySource for &[u8] {
    fn read<T: serde::de::DeserializeOwned>(self) -> Result<T, ParseError> {
        serde_json::from_slice(self).map_err(|e| ParseError::from_json(&e))
    }
}

/// A body read from an `io::Read`.
pub(super) struct Reader<R>(pub(super) R);

impl<R: std::io::Read> BodySource for Reader<R> {
    fn read<T: serde::de::DeserializeOwned>(self) -> Result<T, ParseError> {
        serde_json::from_reader(self.0).map_err(|e| ParseError::from_json(&e))
    }
}

pub(super) fn parse(topic: Option<&str>, body: impl BodySource) -> Result<Parsed, ParseError> {
    let parsed_topic = topic.map_or(Topic::Unknown, Topic::parse);
    match parsed_topic {
        Topic::LabelCreated | Topic::LabelUpdated | Topic::LabelDeleted => {
            parse_label(parsed_topic, body)
        }
        Topic::WorkflowAction => parse_workflow(body),
        Topic::ReviewCreated | Topic::ReviewUpdated | Topic::ReviewDeleted => {
            parse_review(parsed_topic, body)
        }
        Topic::ModelRun => parse_model_run(body),
        Topic::Unknown => {
            // Any JSON value will do; IgnoredAny validates it without building it.
            body.read::<IgnoredAny>()?;
            Ok(Parsed {
                topic: parsed_topic,
                event: Event::Unknown(Unknown {
                    topic: topic.map(str::to_owned),
                    reason: None,
                }),
                entity: None,
                version: None,
                change: Change::Updated,
                project_id: None,
            })
        }
    }
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
    data_row_v1: Obj<DataRowV1>,
    user: Obj<UserV1>,
    data_row: Obj<DataRowV2>,
    projects: FirstEntry<Obj<ExportProject>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct DataRowV1 {
    id: OptStr,
    #[serde(rename = "externalId")]
    external_id: OptStr,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct UserV1 {
    email: OptStr,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct DataRowV2 {
    id: OptStr,
    external_id: OptStr,
    details: Obj<DataRowDetails>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct DataRowDetails {
    last_activity_at: OptStr,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ExportProject {
    labels: Many<Obj<ExportLabel>>,
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
    content_last_updated_at: OptStr,
    created_by: OptStr,
}

/// One label of a v2 snapshot, read.
struct SnapshotLabel {
    id: String,
    created_at: Option<Version>,
    updated_at: Option<Version>,
    /// When its content last changed: `content_last_updated_at` (milliseconds, fewer ties)
    /// when given, else `updated_at` (whole seconds).
    active_at: Option<Version>,
    user: Option<String>,
}

fn snapshot_label(label: ExportLabel) -> Result<Option<SnapshotLabel>, ParseError> {
    let Some(id) = label.id.0 else {
        return Ok(None);
    };
    let details = label.label_details.0.unwrap_or_default();
    let updated_at = strict_version(details.updated_at.0.as_deref(), "label_details.updated_at")?;
    let content_at = strict_version(
        details.content_last_updated_at.0.as_deref(),
        "label_details.content_last_updated_at",
    )?;
    Ok(Some(SnapshotLabel {
        id,
        created_at: strict_version(details.created_at.0.as_deref(), "label_details.created_at")?,
        updated_at,
        active_at: content_at.or(updated_at),
        user: details.created_by.0,
    }))
}

fn parse_label(topic: Topic, body: impl BodySource) -> Result<Parsed, ParseError> {
    let body = body.read::<Obj<LabelBody>>()?.0.unwrap_or_default();
    // Detected by shape because no header says which format a webhook uses (LABELBOX.md 2.5).
    let is_v2 = body.data_row.0.is_some() && body.projects.0.is_some();
    let change = topic.change();
    let (label, entity, version, change) = if is_v2 {
        let (project_id, project) = body.projects.0.unwrap_or_default();
        let data_row = body.data_row.0.unwrap_or_default();
        let data_row_id = data_row
            .id
            .0
            .ok_or(ParseError::MissingField("data_row.id"))?;
        let mut labels = Vec::new();
        for label in project.0.unwrap_or_default().labels.0 {
            if let Some(label) = label.0.map(snapshot_label).transpose()?.flatten() {
                labels.push(label);
            }
        }
        let row_activity = data_row
            .details
            .0
            .and_then(|d| d.last_activity_at.0)
            .and_then(|at| Version::parse_rfc3339(&at));
        // The label whose content changed last is the one the event is about.
        let latest = labels.iter().max_by_key(|l| l.active_at);
        // A snapshot is as new as the newest activity it shows; a delete is not final for it,
        // since new labels can follow, so every snapshot is ordered as an update.
        let version = latest.and_then(|l| l.active_at).max(row_activity);
        let label = Label {
            label_id: latest.map(|l| l.id.clone()),
            label_ids: labels.iter().map(|l| l.id.clone()).collect(),
            data_row_id: Some(data_row_id.clone()),
            external_id: data_row.external_id.0,
            user: latest.and_then(|l| l.user.clone()),
            created_at: latest.and_then(|l| l.created_at),
            updated_at: latest.and_then(|l| l.updated_at),
            deleted: None,
            shape: Shape::ExportV2,
            project_id: Some(project_id.clone()),
        };
        let entity = format!("labels:{project_id}:{data_row_id}");
        (label, entity, version, Change::Updated)
    } else {
        let data_row = body.data_row_v1.0.unwrap_or_default();
        let label_id = body.id.0.ok_or(ParseError::MissingField("id"))?;
        let label = Label {
            label_id: Some(label_id.clone()),
            label_ids: vec![label_id.clone()],
            data_row_id: data_row.id.0,
            external_id: data_row.external_id.0,
            user: body.user.0.and_then(|u| u.email.0),
            project_id: body.project.0.and_then(|p| p.id.0),
            created_at: strict_version(body.created_at.0.as_deref(), "createdAt")?,
            updated_at: strict_version(body.updated_at.0.as_deref(), "updatedAt")?,
            deleted: body.deleted.0,
            shape: Shape::V1,
        };
        // updatedAt orders label changes; createdAt stands in when a body has no update time.
        let version = label.updated_at.or(label.created_at);
        (label, format!("label:{label_id}"), version, change)
    };
    let project_id = label.project_id.clone();
    let event = match topic.change() {
        Change::Created => Event::LabelCreated(label),
        Change::Updated => Event::LabelUpdated(label),
        Change::Deleted => Event::LabelDeleted(label),
    };
    Ok(Parsed {
        topic,
        event,
        entity: Some(entity),
        version,
        change,
        project_id,
    })
}

/// The v1 body's `label` field, kept raw (a JSON string holding JSON, or already JSON).
#[derive(serde::Deserialize)]
struct V1Content {
    label: Option<Box<RawValue>>,
}

/// The v2 body's labels with their annotations, kept raw.
#[derive(serde::Deserialize)]
struct V2Content {
    projects: std::collections::BTreeMap<String, V2ProjectContent>,
}

#[derive(serde::Deserialize)]
struct V2ProjectContent {
    #[serde(default)]
    labels: Vec<V2LabelContent>,
}

#[derive(serde::Deserialize)]
struct V2LabelContent {
    #[serde(default)]
    id: OptStr,
    annotations: Option<Box<RawValue>>,
}

pub(super) fn label_content(
    label: &Label,
    body: impl BodySource,
) -> Result<serde_json::Value, ParseError> {
    let label_error = |e: serde_json::Error| ParseError::LabelNotJson {
        line: e.line(),
        column: e.column(),
    };
    match label.shape {
        Shape::V1 => {
            let raw = body
                .read::<V1Content>()?
                .label
                .ok_or(ParseError::MissingField("label"))?;
            match serde_json::from_str::<serde_json::Value>(raw.get()).map_err(label_error)? {
                serde_json::Value::String(inner) => {
                    serde_json::from_str(&inner).map_err(label_error)
                }
                serde_json::Value::Null => Err(ParseError::MissingField("label")),
                value => Ok(value),
            }
        }
        Shape::ExportV2 => {
            let content = body.read::<V2Content>()?;
            let annotations = content
                .projects
                .into_iter()
                .filter(|(project, _)| label.project_id.as_deref().is_none_or(|p| p == project))
                .flat_map(|(_, project)| project.labels)
                .find(|l| l.id.0.is_some() && l.id.0 == label.label_id)
                .and_then(|l| l.annotations)
                .ok_or(ParseError::MissingField("projects.*.labels[*].annotations"))?;
            serde_json::from_str(annotations.get()).map_err(label_error)
        }
    }
}

// ---- Workflow events -------------------------------------------------------------------------

/// A workflow body: export-shaped (`data_row`, `projects.<id>.project_details.workflow_history`)
/// as Labelbox's UI-made webhooks send it, or read leniently from several plausible names.
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
    projects: FirstEntry<Obj<WorkflowProject>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WorkflowProject {
    project_details: Obj<ProjectDetails>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ProjectDetails {
    workflow_status: OptStr,
    workflow_history: Many<Obj<HistoryEntry>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct HistoryEntry {
    action: OptStr,
    created_at: OptStr,
    created_by: OptStr,
}

fn parse_workflow(body: impl BodySource) -> Result<Parsed, ParseError> {
    let b = body.read::<Obj<WorkflowBody>>()?.0.unwrap_or_default();
    let camel = b.data_row_obj_camel.0.map(|d| d.id).unwrap_or_default();
    let snake = b.data_row_obj_snake.0.map(|d| d.id).unwrap_or_default();
    let data_row_id = first_id(&[&camel, &snake, &b.data_row_id_camel, &b.data_row_id]);
    let (map_project, details) = match b.projects.0 {
        Some((id, project)) => (
            Some(id),
            project
                .0
                .and_then(|p| p.project_details.0)
                .unwrap_or_default(),
        ),
        None => (None, ProjectDetails::default()),
    };
    let project = b.project.0.map(|p| p.id).unwrap_or_default();
    let project_id =
        map_project.or_else(|| first_id(&[&project, &b.project_id_camel, &b.project_id]));
    // The newest history entry is the action this delivery announces.
    let newest = details
        .workflow_history
        .0
        .into_iter()
        .filter_map(|entry| entry.0)
        .filter_map(|entry| {
            let at = entry
                .created_at
                .0
                .as_deref()
                .and_then(Version::parse_rfc3339)?;
            Some((at, entry))
        })
        .max_by_key(|(at, _)| *at);
    // Otherwise an update time, when there is one, is preferred over a creation time: if the
    // body describes the data row rather than the action, its createdAt never moves and would
    // tie every event, while updatedAt still orders them.
    let at = newest.as_ref().map(|(at, _)| *at).or_else(|| {
        lenient_version(&[
            &b.updated_at_camel,
            &b.updated_at,
            &b.timestamp,
            &b.created_at_camel,
            &b.created_at,
        ])
    });
    let (action, user) = match newest {
        Some((_, entry)) => (entry.action.0, entry.created_by.0),
        None => (b.action.0, None),
    };
    // A data row has a workflow state in each project it sits in: one lane per pair.
    let entity = data_row_id.as_ref().map(|row| match &project_id {
        Some(project) => format!("workflow:{project}:{row}"),
        None => format!("workflow:{row}"),
    });
    Ok(Parsed {
        topic: Topic::WorkflowAction,
        entity,
        version: at,
        change: Change::Updated,
        project_id: project_id.clone(),
        event: Event::WorkflowAction(WorkflowAction {
            data_row_id,
            project_id,
            action,
            workflow_status: details.workflow_status.0,
            user,
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

fn parse_review(topic: Topic, body: impl BodySource) -> Result<Parsed, ParseError> {
    let b = body.read::<Obj<ReviewBody>>()?.0.unwrap_or_default();
    let label = b.label.0.map(|l| l.id).unwrap_or_default();
    let project = b.project.0.map(|p| p.id).unwrap_or_default();
    let project_id = first_id(&[&project, &b.project_id_camel, &b.project_id]);
    let updated_at = lenient_version(&[&b.updated_at, &b.created_at]);
    let review_id = b.id.0;
    let change = topic.change();
    Ok(Parsed {
        topic,
        entity: review_id.as_ref().map(|id| format!("review:{id}")),
        version: updated_at,
        change,
        project_id: project_id.clone(),
        event: Event::Review(Review {
            change,
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

fn parse_model_run(body: impl BodySource) -> Result<Parsed, ParseError> {
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
    Ok(Parsed {
        topic: Topic::ModelRun,
        entity: Some(format!("modelrun:{model_run_id}")),
        // A training request is a one-off command, not a versioned state.
        version: None,
        change: Change::Created,
        project_id: None,
        event: Event::ModelRun(ModelRun {
            model_id: b.model_id.0,
            model_run_id,
            model_type,
        }),
    })
}
