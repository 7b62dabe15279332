//! The configuration of one node, already parsed and validated.
//!
//! Owns: typed settings and their defaults. The command line (`main.rs`)
//! and embedding services build a [`NodeConfig`]; nothing else reads flags
//! or the environment.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::store::Limits;

/// Everything a node needs to run, besides its discovery source.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where the REST API listens. Default `0.0.0.0:8087`.
    pub http_addr: SocketAddr,
    /// Where the gRPC service listens. Default `0.0.0.0:9090`. Every replica
    /// uses the same port, as pods of one Deployment do.
    pub grpc_addr: SocketAddr,
    /// The address peers reach this node at (its pod IP). Default: `POD_IP`,
    /// else the first non-loopback IPv4 of the host.
    pub pod_ip: IpAddr,
    /// This node's name (pod name). Default: `POD_NAME`, else the host name.
    pub pod_name: String,
    /// The node's host IP, shown in `/v1/cluster`. Default: `HOST_IP`, or none.
    pub host_ip: Option<String>,
    /// Key, value, batch, TTL and clock limits.
    pub limits: Limits,
    /// Largest accepted REST request body. Default 8 MiB.
    pub max_body_bytes: usize,
    /// Largest gRPC message this node accepts. Default 16 MiB. Fan-out
    /// batches and snapshot chunks are cut well below it.
    pub max_grpc_message_bytes: usize,
    /// How long a peer that answers no call keeps its pending writes held
    /// for it; past it they are released (counted as dropped, reason
    /// `peer_down_released`) and anti-entropy repairs the peer when it
    /// answers again. A peer that answers, however slowly, is never
    /// released. Default 10 minutes.
    pub down_peer_retention: Duration,
    /// Most bytes of entries in one fan-out request. Default 1 MiB.
    pub max_batch_bytes: usize,
    /// How long `?wait=all` waits for every peer. Default 5 s.
    pub wait_timeout: Duration,
    /// Deadline of one peer RPC (not of a whole snapshot). Default 5 s.
    pub rpc_timeout: Duration,
    /// How often an idle peer link checks that its peer is up. Default 2 s.
    pub heartbeat_interval: Duration,
    /// Longest pause between retries to a failing peer. Default 2 s.
    pub max_retry_backoff: Duration,
    /// Target size of one snapshot chunk. Default 1 MiB.
    pub snapshot_chunk_bytes: usize,
    /// How long tombstones and expired entries are kept (so that no older
    /// copy can come back through replication) before being dropped. Must
    /// be longer than any repair window; a node cut off from its peers for
    /// longer does a full resync when it returns. Default 24 hours.
    pub tombstone_grace: Duration,
    /// How often a node compares its digest with every peer and repairs
    /// what differs. Default 10 s.
    pub anti_entropy_interval: Duration,
    /// How long shutdown may take to drain queues. Default 10 s.
    pub shutdown_grace: Duration,
    /// REST bearer tokens (see [`crate::api::auth`]); `None` leaves the REST
    /// API open, as the original service was. Default none.
    pub auth_token_file: Option<PathBuf>,
    /// With tokens, whether `/metrics` stays open (for Prometheus). Default
    /// true.
    pub public_metrics: bool,
    /// With tokens, whether the dashboard's data (`/v1/cluster`) stays open.
    /// Default false: the page asks for a read token.
    pub public_dashboard: bool,
    /// Mutual TLS between replicas (see [`crate::tls`]); `None` is plain
    /// text, which the node warns about at start. Default none.
    pub tls: Option<crate::tls::TlsFiles>,
    /// How often the token and certificate files are checked for changes.
    /// Default 5 s.
    pub secrets_reload_interval: Duration,
    /// REST requests handled at once; more get 503 at once. Default 1024.
    pub max_concurrent_requests: usize,
    /// Open connections per listener (REST and gRPC each); more are closed
    /// on accept. Default 4096.
    pub max_connections: usize,
    /// Open `/v1/watch` streams; more get 503. Default 256.
    pub max_watch_streams: usize,
    /// gRPC requests handled at once per connection. Default 256.
    pub max_concurrent_rpcs_per_connection: usize,
}

/// Default REST port (the original service's container port).
pub const DEFAULT_HTTP_PORT: u16 = 8087;
/// Default gRPC port.
pub const DEFAULT_GRPC_PORT: u16 = 9090;

impl NodeConfig {
    /// Defaults for a node known as `pod_name` at `pod_ip`.
    pub fn new(pod_name: impl Into<String>, pod_ip: IpAddr) -> Self {
        Self {
            http_addr: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), DEFAULT_HTTP_PORT),
            grpc_addr: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), DEFAULT_GRPC_PORT),
            pod_ip,
            pod_name: pod_name.into(),
            host_ip: None,
            limits: Limits::default(),
            max_body_bytes: 8 * 1024 * 1024,
            max_grpc_message_bytes: 16 * 1024 * 1024,
            down_peer_retention: Duration::from_secs(600),
            max_batch_bytes: 1024 * 1024,
            wait_timeout: Duration::from_secs(5),
            rpc_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(2),
            max_retry_backoff: Duration::from_secs(2),
            snapshot_chunk_bytes: 1024 * 1024,
            tombstone_grace: Duration::from_secs(24 * 3600),
            anti_entropy_interval: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            auth_token_file: None,
            public_metrics: true,
            public_dashboard: false,
            tls: None,
            secrets_reload_interval: Duration::from_secs(5),
            max_concurrent_requests: 1024,
            max_connections: 4096,
            max_watch_streams: 256,
            max_concurrent_rpcs_per_connection: 256,
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
        config.rpc_timeout = Duration::from_secs(2);
        config.heartbeat_interval = Duration::from_millis(200);
        config.max_retry_backoff = Duration::from_millis(200);
        config.shutdown_grace = Duration::from_secs(2);
        config.anti_entropy_interval = Duration::from_millis(300);
        config
    }

    /// Checks settings that cannot work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.pod_name.is_empty() {
            return Err(ConfigError::Invalid("pod name must not be empty".into()));
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
        for (name, value) in [
            ("max concurrent requests", self.max_concurrent_requests),
            ("max connections", self.max_connections),
            ("max watch streams", self.max_watch_streams),
            (
                "max concurrent RPCs per connection",
                self.max_concurrent_rpcs_per_connection,
            ),
            ("max entries per type", self.limits.max_entries_per_type),
            ("max memory bytes", self.limits.max_total_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        Ok(())
    }
}

/// A configuration that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting is out of range or contradicts another.
    #[error("invalid configuration: {0}")]
    Invalid(String),
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
    use super::*;

    #[test]
    fn fib_trie_local_addresses_are_found_in_order() {
        let text = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     +-- 127.0.0.0/8 2 0 2\n        |-- 127.0.0.1\n           /32 host LOCAL\n     |-- 10.1.2.3\n        /32 host LOCAL\n     |-- 10.1.2.255\n        /32 link BROADCAST\nLocal:\n     |-- 10.1.2.3\n        /32 host LOCAL\n";
        assert_eq!(
            local_ipv4s_from_fib_trie(text),
            vec![Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(10, 1, 2, 3)]
        );
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
}
