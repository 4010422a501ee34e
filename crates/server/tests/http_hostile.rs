//! Hostile input on the HTTP side (issue 10): each case was reproduced
//! against a running server, and each must now be answered with a clear
//! 4xx in Attic's JSON shape (`{"code","error","message"}`), leaving
//! nothing stored.
//!
//! - Requests that name their cache only in the body are refused from the
//!   headers when the requester could not push anywhere, before any body
//!   is read; cache-config changes are authorized before their body is.
//! - Every body read has an idle and a whole-request timeout (408).
//! - Compressed plain Nix uploads are bounded in decoder memory and in
//!   expansion (413).
//! - An unsatisfiable NAR range says the size (`Content-Range: bytes */N`).
//!
//! The refusals happen in the HTTP layer, before the store is involved, so
//! these run on the embedded deployment only. Timeouts are configured at
//! their shortest (1 s) and only the status is asserted.

use std::collections::BTreeSet;
use std::io::Write as _;

use garret_meta::ChunkStats;
use garret_nix::signing::SigningKey;
use garret_nix::{Sha256Hash, StorePathHash};
use garret_server::auth::Permission;
use garret_server::config::Limits;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

mod common;
use common::{Deployment, TestServer};

const PUSH_PULL: Permission = Permission {
    push: true,
    pull: true,
    ..Permission::NONE
};

/// A server with the private cache `neg`, and what its store held at the
/// start.
struct Hostile {
    server: TestServer,
    http: reqwest::Client,
    /// Push and pull on `neg`.
    pusher: String,
    stats: ChunkStats,
    files: BTreeSet<std::path::PathBuf>,
}

impl Hostile {
    async fn start(limits: Limits) -> Self {
        let server = TestServer::start_with(Deployment::SqliteFs, limits).await;
        server
            .create_cache("neg", false, &SigningKey::generate("neg-1").unwrap())
            .await;
        let pusher = server.token(&[("neg", PUSH_PULL)]);
        let stats = server.state.meta.chunk_stats().await.unwrap();
        let files = server.storage_files();
        Self {
            server,
            http: reqwest::Client::new(),
            pusher,
            stats,
            files,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url)
    }

    /// No chunk row, no stored file and no object in `neg` more than at
    /// the start.
    async fn assert_nothing_stored(&self) {
        let meta = &self.server.state.meta;
        assert_eq!(meta.chunk_stats().await.unwrap(), self.stats);
        assert_eq!(self.server.storage_files(), self.files);
        let cache = meta.cache("neg").await.unwrap();
        let victim = victim_hash().to_string();
        let stored = meta.nix_object(cache.id, &victim).await.unwrap();
        assert!(stored.is_none(), "the victim path was stored");
    }

    /// A request whose head (request line and headers, no blank line) is
    /// sent with only `sent` of its body, which then stalls: the answer
    /// must come without the rest. A server that waits for the body fails
    /// the test (after a generous guard) instead of hanging it.
    async fn stalled(&self, head: &str, sent: &[u8]) -> Reply {
        let addr = self.server.url.strip_prefix("http://").unwrap();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("{head}\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.write_all(sent).await.unwrap();
        let answer = tokio::time::timeout(std::time::Duration::from_mins(1), read_response(stream));
        answer
            .await
            .unwrap_or_else(|_| panic!("no answer to a stalled `{head}`"))
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap();
        Reply {
            status,
            content_range: headers
                .get(reqwest::header::CONTENT_RANGE)
                .map(|v| v.to_str().unwrap().to_owned()),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    content_range: Option<String>,
    body: Value,
}

impl Reply {
    /// Attic's error body with `status` and `kind`, its message naming
    /// `needle`.
    #[track_caller]
    fn assert_error(&self, status: u16, kind: &str, needle: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.body["code"], status, "{self:?}");
        assert_eq!(self.body["error"], kind, "{self:?}");
        let message = self.body["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }
}

/// Reads one HTTP/1.1 response with a `Content-Length` body.
async fn read_response(mut stream: tokio::net::TcpStream) -> Reply {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut part = [0u8; 4096];
        let n = stream.read(&mut part).await.unwrap();
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&part[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let header = |name: &str| {
        head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    };
    let length: usize = header("content-length").map_or(0, |v| v.parse().unwrap());
    while buf.len() < head_end + length {
        let mut part = [0u8; 4096];
        let n = stream.read(&mut part).await.unwrap();
        assert!(n > 0, "connection closed inside the response body");
        buf.extend_from_slice(&part[..n]);
    }
    Reply {
        status,
        content_range: header("content-range"),
        body: serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or(Value::Null),
    }
}

// ---------------------------------------------------------------------------
// Store paths and NARs.

fn victim_hash() -> StorePathHash {
    StorePathHash::from_bytes([7; 20])
}

/// The NAR of a single regular file, written piecewise so a large file of
/// zeros never has to be in memory: NAR strings are a little-endian u64
/// length, the bytes, and zero padding to 8.
fn write_file_nar(out: &mut impl std::io::Write, size: u64) {
    fn string(out: &mut impl std::io::Write, s: &[u8]) {
        out.write_all(&(s.len() as u64).to_le_bytes()).unwrap();
        out.write_all(s).unwrap();
        out.write_all(&[0; 8][..(8 - s.len() % 8) % 8]).unwrap();
    }
    for s in ["nix-archive-1", "(", "type", "regular", "contents"] {
        string(out, s.as_bytes());
    }
    out.write_all(&size.to_le_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(zeros.len() as u64);
        out.write_all(&zeros[..usize::try_from(n).unwrap()])
            .unwrap();
        left -= n;
    }
    out.write_all(&[0; 8][..usize::try_from((8 - size % 8) % 8).unwrap()])
        .unwrap();
    string(out, b")");
}

fn file_nar(size: u64) -> Vec<u8> {
    let mut nar = Vec::new();
    write_file_nar(&mut nar, size);
    nar
}

/// `content` compressed by the `program` binary with `args`, from stdin.
fn compress_with(program: &str, args: &[&str], content: &[u8]) -> Vec<u8> {
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} is needed for this test: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let content = content.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&content));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(output.status.success(), "{program} {args:?} failed");
    output.stdout
}

/// The NarInfo JSON of the victim path with `nar`, as `attic push` sends it.
fn victim_info(nar: &[u8]) -> Value {
    json!({
        "cache": "neg",
        "store_path_hash": victim_hash().to_string(),
        "store_path": format!("/nix/store/{}-victim", victim_hash()),
        "references": [],
        "system": null,
        "deriver": null,
        "sigs": [],
        "ca": null,
        "nar_hash": format!("sha256:{}", Sha256Hash::of(nar).to_hex()),
        "nar_size": nar.len(),
    })
}

// ---------------------------------------------------------------------------
// Item 7: authorization before parsing.

/// Anonymous and pull-only requesters are refused from the headers: a body
/// that is not even JSON gets a 401 (anonymous) or Attic's 403 for "some
/// permission, not enough" (pull-only), not a parse error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_before_their_body_is_parsed() {
    let f = Hostile::start(Limits::default()).await;
    let puller = f.server.token(&[("*", Permission::PULL)]);
    for token in [None, Some(&puller)] {
        let with = |request: reqwest::RequestBuilder| match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let (who, status, kind) = if token.is_some() {
            ("token `e2e`", 403, "AccessError")
        } else {
            ("anonymous", 401, "Unauthorized")
        };
        let reply = f
            .send(with(f.http.post(f.url("/_api/v1/get-missing-paths"))).body("{"))
            .await;
        reply.assert_error(status, kind, who);
        reply.assert_error(status, kind, "push (w) permission on no cache");
        let reply = f
            .send(
                with(f.http.put(f.url("/_api/v1/upload-path")))
                    .header("x-attic-nar-info-preamble-size", "100")
                    .body("not json"),
            )
            .await;
        reply.assert_error(status, kind, who);
    }
    // Cache configuration names the cache in the path: fully authorized
    // before the body is read, with Attic's discovery statuses.
    let anonymous = f
        .send(f.http.patch(f.url("/_api/v1/cache-config/neg")).body("{"))
        .await;
    anonymous.assert_error(401, "Unauthorized", "neg");
    let reply = f
        .send(
            f.http
                .patch(f.url("/_api/v1/cache-config/neg"))
                .bearer_auth(&f.pusher)
                .body("{"),
        )
        .await;
    reply.assert_error(403, "AccessError", "configure-cache (cr)");
    // A retention change also needs `cq`, which only the body reveals.
    let configurer = f.server.token(&[("neg", Permission::CONFIGURE_CACHE)]);
    let reply = f
        .send(
            f.http
                .patch(f.url("/_api/v1/cache-config/neg"))
                .bearer_auth(&configurer)
                .json(&json!({"retention_period": {"Period": 60}})),
        )
        .await;
    reply.assert_error(403, "AccessError", "configure-cache-retention (cq)");
    let cache = f.server.state.meta.cache("neg").await.unwrap();
    assert_eq!(cache.retention_period, None);
    f.assert_nothing_stored().await;
}

/// A stranger who announces a large body and sends none of it is answered
/// at once: nothing is buffered or awaited for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_announcing_large_bodies_are_answered_without_them() {
    let f = Hostile::start(Limits::default()).await;
    let reply = f
        .stalled(
            "PUT /_api/v1/upload-path HTTP/1.1\r\nX-Attic-Nar-Info-Preamble-Size: 1048576\r\n\
             Content-Length: 2097152",
            b"",
        )
        .await;
    reply.assert_error(401, "Unauthorized", "anonymous");
    let reply = f
        .stalled(
            "POST /_api/v1/get-missing-paths HTTP/1.1\r\nContent-Length: 16777216",
            b"{\"cache\":",
        )
        .await;
    reply.assert_error(401, "Unauthorized", "anonymous");
    let reply = f
        .stalled(
            "PATCH /_api/v1/cache-config/neg HTTP/1.1\r\nContent-Length: 16777216",
            b"{",
        )
        .await;
    reply.assert_error(401, "Unauthorized", "neg");
    f.assert_nothing_stored().await;
}

// ---------------------------------------------------------------------------
// Item 8: every body read has both timeouts.

/// The small-body endpoints, each sent by an authorized client that stalls
/// after part of its body.
fn stalled_small_bodies(f: &Hostile) -> Vec<String> {
    let admin = f.server.token(&[("*", Permission::ALL)]);
    let ac = Sha256Hash::of(b"action").to_hex();
    let narinfo = format!("/neg/{}.narinfo", victim_hash());
    [
        ("PUT", narinfo.as_str(), &f.pusher),
        ("PUT", &format!("/neg/ac/{ac}"), &f.pusher),
        ("POST", "/_api/v1/get-missing-paths", &f.pusher),
        ("POST", "/_api/v1/cache-config/fresh", &admin),
        ("PATCH", "/_api/v1/cache-config/neg", &admin),
    ]
    .into_iter()
    .map(|(method, path, token)| {
        format!("{method} {path} HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000")
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_small_bodies_hit_the_idle_timeout() {
    let f = Hostile::start(Limits {
        idle_timeout_secs: 1,
        ..Limits::default()
    })
    .await;
    for head in stalled_small_bodies(&f) {
        let reply = f.stalled(&head, b"{\"").await;
        reply.assert_error(408, "RequestTimeout", "sent nothing for 1 s");
    }
    assert!(f.server.state.meta.cache("fresh").await.is_err());
    f.assert_nothing_stored().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_small_bodies_hit_the_request_timeout() {
    let f = Hostile::start(Limits {
        request_timeout_secs: 1,
        ..Limits::default()
    })
    .await;
    for head in stalled_small_bodies(&f) {
        let reply = f.stalled(&head, b"{\"").await;
        reply.assert_error(408, "RequestTimeout", "took longer than 1 s");
    }
    assert!(f.server.state.meta.cache("fresh").await.is_err());
    f.assert_nothing_stored().await;
}

// ---------------------------------------------------------------------------
// Items 9 and 10: compressed plain Nix uploads.

impl Hostile {
    /// `PUT /neg/nar/<file hash>.nar<suffix>` of `file`, as `nix copy --to`.
    async fn put_nar(&self, suffix: &str, file: Vec<u8>) -> Reply {
        let name = Sha256Hash::of(&file).to_nix32();
        self.send(
            self.http
                .put(self.url(&format!("/neg/nar/{name}.nar{suffix}")))
                .bearer_auth(&self.pusher)
                .body(file),
        )
        .await
    }
}

/// A small xz stream declaring a 1.5 GiB dictionary is refused at its
/// header (RSS is measured outside the tests); `xz -9` still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xz_beyond_the_decoder_memory_limit_is_refused() {
    let f = Hostile::start(Limits::default()).await;
    let nar = file_nar(1 << 20);
    let bomb = compress_with("xz", &["-z", "-c", "--lzma2=dict=1536MiB"], &nar);
    let reply = f.put_nar(".xz", bomb).await;
    reply.assert_error(413, "PayloadTooLarge", "limits.max_decompression_memory");
    let window = compress_with("zstd", &["-c", "--long=30"], &nar);
    let reply = f.put_nar(".zst", window).await;
    reply.assert_error(413, "PayloadTooLarge", "limits.max_decompression_memory");
    f.assert_nothing_stored().await;
    let xz9 = compress_with("xz", &["-z", "-c", "-9"], &nar);
    assert_eq!(f.put_nar(".xz", xz9).await.status, 204);
}

/// A NAR of zeros expands far beyond the configured ratio: refused once
/// the output passes the floor, long before its full size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decompression_beyond_the_ratio_is_refused() {
    let f = Hostile::start(Limits {
        max_decompression_ratio: 10,
        decompression_ratio_floor: 1 << 20,
        ..Limits::default()
    })
    .await;
    let mut encoder = zstd::Encoder::new(Vec::new(), 3).unwrap();
    write_file_nar(&mut encoder, 256 << 20);
    let bomb = encoder.finish().unwrap();
    assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
    let reply = f.put_nar(".zst", bomb).await;
    reply.assert_error(413, "PayloadTooLarge", "limits.max_decompression_ratio");
    f.assert_nothing_stored().await;
    // Within the floor, compressibility does not matter.
    let small = zstd::encode_all(&file_nar(512 << 10)[..], 3).unwrap();
    assert_eq!(f.put_nar(".zst", small).await.status, 204);
}

// ---------------------------------------------------------------------------
// Item 15: 416 says the size.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsatisfiable_nar_ranges_carry_the_size() {
    let f = Hostile::start(Limits::default()).await;
    let nar = file_nar(100_000);
    let reply = f
        .send(
            f.http
                .put(f.url("/_api/v1/upload-path"))
                .bearer_auth(&f.pusher)
                .header("x-attic-nar-info", victim_info(&nar).to_string())
                .body(nar),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let path = format!("/neg/nar/{}.nar", victim_hash());
    let whole = f
        .http
        .get(f.url(&path))
        .bearer_auth(&f.pusher)
        .send()
        .await
        .unwrap();
    let size = whole.bytes().await.unwrap().len();
    for range in [format!("bytes={size}-"), format!("bytes={}-", size + 10)] {
        let reply = f
            .send(
                f.http
                    .get(f.url(&path))
                    .bearer_auth(&f.pusher)
                    .header(reqwest::header::RANGE, range),
            )
            .await;
        reply.assert_error(416, "RangeNotSatisfiable", "not satisfiable");
        assert_eq!(reply.content_range, Some(format!("bytes */{size}")));
    }
    let reply = f
        .send(
            f.http
                .get(f.url(&path))
                .bearer_auth(&f.pusher)
                .header(reqwest::header::RANGE, "bytes=0-9"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT.as_u16());
    assert_eq!(reply.content_range, Some(format!("bytes 0-9/{size}")));
}
