//! The calls a peer link makes: `Hello`, and an epoch sent as requests on
//! one long-lived `ReplicateStream` call, as unary `Replicate` calls (a
//! podcache from before the stream), or as the original `Sync/Set` (a
//! node built from the original proto alone).
//!
//! Owns: the tonic clients of one link, its open stream, and the wire form
//! of each way. Must not touch: which way to use or when to retry (the
//! link's state machine decides), the change index.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::batch;
use super::error::{Call, ReplicationError, within};
use super::link::Protocol;
use crate::proto::hellorpc::{SyncData, SyncRequest, sync_client::SyncClient};
use crate::proto::podcache::{self as pb, HelloRequest, replica_client::ReplicaClient};
use crate::proto::{Preencoded, ReplicateBatch};
use crate::replica::changes::Taken;

/// What a link asks of its peer: the seam between a link's task
/// ([`super::peer_link`]) and the network. Production passes [`Transport`]
/// (tonic over the peer's channel); the protocol's simulation
/// (`super::sim`, in the tests) passes a simulated network that delays,
/// drops, duplicates and partitions.
pub(crate) trait PeerTransport: Send {
    /// Asks the peer who it is.
    fn hello(
        &mut self,
        me: &pb::NodeInfo,
    ) -> impl Future<Output = Result<pb::HelloResponse, ReplicationError>> + Send;

    /// Sends every record of `epoch` the way `protocol` says; `Ok` only
    /// once the peer applied the whole epoch.
    fn send(
        &mut self,
        protocol: Protocol,
        me: &pb::NodeInfo,
        epoch: &Taken,
    ) -> impl Future<Output = Result<Sent, ReplicationError>> + Send;
}

impl PeerTransport for Transport {
    fn hello(
        &mut self,
        me: &pb::NodeInfo,
    ) -> impl Future<Output = Result<pb::HelloResponse, ReplicationError>> + Send {
        Transport::hello(self, me)
    }

    fn send(
        &mut self,
        protocol: Protocol,
        me: &pb::NodeInfo,
        epoch: &Taken,
    ) -> impl Future<Output = Result<Sent, ReplicationError>> + Send {
        Transport::send(self, protocol, me, epoch)
    }
}

/// What sending an epoch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sent {
    /// Requests it took.
    pub(crate) requests: u64,
    /// Tombstones a legacy peer cannot be told about.
    pub(crate) unexpressed: u64,
}

/// An open `ReplicateStream` call: requests go in through `batches`, and
/// the peer answers each, in order, on `answers`.
struct Session {
    batches: mpsc::Sender<Preencoded>,
    answers: tonic::Streaming<pb::ReplicateResponse>,
}

/// The clients of one link over its one channel.
pub(crate) struct Transport {
    replica: ReplicaClient<Channel>,
    /// `Replicate` and `ReplicateStream` called with requests encoded
    /// once per epoch from the records ([`ReplicateBatch`]) and shared by
    /// every link sending it (the generated client would take `Entry`
    /// messages, copies of every record, encoded again for each peer).
    replicate: tonic::client::Grpc<Channel>,
    sync: SyncClient<Channel>,
    session: Option<Session>,
    timeout: Duration,
    max_batch_bytes: usize,
}

fn codec() -> tonic_prost::ProstCodec<Preencoded, pb::ReplicateResponse> {
    tonic_prost::ProstCodec::default()
}

fn call<T>(message: T, method: &'static str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .extensions_mut()
        .insert(tonic::GrpcMethod::new("podcache.v1.Replica", method));
    request
}

impl Transport {
    /// Clients over `channel`, with `max_message` bytes each way, `timeout`
    /// per call (per request of a stream), batches of `max_batch_bytes`.
    pub(crate) fn new(
        channel: Channel,
        max_message: usize,
        timeout: Duration,
        max_batch_bytes: usize,
    ) -> Self {
        Self {
            replica: ReplicaClient::new(channel.clone())
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
            replicate: tonic::client::Grpc::new(channel.clone())
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
            sync: SyncClient::new(channel)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
            session: None,
            timeout,
            max_batch_bytes,
        }
    }

    /// Asks the peer who it is.
    pub(crate) async fn hello(
        &mut self,
        me: &pb::NodeInfo,
    ) -> Result<pb::HelloResponse, ReplicationError> {
        let request = HelloRequest {
            sender: Some(me.clone()),
        };
        within(Call::Hello, self.timeout, self.replica.hello(request))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Sends every record of `epoch`, cut into requests, the way
    /// `protocol` says. On a stream the peer holds the requests of one
    /// epoch until its last and applies them together.
    pub(crate) async fn send(
        &mut self,
        protocol: Protocol,
        me: &pb::NodeInfo,
        epoch: &Taken,
    ) -> Result<Sent, ReplicationError> {
        if protocol == Protocol::Legacy {
            let mut sent = Sent::default();
            for range in batch::cut(&epoch.records, self.max_batch_bytes) {
                sent.unexpressed += self.send_legacy(&epoch.records[range]).await?;
                sent.requests += 1;
            }
            return Ok(sent);
        }
        let requests = encode(me, epoch, self.max_batch_bytes);
        for request in requests.iter() {
            let request = Preencoded(request.clone());
            if protocol == Protocol::Stream {
                let result = self.send_on_stream(request).await;
                if result.is_err() {
                    // The peer drops what it held of the epoch with the
                    // call; the retry opens a new one and starts over.
                    self.session = None;
                }
                result?;
            } else {
                // Unary (the legacy way went above).
                let path =
                    axum::http::uri::PathAndQuery::from_static("/podcache.v1.Replica/Replicate");
                let grpc = &mut self.replicate;
                within(Call::Replicate, self.timeout, async {
                    ready(grpc).await?;
                    grpc.unary(call(request, "Replicate"), path, codec()).await
                })
                .await?;
            }
        }
        Ok(Sent {
            requests: requests.len() as u64,
            unexpressed: 0,
        })
    }

    /// One request on the open stream (opening one first if none is open),
    /// and its answer.
    async fn send_on_stream(&mut self, batch: Preencoded) -> Result<(), ReplicationError> {
        let timeout = self.timeout;
        let session = match self.session.take() {
            Some(session) => session,
            None => within(Call::ReplicateStream, timeout, self.open_session()).await?,
        };
        let session = self.session.insert(session);
        within(Call::ReplicateStream, timeout, async {
            if session.batches.send(batch).await.is_err() {
                return Err(tonic::Status::unavailable("the stream closed"));
            }
            match session.answers.message().await? {
                Some(_answer) => Ok(()),
                None => Err(tonic::Status::unavailable("the peer ended the stream")),
            }
        })
        .await
    }

    /// Opens a `ReplicateStream` call (returns once the peer answered its
    /// headers).
    async fn open_session(&mut self) -> Result<Session, tonic::Status> {
        ready(&mut self.replicate).await?;
        let path =
            axum::http::uri::PathAndQuery::from_static("/podcache.v1.Replica/ReplicateStream");
        // One request in flight at a time: the link waits for each answer.
        let (batches, outgoing) = mpsc::channel(1);
        let request = call(
            tokio_stream::wrappers::ReceiverStream::new(outgoing),
            "ReplicateStream",
        );
        let answers = self
            .replicate
            .streaming(request, path, codec())
            .await?
            .into_inner();
        Ok(Session { batches, answers })
    }

    /// The original protocol has no versions, expiry or deletes: values go
    /// as `Sync/Set`, grouped by type; tombstones cannot be expressed and
    /// are counted (the returned number).
    async fn send_legacy(
        &mut self,
        records: &[crate::store::Record],
    ) -> Result<u64, ReplicationError> {
        let mut by_type: BTreeMap<i32, HashMap<String, String>> = BTreeMap::new();
        let mut tombstones = 0;
        for record in records {
            let (key, Some(value)) = record.entry.key_value() else {
                tombstones += 1;
                continue;
            };
            by_type
                .entry(record.ty)
                .or_default()
                .insert(key.to_owned(), value.to_owned());
        }
        if by_type.is_empty() {
            return Ok(tombstones);
        }
        let request = SyncRequest {
            data: by_type
                .into_iter()
                .map(|(r#type, data)| SyncData { r#type, data })
                .collect(),
        };
        within(Call::Set, self.timeout, self.sync.set(request)).await?;
        Ok(tombstones)
    }
}

/// The epoch cut into `ReplicateRequest`s of at most `max_batch_bytes`,
/// all but the last flagged `more`, encoded by the first link that sends it
/// (every link of this node sends the same sender and cuts alike).
fn encode(me: &pb::NodeInfo, epoch: &Taken, max_batch_bytes: usize) -> Arc<Vec<Bytes>> {
    epoch.encoded.get_or_encode(|| {
        let ranges = batch::cut(&epoch.records, max_batch_bytes);
        let last = ranges.len().saturating_sub(1);
        ranges
            .into_iter()
            .enumerate()
            .map(|(i, range)| {
                let request = ReplicateBatch {
                    sender: Some(me.clone()),
                    records: epoch.records.clone(),
                    range,
                    more: i < last,
                };
                Bytes::from(prost::Message::encode_to_vec(&request))
            })
            .collect()
    })
}

async fn ready(grpc: &mut tonic::client::Grpc<Channel>) -> Result<(), tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))
}
