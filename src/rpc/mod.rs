//! The gRPC side of a node: the original `hellorpc.Sync` service with its
//! plain meaning, podcache's `podcache.v1.Replica` additions, the standard
//! health service and server reflection.
//!
//! Owns: turning gRPC messages into calls on the replica and back, holding
//! an epoch that comes in several `ReplicateStream` requests until its
//! last, and mapping errors to status codes. Must not touch: the merge
//! rule, fan-out (a peer's write received here is never forwarded; only the
//! original `Sync/Set`, a client's write, takes the local write path),
//! membership.

mod incoming;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use tracing::{debug, error};

use crate::identity::unix_ms;
use crate::proto::hellorpc::sync_server::{Sync as SyncRpc, SyncServer};
use crate::proto::hellorpc::{SyncData, SyncRequest, SyncResponse};
use crate::proto::podcache::replica_server::{Replica as ReplicaRpc, ReplicaServer};
use crate::proto::podcache::{
    DecideRequest, DecideResponse, DigestRequest, DigestResponse, HelloRequest, HelloResponse,
    RepairRequest, RepairResponse, ReplicateRequest, ReplicateResponse, SnapshotChunk,
    SnapshotRequest,
};
use crate::proto::{FILE_DESCRIPTOR_SET, records_from_wire};
use crate::replica::Change;
use crate::replica::Replica;
use crate::replication::answer;
use crate::replication::assembly::{Assembly, Released};
use crate::store::{PEER_HEADROOM, StoreError};

impl From<crate::replica::WriteError> for Status {
    fn from(err: crate::replica::WriteError) -> Self {
        use crate::durability::DiskError;
        use crate::replica::WriteError;
        match err {
            WriteError::Store(e) => e.into(),
            WriteError::Disk(DiskError::Full(_)) => Status::resource_exhausted(err.to_string()),
            WriteError::Disk(_) | WriteError::NotDurable(_) | WriteError::Fenced => {
                Status::unavailable(err.to_string())
            }
            WriteError::ReservedType | WriteError::Schema(_) => {
                Status::invalid_argument(err.to_string())
            }
            WriteError::SchemaUnusable { .. } => Status::failed_precondition(err.to_string()),
        }
    }
}

/// What the gRPC services use of the node.
#[derive(Debug, Clone)]
pub(crate) struct RpcContext {
    pub(crate) replica: Arc<Replica>,
    /// Decides the conditional writes forwarded to this node.
    pub(crate) decider: Arc<crate::replication::decider::Decider>,
    /// Mutual TLS for incoming connections, when configured.
    pub(crate) tls: Option<Arc<crate::tls::PeerTls>>,
    /// Fires when the node stops serving: open `ReplicateStream` calls end.
    pub(crate) stop: CancellationToken,
    /// Owns the tasks the services spawn (accepting, snapshot streams).
    pub(crate) tasks: tokio_util::task::TaskTracker,
    /// One permit per snapshot being served (`--max-concurrent-snapshots`).
    pub(crate) snapshots: Arc<tokio::sync::Semaphore>,
}

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Full { .. } => Status::resource_exhausted(err.to_string()),
            _ => Status::invalid_argument(err.to_string()),
        }
    }
}

/// Serves gRPC on `listener` until `stop` fires, then finishes in-flight
/// calls and returns.
pub(crate) async fn serve(
    ctx: RpcContext,
    listener: TcpListener,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) {
    let config = &ctx.replica.config;
    let max = config.max_grpc_message_bytes;
    let reflection = match tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
    {
        Ok(reflection) => Some(reflection),
        Err(err) => {
            // Only possible if the descriptors compiled into this binary
            // were malformed; serve without reflection rather than not at all.
            error!(%err, "server reflection unavailable");
            None
        }
    };
    let incoming = incoming::incoming(&ctx, listener);
    let per_connection = config.max_concurrent_rpcs_per_connection;
    let stop = ctx.stop.clone();
    let router = Server::builder()
        .concurrency_limit_per_connection(per_connection)
        .max_concurrent_streams(Some(u32::try_from(per_connection).unwrap_or(u32::MAX)))
        // Rare pings (every accepted socket has TCP keep-alive too): their
        // cost per node grows with the number of peers connected.
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health)
        .add_optional_service(reflection)
        .add_service(
            SyncServer::new(SyncService {
                replica: ctx.replica.clone(),
            })
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            ReplicaServer::new(ReplicaService { ctx })
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        );
    if let Err(err) = router
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await
    {
        error!(%err, "gRPC server stopped with an error");
    }
}

/// `hellorpc.Sync` with the meaning a node built from the original file
/// expects.
struct SyncService {
    replica: Arc<Replica>,
}

#[tonic::async_trait]
impl SyncRpc for SyncService {
    /// Per `SyncData`, the values of the keys named in `data` (present keys
    /// only).
    async fn get(&self, request: Request<SyncRequest>) -> Result<Response<SyncResponse>, Status> {
        let now = unix_ms();
        let data = request
            .into_inner()
            .data
            .into_iter()
            .map(|asked| {
                let found: HashMap<String, String> = asked
                    .data
                    .into_keys()
                    .filter_map(|key| {
                        let entry = self.replica.store.get(asked.r#type, &key, now)?;
                        let value = entry.value()?.to_owned();
                        Some((key, value))
                    })
                    .collect();
                SyncData {
                    r#type: asked.r#type,
                    data: found,
                }
            })
            .collect();
        Ok(Response::new(SyncResponse { data }))
    }

    /// Merges each `SyncData.data` into namespace `type` and answers with
    /// what it applied. Every entry is checked first: one bad entry refuses
    /// the whole request and nothing changes. A client's write, so it takes
    /// the local write path and reaches every peer.
    async fn set(&self, request: Request<SyncRequest>) -> Result<Response<SyncResponse>, Status> {
        let request = request.into_inner();
        let store = &self.replica.store;
        for data in request.data.iter().filter(|d| !d.data.is_empty()) {
            store.check_batch(
                data.data
                    .iter()
                    .map(|(k, v)| (k.as_str(), Some(v.as_str()))),
                None,
            )?;
        }
        // The reserved type and schemas, for every type first: all or
        // nothing.
        for data in request.data.iter().filter(|d| !d.data.is_empty()) {
            let entries: Vec<(&str, &str)> = data
                .data
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            self.replica.check(&Change::Unversioned {
                ty: data.r#type,
                entries: &entries,
            })?;
        }
        let mut answer = Vec::with_capacity(request.data.len());
        for data in request.data {
            if data.data.is_empty() {
                continue;
            }
            let entries: Vec<(&str, &str)> = data
                .data
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let change = Change::Unversioned {
                ty: data.r#type,
                entries: &entries,
            };
            let outcome = self
                .replica
                .write_as(
                    change,
                    false,
                    crate::replica::Author {
                        name: "sync",
                        reason: None,
                    },
                )
                .await?;
            let applied = outcome
                .records
                .iter()
                .filter_map(|r| Some((r.key().to_owned(), r.entry.value()?.to_owned())))
                .collect();
            answer.push(SyncData {
                r#type: data.r#type,
                data: applied,
            });
        }
        Ok(Response::new(SyncResponse { data: answer }))
    }

    /// The whole map of each requested type, or of every type when the
    /// request is empty.
    async fn get_all(
        &self,
        request: Request<SyncRequest>,
    ) -> Result<Response<SyncResponse>, Status> {
        let now = unix_ms();
        let store = &self.replica.store;
        let request = request.into_inner();
        let types: Vec<i32> = if request.data.is_empty() {
            store.types()
        } else {
            request.data.iter().map(|d| d.r#type).collect()
        };
        let data = types
            .into_iter()
            .map(|ty| SyncData {
                r#type: ty,
                data: store.namespace_pairs(ty, now).collect(),
            })
            .collect();
        Ok(Response::new(SyncResponse { data }))
    }
}

/// `podcache.v1.Replica`: versioned replication between podcache nodes.
struct ReplicaService {
    ctx: RpcContext,
}

/// Sets the gauge of snapshots being served when one ends.
struct ServingGauge {
    metrics: Arc<crate::metrics::Metrics>,
    snapshots: Arc<tokio::sync::Semaphore>,
    limit: usize,
}

impl Drop for ServingGauge {
    fn drop(&mut self) {
        // The permit is dropped just after this: one fewer is serving.
        let serving = self.limit - self.snapshots.available_permits() - 1;
        self.metrics.snapshots_serving.set(serving as i64);
    }
}

type ChunkStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<SnapshotChunk, Status>> + Send>>;

type AnswerStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ReplicateResponse, Status>> + Send>>;

/// Merges one fan-out request from a peer (`Replicate`, `ReplicateStream`).
/// On a stream, `assembly` holds an epoch until its last request (see
/// [`Assembly`]); the answers to held requests count nothing. An epoch
/// released early, past the assembly's cap, is counted and logged.
fn replicate_batch(
    replica: &Replica,
    request: ReplicateRequest,
    assembly: Option<&mut Assembly>,
) -> Result<(ReplicateResponse, Disk), Status> {
    let Some(sender) = request.sender else {
        return Err(Status::invalid_argument(
            "replicate: the sender must name itself",
        ));
    };
    let mut records: Vec<_> = records_from_wire(request.entries);
    debug!(peer = %sender.name, entries = records.len(), more = request.more, "replicate");
    if let Some(assembly) = assembly {
        match assembly.take(records, request.more) {
            Released::Held => return Ok((ReplicateResponse::default(), Ok(None))),
            Released::Merge {
                records: all,
                past_cap,
            } => {
                if let Some(bytes) = past_cap {
                    replica.metrics.epochs_split.inc();
                    tracing::warn!(peer = %sender.name, bytes, "an epoch from a peer is larger than this node can hold back; merging it in parts");
                }
                records = all;
            }
        }
    }
    let applied = replica.apply_remote(records, "replicate");
    let outcome = applied.outcome;
    Ok((
        ReplicateResponse {
            applied: outcome.applied.len() as u32,
            stale: outcome.stale as u32,
            rejected: outcome.rejected.len() as u32,
        },
        applied.disk,
    ))
}

/// The answer to a fan-out request once what it applied is on this node's
/// disk as `--fsync` promises: under `always` a peer acknowledges only
/// what it has synced, and a data directory that could not take it is an
/// error to the sender (which keeps it pending and sends it again), never
/// an acknowledgement.
async fn answer_when_durable(
    replica: &Replica,
    batch: Result<(ReplicateResponse, Disk), Status>,
) -> Result<ReplicateResponse, Status> {
    let (response, disk) = batch?;
    replica.settle(disk).await.map_err(|error| {
        Status::unavailable(format!(
            "this node applied the entries but its data directory did not take them: {error}"
        ))
    })?;
    Ok(response)
}

/// What the data directory said of a merge (see `Applied::disk`).
type Disk = Result<Option<u64>, crate::durability::DiskError>;

#[tonic::async_trait]
impl ReplicaRpc for ReplicaService {
    async fn decide(
        &self,
        request: Request<DecideRequest>,
    ) -> Result<Response<DecideResponse>, Status> {
        use crate::replication::decider;
        let write = decider::from_request(request.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let result = self.ctx.decider.decide(write, true).await;
        Ok(Response::new(decider::answer_to_wire(
            result,
            &self.ctx.replica.identity.name,
        )))
    }

    async fn hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloResponse>, Status> {
        if let Some(sender) = request.into_inner().sender {
            debug!(peer = %sender.name, addr = %sender.grpc_addr, "hello");
        }
        Ok(Response::new(answer::hello(&self.ctx.replica)))
    }

    async fn replicate(
        &self,
        request: Request<ReplicateRequest>,
    ) -> Result<Response<ReplicateResponse>, Status> {
        let batch = replicate_batch(&self.ctx.replica, request.into_inner(), None);
        answer_when_durable(&self.ctx.replica, batch)
            .await
            .map(Response::new)
    }

    type ReplicateStreamStream = AnswerStream;

    /// [`ReplicaRpc::replicate`] for every request of the call, answered in
    /// order, with an epoch held until its last request (see
    /// [`Assembly`]). Each request is merged as it is read, on the
    /// call's own task. The call ends when the caller closes it (what is
    /// held of an unfinished epoch is dropped: the caller sends it again),
    /// at the first bad request, or when this node shuts down (graceful
    /// shutdown waits for open calls, and the caller's link would otherwise
    /// keep this one open).
    async fn replicate_stream(
        &self,
        request: Request<tonic::Streaming<ReplicateRequest>>,
    ) -> Result<Response<Self::ReplicateStreamStream>, Status> {
        let replica = self.ctx.replica.clone();
        let stop = self.ctx.stop.clone().cancelled_owned();
        // What the store could take from a peer anyway.
        let cap = replica
            .store
            .limits()
            .max_total_bytes
            .saturating_mul(PEER_HEADROOM);
        let answers = request
            .into_inner()
            .scan(Assembly::new(cap), move |assembly, request| {
                let batch = request.and_then(|r| replicate_batch(&replica, r, Some(assembly)));
                let replica = replica.clone();
                async move { Some(answer_when_durable(&replica, batch).await) }
            })
            .take_until(stop);
        Ok(Response::new(Box::pin(answers)))
    }

    async fn digest(
        &self,
        request: Request<DigestRequest>,
    ) -> Result<Response<DigestResponse>, Status> {
        answer::digest(&self.ctx.replica, request.get_ref()).map(Response::new)
    }

    async fn repair(
        &self,
        request: Request<RepairRequest>,
    ) -> Result<Response<RepairResponse>, Status> {
        answer::repair(&self.ctx.replica, request.into_inner()).map(Response::new)
    }

    type SnapshotStream = ChunkStream;

    /// Streams the whole state in chunks of bounded size. The snapshot is
    /// taken at once (sharing keys and values with the store, not copying
    /// them) and encoded chunk by chunk as the caller reads.
    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let request = request.into_inner();
        let config = &self.ctx.replica.config;
        let chunk_bytes = answer::snapshot_chunk_bytes(&self.ctx.replica, request.max_chunk_bytes)?;
        // A bounded number at once: when many nodes start together they do
        // not all pull from the oldest; the others are sent elsewhere.
        let metrics = self.ctx.replica.metrics.clone();
        let Ok(permit) = self.ctx.snapshots.clone().try_acquire_owned() else {
            metrics.snapshots_refused.inc();
            return Err(Status::resource_exhausted(format!(
                "this node is serving {} snapshots already; pull from another peer",
                config.max_concurrent_snapshots
            )));
        };
        let serving = config.max_concurrent_snapshots - self.ctx.snapshots.available_permits();
        metrics.snapshots_serving.set(serving as i64);
        metrics
            .snapshots_serving_max
            .set(metrics.snapshots_serving_max.get().max(serving as i64));
        let records = self.ctx.replica.store.snapshot();
        if let Some(sender) = &request.sender {
            tracing::info!(peer = %sender.name, entries = records.len(), "serving a snapshot");
        }
        let (chunk_tx, chunk_rx) = tokio::sync::mpsc::channel(2);
        // Ends when the snapshot is sent or the caller goes away.
        let snapshots = self.ctx.snapshots.clone();
        let limit = config.max_concurrent_snapshots;
        self.ctx.tasks.spawn(async move {
            let _permit = permit;
            let _serving = ServingGauge {
                metrics,
                snapshots,
                limit,
            };
            for chunk in answer::Chunks::new(records, chunk_bytes) {
                if chunk_tx.send(Ok(chunk)).await.is_err() {
                    return; // the caller went away
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(chunk_rx))))
    }
}
