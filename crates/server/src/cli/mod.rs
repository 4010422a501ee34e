//! Command-line interface. Each subcommand is a thin shell over a library call.

use std::io::{self, BufWriter, Read, Write};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use garret_nix::nar;
use garret_nix::signing::SigningKey;
use garret_server::config::Config;

mod cache;
mod import;
mod path;
mod pin;
mod probe;
mod token;

#[derive(Debug, Parser)]
#[command(
    name = "garret",
    version,
    about = "A cache plane for Nix and Bazel on one chunked store"
)]
pub struct Cli {
    /// Log filter (tracing syntax); `GARRET_LOG` overrides it.
    #[arg(long, global = true, default_value = "info", env = "GARRET_LOG_LEVEL")]
    pub log_level: String,

    /// `text` (for people) or `json` (one object per line, for collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "GARRET_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// TOML configuration file; without one, built-in defaults and
    /// `GARRET_*` variables apply.
    #[arg(long, global = true, env = "GARRET_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Nix binary cache signing keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// NAR (Nix ARchive) tools, byte-compatible with `nix-store --dump`.
    #[command(subcommand)]
    Nar(NarCommand),
    /// Attic-compatible access tokens (JWTs) for Nix, the `attic` client and Bazel.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Runs the server on one port: the Nix binary cache (substituter,
    /// Attic's API, plain `nix copy` uploads) and the Bazel remote cache
    /// (REAPI over gRPC, Bazel's HTTP cache). The first start creates the
    /// token secret, prints an admin token and creates the private cache
    /// Bazel uses without an instance name (`bazel_default_cache`).
    Serve(ServeArgs),
    /// Caches: create, inspect, configure (retention, CAS budget), delete.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Pins: named GC roots that keep a store path and its closure.
    #[command(subcommand)]
    Pin(pin::PinCommand),
    /// Single store paths of a Nix cache.
    #[command(subcommand)]
    Path(path::PathCommand),
    /// Creates or upgrades the metadata schema (`serve` also does this at start).
    Migrate,
    /// Runs one garbage collection and exits (for a CronJob): expires what
    /// retention and budgets no longer keep, then frees the storage nothing
    /// references. Exits non-zero if any step failed.
    Gc(GcArgs),
    /// Loads and validates the configuration, then prints the effective
    /// settings with secrets hidden (keys as in CONFIGURATION.md).
    CheckConfig(JsonFlag),
    /// Adopts another cache server's deployment: `garret import attic`.
    #[command(subcommand)]
    Import(import::ImportCommand),
    /// Checks, from a runner pod or a developer machine, that a Nix cache
    /// and/or a REAPI endpoint answer, have the expected public key, sign
    /// what they serve and, with a push token, take a write (canaries,
    /// cleaned up where the protocol allows). One PASS/FAIL/SKIP line per
    /// check; exits 1 if any failed. Without flags, reads `ATTIC_*` and
    /// nix.conf (substituters, trusted-public-keys, netrc).
    Probe(probe::ProbeArgs),
}

/// `--json` for commands that print a result: the same facts as one JSON
/// value on standard output, for scripts.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct JsonFlag {
    /// Prints JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `gc`'s flags.
#[derive(Debug, clap::Args)]
struct GcArgs {
    /// Reports what retention and budgets would remove; changes nothing.
    #[arg(long)]
    dry_run: bool,
    /// Prints the report as one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
}

/// `serve`'s flags; each overrides the configuration file and `GARRET_*`.
#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address for HTTP and gRPC (`listen`, `GARRET_LISTEN`).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Home of the embedded database, local chunks and secrets
    /// (`data_dir`, `GARRET_DATA_DIR`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Generates an ed25519 key pair in Nix's `name:base64` formats, like
    /// `nix-store --generate-binary-cache-key`.
    Generate {
        /// Key name, conventionally the cache's host name plus a number.
        name: String,
        /// Where to write the secret key (created with mode 0600).
        secret_file: PathBuf,
        /// Where to write the public key.
        public_file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum NarCommand {
    /// Serialises a path as a NAR on standard output.
    Dump { path: PathBuf },
    /// Prints the NAR hash (`sha256:<nix32>`) and NAR size of a path.
    Hash { path: PathBuf },
    /// Validates a NAR read from a file or standard input (`-`) and prints its
    /// hash and size; exits non-zero on the first grammar error.
    Verify { file: PathBuf },
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        restrict_file_modes();
        match self.command {
            Command::Key(KeyCommand::Generate {
                name,
                secret_file,
                public_file,
            }) => generate_key(&name, &secret_file, &public_file),
            Command::Token(command) => command.run(),
            Command::Migrate => {
                let config = load_config(self.config.as_deref())?;
                runtime()?.block_on(async {
                    let meta = open_meta(&config.database_url()).await?;
                    tracing::info!(database = ?meta.database(), "metadata schema is up to date");
                    meta.close().await;
                    Ok(())
                })
            }
            Command::Serve(args) => {
                let mut config = load_config(self.config.as_deref())?;
                if let Some(listen) = args.listen {
                    config.listen = listen;
                }
                if let Some(data_dir) = args.data_dir {
                    config.data_dir = data_dir;
                }
                runtime()?.block_on(serve(config))
            }
            Command::Cache(command) => {
                let config = load_config(self.config.as_deref())?;
                with_meta(&config, async |meta| command.run(meta, &config).await)
            }
            Command::Pin(command) => {
                let config = load_config(self.config.as_deref())?;
                with_meta(&config, async |meta| command.run(meta).await)
            }
            Command::Path(command) => {
                let config = load_config(self.config.as_deref())?;
                with_meta(&config, async |meta| command.run(meta).await)
            }
            Command::Gc(args) => {
                let config = load_config(self.config.as_deref())?;
                runtime()?.block_on(collect_garbage(&config, &args))
            }
            Command::Import(command) => {
                runtime()?.block_on(command.run(&load_config(self.config.as_deref())?))
            }
            Command::Probe(args) => args.run(),
            Command::CheckConfig(JsonFlag { json }) => {
                let config = load_config(self.config.as_deref())?;
                if json {
                    println!("{}", config.redacted());
                } else {
                    print!("{}", config.summary());
                }
                Ok(())
            }
            Command::Nar(NarCommand::Dump { path }) => {
                let mut out = BufWriter::with_capacity(1 << 20, io::stdout().lock());
                nar::dump_path(&path, &mut out)
                    .with_context(|| format!("dumping {}", path.display()))?;
                out.flush()?;
                Ok(())
            }
            Command::Nar(NarCommand::Hash { path }) => {
                let mut hasher = garret_nix::Sha256Hasher::new();
                nar::dump_path(&path, &mut hasher)
                    .with_context(|| format!("dumping {}", path.display()))?;
                print_hash(hasher.finish());
                Ok(())
            }
            Command::Nar(NarCommand::Verify { file }) => {
                let input: Box<dyn Read> = if file.as_os_str() == "-" {
                    Box::new(io::stdin().lock())
                } else {
                    Box::new(
                        std::fs::File::open(&file)
                            .with_context(|| format!("opening {}", file.display()))?,
                    )
                };
                print_hash(verify_nar(input)?);
                Ok(())
            }
        }
    }
}

fn load_config(file: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(Config::load(file, |name| std::env::var(name).ok())?)
}

/// Runs an offline command on the configured database, closed afterwards
/// whatever the outcome.
fn with_meta(
    config: &Config,
    command: impl AsyncFnOnce(&garret_meta::Meta) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let meta = open_meta(&config.database_url()).await?;
        let result = command(&meta).await;
        meta.close().await;
        result
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let garret_server::state::Built { state, first_start } =
        garret_server::state::build(&config).await?;
    if let Some(first) = first_start {
        println!(
            "First start: created the token secret {path} (keep it safe).\n\
             More tokens: garret token create --hs256-secret-file {path} --sub NAME --validity 90d --push CACHE\n\
             Admin token (every permission on every cache, valid one year):\n\n{admin}\n",
            path = first.secret_file.display(),
            admin = first.admin_token,
        );
    }
    // So `bazel build --remote_cache=grpc://…` works with no other step, on
    // a fresh data directory and on a fresh Postgres database with a
    // configured token key alike; a cache an operator deleted stays deleted.
    let default = &config.bazel_default_cache;
    if !state.meta.cache_name_ever_used(default).await? {
        let default = cache::CreateArgs::private(default);
        if let Some(cache) = cache::create(&state.meta, &default).await? {
            println!(
                "Created the private cache `{}` that Bazel requests without an instance name use.",
                cache.name
            );
        }
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    tracing::info!(address = %listener.local_addr()?, "garret is listening");
    // On SIGTERM (Kubernetes) or Ctrl-C, stop accepting and let in-flight
    // requests, uploads included, finish within the shutdown timeout.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    };
    if config.gc.interval_secs > 0 {
        tokio::spawn(garret_server::gc::periodically(state.clone(), config.gc));
    }
    garret_server::serve::serve(
        listener,
        garret_server::app(std::sync::Arc::clone(&state)),
        state.metrics.clone(),
        garret_server::serve::ServeLimits::new(&config.connections, config.limits.idle_timeout()),
        shutdown,
    )
    .await;
    // The requests are done: write the access times they recorded.
    state.accesses.shutdown().await;
    tracing::info!("garret stopped");
    Ok(())
}

async fn collect_garbage(config: &Config, args: &GcArgs) -> anyhow::Result<()> {
    let meta = open_meta(&config.database_url())
        .await?
        .with_grace(config.gc.grace());
    // A one-off run exports no metrics; it records its outcome for the
    // servers' `/metrics` instead.
    let metrics = garret_server::metrics::Metrics::new();
    let store =
        garret_server::state::open_store(config, &metrics).context("opening the chunk store")?;
    let display = ProgressLine::on_terminal();
    let report = garret_server::gc::collect_and_record(
        &meta,
        &store,
        &config.gc,
        garret_server::clock::unix_now(),
        args.dry_run,
        &|step, so_far| {
            display.show(|| {
                format!(
                    "gc: {step}: {} entries expired, {} chunks, {} packs, {} freed",
                    so_far.nix_objects + so_far.cas_entries + so_far.action_results,
                    so_far.chunks,
                    so_far.packs_deleted + so_far.packs_rewritten,
                    garret_server::units::format_size(so_far.bytes_freed),
                )
            });
        },
    )
    .await;
    display.clear();
    meta.close().await;
    let report = report.context("garbage collection")?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    anyhow::ensure!(
        report.errors == 0,
        "{} storage operations failed; the next run retries them",
        report.errors
    );
    Ok(())
}

/// A status line rewritten in place on standard error, at most a few times
/// a second, when standard error is a terminal; nothing otherwise, so logs
/// and pipes get no control characters.
struct ProgressLine {
    last: Option<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl ProgressLine {
    const EVERY: std::time::Duration = std::time::Duration::from_millis(200);

    fn on_terminal() -> Self {
        use std::io::IsTerminal as _;
        Self {
            last: io::stderr()
                .is_terminal()
                .then(|| std::sync::Mutex::new(None)),
        }
    }

    fn show(&self, line: impl FnOnce() -> String) {
        let Some(last) = &self.last else { return };
        let mut last = last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|at| at.elapsed() < Self::EVERY) {
            return;
        }
        *last = Some(std::time::Instant::now());
        eprint!("\r\x1b[2K{}", line());
    }

    fn clear(&self) {
        if self.last.is_some() {
            eprint!("\r\x1b[2K");
        }
    }
}

/// Everything garret creates (database, chunks, secrets) is for its
/// own user alone: the database holds every cache's signing key.
fn restrict_file_modes() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

async fn open_meta(database_url: &str) -> anyhow::Result<garret_meta::Meta> {
    garret_server::state::open_meta(database_url)
        .await
        .context("opening the metadata database")
}

fn print_hash((hash, size): (garret_nix::Sha256Hash, u64)) {
    println!("{hash} {size}");
}

fn verify_nar(mut input: impl Read) -> anyhow::Result<(garret_nix::Sha256Hash, u64)> {
    let mut verifier = nar::Verifier::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = input.read(&mut buf).context("reading NAR")?;
        if n == 0 {
            break;
        }
        verifier.update(&buf[..n]).context("invalid NAR")?;
    }
    verifier.finish().context("invalid NAR")
}

fn generate_key(name: &str, secret_file: &PathBuf, public_file: &PathBuf) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let key = SigningKey::generate(name)?;
    let mut secret = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(secret_file)
        .with_context(|| format!("creating {}", secret_file.display()))?;
    secret.write_all(key.to_secret_string().as_bytes())?;
    let public = key.verifying_key().to_string();
    std::fs::write(public_file, &public)
        .with_context(|| format!("writing {}", public_file.display()))?;
    // What clients put in `trusted-public-keys`.
    println!("{public}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    const REFERENCE: &str = include_str!("../../CONFIGURATION.md");

    /// CONFIGURATION.md lists every flag and variable of the command line
    /// (global ones and `serve`'s), and every flag it names exists: a flag
    /// of `serve` on the row of the setting it overrides.
    #[test]
    fn reference_names_every_flag() {
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").expect("serve exists");
        let mut flags = Vec::new();
        for (arg, of_serve) in cli
            .get_arguments()
            .map(|arg| (arg, false))
            .chain(serve.get_arguments().map(|arg| (arg, true)))
        {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let flag = format!("`--{long}`");
            let row = REFERENCE
                .lines()
                .find(|line| line.starts_with('|') && line.contains(&flag))
                .unwrap_or_else(|| panic!("{flag} is not in CONFIGURATION.md"));
            if of_serve {
                let key = long.replace('-', "_");
                assert!(row.starts_with(&format!("| `{key}` |")), "{flag}: {row}");
            }
            if let Some(variable) = arg.get_env() {
                let variable = format!("`{}`", variable.to_string_lossy());
                assert!(row.contains(&variable), "{flag} reads {variable}: {row}");
            }
            flags.push(flag);
        }
        // Every other command's variable, on the row of its flag.
        let mut commands: Vec<&clap::Command> = cli
            .get_subcommands()
            .filter(|command| command.get_name() != "serve")
            .collect();
        while let Some(command) = commands.pop() {
            commands.extend(command.get_subcommands());
            for arg in command.get_arguments() {
                let (Some(long), Some(variable)) = (arg.get_long(), arg.get_env()) else {
                    continue;
                };
                let variable = format!("`{}`", variable.to_string_lossy());
                let row = REFERENCE
                    .lines()
                    .find(|line| line.starts_with('|') && line.contains(&variable))
                    .unwrap_or_else(|| panic!("{variable} is not in CONFIGURATION.md"));
                let flag = format!("`--{long}`");
                assert!(row.contains(&flag), "{variable} stands for {flag}: {row}");
                flags.push(flag);
            }
        }
        for named in REFERENCE.split('`').filter(|word| word.starts_with("--")) {
            let named = format!("`{named}`");
            assert!(
                flags.contains(&named) || !REFERENCE.contains(&format!("| {named} |")),
                "CONFIGURATION.md names {named}, which no command has"
            );
        }
        assert!(flags.len() >= 5, "{flags:?}");
    }
}
