//! Getting writes to every peer: one link per peer with a bounded queue and
//! one sending task, the `?wait=all` bookkeeping, and the bootstrap pull.
//!
//! Owns: peer links (their channels, queues, retry and status), fan-out,
//! delivery reports, bootstrap. Must not touch: the merge rule (the store
//! decides), membership (discovery decides; [`Replicator::update_peers`]
//! only follows it), wire parsing beyond building requests.

pub mod anti_entropy;
pub mod bootstrap;
mod peer_link;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use crate::config::NodeConfig;
use crate::discovery::Peer;
use crate::metrics::{Metrics, label};
use crate::node::NodeIdentity;
use crate::proto::podcache as pb;
use crate::store::Record;

pub(crate) use peer_link::PeerState;
pub use peer_link::PeerView;
use peer_link::{LinkContext, Outgoing};

/// What happened to one write at one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// The peer applied it (or already held something newer).
    Acked,
    /// Not acknowledged within the wait timeout; still queued and retried.
    TimedOut,
    /// Not queued: the peer's queue was full.
    Dropped,
    /// Not queued: the peer was down when its queue last overflowed, and
    /// has not answered since (anti-entropy repairs it when it does).
    PeerDown,
    /// The peer left the membership before acknowledging.
    PeerLeft,
}

impl DeliveryStatus {
    /// Lower-case name, as shown in REST answers.
    pub fn as_str(&self) -> &'static str {
        match self {
            DeliveryStatus::Acked => "acked",
            DeliveryStatus::TimedOut => "timeout",
            DeliveryStatus::Dropped => "dropped_queue_full",
            DeliveryStatus::PeerDown => "dropped_peer_down",
            DeliveryStatus::PeerLeft => "peer_left",
        }
    }
}

/// One peer's answer to one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// The peer's dial address.
    pub peer: String,
    /// The peer's name, when known.
    pub name: Option<String>,
    /// What happened.
    pub status: DeliveryStatus,
    /// The last error talking to the peer, when it did not acknowledge.
    pub last_error: Option<String>,
}

/// A delivery still in flight, or already decided at fan-out time.
#[derive(Debug)]
pub(crate) enum PendingDelivery {
    Waiting {
        state: Arc<PeerState>,
        ack_rx: oneshot::Receiver<DeliveryStatus>,
    },
    Done(DeliveryReport),
}

struct Link {
    queue_tx: mpsc::Sender<Outgoing>,
    state: Arc<PeerState>,
    cancel: CancellationToken,
    /// The peer's channel, shared with anti-entropy.
    channel: Channel,
}

/// A peer as anti-entropy sees it.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) addr: String,
    pub(crate) channel: Channel,
    pub(crate) state: Arc<PeerState>,
}

/// The set of peer links of one node.
pub(crate) struct Replicator {
    /// Open links by peer address. Locked only for short, await-free work.
    links: Mutex<BTreeMap<String, Link>>,
    /// What every link needs to build requests.
    ctx: Arc<LinkContext>,
    /// Link tasks, so that drain can wait for them.
    tracker: TaskTracker,
    /// Parent of every link's token.
    cancel: CancellationToken,
    /// Queue size of a new link.
    queue_capacity: usize,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator").finish_non_exhaustive()
    }
}

/// The `podcache.v1.NodeInfo` of a node identity.
pub(crate) fn node_info(identity: &NodeIdentity) -> pb::NodeInfo {
    pb::NodeInfo {
        node_id: identity.node_id,
        name: identity.name.clone(),
        grpc_addr: identity.grpc_addr.clone(),
        started_at_ms: identity.started_at_ms,
        pod_ip: identity.pod_ip.clone(),
        host_ip: identity.host_ip.clone().unwrap_or_default(),
    }
}

/// A lazily connecting channel to a peer: one per peer, reused for every
/// call, reconnecting by itself.
/// With `tls`, every connection is mutual TLS with the certificates in use
/// when it is (re)dialled.
pub(crate) fn peer_channel(
    addr: &str,
    config: &NodeConfig,
    tls: Option<&Arc<crate::tls::PeerTls>>,
) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad peer address {addr:?}: {e}"))?
        .connect_timeout(config.rpc_timeout.min(Duration::from_secs(2)))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    Ok(match tls {
        None => endpoint.connect_lazy(),
        Some(tls) => {
            let addr: std::net::SocketAddr = addr
                .parse()
                .map_err(|_| format!("peer address {addr:?} is not ip:port"))?;
            endpoint.connect_with_connector_lazy(crate::tls::TlsConnect {
                tls: tls.clone(),
                addr,
            })
        }
    })
}

impl Replicator {
    pub(crate) fn new(
        config: &NodeConfig,
        identity: &NodeIdentity,
        tls: Option<Arc<crate::tls::PeerTls>>,
        metrics: Arc<Metrics>,
        repair_tx: mpsc::Sender<String>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            links: Mutex::new(BTreeMap::new()),
            ctx: Arc::new(LinkContext {
                me: node_info(identity),
                tls,
                metrics,
                config: config.clone(),
                repair_tx,
            }),
            tracker: TaskTracker::new(),
            cancel,
            queue_capacity: config.peer_queue_capacity,
        }
    }

    fn links(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Link>> {
        // Every critical section is a map insert/remove or a try_send: a
        // panic cannot leave it half-done.
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens links to new peers and closes links to peers that left.
    pub(crate) fn update_peers(&self, peers: &[Peer]) {
        let mut links = self.links();
        let wanted: BTreeMap<&str, &Peer> = peers
            .iter()
            .filter(|p| p.grpc_addr != self.ctx.me.grpc_addr)
            .map(|p| (p.grpc_addr.as_str(), p))
            .collect();
        let gone: Vec<String> = links
            .keys()
            .filter(|addr| !wanted.contains_key(addr.as_str()))
            .cloned()
            .collect();
        for addr in gone {
            if let Some(link) = links.remove(&addr) {
                info!(peer = %addr, "peer left; closing its link");
                link.cancel.cancel();
                self.ctx
                    .metrics
                    .queue_depth
                    .get_or_create(&label("peer", addr.clone()))
                    .set(0);
            }
        }
        for (addr, peer) in wanted {
            if let Some(link) = links.get(addr) {
                if !link.state.same_pod(peer) {
                    // Pod IPs are reused: another pod (or a restarted one)
                    // at the same address is a new peer with a new link.
                    info!(peer = %addr, name = ?peer.name, "a different pod now holds this address");
                    if let Some(old) = links.remove(addr) {
                        old.cancel.cancel();
                    }
                } else {
                    link.state.set_discovered(peer.clone());
                    continue;
                }
            }
            if self.cancel.is_cancelled() {
                continue;
            }
            let channel = match peer_channel(addr, &self.ctx.config, self.ctx.tls.as_ref()) {
                Ok(channel) => channel,
                Err(error) => {
                    warn!(peer = %addr, %error, "cannot open a link to this peer");
                    continue;
                }
            };
            info!(peer = %addr, "peer joined; opening its link");
            let (queue_tx, queue_rx) = mpsc::channel(self.queue_capacity);
            let state = Arc::new(PeerState::new(peer.clone()));
            let cancel = self.cancel.child_token();
            self.tracker.spawn(peer_link::run(
                self.ctx.clone(),
                channel.clone(),
                state.clone(),
                queue_rx,
                cancel.clone(),
            ));
            links.insert(
                addr.to_owned(),
                Link {
                    queue_tx,
                    state,
                    cancel,
                    channel,
                },
            );
        }
    }

    /// Queues `records` to every peer known now. With `want_ack`, returns a
    /// pending delivery per peer to wait on.
    pub(crate) fn fan_out(&self, records: Arc<[Record]>, want_ack: bool) -> Vec<PendingDelivery> {
        let links = self.links();
        let mut pending = Vec::new();
        for (addr, link) in links.iter() {
            let (ack_tx, ack_rx) = if want_ack {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            let item = Outgoing {
                records: records.clone(),
                ack_tx,
            };
            let queued = if link.state.suspended() {
                Err(DeliveryStatus::PeerDown)
            } else {
                link.queue_tx.try_send(item).map_err(|err| match err {
                    mpsc::error::TrySendError::Full(_) => {
                        // The link drops its whole backlog and asks for a
                        // repair: memory stays bounded, nothing is lost for
                        // good.
                        link.state.overflowed();
                        DeliveryStatus::Dropped
                    }
                    mpsc::error::TrySendError::Closed(_) => DeliveryStatus::PeerLeft,
                })
            };
            match queued {
                Ok(()) => {
                    link.state.queued(1);
                    if let Some(ack_rx) = ack_rx {
                        pending.push(PendingDelivery::Waiting {
                            state: link.state.clone(),
                            ack_rx,
                        });
                    }
                }
                Err(status) => {
                    link.state.dropped(records.len() as u64);
                    self.ctx
                        .metrics
                        .entries_dropped
                        .get_or_create(&vec![
                            ("peer", addr.clone()),
                            ("reason", status.as_str().to_owned()),
                        ])
                        .inc_by(records.len() as u64);
                    if want_ack {
                        pending.push(PendingDelivery::Done(link.state.report(status)));
                    }
                }
            }
        }
        pending
    }

    /// Waits for every pending delivery, up to `timeout` in all.
    pub(crate) async fn wait_all(
        pending: Vec<PendingDelivery>,
        timeout: Duration,
    ) -> Vec<DeliveryReport> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut reports = Vec::with_capacity(pending.len());
        for item in pending {
            reports.push(match item {
                PendingDelivery::Done(report) => report,
                PendingDelivery::Waiting { state, ack_rx } => {
                    let status = match tokio::time::timeout_at(deadline, ack_rx).await {
                        Ok(Ok(status)) => status,
                        Ok(Err(_)) => DeliveryStatus::PeerLeft,
                        Err(_) => DeliveryStatus::TimedOut,
                    };
                    state.report(status)
                }
            });
        }
        reports
    }

    /// Every peer with its channel, for anti-entropy.
    pub(crate) fn targets(&self) -> Vec<Target> {
        self.links()
            .iter()
            .map(|(addr, link)| Target {
                addr: addr.clone(),
                channel: link.channel.clone(),
                state: link.state.clone(),
            })
            .collect()
    }

    /// The state of every link, for `/v1/cluster` and metrics.
    pub(crate) fn peer_views(&self) -> Vec<PeerView> {
        self.links().values().map(|l| l.state.view()).collect()
    }

    /// Shutdown: closes every queue, lets the links send what is queued
    /// until `deadline`, then stops them.
    pub(crate) async fn drain(&self, deadline: tokio::time::Instant) {
        let links: Vec<Link> = std::mem::take(&mut *self.links()).into_values().collect();
        let tokens: Vec<CancellationToken> = links.iter().map(|l| l.cancel.clone()).collect();
        // Dropping the senders closes the queues; each link exits once its
        // queue is empty.
        drop(links);
        self.tracker.close();
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            warn!("fan-out queues not drained within the grace period");
        }
        for token in tokens {
            token.cancel();
        }
        self.cancel.cancel();
    }
}
