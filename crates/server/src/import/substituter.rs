//! A Nix binary cache read over HTTP, as `nix copy --from` reads one: a
//! store path's narinfo, then the (compressed) NAR file it names, streamed
//! and decompressed, never held whole.

use std::time::Duration;

use futures::TryStreamExt as _;
use garret_nix::StorePathHash;
use garret_nix::narinfo::NarInfo;
use reqwest::StatusCode;

use crate::config::Limits;
use crate::http::body::{BodyStream, Compression, DecodeLimits, nar_of_file};
use crate::upload::BodyError;

/// Connecting must succeed within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A narinfo is a few hundred bytes: the whole request gets this long.
const NARINFO_TIMEOUT: Duration = Duration::from_secs(30);
/// A NAR may take long, but the server must not go silent for longer.
const READ_TIMEOUT: Duration = Duration::from_mins(1);
/// Largest narinfo read (Attic's own preamble limit).
const MAX_NARINFO_SIZE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("GET {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: StatusCode },
    #[error("{url}: {reason}")]
    NarInfo { url: String, reason: String },
}

impl FetchError {
    /// Whether trying again may succeed: the network, or the server's own
    /// trouble (5xx, 429). A 404 or a malformed narinfo stays as it is.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Http { .. } => true,
            Self::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            Self::NarInfo { .. } => false,
        }
    }
}

/// A binary cache's root: caches are below it by name, as Attic serves
/// them (`<root>/<cache>/<hash>.narinfo`).
#[derive(Clone)]
pub struct Substituter {
    root: String,
    token: Option<String>,
    client: reqwest::Client,
    limits: DecodeLimits,
}

impl std::fmt::Debug for Substituter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Substituter")
            .field("root", &self.root)
            .field("token", &garret_meta::redact(self.token.as_ref()))
            .finish_non_exhaustive()
    }
}

impl Substituter {
    /// `root` must be an `http://` URL (the in-cluster Service of the
    /// deployment being adopted); `token` is sent as a Bearer token, for
    /// private caches. NARs are decompressed within `limits`' decoder
    /// bounds, as uploads are.
    pub fn new(root: &str, token: Option<String>, limits: &Limits) -> Result<Self, String> {
        if !root.starts_with("http://") {
            return Err(format!(
                "{root:?}: only http:// substituters are supported (reach the old server's \
                 Service directly)"
            ));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(Self {
            root: if root.ends_with('/') {
                root.to_owned()
            } else {
                format!("{root}/")
            },
            token,
            client,
            limits: DecodeLimits::new(limits),
        })
    }

    async fn get(
        &self,
        url: &str,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, FetchError> {
        let mut request = self.client.get(url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        let response = request.send().await.map_err(|source| FetchError::Http {
            url: url.to_owned(),
            source,
        })?;
        match response.status() {
            StatusCode::OK => Ok(response),
            status => Err(FetchError::Status {
                url: url.to_owned(),
                status,
            }),
        }
    }

    /// The narinfo of `hash` in `cache`, parsed for `store_dir`.
    pub async fn narinfo(
        &self,
        cache: &str,
        hash: &StorePathHash,
        store_dir: &str,
    ) -> Result<NarInfo, FetchError> {
        let url = format!("{}{cache}/{hash}.narinfo", self.root);
        let mut response = self.get(&url, Some(NARINFO_TIMEOUT)).await?;
        let invalid = |reason: String| FetchError::NarInfo {
            url: url.clone(),
            reason,
        };
        let mut text = Vec::new();
        while let Some(part) = response.chunk().await.map_err(|source| FetchError::Http {
            url: url.clone(),
            source,
        })? {
            if text.len() + part.len() > MAX_NARINFO_SIZE {
                return Err(invalid(format!("larger than {MAX_NARINFO_SIZE} bytes")));
            }
            text.extend_from_slice(&part);
        }
        let text = std::str::from_utf8(&text).map_err(|_| invalid("not UTF-8".into()))?;
        NarInfo::parse(text, store_dir).map_err(|e| invalid(e.to_string()))
    }

    /// The NAR `narinfo` names in `cache`, decompressed as its
    /// `Compression` says and checked against its `FileHash` if it has one.
    /// The caller checks NarHash and NarSize as the stream is stored.
    pub async fn nar(&self, cache: &str, narinfo: &NarInfo) -> Result<BodyStream, FetchError> {
        let url = format!("{}{cache}/{}", self.root, narinfo.url);
        let compression =
            Compression::from_narinfo(&narinfo.compression).ok_or_else(|| FetchError::NarInfo {
                url: url.clone(),
                reason: format!(
                    "Compression {:?} is not one garret decodes (zstd, xz, none)",
                    narinfo.compression
                ),
            })?;
        let response = self.get(&url, None).await?;
        let file: BodyStream = Box::pin(
            response
                .bytes_stream()
                .map_err(|e| BodyError::Read(e.into())),
        );
        Ok(nar_of_file(
            file,
            narinfo.file_hash,
            compression,
            self.limits,
        ))
    }
}
