//! What a node answers to a peer's exchanges: who it is (`Hello`), its
//! digest, a repair of some buckets, and the chunks of a snapshot. The gRPC handlers
//! ([`crate::rpc`]) only adapt these; the protocol's simulation
//! (`super::sim`) calls them for its simulated peers, so both run the same
//! answers.
//!
//! Owns: checking an exchange's request and building its answer from the
//! replica. Must not touch: transport concerns (permits, streams, gRPC
//! sizes), the merge rule (the store decides; a repair's entries take the
//! replica's remote write path).

use std::collections::{HashMap, HashSet};

use tonic::Status;
use tracing::debug;

use crate::identity::unix_ms;
use crate::proto::podcache::{
    DigestRequest, DigestResponse, HelloResponse, RepairRequest, RepairResponse, SnapshotChunk,
};
use crate::proto::{record_from_wire, record_to_wire, wire_size};
use crate::replica::Replica;
use crate::store::{Record, digest};

/// A node cut off for longer than the tombstone grace may hold entries
/// deleted (and purged) elsewhere: it takes no part in anti-entropy until
/// it has resynced, so it cannot spread them back.
fn refuse_while_stale(replica: &Replica) -> Result<(), Status> {
    if replica.is_stale(unix_ms()) {
        return Err(Status::failed_precondition(
            "this node was cut off longer than the tombstone grace and is resyncing",
        ));
    }
    Ok(())
}

/// The answer to `Hello`: who this node is, whether it is ready and
/// whether it is stale.
pub(crate) fn hello(replica: &Replica) -> HelloResponse {
    HelloResponse {
        node: Some(replica.identity.to_wire()),
        ready: replica.is_ready(),
        stale: replica.is_stale(unix_ms()),
    }
}

/// The answer to `Digest`: equal, or this node's bucket digests.
pub(crate) fn digest(replica: &Replica, request: &DigestRequest) -> Result<DigestResponse, Status> {
    if request.sender.is_none() {
        return Err(Status::invalid_argument(
            "digest: the sender must name itself",
        ));
    }
    refuse_while_stale(replica)?;
    let buckets = replica.store.digest();
    if digest::root(&buckets) == request.root {
        return Ok(DigestResponse {
            equal: true,
            buckets: Vec::new(),
        });
    }
    Ok(DigestResponse {
        equal: false,
        buckets,
    })
}

/// The answer to `Repair`: the peer's entries of the named buckets are
/// merged, and this node's entries of those buckets that the peer lacks or
/// holds older go back (not those about to be purged).
pub(crate) fn repair(replica: &Replica, request: RepairRequest) -> Result<RepairResponse, Status> {
    let Some(sender) = request.sender else {
        return Err(Status::invalid_argument(
            "repair: the sender must name itself",
        ));
    };
    refuse_while_stale(replica)?;
    if request.buckets.len() > digest::BUCKETS
        || request
            .buckets
            .iter()
            .any(|b| *b as usize >= digest::BUCKETS)
    {
        return Err(Status::invalid_argument(format!(
            "repair: buckets must be fewer than {} and below it",
            digest::BUCKETS
        )));
    }
    let buckets: HashSet<u32> = request.buckets.iter().copied().collect();
    let mut records = Vec::with_capacity(request.entries.len());
    for entry in request.entries {
        let record = record_from_wire(entry);
        // Entries outside the named buckets have no business here.
        if !buckets.contains(&(digest::bucket_of(record.ty, record.key().as_bytes()) as u32)) {
            return Err(Status::invalid_argument(
                "repair: an entry lies outside the buckets being repaired",
            ));
        }
        records.push(record);
    }
    // What the peer sent (shared with the merge below, not copied).
    let sent = records.clone();
    let theirs: HashMap<(i32, &str), crate::store::Version> = sent
        .iter()
        .map(|r| ((r.ty, r.key()), r.entry.version()))
        .collect();
    let outcome = replica.apply_remote(records, "anti_entropy").outcome;
    let mine = replica.store.bucket_records(&request.buckets);
    let horizon = replica.purge_horizon(unix_ms());
    let entries: Vec<_> = mine
        .iter()
        .filter(|r| {
            theirs
                .get(&(r.ty, r.key()))
                .is_none_or(|v| *v < r.entry.version())
        })
        .filter(|r| !crate::store::is_purgeable(&r.entry, horizon))
        .map(record_to_wire)
        .collect();
    debug!(peer = %sender.name, sent = entries.len(), applied = outcome.applied.len(), "repair");
    Ok(RepairResponse {
        entries,
        applied: outcome.applied.len() as u32,
    })
}

/// The chunk size a snapshot is served in: what the caller asked for
/// within bounds (0: this node's default). `Err` while this node is still
/// getting its own state: it would hand out part of it.
pub(crate) fn snapshot_chunk_bytes(replica: &Replica, asked: u32) -> Result<usize, Status> {
    let config = &replica.config;
    let chunk_bytes = match asked as usize {
        0 => config.snapshot_chunk_bytes,
        asked => asked.clamp(64 * 1024, config.max_grpc_message_bytes / 2),
    };
    if !replica.is_ready() {
        return Err(Status::unavailable(
            "this node is still getting its own state; pull from a ready peer",
        ));
    }
    Ok(chunk_bytes)
}

/// A snapshot (taken at once, sharing keys and values with the store)
/// encoded chunk by chunk as the caller reads: each chunk holds at least
/// `chunk_bytes` of entries but the last; the first says how many entries
/// there are in all; an empty state is one empty chunk.
pub(crate) struct Chunks {
    records: std::vec::IntoIter<Record>,
    total: u64,
    chunk_bytes: usize,
    first: bool,
}

impl Chunks {
    pub(crate) fn new(records: Vec<Record>, chunk_bytes: usize) -> Self {
        Self {
            total: records.len() as u64,
            records: records.into_iter(),
            chunk_bytes,
            first: true,
        }
    }
}

impl Iterator for Chunks {
    type Item = SnapshotChunk;

    fn next(&mut self) -> Option<SnapshotChunk> {
        let mut chunk = SnapshotChunk {
            entries: Vec::new(),
            total_entries: if self.first { self.total } else { 0 },
        };
        let mut bytes = 0;
        for record in self.records.by_ref() {
            bytes += wire_size(&record);
            chunk.entries.push(record_to_wire(&record));
            if bytes >= self.chunk_bytes {
                break;
            }
        }
        if chunk.entries.is_empty() && !(self.first && self.total == 0) {
            return None;
        }
        self.first = false;
        Some(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Version;

    fn records(n: usize) -> Vec<Record> {
        (0..n)
            .map(|i| {
                Record::new(
                    1,
                    &format!("k{i}"),
                    Some("v"),
                    Version { hlc: 1, node: 1 },
                    0,
                )
            })
            .collect()
    }

    #[test]
    fn chunks_hold_every_entry_once_with_the_total_in_the_first() {
        let size = wire_size(&records(1)[0]);
        let chunks: Vec<SnapshotChunk> = Chunks::new(records(10), 3 * size).collect();
        // 3 + 3 + 3 + 1: a chunk closes once it reached the bound.
        let lens: Vec<usize> = chunks.iter().map(|c| c.entries.len()).collect();
        assert_eq!(lens, [3, 3, 3, 1]);
        let totals: Vec<u64> = chunks.iter().map(|c| c.total_entries).collect();
        assert_eq!(totals, [10, 0, 0, 0]);
    }

    #[test]
    fn an_empty_state_is_one_empty_chunk() {
        let chunks: Vec<SnapshotChunk> = Chunks::new(Vec::new(), 1024).collect();
        assert_eq!(chunks.len(), 1);
        assert!(chunks[0].entries.is_empty());
        assert_eq!(chunks[0].total_entries, 0);
    }

    #[test]
    fn an_exact_fit_ends_without_an_empty_chunk() {
        let size = wire_size(&records(1)[0]);
        let lens: Vec<usize> = Chunks::new(records(4), 2 * size)
            .map(|c| c.entries.len())
            .collect();
        assert_eq!(lens, [2, 2]);
    }
}
