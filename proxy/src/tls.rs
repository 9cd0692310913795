//! TLS termination: rustls with TLS 1.2/1.3, ALPN `h2` and `http/1.1`,
//! several certificates chosen by SNI (the first is the default), and
//! reloads that swap certificates for new handshakes only, so open
//! connections are never dropped. A reload that fails keeps the old set.
//!
//! OCSP stapling: a DER OCSP response in `<certificate file>.ocsp` (e.g.
//! `tools.pem.ocsp`, as fetched by `openssl ocsp -respout` or certbot hooks)
//! is stapled to that certificate for clients that ask for status, and
//! re-read with it: a changed `.ocsp` file triggers a reload too.

use std::fmt;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::error::Error;

/// Sessions remembered for resumption by session id (TLS 1.2).
const SESSION_CACHE: usize = 64 * 1024;

/// One loaded certificate chain and key.
struct Loaded {
    key: Arc<CertifiedKey>,
    /// The leaf certificate, to match SNI names against.
    leaf: CertificateDer<'static>,
    /// The certificate file and the leaf's expiry (Unix time), for the metrics.
    expiry: (PathBuf, Option<i64>),
}

/// The certificate set, swapped whole on reload.
struct CertSet {
    entries: Vec<Loaded>,
}

/// Picks the certificate for each handshake from the current set.
pub struct CertStore {
    pairs: Vec<(PathBuf, PathBuf)>,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertSet>>,
    /// Modification times seen at the last load, to notice changed files.
    stamps: RwLock<Vec<Option<SystemTime>>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore").field("pairs", &self.pairs).finish()
    }
}

impl CertStore {
    /// Loads every pair; fails (naming the file) if any is unusable.
    pub fn load(pairs: Vec<(PathBuf, PathBuf)>, provider: Arc<CryptoProvider>) -> Result<Self, Error> {
        let set = load_set(&pairs, &provider)?;
        let stamps = stamps(&pairs);
        Ok(CertStore { pairs, provider, current: RwLock::new(Arc::new(set)), stamps: RwLock::new(stamps) })
    }

    /// Re-reads the files; on error the old certificates keep serving.
    pub fn reload(&self) -> Result<(), Error> {
        let stamps = stamps(&self.pairs);
        let set = load_set(&self.pairs, &self.provider);
        // Remember the stamps even on failure, so a broken file is reported once, not every poll.
        if let Ok(mut seen) = self.stamps.write() {
            *seen = stamps;
        }
        let set = set?;
        if let Ok(mut current) = self.current.write() {
            *current = Arc::new(set);
        }
        Ok(())
    }

    /// True when a file's modification time differs from the last load.
    pub fn changed_on_disk(&self) -> bool {
        let now = stamps(&self.pairs);
        self.stamps.read().map(|seen| *seen != now).unwrap_or(false)
    }

    /// Each serving certificate's file and expiry (Unix time), for the metrics.
    pub fn not_after(&self) -> Vec<(PathBuf, i64)> {
        let set = self.snapshot();
        set.iter().flat_map(|s| &s.entries).filter_map(|e| Some((e.expiry.0.clone(), e.expiry.1?))).collect()
    }

    fn snapshot(&self) -> Option<Arc<CertSet>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

fn stamps(pairs: &[(PathBuf, PathBuf)]) -> Vec<Option<SystemTime>> {
    pairs
        .iter()
        .flat_map(|(c, k)| [c.clone(), k.clone(), ocsp_path(c)])
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Where the stapled OCSP response of certificate file `cert` is looked for.
pub fn ocsp_path(cert: &Path) -> PathBuf {
    let mut name = cert.as_os_str().to_owned();
    name.push(".ocsp");
    PathBuf::from(name)
}

/// The OCSP response next to certificate `cert`, if there is one. Only its
/// outer shape is checked (a DER SEQUENCE): clients verify its content, and
/// the responder is the authority on it. An empty file means none, so a
/// fetch script can truncate it to stop stapling a response gone stale.
fn load_ocsp(cert: &Path) -> Result<Option<Vec<u8>>, Error> {
    let path = ocsp_path(cert);
    let der = match std::fs::read(&path) {
        Ok(der) => der,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Tls { path: path.display().to_string(), reason: e.to_string() }),
    };
    if der.is_empty() {
        return Ok(None);
    }
    if der[0] != 0x30 {
        let reason = "not a DER OCSP response (openssl ocsp -respout writes one)".to_string();
        return Err(Error::Tls { path: path.display().to_string(), reason });
    }
    Ok(Some(der))
}

fn load_set(pairs: &[(PathBuf, PathBuf)], provider: &CryptoProvider) -> Result<CertSet, Error> {
    let mut entries = Vec::with_capacity(pairs.len());
    for (cert_path, key_path) in pairs {
        let tls_err = |path: &PathBuf, reason: String| Error::Tls { path: path.display().to_string(), reason };
        let cert_file = std::fs::File::open(cert_path).map_err(|e| tls_err(cert_path, e.to_string()))?;
        let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut BufReader::new(cert_file))
            .collect::<Result<_, _>>()
            .map_err(|e| tls_err(cert_path, e.to_string()))?;
        let Some(leaf) = chain.first().cloned() else {
            return Err(tls_err(cert_path, "no PEM certificate in file".into()));
        };
        webpki::EndEntityCert::try_from(&leaf).map_err(|e| tls_err(cert_path, format!("bad certificate: {e}")))?;
        let key_file = std::fs::File::open(key_path).map_err(|e| tls_err(key_path, e.to_string()))?;
        let key = rustls_pemfile::private_key(&mut BufReader::new(key_file))
            .map_err(|e| tls_err(key_path, e.to_string()))?
            .ok_or_else(|| tls_err(key_path, "no PEM private key in file".into()))?;
        let signing_key =
            provider.key_provider.load_private_key(key).map_err(|e| tls_err(key_path, format!("bad key: {e}")))?;
        let mut certified = CertifiedKey::new(chain, signing_key);
        certified.ocsp = load_ocsp(cert_path)?;
        certified.keys_match().map_err(|e| tls_err(key_path, format!("key does not match certificate: {e}")))?;
        let expiry = (cert_path.clone(), crate::cert_expiry::not_after(&leaf));
        entries.push(Loaded { key: Arc::new(certified), leaf, expiry });
    }
    if entries.is_empty() {
        return Err(Error::Tls { path: "-".into(), reason: "no certificate configured".into() });
    }
    Ok(CertSet { entries })
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.snapshot()?;
        if let Some(sni) = hello.server_name()
            && let Ok(name) = ServerName::try_from(sni)
        {
            for entry in &set.entries {
                let matches = webpki::EndEntityCert::try_from(&entry.leaf)
                    .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok());
                if matches {
                    return Some(entry.key.clone());
                }
            }
        }
        set.entries.first().map(|e| e.key.clone())
    }
}

/// Accepts TLS connections with the current certificates.
#[derive(Clone)]
pub struct TlsAcceptor {
    inner: tokio_rustls::TlsAcceptor,
}

impl TlsAcceptor {
    /// A server configuration over `store`: TLS 1.2 and 1.3, ALPN h2 and
    /// http/1.1, session resumption by id and by ticket.
    pub fn new(store: Arc<CertStore>, provider: Arc<CryptoProvider>) -> Result<Self, Error> {
        let tls_err = |e: rustls::Error| Error::Tls { path: "-".into(), reason: e.to_string() };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(tls_err)?
            .with_no_client_auth()
            .with_cert_resolver(store);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
        config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(tls_err)?;
        Ok(TlsAcceptor { inner: tokio_rustls::TlsAcceptor::from(Arc::new(config)) })
    }

    /// Runs the handshake.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        // Bounds what a client that stops reading can make the proxy hold.
        self.inner.accept_with(stream, |conn| conn.set_buffer_limit(Some(crate::buffers::TLS_SEND_BUF))).await
    }
}

/// The ring crypto provider, chosen explicitly so other providers linked
/// into the binary cannot make rustls ambiguous.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
