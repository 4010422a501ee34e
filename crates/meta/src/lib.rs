//! garret's metadata: which caches exist, which Nix store paths and Bazel
//! digests each one holds, how every blob is cut into chunks, and how many
//! references keep each chunk alive.
//!
//! One [`Meta`] runs on Postgres (production) or SQLite (the embedded
//! default). Every query is written once in the SQL both dialects accept
//! (`$N` placeholders, `ON CONFLICT`, `RETURNING`) and type-checked against
//! each backend by the `on_reader!`/`on_writer!` macros; only the DDL, the
//! `FOR UPDATE SKIP LOCKED` of the GC claims and SQLite's `BEGIN IMMEDIATE`
//! differ.
//!
//! Times are unix seconds passed in by the caller, so tests and GC runs are
//! deterministic.
//!
//! # How chunks stay alive
//! A chunk row exists only once its object is durable in the blob backend,
//! and its `refcount` counts the `blob_chunks` rows that use it. A blob's
//! `refcount` counts the Nix objects and CAS entries that name it. A row that
//! drops to zero references gets `deletable_at = now + grace` instead of being
//! deleted, for two reasons (as in Garage's block refcounts):
//! - a writer that found the chunk with [`Meta::present_chunks`] and decided
//!   not to upload it must be able to commit within the grace period;
//! - a re-upload inside the window keeps the data instead of racing a delete.
//!
//! The chunks a resumable upload has stored so far are held by its upload
//! session instead, without a reference: GC spares them while the session
//! lives, and they age out like any unreferenced chunk once it is gone (see
//! [`Meta::claim_upload`]).
//!
//! GC then deletes in two phases ([`Meta::gc_mark_chunks`], delete the objects,
//! [`Meta::gc_forget_chunks`]) so a crash at any point leaves no `valid` row
//! whose object is gone (see `gc.rs`).
//!
//! Every guarantee above assumes that a writer commits within the grace period
//! of asking [`Meta::present_chunks`]; a writer that takes longer gets
//! [`MetaError::ChunkGone`] for the chunks it skipped, but a chunk it uploaded
//! itself could in the worst case have been deleted by GC after a concurrent
//! writer recorded and released it.

mod access;
mod attic_source;
mod bazel;
mod blobs;
mod caches;
mod error;
mod gc;
mod migrations;
mod nix;
mod observe;
mod packs;
mod pins;
mod redact;
mod sql;
#[cfg(feature = "testing")]
pub mod testing;
mod uploads;
mod usage;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Postgres, Sqlite, Transaction};

pub use attic_source::{AtticCache, AtticObject, AtticSource};
pub use blobs::{
    Blob, BlobChunk, BlobCommit, Chunk, ChunkCompression, ChunkRange, ChunkStats, NewBlob,
    NewChunkRef, PresentChunk,
};
pub use caches::{Cache, CachePatch, NewCache};
pub use error::{DatabaseError, MetaError};
pub use gc::{Evicted, Expired, GcRun, GcRuns};
pub use nix::{NixObject, NixObjectRow};
pub use observe::Observer;
pub use packs::{NewPack, Pack, PackPlace};
pub use pins::{InvalidPinName, MAX_PIN_NAME_LEN, MAX_PINS_PAGE, Pin, PinName};
pub use redact::{Redacted, redact};
pub use uploads::UploadSession;
pub use usage::CacheUsage;

/// Result of every [`Meta`] operation.
pub type Result<T, E = MetaError> = std::result::Result<T, E>;

/// Row id of a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheId(pub i64);

/// Row id of a blob (an ordered list of chunks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub i64);

/// Row id of a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub i64);

/// Row id of an upload session (see [`Meta::claim_upload`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UploadSessionId(pub i64);

/// Which database a [`Meta`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Database {
    Postgres,
    Sqlite,
}

/// How long an unreferenced chunk or blob survives before GC may take it.
/// Uploads must commit within this window after [`Meta::present_chunks`]
/// (see there); six hours covers a multi-GiB NAR on a slow link with room
/// to spare while still reclaiming space the same day.
pub const DEFAULT_GRACE: Duration = Duration::from_hours(6);

/// Postgres connections per server. Every request holds one only for a
/// statement or a short transaction, so a few dozen concurrent requests share
/// these comfortably, and several replicas stay under Postgres' default
/// `max_connections` of 100.
const PG_MAX_CONNECTIONS: u32 = 16;

/// SQLite reader connections. WAL lets them run beside the writer.
const SQLITE_READERS: u32 = 8;

/// How long SQLite waits for another process's lock (say, `garret migrate`
/// beside a running server) before failing.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The repository: a cheap-to-clone handle on the connection pools.
#[derive(Clone, Debug)]
pub struct Meta {
    pools: Pools,
    /// [`Meta::grace`] in seconds, the unit of every `now`.
    grace: i64,
    /// Told of every operation (see [`Meta::with_observer`]).
    observer: Option<Arc<dyn Observer>>,
}

#[derive(Clone, Debug)]
enum Pools {
    Postgres(PgPool),
    /// SQLite admits one writer at a time. Sending every write through a
    /// single-connection pool queues writers fairly in-process instead of
    /// letting them spin on `SQLITE_BUSY`, while readers proceed under WAL.
    Sqlite {
        read: SqlitePool,
        write: SqlitePool,
    },
}

/// Runs the async block `$body` with `$pool` bound to the pool to read from.
/// The block is expanded once per backend, so the same SQL text is
/// type-checked against both drivers.
/// The operation is reported to the [`Observer`], named after the method.
macro_rules! on_reader {
    ($meta:expr, |$pool:ident| $body:expr) => {{
        let started = std::time::Instant::now();
        let result = match &$meta.pools {
            $crate::Pools::Postgres($pool) => $body.await,
            $crate::Pools::Sqlite { read: $pool, .. } => $body.await,
        };
        $meta.observe($crate::observe::operation!(), started, &result);
        result
    }};
}

/// Like `on_reader!` for the pool that may write. Postgres may abort a
/// transaction that deadlocked (two commits locking shared chunk rows in
/// different orders) or failed serialization; such a transaction changed
/// nothing, so the whole block runs again. Blocks must therefore start their
/// own transaction and hold no state across attempts.
/// The operation, retries included, is reported like `on_reader!`'s.
macro_rules! on_writer {
    ($meta:expr, |$pool:ident| $body:expr) => {{
        let started = std::time::Instant::now();
        let mut attempt = 1;
        let result = loop {
            let result: $crate::Result<_> = match &$meta.pools {
                $crate::Pools::Postgres($pool) => $body.await,
                $crate::Pools::Sqlite { write: $pool, .. } => $body.await,
            };
            match result {
                Err(e) if e.is_transient() && attempt < $crate::MAX_ATTEMPTS => attempt += 1,
                other => break other,
            }
        };
        $meta.observe($crate::observe::operation!(), started, &result);
        result
    }};
}
pub(crate) use {on_reader, on_writer};

/// Attempts of a write that Postgres keeps aborting as a deadlock victim.
const MAX_ATTEMPTS: u32 = 5;

/// Begins a transaction that will write.
trait BeginWrite {
    type Db: sqlx::Database;
    fn begin_write(
        &self,
    ) -> impl Future<Output = Result<Transaction<'static, Self::Db>, sqlx::Error>> + Send;
}

impl BeginWrite for PgPool {
    type Db = Postgres;
    fn begin_write(
        &self,
    ) -> impl Future<Output = Result<Transaction<'static, Postgres>, sqlx::Error>> + Send {
        self.begin()
    }
}

impl BeginWrite for SqlitePool {
    type Db = Sqlite;
    /// `BEGIN IMMEDIATE` takes the write lock up front. A deferred transaction
    /// that read first would fail with `SQLITE_BUSY_SNAPSHOT`, without waiting,
    /// if another connection wrote in between.
    fn begin_write(
        &self,
    ) -> impl Future<Output = Result<Transaction<'static, Sqlite>, sqlx::Error>> + Send {
        self.begin_with("BEGIN IMMEDIATE")
    }
}

impl Meta {
    /// Connects to `postgres://…`/`postgresql://…` or `sqlite:…`. A missing
    /// SQLite file is created and put in WAL mode. Does not migrate: call
    /// [`Meta::migrate`].
    pub async fn connect(url: &str) -> Result<Self> {
        let pools = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(PG_MAX_CONNECTIONS)
                .connect_with(options)
                .await?;
            Pools::Postgres(pool)
        } else if url.starts_with("sqlite:") {
            if sqlite_in_memory(url) {
                // Shared-cache memory databases have no WAL and lock whole
                // tables, and vanish with their last connection.
                return Err(MetaError::Invalid(
                    "SQLite needs a file, not an in-memory database".into(),
                ));
            }
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .foreign_keys(true)
                .busy_timeout(SQLITE_BUSY_TIMEOUT);
            // FULL makes every commit durable before it returns: GC deletes
            // objects right after committing their rows' `deleting` mark, and
            // a mark lost to a power cut would resurrect rows without objects.
            let write = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(
                    options
                        .clone()
                        .journal_mode(SqliteJournalMode::Wal)
                        .synchronous(SqliteSynchronous::Full),
                )
                .await?;
            // The writer has created the file and switched it to WAL, which
            // persists; `query_only` catches a write sent to the wrong pool.
            let read = SqlitePoolOptions::new()
                .max_connections(SQLITE_READERS)
                .connect_with(options.pragma("query_only", "ON"))
                .await?;
            Pools::Sqlite { read, write }
        } else {
            return Err(MetaError::Invalid(
                "database URL must start with postgres://, postgresql:// or sqlite:".into(),
            ));
        };
        Ok(Self {
            pools,
            grace: sql::secs(DEFAULT_GRACE),
            observer: None,
        })
    }

    /// Replaces the grace period ([`DEFAULT_GRACE`]).
    #[must_use]
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = sql::secs(grace);
        self
    }

    /// Reports every operation from now on to `observer` (the server's
    /// metrics); clones made afterwards report to it too.
    #[must_use]
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Tells the observer, if any, that `operation` ended with `result`.
    fn observe(
        &self,
        operation: &'static str,
        started: std::time::Instant,
        result: &impl observe::Outcome,
    ) {
        if let Some(observer) = &self.observer {
            observer.finished(operation, started.elapsed(), result.failed());
        }
    }

    /// How long unreferenced rows survive before GC may take them.
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.grace.unsigned_abs())
    }

    pub fn database(&self) -> Database {
        match self.pools {
            Pools::Postgres(_) => Database::Postgres,
            Pools::Sqlite { .. } => Database::Sqlite,
        }
    }

    /// Brings the schema up to date with the migrations embedded from
    /// `migrations/{postgres,sqlite}`. Safe to run concurrently and repeatedly:
    /// sqlx takes a lock and records what it applied.
    pub async fn migrate(&self) -> Result<()> {
        match &self.pools {
            Pools::Postgres(pool) => migrations::postgres().await?.run(pool).await?,
            Pools::Sqlite { write, .. } => migrations::sqlite().await?.run(write).await?,
        }
        Ok(())
    }

    /// One round trip to the database, for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        on_reader!(self, |pool| async {
            sqlx::query("SELECT 1").execute(pool).await.map(drop)
        })?;
        Ok(())
    }

    /// Closes every connection, waiting for those in use. SQLite checkpoints
    /// its WAL when the last connection closes.
    pub async fn close(&self) {
        match &self.pools {
            Pools::Postgres(pool) => pool.close().await,
            Pools::Sqlite { read, write } => {
                read.close().await;
                write.close().await;
            }
        }
    }

    /// When a row that just lost its last reference may be collected.
    fn lease(&self, now: i64) -> i64 {
        now.saturating_add(self.grace)
    }
}

/// Whether a `sqlite:` URL names an in-memory database, as sqlx reads it.
fn sqlite_in_memory(url: &str) -> bool {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let (database, params) = rest.split_once('?').unwrap_or((rest, ""));
    database == ":memory:" || params.split('&').any(|p| p == "mode=memory")
}
