//! Conditional writes (compare-and-set) that hold across replicas: every
//! one is decided by one replica, the decider, which checks its
//! expectations against its own store, applies the change through the one
//! local write path, and answers only once every live peer acknowledged it
//! (so whoever decides next holds it).
//!
//! Who decides:
//! - with a lease backend from discovery (etcd, Kubernetes: see
//!   [`crate::discovery::election`]), the holder of the lease, and only
//!   while the lease is valid minus `--decider-clock-drift`: the change's
//!   version must be stamped before that (checked under the store's lock),
//!   and the lease must still be valid when the answer goes out, so a
//!   decider paused past its lease (a `SIGSTOP`, a long GC-like stall)
//!   never answers a write its successor may have decided against. A new
//!   holder first runs one anti-entropy round with every peer before it
//!   decides;
//! - otherwise (`static`, `dns`), the oldest ready member this node sees.
//!   A partition can then let two replicas decide (docs/GUARANTEES.md).
//!
//! Any other replica forwards the write to the decider over gRPC
//! (`podcache.v1.Replica/Decide`) and relays the answer; a forwarded write
//! is never forwarded again.
//!
//! Owns: the decision rule (who decides, when it may, what a decided write
//! must have before it is answered) and the forwarding. Must not touch:
//! the lease protocols (discovery's election backends), the merge rule and
//! limits (the store), HTTP and gRPC servers (`api`, `rpc` adapt).

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Replicator;
use super::oldest::{Age, seniority};
use crate::discovery::election::{Candidate, Election, Holder};
use crate::proto::podcache::{
    self as pb, DecideRequest, DecideResponse, decide_response::Outcome,
    replica_client::ReplicaClient,
};
use crate::replica::{
    Author, Change, DeliveryReport, DeliveryStatus, Replica, Terms, WriteError, WriteOutcome,
};
use crate::store::{Expect, Record, StoreError, Version};

/// The change of a conditional write, owned (it may cross the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set one key.
    Set {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// Delete one key.
    Delete {
        /// Key.
        key: String,
    },
    /// A batch: `None` deletes.
    Batch {
        /// Keys and values.
        entries: Vec<(String, Option<String>)>,
    },
}

/// A conditional write as the replica that took it hands it over.
#[derive(Debug, Clone)]
pub struct Conditional {
    /// Namespace.
    pub ty: i32,
    /// What to change.
    pub op: Op,
    /// Time to live of set values, if any.
    pub ttl_secs: Option<u64>,
    /// What each key must hold (all or nothing).
    pub guards: Vec<(String, Expect)>,
    /// Who writes (already authenticated by the replica that took it).
    pub author: String,
    /// Why.
    pub reason: Option<String>,
}

impl Conditional {
    /// Every key the write names with its new value (`None`: delete), in
    /// order, borrowed: what the limits are checked on, and what
    /// [`Conditional::change`] takes for a batch.
    pub fn entries(&self) -> Vec<(&str, Option<&str>)> {
        match &self.op {
            Op::Set { key, value } => vec![(key.as_str(), Some(value.as_str()))],
            Op::Delete { key } => vec![(key.as_str(), None)],
            Op::Batch { entries } => entries
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_deref()))
                .collect(),
        }
    }

    /// The change as the write path takes it; `entries` are
    /// [`Conditional::entries`].
    pub fn change<'a>(&'a self, entries: &'a [(&'a str, Option<&'a str>)]) -> Change<'a> {
        match &self.op {
            Op::Set { key, value } => Change::Set {
                ty: self.ty,
                key,
                value,
                ttl_secs: self.ttl_secs,
            },
            Op::Delete { key } => Change::Delete { ty: self.ty, key },
            Op::Batch { .. } => Change::Batch {
                ty: self.ty,
                entries,
                ttl_secs: self.ttl_secs,
            },
        }
    }
}

/// A decided write.
#[derive(Debug, Clone)]
pub struct Decided {
    /// The stored records, in request order.
    pub records: Vec<Record>,
    /// What each of the decider's peers said (all acknowledged).
    pub replication: Vec<DeliveryReport>,
    /// The decider's pod name.
    pub decider: String,
}

/// Why a conditional write was not answered as decided.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// The decider refused the change: a failed expectation
    /// ([`StoreError::Precondition`]), a limit, its disk. Nothing changed,
    /// but for [`WriteError::NotDurable`].
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The decider (another replica) refused it; `kind` says how.
    #[error("{message}")]
    Remote {
        /// How, as the wire says it.
        kind: Outcome,
        /// For people.
        message: String,
    },
    /// Nobody may decide now (no lease holder known, the holder is not
    /// reachable, its lease ran out, it is catching up): nothing changed.
    #[error("no decider: {0}")]
    NoDecider(String),
    /// Applied on the decider, but not every live peer acknowledged it in
    /// time (or its lease ran out before the answer): the outcome is
    /// unknown should the decider fail now.
    #[error("{why}")]
    NotReplicated {
        /// What was stored.
        records: Vec<Record>,
        /// What each peer said.
        replication: Vec<DeliveryReport>,
        /// For people.
        why: String,
    },
}

/// Which rule chooses the decider.
enum Rule {
    /// A lease backend publishes the holder.
    Lease(watch::Receiver<Holder>),
    /// The oldest ready member decides.
    Oldest,
}

/// This node's view of who decides, and the forwarding.
pub struct Decider {
    replica: Arc<Replica>,
    replicator: Arc<Replicator>,
    rule: Rule,
    /// The lease term in which this node caught up with its peers: a new
    /// term catches up again before it decides.
    caught_up: Mutex<Option<u64>>,
    /// Wakes waiters when the catch-up is done.
    caught_up_tx: watch::Sender<u64>,
    backend: &'static str,
}

impl std::fmt::Debug for Decider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decider")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// What a decider has of its lease now.
#[derive(Debug, Clone, Copy)]
struct Term {
    /// Which term (the backend numbers them).
    id: u64,
    /// Last instant (monotonic) at which it may decide.
    until: Instant,
    /// Last wall-clock ms a decided version may carry.
    until_wall_ms: u64,
}

impl Decider {
    /// A decider following `election` (or the oldest-member rule without
    /// one). The election runs on `tracker` until `cancel`; it campaigns
    /// once the node is ready (`ready_rx`).
    pub(crate) fn start(
        replica: Arc<Replica>,
        replicator: Arc<Replicator>,
        election: Option<Box<dyn Election>>,
        ready_rx: watch::Receiver<bool>,
        tracker: &tokio_util::task::TaskTracker,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let (backend, rule) = match election {
            None => ("oldest", Rule::Oldest),
            Some(election) => {
                let (holder_tx, holder_rx) = watch::channel(Holder::Unknown);
                let me = Candidate {
                    name: replica.identity.name.clone(),
                    addr: replica.identity.grpc_addr.clone(),
                    node_id: replica.identity.node_id,
                    ttl: replica.config.decider_lease,
                };
                let name = election.name();
                tracker.spawn(election.run(me, ready_rx, holder_tx, cancel.clone()));
                (name, Rule::Lease(holder_rx))
            }
        };
        let decider = Arc::new(Self {
            replica,
            replicator,
            rule,
            caught_up: Mutex::new(None),
            caught_up_tx: watch::channel(0).0,
            backend,
        });
        if let Rule::Lease(holder_rx) = &decider.rule {
            tracker.spawn(catch_up_loop(decider.clone(), holder_rx.clone(), cancel));
        }
        decider
    }

    /// The rule's name: `etcd`, `kubernetes` or `oldest`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Who decides, as this node sees it: `(name, grpc address, is me)`.
    pub fn holder(&self) -> Option<(String, String, bool)> {
        match &self.rule {
            Rule::Lease(rx) => match &*rx.borrow() {
                Holder::Unknown => None,
                Holder::Me { .. } => Some((
                    self.replica.identity.name.clone(),
                    self.replica.identity.grpc_addr.clone(),
                    true,
                )),
                Holder::Other { addr, name } => Some((name.clone(), addr.clone(), false)),
            },
            Rule::Oldest => self.oldest(),
        }
    }

    /// The oldest member this node sees: itself or a peer that answered
    /// (whose start time it knows), by the one seniority rule. Readiness
    /// is not compared (a peer's last `Hello` may predate its bootstrap,
    /// and two nodes would then each take itself for the oldest ready
    /// one): the oldest decides once it is ready, and refuses until then.
    /// `None` while a peer was never reached yet, so that a node does not
    /// take itself for the oldest before it knows the others' ages.
    fn oldest(&self) -> Option<(String, String, bool)> {
        let me = &self.replica.identity;
        let key = seniority(&Age {
            discovered_ms: None,
            own_ms: Some(me.started_at_ms),
            node_id: Some(me.node_id),
            addr: &me.grpc_addr,
        });
        let mut best = (key, (me.name.clone(), me.grpc_addr.clone(), true));
        for view in self.replicator.peer_views() {
            match view.status {
                "unknown" => return None,
                "up" => {}
                _ => continue,
            }
            let Some(node_id) = view
                .node_id
                .as_deref()
                .and_then(|id| u64::from_str_radix(id, 16).ok())
            else {
                continue;
            };
            let key = seniority(&Age {
                discovered_ms: None,
                own_ms: view.started_at_ms,
                node_id: Some(node_id),
                addr: &view.grpc_addr,
            });
            if key < best.0 {
                let name = view.name.clone().unwrap_or_else(|| view.grpc_addr.clone());
                best = (key, (name, view.grpc_addr.clone(), false));
            }
        }
        Some(best.1)
    }

    /// This node's term as the lease's holder, less the drift, if it holds
    /// one that is still valid now.
    fn term(&self) -> Option<Term> {
        let Rule::Lease(rx) = &self.rule else {
            return None;
        };
        let Holder::Me {
            term: id,
            until,
            until_wall_ms,
        } = *rx.borrow()
        else {
            return None;
        };
        let drift = self.replica.config.decider_clock_drift;
        let term = Term {
            id,
            until: until.checked_sub(drift)?,
            until_wall_ms: until_wall_ms.saturating_sub(drift.as_millis() as u64),
        };
        (Instant::now() < term.until).then_some(term)
    }

    /// Decides `write` here when this node is the decider, else forwards
    /// it (unless it was forwarded already).
    pub async fn decide(&self, write: Conditional, forwarded: bool) -> Result<Decided, Refusal> {
        match self.holder() {
            Some((_, _, true)) => self.decide_here(write).await,
            Some((name, addr, false)) if !forwarded => self.forward(write, &name, &addr).await,
            Some((name, _, false)) => Err(Refusal::NoDecider(format!(
                "this node is not the decider ({name} is)"
            ))),
            None => Err(Refusal::NoDecider(match self.rule {
                Rule::Lease(_) => "no replica holds the decider's lease right now".into(),
                Rule::Oldest => "this node has not reached every peer yet".into(),
            })),
        }
    }

    async fn decide_here(&self, write: Conditional) -> Result<Decided, Refusal> {
        if !self.replica.is_ready() {
            return Err(Refusal::NoDecider(
                "the decider has not finished its bootstrap yet".into(),
            ));
        }
        let lease = matches!(self.rule, Rule::Lease(_));
        let term = if lease {
            let term = self.term().ok_or_else(|| {
                Refusal::NoDecider("this node's lease as the decider ran out".into())
            })?;
            self.caught_up(term).await?;
            Some(term)
        } else {
            None
        };
        let fence = move |version_ms: u64| {
            term.is_none_or(|t| version_ms < t.until_wall_ms && Instant::now() < t.until)
        };
        let guards: Vec<(&str, Expect)> =
            write.guards.iter().map(|(k, e)| (k.as_str(), *e)).collect();
        let entries = write.entries();
        let change = write.change(&entries);
        let by = Author {
            name: &write.author,
            reason: write.reason.as_deref(),
        };
        let terms = Terms {
            guards: &guards,
            fence: Some(&fence),
        };
        let WriteOutcome {
            records,
            replication,
        } = self.replica.write_with(change, true, by, terms).await?;
        let replication = replication.unwrap_or_default();
        let missing: Vec<&str> = replication
            .iter()
            .filter(|r| !matches!(r.status, DeliveryStatus::Acked | DeliveryStatus::PeerLeft))
            .map(|r| r.peer.as_str())
            .collect();
        if !missing.is_empty() {
            let why = format!(
                "applied on the decider, but not acknowledged in time by {}; it is still being sent, and its outcome is unknown should the decider fail now",
                missing.join(", ")
            );
            return Err(Refusal::NotReplicated {
                records,
                replication,
                why,
            });
        }
        if lease && term.is_some_and(|t| Instant::now() >= t.until) {
            return Err(Refusal::NotReplicated {
                records,
                replication,
                why: "applied and acknowledged, but the decider's lease ran out before the answer; its outcome is unknown".into(),
            });
        }
        Ok(Decided {
            records,
            replication,
            decider: self.replica.identity.name.clone(),
        })
    }

    /// Waits until this node caught up with its peers in `term`.
    async fn caught_up(&self, term: Term) -> Result<(), Refusal> {
        let mut rx = self.caught_up_tx.subscribe();
        let deadline = term
            .until
            .min(Instant::now() + self.replica.config.wait_timeout);
        loop {
            if *self
                .caught_up
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                == Some(term.id)
            {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(Refusal::NoDecider(
                    "this node just took the decider's lease and is still catching up with its peers".into(),
                ));
            }
        }
    }

    async fn forward(
        &self,
        write: Conditional,
        name: &str,
        addr: &str,
    ) -> Result<Decided, Refusal> {
        let Some(channel) = self.replicator.channel_of(addr) else {
            return Err(Refusal::NoDecider(format!(
                "the decider {name} ({addr}) is not a peer this node knows"
            )));
        };
        let config = &self.replica.config;
        let max = config.max_grpc_message_bytes;
        let mut client = ReplicaClient::new(channel)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let request = to_wire(&write, self.replica.identity.to_wire());
        let timeout = config.wait_timeout + config.rpc_timeout;
        let answer = match tokio::time::timeout(timeout, client.decide(request)).await {
            Ok(Ok(answer)) => answer.into_inner(),
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                return Err(Refusal::NoDecider(format!(
                    "the decider {name} ({addr}) runs a podcache without conditional writes"
                )));
            }
            // The outcome is unknown: the decider may have applied it.
            Ok(Err(status)) => {
                return Err(Refusal::Remote {
                    kind: Outcome::NotReplicated,
                    message: format!(
                        "the decider {name} ({addr}) did not answer: {}; the outcome is unknown",
                        status.message()
                    ),
                });
            }
            Err(_) => {
                return Err(Refusal::Remote {
                    kind: Outcome::NotReplicated,
                    message: format!(
                        "the decider {name} ({addr}) did not answer within {timeout:?}; the outcome is unknown"
                    ),
                });
            }
        };
        from_wire(answer)
    }
}

/// Catches up with every peer whenever this node begins a term.
async fn catch_up_loop(
    decider: Arc<Decider>,
    mut holder_rx: watch::Receiver<Holder>,
    cancel: CancellationToken,
) {
    let mut current: Option<u64> = None;
    loop {
        let term = match &*holder_rx.borrow_and_update() {
            Holder::Me { term, .. } => Some(*term),
            _ => None,
        };
        if term != current {
            if current.is_some() {
                warn!("decider: this node no longer holds the lease it caught up in");
            }
            current = term;
            *decider
                .caught_up
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
            if let Some(term) = term {
                info!("decider: catching up with every peer before deciding");
                let report =
                    super::anti_entropy::join(&decider.replica, decider.replicator.targets()).await;
                info!(
                    repaired = report.entries,
                    "decider: caught up; deciding conditional writes"
                );
                *decider
                    .caught_up
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(term);
                decider.caught_up_tx.send_modify(|n| *n += 1);
                // The holder may have changed meanwhile: look again.
                continue;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = holder_rx.changed() => if changed.is_err() { return },
        }
    }
}

fn version_to_wire(v: Version) -> pb::Version {
    pb::Version {
        hlc: v.hlc,
        node: v.node,
    }
}

fn version_from_wire(v: &pb::Version) -> Version {
    Version {
        hlc: v.hlc,
        node: v.node,
    }
}

/// The request that forwards `write`.
pub(crate) fn to_wire(write: &Conditional, sender: pb::NodeInfo) -> DecideRequest {
    let expect = |key: &str| {
        write
            .guards
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, e)| match e {
                Expect::Version(v) => pb::decide_entry::Expect::IfVersion(version_to_wire(*v)),
                Expect::Absent => pb::decide_entry::Expect::IfAbsent(true),
                Expect::Present => pb::decide_entry::Expect::IfPresent(true),
            })
    };
    let entry = |key: &str, value: Option<&str>| pb::DecideEntry {
        key: key.to_owned(),
        value: value.map(str::to_owned),
        expect: expect(key),
    };
    let (entries, batch) = match &write.op {
        Op::Set { key, value } => (vec![entry(key, Some(value))], false),
        Op::Delete { key } => (vec![entry(key, None)], false),
        Op::Batch { entries } => (
            entries
                .iter()
                .map(|(k, v)| entry(k, v.as_deref()))
                .collect(),
            true,
        ),
    };
    DecideRequest {
        sender: Some(sender),
        r#type: write.ty,
        entries,
        batch,
        ttl_secs: write.ttl_secs.unwrap_or(0),
        author: write.author.clone(),
        reason: write.reason.clone().unwrap_or_default(),
    }
}

/// Why a forwarded request cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// No entry.
    #[error("a conditional write names no entry")]
    Empty,
    /// One set or delete with more than one entry.
    #[error("a single write names {0} entries")]
    NotSingle(usize),
    /// No expectation at all.
    #[error("a conditional write holds no expectation")]
    Unconditional,
}

/// The write a forwarded request carries, checked.
pub(crate) fn from_request(request: DecideRequest) -> Result<Conditional, BadRequest> {
    if request.entries.is_empty() {
        return Err(BadRequest::Empty);
    }
    if !request.batch && request.entries.len() != 1 {
        return Err(BadRequest::NotSingle(request.entries.len()));
    }
    let mut guards = Vec::new();
    for entry in &request.entries {
        match &entry.expect {
            Some(pb::decide_entry::Expect::IfVersion(v)) => {
                guards.push((entry.key.clone(), Expect::Version(version_from_wire(v))));
            }
            Some(pb::decide_entry::Expect::IfAbsent(true)) => {
                guards.push((entry.key.clone(), Expect::Absent));
            }
            Some(pb::decide_entry::Expect::IfPresent(true)) => {
                guards.push((entry.key.clone(), Expect::Present));
            }
            _ => {}
        }
    }
    if guards.is_empty() {
        return Err(BadRequest::Unconditional);
    }
    let op = if request.batch {
        Op::Batch {
            entries: request
                .entries
                .into_iter()
                .map(|e| (e.key, e.value))
                .collect(),
        }
    } else {
        // Exactly one entry, checked above.
        let entry = request
            .entries
            .into_iter()
            .next()
            .ok_or(BadRequest::Empty)?;
        match entry.value {
            Some(value) => Op::Set {
                key: entry.key,
                value,
            },
            None => Op::Delete { key: entry.key },
        }
    };
    Ok(Conditional {
        ty: request.r#type,
        op,
        ttl_secs: (request.ttl_secs != 0).then_some(request.ttl_secs),
        guards,
        author: request.author,
        reason: (!request.reason.is_empty()).then_some(request.reason),
    })
}

fn deliveries_to_wire(reports: &[DeliveryReport]) -> Vec<pb::Delivery> {
    reports
        .iter()
        .map(|r| pb::Delivery {
            peer: r.peer.clone(),
            name: r.name.clone().unwrap_or_default(),
            status: r.status.as_str().to_owned(),
            error: r.last_error.clone().unwrap_or_default(),
        })
        .collect()
}

fn deliveries_from_wire(reports: Vec<pb::Delivery>) -> Vec<DeliveryReport> {
    reports
        .into_iter()
        .map(|r| DeliveryReport {
            status: match r.status.as_str() {
                "acked" => DeliveryStatus::Acked,
                "dropped_peer_down" => DeliveryStatus::PeerDown,
                "peer_left" => DeliveryStatus::PeerLeft,
                _ => DeliveryStatus::TimedOut,
            },
            peer: r.peer,
            name: (!r.name.is_empty()).then_some(r.name),
            last_error: (!r.error.is_empty()).then_some(r.error),
        })
        .collect()
}

/// The answer the decider sends for `result`.
pub(crate) fn answer_to_wire(result: Result<Decided, Refusal>, decider: &str) -> DecideResponse {
    let mut answer = DecideResponse {
        decider: decider.to_owned(),
        ..DecideResponse::default()
    };
    match result {
        Ok(decided) => {
            answer.records = crate::proto::records_to_wire(&decided.records);
            answer.replication = deliveries_to_wire(&decided.replication);
        }
        Err(refusal) => {
            answer.message = refusal.to_string();
            let outcome = match refusal {
                Refusal::Write(WriteError::Store(StoreError::Precondition { key, current })) => {
                    answer.key = key;
                    answer.current = current.map(version_to_wire);
                    Outcome::PreconditionFailed
                }
                Refusal::Write(WriteError::Store(StoreError::Full { .. })) => Outcome::Capacity,
                Refusal::Write(WriteError::Store(_) | WriteError::ReservedType) => Outcome::Invalid,
                Refusal::Write(WriteError::Schema(_)) => Outcome::SchemaViolation,
                Refusal::Write(WriteError::SchemaUnusable { .. }) => Outcome::Invalid,
                Refusal::Write(WriteError::Disk(crate::durability::DiskError::Full(_))) => {
                    Outcome::DiskFull
                }
                Refusal::Write(WriteError::Disk(_)) => Outcome::StorageUnavailable,
                Refusal::Write(WriteError::NotDurable(_)) => Outcome::NotDurable,
                Refusal::Write(WriteError::Fenced) | Refusal::NoDecider(_) => Outcome::NoDecider,
                Refusal::Remote { kind, .. } => kind,
                Refusal::NotReplicated {
                    records,
                    replication,
                    ..
                } => {
                    answer.records = crate::proto::records_to_wire(&records);
                    answer.replication = deliveries_to_wire(&replication);
                    Outcome::NotReplicated
                }
            };
            answer.set_outcome(outcome);
        }
    }
    answer
}

/// What the decider's answer says.
fn from_wire(answer: DecideResponse) -> Result<Decided, Refusal> {
    let outcome = answer.outcome();
    let records = crate::proto::records_from_wire(answer.records);
    let replication = deliveries_from_wire(answer.replication);
    match outcome {
        Outcome::Decided => Ok(Decided {
            records,
            replication,
            decider: answer.decider,
        }),
        Outcome::PreconditionFailed => Err(Refusal::Write(WriteError::Store(
            StoreError::Precondition {
                key: answer.key.chars().take(64).collect(),
                current: answer.current.as_ref().map(version_from_wire),
            },
        ))),
        Outcome::NotReplicated => Err(Refusal::NotReplicated {
            records,
            replication,
            why: answer.message,
        }),
        Outcome::NoDecider => Err(Refusal::NoDecider(answer.message)),
        kind => Err(Refusal::Remote {
            kind,
            message: answer.message,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(hlc: u64, node: u64) -> Version {
        Version { hlc, node }
    }

    #[test]
    fn a_forwarded_write_reads_back_as_it_was_sent() {
        let write = Conditional {
            ty: 7,
            op: Op::Batch {
                entries: vec![
                    ("a".into(), Some("1".into())),
                    ("b".into(), None),
                    ("c".into(), Some("3".into())),
                ],
            },
            ttl_secs: Some(30),
            guards: vec![
                ("a".into(), Expect::Version(version(5 << 16, 9))),
                ("b".into(), Expect::Absent),
                ("c".into(), Expect::Present),
            ],
            author: "flags-team".into(),
            reason: Some("rollout".into()),
        };
        let back = from_request(to_wire(&write, pb::NodeInfo::default())).expect("valid");
        assert_eq!(back.ty, 7);
        assert_eq!(back.op, write.op);
        assert_eq!(back.ttl_secs, Some(30));
        assert_eq!(back.guards, write.guards);
        assert_eq!(back.author, "flags-team");
        assert_eq!(back.reason.as_deref(), Some("rollout"));

        let single = Conditional {
            ty: 1,
            op: Op::Delete { key: "k".into() },
            ttl_secs: None,
            guards: vec![("k".into(), Expect::Version(version(1, 1)))],
            author: "a".into(),
            reason: None,
        };
        let back = from_request(to_wire(&single, pb::NodeInfo::default())).expect("valid");
        assert_eq!(back.op, single.op);
        assert_eq!(back.reason, None);
    }

    #[test]
    fn forwarded_requests_are_checked() {
        let mut request = DecideRequest::default();
        assert_eq!(from_request(request.clone()).err(), Some(BadRequest::Empty));
        request.entries = vec![
            pb::DecideEntry {
                key: "a".into(),
                value: Some("1".into()),
                expect: Some(pb::decide_entry::Expect::IfAbsent(true)),
            };
            2
        ];
        assert_eq!(
            from_request(request.clone()).err(),
            Some(BadRequest::NotSingle(2))
        );
        request.batch = true;
        assert!(from_request(request.clone()).is_ok());
        for entry in &mut request.entries {
            entry.expect = None;
        }
        assert_eq!(from_request(request).err(), Some(BadRequest::Unconditional));
    }

    #[test]
    fn refusals_cross_the_wire_as_what_they_are() {
        let failed = Refusal::Write(WriteError::Store(StoreError::Precondition {
            key: "k".into(),
            current: Some(version(3 << 16, 4)),
        }));
        match from_wire(answer_to_wire(Err(failed), "d")) {
            Err(Refusal::Write(WriteError::Store(StoreError::Precondition { key, current }))) => {
                assert_eq!(key, "k");
                assert_eq!(current, Some(version(3 << 16, 4)));
            }
            other => panic!("{other:?}"),
        }
        let absent = Refusal::Write(WriteError::Store(StoreError::Precondition {
            key: "k".into(),
            current: None,
        }));
        assert!(matches!(
            from_wire(answer_to_wire(Err(absent), "d")),
            Err(Refusal::Write(WriteError::Store(
                StoreError::Precondition { current: None, .. }
            )))
        ));
        assert!(matches!(
            from_wire(answer_to_wire(Err(Refusal::Write(WriteError::Fenced)), "d")),
            Err(Refusal::NoDecider(_))
        ));
        let unknown = Refusal::NotReplicated {
            records: Vec::new(),
            replication: vec![DeliveryReport {
                peer: "p:1".into(),
                name: None,
                status: DeliveryStatus::TimedOut,
                last_error: Some("slow".into()),
            }],
            why: "w".into(),
        };
        match from_wire(answer_to_wire(Err(unknown), "d")) {
            Err(Refusal::NotReplicated { replication, .. }) => {
                assert_eq!(replication[0].status, DeliveryStatus::TimedOut);
                assert_eq!(replication[0].last_error.as_deref(), Some("slow"));
            }
            other => panic!("{other:?}"),
        }
        let decided = Decided {
            records: Vec::new(),
            replication: Vec::new(),
            decider: "x".into(),
        };
        assert_eq!(
            from_wire(answer_to_wire(Ok(decided), "d"))
                .expect("decided")
                .decider,
            "d"
        );
    }
}
