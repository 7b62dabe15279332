//! One peer link's task: it drives the link's state machine
//! ([`super::link`]) with the calls of [`super::transport`], takes epochs
//! from the change index and acknowledges them, and keeps the peer's status
//! for `/v1/cluster`.
//!
//! Owns: the loop of one link and the peer's status. Must not touch: the
//! decisions (the machine makes them), the wire (the transport).

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::error::ReplicationError;
use super::link::{LinkMachine, LinkSettings, Outcome, Protocol, Reachability, Step};
use super::transport::Transport;
use crate::discovery::Peer;
use crate::metrics::label;
use crate::proto::podcache as pb;
use crate::replica::Replica;
use crate::replica::changes::{CursorId, PeerLabel};

/// What every link needs, shared.
pub(crate) struct LinkContext {
    pub(crate) replica: Arc<Replica>,
    /// This node, named in every request.
    pub(crate) me: pb::NodeInfo,
    /// Asks anti-entropy for a repair of a peer (one taken back after a
    /// release).
    pub(crate) repair_tx: tokio::sync::mpsc::Sender<String>,
    /// Fires at shutdown: links send what is pending, then stop.
    pub(crate) drain: CancellationToken,
    /// Links open now: an idle link's heartbeat stretches with it.
    pub(crate) links: std::sync::atomic::AtomicUsize,
    /// Addresses that turned out to reach this node itself.
    pub(crate) selves: super::SelfAddrs,
}

impl LinkContext {
    /// The heartbeat of an idle link: the configured interval while the
    /// node has at most `--anti-entropy-peers` links, longer beyond, so the
    /// node checks that many peers per interval in all, not all of them.
    pub(crate) fn heartbeat(&self) -> std::time::Duration {
        let config = &self.replica.config;
        let links = self.links.load(std::sync::atomic::Ordering::Relaxed).max(1);
        let per_interval = config.anti_entropy_peers.max(1);
        config.heartbeat_interval * links.div_ceil(per_interval) as u32
    }
}

#[derive(Debug)]
struct Status {
    discovered: Peer,
    hello: Option<pb::NodeInfo>,
    peer_ready: Option<bool>,
    /// The peer says it is stale (cut off past the tombstone grace).
    peer_stale: bool,
    reachability: Reachability,
    protocol: Protocol,
    released: bool,
    last_ok: Option<SystemTime>,
    last_error: Option<String>,
    sent_requests: u64,
    failed_attempts: u64,
    dropped_entries: u64,
}

/// A peer's status, shared between its link task and readers.
#[derive(Debug)]
pub(crate) struct PeerState {
    status: Mutex<Status>,
    /// How delivery reports name the peer.
    pub(crate) label: Arc<PeerLabel>,
    /// The peer's cursor in the change index.
    pub(crate) cursor: CursorId,
    /// Anti-entropy rounds in a row that left busy buckets unrepaired (see
    /// `anti_entropy::plan`).
    pub(crate) busy_rounds: AtomicU32,
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
    /// How writes go to it: `stream`, `unary` or `legacy`.
    pub protocol: &'static str,
    /// Entries waiting for it (a key counts once per epoch it is in).
    pub pending_entries: u64,
    /// Bytes of keys and values waiting for it.
    pub pending_bytes: u64,
    /// True while writes are not held for it: it did not answer for longer
    /// than the retention. Cleared (and a repair asked for) when it answers.
    pub released: bool,
    /// Requests delivered.
    pub sent_batches: u64,
    /// Failed attempts (each retried).
    pub failed_attempts: u64,
    /// Entries dropped: released while it was down, or tombstones a legacy
    /// peer cannot be told about.
    pub dropped_entries: u64,
    /// Last successful exchange, Unix ms.
    pub last_ok_ms: Option<u64>,
    /// Last error, if the last exchange failed.
    pub last_error: Option<String>,
}

impl PeerState {
    pub(crate) fn new(discovered: Peer, label: Arc<PeerLabel>, cursor: CursorId) -> Self {
        label.set_name(discovered.name.clone());
        Self {
            status: Mutex::new(Status {
                discovered,
                hello: None,
                peer_ready: None,
                peer_stale: false,
                reachability: Reachability::Unknown,
                protocol: Protocol::Stream,
                released: false,
                last_ok: None,
                last_error: None,
                sent_requests: 0,
                failed_attempts: 0,
                dropped_entries: 0,
            }),
            label,
            cursor,
            busy_rounds: AtomicU32::new(0),
        }
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        // Only plain field updates happen under this lock.
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The peer's dial address.
    pub(crate) fn addr(&self) -> &str {
        &self.label.addr
    }

    /// Records a peer's hello answer (from the link or anti-entropy).
    pub(crate) fn record_hello(&self, node: Option<pb::NodeInfo>, ready: bool, stale: bool) {
        let mut s = self.status();
        if let Some(node) = &node {
            self.label.set_name(Some(node.name.clone()));
        }
        s.hello = node;
        s.peer_ready = Some(ready);
        s.peer_stale = stale;
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

    /// What discovery reports of the peer's start, and what the peer said.
    pub(crate) fn ages(&self) -> (Option<i64>, Option<pb::NodeInfo>) {
        let s = self.status();
        (s.discovered.started_at_ms, s.hello.clone())
    }

    fn succeeded(&self) {
        let mut s = self.status();
        if s.reachability != Reachability::Up {
            info!(peer = %s.discovered.grpc_addr, "peer is up");
        }
        s.reachability = Reachability::Up;
        s.last_ok = Some(SystemTime::now());
        s.last_error = None;
        self.label.set_last_error(None);
    }

    fn failed(&self, error: &ReplicationError) {
        let mut s = self.status();
        if s.reachability != Reachability::Down {
            warn!(peer = %s.discovered.grpc_addr, %error, "peer is unreachable; retrying");
        }
        s.reachability = Reachability::Down;
        s.failed_attempts += 1;
        s.last_error = Some(error.to_string());
        self.label.set_last_error(Some(error.to_string()));
    }

    pub(crate) fn view(&self, replica: &Replica) -> PeerView {
        let pending = replica.changes().pending(self.cursor);
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
            // authority when it has one (see `oldest`).
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
            legacy: s.protocol == Protocol::Legacy,
            protocol: match s.protocol {
                Protocol::Stream => "stream",
                Protocol::Unary => "unary",
                Protocol::Legacy => "legacy",
            },
            pending_entries: pending.entries as u64,
            pending_bytes: pending.bytes as u64,
            released: s.released,
            sent_batches: s.sent_requests,
            failed_attempts: s.failed_attempts,
            dropped_entries: s.dropped_entries,
            last_ok_ms: s.last_ok.map(|t| {
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0)
            }),
            last_error: s.last_error.clone(),
        }
    }
}

fn outcome<T>(result: &Result<T, ReplicationError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Ok,
        Err(e) if e.is_unimplemented() => Outcome::Unimplemented,
        Err(_) => Outcome::Failed,
    }
}

/// The link task: runs until the link is cancelled (the peer left, or the
/// drain at shutdown ran out of time) or, once draining, nothing is left
/// to send.
pub(crate) async fn run(
    ctx: Arc<LinkContext>,
    channel: Channel,
    state: Arc<PeerState>,
    cancel: CancellationToken,
) {
    let replica = &ctx.replica;
    let config = &replica.config;
    let mut machine = LinkMachine::new(LinkSettings {
        heartbeat: config.heartbeat_interval,
        first_backoff: config
            .max_retry_backoff
            .min(std::time::Duration::from_millis(20)),
        max_backoff: config.max_retry_backoff,
        release_after: config.down_peer_retention,
    });
    let mut transport = Transport::new(
        channel,
        config.max_grpc_message_bytes,
        config.rpc_timeout,
        config.max_batch_bytes,
    );
    let metrics = &replica.metrics;
    let peer = state.addr().to_owned();
    let peer_label = label("peer", peer.clone());
    loop {
        machine.set_heartbeat(ctx.heartbeat());
        let changed = replica.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let pending = replica.changes().has_pending(state.cursor);
        if ctx.drain.is_cancelled() && (!pending || machine.released()) {
            break;
        }
        match machine.next(tokio::time::Instant::now(), pending) {
            Step::Hello => {
                let result = tokio::select! {
                    _ = cancel.cancelled() => break,
                    result = transport.hello(&ctx.me) => result,
                };
                match &result {
                    Ok(answer) if super::SelfAddrs::is_me(&ctx.me, answer.node.as_ref()) => {
                        // This address is this node: no peer. Nothing is
                        // held for it, its link ends here, and the
                        // membership loop closes it.
                        if ctx.selves.found(&peer) {
                            warn!(%peer, "this peer address reaches this node itself (set --pod-ip to the address peers dial); dropping it from the peers");
                        }
                        replica.changes().detach(state.cursor);
                        break;
                    }
                    Ok(answer) => {
                        state.record_hello(answer.node.clone(), answer.ready, answer.stale);
                        state.succeeded();
                    }
                    Err(e) if e.is_unimplemented() => {
                        if state.status().protocol != Protocol::Legacy {
                            info!(%peer, "peer speaks only hellorpc.Sync; sending Set");
                        }
                        state.succeeded();
                    }
                    Err(e) => state.failed(e),
                }
                machine.hello_result(tokio::time::Instant::now(), outcome(&result));
            }
            Step::Send(protocol) => {
                let Some(epoch) = replica.changes().take(state.cursor) else {
                    continue;
                };
                let started = tokio::time::Instant::now();
                debug!(%peer, epoch = epoch.epoch, entries = epoch.records.len(), up_to = epoch.last_hlc, "sending an epoch");
                let result = tokio::select! {
                    _ = cancel.cancelled() => break,
                    result = transport.send(protocol, &ctx.me, &epoch) => result,
                };
                match &result {
                    Ok(sent) => {
                        replica.changes().acked(state.cursor, epoch.epoch);
                        state.succeeded();
                        let mut s = state.status();
                        s.sent_requests += sent.requests;
                        if sent.unexpressed > 0 {
                            s.dropped_entries += sent.unexpressed;
                            metrics
                                .entries_dropped
                                .get_or_create(&vec![
                                    ("peer", peer.clone()),
                                    ("reason", "legacy_peer_cannot_delete".into()),
                                ])
                                .inc_by(sent.unexpressed);
                        }
                        drop(s);
                        metrics
                            .batches_sent
                            .get_or_create(&peer_label)
                            .inc_by(sent.requests);
                        metrics.epochs_sent.get_or_create(&peer_label).inc();
                        metrics
                            .replication_seconds
                            .observe(started.elapsed().as_secs_f64());
                    }
                    Err(e) if e.is_unimplemented() => {
                        info!(%peer, error = %e, "peer does not serve this way of replicating; falling back");
                    }
                    Err(e) => {
                        state.failed(e);
                        metrics.batches_failed.get_or_create(&peer_label).inc();
                    }
                }
                machine.send_result(tokio::time::Instant::now(), outcome(&result));
                state.status().protocol = machine.protocol();
            }
            Step::Release => {
                let released = replica.changes().release(state.cursor);
                let mut s = state.status();
                s.released = true;
                s.dropped_entries += released.entries as u64;
                drop(s);
                metrics
                    .entries_dropped
                    .get_or_create(&vec![
                        ("peer", peer.clone()),
                        ("reason", "peer_down_released".into()),
                    ])
                    .inc_by(released.entries as u64);
                warn!(
                    %peer,
                    entries = released.entries,
                    bytes = released.bytes,
                    after = ?config.down_peer_retention,
                    "peer did not answer for the whole retention; its pending writes are released, anti-entropy repairs it when it returns"
                );
            }
            Step::Reattach => {
                replica.changes().reattach(state.cursor);
                state.status().released = false;
                info!(%peer, "peer answers again; holding writes for it again, repair requested");
                let _ = ctx.repair_tx.try_send(peer.clone());
            }
            Step::Wait { until, on_write } => {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = ctx.drain.cancelled(), if !ctx.drain.is_cancelled() => {}
                    _ = tokio::time::sleep_until(until) => {}
                    _ = &mut changed, if on_write => {}
                }
            }
        }
    }
    debug!(%peer, "peer link stopped");
}
