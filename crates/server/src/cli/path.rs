//! `garret path`: single store paths of a Nix cache, on the database
//! directly (the API is `DELETE /_api/v1/objects/{cache}/{hash}`).

use clap::Subcommand;
use garret_meta::Meta;
use garret_server::clock::unix_now;
use garret_server::pins::{not_found, path_hash};

#[derive(Debug, Subcommand)]
pub enum PathCommand {
    /// Deletes a store path from a cache at once, pinned or not, and
    /// whether or not other paths in the cache refer to it. Its NAR's
    /// chunks go to GC once nothing else uses them.
    Delete {
        cache: String,
        /// Its hash, `<hash>-<name>` or `/nix/store/<hash>-<name>`.
        store_path: String,
    },
}

impl PathCommand {
    pub async fn run(self, meta: &Meta) -> anyhow::Result<()> {
        match self {
            Self::Delete { cache, store_path } => {
                let cache = super::cache::find(meta, &cache).await?;
                let hash = path_hash(&store_path, &cache.store_dir)?.to_string();
                meta.delete_nix_object(cache.id, &hash, unix_now())
                    .await
                    .map_err(|e| {
                        not_found(e, || format!("cache {} has no path {hash}", cache.name))
                    })?;
                println!("deleted {hash} from cache {}", cache.name);
                Ok(())
            }
        }
    }
}
