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
//! # Files
//! - `mod.rs`: the [`Store`] (one lock around the state), its reads and
//!   its write paths ([`Change`], [`Expect`], merges, loads), the checks of
//!   one write's key, value, TTL and batch size, and the re-exports: every
//!   public name is reached as `store::Name`, whichever file holds it.
//! - `version.rs`: [`Version`] and its text, [`VersionText`].
//! - `entry.rs`: [`Entry`] and [`Meta`], one stored entry.
//! - `record.rs`: [`Record`], an entry with its namespace.
//! - `limits.rs`: [`Limits`], [`StoreError`], [`PEER_HEADROOM`] and the
//!   check of a namespace's entries and the bytes held against the limits.
//! - `state.rs`: the map behind the lock (namespaces, the digest's buckets,
//!   the counts the limits need, the hooks into the history) and the merge
//!   rule, [`supersedes`].
//! - `clock.rs`, `digest.rs`, `history.rs`: the hybrid clock, the digest
//!   of anti-entropy, the superseded versions kept per key.
//! - `tests.rs`: the unit and property tests.
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
mod limits;
mod record;
mod state;
mod version;

/// Most superseded versions a key may keep (`--history-versions`).
pub const MAX_HISTORY_VERSIONS: usize = history::MAX_VERSIONS;

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, PoisonError, RwLock};

pub use self::entry::{Entry, Meta};
pub use self::limits::{Limits, PEER_HEADROOM, StoreError};
pub use self::record::Record;
pub use self::state::supersedes;
pub use self::version::{Version, VersionText};

use self::clock::HybridClock;
use self::state::{Held, State};

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

/// True for a tombstone written, or an entry expired, before `horizon_ms`:
/// safe to drop, and not to be taken back in.
pub fn is_purgeable(entry: &Entry, horizon_ms: u64) -> bool {
    let expires = entry.expires_at_ms();
    if expires != 0 && expires < horizon_ms {
        return true;
    }
    entry.is_tombstone() && clock::hlc_ms(entry.version().hlc) < horizon_ms
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
