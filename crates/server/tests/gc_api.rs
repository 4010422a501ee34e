//! garret's GC API against the running server, on both deployments: pins
//! (`/_api/v1/pins`) and single path deletes (`/_api/v1/objects`) with
//! tokens of the right and the wrong permissions, and the retention period
//! set through Attic's cache-config PATCH and read back.

use garret_nix::signing::SigningKey;
use garret_server::auth::Permission;
use reqwest::Method;
use serde_json::{Value, json};

mod common;

use common::{Deployment, Reply, TestServer, assert_error, on_both, publish_nar, send_json};

on_both! {
    pins_through_the_api,
    path_delete_through_the_api,
    retention_through_cache_config,
}

/// A valid nix32 hash and a base name with it.
const HASH: &str = "0c1k2qm3ff6j1lgk8ailbxdwqg0cvlb8";
const OTHER_HASH: &str = "1c1k2qm3ff6j1lgk8ailbxdwqg0cvlb8";

fn base(hash: &str) -> String {
    format!("{hash}-hello-2.12")
}

/// A client of one server holding one token (or none).
struct Client {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

impl Client {
    fn new(server: &TestServer, grants: &[(&str, Permission)]) -> Self {
        Self {
            http: reqwest::Client::new(),
            url: server.url.clone(),
            token: (!grants.is_empty()).then(|| server.token(grants)),
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        send_json(request).await
    }

    async fn pin(&self, cache: &str, name: &str, body: Value) -> Reply {
        let path = format!("/_api/v1/pins/{cache}/{name}");
        self.call(Method::PUT, &path, Some(body)).await
    }
}

fn now() -> i64 {
    garret_server::clock::unix_now()
}

/// A server with the private cache `team` (and `elsewhere`, which no token
/// here names).
async fn start(deployment: Deployment) -> TestServer {
    let server = TestServer::start(deployment).await;
    let key = SigningKey::generate("team-1").unwrap();
    server.create_cache("team", false, &key).await;
    server.create_cache("elsewhere", false, &key).await;
    server
}

/// Pinning and unpinning need `cr`, listing `r`; a token with some other
/// permission is a 403, none a 401, a stranger's a 401; unknown caches and
/// pins are 404s for those who may know; bad names and paths are 400s.
async fn pins_through_the_api(deployment: Deployment) {
    let server = start(deployment).await;
    let roles = Roles {
        configurer: Client::new(&server, &[("team", Permission::CONFIGURE_CACHE)]),
        reader: Client::new(&server, &[("team", Permission::PULL)]),
        anonymous: Client::new(&server, &[]),
        stranger: Client::new(&server, &[("other", Permission::ALL)]),
        admin: Client::new(&server, &[("*", Permission::ALL)]),
    };
    sets_pins(&roles).await;
    lists_pins(&roles).await;
    removes_pins(&roles).await;

    let meta = &server.state.meta;
    let team = meta.cache("team").await.unwrap();
    let left = meta.pins(team.id, None, 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].name.as_str(), "nightly");
}

/// One client per kind of requester.
struct Roles {
    /// `cr` on `team`.
    configurer: Client,
    /// `r` on `team`.
    reader: Client,
    anonymous: Client,
    /// Every permission, on another cache.
    stranger: Client,
    /// Every permission everywhere.
    admin: Client,
}

/// Sets `release` (moved once) and `nightly` in `team`.
async fn sets_pins(roles: &Roles) {
    let Roles {
        configurer,
        reader,
        anonymous,
        stranger,
        admin,
    } = roles;
    let expires_at = now() + 3600;
    let pin =
        json!({ "store_path": format!("/nix/store/{}", base(HASH)), "expires_at": expires_at });

    assert_error(
        &reader.pin("team", "release", pin.clone()).await,
        403,
        Some("AccessError"),
    );
    assert_error(
        &anonymous.pin("team", "release", pin.clone()).await,
        401,
        None,
    );
    assert_error(
        &stranger.pin("team", "release", pin.clone()).await,
        401,
        None,
    );
    assert_error(
        &admin.pin("nosuch", "release", pin.clone()).await,
        404,
        Some("NoSuchCache"),
    );

    let (status, shown) = configurer.pin("team", "release", pin.clone()).await;
    assert_eq!(status, 200, "{shown}");
    let created_at = shown["created_at"].as_i64().unwrap();
    assert_eq!(
        shown,
        json!({
            "name": "release",
            "store_path": format!("/nix/store/{}", base(HASH)),
            "store_path_hash": HASH,
            "expires_at": expires_at,
            "created_at": created_at,
            "expired": false,
        })
    );
    // A base name works too, and moves the pin; `null` never expires.
    let moved = json!({ "store_path": base(OTHER_HASH), "expires_at": null });
    let (status, shown) = configurer.pin("team", "release", moved).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(
        (&shown["store_path_hash"], &shown["expires_at"]),
        (&json!(OTHER_HASH), &Value::Null)
    );
    let (status, _) = configurer.pin("team", "nightly", pin.clone()).await;
    assert_eq!(status, 200);

    let refusals = [
        ("bad-path", json!({ "store_path": "/other/store/x" })),
        ("bad-path", json!({ "store_path": format!("{HASH}_hello") })),
        (
            "bad-path",
            json!({ "store_path": "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x" }),
        ),
        (
            "past",
            json!({ "store_path": base(HASH), "expires_at": now() - 1 }),
        ),
        (
            "typo",
            json!({ "store_path": base(HASH), "expires_in": 60 }),
        ),
        ("-dash-first", json!({ "store_path": base(HASH) })),
        ("no-path", json!({})),
    ];
    for (name, body) in refusals {
        let reply = configurer.pin("team", name, body.clone()).await;
        assert_error(&reply, 400, Some("BadRequest"));
    }
}

/// Lists `team`'s two pins whole and by pages.
async fn lists_pins(roles: &Roles) {
    let Roles {
        reader,
        anonymous,
        admin,
        ..
    } = roles;
    let list = "/_api/v1/pins/team";
    let (status, listed) = reader.call(Method::GET, list, None).await;
    assert_eq!(status, 200, "{listed}");
    let names: Vec<&str> = listed["pins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["nightly", "release"], "{listed}");
    assert!(listed.get("next").is_none(), "{listed}");
    let (status, page) = reader
        .call(Method::GET, &format!("{list}?limit=1"), None)
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        (page["pins"][0]["name"].as_str(), page["next"].as_str()),
        (Some("nightly"), Some("nightly"))
    );
    let (_, page) = reader
        .call(Method::GET, &format!("{list}?limit=1&after=nightly"), None)
        .await;
    assert_eq!(page["pins"][0]["name"], "release", "{page}");
    let reply = reader
        .call(Method::GET, &format!("{list}?limit=many"), None)
        .await;
    assert_error(&reply, 400, Some("BadRequest"));
    assert_error(&anonymous.call(Method::GET, list, None).await, 401, None);
    let reply = admin.call(Method::GET, "/_api/v1/pins/nosuch", None).await;
    assert_error(&reply, 404, Some("NoSuchCache"));
    // Another cache's pins are its own.
    let (_, other) = admin
        .call(Method::GET, "/_api/v1/pins/elsewhere", None)
        .await;
    assert_eq!(other, json!({ "pins": [] }));
}

/// Removes `release`.
async fn removes_pins(roles: &Roles) {
    let Roles {
        configurer,
        reader,
        anonymous,
        ..
    } = roles;
    let unpin = "/_api/v1/pins/team/release";
    assert_error(
        &reader.call(Method::DELETE, unpin, None).await,
        403,
        Some("AccessError"),
    );
    assert_error(
        &anonymous.call(Method::DELETE, unpin, None).await,
        401,
        None,
    );
    let (status, body) = configurer.call(Method::DELETE, unpin, None).await;
    assert_eq!(status, 200, "{body}");
    assert_error(
        &configurer.call(Method::DELETE, unpin, None).await,
        404,
        Some("NoSuchObject"),
    );
    let reply = configurer
        .call(Method::DELETE, "/_api/v1/pins/team/-bad", None)
        .await;
    assert_error(&reply, 400, Some("BadRequest"));
}

/// Deleting a path needs `d`; afterwards its narinfo is a 404 and the
/// object is gone from the metadata, and a second delete is a 404.
async fn path_delete_through_the_api(deployment: Deployment) {
    let server = start(deployment).await;
    let mut nar = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "hello\n").unwrap();
    garret_nix::nar::dump_path(&dir.path().join("file"), &mut nar).unwrap();
    publish_nar(&server.state, "team", &base(HASH), nar).await;

    let reader = Client::new(&server, &[("team", Permission::PULL)]);
    let pusher = Client::new(
        &server,
        &[("team", Permission::PULL.union(Permission::PUSH))],
    );
    let deleter = Client::new(&server, &[("team", Permission::DELETE)]);
    let anonymous = Client::new(&server, &[]);
    let narinfo = format!("/team/{HASH}.narinfo");
    let delete = format!("/_api/v1/objects/team/{HASH}");
    let narinfo_status = async || {
        let request = reader.http.get(format!("{}{narinfo}", server.url));
        let request = request.bearer_auth(reader.token.as_ref().unwrap());
        request.send().await.unwrap().status().as_u16()
    };
    assert_eq!(narinfo_status().await, 200);

    assert_error(
        &pusher.call(Method::DELETE, &delete, None).await,
        403,
        Some("AccessError"),
    );
    assert_error(
        &anonymous.call(Method::DELETE, &delete, None).await,
        401,
        None,
    );
    let reply = deleter
        .call(Method::DELETE, "/_api/v1/objects/team/not-a-hash", None)
        .await;
    assert_error(&reply, 400, Some("BadRequest"));
    let reply = deleter
        .call(
            Method::DELETE,
            &format!("/_api/v1/objects/team/{}", base(HASH)),
            None,
        )
        .await;
    assert_error(&reply, 400, Some("BadRequest"));
    assert_eq!(
        narinfo_status().await,
        200,
        "refused deletes deleted nothing"
    );

    let (status, body) = deleter.call(Method::DELETE, &delete, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(narinfo_status().await, 404);
    let meta = &server.state.meta;
    let team = meta.cache("team").await.unwrap();
    assert!(meta.nix_object(team.id, HASH).await.unwrap().is_none());
    assert_error(
        &deleter.call(Method::DELETE, &delete, None).await,
        404,
        Some("NoSuchObject"),
    );
}

/// Attic's PATCH sets the retention period with `cr` and `cq` (`cr` alone
/// is a 403), and GET shows it; "Global" returns the cache to the default.
async fn retention_through_cache_config(deployment: Deployment) {
    let server = start(deployment).await;
    let configurer = Client::new(&server, &[("team", Permission::CONFIGURE_CACHE)]);
    let retention = Permission::CONFIGURE_CACHE.union(Permission::CONFIGURE_CACHE_RETENTION);
    let keeper = Client::new(&server, &[("team", retention.union(Permission::PULL))]);
    let config = "/_api/v1/cache-config/team";
    let period = json!({ "retention_period": { "Period": 86_400 } });

    let reply = configurer
        .call(Method::PATCH, config, Some(period.clone()))
        .await;
    assert_error(&reply, 403, Some("AccessError"));
    let (status, body) = keeper.call(Method::PATCH, config, Some(period)).await;
    assert_eq!(status, 200, "{body}");
    let (status, shown) = keeper.call(Method::GET, config, None).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["retention_period"], json!({ "Period": 86_400 }));
    let meta = &server.state.meta;
    assert_eq!(
        meta.cache("team").await.unwrap().retention_period,
        Some(86_400)
    );

    // Period 0 keeps objects forever, as in Attic; "Global" clears.
    for (sent, stored) in [(json!({ "Period": 0 }), Some(0)), (json!("Global"), None)] {
        let patch = json!({ "retention_period": sent });
        let (status, body) = keeper.call(Method::PATCH, config, Some(patch)).await;
        assert_eq!(status, 200, "{body}");
        let (_, shown) = keeper.call(Method::GET, config, None).await;
        assert_eq!(shown["retention_period"], sent);
        assert_eq!(meta.cache("team").await.unwrap().retention_period, stored);
    }
}
