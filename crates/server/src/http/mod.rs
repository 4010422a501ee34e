//! The HTTP API on axum. Each protocol module owns its handlers; this module
//! only assembles the router.

pub mod access;
pub mod error;
mod substituter;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use garret_meta::Meta;

use crate::auth::TokenAuthority;
use crate::blobs::Blobs;
use crate::config::Limits;

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    pub meta: Meta,
    pub blobs: Blobs,
    /// Verifies tokens; without it every request is anonymous.
    pub tokens: Option<TokenAuthority>,
    pub limits: Limits,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/{cache}/{file}", get(substituter::cache_file))
        .route("/{cache}/nar/{file}", get(substituter::nar))
        .with_state(state)
}
