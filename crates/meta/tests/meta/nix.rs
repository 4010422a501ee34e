use garret_meta::{BlobId, MetaError, NixObject};

use crate::support::{GRACE, TestDb, blob, both, h};

fn object(path_hash: char, blob_id: BlobId, nar: u32) -> NixObject {
    let store_path_hash: String = std::iter::repeat_n(path_hash, 32).collect();
    NixObject {
        store_path: format!("{store_path_hash}-hello-2.12"),
        store_path_hash,
        blob_id,
        nar_hash: h(nar),
        nar_size: 5,
        references: vec!["0000000000000000000000000000000a-glibc".into()],
        deriver: Some("zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-hello-2.12.drv".into()),
        sigs: vec!["cache-1:AAAA".into(), "other-1:BBBB".into()],
        ca: None,
        system: Some("x86_64-linux".into()),
    }
}

both! {
    async fn upsert_get_touch_delete(db: TestDb) {
        let cache = db.cache_named("nix").await;
        let other = db.cache_named("other").await;
        let b = db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap().blob_id;
        let obj = object('a', b, 1);
        db.upsert_nix_object(cache, &obj, 10).await.unwrap();

        let row = db.nix_object(cache, &obj.store_path_hash).await.unwrap().unwrap();
        assert_eq!(row.object, obj);
        assert_eq!(row.blob.id, b);
        assert_eq!((row.blob.size, row.blob.file_hash), (5, h(1_000_001)));
        assert_eq!((row.created_at, row.accessed_at), (10, 10));
        assert_eq!(db.nix_object(other, &obj.store_path_hash).await.unwrap(), None);

        let a = "a".repeat(32);
        let (c, d) = ("c".repeat(32), "d".repeat(32));
        let asked = [c.as_str(), a.as_str(), c.as_str(), d.as_str()];
        assert_eq!(db.missing_store_paths(cache, &asked).await.unwrap(), [c.clone(), d.clone()]);
        assert_eq!(db.missing_store_paths(other, &asked).await.unwrap(), [c, a.clone(), d]);

        db.touch_nix_objects(&[(cache, a.as_str())], 50).await.unwrap();
        let row = db.nix_object(cache, &a).await.unwrap().unwrap();
        assert_eq!((row.created_at, row.accessed_at), (10, 50));

        db.delete_nix_object(cache, &a, 60).await.unwrap();
        assert_eq!(db.nix_object(cache, &a).await.unwrap(), None);
        assert!(matches!(
            db.delete_nix_object(cache, &a, 61).await,
            Err(MetaError::NotFound("nix object"))
        ));
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (0, Some(60 + GRACE)));
        db.assert_refcounts_consistent().await;
    }

    async fn cache_and_object_in_one_query(db: TestDb) {
        let cache = db.cache_named("nix").await;
        db.cache_named("other").await;
        let b = db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap().blob_id;
        let obj = object('a', b, 1);
        db.upsert_nix_object(cache, &obj, 10).await.unwrap();

        let (found, row) = db.cache_and_nix_object("nix", &obj.store_path_hash).await.unwrap();
        assert_eq!(found, db.cache("nix").await.unwrap());
        assert!(row.is_some());
        assert_eq!(row, db.nix_object(cache, &obj.store_path_hash).await.unwrap());
        // Another cache's path, or a path stored nowhere: the cache alone.
        let (found, row) = db.cache_and_nix_object("other", &obj.store_path_hash).await.unwrap();
        assert_eq!((found.name.as_str(), row), ("other", None));
        let (found, row) = db.cache_and_nix_object("nix", &"b".repeat(32)).await.unwrap();
        assert_eq!((found.id, row), (cache, None));
        // No live cache by that name: as `cache` says.
        db.delete_cache("nix", 20).await.unwrap();
        for name in ["nix", "nosuch"] {
            assert!(matches!(
                db.cache_and_nix_object(name, &obj.store_path_hash).await,
                Err(MetaError::NotFound("cache"))
            ));
        }
    }

    async fn upsert_accounts_blob_references(db: TestDb) {
        let cache = db.cache_named("nix").await;
        let other = db.cache_named("other").await;
        let b1 = db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap().blob_id;
        let b2 = db.commit_blob(&blob(2, &[(11, 5)]), 0).await.unwrap().blob_id;

        db.upsert_nix_object(cache, &object('a', b1, 1), 1).await.unwrap();
        db.upsert_nix_object(other, &object('a', b1, 1), 1).await.unwrap();
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (2, None));

        // Same object again: no change in references.
        db.upsert_nix_object(cache, &object('a', b1, 1), 2).await.unwrap();
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (2, None));

        // Replaced by another NAR: the old blob loses the reference.
        db.upsert_nix_object(cache, &object('a', b2, 2), 3).await.unwrap();
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (1, None));
        assert_eq!(db.blob_state(h(2)).await.unwrap(), (1, None));
        db.upsert_nix_object(other, &object('a', b2, 2), 4).await.unwrap();
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (0, Some(4 + GRACE)));
        assert_eq!(db.blob_state(h(2)).await.unwrap(), (2, None));

        // Re-referencing an unreferenced blob clears its deletion time.
        db.upsert_nix_object(cache, &object('b', b1, 1), 5).await.unwrap();
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (1, None));

        let row = db.nix_object(cache, &"a".repeat(32)).await.unwrap().unwrap();
        assert_eq!(row.blob.id, b2);
        assert_eq!(row.created_at, 3);
        db.assert_refcounts_consistent().await;
    }

    async fn concurrent_upserts_of_one_path(db: TestDb) {
        let cache = db.cache_named("nix").await;
        let b1 = db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap().blob_id;
        let b2 = db.commit_blob(&blob(2, &[(11, 5)]), 0).await.unwrap().blob_id;
        for round in 0..10 {
            let path = char::from(b'a' + round);
            let (first, second) = (object(path, b1, 1), object(path, b2, 2));
            let (x, y) = tokio::join!(
                db.upsert_nix_object(cache, &first, 1),
                db.upsert_nix_object(cache, &second, 1),
            );
            x.unwrap();
            y.unwrap();
        }
        assert_eq!(db.count("nix_objects").await, 10);
        db.assert_refcounts_consistent().await;
    }

    async fn concurrent_swaps_of_one_path(db: TestDb) {
        // Two upserts swapping one path between two blobs.
        let cache = db.cache_named("nix").await;
        let b1 = db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap().blob_id;
        let b2 = db.commit_blob(&blob(2, &[(11, 5)]), 0).await.unwrap().blob_id;
        let (to_b1, to_b2) = (object('a', b1, 1), object('a', b2, 2));
        db.upsert_nix_object(cache, &to_b1, 1).await.unwrap();
        for _ in 0..20 {
            let (x, y) = tokio::join!(
                db.upsert_nix_object(cache, &to_b2, 2),
                db.upsert_nix_object(cache, &to_b1, 2),
            );
            x.unwrap();
            y.unwrap();
        }
        db.assert_refcounts_consistent().await;
    }

    async fn upsert_of_a_collected_blob_is_not_found(db: TestDb) {
        let cache = db.cache_named("nix").await;
        let b = db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap().blob_id;
        assert_eq!(db.gc_sweep_blobs(GRACE, 10).await.unwrap(), 1);
        let err = db.upsert_nix_object(cache, &object('a', b, 1), GRACE).await.unwrap_err();
        assert!(matches!(err, MetaError::NotFound("blob")), "{err}");
        assert_eq!(db.count("nix_objects").await, 0);
    }
}

/// Postgres only, because only Postgres aborts deadlock victims, and the
/// retry of such a victim is what this tests.
///
/// Transaction A holds blob 1, which the upsert must release a reference on,
/// and waits for the path the upsert holds; C holds blob 2 just long enough
/// that A is already waiting when the upsert reaches blob 1. A and C never
/// check for deadlocks themselves (long `deadlock_timeout`), so the upsert is
/// the victim.
#[tokio::test]
async fn postgres_deadlock_victim_is_retried() {
    use std::time::Duration;

    use crate::support::Raw;

    let db = crate::support::postgres().await;
    let Raw::Postgres(raw) = &db.raw else {
        unreachable!()
    };
    let cache = db.cache_named("nix").await;
    let b1 = db
        .commit_blob(&blob(1, &[(10, 5)]), 0)
        .await
        .unwrap()
        .blob_id;
    let b2 = db
        .commit_blob(&blob(2, &[(11, 5)]), 0)
        .await
        .unwrap()
        .blob_id;
    db.upsert_nix_object(cache, &object('a', b1, 1), 1)
        .await
        .unwrap();

    let mut holders = Vec::new();
    for blob in [b1, b2] {
        let mut tx = raw.begin().await.unwrap();
        sqlx::raw_sql("SET LOCAL deadlock_timeout = '1min'")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("UPDATE blobs SET deletable_at = deletable_at WHERE id = $1")
            .bind(blob.0)
            .execute(&mut *tx)
            .await
            .unwrap();
        holders.push(tx);
    }
    let (mut c, mut a) = (holders.pop().unwrap(), holders.pop().unwrap());

    // The upsert locks the path, then waits for C on blob 2.
    let upsert = tokio::spawn({
        let meta = db.meta.clone();
        async move { meta.upsert_nix_object(cache, &object('a', b2, 2), 2).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a_waits_for_path = async {
        sqlx::query("UPDATE nix_objects SET accessed_at = accessed_at WHERE cache_id = $1")
            .bind(cache.0)
            .execute(&mut *a)
            .await
            .unwrap();
        a.commit().await.unwrap();
    };
    let c_lets_go = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The upsert moves on to blob 1 and closes the cycle.
        sqlx::query("SELECT 1").execute(&mut *c).await.unwrap();
        c.commit().await.unwrap();
    };
    tokio::join!(a_waits_for_path, c_lets_go);
    upsert.await.unwrap().unwrap();

    let row = db
        .nix_object(cache, &"a".repeat(32))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.blob.id, b2);
    db.assert_refcounts_consistent().await;
}

both! {
    async fn nix_uploads_prove_possession_per_cache(db: TestDb) {
        let main = db.cache_named("main").await;
        let other = db.cache_named("other").await;
        let b1 = db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap().blob_id;
        assert!(!db.nix_upload_exists(main, b1, 0).await.unwrap());
        db.record_nix_upload(main, b1, 5).await.unwrap();
        db.record_nix_upload(main, b1, 7).await.unwrap();
        assert!(db.nix_upload_exists(main, b1, 7).await.unwrap());
        assert!(!db.nix_upload_exists(main, b1, 8).await.unwrap(), "too old");
        assert!(!db.nix_upload_exists(other, b1, 0).await.unwrap(), "another cache's upload");
        // A blob swept by GC takes its upload rows with it.
        assert_eq!(db.gc_sweep_blobs(10 * GRACE, 10).await.unwrap(), 1);
        assert!(!db.nix_upload_exists(main, b1, 0).await.unwrap());
    }
}
