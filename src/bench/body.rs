//! The bench's deliveries: LABEL_UPDATED bodies shaped as Labelbox's v1 webhooks send them
//! (tests/fixtures/label_updated.json: the label's annotations double-encoded in `label`), of
//! an exact size, told apart by their label id, data row id and `updatedAt`.
//!
//! A body is laid out once, with marks where those three go; each request then only copies the
//! pieces and writes the three values. The load shares the machine's cores with the service it
//! measures, so it should spend them sending, not formatting JSON.

use serde_json::json;

use crate::delivery::format_millis;

/// Stand-ins, of the width of the values written in their place.
const LABEL_MARK: &str = "cLABELIDMARKLABELIDMARKLA";
const DATA_ROW_MARK: &str = "cDATAROWMARKDATAROWMARKDA";
const UPDATED_AT_MARK: &str = "UPDATEDATMARKUPDATEDATMA";

/// The largest `--labels`: label ids carry the number in 14 digits.
pub const MAX_LABELS: u64 = 99_999_999_999_999;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(Vec<u8>),
    LabelId,
    DataRowId,
    UpdatedAt,
}

/// A LABEL_UPDATED body of a fixed size, with three values left open.
#[derive(Debug, Clone)]
pub struct BodyTemplate {
    pieces: Vec<Piece>,
    len: usize,
}

/// `--body-bytes` below the smallest body.
#[derive(Debug, thiserror::Error)]
#[error("--body-bytes {asked}: a LABEL_UPDATED body takes at least {least} bytes")]
pub struct TooSmall {
    pub asked: usize,
    pub least: usize,
}

impl BodyTemplate {
    /// A body of exactly `bytes` bytes: as many annotation objects as fit, the rest made up in
    /// the project's description.
    pub fn of_size(bytes: usize) -> Result<BodyTemplate, TooSmall> {
        let least = body(0, 0).len();
        if bytes < least {
            return Err(TooSmall {
                asked: bytes,
                least,
            });
        }
        // Every object has the same length (fixed-width ids and numbers), so two sizes give
        // the cost of one more.
        let (one, two) = (body(1, 0).len(), body(2, 0).len());
        let objects = if bytes < one {
            0
        } else {
            1 + (bytes - one) / (two - one)
        };
        let mut text = body(objects, 0);
        text = body(objects, bytes - text.len());
        Ok(BodyTemplate::from_text(&text))
    }

    fn from_text(text: &str) -> BodyTemplate {
        let marks = [
            (LABEL_MARK, Piece::LabelId),
            (DATA_ROW_MARK, Piece::DataRowId),
            (UPDATED_AT_MARK, Piece::UpdatedAt),
        ];
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some((at, mark, piece)) = marks
            .iter()
            .filter_map(|(mark, piece)| rest.find(mark).map(|at| (at, mark, piece)))
            .min_by_key(|(at, _, _)| *at)
        {
            pieces.push(Piece::Text(rest.as_bytes()[..at].to_vec()));
            pieces.push(piece.clone());
            rest = &rest[at + mark.len()..];
        }
        pieces.push(Piece::Text(rest.as_bytes().to_vec()));
        BodyTemplate {
            pieces,
            len: text.len(),
        }
    }

    /// The size of every body.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The body of the update of label number `label` made at `updated_at_ms` (milliseconds
    /// since the Unix epoch).
    pub fn render(&self, label: u64, updated_at_ms: i64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.extend_from_slice(text),
                Piece::LabelId => out.extend_from_slice(label_id(label).as_bytes()),
                Piece::DataRowId => out.extend_from_slice(data_row_id(label).as_bytes()),
                // As Labelbox writes `updatedAt`: RFC 3339 with milliseconds, 24 characters.
                Piece::UpdatedAt => out.extend_from_slice(format_millis(updated_at_ms).as_bytes()),
            }
        }
        out
    }
}

/// Label number `n`'s id: 25 characters, as Labelbox's cuids.
pub fn label_id(n: u64) -> String {
    format!("cbenchlabel{:014}", n % (MAX_LABELS + 1))
}

fn data_row_id(n: u64) -> String {
    format!("cbenchdatarow{:012}", n % 1_000_000_000_000)
}

/// The body with `objects` annotation objects and `padding` bytes of project description.
fn body(objects: usize, padding: usize) -> String {
    let objects: Vec<_> = (0..objects).map(annotation).collect();
    let label = json!({
        "objects": objects,
        "classifications": [{
            "featureId": "cbenchclassification00001",
            "schemaId": "cbenchschemaweather000001",
            "title": "weather",
            "value": "weather",
            "answer": {
                "featureId": "cbenchanswersunny00000001",
                "schemaId": "cbenchschemasunny00000001",
                "title": "sunny",
                "value": "sunny"
            }
        }]
    });
    json!({
        "id": LABEL_MARK,
        "createdAt": "2026-01-05T09:00:00Z",
        "updatedAt": UPDATED_AT_MARK,
        "secondsToLabel": 42.5,
        "label": label.to_string(),
        "agreement": null,
        "benchmarkAgreement": null,
        "deleted": false,
        "project": {
            "id": "cbenchproject000000000001",
            "createdAt": "2026-01-01T00:00:00Z",
            "updatedAt": "2026-01-01T00:00:00.000Z",
            "name": "labelhook-bench",
            "description": "x".repeat(padding),
            "deleted": false
        },
        "dataRow": {
            "id": DATA_ROW_MARK,
            "createdAt": "2026-01-02T00:00:00Z",
            "updatedAt": "2026-01-02T00:00:00Z",
            "deletedAt": null,
            "externalId": "bench.jpg",
            "rowData": "https://storage.example/bench/bench.jpg"
        },
        "dataset": {
            "id": "cbenchdataset000000000001",
            "createdAt": "2026-01-01T00:00:00Z",
            "updatedAt": "2026-01-01T00:00:00Z",
            "name": "labelhook-bench",
            "description": "",
            "deleted": false
        },
        "user": {"id": "cbenchuser000000000000001", "email": "labeler@example.com"}
    })
    .to_string()
}

/// Annotation object number `n`, of the same length whatever `n` (a box on a car).
fn annotation(n: usize) -> serde_json::Value {
    let feature = format!("cbenchfeature{:012}", n % 1_000_000_000_000);
    json!({
        "featureId": feature,
        "schemaId": "cbenchschemacar0000000001",
        "title": "car",
        "value": "car",
        "color": "#1CE6FF",
        "bbox": {"top": 118, "left": 240, "height": 96, "width": 172},
        "instanceURI": format!("https://api.labelbox.com/masks/feature/{feature}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Event;

    #[test]
    fn bodies_have_the_size_asked_for_and_parse_as_label_updates() {
        let least = BodyTemplate::of_size(0).expect_err("too small").least;
        for size in [least, least + 1, 2048, 2049, 64 * 1024, 1024 * 1024] {
            let template = BodyTemplate::of_size(size).expect("template");
            let body = template.render(7, 1_767_600_000_123);
            assert_eq!(body.len(), size);
            assert_eq!(template.len(), size);
            let parsed = crate::events::parse(Some("LABEL_UPDATED"), &body).expect("parses");
            assert_eq!(
                parsed.entity.as_deref(),
                Some("label:cbenchlabel00000000000007")
            );
            assert!(parsed.version.is_some());
            let Event::LabelUpdated(label) = &parsed.event else {
                panic!("{:?}", parsed.event);
            };
            let content = crate::events::label_content(label, &body).expect("annotations");
            assert!(content["objects"].is_array());
        }
    }

    #[test]
    fn a_template_writes_the_label_the_row_and_the_time_it_is_given() {
        let template = BodyTemplate::of_size(2048).expect("template");
        let body: serde_json::Value =
            serde_json::from_slice(&template.render(12, 1_767_600_000_123)).expect("json");
        assert_eq!(body["id"], "cbenchlabel00000000000012");
        assert_eq!(body["dataRow"]["id"], "cbenchdatarow000000000012");
        assert_eq!(body["updatedAt"], "2026-01-05T08:00:00.123Z");
        let text = String::from_utf8(template.render(12, 0)).expect("utf-8");
        assert!(!text.contains("MARK"), "{text}");
    }

    #[test]
    fn too_small_a_size_is_refused_with_the_least_one() {
        let e = BodyTemplate::of_size(100).expect_err("too small");
        assert_eq!(e.asked, 100);
        assert!(e.least > 900 && e.least < 1800, "{}", e.least);
        assert!(e.to_string().contains(&e.least.to_string()));
    }
}
