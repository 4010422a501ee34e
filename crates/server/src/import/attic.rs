//! `garret import attic`: copies an Attic deployment's caches, and with a
//! substituter every store path they serve, so that runners keep working
//! unchanged when the Service moves to garret.
//!
//! Caches keep their names, signing keypairs (every runner's
//! `trusted-public-keys` stays valid), visibility, priority, upstream key
//! names and retention. A cache garret already has with the same public
//! key was imported before and is left as it is; one with a different key
//! is refused: a public key never changes silently.
//!
//! Objects are paged through Attic's database by row id; each page asks
//! garret once which paths it lacks, so a re-run (after an interruption or
//! failures) fetches only the rest. Each missing path's narinfo and NAR
//! come through the substituter and go through the same ingest as an
//! upload: NarHash and NarSize are checked while the NAR streams, and a
//! mismatch stores nothing.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use garret_meta::{AtticCache, AtticObject, AtticSource, Cache, MetaError, NewCache};
use garret_nix::signing::SigningKey;
use garret_store::StoreError;
use serde::Serialize;

use super::substituter::{FetchError, Substituter};
use crate::auth::CacheName;
use crate::blobs::{BlobError, Blobs, Expect};
use crate::clock::unix_now;
use crate::upload::{AtticPathInfo, BodyError, NarCheck, PathInfoError};

/// Objects read from Attic's database per query.
const PAGE_SIZE: u32 = 256;
/// Paths fetched and stored at once.
const CONCURRENCY: usize = 4;
/// Attempts per path when the failure may pass (network, 5xx).
const ATTEMPTS: u32 = 3;
/// Wait before the second attempt; doubled before each further one.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Failures listed per cache in the report; the count covers the rest.
const MAX_LISTED_FAILURES: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("reading Attic's database: {0}")]
    Source(#[source] MetaError),
    #[error("garret's metadata: {0}")]
    Meta(#[from] MetaError),
    #[error("Attic's database has no live cache named {0}")]
    NoSuchCache(String),
}

/// What to import.
#[derive(Debug, Default)]
pub struct Options {
    /// Only these caches; empty: every live cache.
    pub caches: Vec<String>,
    /// Also copy every valid store path through this substituter.
    pub objects: Option<Substituter>,
    /// Report what would be done; change nothing.
    pub dry_run: bool,
}

/// Counters a progress display reads while the import runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Valid objects in the caches being imported.
    pub objects_total: AtomicU64,
    /// Objects dealt with: found present, imported or failed.
    pub objects_done: AtomicU64,
    /// NAR bytes imported.
    pub bytes_imported: AtomicU64,
}

/// What an import did, cache by cache.
#[derive(Debug, Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub caches: Vec<CacheReport>,
}

impl Report {
    /// Whether anything was refused or failed: the command exits non-zero.
    pub fn failed(&self) -> bool {
        self.caches.iter().any(|c| {
            matches!(c.outcome, CacheOutcome::Refused { .. })
                || c.objects.as_ref().is_some_and(|o| o.failed > 0)
        })
    }
}

#[derive(Debug, Serialize)]
pub struct CacheReport {
    pub name: String,
    pub public_key: Option<String>,
    pub outcome: CacheOutcome,
    /// `None` without a substituter, or for a refused cache.
    pub objects: Option<ObjectsReport>,
}

/// What became of a cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CacheOutcome {
    Created,
    /// Dry run: would be created.
    WouldCreate,
    /// Already in garret with the same public key; left as it is.
    Existing,
    /// Not imported, nor its objects.
    Refused {
        reason: String,
    },
}

/// What became of a cache's objects.
#[derive(Debug, Default, Serialize)]
pub struct ObjectsReport {
    /// Objects whose NAR Attic can serve.
    pub valid: u64,
    /// Of those, the ones garret lacked when the run began.
    pub missing: u64,
    pub imported: u64,
    pub imported_bytes: u64,
    pub failed: u64,
    /// The first failures, by store path.
    pub failures: Vec<Failure>,
}

#[derive(Debug, Serialize)]
pub struct Failure {
    pub store_path: String,
    pub error: String,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.dry_run {
            writeln!(f, "dry run: nothing was changed")?;
        }
        for cache in &self.caches {
            let outcome = match &cache.outcome {
                CacheOutcome::Created => "created".to_owned(),
                CacheOutcome::WouldCreate => "would be created".to_owned(),
                CacheOutcome::Existing => "exists already (same key)".to_owned(),
                CacheOutcome::Refused { reason } => format!("refused: {reason}"),
            };
            write!(f, "{}: {outcome}", cache.name)?;
            if let Some(key) = &cache.public_key {
                write!(f, ", public key {key}")?;
            }
            writeln!(f)?;
            if let Some(o) = &cache.objects {
                writeln!(
                    f,
                    "  objects: {} valid, {} missing, {} imported ({} bytes), {} failed",
                    o.valid, o.missing, o.imported, o.imported_bytes, o.failed
                )?;
                for failure in &o.failures {
                    writeln!(f, "  failed {}: {}", failure.store_path, failure.error)?;
                }
                if o.failed > o.failures.len() as u64 {
                    writeln!(f, "  … and {} more", o.failed - o.failures.len() as u64)?;
                }
            }
        }
        Ok(())
    }
}

/// Why one store path was not imported.
#[derive(Debug, thiserror::Error)]
enum ObjectError {
    #[error("Attic's row: {0}")]
    Row(#[from] PathInfoError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("the substituter's narinfo disagrees with Attic's database: {0}")]
    Disagrees(String),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

impl ObjectError {
    /// Whether another attempt may succeed: the network or a server had
    /// trouble. A NAR that fails verification is refused at once.
    fn is_transient(&self) -> bool {
        match self {
            Self::Fetch(e) => e.is_transient(),
            Self::Blob(BlobError::Store(StoreError::Input(e))) => {
                matches!(e.downcast_ref::<BodyError>(), Some(BodyError::Read(_)))
            }
            Self::Blob(BlobError::Store(StoreError::Backend(_)) | BlobError::Meta(_))
            | Self::Meta(_) => true,
            Self::Row(_) | Self::Disagrees(_) | Self::Blob(_) => false,
        }
    }
}

/// Imports what `options` selects from `source` into `blobs`' metadata and
/// store, updating `progress` as it goes.
#[tracing::instrument(skip_all, fields(dry_run = options.dry_run))]
pub async fn import(
    source: &AtticSource,
    blobs: &Blobs,
    options: &Options,
    progress: &Progress,
) -> Result<Report, ImportError> {
    let selected = select(source, &options.caches).await?;
    let mut counts = Vec::with_capacity(selected.len());
    for cache in &selected {
        let count = match options.objects {
            Some(_) => source
                .valid_object_count(cache.id)
                .await
                .map_err(ImportError::Source)?,
            None => 0,
        };
        progress.objects_total.fetch_add(count, Ordering::Relaxed);
        counts.push(count);
    }
    let mut caches = Vec::with_capacity(selected.len());
    for (attic, count) in selected.iter().zip(counts) {
        let report = import_cache(source, blobs, options, progress, attic).await?;
        if report.objects.is_none() {
            // Refused: its objects are not coming.
            progress.objects_total.fetch_sub(count, Ordering::Relaxed);
        }
        caches.push(report);
    }
    Ok(Report {
        dry_run: options.dry_run,
        caches,
    })
}

/// The live caches `names` selects (all if empty), in Attic's name order.
async fn select(source: &AtticSource, names: &[String]) -> Result<Vec<AtticCache>, ImportError> {
    let all = source.caches().await.map_err(ImportError::Source)?;
    if let Some(unknown) = names.iter().find(|n| !all.iter().any(|c| &c.name == *n)) {
        return Err(ImportError::NoSuchCache(unknown.clone()));
    }
    let wanted: HashSet<&str> = names.iter().map(String::as_str).collect();
    Ok(all
        .into_iter()
        .filter(|c| wanted.is_empty() || wanted.contains(c.name.as_str()))
        .collect())
}

#[tracing::instrument(skip_all, fields(cache = %attic.name))]
async fn import_cache(
    source: &AtticSource,
    blobs: &Blobs,
    options: &Options,
    progress: &Progress,
    attic: &AtticCache,
) -> Result<CacheReport, ImportError> {
    let (key, (outcome, cache)) = match attic.keypair.parse::<SigningKey>() {
        Ok(key) => {
            let found = cache_in_garret(blobs, attic, &key, options.dry_run).await?;
            (Some(key), found)
        }
        Err(e) => {
            let reason = format!("its keypair is not a Nix secret key: {e}");
            (None, (CacheOutcome::Refused { reason }, None))
        }
    };
    let public_key = key.map(|k| k.verifying_key().to_string());
    let objects = match (&outcome, &options.objects) {
        (CacheOutcome::Refused { reason }, _) => {
            tracing::warn!(%reason, "cache refused");
            None
        }
        (_, None) => None,
        (_, Some(substituter)) => Some(
            import_objects(
                source,
                blobs,
                substituter,
                progress,
                attic,
                cache.as_ref(),
                options.dry_run,
            )
            .await?,
        ),
    };
    tracing::info!(?outcome, public_key = public_key.as_deref(), "cache done");
    Ok(CacheReport {
        name: attic.name.clone(),
        public_key,
        outcome,
        objects,
    })
}

/// The garret cache for `attic` and what became of it: created unless
/// this is a dry run (then `None` if it does not exist yet), or refused.
async fn cache_in_garret(
    blobs: &Blobs,
    attic: &AtticCache,
    key: &SigningKey,
    dry_run: bool,
) -> Result<(CacheOutcome, Option<Cache>), ImportError> {
    let meta = blobs.meta();
    let refused = |reason: String| Ok((CacheOutcome::Refused { reason }, None));
    let name = match CacheName::new(attic.name.clone()) {
        Ok(name) if name.is_reserved() => {
            return refused(format!(
                "`{name}` is reserved in garret (a Bazel or REAPI path word); rename it in \
                 Attic first"
            ));
        }
        Ok(name) => name,
        Err(e) => return refused(e.to_string()),
    };
    match meta.cache(name.as_str()).await {
        Ok(existing) => {
            let ours = key.verifying_key().to_string();
            return match existing.signing_key.parse::<SigningKey>() {
                Ok(k) if k.verifying_key().to_string() == ours => {
                    Ok((CacheOutcome::Existing, Some(existing)))
                }
                Ok(k) => refused(format!(
                    "garret already has a cache `{name}` with another public key ({}); \
                     delete or rename it to import Attic's, whose key runners trust",
                    k.verifying_key()
                )),
                Err(e) => refused(format!(
                    "garret's cache `{name}` has an unreadable key: {e}"
                )),
            };
        }
        Err(MetaError::NotFound(_)) => {}
        Err(other) => return Err(other.into()),
    }
    if dry_run {
        return Ok((CacheOutcome::WouldCreate, None));
    }
    let new = NewCache {
        name: name.as_str().to_owned(),
        is_public: attic.is_public,
        store_dir: attic.store_dir.clone(),
        priority: attic.priority,
        signing_key: key.to_secret_string(),
        upstream_cache_key_names: attic.upstream_cache_key_names.clone(),
        retention_period: attic.retention_period,
    };
    let created = meta.create_cache(&new, unix_now()).await?;
    Ok((CacheOutcome::Created, Some(created)))
}

/// Copies the valid objects of `attic` that `cache` lacks. Without `cache`
/// (a dry run for a cache not created yet) every one is missing.
async fn import_objects(
    source: &AtticSource,
    blobs: &Blobs,
    substituter: &Substituter,
    progress: &Progress,
    attic: &AtticCache,
    cache: Option<&Cache>,
    dry_run: bool,
) -> Result<ObjectsReport, ImportError> {
    let mut report = ObjectsReport::default();
    let mut after = 0;
    loop {
        let page = source
            .valid_objects(attic.id, after, PAGE_SIZE)
            .await
            .map_err(ImportError::Source)?;
        let Some(last) = page.last() else {
            break;
        };
        after = last.id;
        let page_len = page.len() as u64;
        let missing: Vec<AtticObject> = match cache {
            Some(cache) => {
                let hashes: Vec<&str> = page.iter().map(|o| o.store_path_hash.as_str()).collect();
                let missing = blobs.meta().missing_store_paths(cache.id, &hashes).await?;
                let missing: HashSet<String> = missing.into_iter().collect();
                page.into_iter()
                    .filter(|o| missing.contains(&o.store_path_hash))
                    .collect()
            }
            None => page,
        };
        let present = page_len - missing.len() as u64;
        report.valid += page_len;
        report.missing += missing.len() as u64;
        progress.objects_done.fetch_add(present, Ordering::Relaxed);
        let Some(cache) = cache.filter(|_| !dry_run) else {
            progress
                .objects_done
                .fetch_add(missing.len() as u64, Ordering::Relaxed);
            continue;
        };
        let mut results = futures::stream::iter(&missing)
            .map(|object| import_object_with_retries(blobs, substituter, attic, cache, object))
            .buffer_unordered(CONCURRENCY);
        while let Some((object, result)) = results.next().await {
            progress.objects_done.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok(bytes) => {
                    report.imported += 1;
                    report.imported_bytes += bytes;
                    progress.bytes_imported.fetch_add(bytes, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(path = %object.store_path, error = %e, "not imported");
                    report.failed += 1;
                    if report.failures.len() < MAX_LISTED_FAILURES {
                        report.failures.push(Failure {
                            store_path: object.store_path.clone(),
                            error: e.to_string(),
                        });
                    }
                }
            }
        }
    }
    Ok(report)
}

/// [`import_object`], tried again after transient failures.
async fn import_object_with_retries<'a>(
    blobs: &Blobs,
    substituter: &Substituter,
    attic: &AtticCache,
    cache: &Cache,
    object: &'a AtticObject,
) -> (&'a AtticObject, Result<u64, ObjectError>) {
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match import_object(blobs, substituter, attic, cache, object).await {
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                tracing::info!(path = %object.store_path, error = %e, attempt, "retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            result => return (object, result),
        }
    }
}

/// Fetches one path through the substituter and stores it in `cache`;
/// returns its NAR size.
async fn import_object(
    blobs: &Blobs,
    substituter: &Substituter,
    attic: &AtticCache,
    cache: &Cache,
    object: &AtticObject,
) -> Result<u64, ObjectError> {
    let info = AtticPathInfo {
        store_path_hash: object.store_path_hash.clone(),
        store_path: object.store_path.clone(),
        references: object.references.clone(),
        system: object.system.clone(),
        deriver: object.deriver.clone(),
        sigs: object.sigs.clone(),
        ca: object.ca.clone(),
        nar_hash: object.nar_hash.clone(),
        nar_size: object.nar_size,
    }
    .path_info(&cache.store_dir)?;
    let narinfo = substituter
        .narinfo(&attic.name, info.store_path.hash(), &cache.store_dir)
        .await?;
    if narinfo.store_path != info.store_path
        || narinfo.nar_hash != info.nar_hash
        || narinfo.nar_size != info.nar_size
    {
        return Err(ObjectError::Disagrees(format!(
            "it serves {} with NarHash {} and NarSize {}, the database has {} with {} and {}",
            narinfo.store_path,
            narinfo.nar_hash,
            narinfo.nar_size,
            info.store_path,
            info.nar_hash,
            info.nar_size
        )));
    }
    let nar = substituter.nar(&attic.name, &narinfo).await?;
    let stored = blobs
        .put(
            NarCheck::new(nar),
            Expect {
                hash: Some(info.nar_hash),
                size: Some(info.nar_size),
                max_size: Some(info.nar_size),
            },
        )
        .await?;
    let size = stored.size;
    blobs
        .meta()
        .upsert_nix_object(cache.id, &info.into_object(stored.id), unix_now())
        .await?;
    Ok(size)
}
