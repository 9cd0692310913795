//! Building the Kubernetes client: `--kubeconfig`, else the in-cluster
//! service account, else `$KUBECONFIG`.

use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::config::Config;
use crate::error::Error;

/// How long to wait for a TCP (and TLS) connection to the API server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence on a response. Above the watcher's own idle limit for
/// watch streams (290 s + 5 s), so only a stuck list or a dead peer hits it.
pub const READ_TIMEOUT: Duration = Duration::from_secs(300);

/// A Kubernetes client as configured: `kubeconfig` if set, else the
/// in-cluster service account, else the file(s) named by `$KUBECONFIG`.
pub async fn client_from_config(config: &Config) -> Result<kube::Client, Error> {
    install_crypto_provider();
    let mut kube_config = match &config.kubeconfig {
        Some(path) => {
            let file =
                Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig { path: path.clone(), source })?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig { path: path.clone(), source })?
        }
        None => match kube::Config::incluster() {
            Ok(in_cluster) => in_cluster,
            Err(in_cluster_error) => match Kubeconfig::from_env() {
                Ok(Some(file)) => kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                    .await
                    .map_err(|source| Error::KubeconfigEnv { source })?,
                Ok(None) => return Err(Error::NoCredentials { source: in_cluster_error }),
                Err(source) => return Err(Error::KubeconfigEnv { source }),
            },
        },
    };
    kube_config.connect_timeout = Some(CONNECT_TIMEOUT);
    kube_config.read_timeout = Some(READ_TIMEOUT);
    // Count the read timeout from each request, not from when a pooled
    // connection went idle.
    kube_config.reset_reader_on_write = true;
    kube::Client::try_from(kube_config).map_err(Error::Client)
}

/// kube's TLS needs a process-wide rustls provider when more than one is
/// compiled into the binary; ring is the one the workspace builds with.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing the race to another installer is fine: a provider is set.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
