//! `garret-bench`: a load generator that speaks only the wire protocols, so
//! it can be pointed at any REAPI server (garret, bazel-remote, NativeLink…)
//! and, for the Nix scenarios, at any Attic-compatible server.
//!
//! `benches/scripts/bench.sh` starts a fresh release `garret serve` and runs
//! this against it:
//!
//! ```text
//! garret-bench --url http://127.0.0.1:PORT [--token JWT] [--instance NAME] [--pid PID]
//!     [--size-mib 128] [--message-kib 1024] [--runs 3] [--seed N] [--json FILE]
//!     [--cache garret-bench] [--nar-mib 200] [--paths 1] [--requests 20000]
//!     [--concurrency 64] [--substituter NAME[:PID]=URL]... [--path-set FILE]
//!     [SCENARIO... | all]
//! ```
//!
//! Each scenario runs `--runs` times and yields one [`Outcome`] per row (a
//! scenario with content variants, such as `attic-push`, yields one row per
//! variant): its runs (bytes, wall time, CPU, latency percentiles) and, with
//! `--pid`, the server's peak RSS over the scenario (`VmHWM`, reset before it
//! through `/proc/PID/clear_refs`). The report is a Markdown table on stdout
//! (and JSON with `--json`); progress goes to stderr only when stderr is a
//! terminal. Throughput is always of the blob's (or NAR's) uncompressed
//! bytes: MB/s is 10^6 bytes/s, MiB/s 2^20 bytes/s.
//!
//! Writes also report the time from the transport taking the last message
//! (`finish_write`) to the reply: how long the server works on an upload
//! after it has arrived.
//!
//! Blob content is pseudo-random (xorshift64*, incompressible), generated
//! before the timing starts from `--seed` (by default one unique to the
//! run), with a new seed per run and per scenario, so no write finds its
//! blob already stored. Each timed section is the RPC alone, on a
//! connection opened beforehand.
//!
//! The Nix scenarios use the Attic cache `--cache`, created through the
//! cache-config API if it does not exist, and reach it where its config says
//! (`api_endpoint`, `substituter_endpoint`), as the `attic` client does.
//! Their store paths hold a NAR of one regular file, either compressible
//! (build-output-like, about 2.4:1 with zstd-3) or incompressible. The request-rate
//! scenarios (`narinfo-*`, `ac-*`) send `--requests` requests with
//! `--concurrency` in flight, after an untimed round that opens the
//! connections, and report p50/p99 of the per-request latencies.
//!
//! The `path-set-*` scenarios compare binary caches: every path of
//! `--path-set` (a file of store paths or their hashes) is fetched from each
//! `--substituter` (a base URL: garret's `http://HOST/CACHE`, or nginx over
//! a `nix copy --to file://…` cache) with nothing but HTTP/1.1 GETs, so any
//! two servers are measured the same way in one run; `--url` is then
//! needed only for the other scenarios. The servers take turns run by run,
//! and the report adds a table of their wall times and their ratio to the
//! last substituter's. `benches/scripts/flat.sh` runs garret against nginx.
//!
//! Exit status: 0 if every scenario ran, 1 if one failed, 64 on bad usage.

// Figures for humans: float precision and 64-bit sizes are not a concern.
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt as _;
use futures::{StreamExt as _, stream};
use garret_benches::{Probe, build_output_like, pseudo_random, run_seed, uuid};
use garret_nix::nar::NarWriter;
use garret_nix::narinfo::NarInfo;
use garret_nix::{Sha256Hash, Sha256Hasher, StorePath, StorePathHash};
use garret_proto::bytestream::byte_stream_client::ByteStreamClient;
use garret_proto::bytestream::{ReadRequest, WriteRequest};
use garret_proto::reapi::action_cache_client::ActionCacheClient;
use garret_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use garret_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest, FindMissingBlobsRequest,
    GetActionResultRequest, OutputFile, UpdateActionResultRequest, batch_update_blobs_request,
};
use reqwest::{Method, StatusCode, Url};
use tonic::transport::Channel;

const MIB: usize = 1 << 20;

/// zstd level the client compresses `bytestream-write-zstd` uploads with.
const ZSTD_LEVEL: i32 = 3;

/// Every scenario, in the order `all` runs them, with what it does.
const SCENARIOS: &[(&str, &str)] = &[
    (
        "bytestream-write",
        "ByteStream Write of one blob, identity, to a fresh upload name",
    ),
    (
        "bytestream-write-zstd",
        "the same through compressed-blobs/zstd, compressed (level 3) before the timing",
    ),
    (
        "bytestream-read",
        "ByteStream Read of the blob bytestream-write wrote last (one is written first if none)",
    ),
    (
        "batch-update-4k",
        "BatchUpdateBlobs of 10,000 new 4 KiB blobs, 900 per request",
    ),
    (
        "batch-read-4k",
        "BatchReadBlobs of the blobs batch-update-4k stored (stored first if none), 900 per request",
    ),
    (
        "find-missing-10k",
        "FindMissingBlobs of 10,000 digests in one request, half of them stored",
    ),
    (
        "bytestream-write-32",
        "32 ByteStream Writes of --size-mib each at once, compressible, generated while sent \
         (for the server's peak RSS; not in `all`)",
    ),
    (
        "attic-push",
        "get-missing-paths + upload-path of --paths new paths of --nar-mib, compressible and \
         incompressible, then the latter's NARs again under new paths (dedup)",
    ),
    (
        "nix-copy-put",
        "what `nix copy --to http://…?compression=zstd` sends: GET narinfo, HEAD nar, \
         PUT nar/<filehash>.nar.zst, PUT <hash>.narinfo (zstd before the timing)",
    ),
    (
        "narinfo-hit",
        "GET <hash>.narinfo of 100 stored paths, --requests at --concurrency",
    ),
    (
        "narinfo-miss",
        "GET <hash>.narinfo of random hashes (404), --requests at --concurrency",
    ),
    (
        "nar-download",
        "GET of the NARs attic-push stored last (pushed first if none) at the narinfo's URL, \
         one stream, checked against the narinfo's hashes",
    ),
    ("nar-download-8", "the same with 8 concurrent streams"),
    (
        "path-set-narinfo",
        "GET <hash>.narinfo of every path of --path-set in turn over one keep-alive connection, \
         from each --substituter (not in `all`)",
    ),
    (
        "path-set-nar",
        "GET of every --path-set path's NAR at its narinfo's URL, over 1, 4 and 16 connections, \
         from each --substituter, each body's length checked against FileSize (not in `all`)",
    ),
    (
        "ac-update",
        "UpdateActionResult of --requests new actions (outputs stored first), at --concurrency",
    ),
    (
        "ac-get",
        "GetActionResult of the actions ac-update stored last (stored first if none), \
         at --concurrency",
    ),
];

/// Small blobs per batch scenario, their size, and how many go in one
/// request: 900 × 4 KiB stays under the 4 MiB gRPC message limit.
const SMALL_BLOBS: usize = 10_000;
const SMALL_BLOB_BYTES: usize = 4096;
const SMALL_PER_BATCH: usize = 900;

/// Where every invented store path lives.
const STORE_DIR: &str = "/nix/store";

/// Uploads `attic push` keeps in flight (and so the Nix push scenarios).
const PARALLEL_UPLOADS: usize = 5;

/// Stored paths `narinfo-hit` looks up, round robin, and their file size:
/// enough distinct rows that the lookups are not all one row.
const NARINFO_PATHS: usize = 100;
const NARINFO_FILE_BYTES: usize = 4096;

/// Download streams of `nar-download-8`.
const NAR_STREAMS: usize = 8;

/// Connections `path-set-nar` downloads over, one row each.
const PATH_SET_CONNECTIONS: [usize; 3] = [1, 4, 16];

/// Actions `ac-get` stores for itself (untimed) when `ac-update` did not
/// run: distinct keys to read round robin, few enough to store quickly.
const AC_GET_ACTIONS: usize = 1000;

// ---------------------------------------------------------------------------
// Arguments.

#[derive(Debug)]
struct Args {
    /// The server of every scenario but `path-set-*`; empty if only those
    /// run.
    url: String,
    token: Option<String>,
    instance: String,
    pid: Option<u32>,
    size: usize,
    message: usize,
    runs: usize,
    seed: u64,
    json: Option<PathBuf>,
    /// The Attic cache of the Nix scenarios.
    cache: String,
    nar_size: usize,
    /// Store paths per push of a content variant.
    paths: usize,
    /// Requests per run of the request-rate scenarios, and how many are in
    /// flight at once.
    requests: usize,
    concurrency: usize,
    /// The binary caches `path-set-*` compare, in order, each with a name
    /// for the report: any substituter base URL (garret's
    /// `http://HOST/CACHE`, or a web server over a `file://` cache).
    substituters: Vec<Substituter>,
    /// A file listing the store paths (or their hashes) `path-set-*` fetch.
    path_set: Option<PathBuf>,
    scenarios: Vec<&'static str>,
}

fn usage() -> ! {
    eprintln!(
        "usage: garret-bench --url http://HOST:PORT [--token JWT] [--instance NAME] [--pid PID]\n\
         \x20      [--size-mib 128] [--message-kib 1024] [--runs 3] [--seed N] [--json FILE]\n\
         \x20      [--cache garret-bench] [--nar-mib 200] [--paths 1] [--requests 20000]\n\
         \x20      [--concurrency 64] [--substituter NAME=URL]... [--path-set FILE]\n\
         \x20      [SCENARIO... | all]   (default: all)\nscenarios:"
    );
    for (name, what) in SCENARIOS {
        eprintln!("  {name:<22} {what}");
    }
    std::process::exit(64);
}

fn parse_args() -> Args {
    fn number<T: std::str::FromStr>(text: &str) -> T {
        text.parse().unwrap_or_else(|_| usage())
    }
    let mut args = Args {
        url: String::new(),
        token: None,
        instance: String::new(),
        pid: None,
        size: 128 * MIB,
        message: MIB,
        runs: 3,
        seed: run_seed(),
        json: None,
        cache: "garret-bench".into(),
        nar_size: 200 * MIB,
        paths: 1,
        requests: 20_000,
        concurrency: 64,
        substituters: Vec::new(),
        path_set: None,
        scenarios: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--url" => value().trim_end_matches('/').clone_into(&mut args.url),
            "--token" => args.token = Some(value()).filter(|t| !t.is_empty()),
            "--instance" => value().trim_matches('/').clone_into(&mut args.instance),
            "--pid" => args.pid = Some(number(&value())),
            "--size-mib" => args.size = number::<usize>(&value()) * MIB,
            "--message-kib" => args.message = number::<usize>(&value()) * 1024,
            "--runs" => args.runs = number(&value()),
            "--seed" => args.seed = number(&value()),
            "--json" => args.json = Some(value().into()),
            "--cache" => args.cache = value(),
            "--nar-mib" => args.nar_size = number::<usize>(&value()) * MIB,
            "--paths" => args.paths = number(&value()),
            "--requests" => args.requests = number(&value()),
            "--concurrency" => args.concurrency = number(&value()),
            "--substituter" => args.substituters.push(substituter(&value())),
            "--path-set" => args.path_set = Some(value().into()),
            "all" => args.scenarios.extend(in_all()),
            name => match SCENARIOS.iter().find(|(n, _)| *n == name) {
                Some((n, _)) => args.scenarios.push(n),
                None => usage(),
            },
        }
    }
    if args.scenarios.is_empty() {
        args.scenarios = in_all().collect();
    }
    let path_set_only = args.scenarios.iter().all(|s| s.starts_with("path-set-"));
    let path_set_any = args.scenarios.iter().any(|s| s.starts_with("path-set-"));
    if (args.url.is_empty() && !path_set_only)
        || (path_set_any && (args.substituters.is_empty() || args.path_set.is_none()))
        || args.message == 0
        || args.runs == 0
        || args.paths == 0
        || args.requests == 0
        || args.concurrency == 0
        || args.cache.is_empty()
    {
        usage();
    }
    args
}

/// A binary cache `path-set-*` measures.
#[derive(Debug, Clone)]
struct Substituter {
    name: String,
    /// With a trailing slash, so `<hash>.narinfo` and a narinfo's `URL`
    /// land inside it, as Nix appends them.
    base: Url,
    /// The processes serving it, whose CPU each run reports (nginx: its
    /// workers; the master only accepts).
    pids: Vec<Probe>,
}

/// `NAME=URL` or `NAME:PID[,PID...]=URL` of `--substituter`.
fn substituter(text: &str) -> Substituter {
    let Some((label, url)) = text.split_once('=') else {
        usage()
    };
    let (name, pids) = match label.split_once(':') {
        Some((name, pids)) => (
            name,
            pids.split(',')
                .map(|pid| Probe(pid.parse().unwrap_or_else(|_| usage())))
                .collect(),
        ),
        None => (label, Vec::new()),
    };
    let slash = if url.ends_with('/') { "" } else { "/" };
    match Url::parse(&format!("{url}{slash}")) {
        Ok(base) if !name.is_empty() => Substituter {
            name: name.to_owned(),
            base,
            pids,
        },
        _ => usage(),
    }
}

// ---------------------------------------------------------------------------
// Content.

/// The seed for run `run` of scenario number `scenario`: distinct for every
/// pair, so no two writes carry the same content.
fn content_seed(base: u64, scenario: u64, run: usize) -> u64 {
    let n = scenario.wrapping_mul(1 << 32).wrapping_add(run as u64);
    base.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// A blob as REAPI names it.
#[derive(Debug, Clone)]
struct Blob {
    data: Bytes,
    hash: String,
}

impl Blob {
    fn generate(len: usize, seed: u64) -> Self {
        let data = pseudo_random(len, seed);
        let hash = Sha256Hash::of(&data).to_hex();
        Self { data, hash }
    }

    fn size(&self) -> usize {
        self.data.len()
    }
}

// ---------------------------------------------------------------------------
// Results.

/// One timed section: an RPC, a push, a set of downloads, or a round of
/// `--requests` requests.
#[derive(Debug, Clone, Default)]
struct Run {
    /// Items the run handled: one for a ByteStream call, the blobs or
    /// digests for batch calls.
    ops: u64,
    /// The blob's uncompressed size: what throughput is counted in.
    bytes: u64,
    /// What travelled as ByteStream data (compressed, for zstd).
    wire_bytes: u64,
    wall: Duration,
    /// Writes: from the moment the transport took the last message (the one
    /// with `finish_write`) to the reply. What the server does after the
    /// upload has arrived (ingest, if it waits for the end), plus the last
    /// flow-control window still in flight.
    after_last: Option<Duration>,
    client_cpu: Option<f64>,
    server_cpu: Option<f64>,
    /// The server answered a write with "already stored" (`committed_size`
    /// -1, Attic's `Deduplicated`): nothing was ingested, so the figure is
    /// not an upload's.
    already_stored: bool,
    /// Percentiles of the run's per-request latencies.
    latency: Option<Latency>,
    /// Downloads: the median time from sending a request to its first body
    /// byte.
    first_byte: Option<Duration>,
}

/// p50 and p99 (nearest rank) of a run's request latencies.
#[derive(Debug, Clone, Copy)]
struct Latency {
    p50: Duration,
    p99: Duration,
}

impl Latency {
    /// `None` for no requests.
    fn of(mut latencies: Vec<Duration>) -> Option<Self> {
        latencies.sort_unstable();
        Some(Self {
            p50: percentile(&latencies, 50)?,
            p99: percentile(&latencies, 99)?,
        })
    }
}

/// The nearest-rank `p`th percentile of `sorted`.
fn percentile(sorted: &[Duration], p: usize) -> Option<Duration> {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

impl Run {
    fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.wall.as_secs_f64()
    }

    /// Throughput, for runs that move bytes (not the request-rate ones).
    fn mb_per_s(&self) -> Option<f64> {
        (self.bytes > 0).then(|| self.bytes as f64 / self.wall.as_secs_f64() / 1e6)
    }

    fn mib_per_s(&self) -> Option<f64> {
        (self.bytes > 0).then(|| self.bytes as f64 / self.wall.as_secs_f64() / MIB as f64)
    }

    /// The run in a line, for the progress and the report's list of runs.
    fn summary(&self) -> String {
        let mut line = format!("{:.3} s =", self.wall.as_secs_f64());
        if let Some(rate) = self.mb_per_s() {
            let _ = write!(line, " {rate:.1} MB/s,");
        }
        let _ = write!(line, " {:.1} ops/s", self.ops_per_s());
        if let Some(l) = self.latency {
            let _ = write!(line, " (p50 {:.2} ms, p99 {:.2} ms)", ms(l.p50), ms(l.p99));
        }
        if let Some(d) = self.first_byte {
            let _ = write!(line, " (first byte after {:.2} ms)", ms(d));
        }
        if let Some(d) = self.after_last {
            let _ = write!(line, " ({:.2} s after the last message)", d.as_secs_f64());
        }
        if self.wire_bytes != self.bytes {
            let _ = write!(line, " ({} bytes on the wire)", self.wire_bytes);
        }
        if self.already_stored {
            line.push_str(", already stored");
        }
        line
    }
}

/// What a scenario yields per row: its runs, the server's peak RSS over
/// the whole scenario, or what stopped it.
#[derive(Debug)]
struct Outcome {
    scenario: &'static str,
    /// The variant of scenarios with several rows (content, connections).
    variant: Option<String>,
    /// The `--substituter` measured, for `path-set-*`.
    server: Option<String>,
    runs: Vec<Run>,
    /// Server `VmHWM` after the scenario, in KiB, and whether it was reset
    /// before it (else it is the peak since the server started).
    server_peak_kib: Option<(u64, bool)>,
    error: Option<String>,
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some(f64::midpoint(sorted[n / 2 - 1], sorted[n / 2])),
    }
}

impl Outcome {
    /// The row's name in the report.
    fn name(&self) -> String {
        let mut name = self.scenario.to_owned();
        if let Some(variant) = &self.variant {
            let _ = write!(name, " {variant}");
        }
        if let Some(server) = &self.server {
            let _ = write!(name, ": {server}");
        }
        name
    }

    fn rates(&self) -> Vec<f64> {
        self.runs.iter().filter_map(Run::mb_per_s).collect()
    }

    fn median_of(&self, f: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
        let values: Vec<f64> = self.runs.iter().filter_map(f).collect();
        median(&values)
    }

    fn min_max(&self) -> Option<(f64, f64)> {
        let rates = self.rates();
        let min = rates.iter().copied().reduce(f64::min)?;
        let max = rates.iter().copied().reduce(f64::max)?;
        Some((min, max))
    }
}

// ---------------------------------------------------------------------------
// The client.

#[derive(Debug)]
struct Ctx {
    args: Args,
    /// The gRPC connection to `--url`; `None` without it (only the
    /// `path-set-*` scenarios, which speak plain HTTP/1.1, may run then).
    channel: Option<Channel>,
    server: Option<Probe>,
    progress: bool,
    /// The last blob `bytestream-write` stored, for `bytestream-read`.
    written: Option<Blob>,
    /// The small blobs `batch-update-4k` stored, for the read and
    /// find-missing scenarios.
    small: Option<Vec<Blob>>,
    /// HTTP/1.1, one connection per request in flight, as Nix (curl) and
    /// the `attic` client use it.
    http: reqwest::Client,
    /// The Attic cache's endpoints, once it is known to exist.
    nix: Option<NixApi>,
    /// The paths `attic-push` stored last, per content variant, for the
    /// downloads.
    pushed: Vec<(Content, Vec<NixPath>)>,
    /// The small paths `narinfo-hit` looks up.
    narinfo_paths: Option<Vec<NixPath>>,
    /// The stored blobs every action result names.
    ac_outputs: Option<Vec<Blob>>,
    /// The actions `ac-update` stored last, for `ac-get`.
    actions: Option<Vec<Digest>>,
}

impl Ctx {
    async fn connect(args: Args) -> Result<Self, String> {
        let channel = if args.url.is_empty() {
            None
        } else {
            let channel = Channel::from_shared(args.url.clone())
                .map_err(|e| format!("--url {}: {e}", args.url))?
                .connect()
                .await
                .map_err(|e| format!("connecting to {}: {e}", args.url))?;
            Some(channel)
        };
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self {
            server: args.pid.map(Probe),
            progress: std::io::stderr().is_terminal(),
            args,
            channel,
            written: None,
            small: None,
            http,
            nix: None,
            pushed: Vec::new(),
            narinfo_paths: None,
            ac_outputs: None,
            actions: None,
        })
    }

    fn seed(&self, scenario: u64, run: usize) -> u64 {
        content_seed(self.args.seed, scenario, run)
    }

    /// The gRPC channel; `parse_args` requires `--url` for every scenario
    /// that asks for it.
    fn channel(&self) -> Channel {
        self.channel
            .clone()
            .expect("--url is required by every gRPC scenario")
    }

    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    fn ac(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel())
    }

    /// An HTTP request with the token, if any, as a bearer token.
    fn http(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match &self.args.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    fn request<T>(&self, message: T) -> Result<tonic::Request<T>, String> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.args.token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| "--token is not ASCII")?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }

    /// `{instance/}` for resource names.
    fn instance_prefix(&self) -> String {
        if self.args.instance.is_empty() {
            String::new()
        } else {
            format!("{}/", self.args.instance)
        }
    }

    /// Runs `rpc` as one timed section, with the CPU both sides spent.
    async fn timed<T>(
        &self,
        rpc: impl Future<Output = Result<T, String>>,
    ) -> Result<Timed<T>, String> {
        let client_before = Probe::own().cpu_secs();
        let server_before = self.server.and_then(Probe::cpu_secs);
        let started = Instant::now();
        let value = rpc.await?;
        let wall = started.elapsed();
        let client = Probe::own()
            .cpu_secs()
            .zip(client_before)
            .map(|(a, b)| a - b);
        let server = self
            .server
            .and_then(Probe::cpu_secs)
            .zip(server_before)
            .map(|(a, b)| a - b);
        Ok((value, wall, client, server))
    }

    /// A timed ByteStream Write of `payload` (already compressed if the name
    /// says so) in `--message-kib` messages; `blob_size` is what the
    /// throughput counts.
    async fn write(&self, name: String, payload: Bytes, blob_size: usize) -> Result<Run, String> {
        let piece = self.args.message;
        let pieces = payload.len().div_ceil(piece).max(1);
        let wire = payload.len();
        let last_taken = Arc::new(OnceLock::new());
        let taken = Arc::clone(&last_taken);
        let messages = (0..pieces).map(move |i| {
            if i + 1 == pieces {
                let _ = taken.set(Instant::now());
            }
            let start = i * piece;
            let end = (start + piece).min(payload.len());
            WriteRequest {
                resource_name: if i == 0 { name.clone() } else { String::new() },
                write_offset: start as i64,
                finish_write: i + 1 == pieces,
                data: payload.slice(start..end),
            }
        });
        let request = self.request(stream::iter(messages))?;
        let mut client = self.bytestream();
        let ((committed, replied), wall, client_cpu, server_cpu) = self
            .timed(async {
                let reply = client.write(request).await.map_err(|s| status_text(&s))?;
                Ok((reply.into_inner().committed_size, Instant::now()))
            })
            .await?;
        let after_last = last_taken.get().map(|&taken| replied - taken);
        if committed != wire as i64 && committed != -1 {
            return Err(format!(
                "committed_size {committed}, expected {wire} (or -1)"
            ));
        }
        Ok(Run {
            ops: 1,
            bytes: blob_size as u64,
            wire_bytes: wire as u64,
            wall,
            after_last,
            client_cpu,
            server_cpu,
            already_stored: committed == -1,
            ..Run::default()
        })
    }

    /// A timed ByteStream Read of `blob`, checked against its content after
    /// the timing.
    async fn read(&self, blob: &Blob) -> Result<Run, String> {
        let name = format!(
            "{}blobs/{}/{}",
            self.instance_prefix(),
            blob.hash,
            blob.size()
        );
        let request = self.request(ReadRequest {
            resource_name: name,
            read_offset: 0,
            read_limit: 0,
        })?;
        let mut client = self.bytestream();
        let (pieces, wall, client_cpu, server_cpu) = self
            .timed(async {
                let mut replies = client
                    .read(request)
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                let mut pieces = Vec::new();
                while let Some(reply) = replies.next().await {
                    pieces.push(reply.map_err(|s| status_text(&s))?.data);
                }
                Ok(pieces)
            })
            .await?;
        let received: usize = pieces.iter().map(Bytes::len).sum();
        let mut offset = 0;
        for piece in &pieces {
            if blob.data.get(offset..offset + piece.len()) != Some(&piece[..]) {
                return Err(format!("read returned other bytes at offset {offset}"));
            }
            offset += piece.len();
        }
        if received != blob.size() {
            return Err(format!("read returned {received} of {} bytes", blob.size()));
        }
        Ok(Run {
            ops: 1,
            bytes: received as u64,
            wire_bytes: received as u64,
            wall,
            client_cpu,
            server_cpu,
            ..Run::default()
        })
    }

    fn progress(&self, scenario: &str, run: usize, result: &Run) {
        if self.progress {
            eprintln!(
                "{scenario} run {}/{}: {}",
                run + 1,
                self.args.runs,
                result.summary()
            );
        }
    }
}

/// A gRPC status in a line.
fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------
// Scenarios: one function each, `--runs` runs in, the runs out.

/// `bytestream-write`: identity uploads of new content, one per run.
async fn bytestream_write(ctx: &mut Ctx) -> Result<Vec<Run>, String> {
    let mut runs = Vec::new();
    for run in 0..ctx.args.runs {
        let blob = Blob::generate(ctx.args.size, ctx.seed(1, run));
        let name = format!(
            "{}uploads/{}/blobs/{}/{}",
            ctx.instance_prefix(),
            uuid(ctx.seed(1, run)),
            blob.hash,
            blob.size()
        );
        let result = ctx.write(name, blob.data.clone(), blob.size()).await?;
        ctx.progress("bytestream-write", run, &result);
        runs.push(result);
        ctx.written = Some(blob);
    }
    Ok(runs)
}

/// The scenarios `all` runs: every one but the memory test, which moves
/// tens of GiB, and the path-set comparison, which needs a path set and
/// the caches that hold it.
fn in_all() -> impl Iterator<Item = &'static str> {
    SCENARIOS
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| *n != "bytestream-write-32" && !n.starts_with("path-set-"))
}

/// Writers of `bytestream-write-32`.
const PARALLEL_WRITERS: usize = 32;

/// `bytestream-write-32`: [`PARALLEL_WRITERS`] uploads of `--size` at once,
/// each message generated as it is sent (and once before, untimed, for the
/// digest), so the client holds no blob: what it measures is the server's
/// memory with that many uploads in flight. One run; `--runs` is ignored.
async fn bytestream_write_parallel(ctx: &mut Ctx) -> Result<Vec<Run>, String> {
    let size = ctx.args.size;
    let piece = ctx.args.message;
    let message = move |writer: u64, i: usize| -> Bytes {
        let len = piece.min(size - i * piece);
        build_output_like(len, content_seed(writer, 32, i)).into()
    };
    let mut names = Vec::with_capacity(PARALLEL_WRITERS);
    for writer in 0..PARALLEL_WRITERS as u64 {
        let mut hasher = garret_nix::Sha256Hasher::new();
        for i in 0..size.div_ceil(piece) {
            hasher.update(&message(ctx.args.seed ^ writer, i));
        }
        let (hash, _) = hasher.finish();
        names.push(format!(
            "{}uploads/{}/blobs/{}/{size}",
            ctx.instance_prefix(),
            uuid(ctx.args.seed ^ writer),
            hash.to_hex()
        ));
    }
    let mut requests = Vec::with_capacity(PARALLEL_WRITERS);
    for (writer, name) in (0..PARALLEL_WRITERS as u64).zip(names) {
        let seed = ctx.args.seed ^ writer;
        let pieces = size.div_ceil(piece);
        let messages = (0..pieces).map(move |i| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i * piece) as i64,
            finish_write: i + 1 == pieces,
            data: message(seed, i),
        });
        requests.push(ctx.request(stream::iter(messages))?);
    }
    let clients: Vec<_> = (0..PARALLEL_WRITERS).map(|_| ctx.bytestream()).collect();
    let (committed, wall, client_cpu, server_cpu) = ctx
        .timed(async {
            let writes =
                clients
                    .into_iter()
                    .zip(requests)
                    .map(|(mut client, request)| async move {
                        client
                            .write(request)
                            .await
                            .map(|r| r.into_inner().committed_size)
                    });
            let results = futures::future::join_all(writes).await;
            results
                .into_iter()
                .map(|r| r.map_err(|s| status_text(&s)))
                .collect::<Result<Vec<i64>, String>>()
        })
        .await?;
    if let Some(bad) = committed.iter().find(|&&c| c != size as i64) {
        return Err(format!("committed_size {bad}, expected {size}"));
    }
    let total = (size * PARALLEL_WRITERS) as u64;
    Ok(vec![Run {
        ops: PARALLEL_WRITERS as u64,
        bytes: total,
        wire_bytes: total,
        wall,
        client_cpu,
        server_cpu,
        ..Run::default()
    }])
}

/// `bytestream-write-zstd`: the same through `compressed-blobs/zstd`, the
/// compression done before the timing.
async fn bytestream_write_zstd(ctx: &mut Ctx) -> Result<Vec<Run>, String> {
    let mut runs = Vec::new();
    for run in 0..ctx.args.runs {
        let blob = Blob::generate(ctx.args.size, ctx.seed(2, run));
        let compressed = zstd::bulk::compress(&blob.data, ZSTD_LEVEL)
            .map_err(|e| format!("zstd compress: {e}"))?;
        let name = format!(
            "{}uploads/{}/compressed-blobs/zstd/{}/{}",
            ctx.instance_prefix(),
            uuid(ctx.seed(2, run)),
            blob.hash,
            blob.size()
        );
        let result = ctx.write(name, compressed.into(), blob.size()).await?;
        ctx.progress("bytestream-write-zstd", run, &result);
        runs.push(result);
    }
    Ok(runs)
}

/// `bytestream-read`: reads the blob `bytestream-write` wrote last, `--runs`
/// times; writes one first (untimed) if that scenario did not run.
async fn bytestream_read(ctx: &mut Ctx) -> Result<Vec<Run>, String> {
    let blob = if let Some(blob) = ctx.written.clone() {
        blob
    } else {
        let blob = Blob::generate(ctx.args.size, ctx.seed(3, 0));
        let name = format!(
            "{}uploads/{}/blobs/{}/{}",
            ctx.instance_prefix(),
            uuid(ctx.seed(3, 0)),
            blob.hash,
            blob.size()
        );
        ctx.write(name, blob.data.clone(), blob.size()).await?;
        blob
    };
    let mut runs = Vec::new();
    for run in 0..ctx.args.runs {
        let result = ctx.read(&blob).await?;
        ctx.progress("bytestream-read", run, &result);
        runs.push(result);
    }
    Ok(runs)
}

fn digest_of(blob: &Blob) -> Digest {
    Digest {
        hash: blob.hash.clone(),
        size_bytes: blob.size() as i64,
    }
}

/// `SMALL_BLOBS` new 4 KiB blobs for run `run` of scenario `scenario`.
fn small_blobs(ctx: &Ctx, scenario: u64, run: usize) -> Vec<Blob> {
    let base = ctx.seed(scenario, run);
    (0..SMALL_BLOBS)
        .map(|i| Blob::generate(SMALL_BLOB_BYTES, base.wrapping_add(i as u64 * 2 + 1)))
        .collect()
}

/// One timed BatchUpdateBlobs pass over `blobs`, `SMALL_PER_BATCH` a
/// request; every entry must be stored.
async fn batch_update(ctx: &Ctx, blobs: &[Blob]) -> Result<Run, String> {
    let mut requests = Vec::new();
    for batch in blobs.chunks(SMALL_PER_BATCH) {
        requests.push(
            ctx.request(BatchUpdateBlobsRequest {
                instance_name: ctx.args.instance.clone(),
                requests: batch
                    .iter()
                    .map(|b| batch_update_blobs_request::Request {
                        digest: Some(digest_of(b)),
                        data: b.data.clone(),
                        compressor: 0,
                    })
                    .collect(),
                ..Default::default()
            })?,
        );
    }
    let mut cas = ctx.cas();
    let (failed, wall, client_cpu, server_cpu) = ctx
        .timed(async {
            let mut failed = 0;
            for request in requests {
                let reply = cas
                    .batch_update_blobs(request)
                    .await
                    .map_err(|s| status_text(&s))?;
                failed += reply
                    .into_inner()
                    .responses
                    .iter()
                    .filter(|r| r.status.as_ref().is_some_and(|s| s.code != 0))
                    .count();
            }
            Ok(failed)
        })
        .await?;
    if failed > 0 {
        return Err(format!("{failed} blobs were not stored"));
    }
    Ok(small_run(blobs, wall, client_cpu, server_cpu))
}

fn small_run(
    blobs: &[Blob],
    wall: Duration,
    client_cpu: Option<f64>,
    server_cpu: Option<f64>,
) -> Run {
    let bytes = (blobs.len() * SMALL_BLOB_BYTES) as u64;
    Run {
        ops: blobs.len() as u64,
        bytes,
        wire_bytes: bytes,
        wall,
        client_cpu,
        server_cpu,
        ..Run::default()
    }
}

/// `batch-update-4k`: new small blobs every run.
async fn batch_update_4k(ctx: &mut Ctx) -> Result<Vec<Run>, String> {
    let mut runs = Vec::new();
    for run in 0..ctx.args.runs {
        let blobs = small_blobs(ctx, 4, run);
        let result = batch_update(ctx, &blobs).await?;
        ctx.progress("batch-update-4k", run, &result);
        runs.push(result);
        ctx.small = Some(blobs);
    }
    Ok(runs)
}

/// The small blobs `batch-update-4k` stored, or new ones stored (untimed).
async fn stored_small_blobs(ctx: &mut Ctx) -> Result<Vec<Blob>, String> {
    if let Some(blobs) = ctx.small.clone() {
        return Ok(blobs);
    }
    let blobs = small_blobs(ctx, 5, 0);
    batch_update(ctx, &blobs).await?;
    ctx.small = Some(blobs.clone());
    Ok(blobs)
}

/// `batch-read-4k`: reads the stored small blobs back, checked after the
/// timing.
async fn batch_read_4k(ctx: &mut Ctx) -> Result<Vec<Run>, String> {
    let blobs = stored_small_blobs(ctx).await?;
    let mut runs = Vec::new();
    for run in 0..ctx.args.runs {
        let mut requests = Vec::new();
        for batch in blobs.chunks(SMALL_PER_BATCH) {
            requests.push(ctx.request(BatchReadBlobsRequest {
                instance_name: ctx.args.instance.clone(),
                digests: batch.iter().map(digest_of).collect(),
                ..Default::default()
            })?);
        }
        let mut cas = ctx.cas();
        let (replies, wall, client_cpu, server_cpu) = ctx
            .timed(async {
                let mut replies = Vec::new();
                for request in requests {
                    let reply = cas
                        .batch_read_blobs(request)
                        .await
                        .map_err(|s| status_text(&s))?;
                    replies.extend(reply.into_inner().responses);
                }
                Ok(replies)
            })
            .await?;
        // Matched by digest: REAPI does not promise the request's order.
        let read: std::collections::HashMap<&str, &Bytes> = replies
            .iter()
            .filter(|r| r.status.as_ref().is_none_or(|s| s.code == 0))
            .filter_map(|r| Some((r.digest.as_ref()?.hash.as_str(), &r.data)))
            .collect();
        let good = blobs
            .iter()
            .filter(|b| read.get(b.hash.as_str()) == Some(&&b.data))
            .count();
        if good != blobs.len() {
            return Err(format!("{good} of {} blobs read back intact", blobs.len()));
        }
        let result = small_run(&blobs, wall, client_cpu, server_cpu);
        ctx.progress("batch-read-4k", run, &result);
        runs.push(result);
    }
    Ok(runs)
}

/// `find-missing-10k`: one FindMissingBlobs of the stored small blobs'
/// digests, half of them replaced by new ones; the new half must come back.
async fn find_missing_10k(ctx: &mut Ctx) -> Result<Vec<Run>, String> {
    let stored = stored_small_blobs(ctx).await?;
    let mut runs = Vec::new();
    for run in 0..ctx.args.runs {
        let fresh = small_blobs(ctx, 6, run);
        let digests: Vec<Digest> = stored
            .iter()
            .step_by(2)
            .chain(fresh.iter().step_by(2))
            .map(digest_of)
            .collect();
        let asked = digests.len();
        let request = ctx.request(FindMissingBlobsRequest {
            instance_name: ctx.args.instance.clone(),
            blob_digests: digests,
            ..Default::default()
        })?;
        let mut cas = ctx.cas();
        let (missing, wall, client_cpu, server_cpu) = ctx
            .timed(async {
                let reply = cas
                    .find_missing_blobs(request)
                    .await
                    .map_err(|s| status_text(&s))?;
                Ok(reply.into_inner().missing_blob_digests.len())
            })
            .await?;
        if missing != asked / 2 {
            return Err(format!(
                "{missing} of {asked} missing, expected {}",
                asked / 2
            ));
        }
        let result = Run {
            ops: asked as u64,
            bytes: 0,
            wire_bytes: 0,
            wall,
            client_cpu,
            server_cpu,
            ..Run::default()
        };
        ctx.progress("find-missing-10k", run, &result);
        runs.push(result);
    }
    Ok(runs)
}

// ---------------------------------------------------------------------------
// HTTP.

/// Sends `request` and reads the whole reply.
async fn fetch(request: reqwest::RequestBuilder) -> Result<(StatusCode, Bytes), String> {
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// A reply that was not the one expected, with the start of its body:
/// Attic-style errors explain themselves.
fn unexpected(status: StatusCode, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    format!("{status}: {text}")
}

/// [`fetch`], refusing any status but a success; Nix takes 200, 201 and
/// 204 alike.
async fn fetch_ok(request: reqwest::RequestBuilder) -> Result<Bytes, String> {
    match fetch(request).await? {
        (status, body) if status.is_success() => Ok(body),
        (status, body) => Err(unexpected(status, &body)),
    }
}

/// [`fetch`], refusing any status but 404: "not there", for a miss.
async fn fetch_missing(request: reqwest::RequestBuilder) -> Result<(), String> {
    match fetch(request).await? {
        (StatusCode::NOT_FOUND, _) => Ok(()),
        (status, body) => Err(unexpected(status, &body)),
    }
}

fn json_of(body: &[u8]) -> Result<serde_json::Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("reply is not JSON ({e})"))
}

/// Where a cache's Attic config sends clients.
#[derive(Debug, Clone)]
struct NixApi {
    /// `api_endpoint`: the `attic` client resolves `_api/v1/...` against
    /// it (RFC 3986), so it is used as given.
    api: Url,
    /// `substituter_endpoint` with a trailing slash, so `<hash>.narinfo`
    /// and a narinfo's `URL` land inside it, as Nix appends them.
    substituter: Url,
}

impl NixApi {
    fn api(&self, path: &str) -> Result<Url, String> {
        self.api.join(path).map_err(|e| format!("{path}: {e}"))
    }

    fn cache_file(&self, file: &str) -> Result<Url, String> {
        self.substituter
            .join(file)
            .map_err(|e| format!("{file}: {e}"))
    }
}

// ---------------------------------------------------------------------------
// Nix store paths.

/// The file inside a pushed path's NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// Build-output-like, about 2.4:1 with zstd-3: what caches mostly hold.
    Compressible,
    /// Pseudo-random: the codec gains nothing, so the rest of the path shows.
    Incompressible,
}

impl Content {
    const ALL: [Self; 2] = [Self::Compressible, Self::Incompressible];

    fn name(self) -> &'static str {
        match self {
            Self::Compressible => "compressible",
            Self::Incompressible => "incompressible",
        }
    }

    fn generate(self, len: usize, seed: u64) -> Bytes {
        match self {
            Self::Compressible => build_output_like(len, seed).into(),
            Self::Incompressible => pseudo_random(len, seed),
        }
    }
}

/// An invented store path and what its narinfo must say.
#[derive(Debug, Clone)]
struct NixPath {
    hash: StorePathHash,
    name: String,
    nar_hash: Sha256Hash,
    nar_size: u64,
}

/// A path about to be pushed, with its NAR.
#[derive(Debug, Clone)]
struct PathNar {
    path: NixPath,
    nar: Bytes,
}

/// A valid store path hash (20 bytes, 32 nix32 characters) derived from
/// `key`.
fn path_hash(key: &[u8]) -> StorePathHash {
    let digest = Sha256Hash::of(key);
    StorePathHash::from_bytes(digest.as_bytes()[..20].try_into().expect("20 of 32 bytes"))
}

/// The NAR of a single regular file holding `contents`.
fn nar_of_file(contents: &[u8]) -> Result<Bytes, String> {
    let fail = |e: std::io::Error| format!("writing a NAR: {e}");
    let mut writer = NarWriter::new(Vec::with_capacity(contents.len() + 256)).map_err(fail)?;
    writer
        .file(false, contents.len() as u64, contents)
        .map_err(fail)?;
    Ok(writer.finish().map_err(fail)?.into())
}

impl NixPath {
    /// The path called `name` (its hash is derived from the name, so a new
    /// name is a new path) with `nar` as its NAR.
    fn with_nar(name: String, nar: Bytes) -> PathNar {
        let path = Self {
            hash: path_hash(name.as_bytes()),
            name,
            nar_hash: Sha256Hash::of(&nar),
            nar_size: nar.len() as u64,
        };
        PathNar { path, nar }
    }

    fn store_path(&self) -> String {
        format!("{STORE_DIR}/{}-{}", self.hash, self.name)
    }

    fn narinfo_file(&self) -> String {
        format!("{}.narinfo", self.hash)
    }
}

/// `--paths` new paths of `size` bytes of `content` for run `run` of
/// scenario `scenario`, generated before any timing.
fn new_paths(
    ctx: &Ctx,
    scenario: u64,
    run: usize,
    content: Content,
    size: usize,
    count: usize,
) -> Result<Vec<PathNar>, String> {
    let base = ctx.seed(scenario * 10 + content as u64, run);
    (0..count)
        .map(|i| {
            let seed = base.wrapping_add(i as u64 * 2 + 1);
            let nar = nar_of_file(&content.generate(size, seed))?;
            let name = format!("garret-bench-{}-{seed:016x}", content.name());
            Ok(NixPath::with_nar(name, nar))
        })
        .collect()
}

/// A scenario's rows: one per content variant, or one unnamed.
type Rows = Vec<(Option<&'static str>, Vec<Run>)>;

/// A row of the report: a scenario's variant against one server.
#[derive(Debug)]
struct Row {
    variant: Option<String>,
    server: Option<String>,
    runs: Vec<Run>,
}

/// A timed push or download of the NARs of `paths`, counted in NAR bytes.
fn nar_run(paths: &[NixPath], wire_bytes: u64, timed: Timed<()>) -> Run {
    let ((), wall, client_cpu, server_cpu) = timed;
    Run {
        ops: paths.len() as u64,
        bytes: paths.iter().map(|p| p.nar_size).sum(),
        wire_bytes,
        wall,
        client_cpu,
        server_cpu,
        ..Run::default()
    }
}

/// What [`Ctx::timed`] yields: the value, the wall time and the CPU both
/// sides spent.
type Timed<T> = (T, Duration, Option<f64>, Option<f64>);

impl Ctx {
    /// The cache's endpoints from its Attic config; the cache is created
    /// first (with a new key, as `attic cache create` does) if it does not
    /// exist.
    async fn nix_api(&mut self) -> Result<NixApi, String> {
        if let Some(api) = &self.nix {
            return Ok(api.clone());
        }
        let cache = &self.args.cache;
        let config_url = Url::parse(&format!("{}/_api/v1/cache-config/{cache}", self.args.url))
            .map_err(|e| format!("--url, --cache: {e}"))?;
        let (status, _) = fetch(self.http(Method::GET, config_url.clone()))
            .await
            .map_err(|e| format!("cache-config of {cache}: {e}"))?;
        if status == StatusCode::NOT_FOUND {
            let create = serde_json::json!({
                "keypair": "Generate",
                "is_public": false,
                "store_dir": STORE_DIR,
                "priority": 41,
                "upstream_cache_key_names": [],
            });
            fetch_ok(self.http(Method::POST, config_url.clone()).json(&create))
                .await
                .map_err(|e| format!("creating the cache {cache}: {e}"))?;
        }
        let config = fetch_ok(self.http(Method::GET, config_url))
            .await
            .and_then(|body| json_of(&body))
            .map_err(|e| format!("cache-config of {cache}: {e}"))?;
        let endpoint = |field: &str, slash: &str| {
            let text = config[field]
                .as_str()
                .ok_or_else(|| format!("cache-config of {cache} has no {field}: {config}"))?;
            Url::parse(&format!("{text}{slash}")).map_err(|e| format!("{field} {text:?}: {e}"))
        };
        let substituter_slash = if config["substituter_endpoint"]
            .as_str()
            .is_some_and(|s| s.ends_with('/'))
        {
            ""
        } else {
            "/"
        };
        let api = NixApi {
            api: endpoint("api_endpoint", "")?,
            substituter: endpoint("substituter_endpoint", substituter_slash)?,
        };
        self.nix = Some(api.clone());
        Ok(api)
    }

    /// `attic push` of `paths`: one get-missing-paths for all of them (each
    /// must be missing), then upload-path, `PARALLEL_UPLOADS` at a time.
    /// Returns how many the server deduplicated.
    async fn attic_push(&self, api: &NixApi, paths: &[PathNar]) -> Result<usize, String> {
        let hashes: Vec<String> = paths.iter().map(|p| p.path.hash.to_string()).collect();
        let query = serde_json::json!({ "cache": self.args.cache, "store_path_hashes": hashes });
        let missing = fetch_ok(
            self.http(Method::POST, api.api("_api/v1/get-missing-paths")?)
                .json(&query),
        )
        .await
        .and_then(|body| json_of(&body))
        .map_err(|e| format!("get-missing-paths: {e}"))?;
        let missing = missing["missing_paths"].as_array().map_or(0, Vec::len);
        if missing != paths.len() {
            return Err(format!(
                "get-missing-paths: {missing} of {} new paths missing",
                paths.len()
            ));
        }
        let upload = api.api("_api/v1/upload-path")?;
        let deduplicated: Vec<bool> = stream::iter(paths)
            .map(|path| self.upload_path(upload.clone(), path))
            .buffer_unordered(PARALLEL_UPLOADS)
            .try_collect()
            .await?;
        Ok(deduplicated.into_iter().filter(|&d| d).count())
    }

    /// One upload-path as the `attic` client sends it: the NarInfo JSON in
    /// `X-Attic-Nar-Info` (its choice under 4 KiB), the NAR streamed in
    /// 1 MiB pieces without a Content-Length. True if the server answered
    /// `Deduplicated`.
    async fn upload_path(&self, url: Url, path: &PathNar) -> Result<bool, String> {
        let PathNar { path, nar } = path;
        let info = serde_json::json!({
            "cache": self.args.cache,
            "store_path_hash": path.hash.to_string(),
            "store_path": path.store_path(),
            "references": [],
            "system": null,
            "deriver": null,
            "sigs": [],
            "ca": null,
            "nar_hash": format!("sha256:{}", path.nar_hash.to_hex()),
            "nar_size": path.nar_size,
        });
        let pieces: Vec<Result<Bytes, std::io::Error>> = (0..nar.len())
            .step_by(MIB)
            .map(|start| Ok(nar.slice(start..(start + MIB).min(nar.len()))))
            .collect();
        let reply = fetch_ok(
            self.http(Method::PUT, url)
                .header("x-attic-nar-info", info.to_string())
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(reqwest::Body::wrap_stream(stream::iter(pieces))),
        )
        .await
        .and_then(|body| json_of(&body))
        .map_err(|e| format!("upload-path of {}: {e}", path.store_path()))?;
        match reply["kind"].as_str() {
            Some("Uploaded") => Ok(false),
            Some("Deduplicated") => Ok(true),
            _ => Err(format!(
                "upload-path of {}: reply {reply}",
                path.store_path()
            )),
        }
    }

    /// What `nix copy --to` sends for one path whose NAR was compressed to
    /// `file`: GET of the narinfo (404: missing), HEAD of the NAR file (404:
    /// not there yet), PUT of the file (in one body with a Content-Length,
    /// as Nix sends it), PUT of the narinfo.
    async fn nix_copy(&self, api: &NixApi, path: &NixPath, file: Bytes) -> Result<(), String> {
        let narinfo_url = api.cache_file(&path.narinfo_file())?;
        let file_hash = Sha256Hash::of(&file);
        let file_name = format!("nar/{}.nar.zst", file_hash.to_nix32());
        let file_url = api.cache_file(&file_name)?;
        let narinfo = NarInfo {
            store_path: StorePath::new(path.hash, &path.name)
                .map_err(|e| format!("{}: {e}", path.name))?,
            url: file_name,
            compression: "zstd".into(),
            file_hash: Some(file_hash),
            file_size: Some(file.len() as u64),
            nar_hash: path.nar_hash,
            nar_size: path.nar_size,
            references: Vec::new(),
            deriver: None,
            system: None,
            signatures: Vec::new(),
            ca: None,
        };
        fetch_missing(self.http(Method::GET, narinfo_url.clone()))
            .await
            .map_err(|e| format!("GET {narinfo_url}: {e}"))?;
        fetch_missing(self.http(Method::HEAD, file_url.clone()))
            .await
            .map_err(|e| format!("HEAD {file_url}: {e}"))?;
        fetch_ok(
            self.http(Method::PUT, file_url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/x-nix-nar")
                .body(file),
        )
        .await
        .map_err(|e| format!("PUT {file_url}: {e}"))?;
        fetch_ok(
            self.http(Method::PUT, narinfo_url.clone())
                .header(reqwest::header::CONTENT_TYPE, "text/x-nix-narinfo")
                .body(narinfo.render(STORE_DIR)),
        )
        .await
        .map_err(|e| format!("PUT {narinfo_url}: {e}"))?;
        Ok(())
    }
}

/// `attic-push`: per run, new paths of each content variant pushed as
/// `attic push` does, then the incompressible ones' NARs again under new
/// paths: a server that deduplicates by NAR hash stores nothing new, but
/// still reads and hashes every byte (proof of possession).
async fn attic_push(ctx: &mut Ctx) -> Result<Rows, String> {
    let api = ctx.nix_api().await?;
    let mut rows: Rows = Content::ALL
        .iter()
        .map(|c| Some(c.name()))
        .chain([Some("dedup")])
        .map(|variant| (variant, Vec::new()))
        .collect();
    for run in 0..ctx.args.runs {
        let mut pushed = Vec::new();
        let mut last = Vec::new();
        for (i, content) in Content::ALL.into_iter().enumerate() {
            let paths = new_paths(ctx, 7, run, content, ctx.args.nar_size, ctx.args.paths)?;
            let result = timed_attic_push(ctx, &api, &paths).await?;
            ctx.progress(&format!("attic-push {}", content.name()), run, &result);
            rows[i].1.push(result);
            pushed.push((content, paths.iter().map(|p| p.path.clone()).collect()));
            last = paths;
        }
        let again: Vec<PathNar> = last
            .into_iter()
            .map(|p| NixPath::with_nar(format!("{}-again", p.path.name), p.nar))
            .collect();
        let result = timed_attic_push(ctx, &api, &again).await?;
        if !result.already_stored {
            return Err("the same NARs under new paths were not deduplicated".into());
        }
        ctx.progress("attic-push dedup", run, &result);
        rows[Content::ALL.len()].1.push(result);
        ctx.pushed = pushed;
    }
    Ok(rows)
}

/// One timed `attic push` of `paths`; `already_stored` if the server
/// deduplicated every one.
async fn timed_attic_push(ctx: &Ctx, api: &NixApi, paths: &[PathNar]) -> Result<Run, String> {
    let (deduplicated, wall, client_cpu, server_cpu) =
        ctx.timed(ctx.attic_push(api, paths)).await?;
    let stored: Vec<NixPath> = paths.iter().map(|p| p.path.clone()).collect();
    let bytes = stored.iter().map(|p| p.nar_size).sum();
    Ok(Run {
        already_stored: deduplicated == paths.len(),
        ..nar_run(&stored, bytes, ((), wall, client_cpu, server_cpu))
    })
}

/// `nix-copy-put`: per run, new paths of each content variant uploaded as
/// `nix copy --to 'http://…?compression=zstd'` does, `PARALLEL_UPLOADS` at
/// a time; the zstd compression (level 3) happens before the timing.
async fn nix_copy_put(ctx: &mut Ctx) -> Result<Rows, String> {
    let api = ctx.nix_api().await?;
    let mut rows: Rows = Content::ALL
        .iter()
        .map(|c| (Some(c.name()), Vec::new()))
        .collect();
    for run in 0..ctx.args.runs {
        for (i, content) in Content::ALL.into_iter().enumerate() {
            let mut uploads = Vec::new();
            for PathNar { path, nar } in
                new_paths(ctx, 8, run, content, ctx.args.nar_size, ctx.args.paths)?
            {
                let file = zstd::bulk::compress(&nar, ZSTD_LEVEL)
                    .map_err(|e| format!("zstd compress: {e}"))?;
                uploads.push((path, Bytes::from(file)));
            }
            let wire = uploads.iter().map(|(_, file)| file.len() as u64).sum();
            let timed = ctx
                .timed(
                    stream::iter(&uploads)
                        .map(|(path, file)| ctx.nix_copy(&api, path, file.clone()))
                        .buffer_unordered(PARALLEL_UPLOADS)
                        .try_collect::<()>(),
                )
                .await?;
            let paths: Vec<NixPath> = uploads.into_iter().map(|(path, _)| path).collect();
            let result = nar_run(&paths, wire, timed);
            ctx.progress(&format!("nix-copy-put {}", content.name()), run, &result);
            rows[i].1.push(result);
        }
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------
// Request rates.

/// Requests `indices` through `one`, `--concurrency` in flight, as one
/// timed section that keeps every request's latency.
async fn load<F, Fut>(ctx: &Ctx, indices: Range<usize>, one: &F) -> Result<Run, String>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let count = indices.len();
    let (latencies, wall, client_cpu, server_cpu) = ctx
        .timed(
            stream::iter(indices)
                .map(|i| async move {
                    let started = Instant::now();
                    one(i).await?;
                    Ok(started.elapsed())
                })
                .buffer_unordered(ctx.args.concurrency)
                .try_collect::<Vec<Duration>>(),
        )
        .await?;
    Ok(Run {
        ops: count as u64,
        wall,
        client_cpu,
        server_cpu,
        latency: Latency::of(latencies),
        ..Run::default()
    })
}

/// A request-rate scenario: an untimed round of `--concurrency` requests,
/// which opens the connections, then `--runs` timed rounds of
/// `--requests`. No index is used twice, so `one` can make every request
/// new; returns the runs and how many indices were used.
async fn request_rounds<F, Fut>(
    ctx: &Ctx,
    scenario: &str,
    one: F,
) -> Result<(Vec<Run>, usize), String>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut next = ctx.args.concurrency;
    load(ctx, 0..next, &one).await?;
    let mut runs = Vec::new();
    for run in 0..ctx.args.runs {
        let result = load(ctx, next..next + ctx.args.requests, &one).await?;
        next += ctx.args.requests;
        ctx.progress(scenario, run, &result);
        runs.push(result);
    }
    Ok((runs, next))
}

/// The small paths `narinfo-hit` looks up, pushed (untimed) the first time.
async fn narinfo_paths(ctx: &mut Ctx, api: &NixApi) -> Result<Vec<NixPath>, String> {
    if let Some(paths) = &ctx.narinfo_paths {
        return Ok(paths.clone());
    }
    let paths = new_paths(
        ctx,
        9,
        0,
        Content::Incompressible,
        NARINFO_FILE_BYTES,
        NARINFO_PATHS,
    )?;
    ctx.attic_push(api, &paths).await?;
    let paths: Vec<NixPath> = paths.into_iter().map(|p| p.path).collect();
    ctx.narinfo_paths = Some(paths.clone());
    Ok(paths)
}

/// `narinfo-hit`: narinfo GETs of stored paths, round robin; each reply
/// must be the path's.
async fn narinfo_hit(ctx: &mut Ctx) -> Result<Vec<Run>, String> {
    let api = ctx.nix_api().await?;
    let paths = narinfo_paths(ctx, &api).await?;
    let targets = paths
        .iter()
        .map(|p| {
            let line = format!("StorePath: {}\n", p.store_path());
            Ok((api.cache_file(&p.narinfo_file())?, line))
        })
        .collect::<Result<Vec<(Url, String)>, String>>()?;
    let ctx = &*ctx;
    let (runs, _) = request_rounds(ctx, "narinfo-hit", |i| {
        let (url, line) = &targets[i % targets.len()];
        async move {
            let body = fetch_ok(ctx.http(Method::GET, url.clone()))
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            if body.windows(line.len()).any(|w| w == line.as_bytes()) {
                Ok(())
            } else {
                Err(format!("GET {url}: not its narinfo"))
            }
        }
    })
    .await?;
    Ok(runs)
}

/// `narinfo-miss`: narinfo GETs of random (valid) store path hashes, each
/// of which must be a 404.
async fn narinfo_miss(ctx: &mut Ctx) -> Result<Vec<Run>, String> {
    let api = ctx.nix_api().await?;
    let seed = ctx.seed(10, 0).to_le_bytes();
    let ctx = &*ctx;
    let (runs, _) = request_rounds(ctx, "narinfo-miss", |i| {
        let hash = path_hash(&[&seed[..], &i.to_le_bytes()].concat());
        let url = api.cache_file(&format!("{hash}.narinfo"));
        async move {
            let url = url?;
            fetch_missing(ctx.http(Method::GET, url.clone()))
                .await
                .map_err(|e| format!("GET {url}: {e}"))
        }
    })
    .await?;
    Ok(runs)
}

// ---------------------------------------------------------------------------
// NAR downloads.

/// A NAR to download, as its narinfo describes it.
#[derive(Debug, Clone)]
struct NarDownload {
    url: Url,
    /// What the throughput counts.
    nar_size: u64,
    /// The hash and size the body must have: the file's, or, with
    /// `decompress`, its NAR's.
    hash: Sha256Hash,
    size: u64,
    /// The narinfo has no FileHash (Attic leaves it out): the body is
    /// checked as the NAR after zstd decompression.
    decompress: bool,
}

/// Hashes a download as it arrives, so a short or altered body fails.
enum Verifier {
    File(Sha256Hasher),
    ZstdNar(Box<zstd::stream::write::Decoder<'static, Sha256Hasher>>),
}

impl Verifier {
    fn new(decompress: bool) -> Result<Self, String> {
        Ok(if decompress {
            let decoder = zstd::stream::write::Decoder::new(Sha256Hasher::new())
                .map_err(|e| format!("zstd: {e}"))?;
            Self::ZstdNar(Box::new(decoder))
        } else {
            Self::File(Sha256Hasher::new())
        })
    }

    fn update(&mut self, piece: &[u8]) -> Result<(), String> {
        match self {
            Self::File(hasher) => hasher.update(piece),
            Self::ZstdNar(decoder) => {
                std::io::Write::write_all(decoder, piece).map_err(|e| format!("zstd: {e}"))?;
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<(Sha256Hash, u64), String> {
        match self {
            Self::File(hasher) => Ok(hasher.finish()),
            Self::ZstdNar(mut decoder) => {
                std::io::Write::flush(&mut decoder).map_err(|e| format!("zstd: {e}"))?;
                Ok(decoder.into_inner().finish())
            }
        }
    }
}

/// Where `path`'s NAR is and what it must hash to, from its narinfo, which
/// must describe the path as it was pushed.
async fn locate_nar(ctx: &Ctx, api: &NixApi, path: &NixPath) -> Result<NarDownload, String> {
    let url = api.cache_file(&path.narinfo_file())?;
    let text = fetch_ok(ctx.http(Method::GET, url.clone()))
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let info = std::str::from_utf8(&text)
        .map_err(|e| e.to_string())
        .and_then(|text| NarInfo::parse(text, STORE_DIR).map_err(|e| e.to_string()))
        .map_err(|e| format!("GET {url}: {e}"))?;
    if info.store_path.hash() != &path.hash
        || info.nar_hash != path.nar_hash
        || info.nar_size != path.nar_size
    {
        return Err(format!("GET {url}: not the narinfo of the path pushed"));
    }
    let (hash, size, decompress) = match (info.file_hash, info.file_size, info.compression.as_str())
    {
        (Some(hash), Some(size), _) => (hash, size, false),
        (_, _, "none") => (info.nar_hash, info.nar_size, false),
        (_, _, "zstd") => (info.nar_hash, info.nar_size, true),
        (_, _, other) => {
            return Err(format!("GET {url}: a {other} NAR without FileHash"));
        }
    };
    Ok(NarDownload {
        url: api.cache_file(&info.url)?,
        nar_size: info.nar_size,
        hash,
        size,
        decompress,
    })
}

/// Downloads `nar` through `request`, checking it as it arrives; returns
/// the time to the first body byte and the bytes received. Owned, so it can
/// run as its own task: the hashing of concurrent streams then spreads
/// over the cores.
async fn download(
    request: reqwest::RequestBuilder,
    nar: NarDownload,
) -> Result<(Duration, u64), String> {
    let fail = |e: &dyn std::fmt::Display| format!("GET {}: {e}", nar.url);
    let started = Instant::now();
    let mut response = request.send().await.map_err(|e| fail(&e))?;
    if response.status() != StatusCode::OK {
        let status = response.status();
        let body = response.bytes().await.unwrap_or_default();
        return Err(fail(&unexpected(status, &body)));
    }
    let mut verifier = Verifier::new(nar.decompress)?;
    let mut first_byte = None;
    let mut received = 0;
    while let Some(piece) = response.chunk().await.map_err(|e| fail(&e))? {
        first_byte.get_or_insert_with(|| started.elapsed());
        received += piece.len() as u64;
        verifier.update(&piece)?;
    }
    let (hash, size) = verifier.finish()?;
    if (hash, size) != (nar.hash, nar.size) {
        return Err(fail(&format!(
            "{size} bytes hashing to {hash}, expected {} bytes hashing to {}",
            nar.size, nar.hash
        )));
    }
    Ok((first_byte.unwrap_or_else(|| started.elapsed()), received))
}

/// The paths `attic-push` stored last, or one path of each content variant
/// pushed now (untimed) if it did not run.
async fn pushed_paths(ctx: &mut Ctx, api: &NixApi) -> Result<Vec<(Content, Vec<NixPath>)>, String> {
    if ctx.pushed.is_empty() {
        for content in Content::ALL {
            let paths = new_paths(ctx, 11, 0, content, ctx.args.nar_size, ctx.args.paths)?;
            ctx.attic_push(api, &paths).await?;
            ctx.pushed
                .push((content, paths.into_iter().map(|p| p.path).collect()));
        }
    }
    Ok(ctx.pushed.clone())
}

/// `nar-download` and `nar-download-8`: the NARs of the pushed paths at
/// their narinfo's URL, `streams` downloads in flight (each path at least
/// once, each stream busy), each checked against the narinfo. A row per
/// content variant; the first-byte time is the median over the run's
/// downloads.
async fn nar_download(ctx: &mut Ctx, scenario: &str, streams: usize) -> Result<Rows, String> {
    let api = ctx.nix_api().await?;
    let mut rows = Rows::new();
    for (content, paths) in pushed_paths(ctx, &api).await? {
        let mut nars = Vec::new();
        for path in &paths {
            nars.push(locate_nar(ctx, &api, path).await?);
        }
        let chosen: Vec<NarDownload> = (0..nars.len().max(streams))
            .map(|d| nars[d % nars.len()].clone())
            .collect();
        let mut runs = Vec::new();
        for run in 0..ctx.args.runs {
            let (fetched, wall, client_cpu, server_cpu) = ctx
                .timed(
                    stream::iter(&chosen)
                        .map(|nar| {
                            let task =
                                download(ctx.http(Method::GET, nar.url.clone()), nar.clone());
                            async move { tokio::spawn(task).await.map_err(|e| e.to_string())? }
                        })
                        .buffer_unordered(streams)
                        .try_collect::<Vec<(Duration, u64)>>(),
                )
                .await?;
            let (mut first_bytes, received): (Vec<Duration>, Vec<u64>) =
                fetched.into_iter().unzip();
            first_bytes.sort_unstable();
            let result = Run {
                ops: chosen.len() as u64,
                bytes: chosen.iter().map(|n| n.nar_size).sum(),
                wire_bytes: received.iter().sum(),
                wall,
                client_cpu,
                server_cpu,
                first_byte: percentile(&first_bytes, 50),
                ..Run::default()
            };
            ctx.progress(&format!("{scenario} {}", content.name()), run, &result);
            runs.push(result);
        }
        rows.push((Some(content.name()), runs));
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------
// A path set against several binary caches.

/// The store path hashes `--path-set` lists: one a line, as a store path,
/// a base name or a bare hash (the first 32 characters of the line's last
/// `/` component); empty lines and `#` comments are skipped.
fn read_path_set(file: &std::path::Path) -> Result<Vec<StorePathHash>, String> {
    let fail = |e: &dyn std::fmt::Display| format!("--path-set {}: {e}", file.display());
    let text = std::fs::read_to_string(file).map_err(|e| fail(&e))?;
    let hashes = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let base = line.rsplit('/').next().unwrap_or(line);
            base.get(..32)
                .unwrap_or(base)
                .parse::<StorePathHash>()
                .map_err(|e| fail(&format!("{line:?}: {e}")))
        })
        .collect::<Result<Vec<_>, String>>()?;
    if hashes.is_empty() {
        return Err(fail(&"no store paths"));
    }
    Ok(hashes)
}

/// A client of its own for one timed section, so every run opens its
/// connections afresh and none is shared between servers. HTTP/1.1, as
/// Nix (curl) fetches from a substituter; no token: the caches compared
/// are public, and Nix sends none to a public cache.
fn fresh_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .map_err(|e| format!("HTTP client: {e}"))
}

/// Runs `section` as one timed section against `server`: wall time, this
/// process's CPU and, if its pids are known, the server's.
async fn timed_on<T>(
    server: &Substituter,
    section: impl Future<Output = Result<T, String>>,
) -> Result<Timed<T>, String> {
    let server_cpu = || -> Option<f64> {
        if server.pids.is_empty() {
            return None;
        }
        server.pids.iter().map(|p| p.cpu_secs()).sum()
    };
    let client_before = Probe::own().cpu_secs();
    let server_before = server_cpu();
    let started = Instant::now();
    let value = section.await?;
    let wall = started.elapsed();
    let client = Probe::own()
        .cpu_secs()
        .zip(client_before)
        .map(|(a, b)| a - b);
    let server = server_cpu().zip(server_before).map(|(a, b)| a - b);
    Ok((value, wall, client, server))
}

/// The narinfo at `url`, which must describe the path `hash`.
fn parse_narinfo(url: &Url, hash: &StorePathHash, body: &[u8]) -> Result<NarInfo, String> {
    let info = std::str::from_utf8(body)
        .map_err(|e| e.to_string())
        .and_then(|text| NarInfo::parse(text, STORE_DIR).map_err(|e| e.to_string()))
        .map_err(|e| format!("GET {url}: {e}"))?;
    if info.store_path.hash() == hash {
        Ok(info)
    } else {
        Err(format!("GET {url}: the narinfo of {}", info.store_path))
    }
}

/// `path-set-narinfo`: every narinfo of the path set, one after the other
/// over one keep-alive connection (opened by an untimed GET of the first),
/// as Nix asks a substituter about a closure. The servers take turns run by
/// run, so a change in the machine's load falls on both. The bodies are
/// parsed after the timing, so the client's share of the figure is the
/// HTTP exchange alone.
async fn path_set_narinfo(ctx: &mut Ctx) -> Result<Vec<Row>, String> {
    let hashes = read_path_set(ctx.args.path_set.as_deref().expect("parse_args"))?;
    let mut rows: Vec<Row> = ctx
        .args
        .substituters
        .iter()
        .map(|s| Row {
            variant: Some("1 connection".into()),
            server: Some(s.name.clone()),
            runs: Vec::new(),
        })
        .collect();
    for run in 0..ctx.args.runs {
        for (server, row) in ctx.args.substituters.iter().zip(&mut rows) {
            let urls = hashes
                .iter()
                .map(|h| server.base.join(&format!("{h}.narinfo")))
                .collect::<Result<Vec<Url>, _>>()
                .map_err(|e| format!("{}: {e}", server.name))?;
            let client = fresh_client()?;
            fetch_ok(client.get(urls[0].clone()))
                .await
                .map_err(|e| format!("GET {}: {e}", urls[0]))?;
            let ((bodies, latencies), wall, client_cpu, server_cpu) = timed_on(server, async {
                let mut bodies = Vec::with_capacity(urls.len());
                let mut latencies = Vec::with_capacity(urls.len());
                for url in &urls {
                    let started = Instant::now();
                    let body = fetch_ok(client.get(url.clone()))
                        .await
                        .map_err(|e| format!("GET {url}: {e}"))?;
                    latencies.push(started.elapsed());
                    bodies.push(body);
                }
                Ok((bodies, latencies))
            })
            .await?;
            for ((url, hash), body) in urls.iter().zip(&hashes).zip(&bodies) {
                parse_narinfo(url, hash, body)?;
            }
            let result = Run {
                ops: urls.len() as u64,
                wire_bytes: bodies.iter().map(|b| b.len() as u64).sum(),
                wall,
                client_cpu,
                server_cpu,
                latency: Latency::of(latencies),
                ..Run::default()
            };
            ctx.progress(&format!("path-set-narinfo: {}", server.name), run, &result);
            row.runs.push(result);
        }
    }
    Ok(rows)
}

/// A NAR file of the path set, as a server's narinfo names it.
#[derive(Debug, Clone)]
struct NarFile {
    url: Url,
    nar_size: u64,
    /// `FileSize`, which the body must match, when the narinfo gives it.
    file_size: Option<u64>,
}

/// Every path's NAR file on `server`, from its narinfos (untimed), which
/// must agree with `expected`'s NAR hash and size if it is given: the
/// servers compared must hold the same paths.
async fn nar_files(
    server: &Substituter,
    hashes: &[StorePathHash],
    expected: Option<&[(Sha256Hash, u64)]>,
) -> Result<(Vec<NarFile>, Vec<(Sha256Hash, u64)>), String> {
    let client = fresh_client()?;
    let mut files = Vec::with_capacity(hashes.len());
    let mut nars = Vec::with_capacity(hashes.len());
    for (i, hash) in hashes.iter().enumerate() {
        let url = server
            .base
            .join(&format!("{hash}.narinfo"))
            .map_err(|e| format!("{}: {e}", server.name))?;
        let body = fetch_ok(client.get(url.clone()))
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let info = parse_narinfo(&url, hash, &body)?;
        if let Some(expected) = expected
            && expected[i] != (info.nar_hash, info.nar_size)
        {
            return Err(format!("GET {url}: another NAR than the first server's"));
        }
        nars.push((info.nar_hash, info.nar_size));
        files.push(NarFile {
            url: server
                .base
                .join(&info.url)
                .map_err(|e| format!("GET {url}: URL {:?}: {e}", info.url))?,
            nar_size: info.nar_size,
            file_size: info.file_size,
        });
    }
    Ok((files, nars))
}

/// Downloads `file` through `client`, counting its bytes without keeping
/// or hashing them (so the client's share of the figure stays small); the
/// count must be the narinfo's `FileSize` when it has one.
async fn download_counted(client: reqwest::Client, file: NarFile) -> Result<u64, String> {
    let fail = |e: &dyn std::fmt::Display| format!("GET {}: {e}", file.url);
    let mut response = client
        .get(file.url.clone())
        .send()
        .await
        .map_err(|e| fail(&e))?;
    if response.status() != StatusCode::OK {
        let status = response.status();
        let body = response.bytes().await.unwrap_or_default();
        return Err(fail(&unexpected(status, &body)));
    }
    let mut received = 0;
    while let Some(piece) = response.chunk().await.map_err(|e| fail(&e))? {
        received += piece.len() as u64;
    }
    match file.file_size {
        Some(size) if size != received => Err(fail(&format!(
            "{received} bytes, the narinfo's FileSize is {size}"
        ))),
        _ => Ok(received),
    }
}

/// `path-set-nar`: every path's NAR file, in the path set's order, over
/// each of `PATH_SET_CONNECTIONS` connections (a fresh client per run, so
/// the connections are opened inside the timing, alike for every server),
/// the servers taking turns run by run. A row per connection count and
/// server; throughput counts NAR bytes, and the wire bytes are reported
/// beside them (each server compresses in its own way).
async fn path_set_nar(ctx: &mut Ctx) -> Result<Vec<Row>, String> {
    let hashes = read_path_set(ctx.args.path_set.as_deref().expect("parse_args"))?;
    let mut files = Vec::new();
    let mut first: Option<Vec<(Sha256Hash, u64)>> = None;
    for server in &ctx.args.substituters {
        let (nar_files, nars) = nar_files(server, &hashes, first.as_deref()).await?;
        first.get_or_insert(nars);
        files.push(nar_files);
    }
    let mut rows = Vec::new();
    for connections in PATH_SET_CONNECTIONS {
        let first_row = rows.len();
        for server in &ctx.args.substituters {
            rows.push(Row {
                variant: Some(format!(
                    "{connections} connection{}",
                    if connections == 1 { "" } else { "s" }
                )),
                server: Some(server.name.clone()),
                runs: Vec::new(),
            });
        }
        for run in 0..ctx.args.runs {
            for (i, (server, files)) in ctx.args.substituters.iter().zip(&files).enumerate() {
                let client = fresh_client()?;
                let (received, wall, client_cpu, server_cpu) = timed_on(
                    server,
                    stream::iter(files)
                        .map(|file| {
                            let task = download_counted(client.clone(), file.clone());
                            async move { tokio::spawn(task).await.map_err(|e| e.to_string())? }
                        })
                        .buffer_unordered(connections)
                        .try_collect::<Vec<u64>>(),
                )
                .await?;
                let result = Run {
                    ops: files.len() as u64,
                    bytes: files.iter().map(|f| f.nar_size).sum(),
                    wire_bytes: received.iter().sum(),
                    wall,
                    client_cpu,
                    server_cpu,
                    ..Run::default()
                };
                let row: &mut Row = &mut rows[first_row + i];
                ctx.progress(
                    &format!(
                        "path-set-nar {}: {}",
                        row.variant.as_deref().unwrap_or_default(),
                        server.name
                    ),
                    run,
                    &result,
                );
                row.runs.push(result);
            }
        }
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------
// Action cache.

/// The stored blobs every benchmark action result names (two output files
/// and stdout), stored (untimed) the first time: the server checks them on
/// every update and every hit.
async fn ac_outputs(ctx: &mut Ctx) -> Result<Vec<Blob>, String> {
    if let Some(blobs) = &ctx.ac_outputs {
        return Ok(blobs.clone());
    }
    let blobs: Vec<Blob> = (0..3)
        .map(|i| Blob::generate(SMALL_BLOB_BYTES, ctx.seed(12, i)))
        .collect();
    batch_update(ctx, &blobs).await?;
    ctx.ac_outputs = Some(blobs.clone());
    Ok(blobs)
}

/// A result naming `outputs`: the last as stdout, the others as files.
fn action_result(outputs: &[Blob]) -> ActionResult {
    let (stdout, files) = outputs.split_last().expect("at least stdout");
    ActionResult {
        output_files: files
            .iter()
            .enumerate()
            .map(|(i, blob)| OutputFile {
                path: format!("out/file-{i}"),
                digest: Some(digest_of(blob)),
                ..Default::default()
            })
            .collect(),
        stdout_digest: Some(digest_of(stdout)),
        ..Default::default()
    }
}

/// Action `i` of those made from `seed`: the digest of an `Action` never
/// uploaded, which an action cache does not need.
fn action_digest(seed: u64, i: usize) -> Digest {
    let key = [seed.to_le_bytes(), (i as u64).to_le_bytes()].concat();
    Digest {
        hash: Sha256Hash::of(&key).to_hex(),
        size_bytes: 140,
    }
}

impl Ctx {
    async fn update_action(&self, action: Digest, result: ActionResult) -> Result<(), String> {
        let request = self.request(UpdateActionResultRequest {
            instance_name: self.args.instance.clone(),
            action_digest: Some(action),
            action_result: Some(result),
            ..Default::default()
        })?;
        self.ac()
            .update_action_result(request)
            .await
            .map_err(|s| format!("UpdateActionResult: {}", status_text(&s)))?;
        Ok(())
    }
}

/// `ac-update`: a new action per request, all with the same result.
async fn ac_update(ctx: &mut Ctx) -> Result<Vec<Run>, String> {
    let result = action_result(&ac_outputs(ctx).await?);
    let seed = ctx.seed(13, 0);
    let shared = &*ctx;
    let (runs, stored) = request_rounds(shared, "ac-update", |i| {
        shared.update_action(action_digest(seed, i), result.clone())
    })
    .await?;
    ctx.actions = Some((0..stored).map(|i| action_digest(seed, i)).collect());
    Ok(runs)
}

/// `ac-get`: GetActionResult of stored actions, round robin; each reply
/// must name the outputs stored. If `ac-update` did not run,
/// `AC_GET_ACTIONS` actions are stored first (untimed).
async fn ac_get(ctx: &mut Ctx) -> Result<Vec<Run>, String> {
    let expected = action_result(&ac_outputs(ctx).await?);
    let actions = if let Some(actions) = ctx.actions.clone() {
        actions
    } else {
        let seed = ctx.seed(14, 0);
        let shared = &*ctx;
        let store = |i| shared.update_action(action_digest(seed, i), expected.clone());
        load(shared, 0..AC_GET_ACTIONS, &store).await?;
        let actions: Vec<Digest> = (0..AC_GET_ACTIONS)
            .map(|i| action_digest(seed, i))
            .collect();
        ctx.actions = Some(actions.clone());
        actions
    };
    let ctx = &*ctx;
    let expected = &expected;
    let (runs, _) = request_rounds(ctx, "ac-get", |i| {
        let action = actions[i % actions.len()].clone();
        async move {
            let request = ctx.request(GetActionResultRequest {
                instance_name: ctx.args.instance.clone(),
                action_digest: Some(action),
                ..Default::default()
            })?;
            let result = ctx
                .ac()
                .get_action_result(request)
                .await
                .map_err(|s| format!("GetActionResult: {}", status_text(&s)))?
                .into_inner();
            if result.output_files == expected.output_files {
                Ok(())
            } else {
                Err("GetActionResult: not the result stored".into())
            }
        }
    })
    .await?;
    Ok(runs)
}

/// Runs `scenario`: its rows, or one row with what stopped it.
async fn run_scenario(ctx: &mut Ctx, scenario: &'static str) -> Vec<Outcome> {
    fn named(rows: Result<Rows, String>) -> Result<Vec<Row>, String> {
        Ok(rows?
            .into_iter()
            .map(|(variant, runs)| Row {
                variant: variant.map(str::to_owned),
                server: None,
                runs,
            })
            .collect())
    }
    let reset = ctx.server.is_some_and(Probe::reset_peak);
    let rows = match scenario {
        "path-set-narinfo" => path_set_narinfo(ctx).await,
        "path-set-nar" => path_set_nar(ctx).await,
        _ => named(grpc_or_nix_scenario(ctx, scenario).await),
    };
    let server_peak_kib = ctx.server.and_then(Probe::peak_kib).map(|kib| (kib, reset));
    match rows {
        Ok(rows) => rows
            .into_iter()
            .map(|row| Outcome {
                scenario,
                // `--pid` is one server's: no figure for a row that may be
                // another's.
                server_peak_kib: server_peak_kib.filter(|_| row.server.is_none()),
                variant: row.variant,
                server: row.server,
                runs: row.runs,
                error: None,
            })
            .collect(),
        Err(e) => vec![Outcome {
            scenario,
            variant: None,
            server: None,
            runs: Vec::new(),
            server_peak_kib,
            error: Some(e),
        }],
    }
}

/// The rows of a scenario against `--url`.
async fn grpc_or_nix_scenario(ctx: &mut Ctx, scenario: &'static str) -> Result<Rows, String> {
    fn one(runs: Result<Vec<Run>, String>) -> Result<Rows, String> {
        runs.map(|runs| vec![(None, runs)])
    }
    match scenario {
        "bytestream-write" => one(bytestream_write(ctx).await),
        "bytestream-write-32" => one(bytestream_write_parallel(ctx).await),
        "bytestream-write-zstd" => one(bytestream_write_zstd(ctx).await),
        "bytestream-read" => one(bytestream_read(ctx).await),
        "batch-update-4k" => one(batch_update_4k(ctx).await),
        "batch-read-4k" => one(batch_read_4k(ctx).await),
        "find-missing-10k" => one(find_missing_10k(ctx).await),
        "attic-push" => attic_push(ctx).await,
        "nix-copy-put" => nix_copy_put(ctx).await,
        "narinfo-hit" => one(narinfo_hit(ctx).await),
        "narinfo-miss" => one(narinfo_miss(ctx).await),
        "nar-download" => nar_download(ctx, scenario, 1).await,
        "nar-download-8" => nar_download(ctx, scenario, NAR_STREAMS).await,
        "ac-update" => one(ac_update(ctx).await),
        "ac-get" => one(ac_get(ctx).await),
        other => Err(format!("no scenario {other}")),
    }
}

// ---------------------------------------------------------------------------
// The report.

fn markdown(args: &Args, outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    if args.scenarios.iter().all(|s| s.starts_with("path-set-")) {
        let _ = writeln!(
            out,
            "the paths of {} from {} substituter(s); {} run(s) per scenario\n",
            args.path_set
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
                .display(),
            args.substituters.len(),
            args.runs
        );
    } else {
        let _ = writeln!(
            out,
            "{} MiB per blob in {} KiB messages; {} path(s) of {} MiB per NAR push; {} requests \
         per run at {} in flight; {} run(s) per scenario, seed {}\n",
            args.size / MIB,
            args.message / 1024,
            args.paths,
            args.nar_size / MIB,
            args.requests,
            args.concurrency,
            args.runs,
            args.seed
        );
    }
    out.push_str(
        "| scenario | runs | median MB/s | min MB/s | max MB/s | median MiB/s | median ops/s \
         | median wall | median after last message | median p50 | median p99 \
         | median first byte | server peak RSS | server CPU / run | client CPU / run |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- \
         | --- |\n",
    );
    let fixed = |v: Option<f64>, unit: &str| v.map_or("—".into(), |v| format!("{v:.1}{unit}"));
    let fixed2 = |v: Option<f64>, unit: &str| v.map_or("—".into(), |v| format!("{v:.2}{unit}"));
    for o in outcomes {
        if let Some(error) = &o.error {
            let _ = writeln!(
                out,
                "| {} | failed: {} | | | | | | | | | | | | | |",
                o.name(),
                error.replace('|', "/")
            );
            continue;
        }
        let (min, max) = o.min_max().unzip();
        let peak = o.server_peak_kib.map_or("—".into(), |(kib, reset)| {
            format!(
                "{} MiB{}",
                kib.div_ceil(1024),
                if reset { "" } else { " (since start)" }
            )
        });
        let _ = writeln!(
            out,
            "| {} | {} | **{}** | {} | {} | {} | {} | {} | {} | {} | {} | {} | {peak} | {} | {} |",
            o.name(),
            o.runs.len(),
            fixed(o.median_of(Run::mb_per_s), ""),
            fixed(min, ""),
            fixed(max, ""),
            fixed(o.median_of(Run::mib_per_s), ""),
            fixed(o.median_of(|r| Some(r.ops_per_s())), ""),
            fixed(o.median_of(|r| Some(r.wall.as_secs_f64())), " s"),
            fixed2(o.median_of(|r| r.after_last.map(|d| d.as_secs_f64())), " s"),
            fixed2(o.median_of(|r| r.latency.map(|l| ms(l.p50))), " ms"),
            fixed2(o.median_of(|r| r.latency.map(|l| ms(l.p99))), " ms"),
            fixed2(o.median_of(|r| r.first_byte.map(ms)), " ms"),
            fixed(o.median_of(|r| r.server_cpu), " s"),
            fixed(o.median_of(|r| r.client_cpu), " s"),
        );
    }
    out.push('\n');
    comparison(&mut out, args, outcomes);
    for o in outcomes.iter().filter(|o| !o.runs.is_empty()) {
        let runs: Vec<String> = o.runs.iter().map(Run::summary).collect();
        let _ = writeln!(out, "- {}: {}", o.name(), runs.join("; "));
    }
    out
}

/// The `path-set-*` rows side by side: per scenario and variant, each
/// server's median wall time, and its ratio to the last `--substituter`'s
/// (the reference, e.g. a plain web server over a file cache).
fn comparison(out: &mut String, args: &Args, outcomes: &[Outcome]) {
    let names: Vec<&str> = args.substituters.iter().map(|s| s.name.as_str()).collect();
    let Some((reference, others)) = names.split_last() else {
        return;
    };
    let mut keys: Vec<(&str, Option<&str>)> = Vec::new();
    for o in outcomes.iter().filter(|o| o.server.is_some()) {
        let key = (o.scenario, o.variant.as_deref());
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    if keys.is_empty() {
        return;
    }
    let _ = write!(out, "| path set (median of {} runs) |", args.runs);
    for name in &names {
        let _ = write!(out, " {name} |");
    }
    for name in others {
        let _ = write!(out, " {name} / {reference} |");
    }
    out.push_str("\n|");
    out.push_str(&" --- |".repeat(1 + names.len() + others.len()));
    out.push('\n');
    for (scenario, variant) in keys {
        let wall = |name: &str| {
            outcomes
                .iter()
                .find(|o| {
                    o.scenario == scenario
                        && o.variant.as_deref() == variant
                        && o.server.as_deref() == Some(name)
                })
                .and_then(|o| Some((o, o.median_of(|r| Some(r.wall.as_secs_f64()))?)))
        };
        let _ = write!(out, "| {scenario} {} |", variant.unwrap_or_default());
        for name in &names {
            let cell = wall(name).map_or("—".into(), |(o, secs)| {
                let per = o.runs.first().map_or(0, |r| r.ops.max(1));
                let wire = o.median_of(|r| Some(r.wire_bytes as f64 / r.wall.as_secs_f64() / 1e6));
                if o.runs.iter().any(|r| r.bytes > 0) {
                    format!("{secs:.3} s, {:.0} MB/s on the wire", wire.unwrap_or(0.0))
                } else {
                    format!("{secs:.3} s, {:.3} ms each", secs * 1e3 / per as f64)
                }
            });
            let _ = write!(out, " {cell} |");
        }
        let base = wall(reference).map(|(_, secs)| secs);
        for name in others {
            let ratio = wall(name)
                .map(|(_, secs)| secs)
                .zip(base)
                .map_or("—".into(), |(a, b)| format!("**{:.2}×**", a / b));
            let _ = write!(out, " {ratio} |");
        }
        out.push('\n');
    }
    out.push('\n');
}

fn json(args: &Args, outcomes: &[Outcome]) -> serde_json::Value {
    let scenarios: Vec<serde_json::Value> = outcomes
        .iter()
        .map(|o| {
            let runs: Vec<serde_json::Value> = o
                .runs
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "ops": r.ops,
                        "ops_per_s": r.ops_per_s(),
                        "bytes": r.bytes,
                        "wire_bytes": r.wire_bytes,
                        "wall_s": r.wall.as_secs_f64(),
                        "after_last_message_s": r.after_last.map(|d| d.as_secs_f64()),
                        "mb_per_s": r.mb_per_s(),
                        "mib_per_s": r.mib_per_s(),
                        "server_cpu_s": r.server_cpu,
                        "client_cpu_s": r.client_cpu,
                        "already_stored": r.already_stored,
                        "p50_ms": r.latency.map(|l| ms(l.p50)),
                        "p99_ms": r.latency.map(|l| ms(l.p99)),
                        "first_byte_ms": r.first_byte.map(ms),
                    })
                })
                .collect();
            let (min, max) = o.min_max().unzip();
            serde_json::json!({
                "scenario": o.scenario,
                "variant": o.variant,
                "server": o.server,
                "runs": runs,
                "median_mb_per_s": o.median_of(Run::mb_per_s),
                "min_mb_per_s": min,
                "max_mb_per_s": max,
                "median_mib_per_s": o.median_of(Run::mib_per_s),
                "median_ops_per_s": o.median_of(|r| Some(r.ops_per_s())),
                "median_after_last_message_s":
                    o.median_of(|r| r.after_last.map(|d| d.as_secs_f64())),
                "median_p50_ms": o.median_of(|r| r.latency.map(|l| ms(l.p50))),
                "median_p99_ms": o.median_of(|r| r.latency.map(|l| ms(l.p99))),
                "median_first_byte_ms": o.median_of(|r| r.first_byte.map(ms)),
                "server_peak_rss_kib": o.server_peak_kib.map(|(kib, _)| kib),
                "server_peak_rss_reset": o.server_peak_kib.map(|(_, reset)| reset),
                "error": o.error,
            })
        })
        .collect();
    serde_json::json!({
        "url": args.url,
        "instance": args.instance,
        "size_bytes": args.size,
        "message_bytes": args.message,
        "cache": args.cache,
        "nar_bytes": args.nar_size,
        "paths": args.paths,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "substituters": args
            .substituters
            .iter()
            .map(|s| serde_json::json!({ "name": s.name, "url": s.base.as_str() }))
            .collect::<Vec<_>>(),
        "path_set": args.path_set,
        "runs": args.runs,
        "seed": args.seed,
        "scenarios": scenarios,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = parse_args();
    let scenarios = args.scenarios.clone();
    let mut ctx = match Ctx::connect(args).await {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("garret-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut outcomes = Vec::new();
    for scenario in scenarios {
        for outcome in run_scenario(&mut ctx, scenario).await {
            if let Some(error) = &outcome.error {
                eprintln!("garret-bench: {scenario}: {error}");
            }
            outcomes.push(outcome);
        }
    }
    print!("{}", markdown(&ctx.args, &outcomes));
    if let Some(path) = &ctx.args.json {
        let text = serde_json::to_string_pretty(&json(&ctx.args, &outcomes)).expect("JSON");
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("garret-bench: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if outcomes.iter().any(|o| o.error.is_some()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_middle() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let ms = |n: u64| Duration::from_millis(n);
        let sorted: Vec<Duration> = (1..=200).map(ms).collect();
        assert_eq!(percentile(&sorted, 50), Some(ms(100)));
        assert_eq!(percentile(&sorted, 99), Some(ms(198)));
        assert_eq!(percentile(&[ms(7)], 99), Some(ms(7)));
        assert_eq!(percentile(&[], 50), None);
    }

    #[test]
    fn a_nar_of_one_file_decodes() {
        let nar = nar_of_file(b"hello").unwrap();
        let mut verifier = garret_nix::nar::Verifier::new();
        verifier.update(&nar).unwrap();
        assert_eq!(
            verifier.finish().unwrap(),
            (Sha256Hash::of(&nar), nar.len() as u64)
        );
    }

    #[test]
    fn seeds_differ_across_runs_and_scenarios() {
        let mut seeds: Vec<u64> = [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]
            .iter()
            .map(|&(scenario, run)| content_seed(7, scenario, run))
            .collect();
        seeds.sort_unstable();
        seeds.dedup();
        assert_eq!(seeds.len(), 5);
    }

    #[test]
    fn content_is_deterministic_and_incompressible() {
        let a = pseudo_random(MIB, 1);
        assert_eq!(a, pseudo_random(MIB, 1));
        assert_ne!(a, pseudo_random(MIB, 2));
        let packed = zstd::bulk::compress(&a, ZSTD_LEVEL).unwrap();
        assert!(packed.len() >= a.len(), "{} < {}", packed.len(), a.len());
    }
}
