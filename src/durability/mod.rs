//! The data directory (`--data-dir`): what makes a node's state survive a
//! restart of the whole cluster, a power cut and a failing disk.
//!
//! Owns: the files, their locking, format and framing (`frame`), the
//! append of every change, `fsync` and the background loop
//! (`sync_loop.rs`), compaction, and opening with recovery (`open.rs`:
//! lock, `FORMAT`, the first log; `recover.rs`: reading the files back).
//! Must not touch: the store's merge rule, the network.
//! Every file operation goes through [`Storage`]: the real filesystem in
//! production ([`RealFs`]), a simulated disk that loses what was never
//! synced in the power-loss search (`sim`, tests/power_loss.rs). The
//! replica calls [`DataDir::append`] inside its store lock for every
//! change it applies (local writes before applying them, so a refused
//! append changes nothing; merges from peers right after), and runs
//! `durability_loop` for the background work.
//!
//! # Files
//! - `FORMAT`: `podcache data directory, format 3`. Format 3 frames
//!   records as format 2 did; its records may hold a whole batch
//!   (`batch_entries`) or a kept version (`history`), which a podcache of
//!   format 2 would misread (it would load a batch's first entry only, and
//!   a kept version as current), so it must refuse the directory. Formats
//!   1 and 2 (older podcaches) are read and upgraded in place; another format, or a
//!   directory holding other files than a volume's `lost+found` but no
//!   `FORMAT`, is refused.
//! - `LOCK`: held with an exclusive lock while a node uses the directory.
//! - `snapshot-<gen>`: the whole state when generation `gen` began,
//!   written to `snapshot-<gen>.tmp`, synced, then renamed, so a
//!   snapshot without `.tmp` is complete.
//! - `log-<gen>`: every change applied since generation `gen` began; its
//!   header is synced, with its name, before anything is appended.
//! - `SYNCED`: when the node last completed a full sync with a peer.
//!   `FORMAT` and `SYNCED` are written whole (tmp, fsync, rename, fsync of
//!   the directory).
//!
//! Recovery loads the newest snapshot and replays every log of that
//! generation or later, merging by version (so order and duplicates do not
//! matter), and only then drops what is past the tombstone grace (the
//! replica's load), so an old value never outlives the tombstone that
//! replaced it. A record cut short at the end of a log is a torn tail (a
//! log retired by a compaction is synced after the newer one has taken
//! appends, so either can end torn): cut off, with one warning naming the
//! file and offset. Any other damage refuses the start with a message
//! saying what to do: there is no way to tell what a damaged record held,
//! and a node that starts without it would serve a state that silently
//! lost writes.
//!
//! # Failures
//! A failed append is cut back off and refuses appends until the disk
//! takes them again. A failed `fsync` is final for what it covered: the
//! kernel may have dropped those pages and report the next `fsync` as a
//! success, so the error stays (writes are refused, `always` waiters get
//! it) until a snapshot whose state was taken after the failure is on
//! disk.
//!
//! # Why a log and snapshots
//! The state already lives in memory; the disk only has to bring it back.
//! An append per change and a periodic snapshot (as Redis's AOF with its
//! rewrite) write each change once, sequentially, and load in one pass;
//! an embedded database (fjall, redb) would keep a second index of the
//! same entries on disk and pay for its updates. bench/NOTES.md has the
//! figures.

pub(crate) mod frame;
mod open;
mod recover;
#[cfg(any(test, feature = "testsuite"))]
pub mod sim;
pub mod storage;
mod sync_loop;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, watch};
use tracing::{info, warn};

pub use storage::{RealFs, Storage, StorageFile};
pub(crate) use sync_loop::durability_loop;

use crate::store::Record;

/// `records` cut into the records they are written as: each batch's
/// entries next to each other together (a batch is one record, so a power
/// cut keeps all of it or none), every other entry on its own. A batch
/// too large for one record (past a quarter of the frame cap) is cut into
/// several: the request body limit keeps batches far below that.
fn changes(records: &[Record]) -> impl Iterator<Item = &[Record]> {
    records
        .chunk_by(|a, b| {
            a.entry.in_batch()
                && b.entry.in_batch()
                && a.ty == b.ty
                && a.entry.version() == b.entry.version()
        })
        .flat_map(|group| {
            let mut parts = Vec::new();
            let mut rest = group;
            while !rest.is_empty() {
                let mut bytes = 0;
                let cut = rest
                    .iter()
                    .position(|r| {
                        bytes += crate::proto::wire_size(r);
                        bytes > frame::MAX_PAYLOAD / 4
                    })
                    .unwrap_or(rest.len())
                    .max(1);
                let (part, after) = rest.split_at(cut);
                parts.push(part);
                rest = after;
            }
            parts
        })
}

/// The record decoding of the data directory's files, for the fuzz
/// targets: the records read from `bytes` (after a file's header, in
/// either format) and how they end.
#[cfg(feature = "fuzzing")]
pub fn fuzz_read_records(bytes: &[u8]) -> (Vec<Record>, String) {
    let mut records = Vec::new();
    let mut ends = Vec::new();
    for framing in [frame::Framing::V1, frame::Framing::V2 { salt: 0 }] {
        let mut file = vec![0; framing.first_record() as usize];
        file.extend_from_slice(bytes);
        let end = frame::read(&file[..], framing, 64, |r, _| records.extend(r));
        ends.push(format!("{end:?}"));
    }
    (records, ends.join(", "))
}

/// The largest key plus value a data directory's record holds (the frame
/// cap less the entry's other fields): the configuration keeps the limits
/// below it when there is a data directory.
pub const MAX_ENTRY_BYTES: usize = frame::MAX_PAYLOAD - 1024;

/// The text of the `FORMAT` file.
const FORMAT: &str = "podcache data directory, format 3\n";

/// The text of the `FORMAT` file of a podcache before batches and history.
const FORMAT_2: &str = "podcache data directory, format 2\n";
/// The text an older podcache wrote; its files are read and upgraded.
const FORMAT_1: &str = "podcache data directory, format 1\n";

/// When `fsync` is called (`--fsync`; `crate::config` maps the flag's
/// values onto these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fsync {
    /// Before a write is answered; concurrent writes share one `fsync`.
    Always,
    /// About once a second (as Redis's `appendfsync everysec`): a power
    /// cut loses what came in the last one to two seconds, more while the
    /// disk stalls.
    #[default]
    Interval,
    /// Never by podcache: the kernel writes back when it likes.
    Never,
}

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DurabilityError {
    /// Another process holds the directory's lock.
    #[error("the data directory {dir} is in use by another podcache process")]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// The directory was written in a format this podcache does not read.
    #[error(
        "the data directory {dir} holds format {found:?}, this podcache reads {FORMAT:?}; use a podcache that reads it, or start with an empty directory"
    )]
    Format {
        /// The directory.
        dir: PathBuf,
        /// What its `FORMAT` file says (or that it has none).
        found: String,
    },
    /// A file is damaged somewhere other than a torn tail.
    #[error(
        "the data directory is damaged: {file} at byte {offset}: {reason}; move {dir} aside (or delete it) and start again: the node then rebuilds its state from its peers"
    )]
    Damaged {
        /// The directory.
        dir: PathBuf,
        /// The damaged file.
        file: PathBuf,
        /// Where.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: PathBuf) -> impl FnOnce(io::Error) -> DurabilityError {
    move |source| DurabilityError::Io { what, path, source }
}

/// Why a change could not be written: nothing of it was applied.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DiskError {
    /// The disk is full.
    #[error("the data directory's disk is full: {0}")]
    Full(String),
    /// Any other I/O error, or an earlier one not yet recovered from.
    #[error("the data directory cannot be written: {0}")]
    Failed(String),
}

impl DiskError {
    fn of(error: &io::Error) -> Self {
        if error.raw_os_error() == Some(28) || error.kind() == io::ErrorKind::StorageFull {
            DiskError::Full(error.to_string())
        } else {
            DiskError::Failed(error.to_string())
        }
    }
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every record of the snapshot and the logs, in file order.
    pub records: Vec<Record>,
    /// Superseded versions the snapshot kept as history: never a key's
    /// current entry.
    pub history: Vec<Record>,
    /// Files read.
    pub files: usize,
    /// Bytes read.
    pub bytes: u64,
    /// When the node last completed a full sync with a peer, Unix ms, as
    /// last saved (0: never, and nothing loaded). With records but no
    /// `SYNCED` it is the time its newest record was written.
    pub last_sync_ms: u64,
}

/// The log being appended to.
struct Log {
    generation: u64,
    file: Arc<dyn StorageFile>,
    /// The current log's framing (its salt).
    framing: frame::Framing,
    /// Earlier generations' logs until a sync has covered them: what was
    /// appended to them before the switch must reach the disk before the
    /// sequence numbers they hold count as synced.
    retiring: Vec<Arc<dyn StorageFile>>,
    name: String,
    /// Bytes in this generation's log: where the next record starts.
    bytes: u64,
    /// An I/O error: appends are refused until it clears. Without a need
    /// (nothing applied that the disk lacks) the next round lets appends
    /// try again; with one (changes applied but not appended, a failed
    /// `fsync`, a partial record left at the log's end) only a snapshot
    /// whose state was taken after that need clears it.
    failed: Option<(DiskError, Option<u64>)>,
    /// The need a failed `fsync` waits for: until a snapshot covers it,
    /// `always` waiters get its error and nothing more counts as synced.
    sync_failed: Option<u64>,
    /// The newest need for a snapshot recorded (0: none yet).
    latest_need: u64,
    /// The log's end holds bytes past `bytes` (a failed cut-back): the
    /// next snapshot starts a new log rather than reusing this one.
    tail_dirty: bool,
    /// Reused for encoding.
    buffer: Vec<u8>,
}

/// What a snapshot's state is taken after: it clears the needs counted
/// so far, and everything appended so far is in it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SnapshotMark {
    needs: u64,
    appended: u64,
}

/// An open data directory.
pub struct DataDir {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    /// Held (locked) for as long as this value lives.
    _lock: Box<dyn std::any::Any + Send + Sync>,
    policy: Fsync,
    log: Mutex<Log>,
    /// Bytes appended in all since open (the log sequence number).
    appended: AtomicU64,
    /// Bytes known to be on disk (fsynced), for `Fsync::Always` waiters;
    /// the error of a failed `fsync`, kept until a snapshot clears it.
    synced_tx: watch::Sender<(u64, Option<DiskError>)>,
    /// Wakes the syncer when something was appended.
    dirty: Notify,
    /// Size of the last snapshot, to decide when to compact.
    snapshot_bytes: AtomicU64,
    /// Numbers what makes a snapshot necessary (a request, an applied
    /// change the log could not take, a failed `fsync`, a failed cut-back):
    /// each need gets the next number, under the log lock.
    needs: AtomicU64,
    /// The newest need a snapshot on disk covers (its state was taken
    /// after it): needs up to here are met.
    covered_needs: AtomicU64,
    /// With logs replayed at start, the need for a snapshot of the loaded
    /// state: until one covers it, nothing counts as synced (an earlier
    /// process's failed `fsync` may have dropped what the page cache still
    /// showed this one). 0: none.
    startup_need: AtomicU64,
    /// The log size past which it is compacted (see `wants_compaction`).
    compact_log_bytes: u64,
}

impl std::fmt::Debug for DataDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataDir")
            .field("dir", &self.dir)
            .field("policy", &self.policy)
            .finish()
    }
}

fn name_of(kind: &str, generation: u64) -> String {
    format!("{kind}-{generation:020}")
}

fn generation_of(name: &str, kind: &str) -> Option<u64> {
    name.strip_prefix(kind)?.strip_prefix('-')?.parse().ok()
}

/// Creates log `name` with a fresh header, synced with its name before it
/// takes any append (a power cut then leaves it whole, or empty).
fn new_log(
    storage: &dyn Storage,
    name: &str,
) -> io::Result<(Arc<dyn StorageFile>, frame::Framing)> {
    let file = storage.open(name)?;
    // Left by an attempt that failed before the switch: start over.
    file.set_len(0)?;
    let salt = storage.salt();
    file.append(&frame::file_header(frame::Kind::Log, salt))?;
    file.sync()?;
    storage.sync_dir()?;
    Ok((file, frame::Framing::V2 { salt }))
}

impl DataDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The `fsync` policy.
    pub fn policy(&self) -> Fsync {
        self.policy
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        // Every critical section leaves the log consistent: a failed write
        // marks it failed before returning.
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `records`; returns the sequence number to wait on with
    /// [`DataDir::durable`]. An error means nothing was appended (a partial
    /// write is cut back off, or, if it cannot be, the log is left for a
    /// new one) and the directory refuses appends until it clears.
    pub fn append(&self, records: &[Record]) -> Result<u64, DiskError> {
        self.append_inner(records, false)
    }

    /// [`DataDir::append`]; `applied`: the store already holds `records`,
    /// so a failure is a need for a snapshot, recorded under the same lock.
    fn append_inner(&self, records: &[Record], applied: bool) -> Result<u64, DiskError> {
        let mut log = self.log();
        if let Some((failed, _)) = &log.failed {
            let failed = failed.clone();
            if applied && !records.is_empty() {
                let need = self.need_locked(&mut log);
                Self::fail_locked(&mut log, failed.clone(), Some(need));
            }
            return Err(failed);
        }
        if records.is_empty() {
            return Ok(self.appended.load(Ordering::Acquire));
        }
        let mut buffer = std::mem::take(&mut log.buffer);
        buffer.clear();
        let grouped;
        let records = if records.iter().any(|r| r.entry.in_batch()) {
            // A peer's epoch holds a batch's entries in any order: sorted,
            // each batch is one record. Order between keys does not matter
            // to replay (versions decide).
            let mut sorted = records.to_vec();
            sorted.sort_by_key(|r| (r.entry.in_batch(), r.ty, r.entry.version()));
            grouped = sorted;
            &grouped[..]
        } else {
            records
        };
        for group in changes(records) {
            let start = buffer.len();
            frame::put_group(
                log.framing,
                log.bytes + start as u64,
                group,
                false,
                &mut buffer,
            );
            if buffer.len() - start - frame::HEADER > frame::MAX_PAYLOAD {
                // The configuration keeps entries below the cap; a record
                // past it would be written with a wrong length.
                log.buffer = buffer;
                return Err(DiskError::Failed(format!(
                    "an entry of {} bytes is larger than the data directory's records may be",
                    log.buffer.len() - start
                )));
            }
        }
        let result = log.file.append(&buffer);
        let written = buffer.len() as u64;
        log.buffer = buffer;
        if let Err(error) = result {
            let failure = DiskError::of(&error);
            warn!(file = %log.name, %error, "cannot append to the data directory; writes are refused until it can be written again");
            // Cut back whatever part was written, so that the log never
            // holds a change the store did not apply.
            let mut need = None;
            if let Err(cut) = log.file.set_len(log.bytes) {
                warn!(file = %log.name, error = %cut, "cannot cut a failed append back off; the next snapshot starts a new log");
                log.tail_dirty = true;
                need = Some(self.need_locked(&mut log));
            }
            if applied {
                need = Some(self.need_locked(&mut log));
            }
            Self::fail_locked(&mut log, failure.clone(), need);
            return Err(failure);
        }
        log.bytes += written;
        let lsn = self.appended.fetch_add(written, Ordering::AcqRel) + written;
        drop(log);
        self.dirty.notify_one();
        Ok(lsn)
    }

    /// Asks for a snapshot at the next round: the state changed in a way
    /// no record describes, or a purge removed entries whose records the
    /// files still hold.
    pub fn request_compaction(&self) {
        let mut log = self.log();
        self.need_locked(&mut log);
    }

    /// Appends changes the store has already applied (from peers): on
    /// failure they are held in memory only, and a snapshot writes them.
    pub fn append_applied(&self, records: &[Record]) -> Result<u64, DiskError> {
        self.append_inner(records, true)
    }

    /// Records a need for a snapshot; returns its number. Under the log
    /// lock, which `write_snapshot` reads the needs it covers under.
    fn need_locked(&self, log: &mut Log) -> u64 {
        let need = self.needs.fetch_add(1, Ordering::AcqRel) + 1;
        log.latest_need = need;
        need
    }

    /// Marks the log failed; a need, once there is one, stays until a
    /// snapshot covers the newest.
    fn fail_locked(log: &mut Log, error: DiskError, need: Option<u64>) {
        let need = match (&log.failed, need) {
            (Some((_, Some(old))), Some(new)) => Some((*old).max(new)),
            (Some((_, old)), None) => *old,
            (_, need) => need,
        };
        let error = log.failed.take().map_or(error, |(e, _)| e);
        log.failed = Some((error, need));
    }

    /// The directory can take appends (no failure waiting to clear).
    pub fn healthy(&self) -> bool {
        self.log().failed.is_none()
    }

    /// True when the log has grown past the last snapshot's size (and at
    /// least `--compact-log-bytes`), or a failure waits for a snapshot to
    /// clear it, or one was asked for. At most as much log as snapshot
    /// keeps a restart after churn within twice the live data's reading
    /// (bench/NOTES.md, "Engines").
    pub fn wants_compaction(&self) -> bool {
        let log = self.log();
        log.latest_need > self.covered_needs.load(Ordering::Acquire)
            || log.bytes
                > self
                    .snapshot_bytes
                    .load(Ordering::Relaxed)
                    .max(self.compact_log_bytes)
    }

    /// A failure that needs no snapshot (a full disk refused an append,
    /// nothing was applied): lets the next append try the disk again (it
    /// is refused again, having changed nothing, while the disk is full).
    pub fn retry_after_failure(&self) {
        let mut log = self.log();
        if matches!(log.failed, Some((_, None))) {
            log.failed = None;
            info!("retrying the data directory; writes are accepted again if it takes them");
        }
    }

    /// A whole compaction: a new log, then a snapshot of `state()` taken
    /// after the switch. Blocking. Returns the snapshot's size.
    pub fn compact(&self, state: impl FnOnce() -> Vec<Record>) -> Result<u64, DiskError> {
        self.compact_with_history(|| (state(), Vec::new()))
    }

    /// [`DataDir::compact`] of a state and its kept history: `state()`
    /// answers both.
    pub fn compact_with_history(
        &self,
        state: impl FnOnce() -> (Vec<Record>, Vec<Record>),
    ) -> Result<u64, DiskError> {
        let mark = self.snapshot_mark();
        let generation = self.next_generation()?;
        let (records, history) = state();
        self.write_snapshot(generation, &records, &history, mark)
    }

    /// Starts generation `g + 1`: new appends go to a new log. Returns the
    /// new generation; the caller then writes its snapshot with
    /// [`DataDir::write_snapshot`], from a state taken after this call.
    ///
    /// The new file is created and its header and name synced before the
    /// log lock is taken, and the old log is not synced under it: the
    /// switch holds up appends for a pointer swap only. The old log is
    /// synced by the next [`DataDir::sync`], before the sequence numbers it
    /// holds count as on disk.
    fn next_generation(&self) -> Result<u64, DiskError> {
        let generation = {
            let log = self.log();
            // A log that holds nothing yet (a snapshot that failed after
            // the last switch, retried) is used as it is: retries must not
            // pile up files and handles.
            if log.bytes <= frame::FILE_HEADER as u64 && !log.tail_dirty {
                return Ok(log.generation);
            }
            log.generation
                .checked_add(1)
                .ok_or_else(|| DiskError::Failed("the log generations are exhausted".into()))?
        };
        let name = name_of("log", generation);
        let (file, framing) = new_log(&*self.storage, &name).map_err(|e| DiskError::of(&e))?;
        let mut log = self.log();
        let old = std::mem::replace(&mut log.file, file);
        // With `never` nothing syncs it: dropping it closes it at once (a
        // removed log's space is freed when its last handle goes).
        if self.policy != Fsync::Never {
            log.retiring.push(old);
        }
        log.generation = generation;
        log.name = name;
        log.framing = framing;
        log.bytes = frame::FILE_HEADER as u64;
        log.tail_dirty = false;
        Ok(generation)
    }

    /// Writes `records` as the snapshot of `generation` (tmp, sync, rename,
    /// sync the directory), then removes the files it makes obsolete and,
    /// when its state was taken after the last need for one (`mark`),
    /// clears failures: everything appended before the mark is in it, so
    /// on disk. Blocking.
    fn write_snapshot(
        &self,
        generation: u64,
        records: &[Record],
        history: &[Record],
        mark: SnapshotMark,
    ) -> Result<u64, DiskError> {
        let name = name_of("snapshot", generation);
        let tmp = format!("{name}.tmp");
        let s = &*self.storage;
        let disk = |e: io::Error| DiskError::of(&e);
        let result = (|| {
            let file = s.open(&tmp).map_err(disk)?;
            file.set_len(0).map_err(disk)?;
            let salt = s.salt();
            let framing = frame::Framing::V2 { salt };
            let mut buffer = Vec::with_capacity(1 << 20);
            buffer.extend_from_slice(&frame::file_header(frame::Kind::Snapshot, salt));
            let mut bytes = 0u64;
            let groups = records
                .iter()
                .map(|r| (std::slice::from_ref(r), false))
                .chain(history.iter().map(|r| (std::slice::from_ref(r), true)));
            for (group, history) in groups {
                frame::put_group(
                    framing,
                    bytes + buffer.len() as u64,
                    group,
                    history,
                    &mut buffer,
                );
                if buffer.len() >= 1 << 20 {
                    file.append(&buffer).map_err(disk)?;
                    bytes += buffer.len() as u64;
                    buffer.clear();
                }
            }
            file.append(&buffer).map_err(disk)?;
            bytes += buffer.len() as u64;
            file.sync().map_err(disk)?;
            s.rename(&tmp, &name).map_err(disk)?;
            s.sync_dir().map_err(disk)?;
            Ok(bytes)
        })();
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(e) => {
                let _ = s.remove(&tmp);
                return Err(e);
            }
        };
        self.snapshot_bytes.store(bytes, Ordering::Relaxed);
        remove_older_than(s, generation);
        let mut log = self.log();
        // Under the log lock, as needs are numbered: a need that came after
        // the state was taken stays for the next round.
        let covered = self
            .covered_needs
            .fetch_max(mark.needs, Ordering::AcqRel)
            .max(mark.needs);
        // Everything the retired logs held is in the snapshot.
        log.retiring.clear();
        if let Some((_, Some(need))) = log.failed
            && need <= covered
        {
            log.failed = None;
            info!("the data directory can be written again; writes are accepted");
        }
        if log.sync_failed.is_some_and(|need| need <= covered) {
            log.sync_failed = None;
            self.synced_tx.send_modify(|s| {
                s.0 = s.0.max(mark.appended);
                s.1 = None;
            });
        } else if log.sync_failed.is_none() && covered >= self.startup_need.load(Ordering::Acquire)
        {
            self.synced_tx.send_if_modified(|s| {
                let advanced = s.0 < mark.appended;
                s.0 = s.0.max(mark.appended);
                advanced
            });
        }
        Ok(bytes)
    }

    /// What a snapshot's state must be taken after (see [`SnapshotMark`]).
    fn snapshot_mark(&self) -> SnapshotMark {
        // Under the log lock: no append is half-counted.
        let _log = self.log();
        SnapshotMark {
            needs: self.needs.load(Ordering::Acquire),
            appended: self.appended.load(Ordering::Acquire),
        }
    }

    /// Saves when the last full sync with a peer was (read back at the next
    /// start, so a node down longer than the tombstone grace knows it is
    /// stale), whole or not at all. Blocking.
    pub fn save_last_sync(&self, ms: u64) -> Result<(), DiskError> {
        storage::write_atomically(&*self.storage, "SYNCED", format!("{ms}\n").as_bytes())
            .map_err(|e| DiskError::of(&e))
    }

    /// Appended so far (the sequence number of the last append).
    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::Acquire)
    }
}

/// Removes snapshots and logs of generations before `generation`, and
/// leftover temporary snapshots of other generations.
fn remove_older_than(s: &dyn Storage, generation: u64) {
    let Ok(names) = s.list() else {
        return;
    };
    for name in names {
        let old = generation_of(&name, "log")
            .or_else(|| generation_of(&name, "snapshot"))
            .is_some_and(|g| g < generation);
        let tmp = name
            .strip_suffix(".tmp")
            .and_then(|n| generation_of(n, "snapshot"))
            .is_some_and(|g| g != generation);
        if old || tmp {
            let _ = s.remove(&name);
        }
    }
}

#[cfg(test)]
mod tests;
