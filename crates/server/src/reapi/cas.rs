//! ContentAddressableStorage: existence checks, small-blob batches, tree
//! walks, and split/splice over the store's own chunks.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use axum::BoxError;
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

use super::{MAX_BATCH_TOTAL_BYTES, Reapi};
use crate::auth::ReapiAccess;
use crate::bazel_core::digest::Digest;
use crate::clock::unix_now;
use crate::error::Error;
use crate::metrics::Lookup;

#[derive(Debug)]
pub(crate) struct CasService(pub(crate) Arc<Reapi>);

/// Batch entries stored or read at once. Entries with the same content may
/// run together: a failed one cleans up only chunks no live upload writes
/// (see `Blobs::put`).
const BATCH_CONCURRENCY: usize = 8;

/// Directories per GetTree page when the client names no page size.
const DEFAULT_TREE_PAGE: usize = 1000;

/// The most distinct directories one GetTree visits (and keeps digests of):
/// the walk's work and memory are bounded whatever the tree.
const MAX_TREE_DIRECTORIES: usize = 100_000;

/// The most directory bytes one GetTree reads.
const MAX_TREE_BYTES: u64 = 256 << 20;

/// The largest Directory GetTree reads: a page holding only it still fits
/// a reply.
const MAX_DIRECTORY_BYTES: usize = MAX_BATCH_TOTAL_BYTES;

/// The most chunks SplitBlob lists: their digests (about 80 bytes each on
/// the wire) must fit one reply.
const MAX_SPLIT_CHUNKS: u64 = (MAX_BATCH_TOTAL_BYTES / 80) as u64;

/// The largest zstd window (2^23 = 8 MiB, what `zstd -19` declares) a
/// BatchUpdateBlobs entry may ask for: batch blobs are smaller than that, and
/// the window is memory the decoder allocates on the frame's word.
const MAX_ZSTD_WINDOW_LOG: u32 = 23;

fn ok_status() -> garret_proto::rpc::Status {
    garret_proto::rpc::Status::default()
}

impl CasService {
    async fn inner_find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<FindMissingBlobsResponse, Error> {
        let reapi = &self.0;
        let cache = reapi.cache_for(&request, ReapiAccess::Read).await?;
        let digests = request
            .get_ref()
            .blob_digests
            .iter()
            .map(Digest::from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        let missing = reapi.find_missing(&cache, &digests).await?;
        let asked: HashSet<&Digest> = digests.iter().collect();
        reapi.metrics().lookups(
            Lookup::CasFindMissing,
            (asked.len() - missing.len()) as u64,
            missing.len() as u64,
        );
        Ok(FindMissingBlobsResponse {
            missing_blob_digests: missing.into_iter().map(Digest::to_proto).collect(),
        })
    }

    async fn inner_batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<BatchUpdateBlobsResponse, Error> {
        let reapi = &self.0;
        let cache = reapi.cache_for(&request, ReapiAccess::Write).await?;
        let requests = request.into_inner().requests;
        // Both what is sent and what the digests claim (compressed entries
        // decompress to their digest's size) must fit the batch limit, so
        // no entry makes the server hold or produce more than that.
        let sent = checked_total(requests.iter().map(|r| r.data.len() as u64));
        let claimed = checked_total(
            requests
                .iter()
                .filter_map(|r| Digest::from_required(r.digest.as_ref()).ok())
                .map(|d| d.size),
        );
        for (what, total) in [("carries", sent), ("claims", claimed)] {
            if total.is_none_or(|t| t > MAX_BATCH_TOTAL_BYTES as u64) {
                return Err(Error::InvalidArgument(format!(
                    "batch {what} {} bytes, over max_batch_total_size_bytes \
                     ({MAX_BATCH_TOTAL_BYTES}); use ByteStream for large blobs",
                    total.map_or_else(|| "more than 2^64".into(), |t| t.to_string())
                )));
            }
        }
        // Each entry is checked and decoded on its own; the valid ones are
        // then stored together, with one durability barrier and one commit.
        // Owned pieces: a future borrowing the request would not be `Send`
        // for every lifetime, which tonic needs.
        let pieces: Vec<_> = requests
            .iter()
            .map(|r| (r.digest.clone(), r.compressor, r.data.clone()))
            .collect();
        let prepared: Vec<Result<(Digest, Bytes), Error>> = stream::iter(pieces)
            .map(|(digest, compressor, data)| prepare_update(reapi, digest, compressor, data))
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await;
        let to_store: Vec<(Digest, Bytes)> = prepared
            .iter()
            .flatten()
            .filter(|(digest, _)| !digest.is_empty())
            .cloned()
            .collect();
        let mut stored = reapi.store_batch(&cache, to_store).await?.into_iter();
        let responses = requests
            .into_iter()
            .zip(prepared)
            .map(|(entry, prepared)| {
                let result = prepared.and_then(|(digest, _)| {
                    if digest.is_empty() {
                        Ok(())
                    } else {
                        stored.next().expect("one result per stored entry")
                    }
                });
                batch_update_blobs_response::Response {
                    status: Some(result.map_or_else(|e| e.to_rpc_status(), |()| ok_status())),
                    digest: entry.digest,
                }
            })
            .collect();
        Ok(BatchUpdateBlobsResponse { responses })
    }

    async fn inner_batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<BatchReadBlobsResponse, Error> {
        let reapi = &self.0;
        let cache = reapi.cache_for(&request, ReapiAccess::Read).await?;
        let request = request.into_inner();
        let zstd = request
            .acceptable_compressors
            .contains(&(Compressor::Zstd as i32));
        // Invalid digests (negative sizes among them) fail on their own
        // entry; the valid ones must add up to at most the batch limit,
        // without wrapping.
        let total = checked_total(
            request
                .digests
                .iter()
                .filter_map(|d| Digest::from_proto(d).ok())
                .map(|d| d.size),
        );
        if total.is_none_or(|t| t > MAX_BATCH_TOTAL_BYTES as u64) {
            return Err(Error::InvalidArgument(format!(
                "batch asks for {} bytes, over max_batch_total_size_bytes \
                 ({MAX_BATCH_TOTAL_BYTES}); use ByteStream for large blobs",
                total.map_or_else(|| "more than 2^64".into(), |t| t.to_string())
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
    /// into pages that are produced as the walk goes (see [`TreePages`]).
    /// The root is read before the stream starts, so a missing root is a
    /// plain NOT_FOUND status.
    async fn inner_get_tree(&self, request: Request<GetTreeRequest>) -> Result<TreePages, Error> {
        let reapi = &self.0;
        let cache = reapi.cache_for(&request, ReapiAccess::Read).await?;
        let request = request.into_inner();
        let root = Digest::from_required(request.root_digest.as_ref())?;
        let skip: usize = if request.page_token.is_empty() {
            0
        } else {
            request.page_token.parse().map_err(|_| {
                Error::InvalidArgument(format!("page token {:?} is not ours", request.page_token))
            })?
        };
        let page_size = usize::try_from(request.page_size)
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_TREE_PAGE);
        let mut walk = TreeWalk {
            reapi: Arc::clone(reapi),
            cache,
            root,
            queue: VecDeque::from([root]),
            seen: HashSet::from([root]),
            bytes: 0,
            found: 0,
        };
        let first = walk.next().await?;
        Ok(TreePages {
            walk,
            skip,
            page_size,
            pending: first,
            done: false,
        })
    }

    /// The store's own chunks, each made readable as a CAS blob of this
    /// instance. No data moves: a chunk already is a stored zstd frame, so
    /// a single-chunk blob over it is committed from metadata alone.
    ///
    /// Permissions: a client reads the chunks SplitBlob names through
    /// BatchReadBlobs or ByteStream, and those (like FindMissingBlobs and
    /// SpliceBlob) find blobs through the instance's CAS entries; the chunk
    /// index alone cannot say whether this instance may read a chunk. So a
    /// chunk becomes readable only by writing its blob and CAS rows, and
    /// writing needs the Write (push) permission. With Read alone, the split
    /// is returned only if every chunk is readable already, and nothing is
    /// written; otherwise the request is refused as a write would be
    /// (PERMISSION_DENIED, or UNAUTHENTICATED for an anonymous client of a
    /// private cache).
    async fn inner_split_blob(
        &self,
        request: Request<SplitBlobRequest>,
    ) -> Result<SplitBlobResponse, Error> {
        let reapi = &self.0;
        let metadata = request.metadata().clone();
        let instance = request.get_ref().instance_name.clone();
        let cache = reapi.cache(&metadata, &instance, ReapiAccess::Read).await?;
        let request = request.into_inner();
        check_chunking_function(request.chunking_function)?;
        let digest = Digest::from_required(request.blob_digest.as_ref())?;
        let mut chunk_digests = Vec::new();
        if !digest.is_empty() {
            let blob = reapi.blob(&cache, digest).await?;
            if blob.chunk_count > MAX_SPLIT_CHUNKS {
                return Err(Error::ResourceExhausted(format!(
                    "blob {digest} has {} chunks, more than one reply lists ({MAX_SPLIT_CHUNKS})",
                    blob.chunk_count
                )));
            }
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
            if !missing.is_empty() {
                reapi
                    .cache(&metadata, &instance, ReapiAccess::Write)
                    .await?;
            }
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
                            pack: None,
                        }],
                        packs: Vec::new(),
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
    ) -> Result<SpliceBlobResponse, Error> {
        let reapi = &self.0;
        let cache = reapi.cache_for(&request, ReapiAccess::Write).await?;
        let request = request.into_inner();
        check_chunking_function(request.chunking_function)?;
        let digest = Digest::from_required(request.blob_digest.as_ref())?;
        reapi.check_size(digest)?;
        let chunks = request
            .chunk_digests
            .iter()
            .map(Digest::from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        let total = checked_total(chunks.iter().map(|c| c.size));
        if total != Some(digest.size) {
            return Err(Error::InvalidArgument(format!(
                "the chunks add up to {} bytes, not the blob's {}",
                total.map_or_else(|| "more than 2^64".into(), |t| t.to_string()),
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
                reapi
                    .blob(&cache, *chunk)
                    .await
                    .map_err(|_| Error::NotFound(format!("chunk {chunk} is not in the CAS")))?,
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

fn check_chunking_function(value: i32) -> Result<(), Error> {
    if value == ChunkingFunction::Unknown as i32 || value == ChunkingFunction::FastCdc2020 as i32 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "chunking function {value} is not supported (only FastCDC 2020)"
        )))
    }
}

/// One BatchUpdateBlobs entry.
/// Checks one BatchUpdateBlobs entry and decodes its data: what the batch
/// then stores. The empty digest needs no storing, only empty data.
async fn prepare_update(
    reapi: &Reapi,
    digest: Option<garret_proto::reapi::Digest>,
    compressor: i32,
    data: Bytes,
) -> Result<(Digest, Bytes), Error> {
    let digest = Digest::from_required(digest.as_ref())?;
    reapi.check_size(digest)?;
    let data = if compressor == Compressor::Identity as i32 {
        data
    } else if compressor == Compressor::Zstd as i32 {
        decompress(data, digest.size).await?
    } else {
        return Err(Error::InvalidArgument(format!(
            "compressor {compressor} is not supported (identity or zstd)"
        )));
    };
    if digest.is_empty() && !data.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{} bytes were sent for the empty digest",
            data.len()
        )));
    }
    Ok((digest, data))
}

/// The sum of client-given sizes, or `None` if it does not fit a `u64`:
/// a wrapped total must never pass a limit check.
fn checked_total(sizes: impl IntoIterator<Item = u64>) -> Option<u64> {
    sizes.into_iter().try_fold(0u64, u64::checked_add)
}

/// Decompresses a zstd payload that must hold exactly `size` bytes, on the
/// blocking pool. The caller has bounded `size` by the batch limit.
async fn decompress(data: Bytes, size: u64) -> Result<Bytes, Error> {
    tokio::task::spawn_blocking(move || decompress_exact(&data, size))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map(Bytes::from)
}

/// Streams `data` through a zstd decoder, keeping at most `size + 1` bytes
/// of output: memory grows with what the payload really holds, never with
/// what the client claims, and a payload holding more than `size` stops
/// there (a zstd bomb costs at most one byte past the digest's size).
fn decompress_exact(data: &[u8], size: u64) -> Result<Vec<u8>, Error> {
    use std::io::Read as _;
    let unusable =
        |e: std::io::Error| Error::InvalidArgument(format!("zstd payload is unusable: {e}"));
    let mut decoder = zstd::stream::read::Decoder::with_buffer(data).map_err(unusable)?;
    decoder
        .window_log_max(MAX_ZSTD_WINDOW_LOG)
        .map_err(unusable)?;
    let mut out = Vec::new();
    decoder
        .take(size.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(unusable)?;
    if out.len() as u64 != size {
        return Err(Error::InvalidArgument(format!(
            "zstd payload decompresses to {} bytes, not the digest's {size}",
            if out.len() as u64 > size {
                format!("more than {size}")
            } else {
                out.len().to_string()
            }
        )));
    }
    Ok(out)
}

/// One BatchReadBlobs entry, as stored frames when the client takes zstd.
async fn read_one(
    reapi: &Reapi,
    cache: &Cache,
    digest: Digest,
    zstd: bool,
) -> Result<(Bytes, Compressor), Error> {
    if digest.is_empty() {
        return Ok((Bytes::new(), Compressor::Identity));
    }
    let blob = reapi.blob_to_read(cache, digest).await?;
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

/// A GetTree walk: the directories of a tree, root first, breadth first,
/// each once. A missing subdirectory is left out (REAPI returns what
/// exists); only a missing root is NOT_FOUND. The walk stops with
/// RESOURCE_EXHAUSTED past [`MAX_TREE_DIRECTORIES`] distinct directories or
/// [`MAX_TREE_BYTES`] of them, and refuses a directory larger than
/// [`MAX_DIRECTORY_BYTES`] unread.
struct TreeWalk {
    reapi: Arc<Reapi>,
    cache: Cache,
    root: Digest,
    queue: VecDeque<Digest>,
    seen: HashSet<Digest>,
    /// Directory bytes taken from the budget so far.
    bytes: u64,
    /// Directories returned so far: the next one's position in the walk.
    found: usize,
}

impl TreeWalk {
    /// The next directory that exists, with its position in the walk.
    async fn next(&mut self) -> Result<Option<(usize, Directory)>, Error> {
        while let Some(digest) = self.queue.pop_front() {
            self.bytes = self.bytes.saturating_add(digest.size);
            if self.bytes > MAX_TREE_BYTES {
                return Err(Error::ResourceExhausted(format!(
                    "tree {} holds more than {MAX_TREE_BYTES} bytes of directories",
                    self.root
                )));
            }
            let bytes = match self
                .reapi
                .read_bounded(&self.cache, digest, MAX_DIRECTORY_BYTES)
                .await
            {
                Ok(bytes) => bytes,
                Err(Error::NotFound(m) | Error::IncompleteObject(m)) if digest != self.root => {
                    tracing::debug!(%digest, "GetTree: directory missing: {m}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let directory = Directory::decode(bytes)
                .map_err(|e| Error::InvalidArgument(format!("{digest} is not a Directory: {e}")))?;
            for child in &directory.directories {
                let child = Digest::from_required(child.digest.as_ref())?;
                if self.seen.insert(child) {
                    if self.seen.len() > MAX_TREE_DIRECTORIES {
                        return Err(Error::ResourceExhausted(format!(
                            "tree {} has more than {MAX_TREE_DIRECTORIES} directories",
                            self.root
                        )));
                    }
                    self.queue.push_back(child);
                }
            }
            let position = self.found;
            self.found += 1;
            return Ok(Some((position, directory)));
        }
        Ok(None)
    }
}

/// GetTree's pages, cut from a [`TreeWalk`] as it goes: a page holds at
/// most `page_size` directories and [`MAX_BATCH_TOTAL_BYTES`] of them, and
/// only one page (plus the directory that starts the next) is in memory.
///
/// The page token is the position in the walk of the next page's first
/// directory. The walk is deterministic, so a token stays valid; resuming
/// from one walks (reads, but does not send) what came before it. That
/// re-walk is the price of a token that is small and keeps no server state
/// (an encoded BFS frontier can be as large as the tree's widest level, and
/// the set of directories already seen, needed to skip repeats, as large
/// as the tree). It is bounded: every call, resumed or not, is capped by
/// the walk's limits. A client that reads the stream to its end, as
/// clients do, walks the tree once, linearly.
struct TreePages {
    walk: TreeWalk,
    /// Directories before this position were delivered already.
    skip: usize,
    page_size: usize,
    /// A directory found but not yet placed in a page.
    pending: Option<(usize, Directory)>,
    done: bool,
}

/// What a directory adds to an encoded page: tag, length and body.
fn page_entry_len(directory: &Directory) -> usize {
    let len = directory.encoded_len();
    1 + prost::length_delimiter_len(len) + len
}

impl TreePages {
    async fn next_page(&mut self) -> Result<Option<GetTreeResponse>, Error> {
        if self.done {
            return Ok(None);
        }
        let mut page = Vec::new();
        let mut page_bytes = 0;
        loop {
            let next = match self.pending.take() {
                Some(found) => Some(found),
                None => self.walk.next().await?,
            };
            let Some((position, directory)) = next else {
                self.done = true;
                return Ok(Some(GetTreeResponse {
                    directories: page,
                    next_page_token: String::new(),
                }));
            };
            if position < self.skip {
                continue;
            }
            let len = page_entry_len(&directory);
            if !page.is_empty()
                && (page.len() >= self.page_size || page_bytes + len > MAX_BATCH_TOTAL_BYTES)
            {
                self.pending = Some((position, directory));
                return Ok(Some(GetTreeResponse {
                    directories: page,
                    next_page_token: position.to_string(),
                }));
            }
            page_bytes += len;
            page.push(directory);
        }
    }

    fn into_stream(self) -> impl Stream<Item = Result<GetTreeResponse, Status>> + Send {
        stream::try_unfold(self, |mut pages| async move {
            let page = pages.next_page().await?;
            Ok::<_, Error>(page.map(|page| (page, pages)))
        })
        .map_err(Status::from)
    }
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
        Ok(Response::new(pages.into_stream().boxed()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_of_client_sizes_never_wrap() {
        assert_eq!(checked_total([1, 2, 3]), Some(6));
        assert_eq!(checked_total([u64::MAX, 1]), None);
        let half = 1u64 << 63;
        assert_eq!(checked_total([half, half]), None);
    }

    #[test]
    fn decompression_stops_at_the_digest_size() {
        let data = vec![7u8; 1 << 20];
        let frame = zstd::bulk::compress(&data, 3).unwrap();
        assert_eq!(decompress_exact(&frame, 1 << 20).unwrap(), data);
        // Claims less than the frame holds: refused, having produced at most
        // one byte past the claim.
        let err = decompress_exact(&frame, 1000).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("more than 1000")),
            "{err}"
        );
        // Claims more than it holds (a 10-byte entry claiming gigabytes).
        let err = decompress_exact(&frame, 60 << 30).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let err = decompress_exact(b"0123456789", 60 << 30).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }

    #[test]
    fn a_frame_asking_for_a_huge_window_is_refused() {
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        encoder.include_contentsize(false).unwrap();
        encoder.window_log(27).unwrap();
        std::io::Write::write_all(&mut encoder, b"hello").unwrap();
        let frame = encoder.finish().unwrap();
        let err = decompress_exact(&frame, 5).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }
}
