//! `--discovery etcd-lease`: for running outside Kubernetes. Each node
//! registers itself in an etcd of its own choosing under a prefix, on a
//! lease it keeps alive, and watches the prefix for the others.
//!
//! A node that dies stops renewing, and etcd deletes its key when the lease
//! runs out (a node that shuts down cleanly revokes it at once). When etcd is
//! lost (unreachable, or restarted without its data) the keep-alive or the
//! watch fails, the last membership stays published as stale, and the next
//! session grants a new lease and registers again by itself.
//!
//! Owns: the registration key and its lease. Must not touch the store or
//! replication.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::pod_table::Publisher;
use super::retry::{Ended, Retry};
use super::{Discovery, DiscoveryContext, Peer};
use crate::etcd::{EtcdClient, EtcdError, EtcdSettings};
use crate::metrics::label;
use crate::proto::etcd::LeaseKeepAliveRequest;
use crate::proto::etcd::event::EventType;

/// The default registration prefix.
pub const DEFAULT_PREFIX: &str = "/podcache/members/";

/// Discovery through self-registration in etcd.
#[derive(Debug, Clone)]
pub struct EtcdLeaseDiscovery {
    /// Where etcd is.
    pub settings: EtcdSettings,
    /// Key prefix shared by the members of one cluster, ending in `/`.
    pub prefix: String,
    /// Lease time to live: how long a crashed node stays listed. Renewed
    /// every third of it.
    pub lease_ttl: Duration,
}

/// What a node registers about itself (JSON under `{prefix}{grpc addr}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Node name.
    pub name: String,
    /// Address peers dial.
    pub grpc_addr: String,
    /// Host IP, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    /// Process start, Unix milliseconds.
    pub started_at_ms: i64,
}

/// Why a registration value is not a member.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// Not JSON of the member shape.
    #[error("not a member record: {0}")]
    Json(#[from] serde_json::Error),
    /// The address is not `ip:port`.
    #[error("grpc_addr {0:?} is not an ip:port address")]
    Address(String),
    /// The name is empty or longer than a DNS name may be.
    #[error("member name must be 1 to 253 bytes")]
    Name,
}

impl Member {
    /// Decodes and validates a registration value.
    pub fn decode(value: &[u8]) -> Result<Self, MemberError> {
        let member: Member = serde_json::from_slice(value)?;
        if member.grpc_addr.parse::<SocketAddr>().is_err() {
            return Err(MemberError::Address(member.grpc_addr));
        }
        if member.name.is_empty() || member.name.len() > 253 {
            return Err(MemberError::Name);
        }
        Ok(member)
    }

    fn peer(self) -> Peer {
        Peer {
            grpc_addr: self.grpc_addr,
            name: Some(self.name),
            host_ip: self.host_ip,
            started_at_ms: Some(self.started_at_ms),
        }
    }
}

/// Why one registration session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("etcd no longer knows our lease (it expired or etcd lost its data)")]
    LeaseLost,
    #[error("etcd did not renew our lease within {0:?}")]
    KeepAliveSilent(Duration),
    #[error("shutting down")]
    Cancelled,
}

#[async_trait::async_trait]
impl Discovery for EtcdLeaseDiscovery {
    fn name(&self) -> &'static str {
        "etcd-lease"
    }

    fn election(&self) -> Option<Box<dyn super::election::Election>> {
        // Beside the members' prefix, not under it (members are listed by
        // the prefix).
        Some(Box::new(super::election::EtcdElection {
            settings: self.settings.clone(),
            key: format!("/podcache-decider{}", self.prefix),
        }))
    }

    async fn run(self: Box<Self>, ctx: DiscoveryContext) {
        let mut members = Members::default();
        let mut publisher = Publisher::new();
        let mut retry = Retry::new();
        loop {
            // The session notices the shutdown itself: it revokes its lease.
            let ended = match self.session(&mut members, &mut publisher, &ctx).await {
                Err(SessionEnd::Cancelled) | Ok(()) => Ended::Done,
                Err(SessionEnd::Etcd(EtcdError::Compacted { .. })) => Ended::Relist("compacted"),
                Err(err) => Ended::Failed(err.to_string()),
            };
            if !retry.after(ended, &mut publisher, &ctx).await {
                return;
            }
        }
    }
}

impl EtcdLeaseDiscovery {
    /// Registers (new lease, put), lists, then watches and renews until
    /// something fails or the node shuts down (then revokes the lease).
    async fn session(
        &self,
        members: &mut Members,
        publisher: &mut Publisher,
        ctx: &DiscoveryContext,
    ) -> Result<(), SessionEnd> {
        let client = EtcdClient::connect(&self.settings)?;
        let ttl = self.lease_ttl.max(Duration::from_secs(2));
        let lease = client.grant_lease(ttl.as_secs() as i64).await?;
        let mut keeper = client.keep_alive(lease).await?;
        let me = &ctx.identity;
        let key = format!("{}{}", self.prefix, me.grpc_addr);
        let value = serde_json::to_vec(&Member {
            name: me.name.clone(),
            grpc_addr: me.grpc_addr.clone(),
            host_ip: me.host_ip.clone(),
            started_at_ms: me.started_at_ms,
        })
        .map_err(|e| EtcdError::Call(e.to_string()))?;
        client.put(key.as_bytes(), &value, lease).await?;
        info!(key, lease, "registered in etcd");

        let result = async {
            let (kvs, revision) = client.range_prefix(self.prefix.as_bytes()).await?;
            members.reset(kvs.iter().map(|kv| (&kv.key[..], &kv.value[..])), ctx);
            publisher.fresh(members.peers(), ctx);
            let mut watch = client.watch_prefix(self.prefix.as_bytes(), revision + 1).await?;
            let mut renew = tokio::time::interval(ttl / 3);
            let mut last_renewed = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = ctx.cancel.cancelled() => return Err(SessionEnd::Cancelled),
                    _ = renew.tick() => {
                        if last_renewed.elapsed() > ttl {
                            return Err(SessionEnd::KeepAliveSilent(ttl));
                        }
                        if keeper.keep_alive_tx.send(LeaseKeepAliveRequest { id: lease }).await.is_err() {
                            return Err(EtcdError::WatchEnded("keep-alive stream closed".into()).into());
                        }
                    }
                    answer = keeper.responses.message() => {
                        match answer.map_err(EtcdError::from)? {
                            Some(renewed) if renewed.ttl > 0 => last_renewed = tokio::time::Instant::now(),
                            Some(_) => return Err(SessionEnd::LeaseLost),
                            None => return Err(EtcdError::WatchEnded("etcd closed the keep-alive stream".into()).into()),
                        }
                    }
                    events = watch.next_events() => {
                        for event in events? {
                            let Some(kv) = event.kv else { continue };
                            if event.r#type == EventType::Delete as i32 {
                                members.remove(&kv.key);
                            } else {
                                members.upsert(&kv.key, &kv.value, ctx);
                            }
                        }
                        publisher.fresh(members.peers(), ctx);
                    }
                }
            }
        }
        .await;
        if matches!(result, Err(SessionEnd::Cancelled)) {
            // Deregister: the others drop this node now instead of after
            // the lease runs out. Bounded, since etcd may be gone.
            match tokio::time::timeout(Duration::from_secs(1), client.revoke_lease(lease)).await {
                Ok(Ok(())) => debug!(key, "deregistered from etcd"),
                _ => warn!(key, "could not revoke the lease; the key expires with it"),
            }
        }
        result
    }
}

/// The registered members by key, and the keys already warned about.
#[derive(Default)]
struct Members {
    by_key: BTreeMap<Vec<u8>, Peer>,
    warned: HashSet<Vec<u8>>,
}

impl Members {
    fn reset<'a>(
        &mut self,
        listing: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
        ctx: &DiscoveryContext,
    ) {
        self.by_key.clear();
        for (key, value) in listing {
            self.upsert(key, value, ctx);
        }
    }

    fn upsert(&mut self, key: &[u8], value: &[u8], ctx: &DiscoveryContext) {
        match Member::decode(value) {
            Ok(member) => {
                self.by_key.insert(key.to_vec(), member.peer());
            }
            Err(err) => {
                self.by_key.remove(key);
                ctx.metrics
                    .discovery_skipped
                    .get_or_create(&label("reason", "undecodable"))
                    .inc();
                if self.warned.insert(key.to_vec()) {
                    warn!(key = %String::from_utf8_lossy(key), error = %err, "skipping a registration that is not a member");
                }
            }
        }
    }

    fn remove(&mut self, key: &[u8]) {
        self.by_key.remove(key);
    }

    fn peers(&self) -> Vec<Peer> {
        self.by_key.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_values_are_validated() {
        let good = br#"{"name":"a","grpc_addr":"10.0.0.1:9090","started_at_ms":5}"#;
        assert_eq!(
            Member::decode(good).expect("valid").peer().grpc_addr,
            "10.0.0.1:9090"
        );
        for bad in [
            &br#"{"name":"a","grpc_addr":"nowhere","started_at_ms":5}"#[..],
            br#"{"name":"","grpc_addr":"10.0.0.1:9090","started_at_ms":5}"#,
            br#"{"name":"a","started_at_ms":5}"#,
            b"\xff\x00",
            b"",
        ] {
            assert!(Member::decode(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
