//! Bazel's remote cache served to the real Bazel 4.2.3 client (Debian
//! `bazel-bootstrap`): a genrule workspace is built against garret, its
//! output base expunged and rebuilt, and every action must then be a remote
//! cache hit with byte-identical outputs, also with
//! `--remote_download_minimal`. The HTTP edges Bazel relies on are checked
//! with curl. Runs on SQLite + disk and on Postgres + S3.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use garret_nix::Sha256Hash;
use garret_nix::signing::SigningKey;
use garret_server::auth::{CacheNamePattern, Permission, TokenAuthority, TokenSpec};
use garret_server::bazel_core;

mod common;

use common::{Deployment, TestServer};

/// The private cache Bazel builds against; also the default for paths
/// without an instance prefix.
const CACHE: &str = "bazel";

/// Actions in `fixtures/bazel/workspace/BUILD.bazel`: one per genrule.
const GENRULES: usize = 6;

/// Every file those genrules write, relative to `bazel-bin`.
const OUTPUTS: [&str; 7] = [
    "small.txt",
    "big.bin",
    "random.bin",
    "empty.txt",
    "multi_a.txt",
    "multi_b.txt",
    "combined.txt",
];

struct Server {
    /// `http://127.0.0.1:<port>`; HTTP/1, HTTP/2 and h2c gRPC on one port.
    url: String,
    tokens: TokenAuthority,
    _running: TestServer,
}

impl Server {
    async fn start(deployment: Deployment) -> Self {
        let server = TestServer::start_configured(deployment, |config| {
            config.bazel_default_cache = CACHE.into();
        })
        .await;
        for name in [CACHE, "other"] {
            server
                .create_cache(name, false, &SigningKey::generate("k-1").unwrap())
                .await;
        }
        Self {
            url: server.url.clone(),
            tokens: server.tokens.clone(),
            _running: server,
        }
    }

    /// A JWT holding `permission` on [`CACHE`] only.
    fn token(&self, permission: Permission) -> String {
        let mut spec = TokenSpec::new("bazel-ci", Duration::from_hours(1));
        spec.grant(CacheNamePattern::new(CACHE).unwrap(), permission);
        self.tokens.mint(&spec).unwrap()
    }

    fn push_token(&self) -> String {
        self.token(Permission::PULL.union(Permission::PUSH))
    }
}

/// How Bazel reaches the cache; one variant per protocol and addressing.
#[derive(Clone, Copy, Debug)]
enum Remote {
    /// `http://host/bazel`, token in `--remote_header`.
    HttpInstance,
    /// `http://ci:<jwt>@host`: the default cache, token as HTTP Basic.
    HttpDefaultBasic,
    /// `grpc://host` (h2c on the HTTP port), `--remote_instance_name=bazel`.
    Grpc,
}

impl Remote {
    fn flags(self, server: &Server) -> Vec<String> {
        let jwt = server.push_token();
        let bearer = format!("--remote_header=Authorization=Bearer {jwt}");
        match self {
            Self::HttpInstance => vec![format!("--remote_cache={}/{CACHE}", server.url), bearer],
            Self::HttpDefaultBasic => {
                let authority = server.url.strip_prefix("http://").unwrap();
                vec![format!("--remote_cache=http://ci:{jwt}@{authority}")]
            }
            Self::Grpc => {
                let authority = server.url.strip_prefix("http://").unwrap();
                vec![
                    format!("--remote_cache=grpc://{authority}"),
                    format!("--remote_instance_name={CACHE}"),
                    bearer,
                ]
            }
        }
    }
}

/// A copy of the fixture workspace with its own output root and `HOME`.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bazel/workspace");
        std::fs::create_dir(dir.path().join("ws")).unwrap();
        for file in ["WORKSPACE", "BUILD.bazel", ".bazelrc"] {
            std::fs::copy(fixture.join(file), dir.path().join("ws").join(file)).unwrap();
        }
        Self { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("ws")
    }

    /// Runs one `bazel --batch` command: no server JVM outlives it.
    fn bazel(&self, args: &[String]) -> Output {
        let out = Command::new("bazel")
            .arg("--batch")
            .arg("--nohome_rc")
            .arg(format!(
                "--output_user_root={}",
                self.dir.path().join("out").display()
            ))
            .args(args)
            .current_dir(self.root())
            .env("HOME", self.dir.path())
            .env_remove("TEST_TMPDIR")
            .output()
            .unwrap_or_else(|e| {
                panic!("bazel is required (./tests/run installs bazel-bootstrap): {e}")
            });
        assert!(
            out.status.success(),
            "bazel {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn build(&self, remote: &[String], extra: &[&str]) -> Processes {
        let mut args = vec!["build".to_owned(), "//...".to_owned()];
        args.extend(remote.iter().cloned());
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let out = self.bazel(&args);
        let processes = Processes::parse(&String::from_utf8_lossy(&out.stderr));
        eprintln!("bazel build {extra:?}: {}", processes.line);
        processes
    }

    fn expunge(&self) {
        self.bazel(&["clean".to_owned(), "--expunge".to_owned()]);
    }

    fn outputs(&self) -> BTreeMap<&'static str, Vec<u8>> {
        OUTPUTS
            .iter()
            .map(|name| {
                let path = self.root().join("bazel-bin").join(name);
                let bytes = std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("{} not built: {e}", path.display()));
                (*name, bytes)
            })
            .collect()
    }
}

/// Bazel's closing `INFO: N processes: 6 remote cache hit, 1 internal.`
#[derive(Debug)]
struct Processes {
    line: String,
    by_kind: BTreeMap<String, usize>,
}

impl Processes {
    fn parse(stderr: &str) -> Self {
        let line = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("INFO: ") && l.contains(" processes: "))
            .unwrap_or_else(|| panic!("no process summary in:\n{stderr}"))
            .to_owned();
        let (_, kinds) = line.split_once(" processes: ").unwrap();
        let by_kind = kinds
            .trim_end_matches('.')
            .split(", ")
            .map(|part| {
                let (n, kind) = part.split_once(' ').unwrap();
                (kind.to_owned(), n.parse().unwrap())
            })
            .collect();
        Self { line, by_kind }
    }

    fn count(&self, kind: &str) -> usize {
        self.by_kind.get(kind).copied().unwrap_or(0)
    }

    /// Every genrule came from the cache and nothing ran (internal actions,
    /// like symlink trees, are not spawns Bazel could cache).
    fn assert_all_hits(&self) {
        assert_eq!(self.count("remote cache hit"), GENRULES, "{}", self.line);
        let ran: Vec<_> = self
            .by_kind
            .keys()
            .filter(|k| !matches!(k.as_str(), "remote cache hit" | "internal"))
            .collect();
        assert!(ran.is_empty(), "actions ran: {}", self.line);
    }
}

/// Runs `f` (a blocking Bazel session) off the runtime the server runs on.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Build, expunge, rebuild (all hits, same bytes), expunge, rebuild with
/// `--remote_download_minimal` (all hits, nothing downloaded, and the bytes a
/// later download would fetch served by the cache).
async fn round_trip(deployment: Deployment, remote: Remote) {
    let server = Server::start(deployment).await;
    let flags = remote.flags(&server);
    let auth = bearer(&server.token(Permission::PULL));
    let url = server.url.clone();
    blocking(move || {
        let cache = Client { url: &url, auth };
        let ws = Workspace::new();
        let cold = ws.build(&flags, &[]);
        assert_eq!(cold.count("remote cache hit"), 0, "{}", cold.line);
        let first = ws.outputs();
        assert!(first["empty.txt"].is_empty());
        assert_eq!(first["big.bin"].len(), 1 << 20);
        assert_eq!(first["random.bin"].len(), 100_000);

        ws.expunge();
        ws.build(&flags, &[]).assert_all_hits();
        assert!(
            ws.outputs() == first,
            "outputs differ after a cached rebuild"
        );

        ws.expunge();
        ws.build(&flags, &["--remote_download_minimal"])
            .assert_all_hits();
        assert!(
            !ws.root().join("bazel-bin/big.bin").exists(),
            "--remote_download_minimal downloaded outputs"
        );
        for (name, bytes) in &first {
            let hash = Sha256Hash::of(bytes).to_hex();
            let (status, body) = cache.get(&format!("/{CACHE}/cas/{hash}"));
            assert_eq!(status, 200, "{name}");
            assert!(body == *bytes, "{name} is served with other bytes");
        }
        // `--batch` leaves no Bazel server behind; the tempdir goes with `ws`.
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_instance_sqlite_fs() {
    round_trip(Deployment::SqliteFs, Remote::HttpInstance).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_default_cache_basic_auth_postgres_s3() {
    round_trip(Deployment::PostgresS3, Remote::HttpDefaultBasic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_sqlite_fs() {
    round_trip(Deployment::SqliteFs, Remote::Grpc).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_postgres_s3() {
    round_trip(Deployment::PostgresS3, Remote::Grpc).await;
}

fn bearer(jwt: &str) -> String {
    format!("Authorization: Bearer {jwt}")
}

/// `curl -s` with `args`; returns the status and the body.
fn curl(args: &[&str]) -> (u16, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-s", "-w", "%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = out.stdout;
    let (body, code) = text.split_at(text.len() - 3);
    (
        std::str::from_utf8(code).unwrap().parse().unwrap(),
        body.to_vec(),
    )
}

/// curl against one server as one requester (`auth` is a header, or empty
/// for anonymous).
struct Client<'a> {
    url: &'a str,
    auth: String,
}

impl Client<'_> {
    fn run(&self, args: &[&str], path: &str) -> (u16, Vec<u8>) {
        let url = format!("{}{path}", self.url);
        let mut all: Vec<&str> = Vec::new();
        if !self.auth.is_empty() {
            all.extend(["-H", &self.auth]);
        }
        all.extend(args);
        all.push(&url);
        curl(&all)
    }

    fn get(&self, path: &str) -> (u16, Vec<u8>) {
        self.run(&[], path)
    }

    /// The status and the response headers, lowercased.
    fn head(&self, path: &str) -> (u16, String) {
        let (status, head) = self.run(&["-I"], path);
        (status, String::from_utf8(head).unwrap().to_lowercase())
    }

    /// PUTs `data` in curl's `--data-binary` syntax (`@file` for a file).
    fn put(&self, path: &str, data: &str) -> (u16, Vec<u8>) {
        self.run(&["-X", "PUT", "--data-binary", data], path)
    }
}

/// The edges Bazel (and operators with curl) rely on, without Bazel.
#[tokio::test(flavor = "multi_thread")]
async fn http_cache_edges() {
    for deployment in [Deployment::SqliteFs, Deployment::PostgresS3] {
        let server = Server::start(deployment).await;
        let push = bearer(&server.push_token());
        let pull = bearer(&server.token(Permission::PULL));
        let url = server.url.clone();
        blocking(move || {
            let push = Client {
                url: &url,
                auth: push,
            };
            let pull = Client {
                url: &url,
                auth: pull,
            };
            let anonymous = Client {
                url: &url,
                auth: String::new(),
            };
            let tmp = tempfile::tempdir().unwrap();
            let hash = cas_edges(&push, &pull, tmp.path());
            ac_edges(&push, &pull, tmp.path());
            access_edges(&pull, &anonymous, &hash);
        })
        .await;
    }
}

/// Returns the hash of a blob it stored.
fn cas_edges(push: &Client, pull: &Client, tmp: &Path) -> String {
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let file = tmp.join("data");
    std::fs::write(&file, &data).unwrap();
    let upload = format!("@{}", file.display());
    let hash = Sha256Hash::of(&data).to_hex();
    let empty = Sha256Hash::of(b"").to_hex();
    let other = Sha256Hash::of(b"other").to_hex();

    // The empty blob exists before anything is stored, at the root too.
    for path in [format!("/cas/{empty}"), format!("/{CACHE}/cas/{empty}")] {
        assert_eq!(pull.get(&path), (200, vec![]));
    }
    assert_eq!(push.put(&format!("/cas/{empty}"), "").0, 200);
    assert_eq!(push.put(&format!("/cas/{empty}"), "x").0, 400);

    // A body that does not hash to its name is refused, and not stored.
    let (status, body) = push.put(&format!("/{CACHE}/cas/{other}"), &upload);
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["code"], 400);
    assert_eq!(error["error"], "BadRequest");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("mismatch"), "{error}");
    assert_eq!(pull.get(&format!("/cas/{other}")).0, 404);

    // Misses are 404s, which Bazel reads as "not cached".
    assert_eq!(pull.get(&format!("/cas/{hash}")).0, 404);
    assert_eq!(pull.head(&format!("/cas/{hash}")).0, 404);

    // Stored through the prefix, read at the root (the default cache).
    assert_eq!(push.put(&format!("/{CACHE}/cas/{hash}"), &upload).0, 200);
    let (status, body) = pull.get(&format!("/cas/{hash}"));
    assert_eq!(status, 200);
    assert!(body == data, "served CAS bytes differ");
    let (status, head) = pull.head(&format!("/{CACHE}/cas/{hash}"));
    assert_eq!(status, 200);
    let length = format!("content-length: {}", data.len());
    assert!(head.contains(&length), "{head}");
    // Re-uploading the same content is fine.
    assert_eq!(push.put(&format!("/cas/{hash}"), &upload).0, 200);

    // Malformed digests are the client's fault.
    assert_eq!(pull.get("/cas/not-a-hash").0, 400);
    hash
}

/// An `ActionResult` whose stdout is the blob `stdout` (hash, size).
fn action_result(exit_code: i32, stdout: Option<(&str, i64)>) -> Vec<u8> {
    use garret_proto::reapi::{ActionResult, Digest};
    use prost::Message as _;
    ActionResult {
        exit_code,
        stdout_digest: stdout.map(|(hash, size_bytes)| Digest {
            hash: hash.into(),
            size_bytes,
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn ac_edges(push: &Client, pull: &Client, tmp: &Path) {
    let action = Sha256Hash::of(b"action").to_hex();
    assert_eq!(pull.get(&format!("/ac/{action}")).0, 404);
    assert_eq!(pull.head(&format!("/ac/{action}")).0, 404);
    // A later PUT replaces a result; results are served as they were sent.
    for exit_code in [1, 2] {
        let result = action_result(exit_code, None);
        let file = tmp.join(format!("result-{exit_code}"));
        std::fs::write(&file, &result).unwrap();
        let upload = format!("@{}", file.display());
        assert_eq!(push.put(&format!("/ac/{action}"), &upload).0, 200);
        assert_eq!(pull.get(&format!("/{CACHE}/ac/{action}")), (200, result));
    }
    let (status, head) = pull.head(&format!("/ac/{action}"));
    assert_eq!(status, 200);
    let len = action_result(2, None).len();
    assert!(head.contains(&format!("content-length: {len}")), "{head}");
    // Not an ActionResult: refused.
    assert_eq!(push.put(&format!("/ac/{action}"), "not a result").0, 400);
    // A result naming a blob that is not stored is a miss until it is.
    let stdout = "hello from the action\n";
    let stdout_hash = Sha256Hash::of(stdout.as_bytes()).to_hex();
    let incomplete = tmp.join("incomplete");
    let stdout_len = i64::try_from(stdout.len()).unwrap();
    std::fs::write(
        &incomplete,
        action_result(0, Some((&stdout_hash, stdout_len))),
    )
    .unwrap();
    let later = Sha256Hash::of(b"later action").to_hex();
    let upload = format!("@{}", incomplete.display());
    assert_eq!(push.put(&format!("/ac/{later}"), &upload).0, 200);
    assert_eq!(
        pull.get(&format!("/ac/{later}")).0,
        404,
        "its stdout is missing"
    );
    assert_eq!(push.put(&format!("/cas/{stdout_hash}"), stdout).0, 200);
    assert_eq!(pull.get(&format!("/ac/{later}")).0, 200, "now complete");

    let big = tmp.join("big-result");
    std::fs::write(&big, vec![0u8; bazel_core::MAX_ACTION_RESULT + 1]).unwrap();
    let other = Sha256Hash::of(b"other action").to_hex();
    let upload = format!("@{}", big.display());
    assert_eq!(push.put(&format!("/ac/{other}"), &upload).0, 413);
    assert_eq!(pull.get(&format!("/ac/{other}")).0, 404);
}

fn access_edges(pull: &Client, anonymous: &Client, hash: &str) {
    // Entries are per cache: a token for `bazel` sees nothing in `other`.
    assert_eq!(pull.get(&format!("/other/cas/{hash}")).0, 401);
    // Anonymous requests to a private cache, and pushes with a pull token.
    assert_eq!(anonymous.get(&format!("/cas/{hash}")).0, 401);
    assert_eq!(anonymous.put(&format!("/ac/{hash}"), "x").0, 401);
    assert_eq!(pull.put(&format!("/ac/{hash}"), "x").0, 403);
    assert_eq!(pull.put(&format!("/{CACHE}/cas/{hash}"), "x").0, 403);

    // The substituter keeps its routes next to ours.
    let (status, body) = pull.get(&format!("/{CACHE}/nix-cache-info"));
    assert_eq!(status, 200);
    assert!(String::from_utf8(body).unwrap().starts_with("StoreDir: "));
}
