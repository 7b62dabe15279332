//! The Kubernetes API client both Kubernetes adapters use (pod discovery,
//! the decider's Lease): from a kubeconfig file, or inferred as kubectl
//! does (in-cluster service account first, then `$KUBECONFIG`, then
//! `~/.kube/config`).
//!
//! Owns: building the client. Must not touch what it is used for.

use std::path::Path;

use kube::Client;

/// Why the API client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// No usable in-cluster or kubeconfig configuration.
    #[error("no Kubernetes configuration: {0}")]
    Config(String),
    /// The client could not be built from the configuration.
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// A client from `kubeconfig`, or the inferred configuration.
pub(crate) async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubernetesError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| KubernetesError::Config(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| KubernetesError::Config(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubernetesError::Config(e.to_string()))?,
    };
    Client::try_from(config).map_err(KubernetesError::Client)
}
