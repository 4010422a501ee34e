//! The page itself: semantic HTML (headings, tables with header cells,
//! definition lists, `pre`/`code` for what to paste) that reads without its
//! small stylesheet, and no script at all.

use std::sync::LazyLock;
use std::time::Duration;

use base64::Engine as _;
use garret_meta::ChunkStats;

use super::facts::CacheFacts;
use super::html::Html;
use super::{HitRates, HitsMisses};
use crate::gc::GcReport;
use crate::http::public_urls::PublicUrls;
use crate::units::{describe_retention, format_duration, format_size};

/// The whole stylesheet; the `Content-Security-Policy` admits exactly
/// this text by its hash.
const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:72rem;margin:1rem auto;\
padding:0 1rem;line-height:1.4}table{border-collapse:collapse}th,td{border:1px solid #ccc;\
padding:.2rem .5rem;text-align:left}td.n{text-align:right}pre{background:#f4f4f4;\
padding:.5rem;overflow-x:auto}dt{font-weight:bold}section.cache{border-top:1px solid #ccc}";

/// The `Content-Security-Policy` of every page: nothing may load or run,
/// only the inline stylesheet above (by hash) applies, and no form or
/// frame may use the page.
pub static CONTENT_SECURITY_POLICY: LazyLock<String> = LazyLock::new(|| {
    let hash = garret_nix::Sha256Hash::of(STYLE.as_bytes());
    let hash = base64::engine::general_purpose::STANDARD.encode(hash.as_bytes());
    format!(
        "default-src 'none'; style-src 'sha256-{hash}'; base-uri 'none'; \
         form-action 'none'; frame-ancestors 'none'"
    )
});

/// Who is looking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    Anonymous,
    /// A token, by its subject if it has one.
    Token(Option<String>),
}

/// Everything one view of the page shows. What the viewer may not see is
/// already left out: `caches` holds only the caches it may pull from, and
/// `server_wide` is `None` unless it may pull from every cache (store
/// totals, hit rates and GC counts include the private caches).
#[derive(Debug)]
pub struct View<'a> {
    pub uptime: Duration,
    pub viewer: Viewer,
    pub urls: &'a PublicUrls,
    pub caches: Vec<&'a CacheFacts>,
    /// How old the figures are (they are gathered every few seconds).
    pub facts_age: Duration,
    pub gc: GcView,
    pub server_wide: Option<ServerWide>,
}

/// Garbage collection as this process knows it.
#[derive(Debug)]
pub struct GcView {
    /// `gc.interval_secs`; zero: `serve` does not collect.
    pub interval_secs: u64,
    pub default_retention: Option<Duration>,
    /// The last run and the last successful one, as recorded in the
    /// database by whichever process ran them.
    pub runs: garret_meta::GcRuns,
    /// Unix seconds, to say how long ago the last run finished.
    pub now: i64,
}

/// Figures over every cache together.
#[derive(Debug)]
pub struct ServerWide {
    /// Logical bytes of every cache (see `Facts::logical_bytes`).
    pub logical_bytes: u64,
    pub store: ChunkStats,
    pub hit_rates: HitRates,
}

/// The status page for `view`.
pub fn page(view: &View<'_>) -> String {
    let mut html = Html::default();
    head(&mut html, "garret status");
    html.raw("<header><h1>garret</h1><p>A Nix binary cache (Attic-compatible) and a Bazel remote cache on one chunked store.</p></header><main>");
    server(&mut html, view);
    caches(&mut html, view);
    if let Some(wide) = &view.server_wide {
        store(&mut html, wide);
        hit_rates(&mut html, &wide.hit_rates);
    }
    gc(&mut html, &view.gc, view.server_wide.is_some());
    html.raw("</main></body></html>\n");
    html.into_string()
}

/// A page that only says why the status page is not shown: a refused or
/// missing token, or a failure of the server.
pub fn error_page(status: &str, message: &str) -> String {
    let mut html = Html::default();
    head(&mut html, status);
    html.raw("<main><h1>")
        .text(status)
        .raw("</h1><p>")
        .text(message)
        .raw("</p>");
    html.raw(SIGN_IN_HELP)
        .raw("<p><a href=\"/\">Public caches only</a></p></main></body></html>\n");
    html.into_string()
}

/// How a browser signs in, said wherever it may be needed.
const SIGN_IN_HELP: &str = "<p>To see private caches, sign in with any user name and a garret \
token as the password (the token needs the pull permission on a cache to list it). Tokens are \
never accepted in the URL, where logs and browser history would keep them.</p>";

fn head(html: &mut Html, title: &str) {
    html.raw("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>")
        .text(title)
        .raw("</title><style>")
        .raw(STYLE)
        .raw("</style></head><body>");
}

fn server(html: &mut Html, view: &View<'_>) {
    html.raw("<section id=\"server\"><h2>Server</h2><dl><dt>Version</dt><dd>")
        .text(env!("CARGO_PKG_VERSION"))
        .raw("</dd><dt>Uptime</dt><dd>")
        .text(format_duration(Duration::from_secs(view.uptime.as_secs())))
        .raw("</dd><dt>API endpoint</dt><dd><code>")
        .text(&view.urls.api)
        .raw("</code></dd><dt>Viewing as</dt><dd>");
    match &view.viewer {
        Viewer::Anonymous => {
            html.raw("anonymous: public caches only. <a href=\"/?login\">Sign in with a token</a> to see private ones.");
        }
        Viewer::Token(Some(subject)) => {
            html.raw("token <code>").text(subject).raw("</code>");
        }
        Viewer::Token(None) => {
            html.raw("a token without a subject");
        }
    }
    html.raw("</dd><dt>Figures as of</dt><dd>")
        .text(format_duration(Duration::from_secs(
            view.facts_age.as_secs(),
        )))
        .raw(" ago (gathered at most every few seconds)</dd></dl></section>");
}

fn caches(html: &mut Html, view: &View<'_>) {
    html.raw("<section id=\"caches\"><h2>Caches</h2>");
    if view.caches.is_empty() {
        html.raw("<p>No cache to show.</p>");
    } else {
        cache_table(html, &view.caches);
    }
    if view.server_wide.is_none() {
        html.raw(SIGN_IN_HELP);
    }
    for cache in &view.caches {
        cache_section(html, cache, view.urls, view.gc.default_retention);
    }
    html.raw("</section>");
}

fn cache_table(html: &mut Html, caches: &[&CacheFacts]) {
    html.raw("<table><caption>Logical contents: what clients uploaded and can download. Bytes shared with other caches count in each.</caption><thead><tr><th scope=\"col\">Cache</th><th scope=\"col\">Access</th><th scope=\"col\">Nix objects</th><th scope=\"col\">NAR bytes</th><th scope=\"col\">CAS entries</th><th scope=\"col\">CAS bytes</th><th scope=\"col\">Action results</th><th scope=\"col\">Logical bytes</th></tr></thead><tbody>");
    for cache in caches {
        let usage = &cache.usage;
        html.raw("<tr><th scope=\"row\"><a href=\"#cache-")
            .text(&cache.name)
            .raw("\">")
            .text(&cache.name)
            .raw("</a></th><td>")
            .text(access(cache.is_public))
            .raw("</td><td class=\"n\">")
            .text(usage.nix_objects)
            .raw("</td><td class=\"n\">");
        bytes(html, usage.nix_bytes);
        html.raw("</td><td class=\"n\">")
            .text(usage.cas_entries)
            .raw("</td><td class=\"n\">");
        bytes(html, usage.cas_bytes);
        html.raw("</td><td class=\"n\">")
            .text(usage.action_results)
            .raw("</td><td class=\"n\">");
        bytes(html, usage.logical_bytes());
        html.raw("</td></tr>");
    }
    html.raw("</tbody></table>");
}

fn access(is_public: bool) -> &'static str {
    if is_public { "public" } else { "private" }
}

fn cache_section(
    html: &mut Html,
    cache: &CacheFacts,
    urls: &PublicUrls,
    default_retention: Option<Duration>,
) {
    html.raw("<section class=\"cache\" id=\"cache-")
        .text(&cache.name)
        .raw("\"><h3>")
        .text(&cache.name)
        .raw("</h3><dl><dt>Access</dt><dd>")
        .raw(if cache.is_public {
            "public: anyone may pull; pushing needs a token"
        } else {
            "private: pulling needs a token"
        })
        .raw("</dd><dt>Public key</dt><dd>");
    match &cache.public_key {
        Some(key) => html.raw("<code>").text(key).raw("</code>"),
        None => html.raw("unreadable (see the server log)"),
    };
    html.raw("</dd><dt>Retention of unaccessed objects</dt><dd>")
        .text(describe_retention(
            cache.retention_period,
            default_retention,
        ))
        .raw("</dd><dt>Bazel CAS budget</dt><dd>")
        .text(
            cache
                .cas_budget_bytes
                .map_or_else(|| "none".to_owned(), format_size),
        )
        .raw("</dd></dl>");
    attach_nix(html, cache, urls);
    attach_bazel(html, cache, urls);
    html.raw("</section>");
}

/// How Nix and the `attic` client use the cache.
fn attach_nix(html: &mut Html, cache: &CacheFacts, urls: &PublicUrls) {
    html.raw("<h4>Nix</h4><p>In <code>nix.conf</code>:</p><pre><code>substituters = ")
        .text(urls.substituter(cache.name.as_str()))
        .raw("\ntrusted-public-keys = ")
        .text(cache.public_key.as_deref().unwrap_or("(unreadable)"))
        .raw("</code></pre>");
    if !cache.is_public {
        html.raw("<p>Nix sends the token from a netrc file (<code>netrc-file = /etc/nix/netrc</code> in <code>nix.conf</code>):</p><pre><code>machine ")
            .text(host(&urls.substituter_base))
            .raw(" password &lt;TOKEN&gt;</code></pre>");
    }
    html.raw("<p>With the <code>attic</code> client (it writes both for you):</p><pre><code>attic login garret ")
        .text(&urls.api)
        .raw(if cache.is_public { "" } else { " &lt;TOKEN&gt;" })
        .raw("\nattic use garret:")
        .text(&cache.name)
        .raw("</code></pre>");
}

/// Bazel's flags for the cache over REAPI (gRPC) and over its HTTP cache.
fn attach_bazel(html: &mut Html, cache: &CacheFacts, urls: &PublicUrls) {
    let header = " --remote_header=\"Authorization=Bearer &lt;TOKEN&gt;\"";
    html.raw("<h4>Bazel</h4><p>")
        .raw(if cache.is_public {
            "Reads need no token; uploads need one with push."
        } else {
            "Every request needs a token (pull to read, push to upload)."
        })
        .raw("</p><pre><code>bazel build --remote_cache=")
        .text(grpc_target(&urls.api))
        .raw(" --remote_instance_name=")
        .text(&cache.name)
        .raw(header)
        .raw(" //...\n# or Bazel's HTTP cache:\nbazel build --remote_cache=")
        .text(&urls.api)
        .text(&cache.name)
        .raw(header)
        .raw(" //...</code></pre>");
}

/// The gRPC target of the server at `api` (`http://host:port/…`):
/// `grpc://host:port`, or `grpcs://` behind TLS. gRPC has no path, so a
/// path in `api` is left out.
fn grpc_target(api: &str) -> String {
    let (scheme, rest) = match api.strip_prefix("https://") {
        Some(rest) => ("grpcs", rest),
        None => ("grpc", api.strip_prefix("http://").unwrap_or(api)),
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{authority}")
}

/// The host a netrc `machine` line names for `url`: no scheme, port or
/// path, as curl (and so Nix) matches it.
fn host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    if authority.starts_with('[') {
        return authority.split_inclusive(']').next().unwrap_or(authority);
    }
    authority.split(':').next().unwrap_or(authority)
}

fn store(html: &mut Html, wide: &ServerWide) {
    let store = &wide.store;
    html.raw("<section id=\"store\"><h2>Store</h2><p>Chunks are stored once however many caches, objects or protocols use them, so stored bytes are counted for the whole store, not per cache. Chunks that await collection count until it runs.</p><dl><dt>Logical bytes, all caches</dt><dd>");
    bytes(html, wide.logical_bytes);
    html.raw("</dd><dt>Unique bytes (after deduplication)</dt><dd>");
    bytes(html, store.size);
    html.raw("</dd><dt>Stored bytes (compressed chunks)</dt><dd>");
    bytes(html, store.stored_size);
    html.raw("</dd><dt>Chunks</dt><dd>")
        .text(store.count)
        .raw("</dd><dt>Deduplication ratio (logical / unique)</dt><dd>")
        .text(ratio(wide.logical_bytes, store.size))
        .raw("</dd><dt>Overall ratio (logical / stored)</dt><dd>")
        .text(ratio(wide.logical_bytes, store.stored_size))
        .raw("</dd></dl></section>");
}

fn hit_rates(html: &mut Html, rates: &HitRates) {
    html.raw("<section id=\"hit-rates\"><h2>Hit rates</h2><table><thead><tr><th scope=\"col\">Lookup</th><th scope=\"col\">Hits</th><th scope=\"col\">Misses</th><th scope=\"col\">Hit rate</th></tr></thead><tbody>");
    for (what, counts) in [
        ("narinfo", rates.narinfo),
        ("NAR", rates.nar),
        ("Bazel CAS", rates.cas),
        ("Bazel action cache", rates.action_cache),
    ] {
        html.raw("<tr><th scope=\"row\">").text(what).raw("</th>");
        let HitsMisses { hits, misses } = counts;
        html.raw("<td class=\"n\">")
            .text(hits)
            .raw("</td><td class=\"n\">")
            .text(misses)
            .raw("</td><td class=\"n\">")
            .text(percent(hits, hits.saturating_add(misses)))
            .raw("</td>");
        html.raw("</tr>");
    }
    html.raw("</tbody></table></section>");
}

fn gc(html: &mut Html, gc: &GcView, details: bool) {
    html.raw("<section id=\"gc\"><h2>Garbage collection</h2><dl><dt>Inside this server</dt><dd>");
    if gc.interval_secs == 0 {
        html.raw(
            "off (<code>gc.interval_secs</code> = 0): run <code>garret gc</code> on a schedule",
        );
    } else {
        html.raw("every ")
            .text(format_duration(Duration::from_secs(gc.interval_secs)));
    }
    html.raw("</dd><dt>Default retention</dt><dd>")
        .text(describe_retention(None, gc.default_retention))
        .raw("</dd><dt>Last run</dt><dd>");
    match &gc.runs.last {
        None => {
            html.raw("none recorded yet");
        }
        Some(run) => {
            last_run(html, run, gc.now, details);
            if !run.succeeded {
                html.raw("</dd><dt>Last success</dt><dd>");
                match &gc.runs.last_success {
                    Some(success) => last_run(html, success, gc.now, details),
                    None => html.raw("never"),
                };
            }
        }
    }
    html.raw("</dd></dl></section>");
}

/// When `run` finished and how; its report (what it removed and freed)
/// only with `details`, for viewers who see every cache.
fn last_run<'h>(
    html: &'h mut Html,
    run: &garret_meta::GcRun,
    now: i64,
    details: bool,
) -> &'h mut Html {
    let ago = now.saturating_sub(run.finished_at).unsigned_abs();
    html.raw("finished ")
        .text(format_duration(Duration::from_secs(ago)))
        .raw(" ago: ");
    let report = run
        .report
        .as_deref()
        .and_then(|json| serde_json::from_str::<GcReport>(json).ok());
    match (run.succeeded, report, details) {
        (false, _, _) => html.raw("failed (see the log of the process that ran it)"),
        (true, Some(report), true) => html.text(report),
        (true, _, _) => html.raw("succeeded"),
    }
}

/// `bytes` for people, with the exact count for machines (and tests).
fn bytes(html: &mut Html, bytes: u64) {
    html.raw("<data value=\"")
        .text(bytes)
        .raw("\">")
        .text(human_size(bytes))
        .raw("</data>");
}

/// `bytes` in the largest binary unit it reaches, to one decimal.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    #[expect(clippy::cast_precision_loss, reason = "a size for display")]
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[expect(clippy::cast_precision_loss, reason = "a ratio for display")]
fn ratio(numerator: u64, denominator: u64) -> String {
    if denominator == 0 {
        return "n/a (nothing stored)".to_owned();
    }
    format!("{:.2}×", numerator as f64 / denominator as f64)
}

#[expect(clippy::cast_precision_loss, reason = "a ratio for display")]
fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "n/a (no lookups)".to_owned();
    }
    format!("{:.1} %", part as f64 * 100.0 / whole as f64)
}

#[cfg(test)]
mod tests {
    use garret_meta::CacheUsage;

    use super::*;
    use crate::auth::CacheName;

    fn facts(name: &str, is_public: bool, public_key: &str) -> CacheFacts {
        CacheFacts {
            name: CacheName::new(name).unwrap(),
            is_public,
            public_key: Some(public_key.to_owned()),
            usage: CacheUsage {
                nix_objects: 2,
                nix_bytes: 1536,
                ..CacheUsage::default()
            },
            retention_period: None,
            cas_budget_bytes: Some(50 << 30),
        }
    }

    fn urls(api: &str, substituter_base: &str) -> PublicUrls {
        PublicUrls {
            api: api.into(),
            substituter_base: substituter_base.into(),
        }
    }

    fn view<'a>(urls: &'a PublicUrls, caches: Vec<&'a CacheFacts>) -> View<'a> {
        View {
            uptime: Duration::from_secs(3723),
            viewer: Viewer::Token(Some("ci<bot>".into())),
            urls,
            caches,
            facts_age: Duration::from_secs(2),
            gc: GcView {
                interval_secs: 0,
                default_retention: Some(Duration::from_hours(30 * 24)),
                runs: garret_meta::GcRuns::default(),
                now: 0,
            },
            server_wide: None,
        }
    }

    #[test]
    fn every_runtime_value_is_escaped() {
        let urls = urls("https://cache.example/<x>/", "https://nix.example/\"q\"/");
        let cache = facts("main", true, "main-1:<script>alert('k')</script>");
        let html = page(&view(&urls, vec![&cache]));
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<x>"), "{html}");
        assert!(!html.contains("<bot>"), "{html}");
        assert!(html.contains("main-1:&lt;script&gt;alert(&#39;k&#39;)&lt;/script&gt;"));
        assert!(html.contains("token <code>ci&lt;bot&gt;</code>"));
        assert!(html.contains("substituters = https://nix.example/&quot;q&quot;/main"));
    }

    #[test]
    fn a_cache_shows_its_figures_settings_and_how_to_attach() {
        let urls = urls("http://10.0.0.1:8080/", "http://10.0.0.1:8080/");
        let open = facts("open", true, "open-1:AAAA");
        let private = facts("team", false, "team-1:BBBB");
        let html = page(&view(&urls, vec![&open, &private]));
        for expected in [
            "<h1>garret</h1>",
            "<dd>1h2m3s</dd>",
            "<th scope=\"row\"><a href=\"#cache-open\">open</a></th><td>public</td>",
            "<data value=\"1536\">1.5 KiB</data>",
            "global default (30d)",
            "<dd>50GiB</dd>",
            "substituters = http://10.0.0.1:8080/team\ntrusted-public-keys = team-1:BBBB",
            "machine 10.0.0.1 password &lt;TOKEN&gt;",
            "attic login garret http://10.0.0.1:8080/ &lt;TOKEN&gt;\nattic use garret:team",
            "attic login garret http://10.0.0.1:8080/\nattic use garret:open",
            "--remote_cache=grpc://10.0.0.1:8080 --remote_instance_name=team",
            "--remote_cache=http://10.0.0.1:8080/team --remote_header",
            "off (<code>gc.interval_secs</code> = 0)",
            "<dt>Last run</dt><dd>none recorded yet",
        ] {
            assert!(html.contains(expected), "{expected}: {html}");
        }
        // Only private caches get a netrc line.
        assert_eq!(html.matches("netrc-file").count(), 1);
        // Server-wide figures are for viewers of every cache only.
        assert!(!html.contains("id=\"store\""));
        assert!(!html.contains("id=\"hit-rates\""));
    }

    #[test]
    fn server_wide_figures_and_gc_details_for_full_viewers() {
        let urls = urls("https://cache.example/", "https://cache.example/");
        let mut full = view(&urls, Vec::new());
        full.server_wide = Some(ServerWide {
            logical_bytes: 3000,
            store: ChunkStats {
                count: 3,
                size: 1000,
                stored_size: 400,
            },
            hit_rates: HitRates {
                narinfo: HitsMisses { hits: 3, misses: 1 },
                ..HitRates::default()
            },
        });
        full.gc.interval_secs = 3600;
        full.gc.now = 100;
        let succeeded = garret_meta::GcRun {
            finished_at: 40,
            succeeded: true,
            report: Some(serde_json::to_string(&GcReport::default()).unwrap()),
        };
        full.gc.runs.last = Some(succeeded.clone());
        let html = page(&full);
        for expected in [
            "<dd>3.00×</dd>",
            "<dd>7.50×</dd>",
            "<td class=\"n\">3</td><td class=\"n\">1</td><td class=\"n\">75.0 %</td>",
            "<td class=\"n\">0</td><td class=\"n\">0</td><td class=\"n\">",
            "every 1h",
            "finished 1m ago: 0 Nix objects",
        ] {
            assert!(html.contains(expected), "{expected}: {html}");
        }
        assert!(!html.contains(SIGN_IN_HELP));

        full.server_wide = None;
        let html = page(&full);
        assert!(html.contains("finished 1m ago: succeeded"), "{html}");
        full.gc.runs.last = Some(garret_meta::GcRun {
            finished_at: 70,
            succeeded: false,
            report: None,
        });
        let html = page(&full);
        assert!(
            html.contains("finished 30s ago: failed (see the log of the process that ran it)</dd><dt>Last success</dt><dd>never"),
            "{html}"
        );
        full.gc.runs.last_success = Some(succeeded);
        assert!(page(&full).contains("<dt>Last success</dt><dd>finished 1m ago: succeeded"));
    }

    #[test]
    fn attach_targets() {
        assert_eq!(grpc_target("http://10.0.0.1:8080/"), "grpc://10.0.0.1:8080");
        assert_eq!(
            grpc_target("https://cache.example/garret/"),
            "grpcs://cache.example"
        );
        assert_eq!(host("http://10.0.0.1:8080/"), "10.0.0.1");
        assert_eq!(host("https://cache.example/garret/"), "cache.example");
        assert_eq!(host("http://[::1]:8080/"), "[::1]");
    }

    #[test]
    fn human_figures() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(5 << 30), "5.0 GiB");
        assert_eq!(human_size(u64::MAX), "16.0 EiB");
        assert_eq!(ratio(1, 0), "n/a (nothing stored)");
        assert_eq!(percent(0, 0), "n/a (no lookups)");
    }

    #[test]
    fn the_policy_admits_the_stylesheet_by_its_hash() {
        let hash = garret_nix::Sha256Hash::of(STYLE.as_bytes());
        let hash = base64::engine::general_purpose::STANDARD.encode(hash.as_bytes());
        assert!(CONTENT_SECURITY_POLICY.contains(&format!("style-src 'sha256-{hash}'")));
        assert!(CONTENT_SECURITY_POLICY.starts_with("default-src 'none';"));
        let error = error_page("401 Unauthorized", "bad <token>");
        assert!(error.contains(&format!("<style>{STYLE}</style>")));
        assert!(error.contains("bad &lt;token&gt;"));
    }
}
