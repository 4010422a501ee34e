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
//! - **One core with REAPI.** The cache lookup and authorization, the
//!   digest rules (lower-case hex only, as REAPI requires), the CAS write
//!   path and the action cache's rules are `bazel_core`'s, so both front
//!   ends answer alike.
//! - **AC entries are `ActionResult`s.** A PUT must decode as one and
//!   pass UpdateActionResult's path and digest checks (else 400), fit
//!   [`MAX_ACTION_RESULT`] (else 413), and is stored as sent. A GET serves
//!   it only while every blob it names (files inside output trees included)
//!   is still stored, like GetActionResult; otherwise it is a miss, so Bazel
//!   rebuilds instead of failing to download an evicted output.
//! - **Cache names `ac` and `cas`** cannot be used for Nix at the root: the
//!   static segments win, as they must for `/ac/<sha256>` to reach us.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use garret_meta::Cache;
use garret_nix::Sha256Hash;
use garret_proto::reapi::ActionResult;
use prost::Message as _;
use serde::Deserialize;

use super::AppState;
use super::body::{first_piece_then_stream, idle_limited, read_small, within_request_timeout};
use crate::auth::ReapiAccess;
use crate::bazel_core::digest::Digest;
use crate::bazel_core::{MAX_ACTION_RESULT, Update};
use crate::blobs::Expect;
use crate::error::Error;
use crate::metrics::Lookup;
use crate::upload::BodyError;

/// The path parameters of every route here; `cache` is absent at the root.
#[derive(Debug, Deserialize, PartialEq, Eq)]
struct Key {
    cache: Option<String>,
    hash: String,
}

/// The Bazel HTTP cache routes, for merging into the main router. Requests
/// without a cache prefix go to the Bazel core's default cache.
///
/// The prefix parameter is called `cache`, like the substituter's
/// `/{cache}/{file}`: the router allows only one parameter name per segment.
pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/ac/{hash}", get(ac_get).put(ac_put))
        .route("/cas/{hash}", get(cas_get).put(cas_put))
        .route("/{cache}/ac/{hash}", get(ac_get).put(ac_put))
        .route("/{cache}/cas/{hash}", get(cas_get).put(cas_put))
}

impl Key {
    /// The cache this request addresses, checked for `access` by the core,
    /// as REAPI checks it.
    async fn cache(
        &self,
        state: &AppState,
        headers: &HeaderMap,
        access: ReapiAccess,
    ) -> Result<Cache, Error> {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        state
            .bazel
            .cache(authorization, self.cache.as_deref().unwrap_or(""), access)
            .await
    }

    /// The hash in the path, under REAPI's digest rules (lower-case hex).
    fn hash(&self) -> Result<Sha256Hash, Error> {
        Ok(Digest::parse_hash(&self.hash)?)
    }
}

/// `GET`/`HEAD /{cache}/ac/{hash}`: the stored `ActionResult` bytes, or 404.
/// Served only while every blob it names is (see `bazel_core`).
async fn ac_get(
    State(state): State<Arc<AppState>>,
    Path(key): Path<Key>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let cache = key.cache(&state, &headers, ReapiAccess::Read).await?;
    let hash = key.hash()?;
    let (_, stored) = state.bazel.action_result(&cache, &hash).await?;
    let len = stored.len() as u64;
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(stored)
    };
    octets(len, body)
}

/// `PUT /{cache}/ac/{hash}`: stores (or replaces) an `ActionResult`,
/// checked as UpdateActionResult checks it, except that its outputs may
/// follow it (see [`Update::AsSent`]).
async fn ac_put(
    State(state): State<Arc<AppState>>,
    Path(key): Path<Key>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let cache = key.cache(&state, &headers, ReapiAccess::Write).await?;
    let hash = key.hash()?;
    let sent = read_small(body, &headers, MAX_ACTION_RESULT as u64, &state.limits).await?;
    let result = ActionResult::decode(sent.clone())
        .map_err(|e| Error::InvalidArgument(format!("the body is not an ActionResult: {e}")))?;
    state
        .bazel
        .update_action_result(&cache, &hash, result, Update::AsSent(sent))
        .await?;
    stored()
}

/// `GET`/`HEAD /{cache}/cas/{hash}`: the blob's content, streamed.
async fn cas_get(
    State(state): State<Arc<AppState>>,
    Path(key): Path<Key>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let cache = key.cache(&state, &headers, ReapiAccess::Read).await?;
    let hash = key.hash()?;
    if hash == Digest::EMPTY.hash {
        return octets(0, Body::empty());
    }
    let found = state.meta.cas_blob(cache.id, hash.as_bytes()).await?;
    state.metrics.lookup(Lookup::Cas, found.is_some());
    let blob = found.ok_or_else(|| Error::NotFound(format!("cas/{}", hash.to_hex())))?;
    state.accesses.cas_read(cache.id, &[blob.hash]);
    if method == Method::HEAD {
        return octets(blob.size, Body::empty());
    }
    // As for NARs: a chunk that is already missing is a 503, not a 200
    // that breaks off; Bazel checks the digest of what it got.
    let content = state.blobs.read(blob.id, 0..blob.size).await?;
    octets(blob.size, first_piece_then_stream(content).await?)
}

/// `PUT /{cache}/cas/{hash}`: stores the body if it hashes to `hash`,
/// through the core's CAS write path.
async fn cas_put(
    State(state): State<Arc<AppState>>,
    Path(key): Path<Key>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let cache = key.cache(&state, &headers, ReapiAccess::Write).await?;
    let hash = key.hash()?;
    let size = content_length(&headers)?;
    let limit = state.bazel.max_blob_size();
    if let Some(size) = size.filter(|s| *s > limit) {
        return Err(Error::PayloadTooLarge(format!(
            "the blob of {size} bytes is larger than the limit of {limit} bytes"
        )));
    }
    if hash == Digest::EMPTY.hash {
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
    let input = idle_limited(body, state.limits.idle_timeout());
    let blob = within_request_timeout(
        &state.limits,
        Box::pin(state.bazel.put_cas(&cache, expect, input)),
    )
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
    fn hashes_are_lower_case_hex_only() {
        let parse_hash = |hash: &str| {
            Key {
                cache: None,
                hash: hash.to_owned(),
            }
            .hash()
        };
        let hex = Sha256Hash::of(b"x").to_hex();
        assert_eq!(parse_hash(&hex).unwrap(), Sha256Hash::of(b"x"));
        let nix32 = Sha256Hash::of(b"x").to_nix32();
        for bad in [
            "",
            &hex.to_uppercase(),
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
