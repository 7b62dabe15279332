//! A discovery backend running on its own, without a node: the test reads
//! what it publishes.

use std::sync::Arc;
use std::time::Duration;

use podcache::discovery::{Discovery, DiscoveryContext, DiscoveryState, PeerSet};
use podcache::metrics::Metrics;
use podcache::node::NodeIdentity;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The gRPC port every probed "node" claims.
pub const GRPC_PORT: u16 = 9090;

/// The peer rule the discovery tests use: pods labelled `app=hello` in
/// `default`.
pub fn hello_filter() -> podcache::discovery::pod::PodFilter {
    podcache::discovery::pod::PodFilter {
        namespace: "default".into(),
        selector: podcache::discovery::pod::parse_selector("app=hello").expect("selector"),
        name_contains: None,
        self_pod_ip: String::new(),
        grpc_port: GRPC_PORT,
    }
}

/// A discovery backend running on its own, publishing into a channel the
/// test reads; nothing dials the peers it finds.
pub struct Running {
    pub peers_rx: watch::Receiver<PeerSet>,
    pub metrics: Arc<Metrics>,
    cancel: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub fn run(discovery: impl Discovery, self_ip: &str) -> Running {
    let (peers_tx, peers_rx) = watch::channel(PeerSet::pending());
    let cancel = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let ctx = DiscoveryContext {
        identity: NodeIdentity::for_test("me", &format!("{self_ip}:{GRPC_PORT}")),
        peers_tx,
        cancel: cancel.clone(),
        metrics: metrics.clone(),
    };
    tokio::spawn(Box::new(discovery).run(ctx));
    Running {
        peers_rx,
        metrics,
        cancel,
    }
}

pub fn addrs(set: &PeerSet) -> Vec<String> {
    set.peers.iter().map(|p| p.grpc_addr.clone()).collect()
}

impl Running {
    /// Waits until the published peers are exactly `want` (addresses).
    pub async fn wait_peers(&mut self, want: &[&str], within: Duration) -> PeerSet {
        let mut want: Vec<String> = want.iter().map(|w| w.to_string()).collect();
        want.sort();
        let result = tokio::time::timeout(
            within,
            self.peers_rx.wait_for(|s| s.answered() && addrs(s) == want),
        )
        .await
        .map(|r| r.map(|set| set.clone()));
        match result {
            Ok(Ok(set)) => set,
            _ => panic!(
                "peers {:?} within {within:?}; last published: {:?}",
                want,
                *self.peers_rx.borrow()
            ),
        }
    }

    pub async fn wait_state(&mut self, stale: bool, within: Duration) {
        let ok = tokio::time::timeout(
            within,
            self.peers_rx.wait_for(|s| {
                matches!(s.state, DiscoveryState::Stale { .. }) == stale && s.answered()
            }),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        assert!(
            ok,
            "stale={stale} within {within:?}: {:?}",
            *self.peers_rx.borrow()
        );
    }
}
