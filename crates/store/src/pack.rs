//! Packs being written: the new frames of one upload (or one batch of small
//! uploads) appended to objects of about [`crate::StoreConfig::pack_size`]
//! bytes, each made durable once rather than once per frame.

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use tokio::task::JoinHandle;

use crate::{ChunkPlace, ObjectStore, ObjectWriter, PackId, PackInfo, StoreError};

/// Sealed packs finishing at once. On S3 each holds its whole body in
/// memory until its PUT returns, so this bounds an upload's memory to about
/// this many packs plus the open one.
const SEALING: usize = 2;

/// The pack an upload is filling, and the ones it sealed since the last
/// [`Packer::flush`].
pub(crate) struct Packer<B: ObjectStore> {
    backend: B,
    target: u64,
    open: Option<OpenPack<B::Writer>>,
    sealing: FuturesUnordered<JoinHandle<Result<(), StoreError>>>,
    /// Packs sealed (or being sealed) since the last flush.
    sealed: Vec<PackInfo>,
}

struct OpenPack<W> {
    id: PackId,
    writer: W,
    size: u64,
}

impl<B: ObjectStore + Clone + 'static> Packer<B> {
    pub(crate) fn new(backend: B, target: u64) -> Self {
        Self {
            backend,
            target,
            open: None,
            sealing: FuturesUnordered::new(),
            sealed: Vec::new(),
        }
    }

    /// Appends a frame to the open pack (starting one if needed) and returns
    /// where it lands. The frame is durable only after the next
    /// [`Packer::flush`].
    pub(crate) async fn append(&mut self, frame: Bytes) -> Result<ChunkPlace, StoreError> {
        let open = match &mut self.open {
            Some(open) => open,
            empty @ None => {
                let id = PackId::random();
                let writer = self
                    .backend
                    .create(&id.object_key())
                    .await
                    .map_err(StoreError::Backend)?;
                empty.insert(OpenPack {
                    id,
                    writer,
                    size: 0,
                })
            }
        };
        let place = ChunkPlace::Pack {
            pack: open.id,
            offset: open.size,
        };
        open.size += frame.len() as u64;
        open.writer
            .write(frame)
            .await
            .map_err(StoreError::Backend)?;
        if open.size >= self.target {
            self.seal().await?;
        }
        Ok(place)
    }

    /// Finishes the open pack in the background, so the next one fills
    /// meanwhile.
    async fn seal(&mut self) -> Result<(), StoreError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        while self.sealing.len() >= SEALING {
            self.sealing.next().await.expect("sealing is not empty")??;
        }
        self.sealed.push(PackInfo {
            id: open.id,
            size: open.size,
        });
        self.sealing.push(tokio::spawn(async move {
            open.writer.finish().await.map_err(StoreError::Backend)
        }));
        Ok(())
    }

    /// Seals the open pack, waits for every sealed one and makes them all
    /// durable with one barrier. Returns the packs written since the last
    /// flush: the caller records them, or discards them.
    pub(crate) async fn flush(&mut self) -> Result<Vec<PackInfo>, StoreError> {
        self.seal().await?;
        while let Some(done) = self.sealing.next().await {
            done??;
        }
        let keys: Vec<String> = self.sealed.iter().map(|p| p.id.object_key()).collect();
        if !keys.is_empty() {
            self.backend
                .sync(&keys)
                .await
                .map_err(StoreError::Backend)?;
        }
        Ok(std::mem::take(&mut self.sealed))
    }

    /// Gives up on the packs since the last flush and deletes them.
    pub(crate) async fn discard(&mut self) {
        let packs = self.abandon().await;
        discard(&self.backend, &packs).await;
    }

    /// Gives up: the open pack is dropped (a backend leaves nothing of an
    /// unfinished object), and the packs sealed since the last flush are
    /// returned for deletion once their writes have settled.
    pub(crate) async fn abandon(&mut self) -> Vec<PackInfo> {
        self.open = None;
        while self.sealing.next().await.is_some() {}
        std::mem::take(&mut self.sealed)
    }
}

/// Deletes packs that no metadata names. A pack that cannot be deleted is
/// only an orphan for GC, so that is logged, not returned.
pub(crate) async fn discard<B: ObjectStore>(backend: &B, packs: &[PackInfo]) {
    for pack in packs {
        if let Err(error) = backend.delete(&pack.id.object_key()).await {
            tracing::warn!(pack = %pack.id, %error, "could not delete the pack of a failed upload; GC will");
        }
    }
}
