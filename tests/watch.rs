//! Change streams that resume: every event of `/v1/watch` has an id,
//! `Last-Event-ID` resumes right after it on the same node, anything else
//! gets a reset and the whole state (never a silent gap), and
//! `?snapshot=true` is list-then-watch in one request.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::Cluster;
use http_body_util::BodyExt;
use hyper::StatusCode;
use serde_json::Value;

/// One server-sent event.
#[derive(Debug, Clone)]
struct Event {
    kind: String,
    id: Option<String>,
    data: Value,
}

struct Stream {
    body: hyper::body::Incoming,
    buffer: String,
}

type Raw = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

fn raw() -> Raw {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new())
}

async fn open(raw: &Raw, http: std::net::SocketAddr, query: &str, last: Option<&str>) -> Stream {
    let mut request = hyper::Request::get(format!("http://{http}/v1/watch/7{query}"));
    if let Some(id) = last {
        request = request.header("Last-Event-ID", id);
    }
    let response = raw
        .request(request.body(http_body_util::Empty::new()).expect("request"))
        .await
        .expect("watch");
    assert_eq!(response.status(), StatusCode::OK);
    Stream {
        body: response.into_body(),
        buffer: String::new(),
    }
}

impl Stream {
    /// The next event (keep-alive comments skipped), within `timeout`.
    async fn next(&mut self, timeout: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut kind, mut id, mut data) = (String::from("message"), None, None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = Some(serde_json::from_str(v.trim()).expect("event JSON"));
                    }
                }
                if let Some(data) = data {
                    return Event { kind, id, data };
                }
                continue;
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .expect("an event before the deadline")
                .expect("stream open")
                .expect("frame");
            if let Some(bytes) = frame.data_ref() {
                self.buffer.push_str(&String::from_utf8_lossy(bytes));
            }
        }
    }

    async fn next_n(&mut self, n: usize) -> Vec<Event> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.next(Duration::from_secs(10)).await);
        }
        out
    }
}

fn values(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| e.data["value"].as_str().unwrap_or("-").to_owned())
        .collect()
}

#[tokio::test]
async fn last_event_id_resumes_right_after_the_last_event_seen() {
    let cluster = Cluster::start(2).await;
    let raw = raw();
    let http = cluster.slots[1].http;
    let mut first = open(&raw, http, "", None).await;
    for i in 0..5 {
        cluster
            .client(0)
            .put(7, "k", &i.to_string(), "")
            .await
            .expect("put");
    }
    let seen = first.next_n(3).await;
    assert_eq!(values(&seen), ["0", "1", "2"]);
    assert!(
        seen.iter().all(|e| e.kind == "change" && e.id.is_some()),
        "{seen:?}"
    );
    drop(first);
    for i in 5..8 {
        cluster
            .client(1)
            .put(7, "k", &i.to_string(), "")
            .await
            .expect("put");
    }
    let last = seen[2].id.clone();
    let mut resumed = open(&raw, http, "", last.as_deref()).await;
    let rest = resumed.next_n(5).await;
    assert_eq!(values(&rest), ["3", "4", "5", "6", "7"], "{rest:?}");
    assert!(rest.iter().all(|e| e.kind == "change"));
    // Then the marker that the replay is complete.
    let live = resumed.next(Duration::from_secs(10)).await;
    assert_eq!(live.kind, "live");
    assert_eq!(live.id, rest[4].id);
    // The query form works too, for clients that cannot set headers.
    let mut again = open(
        &raw,
        http,
        &format!("?last_event_id={}", rest[3].id.as_deref().expect("id")),
        None,
    )
    .await;
    assert_eq!(values(&again.next_n(1).await), ["7"]);
    assert_eq!(again.next(Duration::from_secs(10)).await.kind, "live");
    cluster.shutdown().await;
}

#[tokio::test]
async fn an_unknown_or_too_old_id_gets_a_reset_then_the_whole_state_then_live_changes() {
    let cluster = Cluster::start_with(1, |c| c.watch_replay_events = 3).await;
    let raw = raw();
    let http = cluster.slots[0].http;
    let mut watching = open(&raw, http, "", None).await;
    let client = cluster.client(0);
    client.put(7, "a", "1", "").await.expect("put");
    let first = watching.next(Duration::from_secs(10)).await;
    for i in 0..6 {
        client.put(7, &format!("b{i}"), "x", "").await.expect("put");
    }
    client.delete(7, "b0", "").await.expect("delete");
    let mut expected = vec!["a", "b1", "b2", "b3", "b4", "b5"];
    for (round, id) in [
        first.id.clone().expect("id"),
        "0123456789abcdef-1".to_owned(),
    ]
    .into_iter()
    .enumerate()
    {
        let mut stream = open(&raw, http, "", Some(&id)).await;
        let reset = stream.next(Duration::from_secs(10)).await;
        assert_eq!(reset.kind, "reset", "{reset:?}");
        // The namespace as it is (b0 deleted; "after" from round 0).
        if round == 1 {
            expected.insert(1, "after");
        }
        let state = stream.next_n(expected.len()).await;
        let keys: Vec<&str> = state
            .iter()
            .filter_map(|e| e.data["key"].as_str())
            .collect();
        assert_eq!(keys, expected);
        // Every event has an id; a snapshot's resume with a reset.
        assert!(
            std::iter::once(&reset)
                .chain(&state)
                .all(|e| e.id.as_deref().is_some_and(|id| id.ends_with("-snapshot"))),
            "{reset:?} {state:?}"
        );
        let mut again = open(&raw, http, "", state[0].id.as_deref()).await;
        assert_eq!(again.next(Duration::from_secs(10)).await.kind, "reset");
        let live = stream.next(Duration::from_secs(10)).await;
        assert_eq!(live.kind, "live");
        assert!(live.id.is_some());
        client
            .put(7, "after", &round.to_string(), "")
            .await
            .expect("put");
        let next = stream.next(Duration::from_secs(10)).await;
        assert_eq!(
            (next.kind.as_str(), next.data["key"].as_str()),
            ("change", Some("after"))
        );
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn snapshot_true_mirrors_a_namespace_without_a_gap_while_it_is_written() {
    let cluster = Cluster::start(2).await;
    let raw = raw();
    for i in 0..100 {
        cluster
            .client(0)
            .put(7, &format!("k{i}"), "0", "")
            .await
            .expect("put");
    }
    // Writes go on while the mirror starts.
    let writer = {
        let client = cluster.client(0);
        tokio::spawn(async move {
            for round in 1..=3 {
                for i in 0..100 {
                    let key = format!("k{i}");
                    if i % 10 == round {
                        client.delete(7, &key, "").await.expect("delete");
                    } else {
                        client
                            .put(7, &key, &round.to_string(), "")
                            .await
                            .expect("put");
                    }
                }
            }
        })
    };
    let mut stream = open(&raw, cluster.slots[1].http, "?snapshot=true", None).await;
    let mut mirror: BTreeMap<String, String> = BTreeMap::new();
    let mut live = false;
    let done_writing = async {
        writer.await.expect("writer");
    };
    tokio::pin!(done_writing);
    let mut finished = false;
    loop {
        tokio::select! {
            _ = &mut done_writing, if !finished => finished = true,
            event = stream.next(Duration::from_secs(10)) => {
                match event.kind.as_str() {
                    "live" => live = true,
                    "change" => {
                        let key = event.data["key"].as_str().expect("key").to_owned();
                        if event.data["deleted"] == true {
                            mirror.remove(&key);
                        } else {
                            mirror.insert(key, event.data["value"].as_str().expect("value").to_owned());
                        }
                    }
                    other => panic!("unexpected {other} event"),
                }
            }
        }
        if finished && live {
            let wanted: BTreeMap<String, String> = cluster
                .client(1)
                .get("/v1/cache/7")
                .await
                .expect("list")
                .json()["entries"]
                .as_object()
                .expect("entries")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            if mirror == wanted && wanted.values().all(|v| v == "3") {
                break;
            }
        }
    }
    assert_eq!(mirror.len(), 90);
    cluster.shutdown().await;
}

/// A rollout is one change everywhere: 1,000 batches of 50 keys (all set
/// to the batch's number, one of them deleted every tenth batch) written
/// on one replica reach a watcher of another as `batch` events, each
/// holding the whole batch, never one event per key; a reader applying
/// them never holds part of one. Replication requests are capped at 2 KiB
/// here, so every batch (about 5 KiB) crosses in several requests.
#[tokio::test]
async fn a_watcher_never_sees_part_of_a_batch_written_on_another_replica() {
    const KEYS: usize = 50;
    const BATCHES: usize = 1000;
    let cluster = Cluster::start_with(2, |c| c.max_batch_bytes = 2048).await;
    let raw = raw();
    let mut stream = open(&raw, cluster.slots[1].http, "", None).await;
    let writer = cluster.client(0).with_reason("rollout").expect("reason");
    let pad = "p".repeat(60);
    let reader = tokio::spawn(async move {
        let mut mirror: BTreeMap<String, String> = BTreeMap::new();
        let mut events = 0;
        loop {
            let event = stream.next(Duration::from_secs(30)).await;
            assert_eq!(event.kind, "batch", "one event per batch: {event:?}");
            assert_eq!(event.data["reason"], "rollout");
            let entries = event.data["entries"].as_array().expect("entries").clone();
            assert_eq!(entries.len(), KEYS, "the whole batch: {event:?}");
            let version = &event.data["version"];
            for e in &entries {
                assert_eq!(&e["version"], version, "one version per batch");
                let key = e["key"].as_str().expect("key").to_owned();
                match e["value"].as_str() {
                    Some(v) => mirror.insert(key, v.to_owned()),
                    None => mirror.remove(&key),
                };
            }
            events += 1;
            let values: std::collections::BTreeSet<&String> = mirror.values().collect();
            assert_eq!(values.len(), 1, "part of a batch: {values:?}");
            if values
                .iter()
                .any(|v| v.starts_with(&format!("{}-", BATCHES - 1)))
            {
                return events;
            }
        }
    });
    for n in 0..BATCHES {
        let body: serde_json::Map<String, Value> = (0..KEYS)
            .map(|k| {
                let value = if n % 10 == 0 && k == n % KEYS {
                    Value::Null
                } else {
                    Value::String(format!("{n}-{pad}"))
                };
                (format!("k{k}"), value)
            })
            .collect();
        let answer = writer
            .request(
                hyper::Method::POST,
                "/v1/cache/7",
                Value::Object(body).to_string(),
            )
            .await
            .expect("batch");
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        let versions = answer.json()["versions"]
            .as_object()
            .expect("versions")
            .clone();
        let first = versions.values().next().expect("a version").clone();
        assert!(versions.values().all(|v| *v == first), "one version");
    }
    let events = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the watcher reached the last batch")
        .expect("the watcher saw only whole batches");
    assert!(events >= 1);
    eprintln!(
        "{events} batch events for {BATCHES} batches (later ones merge earlier ones in flight)"
    );
    cluster.shutdown().await;
}
