//! Caches: the named namespaces that Nix objects, CAS entries and action
//! results live in. Deleting one is a soft delete (`deleted_at`), so its name
//! is free again at once while its objects are reclaimed later.

use std::fmt;

use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::redact::{Redacted, redact};
use crate::sql;
use crate::{CacheId, Meta, MetaError, Result, on_reader, on_writer};

/// A cache to create.
#[derive(Clone, PartialEq, Eq)]
pub struct NewCache {
    /// Must match Attic's `^[A-Za-z0-9][A-Za-z0-9-_+]{0,49}$`, so it is safe
    /// in URLs, object keys and log lines.
    pub name: String,
    pub is_public: bool,
    pub store_dir: String,
    pub priority: i32,
    /// Nix secret key text, `name:base64`, that signs the narinfos served.
    pub signing_key: String,
    pub upstream_cache_key_names: Vec<String>,
    /// See [`Cache::retention_period`].
    pub retention_period: Option<i64>,
}

/// A live cache.
#[derive(Clone, PartialEq, Eq)]
pub struct Cache {
    pub id: CacheId,
    pub name: String,
    pub is_public: bool,
    pub store_dir: String,
    pub priority: i32,
    pub signing_key: String,
    pub upstream_cache_key_names: Vec<String>,
    /// Seconds a Nix object may go unaccessed before GC may take it, with
    /// Attic's meaning, so `attic cache configure` means the same here:
    /// `None` follows the server's default (`gc.default_retention`), and
    /// `Some(0)` keeps objects however long they go unaccessed.
    pub retention_period: Option<i64>,
    /// Logical bytes the cache's CAS entries may hold before GC evicts the
    /// least recently used; `None`: no budget. Never zero (a budget of
    /// nothing is a cache that cannot hold anything: delete it instead).
    pub cas_budget_bytes: Option<u64>,
    pub created_at: i64,
}

/// A partial update: `None` keeps the current value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CachePatch {
    pub is_public: Option<bool>,
    pub store_dir: Option<String>,
    pub priority: Option<i32>,
    pub signing_key: Option<String>,
    pub upstream_cache_key_names: Option<Vec<String>>,
    /// `Some(None)` returns the cache to the server's default.
    pub retention_period: Option<Option<i64>>,
    /// `Some(None)` removes the budget.
    pub cas_budget_bytes: Option<Option<u64>>,
}

// Debug by hand so that logging a cache never logs its secret key.
impl fmt::Debug for NewCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewCache")
            .field("name", &self.name)
            .field("is_public", &self.is_public)
            .field("store_dir", &self.store_dir)
            .field("priority", &self.priority)
            .field("signing_key", &Redacted)
            .field("upstream_cache_key_names", &self.upstream_cache_key_names)
            .field("retention_period", &self.retention_period)
            .finish()
    }
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("is_public", &self.is_public)
            .field("store_dir", &self.store_dir)
            .field("priority", &self.priority)
            .field("signing_key", &Redacted)
            .field("upstream_cache_key_names", &self.upstream_cache_key_names)
            .field("retention_period", &self.retention_period)
            .field("cas_budget_bytes", &self.cas_budget_bytes)
            .field("created_at", &self.created_at)
            .finish()
    }
}

impl fmt::Debug for CachePatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachePatch")
            .field("is_public", &self.is_public)
            .field("store_dir", &self.store_dir)
            .field("priority", &self.priority)
            .field("signing_key", &redact(self.signing_key.as_ref()))
            .field("upstream_cache_key_names", &self.upstream_cache_key_names)
            .field("retention_period", &self.retention_period)
            .field("cas_budget_bytes", &self.cas_budget_bytes)
            .finish()
    }
}

/// Attic's cache name rule.
fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.len() <= 50
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'+'))
}

pub(crate) const CACHE_COLUMNS: &str = "id, name, is_public, store_dir, priority, signing_key, \
     upstream_cache_key_names, retention_period, created_at, cas_budget_bytes";

type CacheRow = (
    i64,
    String,
    bool,
    String,
    i32,
    String,
    String,
    Option<i64>,
    i64,
    Option<i64>,
);

fn cache_from_row(row: CacheRow) -> Result<Cache> {
    let (
        id,
        name,
        is_public,
        store_dir,
        priority,
        signing_key,
        upstream,
        retention,
        created_at,
        budget,
    ) = row;
    let upstream_cache_key_names = serde_json::from_str(&upstream)
        .map_err(|e| MetaError::Corrupt(format!("cache {name}: upstream_cache_key_names: {e}")))?;
    Ok(Cache {
        id: CacheId(id),
        name,
        is_public,
        store_dir,
        priority,
        signing_key,
        upstream_cache_key_names,
        retention_period: retention,
        cas_budget_bytes: budget
            .map(|b| sql::from_db(b, "cas_budget_bytes"))
            .transpose()?,
        created_at,
    })
}

/// [`cache_from_row`] for a row that goes on past `CACHE_COLUMNS` (its
/// first ten columns), decoded by index for either backend.
pub(crate) fn cache_from_columns<R>(row: &R) -> Result<Cache>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i32: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
{
    cache_from_row((
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
        row.try_get(5)?,
        row.try_get(6)?,
        row.try_get(7)?,
        row.try_get(8)?,
        row.try_get(9)?,
    ))
}

/// Columns [`cache_from_columns`] reads.
pub(crate) const CACHE_COLUMN_COUNT: usize = 10;

fn key_names_json(names: &[String]) -> String {
    serde_json::to_string(names).expect("a list of strings always serializes")
}

impl Meta {
    pub async fn create_cache(&self, cache: &NewCache, now: i64) -> Result<Cache> {
        if !valid_name(&cache.name) {
            return Err(MetaError::Invalid(format!(
                "cache name {:?} must match ^[A-Za-z0-9][A-Za-z0-9-_+]{{0,49}}$",
                cache.name
            )));
        }
        let upstream = key_names_json(&cache.upstream_cache_key_names);
        let sql = format!(
            "INSERT INTO caches (name, is_public, store_dir, priority, signing_key, \
             upstream_cache_key_names, retention_period, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {CACHE_COLUMNS}"
        );
        let result = on_writer!(self, |pool| async {
            let row: CacheRow = sqlx::query_as(&sql)
                .bind(&cache.name)
                .bind(cache.is_public)
                .bind(&cache.store_dir)
                .bind(cache.priority)
                .bind(&cache.signing_key)
                .bind(&upstream)
                .bind(cache.retention_period)
                .bind(now)
                .fetch_one(pool)
                .await?;
            Ok(row)
        });
        match result {
            Ok(row) => cache_from_row(row),
            Err(e) if e.is_unique_violation() => {
                Err(MetaError::AlreadyExists(format!("cache {}", cache.name)))
            }
            Err(e) => Err(e),
        }
    }

    /// The live cache called `name`.
    pub async fn cache(&self, name: &str) -> Result<Cache> {
        let sql =
            format!("SELECT {CACHE_COLUMNS} FROM caches WHERE name = $1 AND deleted_at IS NULL");
        let row: Option<CacheRow> = on_reader!(self, |pool| async {
            sqlx::query_as(&sql).bind(name).fetch_optional(pool).await
        })?;
        cache_from_row(row.ok_or(MetaError::NotFound("cache"))?)
    }

    /// Whether a cache called `name` exists or ever existed (deleted caches
    /// keep their rows).
    pub async fn cache_name_ever_used(&self, name: &str) -> Result<bool> {
        let found: Option<i32> = on_reader!(self, |pool| async {
            sqlx::query_scalar("SELECT 1 FROM caches WHERE name = $1 LIMIT 1")
                .bind(name)
                .fetch_optional(pool)
                .await
        })?;
        Ok(found.is_some())
    }

    /// Every live cache, by name. Caches are few (an operator creates
    /// each), so this is one unpaged query.
    pub async fn caches(&self) -> Result<Vec<Cache>> {
        let sql =
            format!("SELECT {CACHE_COLUMNS} FROM caches WHERE deleted_at IS NULL ORDER BY name");
        let rows: Vec<CacheRow> = on_reader!(self, |pool| async {
            sqlx::query_as(&sql).fetch_all(pool).await
        })?;
        rows.into_iter().map(cache_from_row).collect()
    }

    /// Applies `patch` to the live cache called `name` and returns the result.
    pub async fn update_cache(&self, name: &str, patch: &CachePatch) -> Result<Cache> {
        if patch.retention_period.flatten().is_some_and(|p| p < 0) {
            return Err(MetaError::Invalid(
                "a retention period cannot be negative".into(),
            ));
        }
        let budget = match patch.cas_budget_bytes.flatten() {
            Some(0) => {
                return Err(MetaError::Invalid(
                    "a CAS budget must be positive; remove it instead".into(),
                ));
            }
            Some(bytes) => Some(sql::to_db(bytes, "CAS budget")?),
            None => None,
        };
        let upstream = patch
            .upstream_cache_key_names
            .as_deref()
            .map(key_names_json);
        let sql = format!(
            "UPDATE caches SET \
               is_public = COALESCE($2, is_public), \
               store_dir = COALESCE($3, store_dir), \
               priority = COALESCE($4, priority), \
               signing_key = COALESCE($5, signing_key), \
               upstream_cache_key_names = COALESCE($6, upstream_cache_key_names), \
               retention_period = CASE WHEN $7 THEN $8 ELSE retention_period END, \
               cas_budget_bytes = CASE WHEN $9 THEN $10 ELSE cas_budget_bytes END \
             WHERE name = $1 AND deleted_at IS NULL RETURNING {CACHE_COLUMNS}"
        );
        let row: Option<CacheRow> = on_writer!(self, |pool| async {
            let row = sqlx::query_as(&sql)
                .bind(name)
                .bind(patch.is_public)
                .bind(&patch.store_dir)
                .bind(patch.priority)
                .bind(&patch.signing_key)
                .bind(&upstream)
                .bind(patch.retention_period.is_some())
                .bind(patch.retention_period.flatten())
                .bind(patch.cas_budget_bytes.is_some())
                .bind(budget)
                .fetch_optional(pool)
                .await?;
            Ok(row)
        })?;
        cache_from_row(row.ok_or(MetaError::NotFound("cache"))?)
    }

    /// Soft-deletes the live cache called `name`: it disappears from lookups
    /// and its name can be reused at once.
    pub async fn delete_cache(&self, name: &str, now: i64) -> Result<()> {
        let deleted = on_writer!(self, |pool| async {
            let done = sqlx::query(
                "UPDATE caches SET deleted_at = $2 WHERE name = $1 AND deleted_at IS NULL",
            )
            .bind(name)
            .bind(now)
            .execute(pool)
            .await?;
            Ok(done.rows_affected())
        })?;
        if deleted == 0 {
            return Err(MetaError::NotFound("cache"));
        }
        Ok(())
    }
}
