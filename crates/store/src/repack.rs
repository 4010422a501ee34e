//! Copying chunks into new packs, for GC: a pack whose live chunks are few
//! is rewritten so that the space of its dead frames can be freed.

use futures::StreamExt as _;

use crate::pack::Packer;
use crate::{ChunkHash, ChunkPlace, ChunkRef, ChunkStore, ObjectStore, PackInfo, StoreError};

/// What [`ChunkStore::repack`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repacked {
    /// New packs, durable, not yet recorded: the caller records them with
    /// the chunks' new places, or discards them.
    pub packs: Vec<PackInfo>,
    /// Each copied chunk's new place, in the order given.
    pub places: Vec<(ChunkHash, ChunkPlace)>,
}

impl<B: ObjectStore + Clone + 'static> ChunkStore<B> {
    /// Copies the stored frames of `chunks` into new packs, each frame
    /// checked against its hash on the way (a pack is read in runs, as a
    /// download reads it). Fails, leaving nothing behind, if a frame is
    /// missing or corrupt: the caller then keeps the old pack and reports
    /// it.
    pub async fn repack(&self, chunks: Vec<ChunkRef>) -> Result<Repacked, StoreError> {
        let mut packer = Packer::new(self.backend.clone(), self.config.pack_size);
        let mut places = Vec::with_capacity(chunks.len());
        let mut frames = self.fetch(chunks, false);
        let copied: Result<(), StoreError> = async {
            while let Some(fetched) = frames.next().await {
                let fetched = fetched?;
                places.push((fetched.chunk.id, packer.append(fetched.frame).await?));
            }
            Ok(())
        }
        .await;
        let packs = match copied {
            Ok(()) => packer.flush().await,
            Err(e) => Err(e),
        };
        match packs {
            Ok(packs) => Ok(Repacked { packs, places }),
            Err(e) => {
                packer.discard().await;
                Err(e)
            }
        }
    }
}
