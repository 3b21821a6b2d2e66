//! One JSON error shape for every failure: `{"error": {"code", "message"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::EngineError;
use crate::error::Error;
use crate::index::IndexError;

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable machine-readable `code` and a human message.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// e.g. `invalid_json`, `payload_too_large`, `unsupported_media_type`,
    /// `invalid_image`, `image_too_large`, `unsupported_image`, `invalid_base64`,
    /// `invalid_labels`, `empty_query`, `invalid_k`, `invalid_id`, `not_found`,
    /// `unauthorized`, `overloaded`, `insufficient_storage`, `not_ready`, `internal`.
    pub code: String,
    pub message: String,
}

/// An error answer: status, code, message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, "{}", self.message);
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Overloaded(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e.to_string())
            }
            EngineError::ShuttingDown => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                e.to_string(),
            ),
            EngineError::Input(inner) => (&*inner).into(),
            EngineError::Model(m) => Self::internal(m),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        (&e).into()
    }
}

impl From<&Error> for ApiError {
    fn from(e: &Error) -> Self {
        match e {
            Error::UnsupportedImage(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_image",
                e.to_string(),
            ),
            Error::ImageDecode(_) => Self::bad_request("invalid_image", e.to_string()),
            Error::ImageTooLarge { .. } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "image_too_large",
                e.to_string(),
            ),
            Error::Tokenizer(_) | Error::InvalidArgument(_) => {
                Self::bad_request("invalid_input", e.to_string())
            }
            _ => Self::internal(e.to_string()),
        }
    }
}

impl From<IndexError> for ApiError {
    fn from(e: IndexError) -> Self {
        match &e {
            IndexError::InvalidId(_) => Self::bad_request("invalid_id", e.to_string()),
            IndexError::Dimension { .. } | IndexError::InvalidVector(_) => {
                Self::bad_request("invalid_vector", e.to_string())
            }
            IndexError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "index_unavailable",
                e.to_string(),
            ),
            IndexError::Storage(io) if is_disk_full(io) => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_storage",
                e.to_string(),
            ),
            _ => Self::internal(e.to_string()),
        }
    }
}

fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28) | Some(122)) // ENOSPC, EDQUOT
        || e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
}
