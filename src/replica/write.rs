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
//! With a data directory, step 1 appends the change to its log before the
//! store applies it (a refused append changes nothing), and with
//! `--fsync always` the answer waits for the `fsync` it shares with
//! concurrent writes.

use std::sync::Arc;

use tokio::sync::watch;

use super::changes::{Frontier, PeerLabel, Tracking};
use super::{Origin, Replica};
use crate::durability::DiskError;
use crate::identity::unix_ms;
use crate::store::{Expect, Meta, Record, Refused, StoreError};

pub use crate::store::Change;

/// Why a local write was refused. Nothing was changed, except where
/// [`WriteError::NotDurable`] says otherwise.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// A limit: the change was refused as a whole.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The data directory could not take it: the change was refused as a
    /// whole (the disk is full, or failed and has not recovered yet).
    #[error(transparent)]
    Disk(DiskError),
    /// With `--fsync always`: the change was applied and is being sent to
    /// peers, but its `fsync` failed, so it is not known to be on this
    /// node's disk.
    #[error("applied, but not known to be on disk: {0}")]
    NotDurable(DiskError),
    /// The change writes the reserved type of the schemas
    /// ([`super::SCHEMA_TYPE`]), which only the schema endpoints write.
    #[error(
        "type {} is reserved for podcache's schemas; use /v1/schema/{{type}}",
        super::SCHEMA_TYPE
    )]
    ReservedType,
    /// A value is not JSON valid under its type's schema: nothing was
    /// written.
    #[error(transparent)]
    Schema(Box<super::schema::Violation>),
    /// The type's schema, as this node holds it, does not compile here
    /// (e.g. set through a peer with other limits): writes of the type are
    /// refused until it is set again.
    #[error("the schema of type {ty} does not compile on this node ({reason}); set it again")]
    SchemaUnusable {
        /// The type.
        ty: i32,
        /// Why it does not compile.
        reason: String,
    },
    /// A conditional write reached the store after this node's lease as
    /// the decider ran out: nothing was changed.
    #[error("this node's lease as the decider ran out before the write was applied")]
    Fenced,
}

/// What a conditional write adds to a change: its expectations, and the
/// fence of the decider that took it.
#[derive(Clone, Copy, Default)]
pub struct Terms<'a> {
    /// What each key must hold for the change to apply (all or nothing).
    pub guards: &'a [(&'a str, Expect)],
    /// Given the wall-clock milliseconds of the version the change was
    /// stamped with, under the store's lock: `false` refuses it
    /// ([`WriteError::Fenced`]). The decider passes "my lease is still
    /// valid at that time".
    pub fence: Option<&'a (dyn Fn(u64) -> bool + Send + Sync)>,
}

impl std::fmt::Debug for Terms<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terms")
            .field("guards", &self.guards)
            .field("fence", &self.fence.is_some())
            .finish()
    }
}

/// Why the hook before the store applies a change refused it.
enum HookError {
    Disk(DiskError),
    Fenced,
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

/// Who writes, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Author<'a> {
    /// A REST token's name, a client certificate's subject, `anonymous`,
    /// `sync`, `import` or `library`.
    pub name: &'a str,
    /// Why, as the writer said it.
    pub reason: Option<&'a str>,
}

impl Author<'static> {
    /// A write through the library's API.
    pub const LIBRARY: Self = Self {
        name: "library",
        reason: None,
    };
}

impl Replica {
    /// The description of a write by `by` on this node: the last one made
    /// when it is the same (one writer's writes share it), else a new one.
    fn meta(&self, by: Author<'_>, batch: bool) -> Arc<Meta> {
        let mut last = self
            .last_meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*last {
            Some(shared) if shared.is(by.name, &self.identity.name, by.reason, batch) => {
                shared.clone()
            }
            _ => {
                let meta = Arc::new(Meta::new(by.name, &self.identity.name, by.reason, batch));
                *last = Some(meta.clone());
                meta
            }
        }
    }

    /// The local write path (see the module comment). `Err` means the
    /// change broke a limit, or the disk refused it, and nothing was
    /// changed (but see [`WriteError::NotDurable`]).
    pub async fn write(&self, change: Change<'_>, wait: bool) -> Result<WriteOutcome, WriteError> {
        self.write_as(change, wait, Author::LIBRARY).await
    }

    /// [`Replica::write`], saying who writes and why: kept with every entry
    /// it stores.
    pub async fn write_as(
        &self,
        change: Change<'_>,
        wait: bool,
        by: Author<'_>,
    ) -> Result<WriteOutcome, WriteError> {
        self.write_with(change, wait, by, Terms::default()).await
    }

    /// [`Replica::write_as`] of a conditional write: `terms` are checked
    /// under the store's lock, and a failed one changes nothing. Only the
    /// decider calls it with expectations (`crate::replication::decider`):
    /// a check on any other replica would not hold across replicas.
    pub(crate) async fn write_with(
        &self,
        change: Change<'_>,
        wait: bool,
        by: Author<'_>,
        terms: Terms<'_>,
    ) -> Result<WriteOutcome, WriteError> {
        self.check(&change)?;
        self.write_checked(change, wait, by, terms).await
    }

    /// What [`Replica::write_as`] checks before it writes: not the
    /// reserved type, and values valid under their type's schema (see
    /// [`super::schema`]). For adapters that must refuse several changes
    /// whole before writing any.
    pub fn check(&self, change: &Change<'_>) -> Result<(), WriteError> {
        self.schemas.check(&self.store, change, unix_ms())
    }

    /// Sets (`Some`) or deletes type `ty`'s schema: an entry of the
    /// reserved type, written through the same path as every write. The
    /// text must be a valid schema within `--max-schema-bytes` (checked
    /// here); it is compiled once, and kept compiled by its version.
    pub async fn write_schema(
        &self,
        ty: i32,
        schema: Option<&str>,
        wait: bool,
        by: Author<'_>,
    ) -> Result<WriteOutcome, super::schema::SchemaWriteError> {
        use super::schema::{SCHEMA_TYPE, SchemaWriteError};
        if ty == SCHEMA_TYPE {
            return Err(SchemaWriteError::Write(WriteError::ReservedType));
        }
        let key = ty.to_string();
        let Some(text) = schema else {
            let outcome = self
                .write_checked(
                    Change::Delete {
                        ty: SCHEMA_TYPE,
                        key: &key,
                    },
                    wait,
                    by,
                    Terms::default(),
                )
                .await?;
            self.schemas.forget(ty);
            return Ok(outcome);
        };
        let compiled = super::schema::compile(text, self.config.max_schema_bytes)?;
        let change = Change::Set {
            ty: SCHEMA_TYPE,
            key: &key,
            value: text,
            ttl_secs: None,
        };
        let outcome = self
            .write_checked(change, wait, by, Terms::default())
            .await?;
        if let Some(record) = outcome.records.first() {
            self.schemas
                .remember(ty, record.entry.version(), Ok(Arc::new(compiled)));
        }
        Ok(outcome)
    }

    /// Schema versions this node compiled to check writes.
    pub fn schema_compiles(&self) -> u64 {
        self.schemas.compiles()
    }

    /// [`Replica::write_as`] after its checks.
    async fn write_checked(
        &self,
        change: Change<'_>,
        wait: bool,
        by: Author<'_>,
        terms: Terms<'_>,
    ) -> Result<WriteOutcome, WriteError> {
        let meta = self.meta(by, matches!(change, Change::Batch { .. }));
        let (records, waiters, lsn) = self.commit(change, wait, meta, terms)?;
        if !records.is_empty() {
            self.changed.notify_waiters();
            self.publish(&records, Origin::Local);
        }
        if let (Some(data), Some(lsn)) = (&self.data, lsn) {
            data.durable(lsn).await.map_err(WriteError::NotDurable)?;
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

    /// Step 1 of the write path: the data directory's log (when there is
    /// one), the store and the change index, under the change index's
    /// lock. With `wait`, also the frontier of every peer now.
    fn commit(
        &self,
        change: Change<'_>,
        wait: bool,
        meta: Arc<Meta>,
        terms: Terms<'_>,
    ) -> Result<(Vec<Record>, Waiters, Option<u64>), WriteError> {
        let mut changes = self.changes();
        let mut lsn = None;
        let records = self
            .store
            .commit_guarded(change, terms.guards, unix_ms(), Some(meta), |records| {
                if let (Some(fence), Some(first)) = (terms.fence, records.first())
                    && !fence(crate::store::clock::hlc_ms(first.entry.version().hlc))
                {
                    return Err(HookError::Fenced);
                }
                match &self.data {
                    Some(data) => data
                        .append(records)
                        .map(|at| lsn = Some(at))
                        .map_err(HookError::Disk),
                    None => Ok(()),
                }
            })
            .map_err(|refused| match refused {
                Refused::Store(e) => WriteError::Store(e),
                Refused::Hook(HookError::Disk(e)) => WriteError::Disk(e),
                Refused::Hook(HookError::Fenced) => WriteError::Fenced,
            })?;
        if records.is_empty()
            && let Some(data) = &self.data
        {
            // Nothing to write (a delete of a key already gone), but the
            // answer still promises what the disk holds: a delete that
            // another write is still syncing, or whose fsync failed, is
            // not on disk yet.
            lsn = Some(data.append(&[]).map_err(WriteError::Disk)?);
        }
        if let Change::Unversioned { .. } = change {
            self.metrics
                .remote_applied
                .get_or_create(&crate::metrics::label("source", "set"))
                .inc_by(records.len() as u64);
        }
        changes.append(&records);
        let waiters = if wait {
            changes.frontiers()
        } else {
            Vec::new()
        };
        Ok((records, waiters, lsn))
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
