//! Reading a request body as a stream: size limit, HMAC and SHA-256 while the bytes arrive,
//! small bodies kept in memory, large ones written to a blob file as they come.
//!
//! Memory stays flat whatever the size: at most `inline_max` bytes are buffered before the body
//! spills to disk, and the hashers see each chunk once.

use std::sync::Arc;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
    /// Holds one of the spill permits until the whole body has arrived.
    Disk(BlobWriter, OwnedSemaphorePermit),
}

/// Where and how much a body may take.
pub struct BodyLimits<'a> {
    /// Larger bodies are refused (413) as soon as the limit is crossed.
    pub max_bytes: u64,
    /// Larger bodies are written to a blob file as they arrive.
    pub inline_max: u64,
    pub blobs: &'a BlobDir,
    /// One permit per body being written to disk at a time.
    pub spill_permits: &'a Arc<Semaphore>,
}

/// Reads `body` to its end, feeding `mac`, within `limits`.
pub async fn receive(
    body: Body,
    limits: &BodyLimits<'_>,
    mac: &mut BodyMac,
) -> Result<ReceivedBody, BodyError> {
    let BodyLimits {
        max_bytes: limit,
        inline_max,
        blobs,
        spill_permits,
    } = *limits;
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
                // Waiting here leaves the rest of the body in the socket: backpressure, not
                // disk, for senders beyond the limit.
                let permit = Arc::clone(spill_permits)
                    .acquire_owned()
                    .await
                    .map_err(|_| BodyError::Read("shutting down".into()))?;
                let mut writer = blobs.create().await?;
                for earlier in chunks {
                    writer.write(&earlier).await?;
                }
                writer.write(&chunk).await?;
                Buffer::Disk(writer, permit)
            }
            Buffer::Disk(mut writer, permit) => {
                writer.write(&chunk).await?;
                Buffer::Disk(writer, permit)
            }
        };
    }
    let content = match buffer {
        Buffer::Memory(chunks, len) => IncomingBody::Inline(concat(chunks, len)),
        Buffer::Disk(writer, _permit) => IncomingBody::Blob(writer.finish().await?),
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
