//! Reading a request body as a stream: size limit, HMAC and SHA-256 while the bytes arrive,
//! small bodies kept in memory, large ones written to a blob file as they come.
//!
//! Memory stays flat whatever the size: at most `inline_max` bytes are buffered before the body
//! spills to disk, and the hashers see each chunk once.

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};

use super::signature::BodyMac;
use crate::store::{BlobDir, BlobWriter, IncomingBody};

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body exceeds the limit")]
    TooLarge,
    #[error("reading the body failed: {0}")]
    Read(String),
    #[error("writing the body to disk failed: {0}")]
    Spill(#[from] std::io::Error),
}

/// A body received whole, with its digests.
#[derive(Debug)]
pub struct ReceivedBody {
    pub content: IncomingBody,
    pub sha256: [u8; 32],
}

enum Buffer {
    Memory(Vec<Bytes>, usize),
    Disk(BlobWriter),
}

/// Reads `body` to its end, feeding `mac`. Refuses anything over `limit` as soon as it is
/// crossed; spills to `blobs` once more than `inline_max` bytes arrived.
pub async fn receive(
    body: Body,
    limit: u64,
    inline_max: u64,
    blobs: &BlobDir,
    mac: &mut BodyMac,
) -> Result<ReceivedBody, BodyError> {
    let mut stream = body.into_data_stream();
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut buffer = Buffer::Memory(Vec::new(), 0);
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        let chunk = chunk.map_err(|e| BodyError::Read(e.to_string()))?;
        total += chunk.len() as u64;
        if total > limit {
            return Err(BodyError::TooLarge);
        }
        mac.update(&chunk);
        hasher.update(&chunk);
        buffer = match buffer {
            Buffer::Memory(mut chunks, len) if (len + chunk.len()) as u64 <= inline_max => {
                let len = len + chunk.len();
                chunks.push(chunk);
                Buffer::Memory(chunks, len)
            }
            Buffer::Memory(chunks, _) => {
                let mut writer = blobs.create().await?;
                for earlier in chunks {
                    writer.write(&earlier).await?;
                }
                writer.write(&chunk).await?;
                Buffer::Disk(writer)
            }
            Buffer::Disk(mut writer) => {
                writer.write(&chunk).await?;
                Buffer::Disk(writer)
            }
        };
    }
    let content = match buffer {
        Buffer::Memory(chunks, len) => IncomingBody::Inline(concat(chunks, len)),
        Buffer::Disk(writer) => IncomingBody::Blob(writer.finish().await?),
    };
    Ok(ReceivedBody {
        content,
        sha256: hasher.finalize().into(),
    })
}

/// One `Bytes` from the chunks, without a copy in the common one-chunk case.
fn concat(mut chunks: Vec<Bytes>, len: usize) -> Bytes {
    if chunks.len() == 1 {
        return chunks.pop().unwrap_or_default();
    }
    let mut joined = BytesMut::with_capacity(len);
    for chunk in chunks {
        joined.extend_from_slice(&chunk);
    }
    joined.freeze()
}

/// SHA-256 of a whole body (used where the body is already in memory).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}
