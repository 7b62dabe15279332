//! One peer link: a bounded queue of writes drained by one task that sends
//! them in batches over one long-lived channel — as requests on one open
//! `ReplicateStream` call, else as `Replicate` calls (a podcache from before
//! the stream), else as `Sync/Set` (a legacy peer) — retries with backoff
//! while the peer is known, and keeps the peer's status for `/v1/cluster`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::{DeliveryReport, DeliveryStatus};
use crate::config::NodeConfig;
use crate::discovery::Peer;
use crate::metrics::{Metrics, label};
use crate::proto::hellorpc::{SyncData, SyncRequest, sync_client::SyncClient};
use crate::proto::podcache::{self as pb, HelloRequest, replica_client::ReplicaClient};
use crate::proto::{ReplicateBatch, wire_size};
use crate::store::Record;

/// What every link needs, shared.
pub(crate) struct LinkContext {
    /// This node, named in every request.
    pub(crate) me: pb::NodeInfo,
    /// Mutual TLS for every peer channel, when configured.
    pub(crate) tls: Option<Arc<crate::tls::PeerTls>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) config: NodeConfig,
    /// Asks anti-entropy for a repair of a peer (after a queue overflow).
    pub(crate) repair_tx: mpsc::Sender<String>,
}

/// One write waiting for one peer.
#[derive(Debug)]
pub(crate) struct Outgoing {
    /// The records of the write (shared by every peer's queue).
    pub(crate) records: Arc<[Record]>,
    /// Answered once the peer acknowledged, for `?wait=all`.
    pub(crate) ack_tx: Option<oneshot::Sender<DeliveryStatus>>,
}

/// Whether the peer answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reachability {
    Unknown,
    Up,
    Down,
}

#[derive(Debug)]
struct Status {
    discovered: Peer,
    hello: Option<pb::NodeInfo>,
    peer_ready: Option<bool>,
    /// The peer says it is stale (cut off past the tombstone grace).
    peer_stale: bool,
    reachability: Reachability,
    /// The peer answers UNIMPLEMENTED to podcache.v1: a node built from the
    /// original proto alone. Writes go to it as `Sync/Set`.
    legacy: bool,
    last_ok: Option<SystemTime>,
    last_error: Option<String>,
    sent_batches: u64,
    failed_attempts: u64,
    dropped_entries: u64,
}

/// A peer's status, shared between its link task and readers.
#[derive(Debug)]
pub(crate) struct PeerState {
    status: Mutex<Status>,
    /// Writes in the queue right now.
    queued: AtomicU64,
    /// Set when a write found the queue full: the link then drops its whole
    /// backlog and asks for a repair.
    overflow: std::sync::atomic::AtomicBool,
    /// Set when the queue overflowed while the peer was down: writes are
    /// then not queued for it at all (each one would only be dropped with
    /// the next backlog) until it answers again, when anti-entropy is asked
    /// to repair it.
    suspended: std::sync::atomic::AtomicBool,
    /// Anti-entropy rounds in a row that left busy buckets unrepaired (see
    /// `anti_entropy::exchange`).
    pub(crate) busy_rounds: std::sync::atomic::AtomicU32,
}

/// A peer's replication state as shown in `/v1/cluster`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerView {
    /// The dial address.
    pub grpc_addr: String,
    /// Pod name: the peer's own answer, else discovery's.
    pub name: Option<String>,
    /// Pod IP, as the peer reports it.
    pub pod_ip: Option<String>,
    /// Host IP, from the peer or discovery.
    pub host_ip: Option<String>,
    /// Start time (Unix ms): discovery's, else the peer's own answer.
    pub started_at_ms: Option<i64>,
    /// The peer's node id (hex), once it answered.
    pub node_id: Option<String>,
    /// `up`, `down` or `unknown`.
    pub status: &'static str,
    /// Whether the peer has finished its own bootstrap.
    pub ready: Option<bool>,
    /// True for a peer that speaks only the original `hellorpc.Sync`.
    pub legacy: bool,
    /// Writes waiting in the queue.
    pub queue_depth: u64,
    /// True while writes are not queued for this peer: it was down when its
    /// queue overflowed. Cleared (and a repair asked for) when it answers.
    pub suspended: bool,
    /// Batches delivered.
    pub sent_batches: u64,
    /// Failed attempts (each retried).
    pub failed_attempts: u64,
    /// Entries dropped (queue full, or not expressible to a legacy peer).
    pub dropped_entries: u64,
    /// Last successful exchange, Unix ms.
    pub last_ok_ms: Option<u64>,
    /// Last error, if the last exchange failed.
    pub last_error: Option<String>,
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl PeerState {
    pub(crate) fn new(discovered: Peer) -> Self {
        Self {
            status: Mutex::new(Status {
                discovered,
                hello: None,
                peer_ready: None,
                peer_stale: false,
                reachability: Reachability::Unknown,
                legacy: false,
                last_ok: None,
                last_error: None,
                sent_batches: 0,
                failed_attempts: 0,
                dropped_entries: 0,
            }),
            queued: AtomicU64::new(0),
            overflow: std::sync::atomic::AtomicBool::new(false),
            suspended: std::sync::atomic::AtomicBool::new(false),
            busy_rounds: std::sync::atomic::AtomicU32::new(0),
        }
    }

    pub(crate) fn overflowed(&self) {
        self.overflow.store(true, Ordering::Release);
    }

    /// True while writes are not queued for this peer (see `suspended`).
    pub(crate) fn suspended(&self) -> bool {
        self.suspended.load(Ordering::Acquire)
    }

    /// Records a peer's hello answer (from the link or anti-entropy).
    pub(crate) fn record_hello(&self, node: Option<pb::NodeInfo>, ready: bool, stale: bool) {
        let mut s = self.status();
        s.hello = node;
        s.peer_ready = Some(ready);
        s.peer_stale = stale;
        s.legacy = false;
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        // Only plain field updates happen under this lock.
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True while the peer's identity is unknown (and it is not legacy).
    fn needs_hello(&self) -> bool {
        let s = self.status();
        s.hello.is_none() && !s.legacy
    }

    /// False when discovery names a different pod (or incarnation) at this
    /// address than before; unknown names and times never differ.
    pub(crate) fn same_pod(&self, peer: &Peer) -> bool {
        let s = self.status();
        let old = &s.discovered;
        fn differs<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
            a.is_some() && b.is_some() && a != b
        }
        !(differs(&old.name, &peer.name) || differs(&old.started_at_ms, &peer.started_at_ms))
    }

    pub(crate) fn set_discovered(&self, peer: Peer) {
        self.status().discovered = peer;
    }

    pub(crate) fn queued(&self, n: u64) {
        self.queued.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn dropped(&self, entries: u64) {
        self.status().dropped_entries += entries;
    }

    pub(crate) fn report(&self, status: DeliveryStatus) -> DeliveryReport {
        let s = self.status();
        DeliveryReport {
            peer: s.discovered.grpc_addr.clone(),
            name: s
                .hello
                .as_ref()
                .map(|h| h.name.clone())
                .or_else(|| s.discovered.name.clone()),
            last_error: if status == DeliveryStatus::Acked {
                None
            } else {
                s.last_error.clone()
            },
            status,
        }
    }

    pub(crate) fn view(&self) -> PeerView {
        let s = self.status();
        let hello = s.hello.as_ref();
        PeerView {
            grpc_addr: s.discovered.grpc_addr.clone(),
            name: hello
                .map(|h| h.name.clone())
                .or_else(|| s.discovered.name.clone()),
            pod_ip: hello.map(|h| h.pod_ip.clone()),
            host_ip: hello
                .map(|h| h.host_ip.clone())
                .filter(|h| !h.is_empty())
                .or_else(|| s.discovered.host_ip.clone()),
            // Discovery's start time (a pod's container startedAt) is the
            // authority when it has one, as in the bootstrap's choice.
            started_at_ms: s
                .discovered
                .started_at_ms
                .or(hello.map(|h| h.started_at_ms)),
            node_id: hello.map(|h| format!("{:016x}", h.node_id)),
            status: match s.reachability {
                Reachability::Unknown => "unknown",
                Reachability::Up => "up",
                Reachability::Down => "down",
            },
            ready: s.peer_ready,
            legacy: s.legacy,
            queue_depth: self.queued.load(Ordering::Relaxed),
            suspended: self.suspended(),
            sent_batches: s.sent_batches,
            failed_attempts: s.failed_attempts,
            dropped_entries: s.dropped_entries,
            last_ok_ms: s.last_ok.map(ms),
            last_error: s.last_error.clone(),
        }
    }

    /// The peer answered. True if writes were suspended for it until now.
    fn succeeded(&self) -> bool {
        let mut s = self.status();
        if s.reachability != Reachability::Up {
            info!(peer = %s.discovered.grpc_addr, "peer is up");
        }
        s.reachability = Reachability::Up;
        s.last_ok = Some(SystemTime::now());
        s.last_error = None;
        self.suspended.swap(false, Ordering::AcqRel)
    }

    fn failed(&self, error: String) {
        let mut s = self.status();
        if s.reachability != Reachability::Down {
            warn!(peer = %s.discovered.grpc_addr, %error, "peer is unreachable; retrying");
        }
        s.reachability = Reachability::Down;
        s.failed_attempts += 1;
        s.last_error = Some(error);
    }
}

struct Clients {
    replica: ReplicaClient<Channel>,
    /// `Replica/Replicate` and `ReplicateStream` called with
    /// [`ReplicateBatch`] (the generated client would take `Entry`
    /// messages, copies of every record).
    replicate: tonic::client::Grpc<Channel>,
    sync: SyncClient<Channel>,
    /// The open `ReplicateStream` call, if any.
    session: Option<ReplicateSession>,
    /// False once the peer answered UNIMPLEMENTED to `ReplicateStream` (a
    /// podcache from before it): batches go as unary `Replicate` calls.
    streams: bool,
}

/// An open `ReplicateStream` call: batches go in through `batches`, and the
/// peer answers each, in order, on `answers`.
struct ReplicateSession {
    batches: mpsc::Sender<ReplicateBatch>,
    answers: tonic::Streaming<pb::ReplicateResponse>,
}

fn codec() -> tonic_prost::ProstCodec<ReplicateBatch, pb::ReplicateResponse> {
    tonic_prost::ProstCodec::default()
}

fn call<T>(message: T, method: &'static str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .extensions_mut()
        .insert(tonic::GrpcMethod::new("podcache.v1.Replica", method));
    request
}

impl Clients {
    async fn ready(&mut self) -> Result<(), tonic::Status> {
        self.replicate
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))
    }

    async fn replicate(
        &mut self,
        batch: ReplicateBatch,
    ) -> Result<tonic::Response<pb::ReplicateResponse>, tonic::Status> {
        self.ready().await?;
        let path = axum::http::uri::PathAndQuery::from_static("/podcache.v1.Replica/Replicate");
        let request = call(batch, "Replicate");
        self.replicate.unary(request, path, codec()).await
    }

    /// Opens a `ReplicateStream` call (returns once the peer answered its
    /// headers).
    async fn open_session(&mut self) -> Result<ReplicateSession, tonic::Status> {
        self.ready().await?;
        let path =
            axum::http::uri::PathAndQuery::from_static("/podcache.v1.Replica/ReplicateStream");
        // One batch in flight at a time: the link waits for each answer.
        let (batches, outgoing) = mpsc::channel(1);
        let request = call(
            tokio_stream::wrappers::ReceiverStream::new(outgoing),
            "ReplicateStream",
        );
        let answers = self
            .replicate
            .streaming(request, path, codec())
            .await?
            .into_inner();
        Ok(ReplicateSession { batches, answers })
    }
}

/// The link task: drains the queue in batches until the queue is closed
/// (drain at shutdown) or the link is cancelled (the peer left).
pub(crate) async fn run(
    ctx: Arc<LinkContext>,
    channel: Channel,
    state: Arc<PeerState>,
    mut queue_rx: mpsc::Receiver<Outgoing>,
    cancel: CancellationToken,
) {
    let max = ctx.config.max_grpc_message_bytes;
    let mut clients = Clients {
        replica: ReplicaClient::new(channel.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        replicate: tonic::client::Grpc::new(channel.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        sync: SyncClient::new(channel)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        session: None,
        streams: true,
    };
    let peer = state.view().grpc_addr;
    let peer_label = label("peer", peer.clone());
    hello(&ctx, &mut clients, &state).await;
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => break,
            item = tokio::time::timeout(ctx.config.heartbeat_interval, queue_rx.recv()) => match item {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(_) => {
                    hello(&ctx, &mut clients, &state).await;
                    continue;
                }
            },
        };
        if state.overflow.swap(false, Ordering::AcqRel) {
            drop_backlog(&ctx, &state, &mut queue_rx, vec![first], &peer);
            continue;
        }
        // Take whatever else is queued, up to one batch's worth of bytes.
        let mut items = vec![first];
        let mut bytes: usize = items[0].records.iter().map(wire_size).sum();
        while bytes < ctx.config.max_batch_bytes {
            match queue_rx.try_recv() {
                Ok(item) => {
                    bytes += item.records.iter().map(wire_size).sum::<usize>();
                    items.push(item);
                }
                Err(_) => break,
            }
        }
        state
            .queued
            .fetch_sub(items.len() as u64, Ordering::Relaxed);
        ctx.metrics
            .queue_depth
            .get_or_create(&peer_label)
            .set(state.queued.load(Ordering::Relaxed) as i64);
        let delivered = deliver(&ctx, &mut clients, &state, &items, &cancel, &peer_label).await;
        if delivered == Delivered::Yes && state.needs_hello() {
            hello(&ctx, &mut clients, &state).await;
        }
        if delivered == Delivered::Overflowed {
            state.overflow.store(false, Ordering::Release);
            drop_backlog(&ctx, &state, &mut queue_rx, items, &peer);
            continue;
        }
        let status = if delivered == Delivered::Yes {
            DeliveryStatus::Acked
        } else {
            let entries: usize = items.iter().map(|i| i.records.len()).sum();
            state.dropped(entries as u64);
            ctx.metrics
                .entries_dropped
                .get_or_create(&vec![
                    ("peer", peer.clone()),
                    ("reason", "peer_left".into()),
                ])
                .inc_by(entries as u64);
            DeliveryStatus::PeerLeft
        };
        for item in items {
            if let Some(ack_tx) = item.ack_tx {
                let _ = ack_tx.send(status.clone());
            }
        }
    }
    debug!(%peer, "peer link stopped");
}

/// The queue overflowed: drops `items` and the whole backlog (memory stays
/// bounded whatever the peer does) and asks anti-entropy to repair the peer.
fn drop_backlog(
    ctx: &LinkContext,
    state: &PeerState,
    queue_rx: &mut mpsc::Receiver<Outgoing>,
    items: Vec<Outgoing>,
    peer: &str,
) {
    // A peer that is down would only fill the queue again: stop queueing
    // for it until it answers (`answered`).
    let suspend = state.status().reachability == Reachability::Down;
    if suspend {
        state.suspended.store(true, Ordering::Release);
    }
    let mut dropped = items;
    let taken_from_queue = dropped.len();
    while let Ok(item) = queue_rx.try_recv() {
        dropped.push(item);
    }
    // Items taken before (a batch being retried) were already uncounted.
    let newly = (dropped.len() - taken_from_queue) as u64;
    state.queued.fetch_sub(
        newly.min(state.queued.load(Ordering::Relaxed)),
        Ordering::Relaxed,
    );
    let entries: usize = dropped.iter().map(|i| i.records.len()).sum();
    state.dropped(entries as u64);
    ctx.metrics
        .entries_dropped
        .get_or_create(&vec![
            ("peer", peer.to_owned()),
            ("reason", "queue_overflow".into()),
        ])
        .inc_by(entries as u64);
    ctx.metrics
        .queue_overflows
        .get_or_create(&label("peer", peer.to_owned()))
        .inc();
    if suspend {
        warn!(%peer, entries, "peer queue overflowed while the peer is down; backlog dropped, writes for it not queued until it answers");
    } else {
        warn!(%peer, entries, "peer queue overflowed; backlog dropped, repair requested");
    }
    for item in dropped {
        if let Some(ack_tx) = item.ack_tx {
            let _ = ack_tx.send(DeliveryStatus::Dropped);
        }
    }
    let _ = ctx.repair_tx.try_send(peer.to_owned());
}

/// How a delivery attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivered {
    /// The peer acknowledged every record.
    Yes,
    /// The link was cancelled (the peer left, or shutdown).
    Cancelled,
    /// The queue overflowed while retrying: give up on this batch too.
    Overflowed,
}

/// The peer answered: marks it up, and if writes were suspended for it,
/// queues them again from now on and asks anti-entropy to repair what it
/// missed meanwhile.
fn answered(ctx: &LinkContext, state: &PeerState) {
    if state.succeeded() {
        let peer = state.status().discovered.grpc_addr.clone();
        info!(%peer, "peer answers again; queueing writes for it, repair requested");
        let _ = ctx.repair_tx.try_send(peer);
    }
}

/// Asks the peer who it is; detects a legacy peer.
async fn hello(ctx: &LinkContext, clients: &mut Clients, state: &PeerState) {
    let request = tonic::Request::new(HelloRequest {
        sender: Some(ctx.me.clone()),
    });
    match tokio::time::timeout(ctx.config.rpc_timeout, clients.replica.hello(request)).await {
        Ok(Ok(response)) => {
            let response = response.into_inner();
            state.record_hello(response.node, response.ready, response.stale);
            answered(ctx, state);
        }
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
            state.status().legacy = true;
            answered(ctx, state);
        }
        Ok(Err(status)) => state.failed(format!("hello: {}", status.message())),
        Err(_) => state.failed("hello: timed out".into()),
    }
}

/// Sends every record of `items`, cut into requests of bounded size, each
/// retried until it succeeds, the link is cancelled, or the queue overflows.
async fn deliver(
    ctx: &LinkContext,
    clients: &mut Clients,
    state: &PeerState,
    items: &[Outgoing],
    cancel: &CancellationToken,
    peer_label: &Vec<(&'static str, String)>,
) -> Delivered {
    let mut batches: Vec<Vec<Record>> = vec![Vec::new()];
    let mut bytes = 0;
    for record in items.iter().flat_map(|i| i.records.iter()) {
        let size = wire_size(record);
        if bytes + size > ctx.config.max_batch_bytes && !batches[batches.len() - 1].is_empty() {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        let last = batches.len() - 1;
        batches[last].push(record.clone());
    }
    for records in batches {
        let mut backoff = Duration::from_millis(20);
        loop {
            let started = tokio::time::Instant::now();
            let result = tokio::select! {
                _ = cancel.cancelled() => return Delivered::Cancelled,
                result = send_batch(ctx, clients, state, &records) => result,
            };
            match result {
                Ok(()) => {
                    answered(ctx, state);
                    state.status().sent_batches += 1;
                    ctx.metrics.batches_sent.get_or_create(peer_label).inc();
                    ctx.metrics
                        .replication_seconds
                        .observe(started.elapsed().as_secs_f64());
                    break;
                }
                Err(error) => {
                    state.failed(error);
                    ctx.metrics.batches_failed.get_or_create(peer_label).inc();
                    tokio::select! {
                        _ = cancel.cancelled() => return Delivered::Cancelled,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    if state.overflow.load(Ordering::Acquire) {
                        return Delivered::Overflowed;
                    }
                    backoff = (backoff * 2).min(ctx.config.max_retry_backoff);
                }
            }
        }
    }
    Delivered::Yes
}

async fn send_batch(
    ctx: &LinkContext,
    clients: &mut Clients,
    state: &PeerState,
    records: &[Record],
) -> Result<(), String> {
    let legacy = state.status().legacy;
    if !legacy && clients.streams {
        match send_on_stream(ctx, clients, records).await {
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                info!(peer = %state.view().grpc_addr, "peer has no ReplicateStream; sending Replicate calls");
                clients.streams = false;
            }
            Err(status) => return Err(format!("replicate: {}", status.message())),
            Ok(()) => return Ok(()),
        }
    }
    if !legacy {
        let batch = ReplicateBatch {
            sender: Some(ctx.me.clone()),
            records: records.to_vec(),
        };
        match tokio::time::timeout(ctx.config.rpc_timeout, clients.replicate(batch)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                info!(peer = %state.view().grpc_addr, "peer speaks only hellorpc.Sync; sending Set");
                state.status().legacy = true;
            }
            Ok(Err(status)) => return Err(format!("replicate: {}", status.message())),
            Err(_) => return Err("replicate: timed out".into()),
        }
    }
    send_legacy(ctx, clients, state, records).await
}

/// Sends one batch on the open `ReplicateStream` call (opening one first if
/// none is open) and waits for its answer. Any failure closes the call; the
/// retry opens a new one. A batch whose answer was lost may be merged twice,
/// which the merge rule makes harmless.
async fn send_on_stream(
    ctx: &LinkContext,
    clients: &mut Clients,
    records: &[Record],
) -> Result<(), tonic::Status> {
    let timeout = ctx.config.rpc_timeout;
    let timed_out = || tonic::Status::deadline_exceeded("timed out");
    let mut session = match clients.session.take() {
        Some(session) => session,
        None => tokio::time::timeout(timeout, clients.open_session())
            .await
            .map_err(|_| timed_out())??,
    };
    let batch = ReplicateBatch {
        sender: Some(ctx.me.clone()),
        records: records.to_vec(),
    };
    let exchange = async {
        if session.batches.send(batch).await.is_err() {
            return Err(tonic::Status::unavailable("the stream closed"));
        }
        match session.answers.message().await {
            Ok(Some(_answer)) => Ok(()),
            Ok(None) => Err(tonic::Status::unavailable("the peer ended the stream")),
            Err(status) => Err(status),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| timed_out())??;
    clients.session = Some(session);
    Ok(())
}

/// The original protocol has no versions, expiry or deletes: values go as
/// `Sync/Set`, grouped by type; tombstones cannot be expressed and are
/// counted as dropped.
async fn send_legacy(
    ctx: &LinkContext,
    clients: &mut Clients,
    state: &PeerState,
    records: &[Record],
) -> Result<(), String> {
    let mut by_type: BTreeMap<i32, HashMap<String, String>> = BTreeMap::new();
    let mut tombstones = 0;
    for record in records {
        let (key, Some(value)) = record.entry.key_value() else {
            tombstones += 1;
            continue;
        };
        by_type
            .entry(record.ty)
            .or_default()
            .insert(key.to_owned(), value.to_owned());
    }
    if tombstones > 0 {
        state.dropped(tombstones);
        ctx.metrics
            .entries_dropped
            .get_or_create(&vec![
                ("peer", state.view().grpc_addr),
                ("reason", "legacy_peer_cannot_delete".into()),
            ])
            .inc_by(tombstones);
    }
    if by_type.is_empty() {
        return Ok(());
    }
    let request = SyncRequest {
        data: by_type
            .into_iter()
            .map(|(r#type, data)| SyncData { r#type, data })
            .collect(),
    };
    match tokio::time::timeout(ctx.config.rpc_timeout, clients.sync.set(request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(format!("set: {}", status.message())),
        Err(_) => Err("set: timed out".into()),
    }
}
