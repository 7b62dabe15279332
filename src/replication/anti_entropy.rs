//! Anti-entropy: what makes replicas converge whatever fan-out missed
//! (partitions, pauses, restarts, overflowed queues).
//!
//! Every interval, and at once when a peer's queue overflowed, a node
//! compares its digest with every peer: one small message when the states
//! are equal; otherwise, for the buckets that differ, both sides send their
//! entries and each merges what is newer. A node that has not synced with
//! anyone for longer than the tombstone grace first resyncs in full from a
//! peer that was there all along, dropping old entries the peer no longer
//! has, instead of spreading keys that were deleted (and whose tombstones
//! were purged) while it was away.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::{Target, node_info};
use crate::metrics::label;
use crate::node::{Shared, unix_ms};
use crate::proto::podcache::{
    DigestRequest, HelloRequest, RepairRequest, SnapshotRequest, replica_client::ReplicaClient,
};
use crate::proto::{record_from_wire, record_to_wire, wire_size};
use crate::store::digest;

/// Buckets repaired in one request at most.
const BUCKETS_PER_REPAIR: usize = 16;

/// After this many rounds in a row that skipped busy buckets, a round
/// repairs them anyway (under constant write load every bucket is always
/// busy; this bounds how long a real difference can hide: about a minute
/// at the default interval).
const BUSY_ROUNDS_BEFORE_REPAIRING_ALL: u32 = 6;

/// What an exchange did.
enum Exchanged {
    /// Entries changed on both sides (0: the states were equal, or only
    /// differed by writes in flight that landed).
    Repaired(u64),
    /// Buckets that kept changing during the exchange were left to fan-out
    /// and a later round; the rest was repaired.
    LeftBusy(u64),
}

/// Runs anti-entropy until cancelled.
pub(crate) async fn anti_entropy_loop(
    shared: Arc<Shared>,
    mut repair_rx: mpsc::Receiver<String>,
    cancel: CancellationToken,
) {
    let interval = shared.config.anti_entropy_interval;
    // Spread nodes over the interval so they do not all sync at once.
    let offset =
        Duration::from_millis(shared.identity.node_id % (interval.as_millis() as u64).max(1));
    let mut next = tokio::time::Instant::now() + offset;
    loop {
        let only = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {
                next = tokio::time::Instant::now() + interval;
                None
            }
            Some(addr) = repair_rx.recv() => Some(addr),
        };
        if !shared.is_ready() {
            continue;
        }
        let targets: Vec<Target> = shared
            .replicator
            .targets()
            .into_iter()
            .filter(|t| only.as_ref().is_none_or(|addr| *addr == t.addr))
            .collect();
        if targets.is_empty() {
            if only.is_none() {
                // No peer: this node is the whole cluster, trivially in sync.
                shared.synced(unix_ms());
            }
            continue;
        }
        if shared.is_stale(unix_ms()) {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = resync(&shared, &targets) => {}
            }
            continue;
        }
        // Everything this node held when the round began is on a peer once
        // a round succeeds: that start is the time of the last full sync.
        let started = unix_ms();
        let results = tokio::select! {
            _ = cancel.cancelled() => return,
            results = join_all(targets.iter().map(|t| round(&shared, t))) => results,
        };
        if results.iter().any(|ok| *ok) {
            shared.synced(started);
        }
    }
}

/// One exchange with one peer; true when the two are known to be in sync
/// afterwards (as of the exchange).
async fn round(shared: &Shared, target: &Target) -> bool {
    let max = shared.config.max_grpc_message_bytes;
    let mut client = ReplicaClient::new(target.channel.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let timeout = shared.config.rpc_timeout;
    // Who is the peer now (and is it stale itself)?
    let hello = match tokio::time::timeout(
        timeout,
        client.hello(HelloRequest {
            sender: Some(node_info(&shared.identity)),
        }),
    )
    .await
    {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
            // A peer that speaks only the original protocol has no digest.
            return count(shared, "skipped", false);
        }
        Ok(Err(status)) => {
            debug!(peer = %target.addr, error = %status.message(), "anti-entropy: hello failed");
            return count(shared, "failed", false);
        }
        Err(_) => return count(shared, "failed", false),
    };
    target
        .state
        .record_hello(hello.node.clone(), hello.ready, hello.stale);
    if hello.stale || !hello.ready {
        // It resyncs (or bootstraps) first; its state is not to be trusted.
        return count(shared, "skipped", false);
    }
    match exchange(shared, &mut client, &target.state.busy_rounds).await {
        Ok(Exchanged::Repaired(0)) => count(shared, "equal", true),
        Ok(Exchanged::Repaired(repaired)) => {
            shared.metrics.anti_entropy_repaired.inc_by(repaired);
            debug!(peer = %target.addr, repaired, "anti-entropy repaired entries");
            count(shared, "repaired", true)
        }
        Ok(Exchanged::LeftBusy(repaired)) => {
            shared.metrics.anti_entropy_repaired.inc_by(repaired);
            // Not known to be in sync: busy buckets were not compared.
            count(shared, "busy", false)
        }
        Err(error) => {
            debug!(peer = %target.addr, %error, "anti-entropy exchange failed");
            count(shared, "failed", false)
        }
    }
}

fn count(shared: &Shared, result: &'static str, ok: bool) -> bool {
    shared
        .metrics
        .anti_entropy_rounds
        .get_or_create(&label("result", result))
        .inc();
    ok
}

/// Digest, then repair of the differing buckets.
///
/// Writes still on their way through fan-out make digests differ for a
/// moment, so the digests are compared twice, a settle time apart, and only
/// buckets that differed both times and did not change on either side in
/// between are repaired: a bucket that kept changing is being written, and
/// fan-out is delivering it. Under constant write load that can be every
/// bucket (with a 100,000-key state at tens of thousands of writes per
/// second, repairing them all each round took half the writer's CPU in the
/// profile), so busy buckets are repaired only every
/// [`BUSY_ROUNDS_BEFORE_REPAIRING_ALL`]th round.
async fn exchange(
    shared: &Shared,
    client: &mut ReplicaClient<Channel>,
    busy_rounds: &std::sync::atomic::AtomicU32,
) -> Result<Exchanged, String> {
    use std::sync::atomic::Ordering;
    let timeout = shared.config.rpc_timeout;
    let compare = |client: &mut ReplicaClient<Channel>| {
        let mine = shared.store.digest();
        let mut client = client.clone();
        async move {
            let answer = tokio::time::timeout(
                timeout,
                client.digest(DigestRequest {
                    sender: Some(node_info(&shared.identity)),
                    root: digest::root(&mine),
                }),
            )
            .await
            .map_err(|_| "digest: timed out".to_owned())?
            .map_err(|s| format!("digest: {}", s.message()))?
            .into_inner();
            // `None` when the peer says the roots are equal.
            Ok::<_, String>((mine, (!answer.equal).then_some(answer.buckets)))
        }
    };
    let (mine_before, Some(theirs_before)) = compare(client).await? else {
        busy_rounds.store(0, Ordering::Relaxed);
        return Ok(Exchanged::Repaired(0));
    };
    let settle = (shared.config.anti_entropy_interval / 4).min(Duration::from_millis(500));
    tokio::time::sleep(settle).await;
    let (mine, Some(theirs)) = compare(client).await? else {
        busy_rounds.store(0, Ordering::Relaxed);
        return Ok(Exchanged::Repaired(0));
    };
    let before: HashSet<u32> = digest::differing(&mine_before, &theirs_before)
        .into_iter()
        .collect();
    let both: Vec<u32> = digest::differing(&mine, &theirs)
        .into_iter()
        .filter(|b| before.contains(b))
        .collect();
    let quiet = |b: &u32| {
        let i = *b as usize;
        mine_before.get(i) == mine.get(i) && theirs_before.get(i) == theirs.get(i)
    };
    let busy = both.iter().filter(|b| !quiet(b)).count();
    // Counted only when something is busy (the `||` short-circuits).
    let (differing, left_busy) = if busy == 0
        || busy_rounds.fetch_add(1, Ordering::Relaxed) + 1 >= BUSY_ROUNDS_BEFORE_REPAIRING_ALL
    {
        busy_rounds.store(0, Ordering::Relaxed);
        (both, false)
    } else {
        debug!(
            busy,
            "anti-entropy: leaving buckets that are being written to fan-out"
        );
        (both.into_iter().filter(quiet).collect(), true)
    };
    let done = |repaired| {
        if left_busy {
            Exchanged::LeftBusy(repaired)
        } else {
            Exchanged::Repaired(repaired)
        }
    };
    if differing.is_empty() {
        return Ok(done(0));
    }
    let mut by_bucket = shared.store.records_by_bucket(&differing);
    let mut repaired = 0u64;
    let mut start = 0;
    while start < differing.len() {
        // Cut the buckets so one request stays within the batch size.
        let mut end = start;
        let mut records = Vec::new();
        let mut bytes = 0;
        while end < differing.len() && end - start < BUCKETS_PER_REPAIR {
            let bucket = by_bucket.remove(&differing[end]).unwrap_or_default();
            let size: usize = bucket.iter().map(wire_size).sum();
            if end > start && bytes + size > shared.config.max_batch_bytes {
                by_bucket.insert(differing[end], bucket);
                break;
            }
            bytes += size;
            records.extend(bucket);
            end += 1;
        }
        let response = tokio::time::timeout(
            timeout,
            client.repair(RepairRequest {
                sender: Some(node_info(&shared.identity)),
                buckets: differing[start..end].to_vec(),
                entries: records.iter().map(record_to_wire).collect(),
            }),
        )
        .await
        .map_err(|_| "repair: timed out".to_owned())?
        .map_err(|s| format!("repair: {}", s.message()))?
        .into_inner();
        repaired += u64::from(response.applied);
        let theirs: Vec<_> = response.entries.into_iter().map(record_from_wire).collect();
        repaired += shared.apply_remote(theirs, "anti_entropy").applied.len() as u64;
        start = end;
    }
    Ok(done(repaired))
}

/// This node has been cut off longer than the tombstone grace. Resync once,
/// in full, from the oldest peer that was running before this node lost
/// contact (it saw every delete since) and is not stale itself. If no peer
/// qualifies and none is older than this node, this node vouches for its
/// own state (logged): someone has to be the reference.
async fn resync(shared: &Shared, targets: &[Target]) {
    let last_sync = shared
        .last_full_sync_ms
        .load(std::sync::atomic::Ordering::Acquire) as i64;
    let timeout = shared.config.rpc_timeout;
    let hellos = join_all(targets.iter().map(|t| {
        let mut client = ReplicaClient::new(t.channel.clone());
        let request = HelloRequest {
            sender: Some(node_info(&shared.identity)),
        };
        async move {
            match tokio::time::timeout(timeout, client.hello(request)).await {
                Ok(Ok(answer)) => Some((t, answer.into_inner())),
                _ => None,
            }
        }
    }))
    .await;
    let answered: Vec<_> = hellos.into_iter().flatten().collect();
    let mut sources: Vec<_> = answered
        .iter()
        .filter(|(_, hello)| hello.ready && !hello.stale)
        .filter_map(|(t, hello)| Some((t, hello.node.clone()?)))
        .filter(|(_, node)| node.started_at_ms < last_sync)
        .collect();
    sources.sort_by_key(|(_, node)| (node.started_at_ms, node.node_id));
    let Some((target, _)) = sources.first() else {
        let me = (shared.identity.started_at_ms, shared.identity.node_id);
        let older_exists = answered.iter().any(|(_, hello)| {
            hello
                .node
                .as_ref()
                .is_some_and(|n| (n.started_at_ms, n.node_id) < me)
        });
        if !answered.is_empty() && !older_exists {
            warn!(
                "cut off past the tombstone grace and no peer saw the whole time; keeping this node's state as the reference"
            );
            shared.synced(unix_ms());
        }
        count(shared, "skipped", false);
        return;
    };
    info!(peer = %target.addr, "cut off past the tombstone grace; resyncing in full");
    let max = shared.config.max_grpc_message_bytes;
    let mut client = ReplicaClient::new(target.channel.clone()).max_decoding_message_size(max);
    let resync_started = unix_ms();
    match full_resync(shared, &mut client).await {
        Ok((dropped, applied)) => {
            shared.metrics.full_resyncs.inc();
            info!(peer = %target.addr, dropped, applied, "full resync done");
            shared.synced(resync_started);
            count(shared, "repaired", true);
        }
        Err(error) => {
            warn!(peer = %target.addr, %error, "full resync failed");
            count(shared, "failed", false);
        }
    }
}

/// Pulls the peer's whole state and drops local entries the peer no longer
/// has: they were deleted while this node was away, and the tombstones
/// purged. Spared are the entries this node wrote itself since its last full
/// sync, which no peer can have seen; they stay, and reach the peer through
/// the next anti-entropy round.
async fn full_resync(
    shared: &Shared,
    client: &mut ReplicaClient<Channel>,
) -> Result<(usize, usize), String> {
    let timeout = shared.config.rpc_timeout;
    let mut stream = tokio::time::timeout(
        timeout,
        client.snapshot(SnapshotRequest {
            sender: Some(node_info(&shared.identity)),
            max_chunk_bytes: shared.config.snapshot_chunk_bytes as u32,
        }),
    )
    .await
    .map_err(|_| "snapshot: timed out".to_owned())?
    .map_err(|s| format!("snapshot: {}", s.message()))?
    .into_inner();
    let mut records = Vec::new();
    loop {
        match tokio::time::timeout(timeout, stream.message()).await {
            Ok(Ok(Some(chunk))) => records.extend(chunk.entries.into_iter().map(record_from_wire)),
            Ok(Ok(None)) => break,
            Ok(Err(status)) => return Err(format!("snapshot stream: {}", status.message())),
            Err(_) => return Err("snapshot stream: no chunk within the timeout".into()),
        }
    }
    let keep: HashSet<_> = records.iter().map(|r| (r.ty, r.key())).collect();
    let last_sync = shared
        .last_full_sync_ms
        .load(std::sync::atomic::Ordering::Acquire);
    let me = shared.identity.node_id;
    let dropped = shared.store.drop_absent(&keep, |entry| {
        entry.version().node == me && crate::store::clock::hlc_ms(entry.version().hlc) >= last_sync
    });
    let applied = shared.apply_remote(records, "anti_entropy").applied.len();
    Ok((dropped, applied))
}
