//! An Attic deployment's database, read for `garret import attic`: its live
//! caches and, page by page, the objects whose NAR it can serve.
//!
//! The tables are Attic's as its SeaORM migrations leave them
//! (`server/src/database/migration/` in zhaofengli/attic): `cache`, `object`
//! and `nar`. Lists (`references`, `sigs`, `upstream_cache_key_names`) are
//! JSON arrays in text columns. The same SQL runs on Attic's Postgres and
//! SQLite, and the connection is read-only: importing never changes the
//! deployment it adopts.

use std::str::FromStr as _;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

use crate::{MetaError, Pools, Result, on_reader, sql};

/// Connections to Attic's database: an import reads one page at a time.
const MAX_CONNECTIONS: u32 = 2;

/// A read-only handle on an Attic database.
#[derive(Clone, Debug)]
pub struct AtticSource {
    pools: Pools,
}

/// A live (not soft-deleted) Attic cache, its settings as Attic stores them.
#[derive(Clone, PartialEq, Eq)]
pub struct AtticCache {
    pub id: i64,
    pub name: String,
    /// `name:base64(ed25519 secret key ‖ public key)`, Nix's secret key text.
    pub keypair: String,
    pub is_public: bool,
    pub store_dir: String,
    pub priority: i32,
    pub upstream_cache_key_names: Vec<String>,
    /// Seconds, with garret's meaning (see `Cache::retention_period`):
    /// `None` follows the server's default.
    pub retention_period: Option<i64>,
}

// By hand so that logging a cache never logs its secret key.
impl std::fmt::Debug for AtticCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtticCache")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("keypair", &crate::Redacted)
            .field("is_public", &self.is_public)
            .field("store_dir", &self.store_dir)
            .field("priority", &self.priority)
            .field("upstream_cache_key_names", &self.upstream_cache_key_names)
            .field("retention_period", &self.retention_period)
            .finish()
    }
}

/// A store path of an Attic cache whose NAR is valid (state `V`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AtticObject {
    /// The row id; pages are ordered by it.
    pub id: i64,
    pub store_path_hash: String,
    /// The full store path, `/nix/store/<hash>-<name>`.
    pub store_path: String,
    /// Base names of the referenced store paths.
    pub references: Vec<String>,
    pub system: Option<String>,
    pub deriver: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
    /// `sha256:<hex>` (Attic's form; nix32 is possible in old rows).
    pub nar_hash: String,
    pub nar_size: u64,
}

type CacheRow = (i64, String, String, bool, String, i32, String, Option<i32>);
type ObjectRow = (
    i64,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
    String,
    i64,
);

/// A JSON array of strings from a text column.
fn string_list(text: &str, what: &str) -> Result<Vec<String>> {
    serde_json::from_str(text)
        .map_err(|e| MetaError::Corrupt(format!("Attic's {what} is not a JSON string list: {e}")))
}

impl AtticSource {
    /// What `on_reader!` reports to: nothing, since only a one-off import
    /// reads Attic's database and no server exports metrics of it.
    #[expect(
        clippy::unused_self,
        reason = "the query macros call it on every source"
    )]
    fn observe(
        &self,
        _operation: &'static str,
        _started: std::time::Instant,
        _result: &impl crate::observe::Outcome,
    ) {
    }

    /// Connects read-only to Attic's `postgres://…` or `sqlite:…` database.
    pub async fn connect(url: &str) -> Result<Self> {
        let pools = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options =
                PgConnectOptions::from_str(url)?.options([("default_transaction_read_only", "on")]);
            Pools::Postgres(
                PgPoolOptions::new()
                    .max_connections(MAX_CONNECTIONS)
                    .connect_with(options)
                    .await?,
            )
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?.read_only(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(MAX_CONNECTIONS)
                .connect_with(options)
                .await?;
            Pools::Sqlite {
                read: pool.clone(),
                write: pool,
            }
        } else {
            return Err(MetaError::Invalid(
                "Attic's database URL must start with postgres://, postgresql:// or sqlite:".into(),
            ));
        };
        Ok(Self { pools })
    }

    /// Every cache that is not soft-deleted, by name.
    pub async fn caches(&self) -> Result<Vec<AtticCache>> {
        let rows: Vec<CacheRow> = on_reader!(self, |pool| async {
            sqlx::query_as(
                "SELECT id, name, keypair, is_public, store_dir, priority, \
                 upstream_cache_key_names, retention_period \
                 FROM cache WHERE deleted_at IS NULL ORDER BY name",
            )
            .fetch_all(pool)
            .await
        })?;
        rows.into_iter()
            .map(
                |(id, name, keypair, is_public, store_dir, priority, upstream, retention)| {
                    Ok(AtticCache {
                        id,
                        name,
                        keypair,
                        is_public,
                        store_dir,
                        priority,
                        upstream_cache_key_names: string_list(
                            &upstream,
                            "upstream_cache_key_names",
                        )?,
                        retention_period: retention.map(i64::from),
                    })
                },
            )
            .collect()
    }

    /// How many objects of `cache` Attic can serve.
    pub async fn valid_object_count(&self, cache: i64) -> Result<u64> {
        let (count,): (i64,) = on_reader!(self, |pool| async {
            sqlx::query_as(
                "SELECT COUNT(*) FROM object o JOIN nar n ON n.id = o.nar_id \
                 WHERE o.cache_id = $1 AND n.state = 'V'",
            )
            .bind(cache)
            .fetch_one(pool)
            .await
        })?;
        sql::from_db(count, "object count")
    }

    /// Up to `limit` objects of `cache` with a valid NAR and an id above
    /// `after`, by id: the next page of an import.
    pub async fn valid_objects(
        &self,
        cache: i64,
        after: i64,
        limit: u32,
    ) -> Result<Vec<AtticObject>> {
        let rows: Vec<ObjectRow> = on_reader!(self, |pool| async {
            sqlx::query_as(
                "SELECT o.id, o.store_path_hash, o.store_path, o.\"references\", o.system, \
                 o.deriver, o.sigs, o.ca, n.nar_hash, n.nar_size \
                 FROM object o JOIN nar n ON n.id = o.nar_id \
                 WHERE o.cache_id = $1 AND n.state = 'V' AND o.id > $2 \
                 ORDER BY o.id LIMIT $3",
            )
            .bind(cache)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?;
        rows.into_iter()
            .map(
                |(id, hash, path, refs, system, deriver, sigs, ca, nar_hash, nar_size)| {
                    Ok(AtticObject {
                        id,
                        store_path_hash: hash,
                        store_path: path,
                        references: string_list(&refs, "object.references")?,
                        system,
                        deriver,
                        sigs: string_list(&sigs, "object.sigs")?,
                        ca,
                        nar_hash,
                        nar_size: sql::from_db(nar_size, "nar_size")?,
                    })
                },
            )
            .collect()
    }

    pub async fn close(&self) {
        match &self.pools {
            Pools::Postgres(pool) => pool.close().await,
            Pools::Sqlite { read, .. } => read.close().await,
        }
    }
}
