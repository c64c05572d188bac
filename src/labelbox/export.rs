//! Labelbox's export of a project, as a stream of lines (LABELBOX.md 9.3): start a streamable
//! export task filtered on `data_row_last_activity_at`, poll it (no faster than
//! `export_poll_interval`) until it is COMPLETE or FAILED, read its result's header (`null`: no
//! rows), then fetch it chunk by chunk with `exportFileFromOffset`, each chunk from the signed
//! storage URL the API gives, **without** the API key.
//!
//! Memory stays bounded whatever the export's size: one chunk is fetched at a time and read as
//! it streams, and only the line being completed is held ([`Lines`]), since a line (one data
//! row) may span chunks.

use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{root_cause, Api};
use super::progress::Remarks;
use super::LabelboxError;
use crate::delivery::UnixMillis;

/// A signed chunk URL must answer within this (the SDK's limit).
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

/// An export task of one project.
pub struct Task {
    pub id: String,
}

/// Starts an export of `project`'s data rows with activity at or after `since`.
pub async fn start(api: &Api, project: &str, since: UnixMillis) -> Result<Task, LabelboxError> {
    let input = json!({"input": {
        "taskName": null, "isStreamableReady": true, "streamable": true,
        "filters": {"projectId": project, "searchQuery": {"scope": null, "query": [
            {"type": "data_row_last_activity_at", "value": {
                "operator": "GREATER_THAN_OR_EQUAL", "timezone": "UTC",
                "value": filter_time(since)}}]}},
        "params": {"mediaTypeOverride": null, "includeAttachments": false,
            "includeEmbeddings": false, "includeMetadata": false,
            "includeDataRowDetails": true, "includeProjectDetails": true,
            "includePerformanceDetails": false, "includeLabelDetails": true,
            "includeInterpolatedFrames": false}}});
    #[derive(Deserialize)]
    struct Started {
        #[serde(rename = "exportDataRowsInProject")]
        started: TaskId,
    }
    #[derive(Deserialize)]
    struct TaskId {
        #[serde(rename = "taskId")]
        task_id: String,
    }
    let started: Started = api
        .call(
            "starting the export",
            "mutation exportDataRowsInProjectPyApi($input: ExportDataRowsInProjectInput!){exportDataRowsInProject(input: $input){taskId isStreamable}}",
            input,
        )
        .await
        .map_err(|e| e.for_project(project))?;
    Ok(Task {
        id: started.started.task_id,
    })
}

/// `2024-05-01 12:00:00` in UTC, whole seconds rounded down (the filter is "at or after"): the
/// form the SDK sends (LABELBOX.md 9.3a).
fn filter_time(at: UnixMillis) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp(at.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// The id of the user the key belongs to (tasks are found among the user's).
pub async fn user_id(api: &Api) -> Result<String, LabelboxError> {
    #[derive(Deserialize)]
    struct Me {
        user: super::webhooks::IdOnly,
    }
    let me: Me = api
        .call(
            "asking who the key belongs to",
            "query GetUserIdPyApi { user { id } }",
            Value::Null,
        )
        .await?;
    Ok(me.user.id)
}

/// Polls `task` every `interval` until it is COMPLETE (Ok) or FAILED.
pub async fn wait(
    api: &Api,
    user: &str,
    task: &Task,
    interval: Duration,
    remarks: &Remarks,
) -> Result<(), LabelboxError> {
    #[derive(Deserialize)]
    struct Polled {
        user: Tasks,
    }
    #[derive(Deserialize)]
    struct Tasks {
        #[serde(rename = "createdTasks")]
        created: Vec<TaskState>,
    }
    #[derive(Deserialize)]
    struct TaskState {
        status: String,
        #[serde(rename = "completionPercentage")]
        completion: Option<f64>,
        errors: Option<Value>,
    }
    let mut said = None;
    loop {
        let polled: Polled = api
            .call(
                "polling the export task",
                "query TaskStatusPyApi($userId: ID!, $taskId: ID!) { user(where: {id: $userId}) { createdTasks(where: {id: $taskId} skip: 0 first: 1) { status completionPercentage errors id } } }",
                json!({"userId": user, "taskId": task.id}),
            )
            .await?;
        let state =
            polled
                .user
                .created
                .into_iter()
                .next()
                .ok_or_else(|| LabelboxError::ExportFailed {
                    task: task.id.clone(),
                    errors: "Labelbox lists no such task".into(),
                })?;
        match state.status.as_str() {
            "COMPLETE" => return Ok(()),
            "FAILED" => {
                return Err(LabelboxError::ExportFailed {
                    task: task.id.clone(),
                    errors: state
                        .errors
                        .filter(|e| !e.is_null())
                        .map_or_else(|| "no reason given".to_owned(), |e| e.to_string()),
                })
            }
            status => {
                let percent = state.completion.unwrap_or(0.0).round();
                if said != Some(percent) {
                    remarks.say(&format!(
                        "export task {}: {status}, {percent}% done",
                        task.id
                    ));
                    said = Some(percent);
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// The size of a finished task's stream (`RESULT` or `ERRORS`): `None` when it has no lines.
pub async fn header(
    api: &Api,
    task: &Task,
    stream: &str,
) -> Result<Option<(u64, u64)>, LabelboxError> {
    #[derive(Deserialize)]
    struct Data {
        task: Option<HeaderOf>,
    }
    #[derive(Deserialize)]
    struct HeaderOf {
        #[serde(rename = "exportMetadataHeader")]
        header: Option<Header>,
    }
    #[derive(Deserialize)]
    struct Header {
        #[serde(rename = "totalSize")]
        total_size: u64,
        #[serde(rename = "totalLines")]
        total_lines: u64,
    }
    let data: Data = api
        .call(
            "reading the export's size",
            "query GetExportMetadataHeaderPyApi($where: WhereUniqueIdInput, $streamType: TaskStreamType!) { task(where: $where) { exportMetadataHeader(streamType: $streamType) { totalSize totalLines } } }",
            json!({"where": {"id": task.id}, "streamType": stream}),
        )
        .await?;
    Ok(data
        .task
        .and_then(|t| t.header)
        .filter(|h| h.total_size > 0)
        .map(|h| (h.total_size, h.total_lines)))
}

/// Where one chunk of a stream is: its byte range and its signed URL.
pub struct Chunk {
    pub start: u64,
    pub end: u64,
    url: String,
}

/// The chunk of `task`'s stream that starts at `offset`.
pub async fn chunk_at(
    api: &Api,
    task: &Task,
    stream: &str,
    offset: u64,
) -> Result<Chunk, LabelboxError> {
    #[derive(Deserialize)]
    struct Data {
        task: Option<FileOf>,
    }
    #[derive(Deserialize)]
    struct FileOf {
        #[serde(rename = "exportFileFromOffset")]
        file: Option<File>,
    }
    #[derive(Deserialize)]
    struct File {
        offsets: Range,
        file: String,
    }
    #[derive(Deserialize)]
    struct Range {
        start: Value,
        end: Value,
    }
    let data: Data = api
        .call(
            "asking for a chunk of the export",
            "query GetExportFileFromOffsetPyApi($where: WhereUniqueIdInput, $streamType: TaskStreamType!, $offset: UInt64!) { task(where: $where) { exportFileFromOffset(streamType: $streamType, offset: $offset) { offsets { start end } lines { start end } file } } }",
            json!({"where": {"id": task.id}, "streamType": stream, "offset": offset.to_string()}),
        )
        .await?;
    let file = data
        .task
        .and_then(|t| t.file)
        .ok_or_else(|| LabelboxError::Chunk(format!("no chunk at offset {offset}")))?;
    // UInt64 values may come as numbers or as strings.
    let number = |v: &Value| match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    };
    let (Some(start), Some(end)) = (number(&file.offsets.start), number(&file.offsets.end)) else {
        return Err(LabelboxError::Chunk(format!(
            "the chunk at offset {offset} has no readable byte range"
        )));
    };
    if start != offset || end < start {
        return Err(LabelboxError::Chunk(format!(
            "asked for offset {offset}, got bytes {start} to {end}"
        )));
    }
    Ok(Chunk {
        start,
        end,
        url: file.file,
    })
}

/// One chunk being fetched from its signed URL (no API key: the URL is its own authorization),
/// its bytes read as they arrive.
pub struct ChunkReader {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    start: u64,
    end: u64,
    got: u64,
}

impl Chunk {
    pub async fn open(&self, http: &reqwest::Client) -> Result<ChunkReader, LabelboxError> {
        let response = http
            .get(&self.url)
            .timeout(CHUNK_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.failed(e))?;
        if !response.status().is_success() {
            return Err(LabelboxError::Chunk(format!(
                "fetching bytes {} to {}: the storage answered {}",
                self.start,
                self.end,
                response.status()
            )));
        }
        Ok(ChunkReader {
            body: Box::pin(response.bytes_stream()),
            start: self.start,
            end: self.end,
            got: 0,
        })
    }

    /// The signed URL's query is a credential of sorts: errors name the chunk, not the URL.
    fn failed(&self, e: reqwest::Error) -> LabelboxError {
        LabelboxError::Chunk(format!(
            "fetching bytes {} to {}: {}",
            self.start,
            self.end,
            root_cause(&e.without_url())
        ))
    }
}

impl ChunkReader {
    /// The next bytes; `None` at the end, once exactly `end - start + 1` came.
    pub async fn next(&mut self) -> Result<Option<bytes::Bytes>, LabelboxError> {
        let expected = self.end - self.start + 1;
        let short = |got: u64| {
            LabelboxError::Chunk(format!(
                "bytes {} to {}: {got} bytes came, {expected} expected",
                self.start, self.end
            ))
        };
        match self.body.next().await {
            Some(Ok(piece)) => {
                self.got += piece.len() as u64;
                if self.got > expected {
                    return Err(short(self.got));
                }
                Ok(Some(piece))
            }
            Some(Err(e)) => Err(LabelboxError::Chunk(format!(
                "fetching bytes {} to {}: {}",
                self.start,
                self.end,
                root_cause(&e.without_url())
            ))),
            None if self.got == expected => Ok(None),
            None => Err(short(self.got)),
        }
    }
}

/// NDJSON split into lines across chunks: a line is handed on once its newline arrives; the
/// start of a line that continues in the next chunk is kept until then.
#[derive(Default)]
pub struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    /// Feeds bytes; `each` gets every line they complete (without its newline; empty lines
    /// are skipped).
    pub fn push<E>(
        &mut self,
        mut bytes: &[u8],
        mut each: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while let Some(at) = bytes.iter().position(|b| *b == b'\n') {
            let (head, rest) = bytes.split_at(at);
            bytes = &rest[1..];
            if self.partial.is_empty() {
                if !head.is_empty() {
                    each(head)?;
                }
            } else {
                self.partial.extend_from_slice(head);
                let line = std::mem::take(&mut self.partial);
                each(&line)?;
            }
        }
        self.partial.extend_from_slice(bytes);
        Ok(())
    }

    /// The last line, when the stream does not end with a newline.
    pub fn finish<E>(&mut self, each: impl FnOnce(&[u8]) -> Result<(), E>) -> Result<(), E> {
        let line = std::mem::take(&mut self.partial);
        if line.iter().any(|b| !b.is_ascii_whitespace()) {
            each(&line)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut lines = Lines::default();
        let mut out = Vec::new();
        for chunk in chunks {
            lines
                .push(chunk, |l| {
                    out.push(String::from_utf8_lossy(l).into_owned());
                    Ok::<_, ()>(())
                })
                .expect("push");
        }
        lines
            .finish(|l| {
                out.push(String::from_utf8_lossy(l).into_owned());
                Ok::<_, ()>(())
            })
            .expect("finish");
        out
    }

    #[test]
    fn lines_are_joined_across_chunks_whatever_the_cut() {
        let text = b"{\"a\":1}\n{\"b\":22}\n\n{\"c\":333}";
        let whole = split(&[text]);
        assert_eq!(whole, ["{\"a\":1}", "{\"b\":22}", "{\"c\":333}"]);
        for cut in 0..=text.len() {
            for cut2 in cut..=text.len() {
                let parts = [&text[..cut], &text[cut..cut2], &text[cut2..]];
                assert_eq!(split(&parts), whole, "cut at {cut} and {cut2}");
            }
        }
    }

    #[test]
    fn the_filter_time_is_utc_whole_seconds_in_the_sdks_form() {
        // 2024-05-01T12:00:00.999Z
        assert_eq!(filter_time(1_714_564_800_999), "2024-05-01 12:00:00");
    }
}
