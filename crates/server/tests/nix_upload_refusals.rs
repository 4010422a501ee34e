//! Plain Nix uploads (`PUT nar/…`, `PUT <hash>.narinfo`) and the JSON API
//! refuse bad input with a clear 4xx and store nothing. The happy paths are
//! driven by the real Nix client in `nix_copy.rs`.

use garret_nix::narinfo::NarInfo;
use garret_nix::signing::SigningKey;
use garret_nix::{Sha256Hash, StorePath, StorePathHash};
use garret_server::auth::Permission;
use reqwest::StatusCode;

mod common;
use common::{Deployment, TestServer, on_both};

struct Fixture {
    server: TestServer,
    http: reqwest::Client,
    token: String,
    nar: Vec<u8>,
}

impl Fixture {
    async fn start(deployment: Deployment) -> Self {
        let server = TestServer::start(deployment).await;
        for name in ["main", "other"] {
            server
                .create_cache(name, false, &SigningKey::generate(name).unwrap())
                .await;
        }
        let token = server.token(&[("*", Permission::PULL.union(Permission::PUSH))]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"plain upload ".repeat(1000)).unwrap();
        let mut nar = Vec::new();
        garret_nix::nar::dump_path(&dir.path().join("f"), &mut nar).unwrap();
        Self {
            server,
            http: reqwest::Client::new(),
            token,
            nar,
        }
    }

    async fn put(&self, path: &str, body: Vec<u8>) -> (StatusCode, serde_json::Value) {
        let response = self
            .http
            .put(format!("{}{path}", self.server.url))
            .bearer_auth(&self.token)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Uploads the NAR uncompressed to `cache`, as `compression=none` does.
    async fn put_nar(&self, cache: &str) -> StatusCode {
        let file_hash = Sha256Hash::of(&self.nar).to_string();
        let name = file_hash.strip_prefix("sha256:").unwrap();
        self.put(&format!("/{cache}/nar/{name}.nar"), self.nar.clone())
            .await
            .0
    }

    fn narinfo(&self, hash: StorePathHash) -> String {
        NarInfo {
            store_path: StorePath::new(hash, "plain").unwrap(),
            url: "nar/x.nar".into(),
            compression: "none".into(),
            file_hash: None,
            file_size: None,
            nar_hash: Sha256Hash::of(&self.nar),
            nar_size: self.nar.len() as u64,
            references: vec![],
            deriver: None,
            system: None,
            signatures: vec![],
            ca: None,
        }
        .render("/nix/store")
    }

    async fn stored(&self, cache: &str, hash: StorePathHash) -> bool {
        let meta = &self.server.state.meta;
        let cache = meta.cache(cache).await.unwrap();
        meta.nix_object(cache.id, &hash.to_string())
            .await
            .unwrap()
            .is_some()
    }
}

#[track_caller]
fn assert_bad_request(reply: &(StatusCode, serde_json::Value), needle: &str) {
    assert_eq!(reply.0, StatusCode::BAD_REQUEST, "{}", reply.1);
    assert_eq!(reply.1["code"], 400);
    let message = reply.1["message"].as_str().unwrap();
    assert!(message.contains(needle), "{message}");
}

async fn narinfo_needs_its_nar_in_the_same_cache(deployment: Deployment) {
    let f = Fixture::start(deployment).await;
    let hash = StorePathHash::from_bytes([3; 20]);
    let path = format!("/main/{hash}.narinfo");
    // No NAR uploaded anywhere yet.
    let reply = f.put(&path, f.narinfo(hash).into_bytes()).await;
    assert_bad_request(&reply, "upload it first");
    // Uploaded to another cache: knowing the hash is not enough.
    assert_eq!(f.put_nar("other").await, StatusCode::NO_CONTENT);
    let reply = f.put(&path, f.narinfo(hash).into_bytes()).await;
    assert_bad_request(&reply, "upload it first");
    assert!(!f.stored("main", hash).await);
    // Uploaded here: accepted.
    assert_eq!(f.put_nar("main").await, StatusCode::NO_CONTENT);
    let reply = f.put(&path, f.narinfo(hash).into_bytes()).await;
    assert_eq!(reply.0, StatusCode::NO_CONTENT, "{}", reply.1);
    assert!(f.stored("main", hash).await);
}

async fn narinfo_refusals(deployment: Deployment) {
    let f = Fixture::start(deployment).await;
    assert_eq!(f.put_nar("main").await, StatusCode::NO_CONTENT);
    let hash = StorePathHash::from_bytes([4; 20]);
    let text = f.narinfo(hash);
    // Uploaded under another path's name.
    let other = StorePathHash::from_bytes([5; 20]);
    let reply = f
        .put(&format!("/main/{other}.narinfo"), text.clone().into_bytes())
        .await;
    assert_bad_request(&reply, "was uploaded as");
    // Not a narinfo, a bad name, a wrong NarSize.
    let reply = f
        .put(&format!("/main/{hash}.narinfo"), b"StorePath: x\n".to_vec())
        .await;
    assert_bad_request(&reply, "invalid narinfo");
    let reply = f
        .put("/main/not-a-hash.narinfo", text.clone().into_bytes())
        .await;
    assert_bad_request(&reply, "invalid store path hash");
    let lie = text.replace(
        &format!("NarSize: {}", f.nar.len()),
        &format!("NarSize: {}", f.nar.len() + 1),
    );
    let reply = f
        .put(&format!("/main/{hash}.narinfo"), lie.into_bytes())
        .await;
    assert_bad_request(&reply, "NarSize");
    assert!(!f.stored("main", hash).await);
}

async fn nar_refusals(deployment: Deployment) {
    let f = Fixture::start(deployment).await;
    let before = f.server.state.meta.chunk_stats().await.unwrap();
    let files = f.server.storage_files();
    let file_hash = Sha256Hash::of(&f.nar).to_string();
    let name = file_hash.strip_prefix("sha256:").unwrap().to_owned();
    // A compression we do not take, a bad file hash, a NAR that is not one.
    let reply = f
        .put(&format!("/main/nar/{name}.nar.bz2"), f.nar.clone())
        .await;
    assert_bad_request(&reply, "compression");
    let reply = f.put("/main/nar/zzzz.nar", f.nar.clone()).await;
    assert_bad_request(&reply, "invalid file hash");
    let junk = b"this is not a NAR".repeat(10_000);
    let junk_hash = Sha256Hash::of(&junk).to_string();
    let junk_name = junk_hash.strip_prefix("sha256:").unwrap();
    let reply = f.put(&format!("/main/nar/{junk_name}.nar"), junk).await;
    assert_bad_request(&reply, "invalid NAR");
    assert_eq!(f.server.state.meta.chunk_stats().await.unwrap(), before);
    assert_eq!(f.server.storage_files(), files);
}

async fn json_api_refusals(deployment: Deployment) {
    let f = Fixture::start(deployment).await;
    let post = |path: &str, body: &'static str| {
        f.http
            .post(format!("{}{path}", f.server.url))
            .bearer_auth(&f.token)
            .body(body)
            .send()
    };
    let reply = post(
        "/_api/v1/get-missing-paths",
        r#"{"cache":"main","store_path_hashes":["not-a-hash"]}"#,
    )
    .await
    .unwrap();
    assert_eq!(reply.status(), StatusCode::BAD_REQUEST);
    let reply = post("/_api/v1/get-missing-paths", "{").await.unwrap();
    assert_eq!(reply.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(body["error"], "BadRequest");
    // Reserved names cannot become caches.
    let admin = f.server.token(&[("*", Permission::ALL)]);
    let reply = f
        .http
        .post(format!("{}/_api/v1/cache-config/cas", f.server.url))
        .bearer_auth(admin)
        .body(r#"{"keypair":"Generate"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::BAD_REQUEST);
}

on_both! {
    narinfo_needs_its_nar_in_the_same_cache,
    narinfo_refusals,
    nar_refusals,
    json_api_refusals,
}
