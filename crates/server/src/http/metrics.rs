//! `GET /metrics`: the Prometheus scrape target, unauthenticated like
//! `/healthz` (its labels name no cache, path or digest; see
//! [`crate::metrics`]).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::metrics::CONTENT_TYPE;
use crate::state::AppState;

/// Every metric, after reading the garbage collection record (a database
/// that does not answer leaves the last values, and shows in
/// `garret_database_operation_errors_total`).
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    match state.meta.gc_runs().await {
        Ok(runs) => state.metrics.gc_runs(&runs),
        Err(error) => tracing::warn!(%error, "reading the garbage collection record failed"),
    }
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.metrics.render(),
    )
}
