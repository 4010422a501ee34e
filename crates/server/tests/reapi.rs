//! REAPI conformance over real gRPC (tonic client, h2c on 127.0.0.1) on both
//! deployments: SQLite + local disk and Postgres + S3.

#![allow(
    clippy::cast_possible_wrap,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "sizes in these tests are a few MiB, and the wire uses i64"
)]

mod common;

use std::future::Future;

use bytes::Bytes;
use futures::stream;
use garret_nix::Sha256Hash;
use garret_proto::bytestream::{QueryWriteStatusRequest, WriteRequest};
use garret_proto::health::HealthCheckRequest;
use garret_proto::health::health_client::HealthClient;
use garret_proto::reapi::capabilities_client::CapabilitiesClient;
use garret_proto::reapi::compressor::Value as Compressor;
use garret_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest, Directory, DirectoryNode,
    FileNode, FindMissingBlobsRequest, GetActionResultRequest, GetCapabilitiesRequest,
    GetTreeRequest, OutputDirectory, OutputFile, SpliceBlobRequest, SplitBlobRequest, Tree,
    UpdateActionResultRequest, batch_update_blobs_request,
};
use garret_server::auth::Permission;
use garret_server::reapi::MAX_BATCH_TOTAL_BYTES;
use prost::Message as _;
use tonic::{Code, Request};

use common::Deployment;
use common::grpc::{EMPTY_HASH, GrpcServer, digest, hex, with_token};
use garret_store::testing::noise;

/// Runs a scenario on both deployments, each in its own test.
macro_rules! both_deployments {
    ($($name:ident),* $(,)?) => {
        mod sqlite_fs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(super::Deployment::SqliteFs, super::$name).await;
                }
            )*
        }
        mod postgres_s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(super::Deployment::PostgresS3, super::$name).await;
                }
            )*
        }
    };
}

async fn run<F, Fut>(deployment: Deployment, scenario: F)
where
    F: FnOnce(GrpcServer) -> Fut,
    Fut: Future<Output = ()>,
{
    scenario(GrpcServer::start(deployment).await).await;
}

both_deployments!(
    capabilities_and_health,
    empty_blob_always_exists,
    digest_mismatch_is_invalid_argument,
    a_batch_shares_one_pack,
    plain_reads_honour_offset_and_limit,
    compressed_round_trip_across_frames,
    resumable_write,
    action_cache_completeness,
    get_tree_pages,
    split_and_splice,
    find_missing_ten_thousand,
    auth_rules,
    budget_eviction_ends_action_cache_hits,
);

async fn capabilities_and_health(server: GrpcServer) {
    let caps = CapabilitiesClient::new(server.channel.clone())
        .get_capabilities(server.req(GetCapabilitiesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert_eq!(cache.digest_functions, vec![1]);
    assert!(
        cache
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );
    assert_eq!(
        cache.max_batch_total_size_bytes,
        MAX_BATCH_TOTAL_BYTES as i64
    );
    assert_eq!(cache.supported_compressors, vec![Compressor::Zstd as i32]);
    assert_eq!(
        cache.supported_batch_update_compressors,
        vec![Compressor::Zstd as i32]
    );
    assert!(cache.max_cas_blob_size_bytes > 0);
    assert!(cache.split_blob_support && cache.splice_blob_support);
    let cdc = cache.fast_cdc_2020_params.unwrap();
    assert_eq!((cdc.avg_chunk_size_bytes, cdc.seed), (64 * 1024, 0));
    let (low, high) = (
        caps.low_api_version.unwrap(),
        caps.high_api_version.unwrap(),
    );
    assert_eq!((low.major, low.minor, high.major, high.minor), (2, 0, 2, 3));

    let health = HealthClient::new(server.channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1);
}

async fn empty_blob_always_exists(server: GrpcServer) {
    let empty = digest(b"");
    assert_eq!(empty.hash, EMPTY_HASH);
    assert!(
        server
            .missing(std::slice::from_ref(&empty))
            .await
            .is_empty()
    );
    assert_eq!(
        server
            .read(&format!("blobs/{EMPTY_HASH}/0"), 0, 0)
            .await
            .unwrap(),
        b""
    );
    let compressed = server
        .read(&format!("main/compressed-blobs/zstd/{EMPTY_HASH}/0"), 0, 0)
        .await
        .unwrap();
    assert_eq!(zstd::decode_all(&compressed[..]).unwrap(), b"");
    let read = server
        .cas()
        .batch_read_blobs(server.req(BatchReadBlobsRequest {
            digests: vec![empty],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.responses[0].status.as_ref().unwrap().code, 0);
    assert!(read.responses[0].data.is_empty());
    let name = format!("uploads/u1/blobs/{EMPTY_HASH}/0");
    assert_eq!(server.write(&name, b"", 1).await.unwrap(), 0);
}

async fn digest_mismatch_is_invalid_argument(server: GrpcServer) {
    let good = b"good blob".to_vec();
    let bad = b"bad blob".to_vec();
    let response = server
        .cas()
        .batch_update_blobs(server.req(BatchUpdateBlobsRequest {
            requests: vec![
                batch_update_blobs_request::Request {
                    digest: Some(digest(&good)),
                    data: good.clone().into(),
                    compressor: 0,
                },
                batch_update_blobs_request::Request {
                    digest: Some(digest(b"something else")),
                    data: bad.clone().into(),
                    compressor: 0,
                },
                batch_update_blobs_request::Request {
                    digest: Some(digest(&bad)),
                    data: zstd::encode_all(&bad[..], 3).unwrap().into(),
                    compressor: Compressor::Zstd as i32,
                },
            ],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = response
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    assert_eq!(
        codes,
        vec![0, Code::InvalidArgument as i32, 0],
        "{response:?}"
    );

    let data = noise(300_000, 7);
    let wrong = hex(b"not this");
    let status = server
        .write(
            &format!("uploads/u2/blobs/{wrong}/{}", data.len()),
            &data,
            3,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Nothing of the lying upload is visible under either digest.
    assert_eq!(server.missing(&[digest(&data)]).await.len(), 1);
    // A wrong size is a mismatch too.
    let status = server
        .write(
            &format!("uploads/u3/blobs/{}/{}", hex(&data), data.len() - 1),
            &data,
            1,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

async fn a_batch_shares_one_pack(server: GrpcServer) {
    let meta = &server.http.state.meta;
    let stored_before = b"stored before the batch".to_vec();
    server.put(&[&stored_before]).await;
    let packs_before = meta.packs(1000).await.unwrap().len();
    // 300 small blobs, one of them twice and one stored already: one new
    // pack holds them all, and every one reads back.
    let mut blobs: Vec<Vec<u8>> = (0..300u64).map(|i| noise(4096, i + 100)).collect();
    blobs.push(blobs[7].clone());
    blobs.push(stored_before.clone());
    let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
    server.put(&refs).await;
    let packs = meta.packs(1000).await.unwrap();
    assert_eq!(packs.len(), packs_before + 1);
    let stats = meta.chunk_stats().await.unwrap();
    let live: u64 = packs.iter().map(|p| p.live_bytes).sum();
    assert_eq!(
        live, stats.stored_size,
        "every chunk row is live in its pack"
    );
    let read = server
        .cas()
        .batch_read_blobs(server.req(BatchReadBlobsRequest {
            digests: blobs.iter().map(|b| digest(b)).collect(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    for (response, blob) in read.responses.iter().zip(&blobs) {
        assert_eq!(response.status.as_ref().unwrap().code, 0);
        assert_eq!(&response.data[..], &blob[..]);
    }
}

async fn plain_reads_honour_offset_and_limit(server: GrpcServer) {
    let data = noise(700_000, 3);
    let hash = hex(&data);
    let size = data.len();
    let committed = server
        .write(
            &format!("main/uploads/u/blobs/{hash}/{size}/meta"),
            &data,
            7,
        )
        .await
        .unwrap();
    assert_eq!(committed, size as i64);
    // Already there: the write ends at once with the full size.
    let again = server
        .write(&format!("uploads/u2/blobs/{hash}/{size}"), &data[..10], 1)
        .await
        .unwrap();
    assert_eq!(again, size as i64);

    let name = format!("blobs/{hash}/{size}");
    assert_eq!(server.read(&name, 0, 0).await.unwrap(), data);
    assert_eq!(
        server.read(&name, 100_000, 0).await.unwrap(),
        &data[100_000..]
    );
    assert_eq!(
        server.read(&name, 65_000, 200_000).await.unwrap(),
        &data[65_000..265_000]
    );
    assert_eq!(
        server.read(&name, 699_990, 1000).await.unwrap(),
        &data[699_990..]
    );
    assert_eq!(server.read(&name, size as i64, 0).await.unwrap(), b"");
    let past = server.read(&name, size as i64 + 1, 0).await.unwrap_err();
    assert_eq!(past.code(), Code::OutOfRange);
    let negative = server.read(&name, -1, 0).await.unwrap_err();
    assert_eq!(negative.code(), Code::OutOfRange);
    let absent = server
        .read(&format!("blobs/{}/5", hex(b"nope!")), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(absent.code(), Code::NotFound);
    let malformed = server.read("blobs/xyz/5", 0, 0).await.unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
}

async fn compressed_round_trip_across_frames(server: GrpcServer) {
    // 1 MiB of incompressible data: about 16 chunks of the 64 KiB chunker.
    let data = noise(1 << 20, 11);
    let hash = hex(&data);
    let size = data.len();
    let compressed = zstd::encode_all(&data[..], 1).unwrap();
    let committed = server
        .write(
            &format!("uploads/c1/compressed-blobs/zstd/{hash}/{size}"),
            &compressed,
            9,
        )
        .await
        .unwrap();
    assert_eq!(committed, compressed.len() as i64);
    let again = server
        .write(
            &format!("uploads/c2/compressed-blobs/zstd/{hash}/{size}"),
            &compressed,
            1,
        )
        .await
        .unwrap();
    assert_eq!(again, -1, "an existing compressed blob commits as -1");

    let name = format!("compressed-blobs/zstd/{hash}/{size}");
    let whole = server.read(&name, 0, 0).await.unwrap();
    // The stored frames, one per chunk, concatenated.
    let mut frames = 0;
    let mut rest = &whole[..];
    while !rest.is_empty() {
        let len = zstd::zstd_safe::find_frame_compressed_size(rest).unwrap();
        rest = &rest[len..];
        frames += 1;
    }
    assert!(frames > 4, "only {frames} frames");
    assert_eq!(zstd::decode_all(&whole[..]).unwrap(), data);
    // Offsets count uncompressed bytes, inside a chunk or not.
    for offset in [1, 100_000, size - 1] {
        let tail = server.read(&name, offset as i64, 0).await.unwrap();
        assert_eq!(
            zstd::decode_all(&tail[..]).unwrap(),
            &data[offset..],
            "offset {offset}"
        );
    }
    let limited = server.read(&name, 0, 10).await.unwrap_err();
    assert_eq!(limited.code(), Code::InvalidArgument);
    // Plain reads of the same blob still work.
    assert_eq!(
        server
            .read(&format!("blobs/{hash}/{size}"), 0, 0)
            .await
            .unwrap(),
        data
    );
    // And batch reads hand out frames to zstd-capable clients.
    let read = server
        .cas()
        .batch_read_blobs(server.req(BatchReadBlobsRequest {
            digests: vec![digest(&data)],
            acceptable_compressors: vec![Compressor::Zstd as i32],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let entry = &read.responses[0];
    assert_eq!(entry.compressor, Compressor::Zstd as i32);
    assert_eq!(zstd::decode_all(&entry.data[..]).unwrap(), data);
}

async fn resumable_write(server: GrpcServer) {
    let data = noise(3 << 20, 5);
    let hash = hex(&data);
    let size = data.len();
    let name = format!("uploads/r1/blobs/{hash}/{size}");
    let half = size / 2;
    // First attempt: half the data, then the stream ends without finishing.
    let first: Vec<WriteRequest> = data[..half]
        .chunks(512 << 10)
        .scan(0i64, |offset, chunk| {
            let message = WriteRequest {
                resource_name: name.clone(),
                write_offset: *offset,
                finish_write: false,
                data: Bytes::copy_from_slice(chunk),
            };
            *offset += chunk.len() as i64;
            Some(message)
        })
        .collect();
    let status = server
        .bytestream()
        .write(server.req(stream::iter(first)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let query = |name: String| {
        let mut client = server.bytestream();
        let request = server.req(QueryWriteStatusRequest {
            resource_name: name,
        });
        async move {
            client
                .query_write_status(request)
                .await
                .unwrap()
                .into_inner()
        }
    };
    // Kept: everything up to the last chunk boundary the server had cut.
    let status = query(name.clone()).await;
    assert!(!status.complete);
    let held = usize::try_from(status.committed_size).unwrap();
    assert!(held <= half && held > half - (256 << 10), "{held}");
    // Nothing is visible yet.
    let absent = server
        .read(&format!("blobs/{hash}/{size}"), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(absent.code(), Code::NotFound);
    // A resume at the wrong offset is refused.
    let wrong = server
        .bytestream()
        .write(server.req(stream::iter(vec![WriteRequest {
            resource_name: name.clone(),
            write_offset: 7,
            finish_write: true,
            data: Bytes::from_static(b"x"),
        }])))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::OutOfRange);
    // Resume where the server says.
    let rest = WriteRequest {
        resource_name: name.clone(),
        write_offset: held as i64,
        finish_write: true,
        data: Bytes::copy_from_slice(&data[held..]),
    };
    let committed = server
        .bytestream()
        .write(server.req(stream::iter(vec![rest])))
        .await
        .unwrap()
        .into_inner()
        .committed_size;
    assert_eq!(committed, size as i64);
    let status = query(name.clone()).await;
    assert_eq!(
        (status.committed_size, status.complete),
        (size as i64, true)
    );
    assert_eq!(
        server
            .read(&format!("blobs/{hash}/{size}"), 0, 0)
            .await
            .unwrap(),
        data
    );
    // An upload nobody started reports nothing kept.
    let fresh = query(format!("uploads/other/blobs/{}/3", hex(b"abc"))).await;
    assert_eq!((fresh.committed_size, fresh.complete), (0, false));
}

#[expect(
    clippy::too_many_lines,
    reason = "one story: refused, stored, found, inlined, then incomplete results missed"
)]
async fn action_cache_completeness(server: GrpcServer) {
    let out = b"output file".to_vec();
    let stdout = b"hello from the action\n".to_vec();
    let in_tree = b"a file inside an output directory".to_vec();
    let tree = Tree {
        root: Some(Directory {
            files: vec![FileNode {
                name: "f".into(),
                digest: Some(digest(&in_tree)),
                ..Default::default()
            }],
            ..Default::default()
        }),
        children: vec![],
    }
    .encode_to_vec();
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "bazel-out/out.txt".into(),
            digest: Some(digest(&out)),
            ..Default::default()
        }],
        output_directories: vec![OutputDirectory {
            path: "bazel-out/dir".into(),
            tree_digest: Some(digest(&tree)),
            ..Default::default()
        }],
        stdout_digest: Some(digest(&stdout)),
        exit_code: 0,
        ..Default::default()
    };
    let action = digest(b"the action");
    let update = |result: ActionResult| {
        let mut client = server.ac();
        let request = server.req(UpdateActionResultRequest {
            action_digest: Some(action.clone()),
            action_result: Some(result),
            ..Default::default()
        });
        async move { client.update_action_result(request).await }
    };
    let get = |inline: bool| {
        let mut client = server.ac();
        let request = server.req(GetActionResultRequest {
            action_digest: Some(action.clone()),
            inline_stdout: inline,
            inline_output_files: if inline {
                vec!["bazel-out/out.txt".into()]
            } else {
                vec![]
            },
            ..Default::default()
        });
        async move { client.get_action_result(request).await }
    };
    assert_eq!(get(false).await.unwrap_err().code(), Code::NotFound);

    // The file inside the tree is missing: the update is refused.
    server.put(&[&out, &stdout, &tree]).await;
    let refused = update(result.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    server.put(&[&in_tree]).await;
    update(result.clone()).await.unwrap();
    let found = get(false).await.unwrap().into_inner();
    assert_eq!(found, result);
    let inlined = get(true).await.unwrap().into_inner();
    assert_eq!(inlined.stdout_raw, stdout);
    assert_eq!(inlined.output_files[0].contents, out);

    // Results stored behind the server's back that name missing blobs are
    // misses: a plain output, and a file inside an output tree.
    let cache = server.http.state.meta.cache("main").await.unwrap();
    let lost_file = ActionResult {
        output_files: vec![OutputFile {
            path: "x".into(),
            digest: Some(digest(b"never uploaded")),
            ..Default::default()
        }],
        ..Default::default()
    };
    let lost_tree_file = Tree {
        root: Some(Directory {
            files: vec![FileNode {
                name: "g".into(),
                digest: Some(digest(b"also never uploaded")),
                ..Default::default()
            }],
            ..Default::default()
        }),
        children: vec![],
    }
    .encode_to_vec();
    server.put(&[&lost_tree_file]).await;
    let lost_in_tree = ActionResult {
        output_directories: vec![OutputDirectory {
            path: "d".into(),
            tree_digest: Some(digest(&lost_tree_file)),
            ..Default::default()
        }],
        ..Default::default()
    };
    for (i, bad) in [lost_file, lost_in_tree].into_iter().enumerate() {
        let key = digest(format!("bad action {i}").as_bytes());
        let hash = *Sha256Hash::of(format!("bad action {i}").as_bytes()).as_bytes();
        server
            .http
            .state
            .meta
            .put_action_result(cache.id, &hash, &bad.encode_to_vec(), 0)
            .await
            .unwrap();
        let status = server
            .ac()
            .get_action_result(server.req(GetActionResultRequest {
                action_digest: Some(key),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "case {i}: {status:?}");
    }

    // Validation: absolute paths and bad digests are refused.
    let mut absolute = result.clone();
    absolute.output_files[0].path = "/etc/passwd".into();
    assert_eq!(
        update(absolute).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut bad_digest = result;
    bad_digest.output_files[0].digest = Some(Digest {
        hash: "XYZ".into(),
        size_bytes: 1,
    });
    assert_eq!(
        update(bad_digest).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

async fn get_tree_pages(server: GrpcServer) {
    let leaf = Directory {
        files: vec![FileNode {
            name: "leaf.txt".into(),
            digest: Some(digest(b"leaf")),
            ..Default::default()
        }],
        ..Default::default()
    };
    let leaf_bytes = leaf.encode_to_vec();
    let mut subdirs = Vec::new();
    for i in 0..3 {
        let dir = Directory {
            directories: if i == 0 {
                vec![DirectoryNode {
                    name: "leaf".into(),
                    digest: Some(digest(&leaf_bytes)),
                }]
            } else {
                vec![]
            },
            files: vec![FileNode {
                name: format!("f{i}"),
                digest: Some(digest(format!("f{i}").as_bytes())),
                ..Default::default()
            }],
            ..Default::default()
        };
        subdirs.push(dir.encode_to_vec());
    }
    let missing_dir = Directory {
        files: vec![FileNode {
            name: "never".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let root = Directory {
        directories: subdirs
            .iter()
            .chain(std::iter::once(&missing_dir))
            .enumerate()
            .map(|(i, bytes)| DirectoryNode {
                name: format!("d{i}"),
                digest: Some(digest(bytes)),
            })
            .collect(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut all: Vec<&[u8]> = vec![&root, &leaf_bytes];
    all.extend(subdirs.iter().map(Vec::as_slice));
    server.put(&all).await;

    let pages = |token: String| {
        let mut client = server.cas();
        let request = server.req(GetTreeRequest {
            root_digest: Some(digest(&root)),
            page_size: 2,
            page_token: token,
            ..Default::default()
        });
        async move {
            let mut stream = client.get_tree(request).await?.into_inner();
            let mut pages = Vec::new();
            while let Some(page) = stream.message().await? {
                pages.push(page);
            }
            Ok::<_, tonic::Status>(pages)
        }
    };
    let first = pages(String::new()).await.unwrap();
    // Root, three subdirectories and the leaf; the missing one is left out.
    let sizes: Vec<usize> = first.iter().map(|p| p.directories.len()).collect();
    assert_eq!(sizes, vec![2, 2, 1]);
    assert!(first.last().unwrap().next_page_token.is_empty());
    assert_eq!(first[0].directories[0].encode_to_vec(), root);
    let returned: Vec<Vec<u8>> = first
        .iter()
        .flat_map(|p| p.directories.iter().map(prost::Message::encode_to_vec))
        .collect();
    assert!(returned.contains(&leaf_bytes));
    // Resuming from a token skips what was already delivered.
    let resumed = pages(first[0].next_page_token.clone()).await.unwrap();
    let resumed: Vec<Vec<u8>> = resumed
        .iter()
        .flat_map(|p| p.directories.iter().map(prost::Message::encode_to_vec))
        .collect();
    assert_eq!(resumed, returned[2..]);
    // A missing root is NOT_FOUND.
    let mut client = server.cas();
    let status = client
        .get_tree(server.req(GetTreeRequest {
            root_digest: Some(digest(&missing_dir)),
            ..Default::default()
        }))
        .await;
    let status = match status {
        Err(status) => status,
        Ok(response) => response.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(status.code(), Code::NotFound);
}

async fn split_and_splice(server: GrpcServer) {
    let data = noise(1 << 20, 13);
    let size = data.len();
    server
        .write(&format!("uploads/s/blobs/{}/{size}", hex(&data)), &data, 4)
        .await
        .unwrap();
    let split = server
        .cas()
        .split_blob(server.req(SplitBlobRequest {
            blob_digest: Some(digest(&data)),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split.chunking_function, 1);
    let chunks = split.chunk_digests;
    assert!(chunks.len() > 4, "{} chunks", chunks.len());
    assert_eq!(
        chunks.iter().map(|c| c.size_bytes).sum::<i64>(),
        size as i64
    );
    // Every chunk is a readable blob, and they add up to the data.
    let mut joined = Vec::new();
    for chunk in &chunks {
        let bytes = server
            .read(&format!("blobs/{}/{}", chunk.hash, chunk.size_bytes), 0, 0)
            .await
            .unwrap();
        assert_eq!(hex(&bytes), chunk.hash);
        joined.extend_from_slice(&bytes);
    }
    assert_eq!(joined, data);

    // Splice the chunks in another order into a new blob.
    let mut reordered = chunks.clone();
    reordered.reverse();
    let mut expected = Vec::new();
    let mut offset = 0usize;
    let mut pieces = Vec::new();
    for chunk in &chunks {
        let len = chunk.size_bytes as usize;
        pieces.push(&data[offset..offset + len]);
        offset += len;
    }
    for piece in pieces.iter().rev() {
        expected.extend_from_slice(piece);
    }
    let spliced = server
        .cas()
        .splice_blob(server.req(SpliceBlobRequest {
            blob_digest: Some(digest(&expected)),
            chunk_digests: reordered.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spliced.blob_digest, Some(digest(&expected)));
    assert_eq!(
        server
            .read(&format!("blobs/{}/{size}", hex(&expected)), 0, 0)
            .await
            .unwrap(),
        expected
    );
    // A digest the chunks do not make is refused, and nothing appears.
    let wrong = digest(&noise(size, 99));
    let status = server
        .cas()
        .splice_blob(server.req(SpliceBlobRequest {
            blob_digest: Some(wrong.clone()),
            chunk_digests: reordered,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(server.missing(&[wrong]).await.len(), 1);
}

async fn find_missing_ten_thousand(server: GrpcServer) {
    let present: Vec<Vec<u8>> = (0..10)
        .map(|i| format!("present {i}").into_bytes())
        .collect();
    server
        .put(&present.iter().map(Vec::as_slice).collect::<Vec<_>>())
        .await;
    let absent: Vec<Digest> = (0..10_000)
        .map(|i| digest(format!("absent {i}").as_bytes()))
        .collect();
    let mut query = absent.clone();
    for (i, p) in present.iter().enumerate() {
        query.insert(i * 997, digest(p));
    }
    query.push(digest(b""));
    // The right hash with a wrong size names no stored blob.
    let mut wrong_size = digest(&present[0]);
    wrong_size.size_bytes += 1;
    query.push(wrong_size.clone());
    let missing = server.missing(&query).await;
    let mut expected = absent;
    expected.push(wrong_size);
    assert_eq!(missing, expected);
}

async fn auth_rules(server: GrpcServer) {
    let find = |instance: &str, token: Option<&str>| {
        let message = FindMissingBlobsRequest {
            instance_name: instance.into(),
            blob_digests: vec![digest(b"x")],
            ..Default::default()
        };
        let request = match token {
            Some(token) => with_token(message, token),
            None => Request::new(message),
        };
        let mut client = server.cas();
        async move { client.find_missing_blobs(request).await.map(|_| ()) }
    };
    // Private default instance without a token.
    assert_eq!(
        find("", None).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        find("main", None).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // A garbage token is not anonymous.
    assert_eq!(
        find("pub", Some("garbage")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // Public instance: anonymous reads work, writes do not.
    find("pub", None).await.unwrap();
    let anonymous_write = server
        .cas()
        .batch_update_blobs(Request::new(BatchUpdateBlobsRequest {
            instance_name: "pub".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(anonymous_write.code(), Code::PermissionDenied);
    // A pull-only token may read but not write.
    let reader = server.http.token(&[("main", Permission::PULL)]);
    find("main", Some(&reader)).await.unwrap();
    let denied = server
        .write_with(
            &reader,
            &format!("main/uploads/a/blobs/{}/1", hex(b"y")),
            b"y",
        )
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = server
        .ac()
        .update_action_result(with_token(
            UpdateActionResultRequest {
                instance_name: "main".into(),
                action_digest: Some(digest(b"a")),
                action_result: Some(ActionResult::default()),
                ..Default::default()
            },
            &reader,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    // A cache that does not exist is NOT_FOUND to someone who may know.
    assert_eq!(
        find("nope", Some(&server.token)).await.unwrap_err().code(),
        Code::NotFound
    );
    // ...and UNAUTHENTICATED to someone who may not.
    assert_eq!(
        find("nope", None).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // An instance that is not a cache name is INVALID_ARGUMENT.
    assert_eq!(
        find("a/b", Some(&server.token)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

/// A cache over its CAS budget loses its least recently used blobs to GC,
/// and an action result naming one of them is a miss from then on; the
/// result whose outputs stayed is still a hit.
async fn budget_eviction_ends_action_cache_hits(server: GrpcServer) {
    let (old, new) = (noise(4000, 1), noise(4000, 2));
    server.put(&[&old]).await;
    server.put(&[&new]).await;
    let result = |out: &[u8]| ActionResult {
        output_files: vec![OutputFile {
            path: "out".into(),
            digest: Some(digest(out)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let ac = |action: &[u8], out: &[u8], update: bool| {
        let mut client = server.ac();
        let (action, result) = (digest(action), result(out));
        let (get, put) = (
            server.req(GetActionResultRequest {
                action_digest: Some(action.clone()),
                ..Default::default()
            }),
            server.req(UpdateActionResultRequest {
                action_digest: Some(action),
                action_result: Some(result),
                ..Default::default()
            }),
        );
        async move {
            if update {
                client.update_action_result(put).await.map(drop)
            } else {
                client.get_action_result(get).await.map(drop)
            }
        }
    };
    ac(b"old action", &old, true).await.unwrap();
    ac(b"new action", &new, true).await.unwrap();

    let state = &server.http.state;
    let patch = garret_meta::CachePatch {
        cas_budget_bytes: Some(Some(5000)),
        ..Default::default()
    };
    state.meta.update_cache("main", &patch).await.unwrap();
    // `old` was stored and last used no later than `new` (in the same
    // second, the older row goes first). Nothing is protected at this
    // `now`.
    let settings = garret_server::config::Gc {
        cas_protect_secs: 0,
        ..Default::default()
    };
    let now = garret_server::clock::unix_now() + 10;
    let report =
        garret_server::gc::collect(&state.meta, state.blobs.store(), &settings, now, false)
            .await
            .unwrap();
    assert_eq!(
        (report.cas_evicted, report.cas_evicted_bytes),
        (1, 4000),
        "{report}"
    );
    assert_eq!(
        server.missing(&[digest(&old), digest(&new)]).await,
        [digest(&old)]
    );
    let miss = ac(b"old action", &old, false).await.unwrap_err();
    assert_eq!(miss.code(), Code::NotFound, "{miss:?}");
    ac(b"new action", &new, false).await.unwrap();
    // Within budget now: another run evicts nothing.
    let again = garret_server::gc::collect(&state.meta, state.blobs.store(), &settings, now, false)
        .await
        .unwrap();
    assert_eq!(again.cas_evicted, 0, "{again}");
}
