//! `src/api/openapi.json` against real answers: nodes are started (a
//! plain pair, one with small limits, one with tokens, a pair serving
//! OFREP flags), requests produce every status and body shape the
//! document describes, each answer is recorded (method, path, headers,
//! status, content type, body), and `tests/openapi/check.py` (jsonschema
//! and openapi-spec-validator from the `.venv-interop` venv) validates the
//! document itself, finds each answer's operation and response in it,
//! checks the body against the schema, and checks that every operation,
//! status and parameter of the document was exercised. A second run on a
//! deliberately broken copy of the document must fail, so the check is
//! known to be able to.
//!
//! Most requests are rows of tables ([`Case`]: status, note, node, method,
//! path, headers, body) that [`Recorder::run`] sends in order, asserting
//! each status. Code is left for what a row cannot say: waiting for the
//! cluster, watch streams, a version or tag read from one answer and sent
//! with the next requests, a stalled connection, a shutdown, the token
//! node's rule (each guarded request without a token, each write with a
//! read token), and the checks of answers' bodies.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::{Cluster, wait_until};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

const WRITE: &str = "write-token-openapi-0123456789";
const READ: &str = "read-token-openapi-0123456789";
const SCOPED: &str = "read-token-openapi-scoped-0123456789";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's Python, with the checker's packages; a clear failure
/// otherwise.
fn venv_python() -> PathBuf {
    let python = root().join(".venv-interop/bin/python");
    assert!(
        python.exists(),
        "run scripts/test: it creates .venv-interop with jsonschema and openapi-spec-validator \
         (from tests/interop/requirements.txt)"
    );
    let probe = Command::new(&python)
        .args(["-c", "import jsonschema, openapi_spec_validator"])
        .output()
        .expect("python runs");
    assert!(
        probe.status.success(),
        ".venv-interop lacks jsonschema or openapi-spec-validator: run \
         `.venv-interop/bin/pip install -r tests/interop/requirements.txt`\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    python
}

/// One answer as the checker reads it.
struct Answer {
    status: StatusCode,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// One request of a table and the status its answer must have, in the
/// order of [`Recorder::expect`]'s arguments: status, note, node, method,
/// path, request headers, body.
type Case<'a> = (
    u16,
    &'a str,
    &'a str,
    Method,
    &'a str,
    &'a [(&'a str, &'a str)],
    &'a [u8],
);

/// The answers to a table's requests, in its order, with their notes.
struct Answers(Vec<(String, Answer)>);

impl Answers {
    /// The answer to the table's one request noted `note`.
    #[track_caller]
    fn get(&self, note: &str) -> &Answer {
        let mut found = self.0.iter().filter(|(n, _)| n == note);
        match (found.next(), found.next()) {
            (Some((_, answer)), None) => answer,
            _ => panic!("the table has no one request noted {note:?}"),
        }
    }
}

/// An open watch stream, read as it arrives.
struct Stream {
    record: Value,
    body: hyper::body::Incoming,
    text: String,
}

impl Stream {
    /// Reads until `done` holds for the complete events read so far.
    async fn read_until(&mut self, what: &str, done: impl Fn(&[Event]) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !(self.text.ends_with("\n\n") && done(&self.events())) {
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}; got {:?}", self.text))
                .unwrap_or_else(|| panic!("the stream ended before {what}: {:?}", self.text))
                .expect("stream frame");
            if let Ok(data) = frame.into_data() {
                self.text.push_str(&String::from_utf8_lossy(&data));
            }
        }
    }

    /// The complete events read so far (keep-alive comments left out).
    fn events(&self) -> Vec<Event> {
        let mut frames: Vec<&str> = self.text.split("\n\n").collect();
        frames.pop();
        frames
            .into_iter()
            .filter_map(|frame| {
                let field = |name: &str| {
                    frame
                        .lines()
                        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": ").map(str::to_owned))
                };
                Some(Event {
                    name: field("event")?,
                    id: field("id"),
                    data: serde_json::from_str(&field("data")?).unwrap_or(Value::Null),
                })
            })
            .collect()
    }
}

/// One event of a watch stream.
struct Event {
    name: String,
    id: Option<String>,
    data: Value,
}

impl Event {
    fn is(&self, name: &str) -> bool {
        self.name == name
    }

    /// A change of `key` from `origin`, a delete or not.
    fn is_change(&self, key: &str, origin: &str, deleted: bool) -> bool {
        self.is("change")
            && self.data["key"] == key
            && self.data["origin"] == origin
            && self.data["deleted"] == deleted
    }
}

/// Sends requests and keeps every answer for the checker.
struct Recorder {
    http: Client<HttpConnector, Full<Bytes>>,
    answers: Vec<Value>,
}

impl Recorder {
    fn new() -> Self {
        Self {
            http: Client::builder(TokioExecutor::new()).build_http(),
            answers: Vec::new(),
        }
    }

    async fn start(
        &self,
        node: &str,
        method: &Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &Bytes,
    ) -> hyper::Response<hyper::body::Incoming> {
        let mut request = Request::builder()
            .method(method.clone())
            .uri(format!("http://{node}{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body.clone())).expect("request");
        tokio::time::timeout(Duration::from_secs(20), self.http.request(request))
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no answer"))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        note: &str,
        method: &Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        response: &hyper::http::response::Parts,
        answer_body: &str,
        stream: bool,
    ) -> Value {
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        };
        let mut response_headers = serde_json::Map::new();
        for name in response.headers.keys() {
            let values: Vec<&str> = response
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            response_headers.insert(name.as_str().to_owned(), json!(values.join(", ")));
        }
        json!({
            "note": note,
            "method": method.as_str(),
            "path": path,
            "request_headers": headers.iter().map(|(n, v)| (n.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "request_content_type": header("content-type"),
            "request_body": String::from_utf8_lossy(body),
            "status": response.status.as_u16(),
            "response_headers": response_headers,
            "content_type": response.headers.get("content-type").and_then(|v| v.to_str().ok()),
            "body": answer_body,
            "stream": stream,
        })
    }

    /// Any request; the answer is recorded and returned.
    async fn send(
        &mut self,
        note: &str,
        node: &str,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Answer {
        let body = body.into();
        let response = self.start(node, &method, path, headers, &body).await;
        let (parts, incoming) = response.into_parts();
        let bytes = tokio::time::timeout(Duration::from_secs(20), incoming.collect())
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: the body did not end"))
            .expect("body")
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let record = self.record(note, &method, path, headers, &body, &parts, &text, false);
        self.answers.push(record);
        Answer {
            status: parts.status,
            body: text,
        }
    }

    /// `send`, asserting the status.
    #[allow(clippy::too_many_arguments)]
    async fn expect(
        &mut self,
        status: u16,
        note: &str,
        node: &str,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Answer {
        let answer = self
            .send(note, node, method.clone(), path, headers, body)
            .await;
        assert_eq!(
            answer.status.as_u16(),
            status,
            "{note}: {method} {path}: {}",
            answer.body
        );
        answer
    }

    /// Sends a table's requests in order, each with [`Recorder::expect`].
    async fn run(&mut self, cases: &[Case<'_>]) -> Answers {
        let mut answers = Vec::with_capacity(cases.len());
        for (status, note, node, method, path, headers, body) in cases {
            let body = Bytes::copy_from_slice(body);
            let answer = self
                .expect(*status, note, node, method.clone(), path, headers, body)
                .await;
            answers.push((note.to_string(), answer));
        }
        Answers(answers)
    }

    /// Opens a watch stream; record it with [`Recorder::finish`].
    async fn open(
        &mut self,
        note: &str,
        node: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Stream {
        let response = self
            .start(node, &Method::GET, path, headers, &Bytes::new())
            .await;
        let (parts, body) = response.into_parts();
        assert_eq!(parts.status, StatusCode::OK, "{note}: GET {path}");
        let record = self.record(note, &Method::GET, path, headers, b"", &parts, "", true);
        Stream {
            record,
            body,
            text: String::new(),
        }
    }

    fn finish(&mut self, stream: Stream) {
        let mut record = stream.record;
        record["body"] = json!(stream.text);
        self.answers.push(record);
    }
}

/// Runs the checker on `doc`; its success and its report.
fn check(python: &Path, doc: &Path, answers: &Path) -> (bool, String) {
    let out = Command::new(python)
        .arg(root().join("tests/openapi/check.py"))
        .arg(doc)
        .arg(answers)
        .output()
        .expect("check.py runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn scratch_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "podcache-openapi-{what}-{}-{}",
        std::process::id(),
        common::next_block()
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Everything the plain pair of nodes answers: entries, namespaces,
/// batches, watch streams, export and import, cluster, probes, metrics,
/// the dashboard and the document, and the errors of bad input.
async fn plain_pair(rec: &mut Recorder) {
    let cluster = Cluster::start(2).await;
    let n0: &str = &cluster.slots[0].http.to_string();
    let n1: &str = &cluster.slots[1].http.to_string();
    use Method as M;
    let text = [("content-type", "text/plain; charset=utf-8")];
    let json_type = [("content-type", "application/json")];
    let ndjson = [("content-type", "application/x-ndjson")];

    // Conditional writes (compare-and-set), once every node knows the
    // decider; each version read is sent with the next requests.
    for node in [n0, n1] {
        let client = podcache::client::RestClient::new(node).expect("client");
        wait_until("a decider is known", Duration::from_secs(10), || {
            let client = client.clone();
            async move {
                client.get("/v1/cluster").await.expect("cluster").json()["decider"]["name"]
                    .is_string()
            }
        })
        .await;
    }
    let etag = |answer: &Answer| {
        format!(
            "\"{}\"",
            answer.json()["version"].as_str().expect("version")
        )
    };
    let created = rec
        .expect(
            200,
            "create only (If-None-Match: *)",
            n0,
            M::PUT,
            "/v1/cache/1/cas",
            &[("if-none-match", "*")],
            "1",
        )
        .await;
    let v1 = etag(&created);
    let if_none_v1 = [("if-none-match", v1.as_str())];
    let if_v1 = [("if-match", v1.as_str())];
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (304, "read, unchanged (If-None-Match)", n1, M::GET, "/v1/cache/1/cas", &if_none_v1, b""),
        (304, "HEAD, unchanged (If-None-Match)", n1, M::HEAD, "/v1/cache/1/cas", &if_none_v1, b""),
        (200, "compare-and-set (If-Match)", n1, M::PUT, "/v1/cache/1/cas", &if_v1, b"2"),
    ];
    let v2 = etag(rec.run(cases).await.get("compare-and-set (If-Match)"));
    let rollback_v1 = format!("/v1/cache/1/cas/rollback?version={}", v1.trim_matches('"'));
    let guarded = format!(
        r#"{{"cas":{{"value":"4","if_version":{v2}}},"cas-new":{{"value":"x","if_absent":true}}}}"#
    );
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (412, "compare-and-set, stale version", n0, M::PUT, "/v1/cache/1/cas", &if_v1, b"3"),
        (412, "conditional delete, stale version", n0, M::DELETE, "/v1/cache/1/cas", &if_v1, b""),
        (400, "bad If-Match", n0, M::PUT, "/v1/cache/1/cas", &[("if-match", "nope")], b"3"),
        (412, "rollback, stale version", n0, M::POST, &rollback_v1, &if_v1, b""),
        (200, "batch with expectations", n1, M::POST, "/v1/cache/1", &json_type, guarded.as_bytes()),
        (412, "batch with a stale expectation", n1, M::POST, "/v1/cache/1", &json_type, guarded.as_bytes()),
        (200, "read the version", n0, M::GET, "/v1/cache/1/cas", &[], b""),
    ];
    let v4 = etag(rec.run(cases).await.get("read the version"));

    let long_key = format!("/v1/cache/1/{}", "k".repeat(1025));
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (200, "conditional delete", n0, M::DELETE, "/v1/cache/1/cas", &[("if-match", v4.as_str())], b""),
        // Single entries.
        (200, "set", n0, M::PUT, "/v1/cache/1/a", &[], b"va"),
        (200, "set with ttl", n0, M::PUT, "/v1/cache/1/b?ttl=60", &text, b"vb"),
        (200, "set, wait=all", n0, M::PUT, "/v1/cache/1/c?wait=all", &[], b"vc"),
        (200, "set, wait=none", n0, M::PUT, "/v1/cache/1/d?wait=none", &[], b""),
        (200, "a key with a slash", n0, M::PUT, "/v1/cache/-7/dir%2Fx%20y", &[], "ü".as_bytes()),
        (200, "get", n0, M::GET, "/v1/cache/1/a", &[], b""),
        (200, "get with ttl", n0, M::GET, "/v1/cache/1/b", &[], b""),
        (200, "get, encoded key", n0, M::GET, "/v1/cache/-7/dir%2Fx%20y", &[], b""),
        (200, "head", n0, M::HEAD, "/v1/cache/1/a", &[], b""),
        (404, "head, absent", n0, M::HEAD, "/v1/cache/1/absent", &[], b""),
        (400, "head, bad type", n0, M::HEAD, "/v1/cache/x/a", &[], b""),
        (404, "get, absent", n0, M::GET, "/v1/cache/1/absent", &[], b""),
        (400, "get, bad type", n0, M::GET, "/v1/cache/x/a", &[], b""),
        (400, "get, type past int32", n0, M::GET, "/v1/cache/2147483648/a", &[], b""),
        (400, "get, empty key", n0, M::GET, "/v1/cache/1/", &[], b""),
        (400, "get, key not UTF-8", n0, M::GET, "/v1/cache/1/%FF%FE", &[], b""),
        (400, "put, bad wait", n0, M::PUT, "/v1/cache/1/k?wait=sometimes", &[], b"v"),
        (400, "put, ttl not a number", n0, M::PUT, "/v1/cache/1/k?ttl=soon", &[], b"v"),
        (400, "put, ttl 0", n0, M::PUT, "/v1/cache/1/k?ttl=0", &[], b"v"),
        (400, "put, value not UTF-8", n0, M::PUT, "/v1/cache/1/k", &[], b"\xff\xfe"),
        (400, "put, key too long", n0, M::PUT, &long_key, &[], b"v"),
        (400, "put, bad type", n0, M::PUT, "/v1/cache/1.5/k", &[], b"v"),
        (200, "delete", n0, M::DELETE, "/v1/cache/1/d", &[], b""),
        (404, "delete, absent", n0, M::DELETE, "/v1/cache/1/d?wait=all", &[], b""),
        (200, "delete, wait=all", n0, M::DELETE, "/v1/cache/1/c?wait=all", &[], b""),
        (400, "delete with ttl", n0, M::DELETE, "/v1/cache/1/a?ttl=5", &[], b""),
        (400, "delete, bad type", n0, M::DELETE, "/v1/cache/x/a", &[], b""),
        // A key's history (its versions are rolled back to below).
        (200, "history", n0, M::GET, "/v1/cache/1/d/history", &[], b""),
    ];
    let answers = rec.run(cases).await;
    let ttl = answers.get("set with ttl");
    assert!(ttl.json()["expires_at_ms"].is_u64(), "{}", ttl.body);
    let waited = answers.get("set, wait=all");
    assert_eq!(waited.json()["replication"][0]["status"], "acked");
    let bad_ttl = answers.get("put, ttl 0");
    assert_eq!(bad_ttl.json()["error"], "invalid_ttl");
    let deleted = answers.get("delete, wait=all");
    assert_eq!(deleted.json()["deleted"], true);
    let h = answers.get("history").json();
    let version = |i: usize| {
        h["versions"][i]["version"]
            .as_str()
            .expect("a version")
            .to_owned()
    };
    let (tomb, old) = (version(0), version(1));
    assert_eq!(h["versions"][0]["deleted"], true);

    let back_to_old = format!("/v1/cache/1/d/rollback?wait=all&version={old}");
    let back_to_tomb = format!("/v1/cache/1/d/rollback?version={tomb}");
    let long = "r".repeat(257);
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (200, "head of history", n0, M::HEAD, "/v1/cache/1/d/history", &[], b""),
        (404, "history, never written", n0, M::GET, "/v1/cache/1/never/history", &[], b""),
        (400, "history, bad type", n0, M::GET, "/v1/cache/x/d/history", &[], b""),
        // Rollback.
        (200, "rollback, wait=all, reason", n0, M::POST, &back_to_old, &[("x-podcache-reason", "undo")], b""),
        (200, "rollback to a deletion", n0, M::POST, &back_to_tomb, &[], b""),
        (404, "rollback, unknown version", n0, M::POST, "/v1/cache/1/d/rollback?version=1.0@0000000000000001", &[], b""),
        (400, "rollback, no version", n0, M::POST, "/v1/cache/1/d/rollback", &[], b""),
        (400, "put, reason too long", n0, M::PUT, "/v1/cache/1/k", &[("x-podcache-reason", long.as_str())], b"v"),
        // Namespaces and batches.
        (200, "namespace", n0, M::GET, "/v1/cache/1", &[], b""),
        (200, "namespace never written", n0, M::GET, "/v1/cache/99", &[], b""),
        (400, "namespace, bad type", n0, M::GET, "/v1/cache/x", &[], b""),
        (400, "namespace, type not UTF-8", n0, M::GET, "/v1/cache/%FF", &[], b""),
        (200, "batch", n0, M::POST, "/v1/cache/2", &json_type, br#"{"x":"1","y":"2"}"#),
        (200, "batch, wait=all, ttl", n0, M::POST, "/v1/cache/2?wait=all&ttl=30", &json_type, br#"{"z":"3"}"#),
        (400, "batch, not JSON", n0, M::POST, "/v1/cache/2", &json_type, b"{"),
        (400, "batch, a number", n0, M::POST, "/v1/cache/2", &json_type, br#"{"n":5}"#),
        (400, "batch, empty", n0, M::POST, "/v1/cache/2", &json_type, b"{}"),
        (400, "batch, bad type", n0, M::POST, "/v1/cache/two", &json_type, br#"{"a":"b"}"#),
        (400, "batch, bad wait", n0, M::POST, "/v1/cache/2?wait=1", &json_type, br#"{"a":"b"}"#),
        (400, "batch, bad ttl", n0, M::POST, "/v1/cache/2?ttl=0", &json_type, br#"{"a":"b"}"#),
    ];
    let answers = rec.run(cases).await;
    assert_eq!(
        answers.get("rollback, wait=all, reason").json()["reason"],
        "undo"
    );
    assert_eq!(answers.get("batch").json()["count"], 2);

    // Watch streams: a snapshot, then live changes from both nodes.
    let mut watch = rec
        .open("watch with snapshot", n0, "/v1/watch/1?snapshot=true", &[])
        .await;
    watch
        .read_until("the live event", |e| e.iter().any(|e| e.is("live")))
        .await;
    let rollout = [
        ("content-type", "application/json"),
        ("x-podcache-reason", "rollout"),
    ];
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (200, "a peer's write", n1, M::PUT, "/v1/cache/1/w?wait=all", &[("x-podcache-reason", "flip w")], b"from n1"),
        (200, "a delete, watched", n0, M::DELETE, "/v1/cache/1/a", &[("x-podcache-reason", "cleanup")], b""),
        (200, "a batch with a delete, watched", n1, M::POST, "/v1/cache/1", &rollout, br#"{"r1":"on","r2":null}"#),
    ];
    rec.run(cases).await;
    watch
        .read_until("a peer's change, a delete and a batch", |e| {
            e.iter().any(|e| e.is_change("w", "peer", false))
                && e.iter().any(|e| e.is_change("a", "local", true))
                && e.iter().any(|e| e.is("batch"))
        })
        .await;
    let peer_id = watch
        .events()
        .into_iter()
        .find(|e| e.is_change("w", "peer", false))
        .and_then(|e| e.id)
        .expect("a live change has an id");
    rec.finish(watch);
    let mut reset = rec
        .open(
            "resume with another node's id",
            n0,
            "/v1/watch/1",
            &[("last-event-id", "0000000000000001-1")],
        )
        .await;
    reset
        .read_until("reset, snapshot, live", |e| {
            e.iter().any(|e| e.is("reset")) && e.iter().any(|e| e.is("live"))
        })
        .await;
    rec.finish(reset);
    let mut resumed = rec
        .open(
            "resume by query",
            n0,
            &format!("/v1/watch/1?last_event_id={peer_id}"),
            &[],
        )
        .await;
    resumed
        .read_until("the replayed delete", |e| {
            e.iter()
                .any(|e| e.is_change("a", "local", true) && e.id.is_some())
        })
        .await;
    rec.finish(resumed);
    let mut one_key = rec
        .open("one key", n0, "/v1/watch/1?key=w&snapshot=false", &[])
        .await;
    rec.expect(
        200,
        "a write, watched by key",
        n0,
        M::PUT,
        "/v1/cache/1/w?ttl=600",
        &[],
        "again",
    )
    .await;
    one_key
        .read_until("the change of w", |e| {
            e.iter()
                .any(|e| e.is("change") && e.data["value"] == "again")
        })
        .await;
    rec.finish(one_key);
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (400, "watch, bad type", n0, M::GET, "/v1/watch/x", &[], b""),
        (400, "watch, bad snapshot", n0, M::GET, "/v1/watch/1?snapshot=maybe", &[], b""),
        // Export and import (of the export).
        (200, "export", n0, M::GET, "/v1/export", &[], b""),
        (200, "export one type", n0, M::GET, "/v1/export?type=1", &[], b""),
        (400, "export, bad type", n0, M::GET, "/v1/export?type=one", &[], b""),
    ];
    let answers = rec.run(cases).await;
    let export = &answers.get("export").body;

    let line = r#"{"type":5,"key":"imported","value":"yes","hlc":1,"node":"00000000000000ff"}"#;
    let fresh = format!("{line}\n\n");
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (200, "import an export", n1, M::POST, "/v1/import", &ndjson, export.as_bytes()),
        (200, "import a new entry", n1, M::POST, "/v1/import", &ndjson, fresh.as_bytes()),
        (400, "import, bad line", n1, M::POST, "/v1/import", &ndjson, b"{\"type\":1}\n"),
        (400, "import, other format", n1, M::POST, "/v1/import", &ndjson, br#"{"format":"x","version":1}"#),
        (400, "import, not UTF-8", n1, M::POST, "/v1/import", &ndjson, b"\xff\n"),
        // Operations.
        (200, "cluster", n0, M::GET, "/v1/cluster", &[], b""),
        (200, "cluster", n1, M::GET, "/v1/cluster", &[], b""),
        (200, "alive", n0, M::GET, "/healthz", &[], b""),
        (200, "HEAD of a GET endpoint", n0, M::HEAD, "/healthz", &[], b""),
        (200, "ready", n0, M::GET, "/readyz", &[], b""),
        (200, "metrics", n0, M::GET, "/metrics", &[], b""),
        (200, "dashboard", n0, M::GET, "/", &[], b""),
        (200, "this document", n0, M::GET, "/openapi.json", &[], b""),
        // Unknown paths (unknown methods are below).
        (404, "unknown path", n0, M::GET, "/v2/cache/1/a", &[], b""),
        (404, "unknown path under /v1", n0, M::GET, "/v1/cache", &[], b""),
        // JSON Schemas: set, read, refused values, bad schemas, delete.
        (200, "written before the schema", n0, M::PUT, "/v1/cache/40/s", &text, b"not json"),
    ];
    let answers = rec.run(cases).await;
    let fresh = answers.get("import a new entry");
    assert_eq!(fresh.json()["applied"], 1, "{}", fresh.body);
    let committed = std::fs::read_to_string(root().join("src/api/openapi.json"))
        .expect("the committed document");
    assert!(
        answers.get("this document").body == committed,
        "GET /openapi.json must serve exactly src/api/openapi.json"
    );
    let old = answers.get("written before the schema").json()["version"]
        .as_str()
        .expect("version")
        .to_owned();

    let back_to_old = format!("/v1/cache/40/s/rollback?version={old}");
    let reason = [("x-podcache-reason", "schema for type 40")];
    let schema = r#"{"type":"object","properties":{"on":{"type":"boolean"}},"required":["on"]}"#;
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (200, "set a schema, wait=all, reason", n0, M::PUT, "/v1/schema/40?wait=all", &reason, schema.as_bytes()),
        (200, "read a schema", n1, M::GET, "/v1/schema/40", &[], b""),
        (404, "no schema", n0, M::GET, "/v1/schema/41", &[], b""),
        (400, "schema of a bad type", n0, M::GET, "/v1/schema/x", &[], b""),
        (400, "not a schema", n0, M::PUT, "/v1/schema/40", &[], br#"{"type":"nope"}"#),
        (400, "the reserved type", n0, M::GET, "/v1/cache/-2147483648/40", &[], b""),
        (422, "a value the schema refuses", n0, M::PUT, "/v1/cache/40/k", &text, br#"{"on":1}"#),
        (422, "a batch value the schema refuses", n0, M::POST, "/v1/cache/40", &[], br#"{"a":"{\"on\":true}","b":"no"}"#),
        (422, "a rollback to a value the schema refuses", n0, M::POST, &back_to_old, &[], b""),
        (400, "delete the schema of a bad type", n0, M::DELETE, "/v1/schema/x", &[], b""),
        (200, "delete a schema, wait=all, reason", n0, M::DELETE, "/v1/schema/40?wait=all", &reason, b""),
        (404, "delete no schema", n0, M::DELETE, "/v1/schema/40", &[], b""),
        // Unknown methods.
        (405, "method not allowed", n0, M::POST, "/v1/schema/40", &[], b""),
        (405, "method not allowed", n0, M::POST, "/v1/cache/1/a", &[], b""),
        (405, "method not allowed", n0, M::PATCH, "/v1/cache/1/a", &[], b""),
        (405, "method not allowed", n0, M::PUT, "/v1/cache/1", &[], b""),
        (405, "method not allowed", n0, M::DELETE, "/v1/watch/1", &[], b""),
        (405, "method not allowed", n0, M::POST, "/v1/export", &[], b""),
        (405, "method not allowed", n0, M::GET, "/v1/import", &[], b""),
        (405, "method not allowed", n0, M::POST, "/healthz", &[], b""),
        (405, "method not allowed", n0, M::PUT, "/openapi.json", &[], b""),
        (405, "method not allowed", n0, M::DELETE, "/", &[], b""),
    ];
    let answers = rec.run(cases).await;
    assert_eq!(
        answers.get("a value the schema refuses").json()["location"],
        "/on"
    );
    cluster.shutdown().await;
}

/// A node with small limits: 413, 507, 503 (requests and watch streams
/// over their limits, and not ready while shutting down), and a data
/// directory in `/v1/cluster`.
async fn small_node(rec: &mut Recorder) {
    let dir = scratch_dir("data");
    let data = dir.clone();
    let mut cluster = Cluster::start_with(1, move |c| {
        c.limits.max_entries_per_type = 2;
        c.limits.max_types = 2;
        c.limits.max_value_bytes = 64;
        c.limits.max_batch_entries = 3;
        c.max_body_bytes = 1024;
        c.max_schema_bytes = 100;
        c.max_concurrent_requests = 1;
        c.max_watch_streams = 1;
        c.data_dir = Some(data.clone());
        c.shutdown_delay = Duration::from_secs(3);
        c.ofrep_type = Some(1);
    })
    .await;
    let n: &str = &cluster.slots[0].http.to_string();
    use Method as M;
    let value = "v".repeat(65);
    let big = "v".repeat(2000);
    let big_batch = format!(r#"{{"a":"{big}"}}"#);
    let big_context = format!(r#"{{"context":{{"x":"{big}"}}}}"#);
    let json_type = [("content-type", "application/json")];
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (413, "value too large", n, M::PUT, "/v1/cache/1/k", &[], value.as_bytes()),
        (413, "body too large", n, M::PUT, "/v1/cache/1/k", &[], big.as_bytes()),
        (413, "batch too large", n, M::POST, "/v1/cache/1", &[], br#"{"a":"1","b":"2","c":"3","d":"4"}"#),
        (413, "batch body too large", n, M::POST, "/v1/cache/1", &[], big_batch.as_bytes()),
        (413, "OFREP context too large", n, M::POST, "/ofrep/v1/evaluate/flags/k", &[], big_context.as_bytes()),
        (413, "OFREP context too large", n, M::POST, "/ofrep/v1/evaluate/flags", &[], big_context.as_bytes()),
        (413, "import too large", n, M::POST, "/v1/import", &[], big.as_bytes()),
        (200, "fill type 1", n, M::POST, "/v1/cache/1", &json_type, br#"{"k1":"1","k2":"2"}"#),
        (200, "history of k2", n, M::GET, "/v1/cache/1/k2/history", &[], b""),
    ];
    let answers = rec.run(cases).await;
    let v2 = answers.get("history of k2").json()["versions"][0]["version"]
        .as_str()
        .expect("a version")
        .to_owned();

    let back_to_v2 = format!("/v1/cache/1/k2/rollback?version={v2}");
    let schema_big = format!(r#"{{"description":"{}"}}"#, "d".repeat(200));
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (200, "delete k2", n, M::DELETE, "/v1/cache/1/k2", &[], b""),
        (200, "k5 takes its place", n, M::PUT, "/v1/cache/1/k5", &[], b"5"),
        (507, "rollback past the capacity", n, M::POST, &back_to_v2, &[], b""),
        (507, "entries per type", n, M::PUT, "/v1/cache/1/k3", &[], b"3"),
        (507, "entries per type, batch", n, M::POST, "/v1/cache/1", &[], br#"{"k4":"4"}"#),
        (200, "a second type", n, M::PUT, "/v1/cache/2/k", &[], b"v"),
        (507, "max types", n, M::PUT, "/v1/cache/3/k", &[], b"v"),
        // A schema is an entry of one more (reserved) type.
        (507, "a schema past --max-types", n, M::PUT, "/v1/schema/1", &[], br#"{"type":"string"}"#),
        (413, "a schema over --max-schema-bytes", n, M::PUT, "/v1/schema/1", &[], schema_big.as_bytes()),
        (200, "cluster with a data directory", n, M::GET, "/v1/cluster", &[], b""),
    ];
    let answers = rec.run(cases).await;
    let full = answers.get("entries per type");
    assert_eq!(full.json()["error"], "capacity_exhausted");
    let types = answers.get("max types");
    assert!(types.body.contains("--max-types"), "{}", types.body);
    let too_big = answers.get("a schema over --max-schema-bytes");
    assert_eq!(too_big.json()["error"], "schema_too_large");
    let view = answers.get("cluster with a data directory");
    assert_eq!(view.json()["data_dir"]["fsync"], "interval");

    // The one watch stream allowed, then one too many.
    let held = rec
        .open("the only watch stream", n, "/v1/watch/1", &[])
        .await;
    rec.expect(
        503,
        "watch streams over the limit",
        n,
        M::GET,
        "/v1/watch/1",
        &[],
        "",
    )
    .await;

    // A request that never finishes its body holds the one request slot:
    // everything but the probes is turned away.
    let mut stalled = tokio::net::TcpStream::connect(cluster.slots[0].http)
        .await
        .expect("connect");
    stalled
        .write_all(
            b"PUT /v1/cache/1/k1 HTTP/1.1\r\nHost: podcache\r\nContent-Length: 100\r\n\r\nab",
        )
        .await
        .expect("send");
    let probe = Recorder::new();
    wait_until(
        "the stalled request holds the slot",
        Duration::from_secs(10),
        || {
            let probe = &probe;
            async move {
                let response = probe
                    .start(n, &M::GET, "/v1/cache/1", &[], &Bytes::new())
                    .await;
                response.status() == StatusCode::SERVICE_UNAVAILABLE
            }
        },
    )
    .await;
    let over = "requests over the limit";
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (503, over, n, M::GET, "/v1/cache/1/k1", &[], b""),
        (503, over, n, M::HEAD, "/v1/cache/1/k1", &[], b""),
        (503, over, n, M::PUT, "/v1/cache/1/k1", &[], b"v"),
        (503, over, n, M::DELETE, "/v1/cache/1/k1", &[], b""),
        (503, over, n, M::GET, "/v1/cache/1/k1/history", &[], b""),
        (503, over, n, M::POST, "/v1/cache/1/k1/rollback?version=1.0@0000000000000001", &[], b""),
        (503, over, n, M::GET, "/v1/cache/1", &[], b""),
        (503, over, n, M::POST, "/v1/cache/1", &[], br#"{"k1":"v"}"#),
        (503, over, n, M::GET, "/v1/watch/1", &[], b""),
        (503, over, n, M::GET, "/v1/export", &[], b""),
        (503, over, n, M::POST, "/v1/import", &[], b""),
        (503, over, n, M::GET, "/v1/cluster", &[], b""),
        (503, over, n, M::GET, "/metrics", &[], b""),
        (503, over, n, M::GET, "/", &[], b""),
        (503, over, n, M::GET, "/openapi.json", &[], b""),
        (503, over, n, M::POST, "/ofrep/v1/evaluate/flags/k1", &[], b""),
        (503, over, n, M::POST, "/ofrep/v1/evaluate/flags", &[], b""),
        (503, over, n, M::GET, "/v1/schema/1", &[], b""),
        (503, over, n, M::PUT, "/v1/schema/1", &[], b"{}"),
        (503, over, n, M::DELETE, "/v1/schema/1", &[], b""),
        (200, "probes pass", n, M::GET, "/healthz", &[], b""),
        (200, "probes pass", n, M::GET, "/readyz", &[], b""),
    ];
    rec.run(cases).await;
    drop(stalled);
    rec.finish(held);
    wait_until("the slot is free again", Duration::from_secs(10), || {
        let probe = &probe;
        async move {
            let response = probe
                .start(n, &M::GET, "/v1/cache/1", &[], &Bytes::new())
                .await;
            response.status() == StatusCode::OK
        }
    })
    .await;

    // Shutting down: not ready, still serving for the shutdown delay.
    let node = cluster.slots[0].node.take().expect("running");
    let stopping = tokio::spawn(node.shutdown());
    wait_until("not ready", Duration::from_secs(5), || {
        let probe = &probe;
        async move {
            let response = probe.start(n, &M::GET, "/readyz", &[], &Bytes::new()).await;
            response.status() == StatusCode::SERVICE_UNAVAILABLE
        }
    })
    .await;
    let not_ready = rec
        .expect(503, "shutting down", n, M::GET, "/readyz", &[], "")
        .await;
    assert_eq!(not_ready.json()["error"], "not_ready");
    stopping.await.expect("shutdown");
    let _ = std::fs::remove_dir_all(dir);
}

/// A node with tokens and private metrics: 401 without a valid token,
/// 403 for a read token that writes, the open endpoints open.
async fn token_node(rec: &mut Recorder) {
    let dir = scratch_dir("tokens");
    let file = dir.join("tokens");
    std::fs::write(
        &file,
        format!("write:{WRITE} name=flags-team\nread:{READ}\nread:{SCOPED} name=dash types=5\n"),
    )
    .expect("token file");
    let path = file.clone();
    let cluster = Cluster::start_with(1, move |c| {
        c.auth_token_file = Some(path.clone());
        c.public_metrics = false;
        c.ofrep_type = Some(1);
    })
    .await;
    let n: &str = &cluster.slots[0].http.to_string();
    use Method as M;
    let read_auth = format!("Bearer {READ}");
    let write_auth = format!("Bearer {WRITE}");
    let reader = [("authorization", read_auth.as_str())];
    let writer = [("authorization", write_auth.as_str())];
    let wrong = [("authorization", "Bearer not-a-token-of-this-node")];
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (200, "a write token writes", n, M::PUT, "/v1/cache/1/k", &writer, b"v"),
        (200, "a read token reads", n, M::GET, "/v1/cache/1/k", &reader, b""),
        (401, "a wrong token", n, M::GET, "/v1/cache/1/k", &wrong, b""),
    ];
    let answers = rec.run(cases).await;
    let written = answers.get("a write token writes");
    assert_eq!(written.json()["author"], "flags-team", "the token's name");
    let guarded = [
        (M::GET, "/v1/cache/1/k", ""),
        (M::HEAD, "/v1/cache/1/k", ""),
        (M::PUT, "/v1/cache/1/k", "v"),
        (M::DELETE, "/v1/cache/1/k", ""),
        (M::GET, "/v1/cache/1/k/history", ""),
        (
            M::POST,
            "/v1/cache/1/k/rollback?version=1.0@0000000000000001",
            "",
        ),
        (M::GET, "/v1/cache/1", ""),
        (M::POST, "/v1/cache/1", r#"{"k":"v"}"#),
        (M::GET, "/v1/watch/1", ""),
        (M::GET, "/v1/export", ""),
        (M::POST, "/v1/import", ""),
        (M::GET, "/v1/cluster", ""),
        (M::GET, "/metrics", ""),
        (M::GET, "/v1/schema/1", ""),
        (M::PUT, "/v1/schema/1", "{}"),
        (M::DELETE, "/v1/schema/1", ""),
    ];
    // A token limited to type 5: every read of type 1 is refused, with
    // forbidden_type in the body (HEAD has none).
    let scoped_auth = format!("Bearer {SCOPED}");
    let scoped = [
        ("authorization", scoped_auth.as_str()),
        ("content-type", "application/json"),
    ];
    let other = "a token of other types";
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (403, other, n, M::GET, "/v1/cache/1/k", &scoped, b""),
        (403, other, n, M::HEAD, "/v1/cache/1/k", &scoped, b""),
        (403, other, n, M::GET, "/v1/cache/1/k/history", &scoped, b""),
        (403, other, n, M::GET, "/v1/cache/1", &scoped, b""),
        (403, other, n, M::GET, "/v1/watch/1", &scoped, b""),
        (403, other, n, M::GET, "/v1/export?type=1", &scoped, b""),
        (403, other, n, M::GET, "/v1/export", &scoped, b""),
        (403, other, n, M::GET, "/v1/schema/1", &scoped, b""),
        (403, other, n, M::POST, "/ofrep/v1/evaluate/flags/k", &scoped, b"{}"),
        (403, other, n, M::POST, "/ofrep/v1/evaluate/flags", &scoped, b"{}"),
    ];
    let answers = rec.run(cases).await;
    for ((_, _, _, method, path, ..), (_, answer)) in cases.iter().zip(&answers.0) {
        if *method != M::HEAD {
            assert_eq!(answer.json()["error"], "forbidden_type", "{path}");
        }
    }
    // Each guarded request without a token; each write with a read token.
    for (method, path, body) in guarded {
        let writes = !matches!(method, M::GET | M::HEAD);
        rec.expect(401, "no token", n, method.clone(), path, &[], body)
            .await;
        if writes {
            rec.expect(403, "a read token writes", n, method, path, &reader, body)
                .await;
        }
    }
    let json_type = ("content-type", "application/json");
    let read_json = [reader[0], json_type];
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (200, "open without a token", n, M::GET, "/healthz", &[], b""),
        (200, "open without a token", n, M::GET, "/readyz", &[], b""),
        (200, "open without a token", n, M::GET, "/", &[], b""),
        (200, "open without a token", n, M::GET, "/openapi.json", &[], b""),
        (401, "OFREP without a token", n, M::POST, "/ofrep/v1/evaluate/flags/k", &[json_type], b"{}"),
        (200, "OFREP with a read token", n, M::POST, "/ofrep/v1/evaluate/flags/k", &read_json, b"{}"),
        (401, "OFREP without a token", n, M::POST, "/ofrep/v1/evaluate/flags", &[json_type], b"{}"),
        (200, "OFREP with a read token", n, M::POST, "/ofrep/v1/evaluate/flags", &read_json, b"{}"),
        (405, "an open path, another method", n, M::POST, "/openapi.json", &[], b""),
    ];
    rec.run(cases).await;
    cluster.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Two nodes serving OFREP from type 3: every kind of flag, one and all,
/// `ETag` and 304, and each OFREP error.
async fn ofrep_pair(rec: &mut Recorder) {
    let cluster = Cluster::start_with(2, |c| c.ofrep_type = Some(3)).await;
    let n0: &str = &cluster.slots[0].http.to_string();
    let n1: &str = &cluster.slots[1].http.to_string();
    use Method as M;
    let flags = r#"{"on":"true","text":"hello","n":"2.5","obj":"{\"a\":1}","dir/x":"slash",
        "def":"{\"state\":\"ENABLED\",\"variants\":{\"a\":1,\"b\":2},\"defaultVariant\":\"b\",\"targeting\":{\"if\":[true,\"a\"]},\"metadata\":{\"team\":\"web\"}}",
        "off":"{\"state\":\"DISABLED\",\"variants\":{\"a\":1},\"defaultVariant\":\"a\"}",
        "bad":"{\"state\":\"ON\",\"variants\":{}}"}"#;
    let json = [("content-type", "application/json")];
    let ctx = r#"{"context":{"targetingKey":"user-1","plan":"pro"}}"#.as_bytes();
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (200, "the flags", n0, M::POST, "/v1/cache/3?wait=all", &json, flags.as_bytes()),
        (200, "OFREP flag", n1, M::POST, "/ofrep/v1/evaluate/flags/on", &json, ctx),
        (200, "OFREP flag", n1, M::POST, "/ofrep/v1/evaluate/flags/text", &json, ctx),
        (200, "OFREP flag", n1, M::POST, "/ofrep/v1/evaluate/flags/n", &json, ctx),
        (200, "OFREP flag", n1, M::POST, "/ofrep/v1/evaluate/flags/obj", &json, ctx),
        (200, "OFREP flag", n1, M::POST, "/ofrep/v1/evaluate/flags/dir%2Fx", &json, ctx),
        (200, "OFREP flag", n1, M::POST, "/ofrep/v1/evaluate/flags/def", &json, ctx),
        (200, "OFREP flag", n1, M::POST, "/ofrep/v1/evaluate/flags/off", &json, ctx),
        (200, "OFREP, no body", n1, M::POST, "/ofrep/v1/evaluate/flags/on", &[], b""),
        (404, "OFREP, no such flag", n1, M::POST, "/ofrep/v1/evaluate/flags/nope", &json, ctx),
        (400, "OFREP, malformed definition", n0, M::POST, "/ofrep/v1/evaluate/flags/bad", &json, ctx),
        (400, "OFREP, not JSON", n0, M::POST, "/ofrep/v1/evaluate/flags/on", &json, b"{"),
        (400, "OFREP, context not an object", n0, M::POST, "/ofrep/v1/evaluate/flags/on", &json, br#"{"context":[]}"#),
        (400, "OFREP, empty key", n0, M::POST, "/ofrep/v1/evaluate/flags/", &json, ctx),
        (400, "OFREP, key not UTF-8", n0, M::POST, "/ofrep/v1/evaluate/flags/%FF", &json, ctx),
        (400, "OFREP bulk, not JSON", n0, M::POST, "/ofrep/v1/evaluate/flags", &json, b"{"),
        (400, "OFREP bulk, bad targetingKey", n0, M::POST, "/ofrep/v1/evaluate/flags", &json, br#"{"context":{"targetingKey":1}}"#),
        (200, "OFREP bulk", n0, M::POST, "/ofrep/v1/evaluate/flags", &json, ctx),
    ];
    let answers = rec.run(cases).await;
    let missing = answers.get("OFREP, no such flag");
    assert_eq!(missing.json()["errorCode"], "FLAG_NOT_FOUND");
    let bulk = answers.get("OFREP bulk");
    assert_eq!(
        bulk.json()["flags"].as_array().map(Vec::len),
        Some(8),
        "{}",
        bulk.body
    );
    // The tag of this flag set (the same on both replicas: wait=all above).
    let tag = {
        let response = rec
            .start(
                n0,
                &M::POST,
                "/ofrep/v1/evaluate/flags",
                &json,
                &Bytes::from_static(ctx),
            )
            .await;
        response.headers()["etag"]
            .to_str()
            .expect("ETag")
            .to_owned()
    };
    let unchanged = [json[0], ("if-none-match", tag.as_str())];
    let stale = [json[0], ("if-none-match", "\"0123\"")];
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (304, "OFREP bulk, unchanged", n1, M::POST, "/ofrep/v1/evaluate/flags", &unchanged, ctx),
        (200, "OFREP bulk, changed", n1, M::POST, "/ofrep/v1/evaluate/flags", &stale, ctx),
        (405, "OFREP, GET", n0, M::GET, "/ofrep/v1/evaluate/flags/on", &[], b""),
        (405, "OFREP bulk, GET", n0, M::GET, "/ofrep/v1/evaluate/flags", &[], b""),
    ];
    rec.run(cases).await;
    cluster.shutdown().await;
}

/// A copy of the document broken in four ways the check must report:
/// a schema that no longer fits the answers, an operation removed (its
/// answers now look undocumented), one added that the code does not
/// have, and a parameter the requests send left out.
fn broken(doc: &Value) -> Value {
    let mut doc = doc.clone();
    doc["components"]["schemas"]["Version"] = json!({"type": "integer"});
    doc["paths"]
        .as_object_mut()
        .expect("paths")
        .remove("/v1/export");
    doc["paths"]["/v1/cluster"]["delete"] = json!({
        "operationId": "deleteCluster",
        "security": [],
        "responses": {"200": {"description": "never"}},
    });
    let watch = doc["paths"]["/v1/watch/{type}"]["get"]["parameters"]
        .as_array_mut()
        .expect("watch parameters");
    watch.retain(|p| p["name"] != "key");
    doc
}

#[tokio::test]
async fn the_openapi_document_matches_every_answer_and_every_answer_is_in_it() {
    let python = venv_python();
    let mut rec = Recorder::new();
    plain_pair(&mut rec).await;
    small_node(&mut rec).await;
    token_node(&mut rec).await;
    ofrep_pair(&mut rec).await;

    let dir = scratch_dir("check");
    let answers = dir.join("answers.json");
    std::fs::write(
        &answers,
        serde_json::to_vec_pretty(&rec.answers).expect("json"),
    )
    .expect("write answers");
    let doc_path = root().join("src/api/openapi.json");
    let (ok, report) = check(&python, &doc_path, &answers);
    println!("{report}");
    assert!(
        ok,
        "src/api/openapi.json disagrees with the answers (kept in {}):\n{report}",
        answers.display()
    );

    // The check can fail: a broken copy is refused, naming each break.
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&doc_path).expect("doc")).expect("JSON");
    let broken_path = dir.join("broken.json");
    std::fs::write(
        &broken_path,
        serde_json::to_vec_pretty(&broken(&doc)).expect("json"),
    )
    .expect("write");
    let (ok, report) = check(&python, &broken_path, &answers);
    assert!(!ok, "a broken document passed:\n{report}");
    for expected in [
        "is not of type 'integer'",
        "UnknownPath (no such path in the document) answers 404",
        "DELETE /v1/cluster is documented but was never exercised",
        "the request's query parameter 'key' is not declared for GET /v1/watch/{type}",
    ] {
        assert!(
            report.contains(expected),
            "the broken document's report lacks {expected:?}:\n{report}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
