//! One garbage collection run: `garret gc` (a CronJob in production) and the
//! periodic collection inside `serve` both call [`collect`].
//!
//! A run goes from decisions to storage, each step batched and safe to
//! interrupt anywhere (the next run finishes the work):
//! 1. expiry and CAS budgets decide what is no longer live
//!    ([`Meta::gc_expire`], [`Meta::gc_evict_cas`]);
//! 2. expired upload sessions, unreferenced blobs and unreferenced chunks go
//!    after their grace periods; a chunk stored as an object of its own has
//!    its object deleted between its mark and its forget;
//! 3. packs left without live bytes are stamped dead, and deleted a grace
//!    period later; sparse packs are rewritten;
//! 4. objects that no metadata names and older than the orphan grace (the
//!    packs of writers that crashed) are deleted.
//!
//! Several collectors at once are safe: the claims skip each other's rows,
//! deleting an object twice succeeds, and a pack two collectors rewrite is
//! moved once (the other copy is dead on arrival).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use garret_meta::{ChunkId, Meta, MetaError, NewPack, PackPlace};
use garret_store::{
    Backend, ChunkHash, ChunkPlace, ChunkRef, ChunkStore, ObjectStore as _, PackId, StoreError,
};
use serde::Serialize;

use crate::config::Gc;

/// Rows per claim or delete: small enough that no transaction holds locks
/// for long, large enough that a run over a million rows is a thousand
/// statements.
const BATCH: u32 = 1000;

/// Chunks per mark: a run marks and forgets chunks by the hundred
/// thousand, and each claim scans the collectable index from its start,
/// past the row versions earlier claims left (Postgres until a vacuum), so
/// fewer, larger claims go faster. Ten thousand rows are about a megabyte.
const CHUNK_BATCH: u32 = 10_000;

/// Objects per listing page when looking for orphans.
const LIST_PAGE: usize = 1000;

/// What one run did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub nix_objects: u64,
    pub cas_entries: u64,
    pub action_results: u64,
    /// Pins past their expiry, removed.
    pub pins_expired: u64,
    /// CAS entries evicted to meet a cache's budget, and their logical bytes.
    pub cas_evicted: u64,
    pub cas_evicted_bytes: u64,
    pub upload_sessions: u64,
    pub blobs: u64,
    pub chunks: u64,
    /// Packs found without live bytes in this run, and packs deleted (found
    /// dead at least a grace period ago).
    pub packs_found_dead: u64,
    pub packs_deleted: u64,
    pub packs_rewritten: u64,
    pub chunks_moved: u64,
    pub orphans_deleted: u64,
    /// Bytes deleted from the blob store.
    pub bytes_freed: u64,
    /// Storage operations that failed; their work is left for the next run.
    pub errors: u64,
    pub duration_ms: u64,
}

impl GcReport {
    /// Deletes the stored object `key` of `size` bytes; a failure is
    /// logged and counted, and its work left for the next run. Returns
    /// whether the object went.
    async fn delete(&mut self, store: &ChunkStore<Backend>, key: &str, size: u64) -> bool {
        match store.backend().delete(key).await {
            Ok(()) => {
                self.bytes_freed += size;
                true
            }
            Err(error) => {
                tracing::warn!(%key, %error, "could not delete an object; the next run retries");
                self.errors += 1;
                false
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("metadata: {0}")]
    Meta(#[from] MetaError),
}

/// Runs one collection at time `now` (unix seconds).
pub async fn collect(
    meta: &Meta,
    store: &ChunkStore<Backend>,
    settings: &Gc,
    now: i64,
    dry_run: bool,
) -> Result<GcReport, GcError> {
    let started = Instant::now();
    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };
    let retention = settings.default_retention;
    let protect_after = now.saturating_sub(secs(settings.cas_protect_secs));
    let evicted = meta
        .gc_evict_cas(now, protect_after, BATCH, dry_run)
        .await?;
    report.cas_evicted = evicted.entries;
    report.cas_evicted_bytes = evicted.bytes;
    if dry_run {
        let expired = meta.gc_expire_preview(now, retention).await?;
        report.nix_objects = expired.nix_objects;
        report.cas_entries = expired.cas_entries;
        report.action_results = expired.action_results;
        report.packs_found_dead = meta.gc_dead_packs(i64::MAX, u32::MAX).await?.len() as u64;
        report.duration_ms = elapsed_ms(started);
        return Ok(report);
    }
    loop {
        let expired = meta.gc_expire(now, retention, BATCH).await?;
        if expired.is_empty() {
            break;
        }
        report.nix_objects += expired.nix_objects;
        report.cas_entries += expired.cas_entries;
        report.action_results += expired.action_results;
    }
    report.pins_expired = meta.gc_forget_expired_pins(now).await?;
    report.upload_sessions = until_done(|| meta.expire_uploads(now, BATCH)).await?;
    report.blobs = until_done(|| meta.gc_sweep_blobs(now, BATCH)).await?;
    sweep_chunks(meta, store, now, &mut report).await?;
    retire_packs(meta, store, settings, now, &mut report).await?;
    rewrite_sparse_packs(meta, store, settings, now, &mut report).await?;
    delete_orphans(meta, store, settings, now, &mut report).await?;
    report.duration_ms = elapsed_ms(started);
    Ok(report)
}

/// Calls `step` until it reports nothing done; returns the total.
async fn until_done<F, Fut>(mut step: F) -> Result<u64, MetaError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64, MetaError>>,
{
    let mut total = 0;
    loop {
        match step().await? {
            0 => return Ok(total),
            n => total += n,
        }
    }
}

/// Marks unreferenced chunks, deletes the objects of those stored on their
/// own, and forgets them. A chunk whose object could not be deleted stays
/// marked, for the next run.
async fn sweep_chunks(
    meta: &Meta,
    store: &ChunkStore<Backend>,
    now: i64,
    report: &mut GcReport,
) -> Result<(), GcError> {
    loop {
        let marked = meta.gc_mark_chunks(now, CHUNK_BATCH).await?;
        if marked.is_empty() {
            return Ok(());
        }
        let mut deleted = Vec::with_capacity(marked.len());
        for chunk in &marked {
            if chunk.pack.is_none() {
                let key = ChunkHash(garret_nix::Sha256Hash::from_bytes(chunk.hash)).object_key();
                if !report.delete(store, &key, chunk.stored_size).await {
                    continue;
                }
            }
            deleted.push(chunk.id);
        }
        report.chunks += meta.gc_forget_chunks(&deleted).await?;
        if deleted.len() < marked.len() {
            // What is left marked is only claimable again after the grace
            // period: stop instead of spinning on it.
            return Ok(());
        }
    }
}

/// Stamps packs without live bytes as dead, and deletes those dead for at
/// least the pack grace period.
async fn retire_packs(
    meta: &Meta,
    store: &ChunkStore<Backend>,
    settings: &Gc,
    now: i64,
    report: &mut GcReport,
) -> Result<(), GcError> {
    report.packs_found_dead = meta.gc_mark_dead_packs(now).await?;
    let dead_before = now.saturating_sub(secs(settings.pack_grace_secs));
    loop {
        let dead = meta.gc_dead_packs(dead_before, BATCH).await?;
        if dead.is_empty() {
            return Ok(());
        }
        let mut deleted = Vec::with_capacity(dead.len());
        for pack in &dead {
            if report
                .delete(store, &PackId(pack.key).object_key(), pack.size)
                .await
            {
                deleted.push(pack.key);
            }
        }
        report.packs_deleted += meta.gc_forget_packs(&deleted).await?;
        if deleted.len() < dead.len() {
            return Ok(());
        }
    }
}

/// Rewrites up to `rewrite_max_packs` packs whose live fraction fell below
/// the threshold and that are older than the pack grace period (younger
/// ones may still be filling up with references).
async fn rewrite_sparse_packs(
    meta: &Meta,
    store: &ChunkStore<Backend>,
    settings: &Gc,
    now: i64,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let created_before = now.saturating_sub(secs(settings.pack_grace_secs));
    let sparse = meta
        .gc_sparse_packs(
            created_before,
            settings.rewrite_below_percent,
            settings.rewrite_max_packs,
        )
        .await?;
    for pack in sparse {
        match rewrite(meta, store, pack.key, now).await {
            Ok(moved) => {
                report.packs_rewritten += 1;
                report.chunks_moved += moved;
            }
            Err(RewriteError::Meta(e)) => return Err(e.into()),
            Err(RewriteError::Store(error)) => {
                tracing::error!(pack = %PackId(pack.key), %error, "could not rewrite a sparse pack; it stays as it is");
                report.errors += 1;
            }
        }
    }
    Ok(())
}

enum RewriteError {
    Meta(MetaError),
    Store(StoreError),
}

/// Copies pack `key`'s live chunks into new packs and moves their rows;
/// the old pack is then dead. Returns how many chunks moved.
async fn rewrite(
    meta: &Meta,
    store: &ChunkStore<Backend>,
    key: [u8; 16],
    now: i64,
) -> Result<u64, RewriteError> {
    let chunks = meta.pack_chunks(key).await.map_err(RewriteError::Meta)?;
    let refs: Vec<ChunkRef> = chunks
        .iter()
        .filter_map(|c| {
            Some(ChunkRef {
                id: ChunkHash(garret_nix::Sha256Hash::from_bytes(c.hash)),
                offset: 0,
                size: u32::try_from(c.size).ok()?,
                file_offset: 0,
                stored_size: u32::try_from(c.stored_size).ok()?,
                frame_hash: garret_nix::Sha256Hash::from_bytes(c.frame_hash),
                place: ChunkPlace::Pack {
                    pack: PackId(c.pack?.pack),
                    offset: c.pack?.offset,
                },
            })
        })
        .collect();
    let repacked = store.repack(refs).await.map_err(RewriteError::Store)?;
    let places: HashMap<[u8; 32], PackPlace> = repacked
        .places
        .iter()
        .filter_map(|(hash, place)| match *place {
            ChunkPlace::Pack { pack, offset } => Some((
                *hash.as_bytes(),
                PackPlace {
                    pack: pack.0,
                    offset,
                },
            )),
            ChunkPlace::Object => None,
        })
        .collect();
    let moves: Vec<(ChunkId, PackPlace)> = chunks
        .iter()
        .filter_map(|chunk| Some((chunk.id, *places.get(&chunk.hash)?)))
        .collect();
    let new: Vec<NewPack> = repacked
        .packs
        .iter()
        .map(|p| NewPack {
            key: p.id.0,
            size: p.size,
        })
        .collect();
    let recorded = meta.gc_move_chunks(key, &new, &moves, now).await;
    if recorded.is_err() {
        store.discard(&repacked.packs).await;
    }
    recorded.map_err(RewriteError::Meta)
}

/// Lists the packs and chunk objects in the store and deletes those that no
/// metadata names and that were last written longer ago than the orphan
/// grace period.
async fn delete_orphans(
    meta: &Meta,
    store: &ChunkStore<Backend>,
    settings: &Gc,
    now: i64,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let written_before = now.saturating_sub(secs(settings.orphan_grace_secs));
    for prefix in ["packs/", "chunks/"] {
        let mut after: Option<String> = None;
        loop {
            let page = match store
                .backend()
                .list(prefix, after.as_deref(), LIST_PAGE)
                .await
            {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(prefix, %error, "could not list the store; orphans wait for the next run");
                    report.errors += 1;
                    break;
                }
            };
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            let old: Vec<_> = page
                .into_iter()
                .filter(|o| o.modified <= written_before)
                .collect();
            let packs: Vec<[u8; 16]> = old
                .iter()
                .filter_map(|o| PackId::from_object_key(&o.key).map(|p| p.0))
                .collect();
            let chunks: Vec<[u8; 32]> = old
                .iter()
                .filter_map(|o| ChunkHash::from_object_key(&o.key).map(|c| *c.as_bytes()))
                .collect();
            let known_packs = meta.known_packs(&packs).await?;
            let known_chunks = meta.known_chunk_objects(&chunks).await?;
            for object in old {
                let known = PackId::from_object_key(&object.key)
                    .is_some_and(|p| known_packs.contains(&p.0))
                    || ChunkHash::from_object_key(&object.key)
                        .is_some_and(|c| known_chunks.contains(c.as_bytes()));
                if known {
                    continue;
                }
                if report.delete(store, &object.key, object.size).await {
                    tracing::info!(key = %object.key, size = object.size, "deleted an orphan object");
                    report.orphans_deleted += 1;
                }
            }
        }
    }
    Ok(())
}

fn secs(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl std::fmt::Display for GcReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{} Nix objects, {} CAS entries, {} action results, {} pins expired; \
             {} CAS entries ({} B) evicted for budgets; {} upload sessions, {} blobs, \
             {} chunks collected; packs: {} found dead, {} deleted, {} rewritten \
             ({} chunks moved); {} orphan objects deleted; {} B freed; {} errors; {} ms",
            if self.dry_run { "dry run: " } else { "" },
            self.nix_objects,
            self.cas_entries,
            self.action_results,
            self.pins_expired,
            self.cas_evicted,
            self.cas_evicted_bytes,
            self.upload_sessions,
            self.blobs,
            self.chunks,
            self.packs_found_dead,
            self.packs_deleted,
            self.packs_rewritten,
            self.chunks_moved,
            self.orphans_deleted,
            self.bytes_freed,
            self.errors,
            self.duration_ms,
        )
    }
}

/// Collects every `settings.interval_secs` for as long as the server runs
/// (`gc.interval_secs` set; off by default, where a CronJob runs
/// `garret gc`). A failed run is logged and retried at the next tick.
pub async fn periodically(state: std::sync::Arc<crate::state::AppState>, settings: Gc) {
    let mut ticks = tokio::time::interval(Duration::from_secs(settings.interval_secs));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let run = collect(
            &state.meta,
            state.blobs.store(),
            &settings,
            crate::clock::unix_now(),
            false,
        )
        .await;
        match run {
            Ok(report) => tracing::info!(report = %report, "garbage collection done"),
            Err(error) => tracing::error!(%error, "garbage collection failed"),
        }
    }
}
