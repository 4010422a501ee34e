//! The HTTP API on axum. Each protocol module owns its handlers; this module
//! only assembles the router.

pub mod access;
mod attic;
mod bazel;
pub(crate) mod body;
mod health;
mod metrics;
mod nix_upload;
mod pins;
pub mod public_urls;
mod status_page;
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

/// Every HTTP route: the status page, the Nix and Attic API and Bazel's
/// HTTP cache.
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
        .route("/", get(status_page::page))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::metrics))
        .route("/{cache}/attic-cache-info", get(attic::get_cache_config))
        .merge(json_api)
        .merge(uploads)
        .merge(bazel::routes())
        .with_state(state)
        .layer(axum::middleware::from_fn(close_after_refused_body))
}

/// A request refused before its body was read leaves the rest of the body
/// on the connection. Closing with unread data there makes the kernel reset
/// the connection, and a client still sending its body (an `attic push`
/// with a bad token) then sees a broken pipe instead of the answer. So an
/// error answer first drains what the handler left, bounded in bytes and
/// time ([`DRAIN_BYTES`], [`DRAIN_TIME`]): a small refused upload is read
/// whole and answered cleanly, a large one costs little. The answer then
/// says `Connection: close`, so keep-alive clients do not send their next
/// request on a connection that is about to go away. HTTP/1 only: HTTP/2
/// streams end on their own.
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
    if !has_body {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let shared = SharedBody(Arc::new(std::sync::Mutex::new(body)));
    let request = axum::extract::Request::from_parts(parts, axum::body::Body::new(shared.clone()));
    let mut response = next.run(request).await;
    let status = response.status();
    if status.is_client_error() || status.is_server_error() {
        // A body that timed out has nothing to drain: its client stalled.
        if status != axum::http::StatusCode::REQUEST_TIMEOUT {
            let _ = tokio::time::timeout(DRAIN_TIME, drain(shared, DRAIN_BYTES)).await;
        }
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Most bytes of a refused body read (and dropped) before the answer.
const DRAIN_BYTES: usize = 1 << 20;

/// Longest wait for them: a client still sending has its next bytes on the
/// wire already.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_millis(500);

/// Reads and drops up to about `limit` bytes of what is left of `body`.
async fn drain(body: SharedBody, limit: usize) {
    use futures::StreamExt as _;
    let mut data = axum::body::Body::new(body).into_data_stream();
    let mut read = 0;
    while read < limit {
        match data.next().await {
            Some(Ok(bytes)) => read += bytes.len(),
            _ => return,
        }
    }
}

/// A request body that the handler reads while the middleware keeps a
/// handle to what is left of it.
#[derive(Clone)]
struct SharedBody(Arc<std::sync::Mutex<axum::body::Body>>);

impl http_body::Body for SharedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let mut body = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::pin::Pin::new(&mut *body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0
            .lock()
            .map_or(true, |body| http_body::Body::is_end_stream(&*body))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0
            .lock()
            .map(|body| http_body::Body::size_hint(&*body))
            .unwrap_or_default()
    }
}
