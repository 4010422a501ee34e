//! Upload sessions: ByteStream writes that resume on any replica.
//!
//! A Bazel client that loses its Write stream asks `QueryWriteStatus` how
//! much the server kept and resumes from there, perhaps through another
//! replica behind the same load balancer. So the progress of an upload lives
//! here rather than in one process: a session, keyed by cache and resource
//! name, lists in order the chunks the upload has made durable in the blob
//! store, and `committed_size` is how far into the content they reach.
//!
//! A Write first [`Meta::claim_upload`]s the session, which bumps its
//! `generation`; it then appends chunks with [`Meta::checkpoint_upload`]
//! under that generation, and once the blob is committed (with
//! [`Meta::commit_blob`], naming the session's chunks like any others) it
//! calls [`Meta::finish_upload`]. A second Write for the same resource takes
//! the session over, and from then on the first one's checkpoints fail with
//! [`MetaError::UploadSuperseded`], whether its replica died or is still
//! streaming: only one writer ever appends.
//!
//! # How the chunks stay alive
//! A session holds no references: its chunks may be new, at refcount 0. A
//! checkpoint gives each chunk it records a lease up to the session's
//! `expires_at`, so that once the session is gone (finished, or expired and
//! deleted by [`Meta::expire_uploads`]) its chunks age out like any other
//! unreferenced chunk. While the session exists, [`Meta::gc_mark_chunks`]
//! skips its chunks whatever their lease, since a later checkpoint extends the
//! session without touching the chunks recorded earlier. A claim still checks
//! every chunk, and starts the upload over if one is gone or `deleting`.

use std::collections::HashMap;

use crate::blobs::{
    BlobChunk, NewChunkRef, PACK_JOIN, PLACED_CHUNK_COLUMNS, PlacedChunkRow, UsedChunkRow,
    chunk_inserts, insert_chunks, placed_chunk_from_row, record_used, tile,
};
use crate::gc::claim_sql;
use crate::packs::{LiveBytes, NewPack, add_live_bytes, insert_packs};
use crate::sql::{self, READ_BATCH, WRITE_BATCH};
use crate::{
    BeginWrite as _, CacheId, Meta, MetaError, Result, UploadSessionId, on_reader, on_writer,
};

/// An upload session as a Write finds it when it claims it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadSession {
    pub id: UploadSessionId,
    /// What the claiming writer passes to [`Meta::checkpoint_upload`] and
    /// [`Meta::finish_upload`]; any later claim makes it stale.
    pub generation: i64,
    /// Uncompressed bytes the chunks cover: where the upload resumes.
    pub committed_size: u64,
    /// Stored bytes of the chunks: where the next chunk's frame starts in
    /// the blob's file.
    pub file_size: u64,
    /// The chunks in order, each placed in the content and in the file as
    /// it will be in the blob.
    pub chunks: Vec<BlobChunk>,
}

/// Creates the session at generation 1, or takes it over: one more
/// generation, a new expiry, and emptied (`$5`) when restarted or expired.
const CLAIM: &str = "INSERT INTO upload_sessions \
       (cache_id, resource, generation, committed_size, file_size, expires_at, created_at, \
        updated_at) \
     VALUES ($1, $2, 1, 0, 0, $3, $4, $4) \
     ON CONFLICT (cache_id, resource) DO UPDATE SET \
       generation = upload_sessions.generation + 1, \
       committed_size = CASE WHEN $5 OR upload_sessions.expires_at <= $4 THEN 0 \
         ELSE upload_sessions.committed_size END, \
       file_size = CASE WHEN $5 OR upload_sessions.expires_at <= $4 THEN 0 \
         ELSE upload_sessions.file_size END, \
       expires_at = excluded.expires_at, updated_at = excluded.updated_at \
     RETURNING id, generation, committed_size, file_size";

/// The chunk list of session `$1` in order, each with its chunk row's state.
fn session_chunks_sql() -> String {
    format!(
        "SELECT {PLACED_CHUNK_COLUMNS} \
         FROM upload_session_chunks bc JOIN chunks c ON c.id = bc.chunk_id {PACK_JOIN} \
         WHERE bc.session_id = $1 ORDER BY bc.seq"
    )
}

/// Empties session `$1`.
const EMPTY_CHUNKS: &str = "DELETE FROM upload_session_chunks WHERE session_id = $1";
const EMPTY_SESSION: &str =
    "UPDATE upload_sessions SET committed_size = 0, file_size = 0 WHERE id = $1";

/// Leases every unreferenced chunk of session `$1` until `$2`.
const LEASE_SESSION_CHUNKS: &str = "UPDATE chunks SET deletable_at = $2 \
     WHERE refcount = 0 AND deletable_at < $2 AND state = 'valid' \
       AND id IN (SELECT chunk_id FROM upload_session_chunks WHERE session_id = $1)";

/// Takes session `$1` for a checkpoint if generation `$2` still holds it and
/// it has not expired by `$4`, extending it to `$3`. Locks the row, so a
/// concurrent claim waits for the checkpoint to land (or fail) whole.
const HOLD_SESSION: &str = "UPDATE upload_sessions SET expires_at = $3, updated_at = $4 \
     WHERE id = $1 AND generation = $2 AND expires_at > $4 \
     RETURNING committed_size, file_size";

const NEXT_SEQ: &str =
    "SELECT COALESCE(MAX(seq) + 1, 0) FROM upload_session_chunks WHERE session_id = $1";

/// Leases `n` chunks the writer did not upload, valid ones only, until `$1`.
fn lease_chunks_sql(n: usize) -> String {
    format!(
        "UPDATE chunks SET deletable_at = \
           CASE WHEN refcount = 0 AND deletable_at < $1 THEN $1 ELSE deletable_at END \
         WHERE state = 'valid' AND hash IN ({}) \
         RETURNING id, hash, stored_size, frame_hash",
        sql::params(2, n)
    )
}

/// Appends `n` chunk positions to session `$1`.
fn insert_session_chunks_sql(n: usize) -> String {
    format!(
        "INSERT INTO upload_session_chunks (session_id, seq, chunk_id, byte_offset, file_offset) \
         VALUES {}",
        sql::rows(2, n, 4, "$1, ", "")
    )
}

/// Deletes sessions expired at `$1`, at most `$2`; a session being claimed or
/// checkpointed on another replica is left for the next call.
const EXPIRE_SESSIONS: (&str, &str) = claim_sql!(
    "SELECT id FROM upload_sessions WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2",
    "DELETE FROM upload_sessions WHERE id IN (SELECT id FROM claimed) AND expires_at <= $1"
);

/// The chunk list of a session if every chunk is still valid and the list
/// covers exactly the session's sizes; `None` means the upload must start
/// over.
fn session_chunks(
    rows: Vec<PlacedChunkRow>,
    committed_size: u64,
    file_size: u64,
) -> Result<Option<Vec<BlobChunk>>> {
    let mut chunks = Vec::with_capacity(rows.len());
    let (mut end, mut file_end) = (0u64, 0u64);
    for (expected_seq, row) in (0u64..).zip(rows) {
        let (chunk, state) = placed_chunk_from_row(row)?;
        if state != "valid"
            || chunk.seq != expected_seq
            || chunk.offset != end
            || chunk.file_offset != file_end
        {
            return Ok(None);
        }
        end = end.saturating_add(chunk.chunk.size);
        file_end = file_end.saturating_add(chunk.chunk.stored_size);
        chunks.push(chunk);
    }
    Ok((end == committed_size && file_end == file_size).then_some(chunks))
}

/// Refuses an expiry that has already passed: the session would be dead on
/// arrival, and its chunks leased for nothing.
fn check_expiry(now: i64, expires_at: i64) -> Result<()> {
    if expires_at > now {
        Ok(())
    } else {
        Err(MetaError::Invalid(format!(
            "upload session would expire at {expires_at}, not after now ({now})"
        )))
    }
}

impl Meta {
    /// Takes the upload session of `resource` in `cache` for a new Write, in
    /// one transaction: creates it (generation 1, empty) if there is none, or
    /// bumps its generation, which fences off whoever held it before. The
    /// session then lives until `expires_at` unless checkpoints extend it.
    ///
    /// The session comes back empty, and its chunk list is dropped, if
    /// `restart` is set (the client resumes at 0), if it had expired by
    /// `now`, or if any of its chunks is no longer valid: the upload then
    /// starts over, which is always correct. Otherwise the chunks it keeps
    /// are leased until `expires_at`.
    pub async fn claim_upload(
        &self,
        cache: CacheId,
        resource: &str,
        restart: bool,
        now: i64,
        expires_at: i64,
    ) -> Result<UploadSession> {
        check_expiry(now, expires_at)?;
        on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;
            let (id, generation, committed_size, file_size): (i64, i64, i64, i64) =
                sqlx::query_as(CLAIM)
                    .bind(cache.0)
                    .bind(resource)
                    .bind(expires_at)
                    .bind(now)
                    .bind(restart)
                    .fetch_one(&mut *tx)
                    .await?;
            let committed_size = sql::from_db(committed_size, "session committed_size")?;
            let file_size = sql::from_db(file_size, "session file_size")?;
            let mut session = UploadSession {
                id: UploadSessionId(id),
                generation,
                committed_size: 0,
                file_size: 0,
                chunks: Vec::new(),
            };
            // Chunks are never empty, so a session at 0 bytes keeps none; its
            // list is what a restart or expiry left behind.
            let kept = if committed_size == 0 {
                None
            } else {
                let rows: Vec<PlacedChunkRow> = sqlx::query_as(&session_chunks_sql())
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?;
                session_chunks(rows, committed_size, file_size)?
            };
            if let Some(chunks) = kept {
                sqlx::query(LEASE_SESSION_CHUNKS)
                    .bind(id)
                    .bind(expires_at)
                    .execute(&mut *tx)
                    .await?;
                session.committed_size = committed_size;
                session.file_size = file_size;
                session.chunks = chunks;
            } else {
                sqlx::query(EMPTY_CHUNKS).bind(id).execute(&mut *tx).await?;
                if committed_size != 0 {
                    sqlx::query(EMPTY_SESSION)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await?;
            Ok(session)
        })
    }

    /// Appends `chunks`, already durable in the blob store, to the session
    /// that generation `generation` claimed, and extends the session to
    /// `expires_at`; with no chunks it only extends it. In one transaction,
    /// so a crash or a failure leaves the session as it was.
    ///
    /// The chunks must continue the session exactly: the first starts at its
    /// `committed_size` and `file_size`, each of the others where the one
    /// before ends ([`MetaError::Invalid`] otherwise). Those the writer
    /// `uploaded` (into `packs`) get a row if they have none, unreferenced
    /// and leased until `expires_at`; the others must have a valid row, and
    /// are leased as well. Fails with [`MetaError::ChunkGone`] if a chunk is being
    /// garbage-collected or has no row though the writer did not upload it,
    /// with [`MetaError::FrameMismatch`] if a row records a different stored
    /// frame, and with [`MetaError::UploadSuperseded`] if the session is gone,
    /// expired by `now`, or claimed by a later generation.
    pub async fn checkpoint_upload(
        &self,
        session: UploadSessionId,
        generation: i64,
        chunks: &[NewChunkRef],
        packs: &[NewPack],
        now: i64,
        expires_at: i64,
    ) -> Result<()> {
        check_expiry(now, expires_at)?;
        let (start, file_start) = chunks.first().map_or((0, 0), |c| (c.offset, c.file_offset));
        let (uses, end, file_end) = tile(chunks, start, file_start)?;
        let end = sql::to_db(end, "upload size")?;
        let file_end = sql::to_db(file_end, "upload file size")?;
        let (uploaded, leased): (Vec<_>, Vec<_>) = uses.values().partition(|u| u.uploaded);
        let leased: Vec<[u8; 32]> = leased.into_iter().map(|u| u.chunk.hash).collect();
        let uploaded: Vec<(&NewChunkRef, i64)> =
            uploaded.into_iter().map(|u| (u.chunk, 0)).collect();
        on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;
            let held: Option<(i64, i64)> = sqlx::query_as(HOLD_SESSION)
                .bind(session.0)
                .bind(generation)
                .bind(expires_at)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
            let Some((committed_size, file_size)) = held else {
                return Err(MetaError::UploadSuperseded);
            };
            if chunks.is_empty() {
                tx.commit().await?;
                return Ok(());
            }
            let (committed_size, file_size) = (
                sql::from_db(committed_size, "session committed_size")?,
                sql::from_db(file_size, "session file_size")?,
            );
            if (start, file_start) != (committed_size, file_size) {
                return Err(MetaError::Invalid(format!(
                    "checkpoint starts at byte {start} (file byte {file_start}) but the upload \
                     ends at {committed_size} (file byte {file_size})"
                )));
            }

            let mut ids = HashMap::with_capacity(uses.len());
            let mut live = LiveBytes::new();
            if !uploaded.is_empty() {
                let pack_ids = insert_packs!(tx, packs, now);
                let inserts = chunk_inserts(uploaded.iter().copied(), &pack_ids)?;
                insert_chunks!(tx, &inserts, now, Some(expires_at), &uses, &mut ids, live);
            }
            // The chunks the writer did not upload, and those it did that
            // have a row already (a concurrent writer's, or one an earlier
            // record or a blob holds), must be valid: lease them.
            let leased: Vec<[u8; 32]> = leased
                .iter()
                .copied()
                .chain(uploaded.iter().map(|(c, _)| c.hash))
                .filter(|h| !ids.contains_key(h))
                .collect();
            for batch in leased.chunks(READ_BATCH) {
                let n = sql::in_list_len(batch.len());
                let update = lease_chunks_sql(n);
                let mut query = sqlx::query_as(&update).bind(expires_at);
                for i in 0..n {
                    query = query.bind(&sql::padded(batch, i)[..]);
                }
                let rows: Vec<UsedChunkRow> = query.fetch_all(&mut *tx).await?;
                record_used(rows, &uses, &mut ids)?;
            }
            if let Some(gone) = uses.keys().find(|h| !ids.contains_key(*h)) {
                return Err(MetaError::ChunkGone(*gone));
            }
            add_live_bytes!(tx, &live);

            let (next,): (i64,) = sqlx::query_as(NEXT_SEQ)
                .bind(session.0)
                .fetch_one(&mut *tx)
                .await?;
            let next = sql::from_db(next, "session chunk seq")?;
            for (first, batch) in (next..)
                .step_by(WRITE_BATCH)
                .zip(chunks.chunks(WRITE_BATCH))
            {
                let insert = insert_session_chunks_sql(batch.len());
                let mut query = sqlx::query(&insert).bind(session.0);
                for (seq, chunk) in (first..).zip(batch) {
                    query = query
                        .bind(sql::to_db(seq, "chunk seq")?)
                        .bind(ids[&chunk.hash])
                        .bind(sql::to_db(chunk.offset, "chunk offset")?)
                        .bind(sql::to_db(chunk.file_offset, "chunk file offset")?);
                }
                query.execute(&mut *tx).await?;
            }
            sqlx::query(
                "UPDATE upload_sessions SET committed_size = $2, file_size = $3 WHERE id = $1",
            )
            .bind(session.0)
            .bind(end)
            .bind(file_end)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// How many bytes of `resource` in `cache` an unexpired session has
    /// made durable: what `QueryWriteStatus` reports. `None` if there is no
    /// such session, and the client starts over.
    pub async fn upload_status(
        &self,
        cache: CacheId,
        resource: &str,
        now: i64,
    ) -> Result<Option<u64>> {
        let row: Option<(i64,)> = on_reader!(self, |pool| async {
            sqlx::query_as(
                "SELECT committed_size FROM upload_sessions \
                 WHERE cache_id = $1 AND resource = $2 AND expires_at > $3",
            )
            .bind(cache.0)
            .bind(resource)
            .bind(now)
            .fetch_optional(pool)
            .await
        })?;
        row.map(|(size,)| sql::from_db(size, "session committed_size"))
            .transpose()
    }

    /// Deletes the session with its chunk list once its blob is committed
    /// (the blob now references the chunks), if generation `generation`
    /// still holds it. Returns whether it did; `false` means a later Write
    /// took the session over, and it is that Write's to finish.
    pub async fn finish_upload(&self, session: UploadSessionId, generation: i64) -> Result<bool> {
        on_writer!(self, |pool| async {
            let deleted =
                sqlx::query("DELETE FROM upload_sessions WHERE id = $1 AND generation = $2")
                    .bind(session.0)
                    .bind(generation)
                    .execute(pool)
                    .await?
                    .rows_affected();
            Ok(deleted == 1)
        })
    }

    /// Deletes up to `limit` sessions that expired by `now`, with their
    /// chunk lists. Their chunks keep the leases their checkpoints gave them,
    /// so the ones no blob took are collected by [`Meta::gc_mark_chunks`]
    /// like any unreferenced chunk. Returns how many sessions went.
    pub async fn expire_uploads(&self, now: i64, limit: u32) -> Result<u64> {
        let expire = self.dialect(EXPIRE_SESSIONS);
        on_writer!(self, |pool| async {
            Ok(sqlx::query(expire)
                .bind(now)
                .bind(i64::from(limit))
                .execute(pool)
                .await?
                .rows_affected())
        })
    }
}
