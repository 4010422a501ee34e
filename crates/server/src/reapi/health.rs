//! grpc.health.v1: the server is serving whenever it answers. Per-service
//! names are accepted for the services garret implements.

use std::pin::Pin;

use futures::{Stream, StreamExt as _, stream};
use garret_proto::health::health_check_response::ServingStatus;
use garret_proto::health::health_server::Health;
use garret_proto::health::{HealthCheckRequest, HealthCheckResponse};
use tonic::{Request, Response, Status};

#[derive(Debug, Clone, Copy)]
pub(crate) struct HealthService;

const SERVICES: &[&str] = &[
    "",
    "build.bazel.remote.execution.v2.ActionCache",
    "build.bazel.remote.execution.v2.Capabilities",
    "build.bazel.remote.execution.v2.ContentAddressableStorage",
    "google.bytestream.ByteStream",
];

fn status(service: &str) -> Option<HealthCheckResponse> {
    SERVICES.contains(&service).then_some(HealthCheckResponse {
        status: ServingStatus::Serving as i32,
    })
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        status(&request.get_ref().service)
            .map(Response::new)
            .ok_or_else(|| Status::not_found("unknown service"))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    /// One answer, then the stream stays open: the status never changes
    /// while the process runs.
    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let current = status(&request.get_ref().service).unwrap_or(HealthCheckResponse {
            status: ServingStatus::ServiceUnknown as i32,
        });
        Ok(Response::new(
            stream::once(async move { Ok(current) })
                .chain(stream::pending())
                .boxed(),
        ))
    }
}
