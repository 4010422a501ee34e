//! garret's data plane: blobs cut into content-defined chunks, each stored as
//! one zstd frame in an object store, and streamed back whole or by range.
//!
//! This crate knows no SQL. Which chunks exist is asked through the
//! [`ChunkIndex`] seam, which the metadata layer implements, and the
//! [`Manifest`] an ingest returns is what the caller commits.

pub mod backend;
pub mod chunk;
pub mod chunker;
pub mod codec;
mod error;
mod ingest;
mod pack;
mod read;
mod repack;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use backend::{Backend, FsBackend, Listed, ObjectStore, ObjectWriter, S3Backend, S3Config};
pub use chunk::{ChunkHash, ChunkPlace, ChunkRef, Manifest, PackId, PackInfo};
pub use chunker::{Chunker, ChunkerConfig};
pub use error::StoreError;
pub use ingest::{Batch, Checkpoint, ChunkIndex, Ingested, StoredFrame};
pub use repack::Repacked;

use std::sync::Arc;

/// Tuning knobs of the chunk store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub chunker: ChunkerConfig,
    pub zstd_level: i32,
    /// Chunks hashed at once; about one per core keeps every core busy.
    pub hash_concurrency: usize,
    /// Frames being compressed or fetched at once, per upload: keeps the
    /// cores busy and hides object-store latency.
    pub upload_concurrency: usize,
    /// Chunks asked about per index query: one round trip per batch, never one
    /// per chunk.
    ///
    /// The chunks of a lookup batch and those being compressed are what an
    /// upload holds in memory: 16 and 8 (rather than 64 and 16) took the
    /// peak RSS of 32 concurrent uploads from 411 to 298 MiB at the same
    /// throughput (BENCHMARKS.md).
    pub lookup_batch: usize,
    /// Bytes a pack grows to before it is sealed and the next one started.
    pub pack_size: u64,
    /// Most bytes one ranged read of a pack fetches: adjacent frames are read
    /// together up to this.
    pub read_run_bytes: u64,
    /// Ranged reads fetched ahead of the reader.
    pub read_prefetch: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        Self {
            chunker: ChunkerConfig::default(),
            zstd_level: codec::DEFAULT_LEVEL,
            hash_concurrency: cores + 1,
            upload_concurrency: 8,
            lookup_batch: 16,
            pack_size: 16 << 20,
            read_run_bytes: 1 << 20,
            read_prefetch: 4,
        }
    }
}

/// The chunked blob store over one object-store backend.
#[derive(Debug, Clone)]
pub struct ChunkStore<B> {
    backend: B,
    chunker: Arc<Chunker>,
    config: StoreConfig,
}

impl<B: ObjectStore + Clone + 'static> ChunkStore<B> {
    pub fn new(backend: B, config: StoreConfig) -> Self {
        Self {
            backend,
            chunker: Arc::new(Chunker::new(config.chunker)),
            config,
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Deletes packs an ingest wrote that no metadata names (the upload
    /// failed, or was refused after its ingest).
    pub async fn discard(&self, packs: &[PackInfo]) {
        pack::discard(&self.backend, packs).await;
    }
}
