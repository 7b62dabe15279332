//! The benchmark cannot rot: the load tool is built with the tests and run
//! for a moment against a small podcache cluster (no timing is asserted,
//! only that it works and reports figures).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use podcache::discovery::StaticPeers;
use podcache::{NodeBuilder, NodeConfig, NodeHandle};

const BIN: &str = env!("CARGO_BIN_EXE_podcache-bench");

async fn cluster(n: u8) -> Vec<NodeHandle> {
    // A block of its own (127.250.<pid>.x) and one gRPC port for all nodes.
    let block = (std::process::id() % 250) as u8;
    let ip = |i: u8| Ipv4Addr::new(127, 250, block, 2 + i);
    let port = std::net::TcpListener::bind((ip(0), 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let peers = StaticPeers::new((0..n).map(|i| SocketAddr::new(ip(i).into(), port).to_string()));
    let mut nodes = Vec::new();
    for i in 0..n {
        let mut config = NodeConfig::for_test(ip(i));
        config.grpc_addr = SocketAddr::new(ip(i).into(), port);
        config.ofrep_type = Some(1);
        let node = NodeBuilder::new(config)
            .discovery(peers.discovery())
            .start()
            .await
            .expect("node");
        while !node.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        nodes.push(node);
    }
    nodes
}

/// The writes a node served over REST (its `podcache_requests_total{op="set"}`).
fn sets(node: &NodeHandle) -> u64 {
    node.render_metrics()
        .lines()
        .find_map(|line| line.strip_prefix("podcache_requests_total{op=\"set\"} "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn run(targets: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["--system", "podcache", "--targets", targets])
        .args(["--warmup", "0.2", "--duration", "1", "--connections", "4"])
        .args(args)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_tool_runs_every_workload_against_podcache() {
    let nodes = cluster(3).await;
    let targets: Vec<String> = nodes
        .iter()
        .map(|n| n.http_addr().expect("http").to_string())
        .collect();
    let targets = targets.join(",");
    for workload in ["write", "batch", "read", "ofrep"] {
        let result = tokio::task::block_in_place(|| {
            run(&targets, &["--workload", workload, "--keys", "1000"])
        });
        assert!(
            result["ops"].as_u64().is_some_and(|n| n > 0),
            "{workload}: {result}"
        );
        assert_eq!(result["errors"], 0, "{workload}: {result}");
        assert!(
            result["p99_us"].as_u64().is_some_and(|n| n > 0),
            "{workload}: {result}"
        );
    }
    // Spread over the nodes: every node took some of the writes.
    for spread in ["new", "kept"] {
        let before: Vec<u64> = nodes.iter().map(sets).collect();
        let result = tokio::task::block_in_place(|| {
            run(
                &targets,
                &["--workload", "write", "--spread", spread, "--keys", "1000"],
            )
        });
        assert!(
            result["ops"].as_u64().is_some_and(|n| n > 0),
            "{spread}: {result}"
        );
        assert_eq!(result["errors"], 0, "{spread}: {result}");
        for (node, before) in nodes.iter().zip(before) {
            assert!(
                sets(node) > before,
                "{spread}: every node took writes: {result}"
            );
        }
    }
    for observe in ["watch", "poll"] {
        let lag = tokio::task::block_in_place(|| {
            run(
                &targets,
                &[
                    "--workload",
                    "lag",
                    "--observe",
                    observe,
                    "--probe-rate",
                    "50",
                    "--keys",
                    "1000",
                ],
            )
        });
        assert!(lag["probes"].as_u64().is_some_and(|n| n > 10), "{lag}");
        assert_eq!(
            lag["missing"], 0,
            "{observe}: every probe arrived on every replica: {lag}"
        );
    }
    let fill =
        tokio::task::block_in_place(|| run(&targets, &["--workload", "fill", "--keys", "5000"]));
    assert_eq!(fill["entries"], 5000);
    assert_eq!(nodes[0].snapshot().get(&1).map(|m| m.len()), Some(5000));
    for node in nodes {
        node.shutdown().await;
    }
}

/// The HTTP ceiling server answers the load tool's PUTs and GETs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ceiling_server_answers_the_write_and_read_loads() {
    let block = (std::process::id() % 250) as u8;
    let addr = SocketAddr::new(Ipv4Addr::new(127, 251, block, 2).into(), 0);
    let port = std::net::TcpListener::bind(addr)
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let addr = SocketAddr::new(addr.ip(), port);
    let _server = Stopped(
        Command::new(env!("CARGO_BIN_EXE_podcache-ceiling"))
            .args(["--listen", &addr.to_string()])
            .spawn()
            .expect("starts"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ceiling server listens"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let target = format!("{addr},{addr}");
    for workload in ["write", "read"] {
        let result = tokio::task::block_in_place(|| run(&target, &["--workload", workload]));
        assert!(
            result["ops"].as_u64().is_some_and(|n| n > 0),
            "{workload}: {result}"
        );
        assert_eq!(result["errors"], 0, "{workload}: {result}");
    }
}

/// A child process stopped when the test ends, failed or not (a failed
/// assertion must not leave the server running, holding the test's output).
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
