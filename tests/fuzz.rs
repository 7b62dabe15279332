//! Fuzzing, with proptest, of every decoder that sees outside bytes. (cargo
//! fuzz needs a nightly toolchain these machines do not have; proptest runs
//! on stable, shrinks what it finds, and stores each failing input under
//! `tests/fuzz.proptest-regressions`, which is committed: a crash found
//! once is replayed first on every later run.)
//!
//! Targets, each bounded by `PODCACHE_FUZZ_CASES` cases (default 300, a few
//! seconds each in CI):
//! - raw HTTP requests (method, path, query, body as bytes) against a real
//!   node over a real socket;
//! - the batch JSON body, checked against an oracle of what is valid;
//! - gRPC messages decoded from arbitrary bytes and sent into a node, and
//!   arbitrary entries merged into its store, after which the digest it
//!   serves must match one computed from scratch from its snapshot;
//! - pod values as etcd holds them (JSON, `k8s\0` protobuf, encrypted
//!   prefix, and mutations of a real pod in both encodings), etcd-lease
//!   registrations, label selectors, RFC 3339 times and token files.

mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use common::Cluster;
use podcache::NodeHandle;
use podcache::discovery::etcd_lease::Member;
use podcache::discovery::pod::{decode_pod, parse_rfc3339_ms, parse_selector};
use podcache::proto::hellorpc::{SyncRequest, sync_client::SyncClient};
use podcache::proto::podcache::replica_client::ReplicaClient;
use podcache::proto::podcache::{
    DigestRequest, Entry, NodeInfo, RepairRequest, ReplicateRequest, SnapshotRequest,
};
use podcache::store::{Limits, Store};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
use prost::Message;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn cases() -> u32 {
    std::env::var("PODCACHE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn config() -> Config {
    Config {
        cases: cases(),
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        ..Config::default()
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// Small limits, so that generated inputs cross them often.
fn small_limits(c: &mut podcache::NodeConfig) {
    c.limits.max_key_bytes = 64;
    c.limits.max_value_bytes = 256;
    c.limits.max_batch_entries = 4;
    c.limits.max_entries_per_type = 50;
    c.max_body_bytes = 2048;
}

// ---- raw HTTP ---------------------------------------------------------------

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        "-?[0-9]{1,11}",
        "[a-zA-Z0-9._~-]{0,12}",
        "(%[0-9A-Fa-f]{2}|%[G-Zg-z]{2}|%|[a-z/.]){0,12}",
        Just("..".to_string()),
        Just("2147483648".to_string()),
        "[!-~]{0,40}",
    ]
}

fn raw_request() -> impl Strategy<Value = (String, String, Vec<u8>)> {
    let method = prop::sample::select(vec![
        "GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS", "BREW",
    ]);
    let path = prop_oneof![
        (segment(), segment()).prop_map(|(t, k)| format!("/v1/cache/{t}/{k}")),
        segment().prop_map(|t| format!("/v1/cache/{t}")),
        (segment(), segment()).prop_map(|(a, b)| format!("/{a}/{b}")),
        "[!-~]{0,60}",
    ];
    let query = prop_oneof![
        Just(String::new()),
        Just("?wait=all".to_string()),
        "\\?ttl=-?[0-9]{0,22}",
        "\\?wait=[a-z]{0,6}&ttl=[0-9a-z]{0,4}",
        "\\?[!-~]{0,30}",
    ];
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        "[ -~]{0,300}".prop_map(String::into_bytes),
        Just(br#"{"a":"b","c":"d"}"#.to_vec()),
        Just(vec![b'x'; 3000]),
    ];
    (method, (path, query), body).prop_map(|(m, (p, q), b)| (m.to_string(), format!("{p}{q}"), b))
}

/// Sends bytes as they are; returns the status and body (`None` when no
/// status line came back within the deadline).
async fn raw_http(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut socket = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut request = head.as_bytes().to_vec();
    request.extend_from_slice(body);
    socket.write_all(&request).await.ok()?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer)).await;
    if read.is_err() {
        return None;
    }
    let text = String::from_utf8_lossy(&answer);
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let body_start = answer.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    Some((status, answer[body_start..].to_vec()))
}

#[test]
fn fuzz_raw_http_requests() {
    let rt = runtime();
    let cluster = rt.block_on(Cluster::start_with(1, small_limits));
    let addr = cluster.slots[0].http;
    let node: &NodeHandle = cluster.node(0);
    let mut runner = TestRunner::new(config());
    let result = runner.run(&raw_request(), |(method, target, body)| {
        let head = format!(
            "{method} {target} HTTP/1.1\r\nHost: fuzz\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let before = node.snapshot();
        let answer = rt.block_on(raw_http(addr, &head, &body));
        let Some((status, reply)) = answer else {
            return Err(TestCaseError::fail(format!("no answer to {head:?}")));
        };
        prop_assert!(
            status < 500 || status == 503 || status == 507,
            "{status} for {head:?}: {}",
            String::from_utf8_lossy(&reply)
        );
        if status >= 400 {
            prop_assert_eq!(&before, &node.snapshot(), "a refused request changed the state");
            if !reply.is_empty() && target.starts_with("/v1/") {
                let json: Value = serde_json::from_slice(&reply)
                    .map_err(|e| TestCaseError::fail(format!("{status} body not JSON: {e}")))?;
                prop_assert!(json["error"].is_string() && json["message"].is_string());
            }
        }
        Ok(())
    });
    // The node is still healthy after all of it.
    let healthy = rt.block_on(raw_http(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"",
    ));
    rt.block_on(cluster.shutdown());
    if let Err(err) = result {
        panic!("{err}");
    }
    assert_eq!(healthy.map(|(s, _)| s), Some(200));
}

// ---- the batch JSON, against an oracle ---------------------------------------

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        "[a-z]{0,8}".prop_map(Value::String),
        "\\PC{0,8}".prop_map(Value::String),
        Just(Value::String("v".repeat(300))),
        any::<i64>().prop_map(Value::from),
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{0,3}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn batch_body() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        "[a-z]{1,6}",
        Just(String::new()),
        Just("k".repeat(65)),
        "\\PC{1,4}",
    ];
    // Mostly near-valid maps (string values, sizes around the limit), so
    // both sides of every limit are hit often.
    let near_valid = prop::collection::btree_map(
        "[a-z]{1,6}",
        prop_oneof![
            8 => "[a-z]{0,8}".prop_map(Value::String),
            1 => Just(Value::String("v".repeat(256))),
            1 => Just(Value::String("v".repeat(257))),
            1 => json_value(),
        ],
        0..7,
    );
    prop_oneof![
        4 => near_valid.prop_map(|m| Value::Object(m.into_iter().collect())),
        3 => prop::collection::btree_map(key, json_value(), 0..6)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        1 => json_value(),
    ]
}

/// What the node must do with a batch body: store it all, or refuse it all.
fn batch_is_valid(body: &Value) -> bool {
    let Some(map) = body.as_object() else {
        return false;
    };
    (1..=4).contains(&map.len())
        && map.iter().all(|(k, v)| {
            // A null deletes (a tombstone: nothing to read back).
            !k.is_empty()
                && k.len() <= 64
                && (v.is_null() || v.as_str().is_some_and(|s| s.len() <= 256))
        })
}

#[test]
fn fuzz_batch_json_against_an_oracle() {
    let rt = runtime();
    let cluster = rt.block_on(Cluster::start_with(1, small_limits));
    let client = cluster.client(0);
    let node = cluster.node(0);
    let mut runner = TestRunner::new(config());
    let next_type = std::sync::atomic::AtomicI32::new(0);
    let result = runner.run(&batch_body(), |body| {
        // An object value is an entry with an expectation only when it
        // holds "value" (then decided by the decider, and answered 412 as
        // often as 200): this oracle leaves those to tests/conditional.rs.
        prop_assume!(
            !body
                .as_object()
                .into_iter()
                .flatten()
                .any(|(_, v)| v.get("value").is_some())
        );
        let ty = next_type.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let text = body.to_string();
        let answer = rt
            .block_on(client.request_with_type(
                hyper::Method::POST,
                &format!("/v1/cache/{ty}"),
                text.clone(),
                "application/json",
            ))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let stored: BTreeMap<String, String> = node.snapshot().remove(&ty).unwrap_or_default();
        if batch_is_valid(&body) {
            prop_assert_eq!(answer.status.as_u16(), 200, "{} -> {}", text, answer.text());
            let expected: BTreeMap<String, String> = body
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect();
            prop_assert_eq!(stored, expected);
        } else {
            prop_assert!(
                matches!(answer.status.as_u16(), 400 | 413 | 415),
                "{} -> {} {}",
                text,
                answer.status,
                answer.text()
            );
            prop_assert!(stored.is_empty(), "a refused batch stored {stored:?}");
        }
        Ok(())
    });
    rt.block_on(cluster.shutdown());
    if let Err(err) = result {
        panic!("{err}");
    }
}

// ---- gRPC messages into the store --------------------------------------------

fn sender() -> NodeInfo {
    NodeInfo {
        node_id: 99,
        name: "fuzzer".into(),
        grpc_addr: "127.0.0.1:1".into(),
        started_at_ms: 1,
        pod_ip: "127.0.0.1".into(),
        host_ip: String::new(),
    }
}

fn entry() -> impl Strategy<Value = Entry> {
    let now = podcache::node::unix_ms();
    let hlc = prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        (0..120_000u64).prop_map(move |d| (now - 60_000 + d) << 16),
        any::<u64>(),
    ];
    let expires = prop_oneof![Just(0u64), Just(1u64), any::<u64>(), Just(now + 60_000)];
    (
        prop_oneof![Just(1i32), Just(i32::MIN), Just(i32::MAX), any::<i32>()],
        prop_oneof![
            "[a-c]{1,2}",
            Just(String::new()),
            Just("k".repeat(65)),
            "\\PC{1,3}"
        ],
        prop_oneof!["[a-z]{0,5}", Just("v".repeat(257))],
        any::<bool>(),
        hlc,
        any::<u64>(),
        expires,
    )
        .prop_map(
            |(ty, key, value, deleted, hlc, node, expires_at_ms)| Entry {
                r#type: ty,
                key,
                value,
                deleted,
                hlc,
                node,
                expires_at_ms,
                // Sometimes an author past the 256-byte limit.
                author: if node % 7 == 0 {
                    "a".repeat(300)
                } else {
                    "ops".into()
                },
                batch: node % 3 == 0,
                ..Default::default()
            },
        )
}

/// Either bytes that may decode as a request, or a well-formed request of
/// random entries.
fn grpc_input() -> impl Strategy<Value = (Vec<u8>, Vec<Entry>, Vec<u32>)> {
    (
        prop::collection::vec(any::<u8>(), 0..200),
        prop::collection::vec(entry(), 0..12),
        prop::collection::vec(prop_oneof![0..1024u32, any::<u32>()], 0..20),
    )
}

/// The digest a node serves must equal one computed from scratch from
/// everything it holds.
async fn digest_is_consistent(addr: &str) -> Result<(), String> {
    let mut client = ReplicaClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| e.to_string())?;
    let mut stream = client
        .snapshot(SnapshotRequest {
            sender: Some(sender()),
            max_chunk_bytes: 0,
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let scratch = Store::new(1, Limits::default());
    while let Some(chunk) = stream.message().await.map_err(|e| e.to_string())? {
        let records = chunk
            .entries
            .into_iter()
            .map(podcache::proto::record_from_wire);
        scratch.merge(records, podcache::node::unix_ms());
    }
    let served = client
        .digest(DigestRequest {
            sender: Some(sender()),
            root: 0,
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    if served.equal || served.buckets != scratch.digest() {
        return Err("served digest differs from the snapshot's".into());
    }
    Ok(())
}

#[test]
fn fuzz_grpc_messages_into_the_store() {
    let rt = runtime();
    let cluster = rt.block_on(Cluster::start_with(1, small_limits));
    let addr = cluster.grpc_addr(0);
    let url = format!("http://{addr}");
    let mut runner = TestRunner::new(config());
    let result = runner.run(&grpc_input(), |(bytes, entries, buckets)| {
        rt.block_on(async {
            let mut replica = ReplicaClient::connect(url.clone())
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut sync = SyncClient::connect(url.clone())
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            // Arbitrary bytes: whatever decodes is sent as it decoded.
            if let Ok(request) = ReplicateRequest::decode(bytes.as_slice()) {
                let _ = replica.replicate(request).await;
            }
            if let Ok(request) = SyncRequest::decode(bytes.as_slice()) {
                let _ = sync.set(request.clone()).await;
                let _ = sync.get(request).await;
            }
            if let Ok(request) = RepairRequest::decode(bytes.as_slice()) {
                let _ = replica.repair(request).await;
            }
            if let Ok(request) = DigestRequest::decode(bytes.as_slice()) {
                let _ = replica.digest(request).await;
            }
            // Well-formed requests with hostile contents.
            let count = entries.len() as u32;
            let answer = replica
                .replicate(ReplicateRequest {
                    sender: Some(sender()),
                    entries: entries.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?
                .into_inner();
            prop_assert_eq!(answer.applied + answer.stale + answer.rejected, count);
            let _ = replica
                .repair(RepairRequest {
                    sender: Some(sender()),
                    buckets,
                    entries,
                })
                .await;
            digest_is_consistent(&addr)
                .await
                .map_err(TestCaseError::fail)?;
            Ok(())
        })
    });
    let alive = rt.block_on(digest_is_consistent(&addr));
    rt.block_on(cluster.shutdown());
    if let Err(err) = result {
        panic!("{err}");
    }
    assert_eq!(alive, Ok(()));
}

// ---- values from etcd and files ------------------------------------------------

const ARTICLE_POD: &[u8] = include_bytes!("fixtures/article_pod.json");

fn article_pod_protobuf() -> Vec<u8> {
    use common::k8s_sim::{PodEncoding, SimPod};
    let pod = SimPod::pending("hello-web-x", "default", "hello", 1_700_000_000_000).running(
        "172.17.0.5",
        "10.0.0.1",
        1_700_000_001_000,
    );
    pod.encode(PodEncoding::Protobuf)
}

/// A valid value with bytes flipped, cut, or spliced.
fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = base.len();
    (
        prop::collection::vec((0..len, any::<u8>()), 0..6),
        0..=len,
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(move |(flips, cut, tail)| {
            let mut value = base.clone();
            for (at, byte) in flips {
                value[at] = byte;
            }
            value.truncate(cut);
            value.extend(tail);
            value
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_pod_values(value in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..400),
        prop::collection::vec(any::<u8>(), 0..400).prop_map(|v| [b"k8s\0".to_vec(), v].concat()),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(|v| [b"k8s:enc:".to_vec(), v].concat()),
        mutated(ARTICLE_POD.to_vec()),
        mutated(article_pod_protobuf()),
    ]) {
        if let Ok(pod) = decode_pod(&value) {
            // Whatever decodes is plausible: times are in range or absent.
            prop_assert!(pod.started_at_ms.is_none_or(|t| t > -62_135_596_800_000));
        }
    }

    #[test]
    fn fuzz_lease_registrations(value in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        mutated(br#"{"name":"a","grpc_addr":"10.0.0.1:9090","started_at_ms":5}"#.to_vec()),
    ]) {
        if let Ok(member) = Member::decode(&value) {
            prop_assert!(member.grpc_addr.parse::<std::net::SocketAddr>().is_ok());
            prop_assert!(!member.name.is_empty());
        }
    }

    #[test]
    fn fuzz_selectors_times_and_token_files(text in "\\PC{0,60}") {
        if let Ok(terms) = parse_selector(&text) {
            let again = podcache::discovery::pod::selector_string(&terms);
            prop_assert_eq!(parse_selector(&again).ok(), Some(terms));
        }
        let _ = parse_rfc3339_ms(&text);
        let _ = podcache::api::auth::Tokens::parse(&text);
    }
}
