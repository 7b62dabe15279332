//! The gRPC side over real sockets: health and reflection, validation of
//! what peers send, the bootstrap's fallback to the next oldest peer, a
//! state far larger than one gRPC message, writes during a pull, and
//! draining at shutdown.

mod common;

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use common::{Cluster, next_block, wait_until};
use podcache::discovery::StaticPeers;
use podcache::proto::hellorpc::{SyncData, SyncRequest, sync_client::SyncClient};
use podcache::proto::podcache::replica_client::ReplicaClient;
use podcache::proto::podcache::replica_server::{Replica, ReplicaServer};
use podcache::proto::podcache::{
    DigestRequest, DigestResponse, Entry, HelloRequest, HelloResponse, NodeInfo, RepairRequest,
    RepairResponse, ReplicateRequest, ReplicateResponse, SnapshotChunk, SnapshotRequest,
};
use podcache::{NodeBuilder, NodeConfig};
use tonic::{Code, Request, Response, Status};

fn sender() -> NodeInfo {
    NodeInfo {
        node_id: 42,
        name: "test-client".into(),
        grpc_addr: "127.0.0.1:1".into(),
        started_at_ms: 1,
        pod_ip: "127.0.0.1".into(),
        host_ip: String::new(),
    }
}

#[tokio::test]
async fn health_and_reflection_are_served_on_the_grpc_port() {
    let cluster = Cluster::start(1).await;
    let url = format!("http://{}", cluster.grpc_addr(0));
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("check")
        .into_inner();
    assert_eq!(
        answer.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let reply = stream.message().await.expect("reply").expect("one");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "hellorpc.Sync",
        "podcache.v1.Replica",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn invalid_writes_from_peers_are_refused_and_change_nothing() {
    let cluster = Cluster::start_with(1, |c| {
        c.max_grpc_message_bytes = 1024 * 1024;
        c.max_batch_bytes = 256 * 1024;
        c.snapshot_chunk_bytes = 256 * 1024;
        c.limits.max_value_bytes = 64 * 1024;
    })
    .await;
    let node = cluster.node(0);
    node.set(1, "keep", "original", None).await.expect("seed");
    let url = format!("http://{}", cluster.grpc_addr(0));

    // The original Set: one bad entry refuses the whole request.
    let mut sync = SyncClient::connect(url.clone()).await.expect("connect");
    let bad = SyncRequest {
        data: vec![
            SyncData {
                r#type: 1,
                data: HashMap::from([("keep".into(), "overwritten".into())]),
            },
            SyncData {
                r#type: 1,
                data: HashMap::from([(String::new(), "empty key".into())]),
            },
        ],
    };
    let err = sync.set(bad).await.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("key"), "{}", err.message());

    // Replicate without naming the sender.
    let mut replica = ReplicaClient::connect(url.clone()).await.expect("connect");
    let err = replica
        .replicate(ReplicateRequest {
            sender: None,
            entries: vec![],
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);

    // Entries over a limit or from the far future are refused one by one;
    // the good one in the same request applies.
    let far_future = (podcache::node::unix_ms() + 3_600_000) << 16;
    let entry = |key: &str, value: String, hlc: u64| Entry {
        r#type: 1,
        key: key.into(),
        value,
        deleted: false,
        hlc,
        node: 7,
        expires_at_ms: 0,
        ..Default::default()
    };
    let now = podcache::node::unix_ms() << 16;
    let answer = replica
        .replicate(ReplicateRequest {
            sender: Some(sender()),
            entries: vec![
                entry("keep", "from the future".into(), far_future),
                entry("big", "x".repeat(64 * 1024 + 1), now),
                entry("", "empty".into(), now),
                entry("good", "yes".into(), now),
            ],
            ..Default::default()
        })
        .await
        .expect("partially applied")
        .into_inner();
    assert_eq!((answer.applied, answer.rejected), (1, 3));

    // A message over the gRPC limit is refused before it is decoded.
    let huge = entry("huge", "y".repeat(2 * 1024 * 1024), now);
    let mut big_client = ReplicaClient::connect(url)
        .await
        .expect("connect")
        .max_encoding_message_size(usize::MAX);
    let err = big_client
        .replicate(ReplicateRequest {
            sender: Some(sender()),
            entries: vec![huge],
            ..Default::default()
        })
        .await
        .expect_err("too large");
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );

    assert_eq!(node.get(1, "keep").as_deref(), Some("original"));
    assert_eq!(node.get(1, "good").as_deref(), Some("yes"));
    assert_eq!(node.get(1, "big"), None);
    assert_eq!(node.get(1, "huge"), None);
    let metrics = node.render_metrics();
    assert!(
        metrics.contains("podcache_remote_rejected_entries_total{reason=\"clock_skew\"} 1"),
        "{metrics}"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn replicate_stream_answers_each_batch_in_order_and_ends_at_a_bad_one() {
    let cluster = Cluster::start(1).await;
    let node = cluster.node(0);
    node.set(1, "newer", "held", None).await.expect("seed");
    let url = format!("http://{}", cluster.grpc_addr(0));
    let mut replica = ReplicaClient::connect(url).await.expect("connect");
    let now = podcache::node::unix_ms() << 16;
    let entry = |key: &str, value: &str, hlc: u64| Entry {
        r#type: 1,
        key: key.into(),
        value: value.into(),
        deleted: false,
        hlc,
        node: 7,
        expires_at_ms: 0,
        ..Default::default()
    };
    let batch = |entries| ReplicateRequest {
        sender: Some(sender()),
        entries,
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = replica
        .replicate_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("open")
        .into_inner();
    tx.send(batch(vec![entry("a", "1", now), entry("b", "2", now)]))
        .await
        .expect("send");
    let first = answers.message().await.expect("answer").expect("open");
    assert_eq!((first.applied, first.stale), (2, 0));
    // Older than what the node holds: stale, nothing changes.
    tx.send(batch(vec![entry("newer", "old", 1 << 16)]))
        .await
        .expect("send");
    let second = answers.message().await.expect("answer").expect("open");
    assert_eq!((second.applied, second.stale), (0, 1));
    // A batch that does not name its sender ends the call with an error.
    tx.send(ReplicateRequest {
        sender: None,
        entries: vec![entry("c", "3", now)],
        ..Default::default()
    })
    .await
    .expect("send");
    let err = answers.message().await.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(node.get(1, "a").as_deref(), Some("1"));
    assert_eq!(node.get(1, "b").as_deref(), Some("2"));
    assert_eq!(node.get(1, "newer").as_deref(), Some("held"));
    assert_eq!(node.get(1, "c"), None);
    cluster.shutdown().await;
}

/// A stand-in peer that claims to be the oldest and then fails every
/// snapshot: a real gRPC server speaking podcache.v1.Replica, used only to
/// inject that failure.
struct FailingOldest;

type Chunks = Pin<Box<dyn tokio_stream::Stream<Item = Result<SnapshotChunk, Status>> + Send>>;
type Answers = Pin<Box<dyn tokio_stream::Stream<Item = Result<ReplicateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Replica for FailingOldest {
    async fn hello(&self, _: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        let mut node = sender();
        node.name = "failing-oldest".into();
        Ok(Response::new(HelloResponse {
            node: Some(node),
            ready: true,
            stale: false,
        }))
    }
    async fn replicate(
        &self,
        _: Request<ReplicateRequest>,
    ) -> Result<Response<ReplicateResponse>, Status> {
        Ok(Response::new(ReplicateResponse::default()))
    }
    async fn decide(
        &self,
        _: Request<podcache::proto::podcache::DecideRequest>,
    ) -> Result<Response<podcache::proto::podcache::DecideResponse>, Status> {
        Err(Status::unimplemented(
            "a peer from before conditional writes",
        ))
    }
    type SnapshotStream = Chunks;
    async fn snapshot(&self, _: Request<SnapshotRequest>) -> Result<Response<Chunks>, Status> {
        Err(Status::unavailable("disk on fire"))
    }
    type ReplicateStreamStream = Answers;
    /// Like a podcache from before `ReplicateStream`: the nodes' links fall
    /// back to `Replicate` calls.
    async fn replicate_stream(
        &self,
        _: Request<tonic::Streaming<ReplicateRequest>>,
    ) -> Result<Response<Answers>, Status> {
        Err(Status::unimplemented("not in this version"))
    }
    async fn digest(&self, _: Request<DigestRequest>) -> Result<Response<DigestResponse>, Status> {
        Err(Status::unavailable("disk on fire"))
    }
    async fn repair(&self, _: Request<RepairRequest>) -> Result<Response<RepairResponse>, Status> {
        Err(Status::unavailable("disk on fire"))
    }
}

#[tokio::test]
async fn bootstrap_falls_back_to_the_next_oldest_peer() {
    let mut cluster = Cluster::start(2).await;
    cluster.node(1).set(3, "k", "v", None).await.expect("set");
    common::wait_everywhere(&cluster, 3, "k", Some("v")).await;
    let fake_ip = cluster.ip(20);
    let listener = tokio::net::TcpListener::bind((fake_ip, 0))
        .await
        .expect("bind");
    let fake_addr = listener.local_addr().expect("addr").to_string();
    let fake = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ReplicaServer::new(FailingOldest))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    cluster.peers.add(fake_addr.clone());
    let new = cluster.add_node().await;
    let report = cluster.node(new).bootstrap_report().expect("report");
    assert_eq!(
        report.source.as_deref(),
        Some(cluster.grpc_addr(0).as_str()),
        "{report:?}"
    );
    assert_eq!(report.failed_attempts.len(), 1, "{report:?}");
    assert_eq!(report.failed_attempts[0].0, fake_addr);
    assert!(
        report.failed_attempts[0].1.contains("disk on fire"),
        "{report:?}"
    );
    assert_eq!(cluster.node(new).get(3, "k").as_deref(), Some("v"));
    // The stand-in has no ReplicateStream: writes still reach it, as
    // Replicate calls.
    cluster.node(0).set(3, "k2", "v2", None).await.expect("set");
    let delivered = format!("podcache_replication_batches_sent_total{{peer=\"{fake_addr}\"}}");
    let node = cluster.node(0);
    wait_until(
        "a batch delivered to the stand-in",
        Duration::from_secs(10),
        || {
            let metrics = node.render_metrics();
            let delivered = delivered.clone();
            async move { metrics.contains(&delivered) }
        },
    )
    .await;
    fake.abort();
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_state_many_messages_large_bootstraps_and_writes_during_the_pull_are_kept() {
    let mut cluster = Cluster::start_with(2, |c| {
        c.max_grpc_message_bytes = 1024 * 1024;
        c.max_batch_bytes = 256 * 1024;
        c.snapshot_chunk_bytes = 256 * 1024;
        c.limits.max_value_bytes = 64 * 1024;
    })
    .await;
    // 60,000 entries of ~100 bytes: about six times the gRPC message limit.
    let value = "v".repeat(96);
    for batch in 0..12 {
        let body: HashMap<String, String> = (0..5000)
            .map(|i| (format!("key-{batch:02}-{i:05}"), value.clone()))
            .collect();
        let answer = cluster
            .client(0)
            .request(
                hyper::Method::POST,
                "/v1/cache/1",
                serde_json::to_vec(&body).expect("json"),
            )
            .await
            .expect("batch");
        assert_eq!(answer.status, hyper::StatusCode::OK, "{}", answer.text());
    }
    // While the newcomer pulls, node 1 keeps writing; the newcomer is in the
    // peer list from the start, so those writes reach it mid-pull.
    let writer = {
        let client = cluster.client(1);
        tokio::spawn(async move {
            for i in 0..300 {
                let answer = client
                    .put(2, &format!("during-{i}"), &format!("{i}"), "")
                    .await;
                assert!(answer.is_ok_and(|a| a.status == hyper::StatusCode::OK));
            }
        })
    };
    let new = cluster.add_node_announced_early().await;
    writer.await.expect("writer");
    let report = cluster.node(new).bootstrap_report().expect("report");
    assert_eq!(report.method, "snapshot");
    assert!(report.entries >= 60_000, "{report:?}");
    assert!(report.bytes > 6 * 1024 * 1024, "{report:?}");
    let snapshot = cluster.node(new).snapshot();
    assert_eq!(snapshot.get(&1).map(|m| m.len()), Some(60_000));
    // Progress was exposed as it went, and ended complete.
    let metrics = cluster.node(new).render_metrics();
    let gauge = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
    };
    let total = gauge("podcache_bootstrap_total_entries ").expect("total announced");
    assert!(total >= 60_000, "{metrics}");
    assert_eq!(gauge("podcache_bootstrap_progress_entries "), Some(total));
    let client = cluster.client(new);
    wait_until(
        "every write made during the pull arrived",
        Duration::from_secs(20),
        || {
            let client = client.clone();
            async move {
                let list = client.get("/v1/cache/2").await.expect("list").json();
                list["entries"].as_object().is_some_and(|m| m.len() == 300)
                    && (0..300).all(|i| {
                        list["entries"][format!("during-{i}")].as_str()
                            == Some(i.to_string().as_str())
                    })
            }
        },
    )
    .await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn shutdown_drains_the_fan_out_queues() {
    let block = next_block();
    let ip = |h: u32| std::net::Ipv4Addr::from(block | h);
    // Node b first, so node a can name it as peer.
    let mut config_b = NodeConfig::for_test(ip(3));
    config_b.pod_name = "b".into();
    let b = NodeBuilder::new(config_b).start().await.expect("b");
    let mut config_a = NodeConfig::for_test(ip(2));
    config_a.pod_name = "a".into();
    config_a.shutdown_grace = Duration::from_secs(10);
    let a = NodeBuilder::new(config_a)
        .discovery(StaticPeers::new([b.grpc_addr().to_string()]).discovery())
        .start()
        .await
        .expect("a");
    wait_until("a ready", Duration::from_secs(10), || async {
        a.is_ready()
    })
    .await;
    for i in 0..500 {
        a.set(1, &format!("k{i}"), "v", None).await.expect("set");
    }
    // No waiting for replication: shutdown itself must deliver the backlog.
    a.shutdown().await;
    let held = b.snapshot().get(&1).map(|m| m.len());
    assert_eq!(held, Some(500));
    b.shutdown().await;
}
