//! Attic's API (`/_api/v1`), wire-compatible with the `attic` client:
//! missing-path queries, NAR uploads and cache configuration. JSON shapes
//! follow Attic's; see `shared/protocol-notes.md`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use garret_meta::{Cache, CachePatch, MetaError, NewCache};
use garret_nix::StorePathHash;
use garret_nix::signing::SigningKey;
use garret_nix::store_path::DEFAULT_STORE_DIR;
use serde::{Deserialize, Serialize};

use super::body::{BodyStream, idle_limited, read_json, within_request_timeout};
use super::public_urls::PublicUrls;
use super::{AppState, access};
use crate::auth::{CacheName, Permission, Token};
use crate::blobs::{BlobError, Expect};
use crate::clock::unix_now;
use crate::config::Endpoints;
use crate::error::Error;
use crate::upload::{AtticPathInfo, NarCheck};
use garret_store::StoreError;

const NAR_INFO_HEADER: &str = "x-attic-nar-info";
const PREAMBLE_SIZE_HEADER: &str = "x-attic-nar-info-preamble-size";

#[derive(Debug, Deserialize)]
pub struct GetMissingPathsRequest {
    cache: String,
    store_path_hashes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct GetMissingPathsResponse {
    missing_paths: Vec<String>,
}

/// `POST /_api/v1/get-missing-paths`: the client asks once per closure.
/// The cache is named in the body, so only a requester that could push
/// somewhere gets it read.
pub async fn get_missing_paths(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<GetMissingPathsResponse>, Error> {
    let token = access::token_that_could(&state, &headers, Permission::PUSH)?;
    let request: GetMissingPathsRequest = read_json(body, &headers, &state.limits).await?;
    let cache = access::cache(&state, token.as_ref(), &request.cache, Permission::PUSH)
        .await?
        .cache;
    for hash in &request.store_path_hashes {
        hash.parse::<StorePathHash>().map_err(|e| {
            Error::InvalidArgument(format!("invalid store path hash {hash:?}: {e}"))
        })?;
    }
    let hashes: Vec<&str> = request
        .store_path_hashes
        .iter()
        .map(String::as_str)
        .collect();
    let missing_paths = state.meta.missing_store_paths(cache.id, &hashes).await?;
    // The client will not push what it was told is here, and what it pushes
    // next may refer to it: a use, so GC keeps it as it keeps a download.
    let missing: std::collections::HashSet<&str> =
        missing_paths.iter().map(String::as_str).collect();
    for hash in hashes.iter().filter(|h| !missing.contains(*h)) {
        state.accesses.nix_object_read(cache.id, hash);
    }
    Ok(Json(GetMissingPathsResponse { missing_paths }))
}

/// The NarInfo JSON of an upload, as the `attic` client sends it.
#[derive(Debug, Deserialize)]
struct UploadPathNarInfo {
    cache: String,
    #[serde(flatten)]
    info: AtticPathInfo,
}

#[derive(Debug, Serialize)]
#[serde(tag = "kind")]
pub enum UploadPathResult {
    Uploaded {
        file_size: u64,
        frac_deduplicated: f64,
    },
    Deduplicated,
}

/// `PUT /_api/v1/upload-path`: the raw NAR, with its NarInfo JSON in a
/// header or in a preamble at the start of the body. The NAR is checked
/// (grammar, NarHash, NarSize) while it streams; a mismatch stores nothing.
/// The NarInfo names the cache, so only a requester that could push
/// somewhere gets a preamble read.
pub async fn upload_path(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<UploadPathResult>, Error> {
    let token = access::token_that_could(&state, &headers, Permission::PUSH)?;
    within_request_timeout(
        &state.limits,
        upload(&state, token.as_ref(), &headers, body),
    )
    .await
}

async fn upload(
    state: &AppState,
    token: Option<&Token>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Json<UploadPathResult>, Error> {
    let mut stream = idle_limited(body, state.limits.idle_timeout());
    let nar_info: UploadPathNarInfo = if let Some(size) = headers.get(PREAMBLE_SIZE_HEADER) {
        let size: u64 = size
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::InvalidArgument(format!("invalid {PREAMBLE_SIZE_HEADER}")))?;
        if size > state.limits.max_preamble_size {
            return Err(Error::InvalidArgument(format!(
                "the NarInfo preamble of {size} bytes is larger than the limit of {} bytes",
                state.limits.max_preamble_size
            )));
        }
        let preamble = read_preamble(&mut stream, size).await?;
        serde_json::from_slice(&preamble)
            .map_err(|e| Error::InvalidArgument(format!("invalid NarInfo preamble: {e}")))?
    } else {
        let value = headers.get(NAR_INFO_HEADER).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "the NarInfo is missing: send {NAR_INFO_HEADER} or {PREAMBLE_SIZE_HEADER}"
            ))
        })?;
        serde_json::from_slice(value.as_bytes())
            .map_err(|e| Error::InvalidArgument(format!("invalid {NAR_INFO_HEADER}: {e}")))?
    };
    let cache = access::cache(state, token, &nar_info.cache, Permission::PUSH)
        .await?
        .cache;
    let info = nar_info
        .info
        .path_info(&cache.store_dir)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    if info.nar_size > state.limits.max_nar_size {
        return Err(Error::PayloadTooLarge(format!(
            "the NAR of {} bytes is larger than the limit of {} bytes",
            info.nar_size, state.limits.max_nar_size
        )));
    }
    let stored = state
        .blobs
        .put(
            NarCheck::new(stream),
            Expect {
                hash: Some(info.nar_hash),
                size: Some(info.nar_size),
                max_size: Some(info.nar_size),
            },
        )
        .await
        .map_err(|e| match e {
            // Longer than promised is a lie about NarSize, not an oversized upload.
            BlobError::Store(StoreError::TooLarge { .. }) => Error::InvalidArgument(format!(
                "the NAR is longer than its NarSize of {} bytes",
                info.nar_size
            )),
            other => other.into(),
        })?;
    let path = info.store_path.to_string();
    state
        .meta
        .upsert_nix_object(cache.id, &info.into_object(stored.id), unix_now())
        .await?;
    tracing::info!(cache = %cache.name, %path, size = stored.size, deduplicated = stored.deduplicated, "stored path");
    Ok(Json(if stored.deduplicated {
        UploadPathResult::Deduplicated
    } else {
        #[allow(clippy::cast_precision_loss)] // a ratio for display
        let frac_deduplicated = if stored.size == 0 {
            0.0
        } else {
            1.0 - stored.new_bytes as f64 / stored.size as f64
        };
        UploadPathResult::Uploaded {
            file_size: stored.file_size,
            frac_deduplicated,
        }
    }))
}

/// Reads exactly `size` bytes (already checked against the preamble limit)
/// from the front of the body, leaving the rest (the NAR) in the stream.
/// The buffer grows with what arrives, not by the announced size, so a
/// client that announces a preamble and stalls costs nothing.
async fn read_preamble(stream: &mut BodyStream, size: u64) -> Result<Vec<u8>, Error> {
    use futures::StreamExt as _;
    let size =
        usize::try_from(size).map_err(|_| Error::InvalidArgument("preamble too large".into()))?;
    let mut preamble = Vec::new();
    while preamble.len() < size {
        let Some(part) = stream.next().await else {
            return Err(Error::InvalidArgument(
                "the body ended inside the NarInfo preamble".into(),
            ));
        };
        let part = part?;
        let take = (size - preamble.len()).min(part.len());
        preamble.extend_from_slice(&part[..take]);
        if take < part.len() {
            let rest = part.slice(take..);
            let tail = std::mem::replace(stream, Box::pin(futures::stream::empty()));
            *stream = Box::pin(futures::stream::iter([Ok(rest)]).chain(tail));
        }
    }
    Ok(preamble)
}

/// A cache's configuration as Attic shows it.
#[derive(Debug, Serialize)]
pub struct CacheConfig {
    substituter_endpoint: String,
    api_endpoint: String,
    public_key: String,
    is_public: bool,
    store_dir: String,
    priority: i32,
    upstream_cache_key_names: Vec<String>,
    retention_period: RetentionPeriod,
}

/// Attic's retention setting: `Global` follows the server's
/// `gc.default_retention`, `Period(0)` keeps objects however long they go
/// unaccessed, `Period(secs)` lets GC take them after `secs` unaccessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetentionPeriod {
    Global,
    Period(u32),
}

impl RetentionPeriod {
    fn from_meta(period: Option<i64>) -> Self {
        period.map_or(Self::Global, |p| {
            Self::Period(u32::try_from(p).unwrap_or(u32::MAX))
        })
    }

    fn to_meta(self) -> Option<i64> {
        match self {
            Self::Global => None,
            Self::Period(p) => Some(i64::from(p)),
        }
    }
}

#[derive(Debug, Deserialize)]
pub enum Keypair {
    Generate,
    Keypair(String),
}

impl Keypair {
    fn signing_key(&self, cache: &CacheName) -> Result<SigningKey, Error> {
        match self {
            Self::Generate => SigningKey::generate(cache.as_str())
                .map_err(|e| Error::Internal(format!("generating a key: {e}"))),
            Self::Keypair(secret) => secret
                .parse()
                .map_err(|e| Error::InvalidArgument(format!("invalid keypair: {e}"))),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct CreateCacheRequest {
    keypair: Keypair,
    #[serde(default)]
    is_public: bool,
    #[serde(default = "default_store_dir")]
    store_dir: String,
    #[serde(default = "default_priority")]
    priority: i32,
    #[serde(default)]
    upstream_cache_key_names: Vec<String>,
}

fn default_store_dir() -> String {
    DEFAULT_STORE_DIR.to_owned()
}

fn default_priority() -> i32 {
    41
}

/// Every field optional; an empty patch is refused. Other fields (Attic's
/// client may send the endpoints and public key back) are ignored.
#[derive(Debug, Default, Deserialize)]
pub struct PatchCacheRequest {
    keypair: Option<Keypair>,
    is_public: Option<bool>,
    store_dir: Option<String>,
    priority: Option<i32>,
    upstream_cache_key_names: Option<Vec<String>>,
    retention_period: Option<RetentionPeriod>,
}

/// Attic's endpoints: `api_endpoint` is the server's root URL (the `attic`
/// client joins `_api/v1/...` onto it), and a cache's substituter is the
/// substituter base plus its name.
fn cache_config(
    cache: &Cache,
    endpoints: &Endpoints,
    headers: &HeaderMap,
) -> Result<CacheConfig, Error> {
    let key: SigningKey = cache
        .signing_key
        .parse()
        .map_err(|e| Error::Internal(format!("stored signing key: {e}")))?;
    let urls = PublicUrls::for_request(endpoints, headers);
    Ok(CacheConfig {
        substituter_endpoint: urls.substituter(&cache.name),
        api_endpoint: urls.api,
        public_key: key.verifying_key().to_string(),
        is_public: cache.is_public,
        store_dir: cache.store_dir.clone(),
        priority: cache.priority,
        upstream_cache_key_names: cache.upstream_cache_key_names.clone(),
        retention_period: RetentionPeriod::from_meta(cache.retention_period),
    })
}

/// `GET /_api/v1/cache-config/{cache}` and `GET /{cache}/attic-cache-info`.
pub async fn get_cache_config(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<CacheConfig>, Error> {
    let cache = access::cache_for_request(&state, &headers, &name, Permission::PULL).await?;
    Ok(Json(cache_config(&cache, &state.endpoints, &headers)?))
}

/// `POST /_api/v1/cache-config/{cache}`: creates the cache.
pub async fn create_cache(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    access::cache_for_create(&state, &headers, &name)?;
    let request: CreateCacheRequest = read_json(body, &headers, &state.limits).await?;
    let name = CacheName::new(name)?;
    if name.is_reserved() {
        return Err(Error::InvalidArgument(format!(
            "`{name}` is reserved (a Bazel or REAPI path word); choose another name"
        )));
    }
    let key = request.keypair.signing_key(&name)?;
    let new = NewCache {
        name: name.as_str().to_owned(),
        is_public: request.is_public,
        store_dir: request.store_dir,
        priority: request.priority,
        signing_key: key.to_secret_string(),
        upstream_cache_key_names: request.upstream_cache_key_names,
        retention_period: None,
    };
    validate_store_dir(&new.store_dir)?;
    match state.meta.create_cache(&new, unix_now()).await {
        Ok(_) => {
            tracing::info!(cache = %new.name, "created cache");
            Ok(().into_response())
        }
        Err(MetaError::AlreadyExists(_)) => Err(Error::CacheAlreadyExists(new.name)),
        Err(e) => Err(e.into()),
    }
}

fn validate_store_dir(dir: &str) -> Result<(), Error> {
    if dir.len() > 1
        && dir.starts_with('/')
        && !dir.ends_with('/')
        && !dir.contains(['\n', '\r', ' '])
    {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid store_dir {dir:?}: an absolute path without a trailing slash"
        )))
    }
}

/// `PATCH /_api/v1/cache-config/{cache}`: changes some settings. Every
/// patch needs `cr`, checked before the body is read; a retention change
/// also needs `cq`, checked once the body shows one.
pub async fn patch_cache(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let token = access::token(&state, &headers)?;
    let granted = access::cache(&state, token.as_ref(), &name, Permission::CONFIGURE_CACHE).await?;
    let request: PatchCacheRequest = read_json(body, &headers, &state.limits).await?;
    if request.retention_period.is_some() {
        granted.require(
            token.as_ref(),
            Permission::CONFIGURE_CACHE.union(Permission::CONFIGURE_CACHE_RETENTION),
        )?;
    }
    let cache = granted.cache;
    let cache_name = CacheName::new(cache.name.clone())?;
    let patch = CachePatch {
        is_public: request.is_public,
        store_dir: request.store_dir,
        priority: request.priority,
        signing_key: request
            .keypair
            .map(|k| k.signing_key(&cache_name).map(|k| k.to_secret_string()))
            .transpose()?,
        upstream_cache_key_names: request.upstream_cache_key_names,
        retention_period: request.retention_period.map(RetentionPeriod::to_meta),
        // Not an Attic setting: `garret cache configure --cas-budget`.
        cas_budget_bytes: None,
    };
    if let Some(dir) = &patch.store_dir {
        validate_store_dir(dir)?;
    }
    if patch == CachePatch::default() {
        return Err(Error::InvalidArgument("the patch changes nothing".into()));
    }
    state.meta.update_cache(&cache.name, &patch).await?;
    tracing::info!(cache = %cache.name, "configured cache");
    Ok(().into_response())
}

/// `DELETE /_api/v1/cache-config/{cache}`: destroys the cache (its objects
/// go to GC).
pub async fn delete_cache(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let cache =
        access::cache_for_request(&state, &headers, &name, Permission::DESTROY_CACHE).await?;
    state.meta.delete_cache(&cache.name, unix_now()).await?;
    tracing::info!(cache = %cache.name, "destroyed cache");
    Ok(().into_response())
}
