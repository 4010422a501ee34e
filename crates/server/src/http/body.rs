//! Request bodies as upload streams: an idle timeout, and for plain Nix NAR
//! uploads the file-hash check and decompression. Every failure is a
//! [`BodyError`], which the error mapping turns into a 4xx.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use garret_nix::{Sha256Hash, Sha256Hasher};

use crate::upload::BodyError;

pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, BodyError>> + Send>>;

/// The request body as a stream that fails if the client sends nothing for
/// `idle`: multi-GB uploads may take hours, but a stalled one must not hold
/// its chunks and a connection forever.
pub fn idle_limited(body: Body, idle: Duration) -> BodyStream {
    let inner = body
        .into_data_stream()
        .map_err(|e| BodyError::Read(e.into_inner()));
    Box::pin(futures::stream::unfold(
        Some(Box::pin(inner)),
        move |state| async move {
            let mut inner = state?;
            match tokio::time::timeout(idle, inner.next()).await {
                Ok(Some(item)) => Some((item, Some(inner))),
                Ok(None) => None,
                Err(_) => Some((Err(BodyError::Idle(idle)), None)),
            }
        },
    ))
}

/// How a plain Nix upload compressed its NAR, from the file name's
/// extension (`nix copy --to …?compression=`).
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
}

/// Passes the file through while hashing it, and fails at its end if the
/// hash is not the one its name promised: the error arrives before the
/// stream ends, so the upload is refused before anything is committed.
struct FileHashCheck<S> {
    inner: S,
    hasher: Option<Sha256Hasher>,
    expected: Sha256Hash,
}

impl<S> Stream for FileHashCheck<S>
where
    S: Stream<Item = Result<Bytes, BodyError>> + Unpin,
{
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.hasher.is_none() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                if let Some(hasher) = self.hasher.as_mut() {
                    hasher.update(&bytes);
                }
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(None) => {
                let (actual, _) = self.hasher.take().expect("checked above").finish();
                if actual == self.expected {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(BodyError::FileHashMismatch {
                        expected: self.expected,
                        actual,
                    })))
                }
            }
            other => other,
        }
    }
}

/// The NAR inside a plain Nix upload: the file is checked against the hash
/// in its name and decompressed. Concatenated frames/streams are accepted,
/// and the decoder reads to the end, so the file-hash check always runs.
pub fn nar_of_file(
    file: BodyStream,
    file_hash: Sha256Hash,
    compression: Compression,
) -> BodyStream {
    use async_compression::tokio::bufread::{XzDecoder, ZstdDecoder};
    use tokio_util::io::{ReaderStream, StreamReader};

    let checked = FileHashCheck {
        inner: file,
        hasher: Some(Sha256Hasher::new()),
        expected: file_hash,
    };
    let reader = StreamReader::new(checked.map_err(std::io::Error::other));
    let decoded: Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>> = match compression {
        Compression::None => return Box::pin(reader_stream_errors(ReaderStream::new(reader))),
        Compression::Zstd => {
            let mut decoder = ZstdDecoder::new(reader);
            decoder.multiple_members(true);
            Box::pin(ReaderStream::with_capacity(decoder, 256 << 10))
        }
        Compression::Xz => {
            let mut decoder = XzDecoder::new(reader);
            decoder.multiple_members(true);
            Box::pin(ReaderStream::with_capacity(decoder, 256 << 10))
        }
    };
    Box::pin(reader_stream_errors(decoded))
}

/// Recovers our own errors from the `io::Error`s the reader adapters wrap
/// them in; anything else went wrong in the decoder, i.e. bad input.
fn reader_stream_errors<S>(stream: S) -> impl Stream<Item = Result<Bytes, BodyError>> + Send
where
    S: Stream<Item = std::io::Result<Bytes>> + Send,
{
    stream.map_err(|e| {
        if e.get_ref()
            .is_some_and(<dyn std::error::Error + Send + Sync>::is::<BodyError>)
        {
            *e.into_inner()
                .expect("checked above")
                .downcast::<BodyError>()
                .expect("checked above")
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
    }

    #[tokio::test]
    async fn decompresses_and_checks_the_file_hash() {
        let content = b"some NAR bytes, repeated ".repeat(1000);
        // Two zstd frames back to back, split awkwardly.
        let mut zst = zstd::encode_all(&content[..10_000], 3).unwrap();
        zst.extend(zstd::encode_all(&content[10_000..], 3).unwrap());
        let hash = Sha256Hash::of(&zst);
        let parts = vec![zst[..7].to_vec(), zst[7..].to_vec()];
        let out = collect(nar_of_file(file(parts.clone()), hash, Compression::Zstd)).await;
        assert_eq!(out.unwrap(), content);

        let wrong = Sha256Hash::of(b"other");
        let out = collect(nar_of_file(file(parts), wrong, Compression::Zstd)).await;
        assert!(
            matches!(out, Err(BodyError::FileHashMismatch { .. })),
            "{out:?}"
        );

        let plain = collect(nar_of_file(
            file(vec![content.clone()]),
            Sha256Hash::of(&content),
            Compression::None,
        ))
        .await;
        assert_eq!(plain.unwrap(), content);
    }

    #[tokio::test]
    async fn corrupt_data_is_a_decompression_error() {
        let junk = b"definitely not zstd".to_vec();
        let out = collect(nar_of_file(
            file(vec![junk.clone()]),
            Sha256Hash::of(&junk),
            Compression::Zstd,
        ))
        .await;
        assert!(matches!(out, Err(BodyError::Decompress(_))), "{out:?}");
        let out = collect(nar_of_file(
            file(vec![junk.clone()]),
            Sha256Hash::of(&junk),
            Compression::Xz,
        ))
        .await;
        assert!(matches!(out, Err(BodyError::Decompress(_))), "{out:?}");
    }

    #[tokio::test]
    async fn xz_round_trip() {
        let content = b"xz content ".repeat(500);
        let xz = std::process::Command::new("xz")
            .args(["-z", "-c"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                child.stdin.take().unwrap().write_all(&content)?;
                child.wait_with_output()
            });
        let Ok(output) = xz else {
            panic!("xz (xz-utils) is needed for this test");
        };
        let out = collect(nar_of_file(
            file(vec![output.stdout.clone()]),
            Sha256Hash::of(&output.stdout),
            Compression::Xz,
        ))
        .await;
        assert_eq!(out.unwrap(), content);
    }
}
