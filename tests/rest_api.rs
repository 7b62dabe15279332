//! The REST API's contract: shapes, errors as JSON, bad input refused with
//! nothing changed, watch streams, health, readiness and metrics.

mod common;

use std::time::Duration;

use common::{Cluster, wait_until};
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use podcache::client::{Answer, RestClient};
use serde_json::{Value, json};

async fn state_of(client: &RestClient, ty: i32) -> Value {
    client
        .get(&format!("/v1/cache/{ty}"))
        .await
        .expect("list")
        .json()["entries"]
        .clone()
}

#[track_caller]
fn assert_error(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| m.len() > 5),
        "a human sentence: {body}"
    );
    assert!(
        answer
            .content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("application/json"))
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_json_error_and_changes_nothing() {
    let cluster = Cluster::start_with(2, |c| {
        c.max_body_bytes = 4096;
        c.limits.max_key_bytes = 64;
        c.limits.max_value_bytes = 1024;
        c.limits.max_batch_entries = 3;
    })
    .await;
    let client = cluster.client(0);
    client
        .put(1, "keep", "original", "wait=all")
        .await
        .expect("seed");
    let before = (
        state_of(&client, 1).await,
        state_of(&cluster.client(1), 1).await,
    );
    assert_eq!(before.0, json!({"keep": "original"}));

    let long_key = "k".repeat(65);
    let cases: Vec<(Method, String, Vec<u8>, StatusCode, &str)> = vec![
        (
            Method::PUT,
            "/v1/cache/abc/keep".into(),
            b"x".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_type",
        ),
        (
            Method::PUT,
            "/v1/cache/99999999999/keep".into(),
            b"x".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_type",
        ),
        (
            Method::GET,
            "/v1/cache/1.5".into(),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_type",
        ),
        (
            Method::PUT,
            "/v1/cache/1/".into(),
            b"x".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_key",
        ),
        (
            Method::PUT,
            format!("/v1/cache/1/{long_key}"),
            b"x".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_key",
        ),
        (
            Method::PUT,
            "/v1/cache/1/keep".into(),
            vec![b'v'; 4097],
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            Method::PUT,
            "/v1/cache/1/keep".into(),
            vec![b'v'; 1025],
            StatusCode::PAYLOAD_TOO_LARGE,
            "value_too_large",
        ),
        (
            Method::PUT,
            "/v1/cache/1/keep".into(),
            vec![0xff, 0xfe, b'x'],
            StatusCode::BAD_REQUEST,
            "invalid_utf8",
        ),
        (
            Method::PUT,
            "/v1/cache/1/%FF%FE".into(),
            b"x".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            Method::PUT,
            "/v1/cache/1/keep?ttl=soon".into(),
            b"x".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            Method::PUT,
            "/v1/cache/1/keep?ttl=0".into(),
            b"x".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_ttl",
        ),
        (
            Method::PUT,
            "/v1/cache/1/keep?wait=some".into(),
            b"x".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            Method::POST,
            "/v1/cache/1".into(),
            b"{\"keep\": \"x\",".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::POST,
            "/v1/cache/1".into(),
            b"[\"keep\"]".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::POST,
            "/v1/cache/1".into(),
            b"{\"keep\": 5}".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::POST,
            "/v1/cache/1".into(),
            b"{\"keep\": \"x\", \"\": \"y\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_key",
        ),
        (
            Method::POST,
            "/v1/cache/1".into(),
            b"{}".to_vec(),
            StatusCode::BAD_REQUEST,
            "empty_batch",
        ),
        (
            Method::POST,
            "/v1/cache/1".into(),
            br#"{"a":"1","b":"2","c":"3","keep":"4"}"#.to_vec(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
        ),
        (
            Method::DELETE,
            "/v1/cache/1/keep?ttl=5".into(),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            Method::GET,
            "/v1/cache/1/absent".into(),
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::DELETE,
            "/v1/cache/1/absent".into(),
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/v2/nothing".into(),
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::PATCH,
            "/v1/cache/1/keep".into(),
            b"x".to_vec(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Method::DELETE,
            "/v1/cache/abc/keep".into(),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_type",
        ),
        (
            Method::GET,
            "/v1/cache/1/%FF%FE".into(),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        // A `%` without two hex digits after it stays as it is: a key
        // that does not exist.
        (
            Method::GET,
            "/v1/cache/1/keep%2".into(),
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let answer = client
            .request(method.clone(), &path, body)
            .await
            .expect("answer");
        assert_eq!(answer.status, status, "{method} {path}: {}", answer.text());
        assert_error(&answer, status, code);
    }
    // The node is fine and nothing changed, here or on the peer.
    assert_eq!(
        client.get("/healthz").await.expect("health").status,
        StatusCode::OK
    );
    client
        .put(1, "marker", "m", "wait=all")
        .await
        .expect("marker");
    let mut after0 = state_of(&client, 1).await;
    let mut after1 = state_of(&cluster.client(1), 1).await;
    for after in [&mut after0, &mut after1] {
        after.as_object_mut().expect("object").remove("marker");
    }
    assert_eq!(after0, before.0);
    assert_eq!(after1, before.1);
    cluster.shutdown().await;
}

#[tokio::test]
async fn answers_have_the_contract_shapes() {
    let cluster = Cluster::start(1).await;
    let client = cluster.client(0);
    let put = client
        .put(-3, "ünï/cødé key", "välue ✓", "")
        .await
        .expect("put");
    assert_eq!(put.status, StatusCode::OK);
    let put = put.json();
    let get = client
        .get("/v1/cache/-3/%C3%BCn%C3%AF%2Fc%C3%B8d%C3%A9%20key")
        .await
        .expect("get")
        .json();
    assert_eq!(get, put, "GET answers the same shape as PUT");
    // The type is percent-decoded too, and HEAD answers GET's status
    // without a body.
    let encoded_type = client
        .get("/v1/cache/%2D3/%C3%BCn%C3%AF%2Fc%C3%B8d%C3%A9%20key")
        .await
        .expect("get")
        .json();
    assert_eq!(encoded_type, put);
    let head = client
        .request(
            Method::HEAD,
            "/v1/cache/-3/%C3%BCn%C3%AF%2Fc%C3%B8d%C3%A9%20key",
            "",
        )
        .await
        .expect("head");
    assert_eq!((head.status, head.body.len()), (StatusCode::OK, 0));
    let head = client
        .request(Method::HEAD, "/v1/cache/-3/absent", "")
        .await
        .expect("head");
    assert_eq!(head.status, StatusCode::NOT_FOUND);
    assert_eq!(
        state_of(&client, -3).await,
        json!({"ünï/cødé key": "välue ✓"})
    );
    let empty = client.get("/v1/cache/12345").await.expect("list").json();
    assert_eq!(empty, json!({"type": 12345, "entries": {}}));
    let batch = client
        .request(Method::POST, "/v1/cache/2", r#"{"x":"1","y":"2"}"#)
        .await
        .expect("batch")
        .json();
    assert_eq!(batch["count"], 2);
    assert!(batch["versions"]["x"].is_string() && batch["versions"]["y"].is_string());
    cluster.shutdown().await;
}

/// `text` parsed by the Python prometheus_client parser of `format`
/// (`prometheus` or `openmetrics`, tests/interop/parse_metrics.py in the
/// venv scripts/test creates): the families as JSON.
fn parse_metrics(format: &str, text: &str) -> Value {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = common::venv_python("prometheus_client");
    use std::io::Write;
    let mut child = std::process::Command::new(python)
        .arg(root.join("tests/interop/parse_metrics.py"))
        .arg(format)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to python");
    let out = child.wait_with_output().expect("python runs");
    assert!(
        out.status.success(),
        "the {format} parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from the parser")
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let cluster = Cluster::start(2).await;
    let client = cluster.client(0);
    let health = client.get("/healthz").await.expect("healthz");
    assert_eq!(health.status, StatusCode::OK);
    let ready = client.get("/readyz").await.expect("readyz");
    assert_eq!(ready.status, StatusCode::OK);
    client.put(1, "a", "b", "wait=all").await.expect("put");
    // The classic Prometheus text format by default.
    let metrics = client.get("/metrics").await.expect("metrics");
    assert_eq!(metrics.status, StatusCode::OK);
    assert_eq!(
        metrics.content_type.as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = metrics.text();
    for needle in [
        "# HELP podcache_requests_total Cache operations served",
        "# TYPE podcache_requests_total counter",
        "podcache_requests_total{op=\"set\"} 1",
        "podcache_entries{type=\"1\"} 1",
        "podcache_ready 1",
        "podcache_peers 1",
        "podcache_replication_batches_sent_total{peer=",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(
        !text.contains("# EOF") && !text.contains("# UNIT"),
        "{text}"
    );
    let classic = parse_metrics("prometheus", &text);
    assert_eq!(classic["podcache_requests"]["type"], "counter", "{classic}");
    assert!(
        classic["podcache_requests"]["samples"]
            .as_array()
            .is_some_and(
                |samples| samples.iter().any(|s| s[0] == "podcache_requests_total"
                    && s[1] == json!({"op": "set"})
                    && s[2].as_f64() == Some(1.0))
            ),
        "{classic}"
    );
    // OpenMetrics when the scraper asks for it, as Prometheus does.
    let accept =
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    let open = client
        .request_with_headers(Method::GET, "/metrics", "", &[("accept", accept)])
        .await
        .expect("metrics");
    assert_eq!(
        open.content_type.as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let open = open.text();
    for needle in [
        "# HELP podcache_requests Cache operations served",
        "# TYPE podcache_requests counter",
        "podcache_requests_total{op=\"set\"} 1",
        "# EOF",
    ] {
        assert!(open.contains(needle), "missing {needle:?} in:\n{open}");
    }
    let parsed = parse_metrics("openmetrics", &open);
    for family in [
        "podcache_requests",
        "podcache_ready",
        "podcache_replication_lag_seconds",
    ] {
        assert_eq!(
            parsed[family]["type"], classic[family]["type"],
            "{family} the same in both formats"
        );
    }
    let peer_metrics = cluster
        .client(1)
        .get("/metrics")
        .await
        .expect("metrics")
        .text();
    assert!(
        peer_metrics.contains("podcache_remote_applied_entries_total{source=\"replicate\"} 1"),
        "{peer_metrics}"
    );
    assert!(
        peer_metrics.contains("podcache_replication_lag_seconds_count 1"),
        "the write's lag was measured on the peer: {peer_metrics}"
    );
    cluster.shutdown().await;
}

/// Reads SSE frames from a streaming response until `want` lines with
/// `data:` are collected or the deadline passes.
async fn read_events(
    body: &mut hyper::body::Incoming,
    want: usize,
    timeout: Duration,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buffer = String::new();
    let mut events = Vec::new();
    while events.len() < want {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("events before the deadline")
            .expect("stream open")
            .expect("frame");
        if let Some(data) = frame.data_ref() {
            buffer.push_str(&String::from_utf8_lossy(data));
        }
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            for line in block.lines() {
                if let Some(data) = line
                    .strip_prefix("data: ")
                    .or_else(|| line.strip_prefix("data:"))
                {
                    events.push(serde_json::from_str(data).expect("event JSON"));
                }
            }
        }
    }
    events
}

#[tokio::test]
async fn watch_streams_changes_from_any_replica() {
    let cluster = Cluster::start(2).await;
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let raw = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Empty<bytes::Bytes>>(connector);
    let uri = format!("http://{}/v1/watch/9", cluster.slots[1].http);
    let response = raw.get(uri.parse().expect("uri")).await.expect("watch");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()[hyper::header::CONTENT_TYPE]
            .to_str()
            .is_ok_and(|c| c.starts_with("text/event-stream"))
    );
    let mut body = response.into_body();
    // The stream is subscribed once the response head arrived; writes now.
    cluster.client(0).put(9, "w", "1", "").await.expect("put");
    cluster
        .client(0)
        .put(10, "other-type", "x", "")
        .await
        .expect("put");
    cluster.client(1).put(9, "w", "2", "").await.expect("put");
    cluster.client(0).delete(9, "w", "").await.expect("delete");
    let events = read_events(&mut body, 3, Duration::from_secs(10)).await;
    assert_eq!(events[0]["key"], "w");
    assert_eq!(events[0]["value"], "1");
    assert_eq!(events[0]["origin"], "peer");
    assert_eq!(events[1]["value"], "2");
    assert_eq!(events[1]["origin"], "local");
    assert_eq!(events[2]["deleted"], true);
    assert!(
        events.iter().all(|e| e["type"] == 9),
        "other types filtered out"
    );

    let keyed = format!("http://{}/v1/watch/9?key=only", cluster.slots[0].http);
    let mut body = raw
        .get(keyed.parse().expect("uri"))
        .await
        .expect("watch")
        .into_body();
    cluster
        .client(1)
        .put(9, "not-this", "x", "")
        .await
        .expect("put");
    cluster
        .client(1)
        .put(9, "only", "yes", "")
        .await
        .expect("put");
    let events = read_events(&mut body, 1, Duration::from_secs(10)).await;
    assert_eq!(events[0]["key"], "only");
    cluster.shutdown().await;
}

#[tokio::test]
async fn cluster_view_names_every_member_and_the_oldest() {
    let cluster = Cluster::start(3).await;
    let client = cluster.client(2);
    wait_until(
        "every peer answered hello",
        Duration::from_secs(10),
        || async {
            let view = client.get("/v1/cluster").await.expect("cluster").json();
            view["peers"].as_array().is_some_and(|p| {
                p.len() == 2
                    && p.iter()
                        .all(|p| p["status"] == "up" && p["name"].is_string())
            })
        },
    )
    .await;
    let view = client.get("/v1/cluster").await.expect("cluster").json();
    assert_eq!(view["node"]["name"], "node-2");
    assert_eq!(view["node"]["ready"], true);
    assert_eq!(view["node"]["oldest"], false);
    assert_eq!(view["oldest"], Value::String(cluster.grpc_addr(0)));
    assert_eq!(view["discovery"]["source"], "static");
    assert_eq!(view["discovery"]["state"], "fresh");
    let names: Vec<&str> = view["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["node-0", "node-1"]);
    for peer in view["peers"].as_array().expect("peers") {
        assert!(peer["started_at_ms"].as_i64().is_some_and(|t| t > 0));
        assert!(peer["pod_ip"].as_str().is_some());
        assert_eq!(peer["pending_entries"], 0);
        assert_eq!(peer["released"], false);
    }
    cluster.shutdown().await;
}
