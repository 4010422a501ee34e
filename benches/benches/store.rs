//! The chunk store's hot paths: the per-core cost of chunk + hash + compress
//! against the SHA-256 and zstd ceilings, and whole ingests and reads through
//! the local and S3 backends.

// Figures for humans: float precision and 64-bit sizes are not a concern.
#![allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use futures::{StreamExt, stream};
use garret_benches::build_output_like;
use garret_store::testing::{MemoryIndex, S3TestServer};
use garret_store::{
    Backend, ChunkHash, ChunkStore, Chunker, ChunkerConfig, FsBackend, S3Backend, StoreConfig,
    codec,
};
use sha2::{Digest as _, Sha256};

const LEN: usize = 64 << 20;

/// One core's work per chunk, in sequence: cut, hash, compress, hash the frame.
fn chunk_pipeline(c: &mut Criterion) {
    let data = build_output_like(LEN, 7);
    let chunker = Chunker::new(ChunkerConfig::default());
    let mut group = c.benchmark_group("per_core");
    group
        .throughput(Throughput::Bytes(LEN as u64))
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    group.bench_function("sha256", |b| b.iter(|| Sha256::digest(black_box(&data))));
    group.bench_function("fastcdc_cut", |b| {
        b.iter(|| {
            let mut rest = &data[..];
            let mut n = 0;
            while !rest.is_empty() {
                let len = chunker.cut(&rest[..rest.len().min(chunker.window())]);
                rest = &rest[len..];
                n += 1;
            }
            n
        });
    });
    for level in [1, 3, 8] {
        group.bench_function(format!("zstd_{level}_compress"), |b| {
            b.iter(|| {
                data.chunks(64 << 10)
                    .map(|c| codec::compress(c, level).unwrap().len())
                    .sum::<usize>()
            });
        });
    }
    let frames: Vec<(Bytes, usize)> = data
        .chunks(64 << 10)
        .map(|c| (codec::compress(c, 3).unwrap(), c.len()))
        .collect();
    group.bench_function("zstd_3_decompress", |b| {
        b.iter(|| {
            frames
                .iter()
                .map(|(f, n)| codec::decompress(f, *n).unwrap().len())
                .sum::<usize>()
        });
    });
    group.bench_function("cut_hash_compress_hash", |b| {
        b.iter(|| {
            let mut rest = &data[..];
            let mut stored = 0;
            while !rest.is_empty() {
                let len = chunker.cut(&rest[..rest.len().min(chunker.window())]);
                let id = ChunkHash::of(&rest[..len]);
                let frame = codec::compress(&rest[..len], codec::DEFAULT_LEVEL).unwrap();
                black_box((id, Sha256::digest(&frame)));
                stored += frame.len();
                rest = &rest[len..];
            }
            stored
        });
    });
    group.finish();

    let stored: usize = data
        .chunks(64 << 10)
        .map(|c| codec::compress(c, 3).unwrap().len())
        .sum();
    eprintln!(
        "compression ratio at level 3 on this data: {:.2}",
        LEN as f64 / stored as f64
    );
}

fn body(data: &Bytes) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + use<> {
    let data = data.clone();
    stream::iter(
        (0..data.len())
            .step_by(256 << 10)
            .map(move |at| Ok(data.slice(at..(at + (256 << 10)).min(data.len())))),
    )
}

fn through_backends(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s3 = rt
        .block_on(S3TestServer::start(&dir.path().join("s3"), "bench"))
        .unwrap();
    let backends = [
        (
            "fs",
            Backend::Fs(FsBackend::new(dir.path().join("fs")).unwrap()),
        ),
        ("s3", Backend::S3(S3Backend::new(&s3.config).unwrap())),
    ];
    let mut group = c.benchmark_group("store");
    group
        .throughput(Throughput::Bytes(LEN as u64))
        .sample_size(10)
        .measurement_time(Duration::from_secs(15));
    for (name, backend) in backends {
        let store = ChunkStore::new(backend, StoreConfig::default());
        let mut seed = 0;
        group.bench_function(format!("{name}_ingest_new"), |b| {
            // Fresh content each time, generated outside the measurement, so
            // every chunk is compressed and uploaded.
            b.iter_batched(
                || {
                    seed += 1;
                    Bytes::from(build_output_like(LEN, seed))
                },
                |data| {
                    rt.block_on(store.ingest(body(&data), &MemoryIndex::default(), None))
                        .unwrap()
                        .manifest
                },
                BatchSize::PerIteration,
            );
        });
        let data = Bytes::from(build_output_like(LEN, 1_000));
        let index = MemoryIndex::default();
        let manifest = rt
            .block_on(store.ingest(body(&data), &index, None))
            .unwrap()
            .manifest;
        index.commit(&manifest);
        group.bench_function(format!("{name}_ingest_dedup"), |b| {
            b.iter(|| {
                rt.block_on(store.ingest(body(&data), &index, None))
                    .unwrap()
                    .manifest
            });
        });
        group.bench_function(format!("{name}_read"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut s =
                        std::pin::pin!(store.read(manifest.chunks.clone(), 0..manifest.size));
                    let mut n = 0;
                    while let Some(part) = s.next().await {
                        n += part.unwrap().len();
                    }
                    n
                })
            });
        });
        group.bench_function(format!("{name}_read_frames"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut s = std::pin::pin!(
                        store.read_frames(manifest.chunks.clone(), 0..manifest.file_size)
                    );
                    let mut n = 0;
                    while let Some(part) = s.next().await {
                        n += part.unwrap().len();
                    }
                    n
                })
            });
        });
    }
    group.finish();
}

criterion_group!(benches, chunk_pipeline, through_backends);
criterion_main!(benches);
