//! The `podcache` binary as users run it: `serve` processes that replicate
//! and stop cleanly on SIGTERM/SIGINT, `ctl`, the demo, and exit codes.

mod common;

use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::process::{BIN, free_port, wait_readyz};
use common::{next_block, wait_until};
use podcache::client::RestClient;

/// Two distinct free ports on `ip` (both held at once while chosen).
fn two_free_ports(ip: Ipv4Addr) -> (u16, u16) {
    let a = TcpListener::bind((ip, 0)).expect("bind");
    let b = TcpListener::bind((ip, 0)).expect("bind");
    let port = |l: &TcpListener| l.local_addr().map(|a| a.port()).expect("port");
    (port(&a), port(&b))
}

struct Server {
    child: Child,
    http: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Only if a test failed half-way: never leave our process behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_serve(ip: Ipv4Addr, grpc_port: u16, peers: &[String], name: &str) -> Server {
    spawn_serve_with(ip, grpc_port, peers, name, &[])
}

fn spawn_serve_with(
    ip: Ipv4Addr,
    grpc_port: u16,
    peers: &[String],
    name: &str,
    extra: &[&str],
) -> Server {
    let http_port = free_port(ip);
    let child = Command::new(BIN)
        .args([
            "serve",
            "--http-addr",
            &format!("{ip}:{http_port}"),
            "--grpc-addr",
            &format!("{ip}:{grpc_port}"),
            "--pod-ip",
            &ip.to_string(),
            "--pod-name",
            name,
            "--peers",
            &peers.join(","),
        ])
        .args(extra)
        .env("PODCACHE_SHUTDOWN_GRACE_MS", "3000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("podcache serve starts");
    Server {
        child,
        http: format!("http://{ip}:{http_port}"),
    }
}

fn ctl(addr: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["ctl", "--addr", addr])
        .args(args)
        .output()
        .expect("podcache ctl runs")
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("sh")
        .args(["-c", &format!("kill -{name} {}", child.id())])
        .status()
        .expect("sh runs");
    assert!(status.success());
}

async fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "process did not exit within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_ready(http: &str) {
    let client = RestClient::new(http).expect("address");
    wait_readyz(&client, hyper::StatusCode::OK, Duration::from_secs(20)).await;
}

#[tokio::test]
async fn serve_processes_replicate_and_exit_zero_on_sigterm_and_sigint() {
    let block = next_block();
    let (a, b) = (Ipv4Addr::from(block | 2), Ipv4Addr::from(block | 3));
    // The same gRPC port on both, as pods of one Deployment.
    let grpc_port = free_port(a);
    let peers = vec![format!("{a}:{grpc_port}"), format!("{b}:{grpc_port}")];
    let mut node_a = spawn_serve(a, grpc_port, &peers, "pod-a");
    wait_ready(&node_a.http).await;
    // One node runs on one worker thread: replication does not depend on
    // a second one.
    let mut node_b = spawn_serve_with(b, grpc_port, &peers, "pod-b", &["--worker-threads", "1"]);
    wait_ready(&node_b.http).await;
    let workers = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("the node's threads")
            .filter_map(Result::ok)
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "tokio-rt-worker")
            })
            .count()
    };
    assert_eq!(workers(node_b.child.id()), 1, "--worker-threads 1");
    assert!(workers(node_a.child.id()) >= 1);

    let set = ctl(&node_a.http, &["set", "4", "flag", "on", "--wait"]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let out = String::from_utf8_lossy(&set.stdout);
    assert!(out.contains("acked") && out.contains("pod-b"), "{out}");
    let get = ctl(&node_b.http, &["get", "4", "flag"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "on");
    // Compare-and-set from the command line: the version read, then a
    // stale one refused with the current version named.
    let read = ctl(&node_b.http, &["--json", "get", "4", "flag"]);
    let read: serde_json::Value = serde_json::from_slice(&read.stdout).expect("json");
    let version = read["version"].as_str().expect("version").to_owned();
    let cas = ctl(
        &node_b.http,
        &["set", "4", "flag", "off", "--if-version", &version],
    );
    assert!(
        cas.status.success(),
        "{}",
        String::from_utf8_lossy(&cas.stderr)
    );
    let stale = ctl(
        &node_a.http,
        &["set", "4", "flag", "lost", "--if-version", &version],
    );
    assert!(!stale.status.success());
    let err = String::from_utf8_lossy(&stale.stderr);
    assert!(
        err.contains("precondition failed") && err.contains("412"),
        "{err}"
    );
    let exists = ctl(&node_a.http, &["set", "4", "flag", "new", "--if-absent"]);
    assert!(!exists.status.success());
    let get = ctl(&node_a.http, &["get", "4", "flag"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "off");
    let set = ctl(&node_a.http, &["set", "4", "flag", "on"]);
    assert!(set.status.success());
    let list = ctl(&node_b.http, &["--json", "list", "4"]);
    let json: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    assert_eq!(json["entries"]["flag"], "on");
    let cluster = ctl(&node_b.http, &["cluster"]);
    let out = String::from_utf8_lossy(&cluster.stdout);
    assert!(
        out.contains("pod-a") && out.contains("pod-b") && out.contains("yes"),
        "{out}"
    );

    // `ctl watch --json` prints each change as it arrives.
    let mut watch = Command::new(BIN)
        .args([
            "ctl",
            "--addr",
            &node_b.http,
            "--json",
            "watch",
            "4",
            "--key",
            "live",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ctl watch runs");
    let watch_out = watch.stdout.take().expect("stdout");
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(watch_out)
            .lines()
            .map_while(Result::ok)
        {
            let _ = line_tx.send(line);
        }
    });
    let client = RestClient::new(&node_a.http).expect("client");
    let mut seen = None;
    for _ in 0..100 {
        // The watch may subscribe after a write: write until one shows.
        client.put(4, "live", "streamed", "").await.expect("put");
        if let Ok(line) = line_rx.recv_timeout(Duration::from_millis(100)) {
            seen = Some(line);
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let event: serde_json::Value =
        serde_json::from_str(&seen.expect("an event line")).expect("JSON");
    assert_eq!(event["key"], "live");
    assert_eq!(event["value"], "streamed");

    let absent = ctl(&node_b.http, &["get", "4", "nothing"]);
    assert_eq!(absent.status.code(), Some(1));
    let err = String::from_utf8_lossy(&absent.stderr);
    assert_eq!(err.lines().count(), 1, "one clear line: {err}");
    assert!(err.contains("no entry"), "{err}");

    // Tables: a header above rows, each line ended; nothing for nothing.
    let list = ctl(&node_b.http, &["list", "4"]);
    let rows = String::from_utf8_lossy(&list.stdout);
    assert!(rows.starts_with("KEY   VALUE\nflag  on\n"), "{rows:?}");
    assert!(rows.ends_with('\n'), "{rows:?}");
    let empty = ctl(&node_b.http, &["list", "9"]);
    assert!(empty.status.success());
    assert_eq!(String::from_utf8_lossy(&empty.stdout), "");
    assert_eq!(
        String::from_utf8_lossy(&empty.stderr),
        "no entries in type 9\n"
    );

    // A watch whose node goes away before any change prints the error
    // alone, not under a header.
    let watch = Command::new(BIN)
        .args(["ctl", "--addr", &node_b.http, "watch", "9"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctl watch runs");
    let watches = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("podcache_requests_total{op=\"watch\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let metrics = RestClient::new(&node_b.http).expect("client");
    wait_until(
        "the plain watch subscribed",
        Duration::from_secs(10),
        || async {
            let text = metrics
                .get("/metrics")
                .await
                .map(|a| a.text())
                .unwrap_or_default();
            watches(&text) >= 2.0
        },
    )
    .await;

    signal(&node_b.child, "TERM");
    assert_eq!(
        wait_exit(&mut node_b.child, Duration::from_secs(15))
            .await
            .code(),
        Some(0)
    );
    let watched = watch.wait_with_output().expect("ctl watch ends");
    assert!(!watched.status.success());
    assert_eq!(String::from_utf8_lossy(&watched.stdout), "", "no header");
    assert_eq!(
        String::from_utf8_lossy(&watched.stderr).lines().count(),
        1,
        "{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    signal(&node_a.child, "INT");
    assert_eq!(
        wait_exit(&mut node_a.child, Duration::from_secs(15))
            .await
            .code(),
        Some(0)
    );
}

#[test]
fn a_bad_configuration_exits_64_with_one_line() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--pod-ip",
            "127.0.0.1",
            "--peers",
            "not-an-address",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not-an-address"), "{err}");
    let out = Command::new(BIN)
        .args(["serve", "--pod-ip", "127.0.0.1", "--worker-threads", "0"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--worker-threads"), "{err}");
    // tokio's own variable is read too, and a bad one is not a panic.
    let out = Command::new(BIN)
        .args(["serve", "--pod-ip", "127.0.0.1"])
        .env("TOKIO_WORKER_THREADS", "many")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("TOKIO_WORKER_THREADS"), "{err}");
}

#[test]
fn ctl_cannot_reach_a_node_exits_non_zero() {
    let out = ctl("http://127.0.0.1:1", &["get", "1", "k"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

#[tokio::test]
async fn the_demo_walks_through_and_exits() {
    let block = next_block();
    let first = Ipv4Addr::from(block | 2);
    let (http, grpc) = two_free_ports(first);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args([
                "demo",
                "--exit",
                "--first-ip",
                &first.to_string(),
                "--http-port",
                &http.to_string(),
                "--grpc-port",
                &grpc.to_string(),
            ])
            .output()
            .expect("demo runs")
    })
    .await
    .expect("joined");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "hello-web-3",
        "pulled from",
        "snapshot",
        "absent (404)",
        "acked",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}

#[tokio::test]
async fn the_demo_runs_on_pods_in_a_local_etcd() {
    let block = next_block();
    let first = Ipv4Addr::from(block | 2);
    let (http, grpc) = two_free_ports(first);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args([
                "demo",
                "--exit",
                "--etcd",
                "local",
                "--first-ip",
                &first.to_string(),
            ])
            .args([
                "--http-port",
                &http.to_string(),
                "--grpc-port",
                &grpc.to_string(),
            ])
            .output()
            .expect("demo runs")
    })
    .await
    .expect("joined");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("pods in etcd"), "{stdout}");
    assert!(stdout.contains("hello-web-0  snapshot"), "{stdout}");
}

#[test]
fn discovery_without_a_selector_endpoints_or_files_is_a_configuration_error() {
    for args in [
        vec!["--discovery", "kubernetes"],
        vec![
            "--discovery",
            "kubernetes",
            "--selector",
            "app=hello",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ],
        vec!["--discovery", "etcd-lease"],
        vec![
            "--discovery",
            "etcd-lease",
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
            "--etcd-prefix",
            "no-slashes",
        ],
        vec![
            "--discovery",
            "etcd-lease",
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
            "--lease-ttl-secs",
            "1",
        ],
        vec![
            "--discovery",
            "etcd",
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
        ],
        vec!["--discovery", "etcd", "--selector", "app=hello"],
        vec![
            "--discovery",
            "etcd-v2",
            "--selector",
            "app=hello",
            "--etcd-endpoints",
            "https://127.0.0.1:2379",
        ],
        vec![
            "--discovery",
            "etcd",
            "--selector",
            "app",
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
        ],
    ] {
        let out = Command::new(BIN)
            .args(["serve", "--pod-ip", "127.0.0.1"])
            .args(&args)
            .output()
            .expect("runs");
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).lines().count(),
            1,
            "{args:?}"
        );
    }
}

#[tokio::test]
async fn ctl_sends_the_token_of_its_token_file() {
    let dir = std::env::temp_dir().join(format!(
        "podcache-cli-tokens-{}-{}",
        std::process::id(),
        next_block()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "write:cli-write-token-0123456789\n").expect("tokens");
    let mine = dir.join("my-token");
    std::fs::write(&mine, "cli-write-token-0123456789\n").expect("token");
    let ip = Ipv4Addr::from(next_block() | 2);
    let (grpc, _) = two_free_ports(ip);
    let server = spawn_serve_with(
        ip,
        grpc,
        &[],
        "secured",
        &["--auth-token-file", &tokens.to_string_lossy()],
    );
    wait_ready(&server.http).await;
    let without = ctl(&server.http, &["set", "1", "k", "v"]);
    assert_ne!(without.status.code(), Some(0), "no token, no write");
    assert!(
        String::from_utf8_lossy(&without.stderr).contains("bearer token"),
        "{}",
        String::from_utf8_lossy(&without.stderr)
    );
    let token_file = mine.to_string_lossy().into_owned();
    let with = ctl(
        &server.http,
        &["--token-file", &token_file, "set", "1", "k", "v"],
    );
    assert_eq!(
        with.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    let read = ctl(
        &server.http,
        &["--token-file", &token_file, "get", "1", "k"],
    );
    assert_eq!(String::from_utf8_lossy(&read.stdout).trim(), "v");
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_security_files_are_configuration_errors() {
    let dir = std::env::temp_dir().join(format!("podcache-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let weak = dir.join("weak");
    std::fs::write(&weak, "read:short\n").expect("write");
    let weak = weak.to_string_lossy().into_owned();
    for args in [
        vec!["--auth-token-file", weak.as_str()],
        vec!["--auth-token-file", "/nonexistent/tokens"],
        vec!["--tls-cert", "/nonexistent/cert"],
        vec![
            "--tls-cert",
            weak.as_str(),
            "--tls-key",
            weak.as_str(),
            "--tls-ca",
            weak.as_str(),
        ],
    ] {
        let out = Command::new(BIN)
            .args([
                "serve",
                "--pod-ip",
                "127.0.0.1",
                "--http-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
            ])
            .args(&args)
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(!err.contains("short"), "the token is never shown: {err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn on_sigterm_a_node_reports_not_ready_and_serves_on_for_the_shutdown_delay() {
    let ip = Ipv4Addr::from(next_block() | 2);
    let grpc_port = free_port(ip);
    let mut node = spawn_serve_with(ip, grpc_port, &[], "delayed", &["--shutdown-delay", "2s"]);
    wait_ready(&node.http).await;
    let client = RestClient::new(&node.http).expect("client");
    client.put(1, "k", "v", "").await.expect("put");
    signal(&node.child, "TERM");
    wait_readyz(
        &client,
        hyper::StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(5),
    )
    .await;
    // Not ready, still answering.
    assert_eq!(
        client
            .get_value(1, "k")
            .await
            .expect("served during the delay")
            .as_deref(),
        Some("v")
    );
    assert_eq!(
        wait_exit(&mut node.child, Duration::from_secs(15))
            .await
            .code(),
        Some(0)
    );
}

#[tokio::test]
async fn without_max_memory_bytes_the_capacity_follows_the_containers_memory_limit() {
    let ip = Ipv4Addr::from(next_block() | 2);
    let (http_port, grpc_port) = two_free_ports(ip);
    let limit = std::env::temp_dir().join(format!("podcache-memory-max-{}", std::process::id()));
    // 96 MiB: (96 - 64) MiB / 2.5 of keys and values.
    std::fs::write(&limit, "100663296\n").expect("limit file");
    let child = Command::new(BIN)
        .args(["serve", "--pod-ip", &ip.to_string(), "--peers", ""])
        .args([
            "--http-addr",
            &format!("{ip}:{http_port}"),
            "--grpc-addr",
            &format!("{ip}:{grpc_port}"),
        ])
        .env("PODCACHE_CGROUP_MEMORY_FILE", &limit)
        .env_remove("PODCACHE_MAX_MEMORY_BYTES")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let _node = Server {
        child,
        http: format!("http://{ip}:{http_port}"),
    };
    let http = format!("http://{ip}:{http_port}");
    wait_ready(&http).await;
    let client = RestClient::new(&http).expect("client");
    let metrics = client.get("/metrics").await.expect("metrics").text();
    let capacity: f64 = metrics
        .lines()
        .find(|l| l.starts_with("podcache_store_capacity_bytes "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("capacity gauge");
    assert_eq!(capacity as u64, (32u64 << 20) * 2 / 5, "{metrics}");
    // 507 comes before the limit: ~13 MiB of data at most.
    let value = "x".repeat(1 << 20);
    let mut refused = false;
    for i in 0..40 {
        let answer = client
            .put(1, &format!("big{i}"), &value, "")
            .await
            .expect("put");
        if answer.status == hyper::StatusCode::INSUFFICIENT_STORAGE {
            refused = true;
            assert!(i >= 10, "refused after {i} MiB");
            break;
        }
    }
    assert!(refused, "capacity enforced");
    let _ = std::fs::remove_file(&limit);
}

/// A node that its peers list under an address other than its `--pod-ip`
/// (it listens on every address, as a pod started without `--pod-ip`
/// that took the host's first address) dials itself there. It knows itself
/// by its node id in the answer to `Hello`: one warning, and that address
/// is no peer (not in `/v1/cluster`, not in `podcache_peers`), while the
/// real peer replicates both ways.
#[tokio::test]
async fn a_node_listed_under_another_address_drops_itself_with_one_warning() {
    let block = next_block();
    let (a, b, alias) = (
        Ipv4Addr::from(block | 2),
        Ipv4Addr::from(block | 3),
        Ipv4Addr::from(block | 7),
    );
    let grpc_a = free_port(Ipv4Addr::UNSPECIFIED);
    let grpc_b = free_port(b);
    let peers = [format!("{alias}:{grpc_a}"), format!("{b}:{grpc_b}")].join(",");
    let http_a = format!("{a}:{}", free_port(a));
    let mut child = Command::new(BIN)
        .args(["serve", "--http-addr", &http_a])
        .args(["--grpc-addr", &format!("0.0.0.0:{grpc_a}")])
        .args(["--pod-ip", &a.to_string(), "--pod-name", "pod-a"])
        .args(["--peers", &peers])
        .env("PODCACHE_SHUTDOWN_GRACE_MS", "3000")
        .env("PODCACHE_LOG_FORMAT", "text")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("podcache serve starts");
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stderr = child.stderr.take().expect("stderr");
    let lines = log.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            lines.lock().expect("log").push(line);
        }
    });
    let node_a = Server {
        child,
        http: format!("http://{http_a}"),
    };
    wait_ready(&node_a.http).await;
    let node_b = spawn_serve(b, grpc_b, std::slice::from_ref(&peers), "pod-b");
    wait_ready(&node_b.http).await;

    let warnings = || {
        log.lock()
            .expect("log")
            .iter()
            .filter(|l| l.contains("reaches this node itself"))
            .count()
    };
    let client_a = RestClient::new(&node_a.http).expect("client");
    let only_b = || async {
        let view = client_a.get("/v1/cluster").await.expect("cluster").json();
        let peers = view["peers"].as_array().cloned().unwrap_or_default();
        peers.len() == 1 && peers[0]["grpc_addr"] == format!("{b}:{grpc_b}")
    };
    wait_until(
        "a drops itself and keeps b",
        Duration::from_secs(20),
        || async { warnings() >= 1 && only_b().await },
    )
    .await;
    let text = client_a.get("/metrics").await.expect("metrics").text();
    assert!(text.lines().any(|l| l == "podcache_peers 1"), "{text}");

    // b is a peer both ways.
    let set = ctl(&node_a.http, &["set", "4", "from-a", "1", "--wait"]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let got = ctl(&node_b.http, &["get", "4", "from-a"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "1");
    let set = ctl(&node_b.http, &["set", "4", "from-b", "2", "--wait"]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let got = ctl(&node_a.http, &["get", "4", "from-b"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "2");
    assert!(
        only_b().await,
        "the address it reached itself at stays dropped"
    );
    assert_eq!(warnings(), 1, "one warning: {:?}", log.lock().expect("log"));
}

#[tokio::test]
async fn ctl_schema_sets_shows_and_deletes_a_types_schema() {
    let dir = std::env::temp_dir().join(format!(
        "podcache-cli-schema-{}-{}",
        std::process::id(),
        next_block()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let schema = dir.join("schema.json");
    std::fs::write(&schema, r#"{"type":"integer","minimum":0}"#).expect("schema");
    let bad = dir.join("bad.json");
    std::fs::write(&bad, r#"{"type":"nope"}"#).expect("schema");
    let ip = Ipv4Addr::from(next_block() | 2);
    let (grpc, _) = two_free_ports(ip);
    let server = spawn_serve(ip, grpc, &[], "schemas");
    wait_ready(&server.http).await;
    let text = |out: &Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let set = ctl(
        &server.http,
        &["schema", "set", "4", &schema.to_string_lossy(), "--wait"],
    );
    assert_eq!(set.status.code(), Some(0), "{}", text(&set));
    assert!(text(&set).starts_with("version "), "{}", text(&set));
    let get = ctl(&server.http, &["schema", "get", "4"]);
    assert_eq!(get.status.code(), Some(0), "{}", text(&get));
    let shown: serde_json::Value = serde_json::from_slice(&get.stdout).expect("JSON");
    assert_eq!(shown["minimum"], 0, "{shown}");
    let refused = ctl(&server.http, &["set", "4", "n", "--", "-1"]);
    assert_ne!(refused.status.code(), Some(0));
    assert!(text(&refused).contains("minimum"), "{}", text(&refused));
    let invalid = ctl(
        &server.http,
        &["schema", "set", "4", &bad.to_string_lossy()],
    );
    assert_ne!(invalid.status.code(), Some(0));
    assert!(
        text(&invalid).contains("draft 2020-12"),
        "{}",
        text(&invalid)
    );
    let deleted = ctl(&server.http, &["schema", "delete", "4"]);
    assert_eq!(deleted.status.code(), Some(0), "{}", text(&deleted));
    let through = ctl(&server.http, &["set", "4", "n", "--", "-1"]);
    assert_eq!(through.status.code(), Some(0), "{}", text(&through));
    let none = ctl(&server.http, &["schema", "get", "4"]);
    assert_ne!(none.status.code(), Some(0));
    assert!(text(&none).contains("no schema"), "{}", text(&none));
    let _ = std::fs::remove_dir_all(dir);
}
