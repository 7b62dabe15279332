//! The `podcache` binary: `serve`, `ctl` and `demo`. Parses flags (each also
//! settable as `PODCACHE_<FLAG>`), sets up logging and signals, maps errors
//! to exit codes; everything else lives in the library.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hyper::Method;
use podcache::client::{RestClient, entry_path};
use podcache::demo::{DemoOptions, try_it, walk_through};
use podcache::discovery::pod::{PodFilter, parse_rfc3339_ms, parse_selector};
use podcache::discovery::{
    Discovery, DnsDiscovery, EtcdDiscovery, EtcdLeaseDiscovery, EtcdV2Discovery, StaticList,
};
use podcache::etcd::{EtcdClient, EtcdSettings, EtcdTls};
use podcache::k8s_sim::{PodEncoding, PodSimulator, SimPod};
use podcache::{NodeBuilder, NodeConfig};
use serde_json::Value;

/// mimalloc instead of the system allocator: the profile of the write path
/// showed glibc malloc/free as the largest cost (about a fifth of the
/// samples); see bench/RESULTS.md. Its v2 line (cargo feature `v2`): the
/// Rust wrapper asks for every block through `mi_malloc_aligned`, which in
/// v3 takes an over-allocating slow path for any block size that is not a
/// power of two (a 160-byte entry landed in a 192-byte block), while v2
/// serves alignments up to 16 from the plain size classes.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a configuration that cannot run (BSD `EX_USAGE`).
const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "podcache",
    version,
    about = "Keeps a small cache identical on every replica of a Kubernetes service"
)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "PODCACHE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one node.
    Serve(Box<ServeArgs>),
    /// Talk to a running node's REST API.
    Ctl(CtlArgs),
    /// Run a local cluster on loopback addresses and walk through what podcache does.
    Demo(DemoArgs),
    /// Write pod objects into etcd the way kube-apiserver stores them (for demos and tests).
    #[command(name = "k8s-sim")]
    K8sSim(K8sSimArgs),
}

#[derive(Debug, Args)]
struct K8sSimArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Which etcd API to write through (v2 writes JSON only).
    #[arg(long, default_value = "v3")]
    api: SimApi,
    /// How pods are stored (v3 only).
    #[arg(long, default_value = "protobuf")]
    encoding: SimEncoding,
    #[command(subcommand)]
    op: SimOp,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum SimApi {
    V3,
    V2,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum SimEncoding {
    Protobuf,
    Json,
}

#[derive(Debug, Subcommand)]
enum SimOp {
    /// Create or update a pod.
    Put {
        /// Pod name.
        #[arg(long)]
        name: String,
        /// Pod IP; without it the pod is Pending.
        #[arg(long)]
        ip: Option<String>,
        /// Host IP.
        #[arg(long, default_value = "127.0.0.1")]
        host_ip: String,
        /// Phase (Running when --ip is given, else Pending).
        #[arg(long)]
        phase: Option<String>,
        /// Labels, comma-separated key=value.
        #[arg(long, default_value = "app=hello")]
        labels: String,
        /// The container's startedAt (RFC 3339) [default: now].
        #[arg(long)]
        started_at: Option<String>,
        /// Mark the pod as being deleted.
        #[arg(long)]
        deleting: bool,
    },
    /// Delete a pod.
    Delete {
        /// Pod name.
        #[arg(long)]
        name: String,
    },
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

/// Where Kubernetes' etcd is and which pods are peers.
#[derive(Debug, Args)]
struct EtcdArgs {
    /// etcd endpoints, comma-separated URLs (https:// for TLS).
    #[arg(long, env = "PODCACHE_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// CA that signed etcd's certificate (kube-apiserver's --etcd-cafile).
    #[arg(long, env = "PODCACHE_ETCD_CA")]
    etcd_ca: Option<std::path::PathBuf>,
    /// Client certificate for etcd (kube-apiserver's --etcd-certfile).
    #[arg(long, env = "PODCACHE_ETCD_CERT")]
    etcd_cert: Option<std::path::PathBuf>,
    /// Client key for etcd (kube-apiserver's --etcd-keyfile).
    #[arg(long, env = "PODCACHE_ETCD_KEY")]
    etcd_key: Option<std::path::PathBuf>,
    /// Namespace of the pods [default: $POD_NAMESPACE, else "default"].
    #[arg(long, env = "PODCACHE_NAMESPACE")]
    namespace: Option<String>,
}

impl EtcdArgs {
    fn settings(&self, timeout: Duration) -> Result<EtcdSettings, Failure> {
        let endpoints: Vec<String> = self
            .etcd_endpoints
            .iter()
            .map(|e| e.trim().trim_end_matches('/').to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(Failure::Config(
                "--etcd-endpoints is required for etcd discovery".into(),
            ));
        }
        for e in &endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(Failure::Config(format!(
                    "--etcd-endpoints: {e:?} is not an http:// or https:// URL"
                )));
            }
        }
        if self.etcd_cert.is_some() != self.etcd_key.is_some() {
            return Err(Failure::Config(
                "--etcd-cert and --etcd-key go together".into(),
            ));
        }
        for path in [&self.etcd_ca, &self.etcd_cert, &self.etcd_key]
            .into_iter()
            .flatten()
        {
            if !path.is_file() {
                return Err(Failure::Config(format!(
                    "{} is not a readable file",
                    path.display()
                )));
            }
        }
        Ok(EtcdSettings {
            endpoints,
            tls: EtcdTls {
                ca: self.etcd_ca.clone(),
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
            },
            timeout,
        })
    }

    fn namespace(&self) -> String {
        self.namespace
            .clone()
            .or_else(|| env_nonempty("POD_NAMESPACE"))
            .unwrap_or_else(|| "default".into())
    }
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// REST API address.
    #[arg(long, env = "PODCACHE_HTTP_ADDR", default_value = "0.0.0.0:8087")]
    http_addr: SocketAddr,
    /// gRPC address; every replica must use the same port.
    #[arg(long, env = "PODCACHE_GRPC_ADDR", default_value = "0.0.0.0:9090")]
    grpc_addr: SocketAddr,
    /// The IP peers reach this node at [default: $POD_IP, else the first non-loopback IPv4].
    #[arg(long, env = "PODCACHE_POD_IP")]
    pod_ip: Option<IpAddr>,
    /// This node's name [default: $POD_NAME, else the host name].
    #[arg(long, env = "PODCACHE_POD_NAME")]
    pod_name: Option<String>,
    /// This node's host IP, shown in /v1/cluster [default: $HOST_IP].
    #[arg(long, env = "PODCACHE_HOST_IP")]
    host_ip: Option<String>,
    /// Where peers come from.
    #[arg(long, env = "PODCACHE_DISCOVERY", default_value = "static")]
    discovery: DiscoveryKind,
    /// Peers for --discovery static: comma-separated ip:port (own address ignored).
    #[arg(long, env = "PODCACHE_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Label selector of this app's pods, e.g. app=hello (terms joined by commas).
    #[arg(long, env = "PODCACHE_SELECTOR")]
    selector: Option<String>,
    /// A substring every peer pod's name contains (the original design's match).
    #[arg(long, env = "PODCACHE_NAME_CONTAINS")]
    name_contains: Option<String>,
    /// For --discovery kubernetes: a kubeconfig file [default: in-cluster
    /// service account, else $KUBECONFIG, else ~/.kube/config].
    #[arg(long, env = "PODCACHE_KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// For --discovery etcd-lease: the key prefix this cluster's nodes register under.
    #[arg(long, env = "PODCACHE_ETCD_PREFIX", default_value = podcache::discovery::etcd_lease::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// For --discovery etcd-lease: lease time to live in seconds (how long a crashed node stays listed).
    #[arg(long, env = "PODCACHE_LEASE_TTL_SECS", default_value_t = 10)]
    lease_ttl_secs: u64,
    /// For --discovery dns: the headless Service to resolve.
    #[arg(long, env = "PODCACHE_DNS_NAME")]
    dns_name: Option<String>,
    /// For --discovery dns: how often to resolve it, in milliseconds.
    #[arg(long, env = "PODCACHE_DNS_INTERVAL_MS", default_value_t = 5_000)]
    dns_interval_ms: u64,
    /// Longest key in bytes.
    #[arg(long, env = "PODCACHE_MAX_KEY_BYTES", default_value_t = 1024)]
    max_key_bytes: usize,
    /// Longest value in bytes.
    #[arg(long, env = "PODCACHE_MAX_VALUE_BYTES", default_value_t = 1024 * 1024)]
    max_value_bytes: usize,
    /// Most entries in one batch write.
    #[arg(long, env = "PODCACHE_MAX_BATCH_ENTRIES", default_value_t = 10_000)]
    max_batch_entries: usize,
    /// Most entries holding a value in one type; writes of new keys past it get 507.
    #[arg(
        long,
        env = "PODCACHE_MAX_ENTRIES_PER_TYPE",
        default_value_t = 5_000_000
    )]
    max_entries_per_type: usize,
    /// Most bytes of keys and values held in all; writes past it get 507 (nothing is evicted).
    #[arg(long, env = "PODCACHE_MAX_MEMORY_BYTES", default_value_t = 1024 * 1024 * 1024)]
    max_memory_bytes: usize,
    /// REST requests handled at once; more get 503 at once (probes excepted).
    #[arg(long, env = "PODCACHE_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    max_concurrent_requests: usize,
    /// Open connections per listener (REST and gRPC each); more are closed on accept.
    #[arg(long, env = "PODCACHE_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Open /v1/watch streams; more get 503.
    #[arg(long, env = "PODCACHE_MAX_WATCH_STREAMS", default_value_t = 256)]
    max_watch_streams: usize,
    /// gRPC requests handled at once per connection.
    #[arg(long, env = "PODCACHE_MAX_CONCURRENT_RPCS", default_value_t = 256)]
    max_concurrent_rpcs: usize,
    /// REST bearer tokens, one per line: `read:<token>`, `write:<token>` or a bare (write) token.
    #[arg(long, env = "PODCACHE_AUTH_TOKEN_FILE")]
    auth_token_file: Option<std::path::PathBuf>,
    /// With --auth-token-file: leave /metrics open for Prometheus.
    #[arg(long, env = "PODCACHE_PUBLIC_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    public_metrics: bool,
    /// With --auth-token-file: leave the dashboard's data (/v1/cluster, /metrics) open.
    #[arg(long, env = "PODCACHE_PUBLIC_DASHBOARD", default_value_t = false, action = clap::ArgAction::Set)]
    public_dashboard: bool,
    /// This replica's certificate (PEM) for mutual TLS between replicas.
    #[arg(long, env = "PODCACHE_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "PODCACHE_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// The CA that signs every replica's certificate (PEM).
    #[arg(long, env = "PODCACHE_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// How often the token and certificate files are checked for changes, in milliseconds.
    #[arg(
        long,
        env = "PODCACHE_SECRETS_RELOAD_INTERVAL_MS",
        default_value_t = 5_000
    )]
    secrets_reload_interval_ms: u64,
    /// Largest REST request body in bytes.
    #[arg(long, env = "PODCACHE_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Largest gRPC message in bytes.
    #[arg(long, env = "PODCACHE_MAX_GRPC_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    max_grpc_message_bytes: usize,
    /// No longer used: fan-out holds every pending key for a live peer, with
    /// no queue to overflow. Accepted (with a warning) so that existing
    /// manifests keep starting.
    #[arg(long, env = "PODCACHE_PEER_QUEUE_CAPACITY", hide = true)]
    peer_queue_capacity: Option<usize>,
    /// How long a peer that answers no call keeps its pending writes, in
    /// milliseconds; then they are released and anti-entropy repairs it
    /// when it returns.
    #[arg(
        long,
        env = "PODCACHE_DOWN_PEER_RETENTION_MS",
        default_value_t = 600_000
    )]
    down_peer_retention_ms: u64,
    /// How long ?wait=all waits, in milliseconds.
    #[arg(long, env = "PODCACHE_WAIT_TIMEOUT_MS", default_value_t = 5_000)]
    wait_timeout_ms: u64,
    /// Deadline of one peer RPC, in milliseconds.
    #[arg(long, env = "PODCACHE_RPC_TIMEOUT_MS", default_value_t = 5_000)]
    rpc_timeout_ms: u64,
    /// Remote timestamps further ahead than this are refused, in milliseconds.
    #[arg(long, env = "PODCACHE_MAX_CLOCK_DRIFT_MS", default_value_t = 60_000)]
    max_clock_drift_ms: u64,
    /// Time allowed for draining at shutdown, in milliseconds.
    #[arg(long, env = "PODCACHE_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    shutdown_grace_ms: u64,
    /// How often digests are compared with every peer, in milliseconds.
    #[arg(
        long,
        env = "PODCACHE_ANTI_ENTROPY_INTERVAL_MS",
        default_value_t = 10_000
    )]
    anti_entropy_interval_ms: u64,
    /// How long tombstones and expired entries are kept, in milliseconds
    /// (at least ten anti-entropy intervals).
    #[arg(long, env = "PODCACHE_TOMBSTONE_GRACE_MS", default_value_t = 24 * 3600 * 1000)]
    tombstone_grace_ms: u64,
}

#[derive(Debug, Args)]
struct CtlArgs {
    /// The node's REST address.
    #[arg(long, env = "PODCACHE_ADDR", default_value = "http://127.0.0.1:8087")]
    addr: String,
    /// A file holding the bearer token for a node with --auth-token-file.
    #[arg(long, env = "PODCACHE_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    /// Print the node's JSON answers as they are.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    op: CtlOp,
}

#[derive(Debug, Subcommand)]
enum CtlOp {
    /// Print one value.
    Get { r#type: i32, key: String },
    /// Set one value.
    Set {
        r#type: i32,
        key: String,
        value: String,
        /// Expire after this many seconds, on every replica.
        #[arg(long)]
        ttl: Option<u64>,
        /// Wait until every peer acknowledged, and show what each said.
        #[arg(long)]
        wait: bool,
    },
    /// Delete one entry everywhere.
    Delete {
        r#type: i32,
        key: String,
        /// Wait until every peer acknowledged.
        #[arg(long)]
        wait: bool,
    },
    /// List a whole namespace.
    List { r#type: i32 },
    /// Follow every change to a namespace (or one key) live, until Ctrl-C.
    Watch {
        r#type: i32,
        /// Only this key.
        #[arg(long)]
        key: Option<String>,
    },
    /// Show this node, its peers and their replication state.
    Cluster,
}

#[derive(Debug, Args)]
struct DemoArgs {
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

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PODCACHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("podcache: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                init_logging(cli.log_format, "info");
                serve(*args).await
            }
            Command::Ctl(args) => ctl(args).await,
            Command::K8sSim(args) => k8s_sim(args).await,
            Command::Demo(args) => {
                init_logging(cli.log_format, "error");
                demo(args).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(msg)) => {
            eprintln!("podcache: {msg}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Run(err)) => {
            eprintln!("podcache: {err:#}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Config(String),
    Run(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Failure::Run(err)
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn node_config(args: &ServeArgs) -> Result<NodeConfig, Failure> {
    let pod_ip = match args.pod_ip {
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
    let pod_name = args
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
    let mut config = NodeConfig::new(pod_name, pod_ip);
    config.http_addr = args.http_addr;
    config.grpc_addr = args.grpc_addr;
    config.host_ip = args.host_ip.clone().or_else(|| env_nonempty("HOST_IP"));
    config.limits.max_key_bytes = args.max_key_bytes;
    config.limits.max_value_bytes = args.max_value_bytes;
    config.limits.max_batch_entries = args.max_batch_entries;
    config.limits.max_clock_drift_ms = args.max_clock_drift_ms;
    config.limits.max_entries_per_type = args.max_entries_per_type;
    config.max_concurrent_requests = args.max_concurrent_requests;
    config.max_connections = args.max_connections;
    config.max_watch_streams = args.max_watch_streams;
    config.max_concurrent_rpcs_per_connection = args.max_concurrent_rpcs;
    config.auth_token_file = args.auth_token_file.clone();
    config.public_metrics = args.public_metrics;
    config.public_dashboard = args.public_dashboard;
    config.secrets_reload_interval =
        Duration::from_millis(args.secrets_reload_interval_ms.max(100));
    config.tls = match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        (None, None, None) => None,
        (Some(cert), Some(key), Some(ca)) => Some(podcache::tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        }),
        _ => {
            return Err(Failure::Config(
                "--tls-cert, --tls-key and --tls-ca go together".into(),
            ));
        }
    };
    config.limits.max_total_bytes = args.max_memory_bytes;
    config.max_body_bytes = args.max_body_bytes;
    config.max_grpc_message_bytes = args.max_grpc_message_bytes;
    if args.peer_queue_capacity.is_some() {
        tracing::warn!(
            "--peer-queue-capacity is no longer used: fan-out keeps every pending key for a live peer"
        );
    }
    config.down_peer_retention = Duration::from_millis(args.down_peer_retention_ms);
    config.wait_timeout = Duration::from_millis(args.wait_timeout_ms);
    config.rpc_timeout = Duration::from_millis(args.rpc_timeout_ms);
    config.shutdown_grace = Duration::from_millis(args.shutdown_grace_ms);
    config.anti_entropy_interval = Duration::from_millis(args.anti_entropy_interval_ms.max(10));
    config.tombstone_grace = Duration::from_millis(args.tombstone_grace_ms);
    config
        .validate()
        .map_err(|e| Failure::Config(e.to_string()))?;
    Ok(config)
}

fn discovery(args: &ServeArgs) -> Result<Box<dyn Discovery>, Failure> {
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
            Ok(Box::new(DnsDiscovery {
                name,
                interval: Duration::from_millis(args.dns_interval_ms.max(100)),
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
                settings: args
                    .etcd
                    .settings(Duration::from_millis(args.rpc_timeout_ms))?,
                prefix,
                lease_ttl: Duration::from_secs(args.lease_ttl_secs),
            }))
        }
        DiscoveryKind::Kubernetes => {
            let filter = pod_filter(args)?;
            kubernetes_discovery(filter, args.kubeconfig.clone())
        }
        DiscoveryKind::Etcd | DiscoveryKind::EtcdV2 => {
            let filter = pod_filter(args)?;
            let settings = args
                .etcd
                .settings(Duration::from_millis(args.rpc_timeout_ms))?;
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
fn pod_filter(args: &ServeArgs) -> Result<PodFilter, Failure> {
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
        grpc_port: args.grpc_addr.port(),
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

async fn serve(args: ServeArgs) -> Result<(), Failure> {
    let config = node_config(&args)?;
    let discovery = discovery(&args)?;
    let node = NodeBuilder::new(config)
        .boxed_discovery(discovery)
        .start()
        .await
        .map_err(|e| match e {
            podcache::node::NodeError::Config(_)
            | podcache::node::NodeError::Tokens(_)
            | podcache::node::NodeError::Tls(_) => Failure::Config(e.to_string()),
            other => Failure::Run(other.into()),
        })?;
    shutdown_signal().await;
    node.shutdown().await;
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn demo(args: DemoArgs) -> Result<(), Failure> {
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

async fn ctl(args: CtlArgs) -> Result<(), Failure> {
    let mut client = RestClient::new(&args.addr).map_err(|e| Failure::Config(e.to_string()))?;
    if let Some(path) = &args.token_file {
        let token = std::fs::read_to_string(path)
            .map_err(|e| Failure::Config(format!("--token-file {}: {e}", path.display())))?;
        client = client
            .with_token(token.trim())
            .map_err(|e| Failure::Config(e.to_string()))?;
    }
    if let CtlOp::Watch { r#type, key } = &args.op {
        return ctl_watch(&client, *r#type, key.as_deref(), args.json).await;
    }
    let (method, path, body) = match &args.op {
        CtlOp::Get { r#type, key } => (Method::GET, entry_path(*r#type, key), String::new()),
        CtlOp::Set {
            r#type,
            key,
            value,
            ttl,
            wait,
        } => {
            let mut query = Vec::new();
            if let Some(ttl) = ttl {
                query.push(format!("ttl={ttl}"));
            }
            if *wait {
                query.push("wait=all".to_owned());
            }
            let mut path = entry_path(*r#type, key);
            if !query.is_empty() {
                path = format!("{path}?{}", query.join("&"));
            }
            (Method::PUT, path, value.clone())
        }
        CtlOp::Delete { r#type, key, wait } => {
            let mut path = entry_path(*r#type, key);
            if *wait {
                path.push_str("?wait=all");
            }
            (Method::DELETE, path, String::new())
        }
        CtlOp::List { r#type } => (Method::GET, format!("/v1/cache/{type}"), String::new()),
        CtlOp::Watch { .. } => unreachable!("handled above"),
        CtlOp::Cluster => (Method::GET, "/v1/cluster".to_owned(), String::new()),
    };
    let answer = client
        .request(method, &path, body)
        .await
        .map_err(|e| Failure::Run(e.into()))?;
    let json = answer.json();
    if !answer.status.is_success() {
        let message = json["message"].as_str().unwrap_or("request failed");
        return Err(Failure::Run(anyhow::anyhow!(
            "{} ({})",
            message,
            answer.status
        )));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json).unwrap_or_default()
        );
        return Ok(());
    }
    match &args.op {
        CtlOp::Get { .. } => println!("{}", json["value"].as_str().unwrap_or_default()),
        CtlOp::Set { .. } | CtlOp::Delete { .. } => {
            println!("version {}", json["version"].as_str().unwrap_or("?"));
            for report in json["replication"].as_array().into_iter().flatten() {
                println!(
                    "  {:<24} {:<22} {}",
                    report["name"].as_str().unwrap_or("?"),
                    report["peer"].as_str().unwrap_or("?"),
                    report["status"].as_str().unwrap_or("?")
                );
            }
        }
        CtlOp::List { .. } => {
            if let Some(entries) = json["entries"].as_object() {
                let width = entries.keys().map(|k| k.len()).max().unwrap_or(3).max(3);
                println!("{:<width$}  VALUE", "KEY");
                for (key, value) in entries {
                    println!("{key:<width$}  {}", value.as_str().unwrap_or_default());
                }
            }
        }
        CtlOp::Cluster => print_cluster(&json),
        CtlOp::Watch { .. } => {}
    }
    Ok(())
}

/// Prints every change event of a namespace as it arrives.
async fn ctl_watch(
    client: &RestClient,
    ty: i32,
    key: Option<&str>,
    json: bool,
) -> Result<(), Failure> {
    use http_body_util::BodyExt;
    let mut path = format!("/v1/watch/{ty}");
    if let Some(key) = key {
        path = format!("{path}?key={}", podcache::client::percent_encode(key));
    }
    let (status, mut body) = client
        .stream(&path)
        .await
        .map_err(|e| Failure::Run(e.into()))?;
    if !status.is_success() {
        return Err(Failure::Run(anyhow::anyhow!("watch refused ({status})")));
    }
    if !json {
        println!(
            "{:<8} {:<24} {:<10} {:<34} VALUE",
            "ORIGIN", "KEY", "CHANGE", "VERSION"
        );
    }
    let mut buffer = String::new();
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let frame = tokio::select! {
            _ = &mut stop => return Ok(()),
            frame = body.frame() => frame,
        };
        let Some(frame) = frame else {
            return Err(Failure::Run(anyhow::anyhow!("the node closed the watch")));
        };
        let frame = frame.map_err(|e| Failure::Run(e.into()))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buffer.push_str(&String::from_utf8_lossy(data));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            for line in block.lines().filter_map(|l| l.strip_prefix("data:")) {
                let Ok(event) = serde_json::from_str::<Value>(line.trim()) else {
                    continue;
                };
                if json {
                    println!("{event}");
                } else {
                    let change = if event["deleted"] == true {
                        "delete"
                    } else {
                        "set"
                    };
                    println!(
                        "{:<8} {:<24} {:<10} {:<34} {}",
                        event["origin"].as_str().unwrap_or("?"),
                        event["key"].as_str().unwrap_or("?"),
                        change,
                        event["version"].as_str().unwrap_or("?"),
                        event["value"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
}

fn print_cluster(json: &Value) {
    let node = &json["node"];
    println!(
        "{:<28} {:<22} {:<7} {:<6} {:>6} {:>8}  LAST ERROR",
        "NAME", "GRPC", "STATUS", "OLDEST", "QUEUE", "SENT"
    );
    println!(
        "{:<28} {:<22} {:<7} {:<6} {:>6} {:>8}  (this node)",
        node["name"].as_str().unwrap_or("?"),
        node["grpc_addr"].as_str().unwrap_or("?"),
        if node["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "pulling"
        },
        if node["oldest"].as_bool() == Some(true) {
            "yes"
        } else {
            ""
        },
        "-",
        "-",
    );
    for peer in json["peers"].as_array().into_iter().flatten() {
        println!(
            "{:<28} {:<22} {:<7} {:<6} {:>6} {:>8}  {}",
            peer["name"].as_str().unwrap_or("?"),
            peer["grpc_addr"].as_str().unwrap_or("?"),
            peer["status"].as_str().unwrap_or("?"),
            if peer["oldest"].as_bool() == Some(true) {
                "yes"
            } else {
                ""
            },
            peer["queue_depth"].to_string(),
            peer["sent_batches"].to_string(),
            peer["last_error"].as_str().unwrap_or(""),
        );
    }
    println!(
        "discovery: {} ({})",
        json["discovery"]["source"].as_str().unwrap_or("?"),
        json["discovery"]["state"].as_str().unwrap_or("?")
    );
}

async fn k8s_sim(args: K8sSimArgs) -> Result<(), Failure> {
    let settings = args.etcd.settings(Duration::from_secs(5))?;
    let namespace = args.etcd.namespace();
    let sim = match args.api {
        SimApi::V3 => {
            let client =
                EtcdClient::connect(&settings).map_err(|e| Failure::Config(e.to_string()))?;
            let encoding = match args.encoding {
                SimEncoding::Protobuf => PodEncoding::Protobuf,
                SimEncoding::Json => PodEncoding::Json,
            };
            PodSimulator::new(client, encoding)
        }
        SimApi::V2 => {
            PodSimulator::v2(&settings.endpoints[0]).map_err(|e| Failure::Config(e.to_string()))?
        }
    };
    match args.op {
        SimOp::Put {
            name,
            ip,
            host_ip,
            phase,
            labels,
            started_at,
            deleting,
        } => {
            let now = podcache::node::unix_ms() as i64;
            let started = match started_at.as_deref() {
                None | Some("now") => now,
                Some(text) => parse_rfc3339_ms(text).ok_or_else(|| {
                    Failure::Config(format!("--started-at: {text:?} is not RFC 3339"))
                })?,
            };
            let mut label_map = std::collections::BTreeMap::new();
            for term in
                parse_selector(&labels).map_err(|e| Failure::Config(format!("--labels: {e}")))?
            {
                match term {
                    podcache::discovery::pod::LabelTerm::Equals(k, v) => {
                        label_map.insert(k, v);
                    }
                    _ => {
                        return Err(Failure::Config(
                            "--labels takes key=value terms only".into(),
                        ));
                    }
                }
            }
            let mut pod = SimPod::pending(&name, &namespace, "", started);
            pod.labels = label_map;
            if let Some(ip) = &ip {
                pod = pod.running(ip, &host_ip, started);
            }
            if let Some(phase) = phase {
                pod.phase = phase;
            }
            pod.deleting = deleting;
            let revision = sim.put(&pod).await.map_err(|e| Failure::Run(e.into()))?;
            println!(
                "{} {} ({}, revision {revision})",
                pod.key(),
                pod.phase,
                sim.describe()
            );
        }
        SimOp::Delete { name } => {
            let existed = sim
                .delete(&namespace, &name)
                .await
                .map_err(|e| Failure::Run(e.into()))?;
            if !existed {
                return Err(Failure::Run(anyhow::anyhow!(
                    "no pod {name} in namespace {namespace}"
                )));
            }
            println!("deleted {name}");
        }
    }
    Ok(())
}
