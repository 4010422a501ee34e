//! Chunk objects as files under a root directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::{BackendError, ObjectStore};

/// Local-disk backend, the embedded default.
///
/// Writes go to a temporary file next to the final name, are fsynced and
/// renamed into place: a crash leaves either the whole object or nothing,
/// never a short file under the final name (at worst a `.partial-*` file,
/// which no key names, for a GC sweep). The temporary file lives in the
/// object's own fan-out directory, not one shared directory: a rename
/// across directories locks both, and one directory taking every create
/// serialised concurrent writers in ext4 (measured: most of an upload's
/// system time). The directory fsync that makes a rename durable is
/// deferred to [`ObjectStore::sync`], which does it once per fan-out
/// directory for a whole upload rather than once per chunk.
#[derive(Debug, Clone)]
pub struct FsBackend {
    root: Arc<PathBuf>,
}

impl FsBackend {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, BackendError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|source| BackendError::Io {
            key: root.display().to_string(),
            source,
        })?;
        Ok(Self {
            root: Arc::new(root),
        })
    }

    fn path(&self, key: &str) -> Result<PathBuf, BackendError> {
        // Keys are ours, but a key that could escape the root is a bug worth
        // refusing loudly rather than a path to follow.
        if key.is_empty()
            || key.starts_with('/')
            || key.split('/').any(|s| s.is_empty() || s == "..")
        {
            return Err(BackendError::Config(format!("invalid object key {key:?}")));
        }
        Ok(self.root.join(key))
    }

    fn put_blocking(path: &Path, key: &str, data: &[u8]) -> std::io::Result<()> {
        let dir = path.parent().expect("object keys have a directory");
        if !dir.is_dir() {
            // A new fan-out directory is made durable at once (rare: a few
            // hundred in a store's life), so `sync` only has to care about
            // the entries inside it.
            std::fs::create_dir_all(dir)?;
            if let Some(parent) = dir.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
        }
        let mut tmp = tempfile::Builder::new()
            .prefix(".partial-")
            .tempfile_in(dir)?;
        tmp.write_all(data)?;
        tmp.as_file().sync_data()?;
        tmp.persist(path).map_err(|e| e.error)?;
        tracing::trace!(key, bytes = data.len(), "stored object");
        Ok(())
    }
}

fn io_err(key: &str) -> impl FnOnce(std::io::Error) -> BackendError + '_ {
    move |source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            BackendError::NotFound(key.to_owned())
        } else {
            BackendError::Io {
                key: key.to_owned(),
                source,
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    key: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::Io {
            key: key.to_owned(),
            source: std::io::Error::other(e),
        })?
        .map_err(io_err(key))
}

impl ObjectStore for FsBackend {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        let path = self.path(key)?;
        let owned_key = key.to_owned();
        blocking(key, move || Self::put_blocking(&path, &owned_key, &data)).await
    }

    async fn sync(&self, keys: &[String]) -> Result<(), BackendError> {
        let mut dirs = std::collections::BTreeSet::new();
        for key in keys {
            let path = self.path(key)?;
            dirs.insert(
                path.parent()
                    .expect("object keys have a directory")
                    .to_owned(),
            );
        }
        blocking("sync", move || {
            for dir in dirs {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        let path = self.path(key)?;
        blocking(key, move || std::fs::read(path).map(Bytes::from)).await
    }

    async fn exists(&self, key: &str) -> Result<bool, BackendError> {
        let path = self.path(key)?;
        blocking(key, move || path.try_exists()).await
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = self.path(key)?;
        blocking(key, move || match std::fs::remove_file(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FsBackend::new(dir.path()).unwrap();
        super::super::conformance::run(&backend).await;
        // No temporary file is left behind anywhere.
        let mut dirs = vec![dir.path().to_owned()];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(d).unwrap() {
                let entry = entry.unwrap();
                let name = entry.file_name();
                assert!(!name.to_string_lossy().starts_with(".partial-"), "{name:?}");
                if entry.file_type().unwrap().is_dir() {
                    dirs.push(entry.path());
                }
            }
        }
    }

    #[tokio::test]
    async fn refuses_escaping_keys() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FsBackend::new(dir.path()).unwrap();
        for key in ["../x", "/etc/passwd", "a//b", ""] {
            assert!(
                matches!(backend.get(key).await, Err(BackendError::Config(_))),
                "{key}"
            );
        }
    }
}
