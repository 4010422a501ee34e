//! Plain Nix uploads: `nix copy --to 'http://host/{cache}?compression=…'`.
//!
//! Nix sends each NAR first, named by the hash of its compressed file, and
//! the narinfo after it. The NAR is decompressed, checked against its file
//! name and the NAR grammar, and stored like any other; a row then records
//! that this cache's uploader really sent it. The narinfo names the NAR by
//! NAR hash, and becomes a Nix object only if such a record exists (so a
//! hash alone never grants access to another cache's content). The stored
//! narinfo is re-signed with the cache's key when served.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt as _;
use garret_nix::narinfo::NarInfo;
use garret_nix::{Sha256Hash, StorePathHash};

use super::body::{
    Compression, DecodeLimits, idle_limited, nar_of_file, read_small, within_request_timeout,
};
use super::{AppState, access};
use crate::auth::Permission;
use crate::blobs::Expect;
use crate::clock::unix_now;
use crate::error::Error;
use crate::upload::{NarCheck, PathInfo};

/// `PUT /{cache}/{file}`: a narinfo, or `nix-cache-info` (which Nix PUTs
/// when it could not read it; the cache exists, so there is nothing to do).
pub async fn put_cache_file(
    State(state): State<Arc<AppState>>,
    Path((cache, file)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let cache = access::cache_for_request(&state, &headers, &cache, Permission::PUSH).await?;
    if file == "nix-cache-info" {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let hash: StorePathHash = file
        .strip_suffix(".narinfo")
        .ok_or_else(|| Error::InvalidArgument(format!("cannot upload {file:?} here")))?
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("invalid store path hash: {e}")))?;
    let text = read_small(
        body,
        &headers,
        state.limits.max_preamble_size,
        &state.limits,
    )
    .await?;
    let text = std::str::from_utf8(&text)
        .map_err(|_| Error::InvalidArgument("the narinfo is not UTF-8".into()))?;
    let narinfo = NarInfo::parse(text, &cache.store_dir)
        .map_err(|e| Error::InvalidArgument(format!("invalid narinfo: {e}")))?;
    if narinfo.store_path.hash() != &hash {
        return Err(Error::InvalidArgument(format!(
            "the narinfo for {} was uploaded as {file}",
            narinfo.store_path
        )));
    }
    let info = PathInfo {
        store_path: narinfo.store_path,
        nar_hash: narinfo.nar_hash,
        nar_size: narinfo.nar_size,
        references: narinfo.references,
        deriver: narinfo.deriver,
        system: narinfo.system,
        sigs: narinfo.signatures,
        ca: narinfo.ca,
    };
    info.validate(&cache.store_dir)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let now = unix_now();
    let missing = || {
        Error::InvalidArgument(format!(
            "no NAR with hash {} was uploaded to this cache; upload it first",
            info.nar_hash
        ))
    };
    let blob = state
        .meta
        .lease_blob(info.nar_hash.as_bytes(), now)
        .await?
        .ok_or_else(missing)?;
    if blob.size != info.nar_size {
        return Err(Error::InvalidArgument(format!(
            "NarSize {} does not match the uploaded NAR of {} bytes",
            info.nar_size, blob.size
        )));
    }
    let since = now.saturating_sub(i64::try_from(state.meta.grace().as_secs()).unwrap_or(i64::MAX));
    if !state
        .meta
        .nix_upload_exists(cache.id, blob.id, since)
        .await?
    {
        return Err(missing());
    }
    let path = info.store_path.to_string();
    state
        .meta
        .upsert_nix_object(cache.id, &info.into_object(blob.id), now)
        .await?;
    tracing::info!(cache = %cache.name, %path, "stored path from a narinfo upload");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `PUT /{cache}/nar/{file hash}.nar[.zst|.xz]`.
pub async fn put_nar(
    State(state): State<Arc<AppState>>,
    Path((cache, file)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let cache = access::cache_for_request(&state, &headers, &cache, Permission::PUSH).await?;
    let (stem, compression) = Compression::split_file_name(&file).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "cannot store {file:?}: upload with ?compression=zstd, xz or none"
        ))
    })?;
    let file_hash = Sha256Hash::parse_prefixed(&format!("sha256:{stem}"))
        .map_err(|e| Error::InvalidArgument(format!("invalid file hash in {file:?}: {e}")))?;
    // Nix sends the NAR before its narinfo, so its NarSize is not known
    // yet: the decoder's memory and expansion bounds stop a bomb early.
    let stream = nar_of_file(
        idle_limited(body, state.limits.idle_timeout()),
        Some(file_hash),
        compression,
        DecodeLimits::new(&state.limits),
    );
    let put = state.blobs.put(
        NarCheck::new(stream.into_stream()),
        Expect {
            hash: None,
            size: None,
            max_size: Some(state.limits.max_nar_size),
        },
    );
    let stored = within_request_timeout(&state.limits, async {
        Ok::<_, Error>(Box::pin(put).await?)
    })
    .await?;
    state
        .meta
        .record_nix_upload(cache.id, stored.id, unix_now())
        .await?;
    tracing::info!(cache = %cache.name, nar_hash = %stored.hash, size = stored.size, "stored NAR from a plain Nix upload");
    Ok(StatusCode::NO_CONTENT.into_response())
}
