//! `PUT|GET|DELETE /v1/schema/{type}`: a JSON Schema (draft 2020-12) per
//! type, replicated to every replica as an entry of the reserved type
//! (see [`crate::replica::schema`]).
//!
//! Owns: the HTTP shapes of these endpoints (the answer
//! `{"type","schema","version","author","origin","reason","written_at"}`,
//! their errors). Must not touch: what a valid schema is, how it is
//! stored or checked (the replica's schema module), or who may change one
//! (the gate in `auth`: a token with `types=` may not).

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Api, ApiError, WriteParams, Writer, answer, read_body, type_path, write_options};
use crate::identity::unix_ms;
use crate::replica::SCHEMA_TYPE;
use crate::store::Entry;

/// 404 for a type without a schema.
fn no_schema(ty: i32) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("type {ty} has no schema"),
    )
}

/// The answer of GET and PUT.
fn schema_json(ty: i32, entry: &Entry) -> Value {
    // Stored only once it parsed as a schema; a value from a faulty peer
    // that does not parse is shown as the text it is.
    let text = entry.value().unwrap_or_default();
    let schema = serde_json::from_str::<Value>(text).unwrap_or_else(|_| json!(text));
    let mut body = json!({
        "type": ty,
        "schema": schema,
        "version": entry.version().to_string(),
    });
    answer::meta_json(&mut body, entry, "origin");
    body
}

/// `GET /v1/schema/{type}`: the schema this replica holds.
pub(super) async fn get_schema(
    State(api): State<Arc<Api>>,
    path: Result<axum::extract::Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let ty = type_path(path)?;
    let entry = api
        .replica
        .store
        .get(SCHEMA_TYPE, &ty.to_string(), unix_ms())
        .ok_or_else(|| no_schema(ty))?;
    Ok(Json(schema_json(ty, &entry)))
}

/// `PUT /v1/schema/{type}`: sets the type's schema (the body), checked
/// and compiled first; `?wait=all` as for any write.
pub(super) async fn put_schema(
    State(api): State<Arc<Api>>,
    path: Result<axum::extract::Path<String>, PathRejection>,
    query: Result<Query<WriteParams>, QueryRejection>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let ty = type_path(path)?;
    let options = write_options(query)?;
    super::refuse_ttl(&options, "for a schema")?;
    let (parts, body) = request.into_parts();
    let writer = Writer::of(&parts)?;
    let body = read_body(&api, &parts.headers, body).await?;
    let text = std::str::from_utf8(&body).map_err(|e| {
        ApiError::bad_request("invalid_schema", format!("the schema must be UTF-8: {e}"))
    })?;
    let outcome = api
        .replica
        .write_schema(ty, Some(text), options.wait_all, writer.author())
        .await
        .inspect_err(|e| super::count_rejected(&api, &ApiError::from(e.clone())))?;
    let record = outcome
        .records
        .first()
        .ok_or_else(|| no_schema(ty))?
        .clone();
    let body = schema_json(ty, &record.entry);
    Ok(Json(super::with_replication(body, &outcome)).into_response())
}

/// `DELETE /v1/schema/{type}`: the type's writes are no longer checked.
pub(super) async fn delete_schema(
    State(api): State<Arc<Api>>,
    path: Result<axum::extract::Path<String>, PathRejection>,
    query: Result<Query<WriteParams>, QueryRejection>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let ty = type_path(path)?;
    let options = write_options(query)?;
    super::refuse_ttl(&options, "on a delete")?;
    let (parts, _) = request.into_parts();
    let writer = Writer::of(&parts)?;
    let outcome = api
        .replica
        .write_schema(ty, None, options.wait_all, writer.author())
        .await
        .inspect_err(|e| super::count_rejected(&api, &ApiError::from(e.clone())))?;
    let record = outcome.records.first().ok_or_else(|| no_schema(ty))?;
    let mut body = json!({
        "type": ty,
        "deleted": true,
        "version": record.entry.version().to_string(),
    });
    answer::meta_json(&mut body, &record.entry, "origin");
    Ok(Json(super::with_replication(body, &outcome)).into_response())
}
