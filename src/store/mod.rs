//! The replicated state itself: one map of string to string per int32
//! namespace (`SyncData.type`), every entry versioned so that all nodes
//! order writes the same way.
//!
//! Owns: entries, versions (via [`clock::HybridClock`]), the merge rule,
//! tombstones, TTL expiry and the size limits on keys and values.
//! Must not touch: sockets, tasks, wall-clock reads (callers pass `now_ms`),
//! metrics. Everything here is synchronous and deterministic, so it is
//! unit-tested without a runtime.
//!
//! # The merge rule
//! An entry is replaced only by one with a strictly greater [`Version`]
//! (hybrid timestamp, then writer's node id); between two different
//! entries of one version (which only a faulty peer sends), by their
//! contents ([`supersedes`]). Deletes are tombstones that carry a version
//! like any write. Two stores that receive the same records in any order
//! therefore end identical; see the property tests below.

pub mod clock;
pub mod digest;
mod entry;
mod history;

/// Most superseded versions a key may keep (`--history-versions`).
pub const MAX_HISTORY_VERSIONS: usize = history::MAX_VERSIONS;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::{Arc, PoisonError, RwLock};

use hashbrown::HashTable;
use hashbrown::hash_table::Entry as Slot;

pub use self::entry::{Entry, Meta};

use self::clock::{ClockSkewError, HybridClock, hlc_logical, hlc_ms};

/// Orders writes: the hybrid timestamp first, the writer's node id second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version {
    /// Hybrid logical clock value (see [`clock`]).
    pub hlc: u64,
    /// Node id of the writer; breaks ties between equal timestamps.
    pub node: u64,
}

impl Version {
    /// The text form, `<wall ms>.<logical>@<node id hex>`, e.g.
    /// `1764222930123.0@9f3a...`, built on the stack: every answer carries
    /// one, and `fmt` costs several times more.
    pub fn text(&self) -> VersionText {
        let mut text = VersionText {
            bytes: [0; VersionText::CAPACITY],
            len: 0,
        };
        let mut numbers = itoa::Buffer::new();
        text.push(numbers.format(hlc_ms(self.hlc)).as_bytes());
        text.push(b".");
        text.push(numbers.format(hlc_logical(self.hlc)).as_bytes());
        text.push(b"@");
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 16];
        for (i, digit) in hex.iter_mut().enumerate() {
            *digit = HEX[((self.node >> (60 - 4 * i)) & 0xf) as usize];
        }
        text.push(&hex);
        text
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text().as_str())
    }
}

/// A [`Version`]'s text, held on the stack.
#[derive(Clone, Copy)]
pub struct VersionText {
    bytes: [u8; Self::CAPACITY],
    len: usize,
}

impl VersionText {
    /// Two 20-digit numbers, `.`, `@` and 16 hex digits fit.
    const CAPACITY: usize = 64;

    fn push(&mut self, part: &[u8]) {
        self.bytes[self.len..self.len + part.len()].copy_from_slice(part);
        self.len += part.len();
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits, '.', '@' and hex digits are ever pushed.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

/// A full versioned entry with its address: what travels between nodes
/// (fan-out, snapshot, merge) and what a change notification carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Namespace (`SyncData.type`).
    pub ty: i32,
    /// Key, value or tombstone, version, expiry.
    pub entry: Entry,
}

impl Record {
    /// A record of `key` in namespace `ty` holding `value`, or a tombstone
    /// when `value` is `None`.
    pub fn new(
        ty: i32,
        key: &str,
        value: Option<&str>,
        version: Version,
        expires_at_ms: u64,
    ) -> Self {
        Self {
            ty,
            entry: Entry::new(key, value, version, expires_at_ms),
        }
    }

    /// The key within the namespace.
    pub fn key(&self) -> &str {
        self.entry.key()
    }
}

/// Limits that every write, local or remote, is checked against before
/// anything is changed. Each but `max_ttl_secs` is a flag of `podcache
/// serve` (`crate::config` maps the flags onto these fields; the defaults
/// below are the flags' defaults).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest key in bytes.
    pub max_key_bytes: usize,
    /// Longest value in bytes.
    pub max_value_bytes: usize,
    /// Most entries in one batch write.
    pub max_batch_entries: usize,
    /// Remote timestamps further ahead of local wall time than this are
    /// refused (milliseconds here; the flag takes a duration).
    pub max_clock_drift_ms: u64,
    /// Longest TTL a write may ask for, in seconds.
    pub max_ttl_secs: u64,
    /// Most entries holding a value in one type; writes of new keys past it
    /// get 507 (tombstones are not counted).
    pub max_entries_per_type: usize,
    /// Most namespaces (types); a write that would create one past it gets
    /// 507 (a type exists while it holds entries or tombstones).
    pub max_types: usize,
    /// Most bytes of keys and values held in all; writes past it get 507
    /// (nothing is evicted; tombstones count their key).
    pub max_total_bytes: usize,
    /// Superseded versions kept per key for `GET .../history` and
    /// rollback (values and deletions); 0 keeps none, at most 10,000.
    pub history_versions: usize,
    /// Most bytes the kept versions may take in all (keys, values and a
    /// fixed overhead per version); the oldest kept is dropped first.
    pub history_max_bytes: usize,
}

impl Default for Limits {
    /// The one place the defaults are written: 1 KiB keys, 1 MiB values,
    /// 10,000 entries per batch, 60 s of clock drift, ten years of TTL,
    /// 5,000,000 entries per type, 1,024 types, 1 GiB held; 16 versions
    /// of history per key, 64 MiB of history in all.
    fn default() -> Self {
        Self {
            max_key_bytes: 1024,
            max_value_bytes: 1024 * 1024,
            max_batch_entries: 10_000,
            max_clock_drift_ms: 60_000,
            max_ttl_secs: 10 * 365 * 24 * 3600,
            max_entries_per_type: 5_000_000,
            max_types: 1024,
            max_total_bytes: 1024 * 1024 * 1024,
            history_versions: 16,
            history_max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Why a write was refused. Nothing is changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The key is the empty string.
    #[error("key must not be empty")]
    EmptyKey,
    /// The key is longer than [`Limits::max_key_bytes`].
    #[error("key is {len} bytes, the limit is {limit}")]
    KeyTooLong {
        /// Length of the refused key.
        len: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The value is longer than [`Limits::max_value_bytes`].
    #[error("value of key {key:?} is {len} bytes, the limit is {limit}")]
    ValueTooLarge {
        /// The key whose value was refused (truncated for display).
        key: String,
        /// Length of the refused value.
        len: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A batch holds more entries than [`Limits::max_batch_entries`].
    #[error("batch has {len} entries, the limit is {limit}")]
    BatchTooLarge {
        /// Entries in the refused batch.
        len: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A batch holds no entries.
    #[error("batch is empty")]
    EmptyBatch,
    /// The TTL is zero or longer than [`Limits::max_ttl_secs`].
    #[error("ttl must be between 1 and {max} seconds, got {got}")]
    BadTtl {
        /// The refused TTL in seconds.
        got: u64,
        /// The configured maximum.
        max: u64,
    },
    /// A remote version lies too far in the future.
    #[error(transparent)]
    ClockSkew(#[from] ClockSkewError),
    /// An entry from a peer or a file names an author, origin or reason
    /// longer than [`Meta::MAX_FIELD_BYTES`].
    #[error(
        "an entry's author, origin or reason is longer than {} bytes",
        Meta::MAX_FIELD_BYTES
    )]
    MetaTooLong,
    /// Storing the write would pass [`Limits::max_entries_per_type`] or
    /// [`Limits::max_total_bytes`]. Nothing is evicted to make room.
    #[error("store is full: {what} would be {would_be}, the limit is {limit}")]
    Full {
        /// What would pass its limit, e.g. `entries of type 7`.
        what: String,
        /// The figure the write would reach.
        would_be: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A conditional write's expectation of a key does not hold: nothing
    /// of the change was applied.
    #[error("precondition failed: key {key:?} is {}", describe_current(*.current))]
    Precondition {
        /// The first key whose expectation failed (truncated for display).
        key: String,
        /// The version the key holds now (`None`: absent, deleted or
        /// expired).
        current: Option<Version>,
    },
}

fn describe_current(current: Option<Version>) -> String {
    match current {
        Some(version) => format!("at version {version}"),
        None => "absent".to_owned(),
    }
}

/// The reserved type that holds the schemas (`crate::replica::schema`):
/// refused on every user-facing path (REST, watch, `hellorpc.Sync/Set`,
/// the library's writes). Here, below the configuration and the replica,
/// so that both name it without importing each other.
pub const SCHEMA_TYPE: i32 = i32::MIN;

/// What a conditional write expects of one key, checked under the store's
/// write lock together with the change (`If-Match`, `If-None-Match: *`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key holds a live value at exactly this version.
    Version(Version),
    /// The key holds no live value (absent, deleted or expired).
    Absent,
    /// The key holds a live value, at any version (`If-Match: *`).
    Present,
}

impl Expect {
    /// True when a key whose live version is `current` meets it.
    pub fn holds(self, current: Option<Version>) -> bool {
        match self {
            Expect::Version(v) => current == Some(v),
            Expect::Absent => current.is_none(),
            Expect::Present => current.is_some(),
        }
    }
}

/// How far past its own limits a store still takes records from peers: a
/// write one replica accepted must not be refused by the others over writes
/// in flight, but a peer cannot make a replica grow without bound either.
pub const PEER_HEADROOM: usize = 2;

/// What a merge of remote records did.
#[derive(Debug, Default)]
pub struct MergeOutcome {
    /// Records that changed this store (the newer ones).
    pub applied: Vec<Record>,
    /// Records no newer than what was held: ignored.
    pub stale: usize,
    /// Records refused by a limit, with the reason.
    pub rejected: Vec<StoreError>,
}

/// A local change, as the one write path takes it.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// Set one entry, optionally expiring after `ttl_secs`.
    Set {
        /// Namespace.
        ty: i32,
        /// Key.
        key: &'a str,
        /// Value.
        value: &'a str,
        /// Time to live in seconds, if any.
        ttl_secs: Option<u64>,
    },
    /// Set or delete many entries of one namespace, all or nothing, as one
    /// change: they share one version.
    Batch {
        /// Namespace.
        ty: i32,
        /// Keys and values; `None` deletes the key (a tombstone, written
        /// whether or not the key held a value, so the batch stays whole).
        entries: &'a [(&'a str, Option<&'a str>)],
        /// Time to live in seconds, if any.
        ttl_secs: Option<u64>,
    },
    /// Delete one entry (a tombstone); nothing happens when it is absent.
    Delete {
        /// Namespace.
        ty: i32,
        /// Key.
        key: &'a str,
    },
    /// The original `Sync/Set`: values without versions, each stamped now
    /// and merged with the normal rule, all or nothing within the limits.
    Unversioned {
        /// Namespace.
        ty: i32,
        /// Keys and values.
        entries: &'a [(&'a str, &'a str)],
    },
}

impl Change<'_> {
    /// The namespace the change writes.
    pub fn ty(&self) -> i32 {
        match self {
            Change::Set { ty, .. }
            | Change::Batch { ty, .. }
            | Change::Delete { ty, .. }
            | Change::Unversioned { ty, .. } => *ty,
        }
    }
}

/// Why a local change was refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused<E> {
    /// A limit.
    Store(StoreError),
    /// The hook run before applying (the data directory's log).
    Hook(E),
}

impl<E> Refused<E> {
    fn into_store(self) -> StoreError
    where
        E: Into<StoreError>,
    {
        match self {
            Refused::Store(e) => e,
            Refused::Hook(e) => e.into(),
        }
    }
}

/// The hook of writes that are not logged.
fn no_hook(_: &[Record]) -> Result<(), std::convert::Infallible> {
    Ok(())
}

impl From<std::convert::Infallible> for StoreError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

/// Size figures of one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NamespaceStats {
    /// Live entries (not tombstones, not expired).
    pub entries: usize,
    /// Tombstones and expired entries still held for replication.
    pub tombstones: usize,
    /// Bytes of keys and live values.
    pub bytes: usize,
}

/// One namespace: entries found by their key. The table holds one pointer
/// per entry; the key lives in the entry itself.
type Namespace = HashTable<Held>;

/// A key's slot in its namespace: its current entry, and where the
/// versions it superseded start (kept here so that a write, which already
/// holds the slot, keeps the old version without a second lookup).
#[derive(Debug)]
struct Held {
    entry: Entry,
    history: history::Head,
}

/// Entries plus the digest kept up to date with them.
#[derive(Debug)]
struct State {
    namespaces: HashMap<i32, Namespace>,
    /// The versions the current entries superseded.
    history: history::History,
    /// Entries holding a value, per namespace (for the entry limit).
    values: HashMap<i32, usize>,
    /// Bytes of every held key and value (for the byte limit).
    bytes: usize,
    /// Per bucket, the XOR of the hashes of its entries (see [`digest`]):
    /// updated on every change, so a digest costs a copy, not a scan.
    buckets: Vec<u64>,
    /// Hashes keys for the namespace tables (foldhash, seeded per process).
    hasher: hashbrown::DefaultHashBuilder,
}

/// Refuses a change that takes a namespace's entries (`values`) or the
/// bytes held from `now` to `after` past the limits times `headroom`. A
/// change that does not grow a figure already past its limit is let
/// through (limits lowered by a restart must not block deletes).
fn room_for(
    ty: i32,
    now: (usize, usize),
    after: (usize, usize),
    limits: &Limits,
    headroom: usize,
) -> Result<(), StoreError> {
    let (values, bytes) = after;
    let entry_limit = limits.max_entries_per_type.saturating_mul(headroom);
    if values > entry_limit && values > now.0 {
        return Err(StoreError::Full {
            what: format!("entries of type {ty}"),
            would_be: values,
            limit: entry_limit,
        });
    }
    let byte_limit = limits.max_total_bytes.saturating_mul(headroom);
    if bytes > byte_limit && bytes > now.1 {
        return Err(StoreError::Full {
            what: "bytes held".into(),
            would_be: bytes,
            limit: byte_limit,
        });
    }
    Ok(())
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

/// True for a tombstone written, or an entry expired, before `horizon_ms`:
/// safe to drop, and not to be taken back in.
pub fn is_purgeable(entry: &Entry, horizon_ms: u64) -> bool {
    let expires = entry.expires_at_ms();
    if expires != 0 && expires < horizon_ms {
        return true;
    }
    entry.is_tombstone() && clock::hlc_ms(entry.version().hlc) < horizon_ms
}

impl State {
    fn remove(&mut self, ty: i32, key: &str) {
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
    fn check_room<'a>(
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
    fn put_if_newer(
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
        let old = match slot {
            Slot::Occupied(mut slot) => {
                let held = slot.get_mut();
                let old = std::mem::replace(&mut held.entry, entry.clone());
                self.history.keep_newest(ty, &mut held.history, old.clone());
                Some(old)
            }
            Slot::Vacant(slot) => {
                let history = self.history.adopt(ty, hash, entry.key_bytes());
                slot.insert(Held {
                    entry: entry.clone(),
                    history,
                });
                None
            }
        };
        self.account(ty, Some(entry), old.as_ref());
        if old.is_some() {
            self.compact_history();
        }
        Ok(true)
    }

    /// Closes the history's holes when they are worth a pass over every
    /// key's slot (each holds its key's history head).
    fn compact_history(&mut self) {
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

    fn new(limits: &Limits) -> Self {
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
    fn put(&mut self, ty: i32, entry: Entry) {
        let hasher = &self.hasher;
        let hash = hasher.hash_one(entry.key_bytes());
        let ns = self.namespaces.entry(ty).or_default();
        let old = match ns.entry(
            hash,
            |held| held.entry.key_bytes() == entry.key_bytes(),
            |held| hasher.hash_one(held.entry.key_bytes()),
        ) {
            Slot::Occupied(mut slot) => {
                let held = slot.get_mut();
                let old = std::mem::replace(&mut held.entry, entry.clone());
                // The held entry is newer than all its key keeps; should a
                // caller store an older one over it, the next superseded
                // version is kept as a late one.
                if supersedes(&entry, &old) {
                    self.history.keep_newest(ty, &mut held.history, old.clone());
                } else {
                    self.history.keep_late(ty, &mut held.history, old.clone());
                }
                Some(old)
            }
            Slot::Vacant(slot) => {
                let history = self.history.adopt(ty, hash, entry.key_bytes());
                slot.insert(Held {
                    entry: entry.clone(),
                    history,
                });
                None
            }
        };
        self.account(ty, Some(&entry), old.as_ref());
        if old.is_some() {
            self.compact_history();
        }
    }

    /// Every record (tombstones included) whose type and entry pass `keep`.
    fn records_where(&self, keep: impl Fn(i32, &Entry) -> bool) -> Vec<Record> {
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

    fn get(&self, ty: i32, key: &str) -> Option<&Entry> {
        self.held(ty, key).0.map(|h| &h.entry)
    }

    /// Where the kept versions of a key start, held or not.
    fn history_head(&self, ty: i32, key: &str) -> history::Head {
        match self.held(ty, key) {
            (Some(held), _) => held.history,
            (None, hash) => self.history.orphan_head(ty, hash, key.as_bytes()),
        }
    }
}

/// Checks every expectation of a conditional write against `state`.
fn check_guards(
    state: &State,
    ty: i32,
    guards: &[(&str, Expect)],
    now_ms: u64,
) -> Result<(), StoreError> {
    for &(key, expect) in guards {
        let current = state
            .get(ty, key)
            .filter(|e| e.is_live(now_ms))
            .map(Entry::version);
        if !expect.holds(current) {
            return Err(StoreError::Precondition {
                key: key.chars().take(64).collect(),
                current,
            });
        }
    }
    Ok(())
}

/// The thread-safe store of one node.
#[derive(Debug)]
pub struct Store {
    /// This node's id, stamped into the version of every local write.
    node_id: u64,
    /// Orders local writes after everything seen; shared by all writers.
    clock: HybridClock,
    /// Checked before any change.
    limits: Limits,
    /// Namespaces by type and their digest. One lock: writes are short and
    /// never await.
    state: RwLock<State>,
}

impl Store {
    /// An empty store for node `node_id`.
    pub fn new(node_id: u64, limits: Limits) -> Self {
        Self {
            node_id,
            clock: HybridClock::new(limits.max_clock_drift_ms),
            state: RwLock::new(State::new(&limits)),
            limits,
        }
    }

    /// The limits this store enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The node id stamped into local writes.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The hybrid clock of this store.
    pub fn clock(&self) -> &HybridClock {
        &self.clock
    }

    /// The version of a new local write: a fresh tick, this node's id.
    fn next_version(&self, now_ms: u64) -> Version {
        Version {
            hlc: self.clock.tick(now_ms),
            node: self.node_id,
        }
    }

    fn check_key(&self, key: &str) -> Result<(), StoreError> {
        if key.is_empty() {
            return Err(StoreError::EmptyKey);
        }
        if key.len() > self.limits.max_key_bytes {
            return Err(StoreError::KeyTooLong {
                len: key.len(),
                limit: self.limits.max_key_bytes,
            });
        }
        Ok(())
    }

    fn check_value(&self, key: &str, value: &str) -> Result<(), StoreError> {
        if value.len() > self.limits.max_value_bytes {
            return Err(StoreError::ValueTooLarge {
                key: key.chars().take(64).collect(),
                len: value.len(),
                limit: self.limits.max_value_bytes,
            });
        }
        Ok(())
    }

    fn expiry(&self, ttl_secs: Option<u64>, now_ms: u64) -> Result<u64, StoreError> {
        match ttl_secs {
            None => Ok(0),
            Some(got) if got == 0 || got > self.limits.max_ttl_secs => Err(StoreError::BadTtl {
                got,
                max: self.limits.max_ttl_secs,
            }),
            Some(secs) => Ok(now_ms.saturating_add(secs.saturating_mul(1000))),
        }
    }

    /// Checks a local batch against the limits without changing anything.
    pub fn check_batch<'a>(
        &self,
        entries: impl ExactSizeIterator<Item = (&'a str, Option<&'a str>)>,
        ttl_secs: Option<u64>,
    ) -> Result<(), StoreError> {
        let len = entries.len();
        if len == 0 {
            return Err(StoreError::EmptyBatch);
        }
        if len > self.limits.max_batch_entries {
            return Err(StoreError::BatchTooLarge {
                len,
                limit: self.limits.max_batch_entries,
            });
        }
        self.expiry(ttl_secs, 0)?;
        for (key, value) in entries {
            self.check_key(key)?;
            if let Some(value) = value {
                self.check_value(key, value)?;
            }
        }
        Ok(())
    }

    /// A local write of one entry: validated, stamped with a new version,
    /// stored. Returns the record to fan out.
    ///
    /// Tests and fuzzing only (features `testsuite`, `fuzzing`): it skips
    /// the data directory's log and the change index, which every write
    /// of a running node goes through (the replica's write path).
    #[cfg(any(test, feature = "testsuite", feature = "fuzzing"))]
    pub fn set(
        &self,
        ty: i32,
        key: &str,
        value: &str,
        ttl_secs: Option<u64>,
        now_ms: u64,
    ) -> Result<Record, StoreError> {
        let mut records = self.set_many(ty, [(key, value)].into_iter(), ttl_secs, now_ms)?;
        // set_many returns exactly one record per input entry.
        Ok(records.remove(0))
    }

    /// A local write of many entries of one namespace, all or nothing: every
    /// entry is checked before the first is stored.
    ///
    /// Tests and fuzzing only, as `Store::set`.
    #[cfg(any(test, feature = "testsuite", feature = "fuzzing"))]
    pub fn set_many<'a>(
        &self,
        ty: i32,
        entries: impl ExactSizeIterator<Item = (&'a str, &'a str)> + Clone,
        ttl_secs: Option<u64>,
        now_ms: u64,
    ) -> Result<Vec<Record>, StoreError> {
        let entries: Vec<(&str, Option<&str>)> = entries.map(|(k, v)| (k, Some(v))).collect();
        let change = if entries.len() == 1 {
            let (key, value) = entries[0];
            Change::Set {
                ty,
                key,
                value: value.unwrap_or_default(),
                ttl_secs,
            }
        } else {
            Change::Batch {
                ty,
                entries: &entries,
                ttl_secs,
            }
        };
        self.commit(change, now_ms, None, no_hook)
            .map_err(Refused::into_store)
    }

    /// A local delete. Writes a tombstone and returns it, or `None` when the
    /// key holds no live value (absent, already deleted, or expired).
    ///
    /// Tests and fuzzing only, as `Store::set`.
    #[cfg(any(test, feature = "testsuite", feature = "fuzzing"))]
    pub fn delete(&self, ty: i32, key: &str, now_ms: u64) -> Result<Option<Record>, StoreError> {
        self.commit(Change::Delete { ty, key }, now_ms, None, no_hook)
            .map(|mut records| records.pop())
            .map_err(Refused::into_store)
    }

    /// A write that comes from outside the version system (the original
    /// `hellorpc.Sync/Set`): stamped like a local write, but merged with
    /// the normal rule so it never overwrites a newer entry.
    pub fn apply_unversioned<'a>(
        &self,
        ty: i32,
        entries: &[(&'a str, &'a str)],
        now_ms: u64,
    ) -> Result<Vec<Record>, StoreError> {
        self.commit(Change::Unversioned { ty, entries }, now_ms, None, no_hook)
            .map_err(Refused::into_store)
    }

    /// A local change: checked against every limit, stamped with new
    /// versions, then given to `before_apply` (the data directory's log)
    /// and stored only if that succeeds, all under one lock. Nothing is
    /// changed when it returns an error. Returns the stored records (none
    /// for a delete of an absent key). `meta` says who wrote it (shared by
    /// every entry of the change).
    pub fn commit<E>(
        &self,
        change: Change<'_>,
        now_ms: u64,
        meta: Option<Arc<Meta>>,
        before_apply: impl FnOnce(&[Record]) -> Result<(), E>,
    ) -> Result<Vec<Record>, Refused<E>> {
        self.commit_guarded(change, &[], now_ms, meta, before_apply)
    }

    /// [`Store::commit`] of a conditional write: every expectation in
    /// `guards` (keys of the change's namespace) is checked under the same
    /// lock as the change, and a failed one refuses the whole change with
    /// [`StoreError::Precondition`]. The original `Sync/Set` takes none.
    pub fn commit_guarded<E>(
        &self,
        change: Change<'_>,
        guards: &[(&str, Expect)],
        now_ms: u64,
        meta: Option<Arc<Meta>>,
        before_apply: impl FnOnce(&[Record]) -> Result<(), E>,
    ) -> Result<Vec<Record>, Refused<E>> {
        match change {
            Change::Set {
                ty,
                key,
                value,
                ttl_secs,
            } => self.commit_set(
                ty,
                [(key, Some(value))].into_iter(),
                (ttl_secs, guards),
                now_ms,
                meta,
                before_apply,
            ),
            Change::Batch {
                ty,
                entries,
                ttl_secs,
            } => self.commit_set(
                ty,
                entries.iter().copied(),
                (ttl_secs, guards),
                now_ms,
                meta,
                before_apply,
            ),
            Change::Delete { ty, key } => {
                self.check_key(key).map_err(Refused::Store)?;
                let mut state = self.write_lock();
                check_guards(&state, ty, guards, now_ms).map_err(Refused::Store)?;
                if state.get(ty, key).is_none_or(|e| !e.is_live(now_ms)) {
                    return Ok(Vec::new());
                }
                let tombstone = Record {
                    ty,
                    entry: Entry::with_meta(key, None, self.next_version(now_ms), 0, meta),
                };
                before_apply(std::slice::from_ref(&tombstone)).map_err(Refused::Hook)?;
                state.put(ty, tombstone.entry.clone());
                Ok(vec![tombstone])
            }
            Change::Unversioned { ty, entries } => {
                if let Some((key, _)) = guards.first() {
                    // Not reachable from any caller: the original protocol
                    // has no conditions. Refused rather than ignored.
                    return Err(Refused::Store(StoreError::Precondition {
                        key: key.chars().take(64).collect(),
                        current: None,
                    }));
                }
                self.check_batch(entries.iter().map(|(k, v)| (*k, Some(*v))), None)
                    .map_err(Refused::Store)?;
                let mut state = self.write_lock();
                // Not a peer's replication but a client's write: all or
                // nothing within the limits, no headroom.
                state
                    .check_room(
                        ty,
                        entries.iter().map(|(k, v)| (*k, Some(*v))),
                        &self.limits,
                        1,
                    )
                    .map_err(Refused::Store)?;
                let records: Vec<Record> = entries
                    .iter()
                    .map(|(key, value)| Record {
                        ty,
                        entry: Entry::with_meta(
                            key,
                            Some(value),
                            self.next_version(now_ms),
                            0,
                            meta.clone(),
                        ),
                    })
                    .collect();
                before_apply(&records).map_err(Refused::Hook)?;
                let mut applied = Vec::with_capacity(records.len());
                for record in records {
                    // Fresh versions: newer than anything held, unless a
                    // peer's clock is ahead of this one.
                    if let Ok(true) =
                        state.put_if_newer(ty, &record.entry, &self.limits, usize::MAX)
                    {
                        applied.push(record);
                    }
                }
                Ok(applied)
            }
        }
    }

    /// A set, or a batch: every entry checked first, then all stored under
    /// one version (a batch is one change).
    fn commit_set<'a, E>(
        &self,
        ty: i32,
        entries: impl ExactSizeIterator<Item = (&'a str, Option<&'a str>)> + Clone,
        (ttl_secs, guards): (Option<u64>, &[(&str, Expect)]),
        now_ms: u64,
        meta: Option<Arc<Meta>>,
        before_apply: impl FnOnce(&[Record]) -> Result<(), E>,
    ) -> Result<Vec<Record>, Refused<E>> {
        self.check_batch(entries.clone(), ttl_secs)
            .map_err(Refused::Store)?;
        // One version for all: a key named twice keeps its last value
        // (two entries of one key and one version would be told apart by
        // the tie rule elsewhere, not by their order).
        let entries: Vec<(&str, Option<&str>)> = if entries.len() > 1 {
            let mut last: HashMap<&str, usize> = HashMap::with_capacity(entries.len());
            let all: Vec<_> = entries.collect();
            for (i, (key, _)) in all.iter().enumerate() {
                last.insert(key, i);
            }
            all.iter()
                .enumerate()
                .filter(|(i, (key, _))| last.get(key) == Some(i))
                .map(|(_, e)| *e)
                .collect()
        } else {
            entries.collect()
        };
        let entries = entries.iter().copied();
        let expires_at_ms = self.expiry(ttl_secs, now_ms).map_err(Refused::Store)?;
        let mut state = self.write_lock();
        check_guards(&state, ty, guards, now_ms).map_err(Refused::Store)?;
        state
            .check_room(ty, entries.clone(), &self.limits, 1)
            .map_err(Refused::Store)?;
        let version = self.next_version(now_ms);
        let records: Vec<Record> = entries
            .map(|(key, value)| Record {
                ty,
                entry: Entry::with_meta(
                    key,
                    value,
                    version,
                    if value.is_some() { expires_at_ms } else { 0 },
                    meta.clone(),
                ),
            })
            .collect();
        before_apply(&records).map_err(Refused::Hook)?;
        for record in &records {
            state.put(ty, record.entry.clone());
        }
        Ok(records)
    }

    /// Loads records read back from the data directory: merged by version,
    /// without the capacity limits (a restart with lower limits must not
    /// lose what was stored), and only then are tombstones and expired
    /// entries older than `purge_horizon_ms` dropped. A record is never
    /// left out before the merge: an old value must meet the tombstone (or
    /// the expired value) that replaced it, or it would come back. Returns
    /// how many entries are kept.
    pub fn load(
        &self,
        records: impl IntoIterator<Item = Record>,
        now_ms: u64,
        purge_horizon_ms: u64,
    ) -> usize {
        let mut state = self.write_lock();
        for record in records {
            // Later local writes order after what was stored (a version
            // from a clock far ahead is not absorbed, as in a merge).
            let _ = self.clock.observe(record.entry.version().hlc, now_ms);
            let _ = state.put_if_newer(record.ty, &record.entry, &self.limits, usize::MAX);
        }
        let purged = Self::doomed(&state, |_, e| is_purgeable(e, purge_horizon_ms));
        for (ty, entry) in &purged {
            state.remove(*ty, entry.key());
        }
        state.namespaces.values().map(|ns| ns.len()).sum()
    }

    /// Merges records from a peer with the merge rule. Each record is checked
    /// on its own: a refused one is reported and skipped, the others apply.
    ///
    /// Tombstones and expired entries older than `purge_horizon_ms` are not
    /// taken in: every replica has dropped (or is about to drop) them.
    ///
    /// Tests and fuzzing only, as `Store::set`.
    #[cfg(any(test, feature = "testsuite", feature = "fuzzing"))]
    pub fn merge(&self, records: impl IntoIterator<Item = Record>, now_ms: u64) -> MergeOutcome {
        self.merge_with_horizon(records, now_ms, 0)
    }

    /// `Store::merge`, ignoring purgeable records older than the horizon.
    ///
    /// Tests and fuzzing only, as `Store::set`.
    #[cfg(any(test, feature = "testsuite", feature = "fuzzing"))]
    pub fn merge_with_horizon(
        &self,
        records: impl IntoIterator<Item = Record>,
        now_ms: u64,
        purge_horizon_ms: u64,
    ) -> MergeOutcome {
        self.merge_logged(records, now_ms, purge_horizon_ms, |_| {})
    }

    /// A merge ignoring purgeable records older than a horizon, giving
    /// what changed the store to
    /// `after_apply` (the data directory's log) under the same lock, so
    /// the log sees changes in the order the store took them.
    pub fn merge_logged(
        &self,
        records: impl IntoIterator<Item = Record>,
        now_ms: u64,
        purge_horizon_ms: u64,
        after_apply: impl FnOnce(&[Record]),
    ) -> MergeOutcome {
        let mut state = self.write_lock();
        let outcome =
            self.merge_locked(&mut state, records, now_ms, purge_horizon_ms, PEER_HEADROOM);
        after_apply(&outcome.applied);
        outcome
    }

    fn merge_locked(
        &self,
        state: &mut State,
        records: impl IntoIterator<Item = Record>,
        now_ms: u64,
        purge_horizon_ms: u64,
        headroom: usize,
    ) -> MergeOutcome {
        let mut outcome = MergeOutcome::default();
        for record in records {
            if let Err(err) = self.check_remote(&record, now_ms) {
                outcome.rejected.push(err);
                continue;
            }
            if is_purgeable(&record.entry, purge_horizon_ms) {
                outcome.stale += 1;
                continue;
            }
            let _ = self.clock.observe(record.entry.version().hlc, now_ms);
            match state.put_if_newer(record.ty, &record.entry, &self.limits, headroom) {
                Ok(true) => outcome.applied.push(record),
                Ok(false) => outcome.stale += 1,
                Err(err) => outcome.rejected.push(err),
            }
        }
        outcome
    }

    fn check_remote(&self, record: &Record, now_ms: u64) -> Result<(), StoreError> {
        self.check_key(record.key())?;
        if record.entry.meta().is_some_and(|m| !m.within_limits()) {
            return Err(StoreError::MetaTooLong);
        }
        if let Some(value) = record.entry.value() {
            self.check_value(record.key(), value)?;
        }
        self.clock.check(record.entry.version().hlc, now_ms)?;
        Ok(())
    }

    /// The entry of one key, if it holds a live value (shared, not copied).
    pub fn get(&self, ty: i32, key: &str, now_ms: u64) -> Option<Entry> {
        let state = self.read_lock();
        let entry = state.get(ty, key)?;
        entry.is_live(now_ms).then(|| entry.clone())
    }

    /// Every live entry of one namespace, sorted by key.
    pub fn namespace(&self, ty: i32, now_ms: u64) -> Vec<Entry> {
        let mut entries: Vec<Entry> = {
            let state = self.read_lock();
            state
                .namespaces
                .get(&ty)
                .map(|ns| {
                    ns.iter()
                        .map(|h| &h.entry)
                        .filter(|e| e.is_live(now_ms))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        };
        entries.sort_unstable_by(|a, b| a.key_bytes().cmp(b.key_bytes()));
        entries
    }

    /// [`Store::namespace`] as owned (key, value) pairs, sorted by key: what
    /// whole-map answers (`Sync/GetAll`, snapshots for the library) hold.
    pub fn namespace_pairs(&self, ty: i32, now_ms: u64) -> impl Iterator<Item = (String, String)> {
        self.namespace(ty, now_ms)
            .into_iter()
            .filter_map(|e| Some((e.key().to_owned(), e.value()?.to_owned())))
    }

    /// The namespaces that exist, sorted.
    pub fn types(&self) -> Vec<i32> {
        let mut types: Vec<i32> = self.read_lock().namespaces.keys().copied().collect();
        types.sort_unstable();
        types
    }

    /// Every record held, tombstones and expired entries included, for a
    /// peer's bootstrap. Keys and values are shared, not copied, so this
    /// costs a few machine words per entry.
    pub fn snapshot(&self) -> Vec<Record> {
        self.records_where(|_, _| true)
    }

    /// Every record (tombstones included) whose type and entry pass `keep`.
    fn records_where(&self, keep: impl Fn(i32, &Entry) -> bool) -> Vec<Record> {
        State::records_where(&self.read_lock(), keep)
    }

    /// The digest: one hash per bucket over the keys, versions and expiry of
    /// its entries (tombstones included). Equal digests mean equal states.
    pub fn digest(&self) -> Vec<u64> {
        self.read_lock().buckets.clone()
    }

    /// Every record in the given buckets.
    pub fn bucket_records(&self, buckets: &[u32]) -> Vec<Record> {
        let wanted: std::collections::HashSet<usize> =
            buckets.iter().map(|b| *b as usize).collect();
        self.records_where(|ty, e| wanted.contains(&digest::bucket_of(ty, e.key_bytes())))
    }

    /// Every record in the given buckets, grouped by bucket, in one pass.
    pub fn records_by_bucket(&self, buckets: &[u32]) -> HashMap<u32, Vec<Record>> {
        let mut wanted = vec![false; digest::BUCKETS];
        for bucket in buckets {
            if let Some(slot) = wanted.get_mut(*bucket as usize) {
                *slot = true;
            }
        }
        let state = self.read_lock();
        let mut out: HashMap<u32, Vec<Record>> = HashMap::new();
        for (&ty, ns) in state.namespaces.iter() {
            for Held { entry, .. } in ns {
                let bucket = digest::bucket_of(ty, entry.key_bytes());
                if wanted[bucket] {
                    out.entry(bucket as u32).or_default().push(Record {
                        ty,
                        entry: entry.clone(),
                    });
                }
            }
        }
        out
    }

    /// Drops local entries that `keep` does not name, except those `spare`
    /// protects: used by a full resync, where the peer's snapshot is the
    /// truth about what was deleted (and purged) while this node was away.
    /// Returns a tombstone of each dropped entry at its version, for the
    /// watchers' delete events. No record can say "absent" to the data
    /// directory (a tombstone at the value's own version would outrank a
    /// copy of that value elsewhere while digests call them equal), so the
    /// caller has a snapshot written instead.
    pub fn drop_absent(
        &self,
        keep: &std::collections::HashSet<(i32, &str)>,
        spare: impl Fn(&Entry) -> bool,
    ) -> Vec<Record> {
        let mut state = self.write_lock();
        let found = Self::doomed(&state, |ty, entry| {
            !spare(entry) && !keep.contains(&(ty, entry.key()))
        });
        let mut tombstones = Vec::with_capacity(found.len());
        for (ty, entry) in &found {
            state.remove(*ty, entry.key());
            tombstones.push(Record {
                ty: *ty,
                entry: Entry::new(entry.key(), None, entry.version(), 0),
            });
        }
        tombstones
    }

    /// The entries of `state` for which `doomed` is true.
    fn doomed(state: &State, doomed: impl Fn(i32, &Entry) -> bool) -> Vec<(i32, Entry)> {
        let mut found = Vec::new();
        for (&ty, ns) in state.namespaces.iter() {
            found.extend(
                ns.iter()
                    .filter(|h| doomed(ty, &h.entry))
                    .map(|h| (ty, h.entry.clone())),
            );
        }
        found
    }

    /// Removes every entry for which `doomed` is true; returns how many.
    fn remove_where(&self, doomed: impl Fn(i32, &Entry) -> bool) -> usize {
        let mut state = self.write_lock();
        let found = Self::doomed(&state, doomed);
        for (ty, entry) in &found {
            state.remove(*ty, entry.key());
        }
        found.len()
    }

    /// Bytes of keys and values held (what [`Limits::max_total_bytes`]
    /// caps).
    pub fn held_bytes(&self) -> usize {
        self.read_lock().bytes
    }

    /// Size figures per namespace.
    pub fn stats(&self, now_ms: u64) -> BTreeMap<i32, NamespaceStats> {
        let state = self.read_lock();
        state
            .namespaces
            .iter()
            .map(|(&ty, ns)| {
                let mut stats = NamespaceStats::default();
                for Held { entry, .. } in ns {
                    if entry.is_live(now_ms) {
                        stats.entries += 1;
                        stats.bytes += entry.size();
                    } else {
                        stats.tombstones += 1;
                    }
                }
                (ty, stats)
            })
            .collect()
    }

    /// Drops tombstones and expired entries older than `grace_ms`. Their
    /// times travel with them, so every replica drops them alike; the grace
    /// keeps them long enough that no older live copy can come back through
    /// replication (it must be longer than any repair window).
    pub fn purge(&self, now_ms: u64, grace_ms: u64) -> usize {
        let horizon = now_ms.saturating_sub(grace_ms);
        self.remove_where(|_, entry| is_purgeable(entry, horizon))
    }

    /// The current entry of a key (a tombstone or an expired one too) and
    /// the versions it superseded, newest first.
    pub fn history(&self, ty: i32, key: &str) -> (Option<Entry>, Vec<Entry>) {
        let state = self.read_lock();
        (
            state.get(ty, key).cloned(),
            state.history.versions(state.history_head(ty, key)),
        )
    }

    /// Version `version` of a key: the current entry or a kept one.
    pub fn version_of(&self, ty: i32, key: &str, version: Version) -> Option<Entry> {
        let state = self.read_lock();
        match state.get(ty, key) {
            Some(current) if current.version() == version => Some(current.clone()),
            _ => state.history.version(state.history_head(ty, key), version),
        }
    }

    /// The current state and the kept versions, under one lock (a
    /// version a write moved into history between two reads would be in
    /// neither, nor in the log that follows the snapshot).
    pub fn snapshot_with_history(&self) -> (Vec<Record>, Vec<Record>) {
        let state = self.read_lock();
        (
            State::records_where(&state, |_, _| true),
            state.history.records(),
        )
    }

    /// Takes back kept versions read from the data directory.
    pub fn keep_history(&self, records: impl IntoIterator<Item = Record>) {
        let mut state = self.write_lock();
        let state = &mut *state;
        for Record { ty, entry } in records {
            let hash = state.hasher.hash_one(entry.key_bytes());
            let held = state
                .namespaces
                .get_mut(&ty)
                .and_then(|ns| ns.find_mut(hash, |h| h.entry.key_bytes() == entry.key_bytes()));
            match held {
                Some(held) if held.entry.version() == entry.version() => {}
                Some(held) => state.history.keep_late(ty, &mut held.history, entry),
                None => state.history.keep_orphan(ty, hash, entry),
            }
            state.compact_history();
        }
    }

    /// Versions kept as history, and the bytes they are counted as.
    pub fn history_size(&self) -> (usize, usize) {
        self.read_lock().history.size()
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-written entry
        // (every mutation is one insert or remove with its digest update),
        // so a poisoned lock is still consistent.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests;
