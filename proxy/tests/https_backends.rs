//! `https://` backends (SPEC §5 routes): certificates verified against the
//! system roots plus `backend_ca_file`, SNI from the route's host (none for
//! IP literals), keep-alive pooling, a 502 page naming a certificate that
//! does not verify, and `denied_backend_networks` as for `http://`.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::pki::Pki;
use common::*;
use dynamicproxy_proxy::Config;
use http_body_util::Full;
use hyper::Response;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves one certificate and records the SNI of every handshake.
#[derive(Debug)]
struct SniRecorder {
    key: Arc<CertifiedKey>,
    seen: Arc<Mutex<Vec<Option<String>>>>,
}

impl ResolvesServerCert for SniRecorder {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.seen.lock().unwrap().push(hello.server_name().map(str::to_owned));
        Some(self.key.clone())
    }
}

/// A real HTTPS/1.1 backend on 127.0.0.1 answering `tls backend uri=<uri> host=<host>`.
struct TlsBackend {
    addr: SocketAddr,
    /// The SNI of each handshake, in order (`None`: the client sent none).
    sni: Arc<Mutex<Vec<Option<String>>>>,
    /// TCP connections accepted.
    connections: Arc<AtomicUsize>,
    /// Requests served.
    hits: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl TlsBackend {
    async fn start((cert, key): &(PathBuf, PathBuf)) -> TlsBackend {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain =
            rustls_pemfile::certs(&mut &std::fs::read(cert).unwrap()[..]).collect::<Result<Vec<_>, _>>().unwrap();
        let key = rustls_pemfile::private_key(&mut &std::fs::read(key).unwrap()[..]).unwrap().unwrap();
        let signing = provider.key_provider.load_private_key(key).unwrap();
        let sni = Arc::new(Mutex::new(Vec::new()));
        let resolver = SniRecorder { key: Arc::new(CertifiedKey::new(chain, signing)), seen: sni.clone() };
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (connections, hits, stop) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), CancellationToken::new());
        let (c, h, s) = (connections.clone(), hits.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok(p) => p, Err(_) => continue },
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (acceptor, hits) = (acceptor.clone(), h.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let host = req.headers().get("host").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
                        let text = format!("tls backend uri={} host={host}", req.uri());
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text)))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
                });
            }
        });
        TlsBackend { addr, sni, connections, hits, stop }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn sni(&self) -> Vec<Option<String>> {
        self.sni.lock().unwrap().clone()
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn with_ca(ca: &Path) -> Config {
    Config { backend_ca_file: Some(ca.to_path_buf()), ..Config::default() }
}

#[tokio::test]
async fn https_backend_signed_by_the_configured_ca_gets_sni_and_a_pooled_connection() {
    let pki = Pki::new("https-backend-good");
    let backend = TlsBackend::start(&pki.leaf("backend", "b", &["localhost", "127.0.0.1"])).await;
    let proxy = Proxy::start(with_ca(&pki.ca())).await;
    proxy.set_route("foo", ".*", &format!("https://localhost:{}", backend.port())).await;

    let got = get(proxy.http, "foo.toolforge.org", "/a?b=1", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (200, "tls backend uri=/a?b=1 host=foo.toolforge.org"));
    let got = get(proxy.http, "foo.toolforge.org", "/again", &[]).await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(backend.sni(), [Some("localhost".to_string())], "SNI is the route's host");
    assert_eq!(backend.connections.load(Ordering::SeqCst), 1, "the second request reused the pooled connection");

    // An IP literal is sent no SNI and verified against the certificate's IP SAN.
    proxy.set_route("bar", ".*", &format!("https://127.0.0.1:{}", backend.port())).await;
    let got = get(proxy.http, "bar.toolforge.org", "/ip", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (200, "tls backend uri=/ip host=bar.toolforge.org"));
    assert_eq!(backend.sni().last(), Some(&None), "no SNI for an IP address");
}

#[tokio::test]
async fn https_backend_whose_certificate_does_not_verify_gets_a_502_page_naming_it() {
    let pki = Pki::new("https-backend-bad");
    // Named by its IP first: its subject (and so its issuer) is then CN=127.0.0.1, which no system
    // root claims (this machine's store holds a root named CN=localhost).
    let stranger = TlsBackend::start(&pki.self_signed("stranger", &["127.0.0.1", "localhost"])).await;
    let misnamed = TlsBackend::start(&pki.leaf("misnamed", "m", &["other.example", "127.0.0.2"])).await;
    let good = TlsBackend::start(&pki.leaf("good", "g", &["localhost"])).await;
    let proxy = Proxy::start(with_ca(&pki.ca())).await;
    proxy.set_route("unknown-issuer", ".*", &format!("https://localhost:{}", stranger.port())).await;
    proxy.set_route("wrong-name", ".*", &format!("https://localhost:{}", misnamed.port())).await;
    proxy.set_route("wrong-ip", ".*", &format!("https://127.0.0.1:{}", misnamed.port())).await;

    for tool in ["unknown-issuer", "wrong-name", "wrong-ip"] {
        // More than backend_down_after_failures (5) in a row: a certificate
        // problem never turns into `backend-down`, which would hide its cause.
        for _ in 0..7 {
            let got = get(proxy.http, &format!("{tool}.toolforge.org"), "/", &[]).await;
            assert_eq!(got.status, 502, "{tool}: {}", got.body);
            assert_eq!(got.header("x-dynamicproxy-reason"), Some("backend-unreachable"), "{tool}");
            assert!(got.body.contains("could not be verified"), "{tool}: {}", got.body);
            assert!(got.body.contains(tool), "the page names the tool: {}", got.body);
        }
    }
    assert_eq!(stranger.hits.load(Ordering::SeqCst) + misnamed.hits.load(Ordering::SeqCst), 0, "nothing was sent");

    // Signed by the test CA, but the proxy trusts only the system roots.
    let system_only = Proxy::start(Config::default()).await;
    system_only.set_route("private-ca", ".*", &format!("https://localhost:{}", good.port())).await;
    let got = get(system_only.http, "private-ca.toolforge.org", "/", &[]).await;
    assert_eq!((got.status, got.header("x-dynamicproxy-reason")), (502, Some("backend-unreachable")));
    assert!(got.body.contains("could not be verified"), "{}", got.body);
    assert_eq!(good.hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn https_backend_in_a_denied_network_is_never_connected() {
    let pki = Pki::new("https-backend-denied");
    let backend = TlsBackend::start(&pki.leaf("backend", "b", &["localhost", "127.0.0.1"])).await;
    // Default denied_backend_networks: loopback is refused after resolution.
    let proxy = Proxy::start_enforcing(with_ca(&pki.ca()), |_| {}).await;
    for host in ["127.0.0.1", "localhost"] {
        let tool = if host == "localhost" { "byname" } else { "byip" };
        proxy.set_route(tool, ".*", &format!("https://{host}:{}", backend.port())).await;
        let got = get(proxy.http, &format!("{tool}.toolforge.org"), "/", &[]).await;
        assert_eq!((got.status, got.header("x-dynamicproxy-reason")), (502, Some("denied-backend")), "{host}");
    }
    assert_eq!(backend.connections.load(Ordering::SeqCst), 0, "the backend saw a connection");
}
