//! Kubernetes pod records as kube-apiserver stores them in etcd, and the
//! rule for which pods are peers (CONTRACT §4).
//!
//! Owns: decoding a stored value (plain JSON; `k8s\0` + `runtime.Unknown`
//! wrapping a protobuf `v1.Pod`; recognising `k8s:enc:` encryption), RFC 3339
//! timestamps, label selectors, and [`PodFilter::peer`]. Pure functions, no
//! I/O: the etcd backends feed them bytes.

use std::collections::BTreeMap;

use prost::Message;
use serde::Deserialize;

use super::Peer;
use crate::proto::k8s;

/// The 4 bytes kube-apiserver puts before a protobuf object.
pub const PROTOBUF_MAGIC: &[u8] = b"k8s\0";
/// The prefix of a value encrypted at rest.
pub const ENCRYPTED_PREFIX: &[u8] = b"k8s:enc:";

/// What podcache needs of one pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodRecord {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// True when `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// `status.phase` (`Pending`, `Running`, `Succeeded`, ...).
    pub phase: String,
    /// `status.podIP`.
    pub pod_ip: Option<String>,
    /// `status.hostIP`.
    pub host_ip: Option<String>,
    /// When the pod's containers started: the latest `startedAt` of a
    /// running container (a restarted container restarts its state too),
    /// else `status.startTime`; Unix milliseconds.
    pub started_at_ms: Option<i64>,
}

/// Why a stored value is not a usable pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Encrypted at rest by kube-apiserver; podcache has no key.
    #[error("value is encrypted at rest (provider {provider})")]
    Encrypted {
        /// Provider and key name, e.g. `aescbc:v1:key1`.
        provider: String,
    },
    /// `k8s\0` framing whose protobuf does not decode.
    #[error("protobuf value does not decode: {0}")]
    Protobuf(String),
    /// The protobuf envelope holds another kind than Pod.
    #[error("value holds a {0}, not a Pod")]
    NotAPod(String),
    /// A JSON value that is not a pod object.
    #[error("JSON value is not a pod: {0}")]
    Json(String),
    /// Neither JSON, protobuf nor an encrypted value.
    #[error("value is neither JSON nor Kubernetes protobuf")]
    Unrecognized,
}

/// Decodes a value stored under `/registry/pods/...`.
pub fn decode_pod(value: &[u8]) -> Result<PodRecord, DecodeError> {
    if let Some(rest) = value.strip_prefix(ENCRYPTED_PREFIX) {
        // k8s:enc:<provider>:v1:<key name>:<data>
        let provider = rest
            .split(|b| *b == b':')
            .take(3)
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect::<Vec<_>>()
            .join(":");
        return Err(DecodeError::Encrypted { provider });
    }
    if let Some(rest) = value.strip_prefix(PROTOBUF_MAGIC) {
        return decode_protobuf(rest);
    }
    let first = value.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{') {
        return decode_json(value);
    }
    Err(DecodeError::Unrecognized)
}

fn decode_protobuf(bytes: &[u8]) -> Result<PodRecord, DecodeError> {
    let unknown = k8s::Unknown::decode(bytes).map_err(|e| DecodeError::Protobuf(e.to_string()))?;
    let kind = unknown
        .type_meta
        .as_ref()
        .and_then(|t| t.kind.clone())
        .unwrap_or_default();
    if kind != "Pod" {
        return Err(DecodeError::NotAPod(if kind.is_empty() {
            "object without a kind".into()
        } else {
            kind
        }));
    }
    let pod = k8s::Pod::decode(unknown.raw.as_deref().unwrap_or_default())
        .map_err(|e| DecodeError::Protobuf(e.to_string()))?;
    let meta = pod.metadata.unwrap_or_default();
    let status = pod.status.unwrap_or_default();
    let time_ms = |t: &k8s::Time| {
        t.seconds
            .map(|s| s.saturating_mul(1000) + i64::from(t.nanos.unwrap_or(0)) / 1_000_000)
    };
    let running_started = status
        .container_statuses
        .iter()
        .filter_map(|c| c.state.as_ref()?.running.as_ref()?.started_at.as_ref())
        .filter_map(time_ms)
        .max();
    Ok(PodRecord {
        name: meta.name.unwrap_or_default(),
        namespace: meta.namespace.unwrap_or_default(),
        labels: meta.labels.into_iter().collect(),
        deleting: meta.deletion_timestamp.is_some(),
        phase: status.phase.unwrap_or_default(),
        pod_ip: status.pod_ip.filter(|ip| !ip.is_empty()),
        host_ip: status.host_ip.filter(|ip| !ip.is_empty()),
        started_at_ms: running_started.or_else(|| status.start_time.as_ref().and_then(time_ms)),
    })
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct JsonPod {
    kind: Option<String>,
    metadata: JsonMeta,
    status: JsonStatus,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct JsonMeta {
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    deletion_timestamp: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct JsonStatus {
    phase: String,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "hostIP")]
    host_ip: Option<String>,
    start_time: Option<String>,
    container_statuses: Vec<JsonContainerStatus>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct JsonContainerStatus {
    state: JsonContainerState,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct JsonContainerState {
    running: Option<JsonRunning>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct JsonRunning {
    started_at: Option<String>,
}

fn decode_json(bytes: &[u8]) -> Result<PodRecord, DecodeError> {
    let pod: JsonPod =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
    if let Some(kind) = pod.kind.filter(|k| k != "Pod") {
        return Err(DecodeError::NotAPod(kind));
    }
    let running_started = pod
        .status
        .container_statuses
        .iter()
        .filter_map(|c| c.state.running.as_ref()?.started_at.as_deref())
        .filter_map(parse_rfc3339_ms)
        .max();
    let start_time = pod.status.start_time.as_deref().and_then(parse_rfc3339_ms);
    Ok(PodRecord {
        name: pod.metadata.name,
        namespace: pod.metadata.namespace,
        labels: pod.metadata.labels,
        deleting: pod.metadata.deletion_timestamp.is_some(),
        phase: pod.status.phase,
        pod_ip: pod.status.pod_ip.filter(|ip| !ip.is_empty()),
        host_ip: pod.status.host_ip.filter(|ip| !ip.is_empty()),
        started_at_ms: running_started.or(start_time),
    })
}

/// One term of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelTerm {
    /// `key=value` or `key==value`.
    Equals(String, String),
    /// `key!=value` (also true when the label is absent).
    NotEquals(String, String),
}

impl std::fmt::Display for LabelTerm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabelTerm::Equals(k, v) => write!(f, "{k}={v}"),
            LabelTerm::NotEquals(k, v) => write!(f, "{k}!={v}"),
        }
    }
}

/// A selector in the API server's syntax, the inverse of [`parse_selector`].
pub fn selector_string(terms: &[LabelTerm]) -> String {
    terms
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses an equality-based label selector: terms joined by commas.
pub fn parse_selector(text: &str) -> Result<Vec<LabelTerm>, String> {
    let mut terms = Vec::new();
    for raw in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let term = if let Some((k, v)) = raw.split_once("!=") {
            LabelTerm::NotEquals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = raw.split_once("==").or_else(|| raw.split_once('=')) {
            LabelTerm::Equals(k.trim().to_owned(), v.trim().to_owned())
        } else {
            return Err(format!(
                "selector term {raw:?} is not key=value, key==value or key!=value"
            ));
        };
        let (key, value) = match &term {
            LabelTerm::Equals(k, v) | LabelTerm::NotEquals(k, v) => (k, v),
        };
        if key.is_empty() {
            return Err(format!("selector term {raw:?} has an empty label name"));
        }
        if !valid_label_key(key) {
            return Err(format!(
                "selector term {raw:?}: {key:?} is not a Kubernetes label name"
            ));
        }
        if !valid_label_value(value) {
            return Err(format!(
                "selector term {raw:?}: {value:?} is not a Kubernetes label value"
            ));
        }
        terms.push(term);
    }
    Ok(terms)
}

/// A label name as Kubernetes accepts it: an optional DNS-subdomain prefix
/// and `/`, then 1 to 63 alphanumerics, `-`, `_`, `.`, starting and ending
/// alphanumeric.
pub fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    prefix_ok && !name.is_empty() && valid_label_value(name)
}

/// A label value as Kubernetes accepts it: empty, or up to 63
/// alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
pub fn valid_label_value(value: &str) -> bool {
    let b = value.as_bytes();
    value.is_empty()
        || (b.len() <= 63
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric())
}

/// Which pods are peers of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFilter {
    /// Namespace the pods must be in.
    pub namespace: String,
    /// Label terms that must all hold.
    pub selector: Vec<LabelTerm>,
    /// A substring the pod name must contain (the original design's match).
    pub name_contains: Option<String>,
    /// This node's pod IP: the pod with it is this node, never a peer.
    pub self_pod_ip: String,
    /// The gRPC port every replica listens on.
    pub grpc_port: u16,
}

/// The port of a `host:port` dial address (the default gRPC port when it
/// has none).
pub(super) fn grpc_port(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(crate::config::DEFAULT_GRPC_PORT)
}

impl PodFilter {
    /// This filter as node `identity` runs it: its own pod is never a
    /// peer, and peers are dialled on its gRPC port.
    pub(super) fn for_node(&self, identity: &crate::identity::NodeIdentity) -> Self {
        Self {
            self_pod_ip: identity.pod_ip.clone(),
            grpc_port: grpc_port(&identity.grpc_addr),
            ..self.clone()
        }
    }

    /// True when the pod belongs to this app (namespace, labels, name),
    /// whatever its state.
    pub fn selects(&self, pod: &PodRecord) -> bool {
        pod.namespace == self.namespace
            && self.selector.iter().all(|term| match term {
                LabelTerm::Equals(k, v) => pod.labels.get(k) == Some(v),
                LabelTerm::NotEquals(k, v) => pod.labels.get(k) != Some(v),
            })
            && self
                .name_contains
                .as_deref()
                .is_none_or(|needle| pod.name.contains(needle))
    }

    /// The peer this pod is, if it is one: selected, `Running`, with a pod
    /// IP, not being deleted, and not this node.
    pub fn peer(&self, pod: &PodRecord) -> Option<Peer> {
        if !self.selects(pod) || pod.phase != "Running" || pod.deleting {
            return None;
        }
        let ip = pod.pod_ip.as_deref()?;
        if ip == self.self_pod_ip {
            return None;
        }
        let ip: std::net::IpAddr = ip.parse().ok()?;
        Some(Peer {
            grpc_addr: std::net::SocketAddr::new(ip, self.grpc_port).to_string(),
            name: Some(pod.name.clone()),
            host_ip: pod.host_ip.clone(),
            started_at_ms: pod.started_at_ms,
        })
    }
}

/// Parses an RFC 3339 timestamp (`2017-05-23T10:10:29Z`, fractions and
/// offsets allowed) into Unix milliseconds.
pub fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(range)?;
        if !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<3}", &frac[..digits.min(3)]);
        millis = padded.parse::<i64>().ok()?;
        rest = &frac[digits..];
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6
            && (rest.starts_with('+') || rest.starts_with('-'))
            && &rest[3..4] == ":" =>
        {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let h: i64 = rest[1..3].parse().ok()?;
            let m: i64 = rest[4..6].parse().ok()?;
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs * 1000 + millis)
}

/// Formats Unix milliseconds as RFC 3339 in UTC, to the second, as
/// Kubernetes writes timestamps.
pub fn format_rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARTICLE_POD: &str = include_str!("../../tests/fixtures/article_pod.json");

    fn filter() -> PodFilter {
        PodFilter {
            namespace: "default".into(),
            selector: parse_selector("app=hello").expect("valid"),
            name_contains: None,
            self_pod_ip: "10.0.0.1".into(),
            grpc_port: 9090,
        }
    }

    #[test]
    fn the_article_pod_decodes_and_is_a_peer() {
        let pod = decode_pod(ARTICLE_POD.as_bytes()).expect("decodes");
        assert_eq!(pod.name, "hello-web-29a74e26ea3c2138e1727f35a111f4c6-dknwh");
        assert_eq!(pod.phase, "Running");
        assert_eq!(pod.pod_ip.as_deref(), Some("172.80.13.4"));
        assert_eq!(pod.host_ip.as_deref(), Some("10.30.58.179"));
        // The running container's startedAt, not status.startTime (5 s earlier).
        assert_eq!(pod.started_at_ms, parse_rfc3339_ms("2017-05-23T10:10:29Z"));
        let peer = filter().peer(&pod).expect("a peer");
        assert_eq!(peer.grpc_addr, "172.80.13.4:9090");
        let mut me = filter();
        me.self_pod_ip = "172.80.13.4".into();
        assert_eq!(me.peer(&pod), None, "a node excludes itself by pod IP");
    }

    #[test]
    fn pods_that_are_not_peers_are_ignored() {
        let base = decode_pod(ARTICLE_POD.as_bytes()).expect("decodes");
        let f = filter();
        let cases: Vec<(&str, PodRecord)> = vec![
            (
                "pending",
                PodRecord {
                    phase: "Pending".into(),
                    ..base.clone()
                },
            ),
            (
                "succeeded",
                PodRecord {
                    phase: "Succeeded".into(),
                    ..base.clone()
                },
            ),
            (
                "no ip",
                PodRecord {
                    pod_ip: None,
                    ..base.clone()
                },
            ),
            (
                "deleting",
                PodRecord {
                    deleting: true,
                    ..base.clone()
                },
            ),
            (
                "other namespace",
                PodRecord {
                    namespace: "kube-system".into(),
                    ..base.clone()
                },
            ),
            (
                "other app",
                PodRecord {
                    labels: [("app".to_string(), "other".to_string())].into(),
                    ..base.clone()
                },
            ),
        ];
        for (what, pod) in cases {
            assert_eq!(f.peer(&pod), None, "{what}");
        }
        let by_name = PodFilter {
            selector: vec![],
            name_contains: Some("hello-web".into()),
            ..filter()
        };
        assert!(by_name.peer(&base).is_some());
        let wrong_name = PodFilter {
            name_contains: Some("nginx".into()),
            ..by_name
        };
        assert!(wrong_name.peer(&base).is_none());
    }

    #[test]
    fn values_that_are_not_pods_are_told_apart() {
        assert_eq!(
            decode_pod(b"k8s:enc:aescbc:v1:key1:\x01\x02"),
            Err(DecodeError::Encrypted {
                provider: "aescbc:v1:key1".into()
            })
        );
        assert!(matches!(
            decode_pod(b"k8s\0\xff\xff\xff"),
            Err(DecodeError::Protobuf(_))
        ));
        assert!(matches!(
            decode_pod(b"{\"kind\":\"Service\"}"),
            Err(DecodeError::NotAPod(_))
        ));
        assert!(matches!(
            decode_pod(b"{\"metadata\": 5}"),
            Err(DecodeError::Json(_))
        ));
        assert_eq!(decode_pod(b"garbage"), Err(DecodeError::Unrecognized));
        assert_eq!(decode_pod(b""), Err(DecodeError::Unrecognized));
    }

    #[test]
    fn selectors_parse_and_refuse_nonsense() {
        assert_eq!(
            parse_selector("app=hello, tier==frontend,env!=prod").expect("valid"),
            vec![
                LabelTerm::Equals("app".into(), "hello".into()),
                LabelTerm::Equals("tier".into(), "frontend".into()),
                LabelTerm::NotEquals("env".into(), "prod".into()),
            ]
        );
        assert!(parse_selector("app").is_err());
        assert!(parse_selector("=x").is_err());
        // Found by tests/fuzz.rs: a name holding '=' went through.
        assert!(parse_selector("=ዂ==").is_err());
        assert!(parse_selector("app=-bad").is_err());
        assert!(parse_selector(&format!("app={}", "v".repeat(64))).is_err());
        assert_eq!(
            parse_selector("app.kubernetes.io/name=podcache,empty=").expect("valid"),
            vec![
                LabelTerm::Equals("app.kubernetes.io/name".into(), "podcache".into()),
                LabelTerm::Equals("empty".into(), String::new()),
            ]
        );
        assert!(parse_selector("Bad.Prefix/name=x").is_err());
    }

    #[test]
    fn timestamps_round_trip_and_bad_ones_are_refused() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2017-05-23T10:10:29Z"),
            Some(1_495_534_229_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2017-05-23T12:10:29.250+02:00"),
            Some(1_495_534_229_250)
        );
        assert_eq!(format_rfc3339(1_495_534_229_999), "2017-05-23T10:10:29Z");
        for ms in [0, 951_782_400_000, 1_709_164_800_000, 4_102_444_800_000] {
            assert_eq!(parse_rfc3339_ms(&format_rfc3339(ms)), Some(ms));
        }
        for bad in [
            "",
            "2017-05-23",
            "2017-13-01T00:00:00Z",
            "2017-05-23T10:10:29",
            "2017-05-23T10:10:29.Z",
            "2017-05-23T10:10:29+0200",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }
}
