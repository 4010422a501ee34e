//! Access times against the real server on both deployments: reads are
//! recorded in memory and written together, by the interval, an explicit
//! flush or shutdown; an action-cache hit is answered only once its result
//! and every blob it names are written.

#![allow(
    clippy::cast_possible_wrap,
    reason = "sizes in these tests are a few bytes, and the wire uses i64"
)]

mod common;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use garret_meta::{CacheId, NixObject};
use garret_nix::{Sha256Hash, StorePathHash};
use garret_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, Directory, FileNode, GetActionResultRequest,
    OutputDirectory, OutputFile, Tree, UpdateActionResultRequest,
};
use garret_server::blobs::Expect;
use prost::Message as _;
use tonic::Code;

use common::Deployment;
use common::grpc::{GrpcServer, digest, hex};

/// Long enough that no test sees a periodic flush: whatever is written
/// was written by the path under test.
const NEVER: u64 = 24 * 3600;

/// When the rows a test sets up were last used: long ago.
const LONG_AGO: i64 = 1000;

macro_rules! both_deployments {
    ($($name:ident),* $(,)?) => {
        mod sqlite_fs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Deployment::SqliteFs).await;
                }
            )*
        }
        mod postgres_s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Deployment::PostgresS3).await;
                }
            )*
        }
    };
}

both_deployments!(
    reads_are_written_together_by_a_flush,
    an_action_cache_hit_is_written_before_it_is_answered,
    the_interval_writes_reads,
    shutdown_writes_what_is_pending,
    paths_a_push_finds_present_are_used,
);

async fn start(deployment: Deployment, flush_interval_secs: u64) -> GrpcServer {
    GrpcServer::start_configured(deployment, |config| {
        config.access_flush_interval_secs = flush_interval_secs;
    })
    .await
}

/// The cache gRPC requests without an instance name use.
async fn main_cache(server: &GrpcServer) -> CacheId {
    server.http.state.meta.cache("main").await.unwrap().id
}

/// Stores `nar` as the NAR of a store path in `main`, last read long ago;
/// returns the store path hash.
async fn publish(server: &GrpcServer, nar: &[u8]) -> String {
    let state = &server.http.state;
    let nar_hash = Sha256Hash::of(nar);
    let blob = state
        .blobs
        .put(
            futures::stream::iter([Ok::<_, std::io::Error>(Bytes::copy_from_slice(nar))]),
            Expect {
                hash: Some(nar_hash),
                size: Some(nar.len() as u64),
                max_size: None,
            },
        )
        .await
        .unwrap();
    let hash = StorePathHash::from_bytes([7; 20]).to_string();
    let object = NixObject {
        store_path_hash: hash.clone(),
        store_path: format!("{hash}-access-times"),
        blob_id: blob.id,
        nar_hash: *nar_hash.as_bytes(),
        nar_size: nar.len() as u64,
        references: vec![],
        deriver: None,
        sigs: vec![],
        ca: None,
        system: None,
    };
    let cache = main_cache(server).await;
    state
        .meta
        .upsert_nix_object(cache, &object, LONG_AGO)
        .await
        .unwrap();
    hash
}

/// Stores `blobs` in `main`'s CAS, each last used long ago.
async fn put_used_long_ago(server: &GrpcServer, blobs: &[&[u8]]) {
    server.put(blobs).await;
    backdate(server, blobs).await;
}

/// Makes `main`'s CAS entries for `blobs` look last used long ago
/// (re-entering an entry sets its access time).
async fn backdate(server: &GrpcServer, blobs: &[&[u8]]) {
    let meta = &server.http.state.meta;
    let cache = main_cache(server).await;
    for data in blobs {
        let hash = Sha256Hash::of(data);
        let blob = meta
            .cas_blob(cache, hash.as_bytes())
            .await
            .unwrap()
            .unwrap();
        meta.put_cas_entry(cache, blob.id, LONG_AGO).await.unwrap();
    }
}

async fn cas_accessed_at(server: &GrpcServer, data: &[u8]) -> i64 {
    let cache = main_cache(server).await;
    let hash = Sha256Hash::of(data);
    server
        .http
        .state
        .meta
        .cas_accessed_at(cache, hash.as_bytes())
        .await
        .unwrap()
        .expect("the entry exists")
}

async fn nix_accessed_at(server: &GrpcServer, store_path_hash: &str) -> i64 {
    let cache = main_cache(server).await;
    let meta = &server.http.state.meta;
    let row = meta.nix_object(cache, store_path_hash).await.unwrap();
    row.expect("the object exists").accessed_at
}

/// `GET {url}/main/{path}` with the server's token, which must succeed.
async fn http_get(server: &GrpcServer, path: &str) -> Bytes {
    let response = reqwest::Client::new()
        .get(format!("{}/main/{path}", server.http.url))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    response.bytes().await.unwrap()
}

/// Polls `done` every few milliseconds for at most a minute.
async fn eventually<F: Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    for _ in 0..6000 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what} did not happen within a minute");
}

async fn reads_are_written_together_by_a_flush(deployment: Deployment) {
    let server = start(deployment, NEVER).await;
    let accesses = &server.http.state.accesses;
    let nix = publish(&server, b"the NAR of a store path").await;
    let blobs: [&[u8]; 4] = [
        b"read over HTTP",
        b"batch read",
        b"streamed",
        b"asked about",
    ];
    put_used_long_ago(&server, &blobs).await;
    let before = accesses.stats();

    // A narinfo and its NAR; each way Bazel reads or asks about a blob.
    let narinfo = http_get(&server, &format!("{nix}.narinfo")).await;
    assert!(String::from_utf8_lossy(&narinfo).contains(&format!("URL: nar/{nix}.nar")));
    http_get(&server, &format!("nar/{nix}.nar")).await;
    let via_http = http_get(&server, &format!("cas/{}", hex(blobs[0]))).await;
    assert_eq!(via_http, blobs[0]);
    let batch = server
        .cas()
        .batch_read_blobs(server.req(BatchReadBlobsRequest {
            digests: vec![digest(blobs[1])],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.responses[0].data, blobs[1]);
    let name = format!("blobs/{}/{}", hex(blobs[2]), blobs[2].len());
    assert_eq!(server.read(&name, 0, 0).await.unwrap(), blobs[2]);
    let absent = digest(b"never stored");
    assert_eq!(
        server.missing(&[digest(blobs[3]), absent.clone()]).await,
        [absent]
    );

    // Nothing is written per request...
    assert_eq!(accesses.stats().flushes, before.flushes);
    assert_eq!(nix_accessed_at(&server, &nix).await, LONG_AGO);
    for data in blobs {
        assert_eq!(cas_accessed_at(&server, data).await, LONG_AGO);
    }
    // ...but all of it by one flush.
    accesses.flush().await.unwrap();
    let after = accesses.stats();
    assert_eq!(after.flushes, before.flushes + 1, "{before:?} → {after:?}");
    assert_eq!(after.keys - before.keys, 5, "one key per row read");
    assert!(nix_accessed_at(&server, &nix).await > LONG_AGO);
    for data in blobs {
        assert!(
            cas_accessed_at(&server, data).await > LONG_AGO,
            "{}",
            String::from_utf8_lossy(data)
        );
    }
    assert_eq!((after.failed_flushes, after.dropped), (0, 0));
}

async fn an_action_cache_hit_is_written_before_it_is_answered(deployment: Deployment) {
    let server = start(deployment, NEVER).await;
    let accesses = &server.http.state.accesses;
    let meta = &server.http.state.meta;
    let cache = main_cache(&server).await;
    let out: &[u8] = b"an output file";
    let stdout: &[u8] = b"what the action printed\n";
    let in_tree: &[u8] = b"a file inside an output directory";
    let tree = Tree {
        root: Some(Directory {
            files: vec![FileNode {
                name: "f".into(),
                digest: Some(digest(in_tree)),
                ..Default::default()
            }],
            ..Default::default()
        }),
        children: vec![],
    }
    .encode_to_vec();
    let named: [&[u8]; 4] = [out, stdout, in_tree, &tree];
    server.put(&named).await;
    let action = digest(b"an action");
    let action_hash = Sha256Hash::of(b"an action");
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "bazel-out/out".into(),
            digest: Some(digest(out)),
            ..Default::default()
        }],
        output_directories: vec![OutputDirectory {
            path: "bazel-out/dir".into(),
            tree_digest: Some(digest(&tree)),
            ..Default::default()
        }],
        stdout_digest: Some(digest(stdout)),
        ..Default::default()
    };
    server
        .ac()
        .update_action_result(server.req(UpdateActionResultRequest {
            action_digest: Some(action.clone()),
            action_result: Some(result.clone()),
            ..Default::default()
        }))
        .await
        .unwrap();
    // What the update recorded is written; from here on only hits write.
    accesses.flush().await.unwrap();
    let stored = meta
        .get_action_result(cache, action_hash.as_bytes())
        .await
        .unwrap()
        .unwrap();
    // No flush in between: the hit itself wrote, through gRPC...
    let action_row = (cache, action_hash, stored.as_slice());
    used_long_ago(&server, &named, action_row).await;
    let hit = server
        .ac()
        .get_action_result(server.req(GetActionResultRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hit.output_files, result.output_files);
    assert_refreshed(&server, &named, action_row, "GetActionResult").await;

    // ...and through Bazel's HTTP cache.
    used_long_ago(&server, &named, action_row).await;
    let body = http_get(&server, &format!("ac/{}", action.hash)).await;
    assert_eq!(
        ActionResult::decode(body).unwrap().output_files,
        result.output_files
    );
    assert_refreshed(&server, &named, action_row, "GET /ac/").await;

    // Concurrent hits share flushes: never more than one each.
    let before = accesses.stats().flushes;
    let hits = futures::stream::iter(0..16)
        .map(|_| {
            let mut client = server.ac();
            let request = server.req(GetActionResultRequest {
                action_digest: Some(action.clone()),
                ..Default::default()
            });
            async move { client.get_action_result(request).await }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    assert!(hits.iter().all(Result::is_ok));
    let flushes = accesses.stats().flushes - before;
    assert!((1..=16).contains(&flushes), "{flushes} flushes for 16 hits");
}

/// `main`'s action result (the cache, its action hash and the stored
/// bytes).
type ActionRow<'a> = (CacheId, Sha256Hash, &'a [u8]);

/// Makes the CAS entries of `named` and the action result look last used
/// long ago.
async fn used_long_ago(
    server: &GrpcServer,
    named: &[&[u8]],
    (cache, action, stored): ActionRow<'_>,
) {
    backdate(server, named).await;
    server
        .http
        .state
        .meta
        .put_action_result(cache, action.as_bytes(), stored, LONG_AGO)
        .await
        .unwrap();
}

async fn assert_refreshed(
    server: &GrpcServer,
    named: &[&[u8]],
    (cache, action, _): ActionRow<'_>,
    how: &str,
) {
    for data in named {
        assert!(cas_accessed_at(server, data).await > LONG_AGO, "{how}");
    }
    let at = server
        .http
        .state
        .meta
        .action_result_accessed_at(cache, action.as_bytes())
        .await
        .unwrap()
        .unwrap();
    assert!(at > LONG_AGO, "{how}");
}

async fn the_interval_writes_reads(deployment: Deployment) {
    let server = start(deployment, 1).await;
    let nix = publish(&server, b"a NAR read once").await;
    http_get(&server, &format!("{nix}.narinfo")).await;
    eventually("the periodic flush", || async {
        nix_accessed_at(&server, &nix).await > LONG_AGO
    })
    .await;
}

async fn shutdown_writes_what_is_pending(deployment: Deployment) {
    let server = start(deployment, NEVER).await;
    let accesses = &server.http.state.accesses;
    let blob: &[u8] = b"read just before the stop";
    put_used_long_ago(&server, &[blob]).await;
    let read = server
        .read(&format!("blobs/{}/{}", hex(blob), blob.len()), 0, 0)
        .await
        .unwrap();
    assert_eq!(read, blob);
    accesses.shutdown().await;
    assert!(cas_accessed_at(&server, blob).await > LONG_AGO);

    // A stopped recorder takes nothing more, and an action-cache hit it
    // cannot keep alive is a miss rather than a promise it cannot keep.
    assert_eq!(
        accesses.flush().await,
        Err(garret_server::access_times::RecordError::Stopped)
    );
    let action = digest(b"an action with no outputs");
    server
        .ac()
        .update_action_result(server.req(UpdateActionResultRequest {
            action_digest: Some(action.clone()),
            action_result: Some(ActionResult::default()),
            ..Default::default()
        }))
        .await
        .unwrap();
    let miss = server
        .ac()
        .get_action_result(server.req(GetActionResultRequest {
            action_digest: Some(action),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(miss.code(), Code::NotFound, "{miss:?}");
}

/// `get-missing-paths` is how `attic push` learns what not to send: a path
/// it finds present is one the push relies on, and counts as used.
async fn paths_a_push_finds_present_are_used(deployment: Deployment) {
    let server = start(deployment, NEVER).await;
    let nix = publish(&server, b"a NAR a push relies on").await;
    let absent = StorePathHash::from_bytes([9; 20]).to_string();
    let reply: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/_api/v1/get-missing-paths", server.http.url))
        .bearer_auth(&server.token)
        .json(&serde_json::json!({ "cache": "main", "store_path_hashes": [nix, absent] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["missing_paths"], serde_json::json!([absent]));
    let accesses = &server.http.state.accesses;
    accesses.flush().await.unwrap();
    assert!(nix_accessed_at(&server, &nix).await > LONG_AGO);
}
