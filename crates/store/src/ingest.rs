//! The write path: stream in, cut, hash, then compress what is missing and
//! append it to packs, while fetching the stored frames of what is present.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::pin;

use bytes::{Bytes, BytesMut};
use futures::future::{Either, Ready, ready};
use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use garret_nix::{Sha256Hash, Sha256Hasher};
use tokio::task::{JoinError, JoinHandle};

use crate::error::BoxError;
use crate::pack::Packer;
use crate::{
    ChunkHash, ChunkPlace, ChunkRef, ChunkStore, Manifest, ObjectStore, PackInfo, StoreError, codec,
};

/// A chunk the index holds: where its stored frame is and how to check it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredFrame {
    pub hash: Sha256Hash,
    pub size: u32,
    pub place: ChunkPlace,
}

/// Which chunks the metadata already holds.
///
/// Implemented by the metadata layer. A chunk reported present must stay
/// present until the writer that asked has committed (the metadata layer
/// leases it for a grace period), because that writer will not upload it.
pub trait ChunkIndex: Send + Sync {
    /// Returns the stored frame of every chunk in `ids` that is present.
    fn lookup(
        &self,
        ids: &[ChunkHash],
    ) -> impl Future<Output = Result<HashMap<ChunkHash, StoredFrame>, BoxError>> + Send;
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
    /// chunks this ingest wrote since the last record, into `packs`; the
    /// others were stored already (by others, or recorded before).
    fn record(
        &self,
        chunks: &[ChunkRef],
        uploaded: &HashSet<ChunkHash>,
        packs: &[PackInfo],
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// Ingests that cannot be resumed record nothing.
impl Checkpoint for () {
    fn interval(&self) -> u64 {
        u64::MAX
    }

    async fn record(
        &self,
        _: &[ChunkRef],
        _: &HashSet<ChunkHash>,
        _: &[PackInfo],
    ) -> Result<(), BoxError> {
        Ok(())
    }
}

/// The result of an ingest: the blob's manifest, which of its chunks this
/// ingest uploaded (the rest were already present), which the metadata commit
/// needs to tell a chunk it may insert from one that must already exist, and
/// the packs it wrote them to since its last checkpoint record. Those packs
/// are durable but named by no metadata yet: the caller commits them with
/// the blob, or hands them to [`ChunkStore::discard`].
#[derive(Debug)]
pub struct Ingested {
    pub manifest: Manifest,
    pub uploaded: HashSet<ChunkHash>,
    pub packs: Vec<PackInfo>,
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
    /// Where the frame is stored already; `None` for a frame this ingest
    /// compressed, which goes to a pack (the first time it appears).
    place: Option<ChunkPlace>,
}

/// Chunks up to this size are hashed and compressed on the task that cut
/// them: the work takes a few microseconds, less than a handoff to the
/// blocking pool and back (measured on BatchUpdateBlobs of 4 KiB blobs, where
/// those handoffs were most of the server's time).
const INLINE_BYTES: usize = 16 << 10;

/// Work on a chunk, done on the blocking pool or, for a small chunk, at once.
type Offloaded<T> = Either<JoinHandle<T>, Ready<Result<T, JoinError>>>;

fn offload<T: Send + 'static>(
    len: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> Offloaded<T> {
    if len <= INLINE_BYTES {
        Either::Right(ready(Ok(work())))
    } else {
        Either::Left(tokio::task::spawn_blocking(work))
    }
}

fn hash_chunk(data: Bytes) -> Hashed {
    Hashed {
        id: ChunkHash::of(&data),
        data,
    }
}

fn compress_chunk(chunk: &Hashed, level: i32) -> Result<Framed, StoreError> {
    let frame = codec::compress(&chunk.data, level)?;
    Ok(Framed {
        id: chunk.id,
        size: chunk_size(&chunk.data),
        frame_hash: Sha256Hash::of(&frame),
        frame,
        place: None,
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
    stored: StoredFrame,
) -> Result<Framed, StoreError> {
    let chunk = ChunkRef {
        id,
        offset: 0,
        size,
        file_offset: 0,
        stored_size: stored.size,
        frame_hash: stored.hash,
        place: stored.place,
    };
    let frame = crate::read::fetch_verified(backend, &chunk).await?;
    Ok(Framed {
        id,
        size,
        frame,
        frame_hash: stored.hash,
        place: Some(stored.place),
    })
}

/// Builds the manifest in blob order while frames are produced (compressed or
/// fetched) and uploaded concurrently.
struct Assembler<'a, B: ObjectStore, I, C> {
    store: &'a ChunkStore<B>,
    index: &'a I,
    checkpoint: &'a C,
    /// `chunks[..recorded]` are recorded by `checkpoint` (or were the
    /// resumed prefix).
    recorded: usize,
    /// Where the new chunks go: the ingest's own packs, or its batch's.
    packer: &'a mut Packer<B>,
    /// Whether the packs are this ingest's own, to make durable when it
    /// finishes; a batch makes its packs durable once, for every blob.
    own_packs: bool,
    /// Packs flushed but not yet recorded: the next record names them.
    packs: Vec<PackInfo>,
    file: Sha256Hasher,
    offset: u64,
    chunks: Vec<ChunkRef>,
    /// Chunks this ingest compressed to store, and where each went: a chunk
    /// repeated within the blob is stored once.
    uploaded: HashMap<ChunkHash, Option<ChunkPlace>>,
    framing: FuturesOrdered<Offloaded<Result<Framed, StoreError>>>,
}

impl<'a, B: ObjectStore + Clone + 'static, I: ChunkIndex, C: Checkpoint> Assembler<'a, B, I, C> {
    fn new(
        store: &'a ChunkStore<B>,
        index: &'a I,
        checkpoint: &'a C,
        prefix: &[ChunkRef],
        packer: &'a mut Packer<B>,
        own_packs: bool,
    ) -> Self {
        Self {
            store,
            index,
            checkpoint,
            recorded: prefix.len(),
            packer,
            own_packs,
            packs: Vec::new(),
            file: Sha256Hasher::new(),
            offset: prefix.last().map_or(0, ChunkRef::end),
            chunks: Vec::new(),
            uploaded: HashMap::new(),
            framing: FuturesOrdered::new(),
        }
    }

    async fn add_batch(&mut self, batch: Vec<Hashed>) -> Result<(), StoreError> {
        let ids: Vec<ChunkHash> = batch.iter().map(|c| c.id).collect();
        let present = self.index.lookup(&ids).await.map_err(StoreError::Index)?;
        let level = self.store.config.zstd_level;
        for chunk in batch {
            let task = if let Some(&stored) = present.get(&chunk.id) {
                Either::Left(tokio::spawn(fetch_frame(
                    self.store.backend.clone(),
                    chunk.id,
                    chunk_size(&chunk.data),
                    stored,
                )))
            } else {
                // A chunk repeated within this blob is compressed again
                // (zstd is deterministic) but stored once.
                self.uploaded.entry(chunk.id).or_default();
                offload(chunk.data.len(), move || compress_chunk(&chunk, level))
            };
            self.framing.push_back(task);
            while self.framing.len() >= self.store.config.upload_concurrency {
                let framed = self.framing.next().await.expect("framing is not empty")??;
                self.place(framed).await?;
            }
        }
        Ok(())
    }

    /// Appends a frame to the blob, in order, and to a pack if it is new.
    async fn place(&mut self, framed: Framed) -> Result<(), StoreError> {
        self.file.update(&framed.frame);
        let stored_size = u32::try_from(framed.frame.len()).expect("frames are small");
        let place = if let Some(place) = framed.place {
            place
        } else {
            let slot = self
                .uploaded
                .get_mut(&framed.id)
                .expect("compressed chunks are registered");
            match *slot {
                Some(place) => place,
                None => *slot.insert(self.packer.append(framed.frame).await?),
            }
        };
        self.chunks.push(ChunkRef {
            id: framed.id,
            offset: self.offset,
            size: framed.size,
            file_offset: self.file.len() - u64::from(stored_size),
            stored_size,
            frame_hash: framed.frame_hash,
            place,
        });
        self.offset += u64::from(framed.size);
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

    /// Makes every pack so far durable and records the chunks placed since
    /// the last record. Compression of later chunks goes on meanwhile.
    async fn record(&mut self) -> Result<(), StoreError> {
        let flushed = self.packer.flush().await?;
        self.packs.extend(flushed);
        if self.recorded == self.chunks.len() {
            return Ok(());
        }
        // The chunks written since the last record; a chunk written before
        // it and repeated since has its record already.
        let packs: HashSet<_> = self.packs.iter().map(|p| p.id).collect();
        let uploaded: HashSet<ChunkHash> = self.chunks[self.recorded..]
            .iter()
            .filter(|c| c.pack().is_some_and(|p| packs.contains(&p)))
            .map(|c| c.id)
            .collect();
        self.checkpoint
            .record(&self.chunks[self.recorded..], &uploaded, &self.packs)
            .await
            .map_err(StoreError::Index)?;
        self.recorded = self.chunks.len();
        self.packs.clear();
        Ok(())
    }

    fn uploaded_set(&self) -> HashSet<ChunkHash> {
        self.uploaded.keys().copied().collect()
    }

    /// Places every frame still being produced.
    async fn place_all(&mut self) -> Result<(), StoreError> {
        while let Some(framed) = self.framing.next().await {
            self.place(framed??).await?;
        }
        Ok(())
    }

    async fn finish(&mut self, whole: Sha256Hasher) -> Result<Ingested, StoreError> {
        self.place_all().await?;
        if self.own_packs {
            let flushed = self.packer.flush().await?;
            self.packs.extend(flushed);
        }
        let (hash, size) = whole.finish();
        let (file_hash, file_size) = std::mem::take(&mut self.file).finish();
        debug_assert_eq!(size, self.offset);
        Ok(Ingested {
            manifest: Manifest {
                hash,
                size,
                file_hash,
                file_size,
                chunks: std::mem::take(&mut self.chunks),
            },
            uploaded: self.uploaded_set(),
            packs: std::mem::take(&mut self.packs),
        })
    }

    /// After a failure: deletes the packs no record names (the pack being
    /// filled is dropped unfinished). Failing to delete one only leaves an
    /// orphan for GC, so that is logged, not returned.
    async fn abandon(self) {
        self.store.discard(&self.packs).await;
        self.packer.discard().await;
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
    /// An error (from `input` or the backend) aborts the ingest and deletes
    /// the packs it wrote.
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
        let mut packer = Packer::new(self.backend.clone(), self.config.pack_size);
        let mut assembler = Assembler::new(self, index, checkpoint, &prefix, &mut packer, true);
        let result = self
            .ingest_into(&mut assembler, prefix, input, max_size)
            .await;
        if result.is_err() {
            assembler.abandon().await;
        }
        result
    }

    /// Starts a batch of small blobs whose new chunks share packs.
    pub fn batch(&self) -> Batch<B> {
        Batch {
            packer: Packer::new(self.backend.clone(), self.config.pack_size),
        }
    }

    /// [`ChunkStore::ingest`] of one blob of `batch`. Its new chunks are
    /// durable, and their packs reported, only by [`Batch::finish`], so the
    /// caller commits the blob after that. A failed blob leaves its frames in
    /// the batch's pack as dead bytes, never referenced.
    pub async fn ingest_in<S, E>(
        &self,
        batch: &mut Batch<B>,
        input: S,
        index: &impl ChunkIndex,
        max_size: Option<u64>,
    ) -> Result<Ingested, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BoxError>,
    {
        let mut assembler = Assembler::new(self, index, &(), &[], &mut batch.packer, false);
        self.ingest_into(&mut assembler, Vec::new(), input, max_size)
            .await
    }

    /// The body of [`ChunkStore::ingest_after`]; an error leaves the caller
    /// to abandon what `assembler` wrote.
    async fn ingest_into<S, E>(
        &self,
        assembler: &mut Assembler<'_, B, impl ChunkIndex, impl Checkpoint>,
        prefix: Vec<ChunkRef>,
        input: S,
        max_size: Option<u64>,
    ) -> Result<Ingested, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<BoxError>,
    {
        let mut input = pin!(input);
        let window = self.chunker.window();
        let mut buf = BytesMut::with_capacity(window * 2);
        let mut whole = Sha256Hasher::new();
        self.rehash(&prefix, &mut whole, &mut assembler.file)
            .await?;
        assembler.chunks = prefix;
        let mut eof = false;
        let mut failed = None;
        let mut hashing: FuturesOrdered<Offloaded<Hashed>> = FuturesOrdered::new();
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
                hashing.push_back(offload(len, move || hash_chunk(data)));
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
                if assembler.checkpoint.interval() != u64::MAX {
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
        let mut fetched = self.fetch(prefix.to_vec(), true);
        while let Some(next) = fetched.next().await {
            let next = next?;
            file.update(&next.frame);
            whole.update(&next.content.expect("asked to decompress"));
        }
        Ok(())
    }
}

/// Small blobs stored together, as one BatchUpdateBlobs request sends them:
/// their new chunks share packs, made durable by one barrier in
/// [`Batch::finish`] instead of one per blob.
pub struct Batch<B: ObjectStore> {
    packer: Packer<B>,
}

impl<B: ObjectStore> std::fmt::Debug for Batch<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").finish_non_exhaustive()
    }
}

impl<B: ObjectStore + Clone + 'static> Batch<B> {
    /// Makes every chunk of the batch durable and returns the packs they are
    /// in, for the caller to commit with the blobs (or discard).
    pub async fn finish(mut self) -> Result<Vec<PackInfo>, StoreError> {
        let flushed = self.packer.flush().await;
        if flushed.is_err() {
            self.packer.discard().await;
        }
        flushed
    }
}
