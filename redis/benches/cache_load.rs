//! Cold load of a large route table: time until the cache is loaded and the
//! resident memory it adds. Run with `cargo bench -p dynamicproxy-redis --bench cache_load`.
//! `TOOLS=N` changes the table size (default 100,000).

use std::time::{Duration, Instant};

use dynamicproxy_redis::{CacheSyncConfig, RouteCache, run_cache_sync};
use dynamicproxy_test_support::RedisServer;
use tokio_util::sync::CancellationToken;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn seed(redis: &RedisServer, tools: usize) {
    let mut c = redis.client();
    for chunk in (0..tools).collect::<Vec<_>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            // Realistic mix: most tools have `.*`, one in ten also has a path route.
            pipe.cmd("HSET")
                .arg(format!("prefix:tool{i}"))
                .arg(".*")
                .arg(format!("http://172.16.{}.{}:{}", i / 65536 % 256, i / 256 % 256, 30000 + i % 20000))
                .ignore();
            if i % 10 == 0 {
                pipe.cmd("HSET")
                    .arg(format!("prefix:tool{i}"))
                    .arg(format!("/tool{i}/api.*"))
                    .arg("http://10.0.0.1:8000")
                    .ignore();
            }
        }
        pipe.query::<()>(&mut c).expect("seed redis");
    }
}

fn main() {
    let tools: usize = std::env::var("TOOLS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let redis = RedisServer::start();
    seed(&redis, tools);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let before = rss_kib();
        let cache = RouteCache::new();
        let shutdown = CancellationToken::new();
        let started = Instant::now();
        tokio::spawn(run_cache_sync(CacheSyncConfig::new(redis.url().parse().unwrap()), cache.clone(), shutdown.clone()));
        while !cache.is_loaded() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = started.elapsed();
        let after = rss_kib();
        assert_eq!(cache.status().tools, tools);
        println!(
            "cache_load: {tools} tools loaded in {:.0} ms; resident memory {:.1} MiB before, {:.1} MiB after (+{:.1} MiB, {:.0} bytes/tool)",
            elapsed.as_secs_f64() * 1000.0,
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            (after - before) as f64 / 1024.0,
            (after - before) as f64 * 1024.0 / tools as f64
        );
        shutdown.cancel();
    });
}
