use garret_meta::{BlobChunk, MetaError};

use crate::support::{GRACE, TestDb, blob, both, deduplicated, h};

both! {
    async fn missing_chunks_reports_only_unknown_ones(db: TestDb) {
        db.commit_blob(&blob(1, &[(10, 5), (11, 7)]), 0).await.unwrap();
        let asked = [h(12), h(10), h(12), h(13), h(11)];
        assert_eq!(db.missing_chunks(&asked, 1).await.unwrap(), [h(12), h(13)]);
        assert_eq!(db.missing_chunks(&[], 1).await.unwrap(), Vec::<[u8; 32]>::new());

        // Several batches, with known chunks spread among them.
        let known = blob(2, &(100..300).step_by(3).map(|i| (i, 1)).collect::<Vec<_>>());
        db.commit_blob(&known, 0).await.unwrap();
        let asked: Vec<[u8; 32]> = (100..300).map(h).collect();
        let expected: Vec<[u8; 32]> = (100..300).filter(|i| (i - 100) % 3 != 0).map(h).collect();
        assert_eq!(db.missing_chunks(&asked, 1).await.unwrap(), expected);
    }

    async fn dedup_upload_skips_known_chunks(db: TestDb) {
        // A second blob sharing a chunk uploads only its own and marks the
        // shared one as not uploaded.
        db.commit_blob(&blob(1, &[(10, 5), (11, 7)]), 0).await.unwrap();
        let missing = db.missing_chunks(&[h(11), h(12)], 1).await.unwrap();
        assert_eq!(missing, [h(12)]);
        let mut second = blob(2, &[(11, 7), (12, 3)]);
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
        let err = db.missing_chunks(&[h(11), h(10)], 2 * GRACE).await.unwrap_err();
        assert!(matches!(err, MetaError::ChunkGone(c) if c == h(10)), "{err}");

        // Once GC has forgotten it, it is plainly missing: upload and commit.
        db.gc_forget_chunks(&[marked[0].id]).await.unwrap();
        assert_eq!(db.missing_chunks(&[h(11), h(10)], 2 * GRACE).await.unwrap(), [h(10)]);
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
        for b in [gap, short, empty_chunk, resized] {
            let err = db.commit_blob(&b, 0).await.unwrap_err();
            assert!(matches!(err, MetaError::Invalid(_)), "{err}");
        }
        assert_eq!(db.count("chunks").await, 0);
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
        }
        db.assert_refcounts_consistent().await;
    }

    async fn empty_blob(db: TestDb) {
        let commit = db.commit_blob(&blob(1, &[]), 0).await.unwrap();
        assert_eq!(db.blob_by_hash(&h(1)).await.unwrap().unwrap().size, 0);
        assert_eq!(db.blob_chunks(commit.blob_id, None).await.unwrap(), []);
        assert_eq!(db.blob_chunks(commit.blob_id, Some(0..10)).await.unwrap(), []);
    }

    async fn range_reads_at_every_boundary(db: TestDb) {
        let b = blob(1, &[(10, 3), (11, 1), (12, 4), (10, 3), (13, 2)]);
        let id = db.commit_blob(&b, 0).await.unwrap().blob_id;
        let all = db.blob_chunks(id, None).await.unwrap();
        assert_eq!(all.iter().map(|c| c.offset).collect::<Vec<_>>(), [0, 3, 4, 8, 11]);
        assert_eq!(all[3].chunk.id, all[0].chunk.id);
        // Every range within and around the 13 bytes, against the obvious
        // definition of overlap.
        for start in 0..=15 {
            for end in 0..=16 {
                let want: Vec<&BlobChunk> = all
                    .iter()
                    .filter(|c| start < end && c.offset < end && start < c.offset + c.chunk.size)
                    .collect();
                let got = db.blob_chunks(id, Some(start..end)).await.unwrap();
                assert_eq!(got.iter().collect::<Vec<_>>(), want, "{start}..{end}");
            }
        }
        let huge = db.blob_chunks(id, Some(12..u64::MAX)).await.unwrap();
        assert_eq!(huge.len(), 1);
    }
}
