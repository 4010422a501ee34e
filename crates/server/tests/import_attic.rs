//! `garret import attic` run as an operator runs it: the real binary reads
//! a database with Attic's schema (`fixtures/attic-schema.sql`: Postgres, or
//! SQLite for the embedded deployment) and fetches store paths from a
//! binary cache served in the test (a second garret standing in for the old
//! Attic: it speaks the same substituter protocol), into a garret whose
//! caches are then read back over HTTP.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::{Deployment, TestServer, blocking, on_both, publish_nar, spawn_serve};
use garret_meta::NixObject;
use garret_meta::testing::PgCluster;
use garret_nix::Sha256Hash;
use garret_nix::narinfo::NarInfo;
use garret_nix::signing::SigningKey;
use garret_server::auth::Permission;
use garret_server::config::{Config, Limits, Storage};

on_both! {
    imports_caches_and_objects_resumably,
    a_killed_import_resumes,
}

/// The Attic database: the same SQL runs on either.
enum AtticDb {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl AtticDb {
    /// A fresh database with Attic's schema, and its URL.
    async fn create(deployment: Deployment, dir: &std::path::Path) -> (Self, String) {
        let (db, url) = match deployment {
            Deployment::PostgresS3 => {
                let url = PgCluster::shared().fresh_database().await;
                (
                    Self::Postgres(sqlx::PgPool::connect(&url).await.unwrap()),
                    url,
                )
            }
            Deployment::SqliteFs => {
                let url = format!("sqlite:{}", dir.join("attic.db").display());
                let options = url
                    .parse::<sqlx::sqlite::SqliteConnectOptions>()
                    .unwrap()
                    .create_if_missing(true);
                let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
                (Self::Sqlite(pool), url)
            }
        };
        db.run(include_str!("fixtures/attic-schema.sql")).await;
        (db, url)
    }

    async fn run(&self, sql: &str) {
        match self {
            Self::Postgres(pool) => {
                sqlx::raw_sql(sql).execute(pool).await.unwrap();
            }
            Self::Sqlite(pool) => {
                sqlx::raw_sql(sql).execute(pool).await.unwrap();
            }
        }
    }

    async fn cache(&self, id: i64, name: &str, settings: &str, key: &SigningKey) {
        let sql = format!(
            "INSERT INTO cache (id, name, keypair, store_dir, created_at, is_public, priority, \
             upstream_cache_key_names, retention_period, deleted_at) \
             VALUES ({id}, '{name}', '{}', '/nix/store', '2024-01-01 00:00:00+00', {settings})",
            key.to_secret_string()
        );
        self.run(&sql).await;
    }

    /// An object of cache `cache` on NAR row `id`, whose state is `state`.
    async fn object(&self, id: i64, cache: i64, path: &Path, state: char) {
        let json = |items: &[String]| serde_json::to_string(items).unwrap();
        let deriver = path
            .deriver
            .as_ref()
            .map_or("NULL".to_owned(), |d| format!("'{d}'"));
        let sql = format!(
            "INSERT INTO nar (id, state, nar_hash, nar_size, compression, num_chunks, \
             holders_count, created_at) VALUES ({id}, '{state}', 'sha256:{}', {}, 'zstd', 1, 0, \
             '2024-01-01 00:00:00+00');
             INSERT INTO object (id, cache_id, nar_id, store_path_hash, store_path, \"references\", \
             system, deriver, sigs, ca, created_at) VALUES ({id}, {cache}, {id}, '{}', \
             '/nix/store/{}', '{}', 'x86_64-linux', {deriver}, '{}', NULL, '2024-01-01 00:00:00+00');",
            path.nar_hash.to_hex(),
            path.nar.len(),
            &path.base[..32],
            path.base,
            json(&path.references),
            json(&path.sigs),
        );
        self.run(&sql).await;
    }
}

/// A store path the old server serves.
struct Path {
    base: String,
    nar: Vec<u8>,
    nar_hash: Sha256Hash,
    references: Vec<String>,
    deriver: Option<String>,
    sigs: Vec<String>,
}

impl Path {
    fn new(hash_char: char, name: &str, contents: &str, references: Vec<String>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, contents.repeat(2000)).unwrap();
        let mut nar = Vec::new();
        garret_nix::nar::dump_path(&file, &mut nar).unwrap();
        let hash = hash_char.to_string().repeat(32);
        Self {
            base: format!("{hash}-{name}"),
            nar_hash: Sha256Hash::of(&nar),
            nar,
            references,
            deriver: Some(format!("{}-{name}.drv", "d".repeat(32))),
            sigs: vec![format!("upstream-1:{}", "A".repeat(86) + "==")],
        }
    }

    fn hash(&self) -> &str {
        &self.base[..32]
    }
}

/// `garret import attic` against the garret whose configuration `config`
/// was; returns whether it succeeded and its JSON report.
async fn import(config: &Config, args: &[&str]) -> (bool, serde_json::Value) {
    let mut command = import_command(config, args);
    let out = blocking(move || command.output().unwrap()).await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

/// The `garret import attic --json` process for the garret whose
/// configuration `config` was.
fn import_command(config: &Config, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_garret"));
    command
        .args(["import", "attic", "--json"])
        .args(args)
        .env_remove("GARRET_CONFIG")
        .env_remove("GARRET_TOKEN_HS256_SECRET_BASE64")
        .env_remove("GARRET_TOKEN_RS256_PUBKEY_PEM")
        // Attic's token secret, which the old server also verifies with:
        // without --token, the import signs its own pull token with it.
        .env(
            "ATTIC_SERVER_TOKEN_HS256_SECRET_BASE64",
            common::TEST_SECRET_BASE64,
        )
        .env("GARRET_DATA_DIR", &config.data_dir);
    if let Some(url) = &config.database_url {
        command.env("GARRET_DATABASE_URL", url);
    }
    if let Storage::S3(s3) = &config.storage {
        command
            .env("GARRET_STORAGE", "s3")
            .env("GARRET_S3_ENDPOINT", s3.endpoint.as_deref().unwrap())
            .env("GARRET_S3_REGION", &s3.region)
            .env("GARRET_S3_BUCKET", &s3.bucket)
            .env("GARRET_S3_PREFIX", &s3.prefix)
            .env("AWS_ACCESS_KEY_ID", s3.access_key_id.as_deref().unwrap())
            .env(
                "AWS_SECRET_ACCESS_KEY",
                s3.secret_access_key.as_deref().unwrap(),
            );
    }
    command
}

/// The report of cache `name`.
fn cache_report<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["caches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {report}"))
}

async fn get(url: &str, token: Option<&str>) -> (reqwest::StatusCode, bytes::Bytes) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status(), response.bytes().await.unwrap())
}

/// Checks that `server` serves `path` in `cache` as Attic's database
/// describes it, signed by `key`, with the very NAR.
async fn assert_served(
    server: &TestServer,
    token: &str,
    cache: &str,
    path: &Path,
    key: &SigningKey,
) {
    let url = format!("{}/{cache}/{}.narinfo", server.url, path.hash());
    let (status, body) = get(&url, Some(token)).await;
    assert_eq!(status, 200, "{url}");
    let narinfo = NarInfo::parse(std::str::from_utf8(&body).unwrap(), "/nix/store").unwrap();
    assert_eq!(narinfo.nar_hash, path.nar_hash);
    assert_eq!(narinfo.nar_size, path.nar.len() as u64);
    let references: Vec<String> = narinfo.references.iter().map(ToString::to_string).collect();
    assert_eq!(references, path.references);
    assert_eq!(
        narinfo.deriver.as_ref().map(ToString::to_string),
        path.deriver
    );
    assert!(narinfo.signatures.contains(&path.sigs[0]));
    assert!(narinfo.has_valid_signature(&[key.verifying_key()], "/nix/store"));
    let (status, file) = get(
        &format!("{}/{cache}/{}", server.url, narinfo.url),
        Some(token),
    )
    .await;
    assert_eq!(status, 200);
    let nar = match narinfo.compression.as_str() {
        "zstd" => zstd::decode_all(&file[..]).unwrap(),
        "none" => file.to_vec(),
        other => panic!("unexpected Compression {other}"),
    };
    assert_eq!(Sha256Hash::of(&nar), path.nar_hash);
}

/// Serves `path` from the old server, as Attic would.
async fn serve_old(old: &TestServer, cache: &str, path: &Path) {
    publish_nar(&old.state, cache, &path.base, path.nar.clone()).await;
}

async fn imports_caches_and_objects_resumably(deployment: Deployment) {
    let s = Scenario::set_up(deployment).await;

    // A dry run changes nothing.
    let (ok, report) = s.import(&["--dry-run"]).await;
    assert!(ok, "{report}");
    let main = cache_report(&report, "main");
    assert_eq!(main["outcome"]["kind"], "would_create");
    assert_eq!(main["objects"]["missing"], 4);
    assert_eq!(s.cache_config("main").await.0, 404);

    s.first_run_imports_what_it_can().await;
    s.caches_are_as_attic_had_them().await;

    // Valid objects are served as they were; pending and refused ones are not.
    s.assert_served("main", &s.lib, &s.main_key).await;
    s.assert_served("main", &s.app, &s.main_key).await;
    s.assert_served("private", &s.secret, &s.private_key).await;
    for path in [&s.late, &s.corrupt, &s.pending] {
        let url = format!("{}/main/{}.narinfo", s.new.url, path.hash());
        assert_eq!(get(&url, Some(&s.admin)).await.0, 404, "{}", path.base);
    }

    // Once the substituter serves them, a second run fetches only those.
    serve_old(&s.old, "main", &s.late).await;
    serve_old(&s.old, "main", &s.corrupt).await;
    let (ok, report) = s.import(&[]).await;
    assert!(ok, "{report}");
    let main = cache_report(&report, "main");
    assert_eq!(main["outcome"]["kind"], "existing");
    assert_eq!(
        (&main["objects"]["missing"], &main["objects"]["imported"]),
        (&2.into(), &2.into()),
        "{main}"
    );
    s.assert_served("main", &s.late, &s.main_key).await;
    s.assert_served("main", &s.corrupt, &s.main_key).await;

    // A third imports nothing.
    let (ok, report) = s.import(&[]).await;
    assert!(ok, "{report}");
    for cache in ["main", "private"] {
        let missing = &cache_report(&report, cache)["objects"]["missing"];
        assert_eq!(missing, 0, "{report}");
    }

    s.a_cache_with_another_key_is_refused().await;
}

/// An import killed midway (SIGKILL, while one path's narinfo hangs) keeps
/// what it committed, and the next run fetches only the rest.
async fn a_killed_import_resumes(deployment: Deployment) {
    let s = Scenario::set_up(deployment).await;
    let app_narinfo = format!("/main/{}.narinfo", s.app.hash());
    s.proxy.hang(Some(app_narinfo.clone()));
    let mut command = import_command(
        &s.config,
        &[
            "--database-url",
            &s.attic_url,
            "--objects",
            &s.proxy.url,
            "--token",
            &s.puller,
            "--cache",
            "main",
        ],
    );
    let mut child = command.spawn().unwrap();
    // Bounded wait for the child's progress: lib stored, app's narinfo asked.
    let deadline = std::time::Instant::now() + std::time::Duration::from_mins(1);
    let lib_url = format!("{}/main/{}.narinfo", s.new.url, s.lib.hash());
    while get(&lib_url, Some(&s.admin)).await.0 != 200 || s.proxy.requests(&app_narinfo) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the import neither stored lib nor reached app within a minute"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    blocking(move || child.wait().unwrap()).await;
    let given = std::collections::HashSet::from([format!("Bearer {}", s.puller)]);
    assert_eq!(s.proxy.authorizations(), given, "--token is what is sent");
    let app_url = format!("{}/main/{}.narinfo", s.new.url, s.app.hash());
    assert_eq!(get(&app_url, Some(&s.admin)).await.0, 404);

    s.proxy.hang(None);
    let (_, report) = s.import(&["--cache", "main"]).await;
    let objects = &cache_report(&report, "main")["objects"];
    // lib is kept; app is fetched now; late and corrupt fail as ever.
    assert_eq!(
        (&objects["missing"], &objects["imported"]),
        (&3.into(), &1.into()),
        "{objects}"
    );
    s.assert_served("main", &s.lib, &s.main_key).await;
    s.assert_served("main", &s.app, &s.main_key).await;
}

/// Attic's database, the old server that serves its paths, and the new
/// garret they are imported into.
struct Scenario {
    old: TestServer,
    /// The substituter the import reads: the old server, behind a proxy.
    proxy: FlakyProxy,
    new: TestServer,
    /// The new garret's configuration, for the `import` process.
    config: Config,
    attic_url: String,
    /// A token of the new garret that may do everything.
    admin: String,
    /// A token of the old server that may pull every cache.
    puller: String,
    main_key: SigningKey,
    private_key: SigningKey,
    lib: Path,
    app: Path,
    /// Not served by the old server at first.
    late: Path,
    /// Served with another NAR at first.
    corrupt: Path,
    /// Its NAR is still being uploaded (state `P`).
    pending: Path,
    /// In the private cache.
    secret: Path,
    _dir: tempfile::TempDir,
}

impl Scenario {
    async fn set_up(deployment: Deployment) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let old = TestServer::start(Deployment::SqliteFs).await;
        let mut config = None;
        let new = TestServer::start_configured(deployment, |c| config = Some(c.clone())).await;
        let (attic, attic_url) = AtticDb::create(deployment, dir.path()).await;

        // Attic's caches: a public one, a private one, and a soft-deleted
        // one that must be skipped. The old server signs with the same keys.
        let main_key = SigningKey::generate("main-1").unwrap();
        let private_key = SigningKey::generate("private-1").unwrap();
        let gone_key = SigningKey::generate("gone-1").unwrap();
        let main_settings = "true, 30, '[\"cache.nixos.org-1\"]', 86400, NULL";
        attic.cache(1, "main", main_settings, &main_key).await;
        let private_settings = "false, 41, '[]', NULL, NULL";
        attic
            .cache(2, "private", private_settings, &private_key)
            .await;
        let gone_settings = "true, 41, '[]', NULL, '2024-02-01 00:00:00+00'";
        attic.cache(3, "gone", gone_settings, &gone_key).await;
        old.create_cache("main", true, &main_key).await;
        old.create_cache("private", false, &private_key).await;

        let lib = Path::new('a', "lib", "lib", vec![]);
        let app = Path::new('b', "app", "app", vec![lib.base.clone()]);
        let late = Path::new('c', "late", "late", vec![]);
        let corrupt = Path::new('f', "corrupt", "corrupt", vec![]);
        let pending = Path::new('g', "pending", "pending", vec![]);
        let secret = Path::new('h', "secret", "secret", vec![]);
        let deleted = Path::new('i', "deleted", "deleted", vec![]);
        for (id, cache, path, state) in [
            (1, 1, &lib, 'V'),
            (2, 1, &app, 'V'),
            (3, 1, &late, 'V'),
            (4, 1, &corrupt, 'V'),
            (5, 1, &pending, 'P'),
            (6, 2, &secret, 'V'),
            (7, 3, &deleted, 'V'),
        ] {
            attic.object(id, cache, path, state).await;
        }
        for path in [&lib, &app] {
            serve_old(&old, "main", path).await;
        }
        serve_old(&old, "private", &secret).await;
        let other = Path::new('f', "corrupt", "tpurroc", vec![]);
        store_lying(&old, "main", &corrupt, other.nar).await;
        Self {
            proxy: FlakyProxy::start(old.url.clone()).await,
            admin: new.token(&[("*", Permission::ALL)]),
            puller: old.token(&[("*", Permission::PULL)]),
            old,
            new,
            config: config.unwrap(),
            attic_url,
            main_key,
            private_key,
            lib,
            app,
            late,
            corrupt,
            pending,
            secret,
            _dir: dir,
        }
    }

    /// `garret import attic` of every cache with their objects, with the
    /// pull token it mints itself.
    async fn import(&self, extra: &[&str]) -> (bool, serde_json::Value) {
        let args = [
            "--database-url",
            &self.attic_url,
            "--objects",
            &self.proxy.url,
        ];
        import(&self.config, &[&args[..], extra].concat()).await
    }

    /// `cache-config` of the new garret's cache `name`.
    async fn cache_config(&self, name: &str) -> (reqwest::StatusCode, serde_json::Value) {
        let url = format!("{}/_api/v1/cache-config/{name}", self.new.url);
        let (status, body) = get(&url, Some(&self.admin)).await;
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }

    async fn assert_served(&self, cache: &str, path: &Path, key: &SigningKey) {
        assert_served(&self.new, &self.admin, cache, path, key).await;
    }

    /// The first run imports what it can and reports the rest: `late` is
    /// not served yet (as if the substituter failed for it), and `corrupt`
    /// comes with a NAR that does not match its NarHash.
    async fn first_run_imports_what_it_can(&self) {
        let (ok, report) = self.import(&[]).await;
        assert!(!ok, "{report}");
        assert_eq!(report["caches"].as_array().unwrap().len(), 2, "{report}");
        let main = cache_report(&report, "main");
        assert_eq!(main["outcome"]["kind"], "created");
        assert_eq!(
            main["public_key"],
            self.main_key.verifying_key().to_string()
        );
        let objects = &main["objects"];
        assert_eq!(
            (&objects["valid"], &objects["imported"], &objects["failed"]),
            (&4.into(), &2.into(), &2.into()),
            "{main}"
        );
        let failures = objects["failures"].to_string();
        assert!(
            failures.contains(&self.late.base) && failures.contains("404"),
            "{failures}"
        );
        assert!(
            failures.contains(&self.corrupt.base) && failures.contains("hash mismatch"),
            "{failures}"
        );
        // The private cache's path came with the token the import signed
        // with Attic's secret: one token, not the test's own.
        assert_eq!(cache_report(&report, "private")["objects"]["imported"], 1);
        let tokens = self.proxy.authorizations();
        assert_eq!(tokens.len(), 1, "{tokens:?}");
        assert!(!tokens.contains(&format!("Bearer {}", self.puller)));
        // Every narinfo failed once with a 503 and was asked for again;
        // the 404 and the corrupt NAR were not retried.
        for path in [&self.lib, &self.app, &self.late, &self.corrupt] {
            let narinfo = format!("/main/{}.narinfo", path.hash());
            assert_eq!(self.proxy.requests(&narinfo), 2, "{narinfo}");
        }
        let nars: u32 = self
            .proxy
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(path, _)| path.starts_with("/main/nar/"))
            .map(|(_, count)| count)
            .sum();
        assert_eq!(nars, 3, "one NAR each for lib, app and corrupt");
    }

    /// The caches' settings as Attic had them, with the same keys; the
    /// soft-deleted one is not imported.
    async fn caches_are_as_attic_had_them(&self) {
        let (status, main) = self.cache_config("main").await;
        assert_eq!(status, 200);
        assert_eq!(
            main["public_key"],
            self.main_key.verifying_key().to_string()
        );
        assert_eq!(main["is_public"], true);
        assert_eq!(main["priority"], 30);
        assert_eq!(
            main["upstream_cache_key_names"],
            serde_json::json!(["cache.nixos.org-1"])
        );
        assert_eq!(
            main["retention_period"],
            serde_json::json!({"Period": 86400})
        );
        let (_, private) = self.cache_config("private").await;
        assert_eq!(
            private["public_key"],
            self.private_key.verifying_key().to_string()
        );
        assert_eq!(private["is_public"], false);
        assert_eq!(private["retention_period"], "Global");
        assert_eq!(self.cache_config("gone").await.0, 404);
    }

    /// A garret cache of the same name with another key is refused, and
    /// keeps its key.
    async fn a_cache_with_another_key_is_refused(&self) {
        let other = SigningKey::generate("other-1").unwrap();
        self.new
            .state
            .meta
            .delete_cache("private", 0)
            .await
            .unwrap();
        self.new.create_cache("private", false, &other).await;
        let args = ["--database-url", &self.attic_url, "--cache", "private"];
        let (ok, report) = import(&self.config, &args).await;
        assert!(!ok, "{report}");
        let refused = &cache_report(&report, "private")["outcome"];
        assert_eq!(refused["kind"], "refused");
        let reason = refused["reason"].as_str().unwrap();
        assert!(reason.contains("another public key"), "{refused}");
        let (_, private) = self.cache_config("private").await;
        assert_eq!(private["public_key"], other.verifying_key().to_string());
    }
}

/// Stands between the import and the old server as a flaky network would:
/// the first request for each narinfo gets a 503, and every request is
/// counted by path.
struct FlakyProxy {
    url: String,
    requests: Arc<Mutex<HashMap<String, u32>>>,
    /// Every `Authorization` header value forwarded.
    authorizations: Arc<Mutex<std::collections::HashSet<String>>>,
    /// A path whose requests never get an answer while set.
    hanging: Arc<Mutex<Option<String>>>,
}

impl FlakyProxy {
    async fn start(target: String) -> Self {
        let requests = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
        let hanging = Arc::new(Mutex::new(None::<String>));
        let authorizations = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let (counts, hang, auths) = (
            Arc::clone(&requests),
            Arc::clone(&hanging),
            Arc::clone(&authorizations),
        );
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: axum::http::HeaderMap| {
                let (counts, hang, auths, target) = (
                    Arc::clone(&counts),
                    Arc::clone(&hang),
                    Arc::clone(&auths),
                    target.clone(),
                );
                async move {
                    let path = uri.path().to_owned();
                    let seen = {
                        let mut counts = counts.lock().unwrap();
                        let count = counts.entry(path.clone()).or_default();
                        *count += 1;
                        *count
                    };
                    if hang.lock().unwrap().as_deref() == Some(path.as_str()) {
                        std::future::pending::<()>().await;
                    }
                    if seen == 1 && path.ends_with(".narinfo") {
                        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, Vec::new());
                    }
                    let mut request = reqwest::Client::new().get(format!("{target}{path}"));
                    if let Some(auth) = headers.get("authorization") {
                        auths
                            .lock()
                            .unwrap()
                            .insert(auth.to_str().unwrap().to_owned());
                        request = request.header("authorization", auth.as_bytes());
                    }
                    let response = request.send().await.unwrap();
                    let status = axum::http::StatusCode::from_u16(response.status().as_u16());
                    (status.unwrap(), response.bytes().await.unwrap().to_vec())
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        spawn_serve(
            listener,
            app,
            garret_server::metrics::Metrics::new(),
            &Limits::default(),
        );
        Self {
            url,
            requests,
            authorizations,
            hanging,
        }
    }

    /// The `Authorization` headers forwarded so far.
    fn authorizations(&self) -> std::collections::HashSet<String> {
        self.authorizations.lock().unwrap().clone()
    }

    /// Requests for `path` hang from now on, or (`None`) are answered again.
    fn hang(&self, path: Option<String>) {
        *self.hanging.lock().unwrap() = path;
    }

    /// How many requests for `path` arrived.
    fn requests(&self, path: &str) -> u32 {
        self.requests
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

/// Makes the old server serve `nar` as `path`'s NAR while its narinfo
/// claims `path`'s NarHash and NarSize: a corrupted substituter.
async fn store_lying(old: &TestServer, cache: &str, path: &Path, nar: Vec<u8>) {
    assert_eq!(nar.len(), path.nar.len());
    let blob = old
        .state
        .blobs
        .put(
            futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(nar))]),
            garret_server::blobs::Expect::default(),
        )
        .await
        .unwrap();
    let cache = old.state.meta.cache(cache).await.unwrap();
    let object = NixObject {
        store_path_hash: path.hash().to_owned(),
        store_path: path.base.clone(),
        blob_id: blob.id,
        nar_hash: *path.nar_hash.as_bytes(),
        nar_size: path.nar.len() as u64,
        references: vec![],
        deriver: None,
        sigs: vec![],
        ca: None,
        system: None,
    };
    old.state
        .meta
        .upsert_nix_object(cache.id, &object, 0)
        .await
        .unwrap();
}
