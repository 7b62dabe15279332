//! One peer link's task: it drives the link's state machine
//! ([`super::link`]) with the calls of [`super::transport`], takes epochs
//! from the change index and acknowledges them, and keeps the peer's status
//! for `/v1/cluster`.
//!
//! Owns: the loop of one link (one small handler per [`Step`]) and the
//! peer's [`PeerState`]: what discovery and the peer said of it, and the
//! counts shown in `/v1/cluster`. Must not touch: the decisions (the
//! machine makes them, and whether the peer is up, which way it is sent
//! to and whether its writes are released is read from the machine, which
//! the state holds: nothing copies them), the wire (the transport), what
//! is pending (the change index, by the peer's cursor).

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::error::ReplicationError;
use super::link::{LinkMachine, LinkSettings, Outcome, Protocol, Reachability, Step};
use super::transport::{PeerTransport, Transport};
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
    /// The link's decisions: the one owner of whether the peer is up,
    /// which way it is sent to and whether its writes are released.
    machine: LinkMachine,
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
    pub(crate) fn new(
        discovered: Peer,
        label: Arc<PeerLabel>,
        cursor: CursorId,
        settings: LinkSettings,
    ) -> Self {
        label.set_name(discovered.name.clone());
        Self {
            status: Mutex::new(Status {
                discovered,
                hello: None,
                peer_ready: None,
                peer_stale: false,
                machine: LinkMachine::new(settings),
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

    /// Hands the machine a call's result and records it: the time of the
    /// last success, the last error, and a line in the log when the peer
    /// goes up or down.
    fn record<T>(&self, call: Asked, result: &Result<T, ReplicationError>) {
        let outcome = match result {
            Ok(_) => Outcome::Ok,
            Err(e) if e.is_unimplemented() => Outcome::Unimplemented,
            Err(_) => Outcome::Failed,
        };
        let mut s = self.status();
        let was = s.machine.reachability();
        let now = Instant::now();
        match call {
            Asked::Hello => s.machine.hello_result(now, outcome),
            Asked::Send => s.machine.send_result(now, outcome),
        }
        // A peer without Hello answered too: it speaks only the original
        // protocol. One that does not serve a way of sending answered as
        // well: the machine falls back to another, nothing is recorded.
        let answered = match outcome {
            Outcome::Ok => true,
            Outcome::Unimplemented => matches!(call, Asked::Hello),
            Outcome::Failed => false,
        };
        if answered {
            s.last_ok = Some(SystemTime::now());
            s.last_error = None;
            self.label.set_last_error(None);
        } else if let (Outcome::Failed, Err(e)) = (outcome, result) {
            s.failed_attempts += 1;
            s.last_error = Some(e.to_string());
            self.label.set_last_error(Some(e.to_string()));
        }
        let peer = &s.discovered.grpc_addr;
        match (was, s.machine.reachability(), result) {
            (was, Reachability::Up, _) if was != Reachability::Up => info!(%peer, "peer is up"),
            (was, Reachability::Down, Err(error)) if was != Reachability::Down => {
                warn!(%peer, %error, "peer is unreachable; retrying")
            }
            _ => {}
        }
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
            status: match s.machine.reachability() {
                Reachability::Unknown => "unknown",
                Reachability::Up => "up",
                Reachability::Down => "down",
            },
            ready: s.peer_ready,
            legacy: s.machine.protocol() == Protocol::Legacy,
            protocol: match s.machine.protocol() {
                Protocol::Stream => "stream",
                Protocol::Unary => "unary",
                Protocol::Legacy => "legacy",
            },
            pending_entries: pending.entries as u64,
            pending_bytes: pending.bytes as u64,
            released: s.machine.released(),
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

/// A link's timers, from the node's configuration.
pub(crate) fn settings(config: &crate::config::NodeConfig) -> LinkSettings {
    LinkSettings {
        heartbeat: config.heartbeat_interval,
        first_backoff: config
            .max_retry_backoff
            .min(std::time::Duration::from_millis(20)),
        max_backoff: config.max_retry_backoff,
        release_after: config.down_peer_retention,
    }
}

/// Which call a result answers.
#[derive(Debug, Clone, Copy)]
enum Asked {
    Hello,
    Send,
}

/// Whether the link goes on after a step.
enum Flow {
    Go,
    Stop,
}

/// One link's task and what its steps use.
struct LinkTask<T> {
    ctx: Arc<LinkContext>,
    state: Arc<PeerState>,
    transport: T,
    cancel: CancellationToken,
    peer: String,
    peer_label: Vec<(&'static str, String)>,
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
    let config = &ctx.replica.config;
    let transport = Transport::new(
        channel,
        config.max_grpc_message_bytes,
        config.rpc_timeout,
        config.max_batch_bytes,
    );
    drive(ctx, transport, state, cancel).await;
}

/// [`run`] over any transport: the tonic one, or the simulation's.
pub(crate) async fn drive(
    ctx: Arc<LinkContext>,
    transport: impl PeerTransport,
    state: Arc<PeerState>,
    cancel: CancellationToken,
) {
    let peer = state.addr().to_owned();
    let mut task = LinkTask {
        peer_label: label("peer", peer.clone()),
        peer,
        ctx,
        state,
        transport,
        cancel,
    };
    task.run().await;
    debug!(peer = %task.peer, "peer link stopped");
}

impl<T: PeerTransport> LinkTask<T> {
    async fn run(&mut self) {
        loop {
            let replica = self.ctx.replica.clone();
            // Armed before the step is chosen: a write after this wakes a
            // wait.
            let changed = replica.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let pending = replica.changes().has_pending(self.state.cursor);
            let step = {
                let mut s = self.state.status();
                if self.ctx.drain.is_cancelled() && (!pending || s.machine.released()) {
                    break;
                }
                s.machine.set_heartbeat(self.ctx.heartbeat());
                s.machine.next(Instant::now(), pending)
            };
            let flow = match step {
                Step::Hello => self.hello().await,
                Step::Send(protocol) => self.send(protocol).await,
                Step::Release => self.release(),
                Step::Reattach => self.reattach(),
                Step::Wait { until, on_write } => self.wait(until, on_write, changed).await,
            };
            if let Flow::Stop = flow {
                break;
            }
        }
    }

    async fn hello(&mut self) -> Flow {
        let result = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return Flow::Stop,
            result = self.transport.hello(&self.ctx.me) => result,
        };
        let peer = &self.peer;
        match &result {
            Ok(answer) if super::SelfAddrs::is_me(&self.ctx.me, answer.node.as_ref()) => {
                // This address is this node: no peer. Nothing is held for
                // it, its link ends here, and the membership loop closes it.
                if self.ctx.selves.found(peer) {
                    warn!(%peer, "this peer address reaches this node itself (set --pod-ip to the address peers dial); dropping it from the peers");
                }
                self.ctx.replica.changes().detach(self.state.cursor);
                return Flow::Stop;
            }
            Ok(answer) => {
                self.state
                    .record_hello(answer.node.clone(), answer.ready, answer.stale);
            }
            Err(e) if e.is_unimplemented() => {
                if self.state.status().machine.protocol() != Protocol::Legacy {
                    info!(%peer, "peer speaks only hellorpc.Sync; sending Set");
                }
            }
            Err(_) => {}
        }
        self.state.record(Asked::Hello, &result);
        Flow::Go
    }

    async fn send(&mut self, protocol: Protocol) -> Flow {
        let replica = &self.ctx.replica;
        let Some(epoch) = replica.changes().take(self.state.cursor) else {
            return Flow::Go;
        };
        let peer = &self.peer;
        let metrics = &replica.metrics;
        let started = Instant::now();
        debug!(%peer, epoch = epoch.epoch, entries = epoch.records.len(), up_to = epoch.last_hlc, "sending an epoch");
        let result = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return Flow::Stop,
            result = self.transport.send(protocol, &self.ctx.me, &epoch) => result,
        };
        match &result {
            Ok(sent) => {
                replica.changes().acked(self.state.cursor, epoch.epoch);
                let mut s = self.state.status();
                s.sent_requests += sent.requests;
                s.dropped_entries += sent.unexpressed;
                drop(s);
                if sent.unexpressed > 0 {
                    metrics
                        .entries_dropped
                        .get_or_create(&vec![
                            ("peer", peer.clone()),
                            ("reason", "legacy_peer_cannot_delete".into()),
                        ])
                        .inc_by(sent.unexpressed);
                }
                metrics
                    .batches_sent
                    .get_or_create(&self.peer_label)
                    .inc_by(sent.requests);
                metrics.epochs_sent.get_or_create(&self.peer_label).inc();
                metrics
                    .replication_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(e) if e.is_unimplemented() => {
                info!(%peer, error = %e, "peer does not serve this way of replicating; falling back");
            }
            Err(_) => {
                metrics.batches_failed.get_or_create(&self.peer_label).inc();
            }
        }
        self.state.record(Asked::Send, &result);
        Flow::Go
    }

    fn release(&mut self) -> Flow {
        let replica = &self.ctx.replica;
        let released = replica.changes().release(self.state.cursor);
        self.state.status().dropped_entries += released.entries as u64;
        replica
            .metrics
            .entries_dropped
            .get_or_create(&vec![
                ("peer", self.peer.clone()),
                ("reason", "peer_down_released".into()),
            ])
            .inc_by(released.entries as u64);
        warn!(
            peer = %self.peer,
            entries = released.entries,
            bytes = released.bytes,
            after = ?replica.config.down_peer_retention,
            "peer did not answer for the whole retention; its pending writes are released, anti-entropy repairs it when it returns"
        );
        Flow::Go
    }

    fn reattach(&mut self) -> Flow {
        self.ctx.replica.changes().reattach(self.state.cursor);
        info!(peer = %self.peer, "peer answers again; holding writes for it again, repair requested");
        let _ = self.ctx.repair_tx.try_send(self.peer.clone());
        Flow::Go
    }

    async fn wait(
        &mut self,
        until: Instant,
        on_write: bool,
        changed: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Flow {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return Flow::Stop,
            _ = self.ctx.drain.cancelled(), if !self.ctx.drain.is_cancelled() => {}
            _ = tokio::time::sleep_until(until) => {}
            _ = changed, if on_write => {}
        }
        Flow::Go
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::error::Call;

    fn state() -> PeerState {
        let peer = Peer {
            grpc_addr: "127.0.0.9:9090".into(),
            name: Some("pod-9".into()),
            host_ip: None,
            started_at_ms: None,
        };
        let settings = LinkSettings {
            heartbeat: std::time::Duration::from_secs(2),
            first_backoff: std::time::Duration::from_millis(20),
            max_backoff: std::time::Duration::from_secs(2),
            release_after: std::time::Duration::from_secs(60),
        };
        PeerState::new(
            peer,
            Arc::new(PeerLabel::new("127.0.0.9:9090")),
            0,
            settings,
        )
    }

    fn failed() -> Result<(), ReplicationError> {
        Err(ReplicationError::TimedOut { call: Call::Hello })
    }

    fn unimplemented(call: Call) -> Result<(), ReplicationError> {
        Err(ReplicationError::Unimplemented { call })
    }

    #[test]
    fn what_the_status_shows_is_what_the_machine_decided() {
        let state = state();
        assert_eq!(state.status().machine.reachability(), Reachability::Unknown);
        state.record(Asked::Hello, &failed());
        {
            let s = state.status();
            assert_eq!(s.machine.reachability(), Reachability::Down);
            assert_eq!(s.failed_attempts, 1);
            assert!(
                s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("timed out"))
            );
        }
        state.record(Asked::Hello, &Ok(()));
        {
            let s = state.status();
            assert_eq!(s.machine.reachability(), Reachability::Up);
            assert!(s.last_ok.is_some() && s.last_error.is_none());
        }
        // Falling back from the stream to unary calls: the peer answered,
        // nothing failed, the way shown is the machine's.
        state.record(Asked::Send, &unimplemented(Call::ReplicateStream));
        {
            let s = state.status();
            assert_eq!(s.machine.protocol(), Protocol::Unary);
            assert_eq!(s.machine.reachability(), Reachability::Up);
            assert_eq!(s.failed_attempts, 1);
        }
        // A peer without Hello speaks only the original protocol: it
        // answered, and is sent to by `Sync/Set`.
        state.record(Asked::Hello, &unimplemented(Call::Hello));
        let s = state.status();
        assert_eq!(s.machine.protocol(), Protocol::Legacy);
        assert_eq!(s.machine.reachability(), Reachability::Up);
        assert!(s.last_error.is_none());
        drop(s);
        // So too for a peer that never answered Hello before.
        let fresh = self::state();
        fresh.record(Asked::Hello, &unimplemented(Call::Hello));
        assert_eq!(fresh.status().machine.protocol(), Protocol::Legacy);
    }
}
