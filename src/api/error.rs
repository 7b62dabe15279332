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
    /// Fields a script may read beside `error` and `message` (e.g. the
    /// type and token name of `forbidden_type`, the key, JSON pointer and
    /// keyword of `schema_violation`); usually none.
    pub fields: Option<Box<serde_json::Map<String, serde_json::Value>>>,
}

impl ApiError {
    /// An error with any status.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            fields: None,
        }
    }

    /// This error with one more field in its body.
    pub fn with(mut self, name: &str, value: serde_json::Value) -> Self {
        self.fields
            .get_or_insert_with(Default::default)
            .insert(name.to_owned(), value);
        self
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
            WriteError::ReservedType => Self::bad_request("invalid_type", err.to_string()),
            WriteError::Schema(v) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "schema_violation",
                v.to_string(),
            )
            .with("type", v.ty.into())
            .with("key", v.key.into())
            .with("location", v.location.into())
            .with("keyword", v.keyword.into())
            .with("schema_path", v.schema_path.into()),
            WriteError::SchemaUnusable { ty, .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "invalid_schema",
                err.to_string(),
            )
            .with("type", ty.into()),
            WriteError::NotDurable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_durable",
                format!("the write was applied and is being sent to the peers, but {err}"),
            ),
        }
    }
}

impl From<crate::replica::schema::SchemaWriteError> for ApiError {
    fn from(err: crate::replica::schema::SchemaWriteError) -> Self {
        use crate::replica::schema::{SchemaError, SchemaWriteError};
        match err {
            SchemaWriteError::Write(e) => e.into(),
            SchemaWriteError::Schema(e @ SchemaError::TooLarge { .. }) => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "schema_too_large",
                e.to_string(),
            ),
            SchemaWriteError::Schema(e) => Self::bad_request("invalid_schema", e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code, "message": self.message });
        if let (Some(fields), Some(object)) = (self.fields, body.as_object_mut()) {
            for (name, value) in *fields {
                object.entry(name).or_insert(value);
            }
        }
        (self.status, Json(body)).into_response()
    }
}
