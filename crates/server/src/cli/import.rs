//! `garret import attic`: adopts a running Attic deployment (see
//! `garret_server::import::attic`), with a progress line while it runs.

use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use garret_meta::AtticSource;
use garret_server::auth::{CacheNamePattern, Permission, TokenSpec};
use garret_server::blobs::Blobs;
use garret_server::config::Config;
use garret_server::import::attic::{self, Options, Progress};
use garret_server::import::substituter::Substituter;
use garret_server::state::existing_token_authority;

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// Copies an Attic deployment's caches (names, signing keypairs, public
    /// flags, priorities, upstream key names, retention) from its database,
    /// and with --objects every store path it serves. Resumable: a second
    /// run imports only what the first did not. Exits non-zero if a cache
    /// was refused or a path failed.
    Attic(AtticArgs),
}

#[derive(Debug, Args)]
pub struct AtticArgs {
    /// Attic's database: `postgres://…` or `sqlite:PATH` (read-only).
    #[arg(long, env = "ATTIC_SERVER_DATABASE_URL")]
    database_url: String,
    /// Also copy every valid store path, fetched from this substituter root
    /// (Attic's, e.g. `http://attic:8080`: paths are read from
    /// `<URL>/<cache>/<hash>.narinfo`).
    #[arg(long, value_name = "SUBSTITUTER_URL")]
    objects: Option<String>,
    /// A token that may pull the private caches from the substituter;
    /// sent as a Bearer token. Without one, the import mints one that may
    /// pull every cache with garret's token key, which after adopting
    /// Attic's token secret is Attic's key too.
    #[arg(long, env = "GARRET_IMPORT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Only this cache (repeatable); all live caches by default.
    #[arg(long = "cache", value_name = "NAME")]
    caches: Vec<String>,
    /// Reports what would be imported; changes nothing.
    #[arg(long)]
    dry_run: bool,
    /// Prints the final report as one JSON object.
    #[arg(long)]
    json: bool,
}

impl ImportCommand {
    pub async fn run(self, config: &Config) -> anyhow::Result<()> {
        let Self::Attic(args) = self;
        let objects = match args.objects.as_deref() {
            Some(url) => {
                let token = match args.token {
                    Some(token) => Some(token),
                    None => pull_token(config)?,
                };
                Some(Substituter::new(url, token, &config.limits).map_err(anyhow::Error::msg)?)
            }
            None => None,
        };
        let options = Options {
            caches: args.caches,
            objects,
            dry_run: args.dry_run,
        };
        let source = AtticSource::connect(&args.database_url)
            .await
            .context("connecting to Attic's database")?;
        let meta = garret_server::state::open_meta(&config.database_url())
            .await
            .context("opening the metadata database")?
            .with_grace(config.gc.grace());
        // A one-off run: its storage metrics go nowhere.
        let metrics = garret_server::metrics::Metrics::new();
        let store = garret_server::state::open_store(config, &metrics)
            .context("opening the chunk store")?;
        let blobs = Blobs::new(store, meta);
        let progress = Arc::new(Progress::default());
        let ticker = tokio::spawn(show_progress(Arc::clone(&progress)));
        let report = attic::import(&source, &blobs, &options, &progress).await;
        ticker.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
        source.close().await;
        blobs.meta().close().await;
        let report = report?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{report}");
        }
        anyhow::ensure!(
            !report.failed(),
            "the import is incomplete (see above); run it again to retry what failed"
        );
        Ok(())
    }
}

/// A token that may pull every cache, signed with garret's own token key:
/// when garret verifies with Attic's secret (its `ATTIC_SERVER_TOKEN_*`
/// variables), Attic's private caches accept it. Lives a week, in memory
/// only. `None` without a key that can sign.
fn pull_token(config: &Config) -> anyhow::Result<Option<String>> {
    let Some(authority) = existing_token_authority(config).context("the token key")? else {
        return Ok(None);
    };
    let mut spec = TokenSpec::new("garret-import", Duration::from_hours(7 * 24));
    spec.grant(CacheNamePattern::new("*")?, Permission::PULL);
    match authority.mint(&spec) {
        Ok(token) => Ok(Some(token)),
        Err(e) => {
            tracing::info!(error = %e, "no token for the substituter; private caches need --token");
            Ok(None)
        }
    }
}

/// Shows the progress until aborted: a line redrawn every second on a
/// terminal, a log line every ten seconds otherwise.
async fn show_progress(progress: Arc<Progress>) {
    let terminal = std::io::stderr().is_terminal();
    let every = if terminal {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(10)
    };
    let started = Instant::now();
    let mut ticks = tokio::time::interval(every);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let done = progress.objects_done.load(Ordering::Relaxed);
        let total = progress.objects_total.load(Ordering::Relaxed);
        let bytes = progress.bytes_imported.load(Ordering::Relaxed);
        let rate = bytes / started.elapsed().as_secs().max(1);
        let (bytes, rate) = (
            garret_server::units::format_size(bytes),
            garret_server::units::format_size(rate),
        );
        if terminal {
            eprint!("\r{done}/{total} objects, {bytes} imported, {rate}/s   ");
            let _ = std::io::stderr().flush();
        } else {
            tracing::info!(done, total, %bytes, rate = %format!("{rate}/s"), "import progress");
        }
    }
}
