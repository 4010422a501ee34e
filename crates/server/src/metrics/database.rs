//! Database operations, as the metadata's [`garret_meta::Observer`] reports
//! them: one series per `Meta` method (a fixed set), timed with its retries.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

use super::{Histograms, Metrics, histograms, operation_histogram, seconds};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OperationLabels {
    op: &'static str,
}

#[derive(Debug)]
pub(super) struct Families {
    duration: Histograms<OperationLabels>,
    errors: Family<OperationLabels, Counter>,
}

impl Families {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let families = Self {
            duration: histograms(operation_histogram),
            errors: Family::default(),
        };
        registry.register_with_unit(
            "database_operation_duration",
            "Metadata database operations by name (the Meta method), retries included",
            Unit::Seconds,
            families.duration.clone(),
        );
        registry.register(
            "database_operation_errors",
            "Metadata database operations the database failed (not answers such as \
             a row not found)",
            families.errors.clone(),
        );
        families
    }
}

/// Records what the metadata reports.
#[derive(Debug)]
pub(super) struct Observer(pub(super) Metrics);

impl garret_meta::Observer for Observer {
    fn finished(&self, operation: &'static str, elapsed: Duration, failed: bool) {
        let families = &self.0.0.database;
        let labels = OperationLabels { op: operation };
        families
            .duration
            .get_or_create(&labels)
            .observe(seconds(elapsed));
        if failed {
            families.errors.get_or_create(&labels).inc();
        }
    }
}
