//! The status page at `/` in a real headless browser (Debian's chromium):
//! it renders, lists the caches a token may pull from and hides the others,
//! name and key alike. The browser signs in the way a person would: with
//! the token as the Basic password in the URL, which chromium sends when
//! `/?login` challenges it.

use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use garret_nix::signing::SigningKey;
use garret_server::auth::{Permission, TokenAuthority, TokenSpec};

mod common;

use common::{Deployment, TestServer, on_both, publish_nar};

on_both! {
    browser_sees_only_the_caches_its_token_may_pull,
    page_headers_and_sign_in_challenge,
}

/// The DOM chromium renders for `url`, after any Basic challenge. The
/// page must apply under its own `Content-Security-Policy`: chromium logs
/// a refused stylesheet to its console, which goes to standard error here.
fn dump_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let output = Command::new("timeout")
        .arg("120")
        .arg("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .args(["--enable-logging=stderr", "--v=0"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .output()
        .expect("running chromium (tests/run installs Debian's chromium)");
    assert!(
        output.status.success(),
        "chromium failed on {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!log.contains("Content Security Policy"), "{log}");
    String::from_utf8(output.stdout).unwrap()
}

/// A cache as the test made it: its name and the public key it shows.
struct Made {
    name: &'static str,
    public_key: String,
}

impl Made {
    #[track_caller]
    fn assert_listed(&self, dom: &str, listed: bool) {
        for what in [self.name, &self.public_key] {
            assert_eq!(dom.contains(what), listed, "{what} listed: {dom}");
        }
    }
}

async fn make(server: &TestServer, name: &'static str, public: bool) -> Made {
    let key = SigningKey::generate(&format!("{name}-1")).unwrap();
    server.create_cache(name, public, &key).await;
    Made {
        name,
        public_key: key.verifying_key().to_string(),
    }
}

/// `http://user:token@host:port/?login`: chromium answers the page's
/// Basic challenge with these credentials.
fn signed_in(server: &TestServer, token: &str) -> String {
    let address = server.url.strip_prefix("http://").unwrap();
    format!("http://ci:{token}@{address}/?login")
}

async fn browser_sees_only_the_caches_its_token_may_pull(deployment: Deployment) {
    let server = TestServer::start(deployment).await;
    let open = make(&server, "open-cache", true).await;
    let team_a = make(&server, "team-alpha", false).await;
    let team_b = make(&server, "team-bravo", false).await;
    for (cache, byte, size) in [("open-cache", 1, 1000), ("team-alpha", 2, 3000)] {
        let base = format!("0123456789abcdfghijklmnpqrsvwxyz-{cache}");
        publish_nar(&server.state, cache, &base, vec![byte; size]).await;
    }

    // Anonymous: the public cache, with its figures and how to attach.
    let url = server.url.clone();
    let dom = common::blocking(move || dump_dom(&format!("{url}/"))).await;
    assert!(dom.contains("<h1>garret</h1>"), "{dom}");
    open.assert_listed(&dom, true);
    team_a.assert_listed(&dom, false);
    team_b.assert_listed(&dom, false);
    assert!(dom.contains("<data value=\"1000\">"), "{dom}");
    assert!(
        dom.contains(&format!("substituters = {}/open-cache", server.url)),
        "{dom}"
    );
    assert!(dom.contains("--remote_instance_name=open-cache"), "{dom}");
    // Store totals include the private caches: not for this viewer.
    assert!(!dom.contains("id=\"store\""), "{dom}");
    assert!(!dom.contains("<data value=\"3000\">"), "{dom}");

    // A token that may pull from team-alpha sees it too, not team-bravo.
    let token = server.token(&[("team-alpha", Permission::PULL)]);
    let url = signed_in(&server, &token);
    let dom = common::blocking(move || dump_dom(&url)).await;
    open.assert_listed(&dom, true);
    team_a.assert_listed(&dom, true);
    team_b.assert_listed(&dom, false);
    assert!(dom.contains("token <code>e2e</code>"), "{dom}");
    assert!(dom.contains("password &lt;TOKEN&gt;"), "netrc line: {dom}");
    assert!(!dom.contains(&token), "the page never shows the token");
    assert!(!dom.contains("id=\"store\""), "{dom}");

    // A token that may pull everywhere sees every cache and the store.
    let token = server.token(&[("*", Permission::PULL)]);
    let url = signed_in(&server, &token);
    let dom = common::blocking(move || dump_dom(&url)).await;
    for cache in [&open, &team_a, &team_b] {
        cache.assert_listed(&dom, true);
    }
    assert!(dom.contains("id=\"store\""), "{dom}");
    assert!(
        dom.contains("<data value=\"4000\">"),
        "logical bytes: {dom}"
    );
    assert!(
        dom.contains("id=\"hit-rates\"") && dom.contains("<th scope=\"row\">narinfo</th>"),
        "{dom}"
    );
    assert!(
        dom.contains("<dt>Last run</dt><dd>none recorded yet"),
        "{dom}"
    );

    // A token signed by another server is refused, not taken as anonymous:
    // not even the public cache shows. (Headless chromium renders nothing
    // for a challenge it cannot answer; a person gets the prompt again.)
    let url = signed_in(&server, &stranger_token());
    let dom = common::blocking(move || dump_dom(&url)).await;
    for cache in [&open, &team_a, &team_b] {
        cache.assert_listed(&dom, false);
    }
}

/// A token for every cache, signed by another server's key.
fn stranger_token() -> String {
    let stranger = TokenAuthority::hs256_base64(&STANDARD.encode([7u8; 64])).unwrap();
    let mut spec = TokenSpec::new("e2e", std::time::Duration::from_hours(1));
    spec.grant("*".parse().unwrap(), Permission::PULL);
    stranger.mint(&spec).unwrap()
}

async fn page_headers_and_sign_in_challenge(deployment: Deployment) {
    let server = TestServer::start(deployment).await;
    let private = make(&server, "hidden", false).await;
    let client = reqwest::Client::new();
    let get = |query: &str| client.get(format!("{}/{query}", server.url));

    let page = get("").send().await.unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-store");
    let policy = headers["content-security-policy"].to_str().unwrap();
    assert!(
        policy.starts_with("default-src 'none'; style-src 'sha256-"),
        "{policy}"
    );
    // Anonymous viewers are not prompted for credentials.
    assert!(!headers.contains_key("www-authenticate"));
    assert!(!page.text().await.unwrap().contains(private.name));

    // `?login` challenges until credentials come.
    let challenge = get("?login").send().await.unwrap();
    assert_eq!(challenge.status(), 401);
    assert_eq!(
        challenge.headers()["www-authenticate"],
        "Basic realm=\"garret\", charset=\"UTF-8\""
    );
    assert_eq!(
        challenge.headers()["content-type"],
        "text/html; charset=utf-8"
    );

    // A Bearer token works as Basic does, with or without `?login`.
    let token = server.token(&[("hidden", Permission::PULL)]);
    for query in ["", "?login"] {
        let page = get(query).bearer_auth(&token).send().await.unwrap();
        assert_eq!(page.status(), 200);
        let body = page.text().await.unwrap();
        private.assert_listed(&body, true);
    }
    // Push alone does not list a private cache: listing is reading.
    let pusher = server.token(&[("hidden", Permission::PUSH)]);
    let body = get("")
        .bearer_auth(&pusher)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    private.assert_listed(&body, false);

    // An unusable token is refused with the reason and a new challenge.
    let refused = get("").bearer_auth(stranger_token()).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert!(refused.headers().contains_key("www-authenticate"));
    let body = refused.text().await.unwrap();
    assert!(body.contains("<h1>401 Unauthorized</h1>"), "{body}");
    assert!(body.contains("signature does not verify"), "{body}");
    assert!(!body.contains(private.name), "{body}");
}
