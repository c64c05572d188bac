//! Large bodies in PostgreSQL: `blobs` rows with their bytes in 1 MiB `blob_chunks`, so that a
//! body accepted by one replica can be handled by another, with flat memory on both.
//!
//! A body is written inside one transaction of its own while it streams in, committed when it
//! is complete (so a crash mid-upload leaves nothing behind), and then named by its delivery's
//! row. One that is never named (refused request, duplicate, crash between the two commits) is
//! deleted when its [`StagedBody`] is dropped, or by [`ChunkStore::sweep_orphans`] at the next
//! start. Deleting checks that no delivery names the blob, so a body is never lost to a commit
//! whose outcome was unknown.
//! Reading fetches one chunk per query: never more than one chunk in memory.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, StreamExt};
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};

use super::Schema;
use crate::delivery::{ChunkStream, Clock, PayloadSource, StagedBody, Staging};
use crate::store::{BodyStore, BodyWriter, StoreError};

/// Bytes per stored chunk.
const CHUNK_BYTES: usize = 1 << 20;
/// Blobs younger than this are never swept: they may belong to a request still in flight.
const SWEEP_GRACE: Duration = Duration::from_secs(3600);

/// A staged body's key, as the intake records it.
pub fn blob_id(key: &str) -> Result<i64, StoreError> {
    key.parse()
        .map_err(|_| StoreError::Corrupt(format!("not a blob id: {key:?}")))
}

fn io_error(e: sqlx::Error) -> io::Error {
    io::Error::other(StoreError::from(e).to_string())
}

/// The PostgreSQL back-end's [`BodyStore`].
#[derive(Clone)]
pub struct ChunkStore {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    schema: Arc<Schema>,
}

impl ChunkStore {
    pub fn new(pool: PgPool, clock: Arc<dyn Clock>, schema: Arc<Schema>) -> Self {
        Self {
            pool,
            clock,
            schema,
        }
    }

    /// A handle that reads blob `id` back.
    pub fn source(&self, id: i64) -> Arc<dyn PayloadSource> {
        Arc::new(StoredChunks {
            pool: self.pool.clone(),
            id,
        })
    }

    /// Deletes blobs no delivery names, older than `SWEEP_GRACE`.
    pub async fn sweep_orphans(&self) -> Result<u64, StoreError> {
        let cutoff = self.clock.now() - SWEEP_GRACE.as_millis() as i64;
        let removed = sqlx::query(
            "DELETE FROM blobs b WHERE b.created_at < $1 \
             AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.blob_id = b.id)",
        )
        .bind(cutoff)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(removed)
    }
}

#[async_trait]
impl BodyStore for ChunkStore {
    async fn create(&self) -> io::Result<Box<dyn BodyWriter>> {
        self.schema
            .ready()
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut tx = self.pool.begin().await.map_err(io_error)?;
        let id: i64 = sqlx::query_scalar("INSERT INTO blobs (created_at) VALUES ($1) RETURNING id")
            .bind(self.clock.now())
            .fetch_one(&mut *tx)
            .await
            .map_err(io_error)?;
        Ok(Box::new(ChunkWriter {
            tx: Some(tx),
            pool: self.pool.clone(),
            id,
            buffer: BytesMut::with_capacity(CHUNK_BYTES),
            next_idx: 0,
            len: 0,
        }))
    }
}

/// One body being written; dropped unfinished, its transaction rolls back.
struct ChunkWriter {
    tx: Option<Transaction<'static, Postgres>>,
    pool: PgPool,
    id: i64,
    buffer: BytesMut,
    next_idx: i32,
    len: u64,
}

impl ChunkWriter {
    async fn store_chunk(&mut self, chunk: &[u8]) -> io::Result<()> {
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| io::Error::other("body already finished"))?;
        sqlx::query("INSERT INTO blob_chunks (blob_id, idx, data) VALUES ($1, $2, $3)")
            .bind(self.id)
            .bind(self.next_idx)
            .bind(chunk)
            .execute(&mut **tx)
            .await
            .map_err(io_error)?;
        self.next_idx += 1;
        Ok(())
    }
}

#[async_trait]
impl BodyWriter for ChunkWriter {
    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        self.len += chunk.len() as u64;
        self.buffer.extend_from_slice(&chunk);
        while self.buffer.len() >= CHUNK_BYTES {
            let full = self.buffer.split_to(CHUNK_BYTES);
            self.store_chunk(&full).await?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> io::Result<StagedBody> {
        if !self.buffer.is_empty() {
            let rest = std::mem::take(&mut self.buffer);
            self.store_chunk(&rest).await?;
        }
        let mut tx = self
            .tx
            .take()
            .ok_or_else(|| io::Error::other("body already finished"))?;
        sqlx::query("UPDATE blobs SET len = $2 WHERE id = $1")
            .bind(self.id)
            .bind(self.len as i64)
            .execute(&mut *tx)
            .await
            .map_err(io_error)?;
        tx.commit().await.map_err(io_error)?;
        Ok(StagedBody::new(
            self.id.to_string(),
            self.len,
            Box::new(DeleteUnnamed {
                pool: self.pool.clone(),
                id: self.id,
            }),
        ))
    }
}

/// Deletes a committed blob that no delivery came to name.
#[derive(Debug)]
struct DeleteUnnamed {
    pool: PgPool,
    id: i64,
}

impl Staging for DeleteUnnamed {
    fn discard(&mut self) {
        let (pool, id) = (self.pool.clone(), self.id);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // swept at the next start
        };
        runtime.spawn(async move {
            let deleted = sqlx::query(
                "DELETE FROM blobs WHERE id = $1 \
                 AND NOT EXISTS (SELECT 1 FROM deliveries WHERE blob_id = $1)",
            )
            .bind(id)
            .execute(&pool)
            .await;
            if let Err(e) = deleted {
                tracing::debug!(error = %e, blob = id, "unnamed body left for the sweep");
            }
        });
    }
}

/// A stored body, read one chunk per query.
#[derive(Debug)]
struct StoredChunks {
    pool: PgPool,
    id: i64,
}

#[async_trait]
impl PayloadSource for StoredChunks {
    async fn open(&self) -> io::Result<ChunkStream> {
        let (pool, id) = (self.pool.clone(), self.id);
        Ok(stream::try_unfold(0_i32, move |idx| {
            let pool = pool.clone();
            async move {
                let data: Option<Vec<u8>> = sqlx::query_scalar(
                    "SELECT data FROM blob_chunks WHERE blob_id = $1 AND idx = $2",
                )
                .bind(id)
                .bind(idx)
                .fetch_optional(&pool)
                .await
                .map_err(io_error)?;
                Ok(data.map(|data| (Bytes::from(data), idx + 1)))
            }
        })
        .boxed())
    }
}
