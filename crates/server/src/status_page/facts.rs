//! What the status page reports from the database, gathered in a few
//! aggregate queries and kept for [`FACTS_TTL`]: a refresh storm (or a
//! dashboard left open everywhere) costs one gathering per period, not one
//! per view.

use std::sync::Arc;
use std::time::{Duration, Instant};

use garret_meta::{Cache, CacheUsage, ChunkStats, GcRuns, Meta, MetaError};
use garret_nix::signing::SigningKey;

use crate::auth::CacheName;

/// How long gathered facts are served before the next view gathers again.
const FACTS_TTL: Duration = Duration::from_secs(5);

/// Every live cache and the store's totals, as of `taken`.
#[derive(Debug)]
pub struct Facts {
    pub taken: Instant,
    /// By name.
    pub caches: Vec<CacheFacts>,
    /// Chunks store-wide: shared chunks belong to no single cache.
    pub store: ChunkStats,
    /// The last collection and the last successful one, by whichever
    /// process ran them (`serve`'s periodic GC or a `garret gc` CronJob).
    pub gc_runs: GcRuns,
}

/// One cache as the page shows it: no secret key, only its public half.
#[derive(Debug, Clone)]
pub struct CacheFacts {
    pub name: CacheName,
    pub is_public: bool,
    /// `name:base64` for `trusted-public-keys`; `None` if the stored
    /// signing key does not parse (logged when gathered).
    pub public_key: Option<String>,
    pub usage: CacheUsage,
    /// See [`Cache::retention_period`].
    pub retention_period: Option<i64>,
    pub cas_budget_bytes: Option<u64>,
}

impl CacheFacts {
    /// `None` for a row whose name breaks the naming rules, which the
    /// database never admits (logged: it would be a bug, not a state).
    fn of(cache: Cache, usage: CacheUsage) -> Option<Self> {
        let name = CacheName::new(cache.name)
            .inspect_err(|error| tracing::error!(%error, "a stored cache name is invalid"))
            .ok()?;
        let public_key = cache
            .signing_key
            .parse::<SigningKey>()
            .inspect_err(|error| {
                tracing::error!(cache = %name, %error, "the stored signing key does not parse");
            })
            .ok()
            .map(|key| key.verifying_key().to_string());
        Some(Self {
            name,
            is_public: cache.is_public,
            public_key,
            usage,
            retention_period: cache.retention_period,
            cas_budget_bytes: cache.cas_budget_bytes,
        })
    }
}

impl Facts {
    /// Scans of the object and chunk tables: in its own span, so a
    /// slow gathering shows in the trace of the view that waited for it.
    #[tracing::instrument(skip_all)]
    async fn gather(meta: &Meta) -> Result<Self, MetaError> {
        let caches = meta.caches_with_usage().await?;
        let store = meta.chunk_stats().await?;
        let gc_runs = meta.gc_runs().await?;
        Ok(Self {
            taken: Instant::now(),
            caches: caches
                .into_iter()
                .filter_map(|(cache, usage)| CacheFacts::of(cache, usage))
                .collect(),
            store,
            gc_runs,
        })
    }

    /// Logical bytes of every cache together: what clients uploaded,
    /// counting bytes shared between caches once per cache.
    pub fn logical_bytes(&self) -> u64 {
        self.caches
            .iter()
            .map(|c| c.usage.logical_bytes())
            .fold(0, u64::saturating_add)
    }
}

/// The latest [`Facts`], gathered again once older than [`FACTS_TTL`].
#[derive(Debug, Default)]
pub struct FactsCache {
    /// Held across the gathering, so concurrent views wait for one
    /// gathering instead of each starting their own.
    latest: tokio::sync::Mutex<Option<Arc<Facts>>>,
}

impl FactsCache {
    pub async fn get(&self, meta: &Meta) -> Result<Arc<Facts>, MetaError> {
        let mut latest = self.latest.lock().await;
        if let Some(facts) = latest.as_ref().filter(|f| f.taken.elapsed() < FACTS_TTL) {
            return Ok(Arc::clone(facts));
        }
        let facts = Arc::new(Facts::gather(meta).await?);
        *latest = Some(Arc::clone(&facts));
        Ok(facts)
    }
}
