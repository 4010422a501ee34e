use std::collections::HashMap;
use std::ops::Range;

use garret_meta::{BlobChunk, ChunkRange, MetaError};

use crate::support::{GRACE, TestDb, blob, both, deduplicated, frame, h, present};

/// A kind of [`ChunkRange`], and the extent `(start, len)` of a chunk in the
/// bytes it ranges over.
type RangeKind = (fn(Range<u64>) -> ChunkRange, fn(&BlobChunk) -> (u64, u64));

both! {
    async fn present_chunks_reports_known_ones_with_frames(db: TestDb) {
        db.commit_blob(&blob(1, &[(10, 5), (11, 7)]), 0).await.unwrap();
        let asked = [h(12), h(10), h(12), h(13), h(11)];
        assert_eq!(
            present(&db, &asked, 1).await.unwrap(),
            HashMap::from([(h(10), frame(10)), (h(11), frame(11))])
        );
        assert_eq!(present(&db, &[], 1).await.unwrap(), HashMap::new());

        // Several batches, with known chunks spread among them.
        let known = blob(2, &(100..300).step_by(3).map(|i| (i, 1)).collect::<Vec<_>>());
        db.commit_blob(&known, 0).await.unwrap();
        let asked: Vec<[u8; 32]> = (100..300).map(h).collect();
        let expected: HashMap<[u8; 32], [u8; 32]> =
            (100..300).step_by(3).map(|i| (h(i), frame(i))).collect();
        assert_eq!(present(&db, &asked, 1).await.unwrap(), expected);
    }

    async fn commit_blobs_records_a_batch_in_one_transaction(db: TestDb) {
        // Blobs 2 and 3 share chunk 21; blob 2 comes twice.
        let batch = [
            blob(1, &[(20, 5)]),
            blob(2, &[(21, 7), (22, 3)]),
            blob(2, &[(21, 7), (22, 3)]),
            blob(3, &[(21, 7)]),
        ];
        let commits = db.commit_blobs(&batch, 0).await.unwrap();
        let existed: Vec<bool> = commits.iter().map(|c| c.already_existed).collect();
        assert_eq!(existed, [false, false, true, false]);
        assert_eq!(commits[1].blob_id, commits[2].blob_id);
        assert_eq!(db.count("blobs").await, 3);
        assert_eq!(db.chunk_state(h(21)).await.unwrap().0, 2);
        db.assert_refcounts_consistent().await;
        // All or nothing: a blob that cannot be recorded records none.
        let failing = [blob(4, &[(40, 5)]), deduplicated(blob(5, &[(50, 5)]))];
        assert!(matches!(db.commit_blobs(&failing, 1).await, Err(MetaError::ChunkGone(_))));
        assert_eq!(db.count("blobs").await, 3);
        assert!(db.chunk_state(h(40)).await.is_none());
    }

    async fn dedup_upload_skips_known_chunks(db: TestDb) {
        // A second blob sharing a chunk uploads only its own and marks the
        // shared one as not uploaded, describing it by the stored frame.
        db.commit_blob(&blob(1, &[(10, 5), (11, 7)]), 0).await.unwrap();
        let present = present(&db, &[h(11), h(12)], 1).await.unwrap();
        assert_eq!(present, HashMap::from([(h(11), frame(11))]));
        let mut second = blob(2, &[(11, 7), (12, 3)]);
        assert_eq!(second.chunks[0].frame_hash, present[&h(11)]);
        second.chunks[0].uploaded = false;
        let commit = db.commit_blob(&second, 1).await.unwrap();
        assert!(!commit.already_existed);
        assert_eq!(db.chunk_state(h(10)).await.unwrap().0, 1);
        assert_eq!(db.chunk_state(h(11)).await.unwrap().0, 2);
        assert_eq!(db.chunk_state(h(12)).await.unwrap().0, 1);
        assert_eq!(db.count("chunks").await, 3);
        db.assert_refcounts_consistent().await;
    }

    async fn commit_blob_is_idempotent(db: TestDb) {
        let b = blob(1, &[(10, 5), (11, 7), (10, 5)]);
        let first = db.commit_blob(&b, 0).await.unwrap();
        assert!(!first.already_existed);
        // A repeated chunk counts once per use.
        assert_eq!(db.chunk_state(h(10)).await.unwrap(), (2, None, "valid".into()));
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (0, Some(GRACE)));

        let second = db.commit_blob(&deduplicated(b.clone()), 5).await.unwrap();
        assert_eq!(second.blob_id, first.blob_id);
        assert!(second.already_existed);
        assert_eq!(db.chunk_state(h(10)).await.unwrap().0, 2);
        assert_eq!(db.chunk_state(h(11)).await.unwrap().0, 1);
        // The unreferenced blob's lease was extended.
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (0, Some(5 + GRACE)));
        assert_eq!(db.count("blobs").await, 1);
        assert_eq!(db.count("blob_chunks").await, 3);

        let stored = db.blob_by_hash(&h(1)).await.unwrap().unwrap();
        assert_eq!(stored.id, first.blob_id);
        assert_eq!((stored.size, stored.chunk_count), (17, 3));
        assert_eq!((stored.file_hash, stored.file_size), (b.file_hash, b.file_size));
        assert_eq!(db.blob_by_hash(&h(2)).await.unwrap(), None);
        db.assert_refcounts_consistent().await;
    }

    async fn concurrent_commits_of_one_blob_both_succeed(db: TestDb) {
        for round in 0..8 {
            let shared = 1000 * round;
            let b = blob(round, &[(shared + 1, 4), (shared + 2, 4), (shared + 1, 4)]);
            let (x, y) = tokio::join!(db.commit_blob(&b, 0), db.commit_blob(&b, 0));
            let (x, y) = (x.unwrap(), y.unwrap());
            assert_eq!(x.blob_id, y.blob_id);
            assert!(x.already_existed != y.already_existed, "round {round}: {x:?} {y:?}");
            assert_eq!(db.chunk_state(h(shared + 1)).await.unwrap().0, 2);
            assert_eq!(db.chunk_state(h(shared + 2)).await.unwrap().0, 1);
        }
        assert_eq!(db.count("blobs").await, 8);
        assert_eq!(db.count("blob_chunks").await, 24);
        db.assert_refcounts_consistent().await;
    }

    async fn concurrent_commits_sharing_chunks(db: TestDb) {
        // Different blobs over the same chunks in opposite orders: on Postgres
        // they lock rows in conflicting orders, and a deadlock victim must be
        // retried rather than surface.
        let forward: Vec<(u32, u64)> = (1..=50).map(|i| (i, 3)).collect();
        let backward: Vec<(u32, u64)> = forward.iter().rev().copied().collect();
        for round in 0..5 {
            let a = blob(100 + round, &forward);
            let b = blob(200 + round, &backward);
            let (x, y) = tokio::join!(db.commit_blob(&a, 0), db.commit_blob(&b, 0));
            x.unwrap();
            y.unwrap();
        }
        assert_eq!(db.chunk_state(h(7)).await.unwrap().0, 10);
        db.assert_refcounts_consistent().await;
    }

    async fn chunk_gone_when_deleting_or_vanished(db: TestDb) {
        // Chunk 10 loses its only blob and GC marks it.
        db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap();
        assert_eq!(db.gc_sweep_blobs(GRACE, 10).await.unwrap(), 1);
        let marked = db.gc_mark_chunks(2 * GRACE, 10).await.unwrap();
        assert_eq!(marked.len(), 1);

        db.commit_blob(&blob(3, &[(11, 2)]), 0).await.unwrap();
        let before = db.chunk_state(h(11)).await;
        for b in [blob(2, &[(11, 2), (10, 5)]), deduplicated(blob(2, &[(11, 2), (10, 5)]))] {
            let err = db.commit_blob(&b, 2 * GRACE).await.unwrap_err();
            assert!(matches!(err, MetaError::ChunkGone(c) if c == h(10)), "{err}");
        }
        // Rolled back: no blob, and the valid chunk's refcount is unchanged.
        assert_eq!(db.blob_by_hash(&h(2)).await.unwrap(), None);
        assert_eq!(db.chunk_state(h(11)).await, before);
        let err = present(&db, &[h(11), h(10)], 2 * GRACE).await.unwrap_err();
        assert!(matches!(err, MetaError::ChunkGone(c) if c == h(10)), "{err}");

        // Once GC has forgotten it, it is plainly missing: upload and commit.
        db.gc_forget_chunks(&[marked[0].id]).await.unwrap();
        assert_eq!(
            present(&db, &[h(11), h(10)], 2 * GRACE).await.unwrap(),
            HashMap::from([(h(11), frame(11))])
        );
        let mut b = blob(2, &[(11, 2), (10, 5)]);
        // A chunk the writer skipped but that has no row is gone too.
        b.chunks[1].uploaded = false;
        let err = db.commit_blob(&b, 2 * GRACE).await.unwrap_err();
        assert!(matches!(err, MetaError::ChunkGone(c) if c == h(10)), "{err}");
        b.chunks[1].uploaded = true;
        db.commit_blob(&b, 2 * GRACE).await.unwrap();
        assert_eq!(db.chunk_state(h(10)).await.unwrap(), (1, None, "valid".into()));
        db.assert_refcounts_consistent().await;
    }

    async fn commit_blob_rejects_inconsistent_chunks(db: TestDb) {
        let mut gap = blob(1, &[(10, 5), (11, 5)]);
        gap.chunks[1].offset = 6;
        let mut short = blob(2, &[(10, 5)]);
        short.size = 6;
        let mut empty_chunk = blob(3, &[(10, 5)]);
        empty_chunk.chunks[0].size = 0;
        empty_chunk.size = 0;
        let mut resized = blob(4, &[(10, 5), (10, 6)]);
        resized.chunks[1].size = 6;
        // Stored sizes 3 and 3: the second frame must start at 3.
        let mut file_gap = blob(5, &[(10, 5), (11, 5)]);
        file_gap.chunks[1].file_offset = 4;
        file_gap.file_size = 7;
        let mut file_short = blob(6, &[(10, 5)]);
        file_short.file_size += 1;
        // A repeat whose frame differs, with offsets that still add up.
        let mut restored = blob(7, &[(10, 5), (10, 5)]);
        restored.chunks[1].stored_size += 1;
        restored.file_size += 1;
        let mut reframed = blob(8, &[(10, 5), (10, 5)]);
        reframed.chunks[1].frame_hash = frame(99);
        for (b, why) in [
            (gap, "starts at 6"),
            (short, "5 bytes of a 6-byte blob"),
            (empty_chunk, "is empty"),
            (resized, "repeats"),
            (file_gap, "frame starts at 4"),
            (file_short, "3 bytes of a 4-byte file"),
            (restored, "repeats"),
            (reframed, "repeats"),
        ] {
            let err = db.commit_blob(&b, 0).await.unwrap_err();
            assert!(matches!(&err, MetaError::Invalid(m) if m.contains(why)), "{why}: {err}");
        }
        assert_eq!(db.count("chunks").await, 0);
    }

    async fn commit_blob_rejects_other_frames_of_stored_chunks(db: TestDb) {
        db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap();
        let before = db.chunk_state(h(10)).await;
        // A writer that skipped chunk 10 but built its file from another
        // frame, and one that uploaded a differently sized frame of it.
        let mut other_hash = blob(2, &[(11, 2), (10, 5)]);
        other_hash.chunks[1].uploaded = false;
        other_hash.chunks[1].frame_hash = frame(99);
        let mut other_size = blob(2, &[(11, 2), (10, 5)]);
        other_size.chunks[1].stored_size += 1;
        other_size.file_size += 1;
        for b in [other_hash, other_size] {
            let err = db.commit_blob(&b, 1).await.unwrap_err();
            assert!(matches!(err, MetaError::FrameMismatch(c) if c == h(10)), "{err}");
        }
        // Rolled back: no blob, no chunk 11, chunk 10 unchanged.
        assert_eq!(db.blob_by_hash(&h(2)).await.unwrap(), None);
        assert_eq!(db.chunk_state(h(11)).await, None);
        assert_eq!(db.chunk_state(h(10)).await, before);

        // Described by the stored frame, the same blob commits.
        let mut b = blob(2, &[(11, 2), (10, 5)]);
        b.chunks[1].uploaded = false;
        db.commit_blob(&b, 1).await.unwrap();
        assert_eq!(db.chunk_state(h(10)).await.unwrap().0, 2);
        db.assert_refcounts_consistent().await;
    }

    async fn large_blob_spans_insert_batches(db: TestDb) {
        // More chunks than one multi-row INSERT holds, with repeats.
        let chunks: Vec<(u32, u64)> = (0..2500).map(|i| (i % 2200, 1 + u64::from(i % 2200))).collect();
        let b = blob(9_999_999, &chunks);
        let commit = db.commit_blob(&b, 0).await.unwrap();
        assert_eq!(db.count("chunks").await, 2200);
        assert_eq!(db.count("blob_chunks").await, 2500);
        let listed = db.blob_chunks(commit.blob_id, None).await.unwrap();
        assert_eq!(listed.len(), 2500);
        for (seq, (got, want)) in listed.iter().zip(&b.chunks).enumerate() {
            assert_eq!(got.seq, seq as u64);
            assert_eq!((got.offset, got.chunk.hash, got.chunk.size), (want.offset, want.hash, want.size));
            assert_eq!(
                (got.file_offset, got.chunk.stored_size, got.chunk.frame_hash),
                (want.file_offset, want.stored_size, want.frame_hash)
            );
        }
        db.assert_refcounts_consistent().await;
    }

    async fn empty_blob(db: TestDb) {
        let commit = db.commit_blob(&blob(1, &[]), 0).await.unwrap();
        assert_eq!(db.blob_by_hash(&h(1)).await.unwrap().unwrap().size, 0);
        assert_eq!(db.blob_chunks(commit.blob_id, None).await.unwrap(), []);
        for range in [ChunkRange::Content(0..10), ChunkRange::File(0..10)] {
            assert_eq!(db.blob_chunks(commit.blob_id, Some(range)).await.unwrap(), []);
        }
    }

    async fn range_reads_at_every_boundary(db: TestDb) {
        let b = blob(1, &[(10, 3), (11, 1), (12, 4), (10, 3), (13, 4)]);
        let id = db.commit_blob(&b, 0).await.unwrap().blob_id;
        let all = db.blob_chunks(id, None).await.unwrap();
        assert_eq!(all.iter().map(|c| c.offset).collect::<Vec<_>>(), [0, 3, 4, 8, 11]);
        // Frames of 2, 1, 3, 2 and 3 bytes: the last one ends before its
        // content would, so a range past the file's end must not reach it.
        assert_eq!(all.iter().map(|c| c.file_offset).collect::<Vec<_>>(), [0, 2, 3, 6, 8]);
        assert_eq!(all[3].chunk.id, all[0].chunk.id);
        assert_eq!(all[4].chunk.frame_hash, frame(13));
        // Every range within and around the 15 bytes of content and the 11
        // bytes of file, against the obvious definition of overlap.
        let kinds: [RangeKind; 2] = [
            (ChunkRange::Content, |c| (c.offset, c.chunk.size)),
            (ChunkRange::File, |c| (c.file_offset, c.chunk.stored_size)),
        ];
        for (kind, extent) in kinds {
            for start in 0..=17 {
                for end in 0..=18 {
                    let want: Vec<&BlobChunk> = all
                        .iter()
                        .filter(|c| {
                            let (offset, size) = extent(c);
                            start < end && offset < end && start < offset + size
                        })
                        .collect();
                    let range = kind(start..end);
                    let got = db.blob_chunks(id, Some(range.clone())).await.unwrap();
                    assert_eq!(got.iter().collect::<Vec<_>>(), want, "{range:?}");
                }
            }
        }
        let huge = db.blob_chunks(id, Some(ChunkRange::Content(12..u64::MAX))).await.unwrap();
        assert_eq!(huge.iter().map(|c| c.seq).collect::<Vec<_>>(), [4]);
        let huge = db.blob_chunks(id, Some(ChunkRange::File(7..u64::MAX))).await.unwrap();
        assert_eq!(huge.iter().map(|c| c.seq).collect::<Vec<_>>(), [3, 4]);
    }
}
