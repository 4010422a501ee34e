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
use crate::gc::LastRun;

/// What the page needs that is not in the database, held in the state.
#[derive(Debug)]
pub struct StatusPage {
    pub started: Instant,
    /// The GC settings of this server (interval, default retention).
    pub gc: Gc,
    pub facts: FactsCache,
    /// Written by the periodic GC inside `serve`.
    pub last_gc: LastRun,
}

impl StatusPage {
    pub fn new(gc: Gc) -> Self {
        Self {
            started: Instant::now(),
            gc,
            facts: FactsCache::default(),
            last_gc: LastRun::default(),
        }
    }
}

/// Hits and misses of the lookups clients make, for the page. Not
/// measured yet: the request metrics' counters are to feed this (one set
/// of counters, not a second one here); until then every row reads "not
/// measured yet".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HitRates {
    pub narinfo: Option<HitsMisses>,
    pub nar: Option<HitsMisses>,
    pub cas: Option<HitsMisses>,
    pub action_cache: Option<HitsMisses>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HitsMisses {
    pub hits: u64,
    pub misses: u64,
}
