//! garret's own GC API beside Attic's (`/_api/v1`): pins, the named GC roots
//! of a Nix cache, and the delete of a single store path. Attic has neither,
//! so the shapes are ours; errors are Attic's JSON all the same.
//!
//! - `GET /_api/v1/pins/{cache}?after=NAME&limit=N` (pull): a page of pins
//!   in name order, expired ones included and marked, `{"pins":[…],"next"}`.
//! - `PUT /_api/v1/pins/{cache}/{name}` (configure, `cr`) with
//!   `{"store_path": "/nix/store/<hash>-<name>" or "<hash>-<name>",
//!   "expires_at": unix seconds or null}`: sets or moves the pin; answers
//!   the pin. An absolute time rather than a duration, so a retried request
//!   sets the same expiry.
//! - `DELETE /_api/v1/pins/{cache}/{name}` (`cr`): removes the pin.
//! - `DELETE /_api/v1/objects/{cache}/{store_path_hash}` (delete, `d`):
//!   drops the path from the cache at once. Nothing protects it: not a pin
//!   (which stays, and keeps the path again once it is pushed again), nor
//!   other paths whose closure it is part of, which become incomplete.
//!   Its NAR's chunks go to GC once nothing else uses them.
//!
//! Every handler authorizes before it reads a body or validates a name, so
//! a stranger learns nothing but 401.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use garret_meta::MAX_PINS_PAGE;
use serde::Deserialize;

use super::body::read_json;
use super::{AppState, access};
use crate::auth::Permission;
use crate::clock::unix_now;
use crate::error::Error;
use crate::pins::{PinPage, PinView, not_found, path_hash, pin_name, pin_target};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<u32>,
}

/// `GET /_api/v1/pins/{cache}`.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(cache): Path<String>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<PinPage>, Error> {
    let cache = access::cache_for_request(&state, &headers, &cache, Permission::PULL).await?;
    let Query(query) = query.map_err(|e| Error::InvalidArgument(e.body_text()))?;
    let after = query.after.as_deref().map(pin_name).transpose()?;
    let limit = query.limit.unwrap_or(MAX_PINS_PAGE).clamp(1, MAX_PINS_PAGE);
    let pins = state.meta.pins(cache.id, after.as_ref(), limit).await?;
    Ok(Json(PinPage::new(
        &pins,
        limit,
        &cache.store_dir,
        unix_now(),
    )))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinRequest {
    store_path: String,
    #[serde(default)]
    expires_at: Option<i64>,
}

/// `PUT /_api/v1/pins/{cache}/{name}`.
pub async fn put(
    State(state): State<Arc<AppState>>,
    Path((cache, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<PinView>, Error> {
    let cache =
        access::cache_for_request(&state, &headers, &cache, Permission::CONFIGURE_CACHE).await?;
    let name = pin_name(&name)?;
    let request: PinRequest = read_json(body, &headers, &state.limits).await?;
    let path = pin_target(&request.store_path, &cache.store_dir)?;
    let now = unix_now();
    if let Some(at) = request.expires_at
        && at <= now
    {
        return Err(Error::InvalidArgument(format!(
            "expires_at {at} is not in the future (now is {now})"
        )));
    }
    let pin = state
        .meta
        .pin(cache.id, &name, &path.to_string(), request.expires_at, now)
        .await?;
    tracing::info!(cache = %cache.name, pin = %name, %path, expires_at = ?pin.expires_at, "pinned");
    Ok(Json(PinView::new(&pin, &cache.store_dir, now)))
}

/// `DELETE /_api/v1/pins/{cache}/{name}`.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path((cache, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let cache =
        access::cache_for_request(&state, &headers, &cache, Permission::CONFIGURE_CACHE).await?;
    let name = pin_name(&name)?;
    state
        .meta
        .unpin(cache.id, &name)
        .await
        .map_err(|e| not_found(e, || format!("cache `{}` has no pin `{name}`", cache.name)))?;
    tracing::info!(cache = %cache.name, pin = %name, "unpinned");
    Ok(().into_response())
}

/// `DELETE /_api/v1/objects/{cache}/{store_path_hash}`.
pub async fn delete_object(
    State(state): State<Arc<AppState>>,
    Path((cache, hash)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let cache = access::cache_for_request(&state, &headers, &cache, Permission::DELETE).await?;
    if hash.len() != 32 {
        return Err(Error::InvalidArgument(format!(
            "{hash:?} is not a store path hash (32 nix32 characters)"
        )));
    }
    let hash = path_hash(&hash, &cache.store_dir)?.to_string();
    state
        .meta
        .delete_nix_object(cache.id, &hash, unix_now())
        .await
        .map_err(|e| not_found(e, || format!("cache `{}` has no path {hash}", cache.name)))?;
    tracing::info!(cache = %cache.name, store_path_hash = %hash, "deleted path");
    Ok(().into_response())
}
