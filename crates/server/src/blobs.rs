//! Blobs: the chunk store and the metadata, tied together.
//!
//! Both protocols store content through here. The store makes every chunk
//! durable, the expected digest is checked, and only then is the blob
//! committed in one metadata transaction, so a failed or lying upload leaves
//! nothing visible. Reads look the chunks up by range and stream them.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::BoxError;
use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use garret_meta::{
    Blob, BlobChunk, BlobId, ChunkCompression, ChunkRange, Meta, MetaError, NewBlob, NewChunkRef,
};
use garret_nix::Sha256Hash;

use crate::clock::unix_now;
use garret_store::{
    Backend, Checkpoint, ChunkHash, ChunkIndex, ChunkRef, ChunkStore, Ingested, Manifest,
    StoreError,
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

/// The chunked store plus its metadata.
#[derive(Debug, Clone)]
pub struct Blobs {
    store: ChunkStore<Backend>,
    meta: Meta,
    in_flight: Arc<Mutex<InFlight>>,
}

/// New chunks that live uploads in this process are writing. A failed
/// upload removes only the chunks no other live upload is also writing, and
/// while it removes them no upload may start writing them, so a concurrent
/// writer of the same content never loses its object to someone else's
/// cleanup. (Across replicas the metadata's `deleting` mark makes that
/// writer fail with a retryable error instead.)
#[derive(Debug, Default)]
struct InFlight {
    writers: HashMap<[u8; 32], usize>,
    discarding: HashSet<[u8; 32]>,
}

/// The metadata seen as the store's chunk index, at one point in time.
/// Registers the chunks it reports missing in [`InFlight`] and unregisters
/// them when dropped, however the upload ends.
struct MetaIndex<'a> {
    meta: &'a Meta,
    now: i64,
    in_flight: &'a Mutex<InFlight>,
    /// Every chunk reported missing: this ingest writes those objects, and
    /// must clean them up if it fails.
    missing: Mutex<Vec<[u8; 32]>>,
}

impl Drop for MetaIndex<'_> {
    fn drop(&mut self) {
        let missing = self.missing.get_mut().expect("no panics while locked");
        let mut in_flight = self.in_flight.lock().expect("no panics while locked");
        for hash in missing.iter() {
            if let Some(n) = in_flight.writers.get_mut(hash) {
                *n -= 1;
                if *n == 0 {
                    in_flight.writers.remove(hash);
                }
            }
        }
    }
}

impl ChunkIndex for MetaIndex<'_> {
    async fn lookup(&self, ids: &[ChunkHash]) -> Result<HashMap<ChunkHash, Sha256Hash>, BoxError> {
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
        let missing: Vec<[u8; 32]> = hashes
            .iter()
            .filter(|h| !present.contains_key(*h))
            .copied()
            .collect();
        // Wait out a failed upload that is removing some of these objects:
        // once it is done they are gone, and this upload writes them anew.
        loop {
            {
                let mut in_flight = self.in_flight.lock().expect("no panics while locked");
                if !missing.iter().any(|h| in_flight.discarding.contains(h)) {
                    for hash in &missing {
                        *in_flight.writers.entry(*hash).or_default() += 1;
                    }
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.missing
            .lock()
            .expect("no panics while locked")
            .extend(missing);
        Ok(present
            .into_iter()
            .map(|(id, frame)| {
                (
                    ChunkHash(Sha256Hash::from_bytes(id)),
                    Sha256Hash::from_bytes(frame),
                )
            })
            .collect())
    }
}

fn new_blob(manifest: &Manifest, uploaded: &dyn Fn(ChunkHash) -> bool) -> NewBlob {
    NewBlob {
        hash: *manifest.hash.as_bytes(),
        size: manifest.size,
        file_hash: *manifest.file_hash.as_bytes(),
        file_size: manifest.file_size,
        chunks: manifest
            .chunks
            .iter()
            .map(|c| new_chunk_ref(c, uploaded(c.id)))
            .collect(),
    }
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

/// A chunk row as the store wants it. Chunks and their frames are far below
/// 4 GiB, so a size that does not fit a `u32` is a corrupt row: the request
/// fails with an error (and the row can be repaired), it does not panic.
pub fn chunk_ref(c: &BlobChunk) -> Result<ChunkRef, BlobError> {
    let id = ChunkHash(Sha256Hash::from_bytes(c.chunk.hash));
    let small = |what: &str, value: u64| {
        u32::try_from(value).map_err(|_| {
            BlobError::Meta(MetaError::Corrupt(format!(
                "chunk {} has a {what} of {value} bytes",
                id.0.to_hex()
            )))
        })
    };
    Ok(ChunkRef {
        id,
        offset: c.offset,
        size: small("size", c.chunk.size)?,
        file_offset: c.file_offset,
        stored_size: small("stored size", c.chunk.stored_size)?,
        frame_hash: Sha256Hash::from_bytes(c.chunk.frame_hash),
    })
}

impl Blobs {
    pub fn new(store: ChunkStore<Backend>, meta: Meta) -> Self {
        Self {
            store,
            meta,
            in_flight: Arc::default(),
        }
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    pub fn store(&self) -> &ChunkStore<Backend> {
        &self.store
    }

    /// Stores `input` and commits it as a blob if it matches `expect`.
    ///
    /// The blob starts unreferenced: the caller must point a Nix object or a
    /// CAS entry at it within the metadata's grace period, or GC takes it.
    ///
    /// When `expect.hash` names a blob that exists already, the input is only
    /// hashed (proof of possession) and nothing is written. When the upload
    /// fails, the chunk objects it wrote that no blob uses are deleted again,
    /// so a refused upload leaves no trace in storage either.
    pub async fn put<S, E>(&self, input: S, expect: Expect) -> Result<StoredBlob, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BoxError>,
    {
        if let Some(hash) = expect.hash
            && let Some(blob) = self.meta.lease_blob(hash.as_bytes(), unix_now()).await?
        {
            return prove(input, expect, &blob).await;
        }
        self.put_after(Vec::new(), input, expect, &()).await
    }

    /// [`Blobs::put`] of an upload whose first chunks, `prefix`, an earlier
    /// attempt stored; `checkpoint` records durable progress so that this
    /// attempt can be resumed in turn. Chunks a record covers are no longer
    /// this upload's to clean up when it fails: they have a row.
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
        let now = unix_now();
        let index = MetaIndex {
            meta: &self.meta,
            now,
            in_flight: &self.in_flight,
            missing: Mutex::default(),
        };
        let result = self.ingest(prefix, input, expect, &index, checkpoint).await;
        if let Err(error) = &result {
            let missing = index
                .missing
                .lock()
                .expect("no panics while locked")
                .clone();
            tracing::debug!(%error, chunks = missing.len(), "upload failed; removing its unrecorded chunks");
            if let Err(cleanup) = self.discard(missing, now).await {
                tracing::warn!(%cleanup, "could not remove the chunks of a failed upload; GC will");
            }
        }
        result
    }

    async fn ingest<S, E>(
        &self,
        prefix: Vec<ChunkRef>,
        input: S,
        expect: Expect,
        index: &MetaIndex<'_>,
        checkpoint: &impl Checkpoint,
    ) -> Result<StoredBlob, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BoxError>,
    {
        let Ingested { manifest, uploaded } = self
            .store
            .ingest_after(prefix, input, index, expect.max_size, checkpoint)
            .await?;
        check(expect, manifest.hash, manifest.size)?;
        let blob = new_blob(&manifest, &|id| uploaded.contains(&id));
        let commit = self.meta.commit_blob(&blob, index.now).await?;
        let mut counted = HashSet::new();
        let new_bytes = manifest
            .chunks
            .iter()
            .filter(|c| uploaded.contains(&c.id) && counted.insert(c.id))
            .map(|c| u64::from(c.size))
            .sum();
        Ok(StoredBlob {
            id: commit.blob_id,
            hash: manifest.hash,
            size: manifest.size,
            file_hash: manifest.file_hash,
            file_size: manifest.file_size,
            deduplicated: commit.already_existed,
            new_bytes: if commit.already_existed { 0 } else { new_bytes },
        })
    }

    /// Deletes the objects of chunks a failed upload wrote, unless some blob
    /// was committed with them meanwhile (see
    /// [`Meta::claim_unrecorded_chunks`] for why this is safe against
    /// concurrent writers).
    async fn discard(&self, mut missing: Vec<[u8; 32]>, now: i64) -> Result<(), BlobError> {
        missing.sort_unstable();
        missing.dedup();
        {
            // Only chunks no other live upload writes (this one counts once).
            let mut in_flight = self.in_flight.lock().expect("no panics while locked");
            missing.retain(|h| in_flight.writers.get(h) == Some(&1));
            in_flight.discarding.extend(missing.iter().copied());
        }
        let result = self.remove_unrecorded(&missing, now).await;
        let mut in_flight = self.in_flight.lock().expect("no panics while locked");
        for hash in &missing {
            in_flight.discarding.remove(hash);
        }
        result
    }

    async fn remove_unrecorded(&self, hashes: &[[u8; 32]], now: i64) -> Result<(), BlobError> {
        use garret_store::ObjectStore as _;
        let claimed = self.meta.claim_unrecorded_chunks(hashes, now).await?;
        for (_, hash) in &claimed {
            let key = ChunkHash(Sha256Hash::from_bytes(*hash)).object_key();
            self.store
                .backend()
                .delete(&key)
                .await
                .map_err(StoreError::Backend)?;
        }
        let ids: Vec<_> = claimed.into_iter().map(|(id, _)| id).collect();
        self.meta.gc_forget_chunks(&ids).await?;
        Ok(())
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
