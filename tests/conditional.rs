//! Conditional writes over real nodes: `ETag`, `If-Match` and
//! `If-None-Match` on single writes, expectations in batches, a race of
//! two replicas against one version, forwarding to the decider.
//!
//! These clusters use static peer lists, so the oldest ready replica
//! decides (the lease-based decider, its failover and the register test
//! are in `tests/chaos.rs`, `cas_register_*`).

mod common;

use std::time::Duration;

use common::{Cluster, wait_everywhere, wait_until};
use hyper::{Method, StatusCode};
use podcache::client::{Answer, RestClient, entry_path};
use serde_json::Value;

async fn put_if(client: &RestClient, key: &str, value: &str, headers: &[(&str, &str)]) -> Answer {
    client
        .request_with_headers(Method::PUT, &entry_path(1, key), value.to_owned(), headers)
        .await
        .expect("put")
}

/// Waits until every node of `cluster` knows who decides (right after a
/// start, a node that has not reached every peer answers 503 no_decider).
async fn wait_decider(cluster: &Cluster) {
    for i in cluster.running() {
        let client = cluster.client(i);
        wait_until("a decider is known", Duration::from_secs(10), || {
            let client = client.clone();
            async move {
                client.get("/v1/cluster").await.expect("cluster").json()["decider"]["name"]
                    .is_string()
            }
        })
        .await;
    }
}

fn quoted(version: &str) -> String {
    format!("\"{version}\"")
}

#[tokio::test]
async fn if_match_if_none_match_and_etags_guard_single_writes_on_every_replica() {
    let cluster = Cluster::start(3).await;
    wait_decider(&cluster).await;
    let (a, b) = (cluster.client(0), cluster.client(2));

    // If-None-Match: * creates only an absent key.
    let created = put_if(&a, "route", "v1", &[("If-None-Match", "*")]).await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.text());
    let v1 = created.json()["version"]
        .as_str()
        .expect("version")
        .to_owned();
    assert_eq!(created.etag.as_deref(), Some(quoted(&v1).as_str()));
    assert!(
        created.json()["replication"].is_array(),
        "a conditional write waits for every peer: {}",
        created.text()
    );
    let again = put_if(&b, "route", "other", &[("If-None-Match", "*")]).await;
    assert_eq!(
        again.status,
        StatusCode::PRECONDITION_FAILED,
        "{}",
        again.text()
    );
    assert_eq!(again.json()["error"], "precondition_failed");
    assert_eq!(again.json()["current_version"], v1.as_str());
    assert_eq!(again.etag.as_deref(), Some(quoted(&v1).as_str()));

    // A read's ETag is the version; If-None-Match of it is 304.
    let read = b.get(&entry_path(1, "route")).await.expect("get");
    assert_eq!(read.etag.as_deref(), Some(quoted(&v1).as_str()));
    let cached = b
        .request_with_headers(
            Method::GET,
            &entry_path(1, "route"),
            "",
            &[("If-None-Match", &quoted(&v1))],
        )
        .await
        .expect("get");
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);

    // If-Match of the version read: applied, on another replica too.
    let updated = put_if(&b, "route", "v2", &[("If-Match", &quoted(&v1))]).await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.text());
    let v2 = updated.json()["version"]
        .as_str()
        .expect("version")
        .to_owned();
    assert_ne!(v1, v2);
    wait_everywhere(&cluster, 1, "route", Some("v2")).await;
    // The same version again is stale now: 412 and nothing changes.
    let stale = put_if(&a, "route", "lost", &[("If-Match", &quoted(&v1))]).await;
    assert_eq!(
        stale.status,
        StatusCode::PRECONDITION_FAILED,
        "{}",
        stale.text()
    );
    assert_eq!(stale.json()["current_version"], v2.as_str());
    assert_eq!(
        a.get_value(1, "route").await.expect("get").as_deref(),
        Some("v2")
    );
    // If-Match: * needs a value; on an absent key it fails.
    let any = put_if(&a, "nothing", "x", &[("If-Match", "*")]).await;
    assert_eq!(any.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(any.json()["current_version"], Value::Null);

    // Conditional delete.
    let wrong = a
        .request_with_headers(
            Method::DELETE,
            &entry_path(1, "route"),
            "",
            &[("If-Match", &quoted(&v1))],
        )
        .await
        .expect("delete");
    assert_eq!(wrong.status, StatusCode::PRECONDITION_FAILED);
    let deleted = a
        .request_with_headers(
            Method::DELETE,
            &entry_path(1, "route"),
            "",
            &[("If-Match", &quoted(&v2))],
        )
        .await
        .expect("delete");
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.text());
    assert_eq!(deleted.json()["deleted"], true);
    wait_everywhere(&cluster, 1, "route", None).await;

    // Bad preconditions are 400, before anything is looked at.
    for (name, value) in [
        ("If-Match", "not-quoted"),
        ("If-Match", "W/\"1.0@0000000000000001\""),
        ("If-None-Match", "\"1.0@0000000000000001\""),
    ] {
        let bad = put_if(&a, "route", "x", &[(name, value)]).await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{name}: {value}");
        assert_eq!(bad.json()["error"], "invalid_precondition");
    }
    let both = put_if(
        &a,
        "route",
        "x",
        &[("If-Match", "*"), ("If-None-Match", "*")],
    )
    .await;
    assert_eq!(both.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.get_value(1, "route").await.expect("get"), None);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_batch_with_expectations_applies_whole_or_not_at_all() {
    let cluster = Cluster::start(2).await;
    wait_decider(&cluster).await;
    let client = cluster.client(1);
    let first = client
        .request(Method::POST, "/v1/cache/4", r#"{"a":"1","b":"2"}"#)
        .await
        .expect("batch");
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    let version = first.json()["versions"]["a"]
        .as_str()
        .expect("version")
        .to_owned();

    // One expectation fails: nothing of the batch applies.
    let body = format!(
        r#"{{"a":{{"value":"10","if_version":"{version}"}},"c":{{"value":"3","if_absent":true}},"b":{{"value":null,"if_absent":true}}}}"#
    );
    let refused = client
        .request(Method::POST, "/v1/cache/4", body)
        .await
        .expect("batch");
    assert_eq!(
        refused.status,
        StatusCode::PRECONDITION_FAILED,
        "{}",
        refused.text()
    );
    assert_eq!(refused.json()["key"], "b");
    assert_eq!(
        client.get_value(4, "a").await.expect("get").as_deref(),
        Some("1")
    );
    assert_eq!(client.get_value(4, "c").await.expect("get"), None);

    // All hold: set, create and delete as one change.
    let body = format!(
        r#"{{"a":{{"value":"10","if_version":"{version}"}},"c":{{"value":"3","if_absent":true}},"b":{{"value":null,"if_present":true}},"d":"plain"}}"#
    );
    let applied = client
        .request(Method::POST, "/v1/cache/4", body)
        .await
        .expect("batch");
    assert_eq!(applied.status, StatusCode::OK, "{}", applied.text());
    wait_everywhere(&cluster, 4, "a", Some("10")).await;
    wait_everywhere(&cluster, 4, "c", Some("3")).await;
    wait_everywhere(&cluster, 4, "b", None).await;
    wait_everywhere(&cluster, 4, "d", Some("plain")).await;

    for bad in [
        r#"{"a":{"value":"1","if_version":"nope"}}"#,
        r#"{"a":{"value":"1","if_absent":true,"if_present":true}}"#,
        r#"{"a":{"value":"1","unknown":1}}"#,
        r#"{"a":{"value":1,"if_absent":true}}"#,
        r#"{"a":{}}"#,
        r#"{"a":{"if_absent":true}}"#,
    ] {
        let answer = client
            .request(Method::POST, "/v1/cache/4", bad)
            .await
            .expect("batch");
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{bad}: {}",
            answer.text()
        );
    }
    assert_eq!(
        client.get_value(4, "a").await.expect("get").as_deref(),
        Some("10")
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn two_replicas_racing_against_one_version_let_exactly_one_win() {
    let cluster = Cluster::start(3).await;
    wait_decider(&cluster).await;
    let clients: Vec<RestClient> = (0..3).map(|i| cluster.client(i)).collect();
    for round in 0..20 {
        let key = format!("race-{round}");
        let first = put_if(&clients[0], &key, "start", &[("If-None-Match", "*")]).await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.text());
        let version = quoted(first.json()["version"].as_str().expect("version"));
        // Two replicas (the decider and another, in turn) at once.
        let (x, y) = (&clients[1 + round % 2], &clients[2 - round % 2]);
        let guard = [("If-Match", version.as_str())];
        let (left, right) = tokio::join!(
            put_if(x, &key, "left", &guard),
            put_if(y, &key, "right", &guard),
        );
        let won: Vec<&str> = [(&left, "left"), (&right, "right")]
            .iter()
            .filter(|(a, _)| a.status == StatusCode::OK)
            .map(|(_, name)| *name)
            .collect();
        assert_eq!(
            won.len(),
            1,
            "round {round}: {} / {}",
            left.text(),
            right.text()
        );
        for loser in [&left, &right] {
            if loser.status != StatusCode::OK {
                assert_eq!(
                    loser.status,
                    StatusCode::PRECONDITION_FAILED,
                    "{}",
                    loser.text()
                );
            }
        }
        wait_everywhere(&cluster, 1, &key, Some(won[0])).await;
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn the_cluster_view_names_the_decider_and_every_replica_agrees() {
    let cluster = Cluster::start(3).await;
    let mut seen = Vec::new();
    for i in 0..3 {
        let client = cluster.client(i);
        let decider_of = |client: RestClient| async move {
            client.get("/v1/cluster").await.expect("cluster").json()["decider"].clone()
        };
        wait_until("a decider is known", Duration::from_secs(10), || {
            let client = client.clone();
            async move { decider_of(client).await["name"].is_string() }
        })
        .await;
        let decider = decider_of(client.clone()).await;
        assert_eq!(decider["rule"], "oldest");
        seen.push(decider["name"].as_str().unwrap_or_default().to_owned());
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_conditional_write_is_checked_against_the_types_schema() {
    let cluster = Cluster::start(2).await;
    wait_decider(&cluster).await;
    let client = cluster.client(1);
    let schema = client
        .request(
            Method::PUT,
            "/v1/schema/9",
            r#"{"type":"object","required":["on"]}"#,
        )
        .await
        .expect("schema");
    assert_eq!(schema.status, StatusCode::OK, "{}", schema.text());
    for i in cluster.running() {
        let client = cluster.client(i);
        wait_until("the schema everywhere", Duration::from_secs(10), || {
            let client = client.clone();
            async move {
                client
                    .get("/v1/schema/9")
                    .await
                    .is_ok_and(|a| a.status == StatusCode::OK)
            }
        })
        .await;
    }
    for node in [0, 1] {
        let bad = cluster
            .client(node)
            .request_with_headers(
                Method::PUT,
                &entry_path(9, "flag"),
                "{}",
                &[("If-None-Match", "*")],
            )
            .await
            .expect("put");
        assert_eq!(
            bad.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            bad.text()
        );
        assert_eq!(bad.json()["error"], "schema_violation");
    }
    let good = put_if(&cluster.client(0), "flag", "x", &[("If-None-Match", "*")]).await;
    assert_eq!(
        good.status,
        StatusCode::OK,
        "type 1 has no schema: {}",
        good.text()
    );
    let ok = cluster
        .client(1)
        .request_with_headers(
            Method::PUT,
            &entry_path(9, "flag"),
            r#"{"on":true}"#,
            &[("If-None-Match", "*")],
        )
        .await
        .expect("put");
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    cluster.shutdown().await;
}
