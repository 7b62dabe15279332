//! Discovery from Kubernetes' etcd, against a real etcd (Debian's
//! `etcd-server` 3.4, started here on loopback with a temporary data dir):
//! the v3 API (JSON and protobuf pods, list then watch, compaction, etcd
//! restarts, garbage values, client mTLS on a 3-member cluster) and the v2
//! keys API, standalone and driving real podcache nodes.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::discovery_probe::{addrs, hello_filter, run};
use common::k8s_sim::{PodEncoding, PodSimulator, SimPod};
use common::local_etcd::{LocalEtcd, MemberSpec, MemberTls, free_low_port};
use common::pki::Pki;
use common::{next_block, peers_seen, wait_for_peers, wait_until};
use podcache::discovery::{EtcdDiscovery, EtcdLeaseDiscovery, EtcdV2Discovery};
use podcache::etcd::{EtcdClient, EtcdSettings, EtcdTls};
use podcache::{NodeBuilder, NodeConfig, NodeHandle};

const ARTICLE_POD: &str = include_str!("fixtures/article_pod.json");
const ARTICLE_POD_NAME: &str = "hello-web-29a74e26ea3c2138e1727f35a111f4c6-dknwh";

fn pod(name: &str, ip: &str, started_ms: i64) -> SimPod {
    SimPod::pending(name, "default", "hello", started_ms - 1000).running(
        ip,
        "127.0.0.1",
        started_ms,
    )
}

fn v3_sim(etcd: &LocalEtcd, encoding: PodEncoding) -> PodSimulator {
    PodSimulator::new(
        EtcdClient::connect(&etcd.settings()).expect("client"),
        encoding,
    )
}

#[tokio::test]
async fn v3_finds_the_article_pod_and_a_node_with_its_ip_excludes_itself() {
    let etcd = LocalEtcd::start().await.expect("etcd");
    let sim = v3_sim(&etcd, PodEncoding::Json);
    // The pod exactly as the article shows it, stored as JSON.
    sim.put_raw(
        &format!("/registry/pods/default/{ARTICLE_POD_NAME}"),
        ARTICLE_POD.as_bytes(),
    )
    .await
    .expect("put");
    let mut other = run(
        EtcdDiscovery::new(etcd.settings(), hello_filter()),
        "127.0.0.9",
    );
    let set = other
        .wait_peers(&["172.80.13.4:9090"], Duration::from_secs(10))
        .await;
    assert_eq!(set.peers[0].name.as_deref(), Some(ARTICLE_POD_NAME));
    assert_eq!(set.peers[0].host_ip.as_deref(), Some("10.30.58.179"));
    assert_eq!(
        set.peers[0].started_at_ms,
        podcache::discovery::pod::parse_rfc3339_ms("2017-05-23T10:10:29Z")
    );
    let mut itself = run(
        EtcdDiscovery::new(etcd.settings(), hello_filter()),
        "172.80.13.4",
    );
    itself.wait_peers(&[], Duration::from_secs(10)).await;
}

#[tokio::test]
async fn v3_ignores_pods_that_are_not_peers_and_reads_protobuf_and_json_alike() {
    let etcd = LocalEtcd::start().await.expect("etcd");
    let pb = v3_sim(&etcd, PodEncoding::Protobuf);
    let json = v3_sim(&etcd, PodEncoding::Json);
    let now = podcache::node::unix_ms() as i64;
    pb.put(&pod("proto-pod", "127.0.0.2", now))
        .await
        .expect("put");
    json.put(&pod("json-pod", "127.0.0.3", now))
        .await
        .expect("put");
    let mut pending = SimPod::pending("pending", "default", "hello", now);
    pending.pod_ip = Some("127.0.0.4".into());
    pb.put(&pending).await.expect("put");
    let mut succeeded = pod("succeeded", "127.0.0.5", now);
    succeeded.phase = "Succeeded".into();
    pb.put(&succeeded).await.expect("put");
    pb.put(&SimPod::pending("no-ip", "default", "hello", now))
        .await
        .expect("put");
    let mut deleting = pod("deleting", "127.0.0.6", now);
    deleting.deleting = true;
    json.put(&deleting).await.expect("put");
    let mut elsewhere = pod("elsewhere", "127.0.0.7", now);
    elsewhere.namespace = "kube-system".into();
    pb.put(&elsewhere).await.expect("put");
    let mut other_app = pod("other-app", "127.0.0.8", now);
    other_app.labels.insert("app".into(), "nginx".into());
    pb.put(&other_app).await.expect("put");

    let mut running = run(
        EtcdDiscovery::new(etcd.settings(), hello_filter()),
        "127.0.0.1",
    );
    running
        .wait_peers(
            &["127.0.0.2:9090", "127.0.0.3:9090"],
            Duration::from_secs(10),
        )
        .await;
}

#[tokio::test]
async fn v3_membership_follows_deletes_and_additions_within_a_second() {
    let etcd = LocalEtcd::start().await.expect("etcd");
    let sim = v3_sim(&etcd, PodEncoding::Protobuf);
    let now = podcache::node::unix_ms() as i64;
    sim.put(&pod("a", "127.0.0.2", now)).await.expect("put");
    sim.put(&pod("b", "127.0.0.3", now)).await.expect("put");
    let mut running = run(
        EtcdDiscovery::new(etcd.settings(), hello_filter()),
        "127.0.0.1",
    );
    running
        .wait_peers(
            &["127.0.0.2:9090", "127.0.0.3:9090"],
            Duration::from_secs(10),
        )
        .await;
    sim.delete("default", "a").await.expect("delete");
    running
        .wait_peers(&["127.0.0.3:9090"], Duration::from_secs(1))
        .await;
    sim.put(&pod("c", "127.0.0.4", now)).await.expect("put");
    running
        .wait_peers(
            &["127.0.0.3:9090", "127.0.0.4:9090"],
            Duration::from_secs(1),
        )
        .await;
    // A pod that stops running leaves, and comes back when it runs again.
    let mut stopping = pod("c", "127.0.0.4", now);
    stopping.phase = "Failed".into();
    sim.put(&stopping).await.expect("put");
    running
        .wait_peers(&["127.0.0.3:9090"], Duration::from_secs(1))
        .await;
}

#[tokio::test]
async fn v3_skips_garbage_truncated_and_encrypted_values_and_goes_on() {
    let etcd = LocalEtcd::start().await.expect("etcd");
    let sim = v3_sim(&etcd, PodEncoding::Protobuf);
    let now = podcache::node::unix_ms() as i64;
    sim.put(&pod("good", "127.0.0.2", now)).await.expect("put");
    let mut running = run(
        EtcdDiscovery::new(etcd.settings(), hello_filter()),
        "127.0.0.1",
    );
    running
        .wait_peers(&["127.0.0.2:9090"], Duration::from_secs(10))
        .await;

    let valid = pod("truncated", "127.0.0.3", now).to_protobuf();
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\x01 not a pod at all".to_vec()),
        ("truncated", valid[..valid.len() / 2].to_vec()),
        (
            "encrypted",
            b"k8s:enc:aescbc:v1:key1:\x8a\x11\x02secret".to_vec(),
        ),
        ("not-json", b"{\"metadata\": [}".to_vec()),
    ];
    for (name, value) in &bad {
        sim.put_raw(&format!("/registry/pods/default/{name}"), value)
            .await
            .expect("put");
    }
    // Discovery goes on: a valid change after the bad values still arrives.
    sim.put(&pod("after", "127.0.0.4", now)).await.expect("put");
    running
        .wait_peers(
            &["127.0.0.2:9090", "127.0.0.4:9090"],
            Duration::from_secs(5),
        )
        .await;
    let metrics = running.metrics.render();
    assert!(
        metrics.contains("podcache_discovery_skipped_values_total{reason=\"encrypted\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("podcache_discovery_skipped_values_total{reason=\"undecodable\"} 3"),
        "{metrics}"
    );
    // A re-list (a fresh discovery) skips them the same way.
    let mut again = run(
        EtcdDiscovery::new(etcd.settings(), hello_filter()),
        "127.0.0.1",
    );
    again
        .wait_peers(
            &["127.0.0.2:9090", "127.0.0.4:9090"],
            Duration::from_secs(10),
        )
        .await;
}

#[tokio::test]
async fn v3_recovers_when_etcd_compacts_past_the_watch_revision() {
    let etcd = LocalEtcd::start().await.expect("etcd");
    let sim = v3_sim(&etcd, PodEncoding::Protobuf);
    let client = EtcdClient::connect(&etcd.settings()).expect("client");
    let now = podcache::node::unix_ms() as i64;
    sim.put(&pod("a", "127.0.0.2", now)).await.expect("put");
    let discovery = EtcdDiscovery::new(etcd.settings(), hello_filter())
        .with_list_watch_gap(Duration::from_secs(2));
    let mut running = run(discovery, "127.0.0.1");
    running
        .wait_peers(&["127.0.0.2:9090"], Duration::from_secs(10))
        .await;
    // In the gap between the listing and the watch: a change, then a
    // compaction past it, so the watch's start revision is gone.
    sim.delete("default", "a").await.expect("delete");
    let revision = sim.put(&pod("b", "127.0.0.3", now)).await.expect("put");
    client.compact(revision).await.expect("compact");
    running
        .wait_peers(&["127.0.0.3:9090"], Duration::from_secs(10))
        .await;
    let metrics = running.metrics.render();
    assert!(
        metrics.contains("podcache_discovery_relists_total{reason=\"compacted\"} 1"),
        "the watch was cancelled by the compaction: {metrics}"
    );
}

#[tokio::test]
async fn v3_keeps_the_last_membership_while_etcd_is_down_and_recovers() {
    let mut etcd = LocalEtcd::start().await.expect("etcd");
    let sim = v3_sim(&etcd, PodEncoding::Protobuf);
    let now = podcache::node::unix_ms() as i64;
    sim.put(&pod("a", "127.0.0.2", now)).await.expect("put");
    let mut running = run(
        EtcdDiscovery::new(etcd.settings(), hello_filter()),
        "127.0.0.1",
    );
    running
        .wait_peers(&["127.0.0.2:9090"], Duration::from_secs(10))
        .await;
    etcd.kill();
    running.wait_state(true, Duration::from_secs(20)).await;
    assert_eq!(
        addrs(&running.peers_rx.borrow()),
        ["127.0.0.2:9090"],
        "last membership kept"
    );
    assert!(
        running
            .metrics
            .render()
            .contains("podcache_discovery_stale 1")
    );
    etcd.restart().expect("restart");
    etcd.wait_healthy(Duration::from_secs(20))
        .await
        .expect("healthy");
    running.wait_state(false, Duration::from_secs(20)).await;
    sim.put(&pod("b", "127.0.0.3", now)).await.expect("put");
    running
        .wait_peers(
            &["127.0.0.2:9090", "127.0.0.3:9090"],
            Duration::from_secs(5),
        )
        .await;
    assert!(
        running
            .metrics
            .render()
            .contains("podcache_discovery_stale 0")
    );
}

/// Starts a podcache node on `ip` with the shared gRPC `port`, discovering
/// through etcd, and registers its pod (Pending first, Running once it
/// listens), as the kubelet would.
async fn start_node(
    etcd: &LocalEtcd,
    sim: &PodSimulator,
    name: &str,
    ip: Ipv4Addr,
    port: u16,
    started_ms: i64,
) -> NodeHandle {
    sim.put(&SimPod::pending(name, "default", "hello", started_ms))
        .await
        .expect("pending pod");
    let mut config = NodeConfig::for_test(ip);
    config.pod_name = name.into();
    config.grpc_addr = std::net::SocketAddr::new(ip.into(), port);
    let mut filter = hello_filter();
    filter.grpc_port = port;
    let node = NodeBuilder::new(config)
        .discovery(EtcdDiscovery::new(etcd.settings(), filter))
        .start()
        .await
        .expect("node starts");
    sim.put(&pod(name, &ip.to_string(), started_ms))
        .await
        .expect("running pod");
    node
}

#[tokio::test]
async fn nodes_find_each_other_only_through_etcd_and_a_newcomer_pulls_from_the_oldest_pod() {
    let etcd = LocalEtcd::start().await.expect("etcd");
    let sim = v3_sim(&etcd, PodEncoding::Protobuf);
    let block = next_block();
    let ip = |h: u32| Ipv4Addr::from(block | h);
    let port = free_low_port(ip(2)).expect("port");
    let now = podcache::node::unix_ms() as i64;
    // The oldest pod by startedAt is listed last by name.
    let specs = [
        ("zz-oldest", 2, now - 30_000),
        ("aa-middle", 3, now - 20_000),
        ("mm-young", 4, now - 10_000),
    ];
    let mut nodes = Vec::new();
    for (name, host, started) in specs {
        let node = start_node(&etcd, &sim, name, ip(host), port, started).await;
        wait_until("node ready", Duration::from_secs(10), || async {
            node.is_ready()
        })
        .await;
        nodes.push(node);
    }
    // Everyone learns everyone through the watch.
    for node in &nodes {
        wait_for_peers(node, 2, Duration::from_secs(5)).await;
    }
    let outcome = nodes[1].set(1, "flag", "on", None).await.expect("set");
    assert_eq!(outcome.records.len(), 1);
    for node in &nodes {
        wait_until("write spreads", Duration::from_secs(5), || async {
            node.get(1, "flag").as_deref() == Some("on")
        })
        .await;
    }
    let newcomer = start_node(&etcd, &sim, "bb-new", ip(5), port, now).await;
    wait_until("newcomer ready", Duration::from_secs(10), || async {
        newcomer.is_ready()
    })
    .await;
    let report = newcomer.bootstrap_report().expect("report");
    assert_eq!(
        report.source_name.as_deref(),
        Some("zz-oldest"),
        "{report:?}"
    );
    assert_eq!(newcomer.get(1, "flag").as_deref(), Some("on"));
    // A pod deleted in etcd leaves every node's membership.
    sim.delete("default", "mm-young").await.expect("delete");
    let client =
        podcache::client::RestClient::new(&newcomer.http_addr().expect("http").to_string())
            .expect("client");
    wait_until("deleted pod leaves", Duration::from_secs(2), || {
        let client = client.clone();
        async move {
            let view = client.get("/v1/cluster").await.expect("cluster").json();
            view["peers"]
                .as_array()
                .is_some_and(|p| p.len() == 2 && p.iter().all(|p| p["name"] != "mm-young"))
        }
    })
    .await;
    for node in nodes.into_iter().chain([newcomer]) {
        node.shutdown().await;
    }
}

#[tokio::test]
async fn a_node_started_while_etcd_is_down_serves_reads_and_gets_ready_when_etcd_answers() {
    let mut etcd = LocalEtcd::start().await.expect("etcd");
    etcd.kill();
    let block = next_block();
    let ip = Ipv4Addr::from(block | 2);
    let mut config = NodeConfig::for_test(ip);
    config.grpc_addr = std::net::SocketAddr::new(ip.into(), free_low_port(ip).expect("port"));
    let node = NodeBuilder::new(config)
        .discovery(EtcdDiscovery::new(etcd.settings(), hello_filter()))
        .start()
        .await
        .expect("starts without etcd");
    let client = podcache::client::RestClient::new(&node.http_addr().expect("http").to_string())
        .expect("client");
    wait_until("discovery reports stale", Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            client.get("/v1/cluster").await.expect("cluster").json()["discovery"]["state"]
                == "stale"
        }
    })
    .await;
    assert_eq!(
        client.get("/readyz").await.expect("readyz").status,
        hyper::StatusCode::SERVICE_UNAVAILABLE
    );
    let read = client.get("/v1/cache/1/anything").await.expect("read");
    assert_eq!(
        read.status,
        hyper::StatusCode::NOT_FOUND,
        "reads are served"
    );
    etcd.restart().expect("restart");
    wait_until(
        "ready once etcd answers",
        Duration::from_secs(20),
        || async { node.is_ready() },
    )
    .await;
    assert_eq!(
        client.get("/readyz").await.expect("readyz").status,
        hyper::StatusCode::OK
    );
    node.shutdown().await;
}

// ---- the v2 keys API -------------------------------------------------------

fn v2(etcd: &LocalEtcd) -> EtcdV2Discovery {
    EtcdV2Discovery::new(
        vec![etcd.client_url()],
        hello_filter(),
        Duration::from_secs(3),
    )
}

#[tokio::test]
async fn v2_finds_the_article_pod_follows_changes_and_skips_garbage() {
    let etcd = LocalEtcd::start().await.expect("etcd");
    let sim = PodSimulator::v2(&etcd.client_url()).expect("v2 sim");
    sim.put_raw(
        &format!("/registry/pods/default/{ARTICLE_POD_NAME}"),
        ARTICLE_POD.as_bytes(),
    )
    .await
    .expect("put");
    let now = podcache::node::unix_ms() as i64;
    let mut pending = SimPod::pending("pending", "default", "hello", now);
    pending.pod_ip = Some("127.0.0.4".into());
    sim.put(&pending).await.expect("put");
    let mut running = run(v2(&etcd), "127.0.0.1");
    running
        .wait_peers(&["172.80.13.4:9090"], Duration::from_secs(10))
        .await;
    let mut itself = run(v2(&etcd), "172.80.13.4");
    itself.wait_peers(&[], Duration::from_secs(10)).await;

    sim.put(&pod("b", "127.0.0.3", now)).await.expect("put");
    running
        .wait_peers(
            &["172.80.13.4:9090", "127.0.0.3:9090"],
            Duration::from_secs(1),
        )
        .await;
    sim.delete("default", ARTICLE_POD_NAME)
        .await
        .expect("delete");
    running
        .wait_peers(&["127.0.0.3:9090"], Duration::from_secs(1))
        .await;
    sim.put_raw("/registry/pods/default/garbage", b"not a pod")
        .await
        .expect("put");
    sim.put(&pod("c", "127.0.0.5", now)).await.expect("put");
    running
        .wait_peers(
            &["127.0.0.3:9090", "127.0.0.5:9090"],
            Duration::from_secs(2),
        )
        .await;
    assert!(
        running
            .metrics
            .render()
            .contains("podcache_discovery_skipped_values_total{reason=\"undecodable\"} 1")
    );
}

#[tokio::test]
async fn v2_lists_again_when_its_wait_index_was_cleared() {
    let etcd = LocalEtcd::start().await.expect("etcd");
    let sim = PodSimulator::v2(&etcd.client_url()).expect("v2 sim");
    let now = podcache::node::unix_ms() as i64;
    sim.put(&pod("a", "127.0.0.2", now)).await.expect("put");
    // The gap must outlast the 1,011 puts below, or the watch starts
    // before the index is cleared and sees the change without a relist
    // (3 s was too short on a loaded CI machine: the test failed once).
    let gap = Duration::from_secs(10);
    let started = tokio::time::Instant::now();
    let mut running = run(v2(&etcd).with_list_watch_gap(gap), "127.0.0.1");
    running
        .wait_peers(&["127.0.0.2:9090"], Duration::from_secs(10))
        .await;
    // In the gap: a change, then more than the 1000 events etcd v2 keeps, so
    // the wait index is "outdated and cleared" (errorCode 401).
    sim.put(&pod("b", "127.0.0.3", now)).await.expect("put");
    let filler = PodSimulator::v2(&etcd.client_url()).expect("v2 sim");
    for i in 0..1010 {
        filler
            .put_raw("/unrelated/counter", i.to_string().as_bytes())
            .await
            .expect("put");
    }
    assert!(
        started.elapsed() < gap,
        "the puts took {:?}, past the list-watch gap of {gap:?}: the test proves nothing",
        started.elapsed()
    );
    running
        .wait_peers(
            &["127.0.0.2:9090", "127.0.0.3:9090"],
            Duration::from_secs(20),
        )
        .await;
    let metrics = running.metrics.render();
    assert!(
        metrics.contains("podcache_discovery_relists_total{reason=\"outdated\"} 1"),
        "etcd answered 401 and discovery listed again: {metrics}"
    );
}

#[tokio::test]
async fn v2_keeps_the_last_membership_while_etcd_is_down_and_recovers() {
    let mut etcd = LocalEtcd::start().await.expect("etcd");
    let sim = PodSimulator::v2(&etcd.client_url()).expect("v2 sim");
    let now = podcache::node::unix_ms() as i64;
    sim.put(&pod("a", "127.0.0.2", now)).await.expect("put");
    let mut running = run(v2(&etcd), "127.0.0.1");
    running
        .wait_peers(&["127.0.0.2:9090"], Duration::from_secs(10))
        .await;
    etcd.kill();
    running.wait_state(true, Duration::from_secs(20)).await;
    assert_eq!(addrs(&running.peers_rx.borrow()), ["127.0.0.2:9090"]);
    etcd.restart().expect("restart");
    etcd.wait_healthy(Duration::from_secs(20))
        .await
        .expect("healthy");
    running.wait_state(false, Duration::from_secs(20)).await;
    sim.put(&pod("b", "127.0.0.3", now)).await.expect("put");
    running
        .wait_peers(
            &["127.0.0.2:9090", "127.0.0.3:9090"],
            Duration::from_secs(5),
        )
        .await;
}

// ---- client mTLS on a 3-member cluster ------------------------------------

#[tokio::test]
async fn v3_over_client_mtls_on_a_three_member_cluster() {
    let block = next_block();
    let ips: Vec<Ipv4Addr> = (2..5).map(|h| Ipv4Addr::from(block | h)).collect();
    let pki = Pki::generate("podcache test etcd CA", &ips);
    let ports: Vec<(u16, u16)> = ips
        .iter()
        .map(|ip| {
            let client = free_low_port(*ip).expect("port");
            let mut peer = free_low_port(*ip).expect("port");
            while peer == client {
                peer = free_low_port(*ip).expect("port");
            }
            (client, peer)
        })
        .collect();
    let initial_cluster = ips
        .iter()
        .zip(&ports)
        .enumerate()
        .map(|(i, (ip, (_, peer)))| format!("m{i}=http://{ip}:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut members: Vec<LocalEtcd> = ips
        .iter()
        .zip(&ports)
        .enumerate()
        .map(|(i, (ip, (client_port, peer_port)))| {
            LocalEtcd::spawn(MemberSpec {
                name: format!("m{i}"),
                ip: *ip,
                client_port: *client_port,
                peer_port: *peer_port,
                initial_cluster: initial_cluster.clone(),
                tls: Some(MemberTls {
                    ca: pki.path("ca.pem"),
                    cert: pki.path("server.pem"),
                    key: pki.path("server-key.pem"),
                }),
            })
            .expect("member starts")
        })
        .collect();
    let settings = EtcdSettings {
        endpoints: members.iter().map(LocalEtcd::client_url).collect(),
        tls: EtcdTls {
            ca: Some(pki.path("ca.pem")),
            cert: Some(pki.path("client.pem")),
            key: Some(pki.path("client-key.pem")),
        },
        timeout: Duration::from_secs(3),
    };
    let client = EtcdClient::connect(&settings).expect("client");
    let mut healthy = false;
    for _ in 0..200 {
        if client.range_prefix(b"/registry/").await.is_ok() {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(healthy, "the TLS cluster never answered");

    // Without a client certificate etcd refuses the connection.
    let anonymous = EtcdClient::connect(&EtcdSettings {
        tls: EtcdTls {
            ca: Some(pki.path("ca.pem")),
            cert: None,
            key: None,
        },
        ..settings.clone()
    })
    .expect("client");
    assert!(anonymous.range_prefix(b"/registry/").await.is_err());

    let sim = PodSimulator::new(client, PodEncoding::Protobuf);
    let now = podcache::node::unix_ms() as i64;
    sim.put(&pod("a", "127.0.0.2", now)).await.expect("put");
    let mut running = run(
        EtcdDiscovery::new(settings.clone(), hello_filter()),
        "127.0.0.1",
    );
    running
        .wait_peers(&["127.0.0.2:9090"], Duration::from_secs(10))
        .await;
    // One member down: the other two elect a leader if needed and keep
    // answering; the write is retried until they do.
    members[0].kill();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while let Err(err) = sim.put(&pod("b", "127.0.0.3", now)).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the two members never answered: {err}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running
        .wait_peers(
            &["127.0.0.2:9090", "127.0.0.3:9090"],
            Duration::from_secs(15),
        )
        .await;
}

/// Three nodes on etcd-lease discovery: they register, find each other,
/// replicate; a node that shuts down leaves at once (its lease is revoked,
/// long before it would expire); and after etcd comes back with no data at
/// all, every node registers again by itself.
#[tokio::test]
async fn lease_nodes_register_find_each_other_leave_on_shutdown_and_reregister_after_etcd_lost() {
    let mut etcd = LocalEtcd::start().await.expect("etcd");
    let block = next_block();
    let prefix = format!("/podcache-test/{block}/");
    let lease = EtcdLeaseDiscovery {
        settings: etcd.settings(),
        prefix: prefix.clone(),
        // Long enough that an expiry cannot explain a prompt departure.
        lease_ttl: Duration::from_secs(60),
    };
    let grpc_port = free_low_port(Ipv4Addr::from(block | 2)).expect("port");
    let mut nodes = Vec::new();
    for host in 2..=4 {
        let ip = Ipv4Addr::from(block | host);
        let mut config = NodeConfig::for_test(ip);
        config.pod_name = format!("lease-{host}");
        config.grpc_addr = std::net::SocketAddr::new(ip.into(), grpc_port);
        let node = NodeBuilder::new(config)
            .discovery(lease.clone())
            .start()
            .await
            .expect("node");
        node.wait_ready().await;
        nodes.push(node);
    }
    let etcd_settings = etcd.settings();
    let registered = || {
        let client = EtcdClient::connect(&etcd_settings).expect("client");
        let prefix = prefix.clone();
        async move {
            let (kvs, _) = client
                .range_prefix(prefix.as_bytes())
                .await
                .unwrap_or_default();
            kvs.len()
        }
    };
    for node in &nodes {
        wait_for_peers(node, 2, Duration::from_secs(5)).await;
    }
    assert_eq!(registered().await, 3);
    nodes[0].set(1, "flag", "on", None).await.expect("set");
    for node in &nodes {
        wait_until("write spreads", Duration::from_secs(5), || async {
            node.get(1, "flag").as_deref() == Some("on")
        })
        .await;
    }

    let leaving = nodes.pop().expect("three nodes");
    leaving.shutdown().await;
    wait_until(
        "deregistered well before the 60 s lease ends",
        Duration::from_secs(3),
        || async { registered().await == 2 },
    )
    .await;
    for node in &nodes {
        wait_until("one peer left", Duration::from_secs(3), || async {
            peers_seen(node).await.0 == 1
        })
        .await;
    }

    etcd.restart_empty().expect("etcd restarts empty");
    etcd.wait_healthy(Duration::from_secs(20))
        .await
        .expect("etcd back");
    wait_until(
        "both nodes registered again",
        Duration::from_secs(20),
        || async { registered().await == 2 },
    )
    .await;
    for node in &nodes {
        wait_until(
            "fresh again with one peer",
            Duration::from_secs(10),
            || async { peers_seen(node).await == (1, "fresh".to_owned()) },
        )
        .await;
    }
    assert!(
        nodes[0].render_metrics().contains("reason=\"error\""),
        "the lost registration went through the relist path"
    );
    for node in nodes {
        node.shutdown().await;
    }
}
