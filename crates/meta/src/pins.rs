//! Pins: named GC roots in a Nix cache. A pinned store path is never
//! expired by retention, and (through `nix_object_refs`) neither is its
//! closure, until the pin is removed or its `expires_at` passes.
//!
//! A pin names a store path, not a stored object: it may be set before the
//! path is pushed, and it outlives an explicit delete of the path, so a
//! re-push is kept again. GC reads `nix_pins` directly; this module is the
//! API and CLI side.

use std::fmt;

use crate::{CacheId, Meta, MetaError, Result, on_reader, on_writer};

/// Longest pin name; also the schema's CHECK.
pub const MAX_PIN_NAME_LEN: usize = 128;

/// Most pins one [`Meta::pins`] call returns, so that listing a cache with
/// many pins is paged rather than one unbounded query and reply.
pub const MAX_PINS_PAGE: u32 = 1000;

/// A pin's name: 1–128 characters of `A-Z a-z 0-9 . _ + -`, starting with
/// a letter or digit. Names go into URL path segments, log lines and shell
/// commands, so they need no quoting anywhere; the first character rules
/// out `.`/`..` segments and option-like `-x`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PinName(String);

/// Why a pin name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid pin name {0:?}: use 1-128 characters from A-Z a-z 0-9 . _ + -, \
     starting with a letter or digit"
)]
pub struct InvalidPinName(pub String);

impl PinName {
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidPinName> {
        let name = name.into();
        let mut bytes = name.bytes();
        let valid = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
            && name.len() <= MAX_PIN_NAME_LEN
            && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'));
        if valid {
            Ok(Self(name))
        } else {
            Err(InvalidPinName(name))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PinName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PinName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::str::FromStr for PinName {
    type Err = InvalidPinName;
    fn from_str(s: &str) -> Result<Self, InvalidPinName> {
        Self::new(s)
    }
}

/// A pin as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    pub name: PinName,
    /// The pinned path's base name, `<hash>-<name>`.
    pub store_path: String,
    /// Its first 32 characters, by which GC finds the object.
    pub store_path_hash: String,
    /// Unix seconds after which the pin no longer keeps anything; `None`
    /// keeps the path until the pin is removed.
    pub expires_at: Option<i64>,
    /// When the pin was set to this path (a re-pin resets it).
    pub created_at: i64,
}

impl Pin {
    /// Whether the pin has lapsed at `now`. A lapsed pin is still listed
    /// (so an operator can see why a path was not kept) until it is
    /// removed or GC forgets it.
    pub fn is_expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// Length of a store path's hash part.
const HASH_LEN: usize = 32;

/// The hash part of a base name `<hash>-<name>`. Only the shape is checked
/// here (this crate knows no nix32); callers parse the path properly first.
fn hash_part(store_path: &str) -> Result<&str> {
    match (
        store_path.get(..HASH_LEN),
        store_path.as_bytes().get(HASH_LEN),
    ) {
        (Some(hash), Some(b'-')) if store_path.len() > HASH_LEN + 1 => Ok(hash),
        _ => Err(MetaError::Invalid(format!(
            "{store_path:?} is not a store path base name <hash>-<name>"
        ))),
    }
}

type PinRow = (String, String, String, Option<i64>, i64);

const PIN_COLUMNS: &str = "name, store_path, store_path_hash, expires_at, created_at";

fn pin_from_row(
    (name, store_path, store_path_hash, expires_at, created_at): PinRow,
) -> Result<Pin> {
    let name = PinName::new(name).map_err(|e| MetaError::Corrupt(e.to_string()))?;
    Ok(Pin {
        name,
        store_path,
        store_path_hash,
        expires_at,
        created_at,
    })
}

impl Meta {
    /// Pins `store_path` (a base name, `<hash>-<name>`) in `cache` as `name`,
    /// replacing whatever that name pinned before.
    pub async fn pin(
        &self,
        cache: CacheId,
        name: &PinName,
        store_path: &str,
        expires_at: Option<i64>,
        now: i64,
    ) -> Result<Pin> {
        let hash = hash_part(store_path)?;
        let sql = format!(
            "INSERT INTO nix_pins \
               (cache_id, name, store_path_hash, store_path, expires_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (cache_id, name) DO UPDATE SET \
               store_path_hash = excluded.store_path_hash, store_path = excluded.store_path, \
               expires_at = excluded.expires_at, created_at = excluded.created_at \
             RETURNING {PIN_COLUMNS}"
        );
        let row: PinRow = on_writer!(self, |pool| async {
            let row = sqlx::query_as(&sql)
                .bind(cache.0)
                .bind(name.as_str())
                .bind(hash)
                .bind(store_path)
                .bind(expires_at)
                .bind(now)
                .fetch_one(pool)
                .await?;
            Ok(row)
        })?;
        pin_from_row(row)
    }

    /// Removes the pin `name` from `cache`; `NotFound("pin")` if there is none.
    pub async fn unpin(&self, cache: CacheId, name: &PinName) -> Result<()> {
        let removed = on_writer!(self, |pool| async {
            let done = sqlx::query("DELETE FROM nix_pins WHERE cache_id = $1 AND name = $2")
                .bind(cache.0)
                .bind(name.as_str())
                .execute(pool)
                .await?;
            Ok(done.rows_affected())
        })?;
        if removed == 0 {
            return Err(MetaError::NotFound("pin"));
        }
        Ok(())
    }

    /// The pin `name` of `cache`, expired or not.
    pub async fn pin_named(&self, cache: CacheId, name: &PinName) -> Result<Option<Pin>> {
        let sql = format!("SELECT {PIN_COLUMNS} FROM nix_pins WHERE cache_id = $1 AND name = $2");
        let row: Option<PinRow> = on_reader!(self, |pool| async {
            sqlx::query_as(&sql)
                .bind(cache.0)
                .bind(name.as_str())
                .fetch_optional(pool)
                .await
        })?;
        row.map(pin_from_row).transpose()
    }

    /// A page of `cache`'s pins in name order: at most `limit` (capped at
    /// [`MAX_PINS_PAGE`]) whose names sort after `after`. Expired pins are
    /// included (see [`Pin::is_expired`]). The next page starts after the
    /// last name returned; a short page is the last.
    pub async fn pins(
        &self,
        cache: CacheId,
        after: Option<&PinName>,
        limit: u32,
    ) -> Result<Vec<Pin>> {
        let limit = limit.min(MAX_PINS_PAGE);
        // Byte order on both databases (SQLite's default): Postgres would
        // otherwise compare by its collation, which may ignore punctuation.
        let key = match self.database() {
            crate::Database::Postgres => "name COLLATE \"C\"",
            crate::Database::Sqlite => "name",
        };
        let sql = format!(
            "SELECT {PIN_COLUMNS} FROM nix_pins WHERE cache_id = $1 AND {key} > $2 \
             ORDER BY {key} LIMIT $3"
        );
        let after = after.map_or("", PinName::as_str);
        let rows: Vec<PinRow> = on_reader!(self, |pool| async {
            sqlx::query_as(&sql)
                .bind(cache.0)
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
        })?;
        rows.into_iter().map(pin_from_row).collect()
    }
}
