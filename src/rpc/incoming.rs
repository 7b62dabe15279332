//! The gRPC listener's connections: capped in number
//! ([`crate::conn_limit`]), and with mutual TLS when configured. A
//! connection must start talking (plain text) or finish its handshake (TLS)
//! within [`HANDSHAKE_TIMEOUT`], checked off the accept loop, so a client
//! that opens connections and says nothing holds each slot for a few
//! seconds at most and never delays anyone else.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::debug;

use super::RpcContext;
use crate::conn_limit::{Limited, accept_limited};
use crate::metrics::refused_label;
use crate::tls::HANDSHAKE_TIMEOUT;

/// One accepted replica connection.
pub(crate) enum PeerConn {
    /// Plain text (no certificates configured).
    Plain(Limited<TcpStream>),
    /// Mutual TLS, handshake done.
    Tls(Box<tokio_rustls::server::TlsStream<Limited<TcpStream>>>),
}

/// The connections of `listener`, until `stop` fires.
pub(crate) fn incoming(
    ctx: &RpcContext,
    listener: TcpListener,
) -> ReceiverStream<io::Result<PeerConn>> {
    let (conn_tx, conn_rx) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(ctx.replica.config.max_connections));
    let metrics = ctx.replica.metrics.clone();
    let tls = ctx.tls.clone();
    let stop = ctx.stop.clone();
    let tasks = ctx.tasks.clone();
    ctx.tasks.spawn(async move {
        loop {
            let (conn, addr) = tokio::select! {
                _ = stop.cancelled() => return,
                _ = conn_tx.closed() => return,
                accepted = accept_limited(&listener, &permits, &metrics, "grpc") => accepted,
            };
            let acceptor = tls.as_ref().map(|tls| tls.acceptor());
            let conn_tx = conn_tx.clone();
            let metrics = metrics.clone();
            // Ends by itself within the handshake timeout.
            tasks.spawn(async move {
                let refused = |reason| {
                    metrics
                        .connections_refused
                        .get_or_create(&refused_label("grpc", reason))
                        .inc();
                };
                let Some(acceptor) = acceptor else {
                    let mut first = [0u8; 1];
                    let talking = conn.get_ref().peek(&mut first);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, talking).await {
                        Ok(Ok(n)) if n > 0 => {
                            let _ = conn_tx.send(Ok(PeerConn::Plain(conn))).await;
                        }
                        _ => {
                            refused("silent");
                            debug!(%addr, "connection sent nothing in time");
                        }
                    }
                    return;
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                    Ok(Ok(stream)) => {
                        let _ = conn_tx.send(Ok(PeerConn::Tls(Box::new(stream)))).await;
                    }
                    Ok(Err(err)) => {
                        refused("tls");
                        debug!(%addr, %err, "TLS handshake refused");
                    }
                    Err(_) => {
                        refused("tls");
                        debug!(%addr, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(conn_rx)
}

impl Connected for PeerConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            PeerConn::Plain(conn) => conn.connect_info(),
            PeerConn::Tls(stream) => stream.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for PeerConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerConn::Plain(conn) => Pin::new(conn).poll_read(cx, buf),
            PeerConn::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerConn::Plain(conn) => Pin::new(conn).poll_write(cx, buf),
            PeerConn::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerConn::Plain(conn) => Pin::new(conn).poll_write_vectored(cx, bufs),
            PeerConn::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PeerConn::Plain(conn) => conn.is_write_vectored(),
            PeerConn::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerConn::Plain(conn) => Pin::new(conn).poll_flush(cx),
            PeerConn::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerConn::Plain(conn) => Pin::new(conn).poll_shutdown(cx),
            PeerConn::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}
