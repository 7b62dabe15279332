//! `--discovery etcd`: pods read from Kubernetes' etcd through the v3 API.
//!
//! Lists `/registry/pods/{namespace}/` at one revision, then watches from the
//! next revision, so no change between the two is lost. When the watch is
//! cancelled because its revision was compacted, or the connection drops, it
//! lists and watches again (with backoff after failures). While etcd cannot
//! be reached the last membership stays published, marked stale.

use std::time::Duration;

use tracing::debug;

use super::pod::PodFilter;
use super::pod_table::{PodTable, Publisher};
use super::retry::{Ended, Retry};
use super::{Discovery, DiscoveryContext};
use crate::etcd::{EtcdClient, EtcdError, EtcdSettings};
use crate::proto::etcd::event::EventType;

/// Discovery of pods in etcd via the v3 API.
#[derive(Debug, Clone)]
pub struct EtcdDiscovery {
    /// Where etcd is.
    pub settings: EtcdSettings,
    /// Which pods are peers. `self_pod_ip` and `grpc_port` are filled in
    /// from the node at run time (`PodFilter::for_node`).
    pub filter: PodFilter,
    /// A pause between listing and watching; zero except in tests that make
    /// etcd compact the history in that gap.
    list_watch_gap: Duration,
}

/// The key prefix kube-apiserver stores a namespace's pods under.
pub fn pods_prefix(namespace: &str) -> String {
    format!("/registry/pods/{namespace}/")
}

impl EtcdDiscovery {
    /// Discovery of the pods `filter` selects, in the etcd at `settings`.
    pub fn new(settings: EtcdSettings, filter: PodFilter) -> Self {
        Self {
            settings,
            filter,
            list_watch_gap: Duration::ZERO,
        }
    }

    /// Pauses between every listing and its watch, so a test can change and
    /// compact etcd in between.
    #[cfg(any(test, feature = "testsuite"))]
    pub fn with_list_watch_gap(mut self, gap: Duration) -> Self {
        self.list_watch_gap = gap;
        self
    }
}

#[async_trait::async_trait]
impl Discovery for EtcdDiscovery {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn election(&self) -> Option<Box<dyn super::election::Election>> {
        Some(Box::new(super::election::EtcdElection {
            settings: self.settings.clone(),
            key: super::election::EtcdElection::pods_key(&self.filter),
        }))
    }

    async fn run(self: Box<Self>, ctx: DiscoveryContext) {
        let filter = self.filter.for_node(&ctx.identity);
        let prefix = pods_prefix(&filter.namespace);
        let mut table = PodTable::new(filter);
        let mut publisher = Publisher::new();
        let mut retry = Retry::new();
        loop {
            let result = tokio::select! {
                _ = ctx.cancel.cancelled() => return,
                result = session(&self, prefix.as_bytes(), &mut table, &mut publisher, &ctx) => result,
            };
            let ended = match result {
                Err(EtcdError::Compacted { compact_revision }) => {
                    // Nothing is wrong with etcd: list again at once.
                    debug!(compact_revision, "watch revision compacted; listing again");
                    Ended::Relist("compacted")
                }
                Err(err) => Ended::Failed(err.to_string()),
                Ok(()) => Ended::Done,
            };
            if !retry.after(ended, &mut publisher, &ctx).await {
                return;
            }
        }
    }
}

/// One list-then-watch; returns only on failure (or compaction).
async fn session(
    source: &EtcdDiscovery,
    prefix: &[u8],
    table: &mut PodTable,
    publisher: &mut Publisher,
    ctx: &DiscoveryContext,
) -> Result<(), EtcdError> {
    let client = EtcdClient::connect(&source.settings)?;
    let (kvs, revision) = client.range_prefix(prefix).await?;
    table.reset(
        kvs.iter().map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                kv.value.as_slice(),
            )
        }),
        ctx,
    );
    publisher.fresh(table.peers(), ctx);
    if !source.list_watch_gap.is_zero() {
        tokio::time::sleep(source.list_watch_gap).await;
    }
    let mut watch = client.watch_prefix(prefix, revision + 1).await?;
    loop {
        let events = watch.next_events().await?;
        for event in &events {
            let Some(kv) = &event.kv else { continue };
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            if event.r#type == EventType::Delete as i32 {
                table.remove(&key);
            } else {
                table.upsert(key, &kv.value, ctx);
            }
        }
        // Every answer (events or a progress notification) proves etcd is
        // reachable: the set is fresh as of now.
        publisher.fresh(table.peers(), ctx);
    }
}
