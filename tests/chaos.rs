//! The chaos suite: 5 real `podcache serve` processes, each in its own
//! network namespace (joined by veth pairs to a bridge this test creates),
//! discovering each other through pods in a real etcd. Concurrent clients
//! write, delete and read random keys on random nodes and record every
//! answer, while faults are injected one at a time, in a bounded loop:
//! `kill -9` and restart of one node, `kill -9` of every node at once and
//! restart of all (at least once per run, by schedule), `SIGSTOP`/`SIGCONT`,
//! network partitions between groups of nodes (blackhole routes inside the
//! namespaces), and etcd going away for a while. Every node has its own
//! data directory (kept across its restarts) with `--fsync always`, so a
//! killed node comes back with its state from disk, and every acknowledged
//! write must survive even the loss of every node. Then everything heals
//! and a checker compares every node's full state (keys, values, versions,
//! tombstones) and the recorded history.
//!
//! Needs root (network namespaces). `CHAOS_SECONDS` sets the length of the
//! fault phase (default 20, the short form run by the test suite);
//! `chaos/run` runs the long form.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use common::k8s_sim::{PodEncoding, PodSimulator, SimPod};
use common::local_etcd::{LocalEtcd, MemberSpec, free_low_port};
use podcache::client::RestClient;
use podcache::etcd::EtcdClient;
use podcache::proto::podcache::SnapshotRequest;
use podcache::proto::podcache::replica_client::ReplicaClient;

const BIN: &str = env!("CARGO_BIN_EXE_podcache");
const NODES: usize = 5;
const KEYS: usize = 40;
const GRPC_PORT: u16 = 9090;
const HTTP_PORT: u16 = 8087;
const AE_INTERVAL_MS: u64 = 1000;

/// A tiny deterministic generator (xorshift), seeded per run and printed,
/// so a failing run can be replayed with `CHAOS_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The test's own hosts: a bridge in the root namespace and one namespace
/// per node, removed on drop.
struct Net {
    id: String,
    subnet: (u8, u8),
}

impl Net {
    fn create(nodes: usize) -> Result<Self, String> {
        let pid = std::process::id();
        let id = format!("{}", pid % 100_000);
        let subnet = (10, 100 + (pid % 100) as u8);
        let net = Self { id, subnet };
        let bridge = net.bridge();
        let gateway = format!("{}/24", net.ip(1));
        let steps: Vec<Vec<String>> = vec![
            vec![
                "ip".into(),
                "link".into(),
                "add".into(),
                bridge.clone(),
                "type".into(),
                "bridge".into(),
            ],
            vec![
                "ip".into(),
                "addr".into(),
                "add".into(),
                gateway,
                "dev".into(),
                bridge.clone(),
            ],
            vec![
                "ip".into(),
                "link".into(),
                "set".into(),
                bridge.clone(),
                "up".into(),
            ],
        ];
        for step in steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            if !sh(&args) {
                return Err(format!(
                    "`{}` failed (network namespaces need root)",
                    args.join(" ")
                ));
            }
        }
        for i in 0..nodes {
            let ns = net.ns(i);
            let (host_end, ns_end) = (format!("pc{}h{i}", net.id), format!("pc{}n{i}", net.id));
            let addr = format!("{}/24", net.node_ip(i));
            let ok = sh(&["ip", "netns", "add", &ns])
                && sh(&[
                    "ip", "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
                ])
                && sh(&["ip", "link", "set", &ns_end, "netns", &ns])
                && sh(&["ip", "link", "set", &host_end, "master", &bridge, "up"])
                && sh(&[
                    "ip", "netns", "exec", &ns, "ip", "addr", "add", &addr, "dev", &ns_end,
                ])
                && sh(&[
                    "ip", "netns", "exec", &ns, "ip", "link", "set", &ns_end, "up",
                ])
                && sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
            if !ok {
                return Err(format!("could not set up namespace {ns}"));
            }
        }
        Ok(net)
    }

    fn bridge(&self) -> String {
        format!("pc{}br", self.id)
    }
    fn ns(&self, i: usize) -> String {
        format!("pc{}ns{i}", self.id)
    }
    fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet.0, self.subnet.1, host)
    }
    fn node_ip(&self, i: usize) -> Ipv4Addr {
        self.ip(2 + i as u8)
    }

    /// Cuts every node of `a` off from every node of `b`, both ways.
    fn partition(&self, a: &[usize], b: &[usize]) {
        for (from, to) in [(a, b), (b, a)] {
            for &i in from {
                for &j in to {
                    sh(&[
                        "ip",
                        "netns",
                        "exec",
                        &self.ns(i),
                        "ip",
                        "route",
                        "add",
                        "blackhole",
                        &format!("{}/32", self.node_ip(j)),
                    ]);
                }
            }
        }
    }

    fn heal(&self, nodes: usize) {
        for i in 0..nodes {
            for j in 0..nodes {
                while sh(&[
                    "ip",
                    "netns",
                    "exec",
                    &self.ns(i),
                    "ip",
                    "route",
                    "del",
                    "blackhole",
                    &format!("{}/32", self.node_ip(j)),
                ]) {}
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 0..NODES {
            sh(&["ip", "netns", "del", &self.ns(i)]);
            sh(&["ip", "link", "del", &format!("pc{}h{i}", self.id)]);
        }
        sh(&["ip", "link", "del", &self.bridge()]);
    }
}

struct Node {
    child: Option<Child>,
    stopped: bool,
    /// Its data directory: the same across its restarts, so what it
    /// acknowledged is there when it comes back.
    data_dir: std::path::PathBuf,
}

struct Cluster {
    net: Net,
    etcd: LocalEtcd,
    sim: PodSimulator,
    nodes: Vec<Node>,
    log_dir: std::path::PathBuf,
}

impl Cluster {
    fn spawn(&mut self, i: usize) {
        let ip = self.net.node_ip(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_dir.join(format!("n{i}.log")))
            .expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.net.ns(i), BIN, "serve"])
            .args(["--discovery", "etcd", "--selector", "app=chaos"])
            .args(["--etcd-endpoints", &self.etcd.client_url()])
            .args(["--pod-ip", &ip.to_string(), "--pod-name", &format!("n{i}")])
            .args(["--http-addr", &format!("{ip}:{HTTP_PORT}")])
            .args(["--grpc-addr", &format!("{ip}:{GRPC_PORT}")])
            .args(["--anti-entropy-interval-ms", &AE_INTERVAL_MS.to_string()])
            .args(["--rpc-timeout-ms", "1000", "--wait-timeout-ms", "2000"])
            .args(["--shutdown-grace-ms", "1000"])
            .arg("--data-dir")
            .arg(&self.nodes[i].data_dir)
            .args(["--fsync", "always"])
            .env("PODCACHE_LOG", "podcache=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("podcache starts");
        self.nodes[i].child = Some(child);
        self.nodes[i].stopped = false;
    }

    async fn register(&self, i: usize) {
        let now = podcache::node::unix_ms() as i64;
        let pod = SimPod::pending(&format!("n{i}"), "default", "chaos", now).running(
            &self.net.node_ip(i).to_string(),
            &self.net.ip(1).to_string(),
            now,
        );
        // etcd may be down in the middle of a fault: retry a while.
        for _ in 0..100 {
            if self.sim.put(&pod).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn signal(&self, i: usize, signal: &str) {
        if let Some(child) = &self.nodes[i].child {
            sh(&["kill", &format!("-{signal}"), &child.id().to_string()]);
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `kill -9` of every node at the same moment: all the signals are
    /// sent before any is waited for.
    fn kill_all(&mut self) {
        let mut children: Vec<Child> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.child.take())
            .collect();
        for child in &mut children {
            let _ = child.kill();
        }
        for child in &mut children {
            let _ = child.wait();
        }
    }

    fn http(&self, i: usize) -> RestClient {
        RestClient::new(&format!("{}:{HTTP_PORT}", self.net.node_ip(i)))
            .expect("address")
            .with_timeout(Duration::from_secs(3))
    }

    async fn ready(&self, i: usize) -> bool {
        self.http(i)
            .get("/readyz")
            .await
            .is_ok_and(|a| a.status == hyper::StatusCode::OK)
    }

    /// Polls until node `i` is ready, then returns where `/v1/cluster`
    /// says its state came from (`disk`, `disk+peers`, `peers`, `none`).
    async fn ready_state_source(&self, i: usize, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if self.ready(i).await
                && let Ok(answer) = self.http(i).get("/v1/cluster").await
                && let Some(source) = answer.json()["state_source"].as_str()
            {
                return source.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "node {i} not ready within {within:?}; logs in {}",
                self.log_dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every node's whole state, tombstones included, through the gRPC
    /// snapshot a peer would pull.
    async fn state(&self, i: usize) -> Option<BTreeMap<(i32, String), (Option<String>, u64, u64)>> {
        let url = format!("http://{}:{GRPC_PORT}", self.net.node_ip(i));
        let mut client = tokio::time::timeout(Duration::from_secs(2), ReplicaClient::connect(url))
            .await
            .ok()?
            .ok()?;
        let mut stream = client
            .snapshot(SnapshotRequest {
                sender: None,
                max_chunk_bytes: 0,
            })
            .await
            .ok()?
            .into_inner();
        let mut out = BTreeMap::new();
        while let Some(chunk) = stream.message().await.ok()? {
            for e in chunk.entries {
                let value = (!e.deleted).then_some(e.value);
                out.insert((e.r#type, e.key), (value, e.hlc, e.node));
            }
        }
        Some(out)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.signal(i, "CONT");
            if let Some(mut child) = self.nodes[i].child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// One recorded operation.
#[derive(Debug, Clone)]
struct Op {
    kind: &'static str,
    node: usize,
    key: String,
    wait_all: bool,
    ok: bool,
    all_acked: bool,
    /// (hlc, node) of the write, parsed from the answer's version.
    version: Option<(u64, u64)>,
}

fn parse_version(text: &str) -> Option<(u64, u64)> {
    let (clock, node) = text.split_once('@')?;
    let (ms, logical) = clock.split_once('.')?;
    let hlc = (ms.parse::<u64>().ok()? << 16) | logical.parse::<u64>().ok()?;
    Some((hlc, u64::from_str_radix(node, 16).ok()?))
}

/// One client: puts (60 %), deletes (15 %) and reads (25 %) on random
/// nodes. Most writes go to the `KEYS` shared keys, which are soon
/// overwritten; a sixth of the puts create a write-once key of this client
/// (`u<seed>-<n>`) and a fifth of the deletes delete one of those, once.
/// Nothing newer ever supersedes those writes, so the checker sees it when
/// one is lost, even by a whole cluster that came back empty.
async fn client_loop(
    cluster: Arc<tokio::sync::RwLock<Cluster>>,
    seed: u64,
    until: Instant,
    history: Arc<Mutex<Vec<Op>>>,
) {
    let mut rng = Rng(seed);
    let mut seq = 0u64;
    // Write-once keys this client put and has not deleted yet.
    let mut own = Vec::new();
    while Instant::now() < until {
        let node = rng.below(NODES as u64) as usize;
        let mut key = format!("k{}", rng.below(KEYS as u64));
        let roll = rng.below(100);
        let wait_all = rng.below(2) == 0;
        let client = cluster.read().await.http(node);
        let query = if wait_all { "wait=all" } else { "" };
        seq += 1;
        if (50..60).contains(&roll) {
            key = format!("u{seed}-{seq}");
            own.push(key.clone());
        } else if (72..75).contains(&roll) && !own.is_empty() {
            key = own.swap_remove(rng.below(own.len() as u64) as usize);
        }
        let (kind, answer) = if roll < 60 {
            (
                "put",
                client.put(1, &key, &format!("s{seed}-{seq}"), query).await,
            )
        } else if roll < 75 {
            ("delete", client.delete(1, &key, query).await)
        } else {
            ("get", client.get(&format!("/v1/cache/1/{key}")).await)
        };
        let ok = answer
            .as_ref()
            .is_ok_and(|a| a.status == hyper::StatusCode::OK);
        let body = answer.map(|a| a.json()).unwrap_or_default();
        let all_acked = body["replication"]
            .as_array()
            .is_some_and(|r| r.iter().all(|p| p["status"] == "acked"));
        history.lock().expect("history").push(Op {
            kind,
            node,
            key,
            wait_all,
            ok,
            all_acked,
            version: body["version"].as_str().and_then(parse_version),
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_converges_and_loses_no_acknowledged_write() {
    let seconds: u64 = std::env::var("CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| podcache::node::unix_ms() | 1);
    let net = Net::create(NODES).unwrap_or_else(|e| {
        panic!("the chaos suite needs network namespaces (run as root with iproute2): {e}")
    });
    let etcd_ip = net.ip(1);
    let mut spec = MemberSpec::single("chaos-etcd", etcd_ip).expect("etcd ports");
    spec.client_port = free_low_port(etcd_ip).expect("port");
    let etcd = LocalEtcd::spawn(spec).expect("etcd starts");
    etcd.wait_healthy(Duration::from_secs(20))
        .await
        .expect("etcd healthy");
    let sim = PodSimulator::new(
        EtcdClient::connect(&etcd.settings()).expect("client"),
        PodEncoding::Protobuf,
    );
    let log_dir = std::env::temp_dir().join(format!("podcache-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let mut cluster = Cluster {
        net,
        etcd,
        sim,
        nodes: (0..NODES)
            .map(|i| Node {
                child: None,
                stopped: false,
                data_dir: log_dir.join(format!("n{i}-data")),
            })
            .collect(),
        log_dir: log_dir.clone(),
    };
    for i in 0..NODES {
        cluster.register(i).await;
        cluster.spawn(i);
    }
    for i in 0..NODES {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cluster.ready(i).await {
            assert!(
                Instant::now() < deadline,
                "node {i} never became ready; logs in {}",
                log_dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let cluster = Arc::new(tokio::sync::RwLock::new(cluster));
    let history = Arc::new(Mutex::new(Vec::new()));
    let until = Instant::now() + Duration::from_secs(seconds);
    let clients: Vec<_> = (0..4)
        .map(|c| {
            tokio::spawn(client_loop(
                cluster.clone(),
                seed.wrapping_add(c * 7919) | 1,
                until,
                history.clone(),
            ))
        })
        .collect();

    // Faults, one at a time, until the deadline. The first fault after a
    // third of the run is a kill-all if chance has not picked one yet.
    let mut rng = Rng(seed ^ 0x5eed);
    let mut faults: BTreeMap<&'static str, u32> = BTreeMap::new();
    let kill_all_due = Instant::now() + Duration::from_secs(seconds) / 3;
    // Per kill-all: ms from the restart until every node was ready.
    let mut kill_all_back_ms = Vec::new();
    // Where each node's state came from after a kill-all (`/v1/cluster`).
    let mut state_sources: BTreeMap<String, u32> = BTreeMap::new();
    while Instant::now() + Duration::from_secs(3) < until {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(700))).await;
        let mut fault = ["kill", "stop", "partition", "etcd", "kill-all"][rng.below(5) as usize];
        if !faults.contains_key("kill-all") && Instant::now() >= kill_all_due {
            fault = "kill-all";
        }
        *faults.entry(fault).or_default() += 1;
        let hold = Duration::from_millis(1000 + rng.below(2000));
        match fault {
            "kill" => {
                let i = rng.below(NODES as u64) as usize;
                cluster.write().await.kill(i);
                tokio::time::sleep(hold).await;
                let c = cluster.read().await;
                c.register(i).await;
                drop(c);
                cluster.write().await.spawn(i);
            }
            "kill-all" => {
                // The clients keep writing: what they send meanwhile fails
                // and is not acknowledged.
                cluster.write().await.kill_all();
                tokio::time::sleep(hold).await;
                let c = cluster.read().await;
                for i in 0..NODES {
                    c.register(i).await;
                }
                drop(c);
                let restarted = Instant::now();
                let mut c = cluster.write().await;
                for i in 0..NODES {
                    c.spawn(i);
                }
                drop(c);
                // Every node back, each with the state of its data dir.
                let c = cluster.read().await;
                for i in 0..NODES {
                    let source = c.ready_state_source(i, Duration::from_secs(30)).await;
                    *state_sources.entry(source).or_default() += 1;
                }
                kill_all_back_ms.push(restarted.elapsed().as_millis());
            }
            "stop" => {
                let i = rng.below(NODES as u64) as usize;
                cluster.write().await.nodes[i].stopped = true;
                cluster.read().await.signal(i, "STOP");
                tokio::time::sleep(hold).await;
                cluster.read().await.signal(i, "CONT");
                cluster.write().await.nodes[i].stopped = false;
            }
            "partition" => {
                let cut = 1 + rng.below(2) as usize;
                let mut order: Vec<usize> = (0..NODES).collect();
                for k in (1..order.len()).rev() {
                    order.swap(k, rng.below(k as u64 + 1) as usize);
                }
                let (a, b) = order.split_at(cut);
                cluster.read().await.net.partition(a, b);
                tokio::time::sleep(hold).await;
                cluster.read().await.net.heal(NODES);
            }
            _ => {
                cluster.write().await.etcd.kill();
                tokio::time::sleep(hold).await;
                let mut c = cluster.write().await;
                c.etcd.restart().expect("etcd restarts");
                c.etcd
                    .wait_healthy(Duration::from_secs(20))
                    .await
                    .expect("etcd back");
            }
        }
    }
    for client in clients {
        client.await.expect("client task");
    }

    // Heal everything and wait for every node to be up and ready.
    let healed = Instant::now();
    {
        let c = cluster.read().await;
        c.net.heal(NODES);
        for i in 0..NODES {
            c.signal(i, "CONT");
        }
    }
    let c = cluster.read().await;
    for i in 0..NODES {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.ready(i).await {
            assert!(
                Instant::now() < deadline,
                "node {i} not ready after healing; logs in {}",
                log_dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let all_ready = Instant::now();

    // Convergence: every node's whole state identical.
    let deadline = all_ready + Duration::from_millis(3 * AE_INTERVAL_MS) + Duration::from_secs(10);
    let mut states;
    let converged_at = loop {
        states = Vec::new();
        for i in 0..NODES {
            states.push(c.state(i).await.unwrap_or_default());
        }
        if states.windows(2).all(|w| w[0] == w[1]) {
            break Some(Instant::now());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut divergent = 0;
    let keys: std::collections::BTreeSet<_> =
        states.iter().flat_map(|s| s.keys().cloned()).collect();
    for key in &keys {
        let first = states[0].get(key);
        if states.iter().any(|s| s.get(key) != first) {
            divergent += 1;
        }
    }

    // Acknowledged writes: present, or superseded by a later version; a
    // delete still a tombstone unless something newer came. Every one
    // counts, whatever the wait mode and whichever nodes were killed: its
    // receiver had it on disk (`--fsync always`) before answering.
    let history = history.lock().expect("history").clone();
    let final_state = &states[0];
    let (mut lost, mut checked, mut checked_wait_all) = (0, 0, 0);
    let (mut write_once_puts, mut write_once_deletes) = (0, 0);
    for op in history.iter().filter(|o| o.ok && o.kind != "get") {
        let Some(version) = op.version else { continue };
        checked += 1;
        if op.wait_all && op.all_acked {
            checked_wait_all += 1;
        }
        if op.key.starts_with('u') {
            match op.kind {
                "put" => write_once_puts += 1,
                _ => write_once_deletes += 1,
            }
        }
        let held = final_state.get(&(1, op.key.clone()));
        let held_version = held.map(|(_, hlc, node)| (*hlc, *node));
        if held_version.is_none_or(|h| h < version) {
            lost += 1;
            eprintln!(
                "lost (answered by n{}): {op:?}, held {held_version:?}",
                op.node
            );
        } else if held_version == Some(version)
            && held.is_some_and(|(value, _, _)| value.is_none() != (op.kind == "delete"))
        {
            lost += 1;
            eprintln!(
                "came back changed (answered by n{}): {op:?}, held {held:?}",
                op.node
            );
        }
    }

    // Reads after convergence answer the converged state on every node.
    let mut stale_reads = 0;
    for i in 0..NODES {
        for k in 0..KEYS {
            let key = format!("k{k}");
            let want = final_state
                .get(&(1, key.clone()))
                .and_then(|(v, _, _)| v.clone());
            let got = c.http(i).get_value(1, &key).await.ok().flatten();
            if got != want {
                stale_reads += 1;
            }
        }
    }
    let puts = history.iter().filter(|o| o.kind == "put").count();
    let deletes = history.iter().filter(|o| o.kind == "delete").count();
    let gets = history.iter().filter(|o| o.kind == "get").count();
    let failed = history.iter().filter(|o| !o.ok && o.kind != "get").count();
    let convergence = converged_at.map(|t| t.duration_since(all_ready).as_millis());
    let fault_text: Vec<String> = faults.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let source_text: Vec<String> = state_sources
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!(
        "chaos: seed={seed} seconds={seconds} ops={} (put {puts}, delete {deletes}, get {gets}, refused or failed {failed}) faults={} ({}) partitions=netns+blackhole kill_all_back_ms={kill_all_back_ms:?} state_source_after_kill_all=({}) acked_writes_checked={checked} (wait=all acked by all {checked_wait_all}; write-once keys put {write_once_puts}, deleted {write_once_deletes}) divergent_keys={divergent} lost_acked_writes={lost} stale_reads={stale_reads} convergence_ms={} (after all nodes ready; {} ms after healing)",
        history.len(),
        faults.values().sum::<u32>(),
        fault_text.join(", "),
        source_text.join(", "),
        convergence.map_or("none".into(), |ms| ms.to_string()),
        converged_at.map_or("-".into(), |t| t
            .duration_since(healed)
            .as_millis()
            .to_string()),
    );
    assert!(
        converged_at.is_some(),
        "no convergence; logs in {}",
        log_dir.display()
    );
    assert_eq!(divergent, 0);
    assert_eq!(
        lost,
        0,
        "acknowledged writes lost; logs in {}",
        log_dir.display()
    );
    assert_eq!(stale_reads, 0);
    assert!(
        faults.contains_key("kill-all"),
        "no kill-all ran: CHAOS_SECONDS={seconds} is too short for its schedule"
    );
    assert!(
        state_sources.keys().all(|s| s.starts_with("disk")),
        "after a kill-all every node's state must come from its data dir: {state_sources:?}; logs in {}",
        log_dir.display()
    );
    assert!(history.len() > 100, "the clients barely ran");
    drop(c);
    let _ = std::fs::remove_dir_all(&log_dir);
}

// ---------------------------------------------------------------------
// The compare-and-set register, in the style of Jepsen's cas-register.
// ---------------------------------------------------------------------

/// What happens to the decider in the middle of a register run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeciderFault {
    None,
    /// `kill -9`.
    Kill,
    /// `SIGSTOP` for longer than its lease, then `SIGCONT`.
    Stop,
}

/// What the clients saw.
#[derive(Debug, Default)]
struct RegisterTally {
    /// Increments answered 200.
    ok: u64,
    /// Increments answered 412 (another client got there first).
    lost_race: u64,
    /// Increments whose outcome is unknown (no answer, 503 not_replicated).
    unknown: u64,
    /// Increments refused with nothing written (503 no_decider, ...).
    refused: u64,
    /// When each 200 came back.
    ok_at: Vec<Instant>,
}

/// The decider as node `i` of `specs` names it.
async fn decider_of(specs: &[common::process::ServeSpec], i: usize) -> Option<usize> {
    let view = specs[i].client().get("/v1/cluster").await.ok()?.json();
    let addr = view["decider"]["grpc_addr"].as_str()?.to_owned();
    specs.iter().position(|s| s.grpc() == addr)
}

/// Node `i` has a link to node `peer` (a node forwards a conditional
/// write only to a decider it has a link to).
async fn links_to(specs: &[common::process::ServeSpec], i: usize, peer: usize) -> bool {
    if i == peer {
        return true;
    }
    let Ok(answer) = specs[i].client().get("/v1/cluster").await else {
        return false;
    };
    let view = answer.json();
    let addr = specs[peer].grpc();
    view["peers"].as_array().is_some_and(|peers| {
        peers
            .iter()
            .any(|p| p["grpc_addr"].as_str() == Some(addr.as_str()))
    })
}

/// One client: read the counter on a random node, then compare-and-set
/// it to one more, until `until`.
async fn register_client(
    specs: Vec<common::process::ServeSpec>,
    seed: u64,
    until: Instant,
    tally: Arc<Mutex<RegisterTally>>,
) {
    let mut rng = Rng(seed | 1);
    let clients: Vec<RestClient> = specs
        .iter()
        .map(|s| s.client().with_timeout(Duration::from_secs(3)))
        .collect();
    while Instant::now() < until {
        let client = &clients[rng.below(clients.len() as u64) as usize];
        let Ok(read) = client.get("/v1/cache/1/counter").await else {
            continue;
        };
        let (Some(etag), Some(n)) = (
            read.etag.clone(),
            read.json()["value"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok()),
        ) else {
            continue;
        };
        let client = &clients[rng.below(clients.len() as u64) as usize];
        let answer = client
            .request_with_headers(
                hyper::Method::PUT,
                "/v1/cache/1/counter",
                (n + 1).to_string(),
                &[("If-Match", &etag)],
            )
            .await;
        let mut t = tally.lock().expect("tally");
        match answer {
            Ok(a) if a.status == hyper::StatusCode::OK => {
                t.ok += 1;
                t.ok_at.push(Instant::now());
            }
            Ok(a) if a.status == hyper::StatusCode::PRECONDITION_FAILED => t.lost_race += 1,
            Ok(a) if a.json()["error"] == "not_replicated" => t.unknown += 1,
            Ok(a) if a.status.is_server_error() && a.json()["error"] == "no_decider" => {
                t.refused += 1
            }
            // Any other answer, or none: it may have been applied.
            _ => t.unknown += 1,
        }
    }
}

/// 3 `podcache serve` processes on etcd-lease discovery, 8 clients
/// incrementing one counter by read, then compare-and-set, for
/// `REGISTER_SECONDS` (default 10), the decider hit by `fault` halfway.
/// No increment answered 200 may be lost: the final value is at least the
/// number of 200s, and at most that plus the increments whose outcome was
/// unknown (none without a fault).
async fn cas_register(fault: DeciderFault) {
    let seconds: u64 = std::env::var("REGISTER_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let etcd = LocalEtcd::start().await.expect("etcd");
    let block = common::next_block();
    let dir = std::env::temp_dir().join(format!(
        "podcache-register-{:?}-{}",
        fault,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let prefix = format!("/podcache-register/{block}/");
    let specs: Vec<common::process::ServeSpec> = (0..3)
        .map(|i| {
            let ip = Ipv4Addr::from(block | (i as u32 + 2));
            let mut spec = common::process::ServeSpec::new(ip, &format!("reg-{i}"), &dir);
            spec.extra = [
                "--discovery",
                "etcd-lease",
                "--etcd-endpoints",
                &etcd.client_url(),
                "--etcd-prefix",
                &prefix,
                "--lease-ttl-secs",
                "2",
                "--decider-lease",
                "2s",
                "--decider-clock-drift",
                "200ms",
                "--wait-timeout",
                "1s",
                "--rpc-timeout",
                "1s",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            spec
        })
        .collect();
    let mut procs: Vec<common::process::Proc> = specs.iter().map(|s| s.spawn()).collect();
    for spec in &specs {
        spec.wait_ready().await;
    }
    common::wait_until(
        "every node names one decider",
        Duration::from_secs(20),
        || {
            let specs = &specs;
            async move {
                let mut seen = Vec::new();
                for i in 0..specs.len() {
                    seen.push(decider_of(specs, i).await);
                }
                let Some(decider) = seen[0].filter(|_| seen.iter().all(|d| *d == seen[0])) else {
                    return false;
                };
                // Discovery may name the decider before every node has a
                // link to it (the create below was refused once so).
                for i in 0..specs.len() {
                    if !links_to(specs, i, decider).await {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    let decider = decider_of(&specs, 0).await.expect("a decider");
    let start = specs[0]
        .client()
        .request_with_headers(
            hyper::Method::PUT,
            "/v1/cache/1/counter",
            "0",
            &[("If-None-Match", "*")],
        )
        .await
        .expect("create");
    assert_eq!(start.status, hyper::StatusCode::OK, "{}", start.text());

    let began = Instant::now();
    let until = began + Duration::from_secs(seconds);
    let tally = Arc::new(Mutex::new(RegisterTally::default()));
    let clients: Vec<_> = (0..8u64)
        .map(|c| {
            tokio::spawn(register_client(
                specs.clone(),
                0x9e37_79b9 ^ (c << 20) ^ u64::from(block),
                until,
                tally.clone(),
            ))
        })
        .collect();
    let halfway = began + Duration::from_secs(seconds / 2);
    tokio::time::sleep_until(halfway).await;
    let pid = procs[decider].child.id().to_string();
    match fault {
        DeciderFault::None => {}
        DeciderFault::Kill => procs[decider].kill9(),
        DeciderFault::Stop => {
            assert!(sh(&["kill", "-STOP", &pid]));
        }
    }
    if fault == DeciderFault::Stop {
        // Past its lease (2 s) and its membership (2 s), then back.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(sh(&["kill", "-CONT", &pid]));
    }
    for client in clients {
        client.await.expect("client");
    }
    let running: Vec<usize> = (0..specs.len())
        .filter(|&i| !(fault == DeciderFault::Kill && i == decider))
        .collect();
    common::wait_until(
        "every running node holds one value",
        Duration::from_secs(20),
        || {
            let specs = &specs;
            let running = &running;
            async move {
                let mut values = Vec::new();
                for &i in running {
                    values.push(
                        specs[i]
                            .client()
                            .get_value(1, "counter")
                            .await
                            .ok()
                            .flatten(),
                    );
                }
                values.iter().all(|v| v.is_some() && *v == values[0])
            }
        },
    )
    .await;
    let final_value: u64 = specs[running[0]]
        .client()
        .get_value(1, "counter")
        .await
        .ok()
        .flatten()
        .and_then(|v| v.parse().ok())
        .expect("a number");
    let t = tally.lock().expect("tally");
    // The longest stretch without a 200 after the fault.
    let mut times: Vec<Instant> = t
        .ok_at
        .iter()
        .copied()
        .filter(|at| *at >= halfway)
        .collect();
    times.sort();
    let mut longest = times
        .first()
        .map_or(until - halfway, |first| *first - halfway);
    for pair in times.windows(2) {
        longest = longest.max(pair[1] - pair[0]);
    }
    println!(
        "register {fault:?}: final {final_value}, 200s {}, 412s {}, unknown {}, refused {}; after the fault, conditional writes went {} ms without a 200",
        t.ok,
        t.lost_race,
        t.unknown,
        t.refused,
        longest.as_millis()
    );
    assert!(t.ok > 20, "the register made progress: {t:?}");
    assert!(
        final_value >= t.ok,
        "an increment answered 200 was lost: final {final_value}, 200s {}",
        t.ok
    );
    assert!(
        final_value <= t.ok + t.unknown,
        "more increments than answered: final {final_value}, 200s {}, unknown {}",
        t.ok,
        t.unknown
    );
    if fault == DeciderFault::None {
        assert_eq!(t.unknown, 0, "no fault, no unknown outcome");
        assert_eq!(final_value, t.ok);
    } else {
        assert!(
            times.len() > 5,
            "a new decider took over and conditional writes went on: {t:?}"
        );
    }
    drop(t);
    for proc in &mut procs {
        proc.kill9();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_register_counts_every_increment_answered() {
    cas_register(DeciderFault::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_register_loses_no_increment_when_the_decider_is_killed() {
    cas_register(DeciderFault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_register_loses_no_increment_when_the_decider_is_stopped_past_its_lease() {
    cas_register(DeciderFault::Stop).await;
}
