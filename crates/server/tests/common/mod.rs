//! Set-up shared by the server's integration tests.

use std::path::Path;

use garret_meta::Meta;
use garret_server::blobs::Blobs;
use garret_store::{Backend, ChunkStore, FsBackend, StoreConfig};

/// The embedded deployment in `dir`: SQLite plus chunks on local disk.
pub async fn sqlite_fs_blobs(dir: &Path) -> Blobs {
    let meta = Meta::connect(&format!("sqlite:{}", dir.join("garret.db").display()))
        .await
        .unwrap();
    meta.migrate().await.unwrap();
    let backend = Backend::Fs(FsBackend::new(dir.join("chunks")).unwrap());
    Blobs::new(ChunkStore::new(backend, StoreConfig::default()), meta)
}
