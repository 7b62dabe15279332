//! The versions a node saw of each key before its current one: what
//! `GET .../history` answers and a rollback writes again.
//!
//! Owns: the bound per key (`--history-versions`) and in all
//! (`--history-max-bytes`, oldest dropped first), and the order of a key's
//! versions. Must not touch: the current entries (the store's state keeps
//! those, hands over what they supersede, and keeps each key's [`Head`] in
//! the key's own slot), the merge rule, files.
//!
//! A version is kept once, whatever order versions arrive in (a peer's
//! older write after a newer one is still a version of the key), so the
//! history of a key read back is sorted by version and has no duplicates.
//! Entries are shared with the store (a pointer), never copied.
//!
//! # Why it is laid out so
//!
//! Every write that supersedes a version pays for what [`History::keep_newest`]
//! touches, under the store's lock, on every replica. A table of versions
//! per key costs a probe of that table and a write to the key's list, each
//! a cache miss, on every write (perf put them at about half of what
//! history cost a peer). Here a key's kept versions are a chain through
//! one queue, in the order they were kept: each kept version names the
//! place of the one kept before it, and the key's [`Head`] (beside its
//! current entry in the store's table, which the write already holds)
//! names the newest. Keeping a superseded version is a push at the end of
//! the queue and a write to the head; nothing is looked up.
//!
//! - The byte bound drops the front of the queue, in bulk: the sizes of the
//!   versions to drop are read first (independent loads the processor
//!   overlaps), then they are freed. A chain ends where it reaches a
//!   dropped place: places only grow along a chain backwards, so
//!   everything behind a dropped place was dropped before it.
//! - The bound per key is applied when a key's chain reaches twice the
//!   bound: the chain is walked once, the newest `max_versions` by version
//!   stay (linked again), the rest are freed and leave holes in the queue.
//!   Reads always answer the newest `max_versions`; in memory a key holds
//!   at most twice that (a walk per `max_versions` writes to a hot key,
//!   not one per write).
//! - Holes leave with the front of the queue, or, when they are most of
//!   it, by a compaction that gives every kept version a new place and
//!   every head its new one (a pass over the store's keys, paid for by
//!   as many writes).
//! - A key the store removes (a purged tombstone, a resync's drop) hands
//!   its head here as an orphan, found by namespace, hash and key, and
//!   taken back when the key is written again.

use std::collections::{HashMap, VecDeque};

use super::entry::Entry;
use super::record::Record;
use super::version::Version;

/// Bytes a kept version costs beyond its key and value: the entry's
/// header and its place in the queue (measured in the bench's memory
/// rows, rounded up).
const OVERHEAD: usize = 96;

/// Most versions kept per key (`--history-versions`): twice it must fit
/// in a head's count.
pub(crate) const MAX_VERSIONS: usize = 10_000;

/// A head: the place of the newest kept version plus one (0: none) in the
/// low 48 bits, how many the chain holds in the next 15, and whether the
/// chain is sorted by version in the top one.
const PLACE_BITS: u32 = 48;
const PLACE_MASK: u64 = (1 << PLACE_BITS) - 1;
const COUNT_MASK: u64 = 0x7fff;
const SORTED: u64 = 1 << 63;

/// Places are renumbered from 0 before they come near what a head holds.
const MAX_PLACE: u64 = 1 << (PLACE_BITS - 1);

/// Versions whose sizes the byte bound reads before it frees them.
const DROP_BATCH: usize = 64;

/// Holes the queue keeps at least before a compaction is worth its pass.
const MIN_HOLES: usize = 4096;

/// Where a key's kept versions start, kept in the key's slot of the
/// store: the newest kept version's place, how many versions its chain
/// holds (at most: the byte bound drops without telling the head), and
/// whether the chain is sorted by version, newest first (no late version
/// in it). `Head::default()` keeps none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Head(u64);

impl Head {
    fn new(place: u64, count: usize, sorted: bool) -> Self {
        let count = u64::try_from(count).unwrap_or(COUNT_MASK).min(COUNT_MASK);
        Head(((place + 1) & PLACE_MASK) | (count << PLACE_BITS) | if sorted { SORTED } else { 0 })
    }

    fn place(self) -> Option<u64> {
        (self.0 & PLACE_MASK).checked_sub(1)
    }

    fn count(self) -> usize {
        ((self.0 >> PLACE_BITS) & COUNT_MASK) as usize
    }

    fn sorted(self) -> bool {
        self.0 & SORTED != 0
    }

    /// True when it names no kept version.
    pub(crate) fn is_none(self) -> bool {
        self.0 & PLACE_MASK == 0
    }
}

/// One place of the queue: a kept version (`None`: freed by its key's
/// bound, a hole), its namespace, and the place of its key's version kept
/// before it (plus one; 0: none).
#[derive(Debug)]
struct Kept {
    entry: Option<Entry>,
    prev: u64,
    ty: i32,
}

/// Superseded versions of every key, bounded.
#[derive(Debug)]
pub(crate) struct History {
    /// Every kept version in the order it was kept; `queue[i]` is place
    /// `base + i`.
    queue: VecDeque<Kept>,
    /// The place of `queue[0]`.
    base: u64,
    /// Versions kept (places holding one).
    kept: usize,
    /// Places freed by a key's bound that the queue still holds.
    holes: usize,
    /// What the kept versions cost, counted as [`History::cost`].
    bytes: usize,
    /// Heads of keys the store no longer holds, by namespace and hash.
    orphans: HashMap<(i32, u64), Vec<Head>>,
    /// When `base` passes this, orphans whose versions all went are
    /// forgotten.
    sweep_at: u64,
    max_versions: usize,
    max_bytes: usize,
}

/// A key's kept versions, newest kept first, with their places.
struct Chain<'a> {
    history: &'a History,
    next: Option<u64>,
}

impl<'a> Iterator for Chain<'a> {
    type Item = (u64, &'a Entry);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let place = self.next.take()?;
            let kept = self.history.at(place)?;
            // Links only go back; one that does not ends the chain.
            self.next = kept.prev.checked_sub(1).filter(|p| *p < place);
            if let Some(entry) = &kept.entry {
                return Some((place, entry));
            }
        }
    }
}

impl History {
    /// A history of up to `max_versions` per key (at most
    /// [`MAX_VERSIONS`]) and `max_bytes` in all; 0 versions keeps none.
    pub(crate) fn new(max_versions: usize, max_bytes: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            base: 0,
            kept: 0,
            holes: 0,
            bytes: 0,
            orphans: HashMap::new(),
            sweep_at: 0,
            max_versions: max_versions.min(MAX_VERSIONS),
            max_bytes,
        }
    }

    fn cost(entry: &Entry) -> usize {
        entry.size() + OVERHEAD
    }

    fn at(&self, place: u64) -> Option<&Kept> {
        let index = usize::try_from(place.checked_sub(self.base)?).ok()?;
        self.queue.get(index)
    }

    fn at_mut(&mut self, place: u64) -> Option<&mut Kept> {
        let index = usize::try_from(place.checked_sub(self.base)?).ok()?;
        self.queue.get_mut(index)
    }

    fn chain(&self, head: Head) -> Chain<'_> {
        Chain {
            history: self,
            next: head.place(),
        }
    }

    /// What `head` still names: the newest kept place, the chain's count
    /// and order (none, 0 and sorted once the queue dropped its newest).
    fn live(&self, head: Head) -> (Option<u64>, usize, bool) {
        match head.place() {
            Some(place) if place >= self.base => (Some(place), head.count(), head.sorted()),
            _ => (None, 0, true),
        }
    }

    fn keeps(&self, entry: &Entry) -> bool {
        self.max_versions > 0 && Self::cost(entry) <= self.max_bytes
    }

    /// Keeps `entry`, the version of a key its current one just
    /// superseded: newer than every version the key keeps, so it is kept
    /// without reading anything the key kept before.
    pub(crate) fn keep_newest(&mut self, ty: i32, head: &mut Head, entry: Entry) {
        if !self.keeps(&entry) {
            return;
        }
        let (prev, count, sorted) = self.live(*head);
        self.push(ty, head, entry, prev, count, sorted);
    }

    /// Keeps `entry`, a version of a key that may be older than some it
    /// keeps (a peer's write arriving late, a version read back from the
    /// data directory); a version already kept is not kept twice.
    pub(crate) fn keep_late(&mut self, ty: i32, head: &mut Head, entry: Entry) {
        if !self.keeps(&entry) {
            return;
        }
        let (prev, count, sorted) = self.live(*head);
        let version = entry.version();
        let newest = self.chain(*head).next().map(|(_, e)| e.version());
        let in_order = match newest {
            None => true,
            Some(newest) => sorted && newest < version,
        };
        if !in_order && self.chain(*head).any(|(_, e)| e.version() == version) {
            return;
        }
        self.push(ty, head, entry, prev, count, in_order && sorted);
    }

    fn push(
        &mut self,
        ty: i32,
        head: &mut Head,
        entry: Entry,
        prev: Option<u64>,
        count: usize,
        sorted: bool,
    ) {
        let place = self.base + self.queue.len() as u64;
        self.kept += 1;
        self.bytes += Self::cost(&entry);
        self.queue.push_back(Kept {
            entry: Some(entry),
            prev: prev.map_or(0, |p| p + 1),
            ty,
        });
        *head = Head::new(place, count + 1, sorted);
        if count + 1 >= 2 * self.max_versions {
            self.trim(head);
        }
        self.bound();
    }

    /// Keeps the newest `max_versions` of a key by version, frees the
    /// rest, and links what stays again.
    fn trim(&mut self, head: &mut Head) {
        let chain: Vec<(u64, Version)> = self
            .chain(*head)
            .map(|(place, e)| (place, e.version()))
            .collect();
        let mut by_version: Vec<usize> = (0..chain.len()).collect();
        by_version.sort_unstable_by(|a, b| chain[*b].1.cmp(&chain[*a].1));
        let mut stays = vec![true; chain.len()];
        for &i in by_version.iter().skip(self.max_versions) {
            stays[i] = false;
            if let Some(freed) = self.at_mut(chain[i].0).and_then(|k| k.entry.take()) {
                self.kept -= 1;
                self.holes += 1;
                self.bytes = self.bytes.saturating_sub(Self::cost(&freed));
            }
        }
        let survivors: Vec<(u64, Version)> = chain
            .iter()
            .zip(&stays)
            .filter(|(_, stays)| **stays)
            .map(|(c, _)| *c)
            .collect();
        for (i, (place, _)) in survivors.iter().enumerate() {
            let prev = survivors.get(i + 1).map_or(0, |(p, _)| p + 1);
            if let Some(kept) = self.at_mut(*place) {
                kept.prev = prev;
            }
        }
        let sorted = survivors.windows(2).all(|w| w[0].1 > w[1].1);
        *head = survivors.first().map_or(Head::default(), |(place, _)| {
            Head::new(*place, survivors.len(), sorted)
        });
    }

    /// Frees the oldest kept versions while past the byte bound, down to
    /// a little under it so that they go in groups, and the holes at the
    /// front.
    fn bound(&mut self) {
        if self.bytes > self.max_bytes {
            // Small bounds (tests, a node told to keep little) are kept
            // exactly; from 1 MiB the bound frees up to 1/256 more.
            let slack = if self.max_bytes >= 1 << 20 {
                (self.max_bytes / 256).min(256 << 10)
            } else {
                0
            };
            let target = self.max_bytes - slack;
            while self.bytes > target {
                // The sizes first: independent loads of entries nobody
                // touched for a while, which the processor overlaps; the
                // frees that follow find them in cache.
                let mut take = 0;
                let mut freed = 0;
                for kept in self.queue.iter().take(DROP_BATCH) {
                    if self.bytes - freed <= target {
                        break;
                    }
                    freed += kept.entry.as_ref().map_or(0, Self::cost);
                    take += 1;
                }
                if take == 0 {
                    break;
                }
                for kept in self.queue.drain(..take) {
                    match kept.entry {
                        Some(_) => self.kept -= 1,
                        None => self.holes -= 1,
                    }
                }
                self.base += take as u64;
                self.bytes -= freed;
            }
        }
        while self.queue.front().is_some_and(|k| k.entry.is_none()) {
            self.queue.pop_front();
            self.base += 1;
            self.holes -= 1;
        }
        if self.base >= self.sweep_at {
            let base = self.base;
            self.orphans.retain(|_, heads| {
                heads.retain(|h| h.place().is_some_and(|p| p >= base));
                !heads.is_empty()
            });
            self.sweep_at = base + (self.queue.len() as u64).max(1024);
        }
    }

    /// True when the queue's holes are worth a compaction: most of the
    /// queue, and enough to pay for a pass over the store's `entries()`
    /// keys (or places near what a head can hold).
    pub(crate) fn wants_compaction(&self, entries: impl FnOnce() -> usize) -> bool {
        let places = self.base + self.queue.len() as u64;
        places >= MAX_PLACE
            || (self.holes > MIN_HOLES && self.holes > self.kept && self.holes > entries() / 8)
    }

    /// Closes the queue's holes: every kept version gets a new place
    /// (from 0), and every head (the store's, passed as `heads`, and the
    /// orphans') the new place of its newest.
    pub(crate) fn compact<'a>(&mut self, heads: impl Iterator<Item = &'a mut Head>) {
        let base = self.base;
        let mut moved = Vec::with_capacity(self.queue.len());
        let mut next = 0u64;
        for kept in &self.queue {
            moved.push(kept.entry.is_some().then_some(next));
            next += u64::from(kept.entry.is_some());
        }
        let map = |place: u64| -> Option<u64> {
            let index = usize::try_from(place.checked_sub(base)?).ok()?;
            moved.get(index).copied().flatten()
        };
        let remap = |head: Head| match head.place().and_then(map) {
            Some(place) => Head::new(place, head.count(), head.sorted()),
            None => Head::default(),
        };
        for kept in self.queue.iter_mut() {
            kept.prev = kept.prev.checked_sub(1).and_then(map).map_or(0, |p| p + 1);
        }
        for head in heads {
            *head = remap(*head);
        }
        self.orphans.retain(|_, heads| {
            for head in heads.iter_mut() {
                *head = remap(*head);
            }
            heads.retain(|h| !h.is_none());
            !heads.is_empty()
        });
        self.queue.retain(|k| k.entry.is_some());
        self.holes = 0;
        self.base = 0;
        self.sweep_at = 0;
    }

    /// The key of the versions `head` names, if any is still kept.
    fn key_of(&self, head: Head) -> Option<&[u8]> {
        self.chain(head).next().map(|(_, e)| e.key_bytes())
    }

    /// Takes the versions of a key the store no longer held (namespace
    /// `ty`, `hash` its key's hash), for it to hold them again.
    pub(crate) fn adopt(&mut self, ty: i32, hash: u64, key: &[u8]) -> Head {
        if self.orphans.is_empty() {
            return Head::default();
        }
        let Some(heads) = self.orphans.get(&(ty, hash)) else {
            return Head::default();
        };
        let Some(at) = heads.iter().position(|h| self.key_of(*h) == Some(key)) else {
            return Head::default();
        };
        let head = self
            .orphans
            .get_mut(&(ty, hash))
            .map(|heads| heads.swap_remove(at));
        if self.orphans.get(&(ty, hash)).is_some_and(Vec::is_empty) {
            self.orphans.remove(&(ty, hash));
        }
        head.unwrap_or_default()
    }

    /// Keeps the versions of a key the store no longer holds.
    pub(crate) fn orphan(&mut self, ty: i32, hash: u64, head: Head) {
        if self.live(head).0.is_some() {
            self.orphans.entry((ty, hash)).or_default().push(head);
        }
    }

    /// The head of a key the store does not hold.
    pub(crate) fn orphan_head(&self, ty: i32, hash: u64, key: &[u8]) -> Head {
        self.orphans
            .get(&(ty, hash))
            .and_then(|heads| heads.iter().find(|h| self.key_of(**h) == Some(key)))
            .copied()
            .unwrap_or_default()
    }

    /// [`History::keep_late`] for a key the store does not hold.
    pub(crate) fn keep_orphan(&mut self, ty: i32, hash: u64, entry: Entry) {
        let mut head = self.adopt(ty, hash, entry.key_bytes());
        self.keep_late(ty, &mut head, entry);
        self.orphan(ty, hash, head);
    }

    /// The versions `head` names that reads answer: the newest
    /// `max_versions` by version, newest first.
    pub(crate) fn versions(&self, head: Head) -> Vec<Entry> {
        let mut versions: Vec<Entry> = self.chain(head).map(|(_, e)| e.clone()).collect();
        versions.sort_unstable_by_key(|e| std::cmp::Reverse(e.version()));
        versions.truncate(self.max_versions);
        versions
    }

    /// One version of those [`History::versions`] answers.
    pub(crate) fn version(&self, head: Head, version: Version) -> Option<Entry> {
        self.versions(head)
            .into_iter()
            .find(|e| e.version() == version)
    }

    /// Every kept version, in the order kept, for the data directory's
    /// snapshot.
    pub(crate) fn records(&self) -> Vec<Record> {
        self.queue
            .iter()
            .filter_map(|k| {
                Some(Record {
                    ty: k.ty,
                    entry: k.entry.clone()?,
                })
            })
            .collect()
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

    /// The store's side of the history: a head per key, and the
    /// compaction it runs after a keep.
    #[derive(Default)]
    struct Keys(HashMap<String, Head>);

    impl Keys {
        /// Keeps a version in any order (the late path).
        fn keep(&mut self, h: &mut History, e: &Entry) {
            let head = self.0.entry(e.key().to_owned()).or_default();
            h.keep_late(1, head, e.clone());
            self.compact(h);
        }

        /// Keeps a version newer than all the key keeps.
        fn supersede(&mut self, h: &mut History, e: &Entry) {
            let head = self.0.entry(e.key().to_owned()).or_default();
            h.keep_newest(1, head, e.clone());
            self.compact(h);
        }

        fn compact(&mut self, h: &mut History) {
            let entries = self.0.len();
            if h.wants_compaction(|| entries) {
                h.compact(self.0.values_mut());
            }
        }

        fn head(&self, key: &str) -> Head {
            self.0.get(key).copied().unwrap_or_default()
        }

        fn values(&self, h: &History, key: &str) -> Vec<u64> {
            h.versions(self.head(key))
                .iter()
                .map(|e| e.version().hlc)
                .collect()
        }
    }

    #[test]
    fn versions_are_sorted_newest_first_once_each_and_bounded_per_key() {
        let mut h = History::new(3, usize::MAX);
        let mut keys = Keys::default();
        for hlc in [5, 1, 3, 3, 4, 2] {
            keys.keep(&mut h, &entry("k", "v", hlc));
        }
        assert_eq!(keys.values(&h, "k"), [5, 4, 3], "the two oldest not shown");
        assert_eq!(h.size().0, 5, "kept until the key holds twice its bound");
        keys.keep(&mut h, &entry("k", "v", 6));
        assert_eq!(h.size().0, 3, "then its newest three stay");
        assert_eq!(keys.values(&h, "k"), [6, 5, 4]);
        assert!(
            h.version(keys.head("k"), Version { hlc: 4, node: 1 })
                .is_some()
        );
        assert!(
            h.version(keys.head("k"), Version { hlc: 1, node: 1 })
                .is_none()
        );
        assert!(keys.values(&h, "other").is_empty());
    }

    #[test]
    fn the_byte_bound_drops_the_oldest_kept_first_across_keys() {
        let cost = History::cost(&entry("a", "v", 1));
        let mut h = History::new(10, 3 * cost);
        let mut keys = Keys::default();
        for (key, hlc) in [("a", 1), ("b", 2), ("a", 3), ("b", 4)] {
            keys.supersede(&mut h, &entry(key, "v", hlc));
        }
        assert_eq!(keys.values(&h, "a"), [3]);
        assert_eq!(keys.values(&h, "b"), [4, 2]);
        assert_eq!(h.size(), (3, 3 * cost));
        let mut records: Vec<u64> = h.records().iter().map(|r| r.entry.version().hlc).collect();
        records.sort_unstable();
        assert_eq!(records, [2, 3, 4]);
    }

    #[test]
    fn a_large_byte_bound_frees_in_groups_and_never_holds_more_than_it() {
        let cost = History::cost(&entry("k000000", "v", 1));
        let max = 4 << 20;
        let mut h = History::new(4, max);
        let mut keys = Keys::default();
        let mut freed_at_once = 0;
        for i in 0..(2 * max / cost) as u64 {
            let before = h.size().0;
            keys.supersede(&mut h, &entry(&format!("k{:06}", i % 50_000), "v", i));
            assert!(h.size().1 <= max);
            freed_at_once = freed_at_once.max((before + 1).saturating_sub(h.size().0));
        }
        assert!(freed_at_once > 1, "frees come in groups");
        assert!(h.size().1 >= max - max / 256 - cost, "{}", h.size().1);
    }

    #[test]
    fn the_queue_stays_bounded_when_one_key_is_written_over_and_over() {
        let mut h = History::new(2, usize::MAX);
        let mut keys = Keys::default();
        for hlc in 0..10_000 {
            keys.supersede(&mut h, &entry("k", "v", hlc));
        }
        assert_eq!(keys.values(&h, "k"), [9_999, 9_998]);
        assert!(h.size().0 <= 4, "{:?}", h.size());
        assert!(h.queue.len() <= 4, "{}", h.queue.len());
    }

    #[test]
    fn holes_behind_an_old_version_are_compacted_and_heads_follow() {
        let mut h = History::new(2, usize::MAX);
        let mut keys = Keys::default();
        // An old version of another key stays at the front of the queue,
        // so the hot key's freed places cannot leave with the front.
        keys.supersede(&mut h, &entry("cold", "v", 1));
        for hlc in 10..20_000 {
            keys.supersede(&mut h, &entry("hot", "v", hlc));
        }
        assert!(h.queue.len() <= MIN_HOLES + 8, "{}", h.queue.len());
        assert_eq!(keys.values(&h, "hot"), [19_999, 19_998]);
        assert_eq!(keys.values(&h, "cold"), [1]);
        keys.supersede(&mut h, &entry("cold", "v", 20_000));
        assert_eq!(keys.values(&h, "cold"), [20_000, 1]);
    }

    #[test]
    fn a_removed_key_keeps_its_versions_and_takes_them_back() {
        let mut h = History::new(4, usize::MAX);
        let mut keys = Keys::default();
        for (key, hlc) in [("a", 1), ("b", 2), ("a", 3)] {
            keys.supersede(&mut h, &entry(key, "v", hlc));
        }
        // Both keys share one hash here: the key tells them apart.
        for key in ["a", "b"] {
            let head = keys.0.remove(key).unwrap_or_default();
            h.orphan(1, 7, head);
        }
        assert_eq!(h.versions(h.orphan_head(1, 7, b"a")).len(), 2);
        assert_eq!(h.versions(h.orphan_head(1, 7, b"b")).len(), 1);
        assert!(h.orphan_head(2, 7, b"a").is_none(), "another namespace");
        h.keep_orphan(1, 7, entry("b", "v", 5));
        let mut head = h.adopt(1, 7, b"b");
        let values: Vec<u64> = h.versions(head).iter().map(|e| e.version().hlc).collect();
        assert_eq!(values, [5, 2]);
        assert!(h.orphan_head(1, 7, b"b").is_none(), "taken back");
        h.keep_newest(1, &mut head, entry("b", "v", 6));
        assert_eq!(h.versions(head).len(), 3);
        assert_eq!(h.versions(h.orphan_head(1, 7, b"a")).len(), 2);
    }

    #[test]
    fn late_and_in_order_versions_mixed_with_the_byte_bound_stay_sorted_and_once() {
        let cost = History::cost(&entry("a", "v", 1));
        let mut h = History::new(3, 5 * cost);
        let mut keys = Keys::default();
        for hlc in [10, 20, 15, 30, 20, 5, 40] {
            keys.keep(&mut h, &entry("a", "v", hlc));
            keys.keep(&mut h, &entry("b", "v", hlc + 1));
        }
        let (a, b) = (keys.values(&h, "a"), keys.values(&h, "b"));
        assert!(a.len() <= 3 && b.len() <= 3, "{a:?} {b:?}");
        assert!(a.len() + b.len() <= h.size().0);
        assert!(h.size().0 <= 5);
        for v in [&a, &b] {
            assert!(v.windows(2).all(|w| w[0] > w[1]), "{v:?}");
        }
        assert_eq!(a.first(), Some(&40));
        assert_eq!(b.first(), Some(&41));
    }

    #[test]
    fn a_hot_key_holds_at_most_twice_its_bound_and_shows_its_newest() {
        let mut h = History::new(16, usize::MAX);
        let mut keys = Keys::default();
        for hlc in 100..200 {
            keys.supersede(&mut h, &entry("k", "v", hlc));
        }
        keys.keep(&mut h, &entry("k", "v", 5));
        assert_eq!(keys.values(&h, "k"), (184..200).rev().collect::<Vec<_>>());
        assert!(h.records().len() <= 32);
        assert!(h.size().0 <= 32);
    }

    proptest::proptest! {
        /// Against a plain model (a list of kept versions in the order
        /// they were kept, a key's bound applied when it holds twice its
        /// bound): the same versions per key, whatever the mix of late,
        /// repeated and in-order versions, keys, bounds, removals and
        /// compactions.
        #[test]
        fn keeps_what_a_plain_model_keeps(
            writes in proptest::collection::vec((0u8..4, 0u64..40, 0u8..10), 0..300),
            max_versions in 1usize..5,
            max_kept in 1usize..12,
        ) {
            let cost = History::cost(&entry("k0", "v", 1));
            let mut h = History::new(max_versions, max_kept * cost);
            let mut keys = Keys::default();
            let mut model: Vec<(String, u64)> = Vec::new();
            let mut counts: HashMap<String, usize> = HashMap::new();
            for (k, hlc, op) in writes {
                let key = format!("k{k}");
                if op == 0 {
                    // The store removes the key, then writes it again.
                    let head = keys.0.remove(&key).unwrap_or_default();
                    h.orphan(1, u64::from(k), head);
                    let head = h.adopt(1, u64::from(k), key.as_bytes());
                    keys.0.insert(key.clone(), head);
                }
                keys.keep(&mut h, &entry(&key, "v", hlc));
                if op == 1 {
                    h.compact(keys.0.values_mut());
                }
                let live: Vec<u64> =
                    model.iter().filter(|(m, _)| *m == key).map(|(_, v)| *v).collect();
                if live.contains(&hlc) {
                    continue;
                }
                let count = counts.entry(key.clone()).or_default();
                if live.is_empty() {
                    *count = 0;
                }
                model.push((key.clone(), hlc));
                *count += 1;
                if *count >= 2 * max_versions {
                    let mut of_key: Vec<u64> =
                        model.iter().filter(|(m, _)| *m == key).map(|(_, v)| *v).collect();
                    of_key.sort_unstable_by(|a, b| b.cmp(a));
                    let stays = &of_key[..of_key.len().min(max_versions)];
                    model.retain(|(m, v)| *m != key || stays.contains(v));
                    *count = stays.len();
                }
                while model.len() > max_kept {
                    model.remove(0);
                }
            }
            for k in 0..4u8 {
                let key = format!("k{k}");
                let mut want: Vec<u64> =
                    model.iter().filter(|(m, _)| *m == key).map(|(_, v)| *v).collect();
                want.sort_unstable_by(|a, b| b.cmp(a));
                want.truncate(max_versions);
                proptest::prop_assert_eq!(keys.values(&h, &key), want);
            }
            proptest::prop_assert_eq!(h.size(), (model.len(), model.len() * cost));
            proptest::prop_assert_eq!(h.records().len(), model.len());
        }
    }

    #[test]
    fn no_history_keeps_nothing() {
        let mut h = History::new(0, usize::MAX);
        let mut keys = Keys::default();
        keys.keep(&mut h, &entry("k", "v", 1));
        assert_eq!(h.size(), (0, 0));
    }
}
