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

    /// Key of the chunk's object in the blob backend: a format version, then a
    /// two-hex-digit fan-out so no directory or S3 prefix grows unbounded.
    pub fn object_key(&self) -> String {
        let hex = self.0.to_hex();
        format!("chunks/v1/{}/{hex}", &hex[..2])
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
}

impl ChunkRef {
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
