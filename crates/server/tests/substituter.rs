//! The substituter side served to the real Nix 2.8 client: a NAR stored
//! through the chunk store is substituted by `nix copy --from http://…`
//! with signatures required, and the HTTP edges behave as Nix expects.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use garret_nix::StorePathHash;
use garret_nix::signing::SigningKey;
use garret_server::state::AppState;
use garret_store::ObjectStore;

mod common;

use common::{Deployment, TestServer};

struct Server {
    url: String,
    state: Arc<AppState>,
    cache_key: SigningKey,
    _running: TestServer,
}

async fn start() -> Server {
    let server = TestServer::start(Deployment::SqliteFs).await;
    let cache_key = SigningKey::generate("demo-1").unwrap();
    for (name, public) in [("demo", true), ("private", false)] {
        server.create_cache(name, public, &cache_key).await;
    }
    Server {
        url: server.url.clone(),
        state: Arc::clone(&server.state),
        cache_key,
        _running: server,
    }
}

/// Stores `tree` as the NAR of an invented input-addressed store path.
async fn publish(server: &Server, cache: &str, tree: &Path, hash_seed: u8) -> String {
    let mut nar = Vec::new();
    garret_nix::nar::dump_path(tree, &mut nar).unwrap();
    let hash = StorePathHash::from_bytes([hash_seed; 20]);
    let base = format!("{hash}-garret-demo");
    common::publish_nar(&server.state, cache, &base, nar).await;
    base
}

fn nix(args: &[&str], scratch: &Path, trusted_key: &str) -> Output {
    let conf = scratch.join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("nix.conf"),
        format!(
            "experimental-features = nix-command\nbuild-users-group =\nsandbox = false\nsubstituters =\nrequire-sigs = true\ntrusted-public-keys = {trusted_key}\n"
        ),
    )
    .unwrap();
    Command::new("nix")
        .args(args)
        .env("NIX_CONF_DIR", &conf)
        .env("NIX_STATE_DIR", scratch.join("state"))
        .env("NIX_LOG_DIR", scratch.join("log"))
        .env("XDG_CACHE_HOME", scratch.join("cache"))
        .env("HOME", scratch)
        .output()
        .unwrap_or_else(|e| panic!("nix is required (./tests/run installs nix-bin): {e}"))
}

fn curl(args: &[&str]) -> (String, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-s", "-D", "-"])
        .args(args)
        .output()
        .unwrap();
    let text = out.stdout;
    let split = text.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    (
        String::from_utf8_lossy(&text[..split]).into_owned(),
        text[split..].to_vec(),
    )
}

fn tree(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("tree");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("bin/hello"), "#!/bin/sh\necho hello\n").unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(root.join("bin/hello"))
            .unwrap()
            .permissions(),
        0o755,
    );
    let big: Vec<u8> = garret_store::testing::text(3 << 20, 5);
    std::fs::write(root.join("data"), &big).unwrap();
    std::os::unix::fs::symlink("bin/hello", root.join("link")).unwrap();
    root
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nix_substitutes_with_required_signatures() {
    let server = start().await;
    let work = tempfile::tempdir().unwrap();
    let source = tree(work.path());
    let base = publish(&server, "demo", &source, 7).await;
    let path = format!("/nix/store/{base}");
    let from = format!("{}/demo", server.url);
    let pubkey = server.cache_key.verifying_key().to_string();

    let root = work.path().join("root");
    let (from2, path2, root2, pk2, scratch) = (
        from.clone(),
        path.clone(),
        root.clone(),
        pubkey.clone(),
        work.path().join("nix-ok"),
    );
    let out = tokio::task::spawn_blocking(move || {
        nix(
            &[
                "copy",
                "--from",
                &from2,
                "--to",
                &format!("local?root={}", root2.display()),
                &path2,
            ],
            &scratch,
            &pk2,
        )
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "nix copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = root.join(path.trim_start_matches('/'));
    assert_eq!(
        std::fs::read(restored.join("data")).unwrap(),
        std::fs::read(source.join("data")).unwrap()
    );
    assert_eq!(
        std::fs::read_link(restored.join("link")).unwrap(),
        Path::new("bin/hello")
    );

    // Signed by a key Nix does not trust: refused.
    let other = SigningKey::generate("other-1")
        .unwrap()
        .verifying_key()
        .to_string();
    let (root3, scratch) = (
        work.path().join("root-untrusted"),
        work.path().join("nix-untrusted"),
    );
    let out = tokio::task::spawn_blocking(move || {
        nix(
            &[
                "copy",
                "--from",
                &from,
                "--to",
                &format!("local?root={}", root3.display()),
                &path,
            ],
            &scratch,
            &other,
        )
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("signature"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_edges() {
    let server = start().await;
    let work = tempfile::tempdir().unwrap();
    let base = publish(&server, "demo", &tree(work.path()), 9).await;
    let hash = base[..32].to_owned();
    let url = server.url.clone();

    tokio::task::spawn_blocking(move || {
        let (head, body) = curl(&[&format!("{url}/demo/nix-cache-info")]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n"
        );

        let (head, narinfo) = curl(&[&format!("{url}/demo/{hash}.narinfo")]);
        assert!(head.contains("text/x-nix-narinfo"), "{head}");
        let narinfo = String::from_utf8(narinfo).unwrap();
        assert!(
            narinfo.contains("Compression: zstd\nFileHash: sha256:"),
            "{narinfo}"
        );
        let file_size: u64 = narinfo
            .lines()
            .find_map(|l| l.strip_prefix("FileSize: "))
            .unwrap()
            .parse()
            .unwrap();

        // Whole NAR: the stored frames, a valid zstd stream, with its length.
        let (head, whole) = curl(&[&format!("{url}/demo/nar/{hash}.nar")]);
        assert!(
            head.contains(&format!("content-length: {file_size}"))
                && head.contains("accept-ranges: bytes"),
            "{head}"
        );
        assert!(!head.to_lowercase().contains("content-encoding"));
        assert_eq!(whole.len() as u64, file_size);
        zstd::stream::decode_all(&whole[..]).unwrap();

        // A resumed download: 206 with exactly the missing tail.
        let (head, tail) = curl(&["-r", "1000-", &format!("{url}/demo/nar/{hash}.nar")]);
        assert!(head.starts_with("HTTP/1.1 206"), "{head}");
        assert!(
            head.contains(&format!(
                "content-range: bytes 1000-{}/{file_size}",
                file_size - 1
            )),
            "{head}"
        );
        assert_eq!(tail, &whole[1000..]);
        let (head, _) = curl(&[
            "-r",
            &format!("{file_size}-"),
            &format!("{url}/demo/nar/{hash}.nar"),
        ]);
        assert!(head.starts_with("HTTP/1.1 416"), "{head}");

        // Bad input: clear 4xx with Attic's JSON body.
        for (path, status, kind) in [
            ("/demo/notahash.narinfo".to_owned(), "400", "BadRequest"),
            (
                format!("/demo/{}.narinfo", "0".repeat(32)),
                "404",
                "NoSuchObject",
            ),
            (format!("/private/{hash}.narinfo"), "401", "Unauthorized"),
            (
                format!("/nosuchcache/{hash}.narinfo"),
                "401",
                "Unauthorized",
            ),
            (
                "/bad%20name/nix-cache-info".to_owned(),
                "400",
                "InvalidCacheName",
            ),
        ] {
            let (head, body) = curl(&[&format!("{url}{path}")]);
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status}")),
                "{path}: {head}"
            );
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["error"], kind, "{path}: {body}");
            assert_eq!(body["code"].as_u64().unwrap().to_string(), status);
        }
    })
    .await
    .unwrap();
}

/// A chunk gone from storage: 503 before any body byte, never a short 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_chunk_is_a_503() {
    let server = start().await;
    let work = tempfile::tempdir().unwrap();
    let base = publish(&server, "demo", &tree(work.path()), 11).await;
    let hash = base[..32].to_owned();
    let url = server.url.clone();
    let cache = server.state.meta.cache("demo").await.unwrap();
    let row = server
        .state
        .meta
        .nix_object(cache.id, &hash)
        .await
        .unwrap()
        .unwrap();
    let chunks = server
        .state
        .meta
        .blob_chunks(row.blob.id, None)
        .await
        .unwrap();
    let first = garret_server::blobs::chunk_ref(&chunks[0]).unwrap();
    server
        .state
        .blobs
        .store()
        .backend()
        .delete(&first.object_key())
        .await
        .unwrap();
    let (head, body) =
        tokio::task::spawn_blocking(move || curl(&[&format!("{url}/demo/nar/{hash}.nar")]))
            .await
            .unwrap();
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "IncompleteNar");
}
