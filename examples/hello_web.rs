//! A small web service that embeds a podcache node, the way the original
//! Go service ("hello-web") kept its cluster info in sync.
//!
//! It serves its own routes and mounts podcache's REST API beside them; the
//! node replicates over gRPC to the peers given in `PEERS`.
//!
//! ```text
//! POD_IP=127.0.0.2 PEERS=127.0.0.3:9090 cargo run --example hello_web &
//! POD_IP=127.0.0.3 PEERS=127.0.0.2:9090 cargo run --example hello_web &
//! curl -X PUT -d blue http://127.0.0.2:8080/theme
//! curl http://127.0.0.3:8080/hello          # "hello from 127.0.0.3, theme blue"
//! curl http://127.0.0.3:8080/v1/cluster     # podcache's own API, mounted too
//! ```

use std::net::{IpAddr, SocketAddr};

use axum::Router;
use axum::extract::State;
use axum::routing::{get, put};
use podcache::discovery::StaticList;
use podcache::{NodeBuilder, NodeConfig, NodeHandle};
use std::sync::Arc;

/// The namespace this service keeps its settings in.
const SETTINGS: i32 = 0;

async fn hello(State(node): State<Arc<NodeHandle>>) -> String {
    let theme = node
        .get(SETTINGS, "theme")
        .unwrap_or_else(|| "not set".into());
    format!("hello from {}, theme {theme}\n", node.identity().pod_ip)
}

async fn set_theme(State(node): State<Arc<NodeHandle>>, body: String) -> String {
    match node.set(SETTINGS, "theme", body.trim(), None).await {
        Ok(outcome) => format!(
            "theme set, version {}\n",
            outcome.records[0].entry.version()
        ),
        Err(err) => format!("refused: {err}\n"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let pod_ip: IpAddr = std::env::var("POD_IP")
        .unwrap_or_else(|_| "127.0.0.2".into())
        .parse()?;
    let peers: Vec<String> = std::env::var("PEERS")
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    let mut config = NodeConfig::new(format!("hello-web-{pod_ip}"), pod_ip);
    config.grpc_addr = SocketAddr::new(pod_ip, 9090);
    // The service serves HTTP itself; podcache only adds its routes.
    let node = NodeBuilder::new(config)
        .discovery(StaticList::new(peers))
        .without_http()
        .start()
        .await?;
    let node = Arc::new(node);
    let app = Router::new()
        .route("/hello", get(hello))
        .route("/theme", put(set_theme))
        .with_state(node.clone())
        .merge(node.router());
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(pod_ip, 8080)).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    if let Ok(node) = Arc::try_unwrap(node) {
        node.shutdown().await;
    }
    Ok(())
}
