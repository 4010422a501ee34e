//! Liveness and readiness, for Kubernetes probes and load balancers.
//!
//! `/healthz` answers whenever the process serves HTTP: a liveness probe
//! must not restart a replica because Postgres or S3 is down. `/readyz`
//! reports the last dependency check ([`crate::readiness`]), so traffic
//! leaves a replica that cannot reach them and returns when it can.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use crate::readiness::Status;
use crate::state::AppState;

pub async fn healthz() -> &'static str {
    "ok\n"
}

pub async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Status>) {
    let status = state.readiness.status();
    let code = if status.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(status))
}
