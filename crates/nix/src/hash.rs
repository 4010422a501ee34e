//! SHA-256 digests as Nix writes them: `sha256:<nix32>` in narinfo, with base16,
//! base64 and SRI (`sha256-<base64>`) accepted on input like Nix 2.8 does.
//!
//! Only SHA-256 is supported: it is the only algorithm Nix uses for NAR and file
//! hashes in binary caches, and refusing others keeps every stored hash comparable.

use std::fmt;
use std::str::FromStr;

use data_encoding::{BASE64, HEXLOWER, HEXLOWER_PERMISSIVE};
use sha2::Digest as _;
use thiserror::Error;

use crate::nixbase32;

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum HashError {
    #[error("unsupported hash algorithm {0:?} (only sha256 is supported)")]
    UnsupportedAlgorithm(String),
    #[error("hash {0:?} has no `sha256:` or `sha256-` prefix")]
    MissingPrefix(String),
    #[error("hash {0:?} is not valid base16, nix32 or base64 for sha256")]
    BadEncoding(String),
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Hash([u8; 32]);

impl Sha256Hash {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Hashes a byte slice in one go; use [`Sha256Hasher`] for streams.
    pub fn of(data: &[u8]) -> Self {
        Self(sha2::Sha256::digest(data).into())
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        HEXLOWER.encode(&self.0)
    }

    pub fn to_nix32(&self) -> String {
        nixbase32::encode(&self.0)
    }

    /// `sha256-<base64>`, the form Nix calls SRI.
    pub fn to_sri(&self) -> String {
        format!("sha256-{}", BASE64.encode(&self.0))
    }

    /// Parses the unprefixed digest in base16 (64), nix32 (52) or base64 (44 chars).
    pub fn parse_digest(text: &str) -> Result<Self, HashError> {
        let bad = || HashError::BadEncoding(text.to_owned());
        let bytes = match text.len() {
            64 => HEXLOWER_PERMISSIVE
                .decode(text.as_bytes())
                .map_err(|_| bad())?,
            52 => nixbase32::decode(text.as_bytes()).map_err(|_| bad())?,
            44 => BASE64.decode(text.as_bytes()).map_err(|_| bad())?,
            _ => return Err(bad()),
        };
        Ok(Self(bytes.try_into().map_err(|_| bad())?))
    }

    /// Parses `sha256:<base16|nix32|base64>` or SRI `sha256-<base64>`.
    pub fn parse_prefixed(text: &str) -> Result<Self, HashError> {
        if let Some(rest) = text.strip_prefix("sha256:") {
            return Self::parse_digest(rest);
        }
        if let Some(rest) = text.strip_prefix("sha256-") {
            if rest.len() != 44 {
                return Err(HashError::BadEncoding(text.to_owned()));
            }
            return Self::parse_digest(rest);
        }
        match text.split_once([':', '-']) {
            Some((algo, _)) if !algo.is_empty() => {
                Err(HashError::UnsupportedAlgorithm(algo.to_owned()))
            }
            _ => Err(HashError::MissingPrefix(text.to_owned())),
        }
    }
}

/// `sha256:<nix32>`, the canonical form in narinfo files and fingerprints.
impl fmt::Display for Sha256Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_nix32())
    }
}

impl fmt::Debug for Sha256Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Hash({})", self.to_hex())
    }
}

impl FromStr for Sha256Hash {
    type Err = HashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_prefixed(s)
    }
}

/// Incremental SHA-256 that also counts bytes, since every Nix hash travels
/// with a size (NarHash/NarSize, FileHash/FileSize).
#[derive(Clone, Default)]
pub struct Sha256Hasher {
    inner: sha2::Sha256,
    len: u64,
}

impl fmt::Debug for Sha256Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sha256Hasher")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Sha256Hasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.len += data.len() as u64;
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> (Sha256Hash, u64) {
        (Sha256Hash(self.inner.finalize().into()), self.len)
    }
}

impl std::io::Write for Sha256Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const EMPTY_NIX32: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
    const EMPTY_B64: &str = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

    #[test]
    fn parses_every_encoding() {
        let expected = Sha256Hash::of(b"");
        for text in [
            format!("sha256:{EMPTY_HEX}"),
            format!("sha256:{}", EMPTY_HEX.to_uppercase()),
            format!("sha256:{EMPTY_NIX32}"),
            format!("sha256:{EMPTY_B64}"),
            format!("sha256-{EMPTY_B64}"),
        ] {
            assert_eq!(text.parse::<Sha256Hash>().unwrap(), expected, "{text}");
        }
        assert_eq!(expected.to_string(), format!("sha256:{EMPTY_NIX32}"));
        assert_eq!(expected.to_sri(), format!("sha256-{EMPTY_B64}"));
    }

    #[test]
    fn rejects_bad_hashes() {
        assert_eq!(
            "md5:d41d8cd98f00b204e9800998ecf8427e".parse::<Sha256Hash>(),
            Err(HashError::UnsupportedAlgorithm("md5".into()))
        );
        assert!(matches!(
            EMPTY_HEX.parse::<Sha256Hash>(),
            Err(HashError::MissingPrefix(_))
        ));
        assert!(matches!(
            "sha256:abc".parse::<Sha256Hash>(),
            Err(HashError::BadEncoding(_))
        ));
        assert!(matches!(
            format!("sha256-{EMPTY_HEX}").parse::<Sha256Hash>(),
            Err(HashError::BadEncoding(_))
        ));
    }

    #[test]
    fn hasher_counts_bytes() {
        let mut hasher = Sha256Hasher::new();
        hasher.update(b"hello ");
        hasher.update(b"world");
        assert_eq!(hasher.finish(), (Sha256Hash::of(b"hello world"), 11));
    }
}
