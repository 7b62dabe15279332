//! `--discovery kubernetes`: pods listed and watched through the Kubernetes
//! API server, the source to choose in a normal cluster (it needs only a
//! namespaced Role with get/list/watch on pods; most clusters never expose
//! their etcd).
//!
//! Uses kube-rs' `watcher` with its default backoff: a paged list, then a
//! watch from the list's resourceVersion; a `410 Gone` (the version was
//! compacted away) makes it list again. The pods it sees go through the same
//! decoding and peer rule as the etcd sources (`PodTable`), so the rule
//! lives in one place. Owns only the API connection; must not touch the
//! store or replication.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tracing::debug;

use super::pod::{PodFilter, selector_string};
use super::pod_table::{PodTable, Publisher};
use super::{Discovery, DiscoveryContext};
use crate::metrics::label;

/// Discovery of pods through the Kubernetes API.
#[derive(Debug, Clone)]
pub struct KubernetesDiscovery {
    /// Which pods are peers (namespace, selector, name). The selector is
    /// also sent to the API server so only matching pods are listed.
    pub filter: PodFilter,
    /// A kubeconfig file to use; `None` infers the configuration as kubectl
    /// does: in-cluster service account first, then `$KUBECONFIG`, then
    /// `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
}

pub use super::kube_client::KubernetesError;

impl KubernetesDiscovery {
    async fn client(&self) -> Result<Client, KubernetesError> {
        super::kube_client::client(self.kubeconfig.as_deref()).await
    }
}

#[async_trait::async_trait]
impl Discovery for KubernetesDiscovery {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn election(&self) -> Option<Box<dyn super::election::Election>> {
        Some(Box::new(super::kubernetes_election::KubernetesElection {
            name: lease_name(&selector_string(&self.filter.selector)),
            namespace: self.filter.namespace.clone(),
            kubeconfig: self.kubeconfig.clone(),
        }))
    }

    async fn run(self: Box<Self>, ctx: DiscoveryContext) {
        let filter = self.filter.for_node(&ctx.identity);
        let namespace = filter.namespace.clone();
        let selector = selector_string(&filter.selector);
        let mut publisher = Publisher::new();
        // The configuration rarely fixes itself, but a missing service
        // account token can appear after start; retry slowly.
        let client = loop {
            match self.client().await {
                Ok(client) => break client,
                Err(err) => publisher.stale(err.to_string(), &ctx),
            }
            tokio::select! {
                _ = ctx.cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        };
        let pods: Api<Pod> = Api::namespaced(client, &namespace);
        let mut config = watcher::Config::default();
        if !selector.is_empty() {
            config = config.labels(&selector);
        }
        let events = watcher(pods, config).default_backoff();
        let mut events = std::pin::pin!(events);
        let mut table = PodTable::new(filter);
        // Pods of the listing in progress; swapped in whole at `InitDone`,
        // so a pod deleted while no watch ran disappears.
        let mut listing: Vec<(String, Vec<u8>)> = Vec::new();
        let mut listed_once = false;
        loop {
            let event = tokio::select! {
                _ = ctx.cancel.cancelled() => return,
                event = events.next() => event,
            };
            let Some(event) = event else { return };
            match event {
                Ok(watcher::Event::Init) => {
                    listing.clear();
                    if listed_once {
                        debug!("kubernetes watch restarted; listing again");
                        ctx.metrics
                            .discovery_relists
                            .get_or_create(&label("reason", "relist"))
                            .inc();
                    }
                }
                Ok(watcher::Event::InitApply(pod)) => listing.push(encode(&pod)),
                Ok(watcher::Event::InitDone) => {
                    listed_once = true;
                    let listed = std::mem::take(&mut listing);
                    table.reset(listed.iter().map(|(k, v)| (k.clone(), v.as_slice())), &ctx);
                    publisher.fresh(table.peers(), &ctx);
                }
                Ok(watcher::Event::Apply(pod)) => {
                    let (key, value) = encode(&pod);
                    table.upsert(key, &value, &ctx);
                    publisher.fresh(table.peers(), &ctx);
                }
                Ok(watcher::Event::Delete(pod)) => {
                    table.remove(&encode(&pod).0);
                    publisher.fresh(table.peers(), &ctx);
                }
                Err(err) => {
                    if matches!(&err, watcher::Error::WatchError(status) if status.code == 410) {
                        ctx.metrics
                            .discovery_relists
                            .get_or_create(&label("reason", "gone"))
                            .inc();
                        debug!("resourceVersion expired (410 Gone); listing again");
                    } else {
                        publisher.stale(format!("kubernetes API: {err}"), &ctx);
                    }
                }
            }
        }
    }
}

/// The decider Lease's name for pods selected by `selector`: a DNS label,
/// `podcache-decider-<selector, lower-cased, other characters as '-'>`.
pub fn lease_name(selector: &str) -> String {
    let mut name: String = format!("podcache-decider-{selector}")
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    name.truncate(63);
    name.trim_end_matches('-').to_owned()
}

/// A pod as the key and JSON value [`PodTable`] decodes, the same shape
/// kube-apiserver stores in etcd.
fn encode(pod: &Pod) -> (String, Vec<u8>) {
    let key = format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    );
    // Serializing a typed Pod cannot fail (no maps with non-string keys).
    let value = serde_json::to_vec(pod).unwrap_or_default();
    (key, value)
}
