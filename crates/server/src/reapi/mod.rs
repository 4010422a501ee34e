//! The Bazel remote cache over gRPC: REAPI v2's cache services, ByteStream
//! and grpc.health.v1, on garret's chunked store.
//!
//! One module per service (as bazel-remote lays them out), each a thin tonic
//! shim over methods that return [`Error`]; the one conversion to
//! [`Status`] lives here, so no call site picks a gRPC code.
//!
//! Instance names are cache names: `""` is the default cache the server was
//! started with. Authorization is the HTTP API's (same JWTs, same discovery
//! rules), read from the `authorization` metadata that Bazel's
//! `--remote_header=Authorization=Bearer …` sends.
//!
//! [`grpc_router`] returns an axum router so gRPC (h2c) shares the HTTP port.
//! It deliberately has no fallback: tonic's own `Routes` installs one that
//! answers every unknown path with gRPC UNIMPLEMENTED, which would both
//! swallow the HTTP API's 404s and make `Router::merge` panic on two
//! fallbacks.

mod action_cache;
mod bytestream;
mod capabilities;
mod cas;
pub mod digest;
mod health;
pub mod resource_name;
mod uploads;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::response::IntoResponse;
use bytes::{Bytes, BytesMut};
use futures::TryStreamExt as _;
use garret_meta::{Blob, Cache, MetaError};
use garret_proto::bytestream::byte_stream_server::ByteStreamServer;
use garret_proto::health::health_server::HealthServer;
use garret_proto::reapi::action_cache_server::ActionCacheServer;
use garret_proto::reapi::capabilities_server::CapabilitiesServer;
use garret_proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use tonic::Status;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;

use crate::auth::{CacheName, CacheState, ReapiAccess, authorize_reapi};
use crate::blobs::Expect;
use crate::clock::unix_now;
use crate::error::Error;
use crate::http::AppState;
use digest::Digest;

/// The largest gRPC message garret decodes, and the size of the standard
/// gRPC default (4 MiB) so that replies it builds also fit every client's
/// default inbound limit.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Room left in a message for everything around the blob data of a batch
/// (digests, statuses, framing): about 600 entries at ~100 bytes each.
const ENVELOPE_BYTES: usize = 64 << 10;

/// `max_batch_total_size_bytes`: batch data that still fits one message.
pub const MAX_BATCH_TOTAL_BYTES: usize = MAX_MESSAGE_BYTES - ENVELOPE_BYTES;

/// Largest piece of blob data in one ByteStream `ReadResponse`; well under
/// the message limit, large enough to keep per-message overhead negligible.
const READ_CHUNK_BYTES: usize = 1 << 20;

/// Tunables of the REAPI services.
#[derive(Debug, Clone)]
pub struct ReapiConfig {
    /// Instance `""` maps to this cache.
    pub default_cache: CacheName,
    /// Largest blob accepted (`max_cas_blob_size_bytes`).
    pub max_blob_size: u64,
    /// Where ByteStream uploads keep their bytes until finished or resumed.
    /// Owned by this core: its contents are removed when the core starts.
    pub spool_dir: PathBuf,
    /// Bounds on what unfinished ByteStream uploads may hold.
    pub uploads: UploadLimits,
}

/// Bounds on ByteStream upload sessions: a client that opens uploads and
/// walks away must not be able to fill memory or the disk. A Write over a
/// bound fails with RESOURCE_EXHAUSTED and the client retries later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadLimits {
    /// Upload sessions open at once, live or waiting to be resumed.
    pub max_sessions: usize,
    /// Bytes one session keeps in memory before it moves to a spool file.
    pub session_memory_bytes: usize,
    /// Bytes all sessions together keep in memory; past it, new data goes
    /// to spool files. Small against the server's whole budget (issue 10
    /// holds it under 300 MiB with thousands of abandoned sessions).
    pub total_memory_bytes: usize,
    /// Bytes all spool files together may hold.
    pub total_spool_bytes: u64,
    /// How long an interrupted upload waits to be resumed.
    pub session_ttl: std::time::Duration,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self {
            max_sessions: 4096,
            session_memory_bytes: 1 << 20,
            total_memory_bytes: 64 << 20,
            total_spool_bytes: 64 << 30,
            session_ttl: std::time::Duration::from_hours(1),
        }
    }
}

impl ReapiConfig {
    /// The defaults for `state`: blobs up to the NAR limit, spooling in the
    /// state's spool directory (under the server's data directory).
    pub fn new(state: &AppState, default_cache: CacheName) -> Self {
        Self {
            default_cache,
            max_blob_size: state.limits.max_nar_size,
            spool_dir: state.spool_dir.clone(),
            uploads: UploadLimits::default(),
        }
    }
}

/// What every service shares: the store, the configuration and the
/// in-progress uploads.
#[derive(Debug)]
pub(crate) struct Reapi {
    state: Arc<AppState>,
    config: ReapiConfig,
    uploads: Arc<uploads::Uploads>,
}

impl Reapi {
    fn new(state: Arc<AppState>, config: ReapiConfig) -> Self {
        let uploads = uploads::Uploads::start(config.spool_dir.clone(), config.uploads);
        Self {
            state,
            config,
            uploads,
        }
    }

    /// The cache requests without an instance name address.
    pub(crate) fn default_cache(&self) -> &CacheName {
        &self.config.default_cache
    }

    /// The cache behind `instance`, if the request's credentials allow
    /// `access` to it.
    async fn cache(
        &self,
        metadata: &MetadataMap,
        instance: &str,
        access: ReapiAccess,
    ) -> Result<Cache, Error> {
        let name = if instance.is_empty() {
            self.config.default_cache.clone()
        } else {
            CacheName::new(instance)?
        };
        tracing::Span::current().record("cache", tracing::field::display(&name));
        let token = match &self.state.tokens {
            Some(tokens) => tokens.authenticate(
                metadata
                    .get("authorization")
                    .map(tonic::metadata::AsciiMetadataValue::as_bytes),
            )?,
            None => None,
        };
        let cache = match self.state.meta.cache(name.as_str()).await {
            Ok(cache) => Some(cache),
            Err(MetaError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let cache_state = match &cache {
            None => CacheState::Missing,
            Some(c) if c.is_public => CacheState::Public,
            Some(_) => CacheState::Private,
        };
        authorize_reapi(token.as_ref(), &name, cache_state, access)?;
        cache.ok_or_else(|| Error::Internal("authorized a missing cache".into()))
    }

    /// The blob `digest` names in `cache`, or NOT_FOUND. A stored blob of
    /// another size is a different digest, hence also NOT_FOUND.
    async fn blob(&self, cache: &Cache, digest: Digest) -> Result<Blob, Error> {
        match self
            .state
            .meta
            .cas_blob(cache.id, digest.hash_bytes())
            .await?
        {
            Some(blob) if blob.size == digest.size => Ok(blob),
            _ => Err(Error::NotFound(format!("blob {digest} is not in the CAS"))),
        }
    }

    /// A whole blob in memory, for protobuf messages kept in the CAS
    /// (Directory, Tree) and for inlined outputs. A digest over `limit`
    /// bytes is refused before anything is looked up or read: a client
    /// that names a huge blob as a message costs nothing.
    async fn read_bounded(
        &self,
        cache: &Cache,
        digest: Digest,
        limit: usize,
    ) -> Result<Bytes, Error> {
        if digest.size > limit as u64 {
            return Err(Error::InvalidArgument(format!(
                "blob {digest} is larger than the {limit} bytes read as one message"
            )));
        }
        if digest.is_empty() {
            return Ok(Bytes::new());
        }
        let blob = self.blob(cache, digest).await?;
        self.read_blob(&blob).await
    }

    /// `blob`'s content in memory; callers bound its size first (the size
    /// comes from the row, which matches the digest the caller checked).
    async fn read_blob(&self, blob: &Blob) -> Result<Bytes, Error> {
        let stream = self.state.blobs.read(blob.id, 0..blob.size).await?;
        let mut out = BytesMut::with_capacity(
            usize::try_from(blob.size)
                .unwrap_or(0)
                .min(MAX_MESSAGE_BYTES),
        );
        let mut stream = std::pin::pin!(stream);
        while let Some(piece) = stream.try_next().await? {
            out.extend_from_slice(&piece);
        }
        Ok(out.freeze())
    }

    /// Stores `data` as `digest` in `cache`'s CAS, verifying it first.
    async fn store_bytes(&self, cache: &Cache, digest: Digest, data: Bytes) -> Result<(), Error> {
        self.check_size(digest)?;
        if digest.is_empty() {
            return if data.is_empty() {
                Ok(())
            } else {
                Err(Error::InvalidArgument(format!(
                    "{} bytes were sent for the empty digest",
                    data.len()
                )))
            };
        }
        let input = futures::stream::once(async move { Ok::<_, Infallible>(data) });
        self.store_stream(cache, digest, input).await
    }

    /// Stores `input` as `digest` in `cache`'s CAS: verified against the
    /// digest while it streams, visible only once it matches.
    async fn store_stream<S, E>(&self, cache: &Cache, digest: Digest, input: S) -> Result<(), Error>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Send,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let blob = self
            .state
            .blobs
            .put(
                input,
                Expect {
                    hash: Some(digest.hash),
                    size: Some(digest.size),
                    max_size: Some(digest.size),
                },
            )
            .await?;
        self.state
            .meta
            .put_cas_entry(cache.id, blob.id, unix_now())
            .await?;
        Ok(())
    }

    /// Refuses digests over the advertised `max_cas_blob_size_bytes`.
    fn check_size(&self, digest: Digest) -> Result<(), Error> {
        if digest.size > self.config.max_blob_size {
            return Err(Error::PayloadTooLarge(format!(
                "blob {digest} is larger than this server's limit of {} bytes",
                self.config.max_blob_size
            )));
        }
        Ok(())
    }
}

/// The gRPC services on `state`, as an axum router for the HTTP port;
/// instance `""` is `default_cache`.
pub fn grpc_router(state: Arc<AppState>, default_cache: CacheName) -> Router {
    let config = ReapiConfig::new(&state, default_cache);
    grpc_router_with(state, config)
}

/// [`grpc_router`] with explicit tunables.
pub fn grpc_router_with(state: Arc<AppState>, config: ReapiConfig) -> Router {
    services(Arc::new(Reapi::new(state, config)))
}

/// One REAPI core, for the gRPC services and Bazel's HTTP cache to share.
pub(crate) fn shared(state: Arc<AppState>, default_cache: CacheName) -> Arc<Reapi> {
    let config = ReapiConfig::new(&state, default_cache);
    Arc::new(Reapi::new(state, config))
}

/// The gRPC services on `reapi`.
pub(crate) fn services(reapi: Arc<Reapi>) -> Router {
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
    route(router, HealthServer::new(health::HealthService))
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
