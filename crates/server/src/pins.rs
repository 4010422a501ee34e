//! Pins and single-path deletes as the HTTP API (`http::pins`) and the CLI
//! (`garret pin`, `garret path delete`) both take them: one reading of
//! their arguments and one JSON shape for a pin, so a script can switch
//! between `garret pin list --json` and `GET /_api/v1/pins/{cache}`.

use garret_meta::{Pin, PinName};
use garret_nix::{StorePath, StorePathHash};
use serde::Serialize;

use crate::error::Error;

/// A pin as the API and `garret pin list --json` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PinView {
    pub name: String,
    /// Absolute, in the cache's store directory.
    pub store_path: String,
    pub store_path_hash: String,
    /// Unix seconds; `null` for a pin that does not expire.
    pub expires_at: Option<i64>,
    /// Unix seconds at which the pin was set to this path.
    pub created_at: i64,
    /// Whether `expires_at` has passed: the pin keeps nothing any more.
    pub expired: bool,
}

impl PinView {
    pub fn new(pin: &Pin, store_dir: &str, now: i64) -> Self {
        Self {
            name: pin.name.to_string(),
            store_path: format!("{store_dir}/{}", pin.store_path),
            store_path_hash: pin.store_path_hash.clone(),
            expires_at: pin.expires_at,
            created_at: pin.created_at,
            expired: pin.is_expired(now),
        }
    }
}

/// A page of pins; `next` is the `after` that fetches the next page, absent
/// on the last one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PinPage {
    pub pins: Vec<PinView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

impl PinPage {
    /// `pins` as [`garret_meta::Meta::pins`] returned them for `limit`: a
    /// full page may have a successor.
    pub fn new(pins: &[Pin], limit: u32, store_dir: &str, now: i64) -> Self {
        let full = u32::try_from(pins.len()).is_ok_and(|n| n >= limit);
        Self {
            pins: pins
                .iter()
                .map(|pin| PinView::new(pin, store_dir, now))
                .collect(),
            next: pins.last().filter(|_| full).map(|pin| pin.name.to_string()),
        }
    }
}

pub fn pin_name(name: &str) -> Result<PinName, Error> {
    PinName::new(name).map_err(|e| Error::InvalidArgument(e.to_string()))
}

/// What a pin may name: an absolute path in the cache's store directory
/// (as `nix build` prints it) or a base name `<hash>-<name>`.
pub fn pin_target(input: &str, store_dir: &str) -> Result<StorePath, Error> {
    let parsed = if input.starts_with('/') {
        StorePath::from_absolute_path_in(input, store_dir)
    } else {
        StorePath::from_base_name(input)
    };
    parsed.map_err(|e| Error::InvalidArgument(format!("invalid store path: {e}")))
}

/// The path a delete names: its hash alone (as the API's URL has it), a
/// base name, or an absolute path in the cache's store directory.
pub fn path_hash(input: &str, store_dir: &str) -> Result<StorePathHash, Error> {
    if input.len() == 32 {
        return input
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("invalid store path hash: {e}")));
    }
    pin_target(input, store_dir).map(|path| *path.hash())
}

/// A `NotFound` from the metadata is the client's miss here, not the race
/// with GC that it means on the upload paths (see `From<MetaError>`).
pub fn not_found(e: garret_meta::MetaError, what: impl FnOnce() -> String) -> Error {
    match e {
        garret_meta::MetaError::NotFound(_) => Error::NotFound(what()),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0c1k2qm3ff6j1lgk8ailbxdwqg0cvlb8";

    #[test]
    fn targets_absolute_or_base_names() {
        let base = format!("{HASH}-hello-2.12");
        for input in [base.clone(), format!("/nix/store/{base}")] {
            let path = pin_target(&input, "/nix/store").unwrap();
            assert_eq!(path.to_string(), base);
            assert_eq!(path_hash(&input, "/nix/store").unwrap().to_string(), HASH);
        }
        assert_eq!(path_hash(HASH, "/nix/store").unwrap().to_string(), HASH);
        for bad in [
            format!("/other/store/{base}"),
            format!("/nix/store/{base}/bin"),
            "hello".to_owned(),
            format!("{HASH}_hello"),
            "e".repeat(32),
        ] {
            let err = path_hash(&bad, "/nix/store").unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err}");
        }
    }
}
