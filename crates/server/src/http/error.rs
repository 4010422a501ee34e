//! The one error type of the HTTP API, answered as Attic's JSON body
//! `{"code","error","message"}` with a single status mapping.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::AuthError;
use crate::blobs::BlobError;
use crate::upload::BodyError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
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
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge"),
            Self::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "RequestTimeout"),
            Self::CacheAlreadyExists(_) => (StatusCode::BAD_REQUEST, "CacheAlreadyExists"),
            Self::NoSuchObject(_) => (StatusCode::NOT_FOUND, "NoSuchObject"),
            Self::RangeNotSatisfiable { .. } => {
                (StatusCode::RANGE_NOT_SATISFIABLE, "RangeNotSatisfiable")
            }
            Self::IncompleteObject(_) => (StatusCode::SERVICE_UNAVAILABLE, "IncompleteNar"),
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
            BlobError::Store(StoreError::Input(e)) => match e.downcast_ref::<BodyError>() {
                Some(BodyError::Idle(_)) => Self::RequestTimeout(e.to_string()),
                _ => Self::BadRequest(e.to_string()),
            },
            other => Self::Internal(other.to_string()),
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
        (status, Json(body)).into_response()
    }
}
