//! Trust nothing from outside (docs/SECURITY.md names these tests): mutual
//! TLS between replicas with certificate reload, REST bearer tokens with
//! reload, capacity limits that refuse rather than evict, and concurrency
//! limits that turn work away while probes still pass.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::pki::Pki;
use common::{Cluster, wait_everywhere, wait_until};
use hyper::StatusCode;
use podcache::proto::hellorpc::{SyncData, SyncRequest, sync_client::SyncClient};
use podcache::tls::TlsFiles;
use tokio::io::AsyncReadExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A gRPC channel to `addr` over TLS trusting `ca`, with a client identity
/// if given.
async fn tls_channel(
    addr: &str,
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).expect("ca")))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).expect("cert"),
            std::fs::read(key).expect("key"),
        ));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("url")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
}

/// True when a `Sync/GetAll` over `channel` answers.
async fn get_all_works(channel: Result<Channel, tonic::transport::Error>) -> bool {
    let Ok(channel) = channel else { return false };
    SyncClient::new(channel)
        .get_all(SyncRequest { data: vec![] })
        .await
        .is_ok()
}

#[tokio::test]
async fn replicas_speak_mutual_tls_refuse_strangers_and_reload_certificates() {
    let pki = Pki::generate("podcache test cluster CA", &[]);
    let stranger = Pki::generate("somebody else's CA", &[]);
    // One certificate for every replica, as one cert-manager Secret
    // mounted by every pod of the Deployment.
    let files = TlsFiles {
        cert: pki.path("server.pem"),
        key: pki.path("server-key.pem"),
        ca: pki.path("ca.pem"),
    };
    let cluster = Cluster::start_with(3, move |c| {
        c.tls = Some(files.clone());
        c.secrets_reload_interval = Duration::from_millis(100);
    })
    .await;
    cluster
        .client(0)
        .put(1, "flag", "on", "wait=all")
        .await
        .expect("put");
    wait_everywhere(&cluster, 1, "flag", Some("on")).await;
    let addr = cluster.grpc_addr(0);

    // Plain text, no certificate, and a certificate of another CA: refused.
    let plain = Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .timeout(Duration::from_secs(2))
        .connect()
        .await;
    assert!(!get_all_works(plain).await, "plain text is refused");
    assert!(
        !get_all_works(tls_channel(&addr, &pki.path("ca.pem"), None).await).await,
        "a client without a certificate is refused"
    );
    let stranger_identity = (
        stranger.path("client.pem").clone(),
        stranger.path("client-key.pem").clone(),
    );
    let stranger_connects = || async {
        get_all_works(
            tls_channel(
                &addr,
                &pki.path("ca.pem"),
                Some((&stranger_identity.0, &stranger_identity.1)),
            )
            .await,
        )
        .await
    };
    assert!(!stranger_connects().await, "another CA's client is refused");
    // The cluster's own client certificate works: the refusals were about
    // the certificates.
    let ours = tls_channel(
        &addr,
        &pki.path("ca.pem"),
        Some((&pki.path("client.pem"), &pki.path("client-key.pem"))),
    )
    .await;
    assert!(get_all_works(ours).await, "the cluster's client is served");
    let metrics = cluster.node(0).render_metrics();
    assert!(
        metric(
            &metrics,
            "podcache_connections_refused_total{listener=\"grpc\",reason=\"tls\"}"
        ) >= 2.0,
        "{metrics}"
    );

    // Rotation without a restart: the CA bundle now trusts the other CA too.
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(pki.path("ca.pem")).expect("ca"),
        std::fs::read_to_string(stranger.path("ca.pem")).expect("ca")
    );
    std::fs::write(pki.path("ca.pem"), bundle).expect("rotate");
    wait_until(
        "the new CA is trusted without a restart",
        Duration::from_secs(5),
        stranger_connects,
    )
    .await;
    assert!(
        cluster
            .node(0)
            .render_metrics()
            .contains("podcache_secret_reloads_total{file=\"tls\",result=\"ok\"}"),
    );
    // A broken key file is refused; the certificates in use stay.
    std::fs::write(pki.path("server-key.pem"), "not a key").expect("break");
    wait_until(
        "the broken file is noticed",
        Duration::from_secs(5),
        || async {
            cluster
                .node(0)
                .render_metrics()
                .contains("podcache_secret_reloads_total{file=\"tls\",result=\"error\"}")
        },
    )
    .await;
    cluster
        .client(2)
        .put(1, "after", "rotation", "wait=all")
        .await
        .expect("put");
    wait_everywhere(&cluster, 1, "after", Some("rotation")).await;
    cluster.shutdown().await;
}

const WRITE: &str = "write-token-aaaaaaaaaaaaaaaa";
const READ: &str = "read-token-bbbbbbbbbbbbbbbbb";

#[tokio::test]
async fn rest_tokens_guard_reads_and_writes_and_are_reloaded() {
    let dir = std::env::temp_dir().join(format!(
        "podcache-tokens-{}-{}",
        std::process::id(),
        common::next_block()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let token_file = dir.join("tokens");
    std::fs::write(&token_file, format!("# test\nwrite:{WRITE}\nread:{READ}\n")).expect("write");
    let path = token_file.clone();
    let cluster = Cluster::start_with(1, move |c| {
        c.auth_token_file = Some(path.clone());
        c.secrets_reload_interval = Duration::from_millis(100);
    })
    .await;
    let anonymous = cluster.client(0);
    let reader = cluster.client(0).with_token(READ).expect("token");
    let writer = cluster.client(0).with_token(WRITE).expect("token");
    let wrong = cluster
        .client(0)
        .with_token("write-token-aaaaaaaaaaaaaaab")
        .expect("token");

    for open in ["/healthz", "/readyz", "/metrics", "/"] {
        assert_eq!(
            anonymous.get(open).await.expect("get").status,
            StatusCode::OK,
            "{open} stays open"
        );
    }
    let denied = anonymous.get("/v1/cache/1/k").await.expect("get");
    assert_eq!(denied.status, StatusCode::UNAUTHORIZED);
    assert_eq!(denied.json()["error"], "unauthorized");
    assert_eq!(
        anonymous.get("/v1/cluster").await.expect("get").status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        wrong.put(1, "k", "v", "").await.expect("put").status,
        StatusCode::UNAUTHORIZED,
        "one character off is refused"
    );
    let forbidden = reader.put(1, "k", "v", "").await.expect("put");
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    assert_eq!(forbidden.json()["error"], "forbidden");
    assert_eq!(
        cluster.node(0).get(1, "k"),
        None,
        "a refused write changes nothing"
    );
    assert_eq!(
        writer.put(1, "k", "v", "").await.expect("put").status,
        StatusCode::OK
    );
    assert_eq!(
        reader.get("/v1/cache/1/k").await.expect("get").json()["value"],
        "v"
    );
    assert_eq!(
        writer.get("/v1/cluster").await.expect("get").status,
        StatusCode::OK,
        "a write token may read"
    );
    let metrics = cluster.node(0).render_metrics();
    assert!(
        metrics.contains("podcache_auth_failures_total{reason=\"missing\"} 2")
            && metrics.contains("podcache_auth_failures_total{reason=\"invalid\"} 1")
            && metrics.contains("podcache_auth_failures_total{reason=\"forbidden\"} 1"),
        "{metrics}"
    );

    // Rotation: the old write token stops working, the new one works.
    let rotated = "write-token-cccccccccccccccc";
    std::fs::write(&token_file, format!("write:{rotated}\n")).expect("rotate");
    wait_until(
        "the old token is refused",
        Duration::from_secs(5),
        || async {
            writer.get("/v1/cache/1/k").await.expect("get").status == StatusCode::UNAUTHORIZED
        },
    )
    .await;
    let new_writer = cluster.client(0).with_token(rotated).expect("token");
    assert_eq!(
        new_writer.put(1, "k", "v2", "").await.expect("put").status,
        StatusCode::OK
    );
    // A token file that does not parse keeps the tokens in use.
    std::fs::write(&token_file, "short\n").expect("break");
    wait_until(
        "the broken file is noticed",
        Duration::from_secs(5),
        || async {
            cluster
                .node(0)
                .render_metrics()
                .contains("podcache_secret_reloads_total{file=\"tokens\",result=\"error\"}")
        },
    )
    .await;
    assert_eq!(
        new_writer.get("/v1/cache/1/k").await.expect("get").status,
        StatusCode::OK
    );
    cluster.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn capacity_limits_refuse_writes_with_507_and_evict_nothing() {
    let cluster = Cluster::start_with(2, |c| {
        c.limits.max_entries_per_type = 3;
        c.limits.max_total_bytes = 64;
    })
    .await;
    let client = cluster.client(0);
    for key in ["a", "b", "c"] {
        assert_eq!(
            client
                .put(1, key, "value", "wait=all")
                .await
                .expect("put")
                .status,
            StatusCode::OK
        );
    }
    let full = client.put(1, "d", "value", "").await.expect("put");
    assert_eq!(full.status, StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(full.json()["error"], "capacity_exhausted");
    let batch = client
        .request_with_type(
            hyper::Method::POST,
            "/v1/cache/2",
            r#"{"x":"01234567890123456789012345678901234567890123456789"}"#,
            "application/json",
        )
        .await
        .expect("batch");
    assert_eq!(
        batch.status,
        StatusCode::INSUFFICIENT_STORAGE,
        "bytes limit: {}",
        batch.text()
    );
    // The original protocol's Set gets the same answer.
    let mut sync = SyncClient::connect(format!("http://{}", cluster.grpc_addr(0)))
        .await
        .expect("connect");
    let err = sync
        .set(SyncRequest {
            data: vec![SyncData {
                r#type: 1,
                data: HashMap::from([("e".to_string(), "value".to_string())]),
            }],
        })
        .await
        .expect_err("full");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    for i in 0..2 {
        let node = cluster.node(i);
        wait_until(
            "both replicas hold a, b, c",
            Duration::from_secs(5),
            || async {
                ["a", "b", "c"]
                    .iter()
                    .all(|k| node.get(1, k).as_deref() == Some("value"))
            },
        )
        .await;
        assert_eq!(node.get(1, "d"), None);
        assert_eq!(node.get(1, "e"), None);
        assert_eq!(node.get(2, "x"), None);
    }
    // Overwriting and deleting still work when full.
    assert_eq!(
        client.put(1, "a", "v2", "").await.expect("put").status,
        StatusCode::OK
    );
    client.delete(1, "b", "").await.expect("delete");
    assert_eq!(
        client.put(1, "d", "value", "").await.expect("put").status,
        StatusCode::OK,
        "a delete made room"
    );
    let metrics = cluster.node(0).render_metrics();
    assert!(
        metrics.contains("podcache_rejected_requests_total{reason=\"capacity_exhausted\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("podcache_store_capacity_bytes 64"),
        "{metrics}"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn thousands_of_types_are_capped_and_keep_metrics_small() {
    let cluster = Cluster::start_with(2, |c| c.limits.max_types = 1000).await;
    let client = cluster.client(0);
    let mut refused = 0;
    for ty in 0..3000 {
        let answer = client.put(ty, "k", "v", "").await.expect("put");
        match answer.status {
            StatusCode::OK => assert!(ty < 1000, "type {ty} accepted past the cap"),
            StatusCode::INSUFFICIENT_STORAGE => {
                let body = answer.json();
                assert_eq!(body["error"], "capacity_exhausted");
                assert!(
                    body["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("--max-types") && m.contains("1000")),
                    "{body}"
                );
                refused += 1;
            }
            other => panic!("type {ty}: {other}"),
        }
    }
    assert_eq!(refused, 2000);
    // Existing types still take writes.
    assert_eq!(
        client.put(5, "more", "v", "").await.expect("put").status,
        StatusCode::OK
    );
    for i in 0..2 {
        let text = cluster
            .client(i)
            .get("/metrics")
            .await
            .expect("metrics")
            .text();
        assert!(
            text.len() < 64 * 1024,
            "node {i}: /metrics is {} bytes",
            text.len()
        );
        assert!(
            text.contains("podcache_entries{type=\"other\"} 950"),
            "node {i}"
        );
        assert_eq!(metric(&text, "podcache_types"), 1000.0);
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn concurrency_limits_turn_work_away_but_probes_pass() {
    let cluster = Cluster::start_with(1, |c| {
        c.max_concurrent_requests = 1;
        c.max_watch_streams = 1;
        c.wait_timeout = Duration::from_secs(3);
    })
    .await;
    // A peer that never answers keeps a ?wait=all write in flight.
    cluster.peers.add("127.0.0.1:1".to_string());
    let client = cluster.client(0);
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.put(1, "k", "v", "wait=all").await })
    };
    wait_until(
        "a second request is turned away",
        Duration::from_secs(2),
        || async {
            let answer = client.get("/v1/cache/1/k").await.expect("get");
            answer.status == StatusCode::SERVICE_UNAVAILABLE
                && answer.json()["error"] == "overloaded"
        },
    )
    .await;
    assert_eq!(
        client.get("/healthz").await.expect("probe").status,
        StatusCode::OK,
        "probes pass while overloaded"
    );
    let done = slow.await.expect("join").expect("put");
    assert_eq!(
        done.status,
        StatusCode::OK,
        "the slow write itself finished"
    );

    // Watch streams are capped apart from requests.
    let (status, _open) = client.stream("/v1/watch/1").await.expect("watch");
    assert_eq!(status, StatusCode::OK);
    let (status, _) = client.stream("/v1/watch/1").await.expect("watch");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    let metrics = cluster.node(0).render_metrics();
    for what in ["requests", "watches"] {
        assert!(
            metrics.contains(&format!("podcache_overloaded_total{{what=\"{what}\"}}")),
            "{what}: {metrics}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_on_accept() {
    let cluster = Cluster::start_with(1, |c| c.max_connections = 2).await;
    let mut idle = Vec::new();
    let mut refused = false;
    for _ in 0..4 {
        let mut socket = tokio::net::TcpStream::connect(cluster.slots[0].http)
            .await
            .expect("connect");
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(300), socket.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                refused = true;
                break;
            }
            _ => idle.push(socket),
        }
    }
    assert!(refused, "a connection past the cap is closed");
    assert_eq!(idle.len(), 2, "the cap is 2");
    // Idle connections going away free their places.
    drop(idle);
    wait_until(
        "a request is served again",
        Duration::from_secs(5),
        || async {
            cluster
                .client(0)
                .get("/healthz")
                .await
                .is_ok_and(|a| a.status == StatusCode::OK)
        },
    )
    .await;
    let metrics = cluster.node(0).render_metrics();
    assert!(
        metrics.contains("podcache_connections_refused_total{listener=\"http\",reason=\"cap\"}"),
        "{metrics}"
    );
    cluster.shutdown().await;
}
