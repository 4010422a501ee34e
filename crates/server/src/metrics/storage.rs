//! Storage operations timed and counted by a wrapper around the backend,
//! so the store crate stays free of metrics and every caller (uploads,
//! reads, GC, readiness checks) is measured alike.

use std::future::Future;
use std::ops::Range;
use std::time::Instant;

use bytes::Bytes;
use garret_store::backend::BackendError;
use garret_store::{Listed, ObjectStore, ObjectWriter};
use prometheus_client::encoding::EncodeLabelSet;

use super::{Metrics, label_values};

/// A backend operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Operation {
    /// Starting an object.
    Create,
    /// Appending to an object being written (a part upload on S3).
    Write,
    /// Putting a written object under its key.
    Finish,
    /// Making objects durable.
    Sync,
    /// Reading a range.
    Get,
    Delete,
    List,
}

label_values! {
    Operation => |v| match v {
        Operation::Create => "create",
        Operation::Write => "write",
        Operation::Finish => "finish",
        Operation::Sync => "sync",
        Operation::Get => "get",
        Operation::Delete => "delete",
        Operation::List => "list",
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct OperationLabels {
    op: Operation,
}

impl Metrics {
    /// Runs `work`, one storage operation `op`, and records it.
    async fn storage_op<T>(
        &self,
        op: Operation,
        work: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        let started = Instant::now();
        let result = work.await;
        self.storage()
            .record(&OperationLabels { op }, started.elapsed(), result.is_err());
        result
    }
}

/// A backend whose operations are recorded in [`Metrics`].
#[derive(Debug, Clone)]
pub struct Measured<B> {
    inner: B,
    metrics: Metrics,
}

impl<B> Measured<B> {
    pub fn new(inner: B, metrics: Metrics) -> Self {
        Self { inner, metrics }
    }

    /// The backend itself, for probes that are not traffic (readiness
    /// checks look up a missing key, which would count as an error).
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The metrics it records into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// An object being written through a [`Measured`] backend.
#[derive(Debug)]
pub struct MeasuredWriter<W> {
    inner: W,
    metrics: Metrics,
}

impl<B: ObjectStore> ObjectStore for Measured<B> {
    type Writer = MeasuredWriter<B::Writer>;

    async fn create(&self, key: &str) -> Result<Self::Writer, BackendError> {
        let inner = self
            .metrics
            .storage_op(Operation::Create, self.inner.create(key))
            .await?;
        Ok(MeasuredWriter {
            inner,
            metrics: self.metrics.clone(),
        })
    }

    async fn sync(&self, keys: &[String]) -> Result<(), BackendError> {
        self.metrics
            .storage_op(Operation::Sync, self.inner.sync(keys))
            .await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, BackendError> {
        self.metrics
            .storage_op(Operation::Get, self.inner.get_range(key, range))
            .await
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.metrics
            .storage_op(Operation::Delete, self.inner.delete(key))
            .await
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Listed>, BackendError> {
        self.metrics
            .storage_op(Operation::List, self.inner.list(prefix, after, limit))
            .await
    }
}

impl<W: ObjectWriter> ObjectWriter for MeasuredWriter<W> {
    async fn write(&mut self, data: Bytes) -> Result<(), BackendError> {
        self.metrics
            .storage_op(Operation::Write, self.inner.write(data))
            .await
    }

    async fn finish(self) -> Result<(), BackendError> {
        self.metrics
            .storage_op(Operation::Finish, self.inner.finish())
            .await
    }
}
