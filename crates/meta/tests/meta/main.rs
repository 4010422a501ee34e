//! garret-meta against SQLite and a real Postgres: every test runs on both.

mod support;

mod access;
mod bazel;
mod blobs;
mod caches;
mod gc;
mod gc_retention;
mod nix;
mod observe;
mod pins;
mod schema;
mod uploads;
mod usage;
