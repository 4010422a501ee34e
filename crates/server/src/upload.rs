//! Store path uploads, shared by the Attic API and plain Nix PUTs: the NAR
//! grammar checked while it streams, and the uploader's claims about a path
//! checked before they become a Nix object.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::BoxError;
use bytes::Bytes;
use futures::Stream;
use garret_meta::{BlobId, NixObject};
use garret_nix::nar::{Decoder, NarError};
use garret_nix::narinfo::{ContentAddress, NarInfo};
use garret_nix::{Sha256Hash, StorePath, StorePathHash};

/// Why an upload body was refused while it streamed. The store reports it as
/// an input error, so the HTTP layer can answer 4xx (the client's fault).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("invalid NAR: {0}")]
    InvalidNar(#[from] NarError),
    #[error("reading the request body: {0}")]
    Read(BoxError),
    #[error("invalid compressed data: {0}")]
    Decompress(std::io::Error),
    #[error("the client sent nothing for {} s", .0.as_secs())]
    Idle(std::time::Duration),
    #[error("the request took longer than {} s", .0.as_secs())]
    Timeout(std::time::Duration),
    #[error("the body is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// Small bodies other clients are sending fill the server's memory
    /// budget for them; retrying later succeeds.
    #[error("the server is receiving too many request bodies at once; retry later")]
    Busy,
    #[error(
        "the compressed data needs more than {limit} bytes of memory to decode \
         (limits.max_decompression_memory); compress with a smaller dictionary or window"
    )]
    DecoderMemory { limit: u64 },
    #[error(
        "the upload decompresses to more than {ratio} times its compressed size beyond \
         its first {floor} bytes (limits.max_decompression_ratio, \
         limits.decompression_ratio_floor)"
    )]
    Expansion { ratio: u64, floor: u64 },
    #[error("the uploaded file does not match its name: expected {expected}, got {actual}")]
    FileHashMismatch {
        expected: Sha256Hash,
        actual: Sha256Hash,
    },
}

/// Passes a NAR stream through unchanged while validating its grammar, so a
/// malformed NAR fails the upload before anything is committed. The hash is
/// left to the store, which computes it anyway.
#[derive(Debug)]
pub struct NarCheck<S> {
    inner: S,
    decoder: Option<Decoder>,
}

impl<S> NarCheck<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            decoder: Some(Decoder::new()),
        }
    }
}

impl From<std::io::Error> for BodyError {
    fn from(err: std::io::Error) -> Self {
        Self::Read(err.into())
    }
}

impl<S, E> Stream for NarCheck<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<BodyError>,
{
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.decoder.is_none() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(bytes))) => {
                let decoder = self.decoder.as_mut().expect("checked above");
                match decoder.feed(&bytes, &mut ()) {
                    Ok(()) => Poll::Ready(Some(Ok(bytes))),
                    Err(e) => {
                        self.decoder = None;
                        Poll::Ready(Some(Err(e.into())))
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => {
                self.decoder = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                let decoder = self.decoder.take().expect("checked above");
                match decoder.finish() {
                    Ok(()) => Poll::Ready(None),
                    Err(e) => Poll::Ready(Some(Err(e.into()))),
                }
            }
        }
    }
}

/// What an uploader claims about a store path, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub store_path: StorePath,
    pub nar_hash: Sha256Hash,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<ContentAddress>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid path info: {0}")]
pub struct PathInfoError(String);

/// A path's info in Attic's shape: the NarInfo JSON its client uploads,
/// and the columns of its database's `object` and `nar` rows that
/// `garret import attic` copies. Unchecked text until [`Self::path_info`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct AtticPathInfo {
    pub store_path_hash: String,
    /// The full store path.
    pub store_path: String,
    /// Base names of the referenced store paths.
    #[serde(default)]
    pub references: Vec<String>,
    pub system: Option<String>,
    /// The deriver's base name.
    pub deriver: Option<String>,
    #[serde(default)]
    pub sigs: Vec<String>,
    pub ca: Option<String>,
    /// `sha256:<hex>` or `sha256:<nix32>`.
    pub nar_hash: String,
    pub nar_size: u64,
}

impl AtticPathInfo {
    /// Parses and checks every field (see [`PathInfo::validate`]).
    pub fn path_info(&self, store_dir: &str) -> Result<PathInfo, PathInfoError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| PathInfoError(format!("{what}: {e}"));
        let store_path = StorePath::from_absolute_path_in(&self.store_path, store_dir)
            .map_err(|e| bad("invalid store_path", &e))?;
        let hash: StorePathHash = self
            .store_path_hash
            .parse()
            .map_err(|e| bad("invalid store_path_hash", &e))?;
        if &hash != store_path.hash() {
            return Err(PathInfoError(format!(
                "store_path_hash {hash} is not the hash of {}",
                self.store_path
            )));
        }
        let references = self
            .references
            .iter()
            .map(|r| StorePath::from_base_name(r))
            .collect::<Result<_, _>>()
            .map_err(|e| bad("invalid reference", &e))?;
        let deriver = self
            .deriver
            .as_deref()
            .map(StorePath::from_base_name)
            .transpose()
            .map_err(|e| bad("invalid deriver", &e))?;
        let ca = self
            .ca
            .as_deref()
            .map(str::parse::<ContentAddress>)
            .transpose()
            .map_err(|e| bad("invalid ca", &e))?;
        let info = PathInfo {
            store_path,
            nar_hash: Sha256Hash::parse_prefixed(&self.nar_hash)
                .map_err(|e| bad("invalid nar_hash", &e))?,
            nar_size: self.nar_size,
            references,
            deriver,
            system: self.system.clone(),
            sigs: self.sigs.clone(),
            ca,
        };
        info.validate(store_dir)?;
        Ok(info)
    }
}

impl PathInfo {
    /// Checks that the narinfo this becomes can be rendered and parsed back,
    /// so a line break smuggled into a field can never reach a client.
    pub fn validate(&self, store_dir: &str) -> Result<(), PathInfoError> {
        if self.nar_size == 0 {
            return Err(PathInfoError("a NAR is never empty (NarSize 0)".into()));
        }
        if self.sigs.iter().any(|s| s.contains(char::is_whitespace)) {
            return Err(PathInfoError("a signature contains white space".into()));
        }
        let info = NarInfo {
            store_path: self.store_path.clone(),
            url: "nar/x.nar".into(),
            compression: "zstd".into(),
            file_hash: None,
            file_size: None,
            nar_hash: self.nar_hash,
            nar_size: self.nar_size,
            references: self.references.clone(),
            deriver: self.deriver.clone(),
            system: self.system.clone(),
            signatures: self.sigs.clone(),
            ca: self.ca.clone(),
        };
        info.validate().map_err(|e| PathInfoError(e.to_string()))?;
        NarInfo::parse(&info.render(store_dir), store_dir)
            .map_err(|e| PathInfoError(e.to_string()))?;
        Ok(())
    }

    /// The Nix object this path becomes once its NAR is stored as `blob`.
    pub fn into_object(self, blob: BlobId) -> NixObject {
        NixObject {
            store_path_hash: self.store_path.hash().to_string(),
            store_path: self.store_path.to_string(),
            blob_id: blob,
            nar_hash: *self.nar_hash.as_bytes(),
            nar_size: self.nar_size,
            references: self.references.iter().map(ToString::to_string).collect(),
            deriver: self.deriver.as_ref().map(ToString::to_string),
            sigs: self.sigs,
            ca: self.ca.map(|ca| ca.as_str().to_owned()),
            system: self.system,
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::{StreamExt as _, stream};

    use super::*;

    fn nar_of(dir: &std::path::Path) -> Vec<u8> {
        let mut nar = Vec::new();
        garret_nix::nar::dump_path(dir, &mut nar).unwrap();
        nar
    }

    async fn check(parts: Vec<Vec<u8>>) -> Result<Vec<u8>, BodyError> {
        let input = stream::iter(
            parts
                .into_iter()
                .map(|p| Ok::<_, std::io::Error>(Bytes::from(p))),
        );
        let mut out = Vec::new();
        let mut checked = NarCheck::new(input);
        while let Some(part) = checked.next().await {
            out.extend_from_slice(&part?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn passes_a_valid_nar_through_in_any_split() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"hello").unwrap();
        let nar = nar_of(&dir.path().join("f"));
        for cut in [0, 1, 13, nar.len() / 2, nar.len()] {
            let parts = vec![nar[..cut].to_vec(), nar[cut..].to_vec()];
            assert_eq!(check(parts).await.unwrap(), nar);
        }
    }

    #[tokio::test]
    async fn refuses_garbage_and_truncation() {
        assert!(matches!(
            check(vec![b"not a nar at all, clearly".to_vec()]).await,
            Err(BodyError::InvalidNar(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"hello").unwrap();
        let nar = nar_of(&dir.path().join("f"));
        assert!(matches!(
            check(vec![nar[..nar.len() - 8].to_vec()]).await,
            Err(BodyError::InvalidNar(_))
        ));
    }

    #[tokio::test]
    async fn passes_read_errors_on() {
        let input = stream::iter([Err::<Bytes, _>(std::io::Error::other("reset"))]);
        let mut checked = NarCheck::new(input);
        assert!(matches!(
            checked.next().await,
            Some(Err(BodyError::Read(_)))
        ));
        assert!(checked.next().await.is_none());
    }
}
