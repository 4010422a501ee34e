use garret_meta::{CacheId, MetaError, NewChunkRef, UploadSession};

use crate::support::{GRACE, Raw, TestDb, blob, both, deduplicated, frame, h};

/// How long the tests' sessions live: well beyond [`GRACE`], so a lease to
/// a session's expiry cannot be mistaken for a grace period.
const TTL: i64 = 1000;

const RESOURCE: &str = "uploads/0b4e7a0e-5fe5-4b0d-9d1a-1a2b3c4d5e6f/blobs/aa/15";

/// `(hash, offset, file_offset)` of each chunk of a claimed session.
fn layout(session: &UploadSession) -> Vec<([u8; 32], u64, u64)> {
    session
        .chunks
        .iter()
        .map(|c| (c.chunk.hash, c.offset, c.file_offset))
        .collect()
}

fn expected(chunks: &[NewChunkRef]) -> Vec<([u8; 32], u64, u64)> {
    chunks
        .iter()
        .map(|c| (c.hash, c.offset, c.file_offset))
        .collect()
}

fn not_uploaded(chunks: &[NewChunkRef]) -> Vec<NewChunkRef> {
    let mut chunks = chunks.to_vec();
    for chunk in &mut chunks {
        chunk.uploaded = false;
    }
    chunks
}

impl TestDb {
    async fn claim(&self, cache: CacheId, now: i64) -> UploadSession {
        self.claim_upload(cache, RESOURCE, false, now, now + TTL)
            .await
            .unwrap()
    }

    /// Sets a chunk `deleting` behind the API's back, as no path through
    /// it can while a session holds the chunk (GC skips such chunks), to
    /// show that a claim does not trust its chunk list blindly.
    async fn force_deleting(&self, hash: [u8; 32]) {
        let sql = "UPDATE chunks SET state = 'deleting' WHERE hash = $1";
        let changed = match &self.raw {
            Raw::Postgres(pool) => sqlx::query(sql)
                .bind(&hash[..])
                .execute(pool)
                .await
                .unwrap()
                .rows_affected(),
            Raw::Sqlite(pool) => sqlx::query(sql)
                .bind(&hash[..])
                .execute(pool)
                .await
                .unwrap()
                .rows_affected(),
        };
        assert_eq!(changed, 1);
    }
}

both! {
    async fn claim_checkpoint_resume_finish(db: TestDb) {
        let cache = db.cache_named("main").await;
        let b = blob(1, &[(10, 5), (11, 7), (12, 3)]);
        assert_eq!(db.upload_status(cache, RESOURCE, 0).await.unwrap(), None);

        let first = db.claim(cache, 0).await;
        assert_eq!((first.generation, first.committed_size, first.file_size), (1, 0, 0));
        assert!(first.chunks.is_empty());
        assert_eq!(db.upload_status(cache, RESOURCE, 0).await.unwrap(), Some(0));

        db.checkpoint_upload(first.id, 1, &b.chunks[..2], &b.packs, 10, 10 + TTL).await.unwrap();
        assert_eq!(db.upload_status(cache, RESOURCE, 10).await.unwrap(), Some(12));
        // New chunks are unreferenced, leased until the session's expiry.
        assert_eq!(db.chunk_state(h(10)).await.unwrap(), (0, Some(10 + TTL), "valid".into()));

        // The stream broke; the client resumes, through another replica.
        let resumed = db.claim(cache, 20).await;
        assert_eq!(resumed.id, first.id);
        assert_eq!(resumed.generation, 2);
        assert_eq!((resumed.committed_size, resumed.file_size), (12, 3 + 4));
        assert_eq!(layout(&resumed), expected(&b.chunks[..2]));
        let seqs: Vec<u64> = resumed.chunks.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, [0, 1]);
        assert_eq!(resumed.chunks[1].chunk.frame_hash, frame(11));
        assert_eq!((resumed.chunks[1].chunk.size, resumed.chunks[1].chunk.stored_size), (7, 4));
        // The claim extended the kept chunks' leases to its expiry.
        assert_eq!(db.chunk_state(h(11)).await.unwrap().1, Some(20 + TTL));

        db.checkpoint_upload(resumed.id, 2, &b.chunks[2..], &b.packs, 30, 30 + TTL).await.unwrap();
        assert_eq!(db.upload_status(cache, RESOURCE, 30).await.unwrap(), Some(15));
        // A checkpoint of nothing only extends the session.
        db.checkpoint_upload(resumed.id, 2, &[], &b.packs, 40, 40 + TTL).await.unwrap();
        assert_eq!(db.upload_status(cache, RESOURCE, 30 + TTL).await.unwrap(), Some(15));

        let commit = db.commit_blob(&b, 50).await.unwrap();
        assert!(!commit.already_existed);
        assert!(db.finish_upload(resumed.id, 2).await.unwrap());
        assert!(!db.finish_upload(resumed.id, 2).await.unwrap(), "already finished");
        assert_eq!(db.upload_status(cache, RESOURCE, 50).await.unwrap(), None);
        assert_eq!(db.count("upload_sessions").await, 0);
        assert_eq!(db.count("upload_session_chunks").await, 0);
        for chunk in [10, 11, 12] {
            assert_eq!(db.chunk_state(h(chunk)).await.unwrap(), (1, None, "valid".into()));
        }
        db.assert_refcounts_consistent().await;

        // The resource name is free again: a new upload starts from scratch.
        let again = db.claim(cache, 60).await;
        assert_ne!(again.id, first.id);
        assert_eq!((again.generation, again.committed_size), (1, 0));
    }

    async fn sessions_are_per_cache_and_resource(db: TestDb) {
        let one = db.cache_named("one").await;
        let two = db.cache_named("two").await;
        let b = blob(1, &[(10, 5)]);
        let s1 = db.claim(one, 0).await;
        db.checkpoint_upload(s1.id, 1, &b.chunks, &b.packs, 0, TTL).await.unwrap();
        let s2 = db.claim(two, 0).await;
        assert_ne!(s2.id, s1.id);
        assert_eq!((s2.generation, s2.committed_size), (1, 0));
        let other = db.claim_upload(one, "uploads/other/blobs/bb/5", false, 0, TTL).await.unwrap();
        assert_eq!((other.generation, other.committed_size), (1, 0));
        assert_eq!(db.upload_status(one, RESOURCE, 0).await.unwrap(), Some(5));
        assert_eq!(db.upload_status(two, RESOURCE, 0).await.unwrap(), Some(0));
    }

    async fn takeover_fences_the_stale_writer(db: TestDb) {
        let cache = db.cache_named("main").await;
        let b = blob(1, &[(10, 5), (11, 5), (12, 5)]);
        let stale = db.claim(cache, 0).await;
        db.checkpoint_upload(stale.id, stale.generation, &b.chunks[..1], &b.packs, 1, 1 + TTL).await.unwrap();

        // Another replica takes the upload over; the first writer is still
        // streaming and tries to append.
        let current = db.claim(cache, 2).await;
        assert_eq!(current.generation, stale.generation + 1);
        let err = db
            .checkpoint_upload(stale.id, stale.generation, &b.chunks[1..2], &b.packs, 3, 3 + TTL)
            .await
            .unwrap_err();
        assert!(matches!(err, MetaError::UploadSuperseded), "{err}");
        // Nothing was written: no chunk row, no position, no new expiry.
        assert_eq!(db.chunk_state(h(11)).await, None);
        assert_eq!(db.count("upload_session_chunks").await, 1);
        assert_eq!(db.upload_status(cache, RESOURCE, 2 + TTL - 1).await.unwrap(), Some(5));
        assert_eq!(db.upload_status(cache, RESOURCE, 2 + TTL).await.unwrap(), None);
        assert!(!db.finish_upload(stale.id, stale.generation).await.unwrap());

        // The current writer carries on where the session ends.
        db.checkpoint_upload(current.id, current.generation, &b.chunks[1..], &b.packs, 4, 4 + TTL)
            .await
            .unwrap();
        assert_eq!(db.upload_status(cache, RESOURCE, 4).await.unwrap(), Some(15));

        // A finished session fences too.
        assert!(db.finish_upload(current.id, current.generation).await.unwrap());
        let err = db
            .checkpoint_upload(current.id, current.generation, &[], &b.packs, 5, 5 + TTL)
            .await
            .unwrap_err();
        assert!(matches!(err, MetaError::UploadSuperseded), "{err}");
    }

    async fn restart_empties_the_session(db: TestDb) {
        let cache = db.cache_named("main").await;
        let b = blob(1, &[(10, 5), (11, 5)]);
        let first = db.claim(cache, 0).await;
        db.checkpoint_upload(first.id, 1, &b.chunks, &b.packs, 0, TTL).await.unwrap();

        let restarted = db.claim_upload(cache, RESOURCE, true, 10, 10 + TTL).await.unwrap();
        assert_eq!(restarted.id, first.id);
        assert_eq!(restarted.generation, 2);
        assert_eq!((restarted.committed_size, restarted.file_size), (0, 0));
        assert!(restarted.chunks.is_empty());
        assert_eq!(db.count("upload_session_chunks").await, 0);
        assert_eq!(db.upload_status(cache, RESOURCE, 10).await.unwrap(), Some(0));
        // The chunks stay, unreferenced, until their leases run out.
        assert_eq!(db.chunk_state(h(10)).await.unwrap(), (0, Some(TTL), "valid".into()));

        // The upload starts over at 0, where the chunks may be sent again.
        let err = db.checkpoint_upload(first.id, 2, &b.chunks[1..], &b.packs, 11, 11 + TTL).await.unwrap_err();
        assert!(matches!(err, MetaError::Invalid(_)), "{err}");
        db.checkpoint_upload(first.id, 2, &b.chunks, &b.packs, 11, 11 + TTL).await.unwrap();
        assert_eq!(db.chunk_state(h(10)).await.unwrap(), (0, Some(11 + TTL), "valid".into()));
        assert_eq!(layout(&db.claim(cache, 12).await), expected(&b.chunks));
    }

    async fn expired_session_resumes_at_zero(db: TestDb) {
        let cache = db.cache_named("main").await;
        let b = blob(1, &[(10, 5), (11, 5)]);
        let first = db.claim(cache, 0).await;
        db.checkpoint_upload(first.id, 1, &b.chunks[..1], &b.packs, 0, TTL).await.unwrap();
        assert_eq!(db.upload_status(cache, RESOURCE, TTL - 1).await.unwrap(), Some(5));
        assert_eq!(db.upload_status(cache, RESOURCE, TTL).await.unwrap(), None);

        // Its holder may no longer append: GC may be deleting the session.
        let err = db.checkpoint_upload(first.id, 1, &b.chunks[1..], &b.packs, TTL, 2 * TTL).await.unwrap_err();
        assert!(matches!(err, MetaError::UploadSuperseded), "{err}");
        // A claim takes it over and starts the upload over.
        let again = db.claim(cache, TTL).await;
        assert_eq!((again.id, again.generation, again.committed_size), (first.id, 2, 0));
        assert_eq!(db.count("upload_session_chunks").await, 0);
    }

    async fn checkpoint_must_continue_the_session(db: TestDb) {
        let cache = db.cache_named("main").await;
        let b = blob(1, &[(10, 5), (11, 5), (12, 5)]);
        let s = db.claim(cache, 0).await;

        // Not where the (empty) session ends.
        let err = db.checkpoint_upload(s.id, 1, &b.chunks[1..], &b.packs, 0, TTL).await.unwrap_err();
        assert!(matches!(err, MetaError::Invalid(_)), "{err}");
        // A gap between two chunks.
        let gap = [b.chunks[0].clone(), b.chunks[2].clone()];
        let err = db.checkpoint_upload(s.id, 1, &gap, &b.packs, 0, TTL).await.unwrap_err();
        assert!(matches!(err, MetaError::Invalid(_)), "{err}");
        // The right content offset with the wrong file offset.
        let mut shifted = b.chunks[..1].to_vec();
        shifted[0].file_offset = 1;
        let err = db.checkpoint_upload(s.id, 1, &shifted, &b.packs, 0, TTL).await.unwrap_err();
        assert!(matches!(err, MetaError::Invalid(_)), "{err}");
        // An expiry already past.
        let err = db.checkpoint_upload(s.id, 1, &b.chunks[..1], &b.packs, 5, 5).await.unwrap_err();
        assert!(matches!(err, MetaError::Invalid(_)), "{err}");
        assert_eq!((db.count("chunks").await, db.count("upload_session_chunks").await), (0, 0));

        db.checkpoint_upload(s.id, 1, &b.chunks[..1], &b.packs, 0, TTL).await.unwrap();
        // The same chunks again (a retried checkpoint) overlap the session.
        let err = db.checkpoint_upload(s.id, 1, &b.chunks[..2], &b.packs, 0, TTL).await.unwrap_err();
        assert!(matches!(err, MetaError::Invalid(_)), "{err}");
        assert_eq!(db.chunk_state(h(11)).await, None);
        assert_eq!(db.upload_status(cache, RESOURCE, 0).await.unwrap(), Some(5));
    }

    async fn checkpoint_checks_rows_like_a_commit(db: TestDb) {
        let cache = db.cache_named("main").await;
        db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap();
        let s = db.claim(cache, 0).await;

        // A chunk the writer skipped must have a row.
        let b = blob(2, &[(20, 5)]);
        let err = db.checkpoint_upload(s.id, 1, &not_uploaded(&b.chunks), &b.packs, 0, TTL).await.unwrap_err();
        assert!(matches!(err, MetaError::ChunkGone(c) if c == h(20)), "{err}");
        // A chunk stored as another frame than the writer's.
        let mut other = blob(3, &[(10, 5)]);
        other.chunks[0].frame_hash = frame(99);
        let err = db.checkpoint_upload(s.id, 1, &other.chunks, &other.packs, 0, TTL).await.unwrap_err();
        assert!(matches!(err, MetaError::FrameMismatch(c) if c == h(10)), "{err}");
        assert_eq!(db.count("chunks").await, 1);
        assert_eq!(db.upload_status(cache, RESOURCE, 0).await.unwrap(), Some(0));

        // A chunk a blob holds keeps its reference and gets no lease.
        let shared = deduplicated(blob(4, &[(10, 5)]));
        db.checkpoint_upload(s.id, 1, &shared.chunks, &shared.packs, 0, TTL).await.unwrap();
        assert_eq!(db.chunk_state(h(10)).await.unwrap(), (1, None, "valid".into()));
    }

    async fn session_chunks_survive_gc_until_expired(db: TestDb) {
        let cache = db.cache_named("main").await;
        let b = blob(1, &[(10, 5), (11, 5)]);
        let s = db.claim(cache, 0).await;
        db.checkpoint_upload(s.id, 1, &b.chunks[..1], &b.packs, 0, TTL).await.unwrap();
        assert!(db.gc_mark_chunks(TTL - 1, 100).await.unwrap().is_empty());
        // A later checkpoint extends the session, not the earlier chunk's
        // lease; GC spares the chunk anyway while the session holds it.
        db.checkpoint_upload(s.id, 1, &b.chunks[1..], &b.packs, TTL - 1, 3 * TTL).await.unwrap();
        assert_eq!(db.chunk_state(h(10)).await.unwrap().1, Some(TTL));
        assert!(db.gc_mark_chunks(2 * TTL, 100).await.unwrap().is_empty());

        // The writer vanished; the session expires and is deleted.
        assert_eq!(db.expire_uploads(3 * TTL - 1, 100).await.unwrap(), 0);
        assert_eq!(db.expire_uploads(3 * TTL, 100).await.unwrap(), 1);
        assert_eq!(db.count("upload_session_chunks").await, 0);
        let mut marked: Vec<[u8; 32]> =
            db.gc_mark_chunks(3 * TTL, 100).await.unwrap().iter().map(|c| c.hash).collect();
        marked.sort_unstable();
        assert_eq!(marked, [h(10), h(11)]);
    }

    async fn session_spares_a_chunk_its_blob_released(db: TestDb) {
        // The session recorded a chunk a blob held; the blob went, and the
        // chunk got only a grace period, shorter than the session's life.
        let cache = db.cache_named("main").await;
        db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap();
        let s = db.claim(cache, 0).await;
        let b = deduplicated(blob(2, &[(10, 5), (11, 5)]));
        db.checkpoint_upload(s.id, 1, &b.chunks[..1], &b.packs, 0, TTL).await.unwrap();
        assert_eq!(db.gc_sweep_blobs(GRACE, 100).await.unwrap(), 1);
        assert_eq!(db.chunk_state(h(10)).await.unwrap(), (0, Some(2 * GRACE), "valid".into()));
        assert!(db.gc_mark_chunks(2 * GRACE, 100).await.unwrap().is_empty());

        // The upload resumes with it, and the claim leases it again.
        let resumed = db.claim(cache, 2 * GRACE).await;
        assert_eq!(resumed.committed_size, 5);
        assert_eq!(db.chunk_state(h(10)).await.unwrap().1, Some(2 * GRACE + TTL));
    }

    async fn deleting_chunks_are_refused_and_dropped(db: TestDb) {
        let cache = db.cache_named("main").await;
        // Chunk 10 is being collected.
        db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap();
        db.gc_sweep_blobs(GRACE, 100).await.unwrap();
        assert_eq!(db.gc_mark_chunks(2 * GRACE, 100).await.unwrap().len(), 1);
        let now = 2 * GRACE;
        let s = db.claim(cache, now).await;
        let b = blob(2, &[(10, 5)]);
        for chunks in [b.chunks.clone(), not_uploaded(&b.chunks)] {
            let err = db.checkpoint_upload(s.id, 1, &chunks, &b.packs, now, now + TTL).await.unwrap_err();
            assert!(matches!(err, MetaError::ChunkGone(c) if c == h(10)), "{err}");
        }
        assert_eq!(db.count("upload_session_chunks").await, 0);
        assert_eq!(db.chunk_state(h(10)).await.unwrap().2, "deleting");

        // A session whose chunk turned `deleting` starts over when claimed.
        let b = blob(3, &[(20, 5), (21, 5)]);
        db.checkpoint_upload(s.id, 1, &b.chunks, &b.packs, now, now + TTL).await.unwrap();
        db.force_deleting(h(21)).await;
        let again = db.claim(cache, now + 1).await;
        assert_eq!((again.generation, again.committed_size, again.file_size), (2, 0, 0));
        assert!(again.chunks.is_empty());
        assert_eq!(db.count("upload_session_chunks").await, 0);
        assert_eq!(db.upload_status(cache, RESOURCE, now + 1).await.unwrap(), Some(0));
    }

    async fn commit_after_checkpoints_counts_references(db: TestDb) {
        let cache = db.cache_named("main").await;
        // Chunk 10 twice, as the blob uses it.
        let b = blob(1, &[(10, 5), (11, 5), (10, 5)]);
        let s = db.claim(cache, 0).await;
        db.checkpoint_upload(s.id, 1, &b.chunks[..2], &b.packs, 0, TTL).await.unwrap();
        db.checkpoint_upload(s.id, 1, &b.chunks[2..], &b.packs, 0, TTL).await.unwrap();
        assert_eq!(db.chunk_state(h(10)).await.unwrap(), (0, Some(TTL), "valid".into()));
        let resumed = db.claim(cache, 1).await;
        assert_eq!(layout(&resumed), expected(&b.chunks));

        // Committed as uploaded by this writer (the rows the checkpoints
        // inserted exist)...
        db.commit_blob(&b, 2).await.unwrap();
        assert_eq!(db.chunk_state(h(10)).await.unwrap(), (2, None, "valid".into()));
        assert_eq!(db.chunk_state(h(11)).await.unwrap(), (1, None, "valid".into()));
        assert!(db.finish_upload(resumed.id, resumed.generation).await.unwrap());

        // ...or as found in the store.
        let other = "uploads/other/blobs/cc/10";
        let b = blob(2, &[(20, 5), (11, 5)]);
        let s = db.claim_upload(cache, other, false, 3, 3 + TTL).await.unwrap();
        db.checkpoint_upload(s.id, 1, &b.chunks, &b.packs, 3, 3 + TTL).await.unwrap();
        assert_eq!(db.chunk_state(h(11)).await.unwrap(), (1, None, "valid".into()));
        db.commit_blob(&deduplicated(b), 4).await.unwrap();
        assert_eq!(db.chunk_state(h(20)).await.unwrap(), (1, None, "valid".into()));
        assert_eq!(db.chunk_state(h(11)).await.unwrap(), (2, None, "valid".into()));
        assert!(db.finish_upload(s.id, 1).await.unwrap());
        db.assert_refcounts_consistent().await;
    }

    async fn large_checkpoints_span_batches(db: TestDb) {
        // More chunks than one INSERT or lookup takes, uploaded and skipped.
        let cache = db.cache_named("main").await;
        let known = blob(1, &(5000..5300).map(|i| (i, 3)).collect::<Vec<_>>());
        db.commit_blob(&known, 0).await.unwrap();
        let mut b = blob(2, &(1..=2500).map(|i| (i, 3)).chain((5000..5300).map(|i| (i, 3))).collect::<Vec<_>>());
        for chunk in &mut b.chunks[2500..] {
            chunk.uploaded = false;
        }
        let s = db.claim(cache, 0).await;
        db.checkpoint_upload(s.id, 1, &b.chunks[..1200], &b.packs, 0, TTL).await.unwrap();
        db.checkpoint_upload(s.id, 1, &b.chunks[1200..], &b.packs, 0, TTL).await.unwrap();
        let resumed = db.claim(cache, 1).await;
        assert_eq!(resumed.committed_size, b.size);
        assert_eq!(resumed.file_size, b.file_size);
        assert_eq!(layout(&resumed), expected(&b.chunks));
        db.commit_blob(&b, 2).await.unwrap();
        assert!(db.finish_upload(resumed.id, resumed.generation).await.unwrap());
        db.assert_refcounts_consistent().await;
    }

    async fn expire_uploads_respects_expiry_and_limit(db: TestDb) {
        let cache = db.cache_named("main").await;
        for (i, expires_at) in [(0, 100), (1, 200), (2, 200), (3, 300)] {
            let resource = format!("uploads/{i}/blobs/aa/1");
            db.claim_upload(cache, &resource, false, 0, expires_at).await.unwrap();
        }
        assert_eq!(db.expire_uploads(99, 10).await.unwrap(), 0);
        assert_eq!(db.expire_uploads(200, 2).await.unwrap(), 2);
        assert_eq!(db.expire_uploads(200, 2).await.unwrap(), 1);
        assert_eq!(db.expire_uploads(200, 2).await.unwrap(), 0);
        assert_eq!(db.count("upload_sessions").await, 1);
        assert_eq!(db.upload_status(cache, "uploads/3/blobs/aa/1", 200).await.unwrap(), Some(0));
    }
}
