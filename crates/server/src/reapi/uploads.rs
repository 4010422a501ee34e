//! Unfinished ByteStream uploads: where their bytes wait, and the bounds on
//! how many there are and how much they hold.
//!
//! An upload's bytes are kept in memory up to a small per-session amount,
//! then appended to a spool file in large writes. Spool files live in the
//! server's private spool directory (0700), are created 0600 and unlinked at
//! once: only this process's open handle reaches them, and a crash leaves
//! nothing behind. Anything in the directory when a core starts is stale and
//! removed.
//!
//! Every session's bytes are counted against process-wide quotas
//! ([`UploadLimits`]); a Write that would exceed one fails with
//! RESOURCE_EXHAUSTED and keeps what it had. Sessions not resumed within
//! their TTL are swept by a background task that ends with the core.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::UploadLimits;
use crate::error::Error;

/// How often expired sessions are swept.
const SWEEP_INTERVAL: Duration = Duration::from_mins(1);

/// What all sessions hold together, for the quotas.
#[derive(Debug, Default)]
struct Usage {
    memory: AtomicU64,
    spooled: AtomicU64,
}

/// Adds `n` to `counter` if the sum stays within `max`.
fn reserve(counter: &AtomicU64, n: u64, max: u64) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
            held.checked_add(n).filter(|&total| total <= max)
        })
        .is_ok()
}

fn release(counter: &AtomicU64, n: u64) {
    counter.fetch_sub(n, Ordering::AcqRel);
}

#[expect(
    clippy::needless_pass_by_value,
    reason = "used as map_err(io), which passes the error by value"
)]
fn io(e: std::io::Error) -> Error {
    Error::Internal(format!("upload spool: {e}"))
}

/// Where one upload's bytes wait: a spool file (once the upload outgrows
/// memory), then the bytes received since the last write to it.
#[derive(Debug)]
pub(crate) struct Spool {
    usage: Arc<Usage>,
    limits: UploadLimits,
    dir: PathBuf,
    file: Option<std::fs::File>,
    file_len: u64,
    /// Received after everything in the file, in order. Its length is kept
    /// so an append costs O(1) however many small messages came before.
    tail: Vec<Bytes>,
    tail_len: usize,
}

impl Spool {
    fn new(usage: Arc<Usage>, limits: UploadLimits, dir: PathBuf) -> Self {
        Self {
            usage,
            limits,
            dir,
            file: None,
            file_len: 0,
            tail: Vec::new(),
            tail_len: 0,
        }
    }

    /// Appends `data`. Small appends collect in memory (within the session
    /// and the process quota); when they would overflow it, the collected
    /// bytes and `data` go to the spool file in one write on the blocking
    /// pool. Past the disk quota, nothing is appended and the upload keeps
    /// what it had.
    pub(crate) async fn append(&mut self, data: Bytes) -> Result<(), Error> {
        let len = data.len();
        if self.tail_len + len <= self.limits.session_memory_bytes
            && reserve(
                &self.usage.memory,
                len as u64,
                self.limits.total_memory_bytes as u64,
            )
        {
            self.tail.push(data);
            self.tail_len += len;
            return Ok(());
        }
        let flush = (self.tail_len + len) as u64;
        if !reserve(&self.usage.spooled, flush, self.limits.total_spool_bytes) {
            return Err(Error::ResourceExhausted(format!(
                "unfinished uploads hold the server's {} spool bytes; retry later",
                self.limits.total_spool_bytes
            )));
        }
        let file = match &self.file {
            Some(file) => file.try_clone(),
            None => create_spool_file(&self.dir),
        };
        // One buffer, one positional write: however many small messages the
        // tail holds, this costs one copy and one system call per flush.
        let mut buffer = Vec::with_capacity(self.tail_len + len);
        for part in self.tail.iter().chain([&data]) {
            buffer.extend_from_slice(part);
        }
        let at = self.file_len;
        let written = match file {
            Ok(file) => tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt as _;
                file.write_all_at(&buffer, at).map(|()| file)
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))
            .and_then(|r| r.map_err(io)),
            Err(e) => Err(io(e)),
        };
        let file = match written {
            Ok(file) => file,
            Err(e) => {
                // Reads stop at `file_len` and the next flush writes there,
                // so a partial write is simply overwritten.
                release(&self.usage.spooled, flush);
                return Err(e);
            }
        };
        if self.file.is_none() {
            self.file = Some(file);
        }
        self.file_len += flush;
        release(&self.usage.memory, self.tail_len as u64);
        self.tail.clear();
        self.tail_len = 0;
        Ok(())
    }

    /// A blocking reader over everything spooled, from the start. It owns
    /// what it reads, so the spool may move into the reader's task.
    pub(crate) fn reader(&self) -> std::io::Result<Box<dyn std::io::Read + Send>> {
        use std::io::Read as _;
        let tail: Bytes = self.tail.concat().into();
        Ok(match &self.file {
            None => Box::new(tail.reader()),
            Some(file) => Box::new(
                FileReader {
                    file: file.try_clone()?,
                    at: 0,
                    end: self.file_len,
                }
                .chain(tail.reader()),
            ),
        })
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        // The file is unlinked already; closing it frees the space.
        release(&self.usage.memory, self.tail_len as u64);
        release(&self.usage.spooled, self.file_len);
    }
}

/// Reads `at..end` of a file by position, so it shares no cursor with the
/// handle that writes it.
struct FileReader {
    file: std::fs::File,
    at: u64,
    end: u64,
}

impl std::io::Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt as _;
        let left = usize::try_from(self.end - self.at).unwrap_or(usize::MAX);
        let want = buf.len().min(left);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.at)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.at += n as u64;
        Ok(n)
    }
}

/// The spool directory, private to the server.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// A new spool file in `dir`, readable only by the server and already
/// unlinked (see the module documentation).
fn create_spool_file(dir: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    private_dir(dir)?;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("upload-{}-{n}", std::process::id()));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => {
                std::fs::remove_file(&path)?;
                return Ok(file);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
}

/// One upload in progress.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) spool: Spool,
    /// Bytes received, which is also the next expected `write_offset`.
    pub(crate) committed: u64,
    pub(crate) touched: Instant,
}

/// An upload session is keyed by cache id and the upload's resource name
/// after the instance.
pub(crate) type SessionKey = (i64, String);

type SharedSession = Arc<tokio::sync::Mutex<Session>>;

/// The uploads of one REAPI core.
#[derive(Debug)]
pub(crate) struct Uploads {
    dir: PathBuf,
    limits: UploadLimits,
    usage: Arc<Usage>,
    sessions: Mutex<HashMap<SessionKey, SharedSession>>,
    /// Stops the sweeper when the core goes away.
    _sweeper: DropGuard,
}

impl Uploads {
    /// Empties `dir` of stale spool files and starts the periodic sweep of
    /// expired sessions (when called inside a tokio runtime; without one,
    /// sessions are still swept when the session limit is reached).
    pub(crate) fn start(dir: PathBuf, limits: UploadLimits) -> Arc<Self> {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::debug!(dir = %dir.display(), "removed stale upload spool"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot clear the upload spool");
            }
        }
        if let Err(e) = private_dir(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the upload spool");
        }
        let stop = CancellationToken::new();
        Arc::new_cyclic(|weak: &Weak<Self>| {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(sweep_periodically(weak.clone(), stop.clone()));
            }
            Self {
                dir,
                limits,
                usage: Arc::default(),
                sessions: Mutex::new(HashMap::new()),
                _sweeper: stop.drop_guard(),
            }
        })
    }

    /// A fresh, empty session.
    pub(crate) fn new_session(&self) -> Session {
        Session {
            spool: Spool::new(Arc::clone(&self.usage), self.limits, self.dir.clone()),
            committed: 0,
            touched: Instant::now(),
        }
    }

    /// The session for `key`, created if new. At the session limit, expired
    /// sessions go first; if none has, the upload is refused.
    pub(crate) fn session(&self, key: &SessionKey) -> Result<SharedSession, Error> {
        let mut sessions = self.sessions.lock().expect("upload sessions lock");
        if let Some(session) = sessions.get(key) {
            return Ok(Arc::clone(session));
        }
        if sessions.len() >= self.limits.max_sessions {
            self.sweep_locked(&mut sessions);
        }
        if sessions.len() >= self.limits.max_sessions {
            return Err(Error::ResourceExhausted(format!(
                "the server holds its limit of {} unfinished uploads; retry later",
                self.limits.max_sessions
            )));
        }
        let session = Arc::new(tokio::sync::Mutex::new(self.new_session()));
        sessions.insert(key.clone(), Arc::clone(&session));
        Ok(session)
    }

    pub(crate) fn existing(&self, key: &SessionKey) -> Option<SharedSession> {
        self.sessions
            .lock()
            .expect("upload sessions lock")
            .get(key)
            .cloned()
    }

    pub(crate) fn remove(&self, key: &SessionKey) {
        self.sessions
            .lock()
            .expect("upload sessions lock")
            .remove(key);
    }

    /// Drops the sessions nobody resumed within the TTL (a session in use by
    /// a Write is never dropped).
    fn sweep(&self) {
        let mut sessions = self.sessions.lock().expect("upload sessions lock");
        self.sweep_locked(&mut sessions);
    }

    fn sweep_locked(&self, sessions: &mut HashMap<SessionKey, SharedSession>) {
        let before = sessions.len();
        sessions.retain(|_, s| {
            s.try_lock()
                .map_or(true, |s| s.touched.elapsed() < self.limits.session_ttl)
        });
        let swept = before - sessions.len();
        if swept > 0 {
            tracing::debug!(swept, "expired upload sessions removed");
        }
    }

    #[cfg(test)]
    fn usage(&self) -> (u64, u64) {
        (
            self.usage.memory.load(Ordering::Acquire),
            self.usage.spooled.load(Ordering::Acquire),
        )
    }
}

/// Sweeps `uploads` every [`SWEEP_INTERVAL`] until `stop` fires (the core
/// was dropped) or the uploads are gone; it holds no strong reference, so
/// it never keeps a core, or a test's runtime, alive.
async fn sweep_periodically(uploads: Weak<Uploads>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
        let Some(uploads) = uploads.upgrade() else {
            return;
        };
        uploads.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn limits() -> UploadLimits {
        UploadLimits {
            max_sessions: 2,
            session_memory_bytes: 8,
            total_memory_bytes: 12,
            total_spool_bytes: 40,
            session_ttl: Duration::from_hours(1),
        }
    }

    fn read_all(spool: &Spool) -> Vec<u8> {
        let mut out = Vec::new();
        spool.reader().unwrap().read_to_end(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn spool_keeps_order_across_memory_and_file_and_counts_usage() {
        let dir = tempfile::tempdir().unwrap();
        let uploads = Uploads::start(dir.path().join("spool"), limits());
        let mut session = uploads.new_session();
        let mut expected = Vec::new();
        for piece in [&b"abc"[..], b"defg", b"hijklmnop", b"q", b"rs"] {
            session
                .spool
                .append(Bytes::copy_from_slice(piece))
                .await
                .unwrap();
            expected.extend_from_slice(piece);
        }
        assert_eq!(read_all(&session.spool), expected);
        // 3+4 in memory, then 7+9 flushed to the file, then 1+2 in memory.
        assert_eq!(uploads.usage(), (3, 16));
        drop(session);
        assert_eq!(uploads.usage(), (0, 0));
    }

    #[tokio::test]
    async fn quotas_refuse_without_losing_what_was_kept() {
        let dir = tempfile::tempdir().unwrap();
        let uploads = Uploads::start(dir.path().join("spool"), limits());
        let mut a = uploads.new_session();
        a.spool.append(Bytes::from(vec![1; 30])).await.unwrap();
        let mut b = uploads.new_session();
        let err = b.spool.append(Bytes::from(vec![2; 11])).await.unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
        assert_eq!(uploads.usage(), (0, 30));
        // Memory over the process total moves to the file instead.
        b.spool.append(Bytes::from(vec![3; 8])).await.unwrap();
        a.spool.append(Bytes::from(vec![4; 5])).await.unwrap();
        assert_eq!(uploads.usage(), (8, 35));
        assert_eq!(read_all(&a.spool), [vec![1; 30], vec![4; 5]].concat());
    }

    #[test]
    fn session_count_is_bounded_and_expired_ones_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let uploads = Uploads::start(
            dir.path().join("spool"),
            UploadLimits {
                session_ttl: Duration::ZERO,
                ..limits()
            },
        );
        let key = |n: u8| (1, format!("upload-{n}"));
        let held: Vec<_> = (0..2).map(|n| uploads.session(&key(n)).unwrap()).collect();
        let guards: Vec<_> = held.iter().map(|s| s.try_lock().unwrap()).collect();
        // Both are in use, so neither may be swept.
        assert!(matches!(
            uploads.session(&key(9)),
            Err(Error::ResourceExhausted(_))
        ));
        drop(guards);
        // Idle and past their (zero) TTL: swept to make room.
        assert!(uploads.session(&key(9)).is_ok());
    }

    #[test]
    fn spool_directory_is_private_and_emptied_at_start() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        std::fs::write(spool.join("upload-stale"), b"left by a crash").unwrap();
        let _uploads = Uploads::start(spool.clone(), limits());
        assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
        let mode = std::fs::metadata(&spool).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // Spool files are unlinked as soon as they are created.
        let file = create_spool_file(&spool).unwrap();
        assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
        drop(file);
    }
}
