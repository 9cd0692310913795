//! Cold sync: how long kube-sync takes from start until Redis holds the
//! routes of N Services (default 5,000) served by the fake API server over
//! HTTP, and a restart against the already-synced table (which writes
//! nothing). Prints the figures; asserts nothing about time.
//!
//! `cargo bench -p dynamicproxy-kube-sync --bench cold_sync [-- N]`

#[path = "../tests/fake_apiserver/mod.rs"]
mod fake_apiserver;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamicproxy_kube_sync::{Config, Metrics, run};
use dynamicproxy_redis::RouteStore;
use dynamicproxy_test_support::RedisServer;
use fake_apiserver::{FakeApiServer, service, with_label};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(5_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(bench(n));
}

async fn bench(n: usize) {
    let api = FakeApiServer::start().await;
    let redis = RedisServer::start();
    for i in 0..n {
        let ip = format!("10.{}.{}.{}", i / 65_536 % 256, i / 256 % 256, i % 256);
        let svc = service(&format!("tool-t{i}"), &format!("t{i}"), &ip, &[("http", 8000)]);
        // One in ten narrows its route with the path label, as some tools do.
        api.apply(if i % 10 == 0 { with_label(svc, "toollabs-proxy-path", "api") } else { svc });
    }

    let cold = sync_once(&api, &redis, n).await;
    println!("kube-sync cold sync of {n} Services into an empty Redis: {:.3} s", cold.as_secs_f64());
    let warm = sync_once(&api, &redis, n).await;
    println!("kube-sync restart against an already synced Redis ({n} Services): {:.3} s", warm.as_secs_f64());
}

/// Starts kube-sync, waits until the first sync completed with `n` owned routes, stops it.
async fn sync_once(api: &FakeApiServer, redis: &RedisServer, n: usize) -> Duration {
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let store = Arc::new(RouteStore::new(redis.url().parse().expect("redis url")));
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(run(Config::default(), api.client(), store, metrics.clone(), shutdown.clone()));
    let deadline = started + Duration::from_secs(120);
    while metrics.last_successful_sync().is_none() || metrics.owned_routes() != n as i64 {
        assert!(Instant::now() < deadline, "no complete sync within 120 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    let members: usize = redis::cmd("SCARD").arg("k8s_services").query(&mut redis.client()).expect("SCARD");
    assert_eq!(members, n, "every Service owns one route");
    shutdown.cancel();
    let _ = task.await;
    elapsed
}
