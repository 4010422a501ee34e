//! Set-up shared by the server's integration tests: the two deployments
//! that matter (SQLite + local disk, Postgres + S3) and a running server.

#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::path::Path;
use std::sync::Arc;

use garret_meta::testing::PgCluster;
use garret_meta::{Meta, NewCache};
use garret_nix::signing::SigningKey;
use garret_server::auth::TokenAuthority;
use garret_server::blobs::Blobs;
use garret_server::config::Limits;
use garret_server::http::{AppState, router};
use garret_store::testing::S3TestServer;
use garret_store::{Backend, ChunkStore, FsBackend, S3Backend, StoreConfig};

/// The embedded deployment in `dir`: SQLite plus chunks on local disk.
pub async fn sqlite_fs_blobs(dir: &Path) -> Blobs {
    let meta = Meta::connect(&format!("sqlite:{}", dir.join("garret.db").display()))
        .await
        .unwrap();
    meta.migrate().await.unwrap();
    let backend = Backend::Fs(FsBackend::new(dir.join("chunks")).unwrap());
    Blobs::new(ChunkStore::new(backend, StoreConfig::default()), meta)
}

/// The production deployment: a fresh database on the shared throwaway
/// Postgres 15 cluster and an s3s-fs server (SigV4 over loopback) in `dir`.
/// The S3 server lives as long as the returned handle.
pub async fn postgres_s3_blobs(dir: &Path) -> (Blobs, S3TestServer) {
    let meta = Meta::connect(&PgCluster::shared().fresh_database().await)
        .await
        .unwrap();
    meta.migrate().await.unwrap();
    let s3 = S3TestServer::start(&dir.join("s3"), "garret").await.unwrap();
    let backend = Backend::S3(S3Backend::new(&s3.config).unwrap());
    (
        Blobs::new(ChunkStore::new(backend, StoreConfig::default()), meta),
        s3,
    )
}

/// Which deployment a server runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deployment {
    SqliteFs,
    PostgresS3,
}

/// A running `garret` HTTP server on 127.0.0.1 with an HS256 token authority.
pub struct TestServer {
    /// `http://127.0.0.1:<port>`, no trailing slash.
    pub url: String,
    pub state: Arc<AppState>,
    pub tokens: TokenAuthority,
    pub dir: tempfile::TempDir,
    _s3: Option<S3TestServer>,
}

/// A fixed 64-byte secret, base64: tests mint tokens with `TestServer::tokens`.
pub const TEST_SECRET_BASE64: &str =
    "Z2FycmV0LXRlc3Qtc2VjcmV0LWdhcnJldC10ZXN0LXNlY3JldC1nYXJyZXQtdGVzdC1zZWNyZXQtISEhIQ==";

impl TestServer {
    pub async fn start(deployment: Deployment) -> Self {
        Self::start_with(deployment, Limits::default()).await
    }

    pub async fn start_with(deployment: Deployment, limits: Limits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (blobs, s3) = match deployment {
            Deployment::SqliteFs => (sqlite_fs_blobs(dir.path()).await, None),
            Deployment::PostgresS3 => {
                let (blobs, s3) = postgres_s3_blobs(dir.path()).await;
                (blobs, Some(s3))
            }
        };
        let tokens = TokenAuthority::hs256_base64(TEST_SECRET_BASE64).unwrap();
        let state = Arc::new(AppState {
            meta: blobs.meta().clone(),
            blobs,
            tokens: Some(TokenAuthority::hs256_base64(TEST_SECRET_BASE64).unwrap()),
            limits,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = router(Arc::clone(&state));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            url,
            state,
            tokens,
            dir,
            _s3: s3,
        }
    }

    /// Creates a cache directly in the metadata, signed by `key`.
    pub async fn create_cache(&self, name: &str, public: bool, key: &SigningKey) {
        let new = NewCache {
            name: name.into(),
            is_public: public,
            store_dir: "/nix/store".into(),
            priority: 41,
            signing_key: key.to_secret_string(),
            upstream_cache_key_names: vec![],
            retention_period: None,
        };
        self.state.meta.create_cache(&new, 0).await.unwrap();
    }
}
