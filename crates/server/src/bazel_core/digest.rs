//! REAPI digests as a domain type: a SHA-256 plus the content length.
//!
//! The wire form (`Digest { hash: String, size_bytes: i64 }`) admits
//! upper-case hex, other lengths and negative sizes; [`Digest::from_proto`]
//! is the one place they are refused, so every handler works on values that
//! are already valid.

use std::fmt;

use garret_nix::Sha256Hash;
use garret_proto::reapi;

/// Why a wire digest was refused. Derives `PartialEq` so tests can assert the
/// exact reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("a digest is required")]
    Missing,
    #[error("digest hash {0:?} is not 64 lower-case hex digits (SHA-256)")]
    BadHash(String),
    #[error("digest size {0} is negative")]
    NegativeSize(i64),
    /// Only the empty blob has size 0, and its hash is SHA-256 of nothing;
    /// any other pairing names content that cannot exist.
    #[error(
        "digest {hash}/{size} is impossible: only the empty blob (hash {EMPTY_HEX}) has size 0"
    )]
    ImpossibleEmpty { hash: String, size: u64 },
}

/// [`EMPTY_HASH`] as it appears on the wire.
const EMPTY_HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// A validated SHA-256 digest of `size` bytes of content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    pub hash: Sha256Hash,
    pub size: u64,
}

/// SHA-256 of no bytes: REAPI requires the empty blob to exist everywhere.
const EMPTY_HASH: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

impl Digest {
    /// The empty blob, which every instance holds without storing it.
    pub const EMPTY: Self = Self {
        hash: Sha256Hash::from_bytes(EMPTY_HASH),
        size: 0,
    };

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self {
            hash: Sha256Hash::of(data),
            size: data.len() as u64,
        }
    }

    /// Parses the textual parts of a digest, as they appear in resource names
    /// and in the wire message. A size of 0 with another hash than the empty
    /// blob's (or the empty blob's hash with another size) is refused here,
    /// so no handler can mistake it for the empty blob, which every instance
    /// holds without storing it.
    pub fn parse(hash: &str, size: i64) -> Result<Self, DigestError> {
        let size = u64::try_from(size).map_err(|_| DigestError::NegativeSize(size))?;
        let hash = parse_hex(hash)?;
        if (size == 0) != (*hash.as_bytes() == EMPTY_HASH) {
            return Err(DigestError::ImpossibleEmpty {
                hash: hash.to_hex(),
                size,
            });
        }
        Ok(Self { hash, size })
    }

    /// A hash alone, as Bazel's HTTP cache names blobs: the same strict
    /// lower-case hex as in REAPI digests.
    pub fn parse_hash(hash: &str) -> Result<Sha256Hash, DigestError> {
        parse_hex(hash)
    }

    pub fn from_proto(digest: &reapi::Digest) -> Result<Self, DigestError> {
        Self::parse(&digest.hash, digest.size_bytes)
    }

    /// For a field the protocol makes optional but the request needs.
    pub fn from_required(digest: Option<&reapi::Digest>) -> Result<Self, DigestError> {
        Self::from_proto(digest.ok_or(DigestError::Missing)?)
    }

    pub fn to_proto(self) -> reapi::Digest {
        reapi::Digest {
            hash: self.hash.to_hex(),
            size_bytes: i64::try_from(self.size).unwrap_or(i64::MAX),
        }
    }

    /// Whether this is the empty blob: size 0 *and* SHA-256 of nothing.
    /// (Parsing refuses the other size-0 digests; this still checks both, so
    /// a digest built in code cannot pass for the empty blob either.)
    pub fn is_empty(self) -> bool {
        self == Self::EMPTY
    }

    pub fn hash_bytes(&self) -> &[u8; 32] {
        self.hash.as_bytes()
    }
}

/// Strict lower-case hex: REAPI fixes the spelling, and accepting others
/// would let two spellings of one digest behave differently in caches that
/// key on the text.
fn parse_hex(text: &str) -> Result<Sha256Hash, DigestError> {
    let bad = || DigestError::BadHash(text.chars().take(80).collect());
    if text.len() != 64 {
        return Err(bad());
    }
    let mut bytes = [0u8; 32];
    for (byte, pair) in bytes.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        *byte = nibble(pair[0])
            .zip(nibble(pair[1]))
            .map(|(h, l)| h << 4 | l)
            .ok_or_else(bad)?;
    }
    Ok(Sha256Hash::from_bytes(bytes))
}

/// `hash/size`, the way resource names and logs show a digest.
impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hash.to_hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_digest_is_sha256_of_nothing() {
        assert_eq!(Digest::of(b""), Digest::EMPTY);
        assert_eq!(Digest::EMPTY.to_string(), format!("{EMPTY_HEX}/0"));
        assert!(Digest::EMPTY.is_empty());
    }

    #[test]
    fn parses_strictly() {
        assert_eq!(Digest::parse(EMPTY_HEX, 0), Ok(Digest::EMPTY));
        let upper = EMPTY_HEX.to_uppercase();
        assert_eq!(
            Digest::parse(&upper, 0),
            Err(DigestError::BadHash(upper.clone()))
        );
        assert!(matches!(
            Digest::parse(&EMPTY_HEX[1..], 0),
            Err(DigestError::BadHash(_))
        ));
        assert!(matches!(
            Digest::parse(&format!("{}g", &EMPTY_HEX[1..]), 0),
            Err(DigestError::BadHash(_))
        ));
        assert_eq!(
            Digest::parse(EMPTY_HEX, -1),
            Err(DigestError::NegativeSize(-1))
        );
        assert_eq!(Digest::from_required(None), Err(DigestError::Missing));
    }

    #[test]
    fn only_the_empty_hash_has_size_zero() {
        let other = Digest::of(b"x").hash.to_hex();
        assert_eq!(
            Digest::parse(&other, 0),
            Err(DigestError::ImpossibleEmpty {
                hash: other.clone(),
                size: 0
            })
        );
        assert_eq!(
            Digest::parse(EMPTY_HEX, 1),
            Err(DigestError::ImpossibleEmpty {
                hash: EMPTY_HEX.into(),
                size: 1
            })
        );
        // Built in code, not parsed: still not the empty blob.
        let forged = Digest {
            hash: Digest::of(b"x").hash,
            size: 0,
        };
        assert!(!forged.is_empty());
    }

    #[test]
    fn round_trips_through_the_wire_form() {
        let digest = Digest::of(b"hello");
        assert_eq!(Digest::from_proto(&digest.to_proto()), Ok(digest));
    }
}
