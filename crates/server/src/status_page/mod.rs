//! The status page at `/`: version, uptime, the caches a viewer may pull
//! from with their figures and how to attach Nix and Bazel to them, store
//! totals, hit rates and garbage collection. Server-rendered HTML without
//! script, readable without its stylesheet; the handler is
//! `http::status_page`.
//!
//! # What a viewer sees
//! Public caches are listed for everyone; a private cache only for a token
//! holding `pull` on it, so a viewer without one learns nothing about it,
//! not even that it exists. Figures over every cache (store totals, hit
//! rates, GC counts) include the private caches, so they are shown only to
//! a viewer that may pull from every cache.

mod facts;
mod html;
mod render;

use std::time::Instant;

pub use facts::{CacheFacts, Facts, FactsCache};
pub use render::{CONTENT_SECURITY_POLICY, GcView, ServerWide, View, Viewer, error_page, page};

use crate::config::Gc;

/// What the page needs that is not in the database, held in the state.
#[derive(Debug)]
pub struct StatusPage {
    pub started: Instant,
    /// The GC settings of this server (interval, default retention).
    pub gc: Gc,
    pub facts: FactsCache,
}

impl StatusPage {
    pub fn new(gc: Gc) -> Self {
        Self {
            started: Instant::now(),
            gc,
            facts: FactsCache::default(),
        }
    }
}

/// Hits and misses of the lookups clients make since this server started,
/// from the counters `/metrics` exports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HitRates {
    pub narinfo: HitsMisses,
    pub nar: HitsMisses,
    pub cas: HitsMisses,
    pub action_cache: HitsMisses,
}

impl HitRates {
    pub fn of(metrics: &crate::metrics::Metrics) -> Self {
        use crate::metrics::Lookup;
        let counts = |kind| HitsMisses {
            hits: metrics.hits(kind),
            misses: metrics.misses(kind),
        };
        Self {
            narinfo: counts(Lookup::Narinfo),
            nar: counts(Lookup::Nar),
            cas: counts(Lookup::Cas),
            action_cache: counts(Lookup::ActionResult),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HitsMisses {
    pub hits: u64,
    pub misses: u64,
}
