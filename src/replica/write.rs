//! The one local write path. A change from REST, from the original
//! `hellorpc.Sync/Set`, or from an embedding service goes through
//! [`Replica::write`], which does, in this order:
//!
//! 1. version and store it (the store checks every limit first: a refused
//!    change changes nothing), and under the same lock mark it pending for
//!    every peer in the change index, so writes enter it in version order;
//! 2. wake the peer links;
//! 3. publish it to watchers;
//! 4. with `wait`, wait until every peer known at that moment acknowledged
//!    a version of each key at least the write's (bounded by
//!    `wait_timeout`), and say per peer what happened.
//!
//! The data directory's log belongs in step 1, inside [`Replica::commit`].

use std::sync::Arc;

use tokio::sync::watch;

use super::changes::{Frontier, PeerLabel, Tracking};
use super::{Origin, Replica};
use crate::identity::unix_ms;
use crate::store::{Record, StoreError};

/// A local change.
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
    /// Set many entries of one namespace, all or nothing.
    Batch {
        /// Namespace.
        ty: i32,
        /// Keys and values.
        entries: &'a [(&'a str, &'a str)],
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

/// What happened to one write at one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// The peer applied it (or a newer value of its key).
    Acked,
    /// Not acknowledged within the wait timeout; still pending and retried.
    TimedOut,
    /// The peer did not answer for longer than the retention: its pending
    /// writes were released, and anti-entropy repairs it when it returns.
    PeerDown,
    /// The peer left the membership before acknowledging.
    PeerLeft,
}

impl DeliveryStatus {
    /// Lower-case name, as shown in REST answers.
    pub fn as_str(&self) -> &'static str {
        match self {
            DeliveryStatus::Acked => "acked",
            DeliveryStatus::TimedOut => "timeout",
            DeliveryStatus::PeerDown => "dropped_peer_down",
            DeliveryStatus::PeerLeft => "peer_left",
        }
    }
}

/// One peer's answer to one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// The peer's dial address.
    pub peer: String,
    /// The peer's name, when known.
    pub name: Option<String>,
    /// What happened.
    pub status: DeliveryStatus,
    /// The last error talking to the peer, when it did not acknowledge.
    pub last_error: Option<String>,
}

/// What a local write did, and, with `wait`, what each peer said.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    /// The stored records, in request order (none for a delete of an
    /// absent key, or a `Sync/Set` that changed nothing).
    pub records: Vec<Record>,
    /// Per peer delivery, when the write waited for acknowledgements.
    pub replication: Option<Vec<DeliveryReport>>,
}

type Waiters = Vec<(Arc<PeerLabel>, watch::Receiver<Frontier>)>;

impl Replica {
    /// The local write path (see the module comment). `Err` means the
    /// change broke a limit and nothing was changed.
    pub async fn write(&self, change: Change<'_>, wait: bool) -> Result<WriteOutcome, StoreError> {
        let (records, waiters) = self.commit(change, wait)?;
        if !records.is_empty() {
            self.changed.notify_waiters();
            self.publish(&records, Origin::Local);
        }
        let replication = match (wait, records.iter().map(|r| r.entry.version().hlc).max()) {
            (false, _) => None,
            (true, None) => Some(Vec::new()),
            (true, Some(hlc)) => Some(wait_all(waiters, hlc, self.config.wait_timeout).await),
        };
        Ok(WriteOutcome {
            records,
            replication,
        })
    }

    /// Steps 1 of the write path: store and mark pending, under the change
    /// index's lock. With `wait`, also the frontier of every peer now.
    fn commit(&self, change: Change<'_>, wait: bool) -> Result<(Vec<Record>, Waiters), StoreError> {
        let now = unix_ms();
        let store = &self.store;
        let mut changes = self.changes();
        let records = match change {
            Change::Set {
                ty,
                key,
                value,
                ttl_secs,
            } => store.set_many(ty, [(key, value)].into_iter(), ttl_secs, now)?,
            Change::Batch {
                ty,
                entries,
                ttl_secs,
            } => store.set_many(ty, entries.iter().copied(), ttl_secs, now)?,
            Change::Delete { ty, key } => store.delete(ty, key, now)?.into_iter().collect(),
            Change::Unversioned { ty, entries } => {
                let outcome = store.apply_unversioned(ty, entries.iter().copied(), None, now)?;
                self.count_remote(&outcome, "set");
                outcome.applied
            }
        };
        changes.append(&records);
        let waiters = if wait {
            changes.frontiers()
        } else {
            Vec::new()
        };
        Ok((records, waiters))
    }
}

/// Waits until every peer in `waiters` holds everything up to `hlc`, up to
/// `timeout` in all.
async fn wait_all(waiters: Waiters, hlc: u64, timeout: std::time::Duration) -> Vec<DeliveryReport> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut reports = Vec::with_capacity(waiters.len());
    for (label, mut frontier) in waiters {
        let settled = |f: &Frontier| f.acked_hlc >= hlc || f.tracking != Tracking::Live;
        let status = match tokio::time::timeout_at(deadline, frontier.wait_for(settled)).await {
            Ok(Ok(f)) if f.acked_hlc >= hlc => DeliveryStatus::Acked,
            Ok(Ok(f)) if f.tracking == Tracking::Released => DeliveryStatus::PeerDown,
            Ok(_) => DeliveryStatus::PeerLeft,
            Err(_) => DeliveryStatus::TimedOut,
        };
        reports.push(DeliveryReport {
            peer: label.addr.clone(),
            name: label.name(),
            last_error: if status == DeliveryStatus::Acked {
                None
            } else {
                label.last_error()
            },
            status,
        });
    }
    reports
}
