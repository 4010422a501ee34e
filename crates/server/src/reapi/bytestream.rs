//! google.bytestream for CAS blobs: streaming reads (plain or as zstd
//! frames) and resumable, verified writes.
//!
//! # Writes
//! An upload's bytes stream straight into the chunk ingest: no spool, no
//! second write to disk. The blob becomes visible only when the client sets
//! `finish_write` and the data matches its digest, so an interrupted or
//! lying upload never shows. Uploads resume across replicas: durable
//! progress is recorded in the metadata database (see
//! [`super::upload_sessions`]), `QueryWriteStatus` on any replica reports
//! it, and a Write continues there on any replica.
//!
//! Every wait for the client's next message is bounded by the server's idle
//! timeout, and the whole Write by its request timeout. A client that
//! stalls gets DEADLINE_EXCEEDED (Bazel retries it, asking QueryWriteStatus
//! where to resume); what was cut into chunks by then is kept. Every
//! message costs O(1) bookkeeping whatever its size, and no minimum message
//! size is imposed (REAPI sets none).
//!
//! Compressed uploads restart at 0: REAPI defines their offsets in
//! compressed bytes, and a zstd decoder's state cannot be recorded and
//! restored elsewhere. QueryWriteStatus reports 0 for them, and a Write at
//! any other offset is refused with INVALID_ARGUMENT.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt as _, TryStreamExt as _, stream};
use garret_meta::{Blob, ChunkRange};
use garret_proto::bytestream::byte_stream_server::ByteStream;
use garret_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use tonic::{Request, Response, Status, Streaming};

use super::resource_name::{BlobCompression, BlobResource, UploadResource};
use super::{READ_CHUNK_BYTES, Reapi};
use crate::auth::ReapiAccess;
use crate::bazel_core::digest::Digest;
use crate::blobs::BlobError;
use crate::error::Error;
use garret_store::StoreError;

#[derive(Debug)]
pub(crate) struct ByteStreamService(pub(crate) Arc<Reapi>);

/// The largest zstd window (2^23 = 8 MiB, what `zstd -19` declares) a
/// compressed upload may ask the decoder for.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// zstd's worst case for incompressible data is a few bytes per 128 KiB
/// block; this bounds what a compressed upload of `size` bytes may send.
fn max_compressed_len(size: u64) -> u64 {
    size.saturating_add(size / 1024).saturating_add(1024)
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

/// `committed_size` of a finished upload: the final write offset, and -1
/// for a compressed blob that was already stored (REAPI's convention).
fn already_stored(compression: BlobCompression, digest: Digest) -> i64 {
    match compression {
        BlobCompression::Identity => i64::try_from(digest.size).unwrap_or(i64::MAX),
        BlobCompression::Zstd => -1,
    }
}

impl ByteStreamService {
    async fn inner_read(&self, request: Request<ReadRequest>) -> Result<ReadStream, Error> {
        let reapi = &self.0;
        let resource = BlobResource::parse_read(&request.get_ref().resource_name)?;
        let cache = reapi
            .cache(request.metadata(), resource.instance, ReapiAccess::Read)
            .await?;
        let ReadRequest {
            read_offset,
            read_limit,
            ..
        } = *request.get_ref();
        let digest = resource.digest;
        let offset = u64::try_from(read_offset)
            .ok()
            .filter(|&o| o <= digest.size)
            .ok_or_else(|| {
                Error::OutOfRange(format!(
                    "read_offset {read_offset} is outside blob {digest}"
                ))
            })?;
        let limit = u64::try_from(read_limit)
            .map_err(|_| Error::OutOfRange(format!("read_limit {read_limit} is negative")))?;
        match resource.compression {
            BlobCompression::Identity => {
                let end = if limit == 0 {
                    digest.size
                } else {
                    digest.size.min(offset.saturating_add(limit))
                };
                if offset == end {
                    if !digest.is_empty() {
                        reapi.blob_to_read(&cache, digest).await?;
                    }
                    return Ok(stream::empty().boxed());
                }
                let blob = reapi.blob_to_read(&cache, digest).await?;
                let content = reapi.state.blobs.read(blob.id, offset..end).await?;
                Ok(responses(content))
            }
            BlobCompression::Zstd => {
                if limit != 0 {
                    return Err(Error::InvalidArgument(
                        "read_limit must be 0 for compressed-blobs reads".into(),
                    ));
                }
                if offset == digest.size {
                    if !digest.is_empty() {
                        reapi.blob_to_read(&cache, digest).await?;
                    }
                    let frame = compress(Bytes::new()).await?;
                    return Ok(
                        stream::once(async move { Ok(ReadResponse { data: frame }) }).boxed(),
                    );
                }
                let blob = reapi.blob_to_read(&cache, digest).await?;
                self.compressed_read(&blob, offset).await
            }
        }
    }

    /// The blob from uncompressed `offset` as zstd frames: the stored frames
    /// unchanged, except that a read starting inside a chunk gets that
    /// chunk's tail compressed afresh.
    async fn compressed_read(&self, blob: &Blob, offset: u64) -> Result<ReadStream, Error> {
        let blobs = &self.0.state.blobs;
        if offset == 0 {
            return Ok(responses(
                blobs.read_frames(blob.id, 0..blob.file_size).await?,
            ));
        }
        let first = self
            .0
            .state
            .meta
            .blob_chunks(blob.id, Some(ChunkRange::Content(offset..offset + 1)))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Internal(format!("no chunk covers offset {offset}")))?;
        if first.offset == offset {
            return Ok(responses(
                blobs
                    .read_frames(blob.id, first.file_offset..blob.file_size)
                    .await?,
            ));
        }
        let head_end = first.offset + first.chunk.size;
        let head: Vec<Bytes> = blobs
            .read(blob.id, offset..head_end)
            .await?
            .try_collect()
            .await?;
        let head = compress(head.concat().into()).await?;
        let frames_from = first.file_offset + first.chunk.stored_size;
        let rest = blobs
            .read_frames(blob.id, frames_from..blob.file_size)
            .await?;
        Ok(responses(stream::once(async move { Ok(head) }).chain(rest)))
    }

    async fn inner_write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<WriteResponse, Error> {
        let reapi = &self.0;
        let limits = &reapi.state.limits;
        let clock = Clock::new(
            limits.idle_timeout(),
            Duration::from_secs(limits.request_timeout_secs),
        );
        let metadata = request.metadata().clone();
        let mut requests = request.into_inner();
        let first = next_message(&mut requests, &clock)
            .await?
            .ok_or_else(|| Error::InvalidArgument("Write without any request".into()))?;
        let name = first.resource_name.clone();
        let upload = UploadResource::parse(&name)?;
        let digest = upload.blob.digest;
        let compression = upload.blob.compression;
        let cache = reapi
            .cache(&metadata, upload.blob.instance, ReapiAccess::Write)
            .await?;
        reapi.check_size(digest)?;
        // Already there: finish at once, whatever the client still sends.
        if digest.is_empty() || reapi.blob(&cache, digest).await.is_ok() {
            return Ok(WriteResponse {
                committed_size: already_stored(compression, digest),
            });
        }
        let offset = u64::try_from(first.write_offset).map_err(|_| {
            Error::InvalidArgument(format!("write_offset {} is negative", first.write_offset))
        })?;
        if compression == BlobCompression::Zstd && offset != 0 {
            return Err(Error::InvalidArgument(format!(
                "write_offset {offset}: compressed uploads cannot be resumed; start at 0"
            )));
        }
        let _slot = reapi.uploads.slot(clock.idle).await?;
        let received = AtomicU64::new(offset);
        let incoming = Incoming {
            requests: &mut requests,
            clock: &clock,
            name: &name,
            first: Some(first),
            received: &received,
            max_len: match compression {
                BlobCompression::Identity => digest.size,
                BlobCompression::Zstd => max_compressed_len(digest.size),
            },
            finished: false,
        }
        .into_stream();
        match compression {
            BlobCompression::Identity => {
                let mut session = reapi
                    .uploads
                    .claim(cache.id, upload.upload_key, offset)
                    .await?;
                let prefix = session.take_prefix();
                let stored = reapi
                    .store_resumable(&cache, digest, prefix, incoming, &session)
                    .await;
                match &stored {
                    // The client sends the rest later, here or elsewhere.
                    Err(BlobError::Store(StoreError::Input(_))) => {}
                    _ => session.finish().await,
                }
                stored?;
            }
            BlobCompression::Zstd => {
                let decoded = decompressed(incoming);
                reapi
                    .store_resumable(&cache, digest, Vec::new(), decoded, &())
                    .await?;
            }
        }
        Ok(WriteResponse {
            committed_size: i64::try_from(received.load(Ordering::Acquire)).unwrap_or(i64::MAX),
        })
    }

    async fn inner_query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<QueryWriteStatusResponse, Error> {
        let reapi = &self.0;
        let upload = UploadResource::parse(&request.get_ref().resource_name)?;
        let cache = reapi
            .cache(request.metadata(), upload.blob.instance, ReapiAccess::Write)
            .await?;
        let digest = upload.blob.digest;
        if digest.is_empty() || reapi.blob(&cache, digest).await.is_ok() {
            return Ok(QueryWriteStatusResponse {
                committed_size: already_stored(upload.blob.compression, digest),
                complete: true,
            });
        }
        let committed = match upload.blob.compression {
            BlobCompression::Identity => {
                reapi.uploads.committed(cache.id, upload.upload_key).await?
            }
            BlobCompression::Zstd => 0,
        };
        Ok(QueryWriteStatusResponse {
            committed_size: i64::try_from(committed).unwrap_or(i64::MAX),
            complete: false,
        })
    }
}

/// A Write's messages as the ingest's input: each message's data in
/// order, checked against the offsets and the resource name, until one sets
/// `finish_write`. A failure ends the stream with a [`Error`], which
/// the ingest hands back inside its input error.
struct Incoming<'a, S> {
    requests: &'a mut S,
    clock: &'a Clock,
    name: &'a str,
    first: Option<WriteRequest>,
    /// The client's offset so far, which is also the next expected
    /// `write_offset`.
    received: &'a AtomicU64,
    /// The most bytes the client may send.
    max_len: u64,
    finished: bool,
}

impl<'a, S> Incoming<'a, S>
where
    S: Stream<Item = Result<WriteRequest, Status>> + Unpin + Send,
{
    fn into_stream(self) -> impl Stream<Item = Result<Bytes, Error>> + Send + 'a {
        stream::unfold(self, |mut incoming| async move {
            if incoming.finished {
                return None;
            }
            let piece = incoming.next_piece().await;
            incoming.finished |= piece.is_err();
            Some((piece, incoming))
        })
    }

    async fn next_piece(&mut self) -> Result<Bytes, Error> {
        let received = self.received.load(Ordering::Acquire);
        let message = match self.first.take() {
            Some(first) => first,
            None => next_message(self.requests, self.clock)
                .await?
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "Write ended after {received} bytes without finish_write; resume it"
                    ))
                })?,
        };
        if u64::try_from(message.write_offset).ok() != Some(received) {
            return Err(Error::InvalidArgument(format!(
                "write_offset {} is not the {received} bytes received so far",
                message.write_offset
            )));
        }
        if !message.resource_name.is_empty() && message.resource_name != self.name {
            return Err(Error::InvalidArgument(
                "resource_name changed within one Write".into(),
            ));
        }
        let len = message.data.len() as u64;
        if received.saturating_add(len) > self.max_len {
            return Err(Error::InvalidArgument(format!(
                "more data than {} holds",
                self.name
            )));
        }
        self.received.store(received + len, Ordering::Release);
        self.finished = message.finish_write;
        Ok(message.data)
    }
}

/// The time limits of one Write: an idle limit for each wait on the
/// client, and a limit on the whole request.
struct Clock {
    idle: Duration,
    total: Duration,
    deadline: tokio::time::Instant,
}

impl Clock {
    fn new(idle: Duration, total: Duration) -> Self {
        Self {
            idle,
            total,
            deadline: tokio::time::Instant::now() + total,
        }
    }
}

/// The next client message, within `clock`'s limits. A broken client
/// stream is ABORTED; a client too slow is DEADLINE_EXCEEDED.
async fn next_message<S>(requests: &mut S, clock: &Clock) -> Result<Option<WriteRequest>, Error>
where
    S: Stream<Item = Result<WriteRequest, Status>> + Unpin,
{
    let idle_until = tokio::time::Instant::now() + clock.idle;
    match tokio::time::timeout_at(idle_until.min(clock.deadline), requests.next()).await {
        Ok(message) => message.transpose().map_err(|status| {
            Error::Aborted(format!("the Write stream failed: {}", status.message()))
        }),
        Err(_) if idle_until < clock.deadline => Err(Error::Timeout(format!(
            "the client sent nothing for {} s; resume the upload",
            clock.idle.as_secs()
        ))),
        Err(_) => Err(Error::Timeout(format!(
            "the Write took longer than the server's {} s limit; resume the upload",
            clock.total.as_secs()
        ))),
    }
}

/// A compressed upload's content: zstd frames decoded as they stream in,
/// within a bounded window. The digest's size bounds the output (the
/// ingest refuses more); errors of the messages themselves come back out
/// as they went in.
fn decompressed<'a>(
    compressed: impl Stream<Item = Result<Bytes, Error>> + Send + 'a,
) -> impl Stream<Item = Result<Bytes, Error>> + Send + 'a {
    use async_compression::tokio::bufread::ZstdDecoder;
    use async_compression::zstd::DParameter;
    use tokio_util::io::{ReaderStream, StreamReader};

    let reader = StreamReader::new(Box::pin(compressed.map_err(std::io::Error::other)));
    let params = [DParameter::window_log_max(ZSTD_WINDOW_LOG_MAX)];
    let mut decoder = ZstdDecoder::with_params(reader, &params);
    decoder.multiple_members(true);
    ReaderStream::with_capacity(decoder, 256 << 10).map_err(|e| {
        let text = e.to_string();
        match e
            .into_inner()
            .map(<dyn std::error::Error + Send + Sync>::downcast::<Error>)
        {
            Some(Ok(ours)) => *ours,
            _ => Error::InvalidArgument(format!("zstd payload is unusable: {text}")),
        }
    })
}

/// One zstd frame of `data`, compressed on the blocking pool.
async fn compress(data: Bytes) -> Result<Bytes, Error> {
    tokio::task::spawn_blocking(move || {
        garret_store::codec::compress(&data, garret_store::codec::DEFAULT_LEVEL)
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
    .map_err(|e| Error::Internal(e.to_string()))
}

/// Store output as ReadResponses of at most [`READ_CHUNK_BYTES`]; a store
/// error ends the stream with its status, never with a short clean end.
fn responses<S>(content: S) -> ReadStream
where
    S: Stream<Item = Result<Bytes, garret_store::StoreError>> + Send + 'static,
{
    content
        .map(|piece| match piece {
            Ok(bytes) => {
                let pieces: Vec<_> = (0..bytes.len())
                    .step_by(READ_CHUNK_BYTES)
                    .map(|at| {
                        Ok(ReadResponse {
                            data: bytes.slice(at..bytes.len().min(at + READ_CHUNK_BYTES)),
                        })
                    })
                    .collect();
                stream::iter(pieces)
            }
            Err(e) => stream::iter(vec![Err(Status::from(Error::from(e)))]),
        })
        .flatten()
        .boxed()
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        Ok(Response::new(self.inner_read(request).await?))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        Ok(Response::new(self.inner_write(request).await?))
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        Ok(Response::new(self.inner_query_write_status(request).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(offset: i64) -> WriteRequest {
        WriteRequest {
            write_offset: offset,
            ..Default::default()
        }
    }

    // A zero limit elapses at once for a client that has nothing ready,
    // while a message that is ready is still taken: no time passes in these
    // tests.

    #[tokio::test]
    async fn a_stalled_client_meets_the_idle_timeout() {
        let clock = Clock::new(Duration::ZERO, Duration::from_hours(1));
        let mut requests = stream::iter([Ok(message(0))]).chain(stream::pending());
        assert!(next_message(&mut requests, &clock).await.unwrap().is_some());
        let err = next_message(&mut requests, &clock).await.unwrap_err();
        assert!(
            matches!(&err, Error::Timeout(m) if m.contains("sent nothing")),
            "{err}"
        );
        assert_eq!(err.class().code, tonic::Code::DeadlineExceeded);
    }

    #[tokio::test]
    async fn a_slow_request_meets_the_request_timeout() {
        let clock = Clock::new(Duration::from_mins(5), Duration::ZERO);
        let mut requests = stream::pending::<Result<WriteRequest, Status>>();
        let err = next_message(&mut requests, &clock).await.unwrap_err();
        assert!(
            matches!(&err, Error::Timeout(m) if m.contains("took longer")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_broken_stream_is_aborted() {
        let clock = Clock::new(Duration::from_mins(5), Duration::from_hours(1));
        let mut requests = stream::iter([Err(Status::cancelled("gone"))]);
        let err = next_message(&mut requests, &clock).await.unwrap_err();
        assert!(matches!(err, Error::Aborted(_)), "{err}");
    }
}
