//! TLS on the REST port (`--http-tls-cert`, `--http-tls-key`, optional
//! `--http-tls-client-ca` to require client certificates), and the client
//! side `podcache ctl` uses (`--cacert`, `--cert`, `--key`).
//!
//! Owns: loading and reloading the REST port's certificate (polled like
//! the replicas' files: new connections take the new certificate,
//! existing ones keep theirs), and building client configurations. Must
//! not touch HTTP. Unlike the replicas' mutual TLS (src/tls.rs), clients
//! check the server's name the standard way: the REST port is reached by a
//! name (a Service), and its certificate names it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::reload::FileStamps;
use crate::tls::{TlsError, certificates, config_error, file_error, roots};

/// The REST port's TLS files.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct HttpTlsFiles {
    /// The REST port's certificate chain (PEM, leaf first): the port then
    /// speaks HTTPS only (plain HTTP gets no answer).
    #[arg(
        id = "http_tls_cert",
        long = "http-tls-cert",
        env = "PODCACHE_HTTP_TLS_CERT",
        help_heading = "Security",
        required = false
    )]
    pub cert: PathBuf,
    /// The private key of --http-tls-cert (PEM).
    #[arg(
        id = "http_tls_key",
        long = "http-tls-key",
        env = "PODCACHE_HTTP_TLS_KEY",
        help_heading = "Security",
        required = false
    )]
    pub key: PathBuf,
    /// A CA (PEM): REST clients must then present a certificate it signed.
    #[arg(
        id = "http_tls_client_ca",
        long = "http-tls-client-ca",
        env = "PODCACHE_HTTP_TLS_CLIENT_CA",
        help_heading = "Security"
    )]
    pub client_ca: Option<PathBuf>,
}

fn build(files: &HttpTlsFiles) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider)
                    .build()
                    .map_err(config_error)?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(config_error)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The REST port's TLS, reloaded when its files change.
pub struct HttpTls {
    files: HttpTlsFiles,
    acceptor: RwLock<TlsAcceptor>,
    stamps: FileStamps,
}

impl std::fmt::Debug for HttpTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl HttpTls {
    /// Loads the files; fails when any is missing or they do not fit.
    pub fn load(files: HttpTlsFiles) -> Result<Self, TlsError> {
        let mut watched = vec![files.cert.clone(), files.key.clone()];
        watched.extend(files.client_ca.clone());
        let acceptor = build(&files)?;
        Ok(Self {
            stamps: FileStamps::of(watched),
            acceptor: RwLock::new(acceptor),
            files,
        })
    }

    /// The acceptor as configured now.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Rebuilds the configuration if a file changed; `None` when nothing
    /// changed; an error leaves the one in use.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        if !self.stamps.changed() {
            return None;
        }
        Some(build(&self.files).map(|acceptor| {
            *self
                .acceptor
                .write()
                .unwrap_or_else(PoisonError::into_inner) = acceptor;
        }))
    }
}

/// A client configuration for HTTPS to a node: the CA that signed its
/// certificate (else the system's roots are not consulted: there are
/// none here, so a CA is required), and optionally this client's own
/// certificate and key for a node with `--http-tls-client-ca`.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_root_certificates(roots(ca)?);
    let config = match identity {
        Some((cert, key)) => {
            let certs = certificates(cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(config_error)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}
