//! The garret server as a library: the pieces `garret serve` wires together,
//! importable by end-to-end tests and benchmarks.

pub mod access_times;
pub mod auth;
pub mod bazel_core;
pub mod blobs;
pub mod clock;
pub mod config;
pub mod error;
pub mod gc;
pub mod http;
pub mod idle;
pub mod import;
pub mod metrics;
pub mod pins;
pub mod probe;
pub mod readiness;
pub mod reapi;
pub mod request_log;
pub mod serve;
pub mod signatures;
pub mod state;
pub mod status_page;
pub mod units;
pub mod upload;

/// Everything `garret serve` answers on its one port: the Nix and Attic
/// routes, Bazel's HTTP cache, and REAPI over h2c gRPC, on one state.
pub fn app(state: std::sync::Arc<state::AppState>) -> axum::Router {
    http::router(std::sync::Arc::clone(&state))
        .merge(reapi::services(state))
        .layer(axum::middleware::from_fn(metrics::requests::note_route))
}
