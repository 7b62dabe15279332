//! The data directory (`--data-dir`): what makes a node's state survive a
//! restart of the whole cluster.
//!
//! Owns: the files, their locking, format and framing ([`frame`]), the
//! append of every change, `fsync`, compaction and recovery. Must not
//! touch: the store's merge rule, the network. The replica calls
//! [`DataDir::append`] inside its store lock for every change it applies
//! (local writes before applying them, so a refused append changes
//! nothing; merges from peers right after), and runs [`durability_loop`]
//! for the background work.
//!
//! # Files
//! - `FORMAT`: `podcache data directory, format 1`. Another format (or a
//!   directory that holds files but no `FORMAT`) is refused.
//! - `LOCK`: held with an exclusive lock while a node uses the directory.
//! - `snapshot-<gen>`: the whole state when generation `gen` began,
//!   written to `snapshot-<gen>.tmp`, synced, then renamed, so a
//!   snapshot without `.tmp` is complete.
//! - `log-<gen>`: every change applied since generation `gen` began.
//!
//! Recovery loads the newest snapshot and replays every log of that
//! generation or later, merging by version (so order and duplicates do not
//! matter). A record cut short at the end of a log is a torn tail (a
//! log retired by a compaction is synced after the newer one has taken
//! appends, so either can end torn): cut off, with one warning naming the
//! file and offset. Any other
//! damage refuses the start with a message saying what to do: there is no
//! way to tell what a damaged record held, and a node that starts without
//! it would serve a state that silently lost writes.
//!
//! # Why a log and snapshots
//! The state already lives in memory; the disk only has to bring it back.
//! An append per change and a periodic snapshot (as Redis's AOF with its
//! rewrite) write each change once, sequentially, and load in one pass;
//! an embedded database (fjall, redb) would keep a second index of the
//! same entries on disk and pay for its updates. bench/NOTES.md has the
//! figures.

pub(crate) mod frame;

/// The record decoding of the data directory's files, for the fuzz
/// targets: the records read from `bytes` (after a file's magic) and how
/// they end.
#[cfg(feature = "fuzzing")]
pub fn fuzz_read_records(bytes: &[u8]) -> (Vec<Record>, String) {
    let mut records = Vec::new();
    let end = frame::read(bytes, 8, |r| records.push(r));
    (records, format!("{end:?}"))
}

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::store::Record;

/// The text of the `FORMAT` file.
const FORMAT: &str = "podcache data directory, format 1\n";

/// When `fsync` is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Fsync {
    /// Before a write is answered; concurrent writes share one `fsync`.
    Always,
    /// Once a second (as Redis's `appendfsync everysec`): a crash of the
    /// machine loses at most the last second's changes.
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
        offset: usize,
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

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> DurabilityError + 'a {
    move |source| DurabilityError::Io {
        what,
        path: path.to_owned(),
        source,
    }
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
    /// Files read.
    pub files: usize,
    /// Bytes read.
    pub bytes: u64,
    /// When the node last completed a full sync with a peer, Unix ms, as
    /// last saved (0: never).
    pub last_sync_ms: u64,
}

/// The log being appended to.
struct Log {
    generation: u64,
    file: Arc<File>,
    /// Earlier generations' logs until a sync has covered them: what was
    /// appended to them before the switch must reach the disk before the
    /// sequence numbers they hold count as synced.
    retiring: Vec<Arc<File>>,
    path: PathBuf,
    /// Bytes appended to this generation's log.
    bytes: u64,
    /// An I/O error: appends are refused until it clears (the next round
    /// lets them try again, or, if changes were applied that the log does
    /// not hold, until a snapshot has written the whole state again).
    failed: Option<DiskError>,
    /// Changes from peers were applied but could not be appended: only a
    /// snapshot makes the directory whole again.
    unlogged: bool,
    /// Reused for encoding.
    buffer: Vec<u8>,
}

/// An open data directory.
pub struct DataDir {
    dir: PathBuf,
    /// Held (locked) for as long as this value lives.
    _lock: File,
    policy: Fsync,
    log: Mutex<Log>,
    /// Bytes appended in all since open (the log sequence number).
    appended: AtomicU64,
    /// Bytes known to be on disk (fsynced), for `Fsync::Always` waiters;
    /// the error of the last failed `fsync`, if it failed.
    synced_tx: watch::Sender<(u64, Option<DiskError>)>,
    /// Wakes the syncer when something was appended.
    dirty: Notify,
    /// Size of the last snapshot, to decide when to compact.
    snapshot_bytes: AtomicU64,
    /// Set when the state changed without a record (entries dropped by a
    /// full resync): the next round writes a snapshot.
    compaction_requested: std::sync::atomic::AtomicBool,
    /// Counts what makes a snapshot necessary (a request, an applied change
    /// the log could not take): a snapshot clears the flags only if none
    /// came after it took its state.
    needs_snapshot_events: AtomicU64,
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

/// Bytes read from a file at a time during recovery.
const READ_CHUNK: usize = 1 << 20;

/// Reads the records of the file at `path` after checking its magic, a
/// chunk at a time (a snapshot is as large as the state; the whole of it
/// is never held in memory), giving each to `each`. `None`: the file is
/// shorter than its magic (created, cut before the magic was whole:
/// empty); otherwise how its records end and the file's size.
fn read_records(
    path: &Path,
    magic: &[u8; 8],
    each: impl FnMut(Record),
) -> Result<Option<(frame::End, u64)>, DurabilityError> {
    let mut file = File::open(path).map_err(io_err("cannot read", path))?;
    let mut head = Vec::with_capacity(8);
    (&mut file)
        .take(8)
        .read_to_end(&mut head)
        .map_err(io_err("cannot read", path))?;
    if head.len() < 8 && magic.starts_with(&head) {
        return Ok(None);
    }
    if head != magic {
        return Err(DurabilityError::Damaged {
            dir: path.parent().map(Path::to_owned).unwrap_or_default(),
            file: path.to_owned(),
            offset: 0,
            reason: "not a podcache file of this kind (wrong magic)".into(),
        });
    }
    let (end, read) =
        frame::read_from(file, 8, READ_CHUNK, each).map_err(io_err("cannot read", path))?;
    Ok(Some((end, 8 + read as u64)))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl DataDir {
    /// Opens (creating it if needed) and locks `dir`, and recovers what it
    /// holds. Progress is logged every few seconds for a large state.
    pub fn open(
        dir: &Path,
        policy: Fsync,
        compact_log_bytes: u64,
    ) -> Result<(Self, Recovered), DurabilityError> {
        fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("cannot open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(DurabilityError::Locked {
                    dir: dir.to_owned(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err("cannot lock", &lock_path)(e)),
        }
        let format_path = dir.join("FORMAT");
        match fs::read_to_string(&format_path) {
            Ok(text) if text == FORMAT => {}
            Ok(text) => {
                return Err(DurabilityError::Format {
                    dir: dir.to_owned(),
                    found: text.trim().chars().take(80).collect(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let foreign = fs::read_dir(dir)
                    .map_err(io_err("cannot list", dir))?
                    .filter_map(Result::ok)
                    .any(|e| e.file_name() != "LOCK");
                if foreign {
                    return Err(DurabilityError::Format {
                        dir: dir.to_owned(),
                        found: "no FORMAT file, but other files".into(),
                    });
                }
                fs::write(&format_path, FORMAT).map_err(io_err("cannot write", &format_path))?;
                sync_dir(dir).map_err(io_err("cannot sync", dir))?;
            }
            Err(e) => return Err(io_err("cannot read", &format_path)(e)),
        }
        let (recovered, generation, log_bytes, snapshot_bytes) = recover(dir)?;
        let path = dir.join(name_of("log", generation));
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("cannot open", &path))?;
        if log_bytes == 0 {
            file.write_all(frame::LOG_MAGIC)
                .map_err(io_err("cannot write", &path))?;
            // The new file's name must survive a crash too, or an fsync of
            // its contents keeps nothing.
            sync_dir(dir).map_err(io_err("cannot sync", dir))?;
        }
        let (synced_tx, _) = watch::channel((0, None));
        let data_dir = Self {
            dir: dir.to_owned(),
            _lock: lock,
            policy,
            log: Mutex::new(Log {
                generation,
                file: Arc::new(file),
                retiring: Vec::new(),
                path,
                bytes: log_bytes.max(8),
                failed: None,
                unlogged: false,
                buffer: Vec::new(),
            }),
            appended: AtomicU64::new(0),
            synced_tx,
            dirty: Notify::new(),
            snapshot_bytes: AtomicU64::new(snapshot_bytes),
            compaction_requested: Default::default(),
            needs_snapshot_events: AtomicU64::new(0),
            compact_log_bytes,
        };
        Ok((data_dir, recovered))
    }

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
    /// write is cut back off) and the directory refuses appends until a
    /// snapshot succeeds.
    pub fn append(&self, records: &[Record]) -> Result<u64, DiskError> {
        if records.is_empty() {
            return Ok(self.appended.load(Ordering::Acquire));
        }
        let mut log = self.log();
        if let Some(failed) = &log.failed {
            return Err(failed.clone());
        }
        let mut buffer = std::mem::take(&mut log.buffer);
        buffer.clear();
        for record in records {
            frame::put(record, &mut buffer);
        }
        let result = (&*log.file).write_all(&buffer);
        let written = buffer.len() as u64;
        log.buffer = buffer;
        if let Err(error) = result {
            let failure = DiskError::of(&error);
            // Cut back whatever part was written, so that the log never
            // holds a change the store did not apply.
            let _ = log.file.set_len(log.bytes);
            warn!(path = %log.path.display(), %error, "cannot append to the data directory; writes are refused until it can be written again");
            log.failed = Some(failure.clone());
            return Err(failure);
        }
        log.bytes += written;
        let lsn = self.appended.fetch_add(written, Ordering::AcqRel) + written;
        drop(log);
        self.dirty.notify_one();
        Ok(lsn)
    }

    /// Asks for a snapshot at the next round: the state changed in a way
    /// no record describes (entries dropped by a full resync).
    pub fn request_compaction(&self) {
        self.needs_snapshot_events.fetch_add(1, Ordering::AcqRel);
        self.compaction_requested.store(true, Ordering::Release);
    }

    /// Appends changes the store has already applied (from peers): on
    /// failure they are held in memory only, and a snapshot writes them.
    pub fn append_applied(&self, records: &[Record]) -> Result<u64, DiskError> {
        let result = self.append(records);
        if result.is_err() {
            self.mark_unlogged(&mut self.log());
        }
        result
    }

    /// The disk lacks changes the store holds: only a snapshot of the whole
    /// state makes the directory whole again. Called under the log lock,
    /// which `write_snapshot` clears it under.
    fn mark_unlogged(&self, log: &mut Log) {
        self.needs_snapshot_events.fetch_add(1, Ordering::AcqRel);
        log.unlogged = true;
    }

    /// The directory can take appends (no failure waiting for a snapshot).
    pub fn healthy(&self) -> bool {
        self.log().failed.is_none()
    }

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
            Ok(state) if state.0 >= lsn => Ok(()),
            Ok(state) => Err(state
                .1
                .clone()
                .unwrap_or_else(|| DiskError::Failed("fsync failed".into()))),
            Err(_) => Err(DiskError::Failed("the data directory was closed".into())),
        }
    }

    /// Syncs the current log to disk (blocking: run it off the runtime).
    fn sync(&self) -> Result<(), DiskError> {
        let (retiring, file, upto) = {
            let log = self.log();
            (
                log.retiring.clone(),
                log.file.clone(),
                self.appended.load(Ordering::Acquire),
            )
        };
        let synced = retiring
            .iter()
            .chain(std::iter::once(&file))
            .try_for_each(|f| f.sync_data());
        if let Err(error) = synced {
            let error = DiskError::of(&error);
            self.synced_tx.send_modify(|s| s.1 = Some(error.clone()));
            return Err(error);
        }
        if !retiring.is_empty() {
            self.log()
                .retiring
                .retain(|r| !retiring.iter().any(|done| Arc::ptr_eq(r, done)));
        }
        self.synced_tx.send_modify(|s| {
            s.0 = s.0.max(upto);
            s.1 = None;
        });
        Ok(())
    }

    /// True when the log has grown past the last snapshot's size (and at
    /// least `--compact-log-bytes`), or a failure waits for a snapshot to
    /// clear it, or one was asked for. At most as much log as snapshot
    /// keeps a restart after churn within twice the live data's reading
    /// (bench/NOTES.md, "Engines").
    fn wants_compaction(&self) -> bool {
        let log = self.log();
        self.compaction_requested.load(Ordering::Acquire)
            || log.unlogged
            || log.bytes
                > self
                    .snapshot_bytes
                    .load(Ordering::Relaxed)
                    .max(self.compact_log_bytes)
    }

    /// Starts generation `g + 1`: new appends go to a new log. Returns the
    /// new generation; the caller then writes its snapshot with
    /// [`DataDir::write_snapshot`], from a state taken after this call.
    ///
    /// The new file is created and its name synced before the log lock is
    /// taken, and the old log is not synced under it: the switch holds up
    /// appends for a pointer swap only. The old log is synced by the next
    /// [`DataDir::sync`], before the sequence numbers it holds count as on
    /// disk. Only the durability loop calls this.
    fn next_generation(&self) -> Result<u64, DiskError> {
        let generation = {
            let log = self.log();
            // A log that holds nothing yet (a snapshot that failed after
            // the last switch, retried) is used as it is: retries must not
            // pile up files and handles.
            if log.bytes <= frame::LOG_MAGIC.len() as u64 {
                return Ok(log.generation);
            }
            log.generation + 1
        };
        let path = self.dir.join(name_of("log", generation));
        let disk = |e: io::Error| DiskError::of(&e);
        // In append mode, as the log `open` makes: after a failed write is
        // cut back off, the next one lands at the new end, not past it (a
        // hole of zeros there would read as damage at the next start).
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(disk)?;
        // Left by an attempt that failed before the switch: start over.
        file.set_len(0).map_err(disk)?;
        file.write_all(frame::LOG_MAGIC).map_err(disk)?;
        sync_dir(&self.dir).map_err(disk)?;
        let mut log = self.log();
        let old = std::mem::replace(&mut log.file, Arc::new(file));
        // With `never` nothing syncs it: dropping it closes it at once (a
        // removed log's space is freed when its last handle goes).
        if self.policy != Fsync::Never {
            log.retiring.push(old);
        }
        log.generation = generation;
        log.path = path;
        log.bytes = 8;
        Ok(generation)
    }

    /// Writes `records` as the snapshot of `generation` (tmp, sync, rename,
    /// sync the directory), then removes the files it makes obsolete and
    /// clears a failure. Blocking.
    ///
    /// `mark` is [`DataDir::snapshot_mark`] read before `records` were
    /// taken.
    fn write_snapshot(
        &self,
        generation: u64,
        records: &[Record],
        mark: u64,
    ) -> Result<u64, DiskError> {
        let name = name_of("snapshot", generation);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let path = self.dir.join(&name);
        let disk = |e: io::Error| DiskError::of(&e);
        let result = (|| {
            let mut file = io::BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(disk)?);
            file.write_all(frame::SNAPSHOT_MAGIC).map_err(disk)?;
            let mut buffer = Vec::with_capacity(64 * 1024);
            let mut bytes = 8u64;
            for record in records {
                frame::put(record, &mut buffer);
                if buffer.len() >= 60 * 1024 {
                    file.write_all(&buffer).map_err(disk)?;
                    bytes += buffer.len() as u64;
                    buffer.clear();
                }
            }
            file.write_all(&buffer).map_err(disk)?;
            bytes += buffer.len() as u64;
            let file = file.into_inner().map_err(|e| disk(e.into_error()))?;
            file.sync_all().map_err(disk)?;
            fs::rename(&tmp, &path).map_err(disk)?;
            sync_dir(&self.dir).map_err(disk)?;
            Ok(bytes)
        })();
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        self.snapshot_bytes.store(bytes, Ordering::Relaxed);
        remove_older_than(&self.dir, generation);
        let mut log = self.log();
        // Under the log lock, as `append_applied` sets `unlogged`: a need
        // that came after the state was taken stays for the next round.
        if self.needs_snapshot_events.load(Ordering::Acquire) == mark {
            self.compaction_requested.store(false, Ordering::Release);
            log.unlogged = false;
        }
        if log.failed.take().is_some() {
            info!("the data directory can be written again; writes are accepted");
        }
        Ok(bytes)
    }

    /// What a snapshot's state must be taken after to clear the needs
    /// counted so far (see `needs_snapshot_events`).
    fn snapshot_mark(&self) -> u64 {
        self.needs_snapshot_events.load(Ordering::Acquire)
    }

    /// True when older logs still wait for a sync.
    fn retiring(&self) -> bool {
        !self.log().retiring.is_empty()
    }

    /// Saves when the last full sync with a peer was (read back at the next
    /// start, so a node down longer than the tombstone grace knows it is
    /// stale). Blocking; best effort.
    fn save_last_sync(&self, ms: u64) {
        let path = self.dir.join("SYNCED");
        let tmp = self.dir.join("SYNCED.tmp");
        let _ = fs::write(&tmp, format!("{ms}\n")).and_then(|()| fs::rename(&tmp, &path));
    }
}

/// Removes snapshots and logs of generations before `generation`, and
/// leftover temporary files.
fn remove_older_than(dir: &Path, generation: u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let old = generation_of(&name, "log")
            .or_else(|| generation_of(&name, "snapshot"))
            .is_some_and(|g| g < generation);
        let tmp = name.ends_with(".tmp") && !name.contains(&format!("{generation:020}"));
        if old || tmp {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Loads the newest snapshot and the logs after it. Returns what was
/// found, the generation to append to, that log's size (0: none yet) and
/// the snapshot's size.
fn recover(dir: &Path) -> Result<(Recovered, u64, u64, u64), DurabilityError> {
    let mut snapshots = Vec::new();
    let mut logs = Vec::new();
    for entry in fs::read_dir(dir)
        .map_err(io_err("cannot list", dir))?
        .filter_map(Result::ok)
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(g) = generation_of(&name, "snapshot") {
            snapshots.push(g);
        } else if let Some(g) = generation_of(&name, "log") {
            logs.push(g);
        }
    }
    snapshots.sort_unstable();
    logs.sort_unstable();
    let mut recovered = Recovered {
        last_sync_ms: fs::read_to_string(dir.join("SYNCED"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0),
        ..Recovered::default()
    };
    let base = snapshots.last().copied();
    let mut last_report = tokio::time::Instant::now();
    // Takes each record read; a progress line every few seconds.
    let mut keep = |recovered: &mut Recovered, record: Record| {
        recovered.records.push(record);
        if recovered.records.len().is_multiple_of(65_536)
            && last_report.elapsed() >= Duration::from_secs(3)
        {
            last_report = tokio::time::Instant::now();
            info!(
                entries = recovered.records.len(),
                files = recovered.files,
                "loading the data directory"
            );
        }
    };
    let mut snapshot_bytes = 0;
    if let Some(g) = base {
        let path = dir.join(name_of("snapshot", g));
        let (end, size) = read_records(&path, frame::SNAPSHOT_MAGIC, |r| keep(&mut recovered, r))?
            .unwrap_or((frame::End::Clean, 8));
        snapshot_bytes = size;
        if end != frame::End::Clean {
            let (offset, reason) = match end {
                frame::End::Torn { offset } => (
                    offset,
                    "the snapshot ends in the middle of a record".to_owned(),
                ),
                frame::End::Damaged { offset, reason } => (offset, reason),
                frame::End::Clean => (0, String::new()),
            };
            return Err(DurabilityError::Damaged {
                dir: dir.to_owned(),
                file: path,
                offset,
                reason,
            });
        }
        recovered.files += 1;
        recovered.bytes += snapshot_bytes;
    }
    let logs: Vec<u64> = logs
        .into_iter()
        .filter(|g| base.is_none_or(|b| *g >= b))
        .collect();
    let newest = logs.last().copied();
    let mut newest_bytes = 0;
    for g in &logs {
        let path = dir.join(name_of("log", *g));
        let read = read_records(&path, frame::LOG_MAGIC, |r| keep(&mut recovered, r))?;
        let Some((end, size)) = read else {
            // Created, but its magic was never written whole: empty. Cut
            // to nothing, so the magic is written again before appends.
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(0))
                .map_err(io_err("cannot reset", &path))?;
            recovered.files += 1;
            continue;
        };
        let mut kept = size;
        match end {
            frame::End::Clean => {}
            // Any log after the snapshot may end torn: a log retired by a
            // compaction is synced only by the next sync, which comes
            // before any of its changes counts as on disk, so a crash can
            // leave its last record cut short while the newer one is whole.
            frame::End::Torn { offset } => {
                warn!(
                    file = %path.display(),
                    offset,
                    cut = size - offset as u64,
                    "a log ends in a record cut short (a crash while it was written); cutting it off there"
                );
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(offset as u64).and_then(|()| f.sync_all()))
                    .map_err(io_err("cannot cut the torn tail of", &path))?;
                kept = offset as u64;
            }
            frame::End::Damaged { offset, reason } => {
                return Err(DurabilityError::Damaged {
                    dir: dir.to_owned(),
                    file: path,
                    offset,
                    reason,
                });
            }
        }
        recovered.files += 1;
        recovered.bytes += kept;
        if Some(*g) == newest {
            newest_bytes = kept;
        }
    }
    let generation = newest.or(base).unwrap_or(0);
    // A snapshot with no log of its generation yet: its log starts empty.
    let log_bytes = if newest == Some(generation) {
        newest_bytes
    } else {
        0
    };
    Ok((recovered, generation, log_bytes, snapshot_bytes))
}

/// The background work of a data directory, until `cancel` fires: `fsync`
/// by the policy (at once when a write waits, with `always`; every second
/// with `interval`), compaction when the log has grown, the time of the
/// last full sync saved, and after an I/O error a snapshot of the whole
/// state as soon as the disk takes it (writes resume then).
pub(crate) async fn durability_loop(
    data: Arc<DataDir>,
    metrics: Arc<crate::metrics::Metrics>,
    snapshot: impl Fn() -> Vec<Record> + Send + Sync + 'static,
    last_sync: impl Fn() -> u64 + Send + Sync + 'static,
    cancel: tokio_util::sync::CancellationToken,
) {
    let snapshot = Arc::new(snapshot);
    let mut last_saved_sync = 0;
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
        if wants_sync
            && (data.synced_tx.borrow().0 < data.appended.load(Ordering::Acquire)
                || data.retiring())
        {
            let d = data.clone();
            if let Ok(Err(error)) = tokio::task::spawn_blocking(move || d.sync()).await {
                warn!(%error, "fsync of the data directory failed; writes are refused until a snapshot of the whole state is written");
                // The kernel may have dropped the pages that failed, and a
                // later fsync of the same file reports success: only a
                // snapshot makes the directory whole again.
                let mut log = data.log();
                data.mark_unlogged(&mut log);
                log.failed.get_or_insert(error);
            }
        }
        if woken_by_write {
            continue;
        }
        {
            // A failure with nothing applied that the log lacks: let the
            // next append try the disk again (it is refused again, having
            // changed nothing, while the disk is still full).
            let mut log = data.log();
            if log.failed.is_some() && !log.unlogged {
                log.failed = None;
                info!("retrying the data directory; writes are accepted again if it takes them");
            }
        }
        if compaction.is_none() && data.wants_compaction() {
            let (d, snapshot) = (data.clone(), snapshot.clone());
            compaction = Some(tokio::task::spawn_blocking(move || {
                let mark = d.snapshot_mark();
                let generation = d.next_generation()?;
                d.write_snapshot(generation, &snapshot(), mark)
            }));
        }
        let last_sync = last_sync();
        if last_sync != last_saved_sync {
            last_saved_sync = last_sync;
            let d = data.clone();
            let _ = tokio::task::spawn_blocking(move || d.save_last_sync(last_sync)).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Version;

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("podcache-durability-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn record(key: &str, hlc: u64) -> Record {
        Record::new(1, key, Some("v"), Version { hlc, node: 3 }, 0)
    }

    fn keys(recovered: &Recovered) -> Vec<String> {
        let mut keys: Vec<String> = recovered
            .records
            .iter()
            .map(|r| r.key().to_owned())
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    #[test]
    fn appends_come_back_after_a_reopen_and_the_lock_is_exclusive() {
        let d = dir("reopen");
        let (data, recovered) = DataDir::open(&d, Fsync::Always, 4096).expect("open");
        assert!(recovered.records.is_empty());
        data.append(&[record("a", 1), record("b", 2)])
            .expect("append");
        data.append(&[record("c", 3)]).expect("append");
        assert!(matches!(
            DataDir::open(&d, Fsync::Always, 4096),
            Err(DurabilityError::Locked { .. })
        ));
        drop(data);
        let (_, recovered) = DataDir::open(&d, Fsync::Always, 4096).expect("reopen");
        assert_eq!(keys(&recovered), ["a", "b", "c"]);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_directory_of_other_files_or_another_format_is_refused() {
        let d = dir("foreign");
        fs::create_dir_all(&d).expect("dir");
        fs::write(d.join("notes.txt"), "mine").expect("file");
        assert!(matches!(
            DataDir::open(&d, Fsync::Never, 4096),
            Err(DurabilityError::Format { .. })
        ));
        fs::remove_file(d.join("notes.txt")).expect("rm");
        fs::write(d.join("FORMAT"), "podcache data directory, format 2\n").expect("format");
        let err = DataDir::open(&d, Fsync::Never, 4096).expect_err("format 2");
        assert!(err.to_string().contains("format 2"), "{err}");
        let _ = fs::remove_dir_all(&d);
    }

    /// Every state a crash can leave compaction in recovers everything:
    /// after the switch to a new log but before the snapshot, with a
    /// half-written snapshot, and after the snapshot but before the old
    /// files are removed.
    #[test]
    fn every_crash_point_of_a_compaction_recovers_everything() {
        let d = dir("compaction");
        let (data, _) = DataDir::open(&d, Fsync::Always, 4096).expect("open");
        data.append(&[record("a", 1), record("b", 2)])
            .expect("append");
        let generation = data.next_generation().expect("switch");
        data.append(&[record("c", 3)]).expect("append");
        drop(data);
        // Crash after the switch: both logs, no snapshot.
        let (data, recovered) = DataDir::open(&d, Fsync::Always, 4096).expect("reopen");
        assert_eq!(keys(&recovered), ["a", "b", "c"]);
        // A snapshot half-written when the crash came.
        fs::write(
            d.join(format!("{}.tmp", name_of("snapshot", generation + 1))),
            b"PCSNP",
        )
        .expect("tmp");
        drop(data);
        let (data, recovered) = DataDir::open(&d, Fsync::Always, 4096).expect("reopen");
        assert_eq!(keys(&recovered), ["a", "b", "c"]);
        // The snapshot written, the old files not yet removed.
        let old_log = fs::read(d.join(name_of("log", 0))).expect("old log");
        let generation = data.next_generation().expect("switch");
        data.write_snapshot(generation, &recovered.records, data.snapshot_mark())
            .expect("snapshot");
        data.append(&[record("d", 4)]).expect("append");
        drop(data);
        assert!(
            !d.join(name_of("log", 0)).exists(),
            "obsolete files removed"
        );
        fs::write(d.join(name_of("log", 0)), &old_log).expect("put the old log back");
        let (_, recovered) = DataDir::open(&d, Fsync::Always, 4096).expect("reopen");
        assert_eq!(keys(&recovered), ["a", "b", "c", "d"]);
        assert!(
            recovered.records.len() <= 4,
            "older generations are not replayed: {:?}",
            recovered.records
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_failed_append_leaves_nothing_and_is_refused_until_it_clears() {
        let d = dir("failed");
        let (data, _) = DataDir::open(&d, Fsync::Never, 4096).expect("open");
        data.append(&[record("a", 1)]).expect("append");
        data.log().failed = Some(DiskError::Full("test".into()));
        assert!(matches!(
            data.append(&[record("b", 2)]),
            Err(DiskError::Full(_))
        ));
        assert!(!data.healthy());
        data.log().failed = None;
        data.append(&[record("c", 3)]).expect("append");
        drop(data);
        let (_, recovered) = DataDir::open(&d, Fsync::Never, 4096).expect("reopen");
        assert_eq!(keys(&recovered), ["a", "c"]);
        let _ = fs::remove_dir_all(&d);
    }

    /// A crash can leave a retired log torn while the newer one is whole
    /// (the retired one is synced later): its tail is cut, the start goes
    /// on, and every whole record of both is there.
    #[test]
    fn a_torn_older_log_is_cut_and_the_newer_one_read() {
        let d = dir("torn-older");
        let (data, _) = DataDir::open(&d, Fsync::Never, 4096).expect("open");
        data.append(&[record("a", 1), record("b", 2)])
            .expect("append");
        data.next_generation().expect("switch");
        data.append(&[record("c", 3)]).expect("append");
        drop(data);
        let old = d.join(name_of("log", 0));
        let len = fs::metadata(&old).expect("old log").len();
        OpenOptions::new()
            .write(true)
            .open(&old)
            .and_then(|f| f.set_len(len - 3))
            .expect("tear the old log");
        let (_, recovered) = DataDir::open(&d, Fsync::Never, 4096).expect("starts");
        assert_eq!(keys(&recovered), ["a", "c"]);
        let _ = fs::remove_dir_all(&d);
    }

    /// A need for a snapshot that comes after a snapshot took its state
    /// is not cleared by it.
    #[test]
    fn a_snapshot_clears_only_the_needs_it_covers() {
        let d = dir("needs");
        let (data, _) = DataDir::open(&d, Fsync::Never, 4096).expect("open");
        data.append(&[record("a", 1)]).expect("append");
        let mark = data.snapshot_mark();
        let generation = data.next_generation().expect("switch");
        data.request_compaction();
        data.write_snapshot(generation, &[record("a", 1)], mark)
            .expect("snapshot");
        assert!(data.wants_compaction(), "the later request stays");
        let mark = data.snapshot_mark();
        let generation = data.next_generation().expect("reuse the empty log");
        data.write_snapshot(generation, &[record("a", 1)], mark)
            .expect("snapshot");
        assert!(!data.wants_compaction());
        let _ = fs::remove_dir_all(&d);
    }

    /// A write cut back off after a failure leaves no hole: the next
    /// append lands where the log now ends, in a switched-to log too.
    #[test]
    fn an_append_after_a_cut_back_failure_leaves_no_hole() {
        let d = dir("cutback");
        let (data, _) = DataDir::open(&d, Fsync::Never, 4096).expect("open");
        data.next_generation().expect("switch");
        data.append(&[record("a", 1)]).expect("append");
        // What a failed append does: cut the log back to its last size.
        let before = data.log().bytes;
        data.append(&[record("lost", 2)]).expect("append");
        data.log().file.set_len(before).expect("cut back");
        data.log().bytes = before;
        data.append(&[record("b", 3)]).expect("append");
        drop(data);
        let (_, recovered) = DataDir::open(&d, Fsync::Never, 4096).expect("reopen: no damage");
        assert_eq!(keys(&recovered), ["a", "b"]);
        let _ = fs::remove_dir_all(&d);
    }

    /// A switch to a new log leaves the old one to the next sync, and an
    /// `always` waiter is released only by a sync that covered it.
    #[test]
    fn the_old_log_is_synced_before_its_changes_count_as_on_disk() {
        let d = dir("retiring");
        let (data, _) = DataDir::open(&d, Fsync::Always, 4096).expect("open");
        data.append(&[record("a", 1)]).expect("append");
        data.next_generation().expect("switch");
        let lsn = data.append(&[record("b", 2)]).expect("append");
        data.next_generation().expect("switch again");
        assert_eq!(
            data.log().retiring.len(),
            2,
            "both old logs wait for a sync"
        );
        assert!(data.retiring());
        // A log that holds nothing is not switched away from again: a
        // failing snapshot's retries do not pile up files.
        let generation = data.log().generation;
        assert_eq!(data.next_generation().expect("reuse"), generation);
        assert_eq!(data.log().retiring.len(), 2);
        assert!(data.synced_tx.borrow().0 < lsn);
        data.sync().expect("sync");
        assert!(data.log().retiring.is_empty());
        assert!(data.synced_tx.borrow().0 >= lsn);
        drop(data);
        // With `never` nothing would ever sync them: none are kept open.
        let (data, _) = DataDir::open(&d, Fsync::Never, 4096).expect("reopen");
        data.append(&[record("c", 3)]).expect("append");
        data.next_generation().expect("switch");
        assert!(data.log().retiring.is_empty());
        drop(data);
        let _ = fs::remove_dir_all(&d);
    }
}
