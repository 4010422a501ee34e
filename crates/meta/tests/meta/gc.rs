use std::collections::HashMap;
use std::time::Duration;

use garret_meta::{CachePatch, ChunkId, Expired, MetaError, Pack, PackPlace};

use crate::support::{GRACE, TestDb, blob, both, deduplicated, frame, h, pack, present};

/// Ids of marked chunks, by digest, for readable assertions.
fn hashes(chunks: &[garret_meta::Chunk]) -> Vec<[u8; 32]> {
    let mut out: Vec<[u8; 32]> = chunks.iter().map(|c| c.hash).collect();
    out.sort_unstable();
    out
}

both! {
    async fn full_cycle(db: TestDb) {
        let cache = db.cache_named("main").await;
        // Blobs 1 and 2 share chunk 11.
        let b1 = db.commit_blob(&blob(1, &[(10, 5), (11, 5)]), 0).await.unwrap().blob_id;
        let b2 = db.commit_blob(&blob(2, &[(11, 5), (12, 5)]), 0).await.unwrap().blob_id;
        db.put_cas_entry(cache, b1, 0).await.unwrap();
        db.put_cas_entry(cache, b2, 0).await.unwrap();

        // Nothing is unreferenced yet.
        assert_eq!(db.gc_sweep_blobs(10 * GRACE, 100).await.unwrap(), 0);
        assert!(db.gc_mark_chunks(10 * GRACE, 100).await.unwrap().is_empty());

        // Blob 1 gains and loses a Nix object; its CAS entry still holds it.
        db.upsert_nix_object(cache, &nix_object(b1), 0).await.unwrap();
        db.delete_nix_object(cache, &"a".repeat(32), 1000).await.unwrap();
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (1, None), "the CAS entry still holds it");

        // A blob committed but never referenced.
        db.commit_blob(&blob(3, &[(12, 5), (13, 5)]), 1000).await.unwrap();
        assert_eq!(db.gc_sweep_blobs(1000 + GRACE - 1, 100).await.unwrap(), 0, "grace not over");
        assert_eq!(db.gc_sweep_blobs(1000 + GRACE, 100).await.unwrap(), 1);
        assert_eq!(db.blob_by_hash(&h(3)).await.unwrap(), None);
        // Chunk 13 lost its only use; chunk 12 still has blob 2.
        let t = 1000 + GRACE;
        assert_eq!(db.chunk_state(h(13)).await.unwrap(), (0, Some(t + GRACE), "valid".into()));
        assert_eq!(db.chunk_state(h(12)).await.unwrap(), (1, None, "valid".into()));

        assert!(db.gc_mark_chunks(t + GRACE - 1, 100).await.unwrap().is_empty(), "grace not over");
        let marked = db.gc_mark_chunks(t + GRACE, 100).await.unwrap();
        assert_eq!(hashes(&marked), [h(13)]);
        assert_eq!((marked[0].size, marked[0].stored_size), (5, 3));
        assert_eq!(marked[0].frame_hash, frame(13));
        assert_eq!(db.chunk_state(h(13)).await.unwrap().2, "deleting");
        // (The caller deletes the objects here.)
        let ids: Vec<ChunkId> = marked.iter().map(|c| c.id).collect();
        assert_eq!(db.gc_forget_chunks(&ids).await.unwrap(), 1);
        assert_eq!(db.chunk_state(h(13)).await, None);
        assert_eq!(
            present(&db, &[h(12), h(13)], t + GRACE).await.unwrap(),
            HashMap::from([(h(12), frame(12))])
        );
        db.assert_refcounts_consistent().await;
    }

    async fn repeated_chunk_released_per_use(db: TestDb) {
        db.commit_blob(&blob(1, &[(10, 5), (10, 5), (11, 1)]), 0).await.unwrap();
        db.commit_blob(&blob(2, &[(10, 5)]), 50).await.unwrap();
        assert_eq!(db.chunk_state(h(10)).await.unwrap().0, 3);
        assert_eq!(db.gc_sweep_blobs(GRACE, 100).await.unwrap(), 1);
        assert_eq!(db.chunk_state(h(10)).await.unwrap(), (1, None, "valid".into()));
        assert_eq!(db.gc_sweep_blobs(50 + GRACE, 100).await.unwrap(), 1);
        assert_eq!(db.chunk_state(h(10)).await.unwrap(), (0, Some(50 + 2 * GRACE), "valid".into()));
        assert_eq!(db.count("blob_chunks").await, 0);
        db.assert_refcounts_consistent().await;
    }

    async fn present_chunks_leases_unreferenced_chunks(db: TestDb) {
        // Chunk 10 is unreferenced and collectable from 2*GRACE on.
        db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap();
        db.gc_sweep_blobs(GRACE, 100).await.unwrap();
        assert_eq!(db.chunk_state(h(10)).await.unwrap().1, Some(2 * GRACE));

        // A writer finds it just before then and decides not to upload it.
        let now = 2 * GRACE - 1;
        assert_eq!(present(&db, &[h(10)], now).await.unwrap(), HashMap::from([(h(10), frame(10))]));
        assert_eq!(db.chunk_state(h(10)).await.unwrap().1, Some(now + GRACE));
        // GC cannot take it while the writer's upload is in flight...
        assert!(db.gc_mark_chunks(2 * GRACE, 100).await.unwrap().is_empty());
        assert!(db.gc_mark_chunks(now + GRACE - 1, 100).await.unwrap().is_empty());
        // ...so the writer's commit within the grace period succeeds.
        db.commit_blob(&deduplicated(blob(2, &[(10, 5)])), now + GRACE - 1).await.unwrap();
        assert_eq!(db.chunk_state(h(10)).await.unwrap(), (1, None, "valid".into()));

        // An earlier lease is never shortened by a later look.
        db.commit_blob(&blob(3, &[(11, 5)]), 0).await.unwrap();
        db.gc_sweep_blobs(GRACE, 100).await.unwrap();
        present(&db, &[h(11)], 10 * GRACE).await.unwrap();
        present(&db, &[h(11)], 5 * GRACE).await.unwrap();
        assert_eq!(db.chunk_state(h(11)).await.unwrap().1, Some(11 * GRACE));
    }

    async fn expired_lease_then_chunk_gone(db: TestDb) {
        // A writer that outlives the grace period gets ChunkGone, not a row
        // pointing at a deleted object.
        db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap();
        db.gc_sweep_blobs(GRACE, 100).await.unwrap();
        assert_eq!(present(&db, &[h(10)], GRACE).await.unwrap(), HashMap::from([(h(10), frame(10))]));
        let marked = db.gc_mark_chunks(2 * GRACE, 100).await.unwrap();
        let ids: Vec<ChunkId> = marked.iter().map(|c| c.id).collect();
        db.gc_forget_chunks(&ids).await.unwrap();
        let err = db.commit_blob(&deduplicated(blob(2, &[(10, 5)])), 2 * GRACE).await.unwrap_err();
        assert!(matches!(err, MetaError::ChunkGone(c) if c == h(10)), "{err}");
        assert_eq!(db.count("blobs").await, 0);
    }

    async fn crash_rerun_is_safe(db: TestDb) {
        db.commit_blob(&blob(1, &[(10, 5), (11, 5)]), 0).await.unwrap();
        db.gc_sweep_blobs(GRACE, 100).await.unwrap();
        let t = 2 * GRACE;

        // A worker marks, deletes one object, then dies before forgetting.
        let marked = db.gc_mark_chunks(t, 100).await.unwrap();
        assert_eq!(hashes(&marked), [h(10), h(11)]);
        // Another worker (or the restarted one) does not take the same rows
        // while the first might still be working on them...
        assert!(db.gc_mark_chunks(t, 100).await.unwrap().is_empty());
        assert!(db.gc_mark_chunks(t + GRACE - 1, 100).await.unwrap().is_empty());
        // ...and writers keep away from them meanwhile.
        assert!(matches!(
            present(&db, &[h(10)], t + 1).await,
            Err(MetaError::ChunkGone(_))
        ));
        // After the grace period the dead worker's marks are reclaimed; the
        // objects already deleted are simply deleted again.
        let again = db.gc_mark_chunks(t + GRACE, 100).await.unwrap();
        assert_eq!(hashes(&again), [h(10), h(11)]);
        let ids: Vec<ChunkId> = again.iter().map(|c| c.id).collect();
        assert_eq!(db.gc_forget_chunks(&ids).await.unwrap(), 2);
        // Forgetting twice (a crash after the commit, before the worker
        // noticed) is harmless.
        assert_eq!(db.gc_forget_chunks(&ids).await.unwrap(), 0);
        assert_eq!(db.count("chunks").await, 0);
    }

    async fn forget_ignores_unmarked_chunks(db: TestDb) {
        let commit = db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap();
        let chunks = db.blob_chunks(commit.blob_id, None).await.unwrap();
        assert_eq!(db.gc_forget_chunks(&[chunks[0].chunk.id]).await.unwrap(), 0);
        assert_eq!(db.chunk_state(h(10)).await.unwrap().0, 1);
    }

    async fn mark_and_sweep_respect_limit(db: TestDb) {
        for i in 0..10 {
            db.commit_blob(&blob(i, &[(100 + i, 1)]), 0).await.unwrap();
        }
        assert_eq!(db.gc_sweep_blobs(GRACE, 4).await.unwrap(), 4);
        assert_eq!(db.gc_sweep_blobs(GRACE, 4).await.unwrap(), 4);
        assert_eq!(db.gc_sweep_blobs(GRACE, 4).await.unwrap(), 2);
        assert_eq!(db.gc_mark_chunks(2 * GRACE, 3).await.unwrap().len(), 3);
        assert_eq!(db.gc_mark_chunks(2 * GRACE, 30).await.unwrap().len(), 7);
        assert!(db.gc_mark_chunks(2 * GRACE, 30).await.unwrap().is_empty());
    }

    async fn expired_blob_revived_by_recommit(db: TestDb) {
        // An unreferenced blob past its time is leased again when a writer
        // commits the same content, so it survives until referenced.
        db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap();
        let again = db.commit_blob(&deduplicated(blob(1, &[(10, 5)])), 3 * GRACE).await.unwrap();
        assert!(again.already_existed);
        assert_eq!(db.gc_sweep_blobs(3 * GRACE, 100).await.unwrap(), 0);
        assert_eq!(db.gc_sweep_blobs(4 * GRACE, 100).await.unwrap(), 1);
    }

    async fn expire_by_retention_and_deleted_cache(db: TestDb) {
        let kept = db.cache_named("kept").await;
        let short = db.cache_named("short").await;
        let retention = CachePatch { retention_period: Some(Some(1000)), ..CachePatch::default() };
        db.update_cache("short", &retention).await.unwrap();
        let doomed = db.cache_named("doomed").await;

        let b = db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap().blob_id;
        for cache in [kept, short, doomed] {
            db.upsert_nix_object(cache, &nix_object(b), 0).await.unwrap();
            db.put_cas_entry(cache, b, 0).await.unwrap();
            db.put_action_result(cache, &h(99), b"result", 0).await.unwrap();
        }
        // Accessed recently in `short`: survives its retention.
        db.upsert_nix_object(short, &nix_object_at('b', b), 0).await.unwrap();
        db.touch_nix_objects(&[(short, "b".repeat(32))], 600).await.unwrap();
        assert_eq!(db.blob_state(h(1)).await.unwrap().0, 7);

        assert!(db.gc_expire(999, None, 100).await.unwrap().is_empty());
        db.delete_cache("doomed", 999).await.unwrap();
        let expired = db.gc_expire(1000, None, 100).await.unwrap();
        // `doomed` loses everything, `short` what was last used at 0.
        assert_eq!(
            expired,
            Expired { nix_objects: 2, cas_entries: 2, action_results: 2 }
        );
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (3, None));
        assert!(db.nix_object(short, &"b".repeat(32)).await.unwrap().is_some());
        assert!(db.nix_object(kept, &"a".repeat(32)).await.unwrap().is_some());
        assert!(db.gc_expire(1000, None, 100).await.unwrap().is_empty());

        // A default retention covers caches without their own.
        let expired = db.gc_expire(1600, Some(Duration::from_secs(1000)), 100).await.unwrap();
        assert_eq!(
            expired,
            Expired { nix_objects: 2, cas_entries: 1, action_results: 1 }
        );
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (0, Some(1600 + GRACE)));
        assert_eq!(db.count("nix_objects").await + db.count("cas_entries").await, 0);
        db.assert_refcounts_consistent().await;
    }

    async fn expire_respects_limit(db: TestDb) {
        let cache = db.cache_named("doomed").await;
        let b = db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap().blob_id;
        for path in ['a', 'b', 'c'] {
            db.upsert_nix_object(cache, &nix_object_at(path, b), 0).await.unwrap();
        }
        db.delete_cache("doomed", 1).await.unwrap();
        assert_eq!(db.gc_expire(1, None, 2).await.unwrap().nix_objects, 2);
        assert_eq!(db.gc_expire(1, None, 2).await.unwrap().nix_objects, 1);
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (0, Some(1 + GRACE)));
    }

    async fn packs_count_the_live_bytes_of_their_chunks(db: TestDb) {
        // Blob 1's chunks (frames of 6 and 11 bytes) are live in pack 1.
        db.commit_blob(&blob(1, &[(20, 10), (21, 20)]), 0).await.unwrap();
        let pack_1 = Pack { key: pack(1), size: 17, live_bytes: 17 };
        assert_eq!(db.packs(10).await.unwrap(), [pack_1]);
        // Blob 2 was written alongside and stored chunk 21 again, in its own
        // pack: that copy is dead on arrival, the row keeps pack 1's.
        db.commit_blob(&blob(2, &[(21, 20), (22, 4)]), 1).await.unwrap();
        let pack_2 = Pack { key: pack(2), size: 14, live_bytes: 3 };
        assert_eq!(db.packs(10).await.unwrap(), [pack_1, pack_2]);
        let present = db.present_chunks(&[h(21), h(22)], 2).await.unwrap();
        assert_eq!(present[&h(21)].pack, Some(PackPlace { pack: pack(1), offset: 6 }));
        assert_eq!(present[&h(22)].pack, Some(PackPlace { pack: pack(2), offset: 11 }));

        // Collecting the chunks takes their bytes off their packs.
        assert_eq!(db.gc_sweep_blobs(2 * GRACE, 10).await.unwrap(), 2);
        let marked = db.gc_mark_chunks(4 * GRACE, 10).await.unwrap();
        assert_eq!(marked.len(), 3);
        assert!(marked.iter().all(|c| c.pack.is_some()));
        let ids: Vec<ChunkId> = marked.iter().map(|c| c.id).collect();
        assert_eq!(db.gc_forget_chunks(&ids).await.unwrap(), 3);
        assert_eq!(db.gc_forget_chunks(&ids).await.unwrap(), 0);
        let dead: Vec<u64> = db.packs(10).await.unwrap().iter().map(|p| p.live_bytes).collect();
        assert_eq!(dead, [0, 0]);
        db.assert_refcounts_consistent().await;

        // An uploaded chunk must name a pack the commit lists.
        let mut unplaced = blob(3, &[(30, 8)]);
        unplaced.chunks[0].pack = None;
        assert!(matches!(db.commit_blob(&unplaced, 5).await, Err(MetaError::Invalid(_))));
        let mut unlisted = blob(4, &[(40, 8)]);
        unlisted.packs.clear();
        assert!(matches!(db.commit_blob(&unlisted, 5).await, Err(MetaError::Invalid(_))));
    }

    async fn lease_blob_keeps_a_proven_blob_for_its_new_reference(db: TestDb) {
        let cache = db.cache_named("main").await;
        let b1 = db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap().blob_id;
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (0, Some(GRACE)));
        // Within the grace period the lease extends it.
        let leased = db.lease_blob(&h(1), GRACE - 1).await.unwrap().unwrap();
        assert_eq!(leased.id, b1);
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (0, Some(2 * GRACE - 1)));
        assert_eq!(db.gc_sweep_blobs(GRACE, 10).await.unwrap(), 0, "leased");
        db.put_cas_entry(cache, b1, GRACE).await.unwrap();
        // A referenced blob is leased without change; an unknown one is None.
        assert!(db.lease_blob(&h(1), 10 * GRACE).await.unwrap().is_some());
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (1, None));
        assert_eq!(db.lease_blob(&h(9), 0).await.unwrap(), None);
        // A blob already due for collection is not handed out.
        db.commit_blob(&blob(2, &[(11, 5)]), 0).await.unwrap();
        assert_eq!(db.lease_blob(&h(2), GRACE).await.unwrap(), None);
        db.assert_refcounts_consistent().await;
    }
}

fn nix_object(blob_id: garret_meta::BlobId) -> garret_meta::NixObject {
    nix_object_at('a', blob_id)
}

fn nix_object_at(path: char, blob_id: garret_meta::BlobId) -> garret_meta::NixObject {
    let hash: String = std::iter::repeat_n(path, 32).collect();
    garret_meta::NixObject {
        store_path: format!("{hash}-x"),
        store_path_hash: hash,
        blob_id,
        nar_hash: h(1),
        nar_size: 10,
        references: Vec::new(),
        deriver: None,
        sigs: Vec::new(),
        ca: None,
        system: None,
    }
}

both! {
    async fn gc_runs_keep_the_last_and_the_last_success(db: TestDb) {
        use garret_meta::{GcRun, GcRuns};
        assert_eq!(db.gc_runs().await.unwrap(), GcRuns::default());
        let ok = GcRun { finished_at: 10, succeeded: true, report: Some("{\"chunks\":3}".into()) };
        db.record_gc_run(&ok).await.unwrap();
        let runs = db.gc_runs().await.unwrap();
        assert_eq!(runs.last.as_ref(), Some(&ok));
        assert_eq!(runs.last_success.as_ref(), Some(&ok));
        let failed = GcRun { finished_at: 20, succeeded: false, report: None };
        db.record_gc_run(&failed).await.unwrap();
        let runs = db.gc_runs().await.unwrap();
        assert_eq!(runs.last, Some(failed));
        assert_eq!(runs.last_success, Some(ok), "a failure keeps the last success");
    }
}
