//! The JSON of the hot answers — single-entry reads and writes, batch
//! writes — written straight into the response body.
//!
//! Through serde_json and `Json`, a GET's answer cost ~4,700 instructions
//! (callgrind, a 100-byte value): a fifth of the node's user-space work per
//! request, mostly escaping strings a byte at a time and formatting the
//! version through `fmt`. These answers are a few fixed fields, so they are
//! written here: a string that needs no escape is copied as it is, and the
//! version comes from [`crate::store::Version::text`]. The output is the
//! JSON serde_json would write (tests below check it against serde_json).
//!
//! Owns: the byte layout of these answers. Must not touch anything else:
//! every other body is built with serde.

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;

use crate::replica::DeliveryReport;
use crate::store::{Record, Version};

/// A JSON document being written.
pub(super) struct JsonWriter(Vec<u8>);

impl JsonWriter {
    pub(super) fn with_capacity(bytes: usize) -> Self {
        Self(Vec::with_capacity(bytes))
    }

    /// JSON text written as it is (punctuation, member names).
    pub(super) fn raw(&mut self, text: &str) -> &mut Self {
        self.0.extend_from_slice(text.as_bytes());
        self
    }

    /// `text` as a JSON string, escaped as serde_json escapes.
    pub(super) fn string(&mut self, text: &str) -> &mut Self {
        let out = &mut self.0;
        out.push(b'"');
        let bytes = text.as_bytes();
        if !bytes.chunks(32).any(|chunk| {
            // Without an early exit inside a chunk, this loop vectorizes.
            chunk.iter().fold(false, |found, &b| {
                found | (b < 0x20) | (b == b'"') | (b == b'\\')
            })
        }) {
            out.extend_from_slice(bytes);
            out.push(b'"');
            return self;
        }
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let escape: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x08 => b"\\b",
                0x0c => b"\\f",
                0x00..=0x1f => b"",
                _ => continue,
            };
            out.extend_from_slice(&bytes[start..i]);
            if escape.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            } else {
                out.extend_from_slice(escape);
            }
            start = i + 1;
        }
        out.extend_from_slice(&bytes[start..]);
        out.push(b'"');
        self
    }

    pub(super) fn int(&mut self, n: impl itoa::Integer) -> &mut Self {
        self.0
            .extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        self
    }

    /// A version as a JSON string (its text never needs escaping).
    pub(super) fn version(&mut self, version: Version) -> &mut Self {
        self.0.push(b'"');
        self.0.extend_from_slice(version.text().as_str().as_bytes());
        self.0.push(b'"');
        self
    }

    /// Any other value, through serde_json (rare members: `replication`).
    pub(super) fn value(&mut self, value: &serde_json::Value) -> &mut Self {
        // A `Value` always serializes, and a Vec never fails to take bytes.
        if serde_json::to_writer(&mut self.0, value).is_err() {
            self.0.extend_from_slice(b"null");
        }
        self
    }

    /// The document as a `200 OK` JSON response.
    pub(super) fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.0));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// `{"type", "key", "value", "version"[, "expires_at_ms"][, "replication"]}`:
/// the answer to a single-entry read or write.
pub(super) fn entry(record: &Record, replication: Option<&[DeliveryReport]>) -> Response {
    let (key, value) = record.entry.key_value();
    let mut out = JsonWriter::with_capacity(96 + key.len() + value.map_or(0, str::len));
    out.raw("{\"type\":")
        .int(record.ty)
        .raw(",\"key\":")
        .string(key)
        .raw(",\"value\":");
    match value {
        Some(value) => out.string(value),
        None => out.raw("null"),
    };
    out.raw(",\"version\":").version(record.entry.version());
    let expires = record.entry.expires_at_ms();
    if expires != 0 {
        out.raw(",\"expires_at_ms\":").int(expires);
    }
    meta_members(&mut out, &record.entry, "origin");
    replication_member(&mut out, replication);
    out.raw("}");
    let mut response = out.into_response();
    response
        .headers_mut()
        .insert(header::ETAG, etag(record.entry.version()));
    response
}

/// A version as an `ETag`: its text, quoted.
pub(super) fn etag(version: Version) -> HeaderValue {
    let text = version.text();
    let mut quoted = Vec::with_capacity(text.as_str().len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(text.as_str().as_bytes());
    quoted.push(b'"');
    // The text is digits, '.', '@' and hex digits: always a valid value.
    HeaderValue::from_bytes(&quoted).unwrap_or(HeaderValue::from_static("\"\""))
}

/// `,"author","<origin name>","reason","written_at"` of an entry (null
/// where not known). Watch events name the origin pod `origin_pod`, their
/// `origin` being how the change reached the node.
pub(super) fn meta_members(out: &mut JsonWriter, entry: &crate::store::Entry, origin: &str) {
    let meta = entry.meta();
    let text = |out: &mut JsonWriter, name: &str, value: Option<&str>| {
        out.raw(",\"").raw(name).raw("\":");
        match value {
            Some(value) => out.string(value),
            None => out.raw("null"),
        };
    };
    text(
        out,
        "author",
        meta.map(|m| &*m.author).filter(|a| !a.is_empty()),
    );
    text(
        out,
        origin,
        meta.map(|m| &*m.origin).filter(|o| !o.is_empty()),
    );
    text(out, "reason", meta.and_then(|m| m.reason.as_deref()));
    out.raw(",\"written_at\":")
        .string(&written_at(entry.written_at_ms()));
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds.
/// Past year 9999 (only a clock far off, or a hostile file, writes such
/// a version) it is the milliseconds as they are: RFC 3339 has no year
/// 10000.
pub(super) fn written_at(ms: u64) -> String {
    use std::fmt::Write as _;
    const YEAR_10000_MS: u64 = 253_402_300_800_000;
    let mut out = String::with_capacity(24);
    if ms >= YEAR_10000_MS
        || write!(
            out,
            "{}",
            humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
            )
        )
        .is_err()
    {
        out.clear();
        let _ = write!(out, "{ms}");
    }
    out
}

/// The same members as a JSON object's fields, for answers built with
/// serde_json.
pub(super) fn meta_json(body: &mut serde_json::Value, entry: &crate::store::Entry, origin: &str) {
    let meta = entry.meta();
    body["author"] = serde_json::json!(meta.map(|m| &*m.author).filter(|a| !a.is_empty()));
    body[origin] = serde_json::json!(meta.map(|m| &*m.origin).filter(|o| !o.is_empty()));
    body["reason"] = serde_json::json!(meta.and_then(|m| m.reason.as_deref()));
    body["written_at"] = serde_json::json!(written_at(entry.written_at_ms()));
}

/// `{"type", "count", "versions": {key: version, ...}[, "replication"]}`:
/// the answer to a batch write, `versions` in the order of `records`.
pub(super) fn batch(
    ty: i32,
    records: &[crate::store::Record],
    replication: Option<&[DeliveryReport]>,
) -> Response {
    let keys: usize = records.iter().map(|r| r.key().len() + 64).sum();
    let mut out = JsonWriter::with_capacity(64 + keys);
    out.raw("{\"type\":")
        .int(ty)
        .raw(",\"count\":")
        .int(records.len())
        .raw(",\"versions\":{");
    for (i, record) in records.iter().enumerate() {
        if i > 0 {
            out.raw(",");
        }
        out.string(record.key())
            .raw(":")
            .version(record.entry.version());
    }
    out.raw("}");
    replication_member(&mut out, replication);
    out.raw("}");
    out.into_response()
}

fn replication_member(out: &mut JsonWriter, replication: Option<&[DeliveryReport]>) {
    if let Some(reports) = replication {
        out.raw(",\"replication\":")
            .value(&super::replication_json(reports));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(f: impl FnOnce(&mut JsonWriter)) -> String {
        let mut out = JsonWriter::with_capacity(0);
        f(&mut out);
        String::from_utf8(out.0).expect("UTF-8")
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut samples: Vec<String> = vec![
            String::new(),
            "plain".into(),
            "quote \" backslash \\ slash /".into(),
            "new\nline\rtab\tbell\u{7}nul\u{0}\u{8}\u{c}\u{1f}".into(),
            "unicode é ✓ 😀 \u{7f} \u{2028}".into(),
        ];
        // Every byte below 0x80 on its own, and next to others.
        samples.extend((0u8..0x80).map(|b| format!("a{}b", b as char)));
        for sample in samples {
            let ours = written(|w| {
                w.string(&sample);
            });
            let theirs = serde_json::to_string(&sample).expect("serializes");
            assert_eq!(ours, theirs, "for {sample:?}");
        }
    }

    #[test]
    fn entry_answer_is_the_json_serde_would_write() {
        let record = Record::new(
            7,
            "k\"ey",
            Some("va\\lue\n"),
            Version {
                hlc: 5 << 16 | 3,
                node: 0xab,
            },
            0,
        );
        let response = entry(&record, None);
        let body = body_text(response);
        let parsed: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        assert_eq!(
            parsed,
            serde_json::json!({
                "type": 7,
                "key": "k\"ey",
                "value": "va\\lue\n",
                "version": record.entry.version().to_string(),
                "author": null,
                "origin": null,
                "reason": null,
                "written_at": "1970-01-01T00:00:00.005Z",
            })
        );
        let tombstone = Record::new(-1, "gone", None, Version { hlc: 1, node: 1 }, 99);
        let parsed: serde_json::Value =
            serde_json::from_str(&body_text(entry(&tombstone, None))).expect("valid JSON");
        assert_eq!(parsed["value"], serde_json::Value::Null);
        assert_eq!(parsed["type"], -1);
        assert_eq!(parsed["expires_at_ms"], 99);
    }

    #[test]
    fn batch_answer_lists_versions_in_record_order() {
        let records = [
            Record::new(1, "a", Some("x"), Version { hlc: 10, node: 2 }, 0),
            Record::new(1, "b\t", Some("y"), Version { hlc: 11, node: 2 }, 0),
        ];
        let body = body_text(batch(1, &records, None));
        let parsed: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        assert_eq!(parsed["count"], 2);
        assert_eq!(
            parsed["versions"]["a"],
            records[0].entry.version().to_string()
        );
        assert_eq!(
            parsed["versions"]["b\t"],
            records[1].entry.version().to_string()
        );
        assert!(body.find("\"a\"") < body.find("\"b\\t\""));
        let empty: serde_json::Value =
            serde_json::from_str(&body_text(batch(3, &[], None))).expect("valid JSON");
        assert_eq!(
            empty,
            serde_json::json!({"type": 3, "count": 0, "versions": {}})
        );
    }

    fn body_text(response: Response) -> String {
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let bytes = futures_util::FutureExt::now_or_never(axum::body::to_bytes(
            response.into_body(),
            usize::MAX,
        ))
        .expect("a full body is ready")
        .expect("readable");
        String::from_utf8(bytes.to_vec()).expect("UTF-8")
    }
}
