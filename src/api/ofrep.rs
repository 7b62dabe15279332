//! OpenFeature's Remote Evaluation Protocol (OFREP, the `service/openapi.yaml`
//! of open-feature/protocol) on the REST port: `POST
//! /ofrep/v1/evaluate/flags/{key}` evaluates one flag, `POST
//! /ofrep/v1/evaluate/flags` every flag (with an `ETag`, and 304 for a
//! matching `If-None-Match`). The flags are the live entries of the one
//! type named by `--ofrep-type`; without it these paths are not routed and
//! answer 404 like any unknown path.
//!
//! A flag's value is the entry's value read as JSON when that is a
//! boolean, number, string or object, else the text itself as a string;
//! reason `STATIC`, variant the entry's version. A value in flagd's
//! flag-definition shape (`state`, `variants`, `defaultVariant`) is
//! evaluated: its default variant with reason `DEFAULT`, or, when
//! `DISABLED`, no value (the caller's code default) with reason `DISABLED`,
//! as flagd answers. Targeting rules are not evaluated: a flag with them is
//! answered with its default variant and `"targetingIgnored": true` in its
//! metadata. Nothing here depends on the request's context, so the bulk
//! `ETag` is the same on every replica that holds the same versions.
//!
//! Owns: the OFREP request parsing, the evaluation rules (plain functions,
//! unit-tested below without sockets), the OFREP answer and error shapes
//! and the bulk `ETag`. Must not touch: the store (it only reads it), the
//! request gate (tokens are checked before any handler here runs; an OFREP
//! evaluation needs what a read needs, see `auth::Auth::required`), or the
//! other endpoints' answers.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Map, Value, json};

use super::Api;
use crate::identity::unix_ms;
use crate::store::Entry;

/// The bulk endpoint.
pub(crate) const BULK_PATH: &str = "/ofrep/v1/evaluate/flags";

/// Largest request body (the evaluation context) accepted, in bytes, or
/// `--max-body-bytes` when that is smaller: a context is a handful of
/// attributes, and every evaluation parses it.
pub(crate) const MAX_CONTEXT_BYTES: usize = 64 * 1024;

/// The OFREP routes, added to `router` only when `--ofrep-type` is set.
pub(super) fn mount(router: Router<Arc<Api>>, api: &Api) -> Router<Arc<Api>> {
    if api.replica.config.ofrep_type.is_none() {
        return router;
    }
    router
        .route(BULK_PATH, post(evaluate_all))
        .route("/ofrep/v1/evaluate/flags/", post(empty_key))
        .route("/ofrep/v1/evaluate/flags/{*key}", post(evaluate_one))
}

/// An OpenFeature error code, as OFREP answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorCode {
    /// No live entry with that key.
    FlagNotFound,
    /// The request body is not JSON, or a flag definition is malformed.
    ParseError,
    /// The body is not an object, or its `context` (or `targetingKey`) has
    /// the wrong type.
    InvalidContext,
    /// Anything else wrong with the request (its key, its size).
    General,
}

impl ErrorCode {
    fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FlagNotFound => "FLAG_NOT_FOUND",
            ErrorCode::ParseError => "PARSE_ERROR",
            ErrorCode::InvalidContext => "INVALID_CONTEXT",
            ErrorCode::General => "GENERAL",
        }
    }

    /// The podcache `error` code the same body carries (CONTRACT §2: every
    /// error has `error` and `message`).
    fn podcache_code(self) -> &'static str {
        match self {
            ErrorCode::FlagNotFound => "flag_not_found",
            ErrorCode::ParseError => "parse_error",
            ErrorCode::InvalidContext => "invalid_context",
            ErrorCode::General => "general",
        }
    }
}

/// What one flag evaluates to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Evaluation {
    /// A value.
    Value {
        value: Value,
        variant: String,
        reason: &'static str,
        metadata: Map<String, Value>,
    },
    /// No value: the caller uses its code default (a disabled flag, or a
    /// flag definition without a default variant).
    CodeDefault {
        reason: &'static str,
        metadata: Map<String, Value>,
    },
    /// The flag cannot be evaluated.
    Failed { code: ErrorCode, details: String },
}

/// True for the JSON values OFREP serves as a flag's value.
fn is_flag_value(value: &Value) -> bool {
    matches!(
        value,
        Value::Bool(_) | Value::Number(_) | Value::String(_) | Value::Object(_)
    )
}

/// Evaluates the entry `raw` (its value) at `version` as a flag.
pub(crate) fn evaluate(raw: &str, version: &str) -> Evaluation {
    let parsed = serde_json::from_str::<Value>(raw)
        .ok()
        .filter(is_flag_value);
    match parsed {
        Some(Value::Object(definition))
            if definition.contains_key("state") && definition.contains_key("variants") =>
        {
            evaluate_definition(&definition)
        }
        Some(value) => Evaluation::Value {
            value,
            variant: version.to_owned(),
            reason: "STATIC",
            metadata: Map::new(),
        },
        None => Evaluation::Value {
            value: Value::String(raw.to_owned()),
            variant: version.to_owned(),
            reason: "STATIC",
            metadata: Map::new(),
        },
    }
}

/// A flag in flagd's definition shape: its default variant, or nothing
/// when disabled. Targeting rules are not evaluated (and the metadata says
/// so).
fn evaluate_definition(definition: &Map<String, Value>) -> Evaluation {
    let parse_error = |details: &str| Evaluation::Failed {
        code: ErrorCode::ParseError,
        details: format!("the flag definition is malformed: {details}"),
    };
    let mut metadata = Map::new();
    match definition.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(given)) => {
            // OFREP metadata holds booleans, strings and numbers only.
            for (name, value) in given {
                if matches!(value, Value::Bool(_) | Value::String(_) | Value::Number(_)) {
                    metadata.insert(name.clone(), value.clone());
                }
            }
        }
        Some(_) => return parse_error("metadata must be an object"),
    }
    let Some(Value::Object(variants)) = definition.get("variants") else {
        return parse_error("variants must be an object");
    };
    let enabled = match definition.get("state").and_then(Value::as_str) {
        Some("ENABLED") => true,
        Some("DISABLED") => false,
        _ => return parse_error("state must be \"ENABLED\" or \"DISABLED\""),
    };
    let default_variant = match definition.get("defaultVariant") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(name),
        Some(_) => return parse_error("defaultVariant must be a string"),
    };
    if let Some(name) = default_variant
        && !variants.contains_key(name)
    {
        return parse_error(&format!(
            "defaultVariant {:?} is not one of its variants",
            name.chars().take(64).collect::<String>()
        ));
    }
    if !enabled {
        return Evaluation::CodeDefault {
            reason: "DISABLED",
            metadata,
        };
    }
    let targeting = definition.get("targeting");
    let has_targeting = match targeting {
        None | Some(Value::Null) => false,
        Some(Value::Object(rules)) => !rules.is_empty(),
        Some(Value::String(rules)) => !rules.is_empty(),
        Some(_) => true,
    };
    if has_targeting {
        metadata.insert("targetingIgnored".into(), Value::Bool(true));
    }
    let Some(name) = default_variant else {
        return Evaluation::CodeDefault {
            reason: "DEFAULT",
            metadata,
        };
    };
    let value = &variants[name];
    if !is_flag_value(value) {
        return parse_error(&format!(
            "variant {:?} must be a boolean, number, string or object",
            name.chars().take(64).collect::<String>()
        ));
    }
    Evaluation::Value {
        value: value.clone(),
        variant: name.clone(),
        reason: "DEFAULT",
        metadata,
    }
}

/// A refused request: its OFREP error code, what is wrong, and the status.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) code: ErrorCode,
    pub(crate) details: String,
}

impl Refusal {
    fn bad(code: ErrorCode, details: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code,
            details: details.into(),
        }
    }
}

/// Checks an OFREP request body: empty, or a JSON object whose `context`
/// (absent or `null` for none) is an object, whose `targetingKey` (if any)
/// is a string. Returns the context (unused until targeting is
/// evaluated).
pub(crate) fn parse_request(body: &[u8]) -> Result<Map<String, Value>, Refusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let parsed: Value = serde_json::from_slice(body).map_err(|e| {
        Refusal::bad(
            ErrorCode::ParseError,
            format!("the request body is not JSON: {e}"),
        )
    })?;
    let Value::Object(mut request) = parsed else {
        return Err(Refusal::bad(
            ErrorCode::InvalidContext,
            "the request body must be a JSON object, {\"context\": {...}}",
        ));
    };
    match request.remove("context") {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(context)) => match context.get("targetingKey") {
            None | Some(Value::String(_)) => Ok(context),
            Some(_) => Err(Refusal::bad(
                ErrorCode::InvalidContext,
                "context.targetingKey must be a string",
            )),
        },
        Some(_) => Err(Refusal::bad(
            ErrorCode::InvalidContext,
            "context must be a JSON object",
        )),
    }
}

/// The bulk `ETag` of a flag set, given as (key, version) in key order:
/// a digest of the type and every key and version, so any write, delete
/// or expiry changes it, and replicas holding the same versions agree.
pub(crate) fn etag<'a>(ty: i32, flags: impl IntoIterator<Item = (&'a str, String)>) -> String {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    digest.update(b"podcache-ofrep-1\0");
    digest.update(&ty.to_be_bytes());
    for (key, version) in flags {
        digest.update(&(key.len() as u64).to_be_bytes());
        digest.update(key.as_bytes());
        digest.update(&(version.len() as u64).to_be_bytes());
        digest.update(version.as_bytes());
    }
    let hex: String = digest.finish().as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("\"{hex}\"")
}

/// True when an `If-None-Match` header value names `etag` (a list, weak
/// tags compared weakly, or `*`).
pub(crate) fn none_match(header: &str, etag: &str) -> bool {
    header
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// One flag's OFREP body (success or failure), as both endpoints answer
/// it.
pub(crate) fn flag_json(key: &str, evaluation: &Evaluation) -> Value {
    match evaluation {
        Evaluation::Value {
            value,
            variant,
            reason,
            metadata,
        } => json!({
            "key": key,
            "value": value,
            "reason": reason,
            "variant": variant,
            "metadata": metadata,
        }),
        Evaluation::CodeDefault { reason, metadata } => json!({
            "key": key,
            "reason": reason,
            "metadata": metadata,
        }),
        Evaluation::Failed { code, details } => json!({
            "key": key,
            "errorCode": code.as_str(),
            "errorDetails": details,
        }),
    }
}

/// An error answer: OFREP's `errorCode` and `errorDetails` (and `key` for
/// one flag), with podcache's `error` and `message` beside them.
fn refusal_response(key: Option<&str>, refusal: Refusal) -> Response {
    let mut body = json!({
        "errorCode": refusal.code.as_str(),
        "errorDetails": refusal.details,
        "error": refusal.code.podcache_code(),
        "message": refusal.details,
    });
    if let Some(key) = key {
        body["key"] = json!(key);
    }
    json_response(refusal.status, &body)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Reads the request body, at most [`MAX_CONTEXT_BYTES`] (or
/// `--max-body-bytes`); 413 past it.
async fn read_context(api: &Api, headers: &HeaderMap, body: Body) -> Result<(), Refusal> {
    let limit = MAX_CONTEXT_BYTES.min(api.replica.config.max_body_bytes);
    let too_large = || Refusal {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code: ErrorCode::General,
        details: format!("the request body is larger than the limit of {limit} bytes"),
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|err| {
        if std::error::Error::source(&err)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            too_large()
        } else {
            Refusal::bad(
                ErrorCode::General,
                format!("could not read the request body: {err}"),
            )
        }
    })?;
    parse_request(&bytes).map(drop)
}

/// The type the flags are read from (routes exist only when it is set).
fn flag_type(api: &Api) -> Result<i32, Refusal> {
    api.replica.config.ofrep_type.ok_or_else(|| Refusal {
        status: StatusCode::NOT_FOUND,
        code: ErrorCode::General,
        details: "OFREP is off on this node (--ofrep-type)".into(),
    })
}

/// Checks a flag key from the path.
fn check_key(api: &Api, path: Result<Path<String>, PathRejection>) -> Result<String, Refusal> {
    let Path(key) = path.map_err(|e| {
        Refusal::bad(
            ErrorCode::General,
            format!("the flag key is not valid: {}", e.body_text()),
        )
    })?;
    let limit = api.replica.config.limits.max_key_bytes;
    if key.len() > limit {
        return Err(Refusal::bad(
            ErrorCode::General,
            format!("the flag key is {} bytes, the limit is {limit}", key.len()),
        ));
    }
    Ok(key)
}

/// `POST /ofrep/v1/evaluate/flags/`: no key.
async fn empty_key() -> Response {
    refusal_response(
        Some(""),
        Refusal::bad(ErrorCode::General, "the flag key must not be empty"),
    )
}

/// `POST /ofrep/v1/evaluate/flags/{key}`.
async fn evaluate_one(
    State(api): State<Arc<Api>>,
    path: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    let key = match check_key(&api, path) {
        Ok(key) => key,
        Err(refusal) => return refusal_response(None, refusal),
    };
    let (parts, body) = request.into_parts();
    let ty = match checked_type(&api, &parts.headers, body).await {
        Ok(ty) => ty,
        Err(refusal) => return refusal_response(Some(&key), refusal),
    };
    super::count(&api, "get");
    let Some(entry) = api.replica.store.get(ty, &key, unix_ms()) else {
        let details = format!(
            "flag {:?} was not found",
            key.chars().take(64).collect::<String>()
        );
        return refusal_response(
            Some(&key),
            Refusal {
                status: StatusCode::NOT_FOUND,
                code: ErrorCode::FlagNotFound,
                details,
            },
        );
    };
    match evaluate_entry(&entry) {
        Evaluation::Failed { code, details } => {
            refusal_response(Some(&key), Refusal::bad(code, details))
        }
        evaluation => json_response(StatusCode::OK, &flag_json(&key, &evaluation)),
    }
}

/// The flags' type, once the request's body (its context) is read and
/// checked: what both evaluations check before they read the store.
async fn checked_type(api: &Api, headers: &HeaderMap, body: Body) -> Result<i32, Refusal> {
    let ty = flag_type(api)?;
    read_context(api, headers, body).await?;
    Ok(ty)
}

fn evaluate_entry(entry: &Entry) -> Evaluation {
    match entry.value() {
        Some(value) => evaluate(value, &entry.version().to_string()),
        // `Store::get` and `namespace` answer live entries only.
        None => Evaluation::Failed {
            code: ErrorCode::FlagNotFound,
            details: "the flag was deleted".into(),
        },
    }
}

/// `POST /ofrep/v1/evaluate/flags`: every flag, with an `ETag`; 304 when
/// `If-None-Match` names it.
async fn evaluate_all(State(api): State<Arc<Api>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let ty = match checked_type(&api, &parts.headers, body).await {
        Ok(ty) => ty,
        Err(refusal) => return refusal_response(None, refusal),
    };
    super::count(&api, "list");
    let entries = api.replica.store.namespace(ty, unix_ms());
    let tag = etag(
        ty,
        entries.iter().map(|e| (e.key(), e.version().to_string())),
    );
    let Ok(tag_value) = HeaderValue::from_str(&tag) else {
        // Hex digits in quotes: always a valid header value.
        return refusal_response(None, Refusal::bad(ErrorCode::General, "bad ETag"));
    };
    let matched = parts
        .headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| none_match(v, &tag));
    if matched {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, tag_value)]).into_response();
    }
    let flags: Vec<Value> = entries
        .iter()
        .map(|e| flag_json(e.key(), &evaluate_entry(e)))
        .collect();
    let mut answer = json_response(StatusCode::OK, &json!({ "flags": flags }));
    answer.headers_mut().insert(header::ETAG, tag_value);
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: &str = "1767268800000.0@9f86d081884c7d65";

    fn value_of(evaluation: &Evaluation) -> (&Value, &str, &str) {
        match evaluation {
            Evaluation::Value {
                value,
                variant,
                reason,
                ..
            } => (value, variant.as_str(), *reason),
            other => panic!("expected a value, got {other:?}"),
        }
    }

    #[test]
    fn plain_values_are_json_when_they_can_be_and_text_otherwise() {
        for (raw, expected) in [
            ("true", json!(true)),
            ("false", json!(false)),
            ("42", json!(42)),
            ("-2.5", json!(-2.5)),
            ("\"quoted\"", json!("quoted")),
            (r#"{"a":[1,2]}"#, json!({"a": [1, 2]})),
            ("on", json!("on")),
            ("", json!("")),
            ("[1,2]", json!("[1,2]")),
            ("null", json!("null")),
            ("{broken", json!("{broken")),
            (" 7 ", json!(7)),
        ] {
            let evaluation = evaluate(raw, V);
            assert_eq!(value_of(&evaluation), (&expected, V, "STATIC"), "{raw:?}");
        }
    }

    #[test]
    fn a_flagd_definition_answers_its_default_variant() {
        let raw = r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off",
                      "metadata":{"team":"web","n":3,"nested":{"x":1}}}"#;
        let evaluation = evaluate(raw, V);
        assert_eq!(value_of(&evaluation), (&json!(false), "off", "DEFAULT"));
        let Evaluation::Value { metadata, .. } = evaluation else {
            unreachable!()
        };
        assert_eq!(Value::Object(metadata), json!({"team": "web", "n": 3}));
        let object =
            r#"{"state":"ENABLED","variants":{"a":{"x":1}},"defaultVariant":"a","targeting":{}}"#;
        assert_eq!(
            evaluate(object, V),
            Evaluation::Value {
                value: json!({"x": 1}),
                variant: "a".into(),
                reason: "DEFAULT",
                metadata: Map::new(),
            },
            "empty targeting is no targeting"
        );
    }

    #[test]
    fn targeting_is_not_evaluated_and_the_answer_says_so() {
        let raw = r#"{"state":"ENABLED","variants":{"a":"x","b":"y"},"defaultVariant":"a",
                      "targeting":{"if":[{"==":[{"var":"email"},"x@y"]},"b",null]}}"#;
        let evaluation = evaluate(raw, V);
        assert_eq!(value_of(&evaluation), (&json!("x"), "a", "DEFAULT"));
        let Evaluation::Value { metadata, .. } = evaluation else {
            unreachable!()
        };
        assert_eq!(metadata.get("targetingIgnored"), Some(&json!(true)));
    }

    #[test]
    fn a_disabled_flag_or_one_without_a_default_has_no_value() {
        let raw = r#"{"state":"DISABLED","variants":{"on":true},"defaultVariant":"on"}"#;
        assert_eq!(
            evaluate(raw, V),
            Evaluation::CodeDefault {
                reason: "DISABLED",
                metadata: Map::new()
            }
        );
        let body = flag_json("f", &evaluate(raw, V));
        assert_eq!(
            body,
            json!({"key": "f", "reason": "DISABLED", "metadata": {}})
        );
        let no_default = r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":null}"#;
        assert_eq!(
            evaluate(no_default, V),
            Evaluation::CodeDefault {
                reason: "DEFAULT",
                metadata: Map::new()
            }
        );
    }

    #[test]
    fn malformed_definitions_are_parse_errors() {
        for raw in [
            r#"{"state":"ON","variants":{"a":1},"defaultVariant":"a"}"#,
            r#"{"state":"ENABLED","variants":[1],"defaultVariant":"a"}"#,
            r#"{"state":"ENABLED","variants":{"a":1},"defaultVariant":"b"}"#,
            r#"{"state":"ENABLED","variants":{"a":1},"defaultVariant":1}"#,
            r#"{"state":"ENABLED","variants":{"a":null},"defaultVariant":"a"}"#,
            r#"{"state":"ENABLED","variants":{"a":[1]},"defaultVariant":"a"}"#,
            r#"{"state":"ENABLED","variants":{"a":1},"defaultVariant":"a","metadata":3}"#,
            r#"{"state":"DISABLED","variants":{"a":1},"defaultVariant":"b"}"#,
        ] {
            match evaluate(raw, V) {
                Evaluation::Failed {
                    code: ErrorCode::ParseError,
                    details,
                } => assert!(details.contains("malformed"), "{details}"),
                other => panic!("{raw}: {other:?}"),
            }
        }
        // An object without both `state` and `variants` is a plain value.
        let plain = r#"{"state":"ENABLED","colour":"blue"}"#;
        assert_eq!(value_of(&evaluate(plain, V)).2, "STATIC");
    }

    #[test]
    fn request_bodies_are_checked() {
        assert_eq!(parse_request(b""), Ok(Map::new()));
        assert_eq!(parse_request(b" \n"), Ok(Map::new()));
        assert_eq!(parse_request(b"{}"), Ok(Map::new()));
        assert_eq!(parse_request(br#"{"context":null}"#), Ok(Map::new()));
        let context =
            parse_request(br#"{"context":{"targetingKey":"u1","plan":"pro"}}"#).expect("valid");
        assert_eq!(context.get("plan"), Some(&json!("pro")));
        for (body, code) in [
            (&b"{"[..], ErrorCode::ParseError),
            (b"\xff", ErrorCode::ParseError),
            (b"[]", ErrorCode::InvalidContext),
            (b"\"context\"", ErrorCode::InvalidContext),
            (br#"{"context":[]}"#, ErrorCode::InvalidContext),
            (br#"{"context":"u1"}"#, ErrorCode::InvalidContext),
            (
                br#"{"context":{"targetingKey":7}}"#,
                ErrorCode::InvalidContext,
            ),
        ] {
            let refusal = parse_request(body).expect_err("refused");
            assert_eq!(
                (refusal.status, refusal.code),
                (StatusCode::BAD_REQUEST, code),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse_request(deep.as_bytes()).is_err(), "no stack overflow");
    }

    #[test]
    fn the_etag_follows_every_key_and_version() {
        let tag = |flags: &[(&'static str, &str)]| {
            etag(2, flags.iter().map(|(k, v)| (*k, (*v).to_owned())))
        };
        let base = tag(&[("a", "1"), ("b", "2")]);
        assert!(base.starts_with('"') && base.ends_with('"') && base.len() == 34);
        assert_eq!(base, tag(&[("a", "1"), ("b", "2")]), "stable");
        assert_ne!(base, tag(&[("a", "1"), ("b", "3")]), "a new version");
        assert_ne!(base, tag(&[("a", "1")]), "a flag gone");
        assert_ne!(base, tag(&[("a", "12")]), "no ambiguity in the framing");
        assert_ne!(base, etag(3, [("a", "1".into()), ("b", "2".into())]));
        assert!(none_match(&base, &base));
        assert!(none_match(&format!("\"x\", W/{base}"), &base));
        assert!(none_match("*", &base));
        assert!(!none_match("\"x\"", &base));
        assert!(!none_match("", &base));
    }

    /// A JSON value of any shape, flagd-like objects included.
    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-zA-Z ]{0,6}".prop_map(Value::String),
            prop::sample::select(vec!["ENABLED", "DISABLED", "state", "variants", "a", "b"])
                .prop_map(|s| json!(s)),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            let names = prop::sample::select(vec![
                "state",
                "variants",
                "defaultVariant",
                "targeting",
                "metadata",
                "context",
                "targetingKey",
                "a",
                "b",
            ]);
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(names, inner, 0..6).prop_map(|m| Value::Object(
                    m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                )),
            ]
        })
    }

    proptest::proptest! {
        /// No input makes a panic; every answer is one of OFREP's shapes.
        #[test]
        fn any_value_or_body_gets_an_answer(value in any_json(), bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let text = value.to_string();
            let body = flag_json("k", &evaluate(&text, V));
            proptest::prop_assert!(body.get("reason").is_some() || body["errorCode"] == "PARSE_ERROR", "{}", body);
            if let Some(v) = body.get("value") {
                proptest::prop_assert!(is_flag_value(v), "{}", body);
            }
            let _ = parse_request(text.as_bytes());
            let _ = parse_request(&bytes);
            let _ = evaluate(&String::from_utf8_lossy(&bytes), V);
        }
    }
}
