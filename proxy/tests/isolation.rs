//! Tenant isolation: what a tool controls (its route, the DNS its route
//! names, its responses) never reaches the edge itself, other tools, or the
//! requests that follow on a client's connection.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use dynamicproxy_proxy::Config;
use dynamicproxy_test_support::eventually;
use http_body_util::Full;
use hyper::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A backend on `ip` that answers `name` to every request and closes the
/// connection (so the proxy pools nothing), counting the connections it accepted.
struct CountingBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl CountingBackend {
    async fn start(bind: SocketAddr, name: &'static str) -> CountingBackend {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let _ = read_head(&mut stream).await;
                    let response =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}", name.len());
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        CountingBackend { addr, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Reads one request or response head (up to the blank line).
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Reads one response with a Content-Length body: (status, lower-cased head, body).
async fn read_response(stream: &mut TcpStream) -> (u16, String, String) {
    let head = read_head(stream).await.to_ascii_lowercase();
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; length];
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut body)).await;
    (status_of(&head), head, String::from_utf8_lossy(&body).into_owned())
}

/// The A records of one name and their TTL.
type Answer = (Vec<Ipv4Addr>, u32);

/// A small DNS server on UDP: answers A queries for the names it knows with
/// a chosen TTL, NXDOMAIN for the rest, and can stop answering (an outage).
#[derive(Clone)]
struct DnsServer {
    addr: SocketAddr,
    answers: Arc<Mutex<HashMap<String, Answer>>>,
    silent: Arc<AtomicBool>,
    /// Milliseconds to wait before each answer (a slow DNS server).
    delay_ms: Arc<AtomicU64>,
    queries: Arc<Mutex<HashMap<String, usize>>>,
}

impl DnsServer {
    async fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = DnsServer {
            addr: socket.local_addr().unwrap(),
            answers: Arc::default(),
            silent: Arc::default(),
            delay_ms: Arc::default(),
            queries: Arc::default(),
        };
        let this = server.clone();
        let socket = Arc::new(socket);
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                if let Some((name, qtype, reply)) = this.answer(&buf[..n]) {
                    if qtype == 1 {
                        *this.queries.lock().unwrap().entry(name).or_default() += 1;
                    }
                    if !this.silent.load(Ordering::SeqCst) {
                        let (socket, delay) = (socket.clone(), this.delay_ms.load(Ordering::SeqCst));
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                            let _ = socket.send_to(&reply, peer).await;
                        });
                    }
                }
            }
        });
        server
    }

    fn set(&self, name: &str, ip: Ipv4Addr, ttl: u32) {
        self.set_all(name, &[ip], ttl);
    }

    fn set_all(&self, name: &str, ips: &[Ipv4Addr], ttl: u32) {
        self.answers.lock().unwrap().insert(name.to_string(), (ips.to_vec(), ttl));
    }

    /// A queries received for `name`.
    fn queries(&self, name: &str) -> usize {
        self.queries.lock().unwrap().get(name).copied().unwrap_or(0)
    }

    /// The reply to one query: the question copied, then the A records.
    fn answer(&self, query: &[u8]) -> Option<(String, u16, Vec<u8>)> {
        if query.len() < 12 {
            return None;
        }
        let mut at = 12;
        let mut labels = Vec::new();
        loop {
            let len = *query.get(at)? as usize;
            at += 1;
            if len == 0 {
                break;
            }
            labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
            at += len;
        }
        let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
        let question_end = at + 4;
        let name = labels.join(".");
        let known = self.answers.lock().unwrap().get(&name).cloned();
        let mut reply = Vec::with_capacity(64);
        reply.extend_from_slice(&query[0..2]);
        let rcode = if known.is_some() { 0 } else { 3 };
        reply.extend_from_slice(&[0x81, 0x80 | rcode]);
        let (ips, ttl) = known.filter(|_| qtype == 1).unwrap_or_default();
        reply.extend_from_slice(&[0, 1, 0, ips.len() as u8, 0, 0, 0, 0]);
        reply.extend_from_slice(query.get(12..question_end)?);
        for ip in ips {
            reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
            reply.extend_from_slice(&ttl.to_be_bytes());
            reply.extend_from_slice(&[0, 4]);
            reply.extend_from_slice(&ip.octets());
        }
        Some((name, qtype, reply))
    }
}

#[tokio::test]
async fn backend_in_a_denied_network_is_never_connected() {
    let backend = CountingBackend::start("127.0.0.1:0".parse().unwrap(), "edge").await;
    let proxy = Proxy::start_enforcing(Config::default(), |_| {}).await;
    proxy.set_route("evil", ".*", &format!("http://{}", backend.addr)).await;
    let got = get(proxy.http, "evil.toolforge.org", "/maintenance?enabled=true", &[]).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.header("x-dynamicproxy-reason"), Some("denied-backend"));
    assert!(got.body.contains("never connects to"), "{}", got.body);
    assert_eq!(backend.accepted(), 0, "the backend saw a connection");
}

#[tokio::test]
async fn name_resolving_into_a_denied_network_is_refused() {
    let dns = DnsServer::start().await;
    dns.set("evil.dnstest", Ipv4Addr::LOCALHOST, 60);
    let backend = CountingBackend::start("127.0.0.1:0".parse().unwrap(), "edge").await;
    let config = Config { dns_servers: vec![dns.addr.to_string()], ..Config::default() };
    let proxy = Proxy::start_enforcing(config, |_| {}).await;
    proxy.set_route("evil", ".*", &format!("http://evil.dnstest:{}", backend.addr.port())).await;
    let got = get(proxy.http, "evil.toolforge.org", "/", &[]).await;
    assert_eq!((got.status, got.header("x-dynamicproxy-reason")), (502, Some("denied-backend")));
    assert_eq!(dns.queries("evil.dnstest"), 1, "resolved through the configured DNS server");
    assert_eq!(backend.accepted(), 0, "the backend saw a connection");
}

#[tokio::test]
async fn denied_addresses_among_a_names_answers_are_skipped() {
    let dns = DnsServer::start().await;
    let denied = CountingBackend::start("127.0.0.1:0".parse().unwrap(), "edge").await;
    let allowed = CountingBackend::start(SocketAddr::new([127, 0, 0, 2].into(), denied.addr.port()), "tool").await;
    // The denied address first: a rebinding answer mixing the edge with a real address.
    dns.set_all("mixed.dnstest", &[Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)], 60);
    let config = Config {
        dns_servers: vec![dns.addr.to_string()],
        denied_backend_networks: vec!["127.0.0.1/32".into()],
        ..Config::default()
    };
    let proxy = Proxy::start_enforcing(config, |_| {}).await;
    proxy.set_route("mixed", ".*", &format!("http://mixed.dnstest:{}", denied.addr.port())).await;
    for _ in 0..3 {
        let got = get(proxy.http, "mixed.toolforge.org", "/", &[]).await;
        assert_eq!((got.status, got.body.as_str()), (200, "tool"));
    }
    assert_eq!((denied.accepted(), allowed.accepted()), (0, 3));
}

#[tokio::test]
async fn backend_names_follow_ttl_and_survive_a_dns_outage() {
    let dns = DnsServer::start().await;
    let a = CountingBackend::start("127.0.0.1:0".parse().unwrap(), "A").await;
    let b = CountingBackend::start(SocketAddr::new([127, 0, 0, 2].into(), a.addr.port()), "B").await;
    dns.set("web.dnstest", Ipv4Addr::new(127, 0, 0, 1), 1);
    let config = Config { dns_servers: vec![dns.addr.to_string()], ..Config::default() };
    let proxy = Proxy::start(config).await;
    proxy.set_route("dns", ".*", &format!("http://web.dnstest:{}", a.addr.port())).await;
    let got = get(proxy.http, "dns.toolforge.org", "/", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (200, "A"));

    // The answer changes: after its 1 s TTL new connections go to the new address.
    dns.set("web.dnstest", Ipv4Addr::new(127, 0, 0, 2), 1);
    eventually(Duration::from_secs(10), "new DNS answer used after the TTL", || async {
        (get(proxy.http, "dns.toolforge.org", "/", &[]).await.body == "B").then_some(())
    })
    .await;

    // DNS stops answering: the last answer keeps serving past its TTL.
    dns.silent.store(true, Ordering::SeqCst);
    let asked = dns.queries("web.dnstest");
    eventually(Duration::from_secs(15), "DNS asked again while silent", || async {
        let got = get(proxy.http, "dns.toolforge.org", "/", &[]).await;
        assert_eq!((got.status, got.body.as_str()), (200, "B"), "stale answer served during the outage");
        (dns.queries("web.dnstest") > asked).then_some(())
    })
    .await;
    let got = get(proxy.http, "dns.toolforge.org", "/", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (200, "B"));
    let on_a = a.accepted();
    let _ = get(proxy.http, "dns.toolforge.org", "/", &[]).await;
    assert_eq!((a.accepted(), b.accepted() > 1), (on_a, true), "new connections go to the new address only");
}

#[tokio::test]
async fn failed_lookups_are_cached_briefly() {
    let dns = DnsServer::start().await;
    let config = Config { dns_servers: vec![dns.addr.to_string()], ..Config::default() };
    let proxy = Proxy::start(config).await;
    proxy.set_route("gone", ".*", "http://gone.dnstest:8000").await;
    for _ in 0..3 {
        let got = get(proxy.http, "gone.toolforge.org", "/", &[]).await;
        assert_eq!((got.status, got.header("x-dynamicproxy-reason")), (502, Some("backend-unreachable")));
    }
    assert_eq!(dns.queries("gone.dnstest"), 1, "one query for three requests");
}

#[tokio::test]
async fn every_error_page_names_its_reason() {
    let proxy = Proxy::start(Config::default()).await;
    let got = get(proxy.http, "nothing.toolforge.org", "/", &[]).await;
    assert_eq!((got.status, got.header("x-dynamicproxy-reason")), (503, Some("no-route")));
    assert!(got.body.contains("No webservice"), "{}", got.body);
    let got = get(proxy.http, "nothing.toolforge.org", "/", &[("user-agent", "")]).await;
    assert_eq!((got.status, got.header("x-dynamicproxy-reason")), (403, Some("blocked")));
    let raw = raw(proxy.http, b"GET / HTTP/1.1\r\nHost: a b\r\nUser-Agent: t\r\n\r\n").await.to_ascii_lowercase();
    assert_eq!(status_of(&raw), 400);
    assert!(raw.contains("x-dynamicproxy-reason: bad-request"), "{raw}");
    proxy.handle.set_maintenance(true);
    let got = get(proxy.http, "nothing.toolforge.org", "/", &[]).await;
    assert_eq!((got.status, got.header("x-dynamicproxy-reason")), (503, Some("maintenance")));

    let banned = Proxy::start(Config { banned_cidrs: vec!["127.0.0.1".into()], ..Config::default() }).await;
    let got = get(banned.http, "nothing.toolforge.org", "/", &[]).await;
    assert_eq!((got.status, got.header("x-dynamicproxy-reason")), (403, Some("banned")));
    let limited = Proxy::start(Config { rate_limit_per_second: 1, ..Config::default() }).await;
    let mut reasons = Vec::new();
    for _ in 0..3 {
        let got = get(limited.http, "nothing.toolforge.org", "/", &[]).await;
        reasons.push(got.header("x-dynamicproxy-reason").unwrap_or("").to_string());
    }
    assert!(reasons.iter().any(|r| r == "rate-limited"), "{reasons:?}");
}

/// h2csmuggler's first request: an `Upgrade: h2c` the backend might accept.
const H2C_UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: h2csmuggler\r\n\
    Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n";

#[tokio::test]
async fn h2c_upgrade_is_forwarded_without_the_upgrade_and_later_requests_are_checked() {
    let backend = Backend::echo("b").await;
    let log = std::env::temp_dir().join(format!("proxy-h2c-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let proxy = Proxy::start(Config { access_log: log.display().to_string(), ..Config::default() }).await;
    proxy.set_route("foo", ".*", &backend.url()).await;

    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    stream.write_all(H2C_UPGRADE).await.unwrap();
    let (status, _, body) = read_response(&mut stream).await;
    assert_eq!(status, 200, "{body}");
    for gone in ["upgrade:", "http2-settings:", "connection:"] {
        assert!(!body.contains(gone), "{gone} reached the backend:\n{body}");
    }
    // The same connection, a request without a User-Agent: still checked.
    stream.write_all(b"GET /second HTTP/1.1\r\nHost: foo.toolforge.org\r\n\r\n").await.unwrap();
    let (status, head, _) = read_response(&mut stream).await;
    assert_eq!(status, 403, "{head}");
    assert!(head.contains("x-dynamicproxy-reason: blocked"), "{head}");
    assert_eq!(backend.hits(), 1);
    eventually(Duration::from_secs(5), "second request in the access log", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines().any(|l| l.contains("/second") && l.contains(" 403 ")).then_some(())
    })
    .await;
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn backend_switching_to_h2c_gets_no_tunnel() {
    // A backend that accepts the h2c upgrade and then reads whatever follows.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let after_switch = Arc::new(Mutex::new(Vec::<u8>::new()));
    let seen = after_switch.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let _ = read_head(&mut s).await;
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                    .await;
                let mut buf = [0u8; 1024];
                while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
                    if n == 0 {
                        break;
                    }
                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    let proxy = Proxy::start(Config::default()).await;
    proxy.set_route("foo", ".*", &format!("http://{addr}")).await;

    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    stream.write_all(H2C_UPGRADE).await.unwrap();
    let (status, head, _) = read_response(&mut stream).await;
    assert_eq!(status, 502, "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nsmuggled").await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the proxy closed the connection");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(after_switch.lock().unwrap().is_empty(), "bytes tunnelled to the backend");
}

#[tokio::test]
async fn host_is_normalised_and_client_forwarding_headers_dropped() {
    let backend = Backend::echo("b").await;
    let proxy = Proxy::start(Config { default_backend: Some(backend.url()), ..Config::default() }).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    let got = get(
        proxy.http,
        "Foo.Toolforge.ORG:80",
        "/",
        &[("forwarded", "for=10.9.9.9;proto=https"), ("x-real-ip", "10.9.9.9")],
    )
    .await;
    assert_eq!(got.echoed("host"), Some("foo.toolforge.org"), "{}", got.body);
    assert_eq!(got.echoed("forwarded"), None, "{}", got.body);
    assert_eq!(got.echoed("x-real-ip"), None, "{}", got.body);
    let got = get(proxy.http, "Tools.WMFlabs.org", "/foo/", &[]).await;
    assert_eq!(got.echoed("host"), Some("tools.wmflabs.org"), "{}", got.body);
}

#[tokio::test]
async fn service_worker_allowed_is_hidden() {
    let backend = Backend::start(Arc::new(|_req| {
        Box::pin(async move {
            Response::builder()
                .header("service-worker-allowed", "/")
                .header("x-kept", "yes")
                .body(Full::new(Bytes::from_static(b"sw")))
                .unwrap()
        })
    }))
    .await;
    let proxy = Proxy::start(Config::default()).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    let got = get(proxy.http, "foo.toolforge.org", "/sw.js", &[]).await;
    assert_eq!((got.status, got.header("x-kept")), (200, Some("yes")));
    assert_eq!(got.header("service-worker-allowed"), None);
}

#[tokio::test]
async fn concurrent_connections_share_one_lookup() {
    let dns = DnsServer::start().await;
    let backend = CountingBackend::start("127.0.0.1:0".parse().unwrap(), "ok").await;
    dns.set("busy.dnstest", Ipv4Addr::LOCALHOST, 60);
    dns.delay_ms.store(300, Ordering::SeqCst);
    let config = Config { dns_servers: vec![dns.addr.to_string()], ..Config::default() };
    let proxy = Proxy::start(config).await;
    proxy.set_route("busy", ".*", &format!("http://busy.dnstest:{}", backend.addr.port())).await;
    let requests = (0..20).map(|_| get(proxy.http, "busy.toolforge.org", "/", &[]));
    for got in futures::future::join_all(requests).await {
        assert_eq!((got.status, got.body.as_str()), (200, "ok"));
    }
    assert_eq!(backend.accepted(), 20, "one backend connection per request");
    // One lookup; the resolver retransmits after 1 s, which a loaded machine
    // (the DNS server shares the test's thread with 20 clients) can reach.
    let queries = dns.queries("busy.dnstest");
    assert!((1..=2).contains(&queries), "one DNS lookup for 20 new connections, not {queries}");
}
