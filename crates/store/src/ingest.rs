//! The write path: stream in, cut, hash, then compress and upload what is
//! missing while fetching the stored frames of what is present.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::pin;

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::{Stream, StreamExt};
use garret_nix::{Sha256Hash, Sha256Hasher};
use tokio::task::JoinHandle;

use crate::error::BoxError;
use crate::{ChunkHash, ChunkRef, ChunkStore, Manifest, ObjectStore, StoreError, codec};

/// Which chunks the metadata already holds.
///
/// Implemented by the metadata layer. A chunk reported present must stay
/// present until the writer that asked has committed (the metadata layer
/// leases it for a grace period), because that writer will not upload it.
pub trait ChunkIndex: Send + Sync {
    /// Returns the stored frame hash of every chunk in `ids` that is present.
    fn lookup(
        &self,
        ids: &[ChunkHash],
    ) -> impl Future<Output = Result<HashMap<ChunkHash, Sha256Hash>, BoxError>> + Send;
}

/// Told each time more of an ingest is durable, so that an interrupted
/// upload can be resumed (by this process or another) from the last record
/// instead of from the start.
///
/// Implemented by the layer that owns upload sessions. Recording must make
/// the chunks safe from garbage collection: once recorded, the ingest no
/// longer cleans them up when it fails.
pub trait Checkpoint: Send + Sync {
    /// New durable content, in bytes, worth one record; `u64::MAX` records
    /// nothing, not even when the input fails.
    fn interval(&self) -> u64;

    /// `chunks` continue the blob where the last record (or the resumed
    /// prefix) ended, and are durable in the backend. `uploaded` names the
    /// chunks this ingest wrote itself; the others were already stored.
    fn record(
        &self,
        chunks: &[ChunkRef],
        uploaded: &HashSet<ChunkHash>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// Ingests that cannot be resumed record nothing.
impl Checkpoint for () {
    fn interval(&self) -> u64 {
        u64::MAX
    }

    async fn record(&self, _: &[ChunkRef], _: &HashSet<ChunkHash>) -> Result<(), BoxError> {
        Ok(())
    }
}

/// The result of an ingest: the blob's manifest, and which of its chunks this
/// ingest uploaded (the rest were already present), which the metadata commit
/// needs to tell a chunk it may insert from one that must already exist.
#[derive(Debug)]
pub struct Ingested {
    pub manifest: Manifest,
    pub uploaded: HashSet<ChunkHash>,
}

/// A chunk cut and hashed. Whether it is compressed depends on whether the
/// store already has it: a present chunk's stored frame is fetched instead,
/// so deduplicated content costs a read, not a compression.
struct Hashed {
    id: ChunkHash,
    data: Bytes,
}

/// A chunk's stored frame, ready to take its place in the blob.
struct Framed {
    id: ChunkHash,
    size: u32,
    frame: Bytes,
    frame_hash: Sha256Hash,
    /// This ingest must upload the frame (first sight of a missing chunk).
    upload: bool,
}

fn hash_chunk(data: Bytes) -> Hashed {
    Hashed {
        id: ChunkHash::of(&data),
        data,
    }
}

fn compress_chunk(chunk: &Hashed, level: i32, upload: bool) -> Result<Framed, StoreError> {
    let frame = codec::compress(&chunk.data, level)?;
    Ok(Framed {
        id: chunk.id,
        size: chunk_size(&chunk.data),
        frame_hash: Sha256Hash::of(&frame),
        frame,
        upload,
    })
}

fn chunk_size(data: &[u8]) -> u32 {
    u32::try_from(data.len()).expect("chunks are at most 16 MiB")
}

/// Fetches the stored frame of a chunk the index reported present, checking
/// it against the recorded frame hash: a corrupt object must not become part
/// of a new blob's file.
async fn fetch_frame<B: ObjectStore>(
    backend: B,
    id: ChunkHash,
    size: u32,
    frame_hash: Sha256Hash,
) -> Result<Framed, StoreError> {
    let frame = backend
        .get(&id.object_key())
        .await
        .map_err(|e| StoreError::from_backend(id, e))?;
    if Sha256Hash::of(&frame) != frame_hash {
        return Err(StoreError::Corrupt {
            id,
            reason: "stored frame does not match its recorded hash".into(),
        });
    }
    Ok(Framed {
        id,
        size,
        frame,
        frame_hash,
        upload: false,
    })
}

/// Builds the manifest in blob order while frames are produced (compressed or
/// fetched) and uploaded concurrently.
struct Assembler<'a, B, I, C> {
    store: &'a ChunkStore<B>,
    index: &'a I,
    checkpoint: &'a C,
    /// `chunks[..recorded]` are recorded by `checkpoint` (or were the
    /// resumed prefix).
    recorded: usize,
    /// Chunks uploaded since the last record, whose objects the next record
    /// must make durable first.
    unsynced: Vec<ChunkHash>,
    file: Sha256Hasher,
    offset: u64,
    chunks: Vec<ChunkRef>,
    uploaded: HashSet<ChunkHash>,
    framing: FuturesOrdered<JoinHandle<Result<Framed, StoreError>>>,
    uploads: FuturesUnordered<JoinHandle<Result<(), StoreError>>>,
}

impl<B: ObjectStore + Clone + 'static, I: ChunkIndex, C: Checkpoint> Assembler<'_, B, I, C> {
    async fn add_batch(&mut self, batch: Vec<Hashed>) -> Result<(), StoreError> {
        let ids: Vec<ChunkHash> = batch.iter().map(|c| c.id).collect();
        let present = self.index.lookup(&ids).await.map_err(StoreError::Index)?;
        let level = self.store.config.zstd_level;
        for chunk in batch {
            let task = if let Some(&frame_hash) = present.get(&chunk.id) {
                tokio::spawn(fetch_frame(
                    self.store.backend.clone(),
                    chunk.id,
                    chunk_size(&chunk.data),
                    frame_hash,
                ))
            } else {
                // A chunk repeated within this blob is compressed again
                // (zstd is deterministic) but uploaded once.
                let upload = self.uploaded.insert(chunk.id);
                tokio::task::spawn_blocking(move || compress_chunk(&chunk, level, upload))
            };
            self.framing.push_back(task);
            while self.framing.len() >= self.store.config.upload_concurrency {
                let framed = self.framing.next().await.expect("framing is not empty")??;
                self.place(framed).await?;
            }
        }
        Ok(())
    }

    /// Appends a frame to the blob, in order, and starts its upload if needed.
    async fn place(&mut self, framed: Framed) -> Result<(), StoreError> {
        self.file.update(&framed.frame);
        let stored_size = u32::try_from(framed.frame.len()).expect("frames are small");
        self.chunks.push(ChunkRef {
            id: framed.id,
            offset: self.offset,
            size: framed.size,
            file_offset: self.file.len() - u64::from(stored_size),
            stored_size,
            frame_hash: framed.frame_hash,
        });
        self.offset += u64::from(framed.size);
        if framed.upload {
            self.upload(framed.id, framed.frame).await?;
        }
        let pending = self.offset
            - self
                .chunks
                .get(self.recorded)
                .map_or(self.offset, |c| c.offset);
        if pending >= self.checkpoint.interval() {
            self.record().await?;
        }
        Ok(())
    }

    /// Waits for every upload so far, makes them durable and records the
    /// chunks placed since the last record. Compression of later chunks
    /// goes on meanwhile; only their uploads wait.
    async fn record(&mut self) -> Result<(), StoreError> {
        self.drain_uploads().await?;
        if self.recorded == self.chunks.len() {
            return Ok(());
        }
        self.checkpoint
            .record(&self.chunks[self.recorded..], &self.uploaded)
            .await
            .map_err(StoreError::Index)?;
        self.recorded = self.chunks.len();
        Ok(())
    }

    /// Waits for every upload in flight and makes the uploaded objects
    /// durable with one barrier.
    async fn drain_uploads(&mut self) -> Result<(), StoreError> {
        while let Some(done) = self.uploads.next().await {
            done??;
        }
        let keys: Vec<String> = self.unsynced.drain(..).map(|id| id.object_key()).collect();
        if !keys.is_empty() {
            self.store
                .backend
                .sync(&keys)
                .await
                .map_err(StoreError::Backend)?;
        }
        Ok(())
    }

    async fn upload(&mut self, id: ChunkHash, frame: Bytes) -> Result<(), StoreError> {
        while self.uploads.len() >= self.store.config.upload_concurrency {
            self.uploads.next().await.expect("uploads is not empty")??;
        }
        self.unsynced.push(id);
        let backend = self.store.backend.clone();
        self.uploads.push(tokio::spawn(async move {
            backend
                .put(&id.object_key(), frame)
                .await
                .map_err(StoreError::Backend)
        }));
        Ok(())
    }

    /// Places every frame still being produced.
    async fn place_all(&mut self) -> Result<(), StoreError> {
        while let Some(framed) = self.framing.next().await {
            self.place(framed??).await?;
        }
        Ok(())
    }

    async fn finish(mut self, whole: Sha256Hasher) -> Result<Ingested, StoreError> {
        self.place_all().await?;
        self.drain_uploads().await?;
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
    /// it uploaded) once every chunk is durable in the backend. Nothing is
    /// committed here: the caller checks the manifest (hash, size) and
    /// commits it to the metadata.
    ///
    /// Memory stays bounded whatever the blob size: one chunker window, the
    /// chunks being hashed, one lookup batch, and the frames being produced
    /// and uploaded (each bounded by the configured concurrency).
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
        self.ingest_after(Vec::new(), input, index, max_size, &())
            .await
    }

    /// [`ChunkStore::ingest`] of a blob whose first chunks, `prefix`, an
    /// earlier attempt stored: `input` continues at the prefix's end, and
    /// durable progress is reported to `checkpoint` every
    /// [`Checkpoint::interval`] bytes and once more when `input` fails, so
    /// that a later attempt can continue from there.
    ///
    /// The prefix's frames are read back (and checked against their frame
    /// hashes) to restore the blob's content and file hashes. Chunk
    /// boundaries do not depend on where an attempt started: the chunker
    /// cuts by content from the last cut, every record ends at a cut, and
    /// the bytes after the last cut of a failed attempt are dropped (the
    /// client sends them again).
    pub async fn ingest_after<S, E>(
        &self,
        prefix: Vec<ChunkRef>,
        input: S,
        index: &impl ChunkIndex,
        max_size: Option<u64>,
        checkpoint: &impl Checkpoint,
    ) -> Result<Ingested, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BoxError>,
    {
        let mut input = pin!(input);
        let window = self.chunker.window();
        let mut buf = BytesMut::with_capacity(window * 2);
        let mut whole = Sha256Hasher::new();
        let mut assembler = Assembler {
            store: self,
            index,
            checkpoint,
            recorded: prefix.len(),
            unsynced: Vec::new(),
            file: Sha256Hasher::new(),
            offset: prefix.last().map_or(0, ChunkRef::end),
            chunks: Vec::new(),
            uploaded: HashSet::new(),
            framing: FuturesOrdered::new(),
            uploads: FuturesUnordered::new(),
        };
        self.rehash(&prefix, &mut whole, &mut assembler.file)
            .await?;
        assembler.chunks = prefix;
        let mut eof = false;
        let mut failed = None;
        let mut hashing: FuturesOrdered<JoinHandle<Hashed>> = FuturesOrdered::new();
        let mut batch = Vec::with_capacity(self.config.lookup_batch);

        'input: loop {
            while !eof && buf.len() < window {
                match input.next().await {
                    Some(Ok(bytes)) => {
                        whole.update(&bytes);
                        if let Some(limit) = max_size.filter(|l| whole.len() > *l) {
                            return Err(StoreError::TooLarge { limit });
                        }
                        buf.extend_from_slice(&bytes);
                    }
                    Some(Err(e)) => {
                        failed = Some(e.into());
                        break 'input;
                    }
                    None => eof = true,
                }
            }
            if buf.is_empty() {
                break;
            }
            while !buf.is_empty() && (eof || buf.len() >= window) {
                let len = self.chunker.cut(&buf[..buf.len().min(window)]);
                let data = buf.split_to(len).freeze();
                hashing.push_back(tokio::task::spawn_blocking(move || hash_chunk(data)));
                while hashing.len() >= self.config.hash_concurrency {
                    batch.push(hashing.next().await.expect("queue is not empty")?);
                    if batch.len() >= self.config.lookup_batch {
                        assembler.add_batch(std::mem::take(&mut batch)).await?;
                    }
                }
            }
        }
        while let Some(done) = hashing.next().await {
            batch.push(done?);
        }
        if !batch.is_empty() {
            assembler.add_batch(batch).await?;
        }
        match failed {
            None => assembler.finish(whole).await,
            Some(error) => {
                // Everything cut so far was cut where a whole upload would
                // cut it; keep it for the next attempt.
                if checkpoint.interval() != u64::MAX {
                    assembler.place_all().await?;
                    assembler.record().await?;
                }
                Err(StoreError::Input(error))
            }
        }
    }

    /// Feeds the stored prefix of a resumed blob to its content and file
    /// hashers, reading frames ahead as a download does.
    async fn rehash(
        &self,
        prefix: &[ChunkRef],
        whole: &mut Sha256Hasher,
        file: &mut Sha256Hasher,
    ) -> Result<(), StoreError> {
        // Owned values and spawned tasks: the future stays `Send` for
        // callers that hold it across their own awaits.
        let backend = self.backend.clone();
        let fetches = prefix.iter().copied().map(move |chunk| {
            let backend = backend.clone();
            tokio::spawn(async move {
                let framed = fetch_frame(backend, chunk.id, chunk.size, chunk.frame_hash).await?;
                let data = tokio::task::spawn_blocking(move || {
                    codec::decompress(&framed.frame, chunk.size as usize)
                        .map(|data| (framed.frame, data))
                })
                .await??;
                Ok::<_, StoreError>(data)
            })
        });
        let mut frames = futures::stream::iter(fetches).buffered(self.config.read_prefetch.max(1));
        while let Some(next) = frames.next().await {
            let (frame, data) = next??;
            file.update(&frame);
            whole.update(&data);
        }
        Ok(())
    }
}
