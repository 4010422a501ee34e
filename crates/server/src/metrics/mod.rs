//! What `GET /metrics` reports, in the Prometheus (OpenMetrics text)
//! exposition format: one registry of typed metric families, shared by
//! every handler through [`AppState`](crate::state::AppState).
//!
//! Every label has a bounded set of values, fixed by the code and not by
//! clients: protocols, route templates and gRPC methods (never a raw path),
//! status classes, lookup kinds, storage and database operations. No label
//! names a cache, a store path or a digest, so the series stay few however
//! much traffic arrives and `/metrics` tells a scraper nothing about what
//! is stored (it is unauthenticated, like `/healthz`).
//!
//! Where each family is fed:
//! - requests, latency, bytes in and out: [`requests`], from the one
//!   per-request log (`request_log`), HTTP and gRPC alike;
//! - hits and misses: where each lookup decides ([`Metrics::lookup`]);
//! - upload bytes new and deduplicated, uploads in flight: the one write
//!   path (`blobs`);
//! - storage operations: [`storage::Measured`], a wrapper of the backend;
//! - database operations: [`database`], the metadata's observer seam;
//! - garbage collection: [`gc`], from the runs recorded in the database,
//!   so that a `garret gc` CronJob's runs show too.

mod database;
pub mod gc;
pub mod requests;
pub mod storage;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::error::Error;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets in seconds, from a cached narinfo (about a millisecond)
/// to a multi-GiB upload (minutes).
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Buckets for one storage or database operation: sub-millisecond local
/// reads to slow S3 puts and long GC statements.
const OPERATION_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

/// A histogram family over `L`.
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// The server's metrics: cheap to clone, every clone records into the
/// same registry.
#[derive(Debug, Clone)]
pub struct Metrics(Arc<Families>);

#[derive(Debug)]
struct Families {
    registry: Registry,
    requests: requests::Families,
    lookups: Family<LookupLabels, Counter>,
    upload_bytes: Family<UploadLabels, Counter>,
    uploads_in_flight: Gauge,
    storage: Operations<storage::OperationLabels>,
    database: Operations<database::OperationLabels>,
    gc: gc::Families,
}

/// A lookup whose hits and misses are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lookup {
    /// A `.narinfo` (GET or HEAD).
    Narinfo,
    /// A NAR download.
    Nar,
    /// A CAS blob read: ByteStream Read, a BatchReadBlobs entry, an HTTP
    /// `GET /cas/…`.
    Cas,
    /// A digest FindMissingBlobs asks about (found: a hit).
    CasFindMissing,
    /// An action result: GetActionResult or an HTTP `GET /ac/…`. An
    /// incomplete result is a miss, as the client sees it.
    ActionResult,
}

impl Lookup {
    pub const ALL: [Lookup; 5] = [
        Lookup::Narinfo,
        Lookup::Nar,
        Lookup::Cas,
        Lookup::CasFindMissing,
        Lookup::ActionResult,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Narinfo => "narinfo",
            Lookup::Nar => "nar",
            Lookup::Cas => "cas",
            Lookup::CasFindMissing => "cas_find_missing",
            Lookup::ActionResult => "action_result",
        }
    }
}

/// Hit or miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Found {
    Hit,
    Miss,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LookupLabels {
    kind: Lookup,
    result: Found,
}

/// Uploaded bytes that were stored anew, or found stored already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum UploadKind {
    New,
    Deduplicated,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UploadLabels {
    kind: UploadKind,
}

/// Label values of fixed enums are their `as_str`.
macro_rules! label_values {
    ($($ty:ty => |$v:ident| $text:expr),* $(,)?) => {$(
        impl ::prometheus_client::encoding::EncodeLabelValue for $ty {
            fn encode(
                &self,
                encoder: &mut ::prometheus_client::encoding::LabelValueEncoder<'_>,
            ) -> Result<(), std::fmt::Error> {
                let $v = *self;
                ::prometheus_client::encoding::EncodeLabelValue::encode(&$text, encoder)
            }
        }
    )*};
}
pub(crate) use label_values;

label_values! {
    Lookup => |v| v.as_str(),
    Found => |v| match v { Found::Hit => "hit", Found::Miss => "miss" },
    UploadKind => |v| match v { UploadKind::New => "new", UploadKind::Deduplicated => "deduplicated" },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every family registered (under `garret_`),
    /// plus the build's version and the process's start time.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("garret");
        registry.register(
            "build",
            "The running garret's version",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        let started: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        started.set(unix_seconds(SystemTime::now()));
        registry.register_with_unit(
            "process_start_time",
            "When this process started, in unix seconds",
            Unit::Seconds,
            started,
        );
        let requests = requests::Families::register(&mut registry);
        let lookups = Family::default();
        registry.register(
            "cache_lookups",
            "Lookups by kind and result (hit or miss); counted once per object asked for",
            lookups.clone(),
        );
        let upload_bytes = Family::default();
        registry.register_with_unit(
            "upload",
            "Uploaded content (uncompressed) by whether it was stored anew or found stored \
             already; the dedup ratio is deduplicated / (new + deduplicated)",
            Unit::Bytes,
            upload_bytes.clone(),
        );
        let uploads_in_flight = Gauge::default();
        registry.register(
            "uploads_in_flight",
            "Uploads being stored now (Attic, nix copy, Bazel HTTP, ByteStream, batches)",
            uploads_in_flight.clone(),
        );
        let storage = Operations::register(
            &mut registry,
            "storage",
            "Blob store (local disk or S3) operations by kind",
            "a missing object counts",
        );
        let database = Operations::register(
            &mut registry,
            "database",
            "Metadata database operations by name (the Meta method), retries included",
            "by the database, not answers such as a row not found",
        );
        let gc = gc::Families::register(&mut registry);
        Self(Arc::new(Families {
            registry,
            requests,
            lookups,
            upload_bytes,
            uploads_in_flight,
            storage,
            database,
            gc,
        }))
    }

    /// Everything, in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.0.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// Counts one lookup of `kind`.
    pub fn lookup(&self, kind: Lookup, found: bool) {
        let result = if found { Found::Hit } else { Found::Miss };
        self.0
            .lookups
            .get_or_create(&LookupLabels { kind, result })
            .inc();
    }

    /// Counts a lookup whose answer is `result`: found, or
    /// [`Error::NotFound`] (a miss). Other errors (a refusal, the database
    /// down) decided nothing and are not counted.
    pub fn lookup_result<T>(&self, kind: Lookup, result: &Result<T, Error>) {
        match result {
            Ok(_) => self.lookup(kind, true),
            Err(Error::NotFound(_)) => self.lookup(kind, false),
            Err(_) => {}
        }
    }

    /// Counts `hits` and `misses` lookups of `kind` at once.
    pub fn lookups(&self, kind: Lookup, hits: u64, misses: u64) {
        for (result, n) in [(Found::Hit, hits), (Found::Miss, misses)] {
            self.0
                .lookups
                .get_or_create(&LookupLabels { kind, result })
                .inc_by(n);
        }
    }

    /// Hits of `kind` since the start, for the status page.
    pub fn hits(&self, kind: Lookup) -> u64 {
        self.lookup_total(kind, Found::Hit)
    }

    /// Misses of `kind` since the start.
    pub fn misses(&self, kind: Lookup) -> u64 {
        self.lookup_total(kind, Found::Miss)
    }

    fn lookup_total(&self, kind: Lookup, result: Found) -> u64 {
        self.0
            .lookups
            .get(&LookupLabels { kind, result })
            .map_or(0, |c| c.get())
    }

    /// Counts a stored upload of `size` bytes, `new` of which were not
    /// stored before.
    pub fn uploaded(&self, size: u64, new: u64) {
        let families = &self.0.upload_bytes;
        families
            .get_or_create(&UploadLabels {
                kind: UploadKind::New,
            })
            .inc_by(new);
        families
            .get_or_create(&UploadLabels {
                kind: UploadKind::Deduplicated,
            })
            .inc_by(size.saturating_sub(new));
    }

    /// Counts an upload in flight until the guard is dropped.
    pub fn upload_started(&self) -> InFlightUpload {
        self.0.uploads_in_flight.inc();
        InFlightUpload(self.0.uploads_in_flight.clone())
    }

    fn requests(&self) -> &requests::Families {
        &self.0.requests
    }

    fn storage(&self) -> &Operations<storage::OperationLabels> {
        &self.0.storage
    }

    /// The observer the metadata reports its operations to.
    pub fn database_observer(&self) -> Arc<dyn garret_meta::Observer> {
        Arc::new(database::Observer(self.clone()))
    }

    fn gc(&self) -> &gc::Families {
        &self.0.gc
    }
}

/// Operations of one kind of dependency (storage, database): how long
/// each took, by `L`, and which failed.
#[derive(Debug)]
struct Operations<L> {
    duration: Histograms<L>,
    errors: Family<L, Counter>,
}

impl<L: Clone + Eq + std::hash::Hash + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static>
    Operations<L>
{
    /// Registers `<name>_operation_duration_seconds` and
    /// `<name>_operation_errors_total`.
    fn register(registry: &mut Registry, name: &str, what: &str, failed: &str) -> Self {
        let operations = Self {
            duration: histograms(operation_histogram),
            errors: Family::default(),
        };
        registry.register_with_unit(
            format!("{name}_operation_duration"),
            format!("{what}, failed ones included"),
            Unit::Seconds,
            operations.duration.clone(),
        );
        registry.register(
            format!("{name}_operation_errors"),
            format!("{what} that failed ({failed})"),
            operations.errors.clone(),
        );
        operations
    }

    fn record(&self, labels: &L, elapsed: Duration, failed: bool) {
        self.duration
            .get_or_create(labels)
            .observe(seconds(elapsed));
        if failed {
            self.errors.get_or_create(labels).inc();
        }
    }
}

/// An upload counted in `garret_uploads_in_flight` while it lives.
#[derive(Debug)]
pub struct InFlightUpload(Gauge);

impl Drop for InFlightUpload {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A histogram family with `buckets`, for [`Histograms`].
fn histograms<L: Clone + Eq + std::hash::Hash>(buckets: fn() -> Histogram) -> Histograms<L> {
    Family::new_with_constructor(buckets)
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn operation_histogram() -> Histogram {
    Histogram::new(OPERATION_BUCKETS)
}

/// `duration` in (fractional) seconds, as Prometheus wants time.
fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// `time` in unix seconds.
fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
