//! A pod simulator: writes, updates and deletes pod objects in etcd the way
//! kube-apiserver stores them (key `/registry/pods/{namespace}/{name}`,
//! protobuf behind the `k8s\0` magic in a `runtime.Unknown`, or JSON), so
//! the etcd discovery can be demonstrated and tested without a Kubernetes
//! API server.

use std::collections::BTreeMap;

use prost::Message;
use serde_json::json;

use podcache::client::{RestClient, percent_encode};
use podcache::discovery::etcd::pods_prefix;
use podcache::discovery::pod::{PROTOBUF_MAGIC, format_rfc3339};
use podcache::etcd::{EtcdClient, EtcdError};
use podcache::proto::k8s;

/// How a pod is stored: kube-apiserver's default (protobuf) or JSON
/// (`--storage-media-type=application/json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodEncoding {
    /// `k8s\0` + `runtime.Unknown` wrapping a `v1.Pod`.
    #[default]
    Protobuf,
    /// Plain pod JSON.
    Json,
}

/// A pod to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimPod {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `status.phase`.
    pub phase: String,
    /// `status.podIP`.
    pub pod_ip: Option<String>,
    /// `status.hostIP` and `spec.nodeName`.
    pub host_ip: Option<String>,
    /// `status.startTime`, Unix ms.
    pub start_time_ms: i64,
    /// The running container's `startedAt`, Unix ms; none while not running.
    pub container_started_ms: Option<i64>,
    /// Set `metadata.deletionTimestamp` (a pod being deleted).
    pub deleting: bool,
}

impl SimPod {
    /// A pod of app `app`, pending, without an IP yet.
    pub fn pending(name: &str, namespace: &str, app: &str, now_ms: i64) -> Self {
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            phase: "Pending".into(),
            pod_ip: None,
            host_ip: None,
            start_time_ms: now_ms,
            container_started_ms: None,
            deleting: false,
        }
    }

    /// The same pod, running at `pod_ip` since `started_ms`.
    pub fn running(mut self, pod_ip: &str, host_ip: &str, started_ms: i64) -> Self {
        self.phase = "Running".into();
        self.pod_ip = Some(pod_ip.to_owned());
        self.host_ip = Some(host_ip.to_owned());
        self.container_started_ms = Some(started_ms);
        self
    }

    /// The etcd key kube-apiserver stores this pod under.
    pub fn key(&self) -> String {
        format!("{}{}", pods_prefix(&self.namespace), self.name)
    }

    fn uid(&self) -> String {
        let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
        for b in format!("{}/{}", self.namespace, self.name).bytes() {
            h ^= u128::from(b);
            h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
        }
        let hex = format!("{h:032x}");
        format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        )
    }

    /// The stored bytes in `encoding`.
    pub fn encode(&self, encoding: PodEncoding) -> Vec<u8> {
        match encoding {
            PodEncoding::Json => self.to_json(),
            PodEncoding::Protobuf => self.to_protobuf(),
        }
    }

    /// Pod JSON as kube-apiserver stores it with the JSON media type.
    pub fn to_json(&self) -> Vec<u8> {
        let mut metadata = json!({
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid(),
            "creationTimestamp": format_rfc3339(self.start_time_ms),
            "labels": self.labels,
        });
        if self.deleting {
            metadata["deletionTimestamp"] = json!(format_rfc3339(self.start_time_ms));
        }
        let mut status = json!({
            "phase": self.phase,
            "startTime": format_rfc3339(self.start_time_ms),
        });
        if let Some(ip) = &self.host_ip {
            status["hostIP"] = json!(ip);
        }
        if let Some(ip) = &self.pod_ip {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{ "ip": ip }]);
        }
        if let Some(started) = self.container_started_ms {
            status["containerStatuses"] = json!([{
                "name": "app",
                "state": { "running": { "startedAt": format_rfc3339(started) } },
                "lastState": {},
                "ready": true,
                "restartCount": 0,
                "image": "podcache:latest",
                "imageID": "",
                "containerID": format!("sim://{}", self.uid()),
            }]);
        }
        let pod = json!({
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": metadata,
            "spec": {
                "containers": [{ "name": "app", "image": "podcache:latest" }],
                "nodeName": self.host_ip,
            },
            "status": status,
        });
        let mut bytes = pod.to_string().into_bytes();
        bytes.push(b'\n');
        bytes
    }

    /// `k8s\0` + `runtime.Unknown{typeMeta: v1/Pod, raw: <v1.Pod protobuf>}`.
    pub fn to_protobuf(&self) -> Vec<u8> {
        // Protobuf keeps sub-second precision (JSON storage truncates to
        // seconds, as metav1.Time's JSON form does).
        let time = |ms: i64| k8s::Time {
            seconds: Some(ms.div_euclid(1000)),
            nanos: Some((ms.rem_euclid(1000) * 1_000_000) as i32),
        };
        let pod = k8s::Pod {
            metadata: Some(k8s::ObjectMeta {
                name: Some(self.name.clone()),
                generate_name: None,
                namespace: Some(self.namespace.clone()),
                uid: Some(self.uid()),
                resource_version: None,
                creation_timestamp: Some(time(self.start_time_ms)),
                deletion_timestamp: self.deleting.then(|| time(self.start_time_ms)),
                labels: self.labels.clone().into_iter().collect(),
            }),
            spec: Some(k8s::PodSpec {
                node_name: self.host_ip.clone(),
            }),
            status: Some(k8s::PodStatus {
                phase: Some(self.phase.clone()),
                host_ip: self.host_ip.clone(),
                pod_ip: self.pod_ip.clone(),
                start_time: Some(time(self.start_time_ms)),
                container_statuses: self
                    .container_started_ms
                    .map(|started| k8s::ContainerStatus {
                        name: Some("app".into()),
                        state: Some(k8s::ContainerState {
                            running: Some(k8s::ContainerStateRunning {
                                started_at: Some(time(started)),
                            }),
                        }),
                        ready: Some(true),
                        restart_count: Some(0),
                    })
                    .into_iter()
                    .collect(),
            }),
        };
        let unknown = k8s::Unknown {
            type_meta: Some(k8s::TypeMeta {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
            }),
            raw: Some(pod.encode_to_vec()),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        let mut bytes = PROTOBUF_MAGIC.to_vec();
        bytes.extend(unknown.encode_to_vec());
        bytes
    }
}

/// Where the simulator writes: etcd's v3 API (what kube-apiserver uses
/// today) or the v2 keys API (what it used with the etcd2 backend; the two
/// key spaces are separate inside etcd).
#[derive(Debug, Clone)]
enum Backend {
    V3(EtcdClient),
    V2 {
        base: String,
        client: Box<RestClient>,
    },
}

/// Writes pods into etcd.
#[derive(Debug, Clone)]
pub struct PodSimulator {
    backend: Backend,
    encoding: PodEncoding,
}

impl PodSimulator {
    /// A simulator writing through the v3 `client` in `encoding`.
    pub fn new(client: EtcdClient, encoding: PodEncoding) -> Self {
        Self {
            backend: Backend::V3(client),
            encoding,
        }
    }

    /// A simulator writing JSON pods through the v2 keys API at `endpoint`.
    pub fn v2(endpoint: &str) -> Result<Self, EtcdError> {
        let client =
            RestClient::new(endpoint).map_err(|_| EtcdError::BadEndpoint(endpoint.to_owned()))?;
        Ok(Self {
            backend: Backend::V2 {
                base: endpoint.trim_end_matches('/').to_owned(),
                client: Box::new(client),
            },
            encoding: PodEncoding::Json,
        })
    }

    /// Creates or updates a pod; returns the etcd revision (v3) or index (v2).
    pub async fn put(&self, pod: &SimPod) -> Result<i64, EtcdError> {
        self.put_raw(&pod.key(), &pod.encode(self.encoding)).await
    }

    /// Stores any bytes under `key` (for values that are not pods at all).
    pub async fn put_raw(&self, key: &str, value: &[u8]) -> Result<i64, EtcdError> {
        match &self.backend {
            Backend::V3(client) => client.put(key.as_bytes(), value, 0).await,
            Backend::V2 { client, .. } => {
                let body = format!("value={}", percent_encode(&String::from_utf8_lossy(value)));
                let answer = client
                    .request_with_type(
                        hyper::Method::PUT,
                        &format!("/v2/keys{key}"),
                        body,
                        "application/x-www-form-urlencoded",
                    )
                    .await
                    .map_err(|e| EtcdError::Call(e.to_string()))?;
                if !answer.status.is_success() {
                    return Err(EtcdError::Call(answer.text()));
                }
                Ok(answer.json()["node"]["modifiedIndex"].as_i64().unwrap_or(0))
            }
        }
    }

    /// Deletes a pod; true when it existed.
    pub async fn delete(&self, namespace: &str, name: &str) -> Result<bool, EtcdError> {
        let key = format!("{}{name}", pods_prefix(namespace));
        match &self.backend {
            Backend::V3(client) => Ok(client.delete(key.as_bytes()).await? > 0),
            Backend::V2 { client, .. } => {
                let answer = client
                    .request(hyper::Method::DELETE, &format!("/v2/keys{key}"), Vec::new())
                    .await
                    .map_err(|e| EtcdError::Call(e.to_string()))?;
                Ok(answer.status.is_success())
            }
        }
    }

    /// The endpoint or client this simulator writes to, for messages.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::V3(_) => "etcd v3".into(),
            Backend::V2 { base, .. } => format!("etcd v2 at {base}"),
        }
    }
}
