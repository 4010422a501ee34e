//! The chunk store against both real backends: the local filesystem and an S3
//! protocol server (s3s-fs) over loopback HTTP with SigV4.

// Test data is indexed by u64 offsets on 64-bit hosts.
#![allow(clippy::cast_possible_truncation)]

use std::ops::Range;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use garret_nix::Sha256Hash;
use garret_store::testing::{MemoryIndex, S3TestServer, body, text};
use garret_store::{
    Backend, ChunkStore, FsBackend, Manifest, ObjectStore, S3Backend, StoreConfig, StoreError,
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
    _dir: tempfile::TempDir,
}

// Async to share the shape of `s3_store` in `both_backends!`.
#[allow(clippy::unused_async)]
async fn fs_store() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::Fs(FsBackend::new(dir.path().join("objects")).unwrap());
    Fixture {
        store: ChunkStore::new(backend, StoreConfig::default()),
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
        store: ChunkStore::new(backend, StoreConfig::default()),
        _dir: dir,
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

async fn count_objects(store: &ChunkStore<Backend>, m: &Manifest) -> usize {
    let mut n = 0;
    for c in &m.chunks {
        if store.backend().exists(&c.id.object_key()).await.unwrap() {
            n += 1;
        }
    }
    n
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
    assert_eq!(count_objects(&f.store, &b).await, b.chunks.len());
    assert_eq!(read_all(&f.store, &b, 0..b.size).await.unwrap(), second);
}

async fn missing_chunk_fails_loudly(f: Fixture) {
    let index = MemoryIndex::default();
    let content = text(1 << 20, 21);
    let m = ingest(&f.store, &index, &content).await;
    let victim = m.chunks[m.chunks.len() / 2].id;
    f.store
        .backend()
        .delete(&victim.object_key())
        .await
        .unwrap();
    let err = read_all(&f.store, &m, 0..m.size).await.unwrap_err();
    assert!(
        matches!(err, StoreError::MissingChunk(id) if id == victim),
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
}

async fn concurrent_writers_store_once(f: Fixture) {
    let index = MemoryIndex::default();
    let content = text(2 << 20, 31);
    let (a, b) = tokio::join!(
        f.store.ingest(body(&content), &index, None),
        f.store.ingest(body(&content), &index, None)
    );
    let (a, b) = (a.unwrap().manifest, b.unwrap().manifest);
    assert_eq!(a, b);
    index.commit(&a);
    index.commit(&b);
    assert_eq!(index.len(), a.chunks.len());
    assert_eq!(read_all(&f.store, &a, 0..a.size).await.unwrap(), content);
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
    f.store
        .backend()
        .put(
            &victim.object_key(),
            Bytes::from_static(b"not a zstd frame"),
        )
        .await
        .unwrap();
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
    uploaded: std::sync::Mutex<std::collections::HashSet<garret_store::ChunkHash>>,
}

impl garret_store::Checkpoint for Records {
    fn interval(&self) -> u64 {
        self.interval
    }

    async fn record(
        &self,
        chunks: &[garret_store::ChunkRef],
        uploaded: &std::collections::HashSet<garret_store::ChunkHash>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut held = self.chunks.lock().unwrap();
        // Each record continues the last one.
        assert_eq!(
            chunks[0].offset,
            held.last().map_or(0, garret_store::ChunkRef::end)
        );
        held.extend_from_slice(chunks);
        self.uploaded.lock().unwrap().extend(uploaded);
        Ok(())
    }
}

async fn resumes_where_the_last_record_ended(f: Fixture) {
    let content = text(5 << 20, 61);
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
        assert!(
            f.store
                .backend()
                .exists(&chunk.id.object_key())
                .await
                .unwrap()
        );
    }

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
    assert_eq!(resumed, whole);
    assert_eq!(
        read_all(&f.store, &resumed, 0..resumed.size).await.unwrap(),
        content
    );

    // A prefix whose stored frame was damaged is refused, not hashed.
    f.store
        .backend()
        .put(&prefix[0].id.object_key(), Bytes::from_static(b"damaged"))
        .await
        .unwrap();
    let err = f
        .store
        .ingest_after(prefix, body(&content[end as usize..]), &index, None, &())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
}
