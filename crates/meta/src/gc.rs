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
use std::time::Duration;

use crate::blobs::{Chunk, ChunkRow, chunk_from_row};
use crate::packs::{LiveBytes, add_live_bytes};
use crate::sql::{self, READ_BATCH};
use crate::{BeginWrite as _, CacheId, ChunkId, Meta, Pools, Result, on_writer};

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

/// The oldest-accessed Nix objects of cache `$1` last accessed at or before
/// `$2`, at most `$3`; returns the blob each one referenced.
const EXPIRE_NIX_OBJECTS: (&str, &str) = claim_sql!(
    "SELECT id FROM nix_objects WHERE cache_id = $1 AND accessed_at <= $2 \
     ORDER BY accessed_at LIMIT $3",
    "DELETE FROM nix_objects WHERE id IN (SELECT id FROM claimed) RETURNING blob_id"
);

/// As [`EXPIRE_NIX_OBJECTS`], for CAS entries.
const EXPIRE_CAS_ENTRIES: (&str, &str) = claim_sql!(
    "SELECT blob_id FROM cas_entries WHERE cache_id = $1 AND accessed_at <= $2 \
     ORDER BY accessed_at LIMIT $3",
    "DELETE FROM cas_entries WHERE cache_id = $1 AND blob_id IN (SELECT blob_id FROM claimed) \
     RETURNING blob_id"
);

/// As [`EXPIRE_NIX_OBJECTS`], for action results, which hold no reference.
const EXPIRE_ACTION_RESULTS: (&str, &str) = claim_sql!(
    "SELECT action_hash FROM action_results WHERE cache_id = $1 AND accessed_at <= $2 \
     ORDER BY accessed_at LIMIT $3",
    "DELETE FROM action_results \
     WHERE cache_id = $1 AND action_hash IN (SELECT action_hash FROM claimed)"
);

/// What one [`Meta::gc_expire`] call deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    pub nix_objects: u64,
    pub cas_entries: u64,
    pub action_results: u64,
}

impl Expired {
    pub fn is_empty(&self) -> bool {
        *self == Expired::default()
    }
}

/// Groups referenced ids by how many references they lose, so that one
/// UPDATE per group can subtract the same amount from every row (almost
/// always a single group, of 1).
fn by_count(ids: impl IntoIterator<Item = (i64, i64)>) -> Vec<(i64, Vec<i64>)> {
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
fn release_sql(table: &str, n: usize) -> String {
    format!(
        "UPDATE {table} SET refcount = refcount - $1, \
           deletable_at = CASE WHEN refcount = $1 THEN $2 ELSE deletable_at END \
         WHERE id IN ({})",
        sql::params(3, n)
    )
}

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
        let mut forgotten = 0;
        for batch in ids.chunks(READ_BATCH) {
            let n = sql::in_list_len(batch.len());
            let delete = format!(
                "DELETE FROM chunks WHERE state = 'deleting' AND id IN ({}) \
                 RETURNING pack_id, stored_size",
                sql::params(1, n)
            );
            forgotten += on_writer!(self, |pool| async {
                let mut tx = pool.begin_write().await?;
                let mut query = sqlx::query_as(&delete);
                for i in 0..n {
                    query = query.bind(sql::padded(batch, i).0);
                }
                let rows: Vec<(Option<i64>, i64)> = query.fetch_all(&mut *tx).await?;
                let mut dead = LiveBytes::new();
                for (pack, stored_size) in &rows {
                    if let Some(pack) = pack {
                        *dead.entry(*pack).or_default() -= stored_size;
                    }
                }
                add_live_bytes!(tx, &dead);
                tx.commit().await?;
                Ok(rows.len() as u64)
            })?;
        }
        Ok(forgotten)
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
            for (count, chunks) in by_count(released) {
                for batch in chunks.chunks(READ_BATCH) {
                    let n = sql::in_list_len(batch.len());
                    let release = release_sql("chunks", n);
                    let mut query = sqlx::query(&release).bind(count).bind(lease);
                    for i in 0..n {
                        query = query.bind(*sql::padded(batch, i));
                    }
                    query.execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
            Ok(blobs.len() as u64)
        })
    }

    /// Deletes up to `limit` each of the Nix objects, CAS entries and action
    /// results of every cache that were last accessed longer ago than the
    /// cache's retention period (`default_retention` for caches without one;
    /// `None` keeps them), and those of soft-deleted caches regardless. Blobs
    /// that lose their last reference become collectable after the grace
    /// period, so [`Meta::gc_sweep_blobs`] picks them up later.
    ///
    /// Action results are kept by `accessed_at`, which only a put refreshes.
    pub async fn gc_expire(
        &self,
        now: i64,
        default_retention: Option<Duration>,
        limit: u32,
    ) -> Result<Expired> {
        let default_retention = default_retention.map(sql::secs);
        let caches: Vec<(i64, Option<i64>, bool)> = crate::on_reader!(self, |pool| async {
            sqlx::query_as(
                "SELECT id, retention_period, deleted_at IS NOT NULL FROM caches \
                 WHERE deleted_at IS NOT NULL OR retention_period IS NOT NULL OR $1",
            )
            .bind(default_retention.is_some())
            .fetch_all(pool)
            .await
        })?;
        let mut expired = Expired::default();
        for (cache, retention, deleted) in caches {
            let cutoff = if deleted {
                i64::MAX
            } else {
                match retention.or(default_retention) {
                    Some(retention) => now.saturating_sub(retention),
                    None => continue,
                }
            };
            let done = self
                .expire_cache(CacheId(cache), cutoff, now, limit)
                .await?;
            expired.nix_objects += done.nix_objects;
            expired.cas_entries += done.cas_entries;
            expired.action_results += done.action_results;
        }
        Ok(expired)
    }

    /// One cache's share of [`Meta::gc_expire`], in one transaction.
    async fn expire_cache(
        &self,
        cache: CacheId,
        cutoff: i64,
        now: i64,
        limit: u32,
    ) -> Result<Expired> {
        let (nix_sql, cas_sql, ac_sql) = (
            self.dialect(EXPIRE_NIX_OBJECTS),
            self.dialect(EXPIRE_CAS_ENTRIES),
            self.dialect(EXPIRE_ACTION_RESULTS),
        );
        let lease = self.lease(now);
        on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;
            let mut released = Vec::new();
            let mut counts = [0; 2];
            for (sql, count) in [nix_sql, cas_sql].into_iter().zip(&mut counts) {
                let blobs: Vec<(i64,)> = sqlx::query_as(sql)
                    .bind(cache.0)
                    .bind(cutoff)
                    .bind(i64::from(limit))
                    .fetch_all(&mut *tx)
                    .await?;
                *count = blobs.len() as u64;
                released.extend(blobs.into_iter().map(|(blob,)| (blob, 1)));
            }
            let action_results = sqlx::query(ac_sql)
                .bind(cache.0)
                .bind(cutoff)
                .bind(i64::from(limit))
                .execute(&mut *tx)
                .await?
                .rows_affected();
            for (count, blobs) in by_count(released) {
                for batch in blobs.chunks(READ_BATCH) {
                    let n = sql::in_list_len(batch.len());
                    let release = release_sql("blobs", n);
                    let mut query = sqlx::query(&release).bind(count).bind(lease);
                    for i in 0..n {
                        query = query.bind(*sql::padded(batch, i));
                    }
                    query.execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
            Ok(Expired {
                nix_objects: counts[0],
                cas_entries: counts[1],
                action_results,
            })
        })
    }
}
