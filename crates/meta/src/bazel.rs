//! Bazel remote cache: CAS entries (which blobs an instance may read; each
//! holds one reference on its blob) and action results (opaque serialized
//! `ActionResult` protobufs, keyed by action digest).

use std::collections::{HashMap, HashSet};

use crate::blobs::{BLOB_COLUMNS, Blob, BlobRow, blob_from_row};
use crate::sql::{self, READ_BATCH};
use crate::{BeginWrite as _, BlobId, CacheId, Meta, MetaError, Result, on_reader, on_writer};

impl Meta {
    /// Makes `blob` readable through `cache`'s CAS. Returns whether the entry
    /// is new; an existing one only has its access time refreshed.
    pub async fn put_cas_entry(&self, cache: CacheId, blob: BlobId, now: i64) -> Result<bool> {
        let mut inserted = self.put_cas_entries(cache, &[blob], now).await?;
        Ok(inserted.remove(0))
    }

    /// [`Meta::put_cas_entry`] of several blobs in one transaction, all or
    /// none, with a handful of statements however many blobs (a whole batch
    /// upload). A blob listed twice is new the first time only.
    pub async fn put_cas_entries(
        &self,
        cache: CacheId,
        blobs: &[BlobId],
        now: i64,
    ) -> Result<Vec<bool>> {
        let lease = self.lease(now);
        let ids: Vec<i64> = sql::dedup(&blobs.iter().map(|b| b.0).collect::<Vec<_>>());
        let new: HashSet<i64> = on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;
            let mut new = HashSet::with_capacity(ids.len());
            for batch in ids.chunks(READ_BATCH) {
                let n = sql::in_list_len(batch.len());
                // Reference first: it finds a vanished blob and locks the
                // rows against GC. Re-putting an entry is rare (clients ask
                // FindMissingBlobs first), so undoing the reference then is
                // cheap.
                let incref = format!(
                    "UPDATE blobs SET refcount = refcount + 1, deletable_at = NULL \
                     WHERE id IN ({}) RETURNING id",
                    sql::params(1, n)
                );
                let mut query = sqlx::query_as(&incref);
                for i in 0..n {
                    query = query.bind(sql::padded(batch, i));
                }
                let bumped: Vec<(i64,)> = query.fetch_all(&mut *tx).await?;
                if bumped.len() != batch.len() {
                    return Err(MetaError::NotFound("blob"));
                }
                let insert = format!(
                    "INSERT INTO cas_entries (cache_id, blob_id, created_at, accessed_at) \
                     VALUES {} ON CONFLICT (cache_id, blob_id) DO NOTHING RETURNING blob_id",
                    sql::rows(3, batch.len(), 1, "$1, ", ", $2, $2")
                );
                let mut query = sqlx::query_as(&insert).bind(cache.0).bind(now);
                for id in batch {
                    query = query.bind(id);
                }
                let inserted: Vec<(i64,)> = query.fetch_all(&mut *tx).await?;
                new.extend(inserted.into_iter().map(|(id,)| id));
                let existing: Vec<i64> = batch
                    .iter()
                    .copied()
                    .filter(|id| !new.contains(id))
                    .collect();
                if existing.is_empty() {
                    continue;
                }
                let n = sql::in_list_len(existing.len());
                let decref = format!(
                    "UPDATE blobs SET refcount = refcount - 1, \
                       deletable_at = CASE WHEN refcount = 1 THEN $1 ELSE deletable_at END \
                     WHERE id IN ({})",
                    sql::params(2, n)
                );
                let mut query = sqlx::query(&decref).bind(lease);
                for i in 0..n {
                    query = query.bind(sql::padded(&existing, i));
                }
                query.execute(&mut *tx).await?;
                let touch = format!(
                    "UPDATE cas_entries SET accessed_at = $2 \
                     WHERE cache_id = $1 AND blob_id IN ({})",
                    sql::params(3, n)
                );
                let mut query = sqlx::query(&touch).bind(cache.0).bind(now);
                for i in 0..n {
                    query = query.bind(sql::padded(&existing, i));
                }
                query.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(new)
        })?;
        let mut seen = HashSet::with_capacity(blobs.len());
        Ok(blobs
            .iter()
            .map(|b| new.contains(&b.0) && seen.insert(b.0))
            .collect())
    }

    /// The blob with content digest `hash`, if `cache`'s CAS holds it.
    pub async fn cas_blob(&self, cache: CacheId, hash: &[u8; 32]) -> Result<Option<Blob>> {
        let sql = format!(
            "SELECT {BLOB_COLUMNS} FROM blobs b \
             JOIN cas_entries e ON e.blob_id = b.id AND e.cache_id = $1 WHERE b.hash = $2"
        );
        let row: Option<BlobRow> = on_reader!(self, |pool| async {
            sqlx::query_as(&sql)
                .bind(cache.0)
                .bind(&hash[..])
                .fetch_optional(pool)
                .await
        })?;
        row.map(blob_from_row).transpose()
    }

    /// The digests (content hash and size) `cache`'s CAS lacks, in the
    /// caller's order without repeats. A digest is a hash *and* a size: a
    /// right hash with a wrong size is missing, since a read by that digest
    /// would fail.
    pub async fn find_missing_cas(
        &self,
        cache: CacheId,
        digests: &[([u8; 32], u64)],
    ) -> Result<Vec<([u8; 32], u64)>> {
        let digests = sql::dedup(digests);
        let mut missing = Vec::new();
        for batch in digests.chunks(sql::WIDE_READ_BATCH) {
            let n = sql::in_list_len(batch.len());
            let lookup = format!(
                "SELECT b.hash, b.size FROM blobs b \
                 JOIN cas_entries e ON e.blob_id = b.id AND e.cache_id = $1 \
                 WHERE b.hash IN ({})",
                sql::params(2, n)
            );
            let found: Vec<(Vec<u8>, i64)> = on_reader!(self, |pool| async {
                let mut query = sqlx::query_as(&lookup).bind(cache.0);
                for i in 0..n {
                    query = query.bind(&sql::padded(batch, i).0[..]);
                }
                query.fetch_all(pool).await
            })?;
            let found: HashMap<Vec<u8>, i64> = found.into_iter().collect();
            missing.extend(batch.iter().filter(|(hash, size)| {
                found.get(&hash[..]).and_then(|s| u64::try_from(*s).ok()) != Some(*size)
            }));
        }
        Ok(missing)
    }

    /// The serialized `ActionResult` stored for `action_hash` in `cache`.
    pub async fn get_action_result(
        &self,
        cache: CacheId,
        action_hash: &[u8; 32],
    ) -> Result<Option<Vec<u8>>> {
        let row: Option<(Vec<u8>,)> = on_reader!(self, |pool| async {
            sqlx::query_as(
                "SELECT result FROM action_results WHERE cache_id = $1 AND action_hash = $2",
            )
            .bind(cache.0)
            .bind(&action_hash[..])
            .fetch_optional(pool)
            .await
        })?;
        Ok(row.map(|(result,)| result))
    }

    /// Stores (or replaces) the serialized `ActionResult` for `action_hash`.
    pub async fn put_action_result(
        &self,
        cache: CacheId,
        action_hash: &[u8; 32],
        result: &[u8],
        now: i64,
    ) -> Result<()> {
        on_writer!(self, |pool| async {
            sqlx::query(
                "INSERT INTO action_results (cache_id, action_hash, result, created_at, \
                   accessed_at) VALUES ($1, $2, $3, $4, $4) \
                 ON CONFLICT (cache_id, action_hash) \
                   DO UPDATE SET result = excluded.result, accessed_at = excluded.accessed_at",
            )
            .bind(cache.0)
            .bind(&action_hash[..])
            .bind(result)
            .bind(now)
            .execute(pool)
            .await?;
            Ok(())
        })
    }
}
