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
/// header, its place in the queue and in its key's list (measured in the
/// bench's memory rows, rounded up).
const OVERHEAD: usize = 96;

/// Where the cost of keeping versions goes, and why it is laid out so.
/// Every write that supersedes a version pays for what `keep` touches,
/// under the store's lock, on every replica; perf put that at four to
/// five cache misses per version with a table of versions per key (find
/// the key, read its newest version, find the version the byte bound
/// drops, read it to count its size). Here the kept entries sit in one
/// queue in the order they were kept, so the byte bound drops the front
/// of the queue without finding anything (the free of the dropped entry
/// is the one miss no bounded history avoids); each key's slot names its
/// versions by their place in the queue and holds its newest version, so
/// keeping a newer version reads the slot only. A key's places that the
/// queue already dropped are skipped by reads and cleared the next time
/// the key is written, or by a sweep once the queue turned over.
///
/// A key is found by its namespace and 64-bit hash alone: two keys of one
/// namespace with the same hash share a slot (and its per-key bound), and
/// reads keep only the entries of the key asked for.
#[derive(Debug)]
struct Key {
    ty: i32,
    hash: u64,
    /// The newest version in `versions`.
    newest: Version,
    /// At most the lowest place in `versions` (a late version sits before
    /// newer ones that were kept earlier, so places are not in order).
    min_seq: u64,
    /// Oldest version first: (place in the queue, version). Never empty
    /// while in the table (a slot whose places were all dropped is swept).
    versions: VecDeque<(u64, Version)>,
}

impl Key {
    /// Forgets the places before `base` (dropped from the queue), and
    /// sets `min_seq` and `newest` from what is left.
    fn clear_dropped(&mut self, base: u64) {
        self.versions.retain(|(s, _)| *s >= base);
        self.min_seq = self.versions.iter().map(|(s, _)| *s).min().unwrap_or(base);
        if let Some((_, v)) = self.versions.back() {
            self.newest = *v;
        }
    }
}

/// Superseded versions by key, bounded.
#[derive(Debug)]
pub(crate) struct History {
    keys: HashTable<Key>,
    /// Every kept entry in the order it was kept; `queue[i]` is place
    /// `base + i`. `None`: dropped by its key's bound (the byte bound
    /// drops from the front).
    queue: VecDeque<Option<Entry>>,
    /// The place of `queue[0]`.
    base: u64,
    /// When `base` passes this, slots whose places were all dropped are
    /// swept from `keys`.
    sweep_at: u64,
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
            queue: VecDeque::new(),
            base: 0,
            sweep_at: 0,
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
        let version = entry.version();
        let seq = self.base + self.queue.len() as u64;
        let base = self.base;
        let slot = self
            .keys
            .entry(hash, |k| k.ty == ty && k.hash == hash, |k| k.hash)
            .or_insert_with(|| Key {
                ty,
                hash,
                newest: version,
                min_seq: seq,
                versions: VecDeque::new(),
            })
            .into_mut();
        // Places the byte bound dropped since the key was last kept are
        // cleared only where they matter: before a search (which must not
        // see a dropped version as kept) and before the key's bound counts
        // its versions. A newer version is kept without reading the list.
        let in_order = slot.versions.is_empty() || slot.newest < version;
        if slot.min_seq < base && (!in_order || slot.versions.len() >= self.max_versions) {
            slot.clear_dropped(base);
        }
        let mut at = if slot.versions.is_empty() || slot.newest < version {
            slot.versions.len()
        } else {
            let at = slot.versions.partition_point(|(_, v)| *v < version);
            if slot.versions.get(at).is_some_and(|(_, v)| *v == version) {
                return;
            }
            at
        };
        if slot.versions.len() >= self.max_versions {
            if at == 0 {
                // Older than all the key keeps, and it keeps all it may.
                return;
            }
            // Room first, so a full key's list never grows past the bound.
            if let Some((old, _)) = slot.versions.pop_front()
                && let Some(dropped) = old
                    .checked_sub(base)
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| self.queue.get_mut(i))
                    .and_then(Option::take)
            {
                self.kept -= 1;
                self.bytes = self.bytes.saturating_sub(Self::cost(&dropped));
            }
            at -= 1;
        }
        if slot.versions.is_empty() {
            slot.min_seq = seq;
        }
        slot.versions.insert(at, (seq, version));
        if slot.newest < version {
            slot.newest = version;
        }
        self.kept += 1;
        self.bytes += Self::cost(&entry);
        self.queue.push_back(Some(entry));
        self.bound();
    }

    /// Drops the oldest kept versions while past the byte bound, then
    /// keeps the queue and the key table from growing with what was
    /// dropped.
    fn bound(&mut self) {
        while self.bytes > self.max_bytes || self.queue.front().is_some_and(Option::is_none) {
            let Some(front) = self.queue.pop_front() else {
                break;
            };
            self.base += 1;
            if let Some(dropped) = front {
                self.kept -= 1;
                self.bytes = self.bytes.saturating_sub(Self::cost(&dropped));
            }
        }
        // A key written over and over, under its own bound, leaves holes:
        // renumber when they are most of the queue.
        if self.queue.len() > 64 && self.queue.len() > 2 * self.kept {
            self.renumber();
        }
        if self.base >= self.sweep_at {
            self.sweep();
        }
    }

    /// Clears dropped places from every key, and the keys left with none.
    /// Runs once the queue turned over since the last sweep: its cost (a
    /// pass over the keys) is shared by as many writes as the queue holds.
    fn sweep(&mut self) {
        let base = self.base;
        self.keys.retain(|k| {
            if k.min_seq < base {
                k.clear_dropped(base);
            }
            !k.versions.is_empty()
        });
        self.sweep_at = base + (self.queue.len() as u64).max(1024);
    }

    /// Closes the holes of the queue, moving every kept entry to a new
    /// place (and every key's list with it).
    fn renumber(&mut self) {
        let base = self.base;
        let mut moved = Vec::with_capacity(self.queue.len());
        let mut next = 0u64;
        for slot in &self.queue {
            moved.push(next);
            next += u64::from(slot.is_some());
        }
        self.keys.retain(|k| {
            k.clear_dropped(base);
            for (s, _) in k.versions.iter_mut() {
                // Places held by a key are filled: `moved` is exact there.
                let index = usize::try_from(*s - base).unwrap_or(usize::MAX);
                *s = base + moved.get(index).copied().unwrap_or(0);
            }
            k.min_seq = k.versions.iter().map(|(s, _)| *s).min().unwrap_or(base);
            !k.versions.is_empty()
        });
        self.queue.retain(Option::is_some);
    }

    /// The entry at place `seq`, if it is still kept.
    fn at(&self, seq: u64) -> Option<&Entry> {
        let index = seq.checked_sub(self.base)?;
        self.queue.get(usize::try_from(index).ok()?)?.as_ref()
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
            .flat_map(|k| k.versions.iter().filter_map(|(s, _)| self.at(*s)))
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
            records.extend(
                key.versions
                    .iter()
                    .filter_map(|(s, _)| self.at(*s))
                    .map(|entry| Record {
                        ty: key.ty,
                        entry: entry.clone(),
                    }),
            );
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
    fn the_queue_stays_bounded_when_one_key_is_written_over_and_over() {
        let mut h = History::new(2, usize::MAX);
        for hlc in 0..10_000 {
            keep(&mut h, 1, &entry("k", "v", hlc));
        }
        assert_eq!(values(&h, "k"), [9_999, 9_998]);
        assert!(h.queue.len() <= 2 * h.kept + 65, "{}", h.queue.len());
        let kept: Vec<u64> = h.records().iter().map(|r| r.entry.version().hlc).collect();
        assert_eq!(kept.len(), 2, "{kept:?}");
    }

    #[test]
    fn keys_whose_versions_all_went_are_swept() {
        let cost = History::cost(&entry("k00000", "v", 1));
        let mut h = History::new(4, 10 * cost);
        for i in 0..5_000 {
            keep(&mut h, 1, &entry(&format!("k{i:05}"), "v", i));
        }
        assert_eq!(h.size(), (10, 10 * cost));
        assert!(h.keys.len() <= 10 + 1024, "{}", h.keys.len());
        assert_eq!(values(&h, "k04999"), [4_999]);
        assert!(values(&h, "k00000").is_empty());
    }

    #[test]
    fn late_and_in_order_versions_mixed_with_the_byte_bound_stay_sorted_and_once() {
        let cost = History::cost(&entry("a", "v", 1));
        let mut h = History::new(3, 5 * cost);
        for hlc in [10, 20, 15, 30, 20, 5, 40] {
            keep(&mut h, 1, &entry("a", "v", hlc));
            keep(&mut h, 1, &entry("b", "v", hlc + 1));
        }
        // Per key at most 3, in all at most 5, newest first, no duplicate.
        let (a, b) = (values(&h, "a"), values(&h, "b"));
        assert!(a.len() <= 3 && b.len() <= 3, "{a:?} {b:?}");
        assert_eq!(a.len() + b.len(), h.size().0);
        assert!(h.size().0 <= 5);
        for v in [&a, &b] {
            assert!(v.windows(2).all(|w| w[0] > w[1]), "{v:?}");
        }
        assert_eq!(a.first(), Some(&40));
        assert_eq!(b.first(), Some(&41));
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
        assert_eq!(h.records().len(), 16);
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

    proptest::proptest! {
        /// Against a plain model (a list of kept versions in the order
        /// they were kept): the same versions per key, whatever the mix
        /// of late, repeated and in-order versions, keys and bounds.
        #[test]
        fn keeps_what_a_plain_model_keeps(
            writes in proptest::collection::vec((0u8..4, 0u64..40), 0..300),
            max_versions in 1usize..5,
            max_kept in 1usize..12,
        ) {
            let cost = History::cost(&entry("k0", "v", 1));
            let mut h = History::new(max_versions, max_kept * cost);
            let mut model: Vec<(String, u64)> = Vec::new();
            for (k, hlc) in writes {
                let key = format!("k{k}");
                keep(&mut h, 1, &entry(&key, "v", hlc));
                let mut of_key: Vec<u64> =
                    model.iter().filter(|(m, _)| *m == key).map(|(_, v)| *v).collect();
                if of_key.contains(&hlc) {
                    continue;
                }
                of_key.sort_unstable();
                if of_key.len() >= max_versions {
                    if hlc < of_key[0] {
                        continue;
                    }
                    model.retain(|(m, v)| !(*m == key && *v == of_key[0]));
                }
                model.push((key, hlc));
                while model.len() > max_kept {
                    model.remove(0);
                }
            }
            for k in 0..4u8 {
                let key = format!("k{k}");
                let mut want: Vec<u64> =
                    model.iter().filter(|(m, _)| *m == key).map(|(_, v)| *v).collect();
                want.sort_unstable_by(|a, b| b.cmp(a));
                proptest::prop_assert_eq!(values(&h, &key), want);
            }
            proptest::prop_assert_eq!(h.size(), (model.len(), model.len() * cost));
            proptest::prop_assert_eq!(h.records().len(), model.len());
        }
    }

    #[test]
    fn no_history_keeps_nothing() {
        let mut h = History::new(0, usize::MAX);
        keep(&mut h, 1, &entry("k", "v", 1));
        assert_eq!(h.size(), (0, 0));
    }
}
