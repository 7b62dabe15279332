//! The dashboard at `/` in a real browser: headless Chromium (Debian's
//! `chromium`, installed by `.ci/run`) against a running 3-node cluster.
//! The page must load without console errors, list the 3 members, and show
//! a write (a namespace that did not exist) when loaded after it. A
//! screenshot is kept in `target/dashboard.png`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Cluster;

fn chromium() -> PathBuf {
    for candidate in [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ] {
        let path = PathBuf::from(candidate);
        if path.exists() {
            return path;
        }
    }
    panic!(
        "the dashboard test needs Debian's chromium (apt-get install chromium); .ci/run installs it"
    );
}

/// Loads `url` headless; returns (DOM after the page's scripts ran, stderr).
fn load(url: &str, extra: &[&str]) -> (String, String) {
    let profile = std::env::temp_dir().join(format!(
        "podcache-chromium-{}-{}",
        std::process::id(),
        common::next_block()
    ));
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=4000",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(&profile);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_lists_the_members_and_shows_writes_without_console_errors() {
    let cluster = Cluster::start(3).await;
    cluster
        .client(0)
        .put(1, "flag", "on", "wait=all")
        .await
        .expect("put");
    let url = format!("http://{}/", cluster.slots[0].http);

    let (dom, console) = tokio::task::block_in_place(|| load(&url, &["--dump-dom"]));
    assert_eq!(
        dom.matches("class=\"member\"").count(),
        3,
        "three members listed:\n{dom}"
    );
    for name in ["node-0", "node-1", "node-2", "this node", "oldest"] {
        assert!(dom.contains(name), "{name} missing:\n{dom}");
    }
    assert!(dom.contains("discovery: static (fresh)"), "{dom}");
    let errors: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("CONSOLE") && (l.contains("ERROR") || l.contains("Uncaught")))
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    assert!(
        dom.contains("<span id=\"error\"></span>"),
        "the page reached the node:\n{dom}"
    );
    assert!(!dom.contains(">77<"), "type 77 does not exist yet");

    cluster
        .client(1)
        .put(77, "new", "entry", "wait=all")
        .await
        .expect("put");
    let (dom, _) = tokio::task::block_in_place(|| load(&url, &["--dump-dom"]));
    assert!(dom.contains(">77<"), "the new namespace shows:\n{dom}");

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../dashboard.png");
    let _ = std::fs::remove_file(&shot);
    tokio::task::block_in_place(|| load(&url, &[&format!("--screenshot={}", shot.display())]));
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "a screenshot was taken ({size} bytes at {})",
        shot.display()
    );
    cluster.shutdown().await;
}
