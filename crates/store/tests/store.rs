//! The chunk store against both real backends: the local filesystem and an S3
//! protocol server (s3s-fs) over loopback HTTP with SigV4.

// Test data is indexed by u64 offsets on 64-bit hosts.
#![allow(clippy::cast_possible_truncation)]

use std::collections::HashSet;
use std::ops::Range;
use std::path::PathBuf;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use garret_nix::Sha256Hash;
use garret_store::backend::{BackendError, put};
use garret_store::testing::{MemoryIndex, S3TestServer, body, text};
use garret_store::{
    Backend, ChunkPlace, ChunkRef, ChunkStore, FsBackend, Manifest, ObjectStore, PackInfo,
    S3Backend, StoreConfig, StoreError,
};

/// Ingests `content` that must succeed, returning its manifest.
async fn ingest(store: &ChunkStore<Backend>, index: &MemoryIndex, content: &[u8]) -> Manifest {
    store
        .ingest(body(content), index, None)
        .await
        .unwrap()
        .manifest
}

async fn read_all(
    store: &ChunkStore<Backend>,
    m: &Manifest,
    range: Range<u64>,
) -> Result<Vec<u8>, StoreError> {
    let parts: Vec<Bytes> = store.read(m.chunks.clone(), range).try_collect().await?;
    Ok(parts.concat())
}

struct Fixture {
    store: ChunkStore<Backend>,
    /// Where the backend keeps its objects as files (both do).
    objects: PathBuf,
    _dir: tempfile::TempDir,
}

/// Small packs and short reads, so that a blob of a few MiB spans several
/// packs and every read several runs.
fn config() -> StoreConfig {
    StoreConfig {
        pack_size: 300_000,
        read_run_bytes: 150_000,
        ..StoreConfig::default()
    }
}

// Async to share the shape of `s3_store` in `both_backends!`.
#[allow(clippy::unused_async)]
async fn fs_store() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    let backend = Backend::Fs(FsBackend::new(&objects).unwrap());
    Fixture {
        store: ChunkStore::new(backend, config()),
        objects,
        _dir: dir,
    }
}

async fn s3_store() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let server = S3TestServer::start(&dir.path().join("s3"), "garret")
        .await
        .unwrap();
    let backend = Backend::S3(S3Backend::new(&server.config).unwrap());
    Fixture {
        store: ChunkStore::new(backend, config()),
        objects: dir.path().join("s3/garret"),
        _dir: dir,
    }
}

impl Fixture {
    /// Pack objects in the backend, counted on disk (temporary files and
    /// the S3 server's own bookkeeping aside).
    fn packs(&self) -> usize {
        let mut dirs = vec![self.objects.join("packs")];
        let mut n = 0;
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries {
                let entry = entry.unwrap();
                if entry.file_type().unwrap().is_dir() {
                    dirs.push(entry.path());
                } else if !entry.file_name().to_string_lossy().starts_with('.') {
                    n += 1;
                }
            }
        }
        n
    }

    /// Replaces the stored frame of `victim` by a same-sized frame of other
    /// bytes, inside its pack.
    async fn damage(&self, m: &Manifest, victim: &ChunkRef) {
        let key = victim.object_key();
        let end = m
            .chunks
            .iter()
            .filter(|c| c.object_key() == key)
            .map(|c| c.object_range().end)
            .max()
            .unwrap();
        let mut object = self
            .store
            .backend()
            .get_range(&key, 0..end)
            .await
            .unwrap()
            .to_vec();
        object[victim.object_range().start as usize + 5] ^= 0x55;
        put(self.store.backend(), &key, object.into())
            .await
            .unwrap();
    }
}

/// A manifest without where its frames are: what two writers of the same
/// content agree on.
fn content_of(m: &Manifest) -> Manifest {
    let mut m = m.clone();
    for c in &mut m.chunks {
        c.place = ChunkPlace::Object;
    }
    m
}

/// A read of the whole blob: its content, or its stored frames.
fn read_whole(
    store: &ChunkStore<Backend>,
    m: &Manifest,
    frames: bool,
) -> futures::stream::BoxStream<'static, Result<Bytes, StoreError>> {
    if frames {
        store.read_frames(m.chunks.clone(), 0..m.file_size).boxed()
    } else {
        store.read(m.chunks.clone(), 0..m.size).boxed()
    }
}

async fn exists(store: &ChunkStore<Backend>, key: &str) -> bool {
    match store.backend().get_range(key, 0..1).await {
        Ok(_) => true,
        Err(BackendError::NotFound(_)) => false,
        Err(e) => panic!("{e}"),
    }
}

/// Every test body runs against both backends.
macro_rules! both_backends {
    ($($name:ident,)*) => {
        mod fs { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::fs_store().await).await } )* }
        mod s3 { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::s3_store().await).await } )* }
    };
}

both_backends! {
    round_trips,
    range_reads_at_every_boundary,
    dedups_shared_content,
    missing_chunk_fails_loudly,
    concurrent_writers_store_once,
    streams_one_gibibyte,
    input_errors_and_limits,
    corrupt_stored_frame_is_not_reused,
    resumes_where_the_last_record_ended,
    packs_hold_many_chunks,
    corrupt_frame_inside_a_pack_is_refused,
    failed_ingest_leaves_no_pack,
    chunks_stored_before_packs_stay_readable,
}

async fn round_trips(f: Fixture) {
    let index = MemoryIndex::default();
    let max = f.store.config().chunker.max_size as usize;
    for (name, len) in [
        ("empty", 0),
        ("tiny", 1),
        ("small", 1000),
        ("one max chunk", max),
        ("max chunk + 1", max + 1),
        ("several", 5 * max + 17),
    ] {
        let content = text(len, len as u64 + 3);
        let m = ingest(&f.store, &index, &content).await;
        index.commit(&m);
        assert_eq!(m.size, len as u64, "{name}");
        assert_eq!(m.hash, Sha256Hash::of(&content), "{name}");
        assert!(m.chunks.iter().all(|c| c.size as usize <= max), "{name}");
        assert_eq!(
            read_all(&f.store, &m, 0..m.size).await.unwrap(),
            content,
            "{name}"
        );

        // The stored frames are one zstd stream whose hash is the file hash.
        let frames: Vec<Bytes> = f
            .store
            .read_frames(m.chunks.clone(), 0..m.file_size)
            .try_collect()
            .await
            .unwrap();
        let file = frames.concat();
        assert_eq!(
            (Sha256Hash::of(&file), file.len() as u64),
            (m.file_hash, m.file_size),
            "{name}"
        );
        if len == 0 {
            // No chunks, no frames: the empty blob is an empty file.
            assert!(file.is_empty() && m.chunks.is_empty());
        } else {
            assert_eq!(
                zstd::stream::decode_all(&file[..]).unwrap(),
                content,
                "{name}"
            );
        }
    }
}

async fn range_reads_at_every_boundary(f: Fixture) {
    let index = MemoryIndex::default();
    let content = text(1 << 20, 11);
    let m = ingest(&f.store, &index, &content).await;
    assert!(m.chunks.len() > 4);
    let mut points = vec![0, 1, m.size - 1, m.size];
    for c in &m.chunks {
        points.extend([
            c.offset.saturating_sub(1),
            c.offset,
            c.offset + 1,
            c.end() - 1,
            c.end(),
        ]);
    }
    points.sort_unstable();
    points.dedup();
    let around_boundaries: Vec<(u64, u64)> = points
        .windows(2)
        .map(|w| (w[0], w[1]))
        .chain(points.iter().map(|&p| (p, (p + 70_000).min(m.size))))
        .collect();
    for (start, end) in around_boundaries {
        let got = read_all(&f.store, &m, start..end).await.unwrap();
        assert_eq!(
            got,
            &content[start as usize..end as usize],
            "{start}..{end}"
        );
        // Only the overlapping chunks need be passed in, as the metadata selects them.
        let overlapping = m
            .chunks
            .iter()
            .filter(|c| c.offset < end && start < c.end())
            .copied()
            .collect();
        let parts: Vec<Bytes> = f
            .store
            .read(overlapping, start..end)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(parts.concat(), &content[start as usize..end as usize]);
    }
    // Ranges over the stored frames line up with the file.
    let whole: Vec<Bytes> = f
        .store
        .read_frames(m.chunks.clone(), 0..m.file_size)
        .try_collect()
        .await
        .unwrap();
    let whole = whole.concat();
    for c in &m.chunks {
        let (s, e) = (c.file_offset + 1, c.file_end() + 3);
        let e = e.min(m.file_size);
        let part: Vec<Bytes> = f
            .store
            .read_frames(m.chunks.clone(), s..e)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(part.concat(), &whole[s as usize..e as usize]);
    }
}

async fn dedups_shared_content(f: Fixture) {
    let index = MemoryIndex::default();
    let first = text(4 << 20, 5);
    // The second blob shares everything but a 100-byte insertion in the middle.
    let mut second = first.clone();
    second.splice(2 << 20..2 << 20, text(100, 99));
    let a = ingest(&f.store, &index, &first).await;
    index.commit(&a);
    let after_first = index.len();
    let b = ingest(&f.store, &index, &second).await;
    index.commit(&b);
    let new_chunks = index.len() - after_first;
    assert!(
        new_chunks <= 3,
        "an insertion should touch at most a few chunks, got {new_chunks} of {}",
        b.chunks.len()
    );
    // The new chunks went to one new pack; the rest are read from the first
    // blob's packs.
    let new_packs: HashSet<_> = b.chunks.iter().filter_map(ChunkRef::pack).collect();
    let old_packs: HashSet<_> = a.chunks.iter().filter_map(ChunkRef::pack).collect();
    assert_eq!(new_packs.difference(&old_packs).count(), 1);
    assert_eq!(read_all(&f.store, &b, 0..b.size).await.unwrap(), second);
}

async fn missing_chunk_fails_loudly(f: Fixture) {
    let index = MemoryIndex::default();
    let content = text(1 << 20, 21);
    let m = ingest(&f.store, &index, &content).await;
    let victim = m.chunks[m.chunks.len() / 2];
    f.store
        .backend()
        .delete(&victim.object_key())
        .await
        .unwrap();
    let first_lost = m
        .chunks
        .iter()
        .find(|c| c.pack() == victim.pack())
        .unwrap()
        .id;
    let err = read_all(&f.store, &m, 0..m.size).await.unwrap_err();
    assert!(
        matches!(err, StoreError::MissingChunk(id) if id == first_lost),
        "{err:?}"
    );
    let frames: Result<Vec<Bytes>, _> = f
        .store
        .read_frames(m.chunks.clone(), 0..m.file_size)
        .try_collect()
        .await;
    assert!(matches!(frames, Err(StoreError::MissingChunk(_))));
    // The bytes before the hole still arrive, but the stream never ends cleanly.
    let mut stream = std::pin::pin!(f.store.read(m.chunks.clone(), 0..m.size));
    let mut clean_end = true;
    while let Some(item) = stream.next().await {
        if item.is_err() {
            clean_end = false;
            break;
        }
    }
    assert!(!clean_end);

    // When the first pack is gone, the error comes before any byte.
    f.store
        .backend()
        .delete(&m.chunks[0].object_key())
        .await
        .unwrap();
    for frames in [false, true] {
        let mut stream = read_whole(&f.store, &m, frames);
        assert!(matches!(
            stream.next().await,
            Some(Err(StoreError::MissingChunk(_)))
        ));
    }
}

async fn concurrent_writers_store_once(f: Fixture) {
    let index = MemoryIndex::default();
    let content = text(2 << 20, 31);
    let (a, b) = tokio::join!(
        f.store.ingest(body(&content), &index, None),
        f.store.ingest(body(&content), &index, None)
    );
    let (a, b) = (a.unwrap().manifest, b.unwrap().manifest);
    assert_eq!(content_of(&a), content_of(&b));
    // Each wrote its own packs (neither could see the other's before it
    // committed); the index keeps the first commit's copy of each chunk, and
    // the other copy is dead space in its pack for GC.
    index.commit(&a);
    index.commit(&b);
    assert_eq!(index.len(), a.chunks.len());
    assert_eq!(read_all(&f.store, &a, 0..a.size).await.unwrap(), content);
    // A third writer finds every chunk and stores nothing.
    let packs = f.packs();
    let c = f.store.ingest(body(&content), &index, None).await.unwrap();
    assert!(c.uploaded.is_empty() && c.packs.is_empty());
    assert_eq!(c.manifest, a);
    assert_eq!(f.packs(), packs);
}

async fn streams_one_gibibyte(f: Fixture) {
    // 1 GiB made of a repeating 8 MiB pattern: the whole stream goes through
    // chunking, hashing and compression, while content-defined chunking
    // dedups the repeats so the test stays light on disk.
    const GIB: u64 = 1 << 30;
    let pattern = Bytes::from(text(8 << 20, 41));
    let pieces = (GIB / pattern.len() as u64) as usize;
    let input = stream::iter((0..pieces).map(move |_| Ok::<_, std::io::Error>(pattern.clone())));
    let index = MemoryIndex::default();
    let m = f.store.ingest(input, &index, None).await.unwrap().manifest;
    assert_eq!(m.size, GIB);
    let unique: std::collections::HashSet<_> = m.chunks.iter().map(|c| c.id).collect();
    assert!(unique.len() < 400, "{} unique chunks", unique.len());

    let pattern = text(8 << 20, 41);
    let mut hasher = garret_nix::Sha256Hasher::new();
    let mut reader = std::pin::pin!(f.store.read(m.chunks.clone(), 0..m.size));
    let mut at = 0usize;
    while let Some(part) = reader.next().await {
        let part = part.unwrap();
        let p = at % pattern.len();
        let n = part.len().min(pattern.len() - p);
        assert_eq!(&part[..n], &pattern[p..p + n]);
        hasher.update(&part);
        at += part.len();
    }
    assert_eq!(hasher.finish(), (m.hash, GIB));
}

async fn input_errors_and_limits(f: Fixture) {
    let index = MemoryIndex::default();
    let failing = stream::iter(vec![
        Ok(Bytes::from(text(300_000, 1))),
        Err(std::io::Error::other("client went away")),
    ]);
    assert!(matches!(
        f.store.ingest(failing, &index, None).await,
        Err(StoreError::Input(_))
    ));
    let content = text(100_000, 2);
    assert!(matches!(
        f.store.ingest(body(&content), &index, Some(99_999)).await,
        Err(StoreError::TooLarge { limit: 99_999 })
    ));
    assert!(
        f.store
            .ingest(body(&content), &index, Some(100_000))
            .await
            .is_ok()
    );
}

async fn corrupt_stored_frame_is_not_reused(f: Fixture) {
    let index = MemoryIndex::default();
    let content = text(1 << 20, 51);
    let m = ingest(&f.store, &index, &content).await;
    index.commit(&m);
    let victim = m.chunks[1].id;
    f.damage(&m, &m.chunks[1]).await;
    // A second writer of overlapping content fetches the stored frame of each
    // present chunk for its file hash, and refuses one that does not match.
    let err = f
        .store
        .ingest(body(&content), &index, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Corrupt { id, .. } if id == victim),
        "{err:?}"
    );
}

/// Records what an ingest reports durable, as an upload session would.
#[derive(Default)]
struct Records {
    interval: u64,
    chunks: std::sync::Mutex<Vec<garret_store::ChunkRef>>,
    uploaded: std::sync::Mutex<HashSet<garret_store::ChunkHash>>,
    packs: std::sync::Mutex<Vec<PackInfo>>,
}

impl garret_store::Checkpoint for Records {
    fn interval(&self) -> u64 {
        self.interval
    }

    async fn record(
        &self,
        chunks: &[garret_store::ChunkRef],
        uploaded: &HashSet<garret_store::ChunkHash>,
        packs: &[PackInfo],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut held = self.chunks.lock().unwrap();
        // Each record continues the last one.
        assert_eq!(
            chunks[0].offset,
            held.last().map_or(0, garret_store::ChunkRef::end)
        );
        held.extend_from_slice(chunks);
        self.uploaded.lock().unwrap().extend(uploaded);
        // Every chunk written since the last record is in a pack named now.
        for chunk in chunks.iter().filter(|c| uploaded.contains(&c.id)) {
            assert!(packs.iter().any(|p| Some(p.id) == chunk.pack()));
        }
        self.packs.lock().unwrap().extend_from_slice(packs);
        Ok(())
    }
}

async fn resumes_where_the_last_record_ended(f: Fixture) {
    // Content that repeats every MiB, so later records meet chunks that
    // earlier ones wrote.
    let content = text(1 << 20, 61).repeat(5);
    let broken_at = 3_300_000;
    let records = Records {
        interval: 1 << 20,
        ..Records::default()
    };
    // The first attempt breaks off; what it cut is recorded, in order, and
    // every recorded object is in the backend.
    let index = MemoryIndex::default();
    let failing = stream::iter(vec![
        Ok(Bytes::copy_from_slice(&content[..broken_at])),
        Err(std::io::Error::other("client went away")),
    ]);
    let err = f
        .store
        .ingest_after(Vec::new(), failing, &index, None, &records)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Input(_)), "{err}");
    let prefix = records.chunks.lock().unwrap().clone();
    let end = prefix.last().unwrap().end();
    let max_chunk = u64::from(f.store.config().chunker.max_size);
    assert!(
        end <= broken_at as u64 && end + max_chunk > broken_at as u64,
        "{end}"
    );
    for chunk in &prefix {
        assert!(records.uploaded.lock().unwrap().contains(&chunk.id));
        assert!(exists(&f.store, &chunk.object_key()).await);
    }
    // Recorded packs stay; the ones after the last record are gone.
    assert_eq!(f.packs(), records.packs.lock().unwrap().len());

    // The second attempt sends the rest; the blob is the one a single
    // upload makes, chunk for chunk.
    let resumed = f
        .store
        .ingest_after(
            prefix.clone(),
            body(&content[end as usize..]),
            &index,
            None,
            &(),
        )
        .await
        .unwrap()
        .manifest;
    let whole = ingest(&f.store, &MemoryIndex::default(), &content).await;
    assert_eq!(content_of(&resumed), content_of(&whole));
    assert_eq!(
        read_all(&f.store, &resumed, 0..resumed.size).await.unwrap(),
        content
    );

    // A prefix whose stored frame was damaged is refused, not hashed.
    f.damage(&resumed, &prefix[0]).await;
    let err = f
        .store
        .ingest_after(prefix, body(&content[end as usize..]), &index, None, &())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
}

async fn packs_hold_many_chunks(f: Fixture) {
    let index = MemoryIndex::default();
    let content = text(3 << 20, 71);
    let ingested = f.store.ingest(body(&content), &index, None).await.unwrap();
    let m = &ingested.manifest;
    let pack_size = f.store.config().pack_size;
    // Packs fill to their size (the last one less), in blob order, frame
    // after frame.
    let packs: Vec<_> = ingested.packs.iter().map(|p| p.id).collect();
    let used: Vec<_> = m
        .chunks
        .iter()
        .filter_map(ChunkRef::pack)
        .fold(Vec::new(), |mut v, p| {
            if v.last() != Some(&p) {
                v.push(p);
            }
            v
        });
    assert_eq!(used, packs);
    assert_eq!(f.packs(), packs.len());
    assert!(packs.len() > 2 && packs.len() < m.chunks.len() / 2);
    for pack in &ingested.packs {
        let frames: Vec<&ChunkRef> = m
            .chunks
            .iter()
            .filter(|c| c.pack() == Some(pack.id))
            .collect();
        let mut at = 0;
        for c in &frames {
            assert_eq!(c.object_range().start, at);
            at = c.object_range().end;
        }
        assert_eq!(at, pack.size);
        assert!(pack.size < pack_size + u64::from(f.store.config().chunker.max_size));
    }
    assert_eq!(read_all(&f.store, m, 0..m.size).await.unwrap(), content);
}

async fn corrupt_frame_inside_a_pack_is_refused(f: Fixture) {
    let index = MemoryIndex::default();
    let content = text(1 << 20, 81);
    let m = ingest(&f.store, &index, &content).await;
    let victim = m.chunks[m.chunks.len() / 2];
    assert!(
        m.chunks
            .iter()
            .any(|c| c.pack() == victim.pack() && c.id != victim.id)
    );
    f.damage(&m, &victim).await;
    for frames in [false, true] {
        let mut stream = read_whole(&f.store, &m, frames);
        let mut delivered = 0;
        let err = loop {
            match stream
                .next()
                .await
                .expect("the stream fails, it does not end")
            {
                Ok(bytes) => delivered += bytes.len() as u64,
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, StoreError::Corrupt { id, .. } if id == victim.id),
            "{err}"
        );
        // Nothing of the damaged chunk's run was handed on.
        let start = if frames {
            victim.file_offset
        } else {
            victim.offset
        };
        assert!(delivered <= start, "{delivered} > {start}");
    }
    // The chunks before it still read by range.
    let before = m.chunks[0].offset..victim.offset;
    assert_eq!(
        read_all(&f.store, &m, before.clone()).await.unwrap(),
        &content[before.start as usize..before.end as usize]
    );
}

async fn failed_ingest_leaves_no_pack(f: Fixture) {
    let index = MemoryIndex::default();
    let failing = stream::iter(vec![
        Ok(Bytes::from(text(2 << 20, 91))),
        Err(std::io::Error::other("client went away")),
    ]);
    assert!(f.store.ingest(failing, &index, None).await.is_err());
    let too_large = text(2 << 20, 92);
    assert!(
        f.store
            .ingest(body(&too_large), &index, Some(1 << 20))
            .await
            .is_err()
    );
    assert_eq!(f.packs(), 0);
    // And packs an ingest returns are the caller's to discard.
    let ingested = f
        .store
        .ingest(body(&too_large), &index, None)
        .await
        .unwrap();
    assert!(f.packs() > 0);
    f.store.discard(&ingested.packs).await;
    assert_eq!(f.packs(), 0);
}

async fn chunks_stored_before_packs_stay_readable(f: Fixture) {
    // A blob as stores wrote it before packs: one object per chunk, named by
    // the chunk's hash.
    let index = MemoryIndex::default();
    let content = text(1 << 20, 101);
    let packed = ingest(&f.store, &index, &content).await;
    let mut old = packed.clone();
    for c in &mut old.chunks {
        let frame = f
            .store
            .backend()
            .get_range(&c.object_key(), c.object_range())
            .await
            .unwrap();
        c.place = ChunkPlace::Object;
        put(f.store.backend(), &c.object_key(), frame)
            .await
            .unwrap();
    }
    f.store.discard(&ingested_packs(&packed)).await;
    assert_eq!(
        read_all(&f.store, &old, 0..old.size).await.unwrap(),
        content
    );
    let frames: Vec<Bytes> = f
        .store
        .read_frames(old.chunks.clone(), 0..old.file_size)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(Sha256Hash::of(&frames.concat()), old.file_hash);
    // A writer deduplicating against them reads them too.
    index.commit(&old);
    let again = f.store.ingest(body(&content), &index, None).await.unwrap();
    assert!(again.uploaded.is_empty());
    assert_eq!(again.manifest, old);
}

/// The packs a manifest's chunks are in.
fn ingested_packs(m: &Manifest) -> Vec<PackInfo> {
    let ids: HashSet<_> = m.chunks.iter().filter_map(ChunkRef::pack).collect();
    ids.into_iter().map(|id| PackInfo { id, size: 0 }).collect()
}
