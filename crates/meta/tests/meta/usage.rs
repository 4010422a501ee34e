use garret_meta::{CacheUsage, NixObject};

use crate::access::object;
use crate::support::{TestDb, blob, both, h};

fn sized(path_hash: char, blob_id: garret_meta::BlobId, nar_size: u64) -> NixObject {
    NixObject {
        nar_size,
        ..object(path_hash, blob_id)
    }
}

both! {
    async fn caches_with_usage_counts_each_cache_in_one_query(db: TestDb) {
        let nix = db.cache_named("nix").await;
        let bazel = db.cache_named("bazel").await;
        db.cache_named("empty").await;
        let gone = db.cache_named("gone").await;
        let small = db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap().blob_id;
        let large = db.commit_blob(&blob(2, &[(20, 300), (21, 400)]), 0).await.unwrap().blob_id;

        db.upsert_nix_object(nix, &sized('a', small, 5), 1).await.unwrap();
        db.upsert_nix_object(nix, &sized('b', large, 700), 1).await.unwrap();
        // The same bytes in another cache count there too: usage is logical.
        assert!(db.put_cas_entry(bazel, large, 1).await.unwrap());
        assert!(db.put_cas_entry(bazel, small, 1).await.unwrap());
        db.put_action_result(bazel, &h(9), b"result", 1).await.unwrap();
        db.put_action_result(bazel, &h(8), b"result", 1).await.unwrap();
        // A deleted cache is not listed, whatever it still holds.
        db.upsert_nix_object(gone, &sized('c', small, 5), 1).await.unwrap();
        db.delete_cache("gone", 2).await.unwrap();

        let listed = db.caches_with_usage().await.unwrap();
        let figures: Vec<(&str, CacheUsage)> =
            listed.iter().map(|(cache, usage)| (cache.name.as_str(), *usage)).collect();
        assert_eq!(
            figures,
            [
                ("bazel", CacheUsage { cas_entries: 2, cas_bytes: 705, action_results: 2, ..CacheUsage::default() }),
                ("empty", CacheUsage::default()),
                ("nix", CacheUsage { nix_objects: 2, nix_bytes: 705, ..CacheUsage::default() }),
            ]
        );
        assert_eq!(figures[0].1.logical_bytes(), 705);
        // The cache rows are the ones `cache` reads.
        assert_eq!(listed[2].0, db.cache("nix").await.unwrap());
    }
}
