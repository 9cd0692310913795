//! TLS to `https://` backends (SPEC §5 lets tools register them): rustls,
//! certificates verified against the system roots plus `[proxy]
//! backend_ca_file`, SNI from the route's host. An IP literal is sent no SNI
//! (RFC 6066 forbids it) and is verified against the certificate's IP SANs.
//! Only `http/1.1` is offered by ALPN: upstream exchanges are HTTP/1.1.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::{info, warn};

use crate::error::Error;

/// A backend whose certificate does not verify: carried inside the
/// connector's `io::Error` up to the error page and the log.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "backend {host} presented a certificate that does not verify against the system roots and \
     [proxy] backend_ca_file"
)]
pub struct UntrustedCertificate {
    /// The backend host as the route names it.
    pub host: String,
    /// What rustls found wrong.
    #[source]
    pub cause: rustls::Error,
}

/// The client side of backend TLS, shared by every upstream pool.
#[derive(Clone)]
pub struct BackendTls {
    connector: TlsConnector,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTls").finish_non_exhaustive()
    }
}

impl BackendTls {
    /// Trusts the system roots and, when given, every certificate in the PEM
    /// file `ca_file`. Fails (naming the file) when `ca_file` cannot be read
    /// or holds no usable certificate; a system store that cannot be read is
    /// only logged, since `ca_file` alone may be all a deployment needs.
    pub fn load(ca_file: Option<&Path>, provider: Arc<CryptoProvider>) -> Result<Self, Error> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            warn!(%error, "cannot read part of the system certificate store for https backends");
        }
        let (system, _) = roots.add_parsable_certificates(native.certs);
        if let Some(path) = ca_file {
            let added = load_ca_file(path, &mut roots)?;
            info!(system, ca_file = %path.display(), added, "https backends verified against the system roots and the CA file");
        } else {
            info!(system, "https backends verified against the system roots");
        }
        let tls_err = |e: rustls::Error| Error::BackendCa { path: PathBuf::from("-"), reason: e.to_string() };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(tls_err)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(BackendTls { connector: TlsConnector::from(Arc::new(config)) })
    }

    /// Runs the handshake with backend `host` over `io`. A certificate that
    /// does not verify fails with an [`UntrustedCertificate`] inside the error.
    pub async fn handshake<IO>(&self, host: &str, io: IO) -> io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("backend host {host}: {e}")))?;
        self.connector.connect(name, io).await.map_err(|error| match rustls_cause(&error) {
            Some(
                cause @ (rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::InvalidCertRevocationList(_)),
            ) => io::Error::other(UntrustedCertificate { host: host.to_string(), cause: cause.clone() }),
            _ => error,
        })
    }
}

/// Adds every certificate of the PEM file `path` to `roots`; returns how many.
fn load_ca_file(path: &Path, roots: &mut RootCertStore) -> Result<usize, Error> {
    let ca_err = |reason: String| Error::BackendCa { path: path.to_path_buf(), reason };
    let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut &pem[..]).collect::<Result<_, _>>().map_err(|e| ca_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(ca_err("no PEM certificate in file".into()));
    }
    let mut added = 0;
    for cert in certs {
        roots.add(cert).map_err(|e| ca_err(format!("unusable CA certificate: {e}")))?;
        added += 1;
    }
    Ok(added)
}

/// The rustls error behind a failed handshake, if any.
fn rustls_cause(error: &io::Error) -> Option<&rustls::Error> {
    error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// The [`UntrustedCertificate`] inside a connector error, if that is why it failed.
pub fn untrusted_cause(error: &io::Error) -> Option<&UntrustedCertificate> {
    error.get_ref().and_then(|inner| inner.downcast_ref::<UntrustedCertificate>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_or_empty_ca_files_name_the_file() {
        let provider = crate::tls::provider();
        let missing = Path::new("/nonexistent/ca.pem");
        let err = BackendTls::load(Some(missing), provider.clone()).unwrap_err().to_string();
        assert!(err.contains("backend_ca_file") && err.contains("/nonexistent/ca.pem"), "{err}");
        let empty = std::env::temp_dir().join(format!("backend-ca-empty-{}", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = BackendTls::load(Some(&empty), provider.clone()).unwrap_err().to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        let _ = std::fs::remove_file(&empty);
        BackendTls::load(None, provider).unwrap();
    }
}
