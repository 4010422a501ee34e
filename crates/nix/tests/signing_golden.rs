//! Golden tests of keys, fingerprints and narinfo signatures against the real Nix
//! 2.8 client, in both directions: what Nix signs verifies with our code, and what
//! we sign Nix accepts with `require-sigs = true`.
//!
//! Every Nix command runs against stores, state and caches inside a temp dir, so
//! nothing touches /nix or the user's Nix configuration. Without Nix on PATH these
//! tests fail rather than skip: a silently skipped golden test proves nothing.

use std::ffi::OsStr;
use std::fmt::Debug;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use garret_nix::narinfo::NarInfo;
use garret_nix::signing::{Signature, SigningKey, VerifyingKey};
use garret_nix::{Sha256Hash, StorePath, StorePathHash};
use tempfile::TempDir;

/// The store directory binary caches use, and the logical one of `local?root=` stores.
const STORE_DIR: &str = "/nix/store";

/// A private Nix installation: config, state, logs and the client's narinfo cache
/// all under one temp dir.
struct Nix {
    dir: TempDir,
}

impl Nix {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["conf", "state", "log", "cache"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
        }
        fs::write(
            dir.path().join("conf/nix.conf"),
            "experimental-features = nix-command\n\
             build-users-group =\n\
             sandbox = false\n\
             substituters =\n\
             require-sigs = true\n\
             trusted-public-keys =\n",
        )
        .unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A `local?root=` store: chrooted under the temp dir, logically `/nix/store`.
    fn root_store(&self, name: &str) -> String {
        format!("local?root={}", self.path(name).display())
    }

    fn output<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Output {
        Command::new(program)
            .args(args)
            .env("NIX_CONF_DIR", self.path("conf"))
            .env("NIX_STATE_DIR", self.path("state"))
            .env("NIX_LOG_DIR", self.path("log"))
            .env("XDG_CACHE_HOME", self.path("cache"))
            .env_remove("NIX_REMOTE")
            .output()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot run `{program}` ({err}): these golden tests need the real Nix 2.8 \
                     client (`nix`, `nix-store`, `nix-build`; Debian package nix-bin) on PATH"
                )
            })
    }

    /// Runs a command that must succeed and returns its stdout.
    fn run<S: AsRef<OsStr> + Debug>(&self, program: &str, args: &[S]) -> String {
        let out = self.output(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail and returns its stderr.
    fn run_failing<S: AsRef<OsStr> + Debug>(&self, program: &str, args: &[S]) -> String {
        let out = self.output(program, args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "{program} {args:?} unexpectedly succeeded:\n{stderr}"
        );
        stderr
    }
}

/// The raw text of `"key":<value>` in the compact JSON `nix path-info --json`
/// prints. Its strings (paths, hashes, base64) hold no quotes, commas or brackets,
/// so this is enough without a JSON dependency.
fn json_value<'a>(json: &'a str, key: &str) -> &'a str {
    let needle = format!("\"{key}\":");
    let start = json
        .find(&needle)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + needle.len();
    let rest = &json[start..];
    let end = if rest.starts_with('[') {
        rest.find(']').unwrap() + 1
    } else {
        rest.find([',', '}']).unwrap()
    };
    &rest[..end]
}

fn json_strings(value: &str) -> Vec<&str> {
    let inner = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap();
    inner
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_matches('"'))
        .collect()
}

/// Two input-addressed outputs, `top` referring to `dep`, so the fingerprint has a
/// reference, a deriver and a hash Nix computed itself.
const DERIVATIONS: &str = r#"
let dep = builtins.derivation {
  name = "garret-dep"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "echo dep > $out" ];
};
in builtins.derivation {
  name = "garret-top"; system = builtins.currentSystem; builder = "/bin/sh";
  PATH = "/usr/bin:/bin"; inherit dep;
  args = [ "-c" "echo $dep > $out" ];
}
"#;

#[test]
fn nix_keys_and_signatures_verify_with_our_code() {
    let nix = Nix::new();
    let (secret_file, public_file) = (nix.path("secret"), nix.path("public"));
    nix.run(
        "nix-store",
        &[
            "--generate-binary-cache-key",
            "golden-1",
            secret_file.to_str().unwrap(),
            public_file.to_str().unwrap(),
        ],
    );
    let secret_text = fs::read_to_string(&secret_file).unwrap();
    let public_text = fs::read_to_string(&public_file).unwrap();
    let secret: SigningKey = secret_text.parse().unwrap();
    let public: VerifyingKey = public_text.parse().unwrap();
    assert_eq!(secret.verifying_key(), public);
    assert_eq!(secret.to_secret_string(), secret_text);
    assert_eq!(public.to_string(), public_text);

    // A chroot store cannot run /bin/sh, so build in a store whose directory is
    // itself inside the temp dir; that also exercises a non-default store dir.
    let store_dir = nix.path("store").to_str().unwrap().to_owned();
    let store = format!(
        "local?store={store_dir}&state={}&log={}",
        nix.path("store-state").display(),
        nix.path("store-log").display()
    );
    let expr = nix.path("derivations.nix");
    fs::write(&expr, DERIVATIONS).unwrap();
    let built = nix.run(
        "nix-build",
        &["--store", &store, "--no-out-link", expr.to_str().unwrap()],
    );
    let top = built.trim();
    nix.run(
        "nix",
        &[
            "store",
            "sign",
            "--store",
            &store,
            "--key-file",
            secret_file.to_str().unwrap(),
            top,
        ],
    );

    let json = nix.run(
        "nix",
        &["path-info", "--store", &store, "--json", "--sigs", top],
    );
    let references: Vec<StorePath> = json_strings(json_value(&json, "references"))
        .into_iter()
        .map(|r| StorePath::from_absolute_path_in(r, &store_dir).unwrap())
        .collect();
    assert_eq!(references.len(), 1, "{json}");
    let info = NarInfo {
        store_path: StorePath::from_absolute_path_in(top, &store_dir).unwrap(),
        url: "unused".into(),
        compression: "none".into(),
        file_hash: None,
        file_size: None,
        nar_hash: json_value(&json, "narHash")
            .trim_matches('"')
            .parse()
            .unwrap(),
        nar_size: json_value(&json, "narSize").parse().unwrap(),
        references,
        deriver: None,
        system: None,
        signatures: json_strings(json_value(&json, "signatures"))
            .into_iter()
            .map(str::to_owned)
            .collect(),
        ca: None,
    };
    let [nix_signature] = info.signatures.as_slice() else {
        panic!("{json}")
    };
    let nix_signature: Signature = nix_signature.parse().unwrap();
    assert!(public.verify(info.fingerprint(&store_dir).as_bytes(), &nix_signature));
    assert!(info.has_valid_signature(std::slice::from_ref(&public), &store_dir));
    // ed25519 is deterministic: signing the same fingerprint gives Nix's bytes.
    assert_eq!(
        secret.sign(info.fingerprint(&store_dir).as_bytes()),
        nix_signature
    );

    // The narinfo Nix writes for the signed path: parses, renders back byte for
    // byte, and its signature verifies.
    let cache = nix.path("cache-from-nix");
    let cache_url = format!(
        "file://{}?compression=none&store={store_dir}",
        cache.display()
    );
    nix.run("nix", &["copy", "--from", &store, "--to", &cache_url, top]);
    let hash = info.store_path.hash().to_string();
    let text = fs::read_to_string(cache.join(format!("{hash}.narinfo"))).unwrap();
    let parsed = NarInfo::parse(&text, &store_dir).unwrap();
    assert_eq!(parsed.render(&store_dir), text);
    assert_eq!(parsed.fingerprint(&store_dir), info.fingerprint(&store_dir));
    assert!(parsed.has_valid_signature(&[public], &store_dir));
    assert!(parsed.deriver.is_some());
}

/// One store path in a binary cache we write ourselves.
struct CachedPath {
    info: NarInfo,
    nar: Vec<u8>,
}

impl CachedPath {
    /// Serialises `contents` with `nix-store --dump` (independent of our NAR
    /// writer) under an invented input-addressed store path.
    fn new(nix: &Nix, name: &str, contents: &str, references: Vec<StorePath>) -> Self {
        let file = nix.path(&format!("{name}.contents"));
        fs::write(&file, contents).unwrap();
        let out = nix.output("nix-store", &["--dump", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let nar = out.stdout;
        let digest = Sha256Hash::of(format!("garret golden {name}").as_bytes());
        let hash = StorePathHash::from_bytes(digest.as_bytes()[..20].try_into().unwrap());
        let nar_hash = Sha256Hash::of(&nar);
        let info = NarInfo {
            store_path: StorePath::new(hash, name).unwrap(),
            url: format!("nar/{}.nar", nar_hash.to_nix32()),
            compression: "none".into(),
            file_hash: Some(nar_hash),
            file_size: Some(nar.len() as u64),
            nar_hash,
            nar_size: nar.len() as u64,
            references,
            deriver: None,
            system: None,
            signatures: Vec::new(),
            ca: None,
        };
        Self { info, nar }
    }

    fn absolute(&self) -> String {
        self.info.store_path.to_absolute_path_in(STORE_DIR)
    }
}

/// Writes a `file://` binary cache holding `paths` and returns its URL.
fn write_cache(dir: &Path, paths: &[&CachedPath]) -> String {
    fs::create_dir_all(dir.join("nar")).unwrap();
    fs::write(
        dir.join("nix-cache-info"),
        format!("StoreDir: {STORE_DIR}\n"),
    )
    .unwrap();
    for path in paths {
        path.info.validate().unwrap();
        fs::write(dir.join(&path.info.url), &path.nar).unwrap();
        let narinfo = dir.join(format!("{}.narinfo", path.info.store_path.hash()));
        fs::write(narinfo, path.info.render(STORE_DIR)).unwrap();
    }
    format!("file://{}", dir.display())
}

#[test]
fn narinfo_signed_by_us_is_accepted_by_nix() {
    let nix = Nix::new();
    let key = SigningKey::generate("garret-golden-1").unwrap();
    let trusted = key.verifying_key().to_string();
    let stranger = SigningKey::generate("garret-golden-1")
        .unwrap()
        .verifying_key()
        .to_string();

    let mut dep = CachedPath::new(&nix, "garret-golden-dep", "dep\n", Vec::new());
    let dep_path = dep.info.store_path.clone();
    let mut top = CachedPath::new(&nix, "garret-golden-top", "top\n", vec![dep_path]);
    dep.info.sign(&key, STORE_DIR);
    top.info.sign(&key, STORE_DIR);
    let cache = write_cache(&nix.path("cache"), &[&dep, &top]);

    let copy = |cache: &str, target: &str, trusted_keys: &str| {
        let to = nix.root_store(target);
        let options = ["--option", "trusted-public-keys", trusted_keys];
        let args = ["copy", "--from", cache, "--to", &to]
            .into_iter()
            .chain(options);
        args.map(str::to_owned)
            .chain([top.absolute()])
            .collect::<Vec<_>>()
    };

    // Trusted: Nix downloads, checks our signature over its own fingerprint, checks
    // the NAR against NarHash and NarSize, and registers both paths.
    nix.run("nix", &copy(&cache, "accepting", &trusted));
    let copied = nix
        .path("accepting")
        .join(top.absolute().trim_start_matches('/'));
    assert_eq!(fs::read_to_string(copied).unwrap(), "top\n");
    let store = nix.root_store("accepting");
    let json = nix.run(
        "nix",
        &[
            "path-info",
            "--store",
            &store,
            "--json",
            "--sigs",
            &top.absolute(),
        ],
    );
    assert_eq!(
        json_strings(json_value(&json, "signatures")),
        top.info.signatures
    );
    assert_eq!(
        json_strings(json_value(&json, "references")),
        [dep.absolute()],
        "{json}"
    );
    // `nix store verify` agrees: contents match and the signatures are trusted...
    nix.run(
        "nix",
        &[
            "store",
            "verify",
            "--store",
            &store,
            "--option",
            "trusted-public-keys",
            &trusted,
            "-r",
            &top.absolute(),
        ],
    );
    // ...and calls the same paths untrusted under another key.
    let stderr = nix.run_failing(
        "nix",
        &[
            "store",
            "verify",
            "--store",
            &store,
            "--option",
            "trusted-public-keys",
            &stranger,
            &top.absolute(),
        ],
    );
    assert!(stderr.contains("untrusted"), "{stderr}");

    // A key of the same name that Nix does not trust: refused.
    let stderr = nix.run_failing("nix", &copy(&cache, "wrong-key", &stranger));
    assert!(stderr.contains("lacks a valid signature"), "{stderr}");

    // The trusted key, but signing a different fingerprint: refused.
    let mut forged = top.info.clone();
    forged.nar_size += 1;
    forged.sign(&key, STORE_DIR);
    let mut tampered = CachedPath {
        info: top.info.clone(),
        nar: top.nar.clone(),
    };
    tampered.info.signatures = forged.signatures;
    let tampered_cache = write_cache(&nix.path("tampered-cache"), &[&dep, &tampered]);
    let stderr = nix.run_failing("nix", &copy(&tampered_cache, "tampered", &trusted));
    assert!(stderr.contains("lacks a valid signature"), "{stderr}");
}
