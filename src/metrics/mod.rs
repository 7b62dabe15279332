//! The node's Prometheus metrics.
//!
//! Owns: metric handles and their registry, and rendering them (with the
//! gauges computed from state at each scrape, `scrape.rs`). One [`Metrics`]
//! per node, never a global, so several nodes in one process (tests, the
//! demo) stay apart. Must not touch: any other module of the crate (the
//! state a scrape reads is passed in, as a [`StateReading`]).

mod format;
mod scrape;

pub use format::{Format, to_prometheus_text};
pub use scrape::{PeerBacklog, StateReading, TypeSizes};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// Handles of `podcache_requests_total` per operation, taken once so the
/// request path does not build a label set for every request.
#[derive(Debug, Clone, Default)]
pub struct OpCounters {
    /// `op="get"`.
    pub get: Counter,
    /// `op="set"`.
    pub set: Counter,
    /// `op="delete"`.
    pub delete: Counter,
    /// `op="batch"`.
    pub batch: Counter,
    /// `op="list"`.
    pub list: Counter,
    /// `op="watch"`.
    pub watch: Counter,
    /// `op="conditional"`: conditional writes decided (also counted under
    /// their own op).
    pub conditional: Counter,
}

/// Every metric of one node.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Per-operation handles into `requests`.
    pub ops: OpCounters,
    /// REST and library operations by `op` (get, set, delete, batch, list).
    pub requests: Family<Labels, Counter>,
    /// Requests refused by validation, by `reason`.
    pub rejected: Family<Labels, Counter>,
    /// Entries applied from peers, by `source` (replicate, set, bootstrap).
    pub remote_applied: Family<Labels, Counter>,
    /// Entries from peers that were older than what was held.
    pub remote_stale: Counter,
    /// Entries from peers refused by a limit or the clock-skew check.
    pub remote_rejected: Family<Labels, Counter>,
    /// Fan-out batches delivered, per peer.
    pub batches_sent: Family<Labels, Counter>,
    /// Epochs delivered per peer (each in one request or more).
    pub epochs_sent: Family<Labels, Counter>,
    /// Fan-out attempts that failed (and were retried), per peer.
    pub batches_failed: Family<Labels, Counter>,
    /// Entries dropped because a peer's queue was full or the peer left.
    pub entries_dropped: Family<Labels, Counter>,
    /// Writes waiting in each peer's queue.
    pub pending_entries: Family<Labels, Gauge>,
    /// Bytes of keys and values waiting for each peer.
    pub pending_bytes: Family<Labels, Gauge>,
    /// Epochs from a peer too large to hold back until their end, merged in
    /// parts.
    pub epochs_split: Counter,
    /// Namespaces (types) held.
    pub types: Gauge,
    /// Snapshots being served to peers now.
    pub snapshots_serving: Gauge,
    /// The most snapshots served at once since start.
    pub snapshots_serving_max: Gauge,
    /// Snapshot requests refused because the bound was reached.
    pub snapshots_refused: Counter,
    /// Entries from peers applied while the data directory could not be
    /// written (the snapshot that clears the failure writes them).
    pub data_dir_unlogged: Counter,
    /// Snapshots written by compaction (or after a disk failure).
    pub data_dir_compactions: Counter,
    /// Live entries per namespace (`type`).
    pub entries: Family<Labels, Gauge>,
    /// Bytes of keys and values per namespace (`type`).
    pub bytes: Family<Labels, Gauge>,
    /// Known peers.
    pub peers: Gauge,
    /// 1 once the node is ready.
    pub ready: Gauge,
    /// Duration of the bootstrap pull.
    pub bootstrap_seconds: Histogram,
    /// Entries received by the bootstrap pull.
    pub bootstrap_entries: Counter,
    /// Delivery time of fan-out batches to peers.
    pub replication_seconds: Histogram,
    /// 1 while discovery cannot reach its source and serves the last
    /// membership it knew.
    pub discovery_stale: Gauge,
    /// Failed attempts to read or follow the discovery source.
    pub discovery_errors: Counter,
    /// Membership changes seen by discovery (pods added, changed, removed).
    pub discovery_events: Counter,
    /// Stored values discovery skipped, by `reason` (encrypted, undecodable).
    pub discovery_skipped: Family<Labels, Counter>,
    /// Times discovery listed the source again, by `reason` (compacted,
    /// outdated, error).
    pub discovery_relists: Family<Labels, Counter>,
    /// Anti-entropy exchanges with one peer, by `result` (equal, repaired,
    /// failed, skipped).
    pub anti_entropy_rounds: Family<Labels, Counter>,
    /// Entries changed by anti-entropy, here and at peers.
    pub anti_entropy_repaired: Counter,
    /// Full resyncs after being cut off longer than the tombstone grace.
    pub full_resyncs: Counter,
    /// Tombstones and expired entries held, per namespace (`type`).
    pub tombstones: Family<Labels, Gauge>,
    /// Time from a write's acceptance on its origin node (its version's wall
    /// clock) to its application here; assumes synchronised clocks.
    pub replication_lag: Histogram,
    /// Entries received so far by a bootstrap in progress.
    pub bootstrap_progress_entries: Gauge,
    /// Entries the bootstrap source announced in all.
    pub bootstrap_total_entries: Gauge,
    /// Bytes of keys and values held.
    pub held_bytes: Gauge,
    /// The configured limit on held bytes.
    pub capacity_bytes: Gauge,
    /// Superseded versions kept as history.
    pub history_versions: Gauge,
    /// What the kept versions are counted as (`--history-max-bytes`).
    pub history_bytes: Gauge,
    /// JSON Schema versions compiled to check writes (at most one per
    /// schema version and replica).
    pub schema_compiles: Counter,
    /// REST requests refused for missing or wrong credentials, by reason.
    pub auth_failures: Family<Labels, Counter>,
    /// Requests turned away because a concurrency limit was reached, by
    /// what (requests, watches).
    pub overloaded: Family<Labels, Counter>,
    /// Connections closed on arrival, by listener and reason (cap: past
    /// the connection cap; silent: sent nothing in time; tls: handshake
    /// failed or timed out).
    pub connections_refused: Family<Labels, Counter>,
    /// Reloads of secret files (token file, certificates) after they
    /// changed, by file and result.
    pub secret_reloads: Family<Labels, Counter>,
}

impl Metrics {
    /// A fresh set of metrics with its own registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("podcache");
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "requests",
            "Cache operations served, by op",
            requests.clone(),
        );
        let rejected = Family::<Labels, Counter>::default();
        registry.register(
            "rejected_requests",
            "Requests refused by validation, by reason",
            rejected.clone(),
        );
        let remote_applied = Family::<Labels, Counter>::default();
        registry.register(
            "remote_applied_entries",
            "Entries from peers that changed this node's state, by source",
            remote_applied.clone(),
        );
        let remote_stale = Counter::default();
        registry.register(
            "remote_stale_entries",
            "Entries from peers no newer than what this node held",
            remote_stale.clone(),
        );
        let remote_rejected = Family::<Labels, Counter>::default();
        registry.register(
            "remote_rejected_entries",
            "Entries from peers refused by a limit or the clock-skew check, by reason",
            remote_rejected.clone(),
        );
        let batches_sent = Family::<Labels, Counter>::default();
        registry.register(
            "replication_batches_sent",
            "Fan-out batches delivered, per peer",
            batches_sent.clone(),
        );
        let epochs_sent = Family::<Labels, Counter>::default();
        registry.register(
            "replication_epochs_sent",
            "Epochs of this node's writes delivered to each peer (one request or several each)",
            epochs_sent.clone(),
        );
        let batches_failed = Family::<Labels, Counter>::default();
        registry.register(
            "replication_batches_failed",
            "Fan-out attempts that failed and were retried, per peer",
            batches_failed.clone(),
        );
        let entries_dropped = Family::<Labels, Counter>::default();
        registry.register(
            "replication_entries_dropped",
            "Entries not delivered to a peer, by peer and reason",
            entries_dropped.clone(),
        );
        let pending_entries = Family::<Labels, Gauge>::default();
        registry.register(
            "replication_pending_entries",
            "Entries of this node's writes waiting for each peer (a key counts once per epoch it is in)",
            pending_entries.clone(),
        );
        let pending_bytes = Family::<Labels, Gauge>::default();
        registry.register(
            "replication_pending_bytes",
            "Bytes of keys and values of this node's writes waiting for each peer",
            pending_bytes.clone(),
        );
        let snapshots_serving = Gauge::default();
        registry.register(
            "snapshots_serving",
            "Snapshots being served to peers now (bootstrap or full resync)",
            snapshots_serving.clone(),
        );
        let snapshots_serving_max = Gauge::default();
        registry.register(
            "snapshots_serving_max",
            "The most snapshots served at once since start",
            snapshots_serving_max.clone(),
        );
        let snapshots_refused = Counter::default();
        registry.register(
            "snapshots_refused",
            "Snapshot requests refused because --max-concurrent-snapshots were being served",
            snapshots_refused.clone(),
        );
        let types = Gauge::default();
        registry.register(
            "types",
            "Namespaces (types) held; per-type series exist for the 50 largest, the rest are summed as type=\"other\"",
            types.clone(),
        );
        let data_dir_unlogged = Counter::default();
        registry.register(
            "data_dir_unlogged_entries",
            "Entries from peers applied while the data directory could not be written (written by the snapshot that clears the failure)",
            data_dir_unlogged.clone(),
        );
        let data_dir_compactions = Counter::default();
        registry.register(
            "data_dir_compactions",
            "Snapshots the data directory wrote (compaction, or after a disk failure)",
            data_dir_compactions.clone(),
        );
        let epochs_split = Counter::default();
        registry.register(
            "replication_epochs_split",
            "Epochs from a peer too large to hold back until their last request, merged in parts",
            epochs_split.clone(),
        );
        let entries = Family::<Labels, Gauge>::default();
        registry.register("entries", "Live entries per namespace", entries.clone());
        let bytes = Family::<Labels, Gauge>::default();
        registry.register(
            "entry_bytes",
            "Bytes of keys and values per namespace",
            bytes.clone(),
        );
        let peers = Gauge::default();
        registry.register("peers", "Peers known from discovery", peers.clone());
        let ready = Gauge::default();
        registry.register("ready", "1 once the bootstrap pull is done", ready.clone());
        let bootstrap_seconds = Histogram::new([0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0]);
        registry.register(
            "bootstrap_duration_seconds",
            "Time taken by the bootstrap pull",
            bootstrap_seconds.clone(),
        );
        let bootstrap_entries = Counter::default();
        registry.register(
            "bootstrap_entries",
            "Entries received by the bootstrap pull",
            bootstrap_entries.clone(),
        );
        let replication_seconds =
            Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0]);
        registry.register(
            "replication_batch_duration_seconds",
            "Time to deliver one fan-out batch to a peer",
            replication_seconds.clone(),
        );
        let discovery_stale = Gauge::default();
        registry.register(
            "discovery_stale",
            "1 while discovery cannot reach its source and keeps the last membership",
            discovery_stale.clone(),
        );
        let discovery_errors = Counter::default();
        registry.register(
            "discovery_errors",
            "Failed attempts to read or follow the discovery source",
            discovery_errors.clone(),
        );
        let discovery_events = Counter::default();
        registry.register(
            "discovery_events",
            "Membership changes seen by discovery",
            discovery_events.clone(),
        );
        let discovery_skipped = Family::<Labels, Counter>::default();
        registry.register(
            "discovery_skipped_values",
            "Stored values discovery skipped, by reason",
            discovery_skipped.clone(),
        );
        let discovery_relists = Family::<Labels, Counter>::default();
        registry.register(
            "discovery_relists",
            "Times discovery listed its source again, by reason",
            discovery_relists.clone(),
        );
        let anti_entropy_rounds = Family::<Labels, Counter>::default();
        registry.register(
            "anti_entropy_rounds",
            "Anti-entropy exchanges with one peer, by result",
            anti_entropy_rounds.clone(),
        );
        let anti_entropy_repaired = Counter::default();
        registry.register(
            "anti_entropy_repaired_entries",
            "Entries changed by anti-entropy, here and at peers",
            anti_entropy_repaired.clone(),
        );
        let full_resyncs = Counter::default();
        registry.register(
            "full_resyncs",
            "Full resyncs after being cut off longer than the tombstone grace",
            full_resyncs.clone(),
        );
        let tombstones = Family::<Labels, Gauge>::default();
        registry.register(
            "tombstones",
            "Tombstones and expired entries held for replication, per namespace",
            tombstones.clone(),
        );
        let op = |name: &str| requests.get_or_create(&label("op", name)).clone();
        let ops = OpCounters {
            get: op("get"),
            set: op("set"),
            delete: op("delete"),
            batch: op("batch"),
            conditional: op("conditional"),
            list: op("list"),
            watch: op("watch"),
        };
        let replication_lag = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
        ]);
        registry.register(
            "replication_lag_seconds",
            "Time from a write's acceptance on its origin to its application here, from its version",
            replication_lag.clone(),
        );
        let bootstrap_progress_entries = Gauge::default();
        registry.register(
            "bootstrap_progress_entries",
            "Entries received so far by the bootstrap pull",
            bootstrap_progress_entries.clone(),
        );
        let bootstrap_total_entries = Gauge::default();
        registry.register(
            "bootstrap_total_entries",
            "Entries the bootstrap source announced in all",
            bootstrap_total_entries.clone(),
        );
        let held_bytes = Gauge::default();
        registry.register(
            "store_held_bytes",
            "Bytes of keys and values held, tombstones' keys included",
            held_bytes.clone(),
        );
        let capacity_bytes = Gauge::default();
        registry.register(
            "store_capacity_bytes",
            "The limit on held bytes (--max-memory-bytes); local writes past it get 507",
            capacity_bytes.clone(),
        );
        let history_versions = Gauge::default();
        registry.register(
            "history_versions",
            "Superseded versions kept as history (GET .../history, rollback)",
            history_versions.clone(),
        );
        let history_bytes = Gauge::default();
        registry.register(
            "history_bytes",
            "Bytes the kept versions are counted as against --history-max-bytes (keys, values, 96 per version)",
            history_bytes.clone(),
        );
        let schema_compiles = Counter::default();
        registry.register(
            "schema_compiles",
            "JSON Schema versions this node compiled to check writes (once per version)",
            schema_compiles.clone(),
        );
        let auth_failures = Family::<Labels, Counter>::default();
        registry.register(
            "auth_failures",
            "REST requests refused for missing or wrong credentials, by reason",
            auth_failures.clone(),
        );
        let overloaded = Family::<Labels, Counter>::default();
        registry.register(
            "overloaded",
            "Requests turned away at a concurrency limit, by what",
            overloaded.clone(),
        );
        let connections_refused = Family::<Labels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed on arrival, by listener and reason (cap, silent, tls)",
            connections_refused.clone(),
        );
        let secret_reloads = Family::<Labels, Counter>::default();
        registry.register(
            "secret_reloads",
            "Reloads of the token file or the replica certificates after they changed, by file and result",
            secret_reloads.clone(),
        );
        Self {
            registry,
            held_bytes,
            capacity_bytes,
            history_versions,
            history_bytes,
            schema_compiles,
            auth_failures,
            overloaded,
            connections_refused,
            secret_reloads,
            replication_lag,
            bootstrap_progress_entries,
            bootstrap_total_entries,
            ops,
            anti_entropy_rounds,
            anti_entropy_repaired,
            full_resyncs,
            tombstones,
            discovery_relists,
            discovery_stale,
            discovery_errors,
            discovery_events,
            discovery_skipped,
            requests,
            rejected,
            remote_applied,
            remote_stale,
            remote_rejected,
            batches_sent,
            epochs_sent,
            batches_failed,
            entries_dropped,
            pending_entries,
            pending_bytes,
            epochs_split,
            types,
            snapshots_serving,
            snapshots_serving_max,
            snapshots_refused,
            data_dir_unlogged,
            data_dir_compactions,
            entries,
            bytes,
            peers,
            ready,
            bootstrap_seconds,
            bootstrap_entries,
            replication_seconds,
        }
    }

    /// The registry in OpenMetrics text format ([`to_prometheus_text`]
    /// gives the classic Prometheus format).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The labels of [`Metrics::connections_refused`].
pub fn refused_label(listener: &'static str, reason: &'static str) -> Labels {
    vec![("listener", listener.into()), ("reason", reason.into())]
}

/// The labels of [`Metrics::secret_reloads`].
pub fn reload_label(file: &'static str, result: &'static str) -> Labels {
    vec![("file", file.into()), ("result", result.into())]
}

/// A label set of one label.
pub fn label(name: &'static str, value: impl Into<String>) -> Labels {
    vec![(name, value.into())]
}
