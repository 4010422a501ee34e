//! Requests by protocol, route and status; their latency; bytes in and out.
//!
//! The request log (`request_log`) reports every request once it is done,
//! HTTP and gRPC alike. Which route served it is known only inside the
//! router: [`note_route`] puts it on the response, as a [`Route`] label
//! that is always one of the server's own route templates or gRPC methods,
//! never a path a client chose.

use std::time::Duration;

use axum::extract::{MatchedPath, Request};
use axum::http::{StatusCode, Uri};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

use super::{Histograms, Metrics, histograms, label_values, latency_histogram, seconds};

/// Which API a route belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// The substituter and plain `nix copy` uploads.
    Nix,
    /// Attic's `/_api/v1`.
    Attic,
    /// Bazel's HTTP cache.
    BazelHttp,
    /// REAPI and ByteStream over gRPC.
    Reapi,
    /// `/healthz`, `/readyz` and gRPC health.
    Health,
    /// `/metrics` itself.
    Metrics,
    /// Whatever no route matched.
    Other,
}

impl Protocol {
    /// The protocol of a route template (or gRPC service route).
    fn of(route: &str) -> Self {
        match route {
            "/healthz" | "/readyz" => Protocol::Health,
            "/metrics" => Protocol::Metrics,
            "/{cache}/{file}" | "/{cache}/nar/{file}" => Protocol::Nix,
            "/{cache}/attic-cache-info" => Protocol::Attic,
            _ if route.starts_with("/_api/") => Protocol::Attic,
            _ if route.ends_with("/ac/{hash}") || route.ends_with("/cas/{hash}") => {
                Protocol::BazelHttp
            }
            _ if route.starts_with("/grpc.health.") => Protocol::Health,
            _ if route.starts_with("/build.bazel.") || route.starts_with("/google.bytestream.") => {
                Protocol::Reapi
            }
            _ => Protocol::Other,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Protocol::Nix => "nix",
            Protocol::Attic => "attic",
            Protocol::BazelHttp => "bazel-http",
            Protocol::Reapi => "reapi",
            Protocol::Health => "health",
            Protocol::Metrics => "metrics",
            Protocol::Other => "other",
        }
    }
}

/// What served a request: a route template (`/{cache}/nar/{file}`), a gRPC
/// method (`/build.bazel.remote.execution.v2.ActionCache/GetActionResult`)
/// or nothing. Cheap to clone: both hold shared text.
#[derive(Debug, Clone)]
pub enum Route {
    Template(MatchedPath),
    /// A method of a gRPC service the router mounted; the path is its name.
    /// Only methods the service implements are kept (see [`note_route`]).
    GrpcMethod(Uri),
    Unmatched,
}

impl Route {
    pub fn as_str(&self) -> &str {
        match self {
            Route::Template(template) => template.as_str(),
            Route::GrpcMethod(uri) => uri.path(),
            Route::Unmatched => "unmatched",
        }
    }
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Route {}

impl std::hash::Hash for Route {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl EncodeLabelValue for Route {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// The route and protocol of a response, put there by [`note_route`].
#[derive(Debug, Clone)]
pub struct Served {
    protocol: Protocol,
    route: Route,
}

/// Middleware inside the router: notes on each response what served it.
/// A gRPC service is mounted as `/{Service}/{*rest}`; a call is labelled by
/// its method unless the service answered UNIMPLEMENTED (an unknown method,
/// which a client could name at will), which keeps the service's template.
pub async fn note_route(request: Request, next: Next) -> Response {
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let grpc_path = matched
        .as_ref()
        .filter(|m| m.as_str().ends_with("/{*rest}"))
        .map(|_| request.uri().clone());
    let mut response = next.run(request).await;
    let served = match matched {
        None => Served {
            protocol: Protocol::Other,
            route: Route::Unmatched,
        },
        Some(template) => {
            let protocol = Protocol::of(template.as_str());
            let unimplemented = response
                .headers()
                .get("grpc-status")
                .is_some_and(|code| code == "12");
            let route = match grpc_path {
                Some(path) if !unimplemented => Route::GrpcMethod(path),
                _ => Route::Template(template),
            };
            Served { protocol, route }
        }
    };
    response.extensions_mut().insert(served);
    response
}

/// How a request ended: an HTTP status class, a gRPC code, or no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Status {
    /// The first digit of the HTTP status.
    Http(u16),
    Grpc(tonic::Code),
    /// The request ended before a response (client gone, connection closed).
    Aborted,
}

impl Status {
    fn of(status: Option<StatusCode>, grpc_status: Option<&str>) -> Self {
        match (status, grpc_status) {
            (_, Some(code)) => Status::Grpc(tonic::Code::from_bytes(code.as_bytes())),
            (Some(status), None) => Status::Http(status.as_u16() / 100),
            (None, None) => Status::Aborted,
        }
    }

    fn as_str(self) -> &'static str {
        use tonic::Code;
        match self {
            Status::Http(1) => "1xx",
            Status::Http(2) => "2xx",
            Status::Http(3) => "3xx",
            Status::Http(4) => "4xx",
            Status::Http(_) => "5xx",
            Status::Aborted => "aborted",
            Status::Grpc(code) => match code {
                Code::Ok => "OK",
                Code::Cancelled => "CANCELLED",
                Code::Unknown => "UNKNOWN",
                Code::InvalidArgument => "INVALID_ARGUMENT",
                Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
                Code::NotFound => "NOT_FOUND",
                Code::AlreadyExists => "ALREADY_EXISTS",
                Code::PermissionDenied => "PERMISSION_DENIED",
                Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
                Code::FailedPrecondition => "FAILED_PRECONDITION",
                Code::Aborted => "ABORTED",
                Code::OutOfRange => "OUT_OF_RANGE",
                Code::Unimplemented => "UNIMPLEMENTED",
                Code::Internal => "INTERNAL",
                Code::Unavailable => "UNAVAILABLE",
                Code::DataLoss => "DATA_LOSS",
                Code::Unauthenticated => "UNAUTHENTICATED",
            },
        }
    }
}

label_values! {
    Protocol => |v| v.as_str(),
    Status => |v| v.as_str(),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    protocol: Protocol,
    route: Route,
    status: Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    protocol: Protocol,
    route: Route,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: Protocol,
}

#[derive(Debug)]
pub(super) struct Families {
    requests: Family<RequestLabels, Counter>,
    duration: Histograms<RouteLabels>,
    received: Family<ProtocolLabels, Counter>,
    sent: Family<ProtocolLabels, Counter>,
}

impl Families {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let families = Self {
            requests: Family::default(),
            duration: histograms(latency_histogram),
            received: Family::default(),
            sent: Family::default(),
        };
        registry.register(
            "requests",
            "Requests by protocol, route (template or gRPC method) and status \
             (HTTP class, gRPC code, or aborted)",
            families.requests.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Time from a request's head to the end of its response body",
            Unit::Seconds,
            families.duration.clone(),
        );
        registry.register_with_unit(
            "received",
            "Request body bytes received, by protocol",
            Unit::Bytes,
            families.received.clone(),
        );
        registry.register_with_unit(
            "sent",
            "Response body bytes sent, by protocol",
            Unit::Bytes,
            families.sent.clone(),
        );
        families
    }
}

/// A finished request, as the request log saw it.
#[derive(Debug)]
pub struct Done<'a> {
    /// What served it; `None` when it ended before a response.
    pub served: Option<&'a Served>,
    pub status: Option<StatusCode>,
    pub grpc_status: Option<&'a str>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: Duration,
}

impl Metrics {
    /// Counts a finished request.
    pub fn request_done(&self, done: &Done<'_>) {
        let (protocol, route) = done
            .served
            .map_or((Protocol::Other, Route::Unmatched), |s| {
                (s.protocol, s.route.clone())
            });
        let families = self.requests();
        let by_protocol = ProtocolLabels { protocol };
        families
            .received
            .get_or_create(&by_protocol)
            .inc_by(done.bytes_in);
        families
            .sent
            .get_or_create(&by_protocol)
            .inc_by(done.bytes_out);
        let labels = RouteLabels { protocol, route };
        families
            .duration
            .get_or_create(&labels)
            .observe(seconds(done.duration));
        families
            .requests
            .get_or_create(&RequestLabels {
                protocol,
                route: labels.route,
                status: Status::of(done.status, done.grpc_status),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_of_routes() {
        for (route, protocol) in [
            ("/healthz", Protocol::Health),
            ("/metrics", Protocol::Metrics),
            ("/{cache}/{file}", Protocol::Nix),
            ("/{cache}/nar/{file}", Protocol::Nix),
            ("/_api/v1/upload-path", Protocol::Attic),
            ("/{cache}/attic-cache-info", Protocol::Attic),
            ("/cas/{hash}", Protocol::BazelHttp),
            ("/{cache}/ac/{hash}", Protocol::BazelHttp),
            (
                "/build.bazel.remote.execution.v2.ActionCache/{*rest}",
                Protocol::Reapi,
            ),
            ("/google.bytestream.ByteStream/{*rest}", Protocol::Reapi),
            ("/grpc.health.v1.Health/{*rest}", Protocol::Health),
            ("/elsewhere", Protocol::Other),
        ] {
            assert_eq!(Protocol::of(route), protocol, "{route}");
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(Status::of(Some(StatusCode::OK), None).as_str(), "2xx");
        assert_eq!(
            Status::of(Some(StatusCode::NOT_FOUND), None).as_str(),
            "4xx"
        );
        assert_eq!(
            Status::of(Some(StatusCode::SERVICE_UNAVAILABLE), None).as_str(),
            "5xx"
        );
        assert_eq!(
            Status::of(Some(StatusCode::OK), Some("5")).as_str(),
            "NOT_FOUND"
        );
        assert_eq!(Status::of(Some(StatusCode::OK), Some("0")).as_str(), "OK");
        assert_eq!(Status::of(None, None).as_str(), "aborted");
    }
}
