//! Bazel remote cache: CAS entries (which blobs an instance may read; each
//! holds one reference on its blob) and action results (opaque serialized
//! `ActionResult` protobufs, keyed by action digest).

use std::collections::HashMap;

use crate::blobs::{BLOB_COLUMNS, Blob, BlobRow, blob_from_row};
use crate::nix::{BLOB_DECREF, BLOB_INCREF};
use crate::sql;
use crate::{BeginWrite as _, BlobId, CacheId, Meta, MetaError, Result, on_reader, on_writer};

impl Meta {
    /// Makes `blob` readable through `cache`'s CAS. Returns whether the entry
    /// is new; an existing one only has its access time refreshed.
    pub async fn put_cas_entry(&self, cache: CacheId, blob: BlobId, now: i64) -> Result<bool> {
        let mut inserted = self.put_cas_entries(cache, &[blob], now).await?;
        Ok(inserted.remove(0))
    }

    /// [`Meta::put_cas_entry`] of several blobs in one transaction, all or
    /// none (one commit for a whole batch upload).
    pub async fn put_cas_entries(
        &self,
        cache: CacheId,
        blobs: &[BlobId],
        now: i64,
    ) -> Result<Vec<bool>> {
        let lease = self.lease(now);
        on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;
            let mut all = Vec::with_capacity(blobs.len());
            for blob in blobs {
                // Reference first: it finds a vanished blob and locks the row
                // against GC. Re-putting an entry is rare (clients ask
                // FindMissingBlobs first), so undoing the reference then is cheap.
                let bumped = sqlx::query(BLOB_INCREF)
                    .bind(blob.0)
                    .execute(&mut *tx)
                    .await?;
                if bumped.rows_affected() == 0 {
                    return Err(MetaError::NotFound("blob"));
                }
                let inserted = sqlx::query(
                    "INSERT INTO cas_entries (cache_id, blob_id, created_at, accessed_at) \
                     VALUES ($1, $2, $3, $3) ON CONFLICT (cache_id, blob_id) DO NOTHING",
                )
                .bind(cache.0)
                .bind(blob.0)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                if !inserted {
                    sqlx::query(BLOB_DECREF)
                        .bind(blob.0)
                        .bind(lease)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query(
                        "UPDATE cas_entries SET accessed_at = $3 \
                         WHERE cache_id = $1 AND blob_id = $2",
                    )
                    .bind(cache.0)
                    .bind(blob.0)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                all.push(inserted);
            }
            tx.commit().await?;
            Ok(all)
        })
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

    /// Records that these CAS entries were just used, for retention. Rows
    /// already touched this second are not rewritten. One transaction for
    /// all of them: a FindMissingBlobs of 10,000 digests is one commit (one
    /// WAL sync on SQLite), not one per batch.
    pub async fn touch_cas(&self, cache: CacheId, hashes: &[[u8; 32]], now: i64) -> Result<()> {
        let hashes = sql::dedup(hashes);
        if hashes.is_empty() {
            return Ok(());
        }
        on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;
            for batch in hashes.chunks(sql::WIDE_READ_BATCH) {
                let n = sql::in_list_len(batch.len());
                // `+accessed_at`, not `accessed_at`: with the plain column
                // SQLite's planner (EXPLAIN QUERY PLAN) takes the (cache_id,
                // accessed_at) retention index and visits every entry of the
                // cache not touched this second, per batch: a cost that grows
                // with the cache. The unary plus (valid in Postgres too) keeps
                // that index out, so the statement goes by its keys.
                let update = format!(
                    "UPDATE cas_entries SET accessed_at = $2 \
                     WHERE cache_id = $1 AND +accessed_at < $2 \
                       AND blob_id IN (SELECT id FROM blobs WHERE hash IN ({}))",
                    sql::params(3, n)
                );
                let mut query = sqlx::query(&update).bind(cache.0).bind(now);
                for i in 0..n {
                    query = query.bind(&sql::padded(batch, i)[..]);
                }
                query.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        })
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

    /// Records that a stored action result was just served, so retention
    /// keeps results in use; a row already touched this second is not
    /// rewritten.
    pub async fn touch_action_result(
        &self,
        cache: CacheId,
        action_hash: &[u8; 32],
        now: i64,
    ) -> Result<()> {
        on_writer!(self, |pool| async {
            sqlx::query(
                "UPDATE action_results SET accessed_at = $3 \
                 WHERE cache_id = $1 AND action_hash = $2 AND accessed_at < $3",
            )
            .bind(cache.0)
            .bind(&action_hash[..])
            .bind(now)
            .execute(pool)
            .await?;
            Ok(())
        })
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
