//! Expiry: deciding what is no longer live, the first step of a GC run.
//!
//! - Nix objects past their cache's retention go, but only from the top of a
//!   closure down: an object goes only once no live pin names it and no
//!   object left in its cache refers to it (`nix_object_refs`). A path that
//!   stays therefore keeps everything it refers to, however old.
//! - CAS entries and action results past retention go.
//! - A cache with a CAS budget loses its least recently used CAS entries
//!   until it fits, sparing those used within a protection window (an
//!   action-cache hit refreshes the blobs it names, so a build that got a
//!   hit finds its outputs).
//! - Everything in a deleted cache goes.
//!
//! Deleted rows release their blobs, which become collectable after the
//! grace period (see [`Meta::gc_sweep_blobs`]).

use std::collections::HashSet;
use std::time::Duration;

use super::{claim_sql, release};
use crate::sql::{self, READ_BATCH};
use crate::{BeginWrite as _, CacheId, Meta, Result, on_reader, on_writer};

/// Nix objects of cache `$1` last accessed at or before `$2` (at most `$3`,
/// oldest first) that nothing keeps: no live pin at `$5` names them and no
/// object left in the cache refers to them; in a deleted cache (`$4`),
/// nothing keeps them. Returns each one's blob and store path hash.
const EXPIRE_NIX_OBJECTS: (&str, &str) = claim_sql!(
    "SELECT id FROM nix_objects o WHERE cache_id = $1 AND accessed_at <= $2 \
       AND ($4 OR (NOT EXISTS (SELECT 1 FROM nix_pins p \
                    WHERE p.cache_id = o.cache_id AND p.store_path_hash = o.store_path_hash \
                      AND (p.expires_at IS NULL OR p.expires_at > $5)) \
               AND NOT EXISTS (SELECT 1 FROM nix_object_refs r \
                    WHERE r.cache_id = o.cache_id AND r.ref_hash = o.store_path_hash))) \
     ORDER BY accessed_at LIMIT $3",
    "DELETE FROM nix_objects WHERE id IN (SELECT id FROM claimed) \
     RETURNING blob_id, store_path_hash"
);

/// How many Nix objects of cache `$1` the expiry would take in the end,
/// reference rounds included: all but the closure of those accessed after
/// `$2` or pinned at `$3`. One recursive query over the cache, for
/// `--dry-run` only; the real expiry never walks a whole cache.
const COUNT_EXPIRABLE_NIX_OBJECTS: &str = "WITH RECURSIVE kept (hash) AS ( \
       SELECT store_path_hash FROM nix_objects o WHERE cache_id = $1 AND (accessed_at > $2 \
         OR EXISTS (SELECT 1 FROM nix_pins p \
              WHERE p.cache_id = o.cache_id AND p.store_path_hash = o.store_path_hash \
                AND (p.expires_at IS NULL OR p.expires_at > $3))) \
       UNION \
       SELECT r.ref_hash FROM nix_object_refs r JOIN kept k ON r.referrer_hash = k.hash \
       WHERE r.cache_id = $1) \
     SELECT COUNT(*) FROM nix_objects \
     WHERE cache_id = $1 AND store_path_hash NOT IN (SELECT hash FROM kept)";

/// As [`EXPIRE_NIX_OBJECTS`], for CAS entries (nothing pins them).
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

/// The least recently used CAS entries of cache `$1` accessed at or before
/// `$2` that together free at least `$3` logical bytes (each entry is taken
/// while the entries before it free less), oldest first, at most `$4`.
const EVICTION_CANDIDATES: &str = "SELECT blob_id, size FROM ( \
       SELECT c.blob_id, c.accessed_at, b.size, CAST(SUM(b.size) OVER \
         (ORDER BY c.accessed_at, c.blob_id ROWS UNBOUNDED PRECEDING) AS BIGINT) AS running \
       FROM cas_entries c JOIN blobs b ON b.id = c.blob_id \
       WHERE c.cache_id = $1 AND c.accessed_at <= $2) t \
     WHERE running - size < $3 ORDER BY accessed_at, blob_id LIMIT $4";

/// Logical bytes of cache `$1`'s CAS entries.
const CAS_BYTES: &str = "SELECT CAST(COALESCE(SUM(b.size), 0) AS BIGINT) FROM cas_entries c \
     JOIN blobs b ON b.id = c.blob_id WHERE c.cache_id = $1";

/// What one [`Meta::gc_expire`] call deleted (or, from
/// [`Meta::gc_expire_preview`], would delete).
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

    fn add(&mut self, other: Expired) {
        self.nix_objects += other.nix_objects;
        self.cas_entries += other.cas_entries;
        self.action_results += other.action_results;
    }
}

/// What [`Meta::gc_evict_cas`] evicted (or would evict) to bring caches
/// within their CAS budgets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub entries: u64,
    /// Logical bytes of the evicted entries.
    pub bytes: u64,
}

/// A cache the expiry visits, and the access time at or before which its
/// rows go.
struct Expiring {
    cache: CacheId,
    cutoff: i64,
    deleted: bool,
}

impl Meta {
    /// The caches with something to expire at `now`: deleted ones (all of
    /// it) and those with a retention period, their own or
    /// `default_retention`.
    async fn expiring_caches(
        &self,
        now: i64,
        default_retention: Option<Duration>,
    ) -> Result<Vec<Expiring>> {
        let default_retention = default_retention.map(sql::secs);
        let caches: Vec<(i64, Option<i64>, bool)> = on_reader!(self, |pool| async {
            sqlx::query_as(
                "SELECT id, retention_period, deleted_at IS NOT NULL FROM caches \
                 WHERE deleted_at IS NOT NULL OR retention_period IS NOT NULL OR $1",
            )
            .bind(default_retention.is_some())
            .fetch_all(pool)
            .await
        })?;
        Ok(caches
            .into_iter()
            .filter_map(|(cache, retention, deleted)| {
                // As in Attic, a retention period of 0 keeps forever.
                let cutoff = if deleted {
                    i64::MAX
                } else {
                    now.saturating_sub(retention.or(default_retention).filter(|r| *r > 0)?)
                };
                Some(Expiring {
                    cache: CacheId(cache),
                    cutoff,
                    deleted,
                })
            })
            .collect())
    }

    /// Deletes up to `limit` each of the Nix objects, CAS entries and action
    /// results of every cache that were last accessed longer ago than the
    /// cache's retention period (`default_retention` for caches without one;
    /// `None` or 0 keeps them), and those of deleted caches regardless; pinned
    /// Nix objects and those an object left in the cache refers to stay.
    /// Call it until it returns nothing: each call can free the references
    /// of the objects the previous one took. Blobs that lose their last
    /// reference become collectable after the grace period, so
    /// [`Meta::gc_sweep_blobs`] picks them up later.
    pub async fn gc_expire(
        &self,
        now: i64,
        default_retention: Option<Duration>,
        limit: u32,
    ) -> Result<Expired> {
        let mut expired = Expired::default();
        for cache in self.expiring_caches(now, default_retention).await? {
            expired.add(self.expire_cache(&cache, now, limit).await?);
        }
        Ok(expired)
    }

    /// What [`Meta::gc_expire`], called until it returns nothing, would
    /// delete at `now`; deletes nothing.
    pub async fn gc_expire_preview(
        &self,
        now: i64,
        default_retention: Option<Duration>,
    ) -> Result<Expired> {
        let mut expired = Expired::default();
        for Expiring {
            cache,
            cutoff,
            deleted,
        } in self.expiring_caches(now, default_retention).await?
        {
            let counts: [i64; 3] = on_reader!(self, |pool| async {
                let nix = if deleted {
                    sqlx::query_as("SELECT COUNT(*) FROM nix_objects WHERE cache_id = $1")
                        .bind(cache.0)
                } else {
                    sqlx::query_as(COUNT_EXPIRABLE_NIX_OBJECTS)
                        .bind(cache.0)
                        .bind(cutoff)
                        .bind(now)
                };
                let (nix_objects,): (i64,) = nix.fetch_one(pool).await?;
                let mut counts = [nix_objects, 0, 0];
                for (table, count) in ["cas_entries", "action_results"]
                    .into_iter()
                    .zip(&mut counts[1..])
                {
                    let count_sql = format!(
                        "SELECT COUNT(*) FROM {table} WHERE cache_id = $1 AND accessed_at <= $2"
                    );
                    (*count,) = sqlx::query_as(&count_sql)
                        .bind(cache.0)
                        .bind(cutoff)
                        .fetch_one(pool)
                        .await?;
                }
                Ok::<_, sqlx::Error>(counts)
            })?;
            expired.add(Expired {
                nix_objects: counts[0].unsigned_abs(),
                cas_entries: counts[1].unsigned_abs(),
                action_results: counts[2].unsigned_abs(),
            });
        }
        Ok(expired)
    }

    /// One cache's share of [`Meta::gc_expire`], in one transaction.
    async fn expire_cache(&self, cache: &Expiring, now: i64, limit: u32) -> Result<Expired> {
        let (nix_sql, cas_sql, ac_sql) = (
            self.dialect(EXPIRE_NIX_OBJECTS),
            self.dialect(EXPIRE_CAS_ENTRIES),
            self.dialect(EXPIRE_ACTION_RESULTS),
        );
        let lease = self.lease(now);
        let Expiring {
            cache,
            cutoff,
            deleted,
        } = *cache;
        on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;
            let objects: Vec<(i64, String)> = sqlx::query_as(nix_sql)
                .bind(cache.0)
                .bind(cutoff)
                .bind(i64::from(limit))
                .bind(deleted)
                .bind(now)
                .fetch_all(&mut *tx)
                .await?;
            let hashes: Vec<&str> = objects.iter().map(|(_, hash)| hash.as_str()).collect();
            for batch in hashes.chunks(READ_BATCH) {
                let n = sql::in_list_len(batch.len());
                let forget = format!(
                    "DELETE FROM nix_object_refs WHERE cache_id = $1 AND referrer_hash IN ({})",
                    sql::params(2, n)
                );
                let mut query = sqlx::query(&forget).bind(cache.0);
                for i in 0..n {
                    query = query.bind(*sql::padded(batch, i));
                }
                query.execute(&mut *tx).await?;
            }
            if deleted {
                sqlx::query("DELETE FROM nix_pins WHERE cache_id = $1")
                    .bind(cache.0)
                    .execute(&mut *tx)
                    .await?;
            }
            let entries: Vec<(i64,)> = sqlx::query_as(cas_sql)
                .bind(cache.0)
                .bind(cutoff)
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
            let action_results = sqlx::query(ac_sql)
                .bind(cache.0)
                .bind(cutoff)
                .bind(i64::from(limit))
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let released = objects
                .iter()
                .map(|(blob, _)| (*blob, 1))
                .chain(entries.iter().map(|(blob,)| (*blob, 1)));
            release!(tx, "blobs", released, lease);
            tx.commit().await?;
            Ok(Expired {
                nix_objects: objects.len() as u64,
                cas_entries: entries.len() as u64,
                action_results,
            })
        })
    }

    /// Deletes the pins that expired at or before `now`; returns how many.
    /// An expired pin already keeps nothing (expiry ignores it), so this
    /// only keeps the list an operator reads honest.
    pub async fn gc_forget_expired_pins(&self, now: i64) -> Result<u64> {
        on_writer!(self, |pool| async {
            Ok(sqlx::query("DELETE FROM nix_pins WHERE expires_at <= $1")
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected())
        })
    }

    /// Brings every live cache with a CAS budget within it: evicts its least
    /// recently used CAS entries, `batch` per transaction, until the logical
    /// bytes left fit, but never one accessed after `protect_after` (an
    /// action-cache hit refreshes what it names; evicting that under a
    /// build would break `--remote_download_minimal`). A cache whose
    /// protected entries alone exceed the budget stays over it. With
    /// `dry_run`, only counts.
    pub async fn gc_evict_cas(
        &self,
        now: i64,
        protect_after: i64,
        batch: u32,
        dry_run: bool,
    ) -> Result<Evicted> {
        let budgets: Vec<(i64, i64)> = on_reader!(self, |pool| async {
            sqlx::query_as(
                "SELECT id, cas_budget_bytes FROM caches \
                 WHERE cas_budget_bytes IS NOT NULL AND deleted_at IS NULL",
            )
            .fetch_all(pool)
            .await
        })?;
        let lease = self.lease(now);
        let mut evicted = Evicted::default();
        for (cache, budget) in budgets {
            let (used,): (i64,) = on_reader!(self, |pool| async {
                sqlx::query_as(CAS_BYTES).bind(cache).fetch_one(pool).await
            })?;
            let mut excess = used - budget;
            while excess > 0 {
                let limit = if dry_run { i64::MAX } else { i64::from(batch) };
                let candidates: Vec<(i64, i64)> = on_reader!(self, |pool| async {
                    sqlx::query_as(EVICTION_CANDIDATES)
                        .bind(cache)
                        .bind(protect_after)
                        .bind(excess)
                        .bind(limit)
                        .fetch_all(pool)
                        .await
                })?;
                if candidates.is_empty() {
                    break;
                }
                if dry_run {
                    evicted.entries += candidates.len() as u64;
                    evicted.bytes += candidates
                        .iter()
                        .map(|(_, size)| size.unsigned_abs())
                        .sum::<u64>();
                    break;
                }
                let gone = self
                    .evict(CacheId(cache), &candidates, protect_after, lease)
                    .await?;
                if gone.entries == 0 {
                    // Every candidate was refreshed or evicted by someone
                    // else meanwhile: look again from the new state.
                    continue;
                }
                evicted.entries += gone.entries;
                evicted.bytes += gone.bytes;
                excess -= i64::try_from(gone.bytes).unwrap_or(i64::MAX);
            }
        }
        Ok(evicted)
    }

    /// Deletes the CAS entries `candidates` (`(blob, size)`) of `cache` still
    /// not accessed after `protect_after`, releasing their blobs, in one
    /// transaction.
    async fn evict(
        &self,
        cache: CacheId,
        candidates: &[(i64, i64)],
        protect_after: i64,
        lease: i64,
    ) -> Result<Evicted> {
        on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;
            let mut gone: Vec<i64> = Vec::with_capacity(candidates.len());
            for batch in candidates.chunks(READ_BATCH) {
                let n = sql::in_list_len(batch.len());
                let delete = format!(
                    "DELETE FROM cas_entries \
                     WHERE cache_id = $1 AND accessed_at <= $2 AND blob_id IN ({}) \
                     RETURNING blob_id",
                    sql::params(3, n)
                );
                let mut query = sqlx::query_as(&delete).bind(cache.0).bind(protect_after);
                for i in 0..n {
                    query = query.bind(sql::padded(batch, i).0);
                }
                let rows: Vec<(i64,)> = query.fetch_all(&mut *tx).await?;
                gone.extend(rows.into_iter().map(|(blob,)| blob));
            }
            let gone_set: HashSet<i64> = gone.iter().copied().collect();
            let bytes = candidates
                .iter()
                .filter(|(blob, _)| gone_set.contains(blob))
                .map(|(_, size)| size.unsigned_abs())
                .sum();
            release!(tx, "blobs", gone.iter().map(|blob| (*blob, 1)), lease);
            tx.commit().await?;
            Ok(Evicted {
                entries: gone.len() as u64,
                bytes,
            })
        })
    }
}
