//! Data-directory scenarios over real `podcache serve` processes, each
//! from a reported failure: deleted keys must stay deleted after their
//! tombstones were purged and a node restarted from its disk (through
//! anti-entropy rounds with every peer); a data directory that holds only
//! a fresh volume's empty `lost+found` is usable; and an export holding
//! keys named `format` and `type` comes back whole through `ctl import`,
//! while a copy cut short at a line's end is refused with nothing merged.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::process::{BIN, Proc, ServeSpec};
use common::{next_block, wait_until};
use hyper::StatusCode;
use podcache::client::RestClient;

/// One key as a node holds it: `(hlc, node)` and the value (None for a
/// tombstone).
type State = BTreeMap<(i32, String), ((u64, String), Option<String>)>;

/// A node's whole state, tombstones included, from `/v1/export`.
async fn state(client: &RestClient) -> State {
    let answer = client.get("/v1/export").await.expect("export");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    answer
        .text()
        .lines()
        .skip(1)
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("json line");
            (
                (
                    v["type"].as_i64().expect("type") as i32,
                    v["key"].as_str().expect("key").to_owned(),
                ),
                (
                    (
                        v["hlc"].as_u64().expect("hlc"),
                        v["node"].as_str().expect("node").to_owned(),
                    ),
                    v["value"].as_str().map(str::to_owned),
                ),
            )
        })
        .collect()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("podcache-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `n` nodes on a fresh address block, each listing all, each with its
/// own data directory `dir/data-<i>` and `extra` flags.
fn cluster(n: usize, dir: &Path, extra: &[&str]) -> Vec<ServeSpec> {
    let block = next_block();
    let mut specs: Vec<ServeSpec> = (0..n)
        .map(|i| {
            let ip = Ipv4Addr::from(block | (i as u32 + 2));
            let mut spec = ServeSpec::new(ip, &format!("scenario-{i}"), dir);
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
