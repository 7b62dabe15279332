//! The REST port's connections: capped in number
//! ([`crate::conn_limit`]), TLS when configured ([`crate::http_tls`]),
//! each served by hyper's HTTP/1 with a header read timeout. hyper starts
//! that timeout whenever it waits for a request's head, after a response
//! too, so it closes both a client that sends its headers slowly and an
//! idle keep-alive connection; a watch stream, being a response, is not
//! cut by it.
//!
//! Owns: accepting, the handshake (within [`HANDSHAKE_TIMEOUT`], off the
//! accept loop), the HTTP/1 settings and graceful shutdown. Must not touch
//! what requests do (the parent module and [`super::front`]).
//!
//! Written here rather than taken from `axum::serve`, which offers neither
//! TLS nor a header timeout.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::Api;
use super::auth::PeerSubject;
use super::front::Front;
use crate::conn_limit::accept_limited;
use crate::metrics::refused_label;
use crate::tls::HANDSHAKE_TIMEOUT;

/// Serves REST on `listener` until the API's stop token fires, then lets
/// requests in flight finish (the caller bounds how long).
pub(crate) async fn serve(api: Arc<Api>, listener: TcpListener, tasks: TaskTracker) {
    let config = &api.replica.config;
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let front = Front::new(api.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.http_header_timeout)
        .keep_alive(true);
    let stop = api.stop.clone();
    loop {
        let (conn, addr) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = accept_limited(&listener, &permits, &api.replica.metrics, "http") => accepted,
        };
        let front = front.clone();
        let front_tls = front.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let mut front = front.clone();
            tower::Service::call(&mut front, request.map(axum::body::Body::new))
        });
        let http = http.clone();
        let watcher = graceful.watcher();
        let acceptor = api.http_tls.as_ref().map(|tls| tls.acceptor());
        let metrics = api.replica.metrics.clone();
        // Ends when the connection does (or its handshake times out).
        tasks.spawn(async move {
            let result = match acceptor {
                None => {
                    watcher
                        .watch(http.serve_connection(TokioIo::new(conn), service))
                        .await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                        Ok(Ok(stream)) => {
                            let subject = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|certs| certs.first())
                                .and_then(|cert| subject_of(cert.as_ref()));
                            let service = hyper::service::service_fn(
                                move |mut request: hyper::Request<Incoming>| {
                                    if let Some(subject) = &subject {
                                        request
                                            .extensions_mut()
                                            .insert(PeerSubject(subject.clone()));
                                    }
                                    let mut front = front_tls.clone();
                                    tower::Service::call(
                                        &mut front,
                                        request.map(axum::body::Body::new),
                                    )
                                },
                            );
                            watcher
                                .watch(http.serve_connection(TokioIo::new(stream), service))
                                .await
                        }
                        Ok(Err(err)) => {
                            metrics
                                .connections_refused
                                .get_or_create(&refused_label("http", "tls"))
                                .inc();
                            debug!(%addr, %err, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            metrics
                                .connections_refused
                                .get_or_create(&refused_label("http", "tls"))
                                .inc();
                            debug!(%addr, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            if let Err(err) = result {
                debug!(%addr, %err, "REST connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
}

/// The subject of a client certificate (`CN=ops,O=example`), the author of
/// what its connection writes; `None` when it does not parse.
fn subject_of(der: &[u8]) -> Option<Arc<str>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject().to_string();
    let subject: String = subject
        .chars()
        .take(crate::store::Meta::MAX_FIELD_BYTES / 4)
        .collect();
    (!subject.is_empty()).then(|| Arc::from(subject))
}
