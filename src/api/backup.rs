//! Backups for setups without volumes: `GET /v1/export[?type=T]` streams
//! every entry, tombstones included, with its version and expiry;
//! `POST /v1/import` merges such a stream by version (idempotent: running
//! it twice, or against a live cluster, changes nothing the second time).
//!
//! Owns: the export format, documented here and in the README. Must not
//! touch the merge rule: an import goes through [`Replica::import`].
//!
//! # Format
//! JSON lines (`application/x-ndjson`). The first line is a header,
//! `{"format":"podcache-export","version":1,"node":"<name>","exported_at_ms":<ms>,"entries":<n>}`;
//! each other line is one entry,
//! `{"type":<i32>,"key":"<text>","value":"<text>"|null,"hlc":<u64>,"node":"<16 hex>","expires_at_ms":<u64>}`,
//! where `value` null is a tombstone and `hlc`/`node` are the version
//! (hybrid timestamp, writer's node id). An import takes the same lines;
//! the header is optional there, but when present must say this format.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Api, ApiError, read_body};
use crate::identity::unix_ms;
use crate::replica::Replica;
use crate::store::{Record, Version};

/// The format name in the header line.
const FORMAT: &str = "podcache-export";
/// Records serialized per chunk of the streamed answer.
const CHUNK: usize = 1000;

#[derive(Debug, Deserialize, Default)]
pub(super) struct ExportParams {
    r#type: Option<String>,
}

/// One entry of the format.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Line {
    r#type: i32,
    key: String,
    value: Option<String>,
    hlc: u64,
    node: String,
    #[serde(default)]
    expires_at_ms: u64,
}

impl Line {
    fn of(record: &Record) -> Self {
        let version = record.entry.version();
        Self {
            r#type: record.ty,
            key: record.key().to_owned(),
            value: record.entry.value().map(str::to_owned),
            hlc: version.hlc,
            node: format!("{:016x}", version.node),
            expires_at_ms: record.entry.expires_at_ms(),
        }
    }

    fn record(&self) -> Result<Record, String> {
        if self.key.is_empty() {
            return Err("the key is empty".into());
        }
        let node = u64::from_str_radix(&self.node, 16)
            .map_err(|_| format!("node {:?} is not 16 hex digits", self.node))?;
        Ok(Record::new(
            self.r#type,
            &self.key,
            self.value.as_deref(),
            Version {
                hlc: self.hlc,
                node,
            },
            self.expires_at_ms,
        ))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: String,
    version: u32,
    #[serde(default)]
    #[allow(dead_code)]
    node: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    exported_at_ms: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)]
    entries: Option<u64>,
}

/// `GET /v1/export[?type=T]`.
pub(super) async fn export(
    State(api): State<Arc<Api>>,
    query: Result<Query<ExportParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let only = match params.r#type.as_deref() {
        None => None,
        Some(raw) => Some(super::parse_type(raw)?),
    };
    let mut records = api.replica.store.snapshot();
    if let Some(ty) = only {
        records.retain(|r| r.ty == ty);
    }
    records.sort_unstable_by(|a, b| (a.ty, a.key()).cmp(&(b.ty, b.key())));
    let header = json!({
        "format": FORMAT,
        "version": 1,
        "node": api.replica.identity.name,
        "exported_at_ms": unix_ms(),
        "entries": records.len(),
    });
    let mut first = header.to_string();
    first.push('\n');
    let records: Arc<[Record]> = records.into();
    let chunks = (0..records.len().div_ceil(CHUNK)).map(move |i| {
        let mut out = Vec::with_capacity(CHUNK * 96);
        for record in records.iter().skip(i * CHUNK).take(CHUNK) {
            // A `Line` of strings and numbers always serializes.
            if serde_json::to_writer(&mut out, &Line::of(record)).is_ok() {
                out.push(b'\n');
            }
        }
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(out))
    });
    let stream =
        futures_util::stream::iter(std::iter::once(Ok(bytes::Bytes::from(first))).chain(chunks));
    let mut response = Body::from_stream(stream).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(response)
}

/// Parses an import body: every line checked before anything is merged.
pub(super) fn parse(body: &[u8]) -> Result<Vec<Record>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request("invalid_utf8", format!("the body must be UTF-8: {e}"))
    })?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad =
            |why: String| ApiError::bad_request("invalid_export", format!("line {}: {why}", i + 1));
        if line.contains("\"format\"") {
            let header: Header = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
            if header.format != FORMAT || header.version != 1 {
                return Err(bad(format!(
                    "format {:?} version {}, this podcache reads {FORMAT:?} version 1",
                    header.format, header.version
                )));
            }
            continue;
        }
        let entry: Line = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        records.push(entry.record().map_err(bad)?);
    }
    Ok(records)
}

/// `POST /v1/import`: merges the body's entries by version; answers what
/// changed.
pub(super) async fn import(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&api, &headers, body).await?;
    let records = parse(&body)?;
    let total = records.len();
    let outcome = import_into(&api.replica, records)?;
    Ok(axum::Json(json!({
        "entries": total,
        "applied": outcome.applied.len(),
        "stale": outcome.stale,
        "rejected": outcome.rejected.len(),
        "first_rejection": outcome.rejected.first().map(ToString::to_string),
    }))
    .into_response())
}

fn import_into(
    replica: &Replica,
    records: Vec<Record>,
) -> Result<crate::store::MergeOutcome, ApiError> {
    replica.import(records).map_err(ApiError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_round_trips_and_bad_lines_say_which() {
        let record = Record::new(
            -3,
            "k\n\"x\"",
            None,
            Version {
                hlc: 12345 << 16,
                node: 0xabc,
            },
            99,
        );
        let text = serde_json::to_string(&Line::of(&record)).expect("json");
        let parsed = parse(format!("{text}\n").as_bytes()).expect("valid");
        assert_eq!(parsed, vec![record]);
        let header =
            r#"{"format":"podcache-export","version":1,"node":"n","exported_at_ms":1,"entries":0}"#;
        assert!(parse(header.as_bytes()).expect("header only").is_empty());
        let err = parse(format!("{header}\n{{\"type\":1}}").as_bytes()).expect_err("bad");
        assert!(err.message.starts_with("line 2:"), "{}", err.message);
        let err = parse(br#"{"format":"other","version":1}"#).expect_err("format");
        assert!(
            err.message.contains("this podcache reads"),
            "{}",
            err.message
        );
        let err =
            parse(br#"{"type":1,"key":"","value":"v","hlc":1,"node":"01"}"#).expect_err("key");
        assert!(err.message.contains("empty"), "{}", err.message);
    }
}
