//! Objects as files under a root directory.

use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tempfile::NamedTempFile;

use super::{BackendError, Listed, ObjectStore, ObjectWriter};

/// Local-disk backend, the embedded default.
///
/// An object is written to a temporary file next to its final name, fsynced
/// and renamed into place: a crash leaves either the whole object or
/// nothing, never a short file under the final name (at worst a
/// `.partial-*` file, which no key names, for a GC sweep). The temporary
/// file lives in the object's own fan-out directory, not one shared
/// directory: a rename across directories locks both, and one directory
/// taking every create serialised concurrent writers in ext4 (measured:
/// most of an upload's system time). The directory fsync that makes a
/// rename durable is deferred to [`ObjectStore::sync`], which does it once
/// per fan-out directory for a whole upload rather than once per object.
#[derive(Debug, Clone)]
pub struct FsBackend {
    root: Arc<PathBuf>,
}

/// Bytes gathered before one `write` to the temporary file: large writes
/// keep the blocking-pool handoffs few, small ones keep the memory an upload
/// holds small whatever the pack size.
const WRITE_BATCH: usize = 1 << 20;

/// A file being written in its fan-out directory.
#[derive(Debug)]
pub struct FsWriter {
    key: String,
    path: PathBuf,
    /// `None` only while a blocking task holds it; a failed write drops it,
    /// and with it the temporary file.
    file: Option<NamedTempFile>,
    pending: Vec<Bytes>,
    pending_len: usize,
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

    fn create_blocking(path: &Path) -> std::io::Result<NamedTempFile> {
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
        tempfile::Builder::new()
            .prefix(".partial-")
            .tempfile_in(dir)
    }

    /// `range` of the file, or `Err(len)` when the file has only `len` bytes.
    fn read_blocking(path: &Path, range: &Range<u64>) -> std::io::Result<Result<Bytes, u64>> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        if len < range.end {
            return Ok(Err(len));
        }
        let size = usize::try_from(range.end - range.start)
            .map_err(|_| std::io::Error::other("range does not fit in memory"))?;
        let mut buf = vec![0; size];
        file.read_exact_at(&mut buf, range.start)?;
        Ok(Ok(Bytes::from(buf)))
    }
}

impl FsWriter {
    /// Writes the gathered bytes on the blocking pool, then, if `finish`,
    /// makes the file durable and renames it into place.
    async fn flush(&mut self, finish: bool) -> Result<(), BackendError> {
        let mut file = self.file.take().ok_or_else(|| BackendError::Io {
            key: self.key.clone(),
            source: std::io::Error::other("an earlier write failed"),
        })?;
        let pending = std::mem::take(&mut self.pending);
        self.pending_len = 0;
        let path = self.path.clone();
        let key = self.key.clone();
        let file = blocking(&self.key, move || {
            for piece in &pending {
                file.write_all(piece)?;
            }
            if finish {
                file.as_file().sync_data()?;
                file.persist(&path).map_err(|e| e.error)?;
                tracing::trace!(key, "stored object");
                return Ok(None);
            }
            Ok(Some(file))
        })
        .await?;
        self.file = file;
        Ok(())
    }
}

impl ObjectWriter for FsWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), BackendError> {
        self.pending_len += data.len();
        self.pending.push(data);
        if self.pending_len >= WRITE_BATCH {
            self.flush(false).await?;
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<(), BackendError> {
        self.flush(true).await
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
    type Writer = FsWriter;

    async fn create(&self, key: &str) -> Result<FsWriter, BackendError> {
        let path = self.path(key)?;
        let target = path.clone();
        let file = blocking(key, move || Self::create_blocking(&target)).await?;
        Ok(FsWriter {
            key: key.to_owned(),
            path,
            file: Some(file),
            pending: Vec::new(),
            pending_len: 0,
        })
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

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, BackendError> {
        let path = self.path(key)?;
        let wanted = range.clone();
        blocking(key, move || Self::read_blocking(&path, &wanted))
            .await?
            .map_err(|len| BackendError::Short {
                key: key.to_owned(),
                start: range.start,
                expected: range.end - range.start,
                got: len.saturating_sub(range.start),
            })
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = self.path(key)?;
        blocking(key, move || match std::fs::remove_file(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        })
        .await
    }

    /// Walks the whole tree under the root and sorts it for each page: the
    /// local disk holds a pack per 16 MiB (some thousands of files), so a
    /// walk is cheap next to the GC run that asks, and it needs no cursor
    /// kept between pages.
    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Listed>, BackendError> {
        let root = Arc::clone(&self.root);
        let (prefix, after) = (prefix.to_owned(), after.map(str::to_owned));
        blocking(&prefix.clone(), move || {
            let mut found = Vec::new();
            walk(&root, &root, &mut found)?;
            let mut found: Vec<Listed> = found
                .into_iter()
                .filter(|o| o.key.starts_with(&prefix))
                .filter(|o| after.as_ref().is_none_or(|a| o.key > *a))
                .collect();
            found.sort_unstable_by(|a, b| a.key.cmp(&b.key));
            found.truncate(limit);
            Ok(found)
        })
        .await
    }
}

/// Adds every file under `dir` to `found`, keyed by its path from `root`.
/// Writers keep creating, renaming and deleting files meanwhile: an entry
/// gone between the directory read and its `stat` is simply not listed.
fn walk(root: &Path, dir: &Path, found: &mut Vec<Listed>) -> std::io::Result<()> {
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let entries = match std::fs::read_dir(dir) {
        Err(e) if gone(&e) => return Ok(()),
        entries => entries?,
    };
    for entry in entries {
        let entry = entry?;
        let meta = match entry.metadata() {
            Err(e) if gone(&e) => continue,
            meta => meta?,
        };
        if meta.is_dir() {
            walk(root, &entry.path(), found)?;
        } else if let Some(key) = entry
            .path()
            .strip_prefix(root)
            .ok()
            .and_then(|p| p.to_str())
        {
            let modified = meta
                .modified()?
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            found.push(Listed {
                key: key.to_owned(),
                size: meta.len(),
                modified,
            });
        }
    }
    Ok(())
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
                matches!(
                    backend.get_range(key, 0..1).await,
                    Err(BackendError::Config(_))
                ),
                "{key}"
            );
        }
    }
}
