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
    /// An `ETag` header (already quoted): a failed precondition names the
    /// version the key holds now.
    pub etag: Option<Box<str>>,
}

impl ApiError {
    /// An error with any status.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            fields: None,
            etag: None,
        }
    }

    /// This error with one more field in its body.
    pub fn with(mut self, name: &str, value: serde_json::Value) -> Self {
        self.fields
            .get_or_insert_with(Default::default)
            .insert(name.to_owned(), value);
        self
    }

    /// 412 for a conditional write whose expectation of `key` failed; the
    /// body and the `ETag` name the version the key holds now.
    pub fn precondition(
        message: String,
        key: &str,
        current: Option<crate::store::Version>,
    ) -> Self {
        let current_text = current.map(|v| v.to_string());
        let mut err = Self::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            message,
        )
        .with("key", json!(key))
        .with("current_version", json!(current_text));
        err.etag = current_text.map(|v| format!("\"{v}\"").into_boxed_str());
        err
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
            StoreError::Precondition { key, current } => {
                return Self::precondition(err.to_string(), key, *current);
            }
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
            WriteError::Fenced => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_decider",
                format!("{err}; nothing was written, retry: a new decider is being chosen"),
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

impl From<crate::replication::decider::Refusal> for ApiError {
    fn from(refusal: crate::replication::decider::Refusal) -> Self {
        use crate::proto::podcache::decide_response::Outcome;
        use crate::replication::decider::Refusal;
        let message = refusal.to_string();
        match refusal {
            Refusal::Write(e) => e.into(),
            Refusal::NoDecider(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_decider",
                format!(
                    "{message}; nothing was written, retry (conditional writes need the decider)"
                ),
            ),
            Refusal::NotReplicated { records, .. } => {
                let err = Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_replicated", message);
                match records.first() {
                    Some(record) => err.with("version", json!(record.entry.version().to_string())),
                    None => err,
                }
            }
            Refusal::Remote { kind, .. } => {
                let (status, code) = match kind {
                    Outcome::Capacity => (StatusCode::INSUFFICIENT_STORAGE, "capacity_exhausted"),
                    Outcome::DiskFull => (StatusCode::INSUFFICIENT_STORAGE, "disk_full"),
                    Outcome::StorageUnavailable => {
                        (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
                    }
                    Outcome::NotDurable => (StatusCode::SERVICE_UNAVAILABLE, "not_durable"),
                    Outcome::Invalid => (StatusCode::BAD_REQUEST, "invalid_write"),
                    Outcome::SchemaViolation => {
                        (StatusCode::UNPROCESSABLE_ENTITY, "schema_violation")
                    }
                    Outcome::NotReplicated => (StatusCode::SERVICE_UNAVAILABLE, "not_replicated"),
                    Outcome::Decided | Outcome::PreconditionFailed | Outcome::NoDecider => {
                        (StatusCode::SERVICE_UNAVAILABLE, "no_decider")
                    }
                };
                Self::new(status, code, message)
            }
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
        let mut response = (self.status, Json(body)).into_response();
        if let Some(etag) = self
            .etag
            .and_then(|t| axum::http::HeaderValue::from_str(&t).ok())
        {
            response
                .headers_mut()
                .insert(axum::http::header::ETAG, etag);
        }
        response
    }
}
