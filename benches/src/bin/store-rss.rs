//! Peak memory while streaming a 1 GiB blob into the chunk store and back.
//!
//! `cargo run --release -p garret-benches --bin store-rss [-- fs|s3]`
//! prints throughput and the process's peak RSS (VmHWM), which must stay far
//! below the blob size: the store never holds a whole blob.

// Figures for humans: float precision and 64-bit sizes are not a concern.
#![allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]

use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, stream};
use garret_benches::build_output_like;
use garret_store::testing::{MemoryIndex, S3TestServer};
use garret_store::{Backend, ChunkStore, FsBackend, S3Backend, StoreConfig};

const TOTAL: u64 = 1 << 30;
const PIECE: usize = 1 << 20;

fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

#[tokio::main]
async fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "fs".into());
    let dir = tempfile::tempdir().unwrap();
    let backend = match which.as_str() {
        "fs" => Backend::Fs(FsBackend::new(dir.path().join("fs")).unwrap()),
        "s3" => {
            let server = S3TestServer::start(&dir.path().join("s3"), "rss")
                .await
                .unwrap();
            Backend::S3(S3Backend::new(&server.config).unwrap())
        }
        other => panic!("unknown backend {other}; use fs or s3"),
    };
    let store = ChunkStore::new(backend, StoreConfig::default());
    let before = peak_rss_mib();

    // Fresh pseudo-random pieces, generated on the fly: every chunk is new.
    let pieces = (TOTAL as usize) / PIECE;
    let input = stream::iter(0..pieces)
        .map(|i| Ok::<_, std::io::Error>(Bytes::from(build_output_like(PIECE, i as u64 + 1))));
    let started = Instant::now();
    let index = MemoryIndex::default();
    let manifest = store.ingest(input, &index, None).await.unwrap().manifest;
    let write_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut reader = std::pin::pin!(store.read(manifest.chunks.clone(), 0..manifest.size));
    let mut read = 0u64;
    while let Some(part) = reader.next().await {
        read += part.unwrap().len() as u64;
    }
    let read_secs = started.elapsed().as_secs_f64();
    assert_eq!(read, TOTAL);

    let mib = TOTAL as f64 / f64::from(1 << 20);
    println!(
        "backend={which} size=1GiB chunks={} stored={:.0}MiB write={:.0}MiB/s read={:.0}MiB/s peak_rss={}MiB (before start {}MiB)",
        manifest.chunks.len(),
        manifest.file_size as f64 / f64::from(1 << 20),
        mib / write_secs,
        mib / read_secs,
        peak_rss_mib(),
        before
    );
}
