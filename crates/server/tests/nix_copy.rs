//! Plain Nix uploads from the real Nix 2.8 client, on both deployments:
//! `nix copy --to http://…/cache?compression=zstd|xz|none` pushes a closure
//! built in a scratch store (flat files, a tree with symlinks and an
//! executable, a 64 MiB file, derivation outputs with references), and
//! `nix copy --from` brings it back into a fresh store with signatures
//! required: accepted under the cache's key, refused under another.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use garret_nix::Sha256Hash;
use garret_nix::signing::SigningKey;
use garret_server::auth::Permission;
use serde_json::Value;

mod common;

use common::{Deployment, Nix, TestServer, blocking, chroot_store, on_both};

on_both! {
    zstd_closure_round_trips,
    xz_and_none_round_trip,
    nix_copy_needs_push_permission,
}

const PUSH_PULL: Permission = Permission {
    push: true,
    pull: true,
    ..Permission::NONE
};

const BIG_LEN: usize = 64 << 20;

/// The store paths of a closure built in a scratch store.
#[derive(Clone, Debug)]
struct Closure {
    /// A derivation output referencing every other path and itself.
    top: String,
    /// A derivation output with no references.
    dep: String,
    flat: String,
    tree: String,
    big: Option<String>,
}

impl Closure {
    fn paths(&self) -> Vec<&str> {
        let mut paths = vec![&*self.top, &self.dep, &self.flat, &self.tree];
        paths.extend(self.big.as_deref());
        paths
    }
}

/// Builds the closure into the store rooted at `root`: `nix store add-path`
/// for the sources, `nix-build` of `builtins.derivation`s for the outputs.
fn build_closure(nix: &Nix, work: &Path, root: &Path, big: bool) -> Closure {
    let src = work.join("src");
    let tree = src.join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::create_dir_all(tree.join("share/doc")).unwrap();
    std::fs::create_dir_all(tree.join("empty")).unwrap();
    std::fs::write(tree.join("bin/hello"), "#!/bin/sh\necho hello\n").unwrap();
    std::fs::set_permissions(
        tree.join("bin/hello"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(tree.join("share/doc/README"), "garret nix copy\n").unwrap();
    std::fs::write(
        tree.join("share/data"),
        garret_store::testing::text(300_000, 21),
    )
    .unwrap();
    std::os::unix::fs::symlink("bin/hello", tree.join("link")).unwrap();
    std::os::unix::fs::symlink("../nowhere", tree.join("dangling")).unwrap();
    std::fs::write(src.join("flat.txt"), "a flat file\n").unwrap();

    let store = chroot_store(root);
    let add = |path: &Path| {
        nix.ok(
            "nix",
            &[
                "store",
                "add-path",
                "--store",
                &store,
                path.to_str().unwrap(),
            ],
        )
    };
    let flat = add(&src.join("flat.txt"));
    let tree = add(&tree);
    let big = big.then(|| {
        let file = src.join("big.bin");
        std::fs::write(&file, garret_store::testing::text(BIG_LEN, 64)).unwrap();
        add(&file)
    });

    let big_line = big.as_ref().map_or(String::new(), |b| {
        format!("echo ${{builtins.storePath \"{b}\"}} > $out/big; ")
    });
    let expression = format!(
        r#"let
  drv = name: script: builtins.derivation {{
    inherit name;
    builder = "/bin/sh";
    args = [ "-c" script ];
    system = builtins.currentSystem;
    PATH = "/usr/bin:/bin";
  }};
  flat = builtins.storePath "{flat}";
  tree = builtins.storePath "{tree}";
in rec {{
  dep = drv "garret-dep" "echo dependency > $out";
  top = drv "garret-top" ''
    mkdir -p $out/bin
    echo ${{dep}} > $out/dep
    echo ${{flat}} > $out/flat
    ln -s ${{tree}}/bin/hello $out/bin/hello
    echo $out > $out/self
    {big_line}
    printf '#!/bin/sh\necho top\n' > $out/bin/top
    chmod +x $out/bin/top
  '';
}}
"#
    );
    let file = src.join("closure.nix");
    std::fs::write(&file, expression).unwrap();
    let build = |attr: &str| {
        nix.ok(
            "nix-build",
            &[
                "--no-out-link",
                "--store",
                &store,
                file.to_str().unwrap(),
                "-A",
                attr,
            ],
        )
    };
    Closure {
        top: build("top"),
        dep: build("dep"),
        flat,
        tree,
        big,
    }
}

/// `nix path-info --json -r` as path → (narHash, narSize, references).
fn path_infos(nix: &Nix, store: &str, top: &str) -> BTreeMap<String, (Value, Value, Value)> {
    let out = nix.ok("nix", &["path-info", "--json", "-r", "--store", store, top]);
    let infos: Vec<Value> = serde_json::from_str(&out).unwrap();
    infos
        .into_iter()
        .map(|info| {
            (
                info["path"].as_str().unwrap().to_owned(),
                (
                    info["narHash"].clone(),
                    info["narSize"].clone(),
                    info["references"].clone(),
                ),
            )
        })
        .collect()
}

fn signatures(nix: &Nix, store: &str, path: &str) -> Vec<String> {
    let out = nix.ok("nix", &["path-info", "--json", "--store", store, path]);
    let infos: Vec<Value> = serde_json::from_str(&out).unwrap();
    infos[0]["signatures"]
        .as_array()
        .map(|sigs| {
            sigs.iter()
                .map(|s| s.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Pushes `closure` from `src_root` to `cache` with `compression`, then pulls
/// it into a fresh store trusting only `key`, and checks that every path
/// arrived intact and signed by the cache.
struct RoundTrip<'a> {
    server: &'a TestServer,
    work: &'a Path,
    key: &'a SigningKey,
    token: &'a str,
    src_root: &'a Path,
    closure: &'a Closure,
}

impl RoundTrip<'_> {
    async fn run(&self, cache: &str, compression: &str) -> PathBuf {
        let pusher = Nix::new(
            &self.work.join(format!("push-{cache}")),
            "",
            Some(self.token),
        );
        let (src, to, top) = (
            chroot_store(self.src_root),
            format!("{}/{cache}?compression={compression}", self.server.url),
            self.closure.top.clone(),
        );
        let source_infos = blocking(move || {
            pusher.ok("nix", &["copy", "--from", &src, "--to", &to, &top]);
            path_infos(&pusher, &src, &top)
        })
        .await;
        assert_eq!(source_infos.len(), self.closure.paths().len());

        // The server holds every path of the closure, with Nix's NAR hash
        // and size.
        let meta = &self.server.state.meta;
        let cache_row = meta.cache(cache).await.unwrap();
        for (path, (nar_hash, nar_size, _)) in &source_infos {
            let base = path.strip_prefix("/nix/store/").unwrap();
            let row = meta
                .nix_object(cache_row.id, &base[..32])
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{path} is not in {cache}"));
            assert_eq!(Some(row.object.nar_size), nar_size.as_u64(), "{path}");
            let sri = Sha256Hash::from_bytes(row.object.nar_hash).to_sri();
            assert_eq!(nar_hash.as_str(), Some(sri.as_str()), "{path}");
        }

        // A fresh store, signatures required, only the cache's key trusted.
        let dst_root = self.work.join(format!("dst-{cache}"));
        let puller = Nix::new(
            &self.work.join(format!("pull-{cache}")),
            &self.key.verifying_key().to_string(),
            Some(self.token),
        );
        let (from, dst, top) = (
            format!("{}/{cache}", self.server.url),
            chroot_store(&dst_root),
            self.closure.top.clone(),
        );
        let key_name = self.key.name().to_owned();
        let closure = self.closure.clone();
        let restored_infos = blocking(move || {
            puller.ok("nix", &["copy", "--from", &from, "--to", &dst, &top]);
            puller.ok("nix", &["store", "verify", "--store", &dst, "-r", &top]);
            for path in [&closure.top, &closure.dep] {
                let sigs = signatures(&puller, &dst, path);
                assert!(
                    sigs.iter().any(|s| s.starts_with(&format!("{key_name}:"))),
                    "{path}: {sigs:?}"
                );
            }
            path_infos(&puller, &dst, &top)
        })
        .await;
        assert_eq!(restored_infos, source_infos);
        dst_root
    }
}

/// The restored tree has its executable, symlinks and empty directory.
fn assert_same_files(src_root: &Path, dst_root: &Path, closure: &Closure) {
    use std::os::unix::fs::PermissionsExt;

    let at = |root: &Path, path: &str| root.join(path.trim_start_matches('/'));
    let tree = at(dst_root, &closure.tree);
    assert_eq!(
        std::fs::read_link(tree.join("link")).unwrap(),
        Path::new("bin/hello")
    );
    assert_eq!(
        std::fs::read_link(tree.join("dangling")).unwrap(),
        Path::new("../nowhere")
    );
    assert!(tree.join("empty").is_dir());
    let mode = std::fs::metadata(tree.join("bin/hello"))
        .unwrap()
        .permissions()
        .mode();
    assert_ne!(mode & 0o111, 0, "bin/hello lost its executable bit");
    for path in closure.paths() {
        let (src, dst) = (at(src_root, path), at(dst_root, path));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        garret_nix::nar::dump_path(&src, &mut a).unwrap();
        garret_nix::nar::dump_path(&dst, &mut b).unwrap();
        assert!(a == b, "{path} differs after the round trip");
    }
    let self_ref = std::fs::read_to_string(at(dst_root, &closure.top).join("self")).unwrap();
    assert_eq!(self_ref.trim(), closure.top);
}

async fn zstd_closure_round_trips(deployment: Deployment) {
    let server = TestServer::start(deployment).await;
    let key = SigningKey::generate("nixcopy-1").unwrap();
    server.create_cache("nixcopy", false, &key).await;
    let token = server.token(&[("nixcopy", PUSH_PULL)]);
    let work = tempfile::tempdir().unwrap();
    let src_root = work.path().join("src-root");

    let builder = Nix::new(&work.path().join("build"), "", None);
    let (w, r) = (work.path().to_owned(), src_root.clone());
    let closure = blocking(move || build_closure(&builder, &w, &r, true)).await;

    let round_trip = RoundTrip {
        server: &server,
        work: work.path(),
        key: &key,
        token: &token,
        src_root: &src_root,
        closure: &closure,
    };
    let dst_root = round_trip.run("nixcopy", "zstd").await;
    let big = closure.big.as_deref().unwrap();
    assert_eq!(
        std::fs::read(dst_root.join(big.trim_start_matches('/'))).unwrap(),
        garret_store::testing::text(BIG_LEN, 64)
    );
    assert_same_files(&src_root, &dst_root, &closure);

    // The 64 MiB NAR Nix uploaded, downloaded whole and then resumed from the
    // middle: 206 with exactly the tail, no Content-Encoding.
    let http = reqwest::Client::new();
    let hash = &big.strip_prefix("/nix/store/").unwrap()[..32];
    let narinfo = http
        .get(format!("{}/nixcopy/{hash}.narinfo", server.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(narinfo.status(), 200);
    let narinfo = narinfo.text().await.unwrap();
    let field = |name: &str| {
        narinfo
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in {narinfo}"))
            .to_owned()
    };
    assert!(field("Sig").starts_with("nixcopy-1:"), "{narinfo}");
    let nar_url = format!("{}/nixcopy/{}", server.url, field("URL"));
    let whole = http.get(&nar_url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert!(whole.headers().get("content-encoding").is_none());
    let whole = whole.bytes().await.unwrap();
    if let Ok(file_size) = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("FileSize: "))
        .unwrap_or("")
        .parse::<usize>()
    {
        assert_eq!(whole.len(), file_size);
    }
    let from = whole.len() / 3;
    let tail = http
        .get(&nar_url)
        .bearer_auth(&token)
        .header("range", format!("bytes={from}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(
        tail.headers()["content-range"],
        format!("bytes {from}-{}/{}", whole.len() - 1, whole.len()).as_str()
    );
    let tail = tail.bytes().await.unwrap();
    assert!(tail[..] == whole[from..], "the resumed tail differs");
    let nar = match field("Compression").as_str() {
        "zstd" => zstd::decode_all(&whole[..]).unwrap(),
        "none" => whole.to_vec(),
        other => panic!("unexpected compression {other}"),
    };
    assert_eq!(nar.len().to_string(), field("NarSize"));
    assert_eq!(
        Sha256Hash::parse_prefixed(&field("NarHash")).unwrap(),
        Sha256Hash::of(&nar)
    );

    // Trusting another key, the same copy is refused for lack of a signature.
    let other = SigningKey::generate("other-1").unwrap();
    let untrusted = Nix::new(
        &work.path().join("untrusted"),
        &other.verifying_key().to_string(),
        Some(&token),
    );
    let (from, dst, top) = (
        format!("{}/nixcopy", server.url),
        chroot_store(&work.path().join("dst-untrusted")),
        closure.top.clone(),
    );
    let out =
        blocking(move || untrusted.run("nix", &["copy", "--from", &from, "--to", &dst, &top]))
            .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("signature"), "{stderr}");
}

async fn xz_and_none_round_trip(deployment: Deployment) {
    let server = TestServer::start(deployment).await;
    let key = SigningKey::generate("nixcopy-1").unwrap();
    server.create_cache("xz", false, &key).await;
    server.create_cache("plain", false, &key).await;
    let token = server.token(&[("xz", PUSH_PULL), ("plain", PUSH_PULL)]);
    let work = tempfile::tempdir().unwrap();
    let src_root = work.path().join("src-root");
    let builder = Nix::new(&work.path().join("build"), "", None);
    let (w, r) = (work.path().to_owned(), src_root.clone());
    let closure = blocking(move || build_closure(&builder, &w, &r, false)).await;

    let round_trip = RoundTrip {
        server: &server,
        work: work.path(),
        key: &key,
        token: &token,
        src_root: &src_root,
        closure: &closure,
    };
    for (cache, compression) in [("xz", "xz"), ("plain", "none")] {
        let dst_root = round_trip.run(cache, compression).await;
        assert_same_files(&src_root, &dst_root, &closure);
    }
}

/// A pull-only token cannot push: `nix copy --to` fails and the cache and
/// the storage stay empty.
async fn nix_copy_needs_push_permission(deployment: Deployment) {
    let server = TestServer::start(deployment).await;
    let key = SigningKey::generate("ro-1").unwrap();
    server.create_cache("ro", false, &key).await;
    let token = server.token(&[("ro", Permission::PULL)]);
    let work = tempfile::tempdir().unwrap();
    let src_root = work.path().join("src-root");
    let file = work.path().join("data.txt");
    std::fs::write(&file, garret_store::testing::text(200_000, 8)).unwrap();
    let files = server.storage_files();
    let stats = server.state.meta.chunk_stats().await.unwrap();

    let nix = Nix::new(&work.path().join("push"), "", Some(&token));
    let (store, to) = (
        chroot_store(&src_root),
        format!("{}/ro?compression=zstd", server.url),
    );
    let (path, out) = blocking(move || {
        let path = nix.ok(
            "nix",
            &[
                "store",
                "add-path",
                "--store",
                &store,
                file.to_str().unwrap(),
            ],
        );
        let out = nix.run("nix", &["copy", "--from", &store, "--to", &to, &path]);
        (path, out)
    })
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("HTTP error 403"), "{stderr}");
    let cache = server.state.meta.cache("ro").await.unwrap();
    let base = path.strip_prefix("/nix/store/").unwrap();
    assert!(
        server
            .state
            .meta
            .nix_object(cache.id, &base[..32])
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(server.state.meta.chunk_stats().await.unwrap(), stats);
    assert_eq!(server.storage_files(), files);
}
