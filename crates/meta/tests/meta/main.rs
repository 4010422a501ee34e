//! garret-meta against SQLite and a real Postgres: every test runs on both.

mod support;

mod bazel;
mod blobs;
mod caches;
mod gc;
mod nix;
mod pins;
mod schema;
mod uploads;
