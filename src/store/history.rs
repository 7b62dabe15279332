//! The versions a node saw of each key before its current one: what
//! `GET .../history` answers and a rollback writes again.
//!
//! Owns: the bound per key (`--history-versions`) and in all
//! (`--history-max-bytes`, oldest dropped first), and the order of a key's
//! versions. Must not touch: the current entries (the store's state keeps
//! those and hands over what they supersede), the merge rule, files.
//!
//! A version is kept once, whatever order versions arrive in (a peer's
//! older write after a newer one is still a version of the key), so the
//! history of a key is sorted by version and has no duplicates. Entries
//! are shared with the store (a pointer), never copied.

use std::collections::VecDeque;
use std::hash::BuildHasher;

use hashbrown::HashTable;

use super::{Entry, Record, Version};

/// Bytes a kept version costs beyond its key and value: the entry's
/// header and the two slots that point at it (measured in the bench's
/// memory rows, rounded up).
const OVERHEAD: usize = 96;

/// Superseded versions by key, bounded.
#[derive(Debug)]
pub(crate) struct History {
    /// Per key of each namespace: its superseded versions, oldest first.
    keys: HashTable<(i32, VecDeque<Entry>)>,
    /// Every version kept, in the order it was kept: the oldest is dropped
    /// first when the byte bound is passed. May name versions already
    /// dropped by the per-key bound; those are skipped, and the queue is
    /// compacted when they make up half of it.
    order: VecDeque<(i32, Entry)>,
    hasher: hashbrown::DefaultHashBuilder,
    /// Versions kept.
    kept: usize,
    /// What they cost, counted as [`History::cost`].
    bytes: usize,
    max_versions: usize,
    max_bytes: usize,
}

impl History {
    /// A history of up to `max_versions` per key and `max_bytes` in all;
    /// 0 versions keeps none.
    pub(crate) fn new(max_versions: usize, max_bytes: usize) -> Self {
        Self {
            keys: HashTable::new(),
            order: VecDeque::new(),
            hasher: Default::default(),
            kept: 0,
            bytes: 0,
            max_versions,
            max_bytes,
        }
    }

    fn cost(entry: &Entry) -> usize {
        entry.size() + OVERHEAD
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Keeps `entry`, a version of its key that is not (or no longer) the
    /// current one. A version already kept is not kept twice.
    pub(crate) fn keep(&mut self, ty: i32, entry: &Entry) {
        if self.max_versions == 0 || Self::cost(entry) > self.max_bytes {
            return;
        }
        let hash = self.hash(entry.key_bytes());
        let hasher = &self.hasher;
        let mut slot = self
            .keys
            .entry(
                hash,
                |(t, v)| {
                    *t == ty
                        && v.front()
                            .is_some_and(|e| e.key_bytes() == entry.key_bytes())
                },
                |(_, v)| v.front().map_or(0, |e| hasher.hash_one(e.key_bytes())),
            )
            .or_insert_with(|| (ty, VecDeque::new()));
        let versions = &mut slot.get_mut().1;
        let at = versions.partition_point(|e| e.version() < entry.version());
        if versions
            .get(at)
            .is_some_and(|e| e.version() == entry.version())
        {
            return;
        }
        versions.insert(at, entry.clone());
        self.kept += 1;
        self.bytes += Self::cost(entry);
        let mut dropped = None;
        if versions.len() > self.max_versions {
            dropped = versions.pop_front();
        }
        if let Some(old) = dropped {
            self.kept -= 1;
            self.bytes = self.bytes.saturating_sub(Self::cost(&old));
        }
        self.order.push_back((ty, entry.clone()));
        while self.bytes > self.max_bytes {
            let Some((ty, oldest)) = self.order.pop_front() else {
                break;
            };
            self.forget(ty, &oldest);
        }
        if self.order.len() > 64 && self.order.len() > 2 * self.kept {
            self.compact_order();
        }
    }

    /// Drops `entry`'s version of its key if it is still kept.
    fn forget(&mut self, ty: i32, entry: &Entry) {
        let hash = self.hash(entry.key_bytes());
        let Ok(mut slot) = self.keys.find_entry(hash, |(t, v)| {
            *t == ty
                && v.front()
                    .is_some_and(|e| e.key_bytes() == entry.key_bytes())
        }) else {
            return;
        };
        let versions = &mut slot.get_mut().1;
        let Some(at) = versions.iter().position(|e| e.version() == entry.version()) else {
            return;
        };
        let removed = versions.remove(at);
        self.kept -= 1;
        // What was counted for the copy kept (a faulty peer's tie can hold
        // another entry of the same version than the queue names).
        self.bytes = self
            .bytes
            .saturating_sub(removed.as_ref().map_or(0, Self::cost));
        if versions.is_empty() {
            slot.remove();
        }
    }

    fn compact_order(&mut self) {
        let order = std::mem::take(&mut self.order);
        self.order = order
            .into_iter()
            .filter(|(ty, e)| {
                self.find(*ty, e.key())
                    .is_some_and(|v| v.iter().any(|k| k.version() == e.version()))
            })
            .collect();
    }

    fn find(&self, ty: i32, key: &str) -> Option<&VecDeque<Entry>> {
        let hash = self.hash(key.as_bytes());
        self.keys
            .find(hash, |(t, v)| {
                *t == ty && v.front().is_some_and(|e| e.key_bytes() == key.as_bytes())
            })
            .map(|(_, v)| v)
    }

    /// The kept versions of one key, newest first.
    pub(crate) fn versions(&self, ty: i32, key: &str) -> Vec<Entry> {
        self.find(ty, key)
            .map(|v| v.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    /// One kept version of a key.
    pub(crate) fn version(&self, ty: i32, key: &str, version: Version) -> Option<Entry> {
        self.find(ty, key)?
            .iter()
            .find(|e| e.version() == version)
            .cloned()
    }

    /// Every kept version, for the data directory's snapshot.
    pub(crate) fn records(&self) -> Vec<Record> {
        let mut records = Vec::with_capacity(self.kept);
        for (ty, versions) in &self.keys {
            records.extend(versions.iter().map(|entry| Record {
                ty: *ty,
                entry: entry.clone(),
            }));
        }
        records
    }

    /// Versions kept, and what they cost in bytes.
    pub(crate) fn size(&self) -> (usize, usize) {
        (self.kept, self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: &str, hlc: u64) -> Entry {
        Entry::new(key, Some(value), Version { hlc, node: 1 }, 0)
    }

    fn values(h: &History, key: &str) -> Vec<u64> {
        h.versions(1, key).iter().map(|e| e.version().hlc).collect()
    }

    #[test]
    fn versions_are_sorted_newest_first_once_each_and_bounded_per_key() {
        let mut h = History::new(3, usize::MAX);
        for hlc in [5, 1, 3, 3, 4, 2] {
            h.keep(1, &entry("k", "v", hlc));
        }
        assert_eq!(values(&h, "k"), [5, 4, 3], "the two oldest dropped");
        assert_eq!(h.size().0, 3);
        assert!(h.version(1, "k", Version { hlc: 4, node: 1 }).is_some());
        assert!(h.version(1, "k", Version { hlc: 1, node: 1 }).is_none());
        assert!(h.versions(2, "k").is_empty(), "another namespace");
    }

    #[test]
    fn the_byte_bound_drops_the_oldest_kept_first_across_keys() {
        let cost = History::cost(&entry("a", "v", 1));
        let mut h = History::new(10, 3 * cost);
        h.keep(1, &entry("a", "v", 1));
        h.keep(1, &entry("b", "v", 2));
        h.keep(1, &entry("a", "v", 3));
        h.keep(1, &entry("b", "v", 4));
        assert_eq!(values(&h, "a"), [3]);
        assert_eq!(values(&h, "b"), [4, 2]);
        assert_eq!(h.size(), (3, 3 * cost));
        let mut records: Vec<u64> = h.records().iter().map(|r| r.entry.version().hlc).collect();
        records.sort_unstable();
        assert_eq!(records, [2, 3, 4]);
    }

    #[test]
    fn the_order_queue_stays_bounded_when_one_key_is_written_over_and_over() {
        let mut h = History::new(2, usize::MAX);
        for hlc in 0..10_000 {
            h.keep(1, &entry("k", "v", hlc));
        }
        assert_eq!(values(&h, "k"), [9_999, 9_998]);
        assert!(h.order.len() <= 2 * h.kept + 65, "{}", h.order.len());
    }

    #[test]
    fn no_history_keeps_nothing() {
        let mut h = History::new(0, usize::MAX);
        h.keep(1, &entry("k", "v", 1));
        assert_eq!(h.size(), (0, 0));
    }
}
