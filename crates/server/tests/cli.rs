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
    let printed = garret(&[
        "key",
        "generate",
        "cache.example-1",
        sk.to_str().unwrap(),
        pk.to_str().unwrap(),
    ])
    .stdout;
    let secret: garret_nix::signing::SigningKey =
        std::fs::read_to_string(&sk).unwrap().parse().unwrap();
    let public = std::fs::read_to_string(&pk).unwrap();
    assert_eq!(secret.verifying_key().to_string(), public);
    assert_eq!(String::from_utf8(printed).unwrap(), format!("{public}\n"));
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
        let out = Command::new(env!("CARGO_BIN_EXE_garret"))
            .arg("migrate")
            .env("GARRET_DATABASE_URL", &url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(dir.path().join("data/garret.db").exists());
    let out = Command::new(env!("CARGO_BIN_EXE_garret"))
        .arg("migrate")
        .env("GARRET_DATABASE_URL", "mysql://nope")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither sqlite"));
}

#[test]
fn gc_runs_once_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_garret"))
            .arg("gc")
            .args(args)
            .env("GARRET_DATA_DIR", dir.path())
            .env("GARRET_GC_DEFAULT_RETENTION", "1d")
            .output()
            .unwrap()
    };
    for (args, dry) in [
        (&["--json"][..], false),
        (&["--json", "--dry-run"][..], true),
    ] {
        let out = run(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["dry_run"], dry);
        assert_eq!(
            (report["nix_objects"].as_u64(), report["errors"].as_u64()),
            (Some(0), Some(0))
        );
    }
    let out = run(&[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 Nix objects"));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("gc: "),
        "no progress line without a terminal"
    );

    // On a terminal (util-linux `script` gives it one), the progress line
    // shows a step and is cleared before the report.
    let command = format!("{} gc", env!("CARGO_BIN_EXE_garret"));
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env("GARRET_DATA_DIR", dir.path())
        .env("GARRET_LOG_LEVEL", "warn")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("\r\x1b[2Kgc: evicting CAS entries over budget: 0 entries expired"),
        "{shown:?}"
    );
    let last = shown.rfind("gc: ").unwrap();
    assert!(shown[last..].contains("\r\x1b[2K"), "cleared: {shown:?}");
    assert!(
        shown[last..].contains("Nix objects"),
        "then the report: {shown:?}"
    );
    // A store it cannot open is a failure, not an empty report.
    let out = Command::new(env!("CARGO_BIN_EXE_garret"))
        .arg("gc")
        .env("GARRET_DATABASE_URL", "mysql://nope")
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn check_config_validates_and_hides_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("garret.toml");
    std::fs::write(
        &file,
        "database_url = \"postgres://garret:hunter2@db/garret\"\n[storage]\ntype = \"s3\"\nbucket = \"chunks\"\n",
    )
    .unwrap();
    let out = garret(&["check-config", "--config", file.to_str().unwrap()]);
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(
        printed.contains("\nstorage.bucket = \"chunks\"\n"),
        "{printed}"
    );
    assert!(
        printed.contains("postgres://garret:<redacted>@db/garret"),
        "{printed}"
    );
    assert!(!printed.contains("hunter2"));

    std::fs::write(&file, "[chunking]\navg_size = 1000\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_garret"))
        .args(["check-config", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
}

/// Attic's token key variable is a fallback: `check-config` says which key
/// is used, and warns when Attic's differs from garret's own.
#[test]
fn check_config_names_the_token_key_source() {
    let run = |env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_garret"))
            .arg("check-config")
            .env_remove("GARRET_CONFIG")
            .env_remove("GARRET_TOKEN_HS256_SECRET_BASE64")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success());
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let attic = ("ATTIC_SERVER_TOKEN_HS256_SECRET_BASE64", "YXR0aWMgc2VjcmV0");
    let (printed, log) = run(&[attic]);
    assert!(
        printed.contains("token key: HS256 from ATTIC_SERVER_TOKEN_HS256_SECRET_BASE64"),
        "{printed}"
    );
    assert!(
        !printed.contains("YXR0aWMgc2VjcmV0") && !log.contains("WARN"),
        "{log}"
    );
    let (printed, log) = run(&[attic, ("GARRET_TOKEN_HS256_SECRET_BASE64", "Z2FycmV0")]);
    assert!(
        printed.contains("token key: HS256 from GARRET_TOKEN_HS256_SECRET_BASE64"),
        "{printed}"
    );
    assert!(
        log.contains("WARN") && log.contains("ATTIC_SERVER_TOKEN_HS256_SECRET_BASE64"),
        "{log}"
    );
    let (_, log) = run(&[attic, ("GARRET_TOKEN_HS256_SECRET_BASE64", attic.1)]);
    assert!(
        !log.contains("WARN"),
        "the same key twice is no conflict: {log}"
    );
}

// `garret token create`: the printed JWT is checked with the library's own
// verifier, as the server will check it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use garret_server::auth::{
    AuthError, CacheName, Permission, Token, TokenAuthority, TokenRejection,
};

const HS256_ENV: &str = "GARRET_TOKEN_HS256_SECRET_BASE64";
const RS256_ENV: &str = "GARRET_TOKEN_RS256_SECRET_BASE64";

fn hs_secret() -> String {
    STANDARD.encode("garret cli tests: an HS256 secret; never use it anywhere")
}

fn testdata(file: &str) -> String {
    format!("{}/testdata/{file}", env!("CARGO_MANIFEST_DIR"))
}

/// `garret token create ARGS` with exactly the key variables in `env`, so the
/// developer's own environment cannot leak in. The caller judges the exit.
fn token_create(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_garret"))
        .args(["token", "create"])
        .args(args)
        .env_remove(HS256_ENV)
        .env_remove(RS256_ENV)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// The JWT of a successful run: one line on stdout and nothing else.
fn minted(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "token create: {stderr}");
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let jwt = stdout.strip_suffix('\n').expect("a trailing newline");
    assert_eq!(jwt.split('.').count(), 3, "{stdout:?}");
    assert!(!jwt.contains(char::is_whitespace), "{stdout:?}");
    jwt.to_owned()
}

/// The message of a refused run, which must print nothing on stdout.
fn refused(out: &std::process::Output) -> String {
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn perm(token: &Token, cache: &str) -> Permission {
    token.permission_for(&CacheName::new(cache).unwrap())
}

#[test]
fn token_create_hs256_from_env_grants_per_pattern() {
    let secret = hs_secret();
    let validity = Duration::from_hours(90 * 24).as_secs();
    let before = unix_now();
    let out = token_create(
        &[
            "--sub",
            "ci-bot",
            "--validity",
            "90d",
            "--pull",
            "team-*",
            "--create-cache",
            "team-*",
            // An exact name replaces `team-*` for itself: grant both flags.
            "--push",
            "team-ci",
            "--pull",
            "team-ci",
            "--delete",
            "scratch?",
            "--destroy-cache",
            "old-*",
            // Last, so that it is only the fallback.
            "--configure-cache",
            "*",
            "--configure-cache-retention",
            "*",
        ],
        &[(HS256_ENV, &secret)],
    );
    let after = unix_now();
    let jwt = minted(&out);
    // `team-ci` lacks `team-*`'s cc and `*`'s cr/cq, as warned.
    let stderr = String::from_utf8(out.stderr.clone()).unwrap();
    let warnings: Vec<&str> = stderr.lines().collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(
        warnings[0].contains("add --create-cache team-ci"),
        "{stderr}"
    );
    assert!(
        warnings[1].contains("add --configure-cache team-ci --configure-cache-retention team-ci"),
        "{stderr}"
    );

    let token = TokenAuthority::hs256_base64(&secret)
        .unwrap()
        .verify(&jwt)
        .unwrap();
    assert_eq!(token.sub(), Some("ci-bot"));
    let fallback = Permission::CONFIGURE_CACHE.union(Permission::CONFIGURE_CACHE_RETENTION);
    let cases = [
        ("team-a", Permission::PULL.union(Permission::CREATE_CACHE)),
        ("team-ci", Permission::PULL.union(Permission::PUSH)),
        ("scratch1", Permission::DELETE),
        ("scratch12", fallback),
        ("old-x", Permission::DESTROY_CACHE),
        ("elsewhere", fallback),
    ];
    for (cache, expected) in cases {
        assert_eq!(perm(&token, cache), expected, "{cache}");
    }
    // The token keeps the command-line order, which decides between patterns.
    let keys: Vec<&str> = token
        .claims()
        .access
        .caches
        .keys()
        .map(garret_server::auth::CacheNamePattern::as_str)
        .collect();
    assert_eq!(keys, ["team-*", "team-ci", "scratch?", "old-*", "*"]);

    let claims = token.claims();
    let (exp, nbf) = (claims.exp.unwrap(), claims.nbf.unwrap());
    assert!(
        (before..=after).contains(&nbf),
        "{before} <= {nbf} <= {after}"
    );
    assert!(
        (before + validity..=after + validity).contains(&exp),
        "exp {exp} is not now + 90d"
    );
    assert_eq!((claims.iss.as_ref(), claims.aud.as_ref()), (None, None));

    // A server with another secret refuses it.
    let other = STANDARD.encode("another server entirely, another 32+ byte secret");
    assert_eq!(
        TokenAuthority::hs256_base64(&other)
            .unwrap()
            .verify(&jwt)
            .unwrap_err(),
        AuthError::InvalidToken(TokenRejection::BadSignature)
    );
}

#[test]
fn token_create_hs256_from_file_with_issuer_and_audiences() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("hs256.secret");
    // As `openssl rand 64 | base64 > file` leaves it, newline included.
    std::fs::write(&secret_file, format!("{}\n", hs_secret())).unwrap();
    let out = token_create(
        &[
            "--sub",
            "bazel",
            "--validity",
            "12h",
            "--pull",
            "bazel",
            "--issuer",
            "https://cache.example",
            "--audience",
            "nix",
            "--audience",
            "bazel",
            "--hs256-secret-file",
            secret_file.to_str().unwrap(),
        ],
        &[],
    );
    let jwt = minted(&out);
    let server = TokenAuthority::hs256_base64(&hs_secret())
        .unwrap()
        .with_issuer("https://cache.example");
    let token = server
        .clone()
        .with_audiences(["bazel"])
        .verify(&jwt)
        .unwrap();
    assert_eq!(perm(&token, "bazel"), Permission::PULL);
    let claims = token.claims();
    let lifetime = claims.exp.unwrap() - claims.nbf.unwrap();
    assert_eq!(lifetime, 12 * 3600);
    assert_eq!(
        server
            .clone()
            .with_audiences(["other"])
            .verify(&jwt)
            .unwrap_err(),
        AuthError::InvalidToken(TokenRejection::WrongAudience)
    );
    assert_eq!(
        TokenAuthority::hs256_base64(&hs_secret())
            .unwrap()
            .with_issuer("https://elsewhere.example")
            .verify(&jwt)
            .unwrap_err(),
        AuthError::InvalidToken(TokenRejection::WrongIssuer)
    );
}

#[test]
fn token_create_rs256_from_file_and_env() {
    let args = ["--sub", "ci", "--validity", "1y", "--pull", "team-*"];
    let verifier = |public: &str| {
        TokenAuthority::rs256_pem(&std::fs::read(testdata(public)).unwrap()).unwrap()
    };

    let key_file = testdata("rs256-a.key.pem");
    let out = token_create(&[&args[..], &["--rs256-key-file", &key_file]].concat(), &[]);
    let jwt = minted(&out);
    let token = verifier("rs256-a.pub.pem").verify(&jwt).unwrap();
    assert_eq!(token.sub(), Some("ci"));
    assert_eq!(perm(&token, "team-a"), Permission::PULL);
    assert_eq!(perm(&token, "other"), Permission::NONE);
    let claims = token.claims();
    assert_eq!(claims.exp.unwrap() - claims.nbf.unwrap(), 365 * 86_400);
    assert_eq!(
        verifier("rs256-b.pub.pem").verify(&jwt).unwrap_err(),
        AuthError::InvalidToken(TokenRejection::BadSignature)
    );

    // Attic's `token-rs256-secret-base64`: base64 of the (here PKCS#8) PEM.
    let pem_base64 = STANDARD.encode(std::fs::read(testdata("rs256-b.key.pem")).unwrap());
    let out = token_create(&args, &[(RS256_ENV, &pem_base64)]);
    let jwt = minted(&out);
    assert!(verifier("rs256-b.pub.pem").verify(&jwt).is_ok());
    assert!(verifier("rs256-a.pub.pem").verify(&jwt).is_err());

    // A public key cannot sign.
    let public = testdata("rs256-a.pub.pem");
    let stderr = refused(&token_create(
        &[&args[..], &["--rs256-key-file", &public]].concat(),
        &[],
    ));
    assert!(stderr.contains("--rs256-key-file"), "{stderr}");
    assert!(stderr.contains("needs the private key"), "{stderr}");
}

#[test]
fn token_create_grant_order_and_precedence_warnings() {
    let secret = hs_secret();
    let mint = |grants: &[&str]| {
        let out = token_create(
            &[&["--sub", "ci", "--validity", "1h"], grants].concat(),
            &[(HS256_ENV, &secret)],
        );
        let jwt = minted(&out);
        let token = TokenAuthority::hs256_base64(&secret)
            .unwrap()
            .verify(&jwt)
            .unwrap();
        (token, String::from_utf8(out.stderr).unwrap())
    };

    // An exact name replaces the pattern for itself (TokenSpec::grant).
    let (token, stderr) = mint(&["--pull", "team-*", "--push", "team-ci"]);
    assert_eq!(perm(&token, "team-ci"), Permission::PUSH);
    assert_eq!(perm(&token, "team-a"), Permission::PULL);
    assert!(stderr.starts_with("warning: `team-ci`"), "{stderr}");
    assert!(stderr.contains("add --pull team-ci"), "{stderr}");

    // Among patterns, the first one given wins.
    let (token, stderr) = mint(&["--pull", "*", "--push", "team-*"]);
    assert_eq!(perm(&token, "team-a"), Permission::PULL);
    assert!(
        stderr.contains("`team-*` comes after `*`")
            && stderr.contains("more specific pattern first"),
        "{stderr}"
    );
    let (token, stderr) = mint(&["--push", "team-*", "--pull", "*"]);
    assert_eq!(perm(&token, "team-a"), Permission::PUSH);
    assert_eq!(perm(&token, "other"), Permission::PULL);
    assert!(stderr.is_empty(), "{stderr}");

    // Repeating a pattern adds flags to its entry, in its first position.
    let (token, stderr) = mint(&["--pull", "a*", "--pull", "*", "--push", "a*"]);
    assert_eq!(perm(&token, "ab"), Permission::PULL.union(Permission::PUSH));
    assert_eq!(perm(&token, "b"), Permission::PULL);
    assert!(stderr.is_empty(), "{stderr}");
}

/// `--sub ci --validity 90d` followed by `extra`.
fn sub_validity<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    [&["--sub", "ci", "--validity", "90d"], extra].concat()
}

/// Runs a refused invocation and checks that stderr names every `expected`
/// and echoes none of the `secrets`.
fn assert_refused(args: &[&str], env: &[(&str, &str)], expected: &[&str], secrets: &[&str]) {
    let stderr = refused(&token_create(args, env));
    for needle in expected {
        assert!(
            stderr.contains(needle),
            "{args:?}: {needle:?} not in {stderr}"
        );
    }
    for secret in secrets {
        assert!(
            !stderr.contains(secret),
            "{args:?} leaked key material: {stderr}"
        );
    }
}

#[test]
fn token_create_needs_exactly_one_key() {
    let secret = hs_secret();
    let key_file = testdata("rs256-a.key.pem");
    let pem_base64 = STANDARD.encode(std::fs::read(&key_file).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("hs256.secret");
    std::fs::write(&secret_file, &secret).unwrap();
    let secrets = [secret.as_str(), pem_base64.as_str()];
    let pull = sub_validity(&["--pull", "team-*"]);

    assert_refused(
        &pull,
        &[],
        &[
            "no signing key",
            "--hs256-secret-file",
            "--rs256-key-file",
            HS256_ENV,
            RS256_ENV,
        ],
        &secrets,
    );
    assert_refused(
        &[&pull[..], &["--rs256-key-file", &key_file]].concat(),
        &[(HS256_ENV, &secret)],
        &[
            "2 signing keys given",
            "--rs256-key-file",
            HS256_ENV,
            "exactly one",
        ],
        &secrets,
    );
    assert_refused(
        &[
            &pull[..],
            &["--hs256-secret-file", secret_file.to_str().unwrap()],
        ]
        .concat(),
        &[(RS256_ENV, &pem_base64)],
        &["2 signing keys given", "--hs256-secret-file", RS256_ENV],
        &secrets,
    );
    assert_refused(
        &pull,
        &[(HS256_ENV, &secret), (RS256_ENV, &pem_base64)],
        &["2 signing keys given", HS256_ENV, RS256_ENV],
        &secrets,
    );
    let short = STANDARD.encode("too short");
    assert_refused(
        &pull,
        &[(HS256_ENV, &short)],
        &[HS256_ENV, "at least 32"],
        &[&short],
    );
    assert_refused(
        &[&pull[..], &["--hs256-secret-file", "/nonexistent/hs256"]].concat(),
        &[],
        &["--hs256-secret-file /nonexistent/hs256", "No such file"],
        &[],
    );
}

#[test]
fn token_create_refuses_bad_grants_and_durations() {
    let secret = hs_secret();
    let env = [(HS256_ENV, secret.as_str())];
    let cases: [(Vec<&str>, &[&str]); 6] = [
        (
            sub_validity(&[]),
            &["no grants", "can do nothing", "--pull", "--destroy-cache"],
        ),
        (
            sub_validity(&["--pull", "a/b"]),
            &["'a/b'", "--pull <PATTERN>", "Invalid cache name `a/b`"],
        ),
        (
            sub_validity(&["--pull", "ok", "--push", "team-[ab]"]),
            &["--push <PATTERN>", "Invalid cache name"],
        ),
        (
            vec!["--sub", "ci", "--validity", "1M", "--pull", "a"],
            &["--validity", "invalid duration `1M`", "e.g. 90d"],
        ),
        (
            vec!["--sub", "ci", "--pull", "a"],
            &["--validity <DURATION>", "required"],
        ),
        (
            vec!["--sub", "", "--validity", "1d", "--pull", "a"],
            &["--sub <NAME>"],
        ),
    ];
    for (args, expected) in cases {
        assert_refused(&args, &env, expected, &[&secret]);
    }
}

/// `garret ARGS` on the database at `url` with the variables `env`; the
/// caller judges the exit.
fn garret_on(url: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_garret"))
        .args(args)
        .env("GARRET_DATABASE_URL", url)
        .env_remove("GARRET_GC_DEFAULT_RETENTION")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// The standard output of a run that must succeed.
fn stdout_of(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The standard error of a run that must fail.
fn failure_of(out: std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn cache_commands_manage_caches() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("fresh/garret.db").display());
    let run = |args: &[&str]| garret_on(&url, args, &[]);
    let created = run(&["cache", "create", "team-ci", "--public", "--priority", "30"]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let created = String::from_utf8(created.stdout).unwrap();
    assert!(
        created.contains("public: true") && created.contains("priority: 30"),
        "{created}"
    );
    let public_key = created
        .lines()
        .find_map(|l| l.strip_prefix("public key: "))
        .unwrap();
    assert!(public_key.starts_with("team-ci:"));
    public_key
        .parse::<garret_nix::signing::VerifyingKey>()
        .unwrap();

    let info = run(&["cache", "info", "team-ci"]);
    assert!(String::from_utf8(info.stdout).unwrap().contains(public_key));

    for (args, expected) in [
        (&["cache", "create", "team-ci"][..], "already exists"),
        (&["cache", "create", "bad/name"][..], "name"),
        (&["cache", "info", "nope"][..], "no cache named nope"),
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }

    assert!(run(&["cache", "delete", "team-ci"]).status.success());
    assert!(!run(&["cache", "info", "team-ci"]).status.success());
    // The name is free again, with a new key.
    let again = String::from_utf8(run(&["cache", "create", "team-ci"]).stdout).unwrap();
    assert!(again.contains("public: false") && !again.contains(public_key));
}

#[test]
fn cache_list_and_json_output() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("garret.db").display());
    let run = |args: &[&str]| garret_on(&url, args, &[]);
    assert!(stdout_of(run(&["cache", "list"])).starts_with("no caches"));
    assert_eq!(stdout_of(run(&["cache", "list", "--json"])), "[]\n");

    let created: serde_json::Value = serde_json::from_str(&stdout_of(run(&[
        "cache", "create", "nix", "--public", "--json",
    ])))
    .unwrap();
    assert_eq!(created["name"], "nix");
    assert_eq!(created["is_public"], true);
    assert!(created.get("signing_key").is_none(), "{created}");
    stdout_of(run(&["cache", "create", "bazel"]));
    stdout_of(run(&[
        "cache",
        "configure",
        "bazel",
        "--cas-budget",
        "1GiB",
        "--retention",
        "7d",
    ]));

    let listed: serde_json::Value =
        serde_json::from_str(&stdout_of(run(&["cache", "list", "--json"]))).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["name"], "bazel", "by name");
    assert_eq!(listed[0]["cas_budget_bytes"], 1u64 << 30);
    assert_eq!(listed[0]["retention_period_secs"], 7 * 86_400);
    assert_eq!(listed[0]["retention"], "7d");
    assert_eq!(listed[1], created, "list and create print the same view");
    let info: serde_json::Value =
        serde_json::from_str(&stdout_of(run(&["cache", "info", "bazel", "--json"]))).unwrap();
    assert_eq!(info, listed[0]);

    let text = stdout_of(run(&["cache", "list"]));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("NAME "), "{text}");
    assert!(
        lines[1].starts_with("bazel ") && lines[1].contains(" private "),
        "{text}"
    );
    assert!(lines[1].contains(" 1GiB "), "{text}");
    assert!(
        lines[2].starts_with("nix ") && lines[2].ends_with(created["public_key"].as_str().unwrap()),
        "{text}"
    );
    // Columns line up: every row's key starts where the header's does.
    let key_column = lines[0].find("PUBLIC KEY").unwrap();
    assert!(
        lines[1..]
            .iter()
            .all(|l| l[key_column..].starts_with("bazel:") || l[key_column..].starts_with("nix:")),
        "{text}"
    );
}

#[test]
fn cache_configure_sets_retention_and_budget() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("garret.db").display());
    let run = |args: &[&str]| garret_on(&url, args, &[]);
    stdout_of(run(&["cache", "create", "bazel"]));
    let info = stdout_of(run(&["cache", "info", "bazel"]));
    assert!(
        info.contains("retention: global default (keep forever)\n"),
        "{info}"
    );
    assert!(info.contains("cas budget: none\n"), "{info}");

    let set = [
        "cache",
        "configure",
        "bazel",
        "--retention",
        "30d",
        "--cas-budget",
        "50GiB",
        "--public",
    ];
    let info = stdout_of(run(&set));
    for line in ["retention: 30d\n", "cas budget: 50GiB\n", "public: true\n"] {
        assert!(info.contains(line), "{line}: {info}");
    }
    let info = stdout_of(run(&[
        "cache",
        "configure",
        "bazel",
        "--no-retention",
        "--no-cas-budget",
    ]));
    assert!(info.contains("retention: keep forever\n"), "{info}");
    assert!(info.contains("cas budget: none\n"), "{info}");
    stdout_of(run(&[
        "cache",
        "configure",
        "bazel",
        "--global-retention",
        "--private",
    ]));
    let with_default = [("GARRET_GC_DEFAULT_RETENTION", "14d")];
    let info = stdout_of(garret_on(&url, &["cache", "info", "bazel"], &with_default));
    assert!(info.contains("retention: global default (14d)\n"), "{info}");
    assert!(info.contains("public: false\n"), "{info}");

    for (args, expected) in [
        (&["cache", "configure", "bazel"][..], "nothing to change"),
        (
            &[
                "cache",
                "configure",
                "bazel",
                "--retention",
                "1d",
                "--no-retention",
            ][..],
            "cannot be used with",
        ),
        (
            &["cache", "configure", "bazel", "--cas-budget", "0GiB"][..],
            "larger than zero",
        ),
        (
            &["cache", "configure", "bazel", "--cas-budget", "lots"][..],
            "invalid size",
        ),
        (
            &["cache", "configure", "bazel", "--retention", "forever"][..],
            "invalid duration",
        ),
        (
            &["cache", "configure", "nope", "--no-retention"][..],
            "no cache named nope",
        ),
    ] {
        let stderr = failure_of(run(args));
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn pin_and_path_commands() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("garret.db").display());
    let run = |args: &[&str]| garret_on(&url, args, &[]);
    stdout_of(run(&["cache", "create", "nix"]));
    let hash = "0c1k2qm3ff6j1lgk8ailbxdwqg0cvlb8";
    let path = format!("/nix/store/{hash}-hello-2.12");

    let added = stdout_of(run(&[
        "pin",
        "add",
        "nix",
        "release",
        &path,
        "--expires-in",
        "1d",
    ]));
    assert!(
        added.starts_with(&format!("release {path} (expires at ")),
        "{added}"
    );
    let base = format!("{hash}-hello-2.12");
    let added = stdout_of(run(&["pin", "add", "nix", "forever", &base]));
    assert_eq!(added, format!("forever {path}\n"));
    let listed = stdout_of(run(&["pin", "list", "nix"]));
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(
        listed.starts_with(&format!("forever {path}\nrelease {path} (expires at ")),
        "{listed}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&stdout_of(run(&["pin", "list", "nix", "--json"]))).unwrap();
    let pins = json["pins"].as_array().unwrap();
    assert_eq!(pins.len(), 2, "{json}");
    assert_eq!(pins[0]["name"], "forever");
    assert_eq!(pins[0]["expires_at"], serde_json::Value::Null);
    assert_eq!(pins[1]["store_path_hash"], hash);
    assert_eq!(pins[1]["expired"], false);
    assert!(json.get("next").is_none(), "{json}");

    assert_eq!(
        stdout_of(run(&["pin", "remove", "nix", "release"])),
        "removed pin release from cache nix\n"
    );
    let listed = stdout_of(run(&["pin", "list", "nix"]));
    assert_eq!(listed, format!("forever {path}\n"));
    stdout_of(run(&["pin", "remove", "nix", "forever"]));
    assert_eq!(
        stdout_of(run(&["pin", "list", "nix"])),
        "cache nix has no pins\n"
    );

    let missing = format!("cache nix has no path {hash}");

    for (args, expected) in [
        (
            &["pin", "remove", "nix", "release"][..],
            "has no pin release",
        ),
        (
            &["pin", "add", "nix", "-x", &base][..],
            "unexpected argument",
        ),
        (&["pin", "add", "nix", "a/b", &base][..], "invalid pin name"),
        (
            &["pin", "add", "nix", "p", "/elsewhere/x"][..],
            "invalid store path",
        ),
        (
            &["pin", "add", "nix", "p", &base, "--expires-in", "soon"][..],
            "invalid duration",
        ),
        (&["pin", "list", "nope"][..], "no cache named nope"),
        (&["path", "delete", "nix", hash][..], missing.as_str()),
        (&["path", "delete", "nix", &path][..], "has no path"),
        (
            &["path", "delete", "nix", "hello"][..],
            "invalid store path",
        ),
    ] {
        let stderr = failure_of(run(args));
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
