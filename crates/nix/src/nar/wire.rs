//! The NAR grammar, written down once for the [`Decoder`](super::Decoder) and
//! the [`NarWriter`](super::NarWriter).
//!
//! An archive is a sequence of strings. Each string is its length as a
//! little-endian `u64`, its bytes, and zero bytes up to the next multiple of 8:
//!
//! ```text
//! nar       = "nix-archive-1" node
//! node      = "(" "type" ( regular | symlink | directory ) ")"
//! regular   = "regular" [ "executable" "" ] "contents" <contents>
//! symlink   = "symlink" "target" <target>
//! directory = "directory" { "entry" "(" "name" <name> "node" node ")" }
//! ```
//!
//! Entries are sorted by name, compared bytewise like Nix's `std::string`.
//!
//! Only this canonical form, the one `nix-store --dump` writes, is accepted.
//! Nix's own parser tolerates other field orders, but accepting them would let
//! one file system tree have several NARs and so several NAR hashes.

use super::NarError;

pub const MAGIC: &[u8] = b"nix-archive-1";
pub const OPEN: &[u8] = b"(";
pub const CLOSE: &[u8] = b")";
pub const TYPE: &[u8] = b"type";
pub const REGULAR: &[u8] = b"regular";
pub const EXECUTABLE: &[u8] = b"executable";
pub const CONTENTS: &[u8] = b"contents";
pub const SYMLINK: &[u8] = b"symlink";
pub const TARGET: &[u8] = b"target";
pub const DIRECTORY: &[u8] = b"directory";
pub const ENTRY: &[u8] = b"entry";
pub const NAME: &[u8] = b"name";
pub const NODE: &[u8] = b"node";

/// The longest keyword after the magic (`executable`). A longer string where a
/// keyword belongs is rejected from its length prefix alone, before any of it
/// is buffered.
pub const MAX_TOKEN_LEN: usize = EXECUTABLE.len();

/// `NAME_MAX` on Linux: a longer entry could never be unpacked.
pub const MAX_NAME_LEN: usize = 255;

/// `PATH_MAX` minus the terminating NUL, the longest target `symlink(2)` takes.
pub const MAX_TARGET_LEN: usize = 4095;

/// How many directories may be nested.
///
/// Every open directory keeps its last entry name to check the order of the
/// next one, so this caps a decoder at 256 × 255 bytes however hostile its
/// input, and it caps the recursion of [`dump_path`](super::dump_path). No real
/// store path nests anywhere near this deep, and Nix itself cannot unpack more
/// than about 2048 levels, where the path hits `PATH_MAX`.
pub const MAX_DEPTH: usize = 256;

/// The zero bytes that follow a string of `len` bytes.
pub const fn padding_len(len: u64) -> usize {
    (len.wrapping_neg() % 8) as usize
}

/// Keywords as they appear on the wire, length prefix and padding included, so
/// the writer emits each with one write and the decoder recognises each with
/// one comparison.
pub(crate) mod framed {
    pub(crate) const MAGIC: &[u8] = &frame::<24>(super::MAGIC);
    pub(crate) const OPEN: &[u8] = &frame::<16>(super::OPEN);
    pub(crate) const CLOSE: &[u8] = &frame::<16>(super::CLOSE);
    pub(crate) const TYPE: &[u8] = &frame::<16>(super::TYPE);
    pub(crate) const REGULAR: &[u8] = &frame::<16>(super::REGULAR);
    pub(crate) const EXECUTABLE: &[u8] = &frame::<24>(super::EXECUTABLE);
    /// The empty value that follows `executable`.
    pub(crate) const EMPTY: &[u8] = &frame::<8>(b"");
    pub(crate) const CONTENTS: &[u8] = &frame::<16>(super::CONTENTS);
    pub(crate) const SYMLINK: &[u8] = &frame::<16>(super::SYMLINK);
    pub(crate) const TARGET: &[u8] = &frame::<16>(super::TARGET);
    pub(crate) const DIRECTORY: &[u8] = &frame::<24>(super::DIRECTORY);
    pub(crate) const ENTRY: &[u8] = &frame::<16>(super::ENTRY);
    pub(crate) const NAME: &[u8] = &frame::<16>(super::NAME);
    pub(crate) const NODE: &[u8] = &frame::<16>(super::NODE);

    /// The keyword inside a framed keyword.
    pub(crate) fn text(framed: &[u8]) -> &[u8] {
        &framed[8..8 + usize::from(framed[0])]
    }

    /// Frames `keyword`; `N` must be its framed size, which the build checks.
    const fn frame<const N: usize>(keyword: &[u8]) -> [u8; N] {
        assert!(N == 8 + keyword.len() + super::padding_len(keyword.len() as u64));
        assert!(keyword.len() < 256, "`text` reads the length from one byte");
        let mut out = [0; N];
        let (len, rest) = out.split_at_mut(8);
        len.copy_from_slice(&(keyword.len() as u64).to_le_bytes());
        rest.split_at_mut(keyword.len()).0.copy_from_slice(keyword);
        out
    }
}

/// Checks a directory entry name the way Nix does before it creates the file.
pub(crate) fn check_name(offset: u64, name: &[u8]) -> Result<(), NarError> {
    if name.len() > MAX_NAME_LEN {
        return Err(NarError::NameTooLong {
            offset,
            len: name.len() as u64,
        });
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(NarError::InvalidName {
            offset,
            name: name.to_vec(),
        });
    }
    Ok(())
}

/// Checks a symlink target. Nix does not, but no file system can hold an empty
/// target or one with a NUL, so such an archive can only be forged.
pub(crate) fn check_target(offset: u64, target: &[u8]) -> Result<(), NarError> {
    if target.len() > MAX_TARGET_LEN {
        return Err(NarError::TargetTooLong {
            offset,
            len: target.len() as u64,
        });
    }
    if target.is_empty() || target.contains(&0) {
        return Err(NarError::InvalidTarget {
            offset,
            target: target.to_vec(),
        });
    }
    Ok(())
}

/// The directories open at some point of an archive, each with the name of its
/// last entry so far, so that reading and writing enforce the same order.
#[derive(Debug, Default)]
pub(crate) struct DirStack {
    /// The last entry name of every open directory, concatenated, innermost last.
    /// One buffer rather than one `Vec` per level keeps a deep archive from
    /// allocating per directory.
    names: Vec<u8>,
    /// Where each open directory's last entry name starts in `names`.
    starts: Vec<usize>,
}

impl DirStack {
    pub(crate) fn depth(&self) -> usize {
        self.starts.len()
    }

    /// Opens a directory whose `directory` keyword is at `offset`.
    pub(crate) fn open(&mut self, offset: u64) -> Result<(), NarError> {
        if self.starts.len() == MAX_DEPTH {
            return Err(NarError::TooDeep { offset });
        }
        self.starts.push(self.names.len());
        Ok(())
    }

    /// Records the next entry of the innermost directory, whose name is at `offset`.
    pub(crate) fn entry(&mut self, offset: u64, name: &[u8]) -> Result<(), NarError> {
        check_name(offset, name)?;
        let start = *self.starts.last().expect("an entry outside any directory");
        let previous = &self.names[start..];
        // Names are never empty, so an empty `previous` means a first entry.
        if !previous.is_empty() {
            match name.cmp(previous) {
                std::cmp::Ordering::Less => {
                    return Err(NarError::UnsortedEntry {
                        offset,
                        previous: previous.to_vec(),
                        name: name.to_vec(),
                    });
                }
                std::cmp::Ordering::Equal => {
                    return Err(NarError::DuplicateEntry {
                        offset,
                        name: name.to_vec(),
                    });
                }
                std::cmp::Ordering::Greater => {}
            }
        }
        self.names.truncate(start);
        self.names.extend_from_slice(name);
        Ok(())
    }

    pub(crate) fn close(&mut self) {
        let start = self
            .starts
            .pop()
            .expect("closing a directory that is not open");
        self.names.truncate(start);
    }
}
