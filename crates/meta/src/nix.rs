//! Nix objects: one store path in one cache, pointing at the blob that holds
//! its NAR. Each object holds one reference on its blob.

use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::blobs::{BLOB_COLUMNS, Blob, blob_from_row};
use crate::caches::{CACHE_COLUMN_COUNT, CACHE_COLUMNS, cache_from_columns};
use crate::sql::{self, READ_BATCH};
use crate::{
    BeginWrite as _, BlobId, Cache, CacheId, Meta, MetaError, Result, on_reader, on_writer,
};

/// A store path's narinfo fields, as uploaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NixObject {
    /// The 32-character nix-base32 hash part of the store path.
    pub store_path_hash: String,
    /// The store path's base name, `<hash>-<name>`.
    pub store_path: String,
    /// The blob holding the NAR; `nar_hash` and `nar_size` are its hash and
    /// size, kept here so a narinfo is one row.
    pub blob_id: BlobId,
    pub nar_hash: [u8; 32],
    pub nar_size: u64,
    /// Base names of the store paths this one refers to.
    pub references: Vec<String>,
    pub deriver: Option<String>,
    /// Signatures, `name:base64`.
    pub sigs: Vec<String>,
    pub ca: Option<String>,
    pub system: Option<String>,
}

/// A stored Nix object and the blob its NAR is in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NixObjectRow {
    pub id: i64,
    pub object: NixObject,
    pub blob: Blob,
    pub created_at: i64,
    pub accessed_at: i64,
}

/// Lists of store paths and of signatures are stored space-separated, as in
/// a narinfo; neither element can contain a space.
fn join(words: &[String]) -> String {
    words.join(" ")
}

fn split(text: &str) -> Vec<String> {
    text.split_ascii_whitespace().map(str::to_owned).collect()
}

const OBJECT_COLUMNS: &str = "o.id, o.store_path_hash, o.store_path, o.nar_hash, o.nar_size, \
     o.refs, o.deriver, o.sigs, o.ca, o.system, o.created_at, o.accessed_at";

/// Decodes `OBJECT_COLUMNS` followed by `BLOB_COLUMNS`, the eighteen
/// columns from `at` on: more than sqlx decodes as a tuple, so by index for
/// either backend.
fn object_from_row<R>(row: &R, at: usize) -> Result<NixObjectRow>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    let blob = blob_from_row((
        row.try_get(at + 12)?,
        row.try_get(at + 13)?,
        row.try_get(at + 14)?,
        row.try_get(at + 15)?,
        row.try_get(at + 16)?,
        row.try_get(at + 17)?,
    ))?;
    let object = NixObject {
        store_path_hash: row.try_get(at + 1)?,
        store_path: row.try_get(at + 2)?,
        blob_id: blob.id,
        nar_hash: sql::digest(row.try_get(at + 3)?, "nar_hash")?,
        nar_size: sql::from_db(row.try_get(at + 4)?, "nar_size")?,
        references: split(&row.try_get::<String, _>(at + 5)?),
        deriver: row.try_get(at + 6)?,
        sigs: split(&row.try_get::<String, _>(at + 7)?),
        ca: row.try_get(at + 8)?,
        system: row.try_get(at + 9)?,
    };
    Ok(NixObjectRow {
        id: row.try_get(at)?,
        object,
        blob,
        created_at: row.try_get(at + 10)?,
        accessed_at: row.try_get(at + 11)?,
    })
}

/// Drops one reference from a blob inside the caller's transaction; at zero
/// the blob becomes collectable after the grace period.
pub(crate) const BLOB_DECREF: &str = "UPDATE blobs SET refcount = refcount - 1, \
     deletable_at = CASE WHEN refcount = 1 THEN $2 ELSE deletable_at END WHERE id = $1";

/// Forgets the references of object `$2` of cache `$1` (see
/// `nix_object_refs` in `migrations/*/0005_gc.sql`).
pub(crate) const DELETE_REFS: &str =
    "DELETE FROM nix_object_refs WHERE cache_id = $1 AND referrer_hash = $2";

/// Records `n` references (`$3…`) of object `$2` of cache `$1`.
fn insert_refs_sql(n: usize) -> String {
    format!(
        "INSERT INTO nix_object_refs (cache_id, referrer_hash, ref_hash) VALUES {}",
        sql::rows(3, n, 1, "$1, $2, ", "")
    )
}

/// Replaces the reference rows of object `$hash` of cache `$cache` with
/// `$refs` in transaction `$tx`. A macro so that it expands inside each
/// backend's transaction.
macro_rules! replace_refs {
    ($tx:expr, $cache:expr, $hash:expr, $refs:expr) => {{
        let refs: &[&str] = $refs;
        sqlx::query(DELETE_REFS)
            .bind($cache.0)
            .bind($hash)
            .execute(&mut *$tx)
            .await?;
        for batch in refs.chunks(sql::WRITE_BATCH) {
            let insert = insert_refs_sql(batch.len());
            let mut query = sqlx::query(&insert).bind($cache.0).bind($hash);
            for hash in batch {
                query = query.bind(*hash);
            }
            query.execute(&mut *$tx).await?;
        }
    }};
}

/// The store path hashes `object` refers to, each once and without itself:
/// what GC needs to keep the object's closure whole.
fn ref_hashes(object: &NixObject) -> Vec<&str> {
    let mut hashes: Vec<&str> = object
        .references
        .iter()
        .filter_map(|name| name.get(..32))
        .filter(|hash| *hash != object.store_path_hash)
        .collect();
    hashes.sort_unstable();
    hashes.dedup();
    hashes
}

/// Adds one reference to a blob; affects no row if the blob is gone.
pub(crate) const BLOB_INCREF: &str =
    "UPDATE blobs SET refcount = refcount + 1, deletable_at = NULL WHERE id = $1";

impl Meta {
    /// Stores `object` at its store path in `cache`, replacing any object
    /// there. In one transaction the new blob gains a reference and the
    /// replaced one (if any) loses one, so refcounts always equal the number
    /// of objects naming each blob. Fails with `NotFound("blob")` if the blob
    /// is gone (it was committed more than the grace period ago and never
    /// referenced).
    pub async fn upsert_nix_object(
        &self,
        cache: CacheId,
        object: &NixObject,
        now: i64,
    ) -> Result<()> {
        let nar_size = sql::to_db(object.nar_size, "nar size")?;
        let references = join(&object.references);
        let sigs = join(&object.sigs);
        let ref_hashes = ref_hashes(object);
        let lease = self.lease(now);
        on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;
            let mut blob_referenced = false;
            let replaced = loop {
                // Lock the path first (a no-op UPDATE that reports the current
                // blob): a concurrent upsert of the same path then queues here
                // before touching any blob row, and each sees the other's blob
                // as the one it replaces.
                let old: Option<(i64,)> = sqlx::query_as(
                    "UPDATE nix_objects SET blob_id = blob_id \
                     WHERE cache_id = $1 AND store_path_hash = $2 RETURNING blob_id",
                )
                .bind(cache.0)
                .bind(&object.store_path_hash)
                .fetch_optional(&mut *tx)
                .await?;
                if !blob_referenced {
                    // Also locks the blob row, so GC cannot delete it under us.
                    let bumped = sqlx::query(BLOB_INCREF)
                        .bind(object.blob_id.0)
                        .execute(&mut *tx)
                        .await?;
                    if bumped.rows_affected() == 0 {
                        return Err(MetaError::NotFound("blob"));
                    }
                    blob_referenced = true;
                }
                if let Some((old,)) = old {
                    sqlx::query(
                        "UPDATE nix_objects SET store_path = $3, blob_id = $4, nar_hash = $5, \
                           nar_size = $6, refs = $7, deriver = $8, sigs = $9, ca = $10, \
                           system = $11, created_at = $12, accessed_at = $12 \
                         WHERE cache_id = $1 AND store_path_hash = $2",
                    )
                    .bind(cache.0)
                    .bind(&object.store_path_hash)
                    .bind(&object.store_path)
                    .bind(object.blob_id.0)
                    .bind(&object.nar_hash[..])
                    .bind(nar_size)
                    .bind(&references)
                    .bind(&object.deriver)
                    .bind(&sigs)
                    .bind(&object.ca)
                    .bind(&object.system)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    break Some(old);
                }
                let inserted = sqlx::query(
                    "INSERT INTO nix_objects (cache_id, store_path_hash, store_path, blob_id, \
                       nar_hash, nar_size, refs, deriver, sigs, ca, system, created_at, \
                       accessed_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12) \
                     ON CONFLICT (cache_id, store_path_hash) DO NOTHING",
                )
                .bind(cache.0)
                .bind(&object.store_path_hash)
                .bind(&object.store_path)
                .bind(object.blob_id.0)
                .bind(&object.nar_hash[..])
                .bind(nar_size)
                .bind(&references)
                .bind(&object.deriver)
                .bind(&sigs)
                .bind(&object.ca)
                .bind(&object.system)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                if inserted.rows_affected() == 1 {
                    break None;
                }
                // Postgres only: a concurrent upsert inserted the path after
                // our UPDATE looked; it is committed now, so replace it.
            };
            if let Some(old) = replaced {
                sqlx::query(BLOB_DECREF)
                    .bind(old)
                    .bind(lease)
                    .execute(&mut *tx)
                    .await?;
            }
            replace_refs!(tx, cache, &object.store_path_hash, &ref_hashes);
            tx.commit().await?;
            Ok(())
        })
    }

    /// The object at `store_path_hash` in `cache`, with its blob.
    pub async fn nix_object(
        &self,
        cache: CacheId,
        store_path_hash: &str,
    ) -> Result<Option<NixObjectRow>> {
        let sql = format!(
            "SELECT {OBJECT_COLUMNS}, {BLOB_COLUMNS} \
             FROM nix_objects o JOIN blobs b ON b.id = o.blob_id \
             WHERE o.cache_id = $1 AND o.store_path_hash = $2"
        );
        on_reader!(self, |pool| async {
            let row = sqlx::query(&sql)
                .bind(cache.0)
                .bind(store_path_hash)
                .fetch_optional(pool)
                .await?;
            row.as_ref().map(|row| object_from_row(row, 0)).transpose()
        })
    }

    /// The live cache called `name` and its object at `store_path_hash`, if
    /// it holds one: what [`Meta::cache`] and then [`Meta::nix_object`] find,
    /// by the same indexes, in one query, so a narinfo request is one round
    /// trip to the database. Fails with `NotFound("cache")` like
    /// [`Meta::cache`]; the caller authorizes before it shows the object.
    pub async fn cache_and_nix_object(
        &self,
        name: &str,
        store_path_hash: &str,
    ) -> Result<(Cache, Option<NixObjectRow>)> {
        // The subquery's columns are `CACHE_COLUMNS`, in order, whatever the
        // joined tables also call `id` or `created_at`.
        let sql = format!(
            "SELECT c.*, {OBJECT_COLUMNS}, {BLOB_COLUMNS} \
             FROM (SELECT {CACHE_COLUMNS} FROM caches WHERE name = $1 AND deleted_at IS NULL) c \
             LEFT JOIN nix_objects o ON o.cache_id = c.id AND o.store_path_hash = $2 \
             LEFT JOIN blobs b ON b.id = o.blob_id"
        );
        on_reader!(self, |pool| async {
            let row = sqlx::query(&sql)
                .bind(name)
                .bind(store_path_hash)
                .fetch_optional(pool)
                .await?
                .ok_or(MetaError::NotFound("cache"))?;
            let cache = cache_from_columns(&row)?;
            // No object, or (as `nix_object`'s inner join has it) none whose
            // blob row is there.
            let object_id: Option<i64> = row.try_get(CACHE_COLUMN_COUNT)?;
            let blob_id: Option<i64> = row.try_get(CACHE_COLUMN_COUNT + 12)?;
            let object = match (object_id, blob_id) {
                (Some(_), Some(_)) => Some(object_from_row(&row, CACHE_COLUMN_COUNT)?),
                _ => None,
            };
            Ok((cache, object))
        })
    }

    /// Records that `cache`'s uploader sent the NAR held by `blob` (plain
    /// `nix copy --to http://…` sends the NAR before its narinfo).
    pub async fn record_nix_upload(&self, cache: CacheId, blob: BlobId, now: i64) -> Result<()> {
        on_writer!(self, |pool| async {
            sqlx::query(
                "INSERT INTO nix_uploads (cache_id, blob_id, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (cache_id, blob_id) DO UPDATE SET created_at = excluded.created_at",
            )
            .bind(cache.0)
            .bind(blob.0)
            .bind(now)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// Whether `cache`'s uploader sent the NAR held by `blob` at or after
    /// `since`, or `cache` already holds an object with that NAR: either way
    /// a narinfo in `cache` may reference the blob.
    pub async fn nix_upload_exists(
        &self,
        cache: CacheId,
        blob: BlobId,
        since: i64,
    ) -> Result<bool> {
        let found: Option<(i64,)> = on_reader!(self, |pool| async {
            sqlx::query_as(
                "SELECT cache_id FROM nix_uploads WHERE cache_id = $1 AND blob_id = $2 AND created_at >= $3 \
                 UNION ALL \
                 SELECT cache_id FROM nix_objects WHERE cache_id = $1 AND blob_id = $2 \
                 LIMIT 1",
            )
            .bind(cache.0)
            .bind(blob.0)
            .bind(since)
            .fetch_optional(pool)
            .await
        })?;
        Ok(found.is_some())
    }

    /// The store path hashes `cache` lacks, in the caller's order without
    /// repeats.
    pub async fn missing_store_paths(
        &self,
        cache: CacheId,
        store_path_hashes: &[&str],
    ) -> Result<Vec<String>> {
        let hashes = sql::dedup(store_path_hashes);
        let mut missing = Vec::new();
        for batch in hashes.chunks(READ_BATCH) {
            let n = sql::in_list_len(batch.len());
            let lookup = format!(
                "SELECT store_path_hash FROM nix_objects \
                 WHERE cache_id = $1 AND store_path_hash IN ({})",
                sql::params(2, n)
            );
            let found: Vec<(String,)> = on_reader!(self, |pool| async {
                let mut query = sqlx::query_as(&lookup).bind(cache.0);
                for i in 0..n {
                    query = query.bind(*sql::padded(batch, i));
                }
                query.fetch_all(pool).await
            })?;
            missing.extend(
                batch
                    .iter()
                    .filter(|h| !found.iter().any(|(f,)| f == *h))
                    .map(|h| (*h).to_owned()),
            );
        }
        Ok(missing)
    }

    /// Removes the object at `store_path_hash` from `cache`, dropping its
    /// blob's reference in the same transaction.
    pub async fn delete_nix_object(
        &self,
        cache: CacheId,
        store_path_hash: &str,
        now: i64,
    ) -> Result<()> {
        let lease = self.lease(now);
        on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;
            let deleted: Option<(i64,)> = sqlx::query_as(
                "DELETE FROM nix_objects WHERE cache_id = $1 AND store_path_hash = $2 \
                 RETURNING blob_id",
            )
            .bind(cache.0)
            .bind(store_path_hash)
            .fetch_optional(&mut *tx)
            .await?;
            let (blob,) = deleted.ok_or(MetaError::NotFound("nix object"))?;
            sqlx::query(DELETE_REFS)
                .bind(cache.0)
                .bind(store_path_hash)
                .execute(&mut *tx)
                .await?;
            sqlx::query(BLOB_DECREF)
                .bind(blob)
                .bind(lease)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }
}
