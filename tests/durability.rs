//! The data directory over real processes and real files: `kill -9` of the
//! whole cluster under write load, a torn tail, damage, a locked or
//! foreign directory, crashes while compacting, a full disk (a small tmpfs
//! the test mounts), a peer whose full disk must not acknowledge, export,
//! wipe, import, and scenarios from reported failures: deleted keys that
//! must stay deleted after their tombstones were purged and a node
//! restarted, a fresh volume's `lost+found`, an export holding keys named
//! `format` and `type`. Power loss itself is searched on a simulated disk
//! in tests/power_loss.rs.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::{BIN, Proc, ServeSpec};
use common::{next_block, wait_until};
use hyper::{Method, StatusCode};
use podcache::client::RestClient;

/// A version as the REST API writes it, `<ms>.<logical>@<node hex>`, in
/// the order versions compare.
fn parse_version(text: &str) -> (u64, u64) {
    let (clock, node) = text.split_once('@').expect("version has a node");
    let (ms, logical) = clock.split_once('.').expect("version has a counter");
    let hlc = (ms.parse::<u64>().expect("ms") << 16) | logical.parse::<u64>().expect("logical");
    (hlc, u64::from_str_radix(node, 16).expect("node hex"))
}

/// One key as a node holds it: version, value (None for a tombstone).
type State = BTreeMap<(i32, String), ((u64, u64), Option<String>)>;

/// A node's whole state, tombstones included, from `/v1/export`.
async fn state(client: &RestClient) -> State {
    let text = client.get("/v1/export").await.expect("export").text();
    text.lines()
        .skip(1)
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("json line");
            let node = u64::from_str_radix(v["node"].as_str().expect("node"), 16).expect("hex");
            (
                (
                    v["type"].as_i64().expect("type") as i32,
                    v["key"].as_str().expect("key").to_owned(),
                ),
                (
                    (v["hlc"].as_u64().expect("hlc"), node),
                    v["value"].as_str().map(str::to_owned),
                ),
            )
        })
        .collect()
}

/// An acknowledged write: key, version, and whether it was a delete.
#[derive(Debug, Clone)]
struct Acked {
    key: String,
    version: (u64, u64),
    deleted: bool,
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("podcache-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `n` nodes on a fresh address block, each listing all, each with its
/// own data directory under `dir` and `extra` flags.
fn cluster(n: usize, dir: &Path, extra: &[&str]) -> Vec<ServeSpec> {
    let block = next_block();
    let mut specs: Vec<ServeSpec> = (0..n)
        .map(|i| {
            let ip = Ipv4Addr::from(block | (i as u32 + 2));
            let mut spec = ServeSpec::new(ip, &format!("durable-{i}"), dir);
            spec.extra = vec![
                "--data-dir".into(),
                dir.join(format!("data-{i}")).display().to_string(),
            ];
            spec.extra.extend(extra.iter().map(|s| s.to_string()));
            spec
        })
        .collect();
    let peers: Vec<String> = specs.iter().map(ServeSpec::grpc).collect();
    for spec in &mut specs {
        spec.peers = peers.clone();
    }
    specs
}

/// Writers that put and delete keys on random nodes until `stop`, keeping
/// every acknowledged write.
fn start_writers(
    specs: &[ServeSpec],
    keys: u32,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Arc<Mutex<Vec<Acked>>>, Vec<tokio::task::JoinHandle<()>>) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let tasks = (0..4u64)
        .map(|w| {
            let clients: Vec<RestClient> = specs
                .iter()
                .map(|s| s.client().with_timeout(Duration::from_secs(2)))
                .collect();
            let (acked, stop) = (acked.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ (w << 32);
                let mut next = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                let mut i = 0u64;
                // Bounded: the test sets `stop` (and kills the nodes).
                while !stop.load(std::sync::atomic::Ordering::Acquire) && i < 100_000 {
                    i += 1;
                    let client = &clients[(next() % clients.len() as u64) as usize];
                    let key = format!("k{}", next() % u64::from(keys));
                    let delete = next() % 5 == 0;
                    let answer = if delete {
                        client.delete(1, &key, "").await
                    } else {
                        client.put(1, &key, &format!("w{w}-{i}"), "").await
                    };
                    let Ok(answer) = answer else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    if answer.status == StatusCode::OK {
                        let body = answer.json();
                        let version = parse_version(body["version"].as_str().expect("version"));
                        acked.lock().expect("acked").push(Acked {
                            key,
                            version,
                            deleted: delete,
                        });
                    }
                }
            })
        })
        .collect();
    (acked, tasks)
}

/// Every acknowledged write is on `node`: its key holds that version or a
/// newer one, and a tombstone when the newest acknowledged write of the
/// key was a delete and nothing newer came.
fn assert_holds(acked: &[Acked], held: &State, node: usize) {
    for a in acked {
        let entry = held.get(&(1, a.key.clone()));
        let Some((version, value)) = entry else {
            panic!("node {node} lost acknowledged {a:?}");
        };
        assert!(
            *version >= a.version,
            "node {node} holds {version:?} for {a:?}"
        );
        if *version == a.version {
            assert_eq!(
                value.is_none(),
                a.deleted,
                "node {node}: {a:?} came back as {value:?}"
            );
        }
    }
}

async fn converged(specs: &[ServeSpec]) -> State {
    let clients: Vec<RestClient> = specs.iter().map(ServeSpec::client).collect();
    let last = Arc::new(Mutex::new(State::new()));
    wait_until(
        "every node holds the same state",
        Duration::from_secs(30),
        || {
            let (clients, last) = (clients.clone(), last.clone());
            async move {
                let mut states = Vec::new();
                for c in &clients {
                    states.push(state(c).await);
                }
                let same = states.windows(2).all(|w| w[0] == w[1]);
                *last.lock().expect("last") = states.swap_remove(0);
                same
            }
        },
    )
    .await;
    let held = last.lock().expect("last");
    held.clone()
}

#[tokio::test]
async fn a_full_cluster_kill_9_under_write_load_with_fsync_always_keeps_every_acknowledged_write() {
    let dir = temp_dir("kill-all");
    let specs = cluster(3, &dir, &["--fsync", "always"]);
    let mut procs: Vec<_> = specs.iter().map(ServeSpec::spawn).collect();
    for s in &specs {
        s.wait_ready().await;
    }
    // A delete before the crash stays deleted.
    let first = specs[0].client();
    assert_eq!(
        first
            .put(1, "doomed", "x", "wait=all")
            .await
            .expect("put")
            .status,
        StatusCode::OK
    );
    assert_eq!(
        first
            .delete(1, "doomed", "wait=all")
            .await
            .expect("delete")
            .status,
        StatusCode::OK
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (acked, writers) = start_writers(&specs, 60, stop.clone());
    wait_until("writes acknowledged", Duration::from_secs(20), || {
        let acked = acked.clone();
        async move { acked.lock().expect("acked").len() >= 300 }
    })
    .await;
    // The whole cluster at once, mid-load.
    for p in &mut procs {
        p.kill9();
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    for w in writers {
        w.await.expect("writer");
    }
    let acked = acked.lock().expect("acked").clone();
    let procs: Vec<_> = specs.iter().map(ServeSpec::spawn).collect();
    for s in &specs {
        s.wait_ready().await;
    }
    let held = converged(&specs).await;
    for (i, s) in specs.iter().enumerate() {
        assert_holds(&acked, &state(&s.client()).await, i);
    }
    assert_eq!(
        held.get(&(1, "doomed".into())).map(|(_, v)| v.clone()),
        Some(None)
    );
    let view = first.get("/v1/cluster").await.expect("cluster").json();
    assert!(
        view["state_source"]
            .as_str()
            .is_some_and(|s| s.starts_with("disk")),
        "{view}"
    );
    eprintln!(
        "{} acknowledged writes survived a kill -9 of all 3 nodes",
        acked.len()
    );
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The newest log file of a data directory.
fn newest_log(data: &Path) -> PathBuf {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(data)
        .expect("data dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("log-"))
        })
        .collect();
    logs.sort();
    logs.pop().expect("a log")
}

async fn put_many(client: &RestClient, n: usize, prefix: &str) {
    for i in 0..n {
        let answer = client
            .put(1, &format!("{prefix}{i}"), "v", "")
            .await
            .expect("put");
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
}

#[tokio::test]
async fn a_torn_tail_is_cut_off_with_one_warning_and_the_node_starts() {
    let dir = temp_dir("torn");
    let specs = cluster(1, &dir, &["--fsync", "always"]);
    let mut p = specs[0].spawn();
    specs[0].wait_ready().await;
    put_many(&specs[0].client(), 100, "k").await;
    p.kill9();
    let log = newest_log(&dir.join("data-0"));
    let good = std::fs::metadata(&log).expect("log").len();
    // A record cut short: a header promising 1000 bytes, 10 of them there.
    let mut torn = Vec::new();
    torn.extend_from_slice(&1000u32.to_le_bytes());
    torn.extend_from_slice(&0x1234_5678u32.to_le_bytes());
    torn.extend_from_slice(&[7; 10]);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &torn))
        .expect("tear the tail");
    let mut p = specs[0].spawn();
    specs[0].wait_ready().await;
    let held = state(&specs[0].client()).await;
    assert_eq!(held.len(), 100);
    let stderr = specs[0].stderr();
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("cut short")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains(&log.display().to_string()),
        "{}",
        warnings[0]
    );
    assert!(
        warnings[0].contains(&format!("offset={good}")),
        "{}",
        warnings[0]
    );
    // Cut there, unless the compaction that follows every start that
    // replayed a log has already replaced it.
    if let Ok(meta) = std::fs::metadata(&log) {
        assert_eq!(meta.len(), good);
    }
    // Appends go on after the cut.
    put_many(&specs[0].client(), 10, "after").await;
    p.kill9();
    let _p = specs[0].spawn();
    specs[0].wait_ready().await;
    assert_eq!(state(&specs[0].client()).await.len(), 110);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn damage_before_the_tail_refuses_the_start_and_says_what_to_do() {
    let dir = temp_dir("damaged");
    let specs = cluster(1, &dir, &["--fsync", "always"]);
    let mut p = specs[0].spawn();
    specs[0].wait_ready().await;
    put_many(&specs[0].client(), 20, "k").await;
    p.kill9();
    let log = newest_log(&dir.join("data-0"));
    let mut bytes = std::fs::read(&log).expect("log");
    // Inside the first record's payload (after the 24-byte file header
    // and the 8-byte record header).
    bytes[24 + 8 + 4] ^= 0xff;
    std::fs::write(&log, &bytes).expect("damage");
    let mut p = specs[0].spawn();
    assert_eq!(p.exit_code(Duration::from_secs(10)).await, Some(64));
    let stderr = specs[0].stderr();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("damaged") && last.contains(&log.display().to_string()),
        "{last}"
    );
    assert!(
        last.contains("move") && last.contains("rebuilds its state from its peers"),
        "{last}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_data_dir_in_use_or_of_another_format_is_refused_with_exit_64() {
    let dir = temp_dir("locked");
    let specs = cluster(2, &dir, &[]);
    let mut second = specs[1].clone();
    second.extra = specs[0].extra.clone();
    second.peers = Vec::new();
    let _first = specs[0].spawn();
    specs[0].wait_ready().await;
    let mut p = second.spawn();
    assert_eq!(p.exit_code(Duration::from_secs(10)).await, Some(64));
    assert!(
        second
            .stderr()
            .contains("in use by another podcache process"),
        "{}",
        second.stderr()
    );
    let foreign = dir.join("foreign");
    std::fs::create_dir_all(&foreign).expect("dir");
    std::fs::write(
        foreign.join("FORMAT"),
        "podcache data directory, format 99\n",
    )
    .expect("format");
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--pod-ip",
            "127.0.0.1",
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&foreign)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("format 99") && stderr.lines().count() == 1,
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn kill_9_at_random_moments_while_compacting_loses_no_acknowledged_write() {
    let dir = temp_dir("compacting");
    // Compaction every ~16 KiB of log: under load it runs all the time.
    let specs = cluster(
        1,
        &dir,
        &["--fsync", "always", "--compact-log-bytes", "16384"],
    );
    let mut all_acked = Vec::new();
    let mut compactions = 0;
    let mut seed = 0x9e37_79b9_u64;
    for round in 0..6 {
        let mut p = specs[0].spawn();
        specs[0].wait_ready().await;
        assert_holds(&all_acked, &state(&specs[0].client()).await, 0);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (acked, writers) = start_writers(&specs, 200, stop.clone());
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let run = Duration::from_millis(300 + seed % 700);
        tokio::time::sleep(run).await;
        let metrics = specs[0]
            .client()
            .get("/metrics")
            .await
            .map(|a| a.text())
            .unwrap_or_default();
        compactions += metrics
            .lines()
            .filter(|l| l.starts_with("podcache_data_dir_compactions_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64;
        p.kill9();
        stop.store(true, std::sync::atomic::Ordering::Release);
        for w in writers {
            w.await.expect("writer");
        }
        all_acked.extend(acked.lock().expect("acked").iter().cloned());
        eprintln!(
            "round {round}: killed after {run:?}, {} acknowledged so far",
            all_acked.len()
        );
    }
    let _p = specs[0].spawn();
    specs[0].wait_ready().await;
    assert_holds(&all_acked, &state(&specs[0].client()).await, 0);
    assert!(compactions > 0, "no compaction ran");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tmpfs of `size` mounted at `dir`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).expect("mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (the test suite runs as root in CI)"
        );
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_writes_with_507_keeps_reads_and_resumes_when_there_is_room() {
    let dir = temp_dir("full");
    let mount = dir.join("disk");
    let _tmpfs = Tmpfs::mount(&mount, "1m");
    let filler = mount.join("filler");
    std::fs::write(&filler, vec![0u8; 700 * 1024]).expect("filler");
    let mut spec = cluster(1, &dir, &["--fsync", "always"]).remove(0);
    spec.extra[1] = mount.join("data").display().to_string();
    let mut p = spec.spawn();
    spec.wait_ready().await;
    let client = spec.client();
    let value = "v".repeat(8 * 1024);
    let mut stored = Vec::new();
    let mut refused = None;
    for i in 0..1000 {
        let key = format!("big{i}");
        let answer = client.put(1, &key, &value, "").await.expect("put");
        match answer.status {
            StatusCode::OK => stored.push(key),
            StatusCode::INSUFFICIENT_STORAGE => {
                assert_eq!(answer.json()["error"], "disk_full", "{}", answer.text());
                refused = Some(key);
                break;
            }
            other => panic!("unexpected {other}: {}", answer.text()),
        }
    }
    let refused = refused.expect("the disk filled up");
    assert!(!stored.is_empty());
    // Nothing half-applied: the refused write is nowhere; reads go on.
    assert_eq!(client.get_value(1, &refused).await.expect("get"), None);
    assert_eq!(
        client
            .get_value(1, &stored[0])
            .await
            .expect("get")
            .as_deref(),
        Some(value.as_str())
    );
    let again = client.put(1, "small", "x", "").await.expect("put");
    assert_eq!(
        again.status,
        StatusCode::INSUFFICIENT_STORAGE,
        "{}",
        again.text()
    );
    // Room again: writes resume by themselves.
    std::fs::remove_file(&filler).expect("free space");
    wait_until("writes resume", Duration::from_secs(15), || {
        let client = client.clone();
        async move {
            client
                .put(1, "resumed", "yes", "")
                .await
                .is_ok_and(|a| a.status == StatusCode::OK)
        }
    })
    .await;
    p.kill9();
    let _p = spec.spawn();
    spec.wait_ready().await;
    let held = state(&spec.client()).await;
    for key in stored.iter().chain(["resumed".to_owned()].iter()) {
        assert!(held.contains_key(&(1, key.clone())), "{key} lost");
    }
    assert!(
        !held.contains_key(&(1, refused)),
        "a refused write came back"
    );
}

/// Under `--fsync always` a peer acknowledges a replicated write only once
/// it is on the peer's disk: a peer whose disk is full applies it in
/// memory but answers an error, so the writer's `wait=all` reports it as
/// not acknowledged (and keeps it pending), until the peer's disk takes
/// it again.
#[tokio::test]
async fn a_peer_whose_disk_refused_a_write_does_not_acknowledge_it() {
    let dir = temp_dir("peer-disk");
    let mount = dir.join("disk");
    let _tmpfs = Tmpfs::mount(&mount, "1m");
    let mut specs = cluster(2, &dir, &["--fsync", "always", "--wait-timeout", "1500ms"]);
    specs[1].extra[1] = mount.join("data").display().to_string();
    let mut a = specs[0].spawn();
    let mut b = specs[1].spawn();
    for spec in &specs {
        spec.wait_ready().await;
    }
    let writer = specs[0].client();
    let first = writer.put(1, "before", "x", "wait=all").await.expect("put");
    assert_eq!(
        first.json()["replication"][0]["status"],
        "acked",
        "{}",
        first.text()
    );
    // Fill the peer's disk, then write something that cannot fit on it.
    let filler = mount.join("filler");
    let free = 1024 * 1024 - 64 * 1024;
    std::fs::write(&filler, vec![0u8; free]).expect("filler");
    let value = "v".repeat(96 * 1024);
    let answer = writer.put(1, "big", &value, "wait=all").await.expect("put");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_ne!(
        answer.json()["replication"][0]["status"],
        "acked",
        "a peer whose disk refused the write acknowledged it: {}",
        answer.text()
    );
    // Room again: the peer's snapshot clears the failure, the writer's
    // retry is acknowledged, and the peer has it from its own disk after
    // a kill -9 of both.
    std::fs::remove_file(&filler).expect("free space");
    wait_until(
        "the peer acknowledges again",
        Duration::from_secs(20),
        || {
            let writer = writer.clone();
            async move {
                writer
                    .put(1, "after", "y", "wait=all")
                    .await
                    .is_ok_and(|a| a.json()["replication"][0]["status"] == "acked")
            }
        },
    )
    .await;
    // Only the peer's own disk can bring it back: the writer is gone.
    a.kill9();
    b.kill9();
    let _b = specs[1].spawn();
    specs[1].wait_ready().await;
    let held = state(&specs[1].client()).await;
    assert!(
        held.contains_key(&(1, "big".to_owned())),
        "the peer lost it"
    );
}

#[tokio::test]
async fn export_wipe_and_import_restore_the_state_with_versions_and_tombstones() {
    let dir = temp_dir("backup");
    let specs = cluster(2, &dir, &[]);
    let procs: Vec<_> = specs.iter().map(ServeSpec::spawn).collect();
    for s in &specs {
        s.wait_ready().await;
    }
    let client = specs[0].client();
    for i in 0..50 {
        client
            .put(i % 3, &format!("k{i}"), &format!("v{i}"), "")
            .await
            .expect("put");
    }
    client
        .put(0, "ttl", "short-lived", "ttl=3600")
        .await
        .expect("put");
    client.delete(0, "k0", "").await.expect("delete");
    let original = converged(&specs).await;
    let file = dir.join("backup.jsonl");
    let out = std::process::Command::new(BIN)
        .args(["ctl", "--addr", &specs[0].http(), "export"])
        .output()
        .expect("ctl export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&file, &out.stdout).expect("backup file");
    assert!(String::from_utf8_lossy(&out.stderr).contains("exported 51 entries"));
    drop(procs);
    // Wiped: new nodes, new data directories.
    for i in 0..2 {
        std::fs::remove_dir_all(dir.join(format!("data-{i}"))).expect("wipe");
    }
    let _procs: Vec<_> = specs.iter().map(ServeSpec::spawn).collect();
    for s in &specs {
        s.wait_ready().await;
    }
    for round in 0..2 {
        let out = std::process::Command::new(BIN)
            .args(["ctl", "--addr", &specs[0].http(), "import"])
            .arg(&file)
            .output()
            .expect("ctl import");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary = String::from_utf8_lossy(&out.stderr);
        let expected = if round == 0 {
            "51 applied"
        } else {
            "0 applied"
        };
        assert!(summary.contains(expected), "round {round}: {summary}");
    }
    // The import reached the other node by fan-out; both equal the original.
    assert_eq!(converged(&specs).await, original);
    let raw = client
        .request(Method::POST, "/v1/import", "{\"type\":1,\"key\":\"\"}")
        .await
        .expect("import");
    assert_eq!(raw.status, StatusCode::BAD_REQUEST);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- Scenarios from reported failures: deleted keys after a purge and a
// restart, a fresh volume's lost+found, an export holding a key named
// `format`.

/// Waits until the node of `spec` is ready; fails at once, with the end of
/// its stderr, when the process exits instead (a refused start).
#[track_caller]
fn ready<'a>(
    spec: &'a ServeSpec,
    proc: &'a mut Proc,
) -> impl std::future::Future<Output = ()> + 'a {
    let caller = std::panic::Location::caller();
    async move {
        let client = spec.client();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if client
                .get("/readyz")
                .await
                .is_ok_and(|a| a.status == StatusCode::OK)
            {
                return;
            }
            if let Some(status) = proc.child.try_wait().expect("wait") {
                let stderr = spec.stderr();
                let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
                panic!(
                    "{caller}: {} exited ({status}) instead of becoming ready:\n{}",
                    spec.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{caller}: {} not ready within 30s",
                spec.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Anti-entropy exchanges the node completed (compared, and equal or
/// repaired), from `/metrics`.
async fn anti_entropy_rounds_done(client: &RestClient) -> u64 {
    let Ok(answer) = client.get("/metrics").await else {
        return 0;
    };
    answer
        .text()
        .lines()
        .filter(|l| l.starts_with("podcache_anti_entropy_rounds_total{"))
        .filter(|l| l.contains("result=\"equal\"") || l.contains("result=\"repaired\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The keys of `keys` (type 1) that `held` has at all, tombstones included.
fn held_keys(held: &State, keys: &[String]) -> Vec<String> {
    keys.iter()
        .filter(|k| held.contains_key(&(1, (*k).clone())))
        .cloned()
        .collect()
}

/// The keys of `keys` (type 1) that `held` has with a value.
fn live_keys(held: &State, keys: &[String]) -> Vec<(String, String)> {
    keys.iter()
        .filter_map(|k| {
            let (_, value) = held.get(&(1, k.clone()))?;
            Some((k.clone(), value.clone()?))
        })
        .collect()
}

#[tokio::test]
async fn deleted_keys_stay_deleted_after_purge_restart_and_anti_entropy() {
    let dir = temp_dir("purged-stay-deleted");
    // The grace is the shortest allowed: ten of the harness's 300ms
    // anti-entropy intervals. The purge loop runs once per grace.
    let specs = cluster(3, &dir, &["--fsync", "always", "--tombstone-grace", "3s"]);
    let mut procs: Vec<Proc> = specs.iter().map(ServeSpec::spawn).collect();
    for (spec, proc) in specs.iter().zip(procs.iter_mut()) {
        ready(spec, proc).await;
    }
    let clients: Vec<RestClient> = specs.iter().map(ServeSpec::client).collect();
    let keys: Vec<String> = (0..20).map(|i| format!("doomed-{i}")).collect();
    for key in &keys {
        let answer = clients[0]
            .put(1, key, "alive", "wait=all")
            .await
            .expect("put");
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    for key in &keys {
        let answer = clients[1].delete(1, key, "wait=all").await.expect("delete");
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    // The tombstones are purged everywhere: no node lists the keys at all
    // (grace plus one purge period, with margin).
    wait_until(
        "every node purged the 20 tombstones",
        Duration::from_secs(30),
        || {
            let (clients, keys) = (clients.clone(), keys.clone());
            async move {
                for client in &clients {
                    if !held_keys(&state(client).await, &keys).is_empty() {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    // A crash and a restart from the same data directory.
    let victim = 2;
    procs[victim].kill9();
    procs[victim] = specs[victim].spawn();
    ready(&specs[victim], &mut procs[victim]).await;
    // Through at least two anti-entropy rounds of every node with both of
    // its peers, no node shows any of the keys with a value.
    let baseline: Vec<u64> = {
        let mut done = Vec::new();
        for client in &clients {
            done.push(anti_entropy_rounds_done(client).await);
        }
        done
    };
    let mut checks = 0u32;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut rounds_passed = true;
        for (i, client) in clients.iter().enumerate() {
            let live = live_keys(&state(client).await, &keys);
            assert!(
                live.is_empty(),
                "node {i} holds deleted keys again after node {victim} restarted \
                 (check {checks}): {live:?}"
            );
            let done = anti_entropy_rounds_done(client).await;
            rounds_passed &= done >= baseline[i] + 4;
        }
        checks += 1;
        if rounds_passed {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "anti-entropy rounds did not complete within 30s (baseline {baseline:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, client) in clients.iter().enumerate() {
        for key in &keys {
            assert_eq!(
                client.get_value(1, key).await.expect("get"),
                None,
                "node {i}: {key} came back"
            );
        }
    }
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_data_dir_holding_only_an_empty_lost_and_found_is_used() {
    let dir = temp_dir("lost-found");
    let specs = cluster(1, &dir, &["--fsync", "always"]);
    let data = dir.join("data-0");
    // What a freshly made ext4 volume holds at its root.
    std::fs::create_dir_all(data.join("lost+found")).expect("lost+found");
    let mut proc = specs[0].spawn();
    ready(&specs[0], &mut proc).await;
    let client = specs[0].client();
    let answer = client.put(1, "kept", "on disk", "").await.expect("put");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    proc.kill9();
    let mut proc = specs[0].spawn();
    ready(&specs[0], &mut proc).await;
    assert_eq!(
        client.get_value(1, "kept").await.expect("get").as_deref(),
        Some("on disk")
    );
    assert!(
        data.join("lost+found").is_dir(),
        "lost+found is the file system's, it stays"
    );
    drop(proc);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `podcache ctl --addr <node> <args>`; exit success, stderr.
fn ctl(spec: &ServeSpec, args: &[&str], file: Option<&Path>) -> (bool, Vec<u8>, String) {
    let mut command = std::process::Command::new(BIN);
    command.args(["ctl", "--addr", &spec.http()]).args(args);
    if let Some(file) = file {
        command.arg(file);
    }
    let out = command.output().expect("ctl runs");
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn an_export_with_keys_named_format_and_type_imports_whole_and_a_cut_copy_is_refused() {
    let dir = temp_dir("export-format-key");
    let mut specs = cluster(2, &dir, &["--fsync", "always"]);
    // Two single nodes: the original, and a fresh one to restore into.
    for spec in &mut specs {
        spec.peers.clear();
    }
    let (original, fresh) = (&specs[0], &specs[1]);
    let mut proc = original.spawn();
    ready(original, &mut proc).await;
    let client = original.client();
    let mut written = vec![
        (1, "format", "podcache-export".to_owned()),
        (1, "type", "7".to_owned()),
        (1, "key", "k".to_owned()),
        (1, "entries", "12".to_owned()),
        (1, "version", "1".to_owned()),
        (2, "format", "another namespace".to_owned()),
    ];
    // Large values: the file takes more than one import request (4 MiB
    // each), so each request's own header and count are exercised.
    let big = "b".repeat(900_000);
    let big_keys: Vec<String> = (0..6).map(|i| format!("big-{i}")).collect();
    for key in &big_keys {
        written.push((3, key.as_str(), big.clone()));
    }
    for (ty, key, value) in &written {
        let answer = client.put(*ty, key, value, "").await.expect("put");
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    // A tombstone travels too.
    client.put(1, "gone", "x", "").await.expect("put");
    let answer = client.delete(1, "gone", "").await.expect("delete");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let before = state(&client).await;
    assert_eq!(before.len(), written.len() + 1);

    let (ok, stdout, stderr) = ctl(original, &["export"], None);
    assert!(ok, "{stderr}");
    let file = dir.join("export.jsonl");
    std::fs::write(&file, &stdout).expect("export file");
    let text = String::from_utf8(stdout).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), written.len() + 2, "a header and every entry");
    assert!(
        lines[1..].iter().any(|l| l.contains(r#""key":"format""#)),
        "the export holds the key named format"
    );
    // A copy cut at a line's end: the last line dropped.
    let cut = dir.join("export-cut.jsonl");
    std::fs::write(&cut, lines[..lines.len() - 1].join("\n") + "\n").expect("cut copy");
    proc.kill9();

    // Wiped: a fresh node on an empty data directory.
    let mut proc = fresh.spawn();
    ready(fresh, &mut proc).await;
    let restored = fresh.client();
    assert!(state(&restored).await.is_empty());
    let (ok, _, stderr) = ctl(fresh, &["import"], Some(&cut));
    assert!(!ok, "a cut copy was imported: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!(
            "holds {} entries but its header says {}",
            written.len(),
            written.len() + 1
        )),
        "{stderr}"
    );
    assert!(
        state(&restored).await.is_empty(),
        "a refused import merged entries"
    );

    let (ok, _, stderr) = ctl(fresh, &["import"], Some(&file));
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains(&format!("imported: {} applied", written.len() + 1)),
        "{stderr}"
    );
    assert_eq!(state(&restored).await, before);
    for (ty, key, value) in &written {
        assert_eq!(
            restored.get_value(*ty, key).await.expect("get").as_deref(),
            Some(value.as_str()),
            "type {ty} key {key}"
        );
    }
    assert_eq!(restored.get_value(1, "gone").await.expect("get"), None);
    drop(proc);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Who wrote an entry and why, and its history, are read back on every
/// replica and after a restart of both with their data directories (the
/// second after a compaction, so the history comes from a snapshot); a
/// rollback through `ctl` reaches every replica.
#[tokio::test]
async fn authors_reasons_and_history_survive_a_restart_and_a_rollback_reaches_every_replica() {
    let dir = temp_dir("history");
    let specs = cluster(2, &dir, &["--fsync", "always"]);
    let mut procs: Vec<_> = specs.iter().map(ServeSpec::spawn).collect();
    for s in &specs {
        s.wait_ready().await;
    }
    let ctl = |node: usize, args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(["ctl", "--addr", &specs[node].http()])
            .args(args)
            .output()
            .expect("ctl");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ctl(
        0,
        &["set", "3", "flag", "on", "--reason", "launch day", "--wait"],
    );
    ctl(
        0,
        &[
            "set",
            "3",
            "flag",
            "off",
            "--reason",
            "incident 12",
            "--wait",
        ],
    );
    ctl(1, &["delete", "3", "flag", "--reason", "cleanup", "--wait"]);
    let history = |node: usize| {
        let out = ctl(node, &["--json", "history", "3", "flag"]);
        let json: serde_json::Value = serde_json::from_str(&out).expect("history JSON");
        json["versions"].as_array().expect("versions").clone()
    };
    let expect = |versions: &[serde_json::Value], at: &str| {
        type Seen<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>, bool);
        let seen: Vec<Seen> = versions
            .iter()
            .map(|v| {
                (
                    v["value"].as_str(),
                    v["reason"].as_str(),
                    v["origin"].as_str(),
                    v["deleted"] == true,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (None, Some("cleanup"), Some("durable-1"), true),
                (Some("off"), Some("incident 12"), Some("durable-0"), false),
                (Some("on"), Some("launch day"), Some("durable-0"), false),
            ],
            "{at}"
        );
        assert!(
            versions
                .iter()
                .all(|v| v["author"] == "anonymous" && v["written_at"].as_str().is_some()),
            "{at}: {versions:?}"
        );
    };
    for node in 0..2 {
        expect(&history(node), &format!("node {node}"));
    }
    // Both restart twice: the first start replays the logs and then writes
    // a snapshot of what it loaded (history included), which the second
    // start reads.
    for round in 0..2 {
        drop(std::mem::take(&mut procs));
        procs = specs.iter().map(ServeSpec::spawn).collect();
        for s in &specs {
            s.wait_ready().await;
        }
        for node in 0..2 {
            expect(
                &history(node),
                &format!("node {node} after restart {round}"),
            );
        }
        let data = dir.join("data-0");
        wait_until(
            "a snapshot after the replayed start",
            Duration::from_secs(20),
            || {
                let data = data.clone();
                async move {
                    std::fs::read_dir(&data)
                        .map(|d| {
                            d.flatten()
                                .any(|e| e.file_name().to_string_lossy().starts_with("snapshot"))
                        })
                        .unwrap_or(false)
                }
            },
        )
        .await;
    }
    // Back to "on": a new version, everywhere, by the usual rule.
    let on = history(0)[2]["version"]
        .as_str()
        .expect("version")
        .to_owned();
    ctl(
        1,
        &["rollback", "3", "flag", &on, "--reason", "undo", "--wait"],
    );
    for (node, spec) in specs.iter().enumerate() {
        let versions = history(node);
        assert_eq!(versions.len(), 4, "node {node}: {versions:?}");
        assert_eq!(versions[0]["value"], "on", "node {node}");
        assert_eq!(versions[0]["reason"], "undo", "node {node}");
        assert_eq!(versions[0]["origin"], "durable-1", "node {node}");
        assert_ne!(versions[0]["version"], on.as_str(), "a new version");
        let got = spec.client().get_value(3, "flag").await.expect("get");
        assert_eq!(got.as_deref(), Some("on"), "node {node}");
    }
    // A version no node holds.
    let out = std::process::Command::new(BIN)
        .args(["ctl", "--addr", &specs[0].http()])
        .args(["rollback", "3", "flag", "1.0@0000000000000001"])
        .output()
        .expect("ctl");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no version"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
