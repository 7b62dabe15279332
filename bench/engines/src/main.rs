//! Measures podcache's data-directory log against fjall and redb on
//! podcache's workload, side by side in one run, each measurement
//! repeated with the engines interleaved. See README.md.

mod podcache_dir;
mod stores;
mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use podcache::durability::{DataDir, Fsync};
// The project's clock type (see .clippy.toml); outside a paused test
// runtime it is the monotonic clock itself.
use tokio::time::Instant;

use crate::stores::{Fjall, Redb, Store};

/// What the command line set.
struct Args {
    /// Seconds each write run lasts (default 5).
    seconds: f64,
    /// Concurrent writers (default 16).
    writers: usize,
    /// Entries loaded for the restart and space measurements (default
    /// 1,000,000).
    entries: u64,
    /// Repetitions of each measurement (default 3).
    reps: usize,
    /// Where the engines' directories go (default: a new directory in the
    /// system's temp directory).
    dir: PathBuf,
    /// `writes`, `restart` or `all` (default).
    only: String,
    /// Only the write runs and engines whose name contains this.
    filter: String,
    /// Only the write runs of the policies whose name contains this.
    policies: String,
    /// Leave every directory in place (to look at the files).
    keep: bool,
}

fn args() -> Result<Args> {
    let mut args = Args {
        seconds: 5.0,
        writers: 16,
        entries: 1_000_000,
        reps: 3,
        dir: std::env::temp_dir().join(format!("podcache-bench-engines-{}", std::process::id())),
        only: "all".into(),
        filter: String::new(),
        policies: String::new(),
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => args.seconds = value()?.parse()?,
            "--writers" => args.writers = value()?.parse()?,
            "--entries" => args.entries = value()?.parse()?,
            "--reps" => args.reps = value()?.parse()?,
            "--dir" => args.dir = value()?.into(),
            "--only" => args.only = value()?,
            "--filter" => args.filter = value()?,
            "--policies" => args.policies = value()?,
            "--keep" => args.keep = true,
            "-h" | "--help" => {
                println!(
                    "usage: podcache-bench-engines [--seconds 5] [--writers 16] [--entries 1000000] [--reps 3] [--dir DIR] [--only writes|restart|all] [--filter NAME] [--policies NAME] [--keep]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(args)
}

/// The three durability policies, as podcache names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Policy {
    /// Durable before the write is answered.
    Always,
    /// Synced once a second.
    Interval,
    /// Never synced by the program.
    Never,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Always => "always",
            Policy::Interval => "interval (1 s)",
            Policy::Never => "never",
        }
    }

    fn fsync(self) -> Fsync {
        match self {
            Policy::Always => Fsync::Always,
            Policy::Interval => Fsync::Interval,
            Policy::Never => Fsync::Never,
        }
    }
}

/// One engine in one configuration of the write measurement.
#[derive(Clone, Copy, Debug)]
enum Writer {
    /// podcache's write path in an in-process node (`NodeHandle::set`),
    /// each writer a thread of its own.
    PodcacheNode,
    /// The same, each writer a task on the node's runtime (as REST
    /// handlers are); only with `always`, where every write waits.
    PodcacheNodeTasks,
    /// `DataDir::append` alone, no background loop (never synced).
    PodcacheAppend,
    /// Each writer commits itself (fjall: insert, then
    /// `persist(SyncData)` with `always`; redb: one transaction).
    Native(Kind),
    /// Writers hand their entry to one committer thread, which writes all
    /// that are waiting in one durable commit (group commit in front of
    /// the engine, as podcache does inside its log).
    Grouped(Kind),
    /// Reference: one thread appending 143 bytes and `fdatasync`ing, in a
    /// loop (what one `fsync` costs on this disk).
    RawFsync,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Fjall,
    Redb,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Fjall => "fjall",
            Kind::Redb => "redb",
        }
    }

    fn open(self, dir: &Path) -> Result<Arc<dyn Store>> {
        Ok(match self {
            Kind::Fjall => Arc::new(Fjall::open(dir)?),
            Kind::Redb => Arc::new(Redb::open(dir)?),
        })
    }
}

impl Writer {
    fn name(self) -> String {
        match self {
            Writer::PodcacheNode => "podcache log (node write path)".into(),
            Writer::PodcacheNodeTasks => "podcache log (node write path, writers as tasks)".into(),
            Writer::PodcacheAppend => "podcache log (DataDir::append alone)".into(),
            Writer::Native(kind) => format!("{} (each writer commits)", kind.name()),
            Writer::Grouped(kind) => format!("{} (group commit in front)", kind.name()),
            Writer::RawFsync => "reference: 1 thread, append + fdatasync".into(),
        }
    }
}

/// The result of one write run.
struct WriteRun {
    ops: u64,
    elapsed: Duration,
    /// Every write's latency, microseconds.
    latencies: Vec<u32>,
}

/// Collected samples: (table, row, column) → one value per repetition,
/// and the order in which each (table, row, column) first came.
#[derive(Default)]
struct Samples {
    values: BTreeMap<(String, String, String), Vec<f64>>,
    order: Vec<(String, String, String)>,
}

impl Samples {
    fn add(&mut self, table: &str, row: &str, column: &str, value: f64) {
        println!("  {table} | {row} | {column}: {value:.3}");
        let key = (table.to_owned(), row.to_owned(), column.to_owned());
        if !self.values.contains_key(&key) {
            self.order.push(key.clone());
        }
        self.values.entry(key).or_default().push(value);
    }
}

fn main() -> Result<()> {
    let args = args()?;
    std::fs::create_dir_all(&args.dir)?;
    let dir = args.dir.canonicalize()?;
    println!(
        "# podcache-bench-engines: dir {} on {}, {} writers, {} s per write run, {} entries, {} repetitions",
        dir.display(),
        filesystem_of(&dir),
        args.writers,
        args.seconds,
        args.entries,
        args.reps
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut samples = Samples::default();
    let result = (|| {
        if args.only == "all" || args.only == "writes" {
            writes(&args, &dir, &runtime, &mut samples)?;
        }
        if args.only == "all" || args.only == "restart" {
            restarts(&args, &dir, &runtime, &mut samples)?;
        }
        Ok::<_, anyhow::Error>(())
    })();
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result?;
    report(&samples);
    Ok(())
}

/// Measurement 1: single-entry writes from concurrent writers, per
/// policy, engines interleaved within each repetition.
fn writes(
    args: &Args,
    dir: &Path,
    runtime: &tokio::runtime::Runtime,
    samples: &mut Samples,
) -> Result<()> {
    let plan: Vec<(Policy, Writer)> = vec![
        (Policy::Always, Writer::PodcacheNode),
        (Policy::Always, Writer::PodcacheNodeTasks),
        (Policy::Always, Writer::Native(Kind::Fjall)),
        (Policy::Always, Writer::Grouped(Kind::Fjall)),
        (Policy::Always, Writer::Native(Kind::Redb)),
        (Policy::Always, Writer::Grouped(Kind::Redb)),
        (Policy::Always, Writer::RawFsync),
        (Policy::Interval, Writer::PodcacheNode),
        (Policy::Interval, Writer::Native(Kind::Fjall)),
        (Policy::Interval, Writer::Native(Kind::Redb)),
        (Policy::Never, Writer::PodcacheNode),
        (Policy::Never, Writer::PodcacheAppend),
        (Policy::Never, Writer::Native(Kind::Fjall)),
        (Policy::Never, Writer::Native(Kind::Redb)),
    ];
    let time = Duration::from_secs_f64(args.seconds);
    for rep in 0..args.reps {
        for (n, (policy, writer)) in plan.iter().enumerate() {
            if !writer.name().contains(&args.filter) || !policy.name().contains(&args.policies) {
                continue;
            }
            let run_dir = dir.join(format!("writes-{rep}-{n}"));
            println!("write run {rep}: {} / {}", policy.name(), writer.name());
            let run = match *writer {
                Writer::PodcacheNode => {
                    node_writes(runtime, &run_dir, *policy, args.writers, time)?
                }
                Writer::PodcacheNodeTasks => {
                    runtime.block_on(node_task_writes(&run_dir, *policy, args.writers, time))?
                }
                Writer::PodcacheAppend => append_writes(&run_dir, args.writers, time)?,
                Writer::Native(kind) => {
                    store_writes(kind.open(&run_dir)?, *policy, false, args.writers, time)?
                }
                Writer::Grouped(kind) => {
                    store_writes(kind.open(&run_dir)?, *policy, true, args.writers, time)?
                }
                Writer::RawFsync => raw_fsyncs(&run_dir, time)?,
            };
            let (disk, _) = disk_bytes(&run_dir)?;
            if !args.keep {
                let _ = std::fs::remove_dir_all(&run_dir);
            }
            let table = format!("writes, fsync {}", policy.name());
            let row = writer.name();
            let mut lat = run.latencies;
            lat.sort_unstable();
            let pct = |p: f64| {
                lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                    .map_or(0.0, |&us| us as f64)
            };
            samples.add(
                &table,
                &row,
                "writes/s",
                run.ops as f64 / run.elapsed.as_secs_f64(),
            );
            samples.add(&table, &row, "p50 µs", pct(0.50));
            samples.add(&table, &row, "p99 µs", pct(0.99));
            samples.add(&table, &row, "max ms", pct(1.0) / 1000.0);
            samples.add(
                &table,
                &row,
                "disk bytes/write after",
                disk as f64 / run.ops.max(1) as f64,
            );
        }
    }
    Ok(())
}

/// Key `i` of writer `w`'s `n`th write: writers take turns over the key
/// space, so no two write the same key at once.
fn key_index(w: usize, n: u64, writers: usize) -> u64 {
    (n * writers as u64 + w as u64) % 1_000_000
}

/// podcache's writers are threads of their own, each running its loop of
/// `NodeHandle::set` with `block_on`, as fjall's and redb's are: as tasks
/// on the node's runtime, writers that never wait (`interval`, `never`)
/// would hold both worker threads and starve the node's own loops
/// (fsync, compaction) and 14 of the 16 writers.
fn node_writes(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    policy: Policy,
    writers: usize,
    time: Duration,
) -> Result<WriteRun> {
    let node = Arc::new(runtime.block_on(podcache_dir::start_node(dir, policy.fsync()))?);
    let start = Instant::now();
    let deadline = start + time;
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let (node, handle) = (node.clone(), runtime.handle().clone());
            std::thread::spawn(move || {
                handle.block_on(async move {
                    let mut latencies = Vec::new();
                    let mut n = 0;
                    while Instant::now() < deadline {
                        let i = key_index(w, n, writers);
                        let (key, value) = (workload::key(i), workload::value(i, 1));
                        let t = Instant::now();
                        node.set(workload::TYPE, &key, &value, None).await?;
                        latencies.push(t.elapsed().as_micros() as u32);
                        n += 1;
                    }
                    Ok::<_, anyhow::Error>(latencies)
                })
            })
        })
        .collect();
    let latencies = join_all(threads)?;
    let elapsed = start.elapsed();
    let node = Arc::into_inner(node).context("a writer still holds the node")?;
    runtime.block_on(podcache_dir::stop_node(node, dir))?;
    Ok(WriteRun {
        ops: latencies.len() as u64,
        elapsed,
        latencies,
    })
}

/// The writers as tasks on the node's runtime (only for `always`: see
/// [`node_writes`]).
async fn node_task_writes(
    dir: &Path,
    policy: Policy,
    writers: usize,
    time: Duration,
) -> Result<WriteRun> {
    let node = Arc::new(podcache_dir::start_node(dir, policy.fsync()).await?);
    let start = Instant::now();
    let deadline = start + time;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0;
            while Instant::now() < deadline {
                let i = key_index(w, n, writers);
                let (key, value) = (workload::key(i), workload::value(i, 1));
                let t = Instant::now();
                node.set(workload::TYPE, &key, &value, None).await?;
                latencies.push(t.elapsed().as_micros() as u32);
                n += 1;
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = start.elapsed();
    let node = Arc::into_inner(node).context("a writer still holds the node")?;
    podcache_dir::stop_node(node, dir).await?;
    Ok(WriteRun {
        ops: latencies.len() as u64,
        elapsed,
        latencies,
    })
}

/// One thread: append a record-sized write, `fdatasync`, again.
fn raw_fsyncs(dir: &Path, time: Duration) -> Result<WriteRun> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let mut file = std::fs::File::create(dir.join("raw"))?;
    let record = [b'x'; 143];
    let start = Instant::now();
    let mut latencies = Vec::new();
    while start.elapsed() < time {
        let t = Instant::now();
        file.write_all(&record)?;
        file.sync_data()?;
        latencies.push(t.elapsed().as_micros() as u32);
    }
    Ok(WriteRun {
        ops: latencies.len() as u64,
        elapsed: start.elapsed(),
        latencies,
    })
}

fn append_writes(dir: &Path, writers: usize, time: Duration) -> Result<WriteRun> {
    let (data, _) = DataDir::open(dir, Fsync::Never, podcache_dir::COMPACT_LOG_BYTES)?;
    let data = Arc::new(data);
    let hlc = Arc::new(AtomicU64::new(1));
    let start = Instant::now();
    let deadline = start + time;
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let (data, hlc) = (data.clone(), hlc.clone());
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut n = 0;
                while Instant::now() < deadline {
                    let i = key_index(w, n, writers);
                    let t = Instant::now();
                    podcache_dir::append_one(&data, i, hlc.fetch_add(1, Ordering::Relaxed))?;
                    latencies.push(t.elapsed().as_micros() as u32);
                    n += 1;
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    let latencies = join_all(threads)?;
    Ok(WriteRun {
        ops: latencies.len() as u64,
        elapsed: start.elapsed(),
        latencies,
    })
}

fn join_all(threads: Vec<std::thread::JoinHandle<Result<Vec<u32>>>>) -> Result<Vec<u32>> {
    let mut all = Vec::new();
    for t in threads {
        all.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("a writer panicked"))??,
        );
    }
    Ok(all)
}

/// A write handed to the committer: the entry and where to say it is
/// durable.
type Pending = (Vec<u8>, Vec<u8>, mpsc::SyncSender<()>);

fn store_writes(
    store: Arc<dyn Store>,
    policy: Policy,
    grouped: bool,
    writers: usize,
    time: Duration,
) -> Result<WriteRun> {
    let hlc = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    // `interval`: one thread makes everything durable once a second.
    let syncer = (policy == Policy::Interval).then(|| {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut next = Instant::now() + Duration::from_secs(1);
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(10));
                if Instant::now() >= next {
                    store.sync()?;
                    next += Duration::from_secs(1);
                }
            }
            Ok::<_, anyhow::Error>(())
        })
    });
    // Group commit: one committer writes every waiting entry in one
    // durable commit, then answers each writer.
    let (pending_tx, pending_rx) = mpsc::channel::<Pending>();
    let committer = grouped.then(|| {
        let store = store.clone();
        std::thread::spawn(move || {
            while let Ok(first) = pending_rx.recv() {
                let mut group = vec![first];
                while let Ok(next) = pending_rx.try_recv() {
                    group.push(next);
                }
                let mut acks = Vec::with_capacity(group.len());
                let items: Vec<(Vec<u8>, Vec<u8>)> = group
                    .into_iter()
                    .map(|(k, v, ack)| {
                        acks.push(ack);
                        (k, v)
                    })
                    .collect();
                store.put_batch(&items, true)?;
                for ack in acks {
                    let _ = ack.send(());
                }
            }
            Ok::<_, anyhow::Error>(())
        })
    });
    let start = Instant::now();
    let deadline = start + time;
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let (store, hlc) = (store.clone(), hlc.clone());
            let pending_tx = pending_tx.clone();
            std::thread::spawn(move || {
                let (ack_tx, ack_rx) = mpsc::sync_channel(1);
                let mut latencies = Vec::new();
                let mut n = 0;
                while Instant::now() < deadline {
                    let i = key_index(w, n, writers);
                    let t = Instant::now();
                    let key = workload::engine_key(workload::TYPE, &workload::key(i));
                    let version = podcache::store::Version {
                        hlc: hlc.fetch_add(1, Ordering::Relaxed),
                        node: 1,
                    };
                    let value = workload::encode(&workload::value(i, 1), version, 0);
                    if grouped {
                        pending_tx
                            .send((key, value, ack_tx.clone()))
                            .map_err(|_| anyhow::anyhow!("the committer stopped"))?;
                        ack_rx.recv()?;
                    } else {
                        store.put(&key, &value, policy == Policy::Always)?;
                    }
                    latencies.push(t.elapsed().as_micros() as u32);
                    n += 1;
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    drop(pending_tx);
    let latencies = join_all(threads)?;
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Release);
    if let Some(syncer) = syncer {
        syncer
            .join()
            .map_err(|_| anyhow::anyhow!("the syncer panicked"))??;
    }
    if let Some(committer) = committer {
        committer
            .join()
            .map_err(|_| anyhow::anyhow!("the committer panicked"))??;
    }
    drop(store);
    Ok(WriteRun {
        ops: latencies.len() as u64,
        elapsed,
        latencies,
    })
}

/// Measurements 2 and 3: load, close, reopen and read everything back,
/// overwrite everything once, close, reopen and read again; disk bytes
/// after the load and after the overwrite.
fn restarts(
    args: &Args,
    dir: &Path,
    runtime: &tokio::runtime::Runtime,
    samples: &mut Samples,
) -> Result<()> {
    let n = args.entries;
    let engines = ["podcache log", "fjall", "redb"];
    for rep in 0..args.reps {
        for engine in engines {
            if !engine.contains(&args.filter) {
                continue;
            }
            let run_dir = dir.join(format!("restart-{rep}-{engine}").replace(' ', "-"));
            println!("restart run {rep}: {engine}");
            let row = engine;
            for round in [1u64, 2] {
                let phase = if round == 1 { "load" } else { "overwrite" };
                let t = Instant::now();
                let _ = match engine {
                    "podcache log" => runtime.block_on(async {
                        let node = podcache_dir::start_node(&run_dir, Fsync::Interval).await?;
                        let t = Instant::now();
                        podcache_dir::load(&node, n, round, 1000).await?;
                        let load = t.elapsed();
                        podcache_dir::stop_node(node, &run_dir).await?;
                        Ok::<_, anyhow::Error>(load)
                    })?,
                    "fjall" => store_load(Kind::Fjall, &run_dir, n, round)?,
                    _ => store_load(Kind::Redb, &run_dir, n, round)?,
                };
                let load_all = t.elapsed();
                samples.add(
                    "load and restart",
                    row,
                    &format!("{phase} s (open, 1000 a batch, synced each second, close)"),
                    load_all.as_secs_f64(),
                );
                let (allocated, apparent) = disk_bytes(&run_dir)?;
                samples.add(
                    "disk",
                    row,
                    &format!("bytes/entry after {phase} (allocated)"),
                    allocated as f64 / n as f64,
                );
                samples.add(
                    "disk",
                    row,
                    &format!("bytes/entry after {phase} (apparent)"),
                    apparent as f64 / n as f64,
                );
                let t = Instant::now();
                let map = match engine {
                    "podcache log" => podcache_dir::read_all(&run_dir)?,
                    "fjall" => Fjall::open(&run_dir)?.read_all()?,
                    _ => {
                        let redb = Redb::open(&run_dir)?;
                        let map = redb.read_all()?;
                        redb.close()?;
                        map
                    }
                };
                let reopen = t.elapsed();
                check(&map, n, round)?;
                drop(map);
                samples.add(
                    "load and restart",
                    row,
                    &format!("reopen + read all into a HashMap s, after {phase}"),
                    reopen.as_secs_f64(),
                );
                if engine == "podcache log" {
                    let start = runtime.block_on(async {
                        let t = Instant::now();
                        let node = podcache_dir::start_node(&run_dir, Fsync::Interval).await?;
                        let start = t.elapsed();
                        podcache_dir::stop_node(node, &run_dir).await?;
                        Ok::<_, anyhow::Error>(start)
                    })?;
                    samples.add(
                        "load and restart",
                        "podcache node start to ready",
                        &format!("reopen + read all into a HashMap s, after {phase}"),
                        start.as_secs_f64(),
                    );
                }
            }
            if !args.keep {
                let _ = std::fs::remove_dir_all(&run_dir);
            }
        }
    }
    Ok(())
}

/// Loads entries `0..n` of `round` into a fjall or redb store in batches
/// of 1000 (each commit not durable, one durable sync a second and at
/// the end: the `interval` policy), then closes it.
fn store_load(kind: Kind, dir: &Path, n: u64, round: u64) -> Result<Duration> {
    let store = kind.open(dir)?;
    let t = Instant::now();
    let mut last_sync = Instant::now();
    let mut start = 0;
    let mut hlc = round * 10_000_000;
    while start < n {
        let end = (start + 1000).min(n);
        let items: Vec<(Vec<u8>, Vec<u8>)> = (start..end)
            .map(|i| {
                hlc += 1;
                let version = podcache::store::Version { hlc, node: 1 };
                (
                    workload::engine_key(workload::TYPE, &workload::key(i)),
                    workload::encode(&workload::value(i, round), version, 0),
                )
            })
            .collect();
        store.put_batch(&items, false)?;
        if last_sync.elapsed() >= Duration::from_secs(1) {
            store.sync()?;
            last_sync = Instant::now();
        }
        start = end;
    }
    store.sync()?;
    let load = t.elapsed();
    // Closes it (fjall persists its journal, redb closes its file).
    drop(store);
    Ok(load)
}

/// Every entry came back, holding the value of `round`.
fn check(map: &workload::Map, n: u64, round: u64) -> Result<()> {
    if map.len() as u64 != n {
        bail!("read back {} entries, expected {n}", map.len());
    }
    for i in [0, n / 2, n - 1] {
        let key = (workload::TYPE, workload::key(i));
        let value = map.get(&key).and_then(|e| e.value());
        if value != Some(workload::value(i, round).as_str()) {
            bail!("entry {i} reads back {value:?}, not round {round}'s value");
        }
    }
    Ok(())
}

/// Bytes under `dir`: allocated (blocks, as `du`) and apparent (lengths).
fn disk_bytes(dir: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let (mut allocated, mut apparent) = (0, 0);
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                allocated += meta.blocks() * 512;
                apparent += meta.len();
            }
        }
    }
    Ok((allocated, apparent))
}

/// The type of the filesystem `path` is on, from /proc/mounts.
fn filesystem_of(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (device, mount, fs) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(mount)
                .then(|| (mount.len(), format!("{fs} ({device} at {mount})")))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "an unknown filesystem".into(), |(_, fs)| fs)
}

/// A table's name, its rows and its columns, in the order they came.
type Layout<'a> = (&'a str, (Vec<&'a str>, Vec<&'a str>));

/// Prints each table: median (min–max) of the repetitions.
fn report(samples: &Samples) {
    let mut tables: Vec<Layout<'_>> = Vec::new();
    for (table, row, column) in &samples.order {
        let at = match tables.iter().position(|(t, _)| t == table) {
            Some(at) => at,
            None => {
                tables.push((table, Default::default()));
                tables.len() - 1
            }
        };
        let (rows, columns) = &mut tables[at].1;
        if !rows.contains(&row.as_str()) {
            rows.push(row);
        }
        if !columns.contains(&column.as_str()) {
            columns.push(column);
        }
    }
    println!("\n# Summary: median (min–max) of each measurement's repetitions\n");
    for (table, (rows, columns)) in tables {
        println!("## {table}\n");
        println!("| | {} |", columns.join(" | "));
        println!("|---|{}", "---|".repeat(columns.len()));
        for row in rows {
            let cells: Vec<String> = columns
                .iter()
                .map(|column| {
                    samples
                        .values
                        .get(&(table.into(), row.into(), (*column).into()))
                        .map_or_else(|| "–".into(), |v| summary(v))
                })
                .collect();
            println!("| {row} | {} |", cells.join(" | "));
        }
        println!();
    }
}

fn summary(values: &[f64]) -> String {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    let fmt = |x: f64| {
        if x >= 100.0 {
            format!("{x:.0}")
        } else if x >= 10.0 {
            format!("{x:.1}")
        } else {
            format!("{x:.2}")
        }
    };
    if v.len() == 1 {
        fmt(median)
    } else {
        format!("{} ({}–{})", fmt(median), fmt(v[0]), fmt(v[v.len() - 1]))
    }
}
