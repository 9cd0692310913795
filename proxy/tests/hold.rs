//! Hold-and-wake (`[proxy] hold_secs`): a `webservice restart` (unregister,
//! then register seconds later) under load fails no request when holding is
//! on; held requests are woken by the new route, bounded, and counted.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use dynamicproxy_proxy::Config;
use dynamicproxy_test_support::eventually;
use http_body_util::{BodyExt, Full};
use hyper::Request;

const TOOL: &str = "restarting";
const HOST: &str = "restarting.toolforge.org";

/// What one request through the proxy ended as.
#[derive(Debug, Clone)]
#[allow(dead_code)] // the texts are read through Debug, in failure messages
enum Outcome {
    Ok,
    Page(u16, String),
    Failed(String),
}

/// GETs `/` for [`HOST`] in a loop from `clients` tasks until `stop`.
fn load(
    proxy: std::net::SocketAddr,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Outcome>>> {
    (0..clients)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let client = client();
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let req = Request::get(format!("http://{proxy}/"))
                        .header("host", HOST)
                        .header("user-agent", "hold-test/1")
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    let outcome = match tokio::time::timeout(Duration::from_secs(15), client.request(req)).await {
                        Ok(Ok(response)) => {
                            let status = response.status().as_u16();
                            let reason = response
                                .headers()
                                .get("x-dynamicproxy-reason")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_string();
                            let _ = response.into_body().collect().await;
                            if status == 200 { Outcome::Ok } else { Outcome::Page(status, reason) }
                        }
                        Ok(Err(error)) => Outcome::Failed(error.to_string()),
                        Err(_) => Outcome::Failed("no answer in 15 s".into()),
                    };
                    outcomes.push(outcome);
                }
                outcomes
            })
        })
        .collect()
}

/// The value of a metric line (`name{labels} value`), 0 when absent.
fn metric(proxy: &Proxy, line_start: &str) -> f64 {
    proxy
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(line_start).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Unregister, 2 s, register a new backend (as `webservice restart` does on
/// the grid), with 6 clients requesting all along; returns every outcome.
async fn restart_under_load(hold_secs: u64) -> (Vec<Outcome>, Proxy) {
    let proxy = Proxy::start(Config { hold_secs, ..Config::default() }).await;
    let old = Backend::echo("old").await;
    proxy.set_route(TOOL, ".*", &old.url()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(proxy.http, 6, stop.clone());
    eventually(Duration::from_secs(5), "load reaches the old backend", || {
        let hits = old.hits();
        async move { (hits > 20).then_some(()) }
    })
    .await;

    let mut redis = proxy.redis();
    redis::cmd("HDEL").arg(format!("prefix:{TOOL}")).arg(".*").query::<()>(&mut redis).unwrap();
    proxy.wait_for(TOOL, |routes| routes.is_none()).await;
    drop(old);
    // The restart's gap: the scenario itself, not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let new = Backend::echo("new").await;
    redis::cmd("HSET").arg(format!("prefix:{TOOL}")).arg(".*").arg(new.url()).query::<()>(&mut redis).unwrap();
    eventually(Duration::from_secs(5), "load reaches the new backend", || {
        let hits = new.hits();
        async move { (hits > 20).then_some(()) }
    })
    .await;

    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.extend(client.await.unwrap());
    }
    (outcomes, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_load_fails_no_request_when_held() {
    let (outcomes, proxy) = restart_under_load(5).await;
    let bad: Vec<_> = outcomes.iter().filter(|o| !matches!(o, Outcome::Ok)).collect();
    assert!(bad.is_empty(), "{} of {} requests failed: {:?}", bad.len(), outcomes.len(), &bad[..bad.len().min(5)]);
    // The requests of the gap were held and woken by the new route, not
    // lucky: each of the 6 clients had one in flight.
    let woken = metric(&proxy, "dynamicproxy_proxy_hold_outcomes_total{outcome=\"woken\"}");
    assert!(woken >= 6.0, "woken = {woken}\n{}", proxy.metrics_text());
    assert_eq!(metric(&proxy, "dynamicproxy_proxy_held_requests"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_load_fails_requests_without_hold() {
    let (outcomes, _proxy) = restart_under_load(0).await;
    let no_route = outcomes.iter().filter(|o| matches!(o, Outcome::Page(503, reason) if reason == "no-route")).count();
    assert!(no_route > 0, "no request got the no-route page: {} requests", outcomes.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_are_bounded_per_tool() {
    let proxy = Proxy::start(Config { hold_secs: 5, ..Config::default() }).await;
    let backend = Backend::echo("back").await;
    proxy.set_route(TOOL, ".*", &backend.url()).await;
    let mut redis = proxy.redis();
    redis::cmd("DEL").arg(format!("prefix:{TOOL}")).query::<()>(&mut redis).unwrap();
    proxy.wait_for(TOOL, |routes| routes.is_none()).await;

    // 70 requests at once: 64 (the per-tool bound) wait, 6 get the page at once.
    let requests: Vec<_> = (0..70).map(|_| tokio::spawn(get(proxy.http, HOST, "/", &[]))).collect();
    eventually(Duration::from_secs(4), "64 held, 6 refused", || {
        let held = metric(&proxy, "dynamicproxy_proxy_held_requests");
        let refused = metric(&proxy, "dynamicproxy_proxy_hold_outcomes_total{outcome=\"refused\"}");
        async move { (held == 64.0 && refused == 6.0).then_some(()) }
    })
    .await;
    redis::cmd("HSET").arg(format!("prefix:{TOOL}")).arg(".*").arg(backend.url()).query::<()>(&mut redis).unwrap();
    let mut statuses = Vec::new();
    for request in requests {
        let got = request.await.unwrap();
        statuses.push((got.status, got.header("x-dynamicproxy-reason").map(str::to_string)));
    }
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    let paged = statuses.iter().filter(|(s, r)| *s == 503 && r.as_deref() == Some("no-route")).count();
    assert_eq!((ok, paged), (64, 6), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_bodiless_request_waits_for_the_new_registration() {
    let proxy = Proxy::start(Config { hold_secs: 5, ..Config::default() }).await;
    // A registration whose backend is gone: its port refuses.
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    proxy.set_route(TOOL, ".*", &format!("http://{gone}")).await;

    // A request with a body cannot be sent again: its page comes at once.
    let started = std::time::Instant::now();
    let got = send(proxy.http, "POST", HOST, "/", &[], Bytes::from_static(b"payload")).await;
    assert_eq!((got.status, got.header("x-dynamicproxy-reason")), (502, Some("backend-unreachable")));
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());

    let waiting = tokio::spawn(get(proxy.http, HOST, "/page", &[]));
    eventually(Duration::from_secs(4), "the GET is held", || {
        let held = metric(&proxy, "dynamicproxy_proxy_held_requests");
        async move { (held == 1.0).then_some(()) }
    })
    .await;
    let new = Backend::echo("new").await;
    proxy.set_route(TOOL, ".*", &new.url()).await;
    let got = waiting.await.unwrap();
    assert_eq!(got.status, 200, "{}", got.body);
    assert!(got.body.contains("backend=new\nmethod=GET\nuri=/page\n"), "{}", got.body);
    assert_eq!(got.echoed("host"), Some(HOST));
}

#[tokio::test]
async fn a_tool_that_lost_no_route_is_not_held() {
    let proxy = Proxy::start(Config { hold_secs: 5, ..Config::default() }).await;
    let backend = Backend::echo("back").await;
    proxy.set_route(TOOL, "/api.*", &backend.url()).await;
    // Never registered, and registered but for other paths: the page at once.
    for (host, path) in [("unknown.toolforge.org", "/"), (HOST, "/elsewhere")] {
        let started = std::time::Instant::now();
        let got = get(proxy.http, host, path, &[]).await;
        assert_eq!((got.status, got.header("x-dynamicproxy-reason")), (503, Some("no-route")), "{host}{path}");
        assert!(started.elapsed() < Duration::from_secs(2), "{host}{path} took {:?}", started.elapsed());
    }
    assert_eq!(metric(&proxy, "dynamicproxy_proxy_held_requests"), 0.0);
}
