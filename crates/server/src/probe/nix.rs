//! The Nix half of a probe, in the order a substituter and `attic push`
//! use a cache: reach it, read `nix-cache-info`, compare its public key,
//! then, with a token, push a canary path and read it back (narinfo,
//! signature, NAR) before deleting it. Without a push token the round trip
//! uses a path the operator names (`--path`), or is skipped.

use garret_nix::narinfo::NarInfo;
use garret_nix::signing::VerifyingKey;
use garret_nix::{Sha256Hasher, StorePathHash};
use hyper::header::{CONTENT_TYPE, HeaderName};
use hyper::{Method, StatusCode};
use serde::Deserialize;
use tokio::io::AsyncReadExt as _;

use super::canary::NixCanary;
use super::http::{Http, Response};
use super::report::Report;
use super::target::{NixTarget, Target};

const REACH: &str = "nix.reach";
const CACHE_INFO: &str = "nix.cache-info";
const PUBLIC_KEY: &str = "nix.public-key";
const CANARY_UPLOAD: &str = "nix.canary-upload";
const NARINFO: &str = "nix.narinfo";
const NAR: &str = "nix.nar";
const CANARY_CLEANUP: &str = "nix.canary-cleanup";

/// Bounds on what the cache may answer: `nix-cache-info` and the cache's
/// configuration are a few lines; a narinfo with many references a few
/// hundred KiB (the server's own narinfo bound is 1 MiB).
const MAX_SMALL_ANSWER: usize = 64 << 10;
const MAX_NARINFO: usize = 1 << 20;
/// Memory a NAR's decompressor may use (zstd window, xz dictionary): the
/// server's own default for uploads.
const DECODER_MEMORY: u64 = 128 << 20;
const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// Runs the Nix checks against `nix`, adding one line each to `report`.
pub async fn probe(http: &Http, target: &Target, nix: &NixTarget, report: &mut Report) {
    let Some(info) = reach(http, target, nix, report).await else {
        for check in [PUBLIC_KEY, CANARY_UPLOAD, NARINFO, NAR, CANARY_CLEANUP] {
            report.skip(check, "the cache did not answer nix-cache-info");
        }
        return;
    };
    let config = cache_config(http, nix).await;
    let cache_key: Option<VerifyingKey> =
        config.as_ref().ok().and_then(|c| c.public_key.parse().ok());
    check_public_key(target, &config, report);
    // The signature must verify under a key the operator expects, else
    // (none given) under the key the cache itself announces.
    let keys = if target.expected_keys.value.is_empty() {
        cache_key.into_iter().collect()
    } else {
        target.expected_keys.value.clone()
    };
    let api = config.as_ref().map_or(&nix.server, |c| &c.api_endpoint);
    let canary = push_canary(http, target, nix, &info, api, report).await;
    // This run's canary if there is one, else the path the operator named.
    let path = canary
        .as_ref()
        .map(|c| *c.path.hash())
        .or(target.known_path);
    if let Some(path) = path {
        match narinfo(http, nix, &info, &path, &keys, canary.as_ref()).await {
            Ok((narinfo, detail)) => {
                report.pass(NARINFO, detail);
                report.record(NAR, nar(http, nix, &narinfo).await);
            }
            Err(why) => {
                report.fail(NARINFO, why);
                report.skip(NAR, "no narinfo to follow");
            }
        }
    } else {
        let why = "no path to read: give --path STORE_PATH or a token that may push a canary";
        report.skip(NARINFO, why);
        report.skip(NAR, why);
    }
    match &canary {
        Some(canary) => clean_up(http, nix, api, canary, report).await,
        None => report.skip(CANARY_CLEANUP, "no canary was written"),
    }
}

/// What `nix-cache-info` says.
struct CacheInfo {
    store_dir: String,
}

/// `GET nix-cache-info`: the first answer shows the cache is reachable;
/// its content, that it exists and how Nix will use it.
async fn reach(
    http: &Http,
    target: &Target,
    nix: &NixTarget,
    report: &mut Report,
) -> Option<CacheInfo> {
    let url = format!("{}/nix-cache-info", nix.cache_url);
    let response = match http.get(&url).await {
        Ok(response) => response,
        Err(why) => {
            report.fail(REACH, format!("{} ({}): {why}", nix.cache_url, nix.source));
            report.skip(CACHE_INFO, "the cache was not reached");
            return None;
        }
    };
    let scheme = if url.starts_with("https:") {
        "HTTPS"
    } else {
        "plain HTTP"
    };
    report.pass(
        REACH,
        format!("{} answered over {scheme} ({})", nix.cache_url, nix.source),
    );
    match cache_info(http, response, target, nix).await {
        Ok((info, detail)) => {
            report.pass(CACHE_INFO, detail);
            Some(info)
        }
        Err(why) => {
            report.fail(CACHE_INFO, why);
            None
        }
    }
}

async fn cache_info(
    http: &Http,
    response: Response,
    target: &Target,
    nix: &NixTarget,
) -> Result<(CacheInfo, String), String> {
    let status = response.status();
    if status != StatusCode::OK {
        let refusal = http.refusal(response).await;
        let cache = &nix.cache;
        return Err(match (status, &target.token) {
            (StatusCode::NOT_FOUND, _) => {
                format!("no cache `{cache}` on {}: {refusal}", nix.server)
            }
            (StatusCode::UNAUTHORIZED, None) => {
                format!("cache `{cache}` needs a token to be read (or does not exist): {refusal}")
            }
            (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, Some(token)) => format!(
                "the token ({}) may not read cache `{cache}` (or it does not exist): {refusal}",
                token.source
            ),
            _ => refusal,
        });
    }
    let body = http.read_bounded(response, MAX_SMALL_ANSWER).await?;
    let text = String::from_utf8_lossy(&body);
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let store_dir = field("StoreDir")
        .ok_or("nix-cache-info has no StoreDir line: is this a Nix binary cache?")?
        .to_owned();
    let priority = field("Priority").unwrap_or("50 (Nix's default, none given)");
    let detail = format!("StoreDir {store_dir}, Priority {priority}");
    Ok((CacheInfo { store_dir }, detail))
}

/// The parts of Attic's cache configuration the probe uses.
#[derive(Deserialize)]
struct CacheConfig {
    public_key: String,
    api_endpoint: String,
}

/// `GET <cache>/attic-cache-info`, Attic's (and garret's) cache
/// configuration, which names the cache's public key.
async fn cache_config(http: &Http, nix: &NixTarget) -> Result<CacheConfig, String> {
    let url = format!("{}/attic-cache-info", nix.cache_url);
    let response = http.get(&url).await?;
    if response.status() != StatusCode::OK {
        return Err(format!(
            "the cache's configuration (attic-cache-info) is not readable: {}",
            http.refusal(response).await
        ));
    }
    let body = http.read_bounded(response, MAX_SMALL_ANSWER).await?;
    let mut config: CacheConfig = serde_json::from_slice(&body)
        .map_err(|e| format!("attic-cache-info is not Attic's cache configuration: {e}"))?;
    if !config.api_endpoint.ends_with('/') {
        config.api_endpoint.push('/');
    }
    Ok(config)
}

/// The cache's key against the expected ones. With none given, the
/// check is skipped, but says the key, for the operator to pin.
fn check_public_key(target: &Target, config: &Result<CacheConfig, String>, report: &mut Report) {
    let key = match config {
        Ok(config) => config.public_key.parse::<VerifyingKey>().map_err(|e| {
            format!(
                "the cache's public key {:?} is malformed: {e}",
                config.public_key
            )
        }),
        Err(why) => Err(why.clone()),
    };
    let expected = &target.expected_keys;
    match key {
        Err(why) => report.fail(PUBLIC_KEY, why),
        Ok(key) if expected.value.is_empty() => report.skip(
            PUBLIC_KEY,
            format!("no expected key (--public-key, or trusted-public-keys in nix.conf); the cache's key is {key}"),
        ),
        Ok(key) if expected.value.contains(&key) => {
            report.pass(PUBLIC_KEY, format!("{key} is expected ({})", expected.source));
        }
        Ok(key) => {
            let names: Vec<String> = expected.value.iter().map(ToString::to_string).collect();
            report.fail(
                PUBLIC_KEY,
                format!(
                    "the cache's key is {key}, but {} expects {}",
                    expected.source,
                    names.join(" or ")
                ),
            );
        }
    }
}

/// The canary, written with `PUT /_api/v1/upload-path` if there is a token;
/// `None` if it was not written.
async fn push_canary(
    http: &Http,
    target: &Target,
    nix: &NixTarget,
    info: &CacheInfo,
    api: &str,
    report: &mut Report,
) -> Option<NixCanary> {
    let Some(token) = &target.token else {
        report.skip(
            CANARY_UPLOAD,
            "no token: give --token (or ATTIC_TOKEN) of a token that may push",
        );
        return None;
    };
    let outcome = async {
        let canary = NixCanary::generate()?;
        let nar_info = serde_json::json!({
            "cache": nix.cache.as_str(),
            "store_path_hash": canary.path.hash().to_string(),
            "store_path": canary.path.to_absolute_path_in(&info.store_dir),
            "references": [],
            "system": null,
            "deriver": null,
            "sigs": [],
            "ca": null,
            "nar_hash": format!("sha256:{}", canary.nar_hash.to_hex()),
            "nar_size": canary.nar.len(),
        });
        let headers = [
            (
                HeaderName::from_static("x-attic-nar-info"),
                nar_info.to_string(),
            ),
            (CONTENT_TYPE, "application/octet-stream".to_owned()),
        ];
        let url = format!("{api}_api/v1/upload-path");
        let response = http
            .send(Method::PUT, &url, &headers, canary.nar.clone().into())
            .await
            .map_err(|why| format!("{url}: {why}"))?;
        match response.status() {
            StatusCode::OK => Ok(canary),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(format!(
                "the token ({}) may not push to cache `{}`: {}",
                token.source,
                nix.cache,
                http.refusal(response).await
            )),
            _ => Err(format!(
                "the upload was refused: {}",
                http.refusal(response).await
            )),
        }
    }
    .await;
    match outcome {
        Ok(canary) => {
            report.pass(
                CANARY_UPLOAD,
                format!(
                    "uploaded {} ({} bytes)",
                    canary.path.to_absolute_path_in(&info.store_dir),
                    canary.nar.len()
                ),
            );
            Some(canary)
        }
        Err(why) => {
            report.fail(CANARY_UPLOAD, why);
            None
        }
    }
}

/// `GET <hash>.narinfo`, parsed, checked against the canary it should
/// describe, and its signature verified under `keys`.
async fn narinfo(
    http: &Http,
    nix: &NixTarget,
    info: &CacheInfo,
    path: &StorePathHash,
    keys: &[VerifyingKey],
    canary: Option<&NixCanary>,
) -> Result<(NarInfo, String), String> {
    let url = format!("{}/{path}.narinfo", nix.cache_url);
    let response = http.get(&url).await?;
    match response.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND if canary.is_some() => {
            return Err(format!(
                "the canary just uploaded is not served: {}",
                http.refusal(response).await
            ));
        }
        StatusCode::NOT_FOUND => {
            return Err(format!(
                "the cache has no path {path}: {}",
                http.refusal(response).await
            ));
        }
        _ => return Err(http.refusal(response).await),
    }
    let body = http.read_bounded(response, MAX_NARINFO).await?;
    let text = std::str::from_utf8(&body).map_err(|_| "the narinfo is not UTF-8")?;
    let narinfo =
        NarInfo::parse(text, &info.store_dir).map_err(|e| format!("invalid narinfo: {e}"))?;
    let store_path = narinfo.store_path.to_absolute_path_in(&info.store_dir);
    if narinfo.store_path.hash() != path {
        return Err(format!(
            "asked for {path}, the narinfo describes {store_path}"
        ));
    }
    if let Some(canary) = canary
        && (narinfo.nar_hash != canary.nar_hash || narinfo.nar_size != canary.nar.len() as u64)
    {
        return Err(format!(
            "the narinfo says NarHash {} NarSize {}, the canary uploaded was {} of {} bytes",
            narinfo.nar_hash,
            narinfo.nar_size,
            canary.nar_hash,
            canary.nar.len()
        ));
    }
    if keys.is_empty() {
        return Err(
            "no key to verify the signature with (no expected key, and the cache announced none)"
                .into(),
        );
    }
    let signer = keys
        .iter()
        .find(|key| narinfo.has_valid_signature(std::slice::from_ref(*key), &info.store_dir));
    if let Some(key) = signer {
        let detail = format!("{store_path} is signed by {}", key.name());
        return Ok((narinfo, detail));
    }
    let names: Vec<&str> = keys.iter().map(VerifyingKey::name).collect();
    let sigs = if narinfo.signatures.is_empty() {
        "none".to_owned()
    } else {
        narinfo.signatures.join(" ")
    };
    Err(format!(
        "no signature of {store_path} verifies under {} (its Sig lines: {sigs})",
        names.join(", ")
    ))
}

/// The NAR the narinfo points to, decompressed and hashed as it streams,
/// never more than its NarSize read.
async fn nar(http: &Http, nix: &NixTarget, narinfo: &NarInfo) -> Result<String, String> {
    use async_compression::tokio::bufread::{XzDecoder, ZstdDecoder};
    use async_compression::zstd::DParameter;

    let url = if narinfo.url.contains("://") {
        narinfo.url.clone()
    } else {
        format!("{}/{}", nix.cache_url, narinfo.url)
    };
    let response = http.get(&url).await?;
    if response.status() != StatusCode::OK {
        return Err(format!("{}: {}", narinfo.url, http.refusal(response).await));
    }
    let body = http.body_reader(response);
    let mut reader: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>> =
        match narinfo.compression.as_str() {
            "none" | "" => Box::pin(body),
            "zstd" => {
                let params = [DParameter::window_log_max(ZSTD_WINDOW_LOG_MAX)];
                let mut decoder = ZstdDecoder::with_params(body, &params);
                decoder.multiple_members(true);
                Box::pin(decoder)
            }
            "xz" => {
                let mut decoder = XzDecoder::with_mem_limit(body, DECODER_MEMORY);
                decoder.multiple_members(true);
                Box::pin(decoder)
            }
            other => {
                return Err(format!(
                    "the NAR's compression {other:?} is not one the probe reads (none, zstd, xz)"
                ));
            }
        };
    let mut hasher = Sha256Hasher::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading {}: {e}", narinfo.url))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if hasher.len() > narinfo.nar_size {
            return Err(format!(
                "the NAR is longer than its NarSize of {} bytes",
                narinfo.nar_size
            ));
        }
    }
    let (hash, size) = hasher.finish();
    if (hash, size) != (narinfo.nar_hash, narinfo.nar_size) {
        return Err(format!(
            "the NAR is {size} bytes with hash {hash}, the narinfo says {} bytes with {}",
            narinfo.nar_size, narinfo.nar_hash
        ));
    }
    Ok(format!(
        "{} bytes ({}), NarHash matches",
        size, narinfo.compression
    ))
}

/// `DELETE /_api/v1/objects/{cache}/{hash}`. A token that may push but not
/// delete leaves the canary behind, for retention to expire; that is
/// reported, not failed, since runner tokens rarely may delete.
async fn clean_up(
    http: &Http,
    nix: &NixTarget,
    api: &str,
    canary: &NixCanary,
    report: &mut Report,
) {
    let url = format!("{api}_api/v1/objects/{}/{}", nix.cache, canary.path.hash());
    match http
        .send(Method::DELETE, &url, &[], bytes::Bytes::new())
        .await
    {
        Ok(response) if response.status().is_success() => {
            report.pass(CANARY_CLEANUP, format!("deleted {}", canary.path));
        }
        Ok(response)
            if matches!(
                response.status(),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            ) =>
        {
            report.skip(
                CANARY_CLEANUP,
                format!(
                    "the token may not delete from cache `{}`, so {} stays until retention expires it: {}",
                    nix.cache,
                    canary.path,
                    http.refusal(response).await
                ),
            );
        }
        Ok(response) => report.fail(CANARY_CLEANUP, http.refusal(response).await),
        Err(why) => report.fail(CANARY_CLEANUP, why),
    }
}
