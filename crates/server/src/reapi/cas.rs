//! ContentAddressableStorage: existence checks, small-blob batches, tree
//! walks, and split/splice over the store's own chunks.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt as _, TryStreamExt as _, stream};
use garret_meta::{Cache, NewBlob, NewChunkRef};
use garret_proto::reapi::chunking_function::Value as ChunkingFunction;
use garret_proto::reapi::compressor::Value as Compressor;
use garret_proto::reapi::content_addressable_storage_server::ContentAddressableStorage;
use garret_proto::reapi::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, Directory, FindMissingBlobsRequest, FindMissingBlobsResponse,
    GetTreeRequest, GetTreeResponse, SpliceBlobRequest, SpliceBlobResponse, SplitBlobRequest,
    SplitBlobResponse, batch_read_blobs_response, batch_update_blobs_response,
};
use prost::Message as _;
use tonic::{Request, Response, Status};

use super::digest::Digest;
use super::{MAX_BATCH_TOTAL_BYTES, Reapi, ReapiError};
use crate::auth::ReapiAccess;
use crate::clock::unix_now;

#[derive(Debug)]
pub(crate) struct CasService(pub(crate) Arc<Reapi>);

/// Batch entries stored or read at once. Entries with the same content may
/// run together: a failed one cleans up only chunks no live upload writes
/// (see `Blobs::put`).
const BATCH_CONCURRENCY: usize = 8;

/// Directories per GetTree page when the client names no page size.
const DEFAULT_TREE_PAGE: usize = 1000;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn ok_status() -> garret_proto::rpc::Status {
    garret_proto::rpc::Status::default()
}

impl Reapi {
    /// Which of `digests` `cache` lacks, in request order without repeats;
    /// the others have their access time refreshed, as REAPI asks.
    pub(crate) async fn find_missing(
        &self,
        cache: &Cache,
        digests: &[Digest],
    ) -> Result<Vec<Digest>, ReapiError> {
        let asked: Vec<([u8; 32], u64)> = digests
            .iter()
            .filter(|d| !d.is_empty())
            .map(|d| (*d.hash_bytes(), d.size))
            .collect();
        let missing: HashSet<([u8; 32], u64)> = self
            .state
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
        if !found.is_empty() {
            self.state
                .meta
                .touch_cas(cache.id, &found, unix_now())
                .await?;
        }
        let mut seen = HashSet::new();
        Ok(digests
            .iter()
            .filter(|d| missing.contains(&(*d.hash_bytes(), d.size)) && seen.insert(**d))
            .copied()
            .collect())
    }
}

impl CasService {
    async fn inner_find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<FindMissingBlobsResponse, ReapiError> {
        let reapi = &self.0;
        let cache = reapi
            .cache(
                request.metadata(),
                &request.get_ref().instance_name,
                ReapiAccess::Read,
            )
            .await?;
        let digests = request
            .get_ref()
            .blob_digests
            .iter()
            .map(Digest::from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        let missing = reapi.find_missing(&cache, &digests).await?;
        Ok(FindMissingBlobsResponse {
            missing_blob_digests: missing.into_iter().map(Digest::to_proto).collect(),
        })
    }

    async fn inner_batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<BatchUpdateBlobsResponse, ReapiError> {
        let reapi = &self.0;
        let cache = reapi
            .cache(
                request.metadata(),
                &request.get_ref().instance_name,
                ReapiAccess::Write,
            )
            .await?;
        let requests = request.into_inner().requests;
        let total: usize = requests.iter().map(|r| r.data.len()).sum();
        if total > MAX_BATCH_TOTAL_BYTES {
            return Err(ReapiError::InvalidArgument(format!(
                "batch carries {total} bytes, over max_batch_total_size_bytes \
                 ({MAX_BATCH_TOTAL_BYTES}); use ByteStream for large blobs"
            )));
        }
        let cache = &cache;
        let responses = stream::iter(requests)
            .map(|entry| async move {
                let digest = Digest::from_required(entry.digest.as_ref());
                let result = match digest {
                    Ok(digest) => update_one(reapi, cache, digest, entry.compressor, entry.data)
                        .await
                        .map(|()| digest),
                    Err(e) => Err(e.into()),
                };
                batch_update_blobs_response::Response {
                    status: Some(
                        result
                            .as_ref()
                            .map_or_else(ReapiError::to_rpc_status, |_| ok_status()),
                    ),
                    digest: entry.digest,
                }
            })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await;
        Ok(BatchUpdateBlobsResponse { responses })
    }

    async fn inner_batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<BatchReadBlobsResponse, ReapiError> {
        let reapi = &self.0;
        let cache = reapi
            .cache(
                request.metadata(),
                &request.get_ref().instance_name,
                ReapiAccess::Read,
            )
            .await?;
        let request = request.into_inner();
        let zstd = request
            .acceptable_compressors
            .contains(&(Compressor::Zstd as i32));
        let total: u64 = request
            .digests
            .iter()
            .map(|d| u64::try_from(d.size_bytes).unwrap_or(0))
            .sum();
        if total > MAX_BATCH_TOTAL_BYTES as u64 {
            return Err(ReapiError::InvalidArgument(format!(
                "batch asks for {total} bytes, over max_batch_total_size_bytes \
                 ({MAX_BATCH_TOTAL_BYTES}); use ByteStream for large blobs"
            )));
        }
        let cache = &cache;
        let responses = stream::iter(request.digests)
            .map(|wire| async move {
                let result = match Digest::from_proto(&wire) {
                    Ok(digest) => read_one(reapi, cache, digest, zstd).await,
                    Err(e) => Err(e.into()),
                };
                let (data, compressor, status) = match result {
                    Ok((data, compressor)) => (data, compressor, ok_status()),
                    Err(e) => (Bytes::new(), Compressor::Identity, e.to_rpc_status()),
                };
                batch_read_blobs_response::Response {
                    digest: Some(wire),
                    data,
                    compressor: compressor as i32,
                    status: Some(status),
                }
            })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await;
        Ok(BatchReadBlobsResponse { responses })
    }

    /// Every directory below the root, breadth first without repeats, cut
    /// into pages. The page token is the number of directories already
    /// returned: the walk is deterministic, so a retry can skip ahead.
    async fn inner_get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<Vec<GetTreeResponse>, ReapiError> {
        let reapi = &self.0;
        let cache = reapi
            .cache(
                request.metadata(),
                &request.get_ref().instance_name,
                ReapiAccess::Read,
            )
            .await?;
        let request = request.into_inner();
        let root = Digest::from_required(request.root_digest.as_ref())?;
        let skip: usize = if request.page_token.is_empty() {
            0
        } else {
            request.page_token.parse().map_err(|_| {
                ReapiError::InvalidArgument(format!(
                    "page token {:?} is not ours",
                    request.page_token
                ))
            })?
        };
        let page_size = usize::try_from(request.page_size)
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_TREE_PAGE);

        let directories = walk_tree(reapi, &cache, root).await?;
        let mut pages = Vec::new();
        let mut page = Vec::new();
        let mut page_bytes = 0;
        for (index, directory) in directories.into_iter().enumerate().skip(skip) {
            let len = directory.encoded_len();
            if !page.is_empty()
                && (page.len() == page_size || page_bytes + len > MAX_BATCH_TOTAL_BYTES)
            {
                pages.push(GetTreeResponse {
                    directories: std::mem::take(&mut page),
                    next_page_token: index.to_string(),
                });
                page_bytes = 0;
            }
            page_bytes += len;
            page.push(directory);
        }
        pages.push(GetTreeResponse {
            directories: page,
            next_page_token: String::new(),
        });
        Ok(pages)
    }

    /// The store's own chunks, each made readable as a CAS blob of this
    /// instance. No data moves: a chunk already is a stored zstd frame, so
    /// a single-chunk blob over it is committed from metadata alone.
    async fn inner_split_blob(
        &self,
        request: Request<SplitBlobRequest>,
    ) -> Result<SplitBlobResponse, ReapiError> {
        let reapi = &self.0;
        let cache = reapi
            .cache(
                request.metadata(),
                &request.get_ref().instance_name,
                ReapiAccess::Read,
            )
            .await?;
        let request = request.into_inner();
        check_chunking_function(request.chunking_function)?;
        let digest = Digest::from_required(request.blob_digest.as_ref())?;
        let mut chunk_digests = Vec::new();
        if !digest.is_empty() {
            let blob = reapi.blob(&cache, digest).await?;
            let meta = &reapi.state.meta;
            let chunks = meta.blob_chunks(blob.id, None).await?;
            let digests: Vec<Digest> = chunks
                .iter()
                .map(|c| Digest {
                    hash: garret_nix::Sha256Hash::from_bytes(c.chunk.hash),
                    size: c.chunk.size,
                })
                .collect();
            let missing: HashSet<Digest> = reapi
                .find_missing(&cache, &digests)
                .await?
                .into_iter()
                .collect();
            let now = unix_now();
            let mut done = HashSet::new();
            for c in chunks.iter().filter(|c| {
                missing.contains(&Digest {
                    hash: garret_nix::Sha256Hash::from_bytes(c.chunk.hash),
                    size: c.chunk.size,
                })
            }) {
                if !done.insert(c.chunk.hash) {
                    continue;
                }
                let id = if let Some(existing) = meta.blob_by_hash(&c.chunk.hash).await? {
                    existing.id
                } else {
                    let single = NewBlob {
                        hash: c.chunk.hash,
                        size: c.chunk.size,
                        file_hash: c.chunk.frame_hash,
                        file_size: c.chunk.stored_size,
                        chunks: vec![NewChunkRef {
                            hash: c.chunk.hash,
                            size: c.chunk.size,
                            stored_size: c.chunk.stored_size,
                            frame_hash: c.chunk.frame_hash,
                            compression: c.chunk.compression,
                            offset: 0,
                            file_offset: 0,
                            uploaded: false,
                        }],
                    };
                    meta.commit_blob(&single, now).await?.blob_id
                };
                meta.put_cas_entry(cache.id, id, now).await?;
            }
            chunk_digests = digests.into_iter().map(Digest::to_proto).collect();
        }
        Ok(SplitBlobResponse {
            chunk_digests,
            chunking_function: ChunkingFunction::FastCdc2020 as i32,
        })
    }

    /// Concatenates stored chunks into a blob, verified against its digest.
    /// The store re-chunks the content as it would any upload; chunks the
    /// client cut with the advertised parameters are found again and not
    /// stored twice.
    async fn inner_splice_blob(
        &self,
        request: Request<SpliceBlobRequest>,
    ) -> Result<SpliceBlobResponse, ReapiError> {
        let reapi = &self.0;
        let cache = reapi
            .cache(
                request.metadata(),
                &request.get_ref().instance_name,
                ReapiAccess::Write,
            )
            .await?;
        let request = request.into_inner();
        check_chunking_function(request.chunking_function)?;
        let digest = Digest::from_required(request.blob_digest.as_ref())?;
        reapi.check_size(digest)?;
        let chunks = request
            .chunk_digests
            .iter()
            .map(Digest::from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        let total: u64 = chunks.iter().map(|c| c.size).sum();
        if total != digest.size {
            return Err(ReapiError::InvalidArgument(format!(
                "the chunks add up to {total} bytes, not the blob's {}",
                digest.size
            )));
        }
        let response = SpliceBlobResponse {
            blob_digest: Some(digest.to_proto()),
        };
        if digest.is_empty() || reapi.find_missing(&cache, &[digest]).await?.is_empty() {
            return Ok(response);
        }
        let mut blobs = Vec::with_capacity(chunks.len());
        for chunk in chunks.iter().filter(|c| !c.is_empty()) {
            blobs.push(
                reapi.blob(&cache, *chunk).await.map_err(|_| {
                    ReapiError::NotFound(format!("chunk {chunk} is not in the CAS"))
                })?,
            );
        }
        // A task owns the reads and hands pieces over, so the ingest's input
        // borrows nothing from this request.
        let store = reapi.state.blobs.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, BoxError>>(4);
        tokio::spawn(async move {
            for blob in blobs {
                let content = match store.read(blob.id, 0..blob.size).await {
                    Ok(content) => content,
                    Err(e) => {
                        let _ = tx.send(Err(Box::new(e))).await;
                        return;
                    }
                };
                let mut content = std::pin::pin!(content);
                while let Some(piece) = content.next().await {
                    let failed = piece.is_err();
                    let piece = piece.map_err(|e| -> BoxError { Box::new(e) });
                    if tx.send(piece).await.is_err() || failed {
                        return;
                    }
                }
            }
        });
        let input = stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        reapi.store_stream(&cache, digest, input).await?;
        Ok(response)
    }
}

fn check_chunking_function(value: i32) -> Result<(), ReapiError> {
    if value == ChunkingFunction::Unknown as i32 || value == ChunkingFunction::FastCdc2020 as i32 {
        Ok(())
    } else {
        Err(ReapiError::InvalidArgument(format!(
            "chunking function {value} is not supported (only FastCDC 2020)"
        )))
    }
}

/// One BatchUpdateBlobs entry.
async fn update_one(
    reapi: &Reapi,
    cache: &Cache,
    digest: Digest,
    compressor: i32,
    data: Bytes,
) -> Result<(), ReapiError> {
    reapi.check_size(digest)?;
    let data = if compressor == Compressor::Identity as i32 {
        data
    } else if compressor == Compressor::Zstd as i32 {
        decompress(data, digest.size).await?
    } else {
        return Err(ReapiError::InvalidArgument(format!(
            "compressor {compressor} is not supported (identity or zstd)"
        )));
    };
    reapi.store_bytes(cache, digest, data).await
}

/// Decompresses a zstd payload that must hold `size` bytes; a payload that
/// holds more fails instead of growing without bound.
async fn decompress(data: Bytes, size: u64) -> Result<Bytes, ReapiError> {
    let capacity = usize::try_from(size)
        .map_err(|_| ReapiError::InvalidArgument("blob too large for memory".into()))?;
    tokio::task::spawn_blocking(move || zstd::bulk::decompress(&data, capacity))
        .await
        .map_err(|e| ReapiError::Internal(e.to_string()))?
        .map(Bytes::from)
        .map_err(|e| {
            ReapiError::InvalidArgument(format!(
                "zstd payload does not decompress to the digest's size: {e}"
            ))
        })
}

/// One BatchReadBlobs entry, as stored frames when the client takes zstd.
async fn read_one(
    reapi: &Reapi,
    cache: &Cache,
    digest: Digest,
    zstd: bool,
) -> Result<(Bytes, Compressor), ReapiError> {
    if digest.is_empty() {
        return Ok((Bytes::new(), Compressor::Identity));
    }
    let blob = reapi.blob(cache, digest).await?;
    if zstd {
        let frames: Vec<Bytes> = reapi
            .state
            .blobs
            .read_frames(blob.id, 0..blob.file_size)
            .await?
            .try_collect()
            .await?;
        Ok((frames.concat().into(), Compressor::Zstd))
    } else {
        Ok((reapi.read_blob(&blob).await?, Compressor::Identity))
    }
}

/// The directories of a tree, root first, breadth first, each once. A
/// missing subdirectory is left out (REAPI returns what exists); only a
/// missing root is NOT_FOUND.
async fn walk_tree(
    reapi: &Reapi,
    cache: &Cache,
    root: Digest,
) -> Result<Vec<Directory>, ReapiError> {
    let mut queue = VecDeque::from([root]);
    let mut seen = HashSet::from([root]);
    let mut out = Vec::new();
    while let Some(digest) = queue.pop_front() {
        let bytes = match reapi.read_whole(cache, digest).await {
            Ok(bytes) => bytes,
            Err(ReapiError::NotFound(m)) if digest != root => {
                tracing::debug!(%digest, "GetTree: directory missing: {m}");
                continue;
            }
            Err(e) => return Err(e),
        };
        let directory = Directory::decode(bytes).map_err(|e| {
            ReapiError::InvalidArgument(format!("{digest} is not a Directory: {e}"))
        })?;
        for child in &directory.directories {
            let child = Digest::from_required(child.digest.as_ref())?;
            if seen.insert(child) {
                queue.push_back(child);
            }
        }
        out.push(directory);
    }
    Ok(out)
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        Ok(Response::new(self.inner_find_missing_blobs(request).await?))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        Ok(Response::new(self.inner_batch_update_blobs(request).await?))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        Ok(Response::new(self.inner_batch_read_blobs(request).await?))
    }

    type GetTreeStream = Pin<Box<dyn Stream<Item = Result<GetTreeResponse, Status>> + Send>>;

    async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let pages = self.inner_get_tree(request).await?;
        Ok(Response::new(
            stream::iter(pages.into_iter().map(Ok)).boxed(),
        ))
    }

    async fn split_blob(
        &self,
        request: Request<SplitBlobRequest>,
    ) -> Result<Response<SplitBlobResponse>, Status> {
        Ok(Response::new(self.inner_split_blob(request).await?))
    }

    async fn splice_blob(
        &self,
        request: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        Ok(Response::new(self.inner_splice_blob(request).await?))
    }
}
