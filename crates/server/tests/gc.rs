//! Garbage collection end to end over the chunk store and the metadata, on
//! SQLite + local disk and on Postgres + S3: what retention no longer keeps
//! leaves the store, what it keeps reads back intact, sparse packs are
//! rewritten and objects no metadata names are found and removed.

use bytes::Bytes;
use futures::TryStreamExt;
use garret_meta::{BlobId, CacheId, Meta, NewCache};
use garret_server::blobs::{Blobs, Expect, StoredBlob};
use garret_server::clock::unix_now;
use garret_server::config::Gc;
use garret_server::gc::{GcReport, collect};
use garret_store::testing::{S3TestServer, body, text};
use garret_store::{ObjectStore, PackId};

mod common;

struct Fixture {
    blobs: Blobs,
    _s3: Option<S3TestServer>,
    _dir: tempfile::TempDir,
}

async fn sqlite_fs() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    Fixture {
        blobs: common::sqlite_fs_blobs(dir.path()).await,
        _s3: None,
        _dir: dir,
    }
}

async fn postgres_s3() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (blobs, s3) = common::postgres_s3_blobs(dir.path()).await;
    Fixture {
        blobs,
        _s3: Some(s3),
        _dir: dir,
    }
}

macro_rules! on_both {
    ($($name:ident,)*) => {
        mod sqlite_fs { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::sqlite_fs().await).await } )* }
        mod postgres_s3 { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::postgres_s3().await).await } )* }
    };
}

on_both! {
    retention_frees_storage_and_keeps_closures,
    sparse_packs_rewritten_and_orphans_removed,
}

/// Seeds far apart, so that no two contents share a chunk.
fn seed(i: u64) -> u64 {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

const RETENTION: u64 = 7 * 86_400;
const HOUR: i64 = 3600;

fn settings() -> Gc {
    Gc {
        default_retention_secs: RETENTION,
        orphan_grace_secs: 3600,
        ..Gc::default()
    }
}

async fn cache(meta: &Meta) -> CacheId {
    let new = NewCache {
        name: "main".into(),
        is_public: true,
        store_dir: "/nix/store".into(),
        priority: 41,
        signing_key: "main-1:c2VjcmV0".into(),
        upstream_cache_key_names: Vec::new(),
        retention_period: None,
    };
    meta.create_cache(&new, 0).await.unwrap().id
}

/// A Nix object at a store path hash of 32 × `path`, referring to `refs`.
fn object(path: char, blob: &StoredBlob, refs: &[char]) -> garret_meta::NixObject {
    let hash = |c: char| std::iter::repeat_n(c, 32).collect::<String>();
    garret_meta::NixObject {
        store_path: format!("{}-{path}", hash(path)),
        store_path_hash: hash(path),
        blob_id: blob.id,
        nar_hash: *blob.hash.as_bytes(),
        nar_size: blob.size,
        references: refs.iter().map(|&r| format!("{}-{r}", hash(r))).collect(),
        deriver: None,
        sigs: Vec::new(),
        ca: None,
        system: None,
    }
}

async fn read_all(blobs: &Blobs, id: BlobId, size: u64) -> Vec<u8> {
    let parts: Vec<Bytes> = blobs
        .read(id, 0..size)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    parts.concat()
}

async fn pack_keys(blobs: &Blobs) -> Vec<String> {
    let listed = blobs
        .store()
        .backend()
        .list("packs/", None, 10_000)
        .await
        .unwrap();
    listed.into_iter().map(|o| o.key).collect()
}

async fn run(blobs: &Blobs, now: i64) -> GcReport {
    let report = collect(blobs.meta(), blobs.store(), &settings(), now, false)
        .await
        .unwrap();
    assert_eq!(report.errors, 0, "{report}");
    report
}

async fn retention_frees_storage_and_keeps_closures(f: Fixture) {
    let blobs = &f.blobs;
    let meta = blobs.meta();
    let cache = cache(meta).await;
    let contents: Vec<Vec<u8>> = (1..=3).map(|i| text(300_000, seed(i))).collect();
    let mut stored = Vec::new();
    for content in &contents {
        stored.push(blobs.put(body(content), Expect::default()).await.unwrap());
    }
    let t0 = unix_now();
    let week = i64::try_from(RETENTION).unwrap();
    // b is old but the fresh a refers to it; c is old and alone.
    meta.upsert_nix_object(cache, &object('b', &stored[1], &[]), t0)
        .await
        .unwrap();
    meta.upsert_nix_object(cache, &object('c', &stored[2], &[]), t0)
        .await
        .unwrap();
    meta.upsert_nix_object(cache, &object('a', &stored[0], &['b']), t0 + week)
        .await
        .unwrap();
    let packs_before = pack_keys(blobs).await;
    assert_eq!(packs_before.len(), 3, "one pack per upload");

    let dry = collect(meta, blobs.store(), &settings(), t0 + week + 1, true)
        .await
        .unwrap();
    assert_eq!((dry.dry_run, dry.nix_objects), (true, 1));
    let t1 = t0 + week + 1;
    assert_eq!(run(blobs, t1).await.nix_objects, 1);
    // The blob, then its chunks, then its pack go, each a grace period on.
    let t2 = t1 + 6 * HOUR + 1;
    assert_eq!(run(blobs, t2).await.blobs, 1);
    let t3 = t2 + 6 * HOUR + 1;
    let report = run(blobs, t3).await;
    assert!(
        report.chunks > 0 && report.packs_found_dead == 1,
        "{report}"
    );
    assert_eq!(
        pack_keys(blobs).await.len(),
        3,
        "a dead pack waits out its grace"
    );
    let t4 = t3 + 6 * HOUR + 1;
    let report = run(blobs, t4).await;
    assert_eq!(report.packs_deleted, 1, "{report}");
    assert!(report.bytes_freed > 0);
    assert_eq!(pack_keys(blobs).await.len(), 2);

    // What is kept reads back whole; nothing is left to collect.
    for (blob, content) in stored.iter().zip(&contents).take(2) {
        assert_eq!(&read_all(blobs, blob.id, blob.size).await, content);
    }
    let idle = run(blobs, t4 + 1).await;
    assert_eq!(
        (
            idle.nix_objects,
            idle.blobs,
            idle.chunks,
            idle.packs_deleted,
            idle.orphans_deleted
        ),
        (0, 0, 0, 0, 0),
        "{idle}"
    );
}

async fn sparse_packs_rewritten_and_orphans_removed(f: Fixture) {
    let blobs = &f.blobs;
    let meta = blobs.meta();
    let cache = cache(meta).await;
    // Twenty small blobs in one batch share one pack; one stays referenced.
    let contents: Vec<Vec<u8>> = (1..=20).map(|i| text(20_000, seed(100 + i))).collect();
    let entries = contents
        .iter()
        .map(|c| (Bytes::from(c.clone()), Expect::default()))
        .collect();
    let stored: Vec<StoredBlob> = blobs
        .put_batch(entries)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let t0 = unix_now();
    for blob in &stored {
        meta.put_cas_entry(cache, blob.id, t0).await.unwrap();
    }
    let week = i64::try_from(RETENTION).unwrap();
    meta.put_cas_entry(cache, stored[7].id, t0 + week)
        .await
        .unwrap();
    let packs_before = pack_keys(blobs).await;
    assert_eq!(packs_before.len(), 1);
    // A pack a crashed writer left, and one written just now.
    let orphan = PackId::random().object_key();
    garret_store::backend::put(
        blobs.store().backend(),
        &orphan,
        Bytes::from_static(b"lost"),
    )
    .await
    .unwrap();

    // Within the orphan grace period it stays: its writer may be running.
    assert_eq!(run(blobs, unix_now() + 60).await.orphans_deleted, 0);
    assert!(pack_keys(blobs).await.contains(&orphan));
    let t1 = t0 + week + 1;
    let report = run(blobs, t1).await;
    assert_eq!(
        (report.cas_entries, report.orphans_deleted),
        (19, 1),
        "{report}"
    );
    assert!(!pack_keys(blobs).await.contains(&orphan));
    let t2 = t1 + 6 * HOUR + 1;
    assert_eq!(run(blobs, t2).await.blobs, 19);
    let t3 = t2 + 6 * HOUR + 1;
    let report = run(blobs, t3).await;
    assert_eq!(
        (report.packs_rewritten, report.chunks_moved),
        (1, 1),
        "{report}"
    );
    let packs = pack_keys(blobs).await;
    assert_eq!(
        packs.len(),
        2,
        "the old pack waits out its grace: {packs:?}"
    );
    assert_eq!(
        &read_all(blobs, stored[7].id, stored[7].size).await,
        &contents[7]
    );

    let t4 = t3 + 6 * HOUR + 1;
    assert_eq!(run(blobs, t4).await.packs_deleted, 1);
    let packs = pack_keys(blobs).await;
    assert_eq!(packs.len(), 1);
    assert!(!packs_before.contains(&packs[0]), "the kept chunk moved");
    assert_eq!(
        &read_all(blobs, stored[7].id, stored[7].size).await,
        &contents[7]
    );
}
