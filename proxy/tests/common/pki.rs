//! Test certificates made by the openssl command line: a CA, leaves it
//! signed (DNS and IP SANs), self-signed strangers, and OCSP responses.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// A scratch directory with a CA, removed on drop.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("proxy-pki-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        run_in(
            &dir,
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=TestCA",
        );
        Pki { dir }
    }

    /// Issues `<file>.pem`/`<file>.key` for `names` (IP addresses become IP
    /// SANs), with organisation `org` to tell certificates apart. Files are
    /// replaced whole, so a watcher never reads half of one.
    pub fn leaf(&self, file: &str, org: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        std::fs::write(self.dir.join(format!("{file}.ext")), format!("subjectAltName={}\n", sans(names))).unwrap();
        run_in(
            &self.dir,
            &format!(
                "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout {file}.new.key -out {file}.csr -subj /CN={}/O={org} && \
                 openssl x509 -req -in {file}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {file}.new.pem -days 2 -extfile {file}.ext && \
                 mv {file}.new.key {file}.key && mv {file}.new.pem {file}.pem",
                names[0]
            ),
        );
        (self.dir.join(format!("{file}.pem")), self.dir.join(format!("{file}.key")))
    }

    /// A self-signed end-entity `<file>.pem`/`<file>.key` for `names`: no CA vouches for it.
    pub fn self_signed(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        std::fs::write(self.dir.join(format!("{file}.ext")), format!("subjectAltName={}\n", sans(names))).unwrap();
        run_in(
            &self.dir,
            &format!(
                "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout {file}.key -out {file}.csr -subj /CN={} && \
                 openssl x509 -req -in {file}.csr -signkey {file}.key -out {file}.pem -days 2 -extfile {file}.ext",
                names[0]
            ),
        );
        (self.dir.join(format!("{file}.pem")), self.dir.join(format!("{file}.key")))
    }

    /// A DER OCSP response from the CA about `cert`, written to `out` (replaced whole).
    pub fn ocsp_response(&self, cert: &Path, out: &Path) -> Vec<u8> {
        let script = format!(
            "touch index.txt && openssl ocsp -issuer ca.pem -cert {cert} -reqout ocsp.req -no_nonce && \
             openssl ocsp -index index.txt -rsigner ca.pem -rkey ca.key -CA ca.pem -reqin ocsp.req \
             -respout ocsp.new -ndays 1 && mv ocsp.new {out}",
            cert = cert.display(),
            out = out.display()
        );
        run_in(&self.dir, &script);
        std::fs::read(out).unwrap()
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sans(names: &[&str]) -> String {
    let san: Vec<String> = names
        .iter()
        .map(|n| if n.parse::<std::net::IpAddr>().is_ok() { format!("IP:{n}") } else { format!("DNS:{n}") })
        .collect();
    san.join(",")
}

pub fn run_in(dir: &Path, script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A rustls client (ring) that trusts the certificates in `ca_pem` and
/// offers `alpn` (none: HTTP/1.1).
pub fn tls_connector(ca_pem: &Path, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_pem).unwrap();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}
