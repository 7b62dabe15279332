//! Recovery: what a data directory holds, read back at start.
//!
//! Owns: choosing the files to read (the newest snapshot and the logs of
//! its generation or later), reading them a chunk at a time, cutting a
//! torn tail off a log, refusing damage, and reading `SYNCED`. Must not
//! touch: the merge rule (the replica loads the records by version, then
//! purges), the log being appended to (the caller opens it).

use std::path::Path;
use std::time::Duration;

use tracing::{info, warn};

use super::frame::{self, End, Framing, Head, Kind};
use super::storage::{self, Storage};
use super::{DurabilityError, Recovered, generation_of, io_err, name_of};
use crate::store::Record;

/// Bytes read from a file at a time during recovery.
const READ_CHUNK: usize = 1 << 20;

/// What [`recover`] found.
pub(super) struct Found {
    pub(super) recovered: Recovered,
    /// The generation of the new log to append to: after every file read.
    pub(super) generation: u64,
    /// The newest snapshot's size.
    pub(super) snapshot_bytes: u64,
    /// The next round should rewrite the state: a file of format 1 was
    /// read, or logs of several starts pile up.
    pub(super) compact: bool,
    /// `SYNCED` was missing next to state: the time it is dated by, to be
    /// saved before anything else happens (a full resync must not be able
    /// to make the newest entry, and so the state, look recent).
    pub(super) save_synced: Option<u64>,
    /// A log held records: what they hold may be only in the page cache
    /// an earlier process left (its failed `fsync` is not reported to
    /// this one), so nothing counts as durable until a snapshot of the
    /// loaded state is written.
    pub(super) replayed_logs: bool,
}

/// Loads the newest snapshot and the logs after it.
pub(super) fn recover(s: &dyn Storage, dir: &Path) -> Result<Found, DurabilityError> {
    let mut snapshots = Vec::new();
    let mut logs = Vec::new();
    for name in s.list().map_err(io_err("cannot list", dir.to_owned()))? {
        if let Some(g) = generation_of(&name, "snapshot") {
            snapshots.push(g);
        } else if let Some(g) = generation_of(&name, "log") {
            logs.push(g);
        }
    }
    snapshots.sort_unstable();
    logs.sort_unstable();
    let synced = storage::read_small(s, "SYNCED")
        .map_err(io_err("cannot read", s.path_of("SYNCED")))?
        .and_then(|t| String::from_utf8(t).ok()?.trim().parse().ok());
    let mut recovered = Recovered::default();
    let base = snapshots.last().copied();
    let mut last_report = tokio::time::Instant::now();
    // Takes each record read; a progress line every few seconds.
    let mut keep = |recovered: &mut Recovered, records: Vec<Record>, history: bool| {
        if history {
            recovered.history.extend(records);
            return;
        }
        recovered.records.extend(records);
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
    let damaged = |name: &str, offset: u64, reason: String| DurabilityError::Damaged {
        dir: dir.to_owned(),
        file: s.path_of(name),
        offset,
        reason,
    };
    let mut upgrade = false;
    let mut snapshot_bytes = 0;
    if let Some(g) = base {
        let name = name_of("snapshot", g);
        let file = s
            .open_existing(&name)
            .map_err(io_err("cannot read", s.path_of(&name)))?;
        let read = |e| io_err("cannot read", s.path_of(&name))(e);
        // A snapshot is synced whole before its name appears: anything but
        // a whole, valid file is damage.
        let framing = match frame::head(&*file, Kind::Snapshot).map_err(read)? {
            Head::Framed(framing) => framing,
            Head::Empty => return Err(damaged(&name, 0, "the snapshot is empty".into())),
            Head::Bad(reason) => return Err(damaged(&name, 0, reason)),
        };
        upgrade |= framing == Framing::V1;
        let end = frame::read(&*file, framing, READ_CHUNK, |r, h| {
            keep(&mut recovered, r, h)
        })
        .map_err(read)?;
        snapshot_bytes = frame::Source::len(&*file).map_err(read)?;
        match end {
            End::Clean => {}
            End::Torn { offset } => {
                return Err(damaged(
                    &name,
                    offset,
                    "the snapshot ends in the middle of a record".into(),
                ));
            }
            End::Damaged { offset, reason } => return Err(damaged(&name, offset, reason)),
        }
        recovered.files += 1;
        recovered.bytes += snapshot_bytes;
    }
    let logs: Vec<u64> = logs
        .into_iter()
        .filter(|g| base.is_none_or(|b| *g >= b))
        .collect();
    let newest = logs.last().copied();
    let mut replayed_logs = false;
    for g in &logs {
        let name = name_of("log", *g);
        let file = s
            .open(&name)
            .map_err(io_err("cannot read", s.path_of(&name)))?;
        let read = |e| io_err("cannot read", s.path_of(&name))(e);
        let framing = match frame::head(&*file, Kind::Log).map_err(read)? {
            Head::Framed(framing) => framing,
            Head::Empty => {
                // Created, but cut before its header was whole: it never
                // held a record. Cut to nothing; a new one is started.
                file.set_len(0)
                    .and_then(|()| file.sync())
                    .map_err(io_err("cannot reset", s.path_of(&name)))?;
                recovered.files += 1;
                continue;
            }
            Head::Bad(reason) => return Err(damaged(&name, 0, reason)),
        };
        upgrade |= framing == Framing::V1;
        let end = frame::read(&*file, framing, READ_CHUNK, |r, h| {
            keep(&mut recovered, r, h)
        })
        .map_err(read)?;
        let size = frame::Source::len(&*file).map_err(read)?;
        let mut kept = size;
        match end {
            End::Clean => {}
            // Any log after the snapshot may end torn: a log retired by a
            // compaction is synced only by the next sync, which comes
            // before any of its changes counts as on disk, so a power cut
            // can leave its last record cut short while the newer one is
            // whole.
            End::Torn { offset } => {
                warn!(
                    file = %s.path_of(&name).display(),
                    offset,
                    cut = size - offset,
                    "a log ends in a record cut short (a crash while it was written); cutting it off there"
                );
                file.set_len(offset)
                    .and_then(|()| file.sync())
                    .map_err(io_err("cannot cut the torn tail of", s.path_of(&name)))?;
                kept = offset;
            }
            End::Damaged { offset, reason } => return Err(damaged(&name, offset, reason)),
        }
        // What the store is about to hold must be on disk, not only in
        // the page cache an earlier process left: its unanswered appends
        // would otherwise count as stored (a delete of a key they removed
        // answers at once) without ever being synced.
        file.sync()
            .map_err(io_err("cannot sync", s.path_of(&name)))?;
        recovered.files += 1;
        recovered.bytes += kept;
        replayed_logs |= kept > framing.first_record();
    }
    // Appends go to a new log, never to one an earlier process wrote: its
    // last fsync may have failed, and what the kernel dropped then still
    // reads back from the page cache (so recovery saw it whole) while the
    // disk holds a hole; appending after it would turn the hole into
    // damage at the next power cut. A snapshot with no log yet takes its
    // own generation's log.
    let generation = match (newest, base) {
        (Some(g), _) => g.checked_add(1).ok_or_else(|| {
            damaged(
                &name_of("log", g),
                0,
                "a log of the last possible generation: the name was not written by podcache"
                    .into(),
            )
        })?,
        (None, Some(b)) => b,
        (None, None) => 0,
    };
    let save_synced = synced.is_none().then_some(()).and(
        recovered
            .records
            .iter()
            .map(|r| crate::store::clock::hlc_ms(r.entry.version().hlc).max(1))
            .max(),
    );
    recovered.last_sync_ms = match synced {
        Some(ms) => ms,
        // State without a record of the last sync (a node stopped before
        // it first saved one, or a directory of an older podcache): it was
        // in touch with the cluster no later than its newest entry was
        // written, so that is when it counts as last synced. Down longer
        // than the grace since, it is stale and resyncs before its state
        // is trusted; back at once (a crash of the whole cluster), it
        // joins as usual. A node that saved one keeps it: `SYNCED` is
        // replaced whole, so a power cut leaves the old time, never none.
        None => recovered
            .records
            .iter()
            .map(|r| crate::store::clock::hlc_ms(r.entry.version().hlc))
            .max()
            .map_or(0, |ms| ms.max(1)),
    };
    Ok(Found {
        recovered,
        generation,
        snapshot_bytes,
        compact: upgrade || logs.len() >= 4,
        save_synced,
        replayed_logs,
    })
}
