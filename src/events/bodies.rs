//! Reading each topic's body: a handful of fields picked out of the JSON (the rest skipped as
//! it streams past), turned into the typed [`Event`] and the gate's view of it ([`Parsed`]).

use serde::de::IgnoredAny;
use serde_json::value::RawValue;

use super::lenient::{First, FirstEntry, IdOnly, Obj, OptBool, OptStr};
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
struct DataRowV2 {
    id: OptStr,
    external_id: OptStr,
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
    created_by: OptStr,
}

fn parse_label(topic: Topic, body: impl BodySource) -> Result<Parsed, ParseError> {
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
        let data_row = body.data_row.0.unwrap_or_default();
        Label {
            label_id: first
                .id
                .0
                .ok_or(ParseError::MissingField("projects.*.labels[0].id"))?,
            data_row_id: data_row.id.0,
            external_id: data_row.external_id.0,
            user: details.created_by.0,
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
        let data_row = body.data_row_v1.0.unwrap_or_default();
        Label {
            label_id: body.id.0.ok_or(ParseError::MissingField("id"))?,
            data_row_id: data_row.id.0,
            external_id: data_row.external_id.0,
            user: body.user.0.and_then(|u| u.email.0),
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
    let event = match change {
        Change::Created => Event::LabelCreated(label),
        Change::Updated => Event::LabelUpdated(label),
        Change::Deleted => Event::LabelDeleted(label),
    };
    Ok(Parsed {
        topic,
        event,
        entity,
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
                .find(|l| l.id.0.as_deref() == Some(label.label_id.as_str()))
                .and_then(|l| l.annotations)
                .ok_or(ParseError::MissingField("projects.*.labels[*].annotations"))?;
            serde_json::from_str(annotations.get()).map_err(label_error)
        }
    }
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

fn parse_workflow(body: impl BodySource) -> Result<Parsed, ParseError> {
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
    Ok(Parsed {
        topic: Topic::WorkflowAction,
        entity: data_row_id.as_ref().map(|id| format!("datarow:{id}")),
        version: at,
        change: Change::Updated,
        project_id: project_id.clone(),
        event: Event::WorkflowAction(WorkflowAction {
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
