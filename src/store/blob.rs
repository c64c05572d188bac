//! Blob files: bodies too large to sit in a database row, kept next to the database.
//!
//! A body is written while it streams in (so it is never whole in memory), fsync'd, and only
//! then handed to the store, which makes the directory entry durable and commits the row that
//! names it. A blob that never reaches a commit (refused request, duplicate, crash before the
//! answer) is removed: by `Drop` in the first two cases, by [`BlobDir::sweep_orphans`] after a
//! crash.

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::AsyncWriteExt;

/// Bytes gathered before one write call, so a large body costs few syscalls.
const WRITE_BUFFER_BYTES: usize = 1 << 20;
/// Files younger than this are never swept: they may belong to a request still in flight.
const SWEEP_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

static NEXT_BLOB: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone)]
pub struct BlobDir {
    path: PathBuf,
}

impl BlobDir {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// The file a row's `blob_name` refers to.
    pub fn resolve(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Starts a new blob with a name no other process or request uses.
    pub async fn create(&self) -> io::Result<BlobWriter> {
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
        let path = self.path.join(name);
        let file = tokio::fs::File::create(&path).await?;
        Ok(BlobWriter {
            file: tokio::io::BufWriter::with_capacity(WRITE_BUFFER_BYTES, file),
            guard: BlobGuard { path, keep: false },
            len: 0,
        })
    }

    /// Makes the directory entries of newly written blobs durable.
    pub fn sync_dir(&self) -> io::Result<()> {
        std::fs::File::open(&self.path)?.sync_all()
    }

    /// Removes blob files that no row names (left by a crash between write and commit), when
    /// they are older than `SWEEP_GRACE`. `referenced` holds file names.
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
            let old = entry
                .metadata()?
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > SWEEP_GRACE);
            if name.ends_with(".body") && old && !referenced.contains(&name) {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Removes its file on drop unless told to keep it.
#[derive(Debug)]
struct BlobGuard {
    path: PathBuf,
    keep: bool,
}

impl Drop for BlobGuard {
    fn drop(&mut self) {
        if !self.keep {
            // Best effort: a leftover is swept at the next start.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[derive(Debug)]
pub struct BlobWriter {
    file: tokio::io::BufWriter<tokio::fs::File>,
    guard: BlobGuard,
    len: u64,
}

impl BlobWriter {
    pub async fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.file.write_all(chunk).await?;
        self.len += chunk.len() as u64;
        Ok(())
    }

    /// Flushes and fsyncs the file; the directory entry is synced by the store's commit.
    pub async fn finish(mut self) -> io::Result<StagedBlob> {
        self.file.flush().await?;
        self.file.get_ref().sync_all().await?;
        Ok(StagedBlob {
            guard: self.guard,
            len: self.len,
        })
    }
}

/// A blob on disk, fsync'd, waiting for the row that names it.
#[derive(Debug)]
pub struct StagedBlob {
    guard: BlobGuard,
    len: u64,
}

impl StagedBlob {
    /// The file name a row records.
    pub fn name(&self) -> String {
        self.guard
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Called once the row naming this blob is committed.
    pub fn keep(mut self) -> PathBuf {
        self.guard.keep = true;
        self.guard.path.clone()
    }
}
