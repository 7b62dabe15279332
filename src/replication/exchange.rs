//! The calls of the state exchanges: anti-entropy's `Hello`, `Digest` and
//! `Repair`, the full resync's and the bootstrap pull's `Snapshot`, and
//! the original `Sync/GetAll` a bootstrap falls back to.
//!
//! [`StatePeer`] is the seam between those exchanges
//! ([`super::anti_entropy`], [`super::bootstrap`]) and the network, as
//! [`super::transport::PeerTransport`] is for a link: production passes
//! [`StateClient`] (tonic over the peer's channel); the protocol's
//! simulation (`super::sim`, in the tests) passes peers in the same process
//! over a simulated network, answered by the same [`super::answer`]
//! functions the gRPC handlers call.
//!
//! Owns: the tonic clients of the exchanges and their per-call timeout.
//! Must not touch: what an exchange decides (which buckets, which peer),
//! the merge rule.

use std::time::Duration;

use tonic::transport::Channel;

use super::error::{Call, ReplicationError, within};
use crate::proto::hellorpc::{SyncRequest, SyncResponse, sync_client::SyncClient};
use crate::proto::podcache::{self as pb, replica_client::ReplicaClient};

/// What the state exchanges ask of one peer. Every call is bounded by the
/// node's RPC timeout (a snapshot's by chunk: the whole stream may take as
/// long as the state needs).
pub(crate) trait StatePeer: Send + Sync {
    /// The chunks of a snapshot as they arrive.
    type Chunks: SnapshotChunks;

    /// Asks the peer who it is, whether it is ready and whether it is stale.
    fn hello(
        &self,
        me: &pb::NodeInfo,
    ) -> impl Future<Output = Result<pb::HelloResponse, ReplicationError>> + Send;

    /// The peer's digest, or that its root equals the request's.
    fn digest(
        &self,
        request: pb::DigestRequest,
    ) -> impl Future<Output = Result<pb::DigestResponse, ReplicationError>> + Send;

    /// This node's entries of some buckets for the peer's newer ones.
    fn repair(
        &self,
        request: pb::RepairRequest,
    ) -> impl Future<Output = Result<pb::RepairResponse, ReplicationError>> + Send;

    /// Opens a pull of the peer's whole state.
    fn snapshot(
        &self,
        request: pb::SnapshotRequest,
    ) -> impl Future<Output = Result<Self::Chunks, ReplicationError>> + Send;

    /// The original protocol's whole state (no versions).
    fn get_all(&self) -> impl Future<Output = Result<SyncResponse, ReplicationError>> + Send;
}

/// The chunks of one snapshot, in order.
pub(crate) trait SnapshotChunks: Send {
    /// The next chunk, `None` once the peer ended the stream.
    fn next(
        &mut self,
    ) -> impl Future<Output = Result<Option<pb::SnapshotChunk>, ReplicationError>> + Send;
}

/// The tonic clients of the exchanges with one peer, over its channel.
#[derive(Debug, Clone)]
pub(crate) struct StateClient {
    replica: ReplicaClient<Channel>,
    sync: SyncClient<Channel>,
    timeout: Duration,
}

impl StateClient {
    /// Clients over `channel`, with `max_message` bytes each way and
    /// `timeout` per call.
    pub(crate) fn new(channel: Channel, max_message: usize, timeout: Duration) -> Self {
        Self {
            replica: ReplicaClient::new(channel.clone())
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
            sync: SyncClient::new(channel)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
            timeout,
        }
    }
}

/// A snapshot's gRPC stream, each message within the timeout.
pub(crate) struct ChunkStream {
    stream: tonic::Streaming<pb::SnapshotChunk>,
    timeout: Duration,
}

impl SnapshotChunks for ChunkStream {
    async fn next(&mut self) -> Result<Option<pb::SnapshotChunk>, ReplicationError> {
        within(Call::Snapshot, self.timeout, self.stream.message()).await
    }
}

impl StatePeer for StateClient {
    type Chunks = ChunkStream;

    async fn hello(&self, me: &pb::NodeInfo) -> Result<pb::HelloResponse, ReplicationError> {
        let request = pb::HelloRequest {
            sender: Some(me.clone()),
        };
        let mut client = self.replica.clone();
        within(Call::Hello, self.timeout, client.hello(request))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn digest(
        &self,
        request: pb::DigestRequest,
    ) -> Result<pb::DigestResponse, ReplicationError> {
        let mut client = self.replica.clone();
        within(Call::Digest, self.timeout, client.digest(request))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn repair(
        &self,
        request: pb::RepairRequest,
    ) -> Result<pb::RepairResponse, ReplicationError> {
        let mut client = self.replica.clone();
        within(Call::Repair, self.timeout, client.repair(request))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn snapshot(
        &self,
        request: pb::SnapshotRequest,
    ) -> Result<ChunkStream, ReplicationError> {
        let mut client = self.replica.clone();
        let stream = within(Call::Snapshot, self.timeout, client.snapshot(request))
            .await?
            .into_inner();
        Ok(ChunkStream {
            stream,
            timeout: self.timeout,
        })
    }

    async fn get_all(&self) -> Result<SyncResponse, ReplicationError> {
        let mut client = self.sync.clone();
        within(
            Call::GetAll,
            self.timeout,
            client.get_all(SyncRequest { data: Vec::new() }),
        )
        .await
        .map(tonic::Response::into_inner)
    }
}
