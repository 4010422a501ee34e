//! What each cache holds, in figures: for the status page and capacity
//! planning. Store-wide figures (unique and stored chunk bytes) are
//! [`Meta::chunk_stats`]; a chunk shared by several caches is stored once
//! and belongs to none of them alone, so no per-cache stored size is kept.

use sqlx::Row as _;

use crate::caches::{CACHE_COLUMN_COUNT, CACHE_COLUMNS, cache_from_columns};
use crate::{Cache, Meta, Result, on_reader, sql};

/// The logical contents of one cache: what its clients uploaded and can
/// download, counted once per cache even where the bytes are shared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheUsage {
    pub nix_objects: u64,
    /// Sum of the objects' NAR sizes.
    pub nix_bytes: u64,
    pub cas_entries: u64,
    /// Sum of the CAS blobs' sizes.
    pub cas_bytes: u64,
    pub action_results: u64,
}

impl CacheUsage {
    /// Bytes a client sees in this cache, Nix and Bazel together.
    pub fn logical_bytes(&self) -> u64 {
        self.nix_bytes.saturating_add(self.cas_bytes)
    }
}

impl Meta {
    /// Every live cache, by name, with its usage: one statement of three
    /// grouped aggregates, so the cost is one scan of the object tables
    /// however many caches there are (never a query per cache or object).
    /// That scan grows with the rows; callers that serve it to anyone (the
    /// status page) keep the answer for a few seconds.
    pub async fn caches_with_usage(&self) -> Result<Vec<(Cache, CacheUsage)>> {
        let sql = format!(
            "SELECT {CACHE_COLUMNS}, \
               COALESCE(n.objects, 0), COALESCE(n.nar_bytes, 0), \
               COALESCE(e.entries, 0), COALESCE(e.blob_bytes, 0), \
               COALESCE(a.results, 0) \
             FROM caches \
             LEFT JOIN (SELECT cache_id, COUNT(*) AS objects, \
                          CAST(SUM(nar_size) AS BIGINT) AS nar_bytes \
                        FROM nix_objects GROUP BY cache_id) n ON n.cache_id = caches.id \
             LEFT JOIN (SELECT ce.cache_id, COUNT(*) AS entries, \
                          CAST(SUM(b.size) AS BIGINT) AS blob_bytes \
                        FROM cas_entries ce JOIN blobs b ON b.id = ce.blob_id \
                        GROUP BY ce.cache_id) e ON e.cache_id = caches.id \
             LEFT JOIN (SELECT cache_id, COUNT(*) AS results \
                        FROM action_results GROUP BY cache_id) a ON a.cache_id = caches.id \
             WHERE caches.deleted_at IS NULL ORDER BY caches.name"
        );
        on_reader!(self, |pool| async {
            let rows = sqlx::query(&sql).fetch_all(pool).await?;
            rows.iter()
                .map(|row| {
                    let figure = |i: usize, what: &str| -> Result<u64> {
                        sql::from_db(row.try_get(CACHE_COLUMN_COUNT + i)?, what)
                    };
                    let usage = CacheUsage {
                        nix_objects: figure(0, "nix object count")?,
                        nix_bytes: figure(1, "nix object bytes")?,
                        cas_entries: figure(2, "CAS entry count")?,
                        cas_bytes: figure(3, "CAS bytes")?,
                        action_results: figure(4, "action result count")?,
                    };
                    Ok((cache_from_columns(row)?, usage))
                })
                .collect()
        })
    }
}
