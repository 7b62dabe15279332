//! Real `podcache serve` processes, for tests that need what only a
//! process has: `kill -9`, a restart on the same data directory, exit
//! codes, what it writes to stderr.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use podcache::client::RestClient;

use super::wait_until;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_podcache");

/// A free port on `ip` (bound and released).
pub fn free_port(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// How to start one node: fixed addresses, so a restart gets the same ones.
#[derive(Debug, Clone)]
pub struct ServeSpec {
    pub ip: Ipv4Addr,
    pub http_port: u16,
    pub grpc_port: u16,
    pub name: String,
    pub peers: Vec<String>,
    pub extra: Vec<String>,
    /// Where its stderr goes (appended across restarts).
    pub log: PathBuf,
}

impl ServeSpec {
    /// A node on `ip` with free ports, logging into `dir`.
    pub fn new(ip: Ipv4Addr, name: &str, dir: &Path) -> Self {
        let grpc = TcpListener::bind((ip, 0)).expect("bind");
        let http = TcpListener::bind((ip, 0)).expect("bind");
        let port = |l: &TcpListener| l.local_addr().map(|a| a.port()).expect("port");
        Self {
            ip,
            http_port: port(&http),
            grpc_port: port(&grpc),
            name: name.to_owned(),
            peers: Vec::new(),
            extra: Vec::new(),
            log: dir.join(format!("{name}.log")),
        }
    }

    pub fn grpc(&self) -> String {
        format!("{}:{}", self.ip, self.grpc_port)
    }

    pub fn http(&self) -> String {
        format!("http://{}:{}", self.ip, self.http_port)
    }

    pub fn client(&self) -> RestClient {
        RestClient::new(&self.http()).expect("address")
    }

    /// Starts the process (not waiting for it to be ready).
    pub fn spawn(&self) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(BIN)
            .args([
                "serve",
                "--http-addr",
                &format!("{}:{}", self.ip, self.http_port),
                "--grpc-addr",
                &self.grpc(),
                "--pod-ip",
                &self.ip.to_string(),
                "--pod-name",
                &self.name,
                "--peers",
                &self.peers.join(","),
                "--anti-entropy-interval",
                "300ms",
                "--heartbeat-interval",
                "200ms",
                "--max-retry-backoff",
                "200ms",
                "--shutdown-grace",
                "3s",
            ])
            .args(&self.extra)
            .env("PODCACHE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("podcache serve starts");
        Proc { child }
    }

    /// What the process wrote to stderr so far (all its runs).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the node answers `/readyz` with 200.
    pub async fn wait_ready(&self) {
        wait_readyz(
            &self.client(),
            hyper::StatusCode::OK,
            Duration::from_secs(30),
        )
        .await;
    }
}

/// Polls the node of `client` until `/readyz` answers `status`, failing
/// the test after `within`.
pub async fn wait_readyz(client: &RestClient, status: hyper::StatusCode, within: Duration) {
    let what = format!("/readyz {status}");
    wait_until(&what, within, || {
        let client = client.clone();
        async move {
            client
                .get("/readyz")
                .await
                .is_ok_and(|a| a.status == status)
        }
    })
    .await;
}

/// A running `podcache serve`; killed if the test ends with it running.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    /// `kill -9`: no shutdown, no flush.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit by itself; its exit code.
    pub async fn exit_code(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "process did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Only if a test failed half-way: never leave our process behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
