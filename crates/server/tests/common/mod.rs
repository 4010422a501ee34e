//! Set-up shared by the server's integration tests: the two deployments
//! that matter (SQLite + local disk, Postgres + S3) and a running server.

#![allow(dead_code)] // Each test binary uses its own part of this module.

pub mod grpc;

use std::path::Path;
use std::sync::Arc;

use garret_meta::testing::PgCluster;
use garret_meta::{Meta, NewCache};
use garret_nix::signing::SigningKey;
use garret_server::auth::TokenAuthority;
use garret_server::blobs::Blobs;
use garret_server::config::{Config, Limits, S3Storage, Storage};
use garret_server::state::AppState;
use garret_store::testing::S3TestServer;
use garret_store::{Backend, ChunkStore, FsBackend, S3Backend, StoreConfig};

/// The embedded deployment in `dir`: SQLite plus chunks on local disk.
pub async fn sqlite_fs_blobs(dir: &Path) -> Blobs {
    let meta = Meta::connect(&format!("sqlite:{}", dir.join("garret.db").display()))
        .await
        .unwrap();
    meta.migrate().await.unwrap();
    let backend = Backend::Fs(FsBackend::new(dir.join("chunks")).unwrap());
    Blobs::new(measured(backend), meta)
}

/// The production deployment: a fresh database on the shared throwaway
/// Postgres 15 cluster and an s3s-fs server (SigV4 over loopback) in `dir`.
/// The S3 server lives as long as the returned handle.
pub async fn postgres_s3_blobs(dir: &Path) -> (Blobs, S3TestServer) {
    let meta = Meta::connect(&PgCluster::shared().fresh_database().await)
        .await
        .unwrap();
    meta.migrate().await.unwrap();
    let s3 = S3TestServer::start(&dir.join("s3"), "garret")
        .await
        .unwrap();
    let backend = Backend::S3(S3Backend::new(&s3.config).unwrap());
    (Blobs::new(measured(backend), meta), s3)
}

/// A store on `backend` as the server wraps it, recording into metrics
/// of its own.
fn measured(backend: Backend) -> garret_server::blobs::Store {
    let metrics = garret_server::metrics::Metrics::new();
    ChunkStore::new(
        garret_server::metrics::storage::Measured::new(backend, metrics),
        StoreConfig::default(),
    )
}

/// The chunk store and metadata of one deployment, without a server, for
/// tests of `Blobs` and of GC; the temporary directory and the S3 server
/// live as long as it does.
pub struct BlobStore {
    pub blobs: Blobs,
    _s3: Option<S3TestServer>,
    _dir: tempfile::TempDir,
}

impl BlobStore {
    pub async fn on(deployment: Deployment) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (blobs, s3) = match deployment {
            Deployment::SqliteFs => (sqlite_fs_blobs(dir.path()).await, None),
            Deployment::PostgresS3 => {
                let (blobs, s3) = postgres_s3_blobs(dir.path()).await;
                (blobs, Some(s3))
            }
        };
        Self {
            blobs,
            _s3: s3,
            _dir: dir,
        }
    }
}

/// Serves `app` on `listener` in the background until the test ends, the
/// way `garret serve` does: default connection bounds, and `limits`' idle
/// time for stalled connections.
pub fn spawn_serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    metrics: garret_server::metrics::Metrics,
    limits: &Limits,
) {
    let connections = garret_server::config::Connections::default();
    let serve_limits = garret_server::serve::ServeLimits::new(&connections, limits.idle_timeout());
    tokio::spawn(garret_server::serve::serve(
        listener,
        app,
        metrics,
        serve_limits,
        std::future::pending(),
    ));
}

/// One test per deployment, `sqlite_fs::NAME` and `postgres_s3::NAME`, on
/// a multi-threaded runtime, each running the file's `async fn
/// NAME(Deployment)`.
#[allow(unused_macros)] // Each test binary uses its own part of this module.
macro_rules! on_both {
    ($($name:ident,)*) => {
        mod sqlite_fs { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name($crate::common::Deployment::SqliteFs).await } )* }
        mod postgres_s3 { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name($crate::common::Deployment::PostgresS3).await } )* }
    };
}
#[allow(unused_imports)] // Each test binary uses its own part of this module.
pub(crate) use on_both;

/// Which deployment a server runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deployment {
    SqliteFs,
    PostgresS3,
}

/// A running `garret` HTTP server on 127.0.0.1 with an HS256 token authority.
pub struct TestServer {
    /// `http://127.0.0.1:<port>`, no trailing slash.
    pub url: String,
    pub state: Arc<AppState>,
    pub tokens: TokenAuthority,
    pub dir: tempfile::TempDir,
    /// The S3 server of a Postgres + S3 deployment, for outage tests.
    pub s3: Option<S3TestServer>,
}

/// A fixed 64-byte secret, base64: tests mint tokens with `TestServer::tokens`.
pub const TEST_SECRET_BASE64: &str =
    "Z2FycmV0LXRlc3Qtc2VjcmV0LWdhcnJldC10ZXN0LXNlY3JldC1nYXJyZXQtdGVzdC1zZWNyZXQtISEhIQ==";

impl TestServer {
    pub async fn start(deployment: Deployment) -> Self {
        Self::start_with(deployment, Limits::default()).await
    }

    pub async fn start_with(deployment: Deployment, limits: Limits) -> Self {
        Self::start_configured(deployment, |config| config.limits = limits).await
    }

    /// A server on `deployment` whose configuration `adjust` may change,
    /// built by `state::build` as `garret serve` builds it.
    pub async fn start_configured(
        deployment: Deployment,
        adjust: impl FnOnce(&mut Config),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let s3 = match deployment {
            Deployment::SqliteFs => None,
            Deployment::PostgresS3 => {
                config.database_url = Some(PgCluster::shared().fresh_database().await);
                let s3 = S3TestServer::start(&dir.path().join("s3"), "garret")
                    .await
                    .unwrap();
                config.storage = Storage::S3(S3Storage {
                    endpoint: s3.config.endpoint.clone(),
                    region: s3.config.region.clone(),
                    bucket: s3.config.bucket.clone(),
                    prefix: s3.config.prefix.clone(),
                    path_style: s3.config.path_style,
                    access_key_id: s3.config.access_key_id.clone(),
                    secret_access_key: s3.config.secret_access_key.clone(),
                });
                Some(s3)
            }
        };
        config.jwt.hs256_secret_base64 = Some(TEST_SECRET_BASE64.into());
        adjust(&mut config);
        let tokens = TokenAuthority::hs256_base64(TEST_SECRET_BASE64).unwrap();
        let state = garret_server::state::build(&config).await.unwrap().state;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = garret_server::app(Arc::clone(&state));
        spawn_serve(listener, app, state.metrics.clone(), &config.limits);
        Self {
            url,
            state,
            tokens,
            dir,
            s3,
        }
    }

    /// Creates a cache directly in the metadata, signed by `key`.
    pub async fn create_cache(&self, name: &str, public: bool, key: &SigningKey) {
        let new = NewCache {
            name: name.into(),
            is_public: public,
            store_dir: "/nix/store".into(),
            priority: 41,
            signing_key: key.to_secret_string(),
            upstream_cache_key_names: vec![],
            retention_period: None,
        };
        self.state.meta.create_cache(&new, 0).await.unwrap();
    }
}

// Helpers for the end-to-end tests that push and pull through the HTTP API
// (`attic_api.rs`, `nix_copy.rs`).

impl TestServer {
    pub fn deployment(&self) -> Deployment {
        // `S3TestServer::start` creates `<dir>/s3/<bucket>`.
        if self.dir.path().join("s3").exists() {
            Deployment::PostgresS3
        } else {
            Deployment::SqliteFs
        }
    }

    /// A valid token for this server granting `permission` on each pattern,
    /// in order.
    pub fn token(&self, grants: &[(&str, garret_server::auth::Permission)]) -> String {
        let mut spec =
            garret_server::auth::TokenSpec::new("e2e", std::time::Duration::from_hours(1));
        for (pattern, permission) in grants {
            spec.grant(pattern.parse().unwrap(), *permission);
        }
        self.tokens.mint(&spec).unwrap()
    }

    /// Every file the chunk storage holds (the local directory with its
    /// temporary files, or the bucket's objects, which s3s-fs keeps as files
    /// under `<root>/<bucket>/<key>`): a refused upload must leave this set as
    /// it found it. (s3s-fs keeps per-object metadata files beside the
    /// bucket and never deletes them, so they are not counted.)
    pub fn storage_files(&self) -> std::collections::BTreeSet<std::path::PathBuf> {
        let root = match self.deployment() {
            Deployment::SqliteFs => self.dir.path().join("chunks"),
            Deployment::PostgresS3 => self.dir.path().join("s3/garret"),
        };
        let mut files = std::collections::BTreeSet::new();
        let mut dirs = vec![root];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let entry = entry.unwrap();
                if entry.file_type().unwrap().is_dir() {
                    dirs.push(entry.path());
                } else {
                    files.insert(entry.path());
                }
            }
        }
        files
    }
}

/// Status and JSON body (`null` when the body is empty).
pub type Reply = (reqwest::StatusCode, serde_json::Value);

/// Sends `request` and reads its answer as JSON, which every API answer
/// is (Attic's and garret's own, errors included).
pub async fn send_json(request: reqwest::RequestBuilder) -> Reply {
    let response = request.send().await.unwrap();
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    let body = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{status}: body is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        })
    };
    (status, body)
}

/// Attic's error body: `{"code": status, "error": kind, "message": ...}`.
#[track_caller]
pub fn assert_error(reply: &Reply, status: u16, kind: Option<&str>) {
    let (got, body) = reply;
    assert_eq!(got.as_u16(), status, "{body}");
    assert_eq!(body["code"], status, "{body}");
    let error = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no `error` kind in {body}"));
    assert!(!error.is_empty(), "{body}");
    if let Some(kind) = kind {
        assert_eq!(error, kind, "{body}");
    }
    assert!(body["message"].is_string(), "{body}");
}

/// Stores `nar` through the chunk store as the NAR of `base`
/// (`<hash>-<name>`) in `cache`, as an upload would, without references or
/// signatures.
pub async fn publish_nar(state: &AppState, cache: &str, base: &str, nar: Vec<u8>) {
    let nar_hash = garret_nix::Sha256Hash::of(&nar);
    let nar_size = nar.len() as u64;
    let blob = state
        .blobs
        .put(
            futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(nar))]),
            garret_server::blobs::Expect {
                hash: Some(nar_hash),
                size: Some(nar_size),
                max_size: None,
            },
        )
        .await
        .unwrap();
    let cache = state.meta.cache(cache).await.unwrap();
    let object = garret_meta::NixObject {
        store_path_hash: base[..32].to_owned(),
        store_path: base.to_owned(),
        blob_id: blob.id,
        nar_hash: *nar_hash.as_bytes(),
        nar_size,
        references: vec![],
        deriver: None,
        sigs: vec![],
        ca: None,
        system: None,
    };
    state
        .meta
        .upsert_nix_object(cache.id, &object, 0)
        .await
        .unwrap();
}

/// Runs blocking work (a `nix` or `curl` process) off the runtime's threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// A single-user Nix 2.8 of its own: configuration, state, log and client
/// cache all under `dir`, signatures required and only `trusted_key`
/// trusted. With a token, a netrc file sends it to 127.0.0.1 as the Basic
/// auth password, which is how Nix authenticates to a binary cache.
#[derive(Clone, Debug)]
pub struct Nix {
    pub dir: std::path::PathBuf,
}

impl Nix {
    pub fn new(dir: &Path, trusted_key: &str, token: Option<&str>) -> Self {
        let conf = dir.join("conf");
        std::fs::create_dir_all(&conf).unwrap();
        let netrc = dir.join("netrc");
        std::fs::write(
            &netrc,
            token.map_or(String::new(), |t| {
                format!("machine 127.0.0.1\nlogin garret\npassword {t}\n")
            }),
        )
        .unwrap();
        // Builds in a `local?root=` store run chrooted even without the
        // sandbox, so the builder's `/bin/sh` must be mounted in.
        let sandbox_paths: Vec<&str> = ["/bin", "/usr", "/lib", "/lib64"]
            .into_iter()
            .filter(|p| Path::new(p).exists())
            .collect();
        std::fs::write(
            conf.join("nix.conf"),
            format!(
                "experimental-features = nix-command\nbuild-users-group =\nsandbox = false\n\
                 substituters =\nrequire-sigs = true\ntrusted-public-keys = {trusted_key}\n\
                 netrc-file = {}\nsandbox-paths = {}\n",
                netrc.display(),
                sandbox_paths.join(" ")
            ),
        )
        .unwrap();
        Self {
            dir: dir.to_owned(),
        }
    }

    fn command(&self, program: &str, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(program);
        command
            .args(args)
            .current_dir(&self.dir)
            .env("NIX_CONF_DIR", self.dir.join("conf"))
            .env("NIX_STATE_DIR", self.dir.join("state"))
            .env("NIX_LOG_DIR", self.dir.join("log"))
            .env("XDG_CACHE_HOME", self.dir.join("cache"))
            .env("HOME", &self.dir);
        command
    }

    /// Runs `program` (`nix`, `nix-build`, ...) with this configuration.
    pub fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        self.command(program, args)
            .output()
            .unwrap_or_else(|e| panic!("{program} is required (./tests/run installs nix-bin): {e}"))
    }

    /// [`Nix::run`] that must succeed; returns trimmed stdout.
    pub fn ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

/// `local?root=DIR`: a store whose paths are `/nix/store/...` but whose
/// files live under `root`, so tests never touch the host's store.
pub fn chroot_store(root: &Path) -> String {
    format!("local?root={}", root.display())
}
