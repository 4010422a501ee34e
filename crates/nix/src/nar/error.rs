use thiserror::Error;

use super::wire::{MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN, MAX_TOKEN_LEN};

/// Why a byte stream is not a canonical NAR, or why a [`NarWriter`](super::NarWriter)
/// refused to produce one.
///
/// Offsets count bytes from the start of the archive, so a bad upload can be
/// inspected with `xxd -s`. For a bad string they point at its length prefix.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum NarError {
    #[error("not a NAR: it does not start with `nix-archive-1`")]
    BadMagic,
    #[error("expected {expected} at offset {offset}, found \"{}\"", .found.escape_ascii())]
    UnexpectedToken {
        offset: u64,
        expected: &'static str,
        found: Vec<u8>,
    },
    #[error(
        "expected {expected} at offset {offset}, found a string of {len} bytes \
         (tokens have at most {MAX_TOKEN_LEN})"
    )]
    TokenTooLong {
        offset: u64,
        expected: &'static str,
        len: u64,
    },
    #[error("non-zero padding at offset {offset}")]
    NonZeroPadding { offset: u64 },
    #[error("`executable` marker at offset {offset} has a non-empty value")]
    ExecutableNotEmpty { offset: u64 },
    #[error("entry name at offset {offset} has {len} bytes, more than {MAX_NAME_LEN}")]
    NameTooLong { offset: u64, len: u64 },
    #[error("invalid entry name \"{}\" at offset {offset}", .name.escape_ascii())]
    InvalidName { offset: u64, name: Vec<u8> },
    #[error(
        "entry \"{}\" at offset {offset} sorts before the previous entry \"{}\"",
        .name.escape_ascii(),
        .previous.escape_ascii()
    )]
    UnsortedEntry {
        offset: u64,
        previous: Vec<u8>,
        name: Vec<u8>,
    },
    #[error("duplicate entry \"{}\" at offset {offset}", .name.escape_ascii())]
    DuplicateEntry { offset: u64, name: Vec<u8> },
    #[error("symlink target at offset {offset} has {len} bytes, more than {MAX_TARGET_LEN}")]
    TargetTooLong { offset: u64, len: u64 },
    #[error("symlink target \"{}\" at offset {offset} is empty or contains NUL", .target.escape_ascii())]
    InvalidTarget { offset: u64, target: Vec<u8> },
    #[error("directory at offset {offset} is nested more than {MAX_DEPTH} levels deep")]
    TooDeep { offset: u64 },
    #[error("archive ends early, after {offset} bytes")]
    Truncated { offset: u64 },
    #[error("trailing data at offset {offset}, after the end of the archive")]
    TrailingData { offset: u64 },
}
