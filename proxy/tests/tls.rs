//! HTTPS with real TLS clients (curl, openssl s_client, rustls): SNI,
//! HTTP/2, certificate hot reload, HTTP→HTTPS redirects, HSTS.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::pki::{Pki, tls_connector};
use common::*;
use dynamicproxy_proxy::Config;
use dynamicproxy_test_support::eventually;
use http_body_util::{BodyExt, Full};
use hyper::Response;

/// The organisation of the certificate served for `sni` (None: no SNI).
async fn served_org(port: u16, sni: Option<&str>) -> String {
    let sni = match sni {
        Some(name) => format!("-servername {name}"),
        None => "-noservername".into(),
    };
    let script = format!(
        "openssl s_client -connect 127.0.0.1:{port} {sni} </dev/null 2>/dev/null | openssl x509 -noout -subject -nameopt sep_multiline"
    );
    let out =
        tokio::task::spawn_blocking(move || Command::new("sh").arg("-c").arg(script).output().unwrap()).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find_map(|l| l.trim().strip_prefix("O=")).unwrap_or("").to_string()
}

/// curl over HTTPS: (status, http version, headers, body).
async fn curl(ca: &Path, host: &str, port: u16, path: &str, extra: &[&str]) -> (u16, String, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-S", "--max-time", "10", "-A", "curl-test", "-D", "-", "-w", "\n%{http_code} %{http_version}"])
        .arg("--cacert")
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .args(extra)
        .arg(format!("https://{host}:{port}{path}"));
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "curl failed: {} {text}", String::from_utf8_lossy(&out.stderr));
    let (rest, last) = text.rsplit_once('\n').unwrap();
    let (code, version) = last.split_once(' ').unwrap();
    let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    (code.parse().unwrap(), version.to_string(), headers.to_ascii_lowercase(), body.to_string())
}

async fn tls_proxy(pki: &Pki, pairs: Vec<(PathBuf, PathBuf)>) -> (Backend, Proxy) {
    let backend = Backend::start(Arc::new(|req| {
        Box::pin(async move {
            let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
            let cookies: Vec<&str> = req.headers().get_all("cookie").iter().filter_map(|v| v.to_str().ok()).collect();
            let mut r = Response::builder()
                .header("x-backend-cookies", cookies.join("|"))
                .header(
                    "x-backend-proto",
                    req.headers().get("x-forwarded-proto").cloned().unwrap_or("-".parse().unwrap()),
                )
                .header("content-type", "text/plain")
                // A backend's own is replaced by the proxy's.
                .header("strict-transport-security", "max-age=1");
            if req.uri().path() == "/redirect" {
                r = r.status(302).header("location", format!("http://{host}/next"));
            }
            r.body(Full::new(Bytes::from(format!(
                "backend saw {} {}",
                req.version() == http::Version::HTTP_11,
                req.uri()
            ))))
            .unwrap()
        })
    }))
    .await;
    let _ = pki;
    let config = Config {
        tls_cert: pairs.iter().map(|p| p.0.clone()).collect(),
        tls_key: pairs.iter().map(|p| p.1.clone()).collect(),
        ..Config::default()
    };
    let proxy = Proxy::start(config).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    (backend, proxy)
}

#[tokio::test]
async fn sni_picks_certificates_with_a_default_and_h2_is_served() {
    let pki = Pki::new("sni");
    let a = pki.leaf("a", "first", &["*.toolforge.org", "toolforge.org"]);
    let b = pki.leaf("b", "second", &["other.example"]);
    let (_backend, proxy) = tls_proxy(&pki, vec![a, b]).await;
    let port = proxy.https.unwrap().port();

    assert_eq!(served_org(port, Some("foo.toolforge.org")).await, "first");
    assert_eq!(served_org(port, Some("other.example")).await, "second");
    assert_eq!(served_org(port, Some("unknown.example")).await, "first", "default is the first pair");
    assert_eq!(served_org(port, None).await, "first");

    let (status, version, headers, body) = curl(&pki.ca(), "foo.toolforge.org", port, "/x?y=1", &["--http2"]).await;
    assert_eq!((status, version.as_str()), (200, "2"), "h2 negotiated by ALPN");
    assert_eq!(body, "backend saw true /x?y=1", "upstream stays HTTP/1.1, URI unchanged");
    assert!(headers.contains("strict-transport-security: max-age=31622400"), "{headers}");
    assert_eq!(headers.matches("strict-transport-security").count(), 1, "{headers}");
    assert!(headers.contains("x-backend-proto: https"), "{headers}");

    // Cookie fields of HTTP/2 reach the HTTP/1.1 backend as one header.
    let cookies = ["--http2", "-H", "Cookie: a=1", "-H", "Cookie: b=2"];
    let (status, version, headers, _) = curl(&pki.ca(), "foo.toolforge.org", port, "/", &cookies).await;
    assert_eq!((status, version.as_str()), (200, "2"));
    assert!(headers.contains("x-backend-cookies: a=1; b=2\r\n"), "{headers}");

    let (status, version, headers, _) = curl(&pki.ca(), "foo.toolforge.org", port, "/", &["--http1.1"]).await;
    assert_eq!((status, version.as_str()), (200, "1.1"));
    assert!(headers.contains("strict-transport-security: max-age=31622400"));
    assert_eq!(headers.matches("strict-transport-security").count(), 1, "{headers}");

    // Location: http://<host>/... from the backend follows the client to https.
    // The backend sees the normalised Host (no port), as behind nginx's `Host $host`.
    let (status, _, headers, _) = curl(&pki.ca(), "foo.toolforge.org", port, "/redirect", &["--http2"]).await;
    assert_eq!(status, 302);
    assert!(headers.contains("location: https://foo.toolforge.org/next"), "{headers}");

    // TLS 1.2 is accepted, 1.1 is not.
    let (status, ..) = curl(&pki.ca(), "foo.toolforge.org", port, "/", &["--tls-max", "1.2"]).await;
    assert_eq!(status, 200);
    let old = Command::new("curl")
        .args(["-s", "--max-time", "5", "--tlsv1.1", "--tls-max", "1.1", "-k"])
        .arg(format!("https://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    assert!(!old.status.success(), "TLS 1.1 must be refused");
}

#[tokio::test]
async fn plain_http_redirects_to_https_except_health_and_acme() {
    let pki = Pki::new("redirect");
    let a = pki.leaf("a", "first", &["*.toolforge.org"]);
    let (backend, proxy) = tls_proxy(&pki, vec![a]).await;
    let https_port = proxy.https.unwrap().port();
    let got = get(proxy.http, "foo.toolforge.org", "/a/b?c=d", &[]).await;
    assert_eq!(got.status, 301);
    assert_eq!(got.header("location"), Some(format!("https://foo.toolforge.org:{https_port}/a/b?c=d").as_str()));
    let got = send(proxy.http, "HEAD", "foo.toolforge.org", "/", &[], Bytes::new()).await;
    assert_eq!(got.status, 301);
    let got = send(proxy.http, "POST", "foo.toolforge.org", "/form", &[], Bytes::from("x=1")).await;
    assert_eq!(got.status, 308);
    assert_eq!(got.header("location"), Some(format!("https://foo.toolforge.org:{https_port}/form").as_str()));
    assert_eq!(backend.hits(), 0);
    assert_eq!(get(proxy.http, "foo.toolforge.org", "/.well-known/healthz", &[]).await.status, 200);
    let got = get(proxy.http, "foo.toolforge.org", "/.well-known/acme-challenge/token", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (200, "backend saw true /.well-known/acme-challenge/token"));
    // The backend's own only: the proxy adds none over plain HTTP.
    assert_eq!(got.headers.get_all("strict-transport-security").iter().collect::<Vec<_>>(), ["max-age=1"]);
}

#[tokio::test]
async fn certificates_reload_without_dropping_connections_and_bad_files_are_refused() {
    let pki = Pki::new("reload");
    let a = pki.leaf("a", "first", &["*.toolforge.org"]);
    let (_backend, proxy) = tls_proxy(&pki, vec![a]).await;
    let port = proxy.https.unwrap().port();
    assert_eq!(served_org(port, Some("foo.toolforge.org")).await, "first");

    // An open HTTP/1.1 connection from a rustls client.
    let connector = tls_connector(&pki.ca(), &[]);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = connector.connect("foo.toolforge.org".try_into().unwrap(), tcp).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let ask = |sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>| {
        let req = hyper::Request::get("/held")
            .header("host", "foo.toolforge.org")
            .header("user-agent", "t")
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.send_request(req)
    };
    let r = ask(&mut sender).await.unwrap();
    assert_eq!(r.status(), 200);
    r.into_body().collect().await.unwrap();

    // Replace the certificate on disk: new connections see it, the open one keeps working.
    pki.leaf("a", "renewed", &["*.toolforge.org"]);
    eventually(Duration::from_secs(5), "renewed certificate served", || async {
        (served_org(port, Some("foo.toolforge.org")).await == "renewed").then_some(())
    })
    .await;
    let r = ask(&mut sender).await.expect("the open connection survives the reload");
    assert_eq!(r.status(), 200);
    r.into_body().collect().await.unwrap();

    // A broken certificate file: the reload fails and the old certificate keeps serving.
    let (_, failed_before) = proxy.handle.certificate_reloads();
    std::fs::write(pki.dir.join("a.pem"), "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        .unwrap();
    let handle = proxy.handle.clone();
    eventually(Duration::from_secs(5), "failed reload noticed", || {
        let failed = handle.certificate_reloads().1;
        async move { (failed > failed_before).then_some(()) }
    })
    .await;
    assert_eq!(served_org(port, Some("foo.toolforge.org")).await, "renewed");
    let (status, ..) = curl(&pki.ca(), "foo.toolforge.org", port, "/", &[]).await;
    assert_eq!(status, 200);

    // SIGHUP-equivalent reload after a good file is back.
    pki.leaf("a", "third", &["*.toolforge.org"]);
    proxy.handle.reload_certificates();
    eventually(Duration::from_secs(5), "third certificate served", || async {
        (served_org(port, Some("foo.toolforge.org")).await == "third").then_some(())
    })
    .await;
}

/// One HTTP/2 request over TLS from hyper's h2 client, with `:authority`
/// from `authority` and, when given, a separate `host` header: (status,
/// reason header, body).
async fn h2_get(ca: &Path, port: u16, authority: &str, host: Option<&str>) -> (u16, String, String) {
    let connector = tls_connector(ca, &[b"h2"]);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = connector.connect("foo.toolforge.org".try_into().unwrap(), tcp).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::get(format!("https://{authority}/h2")).header("user-agent", "h2-test");
    if let Some(host) = host {
        req = req.header("host", host);
    }
    let response = sender.send_request(req.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let status = response.status().as_u16();
    let reason = response.headers().get("x-dynamicproxy-reason").map_or("", |v| v.to_str().unwrap()).to_string();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, reason, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn http2_host_comes_from_authority_and_must_agree_with_it() {
    let pki = Pki::new("h2host");
    let a = pki.leaf("a", "first", &["*.toolforge.org"]);
    let backend = Backend::echo("b").await;
    let config = Config { tls_cert: vec![a.0], tls_key: vec![a.1], ..Config::default() };
    let proxy = Proxy::start(config).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    let port = proxy.https.unwrap().port();

    // :authority only, mixed case with a port: the backend sees the normalised host.
    let (status, _, body) = h2_get(&pki.ca(), port, &format!("Foo.Toolforge.org:{port}"), None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\nhost: foo.toolforge.org\n"), "{body}");
    // A host header naming the same host is fine.
    let (status, _, body) = h2_get(&pki.ca(), port, "foo.toolforge.org", Some("FOO.toolforge.org:443")).await;
    assert_eq!(status, 200, "{body}");
    // A host header naming another tool is refused before routing.
    let hits = backend.hits();
    let (status, reason, _) = h2_get(&pki.ca(), port, "foo.toolforge.org", Some("other.toolforge.org")).await;
    assert_eq!((status, reason.as_str()), (400, "bad-request"));
    assert_eq!(backend.hits(), hits, "the backend saw the request");
}

/// Records the OCSP response the server staples, then verifies as usual.
#[derive(Debug)]
struct StapleCatcher {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    staple: std::sync::Mutex<Option<Vec<u8>>>,
}

impl rustls::client::danger::ServerCertVerifier for StapleCatcher {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.staple.lock().unwrap() = Some(ocsp_response.to_vec());
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The OCSP response stapled in a handshake with `version` (rustls clients
/// always ask for status); empty when none was stapled.
async fn stapled(ca: &Path, port: u16, version: &'static rustls::SupportedProtocolVersion) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(ca).unwrap();
    for cert in rustls_pemfile::certs(&mut &ca[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap();
    let catcher = Arc::new(StapleCatcher { inner, staple: std::sync::Mutex::new(None) });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(catcher.clone())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector.connect("foo.toolforge.org".try_into().unwrap(), tcp).await.expect("handshake");
    catcher.staple.lock().unwrap().take().expect("certificate verified")
}

#[tokio::test]
async fn ocsp_response_next_to_the_certificate_is_stapled_and_reread_with_it() {
    let pki = Pki::new("ocsp");
    let (cert, key) = pki.leaf("a", "first", &["*.toolforge.org"]);
    let ocsp = pki.dir.join("a.pem.ocsp");
    let first = pki.ocsp_response(&cert, &ocsp);
    let (_backend, proxy) = tls_proxy(&pki, vec![(cert.clone(), key)]).await;
    let port = proxy.https.unwrap().port();

    // Served byte for byte, in TLS 1.3 (certificate entry) and 1.2 (CertificateStatus).
    assert_eq!(stapled(&pki.ca(), port, &rustls::version::TLS13).await, first);
    assert_eq!(stapled(&pki.ca(), port, &rustls::version::TLS12).await, first);

    // A fresh response is re-read on reload (the SIGHUP / ExecReload path).
    let second = pki.ocsp_response(&cert, &ocsp);
    assert_ne!(first, second);
    proxy.handle.reload_certificates();
    eventually(Duration::from_secs(5), "new OCSP response stapled", || async {
        (stapled(&pki.ca(), port, &rustls::version::TLS13).await == second).then_some(())
    })
    .await;

    // Without the file, nothing is stapled.
    std::fs::remove_file(&ocsp).unwrap();
    proxy.handle.reload_certificates();
    eventually(Duration::from_secs(5), "staple gone", || async {
        stapled(&pki.ca(), port, &rustls::version::TLS13).await.is_empty().then_some(())
    })
    .await;

    // A file that is not an OCSP response fails the reload; the old set keeps serving.
    let (_, failed_before) = proxy.handle.certificate_reloads();
    std::fs::write(&ocsp, b"garbage").unwrap();
    proxy.handle.reload_certificates();
    let handle = proxy.handle.clone();
    eventually(Duration::from_secs(5), "failed reload noticed", || {
        let failed = handle.certificate_reloads().1;
        async move { (failed > failed_before).then_some(()) }
    })
    .await;
    assert!(stapled(&pki.ca(), port, &rustls::version::TLS13).await.is_empty());
}
