//! Liveness and readiness against a real server: `/healthz` answers
//! whenever the process serves; `/readyz` and gRPC health follow whether
//! the database and blob store answer, turning unready when the S3 server
//! stops or Postgres stops answering, and ready again when they return,
//! without a restart of garret.

use std::time::Duration;

use garret_proto::health::HealthCheckRequest;
use garret_proto::health::health_check_response::ServingStatus;
use garret_proto::health::health_client::HealthClient;

mod common;

use common::{Deployment, TestServer, on_both};

on_both! {
    ready_once_dependencies_answer,
}

async fn start(deployment: Deployment) -> TestServer {
    TestServer::start_configured(deployment, |config| config.readiness_interval_secs = 1).await
}

/// `/readyz`'s status code and body.
async fn readyz(server: &TestServer) -> (u16, serde_json::Value) {
    let response = reqwest::get(format!("{}/readyz", server.url))
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Polls `/readyz` (every 100 ms, for at most 15 s) until it answers `code`.
async fn until_readyz(server: &TestServer, code: u16) -> serde_json::Value {
    for _ in 0..150 {
        let (status, body) = readyz(server).await;
        if status == code {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz never answered {code}: {:?}", readyz(server).await);
}

async fn grpc_status(server: &TestServer, service: &str) -> i32 {
    let channel = tonic::transport::Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

async fn ready_once_dependencies_answer(deployment: Deployment) {
    let server = start(deployment).await;
    let body = until_readyz(&server, 200).await;
    assert_eq!(body["ready"], true, "{body}");
    let live = reqwest::get(format!("{}/healthz", server.url))
        .await
        .unwrap();
    assert_eq!(
        (live.status().as_u16(), live.text().await.unwrap()),
        (200, "ok\n".into())
    );
    let cas = "build.bazel.remote.execution.v2.ContentAddressableStorage";
    assert_eq!(
        grpc_status(&server, cas).await,
        ServingStatus::Serving as i32
    );
}

/// The S3 server goes away and comes back: readiness follows, liveness
/// never changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_an_s3_outage() {
    let mut server = start(Deployment::PostgresS3).await;
    until_readyz(&server, 200).await;
    server.s3.as_mut().unwrap().stop();
    let body = until_readyz(&server, 503).await;
    let problems = body["problems"].to_string();
    assert!(problems.contains("blob store"), "{body}");
    let live = reqwest::get(format!("{}/healthz", server.url))
        .await
        .unwrap();
    assert_eq!(live.status().as_u16(), 200);
    assert_eq!(
        grpc_status(&server, "").await,
        ServingStatus::NotServing as i32
    );
    server.s3.as_mut().unwrap().restart().await.unwrap();
    until_readyz(&server, 200).await;
    assert_eq!(
        grpc_status(&server, "").await,
        ServingStatus::Serving as i32
    );
}

/// Postgres stops answering (its processes frozen, as behind a partition)
/// and comes back: readiness follows. A cluster of its own, since the
/// shared one serves the other tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_postgres_outage() {
    let cluster = garret_meta::testing::PgCluster::start();
    let url = cluster.fresh_database().await;
    let server = TestServer::start_configured(Deployment::SqliteFs, |config| {
        config.readiness_interval_secs = 1;
        config.database_url = Some(url);
    })
    .await;
    until_readyz(&server, 200).await;
    let paused = Paused::new(&cluster);
    let body = until_readyz(&server, 503).await;
    drop(paused);
    assert!(body["problems"].to_string().contains("database"), "{body}");
    until_readyz(&server, 200).await;
}

/// A paused cluster, resumed when dropped, a failed assertion included: a
/// frozen Postgres would hang the cluster's own teardown.
struct Paused<'a>(&'a garret_meta::testing::PgCluster);

impl<'a> Paused<'a> {
    fn new(cluster: &'a garret_meta::testing::PgCluster) -> Self {
        cluster.pause();
        Self(cluster)
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.resume();
    }
}
