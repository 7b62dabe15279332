//! The change stream: every change the store takes, numbered, broadcast to
//! watchers, and kept in a bounded replay buffer so that a watcher that
//! reconnects resumes exactly after the last event it saw.
//!
//! Owns: event numbering (one sequence per node), the replay buffer, and
//! the event ids of `/v1/watch` (`<node id hex>-<sequence>`). Must not
//! touch HTTP: the REST API turns what this returns into SSE.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::broadcast;

use super::Origin;
use crate::store::Record;

/// Ends the ids of a snapshot's events (see [`EventLog::snapshot_id`]).
const SNAPSHOT_SUFFIX: &str = "-snapshot";

/// One change to the store, as seen by watchers: one entry, or a batch.
#[derive(Debug, Clone)]
pub struct ChangeEvent {
    /// The new entry (a tombstone for deletes); a batch's first entry.
    pub record: Record,
    /// A batch: every entry of it that changed this node, `record` first
    /// (they share one version). `None` for a single write.
    pub batch: Option<Arc<[Record]>>,
    /// Where it came from.
    pub origin: Origin,
    /// Its number in this node's change stream (from 1, without gaps).
    pub seq: u64,
}

/// Where a reconnecting watcher can resume.
#[derive(Debug)]
pub(crate) enum Resume {
    /// The events after the one it saw, and the sequence they reach.
    From {
        /// The events, oldest first.
        events: Vec<Arc<ChangeEvent>>,
        /// The last sequence number published when they were taken.
        upto: u64,
    },
    /// Its id is another node's (or another incarnation's), or older than
    /// the buffer: it needs the whole state again.
    Reset(&'static str),
}

struct Buffer {
    /// The sequence number of the last event published.
    last: u64,
    /// The latest events, oldest first.
    events: VecDeque<Arc<ChangeEvent>>,
}

/// The change stream of one node.
pub(crate) struct EventLog {
    node_id: u64,
    tx: broadcast::Sender<Arc<ChangeEvent>>,
    buffer: Mutex<Buffer>,
    capacity: usize,
    /// False until the first watcher: a node nobody watches pays nothing.
    enabled: AtomicBool,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl EventLog {
    /// A stream whose ids name `node_id`, replaying up to `capacity` events.
    pub(crate) fn new(node_id: u64, capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(4096);
        Self {
            node_id,
            tx,
            buffer: Mutex::new(Buffer {
                last: 0,
                events: VecDeque::new(),
            }),
            capacity,
            enabled: AtomicBool::new(false),
        }
    }

    fn buffer(&self) -> MutexGuard<'_, Buffer> {
        // Plain pushes and pops: a panic cannot leave it half-changed.
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes `records`, numbering each change: a single write's entry,
    /// or the entries of one batch together (one event, whatever order
    /// they came in).
    pub(crate) fn publish(&self, records: &[Record], origin: Origin) {
        if !self.enabled.load(Ordering::Acquire) {
            return;
        }
        let changes = group(records);
        let mut buffer = self.buffer();
        for (record, batch) in changes {
            buffer.last += 1;
            let event = Arc::new(ChangeEvent {
                record,
                batch,
                origin,
                seq: buffer.last,
            });
            if buffer.events.len() == self.capacity {
                buffer.events.pop_front();
            }
            buffer.events.push_back(event.clone());
            // Sent under the lock, so broadcast order is sequence order. An
            // error only means nobody is listening right now.
            let _ = self.tx.send(event);
        }
    }

    /// Every event from now on; call before reading the store or the
    /// buffer, so nothing published meanwhile is missed.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<ChangeEvent>> {
        self.enabled.store(true, Ordering::Release);
        self.tx.subscribe()
    }

    /// The sequence number of the last event published.
    pub(crate) fn last_seq(&self) -> u64 {
        self.buffer().last
    }

    /// The id of event `seq`: `<node id, 16 hex digits>-<sequence>`.
    pub(crate) fn id(&self, seq: u64) -> String {
        format!("{:016x}-{seq}", self.node_id)
    }

    /// The id of an event of a snapshot taken at position `seq` (its
    /// entries, and the `reset` before them): every event has an id, and
    /// resuming from one of these starts over with a reset, as the
    /// snapshot may have been cut short. The `live` marker after the
    /// snapshot has the plain id of position `seq`.
    pub(crate) fn snapshot_id(&self, seq: u64) -> String {
        format!("{:016x}-{seq}{SNAPSHOT_SUFFIX}", self.node_id)
    }

    /// Where a watcher that last saw event `id` resumes.
    pub(crate) fn resume(&self, id: &str) -> Resume {
        if id.trim().ends_with(SNAPSHOT_SUFFIX) {
            return Resume::Reset("the stream ended before its snapshot was complete");
        }
        let Some((node, seq)) = id.trim().split_once('-') else {
            return Resume::Reset("the event id is not <node>-<sequence>");
        };
        let (Ok(node), Ok(seq)) = (u64::from_str_radix(node, 16), seq.parse::<u64>()) else {
            return Resume::Reset("the event id is not <node>-<sequence>");
        };
        if node != self.node_id {
            return Resume::Reset("the event id is another node's (or one before a restart)");
        }
        let buffer = self.buffer();
        if seq > buffer.last {
            return Resume::Reset("the event id is ahead of this node's stream");
        }
        let oldest = buffer.events.front().map_or(buffer.last + 1, |e| e.seq);
        if seq + 1 < oldest {
            return Resume::Reset("the events after that id are no longer in the replay buffer");
        }
        Resume::From {
            events: buffer
                .events
                .iter()
                .filter(|e| e.seq > seq)
                .cloned()
                .collect(),
            upto: buffer.last,
        }
    }
}

/// `records` as changes: each single write on its own, each batch's
/// entries (same namespace, same version) together where its first
/// appears.
fn group(records: &[Record]) -> Vec<(Record, Option<Arc<[Record]>>)> {
    if !records.iter().any(|r| r.entry.in_batch()) {
        return records.iter().map(|r| (r.clone(), None)).collect();
    }
    let mut changes: Vec<(Record, Option<Vec<Record>>)> = Vec::new();
    let mut batches: std::collections::HashMap<(i32, crate::store::Version), usize> =
        std::collections::HashMap::new();
    for record in records {
        if !record.entry.in_batch() {
            changes.push((record.clone(), None));
            continue;
        }
        let at = *batches
            .entry((record.ty, record.entry.version()))
            .or_insert_with(|| {
                changes.push((record.clone(), Some(Vec::new())));
                changes.len() - 1
            });
        if let Some((_, Some(entries))) = changes.get_mut(at) {
            entries.push(record.clone());
        }
    }
    changes
        .into_iter()
        .map(|(first, batch)| (first, batch.map(Arc::from)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Version;

    fn record(i: u64) -> Record {
        Record::new(
            1,
            &format!("k{i}"),
            Some("v"),
            Version { hlc: i, node: 1 },
            0,
        )
    }

    #[test]
    fn a_batch_is_one_event_whatever_order_its_entries_come_in() {
        use crate::store::{Entry, Meta};
        let batch = Some(Arc::new(Meta::new("ops", "pod-a", None, true)));
        let single = Some(Arc::new(Meta::new("ops", "pod-a", None, false)));
        let at = |key: &str, hlc: u64, meta: &Option<Arc<Meta>>| Record {
            ty: 1,
            entry: Entry::with_meta(key, Some("v"), Version { hlc, node: 1 }, 0, meta.clone()),
        };
        // As a peer's epoch may hand them over: two batches interleaved,
        // a single write between them.
        let records = [
            at("a", 5, &batch),
            at("x", 6, &single),
            at("b", 7, &batch),
            at("c", 5, &batch),
            at("d", 7, &batch),
        ];
        let changes = group(&records);
        let shape: Vec<(String, Vec<String>)> = changes
            .iter()
            .map(|(first, batch)| {
                (
                    first.key().to_owned(),
                    batch
                        .iter()
                        .flat_map(|b| b.iter().map(|r| r.key().to_owned()))
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                ("a".to_owned(), vec!["a".to_owned(), "c".to_owned()]),
                ("x".to_owned(), vec![]),
                ("b".to_owned(), vec!["b".to_owned(), "d".to_owned()]),
            ]
        );
    }

    #[test]
    fn a_watcher_resumes_after_its_last_event_or_is_told_to_reset() {
        let log = EventLog::new(0xab, 3);
        log.publish(&[record(0)], Origin::Local);
        assert_eq!(
            log.last_seq(),
            0,
            "nothing is kept before the first watcher"
        );
        let mut rx = log.subscribe();
        for i in 1..=5 {
            log.publish(&[record(i)], Origin::Local);
        }
        assert_eq!(rx.try_recv().expect("live").seq, 1);
        assert_eq!(log.id(4), "00000000000000ab-4");
        match log.resume("00000000000000ab-3") {
            Resume::From { events, upto } => {
                assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
                assert_eq!(upto, 5);
            }
            other => panic!("expected a resume, got {other:?}"),
        }
        assert!(matches!(
            log.resume("00000000000000ab-2"),
            Resume::From { .. }
        ));
        assert!(
            matches!(log.resume("00000000000000ab-1"), Resume::Reset(_)),
            "3..5 kept only"
        );
        assert!(matches!(log.resume("00000000000000cd-4"), Resume::Reset(_)));
        assert!(matches!(log.resume("00000000000000ab-9"), Resume::Reset(_)));
        assert!(matches!(log.resume("garbage"), Resume::Reset(_)));
        // A snapshot's id never resumes: the snapshot may have been cut.
        assert_eq!(log.snapshot_id(4), "00000000000000ab-4-snapshot");
        assert!(matches!(
            log.resume(&log.snapshot_id(4)),
            Resume::Reset(reason) if reason.contains("snapshot")
        ));
        match log.resume("00000000000000ab-5") {
            Resume::From { events, .. } => assert!(events.is_empty()),
            other => panic!("{other:?}"),
        }
    }
}
