//! JSON Schemas per type over real nodes: a schema set on one replica
//! reaches the others and refuses bad writes there (PUT, batch, rollback,
//! the original `Sync/Set`) with 422 `schema_violation` naming the key,
//! the location in the value and the keyword; bad schemas are refused;
//! the reserved type is refused on every user-facing path; a schema
//! survives a restart from the data directory; a deleted schema lets the
//! write through.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Cluster, wait_until};
use hyper::{Method, StatusCode};
use podcache::client::{Answer, RestClient};
use podcache::proto::hellorpc::{SyncData, SyncRequest, sync_client::SyncClient};

const SCHEMA: &str = r#"{"$schema":"https://json-schema.org/draft/2020-12/schema",
  "type":"object","properties":{"on":{"type":"boolean"},"share":{"type":"number","maximum":1}},
  "required":["on"]}"#;

async fn send(client: &RestClient, method: Method, path: &str, body: &str) -> Answer {
    client
        .request(method.clone(), path, body.to_owned())
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

#[track_caller]
fn assert_violation(answer: &Answer, key: &str, location: &str, keyword: &str) {
    let body = answer.json();
    assert_eq!(
        answer.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{key}: {body}"
    );
    assert_eq!(body["error"], "schema_violation", "{body}");
    assert_eq!(
        (&body["key"], &body["location"], &body["keyword"]),
        (&key.into(), &location.into(), &keyword.into()),
        "{body}"
    );
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(key) && message.contains(keyword),
        "{message}"
    );
}

/// Waits until `client`'s replica holds a schema for `ty` (`true`) or none.
async fn wait_for_schema(client: &RestClient, ty: i32, present: bool) {
    let what = format!("schema of type {ty} present={present} on {}", client.base());
    wait_until(&what, Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            client
                .get(&format!("/v1/schema/{ty}"))
                .await
                .is_ok_and(|a| (a.status == StatusCode::OK) == present)
        }
    })
    .await;
}

#[tokio::test]
async fn a_schema_set_on_one_replica_refuses_bad_writes_on_another_until_deleted() {
    let cluster = Cluster::start_with(3, |c| c.max_schema_bytes = 1024).await;
    let (n0, n1, n2) = (cluster.client(0), cluster.client(1), cluster.client(2));
    // Written before the schema: kept as it is, never checked again.
    let before = n2.put(5, "old", "not json", "wait=all").await.expect("put");
    assert_eq!(before.status, StatusCode::OK);
    let old_version = before.json()["version"].as_str().expect("v").to_owned();

    // Bad schemas are refused with the reason; nothing is stored.
    for (body, status, code, reason) in [
        ("{", 400, "invalid_schema", "not JSON"),
        ("[]", 400, "invalid_schema", "JSON object"),
        (r#"{"type":"nope"}"#, 400, "invalid_schema", "draft 2020-12"),
        (
            r#"{"$schema":"http://json-schema.org/draft-07/schema#"}"#,
            400,
            "invalid_schema",
            "2020-12",
        ),
        (
            r#"{"$ref":"https://example.com/s.json"}"#,
            400,
            "invalid_schema",
            "remote references",
        ),
        (
            &format!(r#"{{"description":"{}"}}"#, "x".repeat(1100)),
            413,
            "schema_too_large",
            "--max-schema-bytes",
        ),
    ] {
        let answer = send(&n0, Method::PUT, "/v1/schema/5", body).await;
        assert_eq!(answer.status.as_u16(), status, "{}", answer.text());
        assert_eq!(answer.json()["error"], code, "{}", answer.text());
        let message = answer.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains(reason), "{message}");
    }
    assert_eq!(
        n0.get("/v1/schema/5").await.expect("get").status,
        StatusCode::NOT_FOUND
    );
    let none = send(&n0, Method::DELETE, "/v1/schema/5", "").await;
    assert_eq!(none.status, StatusCode::NOT_FOUND, "{}", none.text());

    // Set on node 0, enforced on node 2 once replicated.
    let set = send(&n0, Method::PUT, "/v1/schema/5", SCHEMA).await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.text());
    assert_eq!(set.json()["schema"]["required"][0], "on");
    assert_eq!(set.json()["author"], "anonymous");
    wait_for_schema(&n2, 5, true).await;
    let got = n2.get("/v1/schema/5").await.expect("get").json();
    assert_eq!(got["version"], set.json()["version"], "the same version");

    assert_violation(
        &n2.put(5, "k", r#"{"on":"yes"}"#, "").await.expect("put"),
        "k",
        "/on",
        "type",
    );
    assert_violation(
        &n2.put(5, "k", r#"{"on":true,"share":2}"#, "")
            .await
            .expect("put"),
        "k",
        "/share",
        "maximum",
    );
    assert_violation(
        &n2.put(5, "k", r#"{"share":0.5}"#, "").await.expect("put"),
        "k",
        "",
        "required",
    );
    assert_violation(
        &n2.put(5, "k", "on", "").await.expect("put"),
        "k",
        "",
        "json",
    );
    assert_eq!(
        n2.get_value(5, "k").await.expect("get"),
        None,
        "nothing written"
    );
    let good = n2
        .put(5, "k", r#"{"on":true,"share":0.5}"#, "")
        .await
        .expect("put");
    assert_eq!(good.status, StatusCode::OK, "{}", good.text());
    // Another type is not checked.
    assert_eq!(
        n2.put(6, "k", "on", "").await.expect("put").status,
        StatusCode::OK
    );

    // A batch: all or nothing, the failing key named.
    let batch = send(
        &n2,
        Method::POST,
        "/v1/cache/5",
        r#"{"a":"{\"on\":false}","b":"{\"on\":1}","c":null}"#,
    )
    .await;
    assert_violation(&batch, "b", "/on", "type");
    assert_eq!(
        n2.get_value(5, "a").await.expect("get"),
        None,
        "all or nothing"
    );
    // A rollback to a value the schema refuses.
    let rollback = send(
        &n2,
        Method::POST,
        &format!("/v1/cache/5/old/rollback?version={old_version}"),
        "",
    )
    .await;
    assert_violation(&rollback, "old", "", "json");
    assert_eq!(
        n2.get_value(5, "old").await.expect("get").as_deref(),
        Some("not json"),
        "stored entries are not re-checked"
    );
    // The original Sync/Set: refused whole, nothing written.
    let mut sync = SyncClient::connect(format!("http://{}", cluster.grpc_addr(2)))
        .await
        .expect("connect");
    let request = |ty: i32, value: &str| SyncData {
        r#type: ty,
        data: HashMap::from([("s".to_owned(), value.to_owned())]),
    };
    let err = sync
        .set(SyncRequest {
            data: vec![request(6, "fine"), request(5, r#"{"on":"no"}"#)],
        })
        .await
        .expect_err("violates");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("schema"), "{err}");
    assert_eq!(
        n2.get_value(6, "s").await.expect("get"),
        None,
        "all or nothing"
    );
    let err = sync
        .set(SyncRequest {
            data: vec![request(i32::MIN, "{}")],
        })
        .await
        .expect_err("reserved");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let metrics = n2.get("/metrics").await.expect("metrics").text();
    assert!(
        metrics.contains("podcache_rejected_requests_total{reason=\"schema_violation\"}"),
        "refusals are counted"
    );
    // Many checked writes, one compilation of the replicated version here;
    // none where the schema was set (its PUT compiled it already).
    assert!(
        metrics.contains("podcache_schema_compiles_total 1\n"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("schema_compiles"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        n0.put(5, "z", r#"{"on":true}"#, "")
            .await
            .expect("put")
            .status,
        StatusCode::OK
    );
    let set_here = n0.get("/metrics").await.expect("metrics").text();
    assert!(
        set_here.contains("podcache_schema_compiles_total 0\n"),
        "node 0 compiled again"
    );

    // The reserved type is refused on every user-facing path.
    let reserved = i32::MIN;
    for (method, path, body) in [
        (Method::GET, format!("/v1/cache/{reserved}/5"), ""),
        (Method::PUT, format!("/v1/cache/{reserved}/5"), "{}"),
        (Method::DELETE, format!("/v1/cache/{reserved}/5"), ""),
        (Method::GET, format!("/v1/cache/{reserved}/5/history"), ""),
        (Method::GET, format!("/v1/cache/{reserved}"), ""),
        (
            Method::POST,
            format!("/v1/cache/{reserved}"),
            r#"{"5":"{}"}"#,
        ),
        (Method::GET, format!("/v1/watch/{reserved}"), ""),
        (Method::GET, format!("/v1/export?type={reserved}"), ""),
        (Method::PUT, format!("/v1/schema/{reserved}"), "{}"),
    ] {
        let answer = send(&n1, method.clone(), &path, body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{method} {path}");
        assert_eq!(answer.json()["error"], "invalid_type", "{method} {path}");
        assert!(
            answer.text().contains("reserved"),
            "{method} {path}: {}",
            answer.text()
        );
    }
    // A whole export holds the schema, so a restore brings it back.
    let export = n1.get("/v1/export").await.expect("export").text();
    assert!(
        export
            .lines()
            .any(|l| l.contains(&format!("\"type\":{reserved},\"key\":\"5\""))),
        "{export}"
    );

    // Deleted on node 1: node 2 lets the write through once replicated.
    let deleted = send(&n1, Method::DELETE, "/v1/schema/5", "").await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.text());
    assert_eq!(deleted.json()["deleted"], true);
    wait_for_schema(&n2, 5, false).await;
    let through = n2.put(5, "k", "anything", "").await.expect("put");
    assert_eq!(through.status, StatusCode::OK, "{}", through.text());
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_schema_survives_a_restart_from_the_data_directory() {
    let dir = std::env::temp_dir().join(format!(
        "podcache-schema-restart-{}-{}",
        std::process::id(),
        common::next_block()
    ));
    let data = dir.clone();
    let mut cluster = Cluster::start_with(1, move |c| {
        c.data_dir = Some(data.clone());
        c.fsync = podcache::durability::Fsync::Always;
    })
    .await;
    let client = cluster.client(0);
    let set = send(
        &client,
        Method::PUT,
        "/v1/schema/9",
        r#"{"type":"integer"}"#,
    )
    .await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.text());
    assert_eq!(
        client.put(9, "n", "42", "").await.expect("put").status,
        StatusCode::OK
    );
    // An embedding service sees it too, and is checked like any writer.
    let node = cluster.node(0);
    assert_eq!(node.schema(9).as_deref(), Some(r#"{"type":"integer"}"#));
    assert!(
        node.set(9, "n", "x", None).await.is_err(),
        "a library write"
    );
    assert!(
        node.set(i32::MIN, "9", "{}", None).await.is_err(),
        "the reserved type"
    );
    assert!(
        !node.snapshot().contains_key(&i32::MIN),
        "no schemas in snapshots"
    );
    cluster.kill(0).await;
    cluster.restart(0).await;
    let client = cluster.client(0);
    let got = client.get("/v1/schema/9").await.expect("get");
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(got.json()["version"], set.json()["version"]);
    assert_violation(
        &client.put(9, "n", "4.5", "").await.expect("put"),
        "n",
        "",
        "type",
    );
    assert_eq!(
        client.get_value(9, "n").await.expect("get").as_deref(),
        Some("42")
    );
    let node = cluster.node(0);
    assert!(node.set_schema(9, Some("{")).await.is_err(), "not a schema");
    node.set_schema(9, None)
        .await
        .expect("deleted by the library");
    assert_eq!(node.schema(9), None);
    node.set(9, "n", "x", None).await.expect("unchecked again");
    cluster.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
