//! A REAPI gRPC server for the REAPI tests (`reapi.rs`, `reapi_hostile.rs`)
//! and the client calls they share.

#![allow(
    clippy::cast_possible_wrap,
    reason = "sizes in these tests are a few MiB, and the wire uses i64"
)]

use bytes::Bytes;
use futures::stream;
use garret_nix::Sha256Hash;
use garret_nix::signing::SigningKey;
use garret_proto::bytestream::byte_stream_client::ByteStreamClient;
use garret_proto::bytestream::{ReadRequest, WriteRequest};
use garret_proto::reapi::action_cache_client::ActionCacheClient;
use garret_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use garret_proto::reapi::{
    BatchUpdateBlobsRequest, Digest, FindMissingBlobsRequest, batch_update_blobs_request,
};
use garret_server::auth::Permission;
use garret_server::config::UploadSettings;
use tonic::Request;
use tonic::transport::Channel;

use super::{Deployment, TestServer};

/// The REAPI gRPC services on 127.0.0.1, beside a [`TestServer`] on the
/// same state. The default instance is the private cache `main`; `pub` is
/// public. `token` may pull and push on both; requests without it are
/// anonymous.
pub struct GrpcServer {
    /// The HTTP server underneath: state, tokens, data directory, and the
    /// URL of the HTTP API (Bazel's `/ac/` and `/cas/` among it).
    pub http: TestServer,
    pub channel: Channel,
    pub token: String,
}

impl GrpcServer {
    pub async fn start(deployment: Deployment) -> Self {
        Self::start_with(deployment, None).await
    }

    /// With `uploads`, the server runs with those upload settings.
    pub async fn start_with(deployment: Deployment, uploads: Option<UploadSettings>) -> Self {
        Self::start_configured(deployment, |config| {
            if let Some(uploads) = uploads {
                config.uploads = uploads;
            }
        })
        .await
    }

    /// A server whose configuration `adjust` may change.
    pub async fn start_configured(
        deployment: Deployment,
        adjust: impl FnOnce(&mut garret_server::config::Config),
    ) -> Self {
        let http = TestServer::start_configured(deployment, |config| {
            config.bazel_default_cache = "main".into();
            adjust(config);
        })
        .await;
        for (name, public) in [("main", false), ("pub", true)] {
            let key = SigningKey::generate(&format!("{name}-1")).unwrap();
            http.create_cache(name, public, &key).await;
        }
        // gRPC (h2c) on the server's one port, as `garret serve` runs it.
        let channel = Channel::from_shared(http.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let token = http.token(&[("*", Permission::PULL.union(Permission::PUSH))]);
        Self {
            http,
            channel,
            token,
        }
    }

    /// `message` with `token`.
    pub fn req<T>(&self, message: T) -> Request<T> {
        with_token(message, &self.token)
    }

    pub fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        // Twice the server's own 4 MiB message bound.
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(8 << 20)
    }

    pub fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone())
    }

    pub fn ac(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel.clone())
    }

    /// Stores blobs in `main` through BatchUpdateBlobs, asserting success.
    pub async fn put(&self, blobs: &[&[u8]]) {
        let requests = blobs
            .iter()
            .map(|data| batch_update_blobs_request::Request {
                digest: Some(digest(data)),
                data: Bytes::copy_from_slice(data),
                compressor: 0,
            })
            .collect();
        let response = self
            .cas()
            .batch_update_blobs(self.req(BatchUpdateBlobsRequest {
                requests,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        for entry in response.responses {
            assert_eq!(entry.status.unwrap().code, 0, "{:?}", entry.digest);
        }
    }

    /// ByteStream Write to resource `name` in `pieces` messages of about
    /// equal size, returning the committed size.
    pub async fn write(
        &self,
        name: &str,
        data: &[u8],
        pieces: usize,
    ) -> Result<i64, tonic::Status> {
        let piece_bytes = data.len().div_ceil(pieces.max(1));
        self.write_pieces_of(name, data, piece_bytes).await
    }

    /// ByteStream Write to resource `name` in messages of `piece_bytes`
    /// (the last one shorter), returning the committed size.
    pub async fn write_pieces_of(
        &self,
        name: &str,
        data: &[u8],
        piece_bytes: usize,
    ) -> Result<i64, tonic::Status> {
        let mut messages: Vec<WriteRequest> = data
            .chunks(piece_bytes.max(1))
            .scan(0, |offset, chunk| {
                let message = WriteRequest {
                    resource_name: if *offset == 0 {
                        name.to_owned()
                    } else {
                        String::new()
                    },
                    write_offset: *offset,
                    finish_write: false,
                    data: Bytes::copy_from_slice(chunk),
                };
                *offset += chunk.len() as i64;
                Some(message)
            })
            .collect();
        if messages.is_empty() {
            messages.push(WriteRequest {
                resource_name: name.to_owned(),
                ..Default::default()
            });
        }
        messages.last_mut().unwrap().finish_write = true;
        self.bytestream()
            .write(self.req(stream::iter(messages)))
            .await
            .map(|r| r.into_inner().committed_size)
    }

    /// Stores a blob of any size in `instance` (`""`, or a name and a
    /// slash) through ByteStream in 1 MiB messages, asserting success.
    pub async fn store(&self, instance: &str, data: &[u8]) {
        let name = format!(
            "{instance}uploads/w/blobs/{}/{}",
            digest(data).hash,
            data.len()
        );
        self.write_pieces_of(&name, data, 1 << 20).await.unwrap();
    }

    /// ByteStream Write of `data` in one message with `token`, returning
    /// the committed size.
    pub async fn write_with(
        &self,
        token: &str,
        name: &str,
        data: &[u8],
    ) -> Result<i64, tonic::Status> {
        let message = WriteRequest {
            resource_name: name.to_owned(),
            write_offset: 0,
            finish_write: true,
            data: Bytes::copy_from_slice(data),
        };
        self.bytestream()
            .write(with_token(stream::iter(vec![message]), token))
            .await
            .map(|r| r.into_inner().committed_size)
    }

    /// ByteStream Read, all of it.
    pub async fn read(
        &self,
        name: &str,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<u8>, tonic::Status> {
        let mut stream = self
            .bytestream()
            .read(self.req(ReadRequest {
                resource_name: name.to_owned(),
                read_offset: offset,
                read_limit: limit,
            }))
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(message) = stream.message().await? {
            out.extend_from_slice(&message.data);
        }
        Ok(out)
    }

    /// The digests among `digests` that `main` lacks.
    pub async fn missing(&self, digests: &[Digest]) -> Vec<Digest> {
        self.try_missing(digests).await.unwrap()
    }

    /// FindMissingBlobs on `main`, which may fail.
    pub async fn try_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, tonic::Status> {
        let response = self
            .cas()
            .find_missing_blobs(self.req(FindMissingBlobsRequest {
                blob_digests: digests.to_vec(),
                ..Default::default()
            }))
            .await?;
        Ok(response.into_inner().missing_blob_digests)
    }
}

/// `message` with `token` as its bearer token.
pub fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// The SHA-256 of `data`, in hex.
pub fn hex(data: &[u8]) -> String {
    Sha256Hash::of(data).to_hex()
}

/// The REAPI digest of `data`.
pub fn digest(data: &[u8]) -> Digest {
    Digest {
        hash: hex(data),
        size_bytes: data.len() as i64,
    }
}

/// The digest of the empty blob.
pub const EMPTY_HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
