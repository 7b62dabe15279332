//! `podcache demo`: a local cluster of real nodes on loopback addresses,
//! each with the same gRPC and REST ports (as pods each have their own IP),
//! and a walk-through that shows a write spreading and a new replica
//! bootstrapping from the oldest. Needs nothing but this binary (and, with
//! `--etcd local`, Debian's `etcd`).

use std::fmt::Write as _;

use anyhow::Context as _;
use clap::Args;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::time::Instant;

use super::k8s_sim::{PodEncoding, PodSimulator, SimPod};
use super::local_etcd::LocalEtcd;
use podcache::NodeConfig;
use podcache::client::{ClientError, RestClient};
use podcache::discovery::pod::{LabelTerm, PodFilter};
use podcache::discovery::{EtcdDiscovery, StaticPeers};
use podcache::etcd::{EtcdClient, EtcdSettings, EtcdTls};
use podcache::node::{NodeBuilder, NodeHandle};

use crate::{Failure, shutdown_signal};

/// Settings of the demo cluster.
#[derive(Debug, Clone)]
pub(crate) struct DemoOptions {
    /// Address of the first replica; the others follow (127.0.0.2, .3, ...).
    pub(crate) first_ip: Ipv4Addr,
    /// REST port of every replica.
    pub(crate) http_port: u16,
    /// gRPC port of every replica.
    pub(crate) grpc_port: u16,
    /// Discover replicas through pods in etcd instead of a static list:
    /// an endpoint URL, or `local` to run the `etcd` binary found on PATH.
    pub(crate) etcd: Option<String>,
}

/// How the demo's replicas find each other.
enum Membership {
    /// A shared static list.
    Static(StaticPeers),
    /// Pods in etcd, written by the pod simulator as kube-apiserver would.
    Etcd(Box<EtcdMembership>),
}

/// Membership through pods in etcd.
struct EtcdMembership {
    settings: EtcdSettings,
    sim: PodSimulator,
    /// The etcd this demo started, if it did (stopped when dropped).
    _local: Option<LocalEtcd>,
}

/// Namespace and app label of the demo's pods.
const NAMESPACE: &str = "default";
const APP: &str = "hello";

/// A running demo cluster.
pub(crate) struct DemoCluster {
    /// The replicas, oldest first.
    pub(crate) nodes: Vec<NodeHandle>,
    membership: Membership,
    options: DemoOptions,
}

fn ip_of(options: &DemoOptions, index: usize) -> Ipv4Addr {
    let base = u32::from(options.first_ip);
    Ipv4Addr::from(base + index as u32)
}

impl DemoCluster {
    /// An empty cluster; replicas are added with [`DemoCluster::add_replica`].
    /// With `options.etcd`, connects to (or starts) etcd first.
    pub(crate) async fn new(options: DemoOptions) -> anyhow::Result<Self> {
        let membership = match options.etcd.as_deref() {
            None => Membership::Static(StaticPeers::new(Vec::<String>::new())),
            Some(which) => {
                let (settings, local) = if which == "local" {
                    let local = LocalEtcd::start().await?;
                    (local.settings(), Some(local))
                } else {
                    let settings = EtcdSettings {
                        endpoints: vec![which.trim_end_matches('/').to_owned()],
                        tls: EtcdTls::default(),
                        timeout: Duration::from_secs(3),
                    };
                    (settings, None)
                };
                let client = EtcdClient::connect(&settings)?;
                Membership::Etcd(Box::new(EtcdMembership {
                    sim: PodSimulator::new(client, PodEncoding::Protobuf),
                    settings,
                    _local: local,
                }))
            }
        };
        Ok(Self {
            nodes: Vec::new(),
            membership,
            options,
        })
    }

    /// Where membership comes from, for the walk-through's first line.
    pub(crate) fn membership(&self) -> String {
        match &self.membership {
            Membership::Static(_) => "a static peer list".into(),
            Membership::Etcd(etcd) => format!(
                "pods in etcd at {} (written as kube-apiserver stores them, protobuf)",
                etcd.settings.endpoints.join(",")
            ),
        }
    }

    /// Starts the next replica, announces it to the others, and waits until
    /// it is ready.
    pub(crate) async fn add_replica(&mut self) -> anyhow::Result<&NodeHandle> {
        let index = self.nodes.len();
        let ip = ip_of(&self.options, index);
        let name = format!("hello-web-{index}");
        let mut config = NodeConfig::new(name.clone(), ip.into());
        config.http_addr = SocketAddr::new(ip.into(), self.options.http_port);
        config.grpc_addr = SocketAddr::new(ip.into(), self.options.grpc_port);
        config.host_ip = Some("127.0.0.1".into());
        config.shutdown_grace = Duration::from_secs(3);
        let builder = NodeBuilder::new(config);
        let node = match &self.membership {
            Membership::Static(peers) => {
                let node = builder.discovery(peers.discovery()).start().await?;
                // Announced once it listens, as a pod appears in discovery
                // only once it runs.
                peers.add(node.identity().grpc_addr.clone());
                node
            }
            Membership::Etcd(etcd) => {
                let (settings, sim) = (&etcd.settings, &etcd.sim);
                // The pod exists (Pending, no IP) before its container runs.
                let now = podcache::identity::unix_ms() as i64;
                sim.put(&SimPod::pending(&name, NAMESPACE, APP, now))
                    .await?;
                let filter = PodFilter {
                    namespace: NAMESPACE.into(),
                    selector: vec![LabelTerm::Equals("app".into(), APP.into())],
                    name_contains: None,
                    self_pod_ip: String::new(),
                    grpc_port: self.options.grpc_port,
                };
                let node = builder
                    .discovery(EtcdDiscovery::new(settings.clone(), filter))
                    .start()
                    .await?;
                let running = SimPod::pending(&name, NAMESPACE, APP, now).running(
                    &ip.to_string(),
                    "127.0.0.1",
                    node.identity().started_at_ms,
                );
                sim.put(&running).await?;
                node
            }
        };
        node.wait_ready().await;
        self.nodes.push(node);
        Ok(&self.nodes[index])
    }

    /// A REST client of replica `index`.
    pub(crate) fn client(&self, index: usize) -> Result<RestClient, ClientError> {
        let addr = self.nodes[index]
            .http_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        RestClient::new(&addr)
    }

    /// Shuts every replica down, all at once.
    pub(crate) async fn shutdown(self) {
        let names: Vec<String> = self
            .nodes
            .iter()
            .map(|n| n.identity().name.clone())
            .collect();
        futures_util::future::join_all(self.nodes.into_iter().map(NodeHandle::shutdown)).await;
        if let Membership::Etcd(etcd) = &self.membership {
            // The pods go away with their containers.
            for name in names {
                let _ = etcd.sim.delete(NAMESPACE, &name).await;
            }
        }
    }
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "  {}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect(), &mut out);
    line(widths.iter().map(|w| "-".repeat(*w)).collect(), &mut out);
    for row in rows {
        line(row.clone(), &mut out);
    }
    out
}

/// Polls `client` until `key` holds `want` (or is absent, for `None`); the
/// time it took, or `None` after the deadline.
async fn visible_after(
    client: &RestClient,
    ty: i32,
    key: &str,
    want: Option<&str>,
    since: Instant,
) -> Option<Duration> {
    let deadline = since + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(got) = client.get_value(ty, key).await
            && got.as_deref() == want
        {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
        .unwrap_or_else(|| "NOT SEEN".into())
}

/// Runs the walk-through on a fresh cluster and returns it still running,
/// with the report that was printed. Fails when a step does not happen.
pub(crate) async fn walk_through(
    options: DemoOptions,
    out: &mut dyn FnMut(&str),
) -> anyhow::Result<DemoCluster> {
    let mut cluster = DemoCluster::new(options).await?;
    out(&format!(
        "Replicas find each other through {}.",
        cluster.membership()
    ));
    out("Starting 3 replicas of hello-web, each on its own loopback address with the same ports:");
    for _ in 0..3 {
        cluster.add_replica().await?;
        // Distinct start times make "the oldest" unambiguous.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rows: Vec<Vec<String>> = cluster
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.identity().name.clone(),
                n.identity().grpc_addr.clone(),
                n.http_addr().map(|a| a.to_string()).unwrap_or_default(),
                "ready".into(),
            ]
        })
        .collect();
    out(&table(
        &["replica", "gRPC (peers dial)", "REST", "state"],
        &rows,
    ));

    let (ty, key, value) = (1, "greeting", "hello from hello-web-0");
    out(&format!(
        "PUT /v1/cache/{ty}/{key} = {value:?} on hello-web-0, waiting for every peer (?wait=all):"
    ));
    let started = Instant::now();
    let answer = cluster.client(0)?.put(ty, key, value, "wait=all").await?;
    anyhow::ensure!(
        answer.status.is_success(),
        "write failed: {}",
        answer.text()
    );
    let body = answer.json();
    let mut rows = Vec::new();
    for report in body["replication"].as_array().cloned().unwrap_or_default() {
        rows.push(vec![
            report["name"].as_str().unwrap_or("?").to_owned(),
            report["peer"].as_str().unwrap_or("?").to_owned(),
            report["status"].as_str().unwrap_or("?").to_owned(),
        ]);
    }
    out(&table(&["peer", "address", "delivery"], &rows));
    let mut rows = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let seen = visible_after(&cluster.client(i)?, ty, key, Some(value), started).await;
        anyhow::ensure!(
            seen.is_some(),
            "{} never saw the write",
            node.identity().name
        );
        rows.push(vec![
            node.identity().name.clone(),
            value.to_owned(),
            ms(seen),
        ]);
    }
    out("GET on every replica:");
    out(&table(
        &["replica", "value", "visible after the PUT began"],
        &rows,
    ));

    out(
        "Starting a 4th replica; it pulls the whole state from the oldest peer before it is ready:",
    );
    cluster.add_replica().await?;
    let cluster_view = cluster.client(3)?.get("/v1/cluster").await?.json();
    let boot = &cluster_view["bootstrap"];
    let source = boot["source_name"].as_str().unwrap_or("none").to_owned();
    out(&table(
        &["replica", "pulled from", "method", "entries", "took"],
        &[vec![
            cluster.nodes[3].identity().name.clone(),
            source.clone(),
            boot["method"].as_str().unwrap_or("?").to_owned(),
            boot["entries"].to_string(),
            format!("{} ms", boot["duration"]),
        ]],
    ));
    anyhow::ensure!(
        source == cluster.nodes[0].identity().name,
        "the new replica pulled from {source}, not from the oldest"
    );
    let got = cluster.client(3)?.get_value(ty, key).await?;
    anyhow::ensure!(
        got.as_deref() == Some(value),
        "the new replica lacks the greeting"
    );

    out("DELETE /v1/cache/1/greeting on the new replica; the delete spreads like a write:");
    let started = Instant::now();
    let answer = cluster.client(3)?.delete(ty, key, "").await?;
    anyhow::ensure!(
        answer.status.is_success(),
        "delete failed: {}",
        answer.text()
    );
    let mut rows = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let gone = visible_after(&cluster.client(i)?, ty, key, None, started).await;
        anyhow::ensure!(
            gone.is_some(),
            "{} still has the deleted key",
            node.identity().name
        );
        rows.push(vec![
            node.identity().name.clone(),
            "absent (404)".into(),
            ms(gone),
        ]);
    }
    out(&table(&["replica", "GET greeting", "after"], &rows));
    Ok(cluster)
}

/// A short guide to the running cluster.
pub(crate) fn try_it(cluster: &DemoCluster) -> String {
    let first = cluster.nodes[0]
        .http_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let second = cluster.nodes[1]
        .http_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    format!(
        "The cluster keeps running. Try, from another terminal:\n  curl -X PUT -d on http://{first}/v1/cache/2/feature.x\n  curl http://{second}/v1/cache/2\n  curl http://{second}/v1/cluster\n  podcache ctl --addr http://{second} list 2\nCtrl-C stops it."
    )
}

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Stop after the walk-through instead of running until Ctrl-C.
    #[arg(long)]
    exit: bool,
    /// Address of the first replica; the others take the next addresses.
    #[arg(long, env = "PODCACHE_DEMO_FIRST_IP", default_value = "127.0.0.2")]
    first_ip: std::net::Ipv4Addr,
    /// REST port of every replica.
    #[arg(long, env = "PODCACHE_DEMO_HTTP_PORT", default_value_t = 8087)]
    http_port: u16,
    /// gRPC port of every replica.
    #[arg(long, env = "PODCACHE_DEMO_GRPC_PORT", default_value_t = 9090)]
    grpc_port: u16,
    /// Find replicas through pods in etcd: an endpoint URL, or "local" to
    /// start the etcd binary on PATH (Debian etcd-server).
    #[arg(long, env = "PODCACHE_DEMO_ETCD")]
    etcd: Option<String>,
}

pub(crate) async fn run(args: DemoArgs) -> Result<(), Failure> {
    let options = DemoOptions {
        first_ip: args.first_ip,
        http_port: args.http_port,
        grpc_port: args.grpc_port,
        etcd: args.etcd,
    };
    let cluster = walk_through(options, &mut |text| println!("{text}\n"))
        .await
        .context("the demo failed")?;
    if args.exit {
        println!("Done; stopping the replicas.");
    } else {
        println!("{}", try_it(&cluster));
        shutdown_signal().await;
        println!("Stopping the replicas.");
    }
    cluster.shutdown().await;
    Ok(())
}
