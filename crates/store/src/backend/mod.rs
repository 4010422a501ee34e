//! Where chunk objects live: a small object-store interface with a local
//! filesystem and an S3 implementation.
//!
//! Objects are at most one stored chunk (a few hundred KiB), so `put` and `get`
//! move whole `Bytes`; ranges are resolved a level up, by choosing chunks.

mod fs;
mod s3;

use std::future::Future;

use bytes::Bytes;
use thiserror::Error;

pub use self::fs::FsBackend;
pub use self::s3::{S3Backend, S3Config};

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
    #[error("invalid backend configuration: {0}")]
    Config(String),
}

/// The operations the chunk store needs from an object store.
pub trait ObjectStore: Send + Sync {
    /// Stores an object. It is durable once [`ObjectStore::sync`] has
    /// returned for its key: batching that last step lets a backend pay for
    /// it once per upload instead of once per chunk. Writing the same key
    /// twice is harmless because keys name content.
    fn put(&self, key: &str, data: Bytes) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Makes the earlier puts of `keys` durable: after it returns, a crash
    /// loses none of them.
    fn sync(&self, keys: &[String]) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Fetches a whole object, or [`BackendError::NotFound`].
    fn get(&self, key: &str) -> impl Future<Output = Result<Bytes, BackendError>> + Send;

    fn exists(&self, key: &str) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Deletes an object; deleting a missing object succeeds, so an
    /// interrupted garbage collection can simply run again.
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// The backend chosen at run time. An enum rather than `dyn` keeps the trait's
/// `impl Future` methods and lets the compiler see every call.
#[derive(Debug, Clone)]
pub enum Backend {
    Fs(FsBackend),
    S3(S3Backend),
}

impl ObjectStore for Backend {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        match self {
            Self::Fs(b) => b.put(key, data).await,
            Self::S3(b) => b.put(key, data).await,
        }
    }

    async fn sync(&self, keys: &[String]) -> Result<(), BackendError> {
        match self {
            Self::Fs(b) => b.sync(keys).await,
            Self::S3(b) => b.sync(keys).await,
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        match self {
            Self::Fs(b) => b.get(key).await,
            Self::S3(b) => b.get(key).await,
        }
    }

    async fn exists(&self, key: &str) -> Result<bool, BackendError> {
        match self {
            Self::Fs(b) => b.exists(key).await,
            Self::S3(b) => b.exists(key).await,
        }
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        match self {
            Self::Fs(b) => b.delete(key).await,
            Self::S3(b) => b.delete(key).await,
        }
    }
}

#[cfg(test)]
pub(crate) mod conformance {
    //! One behavioural suite that every backend must pass.
    use super::*;

    pub async fn run(backend: &impl ObjectStore) {
        let key = "chunks/v1/ab/conformance-object";
        assert!(!backend.exists(key).await.unwrap());
        assert!(matches!(
            backend.get(key).await,
            Err(BackendError::NotFound(_))
        ));

        backend
            .put(key, Bytes::from_static(b"first"))
            .await
            .unwrap();
        assert!(backend.exists(key).await.unwrap());
        assert_eq!(backend.get(key).await.unwrap(), &b"first"[..]);

        // Overwrite is allowed (same key means same content in practice).
        backend
            .put(key, Bytes::from_static(b"first"))
            .await
            .unwrap();
        backend
            .put("chunks/v1/cd/empty", Bytes::new())
            .await
            .unwrap();
        assert_eq!(backend.get("chunks/v1/cd/empty").await.unwrap(), &b""[..]);

        let big = Bytes::from(vec![7u8; 300 * 1024]);
        backend.put("chunks/v1/ef/big", big.clone()).await.unwrap();
        assert_eq!(backend.get("chunks/v1/ef/big").await.unwrap(), big);

        backend.delete(key).await.unwrap();
        assert!(!backend.exists(key).await.unwrap());
        backend.delete(key).await.unwrap();
    }
}
