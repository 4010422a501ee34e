//! google.bytestream for CAS blobs: streaming reads (plain or as zstd
//! frames) and resumable, verified writes.
//!
//! # Writes
//! An upload's bytes are spooled (in memory, then in a file once large)
//! under a session keyed by instance and upload name. Only when the client
//! sets `finish_write` is the spool ingested, verified against the digest
//! and made visible, so an interrupted or lying upload never shows. The
//! spool survives a broken stream: `QueryWriteStatus` reports how much is
//! kept and the client resumes from there. Sessions live in this process
//! (the metadata's `upload_sessions` table is not used yet), so a resume
//! must reach the same replica; an unknown upload reports 0 bytes and the
//! client starts over, which is always correct.
//!
//! Every wait for the client's next message is bounded by the server's idle
//! timeout, and the whole Write by its request timeout. A client that
//! stalls gets DEADLINE_EXCEEDED (Bazel retries it, asking QueryWriteStatus
//! where to resume); what it sent is kept, within the upload quotas (see
//! [`super::uploads`]), until it resumes or the session expires.
//!
//! Every message costs O(1) bookkeeping whatever its size, so a stream of
//! tiny messages costs the server about what it costs the client to send;
//! no minimum message size is imposed (REAPI sets none), and the timeouts
//! bound how long such a stream can last.
//!
//! Resuming a compressed upload is not supported: REAPI defines its offsets
//! as a mix of uncompressed and compressed positions that cannot be mapped
//! back onto a spool. Such uploads restart at 0.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt as _, TryStreamExt as _, stream};
use garret_meta::{Blob, ChunkRange};
use garret_proto::bytestream::byte_stream_server::ByteStream;
use garret_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use tonic::{Request, Response, Status, Streaming};

use super::resource_name::{BlobResource, Compression, UploadResource};
use super::uploads::{Session, SessionKey, Spool};
use super::{READ_CHUNK_BYTES, Reapi};
use crate::auth::ReapiAccess;
use crate::bazel_core::digest::Digest;
use crate::error::Error;

#[derive(Debug)]
pub(crate) struct ByteStreamService(pub(crate) Arc<Reapi>);

/// Pieces handed from the spool reader to the ingest.
const INGEST_PIECE_BYTES: usize = 256 << 10;

/// zstd's worst case for incompressible data is a few bytes per 128 KiB
/// block; this bounds what a compressed upload of `size` bytes may send.
fn max_compressed_len(size: u64) -> u64 {
    size.saturating_add(size / 1024).saturating_add(1024)
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

/// `committed_size` of a finished upload: the final write offset, and -1
/// for a compressed blob that was already stored (REAPI's convention).
fn already_stored(compression: Compression, digest: Digest) -> i64 {
    match compression {
        Compression::Identity => i64::try_from(digest.size).unwrap_or(i64::MAX),
        Compression::Zstd => -1,
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
            Compression::Identity => {
                let end = if limit == 0 {
                    digest.size
                } else {
                    digest.size.min(offset.saturating_add(limit))
                };
                if offset == end {
                    if !digest.is_empty() {
                        reapi.blob(&cache, digest).await?;
                    }
                    return Ok(stream::empty().boxed());
                }
                let blob = reapi.blob(&cache, digest).await?;
                let content = reapi.state.blobs.read(blob.id, offset..end).await?;
                Ok(responses(content))
            }
            Compression::Zstd => {
                if limit != 0 {
                    return Err(Error::InvalidArgument(
                        "read_limit must be 0 for compressed-blobs reads".into(),
                    ));
                }
                if offset == digest.size {
                    if !digest.is_empty() {
                        reapi.blob(&cache, digest).await?;
                    }
                    let frame = compress(Bytes::new()).await?;
                    return Ok(
                        stream::once(async move { Ok(ReadResponse { data: frame }) }).boxed(),
                    );
                }
                let blob = reapi.blob(&cache, digest).await?;
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
        let key = (cache.id.0, upload.upload_key.to_owned());
        let session = reapi.uploads.session(&key)?;
        let mut session = session
            .try_lock_owned()
            .map_err(|_| Error::Aborted(format!("another Write to {name} is in progress")))?;
        session.touched = Instant::now();
        let max_len = match compression {
            Compression::Identity => digest.size,
            Compression::Zstd => max_compressed_len(digest.size),
        };
        match (first.write_offset, compression) {
            (0, _) => *session = reapi.uploads.new_session(),
            (offset, Compression::Identity)
                if u64::try_from(offset).ok() == Some(session.committed) => {}
            (offset, Compression::Identity) => {
                return Err(Error::OutOfRange(format!(
                    "write_offset {offset} does not resume this upload (it holds {} bytes)",
                    session.committed
                )));
            }
            (offset, Compression::Zstd) => {
                return Err(Error::InvalidArgument(format!(
                    "write_offset {offset}: compressed uploads cannot be resumed; start at 0"
                )));
            }
        }

        let upload = Upload {
            key: &key,
            name: &name,
            max_len,
        };
        let received = receive(&mut requests, first, &mut session, &upload, &clock, reapi).await;
        if let Err(e) = received {
            // An upload that kept nothing has nothing to resume: it must not
            // hold a session (and count against the limit) for an hour.
            if session.committed == 0 {
                reapi.uploads.remove(&key);
            }
            return Err(e);
        }

        // Complete: the session ends whatever the verdict.
        reapi.uploads.remove(&key);
        let committed = session.committed;
        let spool = std::mem::replace(&mut *session, reapi.uploads.new_session()).spool;
        drop(session);
        self.commit_upload(&cache, digest, compression, spool)
            .await?;
        Ok(WriteResponse {
            committed_size: i64::try_from(committed).unwrap_or(i64::MAX),
        })
    }

    /// Ingests a finished upload's spool and makes the blob visible, if it
    /// matches its digest.
    async fn commit_upload(
        &self,
        cache: &garret_meta::Cache,
        digest: Digest,
        compression: Compression,
        spool: Spool,
    ) -> Result<(), Error> {
        let reapi = &self.0;
        let input = ingest_stream(spool, compression)?;
        reapi.store_stream(cache, digest, input).await
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
        let key = (cache.id.0, upload.upload_key.to_owned());
        let committed = match reapi.uploads.existing(&key) {
            // A session busy with a live Write reports what it has so far
            // once that Write pauses; until then, nothing is promised.
            Some(session) => session.try_lock().map_or(0, |s| s.committed),
            None => 0,
        };
        Ok(QueryWriteStatusResponse {
            committed_size: i64::try_from(committed).unwrap_or(i64::MAX),
            complete: false,
        })
    }
}

/// What [`receive`] needs to know about the upload.
struct Upload<'a> {
    key: &'a SessionKey,
    name: &'a str,
    /// The most bytes the client may send.
    max_len: u64,
}

/// Spools `first` and the messages after it into `session` until one sets
/// `finish_write`.
async fn receive<S>(
    requests: &mut S,
    first: WriteRequest,
    session: &mut Session,
    upload: &Upload<'_>,
    clock: &Clock,
    reapi: &Reapi,
) -> Result<(), Error>
where
    S: Stream<Item = Result<WriteRequest, Status>> + Unpin,
{
    let mut message = first;
    loop {
        if u64::try_from(message.write_offset).ok() != Some(session.committed) {
            return Err(Error::InvalidArgument(format!(
                "write_offset {} is not the {} bytes received so far",
                message.write_offset, session.committed
            )));
        }
        if !message.resource_name.is_empty() && message.resource_name != upload.name {
            return Err(Error::InvalidArgument(
                "resource_name changed within one Write".into(),
            ));
        }
        let len = message.data.len() as u64;
        if session.committed.saturating_add(len) > upload.max_len {
            // No resume can fix that: the upload is dropped.
            reapi.uploads.remove(upload.key);
            return Err(Error::InvalidArgument(format!(
                "more data than {} holds",
                upload.name
            )));
        }
        if len > 0 {
            session.spool.append(message.data).await?;
            session.committed += len;
            session.touched = Instant::now();
        }
        if message.finish_write {
            return Ok(());
        }
        message = next_message(requests, clock).await?.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "Write ended after {} bytes without finish_write; resume it",
                session.committed
            ))
        })?;
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

/// The spool's content, decompressed if need be, as the ingest's input.
/// Reading (and zstd) run on the blocking pool and hand pieces over a small
/// channel, so memory stays bounded whatever the blob size.
fn ingest_stream(
    spool: super::uploads::Spool,
    compression: Compression,
) -> Result<impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static, Error> {
    let reader = spool
        .reader()
        .map_err(|e| Error::Internal(format!("upload spool: {e}")))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let _spool = spool; // removed once read
        let mut reader: Box<dyn std::io::Read + Send> = match compression {
            Compression::Identity => reader,
            Compression::Zstd => match zstd::stream::read::Decoder::new(reader) {
                Ok(decoder) => Box::new(decoder),
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            },
        };
        loop {
            let mut buf = vec![0; INGEST_PIECE_BYTES];
            let piece = match read_full(&mut reader, &mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    Ok(Bytes::from(buf))
                }
                Err(e) => Err(e),
            };
            let failed = piece.is_err();
            // A closed channel means the ingest gave up; stop reading.
            if tx.blocking_send(piece).is_err() || failed {
                return;
            }
        }
    });
    Ok(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// Fills `buf` as far as the reader goes.
fn read_full(reader: &mut dyn std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
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
