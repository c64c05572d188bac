//! A delivery's body, as the store keeps it and as handlers receive it: in memory when small,
//! a file beside the database when large. A file body is never read whole into memory by the
//! service: it is streamed to the parser and to handlers.

use std::path::PathBuf;

use bytes::Bytes;

#[derive(Debug, Clone)]
pub enum Payload {
    Inline(Bytes),
    File { path: PathBuf, len: u64 },
}

impl Payload {
    /// Length of the body in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Payload::Inline(bytes) => bytes.len() as u64,
            Payload::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole body in memory; for callers that know it to be small enough.
    pub async fn read_all(&self) -> std::io::Result<Bytes> {
        match self {
            Payload::Inline(bytes) => Ok(bytes.clone()),
            Payload::File { path, .. } => tokio::fs::read(path).await.map(Bytes::from),
        }
    }
}
