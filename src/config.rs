//! The configuration of one node: one [`NodeConfig`], read by clap from
//! flags and `PODCACHE_*` environment variables (`podcache serve`), or
//! built in code by an embedding service ([`NodeConfig::new`]).
//!
//! Owns: typed settings, their defaults (written once, in
//! [`NodeConfig::defaults`] and [`Limits::default`]; clap shows and applies
//! those same values), their flags and their validation, and the mapping
//! of flags onto the plain core types the settings hold ([`Limits`],
//! [`Fsync`]: their `clap` impls are here, not beside them). Must not
//! touch: anything that runs; nothing else reads flags or the environment
//! for these settings.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::PossibleValue;

use crate::durability::Fsync;
use crate::store::Limits;
use crate::units::{format_duration, parse_duration};

/// Everything a node needs to run, besides its discovery source.
///
/// Every field but the node's own name and addresses is a flag of
/// `podcache serve`; the defaults are those of [`NodeConfig::defaults`].
#[derive(Debug, Clone, clap::Args)]
pub struct NodeConfig {
    /// Where the REST API listens.
    #[arg(long, env = "PODCACHE_HTTP_ADDR", help_heading = "Network",
          default_value_t = NodeConfig::defaults().http_addr)]
    pub http_addr: SocketAddr,
    /// Where the gRPC service listens. Every replica uses the same port, as
    /// pods of one Deployment do.
    #[arg(long, env = "PODCACHE_GRPC_ADDR", help_heading = "Network",
          default_value_t = NodeConfig::defaults().grpc_addr)]
    pub grpc_addr: SocketAddr,
    /// The address peers reach this node at (its pod IP). The binary takes
    /// it from `--pod-ip`, else `POD_IP`, else the first non-loopback IPv4
    /// of the host.
    #[arg(skip = NodeConfig::defaults().pod_ip)]
    pub pod_ip: IpAddr,
    /// This node's name (pod name). The binary takes it from `--pod-name`,
    /// else `POD_NAME`, else the host name.
    #[arg(skip)]
    pub pod_name: String,
    /// The node's host IP, shown in `/v1/cluster`. Default: none (the
    /// binary reads `--host-ip`, else `HOST_IP`).
    #[arg(skip)]
    pub host_ip: Option<String>,
    /// Key, value, batch, TTL, clock and capacity limits.
    #[command(flatten)]
    pub limits: Limits,
    /// Largest accepted REST request body in bytes (413 above).
    #[arg(long, env = "PODCACHE_MAX_BODY_BYTES", help_heading = "Limits",
          default_value_t = NodeConfig::defaults().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Largest JSON Schema accepted by `PUT /v1/schema/{type}`, in bytes
    /// (413 above); every write of a type with a schema is checked
    /// against it, so keep schemas small.
    #[arg(long, env = "PODCACHE_MAX_SCHEMA_BYTES", help_heading = "Limits",
          default_value_t = NodeConfig::defaults().max_schema_bytes)]
    pub max_schema_bytes: usize,
    /// Largest gRPC message this node accepts, in bytes. Fan-out batches
    /// and snapshot chunks are cut well below it.
    #[arg(long, env = "PODCACHE_MAX_GRPC_MESSAGE_BYTES", help_heading = "Limits",
          default_value_t = NodeConfig::defaults().max_grpc_message_bytes)]
    pub max_grpc_message_bytes: usize,
    /// How long a peer that answers no call keeps its pending writes; past
    /// it they are released (counted as dropped, reason
    /// `peer_down_released`) and anti-entropy repairs the peer when it
    /// answers again. A peer that answers, however slowly, is never
    /// released.
    #[arg(long, env = "PODCACHE_DOWN_PEER_RETENTION", help_heading = "Replication",
          value_name = "DURATION", value_parser = parse_duration,
          default_value = format_duration(NodeConfig::defaults().down_peer_retention))]
    pub down_peer_retention: Duration,
    /// Most bytes of entries in one fan-out request (an epoch larger than
    /// this goes in several, applied together by the peer).
    #[arg(long, env = "PODCACHE_MAX_BATCH_BYTES", help_heading = "Replication",
          default_value_t = NodeConfig::defaults().max_batch_bytes)]
    pub max_batch_bytes: usize,
    /// How long `?wait=all` waits for every peer.
    #[arg(long, env = "PODCACHE_WAIT_TIMEOUT", help_heading = "Replication",
          value_name = "DURATION", value_parser = parse_duration,
          default_value = format_duration(NodeConfig::defaults().wait_timeout))]
    pub wait_timeout: Duration,
    /// How long the decider's lease lasts (in etcd or a Kubernetes Lease):
    /// how long conditional writes may be refused after the decider dies.
    #[arg(long, env = "PODCACHE_DECIDER_LEASE", help_heading = "Replication",
          value_name = "DURATION", value_parser = parse_duration,
          default_value = format_duration(NodeConfig::defaults().decider_lease))]
    pub decider_lease: Duration,
    /// How far the clocks of two replicas may drift apart during one lease:
    /// the decider stops deciding this long before its lease runs out.
    #[arg(long, env = "PODCACHE_DECIDER_CLOCK_DRIFT", help_heading = "Replication",
          value_name = "DURATION", value_parser = parse_duration,
          default_value = format_duration(NodeConfig::defaults().decider_clock_drift))]
    pub decider_clock_drift: Duration,
    /// Deadline of one peer call (of one chunk, for a snapshot).
    #[arg(long, env = "PODCACHE_RPC_TIMEOUT", help_heading = "Replication",
          value_name = "DURATION", value_parser = parse_duration,
          default_value = format_duration(NodeConfig::defaults().rpc_timeout))]
    pub rpc_timeout: Duration,
    /// How often an idle peer link checks that its peer is up, with up to
    /// --anti-entropy-peers links; with more, each link checks less often,
    /// so a node sends that many checks per interval in all.
    #[arg(long, env = "PODCACHE_HEARTBEAT_INTERVAL", help_heading = "Replication",
          value_name = "DURATION", value_parser = parse_duration,
          default_value = format_duration(NodeConfig::defaults().heartbeat_interval))]
    pub heartbeat_interval: Duration,
    /// Longest pause between retries to a failing peer.
    #[arg(long, env = "PODCACHE_MAX_RETRY_BACKOFF", help_heading = "Replication",
          value_name = "DURATION", value_parser = parse_duration,
          default_value = format_duration(NodeConfig::defaults().max_retry_backoff))]
    pub max_retry_backoff: Duration,
    /// Snapshots (bootstrap pulls, full resyncs) this node serves at once;
    /// more are refused and the caller pulls from another peer.
    #[arg(long, env = "PODCACHE_MAX_CONCURRENT_SNAPSHOTS", help_heading = "Replication",
          default_value_t = NodeConfig::defaults().max_concurrent_snapshots)]
    pub max_concurrent_snapshots: usize,
    /// Target size of one snapshot chunk, in bytes.
    #[arg(long, env = "PODCACHE_SNAPSHOT_CHUNK_BYTES", help_heading = "Replication",
          default_value_t = NodeConfig::defaults().snapshot_chunk_bytes)]
    pub snapshot_chunk_bytes: usize,
    /// How long tombstones and expired entries are kept (so that no older
    /// copy can come back through replication) before being dropped; at
    /// least ten anti-entropy intervals. A node cut off from its peers for
    /// longer resyncs in full when it returns.
    #[arg(long, env = "PODCACHE_TOMBSTONE_GRACE", help_heading = "Replication",
          value_name = "DURATION", value_parser = parse_duration,
          default_value = format_duration(NodeConfig::defaults().tombstone_grace))]
    pub tombstone_grace: Duration,
    /// How often a node compares its digest with some peers and repairs
    /// what differs (see --anti-entropy-peers).
    #[arg(long, env = "PODCACHE_ANTI_ENTROPY_INTERVAL", help_heading = "Replication",
          value_name = "DURATION", value_parser = parse_duration,
          default_value = format_duration(NodeConfig::defaults().anti_entropy_interval))]
    pub anti_entropy_interval: Duration,
    /// On SIGTERM the node first reports not-ready and keeps serving for
    /// this long (while Kubernetes removes it from the Service's endpoints),
    /// then stops accepting and drains.
    #[arg(long, env = "PODCACHE_SHUTDOWN_DELAY", help_heading = "Network",
          value_name = "DURATION", value_parser = parse_duration,
          default_value = format_duration(NodeConfig::defaults().shutdown_delay))]
    pub shutdown_delay: Duration,
    /// Peers a node compares digests with per anti-entropy round, and the
    /// number of idle links it checks per heartbeat interval: a node's idle
    /// cost stays flat in the size of the cluster, and every peer is
    /// covered within ceil((N-1) / this) rounds.
    #[arg(long, env = "PODCACHE_ANTI_ENTROPY_PEERS", help_heading = "Replication",
          default_value_t = NodeConfig::defaults().anti_entropy_peers)]
    pub anti_entropy_peers: usize,
    /// How long shutdown may take to finish requests and send what is
    /// pending to peers (after the shutdown delay).
    #[arg(long, env = "PODCACHE_SHUTDOWN_GRACE", help_heading = "Network",
          value_name = "DURATION", value_parser = parse_duration,
          default_value = format_duration(NodeConfig::defaults().shutdown_grace))]
    pub shutdown_grace: Duration,
    /// Where the node keeps its state on disk, to come back with it after a
    /// restart (of itself or of the whole cluster). Unset: memory only.
    #[arg(long, env = "PODCACHE_DATA_DIR", help_heading = "Storage")]
    pub data_dir: Option<PathBuf>,
    /// When the data directory's log is synced to disk: `always` answers a
    /// write only once it is on disk (concurrent writes share one fsync),
    /// `interval` once a second (a machine crash loses at most the last
    /// second), `never` leaves it to the kernel.
    #[arg(long, env = "PODCACHE_FSYNC", help_heading = "Storage", value_enum,
          default_value_t = NodeConfig::defaults().fsync)]
    pub fsync: Fsync,
    /// The data directory's log is compacted (a snapshot of the whole
    /// state written, older files removed) once it is larger than this and
    /// than the last snapshot.
    #[arg(long, env = "PODCACHE_COMPACT_LOG_BYTES", help_heading = "Storage",
          default_value_t = NodeConfig::defaults().compact_log_bytes)]
    pub compact_log_bytes: u64,
    /// REST bearer tokens, one per line: `read:<token>`, `write:<token>`
    /// or a bare (write) token; re-read when it changes. Unset: the REST
    /// API is open, as the original service was.
    #[arg(long, env = "PODCACHE_AUTH_TOKEN_FILE", help_heading = "Security")]
    pub auth_token_file: Option<PathBuf>,
    /// With --auth-token-file: leave /metrics open for Prometheus.
    #[arg(long, env = "PODCACHE_PUBLIC_METRICS", help_heading = "Security",
          default_value_t = NodeConfig::defaults().public_metrics, action = clap::ArgAction::Set)]
    pub public_metrics: bool,
    /// With --auth-token-file: leave the dashboard's data (/v1/cluster,
    /// /metrics) open; otherwise the page asks for a read token.
    #[arg(long, env = "PODCACHE_PUBLIC_DASHBOARD", help_heading = "Security",
          default_value_t = NodeConfig::defaults().public_dashboard, action = clap::ArgAction::Set)]
    pub public_dashboard: bool,
    /// Mutual TLS between replicas (see [`crate::tls`]); unset is plain
    /// text, which the node warns about at start.
    #[command(flatten)]
    pub tls: Option<crate::tls::TlsFiles>,
    /// TLS on the REST port (see [`crate::http_tls`]); unset is plain HTTP.
    #[command(flatten)]
    pub http_tls: Option<crate::http_tls::HttpTlsFiles>,
    /// A REST connection that has not sent a whole request head within
    /// this long is closed: a client sending its headers slowly, or an idle
    /// keep-alive connection (a watch stream is not cut).
    #[arg(long, env = "PODCACHE_HTTP_HEADER_TIMEOUT", help_heading = "Security",
          value_name = "DURATION", value_parser = parse_duration,
          default_value = format_duration(NodeConfig::defaults().http_header_timeout))]
    pub http_header_timeout: Duration,
    /// How often the token and certificate files are checked for changes.
    #[arg(long, env = "PODCACHE_SECRETS_RELOAD_INTERVAL", help_heading = "Security",
          value_name = "DURATION", value_parser = parse_duration,
          default_value = format_duration(NodeConfig::defaults().secrets_reload_interval))]
    pub secrets_reload_interval: Duration,
    /// REST requests handled at once; more get 503 at once (probes never).
    #[arg(long, env = "PODCACHE_MAX_CONCURRENT_REQUESTS", help_heading = "Limits",
          default_value_t = NodeConfig::defaults().max_concurrent_requests)]
    pub max_concurrent_requests: usize,
    /// Open connections per listener (REST and gRPC each); more are closed
    /// on accept.
    #[arg(long, env = "PODCACHE_MAX_CONNECTIONS", help_heading = "Limits",
          default_value_t = NodeConfig::defaults().max_connections)]
    pub max_connections: usize,
    /// Change events kept for watchers that reconnect with `Last-Event-ID`
    /// (older ones get a reset and the whole namespace instead).
    #[arg(long, env = "PODCACHE_WATCH_REPLAY_EVENTS", help_heading = "Limits",
          default_value_t = NodeConfig::defaults().watch_replay_events)]
    pub watch_replay_events: usize,
    /// Open /v1/watch streams; more get 503.
    #[arg(long, env = "PODCACHE_MAX_WATCH_STREAMS", help_heading = "Limits",
          default_value_t = NodeConfig::defaults().max_watch_streams)]
    pub max_watch_streams: usize,
    /// gRPC requests handled at once per connection.
    #[arg(long = "max-concurrent-rpcs", env = "PODCACHE_MAX_CONCURRENT_RPCS", help_heading = "Limits",
          default_value_t = NodeConfig::defaults().max_concurrent_rpcs_per_connection)]
    pub max_concurrent_rpcs_per_connection: usize,
    /// Serve OpenFeature's remote evaluation protocol (OFREP,
    /// `POST /ofrep/v1/evaluate/flags[/{key}]`) on the REST port, with the
    /// entries of this type as the flags. Default: off (those paths
    /// answer 404).
    #[arg(
        long,
        env = "PODCACHE_OFREP_TYPE",
        help_heading = "Network",
        value_name = "TYPE",
        allow_negative_numbers = true
    )]
    pub ofrep_type: Option<i32>,
}

/// Default REST port (the original service's container port).
pub const DEFAULT_HTTP_PORT: u16 = 8087;
/// Default gRPC port.
pub const DEFAULT_GRPC_PORT: u16 = 9090;

/// The smallest value each duration setting may take: below it a node
/// would spin (or refuse everything); a smaller value is an error, never
/// silently raised.
const MINIMUMS: [(&str, Duration); 8] = [
    ("--anti-entropy-interval", Duration::from_millis(10)),
    ("--secrets-reload-interval", Duration::from_millis(100)),
    ("--heartbeat-interval", Duration::from_millis(10)),
    ("--max-retry-backoff", Duration::from_millis(1)),
    ("--rpc-timeout", Duration::from_millis(1)),
    ("--wait-timeout", Duration::from_millis(1)),
    ("--down-peer-retention", Duration::from_millis(1)),
    ("--http-header-timeout", Duration::from_millis(100)),
];

impl NodeConfig {
    /// The defaults, written once: clap shows and applies these, and
    /// [`NodeConfig::new`] starts from them. The name and pod IP here are
    /// placeholders that `new` replaces.
    pub fn defaults() -> Self {
        Self {
            http_addr: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), DEFAULT_HTTP_PORT),
            grpc_addr: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), DEFAULT_GRPC_PORT),
            pod_ip: Ipv4Addr::UNSPECIFIED.into(),
            pod_name: String::new(),
            host_ip: None,
            limits: Limits::default(),
            max_body_bytes: 8 * 1024 * 1024,
            max_schema_bytes: 64 * 1024,
            max_grpc_message_bytes: 16 * 1024 * 1024,
            down_peer_retention: Duration::from_secs(600),
            max_batch_bytes: 1024 * 1024,
            wait_timeout: Duration::from_secs(5),
            decider_lease: Duration::from_secs(10),
            decider_clock_drift: Duration::from_millis(500),
            rpc_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(2),
            max_retry_backoff: Duration::from_secs(2),
            snapshot_chunk_bytes: 1024 * 1024,
            max_concurrent_snapshots: 2,
            tombstone_grace: Duration::from_secs(24 * 3600),
            anti_entropy_interval: Duration::from_secs(10),
            anti_entropy_peers: 3,
            shutdown_grace: Duration::from_secs(10),
            shutdown_delay: Duration::ZERO,
            data_dir: None,
            fsync: Fsync::Interval,
            compact_log_bytes: 64 << 20,
            auth_token_file: None,
            public_metrics: true,
            public_dashboard: false,
            tls: None,
            http_tls: None,
            http_header_timeout: Duration::from_secs(10),
            secrets_reload_interval: Duration::from_secs(5),
            max_concurrent_requests: 1024,
            max_connections: 4096,
            max_watch_streams: 256,
            watch_replay_events: 10_000,
            max_concurrent_rpcs_per_connection: 256,
            ofrep_type: None,
        }
    }

    /// Defaults for a node known as `pod_name` at `pod_ip`.
    pub fn new(pod_name: impl Into<String>, pod_ip: IpAddr) -> Self {
        Self {
            pod_name: pod_name.into(),
            pod_ip,
            ..Self::defaults()
        }
    }

    /// A node on loopback address `ip` with both listeners on port 0 and fast
    /// timers, for tests.
    #[cfg(any(test, feature = "testsuite"))]
    pub fn for_test(ip: Ipv4Addr) -> Self {
        let mut config = Self::new(format!("node-{ip}"), ip.into());
        config.http_addr = SocketAddr::new(ip.into(), 0);
        config.grpc_addr = SocketAddr::new(ip.into(), 0);
        config.wait_timeout = Duration::from_secs(3);
        config.decider_lease = Duration::from_secs(2);
        config.decider_clock_drift = Duration::from_millis(200);
        config.rpc_timeout = Duration::from_secs(2);
        config.heartbeat_interval = Duration::from_millis(200);
        config.max_retry_backoff = Duration::from_millis(200);
        config.shutdown_grace = Duration::from_secs(2);
        config.anti_entropy_interval = Duration::from_millis(300);
        config
    }

    /// Checks settings that cannot work, alone or together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.pod_name.is_empty() {
            return Err(ConfigError::Invalid("pod name must not be empty".into()));
        }
        if self.pod_name.len() > crate::store::Meta::MAX_FIELD_BYTES {
            // Every entry names the pod that took it, and peers refuse
            // names past this.
            return Err(ConfigError::Invalid(format!(
                "pod name is {} bytes, at most {} are allowed",
                self.pod_name.len(),
                crate::store::Meta::MAX_FIELD_BYTES
            )));
        }
        let durations = [
            self.anti_entropy_interval,
            self.secrets_reload_interval,
            self.heartbeat_interval,
            self.max_retry_backoff,
            self.rpc_timeout,
            self.wait_timeout,
            self.down_peer_retention,
            self.http_header_timeout,
        ];
        for ((flag, minimum), value) in MINIMUMS.iter().zip(durations) {
            if value < *minimum {
                return Err(ConfigError::Invalid(format!(
                    "{flag} must be at least {}, got {}",
                    format_duration(*minimum),
                    format_duration(value)
                )));
            }
        }
        if self.decider_lease < Duration::from_secs(2) || self.decider_lease.subsec_nanos() != 0 {
            // etcd counts leases in whole seconds, and refuses very short ones.
            return Err(ConfigError::Invalid(
                "--decider-lease must be a whole number of seconds, at least 2s".into(),
            ));
        }
        if self.decider_clock_drift * 2 >= self.decider_lease {
            return Err(ConfigError::Invalid(
                "--decider-clock-drift must be less than half of --decider-lease".into(),
            ));
        }
        if self.ofrep_type == Some(crate::store::SCHEMA_TYPE) {
            return Err(ConfigError::Invalid(format!(
                "--ofrep-type {} is the reserved type of the schemas",
                crate::store::SCHEMA_TYPE
            )));
        }
        if self.max_schema_bytes == 0 {
            return Err(ConfigError::Invalid(
                "--max-schema-bytes must be at least 1".into(),
            ));
        }
        if self.compact_log_bytes < 4096 {
            return Err(ConfigError::Invalid(
                "--compact-log-bytes must be at least 4096".into(),
            ));
        }
        if self.tombstone_grace < self.anti_entropy_interval * 10 {
            return Err(ConfigError::Invalid(
                "the tombstone grace must be at least ten anti-entropy intervals".into(),
            ));
        }
        if self.max_batch_bytes > self.max_grpc_message_bytes / 2 {
            return Err(ConfigError::Invalid(
                "max batch bytes must be at most half the gRPC message limit".into(),
            ));
        }
        if self.snapshot_chunk_bytes > self.max_grpc_message_bytes / 2 {
            return Err(ConfigError::Invalid(
                "snapshot chunk bytes must be at most half the gRPC message limit".into(),
            ));
        }
        if self.limits.max_value_bytes + self.limits.max_key_bytes + 64
            > self.max_grpc_message_bytes / 2
        {
            return Err(ConfigError::Invalid(
                "the gRPC message limit must hold twice the largest entry".into(),
            ));
        }
        if self.data_dir.is_some()
            && self.limits.max_value_bytes + self.limits.max_key_bytes
                > crate::durability::MAX_ENTRY_BYTES
        {
            return Err(ConfigError::Invalid(format!(
                "with --data-dir, --max-key-bytes plus --max-value-bytes must be at most {} (the largest record the data directory writes)",
                crate::durability::MAX_ENTRY_BYTES
            )));
        }
        if self.limits.history_versions > crate::store::MAX_HISTORY_VERSIONS {
            return Err(ConfigError::Invalid(format!(
                "--history-versions must be at most {}",
                crate::store::MAX_HISTORY_VERSIONS
            )));
        }
        for (name, value) in [
            ("max concurrent requests", self.max_concurrent_requests),
            ("max connections", self.max_connections),
            ("max watch streams", self.max_watch_streams),
            ("watch replay events", self.watch_replay_events),
            (
                "max concurrent RPCs per connection",
                self.max_concurrent_rpcs_per_connection,
            ),
            ("max entries per type", self.limits.max_entries_per_type),
            ("max memory bytes", self.limits.max_total_bytes),
            ("max batch bytes", self.max_batch_bytes),
            ("snapshot chunk bytes", self.snapshot_chunk_bytes),
            ("max concurrent snapshots", self.max_concurrent_snapshots),
            ("anti-entropy peers", self.anti_entropy_peers),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        Ok(())
    }
}

/// The flags of [`Limits`] (all its fields but `max_ttl_secs`, which has
/// none): [`NodeConfig`] flattens them through the `clap` impls of
/// `Limits` below, which convert.
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Longest key in bytes.
    #[arg(long, env = "PODCACHE_MAX_KEY_BYTES", help_heading = "Limits",
          default_value_t = Limits::default().max_key_bytes)]
    max_key_bytes: usize,
    /// Longest value in bytes.
    #[arg(long, env = "PODCACHE_MAX_VALUE_BYTES", help_heading = "Limits",
          default_value_t = Limits::default().max_value_bytes)]
    max_value_bytes: usize,
    /// Most entries in one batch write.
    #[arg(long, env = "PODCACHE_MAX_BATCH_ENTRIES", help_heading = "Limits",
          default_value_t = Limits::default().max_batch_entries)]
    max_batch_entries: usize,
    /// Remote timestamps further ahead of local wall time than this are
    /// refused.
    // Held in milliseconds; the flag takes a duration.
    #[arg(long = "max-clock-drift", env = "PODCACHE_MAX_CLOCK_DRIFT", help_heading = "Replication",
          value_name = "DURATION", value_parser = crate::units::parse_duration_ms,
          default_value = format_duration(Duration::from_millis(Limits::default().max_clock_drift_ms)))]
    max_clock_drift_ms: u64,
    /// Most entries holding a value in one type; writes of new keys past it
    /// get 507 (tombstones are not counted).
    #[arg(long, env = "PODCACHE_MAX_ENTRIES_PER_TYPE", help_heading = "Limits",
          default_value_t = Limits::default().max_entries_per_type)]
    max_entries_per_type: usize,
    /// Most namespaces (types); a write that would create one past it gets
    /// 507 (a type exists while it holds entries or tombstones).
    #[arg(long, env = "PODCACHE_MAX_TYPES", help_heading = "Limits",
          default_value_t = Limits::default().max_types)]
    max_types: usize,
    /// Most bytes of keys and values held in all; writes past it get 507
    /// (nothing is evicted; tombstones count their key).
    #[arg(long = "max-memory-bytes", env = "PODCACHE_MAX_MEMORY_BYTES", help_heading = "Limits",
          default_value_t = Limits::default().max_total_bytes)]
    max_total_bytes: usize,
    /// Superseded versions kept per key for `GET .../history` and
    /// rollback (values and deletions); 0 keeps none, at most 10,000.
    #[arg(long, env = "PODCACHE_HISTORY_VERSIONS", help_heading = "History",
          default_value_t = Limits::default().history_versions)]
    history_versions: usize,
    /// Most bytes the kept versions may take in all (keys, values and a
    /// fixed overhead per version); the oldest kept is dropped first.
    #[arg(long, env = "PODCACHE_HISTORY_MAX_BYTES", help_heading = "History",
          default_value_t = Limits::default().history_max_bytes)]
    history_max_bytes: usize,
}

impl LimitArgs {
    /// `limits` with every field that has a flag set from these.
    fn onto(self, limits: Limits) -> Limits {
        Limits {
            max_key_bytes: self.max_key_bytes,
            max_value_bytes: self.max_value_bytes,
            max_batch_entries: self.max_batch_entries,
            max_clock_drift_ms: self.max_clock_drift_ms,
            max_entries_per_type: self.max_entries_per_type,
            max_types: self.max_types,
            max_total_bytes: self.max_total_bytes,
            history_versions: self.history_versions,
            history_max_bytes: self.history_max_bytes,
            ..limits
        }
    }
}

impl clap::FromArgMatches for Limits {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Ok(LimitArgs::from_arg_matches(matches)?.onto(Limits::default()))
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        // Every flag has a default, so the matches hold all of them: an
        // update sets each field that has a flag, as the derive would.
        *self = LimitArgs::from_arg_matches(matches)?.onto(self.clone());
        Ok(())
    }
}

impl clap::Args for Limits {
    fn group_id() -> Option<clap::Id> {
        LimitArgs::group_id()
    }

    fn augment_args(command: clap::Command) -> clap::Command {
        LimitArgs::augment_args(command)
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        LimitArgs::augment_args_for_update(command)
    }
}

/// `--fsync`'s values, each with the help `podcache serve --help` shows.
impl clap::ValueEnum for Fsync {
    fn value_variants<'a>() -> &'a [Self] {
        &[Fsync::Always, Fsync::Interval, Fsync::Never]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let (name, help) = match self {
            Fsync::Always => (
                "always",
                "Before a write is answered; concurrent writes share one `fsync`",
            ),
            Fsync::Interval => (
                "interval",
                "About once a second (as Redis's `appendfsync everysec`): a power cut loses what came in the last one to two seconds, more while the disk stalls",
            ),
            Fsync::Never => (
                "never",
                "Never by podcache: the kernel writes back when it likes",
            ),
        };
        Some(PossibleValue::new(name).help(help))
    }
}

/// A configuration that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting is out of range or contradicts another.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The memory limit of this process's cgroup (v2 `memory.max`, else v1
/// `memory.limit_in_bytes`), if it has one. `PODCACHE_CGROUP_MEMORY_FILE`
/// names another file to read (for tests).
pub fn cgroup_memory_limit() -> Option<u64> {
    let files: Vec<PathBuf> = match std::env::var_os("PODCACHE_CGROUP_MEMORY_FILE") {
        Some(path) => vec![path.into()],
        None => vec![
            "/sys/fs/cgroup/memory.max".into(),
            "/sys/fs/cgroup/memory/memory.limit_in_bytes".into(),
        ],
    };
    files
        .iter()
        .find_map(|path| parse_memory_limit(&std::fs::read_to_string(path).ok()?))
}

/// A cgroup memory limit file's value: `max` (or v1's huge "unlimited"
/// number) means none.
fn parse_memory_limit(text: &str) -> Option<u64> {
    let limit: u64 = text.trim().parse().ok()?;
    (limit < 1 << 60).then_some(limit)
}

/// RSS the process takes before holding anything (measured: 35–42 MB per
/// node in bench/RESULTS.md's replica-count table), rounded up.
const BASELINE_RSS: u64 = 64 << 20;
/// RSS per byte of keys and values: bench/RESULTS.md measured 209–232
/// bytes of RSS per entry of 112 bytes (100-byte values, 12-byte keys) on
/// the writing node right after a million-entry fill, ≈ 2.1; 2.5 leaves
/// room for what fan-out and bootstrap hold for a moment.
const RSS_PER_DATA_BYTE: f64 = 2.5;

/// The `--max-memory-bytes` (bytes of keys and values) that keeps a node
/// under a memory `limit`: a write past it gets 507 before the kernel's OOM
/// killer is reached. For entries much smaller than ~100 bytes the fixed
/// overhead per entry weighs more: set `--max-memory-bytes` lower (or
/// `--max-entries-per-type`).
pub fn data_budget_for(limit: u64) -> usize {
    let usable = limit.saturating_sub(BASELINE_RSS);
    ((usable as f64 / RSS_PER_DATA_BYTE) as u64).max(1 << 20) as usize
}

/// The first non-loopback IPv4 address of this host, read from the kernel's
/// `/proc/net/fib_trie` (the original design's default pod IP).
pub fn first_non_loopback_ipv4() -> Option<Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/net/fib_trie").ok()?;
    local_ipv4s_from_fib_trie(&text)
        .into_iter()
        .find(|ip| !ip.is_loopback())
}

/// Addresses marked `/32 host LOCAL` in a `/proc/net/fib_trie` listing,
/// in order of appearance.
fn local_ipv4s_from_fib_trie(text: &str) -> Vec<Ipv4Addr> {
    let mut found = Vec::new();
    let mut last_leaf: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("|-- ") {
            last_leaf = rest.trim().parse().ok();
        } else if trimmed.starts_with("/32 host LOCAL")
            && let Some(ip) = last_leaf.filter(|ip| !found.contains(ip))
        {
            found.push(ip);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use clap::{Args, FromArgMatches};

    use super::*;

    #[test]
    fn fib_trie_local_addresses_are_found_in_order() {
        let text = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     +-- 127.0.0.0/8 2 0 2\n        |-- 127.0.0.1\n           /32 host LOCAL\n     |-- 10.1.2.3\n        /32 host LOCAL\n     |-- 10.1.2.255\n        /32 link BROADCAST\nLocal:\n     |-- 10.1.2.3\n        /32 host LOCAL\n";
        assert_eq!(
            local_ipv4s_from_fib_trie(text),
            vec![Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(10, 1, 2, 3)]
        );
    }

    /// With a data directory an entry must fit one of its records: larger
    /// limits (which a large gRPC message limit allows) are refused.
    #[test]
    fn entries_past_the_data_directory_record_cap_are_refused() {
        let mut config = NodeConfig::new("a", Ipv4Addr::LOCALHOST.into());
        config.max_grpc_message_bytes = 2 << 30;
        config.limits.max_value_bytes = 300 << 20;
        config
            .validate()
            .expect("in memory only, a large value is allowed");
        config.data_dir = Some("/tmp/podcache-never-opened".into());
        let err = config.validate().expect_err("past the record cap");
        assert!(err.to_string().contains("--max-value-bytes"), "{err}");
    }

    #[test]
    fn defaults_are_valid_and_contradictions_are_refused() {
        let mut config = NodeConfig::new("a", Ipv4Addr::LOCALHOST.into());
        config.validate().expect("defaults are valid");
        config.max_batch_bytes = config.max_grpc_message_bytes;
        assert!(config.validate().is_err());
        config.max_batch_bytes = 1024;
        config.limits.max_value_bytes = config.max_grpc_message_bytes;
        assert!(config.validate().is_err());
    }

    #[test]
    fn a_cgroup_limit_gives_a_data_budget_under_it() {
        assert_eq!(parse_memory_limit("max\n"), None);
        assert_eq!(
            parse_memory_limit("9223372036854771712\n"),
            None,
            "v1 unlimited"
        );
        assert_eq!(parse_memory_limit("1073741824\n"), Some(1 << 30));
        let limit = 1u64 << 30;
        let budget = data_budget_for(limit) as u64;
        // At the measured ~2.1 bytes of RSS per byte of data, a full node
        // stays under the limit, with room to spare.
        let rss_when_full = BASELINE_RSS as f64 + budget as f64 * 2.1;
        assert!(
            rss_when_full < limit as f64 * 0.9,
            "{rss_when_full} of {limit}"
        );
        assert!(budget > 300 << 20, "{budget}");
        assert_eq!(
            data_budget_for(10 << 20),
            1 << 20,
            "a floor for tiny limits"
        );
    }

    #[test]
    fn values_below_a_minimum_are_refused_not_raised() {
        let mut config = NodeConfig::new("a", Ipv4Addr::LOCALHOST.into());
        config.anti_entropy_interval = Duration::from_millis(1);
        let err = config.validate().expect_err("too small").to_string();
        assert!(
            err.contains("--anti-entropy-interval must be at least 10ms"),
            "{err}"
        );
    }

    #[test]
    fn history_versions_past_what_a_key_can_keep_are_refused() {
        let mut config = NodeConfig::new("a", Ipv4Addr::LOCALHOST.into());
        config.limits.history_versions = crate::store::MAX_HISTORY_VERSIONS;
        assert!(config.validate().is_ok());
        config.limits.history_versions += 1;
        let err = config.validate().expect_err("too many").to_string();
        assert!(
            err.contains("--history-versions must be at most 10000"),
            "{err}"
        );
    }

    /// Parses `args` as `podcache serve` would, with the environment out of
    /// the way (each flag's variable removed).
    fn parse(args: &[&str]) -> Result<NodeConfig, clap::Error> {
        let command =
            NodeConfig::augment_args(clap::Command::new("serve")).mut_args(|arg| arg.env(None));
        let matches =
            command.try_get_matches_from(std::iter::once("serve").chain(args.iter().copied()))?;
        NodeConfig::from_arg_matches(&matches)
    }

    #[test]
    fn clap_applies_the_same_defaults_the_library_starts_from() {
        let parsed = parse(&[]).expect("no flags");
        let defaults = NodeConfig::defaults();
        assert_eq!(format!("{parsed:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn durations_take_units_and_tls_files_go_together() {
        let parsed = parse(&["--tombstone-grace", "2h", "--wait-timeout", "250ms"]).expect("valid");
        assert_eq!(parsed.tombstone_grace, Duration::from_secs(7200));
        assert_eq!(parsed.wait_timeout, Duration::from_millis(250));
        assert!(
            parse(&["--wait-timeout", "250"]).is_err(),
            "a bare number has no unit"
        );
        let tls =
            parse(&["--tls-cert", "c", "--tls-key", "k", "--tls-ca", "a"]).expect("all three");
        assert_eq!(tls.tls.map(|t| t.ca), Some(PathBuf::from("a")));
        assert!(parse(&["--tls-cert", "c"]).is_err(), "cert alone");
    }

    #[test]
    fn ofrep_is_off_unless_a_type_is_named() {
        assert_eq!(parse(&[]).expect("no flags").ofrep_type, None);
        let on = parse(&["--ofrep-type", "-3"]).expect("a negative type is an int32 too");
        assert_eq!(on.ofrep_type, Some(-3));
        assert!(parse(&["--ofrep-type", "flags"]).is_err());
        assert!(
            parse(&["--ofrep-type", "2147483648"]).is_err(),
            "past int32"
        );
    }
}
