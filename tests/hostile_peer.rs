//! A hostile client on the gRPC port of one replica of a plain-text cluster
//! (the case mutual TLS exists for; with TLS it could not even connect):
//! versions from far in the future, tombstones for everything, a flood of
//! the original `Set`, connections that say nothing, and messages over the
//! size limit. The node must stay up, the other replicas must keep
//! converging through it, and the metrics must show what was refused.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Cluster, wait_until};
use podcache::proto::hellorpc::{SyncData, SyncRequest, sync_client::SyncClient};
use podcache::proto::podcache::replica_client::ReplicaClient;
use podcache::proto::podcache::{Entry, NodeInfo, ReplicateRequest};
use tokio::io::AsyncWriteExt;

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn impostor() -> NodeInfo {
    NodeInfo {
        node_id: 666,
        name: "impostor".into(),
        grpc_addr: "127.0.0.1:1".into(),
        started_at_ms: 1,
        pod_ip: "127.0.0.1".into(),
        host_ip: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_client_is_refused_and_the_other_replicas_keep_converging() {
    let cluster = Cluster::start_with(3, |c| {
        c.limits.max_entries_per_type = 300;
        c.max_connections = 40;
        c.max_grpc_message_bytes = 1024 * 1024;
        c.max_batch_bytes = 256 * 1024;
        c.snapshot_chunk_bytes = 256 * 1024;
        c.limits.max_value_bytes = 64 * 1024;
    })
    .await;
    for i in 0..10 {
        cluster
            .client(1)
            .put(1, &format!("k{i}"), "precious", "wait=all")
            .await
            .expect("seed");
    }
    let target = cluster.grpc_addr(0);
    let url = format!("http://{target}");

    // 1. Tombstones for every key, and overwrites, from an hour ahead.
    let far_future = (podcache::node::unix_ms() + 3_600_000) << 16;
    let mut replica = ReplicaClient::connect(url.clone()).await.expect("connect");
    let entries: Vec<Entry> = (0..10)
        .flat_map(|i| {
            [true, false].map(|deleted| Entry {
                r#type: 1,
                key: format!("k{i}"),
                value: if deleted {
                    String::new()
                } else {
                    "pwned".into()
                },
                deleted,
                hlc: far_future,
                node: 666,
                expires_at_ms: 0,
                ..Default::default()
            })
        })
        .collect();
    let answer = replica
        .replicate(ReplicateRequest {
            sender: Some(impostor()),
            entries,
            ..Default::default()
        })
        .await
        .expect("answered")
        .into_inner();
    assert_eq!((answer.applied, answer.rejected), (0, 20));

    // An author, origin or reason past 256 bytes is refused, not stored.
    let padded = |field: &str| {
        let mut e = Entry {
            r#type: 1,
            key: format!("long-{field}"),
            value: "v".into(),
            hlc: podcache::node::unix_ms() << 16,
            node: 666,
            ..Default::default()
        };
        let long = "a".repeat(257);
        match field {
            "author" => e.author = long,
            "origin" => e.origin = long,
            _ => e.reason = long,
        }
        e
    };
    let answer = replica
        .replicate(ReplicateRequest {
            sender: Some(impostor()),
            entries: ["author", "origin", "reason"].map(padded).to_vec(),
            ..Default::default()
        })
        .await
        .expect("answered")
        .into_inner();
    assert_eq!((answer.applied, answer.rejected), (0, 3));

    // 2. A message over the size limit, refused before it is decoded.
    let mut big = ReplicaClient::connect(url.clone())
        .await
        .expect("connect")
        .max_encoding_message_size(usize::MAX);
    let huge = Entry {
        r#type: 1,
        key: "k0".into(),
        value: "x".repeat(2 * 1024 * 1024),
        deleted: false,
        hlc: podcache::node::unix_ms() << 16,
        node: 666,
        expires_at_ms: 0,
        ..Default::default()
    };
    assert!(
        big.replicate(ReplicateRequest {
            sender: Some(impostor()),
            entries: vec![huge],
            ..Default::default()
        })
        .await
        .is_err()
    );

    // 3. Connections that never say anything: past the cap they are closed
    //    on accept, the others are closed after the handshake deadline.
    let mut silent = Vec::new();
    for _ in 0..60 {
        if let Ok(socket) = tokio::net::TcpStream::connect(&target).await {
            silent.push(socket);
        }
    }

    // 4. A flood of the original Set with new keys, 8 at a time.
    let mut refused_full = 0;
    let mut flood = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let url = url.clone();
        flood.spawn(async move {
            let mut full = 0;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let mut i = 0;
            while i < 100 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the flood never got through"
                );
                // While the silent connections hold the cap, a new
                // connection is closed on accept: connect again shortly.
                // Every call is bounded, so that a stalled connection is
                // retried (and the deadline above can fail the test)
                // instead of hanging it.
                let Ok(Ok(mut sync)) =
                    tokio::time::timeout(Duration::from_secs(5), SyncClient::connect(url.clone()))
                        .await
                else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                while i < 100 {
                    let request = SyncRequest {
                        data: vec![SyncData {
                            r#type: 9,
                            data: HashMap::from([(format!("flood-{worker}-{i}"), "junk".into())]),
                        }],
                    };
                    let answer = tokio::time::timeout(Duration::from_secs(5), sync.set(request));
                    match answer.await {
                        Ok(Ok(_)) => i += 1,
                        Ok(Err(status)) if status.code() == tonic::Code::ResourceExhausted => {
                            full += 1;
                            i += 1;
                        }
                        // The connection was closed on accept (or stalled).
                        _ => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            break;
                        }
                    }
                }
            }
            full
        });
    }

    // Meanwhile the honest replicas keep writing and converging, through
    // the node under attack too.
    cluster
        .client(2)
        .put(1, "during", "the attack", "")
        .await
        .expect("put");
    for i in 0..3 {
        wait_until(
            "honest writes converge",
            Duration::from_secs(10),
            || async { cluster.node(i).get(1, "during").as_deref() == Some("the attack") },
        )
        .await;
    }
    while let Some(result) = flood.join_next().await {
        refused_full += result.expect("flood worker");
    }
    for socket in &mut silent {
        let _ = socket.shutdown().await;
    }
    drop(silent);

    // Nothing of the honest state was lost or changed, on any replica.
    for i in 0..3 {
        let node = cluster.node(i);
        wait_until("states equal", Duration::from_secs(10), || async {
            (0..10).all(|k| node.get(1, &format!("k{k}")).as_deref() == Some("precious"))
                && node.snapshot().get(&9).map_or(0, |ns| ns.len()) <= 300
        })
        .await;
    }
    assert_eq!(
        refused_full,
        800 - 300,
        "the flood stopped at the entry limit"
    );
    wait_until(
        "the flood spreads to every replica",
        Duration::from_secs(10),
        || async {
            (0..3).all(|i| cluster.node(i).snapshot().get(&9).map_or(0, |ns| ns.len()) == 300)
        },
    )
    .await;

    let metrics = cluster.node(0).render_metrics();
    let clock = metric(
        &metrics,
        "podcache_remote_rejected_entries_total{reason=\"clock_skew\"}",
    );
    let cap = metric(
        &metrics,
        "podcache_connections_refused_total{listener=\"grpc\",reason=\"cap\"}",
    );
    let silent = metric(
        &metrics,
        "podcache_connections_refused_total{listener=\"grpc\",reason=\"silent\"}",
    );
    eprintln!(
        "refused: {clock} entries from the future, {refused_full} flood writes over the \
         entry limit, {cap} connections past the cap, {silent} silent connections"
    );
    assert_eq!(clock, 20.0);
    assert!(cap >= 20.0, "{metrics}");
    assert!(silent >= 1.0, "{metrics}");
    tokio::time::timeout(Duration::from_secs(30), cluster.shutdown())
        .await
        .expect("every node shut down within its grace period");
}
