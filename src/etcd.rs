//! A small etcd v3 client over the generated API (`proto/etcd/rpc.proto`):
//! range a prefix (paged, at one revision), put, delete, compact, watch a
//! prefix, and leases. Client TLS as kube-apiserver's own etcd client uses it
//! (CA, client certificate and key).
//!
//! Owns: connections to etcd and the translation of its errors. Must not
//! touch: what the keys mean (the discovery backends and the pod simulator
//! decide).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::etcd::kv_client::KvClient;
use crate::proto::etcd::lease_client::LeaseClient;
use crate::proto::etcd::watch_client::WatchClient;
use crate::proto::etcd::{
    CompactionRequest, DeleteRangeRequest, Event, KeyValue, LeaseGrantRequest,
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseRevokeRequest, PutRequest, RangeRequest,
    TxnRequest, TxnResponse, WatchCreateRequest, WatchRequest, WatchResponse, watch_request,
};

/// Client TLS files, as kube-apiserver's `--etcd-cafile`, `--etcd-certfile`
/// and `--etcd-keyfile`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// CA bundle that signed etcd's serving certificate.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), sent when etcd asks for one.
    pub cert: Option<PathBuf>,
    /// Client key (PEM) of `cert`.
    pub key: Option<PathBuf>,
}

/// Where etcd is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// `http://host:port` or `https://host:port`, one or more.
    pub endpoints: Vec<String>,
    /// Client TLS, for `https` endpoints.
    pub tls: EtcdTls,
    /// Deadline of one unary call and of connecting.
    pub timeout: Duration,
}

/// A failure talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint, or one that is not a URL.
    #[error("invalid etcd endpoint {0:?}")]
    BadEndpoint(String),
    /// A TLS file could not be read or does not fit.
    #[error("etcd TLS: {0}")]
    Tls(String),
    /// etcd could not be reached or answered with an error.
    #[error("etcd: {0}")]
    Call(String),
    /// etcd did not answer in time.
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    /// The watch was cancelled because its start revision was compacted.
    #[error("etcd compacted revision {compact_revision} past the watch's start")]
    Compacted {
        /// The revision etcd compacted to.
        compact_revision: i64,
    },
    /// The watch stream ended or was cancelled by etcd.
    #[error("etcd watch ended: {0}")]
    WatchEnded(String),
}

impl From<tonic::Status> for EtcdError {
    fn from(status: tonic::Status) -> Self {
        EtcdError::Call(format!("{:?}: {}", status.code(), status.message()))
    }
}

/// The end of a prefix range: the prefix with its last byte incremented.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // the whole key space
}

/// An open watch: responses arrive on `stream`; dropping it ends the watch.
pub struct Watch {
    /// Keeps the request side open (etcd ends the watch when it closes).
    _requests_tx: mpsc::Sender<WatchRequest>,
    stream: Streaming<WatchResponse>,
}

impl Watch {
    /// The next response; `Ok(None)` when etcd closed the stream.
    pub async fn next(&mut self) -> Result<Option<WatchResponse>, EtcdError> {
        Ok(self.stream.message().await?)
    }

    /// The events of the next response (none for a progress notification).
    /// The end of the watch is an error: etcd closed the stream, cancelled
    /// the watch, or compacted its start revision away
    /// ([`EtcdError::Compacted`], after which the caller lists again).
    pub async fn next_events(&mut self) -> Result<Vec<Event>, EtcdError> {
        let Some(response) = self.next().await? else {
            return Err(EtcdError::WatchEnded("etcd closed the stream".into()));
        };
        if response.compact_revision > 0 {
            return Err(EtcdError::Compacted {
                compact_revision: response.compact_revision,
            });
        }
        if response.canceled {
            return Err(EtcdError::WatchEnded(
                if response.cancel_reason.is_empty() {
                    "cancelled by etcd".into()
                } else {
                    response.cancel_reason
                },
            ));
        }
        Ok(response.events)
    }
}

/// A lease kept alive by the caller sending on `keep_alive_tx`.
pub struct LeaseKeeper {
    /// The lease id.
    pub id: i64,
    /// Send the lease id here to renew it.
    pub keep_alive_tx: mpsc::Sender<LeaseKeepAliveRequest>,
    /// Renewal answers.
    pub responses: Streaming<LeaseKeepAliveResponse>,
}

/// A connection to an etcd cluster: one lazily connecting channel per
/// endpoint, and failover to the next endpoint when one cannot be reached
/// (as etcd's own client does), sticking to the last one that answered.
#[derive(Debug, Clone)]
pub struct EtcdClient {
    channels: Vec<(String, Channel)>,
    /// Index of the endpoint that answered last.
    current: Arc<AtomicUsize>,
    timeout: Duration,
}

/// True for failures of the connection rather than of the request.
fn is_unreachable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
    )
}

impl EtcdClient {
    /// Prepares a channel to every endpoint (nothing is dialled yet). Fails
    /// only on bad endpoints or TLS files.
    pub fn connect(settings: &EtcdSettings) -> Result<Self, EtcdError> {
        if settings.endpoints.is_empty() {
            return Err(EtcdError::BadEndpoint(String::new()));
        }
        let tls = tls_config(&settings.tls)?;
        let mut channels = Vec::new();
        for url in &settings.endpoints {
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|_| EtcdError::BadEndpoint(url.clone()))?
                .connect_timeout(settings.timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            if url.starts_with("https://") {
                let tls = tls.clone().unwrap_or_else(ClientTlsConfig::new);
                endpoint = endpoint
                    .tls_config(tls)
                    .map_err(|e| EtcdError::Tls(e.to_string()))?;
            } else if !url.starts_with("http://") {
                return Err(EtcdError::BadEndpoint(url.clone()));
            }
            channels.push((url.clone(), endpoint.connect_lazy()));
        }
        Ok(Self {
            channels,
            current: Arc::new(AtomicUsize::new(0)),
            timeout: settings.timeout,
        })
    }

    /// Runs `call` against the endpoint that answered last, then the others
    /// in turn while they cannot be reached.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, EtcdError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let start = self.current.load(Ordering::Relaxed);
        let mut last = EtcdError::BadEndpoint(String::new());
        for attempt in 0..self.channels.len() {
            let index = (start + attempt) % self.channels.len();
            let (url, channel) = &self.channels[index];
            match tokio::time::timeout(self.timeout, call(channel.clone())).await {
                Ok(Ok(response)) => {
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) if is_unreachable(&status) => {
                    last = EtcdError::Call(format!(
                        "{url}: {:?}: {}",
                        status.code(),
                        status.message()
                    ));
                }
                Ok(Err(status)) => return Err(status.into()),
                Err(_) => last = EtcdError::Timeout(self.timeout),
            }
        }
        Err(last)
    }

    /// Every key under `prefix`, read in pages at one revision; returns the
    /// pairs and that revision.
    pub async fn range_prefix(&self, prefix: &[u8]) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        const PAGE: i64 = 500;
        let end = prefix_end(prefix);
        let mut start = prefix.to_vec();
        let mut revision = 0;
        let mut all = Vec::new();
        loop {
            let request = RangeRequest {
                key: start.clone(),
                range_end: end.clone(),
                limit: PAGE,
                revision,
                ..RangeRequest::default()
            };
            let response = self
                .call(|ch| {
                    let request = request.clone();
                    async move { KvClient::new(ch).range(request).await }
                })
                .await?;
            if revision == 0 {
                revision = response.header.as_ref().map_or(0, |h| h.revision);
            }
            let more = response.more;
            if let Some(last) = response.kvs.last() {
                start = last.key.clone();
                start.push(0);
            }
            all.extend(response.kvs);
            if !more {
                return Ok((all, revision));
            }
        }
    }

    /// One range request as it is (a single key, or `range_end` set).
    pub async fn range(&self, request: RangeRequest) -> Result<Vec<KeyValue>, EtcdError> {
        let response = self
            .call(|ch| {
                let request = request.clone();
                async move { KvClient::new(ch).range(request).await }
            })
            .await?;
        Ok(response.kvs)
    }

    /// Sets `key`; returns the new revision.
    pub async fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let request = PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
            prev_kv: false,
        };
        let response = self
            .call(|ch| {
                let request = request.clone();
                async move { KvClient::new(ch).put(request).await }
            })
            .await?;
        Ok(response.header.map_or(0, |h| h.revision))
    }

    /// Deletes `key`; returns how many keys were deleted.
    pub async fn delete(&self, key: &[u8]) -> Result<i64, EtcdError> {
        let request = DeleteRangeRequest {
            key: key.to_vec(),
            ..DeleteRangeRequest::default()
        };
        let response = self
            .call(|ch| {
                let request = request.clone();
                async move { KvClient::new(ch).delete_range(request).await }
            })
            .await?;
        Ok(response.deleted)
    }

    /// A transaction.
    pub async fn txn(&self, request: TxnRequest) -> Result<TxnResponse, EtcdError> {
        self.call(|ch| {
            let request = request.clone();
            async move { KvClient::new(ch).txn(request).await }
        })
        .await
    }

    /// Compacts the history up to `revision`.
    pub async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        let request = CompactionRequest {
            revision,
            physical: true,
        };
        self.call(|ch| async move { KvClient::new(ch).compact(request).await })
            .await?;
        Ok(())
    }

    /// Watches every key under `prefix` from `start_revision`, with
    /// progress notifications.
    pub async fn watch_prefix(
        &self,
        prefix: &[u8],
        start_revision: i64,
    ) -> Result<Watch, EtcdError> {
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: prefix.to_vec(),
                    range_end: prefix_end(prefix),
                    start_revision,
                    progress_notify: true,
                    ..WatchCreateRequest::default()
                },
            )),
        };
        // Each attempt gets its own request stream; the one that worked is
        // kept open for the life of the watch.
        let opened = std::sync::Mutex::new(None);
        let stream = self
            .call(|ch| {
                let (requests_tx, requests_rx) = mpsc::channel(4);
                let _ = requests_tx.try_send(create.clone());
                *opened
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(requests_tx);
                async move {
                    WatchClient::new(ch)
                        .watch(ReceiverStream::new(requests_rx))
                        .await
                }
            })
            .await?;
        let requests_tx = opened
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .ok_or_else(|| EtcdError::WatchEnded("no request stream".into()))?;
        Ok(Watch {
            _requests_tx: requests_tx,
            stream,
        })
    }

    /// Grants a lease of `ttl_secs`.
    pub async fn grant_lease(&self, ttl_secs: i64) -> Result<i64, EtcdError> {
        let request = LeaseGrantRequest {
            ttl: ttl_secs,
            id: 0,
        };
        let response = self
            .call(|ch| async move { LeaseClient::new(ch).lease_grant(request).await })
            .await?;
        if !response.error.is_empty() {
            return Err(EtcdError::Call(response.error));
        }
        Ok(response.id)
    }

    /// Opens the keep-alive stream of lease `id`.
    pub async fn keep_alive(&self, id: i64) -> Result<LeaseKeeper, EtcdError> {
        let opened = std::sync::Mutex::new(None);
        let responses = self
            .call(|ch| {
                let (keep_alive_tx, rx) = mpsc::channel(4);
                let _ = keep_alive_tx.try_send(LeaseKeepAliveRequest { id });
                *opened
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(keep_alive_tx);
                async move {
                    LeaseClient::new(ch)
                        .lease_keep_alive(ReceiverStream::new(rx))
                        .await
                }
            })
            .await?;
        let keep_alive_tx = opened
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .ok_or_else(|| EtcdError::WatchEnded("no keep-alive stream".into()))?;
        Ok(LeaseKeeper {
            id,
            keep_alive_tx,
            responses,
        })
    }

    /// Revokes lease `id` (its keys are deleted).
    pub async fn revoke_lease(&self, id: i64) -> Result<(), EtcdError> {
        self.call(|ch| {
            let request = LeaseRevokeRequest { id };
            async move { LeaseClient::new(ch).lease_revoke(request).await }
        })
        .await?;
        Ok(())
    }
}

fn tls_config(tls: &EtcdTls) -> Result<Option<ClientTlsConfig>, EtcdError> {
    if tls == &EtcdTls::default() {
        return Ok(None);
    }
    let read = |path: &PathBuf| {
        std::fs::read(path)
            .map_err(|e| EtcdError::Tls(format!("cannot read {}: {e}", path.display())))
    };
    let mut config = ClientTlsConfig::new();
    if let Some(ca) = &tls.ca {
        config = config.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => {
            return Err(EtcdError::Tls(
                "a client certificate needs its key, and a key its certificate".into(),
            ));
        }
    }
    Ok(Some(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_cover_exactly_the_prefix() {
        assert_eq!(
            prefix_end(b"/registry/pods/default/"),
            b"/registry/pods/default0".to_vec()
        );
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn half_a_client_identity_is_refused() {
        let settings = EtcdSettings {
            endpoints: vec!["https://127.0.0.1:2379".into()],
            tls: EtcdTls {
                ca: None,
                cert: Some("/nonexistent".into()),
                key: None,
            },
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            EtcdClient::connect(&settings),
            Err(EtcdError::Tls(_))
        ));
        let bad = EtcdSettings {
            endpoints: vec!["127.0.0.1:2379".into()],
            tls: EtcdTls::default(),
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            EtcdClient::connect(&bad),
            Err(EtcdError::BadEndpoint(_))
        ));
    }
}
