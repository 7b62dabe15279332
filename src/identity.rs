//! Who this node is: its identity as told to peers in every request, and
//! the wall clock in the unit every part uses.
//!
//! Owns: [`NodeIdentity`], its wire form, and [`unix_ms`]. Must not touch
//! anything else; every layer may use it.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::NodeConfig;
use crate::proto::podcache as pb;

/// Milliseconds since the Unix epoch, from the wall clock.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Who this node is, as told to peers in every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// Tie-break id stamped into every version this node creates; derived
    /// from the name and start time, so a restarted pod gets a new one.
    pub node_id: u64,
    /// Pod name.
    pub name: String,
    /// The address peers dial: `<pod IP>:<gRPC port>`.
    pub grpc_addr: String,
    /// Process start, Unix milliseconds; the oldest node is the bootstrap
    /// source for newcomers.
    pub started_at_ms: i64,
    /// Pod IP.
    pub pod_ip: String,
    /// Host IP, if known.
    pub host_ip: Option<String>,
}

impl NodeIdentity {
    /// An identity for unit tests of discovery backends: pod `name` at
    /// `grpc_addr`, started now.
    #[cfg(any(test, feature = "testsuite"))]
    pub fn for_test(name: &str, grpc_addr: &str) -> Self {
        let pod_ip = grpc_addr
            .rsplit_once(':')
            .map_or(grpc_addr, |(ip, _)| ip)
            .to_owned();
        Self {
            node_id: 1,
            name: name.to_owned(),
            grpc_addr: grpc_addr.to_owned(),
            started_at_ms: unix_ms() as i64,
            pod_ip,
            host_ip: None,
        }
    }

    /// The identity of a node configured by `config` whose gRPC listener is
    /// bound on `grpc_port`, starting now.
    pub(crate) fn new(config: &NodeConfig, grpc_port: u16) -> Self {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let grpc_addr = SocketAddr::new(config.pod_ip, grpc_port).to_string();
        // FNV-1a over name, address and start time: stable, cheap, and
        // distinct across incarnations of the same pod.
        let mut node_id: u64 = 0xcbf2_9ce4_8422_2325;
        let seed = format!("{}|{}|{}", config.pod_name, grpc_addr, started.as_nanos());
        for byte in seed.bytes() {
            node_id ^= u64::from(byte);
            node_id = node_id.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self {
            node_id,
            name: config.pod_name.clone(),
            grpc_addr,
            started_at_ms: started.as_millis() as i64,
            pod_ip: config.pod_ip.to_string(),
            host_ip: config.host_ip.clone(),
        }
    }

    /// The `podcache.v1.NodeInfo` every request names its sender with.
    pub fn to_wire(&self) -> pb::NodeInfo {
        pb::NodeInfo {
            node_id: self.node_id,
            name: self.name.clone(),
            grpc_addr: self.grpc_addr.clone(),
            started_at_ms: self.started_at_ms,
            pod_ip: self.pod_ip.clone(),
            host_ip: self.host_ip.clone().unwrap_or_default(),
        }
    }
}
