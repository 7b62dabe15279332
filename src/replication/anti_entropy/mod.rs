//! Anti-entropy: what makes replicas converge whatever fan-out could not
//! deliver (a peer released after being down past the retention, writes a
//! crashed node made that reached only some, partitions healed).
//!
//! Every interval a node compares its digest with a bounded number of
//! peers (`--anti-entropy-peers`, moving on through all of them round by
//! round: `plan::partners`), and at once with a released peer that
//! answers again: one small message when the states are equal; otherwise, for the buckets that differ, both sides send their
//! entries and each merges what is newer (`plan` decides which buckets).
//! A node that has not synced with anyone for longer than the tombstone
//! grace first resyncs in full from a peer that was there all along,
//! dropping old entries the peer no longer has, instead of spreading keys
//! that were deleted (and whose tombstones were purged) while it was away.
//!
//! Owns: the exchanges of anti-entropy and full resync. Must not touch:
//! fan-out, the merge rule.

pub(crate) mod plan;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::plan::{Comparison, Plan};
use super::Target;
use super::error::ReplicationError;
use super::exchange::{SnapshotChunks, StatePeer};
use super::oldest::{Age, seniority};
use crate::identity::unix_ms;
use crate::metrics::label;
use crate::proto::podcache::{DigestRequest, RepairRequest, SnapshotRequest};
use crate::proto::{record_to_wire, records_from_wire, wire_size};
use crate::replica::Replica;
use crate::store::{Record, digest};

/// What an exchange did.
enum Exchanged {
    /// Entries changed on both sides (0: the states were equal, or only
    /// differed by writes in flight that landed).
    Repaired(u64),
    /// Buckets that kept changing during the exchange were left to fan-out
    /// and a later round; the rest was repaired.
    LeftBusy(u64),
}

/// Runs anti-entropy until cancelled, with the peers `targets` names at
/// each round (the replicator's links in production).
pub(crate) async fn anti_entropy_loop<P: StatePeer>(
    replica: Arc<Replica>,
    targets: impl Fn() -> Vec<Target<P>> + Send,
    mut repair_rx: mpsc::Receiver<String>,
    cancel: CancellationToken,
) {
    let interval = replica.config.anti_entropy_interval;
    // Spread nodes over the interval so they do not all sync at once.
    let offset =
        Duration::from_millis(replica.identity.node_id % (interval.as_millis() as u64).max(1));
    let mut next = tokio::time::Instant::now() + offset;
    let mut rounds = 0u64;
    loop {
        let only = tokio::select! {
            // Cancel first, then in order: a simulated run replays.
            biased;
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {
                next = tokio::time::Instant::now() + interval;
                None
            }
            Some(addr) = repair_rx.recv() => Some(addr),
        };
        if !replica.is_ready() {
            continue;
        }
        let mut targets: Vec<Target<P>> = targets()
            .into_iter()
            .filter(|t| only.as_ref().is_none_or(|addr| *addr == t.addr))
            .collect();
        if only.is_none() && !replica.is_stale(unix_ms()) {
            // A bounded number of partners per round (see `plan::partners`).
            targets.sort_by(|a, b| a.addr.cmp(&b.addr));
            let picked = plan::partners(
                targets.len(),
                replica.config.anti_entropy_peers,
                replica.identity.node_id,
                rounds,
            );
            rounds += 1;
            let mut chosen = Vec::with_capacity(picked.len());
            for (i, target) in targets.into_iter().enumerate() {
                if picked.contains(&i) {
                    chosen.push(target);
                }
            }
            targets = chosen;
        }
        if targets.is_empty() {
            if only.is_none() {
                // No peer: this node is the whole cluster, trivially in sync.
                replica.synced(unix_ms());
            }
            continue;
        }
        if replica.is_stale(unix_ms()) {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = resync(&replica, &targets) => {}
            }
            continue;
        }
        // Everything this node held when the round began is on a peer once
        // a round succeeds: that start is the time of the last full sync.
        let started = unix_ms();
        let results = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            results = join_all(targets.iter().map(|t| round(&replica, t))) => results,
        };
        if results.iter().any(|ok| *ok) {
            replica.synced(started);
        }
    }
}

/// The start of a node that came back with its own state (its data
/// directory): instead of pulling a whole snapshot it compares digests
/// with every reachable, ready peer and repairs what differs, both ways,
/// so it pulls only what changed while it was away. A node whose state is
/// older than the tombstone grace resyncs in full instead (see `resync`).
/// Peers that are not ready (all of them, when the whole cluster restarts)
/// are left to the regular rounds once everyone is ready.
pub(crate) async fn join<P: StatePeer>(
    replica: &Replica,
    targets: Vec<Target<P>>,
) -> crate::replica::BootstrapReport {
    let started = tokio::time::Instant::now();
    let repaired_before = replica.metrics.anti_entropy_repaired.get();
    let mut synced = Vec::new();
    if replica.is_stale(unix_ms()) {
        resync(replica, &targets).await;
    } else {
        let results = join_all(targets.iter().map(|t| round(replica, t))).await;
        synced = targets
            .iter()
            .zip(results)
            .filter(|(_, ok)| *ok)
            .map(|(t, _)| t.addr.clone())
            .collect();
    }
    let repaired = replica.metrics.anti_entropy_repaired.get() - repaired_before;
    info!(
        peers = synced.len(),
        repaired, "joined with the state from the data directory"
    );
    crate::replica::BootstrapReport {
        source: synced.first().cloned(),
        source_name: None,
        method: "digest",
        entries: repaired,
        bytes: 0,
        duration: started.elapsed(),
        failed_attempts: Vec::new(),
    }
}

/// One exchange with one peer; true when the two are known to be in sync
/// afterwards (as of the exchange).
async fn round<P: StatePeer>(replica: &Replica, target: &Target<P>) -> bool {
    // Who is the peer now (and is it stale itself)?
    let hello = match target.peer.hello(&replica.identity.to_wire()).await {
        Ok(hello) => hello,
        // A peer that speaks only the original protocol has no digest.
        Err(e) if e.is_unimplemented() => return count(replica, "skipped", false),
        Err(error) => {
            debug!(peer = %target.addr, %error, "anti-entropy: hello failed");
            return count(replica, "failed", false);
        }
    };
    target
        .state
        .record_hello(hello.node.clone(), hello.ready, hello.stale);
    if hello.stale || !hello.ready {
        // It resyncs (or bootstraps) first; its state is not to be trusted.
        return count(replica, "skipped", false);
    }
    match exchange(replica, target).await {
        Ok(Exchanged::Repaired(0)) => count(replica, "equal", true),
        Ok(Exchanged::Repaired(repaired)) => {
            replica.metrics.anti_entropy_repaired.inc_by(repaired);
            debug!(peer = %target.addr, repaired, "anti-entropy repaired entries");
            count(replica, "repaired", true)
        }
        Ok(Exchanged::LeftBusy(repaired)) => {
            replica.metrics.anti_entropy_repaired.inc_by(repaired);
            // Not known to be in sync: busy buckets were not compared.
            count(replica, "busy", false)
        }
        Err(error) => {
            debug!(peer = %target.addr, %error, "anti-entropy exchange failed");
            count(replica, "failed", false)
        }
    }
}

fn count(replica: &Replica, result: &'static str, ok: bool) -> bool {
    replica
        .metrics
        .anti_entropy_rounds
        .get_or_create(&label("result", result))
        .inc();
    ok
}

/// Both digests at one moment; the peer's is `None` when it says the roots
/// are equal.
async fn compare(
    replica: &Replica,
    peer: &impl StatePeer,
) -> Result<(Vec<u64>, Option<Vec<u64>>), ReplicationError> {
    let mine = replica.store.digest();
    let request = DigestRequest {
        sender: Some(replica.identity.to_wire()),
        root: digest::root(&mine),
    };
    let answer = peer.digest(request).await?;
    Ok((mine, (!answer.equal).then_some(answer.buckets)))
}

/// Digest twice, a settle time apart, then repair of the buckets the plan
/// names.
async fn exchange<P: StatePeer>(
    replica: &Replica,
    target: &Target<P>,
) -> Result<Exchanged, ReplicationError> {
    let busy_rounds = &target.state.busy_rounds;
    let (mine_before, Some(theirs_before)) = compare(replica, &target.peer).await? else {
        busy_rounds.store(0, Ordering::Relaxed);
        return Ok(Exchanged::Repaired(0));
    };
    let settle = (replica.config.anti_entropy_interval / 4).min(Duration::from_millis(500));
    tokio::time::sleep(settle).await;
    let (mine, Some(theirs)) = compare(replica, &target.peer).await? else {
        busy_rounds.store(0, Ordering::Relaxed);
        return Ok(Exchanged::Repaired(0));
    };
    let Plan {
        repair,
        left_busy,
        busy_rounds: rounds,
    } = plan::plan(
        Comparison {
            mine: &mine_before,
            theirs: &theirs_before,
        },
        Comparison {
            mine: &mine,
            theirs: &theirs,
        },
        busy_rounds.load(Ordering::Relaxed),
    );
    busy_rounds.store(rounds, Ordering::Relaxed);
    if left_busy {
        debug!(peer = %target.addr, "anti-entropy: leaving buckets that are being written to fan-out");
    }
    let done = |repaired| {
        if left_busy {
            Exchanged::LeftBusy(repaired)
        } else {
            Exchanged::Repaired(repaired)
        }
    };
    if repair.is_empty() {
        return Ok(done(0));
    }
    let mut by_bucket = replica.store.records_by_bucket(&repair);
    let sizes: Vec<usize> = repair
        .iter()
        .map(|b| {
            by_bucket
                .get(b)
                .map_or(0, |records| records.iter().map(wire_size).sum())
        })
        .collect();
    // A batch is one change: the buckets holding this node's batch
    // entries go in one request (while that stays within a few requests'
    // bytes), so the peer merges each batch whole, and what the peer
    // answers is applied once for the round, so this node does too.
    let max_bytes = replica.config.max_batch_bytes;
    // A request (and its answer) must stay within the gRPC message limit.
    let whole_batches = (4 * max_bytes).min(replica.config.max_grpc_message_bytes / 2);
    let (batched, single): (Vec<usize>, Vec<usize>) = (0..repair.len()).partition(|&i| {
        by_bucket
            .get(&repair[i])
            .is_some_and(|records| records.iter().any(|r| r.entry.in_batch()))
    });
    let batched_bytes: usize = batched.iter().map(|&i| sizes[i]).sum();
    let mut groups: Vec<Vec<u32>> = Vec::new();
    let rest = if !batched.is_empty() && batched_bytes <= whole_batches {
        groups.push(batched.iter().map(|&i| repair[i]).collect());
        single
    } else {
        (0..repair.len()).collect()
    };
    let rest_sizes: Vec<usize> = rest.iter().map(|&i| sizes[i]).collect();
    for range in plan::group(&rest_sizes, max_bytes) {
        groups.push(rest[range].iter().map(|&i| repair[i]).collect());
    }
    let mut repaired = 0u64;
    let mut theirs: Vec<Record> = Vec::new();
    let mut theirs_bytes = 0;
    for buckets in groups {
        let records: Vec<_> = buckets
            .iter()
            .flat_map(|b| by_bucket.remove(b).unwrap_or_default())
            .collect();
        let request = RepairRequest {
            sender: Some(replica.identity.to_wire()),
            buckets,
            entries: records.iter().map(record_to_wire).collect(),
        };
        let response = match target.peer.repair(request).await {
            Ok(response) => response,
            Err(error) => {
                // What earlier requests of the round brought is kept.
                replica.apply_remote(theirs, "anti_entropy");
                return Err(error);
            }
        };
        repaired += u64::from(response.applied);
        let more = records_from_wire(response.entries);
        theirs_bytes += more.iter().map(wire_size).sum::<usize>();
        theirs.extend(more);
        if theirs_bytes > whole_batches {
            // Bounded: a large repair is applied as it goes.
            repaired += replica
                .apply_remote(std::mem::take(&mut theirs), "anti_entropy")
                .outcome
                .applied
                .len() as u64;
            theirs_bytes = 0;
        }
    }
    if !theirs.is_empty() {
        repaired += replica
            .apply_remote(theirs, "anti_entropy")
            .outcome
            .applied
            .len() as u64;
    }
    Ok(done(repaired))
}

/// This node has been cut off longer than the tombstone grace. Resync once,
/// in full, from the oldest peer that was running before this node lost
/// contact (it saw every delete since) and is not stale itself. If no peer
/// qualifies and none is older than this node, this node vouches for its
/// own state (logged): someone has to be the reference.
async fn resync<P: StatePeer>(replica: &Replica, targets: &[Target<P>]) {
    let last_sync = replica.last_full_sync_ms() as i64;
    let sender = replica.identity.to_wire();
    let hellos = join_all(targets.iter().map(|t| {
        let sender = &sender;
        async move { t.peer.hello(sender).await.ok().map(|answer| (t, answer)) }
    }))
    .await;
    let answered: Vec<_> = hellos.into_iter().flatten().collect();
    let age = |t: &Target<P>, node: &crate::proto::podcache::NodeInfo| {
        let (discovered, _) = t.state.ages();
        seniority(&Age {
            discovered_ms: discovered,
            own_ms: Some(node.started_at_ms),
            node_id: Some(node.node_id),
            addr: &t.addr,
        })
    };
    let mut sources: Vec<_> = answered
        .iter()
        .filter(|(_, hello)| hello.ready && !hello.stale)
        .filter_map(|(t, hello)| Some((*t, hello.node.as_ref()?)))
        .filter(|(t, node)| age(t, node).0 < last_sync)
        .collect();
    sources.sort_by_key(|(t, node)| age(t, node));
    let Some((target, _)) = sources.first() else {
        let me = seniority(&Age {
            discovered_ms: None,
            own_ms: Some(replica.identity.started_at_ms),
            node_id: Some(replica.identity.node_id),
            addr: &replica.identity.grpc_addr,
        });
        let older_exists = answered
            .iter()
            .any(|(t, hello)| hello.node.as_ref().is_some_and(|n| age(t, n) < me));
        if !answered.is_empty() && !older_exists {
            warn!(
                "cut off past the tombstone grace and no peer saw the whole time; keeping this node's state as the reference"
            );
            replica.synced(unix_ms());
        }
        count(replica, "skipped", false);
        return;
    };
    info!(peer = %target.addr, "cut off past the tombstone grace; resyncing in full");
    let resync_started = unix_ms();
    match full_resync(replica, &target.peer).await {
        Ok((dropped, applied)) => {
            replica.metrics.full_resyncs.inc();
            info!(peer = %target.addr, dropped, applied, "full resync done");
            replica.synced(resync_started);
            count(replica, "repaired", true);
        }
        Err(error) => {
            warn!(peer = %target.addr, %error, "full resync failed");
            count(replica, "failed", false);
        }
    }
}

/// Pulls the peer's whole state and drops local entries the peer no longer
/// has: they were deleted while this node was away, and the tombstones
/// purged. Spared are the entries this node wrote itself since its last full
/// sync, which no peer can have seen; they stay, and reach the peer through
/// the next anti-entropy round.
async fn full_resync(
    replica: &Replica,
    peer: &impl StatePeer,
) -> Result<(usize, usize), ReplicationError> {
    let request = SnapshotRequest {
        sender: Some(replica.identity.to_wire()),
        max_chunk_bytes: replica.config.snapshot_chunk_bytes as u32,
    };
    let mut chunks = peer.snapshot(request).await?;
    let mut records = Vec::new();
    while let Some(chunk) = chunks.next().await? {
        records.extend(records_from_wire(chunk.entries));
    }
    let keep: HashSet<_> = records.iter().map(|r| (r.ty, r.key())).collect();
    let last_sync = replica.last_full_sync_ms();
    let me = replica.identity.node_id;
    let dropped = replica.drop_absent(&keep, |entry| {
        entry.version().node == me && crate::store::clock::hlc_ms(entry.version().hlc) >= last_sync
    });
    let applied = replica
        .apply_remote(records, "anti_entropy")
        .outcome
        .applied
        .len();
    Ok((dropped, applied))
}
