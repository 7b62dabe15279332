//! The map behind the store's lock.
//!
//! Owns: `State` (the namespaces, entries found by key; the digest's
//! buckets; the counts and bytes the limits are checked against; the hooks
//! into the history of superseded versions) and the merge rule
//! ([`supersedes`]) that every put of a peer's entry applies. Each change
//! keeps the digest, the counts and the history in step in one call.
//! Must not touch: the lock, the clock, the versions of new writes and the
//! checks of a single write: the `Store` stamps and checks, the state
//! stores.

use std::collections::HashMap;
use std::hash::BuildHasher;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry as Slot;

use super::entry::Entry;
use super::limits::{Limits, StoreError, room_for};
use super::record::Record;
use super::{digest, history};

/// One namespace: entries found by their key. The table holds one pointer
/// per entry; the key lives in the entry itself.
type Namespace = HashTable<Held>;

/// A key's slot in its namespace: its current entry, and where the
/// versions it superseded start (kept here so that a write, which already
/// holds the slot, keeps the old version without a second lookup).
#[derive(Debug)]
pub(super) struct Held {
    pub(super) entry: Entry,
    pub(super) history: history::Head,
}

/// Entries plus the digest kept up to date with them.
#[derive(Debug)]
pub(super) struct State {
    pub(super) namespaces: HashMap<i32, Namespace>,
    /// The versions the current entries superseded.
    pub(super) history: history::History,
    /// Entries holding a value, per namespace (for the entry limit).
    values: HashMap<i32, usize>,
    /// Bytes of every held key and value (for the byte limit).
    pub(super) bytes: usize,
    /// Per bucket, the XOR of the hashes of its entries (see [`digest`]):
    /// updated on every change, so a digest costs a copy, not a scan.
    pub(super) buckets: Vec<u64>,
    /// Hashes keys for the namespace tables (foldhash, seeded per process).
    pub(super) hasher: hashbrown::DefaultHashBuilder,
}

/// The merge rule: `new` replaces `held` when its version is greater. Two
/// different entries with one version cannot come from a node's own
/// writes (each takes a fresh timestamp), but a faulty or hostile peer can
/// send them; the tie is broken by their contents (a tombstone over a
/// value, then the later expiry, then the greater value), so every replica
/// still ends on the same one whatever order they arrive in.
pub fn supersedes(new: &Entry, held: &Entry) -> bool {
    let rank = |e: &Entry| (e.version(), e.is_tombstone(), e.expires_at_ms());
    match rank(new).cmp(&rank(held)) {
        std::cmp::Ordering::Equal => new.value() > held.value(),
        order => order == std::cmp::Ordering::Greater,
    }
}

impl State {
    pub(super) fn remove(&mut self, ty: i32, key: &str) {
        let hash = self.hasher.hash_one(key.as_bytes());
        let Some(ns) = self.namespaces.get_mut(&ty) else {
            return;
        };
        let removed = ns
            .find_entry(hash, |h| h.entry.key_bytes() == key.as_bytes())
            .ok()
            .map(|slot| slot.remove().0);
        if ns.is_empty() {
            self.namespaces.remove(&ty);
        }
        if let Some(old) = removed {
            self.account(ty, None, Some(&old.entry));
            self.history.orphan(ty, hash, old.history);
        }
    }

    /// Keeps the digest, the bytes held and the namespace's count of values
    /// in step with a change to namespace `ty`: `added` now stored,
    /// `removed` no longer (the entry it replaced, or a removed one).
    fn account(&mut self, ty: i32, added: Option<&Entry>, removed: Option<&Entry>) {
        let mut values = 0;
        for (entry, sign) in [(added, 1), (removed, -1)] {
            let Some(entry) = entry else { continue };
            self.buckets[digest::bucket_of(ty, entry.key_bytes())] ^= digest::entry_hash(ty, entry);
            if sign > 0 {
                self.bytes += entry.size();
            } else {
                self.bytes -= entry.size();
            }
            values += sign * isize::from(!entry.is_tombstone());
        }
        if values != 0 {
            self.count_values(ty, values);
        }
    }

    fn count_values(&mut self, ty: i32, delta: isize) {
        let count = self.values.entry(ty).or_default();
        *count = count.saturating_add_signed(delta);
        if *count == 0 {
            self.values.remove(&ty);
        }
    }

    /// Refuses `incoming` (new entries for `ty`) when storing them would
    /// pass the limits times `headroom`.
    pub(super) fn check_room<'a>(
        &self,
        ty: i32,
        incoming: impl Iterator<Item = (&'a str, Option<&'a str>)>,
        limits: &Limits,
        headroom: usize,
    ) -> Result<(), StoreError> {
        self.room_for_type(ty, limits, headroom)?;
        let mut values = self.values.get(&ty).copied().unwrap_or(0);
        let mut bytes = self.bytes;
        for (key, value) in incoming {
            bytes += key.len() + value.map_or(0, str::len);
            values += usize::from(value.is_some());
            if let Some(held) = self.get(ty, key) {
                bytes = bytes.saturating_sub(held.size());
                values = values.saturating_sub(usize::from(!held.is_tombstone()));
            }
        }
        room_for(
            ty,
            (self.values.get(&ty).copied().unwrap_or(0), self.bytes),
            (values, bytes),
            limits,
            headroom,
        )
    }

    /// Refuses a write to namespace `ty` when it does not exist yet and
    /// creating it would pass [`Limits::max_types`] times `headroom`.
    fn room_for_type(&self, ty: i32, limits: &Limits, headroom: usize) -> Result<(), StoreError> {
        let limit = limits.max_types.saturating_mul(headroom);
        if !self.namespaces.contains_key(&ty) && self.namespaces.len() >= limit {
            return Err(StoreError::Full {
                what: "types (--max-types)".into(),
                would_be: self.namespaces.len() + 1,
                limit,
            });
        }
        Ok(())
    }

    /// Stores a peer's `entry` in namespace `ty` unless the key holds one
    /// as new or newer (then `Ok(false)`), or storing it would pass the
    /// limits times `headroom`. One lookup of the key, where a check, a
    /// room check and a store would make three.
    pub(super) fn put_if_newer(
        &mut self,
        ty: i32,
        entry: &Entry,
        limits: &Limits,
        headroom: usize,
    ) -> Result<bool, StoreError> {
        self.room_for_type(ty, limits, headroom)?;
        let hasher = &self.hasher;
        let hash = hasher.hash_one(entry.key_bytes());
        let held_values = self.values.get(&ty).copied().unwrap_or(0);
        let ns = self.namespaces.entry(ty).or_default();
        let mut slot = ns.entry(
            hash,
            |held| held.entry.key_bytes() == entry.key_bytes(),
            |held| hasher.hash_one(held.entry.key_bytes()),
        );
        if let Slot::Occupied(occupied) = &mut slot {
            let held = occupied.get_mut();
            if !supersedes(entry, &held.entry) {
                if held.entry.version() != entry.version() {
                    // An older version of the key, late: still one it had.
                    self.history.keep_late(ty, &mut held.history, entry.clone());
                    self.compact_history();
                }
                return Ok(false);
            }
        }
        let held = match &slot {
            Slot::Occupied(slot) => Some(&slot.get().entry),
            Slot::Vacant(_) => None,
        };
        let held_size = held.map_or(0, Entry::size);
        let held_value = held.is_some_and(|held| !held.is_tombstone());
        let values_after =
            held_values + usize::from(!entry.is_tombstone()) - usize::from(held_value);
        let bytes_after = self.bytes + entry.size() - held_size;
        if let Err(err) = room_for(
            ty,
            (held_values, self.bytes),
            (values_after, bytes_after),
            limits,
            headroom,
        ) {
            if ns.is_empty() {
                self.namespaces.remove(&ty);
            }
            return Err(err);
        }
        let old = fill(slot, &mut self.history, ty, hash, entry);
        self.account(ty, Some(entry), old.as_ref());
        if old.is_some() {
            self.compact_history();
        }
        Ok(true)
    }

    /// Closes the history's holes when they are worth a pass over every
    /// key's slot (each holds its key's history head).
    pub(super) fn compact_history(&mut self) {
        let namespaces = &self.namespaces;
        if self
            .history
            .wants_compaction(|| namespaces.values().map(HashTable::len).sum())
        {
            let heads = self
                .namespaces
                .values_mut()
                .flat_map(|ns| ns.iter_mut().map(|held| &mut held.history));
            self.history.compact(heads);
        }
    }

    pub(super) fn new(limits: &Limits) -> Self {
        Self {
            history: history::History::new(limits.history_versions, limits.history_max_bytes),
            namespaces: HashMap::new(),
            values: HashMap::new(),
            bytes: 0,
            buckets: vec![0; digest::BUCKETS],
            hasher: hashbrown::DefaultHashBuilder::default(),
        }
    }

    /// Stores `entry` in namespace `ty` (replacing what its key held),
    /// keeping the digest current.
    pub(super) fn put(&mut self, ty: i32, entry: Entry) {
        let hasher = &self.hasher;
        let hash = hasher.hash_one(entry.key_bytes());
        let ns = self.namespaces.entry(ty).or_default();
        let slot = ns.entry(
            hash,
            |held| held.entry.key_bytes() == entry.key_bytes(),
            |held| hasher.hash_one(held.entry.key_bytes()),
        );
        let old = fill(slot, &mut self.history, ty, hash, &entry);
        self.account(ty, Some(&entry), old.as_ref());
        if old.is_some() {
            self.compact_history();
        }
    }

    /// Every record (tombstones included) whose type and entry pass `keep`.
    pub(super) fn records_where(&self, keep: impl Fn(i32, &Entry) -> bool) -> Vec<Record> {
        let mut out = Vec::new();
        for (&ty, ns) in self.namespaces.iter() {
            out.extend(ns.iter().filter(|h| keep(ty, &h.entry)).map(|held| Record {
                ty,
                entry: held.entry.clone(),
            }));
        }
        out
    }

    /// The slot of `key` in namespace `ty`, and the key's hash.
    fn held(&self, ty: i32, key: &str) -> (Option<&Held>, u64) {
        let hash = self.hasher.hash_one(key.as_bytes());
        let held = self
            .namespaces
            .get(&ty)
            .and_then(|ns| ns.find(hash, |h| h.entry.key_bytes() == key.as_bytes()));
        (held, hash)
    }

    pub(super) fn get(&self, ty: i32, key: &str) -> Option<&Entry> {
        self.held(ty, key).0.map(|h| &h.entry)
    }

    /// Where the kept versions of a key start, held or not.
    pub(super) fn history_head(&self, ty: i32, key: &str) -> history::Head {
        match self.held(ty, key) {
            (Some(held), _) => held.history,
            (None, hash) => self.history.orphan_head(ty, hash, key.as_bytes()),
        }
    }
}

/// Puts `entry` into its key's `slot` and returns what the slot held. The
/// entry it replaces goes to the key's history: as its newest kept version,
/// or as a late one should a caller store an older entry over a newer one
/// (the held entry is newer than all its key keeps). A key the store no
/// longer held takes back the versions history still keeps of it.
fn fill(
    slot: Slot<'_, Held>,
    history: &mut history::History,
    ty: i32,
    hash: u64,
    entry: &Entry,
) -> Option<Entry> {
    match slot {
        Slot::Occupied(mut slot) => {
            let held = slot.get_mut();
            let old = std::mem::replace(&mut held.entry, entry.clone());
            if supersedes(entry, &old) {
                history.keep_newest(ty, &mut held.history, old.clone());
            } else {
                history.keep_late(ty, &mut held.history, old.clone());
            }
            Some(old)
        }
        Slot::Vacant(slot) => {
            let kept = history.adopt(ty, hash, entry.key_bytes());
            slot.insert(Held {
                entry: entry.clone(),
                history: kept,
            });
            None
        }
    }
}
