//! The garret server as a library: the pieces `garret serve` wires together,
//! importable by end-to-end tests and benchmarks.

pub mod auth;
pub mod blobs;
pub mod clock;
pub mod config;
pub mod error;
pub mod http;
pub mod idle;
pub mod reapi;
pub mod request_log;
pub mod serve;
pub mod state;
pub mod upload;
