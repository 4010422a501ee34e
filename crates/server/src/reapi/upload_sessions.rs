//! Resumable ByteStream uploads, with their state in the metadata database.
//!
//! An upload's bytes go straight into the chunk ingest; nothing is spooled.
//! Every `checkpoint_bytes` ([`UploadSettings`]) of durable chunks, and once
//! more when the client's stream breaks, the chunks so far and the offset
//! they cover are recorded in the upload's session (`upload_sessions`).
//! `QueryWriteStatus` on any replica reports that offset, and a Write that
//! continues there, on any replica, reads the recorded chunks back to
//! restore the blob's hashes and goes on.
//!
//! A Write takes its session over (the metadata bumps its generation), so a
//! writer on another replica, stalled or dead, can no longer record into
//! it: its next record fails with ABORTED. Sessions expire after
//! its `session_ttl` without a record; a periodic sweep
//! deletes them, and their chunks, unreferenced, go to garbage collection.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use garret_meta::{CacheId, Meta, UploadSession};
use garret_store::{Checkpoint, ChunkHash, ChunkRef, PackInfo};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::blobs::{chunk_ref, new_chunk_ref, new_packs};
use crate::clock::unix_now;
use crate::config::UploadSettings;
use crate::error::Error;

/// How often expired sessions are swept (by every replica; the delete is
/// idempotent).
const SWEEP_INTERVAL: Duration = Duration::from_mins(1);

/// Sessions deleted per sweep statement.
const SWEEP_BATCH: u32 = 1000;

/// The uploads of one REAPI core: the slots of live Writes and the sweep of
/// expired sessions, which stops when the core is dropped.
#[derive(Debug)]
pub(crate) struct Uploads {
    meta: Meta,
    settings: UploadSettings,
    live: Arc<Semaphore>,
    _sweeper: DropGuard,
}

impl Uploads {
    pub(crate) fn start(meta: Meta, settings: UploadSettings) -> Self {
        let stop = CancellationToken::new();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep_periodically(meta.clone(), stop.clone()));
        }
        Self {
            meta,
            settings,
            live: Arc::new(Semaphore::new(settings.max_live_writes.max(1))),
            _sweeper: stop.drop_guard(),
        }
    }

    /// A slot for one live Write, waiting at most `patience` for one.
    pub(crate) async fn slot(&self, patience: Duration) -> Result<OwnedSemaphorePermit, Error> {
        match tokio::time::timeout(patience, Arc::clone(&self.live).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Error::ResourceExhausted(format!(
                "{} uploads are streaming into this server; retry later",
                self.settings.max_live_writes
            ))),
        }
    }

    /// Takes the session of `resource` in `cache` over for a Write starting
    /// at `offset`: 0 starts it afresh, anything else must be where the
    /// session's record ends.
    pub(crate) async fn claim(
        &self,
        cache: CacheId,
        resource: &str,
        offset: u64,
    ) -> Result<Session, Error> {
        let now = unix_now();
        if offset > 0 {
            // Refused before a session is made for an upload never started.
            let held = self.meta.upload_status(cache, resource, now).await?;
            if held != Some(offset) {
                return Err(out_of_range(offset, held.unwrap_or(0)));
            }
        }
        let session = self
            .meta
            .claim_upload(cache, resource, offset == 0, now, self.expiry(now))
            .await?;
        if session.committed_size != offset {
            // GC took a chunk of the session meanwhile, which emptied it.
            return Err(out_of_range(offset, session.committed_size));
        }
        Session::new(self, &session)
    }

    /// Bytes of `resource` recorded durable, for QueryWriteStatus.
    pub(crate) async fn committed(&self, cache: CacheId, resource: &str) -> Result<u64, Error> {
        Ok(self
            .meta
            .upload_status(cache, resource, unix_now())
            .await?
            .unwrap_or(0))
    }

    fn expiry(&self, now: i64) -> i64 {
        now.saturating_add(self.settings.ttl_secs())
    }
}

impl UploadSettings {
    fn ttl_secs(&self) -> i64 {
        i64::try_from(self.session_ttl.as_secs()).unwrap_or(i64::MAX)
    }
}

fn out_of_range(offset: u64, held: u64) -> Error {
    Error::OutOfRange(format!(
        "write_offset {offset} does not resume this upload (the server holds {held} bytes); \
         ask QueryWriteStatus"
    ))
}

/// One Write's hold on its upload session.
#[derive(Debug)]
pub(crate) struct Session {
    meta: Meta,
    id: garret_meta::UploadSessionId,
    generation: i64,
    /// Seconds a record keeps the session alive.
    ttl: i64,
    interval: u64,
    /// The chunks earlier attempts recorded, in order.
    prefix: Vec<ChunkRef>,
}

impl Session {
    fn new(uploads: &Uploads, session: &UploadSession) -> Result<Self, Error> {
        let prefix = session
            .chunks
            .iter()
            .map(chunk_ref)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            meta: uploads.meta.clone(),
            id: session.id,
            generation: session.generation,
            ttl: uploads.settings.ttl_secs(),
            interval: uploads.settings.checkpoint_bytes,
            prefix,
        })
    }

    /// The recorded chunks the Write continues, handed to the ingest.
    pub(crate) fn take_prefix(&mut self) -> Vec<ChunkRef> {
        std::mem::take(&mut self.prefix)
    }

    /// Ends the session: the blob is committed, or the upload cannot be
    /// resumed (its data did not match its digest). A session another
    /// Write took over meanwhile is that Write's to end.
    pub(crate) async fn finish(self) {
        if let Err(e) = self.meta.finish_upload(self.id, self.generation).await {
            tracing::warn!(error = %e, "could not end an upload session; it expires");
        }
    }
}

impl Checkpoint for Session {
    fn interval(&self) -> u64 {
        self.interval
    }

    async fn record(
        &self,
        chunks: &[ChunkRef],
        uploaded: &HashSet<ChunkHash>,
        packs: &[PackInfo],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let rows: Vec<_> = chunks
            .iter()
            .map(|c| new_chunk_ref(c, uploaded.contains(&c.id)))
            .collect();
        let now = unix_now();
        self.meta
            .checkpoint_upload(
                self.id,
                self.generation,
                &rows,
                &new_packs(packs),
                now,
                now.saturating_add(self.ttl),
            )
            .await?;
        tracing::debug!(
            chunks = rows.len(),
            end = chunks.last().map_or(0, ChunkRef::end),
            "upload progress recorded"
        );
        Ok(())
    }
}

async fn sweep_periodically(meta: Meta, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
        match meta.expire_uploads(unix_now(), SWEEP_BATCH).await {
            Ok(0) => {}
            Ok(swept) => tracing::debug!(swept, "expired upload sessions removed"),
            Err(e) => tracing::warn!(error = %e, "could not sweep expired upload sessions"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn live_writes_wait_for_a_slot_within_their_patience() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("garret.db").display());
        let meta = Meta::connect(&url).await.unwrap();
        let uploads = Uploads::start(
            meta,
            UploadSettings {
                max_live_writes: 1,
                ..UploadSettings::default()
            },
        );
        let held = uploads.slot(Duration::ZERO).await.unwrap();
        let refused = uploads.slot(Duration::ZERO).await.unwrap_err();
        assert_eq!(refused.class().code, tonic::Code::ResourceExhausted);
        drop(held);
        let _again = uploads.slot(Duration::ZERO).await.unwrap();
    }
}
