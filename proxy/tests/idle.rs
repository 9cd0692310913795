//! Idle HTTP/1 keep-alive connections, through real sockets: between
//! requests they hold only their socket (a few KiB each, not hyper's buffers),
//! while keep-alive, pipelining, request bodies and the idle timeouts behave
//! on the wire as before.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pki::{Pki, tls_connector};
use common::*;
use dynamicproxy_proxy::Config;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Connections each memory test holds.
const IDLE: usize = 1000;

const HEALTHZ: &[u8] = b"GET /.well-known/healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\n\r\n";

/// Reads exactly `count` responses (each with a Content-Length) from `stream`.
async fn responses(stream: &mut (impl AsyncRead + Unpin), count: usize) -> Vec<String> {
    let mut pending = Vec::new();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let read = async {
        while out.len() < count {
            let text = String::from_utf8_lossy(&pending).into_owned();
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                    .and_then(|v| v.parse().ok())
                    .expect("a Content-Length");
                if rest.len() >= length {
                    let end = head.len() + 4 + length;
                    out.push(String::from_utf8_lossy(&pending[..end]).into_owned());
                    pending.drain(..end);
                    continue;
                }
            }
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {} of {count} responses", out.len());
            pending.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("responses within 10 s");
    out
}

fn timeouts(proxy: &Proxy, phase: &str) -> u64 {
    let prefix = format!("dynamicproxy_proxy_connection_timeouts_total{{phase=\"{phase}\"}} ");
    proxy.metrics_text().lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// One keep-alive connection that has been answered once and is now idle.
async fn idle_connection(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(HEALTHZ).await.unwrap();
    let answer = responses(&mut stream, 1).await.remove(0);
    assert_eq!(status_of(&answer), 200, "{answer}");
    stream
}

/// Opens `IDLE` connections with `open`, `batch` at a time, after 200 more
/// opened and closed to warm up the allocator and the event loop (so the
/// baseline is the proxy at work); returns them, still open, with the RSS
/// they added per connection, and prints it under `what`.
async fn hold_idle<T, F>(what: &str, batch: usize, open: impl Fn() -> F) -> (Vec<T>, u64)
where
    F: Future<Output = T>,
{
    for _ in 0..200 / batch {
        drop(futures::future::join_all((0..batch).map(|_| open())).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_bytes();
    let mut held = Vec::with_capacity(IDLE);
    for _ in 0..IDLE / batch {
        held.extend(futures::future::join_all((0..batch).map(|_| open())).await);
    }
    // Idle: every connection answered, its last stream released.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let growth = rss_bytes().saturating_sub(before);
    let per_connection = growth / IDLE as u64;
    eprintln!("{IDLE} {what}: RSS +{} KiB, {per_connection} bytes each", growth >> 10);
    (held, per_connection)
}

/// The proxy serving HTTPS with `pki`'s certificate for `*.toolforge.org`,
/// with no per-client connection cap.
async fn tls_proxy(pki: &Pki) -> Proxy {
    let (cert, key) = pki.leaf("a", "idle", &["*.toolforge.org"]);
    Proxy::start(Config {
        max_connections_per_client: 0,
        tls_cert: vec![cert],
        tls_key: vec![key],
        ..Config::default()
    })
    .await
}

#[tokio::test]
async fn idle_keepalive_connections_cost_a_few_kib_each() {
    let proxy = Proxy::start(Config { max_connections_per_client: 0, ..Config::default() }).await;
    let (mut held, per_connection) =
        hold_idle("idle keep-alive connections", 100, || idle_connection(proxy.http)).await;
    // hyper's read and write buffers alone are 16 KiB a connection; the
    // figure includes this test's own client sockets.
    assert!(per_connection < 8 * 1024, "{per_connection} bytes per idle connection");
    // Every one of them is still open and served.
    for stream in held.iter_mut().step_by(50) {
        stream.write_all(HEALTHZ).await.unwrap();
        assert_eq!(status_of(&responses(stream, 1).await[0]), 200);
    }
}

/// TLS connections opened at once: each waits at most 10 s for its answer
/// while the others' handshakes share the test's one thread.
const TLS_BATCH: usize = 25;

/// One HTTPS keep-alive connection that has been answered once and is now idle.
async fn idle_tls_connection(connector: &tokio_rustls::TlsConnector, port: u16) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut stream = connector.connect("foo.toolforge.org".try_into().unwrap(), tcp).await.unwrap();
    stream.write_all(HEALTHZ).await.unwrap();
    let answer = responses(&mut stream, 1).await.remove(0);
    assert_eq!(status_of(&answer), 200, "{answer}");
    stream
}

#[tokio::test]
async fn idle_tls_keepalive_connections_let_go_of_their_read_buffers() {
    let pki = Pki::new("idle-tls");
    let proxy = tls_proxy(&pki).await;
    let port = proxy.https.unwrap().port();
    let connector = tls_connector(&pki.ca(), &[]);
    let (mut held, per_connection) =
        hold_idle("idle TLS keep-alive connections", TLS_BATCH, || idle_tls_connection(&connector, port)).await;
    // Both ends of each connection are in this process. Measured: about 11 KiB
    // for the two, and 19 KiB when rustls kept each end's 4 KiB read buffer
    // for good (before vendor/rustls let go of an empty one).
    assert!(per_connection < 15 * 1024, "{per_connection} bytes per idle TLS connection");
    for stream in held.iter_mut().step_by(50) {
        stream.write_all(HEALTHZ).await.unwrap();
        assert_eq!(status_of(&responses(stream, 1).await[0]), 200);
    }
}

type H2Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// One HTTP/2 connection that has been answered once through the proxy and
/// is now idle, from hyper's client.
async fn idle_h2_connection(connector: &tokio_rustls::TlsConnector, port: u16) -> H2Sender {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = connector.connect("foo.toolforge.org".try_into().unwrap(), tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    h2_get(&mut sender).await;
    sender
}

async fn h2_get(sender: &mut H2Sender) {
    let request = hyper::Request::get("https://foo.toolforge.org/idle")
        .header("user-agent", "idle-tests/1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("answer within 10 s")
        .unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
}

#[tokio::test]
async fn idle_h2_connections_keep_no_buffers() {
    let pki = Pki::new("idle-h2");
    let proxy = tls_proxy(&pki).await;
    let backend = Backend::echo("b").await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    let port = proxy.https.unwrap().port();
    let connector = tls_connector(&pki.ca(), &[b"h2"]);
    let (mut held, per_connection) =
        hold_idle("idle h2 connections", TLS_BATCH, || idle_h2_connection(&connector, port)).await;
    // Both ends of each connection are in this process: hyper's h2 client
    // shares the patched h2 and rustls. Measured: 26.5 KiB for the two, and
    // 43.7 KiB before the connection future shrank and h2 and rustls let go
    // of their idle buffers.
    assert!(per_connection < 32 * 1024, "{per_connection} bytes per idle h2 connection");
    for sender in held.iter_mut().step_by(50) {
        h2_get(sender).await;
    }
}

#[tokio::test]
async fn pipelined_and_later_requests_keep_one_connection() {
    let backend = Backend::echo("b").await;
    let proxy = Proxy::start(Config::default()).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    // Two requests in one write, the second with a body: answered in order.
    let post = b"POST /second HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: t\r\nContent-Length: 5\r\n\r\nhello";
    let mut both = b"GET /first HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: t\r\n\r\n".to_vec();
    both.extend_from_slice(post);
    stream.write_all(&both).await.unwrap();
    let answers = responses(&mut stream, 2).await;
    assert!(answers[0].contains("uri=/first\n"), "{}", answers[0]);
    assert!(answers[1].contains("uri=/second\n") && answers[1].contains("body-bytes=5\n"), "{}", answers[1]);
    // A later request, once the connection has been idle, a head split
    // across writes, and a body sent after a pause.
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stream.write_all(b"POST /later HTTP/1.1\r\nHost: foo.tool").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream.write_all(b"forge.org\r\nUser-Agent: t\r\nContent-Length: 3\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream.write_all(b"abc").await.unwrap();
        let answer = responses(&mut stream, 1).await.remove(0);
        assert!(answer.contains("uri=/later\n") && answer.contains("body-bytes=3\n"), "round {round}: {answer}");
        assert!(!answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    }
    assert_eq!(backend.hits(), 5);
}

#[tokio::test]
async fn a_silent_connection_is_closed_by_the_shorter_of_head_and_keepalive_timeouts() {
    let proxy = Proxy::start(Config { header_timeout_secs: 1, ..Config::default() }).await;
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent connection still open after 8 s");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed after {:?}", started.elapsed());
    assert_eq!(timeouts(&proxy, "header"), 1);
}

/// Sends `head` one byte every `gap`; true when the proxy gave up on it
/// (closed the connection, or answered 408) before it was whole.
async fn send_slowly(stream: &mut TcpStream, head: &[u8], gap: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let Some((last, rest)) = head.split_last() else { return false };
    for byte in rest {
        if stream.write_all(&[*byte]).await.is_err() {
            return true;
        }
        // The wait between bytes; anything read during it is the proxy giving up.
        if tokio::time::timeout(gap, stream.read(&mut buf)).await.is_ok() {
            return true;
        }
    }
    stream.write_all(&[*last]).await.is_err()
}

#[tokio::test]
async fn every_head_on_a_busy_connection_gets_the_whole_header_timeout() {
    // Back-to-back requests keep one hyper connection (and its head timer)
    // across heads: the timer armed for an early head must neither cut a
    // later head short nor let a slow one run on.
    let proxy = Proxy::start(Config { header_timeout_secs: 2, ..Config::default() }).await;
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        stream.write_all(HEALTHZ).await.unwrap();
        let answer = responses(&mut stream, 1).await.remove(0);
        assert_eq!(status_of(&answer), 200, "{answer}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 1.4 s for a head that began just now: past the first head's deadline, within its own.
    let slow = Instant::now();
    let cut = send_slowly(&mut stream, HEALTHZ, Duration::from_millis(1400 / HEALTHZ.len() as u64)).await;
    assert!(!cut, "a head sent over {:?} was cut off; the timeout is 2 s", slow.elapsed());
    let answer = responses(&mut stream, 1).await.remove(0);
    assert_eq!(status_of(&answer), 200, "{answer}");
    // 3.5 s for the next one: cut off at its own deadline.
    let slow = Instant::now();
    let cut = send_slowly(&mut stream, HEALTHZ, Duration::from_millis(3500 / HEALTHZ.len() as u64)).await;
    let took = slow.elapsed();
    assert!(cut, "a head sent over {took:?} was let through; the timeout is 2 s");
    assert!(took >= Duration::from_millis(1800) && took < Duration::from_millis(3400), "cut off after {took:?}");
    assert_eq!(timeouts(&proxy, "header"), 1);
}
