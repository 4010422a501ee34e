//! `garret probe`: checks from a runner pod or a developer machine that the
//! caches it uses answer, are the expected ones and take writes. The checks
//! live in `garret_server::probe`; this is the command line around them.

use std::time::Duration;

use clap::CommandFactory as _;
use garret_server::probe::{self, Flags, Target};
use garret_server::units::parse_duration;

/// `probe`'s flags. With none of `--nix` and `--reapi`, the Nix cache comes
/// from `ATTIC_SERVER` and `ATTIC_CACHE` or nix.conf's `substituters`.
#[derive(Debug, clap::Args)]
pub(super) struct ProbeArgs {
    /// The Nix cache's substituter URL, ending in the cache's name
    /// (`https://cache.example/main`).
    #[arg(long, value_name = "URL", env = "GARRET_PROBE_NIX")]
    nix: Option<String>,

    /// The REAPI endpoint: `grpc://HOST:PORT[/INSTANCE]`, or `grpcs://` for TLS.
    #[arg(long, value_name = "URL", env = "GARRET_PROBE_REAPI")]
    reapi: Option<String>,

    /// A token for both protocols; one that may push runs the write canaries.
    /// Default: `ATTIC_TOKEN`, else nix.conf's netrc entry for the cache's host.
    #[arg(long, env = "GARRET_PROBE_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// The key the cache must sign with (`NAME:BASE64`); repeat to accept
    /// any of several. Default: nix.conf's `trusted-public-keys`.
    #[arg(long = "public-key", value_name = "NAME:KEY")]
    public_keys: Vec<String>,

    /// A store path the cache holds, for the narinfo round trip when no
    /// canary is written (no token that may push).
    #[arg(long, value_name = "STORE_PATH")]
    path: Option<String>,

    /// Bounds connecting, every call and every read of an answer.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,

    // `--json`: one object, `checks` (name, status, detail) and the counts.
    #[command(flatten)]
    output: super::JsonFlag,
}

impl ProbeArgs {
    /// Prints the report; an error (exit 1) if any check failed. A target
    /// that cannot be resolved is a usage error (exit 2).
    pub(super) fn run(self) -> anyhow::Result<()> {
        let flags = Flags {
            nix: self.nix,
            reapi: self.reapi,
            token: self.token,
            public_keys: self.public_keys,
            path: self.path,
        };
        let target = Target::resolve(flags, |name| std::env::var(name).ok()).unwrap_or_else(|e| {
            super::Cli::command()
                .error(clap::error::ErrorKind::ArgumentConflict, e)
                .exit()
        });
        let report = super::runtime()?.block_on(probe::run(&target, self.timeout));
        if self.output.json {
            println!("{}", report.to_json());
        } else {
            println!("{report}");
        }
        let failed = report.count(probe::Status::Fail);
        anyhow::ensure!(
            failed == 0,
            "{failed} of {} checks failed",
            report.checks.len()
        );
        Ok(())
    }
}
