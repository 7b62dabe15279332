//! Anti-entropy over real sockets: nodes converge on writes fan-out never
//! delivered, a peer down past the retention is released and repaired when
//! it returns, and a node cut off longer than the tombstone grace resyncs
//! instead of bringing deleted keys back.

mod common;

use std::time::Duration;

use common::{Cluster, wait_until};
use podcache::NodeConfig;

fn fast(config: &mut NodeConfig) {
    config.anti_entropy_interval = Duration::from_millis(200);
    config.tombstone_grace = Duration::from_secs(3);
}

async fn entries(cluster: &Cluster, i: usize, ty: i32) -> serde_json::Value {
    cluster
        .client(i)
        .get(&format!("/v1/cache/{ty}"))
        .await
        .expect("list")
        .json()["entries"]
        .clone()
}

/// Writes `key` in type 2 on node 0 with `?wait=all`; the answer.
async fn put_waiting(cluster: &Cluster, key: &str) -> serde_json::Value {
    cluster
        .client(0)
        .put(2, key, "v", "wait=all")
        .await
        .expect("put")
        .json()
}

/// Node `i`'s `/v1/cluster` answer.
async fn cluster_view(cluster: &Cluster, i: usize) -> serde_json::Value {
    cluster
        .client(i)
        .get("/v1/cluster")
        .await
        .expect("cluster")
        .json()
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn anti_entropy_repairs_writes_that_fan_out_never_delivered_both_ways() {
    let cluster = Cluster::start_with_own_lists(3, fast).await;
    // Node 2 is unknown to 0 and 1, and knows nobody: no fan-out either way.
    cluster.set_peers(0, &[1], &[]);
    cluster.set_peers(1, &[0], &[]);
    cluster.set_peers(2, &[], &[]);
    wait_until(
        "node 2 dropped from the others' links",
        Duration::from_secs(5),
        || async {
            cluster
                .client(0)
                .get("/v1/cluster")
                .await
                .expect("cluster")
                .json()["peers"]
                .as_array()
                .is_some_and(|p| p.len() == 1)
        },
    )
    .await;
    for i in 0..40 {
        cluster
            .client(i % 2)
            .put(1, &format!("main-{i}"), "x", "")
            .await
            .expect("put");
    }
    for i in 0..10 {
        cluster
            .client(2)
            .put(1, &format!("island-{i}"), "y", "")
            .await
            .expect("put");
    }
    cluster
        .client(0)
        .delete(1, "main-0", "")
        .await
        .expect("delete");
    tokio::time::sleep(Duration::from_millis(50)).await; // (fan-out between 0 and 1 lands; not a sync point)
    assert_eq!(
        entries(&cluster, 2, 1).await.as_object().map(|m| m.len()),
        Some(10)
    );
    // Node 2 joins back: nothing is fanned out again, anti-entropy alone
    // must bring the 39 + 10 entries (and the tombstone) together.
    cluster.heal();
    let started = tokio::time::Instant::now();
    wait_until("all three identical", Duration::from_secs(10), || async {
        let a = entries(&cluster, 0, 1).await;
        a.as_object().is_some_and(|m| m.len() == 49)
            && entries(&cluster, 1, 1).await == a
            && entries(&cluster, 2, 1).await == a
    })
    .await;
    let took = started.elapsed();
    assert!(
        entries(&cluster, 2, 1).await.get("main-0").is_none(),
        "the delete was repaired too"
    );
    let mut repaired = 0;
    for i in 0..3 {
        let text = cluster
            .client(i)
            .get("/metrics")
            .await
            .expect("metrics")
            .text();
        repaired += metric(&text, "podcache_anti_entropy_repaired_entries_total");
    }
    assert!(
        repaired >= 11,
        "anti-entropy, not fan-out, moved the entries: {repaired}"
    );
    eprintln!("converged {took:?} after healing");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_peer_down_past_the_retention_is_released_and_repaired_when_it_returns() {
    let mut cluster = Cluster::start_with(2, |c| {
        fast(c);
        c.down_peer_retention = Duration::from_secs(1);
    })
    .await;
    cluster.kill(1).await;
    // Node 1 is down: node 0 holds its writes for it, for the retention.
    for i in 0..200 {
        cluster
            .client(0)
            .put(2, &format!("k{i}"), "v", "")
            .await
            .expect("put");
    }
    let view = cluster_view(&cluster, 0).await;
    assert_eq!(view["peers"][0]["released"], false, "{view}");
    assert_eq!(view["peers"][0]["pending_entries"], 200, "{view}");
    wait_until(
        "the down peer is released",
        Duration::from_secs(10),
        || async { cluster_view(&cluster, 0).await["peers"][0]["released"] == true },
    )
    .await;
    let view = cluster_view(&cluster, 0).await;
    assert_eq!(view["peers"][0]["pending_entries"], 0, "{view}");
    let text = cluster
        .client(0)
        .get("/metrics")
        .await
        .expect("metrics")
        .text();
    assert_eq!(
        metric(&text, "podcache_replication_entries_dropped_total{peer=\""),
        200,
        "{text}"
    );
    // Released: writes are not held for it, and waiting says so.
    let answer = put_waiting(&cluster, "while-down").await;
    assert_eq!(
        answer["replication"][0]["status"], "dropped_peer_down",
        "{answer}"
    );
    // Back, with no peers of its own (no bootstrap): repair alone fills it.
    cluster
        .restart_with_peers(
            1,
            podcache::discovery::StaticPeers::new(Vec::<String>::new()),
        )
        .await;
    wait_until(
        "the peer holds all 201",
        Duration::from_secs(15),
        || async {
            entries(&cluster, 1, 2)
                .await
                .as_object()
                .is_some_and(|m| m.len() == 201)
        },
    )
    .await;
    // ... and writes are held for it again.
    wait_until("taken back", Duration::from_secs(10), || async {
        cluster_view(&cluster, 0).await["peers"][0]["released"] == false
    })
    .await;
    let answer = put_waiting(&cluster, "after").await;
    assert_eq!(answer["replication"][0]["status"], "acked", "{answer}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_node_cut_off_past_the_tombstone_grace_resyncs_instead_of_resurrecting() {
    let cluster = Cluster::start_with_own_lists(3, fast).await;
    cluster
        .client(0)
        .put(3, "doomed", "old", "wait=all")
        .await
        .expect("put");
    cluster
        .client(0)
        .put(3, "kept", "old", "wait=all")
        .await
        .expect("put");
    for i in 0..3 {
        assert_eq!(
            cluster
                .client(i)
                .get_value(3, "doomed")
                .await
                .expect("get")
                .as_deref(),
            Some("old")
        );
    }
    // Cut node 2 off: it still believes in peers, but they are unreachable
    // (an address nothing listens on), so it cannot sync and goes stale.
    let nowhere = format!("{}:1", cluster.ip(200));
    cluster.set_peers(0, &[1], &[]);
    cluster.set_peers(1, &[0], &[]);
    cluster.set_peers(2, &[], &[nowhere]);
    cluster
        .client(0)
        .delete(3, "doomed", "wait=all")
        .await
        .expect("delete");
    cluster
        .client(2)
        .put(3, "written-while-away", "new", "")
        .await
        .expect("put");
    // The tombstone is purged on 0 and 1 once the grace has passed.
    for i in 0..2 {
        let client = cluster.client(i);
        wait_until("tombstone purged", Duration::from_secs(20), || {
            let client = client.clone();
            async move {
                let text = client.get("/metrics").await.expect("metrics").text();
                text.contains("podcache_tombstones{type=\"3\"} 0")
            }
        })
        .await;
    }
    assert_eq!(
        cluster
            .client(2)
            .get_value(3, "doomed")
            .await
            .expect("get")
            .as_deref(),
        Some("old")
    );
    cluster.heal();
    wait_until("everyone agrees", Duration::from_secs(15), || async {
        let a = entries(&cluster, 0, 3).await;
        entries(&cluster, 1, 3).await == a
            && entries(&cluster, 2, 3).await == a
            && a.get("written-while-away").is_some()
    })
    .await;
    // The deleted key did not come back, the key written while cut off
    // survived, and node 2 resynced in full.
    for i in 0..3 {
        let state = entries(&cluster, i, 3).await;
        assert!(
            state.get("doomed").is_none(),
            "node {i} resurrected a deleted key: {state}"
        );
        assert_eq!(state["kept"], "old");
        assert_eq!(state["written-while-away"], "new");
    }
    let text = cluster
        .client(2)
        .get("/metrics")
        .await
        .expect("metrics")
        .text();
    assert_eq!(metric(&text, "podcache_full_resyncs_total"), 1, "{text}");
    cluster.shutdown().await;
}
