//! Bounds on what one client can hold, through real sockets: the per-client
//! connection cap, refusals at accept, timeouts by phase (keep-alive, request
//! body, send, HTTP/2 idle; the long idle only for slow backends and
//! tunnels), and early answers that reach the client instead of a RST.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use dynamicproxy_proxy::Config;
use dynamicproxy_test_support::eventually;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full};
use hyper::Response;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const HEALTHZ: &[u8] = b"GET /.well-known/healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\n\r\n";

async fn proxy_to(backend: &Backend, config: Config) -> Proxy {
    let proxy = Proxy::start(config).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    proxy
}

/// A backend that answers after `delay`.
async fn slow_backend(delay: Duration) -> Backend {
    Backend::start(Arc::new(move |_req| {
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Response::new(Full::new(Bytes::from_static(b"slow but there\n")))
        })
    }))
    .await
}

/// Reads one response head and a body of at most `limit` bytes already sent,
/// within `within`; the connection is left open.
async fn read_response(stream: &mut TcpStream, within: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&out);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_string))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if body.len() >= length {
                    return;
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// How long the proxy takes to close `stream` (EOF or reset), reading and
/// discarding whatever comes; `None` if still open after `within`.
async fn closed_after(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.split("\r\n\r\n").next()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn refused_count(proxy: &Proxy, reason: &str) -> u64 {
    counter(proxy, &format!("dynamicproxy_proxy_connections_refused_total{{reason=\"{reason}\"}}"))
}

fn timeout_count(proxy: &Proxy, phase: &str) -> u64 {
    counter(proxy, &format!("dynamicproxy_proxy_connection_timeouts_total{{phase=\"{phase}\"}}"))
}

fn counter(proxy: &Proxy, series: &str) -> u64 {
    let prefix = format!("{series} ");
    proxy.metrics_text().lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.parse().ok()).unwrap_or(0)
}

// ---- Point 1: per-client connection cap ----

#[tokio::test]
async fn connections_past_the_per_client_cap_get_429_and_are_counted() {
    let proxy = Proxy::start(Config { max_connections_per_client: 2, ..Config::default() }).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(proxy.http).await.unwrap();
        stream.write_all(HEALTHZ).await.unwrap();
        assert_eq!(status_of(&read_response(&mut stream, Duration::from_secs(5)).await), 200);
        held.push(stream);
    }
    // A third connection from the same address: refused at once, with a status.
    let started = Instant::now();
    let mut third = TcpStream::connect(proxy.http).await.unwrap();
    third.write_all(HEALTHZ).await.unwrap();
    let answer = read_response(&mut third, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 429, "{answer}");
    assert_eq!(header(&answer, "x-dynamicproxy-reason"), Some("rate-limited"), "{answer}");
    assert_eq!(header(&answer, "connection"), Some("close"), "{answer}");
    assert!(closed_after(&mut third, Duration::from_secs(5)).await.is_some(), "refused connection left open");
    assert!(started.elapsed() < Duration::from_secs(2), "refusal took {:?}", started.elapsed());
    assert_eq!(refused_count(&proxy, "per-client"), 1);
    assert_eq!(refused_count(&proxy, "max-connections"), 0);
    // Once one closes, the client may connect again.
    drop(held.pop());
    let mut served = false;
    for _ in 0..100 {
        let answer =
            raw(proxy.http, b"GET /.well-known/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        if status_of(&answer) == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "the closed connection's place was never given back");
}

#[tokio::test]
async fn ipv4_clients_of_a_dual_stack_listener_are_counted_apart() {
    // On `[::]` IPv4 clients arrive as `::ffff:a.b.c.d`; counted by /64 they
    // would all share one count.
    let proxy = Proxy::start_on(
        "[::]:0",
        dynamicproxy_test_support::RedisServer::start(),
        Config { max_connections_per_client: 1, ..Config::default() },
        |_| {},
    )
    .await;
    let port = proxy.http.port();
    let mut held = Vec::new();
    for source in ["127.0.0.1", "127.0.0.2"] {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let mut stream = socket.connect(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await.unwrap();
        stream.write_all(HEALTHZ).await.unwrap();
        let answer = read_response(&mut stream, Duration::from_secs(5)).await;
        assert_eq!(status_of(&answer), 200, "{source}: {answer}");
        held.push(stream);
    }
    // A second connection from 127.0.0.1 is one too many.
    let mut again = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    again.write_all(HEALTHZ).await.unwrap();
    assert_eq!(status_of(&read_response(&mut again, Duration::from_secs(5)).await), 429);
}

// ---- Point 8: load shedding at max_connections ----

#[tokio::test]
async fn at_max_connections_the_backlog_is_drained_with_503() {
    let proxy = Proxy::start(Config { max_connections: 1, ..Config::default() }).await;
    let mut holder = TcpStream::connect(proxy.http).await.unwrap();
    holder.write_all(HEALTHZ).await.unwrap();
    assert_eq!(status_of(&read_response(&mut holder, Duration::from_secs(5)).await), 200);
    // A burst past the limit: every one is answered at once, none waits in the backlog.
    let started = Instant::now();
    let burst: Vec<_> = (0..50)
        .map(|_| {
            let addr = proxy.http;
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let _ = stream.write_all(HEALTHZ).await;
                read_response(&mut stream, Duration::from_secs(5)).await
            })
        })
        .collect();
    for task in burst {
        let answer = task.await.unwrap();
        assert_eq!(status_of(&answer), 503, "{answer}");
        assert_eq!(header(&answer, "x-dynamicproxy-reason"), Some("over-capacity"), "{answer}");
    }
    eprintln!("50 connections past max_connections answered in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(3), "refusals took {:?}", started.elapsed());
    assert_eq!(refused_count(&proxy, "max-connections"), 50);
    // The connection being served is untouched.
    holder.write_all(HEALTHZ).await.unwrap();
    assert_eq!(status_of(&read_response(&mut holder, Duration::from_secs(5)).await), 200);
}

// ---- Point 2: timeouts by phase ----

#[tokio::test]
async fn idle_keepalive_connection_is_closed_but_a_slow_backend_is_awaited() {
    let backend = slow_backend(Duration::from_millis(2500)).await;
    let proxy = proxy_to(&backend, Config { keepalive_timeout_secs: 1, ..Config::default() }).await;
    // Waiting on a backend for longer than the keep-alive idle: not closed.
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: t\r\n\r\n").await.unwrap();
    let answer = read_response(&mut stream, Duration::from_secs(10)).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(answer.ends_with("slow but there\n"), "{answer}");
    // Then idle between requests: closed after the keep-alive timeout (header_timeout is 60 s).
    let closed = closed_after(&mut stream, Duration::from_secs(8)).await;
    let closed = closed.expect("idle keep-alive connection still open after 8 s");
    eprintln!("idle keep-alive connection closed after {closed:?}");
    assert!(closed >= Duration::from_millis(900), "closed too early: {closed:?}");
    assert_eq!(timeout_count(&proxy, "keepalive"), 1);
}

#[tokio::test]
async fn a_paused_request_body_is_cut_off() {
    let backend = Backend::echo("b").await;
    let proxy = proxy_to(&backend, Config { client_body_timeout_secs: 1, ..Config::default() }).await;
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    stream
        .write_all(
            b"POST / HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: t\r\nContent-Length: 100\r\n\r\nonly ten b",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let answer = read_response(&mut stream, Duration::from_secs(8)).await;
    let elapsed = started.elapsed();
    eprintln!("paused body answered after {elapsed:?}: {}", answer.lines().next().unwrap_or("(closed)"));
    assert!(elapsed < Duration::from_secs(6), "a paused body held the connection for {elapsed:?}");
    assert!(closed_after(&mut stream, Duration::from_secs(5)).await.is_some(), "connection left open");
    // A body that keeps coming, however slowly, is not cut.
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: t\r\nContent-Length: 6\r\n\r\n")
        .await
        .unwrap();
    for byte in b"abcdef" {
        tokio::time::sleep(Duration::from_millis(500)).await;
        stream.write_all(&[*byte]).await.unwrap();
    }
    let answer = read_response(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(answer.contains("body-bytes=6"), "{answer}");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off() {
    const SIZE: usize = 64 << 20;
    let body = Bytes::from(vec![b'x'; SIZE]);
    let backend = Backend::start(Arc::new(move |_req| {
        let body = body.clone();
        Box::pin(async move { Response::new(Full::new(body)) })
    }))
    .await;
    let proxy = proxy_to(&backend, Config { send_timeout_secs: 1, ..Config::default() }).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(proxy.http).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: t\r\n\r\n").await.unwrap();
    // Not reading at all for longer than the send timeout...
    tokio::time::sleep(Duration::from_secs(3)).await;
    // ...then what arrives is cut short: the proxy gave up on this client.
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    eprintln!("client that stopped reading got {} KiB of {} MiB", received >> 10, SIZE >> 20);
    assert!(ended.is_ok(), "connection still open");
    assert!(received < SIZE, "the whole response was still delivered after the send timeout");
    eventually(Duration::from_secs(5), "send timeout counted", || async {
        (timeout_count(&proxy, "send") == 1).then_some(())
    })
    .await;
}

// ---- Point 3: a backend's response head is bounded ----

#[tokio::test]
async fn a_backend_response_head_over_8_kib_is_502_and_one_under_passes() {
    let backend = Backend::start(Arc::new(|req| {
        let size: usize = req.uri().path().trim_start_matches('/').parse().unwrap_or(0);
        Box::pin(async move {
            Response::builder().header("x-big", "b".repeat(size)).body(Full::new(Bytes::from_static(b"ok\n"))).unwrap()
        })
    }))
    .await;
    let proxy = proxy_to(&backend, Config::default()).await;
    let under = get_with_head_of(proxy.http, 6000).await;
    assert_eq!(status_of(&under), 200, "{}", &under[..200.min(under.len())]);
    assert_eq!(header(&under, "x-big").map(str::len), Some(6000));
    let over = get_with_head_of(proxy.http, 10_000).await;
    assert_eq!(status_of(&over), 502, "{over}");
    assert!(!over.contains("bbbb"), "the oversized head leaked through: {over}");
}

/// Asks the backend above for a response with an `x-big` header of `size` bytes.
async fn get_with_head_of(proxy: std::net::SocketAddr, size: usize) -> String {
    let request =
        format!("GET /{size} HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: t\r\nConnection: close\r\n\r\n");
    raw(proxy, request.as_bytes()).await
}

// ---- Point 2: WebSocket tunnels keep the long idle ----

#[tokio::test]
async fn an_idle_websocket_outlives_the_keepalive_timeout() {
    let addr = websocket_echo_backend().await;
    let config = Config { keepalive_timeout_secs: 1, http2_idle_timeout_secs: 1, ..Config::default() };
    let proxy = Proxy::start(config).await;
    proxy.set_route("ws", ".*", &format!("http://{addr}")).await;
    let request = websocket_request(&proxy);
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.expect("handshake");
    assert_eq!(response.status(), 101);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ws.send(tokio_tungstenite::tungstenite::Message::text("still here")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "still here");
}

// ---- Point 2: HTTP/2 idle, TLS refusal ----

/// A CA and a certificate it signed for `foo.toolforge.org`, made by openssl.
struct Cert {
    dir: PathBuf,
}

impl Cert {
    fn new(name: &str) -> Cert {
        let dir = std::env::temp_dir().join(format!("proxy-limits-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                -keyout ca.key -out ca.pem -days 2 -subj /CN=TestCA && \
            echo subjectAltName=DNS:foo.toolforge.org > leaf.ext && \
            openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout key.pem -out leaf.csr \
                -subj /CN=foo.toolforge.org && \
            openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem -days 2 \
                -extfile leaf.ext";
        let out = Command::new("sh").arg("-c").arg(script).current_dir(&dir).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Cert { dir }
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

impl Drop for Cert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS connection to `port` that negotiated h2, trusting `ca`.
async fn h2_connect(
    ca: &Path,
    port: u16,
) -> (hyper::client::conn::http2::SendRequest<Empty<Bytes>>, tokio::task::JoinHandle<Result<(), hyper::Error>>) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(ca).unwrap())) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("foo.toolforge.org").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    (sender, tokio::spawn(connection))
}

#[tokio::test]
async fn idle_http2_connection_is_closed_but_an_open_stream_is_awaited() {
    let cert = Cert::new("h2idle");
    let backend = slow_backend(Duration::from_millis(2500)).await;
    let config = Config {
        tls_cert: vec![cert.cert()],
        tls_key: vec![cert.key()],
        http2_idle_timeout_secs: 1,
        ..Config::default()
    };
    let proxy = proxy_to(&backend, config).await;
    let port = proxy.https.unwrap().port();
    let (mut sender, connection) = h2_connect(&cert.ca(), port).await;
    // One stream open for longer than the idle timeout: it is answered.
    let request = http::Request::get(format!("https://foo.toolforge.org:{port}/"))
        .header("user-agent", "t")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request)).await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"slow but there\n");
    // Then no open stream: the proxy closes the connection (GOAWAY) after the idle timeout.
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(8), connection).await;
    assert!(ended.is_ok(), "idle HTTP/2 connection still open after 8 s");
    eprintln!("idle HTTP/2 connection closed after {:?}", started.elapsed());
    assert_eq!(timeout_count(&proxy, "http2-idle"), 1);
}

#[tokio::test]
async fn tls_connections_past_the_per_client_cap_are_closed_before_the_handshake() {
    let cert = Cert::new("tlscap");
    let config = Config {
        tls_cert: vec![cert.cert()],
        tls_key: vec![cert.key()],
        max_connections_per_client: 1,
        ..Config::default()
    };
    let proxy = Proxy::start(config).await;
    let https = proxy.https.unwrap();
    // The first connection holds the client's only place (its handshake may take 10 s).
    let _first = TcpStream::connect(https).await.unwrap();
    eventually(Duration::from_secs(5), "first connection accepted", || async {
        (proxy.metrics_text().contains("dynamicproxy_proxy_connections_open 1")).then_some(())
    })
    .await;
    let mut second = TcpStream::connect(https).await.unwrap();
    let closed = closed_after(&mut second, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "the connection past the cap was kept for a handshake");
    assert_eq!(refused_count(&proxy, "per-client"), 1);
}

// ---- Point 9: early answers reach the client ----

#[tokio::test]
async fn an_early_413_reaches_a_client_still_sending() {
    let backend = Backend::echo("b").await;
    let proxy = proxy_to(&backend, Config { max_body_size: 1000, ..Config::default() }).await;
    // A real client streaming its body: it reports the answer only if the
    // answer arrives before a reset from the proxy's side.
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    for round in 0..30 {
        let chunk = Bytes::from(vec![b'u'; 16 * 1024]);
        let frames = futures::stream::iter(
            (0..256).map(move |_| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(chunk.clone()))),
        );
        let mut request = hyper::Request::post(format!("http://{}/upload", proxy.http))
            .header("host", "foo.toolforge.org")
            .header("user-agent", "t");
        // Even rounds announce the length (413 before the body is read), odd ones are chunked
        // (413 once the limit is passed).
        if round % 2 == 0 {
            request = request.header("content-length", (256 * 16 * 1024).to_string());
        }
        let request = request.body(http_body_util::StreamBody::new(frames)).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
            .await
            .expect("answer within 10 s")
            .unwrap_or_else(|error| panic!("round {round}: {error:?}"));
        assert_eq!(response.status(), 413, "round {round}");
    }
    assert_eq!(backend.hits(), 0);
}
