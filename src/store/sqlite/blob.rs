//! Blob files: bodies too large to sit in a database row, kept in a directory beside the
//! database (`<database>.blobs/`). This is the SQLite back-end's [`BodyStore`].
//!
//! A body is written while it streams in (so it is never whole in memory), fsync'd, and only
//! then handed to the store, which makes the directory entry durable and commits the row that
//! names it. A blob that never reaches a commit (refused request, duplicate, crash before the
//! answer) is removed: by its [`StagedBody`] being dropped in the first two cases, by
//! [`BlobDir::sweep_orphans`] after a crash.

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::health::Health;
use crate::delivery::{ChunkStream, PayloadSource, StagedBody, Staging};
use crate::store::{BodyStore, BodyWriter};

/// Bytes gathered before one write call, so a large body costs few syscalls.
const WRITE_BUFFER_BYTES: usize = 1 << 20;
/// Size of the pieces a blob is read back in.
const READ_CHUNK_BYTES: usize = 64 * 1024;
static NEXT_BLOB: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone)]
pub struct BlobDir {
    path: PathBuf,
    /// Told when a body cannot be written: readiness tracks what deliveries meet.
    health: std::sync::Arc<Health>,
}

impl BlobDir {
    pub fn new(path: PathBuf, health: std::sync::Arc<Health>) -> Self {
        Self { path, health }
    }

    /// The file a row's `blob_name` refers to.
    pub fn resolve(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A handle that reads the blob `name` of `len` bytes.
    pub fn source(&self, name: &str) -> std::sync::Arc<dyn PayloadSource> {
        std::sync::Arc::new(BlobFile {
            path: self.resolve(name),
        })
    }

    /// Deletes the blob files of bodies that retention dropped (their rows are committed
    /// without them). Best effort: a file left behind is swept at the next start.
    pub fn remove(&self, names: &[String]) {
        for name in names {
            if let Err(e) = std::fs::remove_file(self.resolve(name)) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(error = %e, blob = %name, "could not delete a pruned body");
                }
            }
        }
    }

    /// Makes the directory entries of newly written blobs durable.
    pub fn sync_dir(&self) -> io::Result<()> {
        std::fs::File::open(&self.path)?.sync_all()
    }

    /// Removes blob files that no row names (left by a crash between write and commit).
    /// `referenced` holds file names. Only for a server that holds the serving lock and has not
    /// started taking requests yet: then no other writer of this directory exists and no
    /// request is in flight, so every unnamed file is an orphan, however young.
    pub fn sweep_orphans(&self, referenced: &HashSet<String>) -> io::Result<usize> {
        let entries = match std::fs::read_dir(&self.path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".body") && !referenced.contains(&name) {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[async_trait]
impl BodyStore for BlobDir {
    /// Starts a new blob with a name no other process or request uses.
    async fn create(&self) -> io::Result<Box<dyn BodyWriter>> {
        self.create_file().await.inspect_err(|e| self.failed(e))
    }
}

impl BlobDir {
    fn failed(&self, e: &io::Error) {
        self.health.delivery_failed(&format!(
            "cannot write a body in {}: {e}",
            self.path.display()
        ));
    }

    async fn create_file(&self) -> io::Result<Box<dyn BodyWriter>> {
        if !tokio::fs::try_exists(&self.path).await.unwrap_or(false) {
            tokio::fs::create_dir_all(&self.path).await?;
            // The new directory's own entry must survive a power loss too.
            if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
                tokio::fs::File::open(parent).await?.sync_all().await?;
            }
        }
        let name = format!(
            "{}-{}-{}.body",
            std::process::id(),
            time::OffsetDateTime::now_utc().unix_timestamp_nanos(),
            NEXT_BLOB.fetch_add(1, Ordering::Relaxed)
        );
        let path = self.path.join(&name);
        let file = tokio::fs::File::create(&path).await?;
        Ok(Box::new(BlobWriter {
            file: tokio::io::BufWriter::with_capacity(WRITE_BUFFER_BYTES, file),
            guard: Some(RemoveFile { path }),
            name,
            len: 0,
            dir: self.clone(),
        }))
    }
}

/// Removes its file when the body it staged is discarded.
#[derive(Debug)]
struct RemoveFile {
    path: PathBuf,
}

impl Staging for RemoveFile {
    fn discard(&mut self) {
        // Best effort: a leftover is swept at the next start.
        let _ = std::fs::remove_file(&self.path);
    }
}

struct BlobWriter {
    file: tokio::io::BufWriter<tokio::fs::File>,
    /// Taken by `finish`; a writer dropped before it removes its partial file.
    guard: Option<RemoveFile>,
    name: String,
    len: u64,
    dir: BlobDir,
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(mut guard) = self.guard.take() {
            guard.discard();
        }
    }
}

#[async_trait]
impl BodyWriter for BlobWriter {
    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        if let Err(e) = self.file.write_all(&chunk).await {
            self.dir.failed(&e);
            return Err(e);
        }
        self.len += chunk.len() as u64;
        Ok(())
    }

    /// Flushes and fsyncs the file; the directory entry is synced by the store's commit.
    async fn finish(mut self: Box<Self>) -> io::Result<StagedBody> {
        let synced = match self.file.flush().await {
            Ok(()) => self.file.get_ref().sync_all().await,
            Err(e) => Err(e),
        };
        if let Err(e) = synced {
            self.dir.failed(&e);
            return Err(e);
        }
        let guard = self
            .guard
            .take()
            .ok_or_else(|| io::Error::other("blob already finished"))?;
        Ok(StagedBody::new(
            std::mem::take(&mut self.name),
            self.len,
            Box::new(guard),
        ))
    }
}

/// A stored blob, read back in chunks.
#[derive(Debug)]
struct BlobFile {
    path: PathBuf,
}

#[async_trait]
impl PayloadSource for BlobFile {
    async fn open(&self) -> io::Result<ChunkStream> {
        let file = tokio::fs::File::open(&self.path).await?;
        Ok(tokio_util::io::ReaderStream::with_capacity(file, READ_CHUNK_BYTES).boxed())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_blob_reads_back_and_goes_away_unless_kept() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::new(dir.path().join("x.blobs"), Default::default());
        let mut writer = blobs.create().await.unwrap();
        writer.write(Bytes::from_static(b"hello ")).await.unwrap();
        writer.write(Bytes::from_static(b"world")).await.unwrap();
        let staged = writer.finish().await.unwrap();
        let name = staged.key().to_owned();
        let body = crate::delivery::Payload::stored(staged.len(), blobs.source(&name));
        assert_eq!(&body.read_all().await.unwrap()[..], b"hello world");
        drop(staged);
        assert!(!blobs.resolve(&name).exists());

        let mut writer = blobs.create().await.unwrap();
        writer.write(Bytes::from_static(b"kept")).await.unwrap();
        let staged = writer.finish().await.unwrap();
        let name = staged.key().to_owned();
        staged.keep();
        assert!(blobs.resolve(&name).exists());
    }

    #[tokio::test]
    async fn an_unfinished_blob_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::new(dir.path().join("x.blobs"), Default::default());
        let mut writer = blobs.create().await.unwrap();
        writer.write(Bytes::from_static(b"partial")).await.unwrap();
        drop(writer);
        assert_eq!(
            std::fs::read_dir(dir.path().join("x.blobs"))
                .unwrap()
                .count(),
            0
        );
    }
}
