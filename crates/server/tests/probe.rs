//! `garret probe`, the real binary, against a real server: it passes
//! against a healthy cache on both protocols, and fails with a reason an
//! operator can act on against a wrong expected key, a stopped server, a
//! read-only token, a cache that does not exist and a TLS mismatch. A bare
//! run finds the cache, key and token in nix.conf and its netrc.

mod common;

use std::path::Path;
use std::process::Output;

use common::{Deployment, TestServer, blocking, on_both};
use garret_nix::signing::SigningKey;
use garret_server::auth::Permission;
use serde_json::Value;

/// A server with the private cache `main`, signed by `key`.
struct Setup {
    server: TestServer,
    key: SigningKey,
    /// Pull, push and delete on `main`.
    push_token: String,
    /// Pull only on `main`.
    read_token: String,
    /// An empty home for the probe: no nix.conf, no netrc of the host's.
    home: tempfile::TempDir,
}

impl Setup {
    async fn start(deployment: Deployment) -> Self {
        let server = TestServer::start(deployment).await;
        let key = SigningKey::generate("main-1").unwrap();
        server.create_cache("main", false, &key).await;
        let push_token = server.token(&[(
            "main",
            Permission::PULL
                .union(Permission::PUSH)
                .union(Permission::DELETE),
        )]);
        let read_token = server.token(&[("main", Permission::PULL)]);
        Self {
            server,
            key,
            push_token,
            read_token,
            home: tempfile::tempdir().unwrap(),
        }
    }

    fn nix_url(&self, cache: &str) -> String {
        format!("{}/{cache}", self.server.url)
    }

    fn reapi_url(&self, instance: &str) -> String {
        format!(
            "grpc://{}/{instance}",
            self.server.url.trim_start_matches("http://")
        )
    }

    fn public_key(&self) -> String {
        self.key.verifying_key().to_string()
    }

    /// `garret probe` of `main` on both protocols with `token`, expecting
    /// the cache's own key, and `extra` flags.
    async fn probe_main(&self, token: &str, extra: &[&str]) -> Probed {
        let (nix, reapi, key) = (
            self.nix_url("main"),
            self.reapi_url("main"),
            self.public_key(),
        );
        let mut args = vec![
            "--nix",
            &nix,
            "--reapi",
            &reapi,
            "--token",
            token,
            "--public-key",
            &key,
        ];
        args.extend_from_slice(extra);
        self.probe(&args, &[]).await
    }

    /// `garret probe --json ARGS` with only the variables in `vars`.
    async fn probe(&self, args: &[&str], vars: &[(&str, &Path)]) -> Probed {
        probe(self.home.path(), args, vars).await
    }
}

/// The outcome of one `garret probe --json` run.
struct Probed {
    output: Output,
    report: Value,
}

impl Probed {
    fn code(&self) -> Option<i32> {
        self.output.status.code()
    }

    /// The status and detail of the check `name`.
    #[track_caller]
    fn check(&self, name: &str) -> (String, String) {
        let check = self.report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name} in {}", self.report));
        (
            check["status"].as_str().unwrap().to_owned(),
            check["detail"].as_str().unwrap().to_owned(),
        )
    }

    #[track_caller]
    fn assert_status(&self, name: &str, status: &str, detail_contains: &str) {
        let (got, detail) = self.check(name);
        assert_eq!(got, status, "{name}: {detail}");
        assert!(
            detail.contains(detail_contains),
            "{name}: {detail:?} lacks {detail_contains:?}"
        );
    }
}

/// Runs the binary with an environment of its own under `home`: no nix.conf
/// of the host's, no `ATTIC_*`, unless `vars` set them.
async fn probe(home: &Path, args: &[&str], vars: &[(&str, &Path)]) -> Probed {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_garret"));
    command
        .arg("probe")
        .arg("--json")
        .args(args)
        .env_clear()
        .env("HOME", home)
        .env("NIX_CONF_DIR", home)
        .env("XDG_CONFIG_DIRS", home)
        .env("GARRET_LOG", "warn");
    for (name, value) in vars {
        command.env(name, value);
    }
    let output = blocking(move || command.output().unwrap()).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    Probed { output, report }
}

on_both! {
    passes_against_a_running_server,
}

/// A push token: every check on both protocols passes, the Nix canary is
/// read back signed and deleted, and the exit code is 0.
async fn passes_against_a_running_server(deployment: Deployment) {
    let setup = Setup::start(deployment).await;
    let probed = setup.probe_main(&setup.push_token, &[]).await;
    assert_eq!(probed.code(), Some(0), "{}", probed.report);
    let checks = probed.report["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 12, "{}", probed.report);
    for check in checks {
        assert_eq!(check["status"], "PASS", "{check}");
    }
    probed.assert_status("nix.cache-info", "PASS", "StoreDir /nix/store, Priority 41");
    probed.assert_status("nix.public-key", "PASS", &setup.public_key());
    probed.assert_status(
        "nix.narinfo",
        "PASS",
        "-garret-probe-canary is signed by main-1",
    );
    probed.assert_status("nix.nar", "PASS", "NarHash matches");
    probed.assert_status("reapi.ac-miss", "PASS", "NOT_FOUND");

    // The canary is gone.
    let (_, uploaded) = probed.check("nix.canary-upload");
    let hash = &uploaded.split("/nix/store/").nth(1).unwrap()[..32];
    let narinfo = reqwest::Client::new()
        .get(format!("{}/main/{hash}.narinfo", setup.server.url))
        .bearer_auth(&setup.push_token)
        .send()
        .await
        .unwrap();
    assert_eq!(narinfo.status(), 404);
}

// The failure cases exercise the probe, not the storage underneath it, so
// they run on the embedded deployment only.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_expected_key_fails_the_key_and_the_signature() {
    let setup = Setup::start(Deployment::SqliteFs).await;
    let other = SigningKey::generate("other-1")
        .unwrap()
        .verifying_key()
        .to_string();
    let probed = setup
        .probe(
            &[
                "--nix",
                &setup.nix_url("main"),
                "--token",
                &setup.push_token,
                "--public-key",
                &other,
            ],
            &[],
        )
        .await;
    assert_eq!(probed.code(), Some(1), "{}", probed.report);
    probed.assert_status(
        "nix.public-key",
        "FAIL",
        &format!(
            "the cache's key is {}, but --public-key expects {other}",
            setup.public_key()
        ),
    );
    probed.assert_status("nix.narinfo", "FAIL", "verifies under other-1");
    assert!(String::from_utf8_lossy(&probed.output.stderr).contains("checks failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_is_connection_refused() {
    let home = tempfile::tempdir().unwrap();
    let address = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let probed = probe(
        home.path(),
        &[
            "--nix",
            &format!("http://{address}/main"),
            "--reapi",
            &format!("grpc://{address}/main"),
        ],
        &[],
    )
    .await;
    assert_eq!(probed.code(), Some(1), "{}", probed.report);
    probed.assert_status("nix.reach", "FAIL", "connection refused");
    probed.assert_status("nix.cache-info", "SKIP", "not reached");
    probed.assert_status("reapi.reach", "FAIL", "connection refused");
    probed.assert_status("reapi.capabilities", "SKIP", "not reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_fails_the_canaries_but_reads_a_known_path() {
    let setup = Setup::start(Deployment::SqliteFs).await;
    let probed = setup.probe_main(&setup.read_token, &[]).await;
    assert_eq!(probed.code(), Some(1), "{}", probed.report);
    for check in [
        "nix.reach",
        "nix.cache-info",
        "nix.public-key",
        "reapi.capabilities",
        "reapi.ac-miss",
    ] {
        probed.assert_status(check, "PASS", "");
    }
    probed.assert_status("nix.canary-upload", "FAIL", "may not push to cache `main`");
    probed.assert_status("nix.narinfo", "SKIP", "--path");
    probed.assert_status(
        "reapi.canary-cas",
        "FAIL",
        "may not push to instance `main`",
    );
    probed.assert_status("reapi.canary-ac", "SKIP", "");

    // With a path the cache holds, the read round trip runs on it instead.
    let mut nar = garret_nix::nar::NarWriter::new(Vec::new()).unwrap();
    nar.file(false, 6, &b"hello\n"[..]).unwrap();
    let base = "0123456789abcdfghijklmnpqrsvwxyz-hello";
    common::publish_nar(&setup.server.state, "main", base, nar.finish().unwrap()).await;
    let path = format!("/nix/store/{base}");
    let probed = setup
        .probe_main(&setup.read_token, &["--path", &path])
        .await;
    assert_eq!(probed.code(), Some(1), "{}", probed.report);
    probed.assert_status(
        "nix.narinfo",
        "PASS",
        &format!("{path} is signed by main-1"),
    );
    probed.assert_status("nix.nar", "PASS", "NarHash matches");
    probed.assert_status("nix.canary-cleanup", "SKIP", "no canary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_that_does_not_exist_is_named() {
    let setup = Setup::start(Deployment::SqliteFs).await;
    let admin = setup
        .server
        .token(&[("*", Permission::PULL.union(Permission::PUSH))]);
    let probed = setup
        .probe(
            &[
                "--nix",
                &setup.nix_url("nosuch"),
                "--reapi",
                &setup.reapi_url("nosuch"),
                "--token",
                &admin,
            ],
            &[],
        )
        .await;
    assert_eq!(probed.code(), Some(1), "{}", probed.report);
    probed.assert_status("nix.reach", "PASS", "");
    probed.assert_status("nix.cache-info", "FAIL", "no cache `nosuch`");
    probed.assert_status("nix.public-key", "SKIP", "did not answer");
    probed.assert_status(
        "reapi.capabilities",
        "FAIL",
        "no cache for instance `nosuch`",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_plain_server_is_a_tls_failure() {
    let setup = Setup::start(Deployment::SqliteFs).await;
    let address = setup.server.url.trim_start_matches("http://");
    let probed = setup
        .probe(
            &[
                "--nix",
                &format!("https://{address}/main"),
                "--reapi",
                &format!("grpcs://{address}/main"),
            ],
            &[],
        )
        .await;
    assert_eq!(probed.code(), Some(1), "{}", probed.report);
    probed.assert_status("nix.reach", "FAIL", "TLS handshake failed");
    probed.assert_status("reapi.reach", "FAIL", "TLS handshake failed");
}

/// A runner pod runs `garret probe` bare: the cache comes from the user's
/// nix.conf (`XDG_CONFIG_HOME`), the expected key from its
/// trusted-public-keys, and the token from the netrc beside the system
/// nix.conf (`NIX_CONF_DIR/netrc`, Nix's default `netrc-file`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_run_reads_nix_conf_and_netrc() {
    let setup = Setup::start(Deployment::SqliteFs).await;
    let config = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(config.path().join("nix")).unwrap();
    std::fs::write(
        config.path().join("nix/nix.conf"),
        format!(
            "substituters = https://cache.nixos.org {}\n\
             trusted-public-keys = cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY= {}\n",
            setup.nix_url("main"),
            setup.public_key()
        ),
    )
    .unwrap();
    std::fs::write(
        setup.home.path().join("netrc"),
        format!(
            "machine 127.0.0.1\nlogin garret\npassword {}\n",
            setup.push_token
        ),
    )
    .unwrap();
    let probed = setup
        .probe(&[], &[("XDG_CONFIG_HOME", config.path())])
        .await;
    assert_eq!(probed.code(), Some(0), "{}", probed.report);
    probed.assert_status("nix.reach", "PASS", "nix.conf's substituters");
    probed.assert_status("nix.public-key", "PASS", "nix.conf's trusted-public-keys");
    probed.assert_status("nix.canary-upload", "PASS", "-garret-probe-canary");
    probed.assert_status("nix.canary-cleanup", "PASS", "deleted");

    // Without any of it, there is nothing to probe: a usage error.
    let bare = tempfile::tempdir().unwrap();
    let probed = probe(bare.path(), &[], &[]).await;
    assert_eq!(probed.code(), Some(2));
    assert!(String::from_utf8_lossy(&probed.output.stderr).contains("nothing to probe"));
}
