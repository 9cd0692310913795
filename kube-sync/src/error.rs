//! Errors of the kube-sync crate.

use std::path::PathBuf;

use kube::config::{InClusterError, KubeconfigError};

use crate::config::ConfigError;

/// Why kube-sync could not start. Once running it does not fail: the
/// Kubernetes API and Redis are retried for ever.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `--kubeconfig` could not be read or used.
    #[error("cannot use kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        /// The file given.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: KubeconfigError,
    },
    /// `$KUBECONFIG` names a file that could not be read or used.
    #[error("cannot use $KUBECONFIG: {source}")]
    KubeconfigEnv {
        /// What went wrong.
        #[source]
        source: KubeconfigError,
    },
    /// Neither `--kubeconfig`, an in-cluster service account nor `$KUBECONFIG`.
    #[error(
        "no Kubernetes credentials: no --kubeconfig, not running in a cluster ({source}), and $KUBECONFIG is not set"
    )]
    NoCredentials {
        /// Why the in-cluster configuration was not usable.
        #[source]
        source: InClusterError,
    },
    /// The Kubernetes client could not be built from the configuration.
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// A background task died (a bug): the daemon stops so it gets restarted.
    #[error("kube-sync task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}
