//! Garbage collection primitives. A GC worker loops, each step until it
//! reports nothing left:
//! 1. [`Meta::gc_expire`] deletes objects past their cache's retention and
//!    everything in deleted caches, which releases their blobs;
//! 2. [`Meta::expire_uploads`] deletes upload sessions past their expiry,
//!    which releases the chunks they held;
//! 3. [`Meta::gc_sweep_blobs`] deletes unreferenced blobs past their grace
//!    period, which releases their chunks;
//! 4. [`Meta::gc_mark_chunks`] claims unreferenced chunks past their grace
//!    period that no upload session holds;
//! 5. the worker deletes the objects of those stored as objects of their own
//!    (chunks in packs need nothing here);
//! 6. [`Meta::gc_forget_chunks`] deletes their rows, and takes their stored
//!    bytes off their packs' `live_bytes`: a pack left with none is dead
//!    whole, one left with few is worth rewriting.
//!
//! Unlike Attic, a crash between 4 and 6 loses nothing and leaks nothing: the
//! rows stay `deleting`, writers treat them as gone (see
//! [`crate::MetaError::ChunkGone`]), and a later mark reclaims them.

use std::collections::HashMap;

mod expire;
mod packs;
mod runs;

pub use expire::{Evicted, Expired};
pub use runs::{GcRun, GcRuns};

use crate::blobs::{Chunk, ChunkRow, chunk_from_row};
use crate::packs::{LiveBytes, add_live_bytes};
use crate::sql::{self, READ_BATCH};
use crate::{BeginWrite as _, ChunkId, Meta, Pools, Result, on_writer};

/// The two dialects of a claim query: Postgres workers on several replicas
/// skip each other's rows instead of queueing behind them; SQLite has a single
/// writer, which claims atomically without it.
///
/// The claim is a MATERIALIZED CTE, evaluated exactly once: as an `IN
/// (SELECT … LIMIT n)` subquery, Postgres may re-run it while updating and
/// claim more than `n` rows.
macro_rules! claim_sql {
    ($select:literal, $then:literal) => {
        (
            concat!(
                "WITH claimed AS MATERIALIZED (",
                $select,
                " FOR UPDATE SKIP LOCKED) ",
                $then
            ),
            concat!("WITH claimed AS MATERIALIZED (", $select, ") ", $then),
        )
    };
}
pub(crate) use claim_sql;

/// Marks chunks `deleting` and pushes `deletable_at` to `$2`, so that a mark
/// whose worker died becomes claimable again after the grace period; any live
/// worker finishes its batch long before that.
///
/// A chunk an upload session holds is skipped whatever its `deletable_at`:
/// a checkpoint leases only the chunks it adds, and a chunk a blob held when
/// the session recorded it gets a plain grace period once that blob goes,
/// yet the session may outlive both. Each candidate costs one probe of
/// `upload_session_chunks_chunk`.
const MARK_CHUNKS: (&str, &str) = claim_sql!(
    "SELECT id FROM chunks WHERE refcount = 0 AND deletable_at <= $1 \
       AND NOT EXISTS (SELECT 1 FROM upload_session_chunks s WHERE s.chunk_id = chunks.id) \
     ORDER BY deletable_at LIMIT $3",
    "UPDATE chunks SET state = 'deleting', deletable_at = $2 \
     WHERE id IN (SELECT id FROM claimed) AND refcount = 0 AND deletable_at <= $1 \
     RETURNING id, hash, size, stored_size, frame_hash, compression, \
       (SELECT key FROM packs WHERE packs.id = chunks.pack_id), pack_offset"
);

const CLAIM_BLOBS: (&str, &str) = claim_sql!(
    "SELECT id FROM blobs WHERE refcount = 0 AND deletable_at <= $1 \
     ORDER BY deletable_at LIMIT $2",
    "SELECT id FROM claimed"
);

/// Groups referenced ids by how many references they lose, so that one
/// UPDATE per group can subtract the same amount from every row (almost
/// always a single group, of 1).
pub(crate) fn by_count(ids: impl IntoIterator<Item = (i64, i64)>) -> Vec<(i64, Vec<i64>)> {
    let mut counts: HashMap<i64, i64> = HashMap::new();
    for (id, n) in ids {
        *counts.entry(id).or_default() += n;
    }
    let mut groups: HashMap<i64, Vec<i64>> = HashMap::new();
    for (id, n) in counts {
        groups.entry(n).or_default().push(id);
    }
    groups.into_iter().collect()
}

/// Drops `$1` references from each of `n` rows of `table` (`blobs` or
/// `chunks`); rows reaching zero become collectable at `$2`.
pub(crate) fn release_sql(table: &str, n: usize) -> String {
    format!(
        "UPDATE {table} SET refcount = refcount - $1, \
           deletable_at = CASE WHEN refcount = $1 THEN $2 ELSE deletable_at END \
         WHERE id IN ({})",
        sql::params(3, n)
    )
}

/// Drops the references `$released` (`(id, uses)` pairs) from rows of
/// `$table` in transaction `$tx`; rows left with none become collectable at
/// `$lease`. A macro so that it expands inside each backend's transaction.
macro_rules! release {
    ($tx:expr, $table:literal, $released:expr, $lease:expr) => {{
        for (count, ids) in $crate::gc::by_count($released) {
            for batch in ids.chunks($crate::sql::WIDE_READ_BATCH) {
                let n = $crate::sql::in_list_len(batch.len());
                let release = $crate::gc::release_sql($table, n);
                let mut query = sqlx::query(&release).bind(count).bind($lease);
                for i in 0..n {
                    query = query.bind(*$crate::sql::padded(batch, i));
                }
                query.execute(&mut *$tx).await?;
            }
        }
    }};
}
use release;

impl Meta {
    pub(crate) fn dialect(&self, (postgres, sqlite): (&'static str, &'static str)) -> &'static str {
        match self.pools {
            Pools::Postgres(_) => postgres,
            Pools::Sqlite { .. } => sqlite,
        }
    }

    /// Claims up to `limit` chunks that are unreferenced, past their
    /// `deletable_at` (or were claimed by a worker that died) and held by no
    /// upload session, marking them `deleting`. From then on no commit can use them and
    /// [`Meta::present_chunks`] makes writers wait, so the caller can delete
    /// their objects and then call [`Meta::gc_forget_chunks`].
    pub async fn gc_mark_chunks(&self, now: i64, limit: u32) -> Result<Vec<Chunk>> {
        let mark = self.dialect(MARK_CHUNKS);
        let lease = self.lease(now);
        let rows: Vec<ChunkRow> = on_writer!(self, |pool| async {
            Ok(sqlx::query_as(mark)
                .bind(now)
                .bind(lease)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?)
        })?;
        rows.into_iter().map(chunk_from_row).collect()
    }

    /// Deletes the rows of marked chunks whose objects the caller has deleted
    /// (if they had objects of their own), and takes their bytes off their
    /// packs' live bytes in the same transaction. Ids that are already gone,
    /// or not marked, are skipped, so repeating a call after a crash is
    /// harmless. Returns how many rows went.
    pub async fn gc_forget_chunks(&self, ids: &[ChunkId]) -> Result<u64> {
        // One transaction for the whole call, in wide statements: a run
        // forgets hundreds of thousands of chunks, and a commit each 64 was
        // most of its time (one WAL commit per batch on SQLite).
        on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;
            let mut dead = LiveBytes::new();
            let mut forgotten = 0;
            for batch in ids.chunks(sql::WIDE_READ_BATCH) {
                let n = sql::in_list_len(batch.len());
                let delete = format!(
                    "DELETE FROM chunks WHERE state = 'deleting' AND id IN ({}) \
                     RETURNING pack_id, stored_size",
                    sql::params(1, n)
                );
                let mut query = sqlx::query_as(&delete);
                for i in 0..n {
                    query = query.bind(sql::padded(batch, i).0);
                }
                let rows: Vec<(Option<i64>, i64)> = query.fetch_all(&mut *tx).await?;
                for (pack, stored_size) in &rows {
                    if let Some(pack) = pack {
                        *dead.entry(*pack).or_default() -= stored_size;
                    }
                }
                forgotten += rows.len() as u64;
            }
            add_live_bytes!(tx, &dead);
            tx.commit().await?;
            Ok(forgotten)
        })
    }

    /// Deletes up to `limit` unreferenced blobs past their `deletable_at`, in
    /// one transaction with the release of their chunks: each chunk loses one
    /// reference per use, and those reaching zero become collectable after the
    /// grace period. Returns how many blobs went.
    ///
    /// Blobs need no mark phase: they have no object outside the database, so
    /// one transaction deletes them completely or not at all.
    pub async fn gc_sweep_blobs(&self, now: i64, limit: u32) -> Result<u64> {
        let claim = self.dialect(CLAIM_BLOBS);
        let lease = self.lease(now);
        on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;
            let blobs: Vec<(i64,)> = sqlx::query_as(claim)
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
            let blobs: Vec<i64> = blobs.into_iter().map(|(id,)| id).collect();
            let mut released = Vec::new();
            for batch in blobs.chunks(READ_BATCH) {
                let n = sql::in_list_len(batch.len());
                let list = sql::params(1, n);
                let uses_sql = format!(
                    "SELECT chunk_id, COUNT(*) FROM blob_chunks WHERE blob_id IN ({list}) \
                     GROUP BY chunk_id"
                );
                let mut uses = sqlx::query_as(&uses_sql);
                for i in 0..n {
                    uses = uses.bind(*sql::padded(batch, i));
                }
                let uses: Vec<(i64, i64)> = uses.fetch_all(&mut *tx).await?;
                released.extend(uses);
                for table_sql in [
                    format!("DELETE FROM blob_chunks WHERE blob_id IN ({list})"),
                    format!("DELETE FROM blobs WHERE id IN ({list})"),
                ] {
                    let mut delete = sqlx::query(&table_sql);
                    for i in 0..n {
                        delete = delete.bind(*sql::padded(batch, i));
                    }
                    delete.execute(&mut *tx).await?;
                }
            }
            release!(tx, "chunks", released, lease);
            tx.commit().await?;
            Ok(blobs.len() as u64)
        })
    }
}
