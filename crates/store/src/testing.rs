//! Real parts for tests: an S3 protocol server on loopback and an in-memory
//! chunk index. Compiled only for tests and the `testing` feature.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use futures::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

use crate::error::BoxError;
use crate::{ChunkHash, ChunkIndex, Manifest, S3Config, StoredFrame};

const ACCESS_KEY: &str = "garret-test-access";
const SECRET_KEY: &str = "garret-test-secret-key";

/// An s3s-fs server over loopback HTTP with SigV4 auth, serving `root`. It
/// serves until [`S3TestServer::stop`] or until the tokio runtime that
/// started it shuts down, whether or not the handle is kept.
#[derive(Debug)]
pub struct S3TestServer {
    pub config: S3Config,
    root: std::path::PathBuf,
    addr: std::net::SocketAddr,
    /// Accepts connections and owns their tasks: aborting it closes them all.
    serving: Option<tokio::task::JoinHandle<()>>,
}

impl S3TestServer {
    /// Starts the server with one bucket, `bucket`.
    pub async fn start(root: &Path, bucket: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(root.join(bucket))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut server = Self {
            config: S3Config {
                endpoint: Some(format!("http://{addr}")),
                bucket: bucket.to_owned(),
                access_key_id: Some(ACCESS_KEY.into()),
                secret_access_key: Some(SECRET_KEY.into()),
                max_attempts: 2,
                ..S3Config::default()
            },
            root: root.to_owned(),
            addr,
            serving: None,
        };
        server.serve(listener)?;
        Ok(server)
    }

    /// Stops serving and closes every connection, as an outage would.
    pub fn stop(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.abort();
        }
    }

    /// Serves again, at the same address and with the same objects.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        self.serve(listener)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let fs = s3s_fs::FileSystem::new(&self.root)
            .map_err(|e| std::io::Error::other(format!("s3s-fs: {e:?}")))?;
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        self.serving = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((socket, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                let _ = socket.set_nodelay(true);
                let service = service.clone();
                connections.spawn(async move {
                    let _ = ConnBuilder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        }));
        Ok(())
    }
}

/// A chunk index held in memory, standing in for the metadata layer in
/// store-only tests.
#[derive(Debug, Default)]
pub struct MemoryIndex {
    chunks: Mutex<HashMap<ChunkHash, StoredFrame>>,
}

impl MemoryIndex {
    /// Records a manifest's chunks, as committing it to the metadata would:
    /// a chunk recorded already keeps the copy recorded first.
    pub fn commit(&self, manifest: &Manifest) {
        let mut chunks = self.chunks.lock().unwrap();
        for chunk in &manifest.chunks {
            chunks.entry(chunk.id).or_insert(StoredFrame {
                hash: chunk.frame_hash,
                size: chunk.stored_size,
                place: chunk.place,
            });
        }
    }

    pub fn len(&self) -> usize {
        self.chunks.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ChunkIndex for MemoryIndex {
    async fn lookup(&self, ids: &[ChunkHash]) -> Result<HashMap<ChunkHash, StoredFrame>, BoxError> {
        let chunks = self.chunks.lock().unwrap();
        Ok(ids
            .iter()
            .filter_map(|id| chunks.get(id).map(|h| (*id, *h)))
            .collect())
    }
}

/// An xorshift sequence: cheap, deterministic, and without a short period.
fn xorshift(seed: u64) -> impl Iterator<Item = u64> {
    let mut state = seed | 1;
    std::iter::repeat_with(move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    })
}

/// Deterministic bytes that compress about 2:1 (16 symbols of noise), so tests
/// exercise real compression without storing much.
pub fn text(len: usize, seed: u64) -> Vec<u8> {
    xorshift(seed)
        .take(len)
        .map(|x| b"abcdefghijklmnop"[usize::try_from(x % 16).expect("below 16")])
        .collect()
}

/// Deterministic bytes that do not compress, like build outputs, the same
/// for the same seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    xorshift(seed)
        .take(len)
        .map(|x| x.to_le_bytes()[0])
        .collect()
}

/// `bytes` as a body stream in uneven pieces, as a network body arrives.
pub fn body(bytes: &[u8]) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + use<> {
    let pieces: Vec<_> = bytes
        .chunks(7919)
        .map(Bytes::copy_from_slice)
        .map(Ok)
        .collect();
    futures::stream::iter(pieces)
}
