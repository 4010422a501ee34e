//! Where chunk objects live: a small object-store interface with a local
//! filesystem and an S3 implementation.
//!
//! Objects are written once, front to back, through an [`ObjectWriter`]
//! (packs of several MiB are streamed, not held in memory on the local
//! disk), and read by byte range, so a reader takes exactly the frames it
//! needs from a pack.

mod fs;
mod s3;

use std::future::Future;
use std::ops::Range;

use bytes::Bytes;
use thiserror::Error;

pub use self::fs::{FsBackend, FsWriter};
pub use self::s3::{S3Backend, S3Config, S3Writer};

use crate::error::BoxError;

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("object {0} does not exist")]
    NotFound(String),
    #[error("object {key}: {source}")]
    Io { key: String, source: std::io::Error },
    /// An S3 request failed; the SDK error stays boxed so its types do not
    /// leak into our API.
    #[error("S3 {operation} {key}: {source}")]
    S3 {
        operation: &'static str,
        key: String,
        source: BoxError,
    },
    /// The object ends before the range asked for: it was cut short, or
    /// the metadata names the wrong object.
    #[error("object {key} has {got} bytes at {start}, expected {expected}")]
    Short {
        key: String,
        start: u64,
        expected: u64,
        got: u64,
    },
    #[error("invalid backend configuration: {0}")]
    Config(String),
}

/// The operations the chunk store needs from an object store.
pub trait ObjectStore: Send + Sync {
    type Writer: ObjectWriter;

    /// Starts a new object. Nothing is visible under `key` until
    /// [`ObjectWriter::finish`], and it is durable once
    /// [`ObjectStore::sync`] has returned for its key: batching that last
    /// step lets a backend pay for it once per upload rather than per object.
    fn create(&self, key: &str) -> impl Future<Output = Result<Self::Writer, BackendError>> + Send;

    /// Makes the earlier objects `keys` durable: after it returns, a crash
    /// loses none of them.
    fn sync(&self, keys: &[String]) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Fetches `range` of an object: exactly its length, or
    /// [`BackendError::NotFound`], or [`BackendError::Short`] when the
    /// object ends first. An empty range may succeed without looking.
    fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
    ) -> impl Future<Output = Result<Bytes, BackendError>> + Send;

    /// Deletes an object; deleting a missing object succeeds, so an
    /// interrupted garbage collection can simply run again.
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Up to `limit` objects whose keys start with `prefix` and sort after
    /// `after`, in key order: one page of a listing, for GC to find objects
    /// no metadata names. Unfinished objects a backend keeps under their
    /// own names (the local disk's temporary files) are listed too.
    fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Listed>, BackendError>> + Send;
}

/// An object found by [`ObjectStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    /// When it was last written, in unix seconds: GC leaves objects younger
    /// than an upload could take alone.
    pub modified: i64,
}

/// An object being written, front to back. Dropping it unfinished leaves
/// nothing under its key.
pub trait ObjectWriter: Send + Sync + 'static {
    /// Appends bytes. A backend may hold them until enough have gathered
    /// for one efficient write.
    fn write(&mut self, data: Bytes) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Puts the whole object under its key.
    fn finish(self) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// The backend chosen at run time. An enum rather than `dyn` keeps the trait's
/// `impl Future` methods and lets the compiler see every call.
#[derive(Debug, Clone)]
pub enum Backend {
    Fs(FsBackend),
    S3(S3Backend),
}

/// A [`Backend`]'s object being written.
#[derive(Debug)]
pub enum BackendWriter {
    Fs(FsWriter),
    S3(S3Writer),
}

impl ObjectStore for Backend {
    type Writer = BackendWriter;

    async fn create(&self, key: &str) -> Result<BackendWriter, BackendError> {
        Ok(match self {
            Self::Fs(b) => BackendWriter::Fs(b.create(key).await?),
            Self::S3(b) => BackendWriter::S3(b.create(key).await?),
        })
    }

    async fn sync(&self, keys: &[String]) -> Result<(), BackendError> {
        match self {
            Self::Fs(b) => b.sync(keys).await,
            Self::S3(b) => b.sync(keys).await,
        }
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, BackendError> {
        match self {
            Self::Fs(b) => b.get_range(key, range).await,
            Self::S3(b) => b.get_range(key, range).await,
        }
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        match self {
            Self::Fs(b) => b.delete(key).await,
            Self::S3(b) => b.delete(key).await,
        }
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Listed>, BackendError> {
        match self {
            Self::Fs(b) => b.list(prefix, after, limit).await,
            Self::S3(b) => b.list(prefix, after, limit).await,
        }
    }
}

impl ObjectWriter for BackendWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), BackendError> {
        match self {
            Self::Fs(w) => w.write(data).await,
            Self::S3(w) => w.write(data).await,
        }
    }

    async fn finish(self) -> Result<(), BackendError> {
        match self {
            Self::Fs(w) => w.finish().await,
            Self::S3(w) => w.finish().await,
        }
    }
}

/// Writes a whole object and makes it durable: for small objects and tests.
pub async fn put<B: ObjectStore>(backend: &B, key: &str, data: Bytes) -> Result<(), BackendError> {
    let mut writer = backend.create(key).await?;
    writer.write(data).await?;
    writer.finish().await?;
    backend.sync(&[key.to_owned()]).await
}

#[cfg(test)]
pub(crate) mod conformance {
    //! One behavioural suite that every backend must pass.
    use super::*;

    async fn missing(backend: &impl ObjectStore, key: &str) -> bool {
        matches!(
            backend.get_range(key, 0..1).await,
            Err(BackendError::NotFound(_))
        )
    }

    pub async fn run(backend: &impl ObjectStore) {
        let key = "chunks/v1/ab/conformance-object";
        assert!(missing(backend, key).await);

        put(backend, key, Bytes::from_static(b"first"))
            .await
            .unwrap();
        assert_eq!(backend.get_range(key, 0..5).await.unwrap(), &b"first"[..]);
        assert_eq!(backend.get_range(key, 1..3).await.unwrap(), &b"ir"[..]);
        assert_eq!(backend.get_range(key, 5..5).await.unwrap(), &b""[..]);
        assert!(matches!(
            backend.get_range(key, 3..9).await,
            Err(BackendError::Short { .. })
        ));

        // An object written in pieces reads back whole and by range; nothing
        // is visible before it is finished, and a dropped writer leaves
        // nothing.
        let pack = "packs/v1/ef/conformance-pack";
        let mut writer = backend.create(pack).await.unwrap();
        let mut whole = Vec::new();
        for i in 0..40u8 {
            let piece = vec![i; 7000 + usize::from(i) * 1000];
            whole.extend_from_slice(&piece);
            writer.write(Bytes::from(piece)).await.unwrap();
            assert!(missing(backend, pack).await);
        }
        writer.finish().await.unwrap();
        backend.sync(&[pack.to_owned()]).await.unwrap();
        let len = whole.len() as u64;
        assert_eq!(backend.get_range(pack, 0..len).await.unwrap(), whole);
        assert_eq!(
            backend.get_range(pack, 70_001..300_000).await.unwrap(),
            &whole[70_001..300_000]
        );
        let dropped = "packs/v1/ef/dropped";
        let mut writer = backend.create(dropped).await.unwrap();
        writer.write(Bytes::from_static(b"never")).await.unwrap();
        drop(writer);
        assert!(missing(backend, dropped).await);

        // Listing: in key order, by prefix, page by page.
        put(backend, "packs/v1/00/first", Bytes::from_static(b"1"))
            .await
            .unwrap();
        let all = backend.list("packs/", None, 100).await.unwrap();
        let keys: Vec<&str> = all.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["packs/v1/00/first", pack]);
        assert_eq!(all[1].size, len);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(all[1].modified.abs_diff(now.cast_signed()) < 600, "{all:?}");
        let page = backend.list("packs/", None, 1).await.unwrap();
        assert_eq!(page, all[..1]);
        let rest = backend
            .list("packs/", Some(&page[0].key), 10)
            .await
            .unwrap();
        assert_eq!(rest, all[1..]);
        let chunks = backend.list("chunks/", None, 10).await.unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].key, key);
        assert!(backend.list("nothing/", None, 10).await.unwrap().is_empty());

        backend.delete(key).await.unwrap();
        assert!(missing(backend, key).await);
        backend.delete(key).await.unwrap();
        backend.delete(pack).await.unwrap();
        backend.delete("packs/v1/00/first").await.unwrap();
        assert!(backend.list("", None, 10).await.unwrap().is_empty());
    }
}
