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
//! Resuming a compressed upload is not supported: REAPI defines its offsets
//! as a mix of uncompressed and compressed positions that cannot be mapped
//! back onto a spool. Such uploads restart at 0.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes};
use futures::{Stream, StreamExt as _, TryStreamExt as _, stream};
use garret_meta::{Blob, ChunkRange};
use garret_proto::bytestream::byte_stream_server::ByteStream;
use garret_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use tonic::{Request, Response, Status, Streaming};

use super::digest::Digest;
use super::resource_name::{BlobResource, Compression, UploadResource};
use super::{READ_CHUNK_BYTES, Reapi, ReapiError};
use crate::auth::ReapiAccess;

#[derive(Debug)]
pub(crate) struct ByteStreamService(pub(crate) Arc<Reapi>);

/// Spooled bytes kept in memory before an upload moves to a file: most
/// Bazel outputs are small and never touch the disk.
const SPOOL_MEMORY_BYTES: usize = 1 << 20;

/// How long an interrupted upload waits to be resumed.
const SESSION_TTL: Duration = Duration::from_hours(1);

/// Pieces handed from the spool reader to the ingest.
const INGEST_PIECE_BYTES: usize = 256 << 10;

/// zstd's worst case for incompressible data is a few bytes per 128 KiB
/// block; this bounds what a compressed upload of `size` bytes may send.
fn max_compressed_len(size: u64) -> u64 {
    size + size / 1024 + 1024
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

/// Where an upload's bytes wait.
#[derive(Debug)]
enum Spool {
    Memory(Vec<Bytes>),
    File { path: PathBuf, file: std::fs::File },
}

impl Spool {
    fn len_in_memory(parts: &[Bytes]) -> usize {
        parts.iter().map(Bytes::len).sum()
    }

    /// Appends `data`, moving to a file in `dir` once memory is exceeded.
    /// File writes are small and sequential; they run on the blocking pool.
    async fn append(&mut self, dir: &Path, data: Bytes) -> Result<(), ReapiError> {
        let io = |e: std::io::Error| ReapiError::Internal(format!("upload spool: {e}"));
        match self {
            Self::Memory(parts)
                if Self::len_in_memory(parts) + data.len() <= SPOOL_MEMORY_BYTES =>
            {
                parts.push(data);
            }
            Self::Memory(parts) => {
                let parts = std::mem::take(parts);
                let dir = dir.to_owned();
                let (path, file) = tokio::task::spawn_blocking(move || {
                    std::fs::create_dir_all(&dir)?;
                    let (file, path) = tempfile_in(&dir)?;
                    let mut writer = std::io::BufWriter::new(&file);
                    for part in parts.iter().chain(std::iter::once(&data)) {
                        writer.write_all(part)?;
                    }
                    writer.flush()?;
                    drop(writer);
                    Ok::<_, std::io::Error>((path, file))
                })
                .await
                .map_err(|e| ReapiError::Internal(e.to_string()))?
                .map_err(io)?;
                *self = Self::File { path, file };
            }
            Self::File { file, .. } => {
                let mut file = file.try_clone().map_err(io)?;
                tokio::task::spawn_blocking(move || file.write_all(&data))
                    .await
                    .map_err(|e| ReapiError::Internal(e.to_string()))?
                    .map_err(io)?;
            }
        }
        Ok(())
    }

    /// A blocking reader over everything spooled, from the start.
    fn reader(&self) -> std::io::Result<Box<dyn std::io::Read + Send>> {
        Ok(match self {
            Self::Memory(parts) => {
                let joined: Bytes = parts.concat().into();
                Box::new(joined.reader())
            }
            Self::File { path, .. } => Box::new(std::fs::File::open(path)?),
        })
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Self::File { path, .. } = self {
            // Best effort: the directory is per-process scratch space.
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Creates a new file with a unique name in `dir`.
fn tempfile_in(dir: &Path) -> std::io::Result<(std::fs::File, PathBuf)> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("upload-{n}"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => return Ok((file, path)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
}

/// One upload in progress.
#[derive(Debug)]
struct Session {
    spool: Spool,
    /// Bytes received, which is also the next expected `write_offset`.
    committed: u64,
    touched: Instant,
}

impl Session {
    fn new() -> Self {
        Self {
            spool: Spool::Memory(Vec::new()),
            committed: 0,
            touched: Instant::now(),
        }
    }
}

type SessionKey = (i64, String);

/// The uploads of this process.
#[derive(Debug)]
pub(crate) struct Uploads {
    dir: PathBuf,
    sessions: Mutex<HashMap<SessionKey, Arc<tokio::sync::Mutex<Session>>>>,
}

impl Uploads {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The session for `key`, created if new; expired sessions go first.
    fn session(&self, key: &SessionKey) -> Arc<tokio::sync::Mutex<Session>> {
        let mut sessions = self.sessions.lock().expect("upload sessions lock");
        sessions.retain(|_, s| {
            s.try_lock()
                .map_or(true, |s| s.touched.elapsed() < SESSION_TTL)
        });
        Arc::clone(
            sessions
                .entry(key.clone())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(Session::new()))),
        )
    }

    fn existing(&self, key: &SessionKey) -> Option<Arc<tokio::sync::Mutex<Session>>> {
        self.sessions
            .lock()
            .expect("upload sessions lock")
            .get(key)
            .cloned()
    }

    fn remove(&self, key: &SessionKey) {
        self.sessions
            .lock()
            .expect("upload sessions lock")
            .remove(key);
    }
}

/// `committed_size` of a finished upload: the final write offset, and -1
/// for a compressed blob that was already stored (REAPI's convention).
fn already_stored(compression: Compression, digest: Digest) -> i64 {
    match compression {
        Compression::Identity => i64::try_from(digest.size).unwrap_or(i64::MAX),
        Compression::Zstd => -1,
    }
}

impl ByteStreamService {
    async fn inner_read(&self, request: Request<ReadRequest>) -> Result<ReadStream, ReapiError> {
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
                ReapiError::OutOfRange(format!(
                    "read_offset {read_offset} is outside blob {digest}"
                ))
            })?;
        let limit = u64::try_from(read_limit)
            .map_err(|_| ReapiError::OutOfRange(format!("read_limit {read_limit} is negative")))?;
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
                    return Err(ReapiError::InvalidArgument(
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
    async fn compressed_read(&self, blob: &Blob, offset: u64) -> Result<ReadStream, ReapiError> {
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
            .ok_or_else(|| ReapiError::Internal(format!("no chunk covers offset {offset}")))?;
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
    ) -> Result<WriteResponse, ReapiError> {
        let reapi = &self.0;
        let metadata = request.metadata().clone();
        let mut requests = request.into_inner();
        let first = next_message(&mut requests)
            .await?
            .ok_or_else(|| ReapiError::InvalidArgument("Write without any request".into()))?;
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
        let session = reapi.uploads.session(&key);
        let mut session = session
            .try_lock_owned()
            .map_err(|_| ReapiError::Aborted(format!("another Write to {name} is in progress")))?;
        session.touched = Instant::now();
        let max_len = match compression {
            Compression::Identity => digest.size,
            Compression::Zstd => max_compressed_len(digest.size),
        };
        match (first.write_offset, compression) {
            (0, _) => *session = Session::new(),
            (offset, Compression::Identity)
                if u64::try_from(offset).ok() == Some(session.committed) => {}
            (offset, Compression::Identity) => {
                return Err(ReapiError::OutOfRange(format!(
                    "write_offset {offset} does not resume this upload (it holds {} bytes)",
                    session.committed
                )));
            }
            (offset, Compression::Zstd) => {
                return Err(ReapiError::InvalidArgument(format!(
                    "write_offset {offset}: compressed uploads cannot be resumed; start at 0"
                )));
            }
        }

        let mut message = first;
        loop {
            if u64::try_from(message.write_offset).ok() != Some(session.committed) {
                return Err(ReapiError::InvalidArgument(format!(
                    "write_offset {} is not the {} bytes received so far",
                    message.write_offset, session.committed
                )));
            }
            if !message.resource_name.is_empty() && message.resource_name != name {
                return Err(ReapiError::InvalidArgument(
                    "resource_name changed within one Write".into(),
                ));
            }
            let len = message.data.len() as u64;
            if session.committed + len > max_len {
                reapi.uploads.remove(&key);
                return Err(ReapiError::InvalidArgument(format!(
                    "more data than blob {digest} holds"
                )));
            }
            if !message.data.is_empty() {
                session
                    .spool
                    .append(&reapi.uploads.dir, message.data)
                    .await?;
                session.committed += len;
                session.touched = Instant::now();
            }
            if message.finish_write {
                break;
            }
            message = next_message(&mut requests).await?.ok_or_else(|| {
                ReapiError::InvalidArgument(format!(
                    "Write ended after {} bytes without finish_write; resume it",
                    session.committed
                ))
            })?;
        }

        // Complete: the session ends whatever the verdict.
        reapi.uploads.remove(&key);
        let committed = session.committed;
        let spool = std::mem::replace(&mut session.spool, Spool::Memory(Vec::new()));
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
    ) -> Result<(), ReapiError> {
        let reapi = &self.0;
        let input = ingest_stream(spool, compression)?;
        reapi.store_stream(cache, digest, input).await
    }

    async fn inner_query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<QueryWriteStatusResponse, ReapiError> {
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

/// The next client message; a broken client stream is the client's error.
async fn next_message(
    requests: &mut Streaming<WriteRequest>,
) -> Result<Option<WriteRequest>, ReapiError> {
    requests.message().await.map_err(|status| {
        ReapiError::Aborted(format!("the Write stream failed: {}", status.message()))
    })
}

/// The spool's content, decompressed if need be, as the ingest's input.
/// Reading (and zstd) run on the blocking pool and hand pieces over a small
/// channel, so memory stays bounded whatever the blob size.
fn ingest_stream(
    spool: Spool,
    compression: Compression,
) -> Result<impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static, ReapiError> {
    let reader = spool
        .reader()
        .map_err(|e| ReapiError::Internal(format!("upload spool: {e}")))?;
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
async fn compress(data: Bytes) -> Result<Bytes, ReapiError> {
    tokio::task::spawn_blocking(move || {
        garret_store::codec::compress(&data, garret_store::codec::DEFAULT_LEVEL)
    })
    .await
    .map_err(|e| ReapiError::Internal(e.to_string()))?
    .map_err(|e| ReapiError::Internal(e.to_string()))
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
            Err(e) => stream::iter(vec![Err(Status::from(ReapiError::from(e)))]),
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
