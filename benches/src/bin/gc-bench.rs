//! One garbage collection over a store of about a million chunk rows: how
//! long each run of `garret_server::gc::collect` takes and the process's
//! peak memory while it runs.
//!
//! `cargo run --release -p garret-benches --bin gc-bench [-- sqlite|postgres|DATABASE_URL [CHUNKS]]`
//!
//! The metadata is real: SQLite in a temporary directory (the default), a
//! throwaway Postgres 15 cluster (`postgres`, as the tests start one), or
//! the database URL given; the chunk objects are not written, since the runs
//! measured here delete packs, which the backend treats as already gone
//! when absent. Blobs of 100 chunks, one pack each: half are referenced by
//! CAS entries that expired long ago, a quarter by fresh ones, and a
//! quarter by nothing. Four runs a grace period apart take the chains to
//! their end: expiry, blobs, chunks (and dead packs found), packs deleted.

// Figures for humans: float precision and 64-bit sizes are not a concern.
#![allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]

use std::time::Instant;

use garret_benches::Probe;
use garret_meta::{ChunkCompression, Meta, NewBlob, NewCache, NewChunkRef, NewPack, PackPlace};
use garret_server::config::Gc;
use garret_store::{Backend, ChunkStore, FsBackend, StoreConfig};

const CHUNKS_PER_BLOB: u64 = 100;
const DAY: i64 = 86_400;

fn digest(kind: u8, n: u64) -> [u8; 32] {
    let mut out = [kind; 32];
    out[..8].copy_from_slice(&n.to_be_bytes());
    out
}

/// Blob `n`: `CHUNKS_PER_BLOB` chunks of 64 KiB (32 KiB stored) of its own,
/// in one pack.
fn blob(n: u64) -> NewBlob {
    let pack = {
        let mut key = [0xaa; 16];
        key[..8].copy_from_slice(&n.to_be_bytes());
        key
    };
    let chunks: Vec<NewChunkRef> = (0..CHUNKS_PER_BLOB)
        .map(|i| NewChunkRef {
            hash: digest(1, n * CHUNKS_PER_BLOB + i),
            size: 65_536,
            stored_size: 32_768,
            frame_hash: digest(2, n * CHUNKS_PER_BLOB + i),
            compression: ChunkCompression::Zstd,
            offset: i * 65_536,
            file_offset: i * 32_768,
            uploaded: true,
            pack: Some(PackPlace {
                pack,
                offset: i * 32_768,
            }),
        })
        .collect();
    NewBlob {
        hash: digest(3, n),
        size: CHUNKS_PER_BLOB * 65_536,
        file_hash: digest(4, n),
        file_size: CHUNKS_PER_BLOB * 32_768,
        chunks,
        packs: vec![NewPack {
            key: pack,
            size: CHUNKS_PER_BLOB * 32_768,
        }],
    }
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = std::env::args().skip(1);
    let url = match args.next().as_deref() {
        None | Some("sqlite") => format!("sqlite:{}", dir.path().join("garret.db").display()),
        Some("postgres") => {
            garret_meta::testing::PgCluster::shared()
                .fresh_database()
                .await
        }
        Some(url) => url.to_owned(),
    };
    let chunks: u64 = args.next().map_or(1_000_000, |n| n.parse().unwrap());
    let meta = Meta::connect(&url).await.unwrap();
    meta.migrate().await.unwrap();
    let grace = meta.grace().as_secs().cast_signed();
    let store = ChunkStore::new(
        garret_server::metrics::storage::Measured::new(
            Backend::Fs(FsBackend::new(dir.path().join("chunks")).unwrap()),
            garret_server::metrics::Metrics::new(),
        ),
        StoreConfig::default(),
    );
    let cache = meta
        .create_cache(
            &NewCache {
                name: "bench".into(),
                is_public: false,
                store_dir: "/nix/store".into(),
                priority: 41,
                signing_key: "bench-1:c2VjcmV0".into(),
                upstream_cache_key_names: Vec::new(),
                retention_period: None,
            },
            0,
        )
        .await
        .unwrap()
        .id;

    let now = garret_server::clock::unix_now();
    let blobs = chunks / CHUNKS_PER_BLOB;
    let started = Instant::now();
    for first in (0..blobs).step_by(50) {
        let batch: Vec<NewBlob> = (first..(first + 50).min(blobs)).map(blob).collect();
        let committed = meta.commit_blobs(&batch, now).await.unwrap();
        for (i, commit) in committed.iter().enumerate() {
            match (first + i as u64) % 4 {
                0 | 1 => drop(
                    meta.put_cas_entry(cache, commit.blob_id, now - 30 * DAY)
                        .await
                        .unwrap(),
                ),
                2 => drop(
                    meta.put_cas_entry(cache, commit.blob_id, now)
                        .await
                        .unwrap(),
                ),
                _ => {}
            }
        }
    }
    println!(
        "{url}: {blobs} blobs, {} chunk rows, {blobs} packs written in {:.1} s",
        blobs * CHUNKS_PER_BLOB,
        started.elapsed().as_secs_f64()
    );

    let settings = Gc {
        default_retention: Some(std::time::Duration::from_hours(7 * 24)),
        pack_grace_secs: 3600,
        orphan_grace_secs: 86_400,
        ..Gc::default()
    };
    let mut at = now;
    for step in ["expiry", "blobs", "chunks", "packs"] {
        at += grace.max(3600) + 1;
        Probe::own().reset_peak();
        let started = Instant::now();
        let report = garret_server::gc::collect(&meta, &store, &settings, at, false)
            .await
            .unwrap();
        let took = started.elapsed();
        println!(
            "run {step:>6}: {:>7.2} s, peak RSS {:>4} MiB; {report}",
            took.as_secs_f64(),
            Probe::own().peak_kib().unwrap_or(0) / 1024
        );
    }
    meta.close().await;
}
