//! Chunks and blobs: the write path (`present_chunks`, then `commit_blob`)
//! and the read path (`blob_by_hash`, `blob_chunks`).
//!
//! A writer cuts its stream into chunks, asks [`Meta::present_chunks`] which
//! ones the store already holds (and the hash of each one's stored frame),
//! uploads the others, and then records the blob with [`Meta::commit_blob`].
//! Between the two calls GC keeps running; the lease taken by
//! `present_chunks` and the checks in `commit_blob` are what make that safe.
//!
//! A blob's "file", what a client downloading its stored form receives, is
//! the concatenation of its chunks' stored frames. Every chunk row records
//! its frame's size and SHA-256, and every `blob_chunks` row the frame's
//! offset in the file, so byte ranges of either the content or the file map
//! to chunks with one index probe.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use crate::packs::{LiveBytes, NewPack, PackPlace, add_live_bytes, insert_packs, place_from_row};
use crate::sql::{self, READ_BATCH, WRITE_BATCH};
use crate::{BeginWrite as _, BlobId, ChunkId, Meta, MetaError, Result, on_reader, on_writer};

/// How a chunk's object is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChunkCompression {
    None,
    Zstd,
}

impl ChunkCompression {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ChunkCompression::None => "none",
            ChunkCompression::Zstd => "zstd",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(ChunkCompression::None),
            "zstd" => Ok(ChunkCompression::Zstd),
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
    /// Size of the stored object (the chunk's frame), never 0.
    pub stored_size: u64,
    /// SHA-256 of the stored object. For a chunk the writer did not upload,
    /// the one [`Meta::present_chunks`] reported; it must match the chunk's
    /// row at commit.
    pub frame_hash: [u8; 32],
    pub compression: ChunkCompression,
    /// Start of the chunk in the uncompressed blob: the sum of the sizes
    /// before it.
    pub offset: u64,
    /// Start of the chunk's frame in the blob's file: the sum of the stored
    /// sizes before it.
    pub file_offset: u64,
    /// Whether this writer put the object in the backend itself, because
    /// [`Meta::present_chunks`] did not report it. A chunk it skipped must
    /// still have a row at commit; if the row is gone (the writer outlived the
    /// grace period and GC took the chunk) the commit fails with
    /// [`MetaError::ChunkGone`] rather than recording a chunk with no object.
    pub uploaded: bool,
    /// Where the writer stored the frame, for a chunk it uploaded: a pack
    /// listed with the chunks ([`NewBlob::packs`]). The row records it if
    /// this commit is the first to record the chunk.
    pub pack: Option<PackPlace>,
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
    /// The packs the uploaded chunks are in.
    pub packs: Vec<NewPack>,
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

/// Totals over the recorded chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkStats {
    pub count: u64,
    /// Uncompressed bytes.
    pub size: u64,
    /// Bytes in the blob backend.
    pub stored_size: u64,
}

/// A recorded chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub id: ChunkId,
    pub hash: [u8; 32],
    pub size: u64,
    pub stored_size: u64,
    /// SHA-256 of the stored object.
    pub frame_hash: [u8; 32],
    pub compression: ChunkCompression,
    /// The chunk's place in a pack; `None` for a chunk stored as an object
    /// of its own (before packs).
    pub pack: Option<PackPlace>,
}

/// A chunk [`Meta::present_chunks`] found: what a writer needs to fetch and
/// check its stored frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PresentChunk {
    pub frame_hash: [u8; 32],
    pub stored_size: u64,
    pub pack: Option<PackPlace>,
}

/// A chunk's place in a blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobChunk {
    pub seq: u64,
    /// Start of the chunk in the uncompressed blob.
    pub offset: u64,
    /// Start of the chunk's stored frame in the blob's file.
    pub file_offset: u64,
    pub chunk: Chunk,
}

/// Which chunks of a blob [`Meta::blob_chunks`] returns: those overlapping a
/// half-open byte range of either form of the blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkRange {
    /// A range of the uncompressed content.
    Content(Range<u64>),
    /// A range of the file (the stored frames concatenated), as a client
    /// downloading the stored form asks for with `Range:`.
    File(Range<u64>),
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

/// Joins chunks `c` to the packs `p` holding them, if any.
pub(crate) const PACK_JOIN: &str = "LEFT JOIN packs p ON p.id = c.pack_id";

/// `id, hash, size, stored_size, frame_hash, compression`, pack key and
/// pack offset of a chunk.
pub(crate) type ChunkRow = (
    i64,
    Vec<u8>,
    i64,
    i64,
    Vec<u8>,
    String,
    Option<Vec<u8>>,
    Option<i64>,
);

pub(crate) fn chunk_from_row(row: ChunkRow) -> Result<Chunk> {
    let (id, hash, size, stored_size, frame_hash, compression, pack, offset) = row;
    Ok(Chunk {
        id: ChunkId(id),
        hash: sql::digest(hash, "chunk hash")?,
        size: sql::from_db(size, "chunk size")?,
        stored_size: sql::from_db(stored_size, "chunk stored_size")?,
        frame_hash: sql::digest(frame_hash, "chunk frame_hash")?,
        compression: ChunkCompression::parse(&compression)?,
        pack: place_from_row(pack, offset)?,
    })
}

/// `hash, frame_hash, stored_size, refcount, deletable_at, state`, pack key
/// and pack offset of a chunk.
type ChunkLookupRow = (
    Vec<u8>,
    Vec<u8>,
    i64,
    i64,
    Option<i64>,
    String,
    Option<Vec<u8>>,
    Option<i64>,
);

/// All uses of one chunk within a blob being committed (or a stretch of an
/// upload being checkpointed).
pub(crate) struct ChunkUse<'a> {
    pub(crate) chunk: &'a NewChunkRef,
    /// Positions in the blob that use it: the refcount it gains.
    uses: i64,
    pub(crate) uploaded: bool,
}

/// Chunks merged by hash, in hash order, so that concurrent transactions
/// lock shared chunk rows in the same order.
pub(crate) type ChunkUses<'a> = BTreeMap<[u8; 32], ChunkUse<'a>>;

/// Checks that the chunks tile the blob and its file exactly and merges
/// repeated chunks, which must describe the same object every time.
fn chunk_uses(blob: &NewBlob) -> Result<ChunkUses<'_>> {
    let (uses, end, file_end) = tile(&blob.chunks, 0, 0)?;
    if end != blob.size {
        return Err(MetaError::Invalid(format!(
            "chunks cover {end} bytes of a {}-byte blob",
            blob.size
        )));
    }
    if file_end != blob.file_size {
        return Err(MetaError::Invalid(format!(
            "frames cover {file_end} bytes of a {}-byte file",
            blob.file_size
        )));
    }
    Ok(uses)
}

/// Checks that non-empty `chunks` follow each other from byte `start` and
/// file byte `file_start` without gaps or overlaps, and merges repeated
/// chunks, which must describe the same object every time. Returns the
/// merged uses and where the chunks end in the content and in the file.
pub(crate) fn tile(
    chunks: &[NewChunkRef],
    start: u64,
    file_start: u64,
) -> Result<(ChunkUses<'_>, u64, u64)> {
    let mut uses: ChunkUses<'_> = BTreeMap::new();
    let mut end = start;
    let mut file_end = file_start;
    for (seq, chunk) in chunks.iter().enumerate() {
        if chunk.size == 0 || chunk.stored_size == 0 {
            return Err(MetaError::Invalid(format!("chunk {seq} is empty")));
        }
        if chunk.offset != end {
            return Err(MetaError::Invalid(format!(
                "chunk {seq} starts at {} but the chunks before it end at {end}",
                chunk.offset
            )));
        }
        if chunk.file_offset != file_end {
            return Err(MetaError::Invalid(format!(
                "chunk {seq}'s frame starts at {} but the frames before it end at {file_end}",
                chunk.file_offset
            )));
        }
        end = end
            .checked_add(chunk.size)
            .ok_or_else(|| MetaError::Invalid("chunk sizes overflow".into()))?;
        file_end = file_end
            .checked_add(chunk.stored_size)
            .ok_or_else(|| MetaError::Invalid("chunk stored sizes overflow".into()))?;
        match uses.entry(chunk.hash) {
            Entry::Vacant(entry) => {
                entry.insert(ChunkUse {
                    chunk,
                    uses: 1,
                    uploaded: chunk.uploaded,
                });
            }
            Entry::Occupied(mut entry) => {
                let first = entry.get().chunk;
                let same_object = first.size == chunk.size
                    && first.stored_size == chunk.stored_size
                    && first.frame_hash == chunk.frame_hash
                    && first.compression == chunk.compression;
                if !same_object {
                    return Err(MetaError::Invalid(format!(
                        "chunk {seq} repeats an earlier chunk with a different size or frame"
                    )));
                }
                let entry = entry.get_mut();
                entry.uses += 1;
                entry.uploaded |= chunk.uploaded;
            }
        }
    }
    Ok((uses, end, file_end))
}

/// Checks that a chunk row the commit is about to use describes the object
/// the writer built its file from: a writer racing another that stored the
/// same chunk with a different zstd build would otherwise record file
/// offsets that disagree with the row.
fn check_frame(chunk: &NewChunkRef, stored_size: i64, frame_hash: &[u8]) -> Result<()> {
    if sql::from_db(stored_size, "chunk stored_size")? == chunk.stored_size
        && frame_hash == chunk.frame_hash
    {
        Ok(())
    } else {
        Err(MetaError::FrameMismatch(chunk.hash))
    }
}

/// Adds `$1` uses to the valid chunks among `n` hashes.
fn add_uses_sql(n: usize) -> String {
    format!(
        "UPDATE chunks SET refcount = refcount + $1, deletable_at = NULL \
         WHERE state = 'valid' AND hash IN ({}) \
         RETURNING id, hash, stored_size, frame_hash",
        sql::params(2, n)
    )
}

/// Inserts `n` chunks created at `$1`, each with its refcount, deletable_at,
/// pack id and offset. A chunk that has a row already (a concurrent writer
/// recorded it first, or it is `deleting`) is skipped and not returned: the
/// caller adds its uses to the existing row instead, and counts live bytes
/// only for the rows returned here.
pub(crate) fn insert_chunks_sql(n: usize) -> String {
    format!(
        "INSERT INTO chunks (hash, size, stored_size, frame_hash, compression, refcount, \
           deletable_at, pack_id, pack_offset, state, created_at) \
         VALUES {} \
         ON CONFLICT (hash) DO NOTHING \
         RETURNING id, hash, stored_size, frame_hash",
        sql::rows(2, n, 9, "", ", 'valid', $1")
    )
}

/// A chunk a writer uploaded, with the row values an insert binds.
pub(crate) struct ChunkInsert<'a> {
    pub(crate) chunk: &'a NewChunkRef,
    pub(crate) refcount: i64,
    pub(crate) pack_id: i64,
    pub(crate) pack_offset: i64,
}

/// Pairs each uploaded chunk with its pack's row id; a chunk naming a pack
/// the writer did not list is refused.
pub(crate) fn chunk_inserts<'a>(
    uploaded: impl IntoIterator<Item = (&'a NewChunkRef, i64)>,
    packs: &HashMap<[u8; 16], i64>,
) -> Result<Vec<ChunkInsert<'a>>> {
    uploaded
        .into_iter()
        .map(|(chunk, refcount)| {
            let place = chunk
                .pack
                .ok_or_else(|| MetaError::Invalid("an uploaded chunk names no pack".into()))?;
            let pack_id = *packs.get(&place.pack).ok_or_else(|| {
                MetaError::Invalid("an uploaded chunk names a pack the upload did not list".into())
            })?;
            Ok(ChunkInsert {
                chunk,
                refcount,
                pack_id,
                pack_offset: sql::to_db(place.offset, "chunk pack offset")?,
            })
        })
        .collect()
}

/// Inserts `$inserts` (a `&[ChunkInsert]`) created at `$now`, unreferenced
/// until `$deletable_at` (an `Option<i64>`), in transaction `$tx`. Records
/// every inserted row in `$ids` (checking its frame against `$uses`) and its
/// stored size in `$live`. A macro so that it expands once per database.
macro_rules! insert_chunks {
    ($tx:expr, $inserts:expr, $now:expr, $deletable_at:expr, $uses:expr, $ids:expr, $live:expr) => {{
        let inserts: &[$crate::blobs::ChunkInsert<'_>] = $inserts;
        let deletable_at: Option<i64> = $deletable_at;
        for batch in inserts.chunks($crate::sql::WRITE_BATCH) {
            let insert = $crate::blobs::insert_chunks_sql(batch.len());
            let mut query = sqlx::query_as(&insert).bind($now);
            for i in batch {
                query = query
                    .bind(&i.chunk.hash[..])
                    .bind($crate::sql::to_db(i.chunk.size, "chunk size")?)
                    .bind($crate::sql::to_db(
                        i.chunk.stored_size,
                        "chunk stored size",
                    )?)
                    .bind(&i.chunk.frame_hash[..])
                    .bind(i.chunk.compression.as_str())
                    .bind(i.refcount)
                    .bind(deletable_at)
                    .bind(i.pack_id)
                    .bind(i.pack_offset);
            }
            let rows: Vec<$crate::blobs::UsedChunkRow> = query.fetch_all(&mut *$tx).await?;
            let inserted: std::collections::HashSet<&[u8]> =
                rows.iter().map(|r| &r.1[..]).collect();
            for i in batch
                .iter()
                .filter(|i| inserted.contains(&i.chunk.hash[..]))
            {
                *$live.entry(i.pack_id).or_default() +=
                    i64::try_from(i.chunk.stored_size).expect("stored sizes fit the database");
            }
            $crate::blobs::record_used(rows, $uses, $ids)?;
        }
    }};
}
pub(crate) use insert_chunks;

/// `id, hash, stored_size, frame_hash` of a chunk row a commit added uses to.
pub(crate) type UsedChunkRow = (i64, Vec<u8>, i64, Vec<u8>);

/// Notes the ids of chunk rows a commit uses, checking each row's frame
/// against what the writer sent (whether the row was updated or inserted).
pub(crate) fn record_used(
    rows: Vec<UsedChunkRow>,
    uses: &ChunkUses<'_>,
    ids: &mut HashMap<[u8; 32], i64>,
) -> Result<()> {
    for (id, hash, stored_size, frame_hash) in rows {
        let hash = sql::digest(hash, "chunk hash")?;
        if let Some(u) = uses.get(&hash) {
            check_frame(u.chunk, stored_size, &frame_hash)?;
        }
        ids.insert(hash, id);
    }
    Ok(())
}

/// A blob checked and ready to commit.
struct Prepared<'a> {
    blob: &'a NewBlob,
    uses: ChunkUses<'a>,
    chunk_count: i64,
    size: i64,
    file_size: i64,
}

fn prepare(blob: &NewBlob) -> Result<Prepared<'_>> {
    Ok(Prepared {
        blob,
        uses: chunk_uses(blob)?,
        chunk_count: i64::try_from(blob.chunks.len())
            .map_err(|_| MetaError::Invalid("too many chunks".into()))?,
        size: sql::to_db(blob.size, "blob size")?,
        file_size: sql::to_db(blob.file_size, "file size")?,
    })
}

/// The chunk uses of several blobs committed together, merged by hash; a
/// chunk two blobs use must be the same stored frame in both (where each
/// writer put its copy may differ: the first one listed is recorded).
fn merge_uses<'a>(blobs: impl IntoIterator<Item = &'a Prepared<'a>>) -> Result<ChunkUses<'a>> {
    let mut merged: ChunkUses<'a> = BTreeMap::new();
    for blob in blobs {
        for (hash, u) in &blob.uses {
            match merged.entry(*hash) {
                Entry::Vacant(entry) => {
                    entry.insert(ChunkUse {
                        chunk: u.chunk,
                        uses: u.uses,
                        uploaded: u.uploaded,
                    });
                }
                Entry::Occupied(mut entry) => {
                    let first = entry.get().chunk;
                    if (
                        first.size,
                        first.stored_size,
                        first.frame_hash,
                        first.compression,
                    ) != (
                        u.chunk.size,
                        u.chunk.stored_size,
                        u.chunk.frame_hash,
                        u.chunk.compression,
                    ) {
                        return Err(MetaError::Invalid(
                            "two blobs of a batch store one chunk as different frames".into(),
                        ));
                    }
                    let entry = entry.get_mut();
                    entry.uses += u.uses;
                    entry.uploaded |= u.uploaded;
                }
            }
        }
    }
    Ok(merged)
}

/// Inserts `n` unreferenced blobs, leased until `$1`, created at `$2`,
/// skipping those that exist.
fn insert_blobs_sql(n: usize) -> String {
    format!(
        "INSERT INTO blobs (hash, size, file_hash, file_size, chunk_count, refcount, \
           deletable_at, created_at) VALUES {} \
         ON CONFLICT (hash) DO NOTHING RETURNING id, hash",
        sql::rows(3, n, 5, "", ", 0, $1, $2")
    )
}

/// Inserts `n` chunk positions, each with its blob.
fn insert_blob_chunks_sql(n: usize) -> String {
    format!(
        "INSERT INTO blob_chunks (blob_id, seq, chunk_id, byte_offset, file_offset) VALUES {}",
        sql::rows(1, n, 5, "", "")
    )
}

impl Meta {
    /// The chunks in `hashes` that have a row, each with the SHA-256 of its
    /// stored frame. The caller must upload the others before
    /// [`Meta::commit_blob`]; for one it skips, its file is made of the stored
    /// frame, so if its own frame hashes differently it must fetch the stored
    /// one to get the file right.
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
    pub async fn present_chunks(
        &self,
        hashes: &[[u8; 32]],
        now: i64,
    ) -> Result<HashMap<[u8; 32], PresentChunk>> {
        let lease = self.lease(now);
        let hashes = sql::dedup(hashes);
        let mut present = HashMap::new();
        for batch in hashes.chunks(READ_BATCH) {
            let n = sql::in_list_len(batch.len());
            let lookup = format!(
                "SELECT c.hash, c.frame_hash, c.stored_size, c.refcount, c.deletable_at, \
                   c.state, p.key, c.pack_offset FROM chunks c {PACK_JOIN} \
                 WHERE c.hash IN ({})",
                sql::params(1, n)
            );
            let rows: Vec<ChunkLookupRow> = on_reader!(self, |pool| async {
                let mut query = sqlx::query_as(&lookup);
                for i in 0..n {
                    query = query.bind(&sql::padded(batch, i)[..]);
                }
                query.fetch_all(pool).await
            })?;
            let mut to_lease = Vec::new();
            for (hash, frame_hash, stored_size, refcount, deletable_at, state, pack, offset) in rows
            {
                let hash = sql::digest(hash, "chunk hash")?;
                if state != "valid" {
                    return Err(MetaError::ChunkGone(hash));
                }
                // Reads take no lock, so the common case (referenced chunks)
                // costs no write at all; only unreferenced ones need the lease.
                if refcount == 0 && deletable_at.is_none_or(|t| t < lease) {
                    to_lease.push(hash);
                }
                present.insert(
                    hash,
                    PresentChunk {
                        frame_hash: sql::digest(frame_hash, "chunk frame_hash")?,
                        stored_size: sql::from_db(stored_size, "chunk stored_size")?,
                        pack: place_from_row(pack, offset)?,
                    },
                );
            }
            if !to_lease.is_empty() {
                self.lease_chunks(&to_lease, lease).await?;
            }
        }
        Ok(present)
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
    /// Chunks an upload session recorded ([`Meta::checkpoint_upload`]) have
    /// rows, unreferenced until this commit, so the caller may send them as
    /// uploaded or not: either way they gain their uses and lose their lease.
    ///
    /// Fails with [`MetaError::ChunkGone`], having written nothing, if a chunk
    /// is being garbage-collected or a chunk the caller did not upload has
    /// no row, and with [`MetaError::FrameMismatch`] if a chunk's row records
    /// a different stored frame than `blob` does.
    pub async fn commit_blob(&self, blob: &NewBlob, now: i64) -> Result<BlobCommit> {
        let mut commits = self.commit_blobs(std::slice::from_ref(blob), now).await?;
        Ok(commits.remove(0))
    }

    /// [`Meta::commit_blob`] of several blobs in one transaction, all or
    /// none: one commit (one log sync) for a batch of small uploads instead
    /// of one each. A blob repeated in `blobs` is recorded once; the later
    /// copies come back `already_existed`.
    #[expect(
        clippy::too_many_lines,
        reason = "one transaction, written inline so that it expands once per backend"
    )]
    pub async fn commit_blobs(&self, blobs: &[NewBlob], now: i64) -> Result<Vec<BlobCommit>> {
        let prepared = blobs.iter().map(prepare).collect::<Result<Vec<_>>>()?;
        let lease = self.lease(now);
        // The blobs of a batch share their packs: recorded once.
        let mut packs: Vec<NewPack> = blobs.iter().flat_map(|b| b.packs.iter().copied()).collect();
        packs.sort_unstable_by_key(|p| p.key);
        packs.dedup_by_key(|p| p.key);
        on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;
            let pack_ids = insert_packs!(tx, &packs, now);
            let mut commits = Vec::with_capacity(prepared.len());
            let mut new_blobs = Vec::with_capacity(prepared.len());
            // Most blobs of a batch are new: claim them all at once. A blob
            // listed twice is inserted once, by its first copy.
            let mut unique: Vec<&Prepared<'_>> = Vec::with_capacity(prepared.len());
            let mut seen = HashSet::with_capacity(prepared.len());
            unique.extend(prepared.iter().filter(|p| seen.insert(p.blob.hash)));
            let mut inserted: HashMap<[u8; 32], i64> = HashMap::with_capacity(unique.len());
            for batch in unique.chunks(WRITE_BATCH) {
                let insert = insert_blobs_sql(batch.len());
                let mut query = sqlx::query_as(&insert).bind(lease).bind(now);
                for p in batch {
                    query = query
                        .bind(&p.blob.hash[..])
                        .bind(p.size)
                        .bind(&p.blob.file_hash[..])
                        .bind(p.file_size)
                        .bind(p.chunk_count);
                }
                let rows: Vec<(i64, Vec<u8>)> = query.fetch_all(&mut *tx).await?;
                for (id, hash) in rows {
                    inserted.insert(sql::digest(hash, "blob hash")?, id);
                }
            }
            'blobs: for p in &prepared {
                if let Some(blob_id) = inserted.remove(&p.blob.hash) {
                    commits.push(BlobCommit {
                        blob_id: BlobId(blob_id),
                        already_existed: false,
                    });
                    new_blobs.push((blob_id, p));
                    continue;
                }
                // The blob exists (or is a later copy in this batch). Claiming
                // the hash first makes a concurrent commit of the same blob
                // wait here (Postgres) or queue for the write lock (SQLite)
                // and then take the `already_existed` path.
                let blob_id = loop {
                    let inserted: Option<(i64,)> = sqlx::query_as(
                        "INSERT INTO blobs (hash, size, file_hash, file_size, chunk_count, \
                           refcount, deletable_at, created_at) \
                         VALUES ($1, $2, $3, $4, $5, 0, $6, $7) \
                         ON CONFLICT (hash) DO NOTHING RETURNING id",
                    )
                    .bind(&p.blob.hash[..])
                    .bind(p.size)
                    .bind(&p.blob.file_hash[..])
                    .bind(p.file_size)
                    .bind(p.chunk_count)
                    .bind(lease)
                    .bind(now)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if let Some((id,)) = inserted {
                        break id;
                    }
                    // The existing blob may be unreferenced and due for GC;
                    // lease it like a chunk, so the caller has the grace
                    // period to reference it.
                    sqlx::query(
                        "UPDATE blobs SET deletable_at = $2 \
                         WHERE hash = $1 AND refcount = 0 AND deletable_at < $2",
                    )
                    .bind(&p.blob.hash[..])
                    .bind(lease)
                    .execute(&mut *tx)
                    .await?;
                    let existing: Option<(i64,)> =
                        sqlx::query_as("SELECT id FROM blobs WHERE hash = $1")
                            .bind(&p.blob.hash[..])
                            .fetch_optional(&mut *tx)
                            .await?;
                    if let Some((id,)) = existing {
                        commits.push(BlobCommit {
                            blob_id: BlobId(id),
                            already_existed: true,
                        });
                        continue 'blobs;
                    }
                    // Postgres only: GC deleted the blob between our INSERT
                    // and UPDATE. Each statement sees the latest commits, so
                    // inserting again now succeeds.
                };
                commits.push(BlobCommit {
                    blob_id: BlobId(blob_id),
                    already_existed: false,
                });
                new_blobs.push((blob_id, p));
            }

            // The chunks of every new blob, their uses summed.
            let uses = merge_uses(new_blobs.iter().map(|(_, p)| *p))?;
            // Chunks grouped by how many uses they gain, so one UPDATE per
            // group can add the same amount to every row.
            let mut by_uses: BTreeMap<i64, Vec<[u8; 32]>> = BTreeMap::new();
            for (hash, u) in &uses {
                by_uses.entry(u.uses).or_default().push(*hash);
            }
            let mut live = LiveBytes::new();
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
                    let rows: Vec<UsedChunkRow> = query.fetch_all(&mut *tx).await?;
                    record_used(rows, &uses, &mut ids)?;
                }
            }

            // The rest must be chunks this writer uploaded: insert them, in
            // the packs it wrote.
            let mut new = Vec::new();
            for (hash, u) in &uses {
                if !ids.contains_key(hash) {
                    if !u.uploaded {
                        return Err(MetaError::ChunkGone(*hash));
                    }
                    new.push((u.chunk, u.uses));
                }
            }
            if !new.is_empty() {
                let inserts = chunk_inserts(new, &pack_ids)?;
                insert_chunks!(tx, &inserts, now, None, &uses, &mut ids, live);
                // A row a concurrent writer inserted meanwhile gains our uses
                // like the existing ones above.
                let raced: Vec<&ChunkInsert<'_>> = inserts
                    .iter()
                    .filter(|i| !ids.contains_key(&i.chunk.hash))
                    .collect();
                for i in raced {
                    let update = add_uses_sql(1);
                    let rows: Vec<UsedChunkRow> = sqlx::query_as(&update)
                        .bind(i.refcount)
                        .bind(&i.chunk.hash[..])
                        .fetch_all(&mut *tx)
                        .await?;
                    record_used(rows, &uses, &mut ids)?;
                }
            }
            if let Some(gone) = uses.keys().find(|h| !ids.contains_key(*h)) {
                return Err(MetaError::ChunkGone(*gone));
            }
            add_live_bytes!(tx, &live);

            let positions: Vec<(i64, u64, &NewChunkRef)> = new_blobs
                .iter()
                .flat_map(|(id, p)| (0u64..).zip(&p.blob.chunks).map(|(seq, c)| (*id, seq, c)))
                .collect();
            for batch in positions.chunks(WRITE_BATCH) {
                let insert = insert_blob_chunks_sql(batch.len());
                let mut query = sqlx::query(&insert);
                for (blob_id, seq, chunk) in batch {
                    query = query
                        .bind(blob_id)
                        .bind(sql::to_db(*seq, "chunk seq")?)
                        .bind(ids[&chunk.hash])
                        .bind(sql::to_db(chunk.offset, "chunk offset")?)
                        .bind(sql::to_db(chunk.file_offset, "chunk file offset")?);
                }
                query.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(commits)
        })
    }

    /// Totals over every chunk row: what the store holds, for dedup checks,
    /// metrics and capacity planning.
    pub async fn chunk_stats(&self) -> Result<ChunkStats> {
        let (count, size, stored_size): (i64, Option<i64>, Option<i64>) =
            on_reader!(self, |pool| async {
                sqlx::query_as(
                    "SELECT COUNT(*), CAST(SUM(size) AS BIGINT), CAST(SUM(stored_size) AS BIGINT) \
                     FROM chunks",
                )
                .fetch_one(pool)
                .await
            })?;
        Ok(ChunkStats {
            count: sql::from_db(count, "chunk count")?,
            size: sql::from_db(size.unwrap_or(0), "chunk bytes")?,
            stored_size: sql::from_db(stored_size.unwrap_or(0), "chunk stored bytes")?,
        })
    }

    /// The blob with content `hash`, if it exists and is not due for
    /// collection, leased for the grace period like [`Meta::present_chunks`]
    /// leases chunks: a writer that proves it holds the content (by hashing
    /// it) can then reference the blob without storing it again, and GC
    /// cannot take it before that reference lands.
    pub async fn lease_blob(&self, hash: &[u8; 32], now: i64) -> Result<Option<Blob>> {
        // SQLite allows no table alias here, so not BLOB_COLUMNS; same order.
        let sql = "UPDATE blobs SET deletable_at = \
               CASE WHEN refcount = 0 AND deletable_at < $2 THEN $2 ELSE deletable_at END \
             WHERE hash = $1 AND (refcount > 0 OR deletable_at > $3) \
             RETURNING id, hash, size, file_hash, file_size, chunk_count";
        let lease = self.lease(now);
        let row: Option<BlobRow> = on_writer!(self, |pool| async {
            Ok(sqlx::query_as(sql)
                .bind(&hash[..])
                .bind(lease)
                .bind(now)
                .fetch_optional(pool)
                .await?)
        })?;
        row.map(blob_from_row).transpose()
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

    /// The chunks of a blob in order, or only those overlapping `range` (of
    /// the uncompressed content or of the file). A range costs one index
    /// probe for its first chunk however large the blob is.
    pub async fn blob_chunks(
        &self,
        blob: BlobId,
        range: Option<ChunkRange>,
    ) -> Result<Vec<BlobChunk>> {
        let select = format!(
            "SELECT {PLACED_CHUNK_COLUMNS} \
             FROM blob_chunks bc JOIN chunks c ON c.id = bc.chunk_id {PACK_JOIN} \
             WHERE bc.blob_id = $1"
        );
        let (offset, size, range) = match range {
            None => {
                let sql = format!("{select} ORDER BY bc.seq");
                let rows: Vec<PlacedChunkRow> = on_reader!(self, |pool| async {
                    sqlx::query_as(&sql).bind(blob.0).fetch_all(pool).await
                })?;
                return rows.into_iter().map(blob_chunk_from_row).collect();
            }
            Some(ChunkRange::Content(range)) => ("byte_offset", "c.size", range),
            Some(ChunkRange::File(range)) => ("file_offset", "c.stored_size", range),
        };
        if range.is_empty() {
            return Ok(Vec::new());
        }
        // The first chunk is the last one starting at or before `range.start`
        // (one probe of the offset's index); the size test drops it when the
        // range starts past the end of the blob.
        let sql = format!(
            "{select} AND bc.{offset} < $3 AND bc.{offset} + {size} > $2 \
               AND bc.{offset} >= COALESCE((SELECT {offset} FROM blob_chunks \
                 WHERE blob_id = $1 AND {offset} <= $2 \
                 ORDER BY {offset} DESC LIMIT 1), 0) \
             ORDER BY bc.seq"
        );
        let start = i64::try_from(range.start).unwrap_or(i64::MAX);
        let end = i64::try_from(range.end).unwrap_or(i64::MAX);
        let rows: Vec<PlacedChunkRow> = on_reader!(self, |pool| async {
            sqlx::query_as(&sql)
                .bind(blob.0)
                .bind(start)
                .bind(end)
                .fetch_all(pool)
                .await
        })?;
        rows.into_iter().map(blob_chunk_from_row).collect()
    }
}

/// `seq, byte_offset, file_offset`, a [`ChunkRow`], and the chunk's state:
/// a chunk where a blob or an upload session uses it ([`PLACED_CHUNK_COLUMNS`]).
pub(crate) type PlacedChunkRow = (
    i64,
    i64,
    i64,
    i64,
    Vec<u8>,
    i64,
    i64,
    Vec<u8>,
    String,
    Option<Vec<u8>>,
    Option<i64>,
    String,
);

/// The columns of a [`PlacedChunkRow`], from positions `bc` joined to chunks
/// `c` and packs `p`.
pub(crate) const PLACED_CHUNK_COLUMNS: &str = "bc.seq, bc.byte_offset, bc.file_offset, \
     c.id, c.hash, c.size, c.stored_size, c.frame_hash, c.compression, p.key, c.pack_offset, \
     c.state";

/// A chunk in place, and its row's state.
pub(crate) fn placed_chunk_from_row(row: PlacedChunkRow) -> Result<(BlobChunk, String)> {
    let (
        seq,
        offset,
        file_offset,
        id,
        hash,
        size,
        stored_size,
        frame_hash,
        compression,
        pack,
        at,
        state,
    ) = row;
    let chunk = BlobChunk {
        seq: sql::from_db(seq, "chunk seq")?,
        offset: sql::from_db(offset, "chunk offset")?,
        file_offset: sql::from_db(file_offset, "chunk file_offset")?,
        chunk: chunk_from_row((
            id,
            hash,
            size,
            stored_size,
            frame_hash,
            compression,
            pack,
            at,
        ))?,
    };
    Ok((chunk, state))
}

fn blob_chunk_from_row(row: PlacedChunkRow) -> Result<BlobChunk> {
    placed_chunk_from_row(row).map(|(chunk, _)| chunk)
}
