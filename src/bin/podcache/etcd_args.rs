//! The etcd flags shared by `serve` (pod discovery) and `k8s-sim`.

use std::time::Duration;

use clap::Args;
use podcache::etcd::{EtcdSettings, EtcdTls};

use crate::{Failure, env_nonempty};

/// Where Kubernetes' etcd is and which pods are peers.
#[derive(Debug, Args)]
pub(crate) struct EtcdArgs {
    /// etcd endpoints, comma-separated URLs (https:// for TLS).
    #[arg(
        long,
        help_heading = "Discovery",
        env = "PODCACHE_ETCD_ENDPOINTS",
        value_delimiter = ','
    )]
    pub(crate) etcd_endpoints: Vec<String>,
    /// CA that signed etcd's certificate (kube-apiserver's --etcd-cafile).
    #[arg(long, help_heading = "Discovery", env = "PODCACHE_ETCD_CA")]
    pub(crate) etcd_ca: Option<std::path::PathBuf>,
    /// Client certificate for etcd (kube-apiserver's --etcd-certfile).
    #[arg(long, help_heading = "Discovery", env = "PODCACHE_ETCD_CERT")]
    pub(crate) etcd_cert: Option<std::path::PathBuf>,
    /// Client key for etcd (kube-apiserver's --etcd-keyfile).
    #[arg(long, help_heading = "Discovery", env = "PODCACHE_ETCD_KEY")]
    pub(crate) etcd_key: Option<std::path::PathBuf>,
    /// Namespace of the pods [default: $POD_NAMESPACE, else "default"].
    #[arg(long, help_heading = "Discovery", env = "PODCACHE_NAMESPACE")]
    pub(crate) namespace: Option<String>,
}

impl EtcdArgs {
    pub(crate) fn settings(&self, timeout: Duration) -> Result<EtcdSettings, Failure> {
        let endpoints: Vec<String> = self
            .etcd_endpoints
            .iter()
            .map(|e| e.trim().trim_end_matches('/').to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(Failure::Config(
                "--etcd-endpoints is required for etcd discovery".into(),
            ));
        }
        for e in &endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(Failure::Config(format!(
                    "--etcd-endpoints: {e:?} is not an http:// or https:// URL"
                )));
            }
        }
        if self.etcd_cert.is_some() != self.etcd_key.is_some() {
            return Err(Failure::Config(
                "--etcd-cert and --etcd-key go together".into(),
            ));
        }
        for path in [&self.etcd_ca, &self.etcd_cert, &self.etcd_key]
            .into_iter()
            .flatten()
        {
            if !path.is_file() {
                return Err(Failure::Config(format!(
                    "{} is not a readable file",
                    path.display()
                )));
            }
        }
        Ok(EtcdSettings {
            endpoints,
            tls: EtcdTls {
                ca: self.etcd_ca.clone(),
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
            },
            timeout,
        })
    }

    pub(crate) fn namespace(&self) -> String {
        self.namespace
            .clone()
            .or_else(|| env_nonempty("POD_NAMESPACE"))
            .unwrap_or_else(|| "default".into())
    }
}
