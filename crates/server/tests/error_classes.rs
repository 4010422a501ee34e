//! Each cause of failure is answered in the same class on Bazel's HTTP
//! cache (`/cas/`) and on REAPI gRPC, as `error::Error::class` says, and no
//! database or object-store text reaches a client.

mod common;

use bytes::Bytes;
use common::grpc::{hex, with_token};
use common::{Deployment, TestServer};
use futures::stream;
use garret_nix::signing::SigningKey;
use garret_proto::bytestream::byte_stream_client::ByteStreamClient;
use garret_proto::bytestream::{ReadRequest, WriteRequest};
use garret_server::auth::{AuthError, CacheName, Permission, Requester};
use garret_server::config::Limits;
use garret_server::error::{Class, Error};
use tonic::Request;
use tonic::transport::Channel;

/// The largest blob the server under test accepts.
const LIMIT: u64 = 1024;

/// Words that would betray the database or the object store.
const INTERNALS: &[&str] = &[
    "sqlx", "SQL", "sql", "database", "Database", "pool", "S3", "s3", "bucket", "dispatch",
];

/// Both front ends of one server: the HTTP port also serves gRPC (h2c).
struct Fronts {
    server: TestServer,
    http: reqwest::Client,
    grpc: Channel,
    /// Pull and push on every cache.
    token: String,
    /// Pull only.
    reader: String,
}

/// One answer of each front end.
#[derive(Debug)]
struct Answers {
    status: reqwest::StatusCode,
    body: String,
    grpc: tonic::Status,
}

impl Fronts {
    async fn start(deployment: Deployment) -> Self {
        let server = TestServer::start_with(
            deployment,
            Limits {
                max_nar_size: LIMIT,
                ..Limits::default()
            },
        )
        .await;
        let key = SigningKey::generate("main-1").unwrap();
        server.create_cache("main", false, &key).await;
        let grpc = Channel::from_shared(server.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let token = server.token(&[("*", Permission::PULL.union(Permission::PUSH))]);
        let reader = server.token(&[("*", Permission::PULL)]);
        Self {
            server,
            http: reqwest::Client::new(),
            grpc,
            token,
            reader,
        }
    }

    fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.grpc.clone())
    }

    fn request<T>(message: T, token: Option<&str>) -> Request<T> {
        match token {
            Some(token) => with_token(message, token),
            None => Request::new(message),
        }
    }

    /// GET `/main/cas/<hash>` and a ByteStream Read of `main/blobs/<hash>/<size>`.
    async fn read(&self, hash: &str, size: u64, token: Option<&str>) -> Answers {
        let mut get = self
            .http
            .get(format!("{}/main/cas/{hash}", self.server.url));
        if let Some(token) = token {
            get = get.bearer_auth(token);
        }
        let response = get.send().await.unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        let read = async {
            let mut stream = self
                .bytestream()
                .read(Self::request(
                    ReadRequest {
                        resource_name: format!("main/blobs/{hash}/{size}"),
                        read_offset: 0,
                        read_limit: 0,
                    },
                    token,
                ))
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        };
        let grpc = read.await.expect_err("the read must fail");
        Answers { status, body, grpc }
    }

    /// PUT `/main/cas/<hash>` and a ByteStream Write of `data` as
    /// `main/uploads/u/blobs/<hash>/<size>`.
    async fn write(&self, hash: &str, size: u64, data: &[u8], token: Option<&str>) -> Answers {
        let mut put = self
            .http
            .put(format!("{}/main/cas/{hash}", self.server.url))
            .body(data.to_vec());
        if let Some(token) = token {
            put = put.bearer_auth(token);
        }
        let response = put.send().await.unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        let message = WriteRequest {
            resource_name: format!("main/uploads/u/blobs/{hash}/{size}"),
            write_offset: 0,
            finish_write: true,
            data: Bytes::copy_from_slice(data),
        };
        let grpc = self
            .bytestream()
            .write(Self::request(stream::iter(vec![message]), token))
            .await
            .expect_err("the write must fail");
        Answers { status, body, grpc }
    }
}

/// Asserts both answers are in `class`, and tell no internals.
fn assert_class(cause: &str, answers: &Answers, class: Class) {
    assert_eq!(
        (answers.status.as_u16(), answers.grpc.code()),
        (class.status.as_u16(), class.code),
        "{cause}: {answers:?}"
    );
    let json: serde_json::Value = serde_json::from_str(&answers.body)
        .unwrap_or_else(|e| panic!("{cause}: not Attic's JSON ({e}): {}", answers.body));
    assert_eq!(json["error"], class.kind, "{cause}: {json}");
    assert_eq!(json["code"], class.status.as_u16(), "{cause}: {json}");
    for text in [
        json["message"].as_str().unwrap_or_default(),
        answers.grpc.message(),
    ] {
        for word in INTERNALS {
            assert!(
                !text.contains(word),
                "{cause}: {word:?} reached the client: {text}"
            );
        }
    }
}

fn internal() -> Class {
    Error::Internal(String::new()).class()
}

async fn causes_are_classed_alike(deployment: Deployment) {
    let f = Fronts::start(deployment).await;
    let token = Some(f.token.as_str());
    let data = b"some blob content".as_slice();
    let size = data.len() as u64;
    let hash = hex(data);

    let invalid = Error::InvalidArgument(String::new()).class();
    for bad in ["xyz".to_owned(), "g".repeat(64), hash.to_uppercase()] {
        let answers = f.read(&bad, size, token).await;
        assert_class(&format!("invalid digest {bad}"), &answers, invalid);
    }

    let absent = hex(b"absent");
    let answers = f.read(&absent, 6, token).await;
    assert_class(
        "missing blob",
        &answers,
        Error::NotFound(String::new()).class(),
    );

    let unauthorized = Error::Auth(AuthError::Unauthorized {
        cache: CacheName::new("main").unwrap(),
        requester: Requester::Anonymous,
    });
    let answers = f.read(&hash, size, None).await;
    assert_class(
        "anonymous on a private cache",
        &answers,
        unauthorized.class(),
    );

    let forbidden = Error::Auth(AuthError::Forbidden {
        cache: CacheName::new("main").unwrap(),
        missing: Permission::PUSH,
        requester: Requester::Anonymous,
    });
    let answers = f.write(&hash, size, data, Some(&f.reader)).await;
    assert_class("a reader writes", &answers, forbidden.class());

    let other = b"other blob content";
    let lie = b"other blob CONTENT";
    let answers = f.write(&hex(other), other.len() as u64, lie, token).await;
    assert_class("digest mismatch", &answers, invalid);

    let large = vec![7u8; usize::try_from(LIMIT).unwrap() + 1];
    let answers = f
        .write(&hex(&large), large.len() as u64, &large, token)
        .await;
    assert_class(
        "too large",
        &answers,
        Error::PayloadTooLarge(String::new()).class(),
    );

    // A stored blob whose chunks are gone from storage.
    let stored = f
        .http
        .put(format!("{}/main/cas/{hash}", f.server.url))
        .bearer_auth(&f.token)
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert!(stored.status().is_success(), "{stored:?}");
    for file in f.server.storage_files() {
        std::fs::remove_file(file).unwrap();
    }
    let answers = f.read(&hash, size, token).await;
    assert_class(
        "a missing store object",
        &answers,
        Error::IncompleteObject(String::new()).class(),
    );

    // The object store itself fails (its bucket is a file, not a directory).
    if deployment == Deployment::PostgresS3 {
        let bucket = f.server.dir.path().join("s3/garret");
        std::fs::remove_dir_all(&bucket).unwrap();
        std::fs::write(&bucket, b"").unwrap();
        let answers = f.write(&hex(other), other.len() as u64, other, token).await;
        assert_class("the object store fails", &answers, internal());
    }

    // The database fails: every request needs it to find the cache.
    f.server.state.meta.close().await;
    let answers = f.read(&hash, size, token).await;
    assert_class("the database fails", &answers, internal());
    assert!(
        answers
            .grpc
            .message()
            .contains("see the server log, request "),
        "{answers:?}"
    );
}

#[tokio::test]
async fn causes_are_classed_alike_on_sqlite_and_fs() {
    causes_are_classed_alike(Deployment::SqliteFs).await;
}

#[tokio::test]
async fn causes_are_classed_alike_on_postgres_and_s3() {
    causes_are_classed_alike(Deployment::PostgresS3).await;
}
