//! Blobs end to end through the chunk store and the metadata, on the two
//! deployments that matter: SQLite + local disk (the embedded default) and
//! Postgres + S3 (production), each a real server (a throwaway Postgres 15
//! cluster, s3s-fs over loopback HTTP with SigV4).

// Test data is indexed by u64 offsets on 64-bit hosts.
#![allow(clippy::cast_possible_truncation)]

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use garret_nix::Sha256Hash;
use garret_server::blobs::{BlobError, Blobs, Expect, StoredBlob, chunk_ref};
use garret_store::testing::{body, text};
use garret_store::{ObjectStore, StoreError};

mod common;

use common::{BlobStore, Deployment, on_both};

on_both! {
    round_trips,
    range_reads_at_every_boundary,
    dedups_across_blobs,
    missing_chunk_fails_loudly,
    concurrent_writers_store_once,
    rejects_lies_and_stores_nothing,
    streams_one_gibibyte,
}

async fn read_all(
    blobs: &Blobs,
    b: &StoredBlob,
    range: std::ops::Range<u64>,
) -> Result<Vec<u8>, StoreError> {
    let parts: Vec<Bytes> = blobs.read(b.id, range).await.unwrap().try_collect().await?;
    Ok(parts.concat())
}

async fn put(blobs: &Blobs, content: &[u8]) -> StoredBlob {
    blobs.put(body(content), Expect::default()).await.unwrap()
}

async fn round_trips(deployment: Deployment) {
    let f = BlobStore::on(deployment).await;
    let max = f.blobs.store().config().chunker.max_size as usize;
    for len in [0, 1, 1000, max, max + 1, 5 * max + 17] {
        let content = text(len, len as u64 + 7);
        let expect = Expect {
            hash: Some(Sha256Hash::of(&content)),
            size: Some(len as u64),
            max_size: None,
        };
        let b = f.blobs.put(body(&content), expect).await.unwrap();
        assert_eq!(
            (b.hash, b.size, b.deduplicated),
            (Sha256Hash::of(&content), len as u64, false)
        );
        assert_eq!(
            read_all(&f.blobs, &b, 0..b.size).await.unwrap(),
            content,
            "{len}"
        );
        let frames: Vec<Bytes> = f
            .blobs
            .read_frames(b.id, 0..b.file_size)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let file = frames.concat();
        assert_eq!(
            (Sha256Hash::of(&file), file.len() as u64),
            (b.file_hash, b.file_size)
        );
        if len > 0 {
            assert_eq!(zstd::stream::decode_all(&file[..]).unwrap(), content);
        }
        // The same content again is recognised as already stored.
        assert!(put(&f.blobs, &content).await.deduplicated);
    }
}

async fn range_reads_at_every_boundary(deployment: Deployment) {
    let f = BlobStore::on(deployment).await;
    let content = text(1 << 20, 3);
    let b = put(&f.blobs, &content).await;
    let chunks = f.blobs.meta().blob_chunks(b.id, None).await.unwrap();
    assert!(chunks.len() > 4);
    let mut points = vec![0, 1, b.size - 1, b.size];
    for c in &chunks {
        points.extend([
            c.offset.saturating_sub(1),
            c.offset,
            c.offset + 1,
            c.offset + c.chunk.size - 1,
        ]);
    }
    points.sort_unstable();
    points.dedup();
    for (i, &start) in points.iter().enumerate() {
        for &end in &points[i..] {
            if end - start > 300_000 {
                break;
            }
            let got = read_all(&f.blobs, &b, start..end).await.unwrap();
            assert_eq!(
                got,
                &content[start as usize..end as usize],
                "{start}..{end}"
            );
        }
    }
    let file: Vec<Bytes> = f
        .blobs
        .read_frames(b.id, 0..b.file_size)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let file = file.concat();
    for c in &chunks {
        for (s, e) in [
            (c.file_offset, c.file_offset + 1),
            (
                c.file_offset.saturating_sub(2),
                (c.file_offset + 5).min(b.file_size),
            ),
        ] {
            let part: Vec<Bytes> = f
                .blobs
                .read_frames(b.id, s..e)
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            assert_eq!(
                part.concat(),
                &file[s as usize..e as usize],
                "file {s}..{e}"
            );
        }
    }
}

async fn dedups_across_blobs(deployment: Deployment) {
    let f = BlobStore::on(deployment).await;
    let first = text(4 << 20, 5);
    let mut second = first.clone();
    second.splice(1 << 20..1 << 20, text(64, 77));
    let a = put(&f.blobs, &first).await;
    let after_first = f.blobs.meta().chunk_stats().await.unwrap();
    let b = put(&f.blobs, &second).await;
    let after_second = f.blobs.meta().chunk_stats().await.unwrap();
    let b_chunks = f.blobs.meta().blob_chunks(b.id, None).await.unwrap().len() as u64;
    assert_ne!(a.id, b.id);
    assert!(
        after_second.count - after_first.count <= 3,
        "{after_first:?} -> {after_second:?} for {b_chunks} chunks"
    );
    assert_eq!(read_all(&f.blobs, &b, 0..b.size).await.unwrap(), second);
}

async fn missing_chunk_fails_loudly(deployment: Deployment) {
    let f = BlobStore::on(deployment).await;
    let content = text(1 << 20, 9);
    let b = put(&f.blobs, &content).await;
    let chunks = f.blobs.meta().blob_chunks(b.id, None).await.unwrap();
    let chunks: Vec<_> = chunks.iter().map(|c| chunk_ref(c).unwrap()).collect();
    let victim = chunks[chunks.len() / 2];
    f.blobs
        .store()
        .backend()
        .delete(&victim.object_key())
        .await
        .unwrap();
    // The read fails at the first chunk of the pack that is gone.
    let first_lost = chunks
        .iter()
        .find(|c| c.pack() == victim.pack())
        .unwrap()
        .id;
    assert!(
        matches!(read_all(&f.blobs, &b, 0..b.size).await, Err(StoreError::MissingChunk(id)) if id == first_lost)
    );
    let frames: Result<Vec<Bytes>, _> = f
        .blobs
        .read_frames(b.id, 0..b.file_size)
        .await
        .unwrap()
        .try_collect()
        .await;
    assert!(matches!(frames, Err(StoreError::MissingChunk(_))));
}

async fn concurrent_writers_store_once(deployment: Deployment) {
    let f = BlobStore::on(deployment).await;
    let content = text(3 << 20, 13);
    let (a, b) = tokio::join!(put(&f.blobs, &content), put(&f.blobs, &content));
    assert_eq!(a.id, b.id);
    assert!(
        a.deduplicated != b.deduplicated,
        "exactly one writer stored it: {a:?} {b:?}"
    );
    let chunks = f.blobs.meta().blob_chunks(a.id, None).await.unwrap();
    let unique: std::collections::HashSet<_> = chunks.iter().map(|c| c.chunk.hash).collect();
    assert_eq!(
        f.blobs.meta().chunk_stats().await.unwrap().count,
        unique.len() as u64
    );
    assert_eq!(read_all(&f.blobs, &a, 0..a.size).await.unwrap(), content);
}

async fn rejects_lies_and_stores_nothing(deployment: Deployment) {
    let f = BlobStore::on(deployment).await;
    let content = text(600_000, 17);
    let wrong_hash = Expect {
        hash: Some(Sha256Hash::of(b"something else")),
        ..Expect::default()
    };
    assert!(matches!(
        f.blobs.put(body(&content), wrong_hash).await,
        Err(BlobError::HashMismatch { .. })
    ));
    let wrong_size = Expect {
        size: Some(599_999),
        ..Expect::default()
    };
    assert!(matches!(
        f.blobs.put(body(&content), wrong_size).await,
        Err(BlobError::SizeMismatch { .. })
    ));
    let too_big = Expect {
        max_size: Some(500_000),
        ..Expect::default()
    };
    assert!(matches!(
        f.blobs.put(body(&content), too_big).await,
        Err(BlobError::Store(StoreError::TooLarge { .. }))
    ));
    let broken = stream::iter(vec![
        Ok(Bytes::from(content.clone())),
        Err(std::io::Error::other("reset")),
    ]);
    assert!(matches!(
        f.blobs.put(broken, Expect::default()).await,
        Err(BlobError::Store(StoreError::Input(_)))
    ));
    assert!(
        f.blobs
            .meta()
            .blob_by_hash(Sha256Hash::of(&content).as_bytes())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(f.blobs.meta().chunk_stats().await.unwrap().count, 0);
}

async fn streams_one_gibibyte(deployment: Deployment) {
    const GIB: u64 = 1 << 30;
    let f = BlobStore::on(deployment).await;
    let pattern = Bytes::from(text(8 << 20, 41));
    let pieces = (GIB / pattern.len() as u64) as usize;
    let input = stream::iter((0..pieces).map(move |_| Ok::<_, std::io::Error>(pattern.clone())));
    let b = f
        .blobs
        .put(
            input,
            Expect {
                size: Some(GIB),
                ..Expect::default()
            },
        )
        .await
        .unwrap();
    let pattern = text(8 << 20, 41);
    let mut hasher = garret_nix::Sha256Hasher::new();
    let mut reader = std::pin::pin!(f.blobs.read(b.id, 0..b.size).await.unwrap());
    let mut at = 0usize;
    while let Some(part) = reader.next().await {
        let part = part.unwrap();
        let p = at % pattern.len();
        let n = part.len().min(pattern.len() - p);
        assert_eq!(&part[..n], &pattern[p..p + n]);
        hasher.update(&part);
        at += part.len();
    }
    assert_eq!(hasher.finish(), (b.hash, GIB));
}
