//! The test harness: real nodes on their own loopback addresses, real
//! sockets, a shared static peer list the test edits, and polling with
//! deadlines instead of sleeps.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use podcache::client::RestClient;
use podcache::discovery::StaticPeers;
use podcache::{NodeBuilder, NodeConfig, NodeHandle};
use tokio::net::TcpListener;

/// A distinct 127.x.y.0/24 block per cluster, so tests running in parallel
/// never share an address (and a restarted node gets its own port back).
pub fn next_block() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) + u32::from(std::process::id() as u16) * 64;
    // 127.(16 + n / 256 % 200).(n % 256).0
    (127 << 24) | ((16 + (n / 256) % 200) << 16) | ((n % 256) << 8)
}

/// One slot of the cluster: a node's fixed addresses and, while it runs, its
/// handle.
pub struct Slot {
    pub ip: Ipv4Addr,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub node: Option<NodeHandle>,
}

pub mod discovery_probe;
pub mod pki;
pub mod process;
// The binary's own pod simulator and etcd launcher: the tests drive the
// same code `podcache k8s-sim` and `podcache demo --etcd local` run.
#[path = "../../src/bin/podcache/k8s_sim.rs"]
pub mod k8s_sim;
#[path = "../../src/bin/podcache/local_etcd.rs"]
pub mod local_etcd;

/// A tweak applied to every node's config before it starts.
pub type Configure = std::sync::Arc<dyn Fn(&mut NodeConfig) + Send + Sync>;

pub struct Cluster {
    pub peers: StaticPeers,
    /// With [`Cluster::start_with_own_lists`], each node's own peer list.
    pub lists: Vec<StaticPeers>,
    pub slots: Vec<Slot>,
    block: u32,
    configure: Configure,
}

impl Cluster {
    /// `n` nodes started one after the other (node 0 is the oldest), each
    /// waited for until ready.
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, |_| {}).await
    }

    /// No nodes yet, on a fresh address block.
    fn empty(configure: impl Fn(&mut NodeConfig) + Send + Sync + 'static) -> Self {
        Self {
            peers: StaticPeers::new(Vec::<String>::new()),
            lists: Vec::new(),
            slots: Vec::new(),
            block: next_block(),
            configure: std::sync::Arc::new(configure),
        }
    }

    /// Like [`Cluster::start`], with a config tweak applied to every node.
    pub async fn start_with(
        n: usize,
        configure: impl Fn(&mut NodeConfig) + Send + Sync + 'static,
    ) -> Self {
        let mut cluster = Self::empty(configure);
        for _ in 0..n {
            cluster.add_node().await;
        }
        cluster
    }

    /// `n` nodes, each with its own peer list (so a test can cut some
    /// nodes off from others, one direction or both); all lists name every
    /// node once all are started.
    pub async fn start_with_own_lists(
        n: usize,
        configure: impl Fn(&mut NodeConfig) + Send + Sync + 'static,
    ) -> Self {
        let mut cluster = Self::empty(configure);
        for _ in 0..n {
            // Each node starts knowing the nodes before it, as discovery
            // would show them.
            let list = StaticPeers::new(cluster.peers.get());
            cluster.lists.push(list.clone());
            let host = cluster.slots.len() as u32 + 2;
            let ip = cluster.ip(host);
            let grpc = TcpListener::bind((ip, 0)).await.expect("bind gRPC");
            let http = TcpListener::bind((ip, 0)).await.expect("bind REST");
            cluster.slots.push(Slot {
                ip,
                grpc: grpc.local_addr().expect("addr"),
                http: http.local_addr().expect("addr"),
                node: None,
            });
            let index = cluster.slots.len() - 1;
            cluster.run_node(index, grpc, http, list).await;
            cluster.peers.add(cluster.slots[index].grpc.to_string());
        }
        cluster.heal();
        cluster
    }

    /// Sets node `i`'s own peer list to the nodes `to` (plus `extra`
    /// addresses, e.g. an unreachable one).
    pub fn set_peers(&self, i: usize, to: &[usize], extra: &[String]) {
        let mut addrs: Vec<String> = to.iter().map(|&j| self.grpc_addr(j)).collect();
        addrs.extend(extra.iter().cloned());
        self.lists[i].set(addrs);
    }

    /// Every node's list names every node again.
    pub fn heal(&self) {
        let all: Vec<usize> = (0..self.slots.len()).collect();
        for i in 0..self.lists.len() {
            self.set_peers(i, &all, &[]);
        }
    }

    /// The address of host number `host` (2, 3, ...) of this cluster.
    pub fn ip(&self, host: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.block | host)
    }

    /// Starts a new node on the next address, announces it, waits until it
    /// is ready; returns its index.
    pub async fn add_node(&mut self) -> usize {
        let host = self.slots.len() as u32 + 2;
        self.add_node_on(host).await
    }

    /// Starts a new node on host number `host` of this cluster's block.
    pub async fn add_node_on(&mut self, host: u32) -> usize {
        self.add_node_inner(host, false).await
    }

    /// Like [`Cluster::add_node`], but the new node is in the peer list
    /// before it starts (the others queue writes for it from the first
    /// moment, as they would for a pod discovered while it boots).
    pub async fn add_node_announced_early(&mut self) -> usize {
        let host = self.slots.len() as u32 + 2;
        self.add_node_inner(host, true).await
    }

    async fn add_node_inner(&mut self, host: u32, announce_early: bool) -> usize {
        let ip = self.ip(host);
        let grpc = TcpListener::bind((ip, 0)).await.expect("bind gRPC");
        let http = TcpListener::bind((ip, 0)).await.expect("bind REST");
        let slot = Slot {
            ip,
            grpc: grpc.local_addr().expect("addr"),
            http: http.local_addr().expect("addr"),
            node: None,
        };
        self.slots.push(slot);
        let index = self.slots.len() - 1;
        if announce_early {
            self.peers.add(self.slots[index].grpc.to_string());
        }
        self.run_node(index, grpc, http, self.peers.clone()).await;
        self.peers.add(self.slots[index].grpc.to_string());
        index
    }

    async fn run_node(
        &mut self,
        index: usize,
        grpc: TcpListener,
        http: TcpListener,
        peers: StaticPeers,
    ) {
        let mut config = NodeConfig::for_test(self.slots[index].ip);
        config.pod_name = format!("node-{index}");
        (self.configure)(&mut config);
        let node = NodeBuilder::new(config)
            .discovery(peers.discovery())
            .listeners(http, grpc)
            .start()
            .await
            .expect("node starts");
        wait_until("node ready", Duration::from_secs(10), || async {
            node.is_ready()
        })
        .await;
        self.slots[index].node = Some(node);
    }

    pub fn node(&self, index: usize) -> &NodeHandle {
        self.slots[index].node.as_ref().expect("node is running")
    }

    pub fn client(&self, index: usize) -> RestClient {
        RestClient::new(&self.slots[index].http.to_string()).expect("valid address")
    }

    pub fn grpc_addr(&self, index: usize) -> String {
        self.slots[index].grpc.to_string()
    }

    /// Stops node `index` at once, as a crash would (queued writes lost).
    pub async fn kill(&mut self, index: usize) {
        if let Some(node) = self.slots[index].node.take() {
            node.kill().await;
        }
    }

    /// Restarts node `index`, empty, on its old addresses, with the shared
    /// peer list: it bootstraps again.
    pub async fn restart(&mut self, index: usize) {
        let peers = self.peers.clone();
        self.restart_with_peers(index, peers).await;
    }

    /// Restarts node `index`, empty, on its old addresses, with its own peer
    /// list (e.g. an empty one, so it cannot bootstrap).
    pub async fn restart_with_peers(&mut self, index: usize, peers: StaticPeers) {
        let slot = &self.slots[index];
        let grpc = bind_retrying(slot.grpc).await;
        let http = bind_retrying(slot.http).await;
        self.run_node(index, grpc, http, peers).await;
    }

    /// Every running node's index.
    pub fn running(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].node.is_some())
            .collect()
    }

    pub async fn shutdown(mut self) {
        for slot in &mut self.slots {
            if let Some(node) = slot.node.take() {
                node.shutdown().await;
            }
        }
    }
}

/// Binds `addr`, retrying while the old socket is still being released.
async fn bind_retrying(addr: SocketAddr) -> TcpListener {
    let mut last = None;
    for _ in 0..100 {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(err) => last = Some(err),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot bind {addr} again: {last:?}");
}

/// Polls `check` until it returns true; panics with `what` after `timeout`.
#[track_caller]
pub fn wait_until<'a, F, Fut>(
    what: &'a str,
    timeout: Duration,
    mut check: F,
) -> impl Future<Output = ()> + 'a
where
    F: FnMut() -> Fut + 'a,
    Fut: Future<Output = bool> + 'a,
{
    let caller = std::panic::Location::caller();
    async move {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if check().await {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("{caller}: timed out after {timeout:?} waiting for: {what}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Waits until every running node answers `value` for `key`.
pub async fn wait_everywhere(cluster: &Cluster, ty: i32, key: &str, value: Option<&str>) {
    for i in cluster.running() {
        let client = cluster.client(i);
        let what = format!("node {i} to hold {key}={value:?}");
        wait_until(&what, Duration::from_secs(10), || {
            let client = client.clone();
            async move { client.get_value(ty, key).await.ok().flatten().as_deref() == value }
        })
        .await;
    }
}

/// How many peers `node` lists in its `/v1/cluster` view, and its
/// discovery state (`fresh`, `stale`, `pending`), read over REST.
pub async fn peers_seen(node: &NodeHandle) -> (usize, String) {
    let client = RestClient::new(&node.http_addr().expect("http").to_string()).expect("client");
    let view = client.get("/v1/cluster").await.expect("cluster").json();
    (
        view["peers"].as_array().map_or(0, Vec::len),
        view["discovery"]["state"].as_str().unwrap_or("").to_owned(),
    )
}

/// Waits until `node` lists `n` peers with its discovery fresh.
pub async fn wait_for_peers(node: &NodeHandle, n: usize, within: Duration) {
    wait_until(&format!("{n} peers, discovery fresh"), within, || async {
        peers_seen(node).await == (n, "fresh".to_owned())
    })
    .await;
}

/// The Python of the venv `scripts/test` creates (`.venv-interop`), or
/// `PODCACHE_TEST_PYTHON`; `needs` says what the caller's test uses.
pub fn venv_python(needs: &str) -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("PODCACHE_TEST_PYTHON") {
        return std::path::PathBuf::from(path);
    }
    let venv =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-interop/bin/python");
    assert!(
        venv.exists(),
        "this test needs Python with {needs}: run scripts/test \
         (it creates .venv-interop), or set PODCACHE_TEST_PYTHON"
    );
    venv
}
