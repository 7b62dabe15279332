//! `--discovery etcd-v2`: pods read from Kubernetes' etcd through the v2 keys
//! API, the original article's way (etcd ≤ 3.5 run with `--enable-v2`).
//!
//! `GET {endpoint}/v2/keys/registry/pods/{namespace}?recursive=true`, then
//! long polls `?wait=true&recursive=true&waitIndex=N`. When etcd answers
//! errorCode 401 ("the event in requested index is outdated and cleared") it
//! lists again. Plain HTTP only: TLS needs `--discovery etcd`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::StatusCode;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tracing::debug;

use super::pod::PodFilter;
use super::pod_table::{PodTable, Publisher};
use super::retry::{Ended, Retry};
use super::{Discovery, DiscoveryContext};

/// Discovery of pods via etcd's v2 keys API.
#[derive(Debug, Clone)]
pub struct EtcdV2Discovery {
    /// `http://host:port` endpoints, tried in turn.
    pub endpoints: Vec<String>,
    /// Which pods are peers.
    pub filter: PodFilter,
    /// Deadline of a listing (a long poll has none but is re-issued every
    /// minute).
    pub timeout: Duration,
    /// A pause between listing and the first long poll; zero except in tests
    /// that push etcd's event history past the wait index in that gap.
    list_watch_gap: Duration,
}

impl EtcdV2Discovery {
    /// Discovery of the pods `filter` selects, through `endpoints`.
    pub fn new(endpoints: Vec<String>, filter: PodFilter, timeout: Duration) -> Self {
        Self {
            endpoints,
            filter,
            timeout,
            list_watch_gap: Duration::ZERO,
        }
    }

    /// Pauses between every listing and its first long poll.
    #[cfg(any(test, feature = "testsuite"))]
    pub fn with_list_watch_gap(mut self, gap: Duration) -> Self {
        self.list_watch_gap = gap;
        self
    }
}

/// A v2 answer: a node (listing or event) or an error.
#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct V2Answer {
    action: String,
    node: Option<V2Node>,
    error_code: Option<u64>,
    message: Option<String>,
    index: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct V2Node {
    key: String,
    dir: bool,
    value: Option<String>,
    nodes: Vec<V2Node>,
    modified_index: u64,
}

enum Failure {
    /// errorCode 401: the wait index was cleared from etcd's history.
    Outdated,
    Other(String),
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

#[async_trait::async_trait]
impl Discovery for EtcdV2Discovery {
    fn name(&self) -> &'static str {
        "etcd-v2"
    }

    fn election(&self) -> Option<Box<dyn super::election::Election>> {
        // The same etcd serves its v3 API, where leases are: etcd 3 serves
        // both on one port (the v2 store is an option of it).
        Some(Box::new(super::election::EtcdElection {
            settings: crate::etcd::EtcdSettings {
                endpoints: self.endpoints.clone(),
                tls: crate::etcd::EtcdTls::default(),
                timeout: self.timeout,
            },
            key: super::election::EtcdElection::pods_key(&self.filter),
        }))
    }

    async fn run(self: Box<Self>, ctx: DiscoveryContext) {
        let filter = self.filter.for_node(&ctx.identity);
        let path = format!("/v2/keys/registry/pods/{}", filter.namespace);
        let mut table = PodTable::new(filter);
        let mut publisher = Publisher::new();
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(self.timeout));
        connector.set_keepalive(Some(Duration::from_secs(10)));
        let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
        let mut endpoint = 0;
        let mut retry = Retry::new();
        loop {
            let base = self.endpoints[endpoint % self.endpoints.len().max(1)].trim_end_matches('/');
            let result = tokio::select! {
                _ = ctx.cancel.cancelled() => return,
                result = session(&client, base, &path, &self, &mut table, &mut publisher, &ctx) => result,
            };
            let ended = match result {
                Failure::Outdated => {
                    debug!("v2 wait index outdated and cleared; listing again");
                    Ended::Relist("outdated")
                }
                Failure::Other(error) => {
                    // The next session tries the next endpoint.
                    endpoint += 1;
                    Ended::Failed(format!("{base}: {error}"))
                }
            };
            if !retry.after(ended, &mut publisher, &ctx).await {
                return;
            }
        }
    }
}

async fn get(
    client: &HttpClient,
    url: &str,
    timeout: Option<Duration>,
) -> Result<(StatusCode, Option<u64>, V2Answer), Failure> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| Failure::Other(format!("bad URL {url}")))?;
    let call = async {
        let response = client
            .get(uri)
            .await
            .map_err(|e| Failure::Other(format!("cannot reach etcd: {e}")))?;
        let status = response.status();
        let index = response
            .headers()
            .get("x-etcd-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Failure::Other(format!("reading etcd's answer: {e}")))?
            .to_bytes();
        let answer: V2Answer = serde_json::from_slice(&body).map_err(|e| {
            Failure::Other(format!("etcd answered something that is not v2 JSON: {e}"))
        })?;
        Ok((status, index, answer))
    };
    match timeout {
        Some(limit) => tokio::time::timeout(limit, call)
            .await
            .map_err(|_| Failure::Other(format!("no answer within {limit:?}")))?,
        None => call.await,
    }
}

fn collect<'a>(node: &'a V2Node, out: &mut Vec<(String, &'a [u8])>) {
    if node.dir {
        for child in &node.nodes {
            collect(child, out);
        }
    } else if let Some(value) = &node.value {
        out.push((node.key.clone(), value.as_bytes()));
    }
}

/// One listing followed by long polls; returns on failure.
async fn session(
    client: &HttpClient,
    base: &str,
    path: &str,
    source: &EtcdV2Discovery,
    table: &mut PodTable,
    publisher: &mut Publisher,
    ctx: &DiscoveryContext,
) -> Failure {
    let listing = format!("{base}{path}?recursive=true");
    let (status, index, answer) = match get(client, &listing, Some(source.timeout)).await {
        Ok(got) => got,
        Err(failure) => return failure,
    };
    let mut wait_index = match (status, answer.error_code) {
        (StatusCode::OK, None) => {
            let mut pods = Vec::new();
            if let Some(node) = &answer.node {
                collect(node, &mut pods);
            }
            table.reset(pods, ctx);
            index.unwrap_or(0) + 1
        }
        // errorCode 100: the namespace directory does not exist yet.
        (_, Some(100)) => {
            table.reset(Vec::new(), ctx);
            index.or(answer.index).unwrap_or(0) + 1
        }
        (status, code) => {
            return Failure::Other(format!(
                "listing answered {status} (errorCode {code:?}: {})",
                answer.message.unwrap_or_default()
            ));
        }
    };
    publisher.fresh(table.peers(), ctx);
    if !source.list_watch_gap.is_zero() {
        tokio::time::sleep(source.list_watch_gap).await;
    }
    loop {
        let url = format!("{base}{path}?wait=true&recursive=true&waitIndex={wait_index}");
        // A long poll may last as long as nothing changes; re-issued every
        // minute so a silently dead connection is noticed.
        let (status, _, event) = match get(client, &url, Some(Duration::from_secs(60))).await {
            Ok(got) => got,
            Err(Failure::Other(e)) if e.starts_with("no answer within") => continue,
            Err(failure) => return failure,
        };
        match event.error_code {
            Some(401) => return Failure::Outdated,
            Some(code) => {
                return Failure::Other(format!(
                    "watch answered {status} (errorCode {code}: {})",
                    event.message.unwrap_or_default()
                ));
            }
            None => {}
        }
        let Some(node) = event.node else {
            return Failure::Other("watch event without a node".into());
        };
        wait_index = node.modified_index + 1;
        match event.action.as_str() {
            "delete" | "expire" | "compareAndDelete" if node.dir => {
                table.remove_dir(&node.key);
            }
            "delete" | "expire" | "compareAndDelete" => {
                table.remove(&node.key);
            }
            _ => {
                if let Some(value) = &node.value {
                    table.upsert(node.key.clone(), value.as_bytes(), ctx);
                }
            }
        }
        publisher.fresh(table.peers(), ctx);
    }
}
