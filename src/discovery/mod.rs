//! How a node learns who its peers are.
//!
//! Owns: the [`Discovery`] trait, the [`PeerSet`] snapshot every backend
//! publishes, and the backends (one module each). Must not touch: the
//! store or replication; a backend only publishes the whole current peer
//! set into a `watch` channel, and readers see the latest snapshot.

pub mod dns;
pub mod election;
pub mod etcd;
pub mod etcd_lease;
pub mod etcd_v2;
#[cfg(feature = "kubernetes")]
mod kube_client;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
#[cfg(feature = "kubernetes")]
pub mod kubernetes_election;
pub mod pod;
mod pod_table;
mod retry;
pub mod static_list;

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use dns::DnsDiscovery;
pub use etcd::EtcdDiscovery;
pub use etcd_lease::EtcdLeaseDiscovery;
pub use etcd_v2::EtcdV2Discovery;
#[cfg(feature = "kubernetes")]
pub use kubernetes::KubernetesDiscovery;
pub use static_list::{StaticList, StaticPeers};

/// One peer as discovery sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The address to dial: `<podIP>:<grpc port>`.
    pub grpc_addr: String,
    /// Pod name, when the source knows it.
    pub name: Option<String>,
    /// Host (node) IP, when the source knows it.
    pub host_ip: Option<String>,
    /// Start time in Unix milliseconds, when the source knows it (a pod's
    /// running container `startedAt`). The peer's own answer to `Hello`
    /// takes precedence.
    pub started_at_ms: Option<i64>,
}

impl Peer {
    /// A peer known only by its address.
    pub fn at(grpc_addr: impl Into<String>) -> Self {
        Self {
            grpc_addr: grpc_addr.into(),
            name: None,
            host_ip: None,
            started_at_ms: None,
        }
    }
}

/// How current the published peer set is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryState {
    /// The source has not answered yet; the node stays not-ready.
    Pending,
    /// The set reflects the source as of `at`.
    Fresh {
        /// When the source last answered.
        at: SystemTime,
    },
    /// The source is unreachable; the set is the last one known.
    Stale {
        /// When the source last answered, if ever.
        last_good: Option<SystemTime>,
        /// Why it is unreachable.
        error: String,
    },
}

/// The whole current membership, as published by a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSet {
    /// Every peer but this node, sorted by address.
    pub peers: Vec<Peer>,
    /// How current `peers` is.
    pub state: DiscoveryState,
}

impl PeerSet {
    /// The set before the source answered.
    pub fn pending() -> Self {
        Self {
            peers: Vec::new(),
            state: DiscoveryState::Pending,
        }
    }

    /// True once the source has answered at least once (a stale set that
    /// never had a good read does not count).
    pub fn answered(&self) -> bool {
        match &self.state {
            DiscoveryState::Pending => false,
            DiscoveryState::Fresh { .. } => true,
            DiscoveryState::Stale { last_good, .. } => last_good.is_some(),
        }
    }

    /// A fresh set of `peers`, minus `me`, sorted and without duplicates.
    pub fn fresh(mut peers: Vec<Peer>, me: &str) -> Self {
        peers.retain(|p| p.grpc_addr != me);
        peers.sort_by(|a, b| a.grpc_addr.cmp(&b.grpc_addr));
        peers.dedup_by(|a, b| a.grpc_addr == b.grpc_addr);
        Self {
            peers,
            state: DiscoveryState::Fresh {
                at: SystemTime::now(),
            },
        }
    }
}

/// What a backend is given to run.
#[derive(Debug)]
pub struct DiscoveryContext {
    /// This node: its dial address and pod IP must never appear as a peer;
    /// backends that register the node (etcd-lease) publish the rest.
    pub identity: crate::identity::NodeIdentity,
    /// Where the backend publishes every new peer set.
    pub peers_tx: watch::Sender<PeerSet>,
    /// Fires when the node shuts down.
    pub cancel: CancellationToken,
    /// The node's metrics (discovery state, errors, skipped values).
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// A source of membership. Object-safe, so the node holds a
/// `Box<dyn Discovery>` chosen at run time.
#[async_trait::async_trait]
pub trait Discovery: Send + Sync + 'static {
    /// Short name of the source, shown in `/v1/cluster` and logs.
    fn name(&self) -> &'static str;

    /// Publishes the whole peer set into `ctx.peers_tx` whenever it changes,
    /// until `ctx.cancel` fires. Failures are published as
    /// [`DiscoveryState::Stale`], never returned: discovery outlives them.
    async fn run(self: Box<Self>, ctx: DiscoveryContext);

    /// Where the decider's lease is held with this source (an etcd key, a
    /// Kubernetes Lease), or `None`: the oldest ready replica decides (see
    /// `crate::replication::decider`).
    fn election(&self) -> Option<Box<dyn election::Election>> {
        None
    }
}
