//! The one error type of the HTTP API, answered as Attic's JSON body
//! `{"code","error","message"}` with a single status mapping.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::AuthError;
use crate::blobs::BlobError;
use crate::upload::BodyError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Refused before the request names a cache: the requester could not
    /// do this to any cache (see `access::token_that_could`).
    #[error("Unauthorized: {0}")]
    Unauthorized(String),
    /// As `Unauthorized`, for a token that holds some permission, only not
    /// this one anywhere: Attic's 403 for "some permission, not enough".
    #[error("AccessError: {0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The client stopped sending, or took longer than the request limit.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("the cache `{0}` already exists")]
    CacheAlreadyExists(String),
    #[error("no such object: {0}")]
    NoSuchObject(String),
    #[error("the requested range is not satisfiable for {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    /// A chunk of the object is missing from storage: the object cannot be
    /// served whole right now, and must not be served short.
    #[error("the object is incomplete in storage: {0}")]
    IncompleteObject(String),
    /// Overloaded for a moment (a memory budget is spent); retry.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Serialize)]
struct Body<'a> {
    code: u16,
    error: &'a str,
    message: String,
}

impl ApiError {
    fn status_and_kind(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Auth(e) => (
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                e.kind(),
            ),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "Unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "AccessError"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge"),
            Self::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "RequestTimeout"),
            Self::CacheAlreadyExists(_) => (StatusCode::BAD_REQUEST, "CacheAlreadyExists"),
            Self::NoSuchObject(_) => (StatusCode::NOT_FOUND, "NoSuchObject"),
            Self::RangeNotSatisfiable { .. } => {
                (StatusCode::RANGE_NOT_SATISFIABLE, "RangeNotSatisfiable")
            }
            Self::IncompleteObject(_) => (StatusCode::SERVICE_UNAVAILABLE, "IncompleteNar"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError"),
        }
    }
}

/// Upload failures that are the client's doing are 4xx, so that clients do
/// not retry them (Nix 2.8 retries a 5xx PUT without a body and hangs).
impl From<BlobError> for ApiError {
    fn from(err: BlobError) -> Self {
        use garret_store::StoreError;
        match err {
            BlobError::Store(StoreError::MissingChunk(id)) => {
                Self::IncompleteObject(format!("chunk {id} is missing"))
            }
            BlobError::HashMismatch { .. } | BlobError::SizeMismatch { .. } => {
                Self::BadRequest(err.to_string())
            }
            BlobError::Store(StoreError::TooLarge { limit }) => Self::PayloadTooLarge(format!(
                "the upload is larger than the limit of {limit} bytes"
            )),
            BlobError::Store(StoreError::Input(e)) => match e.downcast::<BodyError>() {
                Ok(body) => (*body).into(),
                Err(e) => Self::BadRequest(e.to_string()),
            },
            other => Self::Internal(other.to_string()),
        }
    }
}

/// A body that broke a limit is a 408 or 413; anything else wrong with it
/// (a bad NAR, corrupt compression, a reset connection) is a 400.
impl From<BodyError> for ApiError {
    fn from(err: BodyError) -> Self {
        match err {
            BodyError::Idle(_) | BodyError::Timeout(_) => Self::RequestTimeout(err.to_string()),
            BodyError::Busy => Self::Unavailable(err.to_string()),
            BodyError::TooLarge { .. }
            | BodyError::DecoderMemory { .. }
            | BodyError::Expansion { .. } => Self::PayloadTooLarge(err.to_string()),
            BodyError::InvalidNar(_)
            | BodyError::Read(_)
            | BodyError::Decompress(_)
            | BodyError::FileHashMismatch { .. } => Self::BadRequest(err.to_string()),
        }
    }
}

impl From<garret_meta::MetaError> for ApiError {
    fn from(err: garret_meta::MetaError) -> Self {
        Self::Internal(err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status_and_kind();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::info!(error = %self, status = status.as_u16(), "request refused");
        }
        let body = Body {
            code: status.as_u16(),
            error: kind,
            message: self.to_string(),
        };
        let mut response = (status, Json(body)).into_response();
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn unsatisfiable_ranges_say_the_size() {
        let response = ApiError::RangeNotSatisfiable { size: 1234 }.into_response();
        assert_eq!(response.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(response.headers()[header::CONTENT_RANGE], "bytes */1234");
    }

    #[test]
    fn body_limits_are_408_and_413_and_bad_bodies_400() {
        let status = |err: BodyError| ApiError::from(err).status_and_kind().0;
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
        let via_store = BlobError::Store(garret_store::StoreError::Input(Box::new(
            BodyError::Idle(second),
        )));
        assert_eq!(
            ApiError::from(via_store).status_and_kind().0,
            StatusCode::REQUEST_TIMEOUT
        );
    }
}
