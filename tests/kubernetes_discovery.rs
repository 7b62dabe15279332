//! `--discovery kubernetes` against a stand-in API server.
//!
//! No kube-apiserver can run on these machines, so [`FakeApiServer`] is an
//! HTTP server written here that speaks the part of the real protocol a pod
//! watcher uses: `GET /api/v1/namespaces/{ns}/pods` answers a JSON `PodList`
//! with a `metadata.resourceVersion`; the same path with `watch=true` answers
//! a chunked stream of `{"type":"ADDED|MODIFIED|DELETED","object":pod}`
//! lines starting after the requested `resourceVersion`, and an `ERROR`
//! event with a `Status` of code 410 (Gone) when that version has expired,
//! after which a correct client must list again. It checks the bearer
//! token from the kubeconfig. The client on the other side is the real
//! kube-rs watcher inside podcache.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::discovery_probe::{hello_filter, run};
use common::local_etcd::free_low_port;
use common::{next_block, wait_for_peers, wait_until};
use futures_util::StreamExt;
use podcache::discovery::KubernetesDiscovery;
use podcache::{NodeBuilder, NodeConfig, NodeHandle};
use serde_json::{Value, json};
use tokio::sync::broadcast;

const TOKEN: &str = "podcache-test-token";

/// What the stand-in API server knows and has been asked.
#[derive(Default)]
struct ApiState {
    /// Pods by name, each with the resourceVersion of its last change.
    pods: BTreeMap<String, Value>,
    /// Every change as a watch event, with its resourceVersion.
    history: Vec<(u64, Value)>,
    resource_version: u64,
    /// Versions below this have "expired": watching from them answers 410.
    oldest_watchable: u64,
    lists: usize,
    watches: usize,
    /// Query strings of every request, to check what the client sent.
    queries: Vec<String>,
    unauthorized: usize,
    /// `coordination.k8s.io/v1` Leases by name.
    leases: BTreeMap<String, Value>,
}

#[derive(Clone)]
struct FakeApiServer {
    state: Arc<Mutex<ApiState>>,
    /// Live watch events; `None` tells open watches that their version
    /// expired.
    events_tx: broadcast::Sender<Option<(u64, Value)>>,
    url: String,
}

fn pod(name: &str, ip: &str, phase: &str, started: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"app": "hello"},
            "uid": format!("uid-{name}"),
        },
        "spec": {"containers": [{"name": "app", "image": "podcache"}]},
        "status": {
            "phase": phase,
            "podIP": ip,
            "hostIP": "10.0.0.1",
            "startTime": started,
            "containerStatuses": [{
                "name": "app", "image": "podcache", "imageID": "", "ready": true,
                "restartCount": 0,
                "state": {"running": {"startedAt": started}}
            }]
        }
    })
}

impl FakeApiServer {
    async fn start() -> Self {
        let (events_tx, _) = broadcast::channel(64);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let server = Self {
            state: Arc::default(),
            events_tx,
            url,
        };
        let app = axum::Router::new()
            .route("/api/v1/namespaces/{ns}/pods", axum::routing::get(pods))
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
                axum::routing::post(create_lease),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
                axum::routing::get(get_lease).put(replace_lease),
            )
            .with_state(server.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        server
    }

    /// Adds or replaces a pod, as a watch event unless `silently`.
    fn apply(&self, mut pod: Value, silently: bool) {
        let mut state = self.state.lock().expect("lock");
        state.resource_version += 1;
        let rv = state.resource_version;
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        let name = pod["metadata"]["name"].as_str().expect("name").to_owned();
        let kind = if state.pods.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.pods.insert(name, pod.clone());
        if !silently {
            let event = json!({"type": kind, "object": pod});
            state.history.push((rv, event.clone()));
            let _ = self.events_tx.send(Some((rv, event)));
        }
    }

    /// Deletes a pod; `silently` loses the event, as when the watch history
    /// was compacted while no watch was open.
    fn delete(&self, name: &str, silently: bool) {
        let mut state = self.state.lock().expect("lock");
        state.resource_version += 1;
        let rv = state.resource_version;
        let Some(mut pod) = state.pods.remove(name) else {
            return;
        };
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        if !silently {
            let event = json!({"type": "DELETED", "object": pod});
            state.history.push((rv, event.clone()));
            let _ = self.events_tx.send(Some((rv, event)));
        }
    }

    /// Expires every version up to now: open watches get a 410 event and
    /// end, and watching from an old version answers 410.
    fn expire_history(&self) {
        let mut state = self.state.lock().expect("lock");
        state.oldest_watchable = state.resource_version + 1;
        state.history.clear();
        let _ = self.events_tx.send(None);
    }

    fn lists(&self) -> usize {
        self.state.lock().expect("lock").lists
    }

    fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user:\n    token: {TOKEN}\n",
            self.url
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }
}

fn gone() -> Value {
    json!({"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version", "reason": "Expired", "code": 410
    }})
}

fn line(value: &Value) -> Result<bytes::Bytes, Infallible> {
    let mut text = value.to_string();
    text.push('\n');
    Ok(bytes::Bytes::from(text))
}

async fn pods(
    State(api): State<FakeApiServer>,
    Path(namespace): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let mut state = api.state.lock().expect("lock");
    state.queries.push(format!("{query:?}"));
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {TOKEN}"));
    if !authorized {
        state.unauthorized += 1;
        return (StatusCode::UNAUTHORIZED, "no token").into_response();
    }
    assert_eq!(namespace, "default");
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !watching {
        state.lists += 1;
        let items: Vec<Value> = state.pods.values().cloned().collect();
        let list = json!({
            "kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": state.resource_version.to_string()},
            "items": items,
        });
        return axum::Json(list).into_response();
    }
    state.watches += 1;
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let body = if from + 1 < state.oldest_watchable {
        Body::from_stream(futures_util::stream::iter([line(&gone())]))
    } else {
        let backlog: Vec<_> = state
            .history
            .iter()
            .filter(|(rv, _)| *rv > from)
            .map(|(_, e)| line(e))
            .collect();
        let live = tokio_stream::wrappers::BroadcastStream::new(api.events_tx.subscribe())
            .take_while(|event| std::future::ready(!matches!(event, Ok(None))))
            .filter_map(move |event| {
                std::future::ready(match event {
                    Ok(Some((rv, event))) if rv > from => Some(line(&event)),
                    _ => None,
                })
            })
            .chain(futures_util::stream::iter([line(&gone())]));
        Body::from_stream(futures_util::stream::iter(backlog).chain(live))
    };
    Response::builder()
        .header("content-type", "application/json")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A `Status` answer, as the API server sends with an error.
fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    (code, axum::Json(body)).into_response()
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {TOKEN}"))
}

/// `GET .../leases/{name}`.
async fn get_lease(
    State(api): State<FakeApiServer>,
    Path((_, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&headers) {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "no token");
    }
    let state = api.state.lock().expect("lock");
    match state.leases.get(&name) {
        Some(lease) => axum::Json(lease.clone()).into_response(),
        None => status(StatusCode::NOT_FOUND, "NotFound", "lease not found"),
    }
}

/// `POST .../leases`: creates it, or 409 `AlreadyExists`.
async fn create_lease(
    State(api): State<FakeApiServer>,
    Path(namespace): Path<String>,
    headers: HeaderMap,
    axum::Json(mut lease): axum::Json<Value>,
) -> Response {
    if !authorized(&headers) {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "no token");
    }
    let mut state = api.state.lock().expect("lock");
    let Some(name) = lease["metadata"]["name"].as_str().map(str::to_owned) else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "name is required",
        );
    };
    if state.leases.contains_key(&name) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            "lease already exists",
        );
    }
    state.resource_version += 1;
    lease["apiVersion"] = json!("coordination.k8s.io/v1");
    lease["kind"] = json!("Lease");
    lease["metadata"]["namespace"] = json!(namespace);
    lease["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
    state.leases.insert(name, lease.clone());
    (StatusCode::CREATED, axum::Json(lease)).into_response()
}

/// `PUT .../leases/{name}`: replaces it only at the `resourceVersion` the
/// client read, else 409 `Conflict` (optimistic concurrency).
async fn replace_lease(
    State(api): State<FakeApiServer>,
    Path((_, name)): Path<(String, String)>,
    headers: HeaderMap,
    axum::Json(mut lease): axum::Json<Value>,
) -> Response {
    if !authorized(&headers) {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "no token");
    }
    let mut state = api.state.lock().expect("lock");
    let Some(current) = state.leases.get(&name) else {
        return status(StatusCode::NOT_FOUND, "NotFound", "lease not found");
    };
    if lease["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
        return status(
            StatusCode::CONFLICT,
            "Conflict",
            "the object has been modified; please apply your changes to the latest version",
        );
    }
    state.resource_version += 1;
    lease["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
    state.leases.insert(name, lease.clone());
    axum::Json(lease).into_response()
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "podcache-k8s-{}-{tag}-{}",
        std::process::id(),
        next_block()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[tokio::test]
async fn lists_watches_follows_changes_and_lists_again_after_410_gone() {
    let api = FakeApiServer::start().await;
    api.apply(
        pod("a", "10.1.0.1", "Running", "2026-01-01T00:00:01Z"),
        false,
    );
    api.apply(
        pod("b", "10.1.0.2", "Running", "2026-01-01T00:00:02Z"),
        false,
    );
    api.apply(pod("pending", "", "Pending", "2026-01-01T00:00:03Z"), false);
    api.apply(
        pod("me", "10.1.0.9", "Running", "2026-01-01T00:00:04Z"),
        false,
    );
    let dir = temp_dir("watch");
    let mut running = run(
        KubernetesDiscovery {
            filter: hello_filter(),
            kubeconfig: Some(api.kubeconfig(&dir)),
        },
        "10.1.0.9",
    );
    let set = running
        .wait_peers(&["10.1.0.1:9090", "10.1.0.2:9090"], Duration::from_secs(10))
        .await;
    let a = &set.peers[0];
    assert_eq!(a.name.as_deref(), Some("a"));
    assert_eq!(a.host_ip.as_deref(), Some("10.0.0.1"));
    assert_eq!(a.started_at_ms, Some(1_767_225_601_000));
    {
        let state = api.state.lock().expect("lock");
        assert_eq!(state.unauthorized, 0, "the kubeconfig token is sent");
        assert!(
            state
                .queries
                .iter()
                .all(|q| q.contains("\"labelSelector\": \"app=hello\"")),
            "the selector is sent to the API server: {:?}",
            state.queries
        );
    }

    // Changes arrive through the watch.
    api.apply(
        pod("c", "10.1.0.3", "Running", "2026-01-01T00:00:05Z"),
        false,
    );
    api.delete("a", false);
    running
        .wait_peers(&["10.1.0.2:9090", "10.1.0.3:9090"], Duration::from_secs(5))
        .await;
    let lists_before = api.lists();

    // The history expires and a deletion happens that no watch will ever
    // report: only a new list can notice it.
    api.delete("b", true);
    api.expire_history();
    running
        .wait_peers(&["10.1.0.3:9090"], Duration::from_secs(10))
        .await;
    assert!(api.lists() > lists_before, "410 Gone made it list again");
    wait_until("the relist is counted", Duration::from_secs(2), || async {
        running
            .metrics
            .render()
            .contains("podcache_discovery_relists_total{reason=\"gone\"}")
    })
    .await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_api_server_that_refuses_us_leaves_the_node_stale_not_dead() {
    let api = FakeApiServer::start().await;
    let dir = temp_dir("denied");
    // A kubeconfig with the wrong token: every request gets 401.
    let path = api.kubeconfig(&dir);
    let text = std::fs::read_to_string(&path)
        .expect("read")
        .replace(TOKEN, "wrong");
    std::fs::write(&path, text).expect("write");
    let mut running = run(
        KubernetesDiscovery {
            filter: hello_filter(),
            kubeconfig: Some(path),
        },
        "10.1.0.9",
    );
    let stale = tokio::time::timeout(
        Duration::from_secs(10),
        running
            .peers_rx
            .wait_for(|s| matches!(s.state, podcache::discovery::DiscoveryState::Stale { .. })),
    )
    .await;
    assert!(stale.is_ok(), "a refused client is reported stale");
    assert!(api.state.lock().expect("lock").unauthorized > 0);
    let _ = std::fs::remove_dir_all(dir);
}

/// Three real nodes that know each other only through the (stand-in) API
/// server: a write spreads, and a newcomer bootstraps from the pod that
/// started first.
#[tokio::test]
async fn nodes_find_each_other_through_the_api_server_and_replicate() {
    let api = FakeApiServer::start().await;
    let dir = temp_dir("nodes");
    let kubeconfig = api.kubeconfig(&dir);
    let block = next_block();
    let ip = |host: u32| Ipv4Addr::from(block | host);
    let port = free_low_port(ip(2)).expect("port");
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for (host, started) in [
        (2, "2026-01-01T00:00:01Z"),
        (3, "2026-01-01T00:00:02Z"),
        (4, "2026-01-01T00:00:03Z"),
    ] {
        let name = format!("pod-{host}");
        api.apply(pod(&name, &ip(host).to_string(), "Running", started), false);
        let mut config = NodeConfig::for_test(ip(host));
        config.pod_name = name;
        config.grpc_addr = std::net::SocketAddr::new(ip(host).into(), port);
        let mut filter = hello_filter();
        filter.grpc_port = port;
        let node = NodeBuilder::new(config)
            .discovery(KubernetesDiscovery {
                filter,
                kubeconfig: Some(kubeconfig.clone()),
            })
            .start()
            .await
            .expect("node");
        node.wait_ready().await;
        nodes.push(node);
    }
    for node in &nodes {
        wait_for_peers(node, 2, Duration::from_secs(10)).await;
    }
    let view = podcache::client::RestClient::new(&nodes[0].http_addr().expect("http").to_string())
        .expect("client")
        .get("/v1/cluster")
        .await
        .expect("cluster")
        .json();
    assert_eq!(view["discovery"]["source"], "kubernetes");
    nodes[2].set(7, "route", "eu", None).await.expect("set");
    for node in &nodes {
        wait_until("write spreads", Duration::from_secs(5), || async {
            node.get(7, "route").as_deref() == Some("eu")
        })
        .await;
    }
    api.apply(
        pod(
            "pod-5",
            &ip(5).to_string(),
            "Running",
            "2026-01-01T00:00:09Z",
        ),
        false,
    );
    let mut config = NodeConfig::for_test(ip(5));
    config.pod_name = "pod-5".into();
    config.grpc_addr = std::net::SocketAddr::new(ip(5).into(), port);
    let mut filter = hello_filter();
    filter.grpc_port = port;
    let newcomer = NodeBuilder::new(config)
        .discovery(KubernetesDiscovery {
            filter,
            kubeconfig: Some(kubeconfig),
        })
        .start()
        .await
        .expect("newcomer");
    newcomer.wait_ready().await;
    let report = newcomer.bootstrap_report().expect("bootstrapped");
    assert_eq!(report.source_name.as_deref(), Some("pod-2"), "{report:?}");
    assert_eq!(newcomer.get(7, "route").as_deref(), Some("eu"));
    for node in nodes.into_iter().chain([newcomer]) {
        node.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The decider's lease as a `coordination.k8s.io/v1` Lease: three nodes
/// agree on the holder the Lease names, a conditional write on another
/// replica is forwarded to it, and when the holder shuts down it gives the
/// Lease up and another replica takes it over and decides.
#[tokio::test]
async fn the_decider_holds_a_kubernetes_lease_and_hands_it_over_at_shutdown() {
    let api = FakeApiServer::start().await;
    let dir = temp_dir("lease");
    let kubeconfig = api.kubeconfig(&dir);
    let block = next_block();
    let ip = |host: u32| Ipv4Addr::from(block | host);
    let port = free_low_port(ip(2)).expect("port");
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for host in 2..=4 {
        let name = format!("pod-{host}");
        let started = format!("2026-01-01T00:00:0{host}Z");
        api.apply(
            pod(&name, &ip(host).to_string(), "Running", &started),
            false,
        );
        let mut config = NodeConfig::for_test(ip(host));
        config.pod_name = name;
        config.grpc_addr = std::net::SocketAddr::new(ip(host).into(), port);
        let mut filter = hello_filter();
        filter.grpc_port = port;
        let node = NodeBuilder::new(config)
            .discovery(KubernetesDiscovery {
                filter,
                kubeconfig: Some(kubeconfig.clone()),
            })
            .start()
            .await
            .expect("node");
        node.wait_ready().await;
        nodes.push(node);
    }
    for node in &nodes {
        wait_for_peers(node, 2, Duration::from_secs(10)).await;
    }
    let client = |node: &NodeHandle| {
        podcache::client::RestClient::new(&node.http_addr().expect("http").to_string())
            .expect("client")
    };
    let decider_of = |node: &NodeHandle| {
        let client = client(node);
        async move { client.get("/v1/cluster").await.expect("cluster").json()["decider"].clone() }
    };
    let lease_holder = || {
        let state = api.state.lock().expect("lock");
        let lease = state.leases.values().next().cloned().unwrap_or(Value::Null);
        (
            lease["spec"]["holderIdentity"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
            lease["spec"]["leaseTransitions"].as_i64().unwrap_or(-1),
        )
    };
    wait_until(
        "every node names the Lease's holder",
        Duration::from_secs(15),
        || async {
            let (holder, _) = lease_holder();
            let mut all = true;
            for node in &nodes {
                let d = decider_of(node).await;
                let named = format!(
                    "{}_{}",
                    d["name"].as_str().unwrap_or("?"),
                    d["grpc_addr"].as_str().unwrap_or("?")
                );
                all &= d["rule"] == "kubernetes" && named == holder;
            }
            all
        },
    )
    .await;
    let (holder, transitions) = lease_holder();
    let leader = nodes
        .iter()
        .position(|n| holder.ends_with(&n.grpc_addr().to_string()))
        .expect("the holder is one of the nodes");
    let other = (leader + 1) % nodes.len();
    let created = client(&nodes[other])
        .request_with_headers(
            hyper::Method::PUT,
            "/v1/cache/7/limit",
            "1",
            &[("If-None-Match", "*")],
        )
        .await
        .expect("put");
    assert_eq!(created.status, hyper::StatusCode::OK, "{}", created.text());

    let leaving = nodes.remove(leader);
    leaving.shutdown().await;
    // As the kubelet does: the pod that stopped is gone from the API, so
    // the others stop waiting for its acknowledgements.
    api.delete(&format!("pod-{}", leader + 2), false);
    for node in &nodes {
        wait_for_peers(node, 1, Duration::from_secs(10)).await;
    }
    wait_until(
        "another replica took the Lease over",
        Duration::from_secs(15),
        || async {
            let (now, _) = lease_holder();
            !now.is_empty() && now != holder
        },
    )
    .await;
    let (_, after) = lease_holder();
    assert!(
        after > transitions,
        "a new holder counts a transition: {transitions} -> {after}"
    );
    let etag = created.etag.expect("etag");
    wait_until(
        "the new decider decides",
        Duration::from_secs(15),
        || async {
            let a = client(&nodes[0])
                .request_with_headers(
                    hyper::Method::PUT,
                    "/v1/cache/7/limit",
                    "2",
                    &[("If-Match", &etag)],
                )
                .await
                .expect("put");
            assert!(
                a.status == hyper::StatusCode::OK || a.json()["error"] == "no_decider",
                "{}",
                a.text()
            );
            a.status == hyper::StatusCode::OK
        },
    )
    .await;
    for node in nodes {
        node.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(dir);
}
