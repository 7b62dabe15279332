//! The gauges computed from the node's state at each scrape: sizes per
//! type (the largest only, the rest summed), held and kept bytes, and
//! what is pending for each peer.
//!
//! Owns: how a [`StateReading`] becomes those gauges, and the bound on the
//! series it makes. Must not touch: the store, the peer links, HTTP: the
//! caller reads the state (`Replica::render_metrics`)
//! and passes it in, so that metrics stays below every module it counts.

use super::{Metrics, label};

/// Types with series of their own in `/metrics` (the largest).
const PER_TYPE_SERIES: usize = 50;

/// What one type holds.
#[derive(Debug, Clone, Copy, Default)]
pub struct TypeSizes {
    /// Live entries (not tombstones, not expired).
    pub entries: usize,
    /// Tombstones and expired entries still held for replication.
    pub tombstones: usize,
    /// Bytes of keys and live values.
    pub bytes: usize,
}

/// What is waiting for one peer.
#[derive(Debug, Clone)]
pub struct PeerBacklog {
    /// The peer's gRPC address (the `peer` label).
    pub peer: String,
    /// Writes waiting for it.
    pub entries: u64,
    /// Bytes of keys and values waiting for it.
    pub bytes: u64,
}

/// The node's state as a scrape reads it.
#[derive(Debug, Clone, Default)]
pub struct StateReading {
    /// Every type held, with its sizes.
    pub types: Vec<(i32, TypeSizes)>,
    /// Bytes of keys and values held.
    pub held_bytes: usize,
    /// The configured limit on held bytes.
    pub capacity_bytes: usize,
    /// Superseded versions kept as history.
    pub history_versions: usize,
    /// What the kept versions are counted as.
    pub history_bytes: usize,
    /// What is pending for each peer.
    pub peers: Vec<PeerBacklog>,
}

impl Metrics {
    /// Refreshes the gauges computed from state to `state`, then renders
    /// every metric (as [`Metrics::render`]).
    pub fn render_with(&self, state: StateReading) -> String {
        let StateReading {
            types: mut stats,
            held_bytes,
            capacity_bytes,
            history_versions,
            history_bytes,
            peers,
        } = state;
        // One series per type for the largest types only, the rest summed as
        // type="other": what a scrape holds stays bounded whatever types
        // clients write.
        stats.sort_by_key(|(ty, s)| (std::cmp::Reverse(s.entries + s.tombstones), *ty));
        for family in [&self.entries, &self.bytes, &self.tombstones] {
            family.clear();
        }
        let mut other = TypeSizes::default();
        for (i, (ty, s)) in stats.iter().enumerate() {
            if i < PER_TYPE_SERIES {
                let ty = label("type", ty.to_string());
                self.entries.get_or_create(&ty).set(s.entries as i64);
                self.bytes.get_or_create(&ty).set(s.bytes as i64);
                self.tombstones.get_or_create(&ty).set(s.tombstones as i64);
            } else {
                other.entries += s.entries;
                other.bytes += s.bytes;
                other.tombstones += s.tombstones;
            }
        }
        if stats.len() > PER_TYPE_SERIES {
            let ty = label("type", "other");
            self.entries.get_or_create(&ty).set(other.entries as i64);
            self.bytes.get_or_create(&ty).set(other.bytes as i64);
            self.tombstones
                .get_or_create(&ty)
                .set(other.tombstones as i64);
        }
        self.types.set(stats.len() as i64);
        self.held_bytes.set(held_bytes as i64);
        self.capacity_bytes.set(capacity_bytes as i64);
        self.history_versions.set(history_versions as i64);
        self.history_bytes.set(history_bytes as i64);
        for peer in peers {
            let peer_label = label("peer", peer.peer);
            self.pending_entries
                .get_or_create(&peer_label)
                .set(peer.entries as i64);
            self.pending_bytes
                .get_or_create(&peer_label)
                .set(peer.bytes as i64);
        }
        self.render()
    }
}
