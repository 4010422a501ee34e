use garret_meta::{BlobId, MetaError};

use crate::support::{GRACE, TestDb, blob, both, h};

both! {
    async fn cas_entries_of_a_batch_go_in_together(db: TestDb) {
        let main = db.cache_named("main").await;
        let ids: Vec<BlobId> = db
            .commit_blobs(&[blob(1, &[(10, 5)]), blob(2, &[(20, 5)]), blob(3, &[(30, 5)])], 0)
            .await
            .unwrap()
            .iter()
            .map(|c| c.blob_id)
            .collect();
        assert!(db.put_cas_entry(main, ids[2], 1).await.unwrap());
        // New, new, repeated, already there.
        let batch = [ids[0], ids[1], ids[0], ids[2]];
        assert_eq!(db.put_cas_entries(main, &batch, 2).await.unwrap(), [true, true, false, false]);
        for n in 1..=3 {
            assert_eq!(db.blob_state(h(n)).await.unwrap(), (1, None));
        }
        // A vanished blob fails the whole batch.
        let err = db.put_cas_entries(main, &[ids[0], BlobId(ids[2].0 + 100)], 3).await.unwrap_err();
        assert!(matches!(err, MetaError::NotFound(_)), "{err}");
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (1, None));
        db.assert_refcounts_consistent().await;
    }

    async fn cas_entries_reference_blobs_per_cache(db: TestDb) {
        let main = db.cache_named("main").await;
        let other = db.cache_named("other").await;
        let b = db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap().blob_id;

        assert!(db.put_cas_entry(main, b, 1).await.unwrap());
        assert!(!db.put_cas_entry(main, b, 2).await.unwrap());
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (1, None));
        assert!(db.put_cas_entry(other, b, 3).await.unwrap());
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (2, None));

        assert_eq!(db.cas_blob(main, &h(1)).await.unwrap().unwrap().id, b);
        assert_eq!(db.cas_blob(main, &h(2)).await.unwrap(), None);

        let third = db.cache_named("third").await;
        assert_eq!(db.cas_blob(third, &h(1)).await.unwrap(), None);
        let asked = [(h(2), 5), (h(1), 5), (h(2), 5), (h(3), 5), (h(1), 6)];
        assert_eq!(
            db.find_missing_cas(main, &asked).await.unwrap(),
            [(h(2), 5), (h(3), 5), (h(1), 6)],
            "a right hash with a wrong size is missing"
        );
        assert_eq!(
            db.find_missing_cas(third, &asked).await.unwrap(),
            [(h(2), 5), (h(1), 5), (h(3), 5), (h(1), 6)]
        );

        // h(2) has no entry: nothing to touch.
        assert_eq!(db.touch_cas(&[(main, h(1)), (main, h(2))], 50).await.unwrap(), 1);
        assert_eq!(db.cas_accessed_at(main, &h(1)).await.unwrap(), Some(50));
        assert_eq!(db.cas_accessed_at(other, &h(1)).await.unwrap(), Some(3));
        assert_eq!(db.cas_accessed_at(main, &h(2)).await.unwrap(), None);

        let err = db.put_cas_entry(main, BlobId(b.0 + 100), 4).await.unwrap_err();
        assert!(matches!(err, MetaError::NotFound("blob")), "{err}");
        db.assert_refcounts_consistent().await;
    }

    async fn find_missing_cas_in_batches(db: TestDb) {
        let cache = db.cache_named("main").await;
        for i in (0..150).step_by(7) {
            let b = db.commit_blob(&blob(i, &[(i + 1000, 1)]), 0).await.unwrap().blob_id;
            db.put_cas_entry(cache, b, 0).await.unwrap();
        }
        let asked: Vec<([u8; 32], u64)> = (0..150).map(|i| (h(i), 1)).collect();
        let expected: Vec<([u8; 32], u64)> =
            (0..150).filter(|i| i % 7 != 0).map(|i| (h(i), 1)).collect();
        assert_eq!(db.find_missing_cas(cache, &asked).await.unwrap(), expected);
    }

    async fn action_results_round_trip(db: TestDb) {
        let main = db.cache_named("main").await;
        let other = db.cache_named("other").await;
        assert_eq!(db.get_action_result(main, &h(1)).await.unwrap(), None);
        db.put_action_result(main, &h(1), b"\x0a\x02first", 1).await.unwrap();
        assert_eq!(db.get_action_result(main, &h(1)).await.unwrap().unwrap(), b"\x0a\x02first");
        assert_eq!(db.get_action_result(other, &h(1)).await.unwrap(), None);
        db.put_action_result(main, &h(1), b"second", 2).await.unwrap();
        assert_eq!(db.get_action_result(main, &h(1)).await.unwrap().unwrap(), b"second");
        assert_eq!(db.count("action_results").await, 1);

        // Serving a result refreshes it for retention, never backwards.
        db.touch_action_results(&[(main, h(1))], 50).await.unwrap();
        db.touch_action_results(&[(main, h(1))], 40).await.unwrap();
        db.touch_action_results(&[(other, h(1))], 60).await.unwrap();
        assert_eq!(db.action_result_accessed_at(main, &h(1)).await.unwrap(), Some(50));
        assert_eq!(db.action_result_accessed_at(other, &h(1)).await.unwrap(), None);
    }

    async fn unreferenced_cas_blob_expires(db: TestDb) {
        // A blob committed for the CAS but never entered is swept after the
        // grace period; once entered, it stays.
        let cache = db.cache_named("main").await;
        db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap();
        let kept = db.commit_blob(&blob(2, &[(11, 5)]), 0).await.unwrap().blob_id;
        db.put_cas_entry(cache, kept, 1).await.unwrap();
        assert_eq!(db.gc_sweep_blobs(GRACE, 10).await.unwrap(), 1);
        assert_eq!(db.blob_by_hash(&h(1)).await.unwrap(), None);
        assert!(db.blob_by_hash(&h(2)).await.unwrap().is_some());
    }
}
