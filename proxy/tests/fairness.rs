//! Fair shares (`tool_max_concurrent_requests`): a flooded tool is refused
//! with 503 over-capacity at once while other tools keep answering.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use dynamicproxy_proxy::Config;
use dynamicproxy_test_support::eventually;
use futures::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::Response;
use tokio_util::sync::CancellationToken;

/// A backend that holds every request until `release` is cancelled.
async fn hanging_backend(release: CancellationToken) -> Backend {
    Backend::start(Arc::new(move |_req| {
        let release = release.clone();
        Box::pin(async move {
            release.cancelled().await;
            Response::new(Full::new(Bytes::from_static(b"late\n")))
        })
    }))
    .await
}

/// Starts `n` requests to `host` that the hanging backend holds, and waits
/// until the backend has them all.
async fn flood(proxy: &Proxy, backend: &Backend, host: &'static str, n: usize) -> Vec<tokio::task::JoinHandle<Got>> {
    let before = backend.hits();
    let addr = proxy.http;
    let held: Vec<_> = (0..n).map(|_| tokio::spawn(async move { get(addr, host, "/", &[]).await })).collect();
    eventually(Duration::from_secs(5), "flood reaches the backend", || {
        let hits = backend.hits();
        async move { (hits >= before + n).then_some(()) }
    })
    .await;
    held
}

/// Asserts that a request to `host` is refused over capacity, quickly.
async fn assert_over_capacity(proxy: &Proxy, host: &str, path: &str) {
    let start = Instant::now();
    let got = get(proxy.http, host, path, &[]).await;
    assert_eq!(got.status, 503, "{got:?}");
    assert_eq!(got.header("x-dynamicproxy-reason"), Some("over-capacity"));
    assert!(start.elapsed() < Duration::from_secs(2), "refused only after {:?}", start.elapsed());
}

#[tokio::test]
async fn a_flooded_tool_is_refused_at_once_and_others_keep_answering() {
    let release = CancellationToken::new();
    let _release_guard = release.clone().drop_guard();
    let slow = hanging_backend(release.clone()).await;
    let fast = Backend::echo("fast").await;
    let config = Config {
        tool_max_concurrent_requests: 4,
        tool_max_concurrent_requests_overrides: BTreeMap::from([("busy".to_string(), 8)]),
        ..Config::default()
    };
    let proxy = Proxy::start(config).await;
    proxy.set_route("slow", ".*", &slow.url()).await;
    proxy.set_route("busy", ".*", &slow.url()).await;
    proxy.set_route("fast", ".*", &fast.url()).await;

    let held = flood(&proxy, &slow, "slow.toolforge.org", 4).await;
    assert_over_capacity(&proxy, "slow.toolforge.org", "/").await;
    // Legacy paths count against the same tool.
    assert_over_capacity(&proxy, "tools.wmflabs.org", "/slow/").await;
    for _ in 0..20 {
        let got = get(proxy.http, "fast.toolforge.org", "/", &[]).await;
        assert_eq!(got.status, 200, "another tool suffered from the flood: {got:?}");
    }

    // The override raises one tool's share above the default.
    let busy = flood(&proxy, &slow, "busy.toolforge.org", 8).await;
    assert_over_capacity(&proxy, "busy.toolforge.org", "/").await;

    // When the held requests finish, their places are free again.
    release.cancel();
    for request in held.into_iter().chain(busy) {
        assert_eq!(request.await.unwrap().status, 200);
    }
    let got = get(proxy.http, "slow.toolforge.org", "/", &[]).await;
    assert_eq!(got.status, 200);
}

#[tokio::test]
async fn an_open_websocket_tunnel_holds_its_tools_place() {
    let addr = websocket_echo_backend().await;
    let config = Config { tool_max_concurrent_requests: 1, ..Config::default() };
    let proxy = Proxy::start(config).await;
    proxy.set_route("ws", ".*", &format!("http://{addr}")).await;
    let request = websocket_request(&proxy);
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.expect("handshake");
    assert_eq!(response.status(), 101);
    ws.send(tokio_tungstenite::tungstenite::Message::text("ping")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();

    assert_over_capacity(&proxy, "ws.toolforge.org", "/").await;

    drop(ws);
    eventually(Duration::from_secs(5), "the tunnel's place is given back", || async {
        // The echo backend is not HTTP: a request that reaches it fails as
        // unreachable, which still shows the share let it through.
        let got = get(proxy.http, "ws.toolforge.org", "/", &[]).await;
        (got.header("x-dynamicproxy-reason") != Some("over-capacity")).then_some(())
    })
    .await;
}

/// A response still streaming is a request still in flight: its place in
/// the tool's share is kept until the body has been sent, not given back at
/// the response head (a tool streaming slowly would otherwise hold many more
/// backend connections than its share).
#[tokio::test]
async fn a_streaming_response_keeps_its_place_until_its_body_ends() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let release = CancellationToken::new();
    let _release_guard = release.clone().drop_guard();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let backend_release = release.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let release = backend_release.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst").await;
                release.cancelled().await;
                let _ = stream.write_all(b"-last").await;
            });
        }
    });
    let proxy = Proxy::start(Config { tool_max_concurrent_requests: 1, ..Config::default() }).await;
    proxy.set_route("stream", ".*", &format!("http://{backend}")).await;

    let mut client = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: stream.toolforge.org\r\nuser-agent: proxy-tests/1\r\n\r\n")
        .await
        .unwrap();
    let mut received = Vec::new();
    read_until_it_ends_with(&mut client, &mut received, b"first").await;
    assert!(received.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&received));
    // Let through, the second request would wait on the held backend: bounded
    // here, so that the failure is a message rather than a hang.
    tokio::time::timeout(Duration::from_secs(10), assert_over_capacity(&proxy, "stream.toolforge.org", "/"))
        .await
        .expect("a second request went to the tool while its first response was still streaming");

    release.cancel();
    read_until_it_ends_with(&mut client, &mut received, b"first-last").await;
    eventually(Duration::from_secs(5), "the finished response gives its place back", || async {
        let got = get(proxy.http, "stream.toolforge.org", "/", &[]).await;
        (got.header("x-dynamicproxy-reason") != Some("over-capacity")).then_some(())
    })
    .await;
}

/// Reads from `client` into `received` until it ends with `end`.
async fn read_until_it_ends_with(client: &mut tokio::net::TcpStream, received: &mut Vec<u8>, end: &[u8]) {
    use tokio::io::AsyncReadExt;
    while !received.ends_with(end) {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "the proxy closed the connection after: {}", String::from_utf8_lossy(received));
        received.extend_from_slice(&buf[..n]);
    }
}

/// Sends one request on `sender`'s connection and returns its status, its
/// reason header and whether the proxy asked to close.
async fn exchange(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    host: &str,
    body: &'static [u8],
) -> (u16, Option<String>, bool) {
    use http_body_util::BodyExt;
    tokio::time::timeout(Duration::from_secs(5), sender.ready()).await.unwrap().expect("connection still open");
    let request = hyper::Request::builder()
        .method(method)
        .uri("/")
        .header("host", host)
        .header("user-agent", "proxy-tests/1")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request)).await.unwrap().unwrap();
    let status = response.status().as_u16();
    let reason = response.headers().get("x-dynamicproxy-reason").map(|v| v.to_str().unwrap().to_owned());
    let closes = response.headers().get("connection").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let page = response.into_body().collect().await.unwrap().to_bytes();
    assert!(!page.is_empty(), "the refusal has its page");
    (status, reason, closes)
}

/// A flooding client is answered on the connection it already has: a refusal
/// that closed it would make every retry a new TCP connection for the proxy
/// to accept, which is what the flood costs the other tools.
#[tokio::test]
async fn an_over_capacity_refusal_keeps_the_connection_for_the_next_request() {
    let release = CancellationToken::new();
    let _release_guard = release.clone().drop_guard();
    let slow = hanging_backend(release.clone()).await;
    let fast = Backend::echo("fast").await;
    let proxy = Proxy::start(Config { tool_max_concurrent_requests: 1, ..Config::default() }).await;
    proxy.set_route("slow", ".*", &slow.url()).await;
    proxy.set_route("fast", ".*", &fast.url()).await;
    let _held = flood(&proxy, &slow, "slow.toolforge.org", 1).await;

    let stream = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    let connection = tokio::spawn(connection);
    for (method, body) in [("GET", &b""[..]), ("POST", &b"a body read in full"[..]), ("GET", &b""[..])] {
        let (status, reason, closes) = exchange(&mut sender, method, "slow.toolforge.org", body).await;
        assert_eq!((status, reason.as_deref(), closes), (503, Some("over-capacity"), false), "{method}");
        let (status, _, closes) = exchange(&mut sender, "GET", "fast.toolforge.org", b"").await;
        assert_eq!((status, closes), (200, false), "the request after a refused {method}");
    }
    assert!(!connection.is_finished(), "the proxy closed the connection");
}
