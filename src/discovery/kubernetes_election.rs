//! The decider's lease as a `coordination.k8s.io/v1` Lease, with
//! `--discovery kubernetes`: taken and renewed as client-go's
//! `leaderelection` does (and so as Kubernetes' own controllers elect
//! their leaders).
//!
//! - A candidate reads the Lease. Absent: it creates it naming itself.
//!   Held by itself: it renews it (`renewTime`) with the `resourceVersion`
//!   it read, so a concurrent change makes the update fail (409). Held by
//!   another: it takes it over only once the record has not changed for a
//!   whole `leaseDurationSeconds` *as this node observed it* (client-go's
//!   rule: no clocks are compared across nodes), again with the
//!   `resourceVersion`, so of two candidates one wins.
//! - `holderIdentity` is `<pod name>_<gRPC address>`: pod names hold no
//!   `_`, and the address is where conditional writes are forwarded.
//! - A holder counts its lease from when it sent the request that took or
//!   renewed it. At shutdown it gives the lease up (an empty holder), as
//!   client-go's `ReleaseOnCancel`.
//!
//! Needs `get`, `create` and `update` on `leases` in the namespace (see
//! deploy/). Owns the Lease protocol only; must not touch what is decided.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::election::{Candidate, Election, Holder};
use crate::identity::unix_ms;

/// The decider's lease as a Kubernetes Lease.
#[derive(Debug, Clone)]
pub struct KubernetesElection {
    /// The Lease's name.
    pub name: String,
    /// Its namespace (the pods').
    pub namespace: String,
    /// The kubeconfig pod discovery uses, if any.
    pub kubeconfig: Option<std::path::PathBuf>,
}

/// The identity a holder writes into the Lease.
fn identity(me: &Candidate) -> String {
    format!("{}_{}", me.name, me.addr)
}

/// The holder a Lease names, checked (a Lease is input from outside).
fn holder_of(lease: &Lease) -> Option<(String, String)> {
    let identity = lease.spec.as_ref()?.holder_identity.as_deref()?;
    if identity.len() > 512 {
        return None;
    }
    let (name, addr) = identity.rsplit_once('_')?;
    let valid = !addr.is_empty() && addr.contains(':') && !addr.contains(char::is_whitespace);
    valid.then(|| (name.to_owned(), addr.to_owned()))
}

fn now_micro() -> MicroTime {
    MicroTime(
        k8s_openapi::chrono::DateTime::from_timestamp_millis(unix_ms() as i64).unwrap_or_default(),
    )
}

/// What this node knows of the Lease while another holds it.
#[derive(Debug)]
struct Observed {
    resource_version: Option<String>,
    /// When this node last saw the record change.
    at: Instant,
}

impl KubernetesElection {
    fn spec(me: &Candidate, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(identity(me)),
            lease_duration_seconds: Some(me.ttl.as_secs() as i32),
            acquire_time: acquired.or_else(|| Some(now_micro())),
            renew_time: Some(now_micro()),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One look at the Lease: takes, renews or follows it. Returns the
    /// holder now.
    async fn step(
        &self,
        leases: &Api<Lease>,
        me: &Candidate,
        eligible: bool,
        observed: &mut Option<Observed>,
    ) -> Result<Holder, kube::Error> {
        let sent = Instant::now();
        let sent_wall = unix_ms();
        let mine = |sent: Instant, sent_wall: u64, term: u64| Holder::Me {
            term,
            until: sent + me.ttl,
            until_wall_ms: sent_wall + me.ttl.as_millis() as u64,
        };
        let Some(current) = leases.get_opt(&self.name).await? else {
            if !eligible {
                return Ok(Holder::Unknown);
            }
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(Self::spec(me, 0, None)),
            };
            let created = leases.create(&PostParams::default(), &lease).await?;
            info!(lease = %self.name, "this node holds the decider's Lease");
            return Ok(mine(sent, sent_wall, term_of(&created)));
        };
        let spec = current.spec.clone().unwrap_or_default();
        let held_by_me = spec.holder_identity.as_deref() == Some(identity(me).as_str());
        let transitions = spec.lease_transitions.unwrap_or(0);
        let version = current.metadata.resource_version.clone();
        if held_by_me {
            if !eligible {
                return self
                    .release(leases, current)
                    .await
                    .map(|()| Holder::Unknown);
            }
            let mut renewed = current.clone();
            renewed.spec = Some(Self::spec(me, transitions, spec.acquire_time.clone()));
            leases
                .replace(&self.name, &PostParams::default(), &renewed)
                .await?;
            // A renewal keeps the term: the transitions it was taken at.
            return Ok(mine(sent, sent_wall, transitions.max(0) as u64));
        }
        // Held by another, or by nobody (an empty holder).
        let changed = observed
            .as_ref()
            .is_none_or(|o| o.resource_version != version);
        if changed {
            *observed = Some(Observed {
                resource_version: version,
                at: Instant::now(),
            });
        }
        let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
        let empty = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        let expired = observed
            .as_ref()
            .is_some_and(|o| o.at.elapsed() >= duration);
        if eligible && (empty || expired) {
            let mut taken = current.clone();
            taken.spec = Some(Self::spec(me, transitions + 1, None));
            let taken = leases
                .replace(&self.name, &PostParams::default(), &taken)
                .await?;
            info!(lease = %self.name, "this node took over the decider's Lease");
            *observed = None;
            return Ok(mine(sent, sent_wall, term_of(&taken)));
        }
        Ok(match holder_of(&current) {
            Some((name, addr)) if !expired => Holder::Other { addr, name },
            _ => Holder::Unknown,
        })
    }

    /// Gives the Lease up: an empty holder, so the next candidate need not
    /// wait it out.
    async fn release(&self, leases: &Api<Lease>, mut current: Lease) -> Result<(), kube::Error> {
        if let Some(spec) = current.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(now_micro());
        }
        leases
            .replace(&self.name, &PostParams::default(), &current)
            .await
            .map(|_| ())
    }
}

/// A term's number: the Lease's transitions (one per new holder).
fn term_of(lease: &Lease) -> u64 {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0)
        .max(0) as u64
}

#[async_trait::async_trait]
impl Election for KubernetesElection {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    async fn run(
        self: Box<Self>,
        me: Candidate,
        mut eligible: watch::Receiver<bool>,
        holder_tx: watch::Sender<Holder>,
        cancel: CancellationToken,
    ) {
        let client = loop {
            match super::kube_client::client(self.kubeconfig.as_deref()).await {
                Ok(client) => break client,
                Err(error) => debug!(%error, "decider election: no Kubernetes client yet"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        };
        let leases: Api<Lease> = Api::namespaced(client, &self.namespace);
        let mut observed = None;
        loop {
            let ready = *eligible.borrow_and_update();
            match self.step(&leases, &me, ready, &mut observed).await {
                Ok(holder) => {
                    holder_tx.send_if_modified(|h| {
                        let changed = *h != holder;
                        *h = holder;
                        changed
                    });
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    // Someone else changed it first: look again at once.
                    debug!("decider Lease changed concurrently; reading it again");
                    if matches!(*holder_tx.borrow(), Holder::Me { .. }) {
                        holder_tx.send_replace(Holder::Unknown);
                    }
                    continue;
                }
                Err(error) => {
                    warn!(%error, "decider election: the Kubernetes API failed; trying again");
                    // This node's lease runs out by itself if the renewals
                    // keep failing: the decider checks `until`.
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = eligible.changed() => {}
                _ = tokio::time::sleep(me.period()) => {}
            }
        }
        if matches!(*holder_tx.borrow(), Holder::Me { .. }) {
            holder_tx.send_replace(Holder::Unknown);
            if let Ok(Some(current)) = leases.get_opt(&self.name).await
                && current
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.as_deref())
                    == Some(identity(&me).as_str())
                && let Err(error) = self.release(&leases, current).await
            {
                debug!(%error, "could not give the decider's Lease up; it runs out by itself");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_identity_names_a_pod_and_an_address() {
        let me = Candidate {
            name: "web-0".into(),
            addr: "10.0.0.1:9090".into(),
            node_id: 1,
            ttl: Duration::from_secs(10),
        };
        let lease = Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(identity(&me)),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        };
        assert_eq!(
            holder_of(&lease),
            Some(("web-0".to_owned(), "10.0.0.1:9090".to_owned()))
        );
        for bad in [
            "",
            "no-underscore",
            "web-0_",
            "web-0_no port",
            "web-0_noport",
        ] {
            let lease = Lease {
                spec: Some(LeaseSpec {
                    holder_identity: Some(bad.into()),
                    ..LeaseSpec::default()
                }),
                ..Lease::default()
            };
            assert_eq!(holder_of(&lease), None, "{bad:?}");
        }
    }
}
