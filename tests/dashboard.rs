//! The dashboard at `/` in a real browser: headless Chromium (Debian's
//! `chromium`, installed by `.ci/run`) against a running 3-node cluster.
//! The page must load without console errors, list the 3 members, and show
//! a write (a namespace that did not exist) both when loaded after it and,
//! driven over the DevTools protocol, in a page that was already open. A
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
        .with_reason("flip for the test")
        .expect("reason")
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

/// A headless Chromium driven over the DevTools protocol (CDP), so a test
/// can watch one page load change as the cluster changes. The WebSocket
/// client is the few lines of RFC 6455 CDP needs (text frames, client
/// masking, fragmented answers), written here rather than pulling a
/// WebSocket crate into the dev-dependencies.
struct Browser {
    child: std::process::Child,
    socket: tokio::net::TcpStream,
    next_id: u64,
    /// Console errors and uncaught exceptions seen so far.
    errors: Vec<String>,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Browser {
    async fn launch() -> Browser {
        use std::io::BufRead;
        let profile = std::env::temp_dir().join(format!(
            "podcache-cdp-{}-{}",
            std::process::id(),
            common::next_block()
        ));
        let mut child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("chromium runs");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let stderr = child.stderr.take().expect("stderr");
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    let _ = port_tx.send(port);
                }
            }
        });
        let port = tokio::task::spawn_blocking(move || {
            port_rx.recv_timeout(std::time::Duration::from_secs(20))
        })
        .await
        .expect("join")
        .expect("chromium announces its DevTools port");
        let list = podcache::client::RestClient::new(&format!("127.0.0.1:{port}"))
            .expect("client")
            .get("/json/list")
            .await
            .expect("targets")
            .json();
        let ws = list
            .as_array()
            .and_then(|targets| targets.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_owned();
        let path = ws
            .split_once(&format!("127.0.0.1:{port}"))
            .map(|(_, p)| p.to_owned())
            .expect("path");
        let mut socket = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
            .await
            .expect("connect");
        let handshake = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        socket
            .write_all(handshake.as_bytes())
            .await
            .expect("handshake");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            socket
                .read_exact(&mut byte)
                .await
                .expect("handshake answer");
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let mut browser = Browser {
            child,
            socket,
            next_id: 0,
            errors: Vec::new(),
            profile,
        };
        browser.call("Runtime.enable", serde_json::json!({})).await;
        browser.call("Page.enable", serde_json::json!({})).await;
        browser
    }

    async fn send_frame(&mut self, text: &str) {
        use tokio::io::AsyncWriteExt;
        let payload = text.as_bytes();
        let mut frame = vec![0x81u8];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n < 65536 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.socket.write_all(&frame).await.expect("send");
    }

    /// The next whole text message.
    async fn receive(&mut self) -> serde_json::Value {
        use tokio::io::AsyncReadExt;
        let mut message = Vec::new();
        loop {
            let mut head = [0u8; 2];
            self.socket.read_exact(&mut head).await.expect("frame");
            let fin = head[0] & 0x80 != 0;
            let opcode = head[0] & 0x0f;
            let len = match head[1] & 0x7f {
                126 => {
                    let mut n = [0u8; 2];
                    self.socket.read_exact(&mut n).await.expect("len");
                    u16::from_be_bytes(n) as usize
                }
                127 => {
                    let mut n = [0u8; 8];
                    self.socket.read_exact(&mut n).await.expect("len");
                    u64::from_be_bytes(n) as usize
                }
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            self.socket.read_exact(&mut payload).await.expect("payload");
            if opcode == 0x8 {
                panic!("chromium closed the DevTools connection");
            }
            if opcode == 0x1 || opcode == 0x0 {
                message.extend(payload);
                if fin {
                    return serde_json::from_slice(&message).expect("CDP JSON");
                }
            }
        }
    }

    /// Calls a CDP method and returns its result, noting console errors
    /// and exceptions that arrive meanwhile.
    async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        let request = serde_json::json!({"id": id, "method": method, "params": params});
        self.send_frame(&request.to_string()).await;
        loop {
            let message = tokio::time::timeout(std::time::Duration::from_secs(20), self.receive())
                .await
                .expect("chromium answers");
            match message["method"].as_str() {
                Some("Runtime.exceptionThrown") => self.errors.push(message["params"].to_string()),
                Some("Runtime.consoleAPICalled") if message["params"]["type"] == "error" => {
                    self.errors.push(message["params"]["args"].to_string())
                }
                _ => {}
            }
            if message["id"] == id {
                return message["result"].clone();
            }
        }
    }

    async fn eval(&mut self, expression: &str) -> serde_json::Value {
        let result = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is true, or panics after `within`.
    async fn eval_until(&mut self, what: &str, expression: &str, within: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.eval(expression).await == serde_json::Value::Bool(true) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} within {within:?}; page text: {}",
                self.eval("document.body.innerText").await
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// One page load, kept open: it lists the members, then shows a namespace
/// written after it loaded and the write in its chart, by itself, without
/// a reload and without console errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_updates_itself_after_a_write() {
    let cluster = Cluster::start(3).await;
    let mut browser = Browser::launch().await;
    let url = format!("http://{}/", cluster.slots[0].http);
    browser
        .call("Page.navigate", serde_json::json!({ "url": url }))
        .await;
    let within = std::time::Duration::from_secs(15);
    browser
        .eval_until(
            "three members listed",
            "document.querySelectorAll('.member').length === 3",
            within,
        )
        .await;
    let namespaces =
        "[...document.querySelectorAll('tr.namespace td:first-child')].map(td => td.textContent)";
    assert_eq!(browser.eval(namespaces).await, serde_json::json!([]));
    // A mark on this page load: a reload would lose it.
    browser.eval("window.podcacheTestMark = 'same load'").await;

    cluster
        .client(1)
        .with_reason("flip for the test")
        .expect("reason")
        .put(77, "new", "entry", "wait=all")
        .await
        .expect("put");
    browser
        .eval_until(
            "the new namespace appears",
            &format!("{namespaces}.includes('77')"),
            within,
        )
        .await;
    // Who wrote it, where and why, among the recent changes.
    browser
        .eval_until(
            "the write among the recent changes, with its author, origin and reason",
            "[...document.querySelectorAll('tr.change')].some(r => { const t = [...r.children].map(td => td.textContent); \
             return t[2] === 'new' && t[4] === 'anonymous' && t[5].length > 0 && t[6] === 'flip for the test' && t[7] === 'peer'; })",
            within,
        )
        .await;
    browser
        .eval_until(
            "the writes chart has data",
            "/writes\\/s now/.test(document.getElementById('writes-now').textContent)",
            within,
        )
        .await;
    assert_eq!(
        browser.eval("window.podcacheTestMark").await,
        serde_json::json!("same load"),
        "the page updated itself, it was not reloaded"
    );
    assert!(
        browser.errors.is_empty(),
        "console errors: {:?}",
        browser.errors
    );
    drop(browser);
    cluster.shutdown().await;
}
