//! The bootstrap pull: a starting node asks every peer who it is, picks the
//! one that has run longest ([`super::oldest`]), and pulls its whole state
//! in streamed chunks, falling back to the next oldest when one fails and to
//! `Sync/GetAll` for a peer that speaks only the original protocol.
//!
//! Writes that arrive while the pull runs are not lost: the gRPC service is
//! already serving, and every chunk is merged by version, so a newer entry
//! received meanwhile is never overwritten by the older copy in the chunk.

use std::time::Duration;

use tokio::time::Instant;

use futures_util::future::join_all;
use tracing::{info, warn};

use super::Target;
use super::error::{Call, ReplicationError};
use super::exchange::{SnapshotChunks, StatePeer};
use super::oldest::{Age, seniority};
use crate::discovery::Peer;
use crate::identity::unix_ms;
use crate::proto::podcache::{self as pb, SnapshotRequest};
use crate::proto::{records_from_wire, wire_size};
pub use crate::replica::BootstrapReport;
use crate::replica::Replica;
use crate::store::{Record, Version};

/// A peer considered as bootstrap source.
#[derive(Debug)]
struct Candidate<P> {
    peer: Peer,
    calls: P,
    /// The peer's answer to Hello; None for a legacy peer.
    info: Option<pb::NodeInfo>,
    ready: bool,
}

impl<P> Candidate<P> {
    /// Sort key: ready podcache peers first, then podcache peers still
    /// bootstrapping, then legacy peers (whose age is unknown unless
    /// discovery knew it); within each, oldest first by the one seniority
    /// rule.
    fn order(&self) -> (u8, (i64, u64, String)) {
        let rank = match (&self.info, self.ready) {
            (Some(_), true) => 0,
            (Some(_), false) => 1,
            (None, _) => 2,
        };
        let age = Age {
            discovered_ms: self.peer.started_at_ms,
            own_ms: self.info.as_ref().map(|i| i.started_at_ms),
            node_id: self.info.as_ref().map(|i| i.node_id),
            addr: &self.peer.grpc_addr,
        };
        (rank, seniority(&age))
    }
}

/// How a starting node gets its state before it reports ready: a node
/// that loaded its own from the data directory compares digests with every
/// peer and repairs what differs ([`super::anti_entropy::join`], over
/// `targets`); any other pulls the whole state from the oldest peer
/// ([`run_bootstrap`], reaching peers through `connect`). Then it counts as
/// synced, unless it came back with its own state and reached no peer (it
/// keeps the time of its last sync as saved: if that is older than the
/// tombstone grace it is stale, and resyncs before it is trusted), and
/// reports ready.
pub(crate) async fn get_state<P: StatePeer>(
    replica: &Replica,
    peers: &[Peer],
    selves: &super::SelfAddrs,
    targets: impl FnOnce() -> Vec<Target<P>>,
    connect: impl Fn(&str) -> Result<P, ReplicationError>,
) {
    let report = if replica.loaded_from_disk() > 0 {
        super::anti_entropy::join(replica, targets()).await
    } else {
        run_bootstrap(replica, peers, selves, connect).await
    };
    replica
        .metrics
        .bootstrap_seconds
        .observe(report.duration.as_secs_f64());
    replica.metrics.bootstrap_entries.inc_by(report.entries);
    let reached = report.source.is_some() || peers.is_empty();
    replica.set_bootstrap_report(report);
    if replica.loaded_from_disk() == 0 || reached {
        replica.synced(unix_ms());
    }
    replica.set_ready(true);
}

/// Pulls the whole state from the longest-running reachable peer, reached
/// through `connect` (the replicator's clients in production).
pub(crate) async fn run_bootstrap<P: StatePeer>(
    replica: &Replica,
    peers: &[Peer],
    selves: &super::SelfAddrs,
    connect: impl Fn(&str) -> Result<P, ReplicationError>,
) -> BootstrapReport {
    let started = Instant::now();
    let mut report = BootstrapReport {
        source: None,
        source_name: None,
        method: "none",
        entries: 0,
        bytes: 0,
        duration: Duration::ZERO,
        failed_attempts: Vec::new(),
    };
    let candidates = join_all(peers.iter().map(|peer| probe(replica, &connect, peer))).await;
    let mut candidates: Vec<Candidate<P>> = candidates
        .into_iter()
        .filter_map(|c| match c {
            Ok(c) => Some(c),
            Err((addr, error)) => {
                report.failed_attempts.push((addr, error.to_string()));
                None
            }
        })
        .collect();
    // A peer address that answered with this node's own id is this node:
    // pulling from it would pull nothing and call it done.
    let me = replica.identity.to_wire();
    candidates.retain(|c| {
        if !super::SelfAddrs::is_me(&me, c.info.as_ref()) {
            return true;
        }
        if selves.found(&c.peer.grpc_addr) {
            warn!(peer = %c.peer.grpc_addr, "this peer address reaches this node itself (set --pod-ip to the address peers dial); dropping it from the peers");
        }
        false
    });
    candidates.sort_by_key(Candidate::order);
    // Peers that turned the pull away (busy serving others) are asked
    // again, after a pause, until one serves or none is busy any more: a
    // node that starts with many others still gets the whole state.
    let mut pause = Duration::from_millis(50);
    loop {
        let busy = pull_from_first(replica, &mut candidates, &mut report).await;
        if report.source.is_some() || !busy {
            break;
        }
        let jitter = Duration::from_millis(replica.identity.node_id % 50);
        tokio::time::sleep(pause + jitter).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
    report.duration = started.elapsed();
    info!(
        source = ?report.source,
        method = report.method,
        entries = report.entries,
        ms = report.duration.as_millis() as u64,
        "bootstrap done"
    );
    report
}

/// Tries the candidates in order until one serves the whole state. Keeps
/// the ones that were busy (for a retry) and returns whether any was.
async fn pull_from_first<P: StatePeer>(
    replica: &Replica,
    candidates: &mut Vec<Candidate<P>>,
    report: &mut BootstrapReport,
) -> bool {
    let mut busy = Vec::new();
    for candidate in std::mem::take(candidates) {
        let addr = candidate.peer.grpc_addr.clone();
        let name = candidate
            .info
            .as_ref()
            .map(|i| i.name.clone())
            .or_else(|| candidate.peer.name.clone());
        info!(peer = %addr, name = ?name, "bootstrapping from peer");
        let result = match candidate.info {
            Some(_) => pull_snapshot(replica, &candidate.calls, report).await,
            None => Err(ReplicationError::Unimplemented {
                call: Call::Snapshot,
            }),
        };
        let result = match result {
            Err(e) if e.is_unimplemented() => pull_get_all(replica, &candidate.calls, report).await,
            other => other,
        };
        match result {
            Ok(method) => {
                report.source = Some(addr);
                report.source_name = name;
                report.method = method;
                return false;
            }
            Err(error) if error.is_busy() => {
                info!(peer = %addr, "peer is busy serving snapshots; trying the next oldest");
                busy.push(candidate);
            }
            Err(error) => {
                warn!(peer = %addr, %error, "bootstrap from this peer failed; trying the next oldest");
                report.failed_attempts.push((addr, error.to_string()));
            }
        }
    }
    let any_busy = !busy.is_empty();
    *candidates = busy;
    any_busy
}

async fn probe<P: StatePeer>(
    replica: &Replica,
    connect: &impl Fn(&str) -> Result<P, ReplicationError>,
    peer: &Peer,
) -> Result<Candidate<P>, (String, ReplicationError)> {
    let addr = peer.grpc_addr.clone();
    let calls = connect(&addr).map_err(|e| (addr.clone(), e))?;
    match calls.hello(&replica.identity.to_wire()).await {
        Ok(response) => Ok(Candidate {
            peer: peer.clone(),
            calls,
            info: response.node,
            ready: response.ready,
        }),
        Err(e) if e.is_unimplemented() => Ok(Candidate {
            peer: peer.clone(),
            calls,
            info: None,
            ready: true,
        }),
        Err(e) => Err((addr, e)),
    }
}

async fn pull_snapshot(
    replica: &Replica,
    peer: &impl StatePeer,
    report: &mut BootstrapReport,
) -> Result<&'static str, ReplicationError> {
    let request = SnapshotRequest {
        sender: Some(replica.identity.to_wire()),
        max_chunk_bytes: replica.config.snapshot_chunk_bytes as u32,
    };
    let mut chunks = peer.snapshot(request).await?;
    let metrics = &replica.metrics;
    let mut total = None;
    let mut received = 0u64;
    let started = Instant::now();
    let mut last_log = Instant::now();
    // Each chunk must arrive within the RPC timeout; the whole stream may
    // take as long as the state needs.
    while let Some(chunk) = chunks.next().await? {
        if total.is_none() {
            total = Some(chunk.total_entries);
            metrics
                .bootstrap_total_entries
                .set(chunk.total_entries as i64);
        }
        received += chunk.entries.len() as u64;
        metrics.bootstrap_progress_entries.set(received as i64);
        if last_log.elapsed() >= Duration::from_secs(2) {
            last_log = Instant::now();
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let rate = received as f64 / secs;
            let all = total.unwrap_or(received).max(received);
            let eta = (all - received) as f64 / rate.max(1.0);
            info!(
                received,
                total = all,
                bytes = report.bytes,
                rate_per_s = rate as u64,
                eta_s = eta as u64,
                "bootstrap progress"
            );
        }
        let records: Vec<_> = records_from_wire(chunk.entries);
        report.bytes += records.iter().map(wire_size).sum::<usize>() as u64;
        report.entries += records.len() as u64;
        replica.apply_remote(records, "bootstrap");
    }
    if let Some(total) = total
        && received != total
    {
        return Err(ReplicationError::Incomplete {
            call: Call::Snapshot,
            received,
            expected: total,
        });
    }
    Ok("snapshot")
}

/// Bootstrap from a peer that speaks only the original protocol. Its values
/// carry no version: they are stored with the lowest possible timestamp, so
/// any versioned write (received meanwhile or later) wins over them.
async fn pull_get_all(
    replica: &Replica,
    peer: &impl StatePeer,
    report: &mut BootstrapReport,
) -> Result<&'static str, ReplicationError> {
    let response = peer.get_all().await?;
    let node = replica.identity.node_id;
    for data in response.data {
        let records: Vec<Record> = data
            .data
            .into_iter()
            .map(|(key, value)| {
                Record::new(data.r#type, &key, Some(&value), Version { hlc: 0, node }, 0)
            })
            .collect();
        report.entries += records.len() as u64;
        report.bytes += records.iter().map(wire_size).sum::<usize>() as u64;
        // Merged entry by entry: one value over a limit does not stop the
        // rest (it is counted and logged).
        replica.apply_remote(records, "bootstrap");
    }
    Ok("getall")
}
