//! One span and one access-log line per request, HTTP and gRPC alike.
//!
//! The span (`request`, with a request id) wraps the whole handler, so every
//! event a request causes carries its id; handlers add what only they know
//! (`cache`, and `subject` once a token is verified) with
//! [`tracing::Span::record`]. When the response body has been sent, or
//! the request ends early, one `access` line records the outcome: status
//! (and gRPC status), bytes in and out, and duration. Bazel's
//! `RequestMetadata` header names the tool and invocation.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, HttpBody};
use axum::http::{HeaderMap, Request, Response, StatusCode};
use bytes::Bytes;
use prost::Message as _;
use tracing::Span;
use tracing::field::Empty;

use crate::metrics::Metrics;
use crate::metrics::requests::{Done, Served};

/// The header Bazel sends its `RequestMetadata` in (binary, base64).
const REQUEST_METADATA: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// A request's span and the counters its access line reports.
#[derive(Debug)]
pub struct RequestLog {
    id: String,
    span: Span,
    started: Instant,
    bytes_in: Arc<AtomicU64>,
    bytes_out: u64,
    status: Option<StatusCode>,
    grpc_status: Option<String>,
    /// Where the outcome is counted too, and by which route.
    metrics: Metrics,
    served: Option<Served>,
}

impl RequestLog {
    /// Opens the span of `request` and counts its body from now on.
    pub fn start<B>(request: Request<B>, metrics: Metrics) -> (Self, Request<Body>)
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let id = request_id();
        let span = tracing::info_span!(
            "request",
            id = %id,
            method = %request.method(),
            path = %request.uri().path(),
            cache = Empty,
            subject = Empty,
            tool = Empty,
            invocation = Empty,
        );
        if let Some((tool, invocation)) = bazel_metadata(request.headers()) {
            span.record("tool", tracing::field::display(&tool));
            span.record("invocation", tracing::field::display(&invocation));
        }
        let bytes_in = Arc::new(AtomicU64::new(0));
        let request = request.map(|body| {
            Body::new(CountedBody {
                inner: body,
                bytes: Arc::clone(&bytes_in),
            })
        });
        let log = Self {
            id,
            span,
            started: Instant::now(),
            bytes_in,
            bytes_out: 0,
            status: None,
            grpc_status: None,
            metrics,
            served: None,
        };
        (log, request)
    }

    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Runs `work` (the handler) as this request's: [`current_id`] names it.
    pub fn scope<F: std::future::Future>(
        &self,
        work: F,
    ) -> impl std::future::Future<Output = F::Output> + use<F> {
        REQUEST_ID.scope(self.id.clone(), work)
    }

    /// Notes the response head, and the route that served it; the line is
    /// written when the body ends.
    pub fn responded<B>(&mut self, response: &Response<B>) {
        self.status = Some(response.status());
        self.served = response.extensions().get::<Served>().cloned();
        self.note_grpc_status(response.headers());
    }

    /// Counts a response frame: data towards bytes out, trailers for the
    /// gRPC status of a streamed reply.
    pub fn sent<D: bytes::Buf>(&mut self, frame: &http_body::Frame<D>) {
        if let Some(data) = frame.data_ref() {
            self.bytes_out += data.remaining() as u64;
        } else if let Some(trailers) = frame.trailers_ref() {
            self.note_grpc_status(trailers);
        }
    }

    fn note_grpc_status(&mut self, headers: &HeaderMap) {
        if let Some(code) = headers.get("grpc-status").and_then(|v| v.to_str().ok()) {
            self.grpc_status = Some(code.to_owned());
        }
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let duration = self.started.elapsed();
        let duration_ms = duration.as_secs_f64() * 1000.0;
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        self.metrics.request_done(&Done {
            served: self.served.as_ref(),
            status: self.status,
            grpc_status: self.grpc_status.as_deref(),
            bytes_in,
            bytes_out: self.bytes_out,
            duration,
        });
        let _entered = self.span.enter();
        if let Some(status) = self.status {
            tracing::info!(
                target: "garret::access",
                status = status.as_u16(),
                grpc_status = self.grpc_status.as_deref(),
                bytes_in,
                bytes_out = self.bytes_out,
                duration_ms,
                "request done",
            );
        } else {
            tracing::info!(
                target: "garret::access",
                bytes_in,
                duration_ms,
                "request ended before a response (client gone or connection closed)",
            );
        }
    }
}

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being handled, for messages that point the client
/// at the server log (its span carries the same id).
pub fn current_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// 16 hex digits, unique enough to find one request in the logs of many
/// replicas.
fn request_id() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        bytes = NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    }
    format!("{:016x}", u64::from_be_bytes(bytes))
}

/// Bazel's tool (`name/version`) and invocation id, if it sent them.
fn bazel_metadata(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine as _;
    let value = headers.get(REQUEST_METADATA)?.as_bytes();
    // gRPC binary headers are base64, padded or not.
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let raw = engine.decode(value).ok()?;
    let metadata = garret_proto::reapi::RequestMetadata::decode(raw.as_slice()).ok()?;
    let tool = metadata
        .tool_details
        .map(|t| format!("{}/{}", t.tool_name, t.tool_version))
        .unwrap_or_default();
    Some((tool, metadata.tool_invocation_id))
}

/// A request body that counts the bytes read from it.
struct CountedBody<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
}

impl<B> HttpBody for CountedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bazel_request_metadata() {
        use base64::Engine as _;
        let metadata = garret_proto::reapi::RequestMetadata {
            tool_details: Some(garret_proto::reapi::ToolDetails {
                tool_name: "bazel".into(),
                tool_version: "4.2.3".into(),
            }),
            tool_invocation_id: "inv-1".into(),
            ..Default::default()
        };
        let encoded = base64::engine::general_purpose::STANDARD.encode(metadata.encode_to_vec());
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_METADATA, encoded.parse().unwrap());
        assert_eq!(
            bazel_metadata(&headers),
            Some(("bazel/4.2.3".into(), "inv-1".into()))
        );
        // gRPC may drop the padding.
        let unpadded = encoded.trim_end_matches('=');
        headers.insert(REQUEST_METADATA, unpadded.parse().unwrap());
        assert_eq!(
            bazel_metadata(&headers),
            Some(("bazel/4.2.3".into(), "inv-1".into()))
        );
        headers.insert(REQUEST_METADATA, "not base64!".parse().unwrap());
        assert_eq!(bazel_metadata(&headers), None);
        assert_eq!(request_id().len(), 16);
    }
}
