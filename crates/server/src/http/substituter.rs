//! The Nix substituter side of a cache: `nix-cache-info`, signed narinfo,
//! and NAR downloads served as the stored zstd frames, with ranges.

use std::ops::Range;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use garret_meta::{Cache, NixObjectRow};
use garret_nix::narinfo::NarInfo;
use garret_nix::{Sha256Hash, StorePath, StorePathHash};

use super::body::first_piece_then_stream;
use super::{AppState, access};
use crate::auth::Permission;
use crate::error::Error;
use crate::metrics::Lookup;
use crate::signatures::Signatures;

/// `GET /{cache}/{file}`: `nix-cache-info` or `<hash>.narinfo`.
pub async fn cache_file(
    State(state): State<Arc<AppState>>,
    Path((cache, file)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, Error> {
    if file == "nix-cache-info" {
        let cache = access::cache_for_request(&state, &headers, &cache, Permission::PULL).await?;
        let body = format!(
            "StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n",
            cache.store_dir, cache.priority
        );
        return Ok(([(header::CONTENT_TYPE, "text/x-nix-cache-info")], body).into_response());
    }
    let (cache, row) = nix_object(&state, &headers, &cache, &file, Lookup::Narinfo).await?;
    let text = narinfo(&state.signatures, &cache, row)?;
    let mut response = ([(header::CONTENT_TYPE, "text/x-nix-narinfo")], text).into_response();
    if method == Method::HEAD {
        *response.body_mut() = Body::empty();
    }
    Ok(response)
}

/// The cache called `cache` and the object a `<hash>.narinfo` or
/// `<hash>.nar` file name (as `lookup` says) names there, in one query
/// once the hash parses. The requester is authorized first, so a stranger
/// learns 401 whatever the name; then a malformed hash is the client's
/// error (400), an unknown one a 404 and a miss. A found object is a hit
/// and counts as read (narinfo and NAR alike).
async fn nix_object(
    state: &AppState,
    headers: &HeaderMap,
    cache: &str,
    file: &str,
    lookup: Lookup,
) -> Result<(Cache, NixObjectRow), Error> {
    let suffix = if lookup == Lookup::Narinfo {
        ".narinfo"
    } else {
        ".nar"
    };
    let hash = match store_path_hash(file, suffix) {
        Ok(hash) => hash,
        Err(e) => {
            access::cache_for_request(state, headers, cache, Permission::PULL).await?;
            return Err(e);
        }
    };
    let (cache, row) =
        access::cache_and_nix_object(state, headers, cache, Permission::PULL, &hash.to_string())
            .await?;
    state.metrics.lookup(lookup, row.is_some());
    let row = row.ok_or_else(|| Error::NotFound(file.to_owned()))?;
    state
        .accesses
        .nix_object_read(cache.id, &row.object.store_path_hash);
    Ok((cache, row))
}

/// The store path hash a `<hash><suffix>` file name names.
fn store_path_hash(file: &str, suffix: &str) -> Result<StorePathHash, Error> {
    let stem = file
        .strip_suffix(suffix)
        .ok_or_else(|| Error::NotFound(file.to_owned()))?;
    stem.parse().map_err(|e| {
        // `nix copy --to` asks for the NAR it is about to upload by its file
        // hash; that file is simply not here (we serve NARs by path hash).
        if Sha256Hash::parse_prefixed(&format!("sha256:{stem}")).is_ok() {
            Error::NotFound(file.to_owned())
        } else {
            Error::InvalidArgument(format!("invalid store path hash: {e}"))
        }
    })
}

/// The narinfo of `row`, signed with the cache's current key. Signed at
/// serve time, like Attic, so rotating a cache key re-signs everything;
/// [`Signatures`] keeps the parsed key and the signature, so a repeated hit
/// does neither again.
fn narinfo(signatures: &Signatures, cache: &Cache, row: NixObjectRow) -> Result<String, Error> {
    let NixObjectRow { object, blob, .. } = row;
    let corrupt =
        |what: &str, e: &dyn std::fmt::Display| Error::Internal(format!("stored {what}: {e}"));
    let mut info = NarInfo {
        store_path: StorePath::from_base_name(&object.store_path)
            .map_err(|e| corrupt("store path", &e))?,
        url: format!("nar/{}.nar", object.store_path_hash),
        compression: "zstd".into(),
        file_hash: Some(Sha256Hash::from_bytes(blob.file_hash)),
        file_size: Some(blob.file_size),
        nar_hash: Sha256Hash::from_bytes(object.nar_hash),
        nar_size: object.nar_size,
        references: object
            .references
            .iter()
            .map(|r| StorePath::from_base_name(r))
            .collect::<Result<_, _>>()
            .map_err(|e| corrupt("reference", &e))?,
        deriver: object
            .deriver
            .as_deref()
            .map(StorePath::from_base_name)
            .transpose()
            .map_err(|e| corrupt("deriver", &e))?,
        system: object.system,
        signatures: object.sigs,
        ca: object
            .ca
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e| corrupt("CA", &e))?,
    };
    let signature = signatures
        .sign(&cache.signing_key, &info.fingerprint(&cache.store_dir))
        .map_err(|e| corrupt("signing key", &e))?;
    info.add_signature(&signature);
    Ok(info.render(&cache.store_dir))
}

/// `GET /{cache}/nar/{hash}.nar`: the stored zstd frames, unchanged, with
/// `Content-Length` and byte ranges so Nix can resume a broken download.
pub async fn nar(
    State(state): State<Arc<AppState>>,
    Path((cache, file)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let (_, row) = nix_object(&state, &headers, &cache, &file, Lookup::Nar).await?;
    let size = row.blob.file_size;
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(value) => parse_range(value, size)?,
        None => None,
    };
    let (status, span) = match &range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r.clone()),
        None => (StatusCode::OK, 0..size),
    };
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/x-nix-nar")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, span.end - span.start);
    if range.is_some() {
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{size}", span.start, span.end.saturating_sub(1)),
        );
    }
    let body = if method == Method::HEAD || span.is_empty() {
        Body::empty()
    } else {
        first_piece_then_stream(state.blobs.read_frames(row.blob.id, span).await?).await?
    };
    response
        .body(body)
        .map_err(|e| Error::Internal(e.to_string()))
}

/// Parses a single `bytes=` range. Syntax we do not serve (several ranges)
/// is ignored and the whole file is sent, as HTTP allows; a range that starts
/// past the end is a 416.
fn parse_range(value: &str, size: u64) -> Result<Option<Range<u64>>, Error> {
    let Some(spec) = value.strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let range = match (start.parse::<u64>(), end.parse::<u64>()) {
        (Ok(start), Ok(end)) if start <= end => start..end.saturating_add(1).min(size),
        (Ok(start), Err(_)) if end.is_empty() => start..size,
        (Err(_), Ok(suffix)) if start.is_empty() => size.saturating_sub(suffix)..size,
        _ => return Ok(None),
    };
    if range.start >= size && !(size == 0 && range.start == 0) {
        return Err(Error::RangeNotSatisfiable { size });
    }
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), Some(0..10));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), Some(90..100));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), Some(90..100));
        assert_eq!(parse_range("bytes=95-200", 100).unwrap(), Some(95..100));
        assert_eq!(parse_range("bytes=0-1,5-6", 100).unwrap(), None);
        assert_eq!(parse_range("items=0-1", 100).unwrap(), None);
        assert_eq!(parse_range("bytes=5-2", 100).unwrap(), None);
        assert!(matches!(
            parse_range("bytes=100-", 100),
            Err(Error::RangeNotSatisfiable { size: 100 })
        ));
    }
}
