//! Tokens limited to some types (`types=` on a token line), over a real
//! node: every endpoint that reads or writes a type refuses another type
//! with 403 `forbidden_type` (naming the type and the token's name, never
//! the token), in-scope requests still work, exports and imports follow
//! the scope rules of docs/SECURITY.md, `/v1/cluster` shows a scoped
//! token only its types' recent changes, and a changed token file is
//! picked up.

mod common;

use std::time::Duration;

use common::{Cluster, wait_until};
use hyper::{Method, StatusCode};
use podcache::client::RestClient;

const ADMIN: &str = "write-token-admin-0123456789";
const FLAGS: &str = "write-token-flags-0123456789";
const DASH: &str = "read-token-dash-0123456789";

fn token_lines(flags_types: &str) -> String {
    format!(
        "write:{ADMIN} name=ops\nwrite:{FLAGS} name=flags-team types={flags_types}\n\
         read:{DASH} name=dash types=7\n"
    )
}

/// Asserts a 403 `forbidden_type` naming `ty` (if any) and the token's
/// name, never the token.
#[track_caller]
fn assert_forbidden_type(answer: &podcache::client::Answer, ty: Option<i32>, what: &str) {
    let body = answer.json();
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{what}: {body}");
    assert_eq!(body["error"], "forbidden_type", "{what}: {body}");
    assert_eq!(body["token"], "flags-team", "{what}: {body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("flags-team"), "{what}: {message}");
    if let Some(ty) = ty {
        assert_eq!(body["type"], ty, "{what}: {body}");
        assert!(message.contains(&format!("type {ty}")), "{what}: {message}");
    }
    assert!(!answer.text().contains(FLAGS), "{what}: the token is shown");
}

async fn send(
    client: &RestClient,
    method: Method,
    path: &str,
    body: &str,
) -> podcache::client::Answer {
    client
        .request(method.clone(), path, body.to_owned())
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

#[tokio::test]
async fn scoped_tokens_are_refused_other_types_everywhere_and_keep_their_own() {
    let dir = std::env::temp_dir().join(format!(
        "podcache-scoped-{}-{}",
        std::process::id(),
        common::next_block()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("tokens");
    std::fs::write(&file, token_lines("1,7-9")).expect("token file");
    let path = file.clone();
    let cluster = Cluster::start_with(1, move |c| {
        c.auth_token_file = Some(path.clone());
        c.secrets_reload_interval = Duration::from_millis(100);
        c.ofrep_type = Some(3);
    })
    .await;
    let admin = cluster.client(0).with_token(ADMIN).expect("token");
    let flags = cluster.client(0).with_token(FLAGS).expect("token");
    let dash = cluster.client(0).with_token(DASH).expect("token");

    // The unscoped token writes every type; the scoped one its own.
    for ty in [2, 3, 7] {
        assert_eq!(
            admin.put(ty, "k", "true", "").await.expect("put").status,
            StatusCode::OK
        );
    }
    let own = flags.put(7, "k", "on", "").await.expect("put");
    assert_eq!(own.status, StatusCode::OK, "{}", own.text());
    assert_eq!(own.json()["author"], "flags-team");
    let version = own.json()["version"].as_str().expect("version").to_owned();

    // Every endpoint with another type: 403, and nothing changes.
    let refused: &[(Method, String, &str)] = &[
        (Method::GET, "/v1/cache/2/k".into(), ""),
        (Method::HEAD, "/v1/cache/2/k".into(), ""),
        (Method::PUT, "/v1/cache/2/k".into(), "x"),
        (Method::DELETE, "/v1/cache/2/k".into(), ""),
        (Method::GET, "/v1/cache/2/k/history".into(), ""),
        (
            Method::POST,
            format!("/v1/cache/2/k/rollback?version={version}"),
            "",
        ),
        (Method::GET, "/v1/cache/2".into(), ""),
        (Method::POST, "/v1/cache/2".into(), r#"{"k":"x"}"#),
        (Method::GET, "/v1/watch/2".into(), ""),
        (Method::GET, "/v1/schema/2".into(), ""),
        (Method::GET, "/v1/export?type=2".into(), ""),
        (Method::POST, "/ofrep/v1/evaluate/flags/k".into(), "{}"),
        (Method::POST, "/ofrep/v1/evaluate/flags".into(), "{}"),
    ];
    for (method, path, body) in refused {
        let answer = send(&flags, method.clone(), path, body).await;
        if *method == Method::HEAD {
            assert_eq!(answer.status, StatusCode::FORBIDDEN, "HEAD {path}");
            continue;
        }
        let ty = if path.starts_with("/ofrep/") { 3 } else { 2 };
        assert_forbidden_type(&answer, Some(ty), &format!("{method} {path}"));
    }
    assert_eq!(
        cluster.node(0).get(2, "k").as_deref(),
        Some("true"),
        "unchanged"
    );
    // What only an unscoped token may do, whatever the type.
    for (method, path, body) in [
        (Method::PUT, "/v1/schema/7", r#"{"type":"string"}"#),
        (Method::DELETE, "/v1/schema/7", ""),
        (Method::GET, "/v1/export", ""),
        (Method::POST, "/v1/import", ""),
    ] {
        let answer = send(&flags, method.clone(), path, body).await;
        assert_forbidden_type(&answer, None, &format!("{method} {path}"));
    }

    // In scope, everything still works.
    assert_eq!(
        flags.get_value(7, "k").await.expect("get").as_deref(),
        Some("on")
    );
    for path in ["/v1/cache/7", "/v1/cache/7/k/history", "/v1/cache/1"] {
        let answer = flags.get(path).await.expect("get");
        assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.text());
    }
    let batch = send(&flags, Method::POST, "/v1/cache/8", r#"{"a":"1","b":null}"#).await;
    assert_eq!(batch.status, StatusCode::OK, "{}", batch.text());
    let rollback = send(
        &flags,
        Method::POST,
        &format!("/v1/cache/7/k/rollback?version={version}"),
        "",
    )
    .await;
    assert_eq!(rollback.status, StatusCode::OK, "{}", rollback.text());
    let (status, _) = flags.stream("/v1/watch/7").await.expect("watch");
    assert_eq!(status, StatusCode::OK);
    let export = flags.get("/v1/export?type=7").await.expect("export");
    assert_eq!(export.status, StatusCode::OK);
    let lines: Vec<serde_json::Value> = export
        .text()
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str(l).expect("line"))
        .collect();
    assert!(
        !lines.is_empty() && lines.iter().all(|l| l["type"] == 7),
        "{lines:?}"
    );
    // A schema of its type: read, not changed.
    let set = send(&admin, Method::PUT, "/v1/schema/7", r#"{"type":"string"}"#).await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.text());
    let schema = flags.get("/v1/schema/7").await.expect("schema");
    assert_eq!(schema.status, StatusCode::OK, "{}", schema.text());
    assert_eq!(schema.json()["schema"]["type"], "string");

    // A read token with types=: reads its type only, writes nothing.
    assert_eq!(
        dash.get_value(7, "k").await.expect("get").as_deref(),
        Some("on")
    );
    let other = dash.get("/v1/cache/2/k").await.expect("get");
    assert_eq!(
        (other.status, other.json()["error"].clone()),
        (StatusCode::FORBIDDEN, "forbidden_type".into())
    );
    assert_eq!(other.json()["token"], "dash");
    let write = dash.put(7, "k", "x", "").await.expect("put");
    assert_eq!(write.json()["error"], "forbidden", "a read token");

    // /v1/cluster: the recent changes of its types only (and their schemas).
    let types_seen = |client: RestClient| async move {
        let view = client.get("/v1/cluster").await.expect("cluster").json();
        let mut seen: Vec<(i64, String)> = view["recent_changes"]
            .as_array()
            .expect("recent changes")
            .iter()
            .map(|c| {
                (
                    c["type"].as_i64().unwrap_or_default(),
                    c["key"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        seen.sort();
        seen.dedup();
        seen
    };
    let all = types_seen(admin.clone()).await;
    assert!(all.iter().any(|(ty, _)| *ty == 2), "{all:?}");
    let scoped = types_seen(dash.clone()).await;
    assert!(!scoped.is_empty(), "{scoped:?}");
    for (ty, key) in &scoped {
        assert!(
            *ty == 7 || (*ty == i64::from(i32::MIN) && key == "7"),
            "a change of type {ty} ({key}) shown to a token of type 7: {scoped:?}"
        );
    }
    assert!(
        scoped.contains(&(i64::from(i32::MIN), "7".into())),
        "{scoped:?}"
    );

    let metrics = admin.get("/metrics").await.expect("metrics").text();
    assert!(
        metrics.contains("podcache_auth_failures_total{reason=\"forbidden_type\"}"),
        "refusals are counted"
    );

    // A changed token file: the new scope applies within seconds.
    std::fs::write(&file, token_lines("2")).expect("token file");
    wait_until("the new scope", Duration::from_secs(10), || {
        let flags = flags.clone();
        async move {
            flags
                .put(2, "k", "mine", "")
                .await
                .is_ok_and(|a| a.status == StatusCode::OK)
        }
    })
    .await;
    let answer = flags.put(7, "k", "x", "").await.expect("put");
    assert_forbidden_type(&answer, Some(7), "type 7 after the reload");
    // A broken line keeps the tokens in use.
    std::fs::write(&file, format!("write:{FLAGS} types=9-1\n")).expect("token file");
    wait_until("the broken file refused", Duration::from_secs(10), || {
        let admin = admin.clone();
        async move {
            admin.get("/metrics").await.is_ok_and(|m| {
                m.text()
                    .contains("podcache_secret_reloads_total{file=\"tokens\",result=\"error\"}")
            })
        }
    })
    .await;
    assert_eq!(
        flags.put(2, "k", "still", "").await.expect("put").status,
        StatusCode::OK
    );

    cluster.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
