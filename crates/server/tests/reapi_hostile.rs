//! REAPI under hostile input (issue 10): each attack that was reproduced
//! against a running server gets a clear gRPC status, and nothing is
//! stored. The server runs in-process on SQLite + local disk; the limits
//! hit here are the server's own, so the storage deployment does not matter.

#![allow(
    clippy::cast_possible_wrap,
    clippy::cast_possible_truncation,
    reason = "sizes in these tests are a few MiB, and the wire uses i64"
)]

mod common;

use bytes::Bytes;
use futures::stream;
use garret_nix::Sha256Hash;
use garret_proto::bytestream::{QueryWriteStatusRequest, WriteRequest};
use garret_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest, Directory, DirectoryNode,
    FileNode, FindMissingBlobsRequest, GetActionResultRequest, GetTreeRequest, OutputDirectory,
    SpliceBlobRequest, SplitBlobRequest, Tree, UpdateActionResultRequest,
    batch_update_blobs_request,
};
use garret_server::config::UploadSettings;
use garret_server::reapi::MAX_BATCH_TOTAL_BYTES;
use prost::Message as _;
use tonic::{Code, Request};

use common::Deployment;
use common::grpc::{EMPTY_HASH, GrpcServer, digest};

/// The limits hit here are the server's own: one deployment is enough.
async fn start() -> GrpcServer {
    GrpcServer::start(Deployment::SqliteFs).await
}

/// [`start`] with the gRPC services' upload settings set to `uploads`.
async fn start_with(uploads: UploadSettings) -> GrpcServer {
    GrpcServer::start_with(Deployment::SqliteFs, Some(uploads)).await
}

fn fake(seed: u8, size_bytes: i64) -> Digest {
    Digest {
        hash: Sha256Hash::of(&[seed]).to_hex(),
        size_bytes,
    }
}

/// The status of a unary or streaming call, whichever way it failed.
fn code<T>(result: Result<T, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// The status of a call that must fail with `expected`.
#[track_caller]
fn refused<T>(result: Result<T, tonic::Status>, expected: Code) -> tonic::Status {
    match result {
        Ok(_) => panic!("succeeded; expected {expected:?}"),
        Err(status) => {
            assert_eq!(status.code(), expected, "{status:?}");
            status
        }
    }
}

/// Asserts that a batch entry's status is INVALID_ARGUMENT.
#[track_caller]
fn entry_refused(status: Option<&garret_proto::rpc::Status>) {
    assert_eq!(
        status.unwrap().code,
        Code::InvalidArgument as i32,
        "{status:?}"
    );
}

/// Item 2: a compressed batch entry is never decompressed into a buffer of
/// the size its digest claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_bombs_in_batch_update_are_refused() {
    let h = start().await;
    let files_before = h.http.storage_files();
    let update = |entries: Vec<batch_update_blobs_request::Request>| {
        let mut cas = h.cas();
        let request = h.req(BatchUpdateBlobsRequest {
            requests: entries,
            ..Default::default()
        });
        async move { cas.batch_update_blobs(request).await }
    };
    // Ten bytes claiming 60 GiB (this aborted the process): refused before
    // any work, as over the batch limit.
    let claims_60g = fake(1, 60 << 30);
    let status = refused(
        update(vec![batch_update_blobs_request::Request {
            digest: Some(claims_60g.clone()),
            data: Bytes::from_static(b"0123456789"),
            compressor: 1,
        }])
        .await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("max_batch_total_size_bytes"));

    // Within the limit, but the payload decompresses to far more than its
    // digest, or to less, or asks for a huge window: per-entry refusals.
    let content = vec![0u8; 3 << 20];
    let short = digest(&content[..1000]);
    let long = fake(2, MAX_BATCH_TOTAL_BYTES as i64);
    for (entry_digest, data) in [
        (short.clone(), zstd::bulk::compress(&content, 3).unwrap()),
        (long.clone(), zstd::bulk::compress(&content, 3).unwrap()),
    ] {
        let response = update(vec![batch_update_blobs_request::Request {
            digest: Some(entry_digest),
            data: data.into(),
            compressor: 1,
        }])
        .await
        .unwrap()
        .into_inner();
        entry_refused(response.responses[0].status.as_ref());
    }
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    encoder.include_contentsize(false).unwrap();
    encoder.window_log(27).unwrap();
    std::io::Write::write_all(&mut encoder, b"hello").unwrap();
    let response = update(vec![batch_update_blobs_request::Request {
        digest: Some(digest(b"hello")),
        data: encoder.finish().unwrap().into(),
        compressor: 1,
    }])
    .await
    .unwrap()
    .into_inner();
    entry_refused(response.responses[0].status.as_ref());

    let asked = vec![claims_60g, short, long, digest(b"hello")];
    assert_eq!(h.missing(&asked).await, asked);
    assert_eq!(h.http.storage_files(), files_before);
}

/// Item 3: sizes that add up past 2^64 cannot wrap the batch total to a
/// small number (this sent an anonymous client a 400 MiB reply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_totals_cannot_wrap() {
    let h = start().await;
    let real = vec![5u8; 1 << 20];
    h.store("pub/", &real).await;
    // Anonymous, on the public cache.
    let wrapping = vec![
        fake(1, i64::MAX),
        fake(2, i64::MAX),
        fake(3, 2),
        digest(&real),
    ];
    refused(
        h.cas()
            .batch_read_blobs(Request::new(BatchReadBlobsRequest {
                instance_name: "pub".into(),
                digests: wrapping,
                ..Default::default()
            }))
            .await,
        Code::InvalidArgument,
    );

    // A negative size fails its own entry only.
    let response = h
        .cas()
        .batch_read_blobs(Request::new(BatchReadBlobsRequest {
            instance_name: "pub".into(),
            digests: vec![fake(1, -1), digest(&real)],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    entry_refused(response.responses[0].status.as_ref());
    assert_eq!(response.responses[1].data.len(), real.len());

    // The same trick on uploads' claimed sizes.
    refused(
        h.cas()
            .batch_update_blobs(
                h.req(BatchUpdateBlobsRequest {
                    requests: [fake(1, i64::MAX), fake(2, i64::MAX), fake(3, 2)]
                        .into_iter()
                        .map(|d| batch_update_blobs_request::Request {
                            digest: Some(d),
                            data: Bytes::from_static(b"x"),
                            compressor: 0,
                        })
                        .collect(),
                    ..Default::default()
                }),
            )
            .await,
        Code::InvalidArgument,
    );

    // And on SpliceBlob's chunk total, which wrapped to the empty blob.
    refused(
        h.cas()
            .splice_blob(h.req(SpliceBlobRequest {
                blob_digest: Some(Digest {
                    hash: EMPTY_HASH.into(),
                    size_bytes: 0,
                }),
                chunk_digests: vec![fake(1, i64::MAX), fake(2, i64::MAX), fake(3, 2)],
                ..Default::default()
            }))
            .await,
        Code::InvalidArgument,
    );
}

/// A Directory of `len` bytes: one file (`file`) with a long name.
fn big_directory(len: usize, file: Digest) -> Directory {
    Directory {
        files: vec![FileNode {
            name: "n".repeat(len),
            digest: Some(file),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Item 4: blobs named as messages (GetTree roots, output trees, also
/// behind Bazel's HTTP `GET /ac/`) are refused by size, unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_unread() {
    let h = start().await;
    // A valid Directory, and a valid Tree, each over 4 MiB, whose one file
    // is stored: read whole, the tree would make a result complete.
    h.put(&[b"present"]).await;
    let directory = big_directory(5 << 20, digest(b"present")).encode_to_vec();
    let tree = Tree {
        root: Some(big_directory(5 << 20, digest(b"present"))),
        children: vec![],
    }
    .encode_to_vec();
    h.store("", &directory).await;
    h.store("", &tree).await;

    let status = refused(
        async {
            let mut stream = h
                .cas()
                .get_tree(h.req(GetTreeRequest {
                    root_digest: Some(digest(&directory)),
                    ..Default::default()
                }))
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        }
        .await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("larger than"), "{status:?}");

    let result = ActionResult {
        output_directories: vec![OutputDirectory {
            path: "out".into(),
            tree_digest: Some(digest(&tree)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let action = fake(7, 100);
    refused(
        h.ac()
            .update_action_result(h.req(UpdateActionResultRequest {
                action_digest: Some(action.clone()),
                action_result: Some(result.clone()),
                ..Default::default()
            }))
            .await,
        Code::InvalidArgument,
    );
    let get = |action: Digest| {
        let mut ac = h.ac();
        let request = h.req(GetActionResultRequest {
            action_digest: Some(action),
            ..Default::default()
        });
        async move { ac.get_action_result(request).await }
    };
    assert_eq!(code(get(action).await), Code::NotFound);

    // The same result stored directly (as an older server would have): it
    // is a miss on both protocols, without the tree being read.
    let stored = fake(8, 100);
    let meta = &h.http.state.meta;
    let main = meta.cache("main").await.unwrap();
    let stored_hash = Sha256Hash::of(&[8]);
    meta.put_action_result(main.id, stored_hash.as_bytes(), &result.encode_to_vec(), 0)
        .await
        .unwrap();
    assert_eq!(code(get(stored).await), Code::NotFound);
    let response = reqwest::Client::new()
        .get(format!("{}/main/ac/{}", h.http.url, stored_hash.to_hex()))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::NOT_FOUND);
}

/// Item 4: pages leave as the walk goes; a broken directory deep in the
/// tree ends the stream with its error after the pages before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_tree_streams_pages_before_a_later_error() {
    let h = start().await;
    let b = Directory {
        files: vec![FileNode {
            name: "f".into(),
            digest: Some(fake(1, 1)),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let broken = b"\xff\xff not a Directory".to_vec();
    let node = |name: &str, bytes: &[u8]| DirectoryNode {
        name: name.into(),
        digest: Some(digest(bytes)),
    };
    let root = Directory {
        directories: vec![node("b", &b), node("c", &broken)],
        ..Default::default()
    }
    .encode_to_vec();
    h.put(&[&root, &b, &broken]).await;

    let mut stream = h
        .cas()
        .get_tree(h.req(GetTreeRequest {
            root_digest: Some(digest(&root)),
            page_size: 1,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.directories[0].encode_to_vec(), root);
    assert_eq!(first.next_page_token, "1");
    let error = loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the broken directory went unnoticed"),
            Err(status) => break status,
        }
    };
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
}

/// An interrupted Write keeps the chunks it had cut, QueryWriteStatus
/// reports where they end, and only a Write from exactly there continues
/// it. Compressed uploads always start at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_writes_resume_where_their_record_ends() {
    let h = start_with(UploadSettings {
        checkpoint_bytes: 64 << 10,
        ..UploadSettings::default()
    })
    .await;
    let data: Vec<u8> = (0..(3u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let name = |uuid: &str| format!("uploads/{uuid}/blobs/{}/{}", digest(&data).hash, data.len());
    let write = |uuid: &'static str, from: usize, to: usize, finish: bool| {
        let mut client = h.bytestream();
        let request = h.req(stream::iter([WriteRequest {
            resource_name: name(uuid),
            write_offset: from as i64,
            finish_write: finish,
            data: Bytes::copy_from_slice(&data[from..to]),
        }]));
        async move { client.write(request).await }
    };
    let committed = |uuid: &'static str| {
        let mut client = h.bytestream();
        let request = h.req(QueryWriteStatusRequest {
            resource_name: name(uuid),
        });
        async move {
            let status = client.query_write_status(request).await.unwrap();
            usize::try_from(status.into_inner().committed_size).unwrap()
        }
    };

    // Sending nothing keeps nothing.
    assert_eq!(
        code(write("empty", 0, 0, false).await),
        Code::InvalidArgument
    );
    assert_eq!(committed("empty").await, 0);
    // Two MiB without finish_write: what was cut by then is recorded.
    assert_eq!(
        code(write("a", 0, 2 << 20, false).await),
        Code::InvalidArgument
    );
    let held = committed("a").await;
    assert!(held > 1 << 20 && held <= 2 << 20, "{held}");
    // Only a Write from exactly there continues it.
    refused(
        write("a", held + 1, held + 2, false).await,
        Code::OutOfRange,
    );
    refused(write("never", 5, 6, false).await, Code::OutOfRange);
    assert_eq!(committed("never").await, 0);
    write("a", held, data.len(), true).await.unwrap();
    assert!(h.missing(&[digest(&data)]).await.is_empty());

    // A compressed upload cannot be resumed (of a blob not stored yet).
    let other = &data[..1000];
    let compressed = format!(
        "uploads/z/compressed-blobs/zstd/{}/{}",
        digest(other).hash,
        other.len()
    );
    let request = h.req(stream::iter([WriteRequest {
        resource_name: compressed,
        write_offset: 10,
        finish_write: true,
        data: Bytes::from_static(b"x"),
    }]));
    refused(h.bytestream().write(request).await, Code::InvalidArgument);
}

/// Item 5: a Write of many tiny messages is accepted and stored right (its
/// cost per message is constant; this checks the bookkeeping, not time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_messages_are_stored_right() {
    let h = start().await;
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let name = format!("uploads/t/blobs/{}/{}", digest(&data).hash, data.len());
    let messages: Vec<WriteRequest> = data
        .iter()
        .enumerate()
        .map(|(i, byte)| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: i as i64,
            finish_write: i + 1 == data.len(),
            data: Bytes::copy_from_slice(&[*byte]),
        })
        .collect();
    let committed = h
        .bytestream()
        .write(h.req(stream::iter(messages)))
        .await
        .unwrap()
        .into_inner()
        .committed_size;
    assert_eq!(committed, data.len() as i64);
    assert!(h.missing(&[digest(&data)]).await.is_empty());
}

/// Item 13: SplitBlob writes rows only for a client that may write; with
/// read access alone it answers only when the chunks are readable already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_blob_writes_only_with_push() {
    let h = start().await;
    let data: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    h.store("pub/", &data).await;
    let split = |token: bool| {
        let mut cas = h.cas();
        let message = SplitBlobRequest {
            instance_name: "pub".into(),
            blob_digest: Some(digest(&data)),
            ..Default::default()
        };
        let request = if token {
            h.req(message)
        } else {
            Request::new(message)
        };
        async move { cas.split_blob(request).await }
    };
    // The chunk digests, from the metadata.
    let meta = &h.http.state.meta;
    let blob = meta
        .blob_by_hash(Sha256Hash::of(&data).as_bytes())
        .await
        .unwrap()
        .unwrap();
    let chunks: Vec<Digest> = meta
        .blob_chunks(blob.id, None)
        .await
        .unwrap()
        .iter()
        .map(|c| Digest {
            hash: Sha256Hash::from_bytes(c.chunk.hash).to_hex(),
            size_bytes: c.chunk.size as i64,
        })
        .collect();
    assert!(chunks.len() > 4, "{} chunks", chunks.len());
    let missing_in_pub = |chunks: Vec<Digest>| {
        let mut cas = h.cas();
        let request = Request::new(FindMissingBlobsRequest {
            instance_name: "pub".into(),
            blob_digests: chunks,
            ..Default::default()
        });
        async move {
            cas.find_missing_blobs(request)
                .await
                .unwrap()
                .into_inner()
                .missing_blob_digests
                .len()
        }
    };

    // Anonymous: refused, and no chunk became readable.
    refused(split(false).await, Code::PermissionDenied);
    assert_eq!(missing_in_pub(chunks.clone()).await, chunks.len());
    // With push: the chunks become readable blobs.
    let split_chunks = split(true).await.unwrap().into_inner().chunk_digests;
    assert_eq!(split_chunks, chunks);
    assert_eq!(missing_in_pub(chunks.clone()).await, 0);
    // Now anonymous reading clients get the split, which writes nothing.
    assert_eq!(
        split(false).await.unwrap().into_inner().chunk_digests,
        chunks
    );
}

/// Item 15: a size-0 digest is the empty blob only with the empty hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_size_digests_must_be_the_empty_blob() {
    let h = start().await;
    let impostor = fake(1, 0);
    let response = h
        .cas()
        .batch_update_blobs(h.req(BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(impostor.clone()),
                data: Bytes::new(),
                compressor: 0,
            }],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    entry_refused(response.responses[0].status.as_ref());
    let response = h
        .cas()
        .batch_read_blobs(h.req(BatchReadBlobsRequest {
            digests: vec![impostor.clone()],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    entry_refused(response.responses[0].status.as_ref());
    refused(
        h.bytestream()
            .write(h.req(stream::iter([WriteRequest {
                resource_name: format!("uploads/z/blobs/{}/0", impostor.hash),
                finish_write: true,
                ..Default::default()
            }])))
            .await,
        Code::InvalidArgument,
    );
    refused(h.try_missing(&[impostor]).await, Code::InvalidArgument);
}
