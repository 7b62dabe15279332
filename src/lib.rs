//! # podcache
//!
//! Keeps a small piece of state — a `map<string,string>` per int32 `type` —
//! identical on every replica of a service running in Kubernetes. A REST
//! write on any replica is applied locally and pushed over gRPC to every
//! other replica; a replica that starts pulls the whole state from the peer
//! that has run longest before it reports ready.
//!
//! # Layout
//! From the bottom up; no module imports one above it.
//! - [`store`]: versioned entries (hybrid clock + node id), the merge rule,
//!   tombstones, TTL, limits. No I/O.
//! - [`identity`], [`config`], [`metrics`], [`proto`], [`tls`]: who the
//!   node is, its settings (read by clap, which config.rs maps onto the
//!   plain types of the modules that use them), its metrics (registry and
//!   rendering), the wire types, mutual TLS.
//! - [`replica`]: what every adapter shares: the store, the change stream,
//!   the change index of fan-out (epochs and a cursor per peer), readiness,
//!   and the one local write path [`replica::Replica::write`].
//! - [`discovery`]: the [`discovery::Discovery`] trait and its backends.
//! - [`replication`]: peer links (a state machine beside the calls),
//!   bootstrap, anti-entropy.
//! - `rpc`: the gRPC services (`hellorpc.Sync`, `podcache.v1.Replica`,
//!   health, reflection). [`api`]: REST, watch, health, metrics, dashboard.
//! - [`node`]: wiring, start-up and shutdown order; [`NodeHandle`] is what
//!   an embedding service holds.
//! - [`client`]: a small REST client (used by `podcache ctl` and the demo).
//!
//! # How a write flows
//! `PUT /v1/cache/1/k` → the REST gate (tokens, and a token's `types=`)
//! → [`replica::Replica::write`]: the reserved type of the schemas is
//! refused and, when type 1 has a JSON Schema ([`replica::schema`]), the
//! value is checked against it; the store stamps a
//! new version and stores it, and under the same lock it goes into the
//! open epoch of the change index → watchers see it → each peer link,
//! woken (its state machine, `replication::link`, says when and which
//! way), seals the epoch its cursor points at and sends it through its
//! transport (`replication::transport::PeerTransport`: tonic in
//! production, a simulated network in the protocol's simulation) with
//! `podcache.v1.Replica/ReplicateStream` (or the original
//! `hellorpc.Sync/Set` to a peer that only knows that) → the peer holds
//! the epoch's requests until its last (`replication::assembly`), applies
//! the whole epoch at once, by version, answers once it is on its disk as
//! its `--fsync` promises, and does not forward it again → the link
//! acknowledges the epoch in the index, which answers `?wait=all`.
//!
//! What fan-out could not deliver (a peer released after the retention,
//! writes of a node that crashed before sending them) anti-entropy
//! repairs: `replication::anti_entropy` compares digests and exchanges the
//! differing buckets through `replication::exchange::StatePeer` (tonic in
//! production, the simulated network in the simulation), and the peer
//! answers with `replication::answer`, merging what it gets through the
//! same remote write path as fan-out. A starting node gets its state the
//! same way (`replication::bootstrap::get_state`): a digest join when it
//! loaded its own from its data directory, else a snapshot of the oldest
//! peer.
//!
//! A conditional write (`If-Match`, `If-None-Match: *`, a batch with
//! expectations) takes one more step first: the replica that took it
//! checks limits and the schema, then hands it to
//! [`replication::decider`], which forwards it over
//! `podcache.v1.Replica/Decide` unless this node is the decider. The
//! decider writes it through the same path, with the expectations checked
//! under the store's lock and its lease fencing the version, and answers
//! once every live peer acknowledged it.
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
pub mod durability;
pub mod etcd;
pub mod http_tls;
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
