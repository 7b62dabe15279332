//! Who decides conditional writes: the lease of the one replica that
//! checks and applies every compare-and-set (`crate::replication::decider`
//! uses it), held in the source of truth the cluster already runs.
//!
//! - [`EtcdElection`] (with `--discovery etcd`, `etcd-v2` and
//!   `etcd-lease`): a key created in a transaction only if absent, bound to
//!   an etcd lease this node keeps alive, as etcd's own `concurrency`
//!   election does. The key names the holder; it goes when the lease
//!   expires (or is revoked at shutdown), and the next candidate's
//!   transaction creates it.
//! - `KubernetesElection` (with `--discovery kubernetes`, in
//!   `kubernetes_election`): a `coordination.k8s.io/v1` Lease, taken and
//!   renewed with optimistic concurrency, as client-go's leader election.
//!
//! A holder publishes how long its lease is known to be valid, counted from
//! when it *sent* the request that granted or renewed it (etcd and the API
//! server count from when they received it, so this is never later). The
//! decider subtracts `--decider-clock-drift` from that.
//!
//! Owns: the lease protocol with each source. Must not touch: what is
//! decided (the decider), membership (the discovery backends).

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::etcd::{EtcdClient, EtcdError, EtcdSettings};
use crate::identity::unix_ms;
use crate::proto::etcd::{
    Compare, LeaseKeepAliveRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, compare,
    request_op, response_op,
};

/// Who holds the decider's lease, as this node knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Nobody known: the source has not answered, or nobody holds it.
    Unknown,
    /// This node, until `until` (on this node's monotonic clock) and
    /// `until_wall_ms` (its wall clock), before the drift is subtracted.
    Me {
        /// Which of this node's terms (one per lease taken): a new term
        /// catches up with the peers again before deciding.
        term: u64,
        /// When the lease runs out at the latest.
        until: Instant,
        /// The same, Unix ms.
        until_wall_ms: u64,
    },
    /// Another replica.
    Other {
        /// Its gRPC address, where conditional writes are forwarded.
        addr: String,
        /// Its pod name.
        name: String,
    },
}

/// This node as a candidate.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Its pod name.
    pub name: String,
    /// Its gRPC address.
    pub addr: String,
    /// Its node id.
    pub node_id: u64,
    /// How long a lease lasts (`--decider-lease`).
    pub ttl: Duration,
}

impl Candidate {
    /// How often a holder renews and others look again: a quarter of the
    /// lease, so a holder renews three times before it could run out.
    pub fn period(&self) -> Duration {
        (self.ttl / 4).max(Duration::from_millis(100))
    }
}

/// A lease backend. Object-safe: the node holds a `Box<dyn Election>`
/// chosen by its discovery source.
#[async_trait::async_trait]
pub trait Election: Send + Sync + 'static {
    /// Short name, shown in `/v1/cluster`.
    fn name(&self) -> &'static str;

    /// Campaigns while `eligible` is true (the node is ready), renews while
    /// it holds the lease, follows the holder otherwise, and publishes
    /// every change into `holder_tx`, until `cancel` fires; then gives the
    /// lease up at once if it holds it. Failures are logged and retried,
    /// never returned.
    async fn run(
        self: Box<Self>,
        me: Candidate,
        eligible: watch::Receiver<bool>,
        holder_tx: watch::Sender<Holder>,
        cancel: CancellationToken,
    );
}

/// The etcd key's value: who holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct HolderRecord {
    name: String,
    addr: String,
    node_id: u64,
}

/// Longest holder record read back from etcd.
const MAX_RECORD_BYTES: usize = 1024;

fn parse_record(value: &[u8]) -> Option<HolderRecord> {
    if value.len() > MAX_RECORD_BYTES {
        return None;
    }
    let record: HolderRecord = serde_json::from_slice(value).ok()?;
    // Only what could be dialled: host:port, no more than a few hundred
    // bytes, no spaces.
    let valid = |s: &str| !s.is_empty() && s.len() <= 253 && !s.contains(char::is_whitespace);
    (valid(&record.addr) && record.addr.contains(':') && record.name.len() <= 253).then_some(record)
}

/// The decider's lease as an etcd key bound to an etcd lease.
#[derive(Debug, Clone)]
pub struct EtcdElection {
    /// Where etcd is.
    pub settings: EtcdSettings,
    /// The key (e.g. `/podcache/decider/<namespace>/<selector>`).
    pub key: String,
}

impl EtcdElection {
    /// The key of pods selected by `filter`.
    pub fn pods_key(filter: &super::pod::PodFilter) -> String {
        format!(
            "/podcache/decider/{}/{}",
            filter.namespace,
            super::pod::selector_string(&filter.selector)
        )
    }

    /// Who the key names (this node's own record from before a restart at
    /// the same address counts as nobody: its lease runs out by itself).
    async fn holder(&self, client: &EtcdClient, me: &Candidate) -> Result<Holder, EtcdError> {
        let request = RangeRequest {
            key: self.key.as_bytes().to_vec(),
            ..RangeRequest::default()
        };
        let kvs = client.range(request).await?;
        Ok(match kvs.first().map(|kv| parse_record(&kv.value)) {
            None => Holder::Unknown,
            Some(Some(record)) if record.addr == me.addr => Holder::Unknown,
            Some(Some(record)) => Holder::Other {
                addr: record.addr,
                name: record.name,
            },
            Some(None) => {
                warn!(key = %self.key, "the decider key holds no valid holder record");
                Holder::Unknown
            }
        })
    }

    /// True while the key names this node (a record from before a
    /// restart): it cannot be taken until it goes.
    async fn held_by(&self, client: &EtcdClient, me: &Candidate) -> Result<bool, EtcdError> {
        let request = RangeRequest {
            key: self.key.as_bytes().to_vec(),
            ..RangeRequest::default()
        };
        let kvs = client.range(request).await?;
        Ok(kvs
            .first()
            .and_then(|kv| parse_record(&kv.value))
            .is_some_and(|r| r.addr == me.addr))
    }

    /// One try to take the lease; while it is held, renews it until it is
    /// lost, `eligible` turns false or `cancel` fires. Returns once this
    /// node does not hold it (any more).
    async fn term(
        &self,
        client: &EtcdClient,
        me: &Candidate,
        eligible: &mut watch::Receiver<bool>,
        holder_tx: &watch::Sender<Holder>,
        cancel: &CancellationToken,
    ) -> Result<(), EtcdError> {
        let ttl_secs = me.ttl.as_secs().max(1) as i64;
        let value = serde_json::to_vec(&HolderRecord {
            name: me.name.clone(),
            addr: me.addr.clone(),
            node_id: me.node_id,
        })
        .unwrap_or_default();
        let sent = Instant::now();
        let sent_wall = unix_ms();
        let lease = client.grant_lease(ttl_secs).await?;
        let key = self.key.as_bytes().to_vec();
        let txn = TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Create as i32,
                key: key.clone(),
                target_union: Some(compare::TargetUnion::CreateRevision(0)),
                range_end: Vec::new(),
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    lease,
                    prev_kv: false,
                })),
            }],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: key.clone(),
                    ..RangeRequest::default()
                })),
            }],
        };
        let answer = match client.txn(txn).await {
            Ok(answer) => answer,
            Err(e) => {
                let _ = client.revoke_lease(lease).await;
                return Err(e);
            }
        };
        if !answer.succeeded {
            let _ = client.revoke_lease(lease).await;
            let held = answer.responses.into_iter().find_map(|r| match r.response {
                Some(response_op::Response::ResponseRange(range)) => range.kvs.into_iter().next(),
                _ => None,
            });
            let holder = match held.and_then(|kv| parse_record(&kv.value)) {
                Some(record) if record.addr == me.addr => {
                    // This node's own key from before a restart with the
                    // same address: its lease is still running. Wait it
                    // out rather than decide under a lease not renewed.
                    Holder::Unknown
                }
                Some(record) => Holder::Other {
                    addr: record.addr,
                    name: record.name,
                },
                None => Holder::Unknown,
            };
            holder_tx.send_if_modified(|h| replace(h, holder));
            return self.follow(client, me, holder_tx, cancel).await;
        }
        info!(key = %self.key, lease, "this node holds the decider's lease");
        let mut until = sent + Duration::from_secs(ttl_secs as u64);
        let term = lease as u64;
        holder_tx.send_replace(Holder::Me {
            term,
            until,
            until_wall_ms: sent_wall + ttl_secs as u64 * 1000,
        });
        let outcome = self
            .renew(client, me, lease, &mut until, eligible, holder_tx, cancel)
            .await;
        holder_tx.send_replace(Holder::Unknown);
        // Give it up at once: the next candidate need not wait the lease out.
        if let Err(error) = client.revoke_lease(lease).await {
            debug!(%error, "could not revoke the decider's lease; it runs out by itself");
        }
        outcome
    }

    /// Renews `lease` every period while this node holds it.
    #[allow(clippy::too_many_arguments)]
    async fn renew(
        &self,
        client: &EtcdClient,
        me: &Candidate,
        lease: i64,
        until: &mut Instant,
        eligible: &mut watch::Receiver<bool>,
        holder_tx: &watch::Sender<Holder>,
        cancel: &CancellationToken,
    ) -> Result<(), EtcdError> {
        let mut keeper = client.keep_alive(lease).await?;
        // The first request went with the stream; its answer is awaited
        // below like every later one.
        let mut sent = Instant::now();
        let mut sent_wall = unix_ms();
        loop {
            let answer = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                changed = eligible.changed() => {
                    if changed.is_err() || !*eligible.borrow() {
                        return Ok(());
                    }
                    continue;
                }
                answer = tokio::time::timeout_at(*until, keeper.responses.message()) => answer,
            };
            let ttl = match answer {
                Err(_) => {
                    warn!(key = %self.key, "the decider's lease ran out before etcd renewed it");
                    return Ok(());
                }
                Ok(Err(status)) => return Err(EtcdError::from(status)),
                Ok(Ok(None)) => return Err(EtcdError::WatchEnded("keep-alive ended".into())),
                Ok(Ok(Some(answer))) => answer.ttl,
            };
            if ttl <= 0 {
                warn!(key = %self.key, "etcd says the decider's lease is gone");
                return Ok(());
            }
            *until = sent + Duration::from_secs(ttl as u64);
            holder_tx.send_replace(Holder::Me {
                term: lease as u64,
                until: *until,
                until_wall_ms: sent_wall + ttl as u64 * 1000,
            });
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(me.period()) => {}
            }
            sent = Instant::now();
            sent_wall = unix_ms();
            if keeper
                .keep_alive_tx
                .send(LeaseKeepAliveRequest { id: lease })
                .await
                .is_err()
            {
                return Err(EtcdError::WatchEnded("keep-alive stream closed".into()));
            }
        }
    }

    /// Follows another holder until the key is gone.
    async fn follow(
        &self,
        client: &EtcdClient,
        me: &Candidate,
        holder_tx: &watch::Sender<Holder>,
        cancel: &CancellationToken,
    ) -> Result<(), EtcdError> {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(me.period()) => {}
            }
            let holder = self.holder(client, me).await?;
            let gone = holder == Holder::Unknown && !self.held_by(client, me).await?;
            holder_tx.send_if_modified(|h| replace(h, holder));
            if gone {
                return Ok(());
            }
        }
    }
}

/// Sets `*slot` to `new`; true when it changed.
fn replace(slot: &mut Holder, new: Holder) -> bool {
    if *slot == new {
        return false;
    }
    *slot = new;
    true
}

#[async_trait::async_trait]
impl Election for EtcdElection {
    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn run(
        self: Box<Self>,
        me: Candidate,
        mut eligible: watch::Receiver<bool>,
        holder_tx: watch::Sender<Holder>,
        cancel: CancellationToken,
    ) {
        let client = match EtcdClient::connect(&self.settings) {
            Ok(client) => client,
            Err(error) => {
                warn!(%error, "no decider: cannot use etcd for its lease");
                return;
            }
        };
        while !cancel.is_cancelled() {
            if !*eligible.borrow_and_update() {
                // Not ready: follow whoever holds it, campaign later.
                if let Ok(holder) = self.holder(&client, &me).await {
                    holder_tx.send_if_modified(|h| replace(h, holder));
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = eligible.changed() => {}
                    _ = tokio::time::sleep(me.period()) => {}
                }
                continue;
            }
            if let Err(error) = self
                .term(&client, &me, &mut eligible, &holder_tx, &cancel)
                .await
            {
                debug!(%error, "decider election: etcd failed; trying again");
                holder_tx.send_if_modified(|h| {
                    // Another holder stays known while etcd is away; this
                    // node's own term ended with the error.
                    let keep = matches!(h, Holder::Other { .. });
                    !keep && replace(h, Holder::Unknown)
                });
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(me.period()) => {}
                }
            }
        }
        holder_tx.send_replace(Holder::Unknown);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_records_from_etcd_are_validated() {
        let good = br#"{"name":"web-0","addr":"10.0.0.1:9090","node_id":7}"#;
        assert_eq!(
            parse_record(good),
            Some(HolderRecord {
                name: "web-0".into(),
                addr: "10.0.0.1:9090".into(),
                node_id: 7
            })
        );
        for bad in [
            &b"not json"[..],
            br#"{"name":"web-0","addr":"","node_id":7}"#,
            br#"{"name":"web-0","addr":"no port","node_id":7}"#,
            br#"{"name":"web-0","node_id":7}"#,
        ] {
            assert_eq!(parse_record(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        let huge = format!(
            r#"{{"name":"{}","addr":"10.0.0.1:9090","node_id":7}}"#,
            "x".repeat(2000)
        );
        assert_eq!(parse_record(huge.as_bytes()), None);
    }

    #[test]
    fn a_candidate_renews_three_times_a_lease() {
        let me = Candidate {
            name: "a".into(),
            addr: "a:1".into(),
            node_id: 1,
            ttl: Duration::from_secs(8),
        };
        assert_eq!(me.period(), Duration::from_secs(2));
    }
}
