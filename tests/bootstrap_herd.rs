//! Many nodes starting at once (scale from zero, a node-pool replacement,
//! `podManagementPolicy: Parallel`) do not all pull their state from the
//! oldest: each node serves a bounded number of snapshots at once and the
//! others are sent elsewhere, and every newcomer still gets the whole state.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Cluster, wait_until};
use hyper::{Method, StatusCode};
use podcache::{NodeBuilder, NodeConfig};
use tokio::net::TcpListener;

const ENTRIES: usize = 100_000;
const BOUND: usize = 2;

fn gauge(text: &str, name: &str) -> i64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map_or(0, |v| v as i64)
}

#[tokio::test]
async fn twelve_empty_nodes_starting_at_once_beside_three_full_ones_all_get_the_state() {
    let bound = |c: &mut NodeConfig| c.max_concurrent_snapshots = BOUND;
    let cluster = Cluster::start_with(3, bound).await;
    for chunk in 0..ENTRIES / 10_000 {
        let body: BTreeMap<String, String> = (0..10_000)
            .map(|i| (format!("k{:06}", chunk * 10_000 + i), "v".repeat(32)))
            .collect();
        let answer = cluster
            .client(0)
            .request(
                Method::POST,
                "/v1/cache/1",
                serde_json::to_vec(&body).expect("json"),
            )
            .await
            .expect("batch");
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    for i in 1..3 {
        let node = cluster.node(i);
        wait_until(
            "replicas hold the state",
            Duration::from_secs(30),
            || async { node.snapshot().get(&1).map_or(0, BTreeMap::len) == ENTRIES },
        )
        .await;
    }
    // Twelve empty nodes, started together, every one listed at once.
    let mut listeners = Vec::new();
    for host in 10..22 {
        let ip = cluster.ip(host);
        let grpc = TcpListener::bind((ip, 0)).await.expect("bind");
        let http = TcpListener::bind((ip, 0)).await.expect("bind");
        cluster
            .peers
            .add(grpc.local_addr().expect("addr").to_string());
        listeners.push((ip, grpc, http));
    }
    let starts = listeners.into_iter().map(|(ip, grpc, http)| {
        let mut config = NodeConfig::for_test(ip);
        config.pod_name = format!("new-{ip}");
        bound(&mut config);
        NodeBuilder::new(config)
            .discovery(cluster.peers.discovery())
            .listeners(http, grpc)
            .start()
    });
    let newcomers: Vec<_> = futures_util::future::join_all(starts)
        .await
        .into_iter()
        .map(|n| n.expect("starts"))
        .collect();
    for node in &newcomers {
        wait_until("newcomer ready", Duration::from_secs(120), || async {
            node.is_ready()
        })
        .await;
        assert_eq!(
            node.snapshot().get(&1).map_or(0, BTreeMap::len),
            ENTRIES,
            "{} is ready with the whole state",
            node.identity().name
        );
    }
    let mut refused = 0;
    let mut served_by = 0;
    for metrics in (0..3)
        .map(|i| cluster.node(i).render_metrics())
        .chain(newcomers.iter().map(|n| n.render_metrics()))
    {
        let most = gauge(&metrics, "podcache_snapshots_serving_max");
        assert!(
            most <= BOUND as i64,
            "a node served {most} snapshots at once"
        );
        served_by += usize::from(most > 0);
        refused += gauge(&metrics, "podcache_snapshots_refused_total");
    }
    eprintln!("{served_by} nodes served snapshots; {refused} pulls were sent elsewhere");
    assert!(served_by > 1, "the load was spread");
    for node in newcomers {
        node.shutdown().await;
    }
    cluster.shutdown().await;
}
