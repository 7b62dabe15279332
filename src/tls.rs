//! Mutual TLS between replicas (rustls, TLS 1.3 only).
//!
//! Every replica holds a certificate and key signed by one CA that exists
//! for this cluster (`--tls-cert`, `--tls-key`, `--tls-ca`, as cert-manager
//! issues them). The gRPC server refuses any client without a certificate
//! signed by that CA; a replica dialling a peer refuses a server without
//! one. Peers are dialled by pod IP, which certificates rarely name, so the
//! client checks the chain to the CA, validity and key usage, but not the
//! name: any certificate of the cluster's CA is a replica of this cluster.
//! Keep that CA for podcache alone.
//!
//! The files are polled for changes and the configurations rebuilt without
//! a restart; new connections use the new certificates, existing ones keep
//! theirs until they reconnect. Files that do not load are refused and the
//! certificates in use stay.
//!
//! Owns: loading, reloading, the verifiers and the dialling connector. Must
//! not touch what flows over the connections.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::reload::FileStamps;

/// The three files of a replica's identity: given together or not at all.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct TlsFiles {
    /// This replica's certificate chain (PEM, leaf first) for mutual TLS
    /// between replicas.
    #[arg(
        id = "tls_cert",
        long = "tls-cert",
        env = "PODCACHE_TLS_CERT",
        help_heading = "Security",
        required = false
    )]
    pub cert: PathBuf,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(
        id = "tls_key",
        long = "tls-key",
        env = "PODCACHE_TLS_KEY",
        help_heading = "Security",
        required = false
    )]
    pub key: PathBuf,
    /// The CA that signs every replica's certificate (PEM).
    #[arg(
        id = "tls_ca",
        long = "tls-ca",
        env = "PODCACHE_TLS_CA",
        help_heading = "Security",
        required = false
    )]
    pub ca: PathBuf,
}

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing, unreadable, or holds no PEM of the kind needed.
    #[error("TLS file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The files do not make a working configuration (e.g. the key does not
    /// fit the certificate).
    #[error("TLS configuration: {0}")]
    Config(String),
}

struct Configs {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

/// A replica's TLS identity, reloaded when its files change.
pub struct PeerTls {
    files: TlsFiles,
    configs: RwLock<Arc<Configs>>,
    stamps: FileStamps,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

pub(crate) fn file_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

pub(crate) fn config_error(err: impl std::fmt::Display) -> TlsError {
    TlsError::Config(err.to_string())
}

/// The certificate chain in the PEM file at `path` (at least one).
pub(crate) fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no certificate"));
    }
    Ok(certs)
}

/// The CA certificates in the PEM file at `path` (at least one).
pub(crate) fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(path).map_err(|e| file_error(path, e))? {
        let ca = ca.map_err(|e| file_error(path, e))?;
        roots.add(ca).map_err(|e| file_error(path, e))?;
    }
    if roots.is_empty() {
        return Err(file_error(path, "holds no CA certificate"));
    }
    Ok(roots)
}

fn build(files: &TlsFiles) -> Result<Configs, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, e))?;
    let roots = Arc::new(roots(&files.ca)?);

    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(config_error)?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(config_error)?;
    server.alpn_protocols = vec![b"h2".to_vec()];

    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(config_error)?;
    let mut client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ClusterCaVerifier {
            inner: server_verifier,
            provider,
        }))
        .with_client_auth_cert(certs, key)
        .map_err(config_error)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Configs {
        acceptor: TlsAcceptor::from(Arc::new(server)),
        connector: TlsConnector::from(Arc::new(client)),
    })
}

impl PeerTls {
    /// Loads the files; fails when any is missing or they do not fit.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let stamps = FileStamps::of(vec![
            files.cert.clone(),
            files.key.clone(),
            files.ca.clone(),
        ]);
        let configs = build(&files)?;
        Ok(Self {
            files,
            configs: RwLock::new(Arc::new(configs)),
            stamps,
        })
    }

    fn current(&self) -> Arc<Configs> {
        self.configs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The server side as configured now.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current().acceptor.clone()
    }

    /// The client side as configured now.
    pub fn connector(&self) -> TlsConnector {
        self.current().connector.clone()
    }

    /// Rebuilds the configurations if a file changed. `None` when nothing
    /// changed; an error leaves the configurations in use.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        if !self.stamps.changed() {
            return None;
        }
        Some(build(&self.files).map(|configs| {
            *self.configs.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(configs);
        }))
    }
}

/// Accepts a server certificate that chains to the cluster CA whatever
/// names it carries (peers are dialled by IP); everything else (chain,
/// validity, key usage, signatures) is the standard WebPKI verification.
#[derive(Debug)]
struct ClusterCaVerifier {
    inner: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ClusterCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Dials a peer over TCP and TLS with the certificates in use at the time
/// of dialling: the connector of a replica's gRPC channel.
#[derive(Clone)]
pub(crate) struct TlsConnect {
    pub(crate) tls: Arc<PeerTls>,
    pub(crate) addr: SocketAddr,
}

impl tonic::codegen::Service<tonic::codegen::http::Uri> for TlsConnect {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let connector = self.tls.connector();
        let addr = self.addr;
        Box::pin(async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::IpAddress(addr.ip().into());
            Ok(TokioIo::new(connector.connect(name, tcp).await?))
        })
    }
}

/// How long an incoming connection may take to finish its TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
