//! One store under both protocols: the same bytes stored through Bazel's
//! CAS and inside a NAR pushed through the Attic API share their chunks.

use garret_nix::Sha256Hash;
use garret_nix::signing::SigningKey;
use garret_server::auth::Permission;
use serde_json::json;

mod common;
use common::{Deployment, TestServer};
use garret_store::testing::noise;

async fn bazel_file_and_nix_path_share_chunks(deployment: Deployment) {
    let server = TestServer::start(deployment).await;
    let key = SigningKey::generate("shared-1").unwrap();
    server.create_cache("default", false, &key).await;
    let token = server.token(&[("default", Permission::PULL.union(Permission::PUSH))]);
    let http = reqwest::Client::new();
    let meta = &server.state.meta;

    // A 4 MiB output stored by Bazel through its HTTP CAS.
    let file = noise(4 << 20, 7);
    let hash = Sha256Hash::of(&file).to_hex();
    let put = http
        .put(format!("{}/cas/{hash}", server.url))
        .bearer_auth(&token)
        .body(file.clone())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{:?}", put.text().await);
    let after_bazel = meta.chunk_stats().await.unwrap();

    // The same bytes as a store path's single file, pushed like `attic push`.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out");
    std::fs::write(&path, &file).unwrap();
    let mut nar = Vec::new();
    garret_nix::nar::dump_path(&path, &mut nar).unwrap();
    let store_hash = garret_nix::StorePathHash::from_bytes([9; 20]);
    let info = json!({
        "cache": "default",
        "store_path_hash": store_hash.to_string(),
        "store_path": format!("/nix/store/{store_hash}-shared"),
        "references": [],
        "system": null, "deriver": null, "sigs": [], "ca": null,
        "nar_hash": format!("sha256:{}", Sha256Hash::of(&nar).to_hex()),
        "nar_size": nar.len(),
    });
    let upload = http
        .put(format!("{}/_api/v1/upload-path", server.url))
        .bearer_auth(&token)
        .header("X-Attic-Nar-Info", info.to_string())
        .body(nar.clone())
        .send()
        .await
        .unwrap();
    assert!(upload.status().is_success());
    let result: serde_json::Value = upload.json().await.unwrap();
    assert_eq!(result["kind"], "Uploaded");
    let after_nix = meta.chunk_stats().await.unwrap();

    // The NAR adds its header and trailer around the file: FastCDC cuts the
    // first chunk differently and resynchronises, so only a few chunks are
    // new and almost all of the 4 MiB is shared.
    let new_chunks = after_nix.count - after_bazel.count;
    let new_bytes = after_nix.size - after_bazel.size;
    eprintln!(
        "bazel: {} chunks; nix added {new_chunks} chunks, {new_bytes} bytes of {}",
        after_bazel.count,
        nar.len()
    );
    assert!(after_bazel.count >= 16, "4 MiB is many 64 KiB chunks");
    assert!(new_chunks <= 3, "{new_chunks} new chunks");
    assert!(new_bytes < 3 * 256 * 1024, "{new_bytes} new bytes");
    let frac = result["frac_deduplicated"].as_f64().unwrap();
    assert!(frac > 0.8, "frac_deduplicated {frac}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_fs() {
    bazel_file_and_nix_path_share_chunks(Deployment::SqliteFs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_s3() {
    bazel_file_and_nix_path_share_chunks(Deployment::PostgresS3).await;
}
