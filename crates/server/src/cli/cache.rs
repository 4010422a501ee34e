//! `garret cache`: create, inspect and delete caches from the command line,
//! for operators bootstrapping a deployment before any token exists.

use anyhow::Context as _;
use clap::{Args, Subcommand};
use garret_meta::{Cache, Meta, MetaError, NewCache};
use garret_nix::signing::SigningKey;
use garret_nix::store_path::DEFAULT_STORE_DIR;
use garret_server::clock::unix_now;

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Creates a cache with a fresh signing key and prints its public key.
    Create(CreateArgs),
    /// Prints a cache's settings and public key.
    Info { name: String },
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
    pub async fn run(self, meta: &Meta) -> anyhow::Result<()> {
        match self {
            Self::Create(args) => {
                let cache = create(meta, &args)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("cache {} already exists", args.name))?;
                print_info(&cache)
            }
            Self::Info { name } => print_info(&find(meta, &name).await?),
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

async fn find(meta: &Meta, name: &str) -> anyhow::Result<garret_meta::Cache> {
    meta.cache(name).await.map_err(|e| match e {
        MetaError::NotFound(_) => anyhow::anyhow!("no cache named {name}"),
        other => anyhow::Error::new(other).context("looking up the cache"),
    })
}

fn print_info(cache: &garret_meta::Cache) -> anyhow::Result<()> {
    let key: SigningKey = cache
        .signing_key
        .parse()
        .context("the cache's stored signing key")?;
    println!("name: {}", cache.name);
    println!("public: {}", cache.is_public);
    println!("priority: {}", cache.priority);
    println!("store dir: {}", cache.store_dir);
    println!("public key: {}", key.verifying_key());
    Ok(())
}
