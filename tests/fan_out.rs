//! State-based fan-out over real nodes: a write burst larger than anything
//! a queue would hold reaches every live replica by fan-out alone, with
//! nothing dropped; and a replica only ever shows a prefix of a writer's
//! history, epochs cut into several requests included.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Cluster, wait_until};
use hyper::{Method, StatusCode};
use podcache::NodeConfig;

/// Anti-entropy pushed out of every test's time: what arrives came by
/// fan-out.
fn fan_out_only(config: &mut NodeConfig) {
    config.anti_entropy_interval = Duration::from_secs(600);
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

async fn metrics(cluster: &Cluster, i: usize) -> String {
    cluster
        .client(i)
        .get("/metrics")
        .await
        .expect("metrics")
        .text()
}

#[tokio::test]
async fn a_write_burst_reaches_every_live_replica_by_fan_out_with_nothing_dropped() {
    let cluster = Cluster::start_with(3, fan_out_only).await;
    const TY: i32 = 9;
    let written = Arc::new(AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let client = cluster.client(0);
            let written = written.clone();
            tokio::spawn(async move {
                let mut batch = 0u64;
                // Bounded: stops at the deadline.
                while tokio::time::Instant::now() < deadline {
                    let body: BTreeMap<String, String> = (0..16)
                        .map(|k| (format!("w{w}-b{batch}-k{k}"), "x".repeat(100)))
                        .collect();
                    let body = serde_json::to_vec(&body).expect("json");
                    let answer = client
                        .request(Method::POST, &format!("/v1/cache/{TY}"), body)
                        .await
                        .expect("batch");
                    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
                    written.fetch_add(16, Ordering::Relaxed);
                    batch += 1;
                }
            })
        })
        .collect();
    // While the burst runs, what waits for the replicas is visible.
    let mut most_pending = 0;
    while tokio::time::Instant::now() < deadline {
        let text = metrics(&cluster, 0).await;
        most_pending = most_pending.max(metric(&text, "podcache_replication_pending_entries"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    let total = written.load(Ordering::Relaxed);
    eprintln!("burst: {total} entries written, at most {most_pending} pending at once");
    let entries = format!("podcache_entries{{type=\"{TY}\"}}");
    for i in 1..3 {
        wait_until(
            "the replica holds every entry of the burst",
            Duration::from_secs(10),
            || async { metric(&metrics(&cluster, i).await, &entries) == total },
        )
        .await;
    }
    let text = metrics(&cluster, 0).await;
    assert_eq!(
        metric(&text, "podcache_replication_entries_dropped_total"),
        0,
        "{text}"
    );
    for i in 0..3 {
        let text = metrics(&cluster, i).await;
        assert_eq!(
            metric(&text, "podcache_anti_entropy_repaired_entries_total"),
            0,
            "fan-out alone delivered: {text}"
        );
    }
    wait_until("nothing left pending", Duration::from_secs(5), || async {
        metric(
            &metrics(&cluster, 0).await,
            "podcache_replication_pending_entries",
        ) == 0
    })
    .await;
    cluster.shutdown().await;
}

/// The writer's history, as (key, value) in version order: values count up.
type History = Vec<(String, u64)>;

/// Panics unless `snapshot` is the writer's state at one moment of
/// `history`: for the newest value it shows, every key holds at least its
/// last value written before that one.
fn assert_prefix(history: &History, snapshot: &BTreeMap<String, u64>, node: usize) {
    let Some(&newest) = snapshot.values().max() else {
        return;
    };
    let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
    for (key, value) in history.iter().take_while(|(_, v)| *v <= newest) {
        expected.insert(key, *value);
    }
    for (key, value) in expected {
        let held = snapshot.get(key).copied().unwrap_or(0);
        assert!(
            held >= value,
            "node {node} shows value {newest} but {key}={held}, older than {value} written before it"
        );
    }
}

#[tokio::test]
async fn a_replica_only_ever_shows_a_prefix_of_a_writers_history() {
    // Small requests, so that an epoch of a few dozen entries takes several
    // and the receiver must hold them back until the last.
    let cluster = Cluster::start_with(3, |c| {
        fan_out_only(c);
        c.max_batch_bytes = 1024;
    })
    .await;
    const TY: i32 = 11;
    const KEYS: u64 = 40;
    let history = Arc::new(std::sync::Mutex::new(History::new()));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let client = cluster.client(0);
        let history = history.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut counter = 0u64;
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            for round in 0..400u64 {
                // A batch of distinct hot keys, values counting up in the
                // key order the node stamps them in.
                let mut keys: Vec<u64> = (0..30)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed % KEYS
                    })
                    .collect();
                keys.sort_unstable();
                keys.dedup();
                let mut names: Vec<String> = keys.iter().map(|k| format!("k{k:02}")).collect();
                names.sort();
                let mut body = BTreeMap::new();
                let mut written = Vec::new();
                for name in names {
                    counter += 1;
                    body.insert(name.clone(), counter.to_string());
                    written.push((name, counter));
                }
                // Recorded before the answer: a replica may show it as soon
                // as it is stored.
                history.lock().expect("history").extend(written);
                let answer = client
                    .request(
                        Method::POST,
                        &format!("/v1/cache/{TY}"),
                        serde_json::to_vec(&body).expect("json"),
                    )
                    .await
                    .expect("batch");
                assert_eq!(answer.status, StatusCode::OK, "round {round}");
            }
            done.store(true, Ordering::Release);
        })
    };
    let mut snapshots = 0;
    loop {
        let finished = done.load(Ordering::Acquire);
        for node in 1..3 {
            let list = cluster
                .client(node)
                .get(&format!("/v1/cache/{TY}"))
                .await
                .expect("list")
                .json();
            let snapshot: BTreeMap<String, u64> = list["entries"]
                .as_object()
                .expect("entries")
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.parse().ok()?)))
                .collect();
            let history = history.lock().expect("history").clone();
            assert_prefix(&history, &snapshot, node);
            snapshots += 1;
        }
        if finished {
            break;
        }
    }
    writer.await.expect("writer");
    let last = history.lock().expect("history").last().map(|(_, v)| *v);
    for node in 1..3 {
        let client = cluster.client(node);
        wait_until(
            "the replica holds the last write",
            Duration::from_secs(10),
            || {
                let client = client.clone();
                async move {
                    let list = client
                        .get(&format!("/v1/cache/{TY}"))
                        .await
                        .expect("list")
                        .json();
                    let newest = list["entries"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter_map(|(_, v)| v.as_str()?.parse::<u64>().ok())
                        .max();
                    newest == last
                }
            },
        )
        .await;
    }
    let text = metrics(&cluster, 0).await;
    let requests = metric(&text, "podcache_replication_batches_sent_total");
    let epochs = metric(&text, "podcache_replication_epochs_sent_total");
    assert!(
        requests > epochs && epochs > 0,
        "epochs went in several requests: {requests} requests, {epochs} epochs"
    );
    eprintln!("{snapshots} snapshots checked");
    cluster.shutdown().await;
}
