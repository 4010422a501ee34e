//! Request bodies, and the one place their limits are applied: every body
//! is read with an idle timeout and a whole-request timeout, small bodies
//! (JSON, narinfo, action results) are read whole up to a size bound, and
//! plain Nix NAR uploads are checked against their file hash and
//! decompressed within a memory and an expansion bound. Every failure is a
//! [`BodyError`], which the error mapping turns into a 4xx.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use garret_nix::{Sha256Hash, Sha256Hasher};

use crate::config::Limits;
use crate::upload::BodyError;

pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, BodyError>> + Send>>;

/// The request body as a stream that fails if the client sends nothing for
/// `idle`.
pub fn idle_limited(body: Body, idle: Duration) -> BodyStream {
    let inner = body
        .into_data_stream()
        .map_err(|e| BodyError::Read(e.into_inner()));
    Box::pin(crate::idle::bounded(inner, idle, move || {
        BodyError::Idle(idle)
    }))
}

/// A response body for stored content, with its first piece awaited before
/// the status line goes out: a chunk that is already missing is an error
/// answer (503) rather than a 200 that breaks off. A later failure aborts
/// the body, never ends it cleanly.
pub async fn first_piece_then_stream<S>(content: S) -> Result<Body, crate::error::Error>
where
    S: Stream<Item = Result<Bytes, garret_store::StoreError>> + Send + 'static,
{
    let mut content = Box::pin(content);
    let first = content.next().await.transpose()?;
    let rest = content.map(|part| part.map_err(std::io::Error::other));
    Ok(Body::from_stream(
        futures::stream::iter(first.map(Ok)).chain(rest),
    ))
}

/// Runs `work` (which reads a body) within the whole-request time limit.
pub async fn within_request_timeout<T, E>(
    limits: &Limits,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E>
where
    E: From<BodyError>,
{
    let limit = limits.request_timeout();
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(BodyError::Timeout(limit).into()))
}

/// Bytes of small bodies (JSON, narinfo, ActionResult) held in memory at
/// once by the whole process. Each is bounded on its own, but hundreds of
/// authorized clients sending large ones and stalling just short of the end
/// would otherwise add up to gigabytes (issue 10 measured 470 MiB for 100).
const SMALL_BODY_BUDGET_BYTES: usize = 64 << 20;

static SMALL_BODY_BUDGET: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(SMALL_BODY_BUDGET_BYTES);

/// Reads a small body whole: at most `max` bytes (refused up front when
/// `Content-Length` says more), within the idle and whole-request timeouts.
/// What arrives is kept as the pieces it came in and joined once at the
/// end, never sized by what the client announces, so a stalled or lying
/// client costs no memory it did not send. Every piece is counted against
/// the process's budget for small bodies; a request that finds it spent
/// for a whole idle period is answered 503.
pub async fn read_small(
    body: Body,
    headers: &HeaderMap,
    max: u64,
    limits: &Limits,
) -> Result<Bytes, BodyError> {
    read_small_within(&SMALL_BODY_BUDGET, body, headers, max, limits).await
}

/// Reads and parses a JSON request body of at most
/// [`super::MAX_JSON_BODY`] bytes within the request limits; whatever the
/// `Content-Type`, as Attic does, and with errors in Attic's JSON shape.
/// Callers authorize as far as they can before calling this.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    body: Body,
    headers: &HeaderMap,
    limits: &Limits,
) -> Result<T, crate::error::Error> {
    let body = read_small(body, headers, super::MAX_JSON_BODY as u64, limits).await?;
    serde_json::from_slice(&body)
        .map_err(|e| crate::error::Error::InvalidArgument(format!("invalid JSON body: {e}")))
}

async fn read_small_within(
    budget: &tokio::sync::Semaphore,
    body: Body,
    headers: &HeaderMap,
    max: u64,
    limits: &Limits,
) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(BodyError::TooLarge { limit: max });
    }
    within_request_timeout(limits, async {
        let mut stream = idle_limited(body, limits.idle_timeout());
        let mut parts = Vec::new();
        let mut len = 0u64;
        let mut held: Option<tokio::sync::SemaphorePermit<'_>> = None;
        while let Some(part) = stream.next().await {
            let part = part?;
            len += part.len() as u64;
            if len > max {
                return Err(BodyError::TooLarge { limit: max });
            }
            let want = u32::try_from(part.len()).map_err(|_| BodyError::TooLarge { limit: max })?;
            let permit = tokio::time::timeout(limits.idle_timeout(), budget.acquire_many(want))
                .await
                .map_err(|_| BodyError::Busy)?
                .expect("the budget is never closed");
            match &mut held {
                Some(held) => held.merge(permit),
                None => held = Some(permit),
            }
            parts.push(part);
        }
        let whole = match parts.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => many.concat().into(),
        };
        Ok(whole)
    })
    .await
}

/// How a NAR file is compressed: a plain Nix upload's file name extension
/// (`nix copy --to …?compression=`), or a narinfo's `Compression`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
    Xz,
}

impl Compression {
    /// Splits `<file hash>.nar[.zst|.xz]` into the hash text and compression.
    pub fn split_file_name(name: &str) -> Option<(&str, Self)> {
        [
            (".nar.zst", Self::Zstd),
            (".nar.xz", Self::Xz),
            (".nar", Self::None),
        ]
        .into_iter()
        .find_map(|(suffix, c)| name.strip_suffix(suffix).map(|stem| (stem, c)))
    }

    /// The compression a narinfo's `Compression` field names, if garret
    /// decodes it.
    pub fn from_narinfo(field: &str) -> Option<Self> {
        match field {
            "none" => Some(Self::None),
            "zstd" => Some(Self::Zstd),
            "xz" => Some(Self::Xz),
            _ => None,
        }
    }
}

/// Passes the file through while counting it and, when its hash is known,
/// hashing it: at its end the stream fails if the hash is not the one
/// promised (by its name in a plain Nix upload, by `FileHash` in a
/// narinfo), so the upload is refused before anything is committed.
struct FileHashCheck<S> {
    inner: S,
    /// The hash promised and the hasher checking it, until the end.
    check: Option<(Sha256Hash, Sha256Hasher)>,
    done: bool,
    /// Compressed bytes read so far, for the expansion bound.
    read: Arc<AtomicU64>,
}

impl<S> Stream for FileHashCheck<S>
where
    S: Stream<Item = Result<Bytes, BodyError>> + Unpin,
{
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                if let Some((_, hasher)) = self.check.as_mut() {
                    hasher.update(&bytes);
                }
                self.read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(None) => {
                self.done = true;
                let Some((expected, hasher)) = self.check.take() else {
                    return Poll::Ready(None);
                };
                let (actual, _) = hasher.finish();
                if actual == expected {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(BodyError::FileHashMismatch { expected, actual })))
                }
            }
            other => other,
        }
    }
}

/// What a compressed upload may cost to decode, from [`Limits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Decoder memory: the xz memory limit; zstd's window limit within it.
    pub memory: u64,
    /// Output beyond `floor` may be at most this many times the input.
    pub ratio: u64,
    pub floor: u64,
}

impl DecodeLimits {
    pub fn new(limits: &Limits) -> Self {
        Self {
            memory: limits.max_decompression_memory,
            ratio: limits.max_decompression_ratio,
            floor: limits.decompression_ratio_floor,
        }
    }

    /// Most output allowed once `read` compressed bytes have arrived. Only
    /// bytes that arrived count, not a `Content-Length`: a client could
    /// announce a large body, send a small bomb and let it expand.
    fn allowed(&self, read: u64) -> u64 {
        self.floor.max(read.saturating_mul(self.ratio))
    }

    /// zstd's window-log limit: the largest power-of-two window within the
    /// memory limit, inside what zstd accepts (1 KiB to 2 GiB).
    fn zstd_window_log_max(&self) -> u32 {
        self.memory.max(1).ilog2().clamp(10, 31)
    }
}

/// Stops a decoder's output once it outgrows [`DecodeLimits::allowed`]:
/// a small zstd or xz bomb is refused after a bounded amount of work,
/// instead of expanding to whatever `max_nar_size` allows.
struct ExpansionLimit<S> {
    inner: S,
    limits: DecodeLimits,
    read: Arc<AtomicU64>,
    written: u64,
    failed: bool,
}

impl<S> Stream for ExpansionLimit<S>
where
    S: Stream<Item = Result<Bytes, BodyError>> + Unpin,
{
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let item = std::task::ready!(Pin::new(&mut self.inner).poll_next(cx));
        if let Some(Ok(bytes)) = &item {
            self.written = self.written.saturating_add(bytes.len() as u64);
            let allowed = self.limits.allowed(self.read.load(Ordering::Relaxed));
            if self.written > allowed {
                self.failed = true;
                return Poll::Ready(Some(Err(BodyError::Expansion {
                    ratio: self.limits.ratio,
                    floor: self.limits.floor,
                })));
            }
        }
        Poll::Ready(item)
    }
}

/// The NAR inside a compressed file (a plain Nix upload, or a NAR fetched
/// from a binary cache): the file is checked against `file_hash` if known
/// and decompressed within `limits`. Concatenated frames/streams are
/// accepted, and the decoder reads to the end, so the file-hash check
/// always runs.
pub fn nar_of_file(
    file: BodyStream,
    file_hash: Option<Sha256Hash>,
    compression: Compression,
    limits: DecodeLimits,
) -> BodyStream {
    use async_compression::tokio::bufread::{XzDecoder, ZstdDecoder};
    use async_compression::zstd::DParameter;
    use tokio_util::io::{ReaderStream, StreamReader};

    let read = Arc::new(AtomicU64::new(0));
    let checked = FileHashCheck {
        inner: file,
        check: file_hash.map(|hash| (hash, Sha256Hasher::new())),
        done: false,
        read: Arc::clone(&read),
    };
    let reader = StreamReader::new(checked.map_err(std::io::Error::other));
    let decoded: Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>> = match compression {
        Compression::None => {
            return Box::pin(reader_stream_errors(
                ReaderStream::new(reader),
                limits.memory,
            ));
        }
        Compression::Zstd => {
            let params = [DParameter::window_log_max(limits.zstd_window_log_max())];
            let mut decoder = ZstdDecoder::with_params(reader, &params);
            decoder.multiple_members(true);
            Box::pin(ReaderStream::with_capacity(decoder, 256 << 10))
        }
        Compression::Xz => {
            let mut decoder = XzDecoder::with_mem_limit(reader, limits.memory);
            decoder.multiple_members(true);
            Box::pin(ReaderStream::with_capacity(decoder, 256 << 10))
        }
    };
    Box::pin(ExpansionLimit {
        inner: reader_stream_errors(decoded, limits.memory),
        limits,
        read,
        written: 0,
        failed: false,
    })
}

/// Whether a decoder refused its input for needing more memory than its
/// limit. The decoders report this only as text (liblzma's "memory limit
/// reached", zstd's "Frame requires too much memory for decoding"), so the
/// text is matched; `decoder_memory_errors_are_recognised` pins it.
fn is_decoder_memory_error(err: &std::io::Error) -> bool {
    let text = err.to_string();
    text.contains("memory limit reached") || text.contains("requires too much memory")
}

/// Recovers our own errors from the `io::Error`s the reader adapters wrap
/// them in; anything else went wrong in the decoder: a memory limit
/// (`memory_limit`) it hit, or bad input.
fn reader_stream_errors<S>(
    stream: S,
    memory_limit: u64,
) -> impl Stream<Item = Result<Bytes, BodyError>> + Send + Unpin
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin,
{
    stream.map_err(move |e| {
        if e.get_ref()
            .is_some_and(<dyn std::error::Error + Send + Sync>::is::<BodyError>)
        {
            *e.into_inner()
                .expect("checked above")
                .downcast::<BodyError>()
                .expect("checked above")
        } else if is_decoder_memory_error(&e) {
            BodyError::DecoderMemory {
                limit: memory_limit,
            }
        } else {
            BodyError::Decompress(e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(parts: Vec<Vec<u8>>) -> BodyStream {
        Box::pin(futures::stream::iter(
            parts.into_iter().map(|p| Ok(Bytes::from(p))),
        ))
    }

    /// The configured defaults, which every ordinary upload fits.
    fn default_limits() -> DecodeLimits {
        DecodeLimits::new(&Limits::default())
    }

    async fn collect(stream: BodyStream) -> Result<Vec<u8>, BodyError> {
        let parts: Vec<Bytes> = stream.try_collect().await?;
        Ok(parts.concat())
    }

    #[test]
    fn file_names() {
        assert_eq!(
            Compression::split_file_name("abc.nar.zst"),
            Some(("abc", Compression::Zstd))
        );
        assert_eq!(
            Compression::split_file_name("abc.nar.xz"),
            Some(("abc", Compression::Xz))
        );
        assert_eq!(
            Compression::split_file_name("abc.nar"),
            Some(("abc", Compression::None))
        );
        assert_eq!(Compression::split_file_name("abc.nar.bz2"), None);
        assert_eq!(Compression::from_narinfo("zstd"), Some(Compression::Zstd));
        assert_eq!(Compression::from_narinfo("xz"), Some(Compression::Xz));
        assert_eq!(Compression::from_narinfo("none"), Some(Compression::None));
        assert_eq!(Compression::from_narinfo("bzip2"), None);
    }

    #[tokio::test]
    async fn decompresses_and_checks_the_file_hash() {
        let content = b"some NAR bytes, repeated ".repeat(1000);
        // Two zstd frames back to back, split awkwardly.
        let mut zst = zstd::encode_all(&content[..10_000], 3).unwrap();
        zst.extend(zstd::encode_all(&content[10_000..], 3).unwrap());
        let hash = Sha256Hash::of(&zst);
        let parts = vec![zst[..7].to_vec(), zst[7..].to_vec()];
        let out = collect(nar_of_file(
            file(parts.clone()),
            Some(hash),
            Compression::Zstd,
            default_limits(),
        ))
        .await;
        assert_eq!(out.unwrap(), content);

        // A narinfo without FileHash: decompressed, nothing to check.
        let out = collect(nar_of_file(
            file(parts.clone()),
            None,
            Compression::Zstd,
            default_limits(),
        ))
        .await;
        assert_eq!(out.unwrap(), content);

        let wrong = Sha256Hash::of(b"other");
        let out = collect(nar_of_file(
            file(parts),
            Some(wrong),
            Compression::Zstd,
            default_limits(),
        ))
        .await;
        assert!(
            matches!(out, Err(BodyError::FileHashMismatch { .. })),
            "{out:?}"
        );

        let plain = collect(nar_of_file(
            file(vec![content.clone()]),
            Some(Sha256Hash::of(&content)),
            Compression::None,
            default_limits(),
        ))
        .await;
        assert_eq!(plain.unwrap(), content);
    }

    #[tokio::test]
    async fn corrupt_data_is_a_decompression_error() {
        let junk = b"definitely not zstd".to_vec();
        let out = collect(nar_of_file(
            file(vec![junk.clone()]),
            Some(Sha256Hash::of(&junk)),
            Compression::Zstd,
            default_limits(),
        ))
        .await;
        assert!(matches!(out, Err(BodyError::Decompress(_))), "{out:?}");
        let out = collect(nar_of_file(
            file(vec![junk.clone()]),
            Some(Sha256Hash::of(&junk)),
            Compression::Xz,
            default_limits(),
        ))
        .await;
        assert!(matches!(out, Err(BodyError::Decompress(_))), "{out:?}");
    }

    /// `content` compressed by the `program` binary (`xz`, `zstd`) with
    /// `args`, read from stdin so the header cannot shrink to the input.
    fn compress_with(program: &str, args: &[&str], content: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let mut child = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} is needed for this test: {e}"));
        let mut stdin = child.stdin.take().unwrap();
        let content = content.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&content));
        let output = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(output.status.success(), "{program} {args:?} failed");
        output.stdout
    }

    async fn decode(
        compressed: &[u8],
        compression: Compression,
        limits: DecodeLimits,
    ) -> Result<Vec<u8>, BodyError> {
        collect(nar_of_file(
            file(vec![compressed.to_vec()]),
            Some(Sha256Hash::of(compressed)),
            compression,
            limits,
        ))
        .await
    }

    #[tokio::test]
    async fn xz_round_trip_up_to_level_9() {
        let content = b"xz content ".repeat(500);
        for level in ["-6", "-9e"] {
            let xz = compress_with("xz", &["-z", "-c", level], &content);
            assert_eq!(
                decode(&xz, Compression::Xz, default_limits())
                    .await
                    .unwrap(),
                content
            );
        }
    }

    /// A tiny stream that declares a huge dictionary or window is refused
    /// at its header, before the decoder takes that memory.
    #[tokio::test]
    async fn huge_dictionaries_and_windows_are_refused() {
        let content = b"not much ".repeat(1000);
        let xz = compress_with("xz", &["-z", "-c", "--lzma2=dict=1536MiB"], &content);
        let out = decode(&xz, Compression::Xz, default_limits()).await;
        assert!(
            matches!(out, Err(BodyError::DecoderMemory { limit }) if limit == default_limits().memory),
            "{out:?}"
        );
        let zst = compress_with("zstd", &["-c", "--long=30"], &content);
        let out = decode(&zst, Compression::Zstd, default_limits()).await;
        assert!(
            matches!(out, Err(BodyError::DecoderMemory { .. })),
            "{out:?}"
        );
        // Within a limit that admits them, the same streams decode.
        let roomy = DecodeLimits {
            memory: 2 << 30,
            ..default_limits()
        };
        assert_eq!(
            decode(&zst, Compression::Zstd, roomy).await.unwrap(),
            content
        );
    }

    #[test]
    fn zstd_window_follows_the_memory_limit() {
        let window = |memory| {
            DecodeLimits {
                memory,
                ..default_limits()
            }
            .zstd_window_log_max()
        };
        assert_eq!(window(128 << 20), 27);
        assert_eq!(window((128 << 20) - 1), 26);
        assert_eq!(window(1), 10);
        assert_eq!(window(u64::MAX), 31);
    }

    #[tokio::test]
    async fn expansion_beyond_the_ratio_is_refused() {
        let zeros = vec![0u8; 8 << 20];
        let zst = zstd::encode_all(&zeros[..], 3).unwrap();
        let tight = DecodeLimits {
            ratio: 10,
            floor: 1 << 20,
            ..default_limits()
        };
        let out = decode(&zst, Compression::Zstd, tight).await;
        assert!(
            matches!(out, Err(BodyError::Expansion { ratio: 10, floor }) if floor == 1 << 20),
            "{out:?}"
        );
        // The floor lets small, very compressible files through whatever
        // their ratio; beyond it, the ratio decides.
        let within_floor = DecodeLimits {
            floor: 8 << 20,
            ..tight
        };
        assert_eq!(
            decode(&zst, Compression::Zstd, within_floor).await.unwrap(),
            zeros
        );
        let generous = DecodeLimits {
            ratio: 100_000,
            ..tight
        };
        assert_eq!(
            decode(&zst, Compression::Zstd, generous).await.unwrap(),
            zeros
        );
    }

    #[tokio::test]
    async fn small_bodies_are_bounded() {
        let limits = Limits::default();
        let mut headers = HeaderMap::new();
        let body = read_small(Body::from("0123456789"), &headers, 10, &limits).await;
        assert_eq!(body.unwrap(), "0123456789");
        let body = read_small(Body::from("0123456789"), &headers, 9, &limits).await;
        assert!(
            matches!(body, Err(BodyError::TooLarge { limit: 9 })),
            "{body:?}"
        );
        // A Content-Length over the bound is refused without reading.
        headers.insert(header::CONTENT_LENGTH, "1000000".parse().unwrap());
        let body = read_small(Body::from("x"), &headers, 10, &limits).await;
        assert!(
            matches!(body, Err(BodyError::TooLarge { limit: 10 })),
            "{body:?}"
        );
    }

    /// Bodies in flight share one memory budget: what a request holds is
    /// returned when it ends, and a request that finds the budget spent for
    /// a whole idle period is told to come back (503), not queued forever.
    #[tokio::test]
    async fn small_bodies_share_a_memory_budget() {
        let budget = tokio::sync::Semaphore::new(16);
        let limits = Limits {
            idle_timeout_secs: 1,
            ..Limits::default()
        };
        let headers = HeaderMap::new();
        for _ in 0..3 {
            let body = read_small_within(&budget, Body::from("0123456789"), &headers, 64, &limits);
            assert_eq!(body.await.unwrap(), "0123456789");
        }
        assert_eq!(budget.available_permits(), 16);
        let _held = budget.acquire_many(10).await.unwrap();
        let body =
            read_small_within(&budget, Body::from("0123456789"), &headers, 64, &limits).await;
        assert!(matches!(body, Err(BodyError::Busy)), "{body:?}");
        assert_eq!(budget.available_permits(), 6);
    }

    /// Each limit at its shortest (1 s), alone: the status is asserted,
    /// not how long it took.
    #[tokio::test]
    async fn stalled_small_bodies_time_out() {
        let stalled =
            || Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>());
        let headers = HeaderMap::new();
        let idle = Limits {
            idle_timeout_secs: 1,
            ..Limits::default()
        };
        let body = read_small(stalled(), &headers, 10, &idle).await;
        assert!(matches!(body, Err(BodyError::Idle(_))), "{body:?}");
        let whole = Limits {
            request_timeout_secs: 1,
            ..Limits::default()
        };
        let body = read_small(stalled(), &headers, 10, &whole).await;
        assert!(matches!(body, Err(BodyError::Timeout(_))), "{body:?}");
    }
}
