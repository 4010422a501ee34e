//! The Attic API over HTTP, on both deployments: a closure pushed exactly as
//! `attic push` pushes it (cache-config, one get-missing-paths, five
//! concurrent upload-path calls with the NarInfo in a header or a preamble)
//! is substituted by the real Nix 2.8 with signatures required; cache
//! configuration follows Attic's lifecycle; and every refused request is
//! answered with Attic's JSON error and leaves nothing behind, neither a
//! path, nor a chunk row, nor a stored object.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use futures::StreamExt;
use garret_meta::ChunkStats;
use garret_nix::signing::{SigningKey, VerifyingKey};
use garret_nix::{Sha256Hash, StorePathHash};
use garret_server::auth::{AtticAccess, Claims, Permission, TokenAuthority, TokenSpec};
use garret_server::config::Limits;
use serde_json::{Value, json};

mod common;

use common::{Deployment, Nix, Reply, TestServer, assert_error, blocking, chroot_store, on_both};

on_both! {
    attic_push_then_nix_substitutes,
    cache_config_lifecycle,
    refuses_wrong_nar_hash,
    refuses_wrong_nar_size,
    refuses_short_body,
    refuses_invalid_nar,
    refuses_bad_store_path_hash,
    refuses_claimed_nar_hash_without_the_bytes,
    refuses_unknown_cache,
    refuses_missing_token,
    refuses_expired_token,
    refuses_token_signed_by_another_key,
    refuses_alg_none_token,
    refuses_push_without_push_permission,
    refuses_oversized_preamble,
    refuses_nar_put_with_wrong_file_hash,
    refuses_corrupt_zstd_nar_put,
}

/// `attic push` moves the NarInfo from the header into a body preamble from
/// this JSON size on.
const PREAMBLE_THRESHOLD: usize = 4096;

const PUSH_PULL: Permission = Permission {
    push: true,
    pull: true,
    ..Permission::NONE
};

// ---------------------------------------------------------------------------
// Store paths and their NARs.

/// An invented input-addressed store path (no CA, so Nix checks its
/// signature) and its NAR.
#[derive(Clone, Debug)]
struct PathNar {
    /// `<hash>-<name>`.
    base: String,
    /// Basenames, as upload-path takes them.
    references: Vec<String>,
    nar: Vec<u8>,
}

/// `<hash>-<name>` with a valid nix32 hash derived from `name`.
fn base_name(name: &str) -> String {
    let digest = Sha256Hash::of(name.as_bytes());
    let hash = StorePathHash::from_bytes(digest.as_bytes()[..20].try_into().unwrap());
    format!("{hash}-{name}")
}

fn store_path(base: &str) -> String {
    format!("/nix/store/{base}")
}

impl PathNar {
    fn new(name: &str, tree: &Path, references: Vec<String>) -> Self {
        let mut nar = Vec::new();
        garret_nix::nar::dump_path(tree, &mut nar).unwrap();
        Self {
            base: base_name(name),
            references,
            nar,
        }
    }

    fn hash(&self) -> &str {
        &self.base[..32]
    }

    fn store_path(&self) -> String {
        store_path(&self.base)
    }

    /// The NarInfo JSON as `attic push` sends it.
    fn info(&self, cache: &str) -> Value {
        json!({
            "cache": cache,
            "store_path_hash": self.hash(),
            "store_path": self.store_path(),
            "references": self.references,
            "system": null,
            "deriver": null,
            "sigs": [],
            "ca": null,
            "nar_hash": format!("sha256:{}", Sha256Hash::of(&self.nar).to_hex()),
            "nar_size": self.nar.len(),
        })
    }
}

fn write_executable(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// A directory with `size` bytes of compressible text in `data`: large
/// enough to be cut into many chunks, so a refused upload has chunks to
/// leave behind if the server is careless.
fn data_tree(work: &Path, name: &str, size: usize, seed: u64) -> std::path::PathBuf {
    let root = work.join(name);
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("data"), garret_store::testing::text(size, seed)).unwrap();
    root
}

/// A closure shaped to exercise the API: 120 leaves, a tree with an
/// executable, symlinks, an empty directory and 3 MiB of data, a hub whose
/// references list is long enough to need the preamble, and a top path that
/// references the hub, the tree and itself. References come first.
fn closure(work: &Path) -> Vec<PathNar> {
    let trees = work.join("trees");
    std::fs::create_dir_all(&trees).unwrap();
    let mut paths = Vec::new();
    for i in 0..120 {
        let name = format!("garret-leaf-{i:03}");
        let file = trees.join(&name);
        std::fs::write(&file, format!("leaf {i}\n").repeat(i + 1)).unwrap();
        paths.push(PathNar::new(&name, &file, vec![]));
    }
    let leaves: Vec<String> = paths.iter().map(|p| p.base.clone()).collect();

    let tree = trees.join("garret-tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::create_dir_all(tree.join("share/doc")).unwrap();
    std::fs::create_dir_all(tree.join("empty")).unwrap();
    write_executable(&tree.join("bin/hello"), "#!/bin/sh\necho hello\n");
    std::fs::write(tree.join("share/doc/README"), "garret e2e\n").unwrap();
    std::fs::write(
        tree.join("share/data"),
        garret_store::testing::text(3 << 20, 17),
    )
    .unwrap();
    std::os::unix::fs::symlink("bin/hello", tree.join("link")).unwrap();
    std::os::unix::fs::symlink("../nowhere", tree.join("dangling")).unwrap();
    let tree = PathNar::new("garret-tree", &tree, vec![]);

    let hub_dir = trees.join("garret-hub");
    std::fs::create_dir_all(&hub_dir).unwrap();
    let listing: String = leaves.iter().map(|b| store_path(b) + "\n").collect();
    std::fs::write(hub_dir.join("refs"), listing).unwrap();
    let hub = PathNar::new("garret-hub", &hub_dir, leaves);

    let top_base = base_name("garret-top");
    let top_dir = trees.join("garret-top");
    std::fs::create_dir_all(&top_dir).unwrap();
    std::fs::write(top_dir.join("hub"), store_path(&hub.base)).unwrap();
    std::fs::write(top_dir.join("self"), store_path(&top_base)).unwrap();
    std::os::unix::fs::symlink(
        format!("{}/bin/hello", store_path(&tree.base)),
        top_dir.join("hello"),
    )
    .unwrap();
    let top = PathNar::new(
        "garret-top",
        &top_dir,
        vec![hub.base.clone(), tree.base.clone(), top_base],
    );

    paths.push(tree);
    paths.push(hub);
    paths.push(top);
    paths
}

// ---------------------------------------------------------------------------
// The HTTP client.

/// Where the NarInfo JSON of an upload travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InfoIn {
    Header,
    Preamble,
}

#[derive(Clone, Debug)]
struct Api {
    http: reqwest::Client,
    url: String,
    /// What the `attic` client resolves `_api/v1/...` against: the server's
    /// root until a cache-config answer names its `api_endpoint`.
    endpoint: reqwest::Url,
    token: Option<String>,
}

impl Api {
    fn new(server: &TestServer, token: Option<String>) -> Self {
        Self {
            http: reqwest::Client::new(),
            url: server.url.clone(),
            endpoint: reqwest::Url::parse(&format!("{}/", server.url)).unwrap(),
            token,
        }
    }

    /// The client after reading a cache-config: it replaces its endpoint
    /// with the server's `api_endpoint`.
    fn at_api_endpoint(&self, config: &Value) -> Self {
        let endpoint = config["api_endpoint"].as_str().unwrap();
        Self {
            endpoint: reqwest::Url::parse(endpoint).unwrap(),
            ..self.clone()
        }
    }

    /// A request to `path` relative to the API endpoint, joined as the
    /// client joins it (RFC 3986, `Url::join`).
    fn api_request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = self.endpoint.join(path).unwrap();
        let request = self.http.request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    fn with_token(&self, token: Option<String>) -> Self {
        Self {
            token,
            ..self.clone()
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.url));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send(request: reqwest::RequestBuilder) -> Reply {
        common::send_json(request).await
    }

    async fn get(&self, path: &str) -> Reply {
        Self::send(self.request(reqwest::Method::GET, path)).await
    }

    async fn cache_config(
        &self,
        method: reqwest::Method,
        cache: &str,
        body: Option<Value>,
    ) -> Reply {
        let request = self.request(method, &format!("/_api/v1/cache-config/{cache}"));
        Self::send(match body {
            Some(body) => request.json(&body),
            None => request,
        })
        .await
    }

    async fn missing(&self, cache: &str, hashes: &[&str]) -> Reply {
        Self::send(
            self.api_request(reqwest::Method::POST, "_api/v1/get-missing-paths")
                .json(&json!({ "cache": cache, "store_path_hashes": hashes })),
        )
        .await
    }

    /// upload-path with `info` (already serialised) and `body` as the NAR.
    async fn upload_raw(&self, info: &[u8], body: &[u8], how: InfoIn) -> Reply {
        let request = self
            .api_request(reqwest::Method::PUT, "_api/v1/upload-path")
            .header("content-type", "application/octet-stream");
        let request = match how {
            InfoIn::Header => request
                .header("x-attic-nar-info", std::str::from_utf8(info).unwrap())
                .body(body.to_vec()),
            InfoIn::Preamble => request
                .header("x-attic-nar-info-preamble-size", info.len().to_string())
                .body([info, body].concat()),
        };
        Self::send(request).await
    }

    async fn upload(&self, info: &Value, body: &[u8], how: InfoIn) -> Reply {
        self.upload_raw(&serde_json::to_vec(info).unwrap(), body, how)
            .await
    }

    /// The way `attic push` picks: the header unless the JSON is large.
    fn attic_choice(info: &Value) -> InfoIn {
        if serde_json::to_vec(info).unwrap().len() >= PREAMBLE_THRESHOLD {
            InfoIn::Preamble
        } else {
            InfoIn::Header
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------
// The happy path.

async fn attic_push_then_nix_substitutes(deployment: Deployment) {
    let server = TestServer::start(deployment).await;
    let key = SigningKey::generate("attic-e2e-1").unwrap();
    server.create_cache("attic", false, &key).await;
    let push = Api::new(&server, Some(server.token(&[("attic", PUSH_PULL)])));
    let work = tempfile::tempdir().unwrap();
    let paths = closure(work.path());

    push_like_attic(&push, &key, &paths).await;
    reuploads_are_deduplicated(&server, &push, &paths).await;

    // The real Nix substitutes the closure with signatures required and only
    // the cache's key trusted; every path is byte-identical.
    let reader = server.token(&[("attic", Permission::PULL)]);
    let nix = Nix::new(
        &work.path().join("nix"),
        &key.verifying_key().to_string(),
        Some(&reader),
    );
    let root = work.path().join("root");
    let from = format!("{}/attic", server.url);
    let (store, top) = (chroot_store(&root), paths.last().unwrap().store_path());
    blocking(move || {
        nix.ok("nix", &["copy", "--from", &from, "--to", &store, &top]);
        nix.ok("nix", &["store", "verify", "--store", &store, "-r", &top]);
    })
    .await;
    for path in &paths {
        let restored = root.join("nix/store").join(&path.base);
        let mut nar = Vec::new();
        garret_nix::nar::dump_path(&restored, &mut nar).unwrap();
        assert!(nar == path.nar, "{} differs after substitution", path.base);
    }
}

/// What `attic push` does: cache-config, one get-missing-paths for the whole
/// closure, then five uploads at a time.
async fn push_like_attic(push: &Api, key: &SigningKey, paths: &[PathNar]) {
    let (status, config) = push.cache_config(reqwest::Method::GET, "attic", None).await;
    assert_eq!(status, 200, "{config}");
    assert_eq!(config["public_key"], key.verifying_key().to_string());
    assert_eq!(config["is_public"], false);
    assert_eq!(config["store_dir"], "/nix/store");
    assert_eq!(config["priority"], 41);
    assert_eq!(config["upstream_cache_key_names"], json!([]));
    assert_eq!(config["retention_period"], "Global");
    // Attic's endpoints: the root URL, and the root plus the cache name.
    // The client resolves its paths against the former, so they must land
    // on routes (this was `/_api/_api/v1/...` once).
    assert_eq!(config["api_endpoint"], format!("{}/", push.url), "{config}");
    assert_eq!(
        config["substituter_endpoint"],
        format!("{}/attic", push.url),
        "{config}"
    );
    let push = &push.at_api_endpoint(&config);
    for path in ["_api/v1/get-missing-paths", "_api/v1/upload-path"] {
        let url = push.endpoint.join(path).unwrap();
        assert_eq!(url.as_str(), format!("{}/{path}", push.url));
    }
    let cache_info = format!(
        "{}/nix-cache-info",
        config["substituter_endpoint"].as_str().unwrap()
    );
    let info = push
        .http
        .get(&cache_info)
        .bearer_auth(push.token.as_ref().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(info.status(), 200, "{cache_info}");
    assert!(info.text().await.unwrap().contains("StoreDir: /nix/store"));

    let hashes: Vec<&str> = paths.iter().map(PathNar::hash).collect();
    let (status, body) = push.missing("attic", &hashes).await;
    assert_eq!(status, 200, "{body}");
    let missing: BTreeSet<&str> = body["missing_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(missing, hashes.iter().copied().collect());

    // The hub's JSON is large enough for the preamble, and every seventh
    // path takes it too.
    let hub_info = paths[paths.len() - 2].info("attic");
    assert_eq!(Api::attic_choice(&hub_info), InfoIn::Preamble);
    let replies: Vec<(String, InfoIn, Reply)> = futures::stream::iter(paths.iter().enumerate())
        .map(|(i, path)| async move {
            let info = path.info("attic");
            let how = if i % 7 == 0 {
                InfoIn::Preamble
            } else {
                Api::attic_choice(&info)
            };
            let reply = push.upload(&info, &path.nar, how).await;
            (path.base.clone(), how, reply)
        })
        .buffer_unordered(5)
        .collect()
        .await;
    assert_eq!(replies.len(), paths.len());
    for (base, how, (status, body)) in &replies {
        assert_eq!(*status, 200, "{base} ({how:?}): {body}");
        assert_eq!(body["kind"], "Uploaded", "{base}: {body}");
        assert!(body["file_size"].as_u64().unwrap() > 0, "{base}: {body}");
        let frac = body["frac_deduplicated"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&frac), "{base}: {body}");
    }

    let (status, body) = push.missing("attic", &hashes).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["missing_paths"], json!([]));
}

/// The same NAR again, for the same path or for a new one: `Deduplicated`
/// (after the whole body was read), no chunk added, and the new path served.
async fn reuploads_are_deduplicated(server: &TestServer, push: &Api, paths: &[PathNar]) {
    let chunks_before = server.state.meta.chunk_stats().await.unwrap();
    let files_before = server.storage_files();
    let [.., tree, hub, top] = paths else {
        unreachable!()
    };
    let twin = PathNar {
        base: base_name("garret-twin-of-tree"),
        ..tree.clone()
    };
    for (path, how) in [
        (top, InfoIn::Header),
        (hub, InfoIn::Preamble),
        (&twin, InfoIn::Header),
    ] {
        let (status, body) = push.upload(&path.info("attic"), &path.nar, how).await;
        assert_eq!(status, 200, "{}: {body}", path.base);
        assert_eq!(body["kind"], "Deduplicated", "{}: {body}", path.base);
    }
    assert_eq!(
        server.state.meta.chunk_stats().await.unwrap(),
        chunks_before
    );
    assert_eq!(server.storage_files(), files_before);

    let (status, body) = push.missing("attic", &[twin.hash()]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["missing_paths"], json!([]));
    let response = push
        .request(
            reqwest::Method::GET,
            &format!("/attic/{}.narinfo", twin.hash()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let narinfo = response.text().await.unwrap();
    assert!(
        narinfo.contains(&format!("StorePath: {}\n", twin.store_path())),
        "{narinfo}"
    );
}

/// One client per role on the caches `team-*`.
struct Roles {
    admin: Api,
    creator: Api,
    configurer: Api,
    reader: Api,
    anonymous: Api,
}

async fn cache_config_lifecycle(deployment: Deployment) {
    let server = TestServer::start(deployment).await;
    let admin = Api::new(&server, Some(server.token(&[("team-*", Permission::ALL)])));
    let role = |permission| admin.with_token(Some(server.token(&[("team-*", permission)])));
    let roles = Roles {
        creator: role(Permission::CREATE_CACHE),
        configurer: role(Permission::CONFIGURE_CACHE),
        reader: role(Permission::PULL),
        anonymous: admin.with_token(None),
        admin: admin.clone(),
    };
    creates_caches(&roles).await;
    configures_and_destroys(&roles, &server).await;
}

/// Creating needs `cc`; a second create is refused; the configuration reads
/// back as created, with a generated or a given keypair.
async fn creates_caches(roles: &Roles) {
    let Roles {
        admin,
        creator,
        reader,
        ..
    } = roles;
    let create = json!({
        "keypair": "Generate",
        "is_public": false,
        "store_dir": "/nix/store",
        "priority": 42,
        "upstream_cache_key_names": ["cache.nixos.org-1"],
    });

    let reply = reader
        .cache_config(reqwest::Method::POST, "team-a", Some(create.clone()))
        .await;
    assert_error(&reply, 403, Some("AccessError"));
    let (status, body) = creator
        .cache_config(reqwest::Method::POST, "team-a", Some(create.clone()))
        .await;
    assert_eq!(status, 200, "{body}");
    let reply = creator
        .cache_config(reqwest::Method::POST, "team-a", Some(create.clone()))
        .await;
    assert_error(&reply, 400, Some("CacheAlreadyExists"));

    let (status, config) = admin
        .cache_config(reqwest::Method::GET, "team-a", None)
        .await;
    assert_eq!(status, 200, "{config}");
    assert_eq!(config["is_public"], false);
    assert_eq!(config["store_dir"], "/nix/store");
    assert_eq!(config["priority"], 42);
    assert_eq!(
        config["upstream_cache_key_names"],
        json!(["cache.nixos.org-1"])
    );
    assert_eq!(config["retention_period"], "Global");
    let generated: VerifyingKey = config["public_key"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{config}: {e:?}"));
    let (status, info) = admin.get("/team-a/attic-cache-info").await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info, config);

    // A given keypair is the one the cache signs with.
    let key = SigningKey::generate("team-b-1").unwrap();
    let mut with_key = create.clone();
    with_key["keypair"] = json!({ "Keypair": key.to_secret_string() });
    let (status, body) = creator
        .cache_config(reqwest::Method::POST, "team-b", Some(with_key))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, config_b) = admin
        .cache_config(reqwest::Method::GET, "team-b", None)
        .await;
    assert_eq!(config_b["public_key"], key.verifying_key().to_string());
    assert_ne!(generated.to_string(), key.verifying_key().to_string());
}

/// Configuring needs `cr` and takes any subset of fields (none is a 400);
/// destroying needs `cd`, and afterwards the cache is gone for those who may
/// see it while a stranger still learns nothing.
async fn configures_and_destroys(roles: &Roles, server: &TestServer) {
    let Roles {
        admin,
        configurer,
        reader,
        anonymous,
        ..
    } = roles;
    assert_eq!(anonymous.get("/team-a/nix-cache-info").await.0, 401);
    let reply = reader
        .cache_config(
            reqwest::Method::PATCH,
            "team-a",
            Some(json!({ "is_public": true })),
        )
        .await;
    assert_error(&reply, 403, Some("AccessError"));
    let (status, body) = configurer
        .cache_config(
            reqwest::Method::PATCH,
            "team-a",
            Some(json!({ "is_public": true })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = configurer
        .cache_config(
            reqwest::Method::PATCH,
            "team-a",
            Some(json!({ "priority": 30 })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let reply = configurer
        .cache_config(reqwest::Method::PATCH, "team-a", Some(json!({})))
        .await;
    assert_error(&reply, 400, None);
    let response = anonymous
        .request(reqwest::Method::GET, "/team-a/nix-cache-info")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("Priority: 30\n"), "{text}");
    let (status, config) = anonymous
        .cache_config(reqwest::Method::GET, "team-a", None)
        .await;
    assert_eq!(status, 200, "{config}");
    assert_eq!(config["is_public"], true);
    assert_eq!(config["priority"], 30);
    assert_eq!(
        config["upstream_cache_key_names"],
        json!(["cache.nixos.org-1"])
    );

    let reply = configurer
        .cache_config(reqwest::Method::DELETE, "team-a", None)
        .await;
    assert_error(&reply, 403, Some("AccessError"));
    let (status, body) = admin
        .cache_config(reqwest::Method::DELETE, "team-a", None)
        .await;
    assert!(status.is_success(), "{status}: {body}");
    let reply = admin
        .cache_config(reqwest::Method::GET, "team-a", None)
        .await;
    assert_error(&reply, 404, Some("NoSuchCache"));
    let stranger = admin.with_token(Some(server.token(&[("other", Permission::ALL)])));
    let reply = stranger
        .cache_config(reqwest::Method::GET, "team-b", None)
        .await;
    assert_error(&reply, 401, Some("Unauthorized"));
}

// ---------------------------------------------------------------------------
// Refusals: each answered with Attic's error body, each leaving nothing.

/// A server with the private cache `neg`, a push token for it, a 1 MiB NAR
/// (many chunks) to push, and a snapshot of what the store held before.
struct Refusal {
    server: TestServer,
    api: Api,
    path: PathNar,
    stats: ChunkStats,
    files: BTreeSet<std::path::PathBuf>,
    _work: tempfile::TempDir,
}

impl Refusal {
    async fn start(deployment: Deployment) -> Self {
        Self::start_with(deployment, Limits::default()).await
    }

    async fn start_with(deployment: Deployment, limits: Limits) -> Self {
        let server = TestServer::start_with(deployment, limits).await;
        let key = SigningKey::generate("neg-1").unwrap();
        server.create_cache("neg", false, &key).await;
        // One pooled client for every request: a refusal that comes before
        // the body is read says `Connection: close`, so the client never
        // sends its next request on a connection the server is closing.
        let api = Api::new(&server, Some(server.token(&[("neg", PUSH_PULL)])));
        let work = tempfile::tempdir().unwrap();
        let tree = data_tree(work.path(), "victim", 1 << 20, 3);
        let path = PathNar::new("garret-victim", &tree, vec![]);
        let stats = server.state.meta.chunk_stats().await.unwrap();
        let files = server.storage_files();
        Self {
            server,
            api,
            path,
            stats,
            files,
            _work: work,
        }
    }

    /// No object for `hash` in `neg`, no chunk row and no stored file more
    /// than before.
    async fn assert_nothing_left(&self, hash: &str) {
        let meta = &self.server.state.meta;
        let cache = meta.cache("neg").await.unwrap();
        assert!(
            meta.nix_object(cache.id, hash).await.unwrap().is_none(),
            "{hash} was stored"
        );
        assert_eq!(meta.chunk_stats().await.unwrap(), self.stats);
        assert_eq!(self.server.storage_files(), self.files);
    }

    /// An upload of the victim path with `info` changed by `edit`.
    async fn upload_edited(&self, edit: impl FnOnce(&mut Value), how: InfoIn) -> Reply {
        let mut info = self.path.info("neg");
        edit(&mut info);
        self.api.upload(&info, &self.path.nar, how).await
    }
}

async fn refuses_wrong_nar_hash(deployment: Deployment) {
    let f = Refusal::start(deployment).await;
    let wrong = Sha256Hash::of(b"something else");
    for (nar_hash, how) in [
        (format!("sha256:{}", wrong.to_hex()), InfoIn::Header),
        (format!("sha256:{}", wrong.to_nix32()), InfoIn::Preamble),
    ] {
        let reply = f
            .upload_edited(|info| info["nar_hash"] = json!(nar_hash), how)
            .await;
        assert_error(&reply, 400, None);
    }
    f.assert_nothing_left(f.path.hash()).await;
}

async fn refuses_wrong_nar_size(deployment: Deployment) {
    let f = Refusal::start(deployment).await;
    let size = f.path.nar.len();
    for declared in [size - 8, size + 8, 0] {
        let reply = f
            .upload_edited(|info| info["nar_size"] = json!(declared), InfoIn::Header)
            .await;
        assert_error(&reply, 400, None);
    }
    f.assert_nothing_left(f.path.hash()).await;
}

/// The body ends early (with an honest Content-Length): the declared hash and
/// size are never reached.
async fn refuses_short_body(deployment: Deployment) {
    let f = Refusal::start(deployment).await;
    let info = f.path.info("neg");
    for how in [InfoIn::Header, InfoIn::Preamble] {
        let half = &f.path.nar[..f.path.nar.len() / 2];
        let reply = f.api.upload(&info, half, how).await;
        assert_error(&reply, 400, None);
    }
    let reply = f.api.upload(&info, &[], InfoIn::Header).await;
    assert_error(&reply, 400, None);
    f.assert_nothing_left(f.path.hash()).await;
}

/// Bytes that are not a NAR, declared with their true hash and size.
async fn refuses_invalid_nar(deployment: Deployment) {
    let f = Refusal::start(deployment).await;
    let mut not_a_nar = garret_store::testing::text(1 << 20, 9);
    // A correct NAR start followed by garbage, then pure garbage.
    let mut truncated_grammar = f.path.nar[..200].to_vec();
    truncated_grammar.extend_from_slice(&not_a_nar[..1000]);
    for body in [std::mem::take(&mut not_a_nar), truncated_grammar] {
        let reply = f
            .api
            .upload(
                &json!({
                    "cache": "neg",
                    "store_path_hash": f.path.hash(),
                    "store_path": f.path.store_path(),
                    "references": [],
                    "system": null,
                    "deriver": null,
                    "sigs": [],
                    "ca": null,
                    "nar_hash": format!("sha256:{}", Sha256Hash::of(&body).to_hex()),
                    "nar_size": body.len(),
                }),
                &body,
                InfoIn::Header,
            )
            .await;
        assert_error(&reply, 400, None);
    }
    f.assert_nothing_left(f.path.hash()).await;
}

async fn refuses_bad_store_path_hash(deployment: Deployment) {
    let f = Refusal::start(deployment).await;
    // `e` is not a nix32 digit.
    let not_nix32 = "e".repeat(32);
    let reply = f
        .upload_edited(
            |info| {
                info["store_path_hash"] = json!(not_nix32);
                info["store_path"] = json!(format!("/nix/store/{not_nix32}-garret-victim"));
            },
            InfoIn::Header,
        )
        .await;
    assert_error(&reply, 400, None);
    // Too short.
    let reply = f
        .upload_edited(
            |info| info["store_path_hash"] = json!("abc"),
            InfoIn::Header,
        )
        .await;
    assert_error(&reply, 400, None);
    // Valid, but not the hash of `store_path`.
    let other = base_name("garret-other");
    let reply = f
        .upload_edited(
            |info| info["store_path_hash"] = json!(other[..32]),
            InfoIn::Header,
        )
        .await;
    assert_error(&reply, 400, None);
    // A store path outside the store.
    let reply = f
        .upload_edited(
            |info| info["store_path"] = json!(format!("/tmp/{}", f.path.base)),
            InfoIn::Header,
        )
        .await;
    assert_error(&reply, 400, None);
    f.assert_nothing_left(f.path.hash()).await;
    f.assert_nothing_left(&not_nix32).await;
    f.assert_nothing_left(&other[..32]).await;
}

/// Deduplication needs proof of possession: claiming a stored NAR's hash
/// and size with other bytes creates nothing.
async fn refuses_claimed_nar_hash_without_the_bytes(deployment: Deployment) {
    let mut f = Refusal::start(deployment).await;
    let (status, body) = f
        .api
        .upload(&f.path.info("neg"), &f.path.nar, InfoIn::Header)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["kind"], "Uploaded", "{body}");
    f.stats = f.server.state.meta.chunk_stats().await.unwrap();
    f.files = f.server.storage_files();

    let thief = base_name("garret-thief");
    let mut forged = f.path.nar.clone();
    let middle = forged.len() / 2;
    forged[middle] ^= 1;
    let mut info = f.path.info("neg");
    info["store_path_hash"] = json!(thief[..32]);
    info["store_path"] = json!(store_path(&thief));
    for how in [InfoIn::Header, InfoIn::Preamble] {
        let reply = f.api.upload(&info, &forged, how).await;
        assert_error(&reply, 400, None);
        let reply = f.api.upload(&info, &[], how).await;
        assert_error(&reply, 400, None);
    }
    f.assert_nothing_left(&thief[..32]).await;
    let (_, body) = f.api.missing("neg", &[&thief[..32]]).await;
    assert_eq!(body["missing_paths"], json!([&thief[..32]]));
}

async fn refuses_unknown_cache(deployment: Deployment) {
    let f = Refusal::start(deployment).await;
    let mut info = f.path.info("neg");
    info["cache"] = json!("nosuch");
    // A token with no permission on the name learns nothing: 401.
    let reply = f.api.upload(&info, &f.path.nar, InfoIn::Header).await;
    assert_error(&reply, 401, Some("Unauthorized"));
    let reply = f.api.missing("nosuch", &[f.path.hash()]).await;
    assert_error(&reply, 401, Some("Unauthorized"));
    let reply = f
        .api
        .cache_config(reqwest::Method::GET, "nosuch", None)
        .await;
    assert_error(&reply, 401, Some("Unauthorized"));
    // One whose pattern covers it is told it does not exist.
    let everywhere = f.api.with_token(Some(f.server.token(&[("*", PUSH_PULL)])));
    let reply = everywhere
        .upload(&info, &f.path.nar, InfoIn::Preamble)
        .await;
    assert_error(&reply, 404, Some("NoSuchCache"));
    let reply = everywhere.missing("nosuch", &[f.path.hash()]).await;
    assert_error(&reply, 404, Some("NoSuchCache"));
    let reply = everywhere
        .cache_config(reqwest::Method::GET, "nosuch", None)
        .await;
    assert_error(&reply, 404, Some("NoSuchCache"));
    f.assert_nothing_left(f.path.hash()).await;
}

async fn refuses_missing_token(deployment: Deployment) {
    let f = Refusal::start(deployment).await;
    let anonymous = f.api.with_token(None);
    let reply = anonymous
        .upload(&f.path.info("neg"), &f.path.nar, InfoIn::Header)
        .await;
    assert_error(&reply, 401, Some("Unauthorized"));
    let reply = anonymous.missing("neg", &[f.path.hash()]).await;
    assert_error(&reply, 401, Some("Unauthorized"));
    f.assert_nothing_left(f.path.hash()).await;
}

/// Pushes the victim with `token` and expects a 401 `InvalidToken`.
async fn refuses_token(deployment: Deployment, token: String) {
    let f = Refusal::start(deployment).await;
    let api = f.api.with_token(Some(token));
    let reply = api
        .upload(&f.path.info("neg"), &f.path.nar, InfoIn::Header)
        .await;
    assert_error(&reply, 401, Some("InvalidToken"));
    let reply = api.missing("neg", &[f.path.hash()]).await;
    assert_error(&reply, 401, Some("InvalidToken"));
    f.assert_nothing_left(f.path.hash()).await;
}

fn claims(exp: u64) -> Claims {
    let mut access = AtticAccess::default();
    access.grant("neg".parse().unwrap(), PUSH_PULL);
    Claims {
        exp: Some(exp),
        nbf: Some(exp.saturating_sub(7200)),
        sub: Some("e2e".into()),
        access,
        ..Claims::default()
    }
}

async fn refuses_expired_token(deployment: Deployment) {
    // An hour past expiry: well beyond any clock-skew leeway.
    let secret = STANDARD.decode(common::TEST_SECRET_BASE64).unwrap();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims(now() - 3600),
        &jsonwebtoken::EncodingKey::from_secret(&secret),
    )
    .unwrap();
    refuses_token(deployment, token).await;
}

async fn refuses_token_signed_by_another_key(deployment: Deployment) {
    let other = TokenAuthority::hs256_base64(&STANDARD.encode([7u8; 64])).unwrap();
    let mut spec = TokenSpec::new("e2e", std::time::Duration::from_hours(1));
    spec.grant("neg".parse().unwrap(), PUSH_PULL);
    refuses_token(deployment, other.mint(&spec).unwrap()).await;
}

async fn refuses_alg_none_token(deployment: Deployment) {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(now() + 3600)).unwrap());
    refuses_token(deployment, format!("{header}.{payload}.")).await;
}

async fn refuses_push_without_push_permission(deployment: Deployment) {
    let f = Refusal::start(deployment).await;
    let reader = f
        .api
        .with_token(Some(f.server.token(&[("neg", Permission::PULL)])));
    // These name their cache in the body, which is not read for a token
    // that could push nowhere: Attic's 403 for some permission but not
    // enough, from the headers alone (issue 10).
    let reply = reader
        .upload(&f.path.info("neg"), &f.path.nar, InfoIn::Header)
        .await;
    assert_error(&reply, 403, Some("AccessError"));
    let reply = reader.missing("neg", &[f.path.hash()]).await;
    assert_error(&reply, 403, Some("AccessError"));
    // A token that may push elsewhere has its body read, and is told what
    // it lacks on this cache.
    let elsewhere = f.api.with_token(Some(
        f.server
            .token(&[("neg", Permission::PULL), ("other-*", PUSH_PULL)]),
    ));
    let reply = elsewhere
        .upload(&f.path.info("neg"), &f.path.nar, InfoIn::Header)
        .await;
    assert_error(&reply, 403, Some("AccessError"));
    let reply = elsewhere.missing("neg", &[f.path.hash()]).await;
    assert_error(&reply, 403, Some("AccessError"));
    f.assert_nothing_left(f.path.hash()).await;
}

async fn refuses_oversized_preamble(deployment: Deployment) {
    let f = Refusal::start_with(
        deployment,
        Limits {
            max_preamble_size: 4096,
            ..Limits::default()
        },
    )
    .await;
    // Valid JSON padded past the cap with trailing whitespace.
    let mut info = serde_json::to_vec(&f.path.info("neg")).unwrap();
    info.resize(4097, b' ');
    let reply = f.api.upload_raw(&info, &f.path.nar, InfoIn::Preamble).await;
    assert_error(&reply, 400, None);
    // Just under the cap is accepted, so the cap is what refused it.
    info.truncate(4096);
    let (status, body) = f.api.upload_raw(&info, &f.path.nar, InfoIn::Preamble).await;
    assert_eq!(status, 200, "{body}");
    let cache = f.server.state.meta.cache("neg").await.unwrap();
    assert!(
        f.server
            .state
            .meta
            .nix_object(cache.id, f.path.hash())
            .await
            .unwrap()
            .is_some()
    );
}

/// `PUT /{cache}/nar/<filehash>.nar.zst` as `nix copy --to` sends it, with
/// the push token as Basic auth password (Nix's netrc) and `file_hash` in
/// the URL.
async fn put_nar(f: &Refusal, file_hash: &Sha256Hash, body: Vec<u8>) -> Reply {
    let token = f.api.token.clone().unwrap();
    Api::send(
        f.api
            .http
            .put(format!(
                "{}/neg/nar/{}.nar.zst",
                f.api.url,
                file_hash.to_nix32()
            ))
            .basic_auth("nix", Some(token))
            .header("content-type", "application/x-nix-nar")
            .body(body),
    )
    .await
}

#[track_caller]
fn assert_client_error(reply: &Reply) {
    let (status, body) = reply;
    assert!(status.is_client_error(), "{status}: {body}");
    assert!(body["error"].is_string(), "{status}: {body}");
}

async fn refuses_nar_put_with_wrong_file_hash(deployment: Deployment) {
    let f = Refusal::start(deployment).await;
    let compressed = zstd::encode_all(&f.path.nar[..], 3).unwrap();
    let reply = put_nar(&f, &Sha256Hash::of(&f.path.nar), compressed.clone()).await;
    assert_client_error(&reply);
    let reply = put_nar(&f, &Sha256Hash::of(b"other"), compressed).await;
    assert_client_error(&reply);
    f.assert_nothing_left(f.path.hash()).await;
}

async fn refuses_corrupt_zstd_nar_put(deployment: Deployment) {
    let f = Refusal::start(deployment).await;
    let compressed = zstd::encode_all(&f.path.nar[..], 3).unwrap();
    // A stream cut in half, and garbage after a valid zstd magic number;
    // each named by its true file hash.
    let truncated = compressed[..compressed.len() / 2].to_vec();
    let mut garbage = vec![0x28, 0xb5, 0x2f, 0xfd];
    garbage.extend(garret_store::testing::text(100_000, 5));
    for body in [truncated, garbage] {
        let reply = put_nar(&f, &Sha256Hash::of(&body), body).await;
        assert_client_error(&reply);
    }
    f.assert_nothing_left(f.path.hash()).await;
}
