//! `garret serve` as operators run it: the real binary, configured by file
//! and environment, against raw sockets and curl. First start, SIGTERM,
//! connection bounds (idle, half-open, shutdown), private data files, token
//! binding, the configured endpoints, and replicas that share one
//! database and one store.

mod common;

use std::io::{BufRead as _, Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine as _;
use garret_server::auth::{CacheNamePattern, Permission, TokenAuthority, TokenSpec};

/// A running `garret serve`, killed on drop if a test fails midway.
struct Server {
    child: Option<Child>,
    address: String,
    /// Its standard output, line by line (the first-start banner).
    stdout: mpsc::Receiver<String>,
    /// Its log (standard error) after the address line, line by line.
    log: mpsc::Receiver<String>,
}

impl Server {
    /// Starts the binary on a free port with `data_dir`, an optional config
    /// file and extra environment; returns once it logs its address.
    fn start(data_dir: &Path, config: Option<&Path>, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_garret"));
        command
            .arg("serve")
            .env("GARRET_DATA_DIR", data_dir)
            .env("GARRET_LISTEN", "127.0.0.1:0")
            .env("NO_COLOR", "1")
            .env_remove("GARRET_TOKEN_HS256_SECRET_BASE64")
            .env_remove("GARRET_TOKEN_RS256_PUBKEY_PEM")
            .env_remove("ATTIC_SERVER_TOKEN_HS256_SECRET_BASE64")
            .env_remove("ATTIC_SERVER_TOKEN_RS256_SECRET_BASE64")
            .env_remove("ATTIC_SERVER_TOKEN_RS256_PUBKEY_BASE64")
            .env_remove("GARRET_CONFIG")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        let mut child = command.spawn().unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        // `address=A` in text logs, `"address":"A"` in JSON ones.
        let address = lines
            .by_ref()
            .map(Result::unwrap)
            .find_map(|line| {
                let rest = line
                    .split("address=")
                    .nth(1)
                    .or_else(|| line.split("\"address\":\"").nth(1))?;
                Some(rest.split([' ', '"']).next().unwrap().to_owned())
            })
            .expect("serve logs its address");
        // Keep draining the log so the server never blocks on a full pipe.
        let (log_tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = log_tx.send(line);
            }
        });
        let (tx, stdout) = mpsc::channel();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            child: Some(child),
            address,
            stdout,
            log,
        }
    }

    /// The first log line after now that `wanted` accepts.
    fn log_line(&self, wanted: impl Fn(&str) -> bool) -> String {
        loop {
            let line = self
                .log
                .recv_timeout(Duration::from_secs(30))
                .expect("the awaited log line");
            if wanted(&line) {
                return line;
            }
        }
    }

    /// The admin token a first start prints.
    fn admin_token(&self) -> String {
        loop {
            let line = self
                .stdout
                .recv_timeout(Duration::from_secs(30))
                .expect("the first start prints an admin token");
            if line.starts_with("ey") {
                return line.trim().to_owned();
            }
        }
    }

    /// Kills the process outright (SIGKILL), as a crashed node would.
    fn kill_hard(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends SIGTERM and waits at most `bound` for a clean exit.
    fn stop_within(&mut self, bound: Duration) {
        let mut child = self.child.take().unwrap();
        let pid = child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let status = child.wait().unwrap();
            let _ = tx.send(status);
        });
        let Ok(status) = rx.recv_timeout(bound) else {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            panic!("garret did not stop within {bound:?} of SIGTERM");
        };
        assert!(status.success(), "SIGTERM is a clean stop: {status}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.to_owned(), body.to_owned())
}

/// Creates the private cache `cache` through the Attic API with `token`;
/// returns the HTTP status and body.
fn create_cache(server: &Server, token: &str, cache: &str) -> (String, String) {
    curl(&[
        "-X",
        "POST",
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-d",
        r#"{"keypair":"Generate","is_public":false}"#,
        &format!("http://{}/_api/v1/cache-config/{cache}", server.address),
    ])
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn write_config(dir: &Path, toml: &str) -> std::path::PathBuf {
    let path = dir.join("garret.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// Reads until the server closes the connection; fails after `bound`.
fn assert_closed_by_server(mut stream: TcpStream, bound: Duration, what: &str) {
    stream.set_read_timeout(Some(bound)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what}: the server kept the connection open ({e})"),
        }
    }
}

/// Many idle and half-open connections neither starve a real client nor
/// hold up SIGTERM beyond the shutdown timeout.
#[test]
fn idle_and_half_open_connections_do_not_block_clients_or_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[connections]\nheader_read_timeout_secs = 600\nkeepalive_idle_secs = 600\nshutdown_timeout_secs = 2\n",
    );
    let mut server = Server::start(&dir.path().join("data"), Some(&config), &[]);
    let mut held = Vec::new();
    for i in 0..300 {
        let mut stream = TcpStream::connect(&server.address).unwrap();
        match i % 3 {
            // Connected, silent.
            0 => {}
            // Half a request head.
            1 => stream
                .write_all(b"GET /main/nix-cache-info HTTP/1.1\r\nHost: x\r\n")
                .unwrap(),
            // A complete head promising a body that never comes.
            _ => stream
                .write_all(
                    b"PUT /_api/v1/upload-path HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",
                )
                .unwrap(),
        }
        held.push(stream);
    }
    let (status, body) = curl(&[&format!("http://{}/main/nix-cache-info", server.address)]);
    // Anonymous on a cache that does not exist: Attic's 401, answered.
    assert_eq!(status, "401", "a normal request is answered: {body}");
    assert!(body.contains("\"code\":401"), "{body}");
    // SIGTERM with all of them still open: the stop is bounded by the
    // 2 s shutdown timeout (the bound below leaves room for a slow CI).
    server.stop_within(Duration::from_secs(30));
    drop(held);
}

/// A connection that sends nothing, half a head, or only the HTTP/2
/// preface is closed by the server once its bound passes.
#[test]
fn silent_and_half_open_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[connections]\nheader_read_timeout_secs = 1\nkeepalive_idle_secs = 1\n",
    );
    let server = Server::start(&dir.path().join("data"), Some(&config), &[]);
    let cases: [(&str, &[u8]); 4] = [
        ("silent", b""),
        ("half a head", b"GET / HTTP/1.1\r\nHost: x\r\n"),
        ("one byte of the h2 preface", b"P"),
        ("the h2 preface alone", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ];
    let threads: Vec<_> = cases
        .into_iter()
        .map(|(what, bytes)| {
            let mut stream = TcpStream::connect(&server.address).unwrap();
            stream.write_all(bytes).unwrap();
            std::thread::spawn(move || {
                assert_closed_by_server(stream, Duration::from_secs(30), what);
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    // A keep-alive connection that goes quiet after a request is closed too.
    let mut stream = TcpStream::connect(&server.address).unwrap();
    stream
        .write_all(b"GET /main/nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_closed_by_server(stream, Duration::from_secs(30), "idle keep-alive");
}

/// The data directory and what garret writes in it are its user's alone,
/// also when an earlier version left them readable.
#[test]
fn data_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    // SQLite takes an empty file as an empty database.
    std::fs::write(data.join("garret.db"), b"").unwrap();
    std::fs::set_permissions(
        data.join("garret.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let server = Server::start(&data, None, &[]);
    let admin = server.admin_token();
    let auth = format!("Authorization: Bearer {admin}");
    let (status, body) = curl(&[
        "-X",
        "POST",
        "-H",
        &auth,
        "-d",
        r#"{"keypair":"Generate","is_public":true}"#,
        &format!("http://{}/_api/v1/cache-config/main", server.address),
    ]);
    assert_eq!(status, "200", "{body}");
    drop(server);

    assert_eq!(mode(&data), 0o700);
    let mut seen = 0;
    let mut stack = vec![data.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                assert_eq!(mode(&path), 0o700, "{}", path.display());
                stack.push(path);
            } else {
                assert_eq!(mode(&path) & 0o077, 0, "{}", path.display());
                seen += 1;
            }
        }
    }
    assert!(seen >= 2, "the database and the token secret at least");
    assert_eq!(mode(&data.join("garret.db")), 0o600);
    assert_eq!(mode(&data.join("token-secret")), 0o600);
}

/// `jwt.bound_issuer` / `bound_audiences` and the endpoints are
/// configuration: tokens for another issuer or audience are refused, and
/// cache-config names the configured URLs.
#[test]
fn token_binding_and_endpoints_are_configured() {
    let dir = tempfile::tempdir().unwrap();
    let secret = base64::engine::general_purpose::STANDARD
        .encode("garret serve tests: an HS256 secret of at least 32 bytes");
    let config = write_config(
        dir.path(),
        "api_endpoint = \"https://cache.honey.example/garret\"\n\
         [jwt]\nbound_issuer = \"honey\"\nbound_audiences = [\"garret\", \"attic\"]\n",
    );
    let server = Server::start(
        &dir.path().join("data"),
        Some(&config),
        &[("GARRET_TOKEN_HS256_SECRET_BASE64", &secret)],
    );
    let authority = TokenAuthority::hs256_base64(&secret).unwrap();
    let token = |iss: Option<&str>, aud: &[&str]| {
        let mut spec = TokenSpec::new("ci", Duration::from_hours(1));
        spec.grant(CacheNamePattern::new("*").unwrap(), Permission::ALL);
        spec.iss = iss.map(str::to_owned);
        spec.aud = aud.iter().map(|a| (*a).to_owned()).collect();
        authority.mint(&spec).unwrap()
    };
    let create = |token: &str, cache: &str| create_cache(&server, token, cache);
    for (iss, aud) in [
        (Some("evil"), &["garret"][..]),
        (None, &["garret"][..]),
        (Some("honey"), &["elsewhere"][..]),
        (Some("honey"), &[][..]),
    ] {
        let (status, body) = create(&token(iss, aud), "refused");
        assert_eq!(status, "401", "iss {iss:?} aud {aud:?}: {body}");
    }
    let good = token(Some("honey"), &["attic"]);
    let (status, body) = create(&good, "main");
    assert_eq!(status, "200", "{body}");

    let (status, body) = curl(&[
        "-H",
        &format!("Authorization: Bearer {good}"),
        &format!("http://{}/_api/v1/cache-config/main", server.address),
    ]);
    assert_eq!(status, "200", "{body}");
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        config["api_endpoint"],
        "https://cache.honey.example/garret/"
    );
    assert_eq!(
        config["substituter_endpoint"],
        "https://cache.honey.example/garret/main"
    );
}

/// A deployment adopted from Attic keeps its token secret in Attic's
/// variable: tokens already in runners' secrets work unchanged, and no
/// secret of garret's own is made.
#[test]
fn tokens_signed_with_attics_secret_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let secret = base64::engine::general_purpose::STANDARD
        .encode("attic's HS256 secret, as the attic-jwt-signing Secret holds it");
    let data = dir.path().join("data");
    let server = Server::start(
        &data,
        None,
        &[("ATTIC_SERVER_TOKEN_HS256_SECRET_BASE64", &secret)],
    );
    let mut spec = TokenSpec::new("runner", Duration::from_hours(1));
    spec.grant(CacheNamePattern::new("*").unwrap(), Permission::ALL);
    let token = TokenAuthority::hs256_base64(&secret)
        .unwrap()
        .mint(&spec)
        .unwrap();
    let (status, body) = create_cache(&server, &token, "main");
    assert_eq!(status, "200", "{body}");
    assert!(!data.join("token-secret").exists());
    // A token signed with another secret is anonymous: no permission.
    let other = TokenAuthority::hs256_base64(
        &base64::engine::general_purpose::STANDARD
            .encode("another HS256 secret, at least thirty-two bytes long"),
    )
    .unwrap()
    .mint(&spec)
    .unwrap();
    let (status, _) = create_cache(&server, &other, "refused");
    assert_eq!(status, "401");
}

#[test]
fn serves_a_cache_created_by_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let created = Command::new(env!("CARGO_BIN_EXE_garret"))
        .args(["cache", "create", "demo", "--public"])
        .env("GARRET_DATA_DIR", &data)
        .output()
        .unwrap();
    assert!(created.status.success());
    let server = Server::start(&data, None, &[]);
    let (status, body) = curl(&[&format!("http://{}/demo/nix-cache-info", server.address)]);
    assert_eq!(status, "200");
    assert_eq!(
        body,
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n"
    );
}

/// The first start creates the token secret and prints an admin token
/// once; a later start reuses the secret, so the token still works.
#[test]
fn first_start_prints_an_admin_token_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let body = r#"{"keypair":"Generate","is_public":false}"#;

    let mut server = Server::start(&data, None, &[]);
    let api = format!("http://{}/_api/v1/cache-config/fresh", server.address);
    let (status, _) = curl(&["-X", "POST", "-d", body, &api]);
    assert_eq!(status, "401", "strangers may not create caches");
    let admin = server.admin_token();
    // Bazel's default instance works at once: its private cache exists.
    let (status, config) = curl(&[
        "-H",
        &format!("Authorization: Bearer {admin}"),
        &format!("http://{}/_api/v1/cache-config/default", server.address),
    ]);
    assert_eq!(status, "200", "{config}");
    assert!(config.contains("\"is_public\":false"), "{config}");
    server.stop_within(Duration::from_mins(1));
    assert_eq!(mode(&data.join("token-secret")), 0o600);

    let mut server = Server::start(&data, None, &[]);
    let api = format!("http://{}/_api/v1/cache-config/fresh", server.address);
    let auth = format!("Authorization: Bearer {admin}");
    let (status, reply) = curl(&["-X", "POST", "-H", &auth, "-d", body, &api]);
    assert_eq!(status, "200", "{reply}");
    assert_eq!(curl(&["-H", &auth, &api]).0, "200");
    assert_eq!(curl(&[&api]).0, "401", "the new cache is private");
    server.stop_within(Duration::from_mins(1));
    let printed: Vec<String> = server.stdout.try_iter().collect();
    assert!(
        !printed.iter().any(|line| line.starts_with("ey")),
        "printed again: {printed:?}"
    );
}

/// Every request gets one access line in its span: id, method, path,
/// cache, token subject, status and sizes; plain text without colours
/// when the log is not a terminal, JSON lines when configured.
#[test]
fn each_request_gets_an_access_log_line() {
    for format in ["text", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(
            &dir.path().join("data"),
            None,
            &[("GARRET_LOG_FORMAT", format)],
        );
        let admin = server.admin_token();
        let (status, body) = curl(&[
            "-H",
            &format!("Authorization: Bearer {admin}"),
            &format!("http://{}/_api/v1/cache-config/default", server.address),
        ]);
        assert_eq!(status, "200", "{body}");
        let line = server.log_line(|line| line.contains("request done"));
        assert!(
            !line.contains('\u{1b}'),
            "no ANSI escapes in a pipe: {line:?}"
        );
        if format == "text" {
            for field in [
                "method=GET",
                "path=/_api/v1/cache-config/default",
                "cache=default",
                "subject=admin",
                "status=200",
                "bytes_out=",
                "duration_ms=",
            ] {
                assert!(line.contains(field), "{field} in {line}");
            }
            assert!(line.contains("request{id="), "{line}");
        } else {
            let json: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(json["target"], "garret::access", "{json}");
            assert_eq!(json["fields"]["status"], 200, "{json}");
            assert_eq!(json["span"]["cache"], "default", "{json}");
            assert_eq!(json["span"]["subject"], "admin", "{json}");
            assert_eq!(json["span"]["id"].as_str().unwrap().len(), 16, "{json}");
        }
    }
}

/// Two replicas of `garret serve` on one Postgres database and one chunk
/// directory, as Kubernetes runs them behind one Service.
struct Replicas {
    a: Server,
    b: Server,
    token: String,
    _dir: tempfile::TempDir,
}

impl Replicas {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let database = garret_meta::testing::PgCluster::shared()
            .fresh_database()
            .await;
        let secret = base64::engine::general_purpose::STANDARD
            .encode("garret replica tests: an HS256 secret of 32+ bytes");
        let chunks = dir.path().join("chunks");
        let env = [
            ("GARRET_DATABASE_URL", database.as_str()),
            ("GARRET_LOCAL_PATH", chunks.to_str().unwrap()),
            ("GARRET_TOKEN_HS256_SECRET_BASE64", secret.as_str()),
        ];
        // One after the other: the first creates Bazel's default cache.
        let a = Server::start(&dir.path().join("a"), None, &env);
        let b = Server::start(&dir.path().join("b"), None, &env);
        let mut spec = TokenSpec::new("ci", Duration::from_hours(1));
        spec.grant(CacheNamePattern::new("*").unwrap(), Permission::ALL);
        let token = TokenAuthority::hs256_base64(&secret)
            .unwrap()
            .mint(&spec)
            .unwrap();
        // With a configured key there is no first start, but a database
        // that never had Bazel's default cache gets it: creating it again
        // through the other replica finds it there.
        let (status, body) = create_cache(&b, &token, "default");
        assert_eq!(status, "400", "{body}");
        assert!(body.contains("CacheAlreadyExists"), "{body}");
        Self {
            a,
            b,
            token,
            _dir: dir,
        }
    }
}

async fn grpc(server: &Server) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{}", server.address))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// What `server` reports durable of upload `name`.
async fn committed(server: &Server, token: &str, name: &str) -> usize {
    use garret_proto::bytestream::QueryWriteStatusRequest;
    use garret_proto::bytestream::byte_stream_client::ByteStreamClient;
    let request = common::grpc::with_token(
        QueryWriteStatusRequest {
            resource_name: name.to_owned(),
        },
        token,
    );
    let status = ByteStreamClient::new(grpc(server).await)
        .query_write_status(request)
        .await
        .unwrap()
        .into_inner();
    usize::try_from(status.committed_size).unwrap()
}

/// Starts a Write of `data` on `server`, feeding it `data[..sent]` in
/// 1 MiB messages, then waits until `other` reports some of it durable.
/// Returns the open Write (its sender keeps the stream open) and what
/// `other` reports.
async fn write_partly(
    server: &Server,
    other: &Server,
    token: &str,
    name: &str,
    data: &[u8],
    sent: usize,
) -> (
    futures::channel::mpsc::Sender<garret_proto::bytestream::WriteRequest>,
    tokio::task::JoinHandle<
        Result<tonic::Response<garret_proto::bytestream::WriteResponse>, tonic::Status>,
    >,
    usize,
) {
    use futures::SinkExt as _;
    use garret_proto::bytestream::WriteRequest;
    use garret_proto::bytestream::byte_stream_client::ByteStreamClient;
    let (mut tx, rx) = futures::channel::mpsc::channel(4);
    let mut client = ByteStreamClient::new(grpc(server).await);
    let request = common::grpc::with_token(rx, token);
    let write = tokio::spawn(async move { client.write(request).await });
    for at in (0..sent).step_by(1 << 20) {
        let end = (at + (1 << 20)).min(sent);
        tx.send(WriteRequest {
            resource_name: if at == 0 {
                name.to_owned()
            } else {
                String::new()
            },
            write_offset: i64::try_from(at).unwrap(),
            finish_write: false,
            data: bytes::Bytes::copy_from_slice(&data[at..end]),
        })
        .await
        .unwrap_or_else(|_| panic!("the Write ended early: {:?}", write.is_finished()));
    }
    // The first replica records progress as it goes; the other sees it in
    // the shared database. Bounded wait for an asynchronous effect.
    let deadline = std::time::Instant::now() + Duration::from_mins(1);
    let held = loop {
        let held = committed(other, token, name).await;
        if held > 0 {
            break held;
        }
        assert!(std::time::Instant::now() < deadline, "no progress recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (tx, write, held)
}

/// Finishes upload `name` on `server` from `from`.
async fn write_rest(server: &Server, token: &str, name: &str, data: &[u8], from: usize) {
    use garret_proto::bytestream::WriteRequest;
    use garret_proto::bytestream::byte_stream_client::ByteStreamClient;
    let messages: Vec<WriteRequest> = (from..data.len())
        .step_by(1 << 20)
        .map(|at| {
            let end = (at + (1 << 20)).min(data.len());
            WriteRequest {
                resource_name: if at == from {
                    name.to_owned()
                } else {
                    String::new()
                },
                write_offset: i64::try_from(at).unwrap(),
                finish_write: end == data.len(),
                data: bytes::Bytes::copy_from_slice(&data[at..end]),
            }
        })
        .collect();
    let request = common::grpc::with_token(futures::stream::iter(messages), token);
    let response = ByteStreamClient::new(grpc(server).await)
        .write(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        usize::try_from(response.committed_size).unwrap(),
        data.len()
    );
}

/// The blob `digest` as `server` serves it.
async fn read_back(server: &Server, token: &str, data: &[u8]) -> Vec<u8> {
    use garret_proto::bytestream::ReadRequest;
    use garret_proto::bytestream::byte_stream_client::ByteStreamClient;
    let d = common::grpc::digest(data);
    let request = common::grpc::with_token(
        ReadRequest {
            resource_name: format!("blobs/{}/{}", d.hash, d.size_bytes),
            ..Default::default()
        },
        token,
    );
    let mut stream = ByteStreamClient::new(grpc(server).await)
        .read(request)
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::with_capacity(data.len());
    while let Some(piece) = stream.message().await.unwrap() {
        out.extend_from_slice(&piece.data);
    }
    out
}

/// 40 MiB that do not compress, so chunks and records are real work.
fn blob() -> Vec<u8> {
    garret_store::testing::noise(40 << 20, 0x9e37_79b9_7f4a_7c15)
}

/// A ByteStream Write that starts on one replica continues on the other:
/// QueryWriteStatus there reports the durable offset, the Write completes
/// there, and the blob reads back intact from both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_moves_between_replicas() {
    let r = Replicas::start().await;
    let data = blob();
    let d = common::grpc::digest(&data);
    let name = format!("uploads/moved/blobs/{}/{}", d.hash, d.size_bytes);
    let (tx, write, _) = write_partly(&r.a, &r.b, &r.token, &name, &data, 36 << 20).await;
    // The client goes away mid-stream: the first replica records what it
    // had cut and says so.
    drop(tx);
    let status = write.await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let held = committed(&r.b, &r.token, &name).await;
    assert!(held > 16 << 20 && held <= 36 << 20, "{held}");
    assert_eq!(committed(&r.a, &r.token, &name).await, held);
    write_rest(&r.b, &r.token, &name, &data, held).await;
    assert!(read_back(&r.a, &r.token, &data).await == data);
    assert!(read_back(&r.b, &r.token, &data).await == data);
}

/// As above, but the first replica dies (SIGKILL) mid-upload: the second
/// continues from its last record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_survives_its_replica() {
    let mut r = Replicas::start().await;
    let data = blob();
    let d = common::grpc::digest(&data);
    let name = format!("uploads/killed/blobs/{}/{}", d.hash, d.size_bytes);
    let (_tx, write, held) = write_partly(&r.a, &r.b, &r.token, &name, &data, 36 << 20).await;
    r.a.kill_hard();
    assert!(write.await.unwrap().is_err());
    let after = committed(&r.b, &r.token, &name).await;
    assert!(after >= held && after <= 36 << 20, "{after}");
    write_rest(&r.b, &r.token, &name, &data, after).await;
    assert!(read_back(&r.b, &r.token, &data).await == data);
}
