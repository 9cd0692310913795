//! Forwarding through real sockets: headers, upstream failures, streaming,
//! WebSocket, malformed requests, graceful shutdown.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use dynamicproxy_proxy::Config;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::Response;
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn proxy_to(backend: &Backend, config: Config) -> Proxy {
    let proxy = Proxy::start(config).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    proxy
}

#[tokio::test]
async fn request_headers_to_upstream() {
    let backend = Backend::echo("b").await;
    let proxy = proxy_to(&backend, Config::default()).await;
    let got = get(
        proxy.http,
        "Foo.Toolforge.org",
        "/p%20q/r?s=t&u",
        &[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-host", "spoofed.example"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-port", "1234"),
            ("x-original-uri", "/spoofed"),
            ("proxy", "http://evil.example:3128"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-custom", "kept"),
        ],
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.echoed("host"), Some("foo.toolforge.org"), "Host normalised, as nginx's $host");
    assert_eq!(got.echoed("x-forwarded-for"), Some("203.0.113.9, 127.0.0.1"));
    assert_eq!(got.echoed_all("x-forwarded-host"), ["foo.toolforge.org"]);
    assert_eq!(got.echoed_all("x-forwarded-proto"), ["http"]);
    assert_eq!(got.echoed_all("x-forwarded-port"), [proxy.http.port().to_string().as_str()]);
    assert_eq!(got.echoed_all("x-original-uri"), ["/p%20q/r?s=t&u"]);
    assert!(got.body.contains("\nuri=/p%20q/r?s=t&u\n"), "{}", got.body);
    assert_eq!(got.echoed("x-custom"), Some("kept"));
    for gone in ["proxy", "x-hop", "keep-alive", "te"] {
        assert_eq!(got.echoed(gone), None, "{gone} must not reach the backend: {}", got.body);
    }
}

#[tokio::test]
async fn backend_errors_and_response_headers_pass_through() {
    let backend = Backend::start(Arc::new(|req| {
        Box::pin(async move {
            let status = req.uri().path().trim_start_matches('/').parse::<u16>().unwrap_or(200);
            Response::builder()
                .status(status)
                .header("x-backend", "yes")
                .header("connection", "x-drop")
                .header("x-drop", "1")
                .header("location", "http://elsewhere.example/x")
                .body(Full::new(Bytes::from(format!("backend says {status}"))))
                .unwrap()
        })
    }))
    .await;
    let proxy = proxy_to(&backend, Config::default()).await;
    for status in [404u16, 500, 502, 503] {
        let got = get(proxy.http, "foo.toolforge.org", &format!("/{status}"), &[]).await;
        assert_eq!(got.status, status);
        assert_eq!(got.body, format!("backend says {status}"), "the backend's own page, untouched");
        assert_eq!(got.header("x-backend"), Some("yes"));
        assert_eq!(got.header("x-drop"), None, "hop-by-hop named in Connection dropped");
        assert_eq!(got.header("location"), Some("http://elsewhere.example/x"));
    }
}

#[tokio::test]
async fn default_files_replace_backend_404() {
    let backend = Backend::start(Arc::new(|_req| {
        Box::pin(async move { Response::builder().status(404).body(Full::new(Bytes::from("nope"))).unwrap() })
    }))
    .await;
    let proxy = proxy_to(&backend, Config::default()).await;
    let got = get(proxy.http, "foo.toolforge.org", "/robots.txt", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (200, "User-agent: *\nDisallow: /\n"));
    let got = get(proxy.http, "foo.toolforge.org", "/favicon.ico", &[]).await;
    assert_eq!((got.status, got.header("content-type")), (200, Some("image/x-icon")));
    let got = get(proxy.http, "foo.toolforge.org", "/other", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (404, "nope"));
}

/// A raw backend answering every request on a connection in HTTP/1.0, as
/// Python's `http.server` does: with a length, then without one (the body
/// ends when it closes).
async fn http10_backend() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut served = 0;
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            served += 1;
            let reply: &[u8] = if served % 2 == 1 {
                b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nsized\n"
            } else {
                b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close\n"
            };
            let _ = stream.write_all(reply).await;
        }
    });
    addr
}

#[tokio::test]
async fn an_http10_backend_leaves_the_client_connection_open() {
    let backend = http10_backend().await;
    let proxy = Proxy::start(Config::default()).await;
    proxy.set_route("foo", ".*", &format!("http://{backend}")).await;
    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: test\r\n\r\n";
    let mut seen = String::new();
    for expected in ["sized\n", "until close\n"] {
        client.write_all(request).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let before = seen.len();
        while !seen[before..].contains(expected) {
            let n = tokio::time::timeout_at(deadline, client.read(&mut buf))
                .await
                .expect("the answer came in time")
                .unwrap();
            assert!(n > 0, "the proxy closed the client connection after:\n{seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let answer = &seen[before..];
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "answered in the backend's version:\n{answer}");
        assert!(!answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    }
}

#[tokio::test]
async fn unreachable_backend_is_502_page() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let proxy = Proxy::start(Config::default()).await;
    proxy.set_route("foo", ".*", &format!("http://{closed}")).await;
    let got = get(proxy.http, "foo.toolforge.org", "/", &[]).await;
    assert_eq!(got.status, 502);
    assert!(got.body.contains("Tool unreachable"), "{}", got.body);
}

#[tokio::test]
async fn silent_backend_is_504_page() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let proxy = Proxy::start(Config { read_timeout_secs: 1, ..Config::default() }).await;
    proxy.set_route("foo", ".*", &format!("http://{addr}")).await;
    let got = get(proxy.http, "foo.toolforge.org", "/", &[]).await;
    assert_eq!(got.status, 504);
    assert!(got.body.contains("Tool timed out"), "{}", got.body);
}

const CHUNK: usize = 64 * 1024;

#[tokio::test]
async fn one_gib_download_streams_in_bounded_memory() {
    const TOTAL: u64 = 1 << 30;
    // A raw backend writing 1 GiB with Content-Length, chunk by chunk.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = [0u8; 4096];
        let _ = s.read(&mut head).await;
        s.write_all(
            format!("HTTP/1.1 200 OK\r\nContent-Length: {TOTAL}\r\nContent-Type: application/octet-stream\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let chunk = vec![b'x'; CHUNK];
        for _ in 0..TOTAL / CHUNK as u64 {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let proxy = Proxy::start(Config::default()).await;
    proxy.set_route("big", ".*", &format!("http://{addr}")).await;

    let before = rss_bytes();
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    stream
        .write_all(b"GET /big HTTP/1.1\r\nHost: big.toolforge.org\r\nUser-Agent: t\r\nAccept-Encoding: gzip\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; CHUNK];
    let mut received: u64 = 0;
    let mut peak = before;
    let mut head_done = false;
    let mut head = Vec::new();
    while received < TOTAL {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed after {received} bytes");
        if head_done {
            received += n as u64;
        } else {
            head.extend_from_slice(&buf[..n]);
            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                head_done = true;
                let text = String::from_utf8_lossy(&head[..i]).to_string();
                assert!(text.starts_with("HTTP/1.1 200"), "{text}");
                assert!(text.to_ascii_lowercase().contains(&format!("content-length: {TOTAL}")), "{text}");
                received += (head.len() - i - 4) as u64;
            }
        }
        if received % (64 << 20) < n as u64 {
            peak = peak.max(rss_bytes());
        }
    }
    assert_eq!(received, TOTAL);
    let growth = peak.saturating_sub(before);
    eprintln!("1 GiB download: RSS before {} MiB, peak {} MiB, growth {} MiB", before >> 20, peak >> 20, growth >> 20);
    assert!(growth < 32 << 20, "RSS grew by {} MiB while streaming 1 GiB", growth >> 20);
}

#[tokio::test]
async fn large_upload_streams_and_oversize_is_413() {
    // The backend counts body bytes as they arrive and keeps none: the RSS
    // figure is then the proxy's and the client's alone (a backend that
    // collected the body made it a measure of how glibc trims its heap).
    let backend = Backend::start(Arc::new(|req: hyper::Request<hyper::body::Incoming>| {
        Box::pin(async move {
            let chunked = req.headers().get("transfer-encoding").is_some_and(|v| v == "chunked");
            let mut body = req.into_body();
            let mut bytes = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            let encoding = if chunked { "transfer-encoding: chunked" } else { "no transfer-encoding" };
            Response::new(Full::new(Bytes::from(format!("body-bytes={bytes}\n{encoding}\n"))))
        })
    }))
    .await;
    let proxy = proxy_to(&backend, Config { max_body_size: 1 << 30, ..Config::default() }).await;
    const TOTAL: u64 = 512 << 20;
    let before = rss_bytes();
    let chunk = Bytes::from(vec![b'u'; CHUNK]);
    let frames = futures::stream::iter(
        (0..TOTAL / CHUNK as u64).map(move |_| Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone()))),
    );
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let req = hyper::Request::post(format!("http://{}/upload", proxy.http))
        .header("host", "foo.toolforge.org")
        .header("user-agent", "t")
        .body(StreamBody::new(frames))
        .unwrap();
    let response = client.request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(body.contains(&format!("body-bytes={TOTAL}\n")), "{body}");
    assert!(body.contains("transfer-encoding: chunked"), "streamed as chunks, not buffered: {body}");
    let growth = rss_bytes().saturating_sub(before);
    eprintln!("512 MiB upload: RSS growth {} MiB", growth >> 20);
    assert!(growth < 32 << 20, "RSS grew by {} MiB", growth >> 20);

    // Over the limit, announced: 413 before anything reaches the backend.
    let small = proxy_to(&backend, Config { max_body_size: 1000, ..Config::default() }).await;
    let hits = backend.hits();
    let got = send(small.http, "POST", "foo.toolforge.org", "/", &[], Bytes::from(vec![0u8; 2000])).await;
    assert_eq!(got.status, 413);
    assert_eq!(backend.hits(), hits);
    // Over the limit, chunked (no length announced): 413 as well.
    let chunk = Bytes::from(vec![b'u'; 600]);
    let frames =
        futures::stream::iter((0..4).map(move |_| Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone()))));
    let req = hyper::Request::post(format!("http://{}/upload", small.http))
        .header("host", "foo.toolforge.org")
        .header("user-agent", "t")
        .body(StreamBody::new(frames))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let response = client.request(req).await.unwrap();
    assert_eq!(response.status(), 413);
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    let addr = websocket_echo_backend().await;
    let proxy = Proxy::start(Config::default()).await;
    proxy.set_route("ws", ".*", &format!("http://{addr}")).await;
    let (mut ws, response) = tokio_tungstenite::connect_async(websocket_request(&proxy))
        .await
        .expect("websocket handshake through the proxy");
    assert_eq!(response.status(), 101);
    for i in 0..5 {
        let text = format!("hello {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(text.clone())).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    let big = vec![7u8; 1 << 20];
    ws.send(tokio_tungstenite::tungstenite::Message::binary(big.clone())).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echoed.into_data().as_ref(), big.as_slice());
}

#[tokio::test]
async fn open_tunnels_count_against_the_connection_limit() {
    let addr = websocket_echo_backend().await;
    let proxy = Proxy::start(Config { max_connections: 1, ..Config::default() }).await;
    proxy.set_route("ws", ".*", &format!("http://{addr}")).await;
    let (mut ws, response) = tokio_tungstenite::connect_async(websocket_request(&proxy)).await.expect("handshake");
    assert_eq!(response.status(), 101);
    ws.send(tokio_tungstenite::tungstenite::Message::text("ping")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    // The tunnel holds the only place: another client is turned away, with a status.
    let refused = raw(proxy.http, b"GET /.well-known/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_of(&refused), 503, "a connection past the limit was served: {refused}");
    assert!(refused.contains("X-Dynamicproxy-Reason: over-capacity"), "{refused}");
    // Once the tunnel is closed, its place is free again.
    drop(ws);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let served =
            raw(proxy.http, b"GET /.well-known/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        if status_of(&served) == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the tunnel's place was never given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn malformed_requests_never_reach_a_backend() {
    let backend = Backend::echo("b").await;
    let proxy = Proxy::start(Config { default_backend: Some(backend.url()), ..Config::default() }).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        ("bad host", b"GET / HTTP/1.1\r\nHost: foo bar\r\nUser-Agent: t\r\n\r\n".to_vec(), &[400]),
        ("host with path", b"GET / HTTP/1.1\r\nHost: foo.toolforge.org/x\r\nUser-Agent: t\r\n\r\n".to_vec(), &[400]),
        ("bad port", b"GET / HTTP/1.1\r\nHost: foo.toolforge.org:99999\r\nUser-Agent: t\r\n\r\n".to_vec(), &[400]),
        ("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nUser-Agent: t\r\n\r\n".to_vec(), &[400]),
        ("bad percent", b"GET /a%zz HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: t\r\n\r\n".to_vec(), &[400]),
        (
            "huge header",
            [b"GET / HTTP/1.1\r\nHost: foo.toolforge.org\r\nX-Big: ".to_vec(), vec![b'a'; 200_000], b"\r\n\r\n".to_vec()].concat(),
            &[431, 400],
        ),
        (
            "too many headers",
            [b"GET / HTTP/1.1\r\nHost: foo.toolforge.org\r\n".to_vec(), (0..500).flat_map(|i| format!("X-H{i}: v\r\n").into_bytes()).collect(), b"\r\n".to_vec()].concat(),
            &[431, 400],
        ),
        (
            "CL then TE",
            b"POST / HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "TE then CL",
            b"POST / HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "TE not chunked",
            b"POST / HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: t\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "conflicting lengths",
            b"POST / HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: t\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde".to_vec(),
            &[400],
        ),
        ("garbage", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n".to_vec(), &[400]),
    ];
    for (what, request, statuses) in cases {
        let response = raw(proxy.http, &request).await;
        let status = status_of(&response);
        assert!(statuses.contains(&status), "{what}: got {response:?}");
        assert_eq!(backend.hits(), 0, "{what} reached the backend");
    }
    // A smuggling attempt after a good request on the same connection is caught too.
    let response = raw(
        proxy.http,
        b"GET / HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: t\r\n\r\n\
          POST / HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: t\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
    )
    .await;
    assert_eq!(backend.hits(), 1, "{response}");
    assert!(response.contains("HTTP/1.1 200") && response.contains("HTTP/1.1 400"), "{response}");
}

#[tokio::test]
async fn query_is_passed_on_as_written() {
    let backend = Backend::echo("b").await;
    let proxy = Proxy::start(Config { default_backend: Some(backend.url()), ..Config::default() }).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    let request =
        b"GET /a?q=100%&r=%G0 HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: t\r\nConnection: close\r\n\r\n";
    let response = raw(proxy.http, request).await;
    assert_eq!(status_of(&response), 200, "{response}");
    assert!(response.contains("x-original-uri: /a?q=100%&r=%G0"), "{response}");
    assert_eq!(backend.hits(), 1);
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let slow = Backend::start(Arc::new(|_req| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Response::new(Full::new(Bytes::from("slow but done")))
        })
    }))
    .await;
    let proxy = proxy_to(&slow, Config { shutdown_grace_secs: 10, ..Config::default() }).await;
    let addr = proxy.http;
    let in_flight = tokio::spawn(async move { get(addr, "foo.toolforge.org", "/", &[]).await });
    eventually_hit(&slow).await;
    proxy.shutdown.cancel();
    let got = in_flight.await.unwrap();
    assert_eq!((got.status, got.body.as_str()), (200, "slow but done"));
    let done = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if proxy.done.is_finished() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(done.is_ok(), "run returned after draining");
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
}

async fn eventually_hit(backend: &Backend) {
    dynamicproxy_test_support::eventually(Duration::from_secs(5), "request reached the backend", || async {
        (backend.hits() > 0).then_some(())
    })
    .await;
}
