//! Access times: the `accessed_at` of Nix objects, CAS entries and action
//! results, which retention and GC go by.
//!
//! Reads are far more frequent than writes, so a server does not refresh a
//! row per request: it collects what was read and writes it in batches (see
//! the server's `access_times`). Each method here therefore takes the
//! touches of many caches at once and writes them in one transaction (one
//! WAL sync on SQLite), grouped by cache so every statement runs the plan
//! the single-cache lookups run.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{Encode, Postgres, Sqlite, Type};

use crate::sql::{self, WIDE_READ_BATCH};
use crate::{BeginWrite as _, CacheId, Meta, Result, on_reader, on_writer};

/// A key column value that both drivers bind by value.
trait Key:
    Clone
    + Ord
    + Send
    + Sync
    + for<'q> Encode<'q, Postgres>
    + Type<Postgres>
    + for<'q> Encode<'q, Sqlite>
    + Type<Sqlite>
{
}

impl<K> Key for K where
    K: Clone
        + Ord
        + Send
        + Sync
        + for<'q> Encode<'q, Postgres>
        + Type<Postgres>
        + for<'q> Encode<'q, Sqlite>
        + Type<Sqlite>
{
}

impl Meta {
    /// Records that these Nix objects (cache, store path hash) were just
    /// served. Returns how many rows changed: rows already touched this
    /// second are not rewritten.
    pub async fn touch_nix_objects<S: AsRef<str>>(
        &self,
        objects: &[(CacheId, S)],
        now: i64,
    ) -> Result<u64> {
        let keys = objects
            .iter()
            .map(|(cache, hash)| (*cache, hash.as_ref().to_owned()));
        self.touch_rows(
            |n| {
                format!(
                    "UPDATE nix_objects SET accessed_at = $2 \
                     WHERE cache_id = $1 AND +accessed_at < $2 AND store_path_hash IN ({})",
                    sql::params(3, n)
                )
            },
            keys,
            now,
        )
        .await
    }

    /// Records that these CAS entries (cache, content hash) were just used:
    /// read, or found by FindMissingBlobs. Returns how many rows changed;
    /// rows already touched this second are not rewritten.
    pub async fn touch_cas(&self, entries: &[(CacheId, [u8; 32])], now: i64) -> Result<u64> {
        let keys = entries.iter().map(|(cache, hash)| (*cache, hash.to_vec()));
        self.touch_rows(
            |n| {
                format!(
                    "UPDATE cas_entries SET accessed_at = $2 \
                     WHERE cache_id = $1 AND +accessed_at < $2 \
                       AND blob_id IN (SELECT id FROM blobs WHERE hash IN ({}))",
                    sql::params(3, n)
                )
            },
            keys,
            now,
        )
        .await
    }

    /// Records that these action results (cache, action hash) were just
    /// served. Returns how many rows changed; rows already touched this
    /// second are not rewritten.
    pub async fn touch_action_results(
        &self,
        results: &[(CacheId, [u8; 32])],
        now: i64,
    ) -> Result<u64> {
        let keys = results.iter().map(|(cache, hash)| (*cache, hash.to_vec()));
        self.touch_rows(
            |n| {
                format!(
                    "UPDATE action_results SET accessed_at = $2 \
                     WHERE cache_id = $1 AND +accessed_at < $2 AND action_hash IN ({})",
                    sql::params(3, n)
                )
            },
            keys,
            now,
        )
        .await
    }

    /// When `cache`'s CAS entry for content `hash` was last used, if it
    /// holds one: what LRU eviction sees.
    pub async fn cas_accessed_at(&self, cache: CacheId, hash: &[u8; 32]) -> Result<Option<i64>> {
        let row: Option<(i64,)> = on_reader!(self, |pool| async {
            sqlx::query_as(
                "SELECT e.accessed_at FROM cas_entries e JOIN blobs b ON b.id = e.blob_id \
                 WHERE e.cache_id = $1 AND b.hash = $2",
            )
            .bind(cache.0)
            .bind(&hash[..])
            .fetch_optional(pool)
            .await
        })?;
        Ok(row.map(|(at,)| at))
    }

    /// When `cache`'s result for `action_hash` was last served or stored,
    /// if it holds one: what retention sees.
    pub async fn action_result_accessed_at(
        &self,
        cache: CacheId,
        action_hash: &[u8; 32],
    ) -> Result<Option<i64>> {
        let row: Option<(i64,)> = on_reader!(self, |pool| async {
            sqlx::query_as(
                "SELECT accessed_at FROM action_results WHERE cache_id = $1 AND action_hash = $2",
            )
            .bind(cache.0)
            .bind(&action_hash[..])
            .fetch_optional(pool)
            .await
        })?;
        Ok(row.map(|(at,)| at))
    }

    /// Sets `accessed_at = now` on the rows `update(n)` selects by `$1`
    /// (cache), `$2` (now) and `n` keys from `$3`, for every (cache, key)
    /// in one transaction, without repeats. Caches and keys go in order, so
    /// two replicas flushing overlapping keys lock rows in a similar order
    /// (and a deadlock that remains is retried by `on_writer!`).
    ///
    /// `update` must say `+accessed_at`, not `accessed_at`: with the plain
    /// column SQLite's planner (EXPLAIN QUERY PLAN) takes the (cache_id,
    /// accessed_at) retention index and visits every row of the cache not
    /// touched this second, per statement: a cost that grows with the
    /// cache. The unary plus (valid in Postgres too) keeps that index out,
    /// so the statement goes by its keys.
    async fn touch_rows<K: Key>(
        &self,
        update: impl Fn(usize) -> String,
        keys: impl Iterator<Item = (CacheId, K)>,
        now: i64,
    ) -> Result<u64> {
        let mut by_cache: BTreeMap<CacheId, BTreeSet<K>> = BTreeMap::new();
        for (cache, key) in keys {
            by_cache.entry(cache).or_default().insert(key);
        }
        if by_cache.is_empty() {
            return Ok(0);
        }
        let statements: Vec<(CacheId, String, Vec<K>)> = by_cache
            .into_iter()
            .flat_map(|(cache, keys)| {
                let keys: Vec<K> = keys.into_iter().collect();
                keys.chunks(WIDE_READ_BATCH)
                    .map(|batch| (cache, batch.to_vec()))
                    .collect::<Vec<_>>()
            })
            .map(|(cache, batch)| (cache, update(sql::in_list_len(batch.len())), batch))
            .collect();
        on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;
            let mut changed = 0;
            for (cache, text, batch) in &statements {
                let mut query = sqlx::query(text).bind(cache.0).bind(now);
                for i in 0..sql::in_list_len(batch.len()) {
                    query = query.bind(sql::padded(batch, i).clone());
                }
                changed += query.execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
            Ok(changed)
        })
    }
}
