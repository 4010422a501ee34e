//! The read path: chunks whose frames lie next to each other in one pack are
//! fetched with one ranged read, runs are fetched ahead of the reader, every
//! frame is checked against its hash, and the requested range is cut out of
//! the first and last chunk.

use std::ops::Range;

use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use garret_nix::Sha256Hash;

use crate::{ChunkRef, ChunkStore, ObjectStore, StoreError, codec};

/// Which bytes of the blob a read covers: uncompressed content, or the stored
/// frames as one file (what a zstd-capable client downloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    Content,
    Frames,
}

impl View {
    fn span(self, chunk: &ChunkRef) -> Range<u64> {
        match self {
            Self::Content => chunk.offset..chunk.end(),
            Self::Frames => chunk.file_offset..chunk.file_end(),
        }
    }
}

/// Chunks whose frames follow each other in one object: one ranged read.
#[derive(Debug)]
struct Run {
    key: String,
    range: Range<u64>,
    chunks: Vec<ChunkRef>,
}

/// A chunk's checked frame, and its content when asked for.
pub(crate) struct Fetched {
    pub(crate) chunk: ChunkRef,
    pub(crate) frame: Bytes,
    pub(crate) content: Option<Bytes>,
}

/// Groups chunks, in order, into runs of at most `max_bytes` (or one chunk,
/// whatever its size). Chunks stored as objects of their own are runs of
/// one; chunks of a pack join the run before them when their frame starts
/// where its range ends.
fn runs(chunks: impl IntoIterator<Item = ChunkRef>, max_bytes: u64) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for chunk in chunks {
        let range = chunk.object_range();
        if let Some(run) = runs.last_mut()
            && chunk.pack().is_some()
            && run.chunks[0].pack() == chunk.pack()
            && run.range.end == range.start
            && range.end - run.range.start <= max_bytes
        {
            run.range.end = range.end;
            run.chunks.push(chunk);
            continue;
        }
        runs.push(Run {
            key: chunk.object_key(),
            range,
            chunks: vec![chunk],
        });
    }
    runs
}

/// Fetches a run with one ranged read and checks every frame in it against
/// its recorded hash (and decompresses it, if `decompress`), on the
/// blocking pool. A pack cut short or a frame that fails its hash is an
/// error for the chunk concerned, before any of the run is handed on.
async fn fetch_run<B: ObjectStore>(
    backend: B,
    run: Run,
    decompress: bool,
) -> Result<Vec<Fetched>, StoreError> {
    let first = run.chunks[0].id;
    let data = backend
        .get_range(&run.key, run.range.clone())
        .await
        .map_err(|e| StoreError::from_backend(first, e))?;
    tokio::task::spawn_blocking(move || {
        let mut at = 0;
        run.chunks
            .into_iter()
            .map(|chunk| {
                let len = chunk.stored_size as usize;
                let frame = data.slice(at..at + len);
                at += len;
                if Sha256Hash::of(&frame) != chunk.frame_hash {
                    return Err(StoreError::Corrupt {
                        id: chunk.id,
                        reason: "stored frame does not match its recorded hash".into(),
                    });
                }
                let content = if decompress {
                    let data = codec::decompress(&frame, chunk.size as usize).map_err(|e| {
                        StoreError::Corrupt {
                            id: chunk.id,
                            reason: e.to_string(),
                        }
                    })?;
                    Some(data)
                } else {
                    None
                };
                Ok(Fetched {
                    chunk,
                    frame,
                    content,
                })
            })
            .collect()
    })
    .await?
}

/// Fetches and checks one chunk's frame.
pub(crate) async fn fetch_verified<B: ObjectStore>(
    backend: B,
    chunk: &ChunkRef,
) -> Result<Bytes, StoreError> {
    let run = Run {
        key: chunk.object_key(),
        range: chunk.object_range(),
        chunks: vec![*chunk],
    };
    let mut fetched = fetch_run(backend, run, false).await?;
    Ok(fetched.pop().expect("one chunk, one frame").frame)
}

impl<B: ObjectStore + Clone + 'static> ChunkStore<B> {
    /// Streams `range` of the blob's uncompressed content.
    ///
    /// `chunks` must be in blob order and may be just the ones overlapping
    /// `range` (the metadata layer can select them by offset). A chunk missing
    /// from the backend ends the stream with [`StoreError::MissingChunk`]:
    /// callers must treat that as a failed transfer, never as end of data.
    pub fn read(
        &self,
        chunks: Vec<ChunkRef>,
        range: Range<u64>,
    ) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static {
        self.read_view(chunks, range, View::Content)
    }

    /// Streams `range` of the concatenated stored frames, unchanged: a valid
    /// zstd stream when the range is whole.
    pub fn read_frames(
        &self,
        chunks: Vec<ChunkRef>,
        range: Range<u64>,
    ) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static {
        self.read_view(chunks, range, View::Frames)
    }

    /// The checked frames of `chunks`, in order, with their content if
    /// `decompress`: runs fetched ahead, a bounded number at a time.
    pub(crate) fn fetch(
        &self,
        chunks: impl IntoIterator<Item = ChunkRef>,
        decompress: bool,
    ) -> impl Stream<Item = Result<Fetched, StoreError>> + Send + 'static {
        let backend = self.backend.clone();
        let runs = runs(chunks, self.config.read_run_bytes);
        stream::iter(runs)
            .map(move |run| fetch_run(backend.clone(), run, decompress))
            .buffered(self.config.read_prefetch.max(1))
            .flat_map(|fetched| {
                let items: Vec<Result<Fetched, StoreError>> = match fetched {
                    Ok(all) => all.into_iter().map(Ok).collect(),
                    Err(e) => vec![Err(e)],
                };
                stream::iter(items)
            })
    }

    fn read_view(
        &self,
        chunks: Vec<ChunkRef>,
        range: Range<u64>,
        view: View,
    ) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static {
        let selected = range.clone();
        let wanted: Vec<ChunkRef> = chunks
            .into_iter()
            .filter(move |c| {
                let span = view.span(c);
                span.start < selected.end && selected.start < span.end && !span.is_empty()
            })
            .collect();
        self.fetch(wanted, view == View::Content)
            .map(move |fetched| {
                let fetched = fetched?;
                let span = view.span(&fetched.chunk);
                let bytes = fetched.content.unwrap_or(fetched.frame);
                let start = range.start.saturating_sub(span.start);
                let end = range.end.min(span.end) - span.start;
                // Both bounds are within one chunk, so they fit in usize.
                Ok(bytes.slice(usize::try_from(start).unwrap()..usize::try_from(end).unwrap()))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChunkHash, ChunkPlace, PackId};

    fn chunk(n: u8, place: ChunkPlace, stored_size: u32) -> ChunkRef {
        ChunkRef {
            id: ChunkHash(Sha256Hash::of(&[n])),
            offset: 0,
            size: 100,
            file_offset: 0,
            stored_size,
            frame_hash: Sha256Hash::of(&[n]),
            place,
        }
    }

    #[test]
    fn adjacent_frames_of_one_pack_coalesce_up_to_the_limit() {
        let (a, b) = (PackId([1; 16]), PackId([2; 16]));
        let at = |pack, offset| ChunkPlace::Pack { pack, offset };
        let chunks = [
            chunk(0, at(a, 0), 10),
            chunk(1, at(a, 10), 10),
            // A gap: a frame another writer's commit made redundant.
            chunk(2, at(a, 30), 10),
            chunk(3, at(b, 40), 10),
            chunk(4, ChunkPlace::Object, 10),
            chunk(5, ChunkPlace::Object, 10),
            chunk(6, at(b, 50), 10),
            chunk(7, at(b, 60), 10),
            chunk(8, at(b, 70), 10),
        ];
        let runs = runs(chunks, 25);
        let shape: Vec<(Range<u64>, usize)> = runs
            .iter()
            .map(|r| (r.range.clone(), r.chunks.len()))
            .collect();
        assert_eq!(
            shape,
            [
                (0..20, 2),
                (30..40, 1),
                (40..50, 1),
                (0..10, 1),
                (0..10, 1),
                (50..70, 2),
                (70..80, 1),
            ]
        );
        assert_eq!(runs[0].key, a.object_key());
        assert_eq!(runs[3].key, chunks[4].id.object_key());
    }
}
