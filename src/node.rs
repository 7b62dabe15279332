//! One podcache node, wired together: the replica, the gRPC and REST
//! servers, discovery, the peer links, bootstrap and anti-entropy, started
//! in order and shut down in order.
//!
//! Owns: start-up ([`NodeBuilder::start`]), the background loops that only
//! connect parts (membership, bootstrap then ready, expiry, secret
//! reloads), every task's owner, and the shutdown order. Must not touch:
//! wire formats (`rpc`, `api`), the merge rule (`store`), the write path
//! (`replica`); it hands each adapter what it uses.
//!
//! # How a write flows
//! REST `PUT`, `Sync/Set` or [`NodeHandle::set`] → [`Replica::write`]: the
//! store stamps and stores it, it becomes pending for every peer in the
//! change index, watchers see it, and each peer's link sends it with the
//! next epoch. A peer's `ReplicateStream` → `Replica::apply_remote`:
//! merged by version, published to watchers, never forwarded again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use crate::identity::{NodeIdentity, unix_ms};
pub use crate::replica::{
    BootstrapReport, Change, ChangeEvent, DeliveryReport, DeliveryStatus, Origin, WriteOutcome,
};

use crate::api::Api;
use crate::config::{ConfigError, NodeConfig};
use crate::discovery::{Discovery, DiscoveryContext, DiscoveryState, PeerSet};
use crate::metrics::Metrics;
use crate::replica::Replica;
use crate::replication::Replicator;
use crate::replication::bootstrap::get_state;
use crate::rpc::RpcContext;
use crate::store::StoreError;

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
    /// The data directory cannot be used (in use, another format, damaged).
    #[error(transparent)]
    DataDir(#[from] crate::durability::DurabilityError),
    /// A write was refused by the data directory.
    #[error(transparent)]
    Write(#[from] crate::replica::WriteError),
    /// A JSON Schema was refused (not valid, too large).
    #[error(transparent)]
    Schema(#[from] crate::replica::schema::SchemaError),
}

impl From<crate::replica::schema::SchemaWriteError> for NodeError {
    fn from(err: crate::replica::schema::SchemaWriteError) -> Self {
        match err {
            crate::replica::schema::SchemaWriteError::Schema(e) => e.into(),
            crate::replica::schema::SchemaWriteError::Write(e) => e.into(),
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
        // First, so that a directory in use or of another format is the one
        // line a refused start prints.
        let opened = match &config.data_dir {
            Some(dir) => {
                let started = tokio::time::Instant::now();
                let (data, recovered) =
                    crate::durability::DataDir::open(dir, config.fsync, config.compact_log_bytes)?;
                Some((Arc::new(data), recovered, started))
            }
            None => None,
        };
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
        let http_tls = match &config.http_tls {
            Some(files) => Some(Arc::new(crate::http_tls::HttpTls::load(files.clone())?)),
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
        let discovery_name = discovery.name();

        let cancel = CancellationToken::new();
        // Serving stops before the rest, so it has its own token.
        let stop_serving = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Arc::new(Metrics::new());
        let (peers_tx, peers_rx) = watch::channel(PeerSet::pending());
        let (repair_tx, repair_rx) = tokio::sync::mpsc::channel(64);
        let watch_streams = config.max_watch_streams;
        let data = opened.as_ref().map(|(data, _, _)| data.clone());
        let replica = Arc::new(Replica::new(config, identity, metrics, data.clone()));
        if let Some((data, recovered, started)) = opened {
            let (files, bytes) = (recovered.files, recovered.bytes);
            let kept = replica.load(recovered);
            info!(
                dir = %data.path().display(),
                entries = kept,
                files,
                bytes,
                ms = started.elapsed().as_millis() as u64,
                fsync = ?data.policy(),
                "state loaded from the data directory"
            );
        }
        let replicator = Arc::new(Replicator::new(
            replica.clone(),
            tls.clone(),
            repair_tx,
            cancel.child_token(),
        ));
        let decider = crate::replication::decider::Decider::start(
            replica.clone(),
            replicator.clone(),
            discovery.election(),
            replica.ready_watch(),
            &tracker,
            cancel.child_token(),
        );
        info!(
            name = %replica.identity.name,
            node_id = format!("{:016x}", replica.identity.node_id),
            grpc = %grpc_local,
            http = ?http_local,
            advertised = %replica.identity.grpc_addr,
            discovery = discovery_name,
            "node starting"
        );
        let api = Arc::new(Api {
            replica: replica.clone(),
            replicator: replicator.clone(),
            decider: decider.clone(),
            peers_rx: peers_rx.clone(),
            discovery_name,
            auth: auth.clone(),
            http_tls: http_tls.clone(),
            watch_permits: Arc::new(tokio::sync::Semaphore::new(watch_streams)),
            stop: stop_serving.clone(),
        });

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let serving = TaskTracker::new();
        let rpc = RpcContext {
            replica: replica.clone(),
            decider,
            tls: tls.clone(),
            stop: stop_serving.clone(),
            tasks: serving.clone(),
            snapshots: Arc::new(tokio::sync::Semaphore::new(
                replica.config.max_concurrent_snapshots,
            )),
        };
        serving.spawn(crate::rpc::serve(rpc, grpc_listener, health_service));
        if let Some(listener) = http_listener {
            serving.spawn(crate::api::serve(api.clone(), listener, serving.clone()));
        }
        serving.close();

        tracker.spawn(discovery.run(DiscoveryContext {
            identity: replica.identity.clone(),
            peers_tx,
            cancel: cancel.clone(),
            metrics: replica.metrics.clone(),
        }));
        tracker.spawn(membership_loop(
            replica.clone(),
            replicator.clone(),
            peers_rx.clone(),
            cancel.clone(),
        ));
        tracker.spawn(bootstrap_then_ready(
            replica.clone(),
            replicator.clone(),
            peers_rx,
            health.clone(),
            cancel.clone(),
        ));
        if let Some(data) = data {
            let (for_snapshot, for_sync) = (replica.clone(), replica.clone());
            tracker.spawn(crate::durability::durability_loop(
                data,
                replica.metrics.clone(),
                move || for_snapshot.store.snapshot_with_history(),
                move || for_sync.last_full_sync_ms(),
                cancel.clone(),
            ));
        }
        tracker.spawn(expiry_loop(replica.clone(), cancel.clone()));
        let interval = replica.config.secrets_reload_interval;
        if let Some(auth) = auth {
            tracker.spawn(crate::reload::reload_loop(
                "tokens",
                interval,
                replica.metrics.clone(),
                cancel.clone(),
                move || auth.reload_if_changed(),
            ));
        }
        if let Some(http_tls) = http_tls {
            tracker.spawn(crate::reload::reload_loop(
                "http_tls",
                interval,
                replica.metrics.clone(),
                cancel.clone(),
                move || http_tls.reload_if_changed(),
            ));
        }
        if let Some(tls) = tls {
            tracker.spawn(crate::reload::reload_loop(
                "tls",
                interval,
                replica.metrics.clone(),
                cancel.clone(),
                move || tls.reload_if_changed(),
            ));
        }
        let peers = replicator.clone();
        tracker.spawn(crate::replication::anti_entropy::anti_entropy_loop(
            replica.clone(),
            move || peers.targets(),
            repair_rx,
            cancel.clone(),
        ));

        Ok(NodeHandle {
            replica,
            replicator,
            api,
            cancel,
            stop_serving,
            tracker,
            serving,
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
    replica: Arc<Replica>,
    replicator: Arc<Replicator>,
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
                replicator.update_peers(&set.peers);
                let selves = replicator.selves();
                let peers = set.peers.iter().filter(|p| !selves.contains(&p.grpc_addr));
                replica.metrics.peers.set(peers.count() as i64);
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = peers_rx.changed() => if changed.is_err() { return },
            // A peer address turned out to be this node: close its link.
            _ = replicator.selves().changed() => {}
        }
    }
}

/// Waits for discovery's first answer, gets the state (pulled whole from
/// the oldest peer, or, for a node that loaded its own from the data
/// directory, only what differs from every peer), then reports ready.
async fn bootstrap_then_ready(
    replica: Arc<Replica>,
    replicator: Arc<Replicator>,
    mut peers_rx: watch::Receiver<PeerSet>,
    health: tonic_health::server::HealthReporter,
    cancel: CancellationToken,
) {
    let peers = tokio::select! {
        _ = cancel.cancelled() => return,
        set = peers_rx.wait_for(PeerSet::answered) => match set {
            Ok(set) => set.peers.clone(),
            Err(_) => return,
        },
    };
    let targets = || {
        // Anti-entropy's peers are the links: make them now.
        replicator.update_peers(&peers);
        replicator.targets()
    };
    let connect = |addr: &str| replicator.connect(addr);
    tokio::select! {
        _ = cancel.cancelled() => return,
        () = get_state(&replica, &peers, replicator.selves(), targets, connect) => {}
    }
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    info!("node ready");
}

/// Drops entries whose expiry passed longer ago than the grace period.
async fn expiry_loop(replica: Arc<Replica>, cancel: CancellationToken) {
    let grace = replica.config.tombstone_grace;
    let period = Duration::from_secs(30).min(grace.max(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let purged = replica.purge_expired();
        if purged > 0 {
            tracing::debug!(purged, "dropped expired entries");
        }
    }
}

/// What [`NodeHandle::subscribe_with_snapshot`] returns.
#[derive(Debug)]
pub struct Subscription {
    /// The namespace's live entries when the subscription began.
    pub entries: Vec<crate::store::Record>,
    /// The last change number the entries include.
    pub upto: u64,
    /// Every change from the subscription on ([`ChangeEvent::seq`] tells
    /// which the entries already hold).
    pub changes: broadcast::Receiver<Arc<ChangeEvent>>,
}

/// A running node. Dropping it does not stop the node; call
/// [`NodeHandle::shutdown`].
pub struct NodeHandle {
    replica: Arc<Replica>,
    replicator: Arc<Replicator>,
    api: Arc<Api>,
    cancel: CancellationToken,
    stop_serving: CancellationToken,
    /// Background loops: discovery, membership, bootstrap, anti-entropy...
    tracker: TaskTracker,
    /// The servers and the tasks they spawn.
    serving: TaskTracker,
    health: tonic_health::server::HealthReporter,
    grpc_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("name", &self.replica.identity.name)
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
        &self.replica.identity
    }

    /// True once the bootstrap pull is done.
    pub fn is_ready(&self) -> bool {
        self.replica.is_ready()
    }

    /// Waits until the node is ready.
    pub async fn wait_ready(&self) {
        while !self.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What the bootstrap pull did, once done.
    pub fn bootstrap_report(&self) -> Option<BootstrapReport> {
        self.replica.bootstrap_report()
    }

    /// The live value of one key on this replica.
    pub fn get(&self, ty: i32, key: &str) -> Option<String> {
        self.replica
            .store
            .get(ty, key, unix_ms())
            .and_then(|e| e.value().map(str::to_owned))
    }

    /// Any local change through the one write path; with `wait`, answers
    /// once every peer acknowledged it (or the wait timed out), saying per
    /// peer what happened.
    pub async fn write(&self, change: Change<'_>, wait: bool) -> Result<WriteOutcome, NodeError> {
        Ok(self.replica.write(change, wait).await?)
    }

    /// Sets one entry here and fans it out to every peer.
    pub async fn set(
        &self,
        ty: i32,
        key: &str,
        value: &str,
        ttl_secs: Option<u64>,
    ) -> Result<WriteOutcome, NodeError> {
        let change = Change::Set {
            ty,
            key,
            value,
            ttl_secs,
        };
        self.write(change, false).await
    }

    /// Deletes one entry here and everywhere; `Ok(None)` when it was absent.
    pub async fn delete(&self, ty: i32, key: &str) -> Result<Option<WriteOutcome>, NodeError> {
        let outcome = self.write(Change::Delete { ty, key }, false).await?;
        Ok((!outcome.records.is_empty()).then_some(outcome))
    }

    /// Sets (`Some`) or deletes (`None`) type `ty`'s JSON Schema (draft
    /// 2020-12), as `PUT`/`DELETE /v1/schema/{type}` do: from then on
    /// every write of the type on this node, and on every replica once it
    /// arrived, must be JSON valid under it.
    pub async fn set_schema(
        &self,
        ty: i32,
        schema: Option<&str>,
    ) -> Result<WriteOutcome, NodeError> {
        Ok(self
            .replica
            .write_schema(ty, schema, false, crate::replica::Author::LIBRARY)
            .await?)
    }

    /// Type `ty`'s JSON Schema as this replica holds it, if any.
    pub fn schema(&self, ty: i32) -> Option<String> {
        self.get(crate::replica::SCHEMA_TYPE, &ty.to_string())
    }

    /// Every live entry, by namespace then key (the schemas' reserved
    /// type left out: see [`NodeHandle::schema`]).
    pub fn snapshot(&self) -> BTreeMap<i32, BTreeMap<String, String>> {
        let now = unix_ms();
        let store = &self.replica.store;
        store
            .types()
            .into_iter()
            .filter(|ty| *ty != crate::replica::SCHEMA_TYPE)
            .map(|ty| {
                (
                    ty,
                    store.namespace_pairs(ty, now).collect::<BTreeMap<_, _>>(),
                )
            })
            .filter(|(_, entries)| !entries.is_empty())
            .collect()
    }

    /// Every change from now on, local or replicated.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ChangeEvent>> {
        self.replica.subscribe()
    }

    /// List-then-watch with no gap: the live entries of namespace `ty` now,
    /// and every change after them. Changes numbered at or below
    /// [`Subscription::upto`] are already in the entries (skip them).
    pub fn subscribe_with_snapshot(&self, ty: i32) -> Subscription {
        let changes = self.replica.subscribe();
        let upto = self.replica.events.last_seq();
        let entries = self
            .replica
            .store
            .namespace(ty, unix_ms())
            .into_iter()
            .map(|entry| crate::store::Record { ty, entry })
            .collect();
        Subscription {
            entries,
            upto,
            changes,
        }
    }

    /// The REST API as a router, for a service that embeds the node in its
    /// own HTTP server.
    pub fn router(&self) -> axum::Router {
        crate::api::router(self.api.clone())
    }

    /// The node's metrics in Prometheus text format.
    pub fn render_metrics(&self) -> String {
        self.replica.render_metrics(self.replicator.backlogs())
    }

    /// Graceful shutdown, in order: not ready (and serving on for
    /// `shutdown_delay`), stop accepting, let
    /// in-flight requests finish, send what is pending to every peer, stop
    /// discovery and the loops, wait for every task (all bounded by the
    /// configured grace period).
    pub async fn shutdown(self) {
        let grace = self.replica.config.shutdown_grace;
        info!(name = %self.replica.identity.name, "shutting down");
        self.replica.set_ready(false);
        self.health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        // Not ready, but still serving: load balancers and Service
        // endpoints take a moment to notice, and clients sent here meanwhile
        // are answered rather than refused.
        let delay = self.replica.config.shutdown_delay;
        if !delay.is_zero() {
            info!(delay = ?delay, "not ready; serving on while endpoints update");
            tokio::time::sleep(delay).await;
        }
        // Watch streams end now so that graceful HTTP shutdown is not held
        // open by them; the loops keep running until fan-out drained.
        self.stop_serving.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        if tokio::time::timeout_at(deadline, self.serving.wait())
            .await
            .is_err()
        {
            warn!("requests still in flight at the end of the grace period");
        }
        self.replicator.drain(deadline).await;
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout_at(deadline + Duration::from_secs(1), self.tracker.wait())
            .await
            .is_err()
        {
            warn!("some tasks did not stop within the grace period");
        }
    }

    /// Stops at once, as a crash would: no draining, pending writes are
    /// lost. For tests that need a node to vanish.
    #[cfg(any(test, feature = "testsuite"))]
    pub async fn kill(self) {
        self.replica.set_ready(false);
        self.stop_serving.cancel();
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.serving.wait()).await;
        self.replicator.drain(tokio::time::Instant::now()).await;
        self.tracker.close();
        self.tracker.wait().await;
    }
}
