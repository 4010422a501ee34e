//! Bazel's HTTP remote cache (`--remote_cache=http://…`): `GET`, `HEAD` and
//! `PUT` on `/ac/<sha256>` and `/cas/<sha256>`, optionally below a cache name
//! (`/<cache>/ac/<sha256>`), on the same chunked store as the Nix side.
//!
//! # Decisions
//!
//! - **Instance = cache.** A path prefix names a garret cache, and without
//!   one the operator's default cache is used; the same tokens and the same
//!   pull/push flags as for Nix apply (`--remote_header=Authorization=Bearer
//!   <jwt>`, or `http://user:<jwt>@host/…`, which Bazel sends as Basic).
//! - **CAS uploads are verified** against the hash in the path before
//!   anything becomes visible; a mismatch is a 400 with Attic's error body,
//!   a blob over `limits.max_nar_size` a 413. Every PUT body (CAS and AC)
//!   gets the same idle and whole-request timeouts as NAR uploads (408).
//! - **No byte ranges** on CAS GETs: Bazel's HTTP cache never asks for
//!   them, so a `Range` header is ignored and the whole blob sent (200).
//! - **The empty blob always exists**, in every cache, and is never stored.
//! - **AC entries are `ActionResult`s.** A PUT must decode as one (else
//!   400) and is stored as sent, up to [`MAX_ACTION_RESULT`] (else 413). A
//!   GET serves it only while every blob it names (files inside output trees
//!   included) is still stored, like GetActionResult; otherwise it is a miss,
//!   so Bazel rebuilds instead of failing to download an evicted output.
//! - **Cache names `ac` and `cas`** cannot be used for Nix at the root: the
//!   static segments win, as they must for `/ac/<sha256>` to reach us.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use futures::StreamExt;
use garret_meta::Cache;
use garret_nix::Sha256Hash;
use serde::Deserialize;

use super::body::{idle_limited, read_small, within_request_timeout};
use super::{AppState, access};
use crate::auth::Permission;
use crate::blobs::{BlobError, Expect};
use crate::clock::unix_now;
use crate::error::Error;
use crate::reapi::Reapi;
use crate::upload::BodyError;
use garret_proto::reapi::ActionResult;
use prost::Message as _;

/// Largest serialized `ActionResult` accepted: bazel-remote's limit for the
/// same thing (results inline only digests, so real ones are a few KiB).
pub const MAX_ACTION_RESULT: usize = 4 << 20;

/// SHA-256 of no bytes: the blob every CAS holds.
const EMPTY_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// The REAPI core: the default cache, and the completeness check of stored
/// action results.
#[derive(Clone, Debug)]
struct Core(Arc<Reapi>);

/// The path parameters of every route here; `cache` is absent at the root.
#[derive(Debug, Deserialize, PartialEq, Eq)]
struct Key {
    cache: Option<String>,
    hash: String,
}

/// The Bazel HTTP cache routes, for merging into the main router. Requests
/// without a cache prefix go to `default_cache`.
///
/// The prefix parameter is called `cache`, like the substituter's
/// `/{cache}/{file}`: the router allows only one parameter name per segment.
pub(crate) fn routes(reapi: Arc<Reapi>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/ac/{hash}", get(ac_get).put(ac_put))
        .route("/cas/{hash}", get(cas_get).put(cas_put))
        .route("/{cache}/ac/{hash}", get(ac_get).put(ac_put))
        .route("/{cache}/cas/{hash}", get(cas_get).put(cas_put))
        .layer(Extension(Core(reapi)))
}

impl Key {
    /// The cache this request addresses, checked for `required`.
    async fn cache(
        &self,
        state: &AppState,
        headers: &HeaderMap,
        core: &Core,
        required: Permission,
    ) -> Result<Cache, Error> {
        let name = self
            .cache
            .as_deref()
            .unwrap_or(core.0.default_cache().as_str());
        access::cache_for_request(state, headers, name, required).await
    }

    fn hash(&self) -> Result<Sha256Hash, Error> {
        parse_hash(&self.hash)
    }
}

/// A lowercase or uppercase hex SHA-256, the only form Bazel sends.
fn parse_hash(text: &str) -> Result<Sha256Hash, Error> {
    if text.len() != 64 {
        return Err(Error::InvalidArgument(format!(
            "`{text}` is not a hex SHA-256 digest"
        )));
    }
    Sha256Hash::parse_digest(text)
        .map_err(|_| Error::InvalidArgument(format!("`{text}` is not a hex SHA-256 digest")))
}

/// `GET`/`HEAD /{cache}/ac/{hash}`: the stored `ActionResult` bytes, or 404.
async fn ac_get(
    State(state): State<Arc<AppState>>,
    Path(key): Path<Key>,
    Extension(core): Extension<Core>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let cache = key.cache(&state, &headers, &core, Permission::PULL).await?;
    let hash = key.hash()?;
    let result = state
        .meta
        .get_action_result(cache.id, hash.as_bytes())
        .await?
        .ok_or_else(|| Error::NotFound(format!("ac/{}", hash.to_hex())))?;
    if !core
        .0
        .stored_result_is_complete(&cache, &result)
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
    {
        return Err(Error::NotFound(format!(
            "ac/{}: some outputs of this result are no longer stored",
            hash.to_hex()
        )));
    }
    state
        .meta
        .touch_action_result(cache.id, hash.as_bytes(), unix_now())
        .await?;
    let len = result.len() as u64;
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(result)
    };
    octets(len, body)
}

/// `PUT /{cache}/ac/{hash}`: stores (or replaces) an `ActionResult`.
async fn ac_put(
    State(state): State<Arc<AppState>>,
    Path(key): Path<Key>,
    Extension(core): Extension<Core>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let cache = key.cache(&state, &headers, &core, Permission::PUSH).await?;
    let hash = key.hash()?;
    let result = read_small(body, &headers, MAX_ACTION_RESULT as u64, &state.limits).await?;
    ActionResult::decode(result.clone())
        .map_err(|e| Error::InvalidArgument(format!("the body is not an ActionResult: {e}")))?;
    state
        .meta
        .put_action_result(cache.id, hash.as_bytes(), &result, unix_now())
        .await?;
    stored()
}

/// `GET`/`HEAD /{cache}/cas/{hash}`: the blob's content, streamed.
async fn cas_get(
    State(state): State<Arc<AppState>>,
    Path(key): Path<Key>,
    Extension(core): Extension<Core>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let cache = key.cache(&state, &headers, &core, Permission::PULL).await?;
    let hash = key.hash()?;
    if *hash.as_bytes() == EMPTY_SHA256 {
        return octets(0, Body::empty());
    }
    let blob = state
        .meta
        .cas_blob(cache.id, hash.as_bytes())
        .await?
        .ok_or_else(|| Error::NotFound(format!("cas/{}", hash.to_hex())))?;
    state
        .meta
        .touch_cas(cache.id, &[blob.hash], unix_now())
        .await?;
    if method == Method::HEAD {
        return octets(blob.size, Body::empty());
    }
    let mut content = Box::pin(state.blobs.read(blob.id, 0..blob.size).await?);
    // As for NARs: the first piece comes before the status line, so a chunk
    // that is already missing is a 503, not a 200 that breaks off; a later
    // failure aborts the body, and Bazel checks the digest of what it got.
    let first = content
        .next()
        .await
        .transpose()
        .map_err(|e| Error::from(BlobError::Store(e)))?;
    let rest = content.map(|part| part.map_err(std::io::Error::other));
    octets(
        blob.size,
        Body::from_stream(futures::stream::iter(first.map(Ok)).chain(rest)),
    )
}

/// `PUT /{cache}/cas/{hash}`: stores the body if it hashes to `hash`.
async fn cas_put(
    State(state): State<Arc<AppState>>,
    Path(key): Path<Key>,
    Extension(core): Extension<Core>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let cache = key.cache(&state, &headers, &core, Permission::PUSH).await?;
    let hash = key.hash()?;
    let size = content_length(&headers)?;
    let limit = state.limits.max_nar_size;
    if let Some(size) = size.filter(|s| *s > limit) {
        return Err(Error::PayloadTooLarge(format!(
            "the blob of {size} bytes is larger than the limit of {limit} bytes"
        )));
    }
    if *hash.as_bytes() == EMPTY_SHA256 {
        // Nothing to store, but the body must still be what the path says.
        return match read_small(body, &headers, 0, &state.limits).await {
            Ok(_) => stored(),
            Err(BodyError::TooLarge { .. }) => Err(Error::InvalidArgument(
                "the empty blob's body is not empty".into(),
            )),
            Err(e) => Err(e.into()),
        };
    }
    let expect = Expect {
        hash: Some(hash),
        size,
        max_size: Some(limit),
    };
    let put = state
        .blobs
        .put(idle_limited(body, state.limits.idle_timeout()), expect);
    let blob = within_request_timeout(&state.limits, async {
        Ok::<_, Error>(Box::pin(put).await?)
    })
    .await?;
    state
        .meta
        .put_cas_entry(cache.id, blob.id, unix_now())
        .await?;
    tracing::debug!(
        cache = %cache.name,
        hash = %hash.to_hex(),
        size = blob.size,
        deduplicated = blob.deduplicated,
        "stored CAS blob"
    );
    stored()
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Error> {
    headers
        .get(header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::InvalidArgument("malformed Content-Length".into()))
        })
        .transpose()
}

fn octets(len: u64, body: Body) -> Result<Response, Error> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .body(body)
        .map_err(|e| Error::Internal(e.to_string()))
}

/// The answer to a successful PUT: Bazel accepts 200, 201, 202 and 204.
fn stored() -> Result<Response, Error> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .map_err(|e| Error::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn empty_digest_is_the_hash_of_nothing() {
        assert_eq!(*Sha256Hash::of(b"").as_bytes(), EMPTY_SHA256);
    }

    #[test]
    fn hashes_are_hex_only() {
        let hex = Sha256Hash::of(b"x").to_hex();
        assert_eq!(parse_hash(&hex).unwrap(), Sha256Hash::of(b"x"));
        assert_eq!(
            parse_hash(&hex.to_uppercase()).unwrap(),
            Sha256Hash::of(b"x")
        );
        let nix32 = Sha256Hash::of(b"x").to_nix32();
        for bad in [
            "",
            "abc",
            &hex[1..],
            &format!("{hex}0"),
            &nix32,
            &"g".repeat(64),
        ] {
            assert!(
                matches!(parse_hash(bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn keys_with_and_without_a_cache() {
        let key = |pairs: &[(&str, &str)]| -> Key {
            let map: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            serde_json::from_value(serde_json::to_value(map).unwrap()).unwrap()
        };
        assert_eq!(
            key(&[("hash", "h")]),
            Key {
                cache: None,
                hash: "h".into()
            }
        );
        assert_eq!(
            key(&[("cache", "c"), ("hash", "h")]),
            Key {
                cache: Some("c".into()),
                hash: "h".into()
            }
        );
    }

    #[test]
    fn content_length_is_checked() {
        let mut headers = HeaderMap::new();
        assert_eq!(content_length(&headers).unwrap(), None);
        headers.insert(header::CONTENT_LENGTH, "42".parse().unwrap());
        assert_eq!(content_length(&headers).unwrap(), Some(42));
        headers.insert(header::CONTENT_LENGTH, "-1".parse().unwrap());
        assert!(content_length(&headers).is_err());
    }
}
