//! podcache reads only a subset of Kubernetes' Pod protobuf
//! (`proto/k8s/pod.proto`). This checks that subset against the complete
//! types of the `k8s-pb` crate: the article's pod, encoded in full the way
//! kube-apiserver stores it (`k8s\0` + `runtime.Unknown`), decodes to the
//! same record as its JSON form, and podcache's own simulated pods decode
//! with the full types.

mod common;

use common::k8s_sim::SimPod;
use k8s_pb::api::core::v1 as core;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime;
use podcache::discovery::pod::{decode_pod, parse_rfc3339_ms};
use prost::Message;

const ARTICLE_POD: &str = include_str!("fixtures/article_pod.json");

fn time(text: &str) -> meta::Time {
    let ms = parse_rfc3339_ms(text).expect("timestamp");
    meta::Time {
        seconds: Some(ms / 1000),
        nanos: Some(0),
    }
}

/// The article's pod with every field it has, in the complete k8s types.
fn article_pod_in_full() -> core::Pod {
    let s = |v: &str| Some(v.to_owned());
    core::Pod {
        metadata: Some(meta::ObjectMeta {
            name: s("hello-web-29a74e26ea3c2138e1727f35a111f4c6-dknwh"),
            generate_name: s("hello-web-29a74e26ea3c2138e1727f35a111f4c6-"),
            namespace: s("default"),
            self_link: s(
                "/api/v1/namespaces/default/pods/hello-web-29a74e26ea3c2138e1727f35a111f4c6-dknwh",
            ),
            uid: s("09c45029-3fa0-11e7-a46c-00163e327954"),
            creation_timestamp: Some(time("2017-05-23T10:10:24Z")),
            labels: [
                ("app".to_string(), "hello".to_string()),
                (
                    "deployment".to_string(),
                    "bb6de7bfc7f357818a8c07faf3987d40".to_string(),
                ),
                ("tier".to_string(), "frontend".to_string()),
            ]
            .into(),
            annotations: [(
                "kubernetes.io/created-by".to_string(),
                "{\"kind\":\"SerializedReference\"}".to_string(),
            )]
            .into(),
            owner_references: vec![meta::OwnerReference {
                api_version: s("v1"),
                kind: s("ReplicationController"),
                name: s("hello-web"),
                uid: s("32559b88-3fa0-11e7-a46c-00163e327954"),
                controller: Some(true),
                ..Default::default()
            }],
            ..Default::default()
        }),
        spec: Some(core::PodSpec {
            containers: vec![core::Container {
                name: s("hello-web"),
                image: s("docker.helloword.com/hello-web:f022d25"),
                ports: vec![core::ContainerPort {
                    container_port: Some(8087),
                    protocol: s("TCP"),
                    ..Default::default()
                }],
                termination_message_path: s("/dev/termination-log"),
                image_pull_policy: s("IfNotPresent"),
                ..Default::default()
            }],
            restart_policy: s("Always"),
            termination_grace_period_seconds: Some(30),
            dns_policy: s("ClusterFirst"),
            node_name: s("10.30.58.179"),
            security_context: Some(Default::default()),
            image_pull_secrets: vec![core::LocalObjectReference {
                name: s("cn-registry"),
            }],
            ..Default::default()
        }),
        status: Some(core::PodStatus {
            phase: s("Running"),
            conditions: vec![core::PodCondition {
                r#type: s("Ready"),
                status: s("True"),
                last_transition_time: Some(time("2017-05-23T10:10:29Z")),
                ..Default::default()
            }],
            host_ip: s("10.30.58.179"),
            pod_ip: s("172.80.13.4"),
            start_time: Some(time("2017-05-23T10:10:24Z")),
            container_statuses: vec![core::ContainerStatus {
                name: s("hello-web"),
                state: Some(core::ContainerState {
                    running: Some(core::ContainerStateRunning {
                        started_at: Some(time("2017-05-23T10:10:29Z")),
                    }),
                    ..Default::default()
                }),
                last_state: Some(Default::default()),
                ready: Some(true),
                restart_count: Some(0),
                image: s("docker.helloword.com/hello-web:f022d25"),
                image_id: s(
                    "docker-pullable://docker.helloword.com/hello-web@sha256:f8e0460983b0d3f87733453b588469d8e225afbfc764da2ae55238cd524ef70a",
                ),
                container_id: s(
                    "docker://78cd912de942f744a36bd51907562c5e670fb300ddc85267e3ec72572fdb5617",
                ),
                ..Default::default()
            }],
            ..Default::default()
        }),
    }
}

fn stored(pod: &core::Pod) -> Vec<u8> {
    let unknown = runtime::Unknown {
        type_meta: Some(runtime::TypeMeta {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
        }),
        raw: Some(pod.encode_to_vec()),
        content_encoding: Some(String::new()),
        content_type: Some(String::new()),
    };
    let mut bytes = b"k8s\0".to_vec();
    bytes.extend(unknown.encode_to_vec());
    bytes
}

#[test]
fn a_full_protobuf_pod_decodes_like_its_json() {
    let from_protobuf = decode_pod(&stored(&article_pod_in_full())).expect("protobuf decodes");
    let from_json = decode_pod(ARTICLE_POD.as_bytes()).expect("json decodes");
    assert_eq!(from_protobuf, from_json);
    assert_eq!(from_protobuf.pod_ip.as_deref(), Some("172.80.13.4"));
}

#[test]
fn simulated_pods_decode_with_the_complete_types() {
    let sim = SimPod::pending("web-1", "default", "hello", 1_700_000_000_000).running(
        "10.0.0.7",
        "192.168.1.2",
        1_700_000_005_250,
    );
    let bytes = sim.to_protobuf();
    let unknown = runtime::Unknown::decode(&bytes[4..]).expect("runtime.Unknown");
    assert_eq!(
        unknown.type_meta.and_then(|t| t.kind).as_deref(),
        Some("Pod")
    );
    let pod = core::Pod::decode(unknown.raw.unwrap_or_default().as_slice()).expect("v1.Pod");
    let meta = pod.metadata.expect("metadata");
    assert_eq!(meta.name.as_deref(), Some("web-1"));
    assert_eq!(meta.labels.get("app").map(String::as_str), Some("hello"));
    let status = pod.status.expect("status");
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.7"));
    let started = status.container_statuses[0]
        .state
        .as_ref()
        .and_then(|s| s.running.as_ref())
        .and_then(|r| r.started_at.as_ref())
        .expect("startedAt");
    assert_eq!(
        (started.seconds, started.nanos),
        (Some(1_700_000_005), Some(250_000_000))
    );
}

/// The simulator writes pods both ways kube-apiserver stores them, and both
/// decode to the same record.
#[test]
fn both_encodings_decode_to_the_same_record() {
    let pod = SimPod::pending("web-1", "default", "hello", 1_700_000_000_000).running(
        "10.0.0.7",
        "192.168.1.2",
        1_700_000_005_000,
    );
    let from_json = decode_pod(&pod.to_json()).expect("json");
    let from_pb = decode_pod(&pod.to_protobuf()).expect("protobuf");
    assert_eq!(from_json, from_pb);
    assert_eq!(from_json.started_at_ms, Some(1_700_000_005_000));
    let precise = pod
        .clone()
        .running("10.0.0.7", "192.168.1.2", 1_700_000_005_123);
    assert_eq!(
        decode_pod(&precise.to_protobuf())
            .expect("pb")
            .started_at_ms,
        Some(1_700_000_005_123)
    );
    assert_eq!(
        decode_pod(&precise.to_json()).expect("json").started_at_ms,
        Some(1_700_000_005_000)
    );
    assert_eq!(from_json.pod_ip.as_deref(), Some("10.0.0.7"));
    assert_eq!(
        from_json.labels.get("app").map(String::as_str),
        Some("hello")
    );
    assert!(pod.to_protobuf().starts_with(b"k8s\0"));
    assert_eq!(pod.key(), "/registry/pods/default/web-1");
}
