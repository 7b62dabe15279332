//! Getting what was appended onto the disk: `fsync` by the policy, the
//! waiters of `always`, and the background loop of a data directory
//! ([`durability_loop`]: syncs, compactions beside it, the time of the
//! last full sync saved once what it covers is on disk).
//!
//! Owns: when the log is synced, what counts as synced (nothing after a
//! failed `fsync` until a snapshot clears it, nothing before the snapshot
//! of what was loaded at start), the loop's shutdown. Must not touch: how
//! records are framed and appended, how a snapshot is written (the parent
//! module; the loop only starts compactions), the replica's state (the
//! loop gets it through the closures it is given).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{info, warn};

use super::{DataDir, DiskError, Fsync};
use crate::store::Record;

impl DataDir {
    /// Resolves once everything up to `lsn` is on disk (`Fsync::Always`;
    /// at once for the other policies), or with the error of the `fsync`
    /// that failed meanwhile.
    pub async fn durable(&self, lsn: u64) -> Result<(), DiskError> {
        if self.policy != Fsync::Always {
            return Ok(());
        }
        let mut rx = self.synced_tx.subscribe();
        let settled = rx
            .wait_for(|(synced, error)| *synced >= lsn || error.is_some())
            .await;
        match settled {
            Ok(state) => settle(&state, lsn),
            Err(_) => Err(DiskError::Failed("the data directory was closed".into())),
        }
    }

    /// What [`DataDir::durable`] would answer now for `lsn`: `None` while
    /// it would wait (for the power-loss search, which syncs by hand).
    pub fn durable_now(&self, lsn: u64) -> Option<Result<(), DiskError>> {
        let state = self.synced_tx.borrow();
        (state.0 >= lsn || state.1.is_some()).then(|| settle(&state, lsn))
    }

    /// Syncs the current log and the retired ones to disk (blocking: run
    /// it off the runtime). A failure is kept (see the module comment).
    pub fn sync(&self) -> Result<(), DiskError> {
        let (retiring, file, upto) = {
            let log = self.log();
            if let Some(error) = &self.synced_tx.borrow().1 {
                // What the failed fsync covered may be gone: syncing again
                // would report a success that proves nothing.
                return Err(error.clone());
            }
            (
                log.retiring.clone(),
                log.file.clone(),
                self.appended.load(Ordering::Acquire),
            )
        };
        let synced = retiring
            .iter()
            .chain(std::iter::once(&file))
            .try_for_each(|f| f.sync());
        if let Err(error) = synced {
            let error = DiskError::of(&error);
            warn!(%error, "fsync of the data directory failed; writes are refused until a snapshot of the whole state is written");
            let mut log = self.log();
            let need = self.need_locked(&mut log);
            Self::fail_locked(&mut log, error.clone(), Some(need));
            log.sync_failed = Some(need);
            self.synced_tx.send_modify(|s| s.1 = Some(error.clone()));
            return Err(error);
        }
        let mut log = self.log();
        if !retiring.is_empty() {
            log.retiring
                .retain(|r| !retiring.iter().any(|done| Arc::ptr_eq(r, done)));
        }
        // Under the log lock, as a failure is set: a failure that came
        // meanwhile is not covered up. Before the snapshot of what was
        // loaded at start, nothing counts (see `startup_need`).
        if self.covered_needs.load(Ordering::Acquire) < self.startup_need.load(Ordering::Acquire) {
            return Ok(());
        }
        self.synced_tx.send_if_modified(|s| {
            if s.1.is_some() || s.0 >= upto {
                return false;
            }
            s.0 = upto;
            true
        });
        Ok(())
    }

    /// True when older logs still wait for a sync.
    pub(super) fn retiring(&self) -> bool {
        !self.log().retiring.is_empty()
    }

    /// Where the disk must get to before the time of a full sync that
    /// ended now may be saved: what was appended, and the snapshots asked
    /// for (a full resync's drops are written by one).
    fn sync_point(&self) -> (u64, u64) {
        (self.appended(), self.needs.load(Ordering::Acquire))
    }

    /// True when the disk holds everything up to `point` (appends synced,
    /// or the policy never syncs; the snapshots asked for written).
    fn reached(&self, point: (u64, u64)) -> bool {
        (self.policy == Fsync::Never || self.synced_tx.borrow().0 >= point.0)
            && self.covered_needs.load(Ordering::Acquire) >= point.1
    }
}

fn settle(state: &(u64, Option<DiskError>), lsn: u64) -> Result<(), DiskError> {
    if state.0 >= lsn {
        return Ok(());
    }
    Err(state
        .1
        .clone()
        .unwrap_or_else(|| DiskError::Failed("fsync failed".into())))
}

/// The background work of a data directory, until `cancel` fires: `fsync`
/// by the policy (at once when a write waits, with `always`; every second
/// with `interval`), compaction when the log has grown or was asked for,
/// the time of the last full sync saved once what it covers is on disk,
/// and after an I/O error a snapshot of the whole state as soon as the
/// disk takes it (writes resume then).
pub(crate) async fn durability_loop(
    data: Arc<DataDir>,
    metrics: Arc<crate::metrics::Metrics>,
    snapshot: impl Fn() -> (Vec<Record>, Vec<Record>) + Send + Sync + 'static,
    last_sync: impl Fn() -> u64 + Send + Sync + 'static,
    cancel: tokio_util::sync::CancellationToken,
) {
    let snapshot = Arc::new(snapshot);
    let mut last_saved_sync = 0;
    // A sync time waiting for what was appended before it to be on disk.
    let mut pending_sync: Option<(u64, (u64, u64))> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A compaction runs beside the loop, so that with `always` a write
    // waits for an fsync, never for a whole snapshot to be written.
    let mut compaction: Option<tokio::task::JoinHandle<Result<u64, DiskError>>> = None;
    loop {
        let woken_by_write = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = data.dirty.notified(), if data.policy == Fsync::Always => true,
            result = finished(&mut compaction) => {
                compaction = None;
                match result {
                    Ok(Ok(bytes)) => {
                        metrics.data_dir_compactions.inc();
                        info!(bytes, "data directory compacted");
                    }
                    Ok(Err(error)) => {
                        warn!(%error, "compaction of the data directory failed; retrying")
                    }
                    Err(_) => {}
                }
                continue;
            }
            _ = tick.tick() => false,
        };
        let wants_sync = match data.policy {
            Fsync::Always => true,
            Fsync::Interval => !woken_by_write,
            Fsync::Never => false,
        };
        // A retired log is synced even with nothing new appended: until
        // then it stays open, its space held after compaction removed it.
        if wants_sync && (data.synced_tx.borrow().0 < data.appended() || data.retiring()) {
            let d = data.clone();
            let _ = tokio::task::spawn_blocking(move || d.sync()).await;
        }
        if woken_by_write {
            continue;
        }
        data.retry_after_failure();
        if compaction.is_none() && data.wants_compaction() {
            let (d, snapshot) = (data.clone(), snapshot.clone());
            compaction = Some(tokio::task::spawn_blocking(move || {
                d.compact_with_history(|| snapshot())
            }));
        }
        let now_sync = last_sync();
        if now_sync != last_saved_sync && pending_sync.is_none() {
            // Saved only once the changes that sync made are on disk (its
            // drops by a snapshot): a SYNCED that outlives them after a
            // power cut would call stale state fresh.
            pending_sync = Some((now_sync, data.sync_point()));
        }
        if let Some((ms, point)) = pending_sync
            && data.reached(point)
        {
            let d = data.clone();
            let saved = tokio::task::spawn_blocking(move || d.save_last_sync(ms)).await;
            if let Ok(Ok(())) = saved {
                last_saved_sync = ms;
                pending_sync = None;
            }
        }
    }
    // Shutdown: what was appended goes to disk, whatever the policy but
    // `never`, first (the node's shutdown gives its tasks a deadline, and a
    // compaction can outlast it); then a compaction under way finishes
    // (its files are complete or absent either way) and what came during
    // it is synced too.
    let final_sync = || async {
        if data.policy != Fsync::Never {
            let d = data.clone();
            let _ = tokio::task::spawn_blocking(move || d.sync()).await;
        }
    };
    final_sync().await;
    if let Some(running) = compaction {
        let _ = running.await;
        final_sync().await;
    }
}

/// The result of the compaction in `running`, once it ends; never, while
/// none runs.
async fn finished<T>(
    running: &mut Option<tokio::task::JoinHandle<T>>,
) -> Result<T, tokio::task::JoinError> {
    match running {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}
