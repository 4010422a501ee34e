//! Blobs: the chunk store and the metadata, tied together.
//!
//! Both protocols store content through here. The store makes every chunk
//! durable, the expected digest is checked, and only then is the blob
//! committed in one metadata transaction, so a failed or lying upload leaves
//! nothing visible. Reads look the chunks up by range and stream them.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use garret_meta::{
    BlobChunk, BlobId, ChunkRange, Compression, Meta, MetaError, NewBlob, NewChunkRef,
};
use garret_nix::Sha256Hash;

use crate::clock::unix_now;
use garret_store::{
    Backend, ChunkId, ChunkIndex, ChunkRef, ChunkStore, Ingested, Manifest, StoreError,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
}

/// The chunked store plus its metadata.
#[derive(Debug, Clone)]
pub struct Blobs {
    store: ChunkStore<Backend>,
    meta: Meta,
}

/// The metadata seen as the store's chunk index, at one point in time.
struct MetaIndex<'a> {
    meta: &'a Meta,
    now: i64,
}

impl ChunkIndex for MetaIndex<'_> {
    async fn lookup(&self, ids: &[ChunkId]) -> Result<HashMap<ChunkId, Sha256Hash>, BoxError> {
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
        Ok(present
            .into_iter()
            .map(|(id, frame)| {
                (
                    ChunkId(Sha256Hash::from_bytes(id)),
                    Sha256Hash::from_bytes(frame),
                )
            })
            .collect())
    }
}

fn new_blob(manifest: &Manifest, uploaded: &dyn Fn(ChunkId) -> bool) -> NewBlob {
    NewBlob {
        hash: *manifest.hash.as_bytes(),
        size: manifest.size,
        file_hash: *manifest.file_hash.as_bytes(),
        file_size: manifest.file_size,
        chunks: manifest
            .chunks
            .iter()
            .map(|c| NewChunkRef {
                hash: *c.id.as_bytes(),
                size: u64::from(c.size),
                stored_size: u64::from(c.stored_size),
                compression: Compression::Zstd,
                offset: c.offset,
                file_offset: c.file_offset,
                frame_hash: *c.frame_hash.as_bytes(),
                uploaded: uploaded(c.id),
            })
            .collect(),
    }
}

fn chunk_ref(c: &BlobChunk) -> ChunkRef {
    ChunkRef {
        id: ChunkId(Sha256Hash::from_bytes(c.chunk.hash)),
        offset: c.offset,
        size: u32::try_from(c.chunk.size).expect("chunks are at most 16 MiB"),
        file_offset: c.file_offset,
        stored_size: u32::try_from(c.chunk.stored_size).expect("frames are small"),
        frame_hash: Sha256Hash::from_bytes(c.chunk.frame_hash),
    }
}

impl Blobs {
    pub fn new(store: ChunkStore<Backend>, meta: Meta) -> Self {
        Self { store, meta }
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
    pub async fn put<S, E>(&self, input: S, expect: Expect) -> Result<StoredBlob, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BoxError>,
    {
        let now = unix_now();
        let index = MetaIndex {
            meta: &self.meta,
            now,
        };
        let Ingested { manifest, uploaded } =
            self.store.ingest(input, &index, expect.max_size).await?;
        if let Some(expected) = expect.size.filter(|s| *s != manifest.size) {
            return Err(BlobError::SizeMismatch {
                expected,
                actual: manifest.size,
            });
        }
        if let Some(expected) = expect.hash.filter(|h| *h != manifest.hash) {
            return Err(BlobError::HashMismatch {
                expected,
                actual: manifest.hash,
            });
        }
        let blob = new_blob(&manifest, &|id| uploaded.contains(&id));
        let commit = self.meta.commit_blob(&blob, now).await?;
        Ok(StoredBlob {
            id: commit.blob_id,
            hash: manifest.hash,
            size: manifest.size,
            file_hash: manifest.file_hash,
            file_size: manifest.file_size,
            deduplicated: commit.already_existed,
        })
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
        Ok(chunks.iter().map(chunk_ref).collect())
    }
}
