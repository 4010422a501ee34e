//! Blobs: the chunk store and the metadata, tied together.
//!
//! Both protocols store content through here. The store makes every chunk
//! durable, the expected digest is checked, and only then is the blob
//! committed in one metadata transaction, so a failed or lying upload leaves
//! nothing visible. Reads look the chunks up by range and stream them.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::time::Duration;

use axum::BoxError;
use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use garret_meta::{
    Blob, BlobChunk, BlobCommit, BlobId, ChunkCompression, ChunkRange, Meta, MetaError, NewBlob,
    NewChunkRef, NewPack, PackPlace,
};
use garret_nix::Sha256Hash;

use crate::clock::unix_now;
use crate::metrics::Metrics;
use crate::metrics::storage::Measured;
use garret_store::{
    Backend, Checkpoint, ChunkHash, ChunkIndex, ChunkPlace, ChunkRef, ChunkStore, Ingested, PackId,
    PackInfo, StoreError, StoredFrame,
};

/// How often, and how long apart, a writer re-asks about chunks that garbage
/// collection is deleting right now. GC forgets such a row right after
/// deleting its object, so the wait is short; then the chunk is uploaded anew.
const GONE_RETRIES: u32 = 50;
const GONE_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("content hash mismatch: expected {expected}, got {actual}")]
    HashMismatch {
        expected: Sha256Hash,
        actual: Sha256Hash,
    },
    #[error("content size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// What a writer promises about the content it sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expect {
    pub hash: Option<Sha256Hash>,
    pub size: Option<u64>,
    /// Refuse the upload as soon as it grows past this many bytes.
    pub max_size: Option<u64>,
}

/// A committed blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub id: BlobId,
    pub hash: Sha256Hash,
    pub size: u64,
    pub file_hash: Sha256Hash,
    pub file_size: u64,
    /// Another writer had stored the same content already.
    pub deduplicated: bool,
    /// Uncompressed bytes of the chunks this upload added to the store; the
    /// rest was already there.
    pub new_bytes: u64,
}

/// The chunk store the server uses: the configured backend, every
/// operation of which is measured.
pub type Store = ChunkStore<Measured<Backend>>;

/// The chunked store plus its metadata.
#[derive(Debug, Clone)]
pub struct Blobs {
    store: Store,
    meta: Meta,
}

/// The metadata seen as the store's chunk index, at one point in time.
struct MetaIndex<'a> {
    meta: &'a Meta,
    now: i64,
    /// Answers looked up ahead, present or not: a batch of small blobs asks
    /// about all of them in one query instead of one each.
    known: HashMap<ChunkHash, Option<StoredFrame>>,
}

impl<'a> MetaIndex<'a> {
    fn new(meta: &'a Meta, now: i64) -> Self {
        Self {
            meta,
            now,
            known: HashMap::new(),
        }
    }

    /// Looks `hashes` up now, so that an ingest asking about them later does
    /// not query again.
    async fn prefetch(&mut self, hashes: &[ChunkHash]) -> Result<(), BlobError> {
        let present = self.present(hashes).await?;
        for id in hashes {
            self.known.insert(*id, present.get(id).copied());
        }
        Ok(())
    }

    /// The chunks of `ids` the metadata holds. A chunk being collected right
    /// now is waited for, briefly, and then reported missing (and stored
    /// anew).
    async fn present(
        &self,
        ids: &[ChunkHash],
    ) -> Result<HashMap<ChunkHash, StoredFrame>, BlobError> {
        let hashes: Vec<[u8; 32]> = ids.iter().map(|id| *id.as_bytes()).collect();
        let mut attempt = 0;
        let present = loop {
            match self.meta.present_chunks(&hashes, self.now).await {
                Err(MetaError::ChunkGone(hash)) if attempt < GONE_RETRIES => {
                    tracing::debug!(chunk = %Sha256Hash::from_bytes(hash).to_hex(), "chunk is being collected; waiting");
                    attempt += 1;
                    tokio::time::sleep(GONE_BACKOFF).await;
                }
                other => break other?,
            }
        };
        present
            .into_iter()
            .map(|(hash, chunk)| {
                let id = ChunkHash(Sha256Hash::from_bytes(hash));
                let stored = StoredFrame {
                    hash: Sha256Hash::from_bytes(chunk.frame_hash),
                    size: small(id, "stored size", chunk.stored_size)?,
                    place: place(chunk.pack),
                };
                Ok((id, stored))
            })
            .collect()
    }
}

impl ChunkIndex for MetaIndex<'_> {
    async fn lookup(&self, ids: &[ChunkHash]) -> Result<HashMap<ChunkHash, StoredFrame>, BoxError> {
        let unknown: Vec<ChunkHash> = ids
            .iter()
            .filter(|id| !self.known.contains_key(id))
            .copied()
            .collect();
        let mut present = if unknown.is_empty() {
            HashMap::new()
        } else {
            self.present(&unknown).await?
        };
        present.extend(
            ids.iter()
                .filter_map(|id| Some((*id, (*self.known.get(id)?)?))),
        );
        Ok(present)
    }
}

/// A chunk's place as the store names it.
fn place(pack: Option<PackPlace>) -> ChunkPlace {
    match pack {
        None => ChunkPlace::Object,
        Some(p) => ChunkPlace::Pack {
            pack: PackId(p.pack),
            offset: p.offset,
        },
    }
}

/// A blob's manifest as the metadata records it.
fn new_blob(ingested: &Ingested) -> NewBlob {
    let manifest = &ingested.manifest;
    NewBlob {
        hash: *manifest.hash.as_bytes(),
        size: manifest.size,
        file_hash: *manifest.file_hash.as_bytes(),
        file_size: manifest.file_size,
        chunks: manifest
            .chunks
            .iter()
            .map(|c| new_chunk_ref(c, ingested.uploaded.contains(&c.id)))
            .collect(),
        packs: new_packs(&ingested.packs),
    }
}

/// Packs as the metadata records them.
pub fn new_packs(packs: &[PackInfo]) -> Vec<NewPack> {
    packs
        .iter()
        .map(|p| NewPack {
            key: p.id.0,
            size: p.size,
        })
        .collect()
}

/// A chunk of the store's manifest as the metadata records it.
pub fn new_chunk_ref(c: &ChunkRef, uploaded: bool) -> NewChunkRef {
    NewChunkRef {
        hash: *c.id.as_bytes(),
        size: u64::from(c.size),
        stored_size: u64::from(c.stored_size),
        compression: ChunkCompression::Zstd,
        offset: c.offset,
        file_offset: c.file_offset,
        frame_hash: *c.frame_hash.as_bytes(),
        uploaded,
        pack: pack_place(c.place),
    }
}

/// A store place as the metadata records it: the inverse of [`place`].
pub fn pack_place(place: ChunkPlace) -> Option<PackPlace> {
    match place {
        ChunkPlace::Object => None,
        ChunkPlace::Pack { pack, offset } => Some(PackPlace {
            pack: pack.0,
            offset,
        }),
    }
}

/// What a writer learns of its committed upload.
fn stored(ingested: &Ingested, commit: BlobCommit) -> StoredBlob {
    let manifest = &ingested.manifest;
    let mut counted = HashSet::new();
    let new_bytes = manifest
        .chunks
        .iter()
        .filter(|c| ingested.uploaded.contains(&c.id) && counted.insert(c.id))
        .map(|c| u64::from(c.size))
        .sum();
    StoredBlob {
        id: commit.blob_id,
        hash: manifest.hash,
        size: manifest.size,
        file_hash: manifest.file_hash,
        file_size: manifest.file_size,
        deduplicated: commit.already_existed,
        new_bytes: if commit.already_existed { 0 } else { new_bytes },
    }
}

/// Checks an upload's hash and size against what its writer promised.
fn check(expect: Expect, hash: Sha256Hash, size: u64) -> Result<(), BlobError> {
    if let Some(expected) = expect.size.filter(|s| *s != size) {
        return Err(BlobError::SizeMismatch {
            expected,
            actual: size,
        });
    }
    if let Some(expected) = expect.hash.filter(|h| *h != hash) {
        return Err(BlobError::HashMismatch {
            expected,
            actual: hash,
        });
    }
    Ok(())
}

/// Reads and hashes an upload of content that is stored already: the writer
/// must show it has the bytes, not just their hash, before it may reference
/// the blob (a hash alone would let anyone with push access to one cache
/// claim any blob of another).
async fn prove<S, E>(input: S, expect: Expect, blob: &Blob) -> Result<StoredBlob, BlobError>
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: Into<BoxError>,
{
    let mut input = std::pin::pin!(input);
    let mut hasher = garret_nix::Sha256Hasher::new();
    while let Some(bytes) = input.next().await {
        let bytes = bytes.map_err(|e| StoreError::Input(e.into()))?;
        hasher.update(&bytes);
        if let Some(limit) = expect.max_size.filter(|l| hasher.len() > *l) {
            return Err(StoreError::TooLarge { limit }.into());
        }
    }
    let (hash, size) = hasher.finish();
    check(expect, hash, size)?;
    Ok(StoredBlob {
        id: blob.id,
        hash,
        size,
        file_hash: Sha256Hash::from_bytes(blob.file_hash),
        file_size: blob.file_size,
        deduplicated: true,
        new_bytes: 0,
    })
}

/// A chunk size from a row. Chunks and their frames are far below 4 GiB, so
/// a size that does not fit a `u32` is a corrupt row: the request fails with
/// an error (and the row can be repaired), it does not panic.
fn small(id: ChunkHash, what: &str, value: u64) -> Result<u32, MetaError> {
    u32::try_from(value).map_err(|_| {
        MetaError::Corrupt(format!(
            "chunk {} has a {what} of {value} bytes",
            id.0.to_hex()
        ))
    })
}

/// A chunk row as the store wants it.
pub fn chunk_ref(c: &BlobChunk) -> Result<ChunkRef, BlobError> {
    let id = ChunkHash(Sha256Hash::from_bytes(c.chunk.hash));
    Ok(ChunkRef {
        id,
        offset: c.offset,
        size: small(id, "size", c.chunk.size)?,
        file_offset: c.file_offset,
        stored_size: small(id, "stored size", c.chunk.stored_size)?,
        frame_hash: Sha256Hash::from_bytes(c.chunk.frame_hash),
        place: place(c.chunk.pack),
    })
}

impl Blobs {
    pub fn new(store: Store, meta: Meta) -> Self {
        Self { store, meta }
    }

    /// The metrics its store records into, which count its uploads too.
    pub fn metrics(&self) -> &Metrics {
        self.store.backend().metrics()
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Stores `input` and commits it as a blob if it matches `expect`.
    ///
    /// The blob starts unreferenced: the caller must point a Nix object or a
    /// CAS entry at it within the metadata's grace period, or GC takes it.
    ///
    /// When `expect.hash` names a blob that exists already, the input is only
    /// hashed (proof of possession) and nothing is written. When the upload
    /// fails, the packs it wrote are deleted again, so a refused upload
    /// leaves no trace in storage either.
    pub async fn put<S, E>(&self, input: S, expect: Expect) -> Result<StoredBlob, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BoxError>,
    {
        if let Some(hash) = expect.hash
            && let Some(blob) = self.meta.lease_blob(hash.as_bytes(), unix_now()).await?
        {
            let _in_flight = self.metrics().upload_started();
            return self.counted(prove(input, expect, &blob).await);
        }
        // Boxed, like the store's ingest inside: callers nest this deeply.
        Box::pin(self.put_after(Vec::new(), input, expect, &())).await
    }

    /// [`Blobs::put`] of an upload whose first chunks, `prefix`, an earlier
    /// attempt stored; `checkpoint` records durable progress so that this
    /// attempt can be resumed in turn. Packs a record covers are no longer
    /// this upload's to clean up when it fails: the metadata names them.
    pub async fn put_after<S, E>(
        &self,
        prefix: Vec<ChunkRef>,
        input: S,
        expect: Expect,
        checkpoint: &impl Checkpoint,
    ) -> Result<StoredBlob, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BoxError>,
    {
        let _in_flight = self.metrics().upload_started();
        let now = unix_now();
        let index = MetaIndex::new(&self.meta, now);
        // A failed ingest removes what it wrote itself. Boxed: the ingest's
        // state machine is large and deep, and callers nest it further.
        let ingested =
            Box::pin(
                self.store
                    .ingest_after(prefix, input, &index, expect.max_size, checkpoint),
            )
            .await?;
        let result = self.commit(&ingested, expect, now).await;
        let unused = match &result {
            Ok(stored) => stored.deduplicated,
            // A database error may have come after the commit took effect
            // (a connection lost on COMMIT): the packs may be named, so they
            // are left to GC, which checks.
            Err(BlobError::Meta(MetaError::Database(_))) => false,
            Err(_) => true,
        };
        if unused {
            self.store.discard(&ingested.packs).await;
        }
        self.counted(result)
    }

    /// Counts a stored upload's bytes, new and deduplicated.
    fn counted(&self, stored: Result<StoredBlob, BlobError>) -> Result<StoredBlob, BlobError> {
        if let Ok(blob) = &stored {
            self.metrics().uploaded(blob.size, blob.new_bytes);
        }
        stored
    }

    /// Checks an ingested upload against `expect` and records it.
    async fn commit(
        &self,
        ingested: &Ingested,
        expect: Expect,
        now: i64,
    ) -> Result<StoredBlob, BlobError> {
        check(expect, ingested.manifest.hash, ingested.manifest.size)?;
        let commit = self.meta.commit_blob(&new_blob(ingested), now).await?;
        Ok(stored(ingested, commit))
    }

    /// Stores several small blobs, as one BatchUpdateBlobs request sends
    /// them: their new chunks share packs made durable by one barrier, and
    /// the blobs are committed in one metadata transaction, instead of one
    /// of each per blob. Each entry gets its own result; an error of a step
    /// they share (the barrier) fails them all.
    ///
    /// Unlike [`Blobs::put`], content stored already is ingested again
    /// (its chunks are found and not stored twice) rather than leased blob
    /// by blob: a lease is a write transaction of its own.
    pub async fn put_batch(
        &self,
        entries: Vec<(Bytes, Expect)>,
    ) -> Result<Vec<Result<StoredBlob, BlobError>>, BlobError> {
        let _in_flight = self.metrics().upload_started();
        let now = unix_now();
        let mut index = MetaIndex::new(&self.meta, now);
        // A blob no larger than the smallest chunk is one chunk named by the
        // blob's own hash: the digests the client sent (checked later)
        // name them all, for one lookup.
        let min_chunk = u64::from(self.store.config().chunker.min_size);
        let singles: Vec<ChunkHash> = entries
            .iter()
            .filter(|(data, _)| data.len() as u64 <= min_chunk)
            .filter_map(|(_, expect)| expect.hash.map(ChunkHash))
            .collect();
        index.prefetch(&singles).await?;
        let mut batch = self.store.batch();
        let mut ingested = Vec::with_capacity(entries.len());
        for (data, expect) in entries {
            let input =
                futures::stream::once(async move { Ok::<_, std::convert::Infallible>(data) });
            let one = Box::pin(
                self.store
                    .ingest_in(&mut batch, input, &index, expect.max_size),
            )
            .await
            .map_err(BlobError::from)
            .and_then(|i| {
                check(expect, i.manifest.hash, i.manifest.size)?;
                Ok(i)
            });
            ingested.push(one);
        }
        let packs = batch.finish().await?;
        let mut blobs = Vec::new();
        for one in ingested.iter().flatten() {
            let mut blob = new_blob(one);
            blob.packs = new_packs(&packs);
            blobs.push(blob);
        }
        let commits = match self.meta.commit_blobs(&blobs, now).await {
            Ok(commits) => commits.into_iter().map(Ok).collect(),
            // One blob the batch cannot record (a chunk collected meanwhile)
            // must not fail the others: commit them one by one.
            Err(error) if !matches!(error, MetaError::Database(_)) => {
                let mut each = Vec::with_capacity(blobs.len());
                for blob in &blobs {
                    each.push(self.meta.commit_blob(blob, now).await);
                }
                each
            }
            Err(error) => return Err(error.into()),
        };
        if !commits
            .iter()
            .any(|c| matches!(c, Ok(c) if !c.already_existed))
        {
            self.store.discard(&packs).await;
        }
        let mut commits = commits.into_iter();
        Ok(ingested
            .into_iter()
            .map(|one| {
                let one = one?;
                let commit = commits.next().expect("one commit per ingested blob")?;
                self.counted(Ok(stored(&one, commit)))
            })
            .collect())
    }

    /// Streams `range` of a blob's content. A chunk missing from the backend
    /// ends the stream with an error, never with a short clean end.
    pub async fn read(
        &self,
        blob: BlobId,
        range: Range<u64>,
    ) -> Result<impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static, BlobError> {
        let chunks = self
            .chunks(blob, ChunkRange::Content(range.clone()))
            .await?;
        Ok(self.store.read(chunks, range))
    }

    /// Streams `range` of a blob's stored frames (its zstd file), unchanged.
    pub async fn read_frames(
        &self,
        blob: BlobId,
        range: Range<u64>,
    ) -> Result<impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static, BlobError> {
        let chunks = self.chunks(blob, ChunkRange::File(range.clone())).await?;
        Ok(self.store.read_frames(chunks, range))
    }

    /// The chunks overlapping `range`, as the store wants them.
    async fn chunks(&self, blob: BlobId, range: ChunkRange) -> Result<Vec<ChunkRef>, BlobError> {
        let chunks = self.meta.blob_chunks(blob, Some(range)).await?;
        chunks.iter().map(chunk_ref).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(size: u64, stored_size: u64) -> BlobChunk {
        BlobChunk {
            seq: 0,
            offset: 0,
            file_offset: 0,
            chunk: garret_meta::Chunk {
                id: garret_meta::ChunkId(1),
                hash: [7; 32],
                size,
                stored_size,
                frame_hash: [8; 32],
                compression: ChunkCompression::Zstd,
                pack: None,
            },
        }
    }

    #[test]
    fn an_oversized_chunk_row_is_an_error_not_a_panic() {
        assert!(chunk_ref(&row(65_536, 1000)).is_ok());
        for bad in [row(1 << 40, 1000), row(1000, u64::MAX)] {
            assert!(matches!(
                chunk_ref(&bad),
                Err(BlobError::Meta(MetaError::Corrupt(_)))
            ));
        }
    }
}
