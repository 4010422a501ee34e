//! Retiring packs, the last step of a GC run.
//!
//! A pack is dead once no chunk row points into it (`live_bytes` 0). GC
//! stamps its `dead_at` and deletes the object and the row only a grace
//! period later: a reader that looked up a chunk's place just before the
//! chunk went can still read it. A pack with little live data left is
//! rewritten: the caller copies its live chunks into a new pack through the
//! store, [`Meta::gc_move_chunks`] points their rows at it in one
//! transaction, and the old pack is then dead like any other.
//!
//! Objects with no row at all (the packs of a writer that crashed before
//! committing, a temporary file) are orphans: the caller lists the backend
//! and asks [`Meta::known_packs`] and [`Meta::known_chunk_objects`] which of
//! the keys it found are recorded.

use std::collections::HashSet;

use crate::blobs::{Chunk, ChunkRow, chunk_from_row};
use crate::packs::{LiveBytes, NewPack, Pack, PackPlace, add_live_bytes, insert_packs, pack_key};
use crate::sql::{self, READ_BATCH};
use crate::{BeginWrite as _, ChunkId, Meta, MetaError, Result, on_reader, on_writer};

type PackRow = (Vec<u8>, i64, i64);

fn pack_from_row((key, size, live): PackRow) -> Result<Pack> {
    Ok(Pack {
        key: pack_key(key)?,
        size: sql::from_db(size, "pack size")?,
        live_bytes: sql::from_db(live, "pack live_bytes")?,
    })
}

impl Meta {
    /// Stamps every pack without live bytes and not stamped yet as dead at
    /// `now`; returns how many.
    pub async fn gc_mark_dead_packs(&self, now: i64) -> Result<u64> {
        on_writer!(self, |pool| async {
            Ok(sqlx::query(
                "UPDATE packs SET dead_at = $1 WHERE live_bytes = 0 AND dead_at IS NULL",
            )
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected())
        })
    }

    /// Up to `limit` packs found dead at or before `dead_before`: the caller
    /// deletes their objects, then calls [`Meta::gc_forget_packs`].
    pub async fn gc_dead_packs(&self, dead_before: i64, limit: u32) -> Result<Vec<Pack>> {
        let rows: Vec<PackRow> = on_reader!(self, |pool| async {
            sqlx::query_as(
                "SELECT key, size, live_bytes FROM packs \
                 WHERE dead_at <= $1 AND live_bytes = 0 ORDER BY dead_at LIMIT $2",
            )
            .bind(dead_before)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?;
        rows.into_iter().map(pack_from_row).collect()
    }

    /// Deletes the rows of dead packs whose objects the caller deleted;
    /// returns how many went. A key already gone is skipped, so a rerun
    /// after a crash is harmless.
    pub async fn gc_forget_packs(&self, keys: &[[u8; 16]]) -> Result<u64> {
        let mut forgotten = 0;
        for batch in keys.chunks(READ_BATCH) {
            let n = sql::in_list_len(batch.len());
            let delete = format!(
                "DELETE FROM packs WHERE live_bytes = 0 AND dead_at IS NOT NULL AND key IN ({})",
                sql::params(1, n)
            );
            forgotten += on_writer!(self, |pool| async {
                let mut query = sqlx::query(&delete);
                for i in 0..n {
                    query = query.bind(&sql::padded(batch, i)[..]);
                }
                Ok(query.execute(pool).await?.rows_affected())
            })?;
        }
        Ok(forgotten)
    }

    /// Up to `limit` live packs created at or before `created_before` whose
    /// live bytes are under `max_live_percent` of their size, sparsest
    /// first: the ones worth rewriting.
    pub async fn gc_sparse_packs(
        &self,
        created_before: i64,
        max_live_percent: u8,
        limit: u32,
    ) -> Result<Vec<Pack>> {
        let rows: Vec<PackRow> = on_reader!(self, |pool| async {
            sqlx::query_as(
                "SELECT key, size, live_bytes FROM packs \
                 WHERE dead_at IS NULL AND live_bytes > 0 AND created_at <= $1 \
                   AND live_bytes * 100 < size * $2 \
                 ORDER BY live_bytes LIMIT $3",
            )
            .bind(created_before)
            .bind(i64::from(max_live_percent))
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?;
        rows.into_iter().map(pack_from_row).collect()
    }

    /// The valid chunks stored in pack `key`, in offset order: what a
    /// rewrite copies. (Chunks being deleted are left behind; their pack
    /// dies when they go.)
    pub async fn pack_chunks(&self, key: [u8; 16]) -> Result<Vec<Chunk>> {
        let rows: Vec<ChunkRow> = on_reader!(self, |pool| async {
            sqlx::query_as(
                "SELECT c.id, c.hash, c.size, c.stored_size, c.frame_hash, c.compression, \
                   p.key, c.pack_offset \
                 FROM chunks c JOIN packs p ON p.id = c.pack_id \
                 WHERE p.key = $1 AND c.state = 'valid' ORDER BY c.pack_offset",
            )
            .bind(&key[..])
            .fetch_all(pool)
            .await
        })?;
        rows.into_iter().map(chunk_from_row).collect()
    }

    /// Records the packs `to`, which the caller wrote and made durable, and
    /// points the chunks `moves` at their new places in them if they are
    /// still in pack `from`, moving their live bytes along, in one
    /// transaction. `from` is stamped dead once nothing is left in it.
    /// Returns how many rows moved: a chunk deleted meanwhile stays behind
    /// (its copy is dead on arrival).
    pub async fn gc_move_chunks(
        &self,
        from: [u8; 16],
        to: &[NewPack],
        moves: &[(ChunkId, PackPlace)],
        now: i64,
    ) -> Result<u64> {
        on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;
            let old: Option<(i64,)> = sqlx::query_as("SELECT id FROM packs WHERE key = $1")
                .bind(&from[..])
                .fetch_optional(&mut *tx)
                .await?;
            let (old,) = old.ok_or(MetaError::NotFound("pack"))?;
            let ids = insert_packs!(tx, to, now);
            let mut live = LiveBytes::new();
            let mut rows_moved = 0;
            for (chunk, place) in moves {
                let new = *ids.get(&place.pack).ok_or_else(|| {
                    MetaError::Invalid("a chunk moves to a pack not recorded with it".into())
                })?;
                let row: Option<(i64,)> = sqlx::query_as(
                    "UPDATE chunks SET pack_id = $1, pack_offset = $2 \
                     WHERE id = $3 AND pack_id = $4 RETURNING stored_size",
                )
                .bind(new)
                .bind(sql::to_db(place.offset, "pack offset")?)
                .bind(chunk.0)
                .bind(old)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some((stored_size,)) = row {
                    *live.entry(new).or_default() += stored_size;
                    *live.entry(old).or_default() -= stored_size;
                    rows_moved += 1;
                }
            }
            add_live_bytes!(tx, &live);
            sqlx::query(
                "UPDATE packs SET dead_at = $2 WHERE id = $1 AND live_bytes = 0 AND dead_at IS NULL",
            )
            .bind(old)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(rows_moved)
        })
    }

    /// Which of `keys` name recorded packs.
    pub async fn known_packs(&self, keys: &[[u8; 16]]) -> Result<HashSet<[u8; 16]>> {
        self.found("SELECT key FROM packs WHERE key IN", keys).await
    }

    /// Which of `hashes` are chunks stored as objects of their own (before
    /// packs).
    pub async fn known_chunk_objects(&self, hashes: &[[u8; 32]]) -> Result<HashSet<[u8; 32]>> {
        self.found(
            "SELECT hash FROM chunks WHERE pack_id IS NULL AND hash IN",
            hashes,
        )
        .await
    }

    /// Which of `keys` the one-column `select` (ending in `IN`) returns,
    /// asked a wide batch at a time.
    async fn found<const N: usize>(
        &self,
        select: &str,
        keys: &[[u8; N]],
    ) -> Result<HashSet<[u8; N]>> {
        let mut found = HashSet::new();
        for batch in keys.chunks(sql::WIDE_READ_BATCH) {
            let n = sql::in_list_len(batch.len());
            let select = format!("{select} ({})", sql::params(1, n));
            let rows: Vec<(Vec<u8>,)> = on_reader!(self, |pool| async {
                let mut query = sqlx::query_as(&select);
                for i in 0..n {
                    query = query.bind(&sql::padded(batch, i)[..]);
                }
                query.fetch_all(pool).await
            })?;
            for (key,) in rows {
                found.insert(<[u8; N]>::try_from(key).map_err(|k| {
                    MetaError::Corrupt(format!("a key of {} bytes, not {N}", k.len()))
                })?);
            }
        }
        Ok(found)
    }
}
