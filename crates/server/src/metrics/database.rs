//! Database operations, as the metadata's [`garret_meta::Observer`] reports
//! them: one series per `Meta` method (a fixed set), timed with its retries.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;

use super::Metrics;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct OperationLabels {
    op: &'static str,
}

/// Records what the metadata reports.
#[derive(Debug)]
pub(super) struct Observer(pub(super) Metrics);

impl garret_meta::Observer for Observer {
    fn finished(&self, operation: &'static str, elapsed: Duration, failed: bool) {
        let labels = OperationLabels { op: operation };
        self.0.0.database.record(&labels, elapsed, failed);
    }
}
