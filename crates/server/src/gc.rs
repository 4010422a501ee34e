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
//! 3. sparse packs are rewritten; packs left without live bytes (by
//!    collection or by that rewrite) are stamped dead, and deleted a grace
//!    period later;
//! 4. objects that no metadata names and older than the orphan grace (the
//!    packs of writers that crashed) are deleted.
//!
//! Several collectors at once are safe: the claims skip each other's rows,
//! deleting an object twice succeeds, and a pack two collectors rewrite is
//! moved once (the other copy is dead on arrival).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use garret_meta::{BlobChunk, ChunkId, GcRun, Meta, MetaError, PackPlace};
use garret_store::{ChunkHash, ObjectStore as _, PackId};
use serde::{Deserialize, Serialize};

use crate::blobs::{BlobError, Store, chunk_ref, new_packs, pack_place};
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("metadata: {0}")]
    Meta(#[from] MetaError),
}

/// The step a run is at, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Evict,
    Expire,
    Sweep,
    Chunks,
    Packs,
    Rewrite,
    Orphans,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Evict => "evicting CAS entries over budget",
            Self::Expire => "expiring unaccessed entries",
            Self::Sweep => "collecting uploads and blobs",
            Self::Chunks => "collecting chunks",
            Self::Packs => "deleting dead packs",
            Self::Rewrite => "rewriting sparse packs",
            Self::Orphans => "deleting orphans",
        })
    }
}

/// Told the step and the tally so far, at each step and batch.
pub type Progress<'a> = &'a (dyn Fn(Step, &GcReport) + Sync);

/// Runs one collection at time `now` (unix seconds).
pub async fn collect(
    meta: &Meta,
    store: &Store,
    settings: &Gc,
    now: i64,
    dry_run: bool,
) -> Result<GcReport, GcError> {
    collect_with_progress(meta, store, settings, now, dry_run, &|_, _| {}).await
}

/// [`collect`], telling `progress` how far it got: a run over millions of
/// rows takes minutes, and `garret gc` on a terminal shows where it is.
pub async fn collect_with_progress(
    meta: &Meta,
    store: &Store,
    settings: &Gc,
    now: i64,
    dry_run: bool,
    progress: Progress<'_>,
) -> Result<GcReport, GcError> {
    let started = Instant::now();
    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };
    progress(Step::Evict, &report);
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
        progress(Step::Expire, &report);
        let expired = meta.gc_expire(now, retention, BATCH).await?;
        if expired.is_empty() {
            break;
        }
        report.nix_objects += expired.nix_objects;
        report.cas_entries += expired.cas_entries;
        report.action_results += expired.action_results;
    }
    progress(Step::Sweep, &report);
    report.pins_expired = meta.gc_forget_expired_pins(now).await?;
    report.upload_sessions = until_done(|| meta.expire_uploads(now, BATCH)).await?;
    report.blobs = until_done(|| meta.gc_sweep_blobs(now, BATCH)).await?;
    let mut run = Run {
        meta,
        store,
        settings,
        now,
        report,
        progress,
    };
    run.sweep_chunks().await?;
    // Rewriting first: the packs it empties are retired in the same run
    // (deleted at once when the pack grace is zero), not left to the next.
    run.rewrite_sparse_packs().await?;
    run.retire_packs().await?;
    run.delete_orphans().await?;
    run.report.duration_ms = elapsed_ms(started);
    Ok(run.report)
}

/// [`collect`], and then the run recorded in the database (dry runs are
/// not), where every server's `/metrics` finds it. A run succeeded if no
/// step failed. Failing to record is logged, and does not fail the run.
pub async fn collect_and_record(
    meta: &Meta,
    store: &Store,
    settings: &Gc,
    now: i64,
    dry_run: bool,
    progress: Progress<'_>,
) -> Result<GcReport, GcError> {
    let result = collect_with_progress(meta, store, settings, now, dry_run, progress).await;
    if !dry_run {
        let run = GcRun {
            finished_at: crate::clock::unix_now(),
            succeeded: matches!(&result, Ok(report) if report.errors == 0),
            report: result
                .as_ref()
                .ok()
                .and_then(|report| serde_json::to_string(report).ok()),
        };
        if let Err(error) = meta.record_gc_run(&run).await {
            tracing::warn!(%error, "recording the garbage collection run failed");
        }
    }
    result
}

/// The storage steps of one run: what each reads, and the tally they all
/// add to.
struct Run<'a> {
    meta: &'a Meta,
    store: &'a Store,
    settings: &'a Gc,
    now: i64,
    report: GcReport,
    progress: Progress<'a>,
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

impl Run<'_> {
    fn tick(&self, step: Step) {
        (self.progress)(step, &self.report);
    }

    /// Deletes the stored object `key` of `size` bytes; a failure is
    /// logged and counted, and its work left for the next run. Returns
    /// whether the object went.
    async fn delete(&mut self, key: &str, size: u64) -> bool {
        match self.store.backend().delete(key).await {
            Ok(()) => {
                self.report.bytes_freed += size;
                true
            }
            Err(error) => {
                tracing::warn!(%key, %error, "could not delete an object; the next run retries");
                self.report.errors += 1;
                false
            }
        }
    }

    /// Marks unreferenced chunks, deletes the objects of those stored on their
    /// own, and forgets them. A chunk whose object could not be deleted stays
    /// marked, for the next run.
    async fn sweep_chunks(&mut self) -> Result<(), GcError> {
        loop {
            self.tick(Step::Chunks);
            let marked = self.meta.gc_mark_chunks(self.now, CHUNK_BATCH).await?;
            if marked.is_empty() {
                return Ok(());
            }
            let mut deleted = Vec::with_capacity(marked.len());
            for chunk in &marked {
                if chunk.pack.is_none() {
                    let key =
                        ChunkHash(garret_nix::Sha256Hash::from_bytes(chunk.hash)).object_key();
                    if !self.delete(&key, chunk.stored_size).await {
                        continue;
                    }
                }
                deleted.push(chunk.id);
            }
            self.report.chunks += self.meta.gc_forget_chunks(&deleted).await?;
            if deleted.len() < marked.len() {
                // What is left marked is only claimable again after the grace
                // period: stop instead of spinning on it.
                return Ok(());
            }
        }
    }

    /// Stamps packs without live bytes as dead, and deletes those dead for at
    /// least the pack grace period.
    async fn retire_packs(&mut self) -> Result<(), GcError> {
        self.report.packs_found_dead = self.meta.gc_mark_dead_packs(self.now).await?;
        let dead_before = self.now.saturating_sub(secs(self.settings.pack_grace_secs));
        loop {
            self.tick(Step::Packs);
            let dead = self.meta.gc_dead_packs(dead_before, BATCH).await?;
            if dead.is_empty() {
                return Ok(());
            }
            let mut deleted = Vec::with_capacity(dead.len());
            for pack in &dead {
                if self.delete(&PackId(pack.key).object_key(), pack.size).await {
                    deleted.push(pack.key);
                }
            }
            self.report.packs_deleted += self.meta.gc_forget_packs(&deleted).await?;
            if deleted.len() < dead.len() {
                return Ok(());
            }
        }
    }

    /// Rewrites up to `rewrite_max_packs` packs whose live fraction fell below
    /// the threshold and that are older than the pack grace period (younger
    /// ones may still be filling up with references).
    async fn rewrite_sparse_packs(&mut self) -> Result<(), GcError> {
        let created_before = self.now.saturating_sub(secs(self.settings.pack_grace_secs));
        let sparse = self
            .meta
            .gc_sparse_packs(
                created_before,
                self.settings.rewrite_below_percent,
                self.settings.rewrite_max_packs,
            )
            .await?;
        for pack in sparse {
            self.tick(Step::Rewrite);
            match rewrite(self.meta, self.store, pack.key, self.now).await {
                Ok(moved) => {
                    self.report.packs_rewritten += 1;
                    self.report.chunks_moved += moved;
                }
                Err(RewriteError::Meta(e)) => return Err(e.into()),
                Err(RewriteError::Pack(error)) => {
                    tracing::error!(pack = %PackId(pack.key), %error, "could not rewrite a sparse pack; it stays as it is");
                    self.report.errors += 1;
                }
            }
        }
        Ok(())
    }

    /// Lists the packs and chunk objects in the store and deletes those that no
    /// metadata names and that were last written longer ago than the orphan
    /// grace period.
    async fn delete_orphans(&mut self) -> Result<(), GcError> {
        let written_before = self
            .now
            .saturating_sub(secs(self.settings.orphan_grace_secs));
        for prefix in ["packs/", "chunks/"] {
            let mut after: Option<String> = None;
            loop {
                self.tick(Step::Orphans);
                let page = match self
                    .store
                    .backend()
                    .list(prefix, after.as_deref(), LIST_PAGE)
                    .await
                {
                    Ok(page) => page,
                    Err(error) => {
                        tracing::warn!(prefix, %error, "could not list the store; orphans wait for the next run");
                        self.report.errors += 1;
                        break;
                    }
                };
                let Some(last) = page.last() else { break };
                after = Some(last.key.clone());
                // Each old object with what its key names, parsed once.
                let old: Vec<_> = page
                    .into_iter()
                    .filter(|o| o.modified <= written_before)
                    .map(|o| {
                        let (pack, chunk) = (
                            PackId::from_object_key(&o.key),
                            ChunkHash::from_object_key(&o.key),
                        );
                        (o, pack, chunk)
                    })
                    .collect();
                let packs: Vec<[u8; 16]> =
                    old.iter().filter_map(|(_, p, _)| p.map(|p| p.0)).collect();
                let chunks: Vec<[u8; 32]> = old
                    .iter()
                    .filter_map(|(_, _, c)| c.map(|c| *c.as_bytes()))
                    .collect();
                let known_packs = self.meta.known_packs(&packs).await?;
                let known_chunks = self.meta.known_chunk_objects(&chunks).await?;
                for (object, pack, chunk) in old {
                    let known = pack.is_some_and(|p| known_packs.contains(&p.0))
                        || chunk.is_some_and(|c| known_chunks.contains(c.as_bytes()));
                    if known {
                        continue;
                    }
                    if self.delete(&object.key, object.size).await {
                        tracing::info!(key = %object.key, size = object.size, "deleted an orphan object");
                        self.report.orphans_deleted += 1;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Why a sparse pack was not rewritten.
enum RewriteError {
    /// The database failed: the run stops.
    Meta(MetaError),
    /// This pack could not be copied (a frame missing or corrupt, a row
    /// out of range): it stays as it is, and the run goes on.
    Pack(BlobError),
}

/// Copies pack `key`'s live chunks into new packs and moves their rows;
/// the old pack is then dead. Returns how many chunks moved.
async fn rewrite(meta: &Meta, store: &Store, key: [u8; 16], now: i64) -> Result<u64, RewriteError> {
    let chunks = meta.pack_chunks(key).await.map_err(RewriteError::Meta)?;
    let refs = chunks
        .iter()
        .map(|chunk| {
            // A chunk's place in a blob does not matter to a copy.
            chunk_ref(&BlobChunk {
                seq: 0,
                offset: 0,
                file_offset: 0,
                chunk: chunk.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(RewriteError::Pack)?;
    let repacked = store
        .repack(refs)
        .await
        .map_err(|e| RewriteError::Pack(e.into()))?;
    let places: HashMap<[u8; 32], PackPlace> = repacked
        .places
        .iter()
        .filter_map(|(hash, place)| Some((*hash.as_bytes(), pack_place(*place)?)))
        .collect();
    let moves: Vec<(ChunkId, PackPlace)> = chunks
        .iter()
        .filter_map(|chunk| Some((chunk.id, *places.get(&chunk.hash)?)))
        .collect();
    let recorded = meta
        .gc_move_chunks(key, &new_packs(&repacked.packs), &moves, now)
        .await;
    if recorded.is_err() {
        store.discard(&repacked.packs).await;
    }
    recorded.map_err(RewriteError::Meta)
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
        let run = collect_and_record(
            &state.meta,
            state.blobs.store(),
            &settings,
            crate::clock::unix_now(),
            false,
            &|_, _| {},
        )
        .await;
        match &run {
            Ok(report) => tracing::info!(report = %report, "garbage collection done"),
            Err(error) => tracing::error!(%error, "garbage collection failed"),
        }
    }
}
