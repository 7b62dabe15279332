//! The container image, built offline and started from its own files.
//!
//! deploy/Dockerfile needs a registry for its base images, which the
//! project's machines cannot reach; `deploy/image/build` builds the same
//! image `FROM scratch` with Debian's podman instead. This test builds it
//! and checks it against the Dockerfile and the StatefulSet:
//!
//! - **Layout.** The built image's user, entrypoint, command and ports are
//!   the Dockerfile's last stage's; its binary sits where the Dockerfile
//!   copies it; the one thing not owned by root is the data directory, the
//!   one the Dockerfile creates with the user's ownership, and that is the
//!   StatefulSet's volume mount, with `--data-dir` inside it; the user is
//!   the manifests' `runAsUser:runAsGroup` and /etc/passwd and /etc/group
//!   name it; no file but the binary and the shared libraries is
//!   executable (no shell); CA certificates are there.
//! - **It runs.** `podman run` is refused in this sandbox (its rlimit and
//!   cgroup settings), so the test exports the image's file tree (`podman
//!   create`, `podman export`) and starts the binary from it the way a
//!   runtime would: a mount namespace of its own (`unshare`), the tree
//!   bind-mounted read-only (the manifests' `readOnlyRootFilesystem`), a
//!   fresh volume owned by the user on the StatefulSet's mount path, /proc
//!   and /sys, then `chroot` as the image's user, with the StatefulSet's
//!   arguments and downward-API variables. Adapted to the test machine:
//!   `--discovery=static` instead of `kubernetes` (no API server here) and
//!   the container's ports on 127.227.0.2 (outside the 127.16-215.x.y
//!   blocks of `common::next_block` and the 127.0.0.x of other tests). It
//!   must answer `/readyz`, take a write, come back from `kill -9` with
//!   the write loaded from its volume, and exit 0 on SIGTERM (after the
//!   StatefulSet's 5 s `--shutdown-delay`).
//!
//! **Which binary.** The test profile's own (`CARGO_BIN_EXE_podcache`,
//! already built for the suite), stripped on its way in: the image's
//! files and layout are the release image's, only the binary's code is
//! unoptimised (a 41 MB image here, the release image 22 MB, which the
//! README gives). The release binary would cost CI a second build of every
//! crate: measured on this 2-core machine (shared, 15:16Z), a clean
//! `cargo build --release` of podcache took 7 min 12 s of wall time and
//! 444 s of CPU (thin LTO; at least ~4 min with both cores to itself),
//! which would take CI from ~20 minutes to 24-27 of its 30. A dedicated
//! profile would not help: any profile but the test's own builds every
//! crate again. With the test profile's binary the test takes about 8 s
//! (image build ~1.5 s, export ~1 s, two starts well under 1 s each, the
//! StatefulSet's 5 s shutdown delay).
//! `PODCACHE_IMAGE_RELEASE=1` builds and tests the release image instead.
//!
//! Skipped, with one line saying so, where podman is missing (`.ci/run`
//! installs it) or the test is not root (mount and chroot need it).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::process::{BIN, Proc};
use hyper::StatusCode;
use podcache::client::RestClient;
use serde_json::Value;
use tokio::time::Instant;

/// Where the node from the image listens (the container's own ports).
const POD_IP: Ipv4Addr = Ipv4Addr::new(127, 227, 0, 2);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(127, 227, 0, 1);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The facts both builds must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    /// `USER`, `uid:gid`.
    user: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    /// `8087/tcp`, ...
    ports: BTreeSet<String>,
    /// Where the binary is.
    binary: String,
    /// The directory owned by the user.
    data_dir: String,
}

/// The instructions of a Dockerfile's last stage, continuation lines
/// joined and comments dropped: (instruction, arguments).
fn last_stage(text: &str) -> Vec<(String, String)> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || (current.is_empty() && line.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stage = Vec::new();
    for line in lines {
        let (instruction, rest) = line.split_once(' ').unwrap_or((&line, ""));
        let instruction = instruction.to_ascii_uppercase();
        if instruction == "FROM" {
            stage.clear();
        }
        stage.push((instruction, rest.trim().to_owned()));
    }
    stage
}

fn json_strings(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("a JSON array of strings: {text}: {e}"))
}

/// deploy/Dockerfile's layout, from its text.
fn dockerfile_layout() -> Layout {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("Dockerfile");
    let stage = last_stage(&text);
    let last = |name: &str| {
        stage
            .iter()
            .rev()
            .find(|(i, _)| i == name)
            .map(|(_, rest)| rest.clone())
            .unwrap_or_else(|| panic!("the Dockerfile's last stage has no {name}"))
    };
    let user = last("USER");
    let mut binary = None;
    let mut data_dir = None;
    for (_, rest) in stage.iter().filter(|(i, _)| i == "COPY") {
        let words: Vec<&str> = rest.split_whitespace().collect();
        let (flags, paths): (Vec<&str>, Vec<&str>) =
            words.iter().partition(|w| w.starts_with("--"));
        let (Some(dest), Some(source)) = (paths.last(), paths.first()) else {
            continue;
        };
        if source.trim_end_matches('/').ends_with("/podcache") {
            binary = Some(dest.to_string());
        }
        if let Some(owner) = flags.iter().find_map(|f| f.strip_prefix("--chown=")) {
            assert_eq!(owner, user, "the Dockerfile gives {dest} to another user");
            assert!(data_dir.is_none(), "one directory of the user's");
            data_dir = Some(dest.trim_end_matches('/').to_owned());
        }
    }
    let ports = last("EXPOSE")
        .split_whitespace()
        .map(|p| {
            if p.contains('/') {
                p.to_owned()
            } else {
                format!("{p}/tcp")
            }
        })
        .collect();
    Layout {
        user,
        entrypoint: json_strings(&last("ENTRYPOINT")),
        cmd: json_strings(&last("CMD")),
        ports,
        binary: binary.expect("the Dockerfile copies the binary"),
        data_dir: data_dir.expect("the Dockerfile creates a directory owned by the user"),
    }
}

/// Every document of every YAML file under deploy/, as JSON (PyYAML of the
/// venv `scripts/test` creates, as in tests/deploy.rs).
fn deploy_documents() -> Vec<(PathBuf, Value)> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read deploy/").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                found.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root().join("deploy"), &mut files);
    files.sort();
    let python = root().join(".venv-interop/bin/python");
    assert!(
        python.exists(),
        "run scripts/test: it creates .venv-interop with PyYAML"
    );
    let out = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml\n\
             print(json.dumps([[p, [d for d in yaml.safe_load_all(open(p)) if d is not None]]\n\
                               for p in sys.argv[1:]]))",
        ])
        .args(&files)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Vec<(PathBuf, Vec<Value>)> = serde_json::from_slice(&out.stdout).expect("JSON");
    parsed
        .into_iter()
        .flat_map(|(p, docs)| docs.into_iter().map(move |d| (p.clone(), d)))
        .collect()
}

/// What the test takes from the StatefulSet.
struct StatefulSet {
    user: String,
    args: Vec<String>,
    /// Downward-API variables: (name, fieldPath).
    env: Vec<(String, String)>,
    mount_path: String,
    /// The container's ports by name.
    ports: BTreeMap<String, u16>,
}

/// Every StatefulSet with volumes under deploy/ (the plain manifest and
/// any overlay's copy), with the file it is in.
fn statefulsets() -> Vec<(PathBuf, StatefulSet)> {
    let found: Vec<_> = deploy_documents()
        .into_iter()
        .filter(|(_, d)| d["kind"] == "StatefulSet" && d["spec"]["volumeClaimTemplates"].is_array())
        .map(|(file, set)| {
            let parsed = statefulset(&file, &set);
            (file, parsed)
        })
        .collect();
    assert!(
        !found.is_empty(),
        "a StatefulSet with volumes under deploy/"
    );
    found
}

fn statefulset(file: &Path, set: &Value) -> StatefulSet {
    let pod = &set["spec"]["template"]["spec"];
    let container = pod["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["args"][0] == "serve")
        .unwrap_or_else(|| panic!("{}: no container runs serve", file.display()));
    assert!(
        container.get("command").is_none(),
        "the container runs the image's entrypoint"
    );
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|s| s.as_str().expect("a string").to_owned())
            .collect()
    };
    let claims: Vec<&str> = set["spec"]["volumeClaimTemplates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["metadata"]["name"].as_str())
        .collect();
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| claims.contains(&m["name"].as_str().unwrap_or_default()))
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert_eq!(mounts.len(), 1, "one volume of its own: {mounts:?}");
    let security = &pod["securityContext"];
    StatefulSet {
        user: format!("{}:{}", security["runAsUser"], security["runAsGroup"]),
        args: strings(&container["args"]),
        env: container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let field = e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?;
                Some((e["name"].as_str()?.to_owned(), field.to_owned()))
            })
            .collect(),
        mount_path: mounts[0].to_owned(),
        ports: container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p["name"].as_str()?.to_owned(),
                    p["containerPort"].as_u64()? as u16,
                ))
            })
            .collect(),
    }
}

/// Runs a command to its end; its stdout, or a panic with its stderr.
#[track_caller]
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The image and its container, removed however the test ends.
struct Podman {
    tag: String,
    container: Option<String>,
}

impl Drop for Podman {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("podman")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        if let Some(container) = &self.container {
            quiet(&["rm", "--force", container]);
        }
        quiet(&["rmi", "--force", &self.tag]);
    }
}

/// Every path of the tree under `dir`, relative to it with a leading `/`.
fn tree(dir: &Path) -> Vec<(String, std::fs::Metadata)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).expect("read the tree").flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            if meta.is_dir() {
                stack.push(path.clone());
            }
            let inside = path.strip_prefix(dir).expect("inside").to_string_lossy();
            found.push((format!("/{inside}"), meta));
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// Starts the image's entrypoint from the file tree `rootfs` as a runtime
/// would (see the top of this file); `volume` is mounted on `mount_path`.
fn start(
    rootfs: &Path,
    volume: &Path,
    mount_path: &str,
    layout: &Layout,
    args: &[String],
    env: &[(String, String)],
    log: &Path,
) -> Proc {
    const SCRIPT: &str = r#"set -eu
root=$1 volume=$2 mount_path=$3 user=$4
shift 4
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount --bind "$volume" "$root$mount_path"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount -o remount,bind,ro "$root/sys"
exec chroot --userspec="$user" "$root" "$@""#;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let child = Command::new("unshare")
        .args(["--mount", "--", "sh", "-c", SCRIPT, "sh"])
        .arg(rootfs)
        .arg(volume)
        .args([mount_path, &layout.user])
        .args(&layout.entrypoint)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("unshare starts");
    Proc { child }
}

/// Waits for `/readyz` 200, failing at once (with its log) if the process
/// exits.
async fn wait_ready(proc: &mut Proc, client: &RestClient, log: &Path) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    loop {
        if let Some(status) = proc.child.try_wait().expect("wait") {
            panic!(
                "the node from the image exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if client
            .get("/readyz")
            .await
            .is_ok_and(|a| a.status == StatusCode::OK)
        {
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "not ready within 30 s:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The real, effective, saved and filesystem uids of a process.
fn uids(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .expect("Uid line")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line on the test's stderr that `cargo test` shows even when the
/// test passes (its capture takes `print!`/`eprint!` only): a skip, the
/// image's size.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// What a StatefulSet must agree on with the image's layout.
fn check_statefulset(file: &Path, set: &StatefulSet, expected: &Layout) {
    let file = file.display();
    assert_eq!(
        set.user, expected.user,
        "{file}: the pods run as the image's user"
    );
    assert_eq!(
        set.mount_path, expected.data_dir,
        "{file}: the volume is mounted on the image's data directory"
    );
    let data_arg = set
        .args
        .iter()
        .find_map(|a| a.strip_prefix("--data-dir="))
        .unwrap_or_else(|| panic!("{file}: no --data-dir"));
    assert!(
        Path::new(data_arg).starts_with(&set.mount_path),
        "{file}: --data-dir={data_arg} is on the volume ({})",
        set.mount_path
    );
    assert_eq!(
        set.args[0], expected.cmd[0],
        "{file}: the args replace CMD's"
    );
    for port in set.ports.values() {
        assert!(
            expected.ports.contains(&format!("{port}/tcp")),
            "{file}: the container's port {port} is exposed in the image ({:?})",
            expected.ports
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offline_image_has_the_dockerfiles_layout_and_runs_the_statefulset() {
    if Command::new("podman")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_or(true, |s| !s.success())
    {
        say(
            "tests/image.rs: SKIPPED, podman is not installed (Debian: apt-get install podman buildah)",
        );
        return;
    }
    if !is_root() {
        say("tests/image.rs: SKIPPED, not root (starting the image's tree needs mount and chroot)");
        return;
    }
    let began = Instant::now();

    // The two files and the StatefulSet agree before anything is built.
    let expected = dockerfile_layout();
    assert_eq!(
        expected.entrypoint.first(),
        Some(&expected.binary),
        "the Dockerfile's entrypoint is the binary it copies"
    );
    let sets = statefulsets();
    for (file, set) in &sets {
        check_statefulset(file, set, &expected);
    }
    // The one the test runs.
    let (file, set) = &sets[0];
    let data_arg = set
        .args
        .iter()
        .find_map(|a| a.strip_prefix("--data-dir="))
        .expect("--data-dir");
    // Build.
    let work = std::env::temp_dir().join(format!("podcache-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");
    let mut podman = Podman {
        tag: format!("localhost/podcache-image-test:{}", std::process::id()),
        container: None,
    };
    let release = std::env::var_os("PODCACHE_IMAGE_RELEASE").is_some_and(|v| v == "1");
    let build = root().join("deploy/image/build");
    let build = build.to_str().expect("path");
    let t = Instant::now();
    if release {
        run(build, &["--tag", &podman.tag]);
    } else {
        run(build, &["--binary", BIN, "--tag", &podman.tag]);
    }
    let build_time = t.elapsed();
    let inspect = run("podman", &["image", "inspect", &podman.tag]);
    let inspect: Value = serde_json::from_str(&inspect).expect("inspect JSON");
    let image = &inspect[0];
    let size = image["Size"].as_u64().expect("Size");
    let config = &image["Config"];

    // Its file tree, as a runtime would see it.
    let t = Instant::now();
    let container = run("podman", &["create", &podman.tag]).trim().to_owned();
    podman.container = Some(container.clone());
    let archive = work.join("image.tar");
    run(
        "podman",
        &[
            "export",
            "--output",
            archive.to_str().expect("path"),
            &container,
        ],
    );
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(&rootfs).expect("rootfs");
    run(
        "tar",
        &[
            "-xpf",
            archive.to_str().expect("path"),
            "--numeric-owner",
            "-C",
            rootfs.to_str().expect("path"),
        ],
    );
    std::fs::remove_file(&archive).expect("remove the archive");
    let export_time = t.elapsed();

    let files = tree(&rootfs);
    let not_roots: Vec<&str> = files
        .iter()
        .filter(|(_, m)| m.uid() != 0 || m.gid() != 0)
        .map(|(p, _)| p.as_str())
        .collect();
    let (uid, gid) = expected.user.split_once(':').expect("uid:gid");
    let data = files
        .iter()
        .find(|(p, _)| *p == expected.data_dir)
        .map(|(_, m)| m)
        .unwrap_or_else(|| panic!("no {} in the image", expected.data_dir));
    assert!(data.is_dir());
    assert_eq!(
        format!("{}:{}", data.uid(), data.gid()),
        expected.user,
        "{} belongs to the user",
        expected.data_dir
    );
    let built = Layout {
        user: config["User"].as_str().unwrap_or_default().to_owned(),
        entrypoint: serde_json::from_value(config["Entrypoint"].clone()).expect("Entrypoint"),
        cmd: serde_json::from_value(config["Cmd"].clone()).expect("Cmd"),
        ports: config["ExposedPorts"]
            .as_object()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default(),
        binary: config["Entrypoint"][0]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        data_dir: match not_roots[..] {
            [one] => one.to_owned(),
            _ => panic!("only the data directory is the user's, not {not_roots:?}"),
        },
    };
    assert_eq!(
        built, expected,
        "the offline image's layout is the Dockerfile's"
    );

    let executables: Vec<&str> = files
        .iter()
        .filter(|(_, m)| m.is_file() && m.mode() & 0o111 != 0)
        .map(|(p, _)| p.as_str())
        .collect();
    assert!(
        executables.contains(&expected.binary.as_str()),
        "{executables:?}"
    );
    for path in &executables {
        assert!(
            *path == expected.binary || path.contains(".so"),
            "{path} is executable in the image: only the binary and its libraries may be (no shell)"
        );
    }
    assert!(
        !files
            .iter()
            .any(|(p, _)| ["/bin/sh", "/usr/bin/sh", "/bin/bash"].contains(&p.as_str())),
        "no shell"
    );
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).expect("/etc/passwd");
    assert!(
        passwd.lines().any(|l| {
            let f: Vec<&str> = l.split(':').collect();
            f.len() == 7 && f[2] == uid && f[3] == gid
        }),
        "/etc/passwd names {uid}:{gid}:\n{passwd}"
    );
    let group = std::fs::read_to_string(rootfs.join("etc/group")).expect("/etc/group");
    assert!(
        group.lines().any(|l| l.split(':').nth(2) == Some(gid)),
        "/etc/group names {gid}:\n{group}"
    );
    let certs = std::fs::read_to_string(rootfs.join("etc/ssl/certs/ca-certificates.crt"))
        .expect("CA certificates");
    assert!(
        certs.matches("BEGIN CERTIFICATE").count() > 10,
        "CA certificates"
    );

    // Start it as the StatefulSet would, on loopback.
    for dir in ["proc", "sys"] {
        // Mount points a runtime creates.
        std::fs::create_dir_all(rootfs.join(dir)).expect("mount point");
    }
    let volume = work.join("volume");
    std::fs::create_dir_all(&volume).expect("volume");
    let (uid_n, gid_n) = (
        uid.parse::<u32>().expect("uid"),
        gid.parse::<u32>().expect("gid"),
    );
    std::os::unix::fs::chown(&volume, Some(uid_n), Some(gid_n)).expect("chown the volume");
    let port = |name: &str| *set.ports.get(name).expect("the container's port");
    let (http_port, grpc_port) = (port("http"), port("grpc"));
    let mut args: Vec<String> = set
        .args
        .iter()
        .filter(|a| !a.starts_with("--discovery=") && !a.starts_with("--selector="))
        .cloned()
        .collect();
    args.extend([
        "--discovery=static".to_owned(),
        format!("--http-addr={POD_IP}:{http_port}"),
        format!("--grpc-addr={POD_IP}:{grpc_port}"),
    ]);
    let mut env: Vec<(String, String)> = config["Env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str()?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    for (name, field) in &set.env {
        let value = match field.as_str() {
            "status.podIP" => POD_IP.to_string(),
            "status.hostIP" => HOST_IP.to_string(),
            "metadata.name" => "podcache-0".to_owned(),
            "metadata.namespace" => "default".to_owned(),
            other => panic!("a downward-API field the test does not know: {other}"),
        };
        env.push((name.clone(), value));
    }
    let log = work.join("node.log");
    let client = RestClient::new(&format!("http://{POD_IP}:{http_port}")).expect("client");

    let mut node = start(
        &rootfs,
        &volume,
        &set.mount_path,
        &expected,
        &args,
        &env,
        &log,
    );
    let first_start = wait_ready(&mut node, &client, &log).await;
    assert_eq!(
        uids(node.child.id()),
        format!("{uid} {uid} {uid} {uid}"),
        "runs as the image's user"
    );
    let answer = client
        .put(1, "from-the-image", "kept on the volume", "")
        .await
        .expect("put");
    assert!(
        answer.status.is_success(),
        "{}: {}",
        answer.status,
        answer.text()
    );
    assert_eq!(
        client
            .get_value(1, "from-the-image")
            .await
            .expect("get")
            .as_deref(),
        Some("kept on the volume")
    );

    // A crash: the write is in the volume's data directory, written by the
    // user.
    node.kill9();
    let on_volume = volume.join(
        Path::new(data_arg)
            .strip_prefix(&set.mount_path)
            .expect("on the volume"),
    );
    let written = tree(&on_volume);
    assert!(!written.is_empty(), "the node wrote its data directory");
    for (path, meta) in tree(&volume) {
        assert_eq!(
            (meta.uid(), meta.gid()),
            (uid_n, gid_n),
            "{path} on the volume is the user's"
        );
    }

    let mut node = start(
        &rootfs,
        &volume,
        &set.mount_path,
        &expected,
        &args,
        &env,
        &log,
    );
    let second_start = wait_ready(&mut node, &client, &log).await;
    assert_eq!(
        client
            .get_value(1, "from-the-image")
            .await
            .expect("get")
            .as_deref(),
        Some("kept on the volume"),
        "the write survived kill -9"
    );
    let view = client.get("/v1/cluster").await.expect("cluster").json();
    assert_eq!(view["state_source"], "disk", "{view}");

    // Kubernetes stops it with SIGTERM.
    let t = Instant::now();
    let status = Command::new("sh")
        .args([
            "-c",
            "kill -TERM \"$1\"",
            "sh",
            &node.child.id().to_string(),
        ])
        .status()
        .expect("sh runs");
    assert!(status.success());
    assert_eq!(node.exit_code(Duration::from_secs(30)).await, Some(0));
    let stop = t.elapsed();

    say(&format!(
        "tests/image.rs: image {} ({} binary): {size} bytes ({:.1} MB); build {:.1?}, export {:.1?}, \
         with the args of {}: ready in {:.1?}, again after kill -9 in {:.1?}, SIGTERM to exit 0 \
         in {:.1?}; {:.1?} in all",
        podman.tag,
        if release { "release" } else { "test profile's" },
        size as f64 / 1e6,
        build_time,
        export_time,
        file.strip_prefix(root()).unwrap_or(file).display(),
        first_start,
        second_start,
        stop,
        began.elapsed(),
    ));
    drop(podman);
    let _ = std::fs::remove_dir_all(&work);
}
