//! Interoperation with an independent implementation of the original
//! `hellorpc.Sync` service: a Python peer generated from
//! `proto/hellorpc.proto` with grpcio-tools (`tests/interop/legacy_peer.py`),
//! run in the venv that `scripts/test` creates. All four directions:
//! podcache pushes writes to it, it pushes `Set` to podcache, podcache
//! bootstraps from it (falling back to `GetAll`), and it calls `GetAll` on
//! podcache and gets everything.

mod common;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::{next_block, wait_until};
use podcache::discovery::StaticPeers;
use podcache::proto::hellorpc::{SyncRequest, sync_client::SyncClient};
use podcache::{NodeBuilder, NodeConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

fn python() -> PathBuf {
    common::venv_python("grpcio and grpcio-tools")
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/legacy_peer.py")
}

struct LegacyPeer {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl LegacyPeer {
    async fn start(addr: String, seeds: &[&str]) -> Self {
        let mut child = Command::new(python())
            .arg(script())
            .arg("serve")
            .arg(&addr)
            .args(seeds)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut peer = Self {
            child,
            lines: BufReader::new(stdout).lines(),
        };
        let ready = peer.next_line(Duration::from_secs(30)).await;
        assert!(ready.starts_with("READY"), "unexpected first line: {ready}");
        peer
    }

    async fn next_line(&mut self, timeout: Duration) -> String {
        tokio::time::timeout(timeout, self.lines.next_line())
            .await
            .expect("a line from the Python peer in time")
            .expect("readable")
            .expect("the Python peer is still running")
    }

    async fn stop(mut self) {
        drop(self.child.stdin.take()); // closing stdin ends `serve`
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

async fn run_client(args: &[&str]) -> Value {
    let out = Command::new(python())
        .arg(script())
        .args(args)
        .output()
        .await
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON answer")
}

fn free_port(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::test]
async fn podcache_and_an_original_hellorpc_peer_interoperate_in_all_four_directions() {
    let block = next_block();
    let (py_ip, pc_ip) = (Ipv4Addr::from(block | 2), Ipv4Addr::from(block | 3));
    let port = free_port(py_ip);
    let py_addr = format!("{py_ip}:{port}");
    let mut legacy = LegacyPeer::start(
        py_addr.clone(),
        &["7:seeded=from-python", "7:other=x", "8:k=v"],
    )
    .await;

    // Direction 3: podcache bootstraps from the original peer via GetAll.
    let mut config = NodeConfig::for_test(pc_ip);
    config.grpc_addr = std::net::SocketAddr::new(pc_ip.into(), port);
    let node = NodeBuilder::new(config)
        .discovery(StaticPeers::new([py_addr.clone()]).discovery())
        .start()
        .await
        .expect("podcache starts");
    wait_until("podcache ready", Duration::from_secs(15), || async {
        node.is_ready()
    })
    .await;
    let report = node.bootstrap_report().expect("report");
    assert_eq!(report.method, "getall");
    assert_eq!(report.source.as_deref(), Some(py_addr.as_str()));
    assert_eq!(node.get(7, "seeded").as_deref(), Some("from-python"));
    assert_eq!(node.get(8, "k").as_deref(), Some("v"));

    // Direction 1: podcache pushes its writes to the original peer as Set.
    node.set(9, "pushed", "from-podcache", None)
        .await
        .expect("set");
    let line = legacy.next_line(Duration::from_secs(10)).await;
    let pushed: Value =
        serde_json::from_str(line.strip_prefix("SET ").expect("a Set arrived")).expect("JSON");
    assert_eq!(
        pushed,
        json!([{"type": 9, "data": {"pushed": "from-podcache"}}])
    );
    let mut client = SyncClient::connect(format!("http://{py_addr}"))
        .await
        .expect("connect");
    let all = client
        .get_all(SyncRequest { data: vec![] })
        .await
        .expect("getall")
        .into_inner();
    let nine = all
        .data
        .iter()
        .find(|d| d.r#type == 9)
        .expect("type 9 on the peer");
    assert_eq!(
        nine.data.get("pushed").map(String::as_str),
        Some("from-podcache")
    );
    let http = node.http_addr().expect("http");
    let view = podcache::client::RestClient::new(&http.to_string())
        .expect("client")
        .get("/v1/cluster")
        .await
        .expect("cluster")
        .json();
    assert_eq!(view["peers"][0]["legacy"], true, "{view}");

    // Direction 2: the original peer pushes Set to podcache.
    let pc_grpc = node.grpc_addr().to_string();
    let applied = run_client(&["set", &pc_grpc, "11", "a=1", "b=2"]).await;
    assert_eq!(applied, json!([{"type": 11, "data": {"a": "1", "b": "2"}}]));
    assert_eq!(node.get(11, "a").as_deref(), Some("1"));
    let got = run_client(&["get", &pc_grpc, "11", "a", "missing"]).await;
    assert_eq!(got, json!([{"type": 11, "data": {"a": "1"}}]));

    // Direction 4: the original peer calls GetAll on podcache and gets
    // everything, per type.
    let everything = run_client(&["getall", &pc_grpc]).await;
    let expected: Vec<Value> = node
        .snapshot()
        .into_iter()
        .map(|(ty, data)| json!({"type": ty, "data": data}))
        .collect();
    assert_eq!(everything, Value::Array(expected));
    assert_eq!(everything.as_array().map(Vec::len), Some(4), "{everything}");
    let only_eight = run_client(&["getall", &pc_grpc, "8"]).await;
    assert_eq!(only_eight, json!([{"type": 8, "data": {"k": "v"}}]));

    node.shutdown().await;
    legacy.stop().await;
}
