//! Getting this node's writes to every peer and the peers' state to this
//! node: one link per peer that sends what the change index holds for it,
//! the bootstrap pull, and anti-entropy.
//!
//! Owns: peer links (their channels, tasks and status), the bootstrap and
//! anti-entropy exchanges, and who decides conditional writes
//! ([`decider`]: the rule, the forwarding). The decisions are plain types beside the calls
//! that carry them: `link` (a link's state machine), `batch` (cutting
//! an epoch into requests), `assembly` (holding a peer's epoch until its
//! last request), `anti_entropy::plan`, [`oldest`] (which
//! member has run longest), `answer` (what this node answers to a peer's
//! exchanges). The network is behind two seams: `transport` for a link,
//! `exchange` for anti-entropy and the bootstrap pull; the simulation
//! (`sim`, tests only) runs the protocol over both. Must not touch: the merge rule (the store
//! decides), what is pending (the change index in [`crate::replica`]
//! decides), membership (discovery decides; `Replicator::update_peers`
//! only follows it).

pub(crate) mod answer;
pub mod anti_entropy;
pub(crate) mod assembly;
pub(crate) mod batch;
pub mod bootstrap;
pub mod decider;
pub mod error;
pub(crate) mod exchange;
pub(crate) mod link;
pub mod oldest;
mod peer_link;
#[cfg(test)]
mod sim;
pub(crate) mod transport;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

pub use error::ReplicationError;
pub use peer_link::PeerView;

use peer_link::LinkContext;
pub(crate) use peer_link::PeerState;

use crate::config::NodeConfig;
use crate::discovery::Peer;
use crate::replica::Replica;
use crate::replica::changes::PeerLabel;

struct Link {
    state: Arc<PeerState>,
    cancel: CancellationToken,
    /// The peer's channel, shared with anti-entropy.
    channel: Channel,
}

/// A peer as anti-entropy sees it: its address, the calls of the state
/// exchanges ([`exchange::StateClient`] in production) and its link's state.
#[derive(Debug, Clone)]
pub(crate) struct Target<P = exchange::StateClient> {
    pub(crate) addr: String,
    pub(crate) peer: P,
    pub(crate) state: Arc<PeerState>,
}

/// Addresses at which this node reached itself: a peer list that names the
/// node under an address other than its own dial address (a node started
/// without `--pod-ip` takes the host's first address, while its peers list
/// it by the one it listens on). Found when the answer to `Hello` carries
/// this node's own id; such an address is no peer, whatever discovery
/// says, and is dropped with one warning.
#[derive(Debug, Default)]
pub(crate) struct SelfAddrs {
    addrs: Mutex<std::collections::BTreeSet<String>>,
    /// Wakes the membership loop, which closes the link and recounts.
    found: tokio::sync::Notify,
}

impl SelfAddrs {
    /// True when `answer` (a peer's answer to `Hello`) is this node, `me`.
    pub(crate) fn is_me(
        me: &crate::proto::podcache::NodeInfo,
        answer: Option<&crate::proto::podcache::NodeInfo>,
    ) -> bool {
        answer.is_some_and(|n| n.node_id == me.node_id && n.started_at_ms == me.started_at_ms)
    }

    /// Records that `addr` reaches this node; true the first time (the
    /// caller warns then, once per address).
    pub(crate) fn found(&self, addr: &str) -> bool {
        let new = self
            .addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(addr.to_owned());
        if new {
            self.found.notify_one();
        }
        new
    }

    /// True when `addr` is known to reach this node.
    pub(crate) fn contains(&self, addr: &str) -> bool {
        self.addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(addr)
    }

    /// Resolves when an address is found after the last call.
    pub(crate) async fn changed(&self) {
        self.found.notified().await;
    }
}

/// The set of peer links of one node.
pub(crate) struct Replicator {
    /// Open links by peer address. Locked only for short, await-free work.
    links: Mutex<BTreeMap<String, Link>>,
    /// What every link needs.
    ctx: Arc<LinkContext>,
    /// Link tasks, so that drain can wait for them.
    tracker: TaskTracker,
    /// Parent of every link's token.
    cancel: CancellationToken,
    /// Mutual TLS for every peer channel, when configured.
    tls: Option<Arc<crate::tls::PeerTls>>,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator").finish_non_exhaustive()
    }
}

/// A lazily connecting channel to a peer: one per peer, reused for every
/// call, reconnecting by itself. With `tls`, every connection is mutual
/// TLS with the certificates in use when it is (re)dialled.
pub(crate) fn peer_channel(
    addr: &str,
    config: &NodeConfig,
    tls: Option<&Arc<crate::tls::PeerTls>>,
) -> Result<Channel, ReplicationError> {
    let bad = |reason: String| ReplicationError::BadAddress {
        addr: addr.to_owned(),
        reason,
    };
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(config.rpc_timeout.min(Duration::from_secs(2)))
        .tcp_nodelay(true)
        // Liveness is the link's own heartbeat (bounded per node, see
        // `LinkContext::heartbeat`) and TCP keep-alive; HTTP/2 pings only
        // while calls are open, rarely, so idle cost does not grow with
        // the number of peers.
        .http2_keep_alive_interval(Duration::from_secs(60))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(false);
    Ok(match tls {
        None => endpoint.connect_lazy(),
        Some(tls) => {
            let addr: std::net::SocketAddr =
                addr.parse().map_err(|_| bad("not ip:port".to_owned()))?;
            endpoint.connect_with_connector_lazy(crate::tls::TlsConnect {
                tls: tls.clone(),
                addr,
            })
        }
    })
}

impl Replicator {
    pub(crate) fn new(
        replica: Arc<Replica>,
        tls: Option<Arc<crate::tls::PeerTls>>,
        repair_tx: mpsc::Sender<String>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            links: Mutex::new(BTreeMap::new()),
            ctx: Arc::new(LinkContext {
                me: replica.identity.to_wire(),
                replica,
                repair_tx,
                drain: CancellationToken::new(),
                links: Default::default(),
                selves: Default::default(),
            }),
            tracker: TaskTracker::new(),
            cancel,
            tls,
        }
    }

    fn links(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Link>> {
        // Every critical section is a map insert or remove: a panic cannot
        // leave it half-done.
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn close(&self, addr: &str, link: Link) {
        link.cancel.cancel();
        // Whatever was pending only for it goes at once.
        self.ctx.replica.changes().detach(link.state.cursor);
        let metrics = &self.ctx.replica.metrics;
        for gauge in [&metrics.pending_entries, &metrics.pending_bytes] {
            gauge.remove(&crate::metrics::label("peer", addr.to_owned()));
        }
    }

    /// Opens links to new peers and closes links to peers that left.
    pub(crate) fn update_peers(&self, peers: &[Peer]) {
        let mut links = self.links();
        let wanted: BTreeMap<&str, &Peer> = peers
            .iter()
            .filter(|p| {
                p.grpc_addr != self.ctx.me.grpc_addr && !self.ctx.selves.contains(&p.grpc_addr)
            })
            .map(|p| (p.grpc_addr.as_str(), p))
            .collect();
        let gone: Vec<String> = links
            .keys()
            .filter(|addr| !wanted.contains_key(addr.as_str()))
            .cloned()
            .collect();
        for addr in gone {
            if let Some(link) = links.remove(&addr) {
                if self.ctx.selves.contains(&addr) {
                    debug!(peer = %addr, "closing the link to this node's own address");
                } else {
                    info!(peer = %addr, "peer left; closing its link and releasing its pending writes");
                }
                self.close(&addr, link);
            }
        }
        for (addr, peer) in wanted {
            if let Some(link) = links.get(addr) {
                if link.state.same_pod(peer) {
                    link.state.set_discovered(peer.clone());
                    continue;
                }
                // Pod IPs are reused: another pod (or a restarted one) at
                // the same address is a new peer with a new link.
                info!(peer = %addr, name = ?peer.name, "a different pod now holds this address");
                if let Some(old) = links.remove(addr) {
                    self.close(addr, old);
                }
            }
            if self.cancel.is_cancelled() || self.ctx.drain.is_cancelled() {
                continue;
            }
            let channel = match peer_channel(addr, &self.ctx.replica.config, self.tls.as_ref()) {
                Ok(channel) => channel,
                Err(error) => {
                    warn!(peer = %addr, %error, "cannot open a link to this peer");
                    continue;
                }
            };
            info!(peer = %addr, "peer joined; opening its link");
            let label = Arc::new(PeerLabel::new(addr));
            let cursor = self.ctx.replica.changes().attach(label.clone());
            let state = Arc::new(PeerState::new(
                peer.clone(),
                label,
                cursor,
                peer_link::settings(&self.ctx.replica.config),
            ));
            let cancel = self.cancel.child_token();
            self.tracker.spawn(peer_link::run(
                self.ctx.clone(),
                channel.clone(),
                state.clone(),
                cancel.clone(),
            ));
            links.insert(
                addr.to_owned(),
                Link {
                    state,
                    cancel,
                    channel,
                },
            );
        }
        self.count_links(&links);
    }

    fn count_links(&self, links: &BTreeMap<String, Link>) {
        self.ctx
            .links
            .store(links.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The addresses found to reach this node itself.
    pub(crate) fn selves(&self) -> &SelfAddrs {
        &self.ctx.selves
    }

    /// The exchanges' clients over a peer's channel.
    fn state_client(&self, channel: Channel) -> exchange::StateClient {
        let config = &self.ctx.replica.config;
        exchange::StateClient::new(channel, config.max_grpc_message_bytes, config.rpc_timeout)
    }

    /// The exchanges' clients for a peer this node has no link to yet (the
    /// bootstrap pull's candidates).
    pub(crate) fn connect(&self, addr: &str) -> Result<exchange::StateClient, ReplicationError> {
        let channel = peer_channel(addr, &self.ctx.replica.config, self.tls.as_ref())?;
        Ok(self.state_client(channel))
    }

    /// The channel of the link to `addr`, if this node has one (and it is
    /// not this node itself).
    pub(crate) fn channel_of(&self, addr: &str) -> Option<Channel> {
        if self.ctx.selves.contains(addr) {
            return None;
        }
        self.links().get(addr).map(|link| link.channel.clone())
    }

    /// Every peer with its channel, for anti-entropy.
    pub(crate) fn targets(&self) -> Vec<Target> {
        self.links()
            .iter()
            .filter(|(addr, _)| !self.ctx.selves.contains(addr))
            .map(|(addr, link)| Target {
                addr: addr.clone(),
                peer: self.state_client(link.channel.clone()),
                state: link.state.clone(),
            })
            .collect()
    }

    /// The state of every link, for `/v1/cluster` and metrics.
    pub(crate) fn peer_views(&self) -> Vec<PeerView> {
        let states: Vec<Arc<PeerState>> = self
            .links()
            .iter()
            .filter(|(addr, _)| !self.ctx.selves.contains(addr))
            .map(|(_, l)| l.state.clone())
            .collect();
        states.iter().map(|s| s.view(&self.ctx.replica)).collect()
    }

    /// What each link holds pending, for the gauges of a scrape.
    pub(crate) fn backlogs(&self) -> Vec<crate::metrics::PeerBacklog> {
        let views = self.peer_views().into_iter();
        views
            .map(|p| crate::metrics::PeerBacklog {
                peer: p.grpc_addr,
                entries: p.pending_entries,
                bytes: p.pending_bytes,
            })
            .collect()
    }

    /// Shutdown: the links send what is pending until `deadline`, then
    /// stop.
    pub(crate) async fn drain(&self, deadline: tokio::time::Instant) {
        self.ctx.drain.cancel();
        self.tracker.close();
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            warn!("fan-out not drained within the grace period");
        }
        self.cancel.cancel();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::SelfAddrs;
    use crate::proto::podcache::NodeInfo;

    #[test]
    fn an_answer_is_this_node_by_its_id_and_start_whatever_its_address() {
        let me = NodeInfo {
            node_id: 7,
            started_at_ms: 100,
            grpc_addr: "10.0.0.1:9090".into(),
            ..Default::default()
        };
        let alias = NodeInfo {
            grpc_addr: "127.0.0.61:9090".into(),
            ..me.clone()
        };
        assert!(SelfAddrs::is_me(&me, Some(&alias)));
        let other = NodeInfo {
            node_id: 8,
            ..me.clone()
        };
        let restarted_twin = NodeInfo {
            started_at_ms: 101,
            ..me.clone()
        };
        assert!(!SelfAddrs::is_me(&me, Some(&other)));
        assert!(!SelfAddrs::is_me(&me, Some(&restarted_twin)));
        assert!(!SelfAddrs::is_me(&me, None), "a legacy peer says nothing");

        let selves = SelfAddrs::default();
        assert!(selves.found("127.0.0.61:9090"), "first: warn");
        assert!(!selves.found("127.0.0.61:9090"), "then: once");
        assert!(selves.contains("127.0.0.61:9090") && !selves.contains("10.0.0.2:9090"));
    }
}
