use garret_meta::{CachePatch, MetaError};

use crate::support::{TestDb, both, new_cache};

both! {
    async fn create_get_update_delete(db: TestDb) {
        let created = db.create_cache(&new_cache("main"), 10).await.unwrap();
        assert_eq!(created.name, "main");
        assert_eq!(created.created_at, 10);
        assert_eq!(created.upstream_cache_key_names, ["cache.nixos.org-1"]);
        assert_eq!(db.cache("main").await.unwrap(), created);

        let patch = CachePatch {
            is_public: Some(false),
            priority: Some(30),
            upstream_cache_key_names: Some(vec!["a-1".into(), "quote\"d".into()]),
            retention_period: Some(Some(3600)),
            ..CachePatch::default()
        };
        let updated = db.update_cache("main", &patch).await.unwrap();
        assert!(!updated.is_public);
        assert_eq!(updated.priority, 30);
        assert_eq!(updated.upstream_cache_key_names, ["a-1", "quote\"d"]);
        assert_eq!(updated.retention_period, Some(3600));
        assert_eq!(updated.store_dir, created.store_dir, "untouched field kept");
        assert_eq!(updated.signing_key, created.signing_key);

        let cleared = CachePatch { retention_period: Some(None), ..CachePatch::default() };
        let updated = db.update_cache("main", &cleared).await.unwrap();
        assert_eq!(updated.retention_period, None);
        assert_eq!(updated.priority, 30);
        assert_eq!(db.cache("main").await.unwrap(), updated);

        db.delete_cache("main", 20).await.unwrap();
        assert!(matches!(db.cache("main").await, Err(MetaError::NotFound("cache"))));
        assert!(matches!(
            db.update_cache("main", &patch).await,
            Err(MetaError::NotFound("cache"))
        ));
        assert!(matches!(db.delete_cache("main", 21).await, Err(MetaError::NotFound("cache"))));
    }

    async fn cas_budget_set_read_cleared(db: TestDb) {
        let created = db.create_cache(&new_cache("bazel"), 0).await.unwrap();
        assert_eq!(created.cas_budget_bytes, None);
        let budget = CachePatch { cas_budget_bytes: Some(Some(50 << 30)), ..CachePatch::default() };
        let updated = db.update_cache("bazel", &budget).await.unwrap();
        assert_eq!(updated.cas_budget_bytes, Some(50 << 30));
        assert_eq!(db.cache("bazel").await.unwrap(), updated);
        // The one-query lookup decodes the same columns.
        assert_eq!(db.cache_and_nix_object("bazel", &"a".repeat(32)).await.unwrap().0, updated);

        // Retention 0 (keep forever) is a value of its own, not a clear.
        let forever = CachePatch { retention_period: Some(Some(0)), ..CachePatch::default() };
        let updated = db.update_cache("bazel", &forever).await.unwrap();
        assert_eq!((updated.retention_period, updated.cas_budget_bytes), (Some(0), Some(50 << 30)));

        for bad in [
            CachePatch { cas_budget_bytes: Some(Some(0)), ..CachePatch::default() },
            CachePatch { cas_budget_bytes: Some(Some(u64::MAX)), ..CachePatch::default() },
            CachePatch { retention_period: Some(Some(-1)), ..CachePatch::default() },
        ] {
            let err = db.update_cache("bazel", &bad).await.unwrap_err();
            assert!(matches!(err, MetaError::Invalid(_)), "{bad:?}: {err}");
        }
        let cleared = CachePatch { cas_budget_bytes: Some(None), ..CachePatch::default() };
        let updated = db.update_cache("bazel", &cleared).await.unwrap();
        assert_eq!((updated.retention_period, updated.cas_budget_bytes), (Some(0), None));
    }

    async fn caches_lists_the_live_ones_by_name(db: TestDb) {
        assert!(db.caches().await.unwrap().is_empty());
        for name in ["zeta", "alpha", "gone", "mid"] {
            db.create_cache(&new_cache(name), 0).await.unwrap();
        }
        db.delete_cache("gone", 1).await.unwrap();
        assert!(db.cache_name_ever_used("gone").await.unwrap());
        assert!(db.cache_name_ever_used("mid").await.unwrap());
        assert!(!db.cache_name_ever_used("never").await.unwrap());
        let listed = db.caches().await.unwrap();
        let names: Vec<&str> = listed.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["alpha", "mid", "zeta"]);
        assert_eq!(listed[0], db.cache("alpha").await.unwrap());
    }

    async fn duplicate_live_name_already_exists(db: TestDb) {
        let first = db.create_cache(&new_cache("dup"), 0).await.unwrap();
        let err = db.create_cache(&new_cache("dup"), 1).await.unwrap_err();
        assert!(matches!(&err, MetaError::AlreadyExists(what) if what == "cache dup"), "{err}");

        // A soft delete frees the name; the new cache is a different one.
        db.delete_cache("dup", 2).await.unwrap();
        let second = db.create_cache(&new_cache("dup"), 3).await.unwrap();
        assert_ne!(second.id, first.id);
        assert_eq!(db.cache("dup").await.unwrap().id, second.id);
    }

    async fn cache_names_follow_attic(db: TestDb) {
        for good in ["a", "A9", "my-cache_1+x", &"x".repeat(50)] {
            db.create_cache(&new_cache(good), 0).await.unwrap();
        }
        for bad in ["", "-a", "_a", "a b", "a/b", "ä", &"x".repeat(51)] {
            let err = db.create_cache(&new_cache(bad), 0).await.unwrap_err();
            assert!(matches!(err, MetaError::Invalid(_)), "{bad:?}: {err}");
        }
    }

    async fn debug_output_hides_signing_key(db: TestDb) {
        let cache = db.create_cache(&new_cache("secret"), 0).await.unwrap();
        let shown = format!("{cache:?} {:?}", new_cache("secret"));
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
