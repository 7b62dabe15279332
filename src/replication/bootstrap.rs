//! The bootstrap pull: a starting node asks every peer who it is, picks the
//! one that has run longest, and pulls its whole state in streamed chunks,
//! falling back to the next oldest when one fails and to `Sync/GetAll` for a
//! peer that speaks only the original protocol.
//!
//! Writes that arrive while the pull runs are not lost: the gRPC service is
//! already serving, and every chunk is merged by version, so a newer entry
//! received meanwhile is never overwritten by the older copy in the chunk.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tonic::transport::Channel;
use tracing::{info, warn};

use super::{node_info, peer_channel};
use crate::discovery::Peer;
use crate::node::Shared;
use crate::proto::hellorpc::{SyncRequest, sync_client::SyncClient};
use crate::proto::podcache::{
    self as pb, HelloRequest, SnapshotRequest, replica_client::ReplicaClient,
};
use crate::proto::{record_from_wire, wire_size};
use crate::store::{Record, Version};

/// What the bootstrap pull did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BootstrapReport {
    /// The peer the state came from (its dial address), if any.
    pub source: Option<String>,
    /// That peer's name, if known.
    pub source_name: Option<String>,
    /// `snapshot` (podcache.v1), `getall` (original protocol) or `none`.
    pub method: &'static str,
    /// Entries received.
    pub entries: u64,
    /// Approximate bytes received.
    pub bytes: u64,
    /// Time from the first hello to the last chunk merged.
    #[serde(serialize_with = "as_millis")]
    pub duration: Duration,
    /// Peers tried before the one that worked (or all of them), with why
    /// they failed.
    pub failed_attempts: Vec<(String, String)>,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// A peer considered as bootstrap source.
#[derive(Debug)]
struct Candidate {
    peer: Peer,
    channel: Channel,
    /// The peer's answer to Hello; None for a legacy peer.
    info: Option<pb::NodeInfo>,
    ready: bool,
}

impl Candidate {
    /// Sort key: ready podcache peers first, oldest first (start time then
    /// node id); then podcache peers still bootstrapping; then legacy peers,
    /// whose age is unknown unless discovery knew it. The start time is the
    /// one discovery reports (a pod's running container `startedAt`) when it
    /// has one, else the peer's own.
    fn order(&self) -> (u8, i64, u64, String) {
        match &self.info {
            Some(info) => (
                if self.ready { 0 } else { 1 },
                self.peer.started_at_ms.unwrap_or(info.started_at_ms),
                info.node_id,
                self.peer.grpc_addr.clone(),
            ),
            None => (
                2,
                self.peer.started_at_ms.unwrap_or(i64::MAX),
                0,
                self.peer.grpc_addr.clone(),
            ),
        }
    }
}

/// Pulls the whole state from the longest-running reachable peer.
pub(crate) async fn run_bootstrap(shared: &Shared, peers: &[Peer]) -> BootstrapReport {
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
    let candidates = join_all(peers.iter().map(|peer| probe(shared, peer))).await;
    let mut candidates: Vec<Candidate> = candidates
        .into_iter()
        .filter_map(|c| match c {
            Ok(c) => Some(c),
            Err((addr, error)) => {
                report.failed_attempts.push((addr, error));
                None
            }
        })
        .collect();
    candidates.sort_by_key(Candidate::order);
    for candidate in candidates {
        let addr = candidate.peer.grpc_addr.clone();
        let name = candidate
            .info
            .as_ref()
            .map(|i| i.name.clone())
            .or_else(|| candidate.peer.name.clone());
        info!(peer = %addr, name = ?name, "bootstrapping from peer");
        let result = match candidate.info {
            Some(_) => pull_snapshot(shared, candidate.channel.clone(), &mut report).await,
            None => Err("legacy".to_owned()),
        };
        let result = match result {
            Err(e) if e == "legacy" || e.starts_with("unimplemented") => {
                pull_get_all(shared, candidate.channel, &mut report).await
            }
            other => other,
        };
        match result {
            Ok(method) => {
                report.source = Some(addr);
                report.source_name = name;
                report.method = method;
                break;
            }
            Err(error) => {
                warn!(peer = %addr, %error, "bootstrap from this peer failed; trying the next oldest");
                report.failed_attempts.push((addr, error));
            }
        }
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

async fn probe(shared: &Shared, peer: &Peer) -> Result<Candidate, (String, String)> {
    let addr = peer.grpc_addr.clone();
    let channel =
        peer_channel(&addr, &shared.config, shared.tls.as_ref()).map_err(|e| (addr.clone(), e))?;
    let mut client = ReplicaClient::new(channel.clone());
    let request = HelloRequest {
        sender: Some(node_info(&shared.identity)),
    };
    match tokio::time::timeout(shared.config.rpc_timeout, client.hello(request)).await {
        Ok(Ok(response)) => {
            let response = response.into_inner();
            Ok(Candidate {
                peer: peer.clone(),
                channel,
                info: response.node,
                ready: response.ready,
            })
        }
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => Ok(Candidate {
            peer: peer.clone(),
            channel,
            info: None,
            ready: true,
        }),
        Ok(Err(status)) => Err((addr, format!("hello: {}", status.message()))),
        Err(_) => Err((addr, "hello: timed out".into())),
    }
}

async fn pull_snapshot(
    shared: &Shared,
    channel: Channel,
    report: &mut BootstrapReport,
) -> Result<&'static str, String> {
    let mut client =
        ReplicaClient::new(channel).max_decoding_message_size(shared.config.max_grpc_message_bytes);
    let request = SnapshotRequest {
        sender: Some(node_info(&shared.identity)),
        max_chunk_bytes: shared.config.snapshot_chunk_bytes as u32,
    };
    let timeout = shared.config.rpc_timeout;
    let mut stream = match tokio::time::timeout(timeout, client.snapshot(request)).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
            return Err("unimplemented".into());
        }
        Ok(Err(status)) => return Err(format!("snapshot: {}", status.message())),
        Err(_) => return Err("snapshot: timed out".into()),
    };
    let mut total = None;
    let mut received = 0u64;
    let started = Instant::now();
    let mut last_log = Instant::now();
    loop {
        // Each chunk must arrive within the RPC timeout; the whole stream
        // may take as long as the state needs.
        let chunk = match tokio::time::timeout(timeout, stream.message()).await {
            Ok(Ok(Some(chunk))) => chunk,
            Ok(Ok(None)) => break,
            Ok(Err(status)) => return Err(format!("snapshot stream: {}", status.message())),
            Err(_) => return Err("snapshot stream: no chunk within the timeout".into()),
        };
        if total.is_none() {
            total = Some(chunk.total_entries);
            shared
                .metrics
                .bootstrap_total_entries
                .set(chunk.total_entries as i64);
        }
        received += chunk.entries.len() as u64;
        shared
            .metrics
            .bootstrap_progress_entries
            .set(received as i64);
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
        let records: Vec<_> = chunk.entries.into_iter().map(record_from_wire).collect();
        report.bytes += records.iter().map(wire_size).sum::<usize>() as u64;
        report.entries += records.len() as u64;
        shared.apply_remote(records, "bootstrap");
    }
    if let Some(total) = total
        && received != total
    {
        return Err(format!(
            "snapshot stream ended after {received} of {total} entries"
        ));
    }
    Ok("snapshot")
}

/// Bootstrap from a peer that speaks only the original protocol. Its values
/// carry no version: they are stored with the lowest possible timestamp, so
/// any versioned write (received meanwhile or later) wins over them.
async fn pull_get_all(
    shared: &Shared,
    channel: Channel,
    report: &mut BootstrapReport,
) -> Result<&'static str, String> {
    let mut client =
        SyncClient::new(channel).max_decoding_message_size(shared.config.max_grpc_message_bytes);
    let response = match tokio::time::timeout(
        shared.config.rpc_timeout,
        client.get_all(SyncRequest { data: Vec::new() }),
    )
    .await
    {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return Err(format!("getall: {}", status.message())),
        Err(_) => return Err("getall: timed out".into()),
    };
    let node = shared.identity.node_id;
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
        shared.apply_remote(records, "bootstrap");
    }
    Ok("getall")
}
