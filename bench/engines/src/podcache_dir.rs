//! podcache's own log, driven two ways:
//! - through an in-process node (`NodeBuilder`, no peers, no REST): the
//!   real write path, whose background loop does the group-commit
//!   `fsync`, the once-a-second `fsync` and compaction. Outside the
//!   crate this is the only way to get them: `DataDir`'s sync and
//!   snapshot methods and `durability_loop` are private to podcache.
//! - `DataDir` alone: `open` (recovery) for the restart, and `append`
//!   for the log's own cost with nothing synced.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use podcache::durability::{DataDir, Fsync};
use podcache::store::{Change, Record, Version};
use podcache::{NodeBuilder, NodeConfig, NodeHandle};

use crate::workload::{self, Map};

/// The compaction threshold podcache uses by default
/// (`--compact-log-bytes`, 64 MiB).
pub const COMPACT_LOG_BYTES: u64 = 64 << 20;

/// Starts a node on loopback with its data directory in `dir`, and waits
/// until it is ready (recovery done).
pub async fn start_node(dir: &Path, fsync: Fsync) -> Result<NodeHandle> {
    let mut config = NodeConfig::new("bench-engines", "127.0.0.1".parse()?);
    config.http_addr = "127.0.0.1:0".parse()?;
    config.grpc_addr = "127.0.0.1:0".parse()?;
    config.data_dir = Some(dir.to_owned());
    config.fsync = fsync;
    config.compact_log_bytes = COMPACT_LOG_BYTES;
    let node = NodeBuilder::new(config)
        .without_http()
        .start()
        .await
        .context("podcache node start")?;
    node.wait_ready().await;
    Ok(node)
}

/// Shuts a node down and waits until its data directory's lock is free
/// again (the last owner of the directory is a background task).
pub async fn stop_node(node: NodeHandle, dir: &Path) -> Result<()> {
    node.shutdown().await;
    let lock = std::fs::File::open(dir.join("LOCK")).context("open LOCK")?;
    for _ in 0..400 {
        match lock.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) => {
                tokio::time::sleep(Duration::from_millis(25)).await
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
    }
    anyhow::bail!("the data directory stayed locked after shutdown")
}

/// Writes entries `0..n` of `round` through the node, `batch` per write.
pub async fn load(node: &NodeHandle, n: u64, round: u64, batch: u64) -> Result<()> {
    let mut start = 0;
    while start < n {
        let end = (start + batch).min(n);
        let owned: Vec<(String, String)> = (start..end)
            .map(|i| (workload::key(i), workload::value(i, round)))
            .collect();
        let pairs: Vec<(&str, &str)> = owned
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let change = Change::Batch {
            ty: workload::TYPE,
            entries: &pairs,
            ttl_secs: None,
        };
        node.write(change, false).await?;
        start = end;
    }
    Ok(())
}

/// Opens the directory (recovery: the newest snapshot and every log
/// after it) and merges every record into a map.
pub fn read_all(dir: &Path) -> Result<Map> {
    let (data, recovered) = DataDir::open(dir, Fsync::Never, COMPACT_LOG_BYTES)?;
    let mut map = Map::new();
    for record in recovered.records {
        workload::merge(&mut map, record.ty, record.entry);
    }
    drop(data);
    Ok(map)
}

/// One single-entry append to a `DataDir` with no background loop: the
/// log's cost alone (nothing is ever synced).
pub fn append_one(data: &Arc<DataDir>, i: u64, hlc: u64) -> Result<()> {
    let key = workload::key(i);
    let value = workload::value(i, 1);
    let record = Record::new(
        workload::TYPE,
        &key,
        Some(&value),
        Version { hlc, node: 1 },
        0,
    );
    data.append(&[record])?;
    Ok(())
}
