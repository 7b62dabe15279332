//! What the two etcd backends share: the table of pods read from etcd, turned
//! into a peer set, and the publisher that reports fresh or stale membership
//! (logging once per state change).

use std::collections::{BTreeMap, HashSet};
use std::time::SystemTime;

use tracing::{info, warn};

use super::pod::{DecodeError, PodFilter, decode_pod};
use super::{DiscoveryContext, DiscoveryState, Peer, PeerSet};
use crate::metrics::label;

/// Pods by etcd key, decoded, and the filter that makes peers of them.
pub(super) struct PodTable {
    filter: PodFilter,
    /// Peers by etcd key (only pods that are peers are kept).
    peers: BTreeMap<String, Peer>,
    /// Keys already warned about, so a bad value is reported once, not on
    /// every re-list.
    warned: HashSet<(String, String)>,
}

impl PodTable {
    pub(super) fn new(filter: PodFilter) -> Self {
        Self {
            filter,
            peers: BTreeMap::new(),
            warned: HashSet::new(),
        }
    }

    /// Replaces the whole table with a fresh listing.
    pub(super) fn reset<'a>(
        &mut self,
        listing: impl IntoIterator<Item = (String, &'a [u8])>,
        ctx: &DiscoveryContext,
    ) {
        self.peers.clear();
        for (key, value) in listing {
            self.upsert(key, value, ctx);
        }
    }

    /// A pod was written: (re)decode it. True when membership changed.
    pub(super) fn upsert(&mut self, key: String, value: &[u8], ctx: &DiscoveryContext) -> bool {
        let peer = match decode_pod(value) {
            Ok(pod) => self.filter.peer(&pod),
            Err(err) => {
                self.skip(&key, &err, ctx);
                None
            }
        };
        match peer {
            Some(peer) => self.peers.insert(key, peer.clone()) != Some(peer),
            None => self.peers.remove(&key).is_some(),
        }
    }

    /// A pod was deleted. True when membership changed.
    pub(super) fn remove(&mut self, key: &str) -> bool {
        self.peers.remove(key).is_some()
    }

    /// A whole directory was deleted (etcd v2). True when membership changed.
    pub(super) fn remove_dir(&mut self, dir: &str) -> bool {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        let before = self.peers.len();
        self.peers.retain(|key, _| !key.starts_with(&prefix));
        before != self.peers.len()
    }

    fn skip(&mut self, key: &str, err: &DecodeError, ctx: &DiscoveryContext) {
        let reason = match err {
            DecodeError::Encrypted { .. } => "encrypted",
            DecodeError::NotAPod(_) => "not_a_pod",
            _ => "undecodable",
        };
        ctx.metrics
            .discovery_skipped
            .get_or_create(&label("reason", reason))
            .inc();
        if self.warned.insert((key.to_owned(), err.to_string())) {
            match err {
                DecodeError::Encrypted { provider } => {
                    warn!(key, provider = %provider, "skipping a pod encrypted at rest: podcache cannot read it")
                }
                _ => warn!(key, error = %err, "skipping a value that is not a readable pod"),
            }
        }
    }

    /// The peers now, as discovery publishes them.
    pub(super) fn peers(&self) -> Vec<Peer> {
        self.peers.values().cloned().collect()
    }
}

/// Publishes peer sets, tracking the last good read for stale reports.
pub(super) struct Publisher {
    last_good: Option<SystemTime>,
    stale: bool,
}

impl Publisher {
    pub(super) fn new() -> Self {
        Self {
            last_good: None,
            stale: false,
        }
    }

    /// The source answered: publishes `peers` as fresh.
    pub(super) fn fresh(&mut self, peers: Vec<Peer>, ctx: &DiscoveryContext) {
        if self.stale {
            info!("discovery source is answering again");
            self.stale = false;
        }
        ctx.metrics.discovery_stale.set(0);
        let set = PeerSet::fresh(peers, &ctx.identity.grpc_addr);
        if let DiscoveryState::Fresh { at } = set.state {
            self.last_good = Some(at);
        }
        ctx.peers_tx.send_if_modified(|current| {
            let changed = current.peers != set.peers;
            if changed && current.state != DiscoveryState::Pending {
                ctx.metrics.discovery_events.inc();
                info!(peers = set.peers.len(), "membership changed");
            }
            // The state (time of the last good read) always updates, but
            // readers are woken only when the membership or kind of state
            // changed.
            let woke = changed || !matches!(current.state, DiscoveryState::Fresh { .. });
            *current = set;
            woke
        });
    }

    /// The source failed: keeps the last peers, marks them stale.
    pub(super) fn stale(&mut self, error: String, ctx: &DiscoveryContext) {
        ctx.metrics.discovery_errors.inc();
        ctx.metrics.discovery_stale.set(1);
        if !self.stale {
            warn!(%error, "discovery source unreachable; keeping the last membership");
            self.stale = true;
        }
        let last_good = self.last_good;
        ctx.peers_tx.send_if_modified(|current| {
            let was_stale = matches!(current.state, DiscoveryState::Stale { .. });
            current.state = DiscoveryState::Stale { last_good, error };
            // Pending stays pending in spirit (the node is not ready until
            // one good read), but is reported as stale so it is visible.
            !was_stale
        });
    }
}
