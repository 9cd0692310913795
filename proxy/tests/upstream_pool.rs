//! Keep-alive connections to backends: reused, replaced when the backend
//! closes them, closed when idle too long, and capped per backend. The
//! backend is raw TCP, so the test sees every connection the proxy opens and
//! every one it closes.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Proxy, get};
use dynamicproxy_proxy::Config;
use dynamicproxy_test_support::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A raw HTTP/1.1 backend answering `200 ok` to each request head.
struct CountingBackend {
    addr: SocketAddr,
    /// Connections accepted.
    opened: Arc<AtomicUsize>,
    /// Connections the proxy closed.
    closed: Arc<AtomicUsize>,
}

/// How the backend behaves after each response.
#[derive(Clone, Copy)]
struct Behaviour {
    /// Close the connection after each response, without saying so (as a
    /// server whose keep-alive timeout just ran out).
    close_after_each: bool,
    /// Time before each response.
    delay: Duration,
}

impl CountingBackend {
    async fn start(behaviour: Behaviour) -> CountingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (opened, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (o, c) = (opened.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                o.fetch_add(1, Ordering::SeqCst);
                let closed = c.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = stream.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            closed.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            tokio::time::sleep(behaviour.delay).await;
                            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                            if behaviour.close_after_each {
                                return;
                            }
                        }
                    }
                });
            }
        });
        CountingBackend { addr, opened, closed }
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

const PLAIN: Behaviour = Behaviour { close_after_each: false, delay: Duration::ZERO };

/// One event loop, so every request meets the same pool.
fn one_loop() -> Config {
    Config { event_loops: 1, ..Config::default() }
}

async fn proxy_to(backend: &CountingBackend, config: Config) -> Proxy {
    let proxy = Proxy::start(config).await;
    proxy.set_route("pooled", ".*", &format!("http://{}", backend.addr)).await;
    proxy
}

#[tokio::test]
async fn sequential_requests_share_one_backend_connection() {
    let backend = CountingBackend::start(PLAIN).await;
    let proxy = proxy_to(&backend, one_loop()).await;
    for i in 0..20 {
        let got = get(proxy.http, "pooled.toolforge.org", &format!("/{i}"), &[]).await;
        assert_eq!((got.status, got.body.as_str()), (200, "ok"));
    }
    assert_eq!(backend.opened(), 1, "every request after the first reused the idle connection");
    assert_eq!(backend.closed(), 0);
}

#[tokio::test]
async fn a_backend_closing_its_idle_connections_fails_no_request() {
    let backend = CountingBackend::start(Behaviour { close_after_each: true, delay: Duration::ZERO }).await;
    let proxy = proxy_to(&backend, one_loop()).await;
    for i in 0..40u64 {
        // Requests land right after the close and a little later, so both the
        // connection the proxy already saw close and the one it had not are met.
        tokio::time::sleep(Duration::from_millis(i % 3)).await;
        let got = get(proxy.http, "pooled.toolforge.org", "/", &[]).await;
        assert_eq!((got.status, got.body.as_str()), (200, "ok"), "request {i}: {:?}", got.headers);
    }
    assert_eq!(backend.opened(), 40, "each request needed a new connection");
}

#[tokio::test]
async fn idle_backend_connections_close_after_upstream_idle_timeout() {
    let backend = CountingBackend::start(PLAIN).await;
    let proxy = proxy_to(&backend, Config { upstream_idle_timeout_secs: 1, ..one_loop() }).await;
    let got = get(proxy.http, "pooled.toolforge.org", "/", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(backend.closed(), 0, "kept open right after the response");
    eventually(Duration::from_secs(5), "the idle connection closed", || async {
        (backend.closed() == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn idle_backend_connections_are_capped_per_backend() {
    let backend =
        CountingBackend::start(Behaviour { close_after_each: false, delay: Duration::from_millis(300) }).await;
    let proxy = proxy_to(&backend, Config { upstream_max_idle_per_backend: 2, ..one_loop() }).await;
    let burst = |n: usize| {
        let addr = proxy.http;
        futures::future::join_all((0..n).map(move |_| async move { get(addr, "pooled.toolforge.org", "/", &[]).await }))
    };
    for got in burst(6).await {
        assert_eq!(got.status, 200);
    }
    assert_eq!(backend.opened(), 6, "six requests at once need six connections");
    eventually(Duration::from_secs(5), "four connections over the cap closed", || async {
        (backend.closed() == 4).then_some(())
    })
    .await;
    for got in burst(2).await {
        assert_eq!(got.status, 200);
    }
    assert_eq!(backend.opened(), 6, "the two kept connections served the next two requests");
}
