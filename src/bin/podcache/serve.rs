//! `podcache serve`: one node. The node's settings are the library's
//! [`NodeConfig`], read by clap as they are; this file adds what only the
//! command line has: the node's own name and addresses (with their
//! Kubernetes fallbacks), the choice and flags of the discovery source,
//! and the `-ms` forms of the duration flags that scripts already use.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::{Args, ValueEnum};
use podcache::discovery::pod::{PodFilter, parse_selector};
use podcache::discovery::{
    Discovery, DnsDiscovery, EtcdDiscovery, EtcdLeaseDiscovery, EtcdV2Discovery, StaticList,
};
use podcache::etcd::EtcdTls;
use podcache::units::parse_duration;
use podcache::{NodeBuilder, NodeConfig};

use crate::etcd_args::EtcdArgs;
use crate::{Failure, env_nonempty, shutdown_signal};

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    identity: IdentityArgs,
    #[command(flatten)]
    config: NodeConfig,
    #[command(flatten)]
    discovery: DiscoveryArgs,
    #[command(flatten)]
    millis: MillisecondFlags,
    /// No longer used: fan-out holds every pending key for a live peer, with
    /// no queue to overflow. Accepted (with a warning) so that existing
    /// manifests keep starting.
    #[arg(long, env = "PODCACHE_PEER_QUEUE_CAPACITY", hide = true)]
    peer_queue_capacity: Option<usize>,
    /// Threads that run the node's work [default: one per core the
    /// container may use]. With one, each write a peer receives costs
    /// about a quarter less CPU (no second worker woken for it): worth it
    /// in large clusters and for pods of one core; more serve more REST
    /// clients at once (bench/NOTES.md, "Replica count").
    #[arg(long, env = "PODCACHE_WORKER_THREADS", help_heading = "Limits",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(crate) worker_threads: Option<u16>,
}

/// Who this node is.
#[derive(Debug, Args)]
struct IdentityArgs {
    /// The IP peers reach this node at [default: $POD_IP, else the first non-loopback IPv4].
    #[arg(long, env = "PODCACHE_POD_IP", help_heading = "Network")]
    pod_ip: Option<IpAddr>,
    /// This node's name [default: $POD_NAME, else the host name].
    #[arg(long, env = "PODCACHE_POD_NAME", help_heading = "Network")]
    pod_name: Option<String>,
    /// This node's host IP, shown in /v1/cluster [default: $HOST_IP].
    #[arg(long, env = "PODCACHE_HOST_IP", help_heading = "Network")]
    host_ip: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum DiscoveryKind {
    /// A fixed list of peers (--peers).
    Static,
    /// Pods in Kubernetes' etcd, v3 API (--etcd-endpoints, TLS flags).
    Etcd,
    /// Pods in Kubernetes' etcd, v2 keys API (etcd <= 3.5 with --enable-v2).
    #[value(name = "etcd-v2")]
    EtcdV2,
    /// The address records of a headless Service (--dns-name).
    Dns,
    /// Pods listed and watched through the Kubernetes API (in-cluster
    /// service account, or --kubeconfig).
    Kubernetes,
    /// Outside Kubernetes: each node registers itself in etcd under
    /// --etcd-prefix on a lease (--etcd-endpoints, TLS flags).
    #[value(name = "etcd-lease")]
    EtcdLease,
}

/// Where peers come from.
#[derive(Debug, Args)]
struct DiscoveryArgs {
    /// Where peers come from.
    #[arg(
        long,
        env = "PODCACHE_DISCOVERY",
        default_value = "static",
        help_heading = "Discovery"
    )]
    discovery: DiscoveryKind,
    /// Peers for --discovery static: comma-separated ip:port (own address ignored).
    #[arg(
        long,
        env = "PODCACHE_PEERS",
        value_delimiter = ',',
        help_heading = "Discovery"
    )]
    peers: Vec<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Label selector of this app's pods, e.g. app=hello (terms joined by commas).
    #[arg(long, env = "PODCACHE_SELECTOR", help_heading = "Discovery")]
    selector: Option<String>,
    /// A substring every peer pod's name contains (the original design's match).
    #[arg(long, env = "PODCACHE_NAME_CONTAINS", help_heading = "Discovery")]
    name_contains: Option<String>,
    /// For --discovery kubernetes: a kubeconfig file [default: in-cluster
    /// service account, else $KUBECONFIG, else ~/.kube/config].
    #[arg(long, env = "PODCACHE_KUBECONFIG", help_heading = "Discovery")]
    kubeconfig: Option<std::path::PathBuf>,
    /// For --discovery etcd-lease: the key prefix this cluster's nodes register under.
    #[arg(long, env = "PODCACHE_ETCD_PREFIX", help_heading = "Discovery",
          default_value = podcache::discovery::etcd_lease::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// For --discovery etcd-lease: lease time to live in seconds (how long a crashed node stays listed).
    #[arg(
        long,
        env = "PODCACHE_LEASE_TTL_SECS",
        default_value_t = 10,
        help_heading = "Discovery"
    )]
    lease_ttl_secs: u64,
    /// For --discovery dns: the headless Service to resolve.
    #[arg(long, env = "PODCACHE_DNS_NAME", help_heading = "Discovery")]
    dns_name: Option<String>,
    /// For --discovery dns: how often to resolve it.
    #[arg(long, env = "PODCACHE_DNS_INTERVAL", help_heading = "Discovery",
          value_name = "DURATION", value_parser = parse_duration, default_value = "5s")]
    dns_interval: Duration,
}

/// The `-ms` forms of the duration flags, each the same setting in bare
/// milliseconds (what scripts and manifests written before the duration
/// forms use). Given, it overrides nothing silently: giving both forms of
/// one setting is an error.
#[derive(Debug, Args)]
struct MillisecondFlags {
    /// --wait-timeout in milliseconds.
    #[arg(
        long,
        env = "PODCACHE_WAIT_TIMEOUT_MS",
        conflicts_with = "wait_timeout",
        help_heading = "Durations in milliseconds (older forms)",
        hide_short_help = true
    )]
    wait_timeout_ms: Option<u64>,
    /// --rpc-timeout in milliseconds.
    #[arg(
        long,
        env = "PODCACHE_RPC_TIMEOUT_MS",
        conflicts_with = "rpc_timeout",
        help_heading = "Durations in milliseconds (older forms)",
        hide_short_help = true
    )]
    rpc_timeout_ms: Option<u64>,
    /// --max-clock-drift in milliseconds.
    #[arg(
        id = "max_clock_drift_millis",
        long = "max-clock-drift-ms",
        env = "PODCACHE_MAX_CLOCK_DRIFT_MS",
        conflicts_with = "max_clock_drift_ms",
        help_heading = "Durations in milliseconds (older forms)",
        hide_short_help = true
    )]
    max_clock_drift_ms: Option<u64>,
    /// --shutdown-grace in milliseconds.
    #[arg(
        long,
        env = "PODCACHE_SHUTDOWN_GRACE_MS",
        conflicts_with = "shutdown_grace",
        help_heading = "Durations in milliseconds (older forms)",
        hide_short_help = true
    )]
    shutdown_grace_ms: Option<u64>,
    /// --anti-entropy-interval in milliseconds.
    #[arg(
        long,
        env = "PODCACHE_ANTI_ENTROPY_INTERVAL_MS",
        conflicts_with = "anti_entropy_interval",
        help_heading = "Durations in milliseconds (older forms)",
        hide_short_help = true
    )]
    anti_entropy_interval_ms: Option<u64>,
    /// --tombstone-grace in milliseconds.
    #[arg(
        long,
        env = "PODCACHE_TOMBSTONE_GRACE_MS",
        conflicts_with = "tombstone_grace",
        help_heading = "Durations in milliseconds (older forms)",
        hide_short_help = true
    )]
    tombstone_grace_ms: Option<u64>,
    /// --secrets-reload-interval in milliseconds.
    #[arg(
        long,
        env = "PODCACHE_SECRETS_RELOAD_INTERVAL_MS",
        conflicts_with = "secrets_reload_interval",
        help_heading = "Durations in milliseconds (older forms)",
        hide_short_help = true
    )]
    secrets_reload_interval_ms: Option<u64>,
    /// --dns-interval in milliseconds.
    #[arg(
        long,
        env = "PODCACHE_DNS_INTERVAL_MS",
        conflicts_with = "dns_interval",
        help_heading = "Durations in milliseconds (older forms)",
        hide_short_help = true
    )]
    dns_interval_ms: Option<u64>,
}

impl MillisecondFlags {
    /// Puts each given `-ms` form into its setting.
    fn apply(&self, config: &mut NodeConfig, discovery: &mut DiscoveryArgs) {
        let ms = Duration::from_millis;
        let durations = [
            (self.wait_timeout_ms, &mut config.wait_timeout),
            (self.rpc_timeout_ms, &mut config.rpc_timeout),
            (self.shutdown_grace_ms, &mut config.shutdown_grace),
            (
                self.anti_entropy_interval_ms,
                &mut config.anti_entropy_interval,
            ),
            (self.tombstone_grace_ms, &mut config.tombstone_grace),
            (
                self.secrets_reload_interval_ms,
                &mut config.secrets_reload_interval,
            ),
            (self.dns_interval_ms, &mut discovery.dns_interval),
        ];
        for (given, setting) in durations {
            if let Some(value) = given {
                *setting = ms(value);
            }
        }
        if let Some(value) = self.max_clock_drift_ms {
            config.limits.max_clock_drift_ms = value;
        }
    }
}

/// The node's settings: the flags, the `-ms` forms, the node's name and
/// addresses resolved.
fn node_config(args: &mut ServeArgs) -> Result<NodeConfig, Failure> {
    let identity = &args.identity;
    let pod_ip = match identity.pod_ip {
        Some(ip) => ip,
        None => match env_nonempty("POD_IP") {
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|_| Failure::Config(format!("POD_IP is not an IP address: {raw:?}")))?,
            None => podcache::config::first_non_loopback_ipv4()
                .map(IpAddr::V4)
                .ok_or_else(|| {
                    Failure::Config(
                        "no --pod-ip, no POD_IP and no non-loopback IPv4 address on this host"
                            .into(),
                    )
                })?,
        },
    };
    let pod_name = identity
        .pod_name
        .clone()
        .or_else(|| env_nonempty("POD_NAME"))
        .or_else(|| env_nonempty("HOSTNAME"))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| pod_ip.to_string());
    let mut config = args.config.clone();
    config.pod_ip = pod_ip;
    config.pod_name = pod_name;
    config.host_ip = identity.host_ip.clone().or_else(|| env_nonempty("HOST_IP"));
    args.millis.apply(&mut config, &mut args.discovery);
    // Without --max-memory-bytes, a node in a container with a memory
    // limit refuses writes (507) before the kernel kills it.
    let given = std::env::args().any(|a| a.starts_with("--max-memory-bytes"))
        || env_nonempty("PODCACHE_MAX_MEMORY_BYTES").is_some();
    if !given && let Some(limit) = podcache::config::cgroup_memory_limit() {
        config.limits.max_total_bytes = podcache::config::data_budget_for(limit);
        tracing::info!(
            memory_limit = limit,
            max_memory_bytes = config.limits.max_total_bytes,
            "--max-memory-bytes taken from the container's memory limit"
        );
    }
    if args.peer_queue_capacity.is_some() {
        tracing::warn!(
            "--peer-queue-capacity is no longer used: fan-out keeps every pending key for a live peer"
        );
    }
    config
        .validate()
        .map_err(|e| Failure::Config(e.to_string()))?;
    Ok(config)
}

fn discovery(args: &DiscoveryArgs, config: &NodeConfig) -> Result<Box<dyn Discovery>, Failure> {
    match args.discovery {
        DiscoveryKind::Static => {
            let mut peers = Vec::new();
            for raw in args
                .peers
                .iter()
                .map(|p| p.trim())
                .filter(|p| !p.is_empty())
            {
                let addr: SocketAddr = raw.parse().map_err(|_| {
                    Failure::Config(format!("--peers: {raw:?} is not an ip:port address"))
                })?;
                peers.push(addr.to_string());
            }
            Ok(Box::new(StaticList::new(peers)))
        }
        DiscoveryKind::Dns => {
            let name = args
                .dns_name
                .clone()
                .filter(|n| !n.trim().is_empty())
                .ok_or_else(|| Failure::Config("--discovery dns needs --dns-name".into()))?;
            if args.dns_interval < Duration::from_millis(100) {
                return Err(Failure::Config(
                    "--dns-interval must be at least 100ms".into(),
                ));
            }
            Ok(Box::new(DnsDiscovery {
                name,
                interval: args.dns_interval,
            }))
        }
        DiscoveryKind::EtcdLease => {
            let prefix = args.etcd_prefix.trim().to_owned();
            if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.len() < 3 {
                return Err(Failure::Config(format!(
                    "--etcd-prefix: {prefix:?} must start and end with '/', e.g. /podcache/members/"
                )));
            }
            if !(2..=3600).contains(&args.lease_ttl_secs) {
                return Err(Failure::Config(
                    "--lease-ttl-secs must be between 2 and 3600".into(),
                ));
            }
            Ok(Box::new(EtcdLeaseDiscovery {
                settings: args.etcd.settings(config.rpc_timeout)?,
                prefix,
                lease_ttl: Duration::from_secs(args.lease_ttl_secs),
            }))
        }
        DiscoveryKind::Kubernetes => {
            let filter = pod_filter(args, config)?;
            kubernetes_discovery(filter, args.kubeconfig.clone())
        }
        DiscoveryKind::Etcd | DiscoveryKind::EtcdV2 => {
            let filter = pod_filter(args, config)?;
            let settings = args.etcd.settings(config.rpc_timeout)?;
            if args.discovery == DiscoveryKind::Etcd {
                return Ok(Box::new(EtcdDiscovery::new(settings, filter)));
            }
            if settings.endpoints.iter().any(|e| e.starts_with("https://"))
                || settings.tls != EtcdTls::default()
            {
                return Err(Failure::Config(
                    "--discovery etcd-v2 speaks plain HTTP only; use --discovery etcd for TLS"
                        .into(),
                ));
            }
            Ok(Box::new(EtcdV2Discovery::new(
                settings.endpoints,
                filter,
                settings.timeout,
            )))
        }
    }
}

/// Which pods are peers, from --namespace, --selector and --name-contains.
fn pod_filter(args: &DiscoveryArgs, config: &NodeConfig) -> Result<PodFilter, Failure> {
    let selector = match &args.selector {
        Some(text) => {
            parse_selector(text).map_err(|e| Failure::Config(format!("--selector: {e}")))?
        }
        None => Vec::new(),
    };
    let name_contains = args.name_contains.clone().filter(|s| !s.is_empty());
    if selector.is_empty() && name_contains.is_none() {
        return Err(Failure::Config(
            "pod discovery needs --selector (e.g. app=hello) or --name-contains, or every pod of the namespace would be a peer".into(),
        ));
    }
    Ok(PodFilter {
        namespace: args.etcd.namespace(),
        selector,
        name_contains,
        self_pod_ip: String::new(),
        grpc_port: config.grpc_addr.port(),
    })
}

#[cfg(feature = "kubernetes")]
fn kubernetes_discovery(
    filter: PodFilter,
    kubeconfig: Option<std::path::PathBuf>,
) -> Result<Box<dyn Discovery>, Failure> {
    if let Some(path) = &kubeconfig
        && !path.is_file()
    {
        return Err(Failure::Config(format!(
            "--kubeconfig: {} is not a readable file",
            path.display()
        )));
    }
    Ok(Box::new(podcache::discovery::KubernetesDiscovery {
        filter,
        kubeconfig,
    }))
}

#[cfg(not(feature = "kubernetes"))]
fn kubernetes_discovery(
    _: PodFilter,
    _: Option<std::path::PathBuf>,
) -> Result<Box<dyn Discovery>, Failure> {
    Err(Failure::Config(
        "this podcache was built without the `kubernetes` feature".into(),
    ))
}

/// Runs one node until SIGTERM or SIGINT, then shuts it down in order.
pub(crate) async fn run(mut args: ServeArgs) -> Result<(), Failure> {
    let config = node_config(&mut args)?;
    let discovery = discovery(&args.discovery, &config)?;
    let node = NodeBuilder::new(config)
        .boxed_discovery(discovery)
        .start()
        .await
        .map_err(|e| match e {
            podcache::node::NodeError::Config(_)
            | podcache::node::NodeError::Tokens(_)
            | podcache::node::NodeError::Tls(_)
            | podcache::node::NodeError::DataDir(_) => Failure::Config(e.to_string()),
            other => Failure::Run(other.into()),
        })?;
    shutdown_signal().await;
    node.shutdown().await;
    Ok(())
}
