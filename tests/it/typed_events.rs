//! A handler written in Rust, plugged into a running labelhook, matches on the typed event of
//! every kind of delivery and sees its fields, for both label body shapes, without parsing the
//! body itself; the label's annotations are decoded on request, also from a stored body.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use labelhook::events::{Event, Shape};
use labelhook::ordering::Change;
use labelhook::{Application, Config, Handler, HandlerError, HandlerEvent};

use crate::helpers::{base_config, sha1_sig, SECRET};

/// What the handler saw, by delivery id.
type Seen = Arc<Mutex<HashMap<String, Summary>>>;

#[derive(Debug, Clone, PartialEq)]
enum Summary {
    Label {
        change: &'static str,
        label: Option<String>,
        project: Option<String>,
        data_row: Option<String>,
        external_id: Option<String>,
        user: Option<String>,
        shape: Shape,
        objects: usize,
    },
    Workflow {
        data_row: Option<String>,
        project: Option<String>,
        action: Option<String>,
        user: Option<String>,
    },
    Review {
        change: Change,
        review: Option<String>,
        label: Option<String>,
    },
    ModelRun {
        run: String,
        model_type: String,
    },
    Unknown {
        topic: Option<String>,
        bytes: u64,
    },
}

struct Recorder {
    seen: Seen,
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, event: &HandlerEvent) -> Result<(), HandlerError> {
        let summary = match &event.event {
            Event::LabelCreated(l) | Event::LabelUpdated(l) | Event::LabelDeleted(l) => {
                let change = match &event.event {
                    Event::LabelCreated(_) => "created",
                    Event::LabelUpdated(_) => "updated",
                    _ => "deleted",
                };
                let objects = match event.label_content().await {
                    Ok(Some(content)) => content["objects"].as_array().map_or(0, Vec::len),
                    _ => 0,
                };
                Summary::Label {
                    change,
                    label: l.label_id.clone(),
                    project: l.project_id.clone(),
                    data_row: l.data_row_id.clone(),
                    external_id: l.external_id.clone(),
                    user: l.user.clone(),
                    shape: l.shape,
                    objects,
                }
            }
            Event::WorkflowAction(w) => Summary::Workflow {
                data_row: w.data_row_id.clone(),
                project: w.project_id.clone(),
                action: w.action.clone(),
                user: w.user.clone(),
            },
            Event::Review(r) => Summary::Review {
                change: r.change,
                review: r.review_id.clone(),
                label: r.label_id.clone(),
            },
            Event::ModelRun(m) => Summary::ModelRun {
                run: m.model_run_id.clone(),
                model_type: m.model_type.clone(),
            },
            Event::Unknown(u) => Summary::Unknown {
                topic: u.topic.clone(),
                bytes: event.body.len(),
            },
            other => return Err(HandlerError::Permanent(format!("unexpected {other:?}"))),
        };
        self.seen
            .lock()
            .map_err(|_| HandlerError::Permanent("poisoned".into()))?
            .insert(event.delivery_id.clone(), summary);
        Ok(())
    }
}

/// A v1 label body whose annotations (200 objects) make it larger than the inline limit, so
/// that it is stored apart and read back as a stream.
fn large_v1_label() -> Vec<u8> {
    let object = r#"{\"featureId\":\"cf\",\"title\":\"car\",\"bbox\":{\"top\":1,\"left\":2,\"height\":3,\"width\":4},\"note\":\"PADDING\"}"#
        .replace("PADDING", &"p".repeat(400));
    let objects = vec![object; 200].join(",");
    format!(
        r#"{{"id":"clabellarge","updatedAt":"2026-11-20T10:00:00Z","label":"{{\"objects\":[{objects}]}}","project":{{"id":"cprojlarge"}},"dataRow":{{"id":"cdrowlarge","externalId":"large.jpg"}},"user":{{"email":"big@example.com"}}}}"#
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_handler_matches_on_the_typed_event_of_every_kind() {
    let dir = tempfile::tempdir().expect("temp");
    let config_text = base_config(
        r#"
[dispatch]
poll_interval = "50ms"

[model_training]
path = "/model-training"
secrets = [{ env = "LH_TEST_SECRET" }]
model_types = ["image_single_classification"]

[[handler]]
name = "recorder"
kind = "log"

[[route]]
topics = ["*"]
handlers = ["recorder"]
"#,
    )
    .replace("STORE_DIR", &dir.path().display().to_string());
    let path = dir.path().join("labelhook.toml");
    std::fs::write(&path, config_text).expect("write");
    let env = HashMap::from([("LH_TEST_SECRET".to_owned(), SECRET.to_owned())]);
    let config = Config::load(&path, &env, true).expect("config");
    let mut app = Application::build(config).await.expect("build");
    let seen: Seen = Arc::default();
    app.handlers_mut()
        .register("recorder", Arc::new(Recorder { seen: seen.clone() }));
    let base = format!("http://{}", app.local_addr());
    let store = app.store();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stop_rx.await;
    }));

    let fixture = |name: &str| {
        std::fs::read(format!(
            "{}/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("fixture")
    };
    let large = large_v1_label();
    assert!(large.len() > 64 * 1024, "stored apart from its row");
    let sends: Vec<(&str, &str, &str, Vec<u8>)> = vec![
        (
            "/webhooks/labelbox",
            "LABEL_CREATED",
            "t-created",
            fixture("label_created.json"),
        ),
        (
            "/webhooks/labelbox",
            "LABEL_UPDATED",
            "t-v2",
            fixture("label_updated_v2_export.json"),
        ),
        ("/webhooks/labelbox", "LABEL_UPDATED", "t-large", large),
        (
            "/webhooks/labelbox",
            "WORKFLOW_ACTION",
            "t-move",
            fixture("workflow_action.json"),
        ),
        (
            "/webhooks/labelbox",
            "REVIEW_CREATED",
            "t-review",
            fixture("review_created.json"),
        ),
        (
            "/model-training/model_run",
            "MODEL_RUN",
            "t-run",
            fixture("model_run.json"),
        ),
        (
            "/webhooks/labelbox",
            "SOMETHING_NEW",
            "t-unknown",
            fixture("unknown_topic.json"),
        ),
    ];
    let client = reqwest::Client::new();
    for (route, topic, id, body) in &sends {
        let response = client
            .post(format!("{base}{route}"))
            .header("content-type", "application/json")
            .header("x-labelbox-event", *topic)
            .header("x-labelbox-id", *id)
            .header("x-hub-signature", sha1_sig(SECRET, body))
            .body(body.clone())
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 202, "{id}");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while store.queue_depth().await.expect("depth") > 0 {
        assert!(tokio::time::Instant::now() < deadline, "not dispatched");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(());
    server.await.expect("server");

    let seen = seen.lock().expect("lock").clone();
    let get = |id: &str| {
        seen.get(id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} not handled"))
    };
    assert_eq!(
        get("t-created"),
        Summary::Label {
            change: "created",
            label: Some("clv3k9x2a00013b6m8q7h4z1e".into()),
            project: Some("clu8f2m1p000208l4c7ax9d3k".into()),
            data_row: Some("clu9a7b3c000408jz2e5f6g7h".into()),
            external_id: Some("img_001.jpg".into()),
            user: Some("labeler@example.com".into()),
            shape: Shape::V1,
            objects: 1,
        }
    );
    assert_eq!(
        get("t-v2"),
        Summary::Label {
            change: "updated",
            label: Some("clw1n4r8s000a07mf3b2k6d9p".into()),
            project: Some("clu8f2m1p000208l4c7ax9d3k".into()),
            data_row: Some("clu9a7b3c000408jz2e5f6g7h".into()),
            external_id: Some("img_001.jpg".into()),
            user: Some("labeler@example.com".into()),
            shape: Shape::ExportV2,
            objects: 1,
        }
    );
    assert_eq!(
        get("t-large"),
        Summary::Label {
            change: "updated",
            label: Some("clabellarge".into()),
            project: Some("cprojlarge".into()),
            data_row: Some("cdrowlarge".into()),
            external_id: Some("large.jpg".into()),
            user: Some("big@example.com".into()),
            shape: Shape::V1,
            objects: 200,
        }
    );
    assert_eq!(
        get("t-move"),
        Summary::Workflow {
            data_row: Some("clu9a7b3c000408jz2e5f6g7h".into()),
            project: Some("clu8f2m1p000208l4c7ax9d3k".into()),
            action: Some("Approve".into()),
            user: Some("reviewer@example.com".into()),
        }
    );
    assert_eq!(
        get("t-review"),
        Summary::Review {
            change: Change::Created,
            review: Some("clv5q2w8e000c3b6mz9y1x4t7".into()),
            label: Some("clv3k9x2a00013b6m8q7h4z1e".into()),
        }
    );
    assert_eq!(
        get("t-run"),
        Summary::ModelRun {
            run: "9da6c7e2-4b1f-4c3a-8e5d-2f7a6b1c0d93".into(),
            model_type: "image_single_classification".into(),
        }
    );
    assert_eq!(
        get("t-unknown"),
        Summary::Unknown {
            topic: Some("SOMETHING_NEW".into()),
            bytes: fixture("unknown_topic.json").len() as u64,
        }
    );
}
