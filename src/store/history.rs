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

use hashbrown::HashTable;

use super::{Entry, Record, Version};

/// Bytes a kept version costs beyond its key and value: the entry's
/// header and the two slots that point at it (measured in the bench's
/// memory rows, rounded up).
const OVERHEAD: usize = 96;

/// One key's kept versions. The key's hash and each version sit beside
/// the entries, so finding a key and ordering its versions read this slot
/// only, not the entries (a cache miss each: every write that supersedes
/// a version pays for what this touches, under the store's lock; reading
/// the entry's key to compare was most of the cost, measured with perf).
/// A key is found by its namespace and 64-bit hash alone: two keys of one
/// namespace with the same hash share a slot (and its per-key bound), and
/// reads keep only the entries of the key asked for.
#[derive(Debug)]
struct Key {
    ty: i32,
    hash: u64,
    /// Oldest first; never empty while in the table.
    versions: VecDeque<(Version, Entry)>,
}

/// A kept version in the order it was kept, named without its entry.
#[derive(Debug)]
struct Kept {
    ty: i32,
    hash: u64,
    version: Version,
}

/// Superseded versions by key, bounded.
#[derive(Debug)]
pub(crate) struct History {
    keys: HashTable<Key>,
    /// Every version kept, in the order it was kept: the oldest is dropped
    /// first when the byte bound is passed. May name versions already
    /// dropped by the per-key bound; those are skipped, and the queue is
    /// compacted when they make up half of it.
    order: VecDeque<Kept>,
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
            kept: 0,
            bytes: 0,
            max_versions,
            max_bytes,
        }
    }

    fn cost(entry: &Entry) -> usize {
        entry.size() + OVERHEAD
    }

    /// Keeps `entry`, a version of its key that is not (or no longer) the
    /// current one; `hash` is its key's hash (the store's). A version
    /// already kept is not kept twice.
    pub(crate) fn keep(&mut self, ty: i32, hash: u64, entry: Entry) {
        if self.max_versions == 0 || Self::cost(&entry) > self.max_bytes {
            return;
        }
        let slot = self
            .keys
            .entry(hash, |k| k.ty == ty && k.hash == hash, |k| k.hash)
            .or_insert_with(|| Key {
                ty,
                hash,
                versions: VecDeque::new(),
            });
        let versions = &mut slot.into_mut().versions;
        let version = entry.version();
        // Versions mostly arrive in order: the newest goes last, and only
        // a late one searches (a binary search reads several cache lines
        // of the slot's versions; the last one is one).
        let mut at = if versions.back().is_none_or(|(v, _)| *v < version) {
            versions.len()
        } else {
            let at = versions.partition_point(|(v, _)| *v < version);
            if versions.get(at).is_some_and(|(v, _)| *v == version) {
                return;
            }
            at
        };
        if versions.len() >= self.max_versions {
            if at == 0 {
                // Older than all the key keeps, and it keeps all it may.
                return;
            }
            // Room first, so a full key's buffer never grows past the
            // bound (one more would double its capacity).
            if let Some((_, old)) = versions.pop_front() {
                self.kept -= 1;
                self.bytes = self.bytes.saturating_sub(Self::cost(&old));
            }
            at -= 1;
        }
        self.kept += 1;
        self.bytes += Self::cost(&entry);
        versions.insert(at, (version, entry));
        self.order.push_back(Kept { ty, hash, version });
        while self.bytes > self.max_bytes {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.forget(&oldest);
        }
        if self.order.len() > 64 && self.order.len() > 2 * self.kept {
            self.compact_order();
        }
    }

    /// The slot holding `kept`'s version, if it is still kept.
    fn find_kept(&self, kept: &Kept) -> Option<&Key> {
        self.keys.find(kept.hash, |k| {
            k.ty == kept.ty
                && k.hash == kept.hash
                && k.versions.iter().any(|(v, _)| *v == kept.version)
        })
    }

    /// Drops `kept`'s version of its key if it is still kept.
    fn forget(&mut self, kept: &Kept) {
        let Ok(mut slot) = self.keys.find_entry(kept.hash, |k| {
            k.ty == kept.ty
                && k.hash == kept.hash
                && k.versions.iter().any(|(v, _)| *v == kept.version)
        }) else {
            return;
        };
        let versions = &mut slot.get_mut().versions;
        let Some(at) = versions.iter().position(|(v, _)| *v == kept.version) else {
            return;
        };
        let removed = versions.remove(at);
        let empty = versions.is_empty();
        self.kept -= 1;
        self.bytes = self
            .bytes
            .saturating_sub(removed.as_ref().map_or(0, |(_, e)| Self::cost(e)));
        if empty {
            slot.remove();
        }
    }

    fn compact_order(&mut self) {
        let order = std::mem::take(&mut self.order);
        self.order = order
            .into_iter()
            .filter(|k| self.find_kept(k).is_some())
            .collect();
    }

    /// The entries kept for `key`, oldest first.
    fn of_key<'a>(
        &'a self,
        ty: i32,
        hash: u64,
        key: &'a str,
    ) -> impl DoubleEndedIterator<Item = &'a Entry> {
        self.keys
            .find(hash, |k| k.ty == ty && k.hash == hash)
            .into_iter()
            .flat_map(|k| k.versions.iter().map(|(_, e)| e))
            .filter(move |e| e.key_bytes() == key.as_bytes())
    }

    /// The kept versions of one key (`hash`: its hash), newest first.
    pub(crate) fn versions(&self, ty: i32, hash: u64, key: &str) -> Vec<Entry> {
        self.of_key(ty, hash, key).rev().cloned().collect()
    }

    /// One kept version of a key.
    pub(crate) fn version(&self, ty: i32, hash: u64, key: &str, version: Version) -> Option<Entry> {
        self.of_key(ty, hash, key)
            .find(|e| e.version() == version)
            .cloned()
    }

    /// Every kept version, for the data directory's snapshot.
    pub(crate) fn records(&self) -> Vec<Record> {
        let mut records = Vec::with_capacity(self.kept);
        for key in &self.keys {
            records.extend(key.versions.iter().map(|(_, entry)| Record {
                ty: key.ty,
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

    /// Any hash works for these tests, as long as it is the same for a
    /// key each time (FNV-1a).
    fn hash(key: &str) -> u64 {
        key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    }

    fn keep(h: &mut History, ty: i32, e: &Entry) {
        h.keep(ty, hash(e.key()), e.clone());
    }

    fn values(h: &History, key: &str) -> Vec<u64> {
        h.versions(1, hash(key), key)
            .iter()
            .map(|e| e.version().hlc)
            .collect()
    }

    #[test]
    fn versions_are_sorted_newest_first_once_each_and_bounded_per_key() {
        let mut h = History::new(3, usize::MAX);
        for hlc in [5, 1, 3, 3, 4, 2] {
            keep(&mut h, 1, &entry("k", "v", hlc));
        }
        assert_eq!(values(&h, "k"), [5, 4, 3], "the two oldest dropped");
        assert_eq!(h.size().0, 3);
        assert!(
            h.version(1, hash("k"), "k", Version { hlc: 4, node: 1 })
                .is_some()
        );
        assert!(
            h.version(1, hash("k"), "k", Version { hlc: 1, node: 1 })
                .is_none()
        );
        assert!(
            h.versions(2, hash("k"), "k").is_empty(),
            "another namespace"
        );
    }

    #[test]
    fn the_byte_bound_drops_the_oldest_kept_first_across_keys() {
        let cost = History::cost(&entry("a", "v", 1));
        let mut h = History::new(10, 3 * cost);
        keep(&mut h, 1, &entry("a", "v", 1));
        keep(&mut h, 1, &entry("b", "v", 2));
        keep(&mut h, 1, &entry("a", "v", 3));
        keep(&mut h, 1, &entry("b", "v", 4));
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
            keep(&mut h, 1, &entry("k", "v", hlc));
        }
        assert_eq!(values(&h, "k"), [9_999, 9_998]);
        assert!(h.order.len() <= 2 * h.kept + 65, "{}", h.order.len());
    }

    #[test]
    fn a_full_key_keeps_its_buffer_at_the_bound_and_refuses_older_versions() {
        let mut h = History::new(16, usize::MAX);
        for hlc in 100..200 {
            keep(&mut h, 1, &entry("k", "v", hlc));
        }
        keep(&mut h, 1, &entry("k", "v", 5));
        assert_eq!(values(&h, "k"), (184..200).rev().collect::<Vec<_>>());
        let slot = h.keys.iter().next().map(|k| k.versions.capacity());
        assert_eq!(slot, Some(16), "one more before the drop doubled it");
        assert_eq!(h.size().0, 16);
    }

    #[test]
    fn keys_with_one_hash_share_a_slot_but_reads_tell_them_apart() {
        let mut h = History::new(4, usize::MAX);
        h.keep(1, 7, entry("a", "v", 1));
        h.keep(1, 7, entry("b", "v", 2));
        h.keep(1, 7, entry("a", "v", 3));
        let of = |key: &str| -> Vec<u64> {
            h.versions(1, 7, key)
                .iter()
                .map(|e| e.version().hlc)
                .collect()
        };
        assert_eq!(of("a"), [3, 1]);
        assert_eq!(of("b"), [2]);
        assert!(h.version(1, 7, "b", Version { hlc: 1, node: 1 }).is_none());
    }

    #[test]
    fn no_history_keeps_nothing() {
        let mut h = History::new(0, usize::MAX);
        keep(&mut h, 1, &entry("k", "v", 1));
        assert_eq!(h.size(), (0, 0));
    }
}
