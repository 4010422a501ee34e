//! Garbage collection end to end over the chunk store and the metadata, on
//! SQLite + local disk and on Postgres + S3: what retention no longer keeps
//! leaves the store, what it keeps reads back intact, sparse packs are
//! rewritten and objects no metadata names are found and removed.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::TryStreamExt;
use garret_meta::{BlobId, CacheId, Meta, NewCache};
use garret_server::blobs::{Blobs, Expect, StoredBlob};
use garret_server::clock::unix_now;
use garret_server::config::Gc;
use garret_server::gc::{GcReport, collect};
use garret_store::testing::{body, noise, text};
use garret_store::{ObjectStore, PackId};

mod common;

use common::{BlobStore, Deployment, on_both};

on_both! {
    retention_frees_storage_and_keeps_closures,
    sparse_packs_rewritten_and_orphans_removed,
    uploads_downloads_and_gc_race,
}

/// Seeds far apart, so that no two contents share a chunk.
fn seed(i: u64) -> u64 {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

const RETENTION: u64 = 7 * 86_400;
const HOUR: i64 = 3600;

fn settings() -> Gc {
    Gc {
        default_retention: Some(std::time::Duration::from_secs(RETENTION)),
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

async fn retention_frees_storage_and_keeps_closures(deployment: Deployment) {
    let f = BlobStore::on(deployment).await;
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
    // d is as old as c, but was read a week later (as a narinfo or NAR
    // read records it): the read keeps it.
    meta.upsert_nix_object(cache, &object('d', &stored[0], &[]), t0)
        .await
        .unwrap();
    meta.touch_nix_objects(&[(cache, "d".repeat(32))], t0 + week)
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

    for kept in ['a', 'b', 'd'] {
        let hash = kept.to_string().repeat(32);
        assert!(
            meta.nix_object(cache, &hash).await.unwrap().is_some(),
            "{kept} is gone"
        );
    }
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

async fn sparse_packs_rewritten_and_orphans_removed(deployment: Deployment) {
    let f = BlobStore::on(deployment).await;
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
    // Boxed: the measured S3 backend's write is a large future.
    Box::pin(garret_store::backend::put(
        blobs.store().backend(),
        &orphan,
        Bytes::from_static(b"lost"),
    ))
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

/// Shared pieces the racing writers build their blobs from, so that blobs
/// share chunks and GC keeps deciding about chunks other blobs still use.
fn pieces() -> Vec<Vec<u8>> {
    (1..=6).map(|i| noise(90_000, seed(500 + i))).collect()
}

/// Writer `w`'s blob `i`: three shared pieces and a tail of its own.
fn racing_content(pieces: &[Vec<u8>], w: u64, i: u64) -> Vec<u8> {
    let pick = |k: u64| &pieces[usize::try_from((w * 7 + i * 3 + k * 5) % 6).unwrap()];
    let tail = noise(5_000, seed(1000 * w + i));
    [&pick(0)[..], &pick(1)[..], &pick(2)[..], &tail[..]].concat()
}

/// A blob and the content it must read back as.
type Kept = (StoredBlob, Vec<u8>);

/// What the racing tasks share.
#[derive(Clone)]
struct Race {
    blobs: Blobs,
    cache: CacheId,
    pieces: Arc<Vec<Vec<u8>>>,
    /// Blobs a writer saw referenced, with their content.
    kept: Arc<Mutex<Vec<Kept>>>,
    done: Arc<AtomicBool>,
    /// Chunks collected while the writers ran: they go on until some were.
    collected: Arc<AtomicU64>,
}

const WRITERS: u64 = 3;
const BLOBS_EACH: u64 = 12;
const MAX_BLOBS_EACH: u64 = 600;

impl Race {
    /// Writes blobs, each kept, expired at once or never referenced;
    /// returns how many were refused (a race lost to GC is a refusal,
    /// never an acknowledged loss).
    async fn write(self, w: u64) -> u64 {
        let meta = self.blobs.meta();
        let mut refused = 0;
        for i in 0..MAX_BLOBS_EACH {
            if i >= BLOBS_EACH && self.collected.load(Relaxed) > 0 {
                break;
            }
            let content = racing_content(&self.pieces, w, i);
            let Ok(blob) = self.blobs.put(body(&content), Expect::default()).await else {
                refused += 1;
                continue;
            };
            let now = unix_now();
            match i % 3 {
                0 => match meta.put_cas_entry(self.cache, blob.id, now).await {
                    Ok(_) => self.kept.lock().unwrap().push((blob, content)),
                    Err(_) => refused += 1,
                },
                1 => drop(
                    meta.put_cas_entry(self.cache, blob.id, now - 2 * 86_400)
                        .await,
                ),
                _ => {}
            }
        }
        refused
    }

    /// Reads every kept blob over and over until the writers are done.
    async fn read(self) -> u64 {
        let mut reads = 0;
        while !self.done.load(Relaxed) {
            let kept = self.kept.lock().unwrap().clone();
            for (blob, content) in &kept {
                assert_eq!(
                    &read_all(&self.blobs, blob.id, blob.size).await,
                    content,
                    "a kept blob"
                );
                reads += 1;
            }
            tokio::task::yield_now().await;
        }
        reads
    }

    /// Collects at the real time until the writers are done.
    async fn collect(self, settings: Gc) -> u64 {
        let mut runs = 0;
        while !self.done.load(Relaxed) {
            let report = collect(
                self.blobs.meta(),
                self.blobs.store(),
                &settings,
                unix_now(),
                false,
            )
            .await
            .unwrap();
            assert_eq!(report.errors, 0, "{report}");
            self.collected.fetch_add(report.chunks, Relaxed);
            runs += 1;
            tokio::task::yield_now().await;
        }
        runs
    }
}

/// Writers, a reader and two collectors at once over shared chunks, with a
/// grace period of one second so that collection really happens while the
/// others run. Every blob a writer saw referenced reads back intact
/// throughout and afterwards; a final collection leaves no unreferenced
/// chunk, no dead pack and no object without metadata.
async fn uploads_downloads_and_gc_race(deployment: Deployment) {
    let f = BlobStore::on(deployment).await;
    let meta = f
        .blobs
        .meta()
        .clone()
        .with_grace(std::time::Duration::from_secs(1));
    let settings = Gc {
        default_retention: Some(std::time::Duration::from_hours(24)),
        pack_grace_secs: 2,
        orphan_grace_secs: 3600,
        rewrite_below_percent: 90,
        ..Gc::default()
    };
    let race = Race {
        blobs: Blobs::new(f.blobs.store().clone(), meta.clone()),
        cache: cache(&meta).await,
        pieces: Arc::new(pieces()),
        kept: Arc::default(),
        done: Arc::default(),
        collected: Arc::default(),
    };
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        writers.spawn(race.clone().write(w));
    }
    let reader = tokio::spawn(race.clone().read());
    // Two collectors, as two replicas (or a replica and the CronJob) run.
    let collectors = [
        tokio::spawn(race.clone().collect(settings)),
        tokio::spawn(race.clone().collect(settings)),
    ];
    let mut refused = 0;
    while let Some(writer) = writers.join_next().await {
        refused += writer.unwrap();
    }
    race.done.store(true, Relaxed);
    let reads = reader.await.unwrap();
    let mut runs = 0;
    for collector in collectors {
        runs += collector.await.unwrap();
    }
    let kept = race.kept.lock().unwrap().clone();
    assert!(runs > 0 && reads > 0, "{runs} collections, {reads} reads");
    assert!(
        race.collected.load(Relaxed) > 0,
        "no chunk was collected during the race"
    );
    assert!(
        kept.len() > 5,
        "only {} of the blobs kept; {refused} refused",
        kept.len()
    );
    assert_only_kept_remain(&race.blobs, &settings, &kept).await;
}

/// Later, with every grace period over, a few runs finish the chains (blob,
/// chunks, packs); then nothing is left but what is kept, and it is whole.
async fn assert_only_kept_remain(blobs: &Blobs, settings: &Gc, kept: &[Kept]) {
    let meta = blobs.meta();
    let mut later = unix_now() + 7200;
    for _ in 0..4 {
        later += 7200;
        let report = collect(meta, blobs.store(), settings, later, false)
            .await
            .unwrap();
        assert_eq!(report.errors, 0, "{report}");
    }
    for (blob, content) in kept {
        assert_eq!(&read_all(blobs, blob.id, blob.size).await, content);
    }
    assert!(
        meta.gc_mark_chunks(later + 7200, 1)
            .await
            .unwrap()
            .is_empty(),
        "an unreferenced chunk"
    );
    let packs = meta.packs(10_000).await.unwrap();
    assert!(
        packs.iter().all(|p| p.live_bytes > 0),
        "a dead pack is left: {packs:?}"
    );
    let mut recorded: Vec<String> = packs.iter().map(|p| PackId(p.key).object_key()).collect();
    recorded.sort();
    assert_eq!(
        pack_keys(blobs).await,
        recorded,
        "stored packs and recorded packs differ"
    );
}

/// `garret gc` killed with SIGKILL at random points, again and again, then
/// run to the end: nothing live is lost, and everything dead is gone.
/// (SQLite + local disk: the binary opens the data directory the test
/// filled.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_collections_lose_nothing_and_finish_later() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = common::sqlite_fs_blobs(dir.path()).await;
    let meta = blobs.meta();
    let cache = cache(meta).await;
    let kept = fill(&blobs, cache).await;
    let data_dir = dir.path().to_owned();
    let killed = common::blocking(move || {
        let mut killed = 0;
        for delay in garret_store::testing::noise(10, seed(77)) {
            let mut child = gc_command(&data_dir).spawn().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(u64::from(delay) % 60));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                killed += 1;
            }
            child.wait().unwrap();
        }
        killed
    })
    .await;
    assert!(
        killed >= 1,
        "every run ended before its kill: nothing was interrupted"
    );
    // Reads work after killed runs.
    for (blob, content) in &kept {
        assert_eq!(&read_all(&blobs, blob.id, blob.size).await, content);
    }
    let finish = gc_command(dir.path()).output().unwrap();
    assert!(
        finish.status.success(),
        "{}",
        String::from_utf8_lossy(&finish.stderr)
    );
    let again = gc_command(dir.path()).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    for field in [
        "cas_entries",
        "blobs",
        "chunks",
        "packs_deleted",
        "orphans_deleted",
        "errors",
    ] {
        assert_eq!(
            report[field], 0,
            "{field} after a complete run: {report} ({killed} runs killed)"
        );
    }
    assert_eq!(
        meta.gc_expire_preview(unix_now(), None)
            .await
            .unwrap()
            .cas_entries,
        0
    );
    let settings = Gc {
        pack_grace_secs: 0,
        orphan_grace_secs: 0,
        ..settings()
    };
    assert_only_kept_remain(&blobs, &settings, &kept).await;
}

/// Eight batches of ten small blobs (a pack each) and a few large ones, a
/// third of the small ones referenced now and the rest expired long ago;
/// returns the referenced ones.
async fn fill(blobs: &Blobs, cache: CacheId) -> Vec<Kept> {
    let meta = blobs.meta();
    let now = unix_now();
    let mut kept = Vec::new();
    for batch in 0..8u64 {
        let contents: Vec<Vec<u8>> = (0..10)
            .map(|i| text(30_000, seed(2000 + batch * 10 + i)))
            .collect();
        let entries = contents
            .iter()
            .map(|c| (Bytes::from(c.clone()), Expect::default()))
            .collect();
        let stored = blobs.put_batch(entries).await.unwrap();
        for (i, (blob, content)) in stored.into_iter().zip(contents).enumerate() {
            let blob = blob.unwrap();
            let fresh = i % 3 == 0;
            let at = if fresh { now } else { now - 30 * 86_400 };
            meta.put_cas_entry(cache, blob.id, at).await.unwrap();
            if fresh {
                kept.push((blob, content));
            }
        }
    }
    for i in 0..3 {
        let content = noise(2 << 20, seed(3000 + i));
        let blob = blobs.put(body(&content), Expect::default()).await.unwrap();
        meta.put_cas_entry(cache, blob.id, now - 30 * 86_400)
            .await
            .unwrap();
    }
    kept
}

/// `garret gc --json` on `data_dir`, with every grace period zero so that
/// one run does all of its work.
fn gc_command(data_dir: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_garret"));
    command
        .args(["gc", "--json"])
        .env("GARRET_DATA_DIR", data_dir)
        .env("GARRET_LOG_LEVEL", "warn")
        .env("GARRET_GC_DEFAULT_RETENTION", "1d")
        .env("GARRET_GC_GRACE_SECS", "0")
        .env("GARRET_GC_PACK_GRACE_SECS", "0")
        .env("GARRET_GC_ORPHAN_GRACE_SECS", "0")
        .env("GARRET_GC_REWRITE_BELOW_PERCENT", "90")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    command
}
