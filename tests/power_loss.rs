//! The power-loss search: seeded random workloads against the real data
//! directory and store code on a simulated disk (`durability::sim`) that
//! loses what was never synced, with a power cut at every storage call the
//! workload makes, after FoundationDB's simulation, TigerBeetle's VOPR and
//! the ALICE study of crash states.
//!
//! A workload drives the calls the replica makes, in its order: a local
//! write is appended inside the store's commit and answered once
//! `durable` says so (`--fsync always`); an import is merged, appended,
//! and answered the same way; purges drop tombstones and expired entries
//! past the grace and ask for a compaction; compactions, failed and
//! retried `fsync`s (EIO that drops dirty pages), a full disk, a failed
//! cut-back, clean restarts and power cuts come at random. After every
//! storage call the disk's state is kept; each is then cut several ways
//! (any unsynced suffix of a file lost, cut at any byte or zero-filled by
//! pages; any unsynced directory entry undone), recovered with
//! `DataDir::open_on` and `Store::load`, and checked against an oracle:
//!
//! - the directory opens (one that only lost power is never refused);
//! - every write answered under `always` is there with its value, or a
//!   newer version of its key is (nothing acknowledged is lost);
//! - no key holds a version older than its last answered write (nothing
//!   deleted or overwritten comes back, purged or not);
//! - every version held was written with exactly that value;
//! - a byte flipped in a synced record that has a record after it is
//!   refused as damage, never cut off as a torn tail.
//!
//! `PODCACHE_POWER_SEEDS=N` (default 24) and `PODCACHE_POWER_SEED=S` (one
//! seed, to replay a failure) choose the seeds; a failure prints the seed.
//! The long run: `PODCACHE_POWER_SEEDS=2000 cargo test --release --test
//! power_loss`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use podcache::durability::sim::{Faults, Image, SimDisk, SimRng};
use podcache::durability::{DataDir, DiskError, DurabilityError, Fsync};
use podcache::store::clock::hlc_from_ms;
use podcache::store::{Change, Limits, Meta, Record, Store, Version};

const GRACE_MS: u64 = 10_000;
const KEYS: u64 = 12;
const STEPS: usize = 160;
const CUTS_PER_POINT: usize = 3;

/// What the oracle knows of one key.
#[derive(Debug, Default, Clone)]
struct KeyModel {
    /// The newest answered write: version, value (None: deleted), expiry.
    acked: Option<(Version, Option<String>, u64)>,
    /// Every version ever written (answered or not): value and expiry.
    written: HashMap<Version, (Option<String>, u64)>,
    /// Values of writes the data directory refused (a full disk): a power
    /// cut between the partial write and its cut-back may keep whole
    /// records of it (see docs/GUARANTEES.md).
    refused: Vec<Option<String>>,
}

#[derive(Debug, Default, Clone)]
struct Oracle {
    keys: HashMap<(i32, String), KeyModel>,
}

impl Oracle {
    fn wrote(&mut self, records: &[Record]) {
        for r in records {
            self.keys
                .entry((r.ty, r.key().to_owned()))
                .or_default()
                .written
                .insert(
                    r.entry.version(),
                    (r.entry.value().map(str::to_owned), r.entry.expires_at_ms()),
                );
        }
    }

    fn acked(&mut self, records: &[Record]) {
        for r in records {
            let model = self.keys.entry((r.ty, r.key().to_owned())).or_default();
            let v = r.entry.version();
            if model.acked.as_ref().is_none_or(|(a, _, _)| *a < v) {
                model.acked = Some((
                    v,
                    r.entry.value().map(str::to_owned),
                    r.entry.expires_at_ms(),
                ));
            }
        }
    }

    /// Checks a recovered store at `now`.
    fn check(&self, store: &Store, now: u64) -> Result<(), String> {
        let held: HashMap<(i32, String), Record> = store
            .snapshot()
            .into_iter()
            .map(|r| ((r.ty, r.key().to_owned()), r))
            .collect();
        for ((ty, key), r) in &held {
            let model = self
                .keys
                .get(&(*ty, key.clone()))
                .ok_or_else(|| format!("{ty}/{key}: held but never written"))?;
            let v = r.entry.version();
            let refused = || {
                model
                    .refused
                    .iter()
                    .any(|x| x.as_deref() == r.entry.value())
            };
            match model.written.get(&v) {
                Some((value, _)) if value.as_deref() == r.entry.value() => {}
                None if refused() => {}
                other => {
                    return Err(format!(
                        "{ty}/{key}: version {v:?} holds {:?}, written as {other:?} (written: {:?})",
                        r.entry.value(),
                        model.written
                    ));
                }
            }
        }
        // A batch is all or nothing: once one of its keys holds the
        // batch's version, none of its other keys holds an older one.
        for r in held.values().filter(|r| r.entry.in_batch()) {
            let v = r.entry.version();
            for (key, model) in &self.keys {
                if !model.written.contains_key(&v) || key.1 == r.key() {
                    continue;
                }
                if let Some(other) = held.get(key)
                    && other.entry.version() < v
                {
                    return Err(format!(
                        "{}/{}: holds {:?} older than its batch {v:?}, whose {} was kept: a batch came back in part",
                        key.0,
                        key.1,
                        other.entry.version(),
                        r.key()
                    ));
                }
            }
        }
        for ((ty, key), model) in &self.keys {
            let Some((acked, value, expires)) = &model.acked else {
                continue;
            };
            match held.get(&(*ty, key.clone())) {
                Some(r) if r.entry.version() < *acked => {
                    return Err(format!(
                        "{ty}/{key}: holds {:?} at {:?}, older than the answered {value:?} at {acked:?} (a deleted or overwritten value came back, or an answered write was lost)",
                        r.entry.value(),
                        r.entry.version()
                    ));
                }
                Some(_) => {}
                None => {
                    // Absent is right when the answered write, or a newer
                    // one (answered or not, so possibly on disk), is a
                    // delete or expired: the load purged it.
                    let gone = |(value, expires): &(Option<String>, u64)| {
                        value.is_none() || (*expires != 0 && *expires <= now)
                    };
                    let gone = gone(&(value.clone(), *expires))
                        || model
                            .written
                            .iter()
                            .any(|(v, written)| v > acked && gone(written));
                    if !gone {
                        return Err(format!(
                            "{ty}/{key}: the answered {value:?} at {acked:?} is lost"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// One workload against one simulated disk.
struct Run {
    rng: SimRng,
    disk: SimDisk,
    data: Option<DataDir>,
    store: Store,
    oracle: Oracle,
    now: u64,
    /// Another writer's versions, for imports.
    import_hlc: u64,
    /// Changes appended and not yet answered (waiting for a sync).
    waiting: Vec<(u64, Vec<Record>)>,
    crash_states: u64,
    damage_checks: u64,
}

fn open(disk: &SimDisk) -> Result<(DataDir, podcache::durability::Recovered), DurabilityError> {
    DataDir::open_on(
        Arc::new(disk.clone()),
        Path::new("sim"),
        Fsync::Always,
        4096,
    )
}

fn load(recovered: podcache::durability::Recovered, now: u64) -> Store {
    let store = Store::new(1, Limits::default());
    store.load(recovered.records, now, now.saturating_sub(GRACE_MS));
    store.keep_history(recovered.history);
    store
}

impl Run {
    fn new(seed: u64) -> Result<Self, String> {
        let disk = SimDisk::default();
        disk.set_salt_seed(seed);
        if seed.is_multiple_of(3) {
            disk.add_dir("lost+found");
        }
        // A power cut while a new directory is set up (FORMAT, the first
        // log) must leave one that opens too.
        disk.set_capture(true);
        let (data, _) = open(&disk).map_err(|e| format!("a new directory: {e}"))?;
        disk.set_capture(false);
        let setup = disk.take_points();
        let mut run = Self {
            rng: SimRng::new(seed),
            disk,
            data: Some(data),
            store: Store::new(1, Limits::default()),
            oracle: Oracle::default(),
            now: 1_700_000_000_000,
            import_hlc: hlc_from_ms(1_700_000_000_000),
            waiting: Vec::new(),
            crash_states: 0,
            damage_checks: 0,
        };
        let empty = Oracle::default();
        run.explore(setup, &empty)
            .map_err(|e| format!("setting up: {e}"))?;
        Ok(run)
    }

    fn data(&self) -> &DataDir {
        self.data
            .as_ref()
            .expect("a data directory is open between steps")
    }

    /// The replica's answer to a change appended at `lsn`: after the
    /// loop's sync, durable or not.
    /// A change appended at `lsn` waits for its answer: the loop's next
    /// sync, which several writes may share (group commit), or a later one.
    fn answered(&mut self, lsn: Option<u64>, records: &[Record]) {
        self.oracle.wrote(records);
        let Some(lsn) = lsn else { return };
        self.waiting.push((lsn, records.to_vec()));
        if self.rng.one_in(3) {
            self.settle();
        }
    }

    /// The syncer's round: writes whose sequence number it covered are
    /// answered; those it failed are answered with the error.
    fn settle(&mut self) {
        let _ = self.data().sync();
        let waiting = std::mem::take(&mut self.waiting);
        for (lsn, records) in waiting {
            match self.data().durable_now(lsn) {
                Some(Ok(())) => {
                    if std::env::var_os("PODCACHE_POWER_TRACE").is_some() {
                        eprintln!("  acked lsn {lsn}: {}", self.disk.image().describe());
                    }
                    self.oracle.acked(&records)
                }
                Some(Err(_)) => {}
                None => self.waiting.push((lsn, records)),
            }
        }
    }

    fn key(&mut self) -> String {
        format!("k{}", self.rng.below(KEYS))
    }

    fn step(&mut self) -> Result<(), String> {
        self.now += self.rng.below(1500);
        let roll = self.rng.below(100);
        if std::env::var_os("PODCACHE_POWER_TRACE").is_some() {
            eprintln!(
                "roll {roll} now {} healthy {}",
                self.now,
                self.data().healthy()
            );
        }
        match roll {
            0..=34 => {
                let key = self.key();
                // Now and then a value that spans pages.
                let value = if self.rng.one_in(6) {
                    format!(
                        "{}-v{}",
                        "x".repeat(self.rng.below(6000) as usize),
                        self.rng.below(1000)
                    )
                } else {
                    format!("v{}", self.rng.below(1000))
                };
                let ttl = self.rng.one_in(5).then(|| 1 + self.rng.below(5));
                self.write(Change::Set {
                    ty: 1,
                    key: &key,
                    value: &value,
                    ttl_secs: ttl,
                });
            }
            35..=44 => {
                let (a, b) = (self.key(), self.key());
                if a != b {
                    // Sometimes a rollout that deletes one key.
                    let gone = if self.rng.one_in(3) {
                        None
                    } else {
                        Some("batch-b")
                    };
                    let entries = [(a.as_str(), Some("batch-a")), (b.as_str(), gone)];
                    self.write(Change::Batch {
                        ty: 1,
                        entries: &entries,
                        ttl_secs: None,
                    });
                }
            }
            45..=64 => {
                let key = self.key();
                self.write(Change::Delete { ty: 1, key: &key });
            }
            65..=69 => self.import(),
            70..=77 => {
                // A purge after the grace, as the expiry loop does.
                self.now += GRACE_MS / 2 + self.rng.below(GRACE_MS);
                let purged = self.store.purge(self.now, GRACE_MS);
                if purged > 0 {
                    self.data().request_compaction();
                }
            }
            78..=85 => self.tick(),
            86..=88 => {
                let _ = self
                    .data()
                    .compact_with_history(|| self.store.snapshot_with_history());
            }
            89..=91 => self.faults(),
            92..=94 => self.restart(None)?,
            _ => {
                let image = self.disk.image();
                self.restart(Some(image))?;
            }
        }
        Ok(())
    }

    fn write(&mut self, change: Change<'_>) {
        let mut lsn = None;
        let data = self.data.as_ref().expect("open");
        let meta = Arc::new(Meta::new(
            "sim",
            "sim-0",
            None,
            matches!(change, Change::Batch { .. }),
        ));
        let mut committed = self.store.commit(change, self.now, Some(meta), |records| {
            data.append(records).map(|at| lsn = Some(at))
        });
        // As the replica does: nothing to write still answers only for
        // what the disk holds.
        if let Ok(records) = &committed
            && records.is_empty()
        {
            match data.append(&[]) {
                Ok(at) => lsn = Some(at),
                Err(e) => committed = Err(podcache::store::Refused::Hook(e)),
            }
        }
        if std::env::var_os("PODCACHE_POWER_TRACE").is_some() {
            eprintln!("  write {committed:?} lsn {lsn:?}");
        }
        if committed.is_err() {
            let tried: Vec<(&str, Option<&str>)> = match &change {
                Change::Set { key, value, .. } => vec![(key, Some(value))],
                Change::Batch { entries, .. } => entries.to_vec(),
                Change::Delete { key, .. } => vec![(key, None)],
                _ => Vec::new(),
            };
            for (key, value) in tried {
                self.oracle
                    .keys
                    .entry((1, key.to_owned()))
                    .or_default()
                    .refused
                    .push(value.map(str::to_owned));
            }
        }
        if let Ok(records) = committed {
            let noop_delete = match change {
                Change::Delete { ty, key } if records.is_empty() => Some((ty, key)),
                _ => None,
            };
            match noop_delete {
                // Answered "deleted" without a record: the key's tombstone
                // (if the store holds one) must be on disk as the answer
                // says.
                Some((ty, key)) => {
                    let held: Vec<Record> = self
                        .store
                        .snapshot()
                        .into_iter()
                        .filter(|r| r.ty == ty && r.key() == key && r.entry.is_tombstone())
                        .collect();
                    if let Some(lsn) = lsn {
                        self.waiting.push((lsn, held));
                        if self.rng.one_in(3) {
                            self.settle();
                        }
                    }
                }
                None => self.answered(lsn, &records),
            }
        }
    }

    fn import(&mut self) {
        let n = 1 + self.rng.below(3);
        let mut records = Vec::new();
        for _ in 0..n {
            // A backup's versions are from the past: a version ahead of
            // this node's clock would pull its clock ahead, and a restart
            // after a power cut could then issue a lost version again (the
            // clock is not saved; see docs/GUARANTEES.md).
            self.import_hlc = (self.import_hlc + 1)
                .max(hlc_from_ms(self.now.saturating_sub(self.rng.below(5_000))));
            let key = self.key();
            let value = (!self.rng.one_in(4)).then(|| format!("imported-{}", self.rng.below(100)));
            records.push(Record::new(
                1,
                &key,
                value.as_deref(),
                Version {
                    hlc: self.import_hlc,
                    node: 99,
                },
                0,
            ));
        }
        if !self.data().healthy() {
            return;
        }
        // The replica's import: merged, appended under the same lock.
        let data = self.data.as_ref().expect("open");
        let mut disk: Result<u64, DiskError> = Ok(0);
        let outcome = self.store.merge_logged(
            records.clone(),
            self.now,
            self.now.saturating_sub(GRACE_MS),
            |applied| disk = data.append_applied(applied),
        );
        self.oracle.wrote(&records);
        if std::env::var_os("PODCACHE_POWER_TRACE").is_some() {
            eprintln!("  import {:?} disk {disk:?}", outcome.applied);
        }
        if let Ok(lsn) = disk {
            let applied = outcome.applied.clone();
            self.answered(Some(lsn), &applied);
        }
    }

    /// The durability loop's round: sync, retry, compact when wanted.
    fn tick(&mut self) {
        self.settle();
        let data = self.data();
        data.retry_after_failure();
        if data.wants_compaction() {
            let _ = data.compact(|| self.store.snapshot());
        }
    }

    fn faults(&mut self) {
        let faults = match self.rng.below(3) {
            0 => Faults {
                fail_next_sync: true,
                ..Faults::default()
            },
            1 => Faults {
                space_left: Some(self.rng.below(200)),
                ..Faults::default()
            },
            _ => Faults {
                space_left: Some(self.rng.below(50)),
                fail_next_set_len: true,
                ..Faults::default()
            },
        };
        self.disk.set_faults(faults);
        // A few steps on, the disk is well again (the space budget is
        // lifted by the next fault roll or restart).
    }

    /// A restart: of the process (the page cache survives) or, with an
    /// image, after a power cut at this moment.
    fn restart(&mut self, cut: Option<Image>) -> Result<(), String> {
        self.data = None;
        self.waiting.clear();
        self.disk.kill_handles();
        // A restart takes time: the wall clock, which versions follow,
        // has moved on past every version issued before it (a lost one
        // is not issued again).
        self.now += 1_000 + self.rng.below(2_000);
        self.disk = match cut {
            None => self.disk.image().restarted(),
            Some(image) => image.crash(&mut self.rng),
        };
        let (data, recovered) = open(&self.disk).map_err(|e| format!("restart refused: {e}"))?;
        self.store = load(recovered, self.now);
        self.oracle.check(&self.store, self.now)?;
        self.data = Some(data);
        Ok(())
    }

    /// Cuts the power at each point the last step reached, several ways,
    /// and checks every recovery.
    fn explore(&mut self, points: Vec<Image>, oracle: &Oracle) -> Result<(), String> {
        for (i, point) in points.iter().enumerate() {
            for cut in 0..CUTS_PER_POINT {
                let crashed = point.crash(&mut self.rng);
                let (data, recovered) = open(&crashed).map_err(|e| {
                    format!(
                        "point {i} cut {cut}: a directory that only lost power was refused: {e}\n{:?}",
                        point.listing()
                    )
                })?;
                drop(data);
                let dump = std::env::var_os("PODCACHE_POWER_TRACE")
                    .map(|_| format!("{:?}", recovered.records))
                    .unwrap_or_default();
                let store = load(recovered, self.now);
                oracle.check(&store, self.now).map_err(|e| {
                    format!("point {i} cut {cut}: {e}\n{}\n{dump}", point.describe())
                })?;
                self.crash_states += 1;
                if cut == 0 && self.rng.one_in(8) {
                    self.damage(&crashed)?;
                }
            }
        }
        Ok(())
    }

    /// Flips a byte in the first record of a file that holds a second
    /// one: recovery must refuse it as damage.
    fn damage(&mut self, crashed: &SimDisk) -> Result<(), String> {
        let mut image = crashed.image();
        let mut target = None;
        for (name, _) in image.listing() {
            let Some(bytes) = image.contents(&name) else {
                continue;
            };
            let is_ours = name.starts_with("log-") || name.starts_with("snapshot-");
            if !is_ours
                || name.ends_with(".tmp")
                || bytes.len() < 32
                || bytes[5] != 0
                || bytes[6] != 2
            {
                continue;
            }
            let first = u32::from_le_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]) as usize;
            let second = 24 + 8 + first;
            if second + 8 > bytes.len() {
                continue;
            }
            let second_len = u32::from_le_bytes([
                bytes[second],
                bytes[second + 1],
                bytes[second + 2],
                bytes[second + 3],
            ]) as usize;
            if second + 8 + second_len <= bytes.len() {
                target = Some((name.clone(), 24 + 8 + first / 2));
                break;
            }
        }
        let Some((name, offset)) = target else {
            return Ok(());
        };
        image.damage(&name, offset);
        match open(&image.restarted()) {
            Err(DurabilityError::Damaged { .. }) => {
                self.damage_checks += 1;
                Ok(())
            }
            // A newer snapshot may make the damaged log obsolete.
            Ok(_) if !newest_generation(&image, &name) => Ok(()),
            other => Err(format!(
                "a byte flipped at {offset} of {name} was not refused as damage: {:?}",
                other.map(|_| "opened")
            )),
        }
    }
}

/// True when `name` is read at recovery (no newer snapshot than it).
fn newest_generation(image: &Image, name: &str) -> bool {
    let generation = |n: &str| n.rsplit('-').next().and_then(|g| g.parse::<u64>().ok());
    let Some(g) = generation(name) else {
        return false;
    };
    !image.listing().iter().any(|(n, _)| {
        n.starts_with("snapshot-") && !n.ends_with(".tmp") && generation(n).is_some_and(|s| s > g)
    })
}

fn run(seed: u64) -> Result<(u64, u64), String> {
    let mut run = Run::new(seed)?;
    for step in 0..STEPS {
        let before = run.oracle.clone();
        run.disk.set_capture(true);
        let stepped = run.step();
        let mut points = run.disk.take_points();
        run.disk.set_capture(false);
        stepped.map_err(|e| format!("step {step}: {e}"))?;
        // Inside the step nothing was answered yet: what was answered
        // before it must hold (with this step's values known).
        let during = Oracle {
            keys: run
                .oracle
                .keys
                .iter()
                .map(|(k, m)| {
                    let acked = before.keys.get(k).and_then(|b| b.acked.clone());
                    let mut model = m.clone();
                    model.acked = acked;
                    (k.clone(), model)
                })
                .collect(),
        };
        let last = points.pop();
        run.explore(points, &during)
            .map_err(|e| format!("step {step}: {e}"))?;
        // After it, what it answered must hold too.
        let after = run.oracle.clone();
        let end = last
            .into_iter()
            .chain(std::iter::once(run.disk.image()))
            .collect();
        run.explore(end, &after)
            .map_err(|e| format!("step {step}, at its end: {e}"))?;
        // Lift a full disk after a while, as an operator would.
        if run.rng.one_in(6) {
            run.disk.set_faults(Faults::default());
        }
    }
    Ok((run.crash_states, run.damage_checks))
}

#[test]
fn power_cuts_at_every_step_lose_no_answered_write_and_bring_nothing_back() {
    let seeds: Vec<u64> = match std::env::var("PODCACHE_POWER_SEED") {
        Ok(s) => vec![s.parse().expect("PODCACHE_POWER_SEED is a number")],
        Err(_) => {
            let n = std::env::var("PODCACHE_POWER_SEEDS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(24u64);
            (1..=n).collect()
        }
    };
    let started = tokio::time::Instant::now();
    let (mut states, mut damage) = (0, 0);
    for seed in &seeds {
        match run(*seed) {
            Ok((s, d)) => {
                states += s;
                damage += d;
            }
            Err(e) => panic!("seed {seed} failed (replay: PODCACHE_POWER_SEED={seed}): {e}"),
        }
    }
    eprintln!(
        "power-loss search: {} seeds, {states} crash states recovered and checked, {damage} damaged directories refused, in {:.1}s",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    if seeds.len() >= 24 {
        assert!(states >= 10_000, "explored only {states} crash states");
    }
}
