//! `garret cache`: create, inspect, configure and delete caches from the
//! command line, for operators bootstrapping a deployment before any token
//! exists, and for settings no Attic client sends (a Bazel cache's CAS
//! budget).

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use garret_meta::{Cache, CachePatch, Meta, MetaError, NewCache};
use garret_nix::signing::SigningKey;
use garret_nix::store_path::DEFAULT_STORE_DIR;
use garret_server::clock::unix_now;
use garret_server::config::Config;
use garret_server::units::{describe_retention, format_size, parse_duration, parse_size};

use super::JsonFlag;

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Lists every cache, one line each: visibility, priority, retention,
    /// CAS budget and public key.
    List(JsonFlag),
    /// Creates a cache with a fresh signing key and prints its public key.
    Create(CreateArgs),
    /// Prints a cache's settings and public key.
    Info {
        name: String,
        #[command(flatten)]
        output: JsonFlag,
    },
    /// Changes a cache's settings; what is not given stays as it is.
    Configure(ConfigureArgs),
    /// Deletes a cache; its objects become garbage for GC, and the name is
    /// free again at once.
    Delete { name: String },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    name: String,
    /// Anyone may pull without a token.
    #[arg(long)]
    public: bool,
    /// Substituter priority advertised in `nix-cache-info` (lower wins).
    #[arg(long, default_value_t = 41)]
    priority: i32,
    #[arg(long, default_value = DEFAULT_STORE_DIR)]
    store_dir: String,
    /// Name of the signing key; defaults to the cache name, as Attic does.
    #[arg(long)]
    key_name: Option<String>,
    #[command(flatten)]
    output: JsonFlag,
}

#[derive(Debug, Args)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "clap flags, at most one of each group set"
)]
#[command(group = clap::ArgGroup::new("retention_choice").multiple(false))]
#[command(group = clap::ArgGroup::new("budget_choice").multiple(false))]
#[command(group = clap::ArgGroup::new("visibility").multiple(false))]
pub struct ConfigureArgs {
    name: String,
    /// Nix objects unaccessed for this long may be collected (e.g. 30d, 12h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, group = "retention_choice")]
    retention: Option<Duration>,
    /// Keep Nix objects however long they go unaccessed (Attic's period 0).
    #[arg(long, group = "retention_choice")]
    no_retention: bool,
    /// Follow the server's `gc.default_retention` (Attic's "Global").
    #[arg(long, group = "retention_choice")]
    global_retention: bool,
    /// GC evicts the least recently used CAS entries beyond this many
    /// bytes (e.g. 50GiB, 500MB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, group = "budget_choice")]
    cas_budget: Option<u64>,
    /// Removes the CAS budget.
    #[arg(long, group = "budget_choice")]
    no_cas_budget: bool,
    /// Anyone may pull without a token.
    #[arg(long, group = "visibility")]
    public: bool,
    /// Only tokens may pull.
    #[arg(long, group = "visibility")]
    private: bool,
    /// Substituter priority advertised in `nix-cache-info` (lower wins).
    #[arg(long)]
    priority: Option<i32>,
    #[command(flatten)]
    output: JsonFlag,
}

impl ConfigureArgs {
    fn patch(&self) -> CachePatch {
        let retention = if let Some(period) = self.retention {
            Some(Some(i64::try_from(period.as_secs()).unwrap_or(i64::MAX)))
        } else if self.no_retention {
            Some(Some(0))
        } else if self.global_retention {
            Some(None)
        } else {
            None
        };
        let budget = if self.no_cas_budget {
            Some(None)
        } else {
            self.cas_budget.map(Some)
        };
        let public = if self.public {
            Some(true)
        } else if self.private {
            Some(false)
        } else {
            None
        };
        CachePatch {
            is_public: public,
            priority: self.priority,
            retention_period: retention,
            cas_budget_bytes: budget,
            ..CachePatch::default()
        }
    }
}

impl CreateArgs {
    /// A private cache with the defaults, for `serve`'s first start.
    pub fn private(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            public: false,
            priority: 41,
            store_dir: DEFAULT_STORE_DIR.to_owned(),
            key_name: None,
            output: JsonFlag::default(),
        }
    }
}

/// Creates the cache `args` describes with a fresh signing key; `None` if
/// the name is taken.
pub async fn create(meta: &Meta, args: &CreateArgs) -> anyhow::Result<Option<Cache>> {
    let name = garret_server::auth::CacheName::new(args.name.clone())?;
    anyhow::ensure!(
        !name.is_reserved(),
        "`{name}` is reserved (a Bazel or REAPI path word); choose another name"
    );
    let key = SigningKey::generate(args.key_name.as_deref().unwrap_or(&args.name))?;
    let new = NewCache {
        name: args.name.clone(),
        is_public: args.public,
        store_dir: args.store_dir.clone(),
        priority: args.priority,
        signing_key: key.to_secret_string(),
        upstream_cache_key_names: Vec::new(),
        retention_period: None,
    };
    match meta.create_cache(&new, unix_now()).await {
        Ok(cache) => Ok(Some(cache)),
        Err(MetaError::AlreadyExists(_)) => Ok(None),
        Err(other) => Err(anyhow::Error::new(other).context("creating the cache")),
    }
}

impl CacheCommand {
    pub async fn run(self, meta: &Meta, config: &Config) -> anyhow::Result<()> {
        match self {
            Self::List(output) => {
                let caches = meta.caches().await.context("listing caches")?;
                let views = caches
                    .iter()
                    .map(|cache| CacheView::new(cache, config))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                if output.json {
                    println!("{}", serde_json::to_string(&views)?);
                } else if views.is_empty() {
                    println!("no caches; create one with `garret cache create NAME`");
                } else {
                    print!("{}", table(&views));
                }
                Ok(())
            }
            Self::Create(args) => {
                let cache = create(meta, &args)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("cache {} already exists", args.name))?;
                CacheView::new(&cache, config)?.print(args.output)
            }
            Self::Info { name, output } => {
                CacheView::new(&find(meta, &name).await?, config)?.print(output)
            }
            Self::Configure(args) => {
                let patch = args.patch();
                anyhow::ensure!(
                    patch != CachePatch::default(),
                    "nothing to change: give at least one setting (see --help)"
                );
                find(meta, &args.name).await?;
                let cache = meta
                    .update_cache(&args.name, &patch)
                    .await
                    .context("configuring the cache")?;
                CacheView::new(&cache, config)?.print(args.output)
            }
            Self::Delete { name } => {
                find(meta, &name).await?;
                meta.delete_cache(&name, unix_now())
                    .await
                    .context("deleting the cache")?;
                println!("deleted cache {name}");
                Ok(())
            }
        }
    }
}

/// The live cache called `name`, or an error that says so.
pub(super) async fn find(meta: &Meta, name: &str) -> anyhow::Result<garret_meta::Cache> {
    meta.cache(name).await.map_err(|e| match e {
        MetaError::NotFound(_) => anyhow::anyhow!("no cache named {name}"),
        other => anyhow::Error::new(other).context("looking up the cache"),
    })
}

/// What the cache commands print of a cache: its settings as they apply,
/// and the public key clients trust. Never the secret key.
#[derive(Debug, serde::Serialize)]
struct CacheView {
    name: String,
    is_public: bool,
    priority: i32,
    store_dir: String,
    public_key: String,
    /// As stored, with Attic's meaning: `null` follows the server's
    /// default, 0 keeps forever.
    retention_period_secs: Option<i64>,
    /// The retention that applies, in words.
    retention: String,
    cas_budget_bytes: Option<u64>,
}

impl CacheView {
    fn new(cache: &garret_meta::Cache, config: &Config) -> anyhow::Result<Self> {
        let key: SigningKey = cache
            .signing_key
            .parse()
            .with_context(|| format!("cache {}: the stored signing key", cache.name))?;
        Ok(Self {
            name: cache.name.clone(),
            is_public: cache.is_public,
            priority: cache.priority,
            store_dir: cache.store_dir.clone(),
            public_key: key.verifying_key().to_string(),
            retention_period_secs: cache.retention_period,
            retention: describe_retention(cache.retention_period, config.gc.default_retention),
            cas_budget_bytes: cache.cas_budget_bytes,
        })
    }

    fn budget(&self) -> String {
        self.cas_budget_bytes
            .map_or_else(|| "none".to_owned(), format_size)
    }

    fn print(&self, output: JsonFlag) -> anyhow::Result<()> {
        if output.json {
            println!("{}", serde_json::to_string(self)?);
        } else {
            println!("name: {}", self.name);
            println!("public: {}", self.is_public);
            println!("priority: {}", self.priority);
            println!("store dir: {}", self.store_dir);
            println!("public key: {}", self.public_key);
            println!("retention: {}", self.retention);
            println!("cas budget: {}", self.budget());
        }
        Ok(())
    }
}

/// `cache list`'s text: a header and a row per cache, columns aligned.
fn table(views: &[CacheView]) -> String {
    let rows: Vec<[String; 6]> = std::iter::once(
        [
            "NAME",
            "VISIBILITY",
            "PRIORITY",
            "RETENTION",
            "CAS BUDGET",
            "PUBLIC KEY",
        ]
        .map(str::to_owned),
    )
    .chain(views.iter().map(|view| {
        [
            view.name.clone(),
            (if view.is_public { "public" } else { "private" }).to_owned(),
            view.priority.to_string(),
            view.retention.clone(),
            view.budget(),
            view.public_key.clone(),
        ]
    }))
    .collect();
    let mut widths = [0; 6];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
