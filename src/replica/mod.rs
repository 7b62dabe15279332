//! The replica: what every adapter of a node shares, below all of them —
//! the store, the change stream to watchers, the change index of fan-out,
//! readiness, and the two ways state changes: the one local write path
//! ([`Replica::write`]) and the merge of what peers send
//! (`Replica::apply_remote`).
//!
//! Owns: the order of a local write (version, store, pending for every
//! peer, publish, acknowledgements), the remote merge and its counters,
//! readiness and staleness. Must not touch: sockets, wire formats, peer
//! links (`crate::replication` takes epochs out of `changes` and reports
//! acknowledgements back), HTTP (`crate::api`), gRPC (`crate::rpc`).

pub(crate) mod changes;
pub(crate) mod events;
pub mod schema;
mod write;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, broadcast};
use tracing::warn;

pub use events::ChangeEvent;
pub use schema::SCHEMA_TYPE;
pub use write::{Author, Change, DeliveryReport, DeliveryStatus, Terms, WriteError, WriteOutcome};

use self::changes::ChangeLog;
use crate::config::NodeConfig;
use crate::durability::{DataDir, DiskError};
use crate::identity::{NodeIdentity, unix_ms};
use crate::metrics::{Metrics, PeerBacklog, StateReading, TypeSizes, label};
use crate::store::{MergeOutcome, Record, Store, StoreError};

/// Where a change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A write on this node (REST, library, or the original `Sync/Set`).
    Local,
    /// A peer's fan-out or anti-entropy.
    Peer,
    /// The bootstrap pull.
    Bootstrap,
}

impl Origin {
    /// Lower-case name, as shown in watch events.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Local => "local",
            Origin::Peer => "peer",
            Origin::Bootstrap => "bootstrap",
        }
    }
}

/// What the bootstrap pull did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BootstrapReport {
    /// The peer the state came from (its dial address), if any.
    pub source: Option<String>,
    /// That peer's name, if known.
    pub source_name: Option<String>,
    /// `snapshot` (podcache.v1), `getall` (original protocol) or `none`.
    pub method: &'static str,
    /// Entries received.
    pub entries: u64,
    /// Approximate bytes received.
    pub bytes: u64,
    /// Time from the first hello to the last chunk merged.
    #[serde(serialize_with = "as_millis")]
    pub duration: Duration,
    /// Peers tried before the one that worked (or all of them), with why
    /// they failed.
    pub failed_attempts: Vec<(String, String)>,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// The state of one node that its adapters share.
#[derive(Debug)]
pub struct Replica {
    /// Settings, fixed at start.
    pub(crate) config: NodeConfig,
    /// Who this node is.
    pub(crate) identity: NodeIdentity,
    /// The replicated state.
    pub(crate) store: Store,
    /// This node's metrics (its own registry).
    pub(crate) metrics: Arc<Metrics>,
    /// The change stream for `/v1/watch` and embedders.
    pub(crate) events: events::EventLog,
    /// What every peer still has to receive of this node's writes. Locked
    /// around each local store write, so writes enter it in version order.
    changes: Mutex<ChangeLog>,
    /// Wakes the peer links when a local write made something pending.
    changed: Notify,
    /// True once the bootstrap pull is done; `/readyz` answers from it.
    ready: AtomicBool,
    /// The same, for those who wait for it to change (the decider's
    /// election campaigns only while the node is ready).
    ready_tx: tokio::sync::watch::Sender<bool>,
    /// When this node last completed anti-entropy with a peer (or had no
    /// peer to sync with, or finished its bootstrap), Unix ms. Older than
    /// the tombstone grace means the node is stale: see
    /// [`Replica::is_stale`].
    last_full_sync_ms: AtomicU64,
    /// What the bootstrap pull did, once it is done.
    bootstrap: Mutex<Option<BootstrapReport>>,
    /// The data directory, when the node has one: every change the store
    /// takes is appended to its log.
    pub(crate) data: Option<Arc<DataDir>>,
    /// Entries loaded from the data directory at start.
    loaded_from_disk: AtomicU64,
    /// The description of the last local write, shared by the next one
    /// when it is the same.
    last_meta: Mutex<Option<Arc<crate::store::Meta>>>,
    /// The latest changes this node took, newest last, for the
    /// dashboard's recent changes (`/v1/cluster`).
    recent: Mutex<std::collections::VecDeque<(Record, Origin)>>,
    /// The compiled schemas of the types that have one, by version.
    schemas: schema::Schemas,
}

/// Changes kept for [`Replica::recent_changes`].
const RECENT_CHANGES: usize = 20;

impl Replica {
    /// A replica of `identity` with an empty store.
    pub(crate) fn new(
        config: NodeConfig,
        identity: NodeIdentity,
        metrics: Arc<Metrics>,
        data: Option<Arc<DataDir>>,
    ) -> Self {
        let events = events::EventLog::new(identity.node_id, config.watch_replay_events);
        let schemas = schema::Schemas::new(metrics.schema_compiles.clone());
        Self {
            store: Store::new(identity.node_id, config.limits.clone()),
            config,
            identity,
            metrics,
            events,
            changes: Mutex::new(ChangeLog::new()),
            changed: Notify::new(),
            ready: AtomicBool::new(false),
            ready_tx: tokio::sync::watch::channel(false).0,
            last_full_sync_ms: AtomicU64::new(0),
            bootstrap: Mutex::new(None),
            data,
            loaded_from_disk: AtomicU64::new(0),
            last_meta: Mutex::new(None),
            recent: Mutex::new(std::collections::VecDeque::with_capacity(RECENT_CHANGES)),
            schemas,
        }
    }

    /// Loads what the data directory held (its records, and when the node
    /// last synced with a peer); returns how many entries were kept.
    pub(crate) fn load(&self, recovered: crate::durability::Recovered) -> usize {
        let now = unix_ms();
        // The snapshot's kept versions first: they are older than what the
        // logs replay, and the byte bound drops the oldest kept first.
        self.store.keep_history(recovered.history);
        let kept = self
            .store
            .load(recovered.records, now, self.purge_horizon(now));
        self.loaded_from_disk.store(kept as u64, Ordering::Release);
        if recovered.last_sync_ms != 0 {
            // Kept as saved: a node down longer than the tombstone grace is
            // stale, and resyncs before its state is trusted.
            self.last_full_sync_ms
                .store(recovered.last_sync_ms, Ordering::Release);
        }
        kept
    }

    /// Entries loaded from the data directory at start.
    pub(crate) fn loaded_from_disk(&self) -> u64 {
        self.loaded_from_disk.load(Ordering::Acquire)
    }

    /// The change index, for the peer links.
    pub(crate) fn changes(&self) -> MutexGuard<'_, ChangeLog> {
        // Every critical section is a plain update of the index (and the
        // store write inside it); a panic cannot leave it half-done in a
        // way the next user could not handle.
        self.changes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves when a local write made something pending after the call.
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Every change from now on, local or replicated.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<ChangeEvent>> {
        self.events.subscribe()
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Follows readiness.
    pub(crate) fn ready_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ready_tx.subscribe()
    }

    /// Marks the node ready (after the bootstrap), or not (at shutdown).
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        self.ready_tx.send_replace(ready);
        self.metrics.ready.set(i64::from(ready));
    }

    /// True when this node has not synced with any peer for longer than the
    /// tombstone grace: it may hold entries whose tombstones the others have
    /// purged, so it resyncs before anti-entropy trusts it.
    pub(crate) fn is_stale(&self, now_ms: u64) -> bool {
        let last = self.last_full_sync_ms.load(Ordering::Acquire);
        last != 0 && now_ms.saturating_sub(last) > self.config.tombstone_grace.as_millis() as u64
    }

    /// When the last full sync was, Unix ms (0: never).
    pub(crate) fn last_full_sync_ms(&self) -> u64 {
        self.last_full_sync_ms.load(Ordering::Acquire)
    }

    /// Records a completed sync.
    pub(crate) fn synced(&self, now_ms: u64) {
        self.last_full_sync_ms.fetch_max(now_ms, Ordering::AcqRel);
    }

    /// Keeps what the bootstrap pull did.
    pub(crate) fn set_bootstrap_report(&self, report: BootstrapReport) {
        *self
            .bootstrap
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(report);
    }

    /// What the bootstrap pull did, once done.
    pub(crate) fn bootstrap_report(&self) -> Option<BootstrapReport> {
        self.bootstrap
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Tombstones and expired entries older than this are dropped here and
    /// not taken back from peers.
    pub(crate) fn purge_horizon(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.config.tombstone_grace.as_millis() as u64)
    }

    fn publish(&self, records: &[Record], origin: Origin) {
        if records.is_empty() {
            return;
        }
        self.events.publish(records, origin);
        if origin != Origin::Bootstrap {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            let from = records.len().saturating_sub(RECENT_CHANGES);
            for record in &records[from..] {
                if recent.len() == RECENT_CHANGES {
                    recent.pop_front();
                }
                recent.push_back((record.clone(), origin));
            }
        }
    }

    /// The latest changes this node took (not its bootstrap), newest
    /// first.
    pub(crate) fn recent_changes(&self) -> Vec<(Record, Origin)> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent.iter().rev().cloned().collect()
    }

    /// This node's metrics, with the gauges computed from state read from
    /// the store now and `peers` (what the peer links hold pending, which
    /// only they know).
    pub(crate) fn render_metrics(&self, peers: Vec<PeerBacklog>) -> String {
        let types = self.store.stats(unix_ms()).into_iter().map(|(ty, s)| {
            let sizes = TypeSizes {
                entries: s.entries,
                tombstones: s.tombstones,
                bytes: s.bytes,
            };
            (ty, sizes)
        });
        let types = types.collect();
        let held_bytes = self.store.held_bytes();
        let capacity_bytes = self.store.limits().max_total_bytes;
        let (history_versions, history_bytes) = self.store.history_size();
        self.metrics.render_with(StateReading {
            types,
            held_bytes,
            capacity_bytes,
            history_versions,
            history_bytes,
            peers,
        })
    }

    /// The remote write path: merge by version, log, count, publish. What
    /// peers send is never forwarded again (its writer sends it to
    /// everyone). `source` names the way it came for the metrics:
    /// `replicate`, `bootstrap` or `anti_entropy`. The answer says whether
    /// the data directory took what was applied: a peer acknowledges only
    /// once [`Replica::settle`] says it is durable.
    pub(crate) fn apply_remote(&self, records: Vec<Record>, source: &'static str) -> Applied {
        let now = unix_ms();
        let mut disk = Ok(None);
        let outcome = self
            .store
            .merge_logged(records, now, self.purge_horizon(now), |applied| {
                if let Some(data) = &self.data {
                    disk = data.append_applied(applied).map(Some);
                    if disk.is_err() && !applied.is_empty() {
                        // Held in memory and sent on by nobody (peers'
                        // writes are not forwarded): the snapshot that
                        // clears the failure writes it to disk.
                        self.metrics.data_dir_unlogged.inc_by(applied.len() as u64);
                    }
                }
            });
        self.count_remote(&outcome, source);
        if source == "replicate" {
            for record in &outcome.applied {
                let written = crate::store::clock::hlc_ms(record.entry.version().hlc);
                let lag_ms = now.saturating_sub(written);
                self.metrics.replication_lag.observe(lag_ms as f64 / 1000.0);
            }
        }
        let origin = if source == "bootstrap" {
            Origin::Bootstrap
        } else {
            Origin::Peer
        };
        self.publish(&outcome.applied, origin);
        Applied { outcome, disk }
    }

    /// Resolves once what a change appended is on this node's disk as its
    /// `--fsync` policy promises (at once but for `always`), or with why it
    /// is not.
    pub(crate) async fn settle(
        &self,
        disk: Result<Option<u64>, DiskError>,
    ) -> Result<(), DiskError> {
        match (disk?, &self.data) {
            (Some(lsn), Some(data)) => data.durable(lsn).await,
            _ => Ok(()),
        }
    }

    /// An import (`ctl import`, a backup): entries with their own versions,
    /// merged by version, then sent to every peer like this node's writes
    /// (the peers merge them by version too), logged in the data directory,
    /// published, and answered once durable as a local write is. Refused
    /// as a whole while the data directory cannot be written.
    pub(crate) async fn import(&self, records: Vec<Record>) -> Result<MergeOutcome, WriteError> {
        if let Some(data) = &self.data
            && !data.healthy()
        {
            return Err(WriteError::Disk(DiskError::Failed(
                "an earlier write to the data directory failed and it has not recovered yet".into(),
            )));
        }
        let (outcome, disk) = self.merge_import(records);
        self.count_remote(&outcome, "import");
        if !outcome.applied.is_empty() {
            self.changed.notify_waiters();
            self.publish(&outcome.applied, Origin::Local);
        }
        self.settle(disk).await.map_err(WriteError::NotDurable)?;
        Ok(outcome)
    }

    /// The import's merge, log and change index, under the change index's
    /// lock (as a local write), so that it enters the index in order.
    fn merge_import(&self, records: Vec<Record>) -> (MergeOutcome, Result<Option<u64>, DiskError>) {
        let now = unix_ms();
        let mut disk = Ok(None);
        let mut changes = self.changes();
        let outcome = self
            .store
            .merge_logged(records, now, self.purge_horizon(now), |applied| {
                if let Some(data) = &self.data {
                    disk = data.append_applied(applied).map(Some);
                }
            });
        changes.append(&outcome.applied);
        (outcome, disk)
    }

    /// A full resync's drop: local entries the peer's whole state does not
    /// name, except those `spare` protects, were deleted (and purged) while
    /// this node was away. They reach watchers as deletes, and the data
    /// directory writes a snapshot without them; the time of this sync is
    /// saved only once that snapshot is on disk (see `durability_loop`), so
    /// a power cut before it leaves the node stale, and it resyncs again.
    /// Returns how many were dropped.
    pub(crate) fn drop_absent(
        &self,
        keep: &std::collections::HashSet<(i32, &str)>,
        spare: impl Fn(&crate::store::Entry) -> bool,
    ) -> usize {
        let dropped = self.store.drop_absent(keep, spare);
        if !dropped.is_empty() {
            if let Some(data) = &self.data {
                data.request_compaction();
            }
            self.publish(&dropped, Origin::Peer);
        }
        dropped.len()
    }

    /// Counts what a merge (or an original `Sync/Set`) did.
    pub(crate) fn count_remote(&self, outcome: &MergeOutcome, source: &'static str) {
        let m = &self.metrics;
        m.remote_applied
            .get_or_create(&label("source", source))
            .inc_by(outcome.applied.len() as u64);
        m.remote_stale.inc_by(outcome.stale as u64);
        for err in &outcome.rejected {
            let reason = match err {
                StoreError::ClockSkew(_) => "clock_skew",
                StoreError::Full { .. } => "capacity",
                _ => "limit",
            };
            m.remote_rejected
                .get_or_create(&label("reason", reason))
                .inc();
        }
        if let Some(first) = outcome.rejected.first() {
            warn!(
                count = outcome.rejected.len(),
                source,
                error = %first,
                "refused entries from a peer"
            );
        }
    }

    /// Drops entries whose expiry passed (or tombstones written) longer ago
    /// than the grace period; returns how many. The data directory then
    /// compacts, so its files stop holding what was dropped.
    pub(crate) fn purge_expired(&self) -> usize {
        let grace = self.config.tombstone_grace.as_millis() as u64;
        let purged = self.store.purge(unix_ms(), grace);
        if purged > 0
            && let Some(data) = &self.data
        {
            data.request_compaction();
        }
        purged
    }
}

/// What [`Replica::apply_remote`] did.
#[derive(Debug)]
pub(crate) struct Applied {
    /// What the merge did.
    pub(crate) outcome: MergeOutcome,
    /// The data directory's sequence number to wait on for what was
    /// applied (none without a data directory), or why it could not take
    /// it (or is refusing changes).
    pub(crate) disk: Result<Option<u64>, DiskError>,
}
