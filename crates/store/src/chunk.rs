//! Chunk identity and the manifest that describes a stored blob.

use std::fmt;

use garret_nix::Sha256Hash;

/// A chunk is named by the SHA-256 of its *uncompressed* bytes, so identical
/// content dedups whatever codec stored it, across caches and protocols.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub Sha256Hash);

impl ChunkHash {
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256Hash::of(data))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// Key of the chunk's own object (stores written before packs): a format
    /// version, then a two-hex-digit fan-out so no directory or S3 prefix
    /// grows unbounded.
    pub fn object_key(&self) -> String {
        let hex = self.0.to_hex();
        format!("chunks/v1/{}/{hex}", &hex[..2])
    }

    /// The chunk an object key names, if it is one [`ChunkHash::object_key`]
    /// makes.
    pub fn from_object_key(key: &str) -> Option<Self> {
        parse_key(key, "chunks/v1/").map(|bytes| Self(Sha256Hash::from_bytes(bytes)))
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_hex())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({self})")
    }
}

/// A pack: one object holding the stored frames of many chunks, written
/// once by one upload (or one batch of small uploads) and never appended to
/// afterwards.
///
/// Packs exist because an object per chunk costs a file create and an
/// `fdatasync` (or a PUT) per 64 KiB; a pack costs one per several MiB. A
/// pack is named by a random id rather than by its content: its content is
/// only known once it is full, and which chunks it holds is recorded in the
/// metadata, each chunk's frame still checked against its own hash on every
/// read.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    /// A fresh id from the operating system's random source: 128 bits make
    /// a collision between any two writers, on any replica, negligible.
    pub fn random() -> Self {
        let mut id = [0; 16];
        getrandom::fill(&mut id).expect("the OS random source works");
        Self(id)
    }

    /// Key of the pack's object: a format version and the same two-hex-digit
    /// fan-out as chunk objects.
    pub fn object_key(&self) -> String {
        let hex = self.to_string();
        format!("packs/v1/{}/{hex}", &hex[..2])
    }

    /// The pack an object key names, if it is one [`PackId::object_key`]
    /// makes: how GC tells packs from other objects it lists.
    pub fn from_object_key(key: &str) -> Option<Self> {
        parse_key(key, "packs/v1/").map(Self)
    }
}

/// The bytes of a key `{prefix}{fan-out}/{hex}`, with the fan-out equal to
/// the first two hex digits.
fn parse_key<const N: usize>(key: &str, prefix: &str) -> Option<[u8; N]> {
    let (fan_out, hex) = key.strip_prefix(prefix)?.split_once('/')?;
    if hex.len() != 2 * N || !hex.starts_with(fan_out) || fan_out.len() != 2 {
        return None;
    }
    let mut bytes = [0; N];
    for (byte, pair) in bytes.iter_mut().zip(hex.as_bytes().chunks(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        if !pair.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(bytes)
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({self})")
    }
}

/// A pack as written: what the metadata records next to its chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackInfo {
    pub id: PackId,
    /// Bytes in the object: every frame written to it, including frames a
    /// concurrent writer's commit made redundant.
    pub size: u64,
}

/// Where a chunk's stored frame lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkPlace {
    /// An object of its own, named by the chunk's hash: how chunks were
    /// stored before packs, still read.
    Object,
    /// `stored_size` bytes at `offset` in a pack.
    Pack { pack: PackId, offset: u64 },
}

/// One chunk's place in a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub id: ChunkHash,
    /// Uncompressed offset of the chunk's first byte in the blob.
    pub offset: u64,
    /// Uncompressed length.
    pub size: u32,
    /// Offset of the chunk's stored frame in the concatenation of all frames
    /// (the "file" a Nix client downloads), so ranged downloads of the
    /// compressed file map to chunks without decompressing anything.
    pub file_offset: u64,
    /// Length of the stored zstd frame.
    pub stored_size: u32,
    /// SHA-256 of the stored frame: lets a writer that dedups a chunk prove the
    /// stored frame equals the one it produced, so the blob's file hash is right.
    pub frame_hash: Sha256Hash,
    /// Where the frame is stored.
    pub place: ChunkPlace,
}

impl ChunkRef {
    /// Key of the object holding the chunk's frame.
    pub fn object_key(&self) -> String {
        match self.place {
            ChunkPlace::Object => self.id.object_key(),
            ChunkPlace::Pack { pack, .. } => pack.object_key(),
        }
    }

    /// The pack holding the chunk, if it is in one.
    pub fn pack(&self) -> Option<PackId> {
        match self.place {
            ChunkPlace::Object => None,
            ChunkPlace::Pack { pack, .. } => Some(pack),
        }
    }

    /// The frame's bytes within that object.
    pub fn object_range(&self) -> std::ops::Range<u64> {
        let start = match self.place {
            ChunkPlace::Object => 0,
            ChunkPlace::Pack { offset, .. } => offset,
        };
        start..start + u64::from(self.stored_size)
    }

    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.size)
    }

    pub fn file_end(&self) -> u64 {
        self.file_offset + u64::from(self.stored_size)
    }
}

/// What the store knows about a blob once every chunk is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// SHA-256 and length of the uncompressed content.
    pub hash: Sha256Hash,
    pub size: u64,
    /// SHA-256 and length of the concatenated stored frames: a valid zstd
    /// stream, served to Nix as `FileHash`/`FileSize`.
    pub file_hash: Sha256Hash,
    pub file_size: u64,
    pub chunks: Vec<ChunkRef>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_parse_back() {
        let pack = PackId([0xab; 16]);
        assert_eq!(PackId::from_object_key(&pack.object_key()), Some(pack));
        let chunk = ChunkHash::of(b"chunk");
        assert_eq!(ChunkHash::from_object_key(&chunk.object_key()), Some(chunk));
        let hex = "ab".repeat(16);
        for other in [
            format!("packs/v1/ab/.partial-{hex}"),
            format!("packs/v1/cd/{hex}"),
            format!("packs/v2/ab/{hex}"),
            format!("packs/v1/ab/{}", "AB".repeat(16)),
            format!("packs/v1/ab/{hex}0"),
            chunk.object_key(),
        ] {
            assert_eq!(PackId::from_object_key(&other), None, "{other}");
        }
        assert_eq!(ChunkHash::from_object_key(&pack.object_key()), None);
    }
}
