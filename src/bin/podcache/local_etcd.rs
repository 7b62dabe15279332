//! Runs Debian's `etcd` binary as a child process on loopback, with a
//! temporary data directory: for `podcache demo --etcd local` and the tests.
//! Stops (by the PID it started) and removes its directory when dropped.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use podcache::etcd::{EtcdClient, EtcdSettings, EtcdTls};

/// A port on `ip` that is free now, below 32768 (outside the ephemeral range
/// the kernel hands out for outgoing connections, so no client socket can
/// take it before etcd binds it).
pub fn free_low_port(ip: Ipv4Addr) -> std::io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919);
    for _ in 0..2000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed).wrapping_add(seed);
        let port = 20_000 + (n % 12_000) as u16;
        if TcpListener::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port below 32768",
    ))
}

/// TLS files of one member, for client (and optionally peer) traffic.
#[derive(Debug, Clone)]
pub struct MemberTls {
    /// CA that signed client certificates (and the member's own).
    pub ca: PathBuf,
    /// The member's serving certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// How to run one etcd member.
#[derive(Debug, Clone)]
pub struct MemberSpec {
    /// Member name.
    pub name: String,
    /// Loopback address it listens on.
    pub ip: Ipv4Addr,
    /// Client port.
    pub client_port: u16,
    /// Peer port.
    pub peer_port: u16,
    /// `name=http://ip:peer_port,...` of the whole cluster.
    pub initial_cluster: String,
    /// Client TLS with client-certificate authentication, if any.
    pub tls: Option<MemberTls>,
}

impl MemberSpec {
    /// A single-member cluster on `ip` with free ports.
    pub fn single(name: &str, ip: Ipv4Addr) -> std::io::Result<Self> {
        let client_port = free_low_port(ip)?;
        let mut peer_port = free_low_port(ip)?;
        while peer_port == client_port {
            peer_port = free_low_port(ip)?;
        }
        Ok(Self {
            name: name.to_owned(),
            ip,
            client_port,
            peer_port,
            initial_cluster: format!("{name}=http://{ip}:{peer_port}"),
            tls: None,
        })
    }

    /// The URL clients use.
    pub fn client_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.ip, self.client_port)
    }
}

/// A running etcd member started by this process.
pub struct LocalEtcd {
    spec: MemberSpec,
    data_dir: PathBuf,
    child: Option<Child>,
    remove_dir_on_drop: bool,
}

impl std::fmt::Debug for LocalEtcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEtcd")
            .field("client_url", &self.spec.client_url())
            .finish()
    }
}

fn temp_dir(name: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "podcache-etcd-{}-{}-{name}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

impl LocalEtcd {
    /// Starts a single member on 127.0.0.1 with the v2 API enabled and waits
    /// until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        let spec = MemberSpec::single("podcache-local", Ipv4Addr::LOCALHOST)?;
        let etcd = Self::spawn(spec)?;
        etcd.wait_healthy(Duration::from_secs(20)).await?;
        Ok(etcd)
    }

    /// Starts a member as `spec` says (does not wait: members of a cluster
    /// only answer once a quorum runs).
    pub fn spawn(spec: MemberSpec) -> anyhow::Result<Self> {
        let data_dir = temp_dir(&spec.name);
        std::fs::create_dir_all(&data_dir)?;
        let mut etcd = Self {
            spec,
            data_dir,
            child: None,
            remove_dir_on_drop: true,
        };
        etcd.launch()?;
        Ok(etcd)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let spec = &self.spec;
        let peer_url = format!("http://{}:{}", spec.ip, spec.peer_port);
        let client_url = spec.client_url();
        let mut command = Command::new(etcd_binary());
        command
            .arg("--name")
            .arg(&spec.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(&spec.initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(format!("podcache-{}", std::process::id()))
            .arg("--enable-v2=true")
            .arg("--log-level")
            .arg("error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(tls) = &spec.tls {
            command
                .arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key);
        }
        let child = command.spawn().map_err(|e| {
            anyhow::anyhow!(
                "cannot run {}: {e} (install Debian's etcd-server, or set PODCACHE_ETCD_BIN)",
                etcd_binary().display()
            )
        })?;
        self.child = Some(child);
        Ok(())
    }

    /// The client URL.
    pub fn client_url(&self) -> String {
        self.spec.client_url()
    }

    /// The member's settings.
    pub fn spec(&self) -> &MemberSpec {
        &self.spec
    }

    /// Settings for a client of this member (plain HTTP members only).
    pub fn settings(&self) -> EtcdSettings {
        EtcdSettings {
            endpoints: vec![self.client_url()],
            tls: EtcdTls::default(),
            timeout: Duration::from_secs(3),
        }
    }

    /// Waits until a range request succeeds.
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let client = EtcdClient::connect(&self.settings())?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match client.range_prefix(b"/podcache-health-check/").await {
                Ok(_) => return Ok(()),
                Err(err) if tokio::time::Instant::now() >= deadline => {
                    anyhow::bail!("etcd at {} did not come up: {err}", self.client_url())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Kills the process at once (SIGKILL), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again on the same ports and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        // The cluster exists now: rejoin it rather than form a new one.
        self.launch()
    }

    /// Starts the process again on the same ports with an empty data
    /// directory: etcd as it comes back after losing its disk.
    pub fn restart_empty(&mut self) -> anyhow::Result<()> {
        self.kill();
        std::fs::remove_dir_all(&self.data_dir)?;
        std::fs::create_dir_all(&self.data_dir)?;
        self.launch()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.kill();
        if self.remove_dir_on_drop {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// The etcd binary: `PODCACHE_ETCD_BIN`, else `etcd` on PATH.
pub fn etcd_binary() -> PathBuf {
    std::env::var_os("PODCACHE_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

/// True when an etcd binary can be found.
pub fn etcd_available() -> bool {
    let bin = etcd_binary();
    if bin.components().count() > 1 {
        return bin.is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(&bin).is_file()))
        .unwrap_or(false)
}
