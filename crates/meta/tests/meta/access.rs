use garret_meta::{BlobId, NixObject};

use crate::support::{TestDb, blob, both, h};

/// A Nix object at `path_hash` repeated, holding `blob_id` with a NAR of
/// 5 bytes (other tests set what they count on).
pub(crate) fn object(path_hash: char, blob_id: BlobId) -> NixObject {
    let store_path_hash: String = std::iter::repeat_n(path_hash, 32).collect();
    NixObject {
        store_path: format!("{store_path_hash}-x"),
        store_path_hash,
        blob_id,
        nar_hash: h(1),
        nar_size: 5,
        references: Vec::new(),
        deriver: None,
        sigs: Vec::new(),
        ca: None,
        system: None,
    }
}

both! {
    async fn touches_of_several_caches_in_one_call(db: TestDb) {
        let main = db.cache_named("main").await;
        let other = db.cache_named("other").await;
        let empty = db.cache_named("empty").await;
        let b = db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap().blob_id;
        for cache in [main, other] {
            db.put_cas_entry(cache, b, 0).await.unwrap();
            db.upsert_nix_object(cache, &object('a', b), 0).await.unwrap();
            db.put_action_result(cache, &h(9), b"result", 0).await.unwrap();
        }
        let a = "a".repeat(32);

        // Repeats count once; keys a cache lacks change nothing.
        let cas = [(main, h(1)), (other, h(1)), (main, h(1)), (empty, h(1)), (main, h(2))];
        assert_eq!(db.touch_cas(&cas, 50).await.unwrap(), 2);
        let objects = [(main, a.as_str()), (other, a.as_str()), (empty, a.as_str())];
        assert_eq!(db.touch_nix_objects(&objects, 50).await.unwrap(), 2);
        let results = [(other, h(9)), (main, h(9)), (main, h(8))];
        assert_eq!(db.touch_action_results(&results, 50).await.unwrap(), 2);
        for cache in [main, other] {
            assert_eq!(db.cas_accessed_at(cache, &h(1)).await.unwrap(), Some(50));
            assert_eq!(db.nix_object(cache, &a).await.unwrap().unwrap().accessed_at, 50);
            assert_eq!(db.action_result_accessed_at(cache, &h(9)).await.unwrap(), Some(50));
        }

        // Rows touched this second are not rewritten, and time never goes
        // backwards.
        for now in [50, 40] {
            assert_eq!(db.touch_cas(&cas, now).await.unwrap(), 0);
            assert_eq!(db.touch_nix_objects(&objects, now).await.unwrap(), 0);
            assert_eq!(db.touch_action_results(&results, now).await.unwrap(), 0);
        }
        assert_eq!(db.cas_accessed_at(main, &h(1)).await.unwrap(), Some(50));

        // Nothing to touch is no transaction at all.
        assert_eq!(db.touch_cas(&[], 60).await.unwrap(), 0);
        assert_eq!(db.touch_nix_objects::<&str>(&[], 60).await.unwrap(), 0);
        assert_eq!(db.touch_action_results(&[], 60).await.unwrap(), 0);
        db.assert_refcounts_consistent().await;
    }

    async fn touches_beyond_one_statement(db: TestDb) {
        // More entries than one statement binds (1024), in two caches.
        let main = db.cache_named("main").await;
        let other = db.cache_named("other").await;
        let blobs: Vec<_> = (0..1100).map(|i| blob(i, &[(i + 10_000, 1)])).collect();
        let ids: Vec<BlobId> =
            db.commit_blobs(&blobs, 0).await.unwrap().iter().map(|c| c.blob_id).collect();
        db.put_cas_entries(main, &ids, 0).await.unwrap();
        db.put_cas_entries(other, &ids[..3], 0).await.unwrap();
        let touches: Vec<_> = (0..1100)
            .map(|i| (main, h(i)))
            .chain((0..3).map(|i| (other, h(i))))
            .collect();
        assert_eq!(db.touch_cas(&touches, 70).await.unwrap(), 1103);
        for i in [0, 1023, 1024, 1099] {
            assert_eq!(db.cas_accessed_at(main, &h(i)).await.unwrap(), Some(70), "entry {i}");
        }
        assert_eq!(db.cas_accessed_at(other, &h(2)).await.unwrap(), Some(70));
        assert_eq!(db.cas_accessed_at(other, &h(3)).await.unwrap(), None);
    }
}
