//! The deployment files.
//!
//! - deploy/ is a Kustomize base (deploy/base) with overlays
//!   (deploy/overlays/*): each overlay is rendered with `kubectl kustomize`
//!   (where a kubectl with kustomize v4 or newer is on PATH, or
//!   `PODCACHE_KUBECTL` names one; otherwise the tests that need a render
//!   say so in one line on stderr and pass), must render exactly the
//!   objects listed in [`OVERLAYS`], and its output is what every check
//!   below reads. A broken overlay (a resource missing from the base, a
//!   patch of an object that is not there) fails the render, and the test.
//! - Every render validates, strictly, against the Kubernetes schemas
//!   (kubernetes-validate from PyPI, in the venv `scripts/test` creates), of
//!   the newest version it knows and of the oldest the manifests need; the
//!   validator does reject a broken one. Every complete object file of the
//!   base and the overlays (not the patches) validates on its own too, with
//!   or without kubectl, and every file there is used by a kustomization.
//! - What a schema cannot say is checked on the parsed renders (PyYAML from
//!   the same venv turns them into JSON): every pod passes the "restricted"
//!   Pod Security level and spreads its replicas over nodes and zones,
//!   every object has the app.kubernetes.io labels while selectors keep to
//!   the stable `app` label, SIGTERM's delay and drain fit in the
//!   termination grace period, `--selector` finds the workload's own pods
//!   with RBAC in the same overlay that allows it, every `--flag` exists,
//!   the sidecar is a native one.
//! - `deploy/monitoring/servicemonitor.yaml` is a Prometheus Operator
//!   resource: its kind has no schema among Kubernetes' own (a CRD), so it
//!   is kept out of the overlays and checked here against the base's
//!   Services instead.
//! - The Grafana dashboard is valid JSON and queries only metrics (and
//!   labels) that real nodes expose on /metrics, started in-process and
//!   driven until every series it needs exists.
//! - The Dockerfile and .dockerignore: the image's toolchain is
//!   rust-toolchain.toml's, its binary stripped, its user not root; the
//!   build context keeps what the build needs and nothing large. No Docker
//!   engine runs on the test machines, so this image is not built;
//!   tests/image.rs builds the offline one (deploy/image) and compares its
//!   layout with this Dockerfile's.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::Cluster;
use hyper::Method;
use serde_json::Value;

/// What the base renders, in every standalone overlay.
const BASE: [&str; 6] = [
    "ServiceAccount/podcache",
    "Role/podcache-pod-reader",
    "RoleBinding/podcache-pod-reader",
    "Service/podcache-peers",
    "Service/podcache",
    "PodDisruptionBudget/podcache",
];

/// The sidecar overlay's objects: the application's, no base.
const SIDECAR: [&str; 7] = [
    "ServiceAccount/hello",
    "Role/hello-pod-reader",
    "RoleBinding/hello-pod-reader",
    "Service/hello",
    "Deployment/hello",
    "NetworkPolicy/hello",
    "PodDisruptionBudget/hello",
];

/// Every overlay under deploy/overlays/, with the objects it renders (the
/// base's besides the workload named, or the sidecar's own).
const OVERLAYS: [(&str, Option<&str>); 5] = [
    ("deployment", Some("Deployment/podcache")),
    ("secure", Some("Deployment/podcache")),
    ("etcd", Some("Deployment/podcache")),
    ("statefulset", Some("StatefulSet/podcache")),
    ("sidecar", None),
];

/// The oldest Kubernetes the manifests need: native sidecars (1.29) and
/// the preStop sleep action (1.30) of the sidecar overlay.
const OLDEST_KUBERNETES: &str = "1.30.0";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn venv_bin(name: &str) -> PathBuf {
    let path = root().join(".venv-interop/bin").join(name);
    assert!(
        path.exists(),
        "run scripts/test: it creates .venv-interop with kubernetes-validate"
    );
    path
}

/// kubernetes-validate --strict over `paths`, at `version` (else its newest).
fn validate(paths: &[PathBuf], version: Option<&str>) -> (bool, String) {
    let mut command = Command::new(venv_bin("kubernetes-validate"));
    command.arg("--strict");
    if let Some(version) = version {
        command.args(["--kubernetes-version", version]);
    }
    let out = command
        .args(paths)
        .output()
        .expect("kubernetes-validate runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Validates `paths` at the newest and the oldest version: no error, no
/// warning (a kind without a schema passes with one), every object passed.
#[track_caller]
fn assert_valid(paths: &[PathBuf], objects: usize) {
    for version in [None, Some(OLDEST_KUBERNETES)] {
        let (ok, output) = validate(paths, version);
        assert!(ok, "{paths:?} ({version:?}):\n{output}");
        assert!(!output.contains("ERROR"), "{output}");
        assert!(!output.contains("WARN"), "{output}");
        assert_eq!(
            output.matches(" passed for resource ").count(),
            objects,
            "every object was validated ({version:?}):\n{output}"
        );
    }
}

/// Every document of a YAML file, as JSON (PyYAML of the venv, the parser
/// kubernetes-validate itself uses).
fn documents(path: &Path) -> Vec<Value> {
    let out = Command::new(venv_bin("python"))
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
             print(json.dumps(docs))",
        ])
        .arg(path)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from PyYAML")
}

/// A kubectl whose `kustomize` reads these overlays, or why there is none.
/// They use `resources:` naming directories and `patches:`, which need
/// kustomize v4 or newer (kubectl 1.21 and later; Debian's
/// `kubernetes-client` is kubectl 1.20, with kustomize v2.0.3).
fn kubectl() -> Result<PathBuf, String> {
    let kubectl = std::env::var_os("PODCACHE_KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("kubectl"));
    let out = Command::new(&kubectl)
        .args(["version", "--client"])
        .output()
        .map_err(|e| format!("no {} to run ({e})", kubectl.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let major = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Kustomize Version: v"))
        .and_then(|v| v.split('.').next()?.parse::<u32>().ok());
    // `Client Version: v1.32.4`, or 1.20's `version.Info{...GitVersion:"v1.20.2"...}`.
    let first = text.lines().next().unwrap_or("no version");
    let version = match first.split_once("GitVersion:\"") {
        Some((_, rest)) => rest.split('"').next().unwrap_or(rest),
        None => first.trim_start_matches("Client Version: "),
    };
    match major {
        Some(major) if major >= 4 => Ok(kubectl),
        _ => Err(format!(
            "{} {version} has no kustomize v4 or newer",
            kubectl.display()
        )),
    }
}

/// `kubectl kustomize dir`: the rendered YAML, or kustomize's error.
fn kustomize(kubectl: &Path, dir: &Path) -> Result<String, String> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// One overlay, rendered: where the render was written, and its objects.
struct Rendered {
    overlay: &'static str,
    path: PathBuf,
    objects: Vec<Value>,
}

/// Every overlay rendered once for this test binary. A failed render
/// fails every test that reads it; no kubectl skips them.
fn render_all() -> &'static Result<Vec<Rendered>, String> {
    static RENDERED: OnceLock<Result<Vec<Rendered>, String>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let kubectl = kubectl()?;
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("kustomize-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for the renders");
        let mut all = Vec::new();
        for (overlay, _) in OVERLAYS {
            let yaml = kustomize(&kubectl, &root().join("deploy/overlays").join(overlay))
                .unwrap_or_else(|e| panic!("kubectl kustomize deploy/overlays/{overlay}: {e}"));
            let path = dir.join(format!("{overlay}.yaml"));
            std::fs::write(&path, yaml).expect("write the render");
            let objects = documents(&path);
            all.push(Rendered {
                overlay,
                path,
                objects,
            });
        }
        Ok(all)
    })
}

/// The rendered overlays, or None after one line on stderr saying why
/// `test` checked nothing (written past the test harness's capture).
fn rendered(test: &str) -> Option<&'static [Rendered]> {
    match render_all() {
        Ok(all) => Some(all),
        Err(why) => {
            skipped(test, why);
            None
        }
    }
}

/// The one line a test that checked nothing prints, past the capture.
fn skipped(test: &str, why: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "tests/deploy.rs: {test} skipped: {why} (kubectl >= 1.21 renders deploy/overlays)"
    );
}

fn name_of(object: &Value) -> String {
    format!(
        "{}/{}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn labels(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .map(|map| {
            map.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// The Deployments and StatefulSets of every rendered overlay, with the
/// overlay each is in; None (after a line) where nothing is rendered.
fn workloads(test: &str) -> Option<Vec<(&'static str, Value)>> {
    let mut found = Vec::new();
    for overlay in rendered(test)? {
        for object in &overlay.objects {
            if matches!(object["kind"].as_str(), Some("Deployment" | "StatefulSet")) {
                found.push((overlay.overlay, object.clone()));
            }
        }
    }
    assert_eq!(found.len(), OVERLAYS.len(), "one workload per overlay");
    Some(found)
}

/// Every container of a pod spec with whether it is a native sidecar.
fn containers(pod: &Value) -> Vec<(&Value, bool)> {
    let mut all = Vec::new();
    for c in pod["initContainers"].as_array().into_iter().flatten() {
        all.push((c, c["restartPolicy"] == "Always"));
    }
    for c in pod["containers"].as_array().into_iter().flatten() {
        all.push((c, false));
    }
    all
}

/// The podcache container of a pod spec (the one that runs `serve`).
fn podcache_container(pod: &Value) -> Option<(&Value, bool)> {
    containers(pod)
        .into_iter()
        .find(|(c, _)| strings(&c["args"]).first().is_some_and(|a| a == "serve"))
}

/// The value of `--flag=value` in a container's args.
fn flag(container: &Value, name: &str) -> Option<String> {
    let prefix = format!("--{name}=");
    strings(&container["args"])
        .iter()
        .find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
}

/// `5s`, `250ms`, `1m`, `0s` as seconds.
fn seconds(duration: &str) -> f64 {
    let (number, unit) = duration
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| duration.split_at(i))
        .unwrap_or((duration, "s"));
    let number: f64 = number.parse().expect("a duration's number");
    number
        * match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            other => panic!("unit {other} in {duration}"),
        }
}

/// What a kustomization.yaml names: its `resources` (files and
/// directories, relative to it) and its patches' files.
fn kustomization(dir: &Path) -> (Vec<String>, Vec<String>) {
    let file = dir.join("kustomization.yaml");
    let docs = documents(&file);
    assert_eq!(docs.len(), 1, "{}", file.display());
    let k = &docs[0];
    assert_eq!(k["kind"], "Kustomization", "{}", file.display());
    let patches = k["patches"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["path"].as_str().map(str::to_owned))
        .collect();
    (strings(&k["resources"]), patches)
}

/// The complete objects' files (a kustomization's `resources`, not its
/// patches) of deploy/base and every overlay.
fn object_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in kustomization_dirs() {
        for resource in kustomization(&dir).0 {
            let path = dir.join(resource);
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files
}

/// The directories holding a kustomization: deploy/base and every overlay.
fn kustomization_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![root().join("deploy/base")];
    for (overlay, _) in OVERLAYS {
        dirs.push(root().join("deploy/overlays").join(overlay));
    }
    dirs
}

#[test]
fn every_overlay_renders_its_objects_and_validates_against_the_kubernetes_schemas() {
    let Some(all) = rendered("every_overlay_renders_its_objects_and_validates...") else {
        return;
    };
    let mut total = 0;
    for (overlay, (name, workload)) in all.iter().zip(OVERLAYS) {
        assert_eq!(overlay.overlay, name);
        let mut wanted: BTreeSet<String> = match workload {
            Some(workload) => BASE
                .iter()
                .chain([&workload])
                .map(|s| s.to_string())
                .collect(),
            None => SIDECAR.iter().map(|s| s.to_string()).collect(),
        };
        let got: Vec<String> = overlay.objects.iter().map(name_of).collect();
        for object in &got {
            assert!(
                wanted.remove(object),
                "deploy/overlays/{name} renders {object} (once at most): {got:?}"
            );
        }
        assert!(
            wanted.is_empty(),
            "deploy/overlays/{name} renders no {wanted:?}: {got:?}"
        );
        total += got.len();
    }
    let paths: Vec<PathBuf> = all.iter().map(|o| o.path.clone()).collect();
    assert_valid(&paths, total);
}

#[test]
fn every_file_of_the_base_and_overlays_is_used_and_each_object_file_validates() {
    // Every overlay directory is one the tests render.
    let overlays: BTreeSet<String> = std::fs::read_dir(root().join("deploy/overlays"))
        .expect("deploy/overlays")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let known: BTreeSet<String> = OVERLAYS.iter().map(|(o, _)| o.to_string()).collect();
    assert_eq!(overlays, known, "deploy/overlays/ and OVERLAYS");
    let mut objects = Vec::new();
    let mut count = 0;
    for dir in kustomization_dirs() {
        let (resources, patches) = kustomization(&dir);
        let mut used: BTreeSet<String> = patches.iter().cloned().collect();
        for resource in &resources {
            let path = dir.join(resource);
            assert!(path.exists(), "{}: {resource} is missing", dir.display());
            if path.is_file() {
                count += documents(&path).len();
                objects.push(path);
                used.insert(resource.clone());
            } else {
                assert!(
                    path.join("kustomization.yaml").exists(),
                    "{}: {resource} is no kustomization",
                    dir.display()
                );
            }
        }
        for entry in std::fs::read_dir(&dir).expect("dir") {
            let name = entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned();
            assert!(
                name == "kustomization.yaml" || used.contains(&name),
                "{}/{name} is in no kustomization: it would never be applied",
                dir.display()
            );
        }
    }
    // The complete objects (not the patches) validate as they are, with or
    // without a kustomize to render them.
    assert!(count >= BASE.len() + SIDECAR.len() + 2, "{objects:?}");
    assert_valid(&objects, count);
}

#[test]
fn the_validator_rejects_a_broken_manifest() {
    let path = std::env::temp_dir().join(format!("podcache-broken-{}.yaml", std::process::id()));
    let broken = std::fs::read_to_string(root().join("deploy/overlays/deployment/deployment.yaml"))
        .expect("manifest")
        .replace("replicas: 3", "replicas: three");
    std::fs::write(&path, broken).expect("write");
    let (ok, output) = validate(std::slice::from_ref(&path), None);
    let _ = std::fs::remove_file(&path);
    assert!(!ok, "a string replica count must fail: {output}");
}

/// Copies deploy/base and deploy/overlays to a scratch directory.
fn copy_deploy(to: &Path) {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for entry in std::fs::read_dir(from).expect("dir") {
            let path = entry.expect("entry").path();
            let target = to.join(path.file_name().expect("name"));
            if path.is_dir() {
                copy(&path, &target);
            } else {
                std::fs::copy(&path, &target).expect("copy");
            }
        }
    }
    let _ = std::fs::remove_dir_all(to);
    for part in ["base", "overlays"] {
        copy(&root().join("deploy").join(part), &to.join(part));
    }
}

#[test]
fn kustomize_refuses_a_broken_overlay() {
    let kubectl = match kubectl() {
        Ok(kubectl) => kubectl,
        Err(why) => {
            skipped("kustomize_refuses_a_broken_overlay", &why);
            return;
        }
    };
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kustomize-broken-{}", std::process::id()));
    let overlay = |name: &str| scratch.join("overlays").join(name);
    // The copy renders as it is.
    copy_deploy(&scratch);
    for (name, _) in OVERLAYS {
        kustomize(&kubectl, &overlay(name)).expect("an unchanged copy renders");
    }
    // The base names a file that is not there.
    std::fs::remove_file(scratch.join("base/pdb.yaml")).expect("remove");
    let error = kustomize(&kubectl, &overlay("statefulset")).expect_err("a missing base file");
    assert!(error.contains("pdb.yaml"), "{error}");
    // An overlay names a base that is not there.
    copy_deploy(&scratch);
    std::fs::rename(scratch.join("base"), scratch.join("base-moved")).expect("rename");
    kustomize(&kubectl, &overlay("deployment")).expect_err("a missing base");
    // A patch of a Deployment the overlay does not have.
    copy_deploy(&scratch);
    let patch = overlay("secure").join("tls-and-tokens.yaml");
    let text = std::fs::read_to_string(&patch).expect("patch");
    std::fs::write(
        &patch,
        text.replace("name: podcache\n", "name: podcache-renamed\n"),
    )
    .expect("write");
    kustomize(&kubectl, &overlay("secure")).expect_err("a patch of nothing");
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn the_manifests_only_use_flags_the_binary_has() {
    let Some(workloads) = workloads("the_manifests_only_use_flags_the_binary_has") else {
        return;
    };
    let help = Command::new(env!("CARGO_BIN_EXE_podcache"))
        .args(["serve", "--help"])
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&help.stdout);
    let mut flags = 0;
    for (overlay, workload) in &workloads {
        let pod = &workload["spec"]["template"]["spec"];
        for (container, _) in containers(pod) {
            for arg in strings(&container["args"]) {
                if let Some(flag) = arg.strip_prefix("--") {
                    let flag = flag.split('=').next().unwrap_or_default();
                    assert!(
                        help.contains(&format!("--{flag} "))
                            || help.contains(&format!("--{flag}\n")),
                        "{overlay}: --{flag} is not a flag of podcache serve"
                    );
                    flags += 1;
                }
            }
        }
    }
    assert!(flags >= 10, "flags were found");
}
/// What the "restricted" Pod Security Standard (and the baseline it
/// includes) refuses in a pod spec, as the admission controller checks it.
fn pod_security_violations(pod: &Value) -> Vec<String> {
    let mut refused = Vec::new();
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        if pod[host] == true {
            refused.push(format!("{host} is set"));
        }
    }
    const VOLUMES: [&str; 8] = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    for volume in pod["volumes"].as_array().into_iter().flatten() {
        let kinds: Vec<&String> = volume
            .as_object()
            .expect("volume")
            .keys()
            .filter(|k| k.as_str() != "name")
            .collect();
        if !kinds.iter().all(|k| VOLUMES.contains(&k.as_str())) {
            refused.push(format!("volume {volume} is not of an allowed type"));
        }
    }
    let pod_context = &pod["securityContext"];
    let seccomp_ok = |context: &Value| {
        matches!(
            context["seccompProfile"]["type"].as_str(),
            Some("RuntimeDefault" | "Localhost")
        )
    };
    for (container, _) in containers(pod) {
        let name = container["name"].as_str().unwrap_or("?");
        let context = &container["securityContext"];
        if context["privileged"] == true {
            refused.push(format!("{name}: privileged"));
        }
        if context["allowPrivilegeEscalation"] != false {
            refused.push(format!("{name}: allowPrivilegeEscalation is not false"));
        }
        let non_root = match context["runAsNonRoot"].as_bool() {
            Some(set) => set,
            None => pod_context["runAsNonRoot"] == true,
        };
        if !non_root {
            refused.push(format!("{name}: runAsNonRoot is not true"));
        }
        if context["runAsUser"] == 0
            || (context["runAsUser"].is_null() && pod_context["runAsUser"] == 0)
        {
            refused.push(format!("{name}: runs as uid 0"));
        }
        let seccomp = if context["seccompProfile"].is_null() {
            seccomp_ok(pod_context)
        } else {
            seccomp_ok(context)
        };
        if !seccomp {
            refused.push(format!(
                "{name}: seccompProfile is not RuntimeDefault or Localhost"
            ));
        }
        if !strings(&context["capabilities"]["drop"])
            .iter()
            .any(|c| c == "ALL")
        {
            refused.push(format!("{name}: capabilities do not drop ALL"));
        }
        if strings(&context["capabilities"]["add"])
            .iter()
            .any(|c| c != "NET_BIND_SERVICE")
        {
            refused.push(format!("{name}: adds capabilities"));
        }
        for port in container["ports"].as_array().into_iter().flatten() {
            if !port["hostPort"].is_null() {
                refused.push(format!("{name}: hostPort"));
            }
        }
    }
    refused
}

#[test]
fn every_pod_passes_the_restricted_pod_security_level() {
    let Some(workloads) = workloads("every_pod_passes_the_restricted_pod_security_level") else {
        return;
    };
    for (file, workload) in &workloads {
        let pod = &workload["spec"]["template"]["spec"];
        let refused = pod_security_violations(pod);
        assert!(
            refused.is_empty(),
            "{file} {}: {refused:?}",
            name_of(workload)
        );
        // Not required by the level, but by these manifests: nothing writes
        // to the image's filesystem.
        for (container, _) in containers(pod) {
            assert_eq!(
                container["securityContext"]["readOnlyRootFilesystem"], true,
                "{file}: {}",
                container["name"]
            );
        }
    }
    // The check does refuse what the level refuses.
    let (_, workload) = &workloads[0];
    let mut pod = workload["spec"]["template"]["spec"].clone();
    pod["securityContext"]
        .as_object_mut()
        .expect("securityContext")
        .remove("seccompProfile");
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = Value::Bool(true);
    pod["hostNetwork"] = Value::Bool(true);
    assert_eq!(pod_security_violations(&pod).len(), 3, "{pod}");
}

#[test]
fn every_workload_spreads_its_replicas_over_nodes_and_zones() {
    let Some(workloads) = workloads("every_workload_spreads_its_replicas_over_nodes_and_zones")
    else {
        return;
    };
    for (file, workload) in &workloads {
        let selector = labels(&workload["spec"]["selector"]["matchLabels"]);
        let pod_labels = labels(&workload["spec"]["template"]["metadata"]["labels"]);
        let constraints = workload["spec"]["template"]["spec"]["topologySpreadConstraints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let by = |key: &str| {
            constraints
                .iter()
                .find(|c| c["topologyKey"] == key)
                .unwrap_or_else(|| panic!("{file}: no spread over {key}"))
                .clone()
        };
        let node = by("kubernetes.io/hostname");
        let zone = by("topology.kubernetes.io/zone");
        for c in [&node, &zone] {
            assert_eq!(c["maxSkew"], 1, "{file}: {c}");
            // The constraint counts this workload's own pods.
            let counted = labels(&c["labelSelector"]["matchLabels"]);
            assert_eq!(counted, selector, "{file}: {c}");
            assert!(
                counted.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
                "{file}: {c}"
            );
        }
        assert!(
            matches!(
                node["whenUnsatisfiable"].as_str(),
                Some("DoNotSchedule" | "ScheduleAnyway")
            ),
            "{file}: {node}"
        );
        // A hard node spread must not count cordoned nodes as empty ones
        // (a drain's evicted replica would wait for the cordoned node).
        if node["whenUnsatisfiable"] == "DoNotSchedule" {
            assert_eq!(node["nodeTaintsPolicy"], "Honor", "{file}: {node}");
        }
        assert_eq!(
            zone["whenUnsatisfiable"], "ScheduleAnyway",
            "{file}: {zone}"
        );
    }
}

#[test]
fn every_object_has_the_recommended_labels_and_selectors_keep_to_the_stable_one() {
    const KEYS: [&str; 6] = [
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/component",
        "app.kubernetes.io/part-of",
        "app.kubernetes.io/version",
        "app.kubernetes.io/managed-by",
    ];
    // The renders where there is a kustomize, else the object files they
    // are made of (the labels are written out in them, no patch sets one).
    let mut sources: Vec<(String, Vec<Value>)> = match render_all() {
        Ok(all) => all
            .iter()
            .map(|o| (format!("deploy/overlays/{}", o.overlay), o.objects.clone()))
            .collect(),
        Err(_) => object_files()
            .into_iter()
            .map(|f| (f.display().to_string(), documents(&f)))
            .collect(),
    };
    let monitor = root().join("deploy/monitoring/servicemonitor.yaml");
    sources.push(("servicemonitor.yaml".into(), documents(&monitor)));
    for (file, objects) in &sources {
        for object in objects {
            let what = format!("{file} {}", name_of(object));
            let own = labels(&object["metadata"]["labels"]);
            let app = own
                .get("app")
                .unwrap_or_else(|| panic!("{what}: no app label"));
            for key in KEYS {
                assert!(own.contains_key(key), "{what}: no {key}");
            }
            assert_eq!(own["app.kubernetes.io/name"], *app, "{what}");
            if app == "podcache" {
                // The image's version: what the binary reports.
                assert_eq!(
                    own["app.kubernetes.io/version"],
                    env!("CARGO_PKG_VERSION"),
                    "{what}"
                );
            }
            // Selectors name only the `app` label, which never changes (a
            // workload's selector cannot change once created; podcache's
            // --selector names it too).
            let spec = &object["spec"];
            let selectors = [
                &spec["selector"]["matchLabels"],
                &spec["podSelector"]["matchLabels"],
            ];
            let service_selector = if object["kind"] == "Service" {
                &spec["selector"]
            } else {
                &Value::Null
            };
            for selector in selectors.into_iter().chain([service_selector]) {
                let keys: Vec<String> = labels(selector).into_keys().collect();
                assert!(
                    keys.is_empty() || keys == ["app"],
                    "{what}: selector {selector}"
                );
            }
            let template = &spec["template"]["metadata"]["labels"];
            if !template.is_null() {
                let template = labels(template);
                for key in KEYS {
                    assert_eq!(template.get(key), own.get(key), "{what}: pod label {key}");
                }
                for (k, v) in labels(&spec["selector"]["matchLabels"]) {
                    assert_eq!(template.get(&k), Some(&v), "{what}: the selector selects");
                }
                if let Some((container, _)) = podcache_container(&spec["template"]["spec"]) {
                    let image = container["image"].as_str().expect("image");
                    assert_eq!(
                        image.rsplit(':').next(),
                        Some(env!("CARGO_PKG_VERSION")),
                        "{what}: the podcache image is of this version"
                    );
                }
            }
        }
    }
}

#[test]
fn sigterm_delay_and_drain_fit_in_the_termination_grace_period() {
    let Some(workloads) = workloads("sigterm_delay_and_drain_fit_in_the_termination_grace_period")
    else {
        return;
    };
    for (file, workload) in &workloads {
        let pod = &workload["spec"]["template"]["spec"];
        let (podcache, sidecar) =
            podcache_container(pod).unwrap_or_else(|| panic!("{file}: no podcache container"));
        let delay = seconds(
            &flag(podcache, "shutdown-delay")
                .unwrap_or_else(|| panic!("{file}: no --shutdown-delay")),
        );
        let grace = seconds(
            &flag(podcache, "shutdown-grace")
                .unwrap_or_else(|| panic!("{file}: no --shutdown-grace")),
        );
        // The other containers' preStop pauses come first: a native
        // sidecar is stopped only once they have exited.
        let pre_stop: f64 = containers(pod)
            .iter()
            .filter(|(c, _)| !std::ptr::eq(*c, podcache))
            .map(|(c, _)| {
                c["lifecycle"]["preStop"]["sleep"]["seconds"]
                    .as_f64()
                    .unwrap_or(0.0)
            })
            .sum();
        if sidecar {
            // Behind no Service itself: the app's container waits for the
            // endpoints instead.
            assert!(
                pre_stop >= 5.0,
                "{file}: the app's container waits {pre_stop} s"
            );
        } else {
            assert_eq!(delay, 5.0, "{file}: --shutdown-delay");
        }
        let period = pod["terminationGracePeriodSeconds"]
            .as_f64()
            .unwrap_or_else(|| panic!("{file}: no terminationGracePeriodSeconds"));
        assert!(
            period >= pre_stop + delay + grace + 5.0,
            "{file}: {period} s for {pre_stop} + {delay} + {grace} s and a margin"
        );
    }
}

#[test]
fn discovery_finds_the_workloads_own_pods_with_the_rbac_it_needs() {
    let Some(all) = rendered("discovery_finds_the_workloads_own_pods_with_the_rbac_it_needs")
    else {
        return;
    };
    for overlay in all {
        let file = overlay.overlay;
        let objects = &overlay.objects;
        let workload = objects
            .iter()
            .find(|o| matches!(o["kind"].as_str(), Some("Deployment" | "StatefulSet")))
            .expect("a workload");
        let pod = &workload["spec"]["template"]["spec"];
        let (podcache, _) = podcache_container(pod).expect("podcache container");
        let pod_labels = labels(&workload["spec"]["template"]["metadata"]["labels"]);
        let selector =
            flag(podcache, "selector").unwrap_or_else(|| panic!("{file}: no --selector"));
        for term in selector.split(',') {
            let (k, v) = term.split_once('=').expect("key=value");
            assert_eq!(
                pod_labels.get(k).map(String::as_str),
                Some(v),
                "{file}: {selector}"
            );
        }
        let account = pod["serviceAccountName"].as_str().unwrap_or("default");
        if flag(podcache, "discovery").as_deref() != Some("kubernetes") {
            continue;
        }
        // A RoleBinding of this account, in the same overlay, to a Role
        // that may get, list and watch pods.
        let allowed = objects.iter().any(|binding| {
            binding["kind"] == "RoleBinding"
                && binding["subjects"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| s["kind"] == "ServiceAccount" && s["name"] == account)
                && objects.iter().any(|role| {
                    role["kind"] == "Role"
                        && binding["roleRef"]["kind"] == "Role"
                        && role["metadata"]["name"] == binding["roleRef"]["name"]
                        && [
                            ("", "pods", &["get", "list", "watch"][..]),
                            (
                                "coordination.k8s.io",
                                "leases",
                                &["get", "create", "update"][..],
                            ),
                        ]
                        .iter()
                        .all(|(group, resource, verbs)| {
                            role["rules"].as_array().into_iter().flatten().any(|rule| {
                                strings(&rule["apiGroups"]) == [*group]
                                    && strings(&rule["resources"]).iter().any(|r| r == resource)
                                    && verbs
                                        .iter()
                                        .all(|v| strings(&rule["verbs"]).iter().any(|x| x == v))
                            })
                        })
                })
        });
        assert!(
            allowed,
            "{file}: {account} may not list and watch pods, or take the decider's Lease"
        );
        // The token reaches the podcache container, mounted by default or
        // by hand.
        let mounted = pod["automountServiceAccountToken"] != false
            || podcache["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount");
        assert!(mounted, "{file}: podcache gets no token");
    }
}

#[test]
fn the_sidecar_is_native_and_the_app_talks_to_it_on_localhost() {
    let Some(all) = rendered("the_sidecar_is_native_and_the_app_talks_to_it_on_localhost") else {
        return;
    };
    let objects = &all
        .iter()
        .find(|o| o.overlay == "sidecar")
        .expect("the sidecar overlay")
        .objects;
    let app = objects
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("the app's Deployment");
    let pod = &app["spec"]["template"]["spec"];
    let (podcache, sidecar) = podcache_container(pod).expect("podcache container");
    assert!(sidecar, "an initContainer with restartPolicy Always");
    assert!(
        pod["initContainers"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| std::ptr::eq(c, podcache))),
        "podcache is among the initContainers"
    );
    assert_eq!(flag(podcache, "discovery").as_deref(), Some("kubernetes"));
    let app_label = &app["spec"]["selector"]["matchLabels"]["app"];
    assert_eq!(
        flag(podcache, "selector").as_deref(),
        app_label.as_str().map(|a| format!("app={a}")).as_deref()
    );
    let main = pod["containers"].as_array().expect("containers");
    assert!(
        main.iter().any(|c| c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["value"] == "http://localhost:8087")),
        "the app's container is given http://localhost:8087"
    );
    // Only the podcache container holds the API token.
    assert_eq!(pod["automountServiceAccountToken"], false);
    for c in main {
        assert!(c["volumeMounts"].is_null(), "{}", c["name"]);
    }
    // The cache's REST port is not open to other pods.
    let policy = objects
        .iter()
        .find(|o| o["kind"] == "NetworkPolicy")
        .expect("a NetworkPolicy");
    let open: Vec<&Value> = policy["spec"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|rule| rule["ports"].as_array().into_iter().flatten())
        .map(|p| &p["port"])
        .collect();
    assert!(
        !open.iter().any(|p| *p == "cache-http" || *p == 8087),
        "{open:?}"
    );
}

#[test]
fn the_service_monitor_scrapes_the_client_services_metrics_port() {
    let monitors = documents(&root().join("deploy/monitoring/servicemonitor.yaml"));
    assert_eq!(monitors.len(), 1);
    let monitor = &monitors[0];
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["kind"], "ServiceMonitor");
    // The ServiceMonitor CRD's fields this file may use (a misspelt one
    // would be pruned by the API server without a word).
    let known = |value: &Value, fields: &[&str], what: &str| {
        for key in value.as_object().expect("object").keys() {
            assert!(
                fields.contains(&key.as_str()),
                "{what}.{key} is not a field"
            );
        }
    };
    known(monitor, &["apiVersion", "kind", "metadata", "spec"], "");
    let spec = &monitor["spec"];
    known(
        spec,
        &[
            "jobLabel",
            "selector",
            "namespaceSelector",
            "endpoints",
            "targetLabels",
            "podTargetLabels",
            "sampleLimit",
        ],
        "spec",
    );
    let wanted = labels(&spec["selector"]["matchLabels"]);
    assert!(!wanted.is_empty());
    // The base's Services: those of every standalone overlay.
    let services: Vec<Value> = documents(&root().join("deploy/base/services.yaml"))
        .into_iter()
        .filter(|o| o["kind"] == "Service")
        .filter(|s| {
            let own = labels(&s["metadata"]["labels"]);
            wanted.iter().all(|(k, v)| own.get(k) == Some(v))
        })
        .collect();
    assert!(
        !services.is_empty(),
        "the selector matches podcache's Services"
    );
    let endpoints = spec["endpoints"].as_array().expect("endpoints");
    assert!(!endpoints.is_empty());
    for endpoint in endpoints {
        known(
            endpoint,
            &[
                "port",
                "path",
                "interval",
                "scrapeTimeout",
                "scheme",
                "authorization",
                "relabelings",
                "metricRelabelings",
                "honorLabels",
            ],
            "spec.endpoints[]",
        );
        assert_eq!(endpoint["path"], "/metrics");
        // Exactly one selected Service has the port: the client Service,
        // whose port leads to the pods' REST port.
        let with_port: Vec<&Value> = services
            .iter()
            .filter(|s| {
                s["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["name"] == endpoint["port"])
            })
            .collect();
        assert_eq!(with_port.len(), 1, "{endpoint}");
        assert_eq!(with_port[0]["metadata"]["name"], "podcache");
        let port = with_port[0]["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == endpoint["port"])
            .expect("port");
        assert_eq!(port["targetPort"], "http");
        assert_eq!(port["port"], 8087);
        for key in ["interval", "scrapeTimeout"] {
            if let Some(d) = endpoint[key].as_str() {
                assert!(seconds(d) > 0.0, "{key}: {d}");
            }
        }
        if let (Some(i), Some(t)) = (
            endpoint["interval"].as_str(),
            endpoint["scrapeTimeout"].as_str(),
        ) {
            assert!(seconds(t) <= seconds(i), "scrapeTimeout above the interval");
        }
    }
    // jobLabel names a label the Service has.
    if let Some(job) = spec["jobLabel"].as_str() {
        assert!(
            labels(&services[0]["metadata"]["labels"]).contains_key(job),
            "jobLabel {job}"
        );
    }
}

/// One sample line's metric name and label names.
fn sample(line: &str) -> Option<(String, BTreeSet<String>)> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = line[..end].to_owned();
    let mut names = BTreeSet::new();
    if line[end..].starts_with('{') {
        let mut chars = line[end + 1..].chars();
        let mut label = String::new();
        while let Some(c) = chars.next() {
            match c {
                '}' => break,
                '=' => {
                    names.insert(
                        std::mem::take(&mut label)
                            .trim_matches(',')
                            .trim()
                            .to_owned(),
                    );
                    assert_eq!(chars.next(), Some('"'), "{line}");
                    // The quoted value, with its escapes.
                    while let Some(v) = chars.next() {
                        match v {
                            '\\' => {
                                chars.next();
                            }
                            '"' => break,
                            _ => {}
                        }
                    }
                }
                _ => label.push(c),
            }
        }
    }
    Some((name, names))
}

/// Metric names and label names a PromQL expression uses: each
/// `podcache_*` name with the labels of its `{...}` matchers, and the
/// labels of every `by (...)` / `without (...)`.
fn promql(expr: &str) -> (Vec<(String, Vec<String>)>, Vec<String>) {
    let bytes: Vec<char> = expr.chars().collect();
    let mut metrics = Vec::new();
    let mut grouping = Vec::new();
    let mut i = 0;
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_string = |i: &mut usize| {
        let quote = bytes[*i];
        *i += 1;
        while *i < bytes.len() && bytes[*i] != quote {
            if bytes[*i] == '\\' {
                *i += 1;
            }
            *i += 1;
        }
        *i += 1;
    };
    let skip_space = |i: &mut usize| {
        while *i < bytes.len() && bytes[*i].is_whitespace() {
            *i += 1;
        }
    };
    while i < bytes.len() {
        let c = bytes[i];
        if c == '"' || c == '\'' {
            skip_string(&mut i);
        } else if ident(c) && !c.is_ascii_digit() {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let word: String = bytes[start..i].iter().collect();
            let mut j = i;
            skip_space(&mut j);
            if word.starts_with("podcache_") {
                let mut matchers = Vec::new();
                if j < bytes.len() && bytes[j] == '{' {
                    j += 1;
                    loop {
                        skip_space(&mut j);
                        if j >= bytes.len() || bytes[j] == '}' {
                            break;
                        }
                        let start = j;
                        while j < bytes.len() && ident(bytes[j]) {
                            j += 1;
                        }
                        matchers.push(bytes[start..j].iter().collect());
                        while j < bytes.len() && bytes[j] != '"' {
                            j += 1;
                        }
                        skip_string(&mut j);
                        skip_space(&mut j);
                        if j < bytes.len() && bytes[j] == ',' {
                            j += 1;
                        }
                    }
                    i = j + 1;
                }
                metrics.push((word, matchers));
            } else if (word == "by" || word == "without") && j < bytes.len() && bytes[j] == '(' {
                let close = (j..bytes.len())
                    .find(|&k| bytes[k] == ')')
                    .expect("a closing )");
                let inside: String = bytes[j + 1..close].iter().collect();
                grouping.extend(
                    inside
                        .split(',')
                        .map(|l| l.trim().to_owned())
                        .filter(|l| !l.is_empty()),
                );
                i = close + 1;
            }
        } else {
            i += 1;
        }
    }
    (metrics, grouping)
}

/// Every panel of a dashboard, rows' nested ones included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        all.push(panel);
        for nested in panel["panels"].as_array().into_iter().flatten() {
            all.push(nested);
        }
    }
    all
}

#[test]
fn the_grafana_dashboard_is_a_dashboard_of_prometheus_queries() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/podcache-dashboard.json"))
        .expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("valid JSON");
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let variables: BTreeSet<String> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_owned())
        .collect();
    assert!(variables.contains("datasource"), "{variables:?}");
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(panel["id"].as_u64().expect("id")),
            "{title}: id used twice"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (
            grid["x"].as_u64().expect("x"),
            grid["w"].as_u64().expect("w"),
        );
        assert!(
            x + w <= 24 && grid["h"].as_u64().is_some_and(|h| h > 0),
            "{title}: {grid}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            queries += 1;
            // Every variable used is defined, or one of Grafana's own.
            for part in expr.split('$').skip(1) {
                let name: String = part
                    .trim_start_matches('{')
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    variables.contains(&name)
                        || ["__rate_interval", "__interval", "__range"].contains(&name.as_str()),
                    "{title}: ${name}"
                );
            }
            let mut depth = 0i32;
            for c in expr.chars() {
                depth += match c {
                    '(' | '{' | '[' => 1,
                    ')' | '}' | ']' => -1,
                    _ => 0,
                };
                assert!(depth >= 0, "{title}: {expr}");
            }
            assert_eq!(depth, 0, "{title}: {expr}");
        }
    }
    assert!(queries >= 20, "{queries} queries");
}

/// Labels Prometheus adds to every target (the ServiceMonitor's), not the
/// node.
const TARGET_LABELS: [&str; 7] = [
    "namespace",
    "pod",
    "instance",
    "job",
    "service",
    "endpoint",
    "container",
];

/// What the review asked the dashboard to show, by metric.
const REQUIRED: [&str; 12] = [
    "podcache_requests_total",
    "podcache_replication_lag_seconds_bucket",
    "podcache_replication_pending_entries",
    "podcache_entries",
    "podcache_store_held_bytes",
    "podcache_store_capacity_bytes",
    "podcache_ready",
    "podcache_discovery_stale",
    "podcache_replication_entries_dropped_total",
    "podcache_anti_entropy_rounds_total",
    "podcache_anti_entropy_repaired_entries_total",
    "podcache_peers",
];

/// Sample names and their label names, from /metrics texts.
fn series(texts: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for text in texts {
        for (name, labels) in text.lines().filter_map(sample) {
            found.entry(name).or_default().extend(labels);
        }
    }
    found
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_on_a_real_nodes_metrics() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/podcache-dashboard.json"))
        .expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("valid JSON");
    let exprs: Vec<String> = panels(&dashboard)
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    let wanted: BTreeSet<String> = exprs
        .iter()
        .flat_map(|e| promql(e).0.into_iter().map(|(name, _)| name))
        .collect();
    for name in REQUIRED {
        assert!(
            wanted.contains(name),
            "the dashboard shows {name}: {wanted:?}"
        );
    }

    // Three nodes: writes, reads, a delete and a batch; then one is
    // killed, so that sends to it fail and, once the retention is over,
    // what is pending for it is dropped; anti-entropy rounds go on with
    // both. Some series only exist once such a thing has happened.
    let mut cluster = Cluster::start_with(3, |c| {
        c.down_peer_retention = Duration::from_millis(500);
    })
    .await;
    let (a, b) = (cluster.client(0), cluster.client(1));
    a.put(7, "theme", "blue", "wait=all").await.expect("put");
    b.put(7, "gone", "soon", "").await.expect("put");
    b.delete(7, "gone", "wait=all").await.expect("delete");
    a.request(Method::POST, "/v1/cache/8", r#"{"x":"1","y":"2"}"#)
        .await
        .expect("batch");
    cluster.kill(2).await;
    let mut texts = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut round = 0;
    let missing = loop {
        // Writes go on: sends to the dead peer fail, and some are pending
        // for it when its retention ends.
        round += 1;
        a.put(7, &format!("k{round}"), "v", "").await.expect("put");
        b.get_value(7, "theme").await.expect("get");
        b.get("/v1/cache/8").await.expect("list");
        texts.clear();
        for client in [&a, &b] {
            texts.push(client.get("/metrics").await.expect("metrics").text());
        }
        let have = series(&texts);
        let missing: Vec<&String> = wanted.iter().filter(|n| !have.contains_key(*n)).collect();
        if missing.is_empty() || tokio::time::Instant::now() >= deadline {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no node exposes: {missing:?}\n{}",
        texts.join("\n")
    );

    // Labels: a matcher's names a label of that metric (or of the target);
    // a grouping's, a label of some metric of the expression.
    let have = series(&texts);
    for expr in &exprs {
        let (metrics, grouping) = promql(expr);
        let mut of_expr: BTreeSet<&str> = TARGET_LABELS.into_iter().collect();
        for (name, matchers) in &metrics {
            let own = &have[name];
            of_expr.extend(own.iter().map(String::as_str));
            for label in matchers {
                assert!(
                    own.contains(label) || TARGET_LABELS.contains(&label.as_str()),
                    "{expr}: {name} has no label {label} ({own:?})"
                );
            }
        }
        for label in &grouping {
            assert!(
                of_expr.contains(label.as_str()),
                "{expr}: no metric has {label}"
            );
        }
    }
    cluster.shutdown().await;
}

#[test]
fn the_image_is_built_with_the_projects_toolchain_stripped_and_not_as_root() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("Dockerfile");
    let toolchain = std::fs::read_to_string(root().join("rust-toolchain.toml")).expect("toolchain");
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|c| c.trim_matches('"'))
        .expect("channel");
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    assert!(
        stages[0].starts_with(&format!("rust:{channel}-")),
        "{} is not rust-toolchain.toml's {channel}",
        stages[0]
    );
    assert!(
        stages[1].contains("distroless") || stages[1].contains("-slim"),
        "a small runtime image: {}",
        stages[1]
    );
    for needed in [
        "CARGO_PROFILE_RELEASE_STRIP=symbols",
        "CARGO_PROFILE_RELEASE_DEBUG=0",
        "cargo build --release --locked --bin podcache",
        "protobuf-compiler",
    ] {
        assert!(dockerfile.contains(needed), "the Dockerfile has {needed}");
    }
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER");
    let uid = user.split(':').next().unwrap_or_default();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "a numeric non-root user (runAsNonRoot can only check a number): {user}"
    );
    // The manifests run as that user.
    let workloads = workloads("the_image_is_built_with_..._not_as_root (its manifests' user)");
    for (file, workload) in workloads.iter().flatten() {
        assert_eq!(
            workload["spec"]["template"]["spec"]["securityContext"]["runAsUser"].to_string(),
            uid,
            "{file}"
        );
    }
}

/// Whether a .dockerignore pattern leaves out `path` or a directory above
/// it, as Docker matches them (from the context's root; the subset used:
/// `*` within a path segment, a leading `**/` for any depth, a trailing
/// `/`).
fn ignored(pattern: &str, path: &str) -> bool {
    fn segment(pattern: &str, name: &str) -> bool {
        match pattern.split_once('*') {
            None => pattern == name,
            Some((head, tail)) => {
                name.starts_with(head)
                    && (0..=name.len() - head.len()).any(|i| segment(tail, &name[head.len() + i..]))
            }
        }
    }
    let pattern = pattern.trim_end_matches('/');
    let (anywhere, pattern) = match pattern.strip_prefix("**/") {
        Some(rest) => (true, rest),
        None => (false, pattern),
    };
    let wanted: Vec<&str> = pattern.split('/').collect();
    let parts: Vec<&str> = path.split('/').collect();
    let starts: Vec<usize> = if anywhere {
        (0..parts.len()).collect()
    } else {
        vec![0]
    };
    starts.into_iter().any(|s| {
        parts.len() >= s + wanted.len()
            && wanted.iter().zip(&parts[s..]).all(|(p, n)| segment(p, n))
    })
}

#[test]
fn the_build_context_holds_what_the_build_needs_and_nothing_large() {
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(
        patterns.iter().all(|p| !p.starts_with('!')),
        "no exceptions"
    );
    let left_out = |path: &str| patterns.iter().any(|p| ignored(p, path));
    for path in [
        "target/release/podcache",
        "bench/load/target/debug/x",
        ".venv-interop/bin/python",
        ".git/HEAD",
        "bench/results/2026-12-01.json",
        "default.profraw",
        "tests/pki/ca.key",
    ] {
        assert!(left_out(path), "{path} is in the build context");
    }
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        "rust-toolchain.toml",
        "build.rs",
        "src/lib.rs",
        "src/api/dashboard.html",
        "src/bin/podcache/main.rs",
        "proto/hellorpc.proto",
        "proto/etcd/rpc.proto",
        "bench/load/Cargo.toml",
        "bench/load/src/main.rs",
    ] {
        assert!(!left_out(path), "the build needs {path}");
        assert!(root().join(path).exists(), "{path} exists");
    }
    // Every workspace member: cargo reads them all, whatever it builds.
    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    let members = cargo
        .lines()
        .find_map(|l| l.trim().strip_prefix("members = ["))
        .expect("workspace members");
    for member in members.trim_end_matches(']').split(',') {
        let member = member.trim().trim_matches('"');
        if member.is_empty() || member == "." {
            continue;
        }
        let manifest = format!("{member}/Cargo.toml");
        assert!(!left_out(&manifest), "the build needs {manifest}");
    }
    // And every file the crate's sources include: a file outside src/
    // named in an include_str! must be in the context too.
    for entry in walk(&root().join("src")) {
        let source = std::fs::read_to_string(&entry).unwrap_or_default();
        for part in source.split("include_str!(\"").skip(1) {
            let relative = part.split('"').next().unwrap_or_default();
            let file = entry.parent().expect("dir").join(relative);
            let Ok(file) = file.canonicalize() else {
                continue;
            };
            let Ok(inside) = file.strip_prefix(root().canonicalize().expect("root")) else {
                continue;
            };
            let inside = inside.to_string_lossy();
            // Test modules' fixtures are not compiled into the binary.
            if inside.starts_with("tests/") {
                continue;
            }
            assert!(!left_out(&inside), "{} includes {inside}", entry.display());
        }
    }
    // The pattern matcher itself.
    assert!(ignored("**/target/", "a/b/target/c") && ignored(".venv*/", ".venv-x/y"));
    assert!(!ignored("target/", "src/target.rs") && !ignored("*.key", "tests/ca.key"));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}
