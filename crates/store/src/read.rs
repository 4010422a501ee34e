//! The read path: fetch chunks ahead of the reader, in order, and cut the
//! requested range out of the first and last one.

use std::ops::Range;

use bytes::Bytes;
use futures::{Stream, StreamExt, stream};

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

    fn read_view(
        &self,
        chunks: Vec<ChunkRef>,
        range: Range<u64>,
        view: View,
    ) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static {
        let backend = self.backend.clone();
        let selected = range.clone();
        let wanted = chunks.into_iter().filter(move |c| {
            let span = view.span(c);
            span.start < selected.end && selected.start < span.end && !span.is_empty()
        });
        stream::iter(wanted)
            .map(move |chunk| {
                let backend = backend.clone();
                async move {
                    let frame = backend
                        .get(&chunk.id.object_key())
                        .await
                        .map_err(|e| StoreError::from_backend(chunk.id, e))?;
                    if frame.len() != chunk.stored_size as usize {
                        return Err(StoreError::Corrupt {
                            id: chunk.id,
                            reason: format!(
                                "stored frame is {} bytes, expected {}",
                                frame.len(),
                                chunk.stored_size
                            ),
                        });
                    }
                    let bytes = match view {
                        View::Frames => frame,
                        View::Content => tokio::task::spawn_blocking(move || {
                            codec::decompress(&frame, chunk.size as usize)
                        })
                        .await?
                        .map_err(|e| StoreError::Corrupt {
                            id: chunk.id,
                            reason: e.to_string(),
                        })?,
                    };
                    Ok((view.span(&chunk), bytes))
                }
            })
            .buffered(self.config.read_prefetch)
            .map(move |fetched| {
                let (span, bytes) = fetched?;
                let start = range.start.saturating_sub(span.start);
                let end = range.end.min(span.end) - span.start;
                // Both bounds are within one chunk, so they fit in usize.
                Ok(bytes.slice(usize::try_from(start).unwrap()..usize::try_from(end).unwrap()))
            })
    }
}
