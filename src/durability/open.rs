//! Opening a data directory at start: the lock, the `FORMAT` check (and
//! the upgrade of an older format), recovery of what the files hold, and
//! the first log of the new generation.
//!
//! Owns: [`DataDir::open`] and [`DataDir::open_on`], what `FORMAT` may say
//! and which files a directory without one may hold. Must not touch: how
//! the files are read back (`recover.rs` decides the files and cuts torn
//! tails), appends, syncs and compaction once the directory is open (the
//! parent module and `sync_loop.rs`).

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::storage::{self, Storage};
use super::{
    DataDir, DurabilityError, FORMAT, FORMAT_1, FORMAT_2, Fsync, Log, RealFs, Recovered, frame,
    generation_of, io_err, name_of, new_log, recover,
};

impl DataDir {
    /// Opens (creating it if needed) and locks `dir` on the real
    /// filesystem, and recovers what it holds. Progress is logged every few
    /// seconds for a large state.
    pub fn open(
        dir: &Path,
        policy: Fsync,
        compact_log_bytes: u64,
    ) -> Result<(Self, Recovered), DurabilityError> {
        Self::open_on(Arc::new(RealFs::new(dir)), dir, policy, compact_log_bytes)
    }

    /// [`DataDir::open`] on any storage (the simulated disk in tests).
    pub fn open_on(
        storage: Arc<dyn Storage>,
        dir: &Path,
        policy: Fsync,
        compact_log_bytes: u64,
    ) -> Result<(Self, Recovered), DurabilityError> {
        let s = &*storage;
        s.create_dir()
            .map_err(io_err("cannot create", dir.to_owned()))?;
        let lock = match s.lock().map_err(io_err("cannot lock", s.path_of("LOCK")))? {
            Some(lock) => lock,
            None => {
                return Err(DurabilityError::Locked {
                    dir: dir.to_owned(),
                });
            }
        };
        check_format(s, dir)?;
        let found = recover::recover(s, dir)?;
        let name = name_of("log", found.generation);
        let (file, framing) =
            new_log(s, &name).map_err(io_err("cannot create", s.path_of(&name)))?;
        let log_bytes = frame::FILE_HEADER as u64;
        let (synced_tx, _) = watch::channel((0, None));
        let data_dir = Self {
            dir: dir.to_owned(),
            _lock: lock,
            policy,
            log: Mutex::new(Log {
                generation: found.generation,
                file,
                framing,
                retiring: Vec::new(),
                name: name_of("log", found.generation),
                bytes: log_bytes,
                failed: None,
                sync_failed: None,
                latest_need: 0,
                tail_dirty: false,
                buffer: Vec::new(),
            }),
            appended: AtomicU64::new(0),
            synced_tx,
            dirty: Notify::new(),
            snapshot_bytes: AtomicU64::new(found.snapshot_bytes),
            needs: AtomicU64::new(0),
            covered_needs: AtomicU64::new(0),
            startup_need: AtomicU64::new(0),
            compact_log_bytes,
            storage,
        };
        if found.compact || found.replayed_logs {
            data_dir.request_compaction();
        }
        if found.replayed_logs && policy != Fsync::Never {
            let need = data_dir.needs.load(Ordering::Acquire);
            data_dir.startup_need.store(need, Ordering::Release);
        }
        if let Some(ms) = found.save_synced {
            data_dir.save_last_sync(ms).map_err(|e| {
                io_err("cannot write", data_dir.storage.path_of("SYNCED"))(io::Error::other(e))
            })?;
        }
        Ok((data_dir, found.recovered))
    }
}

/// Checks `FORMAT` (writing it in a new directory, upgrading format 1).
fn check_format(s: &dyn Storage, dir: &Path) -> Result<(), DurabilityError> {
    let text =
        storage::read_small(s, "FORMAT").map_err(io_err("cannot read", s.path_of("FORMAT")))?;
    let write = |text: &str| {
        storage::write_atomically(s, "FORMAT", text.as_bytes())
            .map_err(io_err("cannot write", s.path_of("FORMAT")))
    };
    match text.as_deref() {
        Some(t) if t == FORMAT.as_bytes() => Ok(()),
        Some(t) if t == FORMAT_2.as_bytes() => {
            // Its files are read as they are; from now on records may hold
            // batches and history, which format 2 cannot read.
            info!(dir = %dir.display(), "the data directory is in format 2 (an older podcache): reading it and writing format 3 from now on; an older podcache cannot read it afterwards");
            write(FORMAT)
        }
        Some(t) if t == FORMAT_1.as_bytes() => {
            // Format 1's files stay readable (each names its format in its
            // magic); new files are format 2, and the first compaction
            // rewrites the state in it.
            info!(dir = %dir.display(), "the data directory is in format 1 (an older podcache): reading it and writing format 2 from now on; an older podcache cannot read it afterwards");
            write(FORMAT)
        }
        // Written (tmp, fsync, rename) but found empty: a FORMAT of an
        // older podcache that a power cut emptied.
        Some([]) | None => {
            let listing = s.list().map_err(io_err("cannot list", dir.to_owned()))?;
            let ours = |n: &str| {
                n == "LOCK"
                    || n == "FORMAT"
                    || n == "FORMAT.tmp"
                    || generation_of(n.trim_end_matches(".tmp"), "snapshot").is_some()
                    || generation_of(n, "log").is_some()
                    || n.starts_with("SYNCED")
            };
            let foreign: Vec<&String> = listing
                .iter()
                .filter(|n| !(ours(n) || n.as_str() == "lost+found" && s.is_dir(n)))
                .collect();
            if !foreign.is_empty() {
                return Err(DurabilityError::Format {
                    dir: dir.to_owned(),
                    found: format!(
                        "no FORMAT file, but other files ({})",
                        foreign
                            .iter()
                            .take(3)
                            .map(|n| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
            let ours_with_data = listing.iter().any(|n| {
                generation_of(n, "snapshot").is_some() || generation_of(n, "log").is_some()
            });
            if ours_with_data {
                // Only an older podcache wrote FORMAT without syncing it;
                // its files name their own format.
                warn!(dir = %dir.display(), "the data directory's FORMAT file is missing or empty next to its files (lost in a power cut); writing it again");
            }
            write(FORMAT)
        }
        Some(t) => Err(DurabilityError::Format {
            dir: dir.to_owned(),
            found: String::from_utf8_lossy(t).trim().chars().take(80).collect(),
        }),
    }
}
