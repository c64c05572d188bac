//! A delivery's body, as the store keeps it and as handlers receive it: in memory when small,
//! otherwise a handle on the store's copy that is read as a stream of chunks. Whatever the
//! back-end keeps large bodies in (a file beside the SQLite database, chunks in a PostgreSQL
//! table), nothing outside the store knows: a body never names a path, so it can be handled on
//! any replica, and it is never read whole into memory by the service.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, Stream, StreamExt};

/// A body as a stream of chunks; errors are I/O errors (the store could not be read, or the
/// body ended early).
pub type ChunkStream = BoxStream<'static, io::Result<Bytes>>;

/// Something that can open a stored body from its start, as often as asked (the `http`
/// handler reads a body once for its signature and once to send it).
#[async_trait::async_trait]
pub trait PayloadSource: Send + Sync + fmt::Debug {
    async fn open(&self) -> io::Result<ChunkStream>;
}

/// A delivery's raw body.
#[derive(Debug, Clone)]
pub struct Payload {
    len: u64,
    repr: Repr,
}

#[derive(Debug, Clone)]
enum Repr {
    Inline(Bytes),
    Stored(Arc<dyn PayloadSource>),
}

impl Payload {
    /// A body held in memory.
    pub fn inline(bytes: Bytes) -> Self {
        Self {
            len: bytes.len() as u64,
            repr: Repr::Inline(bytes),
        }
    }

    /// A body of `len` bytes kept by the store; `source` opens it.
    pub fn stored(len: u64, source: Arc<dyn PayloadSource>) -> Self {
        Self {
            len,
            repr: Repr::Stored(source),
        }
    }

    /// Length of the body in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, when the body is in memory (small bodies always are).
    pub fn as_inline(&self) -> Option<&Bytes> {
        match &self.repr {
            Repr::Inline(bytes) => Some(bytes),
            Repr::Stored(_) => None,
        }
    }

    /// The body from its start, in chunks. A stored body that ends before `len` bytes, or runs
    /// past them, is an error rather than a silently different body. Every error of a stored
    /// body carries a [`BodyReadError`], so that a caller copying the body somewhere can tell
    /// the body's failure from its destination's.
    pub async fn stream(&self) -> io::Result<ChunkStream> {
        match &self.repr {
            Repr::Inline(bytes) => Ok(stream::once(std::future::ready(Ok(bytes.clone()))).boxed()),
            Repr::Stored(source) => Ok(Exact {
                inner: source.open().await.map_err(BodyReadError::wrap)?,
                remaining: self.len,
                done: false,
            }
            .map(|chunk| chunk.map_err(BodyReadError::wrap))
            .boxed()),
        }
    }

    /// The whole body in memory; for callers that know it to be small enough.
    pub async fn read_all(&self) -> io::Result<Bytes> {
        if let Repr::Inline(bytes) = &self.repr {
            return Ok(bytes.clone());
        }
        let mut all = Vec::with_capacity(usize::try_from(self.len).unwrap_or(0));
        let mut chunks = self.stream().await?;
        while let Some(chunk) = chunks.next().await {
            all.extend_from_slice(&chunk?);
        }
        Ok(Bytes::from(all))
    }

    /// A blocking reader over the body, for parsers that read (`serde_json::from_reader`). Call
    /// it inside the runtime and use it on a blocking thread (`spawn_blocking`).
    pub async fn blocking_reader(&self) -> io::Result<impl io::Read + Send + 'static> {
        let stream = self.stream().await?;
        Ok(tokio_util::io::SyncIoBridge::new(
            tokio_util::io::StreamReader::new(stream),
        ))
    }
}

/// A stored body could not be read (its file is gone or unreadable, its chunks are missing,
/// it is shorter or longer than recorded), as opposed to whatever it was being copied to.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the delivery's stored body: {0}")]
pub struct BodyReadError(io::Error);

impl BodyReadError {
    /// `error` marked as the body's, keeping its kind.
    fn wrap(error: io::Error) -> io::Error {
        if Self::find(&error).is_some() {
            return error;
        }
        io::Error::new(error.kind(), BodyReadError(error))
    }

    /// The body's own failure inside `error`, when that is what it is.
    pub fn find(error: &io::Error) -> Option<&BodyReadError> {
        error.get_ref()?.downcast_ref::<BodyReadError>()
    }
}

/// Passes exactly `remaining` bytes through, and fails on fewer or more.
struct Exact {
    inner: ChunkStream,
    remaining: u64,
    done: bool,
}

impl Stream for Exact {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                let len = chunk.len() as u64;
                if len > self.remaining {
                    self.done = true;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "stored body is longer than recorded",
                    ))));
                }
                self.remaining -= len;
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.done = true;
                if self.remaining == 0 {
                    Poll::Ready(None)
                } else {
                    // Handing on a truncated body as if it were whole would be worse than failing.
                    Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("stored body ended {} bytes early", self.remaining),
                    ))))
                }
            }
        }
    }
}

/// What a stored body's writer leaves behind until the delivery naming it is committed, and
/// how to remove it if that never happens.
pub trait Staging: Send + Sync + fmt::Debug {
    /// Removes the staged bytes (best effort; the store sweeps what is left after a crash).
    fn discard(&mut self);
}

/// A large body written to the store while it streamed in, not yet named by any delivery.
/// Dropped without [`StagedBody::keep`], its bytes are discarded.
#[derive(Debug)]
pub struct StagedBody {
    key: String,
    len: u64,
    staging: Option<Box<dyn Staging>>,
}

impl StagedBody {
    /// `key` is how the store that wrote it finds it again.
    pub fn new(key: String, len: u64, staging: Box<dyn Staging>) -> Self {
        Self {
            key,
            len,
            staging: Some(staging),
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Called by the store once the delivery naming this body is committed.
    pub fn keep(mut self) {
        self.staging = None;
    }
}

impl Drop for StagedBody {
    fn drop(&mut self) {
        if let Some(mut staging) = self.staging.take() {
            staging.discard();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Chunks(Vec<&'static [u8]>);

    #[async_trait::async_trait]
    impl PayloadSource for Chunks {
        async fn open(&self) -> io::Result<ChunkStream> {
            let chunks: Vec<io::Result<Bytes>> =
                self.0.iter().map(|c| Ok(Bytes::from_static(c))).collect();
            Ok(stream::iter(chunks).boxed())
        }
    }

    #[tokio::test]
    async fn a_stored_body_reads_back_whole_and_can_be_opened_twice() {
        let body = Payload::stored(6, Arc::new(Chunks(vec![b"ab", b"cd", b"ef"])));
        assert!(body.as_inline().is_none());
        assert_eq!(
            body.read_all().await.unwrap(),
            Bytes::from_static(b"abcdef")
        );
        assert_eq!(body.read_all().await.unwrap().len(), 6);
    }

    #[tokio::test]
    async fn a_stored_body_shorter_or_longer_than_recorded_is_an_error() {
        let short = Payload::stored(10, Arc::new(Chunks(vec![b"abc"])));
        let err = short.read_all().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let long = Payload::stored(2, Arc::new(Chunks(vec![b"abc"])));
        let err = long.read_all().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(BodyReadError::find(&err).is_some(), "{err}");
    }

    #[derive(Debug)]
    struct Gone;

    #[async_trait::async_trait]
    impl PayloadSource for Gone {
        async fn open(&self) -> io::Result<ChunkStream> {
            Err(io::Error::new(io::ErrorKind::NotFound, "no such blob"))
        }
    }

    #[tokio::test]
    async fn a_stored_body_that_cannot_be_opened_says_it_is_the_body() {
        let err = Payload::stored(3, Arc::new(Gone))
            .stream()
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(BodyReadError::find(&err).is_some());
        assert_eq!(
            err.to_string(),
            "cannot read the delivery's stored body: no such blob"
        );
    }

    #[derive(Debug)]
    struct Flag(Arc<std::sync::atomic::AtomicBool>);

    impl Staging for Flag {
        fn discard(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_staged_body_is_discarded_unless_kept() {
        let discarded = Arc::new(std::sync::atomic::AtomicBool::new(false));
        drop(StagedBody::new(
            "a".into(),
            1,
            Box::new(Flag(discarded.clone())),
        ));
        assert!(discarded.load(std::sync::atomic::Ordering::SeqCst));
        let kept = Arc::new(std::sync::atomic::AtomicBool::new(false));
        StagedBody::new("b".into(), 1, Box::new(Flag(kept.clone()))).keep();
        assert!(!kept.load(std::sync::atomic::Ordering::SeqCst));
    }
}
