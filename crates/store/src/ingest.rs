//! The write path: stream in, cut, hash, compress, upload what is missing.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::pin;

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::{Stream, StreamExt};
use garret_nix::{Sha256Hash, Sha256Hasher};
use tokio::task::JoinHandle;

use crate::error::BoxError;
use crate::{ChunkId, ChunkRef, ChunkStore, Manifest, ObjectStore, StoreError, codec};

/// Which chunks the metadata already holds.
///
/// Implemented by the metadata layer. A chunk reported present must stay
/// present until the writer that asked has committed (the metadata layer
/// leases it for a grace period), because that writer will not upload it.
pub trait ChunkIndex: Send + Sync {
    /// Returns the stored frame hash of every chunk in `ids` that is present.
    fn lookup(
        &self,
        ids: &[ChunkId],
    ) -> impl Future<Output = Result<HashMap<ChunkId, Sha256Hash>, BoxError>> + Send;
}

/// The result of an ingest: the blob's manifest, and which of its chunks this
/// ingest uploaded (the rest were already present), which the metadata commit
/// needs to tell a chunk it may insert from one that must already exist.
#[derive(Debug)]
pub struct Ingested {
    pub manifest: Manifest,
    pub uploaded: HashSet<ChunkId>,
}

/// A chunk after hashing and compression, before anyone asked whether it exists.
struct Compressed {
    id: ChunkId,
    size: u32,
    frame: Bytes,
    frame_hash: Sha256Hash,
}

fn compress_chunk(data: &Bytes, level: i32) -> Result<Compressed, StoreError> {
    let frame = codec::compress(data, level)?;
    Ok(Compressed {
        id: ChunkId::of(data),
        size: u32::try_from(data.len()).expect("chunks are at most 16 MiB"),
        frame_hash: Sha256Hash::of(&frame),
        frame,
    })
}

/// Builds the manifest in blob order while chunk uploads run concurrently.
struct Assembler<'a, B, I> {
    store: &'a ChunkStore<B>,
    index: &'a I,
    file: Sha256Hasher,
    offset: u64,
    chunks: Vec<ChunkRef>,
    uploaded: HashSet<ChunkId>,
    uploads: FuturesUnordered<JoinHandle<Result<(), StoreError>>>,
}

impl<B: ObjectStore + Clone + 'static, I: ChunkIndex> Assembler<'_, B, I> {
    async fn add_batch(&mut self, batch: Vec<Compressed>) -> Result<(), StoreError> {
        let ids: Vec<ChunkId> = batch.iter().map(|c| c.id).collect();
        let present = self.index.lookup(&ids).await.map_err(StoreError::Index)?;
        for chunk in batch {
            let (frame, frame_hash) = match present.get(&chunk.id) {
                Some(stored) if *stored == chunk.frame_hash => (chunk.frame, chunk.frame_hash),
                // Stored by another zstd build or level: the blob's file is
                // made of the stored frame, so hash that one.
                Some(_) => {
                    let stored = self
                        .store
                        .backend
                        .get(&chunk.id.object_key())
                        .await
                        .map_err(|e| StoreError::from_backend(chunk.id, e))?;
                    let hash = Sha256Hash::of(&stored);
                    (stored, hash)
                }
                None => {
                    if self.uploaded.insert(chunk.id) {
                        self.upload(chunk.id, chunk.frame.clone()).await?;
                    }
                    (chunk.frame, chunk.frame_hash)
                }
            };
            self.file.update(&frame);
            let stored_size = u32::try_from(frame.len()).expect("frames are small");
            self.chunks.push(ChunkRef {
                id: chunk.id,
                offset: self.offset,
                size: chunk.size,
                file_offset: self.file.len() - u64::from(stored_size),
                stored_size,
                frame_hash,
            });
            self.offset += u64::from(chunk.size);
        }
        Ok(())
    }

    async fn upload(&mut self, id: ChunkId, frame: Bytes) -> Result<(), StoreError> {
        while self.uploads.len() >= self.store.config.upload_concurrency {
            self.uploads.next().await.expect("uploads is not empty")??;
        }
        let backend = self.store.backend.clone();
        self.uploads.push(tokio::spawn(async move {
            backend
                .put(&id.object_key(), frame)
                .await
                .map_err(StoreError::Backend)
        }));
        Ok(())
    }

    async fn finish(mut self, whole: Sha256Hasher) -> Result<Ingested, StoreError> {
        while let Some(done) = self.uploads.next().await {
            done??;
        }
        let (hash, size) = whole.finish();
        let (file_hash, file_size) = self.file.finish();
        debug_assert_eq!(size, self.offset);
        Ok(Ingested {
            manifest: Manifest {
                hash,
                size,
                file_hash,
                file_size,
                chunks: self.chunks,
            },
            uploaded: self.uploaded,
        })
    }
}

impl<B: ObjectStore + Clone + 'static> ChunkStore<B> {
    /// Stores a stream as chunks and returns its manifest (and which chunks
    /// it uploaded) once every chunk is durable in the backend. Nothing is committed here: the caller checks
    /// the manifest (hash, size) and commits it to the metadata.
    ///
    /// Memory stays bounded whatever the blob size: one chunker window, the
    /// chunks being compressed, one lookup batch and the uploads in flight.
    /// An error from `input` aborts the ingest; chunk objects already written
    /// are harmless orphans (content-named, unreferenced) for GC to sweep.
    pub async fn ingest<S, E>(
        &self,
        input: S,
        index: &impl ChunkIndex,
        max_size: Option<u64>,
    ) -> Result<Ingested, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BoxError>,
    {
        let mut input = pin!(input);
        let window = self.chunker.window();
        let level = self.config.zstd_level;
        let mut buf = BytesMut::with_capacity(window * 2);
        let mut whole = Sha256Hasher::new();
        let mut eof = false;
        let mut compressing: FuturesOrdered<JoinHandle<Result<Compressed, StoreError>>> =
            FuturesOrdered::new();
        let mut batch = Vec::with_capacity(self.config.lookup_batch);
        let mut assembler = Assembler {
            store: self,
            index,
            file: Sha256Hasher::new(),
            offset: 0,
            chunks: Vec::new(),
            uploaded: HashSet::new(),
            uploads: FuturesUnordered::new(),
        };

        loop {
            while !eof && buf.len() < window {
                match input.next().await {
                    Some(Ok(bytes)) => {
                        whole.update(&bytes);
                        if let Some(limit) = max_size.filter(|l| whole.len() > *l) {
                            return Err(StoreError::TooLarge { limit });
                        }
                        buf.extend_from_slice(&bytes);
                    }
                    Some(Err(e)) => return Err(StoreError::Input(e.into())),
                    None => eof = true,
                }
            }
            if buf.is_empty() {
                break;
            }
            while !buf.is_empty() && (eof || buf.len() >= window) {
                let len = self.chunker.cut(&buf[..buf.len().min(window)]);
                let data = buf.split_to(len).freeze();
                compressing.push_back(tokio::task::spawn_blocking(move || {
                    compress_chunk(&data, level)
                }));
                while compressing.len() >= self.config.compress_concurrency {
                    batch.push(compressing.next().await.expect("queue is not empty")??);
                    if batch.len() >= self.config.lookup_batch {
                        assembler.add_batch(std::mem::take(&mut batch)).await?;
                    }
                }
            }
        }
        while let Some(done) = compressing.next().await {
            batch.push(done??);
        }
        if !batch.is_empty() {
            assembler.add_batch(batch).await?;
        }
        assembler.finish(whole).await
    }
}
