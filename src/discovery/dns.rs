//! `--discovery dns`: the address records of a headless Service (one per
//! pod), resolved again every few seconds. Needs no API access and no etcd;
//! a peer's start time is learned from the peer itself (`Hello`). Give the
//! Service `publishNotReadyAddresses: true` so starting replicas are found.

use std::collections::BTreeSet;
use std::time::Duration;

use super::pod::grpc_port;
use super::pod_table::Publisher;
use super::{Discovery, DiscoveryContext, Peer};

/// Discovery through DNS.
#[derive(Debug, Clone)]
pub struct DnsDiscovery {
    /// The name to resolve, e.g. `podcache-peers` or
    /// `podcache-peers.default.svc.cluster.local`.
    pub name: String,
    /// How often to resolve it again.
    pub interval: Duration,
}

#[async_trait::async_trait]
impl Discovery for DnsDiscovery {
    fn name(&self) -> &'static str {
        "dns"
    }

    async fn run(self: Box<Self>, ctx: DiscoveryContext) {
        let port = grpc_port(&ctx.identity.grpc_addr);
        let mut publisher = Publisher::new();
        loop {
            match tokio::net::lookup_host((self.name.as_str(), port)).await {
                Ok(addrs) => {
                    let ips: BTreeSet<_> = addrs
                        .map(|a| a.ip())
                        .filter(|ip| ip.to_string() != ctx.identity.pod_ip)
                        .collect();
                    let peers = ips
                        .into_iter()
                        .map(|ip| Peer::at(std::net::SocketAddr::new(ip, port).to_string()))
                        .collect();
                    publisher.fresh(peers, &ctx);
                }
                Err(err) => publisher.stale(format!("resolving {}: {err}", self.name), &ctx),
            }
            tokio::select! {
                _ = ctx.cancel.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::PeerSet;
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    async fn discover(name: &str) -> PeerSet {
        let (peers_tx, mut peers_rx) = watch::channel(PeerSet::pending());
        let cancel = CancellationToken::new();
        let ctx = DiscoveryContext {
            identity: crate::identity::NodeIdentity::for_test("me", "10.9.9.9:7000"),
            peers_tx,
            cancel: cancel.clone(),
            metrics: Default::default(),
        };
        let source = DnsDiscovery {
            name: name.into(),
            interval: Duration::from_millis(50),
        };
        tokio::spawn(Box::new(source).run(ctx));
        let set = tokio::time::timeout(
            Duration::from_secs(10),
            peers_rx.wait_for(|s| s.state != crate::discovery::DiscoveryState::Pending),
        )
        .await
        .expect("answered")
        .expect("open")
        .clone();
        cancel.cancel();
        set
    }

    #[tokio::test]
    async fn resolves_every_record_of_the_name_on_the_grpc_port() {
        let set = discover("localhost").await;
        assert!(set.answered());
        let addrs: Vec<_> = set.peers.iter().map(|p| p.grpc_addr.as_str()).collect();
        assert!(addrs.contains(&"127.0.0.1:7000"), "{addrs:?}");
    }

    #[tokio::test]
    async fn an_unresolvable_name_is_reported_stale() {
        let set = discover("no-such-host.invalid").await;
        assert!(
            matches!(set.state, crate::discovery::DiscoveryState::Stale { .. }),
            "{set:?}"
        );
        assert!(!set.answered());
    }
}
