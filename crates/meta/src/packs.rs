//! Packs: objects in the blob backend holding the stored frames of many
//! chunks (see `migrations/*/0004_packs.sql`).
//!
//! A writer records the packs it wrote in the same transaction as the chunk
//! rows pointing into them ([`Meta::commit_blob`], [`Meta::checkpoint_upload`]),
//! and each pack's `live_bytes` grows by the frames whose rows that
//! transaction inserted: a frame whose chunk a concurrent writer recorded
//! first is dead on arrival.

use std::collections::HashMap;

use crate::sql;
use crate::{Meta, Result, on_reader};

/// Where a chunk's stored frame is: bytes of a pack, from `offset` for the
/// chunk's stored size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PackPlace {
    /// The pack's key, the store's random 16-byte id.
    pub pack: [u8; 16],
    pub offset: u64,
}

/// A pack a writer wrote, recorded with the chunks it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewPack {
    pub key: [u8; 16],
    /// Bytes in the object.
    pub size: u64,
}

/// A recorded pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pack {
    pub key: [u8; 16],
    pub size: u64,
    /// Stored bytes of the chunk rows pointing into it.
    pub live_bytes: u64,
}

/// Inserts `n` packs created at `$1`; a pack recorded already (by an earlier
/// checkpoint of the same upload) is left as it is.
pub(crate) fn insert_packs_sql(n: usize) -> String {
    format!(
        "INSERT INTO packs (key, size, live_bytes, created_at) VALUES {} \
         ON CONFLICT (key) DO NOTHING",
        sql::rows(2, n, 2, "", ", 0, $1")
    )
}

/// The ids of `n` packs by key.
pub(crate) fn pack_ids_sql(n: usize) -> String {
    format!(
        "SELECT id, key FROM packs WHERE key IN ({})",
        sql::params(1, n)
    )
}

/// Adds `$2` live bytes to pack `$1`.
pub(crate) const ADD_LIVE_BYTES: &str =
    "UPDATE packs SET live_bytes = live_bytes + $2 WHERE id = $1";

/// Records `$packs` (a `&[NewPack]`) in transaction `$tx` at `$now` and
/// evaluates to their ids by key. A macro so that it expands once per
/// database, inside each backend's transaction.
macro_rules! insert_packs {
    ($tx:expr, $packs:expr, $now:expr) => {{
        let packs: &[$crate::packs::NewPack] = $packs;
        let mut ids: std::collections::HashMap<[u8; 16], i64> =
            std::collections::HashMap::with_capacity(packs.len());
        for batch in packs.chunks($crate::sql::WRITE_BATCH) {
            let insert = $crate::packs::insert_packs_sql(batch.len());
            let mut query = sqlx::query(&insert).bind($now);
            for pack in batch {
                query = query
                    .bind(&pack.key[..])
                    .bind($crate::sql::to_db(pack.size, "pack size")?);
            }
            query.execute(&mut *$tx).await?;
        }
        for batch in packs.chunks($crate::sql::READ_BATCH) {
            let n = $crate::sql::in_list_len(batch.len());
            let select = $crate::packs::pack_ids_sql(n);
            let mut query = sqlx::query_as(&select);
            for i in 0..n {
                query = query.bind(&$crate::sql::padded(batch, i).key[..]);
            }
            let rows: Vec<(i64, Vec<u8>)> = query.fetch_all(&mut *$tx).await?;
            for (id, key) in rows {
                ids.insert($crate::packs::pack_key(key)?, id);
            }
        }
        ids
    }};
}
pub(crate) use insert_packs;

/// Adds the stored sizes in `$live` (pack id to bytes) to their packs in
/// transaction `$tx`.
macro_rules! add_live_bytes {
    ($tx:expr, $live:expr) => {{
        let live: &std::collections::HashMap<i64, i64> = $live;
        for (pack, bytes) in live {
            sqlx::query($crate::packs::ADD_LIVE_BYTES)
                .bind(pack)
                .bind(bytes)
                .execute(&mut *$tx)
                .await?;
        }
    }};
}
pub(crate) use add_live_bytes;

pub(crate) fn pack_key(bytes: Vec<u8>) -> Result<[u8; 16]> {
    <[u8; 16]>::try_from(bytes)
        .map_err(|b| crate::MetaError::Corrupt(format!("pack key of {} bytes", b.len())))
}

/// A chunk's place from its row's `packs.key` and `pack_offset`.
pub(crate) fn place_from_row(
    key: Option<Vec<u8>>,
    offset: Option<i64>,
) -> Result<Option<PackPlace>> {
    match (key, offset) {
        (None, None) => Ok(None),
        (Some(key), Some(offset)) => Ok(Some(PackPlace {
            pack: pack_key(key)?,
            offset: sql::from_db(offset, "chunk pack_offset")?,
        })),
        _ => Err(crate::MetaError::Corrupt(
            "chunk has a pack without an offset".into(),
        )),
    }
}

impl Meta {
    /// Every recorded pack's key, size and live bytes, in key order (at most
    /// `limit`): what a GC pass or an operator sizes up.
    pub async fn packs(&self, limit: u32) -> Result<Vec<Pack>> {
        let rows: Vec<(Vec<u8>, i64, i64)> = on_reader!(self, |pool| async {
            sqlx::query_as("SELECT key, size, live_bytes FROM packs ORDER BY key LIMIT $1")
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
        })?;
        rows.into_iter()
            .map(|(key, size, live)| {
                Ok(Pack {
                    key: pack_key(key)?,
                    size: sql::from_db(size, "pack size")?,
                    live_bytes: sql::from_db(live, "pack live_bytes")?,
                })
            })
            .collect()
    }
}

/// Live bytes a transaction adds, by pack id.
pub(crate) type LiveBytes = HashMap<i64, i64>;
