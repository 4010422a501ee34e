//! `GET /metrics` after real Nix and Bazel traffic: every counter moved by
//! exactly what the traffic did, and no label names a path or a digest.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::grpc::{GrpcServer, digest, hex};
use common::{Deployment, on_both};
use garret_nix::{Sha256Hash, StorePathHash};
use garret_proto::reapi::GetActionResultRequest;

on_both! {
    counters_move_by_what_the_traffic_did,
    gc_runs_show_from_the_database_record,
}

/// One scrape: each series (name and labels) and its value.
#[derive(Debug)]
struct Scrape(Vec<Series>);

#[derive(Debug)]
struct Series {
    name: String,
    labels: BTreeMap<String, String>,
    /// As printed: counts are integers, times may have fractions.
    value: String,
}

impl Scrape {
    /// Parses the text exposition: `name{key="value",…} number` lines
    /// (label values may hold `{`, `}` and `,`, and escape `"` and `\`),
    /// skipping `#` lines.
    fn parse(text: &str) -> Self {
        let mut series = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let name_end = line.find(['{', ' ']).unwrap();
            let name = line[..name_end].to_owned();
            let mut labels = BTreeMap::new();
            let mut rest = &line[name_end..];
            if let Some(inner) = rest.strip_prefix('{') {
                let mut chars = inner.char_indices();
                let mut key = String::new();
                loop {
                    let (i, c) = chars.next().unwrap();
                    match c {
                        '}' => {
                            rest = &inner[i + 1..];
                            break;
                        }
                        ',' => {}
                        '=' => {
                            assert_eq!(chars.next().unwrap().1, '"', "{line}");
                            let mut value = String::new();
                            loop {
                                match chars.next().unwrap().1 {
                                    '"' => break,
                                    '\\' => value.push(match chars.next().unwrap().1 {
                                        'n' => '\n',
                                        other => other,
                                    }),
                                    other => value.push(other),
                                }
                            }
                            labels.insert(std::mem::take(&mut key), value);
                        }
                        other => key.push(other),
                    }
                }
            }
            let value = rest.trim().split(' ').next().unwrap().to_owned();
            series.push(Series {
                name,
                labels,
                value,
            });
        }
        Self(series)
    }

    /// The series called `name` that carry all of `labels`.
    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Series> {
        self.0.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the counts (or integer gauges) called `name` that carry
    /// all of `labels`; 0 if there are none.
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.matching(name, labels)
            .map(|s| {
                s.value
                    .parse::<u64>()
                    .unwrap_or_else(|e| panic!("{s:?}: {e}"))
            })
            .sum()
    }

    /// The one value called `name`, which may have a fraction.
    fn number(&self, name: &str) -> f64 {
        let series: Vec<&Series> = self.matching(name, &[]).collect();
        assert_eq!(series.len(), 1, "{name}: {series:?}");
        series[0].value.parse().unwrap()
    }

    fn label_values(&self) -> impl Iterator<Item = &str> {
        self.0
            .iter()
            .flat_map(|s| s.labels.values().map(String::as_str))
    }
}

async fn scrape(url: &str) -> Scrape {
    let response = reqwest::get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    Scrape::parse(&text)
}

/// Scrapes until `done` holds: a request is counted when its response
/// body has been sent, which the client may see a moment before.
async fn scrape_until(url: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scraped = scrape(url).await;
        if done(&scraped) {
            return scraped;
        }
        assert!(Instant::now() < deadline, "never reached: {scraped:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `len` bytes that no other seed repeats, so no chunk is shared by
/// accident.
fn noise(seed: u8, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut block = 0u64;
    while out.len() < len {
        let mut input = vec![seed];
        input.extend_from_slice(&block.to_le_bytes());
        out.extend_from_slice(Sha256Hash::of(&input).as_bytes());
        block += 1;
    }
    out.truncate(len);
    out
}

/// The growth of the counts `name{labels}` between two scrapes.
fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> u64 {
    after.count(name, labels) - before.count(name, labels)
}

/// A length as the counts compare it.
fn len(data: &[u8]) -> u64 {
    data.len() as u64
}

const LOOKUPS: &str = "garret_cache_lookups_total";
const REQUESTS: &str = "garret_requests_total";

#[allow(clippy::too_many_lines, reason = "one story of traffic and its counts")]
async fn counters_move_by_what_the_traffic_did(deployment: Deployment) {
    let server = GrpcServer::start(deployment).await;
    let url = server.http.url.clone();
    let http = reqwest::Client::new();
    let before = scrape(&url).await;
    assert_eq!(
        before.count(
            "garret_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1
    );
    assert!(before.number("garret_process_start_time_seconds") > 1.0e9);

    // Nix: one NAR under two store paths (the second is deduplicated
    // whole); narinfo 2 hits and 1 miss, the NAR once.
    let nar = noise(1, 300_000);
    let [a, b, c] = [1u8, 2, 3].map(|seed| StorePathHash::from_bytes([seed; 20]).to_string());
    for hash in [&a, &b] {
        common::publish_nar(
            &server.http.state,
            "pub",
            &format!("{hash}-demo"),
            nar.clone(),
        )
        .await;
    }
    for (hash, status) in [(&a, 200), (&b, 200), (&c, 404)] {
        let response = http
            .get(format!("{url}/pub/{hash}.narinfo"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{hash}");
        response.bytes().await.unwrap();
    }
    let response = http
        .get(format!("{url}/pub/nar/{a}.nar"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let nar_file = response.bytes().await.unwrap();

    // Bazel's HTTP cache: a blob stored, read (hit), another read (miss).
    let blob = noise(2, 100_000);
    let absent = noise(3, 10);
    let response = http
        .put(format!("{url}/main/cas/{}", hex(&blob)))
        .bearer_auth(&server.token)
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for (data, status) in [(&blob, 200), (&absent, 404)] {
        let response = http
            .get(format!("{url}/main/cas/{}", hex(data)))
            .bearer_auth(&server.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status);
        response.bytes().await.unwrap();
    }

    // REAPI: a small blob by BatchUpdateBlobs, FindMissingBlobs (one hit,
    // one miss, the hit asked twice), the HTTP blob by ByteStream (a hit),
    // and an action result that is not there.
    let small = noise(4, 1000);
    server.put(&[&small]).await;
    let missing = server
        .missing(&[digest(&blob), digest(&absent), digest(&blob)])
        .await;
    assert_eq!(missing, [digest(&absent)]);
    let read = server
        .read(&format!("blobs/{}/{}", hex(&blob), blob.len()), 0, 0)
        .await
        .unwrap();
    assert_eq!(read, blob);
    let status = server
        .ac()
        .get_action_result(server.req(GetActionResultRequest {
            action_digest: Some(digest(b"an action never run")),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);

    let reapi = |service: &str, method: &str| {
        format!("/build.bazel.remote.execution.v2.{service}/{method}")
    };
    let find_missing = reapi("ContentAddressableStorage", "FindMissingBlobs");
    let get_action_result = reapi("ActionCache", "GetActionResult");
    let expected_requests: Vec<(Vec<(&str, &str)>, u64)> = vec![
        (
            vec![
                ("protocol", "nix"),
                ("route", "/{cache}/{file}"),
                ("status_class", "2xx"),
            ],
            2,
        ),
        (
            vec![
                ("protocol", "nix"),
                ("route", "/{cache}/{file}"),
                ("status_class", "4xx"),
            ],
            1,
        ),
        (
            vec![
                ("protocol", "nix"),
                ("route", "/{cache}/nar/{file}"),
                ("status_class", "2xx"),
            ],
            1,
        ),
        (
            vec![
                ("protocol", "bazel-http"),
                ("route", "/{cache}/cas/{hash}"),
                ("status_class", "2xx"),
            ],
            2,
        ),
        (
            vec![
                ("protocol", "bazel-http"),
                ("route", "/{cache}/cas/{hash}"),
                ("status_class", "4xx"),
            ],
            1,
        ),
        (
            vec![
                ("protocol", "reapi"),
                ("route", &find_missing),
                ("status_class", "2xx"),
                ("grpc_code", "OK"),
            ],
            1,
        ),
        (
            vec![
                ("protocol", "reapi"),
                ("route", &get_action_result),
                ("status_class", "4xx"),
                ("grpc_code", "NOT_FOUND"),
            ],
            1,
        ),
        (
            vec![
                ("protocol", "reapi"),
                ("route", "/google.bytestream.ByteStream/Read"),
                ("status_class", "2xx"),
                ("grpc_code", "OK"),
            ],
            1,
        ),
    ];
    let after = scrape_until(&url, |now| {
        expected_requests
            .iter()
            .all(|(labels, n)| delta(&before, now, REQUESTS, labels) >= *n)
    })
    .await;
    for (labels, n) in &expected_requests {
        assert_eq!(delta(&before, &after, REQUESTS, labels), *n, "{labels:?}");
    }
    assert_eq!(
        delta(
            &before,
            &after,
            "garret_request_duration_seconds_count",
            &[("route", "/{cache}/{file}")]
        ),
        3
    );

    // Hits and misses, once per lookup.
    for (kind, hits, misses) in [
        ("narinfo", 2, 1),
        ("nar", 1, 0),
        ("cas", 2, 1),
        ("cas_find_missing", 1, 1),
        ("action_result", 0, 1),
    ] {
        for (result, n) in [("hit", hits), ("miss", misses)] {
            let labels = [("kind", kind), ("result", result)];
            assert_eq!(
                delta(&before, &after, LOOKUPS, &labels),
                n,
                "{kind} {result}"
            );
        }
    }
    let metrics = &server.http.state.metrics;
    assert_eq!(metrics.hits(garret_server::metrics::Lookup::Narinfo), 2);
    assert_eq!(
        metrics.misses(garret_server::metrics::Lookup::ActionResult),
        1
    );

    // Upload bytes: the NAR once new and once deduplicated, the blobs new.
    let uploaded = |kind| {
        delta(
            &before,
            &after,
            "garret_upload_bytes_total",
            &[("kind", kind)],
        )
    };
    let new = len(&nar) + len(&blob) + len(&small);
    assert_eq!(uploaded("new"), new);
    assert_eq!(uploaded("deduplicated"), len(&nar));
    assert_eq!(after.count("garret_uploads_in_flight", &[]), 0);

    // Bytes in and out, by protocol: exactly the body of the one PUT in;
    // at least the NAR's stored frames out.
    assert_eq!(
        delta(
            &before,
            &after,
            "garret_received_bytes_total",
            &[("protocol", "bazel-http")]
        ),
        len(&blob)
    );
    assert!(
        delta(
            &before,
            &after,
            "garret_sent_bytes_total",
            &[("protocol", "nix")]
        ) >= len(&nar_file)
    );

    // Storage and database operations were timed, and none failed.
    for (dependency, ops) in [
        ("storage", &["get", "write", "finish", "sync"]),
        (
            "database",
            &[
                "commit_blobs",
                "put_cas_entries",
                "cas_blob",
                "get_action_result",
            ],
        ),
    ] {
        let timed = format!("garret_{dependency}_operation_duration_seconds_count");
        for op in ops {
            let count = delta(&before, &after, &timed, &[("op", op)]);
            assert!(count >= 1, "{dependency} {op}: {count}");
        }
        let failed = format!("garret_{dependency}_operation_errors_total");
        assert_eq!(after.count(&failed, &[]), 0, "{dependency}");
    }

    // No label names a store path or a digest.
    let named = [&a, &b, &c]
        .map(ToString::to_string)
        .into_iter()
        .chain([&nar, &blob, &absent, &small].map(|d| hex(d)));
    let values: Vec<&str> = after.label_values().collect();
    for secret in named {
        assert!(
            !values.iter().any(|v| v.contains(&secret)),
            "{secret} in {values:?}"
        );
    }
    for value in &values {
        let longest_word = value
            .split(|c: char| !c.is_ascii_alphanumeric())
            .map(str::len)
            .max()
            .unwrap_or(0);
        assert!(longest_word < 32, "{value} looks like a hash");
    }
}

async fn gc_runs_show_from_the_database_record(deployment: Deployment) {
    let server = common::TestServer::start(deployment).await;
    let state = &server.state;
    let before = scrape(&server.url).await;
    assert_eq!(
        before.count("garret_gc_last_success_timestamp_seconds", &[]),
        0
    );
    // As `garret gc` (a CronJob) runs it: beside the server, on the same
    // database.
    let report = garret_server::gc::collect_and_record(
        &state.meta,
        state.blobs.store(),
        &garret_server::config::Gc::default(),
        garret_server::clock::unix_now(),
        false,
        &|_, _| {},
    )
    .await
    .unwrap();
    let after = scrape(&server.url).await;
    let finished = after.count("garret_gc_last_success_timestamp_seconds", &[]);
    assert!(
        finished + 60 >= garret_server::clock::unix_now().unsigned_abs(),
        "{finished}"
    );
    assert_eq!(
        after.count("garret_gc_last_run_timestamp_seconds", &[]),
        finished
    );
    assert_eq!(after.count("garret_gc_last_run_succeeded", &[]), 1);
    assert_eq!(
        after.count("garret_gc_last_success_removed", &[("what", "chunks")]),
        report.chunks
    );
    // A dry run changes nothing, so it is not recorded.
    garret_server::gc::collect_and_record(
        &state.meta,
        state.blobs.store(),
        &garret_server::config::Gc::default(),
        garret_server::clock::unix_now() + 100,
        true,
        &|_, _| {},
    )
    .await
    .unwrap();
    let again = scrape(&server.url).await;
    assert_eq!(
        again.count("garret_gc_last_run_timestamp_seconds", &[]),
        finished
    );
}
