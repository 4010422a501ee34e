//! Fresh databases of both kinds, raw SQL access for inspecting invariants the
//! API does not expose, and builders for blobs.

use std::ops::Deref;
use std::time::Duration;

use garret_meta::testing::PgCluster;
use std::collections::HashMap;

use garret_meta::{
    ChunkCompression, Meta, MetaError, NewBlob, NewCache, NewChunkRef, NewPack, PackPlace,
};
use sqlx::{PgPool, SqlitePool};

/// Grace period in the tests: short numbers keep the time arithmetic legible.
pub const GRACE: i64 = 100;

/// A migrated [`Meta`] on a database no other test uses, plus a separate pool
/// on the same database for peeking at rows.
pub struct TestDb {
    pub meta: Meta,
    pub raw: Raw,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

pub enum Raw {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl Deref for TestDb {
    type Target = Meta;
    fn deref(&self) -> &Meta {
        &self.meta
    }
}

pub async fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    // The file does not exist yet: `connect` must create it.
    let url = format!("sqlite://{}/meta.db", dir.path().display());
    let meta = connect(&url).await;
    let raw = Raw::Sqlite(SqlitePool::connect(&url).await.unwrap());
    TestDb {
        meta,
        raw,
        url,
        _dir: Some(dir),
    }
}

pub async fn postgres() -> TestDb {
    let url = PgCluster::shared().fresh_database().await;
    let meta = connect(&url).await;
    let raw = Raw::Postgres(PgPool::connect(&url).await.unwrap());
    TestDb {
        meta,
        raw,
        url,
        _dir: None,
    }
}

async fn connect(url: &str) -> Meta {
    let meta = Meta::connect(url)
        .await
        .unwrap()
        .with_grace(Duration::from_secs(GRACE.unsigned_abs()));
    meta.migrate().await.unwrap();
    meta
}

/// Expands to one `#[tokio::test]` per backend, `<name>::sqlite` and
/// `<name>::postgres`, each given a fresh [`TestDb`].
macro_rules! both {
    ($(async fn $name:ident($db:ident: $ty:ty) $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test]
            async fn sqlite() {
                let $db: $ty = crate::support::sqlite().await;
                $body
            }

            #[tokio::test]
            async fn postgres() {
                let $db: $ty = crate::support::postgres().await;
                $body
            }
        }
    )*};
}
pub(crate) use both;

/// Runs the same read-only SQL on whichever raw pool the test has.
macro_rules! raw {
    ($db:expr, |$pool:ident| $body:expr) => {
        match &$db.raw {
            Raw::Postgres($pool) => $body.await,
            Raw::Sqlite($pool) => $body.await,
        }
    };
}

/// `(refcount, deletable_at, state)` of a chunk row.
pub type ChunkState = (i64, Option<i64>, String);

impl TestDb {
    pub async fn chunk_state(&self, hash: [u8; 32]) -> Option<ChunkState> {
        raw!(self, |pool| sqlx::query_as(
            "SELECT refcount, deletable_at, state FROM chunks WHERE hash = $1"
        )
        .bind(&hash[..])
        .fetch_optional(pool))
        .unwrap()
    }

    /// `(refcount, deletable_at)` of a blob row.
    pub async fn blob_state(&self, hash: [u8; 32]) -> Option<(i64, Option<i64>)> {
        raw!(self, |pool| sqlx::query_as(
            "SELECT refcount, deletable_at FROM blobs WHERE hash = $1"
        )
        .bind(&hash[..])
        .fetch_optional(pool))
        .unwrap()
    }

    pub async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        let (n,): (i64,) = raw!(self, |pool| sqlx::query_as(&sql).fetch_one(pool)).unwrap();
        n
    }

    /// Recounts every refcount from the rows that hold the references, the
    /// repair query a GC worker could run, and checks the stored ones agree.
    pub async fn assert_refcounts_consistent(&self) {
        let bad_chunks: Vec<(i64,)> = raw!(self, |pool| sqlx::query_as(
            "SELECT c.id FROM chunks c WHERE c.refcount <> \
               (SELECT COUNT(*) FROM blob_chunks bc WHERE bc.chunk_id = c.id)"
        )
        .fetch_all(pool))
        .unwrap();
        assert!(bad_chunks.is_empty(), "chunk refcounts off: {bad_chunks:?}");
        let bad_blobs: Vec<(i64,)> = raw!(self, |pool| sqlx::query_as(
            "SELECT b.id FROM blobs b WHERE b.refcount <> \
               (SELECT COUNT(*) FROM nix_objects o WHERE o.blob_id = b.id) + \
               (SELECT COUNT(*) FROM cas_entries e WHERE e.blob_id = b.id)"
        )
        .fetch_all(pool))
        .unwrap();
        assert!(bad_blobs.is_empty(), "blob refcounts off: {bad_blobs:?}");
    }

    pub async fn cache_named(&self, name: &str) -> garret_meta::CacheId {
        self.create_cache(&new_cache(name), 0).await.unwrap().id
    }
}

pub fn new_cache(name: &str) -> NewCache {
    NewCache {
        name: name.to_owned(),
        is_public: true,
        store_dir: "/nix/store".into(),
        priority: 41,
        signing_key: format!("{name}-1:c2VjcmV0"),
        upstream_cache_key_names: vec!["cache.nixos.org-1".into()],
        retention_period: None,
    }
}

/// A digest that is easy to tell apart in failure output.
pub fn h(n: u32) -> [u8; 32] {
    let mut out = [0xaa; 32];
    out[..4].copy_from_slice(&n.to_be_bytes());
    out
}

/// The stored frame's SHA-256 of chunk `h(n)` in [`blob`].
pub fn frame(n: u32) -> [u8; 32] {
    let mut out = [0xfb; 32];
    out[..4].copy_from_slice(&n.to_be_bytes());
    out
}

/// The key of the pack [`blob`] `name` stores its chunks in.
pub fn pack(name: u32) -> [u8; 16] {
    let mut out = [0xcc; 16];
    out[..4].copy_from_slice(&name.to_be_bytes());
    out
}

/// The stored frame hash of every chunk of `hashes` that is present.
pub async fn present(
    db: &Meta,
    hashes: &[[u8; 32]],
    now: i64,
) -> Result<HashMap<[u8; 32], [u8; 32]>, MetaError> {
    let present = db.present_chunks(hashes, now).await?;
    Ok(present
        .into_iter()
        .map(|(h, c)| (h, c.frame_hash))
        .collect())
}

/// A blob named `name` made of chunks `(id, size)` in order, all of which
/// this writer uploaded, in blob order, into one pack, [`pack`]`(name)`.
/// Chunk `id` is stored as a frame of `size / 2 + 1` bytes hashing to
/// `frame(id)`.
pub fn blob(name: u32, chunks: &[(u32, u64)]) -> NewBlob {
    let mut offset = 0;
    let mut file_offset = 0;
    let chunks: Vec<NewChunkRef> = chunks
        .iter()
        .map(|&(id, size)| {
            let chunk = NewChunkRef {
                hash: h(id),
                size,
                stored_size: size / 2 + 1,
                frame_hash: frame(id),
                compression: ChunkCompression::Zstd,
                offset,
                file_offset,
                uploaded: true,
                pack: Some(PackPlace {
                    pack: pack(name),
                    offset: file_offset,
                }),
            };
            offset += chunk.size;
            file_offset += chunk.stored_size;
            chunk
        })
        .collect();
    NewBlob {
        hash: h(name),
        size: offset,
        file_hash: h(name + 1_000_000),
        file_size: file_offset,
        chunks,
        packs: if file_offset > 0 {
            vec![NewPack {
                key: pack(name),
                size: file_offset,
            }]
        } else {
            Vec::new()
        },
    }
}

/// The same blob, as a writer that found every chunk already stored sends it.
pub fn deduplicated(mut blob: NewBlob) -> NewBlob {
    for chunk in &mut blob.chunks {
        chunk.uploaded = false;
    }
    blob
}
