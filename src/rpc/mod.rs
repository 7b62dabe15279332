//! The gRPC side of a node: the original `hellorpc.Sync` service with its
//! plain meaning, podcache's `podcache.v1.Replica` additions, the standard
//! health service and server reflection.
//!
//! Owns: turning gRPC messages into store calls and back, and mapping
//! errors to status codes. Must not touch: the merge rule, fan-out (a write
//! received here is never forwarded), membership.

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

use crate::node::{Shared, unix_ms};
use crate::proto::hellorpc::sync_server::{Sync as SyncRpc, SyncServer};
use crate::proto::hellorpc::{SyncData, SyncRequest, SyncResponse};
use crate::proto::podcache::replica_server::{Replica, ReplicaServer};
use crate::proto::podcache::{
    DigestRequest, DigestResponse, HelloRequest, HelloResponse, RepairRequest, RepairResponse,
    ReplicateRequest, ReplicateResponse, SnapshotChunk, SnapshotRequest,
};
use crate::proto::{FILE_DESCRIPTOR_SET, record_from_wire, record_to_wire, wire_size};
use crate::replication::node_info;
use crate::store::StoreError;
use crate::store::digest;

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
    shared: Arc<Shared>,
    listener: TcpListener,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    stop: CancellationToken,
) {
    let max = shared.config.max_grpc_message_bytes;
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
    let incoming = incoming::incoming(shared.clone(), listener, stop.clone());
    let per_connection = shared.config.max_concurrent_rpcs_per_connection;
    let router = Server::builder()
        .concurrency_limit_per_connection(per_connection)
        .max_concurrent_streams(Some(u32::try_from(per_connection).unwrap_or(u32::MAX)))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(health)
        .add_optional_service(reflection)
        .add_service(
            SyncServer::new(SyncService {
                shared: shared.clone(),
            })
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            ReplicaServer::new(ReplicaService { shared })
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
    shared: Arc<Shared>,
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
                        let entry = self.shared.store.get(asked.r#type, &key, now)?;
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
    /// the whole request and nothing changes.
    async fn set(&self, request: Request<SyncRequest>) -> Result<Response<SyncResponse>, Status> {
        let request = request.into_inner();
        let store = &self.shared.store;
        for data in request.data.iter().filter(|d| !d.data.is_empty()) {
            store.check_batch(
                data.data.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                None,
            )?;
        }
        let now = unix_ms();
        let mut answer = Vec::with_capacity(request.data.len());
        for data in request.data {
            if data.data.is_empty() {
                continue;
            }
            let outcome = store.apply_unversioned(
                data.r#type,
                data.data.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                None,
                now,
            )?;
            self.shared.count_remote(&outcome, "set");
            let applied = outcome
                .applied
                .iter()
                .filter_map(|r| Some((r.key().to_owned(), r.entry.value()?.to_owned())))
                .collect();
            self.shared.publish_remote(&outcome.applied);
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
        let store = &self.shared.store;
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
    shared: Arc<Shared>,
}

impl ReplicaService {
    /// A node cut off for longer than the tombstone grace may hold entries
    /// deleted (and purged) elsewhere: it takes no part in anti-entropy
    /// until it has resynced, so it cannot spread them back.
    fn refuse_while_stale(&self) -> Result<(), Status> {
        if self.shared.is_stale(unix_ms()) {
            return Err(Status::failed_precondition(
                "this node was cut off longer than the tombstone grace and is resyncing",
            ));
        }
        Ok(())
    }
}

type ChunkStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<SnapshotChunk, Status>> + Send>>;

type AnswerStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ReplicateResponse, Status>> + Send>>;

/// Merges one fan-out batch from a peer (`Replicate`, `ReplicateStream`).
fn replicate_batch(
    shared: &Shared,
    request: ReplicateRequest,
) -> Result<ReplicateResponse, Status> {
    let Some(sender) = request.sender else {
        return Err(Status::invalid_argument(
            "replicate: the sender must name itself",
        ));
    };
    let records: Vec<_> = request.entries.into_iter().map(record_from_wire).collect();
    debug!(peer = %sender.name, entries = records.len(), "replicate");
    let outcome = shared.apply_remote(records, "replicate");
    Ok(ReplicateResponse {
        applied: outcome.applied.len() as u32,
        stale: outcome.stale as u32,
        rejected: outcome.rejected.len() as u32,
    })
}

#[tonic::async_trait]
impl Replica for ReplicaService {
    async fn hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloResponse>, Status> {
        if let Some(sender) = request.into_inner().sender {
            debug!(peer = %sender.name, addr = %sender.grpc_addr, "hello");
        }
        Ok(Response::new(HelloResponse {
            node: Some(node_info(&self.shared.identity)),
            ready: self.shared.is_ready(),
            stale: self.shared.is_stale(unix_ms()),
        }))
    }

    async fn replicate(
        &self,
        request: Request<ReplicateRequest>,
    ) -> Result<Response<ReplicateResponse>, Status> {
        replicate_batch(&self.shared, request.into_inner()).map(Response::new)
    }

    type ReplicateStreamStream = AnswerStream;

    /// [`Replica::replicate`] for every request of the call, answered in
    /// order. Each batch is merged as it is read, on the call's own task.
    /// The call ends when the caller closes it, at the first bad request,
    /// or when this node shuts down (graceful shutdown waits for open
    /// calls, and the caller's link would otherwise keep this one open).
    async fn replicate_stream(
        &self,
        request: Request<tonic::Streaming<ReplicateRequest>>,
    ) -> Result<Response<Self::ReplicateStreamStream>, Status> {
        let shared = self.shared.clone();
        let stop = self.shared.shutdown.clone().cancelled_owned();
        let answers = request
            .into_inner()
            .map(move |request| replicate_batch(&shared, request?))
            .take_until(stop);
        Ok(Response::new(Box::pin(answers)))
    }

    async fn digest(
        &self,
        request: Request<DigestRequest>,
    ) -> Result<Response<DigestResponse>, Status> {
        let request = request.into_inner();
        if request.sender.is_none() {
            return Err(Status::invalid_argument(
                "digest: the sender must name itself",
            ));
        }
        self.refuse_while_stale()?;
        let buckets = self.shared.store.digest();
        if digest::root(&buckets) == request.root {
            return Ok(Response::new(DigestResponse {
                equal: true,
                buckets: Vec::new(),
            }));
        }
        Ok(Response::new(DigestResponse {
            equal: false,
            buckets,
        }))
    }

    async fn repair(
        &self,
        request: Request<RepairRequest>,
    ) -> Result<Response<RepairResponse>, Status> {
        let request = request.into_inner();
        let Some(sender) = request.sender else {
            return Err(Status::invalid_argument(
                "repair: the sender must name itself",
            ));
        };
        self.refuse_while_stale()?;
        if request.buckets.len() > digest::BUCKETS
            || request
                .buckets
                .iter()
                .any(|b| *b as usize >= digest::BUCKETS)
        {
            return Err(Status::invalid_argument(format!(
                "repair: buckets must be fewer than {} and below it",
                digest::BUCKETS
            )));
        }
        let buckets: std::collections::HashSet<u32> = request.buckets.iter().copied().collect();
        let mut records = Vec::with_capacity(request.entries.len());
        for entry in request.entries {
            let record = record_from_wire(entry);
            // Entries outside the named buckets have no business here.
            if !buckets.contains(&(digest::bucket_of(record.ty, record.key().as_bytes()) as u32)) {
                return Err(Status::invalid_argument(
                    "repair: an entry lies outside the buckets being repaired",
                ));
            }
            records.push(record);
        }
        // What the peer sent (shared with the merge below, not copied).
        let sent = records.clone();
        let theirs: HashMap<(i32, &str), crate::store::Version> = sent
            .iter()
            .map(|r| ((r.ty, r.key()), r.entry.version()))
            .collect();
        let outcome = self.shared.apply_remote(records, "anti_entropy");
        let mine = self.shared.store.bucket_records(&request.buckets);
        let horizon = self.shared.purge_horizon(unix_ms());
        let entries: Vec<_> = mine
            .iter()
            .filter(|r| {
                theirs
                    .get(&(r.ty, r.key()))
                    .is_none_or(|v| *v < r.entry.version())
            })
            .filter(|r| !crate::store::is_purgeable(&r.entry, horizon))
            .map(record_to_wire)
            .collect();
        debug!(peer = %sender.name, sent = entries.len(), applied = outcome.applied.len(), "repair");
        Ok(Response::new(RepairResponse {
            entries,
            applied: outcome.applied.len() as u32,
        }))
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
        let config = &self.shared.config;
        let chunk_bytes = match request.max_chunk_bytes as usize {
            0 => config.snapshot_chunk_bytes,
            asked => asked.clamp(64 * 1024, config.max_grpc_message_bytes / 2),
        };
        let records = self.shared.store.snapshot();
        if let Some(sender) = &request.sender {
            tracing::info!(peer = %sender.name, entries = records.len(), "serving a snapshot");
        }
        let (chunk_tx, chunk_rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let total = records.len() as u64;
            let mut chunk = SnapshotChunk {
                entries: Vec::new(),
                total_entries: total,
            };
            let mut bytes = 0;
            for record in &records {
                bytes += wire_size(record);
                chunk.entries.push(record_to_wire(record));
                if bytes >= chunk_bytes {
                    let full = std::mem::replace(
                        &mut chunk,
                        SnapshotChunk {
                            entries: Vec::new(),
                            total_entries: 0,
                        },
                    );
                    bytes = 0;
                    if chunk_tx.send(Ok(full)).await.is_err() {
                        return; // the caller went away
                    }
                }
            }
            if !chunk.entries.is_empty() || total == 0 {
                let _ = chunk_tx.send(Ok(chunk)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(chunk_rx))))
    }
}
