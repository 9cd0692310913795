//! Backends marked down: repeated connect failures turn into a fast 502
//! `backend-down`, a trial per window finds the backend back, and a new
//! registration clears the mark at once.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use dynamicproxy_proxy::Config;
use dynamicproxy_test_support::eventually;

/// An address where nothing listens (the port was just freed).
async fn closed_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A backend answering `200 up` on `addr`.
async fn backend_on(addr: SocketAddr) -> tokio_util::sync::CancellationToken {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = s.cancelled() => return,
                r = listener.accept() => match r { Ok(p) => p, Err(_) => continue },
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"up\n"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    stop
}

/// Sends the failures that mark the backend of `dead.toolforge.org` down.
async fn mark_down(proxy: &Proxy) {
    for i in 0..5 {
        let got = get(proxy.http, "dead.toolforge.org", "/", &[]).await;
        assert_eq!(got.status, 502, "failure {i}");
        assert_eq!(got.header("x-dynamicproxy-reason"), Some("backend-unreachable"), "failure {i}");
    }
    let start = Instant::now();
    let got = get(proxy.http, "dead.toolforge.org", "/", &[]).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.header("x-dynamicproxy-reason"), Some("backend-down"));
    assert!(got.body.contains("not answered several times"), "{}", got.body);
    assert!(start.elapsed() < Duration::from_secs(1));
    let metrics = proxy.metrics_text();
    assert!(metrics.contains("dynamicproxy_proxy_backends_down 1"), "{metrics}");
    assert!(metrics.contains("dynamicproxy_proxy_backend_transitions_total{direction=\"down\"} 1"), "{metrics}");
}

#[tokio::test]
async fn a_refusing_backend_is_marked_down_then_a_trial_finds_it_back() {
    let addr = closed_port().await;
    let proxy = Proxy::start(Config::default()).await;
    proxy.set_route("dead", ".*", &format!("http://{addr}")).await;
    mark_down(&proxy).await;

    // The backend comes back; once the 1 s window is over, a trial request
    // goes through and traffic flows again.
    let _up = backend_on(addr).await;
    eventually(Duration::from_secs(5), "a trial request reaches the revived backend", || async {
        let got = get(proxy.http, "dead.toolforge.org", "/", &[]).await;
        (got.status == 200).then_some(())
    })
    .await;
    for _ in 0..5 {
        assert_eq!(get(proxy.http, "dead.toolforge.org", "/", &[]).await.status, 200);
    }
    let metrics = proxy.metrics_text();
    assert!(metrics.contains("dynamicproxy_proxy_backends_down 0"), "{metrics}");
    assert!(metrics.contains("dynamicproxy_proxy_backend_transitions_total{direction=\"up\"} 1"), "{metrics}");
}

#[tokio::test]
async fn a_new_registration_clears_the_mark_at_once() {
    let addr = closed_port().await;
    // A window long enough that only the registration can clear the mark.
    let config = Config { backend_down_first_secs: 60, backend_down_max_secs: 60, ..Config::default() };
    let proxy = Proxy::start(config).await;
    proxy.set_route("dead", ".*", &format!("http://{addr}")).await;
    mark_down(&proxy).await;

    let _up = backend_on(addr).await;
    let got = get(proxy.http, "dead.toolforge.org", "/", &[]).await;
    assert_eq!(got.header("x-dynamicproxy-reason"), Some("backend-down"), "still inside the window");

    // `webservice restart` registers the same address again.
    let before = proxy.cache.tool("dead").unwrap();
    let mut redis = proxy.redis();
    redis::cmd("HSET").arg("prefix:dead").arg(".*").arg(format!("http://{addr}")).query::<()>(&mut redis).unwrap();
    proxy.wait_for("dead", |now| now.is_some_and(|now| !std::ptr::eq(now, Arc::as_ptr(&before)))).await;

    let got = get(proxy.http, "dead.toolforge.org", "/", &[]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body, "up\n");
}
