//! One podcache node: the store, the gRPC and REST servers, discovery, fan-out
//! and bootstrap, wired together and shut down in order.
//!
//! Owns: start-up ([`NodeBuilder::start`]), the shared state every adapter
//! works on ([`Shared`]), the two write paths (local and remote) and the
//! shutdown order. Must not touch: wire formats (`rpc`, `api`) or the merge
//! rule (`store`).
//!
//! # How a write flows
//! REST `PUT` → [`Shared::write_local`]: the store stamps and stores it, a
//! change event goes to watchers, and the record is queued to every peer
//! link ([`crate::replication`]). A peer's `Replicate` RPC →
//! [`Shared::apply_remote`]: merged by version, published to watchers, never
//! forwarded again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{ConfigError, NodeConfig};
use crate::discovery::{Discovery, DiscoveryContext, DiscoveryState, PeerSet};
use crate::metrics::{Metrics, label};
use crate::replication::bootstrap::{BootstrapReport, run_bootstrap};
use crate::replication::{DeliveryReport, Replicator};
use crate::store::{Record, Store, StoreError};

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

    fn new(config: &NodeConfig, grpc_port: u16) -> Self {
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
}

/// Where a change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A write on this node (REST or library).
    Local,
    /// A peer's fan-out or a legacy `Sync/Set`.
    Peer,
    /// The bootstrap pull.
    Bootstrap,
}

impl Origin {
    /// Lower-case name, as shown in watch events.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Local => "local",
            Origin::Peer => "peer",
            Origin::Bootstrap => "bootstrap",
        }
    }
}

/// One change to the store, as seen by watchers.
#[derive(Debug, Clone)]
pub struct ChangeEvent {
    /// The new entry (a tombstone for deletes).
    pub record: Record,
    /// Where it came from.
    pub origin: Origin,
}

/// What a local write did, and, with `wait`, what each peer said.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    /// The stored records, in request order.
    pub records: Vec<Record>,
    /// Per peer delivery, when the write waited for acknowledgements.
    pub replication: Option<Vec<DeliveryReport>>,
}

/// Why a node could not start or a write was refused.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration cannot run.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address that failed.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The write broke a limit; nothing was changed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The REST token file is missing or invalid.
    #[error(transparent)]
    Tokens(#[from] crate::api::auth::TokenFileError),
    /// The TLS files are missing or invalid.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// State shared by the REST API, the gRPC services and the background loops
/// of one node.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Settings, fixed at start.
    pub(crate) config: NodeConfig,
    /// Who this node is.
    pub(crate) identity: NodeIdentity,
    /// The replicated state.
    pub(crate) store: Store,
    /// This node's metrics (its own registry).
    pub(crate) metrics: Arc<Metrics>,
    /// Change notifications for `/v1/watch` and embedders.
    pub(crate) events_tx: broadcast::Sender<Arc<ChangeEvent>>,
    /// True once the bootstrap pull is done; `/readyz` answers from it.
    pub(crate) ready: AtomicBool,
    /// Peer links and fan-out queues.
    pub(crate) replicator: Replicator,
    /// The latest membership published by discovery.
    pub(crate) peers_rx: watch::Receiver<PeerSet>,
    /// Name of the discovery source.
    pub(crate) discovery_name: &'static str,
    /// What the bootstrap pull did, once it is done.
    pub(crate) bootstrap: Mutex<Option<BootstrapReport>>,
    /// When this node last completed anti-entropy with a peer (or had no
    /// peer to sync with, or finished its bootstrap), Unix ms. Older than
    /// the tombstone grace means the node is stale: see [`Shared::is_stale`].
    pub(crate) last_full_sync_ms: AtomicU64,
    /// Fires when the node stops serving, first step of shutdown (ends
    /// watch streams so graceful HTTP shutdown is not held open).
    pub(crate) shutdown: CancellationToken,
    /// REST credentials, when a token file is configured.
    pub(crate) auth: Option<Arc<crate::api::auth::Auth>>,
    /// Certificates for mutual TLS between replicas, when configured.
    pub(crate) tls: Option<Arc<crate::tls::PeerTls>>,
    /// One permit per open `/v1/watch` stream.
    pub(crate) watch_permits: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// True when this node has not synced with any peer for longer than the
    /// tombstone grace: it may hold entries whose tombstones the others have
    /// purged, so it resyncs before anti-entropy trusts it.
    pub(crate) fn is_stale(&self, now_ms: u64) -> bool {
        let last = self.last_full_sync_ms.load(Ordering::Acquire);
        last != 0 && now_ms.saturating_sub(last) > self.config.tombstone_grace.as_millis() as u64
    }

    /// Records a completed sync.
    pub(crate) fn synced(&self, now_ms: u64) {
        self.last_full_sync_ms.fetch_max(now_ms, Ordering::AcqRel);
    }

    fn publish(&self, records: &[Record], origin: Origin) {
        if self.events_tx.receiver_count() == 0 {
            return;
        }
        for record in records {
            // An error only means nobody is listening right now.
            let _ = self.events_tx.send(Arc::new(ChangeEvent {
                record: record.clone(),
                origin,
            }));
        }
    }

    /// The local write path: store, publish, fan out; with `wait`, waits for
    /// every peer known now (bounded by the configured timeout).
    pub(crate) async fn write_local(&self, records: Vec<Record>, wait: bool) -> WriteOutcome {
        self.publish(&records, Origin::Local);
        let pending = self.replicator.fan_out(Arc::from(records.as_slice()), wait);
        let replication = if wait {
            Some(Replicator::wait_all(pending, self.config.wait_timeout).await)
        } else {
            None
        };
        WriteOutcome {
            records,
            replication,
        }
    }

    /// Tombstones and expired entries older than this are dropped here and
    /// not taken back from peers.
    pub(crate) fn purge_horizon(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.config.tombstone_grace.as_millis() as u64)
    }

    /// Publishes records a legacy `Sync/Set` applied.
    pub(crate) fn publish_remote(&self, records: &[Record]) {
        self.publish(records, Origin::Peer);
    }

    /// The remote write path: merge, count, publish. Never fans out again.
    pub(crate) fn apply_remote(
        &self,
        records: Vec<Record>,
        source: &'static str,
    ) -> crate::store::MergeOutcome {
        let now = unix_ms();
        let outcome = self
            .store
            .merge_with_horizon(records, now, self.purge_horizon(now));
        self.count_remote(&outcome, source);
        if source == "replicate" {
            for record in &outcome.applied {
                let written = crate::store::clock::hlc_ms(record.entry.version().hlc);
                let lag_ms = now.saturating_sub(written);
                self.metrics.replication_lag.observe(lag_ms as f64 / 1000.0);
            }
        }
        let origin = if source == "bootstrap" {
            Origin::Bootstrap
        } else {
            Origin::Peer
        };
        self.publish(&outcome.applied, origin);
        outcome
    }

    pub(crate) fn count_remote(&self, outcome: &crate::store::MergeOutcome, source: &'static str) {
        let m = &self.metrics;
        m.remote_applied
            .get_or_create(&label("source", source))
            .inc_by(outcome.applied.len() as u64);
        m.remote_stale.inc_by(outcome.stale as u64);
        for err in &outcome.rejected {
            let reason = match err {
                StoreError::ClockSkew(_) => "clock_skew",
                StoreError::Full { .. } => "capacity",
                _ => "limit",
            };
            m.remote_rejected
                .get_or_create(&label("reason", reason))
                .inc();
        }
        if let Some(first) = outcome.rejected.first() {
            warn!(
                count = outcome.rejected.len(),
                source,
                error = %first,
                "refused entries from a peer"
            );
        }
    }
}

/// Builds and starts a node.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use podcache::{NodeBuilder, NodeConfig, discovery::StaticList};
/// let config = NodeConfig::new("hello-web-1", "10.0.0.5".parse()?);
/// let node = NodeBuilder::new(config)
///     .discovery(StaticList::new(["10.0.0.6:9090", "10.0.0.7:9090"]))
///     .start()
///     .await?;
/// node.set(0, "feature.x", "on", None).await?;
/// node.shutdown().await;
/// # Ok(()) }
/// ```
pub struct NodeBuilder {
    config: NodeConfig,
    discovery: Option<Box<dyn Discovery>>,
    http_listener: Option<TcpListener>,
    grpc_listener: Option<TcpListener>,
    serve_http: bool,
}

impl NodeBuilder {
    /// A builder for a node with `config` and no peers.
    pub fn new(config: NodeConfig) -> Self {
        Self {
            config,
            discovery: None,
            http_listener: None,
            grpc_listener: None,
            serve_http: true,
        }
    }

    /// The membership source (default: a static list with no peers).
    pub fn discovery(mut self, discovery: impl Discovery) -> Self {
        self.discovery = Some(Box::new(discovery));
        self
    }

    /// The membership source, already boxed.
    pub fn boxed_discovery(mut self, discovery: Box<dyn Discovery>) -> Self {
        self.discovery = Some(discovery);
        self
    }

    /// Listeners bound by the caller, instead of binding the configured
    /// addresses.
    pub fn listeners(mut self, http: TcpListener, grpc: TcpListener) -> Self {
        self.http_listener = Some(http);
        self.grpc_listener = Some(grpc);
        self
    }

    /// Leaves the REST API out: an embedding service serves its own routes
    /// and may mount [`NodeHandle::router`] where it likes.
    pub fn without_http(mut self) -> Self {
        self.serve_http = false;
        self
    }

    /// Binds (unless given listeners), starts serving gRPC and REST at once,
    /// and starts discovery and the bootstrap pull in the background. The
    /// node reports ready once the pull is done; see
    /// [`NodeHandle::wait_ready`].
    pub async fn start(self) -> Result<NodeHandle, NodeError> {
        let config = self.config;
        config.validate()?;
        let grpc_listener = match self.grpc_listener {
            Some(l) => l,
            None => bind(config.grpc_addr).await?,
        };
        let http_listener = match (self.http_listener, self.serve_http) {
            (Some(l), true) => Some(l),
            (None, true) => Some(bind(config.http_addr).await?),
            (_, false) => None,
        };
        let grpc_local = local_addr(&grpc_listener, config.grpc_addr)?;
        let http_local = match &http_listener {
            Some(l) => Some(local_addr(l, config.http_addr)?),
            None => None,
        };
        let identity = NodeIdentity::new(&config, grpc_local.port());
        let auth = match &config.auth_token_file {
            Some(path) => Some(Arc::new(crate::api::auth::Auth::load(
                path,
                config.public_metrics,
                config.public_dashboard,
            )?)),
            None => None,
        };
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(crate::tls::PeerTls::load(files.clone())?)),
            None => {
                warn!(
                    "replication between replicas is plain text: anyone who can reach the gRPC port can read and write the cache; configure --tls-cert, --tls-key and --tls-ca for mutual TLS"
                );
                None
            }
        };
        let discovery = self
            .discovery
            .unwrap_or_else(|| Box::new(crate::discovery::StaticList::new(Vec::<String>::new())));

        let cancel = CancellationToken::new();
        // Serving stops before the rest, so it has its own token.
        let stop_serving = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Arc::new(Metrics::new());
        let (peers_tx, peers_rx) = watch::channel(PeerSet::pending());
        let (events_tx, _) = broadcast::channel(4096);
        let (repair_tx, repair_rx) = tokio::sync::mpsc::channel(64);
        let replicator = Replicator::new(
            &config,
            &identity,
            tls.clone(),
            metrics.clone(),
            repair_tx,
            cancel.child_token(),
        );
        let shared = Arc::new(Shared {
            store: Store::new(identity.node_id, config.limits.clone()),
            identity,
            metrics,
            events_tx,
            ready: AtomicBool::new(false),
            replicator,
            peers_rx: peers_rx.clone(),
            discovery_name: discovery.name(),
            bootstrap: Mutex::new(None),
            last_full_sync_ms: AtomicU64::new(0),
            shutdown: stop_serving.clone(),
            auth,
            tls,
            watch_permits: Arc::new(tokio::sync::Semaphore::new(config.max_watch_streams)),
            config,
        });
        info!(
            name = %shared.identity.name,
            node_id = format!("{:016x}", shared.identity.node_id),
            grpc = %grpc_local,
            http = ?http_local,
            advertised = %shared.identity.grpc_addr,
            discovery = shared.discovery_name,
            "node starting"
        );

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let grpc_task = tokio::spawn(crate::rpc::serve(
            shared.clone(),
            grpc_listener,
            health_service,
            stop_serving.clone(),
        ));
        let http_task = http_listener.map(|listener| {
            tokio::spawn(crate::api::serve(
                shared.clone(),
                listener,
                stop_serving.clone(),
            ))
        });

        tracker.spawn(discovery.run(DiscoveryContext {
            identity: shared.identity.clone(),
            peers_tx,
            cancel: cancel.clone(),
            metrics: shared.metrics.clone(),
        }));
        tracker.spawn(membership_loop(shared.clone(), peers_rx, cancel.clone()));
        tracker.spawn(bootstrap_then_ready(
            shared.clone(),
            health.clone(),
            cancel.clone(),
        ));
        tracker.spawn(expiry_loop(shared.clone(), cancel.clone()));
        let interval = shared.config.secrets_reload_interval;
        if let Some(auth) = shared.auth.clone() {
            tracker.spawn(crate::reload::reload_loop(
                "tokens",
                interval,
                shared.metrics.clone(),
                cancel.clone(),
                move || auth.reload_if_changed(),
            ));
        }
        if let Some(tls) = shared.tls.clone() {
            tracker.spawn(crate::reload::reload_loop(
                "tls",
                interval,
                shared.metrics.clone(),
                cancel.clone(),
                move || tls.reload_if_changed(),
            ));
        }
        tracker.spawn(crate::replication::anti_entropy::anti_entropy_loop(
            shared.clone(),
            repair_rx,
            cancel.clone(),
        ));

        Ok(NodeHandle {
            shared,
            cancel,
            stop_serving,
            tracker,
            grpc_task,
            http_task,
            health,
            grpc_addr: grpc_local,
            http_addr: http_local,
        })
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, NodeError> {
    listener
        .local_addr()
        .map_err(|source| NodeError::Bind { addr, source })
}

/// Follows discovery: opens and closes peer links as membership changes.
async fn membership_loop(
    shared: Arc<Shared>,
    mut peers_rx: watch::Receiver<PeerSet>,
    cancel: CancellationToken,
) {
    let mut last_state_kind = None;
    loop {
        {
            let set = peers_rx.borrow_and_update().clone();
            let kind = std::mem::discriminant(&set.state);
            if last_state_kind != Some(kind) {
                match &set.state {
                    DiscoveryState::Stale { error, .. } => {
                        warn!(%error, "discovery is stale; keeping the last membership")
                    }
                    DiscoveryState::Fresh { .. } => info!("discovery is answering"),
                    DiscoveryState::Pending => {}
                }
                last_state_kind = Some(kind);
            }
            if set.state != DiscoveryState::Pending {
                shared.replicator.update_peers(&set.peers);
                shared.metrics.peers.set(set.peers.len() as i64);
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = peers_rx.changed() => if changed.is_err() { return },
        }
    }
}

/// Waits for discovery's first answer, pulls the state from the oldest peer,
/// then reports ready.
async fn bootstrap_then_ready(
    shared: Arc<Shared>,
    health: tonic_health::server::HealthReporter,
    cancel: CancellationToken,
) {
    let mut peers_rx = shared.peers_rx.clone();
    let peers = tokio::select! {
        _ = cancel.cancelled() => return,
        set = peers_rx.wait_for(PeerSet::answered) => match set {
            Ok(set) => set.peers.clone(),
            Err(_) => return,
        },
    };
    let report = tokio::select! {
        _ = cancel.cancelled() => return,
        report = run_bootstrap(&shared, &peers) => report,
    };
    shared
        .metrics
        .bootstrap_seconds
        .observe(report.duration.as_secs_f64());
    shared.metrics.bootstrap_entries.inc_by(report.entries);
    *shared
        .bootstrap
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(report);
    shared.synced(unix_ms());
    shared.ready.store(true, Ordering::Release);
    shared.metrics.ready.set(1);
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    info!("node ready");
}

/// Drops entries whose expiry passed longer ago than the grace period.
async fn expiry_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let period =
        Duration::from_secs(30).min(shared.config.tombstone_grace.max(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let grace = shared.config.tombstone_grace.as_millis() as u64;
        let purged = shared.store.purge(unix_ms(), grace);
        if purged > 0 {
            tracing::debug!(purged, "dropped expired entries");
        }
    }
}

/// A running node. Dropping it does not stop the node; call
/// [`NodeHandle::shutdown`].
pub struct NodeHandle {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    stop_serving: CancellationToken,
    tracker: TaskTracker,
    grpc_task: tokio::task::JoinHandle<()>,
    http_task: Option<tokio::task::JoinHandle<()>>,
    health: tonic_health::server::HealthReporter,
    grpc_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("name", &self.shared.identity.name)
            .field("grpc_addr", &self.grpc_addr)
            .field("http_addr", &self.http_addr)
            .finish()
    }
}

impl NodeHandle {
    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound REST address, unless built [`NodeBuilder::without_http`].
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// This node's identity.
    pub fn identity(&self) -> &NodeIdentity {
        &self.shared.identity
    }

    /// True once the bootstrap pull is done.
    pub fn is_ready(&self) -> bool {
        self.shared.is_ready()
    }

    /// Waits until the node is ready.
    pub async fn wait_ready(&self) {
        while !self.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What the bootstrap pull did, once done.
    pub fn bootstrap_report(&self) -> Option<BootstrapReport> {
        self.shared
            .bootstrap
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The live value of one key on this replica.
    pub fn get(&self, ty: i32, key: &str) -> Option<String> {
        self.shared
            .store
            .get(ty, key, unix_ms())
            .and_then(|e| e.value().map(str::to_owned))
    }

    /// Sets one entry here and fans it out to every peer.
    pub async fn set(
        &self,
        ty: i32,
        key: &str,
        value: &str,
        ttl_secs: Option<u64>,
    ) -> Result<WriteOutcome, NodeError> {
        let record = self.shared.store.set(ty, key, value, ttl_secs, unix_ms())?;
        Ok(self.shared.write_local(vec![record], false).await)
    }

    /// Deletes one entry here and everywhere; `Ok(None)` when it was absent.
    pub async fn delete(&self, ty: i32, key: &str) -> Result<Option<WriteOutcome>, NodeError> {
        match self.shared.store.delete(ty, key, unix_ms())? {
            Some(record) => Ok(Some(self.shared.write_local(vec![record], false).await)),
            None => Ok(None),
        }
    }

    /// Every live entry, by namespace then key.
    pub fn snapshot(&self) -> BTreeMap<i32, BTreeMap<String, String>> {
        let now = unix_ms();
        self.shared
            .store
            .types()
            .into_iter()
            .map(|ty| {
                let entries = self
                    .shared
                    .store
                    .namespace_pairs(ty, now)
                    .collect::<BTreeMap<_, _>>();
                (ty, entries)
            })
            .filter(|(_, entries)| !entries.is_empty())
            .collect()
    }

    /// Every change from now on, local or replicated.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ChangeEvent>> {
        self.shared.events_tx.subscribe()
    }

    /// The REST API as a router, for a service that embeds the node in its
    /// own HTTP server.
    pub fn router(&self) -> axum::Router {
        crate::api::router(self.shared.clone())
    }

    /// The node's metrics in Prometheus text format.
    pub fn render_metrics(&self) -> String {
        crate::api::render_metrics(&self.shared)
    }

    /// Graceful shutdown: not ready, stop accepting, let in-flight requests
    /// finish, drain the fan-out queues, stop discovery, wait for every task
    /// (all bounded by the configured grace period).
    pub async fn shutdown(self) {
        let grace = self.shared.config.shutdown_grace;
        info!(name = %self.shared.identity.name, "shutting down");
        self.shared.ready.store(false, Ordering::Release);
        self.shared.metrics.ready.set(0);
        self.health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        // Watch streams end now so that graceful HTTP shutdown is not held
        // open by them; the loops keep running until the queues drained.
        self.stop_serving.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        let _ = tokio::time::timeout_at(deadline, self.grpc_task).await;
        if let Some(http) = self.http_task {
            let _ = tokio::time::timeout_at(deadline, http).await;
        }
        self.shared.replicator.drain(deadline).await;
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout_at(deadline + Duration::from_secs(1), self.tracker.wait())
            .await
            .is_err()
        {
            warn!("some tasks did not stop within the grace period");
        }
    }

    /// Stops at once, as a crash would: no draining, queued writes are lost.
    /// For tests that need a node to vanish.
    #[cfg(any(test, feature = "testsuite"))]
    pub async fn kill(self) {
        self.shared.ready.store(false, Ordering::Release);
        self.stop_serving.cancel();
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.grpc_task).await;
        if let Some(http) = self.http_task {
            let _ = tokio::time::timeout(Duration::from_secs(2), http).await;
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}
