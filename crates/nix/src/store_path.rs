//! Store paths: `/nix/store/<32-char nix32 hash>-<name>`, validated the way Nix 2.8
//! validates them so that nothing we accept is refused by a client later.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::nixbase32;

/// The store directory every public Nix cache uses.
pub const DEFAULT_STORE_DIR: &str = "/nix/store";

/// Longest store path name Nix accepts (`StorePath::MaxPathLen`).
pub const MAX_NAME_LEN: usize = 211;

const HASH_LEN: usize = 20;
const HASH_CHARS: usize = nixbase32::encoded_len(HASH_LEN);

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum StorePathError {
    #[error("store path hash {0:?} is not 32 nix32 characters")]
    BadHash(String),
    #[error("store path {0:?} has no `-` between hash and name")]
    MissingDash(String),
    #[error("store path {0:?} has an empty name")]
    EmptyName(String),
    #[error("store path {0:?} has a name longer than {MAX_NAME_LEN} characters")]
    NameTooLong(String),
    #[error("store path {0:?} has a name starting with `.`")]
    LeadingDot(String),
    #[error("store path {path:?} contains the illegal character {character:?}")]
    IllegalCharacter { path: String, character: char },
    #[error("path {path:?} is not directly inside the store directory {store_dir:?}")]
    NotInStore { path: String, store_dir: String },
}

/// The 20-byte digest that starts every store path basename, and the key a
/// binary cache is queried by (`<hash>.narinfo`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePathHash([u8; HASH_LEN]);

impl StorePathHash {
    pub const fn from_bytes(bytes: [u8; HASH_LEN]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; HASH_LEN] {
        &self.0
    }
}

impl FromStr for StorePathHash {
    type Err = StorePathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != HASH_CHARS {
            return Err(StorePathError::BadHash(s.to_owned()));
        }
        nixbase32::decode_fixed(s.as_bytes())
            .map(Self)
            .map_err(|_| StorePathError::BadHash(s.to_owned()))
    }
}

impl fmt::Display for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&nixbase32::encode(&self.0))
    }
}

impl fmt::Debug for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePathHash({self})")
    }
}

/// A store path without its store directory; `Display` prints the basename.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    hash: StorePathHash,
    name: String,
}

impl StorePath {
    /// Builds a store path from a hash and a name, validating the name.
    pub fn new(hash: StorePathHash, name: &str) -> Result<Self, StorePathError> {
        validate_name(name, name)?;
        Ok(Self {
            hash,
            name: name.to_owned(),
        })
    }

    /// Parses a basename such as `0c1k...-hello-2.12`.
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        let hash = base
            .get(..HASH_CHARS)
            .ok_or_else(|| StorePathError::BadHash(base.to_owned()))?;
        let hash = hash.parse()?;
        let name = base[HASH_CHARS..]
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::MissingDash(base.to_owned()))?;
        validate_name(base, name)?;
        Ok(Self {
            hash,
            name: name.to_owned(),
        })
    }

    /// Parses an absolute path directly inside `store_dir` (no trailing slash).
    pub fn from_absolute_path_in(path: &str, store_dir: &str) -> Result<Self, StorePathError> {
        let not_in_store = || StorePathError::NotInStore {
            path: path.to_owned(),
            store_dir: store_dir.to_owned(),
        };
        let base = path
            .strip_prefix(store_dir)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(not_in_store)?;
        if base.contains('/') {
            return Err(not_in_store());
        }
        Self::from_base_name(base)
    }

    /// Parses an absolute path in [`DEFAULT_STORE_DIR`].
    pub fn from_absolute_path(path: &str) -> Result<Self, StorePathError> {
        Self::from_absolute_path_in(path, DEFAULT_STORE_DIR)
    }

    pub fn hash(&self) -> &StorePathHash {
        &self.hash
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn to_absolute_path_in(&self, store_dir: &str) -> String {
        format!("{store_dir}/{self}")
    }

    pub fn to_absolute_path(&self) -> String {
        self.to_absolute_path_in(DEFAULT_STORE_DIR)
    }
}

fn validate_name(path: &str, name: &str) -> Result<(), StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::EmptyName(path.to_owned()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong(path.to_owned()));
    }
    if name.starts_with('.') {
        return Err(StorePathError::LeadingDot(path.to_owned()));
    }
    let legal = |c: char| c.is_ascii_alphanumeric() || "+-._?=".contains(c);
    if let Some(character) = name.chars().find(|c| !legal(*c)) {
        return Err(StorePathError::IllegalCharacter {
            path: path.to_owned(),
            character,
        });
    }
    Ok(())
}

impl FromStr for StorePath {
    type Err = StorePathError;

    /// Accepts a basename or an absolute path in the default store directory.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with('/') {
            Self::from_absolute_path(s)
        } else {
            Self::from_base_name(s)
        }
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.hash, self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HASH: &str = "00bgd045z0d4icpbc2yyz4gx48ak44la";

    #[test]
    fn parses_basenames_and_absolute_paths() {
        let base = format!("{HASH}-net-tools-1.60_p20170221182432");
        let path: StorePath = base.parse().unwrap();
        assert_eq!(path.hash().to_string(), HASH);
        assert_eq!(path.name(), "net-tools-1.60_p20170221182432");
        assert_eq!(path.to_string(), base);
        let abs = format!("/nix/store/{base}");
        assert_eq!(abs.parse::<StorePath>().unwrap(), path);
        assert_eq!(path.to_absolute_path(), abs);
        assert_eq!(
            StorePath::from_absolute_path_in(&format!("/gnu/store/{base}"), "/gnu/store").unwrap(),
            path
        );
    }

    /// An input and a check of the error it must produce.
    type Case = (String, fn(&StorePathError) -> bool);

    #[test]
    fn rejects_invalid_paths() {
        let cases: &[Case] = &[
            ("short-name".into(), |e| {
                matches!(e, StorePathError::BadHash(_))
            }),
            // `e`, `o`, `u` and `t` are not in the nix32 alphabet.
            (format!("{}e-x", &HASH[..31]), |e| {
                matches!(e, StorePathError::BadHash(_))
            }),
            (format!("{HASH}x"), |e| {
                matches!(e, StorePathError::MissingDash(_))
            }),
            (format!("{HASH}-"), |e| {
                matches!(e, StorePathError::EmptyName(_))
            }),
            (format!("{HASH}-.hidden"), |e| {
                matches!(e, StorePathError::LeadingDot(_))
            }),
            (format!("{HASH}-a b"), |e| {
                matches!(e, StorePathError::IllegalCharacter { character: ' ', .. })
            }),
            (format!("{HASH}-{}", "a".repeat(212)), |e| {
                matches!(e, StorePathError::NameTooLong(_))
            }),
            (format!("/nix/store/{HASH}-a/bin"), |e| {
                matches!(e, StorePathError::NotInStore { .. })
            }),
            (format!("/nix/storex/{HASH}-a"), |e| {
                matches!(e, StorePathError::NotInStore { .. })
            }),
        ];
        for (input, check) in cases {
            let err = input.parse::<StorePath>().unwrap_err();
            assert!(check(&err), "{input}: {err:?}");
        }
        assert!(
            format!("{HASH}-{}", "a".repeat(211))
                .parse::<StorePath>()
                .is_ok()
        );
    }

    proptest! {
        #[test]
        fn round_trip(bytes in any::<[u8; 20]>(), name in "[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]{0,210}") {
            let path = StorePath::new(StorePathHash::from_bytes(bytes), &name).unwrap();
            prop_assert_eq!(path.to_string().parse::<StorePath>().unwrap(), path);
        }
    }
}
