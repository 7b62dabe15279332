//! The REST port against careless or hostile clients: HTTPS with the
//! node's certificate (and client certificates when asked), reloaded when
//! the files change; plain HTTP not answered on a TLS port; connections
//! that send their headers slowly, or sit idle, closed by the header
//! timeout while normal clients are served.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::pki::Pki;
use common::{Cluster, wait_until};
use hyper::StatusCode;
use podcache::client::RestClient;
use podcache::http_tls::{HttpTlsFiles, client_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn https(
    addr: SocketAddr,
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> RestClient {
    RestClient::new(&format!("https://{addr}"))
        .expect("address")
        .with_tls(client_config(ca, identity).expect("client config"))
        .with_timeout(Duration::from_secs(5))
}

#[tokio::test]
async fn the_rest_port_speaks_https_only_requires_client_certificates_when_asked_and_reloads() {
    // The certificate must name the nodes' addresses, known once the
    // cluster has its address block: the PKI is made between the two.
    let dir: std::sync::Arc<std::sync::Mutex<Option<std::path::PathBuf>>> = Default::default();
    let seen = dir.clone();
    let mut cluster = Cluster::start_with(0, move |c| {
        c.secrets_reload_interval = Duration::from_millis(200);
        let dir = seen.lock().expect("dir").clone().expect("pki made");
        c.http_tls = Some(HttpTlsFiles {
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
            // Node 1 requires client certificates; node 0 does not.
            client_ca: c
                .pod_ip
                .to_string()
                .ends_with(".3")
                .then(|| dir.join("ca.pem")),
        });
    })
    .await;
    let pki = Pki::generate("rest-ca", &[cluster.ip(2), cluster.ip(3)]);
    *dir.lock().expect("dir") = Some(pki.dir.clone());
    cluster.add_node().await;
    cluster.add_node().await;
    let (a, b) = (cluster.slots[0].http, cluster.slots[1].http);
    let ca = pki.path("ca.pem");
    let client = https(a, &ca, None);
    assert_eq!(
        client.put(1, "k", "v", "").await.expect("https put").status,
        StatusCode::OK
    );
    assert_eq!(
        client
            .get_value(1, "k")
            .await
            .expect("https get")
            .as_deref(),
        Some("v")
    );
    let (status, _stream) = client
        .stream("/v1/watch/1")
        .await
        .expect("watch over https");
    assert_eq!(status, StatusCode::OK);
    // Plain HTTP on a TLS port gets no answer.
    let plain = RestClient::new(&format!("http://{a}"))
        .expect("address")
        .with_timeout(Duration::from_secs(2));
    assert!(
        plain.get("/healthz").await.is_err(),
        "plain HTTP was answered"
    );
    // ctl speaks it too.
    // Run off the test's runtime thread, which serves the nodes.
    let out = tokio::process::Command::new(common::process::BIN)
        .args(["ctl", "--addr", &format!("https://{a}"), "--cacert"])
        .arg(&ca)
        .args(["get", "1", "k"])
        .output()
        .await
        .expect("ctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v");
    let out = tokio::process::Command::new(common::process::BIN)
        .args(["ctl", "--addr", &format!("https://{a}"), "get", "1", "k"])
        .output()
        .await
        .expect("ctl");
    assert_eq!(out.status.code(), Some(64), "https without --cacert");
    // Client certificates: refused without, served with.
    assert!(
        https(b, &ca, None).get("/healthz").await.is_err(),
        "no client certificate"
    );
    let identity = (pki.path("client.pem"), pki.path("client-key.pem"));
    let with_cert = https(b, &ca, Some((&identity.0, &identity.1)));
    assert_eq!(
        with_cert
            .get("/healthz")
            .await
            .expect("with a certificate")
            .status,
        StatusCode::OK
    );
    // New certificates from another CA: new connections get them.
    let next = Pki::generate("rest-ca-2", &[cluster.ip(2), cluster.ip(3)]);
    for name in ["server.pem", "server-key.pem"] {
        std::fs::copy(next.path(name), pki.path(name)).expect("rotate");
    }
    let next_ca = next.path("ca.pem");
    wait_until(
        "the new certificate is served",
        Duration::from_secs(10),
        || {
            let next_ca = next_ca.clone();
            async move { https(a, &next_ca, None).get("/healthz").await.is_ok() }
        },
    )
    .await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_closed_while_normal_clients_are_served() {
    let cluster = Cluster::start_with(1, |c| c.http_header_timeout = Duration::from_secs(1)).await;
    let addr = cluster.slots[0].http;
    // 200 connections each sending a request's head a byte a second.
    let slow: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(async move {
                let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
                let started = tokio::time::Instant::now();
                let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
                for byte in head.iter() {
                    if conn.write_all(&[*byte]).await.is_err() {
                        break;
                    }
                    let mut buf = [0u8; 64];
                    // Closed by the server: a read of 0 (or an error).
                    match tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                        Ok(Ok(_)) => return None, // answered: the head was not slow enough
                        Err(_) => {}
                    }
                }
                None
            })
        })
        .collect();
    // Meanwhile normal clients are served.
    let client = cluster.client(0).with_timeout(Duration::from_secs(2));
    for _ in 0..20 {
        assert_eq!(
            client.get("/healthz").await.expect("served").status,
            StatusCode::OK
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut closed = 0;
    for task in slow {
        if let Some(after) = task.await.expect("task") {
            assert!(
                after < Duration::from_secs(5),
                "closed only after {after:?}"
            );
            closed += 1;
        }
    }
    assert_eq!(closed, 200, "every slow connection was closed");
    // An idle keep-alive connection is closed too.
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let mut answer = vec![0u8; 4096];
    let n = conn.read(&mut answer).await.expect("answer");
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));
    let idle = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut answer)).await;
    assert!(
        matches!(idle, Ok(Ok(0)) | Ok(Err(_))),
        "idle connection kept open: {idle:?}"
    );
    cluster.shutdown().await;
}
