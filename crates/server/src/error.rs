//! The one error type of both front ends, and the one table that classes
//! each cause: the HTTP status, the `error` kind of Attic's JSON body
//! `{"code","error","message"}`, and the gRPC code. No handler picks a
//! status or a code; it names the cause.
//!
//! Internal failures (the database, the object store, a corrupt row) are
//! logged with their detail under the request's span and answered with a
//! generic message naming the request id: SQL and S3 text never reaches a
//! client.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use garret_meta::MetaError;
use garret_store::StoreError;
use serde::Serialize;
use tonic::{Code, Status};

use crate::auth::AuthError;
use crate::blobs::BlobError;
use crate::upload::BodyError;

/// Why a request failed, by cause. [`Error::class`] is the only place a
/// cause becomes a status or a code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Refused by the token and permission rules (see [`AuthError`], which
    /// carries its own status, kind and code).
    #[error(transparent)]
    Auth(AuthError),
    /// Refused before the request names a cache: the requester could not
    /// do this to any cache (see `http::access::token_that_could`).
    #[error("Unauthorized: {0}")]
    Unauthorized(String),
    /// As `Unauthorized`, for a token that holds some permission, only not
    /// this one anywhere: Attic's 403 for "some permission, not enough".
    #[error("AccessError: {0}")]
    Forbidden(String),
    /// Input the client must change: a malformed digest or body, data that
    /// does not match its digest.
    #[error("{0}")]
    InvalidArgument(String),
    /// More data than a limit allows.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The client stopped sending, or took longer than the request limit.
    #[error("{0}")]
    Timeout(String),
    #[error("the cache `{0}` already exists")]
    CacheAlreadyExists(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the requested range is not satisfiable for {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    /// An offset or limit outside the blob (ByteStream).
    #[error("{0}")]
    OutOfRange(String),
    /// A chunk of the object is missing from storage: the object cannot be
    /// served whole right now, and must not be served short.
    #[error("the object is incomplete in storage: {0}")]
    IncompleteObject(String),
    /// Overloaded for a moment (a memory budget is spent), or garbage
    /// collection raced the request; retry.
    #[error("{0}")]
    Unavailable(String),
    /// A state the client must fix first (an action result whose outputs
    /// are not uploaded yet).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A quota of the server (live uploads, reply size).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A conflict the client can retry, e.g. a second writer on one upload.
    #[error("{0}")]
    Aborted(String),
    /// The server's fault. The detail is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

/// How one cause is answered on each front end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub status: StatusCode,
    /// The `error` field of Attic's JSON body.
    pub kind: &'static str,
    pub code: Code,
}

const fn class(status: StatusCode, kind: &'static str, code: Code) -> Class {
    Class { status, kind, code }
}

impl Error {
    /// The table.
    pub fn class(&self) -> Class {
        match self {
            Self::Auth(e) => class(
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                e.kind(),
                Code::from(e.grpc_code()),
            ),
            Self::Unauthorized(_) => class(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                Code::Unauthenticated,
            ),
            Self::Forbidden(_) => {
                class(StatusCode::FORBIDDEN, "AccessError", Code::PermissionDenied)
            }
            Self::InvalidArgument(_) => {
                class(StatusCode::BAD_REQUEST, "BadRequest", Code::InvalidArgument)
            }
            // REAPI: a blob over `max_cas_blob_size_bytes` or its own digest's
            // size is a bad request, not a quota to wait out.
            Self::PayloadTooLarge(_) => class(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PayloadTooLarge",
                Code::InvalidArgument,
            ),
            Self::Timeout(_) => class(
                StatusCode::REQUEST_TIMEOUT,
                "RequestTimeout",
                Code::DeadlineExceeded,
            ),
            Self::CacheAlreadyExists(_) => class(
                StatusCode::BAD_REQUEST,
                "CacheAlreadyExists",
                Code::AlreadyExists,
            ),
            Self::NotFound(_) => class(StatusCode::NOT_FOUND, "NoSuchObject", Code::NotFound),
            Self::RangeNotSatisfiable { .. } | Self::OutOfRange(_) => class(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "RangeNotSatisfiable",
                Code::OutOfRange,
            ),
            // The two protocols differ on purpose: to Nix a 503 says "try
            // again later", while to Bazel NOT_FOUND makes it re-run the
            // action or re-upload the blob instead of failing the build.
            Self::IncompleteObject(_) => class(
                StatusCode::SERVICE_UNAVAILABLE,
                "IncompleteNar",
                Code::NotFound,
            ),
            Self::Unavailable(_) => class(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                Code::Unavailable,
            ),
            Self::FailedPrecondition(_) => class(
                StatusCode::CONFLICT,
                "FailedPrecondition",
                Code::FailedPrecondition,
            ),
            // A 4xx, not a 5xx: Nix 2.8 retries a 5xx PUT without a body.
            Self::ResourceExhausted(_) => class(
                StatusCode::TOO_MANY_REQUESTS,
                "ResourceExhausted",
                Code::ResourceExhausted,
            ),
            Self::Aborted(_) => class(StatusCode::CONFLICT, "Conflict", Code::Aborted),
            Self::Internal(_) => class(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                Code::Internal,
            ),
        }
    }

    /// What the client is told: the cause, except for internal failures,
    /// which only name the request whose log has the detail.
    pub fn client_message(&self) -> String {
        match self {
            Self::Internal(_) => match crate::request_log::current_id() {
                Some(id) => format!("internal error; see the server log, request {id}"),
                None => "internal error; see the server log".to_owned(),
            },
            other => other.to_string(),
        }
    }

    /// Logs the error under the current request's span: failures of the
    /// server as errors, refusals as info, misses as debug.
    pub(crate) fn log(&self, class: Class) {
        if class.status.is_server_error() && class.code != Code::NotFound {
            tracing::error!(error = %self, "request failed");
        } else if class.code == Code::NotFound {
            tracing::debug!(error = %self, "not found");
        } else {
            tracing::info!(error = %self, status = class.status.as_u16(), code = ?class.code, "request refused");
        }
    }

    /// The per-entry status of REAPI batch responses.
    pub fn to_rpc_status(&self) -> garret_proto::rpc::Status {
        let class = self.class();
        self.log(class);
        garret_proto::rpc::Status {
            code: class.code as i32,
            message: self.client_message(),
            details: Vec::new(),
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    code: u16,
    error: &'a str,
    message: String,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let class = self.class();
        self.log(class);
        let body = Body {
            code: class.status.as_u16(),
            error: class.kind,
            message: self.client_message(),
        };
        let mut response = (class.status, Json(body)).into_response();
        if let Self::RangeNotSatisfiable { size } = self {
            // RFC 9110 §15.5.17: a 416 says how large the representation is.
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ASCII digits"),
            );
        }
        response
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let class = err.class();
        err.log(class);
        Status::new(class.code, err.client_message())
    }
}

/// Key and minting failures never happen while serving, but if one did it
/// is the server's, and its detail stays in the log.
impl From<AuthError> for Error {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::InvalidKey(_) | AuthError::CannotSign => Self::Internal(err.to_string()),
            other => Self::Auth(other),
        }
    }
}

/// Upload failures that are the client's doing are 4xx, so that clients do
/// not retry them (Nix 2.8 retries a 5xx PUT without a body and hangs).
impl From<BlobError> for Error {
    fn from(err: BlobError) -> Self {
        match err {
            // REAPI: a digest that does not match the data is the client's
            // error (bazel-remote's INTERNAL here makes Bazel retry forever).
            BlobError::HashMismatch { .. } | BlobError::SizeMismatch { .. } => {
                Self::InvalidArgument(err.to_string())
            }
            BlobError::Store(e) => e.into(),
            BlobError::Meta(e) => e.into(),
        }
    }
}

impl From<StoreError> for Error {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::MissingChunk(id) => {
                Self::IncompleteObject(format!("chunk {id} is missing"))
            }
            StoreError::TooLarge { limit } => Self::PayloadTooLarge(format!(
                "the data is larger than the limit of {limit} bytes"
            )),
            // The input's own verdict: a body limit (HTTP), or a ByteStream
            // Write's refusal of its messages.
            StoreError::Input(e) => match e.downcast::<BodyError>() {
                Ok(body) => (*body).into(),
                Err(e) => match e.downcast::<Self>() {
                    Ok(ours) => *ours,
                    Err(e) => Self::InvalidArgument(format!("the uploaded data is unusable: {e}")),
                },
            },
            // A record of upload progress (see `reapi::upload_sessions`).
            StoreError::Index(e) => match e.downcast::<MetaError>() {
                Ok(meta) => (*meta).into(),
                Err(e) => Self::Internal(e.to_string()),
            },
            other => Self::Internal(other.to_string()),
        }
    }
}

/// A body that broke a limit is a 408 or 413; anything else wrong with it
/// (a bad NAR, corrupt compression, a reset connection) is a 400.
impl From<BodyError> for Error {
    fn from(err: BodyError) -> Self {
        match err {
            BodyError::Idle(_) | BodyError::Timeout(_) => Self::Timeout(err.to_string()),
            BodyError::Busy => Self::Unavailable(err.to_string()),
            BodyError::TooLarge { .. }
            | BodyError::DecoderMemory { .. }
            | BodyError::Expansion { .. } => Self::PayloadTooLarge(err.to_string()),
            BodyError::InvalidNar(_)
            | BodyError::Read(_)
            | BodyError::Decompress(_)
            | BodyError::FileHashMismatch { .. } => Self::InvalidArgument(err.to_string()),
        }
    }
}

impl From<crate::bazel_core::digest::DigestError> for Error {
    fn from(err: crate::bazel_core::digest::DigestError) -> Self {
        Self::InvalidArgument(err.to_string())
    }
}

impl From<MetaError> for Error {
    fn from(err: MetaError) -> Self {
        match err {
            // GC took a blob or chunk between a lookup and a commit: retry.
            MetaError::ChunkGone(_) | MetaError::FrameMismatch(_) | MetaError::NotFound(_) => {
                Self::Unavailable(format!("{err}; retry"))
            }
            MetaError::Invalid(m) => Self::InvalidArgument(m),
            MetaError::AlreadyExists(name) => Self::CacheAlreadyExists(name),
            MetaError::UploadSuperseded => {
                Self::Aborted("another Write took this upload over; ask QueryWriteStatus".into())
            }
            MetaError::Corrupt(_) | MetaError::Database(_) => Self::Internal(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn unsatisfiable_ranges_say_the_size() {
        let response = Error::RangeNotSatisfiable { size: 1234 }.into_response();
        assert_eq!(response.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(response.headers()[header::CONTENT_RANGE], "bytes */1234");
    }

    #[test]
    fn body_limits_are_408_and_413_and_bad_bodies_400() {
        let status = |err: BodyError| Error::from(err).class().status;
        let second = Duration::from_secs(1);
        assert_eq!(status(BodyError::Idle(second)), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(
            status(BodyError::Timeout(second)),
            StatusCode::REQUEST_TIMEOUT
        );
        for too_much in [
            BodyError::TooLarge { limit: 1 },
            BodyError::DecoderMemory { limit: 1 },
            BodyError::Expansion { ratio: 1, floor: 1 },
        ] {
            assert_eq!(status(too_much), StatusCode::PAYLOAD_TOO_LARGE);
        }
        let corrupt = BodyError::Decompress(std::io::Error::other("corrupt"));
        assert_eq!(status(corrupt), StatusCode::BAD_REQUEST);
        // The same table applies when the store reports the body's error.
        let via_store = BlobError::Store(StoreError::Input(Box::new(BodyError::Idle(second))));
        assert_eq!(
            Error::from(via_store).class().status,
            StatusCode::REQUEST_TIMEOUT
        );
    }

    #[test]
    fn client_errors_are_4xx_and_server_errors_only_internal_and_retryable() {
        let causes = [
            Error::Unauthorized(String::new()),
            Error::Forbidden(String::new()),
            Error::InvalidArgument(String::new()),
            Error::PayloadTooLarge(String::new()),
            Error::Timeout(String::new()),
            Error::CacheAlreadyExists(String::new()),
            Error::NotFound(String::new()),
            Error::OutOfRange(String::new()),
            Error::FailedPrecondition(String::new()),
            Error::ResourceExhausted(String::new()),
            Error::Aborted(String::new()),
        ];
        for cause in causes {
            assert!(cause.class().status.is_client_error(), "{cause:?}");
        }
        for cause in [
            Error::Unavailable(String::new()),
            Error::IncompleteObject(String::new()),
        ] {
            assert_eq!(
                cause.class().status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{cause:?}"
            );
        }
    }

    #[test]
    fn internal_detail_is_never_sent() {
        let err = Error::from(MetaError::Corrupt("SELECT secret FROM x".into()));
        assert_eq!(err.class().code, Code::Internal);
        assert!(!err.client_message().contains("SELECT"));
        let status = Status::from(err);
        assert!(!status.message().contains("SELECT"), "{status:?}");
    }
}
