//! Garbage collection, as the database records its runs (see
//! [`crate::gc::record`]): `serve`'s periodic GC and a `garret gc` CronJob
//! record alike, and each scrape reads the record (two rows by primary
//! key, as cheap as a narinfo hit), so every replica reports the last run
//! wherever it ran.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::{Metrics, label_values};
use crate::gc::GcReport;

/// What a successful run removed, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Removed {
    NixObjects,
    CasEntries,
    ActionResults,
    CasEvicted,
    Blobs,
    Chunks,
    Packs,
    Orphans,
}

label_values! {
    Removed => |v| match v {
        Removed::NixObjects => "nix_objects",
        Removed::CasEntries => "cas_entries",
        Removed::ActionResults => "action_results",
        Removed::CasEvicted => "cas_evicted",
        Removed::Blobs => "blobs",
        Removed::Chunks => "chunks",
        Removed::Packs => "packs",
        Removed::Orphans => "orphans",
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RemovedLabels {
    what: Removed,
}

#[derive(Debug)]
pub(super) struct Families {
    last_run: Gauge,
    last_run_succeeded: Gauge,
    last_success: Gauge,
    duration_ms: Gauge,
    freed_bytes: Gauge,
    removed: Family<RemovedLabels, Gauge>,
}

impl Families {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let families = Self {
            last_run: Gauge::default(),
            last_run_succeeded: Gauge::default(),
            last_success: Gauge::default(),
            duration_ms: Gauge::default(),
            freed_bytes: Gauge::default(),
            removed: Family::default(),
        };
        registry.register_with_unit(
            "gc_last_run_timestamp",
            "When the last garbage collection run (by any process) ended, in unix \
             seconds; 0 if none was recorded",
            Unit::Seconds,
            families.last_run.clone(),
        );
        registry.register(
            "gc_last_run_succeeded",
            "1 if the last garbage collection run succeeded (no storage step failed)",
            families.last_run_succeeded.clone(),
        );
        registry.register_with_unit(
            "gc_last_success_timestamp",
            "When the last successful garbage collection run ended, in unix seconds",
            Unit::Seconds,
            families.last_success.clone(),
        );
        registry.register(
            "gc_last_success_duration_milliseconds",
            "How long the last successful garbage collection run took",
            families.duration_ms.clone(),
        );
        registry.register_with_unit(
            "gc_last_success_freed",
            "Bytes the last successful garbage collection run deleted from the blob store",
            Unit::Bytes,
            families.freed_bytes.clone(),
        );
        registry.register(
            "gc_last_success_removed",
            "What the last successful garbage collection run removed, by kind",
            families.removed.clone(),
        );
        families
    }
}

impl Metrics {
    /// Shows `runs`, as the database records them.
    pub fn gc_runs(&self, runs: &garret_meta::GcRuns) {
        let families = self.gc();
        if let Some(last) = &runs.last {
            families.last_run.set(last.finished_at);
            families.last_run_succeeded.set(i64::from(last.succeeded));
        }
        let Some(success) = &runs.last_success else {
            return;
        };
        families.last_success.set(success.finished_at);
        let Some(report) = success
            .report
            .as_deref()
            .and_then(|json| serde_json::from_str::<GcReport>(json).ok())
        else {
            return;
        };
        families.duration_ms.set(gauge(report.duration_ms));
        families.freed_bytes.set(gauge(report.bytes_freed));
        for (what, n) in [
            (Removed::NixObjects, report.nix_objects),
            (Removed::CasEntries, report.cas_entries),
            (Removed::ActionResults, report.action_results),
            (Removed::CasEvicted, report.cas_evicted),
            (Removed::Blobs, report.blobs),
            (Removed::Chunks, report.chunks),
            (Removed::Packs, report.packs_deleted),
            (Removed::Orphans, report.orphans_deleted),
        ] {
            families
                .removed
                .get_or_create(&RemovedLabels { what })
                .set(gauge(n));
        }
    }
}

/// A count as a gauge value (they are far below `i64::MAX`).
fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
