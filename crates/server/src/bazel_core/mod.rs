//! The Bazel remote cache both front ends serve: Bazel's HTTP cache
//! (`http::bazel`) and REAPI over gRPC (`reapi`) call this one core for the
//! cache lookup and authorization, digest rules, blob lookups, bounded
//! reads, the CAS write path and the action cache's completeness rules, so
//! the two cannot drift apart.

mod action_results;
pub mod digest;

use std::collections::HashSet;
use std::convert::Infallible;

use bytes::{Bytes, BytesMut};
use futures::TryStreamExt as _;
use garret_meta::{Blob, Cache, Meta};

use crate::access_times::AccessTimes;
use crate::auth::{CacheName, ReapiAccess, TokenAuthority};
use crate::blobs::{BlobError, Blobs, Expect, StoredBlob};
use crate::clock::unix_now;
use crate::error::Error;
use crate::metrics::{Lookup, Metrics};
use crate::state::authorized_cache;
pub use action_results::{MAX_ACTION_RESULT, Update};
use digest::Digest;

/// The largest gRPC message garret decodes, and the size of the standard
/// gRPC default (4 MiB) so that replies it builds also fit every client's
/// default inbound limit. Protobuf messages kept in the CAS (Directory,
/// Tree) are read whole only up to this size.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// The core: the stores, the token authority and the cache Bazel's
/// requests without an instance name use.
#[derive(Debug)]
pub struct Core {
    meta: Meta,
    blobs: Blobs,
    /// Every blob lookup records a use of its CAS entry here.
    accesses: AccessTimes,
    tokens: TokenAuthority,
    default_cache: CacheName,
    /// Largest blob accepted (`max_cas_blob_size_bytes`).
    max_blob_size: u64,
    /// Counts CAS and action-cache hits and misses.
    metrics: Metrics,
}

impl Core {
    pub fn new(
        meta: Meta,
        blobs: Blobs,
        accesses: AccessTimes,
        tokens: TokenAuthority,
        default_cache: CacheName,
        max_blob_size: u64,
        metrics: Metrics,
    ) -> Self {
        Self {
            meta,
            blobs,
            accesses,
            tokens,
            default_cache,
            max_blob_size,
            metrics,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Largest blob accepted (`max_cas_blob_size_bytes`).
    pub fn max_blob_size(&self) -> u64 {
        self.max_blob_size
    }

    /// The cache behind `instance` (`""`: the default cache), if the
    /// request's `Authorization` value allows `access` to it.
    pub(crate) async fn cache(
        &self,
        authorization: Option<&[u8]>,
        instance: &str,
        access: ReapiAccess,
    ) -> Result<Cache, Error> {
        let name = if instance.is_empty() {
            self.default_cache.clone()
        } else {
            CacheName::new(instance)?
        };
        let token = self.tokens.authenticate(authorization)?;
        Ok(
            authorized_cache(&self.meta, token.as_ref(), &name, access.required())
                .await?
                .0,
        )
    }

    /// The blob `digest` names in `cache`, or NOT_FOUND. A stored blob of
    /// another size is a different digest, hence also NOT_FOUND. Every
    /// caller reads the blob or tells the client it is there, so the entry
    /// counts as used.
    pub(crate) async fn blob(&self, cache: &Cache, digest: Digest) -> Result<Blob, Error> {
        match self.meta.cas_blob(cache.id, digest.hash_bytes()).await? {
            Some(blob) if blob.size == digest.size => {
                self.accesses.cas_read(cache.id, &[blob.hash]);
                Ok(blob)
            }
            _ => Err(Error::NotFound(format!("blob {digest} is not in the CAS"))),
        }
    }

    /// [`Core::blob`] for a client reading it: counted as a CAS hit or miss.
    pub(crate) async fn blob_to_read(&self, cache: &Cache, digest: Digest) -> Result<Blob, Error> {
        let found = self.blob(cache, digest).await;
        self.metrics.lookup_result(Lookup::Cas, &found);
        found
    }

    /// A whole blob in memory, for protobuf messages kept in the CAS
    /// (Directory, Tree) and for inlined outputs. A digest over `limit`
    /// bytes is refused before anything is looked up or read: a client
    /// that names a huge blob as a message costs nothing.
    pub(crate) async fn read_bounded(
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
    pub(crate) async fn read_blob(&self, blob: &Blob) -> Result<Bytes, Error> {
        let stream = self.blobs.read(blob.id, 0..blob.size).await?;
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
    pub(crate) async fn store_bytes(
        &self,
        cache: &Cache,
        digest: Digest,
        data: Bytes,
    ) -> Result<(), Error> {
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

    /// Stores several small blobs in `cache`'s CAS with one pack barrier and
    /// one metadata transaction for the blobs and one for their entries (see
    /// [`Blobs::put_batch`]). Each entry gets its own result.
    pub(crate) async fn store_batch(
        &self,
        cache: &Cache,
        entries: Vec<(Digest, Bytes)>,
    ) -> Result<Vec<Result<(), Error>>, Error> {
        let expected = entries
            .into_iter()
            .map(|(digest, data)| (data, expect(digest)))
            .collect();
        let stored = self.blobs.put_batch(expected).await?;
        let ids: Vec<_> = stored.iter().flatten().map(|b| b.id).collect();
        self.meta
            .put_cas_entries(cache.id, &ids, unix_now())
            .await?;
        Ok(stored
            .into_iter()
            .map(|one| one.map(drop).map_err(Error::from))
            .collect())
    }

    /// Stores `input` as `digest` in `cache`'s CAS: verified against the
    /// digest while it streams, visible only once it matches.
    pub(crate) async fn store_stream<S, E>(
        &self,
        cache: &Cache,
        digest: Digest,
        input: S,
    ) -> Result<(), Error>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Send,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.put_cas(cache, expect(digest), input).await.map(drop)
    }

    /// The CAS write path of both front ends: stores `input` in `cache`'s
    /// CAS if it matches `expect`, checked while it streams; nothing is
    /// visible unless it matches.
    pub(crate) async fn put_cas<S, E>(
        &self,
        cache: &Cache,
        expect: Expect,
        input: S,
    ) -> Result<StoredBlob, Error>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Send,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let blob = self.blobs.put(input, expect).await?;
        self.meta
            .put_cas_entry(cache.id, blob.id, unix_now())
            .await?;
        Ok(blob)
    }

    /// [`Core::store_stream`] of an upload that continues `prefix` (stored
    /// by an earlier attempt) and records its progress through
    /// `checkpoint`. The error stays a [`BlobError`], so the caller can
    /// tell a broken input (which the client resumes) from a refusal.
    pub(crate) async fn store_resumable<S>(
        &self,
        cache: &Cache,
        digest: Digest,
        prefix: Vec<garret_store::ChunkRef>,
        input: S,
        checkpoint: &impl garret_store::Checkpoint,
    ) -> Result<(), BlobError>
    where
        S: futures::Stream<Item = Result<Bytes, Error>> + Send,
    {
        let blob = self
            .blobs
            .put_after(prefix, input, expect(digest), checkpoint)
            .await?;
        self.meta
            .put_cas_entry(cache.id, blob.id, unix_now())
            .await?;
        Ok(())
    }

    /// Refuses digests over the advertised `max_cas_blob_size_bytes`.
    pub(crate) fn check_size(&self, digest: Digest) -> Result<(), Error> {
        if digest.size > self.max_blob_size {
            return Err(Error::PayloadTooLarge(format!(
                "blob {digest} is larger than this server's limit of {} bytes",
                self.max_blob_size
            )));
        }
        Ok(())
    }

    /// Which of `digests` `cache` lacks, in request order without repeats;
    /// the others are recorded as used, as REAPI asks of FindMissingBlobs.
    pub(crate) async fn find_missing(
        &self,
        cache: &Cache,
        digests: &[Digest],
    ) -> Result<Vec<Digest>, Error> {
        let (missing, found) = self.lookup(cache, digests).await?;
        self.accesses.cas_read(cache.id, &found);
        Ok(missing)
    }

    /// Which of `digests` `cache` lacks, in request order without repeats,
    /// and the content hashes of the others; records nothing.
    async fn lookup(
        &self,
        cache: &Cache,
        digests: &[Digest],
    ) -> Result<(Vec<Digest>, Vec<[u8; 32]>), Error> {
        let asked: Vec<([u8; 32], u64)> = digests
            .iter()
            .filter(|d| !d.is_empty())
            .map(|d| (*d.hash_bytes(), d.size))
            .collect();
        let missing: HashSet<([u8; 32], u64)> = self
            .meta
            .find_missing_cas(cache.id, &asked)
            .await?
            .into_iter()
            .collect();
        let found: Vec<[u8; 32]> = asked
            .into_iter()
            .filter(|d| !missing.contains(d))
            .map(|(hash, _)| hash)
            .collect();
        let mut seen = HashSet::new();
        let missing = digests
            .iter()
            .filter(|d| missing.contains(&(*d.hash_bytes(), d.size)) && seen.insert(**d))
            .copied()
            .collect();
        Ok((missing, found))
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
