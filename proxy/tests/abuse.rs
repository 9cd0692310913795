//! Clients that try to exhaust the edge: HTTP/2 settings, stream fan-out,
//! rapid reset and CONTINUATION floods sent as raw frames, and the cap on
//! requests in flight per backend. Memory figures are measured by
//! bench/abuse.sh on a release build, not here.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pki::tls_connector;
use common::*;
use dynamicproxy_proxy::Config;
use dynamicproxy_test_support::eventually;
use http_body_util::{BodyExt, Full};
use hyper::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;

const HOST: &str = "foo.toolforge.org";

/// A self-signed certificate for [`HOST`], trusted by [`h2_connect`].
struct Cert {
    dir: PathBuf,
}

impl Cert {
    fn new(name: &str) -> Cert {
        let dir = std::env::temp_dir().join(format!("proxy-abuse-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
            .args(["-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=foo.toolforge.org"])
            .args(["-addext", "subjectAltName=DNS:foo.toolforge.org", "-addext", "basicConstraints=critical,CA:FALSE"])
            .current_dir(&dir)
            .output()
            .expect("openssl must be installed (scripts/test.sh installs it)");
        assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
        Cert { dir }
    }

    fn config(&self, config: Config) -> Config {
        Config {
            tls_cert: vec![self.dir.join("cert.pem")],
            tls_key: vec![self.dir.join("key.pem")],
            denied_backend_networks: vec![],
            ..config
        }
    }
}

impl Drop for Cert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS connection to the proxy that negotiated `h2`.
async fn h2_connect(cert: &Cert, port: u16) -> TlsStream<TcpStream> {
    let connector = tls_connector(&cert.dir.join("cert.pem"), &[b"h2"]);
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = connector.connect(HOST.try_into().unwrap(), tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls
}

/// A normal HTTP/2 client (hyper) on its own connection.
async fn h2_client(cert: &Cert, port: u16) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tls = h2_connect(cert, port).await;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

async fn h2_get(sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>, path: &str) -> (u16, String) {
    let response = h2_send(sender, h2_request(hyper::Method::GET, path, Bytes::new())).await;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A request for [`HOST`] as a browser would send it (with a User-Agent).
fn h2_request(method: hyper::Method, path: &str, body: Bytes) -> hyper::Request<Full<Bytes>> {
    hyper::Request::builder()
        .method(method)
        .uri(format!("https://{HOST}{path}"))
        .header("user-agent", "abuse-tests/1")
        .body(Full::new(body))
        .unwrap()
}

/// Sends `req` and waits at most 10 s for the response head.
async fn h2_send(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    req: hyper::Request<Full<Bytes>>,
) -> Response<hyper::body::Incoming> {
    tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("answer within 10 s")
        .expect("response")
}

// Raw HTTP/2 frames (RFC 9113 §4.1), for what no well-behaved client sends.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK literal without indexing, indexed name (`index` < 15), short value.
fn literal(index: u8, value: &str) -> Vec<u8> {
    let mut out = vec![index, value.len() as u8];
    out.extend_from_slice(value.as_bytes());
    out
}

/// A GET / header block: static :method GET, :scheme https, :path /, then
/// :authority and user-agent (static index 58: 4-bit prefix 15, then 43).
fn get_block() -> Vec<u8> {
    let mut block = vec![0x82, 0x87, 0x84];
    block.extend(literal(1, HOST));
    block.extend([0x0f, 43, 4]);
    block.extend_from_slice(b"raw2");
    block
}

/// One frame read from the server: (type, flags, stream, payload).
async fn read_frame(io: &mut TlsStream<TcpStream>) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await.ok()?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], stream, payload))
}

/// The server's first SETTINGS, as (identifier, value) pairs.
async fn server_settings(io: &mut TlsStream<TcpStream>) -> Vec<(u16, u32)> {
    io.write_all(PREFACE).await.unwrap();
    io.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    loop {
        let (kind, flags, _, payload) = read_frame(io).await.expect("SETTINGS from the server");
        if kind == SETTINGS && flags & 0x1 == 0 {
            return payload
                .chunks(6)
                .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
                .collect();
        }
    }
}

/// Reads until GOAWAY or the end of the connection; true when either came
/// within `limit`.
async fn closed_by_server(mut reader: tokio::io::ReadHalf<TlsStream<TcpStream>>, limit: Duration) -> bool {
    let read = async {
        let mut head = [0u8; 9];
        loop {
            if reader.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            if head[3] == GOAWAY {
                return;
            }
            let mut payload = vec![0u8; len];
            if reader.read_exact(&mut payload).await.is_err() {
                return;
            }
        }
    };
    tokio::time::timeout(limit, read).await.is_ok()
}

/// A backend that counts requests in flight and holds each one until `release`.
struct HoldingBackend {
    backend: Backend,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    release: watch::Sender<bool>,
}

async fn holding_backend() -> HoldingBackend {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (release, released) = watch::channel(false);
    let (i, p) = (in_flight.clone(), peak.clone());
    let backend = Backend::start(Arc::new(move |_req| {
        let (in_flight, peak, mut released) = (i.clone(), p.clone(), released.clone());
        Box::pin(async move {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let _ = released.wait_for(|r| *r).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            Response::new(Full::new(Bytes::from_static(b"released")))
        })
    }))
    .await;
    HoldingBackend { backend, in_flight, peak, release }
}

/// SPEC-independent bounds a client sees in the proxy's SETTINGS: streams,
/// receive window and header list size (main: 256 streams, 1 MiB window).
#[tokio::test]
async fn h2_settings_bound_streams_window_and_header_list() {
    let cert = Cert::new("settings");
    let proxy = Proxy::start(cert.config(Config::default())).await;
    let mut io = h2_connect(&cert, proxy.https.unwrap().port()).await;
    let settings = server_settings(&mut io).await;
    let get = |id: u16| settings.iter().find(|(k, _)| *k == id).map(|(_, v)| *v);
    let streams = get(0x3).expect("MAX_CONCURRENT_STREAMS is announced");
    assert!(streams <= 100, "MAX_CONCURRENT_STREAMS {streams}");
    let window = get(0x4).unwrap_or(65_535);
    assert!(window <= 64 * 1024, "INITIAL_WINDOW_SIZE {window}");
    let headers = get(0x6).expect("MAX_HEADER_LIST_SIZE is announced");
    assert!(headers <= 64 * 1024, "MAX_HEADER_LIST_SIZE {headers}");
}

/// One HTTP/2 connection asking 100 slow requests at once holds at most 32
/// backend requests; the others queue, and all are answered (main: 100).
#[tokio::test]
async fn h2_connection_fans_out_to_at_most_32_backend_requests() {
    let cert = Cert::new("fanout");
    let held = holding_backend().await;
    let proxy = Proxy::start(cert.config(Config::default())).await;
    proxy.set_route("foo", ".*", &held.backend.url()).await;
    let sender = h2_client(&cert, proxy.https.unwrap().port()).await;
    let requests: Vec<_> = (0..100)
        .map(|i| {
            let mut sender = sender.clone();
            tokio::spawn(async move { h2_get(&mut sender, &format!("/{i}")).await })
        })
        .collect();
    let in_flight = held.in_flight.clone();
    eventually(Duration::from_secs(10), "32 requests at the backend", || {
        let n = in_flight.load(Ordering::SeqCst);
        async move { (n >= 32).then_some(()) }
    })
    .await;
    // Give the other 68 streams time to (wrongly) reach the backend.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(held.peak.load(Ordering::SeqCst), 32, "backend requests in flight from one connection");
    held.release.send_replace(true);
    for request in requests {
        let (status, body) = request.await.unwrap();
        assert_eq!((status, body.as_str()), (200, "released"));
    }
}

/// The HTTP/2 connection lets go of its read, write and HPACK buffers when
/// idle (vendor/h2/PATCHES.md) and takes them again: large bodies both ways
/// (frames written straight from the body), headers that HPACK indexes and
/// then refers to, and pauses between requests all come through byte for byte.
#[tokio::test]
async fn h2_buffers_released_when_idle_are_taken_again_without_a_lost_byte() {
    let cert = Cert::new("buffers");
    let backend = Backend::start(Arc::new(|req: hyper::Request<hyper::body::Incoming>| {
        Box::pin(async move {
            let n: usize = req.uri().path().trim_start_matches('/').parse().unwrap_or(0);
            if req.method() == hyper::Method::POST {
                // An upload: whether every byte arrived in order.
                let got = req.into_body().collect().await.unwrap().to_bytes();
                let intact = got.len() == n && is_pattern(&got);
                return Response::new(Full::new(Bytes::from(format!("{} {intact}", got.len()))));
            }
            let body = pattern(n);
            Response::builder()
                .header("x-size", n.to_string())
                .header("x-same", "a value every response repeats, for the HPACK table")
                .header("x-long", "v".repeat(2000 + n % 3000))
                .body(Full::new(body))
                .unwrap()
        })
    }))
    .await;
    let proxy = Proxy::start(cert.config(Config::default())).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    let mut sender = h2_client(&cert, proxy.https.unwrap().port()).await;
    for (round, size) in [0usize, 1, 16_383, 16_384, 16_385, 1 << 20, 70_000, 5, 3 << 20].into_iter().enumerate() {
        let mut req = h2_request(hyper::Method::GET, &format!("/{size}"), Bytes::new());
        req.headers_mut().insert("x-round", round.into());
        let response = h2_send(&mut sender, req).await;
        assert_eq!(response.status(), 200, "size {size}");
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        assert_eq!(header("x-size"), size.to_string());
        assert_eq!(header("x-same"), "a value every response repeats, for the HPACK table");
        assert_eq!(header("x-long"), "v".repeat(2000 + size % 3000));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), size);
        assert!(is_pattern(&body), "body of {size} bytes corrupted");
        // Idle between requests: the connection drops its buffers and must take them again.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Uploads: the proxy reads them through the buffers it takes again after each pause.
    for size in [1usize, 16_385, 1 << 20] {
        let response = h2_send(&mut sender, h2_request(hyper::Method::POST, &format!("/{size}"), pattern(size))).await;
        let text = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(String::from_utf8_lossy(&text), format!("{size} true"), "upload of {size} bytes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Concurrent streams on the same connection after the pauses.
    let requests: Vec<_> = (0..20)
        .map(|i| {
            let mut sender = sender.clone();
            let req = h2_request(hyper::Method::GET, &format!("/{}", 7000 * i), Bytes::new());
            tokio::spawn(async move { h2_send(&mut sender, req).await.into_body().collect().await.unwrap().to_bytes() })
        })
        .collect();
    for (i, request) in requests.into_iter().enumerate() {
        let body = request.await.unwrap();
        assert_eq!(body.len(), 7000 * i);
        assert!(is_pattern(&body), "concurrent body {i} corrupted");
    }
}

/// `n` bytes, each different from its neighbours, so a lost or repeated chunk shows.
fn pattern(n: usize) -> Bytes {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// Whether `bytes` are [`pattern`]'s, in order.
fn is_pattern(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8)
}

/// Rapid reset (CVE-2023-44487): streams opened and reset at once, by the
/// thousand. The proxy ends the connection with GOAWAY, the backend sees a
/// bounded number of requests, and another client is served meanwhile.
#[tokio::test]
async fn rapid_reset_flood_gets_goaway_and_others_are_served() {
    let cert = Cert::new("reset");
    let backend = Backend::echo("b").await;
    let proxy = Proxy::start(cert.config(Config::default())).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    let port = proxy.https.unwrap().port();

    let mut io = h2_connect(&cert, port).await;
    server_settings(&mut io).await;
    let (reader, mut writer) = tokio::io::split(io);
    let closed = tokio::spawn(closed_by_server(reader, Duration::from_secs(10)));
    let block = get_block();
    let mut sent = 0u32;
    for batch in 0..100u32 {
        let mut burst = Vec::new();
        for i in 0..100u32 {
            let stream = 2 * (batch * 100 + i) + 1;
            burst.extend(frame(HEADERS, END_STREAM | END_HEADERS, stream, &block));
            burst.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
        }
        if writer.write_all(&burst).await.is_err() {
            break;
        }
        sent += 100;
    }
    let mut normal = h2_client(&cert, port).await;
    assert_eq!(h2_get(&mut normal, "/during").await.0, 200, "another client is served");
    assert!(closed.await.unwrap(), "the flooding connection got GOAWAY or was closed");
    let hits = backend.hits();
    eprintln!("rapid reset: {sent} streams sent, {hits} reached the backend");
    assert!(hits <= 200, "{hits} of {sent} reset streams reached the backend");
}

/// CONTINUATION flood (CVE-2024-27316 class): a header block that never
/// ends. The proxy cuts the connection once the block passes the header
/// list limit, nothing reaches the backend, and another client is served.
#[tokio::test]
async fn continuation_flood_is_cut_off_and_others_are_served() {
    let cert = Cert::new("continuation");
    let backend = Backend::echo("b").await;
    let proxy = Proxy::start(cert.config(Config::default())).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    let port = proxy.https.unwrap().port();

    let mut io = h2_connect(&cert, port).await;
    server_settings(&mut io).await;
    let (reader, mut writer) = tokio::io::split(io);
    let closed = tokio::spawn(closed_by_server(reader, Duration::from_secs(10)));
    writer.write_all(&frame(HEADERS, END_STREAM, 1, &get_block())).await.unwrap();
    // 16 KiB CONTINUATION frames of small literal headers, up to 64 MiB.
    let mut payload = Vec::new();
    while payload.len() < 16_000 {
        payload.extend([0x00, 3]);
        payload.extend_from_slice(b"x-a");
        payload.extend([4]);
        payload.extend_from_slice(b"aaaa");
    }
    let continuation = frame(CONTINUATION, 0, 1, &payload);
    let start = Instant::now();
    let mut sent = 0usize;
    while sent < 64 << 20 && start.elapsed() < Duration::from_secs(10) {
        match tokio::time::timeout(Duration::from_secs(2), writer.write_all(&continuation)).await {
            Ok(Ok(())) => sent += continuation.len(),
            _ => break,
        }
    }
    assert!(closed.await.unwrap(), "the flooding connection got GOAWAY or was closed");
    eprintln!("CONTINUATION flood: {} KiB written before the proxy stopped it", sent >> 10);
    assert!(sent < 64 << 20, "the proxy read a 64 MiB header block");
    let mut normal = h2_client(&cert, port).await;
    assert_eq!(h2_get(&mut normal, "/after").await.0, 200, "another client is served");
    assert_eq!(backend.hits(), 1, "only the normal request reached the backend");
}

/// Beyond `max_connections_per_backend`, a request waits
/// `backend_queue_timeout_ms`, then gets 503 with the technical-issues page;
/// once a slot frees, requests pass again (main: the request waited for the
/// backend without bound).
#[tokio::test]
async fn backend_over_capacity_is_503_after_a_short_wait() {
    let held = holding_backend().await;
    let config = Config {
        max_connections_per_backend: 2,
        backend_queue_timeout_ms: 300,
        denied_backend_networks: vec![],
        ..Config::default()
    };
    let proxy = Proxy::start(config).await;
    proxy.set_route("foo", ".*", &held.backend.url()).await;
    let addr = proxy.http;
    let first: Vec<_> = (0..2).map(|_| tokio::spawn(async move { get(addr, HOST, "/held", &[]).await })).collect();
    let in_flight = held.in_flight.clone();
    eventually(Duration::from_secs(10), "2 requests at the backend", || {
        let n = in_flight.load(Ordering::SeqCst);
        async move { (n == 2).then_some(()) }
    })
    .await;

    let start = Instant::now();
    let refused = tokio::time::timeout(Duration::from_secs(5), get(addr, HOST, "/third", &[]))
        .await
        .expect("an answer while the backend is full, not an endless wait");
    let waited = start.elapsed();
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.body.contains("too many requests in progress"), "{}", refused.body);
    assert!(waited >= Duration::from_millis(250), "waited {waited:?} for a slot first");
    if let Some(reason) = refused.header("x-dynamicproxy-reason") {
        assert_eq!(reason, "over-capacity");
    }
    assert_eq!(held.peak.load(Ordering::SeqCst), 2);

    held.release.send_replace(true);
    for request in first {
        assert_eq!(request.await.unwrap().status, 200);
    }
    assert_eq!(get(addr, HOST, "/again", &[]).await.status, 200, "slots are given back");
}
