//! `podcache-bench`: the one load generator of `bench/run`, with a backend
//! per system so every system gets the same load: podcache over its REST API
//! (HTTP/1.1, one keep-alive connection per worker), Redis over RESP (one
//! connection per worker, optional pipelining), etcd over its v3 API (gRPC).
//!
//! The HTTP and RESP clients are both minimal and hand-written over one
//! buffered socket (a request written in one call, the answer parsed from
//! the buffer), so the load tool, which shares the machine's cores with the
//! system under test, costs about the same per request for both. A general
//! HTTP client (hyper's, with its connection task and channels) cost the
//! tool several times the CPU per request of the RESP client and so
//! took that CPU from podcache; it is still used for the watch stream.
//!
//! Each run prints one JSON object: operations, rate, latency percentiles
//! from an HDR histogram, errors. Workloads:
//! - `write`: one entry per operation (PUT / SET / put);
//! - `batch`: `--batch` entries per operation (POST / pipelined SETs / txn);
//! - `read`: one entry per operation (GET / GET / range);
//! - `ofrep` (podcache only): one OpenFeature flag evaluation per operation
//!   (`POST /ofrep/v1/evaluate/flags/{key}` with a small context) on the
//!   read target, for nodes started with `--ofrep-type 1`;
//! - `fill`: loads `--keys` entries as fast as possible (for bootstrap and
//!   memory figures), no latency figures;
//! - `lag`: writes probe keys to the first target at `--probe-rate` per
//!   second (plus `--rate` background writes), and measures the time from a
//!   write's acknowledgement to its arrival on every other target (podcache:
//!   the `/v1/watch` event stream, or with `--observe poll` a tight loop of
//!   GETs on each replica, the same method as Redis's; Redis: a tight loop
//!   of GETs on each replica, since replicas emit no keyspace notifications
//!   for replicated writes; etcd: a watch on each follower).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use podcache::etcd::{EtcdClient, EtcdSettings, EtcdTls};
use podcache::proto::etcd::{PutRequest, RequestOp, TxnRequest, request_op};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum System {
    Podcache,
    Redis,
    Etcd,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Workload {
    Write,
    Batch,
    Read,
    Ofrep,
    Fill,
    Lag,
    /// Read a key, then compare-and-set it (podcache: `If-Match` of the
    /// version read, or `If-None-Match: *`; etcd: a transaction comparing
    /// the key's mod revision). One operation = the read and the write; a
    /// write that lost the race (412, a failed compare) counts as decided.
    Cas,
}

/// Which node each operation goes to, and on which connection.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Spread {
    /// Every operation to one node (writes: the first target; reads:
    /// `--read-from`), on the worker's one kept-alive connection.
    None,
    /// Every operation to a node picked at random, on a new connection
    /// (a Kubernetes Service spreading clients that do not keep
    /// connections): connecting is part of each operation's latency.
    New,
    /// Every operation to a node picked at random, on the worker's
    /// kept-alive connection to that node (one per node).
    Kept,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Observe {
    Watch,
    Poll,
}

#[derive(Debug, Parser)]
#[command(about = "Load generator for bench/run")]
struct Args {
    /// The system under load.
    #[arg(long)]
    system: System,
    /// host:port of every node; the first one takes the writes.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// What to do.
    #[arg(long)]
    workload: Workload,
    /// Concurrent connections (workers).
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Entries per batched operation.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Seconds of warm-up (not measured).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Reads go to this target index (a replica).
    #[arg(long, default_value_t = 1)]
    read_from: usize,
    /// Total operations per second across workers (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// How the lag workload sees podcache probes arrive: the watch stream,
    /// or polling each replica in a tight loop (as for Redis).
    #[arg(long, default_value = "watch")]
    observe: Observe,
    /// Probe writes per second for the lag workload.
    #[arg(long, default_value_t = 200)]
    probe_rate: u64,
    /// A query string for podcache's writes, e.g. `wait=all`.
    #[arg(long, default_value = "")]
    query: String,
    /// Which node each operation of `write`, `batch`, `read`, `ofrep` and
    /// `cas` goes to.
    #[arg(long, default_value = "none")]
    spread: Spread,
}

/// A worker's connections: one per target, opened when first used.
struct Conns {
    system: System,
    targets: Vec<String>,
    open: Vec<Option<Conn>>,
}

impl Conns {
    fn new(system: System, targets: Vec<String>) -> Self {
        let open = targets.iter().map(|_| None).collect();
        Self {
            system,
            targets,
            open,
        }
    }

    /// The connection to target `i`, opened if there is none.
    async fn get(&mut self, i: usize) -> anyhow::Result<&mut Conn> {
        let slot = &mut self.open[i];
        if slot.is_none() {
            *slot = Some(connect(self.system, &self.targets[i]).await?);
        }
        slot.as_mut().context("a connection was just opened")
    }

    fn close(&mut self, i: usize) {
        self.open[i] = None;
    }
}

/// A well-mixed 64-bit value from `n` (splitmix64's finaliser): picks a
/// spread operation's node independently of its key.
fn mix(mut n: u64) -> u64 {
    n = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    n = (n ^ (n >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    n = (n ^ (n >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    n ^ (n >> 31)
}

/// One connection to one node.
enum Conn {
    Http(HttpConn),
    Redis(BufReader<TcpStream>),
    Etcd(EtcdClient),
}

/// A TCP connection to `target` with Nagle's algorithm off (every backend
/// writes whole requests).
async fn tcp_connect(target: &str) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connect {target}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A minimal HTTP/1.1 client on one keep-alive connection: one request at a
/// time, answers framed by `Content-Length` (podcache frames every answer
/// but the watch stream that way; anything else is an error).
struct HttpConn {
    stream: BufReader<TcpStream>,
    host: String,
    request: Vec<u8>,
    body: Vec<u8>,
}

impl HttpConn {
    async fn connect(target: &str) -> anyhow::Result<Self> {
        Ok(Self {
            stream: BufReader::with_capacity(16 * 1024, tcp_connect(target).await?),
            host: target.to_owned(),
            request: Vec::with_capacity(1024),
            body: Vec::with_capacity(1024),
        })
    }

    /// Sends one request and reads its answer: the status and the body.
    async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, &[u8])> {
        self.send_with(method, path, "", body).await
    }

    /// [`HttpConn::send`] with extra header lines (each ending in CRLF).
    async fn send_with(
        &mut self,
        method: &str,
        path: &str,
        headers: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, &[u8])> {
        use std::io::Write as _;
        self.request.clear();
        write!(
            self.request,
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n{headers}\r\n",
            self.host,
            body.len()
        )?;
        self.request.extend_from_slice(body);
        self.stream.get_mut().write_all(&self.request).await?;
        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            bail!("connection closed");
        }
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let mut length = None;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                bail!("connection closed in the headers");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(value.trim().parse::<usize>()?);
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    bail!("unexpected transfer-encoding {value:?}");
                }
            }
        }
        let length = length.context("answer without content-length")?;
        self.body.resize(length, 0);
        self.stream.read_exact(&mut self.body).await?;
        Ok((status, &self.body))
    }
}

async fn connect(system: System, target: &str) -> anyhow::Result<Conn> {
    Ok(match system {
        System::Podcache => Conn::Http(HttpConn::connect(target).await?),
        System::Redis => Conn::Redis(BufReader::new(tcp_connect(target).await?)),
        System::Etcd => Conn::Etcd(EtcdClient::connect(&EtcdSettings {
            endpoints: vec![format!("http://{target}")],
            tls: EtcdTls::default(),
            timeout: Duration::from_secs(10),
        })?),
    })
}

/// One request on `conn`; an answer other than 2xx or 404 is an error.
async fn http(conn: &mut HttpConn, method: &str, path: &str, body: &[u8]) -> anyhow::Result<u16> {
    let (status, answer) = conn.send(method, path, body).await?;
    if !(200..300).contains(&status) && status != 404 {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(answer));
    }
    Ok(status)
}

fn resp_command(out: &mut Vec<u8>, parts: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
    for part in parts {
        out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
}

/// Reads one RESP reply (enough of the protocol for SET, GET, INFO, PING).
async fn resp_reply(reader: &mut BufReader<TcpStream>) -> anyhow::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let line = line.trim_end();
    match line.as_bytes().first() {
        Some(b'+') | Some(b':') => Ok(Some(line.as_bytes()[1..].to_vec())),
        Some(b'-') => bail!("redis: {line}"),
        Some(b'$') => {
            let len: i64 = line[1..].parse()?;
            if len < 0 {
                return Ok(None);
            }
            let mut buf = vec![0; len as usize + 2];
            reader.read_exact(&mut buf).await?;
            buf.truncate(len as usize);
            Ok(Some(buf))
        }
        Some(b'*') => {
            let n: i64 = line[1..].parse()?;
            let mut all = Vec::new();
            for _ in 0..n.max(0) {
                if let Some(part) = Box::pin(resp_reply(reader)).await? {
                    all.extend(part);
                    all.push(b' ');
                }
            }
            Ok(Some(all))
        }
        _ => bail!("redis: unexpected reply {line:?}"),
    }
}

fn key(i: u64) -> String {
    format!("key:{i:08}")
}

/// One operation of `workload` on `conn`; `n` picks the keys.
async fn op(
    conn: &mut Conn,
    workload: Workload,
    n: u64,
    args: &Args,
    value: &Bytes,
) -> anyhow::Result<()> {
    let keys = args.keys.max(1);
    match (conn, workload) {
        (Conn::Http(c), Workload::Write) => {
            let query = if args.query.is_empty() {
                String::new()
            } else {
                format!("?{}", args.query)
            };
            let path = format!("/v1/cache/1/{}{query}", key(n % keys));
            http(c, "PUT", &path, value).await?;
        }
        (Conn::Http(c), Workload::Batch | Workload::Fill) => {
            let size = if workload == Workload::Fill {
                1000
            } else {
                args.batch
            };
            // The keys and values need no JSON escaping: written as is,
            // as the RESP backend writes its commands.
            let mut body = Vec::with_capacity(size * (value.len() + 24) + 2);
            body.push(b'{');
            for j in 0..size as u64 {
                if j > 0 {
                    body.push(b',');
                }
                body.push(b'"');
                body.extend_from_slice(key((n * size as u64 + j) % keys).as_bytes());
                body.extend_from_slice(b"\":\"");
                body.extend_from_slice(value);
                body.push(b'"');
            }
            body.push(b'}');
            let path = if args.query.is_empty() {
                "/v1/cache/1".to_owned()
            } else {
                format!("/v1/cache/1?{}", args.query)
            };
            http(c, "POST", &path, &body).await?;
        }
        (Conn::Http(c), Workload::Read) => {
            http(c, "GET", &format!("/v1/cache/1/{}", key(n % keys)), b"").await?;
        }
        (Conn::Http(c), Workload::Cas) => {
            let path = format!("/v1/cache/1/{}", key(n % keys));
            let (status, answer) = c.send("GET", &path, b"").await?;
            let expect = match status {
                404 => "if-none-match: *\r\n".to_owned(),
                200 => {
                    let text = std::str::from_utf8(answer)?;
                    let version = text
                        .split("\"version\":\"")
                        .nth(1)
                        .and_then(|rest| rest.split('"').next())
                        .context("no version in the answer")?;
                    format!("if-match: \"{version}\"\r\n")
                }
                other => bail!("HTTP {other} on the read"),
            };
            let (status, answer) = c.send_with("PUT", &path, &expect, value).await?;
            if status != 200 && status != 412 {
                bail!("HTTP {status}: {}", String::from_utf8_lossy(answer));
            }
        }
        (Conn::Redis(_), Workload::Cas) => bail!("no cas workload for Redis"),
        (Conn::Http(c), Workload::Ofrep) => {
            let path = format!("/ofrep/v1/evaluate/flags/{}", key(n % keys));
            let context = br#"{"context":{"targetingKey":"user-1","plan":"pro"}}"#;
            http(c, "POST", &path, context).await?;
        }
        (Conn::Redis(_), Workload::Ofrep) => {
            bail!("the ofrep workload is podcache's alone")
        }
        (Conn::Redis(reader), workload) => {
            let count = match workload {
                Workload::Batch => args.batch,
                Workload::Fill => 1000,
                _ => 1,
            };
            let mut out = Vec::new();
            for j in 0..count as u64 {
                let k = key((n * count as u64 + j) % keys);
                if workload == Workload::Read {
                    resp_command(&mut out, &[b"GET", k.as_bytes()]);
                } else {
                    resp_command(&mut out, &[b"SET", k.as_bytes(), value]);
                }
            }
            reader.get_mut().write_all(&out).await?;
            for _ in 0..count {
                resp_reply(reader).await?;
            }
        }
        (Conn::Etcd(client), workload) => match workload {
            Workload::Ofrep => bail!("the ofrep workload is podcache's alone"),
            Workload::Cas => {
                let k = key(n % keys).into_bytes();
                let held = client
                    .range(podcache::proto::etcd::RangeRequest {
                        key: k.clone(),
                        ..Default::default()
                    })
                    .await?;
                let revision = held.first().map_or(0, |kv| kv.mod_revision);
                use podcache::proto::etcd::{Compare, compare};
                client
                    .txn(TxnRequest {
                        compare: vec![Compare {
                            result: compare::CompareResult::Equal as i32,
                            target: compare::CompareTarget::Mod as i32,
                            key: k.clone(),
                            target_union: Some(compare::TargetUnion::ModRevision(revision)),
                            range_end: Vec::new(),
                        }],
                        success: vec![RequestOp {
                            request: Some(request_op::Request::RequestPut(PutRequest {
                                key: k,
                                value: value.to_vec(),
                                ..PutRequest::default()
                            })),
                        }],
                        failure: vec![],
                    })
                    .await?;
            }
            Workload::Read => {
                client.range_prefix(key(n % keys).as_bytes()).await?;
            }
            Workload::Write | Workload::Lag => {
                client.put(key(n % keys).as_bytes(), value, 0).await?;
            }
            Workload::Batch | Workload::Fill => {
                let count = if workload == Workload::Fill {
                    100
                } else {
                    args.batch
                };
                let success = (0..count as u64)
                    .map(|j| RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: key((n * count as u64 + j) % keys).into_bytes(),
                            value: value.to_vec(),
                            ..PutRequest::default()
                        })),
                    })
                    .collect();
                client
                    .txn(TxnRequest {
                        compare: vec![],
                        success,
                        failure: vec![],
                    })
                    .await?;
            }
        },
        (_, _) => bail!("unsupported combination"),
    }
    Ok(())
}

fn summary(
    hist: &Histogram<u64>,
    ops: u64,
    errors: u64,
    seconds: f64,
    entries_per_op: usize,
) -> serde_json::Value {
    json!({
        "ops": ops,
        "ops_per_sec": ops as f64 / seconds,
        "entries_per_sec": (ops * entries_per_op as u64) as f64 / seconds,
        "p50_us": hist.value_at_quantile(0.50),
        "p95_us": hist.value_at_quantile(0.95),
        "p99_us": hist.value_at_quantile(0.99),
        "max_us": hist.max(),
        "errors": errors,
        "seconds": seconds,
    })
}

/// Runs `workload` with `connections` workers; returns the summary.
async fn run_load(args: Arc<Args>, workload: Workload) -> anyhow::Result<serde_json::Value> {
    let fixed = match workload {
        Workload::Read | Workload::Ofrep => args.read_from.min(args.targets.len() - 1),
        _ => 0,
    };
    let value = Bytes::from(vec![b'v'; args.value_size]);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let per_worker_rate = if args.rate > 0 {
        Some(Duration::from_secs_f64(
            args.connections as f64 / args.rate as f64,
        ))
    } else {
        None
    };
    for w in 0..args.connections {
        let (args, value, measuring, stop, counter) = (
            args.clone(),
            value.clone(),
            measuring.clone(),
            stop.clone(),
            counter.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut conns = Conns::new(args.system, args.targets.clone());
            if args.spread == Spread::None {
                // Fails the run at once when the node is not there.
                conns.get(fixed).await?;
            }
            let (mut ops, mut errors) = (0u64, 0u64);
            let mut next = Instant::now();
            let mut n = w as u64 * 7_919;
            while !stop.load(Ordering::Relaxed) {
                if let Some(every) = per_worker_rate {
                    next += every;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                n = n.wrapping_add(counter.fetch_add(1, Ordering::Relaxed));
                let target = match args.spread {
                    Spread::None => fixed,
                    Spread::New | Spread::Kept => (mix(n) % args.targets.len() as u64) as usize,
                };
                let started = Instant::now();
                let result = match conns.get(target).await {
                    Ok(conn) => op(conn, workload, n, &args, &value).await,
                    Err(e) => Err(e),
                };
                if result.is_err() || args.spread == Spread::New {
                    // A failed connection is opened again for the next
                    // operation; a spread one is new for each.
                    conns.close(target);
                }
                if measuring.load(Ordering::Relaxed) {
                    match result {
                        Ok(()) => {
                            ops += 1;
                            let _ = hist.record(started.elapsed().as_micros().max(1) as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            Ok::<_, anyhow::Error>((hist, ops, errors))
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    measuring.store(false, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut ops, mut errors) = (0, 0);
    for task in tasks {
        let (hist, o, e) = task.await??;
        total.add(hist)?;
        ops += o;
        errors += e;
    }
    let per_op = match workload {
        Workload::Batch => args.batch,
        _ => 1,
    };
    Ok(summary(&total, ops, errors, seconds, per_op))
}

/// Fills `--keys` entries through the first target as fast as possible.
async fn fill(args: Arc<Args>) -> anyhow::Result<serde_json::Value> {
    let per_op: u64 = if args.system == System::Etcd {
        100
    } else {
        1000
    };
    let ops = args.keys.div_ceil(per_op);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let value = Bytes::from(vec![b'v'; args.value_size]);
    let mut tasks = Vec::new();
    for _ in 0..args.connections.min(8) {
        let (args, next, value) = (args.clone(), next.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = connect(args.system, &args.targets[0]).await?;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= ops {
                    return Ok::<_, anyhow::Error>(());
                }
                op(&mut conn, Workload::Fill, n, &args, &value).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(json!({ "entries": args.keys, "seconds": started.elapsed().as_secs_f64() }))
}

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// Records that probe `k` was first seen on `target` at `now`.
async fn arrived(arrivals: &Arrivals, target: &str, k: &str, now: Instant) {
    arrivals
        .lock()
        .await
        .entry(format!("{target}|{k}"))
        .or_insert(now);
}

/// Follows probe keys arriving on one node, recording when each arrived.
/// Probe keys are `probe:<run>:<seq>`: `run` differs per lag run, so a
/// poller never mistakes an earlier run's probe for a new arrival.
async fn observe(
    system: System,
    how: Observe,
    run: u64,
    target: String,
    arrivals: Arrivals,
    ready: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    match system {
        System::Podcache if how == Observe::Poll => {
            // The same method as for Redis: wait for probe N, then N + 1
            // (one fan-out queue per peer keeps them in order).
            let mut conn = HttpConn::connect(&target).await?;
            ready.fetch_add(1, Ordering::SeqCst);
            let mut seq = 1u64;
            loop {
                let k = format!("probe:{run}:{seq:08}");
                let found = http(&mut conn, "GET", &format!("/v1/cache/2/{k}"), b"").await? == 200;
                if found {
                    let now = Instant::now();
                    arrived(&arrivals, &target, &k, now).await;
                    seq += 1;
                }
            }
        }
        System::Podcache => {
            // The watch is a chunked event stream: hyper's client reads it.
            let stream = tcp_connect(&target).await?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            sender.ready().await?;
            let request = hyper::Request::builder()
                .uri("/v1/watch/2")
                .header(hyper::header::HOST, target.as_str())
                .body(Full::new(Bytes::new()))?;
            let mut body = sender.send_request(request).await?.into_body();
            ready.fetch_add(1, Ordering::SeqCst);
            let mut buffer = String::new();
            while let Some(frame) = body.frame().await {
                let frame = frame?;
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                let now = Instant::now();
                buffer.push_str(&String::from_utf8_lossy(data));
                while let Some(end) = buffer.find("\n\n") {
                    let block: String = buffer.drain(..end + 2).collect();
                    for line in block.lines().filter_map(|l| l.strip_prefix("data:")) {
                        if let Ok(event) = serde_json::from_str::<serde_json::Value>(line.trim())
                            && let Some(k) = event["key"].as_str()
                        {
                            arrived(&arrivals, &target, k, now).await;
                        }
                    }
                }
            }
        }
        System::Redis => {
            // Redis replicas do not emit keyspace notifications for writes
            // they receive through replication (seen with Debian's Redis 7),
            // so each replica is polled in a tight loop instead: the probes
            // arrive in order (one replication stream), so the observer
            // waits for probe N, records when it appeared, then N + 1.
            let Conn::Redis(mut reader) = connect(system, &target).await? else {
                unreachable!()
            };
            ready.fetch_add(1, Ordering::SeqCst);
            let mut seq = 1u64;
            loop {
                let k = format!("probe:{run}:{seq:08}");
                let mut out = Vec::new();
                resp_command(&mut out, &[b"GET", k.as_bytes()]);
                reader.get_mut().write_all(&out).await?;
                if resp_reply(&mut reader).await?.is_some() {
                    let now = Instant::now();
                    arrived(&arrivals, &target, &k, now).await;
                    seq += 1;
                }
            }
        }
        System::Etcd => {
            let Conn::Etcd(client) = connect(system, &target).await? else {
                unreachable!()
            };
            let prefix = format!("probe:{run}:");
            let mut watch = client.watch_prefix(prefix.as_bytes(), 0).await?;
            ready.fetch_add(1, Ordering::SeqCst);
            while let Some(response) = watch.next().await? {
                let now = Instant::now();
                for event in response.events {
                    if let Some(kv) = event.kv {
                        let k = String::from_utf8_lossy(&kv.key).into_owned();
                        arrived(&arrivals, &target, &k, now).await;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Replication lag: probe writes on the first node, arrivals on the others.
async fn lag(args: Arc<Args>) -> anyhow::Result<serde_json::Value> {
    let arrivals: Arrivals = Arc::new(Mutex::new(HashMap::new()));
    let ready = Arc::new(AtomicU64::new(0));
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let observers: Vec<_> = args.targets[1..]
        .iter()
        .map(|t| {
            tokio::spawn(observe(
                args.system,
                args.observe,
                run,
                t.clone(),
                arrivals.clone(),
                ready.clone(),
            ))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready.load(Ordering::SeqCst) < observers.len() as u64 {
        if Instant::now() > deadline {
            bail!("observers did not subscribe");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Background writes (the loaded case) run alongside the probes.
    let background = if args.rate > 0 {
        let args = args.clone();
        Some(tokio::spawn(async move {
            run_load(args, Workload::Write).await
        }))
    } else {
        None
    };
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let mut conn = connect(args.system, &args.targets[0]).await?;
    let value = Bytes::from(vec![b'p'; args.value_size]);
    let mut acks: Vec<(String, Instant)> = Vec::new();
    let every = Duration::from_secs_f64(1.0 / args.probe_rate.max(1) as f64);
    let started = Instant::now();
    let mut next = started;
    let mut seq = 0u64;
    while started.elapsed().as_secs_f64() < args.duration {
        next += every;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        seq += 1;
        let k = format!("probe:{run}:{seq:08}");
        match &mut conn {
            Conn::Http(c) => {
                http(c, "PUT", &format!("/v1/cache/2/{k}"), &value).await?;
            }
            Conn::Redis(reader) => {
                let mut out = Vec::new();
                resp_command(&mut out, &[b"SET", k.as_bytes(), &value]);
                reader.get_mut().write_all(&out).await?;
                resp_reply(reader).await?;
            }
            Conn::Etcd(client) => {
                client.put(k.as_bytes(), &value, 0).await?;
            }
        }
        acks.push((k, Instant::now()));
    }
    // Give the last probes time to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let background = match background {
        Some(task) => Some(task.await??),
        None => None,
    };
    for o in observers {
        o.abort();
    }
    let arrivals = arrivals.lock().await;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut missing = 0;
    for (k, acked) in &acks {
        for target in &args.targets[1..] {
            match arrivals.get(&format!("{target}|{k}")) {
                // Seen before the writer got its answer: lag 0 (recorded as 1 µs).
                Some(arrived) => {
                    let _ =
                        hist.record(
                            arrived.saturating_duration_since(*acked).as_micros().max(1) as u64
                        );
                }
                None => missing += 1,
            }
        }
    }
    Ok(json!({
        "probes": acks.len(),
        "p50_us": hist.value_at_quantile(0.50),
        "p95_us": hist.value_at_quantile(0.95),
        "p99_us": hist.value_at_quantile(0.99),
        "max_us": hist.max(),
        "missing": missing,
        "background": background,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    if args.targets.is_empty() {
        bail!("--targets is required");
    }
    let result = match args.workload {
        Workload::Fill => fill(args.clone()).await?,
        Workload::Lag => lag(args.clone()).await?,
        workload => run_load(args.clone(), workload).await?,
    };
    println!("{result}");
    Ok(())
}
