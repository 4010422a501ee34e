//! NAR throughput. Validation should cost next to nothing on top of hashing, so
//! `verify` is measured against a bare SHA-256 of the same bytes, the ceiling.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use garret_nix::nar::{Decoder, NarWriter, Verifier};
use sha2::{Digest as _, Sha256};

/// Uploads arrive in network-sized pieces, not as one slice.
const CHUNK: usize = 64 * 1024;

/// File contents: their texture does not matter to NAR framing or SHA-256.
fn noise(len: usize) -> Vec<u8> {
    garret_benches::build_output_like(len, 0x9e37_79b9)
}

fn one_file_nar(size: usize) -> Vec<u8> {
    let contents = noise(size);
    let mut writer = NarWriter::new(Vec::with_capacity(size + 256)).unwrap();
    writer
        .file(false, size as u64, contents.as_slice())
        .unwrap();
    writer.finish().unwrap()
}

/// An in-memory tree of `dirs` directories with `files` files each.
struct Tree {
    dirs: usize,
    files: usize,
    contents: Vec<u8>,
}

impl Tree {
    fn write(&self, out: Vec<u8>) -> Vec<u8> {
        let mut writer = NarWriter::new(out).unwrap();
        writer.directory().unwrap();
        for dir in 0..self.dirs {
            writer.entry(format!("dir-{dir:05}").as_bytes()).unwrap();
            writer.directory().unwrap();
            for file in 0..self.files {
                writer.entry(format!("file-{file:05}").as_bytes()).unwrap();
                let size = self.contents.len() as u64;
                writer
                    .file(file % 7 == 0, size, self.contents.as_slice())
                    .unwrap();
            }
            writer.directory_end().unwrap();
        }
        writer.directory_end().unwrap();
        writer.finish().unwrap()
    }
}

fn decode(nar: &[u8]) {
    let mut decoder = Decoder::new();
    for piece in nar.chunks(CHUNK) {
        decoder.feed(piece, &mut ()).unwrap();
    }
    decoder.finish().unwrap();
}

fn verify(nar: &[u8]) -> (garret_nix::Sha256Hash, u64) {
    let mut verifier = Verifier::new();
    for piece in nar.chunks(CHUNK) {
        verifier.update(piece).unwrap();
    }
    verifier.finish().unwrap()
}

fn sha256(nar: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for piece in nar.chunks(CHUNK) {
        hasher.update(piece);
    }
    hasher.finalize().into()
}

fn reading(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>, nar: &[u8]) {
    group.throughput(Throughput::Bytes(nar.len() as u64));
    group.bench_function("decode", |b| b.iter(|| decode(black_box(nar))));
    group.bench_function("verify", |b| b.iter(|| verify(black_box(nar))));
    group.bench_function("sha256", |b| b.iter(|| sha256(black_box(nar))));
}

fn benches(c: &mut Criterion) {
    let big = one_file_nar(64 * 1024 * 1024);
    let mut group = c.benchmark_group("nar/one-64MiB-file");
    reading(&mut group, &big);
    group.finish();
    drop(big);

    let tree = Tree {
        dirs: 100,
        files: 100,
        contents: noise(1024),
    };
    let small = tree.write(Vec::new());
    let mut group = c.benchmark_group("nar/10k-1KiB-files");
    reading(&mut group, &small);
    let mut out = Vec::with_capacity(small.len());
    group.bench_function("write", |b| {
        b.iter(|| {
            out.clear();
            out = tree.write(std::mem::take(&mut out));
        });
    });
    group.finish();
}

criterion_group! {
    name = nar;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(nar);
