//! grpc.health.v1: every service garret implements is serving while the
//! database and blob store answered the last readiness check (see
//! `crate::readiness`), and not serving otherwise.

use std::pin::Pin;

use futures::{Stream, StreamExt as _, stream};
use garret_proto::health::health_check_response::ServingStatus;
use garret_proto::health::health_server::Health;
use garret_proto::health::{HealthCheckRequest, HealthCheckResponse};
use tonic::{Request, Response, Status};

use crate::readiness::Readiness;

#[derive(Debug, Clone)]
pub(crate) struct HealthService(pub(crate) Readiness);

const SERVICES: &[&str] = &[
    "",
    "build.bazel.remote.execution.v2.ActionCache",
    "build.bazel.remote.execution.v2.Capabilities",
    "build.bazel.remote.execution.v2.ContentAddressableStorage",
    "google.bytestream.ByteStream",
];

impl HealthService {
    fn status(&self, service: &str) -> Option<HealthCheckResponse> {
        let status = if self.0.status().ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        SERVICES.contains(&service).then_some(HealthCheckResponse {
            status: status as i32,
        })
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.status(&request.get_ref().service)
            .map(Response::new)
            .ok_or_else(|| Status::not_found("unknown service"))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    /// The current status, then the stream stays open. (Changes are not
    /// pushed: clients that watch re-check on their own schedule.)
    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let current = self
            .status(&request.get_ref().service)
            .unwrap_or(HealthCheckResponse {
                status: ServingStatus::ServiceUnknown as i32,
            });
        Ok(Response::new(
            stream::once(async move { Ok(current) })
                .chain(stream::pending())
                .boxed(),
        ))
    }
}
