//! The REST side of a node (CONTRACT §2): cache reads and writes, the watch
//! stream (`watch.rs`), the cluster view (`cluster.rs`), health, readiness
//! and metrics.
//!
//! Owns: HTTP parsing and validation of paths, queries and bodies, the JSON
//! shapes of answers, and [`ApiError`], the one error body every failure
//! uses. Must not touch: the merge rule or fan-out internals; it calls the
//! node's write paths and reads the store.

mod answer;
pub mod auth;
mod backup;
mod cluster;
mod error;
mod front;
mod listener;
mod ofrep;
mod schema;
mod watch;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub use error::ApiError;

use crate::discovery::PeerSet;
use crate::identity::unix_ms;
use crate::metrics::label;
use crate::replica::{Author, Change, DeliveryReport, Replica, WriteOutcome};
use crate::replication::Replicator;
use crate::replication::decider::{Conditional, Decided, Op};
use crate::store::{Entry, Expect, Record, Version};

/// What the REST API uses of the node.
#[derive(Debug)]
pub(crate) struct Api {
    pub(crate) replica: Arc<Replica>,
    /// The peer links, for `/v1/cluster` and the per-peer gauges.
    pub(crate) replicator: Arc<Replicator>,
    /// Who decides conditional writes, and the forwarding to it.
    pub(crate) decider: Arc<crate::replication::decider::Decider>,
    /// The latest membership published by discovery.
    pub(crate) peers_rx: tokio::sync::watch::Receiver<PeerSet>,
    /// Name of the discovery source.
    pub(crate) discovery_name: &'static str,
    /// REST credentials, when a token file is configured.
    pub(crate) auth: Option<Arc<auth::Auth>>,
    /// TLS of the REST port, when configured.
    pub(crate) http_tls: Option<Arc<crate::http_tls::HttpTls>>,
    /// One permit per open `/v1/watch` stream.
    pub(crate) watch_permits: Arc<tokio::sync::Semaphore>,
    /// Fires when the node stops serving (ends watch streams, so graceful
    /// HTTP shutdown is not held open by them).
    pub(crate) stop: CancellationToken,
}

pub(crate) use listener::serve;

/// The REST API of one node, as a router to merge into a service's own.
pub(crate) fn router(api: Arc<Api>) -> Router {
    Router::new().fallback_service(front::Front::new(api))
}

/// Every endpoint but `/v1/cache/{type}/{key}` (served by [`front`], which
/// also runs the request gate before these).
fn routes(api: Arc<Api>) -> Router {
    ofrep::mount(Router::new(), &api)
        .route("/v1/cache/{type}", get(get_namespace).post(post_batch))
        .route("/v1/watch/{type}", get(watch::watch))
        .route("/v1/export", get(backup::export))
        .route("/v1/import", axum::routing::post(backup::import))
        .route(
            "/v1/schema/{type}",
            get(schema::get_schema)
                .put(schema::put_schema)
                .delete(schema::delete_schema),
        )
        .route("/", get(dashboard))
        .route("/v1/cluster", get(cluster::cluster))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(|| async { method_not_allowed() })
        .with_state(api)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see /v1/cache/{type}/{key}, /v1/cluster, /healthz, /readyz, /metrics",
    )
}

fn empty_key() -> ApiError {
    ApiError::bad_request("invalid_key", "key must not be empty")
}

fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not accept that method",
    )
}

/// Parses `{type}`: an int32 namespace, not the reserved type of the
/// schemas (every user-facing path with a type reads it here).
fn parse_type(raw: &str) -> Result<i32, ApiError> {
    let ty = raw.parse::<i32>().map_err(|_| {
        ApiError::bad_request(
            "invalid_type",
            format!(
                "type must be a 32-bit integer, got {:?}",
                raw.chars().take(32).collect::<String>()
            ),
        )
    })?;
    if ty == crate::replica::SCHEMA_TYPE {
        return Err(crate::replica::WriteError::ReservedType.into());
    }
    Ok(ty)
}

fn type_path(path: Result<Path<String>, PathRejection>) -> Result<i32, ApiError> {
    let Path(ty) = path.map_err(ApiError::from_path)?;
    parse_type(&ty)
}

/// `?wait=none|all&ttl=<seconds>` on writes.
#[derive(Debug, Deserialize, Default)]
struct WriteParams {
    wait: Option<String>,
    ttl: Option<String>,
}

pub(super) struct WriteOptions {
    wait_all: bool,
    ttl_secs: Option<u64>,
}

fn write_options(
    query: Result<Query<WriteParams>, QueryRejection>,
) -> Result<WriteOptions, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let wait_all = match params.wait.as_deref() {
        None | Some("none") => false,
        Some("all") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("wait must be \"none\" or \"all\", got {other:?}"),
            ));
        }
    };
    let ttl_secs = match params.ttl.as_deref() {
        None => None,
        Some(raw) => Some(raw.parse::<u64>().map_err(|_| {
            ApiError::bad_request(
                "invalid_query",
                format!("ttl must be a whole number of seconds, got {raw:?}"),
            )
        })?),
    };
    Ok(WriteOptions { wait_all, ttl_secs })
}

/// 400 when `options` carry a TTL, which has no meaning `on` this write
/// (a delete, a rollback, a schema).
pub(super) fn refuse_ttl(options: &WriteOptions, on: &str) -> Result<(), ApiError> {
    match options.ttl_secs {
        Some(_) => Err(ApiError::bad_request(
            "invalid_query",
            format!("ttl has no meaning {on}"),
        )),
        None => Ok(()),
    }
}

/// Reads the body, refusing more than the configured limit.
async fn read_body(api: &Api, headers: &HeaderMap, body: Body) -> Result<bytes::Bytes, ApiError> {
    let limit = api.replica.config.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|err| {
        if std::error::Error::source(&err)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            ApiError::too_large(limit)
        } else {
            ApiError::bad_request(
                "bad_body",
                format!("could not read the request body: {err}"),
            )
        }
    })
}

fn count(api: &Api, op: &'static str) {
    let ops = &api.replica.metrics.ops;
    match op {
        "get" => ops.get.inc(),
        "set" => ops.set.inc(),
        "delete" => ops.delete.inc(),
        "batch" => ops.batch.inc(),
        "list" => ops.list.inc(),
        _ => ops.watch.inc(),
    };
}

fn replication_json(reports: &[DeliveryReport]) -> Value {
    Value::Array(
        reports
            .iter()
            .map(|r| {
                json!({
                    "peer": r.peer,
                    "name": r.name,
                    "status": r.status.as_str(),
                    "error": r.last_error,
                })
            })
            .collect(),
    )
}

fn entry_json(record: &Record) -> Value {
    let mut body = json!({
        "type": record.ty,
        "key": record.key(),
        "value": record.entry.value(),
        "version": record.entry.version().to_string(),
    });
    if record.entry.expires_at_ms() != 0 {
        body["expires_at_ms"] = json!(record.entry.expires_at_ms());
    }
    body
}

/// Longest `X-Podcache-Reason`.
const MAX_REASON_BYTES: usize = 256;

/// The `X-Podcache-Reason` of a write: UTF-8, at most 256 bytes.
fn reason(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(raw) = headers.get("x-podcache-reason") else {
        return Ok(None);
    };
    let bad = |why: &str| ApiError::bad_request("invalid_reason", why.to_owned());
    if raw.len() > MAX_REASON_BYTES {
        return Err(bad(&format!(
            "X-Podcache-Reason is {} bytes, the limit is {MAX_REASON_BYTES}",
            raw.len()
        )));
    }
    let text = std::str::from_utf8(raw.as_bytes())
        .map_err(|_| bad("X-Podcache-Reason must be UTF-8 text"))?;
    if text.chars().any(char::is_control) {
        return Err(bad("X-Podcache-Reason must not hold control characters"));
    }
    Ok(Some(text.trim()).filter(|t| !t.is_empty()))
}

/// Who a request writes as (set by the gate: token name, certificate
/// subject or `anonymous`) and why (its `X-Podcache-Reason`, checked).
struct Writer<'a> {
    name: Arc<str>,
    reason: Option<&'a str>,
}

impl<'a> Writer<'a> {
    /// The writer of a request; 400 for a bad reason (checked before the
    /// body is read).
    fn of(parts: &'a axum::http::request::Parts) -> Result<Self, ApiError> {
        Ok(Self {
            reason: reason(&parts.headers)?,
            name: parts
                .extensions
                .get::<auth::Caller>()
                .map_or_else(|| Arc::from("anonymous"), |c| c.0.clone()),
        })
    }

    /// A conditional write by this writer.
    fn conditional(
        &self,
        ty: i32,
        op: Op,
        ttl_secs: Option<u64>,
        guards: Vec<(String, Expect)>,
    ) -> Conditional {
        Conditional {
            ty,
            op,
            ttl_secs,
            guards,
            author: self.name.to_string(),
            reason: self.reason.map(str::to_owned),
        }
    }

    /// Who writes, as the write path takes it.
    fn author(&self) -> Author<'_> {
        Author {
            name: &self.name,
            reason: self.reason,
        }
    }

    /// Writes `change` as this writer, counting a refusal by its reason.
    async fn write(
        &self,
        api: &Api,
        change: Change<'_>,
        wait: bool,
    ) -> Result<WriteOutcome, ApiError> {
        Ok(api
            .replica
            .write_as(change, wait, self.author())
            .await
            .inspect_err(|e| reject(api, e))?)
    }
}

fn with_replication(mut body: Value, outcome: &WriteOutcome) -> Value {
    if let Some(reports) = &outcome.replication {
        body["replication"] = replication_json(reports);
    }
    body
}

fn get_entry(api: &Api, ty: i32, key: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    count(api, "get");
    let entry = api
        .replica
        .store
        .get(ty, key, unix_ms())
        .ok_or_else(|| ApiError::absent(ty, key))?;
    if let Some(tags) = headers.get(header::IF_NONE_MATCH)
        && etag_matches(tags.as_bytes(), entry.version())
    {
        return Ok(not_modified(entry.version()));
    }
    Ok(answer::entry(&Record { ty, entry }, None))
}

/// 304 for a read whose `If-None-Match` names the version held.
fn not_modified(version: Version) -> Response {
    let mut response = StatusCode::NOT_MODIFIED.into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

/// True when the `If-None-Match` list of a read names `version` (or is
/// `*`). Weak tags compare weakly, as RFC 9110 says for this header.
fn etag_matches(tags: &[u8], version: Version) -> bool {
    let Ok(tags) = std::str::from_utf8(tags) else {
        return false;
    };
    tags.split(',').map(str::trim).any(|tag| {
        tag == "*"
            || tag
                .trim_start_matches("W/")
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .and_then(parse_version)
                == Some(version)
    })
}

/// The expectation of a single-entry write: `If-Match: "<version>"` (the
/// key is at exactly that version), `If-Match: *` (it holds a value),
/// `If-None-Match: *` (it holds none); `None` without either header.
fn expectation(headers: &HeaderMap) -> Result<Option<Expect>, ApiError> {
    let bad = |why: String| ApiError::bad_request("invalid_precondition", why);
    fn text<'h>(value: &'h HeaderValue, name: &str) -> Result<&'h str, ApiError> {
        value.to_str().map(str::trim).map_err(|_| {
            ApiError::bad_request("invalid_precondition", format!("{name} must be ASCII text"))
        })
    }
    match (
        headers.get(header::IF_MATCH),
        headers.get(header::IF_NONE_MATCH),
    ) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(bad(
            "a write takes If-Match or If-None-Match, not both".into()
        )),
        (None, Some(value)) => match text(value, "If-None-Match")? {
            "*" => Ok(Some(Expect::Absent)),
            other => Err(bad(format!(
                "on a write, If-None-Match takes only * (the key must be absent), got {:?}",
                other.chars().take(64).collect::<String>()
            ))),
        },
        (Some(value), None) => {
            let raw = text(value, "If-Match")?;
            if raw == "*" {
                return Ok(Some(Expect::Present));
            }
            if raw.starts_with("W/") {
                return Err(bad(
                    "If-Match needs a strong ETag: a weak one never matches a write".into(),
                ));
            }
            raw.strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .and_then(parse_version)
                .map(|v| Some(Expect::Version(v)))
                .ok_or_else(|| {
                    bad(format!(
                        "If-Match must be one quoted version, \"<wall ms>.<logical>@<16 hex digits>\" (the ETag of a read), or *; got {:?}",
                        raw.chars().take(64).collect::<String>()
                    ))
                })
        }
    }
}

/// A conditional write: decided by the decider (here or forwarded), with
/// `wait=all` implied. The answer is that of the unconditional write, with
/// the decider named.
async fn conditional(api: &Api, write: Conditional) -> Result<Decided, ApiError> {
    // Limits and the schema first, here (the replica that takes a write
    // checks it): a bad change is refused without a trip to the decider,
    // which checks them again.
    let entries = write.entries();
    api.replica
        .store
        .check_batch(entries.iter().copied(), write.ttl_secs)?;
    api.replica.check(&write.change(&entries))?;
    drop(entries);
    let decided = api.decider.decide(write, false).await;
    let decided = decided.map_err(ApiError::from)?;
    api.replica.metrics.ops.conditional.inc();
    Ok(decided)
}

async fn put_entry(
    api: &Api,
    ty: i32,
    key: String,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let options = write_options(Query::try_from_uri(&parts.uri))?;
    let writer = Writer::of(&parts)?;
    let expect = expectation(&parts.headers)?;
    let body = read_body(api, &parts.headers, body).await?;
    let value = std::str::from_utf8(&body).map_err(|e| {
        ApiError::bad_request("invalid_utf8", format!("the value must be UTF-8 text: {e}"))
    })?;
    if let Some(expect) = expect {
        let write = writer.conditional(
            ty,
            Op::Set {
                key: key.clone(),
                value: value.to_owned(),
            },
            options.ttl_secs,
            vec![(key, expect)],
        );
        let decided = conditional(api, write).await?;
        count(api, "set");
        return Ok(answer::entry(
            &decided.records[0],
            Some(&decided.replication),
        ));
    }
    let change = Change::Set {
        ty,
        key: &key,
        value,
        ttl_secs: options.ttl_secs,
    };
    let outcome = writer.write(api, change, options.wait_all).await?;
    count(api, "set");
    debug!(ty, key = %key, "set");
    Ok(answer::entry(
        &outcome.records[0],
        outcome.replication.as_deref(),
    ))
}

fn reject(api: &Api, err: &crate::replica::WriteError) {
    count_rejected(api, &ApiError::from(err.clone()));
}

/// Counts a refused write in `rejected_requests`, by its error code.
fn count_rejected(api: &Api, err: &ApiError) {
    api.replica
        .metrics
        .rejected
        .get_or_create(&label("reason", err.code))
        .inc();
}

async fn delete_entry(
    api: &Api,
    ty: i32,
    key: String,
    request: &axum::http::request::Parts,
) -> Result<Json<Value>, ApiError> {
    let options = write_options(Query::try_from_uri(&request.uri))?;
    let writer = Writer::of(request)?;
    refuse_ttl(&options, "on a delete")?;
    if let Some(expect) = expectation(&request.headers)? {
        let write = writer.conditional(
            ty,
            Op::Delete { key: key.clone() },
            None,
            vec![(key.clone(), expect)],
        );
        let decided = conditional(api, write).await?;
        let Some(record) = decided.records.first() else {
            return Err(ApiError::absent(ty, &key));
        };
        count(api, "delete");
        let mut body = deleted_json(record);
        body["replication"] = replication_json(&decided.replication);
        return Ok(Json(body));
    }
    let outcome = writer
        .write(api, Change::Delete { ty, key: &key }, options.wait_all)
        .await?;
    let Some(record) = outcome.records.first() else {
        return Err(ApiError::absent(ty, &key));
    };
    count(api, "delete");
    Ok(Json(with_replication(deleted_json(record), &outcome)))
}

/// The answer to a delete: `{"type","key","deleted":true,"version",...}`.
fn deleted_json(record: &Record) -> Value {
    let mut body = json!({
        "type": record.ty,
        "key": record.key(),
        "deleted": true,
        "version": record.entry.version().to_string(),
    });
    answer::meta_json(&mut body, &record.entry, "origin");
    body
}

/// One version of a key as history lists it.
fn version_json(entry: &Entry) -> Value {
    let mut body = json!({ "version": entry.version().to_string() });
    match entry.value() {
        Some(value) => body["value"] = json!(value),
        None => body["deleted"] = json!(true),
    }
    if entry.expires_at_ms() != 0 {
        body["expires_at_ms"] = json!(entry.expires_at_ms());
    }
    answer::meta_json(&mut body, entry, "origin");
    body
}

/// `GET /v1/cache/{type}/{key}/history`: the current entry and the
/// versions it superseded, newest first.
pub(super) fn get_history(api: &Api, ty: i32, key: &str) -> Result<Json<Value>, ApiError> {
    count(api, "get");
    let (current, older) = api.replica.store.history(ty, key);
    if current.is_none() && older.is_empty() {
        return Err(ApiError::absent(ty, key));
    }
    let versions: Vec<Value> = current.iter().chain(&older).map(version_json).collect();
    Ok(Json(
        json!({ "type": ty, "key": key, "versions": versions }),
    ))
}

#[derive(Debug, Deserialize)]
struct RollbackParams {
    version: Option<String>,
}

/// Parses a version's text form, `<wall ms>.<logical>@<node id hex>`.
fn parse_version(text: &str) -> Option<Version> {
    let (clock, node) = text.split_once('@')?;
    let (ms, logical) = clock.split_once('.')?;
    let ms: u64 = ms.parse().ok()?;
    let logical: u64 = logical.parse().ok()?;
    if ms >= 1 << 48 || logical >= 1 << 16 || node.len() != 16 {
        return None;
    }
    Some(Version {
        hlc: crate::store::clock::hlc_from_ms(ms) | logical,
        node: u64::from_str_radix(node, 16).ok()?,
    })
}

/// `POST /v1/cache/{type}/{key}/rollback?version=V`: writes the value (or
/// the deletion) version V held again, as a new version.
pub(super) async fn rollback(
    api: &Api,
    ty: i32,
    key: String,
    request: &axum::http::request::Parts,
) -> Result<Response, ApiError> {
    let options = write_options(Query::try_from_uri(&request.uri))?;
    refuse_ttl(&options, "on a rollback")?;
    let Query(params) = Query::<RollbackParams>::try_from_uri(&request.uri)
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let raw = params.version.ok_or_else(|| {
        ApiError::bad_request("invalid_query", "rollback needs ?version=<version>")
    })?;
    let version = parse_version(&raw).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_query",
            format!("version must be <wall ms>.<logical>@<16 hex digits>, got {raw:?}"),
        )
    })?;
    let writer = Writer::of(request)?;
    let Some(old) = api.replica.store.version_of(ty, &key, version) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "version_not_found",
            format!("type {ty} key {key:?} has no version {raw} in this node's history"),
        ));
    };
    if let Some(expect) = expectation(&request.headers)? {
        let op = match old.value() {
            Some(value) => Op::Set {
                key: key.clone(),
                value: value.to_owned(),
            },
            None => Op::Delete { key: key.clone() },
        };
        let write = writer.conditional(ty, op, None, vec![(key.clone(), expect)]);
        let decided = conditional(api, write).await?;
        count(api, "set");
        return Ok(match decided.records.first() {
            Some(record) if record.entry.is_tombstone() => {
                let mut body = deleted_json(record);
                body["replication"] = replication_json(&decided.replication);
                Json(body).into_response()
            }
            Some(record) => answer::entry(record, Some(&decided.replication)),
            None => return Err(ApiError::absent(ty, &key)),
        });
    }
    let change = match old.value() {
        Some(value) => Change::Set {
            ty,
            key: &key,
            value,
            ttl_secs: None,
        },
        None => Change::Delete { ty, key: &key },
    };
    let outcome = writer.write(api, change, options.wait_all).await?;
    count(api, "set");
    let record = match outcome.records.first() {
        Some(record) => record.clone(),
        // Back to a deletion of a key already deleted (or expired): there
        // is nothing to write, and the answer is the deletion it holds.
        None => match api.replica.store.history(ty, &key).0 {
            Some(entry) => {
                return Ok(Json(with_replication(
                    deleted_json(&Record { ty, entry }),
                    &outcome,
                ))
                .into_response());
            }
            None => return Err(ApiError::absent(ty, &key)),
        },
    };
    if record.entry.is_tombstone() {
        Ok(Json(with_replication(deleted_json(&record), &outcome)).into_response())
    } else {
        Ok(answer::entry(&record, outcome.replication.as_deref()))
    }
}

async fn get_namespace(
    State(api): State<Arc<Api>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let ty = type_path(path)?;
    count(&api, "list");
    let entries = api.replica.store.namespace(ty, unix_ms());
    let entries: BTreeMap<&str, &str> = entries
        .iter()
        .filter_map(|e| Some((e.key(), e.value()?)))
        .collect();
    Ok(Json(json!({ "type": ty, "entries": entries })))
}

/// The parsers of request paths and bodies, for the fuzz targets: each
/// returns the answer's error or the parsed value, and must never panic.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    /// The entry endpoint's path parsing.
    pub fn entry_path(path: &str) -> Option<Result<(i32, String), String>> {
        super::front::parse_entry_path(path).map(|r| r.map_err(|e| e.message))
    }

    /// A batch body: the entries it would write (`None` deletes).
    pub fn batch(body: &[u8]) -> Result<Vec<(String, Option<String>)>, String> {
        super::parse_batch(body)
            .map(|m| {
                m.into_iter()
                    .map(|(k, v)| (k.0.into_owned(), v.map(|v| v.0.into_owned())))
                    .collect()
            })
            .map_err(|e| e.message)
    }

    /// An import body (`ctl import` lines).
    pub fn import(body: &[u8]) -> Result<Vec<crate::store::Record>, String> {
        super::backup::parse(body).map_err(|e| e.message)
    }
}

/// A JSON string of a batch body, borrowed from the body when it holds no
/// escapes (the common case), so a batch costs no allocation per entry.
#[derive(Deserialize, PartialEq, Eq, PartialOrd, Ord)]
struct Text<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>);

/// Parses a batch body: a JSON object of string values, `null` for a
/// delete. Duplicate keys keep the last value (as JSON parsers commonly
/// do).
fn parse_batch(body: &[u8]) -> Result<BTreeMap<Text<'_>, Option<Text<'_>>>, ApiError> {
    serde_json::from_slice(body).map_err(|fast_err| {
        // Parse again as any JSON to say which value is not a string.
        let detail = match serde_json::from_slice::<BTreeMap<String, Value>>(body) {
            Ok(parsed) => parsed
                .iter()
                .find(|(_, v)| !v.is_string() && !v.is_null())
                .map(|(key, value)| {
                    format!(
                        "the value of key {:?} must be a string, got {}",
                        key.chars().take(64).collect::<String>(),
                        json_kind(value)
                    )
                }),
            Err(_) => None,
        };
        ApiError::bad_request(
            "invalid_json",
            detail.unwrap_or_else(|| {
                format!("the body must be a JSON object of string (or null) values: {fast_err}")
            }),
        )
    })
}

/// One entry of a batch with expectations: `{"value": "<v>"|null,
/// "if_version": "<version>" | "if_absent": true | "if_present": true}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GuardedEntry {
    /// Required: a string, or null to delete (a missing `value` is an
    /// error, not a delete).
    value: Value,
    if_version: Option<String>,
    if_absent: Option<bool>,
    if_present: Option<bool>,
}

/// A batch whose values may be objects with expectations: `None` when no
/// value is an object (the body is then a plain batch, or bad as one).
#[allow(clippy::type_complexity)]
fn parse_guarded_batch(
    body: &[u8],
) -> Result<Option<Vec<(String, Option<String>, Option<Expect>)>>, ApiError> {
    let Ok(parsed) = serde_json::from_slice::<BTreeMap<String, Value>>(body) else {
        return Ok(None);
    };
    if !parsed.values().any(Value::is_object) {
        return Ok(None);
    }
    let bad = |key: &str, why: String| {
        ApiError::bad_request(
            "invalid_json",
            format!("key {:?}: {why}", key.chars().take(64).collect::<String>()),
        )
    };
    let mut entries = Vec::with_capacity(parsed.len());
    for (key, value) in parsed {
        let entry = match value {
            Value::Null => (key, None, None),
            Value::String(v) => (key, Some(v), None),
            Value::Object(_) => {
                let e: GuardedEntry = serde_json::from_value(value).map_err(|err| {
                    bad(
                        &key,
                        format!(
                            "an entry object has \"value\" (a string or null) and at most one of \"if_version\", \"if_absent\": true, \"if_present\": true: {err}"
                        ),
                    )
                })?;
                let expect = match (e.if_version, e.if_absent, e.if_present) {
                    (None, None | Some(false), None | Some(false)) => None,
                    (Some(text), None, None) => {
                        Some(Expect::Version(parse_version(&text).ok_or_else(|| {
                            bad(
                                &key,
                                format!(
                                    "if_version is not a version: {:?}",
                                    text.chars().take(64).collect::<String>()
                                ),
                            )
                        })?))
                    }
                    (None, Some(true), None) => Some(Expect::Absent),
                    (None, None, Some(true)) => Some(Expect::Present),
                    _ => {
                        return Err(bad(
                            &key,
                            "name at most one of if_version, if_absent, if_present".into(),
                        ));
                    }
                };
                let value = match e.value {
                    Value::Null => None,
                    Value::String(v) => Some(v),
                    other => {
                        return Err(bad(
                            &key,
                            format!(
                                "an entry object's \"value\" must be a string or null, got {}",
                                json_kind(&other)
                            ),
                        ));
                    }
                };
                (key, value, expect)
            }
            other => {
                return Err(bad(
                    &key,
                    format!(
                        "the value must be a string, null or an entry object, got {}",
                        json_kind(&other)
                    ),
                ));
            }
        };
        entries.push(entry);
    }
    Ok(Some(entries))
}

/// A batch with expectations: decided whole by the decider, or refused
/// whole. One without any expectation is a plain batch.
async fn guarded_batch(
    api: &Api,
    writer: &Writer<'_>,
    ty: i32,
    options: &WriteOptions,
    entries: Vec<(String, Option<String>, Option<Expect>)>,
) -> Result<Response, ApiError> {
    let ttl_secs = options.ttl_secs;
    let guards: Vec<(String, Expect)> = entries
        .iter()
        .filter_map(|(k, _, e)| Some((k.clone(), (*e)?)))
        .collect();
    let entries: Vec<(String, Option<String>)> =
        entries.into_iter().map(|(k, v, _)| (k, v)).collect();
    if guards.is_empty() {
        let borrowed: Vec<(&str, Option<&str>)> = entries
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        let change = Change::Batch {
            ty,
            entries: &borrowed,
            ttl_secs,
        };
        let outcome = writer.write(api, change, options.wait_all).await?;
        count(api, "batch");
        return Ok(answer::batch(
            ty,
            &outcome.records,
            outcome.replication.as_deref(),
        ));
    }
    let write = writer.conditional(ty, Op::Batch { entries }, ttl_secs, guards);
    let decided = conditional(api, write).await?;
    count(api, "batch");
    Ok(answer::batch(
        ty,
        &decided.records,
        Some(&decided.replication),
    ))
}

async fn post_batch(
    State(api): State<Arc<Api>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<WriteParams>, QueryRejection>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let ty = type_path(path)?;
    let options = write_options(query)?;
    let (parts, body) = request.into_parts();
    let writer = Writer::of(&parts)?;
    let body = read_body(&api, &parts.headers, body).await?;
    let parsed = match parse_batch(&body) {
        Ok(parsed) => parsed,
        Err(plain) => {
            let Some(guarded) = parse_guarded_batch(&body)? else {
                return Err(plain);
            };
            return guarded_batch(&api, &writer, ty, &options, guarded).await;
        }
    };
    let entries: Vec<(&str, Option<&str>)> = parsed
        .iter()
        .map(|(k, v)| (&*k.0, v.as_ref().map(|v| &*v.0)))
        .collect();
    let change = Change::Batch {
        ty,
        entries: &entries,
        ttl_secs: options.ttl_secs,
    };
    let outcome = writer.write(&api, change, options.wait_all).await?;
    count(&api, "batch");
    Ok(answer::batch(
        ty,
        &outcome.records,
        outcome.replication.as_deref(),
    ))
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The dashboard: one self-contained page (no external assets) that polls
/// `/v1/cluster` and `/metrics`.
async fn dashboard() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("dashboard.html"),
    )
        .into_response()
}

/// The OpenAPI 3.1 document of this API (`tests/openapi.rs` checks it
/// against real answers).
async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "alive" }))
}

async fn readyz(State(api): State<Arc<Api>>) -> Result<Json<Value>, ApiError> {
    if api.replica.is_ready() {
        Ok(Json(json!({ "status": "ready" })))
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the node is still pulling its state from the oldest peer (or waiting for discovery)",
        ))
    }
}

/// The classic Prometheus text format, or OpenMetrics when the scraper's
/// `Accept` prefers it (Prometheus itself does).
async fn metrics(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = crate::metrics::Format::from_accept(accept);
    let text = api.replica.render_metrics(api.replicator.backlogs());
    let body = match format {
        crate::metrics::Format::OpenMetrics => text,
        crate::metrics::Format::Prometheus => crate::metrics::to_prometheus_text(&text),
    };
    (
        [
            (header::CONTENT_TYPE, format.content_type()),
            (header::VARY, "Accept"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(body: &str) -> Result<Vec<(String, String)>, ApiError> {
        Ok(parse_batch(body.as_bytes())?
            .into_iter()
            .map(|(k, v)| {
                (
                    k.0.into_owned(),
                    v.map_or("<null>".into(), |v| v.0.into_owned()),
                )
            })
            .collect())
    }

    #[test]
    fn a_batch_body_may_delete_with_null() {
        let got = pairs(r#"{"a":"1","b":null}"#).expect("valid");
        assert_eq!(
            got,
            vec![("a".into(), "1".into()), ("b".into(), "<null>".into())]
        );
    }

    #[test]
    fn a_reason_is_bounded_utf8_text() {
        let mut headers = HeaderMap::new();
        assert_eq!(reason(&headers).expect("none"), None);
        headers.insert("x-podcache-reason", "rollout 42".parse().expect("header"));
        assert_eq!(reason(&headers).expect("ok"), Some("rollout 42"));
        headers.insert(
            "x-podcache-reason",
            "x".repeat(257).parse().expect("header"),
        );
        assert_eq!(reason(&headers).expect_err("long").code, "invalid_reason");
        headers.insert(
            "x-podcache-reason",
            axum::http::HeaderValue::from_bytes(b"\xff\xfe").expect("header"),
        );
        assert_eq!(
            reason(&headers).expect_err("not UTF-8").code,
            "invalid_reason"
        );
    }

    #[test]
    fn a_version_text_parses_back() {
        let v = Version {
            hlc: (1_764_222_930_123 << 16) | 7,
            node: 0x9f3a_0000_0000_0001,
        };
        assert_eq!(parse_version(&v.to_string()), Some(v));
        for bad in [
            "",
            "1.2",
            "1.2@zz",
            "x.0@0000000000000001",
            "1.99999@0000000000000001",
        ] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_batch_body_is_read_with_and_without_escapes() {
        let got = pairs(r#"{"b":"plain","a":"tab\there \"quoted\" \u00e9"}"#).expect("valid");
        assert_eq!(
            got,
            vec![
                ("a".into(), "tab\there \"quoted\" é".into()),
                ("b".into(), "plain".into()),
            ]
        );
        // A repeated key keeps its last value.
        assert_eq!(
            pairs(r#"{"k":"1","k":"2"}"#).expect("valid"),
            vec![("k".into(), "2".into())]
        );
    }

    #[test]
    fn a_batch_body_that_is_not_an_object_of_strings_is_refused_with_the_reason() {
        let err = pairs(r#"{"a":"ok","n":5}"#).expect_err("number");
        assert_eq!(err.code, "invalid_json");
        assert!(
            err.message
                .contains(r#"key "n" must be a string, got a number"#),
            "{}",
            err.message
        );
        let err = pairs(r#"["a"]"#).expect_err("array");
        assert!(
            err.message
                .contains("JSON object of string (or null) values"),
            "{}",
            err.message
        );
        let err = pairs(r#"{"a":"#).expect_err("truncated");
        assert!(
            err.message
                .contains("JSON object of string (or null) values"),
            "{}",
            err.message
        );
    }
}
