//! [`ApiError`]: the one JSON error body of the REST API,
//! `{"error": "<code>", "message": "<human sentence>"}`.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::durability::DiskError;
use crate::replica::WriteError;
use crate::store::StoreError;

/// A REST failure: a status, a stable machine code and a sentence for people.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code for scripts, e.g. `invalid_key`.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    /// An error with any status.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 for an absent entry.
    pub fn absent(ty: i32, key: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no entry {:?} in type {ty}",
                key.chars().take(64).collect::<String>()
            ),
        )
    }

    /// 413 for a body over the limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    }

    /// 400 for a path that did not parse (bad percent-encoding, invalid UTF-8).
    pub fn from_path(rejection: PathRejection) -> Self {
        Self::bad_request("invalid_path", rejection.body_text())
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        let (status, code) = match &err {
            StoreError::EmptyKey | StoreError::KeyTooLong { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_key")
            }
            StoreError::ValueTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "value_too_large"),
            StoreError::BatchTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large"),
            StoreError::EmptyBatch => (StatusCode::BAD_REQUEST, "empty_batch"),
            StoreError::BadTtl { .. } => (StatusCode::BAD_REQUEST, "invalid_ttl"),
            StoreError::ClockSkew(_) => (StatusCode::BAD_REQUEST, "clock_skew"),
            StoreError::MetaTooLong => (StatusCode::BAD_REQUEST, "invalid_meta"),
            StoreError::Full { .. } => (StatusCode::INSUFFICIENT_STORAGE, "capacity_exhausted"),
        };
        Self::new(status, code, err.to_string())
    }
}

impl From<WriteError> for ApiError {
    fn from(err: WriteError) -> Self {
        match err {
            WriteError::Store(e) => e.into(),
            WriteError::Disk(DiskError::Full(_)) => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "disk_full",
                format!(
                    "{err}; nothing was written, reads go on, writes resume when there is room"
                ),
            ),
            WriteError::Disk(DiskError::Failed(_)) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                format!(
                    "{err}; nothing was written, reads go on, writes resume when the disk does"
                ),
            ),
            WriteError::NotDurable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_durable",
                format!("the write was applied and is being sent to the peers, but {err}"),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": self.code, "message": self.message })),
        )
            .into_response()
    }
}
