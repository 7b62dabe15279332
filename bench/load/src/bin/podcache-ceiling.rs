//! `podcache-ceiling`: the HTTP stack's own ceiling for bench/run. A bare
//! hyper HTTP/1.1 server with podcache's settings (the same builder, timer,
//! keep-alive, runtime and allocator) and nothing else: no routing, no
//! gate, no store. It reads every request's body and answers a `PUT` or
//! `POST` with 200 and no body, anything else with 200 and a fixed body of
//! `--get-body-bytes` (the size of podcache's answer to the GETs the bench
//! sends). What podcache serves beside it in the same run says how much of
//! a request's cost is podcache's own.
//!
//! Owns nothing of podcache; it is a yardstick, not a stand-in.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};

/// The same allocator as the podcache binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "A bare hyper server: the HTTP ceiling of bench/run")]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Bytes of the body answered to a GET.
    #[arg(long, default_value_t = 200)]
    get_body_bytes: usize,
}

async fn answer(
    request: hyper::Request<Incoming>,
    get_body: Bytes,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let writes = matches!(*request.method(), hyper::Method::PUT | hyper::Method::POST);
    // Read the body as podcache does (a failed read answers the same).
    let _ = request.into_body().collect().await;
    let body = if writes { Bytes::new() } else { get_body };
    let mut response = hyper::Response::new(Full::new(body));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let get_body = Bytes::from(vec![b'v'; args.get_body_bytes]);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .keep_alive(true);
    loop {
        let (conn, _) = listener.accept().await?;
        conn.set_nodelay(true)?;
        let http = http.clone();
        let get_body = get_body.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request| answer(request, get_body.clone()));
            // A client that goes away ends its connection; nothing to report.
            let _ = http.serve_connection(TokioIo::new(conn), service).await;
        });
    }
}
