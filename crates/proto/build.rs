//! Generates the message types and tonic services from `proto/` at the
//! workspace root.
//!
//! `protox` parses the `.proto` files in pure Rust, so building garret needs
//! no system `protoc`; its `FileDescriptorSet` goes straight to
//! `tonic-prost-build`. Well-known types (`google.protobuf.*`) map to
//! `prost-types` rather than being generated again.

use std::path::PathBuf;

const FILES: &[&str] = &[
    "build/bazel/remote/execution/v2/remote_execution.proto",
    "build/bazel/semver/semver.proto",
    "google/bytestream/bytestream.proto",
    "google/rpc/status.proto",
    "grpc/health/v1/health.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    for file in FILES {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let fds = protox::compile(FILES, [&root])?;
    tonic_prost_build::configure()
        // Clients are generic over any tower service; no tonic transport is
        // pulled in just to offer a `connect` constructor.
        .build_transport(false)
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
