//! The HTTP API on axum. Each protocol module owns its handlers; this module
//! only assembles the router.

pub mod access;
mod attic;
mod bazel;
mod body;
mod nix_upload;
mod pins;
mod substituter;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};

use crate::state::AppState;

/// Largest JSON request body (a missing-paths query for a 100 000-path
/// closure is about 4 MiB), read by `body::read_json` once the request is
/// authorized. Uploads stream and are bounded by `Limits`.
const MAX_JSON_BODY: usize = 16 << 20;

/// Every HTTP route: the Nix and Attic API and Bazel's HTTP cache.
pub fn router(state: Arc<AppState>) -> Router {
    let json_api = Router::new()
        .route("/_api/v1/get-missing-paths", post(attic::get_missing_paths))
        .route(
            "/_api/v1/cache-config/{cache}",
            get(attic::get_cache_config)
                .post(attic::create_cache)
                .patch(attic::patch_cache)
                .delete(attic::delete_cache),
        )
        .route("/_api/v1/pins/{cache}", get(pins::list))
        .route(
            "/_api/v1/pins/{cache}/{name}",
            put(pins::put).delete(pins::delete),
        )
        .route(
            "/_api/v1/objects/{cache}/{store_path_hash}",
            delete(pins::delete_object),
        );
    let uploads = Router::new()
        .route("/_api/v1/upload-path", put(attic::upload_path))
        .route(
            "/{cache}/{file}",
            get(substituter::cache_file).put(nix_upload::put_cache_file),
        )
        .route(
            "/{cache}/nar/{file}",
            get(substituter::nar).put(nix_upload::put_nar),
        )
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .route("/{cache}/attic-cache-info", get(attic::get_cache_config))
        .merge(json_api)
        .merge(uploads)
        .merge(bazel::routes())
        .with_state(state)
        .layer(axum::middleware::from_fn(close_after_refused_body))
}

/// A request refused before its body was read leaves the rest of the body
/// on the connection, so the server must close it after answering. Saying
/// so (`Connection: close`) keeps keep-alive clients from sending their
/// next request on a connection that is about to go away. HTTP/1 only:
/// HTTP/2 streams end on their own.
async fn close_after_refused_body(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{HeaderValue, Version, header};
    let has_body = request.version() < Version::HTTP_2
        && (request.headers().contains_key(header::TRANSFER_ENCODING)
            || request
                .headers()
                .get(header::CONTENT_LENGTH)
                .is_some_and(|len| len != "0"));
    let mut response = next.run(request).await;
    let status = response.status();
    if has_body && (status.is_client_error() || status.is_server_error()) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
