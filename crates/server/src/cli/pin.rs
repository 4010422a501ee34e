//! `garret pin`: the named GC roots of a Nix cache, set on the database
//! directly like the other offline commands (the API is
//! `/_api/v1/pins/{cache}`, see `http::pins`).

use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use garret_meta::{MAX_PINS_PAGE, Meta};
use garret_server::clock::unix_now;
use garret_server::pins::{PinPage, PinView, not_found, pin_name, pin_target};
use garret_server::units::parse_duration;

#[derive(Debug, Subcommand)]
pub enum PinCommand {
    /// Pins a store path: it and its closure in the cache never expire
    /// while the pin holds. Moves the pin if the name is taken.
    Add {
        cache: String,
        /// 1-128 characters of A-Z a-z 0-9 . _ + -, starting with a letter
        /// or digit.
        name: String,
        /// `/nix/store/<hash>-<name>` or `<hash>-<name>`; need not be
        /// pushed yet.
        store_path: String,
        /// The pin lapses this long from now (e.g. 30d); without it, it
        /// holds until removed.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires_in: Option<Duration>,
    },
    /// Removes a pin; the path is kept or expires by retention again.
    Remove { cache: String, name: String },
    /// Lists a cache's pins in name order, lapsed ones included and marked.
    List {
        cache: String,
        /// One JSON object, `{"pins":[…]}`, in the API's shape.
        #[arg(long)]
        json: bool,
    },
}

impl PinCommand {
    pub async fn run(self, meta: &Meta) -> anyhow::Result<()> {
        match self {
            Self::Add {
                cache,
                name,
                store_path,
                expires_in,
            } => {
                let cache = super::cache::find(meta, &cache).await?;
                let name = pin_name(&name)?;
                let path = pin_target(&store_path, &cache.store_dir)?;
                let now = unix_now();
                let expires_at = expires_in
                    .map(|d| i64::try_from(d.as_secs()).map(|d| now.saturating_add(d)))
                    .transpose()
                    .context("--expires-in is too long")?;
                let pin = meta
                    .pin(cache.id, &name, &path.to_string(), expires_at, now)
                    .await
                    .context("pinning")?;
                print_pin(&PinView::new(&pin, &cache.store_dir, now));
                Ok(())
            }
            Self::Remove { cache, name } => {
                let cache = super::cache::find(meta, &cache).await?;
                let name = pin_name(&name)?;
                meta.unpin(cache.id, &name).await.map_err(|e| {
                    not_found(e, || format!("cache {} has no pin {name}", cache.name))
                })?;
                println!("removed pin {name} from cache {}", cache.name);
                Ok(())
            }
            Self::List { cache, json } => {
                let cache = super::cache::find(meta, &cache).await?;
                let now = unix_now();
                let mut pins = Vec::new();
                loop {
                    let after = pins.last().map(|p: &garret_meta::Pin| p.name.clone());
                    let page = meta
                        .pins(cache.id, after.as_ref(), MAX_PINS_PAGE)
                        .await
                        .context("listing pins")?;
                    let last = page.len() < MAX_PINS_PAGE as usize;
                    pins.extend(page);
                    if last {
                        break;
                    }
                }
                let all = PinPage::new(&pins, u32::MAX, &cache.store_dir, now);
                if json {
                    println!("{}", serde_json::to_string(&all)?);
                } else if all.pins.is_empty() {
                    println!("cache {} has no pins", cache.name);
                } else {
                    all.pins.iter().for_each(print_pin);
                }
                Ok(())
            }
        }
    }
}

/// One line per pin: name, path, then its expiry if it has one.
fn print_pin(pin: &PinView) {
    let expiry = match pin.expires_at {
        None => String::new(),
        Some(at) if pin.expired => format!(" (expired at {at})"),
        Some(at) => format!(" (expires at {at})"),
    };
    println!("{} {}{expiry}", pin.name, pin.store_path);
}
