//! Reading a request body as a stream: size limit, and the verifier (HMAC and SHA-256) fed
//! while the bytes arrive; small bodies kept in memory, large ones written to the store's body
//! storage as they come.
//!
//! Memory stays flat whatever the size: at most `inline_max` bytes are buffered before the body
//! spills to the store, and the verifier sees each chunk once.

use std::sync::Arc;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::delivery::{BodyVerifier, IncomingBody};
use crate::store::{BodyStore, BodyWriter};

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body exceeds the limit")]
    TooLarge,
    #[error("reading the body failed: {0}")]
    Read(String),
    #[error("writing the body to the store failed: {0}")]
    Spill(#[from] std::io::Error),
}

enum Buffer {
    Memory(Vec<Bytes>, usize),
    /// Holds one of the spill permits until the whole body has arrived.
    Store(Box<dyn BodyWriter>, OwnedSemaphorePermit),
}

/// Where and how much a body may take.
pub struct BodyLimits<'a> {
    /// Larger bodies are refused (413) as soon as the limit is crossed.
    pub max_bytes: u64,
    /// Larger bodies are written to the store's body storage as they arrive.
    pub inline_max: u64,
    pub bodies: &'a dyn BodyStore,
    /// One permit per body being written to the store at a time.
    pub spill_permits: &'a Arc<Semaphore>,
}

/// Reads `body` to its end, feeding `verifier`, within `limits`.
pub async fn receive(
    body: Body,
    limits: &BodyLimits<'_>,
    verifier: &mut BodyVerifier,
) -> Result<IncomingBody, BodyError> {
    let BodyLimits {
        max_bytes: limit,
        inline_max,
        bodies,
        spill_permits,
    } = *limits;
    let mut stream = body.into_data_stream();
    let mut total: u64 = 0;
    let mut buffer = Buffer::Memory(Vec::new(), 0);
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        let chunk = chunk.map_err(|e| BodyError::Read(e.to_string()))?;
        total += chunk.len() as u64;
        if total > limit {
            return Err(BodyError::TooLarge);
        }
        verifier.update(&chunk);
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
                let mut writer = bodies.create().await?;
                for earlier in chunks {
                    writer.write(earlier).await?;
                }
                writer.write(chunk).await?;
                Buffer::Store(writer, permit)
            }
            Buffer::Store(mut writer, permit) => {
                writer.write(chunk).await?;
                Buffer::Store(writer, permit)
            }
        };
    }
    Ok(match buffer {
        Buffer::Memory(chunks, len) => IncomingBody::Inline(concat(chunks, len)),
        Buffer::Store(writer, _permit) => IncomingBody::Staged(writer.finish().await?),
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
