//! Chunks and blobs: the write path (`missing_chunks`, then `commit_blob`)
//! and the read path (`blob_by_hash`, `blob_chunks`).
//!
//! A writer cuts its stream into chunks, asks [`Meta::missing_chunks`] which
//! ones the store lacks, uploads those objects, and then records the blob with
//! [`Meta::commit_blob`]. Between the two calls GC keeps running; the lease
//! taken by `missing_chunks` and the checks in `commit_blob` are what make
//! that safe.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use crate::sql::{self, READ_BATCH, WRITE_BATCH};
use crate::{BeginWrite as _, BlobId, ChunkId, Meta, MetaError, Result, on_reader, on_writer};

/// How a chunk's object is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Zstd,
}

impl Compression {
    fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            other => Err(MetaError::Corrupt(format!("unknown compression {other:?}"))),
        }
    }
}

/// One chunk of a blob being committed, in blob order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewChunkRef {
    /// SHA-256 of the uncompressed chunk; also names its object.
    pub hash: [u8; 32],
    /// Uncompressed size, never 0.
    pub size: u64,
    pub stored_size: u64,
    pub compression: Compression,
    /// Start of the chunk in the uncompressed blob: the sum of the sizes
    /// before it.
    pub offset: u64,
    /// Whether this writer put the object in the backend itself, because
    /// [`Meta::missing_chunks`] reported it missing. A chunk it skipped must
    /// still have a row at commit; if the row is gone (the writer outlived the
    /// grace period and GC took the chunk) the commit fails with
    /// [`MetaError::ChunkGone`] rather than recording a chunk with no object.
    pub uploaded: bool,
}

/// A blob to record: the whole content's digest and its chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewBlob {
    /// SHA-256 of the whole uncompressed content.
    pub hash: [u8; 32],
    pub size: u64,
    /// SHA-256 and size of the stored frames concatenated, which is what a
    /// client downloading the stored form (a `.nar.zst`) receives.
    pub file_hash: [u8; 32],
    pub file_size: u64,
    pub chunks: Vec<NewChunkRef>,
}

/// What [`Meta::commit_blob`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobCommit {
    pub blob_id: BlobId,
    /// A blob with this hash was already recorded (perhaps by a concurrent
    /// writer); nothing was changed and the caller's uploads were redundant.
    pub already_existed: bool,
}

/// A recorded blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub id: BlobId,
    pub hash: [u8; 32],
    pub size: u64,
    pub file_hash: [u8; 32],
    pub file_size: u64,
    pub chunk_count: u64,
}

/// A recorded chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub id: ChunkId,
    pub hash: [u8; 32],
    pub size: u64,
    pub stored_size: u64,
    pub compression: Compression,
}

/// A chunk's place in a blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobChunk {
    pub seq: u64,
    /// Start of the chunk in the uncompressed blob.
    pub offset: u64,
    pub chunk: Chunk,
}

pub(crate) const BLOB_COLUMNS: &str =
    "b.id, b.hash, b.size, b.file_hash, b.file_size, b.chunk_count";

pub(crate) type BlobRow = (i64, Vec<u8>, i64, Vec<u8>, i64, i64);

pub(crate) fn blob_from_row(row: BlobRow) -> Result<Blob> {
    let (id, hash, size, file_hash, file_size, chunk_count) = row;
    Ok(Blob {
        id: BlobId(id),
        hash: sql::digest(hash, "blob hash")?,
        size: sql::from_db(size, "blob size")?,
        file_hash: sql::digest(file_hash, "blob file_hash")?,
        file_size: sql::from_db(file_size, "blob file_size")?,
        chunk_count: sql::from_db(chunk_count, "blob chunk_count")?,
    })
}

pub(crate) type ChunkRow = (i64, Vec<u8>, i64, i64, String);

/// `seq, byte_offset` and then a [`ChunkRow`].
type BlobChunkRow = (i64, i64, i64, Vec<u8>, i64, i64, String);

pub(crate) fn chunk_from_row(row: ChunkRow) -> Result<Chunk> {
    let (id, hash, size, stored_size, compression) = row;
    Ok(Chunk {
        id: ChunkId(id),
        hash: sql::digest(hash, "chunk hash")?,
        size: sql::from_db(size, "chunk size")?,
        stored_size: sql::from_db(stored_size, "chunk stored_size")?,
        compression: Compression::parse(&compression)?,
    })
}

/// All uses of one chunk within a blob being committed.
struct ChunkUse<'a> {
    chunk: &'a NewChunkRef,
    /// Positions in the blob that use it: the refcount it gains.
    uses: i64,
    uploaded: bool,
}

/// Checks that the chunks tile the blob exactly and merges repeated chunks.
/// Returned in hash order, so that concurrent commits lock shared chunk rows
/// in the same order.
fn chunk_uses(blob: &NewBlob) -> Result<BTreeMap<[u8; 32], ChunkUse<'_>>> {
    let mut uses: BTreeMap<[u8; 32], ChunkUse<'_>> = BTreeMap::new();
    let mut end = 0u64;
    for (seq, chunk) in blob.chunks.iter().enumerate() {
        if chunk.size == 0 || chunk.stored_size == 0 {
            return Err(MetaError::Invalid(format!("chunk {seq} is empty")));
        }
        if chunk.offset != end {
            return Err(MetaError::Invalid(format!(
                "chunk {seq} starts at {} but the chunks before it end at {end}",
                chunk.offset
            )));
        }
        end = end
            .checked_add(chunk.size)
            .ok_or_else(|| MetaError::Invalid("chunk sizes overflow".into()))?;
        let entry = uses.entry(chunk.hash).or_insert(ChunkUse {
            chunk,
            uses: 0,
            uploaded: false,
        });
        if entry.chunk.size != chunk.size {
            return Err(MetaError::Invalid(format!(
                "chunk {seq} repeats an earlier chunk with a different size"
            )));
        }
        entry.uses += 1;
        entry.uploaded |= chunk.uploaded;
    }
    if end != blob.size {
        return Err(MetaError::Invalid(format!(
            "chunks cover {end} bytes of a {}-byte blob",
            blob.size
        )));
    }
    Ok(uses)
}

/// Adds `$1` uses to the valid chunks among `n` hashes.
fn add_uses_sql(n: usize) -> String {
    format!(
        "UPDATE chunks SET refcount = refcount + $1, deletable_at = NULL \
         WHERE state = 'valid' AND hash IN ({}) RETURNING id, hash",
        sql::params(2, n)
    )
}

/// Inserts `n` chunks created at `$1`. A conflict means a concurrent writer
/// inserted the row meanwhile (fine: add our uses) or the row is `deleting`
/// (the WHERE skips it and RETURNING omits it).
fn insert_chunks_sql(n: usize) -> String {
    format!(
        "INSERT INTO chunks (hash, size, stored_size, compression, refcount, state, created_at) \
         VALUES {} \
         ON CONFLICT (hash) DO UPDATE \
           SET refcount = chunks.refcount + excluded.refcount, deletable_at = NULL \
           WHERE chunks.state = 'valid' \
         RETURNING id, hash",
        sql::rows(2, n, 5, "", ", 'valid', $1")
    )
}

/// Inserts `n` chunk positions of blob `$1`.
fn insert_blob_chunks_sql(n: usize) -> String {
    format!(
        "INSERT INTO blob_chunks (blob_id, seq, chunk_id, byte_offset) VALUES {}",
        sql::rows(2, n, 3, "$1, ", "")
    )
}

impl Meta {
    /// The chunks in `hashes` that have no row, in the caller's order without
    /// repeats: the ones the caller must upload before
    /// [`Meta::commit_blob`].
    ///
    /// The chunks it does find are leased: any without references gets
    /// `deletable_at` pushed to at least `now + grace`, so GC cannot take a
    /// chunk this writer is counting on before it commits, provided it commits
    /// within the grace period.
    ///
    /// Fails with [`MetaError::ChunkGone`] if a chunk is being
    /// garbage-collected: its object may vanish at any moment, and uploading
    /// it again now could race that delete, so the caller must wait until GC
    /// has forgotten the row and then upload.
    pub async fn missing_chunks(&self, hashes: &[[u8; 32]], now: i64) -> Result<Vec<[u8; 32]>> {
        let lease = self.lease(now);
        let hashes = sql::dedup(hashes);
        let mut missing = Vec::new();
        for batch in hashes.chunks(READ_BATCH) {
            let n = sql::in_list_len(batch.len());
            let lookup = format!(
                "SELECT hash, refcount, deletable_at, state FROM chunks WHERE hash IN ({})",
                sql::params(1, n)
            );
            let rows: Vec<(Vec<u8>, i64, Option<i64>, String)> = on_reader!(self, |pool| async {
                let mut query = sqlx::query_as(&lookup);
                for i in 0..n {
                    query = query.bind(&sql::padded(batch, i)[..]);
                }
                query.fetch_all(pool).await
            })?;
            let mut found = HashSet::with_capacity(rows.len());
            let mut to_lease = Vec::new();
            for (hash, refcount, deletable_at, state) in rows {
                let hash = sql::digest(hash, "chunk hash")?;
                if state != "valid" {
                    return Err(MetaError::ChunkGone(hash));
                }
                // Reads take no lock, so the common case (referenced chunks)
                // costs no write at all; only unreferenced ones need the lease.
                if refcount == 0 && deletable_at.is_none_or(|t| t < lease) {
                    to_lease.push(hash);
                }
                found.insert(hash);
            }
            if !to_lease.is_empty() {
                self.lease_chunks(&to_lease, lease).await?;
            }
            missing.extend(batch.iter().filter(|h| !found.contains(*h)));
        }
        Ok(missing)
    }

    /// Extends the lease of unreferenced chunks that were valid a moment ago.
    /// GC may have marked one in between; then the lease fails for it.
    async fn lease_chunks(&self, hashes: &[[u8; 32]], lease: i64) -> Result<()> {
        let n = sql::in_list_len(hashes.len());
        let update = format!(
            "UPDATE chunks SET deletable_at = \
               CASE WHEN refcount = 0 AND deletable_at < $1 THEN $1 ELSE deletable_at END \
             WHERE state = 'valid' AND hash IN ({}) RETURNING hash",
            sql::params(2, n)
        );
        let leased: Vec<(Vec<u8>,)> = on_writer!(self, |pool| async {
            let mut query = sqlx::query_as(&update).bind(lease);
            for i in 0..n {
                query = query.bind(&sql::padded(hashes, i)[..]);
            }
            Ok(query.fetch_all(pool).await?)
        })?;
        let leased: HashSet<Vec<u8>> = leased.into_iter().map(|(h,)| h).collect();
        match hashes.iter().find(|h| !leased.contains(&h[..])) {
            Some(gone) => Err(MetaError::ChunkGone(*gone)),
            None => Ok(()),
        }
    }

    /// Records `blob` in one transaction, after its missing chunks were
    /// uploaded.
    ///
    /// If a blob with the same hash exists, returns it and changes nothing:
    /// two writers racing to store the same content both succeed and it is
    /// recorded once. Otherwise every chunk's refcount grows by the number of
    /// times the blob uses it (new chunks are inserted), and the blob starts
    /// unreferenced with `deletable_at = now + grace`: it is expected to gain
    /// its first reference (a Nix object or CAS entry) within that window.
    ///
    /// Fails with [`MetaError::ChunkGone`], having written nothing, if a chunk
    /// is being garbage-collected or a chunk the caller did not upload has
    /// no row.
    #[expect(
        clippy::too_many_lines,
        reason = "one transaction, written inline so that it expands once per backend"
    )]
    pub async fn commit_blob(&self, blob: &NewBlob, now: i64) -> Result<BlobCommit> {
        let uses = chunk_uses(blob)?;
        let chunk_count = i64::try_from(blob.chunks.len())
            .map_err(|_| MetaError::Invalid("too many chunks".into()))?;
        let size = sql::to_db(blob.size, "blob size")?;
        let file_size = sql::to_db(blob.file_size, "file size")?;
        let lease = self.lease(now);
        // Chunks grouped by how many times the blob uses them, so one UPDATE
        // per group can add the same amount to every row.
        let mut by_uses: BTreeMap<i64, Vec<[u8; 32]>> = BTreeMap::new();
        for (hash, u) in &uses {
            by_uses.entry(u.uses).or_default().push(*hash);
        }
        on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;

            // Claiming the hash first makes a concurrent commit of the same
            // blob wait here (Postgres) or queue for the write lock (SQLite)
            // and then take the `already_existed` path.
            let blob_id = loop {
                let inserted: Option<(i64,)> = sqlx::query_as(
                    "INSERT INTO blobs (hash, size, file_hash, file_size, chunk_count, \
                       refcount, deletable_at, created_at) \
                     VALUES ($1, $2, $3, $4, $5, 0, $6, $7) \
                     ON CONFLICT (hash) DO NOTHING RETURNING id",
                )
                .bind(&blob.hash[..])
                .bind(size)
                .bind(&blob.file_hash[..])
                .bind(file_size)
                .bind(chunk_count)
                .bind(lease)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some((id,)) = inserted {
                    break id;
                }
                // The existing blob may be unreferenced and due for GC; lease
                // it like a chunk, so the caller has the grace period to
                // reference it.
                sqlx::query(
                    "UPDATE blobs SET deletable_at = $2 \
                     WHERE hash = $1 AND refcount = 0 AND deletable_at < $2",
                )
                .bind(&blob.hash[..])
                .bind(lease)
                .execute(&mut *tx)
                .await?;
                let existing: Option<(i64,)> =
                    sqlx::query_as("SELECT id FROM blobs WHERE hash = $1")
                        .bind(&blob.hash[..])
                        .fetch_optional(&mut *tx)
                        .await?;
                if let Some((id,)) = existing {
                    tx.commit().await?;
                    return Ok(BlobCommit {
                        blob_id: BlobId(id),
                        already_existed: true,
                    });
                }
                // Postgres only: GC deleted the blob between our INSERT and
                // UPDATE. Each statement sees the latest commits, so inserting
                // again now succeeds.
            };

            let mut ids: HashMap<[u8; 32], i64> = HashMap::with_capacity(uses.len());
            // Existing valid chunks gain their uses and lose any deletion time.
            // A chunk in `deleting` is left alone and handled below.
            for (count, hashes) in &by_uses {
                for batch in hashes.chunks(READ_BATCH) {
                    let n = sql::in_list_len(batch.len());
                    let update = add_uses_sql(n);
                    let mut query = sqlx::query_as(&update).bind(count);
                    for i in 0..n {
                        query = query.bind(&sql::padded(batch, i)[..]);
                    }
                    let rows: Vec<(i64, Vec<u8>)> = query.fetch_all(&mut *tx).await?;
                    for (id, hash) in rows {
                        ids.insert(sql::digest(hash, "chunk hash")?, id);
                    }
                }
            }

            // The rest must be chunks this writer uploaded: insert them.
            let mut new = Vec::new();
            for (hash, u) in &uses {
                if !ids.contains_key(hash) {
                    if !u.uploaded {
                        return Err(MetaError::ChunkGone(*hash));
                    }
                    new.push(u);
                }
            }
            for batch in new.chunks(WRITE_BATCH) {
                let insert = insert_chunks_sql(batch.len());
                let mut query = sqlx::query_as(&insert).bind(now);
                for u in batch {
                    query = query
                        .bind(&u.chunk.hash[..])
                        .bind(sql::to_db(u.chunk.size, "chunk size")?)
                        .bind(sql::to_db(u.chunk.stored_size, "chunk stored size")?)
                        .bind(u.chunk.compression.as_str())
                        .bind(u.uses);
                }
                let rows: Vec<(i64, Vec<u8>)> = query.fetch_all(&mut *tx).await?;
                for (id, hash) in rows {
                    ids.insert(sql::digest(hash, "chunk hash")?, id);
                }
            }
            if let Some(gone) = uses.keys().find(|h| !ids.contains_key(*h)) {
                return Err(MetaError::ChunkGone(*gone));
            }

            for (start, batch) in (0u64..)
                .step_by(WRITE_BATCH)
                .zip(blob.chunks.chunks(WRITE_BATCH))
            {
                let insert = insert_blob_chunks_sql(batch.len());
                let mut query = sqlx::query(&insert).bind(blob_id);
                for (seq, chunk) in (start..).zip(batch) {
                    query = query
                        .bind(sql::to_db(seq, "chunk seq")?)
                        .bind(ids[&chunk.hash])
                        .bind(sql::to_db(chunk.offset, "chunk offset")?);
                }
                query.execute(&mut *tx).await?;
            }

            tx.commit().await?;
            Ok(BlobCommit {
                blob_id: BlobId(blob_id),
                already_existed: false,
            })
        })
    }

    pub async fn blob_by_hash(&self, hash: &[u8; 32]) -> Result<Option<Blob>> {
        let sql = format!("SELECT {BLOB_COLUMNS} FROM blobs b WHERE b.hash = $1");
        let row: Option<BlobRow> = on_reader!(self, |pool| async {
            sqlx::query_as(&sql)
                .bind(&hash[..])
                .fetch_optional(pool)
                .await
        })?;
        row.map(blob_from_row).transpose()
    }

    /// The chunks of a blob in order, or only those overlapping the
    /// half-open byte `range` of its uncompressed content. The range costs one
    /// index probe for its first chunk however large the blob is.
    pub async fn blob_chunks(
        &self,
        blob: BlobId,
        range: Option<Range<u64>>,
    ) -> Result<Vec<BlobChunk>> {
        const SELECT: &str = "SELECT bc.seq, bc.byte_offset, \
               c.id, c.hash, c.size, c.stored_size, c.compression \
             FROM blob_chunks bc JOIN chunks c ON c.id = bc.chunk_id \
             WHERE bc.blob_id = $1";
        let rows: Vec<BlobChunkRow> = match range {
            None => {
                let sql = format!("{SELECT} ORDER BY bc.seq");
                on_reader!(self, |pool| async {
                    sqlx::query_as(&sql).bind(blob.0).fetch_all(pool).await
                })?
            }
            Some(range) if range.is_empty() => Vec::new(),
            Some(range) => {
                // The first chunk is the last one starting at or before
                // `range.start`; the size test drops it when the range starts
                // past the end of the blob.
                let sql = format!(
                    "{SELECT} AND bc.byte_offset < $3 AND bc.byte_offset + c.size > $2 \
                       AND bc.byte_offset >= COALESCE((SELECT byte_offset FROM blob_chunks \
                         WHERE blob_id = $1 AND byte_offset <= $2 \
                         ORDER BY byte_offset DESC LIMIT 1), 0) \
                     ORDER BY bc.seq"
                );
                let start = i64::try_from(range.start).unwrap_or(i64::MAX);
                let end = i64::try_from(range.end).unwrap_or(i64::MAX);
                on_reader!(self, |pool| async {
                    sqlx::query_as(&sql)
                        .bind(blob.0)
                        .bind(start)
                        .bind(end)
                        .fetch_all(pool)
                        .await
                })?
            }
        };
        rows.into_iter()
            .map(|(seq, offset, id, hash, size, stored_size, compression)| {
                Ok(BlobChunk {
                    seq: sql::from_db(seq, "chunk seq")?,
                    offset: sql::from_db(offset, "chunk offset")?,
                    chunk: chunk_from_row((id, hash, size, stored_size, compression))?,
                })
            })
            .collect()
    }
}
