//! Unit tests of the data directory's decisions, on real files (a temp
//! directory) and on the simulated disk where a fault must be injected.

use std::fs;

use super::sim::{Faults, SimDisk};
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

fn open_sim(disk: &SimDisk, policy: Fsync) -> Result<(DataDir, Recovered), DurabilityError> {
    DataDir::open_on(Arc::new(disk.clone()), Path::new("sim"), policy, 4096)
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
    let err = DataDir::open(&d, Fsync::Never, 4096).expect_err("foreign");
    assert!(err.to_string().contains("notes.txt"), "{err}");
    fs::remove_file(d.join("notes.txt")).expect("rm");
    fs::write(d.join("FORMAT"), "podcache data directory, format 4\n").expect("format");
    let err = DataDir::open(&d, Fsync::Never, 4096).expect_err("format 4");
    assert!(err.to_string().contains("format 4"), "{err}");
    let _ = fs::remove_dir_all(&d);
}

/// A freshly formatted volume holds `lost+found`: it is not a foreign
/// file (but a plain file of that name is).
#[test]
fn a_new_volume_with_lost_and_found_is_taken() {
    let d = dir("lost-found");
    fs::create_dir_all(d.join("lost+found")).expect("lost+found");
    let (data, _) = DataDir::open(&d, Fsync::Always, 4096).expect("a new volume is taken");
    data.append(&[record("a", 1)]).expect("append");
    drop(data);
    let (_, recovered) = DataDir::open(&d, Fsync::Always, 4096).expect("reopen");
    assert_eq!(keys(&recovered), ["a"]);
    let e = dir("lost-found-file");
    fs::create_dir_all(&e).expect("dir");
    fs::write(e.join("lost+found"), "a file").expect("file");
    assert!(DataDir::open(&e, Fsync::Never, 4096).is_err());
    let _ = fs::remove_dir_all(&d);
    let _ = fs::remove_dir_all(&e);
}

/// A directory of format 2 (before batches and history) is read as it is
/// and marked format 3, which a podcache of format 2 refuses.
#[test]
fn a_format_2_directory_is_read_and_marked_format_3() {
    let d = dir("format2");
    fs::create_dir_all(&d).expect("dir");
    fs::write(d.join("FORMAT"), FORMAT_2).expect("format");
    {
        let (data, _) = DataDir::open(&d, Fsync::Always, 4096).expect("a new directory");
        data.append(&[record("a", 1)]).expect("append");
        data.sync().expect("sync");
    }
    fs::write(d.join("FORMAT"), FORMAT_2).expect("format 2 again");
    let (_, recovered) = DataDir::open(&d, Fsync::Always, 4096).expect("format 2 is read");
    assert_eq!(keys(&recovered), ["a"]);
    assert_eq!(
        fs::read_to_string(d.join("FORMAT")).expect("format"),
        FORMAT
    );
    assert!(FORMAT.contains("format 3"));
}

/// A directory an older podcache wrote (format 1) is read, then written
/// in format 2 from the first change on, and compacted into it.
#[test]
fn a_format_1_directory_is_read_and_upgraded() {
    let d = dir("format1");
    fs::create_dir_all(&d).expect("dir");
    fs::write(d.join("FORMAT"), FORMAT_1).expect("format");
    let mut log = frame::LOG_MAGIC_V1.to_vec();
    for r in [record("a", 1), record("b", 2)] {
        let at = log.len() as u64;
        frame::put(frame::Framing::V1, at, &r, &mut log);
    }
    fs::write(d.join(name_of("log", 0)), &log).expect("log");
    let (data, recovered) = DataDir::open(&d, Fsync::Always, 4096).expect("format 1 is read");
    assert_eq!(keys(&recovered), ["a", "b"]);
    assert_eq!(
        fs::read_to_string(d.join("FORMAT")).expect("format"),
        FORMAT
    );
    assert!(
        data.wants_compaction(),
        "the state is rewritten in format 2"
    );
    data.append(&[record("c", 3)]).expect("append");
    let mut state = recovered.records.clone();
    state.push(record("c", 3));
    data.compact(|| state).expect("compact");
    drop(data);
    assert!(
        !d.join(name_of("log", 0)).exists(),
        "the format-1 log is gone"
    );
    let (_, recovered) = DataDir::open(&d, Fsync::Always, 4096).expect("reopen");
    assert_eq!(keys(&recovered), ["a", "b", "c"]);
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
    let (data, recovered) = DataDir::open(&d, Fsync::Always, 4096).expect("reopen");
    assert_eq!(keys(&recovered), ["a", "b", "c"]);
    fs::write(
        d.join(format!("{}.tmp", name_of("snapshot", generation + 1))),
        b"PCSNP",
    )
    .expect("tmp");
    drop(data);
    let (data, recovered) = DataDir::open(&d, Fsync::Always, 4096).expect("reopen");
    assert_eq!(keys(&recovered), ["a", "b", "c"]);
    let old_log = fs::read(d.join(name_of("log", 0))).expect("old log");
    data.compact(|| recovered.records.clone())
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
    let disk = SimDisk::default();
    let (data, _) = open_sim(&disk, Fsync::Never).expect("open");
    data.append(&[record("a", 1)]).expect("append");
    disk.set_faults(Faults {
        space_left: Some(5),
        ..Faults::default()
    });
    assert!(matches!(
        data.append(&[record("b", 2)]),
        Err(DiskError::Full(_))
    ));
    assert!(!data.healthy());
    disk.set_faults(Faults::default());
    assert!(
        data.append(&[record("c", 3)]).is_err(),
        "refused until it clears"
    );
    data.retry_after_failure();
    data.append(&[record("c", 3)]).expect("append");
    drop(data);
    let (_, recovered) = open_sim(&disk.image().restarted(), Fsync::Never).expect("no damage");
    assert_eq!(keys(&recovered), ["a", "c"]);
}

/// A failed append whose cut-back fails too leaves a partial record: the
/// log is not appended to again, a snapshot is needed, and it starts a new
/// log, so the next start finds no damage.
#[test]
fn a_failed_cut_back_leaves_the_log_for_a_new_one() {
    let disk = SimDisk::default();
    let (data, _) = open_sim(&disk, Fsync::Never).expect("open");
    data.append(&[record("a", 1)]).expect("append");
    disk.set_faults(Faults {
        space_left: Some(5),
        fail_next_set_len: true,
        ..Faults::default()
    });
    assert!(data.append(&[record("b", 2)]).is_err());
    disk.set_faults(Faults::default());
    data.retry_after_failure();
    assert!(
        data.append(&[record("c", 3)]).is_err(),
        "a snapshot is needed"
    );
    assert!(data.wants_compaction());
    let before = data.log().generation;
    data.compact(|| vec![record("a", 1)]).expect("compact");
    assert_ne!(data.log().generation, before, "a new log");
    data.append(&[record("c", 3)]).expect("append");
    drop(data);
    let (_, recovered) = open_sim(&disk.image().restarted(), Fsync::Never).expect("no damage");
    assert_eq!(keys(&recovered), ["a", "c"]);
}

/// A failed fsync stays failed: a later fsync's success proves nothing
/// (the kernel dropped the pages), so waiters get the error, writes are
/// refused, and only a snapshot whose state was taken after the failure
/// clears it.
#[test]
fn a_failed_fsync_stays_failed_until_a_later_snapshot() {
    let disk = SimDisk::default();
    let (data, _) = open_sim(&disk, Fsync::Always).expect("open");
    let first = data.append(&[record("a", 1)]).expect("append");
    data.sync().expect("sync");
    assert!(matches!(data.durable_now(first), Some(Ok(()))));
    let lost = data.append(&[record("b", 2)]).expect("append");
    let stale_mark = data.snapshot_mark();
    disk.set_faults(Faults {
        fail_next_sync: true,
        ..Faults::default()
    });
    assert!(data.sync().is_err());
    assert!(matches!(data.durable_now(lost), Some(Err(_))));
    // The disk would now report success; the failure stands.
    assert!(data.sync().is_err());
    assert!(matches!(data.durable_now(lost), Some(Err(_))));
    assert!(data.append(&[record("c", 3)]).is_err());
    data.retry_after_failure();
    assert!(!data.healthy(), "a retry does not clear a failed fsync");
    // A snapshot whose state was taken before the failure clears nothing.
    let generation = data.next_generation().expect("switch");
    data.write_snapshot(generation, &[record("a", 1)], &[], stale_mark)
        .expect("snapshot");
    assert!(!data.healthy());
    assert!(data.wants_compaction());
    data.compact(|| vec![record("a", 1), record("b", 2)])
        .expect("snapshot");
    assert!(data.healthy());
    assert!(matches!(data.durable_now(lost), Some(Ok(()))));
    data.append(&[record("c", 3)]).expect("append");
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
    fs::OpenOptions::new()
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
    let disk = SimDisk::default();
    let (data, _) = open_sim(&disk, Fsync::Never).expect("open");
    data.append(&[record("a", 1)]).expect("append");
    let mark = data.snapshot_mark();
    let generation = data.next_generation().expect("switch");
    data.request_compaction();
    data.write_snapshot(generation, &[record("a", 1)], &[], mark)
        .expect("snapshot");
    assert!(data.wants_compaction(), "the later request stays");
    data.compact(|| vec![record("a", 1)]).expect("snapshot");
    assert!(!data.wants_compaction());
}

/// A switch to a new log leaves the old one to the next sync, and an
/// `always` waiter is released only by a sync that covered it.
#[test]
fn the_old_log_is_synced_before_its_changes_count_as_on_disk() {
    let disk = SimDisk::default();
    let (data, _) = open_sim(&disk, Fsync::Always).expect("open");
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
    // failing snapshot's retries do not pile up files and handles.
    let generation = data.log().generation;
    assert_eq!(data.next_generation().expect("reuse"), generation);
    assert_eq!(data.log().retiring.len(), 2);
    assert!(data.durable_now(lsn).is_none());
    data.sync().expect("sync");
    assert!(data.log().retiring.is_empty());
    assert!(matches!(data.durable_now(lsn), Some(Ok(()))));
    drop(data);
    let (data, _) = open_sim(&disk.image().restarted(), Fsync::Never).expect("reopen");
    data.append(&[record("c", 3)]).expect("append");
    data.next_generation().expect("switch");
    assert!(
        data.log().retiring.is_empty(),
        "with never, none are kept open"
    );
}

/// `SYNCED` is written whole; state without it is dated by its newest
/// record, so a node down longer than the grace since is stale.
#[test]
fn the_sync_time_is_atomic_and_its_absence_dates_the_state_by_its_newest_record() {
    let disk = SimDisk::default();
    let (data, recovered) = open_sim(&disk, Fsync::Always).expect("open");
    assert_eq!(recovered.last_sync_ms, 0, "nothing loaded: not stale");
    data.append(&[record("a", 1)]).expect("append");
    data.sync().expect("sync");
    drop(data);
    let disk = disk.image().restarted();
    let (data, recovered) = open_sim(&disk, Fsync::Always).expect("reopen");
    assert_eq!(
        recovered.last_sync_ms,
        crate::store::clock::hlc_ms(1).max(1),
        "state without SYNCED: as old as its newest record"
    );
    data.save_last_sync(12345).expect("save");
    let image = disk.image();
    drop(data);
    let mut rng = sim::SimRng::new(7);
    for _ in 0..50 {
        let crashed = image.crash(&mut rng);
        let (_, recovered) = open_sim(&crashed, Fsync::Always).expect("reopen after a power cut");
        assert_eq!(recovered.last_sync_ms, 12345);
    }
}

/// Records larger than the framing may hold are refused, not written with
/// a wrong length.
#[test]
fn a_record_past_the_frame_cap_is_refused() {
    let disk = SimDisk::default();
    let (data, _) = open_sim(&disk, Fsync::Never).expect("open");
    let big = "x".repeat(frame::MAX_PAYLOAD + 1);
    let r = Record::new(1, "big", Some(&big), Version { hlc: 1, node: 1 }, 0);
    assert!(data.append(&[r]).is_err());
    drop(data);
    let (_, recovered) = open_sim(&disk.image().restarted(), Fsync::Never).expect("no damage");
    assert!(recovered.records.is_empty());
}
