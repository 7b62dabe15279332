//! What every peer has still to receive of this node's own writes: one
//! change index shared by all peers, with a cursor per peer.
//!
//! Owns: the pending state of fan-out (epochs, cursors, their merging and
//! release) and the acknowledgement frontier each `?wait=all` waits on.
//! Must not touch: sockets, tasks, the store's merge rule. Everything here
//! is synchronous and deterministic; the links (`crate::replication`) take
//! epochs out and report acknowledgements, the write path appends.
//!
//! # The structure
//! Local writes go into the *open epoch*: a map from `(type, key)` to the
//! latest entry this node wrote for it, so a key written a thousand times
//! while a batch is in flight is held (and sent) once. When a link is ready
//! to send and its next epoch is the open one, it *seals* it (a new open
//! epoch starts) and sends it; every other link sends the same sealed
//! epoch, shared, when it gets there. Each cursor holds the epoch it sends
//! next; an epoch that every cursor has passed is dropped.
//!
//! Two sealed epochs next to each other are merged (the later one's entries
//! win) as soon as no cursor stands between them and none is sending
//! either. So a peer that is down or slow holds one epoch being retried and
//! one that grows with every key written meanwhile, and memory is bounded
//! by the number of distinct keys, not by the number of writes, whatever
//! the write rate: nothing is ever dropped for a peer that is tracked. A
//! pending key costs one slot (the type and a shared pointer to the entry,
//! ~20 bytes with the table's slack) per epoch it is in, not per peer.
//!
//! # Why whole epochs, applied whole
//! The promise is that a replica never shows a later write of this node
//! without its earlier writes (or newer values of them). Sending current
//! values key by key in any order cannot keep it: after writes `A=1, B=1,
//! A=2`, a batch holding only `A=2` shows `A=2` without `B=1`, and one
//! holding only `B=1` shows it without `A=1`. An epoch holds, for every key
//! written between two seals, its value at the later seal, so a peer that
//! applies each epoch at once (one store lock; an epoch cut into several
//! requests is held by the peer until its last one) moves from this node's
//! state at one seal to its state at the next. [`Taken::last_hlc`] is that
//! seal: every local write at or below it is at the peer once the epoch is
//! acknowledged, which is what `?wait=all` waits for.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry as Slot;
use tokio::sync::watch;

use crate::store::{Entry, Record};

/// Names one peer's cursor.
pub(crate) type CursorId = u64;

/// How a delivery report names a peer: its address, and its name and last
/// error as its link last saw them.
#[derive(Debug)]
pub(crate) struct PeerLabel {
    /// The peer's dial address.
    pub(crate) addr: String,
    detail: std::sync::Mutex<(Option<String>, Option<String>)>,
}

impl PeerLabel {
    pub(crate) fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            detail: Default::default(),
        }
    }

    fn detail(&self) -> std::sync::MutexGuard<'_, (Option<String>, Option<String>)> {
        // Plain assignments only: never half-done.
        self.detail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The peer's name, once known.
    pub(crate) fn name(&self) -> Option<String> {
        self.detail().0.clone()
    }

    /// The last error talking to the peer, if the last exchange failed.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.detail().1.clone()
    }

    pub(crate) fn set_name(&self, name: Option<String>) {
        self.detail().0 = name;
    }

    pub(crate) fn set_last_error(&self, error: Option<String>) {
        self.detail().1 = error;
    }
}

/// What a `?wait=all` write waits on for one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frontier {
    /// Every local write with a hybrid timestamp at or below this is at the
    /// peer (or a newer value of its key is).
    pub(crate) acked_hlc: u64,
    /// Whether writes are still tracked for the peer.
    pub(crate) tracking: Tracking,
}

/// Whether a cursor still tracks writes for its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tracking {
    /// Every write is kept for the peer until it acknowledges it.
    Live,
    /// The peer did not answer for longer than the retention: its pending
    /// writes were released; anti-entropy repairs it when it returns.
    Released,
    /// The peer left the membership.
    Gone,
}

/// An epoch handed to a link to send.
#[derive(Debug, Clone)]
pub(crate) struct Taken {
    /// The epoch's id, to acknowledge it with.
    pub(crate) epoch: u64,
    /// Its entries, oldest write first, shared by every link that sends it.
    pub(crate) records: Arc<[Record]>,
    /// The seal: the highest local timestamp in the epoch.
    pub(crate) last_hlc: u64,
    /// The epoch's requests as they go on the wire, shared by the links
    /// that send it at the same time (see [`Encoded`]).
    pub(crate) encoded: Arc<Encoded>,
}

/// An epoch's wire form, opaque here: the transport encodes it once and
/// every link sending the epoch meanwhile sends the same bytes. Only a weak
/// reference is kept: the bytes live while some link is sending them, so
/// an epoch waiting for a slow peer is not held twice (as entries and as
/// bytes); a link that takes it later encodes it again.
#[derive(Debug, Default)]
pub(crate) struct Encoded(std::sync::Mutex<std::sync::Weak<Vec<bytes::Bytes>>>);

impl Encoded {
    /// The requests, encoded by `encode` unless a link sending them still
    /// holds them. Links asking meanwhile wait for the one encoding.
    pub(crate) fn get_or_encode(
        &self,
        encode: impl FnOnce() -> Vec<bytes::Bytes>,
    ) -> Arc<Vec<bytes::Bytes>> {
        let mut slot = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(requests) = slot.upgrade() {
            return requests;
        }
        let requests = Arc::new(encode());
        *slot = Arc::downgrade(&requests);
        requests
    }
}

/// Entries and bytes waiting for one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Pending {
    /// Entries (a key counts once per epoch it is in).
    pub(crate) entries: usize,
    /// Bytes of their keys and values.
    pub(crate) bytes: usize,
}

struct Epoch {
    /// Ids only grow; merging keeps the earlier id.
    id: u64,
    /// The latest local entry of each key written in (or merged into) this
    /// epoch, found by `(type, key)`.
    entries: HashTable<(i32, Entry)>,
    /// Bytes of the keys and values in `entries`.
    bytes: usize,
    /// The highest local timestamp in the epoch (0 while empty).
    last_hlc: u64,
    /// The entries as sent, built when a link first takes the epoch and
    /// shared by every link that sends it. Sealed epochs only. While it is
    /// set, `entries` is empty: the table is dropped when the epoch is
    /// frozen (a large backlog would otherwise be held twice), and built
    /// again only if the epoch is merged later.
    frozen: Option<Frozen>,
}

/// A sealed epoch as links send it.
#[derive(Clone)]
struct Frozen {
    records: Arc<[Record]>,
    encoded: Arc<Encoded>,
}

impl Epoch {
    fn new(id: u64) -> Self {
        Self {
            id,
            entries: HashTable::new(),
            bytes: 0,
            last_hlc: 0,
            frozen: None,
        }
    }

    fn len(&self) -> usize {
        self.frozen
            .as_ref()
            .map_or(self.entries.len(), |f| f.records.len())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Builds the table again from the frozen entries, to merge into it.
    fn thaw(&mut self, hasher: &impl BuildHasher) {
        if let Some(frozen) = self.frozen.take() {
            self.bytes = 0;
            for record in frozen.records.iter() {
                self.put(hasher, record.ty, record.entry.clone(), true);
            }
        }
    }

    /// Puts `entry` for `ty`: it replaces what the key held here when it is
    /// newer (a merge brings older epochs' entries in too).
    fn put(&mut self, hasher: &impl BuildHasher, ty: i32, entry: Entry, newer_only: bool) {
        let hash = hash_of(hasher, ty, entry.key_bytes());
        self.last_hlc = self.last_hlc.max(entry.version().hlc);
        match self.entries.entry(
            hash,
            |(t, e)| *t == ty && e.key_bytes() == entry.key_bytes(),
            |(t, e)| hash_of(hasher, *t, e.key_bytes()),
        ) {
            Slot::Occupied(mut slot) => {
                let held = &mut slot.get_mut().1;
                if newer_only && held.version() >= entry.version() {
                    return;
                }
                self.bytes = self.bytes - held.size() + entry.size();
                *held = entry;
            }
            Slot::Vacant(slot) => {
                self.bytes += entry.size();
                slot.insert((ty, entry));
            }
        }
    }

    fn freeze(&mut self) -> Frozen {
        if let Some(frozen) = &self.frozen {
            return frozen.clone();
        }
        let mut records: Vec<Record> = std::mem::take(&mut self.entries)
            .into_iter()
            .map(|(ty, entry)| Record { ty, entry })
            .collect();
        // Oldest write first: a peer that cannot hold an epoch back until
        // its end (a legacy or older peer) then sees writes in their order.
        records.sort_unstable_by_key(|r| r.entry.version());
        let frozen = Frozen {
            records: records.into(),
            encoded: Arc::default(),
        };
        self.frozen = Some(frozen.clone());
        frozen
    }
}

fn hash_of(hasher: &impl BuildHasher, ty: i32, key: &[u8]) -> u64 {
    hasher.hash_one((ty, key))
}

struct Cursor {
    /// Who the peer is, for delivery reports.
    label: Arc<PeerLabel>,
    /// The id of the epoch to send next.
    next: u64,
    /// True while epoch `next` is handed out and not yet acknowledged.
    taken: bool,
    /// What `?wait=all` waits on.
    frontier: watch::Sender<Frontier>,
}

impl Cursor {
    fn tracking(&self) -> Tracking {
        self.frontier.borrow().tracking
    }

    fn live(&self) -> bool {
        self.tracking() == Tracking::Live
    }

    fn set_tracking(&self, tracking: Tracking) {
        self.frontier.send_modify(|f| f.tracking = tracking);
    }
}

/// The change index of one node. Not thread-safe by itself: the write path
/// holds it under the same lock as the store write, so writes enter epochs
/// in the order of their versions.
pub(crate) struct ChangeLog {
    /// Oldest first; the last one is open. Never empty.
    epochs: VecDeque<Epoch>,
    cursors: std::collections::BTreeMap<CursorId, Cursor>,
    next_cursor: CursorId,
    hasher: hashbrown::DefaultHashBuilder,
}

impl std::fmt::Debug for ChangeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeLog")
            .field("epochs", &self.epochs.len())
            .field("cursors", &self.cursors.len())
            .finish()
    }
}

impl Default for ChangeLog {
    fn default() -> Self {
        Self::new()
    }
}

impl ChangeLog {
    /// An empty index with no cursor.
    pub(crate) fn new() -> Self {
        Self {
            epochs: VecDeque::from([Epoch::new(0)]),
            cursors: Default::default(),
            next_cursor: 0,
            hasher: Default::default(),
        }
    }

    fn open(&self) -> &Epoch {
        // `epochs` is never empty: the open epoch is never removed.
        &self.epochs[self.epochs.len() - 1]
    }

    fn open_mut(&mut self) -> &mut Epoch {
        let last = self.epochs.len() - 1;
        &mut self.epochs[last]
    }

    fn index_of(&self, id: u64) -> Option<usize> {
        self.epochs.binary_search_by_key(&id, |e| e.id).ok()
    }

    fn any_live(&self) -> bool {
        self.cursors.values().any(Cursor::live)
    }

    /// Records local writes (in version order). Nothing is kept while no
    /// peer is tracked.
    pub(crate) fn append<'a>(&mut self, records: impl IntoIterator<Item = &'a Record>) {
        if !self.any_live() {
            return;
        }
        let hasher = self.hasher;
        let open = self.open_mut();
        for record in records {
            open.put(&hasher, record.ty, record.entry.clone(), false);
        }
    }

    /// A cursor for a new peer, starting at the oldest epoch still held: a
    /// write that some peer has not acknowledged yet may not be in the
    /// snapshot the newcomer bootstraps from either.
    pub(crate) fn attach(&mut self, label: Arc<PeerLabel>) -> CursorId {
        let id = self.next_cursor;
        self.next_cursor += 1;
        let start = self.epochs[0].id;
        let (frontier, _) = watch::channel(Frontier {
            acked_hlc: 0,
            tracking: Tracking::Live,
        });
        self.cursors.insert(
            id,
            Cursor {
                label,
                next: start,
                taken: false,
                frontier,
            },
        );
        id
    }

    /// The peer left: its cursor goes, and with it what only it held.
    pub(crate) fn detach(&mut self, cursor: CursorId) {
        if let Some(c) = self.cursors.remove(&cursor) {
            c.set_tracking(Tracking::Gone);
        }
        self.compact();
    }

    /// The peer did not answer for too long: stop holding writes for it.
    /// Returns what was released.
    pub(crate) fn release(&mut self, cursor: CursorId) -> Pending {
        let pending = self.pending(cursor);
        if let Some(c) = self.cursors.get_mut(&cursor) {
            c.taken = false;
            c.set_tracking(Tracking::Released);
        }
        self.compact();
        pending
    }

    /// A released peer answers again: track writes for it from now on.
    pub(crate) fn reattach(&mut self, cursor: CursorId) {
        let open = self.open().id;
        if let Some(c) = self.cursors.get_mut(&cursor)
            && !c.live()
        {
            c.next = open;
            c.taken = false;
            c.set_tracking(Tracking::Live);
        }
    }

    /// The frontier of every cursor, to wait on for `?wait=all`.
    pub(crate) fn frontiers(&self) -> Vec<(Arc<PeerLabel>, watch::Receiver<Frontier>)> {
        self.cursors
            .values()
            .map(|c| (c.label.clone(), c.frontier.subscribe()))
            .collect()
    }

    /// True when the cursor has an epoch to send (or one to resend).
    pub(crate) fn has_pending(&self, cursor: CursorId) -> bool {
        let Some(c) = self.cursors.get(&cursor).filter(|c| c.live()) else {
            return false;
        };
        c.taken || c.next != self.open().id || !self.open().is_empty()
    }

    /// The epoch the cursor sends next: the one it has taken and not had
    /// acknowledged (a retry sends the same), else its next one, sealing
    /// the open epoch when that is it. `None` when there is nothing.
    pub(crate) fn take(&mut self, cursor: CursorId) -> Option<Taken> {
        let open_id = self.open().id;
        let c = self.cursors.get(&cursor).filter(|c| c.live())?;
        let next = c.next;
        if next == open_id {
            if self.open().is_empty() {
                return None;
            }
            self.epochs.push_back(Epoch::new(open_id + 1));
        }
        let index = self.index_of(next)?;
        let epoch = &mut self.epochs[index];
        let Frozen { records, encoded } = epoch.freeze();
        let taken = Taken {
            epoch: epoch.id,
            records,
            last_hlc: epoch.last_hlc,
            encoded,
        };
        if let Some(c) = self.cursors.get_mut(&cursor) {
            c.taken = true;
        }
        // No compaction: taking keeps every epoch a cursor waits at, and
        // merges none (the cursor now waits at the one it took).
        Some(taken)
    }

    /// The peer applied epoch `epoch`: the cursor moves on, waiters up to
    /// its seal are answered, and epochs nobody needs any more go.
    pub(crate) fn acked(&mut self, cursor: CursorId, epoch: u64) {
        let Some(index) = self.index_of(epoch) else {
            return;
        };
        let last_hlc = self.epochs[index].last_hlc;
        let following = self.epochs.get(index + 1).map(|e| e.id);
        let Some(c) = self.cursors.get_mut(&cursor) else {
            return;
        };
        if !c.live() || c.next != epoch {
            return;
        }
        // A sealed epoch is never last: the open one follows it.
        if let Some(following) = following {
            c.next = following;
        }
        c.taken = false;
        c.frontier
            .send_modify(|f| f.acked_hlc = f.acked_hlc.max(last_hlc));
        self.compact();
    }

    /// Entries and bytes waiting for the cursor's peer.
    pub(crate) fn pending(&self, cursor: CursorId) -> Pending {
        let Some(c) = self.cursors.get(&cursor).filter(|c| c.live()) else {
            return Pending::default();
        };
        let start = self
            .epochs
            .partition_point(|e| e.id < c.next)
            .min(self.epochs.len());
        self.epochs
            .range(start..)
            .fold(Pending::default(), |p, e| Pending {
                entries: p.entries + e.len(),
                bytes: p.bytes + e.bytes,
            })
    }

    /// Epochs held.
    #[cfg(test)]
    pub(crate) fn epochs_held(&self) -> usize {
        self.epochs.len()
    }

    /// Drops epochs every live cursor has passed and merges neighbours no
    /// cursor stands between.
    fn compact(&mut self) {
        // Where live cursors wait, sorted, and whether they have taken
        // that epoch: looked up per epoch, so a compaction costs
        // O(cursors log cursors + epochs log cursors) with many peers.
        let mut live: Vec<(u64, bool)> = self
            .cursors
            .values()
            .filter(|c| c.live())
            .map(|c| (c.next, c.taken))
            .collect();
        live.sort_unstable();
        let Some(oldest_needed) = live.first().map(|(next, _)| *next) else {
            // Nobody is tracked: nothing needs keeping.
            let open = self.open().id;
            self.epochs.clear();
            self.epochs.push_back(Epoch::new(open));
            return;
        };
        while self.epochs.len() > 1 && self.epochs[0].id < oldest_needed {
            self.epochs.pop_front();
        }
        // Sorted by (next, taken): a taken cursor at `id` sorts last there.
        let at = |id: u64| {
            let end = live.partition_point(|&(next, _)| next <= id);
            live[..end].last().filter(|&&(next, _)| next == id)
        };
        let busy = |id: u64| at(id).is_some_and(|&(_, taken)| taken);
        let waited_at = |id: u64| at(id).is_some();
        // Sealed epochs are all but the last.
        let mut i = 0;
        while i + 2 < self.epochs.len() {
            let (a, b) = (self.epochs[i].id, self.epochs[i + 1].id);
            if busy(a) || busy(b) || waited_at(b) {
                i += 1;
                continue;
            }
            self.merge_next_into(i);
        }
    }

    /// Merges epoch `i + 1` into epoch `i`, moving the smaller into the
    /// larger: amortized, each write is moved a few times at most.
    fn merge_next_into(&mut self, i: usize) {
        let Some(mut later) = self.epochs.remove(i + 1) else {
            return;
        };
        let hasher = self.hasher;
        let earlier = &mut self.epochs[i];
        earlier.thaw(&hasher);
        later.thaw(&hasher);
        if earlier.entries.len() >= later.entries.len() {
            for (ty, entry) in later.entries.drain() {
                earlier.put(&hasher, ty, entry, true);
            }
        } else {
            for (ty, entry) in earlier.entries.drain() {
                later.put(&hasher, ty, entry, true);
            }
            earlier.entries = later.entries;
            earlier.bytes = later.bytes;
        }
        earlier.last_hlc = earlier.last_hlc.max(later.last_hlc);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::store::Version;

    fn write(log: &mut ChangeLog, hlc: u64, key: &str, value: &str) -> Record {
        let record = Record::new(1, key, Some(value), Version { hlc, node: 7 }, 0);
        log.append([&record]);
        record
    }

    fn keys(taken: &Taken) -> Vec<(String, String)> {
        taken
            .records
            .iter()
            .map(|r| {
                (
                    r.key().to_owned(),
                    r.entry.value().unwrap_or("-").to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn nothing_is_kept_while_no_peer_is_tracked() {
        let mut log = ChangeLog::new();
        write(&mut log, 1, "a", "1");
        let c = log.attach(Arc::new(PeerLabel::new("p")));
        assert!(!log.has_pending(c));
        assert!(log.take(c).is_none());
    }

    #[test]
    fn a_key_written_while_a_batch_is_in_flight_goes_out_once_with_its_last_value() {
        let mut log = ChangeLog::new();
        let c = log.attach(Arc::new(PeerLabel::new("p")));
        write(&mut log, 1, "a", "1");
        let first = log.take(c).expect("an epoch");
        assert_eq!(keys(&first), [("a".into(), "1".into())]);
        for i in 2..1002 {
            write(&mut log, i, "hot", &i.to_string());
        }
        // The retry before the answer sends the same epoch again.
        assert_eq!(log.take(c).expect("retry").epoch, first.epoch);
        log.acked(c, first.epoch);
        let second = log.take(c).expect("the next epoch");
        assert_eq!(keys(&second), [("hot".into(), "1001".into())]);
        assert_eq!(second.last_hlc, 1001);
        log.acked(c, second.epoch);
        assert!(!log.has_pending(c));
        assert_eq!(log.epochs_held(), 1);
    }

    #[test]
    fn peers_share_sealed_epochs_and_the_frontier_follows_acknowledgements() {
        let mut log = ChangeLog::new();
        let (p, q) = (
            log.attach(Arc::new(PeerLabel::new("p"))),
            log.attach(Arc::new(PeerLabel::new("p"))),
        );
        write(&mut log, 5, "a", "1");
        let from_p = log.take(p).expect("p seals");
        let from_q = log.take(q).expect("q takes the same");
        assert_eq!(from_p.epoch, from_q.epoch);
        assert!(Arc::ptr_eq(&from_p.records, &from_q.records));
        assert!(Arc::ptr_eq(&from_p.encoded, &from_q.encoded));
        let frontiers = log.frontiers();
        log.acked(p, from_p.epoch);
        assert_eq!(frontiers[0].1.borrow().acked_hlc, 5);
        assert_eq!(frontiers[1].1.borrow().acked_hlc, 0);
        log.acked(q, from_q.epoch);
        assert_eq!(frontiers[1].1.borrow().acked_hlc, 5);
    }

    #[test]
    fn epochs_a_cursor_waits_at_are_not_merged_away() {
        let mut log = ChangeLog::new();
        let [p, q, r] = ["p", "q", "r"].map(|n| log.attach(Arc::new(PeerLabel::new(n))));
        write(&mut log, 1, "z", "1");
        let z = log.take(p).expect("z").epoch;
        for c in [q, r] {
            assert_eq!(log.take(c).expect("z").epoch, z);
            log.acked(c, z);
        }
        write(&mut log, 2, "a", "2");
        let a = log.take(q).expect("a").epoch;
        log.acked(q, a);
        assert_eq!(log.take(r).expect("a").epoch, a);
        log.acked(r, a);
        write(&mut log, 3, "b", "3");
        let b = log.take(r).expect("b").epoch;
        log.acked(r, b);
        // p waits at a (not taken), q at b (not taken): when p's ack of z
        // compacts, a and b must stay apart, or q's epoch is gone.
        log.acked(p, z);
        let from_q = log.take(q).expect("q still has b to send");
        assert_eq!(
            (from_q.epoch, keys(&from_q)),
            (b, vec![("b".into(), "3".into())])
        );
        let from_p = log.take(p).expect("p has a");
        assert_eq!(keys(&from_p), [("a".into(), "2".into())]);
    }

    #[test]
    fn an_epoch_is_encoded_once_while_a_link_sends_it_and_not_kept_after() {
        let encoded = Encoded::default();
        let mut encodings = 0;
        let mut encode = || {
            encodings += 1;
            vec![bytes::Bytes::from_static(b"request")]
        };
        let first = encoded.get_or_encode(&mut encode);
        let second = encoded.get_or_encode(&mut encode);
        assert!(Arc::ptr_eq(&first, &second));
        drop((first, second));
        // Nobody sends it any more: the bytes are gone, a later send
        // encodes again.
        let third = encoded.get_or_encode(&mut encode);
        assert_eq!(&third[..], [bytes::Bytes::from_static(b"request")]);
        drop(third);
        assert_eq!(encodings, 2);
    }

    #[test]
    fn a_down_peer_holds_one_epoch_in_flight_and_one_growing_with_distinct_keys() {
        let mut log = ChangeLog::new();
        let (live, down) = (
            log.attach(Arc::new(PeerLabel::new("p"))),
            log.attach(Arc::new(PeerLabel::new("p"))),
        );
        write(&mut log, 1, "k0", "v");
        let stuck = log.take(down).expect("taken, never acknowledged");
        let mut hlc = 2;
        for round in 0..200 {
            for k in 0..10 {
                write(&mut log, hlc, &format!("k{k}"), &round.to_string());
                hlc += 1;
            }
            let t = log.take(live).expect("an epoch");
            log.acked(live, t.epoch);
        }
        // The stuck epoch, one merged epoch of the ten keys, the open one.
        assert!(log.epochs_held() <= 3, "{} epochs", log.epochs_held());
        let pending = log.pending(down);
        assert_eq!(pending.entries, 1 + 10);
        assert_eq!(log.take(down).expect("retry").epoch, stuck.epoch);
        log.acked(down, stuck.epoch);
        let rest = log.take(down).expect("the merged epoch");
        assert_eq!(rest.records.len(), 10);
        assert!(rest.records.iter().all(|r| r.entry.value() == Some("199")));
        log.acked(down, rest.epoch);
        assert!(!log.has_pending(down));
    }

    #[test]
    fn release_frees_what_only_that_peer_held_and_reattach_starts_at_now() {
        let mut log = ChangeLog::new();
        let (live, down) = (
            log.attach(Arc::new(PeerLabel::new("p"))),
            log.attach(Arc::new(PeerLabel::new("p"))),
        );
        write(&mut log, 1, "a", "1");
        let t = log.take(live).expect("epoch");
        log.acked(live, t.epoch);
        assert_eq!(log.epochs_held(), 2);
        let frontiers = log.frontiers();
        let released = log.release(down);
        assert_eq!(released.entries, 1);
        assert_eq!(frontiers[1].1.borrow().tracking, Tracking::Released);
        assert_eq!(log.epochs_held(), 1);
        write(&mut log, 2, "b", "1");
        assert_eq!(log.pending(down), Pending::default());
        // Taken back at the open epoch: what the others have not been sent
        // yet, and everything from now on.
        log.reattach(down);
        write(&mut log, 3, "c", "1");
        let t = log.take(down).expect("epoch");
        assert_eq!(
            keys(&t),
            [("b".into(), "1".into()), ("c".into(), "1".into())]
        );
        log.detach(down);
        assert_eq!(frontiers[1].1.borrow().tracking, Tracking::Gone);
    }

    #[test]
    fn an_older_entry_never_replaces_a_newer_one_in_a_merge() {
        let mut log = ChangeLog::new();
        let (fast, slow) = (
            log.attach(Arc::new(PeerLabel::new("p"))),
            log.attach(Arc::new(PeerLabel::new("p"))),
        );
        let first = log.take(slow);
        assert!(first.is_none());
        write(&mut log, 1, "x", "old");
        write(&mut log, 2, "pad", "1");
        let slow_first = log.take(slow).expect("slow takes epoch 0");
        let step = |log: &mut ChangeLog| {
            let epoch = log.take(fast).expect("fast").epoch;
            log.acked(fast, epoch);
        };
        step(&mut log);
        write(&mut log, 3, "x", "new");
        step(&mut log);
        write(&mut log, 4, "y", "1");
        step(&mut log);
        log.acked(slow, slow_first.epoch);
        let rest = log.take(slow).expect("merged");
        let x = rest.records.iter().find(|r| r.key() == "x").expect("x");
        assert_eq!(x.entry.value(), Some("new"));
    }

    /// A peer's state as it applies whole epochs.
    #[derive(Default)]
    struct Replica {
        held: BTreeMap<String, u64>,
    }

    impl Replica {
        fn apply(&mut self, taken: &Taken) {
            for r in taken.records.iter() {
                let v = r.entry.version().hlc;
                let held = self.held.entry(r.key().to_owned()).or_default();
                *held = (*held).max(v);
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u8),
        Take(u8),
        Ack(u8),
        Release(u8),
        Reattach(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..12).prop_map(Op::Write),
            3 => (0u8..3).prop_map(Op::Take),
            3 => (0u8..3).prop_map(Op::Ack),
            1 => (0u8..3).prop_map(Op::Release),
            1 => (0u8..3).prop_map(Op::Reattach),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// At every moment, a peer that was tracked throughout holds, for
        /// every write at or below its frontier, that write or a newer one
        /// of the same key, and nothing written above the frontier: the
        /// state of the writer at one moment of its history. And memory
        /// stays bounded by keys: never more epochs than two per cursor
        /// plus two.
        #[test]
        fn peers_only_ever_show_a_prefix_of_the_writers_history(ops in proptest::collection::vec(op(), 1..300)) {
            let mut log = ChangeLog::new();
            let cursors: Vec<CursorId> = (0..3).map(|_| log.attach(Arc::new(PeerLabel::new("p")))).collect();
            let mut replicas: Vec<Replica> = (0..3).map(|_| Replica::default()).collect();
            let mut in_flight: Vec<Option<Taken>> = vec![None; 3];
            // Whether the cursor was tracked for every write so far.
            let mut whole: Vec<bool> = vec![true; 3];
            let mut history: Vec<(String, u64)> = Vec::new();
            let mut hlc = 0;
            for op in ops {
                match op {
                    Op::Write(k) => {
                        hlc += 1;
                        let key = format!("k{k}");
                        write(&mut log, hlc, &key, "v");
                        history.push((key, hlc));
                    }
                    Op::Take(p) => {
                        let p = p as usize;
                        if let Some(t) = log.take(cursors[p]) {
                            if let Some(before) = &in_flight[p] {
                                prop_assert_eq!(before.epoch, t.epoch);
                            }
                            in_flight[p] = Some(t);
                        }
                    }
                    Op::Ack(p) => {
                        let p = p as usize;
                        if let Some(t) = in_flight[p].take() {
                            replicas[p].apply(&t);
                            log.acked(cursors[p], t.epoch);
                        }
                    }
                    Op::Release(p) => {
                        let p = p as usize;
                        log.release(cursors[p]);
                        in_flight[p] = None;
                        whole[p] = false;
                    }
                    Op::Reattach(p) => {
                        log.reattach(cursors[p as usize]);
                    }
                }
                prop_assert!(log.epochs_held() <= 2 * cursors.len() + 2, "{} epochs", log.epochs_held());
                for p in 0..3 {
                    if !whole[p] {
                        continue;
                    }
                    let frontier = log.frontiers()[p].1.borrow().acked_hlc;
                    for (key, v) in &history {
                        let held = replicas[p].held.get(key).copied().unwrap_or(0);
                        if *v <= frontier {
                            prop_assert!(held >= *v, "peer {} lacks {}@{} below its frontier {}", p, key, v, frontier);
                        }
                        prop_assert!(held <= frontier, "peer {} holds {}@{} above its frontier {}", p, key, held, frontier);
                    }
                }
            }
        }
    }
}
