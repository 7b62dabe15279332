//! A fixed (but editable) list of peer addresses: `--discovery static`.
//!
//! For local development, the demo and tests. The list lives in a shared
//! [`StaticPeers`] handle; every node built from it sees edits at once,
//! which is how tests add, remove and partition nodes.

use tokio::sync::watch;

use super::{Discovery, DiscoveryContext, Peer, PeerSet};

/// An editable list of peer addresses shared by any number of nodes.
#[derive(Debug, Clone)]
pub struct StaticPeers {
    /// The current list; each [`StaticList`] follows it.
    addrs_tx: watch::Sender<Vec<String>>,
}

impl StaticPeers {
    /// A list holding `addrs` (`ip:port` each).
    pub fn new(addrs: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let (addrs_tx, _) = watch::channel(addrs.into_iter().map(Into::into).collect());
        Self { addrs_tx }
    }

    /// Replaces the whole list.
    pub fn set(&self, addrs: impl IntoIterator<Item = impl Into<String>>) {
        self.addrs_tx
            .send_replace(addrs.into_iter().map(Into::into).collect());
    }

    /// Adds one address if absent.
    pub fn add(&self, addr: impl Into<String>) {
        let addr = addr.into();
        self.addrs_tx.send_if_modified(|list| {
            if list.contains(&addr) {
                return false;
            }
            list.push(addr);
            true
        });
    }

    /// Removes one address.
    pub fn remove(&self, addr: &str) {
        self.addrs_tx.send_if_modified(|list| {
            let before = list.len();
            list.retain(|a| a != addr);
            list.len() != before
        });
    }

    /// The current list.
    pub fn get(&self) -> Vec<String> {
        self.addrs_tx.borrow().clone()
    }

    /// A discovery source that follows this list.
    pub fn discovery(&self) -> StaticList {
        StaticList {
            addrs_rx: self.addrs_tx.subscribe(),
        }
    }
}

/// Discovery from a [`StaticPeers`] list.
#[derive(Debug)]
pub struct StaticList {
    /// The shared list this source follows.
    addrs_rx: watch::Receiver<Vec<String>>,
}

impl StaticList {
    /// A source with a fixed list of `ip:port` addresses.
    pub fn new(addrs: impl IntoIterator<Item = impl Into<String>>) -> Self {
        StaticPeers::new(addrs).discovery()
    }
}

#[async_trait::async_trait]
impl Discovery for StaticList {
    fn name(&self) -> &'static str {
        "static"
    }

    async fn run(mut self: Box<Self>, ctx: DiscoveryContext) {
        loop {
            let peers = self
                .addrs_rx
                .borrow_and_update()
                .iter()
                .map(Peer::at)
                .collect();
            ctx.peers_tx
                .send_replace(PeerSet::fresh(peers, &ctx.identity.grpc_addr));
            tokio::select! {
                _ = ctx.cancel.cancelled() => return,
                changed = self.addrs_rx.changed() => {
                    if changed.is_err() {
                        // Every StaticPeers handle is gone: the list can no
                        // longer change, so the last set stays as it is.
                        ctx.cancel.cancelled().await;
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::DiscoveryState;
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn publishes_the_list_without_itself_and_follows_edits() {
        let list = StaticPeers::new(["127.0.0.3:1", "127.0.0.2:1", "127.0.0.9:1"]);
        let (peers_tx, mut peers_rx) = watch::channel(PeerSet::pending());
        let cancel = CancellationToken::new();
        let ctx = DiscoveryContext {
            identity: crate::identity::NodeIdentity::for_test("me", "127.0.0.9:1"),
            peers_tx,
            cancel: cancel.clone(),
            metrics: Default::default(),
        };
        let task = tokio::spawn(Box::new(list.discovery()).run(ctx));
        let set = peers_rx
            .wait_for(|s| s.state != DiscoveryState::Pending)
            .await
            .expect("published")
            .clone();
        let addrs: Vec<_> = set.peers.iter().map(|p| p.grpc_addr.as_str()).collect();
        assert_eq!(addrs, ["127.0.0.2:1", "127.0.0.3:1"]);
        list.remove("127.0.0.2:1");
        list.add("127.0.0.4:1");
        let set = peers_rx
            .wait_for(|s| s.peers.len() == 2 && s.peers[1].grpc_addr == "127.0.0.4:1")
            .await
            .expect("edit published")
            .clone();
        assert_eq!(set.peers[0].grpc_addr, "127.0.0.3:1");
        cancel.cancel();
        task.await.expect("stops on cancel");
    }
}
