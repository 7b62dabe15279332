//! # podcache
//!
//! Keeps a small piece of state — a `map<string,string>` per int32 `type` —
//! identical on every replica of a service running in Kubernetes. A REST
//! write on any replica is applied locally and pushed over gRPC to every
//! other replica; a replica that starts pulls the whole state from the peer
//! that has run longest before it reports ready.
//!
//! # Layout
//! - [`store`]: versioned entries (hybrid clock + node id), the merge rule,
//!   tombstones, TTL, limits. No I/O.
//! - [`discovery`]: the [`discovery::Discovery`] trait and its backends.
//! - [`replication`]: peer links, fan-out queues, `?wait=all`, bootstrap.
//! - `rpc`: the gRPC services (`hellorpc.Sync`, `podcache.v1.Replica`,
//!   health, reflection).
//! - [`api`]: the REST API, health, readiness, metrics.
//! - [`node`]: wiring, start-up and shutdown order; [`NodeHandle`] is what
//!   an embedding service holds.
//! - [`client`]: a small REST client (used by `podcache ctl` and the demo).
//!
//! # How a write flows
//! `PUT /v1/cache/1/k` → the store stamps a new version and stores it → a
//! change event goes to watchers → the record is queued on every peer link →
//! each link sends batches with `podcache.v1.Replica/Replicate` (or the
//! original `hellorpc.Sync/Set` to a peer that only knows that) → the peer
//! merges by version and does not forward it again.
//!
//! # Embedding
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use podcache::{NodeBuilder, NodeConfig, discovery::StaticList};
//! let config = NodeConfig::new("hello-web-0", "10.1.0.7".parse()?);
//! let node = NodeBuilder::new(config)
//!     .discovery(StaticList::new(["10.1.0.8:9090"]))
//!     .start()
//!     .await?;
//! node.wait_ready().await;
//! node.set(0, "cluster.leader", "10.1.0.7", None).await?;
//! assert_eq!(node.get(0, "cluster.leader").as_deref(), Some("10.1.0.7"));
//! node.shutdown().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod config;
pub mod conn_limit;
pub mod discovery;
pub mod etcd;
pub mod identity;
pub mod metrics;
pub mod node;
pub mod proto;
pub mod reload;
pub mod replica;
pub mod replication;
mod rpc;
pub mod store;
pub mod tls;
pub mod units;

pub use config::NodeConfig;
pub use node::{NodeBuilder, NodeHandle};
