//! JSON Schemas per type (draft 2020-12): a write whose value is not JSON
//! valid under its type's schema is refused before anything is stored.
//!
//! A schema is an ordinary entry of the reserved type [`SCHEMA_TYPE`]
//! (key: the type's decimal id, value: the schema's text), written through
//! the one local write path like every write, so replication,
//! anti-entropy, bootstrap, the data directory and history carry it as
//! they carry any entry. Only the replica that takes a write checks it;
//! peers merge what they receive without looking at schemas, and entries
//! stored before a schema was set are never checked again.
//!
//! Owns: the reserved type, what a valid schema is ([`compile`]: size,
//! draft 2020-12, no remote references, linear-time patterns), the cache
//! of compiled schemas (keyed by the schema entry's version, so a replica
//! compiles each version at most once) and the check of a local change's
//! values (`Schemas::check`). Must not touch: the store's merge rule,
//! how the schema entries travel (they are entries like any other), HTTP
//! or gRPC shapes (the adapters turn [`WriteError`]s into answers).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;

use super::WriteError;
use crate::store::{Change, Store, Version};

pub use crate::store::SCHEMA_TYPE;

/// The one `$schema` a schema may name (or none).
const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";

/// Longest part of a value quoted in a violation's message.
const QUOTE_CHARS: usize = 120;

/// Why a schema is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// Larger than `--max-schema-bytes`.
    #[error("the schema is {len} bytes, the limit is {limit} (--max-schema-bytes)")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Not JSON, not a draft 2020-12 schema, or one that does not compile
    /// (a remote reference, a pattern the regex engine refuses).
    #[error("{0}")]
    Invalid(String),
}

/// Why a schema could not be set or deleted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SchemaWriteError {
    /// The schema is refused.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The write of its entry was refused (disk, capacity).
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// A value that its type's schema refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the value of key {key:?} in type {ty} violates the type's schema at {location:?} \
     ({keyword}): {detail}"
)]
pub struct Violation {
    /// The type.
    pub ty: i32,
    /// The key whose value failed (the first in key order of a batch).
    pub key: String,
    /// Where in the value, as a JSON pointer (`""`: the whole value).
    pub location: String,
    /// The schema keyword that failed (`json` when the value is not JSON).
    pub keyword: String,
    /// Where in the schema, as a JSON pointer (`""` when not JSON).
    pub schema_path: String,
    /// The validator's sentence (values quoted in it are cut short).
    pub detail: String,
}

/// Parses and compiles a schema's text: at most `limit` bytes of JSON, an
/// object or a boolean, `$schema` draft 2020-12 or absent, valid under the
/// draft's meta-schema, with no reference outside the document (nothing
/// is ever fetched) and patterns the linear-time `regex` engine takes.
pub fn compile(text: &str, limit: usize) -> Result<jsonschema::Validator, SchemaError> {
    if text.len() > limit {
        return Err(SchemaError::TooLarge {
            len: text.len(),
            limit,
        });
    }
    let invalid = |why: String| SchemaError::Invalid(why);
    let schema: Value =
        serde_json::from_str(text).map_err(|e| invalid(format!("the schema is not JSON: {e}")))?;
    if !(schema.is_object() || schema.is_boolean()) {
        return Err(invalid(
            "a schema is a JSON object (or true or false)".into(),
        ));
    }
    if let Some(named) = schema.get("$schema") {
        let named = named.as_str().unwrap_or_default();
        if named.trim_end_matches('#') != DRAFT_2020_12 {
            return Err(invalid(format!(
                "$schema must be {DRAFT_2020_12:?} (or absent): podcache validates with draft \
                 2020-12, got {:?}",
                cut(named)
            )));
        }
    }
    if let Err(e) = jsonschema::draft202012::meta::validate(&schema) {
        return Err(invalid(format!(
            "not a valid draft 2020-12 schema at {:?}: {}",
            e.instance_path().to_string(),
            cut(&e.to_string())
        )));
    }
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .offline()
        .with_pattern_options(jsonschema::PatternOptions::regex())
        .build(&schema)
        .map_err(|e| {
            invalid(format!(
                "the schema does not compile (remote references are refused, patterns use \
                 the linear-time regex syntax): {}",
                cut(&e.to_string())
            ))
        })
}

/// `text` cut to [`QUOTE_CHARS`] characters.
fn cut(text: &str) -> String {
    match text.char_indices().nth(QUOTE_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// A compiled schema version, or why it does not compile on this node.
type Compiled = Result<Arc<jsonschema::Validator>, String>;

/// The compiled schemas of one node, by type, each with the version of
/// the schema entry it was compiled from.
#[derive(Default)]
pub(crate) struct Schemas {
    compiled: Mutex<HashMap<i32, (Version, Compiled)>>,
    /// Schema versions compiled by [`Schemas::check`] (for tests).
    compiles: AtomicU64,
    /// The same, in `/metrics` (`podcache_schema_compiles_total`).
    counter: prometheus_client::metrics::counter::Counter,
}

impl std::fmt::Debug for Schemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schemas")
            .field("compiles", &self.compiles.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Schemas {
    /// No schema compiled yet; compilations are counted in `counter`.
    pub(crate) fn new(counter: prometheus_client::metrics::counter::Counter) -> Self {
        Self {
            counter,
            ..Self::default()
        }
    }

    /// Checks a local change before it is written: refused when it writes
    /// the reserved type, or a value its type's schema refuses. A type
    /// without a schema costs one lookup of a missing entry (no JSON is
    /// parsed).
    pub(crate) fn check(
        &self,
        store: &Store,
        change: &Change<'_>,
        now_ms: u64,
    ) -> Result<(), WriteError> {
        let ty = change.ty();
        if ty == SCHEMA_TYPE {
            return Err(WriteError::ReservedType);
        }
        if matches!(change, Change::Delete { .. }) {
            return Ok(());
        }
        // The entry's key is the type's decimal id, formatted on the stack.
        let mut key = itoa::Buffer::new();
        let Some(entry) = store.get(SCHEMA_TYPE, key.format(ty), now_ms) else {
            return Ok(());
        };
        let Some(text) = entry.value() else {
            return Ok(());
        };
        let validator = self
            .compiled(ty, entry.version(), text)
            .map_err(|reason| WriteError::SchemaUnusable { ty, reason })?;
        let mut values: Vec<(&str, &str)> = match change {
            Change::Set { key, value, .. } => vec![(key, value)],
            Change::Batch { entries, .. } => entries
                .iter()
                .filter_map(|(k, v)| Some((*k, (*v)?)))
                .collect(),
            Change::Unversioned { entries, .. } => entries.to_vec(),
            Change::Delete { .. } => Vec::new(),
        };
        values.sort_unstable();
        for (key, value) in values {
            validate(&validator, ty, key, value).map_err(WriteError::Schema)?;
        }
        Ok(())
    }

    /// The compiled schema of `ty` at `version`, compiled now when the
    /// cache holds another version (or none).
    fn compiled(&self, ty: i32, version: Version, text: &str) -> Compiled {
        let mut cache = self.compiled.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, compiled)) = cache.get(&ty)
            && *at == version
        {
            return compiled.clone();
        }
        // Compiled under the lock, so each version is compiled once however
        // many writes need it at once; only writes of types with a schema
        // wait here, and only for the first write of a version.
        self.compiles.fetch_add(1, Ordering::Relaxed);
        self.counter.inc();
        let compiled = compile(text, usize::MAX)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        match cache.get(&ty) {
            Some((at, _)) if *at > version => {}
            _ => {
                cache.insert(ty, (version, compiled.clone()));
            }
        }
        compiled
    }

    /// Keeps `compiled` as `ty`'s schema at `version` (the endpoint that
    /// set it has compiled it already), unless a newer one is kept.
    pub(crate) fn remember(&self, ty: i32, version: Version, compiled: Compiled) {
        let mut cache = self.compiled.lock().unwrap_or_else(PoisonError::into_inner);
        match cache.get(&ty) {
            Some((at, _)) if *at > version => {}
            _ => {
                cache.insert(ty, (version, compiled));
            }
        }
    }

    /// Forgets `ty`'s compiled schema (it was deleted).
    pub(crate) fn forget(&self, ty: i32) {
        self.compiled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&ty);
    }

    /// Schema versions compiled by writes so far.
    pub(crate) fn compiles(&self) -> u64 {
        self.compiles.load(Ordering::Relaxed)
    }
}

/// Checks one value against a compiled schema.
pub fn validate(
    validator: &jsonschema::Validator,
    ty: i32,
    key: &str,
    value: &str,
) -> Result<(), Box<Violation>> {
    let violation = |location: String, keyword: &str, schema_path: String, detail: String| {
        Box::new(Violation {
            ty,
            key: cut(key),
            location,
            keyword: keyword.to_owned(),
            schema_path,
            detail,
        })
    };
    let parsed: Value = serde_json::from_str(value).map_err(|e| {
        violation(
            String::new(),
            "json",
            String::new(),
            format!("the value is not JSON: {e}"),
        )
    })?;
    match validator.validate(&parsed) {
        Ok(()) => Ok(()),
        Err(e) => Err(violation(
            e.instance_path().to_string(),
            e.kind().keyword(),
            e.schema_path().to_string(),
            cut(&e.to_string()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Limits;

    const LIMIT: usize = 64 * 1024;

    #[test]
    fn a_schema_is_bounded_2020_12_json_without_remote_references() {
        assert!(compile(r#"{"type":"object"}"#, LIMIT).is_ok());
        assert!(compile("true", LIMIT).is_ok());
        assert!(
            compile(
                r#"{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"integer"}"#,
                LIMIT
            )
            .is_ok()
        );
        let refused = [
            ("{", "not JSON"),
            ("[1]", "a JSON object"),
            ("5", "a JSON object"),
            (
                r#"{"$schema":"http://json-schema.org/draft-07/schema#"}"#,
                "draft 2020-12",
            ),
            (r#"{"type":"no-such-type"}"#, "not a valid draft 2020-12"),
            (r#"{"minimum":"one"}"#, "not a valid draft 2020-12"),
            (
                r#"{"$ref":"https://example.com/other.json"}"#,
                "does not compile",
            ),
            (r#"{"$ref":"file:///etc/passwd"}"#, "does not compile"),
            (r#"{"pattern":"(?=a)b"}"#, "does not compile"),
        ];
        for (text, expect) in refused {
            let err = compile(text, LIMIT).expect_err(text).to_string();
            assert!(err.contains(expect), "{text}: {err}");
        }
        let big = format!(r#"{{"description":"{}"}}"#, "x".repeat(100));
        assert_eq!(
            compile(&big, 50).expect_err("too large"),
            SchemaError::TooLarge {
                len: big.len(),
                limit: 50
            }
        );
        // A reference inside the document is fine.
        assert!(
            compile(
                r##"{"$defs":{"n":{"type":"integer"}},"properties":{"a":{"$ref":"#/$defs/n"}}}"##,
                LIMIT
            )
            .is_ok()
        );
    }

    #[test]
    fn a_violation_names_the_key_the_location_and_the_keyword() {
        let schema = compile(
            r#"{"type":"object","properties":{"on":{"type":"boolean"},
                "tags":{"type":"array","items":{"type":"string","maxLength":3}}},
                "required":["on"]}"#,
            LIMIT,
        )
        .expect("valid");
        assert_eq!(
            validate(&schema, 7, "k", r#"{"on":true,"tags":["a"]}"#),
            Ok(())
        );
        let v = validate(&schema, 7, "k", r#"{"on":true,"tags":["a","long"]}"#).expect_err("bad");
        assert_eq!(
            (v.ty, &*v.key, &*v.location, &*v.keyword),
            (7, "k", "/tags/1", "maxLength")
        );
        assert_eq!(v.schema_path, "/properties/tags/items/maxLength");
        let v = validate(&schema, 7, "k", r#"{"tags":[]}"#).expect_err("missing");
        assert_eq!((&*v.location, &*v.keyword), ("", "required"));
        let v = validate(&schema, 7, "k", "on").expect_err("not JSON");
        assert_eq!((&*v.location, &*v.keyword), ("", "json"));
        let long = format!(r#"{{"on":"{}"}}"#, "x".repeat(10_000));
        let v = validate(&schema, 7, "k", &long).expect_err("type");
        assert!(v.detail.chars().count() <= QUOTE_CHARS + 1, "{}", v.detail);
    }

    fn store() -> Store {
        Store::new(1, Limits::default())
    }

    fn set<'a>(ty: i32, key: &'a str, value: &'a str) -> Change<'a> {
        Change::Set {
            ty,
            key,
            value,
            ttl_secs: None,
        }
    }

    #[test]
    fn a_change_is_checked_against_its_types_schema_compiled_once_per_version() {
        let store = store();
        let schemas = Schemas::default();
        let now = 1_000_000;
        // No schema: anything goes, nothing compiled.
        schemas
            .check(&store, &set(7, "k", "not json"), now)
            .expect("no schema");
        assert!(matches!(
            schemas.check(&store, &set(SCHEMA_TYPE, "7", "{}"), now),
            Err(WriteError::ReservedType)
        ));
        store
            .commit(
                set(SCHEMA_TYPE, "7", r#"{"type":"integer"}"#),
                now,
                None,
                |_| Ok::<_, ()>(()),
            )
            .expect("schema stored");
        for _ in 0..3 {
            schemas
                .check(&store, &set(7, "k", "42"), now)
                .expect("valid");
        }
        assert_eq!(schemas.compiles(), 1, "once per version");
        let err = schemas
            .check(&store, &set(7, "k", r#""x""#), now)
            .expect_err("violates");
        assert!(
            matches!(err, WriteError::Schema(ref v) if v.keyword == "type"),
            "{err}"
        );
        // A batch: the first failing key in key order; deletes pass.
        let entries = [("b", Some("x")), ("a", Some("1")), ("c", None)];
        let batch = Change::Batch {
            ty: 7,
            entries: &entries,
            ttl_secs: None,
        };
        let err = schemas.check(&store, &batch, now).expect_err("b");
        assert!(
            matches!(err, WriteError::Schema(ref v) if v.key == "b"),
            "{err}"
        );
        schemas
            .check(&store, &Change::Delete { ty: 7, key: "a" }, now)
            .expect("a delete");
        // Another type is not affected; a new version compiles once more.
        schemas
            .check(&store, &set(8, "k", "x"), now)
            .expect("no schema");
        store
            .commit(
                set(SCHEMA_TYPE, "7", r#"{"type":"string"}"#),
                now + 1,
                None,
                |_| Ok::<_, ()>(()),
            )
            .expect("schema replaced");
        schemas
            .check(&store, &set(7, "k", r#""x""#), now)
            .expect("now valid");
        assert_eq!(schemas.compiles(), 2);
        store
            .commit(
                Change::Delete {
                    ty: SCHEMA_TYPE,
                    key: "7",
                },
                now + 2,
                None,
                |_| Ok::<_, ()>(()),
            )
            .expect("schema deleted");
        schemas
            .check(&store, &set(7, "k", "42"), now)
            .expect("no schema any more");
    }
}
