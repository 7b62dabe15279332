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
//! the header is optional there, but when present it is the first
//! non-empty line (an object with `format` and no `type` or `key`: every
//! later line is an entry, so a key named `format` is just a key), it must
//! say this format, and when it gives `entries` the body must hold exactly
//! that many entry lines (a file cut short at a line's end, or edited, is
//! refused whole).

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
use crate::store::{Entry, Meta, Record, Version};

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
    /// Who wrote it (absent in exports from before the field: `import`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    author: Option<String>,
    /// The pod that took the write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Written by a batch.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    batch: bool,
}

impl Line {
    fn of(record: &Record) -> Self {
        let version = record.entry.version();
        let meta = record.entry.meta();
        Self {
            r#type: record.ty,
            key: record.key().to_owned(),
            value: record.entry.value().map(str::to_owned),
            hlc: version.hlc,
            node: format!("{:016x}", version.node),
            expires_at_ms: record.entry.expires_at_ms(),
            author: meta.map(|m| m.author.to_string()).filter(|a| !a.is_empty()),
            origin: meta.map(|m| m.origin.to_string()).filter(|o| !o.is_empty()),
            reason: meta.and_then(|m| m.reason.as_deref().map(str::to_owned)),
            batch: record.entry.in_batch(),
        }
    }

    /// The record of this line; `last` is the description of the line
    /// before, shared when equal (one export's lines mostly are).
    fn record(&self, last: &mut Option<std::sync::Arc<Meta>>) -> Result<Record, String> {
        if self.key.is_empty() {
            return Err("the key is empty".into());
        }
        let node = u64::from_str_radix(&self.node, 16)
            .map_err(|_| format!("node {:?} is not 16 hex digits", self.node))?;
        let meta = Meta::new(
            self.author.as_deref().unwrap_or("import"),
            self.origin.as_deref().unwrap_or_default(),
            self.reason.as_deref(),
            self.batch,
        );
        if !meta.within_limits() {
            return Err(format!(
                "author, origin or reason is longer than {} bytes",
                Meta::MAX_FIELD_BYTES
            ));
        }
        Ok(Record {
            ty: self.r#type,
            entry: Entry::with_meta(
                &self.key,
                self.value.as_deref(),
                Version {
                    hlc: self.hlc,
                    node,
                },
                self.expires_at_ms,
                Some(match last {
                    Some(shared) if **shared == meta => shared.clone(),
                    _ => last.insert(std::sync::Arc::new(meta)).clone(),
                }),
            ),
        })
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
    /// How many entry lines follow; an import checks it when given.
    #[serde(default)]
    entries: Option<u64>,
}

/// Whether a line is a header rather than an entry: a JSON object with a
/// `format` field and neither `type` nor `key` (which every entry has).
fn is_header(line: &str) -> bool {
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line).is_ok_and(|object| {
        object.contains_key("format") && !object.contains_key("type") && !object.contains_key("key")
    })
}

/// `GET /v1/export[?type=T]`.
pub(super) async fn export(
    State(api): State<Arc<Api>>,
    scoped: Option<axum::Extension<super::auth::Scoped>>,
    query: Result<Query<ExportParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let only = match params.r#type.as_deref() {
        None => None,
        Some(raw) => Some(super::parse_type(raw)?),
    };
    // A token limited to some types exports one of them at a time: a
    // backup that silently left types out would restore a partial state.
    if let Some(axum::Extension(scoped)) = scoped {
        match only {
            None => return Err(scoped.refuse_whole("a whole export (without ?type=)")),
            Some(ty) if !scoped.scope.covers(ty) => return Err(scoped.refuse(ty)),
            Some(_) => {}
        }
    }
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
/// Only the first non-empty line may be the header.
pub(super) fn parse(body: &[u8]) -> Result<Vec<Record>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request("invalid_utf8", format!("the body must be UTF-8: {e}"))
    })?;
    let mut records = Vec::new();
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty())
        .peekable();
    let bad = |number: usize, why: String| {
        ApiError::bad_request("invalid_export", format!("line {number}: {why}"))
    };
    let mut expected = None;
    if let Some((number, line)) = lines.next_if(|(_, line)| is_header(line)) {
        let header: Header = serde_json::from_str(line).map_err(|e| bad(number, e.to_string()))?;
        if header.format != FORMAT || header.version != 1 {
            return Err(bad(
                number,
                format!(
                    "format {:?} version {}, this podcache reads {FORMAT:?} version 1",
                    header.format, header.version
                ),
            ));
        }
        expected = header.entries;
    }
    let mut last = None;
    for (number, line) in lines {
        let entry: Line = serde_json::from_str(line).map_err(|e| {
            if is_header(line) {
                bad(
                    number,
                    "a second header: an export has one, on its first line (were two files \
                     joined?)"
                        .into(),
                )
            } else {
                bad(number, e.to_string())
            }
        })?;
        records.push(entry.record(&mut last).map_err(|why| bad(number, why))?);
    }
    if let Some(expected) = expected
        && records.len() as u64 != expected
    {
        return Err(ApiError::bad_request(
            "invalid_export",
            format!(
                "the export holds {} entries but its header says {expected}: it was cut short or \
                 edited; nothing was imported",
                records.len()
            ),
        ));
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
    check_schemas(&records)?;
    let total = records.len();
    let outcome = import_into(&api.replica, records).await?;
    Ok(axum::Json(json!({
        "entries": total,
        "applied": outcome.applied.len(),
        "stale": outcome.stale,
        "rejected": outcome.rejected.len(),
        "first_rejection": outcome.rejected.first().map(ToString::to_string),
    }))
    .into_response())
}

/// The schema lines of an import (entries of the reserved type, which an
/// export holds so that a restore brings its schemas back) must be what
/// `PUT /v1/schema/{type}` would have stored: keyed by a type's decimal
/// id, and a schema that compiles, or a deletion.
fn check_schemas(records: &[Record]) -> Result<(), ApiError> {
    use crate::replica::SCHEMA_TYPE;
    for record in records.iter().filter(|r| r.ty == SCHEMA_TYPE) {
        let bad = |why: String| {
            ApiError::bad_request(
                "invalid_export",
                format!(
                    "the schema entry {:?}: {why}; nothing was imported",
                    record.key().chars().take(32).collect::<String>()
                ),
            )
        };
        match record.key().parse::<i32>() {
            Ok(ty) if ty != SCHEMA_TYPE && record.key() == ty.to_string() => {}
            _ => return Err(bad("its key is not a type's decimal id".into())),
        }
        if let Some(text) = record.entry.value() {
            crate::replica::schema::compile(text, usize::MAX)
                .map_err(|e| bad(format!("not a valid schema: {e}")))?;
        }
    }
    Ok(())
}

async fn import_into(
    replica: &Replica,
    records: Vec<Record>,
) -> Result<crate::store::MergeOutcome, ApiError> {
    replica.import(records).await.map_err(ApiError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Who the test records are written by.
    fn by() -> Option<std::sync::Arc<Meta>> {
        Some(std::sync::Arc::new(Meta::new(
            "ops",
            "pod-a",
            Some("why"),
            false,
        )))
    }

    #[test]
    fn a_line_round_trips_and_bad_lines_say_which() {
        let record = Record {
            ty: -3,
            entry: Entry::with_meta(
                "k\n\"x\"",
                None,
                Version {
                    hlc: 12345 << 16,
                    node: 0xabc,
                },
                99,
                by(),
            ),
        };
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

    /// An export of `records` as the endpoint writes it.
    fn export_of(records: &[Record]) -> String {
        let mut text = format!(
            "{{\"format\":\"podcache-export\",\"version\":1,\"node\":\"n\",\"exported_at_ms\":1,\"entries\":{}}}\n",
            records.len()
        );
        for record in records {
            text.push_str(&serde_json::to_string(&Line::of(record)).expect("json"));
            text.push('\n');
        }
        text
    }

    fn entry(key: &str, value: Option<&str>, hlc: u64) -> Record {
        Record {
            ty: 1,
            entry: Entry::with_meta(key, value, Version { hlc, node: 7 }, 0, by()),
        }
    }

    #[test]
    fn a_line_without_an_author_imports_as_import() {
        let parsed =
            parse(br#"{"type":1,"key":"k","value":"v","hlc":65536,"node":"0000000000000007"}"#)
                .expect("valid");
        let meta = parsed[0].entry.meta().expect("described");
        assert_eq!(
            (&*meta.author, &*meta.origin, meta.reason.as_deref()),
            ("import", "", None)
        );
        let long = format!(
            r#"{{"type":1,"key":"k","value":"v","hlc":65536,"node":"07","reason":"{}"}}"#,
            "r".repeat(257)
        );
        assert!(parse(long.as_bytes()).is_err());
    }

    #[test]
    fn keys_named_format_or_type_round_trip() {
        let records = vec![
            entry("format", Some("podcache-export"), 1 << 16),
            entry("type", Some("1"), 2 << 16),
            entry("version", None, 3 << 16),
        ];
        let parsed = parse(export_of(&records).as_bytes()).expect("valid");
        assert_eq!(parsed, records);
        // Also as the very first line, with no header.
        let text = serde_json::to_string(&Line::of(&records[0])).expect("json");
        assert_eq!(
            parse(text.as_bytes()).expect("valid"),
            vec![entry("format", Some("podcache-export"), 1 << 16)]
        );
    }

    #[test]
    fn a_body_cut_at_a_line_end_or_grown_is_refused_whole() {
        let records: Vec<Record> = (0..5)
            .map(|i| entry(&format!("k{i}"), Some("v"), (i + 1) << 16))
            .collect();
        let full = export_of(&records);
        assert_eq!(parse(full.as_bytes()).expect("valid").len(), 5);
        // The last line dropped, at its line end.
        let mut lines: Vec<&str> = full.lines().collect();
        lines.pop();
        let cut = lines.join("\n") + "\n";
        let err = parse(cut.as_bytes()).expect_err("cut short");
        assert_eq!(err.code, "invalid_export");
        assert!(
            err.message
                .contains("holds 4 entries but its header says 5")
                && err.message.contains("cut short"),
            "{}",
            err.message
        );
        // One line too many (a stray line appended).
        let extra = serde_json::to_string(&Line::of(&entry("more", None, 9 << 16))).expect("json");
        let err = parse(format!("{full}{extra}\n").as_bytes()).expect_err("edited");
        assert!(
            err.message
                .contains("holds 6 entries but its header says 5"),
            "{}",
            err.message
        );
        // A header without `entries` checks no count.
        let headerless_count = format!(
            "{{\"format\":\"podcache-export\",\"version\":1}}\n{}",
            lines[1..].join("\n")
        );
        assert_eq!(parse(headerless_count.as_bytes()).expect("valid").len(), 4);
    }

    #[test]
    fn only_the_first_line_is_a_header() {
        let records = vec![entry("a", Some("1"), 1 << 16)];
        let one = export_of(&records);
        // Blank lines before the header do not make it a later line.
        assert_eq!(
            parse(format!("\n\n{one}").as_bytes()).expect("valid"),
            records
        );
        // Two exports joined: the second header is refused, by line number.
        let err = parse(format!("{one}{one}").as_bytes()).expect_err("joined");
        assert!(
            err.message.starts_with("line 3:") && err.message.contains("second header"),
            "{}",
            err.message
        );
        // A header after an entry is not taken as one either.
        let line = serde_json::to_string(&Line::of(&records[0])).expect("json");
        let err = parse(format!("{line}\n{}", one.lines().next().expect("header")).as_bytes())
            .expect_err("late header");
        assert!(err.message.starts_with("line 2:"), "{}", err.message);
        // A header of another format is refused on the first line.
        let err =
            parse(b"{\"format\":\"other\",\"version\":1,\"entries\":0}\n").expect_err("other");
        assert!(err.message.starts_with("line 1:"), "{}", err.message);
    }
}
