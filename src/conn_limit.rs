//! A cap on open connections per listener: a connection holds a permit for
//! as long as it is open, and one accepted past the cap is closed at once
//! (and counted), so a flood of idle or half-open connections cannot use up
//! the node's memory or file descriptors.
//!
//! Owns: [`Limited`], the connection wrapper that holds the permit, and
//! the capped accept both listeners use. Must not touch what the
//! connections carry.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use crate::metrics::{Metrics, refused_label};

/// A connection that holds one permit of its listener's cap until dropped.
#[derive(Debug)]
pub struct Limited<T> {
    io: T,
    _permit: OwnedSemaphorePermit,
}

impl<T> Limited<T> {
    /// The wrapped connection.
    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Limited<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Limited<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Limited<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Accepts the next connection within the cap: connections past it are
/// closed and counted under
/// `podcache_connections_refused_total{listener, reason="cap"}`. Accepted
/// sockets get TCP keep-alive, so a peer that vanished without a word is
/// noticed within a minute even on an idle connection.
pub(crate) async fn accept_limited(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    metrics: &Metrics,
    listener_name: &'static str,
) -> (Limited<TcpStream>, std::net::SocketAddr) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors and the like: back off briefly,
                // as hyper's and axum's own accept loops do.
                debug!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let _ = stream.set_nodelay(true);
                let keepalive = socket2::TcpKeepalive::new()
                    .with_time(Duration::from_secs(30))
                    .with_interval(Duration::from_secs(10));
                let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
                return (
                    Limited {
                        io: stream,
                        _permit: permit,
                    },
                    addr,
                );
            }
            Err(_) => {
                metrics
                    .connections_refused
                    .get_or_create(&refused_label(listener_name, "cap"))
                    .inc();
                drop(stream);
            }
        }
    }
}
