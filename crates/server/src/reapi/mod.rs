//! The Bazel remote cache over gRPC: REAPI v2's cache services, ByteStream
//! and grpc.health.v1, on garret's chunked store.
//!
//! One module per service (as bazel-remote lays them out), each a thin tonic
//! shim over methods that return [`Error`], whose one table (`crate::error`)
//! gives the gRPC code, so no call site picks one. The work is the Bazel
//! core's (`crate::bazel_core`), which Bazel's HTTP cache shares.
//!
//! Instance names are cache names: `""` is the default cache the server was
//! started with. Authorization is the HTTP API's (same JWTs, same discovery
//! rules), read from the `authorization` metadata that Bazel's
//! `--remote_header=Authorization=Bearer …` sends.
//!
//! [`services`] returns an axum router so gRPC (h2c) shares the HTTP port.
//! It deliberately has no fallback: tonic's own `Routes` installs one that
//! answers every unknown path with gRPC UNIMPLEMENTED, which would both
//! swallow the HTTP API's 404s and make `Router::merge` panic on two
//! fallbacks.

mod action_cache;
mod bytestream;
mod capabilities;
mod cas;
mod health;
pub mod resource_name;
mod upload_sessions;

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::response::IntoResponse;
use futures::TryStreamExt as _;
use garret_meta::Cache;
use garret_proto::bytestream::byte_stream_server::ByteStreamServer;
use garret_proto::health::health_server::HealthServer;
use garret_proto::reapi::action_cache_server::ActionCacheServer;
use garret_proto::reapi::capabilities_server::CapabilitiesServer;
use garret_proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use tonic::Status;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;

use crate::auth::ReapiAccess;
use crate::bazel_core::Core;
pub use crate::bazel_core::MAX_MESSAGE_BYTES;
use crate::error::Error;
use crate::state::AppState;

/// Room left in a message for everything around the blob data of a batch
/// (digests, statuses, framing): about 600 entries at ~100 bytes each.
const ENVELOPE_BYTES: usize = 64 << 10;

/// `max_batch_total_size_bytes`: batch data that still fits one message.
pub const MAX_BATCH_TOTAL_BYTES: usize = MAX_MESSAGE_BYTES - ENVELOPE_BYTES;

/// Largest piece of blob data in one ByteStream `ReadResponse`; well under
/// the message limit, large enough to keep per-message overhead negligible.
const READ_CHUNK_BYTES: usize = 1 << 20;

/// What every service shares: the server's state (whose Bazel core does
/// the work) and ByteStream's upload sessions. Derefs to the core,
/// so services call `reapi.cache(…)`, `reapi.blob(…)` as the core's own.
#[derive(Debug)]
pub(crate) struct Reapi {
    state: Arc<AppState>,
    uploads: upload_sessions::Uploads,
}

impl std::ops::Deref for Reapi {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.state.bazel
    }
}

/// A request message that names its instance (cache).
pub(crate) trait Instance {
    fn instance_name(&self) -> &str;
}

macro_rules! instance {
    ($($message:ty),* $(,)?) => {$(
        impl Instance for $message {
            fn instance_name(&self) -> &str {
                &self.instance_name
            }
        }
    )*};
}

instance!(
    garret_proto::reapi::FindMissingBlobsRequest,
    garret_proto::reapi::BatchUpdateBlobsRequest,
    garret_proto::reapi::BatchReadBlobsRequest,
    garret_proto::reapi::GetTreeRequest,
    garret_proto::reapi::SplitBlobRequest,
    garret_proto::reapi::SpliceBlobRequest,
    garret_proto::reapi::GetActionResultRequest,
    garret_proto::reapi::UpdateActionResultRequest,
    garret_proto::reapi::GetCapabilitiesRequest,
);

impl Reapi {
    /// The cache behind `instance`, if the request's `authorization`
    /// metadata allows `access` to it.
    async fn cache(
        &self,
        metadata: &MetadataMap,
        instance: &str,
        access: ReapiAccess,
    ) -> Result<Cache, Error> {
        let authorization = metadata
            .get("authorization")
            .map(tonic::metadata::AsciiMetadataValue::as_bytes);
        self.state
            .bazel
            .cache(authorization, instance, access)
            .await
    }

    /// The preamble of every unary method: the cache `request` names,
    /// authorized for `access`.
    async fn cache_for<T: Instance>(
        &self,
        request: &tonic::Request<T>,
        access: ReapiAccess,
    ) -> Result<Cache, Error> {
        self.cache(
            request.metadata(),
            request.get_ref().instance_name(),
            access,
        )
        .await
    }
}

/// The gRPC services on `state`, as an axum router for the HTTP port.
/// Also starts the sweep of expired upload sessions, which ends when the
/// router is dropped.
pub fn services(state: Arc<AppState>) -> Router {
    let uploads = upload_sessions::Uploads::start(state.meta.clone(), state.uploads);
    let readiness = state.readiness.clone();
    let reapi = Arc::new(Reapi { state, uploads });
    let router = Router::new();
    let router = route(
        router,
        CapabilitiesServer::new(capabilities::CapabilitiesService(Arc::clone(&reapi)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let router = route(
        router,
        ContentAddressableStorageServer::new(cas::CasService(Arc::clone(&reapi)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let router = route(
        router,
        ActionCacheServer::new(action_cache::ActionCacheService(Arc::clone(&reapi)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    // ByteStream applies the body limits itself, per message, so that a
    // stalled Write ends with a status and keeps what it received.
    let limits = reapi.state.limits;
    let router = router.layer(axum::middleware::from_fn_with_state(
        limits,
        bound_unary_body,
    ));
    let router = route(
        router,
        ByteStreamServer::new(bytestream::ByteStreamService(reapi))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    route(router, HealthServer::new(health::HealthService(readiness)))
}

/// Bounds reading a unary request's body as every other body is bounded
/// (BatchUpdateBlobs and UpdateActionResult carry up to 4 MiB, which tonic
/// reads before the handler runs): the client may pause at most the idle
/// timeout between pieces, and the call must finish within the request
/// timeout. Either ends it with DEADLINE_EXCEEDED. For a streaming reply
/// (GetTree) the request timeout covers the call up to its first message.
async fn bound_unary_body(
    axum::extract::State(limits): axum::extract::State<crate::config::Limits>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let total = std::time::Duration::from_secs(limits.request_timeout_secs);
    let request = request.map(|body| idle_limited(body, limits.idle_timeout()));
    match tokio::time::timeout(total, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Status::deadline_exceeded(format!(
            "the call took longer than the server's {} s limit",
            total.as_secs()
        ))
        .into_http(),
    }
}

/// `body`, failing with DEADLINE_EXCEEDED if the client sends nothing for
/// `idle`. The error is a [`Status`], which tonic passes on as it is.
fn idle_limited(body: Body, idle: std::time::Duration) -> Body {
    let pieces = body.into_data_stream().map_err(axum::BoxError::from);
    Body::from_stream(crate::idle::bounded(pieces, idle, move || {
        axum::BoxError::from(Status::deadline_exceeded(format!(
            "the client sent nothing for {} s",
            idle.as_secs()
        )))
    }))
}

/// Mounts one tonic service under `/{package.Service}/`.
fn route<S>(router: Router, service: S) -> Router
where
    S: tonic::codegen::Service<
            axum::http::Request<Body>,
            Error = Infallible,
            Response: IntoResponse,
            Future: Send + 'static,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
{
    router.route_service(&format!("/{}/{{*rest}}", S::NAME), service)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[tokio::test]
    async fn a_stalled_unary_body_ends_with_deadline_exceeded() {
        // A zero idle limit elapses at once for a body with nothing ready.
        let (tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, Infallible>>(1);
        let body = idle_limited(Body::from_stream(rx), std::time::Duration::ZERO);
        let mut pieces = body.into_data_stream();
        let err = futures::StreamExt::next(&mut pieces)
            .await
            .unwrap()
            .unwrap_err();
        let status = Status::from_error(err.into());
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        drop(tx);
    }
}
