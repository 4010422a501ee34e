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

/// How a request ended, as an HTTP status class: `2xx`…`5xx`, or
/// `aborted` when it ended before a response. A gRPC call is classed by its
/// code as gRPC's HTTP mapping classes it (NOT_FOUND a 4xx, UNAVAILABLE a
/// 5xx), so one `status_class="5xx"` ratio covers both front ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum StatusClass {
    Class(u16),
    Aborted,
}

impl StatusClass {
    fn of(status: Option<StatusCode>, grpc: Option<GrpcCode>) -> Self {
        use tonic::Code;
        match (status, grpc) {
            (_, Some(GrpcCode(code))) => StatusClass::Class(match code {
                Code::Ok => 2,
                Code::Unknown
                | Code::DeadlineExceeded
                | Code::Unimplemented
                | Code::Internal
                | Code::Unavailable
                | Code::DataLoss => 5,
                _ => 4,
            }),
            (Some(status), None) => StatusClass::Class(status.as_u16() / 100),
            (None, None) => StatusClass::Aborted,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            StatusClass::Class(1) => "1xx",
            StatusClass::Class(2) => "2xx",
            StatusClass::Class(3) => "3xx",
            StatusClass::Class(4) => "4xx",
            StatusClass::Class(_) => "5xx",
            StatusClass::Aborted => "aborted",
        }
    }
}

/// A gRPC call's status code (as `Option`, the label is empty for plain
/// HTTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct GrpcCode(tonic::Code);

impl GrpcCode {
    fn parse(code: &str) -> Self {
        GrpcCode(tonic::Code::from_bytes(code.as_bytes()))
    }

    fn as_str(self) -> &'static str {
        use tonic::Code;
        match self.0 {
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
        }
    }
}

label_values! {
    Protocol => |v| v.as_str(),
    StatusClass => |v| v.as_str(),
    GrpcCode => |v| v.as_str(),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    protocol: Protocol,
    route: Route,
    status_class: StatusClass,
    grpc_code: Option<GrpcCode>,
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
            "Requests by protocol, route (template or gRPC method), status class \
             (gRPC calls classed by their code) and gRPC code",
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
        let grpc_code = done.grpc_status.map(GrpcCode::parse);
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
                status_class: StatusClass::of(done.status, grpc_code),
                grpc_code,
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
    fn status_classes() {
        let class = |status, grpc: Option<&str>| {
            StatusClass::of(status, grpc.map(GrpcCode::parse)).as_str()
        };
        assert_eq!(class(Some(StatusCode::OK), None), "2xx");
        assert_eq!(class(Some(StatusCode::NOT_FOUND), None), "4xx");
        assert_eq!(class(Some(StatusCode::SERVICE_UNAVAILABLE), None), "5xx");
        assert_eq!(class(Some(StatusCode::OK), Some("0")), "2xx");
        assert_eq!(class(Some(StatusCode::OK), Some("5")), "4xx");
        assert_eq!(class(Some(StatusCode::OK), Some("14")), "5xx");
        assert_eq!(class(None, None), "aborted");
        assert_eq!(GrpcCode::parse("5").as_str(), "NOT_FOUND");
    }
}
