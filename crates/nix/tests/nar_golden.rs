//! `dump_path` against the real Nix 2.8 client: byte-identical output to
//! `nix-store --dump`, the same hash as `nix-hash`, and Nix's archives accepted
//! by our decoder.
//!
//! Nix runs with its configuration, state, logs and cache inside a temporary
//! directory, so the tests never touch the machine's Nix setup.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use garret_nix::Sha256Hash;
use garret_nix::nar::{Verifier, dump_path, parse};
use tempfile::TempDir;

/// A sandboxed Nix installation's environment.
struct Nix {
    home: TempDir,
}

impl Nix {
    fn new() -> Self {
        let home = tempfile::tempdir().unwrap();
        let conf = home.path().join("conf");
        fs::create_dir(&conf).unwrap();
        fs::write(
            conf.join("nix.conf"),
            "build-users-group =\nsandbox = false\nexperimental-features = nix-command\n",
        )
        .unwrap();
        Self { home }
    }

    /// Runs a Nix tool and returns its stdout, failing loudly if it is missing:
    /// a golden test that skips itself proves nothing.
    fn run(&self, program: &str, args: &[&OsStr]) -> Vec<u8> {
        let dir = self.home.path();
        let output = Command::new(program)
            .args(args)
            .env("NIX_CONF_DIR", dir.join("conf"))
            .env("NIX_STATE_DIR", dir.join("state"))
            .env("NIX_LOG_DIR", dir.join("log"))
            .env("XDG_CACHE_HOME", dir.join("cache"))
            .env("HOME", dir)
            .output()
            .unwrap_or_else(|error| match error.kind() {
                io::ErrorKind::NotFound => panic!(
                    "`{program}` is not on PATH: the NAR golden tests need the Nix 2.8 client \
                     (Debian package nix-bin); tests/run installs it"
                ),
                _ => panic!("cannot run `{program}`: {error}"),
            });
        assert!(
            output.status.success(),
            "`{program} {args:?}` failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }

    fn dump(&self, path: &Path) -> Vec<u8> {
        self.run("nix-store", &["--dump".as_ref(), path.as_os_str()])
    }

    fn hash(&self, path: &Path) -> String {
        let args: [&OsStr; 4] = [
            "--type".as_ref(),
            "sha256".as_ref(),
            "--base32".as_ref(),
            path.as_ref(),
        ];
        String::from_utf8(self.run("nix-hash", &args))
            .unwrap()
            .trim()
            .to_owned()
    }
}

fn write_file(path: &Path, contents: &[u8], mode: u32) {
    fs::write(path, contents).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Deterministic bytes that do not compress or repeat with a short period.
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// A tree with every kind of node and the edge cases of names, modes and sizes.
fn fixture(root: &Path) {
    fs::create_dir(root).unwrap();
    write_file(&root.join("exec"), b"#!/bin/sh\necho hi\n", 0o755);
    write_file(&root.join("plain"), b"hello\n", 0o644);
    write_file(&root.join("empty"), b"", 0o644);
    // Nix looks at the owner's execute bit only.
    write_file(&root.join("owner-exec-only"), b"x", 0o744);
    write_file(&root.join("read-only-exec"), b"x", 0o500);
    write_file(&root.join("group-exec"), b"x", 0o654);
    write_file(&root.join("other-exec"), b"x", 0o645);
    for len in 1..=17 {
        write_file(&root.join(format!("size-{len:02}")), &noise(len), 0o644);
    }
    write_file(&root.join("big"), &noise(5 * 1024 * 1024 + 3), 0o644);

    fs::create_dir(root.join("empty-dir")).unwrap();
    let links = root.join("links");
    fs::create_dir(&links).unwrap();
    symlink("../plain", links.join("relative")).unwrap();
    symlink(
        "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-x/bin/x",
        links.join("absolute"),
    )
    .unwrap();
    symlink("does/not/exist", links.join("dangling")).unwrap();
    symlink("../empty-dir", links.join("to-dir")).unwrap();
    symlink("loop", links.join("loop")).unwrap();
    symlink(
        OsStr::from_bytes(b"\xff\xfe not utf-8"),
        links.join("raw-target"),
    )
    .unwrap();

    let names = root.join("names");
    fs::create_dir(&names).unwrap();
    let odd: [&[u8]; 14] = [
        "ünïcødé".as_bytes(),
        "日本語.txt".as_bytes(),
        "🦀".as_bytes(),
        "Ä".as_bytes(),
        b"A",
        b"a",
        b"a.b",
        b"a-b",
        b"a_b",
        b"with space",
        b"-dash",
        b"~tilde",
        b"\xff\xfe latin-1",
        &[b'n'; 255],
    ];
    for name in odd {
        write_file(&names.join(OsStr::from_bytes(name)), name, 0o644);
    }

    let mut deep = root.join("deep");
    for level in 0..40 {
        deep.push(format!("level-{level}"));
    }
    fs::create_dir_all(&deep).unwrap();
    write_file(&deep.join("bottom"), b"bottom\n", 0o755);
}

fn ours(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let size = dump_path(path, &mut out).unwrap();
    assert_eq!(size, out.len() as u64);
    out
}

fn assert_matches_nix(nix: &Nix, path: &Path) {
    let ours = ours(path);
    let theirs = nix.dump(path);
    if let Some(at) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
        panic!(
            "{}: our NAR differs from `nix-store --dump` at byte {at}",
            path.display()
        );
    }
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{}: NAR sizes differ",
        path.display()
    );

    let hash = Sha256Hash::of(&ours);
    assert_eq!(hash.to_nix32(), nix.hash(path), "{}", path.display());

    parse(theirs.as_slice(), &mut ()).unwrap();
    let mut verifier = Verifier::new();
    for piece in theirs.chunks(4096 + 3) {
        verifier.update(piece).unwrap();
    }
    assert_eq!(verifier.finish().unwrap(), (hash, theirs.len() as u64));
}

#[test]
fn dump_matches_nix_store_dump() {
    let nix = Nix::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    fixture(&root);

    let roots: Vec<PathBuf> = [
        "exec",
        "plain",
        "empty",
        "group-exec",
        "read-only-exec",
        "big",
        "empty-dir",
        "links",
        "links/relative",
        "links/dangling",
        "names",
        "deep",
    ]
    .iter()
    .map(|p| root.join(p))
    .chain([root.clone()])
    .collect();
    for path in &roots {
        assert_matches_nix(&nix, path);
    }
}
