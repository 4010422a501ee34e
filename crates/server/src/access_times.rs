//! Access times of what clients read, for retention and GC: narinfo and
//! NAR reads refresh their Nix object, Bazel reads and FindMissingBlobs
//! hits their CAS entries, action-cache hits their result and every blob
//! it names.
//!
//! A write per read would make every cache hit a database commit (a WAL
//! sync on SQLite), so requests only record what they read in memory, a
//! set without repeats, and one background task writes it: every
//! `flush_interval`, early once [`FLUSH_AT`] keys wait, and at shutdown,
//! with one transaction per kind of row for all caches together.
//!
//! Two flavours:
//! - [`AccessTimes::nix_object_read`] and [`AccessTimes::cas_read`] return
//!   at once. A failed write is logged and the request never knows: a lost
//!   touch only makes its row look older to GC than it is.
//! - [`AccessTimes::record_durably`] returns once the keys are written. An
//!   action-cache hit promises the client that the outputs it names can be
//!   downloaded (`--remote_download_minimal` fetches them later, or never),
//!   so their access times must be on disk before the hit is answered, or a
//!   GC between the answer and the next periodic flush could evict them.
//!   Callers are group-committed: each adds its keys and waits, and the
//!   task flushes as soon as anyone waits, so concurrent hits share one
//!   transaction instead of writing one each.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use garret_meta::{CacheId, Meta};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::clock::unix_now;

/// Keys waiting at which the task flushes without waiting for the interval,
/// so a burst of reads costs a few flushes rather than unbounded memory.
/// At about 100 bytes a key, 6 MiB.
pub const FLUSH_AT: usize = 64 * 1024;

/// Keys waiting beyond which reads are no longer recorded: reached only
/// while the database is slower than the reads (a flush of [`FLUSH_AT`]
/// keys is in progress, and as many arrived again three times over).
/// Durable records are never dropped; they are bounded by the requests in
/// flight.
const MAX_PENDING: usize = 4 * FLUSH_AT;

/// Rows whose access time to refresh, without repeats.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Accessed {
    nix_objects: HashSet<(CacheId, String)>,
    cas: HashSet<(CacheId, [u8; 32])>,
    action_results: HashSet<(CacheId, [u8; 32])>,
}

impl Accessed {
    /// `cache`'s Nix object at `store_path_hash`.
    pub fn add_nix_object(&mut self, cache: CacheId, store_path_hash: &str) {
        self.nix_objects.insert((cache, store_path_hash.to_owned()));
    }

    /// `cache`'s CAS entries for these content hashes.
    pub fn add_cas(&mut self, cache: CacheId, hashes: &[[u8; 32]]) {
        self.cas.extend(hashes.iter().map(|hash| (cache, *hash)));
    }

    /// `cache`'s action result for `action_hash`.
    pub fn add_action_result(&mut self, cache: CacheId, action_hash: [u8; 32]) {
        self.action_results.insert((cache, action_hash));
    }

    pub fn len(&self) -> usize {
        self.nix_objects.len() + self.cas.len() + self.action_results.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn merge(&mut self, other: Accessed) {
        self.nix_objects.extend(other.nix_objects);
        self.cas.extend(other.cas);
        self.action_results.extend(other.action_results);
    }
}

/// Why a durable record may not have been written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("writing access times failed (the log has the cause)")]
    Failed,
    #[error("the access-time writer has stopped")]
    Stopped,
}

/// Counters for metrics, and for tests that check batching.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccessStats {
    /// Flushes that wrote something (each at most one transaction per kind
    /// of row).
    pub flushes: u64,
    /// Keys those flushes wrote (each at most once per flush).
    pub keys: u64,
    /// Flushes of which some write failed; their keys are not retried.
    pub failed_flushes: u64,
    /// Reads not recorded because [`MAX_PENDING`] keys were waiting, or
    /// because the writer had stopped.
    pub dropped: u64,
}

/// The recorder every handler shares; cheap to clone. Built by
/// [`AccessTimes::start`], which spawns its writer task.
#[derive(Debug, Clone)]
pub struct AccessTimes {
    shared: Arc<Shared>,
    writer: Arc<Mutex<Option<JoinHandle<()>>>>,
}

#[derive(Debug)]
struct Shared {
    meta: Meta,
    pending: Mutex<Pending>,
    /// Wakes the writer before its interval: a durable record waits, the
    /// pending set is full, or the recorder is shutting down. A wake while
    /// the writer is busy is kept, so it flushes again right after.
    wake: Notify,
    flushes: AtomicU64,
    keys: AtomicU64,
    failed_flushes: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct Pending {
    accessed: Accessed,
    /// Durable records waiting for the next flush to write them.
    waiters: Vec<oneshot::Sender<Result<(), RecordError>>>,
    /// Reads not recorded since the last flush, for its log line.
    dropped: u64,
    /// Set by shutdown (or a writer that ended): nothing more is accepted.
    stopped: bool,
}

impl AccessTimes {
    /// The recorder, with its writer flushing every `flush_interval` on the
    /// current Tokio runtime until [`AccessTimes::shutdown`].
    pub fn start(meta: Meta, flush_interval: Duration) -> Self {
        let shared = Arc::new(Shared {
            meta,
            pending: Mutex::default(),
            wake: Notify::new(),
            flushes: AtomicU64::new(0),
            keys: AtomicU64::new(0),
            failed_flushes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let writer = tokio::spawn(Arc::clone(&shared).run(flush_interval));
        Self {
            shared,
            writer: Arc::new(Mutex::new(Some(writer))),
        }
    }

    /// Records a read of `cache`'s Nix object at `store_path_hash`
    /// (a narinfo or its NAR), written by a later flush.
    pub fn nix_object_read(&self, cache: CacheId, store_path_hash: &str) {
        self.record(1, |accessed| {
            accessed.add_nix_object(cache, store_path_hash);
        });
    }

    /// Records a use of `cache`'s CAS entries for `hashes` (a read, or a
    /// FindMissingBlobs hit), written by a later flush.
    pub fn cas_read(&self, cache: CacheId, hashes: &[[u8; 32]]) {
        if !hashes.is_empty() {
            self.record(hashes.len(), |accessed| accessed.add_cas(cache, hashes));
        }
    }

    fn record(&self, keys: usize, add: impl FnOnce(&mut Accessed)) {
        let mut pending = self.shared.lock();
        if pending.stopped || pending.accessed.len() >= MAX_PENDING {
            pending.dropped += keys as u64;
            drop(pending);
            self.shared
                .dropped
                .fetch_add(keys as u64, Ordering::Relaxed);
            return;
        }
        add(&mut pending.accessed);
        if pending.accessed.len() >= FLUSH_AT {
            self.shared.wake.notify_one();
        }
    }

    /// Writes `accessed` (and whatever else is waiting) before returning:
    /// for answers that promise the rows stay, an action-cache hit.
    pub async fn record_durably(&self, accessed: Accessed) -> Result<(), RecordError> {
        let (done, written) = oneshot::channel();
        {
            let mut pending = self.shared.lock();
            if pending.stopped {
                return Err(RecordError::Stopped);
            }
            pending.accessed.merge(accessed);
            pending.waiters.push(done);
        }
        self.shared.wake.notify_one();
        // A writer that ended drops its waiters unanswered.
        written.await.unwrap_or(Err(RecordError::Stopped))
    }

    /// Writes everything recorded so far before returning.
    pub async fn flush(&self) -> Result<(), RecordError> {
        self.record_durably(Accessed::default()).await
    }

    /// Stops the writer after a last flush of everything recorded: for a
    /// graceful stop, once requests have finished. Later records are
    /// dropped (durable ones fail with [`RecordError::Stopped`]).
    pub async fn shutdown(&self) {
        self.shared.lock().stopped = true;
        self.shared.wake.notify_one();
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer
            && let Err(e) = writer.await
        {
            tracing::error!(error = %e, "the access-time writer failed");
        }
    }

    pub fn stats(&self) -> AccessStats {
        let shared = &self.shared;
        AccessStats {
            flushes: shared.flushes.load(Ordering::Relaxed),
            keys: shared.keys.load(Ordering::Relaxed),
            failed_flushes: shared.failed_flushes.load(Ordering::Relaxed),
            dropped: shared.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Shared {
    /// The pending set; a panic elsewhere while it was held leaves at worst
    /// a few keys more or less, never an inconsistent set.
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The writer: flushes on every tick and wake until stopped.
    async fn run(self: Arc<Self>, flush_interval: Duration) {
        let _stop = StopOnExit(Arc::clone(&self));
        let mut ticks = tokio::time::interval_at(Instant::now() + flush_interval, flush_interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = self.wake.notified() => {}
            }
            if self.flush().await {
                return;
            }
        }
    }

    /// Writes what is pending and answers the waiters; returns whether the
    /// recorder has stopped (this was the last flush).
    async fn flush(&self) -> bool {
        let (accessed, waiters, dropped, stopped) = {
            let mut pending = self.lock();
            (
                std::mem::take(&mut pending.accessed),
                std::mem::take(&mut pending.waiters),
                std::mem::take(&mut pending.dropped),
                pending.stopped,
            )
        };
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "reads not recorded: access times fell behind (or were stopped)"
            );
        }
        let result = if accessed.is_empty() {
            Ok(())
        } else {
            self.write(accessed).await
        };
        for waiter in waiters {
            // A waiter that gave up (its request was cancelled) is fine.
            let _ = waiter.send(result);
        }
        stopped
    }

    /// One transaction per kind of row, all caches together.
    async fn write(&self, accessed: Accessed) -> Result<(), RecordError> {
        let keys = accessed.len() as u64;
        let now = unix_now();
        let Accessed {
            nix_objects,
            cas,
            action_results,
        } = accessed;
        let nix_objects: Vec<_> = nix_objects.into_iter().collect();
        let cas: Vec<_> = cas.into_iter().collect();
        let action_results: Vec<_> = action_results.into_iter().collect();
        let written = [
            (
                "nix objects",
                nix_objects.len(),
                self.meta.touch_nix_objects(&nix_objects, now).await,
            ),
            (
                "CAS entries",
                cas.len(),
                self.meta.touch_cas(&cas, now).await,
            ),
            (
                "action results",
                action_results.len(),
                self.meta.touch_action_results(&action_results, now).await,
            ),
        ];
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.keys.fetch_add(keys, Ordering::Relaxed);
        let mut result = Ok(());
        for (kind, count, written) in written {
            match written {
                Ok(changed) => tracing::trace!(kind, keys = count, changed, "access times written"),
                Err(e) => {
                    tracing::warn!(kind, keys = count, error = %e, "writing access times failed");
                    result = Err(RecordError::Failed);
                }
            }
        }
        if result.is_err() {
            self.failed_flushes.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

/// Marks the recorder stopped however the writer ends (shutdown, a panic,
/// the runtime going away), and drops the waiters it will never answer so
/// they fail instead of hanging.
struct StopOnExit(Arc<Shared>);

impl Drop for StopOnExit {
    fn drop(&mut self) {
        let mut pending = self.0.lock();
        pending.stopped = true;
        pending.waiters.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn meta(dir: &tempfile::TempDir) -> Meta {
        let meta = Meta::connect(&format!("sqlite:{}/meta.db", dir.path().display()))
            .await
            .unwrap();
        meta.migrate().await.unwrap();
        meta
    }

    #[tokio::test]
    async fn a_full_set_is_flushed_before_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let accesses = AccessTimes::start(meta(&dir).await, Duration::from_hours(24));
        let hashes: Vec<[u8; 32]> = (0..FLUSH_AT)
            .map(|i| {
                let mut hash = [0; 32];
                hash[..8].copy_from_slice(&(i as u64).to_le_bytes());
                hash
            })
            .collect();
        accesses.cas_read(CacheId(1), &hashes[..FLUSH_AT - 1]);
        accesses.cas_read(CacheId(1), &hashes[..FLUSH_AT - 1]);
        // Repeats take no room: still below the bound, so nothing is written.
        tokio::task::yield_now().await;
        assert_eq!(accesses.stats().flushes, 0);
        accesses.cas_read(CacheId(1), &hashes[FLUSH_AT - 1..]);
        for _ in 0..6000 {
            if accesses.stats().flushes == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stats = accesses.stats();
        assert_eq!((stats.flushes, stats.keys), (1, FLUSH_AT as u64));
        accesses.shutdown().await;
        assert_eq!(
            accesses.stats().flushes,
            1,
            "nothing left for the last flush"
        );
    }

    #[tokio::test]
    async fn a_stopped_recorder_drops_reads() {
        let dir = tempfile::tempdir().unwrap();
        let accesses = AccessTimes::start(meta(&dir).await, Duration::from_hours(24));
        accesses.shutdown().await;
        accesses.cas_read(CacheId(1), &[[1; 32], [2; 32]]);
        accesses.nix_object_read(CacheId(1), "x");
        assert_eq!(accesses.stats().dropped, 3);
        assert_eq!(accesses.flush().await, Err(RecordError::Stopped));
    }
}
