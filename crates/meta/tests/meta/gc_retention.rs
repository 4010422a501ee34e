//! Expiry that keeps closures whole and pinned paths, CAS budgets, and the
//! retirement and rewrite of packs.

use std::time::Duration;

use garret_meta::{BlobId, CacheId, ChunkId, Evicted, Expired, NewPack, PackPlace};

use crate::support::{GRACE, Raw, TestDb, blob, both, h, pack};

/// A Nix object at store path hash `path` (32 × the letter) referring to
/// `refs` (letters too).
fn object(path: char, blob_id: BlobId, refs: &[char]) -> garret_meta::NixObject {
    let hash = |c: char| std::iter::repeat_n(c, 32).collect::<String>();
    garret_meta::NixObject {
        store_path: format!("{}-{path}", hash(path)),
        store_path_hash: hash(path),
        blob_id,
        nar_hash: h(1),
        nar_size: 10,
        references: refs
            .iter()
            .map(|&r| format!("{}-{r}", hash(r)))
            .chain([format!("{}-{path}", hash(path))])
            .collect(),
        deriver: None,
        sigs: Vec::new(),
        ca: None,
        system: None,
    }
}

async fn present_paths(db: &TestDb, cache: CacheId) -> String {
    let hashes: Vec<String> = ('a'..='z')
        .map(|c| std::iter::repeat_n(c, 32).collect())
        .collect();
    let refs: Vec<&str> = hashes.iter().map(String::as_str).collect();
    let missing = db.missing_store_paths(cache, &refs).await.unwrap();
    ('a'..='z')
        .zip(&hashes)
        .filter(|(_, hash)| !missing.contains(hash))
        .map(|(c, _)| c)
        .collect()
}

/// Sets cache columns the API sets elsewhere (retention, budget).
async fn set(db: &TestDb, sql: &str) {
    match &db.raw {
        Raw::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(drop),
        Raw::Sqlite(pool) => sqlx::query(sql).execute(pool).await.map(drop),
    }
    .unwrap();
}

/// Pins path `path` (as [`object`] names it) in `cache` as `name`.
async fn pin(db: &TestDb, cache: CacheId, name: &str, path: char, expires_at: Option<i64>) {
    let hash: String = std::iter::repeat_n(path, 32).collect();
    let expires_at = expires_at.map_or("NULL".to_owned(), |t| t.to_string());
    set(
        db,
        &format!(
            "INSERT INTO nix_pins (cache_id, name, store_path_hash, store_path, expires_at, created_at) \
             VALUES ({}, '{name}', '{hash}', '{hash}-{path}', {expires_at}, 0)",
            cache.0
        ),
    )
    .await;
}

const RETENTION: i64 = 1000;

both! {
    async fn expiry_keeps_closures_and_pins(db: TestDb) {
        let cache = db.cache_named("main").await;
        set(&db, &format!("UPDATE caches SET retention_period = {RETENTION}")).await;
        let b = db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap().blob_id;
        // An old chain a → b → c whose root is fresh; an old chain d → e
        // with nothing fresh; an old pinned path p referring to q; an old
        // path x with an expired pin.
        for (path, refs, at) in [
            ('c', &[][..], 0),
            ('b', &['c'][..], 0),
            ('a', &['b'][..], 2 * RETENTION),
            ('e', &[][..], 0),
            ('d', &['e'][..], 0),
            ('q', &[][..], 0),
            ('p', &['q'][..], 0),
            ('x', &[][..], 0),
        ] {
            db.upsert_nix_object(cache, &object(path, b, refs), at).await.unwrap();
        }
        pin(&db, cache, "release", 'p', None).await;
        pin(&db, cache, "old", 'x', Some(RETENTION)).await;

        let now = 2 * RETENTION + 1;
        let preview = db.gc_expire_preview(now, None).await.unwrap();
        assert_eq!(preview.nix_objects, 3, "d, e and x");
        // The first call can only take the tops (d, x); e goes once d has.
        let mut total = Expired::default();
        let mut calls = 0;
        loop {
            let expired = db.gc_expire(now, None, 100).await.unwrap();
            if expired.is_empty() {
                break;
            }
            total.nix_objects += expired.nix_objects;
            calls += 1;
        }
        assert_eq!((total.nix_objects, calls), (3, 2));
        assert_eq!(present_paths(&db, cache).await, "abcpq");
        // The expired pin kept nothing; GC removes it, and only it.
        assert_eq!(db.gc_forget_expired_pins(now).await.unwrap(), 1);
        assert_eq!(db.count("nix_pins").await, 1);
        assert_eq!(db.count("nix_object_refs").await, 3, "a→b, b→c, p→q");

        // Unpinned, p and q go; a fresh root keeps its closure still.
        set(&db, "DELETE FROM nix_pins WHERE name = 'release'").await;
        while !db.gc_expire(now, None, 1).await.unwrap().is_empty() {}
        assert_eq!(present_paths(&db, cache).await, "abc");
        // A retention of 0 keeps everything, as in Attic.
        set(&db, "UPDATE caches SET retention_period = 0").await;
        assert!(db.gc_expire(10 * RETENTION, Some(Duration::from_secs(1)), 100).await.unwrap().is_empty());
        set(&db, &format!("UPDATE caches SET retention_period = {RETENTION}")).await;
        // Nothing else expires while a is fresh, and then all of it.
        let later = 3 * RETENTION + 1;
        while !db.gc_expire(later, None, 100).await.unwrap().is_empty() {}
        assert_eq!(present_paths(&db, cache).await, "");
        assert_eq!(db.count("nix_object_refs").await, 0);
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (0, Some(later + GRACE)));
        db.assert_refcounts_consistent().await;
    }

    async fn deleted_caches_lose_everything(db: TestDb) {
        let cache = db.cache_named("gone").await;
        let b = db.commit_blob(&blob(1, &[(10, 5)]), 0).await.unwrap().blob_id;
        db.upsert_nix_object(cache, &object('b', b, &[]), 0).await.unwrap();
        db.upsert_nix_object(cache, &object('a', b, &['b']), 0).await.unwrap();
        pin(&db, cache, "keep", 'a', None).await;
        db.delete_cache("gone", 10).await.unwrap();
        assert_eq!(db.gc_expire_preview(10, None).await.unwrap().nix_objects, 2);
        assert_eq!(db.gc_expire(10, None, 100).await.unwrap().nix_objects, 2);
        assert_eq!(db.count("nix_pins").await, 0);
        assert_eq!(db.count("nix_object_refs").await, 0);
    }

    async fn budgets_evict_least_recently_used(db: TestDb) {
        let cache = db.cache_named("bazel").await;
        // Four blobs of 10 bytes used at 0, 10, 20, 30; budget 25 bytes.
        let mut ids = Vec::new();
        for n in 0..4u32 {
            let b = db.commit_blob(&blob(n + 1, &[(10 + n, 10)]), 0).await.unwrap().blob_id;
            db.put_cas_entry(cache, b, i64::from(n) * 10).await.unwrap();
            ids.push(b);
        }
        set(&db, "UPDATE caches SET cas_budget_bytes = 25").await;
        // Entries used after 5 are protected: only the first may go, which
        // is not enough, and the cache stays over budget.
        assert_eq!(
            db.gc_evict_cas(100, 5, 10, true).await.unwrap(),
            Evicted { entries: 1, bytes: 10 }
        );
        assert_eq!(
            db.gc_evict_cas(100, 5, 10, false).await.unwrap(),
            Evicted { entries: 1, bytes: 10 }
        );
        // Unprotected, one more goes (two left = 20 bytes), oldest first.
        assert_eq!(
            db.gc_evict_cas(100, 100, 1, false).await.unwrap(),
            Evicted { entries: 1, bytes: 10 }
        );
        assert_eq!(db.count("cas_entries").await, 2);
        assert_eq!(db.blob_state(h(1)).await.unwrap(), (0, Some(100 + GRACE)));
        assert_eq!(db.blob_state(h(2)).await.unwrap(), (0, Some(100 + GRACE)));
        assert_eq!(db.blob_state(h(3)).await.unwrap().0, 1);
        assert_eq!(db.gc_evict_cas(100, 100, 10, false).await.unwrap(), Evicted::default());
        db.assert_refcounts_consistent().await;
    }

    async fn dead_packs_retire_after_a_grace_period(db: TestDb) {
        db.commit_blob(&blob(1, &[(10, 8), (11, 8)]), 0).await.unwrap();
        db.gc_sweep_blobs(GRACE, 100).await.unwrap();
        let marked = db.gc_mark_chunks(2 * GRACE, 100).await.unwrap();
        assert_eq!(db.gc_mark_dead_packs(2 * GRACE).await.unwrap(), 0, "rows still there");
        let ids: Vec<ChunkId> = marked.iter().map(|c| c.id).collect();
        db.gc_forget_chunks(&ids).await.unwrap();
        assert_eq!(db.gc_mark_dead_packs(300).await.unwrap(), 1);
        assert_eq!(db.gc_mark_dead_packs(400).await.unwrap(), 0, "stamped once");
        assert!(db.gc_dead_packs(299, 10).await.unwrap().is_empty());
        let dead = db.gc_dead_packs(300, 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].key, pack(1));
        assert_eq!(db.known_packs(&[pack(1), pack(2)]).await.unwrap().len(), 1);
        assert_eq!(db.gc_forget_packs(&[pack(1)]).await.unwrap(), 1);
        assert_eq!(db.gc_forget_packs(&[pack(1)]).await.unwrap(), 0);
        assert!(db.known_packs(&[pack(1)]).await.unwrap().is_empty());
    }

    async fn sparse_packs_move_their_live_chunks(db: TestDb) {
        // Pack 1 holds chunks 10 (5 B stored), 11 (5 B), 12 (51 B); only 10
        // stays referenced.
        db.commit_blob(&blob(1, &[(10, 8), (11, 8), (12, 100)]), 0).await.unwrap();
        let keep = db.commit_blob(&blob(2, &[(10, 8)]), 0).await.unwrap();
        db.put_cas_entry(db.cache_named("c").await, keep.blob_id, 0).await.unwrap();
        db.gc_sweep_blobs(GRACE, 100).await.unwrap();
        let marked = db.gc_mark_chunks(2 * GRACE, 100).await.unwrap();
        let ids: Vec<ChunkId> = marked.iter().map(|c| c.id).collect();
        assert_eq!(db.gc_forget_chunks(&ids).await.unwrap(), 2);

        let sparse = db.gc_sparse_packs(0, 50, 10).await.unwrap();
        assert_eq!(sparse.iter().map(|p| (p.key, p.live_bytes)).collect::<Vec<_>>(), [(pack(1), 5)]);
        assert!(db.gc_sparse_packs(-1, 50, 10).await.unwrap().is_empty(), "too young");
        let live = db.pack_chunks(pack(1)).await.unwrap();
        assert_eq!(live.iter().map(|c| c.hash).collect::<Vec<_>>(), [h(10)]);

        let to = NewPack { key: pack(9), size: 5 };
        let place = PackPlace { pack: pack(9), offset: 0 };
        let moved = db.gc_move_chunks(pack(1), &[to], &[(live[0].id, place)], 500).await.unwrap();
        assert_eq!(moved, 1);
        let packs: Vec<(u64, u64)> = db.packs(10).await.unwrap().iter().map(|p| (p.size, p.live_bytes)).collect();
        // Pack 2 (blob 2's copy of chunk 10) was dead on arrival.
        assert_eq!(packs, [(61, 0), (5, 0), (5, 5)]);
        assert_eq!(db.gc_dead_packs(500, 10).await.unwrap()[0].key, pack(1));
        let chunks = db.blob_chunks(keep.blob_id, None).await.unwrap();
        assert_eq!(chunks[0].chunk.pack, Some(place));
        // A second mover finds nothing left to move.
        let again = NewPack { key: pack(8), size: 5 };
        let place = PackPlace { pack: pack(8), offset: 0 };
        assert_eq!(db.gc_move_chunks(pack(1), &[again], &[(live[0].id, place)], 600).await.unwrap(), 0);
        assert_eq!(db.gc_mark_dead_packs(600).await.unwrap(), 2, "pack 2 and the useless copy");
    }
}
