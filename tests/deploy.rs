//! The deployment files: every manifest in `deploy/` validates, strictly,
//! against the Kubernetes schemas (kubernetes-validate from PyPI, in the
//! venv `scripts/test` creates), and the validator does reject a broken one.

use std::path::PathBuf;
use std::process::Command;

fn validator() -> PathBuf {
    let venv =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-interop/bin/kubernetes-validate");
    assert!(
        venv.exists(),
        "run scripts/test: it creates .venv-interop with kubernetes-validate"
    );
    venv
}

fn validate(path: &std::path::Path) -> (bool, String) {
    let out = Command::new(validator())
        .arg("--strict")
        .arg(path)
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

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (ok, output) = validate(&path);
            assert!(ok, "{}:\n{output}", path.display());
            assert!(!output.contains("ERROR"), "{output}");
            checked += 1;
        }
    }
    assert!(checked >= 2, "the manifests were found");
}

#[test]
fn the_validator_rejects_a_broken_manifest() {
    let path = std::env::temp_dir().join(format!("podcache-broken-{}.yaml", std::process::id()));
    let broken = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/podcache.yaml"),
    )
    .expect("manifest")
    .replace("replicas: 3", "replicas: three");
    std::fs::write(&path, broken).expect("write");
    let (ok, output) = validate(&path);
    let _ = std::fs::remove_file(&path);
    assert!(!ok, "a string replica count must fail: {output}");
}

#[test]
fn the_manifests_only_use_flags_the_binary_has() {
    let help = Command::new(env!("CARGO_BIN_EXE_podcache"))
        .args(["serve", "--help"])
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&help.stdout);
    let mut flags = 0;
    for name in [
        "podcache.yaml",
        "etcd-discovery.yaml",
        "secure.yaml",
        "statefulset.yaml",
    ] {
        let manifest = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("deploy")
                .join(name),
        )
        .expect("manifest");
        for line in manifest.lines().map(str::trim) {
            if let Some(flag) = line.strip_prefix("- --") {
                let flag = flag.split('=').next().unwrap_or_default();
                assert!(
                    help.contains(&format!("--{flag} ")) || help.contains(&format!("--{flag}\n")),
                    "{name}: --{flag} is not a flag of podcache serve"
                );
                flags += 1;
            }
        }
    }
    assert!(flags >= 10, "flags were found");
}
