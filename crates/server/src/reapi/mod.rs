//! The Bazel remote cache over gRPC: REAPI v2's cache services, ByteStream
//! and grpc.health.v1, on garret's chunked store.
//!
//! One module per service (as bazel-remote lays them out), each a thin tonic
//! shim over methods that return [`ReapiError`]; the one conversion to
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
mod upload_sessions;

pub use upload_sessions::UploadSettings;

use std::convert::Infallible;
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
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::auth::{AuthError, CacheName, CacheState, ReapiAccess, authorize_reapi};
use crate::blobs::{BlobError, Expect};
use crate::clock::unix_now;
use crate::http::AppState;
use digest::{Digest, DigestError};
use resource_name::ResourceNameError;

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
    /// ByteStream uploads: live Writes, progress records, session expiry.
    pub uploads: UploadSettings,
}

impl ReapiConfig {
    /// The defaults for `state`: blobs up to the NAR limit.
    pub fn new(state: &AppState, default_cache: CacheName) -> Self {
        Self {
            default_cache,
            max_blob_size: state.limits.max_nar_size,
            uploads: UploadSettings::default(),
        }
    }
}

/// Everything REAPI can fail with, each variant one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum ReapiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// A conflict the client can retry, e.g. a second writer on one upload.
    #[error("{0}")]
    Aborted(String),
    /// A transient store condition (GC racing a write); retry.
    #[error("{0}")]
    Unavailable(String),
    /// A client that stalled or took too long; what it sent so far is kept
    /// where it can be resumed.
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ReapiError {
    pub fn code(&self) -> Code {
        match self {
            Self::Auth(e) => Code::from(e.grpc_code()),
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::OutOfRange(_) => Code::OutOfRange,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Aborted(_) => Code::Aborted,
            Self::Unavailable(_) => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// The per-entry status of batch responses.
    pub fn to_rpc_status(&self) -> garret_proto::rpc::Status {
        self.log();
        garret_proto::rpc::Status {
            code: self.code() as i32,
            message: self.to_string(),
            details: Vec::new(),
        }
    }

    fn log(&self) {
        match self.code() {
            Code::Internal | Code::Unavailable => {
                tracing::error!(error = %self, "REAPI request failed");
            }
            Code::NotFound => tracing::debug!(error = %self, "REAPI miss"),
            code => tracing::info!(error = %self, ?code, "REAPI request refused"),
        }
    }
}

impl From<ReapiError> for Status {
    fn from(err: ReapiError) -> Self {
        err.log();
        Status::new(err.code(), err.to_string())
    }
}

impl From<DigestError> for ReapiError {
    fn from(err: DigestError) -> Self {
        Self::InvalidArgument(err.to_string())
    }
}

impl From<ResourceNameError> for ReapiError {
    fn from(err: ResourceNameError) -> Self {
        Self::InvalidArgument(err.to_string())
    }
}

impl From<MetaError> for ReapiError {
    fn from(err: MetaError) -> Self {
        match err {
            // GC took a blob or chunk between our lookup and our commit.
            MetaError::ChunkGone(_) | MetaError::FrameMismatch(_) | MetaError::NotFound(_) => {
                Self::Unavailable(err.to_string())
            }
            MetaError::Invalid(m) => Self::InvalidArgument(m),
            MetaError::UploadSuperseded => {
                Self::Aborted("another Write took this upload over; ask QueryWriteStatus".into())
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<BlobError> for ReapiError {
    fn from(err: BlobError) -> Self {
        use garret_store::StoreError;
        match err {
            // REAPI: a digest that does not match the data is the client's
            // error (bazel-remote's INTERNAL here makes Bazel retry forever).
            BlobError::HashMismatch { .. } | BlobError::SizeMismatch { .. } => {
                Self::InvalidArgument(err.to_string())
            }
            BlobError::Store(StoreError::TooLarge { limit }) => Self::InvalidArgument(format!(
                "the data is larger than its digest's {limit} bytes"
            )),
            // A ByteStream Write's own verdict on its messages comes back
            // as the ingest's input error.
            BlobError::Store(StoreError::Input(e)) => match e.downcast::<Self>() {
                Ok(ours) => *ours,
                Err(e) => Self::InvalidArgument(format!("the uploaded data is unusable: {e}")),
            },
            // A record of upload progress failed.
            BlobError::Store(StoreError::Index(e)) => match e.downcast::<MetaError>() {
                Ok(meta) => (*meta).into(),
                Err(e) => Self::Internal(e.to_string()),
            },
            // A stored chunk is gone: to the client the blob is missing,
            // which makes Bazel re-run the action or re-upload the blob
            // instead of failing the build.
            BlobError::Store(StoreError::MissingChunk(id)) => Self::NotFound(format!(
                "blob is incomplete in storage (chunk {id} is missing)"
            )),
            BlobError::Meta(e) => e.into(),
            BlobError::Store(other) => Self::Internal(other.to_string()),
        }
    }
}

impl From<garret_store::StoreError> for ReapiError {
    fn from(err: garret_store::StoreError) -> Self {
        BlobError::Store(err).into()
    }
}

/// What every service shares: the store, the configuration and the
/// in-progress uploads.
#[derive(Debug)]
pub(crate) struct Reapi {
    state: Arc<AppState>,
    config: ReapiConfig,
    uploads: upload_sessions::Uploads,
}

impl Reapi {
    fn new(state: Arc<AppState>, config: ReapiConfig) -> Self {
        let uploads = upload_sessions::Uploads::start(state.meta.clone(), config.uploads);
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
    ) -> Result<Cache, ReapiError> {
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
            Err(e) => return Err(ReapiError::Internal(e.to_string())),
        };
        let cache_state = match &cache {
            None => CacheState::Missing,
            Some(c) if c.is_public => CacheState::Public,
            Some(_) => CacheState::Private,
        };
        authorize_reapi(token.as_ref(), &name, cache_state, access)?;
        cache.ok_or_else(|| ReapiError::Internal("authorized a missing cache".into()))
    }

    /// The blob `digest` names in `cache`, or NOT_FOUND. A stored blob of
    /// another size is a different digest, hence also NOT_FOUND.
    async fn blob(&self, cache: &Cache, digest: Digest) -> Result<Blob, ReapiError> {
        match self
            .state
            .meta
            .cas_blob(cache.id, digest.hash_bytes())
            .await?
        {
            Some(blob) if blob.size == digest.size => Ok(blob),
            _ => Err(ReapiError::NotFound(format!(
                "blob {digest} is not in the CAS"
            ))),
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
    ) -> Result<Bytes, ReapiError> {
        if digest.size > limit as u64 {
            return Err(ReapiError::InvalidArgument(format!(
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
    async fn read_blob(&self, blob: &Blob) -> Result<Bytes, ReapiError> {
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
    async fn store_bytes(
        &self,
        cache: &Cache,
        digest: Digest,
        data: Bytes,
    ) -> Result<(), ReapiError> {
        self.check_size(digest)?;
        if digest.is_empty() {
            return if data.is_empty() {
                Ok(())
            } else {
                Err(ReapiError::InvalidArgument(format!(
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
    async fn store_stream<S, E>(
        &self,
        cache: &Cache,
        digest: Digest,
        input: S,
    ) -> Result<(), ReapiError>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Send,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let blob = self.state.blobs.put(input, expect(digest)).await?;
        Ok(self.add_to_cas(cache, &blob).await?)
    }

    /// [`Reapi::store_stream`] of an upload that continues `prefix` and
    /// records its progress through `checkpoint`. The error stays a
    /// [`BlobError`] so the caller can tell a broken input (resumable) from
    /// a refusal.
    async fn store_resumable<S>(
        &self,
        cache: &Cache,
        digest: Digest,
        prefix: Vec<garret_store::ChunkRef>,
        input: S,
        checkpoint: &impl garret_store::Checkpoint,
    ) -> Result<(), BlobError>
    where
        S: futures::Stream<Item = Result<Bytes, ReapiError>> + Send,
    {
        let blob = self
            .state
            .blobs
            .put_after(prefix, input, expect(digest), checkpoint)
            .await?;
        self.add_to_cas(cache, &blob).await.map_err(BlobError::Meta)
    }

    async fn add_to_cas(
        &self,
        cache: &Cache,
        blob: &crate::blobs::StoredBlob,
    ) -> Result<(), MetaError> {
        self.state
            .meta
            .put_cas_entry(cache.id, blob.id, unix_now())
            .await?;
        Ok(())
    }

    /// Refuses digests over the advertised `max_cas_blob_size_bytes`.
    fn check_size(&self, digest: Digest) -> Result<(), ReapiError> {
        if digest.size > self.config.max_blob_size {
            return Err(ReapiError::InvalidArgument(format!(
                "blob {digest} is larger than this server's limit of {} bytes",
                self.config.max_blob_size
            )));
        }
        Ok(())
    }
}

/// What an upload of `digest` must turn out to be.
fn expect(digest: Digest) -> Expect {
    Expect {
        hash: Some(digest.hash),
        size: Some(digest.size),
        max_size: Some(digest.size),
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
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        drop(tx);
    }
}
