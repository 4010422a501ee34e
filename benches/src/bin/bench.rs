//! `garret-bench`: a load generator that speaks only the wire protocols, so
//! it can be pointed at any REAPI server (garret, bazel-remote, NativeLink…).
//!
//! `benches/scripts/bench.sh` starts a fresh release `garret serve` and runs
//! this against it:
//!
//! ```text
//! garret-bench --url http://127.0.0.1:PORT [--token JWT] [--instance NAME] [--pid PID]
//!     [--size-mib 128] [--message-kib 1024] [--runs 3] [--seed N] [--json FILE]
//!     [SCENARIO... | all]
//! ```
//!
//! Each scenario runs `--runs` times and yields one [`Outcome`]: its runs
//! (bytes, wall time, CPU) and, with `--pid`, the server's peak RSS over the
//! scenario (`VmHWM`, reset before it through `/proc/PID/clear_refs`). The
//! report is a Markdown table on stdout (and JSON with `--json`); progress
//! goes to stderr only when stderr is a terminal. Throughput is always of
//! the blob's uncompressed bytes: MB/s is 10^6 bytes/s, MiB/s 2^20 bytes/s.
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
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt as _, stream};
use garret_benches::{Probe, pseudo_random, run_seed};
use garret_nix::Sha256Hash;
use garret_proto::bytestream::byte_stream_client::ByteStreamClient;
use garret_proto::bytestream::{ReadRequest, WriteRequest};
use garret_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use garret_proto::reapi::{
    BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest, FindMissingBlobsRequest,
    batch_update_blobs_request,
};
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
];

/// Small blobs per batch scenario, their size, and how many go in one
/// request: 900 × 4 KiB stays under the 4 MiB gRPC message limit.
const SMALL_BLOBS: usize = 10_000;
const SMALL_BLOB_BYTES: usize = 4096;
const SMALL_PER_BATCH: usize = 900;

// ---------------------------------------------------------------------------
// Arguments.

#[derive(Debug)]
struct Args {
    url: String,
    token: Option<String>,
    instance: String,
    pid: Option<u32>,
    size: usize,
    message: usize,
    runs: usize,
    seed: u64,
    json: Option<PathBuf>,
    scenarios: Vec<&'static str>,
}

fn usage() -> ! {
    eprintln!(
        "usage: garret-bench --url http://HOST:PORT [--token JWT] [--instance NAME] [--pid PID]\n\
         \x20      [--size-mib 128] [--message-kib 1024] [--runs 3] [--seed N] [--json FILE]\n\
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
            "all" => args.scenarios.extend(SCENARIOS.iter().map(|(n, _)| *n)),
            name => match SCENARIOS.iter().find(|(n, _)| *n == name) {
                Some((n, _)) => args.scenarios.push(n),
                None => usage(),
            },
        }
    }
    if args.url.is_empty() || args.message == 0 || args.runs == 0 {
        usage();
    }
    if args.scenarios.is_empty() {
        args.scenarios = SCENARIOS.iter().map(|(n, _)| *n).collect();
    }
    args
}

// ---------------------------------------------------------------------------
// Content.

/// The seed for run `run` of scenario number `scenario`: distinct for every
/// pair, so no two writes carry the same content.
fn content_seed(base: u64, scenario: u64, run: usize) -> u64 {
    let n = scenario.wrapping_mul(1 << 32).wrapping_add(run as u64);
    base.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// A UUID-shaped upload id derived from `seed`.
fn uuid(seed: u64) -> String {
    let hex = Sha256Hash::of(&seed.to_be_bytes()).to_hex();
    format!(
        "{}-{}-4{}-8{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
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

/// One timed RPC.
#[derive(Debug, Clone)]
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
    /// -1): nothing was ingested, so the figure is not an upload's.
    already_stored: bool,
}

impl Run {
    fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.wall.as_secs_f64()
    }

    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.wall.as_secs_f64() / 1e6
    }

    fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / self.wall.as_secs_f64() / MIB as f64
    }
}

/// What a scenario yields: its runs, the server's peak RSS over all of
/// them, or what stopped it.
#[derive(Debug)]
struct Outcome {
    scenario: &'static str,
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
    fn rates(&self) -> Vec<f64> {
        self.runs.iter().map(Run::mb_per_s).collect()
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
    channel: Channel,
    server: Option<Probe>,
    progress: bool,
    /// The last blob `bytestream-write` stored, for `bytestream-read`.
    written: Option<Blob>,
    /// The small blobs `batch-update-4k` stored, for the read and
    /// find-missing scenarios.
    small: Option<Vec<Blob>>,
}

impl Ctx {
    async fn connect(args: Args) -> Result<Self, String> {
        let channel = Channel::from_shared(args.url.clone())
            .map_err(|e| format!("--url {}: {e}", args.url))?
            .connect()
            .await
            .map_err(|e| format!("connecting to {}: {e}", args.url))?;
        Ok(Self {
            server: args.pid.map(Probe),
            progress: std::io::stderr().is_terminal(),
            args,
            channel,
            written: None,
            small: None,
        })
    }

    fn seed(&self, scenario: u64, run: usize) -> u64 {
        content_seed(self.args.seed, scenario, run)
    }

    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
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
    ) -> Result<(T, Duration, Option<f64>, Option<f64>), String> {
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
            after_last: None,
            client_cpu,
            server_cpu,
            already_stored: false,
        })
    }

    fn progress(&self, scenario: &str, run: usize, result: &Run) {
        if self.progress {
            eprintln!(
                "{scenario} run {}/{}: {:.2} s, {:.1} MB/s{}",
                run + 1,
                self.args.runs,
                result.wall.as_secs_f64(),
                result.mb_per_s(),
                if result.already_stored {
                    " (already stored)"
                } else {
                    ""
                }
            );
        }
    }
}

/// A gRPC status in a line.
fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
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
        after_last: None,
        client_cpu,
        server_cpu,
        already_stored: false,
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
            after_last: None,
            client_cpu,
            server_cpu,
            already_stored: false,
        };
        ctx.progress("find-missing-10k", run, &result);
        runs.push(result);
    }
    Ok(runs)
}

async fn run_scenario(ctx: &mut Ctx, scenario: &'static str) -> Outcome {
    let reset = ctx.server.is_some_and(Probe::reset_peak);
    let runs = match scenario {
        "bytestream-write" => bytestream_write(ctx).await,
        "bytestream-write-zstd" => bytestream_write_zstd(ctx).await,
        "bytestream-read" => bytestream_read(ctx).await,
        "batch-update-4k" => batch_update_4k(ctx).await,
        "batch-read-4k" => batch_read_4k(ctx).await,
        "find-missing-10k" => find_missing_10k(ctx).await,
        other => Err(format!("no scenario {other}")),
    };
    let server_peak_kib = ctx.server.and_then(Probe::peak_kib).map(|kib| (kib, reset));
    let (runs, error) = match runs {
        Ok(runs) => (runs, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    Outcome {
        scenario,
        runs,
        server_peak_kib,
        error,
    }
}

// ---------------------------------------------------------------------------
// The report.

fn markdown(args: &Args, outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} MiB per blob in {} KiB messages, {} run(s) per scenario, seed {}\n",
        args.size / MIB,
        args.message / 1024,
        args.runs,
        args.seed
    );
    out.push_str(
        "| scenario | runs | median MB/s | min MB/s | max MB/s | median MiB/s | median ops/s \
         | median wall | median after last message | server peak RSS | server CPU / run \
         | client CPU / run |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let fixed = |v: Option<f64>, unit: &str| v.map_or("—".into(), |v| format!("{v:.1}{unit}"));
    let fixed2 = |v: Option<f64>, unit: &str| v.map_or("—".into(), |v| format!("{v:.2}{unit}"));
    for o in outcomes {
        if let Some(error) = &o.error {
            let _ = writeln!(
                out,
                "| {} | failed: {} | | | | | | | | | | |",
                o.scenario,
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
            "| {} | {} | **{}** | {} | {} | {} | {} | {} | {} | {peak} | {} | {} |",
            o.scenario,
            o.runs.len(),
            fixed(o.median_of(|r| Some(r.mb_per_s())), ""),
            fixed(min, ""),
            fixed(max, ""),
            fixed(o.median_of(|r| Some(r.mib_per_s())), ""),
            fixed(o.median_of(|r| Some(r.ops_per_s())), ""),
            fixed(o.median_of(|r| Some(r.wall.as_secs_f64())), " s"),
            fixed2(o.median_of(|r| r.after_last.map(|d| d.as_secs_f64())), " s"),
            fixed(o.median_of(|r| r.server_cpu), " s"),
            fixed(o.median_of(|r| r.client_cpu), " s"),
        );
    }
    out.push('\n');
    for o in outcomes.iter().filter(|o| !o.runs.is_empty()) {
        let runs: Vec<String> = o
            .runs
            .iter()
            .map(|r| {
                format!(
                    "{:.3} s = {:.1} MB/s, {:.0} ops/s{}{}{}",
                    r.wall.as_secs_f64(),
                    r.mb_per_s(),
                    r.ops_per_s(),
                    r.after_last.map_or(String::new(), |d| format!(
                        " ({:.2} s after the last message)",
                        d.as_secs_f64()
                    )),
                    if r.wire_bytes == r.bytes {
                        String::new()
                    } else {
                        format!(" ({} bytes on the wire)", r.wire_bytes)
                    },
                    if r.already_stored {
                        ", already stored"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        let _ = writeln!(out, "- {}: {}", o.scenario, runs.join("; "));
    }
    out
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
                    })
                })
                .collect();
            let (min, max) = o.min_max().unzip();
            serde_json::json!({
                "scenario": o.scenario,
                "runs": runs,
                "median_mb_per_s": o.median_of(|r| Some(r.mb_per_s())),
                "min_mb_per_s": min,
                "max_mb_per_s": max,
                "median_mib_per_s": o.median_of(|r| Some(r.mib_per_s())),
                "median_ops_per_s": o.median_of(|r| Some(r.ops_per_s())),
                "median_after_last_message_s":
                    o.median_of(|r| r.after_last.map(|d| d.as_secs_f64())),
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
        let outcome = run_scenario(&mut ctx, scenario).await;
        if let Some(error) = &outcome.error {
            eprintln!("garret-bench: {scenario}: {error}");
        }
        outcomes.push(outcome);
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
