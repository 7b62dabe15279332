//! OpenFeature's remote evaluation protocol (OFREP) over real nodes:
//! the HTTP answers (statuses, bodies, error codes, the bulk `ETag` and
//! 304, tokens), the paths being absent without `--ofrep-type`, and the
//! OpenFeature Python SDK with its OFREP provider (from PyPI, in the venv
//! `scripts/test` creates) reading flags from a three-node cluster
//! (`tests/interop/ofrep_sdk.py`).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use common::{Cluster, wait_until};
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

const TYPE: i32 = 2;
const WRITE: &str = "write-token-ofrep-0123456789";
const READ: &str = "read-token-ofrep-0123456789";

/// One answer: status, headers, body text.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    fn etag(&self) -> String {
        self.headers
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no ETag: {:?}", self.headers))
            .to_owned()
    }
}

async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::builder()
        .method(method.clone())
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body.into())).expect("request");
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn token_file() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "podcache-ofrep-{}-{}",
        std::process::id(),
        common::next_block()
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let file = dir.join("tokens");
    std::fs::write(&file, format!("write:{WRITE}\nread:{READ}\n")).expect("token file");
    file
}

/// `n` nodes serving OFREP from [`TYPE`], with tokens.
async fn flag_cluster(n: usize) -> Cluster {
    let tokens = token_file();
    Cluster::start_with(n, move |c| {
        c.ofrep_type = Some(TYPE);
        c.auth_token_file = Some(tokens.clone());
    })
    .await
}

/// The flags every test starts from, written on node 0 and waited for
/// everywhere.
async fn write_flags(cluster: &Cluster) {
    let writer = cluster.client(0).with_token(WRITE).expect("token");
    let flags = [
        ("dark-mode", "true"),
        ("banner", "hello"),
        ("max-items", "25"),
        ("ratio", "0.75"),
        ("theme", r#"{"colour":"blue","sizes":[1,2]}"#),
        (
            "checkout",
            r#"{"state":"ENABLED","variants":{"old":"old","new":"new"},"defaultVariant":"new",
                "targeting":{"if":[{"==":[{"var":"plan"},"free"]},"old"]}}"#,
        ),
        (
            "kill-switch",
            r#"{"state":"DISABLED","variants":{"on":true,"off":false},"defaultVariant":"off"}"#,
        ),
    ];
    for (key, value) in flags {
        let answer = writer
            .put(TYPE, key, value, "")
            .await
            .expect("write a flag");
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    for (key, value) in flags {
        wait_everywhere_with_token(cluster, key, value).await;
    }
}

async fn wait_everywhere_with_token(cluster: &Cluster, key: &str, value: &str) {
    for i in cluster.running() {
        let client = cluster.client(i).with_token(READ).expect("token");
        wait_until(
            &format!("node {i} holds {key}"),
            Duration::from_secs(10),
            || {
                let client = client.clone();
                async move { client.get_value(TYPE, key).await.ok().flatten().as_deref() == Some(value) }
            },
        )
        .await;
    }
}

const FLAG: &str = "/ofrep/v1/evaluate/flags";

#[tokio::test]
async fn ofrep_answers_as_the_protocol_defines_them() {
    let cluster = flag_cluster(2).await;
    write_flags(&cluster).await;
    let (n0, n1) = (cluster.slots[0].http, cluster.slots[1].http);
    let auth = format!("Bearer {READ}");
    let read = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let ctx = r#"{"context":{"targetingKey":"user-1","plan":"free"}}"#;
    let one = |key: &str| format!("{FLAG}/{key}");

    // Each kind of value, read from the replica that did not take the writes.
    for (key, value) in [
        ("dark-mode", json!(true)),
        ("banner", json!("hello")),
        ("max-items", json!(25)),
        ("ratio", json!(0.75)),
        ("theme", json!({"colour": "blue", "sizes": [1, 2]})),
    ] {
        let answer = call(n1, Method::POST, &one(key), &read, ctx).await;
        assert_eq!(answer.status, StatusCode::OK, "{key}: {}", answer.body);
        let body = answer.json();
        assert_eq!(body["key"], key);
        assert_eq!(body["value"], value, "{key}");
        assert_eq!(body["reason"], "STATIC");
        let version = cluster
            .client(1)
            .with_token(READ)
            .expect("token")
            .get(&format!("/v1/cache/{TYPE}/{key}"))
            .await
            .expect("get")
            .json()["version"]
            .clone();
        assert_eq!(
            body["variant"], version,
            "the variant is the entry's version"
        );
    }
    // A flagd definition: its default variant, targeting not evaluated
    // (this context would have matched the rule) and said so.
    let checkout = call(n1, Method::POST, &one("checkout"), &read, ctx).await;
    assert_eq!(checkout.status, StatusCode::OK, "{}", checkout.body);
    assert_eq!(
        checkout.json(),
        json!({"key": "checkout", "value": "new", "variant": "new", "reason": "DEFAULT",
               "metadata": {"targetingIgnored": true}})
    );
    // Disabled: no value and no variant (the caller's code default), as flagd.
    let disabled = call(n0, Method::POST, &one("kill-switch"), &read, ctx).await;
    assert_eq!(disabled.status, StatusCode::OK, "{}", disabled.body);
    assert_eq!(
        disabled.json(),
        json!({"key": "kill-switch", "reason": "DISABLED", "metadata": {}})
    );
    // Without a body, or with `{}`, there is no context: fine for static flags.
    for body in ["", "{}"] {
        let answer = call(n0, Method::POST, &one("banner"), &read, body).await;
        assert_eq!(answer.status, StatusCode::OK, "{body:?}: {}", answer.body);
    }

    // Errors: OFREP's shape, with podcache's `error` and `message` too.
    let missing = call(n0, Method::POST, &one("no-such-flag"), &read, ctx).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND, "{}", missing.body);
    let body = missing.json();
    assert_eq!(body["key"], "no-such-flag");
    assert_eq!(body["errorCode"], "FLAG_NOT_FOUND");
    assert!(body["errorDetails"].as_str().is_some_and(|d| !d.is_empty()));
    assert_eq!(body["error"], "flag_not_found");
    for (what, body, code) in [
        ("not JSON", "{", "PARSE_ERROR"),
        ("an array", "[]", "INVALID_CONTEXT"),
        (
            "context not an object",
            r#"{"context":"user-1"}"#,
            "INVALID_CONTEXT",
        ),
        (
            "targetingKey not a string",
            r#"{"context":{"targetingKey":1}}"#,
            "INVALID_CONTEXT",
        ),
    ] {
        for path in [one("banner"), FLAG.to_owned()] {
            let answer = call(n0, Method::POST, &path, &read, body).await;
            assert_eq!(
                answer.status,
                StatusCode::BAD_REQUEST,
                "{what}: {}",
                answer.body
            );
            assert_eq!(answer.json()["errorCode"], code, "{what} {path}");
        }
    }
    let big = format!(r#"{{"context":{{"x":"{}"}}}}"#, "x".repeat(70 * 1024));
    let too_big = call(n0, Method::POST, &one("banner"), &read, big).await;
    assert_eq!(
        too_big.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        too_big.body
    );
    assert_eq!(too_big.json()["errorCode"], "GENERAL");
    let empty = call(n0, Method::POST, &format!("{FLAG}/"), &read, ctx).await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST, "{}", empty.body);
    let long = call(n0, Method::POST, &one(&"k".repeat(1025)), &read, ctx).await;
    assert_eq!(long.status, StatusCode::BAD_REQUEST, "{}", long.body);
    let not_utf8 = call(n0, Method::POST, &one("%FF%FE"), &read, ctx).await;
    assert_eq!(
        not_utf8.status,
        StatusCode::BAD_REQUEST,
        "{}",
        not_utf8.body
    );
    // A malformed flagd definition is the flag's parse error.
    let writer = cluster.client(0).with_token(WRITE).expect("token");
    writer
        .put(TYPE, "broken", r#"{"state":"ON","variants":{}}"#, "")
        .await
        .expect("write");
    let broken = call(n0, Method::POST, &one("broken"), &read, ctx).await;
    assert_eq!(broken.status, StatusCode::BAD_REQUEST, "{}", broken.body);
    assert_eq!(broken.json()["errorCode"], "PARSE_ERROR");
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        let answer = call(n0, method.clone(), &one("banner"), &read, "").await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
    }
    // A key with a slash in it, as sent encoded or not.
    writer.put(TYPE, "a/b", "slash", "").await.expect("write");
    for path in [one("a/b"), one("a%2Fb")] {
        let answer = call(n0, Method::POST, &path, &read, ctx).await;
        assert_eq!(answer.json()["value"], "slash", "{path}: {}", answer.body);
    }

    // Tokens: evaluating needs a read token, like a GET.
    let no_token = call(n0, Method::POST, &one("banner"), &[], ctx).await;
    assert_eq!(
        no_token.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        no_token.body
    );
    let wrong = [("authorization", "Bearer not-a-token-of-this-node")];
    for path in [one("banner"), FLAG.to_owned()] {
        let answer = call(n0, Method::POST, &path, &wrong, ctx).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let write_auth = format!("Bearer {WRITE}");
    let writer_headers = [("authorization", write_auth.as_str())];
    let answer = call(n0, Method::POST, &one("banner"), &writer_headers, ctx).await;
    assert_eq!(answer.status, StatusCode::OK, "a write token reads too");

    // Bulk: every flag, failures inline, an ETag; 304 for it.
    let bulk = call(n0, Method::POST, FLAG, &read, ctx).await;
    assert_eq!(bulk.status, StatusCode::OK, "{}", bulk.body);
    let flags = bulk.json()["flags"].as_array().cloned().expect("flags");
    let keys: Vec<&str> = flags.iter().filter_map(|f| f["key"].as_str()).collect();
    assert_eq!(
        keys,
        [
            "a/b",
            "banner",
            "broken",
            "checkout",
            "dark-mode",
            "kill-switch",
            "max-items",
            "ratio",
            "theme"
        ]
    );
    assert_eq!(flags[2]["errorCode"], "PARSE_ERROR");
    assert_eq!(flags[4]["value"], true);
    assert_eq!(flags[5]["reason"], "DISABLED");
    let tag = bulk.etag();
    let with_tag = [
        ("authorization", auth.as_str()),
        ("if-none-match", tag.as_str()),
    ];
    let same = call(n0, Method::POST, FLAG, &with_tag, ctx).await;
    assert_eq!(same.status, StatusCode::NOT_MODIFIED, "{}", same.body);
    assert!(same.body.is_empty(), "a 304 has no body");
    assert_eq!(same.etag(), tag);
    let other = call(
        n0,
        Method::POST,
        FLAG,
        &[read[0], ("if-none-match", "\"other\", W/\"x\"")],
        ctx,
    )
    .await;
    assert_eq!(other.status, StatusCode::OK, "another tag");
    // The other replica holds the same versions: the same tag, once the
    // writes above reached it.
    wait_until(
        "node 1 has the same flag set",
        Duration::from_secs(10),
        || async {
            call(n1, Method::POST, FLAG, &with_tag, ctx).await.status == StatusCode::NOT_MODIFIED
        },
    )
    .await;
    // A write anywhere changes it.
    cluster
        .client(1)
        .with_token(WRITE)
        .expect("token")
        .put(TYPE, "banner", "bye", "")
        .await
        .expect("write");
    wait_until("node 0 sees the write", Duration::from_secs(10), || async {
        let answer = call(n0, Method::POST, FLAG, &with_tag, ctx).await;
        answer.status == StatusCode::OK && answer.etag() != tag
    })
    .await;
    // A deleted flag, and an expired one, are not found.
    writer.delete(TYPE, "banner", "").await.expect("delete");
    let gone = call(n0, Method::POST, &one("banner"), &read, ctx).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND, "deleted: {}", gone.body);
    writer
        .put(TYPE, "brief", "true", "ttl=1")
        .await
        .expect("write with ttl");
    let brief = call(n0, Method::POST, &one("brief"), &read, ctx).await;
    assert_eq!(brief.status, StatusCode::OK, "{}", brief.body);
    wait_until("the flag expires", Duration::from_secs(5), || async {
        call(n0, Method::POST, &one("brief"), &read, ctx)
            .await
            .status
            == StatusCode::NOT_FOUND
    })
    .await;
    let after = call(n0, Method::POST, FLAG, &read, ctx).await;
    let keys: Vec<Value> = after.json()["flags"]
        .as_array()
        .expect("flags")
        .iter()
        .map(|f| f["key"].clone())
        .collect();
    assert!(
        !keys.contains(&json!("banner")) && !keys.contains(&json!("brief")),
        "{keys:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn without_ofrep_type_the_paths_do_not_exist() {
    let cluster = Cluster::start(1).await;
    let n = cluster.slots[0].http;
    cluster
        .client(0)
        .put(TYPE, "banner", "hello", "")
        .await
        .expect("write");
    for path in [FLAG.to_owned(), format!("{FLAG}/banner")] {
        let answer = call(n, Method::POST, &path, &[], "{}").await;
        assert_eq!(
            answer.status,
            StatusCode::NOT_FOUND,
            "{path}: {}",
            answer.body
        );
        assert_eq!(answer.json()["error"], "not_found", "{path}");
    }
    cluster.shutdown().await;
}

fn python() -> PathBuf {
    common::venv_python("openfeature-sdk and openfeature-provider-ofrep")
}

#[tokio::test]
async fn the_openfeature_python_sdk_reads_flags_from_three_replicas() {
    let python = python();
    let probe = tokio::process::Command::new(&python)
        .args(["-c", "import openfeature.contrib.provider.ofrep"])
        .output()
        .await
        .expect("python runs");
    assert!(
        probe.status.success(),
        ".venv-interop lacks the OpenFeature SDK or its OFREP provider: run \
         `.venv-interop/bin/pip install -r tests/interop/requirements.txt`\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let cluster = flag_cluster(3).await;
    write_flags(&cluster).await;
    let config = json!({
        "nodes": cluster.slots.iter().map(|s| format!("http://{}", s.http)).collect::<Vec<_>>(),
        "type": TYPE,
        "read_token": READ,
        "write_token": WRITE,
    });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/ofrep_sdk.py");
    let run = tokio::process::Command::new(&python)
        .arg(script)
        .arg(config.to_string())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the SDK script ends in time")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.lines().any(|l| l.starts_with("OK ")),
        "the SDK script failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    cluster.shutdown().await;
}
