//! The `garret` binary's offline tools, checked against the real Nix client.

use std::path::Path;
use std::process::Command;

fn garret(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_garret"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "garret {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn nix(program: &str, args: &[&str], scratch: &Path) -> std::process::Output {
    let conf = scratch.join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("nix.conf"),
        "build-users-group =\nsandbox = false\n",
    )
    .unwrap();
    let out = Command::new(program)
        .args(args)
        .env("NIX_CONF_DIR", &conf)
        .env("NIX_STATE_DIR", scratch.join("state"))
        .env("NIX_LOG_DIR", scratch.join("log"))
        .env("XDG_CACHE_HOME", scratch.join("cache"))
        .output()
        .unwrap_or_else(|e| panic!("{program} is required (./tests/run installs nix-bin): {e}"));
    assert!(
        out.status.success(),
        "{program}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn nar_tools_agree_with_nix() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::write(tree.join("bin/hello"), "#!/bin/sh\necho hi\n").unwrap();
    std::os::unix::fs::symlink("bin/hello", tree.join("link")).unwrap();
    let tree_arg = tree.to_str().unwrap();

    let ours = garret(&["nar", "dump", tree_arg]).stdout;
    let theirs = nix("nix-store", &["--dump", tree_arg], dir.path()).stdout;
    assert_eq!(ours, theirs);

    let hash = String::from_utf8(garret(&["nar", "hash", tree_arg]).stdout).unwrap();
    let nix_hash = nix(
        "nix-hash",
        &["--type", "sha256", "--base32", tree_arg],
        dir.path(),
    )
    .stdout;
    let expected = format!(
        "sha256:{} {}\n",
        String::from_utf8(nix_hash).unwrap().trim(),
        ours.len()
    );
    assert_eq!(hash, expected);

    let nar_file = dir.path().join("tree.nar");
    std::fs::write(&nar_file, &ours).unwrap();
    let verified = garret(&["nar", "verify", nar_file.to_str().unwrap()]).stdout;
    assert_eq!(String::from_utf8(verified).unwrap(), expected);

    // A truncated NAR is refused with a non-zero exit.
    std::fs::write(&nar_file, &ours[..ours.len() - 8]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_garret"))
        .args(["nar", "verify", nar_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid NAR"));
}

#[test]
fn generated_keys_are_nix_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
    garret(&[
        "key",
        "generate",
        "cache.example-1",
        sk.to_str().unwrap(),
        pk.to_str().unwrap(),
    ]);
    let secret: garret_nix::signing::SigningKey =
        std::fs::read_to_string(&sk).unwrap().parse().unwrap();
    let public = std::fs::read_to_string(&pk).unwrap();
    assert_eq!(secret.verifying_key().to_string(), public);
    assert!(public.starts_with("cache.example-1:"));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sk).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn migrate_creates_and_upgrades_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("data/garret.db").display());
    // Twice: applying migrations to an up-to-date database is a no-op.
    for _ in 0..2 {
        garret(&["migrate", "--database-url", &url]);
    }
    assert!(dir.path().join("data/garret.db").exists());
    let out = Command::new(env!("CARGO_BIN_EXE_garret"))
        .args(["migrate", "--database-url", "mysql://nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
